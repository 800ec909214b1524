"""Distributed handling: application A receives the call and serialises it untouched with
`to_json()`; application B rebuilds it with `Call.from_json()`, answers and echoes."""

import asyncio

from telcoflow import Call, CallAudioConfig, CallState

import audio_util
from conftest import Agent


async def test_to_json_from_json_handoff(server, tone_wav, tmp_path):
    handoff: asyncio.Queue[str] = asyncio.Queue()

    async def forward(call):
        assert call.state == CallState.NEW
        await handoff.put(call.to_json())

    out = tmp_path / "heard.wav"
    async with Agent(server, forward, name="a") as a:
        caller = await server.call("--to", "+15552220040", "--play", str(tone_wav), "--record", str(out), "--tail", "1.5", "--timeout", "30")
        data = await asyncio.wait_for(handoff.get(), 20)
        # Node B: no session manager, only the serialised call.
        call = Call.from_json(data, audio_config=CallAudioConfig(sample_rate=16000))
        assert call.state == CallState.NEW
        result = await call.answer()
        assert result, f"answer after hand-off failed: {result.error_code} {result.error_message}"

        async def echo():
            async for chunk in call.audio_stream():
                await call.send_audio(chunk)

        echo_task = asyncio.create_task(echo())
        summary = await caller.json_line(45)
        assert await caller.wait(10) == 0, summary
        await asyncio.wait_for(echo_task, 10)
        a.check()
    assert a.calls[0].state == CallState.NEW, "node A never touched the call"
    assert summary["answered"] is True and summary["reason"] == "end_of_audio", summary
    rate, heard = audio_util.read_wav(out)
    audio_util.assert_tone(rate, heard, 440.0, min_seconds=1.5)
