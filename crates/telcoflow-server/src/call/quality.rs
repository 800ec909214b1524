//! The call's quality figures ([`CallStats`]): what the call measures itself (the arrival of
//! each leg's frames, the frames its mixing had to make up, the agent's side) and what a leg's
//! own task publishes (RTP: sequence numbers, jitter buffer, RTCP round trip), put together on
//! demand and at the end of the call. Counting is plain arithmetic on the audio path; only a
//! snapshot allocates.

use super::actor::CallActor;
use super::legs::Leg;
use telcoflow_proto::audio::FRAME_MS;
use telcoflow_proto::stats::{AgentStats, CallStats, LegStats};
use tokio::time::Instant;

/// RFC 3550 A.8: the jitter estimate moves by 1/16 of each new difference.
const JITTER_GAIN: f64 = 1.0 / 16.0;

/// What a call measures of a leg's audio itself: arrivals (the RFC 3550 interarrival jitter of
/// the frames against their media time) and the frames its mixing found missing.
#[derive(Debug, Default)]
pub(super) struct ArrivalMeter {
    frames: u64,
    /// Samples received, at the leg's rate: the media time of the next frame.
    samples: u64,
    first: Option<Instant>,
    /// Arrival minus media time of the latest frame, in seconds.
    last_transit: Option<f64>,
    /// Jitter estimate, in seconds.
    jitter: f64,
    concealed: u64,
    gaps: u64,
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

/// A leg's figures: its task's where it publishes them, the call's own otherwise.
pub(super) fn leg_stats(leg: &Leg, role: &str) -> LegStats {
    let frame_ms = f64::from(FRAME_MS);
    let kind = leg.kind().as_str();
    match leg.quality() {
        Some(q) => {
            let f = q.get();
            let rtt_ms = f.rtt.map(|d| d.as_secs_f64() * 1e3);
            // One way: a frame of packetisation, the jitter buffer, half the round trip.
            let delay_ms = frame_ms + f.buffering.as_secs_f64() * 1e3 + rtt_ms.unwrap_or(0.0) / 2.0;
            LegStats::new(
                role,
                kind,
                f.jitter.as_secs_f64() * 1e3,
                f.expected,
                f.received,
                f.concealed_frames * u64::from(FRAME_MS),
                f.gaps,
                f.clock_misses,
                rtt_ms,
                delay_ms,
            )
        }
        None => {
            let m = &leg.meter;
            // A WebSocket loses nothing: every frame sent is received.
            LegStats::new(
                role,
                kind,
                m.jitter * 1e3,
                m.frames,
                m.frames,
                m.concealed * u64::from(FRAME_MS),
                m.gaps,
                0,
                None,
                frame_ms,
            )
        }
    }
}

impl CallActor {
    /// The call's figures so far.
    pub(super) fn stats(&self) -> CallStats {
        let mut legs = Vec::with_capacity(1 + self.past_legs.len() + 1);
        legs.push(leg_stats(&self.caller, "caller"));
        legs.extend(self.past_legs.iter().cloned());
        if let Some(callee) = self.callee.as_ref().filter(|c| c.up) {
            legs.push(leg_stats(callee, "callee"));
        }
        let a = &self.agent_counts;
        CallStats {
            call_id: self.handle.call_id.to_string(),
            session_id: self.handle.session_id.to_string(),
            duration_ms: self.now.saturating_duration_since(self.started).as_millis() as u64,
            legs,
            agent: AgentStats {
                frames_to_agent: a.frames_to,
                frames_from_agent: a.frames_from,
                playout_gaps: self.playout.gaps(),
                clock_misses: self.aligner.misses(),
                dropped_slow_consumer: a.slow_consumer,
                dropped_stall_ms: a.stall_ms,
                dropped_server_stall_ms: a.server_stall_ms,
                dropped_overflow_bytes: a.overflow_bytes,
            },
        }
    }
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
        assert_eq!((m.concealed, m.gaps), (0, 0), "nothing before the first frame");
        m.arrived(160, 8000, Instant::now());
        for short in [false, true, true, false, true, false] {
            m.took(short);
        }
        assert_eq!((m.concealed, m.gaps), (3, 2));
    }
}
