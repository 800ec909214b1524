//! The in-band frame marker, the speech-like test signal and the interrupt tone.
//!
//! Every 20 ms frame a bench caller sends starts with [`MARKER_SAMPLES`] samples that carry a
//! magic pair, the frame's kind, the caller's index, a sequence number and the send instant
//! (microseconds since the run's epoch). The rest of the frame is a speech-like signal. Caller
//! and agent use the same sample rate, so the server passes samples through unchanged and the
//! echoed frame still carries its marker: the caller reads the round trip straight from it.
//!
//! Agents understand two kinds beyond plain audio: [`Kind::Speak`] (queue one second of
//! [`tone`] instead of echoing) and [`Kind::Stop`] (clear the send buffer: barge-in).

/// First magic sample. Outside the range of [`speech`] (|s| <= 12,000) and of [`tone`].
pub(crate) const MAGIC_A: i16 = 0x7E57;
/// Second magic sample.
pub(crate) const MAGIC_B: i16 = -0x4B1D;
/// Samples the marker occupies at the start of a frame.
pub(crate) const MARKER_SAMPLES: usize = 8;
/// Amplitude of the square-wave tone agents play on [`Kind::Speak`].
pub(crate) const TONE_AMP: i16 = 20_000;
/// Half period of the tone, in samples.
const TONE_HALF_PERIOD: usize = 10;

/// What a marked frame asks of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Plain audio, counted in the round-trip, loss and lateness figures.
    Data = 1,
    /// Plain audio sent during an interrupt probe; echoed but not counted.
    Probe = 2,
    /// The agent queues one second of tone instead of echoing this frame.
    Speak = 3,
    /// The agent clears its send buffer (and the server's) instead of echoing this frame.
    Stop = 4,
}

impl Kind {
    fn from_sample(s: i16) -> Option<Self> {
        match s {
            1 => Some(Self::Data),
            2 => Some(Self::Probe),
            3 => Some(Self::Speak),
            4 => Some(Self::Stop),
            _ => None,
        }
    }
}

/// A decoded marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) kind: Kind,
    /// The sending caller's index (low 16 bits).
    pub(crate) caller: u16,
    /// Frame sequence number within the call.
    pub(crate) seq: u32,
    /// Send instant, microseconds since the run's epoch (wraps after 71 minutes).
    pub(crate) sent_us: u32,
}

fn split(v: u32) -> [i16; 2] {
    // Bit-for-bit halves: the samples are only a carrier.
    [(v >> 16) as u16 as i16, v as u16 as i16]
}

fn join(hi: i16, lo: i16) -> u32 {
    (u32::from(hi as u16) << 16) | u32::from(lo as u16)
}

impl Marker {
    /// Writes the marker over the first [`MARKER_SAMPLES`] samples of `frame`.
    pub(crate) fn write(&self, frame: &mut [i16]) {
        if frame.len() < MARKER_SAMPLES {
            return;
        }
        let [s0, s1] = split(self.seq);
        let [t0, t1] = split(self.sent_us);
        frame[..MARKER_SAMPLES].copy_from_slice(&[
            MAGIC_A,
            MAGIC_B,
            self.kind as i16,
            self.caller as i16,
            s0,
            s1,
            t0,
            t1,
        ]);
    }

    /// Reads a marker at the start of `samples`.
    pub(crate) fn read(samples: &[i16]) -> Option<Self> {
        let m = samples.get(..MARKER_SAMPLES)?;
        if m[0] != MAGIC_A || m[1] != MAGIC_B {
            return None;
        }
        Some(Self {
            kind: Kind::from_sample(m[2])?,
            caller: m[3] as u16,
            seq: join(m[4], m[5]),
            sent_us: join(m[6], m[7]),
        })
    }

    /// Reads a marker at the start of little-endian PCM bytes (what agents receive).
    pub(crate) fn read_pcm(pcm: &[u8]) -> Option<Self> {
        let mut head = [0i16; MARKER_SAMPLES];
        let bytes = pcm.get(..MARKER_SAMPLES * 2)?;
        for (s, b) in head.iter_mut().zip(bytes.chunks_exact(2)) {
            *s = i16::from_le_bytes([b[0], b[1]]);
        }
        Self::read(&head)
    }
}

/// Finds every marker in a stream that arrives in chunks, including one split across two.
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    /// The last `MARKER_SAMPLES - 1` samples of the previous chunk, then the current chunk.
    window: Vec<i16>,
    carry: usize,
}

impl Scanner {
    /// Calls `found` for each marker that ends in `chunk`.
    pub(crate) fn scan(&mut self, chunk: &[i16], mut found: impl FnMut(Marker)) {
        self.window.drain(..self.window.len() - self.carry);
        self.window.extend_from_slice(chunk);
        let w = &self.window;
        let mut i = 0;
        while i + MARKER_SAMPLES <= w.len() {
            if w[i] == MAGIC_A {
                if let Some(m) = Marker::read(&w[i..]) {
                    found(m);
                    i += MARKER_SAMPLES;
                    continue;
                }
            }
            i += 1;
        }
        // Keep what could still be the start of a marker completed by the next chunk.
        self.carry = w.len().min(MARKER_SAMPLES - 1);
    }
}

/// A speech-like signal: a 120 Hz voice with a few formant-ish harmonics, shaped into
/// syllables (about 4 per second) with short pauses, peak well under [`MAGIC_A`].
pub(crate) fn speech(rate: u32, samples: usize) -> Vec<i16> {
    let r = f64::from(rate);
    (0..samples)
        .map(|n| {
            let t = n as f64 / r;
            let f0 = 120.0 + 15.0 * (2.0 * std::f64::consts::PI * 0.7 * t).sin();
            let phase = 2.0 * std::f64::consts::PI * f0 * t;
            let voice = phase.sin() * 0.5
                + (3.0 * phase).sin() * 0.25
                + (7.0 * phase).sin() * 0.15
                + (19.0 * phase).sin() * 0.1;
            // Syllable envelope: raised sine at 4 Hz, squared so there are near-silent gaps.
            let env = (0.5 - 0.5 * (2.0 * std::f64::consts::PI * 4.0 * t).cos()).powi(2);
            (voice * env * 12_000.0) as i16
        })
        .collect()
}

/// `samples` of the square-wave tone agents play on [`Kind::Speak`].
pub(crate) fn tone(samples: usize) -> Vec<i16> {
    (0..samples)
        .map(|n| {
            if (n / TONE_HALF_PERIOD) % 2 == 0 {
                TONE_AMP
            } else {
                -TONE_AMP
            }
        })
        .collect()
}

/// Whether a received frame is (mostly) the tone.
pub(crate) fn is_tone(frame: &[i16]) -> bool {
    let hits = frame
        .iter()
        .filter(|&&s| s == TONE_AMP || s == -TONE_AMP)
        .count();
    !frame.is_empty() && hits * 4 >= frame.len() * 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips() {
        let m = Marker {
            kind: Kind::Stop,
            caller: 65_000,
            seq: 0xDEAD_BEEF,
            sent_us: 4_000_000_000,
        };
        let mut frame = speech(24_000, 480);
        m.write(&mut frame);
        assert_eq!(Marker::read(&frame), Some(m));
        let pcm: Vec<u8> = frame.iter().flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(Marker::read_pcm(&pcm), Some(m));
        assert_eq!(Marker::read(&speech(24_000, 480)), None);
        assert_eq!(Marker::read_pcm(&pcm[..10]), None);
    }

    #[test]
    fn scanner_finds_markers_split_across_chunks() {
        let mut stream = speech(8000, 1000);
        for (i, at) in [0usize, 155, 500].into_iter().enumerate() {
            Marker {
                kind: Kind::Data,
                caller: 1,
                seq: i as u32,
                sent_us: 7,
            }
            .write(&mut stream[at..]);
        }
        let mut s = Scanner::default();
        let mut seqs = Vec::new();
        for chunk in stream.chunks(160) {
            s.scan(chunk, |m| seqs.push(m.seq));
        }
        assert_eq!(seqs, [0, 1, 2]);
    }

    #[test]
    fn tone_is_told_from_speech_and_silence() {
        assert!(is_tone(&tone(480)));
        assert!(!is_tone(&speech(24_000, 480)));
        assert!(!is_tone(&[0; 480]));
        assert!(speech(24_000, 24_000).iter().all(|s| s.unsigned_abs() <= 12_000));
    }
}
