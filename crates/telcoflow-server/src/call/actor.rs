//! The call's task: its state, the loop that feeds it inputs, ticks and deadlines with the
//! time they came at, and the call's lifecycle (claim, the agent leaving, the end).

use super::handle::{CallHandle, CallInput, MediaLink};
use super::leg::{LegId, LegLink, LegOutput};
use super::legs::Leg;
use super::live::LiveState;
use super::meter::AgentCounts;
use super::playout::Playout;
use crate::config::ConnectorConfig;
use crate::state::Shared;
use std::sync::Arc;
use std::time::Duration;
use telcoflow_proto::control::{CloseReason, SetupData};
use telcoflow_proto::media::{CallEvent, CommandResponse};
use telcoflow_proto::pool::FramePool;
use telcoflow_proto::sim::HangupReason;
use telcoflow_proto::stats::LegStats;
use telcoflow_proto::{ErrorCode, SampleRate};
use telcoflow_sip::phase::PhaseAligner;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info};

/// Periods late a media tick must come for the server to count itself stalled (60 ms).
const SERVER_STALL_TICKS: u32 = 3;

/// How long a call waits for its agent to reconnect after the media connection drops.
pub(super) const MEDIA_GRACE: Duration = Duration::from_secs(10);

/// Where the call is: before or after its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Ringing,
    Answered,
}

/// Who hears the agent once a destination is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AgentMode {
    /// Heard by both parties (the default after connect).
    Barge,
    /// Heard by the connected party only.
    Whisper,
    /// Heard by nobody.
    Spy,
}

/// A `call.connect` ringing its destination.
pub(super) struct PendingConnect {
    pub(super) command_id: String,
    pub(super) leg: LegId,
    pub(super) destination: String,
    pub(super) ring_deadline: Instant,
    pub(super) reply_deadline: Option<Instant>,
    /// Rung for `call.transfer` rather than `call.connect`: the agent leaves once it answers.
    pub(super) transfer: Option<BridgeTransfer>,
}

/// A `call.transfer` by REFER, waiting for the caller (see `transfer`).
pub(super) struct PendingTransfer {
    pub(super) command_id: String,
    pub(super) target: String,
    pub(super) ring_time: u32,
    /// The REFER was accepted (202): the final NOTIFY is awaited.
    pub(super) accepted: bool,
    /// When the caller's answer or final NOTIFY is given up on.
    pub(super) deadline: Instant,
    /// The command's own `timeout_ms`.
    pub(super) reply_deadline: Option<Instant>,
}

/// A `call.transfer` by dialling the target ([`PendingConnect::transfer`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct BridgeTransfer {
    /// The REFER answer that sent the transfer here, if the caller refused one.
    pub(super) refer_status: Option<u16>,
}

/// Past destinations a call's stats keep, the latest.
pub(super) const MAX_PAST_LEGS: usize = 16;

/// The call's state, owned by its task.
pub(super) struct CallActor {
    pub(super) shared: Arc<Shared>,
    pub(super) connector: Arc<ConnectorConfig>,
    pub(super) handle: CallHandle,
    pub(super) phase: Phase,
    pub(super) setup: SetupData,
    pub(super) caller: Leg,
    pub(super) callee: Option<Leg>,
    pub(super) next_leg: u32,
    pub(super) connect: Option<PendingConnect>,
    pub(super) mode: AgentMode,
    /// The agent left with `call.close` after connecting; the legs talk on without it.
    pub(super) agent_left: bool,
    pub(super) media: Option<MediaLink>,
    pub(super) media_lost_at: Option<Instant>,
    pub(super) playout: Playout,
    /// Moves the media clock towards agent-paced audio.
    pub(super) aligner: PhaseAligner,
    /// A buffer request waits for the next caller frame to the agent (see `on_tick`).
    pub(super) request_deferred: bool,
    /// Agent audio missed its tick: when to tick instead of at the next period.
    pub(super) tick_at: Option<Instant>,
    pub(super) ring_deadline: Instant,
    pub(super) claimed: bool,
    /// An app-initiated call: the caller leg is the far party we rang, and `call.answer`
    /// waits for it to pick up.
    pub(super) outbound: bool,
    /// An outbound call's `call.answer` waiting for the far end: command id and the client's
    /// deadline.
    pub(super) pending_answer: Option<(String, Option<Instant>)>,
    /// Unrequested agent audio was refused and reported; reset once audio fits again.
    pub(super) overflow_reported: bool,
    pub(super) ended: bool,
    // Scratch buffers reused every tick.
    pub(super) agent_frame: Vec<i16>,
    pub(super) caller_frame: Vec<i16>,
    pub(super) callee_frame: Vec<i16>,
    pub(super) mix: Vec<i16>,
    pub(super) scratch: Vec<i16>,
    pub(super) slow_media_reported: bool,
    /// Storage the frames sent to the media connection are split from.
    pub(super) media_pool: FramePool,
    /// Storage the `buffer_request` texts are encoded into.
    pub(super) text_pool: FramePool,
    /// When the input being handled arrived (or the tick or deadline fired), as the actor's
    /// loop passed it in: the call logic reads no clock of its own.
    pub(super) now: Instant,
    /// When the call started: its setup time runs to the answer, its duration to its end.
    pub(super) started: Instant,
    /// Commands waiting for their response: id, name and arrival, for the metrics.
    pub(super) commands_started: Vec<(String, &'static str, Instant)>,
    /// Figures of destinations that were connected and hung up (the call's stats keep the
    /// last [`MAX_PAST_LEGS`]).
    pub(super) past_legs: Vec<LegStats>,
    /// The agent's side of the quality figures.
    pub(super) agent_counts: AgentCounts,
    /// A `call.transfer` waiting for the caller's REFER answer or final NOTIFY.
    pub(super) transfer: Option<PendingTransfer>,
    /// A REFER was sent to the caller during this call.
    pub(super) referred: bool,
    /// `call.transfer_progress` events sent (bounded).
    pub(super) transfer_events: u32,
    /// The caller was handed over to a transfer target: the call ends as `transferred`.
    pub(super) transferred: bool,
}

impl CallActor {
    pub(super) fn new(
        shared: Arc<Shared>,
        connector: Arc<ConnectorConfig>,
        handle: CallHandle,
        caller: LegLink,
        outbound: Option<SetupData>,
        now: Instant,
    ) -> Self {
        let setup = outbound.unwrap_or_default();
        let rate = setup.sample_rate;
        let max_playout =
            rate.bytes_per_second() * shared.config.limits.max_playout_ms as usize / 1000;
        let ring_deadline = now + shared.config.ring_timeout();
        let mut playout = Playout::new(rate.frame_bytes(), max_playout);
        playout.set_catch_up(shared.config.limits.catch_up_after_stall);
        Self {
            playout,
            caller: Leg::new(LegId::CALLER, caller, rate, &shared.metrics),
            shared,
            connector,
            handle,
            phase: Phase::Ringing,
            setup,
            callee: None,
            next_leg: 1,
            connect: None,
            mode: AgentMode::Barge,
            agent_left: false,
            media: None,
            media_lost_at: None,
            aligner: PhaseAligner::default(),
            request_deferred: false,
            tick_at: None,
            ring_deadline,
            claimed: outbound.is_some(),
            outbound: outbound.is_some(),
            pending_answer: None,
            overflow_reported: false,
            ended: false,
            agent_frame: Vec::new(),
            caller_frame: Vec::new(),
            callee_frame: Vec::new(),
            mix: Vec::new(),
            scratch: Vec::new(),
            slow_media_reported: false,
            media_pool: FramePool::default(),
            text_pool: FramePool::default(),
            now,
            started: now,
            commands_started: Vec::new(),
            past_legs: Vec::new(),
            agent_counts: AgentCounts::default(),
            transfer: None,
            referred: false,
            transfer_events: 0,
            transferred: false,
        }
    }

    pub(super) fn rate(&self) -> SampleRate {
        self.setup.sample_rate
    }

    /// Milliseconds of agent audio in `bytes`.
    pub(super) fn bytes_to_ms(&self, bytes: u64) -> u64 {
        bytes * 1000 / self.rate().bytes_per_second() as u64
    }

    pub(super) async fn run(
        mut self,
        mut control: mpsc::Receiver<CallInput>,
        mut data: mpsc::Receiver<CallInput>,
    ) {
        info!(from = %self.handle.from, to = %self.handle.to, "call started");
        let period = Duration::from_millis(u64::from(telcoflow_proto::audio::FRAME_MS));
        let mut ticker = tokio::time::interval(period);
        // Catch up after a stall so that the legs keep receiving real-time audio.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        // One waiter for the call's life: a new one per input or tick would lock the
        // server-wide token's waiter list twice, a list every call's tasks share.
        let shutdown = self.shared.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        // One timer for every deadline, moved only when the earliest deadline changes.
        let mut armed = self.next_deadline();
        let sleep = tokio::time::sleep_until(armed.unwrap_or_else(Instant::now));
        tokio::pin!(sleep);
        let mut ticking = false;
        while !self.ended {
            if self.phase == Phase::Answered && !ticking {
                // The clock starts at the answer; ticks "missed" while ringing must not burst.
                ticker.reset();
                ticking = true;
            }
            if let Some(at) = self.tick_at.take().filter(|_| ticking) {
                ticker.reset_at(at);
            }
            let deadline = self.next_deadline();
            if deadline != armed {
                armed = deadline;
                if let Some(at) = deadline {
                    sleep.as_mut().reset(at);
                }
            }
            tokio::select! {
                biased;
                // Cancel-safe: `cancelled` only observes the token.
                () = &mut shutdown => self.finish(CloseReason::ForceClose, HangupReason::Error),
                // Cancel-safe: `recv` loses nothing when another branch wins.
                Some(input) = control.recv() => self.on_input(input, Instant::now()),
                Some(input) = data.recv() => self.on_input(input, Instant::now()),
                // Cancel-safe: a missed tick is replayed by the interval (Burst).
                at = ticker.tick(), if ticking => {
                    let now = Instant::now();
                    if now.saturating_duration_since(at) >= period * SERVER_STALL_TICKS {
                        // This process stalled: the ticks it missed come now, at once. A tick
                        // a frame or two late is scheduling noise on a busy machine, and is
                        // judged like any other dry spell of the agent's.
                        self.playout.late_tick();
                    }
                    if let Some(shift) = self.on_tick(now) {
                        debug!(shift_us = shift.as_micros() as u64, "media clock moved earlier");
                        ticker.reset_at(at + period - shift);
                    }
                }
                // Cancel-safe: the sleep is pinned outside the loop and only re-armed.
                () = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.on_deadline(Instant::now());
                }
            }
            self.publish_live();
        }
        self.shared.registry.unindex_call(&self.handle.call_id);
        if self.caller.dropped_samples > 0 {
            debug!(
                dropped = self.caller.dropped_samples,
                "caller audio dropped for running ahead"
            );
        }
        self.shared.metrics.playout_ended(
            self.playout.gaps(),
            self.playout.gap_frames(),
            self.aligner.misses(),
        );
        info!(
            frames_to_agent = self.agent_counts.frames_to,
            frames_from_agent = self.agent_counts.frames_from,
            playout_gaps = self.playout.gaps(),
            stall_skipped_ms = self.bytes_to_ms(self.playout.skipped_total()),
            prebuffer_frames = self.playout.prebuffer_frames(),
            clock_shifts = self.aligner.shifts(),
            clock_misses = self.aligner.misses(),
            clock_margin_ms = self.aligner.margin().as_secs_f64() * 1e3,
            "call ended"
        );
    }

    /// Copies where the call is to its live figures, for the console: after every input,
    /// tick and deadline (a few relaxed stores).
    fn publish_live(&self) {
        let state = if self.ended {
            LiveState::Ended
        } else if self.phase == Phase::Answered {
            if self.callee.as_ref().is_some_and(|c| c.up) {
                LiveState::Connected
            } else {
                LiveState::Answered
            }
        } else if self.claimed {
            LiveState::Ringing
        } else {
            LiveState::Offered
        };
        let live = &self.handle.live;
        live.set_state(state, self.now.into_std());
        live.set_agent_attached(self.media.is_some());
        live.set_playout_gaps(self.playout.gaps());
    }

    /// The earliest time something must happen without any input.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let ringing = (self.phase == Phase::Ringing).then_some(self.ring_deadline);
        let connect = self
            .connect
            .iter()
            .flat_map(|c| [Some(c.ring_deadline), c.reply_deadline]);
        let answer = self.pending_answer.as_ref().and_then(|(_, d)| *d);
        let media = self.media_lost_at.map(|lost| lost + MEDIA_GRACE);
        let transfer = self
            .transfer
            .iter()
            .flat_map(|t| [Some(t.deadline), t.reply_deadline]);
        [ringing, answer, media]
            .into_iter()
            .chain(connect)
            .chain(transfer)
            .flatten()
            .min()
    }

    pub(super) fn on_deadline(&mut self, now: Instant) {
        self.now = now;
        if self.phase == Phase::Ringing && now >= self.ring_deadline {
            info!("nobody answered in time");
            if let Some((id, _)) = self.pending_answer.take() {
                self.respond(CommandResponse::error(
                    id,
                    ErrorCode::CallUnanswered,
                    format!("{} did not answer", self.handle.to),
                ));
            }
            self.finish(CloseReason::CallTerminated, HangupReason::NoAnswer);
            return;
        }
        if self
            .pending_answer
            .as_ref()
            .is_some_and(|(_, d)| d.is_some_and(|d| now >= d))
        {
            // The app stops waiting at its deadline; the call keeps ringing and a new
            // call.answer may wait again.
            if let Some((id, _)) = self.pending_answer.take() {
                self.respond(CommandResponse::error(
                    id,
                    ErrorCode::Timeout,
                    format!("{} has not answered yet", self.handle.to),
                ));
            }
        }
        if let Some(c) = &self.connect {
            if now >= c.ring_deadline {
                let c = self.connect.take().expect("checked above");
                self.drop_callee(c.leg, HangupReason::NoAnswer);
                let message = format!("{} did not answer", c.destination);
                self.respond(c.failure(ErrorCode::CallUnanswered, message));
            } else if c.reply_deadline.is_some_and(|r| now >= r) {
                let c = self.connect.take().expect("checked above");
                self.drop_callee(c.leg, HangupReason::Remote);
                let message = "no answer from the destination before the command's timeout_ms";
                self.respond(c.failure(ErrorCode::Timeout, message));
            }
        }
        self.transfer_deadline(now);
        if self
            .media_lost_at
            .is_some_and(|lost| now >= lost + MEDIA_GRACE)
        {
            info!("agent did not come back; ending the call");
            self.finish(CloseReason::CallTerminated, HangupReason::Remote);
        }
    }

    pub(super) fn on_input(&mut self, input: CallInput, now: Instant) {
        self.now = now;
        match input {
            CallInput::Claimed { setup } => self.on_claimed(setup),
            CallInput::MediaAttach {
                link,
                token_expired,
                reply,
            } => {
                let result = self.attach(link, token_expired);
                let _ = reply.send(result);
            }
            CallInput::MediaDetach {
                conn_id,
                agent_closed,
            } if self.is_current_media(conn_id) => {
                if agent_closed {
                    // Nobody will come back on that URL and token: the agent has left, and
                    // the caller must not wait in silence for it.
                    info!("the agent closed its media connection");
                    self.agent_leaves();
                } else {
                    info!("media connection lost; waiting for the agent to reconnect");
                    self.detach_media();
                }
            }
            // An earlier connection of the call, already replaced or closed.
            CallInput::MediaDetach { .. } => {}
            CallInput::Command { conn_id, command } => {
                if self.is_current_media(conn_id) {
                    self.on_command(command);
                }
            }
            CallInput::AgentAudio { conn_id, pcm } => {
                if self.is_current_media(conn_id) && !self.agent_left {
                    self.on_agent_audio(&pcm);
                }
            }
            CallInput::MediaPong { conn_id, seq } => {
                if self.is_current_media(conn_id) {
                    self.playout.pong(seq, now);
                }
            }
            CallInput::Leg { leg, event } => self.on_leg(leg, event),
            CallInput::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            CallInput::Close { reason, done } => {
                self.finish(reason, HangupReason::Remote);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        }
    }

    pub(super) fn is_current_media(&self, conn_id: u64) -> bool {
        self.media.as_ref().is_some_and(|m| m.conn_id == conn_id)
    }

    fn on_claimed(&mut self, setup: SetupData) {
        if self.media.is_some() {
            // The agent's media connection fixed the format; a claim cannot change it under it.
            self.claimed = true;
            return;
        }
        if setup.sample_rate != self.setup.sample_rate {
            let rate = setup.sample_rate;
            self.caller.set_agent_rate(rate);
            if let Some(callee) = &mut self.callee {
                callee.set_agent_rate(rate);
            }
            self.playout.reset(rate.frame_bytes());
        }
        self.setup = setup;
        if !self.claimed && self.phase == Phase::Ringing {
            self.caller.send(LegOutput::Ringing);
        }
        self.claimed = true;
    }

    /// The agent leaves the call (`call.close`, or its media connection closed by itself): a
    /// connected caller and destination stay connected, any other call ends.
    pub(super) fn agent_leaves(&mut self) {
        if self.callee.as_ref().is_some_and(|c| c.up) {
            info!("agent left; caller and destination stay connected");
            self.leave_connected("agent_left");
        } else {
            self.finish(CloseReason::SdkRequest, HangupReason::Remote);
        }
    }

    /// The agent leaves a caller and destination that stay connected; its
    /// `call.terminated` says why (`agent_left`, `transferred`).
    pub(super) fn leave_connected(&mut self, reason: &str) {
        self.agent_left = true;
        self.playout.clear();
        self.send_stats();
        self.send_event(CallEvent::terminated(reason));
        self.close_media();
        self.session_ended(CloseReason::SdkRequest);
    }

    /// The call is answered now: its setup time is known.
    pub(super) fn count_answer(&self) {
        let setup = self.now.saturating_duration_since(self.started);
        self.shared.metrics.call_setup.observe(setup.as_secs_f64());
    }

    /// Tells the registry the session ended, and counts it once.
    fn session_ended(&self, reason: CloseReason) {
        if self
            .shared
            .registry
            .session_ended(&self.handle.session_id, reason)
        {
            self.shared.metrics.sessions_open.dec();
        }
    }

    /// Sends the agent the call's figures (`call.stats`), which come before its
    /// `call.terminated`.
    fn send_stats(&mut self) {
        if self.media.is_some() {
            let stats = self.stats();
            self.send_event(CallEvent::stats(&stats));
        }
    }

    /// Ends the call for everyone: legs, agent, session.
    pub(super) fn finish(&mut self, reason: CloseReason, caller_reason: HangupReason) {
        if self.ended {
            return;
        }
        self.ended = true;
        // Before the legs go: the destination's figures are read from it.
        self.send_stats();
        let final_stats = self.stats();
        if let Some(c) = self.connect.take() {
            self.respond(CommandResponse::error(
                c.command_id,
                ErrorCode::CallTerminated,
                "the call ended while connecting",
            ));
        }
        if let Some((id, _)) = self.pending_answer.take() {
            self.respond(CommandResponse::error(
                id,
                ErrorCode::CallRejected,
                "the far end did not take the call",
            ));
        }
        self.transfer_ended_with_call();
        self.caller.send(LegOutput::Hangup(caller_reason));
        if let Some(callee) = self.callee.take() {
            callee.send(LegOutput::Hangup(HangupReason::Remote));
        }
        let who = match (reason, caller_reason) {
            _ if self.transferred => "transferred",
            (_, HangupReason::Local) => "caller",
            (_, HangupReason::NoAnswer) => "no_answer",
            (CloseReason::SdkRequest, _) => "agent",
            (CloseReason::ForceClose, _) => "server",
            (CloseReason::CallTerminated, _) => "network",
        };
        self.shared.metrics.call_ended(who);
        self.send_event(CallEvent::terminated(who));
        self.close_media();
        self.publish_live();
        let h = &self.handle;
        self.shared.ended_calls.record(
            &h.connector,
            &h.call_id,
            (&h.from, &h.to),
            &h.live,
            Some(final_stats),
            who,
        );
        self.session_ended(reason);
    }
}
