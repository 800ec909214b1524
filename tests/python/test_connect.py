"""`call.connect()` rings the connector's destination, a `telcoflow phone` registered at
+15550100 (the development connector's connect destination)."""

import asyncio

import pytest

import audio_util
from conftest import Agent

DESTINATION = "+15550100"
RATE = 16000


@pytest.mark.parametrize("phone_mode", ["--reject", "--no-answer"])
async def test_connect_unanswered_then_call_goes_on(server, tmp_path, phone_mode):
    results = {}

    async def connect_then_speak(call):
        assert await call.answer()
        results["connect"] = await call.connect(ring_time_seconds=2)
        # The call must still be up: the caller hears this.
        await call.send_audio(audio_util.to_pcm(audio_util.tone(RATE, 440.0, 1.5)))
        async for _ in call.audio_stream():
            pass

    out = tmp_path / "heard.wav"
    phone = await server.phone(DESTINATION, phone_mode, "--once")
    try:
        async with Agent(server, connect_then_speak, sample_rate=RATE) as agent:
            caller = await server.call("--to", "+15552220020", "--record", str(out), "--timeout", "9")
            summary = await caller.json_line(30)
            assert await caller.wait(10) == 0, summary
            agent.check()
        ring = await phone.json_line(10)
    finally:
        await phone.stop()

    connect = results["connect"]
    assert not connect, "connect to a phone that does not answer must fail"
    # The reference SDK documents CALL_UNANSWERED as the outcome of a connect nobody picks up;
    # applications written for it test for that code, whether the phone rang out or refused.
    assert connect.error_code == "CALL_UNANSWERED", (connect.error_code, connect.error_message)
    assert ring["event"] == "call" and ring["to"] == DESTINATION, ring
    assert ring["answered"] is False, ring
    assert ring["rejected"] is (phone_mode == "--reject"), ring
    # The caller stayed connected to the agent until it hung up itself.
    assert summary["answered"] is True, summary
    assert summary["hangup_by"] == "caller" and summary["reason"] == "timeout", summary
    rate, heard = audio_util.read_wav(out)
    audio_util.assert_tone(rate, heard, 440.0, min_seconds=1.2)


async def test_connect_answered_then_whisper_barge_spy(server, tone_wav, tmp_path):
    results = {}

    async def connect_and_switch_modes(call):
        assert await call.answer()
        results["connect"] = await call.connect(ring_time_seconds=10)
        results["whisper"] = await call.whisper()
        results["barge"] = await call.barge()
        results["spy"] = await call.spy()
        # The agent leaves; caller and callee stay connected.
        results["close"] = await call.close()

    phone_heard = tmp_path / "phone.wav"
    phone = await server.phone(DESTINATION, "--answer-after", "0.5", "--record", str(phone_heard), "--once")
    try:
        async with Agent(server, connect_and_switch_modes, sample_rate=RATE) as agent:
            # The caller's tone starts when the agent answers; the phone picks up within about
            # a second, so it hears most of the 2 s.
            caller = await server.call("--to", "+15552220021", "--play", str(tone_wav), "--tail", "1", "--timeout", "20")
            summary = await caller.json_line(30)
            assert await caller.wait(10) == 0, summary
            await asyncio.wait_for(agent.handler_done.wait(), 10)
            agent.check()
        leg = await phone.json_line(10)
        assert await phone.wait(10) == 0
    finally:
        await phone.stop()

    for name in ("connect", "whisper", "barge", "spy", "close"):
        r = results[name]
        assert r, f"{name} failed: {r.error_code} {r.error_message}"
    assert summary["answered"] is True and summary["hangup_by"] == "caller", summary
    assert leg["answered"] is True and leg["to"] == DESTINATION, leg
    # The caller hung up, which ends the bridged leg too.
    assert leg["hangup_by"] == "remote", leg
    rate, heard = audio_util.read_wav(phone_heard)
    audio_util.assert_tone(rate, heard, 440.0, min_seconds=0.8)
