//! The call's quality figures ([`CallStats`]): what the call measures itself (the arrival of
//! each leg's frames, the frames its mixing had to make up, the agent's side) and what a leg's
//! own task publishes (RTP: sequence numbers, jitter buffer, RTCP round trip), put together on
//! demand and at the end of the call. Counting is plain arithmetic on the audio path; only a
//! snapshot allocates.

use super::actor::CallActor;
use super::legs::Leg;
use telcoflow_proto::audio::FRAME_MS;
use telcoflow_proto::stats::{AgentStats, CallStats, LegStats};

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
            .with_codec(f.codec)
            .with_srtp(f.srtp)
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
