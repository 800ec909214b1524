"""Echo agent on the official Telcoflow Python SDK, for `telcoflow bench --agent python`.

Answers every call and sends back what it hears, unchanged. It understands the bench's
in-band markers (see crates/telcoflow-cli/src/cmd/bench/marker.rs): a frame marked SPEAK
queues one second of square-wave tone instead of being echoed; a frame marked STOP clears the
send buffer (`clear_send_audio_buffer`, the barge-in path) instead of being echoed.

Prints `ready` on stdout once connected. On SIGTERM or SIGINT it prints one JSON line with the
frames handled and the time spent handling each (receipt to `send_audio` returning), then exits.

    .venv/bin/python bench/python_echo_agent.py --server ws://127.0.0.1:8080 --sample-rate 24000
"""

import argparse
import asyncio
import json
import signal
import struct
import sys
import time

from telcoflow import CallAudioConfig, SessionManager, SessionManagerConfig

# A marked frame starts with this sample pair, then the kind as a 4-bit digit sample: digit d
# is 7932 - 256 * d. All are mu-law table values, so they pass G.711 (SIP callers) exactly.
MAGIC = struct.pack("<hh", 32124, -31100)
DIGIT_BASE = 7932
DIGIT_STEP = 256
KIND_SPEAK = struct.pack("<h", DIGIT_BASE - 3 * DIGIT_STEP)
KIND_STOP = struct.pack("<h", DIGIT_BASE - 4 * DIGIT_STEP)
TONE_AMP = 20860
TONE_HALF_PERIOD = 10
# Handling-time histogram: 10 us buckets up to 20 ms, fixed size so memory does not grow with
# the number of frames.
BUCKET_US = 10
BUCKETS = 2000


class Stats:
    def __init__(self):
        self.hist = [0] * (BUCKETS + 1)
        self.frames = 0
        self.max_us = 0.0

    def add(self, us: float):
        self.frames += 1
        self.max_us = max(self.max_us, us)
        self.hist[min(int(us // BUCKET_US), BUCKETS)] += 1

    def percentile(self, p: float) -> float:
        if self.frames == 0:
            return 0.0
        rank = max(1, int(-(-p * self.frames // 100)))
        seen = 0
        for i, n in enumerate(self.hist):
            seen += n
            if seen >= rank:
                return min((i + 1) * BUCKET_US, self.max_us)
        return self.max_us


def tone_bytes(rate: int) -> bytes:
    high = struct.pack("<h", TONE_AMP)
    low = struct.pack("<h", -TONE_AMP)
    return b"".join(high if (n // TONE_HALF_PERIOD) % 2 == 0 else low for n in range(rate))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--api-key", default="dev-api-key")
    parser.add_argument("--connector-uuid", default="00000000-0000-4000-8000-000000000001")
    parser.add_argument("--sample-rate", type=int, default=24000)
    args = parser.parse_args()

    stats = Stats()
    tone = tone_bytes(args.sample_rate)
    config = SessionManagerConfig.create(
        api_key=args.api_key,
        connector_uuid=args.connector_uuid,
        base_url=args.server,
        call_audio=CallAudioConfig(sample_rate=args.sample_rate),
    )

    async def echo(call):
        await call.answer()
        async for chunk in call.audio_stream():
            start = time.perf_counter()
            kind = chunk[4:6] if len(chunk) >= 6 and chunk[:4] == MAGIC else b""
            if kind == KIND_SPEAK:
                await call.send_audio(tone)
            elif kind == KIND_STOP:
                await call.clear_send_audio_buffer()
            else:
                await call.send_audio(chunk)
            stats.add((time.perf_counter() - start) * 1e6)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with SessionManager(config) as sm:

        @sm.on_session_notification
        async def _notified(noti):
            try:
                session = await sm.open_session(noti.session_id)
            except Exception as e:  # another agent claimed it, or the call is gone
                print(f"open_session failed: {e!r}", file=sys.stderr)
                return

            @session.on_incoming_call
            async def _incoming(call):
                try:
                    await echo(call)
                except Exception as e:  # the call ended under us: normal at hang-up
                    print(f"call ended: {e!r}", file=sys.stderr)

            await session.ready()

        print("ready", flush=True)
        await stop.wait()

    print(
        json.dumps(
            {
                "frames": stats.frames,
                "handle_us_p50": stats.percentile(50),
                "handle_us_p99": stats.percentile(99),
                "handle_us_max": round(stats.max_us),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
