//! DTMF the server sends: RFC 4733 telephone-event packets, and in-band dual tones (ITU-T
//! Q.23) for a peer that negotiated no telephone-event or a phone that hears plain audio.
//! Sans-IO: the owner calls these once per 20 ms frame.

use super::packet::{TelephoneEvent, digit_to_event};

/// Digits one request may carry.
pub const MAX_DIGITS: usize = 32;
/// Shortest and longest tone per digit, in milliseconds.
pub const DURATION_RANGE_MS: std::ops::RangeInclusive<u32> = 40..=2000;
/// Tone per digit when the request names none, in milliseconds.
pub const DEFAULT_DURATION_MS: u32 = 100;
/// Silence between two digits, in milliseconds (whole 20 ms frames).
pub const GAP_MS: u32 = 60;
/// Volume of the events, in -dBm0 (RFC 4733 2.5.2.2: typical DTMF levels).
pub const EVENT_VOLUME: u8 = 10;
/// End packets sent for each event (RFC 4733 2.5.1.4: three, for loss).
pub const END_REPEATS: u8 = 3;

const FRAME_MS: u32 = 20;

/// A validated request: event codes and tone length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtmfPlan {
    events: Vec<u8>,
    /// Frames of tone per digit.
    tone_frames: u32,
}

impl DtmfPlan {
    /// Checks `digits` (0-9 * # A-D, at most [`MAX_DIGITS`]) and `duration_ms`
    /// ([`DURATION_RANGE_MS`]); the error says what is wrong. The duration is rounded up to
    /// whole 20 ms frames.
    pub fn new(digits: &str, duration_ms: u32) -> Result<Self, String> {
        if digits.is_empty() {
            return Err("digits is empty: give 1 to 32 of 0-9 * # A-D".into());
        }
        let count = digits.chars().count();
        if count > MAX_DIGITS {
            return Err(format!(
                "digits has {count} characters; at most {MAX_DIGITS} are allowed"
            ));
        }
        let events = digits
            .chars()
            .map(|c| {
                digit_to_event(c)
                    .filter(|_| !c.is_ascii_lowercase())
                    .ok_or_else(|| {
                        format!("digit {c:?} is not a DTMF digit: allowed are 0-9 * # A-D")
                    })
            })
            .collect::<Result<Vec<u8>, String>>()?;
        if !DURATION_RANGE_MS.contains(&duration_ms) {
            return Err(format!(
                "durationMs must be {}..={}, got {duration_ms}",
                DURATION_RANGE_MS.start(),
                DURATION_RANGE_MS.end()
            ));
        }
        Ok(Self {
            events,
            tone_frames: duration_ms.div_ceil(FRAME_MS),
        })
    }

    /// The RFC 4733 event codes, in order.
    pub fn events(&self) -> &[u8] {
        &self.events
    }

    /// Tone per digit, in milliseconds (whole 20 ms frames).
    pub fn tone_ms(&self) -> u32 {
        self.tone_frames * FRAME_MS
    }

    /// How long sending all digits takes, gaps included, in milliseconds.
    pub fn total_ms(&self) -> u32 {
        let n = self.events.len() as u32;
        n * self.tone_frames * FRAME_MS + n.saturating_sub(1) * GAP_MS
    }

    /// Where frame `index` of the whole plan falls: `Some((digit index, frame within the
    /// tone))` during a tone, `None` in a gap or after the end.
    fn locate(&self, index: u32) -> Option<(usize, u32)> {
        let gap_frames = GAP_MS / FRAME_MS;
        let period = self.tone_frames + gap_frames;
        let digit = (index / period) as usize;
        let within = index % period;
        (digit < self.events.len() && within < self.tone_frames).then_some((digit, within))
    }

    fn frames(&self) -> u32 {
        let n = self.events.len() as u32;
        n * self.tone_frames + n.saturating_sub(1) * (GAP_MS / FRAME_MS)
    }
}

/// What to send in place of one 20 ms audio frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPacket {
    /// Marker bit: the first packet of an event.
    pub marker: bool,
    /// RTP timestamp: the event's start, the same for all its packets.
    pub timestamp: u32,
    /// The payload.
    pub event: TelephoneEvent,
    /// Times to send it (the end packet goes [`END_REPEATS`] times).
    pub copies: u8,
}

/// Turns a [`DtmfPlan`] into RFC 4733 packets, one call per 20 ms frame.
#[derive(Debug, Clone)]
pub struct EventSender {
    plan: DtmfPlan,
    frame: u32,
    /// RTP timestamp of the current event's first frame.
    start: u32,
    /// Timestamp units per 20 ms frame (160 at 8 kHz).
    frame_units: u32,
}

impl EventSender {
    /// A sender for `plan` on a stream whose clock runs at `clock_rate` Hz.
    pub fn new(plan: DtmfPlan, clock_rate: u32) -> Self {
        Self {
            plan,
            frame: 0,
            start: 0,
            frame_units: clock_rate * FRAME_MS / 1000,
        }
    }

    /// True once every digit has been sent.
    pub fn done(&self) -> bool {
        self.frame >= self.plan.frames()
    }

    /// The next frame: `Some(packet)` replaces the audio of this frame (RFC 4733 2.5: no
    /// audio while an event plays), `None` lets audio through (a gap between digits, or the
    /// end). `timestamp` is the RTP timestamp the audio of this frame would carry.
    pub fn next_frame(&mut self, timestamp: u32) -> Option<EventPacket> {
        let at = self.plan.locate(self.frame);
        self.frame = self.frame.saturating_add(1);
        let (digit, within) = at?;
        if within == 0 {
            self.start = timestamp;
        }
        let last = within + 1 == self.plan.tone_frames;
        let duration = (within + 1) * self.frame_units;
        Some(EventPacket {
            marker: within == 0,
            timestamp: self.start,
            event: TelephoneEvent {
                event: self.plan.events[digit],
                end: last,
                volume: EVENT_VOLUME,
                duration: u16::try_from(duration).unwrap_or(u16::MAX),
            },
            copies: if last { END_REPEATS } else { 1 },
        })
    }
}

/// The body of a SIP INFO of type `application/dtmf-relay` for one digit (the de facto
/// format Cisco introduced, which phones and PBXs read): `Signal=5\r\nDuration=100\r\n`.
pub fn dtmf_relay_body(digit: char, duration_ms: u32) -> String {
    format!("Signal={digit}\r\nDuration={duration_ms}\r\n")
}

/// The ITU-T Q.23 frequency pair (low, high) of an event code 0-15.
pub fn q23_frequencies(event: u8) -> Option<(f64, f64)> {
    const LOW: [f64; 4] = [697.0, 770.0, 852.0, 941.0];
    const HIGH: [f64; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
    // Keypad position of each event code: (row, column).
    let (row, col) = match event {
        1..=9 => ((event - 1) / 3, (event - 1) % 3),
        0 => (3, 1),
        10 => (3, 0),
        11 => (3, 2),
        12..=15 => (event - 12, 3),
        _ => return None,
    };
    Some((LOW[usize::from(row)], HIGH[usize::from(col)]))
}

/// Peak of each of the two tones: about -10 dBm0 each, well inside G.711's range.
const TONE_AMPLITUDE: f64 = 7000.0;

/// Mixes a [`DtmfPlan`]'s dual tones into audio frames, one call per 20 ms frame.
#[derive(Debug, Clone)]
pub struct ToneGenerator {
    plan: DtmfPlan,
    frame: u32,
    rate: u32,
    /// Sample position within the current tone, for a continuous phase.
    phase: u64,
}

impl ToneGenerator {
    /// A generator for audio at `rate` Hz.
    pub fn new(plan: DtmfPlan, rate: u32) -> Self {
        Self {
            plan,
            frame: 0,
            rate,
            phase: 0,
        }
    }

    /// True once every digit has played.
    pub fn done(&self) -> bool {
        self.frame >= self.plan.frames()
    }

    /// Adds this frame's tone (if any) to `frame` (one 20 ms frame at the rate), saturating.
    pub fn mix_into(&mut self, frame: &mut [i16]) {
        let at = self.plan.locate(self.frame);
        self.frame = self.frame.saturating_add(1);
        let Some((digit, within)) = at else {
            self.phase = 0;
            return;
        };
        if within == 0 {
            self.phase = 0;
        }
        let Some((low, high)) = q23_frequencies(self.plan.events[digit]) else {
            return;
        };
        let rate = f64::from(self.rate);
        for s in frame.iter_mut() {
            let t = self.phase as f64 / rate;
            let v = TONE_AMPLITUDE
                * ((std::f64::consts::TAU * low * t).sin()
                    + (std::f64::consts::TAU * high * t).sin());
            *s = (f64::from(*s) + v).clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16;
            self.phase += 1;
        }
    }
}

/// Goertzel power of `freq` in `samples` at `rate` Hz (normalised by the block length).
pub fn goertzel_power(samples: &[i16], rate: u32, freq: f64) -> f64 {
    let coeff = 2.0 * (std::f64::consts::TAU * freq / f64::from(rate)).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    power / (samples.len().max(1) as f64).powi(2)
}

/// The DTMF digit in a block of audio (at least ~20 ms), by Goertzel: the strongest low and
/// high Q.23 tones, each well above the other frequencies of its group and above a floor.
pub fn detect_digit(samples: &[i16], rate: u32) -> Option<char> {
    const LOW: [f64; 4] = [697.0, 770.0, 852.0, 941.0];
    const HIGH: [f64; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
    // A tone of amplitude A has normalised power about A^2 / 4.
    const FLOOR: f64 = 1000.0 * 1000.0 / 4.0;
    let strongest = |freqs: &[f64; 4]| -> Option<usize> {
        let p: Vec<f64> = freqs
            .iter()
            .map(|&f| goertzel_power(samples, rate, f))
            .collect();
        let (best, &max) = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
        let clear = p
            .iter()
            .enumerate()
            .all(|(i, &v)| i == best || v * 10.0 < max);
        (max > FLOOR && clear).then_some(best)
    };
    let row = strongest(&LOW)?;
    let col = strongest(&HIGH)?;
    const KEYS: [[char; 4]; 4] = [
        ['1', '2', '3', 'A'],
        ['4', '5', '6', 'B'],
        ['7', '8', '9', 'C'],
        ['*', '0', '#', 'D'],
    ];
    Some(KEYS[row][col])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_validation_says_what_is_wrong() {
        assert!(DtmfPlan::new("", 100).unwrap_err().contains("empty"));
        assert!(DtmfPlan::new("12x", 100).unwrap_err().contains("'x'"));
        assert!(DtmfPlan::new("1a", 100).is_err());
        assert!(
            DtmfPlan::new(&"1".repeat(33), 100)
                .unwrap_err()
                .contains("33")
        );
        assert!(DtmfPlan::new("1", 39).unwrap_err().contains("durationMs"));
        assert!(DtmfPlan::new("1", 2001).is_err());
        let p = DtmfPlan::new("0123456789*#ABCD", 40).unwrap();
        assert_eq!(p.events(), (0..16).collect::<Vec<u8>>());
        assert_eq!(
            DtmfPlan::new("12#", 100).unwrap().total_ms(),
            3 * 100 + 2 * 60
        );
    }

    #[test]
    fn rfc4733_sequence_for_two_digits() {
        let plan = DtmfPlan::new("1#", 100).unwrap();
        let mut s = EventSender::new(plan, 8000);
        let mut ts = 1000u32;
        let mut out = Vec::new();
        while !s.done() {
            out.push(s.next_frame(ts));
            ts += 160;
        }
        // 5 event frames, 3 gap frames, 5 event frames.
        assert_eq!(out.len(), 13);
        for (i, p) in out[..5].iter().enumerate() {
            let p = p.unwrap();
            assert_eq!(p.marker, i == 0);
            assert_eq!(p.timestamp, 1000);
            assert_eq!(p.event.event, 1);
            assert_eq!(p.event.duration, 160 * (i as u16 + 1));
            assert_eq!(p.event.end, i == 4);
            assert_eq!(p.copies, if i == 4 { 3 } else { 1 });
            assert_eq!(p.event.volume, EVENT_VOLUME);
        }
        assert!(out[5..8].iter().all(Option::is_none));
        let second = out[8].unwrap();
        assert!(second.marker);
        assert_eq!(second.timestamp, 1000 + 8 * 160);
        assert_eq!(second.event.event, 11);
        assert!(
            out[8..]
                .iter()
                .all(|p| p.unwrap().timestamp == 1000 + 8 * 160)
        );
        assert!(out[12].unwrap().event.end);
        assert_eq!(s.next_frame(ts), None);
    }

    #[test]
    fn tones_are_detected_by_goertzel() {
        for (rate, frame) in [(8000u32, 160usize), (16000, 320), (24000, 480)] {
            let plan = DtmfPlan::new("0123456789*#ABCD", 60).unwrap();
            let mut g = ToneGenerator::new(plan, rate);
            let mut heard = String::new();
            let mut last = None;
            while !g.done() {
                let mut f = vec![0i16; frame];
                g.mix_into(&mut f);
                let d = detect_digit(&f, rate);
                if d.is_some() && d != last {
                    heard.push(d.unwrap_or('?'));
                }
                last = d;
            }
            assert_eq!(heard, "0123456789*#ABCD", "rate {rate}");
        }
        // Silence and a single tone are no digit.
        assert_eq!(detect_digit(&[0; 160], 8000), None);
        let one: Vec<i16> = (0..160)
            .map(|i| {
                (7000.0 * (std::f64::consts::TAU * 697.0 * f64::from(i) / 8000.0).sin()) as i16
            })
            .collect();
        assert_eq!(detect_digit(&one, 8000), None);
    }
}
