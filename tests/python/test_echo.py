"""An echo agent on the official SDK answers `telcoflow call`; the caller hears its tone back."""

import asyncio
import json

import audio_util
from conftest import Agent


async def echo(call):
    result = await call.answer()
    assert result, f"answer failed: {result.error_code} {result.error_message}"
    async for chunk in call.audio_stream():
        await call.send_audio(chunk)


async def test_echo_agent_returns_the_callers_tone(server, tone_wav, tmp_path):
    out = tmp_path / "heard.wav"
    # The agent runs at 24 kHz and the caller at 16 kHz: the server resamples both ways.
    async with Agent(server, echo, sample_rate=24000) as agent:
        caller = await server.call(
            "--from", "+15551110001", "--to", "+15552220002",
            "--play", str(tone_wav), "--record", str(out),
            "--tail", "1.5", "--timeout", "30",
        )
        summary = await caller.json_line(45)
        rc = await caller.wait(10)
        agent.check()
    assert summary["answered"] is True, summary
    assert rc == 0, summary
    assert summary["call_id"], summary
    assert summary["hangup_by"] == "caller" and summary["reason"] == "end_of_audio", summary
    assert 0 <= summary["time_to_answer_ms"] < 10_000, summary
    # 2 s of tone plus the tail, sent in real time.
    assert 3.0 <= summary["seconds_sent"] <= 4.5, summary
    assert summary["seconds_received"] >= 3.0, summary
    assert len(agent.calls) == 1
    assert agent.calls[0].caller_number == "+15551110001"
    assert agent.calls[0].callee_number == "+15552220002"

    rate, heard = audio_util.read_wav(out)
    assert rate == 16000
    assert abs(len(heard) / rate - summary["seconds_received"]) < 0.05
    audio_util.assert_tone(rate, heard, 440.0, min_seconds=1.5)


async def test_unanswered_call_exits_nonzero(server):
    """No agent is connected: the call is never answered and `telcoflow call` says so."""
    caller = await server.call("--to", "+15552220003", "--timeout", "3")
    summary = await caller.json_line(20)
    rc = await caller.wait(10)
    assert summary["answered"] is False, summary
    assert summary["time_to_answer_ms"] is None, summary
    assert rc == 1, summary
    assert json.dumps(summary)  # one well-formed JSON object
