"""Two applications race for one session: exactly one claims it and gets the call, the other
gets SESSION_BUSY naming the winner's control connection."""

import asyncio

from telcoflow.exceptions import WSSSessionBusy

from conftest import Agent


async def test_two_agents_race_for_one_session(server):
    async def answer(call):
        assert await call.answer()
        async for _ in call.audio_stream():
            pass

    async with Agent(server, answer, name="a") as a, Agent(server, answer, name="b") as b:
        caller = await server.call("--to", "+15552220030", "--timeout", "4")
        summary = await caller.json_line(30)
        assert await caller.wait(10) == 0, summary
        # Both were told about the session and both tried to claim it.
        await asyncio.wait_for(a.notified.wait(), 5)
        await asyncio.wait_for(b.notified.wait(), 5)
        await asyncio.wait_for(asyncio.gather(a.handler_done.wait(), b.handler_done.wait()), 10)
        a.check()
        b.check()
        winner, loser = (a, b) if a.calls else (b, a)
        assert len(winner.calls) == 1 and winner.opened and not winner.open_errors
        assert not loser.calls and not loser.opened
        assert len(loser.open_errors) == 1, loser.open_errors
        err = loser.open_errors[0]
        assert isinstance(err, WSSSessionBusy), repr(err)
        assert err.bound_sm_ws_id == winner.sm.id, (err.bound_sm_ws_id, winner.sm.id)
    assert summary["answered"] is True, summary
