//! The call: one actor task per call that owns its legs, its agent media link, the playout
//! buffer and the mixing, and runs the 20 ms media clock.
//!
//! Inputs arrive on two bounded queues: `control` for rare lifecycle events sent from code that
//! cannot wait (the registry, under its lock), and `data` for audio and commands, where senders
//! wait, which is the backpressure. Everything the call does to the outside (legs, media
//! connection, registry) goes out without awaiting, so one slow peer cannot stall the call.
//!
//! Audio paths, all at the agent's sample rate inside the call:
//! - caller alone: caller audio is forwarded to the agent the moment it arrives (no clock wait);
//!   agent audio is played to the caller one frame per tick from the playout buffer.
//! - after `call.connect`: each tick mixes one frame of every party; the agent hears both legs,
//!   and the legs hear each other plus the agent as whisper / barge / spy decide.

mod leg;
mod playout;

pub(crate) use leg::{LegEvent, LegId, LegLink, LegOutput};

use crate::audio::Resampler;
use crate::config::ConnectorConfig;
use crate::state::Shared;
use bytes::{BufMut, Bytes};
use playout::Playout;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use telcoflow_proto::audio::{mix_into, pcm_to_samples};
use telcoflow_proto::control::{
    Channel, CloseReason, Initiator, SessionInfo, SessionState, SetupData,
};
use telcoflow_proto::media::{
    BufferRequest, CHANNEL_CALLEE, CHANNEL_CALLER, CHANNEL_MIXED, CallEvent, Command, CommandName,
    CommandResponse, ConnectData, MediaServerFrame, RING_TIME_RANGE,
};
use telcoflow_proto::pool::FramePool;
use telcoflow_proto::sim::HangupReason;
use telcoflow_proto::{AudioMode, ErrorCode, SampleRate};
use telcoflow_sip::phase::PhaseAligner;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{Instrument, debug, info, info_span, trace, warn};

/// Capacity of a call's lifecycle queue. Lifecycle events are few per call.
const CONTROL_QUEUE: usize = 64;
/// Capacity of a call's audio/command queue: a few frames from each party.
const DATA_QUEUE: usize = 64;
/// Frames of leg audio held for mixing before the oldest is dropped (and counted).
const LEG_QUEUE_FRAMES: usize = 10;
/// How long a call waits for its agent to reconnect after the media connection drops.
const MEDIA_GRACE: Duration = Duration::from_secs(10);
/// Slots of a media connection's queue kept free of audio, so that responses and events
/// always fit even when the agent reads audio too slowly.
const MEDIA_TEXT_RESERVE: usize = 16;
/// Slots of a leg's queue kept free of audio for ringing / answered / hang-up.
const LEG_CONTROL_RESERVE: usize = 4;

/// A way to reach a call's actor. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct CallHandle {
    pub(crate) call_id: Arc<str>,
    pub(crate) session_id: Arc<str>,
    pub(crate) from: Arc<str>,
    pub(crate) to: Arc<str>,
    control: mpsc::Sender<CallInput>,
    data: mpsc::Sender<CallInput>,
}

impl CallHandle {
    /// Queues a lifecycle input without waiting. Returns false if the call has ended.
    pub(crate) fn send(&self, input: CallInput) -> bool {
        match self.control.try_send(input) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(call_id = %self.call_id, "call lifecycle queue full");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a lifecycle input, waiting for room: for async callers that must not lose it.
    /// Returns false if the call has ended.
    pub(crate) async fn send_wait(&self, input: CallInput) -> bool {
        self.control.send(input).await.is_ok()
    }

    /// Queues audio or a command, waiting for room. Returns false if the call has ended.
    pub(crate) async fn send_data(&self, input: CallInput) -> bool {
        self.data.send(input).await.is_ok()
    }

    /// Whether the call's actor has finished.
    pub(crate) fn is_ended(&self) -> bool {
        self.control.is_closed()
    }
}

/// How a call reaches its agent's media connection.
#[derive(Debug)]
pub(crate) struct MediaLink {
    pub(crate) conn_id: u64,
    pub(crate) tx: mpsc::Sender<MediaOut>,
}

/// From a call to its media connection.
#[derive(Debug)]
pub(crate) enum MediaOut {
    Text(String),
    /// A text frame already encoded as JSON (so valid UTF-8), split from pooled storage: the
    /// `buffer_request`s, which go out every 40 ms, cost no allocation.
    Json(Bytes),
    /// A `command_response`: the media connection counts commands in flight by these.
    Response(String),
    Audio(Bytes),
    /// Close the connection (after sending what is queued).
    Close,
}

/// Why a media connection could not attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AttachError {
    #[error("a media connection is already open for this call")]
    AlreadyAttached,
    #[error("the agent has left this call")]
    AgentLeft,
    /// Only an agent coming back after a lost connection may use an expired token.
    #[error("media token has expired")]
    TokenExpired,
}

/// Everything a call reacts to.
#[derive(Debug)]
pub(crate) enum CallInput {
    /// A control connection claimed the session; its setup fixes the agent's audio format.
    Claimed { setup: SetupData },
    /// A media connection wants to attach.
    MediaAttach {
        link: MediaLink,
        /// Its token is genuine but past its lifetime.
        token_expired: bool,
        reply: oneshot::Sender<Result<(), AttachError>>,
    },
    /// A media connection went away. `agent_closed`: the agent closed it itself, with a
    /// WebSocket close frame (the Rust SDK when its client shuts down), rather than losing it.
    MediaDetach { conn_id: u64, agent_closed: bool },
    /// A command from the media connection.
    Command { conn_id: u64, command: Command },
    /// Agent audio (channel 0) from the media connection.
    AgentAudio { conn_id: u64, pcm: Bytes },
    /// Something from a leg.
    Leg { leg: LegId, event: LegEvent },
    /// End the call from outside (HTTP close); `done` hears when it has ended.
    Close {
        reason: CloseReason,
        done: Option<oneshot::Sender<()>>,
    },
}

/// Starts a call for an incoming leg, registers its session and notifies the connector.
pub(crate) fn spawn_incoming(
    shared: &Arc<Shared>,
    connector: Arc<ConnectorConfig>,
    from: &str,
    to: &str,
    caller: LegLink,
) -> Result<CallHandle, ErrorCode> {
    let (handle, queues) = new_handle(from, to);
    let info = session_info(&handle, Initiator::Connector, from, to);
    let connector_id: Arc<str> = connector.uuid.as_str().into();
    // The actor must exist before the registry can notify anyone about it: a claim arriving
    // right after the notification sends `Claimed` to its queue.
    let actor = CallActor::new(shared.clone(), connector, handle.clone(), caller, None);
    shared.registry.open_call_session(
        &connector_id,
        shared.config.limits.max_calls_per_connector,
        info,
        handle.clone(),
        None,
    )?;
    run_actor(shared, actor, queues);
    Ok(handle)
}

/// Starts an outbound call for `session.create`: rings `remote` and registers the session as
/// already held by the creating control connection. The app's `call.answer` completes when the
/// far end picks up.
pub(crate) fn spawn_outbound(
    shared: &Arc<Shared>,
    connector: Arc<ConnectorConfig>,
    sm_ws_id: &str,
    setup: SetupData,
    remote: &str,
) -> Result<CallHandle, (ErrorCode, String)> {
    let caller_id = connector.outbound_caller_id.clone().unwrap_or_default();
    let (handle, queues) = new_handle(&caller_id, remote);
    let link = shared
        .networks
        .ring(remote, &handle, LegId::CALLER)
        .map_err(|e| {
            (
                ErrorCode::NoRoute,
                format!("{remote} cannot be reached: {e}"),
            )
        })?;
    let info = session_info(&handle, Initiator::Sdk, remote, &caller_id);
    let connector_id: Arc<str> = connector.uuid.as_str().into();
    let actor = CallActor::new(
        shared.clone(),
        connector,
        handle.clone(),
        link.clone(),
        Some(setup),
    );
    if let Err(code) = shared.registry.open_call_session(
        &connector_id,
        shared.config.limits.max_calls_per_connector,
        info,
        handle.clone(),
        Some(sm_ws_id.to_owned()),
    ) {
        let _ = link.tx.try_send(LegOutput::Hangup(HangupReason::Busy));
        return Err((code, "the connector's call limit is reached".into()));
    }
    run_actor(shared, actor, queues);
    Ok(handle)
}

type Queues = (mpsc::Receiver<CallInput>, mpsc::Receiver<CallInput>);

fn new_handle(from: &str, to: &str) -> (CallHandle, Queues) {
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    let handle = CallHandle {
        call_id: uuid::Uuid::new_v4().to_string().into(),
        session_id: uuid::Uuid::new_v4().to_string().into(),
        from: from.into(),
        to: to.into(),
        control: control_tx,
        data: data_tx,
    };
    (handle, (control_rx, data_rx))
}

fn session_info(
    handle: &CallHandle,
    initiator: Initiator,
    remote: &str,
    local: &str,
) -> SessionInfo {
    SessionInfo {
        id: handle.session_id.to_string(),
        channel: Channel::Telco,
        initiator,
        state: SessionState::Open,
        remote_address: remote.to_owned(),
        local_address: local.to_owned(),
        opened_at: crate::token::unix_now(),
        closed_at: None,
    }
}

fn run_actor(shared: &Arc<Shared>, actor: CallActor, (control, data): Queues) {
    let handle = &actor.handle;
    shared.registry.index_call(handle);
    let span = info_span!("call", call_id = %handle.call_id);
    shared
        .tasks
        .spawn(actor.run(control, data).instrument(span));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ringing,
    Answered,
}

/// Who hears the agent once a destination is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentMode {
    /// Heard by both parties (the default after connect).
    Barge,
    /// Heard by the connected party only.
    Whisper,
    /// Heard by nobody.
    Spy,
}

struct Leg {
    id: LegId,
    link: LegLink,
    up: bool,
    /// Leg rate -> agent rate.
    from_leg: Resampler,
    /// Agent rate -> leg rate.
    to_leg: Resampler,
    /// Received audio at the agent rate, waiting for the mixing tick.
    queue: VecDeque<i16>,
    dropped_samples: u64,
    /// Storage the frames sent to the leg are split from (see [`frame_bytes`]).
    pool: FramePool,
}

impl Leg {
    fn new(id: LegId, link: LegLink, agent_rate: SampleRate) -> Self {
        let (from_leg, to_leg) = resamplers(link.rate, agent_rate);
        Self {
            id,
            link,
            up: false,
            from_leg,
            to_leg,
            queue: VecDeque::with_capacity(LEG_QUEUE_FRAMES * agent_rate.frame_samples()),
            dropped_samples: 0,
            pool: FramePool::default(),
        }
    }

    fn set_agent_rate(&mut self, agent_rate: SampleRate) {
        (self.from_leg, self.to_leg) = resamplers(self.link.rate, agent_rate);
        self.queue.clear();
    }

    /// Sends to the leg without waiting. Audio only goes while the queue has room beyond a
    /// reserve, so that call-state outputs (ringing, answered, hang-up) are never the ones lost.
    fn send(&self, out: LegOutput) {
        let is_audio = matches!(out, LegOutput::Audio(_));
        if is_audio && self.link.tx.capacity() <= LEG_CONTROL_RESERVE {
            trace!(leg = self.id.0, "leg is not reading; audio frame dropped");
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.link.tx.try_send(out) {
            warn!(
                leg = self.id.0,
                "leg is not reading; call-state output dropped"
            );
        }
    }

    /// Converts agent-rate samples to the leg's rate and sends them as one frame.
    fn play(&mut self, samples: &[i16], scratch: &mut Vec<i16>) {
        scratch.clear();
        self.to_leg.process(samples, scratch);
        if scratch.is_empty() {
            return;
        }
        let pcm = frame_bytes(&mut self.pool, None, scratch);
        self.send(LegOutput::Audio(pcm));
    }

    /// Queues agent-rate samples for the next ticks, keeping at most `LEG_QUEUE_FRAMES`.
    fn enqueue(&mut self, samples: &[i16], frame_samples: usize) {
        self.queue.extend(samples);
        let cap = LEG_QUEUE_FRAMES * frame_samples;
        if self.queue.len() > cap {
            let excess = self.queue.len() - cap;
            self.queue.drain(..excess);
            self.dropped_samples += excess as u64;
            debug!(
                leg = self.id.0,
                excess, "leg sent faster than real time; oldest audio dropped"
            );
        }
    }

    fn take_frame(&mut self, out: &mut [i16]) {
        let n = out.len().min(self.queue.len());
        for (o, s) in out.iter_mut().zip(self.queue.drain(..n)) {
            *o = s;
        }
        out[n..].fill(0);
    }
}

fn resamplers(leg: SampleRate, agent: SampleRate) -> (Resampler, Resampler) {
    // Supported rates are all multiples of 8 kHz, which the FFT resampler handles; a failure
    // here would be a bug, and pass-through keeps audio flowing rather than killing the call.
    let make = |from: SampleRate, to: SampleRate| {
        Resampler::new(from.hz(), to.hz()).unwrap_or_else(|e| {
            warn!(error = %e, "resampler unavailable; passing audio through");
            Resampler::passthrough()
        })
    };
    (make(leg, agent), make(agent, leg))
}

struct PendingConnect {
    command_id: String,
    leg: LegId,
    destination: String,
    ring_deadline: Instant,
    reply_deadline: Option<Instant>,
}

struct CallActor {
    shared: Arc<Shared>,
    connector: Arc<ConnectorConfig>,
    handle: CallHandle,
    phase: Phase,
    setup: SetupData,
    caller: Leg,
    callee: Option<Leg>,
    next_leg: u32,
    connect: Option<PendingConnect>,
    mode: AgentMode,
    /// The agent left with `call.close` after connecting; the legs talk on without it.
    agent_left: bool,
    media: Option<MediaLink>,
    media_lost_at: Option<Instant>,
    playout: Playout,
    /// Moves the media clock towards agent-paced audio.
    aligner: PhaseAligner,
    /// A buffer request waits for the next caller frame to the agent (see `on_tick`).
    request_deferred: bool,
    /// Agent audio missed its tick: when to tick instead of at the next period.
    tick_at: Option<Instant>,
    ring_deadline: Instant,
    claimed: bool,
    /// An app-initiated call: the caller leg is the far party we rang, and `call.answer`
    /// waits for it to pick up.
    outbound: bool,
    /// An outbound call's `call.answer` waiting for the far end: command id and the client's
    /// deadline.
    pending_answer: Option<(String, Option<Instant>)>,
    /// Unrequested agent audio was refused and reported; reset once audio fits again.
    overflow_reported: bool,
    ended: bool,
    // Scratch buffers reused every tick.
    agent_frame: Vec<i16>,
    caller_frame: Vec<i16>,
    callee_frame: Vec<i16>,
    mix: Vec<i16>,
    scratch: Vec<i16>,
    leg_samples: Vec<i16>,
    slow_media_reported: bool,
    /// Storage the frames sent to the media connection are split from.
    media_pool: FramePool,
    /// Storage the `buffer_request` texts are encoded into.
    text_pool: FramePool,
}

impl CallActor {
    fn new(
        shared: Arc<Shared>,
        connector: Arc<ConnectorConfig>,
        handle: CallHandle,
        caller: LegLink,
        outbound: Option<SetupData>,
    ) -> Self {
        let setup = outbound.unwrap_or_default();
        let rate = setup.sample_rate;
        let max_playout =
            rate.bytes_per_second() * shared.config.limits.max_playout_ms as usize / 1000;
        let ring_deadline = Instant::now() + shared.config.ring_timeout();
        Self {
            playout: Playout::new(rate.frame_bytes(), max_playout),
            caller: Leg::new(LegId::CALLER, caller, rate),
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
            leg_samples: Vec::new(),
            slow_media_reported: false,
            media_pool: FramePool::default(),
            text_pool: FramePool::default(),
        }
    }

    fn rate(&self) -> SampleRate {
        self.setup.sample_rate
    }

    async fn run(
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
                Some(input) = control.recv() => self.on_input(input),
                Some(input) = data.recv() => self.on_input(input),
                // Cancel-safe: a missed tick is replayed by the interval (Burst).
                at = ticker.tick(), if ticking => {
                    if let Some(shift) = self.on_tick() {
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
        }
        self.shared.registry.unindex_call(&self.handle.call_id);
        if self.caller.dropped_samples > 0 {
            debug!(
                dropped = self.caller.dropped_samples,
                "caller audio dropped for running ahead"
            );
        }
        info!(
            playout_gaps = self.playout.gaps(),
            prebuffer_frames = self.playout.prebuffer_frames(),
            clock_shifts = self.aligner.shifts(),
            clock_misses = self.aligner.misses(),
            clock_margin_ms = self.aligner.margin().as_secs_f64() * 1e3,
            "call ended"
        );
    }

    /// The earliest time something must happen without any input.
    fn next_deadline(&self) -> Option<Instant> {
        let ringing = (self.phase == Phase::Ringing).then_some(self.ring_deadline);
        let connect = self
            .connect
            .iter()
            .flat_map(|c| [Some(c.ring_deadline), c.reply_deadline]);
        let answer = self.pending_answer.as_ref().and_then(|(_, d)| *d);
        let media = self.media_lost_at.map(|lost| lost + MEDIA_GRACE);
        [ringing, answer, media]
            .into_iter()
            .chain(connect)
            .flatten()
            .min()
    }

    fn on_deadline(&mut self, now: Instant) {
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
                self.respond(CommandResponse::error(
                    c.command_id,
                    ErrorCode::CallUnanswered,
                    format!("{} did not answer", c.destination),
                ));
            } else if c.reply_deadline.is_some_and(|r| now >= r) {
                let c = self.connect.take().expect("checked above");
                self.drop_callee(c.leg, HangupReason::Remote);
                self.respond(CommandResponse::error(
                    c.command_id,
                    ErrorCode::Timeout,
                    "no answer from the destination before the command's timeout_ms",
                ));
            }
        }
        if self
            .media_lost_at
            .is_some_and(|lost| now >= lost + MEDIA_GRACE)
        {
            info!("agent did not come back; ending the call");
            self.finish(CloseReason::CallTerminated, HangupReason::Remote);
        }
    }

    fn on_input(&mut self, input: CallInput) {
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
                    let gaps = self.playout.gaps();
                    // Audio that missed the latest tick by less than a frame is the media
                    // clock's to answer for; a longer gap (a pause) is the pre-buffer's.
                    let missed_tick = self.playout.ran_dry_at_last_tick();
                    let pushed = self.playout.push(&pcm, Instant::now());
                    let first = if self.phase == Phase::Answered {
                        self.aligner.first_audio()
                    } else {
                        None
                    };
                    if let Some(margin) = first {
                        // The clock started with the call, at a phase of its own: play the
                        // first audio a margin after it lands and keep time from there.
                        self.tick_at = Some(Instant::now() + margin);
                    } else if self.playout.gaps() > gaps && missed_tick {
                        if let Some(margin) = self.aligner.missed() {
                            self.playout.forgive_gap();
                            // The frame missed its tick by a few ms: play it a margin after
                            // it landed rather than a whole frame later behind the next one.
                            // The clock restarts from there; the aligner tightens it again.
                            self.tick_at = Some(Instant::now() + margin);
                        }
                    }
                    if pushed.overflow == 0 {
                        self.overflow_reported = false;
                    } else if !self.overflow_reported {
                        // Once per episode: a client flooding audio must not also get an
                        // event per frame.
                        self.overflow_reported = true;
                        let message = format!(
                            "{} bytes of agent audio beyond what the server asked for were refused",
                            pushed.overflow
                        );
                        self.send_event(CallEvent::error(ErrorCode::BufferOverflow, message));
                    }
                }
            }
            CallInput::Leg { leg, event } => self.on_leg(leg, event),
            CallInput::Close { reason, done } => {
                self.finish(reason, HangupReason::Remote);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        }
    }

    fn is_current_media(&self, conn_id: u64) -> bool {
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

    fn attach(&mut self, link: MediaLink, token_expired: bool) -> Result<(), AttachError> {
        if self.agent_left {
            return Err(AttachError::AgentLeft);
        }
        if self.media.is_some() {
            return Err(AttachError::AlreadyAttached);
        }
        // A token outlives its lifetime only to bring back a lost connection: a call longer
        // than the lifetime must survive a network blip too.
        if token_expired && self.media_lost_at.is_none() {
            return Err(AttachError::TokenExpired);
        }
        debug!(conn_id = link.conn_id, "media connection attached");
        self.media = Some(link);
        self.media_lost_at = None;
        self.slow_media_reported = false;
        self.playout.forget_requests();
        self.shared
            .registry
            .set_media_attached(&self.handle.session_id, true);
        self.request_audio();
        Ok(())
    }

    fn on_command(&mut self, cmd: Command) {
        let Some(name) = CommandName::parse(&cmd.command) else {
            let known: Vec<&str> = CommandName::ALL.iter().map(|c| c.as_str()).collect();
            self.respond(CommandResponse::error(
                cmd.command_id,
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command '{}'; known commands: {}",
                    cmd.command,
                    known.join(", ")
                ),
            ));
            return;
        };
        debug!(command = %name, "command");
        let id = cmd.command_id;
        match name {
            CommandName::Answer if self.outbound && self.phase == Phase::Ringing => {
                if self.pending_answer.is_some() {
                    return self.respond(CommandResponse::error(
                        id,
                        ErrorCode::InvalidState,
                        "an answer is already waiting for the far end",
                    ));
                }
                let deadline = cmd
                    .timeout_ms
                    .map(|ms| Instant::now() + Duration::from_millis(ms));
                self.pending_answer = Some((id, deadline));
            }
            CommandName::Answer => {
                let already = self.phase == Phase::Answered;
                if !already {
                    self.phase = Phase::Answered;
                    self.caller.up = true;
                    self.caller.send(LegOutput::Answered);
                    info!("answered");
                }
                self.respond(CommandResponse::ok(
                    id,
                    Some(json!({ "alreadyAnswered": already })),
                ));
            }
            CommandName::Connect => self.on_connect(id, cmd.data, cmd.timeout_ms),
            CommandName::Whisper | CommandName::Barge | CommandName::Spy => {
                if !self.callee.as_ref().is_some_and(|c| c.up) {
                    self.respond(CommandResponse::error(
                        id,
                        ErrorCode::NotConnected,
                        format!("{name} needs a connected destination: call.connect first"),
                    ));
                    return;
                }
                self.mode = match name {
                    CommandName::Whisper => AgentMode::Whisper,
                    CommandName::Spy => AgentMode::Spy,
                    _ => AgentMode::Barge,
                };
                self.respond(CommandResponse::ok(id, None));
            }
            CommandName::Interrupt => {
                let dropped = self.playout.clear();
                debug!(dropped, "interrupt");
                self.respond(CommandResponse::ok(
                    id,
                    Some(json!({ "droppedBytes": dropped })),
                ));
            }
            CommandName::Disconnect => {
                self.respond(CommandResponse::ok(id, None));
                self.finish(CloseReason::SdkRequest, HangupReason::Remote);
            }
            CommandName::Close => {
                self.respond(CommandResponse::ok(id, None));
                self.agent_leaves();
            }
        }
    }

    /// The agent leaves the call (`call.close`, or its media connection closed by itself): a
    /// connected caller and destination stay connected, any other call ends.
    fn agent_leaves(&mut self) {
        if self.callee.as_ref().is_some_and(|c| c.up) {
            info!("agent left; caller and destination stay connected");
            self.agent_left = true;
            self.playout.clear();
            self.send_event(CallEvent::terminated("agent_left"));
            self.close_media();
            self.shared
                .registry
                .close(&self.handle.session_id, CloseReason::SdkRequest);
        } else {
            self.finish(CloseReason::SdkRequest, HangupReason::Remote);
        }
    }

    fn on_connect(&mut self, id: String, data: Option<Value>, timeout_ms: Option<u64>) {
        let ring_time = match data.map(serde_json::from_value::<ConnectData>) {
            Some(Ok(d)) if RING_TIME_RANGE.contains(&d.ring_time_seconds) => d.ring_time_seconds,
            Some(Ok(d)) => {
                return self.respond(CommandResponse::error(
                    id,
                    ErrorCode::InvalidRequest,
                    format!(
                        "ringTimeSeconds must be 1..=120, got {}",
                        d.ring_time_seconds
                    ),
                ));
            }
            _ => {
                return self.respond(CommandResponse::error(
                    id,
                    ErrorCode::InvalidRequest,
                    "call.connect needs data {\"ringTimeSeconds\": 1..=120}",
                ));
            }
        };
        if self.phase != Phase::Answered {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::InvalidState,
                "answer the call before connecting it",
            ));
        }
        if self.callee.is_some() || self.connect.is_some() {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::InvalidState,
                "the call is already connected or connecting",
            ));
        }
        let Some(destination) = self
            .connector
            .connect_destination(&self.handle.to)
            .map(str::to_owned)
        else {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::NoRoute,
                format!(
                    "no connect destination is configured for {}",
                    self.handle.to
                ),
            ));
        };
        let leg = LegId(self.next_leg);
        self.next_leg += 1;
        // The networks pick by address: SIP for `sip:` URIs, else the simulated phones.
        let link = match self.shared.networks.ring(&destination, &self.handle, leg) {
            Ok(link) => link,
            Err(e) => {
                return self.respond(CommandResponse::error(
                    id,
                    ErrorCode::CallRejected,
                    format!("{destination} cannot be reached: {e}"),
                ));
            }
        };
        info!(%destination, ring_time, "connecting");
        let now = Instant::now();
        self.callee = Some(Leg::new(leg, link, self.rate()));
        self.connect = Some(PendingConnect {
            command_id: id,
            leg,
            destination,
            ring_deadline: now + Duration::from_secs(u64::from(ring_time)),
            reply_deadline: timeout_ms.map(|ms| now + Duration::from_millis(ms)),
        });
    }

    fn on_leg(&mut self, id: LegId, event: LegEvent) {
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
                    self.respond(CommandResponse::ok(
                        c.command_id,
                        Some(json!({ "destination": c.destination })),
                    ));
                }
            }
            LegEvent::Rejected | LegEvent::Hangup => {
                let was_up = self.callee.as_ref().is_some_and(|c| c.up);
                self.callee = None;
                if let Some(c) = self.connect.take() {
                    // Declined is, to the application, one more way of not being answered: apps
                    // written for the reference SDK test for CALL_UNANSWERED alone.
                    self.respond(CommandResponse::error(
                        c.command_id,
                        ErrorCode::CallUnanswered,
                        format!("{} declined the call", c.destination),
                    ));
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
            LegEvent::Audio(pcm) => {
                if self.phase == Phase::Answered {
                    let frame = self.rate().frame_samples();
                    pcm_to_samples(&pcm, &mut self.leg_samples);
                    if let Some(callee) = &mut self.callee {
                        if callee.up {
                            self.scratch.clear();
                            callee
                                .from_leg
                                .process(&self.leg_samples, &mut self.scratch);
                            callee.enqueue(&self.scratch, frame);
                        }
                    }
                }
            }
            LegEvent::Dtmf { .. } => {}
        }
    }

    fn on_caller(&mut self, event: LegEvent) {
        match event {
            LegEvent::Hangup | LegEvent::Rejected => {
                info!("caller hung up");
                self.finish(CloseReason::CallTerminated, HangupReason::Local);
            }
            LegEvent::Audio(pcm) => {
                if self.phase != Phase::Answered {
                    return; // nobody listens before the call is answered
                }
                pcm_to_samples(&pcm, &mut self.leg_samples);
                self.scratch.clear();
                self.caller
                    .from_leg
                    .process(&self.leg_samples, &mut self.scratch);
                if self.callee.as_ref().is_some_and(|c| c.up) {
                    let frame = self.rate().frame_samples();
                    self.caller.enqueue(&self.scratch, frame);
                } else if !self.scratch.is_empty() {
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
            LegEvent::Answered if self.outbound && self.phase == Phase::Ringing => {
                info!("far end answered");
                self.phase = Phase::Answered;
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
        }
    }

    /// One 20 ms step of the media clock. Returns how much earlier the next tick should come,
    /// if the clock should move.
    fn on_tick(&mut self) -> Option<Duration> {
        let n = self.rate().frame_samples();
        self.agent_frame.resize(n, 0);
        let held = self.playout.buffered();
        let agent_speaks = !self.agent_left && self.playout.pop_frame(&mut self.agent_frame);
        // The agent paces this audio when it still owes some: it sends frames as it makes
        // them, so time they spend here is delay this buffer adds (see `crate::phase`). A full
        // frame and no pre-buffer held on purpose.
        let paced_by_agent = agent_speaks
            && held >= n * 2
            && self.playout.outstanding() > 0
            && self.playout.prebuffer_frames() == 1;
        let now = Instant::now();
        let waited = self
            .playout
            .played_arrival()
            .filter(|_| paced_by_agent)
            .map(|at| now.saturating_duration_since(at));
        let shift = self.aligner.on_tick(waited);
        let callee_up = self.callee.as_ref().is_some_and(|c| c.up);
        if !callee_up {
            // Caller alone with the agent.
            let mut frame = std::mem::take(&mut self.agent_frame);
            self.caller.play(&frame, &mut self.scratch);
            frame.clear();
            self.agent_frame = frame;
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
            self.caller.play(&self.mix, &mut self.scratch);
            // The destination hears the caller (+ agent).
            self.mix.clear();
            self.mix.extend_from_slice(&self.caller_frame);
            if hears_agent(self.mode, true) {
                mix_into(&mut self.mix, &self.agent_frame);
            }
            if let Some(callee) = &mut self.callee {
                callee.play(&self.mix, &mut self.scratch);
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

    fn request_audio(&mut self) {
        if self.media.is_none() || self.agent_left {
            return;
        }
        if let Some(bytes) = self.playout.want() {
            let frame = MediaServerFrame::BufferRequest(BufferRequest {
                requested_bytes: bytes as u32,
                prefer_audio_frame_bytes: self.playout.frame_bytes() as u32,
                channel_id: CHANNEL_MIXED,
            });
            let json = json_bytes(&mut self.text_pool, &frame);
            if self.send_media(MediaOut::Json(json)) {
                self.playout.requested(bytes);
            }
        }
    }

    fn drop_callee(&mut self, leg: LegId, reason: HangupReason) {
        if let Some(callee) = self.callee.take_if(|c| c.id == leg) {
            callee.send(LegOutput::Hangup(reason));
        }
    }

    fn respond(&mut self, response: CommandResponse) {
        self.send_media(MediaOut::Response(
            MediaServerFrame::CommandResponse(response).encode(),
        ));
    }

    fn send_event(&mut self, event: CallEvent) {
        self.send_media(MediaOut::Text(MediaServerFrame::CallEvent(event).encode()));
    }

    /// Queues a frame for the media connection without waiting. A connection that cannot keep
    /// up loses audio frames (reported once as `SLOW_CONSUMER`); one that cannot even take a
    /// text frame is closed, since commands and events must not be lost.
    fn send_media(&mut self, out: MediaOut) -> bool {
        let Some(media) = &self.media else {
            return false;
        };
        if matches!(out, MediaOut::Audio(_)) && media.tx.capacity() <= MEDIA_TEXT_RESERVE {
            if !self.slow_media_reported {
                self.slow_media_reported = true;
                warn!("agent is not reading its audio; frames are being dropped");
                let ev = MediaServerFrame::CallEvent(CallEvent::error(
                    ErrorCode::SlowConsumer,
                    "the application is not reading audio fast enough; frames were dropped",
                ));
                // The reserve guarantees room for this.
                let _ = media.tx.try_send(MediaOut::Text(ev.encode()));
            }
            return false;
        }
        match media.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!("media connection cannot take even a control frame; closing it");
                let _ = media.tx.try_send(MediaOut::Close);
                self.detach_media();
                false
            }
            // The connection's task has ended; its detach notice is on the way.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!("media connection already gone");
                self.detach_media();
                false
            }
        }
    }

    /// The media connection is gone without the agent leaving: the call waits for it to come
    /// back with the same URL and token, for [`MEDIA_GRACE`].
    fn detach_media(&mut self) {
        self.media = None;
        self.shared
            .registry
            .set_media_attached(&self.handle.session_id, false);
        if !self.agent_left {
            self.media_lost_at = Some(Instant::now());
        }
    }

    fn close_media(&mut self) {
        if let Some(media) = self.media.take() {
            let _ = media.tx.try_send(MediaOut::Close);
        }
        self.shared
            .registry
            .set_media_attached(&self.handle.session_id, false);
    }

    /// Ends the call for everyone: legs, agent, session.
    fn finish(&mut self, reason: CloseReason, caller_reason: HangupReason) {
        if self.ended {
            return;
        }
        self.ended = true;
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
        self.caller.send(LegOutput::Hangup(caller_reason));
        if let Some(callee) = self.callee.take() {
            callee.send(LegOutput::Hangup(HangupReason::Remote));
        }
        let who = match (reason, caller_reason) {
            (_, HangupReason::Local) => "caller",
            (_, HangupReason::NoAnswer) => "no_answer",
            (CloseReason::SdkRequest, _) => "agent",
            (CloseReason::ForceClose, _) => "server",
            (CloseReason::CallTerminated, _) => "network",
        };
        self.send_event(CallEvent::terminated(who));
        self.close_media();
        self.shared.registry.close(&self.handle.session_id, reason);
    }
}

/// Frames a pool's block holds. Each pool has two blocks, so frames must be gone within 32
/// frames (640 ms) of being sent for the blocks to be reused.
const POOL_FRAMES: usize = 32;

/// An s16le frame (with a channel byte first, for the media connection) split off `pool`,
/// whose blocks hold [`POOL_FRAMES`] frames.
fn frame_bytes(pool: &mut FramePool, channel: Option<u8>, samples: &[i16]) -> Bytes {
    let len = usize::from(channel.is_some()) + samples.len() * 2;
    let block = pool.with_room(len, len * POOL_FRAMES);
    if let Some(channel) = channel {
        block.put_u8(channel);
    }
    // Sized once and filled in one vectorised pass; `put_i16_le` per sample re-checked the
    // length for each one and was the server's costliest function of its own.
    let start = block.len();
    block.resize(start + samples.len() * 2, 0);
    telcoflow_proto::audio::write_pcm(samples, &mut block[start..]);
    block.split().freeze()
}

/// Bytes of a text pool's block: some 20 `buffer_request`s (about 90 bytes each).
const TEXT_POOL_BYTES: usize = 2048;
/// Room a text pool must have left to encode a `buffer_request` without growing.
const TEXT_FRAME_ROOM: usize = 256;

/// `frame` as JSON, split off `pool` like [`frame_bytes`] does for audio.
fn json_bytes(pool: &mut FramePool, frame: &MediaServerFrame) -> Bytes {
    let block = pool.with_room(TEXT_FRAME_ROOM, TEXT_POOL_BYTES);
    if serde_json::to_writer((&mut *block).writer(), frame).is_err() {
        // Cannot happen (the writer is memory, every map key is a string); send what
        // `MediaServerFrame::encode` sends in that case.
        block.clear();
        block.put_slice(b"{}");
    }
    block.split().freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_encoded_into_the_pool() {
        let mut pool = FramePool::default();
        let frame = MediaServerFrame::BufferRequest(BufferRequest {
            requested_bytes: 1920,
            prefer_audio_frame_bytes: 960,
            channel_id: CHANNEL_MIXED,
        });
        let first = json_bytes(&mut pool, &frame);
        assert_eq!(&first[..], frame.encode().as_bytes());
        let second = json_bytes(&mut pool, &frame);
        assert_eq!(first, second);
        assert_eq!(first.as_ptr().wrapping_add(first.len()), second.as_ptr());
    }

    #[test]
    fn pool_blocks_are_reused_once_their_frames_are_gone() {
        let mut pool = FramePool::default();
        let samples = [5i16; 480];
        let mut take = || frame_bytes(&mut pool, None, &samples);
        // Frames are dropped at once, as they are once sent; a block holds POOL_FRAMES.
        let a = take().as_ptr();
        for _ in 1..POOL_FRAMES {
            take();
        }
        let b = take().as_ptr();
        for _ in 1..POOL_FRAMES {
            take();
        }
        assert_eq!(take().as_ptr(), a, "block A is taken back");
        for _ in 1..POOL_FRAMES {
            take();
        }
        let held = take();
        assert_eq!(held.as_ptr(), b, "then block B");
        for _ in 1..2 * POOL_FRAMES {
            take();
        }
        // A frame of B is still alive (a peer far behind): a new block takes B's place.
        assert_ne!(take().as_ptr(), b);
        assert_eq!(&held[..2], &[5, 0]);
    }

    #[test]
    fn frames_are_split_from_one_block() {
        let mut pool = FramePool::default();
        let samples = [1i16, -2, 3];
        let first = frame_bytes(&mut pool, Some(CHANNEL_CALLER), &samples);
        assert_eq!(&first[..], &[1, 1, 0, 0xfe, 0xff, 3, 0]);
        let second = frame_bytes(&mut pool, None, &samples);
        assert_eq!(&second[..], &[1, 0, 0xfe, 0xff, 3, 0]);
        // Both came out of the same block: the second starts where the first ends.
        assert_eq!(first.as_ptr().wrapping_add(first.len()), second.as_ptr());
        // A block holds POOL_FRAMES frames before the allocator is asked again.
        let mut last = second;
        for _ in 2..POOL_FRAMES {
            let next = frame_bytes(&mut pool, None, &samples);
            assert_eq!(last.as_ptr().wrapping_add(last.len()), next.as_ptr());
            last = next;
        }
    }
}
