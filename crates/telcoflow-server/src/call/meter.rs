//! Counters of a call's quality figures, kept as audio passes: plain arithmetic, no
//! allocation. `quality` turns them into figures.

use tokio::time::Instant;

/// RFC 3550 A.8: the jitter estimate moves by 1/16 of each new difference.
const JITTER_GAIN: f64 = 1.0 / 16.0;

/// What a call measures of a leg's audio itself: arrivals (the RFC 3550 interarrival jitter of
/// the frames against their media time) and the frames its mixing found missing.
#[derive(Debug, Default)]
pub(super) struct ArrivalMeter {
    pub(super) frames: u64,
    /// Samples received, at the leg's rate: the media time of the next frame.
    samples: u64,
    first: Option<Instant>,
    /// Arrival minus media time of the latest frame, in seconds.
    last_transit: Option<f64>,
    /// Jitter estimate, in seconds.
    pub(super) jitter: f64,
    pub(super) concealed: u64,
    pub(super) gaps: u64,
    concealing: bool,
}

impl ArrivalMeter {
    /// A frame of `samples` at `rate_hz` arrived at `now`.
    pub(super) fn arrived(&mut self, samples: usize, rate_hz: u32, now: Instant) {
        let first = *self.first.get_or_insert(now);
        let arrival = now.saturating_duration_since(first).as_secs_f64();
        let transit = arrival - self.samples as f64 / f64::from(rate_hz.max(1));
        if let Some(last) = self.last_transit {
            self.jitter += ((transit - last).abs() - self.jitter) * JITTER_GAIN;
        }
        self.last_transit = Some(transit);
        self.samples += samples as u64;
        self.frames += 1;
    }

    /// The mixing took a frame of the leg; `short`: not enough of it had arrived.
    pub(super) fn took(&mut self, short: bool) {
        if self.frames == 0 {
            // Before its first audio a leg has nothing to lose.
            return;
        }
        if short {
            self.concealed += 1;
            if !self.concealing {
                self.gaps += 1;
            }
        }
        self.concealing = short;
    }
}

/// The agent's side, counted as audio goes.
#[derive(Debug, Default)]
pub(super) struct AgentCounts {
    pub(super) frames_to: u64,
    pub(super) frames_from: u64,
    pub(super) slow_consumer: u64,
    pub(super) stall_ms: u64,
    pub(super) server_stall_ms: u64,
    pub(super) overflow_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn frames_on_time_have_no_jitter_and_late_ones_do() {
        let t0 = Instant::now();
        let mut m = ArrivalMeter::default();
        for i in 0..50u32 {
            m.arrived(160, 8000, t0 + Duration::from_millis(20) * i);
        }
        assert_eq!(m.frames, 50);
        assert!(m.jitter.abs() < 1e-9, "{}", m.jitter);
        // Every other frame 10 ms late: |D| alternates 10 ms; J tends to 10 ms.
        let mut m = ArrivalMeter::default();
        for i in 0..400u32 {
            let late = if i % 2 == 1 { 10 } else { 0 };
            m.arrived(
                160,
                8000,
                t0 + Duration::from_millis(20) * i + Duration::from_millis(late),
            );
        }
        assert!((m.jitter - 0.010).abs() < 1e-4, "{}", m.jitter);
    }

    #[test]
    fn short_frames_count_as_concealed_in_runs() {
        let mut m = ArrivalMeter::default();
        m.took(true);
        assert_eq!(
            (m.concealed, m.gaps),
            (0, 0),
            "nothing before the first frame"
        );
        m.arrived(160, 8000, Instant::now());
        for short in [false, true, true, false, true, false] {
            m.took(short);
        }
        assert_eq!((m.concealed, m.gaps), (3, 2));
    }
}
