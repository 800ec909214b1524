//! Audio between the legs and the agent: what the legs send as it arrives (to the agent at once,
//! or into the legs' queues), and the 20 ms tick (playout, mixing, whisper / barge / spy).

use super::actor::{AgentMode, CallActor, Phase};
use super::agent::AUDIO_SKIPPED_SERVER_STALL;
use super::frames::frame_bytes;
use super::handle::MediaOut;
use super::leg::{LegEvent, LegId, LegOutput, Refusal};
use serde_json::{Value, json};
use std::time::Duration;
use telcoflow_proto::AudioMode;
use telcoflow_proto::audio::mix_into;
use telcoflow_proto::control::CloseReason;
use telcoflow_proto::media::{
    CHANNEL_CALLEE, CHANNEL_CALLER, CHANNEL_MIXED, CallEvent, CommandResponse,
};
use telcoflow_proto::sim::HangupReason;
use tokio::time::Instant;
use tracing::info;

impl CallActor {
    /// Something from one of the call's legs.
    pub(super) fn on_leg(&mut self, id: LegId, event: LegEvent) {
        if matches!(event, LegEvent::Audio(_)) {
            if id == LegId::CALLER {
                self.caller.received();
            } else if let Some(callee) = self.callee.as_ref().filter(|c| c.id == id) {
                callee.received();
            }
        }
        if id == LegId::CALLER {
            return self.on_caller(event);
        }
        if !self.callee.as_ref().is_some_and(|c| c.id == id) {
            return; // a leg we already gave up on
        }
        match event {
            LegEvent::Answered => {
                if let Some(callee) = &mut self.callee {
                    callee.up = true;
                    callee.send(LegOutput::Answered);
                }
                self.mode = AgentMode::Barge;
                if let Some(c) = self.connect.take() {
                    info!(destination = %c.destination, "destination answered");
                    if c.transfer.is_some() {
                        return self.bridge_transfer_answered(c);
                    }
                    self.respond(CommandResponse::ok(
                        c.command_id,
                        Some(json!({ "destination": c.destination })),
                    ));
                }
            }
            event @ (LegEvent::Rejected(_) | LegEvent::Hangup) => {
                let was_up = self.callee.as_ref().is_some_and(|c| c.up);
                if let Some(callee) = self.callee.take().filter(|c| c.up) {
                    // The last few only: an agent may connect and hang up for as long as
                    // the call lasts.
                    if self.past_legs.len() >= super::actor::MAX_PAST_LEGS {
                        self.past_legs.remove(0);
                    }
                    self.past_legs
                        .push(super::quality::leg_stats(&callee, "callee"));
                }
                if let Some(c) = self.connect.take() {
                    // Hanging up while ringing is declining.
                    let refusal = match event {
                        LegEvent::Rejected(refusal) => refusal,
                        _ => Refusal::Declined,
                    };
                    info!(destination = %c.destination, %refusal, "destination did not take the call");
                    let message = format!("{} {refusal}", c.destination);
                    self.respond(c.failure(refusal.code(), message));
                } else if was_up {
                    info!("destination hung up");
                    if self.agent_left {
                        self.finish(CloseReason::CallTerminated, HangupReason::Remote);
                    } else {
                        let mut ev = CallEvent {
                            event: CallEvent::CONNECTED_LEG.into(),
                            fields: Default::default(),
                        };
                        ev.fields.insert("state".into(), Value::from("ended"));
                        self.send_event(ev);
                    }
                }
            }
            LegEvent::EarlyMedia => {
                let Some(callee) = self.callee.as_mut().filter(|c| !c.up && !c.early) else {
                    return;
                };
                callee.early = true;
                if let Some(c) = &self.connect {
                    info!(destination = %c.destination, "destination sends early media");
                    let event = CallEvent::early_media(&c.destination);
                    self.send_event(event);
                }
            }
            LegEvent::Audio(samples) => {
                if self.phase == Phase::Answered {
                    let frame = self.rate().frame_samples();
                    if let Some(callee) = &mut self.callee {
                        // Early media queue as the answered audio does: the caller hears
                        // them (see `on_tick`).
                        if callee.up || callee.early {
                            callee.arrived(samples.len(), self.now);
                            self.scratch.clear();
                            callee.from_leg.process(&samples, &mut self.scratch);
                            callee.enqueue(&self.scratch, frame);
                        }
                    }
                }
            }
            // Only the caller is referred.
            LegEvent::Dtmf { .. }
            | LegEvent::ReferAnswered { .. }
            | LegEvent::ReferProgress { .. } => {}
            LegEvent::Rate(rate) => {
                let agent_rate = self.rate();
                if let Some(callee) = &mut self.callee {
                    callee.set_rate(rate, agent_rate);
                }
            }
            LegEvent::AudioSkipped { dropped_ms } => {
                self.agent_counts.server_stall_ms += dropped_ms;
                self.send_event(CallEvent::audio_skipped(
                    dropped_ms,
                    AUDIO_SKIPPED_SERVER_STALL,
                ));
            }
        }
    }

    fn on_caller(&mut self, event: LegEvent) {
        match event {
            LegEvent::Rejected(refusal) => {
                // Only an outbound call's far end can refuse: its `answer` learns why, with
                // the code `call.connect` would give.
                info!(%refusal, "far end did not take the call");
                if let Some((id, _)) = self.pending_answer.take() {
                    let message = format!("{} {refusal}", self.handle.to);
                    self.respond(CommandResponse::error(id, refusal.code(), message));
                }
                self.finish(CloseReason::CallTerminated, HangupReason::Local);
            }
            LegEvent::Hangup => {
                info!("caller hung up");
                self.finish(CloseReason::CallTerminated, HangupReason::Local);
            }
            LegEvent::Audio(samples) => {
                self.handle.live.heard_from_caller(&samples);
                if self.phase != Phase::Answered {
                    if self.caller.early && self.phase == Phase::Ringing {
                        self.forward_early_media(&samples);
                    }
                    return; // nobody else listens before the call is answered
                }
                self.caller.arrived(samples.len(), self.now);
                self.scratch.clear();
                self.caller.from_leg.process(&samples, &mut self.scratch);
                if self.callee.as_ref().is_some_and(|c| c.up) {
                    let frame = self.rate().frame_samples();
                    self.caller.enqueue(&self.scratch, frame);
                } else if !self.scratch.is_empty() {
                    if let Some(recorder) = &mut self.recorder {
                        recorder.caller_audio(&self.scratch);
                    }
                    // Alone with the agent: forward at once, no clock wait.
                    let frame =
                        frame_bytes(&mut self.media_pool, Some(CHANNEL_MIXED), &self.scratch);
                    self.send_media(MediaOut::Audio(frame));
                    if self.setup.audio_mode == AudioMode::Isolated {
                        let caller =
                            frame_bytes(&mut self.media_pool, Some(CHANNEL_CALLER), &self.scratch);
                        self.send_media(MediaOut::Audio(caller));
                    }
                    if std::mem::take(&mut self.request_deferred) {
                        self.request_audio();
                    }
                }
            }
            LegEvent::Dtmf { digit, duration_ms } => {
                self.send_event(CallEvent::dtmf(digit, duration_ms));
            }
            LegEvent::Rate(rate) => {
                let agent_rate = self.rate();
                self.caller.set_rate(rate, agent_rate);
            }
            LegEvent::AudioSkipped { dropped_ms } => {
                self.agent_counts.server_stall_ms += dropped_ms;
                self.send_event(CallEvent::audio_skipped(
                    dropped_ms,
                    AUDIO_SKIPPED_SERVER_STALL,
                ));
            }
            LegEvent::ReferAnswered { status } => self.on_refer_answered(status),
            LegEvent::ReferProgress {
                status,
                reason,
                terminated,
            } => self.on_refer_progress(status, &reason, terminated),
            LegEvent::Answered if self.outbound && self.phase == Phase::Ringing => {
                info!("far end answered");
                self.phase = Phase::Answered;
                self.count_answer();
                self.caller.up = true;
                self.caller.send(LegOutput::Answered);
                if let Some((id, _)) = self.pending_answer.take() {
                    self.respond(CommandResponse::ok(
                        id,
                        Some(json!({ "alreadyAnswered": false })),
                    ));
                }
            }
            LegEvent::Answered => {}
            LegEvent::EarlyMedia if self.outbound && self.phase == Phase::Ringing => {
                // The far end of `session.create` rings with early media: the agent hears
                // them, as a caller would.
                if !self.caller.early {
                    self.caller.early = true;
                    info!("far end sends early media");
                    let event = CallEvent::early_media(&self.handle.to);
                    self.send_event(event);
                }
            }
            LegEvent::EarlyMedia => {}
        }
    }

    /// The early media of an outbound call's far end, to the agent as they arrive (nothing
    /// is recorded before the answer).
    fn forward_early_media(&mut self, samples: &[i16]) {
        self.scratch.clear();
        self.caller.from_leg.process(samples, &mut self.scratch);
        if self.scratch.is_empty() {
            return;
        }
        let frame = frame_bytes(&mut self.media_pool, Some(CHANNEL_MIXED), &self.scratch);
        self.send_media(MediaOut::Audio(frame));
        if self.setup.audio_mode == AudioMode::Isolated {
            let caller = frame_bytes(&mut self.media_pool, Some(CHANNEL_CALLER), &self.scratch);
            self.send_media(MediaOut::Audio(caller));
        }
    }

    /// One 20 ms step of the media clock. Returns how much earlier the next tick should come,
    /// if the clock should move.
    pub(super) fn on_tick(&mut self, now: Instant) -> Option<Duration> {
        self.now = now;
        let n = self.rate().frame_samples();
        self.agent_frame.resize(n, 0);
        let held = self.playout.buffered();
        let agent_speaks = !self.agent_left && self.playout.pop_frame(&mut self.agent_frame);
        self.after_pop(now);
        // The agent paces this audio when it still owes some: it sends frames as it makes
        // them, so time they spend here is delay this buffer adds (see `crate::phase`). A full
        // frame and no pre-buffer held on purpose.
        let paced_by_agent = agent_speaks
            && held >= n * 2
            && self.playout.outstanding() > 0
            && self.playout.prebuffer_frames() == 1;
        let waited = self
            .playout
            .played_arrival()
            .filter(|_| paced_by_agent)
            .map(|at| now.saturating_duration_since(at));
        let shift = self.aligner.on_tick(waited);
        let callee_up = self.callee.as_ref().is_some_and(|c| c.up);
        if !callee_up {
            // Caller alone with the agent, and a ringing destination's early media (its
            // ringback, announcements) when it sends some.
            let mut frame = std::mem::take(&mut self.agent_frame);
            let early = match &mut self.callee {
                Some(callee) if callee.early => {
                    self.callee_frame.resize(n, 0);
                    callee.take_frame(&mut self.callee_frame);
                    true
                }
                _ => false,
            };
            let heard = if early {
                self.mix.clear();
                self.mix.extend_from_slice(&frame);
                mix_into(&mut self.mix, &self.callee_frame);
                self.handle.live.played_to_caller(&self.mix);
                self.caller.play(&self.mix, &mut self.scratch)
            } else {
                self.handle.live.played_to_caller(&frame);
                self.caller.play(&frame, &mut self.scratch)
            };
            self.record_tick(None, agent_speaks.then_some(&frame[..]));
            frame.clear();
            self.agent_frame = frame;
            self.count_heard(agent_speaks && heard);
        } else {
            self.caller_frame.resize(n, 0);
            self.callee_frame.resize(n, 0);
            self.caller.take_frame(&mut self.caller_frame);
            if let Some(callee) = &mut self.callee {
                callee.take_frame(&mut self.callee_frame);
            }
            let hears_agent = |mode: AgentMode, is_callee: bool| {
                agent_speaks
                    && match mode {
                        AgentMode::Barge => true,
                        AgentMode::Whisper => is_callee,
                        AgentMode::Spy => false,
                    }
            };
            // The caller hears the destination (+ agent).
            self.mix.clear();
            self.mix.extend_from_slice(&self.callee_frame);
            if hears_agent(self.mode, false) {
                mix_into(&mut self.mix, &self.agent_frame);
            }
            self.handle.live.played_to_caller(&self.mix);
            let caller_heard =
                self.caller.play(&self.mix, &mut self.scratch) && hears_agent(self.mode, false);
            // The destination hears the caller (+ agent).
            self.mix.clear();
            self.mix.extend_from_slice(&self.caller_frame);
            if hears_agent(self.mode, true) {
                mix_into(&mut self.mix, &self.agent_frame);
            }
            let callee_heard = match &mut self.callee {
                Some(callee) => {
                    callee.play(&self.mix, &mut self.scratch) && hears_agent(self.mode, true)
                }
                None => false,
            };
            self.count_heard(caller_heard || callee_heard);
            if self.recorder.is_some() {
                // Caller and destination left; the agent right, when somebody hears it.
                self.mix.clear();
                self.mix.extend_from_slice(&self.caller_frame);
                mix_into(&mut self.mix, &self.callee_frame);
                let heard = agent_speaks && self.mode != AgentMode::Spy;
                let mix = std::mem::take(&mut self.mix);
                let agent = std::mem::take(&mut self.agent_frame);
                self.record_tick(Some(&mix), heard.then_some(&agent[..]));
                self.mix = mix;
                self.agent_frame = agent;
            }
            // The agent hears both.
            if self.media.is_some() {
                self.mix.clear();
                self.mix.extend_from_slice(&self.caller_frame);
                mix_into(&mut self.mix, &self.callee_frame);
                let mixed = frame_bytes(&mut self.media_pool, Some(CHANNEL_MIXED), &self.mix);
                self.send_media(MediaOut::Audio(mixed));
                if self.setup.audio_mode == AudioMode::Isolated {
                    let caller = frame_bytes(
                        &mut self.media_pool,
                        Some(CHANNEL_CALLER),
                        &self.caller_frame,
                    );
                    let callee = frame_bytes(
                        &mut self.media_pool,
                        Some(CHANNEL_CALLEE),
                        &self.callee_frame,
                    );
                    self.send_media(MediaOut::Audio(caller));
                    self.send_media(MediaOut::Audio(callee));
                }
            }
        }
        self.report_reached_marks();
        if !callee_up && !std::mem::take(&mut self.request_deferred) {
            // Caller audio goes to the agent as it arrives, between ticks: ask with the next
            // caller frame, so that both leave in one write (one wake-up for the agent), or
            // at the next tick at the latest.
            self.request_deferred = self.playout.want().is_some();
            return shift;
        }
        self.request_audio();
        shift
    }

    pub(super) fn drop_callee(&mut self, leg: LegId, reason: HangupReason) {
        if let Some(callee) = self.callee.take_if(|c| c.id == leg) {
            callee.send(LegOutput::Hangup(reason));
        }
    }
}
