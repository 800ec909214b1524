"""`clear_send_audio_buffer()` (agent.interrupt) stops queued agent audio at once: the caller's
recording shows the tone ending soon after the interrupt instead of after the whole queue."""

import asyncio
import time

import audio_util
from conftest import Agent

RATE = 16000
QUEUED_SECONDS = 5.0
INTERRUPT_AFTER = 1.0


async def test_interrupt_stops_queued_audio(server, tmp_path):
    timing = {}

    async def speak_then_interrupt(call):
        assert await call.answer()
        pcm = audio_util.to_pcm(audio_util.tone(RATE, 440.0, QUEUED_SECONDS))
        timing["queued_at"] = time.monotonic()
        await call.send_audio(pcm)
        # The stimulus, not a synchronisation: interrupt about 1 s into the speech.
        await asyncio.sleep(INTERRUPT_AFTER)
        timing["interrupt_at"] = time.monotonic()
        timing["cleared"] = await call.clear_send_audio_buffer()
        async for _ in call.audio_stream():
            pass

    out = tmp_path / "heard.wav"
    async with Agent(server, speak_then_interrupt, sample_rate=RATE) as agent:
        caller = await server.call("--to", "+15552220010", "--record", str(out), "--timeout", "5")
        summary = await caller.json_line(30)
        assert await caller.wait(10) == 0, summary
        agent.check()
    assert summary["answered"] is True, summary
    assert summary["hangup_by"] == "caller" and summary["reason"] == "timeout", summary
    # Most of the 5 s was still queued in the SDK when the interrupt came.
    assert timing["cleared"] > 0, timing

    rate, heard = audio_util.read_wav(out)
    first, last = audio_util.assert_tone(rate, heard, 440.0, min_seconds=0.4)
    played = (last - first + 1) * audio_util.FRAME_MS / 1000
    spoke_for = timing["interrupt_at"] - timing["queued_at"]
    print(f"tone played {played:.2f} s, interrupt {spoke_for:.2f} s after queueing, {timing['cleared']} bytes cleared")
    # Without the interrupt the tone would run on for seconds (the rest of the queue plus what
    # the server holds for playout); allow a quarter second for transport and frame rounding.
    assert played <= spoke_for + 0.25, f"tone lasted {played:.2f} s, interrupt after {spoke_for:.2f} s"
    tail = heard[(last + 1) * rate * audio_util.FRAME_MS // 1000 :]
    assert len(tail) / rate >= 1.0, f"only {len(tail) / rate:.2f} s recorded after the tone"
    assert audio_util.active_span(rate, tail) is None, "audio came back after the interrupt"
