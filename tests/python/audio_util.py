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


def assert_tone(rate: int, samples: list[int], hz: float, min_seconds: float) -> tuple[int, int]:
    """Asserts that `samples` hold at least `min_seconds` of a clean `hz` tone and returns the
    (first, last) index of the 20 ms frames that carry it.

    Live audio may have short dropouts (a playout buffer running dry for a frame under load),
    so the tone is counted frame by frame rather than as one unbroken run; but nearly every
    non-silent frame must be the tone, so distortion or foreign audio fails.
    """
    fr = frames(rate, samples)
    active = [i for i, f in enumerate(fr) if rms(f) > 1000]
    tonal = [i for i in active if tone_ratio(rate, fr[i], hz) > 0.8]
    seconds = len(tonal) * FRAME_MS / 1000
    assert seconds >= min_seconds, (
        f"expected >= {min_seconds:.2f} s of {hz} Hz, found {seconds:.2f} s "
        f"({len(active)} active frames, recording {len(samples) / rate:.2f} s, rms {rms(samples):.0f})"
    )
    # Frames cut by a dropout are partly silent; anything beyond a few percent is not the tone.
    assert len(tonal) >= 0.9 * len(active) - 3, (
        f"only {len(tonal)} of {len(active)} active frames are a clean {hz} Hz tone"
    )
    # Frequency by zero crossings over the longest unbroken stretch of tone frames.
    best_start, best_len, run_start = 0, 0, None
    tonal_set = set(tonal)
    for i in range(len(fr) + 1):
        if i in tonal_set:
            run_start = i if run_start is None else run_start
        elif run_start is not None:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = None
    frame = rate * FRAME_MS // 1000
    assert best_len >= 10, f"no unbroken 200 ms of tone (longest {best_len * FRAME_MS} ms)"
    stretch = samples[best_start * frame : (best_start + best_len) * frame]
    est = zero_crossing_hz(rate, stretch)
    assert abs(est - hz) <= hz * 0.03, f"expected {hz} Hz, zero crossings say {est:.1f} Hz"
    level = rms([x for i in tonal for x in fr[i]])
    assert level > 2000, f"tone too quiet: rms {level:.0f}"
    return tonal[0], tonal[-1]
