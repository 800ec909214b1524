//! The in-band frame marker, the speech-like test signal and the interrupt tone.
//!
//! Every 20 ms frame a bench caller sends starts with [`MARKER_SAMPLES`] samples that carry a
//! magic pair, the frame's kind, the caller's index, a sequence number and the send instant
//! (microseconds since the run's epoch). The rest of the frame is a speech-like signal. Caller
//! and agent use the same sample rate, so the server passes samples through unchanged and the
//! echoed frame still carries its marker: the caller reads the round trip straight from it.
//!
//! The marker survives G.711 mu-law (callers over SIP/RTP): every marker sample, and the
//! tone's amplitude, is a value of the mu-law decode table, and `decode(encode(v)) == v` holds
//! for each of those, so a frame that is mu-law coded on its way (8 kHz, no resampling) comes
//! out with its marker and tone exact. Numbers travel as 4-bit digits, one per sample, each
//! digit one of 16 table values ([`DIGIT_BASE`] down in steps of [`DIGIT_STEP`]). The same form
//! serves the simulated network, where samples pass untouched.
//!
//! Agents understand two kinds beyond plain audio: [`Kind::Speak`] (queue one second of
//! [`tone`] instead of echoing) and [`Kind::Stop`] (clear the send buffer: barge-in).

/// First magic sample (mu-law code 0x80). Outside the range of [`speech`] (|s| <= 12,000) and
/// of [`tone`].
pub(crate) const MAGIC_A: i16 = 32_124;
/// Second magic sample (mu-law code 0x01).
pub(crate) const MAGIC_B: i16 = -31_100;
/// Sample of digit 0 (mu-law code 0xA0); digit `d` is `DIGIT_BASE - d * DIGIT_STEP` (codes
/// 0xA0..=0xAF, one mu-law segment, whose steps are 256 apart).
pub(crate) const DIGIT_BASE: i16 = 7_932;
/// Distance between two digit samples.
pub(crate) const DIGIT_STEP: i16 = 256;
/// Digits (4 bits each) per 32-bit field, and per 16-bit field.
const DIGITS_32: usize = 8;
const DIGITS_16: usize = 4;
/// Samples the marker occupies at the start of a frame: the magic pair, the kind, the caller
/// (16 bits), the sequence number and the send instant (32 bits each).
pub(crate) const MARKER_SAMPLES: usize = 2 + 1 + DIGITS_16 + 2 * DIGITS_32;
/// Amplitude of the square-wave tone agents play on [`Kind::Speak`] (mu-law code 0x8B, so the
/// tone too comes out of G.711 exact).
pub(crate) const TONE_AMP: i16 = 20_860;
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
    fn from_digit(d: u8) -> Option<Self> {
        match d {
            1 => Some(Self::Data),
            2 => Some(Self::Probe),
            3 => Some(Self::Speak),
            4 => Some(Self::Stop),
            _ => None,
        }
    }
}

/// The sample carrying digit `d` (0..=15).
fn digit_sample(d: u8) -> i16 {
    DIGIT_BASE - i16::from(d & 0x0F) * DIGIT_STEP
}

/// The digit a sample carries, if it is a digit sample.
fn sample_digit(s: i16) -> Option<u8> {
    let off = DIGIT_BASE.checked_sub(s)?;
    if off < 0 || off % DIGIT_STEP != 0 {
        return None;
    }
    u8::try_from(off / DIGIT_STEP).ok().filter(|&d| d < 16)
}

/// Writes the low `out.len()` nibbles of `v`, most significant first.
fn put_digits(v: u32, out: &mut [i16]) {
    let n = out.len();
    for (i, s) in out.iter_mut().enumerate() {
        *s = digit_sample((v >> (4 * (n - 1 - i))) as u8);
    }
}

/// Reads digits written by [`put_digits`].
fn get_digits(samples: &[i16]) -> Option<u32> {
    samples
        .iter()
        .try_fold(0u32, |v, &s| Some((v << 4) | u32::from(sample_digit(s)?)))
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

impl Marker {
    /// Writes the marker over the first [`MARKER_SAMPLES`] samples of `frame`.
    pub(crate) fn write(&self, frame: &mut [i16]) {
        let Some(m) = frame.get_mut(..MARKER_SAMPLES) else {
            return;
        };
        m[0] = MAGIC_A;
        m[1] = MAGIC_B;
        m[2] = digit_sample(self.kind as u8);
        let (caller, rest) = m[3..].split_at_mut(DIGITS_16);
        let (seq, sent) = rest.split_at_mut(DIGITS_32);
        put_digits(u32::from(self.caller), caller);
        put_digits(self.seq, seq);
        put_digits(self.sent_us, sent);
    }

    /// Reads a marker at the start of `samples`.
    pub(crate) fn read(samples: &[i16]) -> Option<Self> {
        let m = samples.get(..MARKER_SAMPLES)?;
        if m[0] != MAGIC_A || m[1] != MAGIC_B {
            return None;
        }
        let caller = &m[3..3 + DIGITS_16];
        let seq = &m[3 + DIGITS_16..3 + DIGITS_16 + DIGITS_32];
        let sent = &m[3 + DIGITS_16 + DIGITS_32..];
        Some(Self {
            kind: Kind::from_digit(sample_digit(m[2])?)?,
            // Four digits: at most 0xFFFF.
            caller: get_digits(caller)? as u16,
            seq: get_digits(seq)?,
            sent_us: get_digits(sent)?,
        })
    }

    /// Reads a marker at the start of little-endian PCM bytes (what agents receive).
    pub(crate) fn read_pcm(pcm: &[u8]) -> Option<Self> {
        let bytes = pcm.get(..MARKER_SAMPLES * 2)?;
        // The magic pair first, so that unmarked audio costs two comparisons.
        let at = |i: usize| i16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        if at(0) != MAGIC_A || at(1) != MAGIC_B {
            return None;
        }
        let mut head = [0i16; MARKER_SAMPLES];
        for (i, s) in head.iter_mut().enumerate() {
            *s = at(i);
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

    /// Through the server's real G.711 coder: PCM -> mu-law -> PCM, as over SIP/RTP.
    fn through_pcmu(frame: &[i16]) -> Vec<i16> {
        use telcoflow_sip::rtp::g711::G711;
        let mut bytes = vec![0u8; frame.len()];
        G711::Pcmu.encode(frame, &mut bytes);
        let mut back = vec![0i16; frame.len()];
        G711::Pcmu.decode(&bytes, &mut back);
        back
    }

    #[test]
    fn marker_and_tone_survive_mu_law() {
        use telcoflow_sip::rtp::g711::G711;
        // The constants are the decode-table values the docs name.
        assert_eq!(G711::Pcmu.decode_sample(0x80), MAGIC_A);
        assert_eq!(G711::Pcmu.decode_sample(0x01), MAGIC_B);
        assert_eq!(G711::Pcmu.decode_sample(0x8B), TONE_AMP);
        for d in 0..16u8 {
            assert_eq!(G711::Pcmu.decode_sample(0xA0 + d), digit_sample(d));
            assert_eq!(sample_digit(digit_sample(d)), Some(d));
        }
        assert_eq!(sample_digit(DIGIT_BASE + 1), None);
        assert_eq!(sample_digit(DIGIT_BASE - 16 * DIGIT_STEP), None);
        for kind in [Kind::Data, Kind::Probe, Kind::Speak, Kind::Stop] {
            for (caller, seq, sent_us) in [
                (0, 0, 0),
                (65_535, u32::MAX, u32::MAX),
                (1234, 0x0F0F_A5A5, 987_654_321),
            ] {
                let m = Marker {
                    kind,
                    caller,
                    seq,
                    sent_us,
                };
                let mut frame = speech(8000, 160);
                m.write(&mut frame);
                let coded = through_pcmu(&frame);
                assert_eq!(coded[..MARKER_SAMPLES], frame[..MARKER_SAMPLES], "{m:?}");
                assert_eq!(Marker::read(&coded), Some(m));
                // And once more, as the echo goes back: still exact.
                assert_eq!(Marker::read(&through_pcmu(&coded)), Some(m));
            }
        }
        let t = tone(160);
        assert_eq!(through_pcmu(&t), t);
        assert!(is_tone(&through_pcmu(&t)));
        // Speech through mu-law is not mistaken for the tone or a marker.
        let s = through_pcmu(&speech(8000, 8000));
        assert!(s.chunks(160).all(|f| !is_tone(f)));
        let mut found = 0;
        Scanner::default().scan(&s, |_| found += 1);
        assert_eq!(found, 0);
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
        assert!(
            speech(24_000, 24_000)
                .iter()
                .all(|s| s.unsigned_abs() <= 12_000)
        );
    }
}
