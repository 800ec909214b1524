"""Pure-Python audio helpers for the SDK tests: WAV I/O, tone synthesis and analysis.

Analysis works on 20 ms frames: a frame is "active" when its RMS is above a threshold, and the
frequency of an active stretch is estimated by counting zero crossings and confirmed with a
Goertzel filter.
"""

import array
import math
import wave

FRAME_MS = 20


def tone(rate: int, hz: float, seconds: float, amplitude: int = 10000) -> list[int]:
    n = int(rate * seconds)
    return [int(amplitude * math.sin(2 * math.pi * hz * i / rate)) for i in range(n)]


def to_pcm(samples: list[int]) -> bytes:
    return array.array("h", samples).tobytes()


def read_wav(path) -> tuple[int, list[int]]:
    """Reads a mono 16-bit WAV (what `telcoflow call --record` writes)."""
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1, "recording must be mono"
        assert w.getsampwidth() == 2, "recording must be 16-bit"
        rate = w.getframerate()
        data = w.readframes(w.getnframes())
    return rate, list(array.array("h", data))


def write_wav(path, rate: int, samples: list[int], channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        if channels == 1:
            w.writeframes(to_pcm(samples))
        else:
            w.writeframes(to_pcm([s for s in samples for _ in range(channels)]))


def rms(samples: list[int]) -> float:
    if not samples:
        return 0.0
    return math.sqrt(sum(s * s for s in samples) / len(samples))


def frames(rate: int, samples: list[int]) -> list[list[int]]:
    n = rate * FRAME_MS // 1000
    return [samples[i : i + n] for i in range(0, len(samples) - n + 1, n)]


def active_frames(rate: int, samples: list[int], threshold: float = 1000.0) -> list[bool]:
    return [rms(f) > threshold for f in frames(rate, samples)]


def active_span(rate: int, samples: list[int], threshold: float = 1000.0):
    """(first, last) active frame index, or None when all is silence."""
    act = active_frames(rate, samples, threshold)
    idx = [i for i, a in enumerate(act) if a]
    if not idx:
        return None
    return idx[0], idx[-1]


def zero_crossing_hz(rate: int, samples: list[int]) -> float:
    crossings = sum(1 for a, b in zip(samples, samples[1:]) if (a < 0) != (b < 0))
    return crossings / 2 / (len(samples) / rate)


def goertzel_power(rate: int, samples: list[int], hz: float) -> float:
    """Normalised power of `hz` in `samples` (about amplitude^2 / 4 for a pure tone)."""
    k = 2 * math.cos(2 * math.pi * hz / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + k * s1 - s2, s1
    power = s1 * s1 + s2 * s2 - k * s1 * s2
    return power / (len(samples) ** 2)


def tone_ratio(rate: int, samples: list[int], hz: float) -> float:
    """Share of the signal's power that sits at `hz` (1.0 = pure tone)."""
    total = rms(samples) ** 2
    if total == 0:
        return 0.0
    return 2 * goertzel_power(rate, samples, hz) / total


def longest_active_run(rate: int, samples: list[int], threshold: float = 1000.0) -> tuple[int, int]:
    """(start frame, length in frames) of the longest run of active frames."""
    best = (0, 0)
    start = None
    act = active_frames(rate, samples, threshold) + [False]
    for i, a in enumerate(act):
        if a and start is None:
            start = i
        elif not a and start is not None:
            if i - start > best[1]:
                best = (start, i - start)
            start = None
    return best


def assert_tone(rate: int, samples: list[int], hz: float, min_seconds: float) -> tuple[int, int]:
    """Asserts that `samples` hold at least `min_seconds` of a steady `hz` tone; returns the
    (start frame, frames) of the run."""
    start, length = longest_active_run(rate, samples)
    frame = rate * FRAME_MS // 1000
    seconds = length * FRAME_MS / 1000
    assert seconds >= min_seconds, (
        f"expected >= {min_seconds:.2f} s of tone, longest active run is {seconds:.2f} s "
        f"(recording {len(samples) / rate:.2f} s, overall rms {rms(samples):.0f})"
    )
    # Judge the middle of the run, away from fades at its edges.
    lo = (start + length // 4) * frame
    hi = (start + length - length // 4) * frame
    middle = samples[lo:hi]
    est = zero_crossing_hz(rate, middle)
    assert abs(est - hz) <= hz * 0.03, f"expected {hz} Hz, zero crossings say {est:.1f} Hz"
    ratio = tone_ratio(rate, middle, hz)
    assert ratio > 0.8, f"only {ratio:.2f} of the power is at {hz} Hz"
    level = rms(middle)
    assert level > 2000, f"tone too quiet: rms {level:.0f}"
    return start, length
