//! [`ActiveCall`]: one phone call, its commands, its audio and its media connection.
//!
//! The media connection is one WebSocket per call. A driver task owns it: it reads audio and
//! events, answers the server's `buffer_request`s from the call's ring buffer (pull-based
//! flow control) and writes commands. The [`ActiveCall`] handle talks to it through a bounded
//! queue and shared state.
//!
//! - this module: the handle and its commands;
//! - `audio`: [`AudioChannel`], [`AudioStream`] and the routing of received audio;
//! - `event`: [`CallEvent`], [`CallEvents`] and [`CallStateWatch`];
//! - `handoff`: [`ActiveCall::to_json`] and [`ActiveCall::from_json`];
//! - `transfer`: [`ActiveCall::transfer`] and its [`TransferOutcome`];
//! - `driver`: the media driver task and reconnection;
//! - `flow`: answering `buffer_request`s from the ring buffer;
//! - `marks`: [`ActiveCall::mark`]'s marks on their way, and [`Interrupted`].

mod audio;
mod driver;
mod event;
mod flow;
mod handoff;
mod marks;
mod transfer;

pub use audio::{AudioChannel, AudioStream};
pub use event::{CallEvent, CallEvents, CallStateWatch};
pub use marks::Interrupted;
pub use transfer::{TransferMethod, TransferOutcome};

use crate::config::TelcoflowClientConfig;
use crate::error::{CallError, CallErrorKind};
use crate::event::ClientEvent;
use crate::ring::{RingBuffer, WriteError};
use crate::transport::Tls;
use audio::Channels;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use telcoflow_proto::media::{
    self, Command, CommandName, CommandResponse, ConnectData, MediaClientFrame, RecordAction,
    RecordData, RecordResult, SendDtmfData,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, trace, warn};

/// Client-side deadline of every command but `call.connect`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than the server's deadline the client waits for a command response.
const COMMAND_GRACE: Duration = Duration::from_secs(5);
/// Frames queued towards the media WebSocket (commands and audio).
const OUT_QUEUE: usize = 32;
/// Call events buffered for the application before further ones are dropped (and logged).
const CALL_EVENT_CAPACITY: usize = 64;

/// Where a call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallState {
    /// Known, media connection not opened: may still be handed to another process.
    New,
    /// The media connection is being opened.
    Opening,
    /// The media connection is open.
    Live,
    /// The call has ended.
    Terminated,
}

/// Settings a call takes from the client configuration.
#[derive(Debug, Clone)]
pub(crate) struct CallSettings {
    pub(crate) buffer_size: usize,
    pub(crate) audio_channel_capacity: usize,
    pub(crate) tls: Tls,
    /// Limit on opening the media WebSocket.
    pub(crate) connect_timeout: Duration,
}

impl From<&TelcoflowClientConfig> for CallSettings {
    fn from(c: &TelcoflowClientConfig) -> Self {
        Self {
            buffer_size: c.buffer_size,
            audio_channel_capacity: c.audio_channel_capacity,
            tls: c.media_tls.clone(),
            connect_timeout: c.connect_timeout,
        }
    }
}

/// What the server told about a call.
pub(crate) struct CallParams {
    pub(crate) id: String,
    pub(crate) session_id: Option<String>,
    pub(crate) caller: String,
    pub(crate) callee: String,
    pub(crate) url: String,
    pub(crate) token: String,
}

/// Where a call reports to its client, if it has one.
#[derive(Clone, Default)]
pub(crate) struct CallLinks {
    /// Client events (call errors, overflow); weak so that calls do not keep the client's
    /// event stream open.
    pub(crate) client_events: Option<mpsc::WeakSender<ClientEvent>>,
    /// Cancelled when the client shuts down.
    pub(crate) shutdown: Option<CancellationToken>,
    /// The client's task tracker.
    pub(crate) tracker: Option<TaskTracker>,
}

/// One phone call. Cheap to clone; every clone is the same call.
///
/// Delivered by [`TelcoflowClient`](crate::TelcoflowClient) as
/// [`ClientEvent::IncomingCall`] (by default already [`CallState::Live`]), or rebuilt from
/// another process's [`ActiveCall::to_json`] with [`ActiveCall::from_json`]. The media
/// connection opens on the first command or send if it is not open yet. When the last clone is
/// dropped the media connection is closed.
///
/// Commands return the server's result payload (`Value::Null` when it sends none); a command
/// the server refuses, or one that gets no answer, is a [`CallError`].
///
/// ```no_run
/// use futures_util::StreamExt;
/// use telcoflow::{ActiveCall, AudioChannel, CallError};
///
/// async fn echo(call: ActiveCall) -> Result<(), CallError> {
///     call.answer().await?;
///     let mut audio = call.audio_stream(AudioChannel::Mixed);
///     while let Some(chunk) = audio.next().await {
///         // Play the caller's own voice back; a full buffer just drops this chunk.
///         match call.send_audio(&chunk).await {
///             Err(e) if !e.is_buffer_full() => return Err(e),
///             _ => {}
///         }
///     }
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct ActiveCall {
    core: Arc<CallCore>,
    _guard: Arc<DropGuard>,
}

impl fmt::Debug for ActiveCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveCall")
            .field("id", &self.core.id)
            .field("session_id", &self.core.session_id)
            .field("caller", &self.core.caller)
            .field("callee", &self.core.callee)
            .field("state", &*self.core.state.borrow())
            .finish_non_exhaustive()
    }
}

struct CallCore {
    id: String,
    session_id: Option<String>,
    caller: String,
    callee: String,
    url: String,
    token: String,
    settings: CallSettings,
    links: CallLinks,
    /// Cancelled when the call must stop (last handle dropped, client shutdown).
    cancel: CancellationToken,
    state: watch::Sender<CallState>,
    /// Serialises opening the media connection.
    open_lock: tokio::sync::Mutex<()>,
    media: Mutex<Option<Arc<Media>>>,
    channels: Mutex<Channels>,
    /// Dropped when the call ends, which ends the application's event stream.
    events_tx: Mutex<Option<mpsc::Sender<CallEvent>>>,
    events_rx: Mutex<Option<mpsc::Receiver<CallEvent>>>,
    tracker: TaskTracker,
}

/// State shared between the handle and the media driver of an open media connection.
struct Media {
    ring: RingBuffer,
    out: mpsc::Sender<Message>,
    pending: Mutex<Pending>,
    /// Set when the client shuts down; the driver learns it through `driver`.
    shutdown: AtomicBool,
    /// The media driver's task, registered on each of its polls.
    driver: AtomicWaker,
    /// The server's `call.terminated` has been delivered to the call's events.
    terminated_seen: AtomicBool,
    /// Marks placed and not yet reported.
    marks: Mutex<marks::MarkTracker>,
}

/// Commands waiting for their `command_response`.
#[derive(Default)]
struct Pending {
    map: HashMap<String, oneshot::Sender<Result<CommandResponse, CallError>>>,
    closed: bool,
}

impl From<WriteError> for CallError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Full { requested, free } => Self::buffer_full(requested, free),
            WriteError::Closed => Self::new(CallErrorKind::Closed),
        }
    }
}

impl ActiveCall {
    pub(crate) fn new(params: CallParams, settings: CallSettings, links: CallLinks) -> Self {
        let CallParams {
            id,
            session_id,
            caller,
            callee,
            url,
            token,
        } = params;
        let cancel = links
            .shutdown
            .as_ref()
            .map_or_else(CancellationToken::new, CancellationToken::child_token);
        let tracker = links.tracker.clone().unwrap_or_default();
        let (events_tx, events_rx) = mpsc::channel(CALL_EVENT_CAPACITY);
        let channels = Channels::new(settings.audio_channel_capacity);
        let core = Arc::new(CallCore {
            id,
            session_id,
            caller,
            callee,
            url,
            token,
            settings,
            links,
            cancel: cancel.clone(),
            state: watch::Sender::new(CallState::New),
            open_lock: tokio::sync::Mutex::new(()),
            media: Mutex::new(None),
            channels: Mutex::new(channels),
            events_tx: Mutex::new(Some(events_tx)),
            events_rx: Mutex::new(Some(events_rx)),
            tracker,
        });
        Self {
            core,
            _guard: Arc::new(cancel.drop_guard()),
        }
    }

    /// The call id.
    pub fn id(&self) -> &str {
        &self.core.id
    }

    /// The session the call belongs to (unknown for calls rebuilt with `from_json`).
    pub fn session_id(&self) -> Option<&str> {
        self.core.session_id.as_deref()
    }

    /// The caller's number.
    pub fn caller(&self) -> &str {
        &self.core.caller
    }

    /// The called number.
    pub fn callee(&self) -> &str {
        &self.core.callee
    }

    /// The current state.
    pub fn state(&self) -> CallState {
        *self.core.state.borrow()
    }

    /// Sees every state change from now on.
    pub fn watch_state(&self) -> CallStateWatch {
        CallStateWatch::new(self.core.state.subscribe())
    }

    /// Resolves once the call is [`CallState::Terminated`].
    pub async fn terminated(&self) {
        let mut rx = self.core.state.subscribe();
        // `wait_for` only fails when the sender is gone, which cannot happen while `self`
        // holds the core; either way the call is over.
        let cancelled = tokio::select! {
            _ = rx.wait_for(|s| *s == CallState::Terminated) => false,
            () = self.core.cancel.cancelled() => true,
        };
        if cancelled {
            // The client shut down. A call whose media never opened has no driver to end it,
            // so end it here; an open one ends when its driver stops.
            if self.core.media.lock().is_none() {
                self.finish_locally();
            }
            let _ = rx.wait_for(|s| *s == CallState::Terminated).await;
        }
    }

    /// Opens the media connection if it is not open yet. Commands and sends do this
    /// themselves; call it to choose the moment.
    pub async fn connect_media(&self) -> Result<(), CallError> {
        self.media().await.map(drop)
    }

    /// Picks the call up (`call.answer`, 10 s). Returns the server's result (this server
    /// sends `{"alreadyAnswered": bool}`).
    pub async fn answer(&self) -> Result<Value, CallError> {
        self.command(CommandName::Answer, None, COMMAND_TIMEOUT)
            .await
    }

    /// Rings the call's configured destination for `ring_time` (1..=120 s, whole seconds) and
    /// bridges it in (`call.connect`). An unanswered destination fails with code
    /// [`ErrorCode::CallUnanswered`](crate::ErrorCode::CallUnanswered); a `ring_time` out of
    /// range with [`CallErrorKind::InvalidArgument`], without a round trip.
    pub async fn connect(&self, ring_time: Duration) -> Result<Value, CallError> {
        let secs = u32::try_from(ring_time.as_secs()).unwrap_or(u32::MAX);
        if !media::RING_TIME_RANGE.contains(&secs) || ring_time.subsec_nanos() != 0 {
            return Err(CallError::with_message(
                CallErrorKind::InvalidArgument,
                format!("ring_time {ring_time:?} is not a whole number of seconds in 1..=120"),
            ));
        }
        let data = serde_json::to_value(ConnectData {
            ring_time_seconds: secs,
        })
        .ok();
        self.command(CommandName::Connect, data, ring_time).await
    }

    /// Sends DTMF `digits` (1 to 32 of `0-9 * # A-D`) to the caller, each tone `duration`
    /// long (40 ms to 2 s, rounded up to 20 ms; digits 60 ms apart): RFC 4733 events on a SIP
    /// call whose phone negotiated telephone-event, SIP INFO on other SIP calls, tones in the
    /// audio of a simulated phone
    /// (`call.send_dtmf`, an extension of this server). Returns once the server has queued
    /// them, with the time they take to play (`{"queuedMs": n}`). Digits or a duration out of
    /// range fail with code [`ErrorCode::InvalidRequest`](crate::ErrorCode::InvalidRequest)
    /// and a message saying what is wrong; an unanswered call with
    /// [`ErrorCode::InvalidState`](crate::ErrorCode::InvalidState).
    pub async fn send_dtmf(&self, digits: &str, duration: Duration) -> Result<Value, CallError> {
        let data = serde_json::to_value(SendDtmfData {
            digits: digits.to_owned(),
            duration_ms: Some(u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)),
        })
        .ok();
        self.command(CommandName::SendDtmf, data, COMMAND_TIMEOUT)
            .await
    }

    /// Starts recording the call on the server (`call.record` with `start`, an extension of
    /// this server): a stereo WAV, the caller (with any connected destination) left, the
    /// agent right, listed and downloaded with
    /// [`TelcoflowClient::list_recordings`](crate::TelcoflowClient::list_recordings) and
    /// [`TelcoflowClient::download_recording`](crate::TelcoflowClient::download_recording).
    /// A recording already running (the connector records every call, or an earlier start)
    /// is kept: [`RecordResult::already_recording`]. A server without recording fails with
    /// code [`ErrorCode::RecordingNotConfigured`](crate::ErrorCode::RecordingNotConfigured);
    /// an unanswered call with [`ErrorCode::InvalidState`](crate::ErrorCode::InvalidState).
    pub async fn start_recording(&self) -> Result<RecordResult, CallError> {
        self.record(RecordAction::Start).await
    }

    /// Stops the call's recording (`call.record` with `stop`); the server finishes its file.
    /// Without a recording running: code [`ErrorCode::InvalidState`](crate::ErrorCode::InvalidState).
    pub async fn stop_recording(&self) -> Result<RecordResult, CallError> {
        self.record(RecordAction::Stop).await
    }

    /// Pauses the call's recording (`call.record` with `pause`), e.g. while the caller reads
    /// out a card number: the audio from now until [`ActiveCall::resume_recording`] is left
    /// out of the file, and the pause noted in its metadata.
    pub async fn pause_recording(&self) -> Result<RecordResult, CallError> {
        self.record(RecordAction::Pause).await
    }

    /// Records again after [`ActiveCall::pause_recording`] (`call.record` with `resume`).
    pub async fn resume_recording(&self) -> Result<RecordResult, CallError> {
        self.record(RecordAction::Resume).await
    }

    async fn record(&self, action: RecordAction) -> Result<RecordResult, CallError> {
        let data = serde_json::to_value(RecordData { action }).ok();
        let result = self
            .command(CommandName::Record, data, COMMAND_TIMEOUT)
            .await?;
        serde_json::from_value(result).map_err(|e| {
            CallError::with_message(
                CallErrorKind::Rejected,
                format!("malformed call.record result: {e}"),
            )
        })
    }

    /// The agent is heard by the connected party only (`agent.whisper`; needs `connect`).
    pub async fn whisper(&self) -> Result<Value, CallError> {
        self.command(CommandName::Whisper, None, COMMAND_TIMEOUT)
            .await
    }

    /// The agent is heard by both parties (`agent.barge`; needs `connect`).
    pub async fn barge(&self) -> Result<Value, CallError> {
        self.command(CommandName::Barge, None, COMMAND_TIMEOUT)
            .await
    }

    /// The agent listens and is heard by nobody (`agent.spy`; needs `connect`).
    pub async fn spy(&self) -> Result<Value, CallError> {
        self.command(CommandName::Spy, None, COMMAND_TIMEOUT).await
    }

    /// Ends the call for everyone (`call.disconnect`). Succeeds at once (with `Value::Null`)
    /// if it already ended.
    pub async fn disconnect(&self) -> Result<Value, CallError> {
        if self.state() == CallState::Terminated {
            return Ok(Value::Null);
        }
        self.ending_command(CommandName::Disconnect).await
    }

    /// The agent leaves (`call.close`): after `connect` the two parties stay connected,
    /// otherwise the call ends. A call whose media connection never opened is only marked
    /// terminated here. Succeeds at once (with `Value::Null`) if the call already ended.
    pub async fn close(&self) -> Result<Value, CallError> {
        let state = self.state();
        if state == CallState::Terminated {
            return Ok(Value::Null);
        }
        if state == CallState::New {
            self.finish_locally();
            return Ok(Value::Null);
        }
        self.ending_command(CommandName::Close).await
    }

    /// Queues PCM (s16le mono at the configured rate) for the caller. All or nothing:
    /// [`CallErrorKind::BufferFull`] when it does not fit (nothing was written),
    /// [`CallErrorKind::Closed`] after the call ended. The server pulls the audio at its
    /// playout pace.
    pub async fn send_audio(&self, pcm: &[u8]) -> Result<(), CallError> {
        match self.state() {
            CallState::Terminated => return Err(CallError::new(CallErrorKind::Closed)),
            CallState::Live => {
                if let Some(m) = self.core.media.lock().clone() {
                    return Ok(m.ring.write_all(pcm)?);
                }
            }
            CallState::New | CallState::Opening => {}
        }
        let media = self.media().await?;
        Ok(media.ring.write_all(pcm)?)
    }

    /// Bytes queued for the caller and not yet sent (0 before the media connection opens).
    pub fn send_audio_buffer_size(&self) -> usize {
        self.core.media.lock().as_ref().map_or(0, |m| m.ring.len())
    }

    /// Drops every queued byte and tells the server to drop what it has not played yet
    /// (`agent.interrupt`). Returns the bytes dropped here. Use it when the caller starts
    /// talking over the agent. A server that refuses the interrupt is only logged: the
    /// local audio is gone either way. [`ActiveCall::interrupt`] does the same and also
    /// tells what the caller heard.
    pub async fn clear_send_audio_buffer(&self) -> Result<usize, CallError> {
        let (local, answer) = self.interrupt_with(None).await?;
        match answer {
            Ok(_) => {}
            Err(e) if e.server_code().is_some() => {
                debug!(call_id = %self.core.id, code = ?e.server_code(), "agent.interrupt refused");
            }
            Err(e) => return Err(e),
        }
        Ok(local.bytes)
    }

    /// Places a mark named `name` after the audio queued so far. Once the caller has heard
    /// all of that audio (played to the phone, not merely received by the server), the call's
    /// events get [`CallEvent::Mark`] with `cleared: false`; an interrupt that drops the
    /// audio before it reports it with `cleared: true`. A mark with nothing queued is reached
    /// at once. Every mark gets exactly one event, in the order they were placed (a mark sent
    /// just as the media connection is lost, or outstanding when the call ends, is reported
    /// cleared).
    ///
    /// `name`: 1 to 128 bytes ([`CallErrorKind::InvalidArgument`] otherwise). At most 64
    /// marks are outstanding at once: beyond, [`CallErrorKind::InvalidState`]. Read the call's
    /// [`events`](Self::events): they are dropped when their queue is full.
    ///
    /// ```no_run
    /// # async fn speak(call: telcoflow::ActiveCall, sentences: Vec<Vec<u8>>) -> Result<(), telcoflow::CallError> {
    /// for (i, pcm) in sentences.iter().enumerate() {
    ///     call.send_audio(pcm).await?;
    ///     call.mark(&format!("sentence-{i}")).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn mark(&self, name: &str) -> Result<(), CallError> {
        if self.state() == CallState::Terminated {
            return Err(CallError::new(CallErrorKind::Closed));
        }
        let media = self.media().await?;
        let mark = media.marks.lock().add(name)?;
        let id = mark.id;
        if let Err(e) = media.ring.mark(mark) {
            media.marks.lock().forget(id);
            return Err(e.into());
        }
        Ok(())
    }

    /// Interrupts the agent, as [`ActiveCall::clear_send_audio_buffer`] does, and returns
    /// what the caller heard of its audio since the call began (`played_ms`), what was dropped
    /// here and by the server, and the marks cleared. A refusal by the server is an error
    /// (the local audio is gone either way).
    pub async fn interrupt(&self) -> Result<Interrupted, CallError> {
        self.interrupt_and_report(None).await
    }

    /// [`ActiveCall::interrupt`], with `played_ms` counted from the latest mark named `mark`
    /// the caller reached (0 if this interrupt cleared it): how much of what the agent said
    /// after it was heard. [`Interrupted::since_mark`] is `None` when the server did not know
    /// the mark (never placed, or long past), and `played_ms` then counts from the call's
    /// start.
    pub async fn interrupt_since(&self, mark: &str) -> Result<Interrupted, CallError> {
        self.interrupt_and_report(Some(mark)).await
    }

    async fn interrupt_and_report(&self, since: Option<&str>) -> Result<Interrupted, CallError> {
        let (local, answer) = self.interrupt_with(since).await?;
        let result = answer?;
        Ok(Interrupted::new(result, local))
    }

    /// Clears the ring buffer and sends `agent.interrupt`; reports the marks cleared here
    /// once the server's answer (and its own `call.mark` events, sent before it) are in.
    async fn interrupt_with(
        &self,
        since: Option<&str>,
    ) -> Result<
        (
            crate::ring::Cleared,
            Result<media::InterruptResult, CallError>,
        ),
        CallError,
    > {
        if self.state() == CallState::Terminated {
            return Err(CallError::new(CallErrorKind::Closed));
        }
        let media = self.media().await?;
        let local = media.ring.clear();
        let data = since.and_then(|m| {
            serde_json::to_value(media::InterruptData {
                since_mark: Some(m.to_owned()),
            })
            .ok()
        });
        let answer = self
            .command(CommandName::Interrupt, data, COMMAND_TIMEOUT)
            .await
            .map(|v| serde_json::from_value::<media::InterruptResult>(v).unwrap_or_default());
        let played_ms = answer.as_ref().ok().map(|r| r.played_total_ms);
        {
            let mut marks = media.marks.lock();
            for mark in &local.marks {
                if let Some(name) = marks.finish(mark.id) {
                    emit(
                        &self.core,
                        CallEvent::Mark {
                            name: name.into(),
                            cleared: true,
                            played_ms,
                        },
                    );
                }
            }
        }
        Ok((local, answer))
    }

    /// PCM received on `channel` ([`AudioChannel::Mixed`] = the call; `Caller` and `Callee`
    /// = single legs in isolated mode), as a stream that ends when the call ends. The mixed
    /// channel buffers from the moment the call is created; other channels from the moment
    /// they are asked for. Asking for the same channel again ends the earlier stream. A slow
    /// reader loses chunks, reported as [`CallEvent::AudioOverflow`].
    pub fn audio_stream(&self, channel: AudioChannel) -> AudioStream {
        self.core.channels.lock().stream(channel)
    }

    /// Received audio chunks dropped so far because a channel was not read fast enough.
    pub fn audio_dropped(&self) -> u64 {
        self.core.channels.lock().dropped_total
    }

    /// The call's events (errors, key presses, termination, ...). The first call takes the
    /// stream; later calls get one that ends at once.
    pub fn events(&self) -> CallEvents {
        let rx = self
            .core
            .events_rx
            .lock()
            .take()
            .unwrap_or_else(|| mpsc::channel(1).1);
        CallEvents {
            inner: ReceiverStream::new(rx),
        }
    }

    /// Sends a command and waits for its answer: the result payload on success.
    async fn command(
        &self,
        name: CommandName,
        data: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let media = self.media().await?;
        let command_id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        {
            let mut p = media.pending.lock();
            if p.closed {
                return Err(CallError::new(CallErrorKind::Closed));
            }
            p.map.insert(command_id.clone(), tx);
        }
        let frame = MediaClientFrame::Command(Command {
            command_id: command_id.clone(),
            command: name.as_str().to_owned(),
            timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
            data,
        });
        debug!(call_id = %self.core.id, command = %name, %command_id, "command");
        if media
            .out
            .send(Message::Text(frame.encode().into()))
            .await
            .is_err()
        {
            media.pending.lock().map.remove(&command_id);
            return Err(CallError::new(CallErrorKind::Closed));
        }
        match tokio::time::timeout(timeout + COMMAND_GRACE, rx).await {
            Err(_) => {
                media.pending.lock().map.remove(&command_id);
                Err(CallError::new(CallErrorKind::Timeout))
            }
            Ok(Err(_)) => Err(CallError::new(CallErrorKind::Closed)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(resp))) if resp.success => Ok(resp.result.unwrap_or(Value::Null)),
            Ok(Ok(Ok(resp))) => Err(CallError::from_response(resp)),
        }
    }

    /// Sends a command that ends the call for this agent (`call.disconnect`, `call.close`)
    /// and, once the server accepted it, marks the call terminated here.
    async fn ending_command(&self, name: CommandName) -> Result<Value, CallError> {
        let r = self.command(name, None, COMMAND_TIMEOUT).await?;
        self.finish_locally();
        Ok(r)
    }

    /// Marks the call terminated after a successful `close`/`disconnect`; the server closes
    /// the media connection next.
    fn finish_locally(&self) {
        let changed = set_terminated(&self.core);
        let media = self.core.media.lock().clone();
        match media {
            Some(m) => {
                m.ring.close();
            }
            None => {
                // No media driver will run to end the streams: end them here.
                self.core.channels.lock().finish();
                if changed {
                    emit(&self.core, CallEvent::Terminated { reason: None });
                }
                self.core.events_tx.lock().take();
            }
        }
    }

    /// The open media connection, opening it first if needed.
    async fn media(&self) -> Result<Arc<Media>, CallError> {
        if let Some(m) = self.live_media()? {
            return Ok(m);
        }
        let _guard = self.core.open_lock.lock().await;
        if let Some(m) = self.live_media()? {
            return Ok(m);
        }
        self.core.state.send_replace(CallState::Opening);
        let span = debug_span!("call", call_id = %self.core.id);
        // Boxed: the WebSocket handshake's future is about 11 KB, and inline it would size
        // every future that may open the connection (`send_audio`, `answer`, ...) and so
        // every call's task, for a step taken once per call.
        match Box::pin(driver::open_media(&self.core))
            .instrument(span.clone())
            .await
        {
            Ok(ws) => {
                let (out, out_rx) = mpsc::channel(OUT_QUEUE);
                let media = Arc::new(Media {
                    ring: RingBuffer::new(self.core.settings.buffer_size),
                    out,
                    pending: Mutex::new(Pending::default()),
                    shutdown: AtomicBool::new(false),
                    driver: AtomicWaker::new(),
                    terminated_seen: AtomicBool::new(false),
                    marks: Mutex::new(marks::MarkTracker::default()),
                });
                *self.core.media.lock() = Some(media.clone());
                self.core.state.send_replace(CallState::Live);
                let core = self.core.clone();
                let m = media.clone();
                self.core
                    .tracker
                    .spawn(driver::drive_media(core, m, ws, out_rx).instrument(span));
                Ok(media)
            }
            Err(e) => {
                // Back to NEW so that a retry or a hand-off stays possible, unless the call
                // was ended meanwhile.
                self.core.state.send_if_modified(|st| {
                    let opening = *st == CallState::Opening;
                    if opening {
                        *st = CallState::New;
                    }
                    opening
                });
                Err(CallError::from_client(e.into()))
            }
        }
    }

    fn live_media(&self) -> Result<Option<Arc<Media>>, CallError> {
        match self.state() {
            CallState::Terminated => Err(CallError::new(CallErrorKind::Closed)),
            CallState::Live => Ok(self.core.media.lock().clone()),
            CallState::New | CallState::Opening => Ok(None),
        }
    }
}

/// Moves the call to TERMINATED; true if it was not there yet.
fn set_terminated(core: &CallCore) -> bool {
    core.state.send_if_modified(|s| {
        let changed = *s != CallState::Terminated;
        *s = CallState::Terminated;
        changed
    })
}

fn emit(core: &CallCore, ev: CallEvent) {
    if let Some(tx) = core.events_tx.lock().as_ref() {
        if tx.try_send(ev).is_err() {
            trace!("call event dropped: the call's event queue is full or unread");
        }
    }
}

fn emit_client(core: &CallCore, ev: ClientEvent) {
    if let Some(tx) = core.links.client_events.as_ref().and_then(|w| w.upgrade()) {
        if tx.try_send(ev).is_err() {
            warn!("client event dropped: the event queue is full");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use futures_util::StreamExt;
    use serde_json::Map;

    fn config() -> TelcoflowClientConfig {
        TelcoflowClientConfig::local("k", "u").unwrap()
    }

    #[tokio::test]
    async fn close_of_a_new_call_is_local() {
        let call = ActiveCall::from_json(
            r#"{"channel":"TELCO","id":"c","caller":"a","callee":"b","session_url":"ws://127.0.0.1:9/x","session_token":"t"}"#,
            &config(),
        )
        .unwrap();
        let mut audio = call.audio_stream(AudioChannel::Mixed);
        let mut states = call.watch_state();
        assert_eq!(states.current(), CallState::New);
        assert_eq!(call.close().await.unwrap(), Value::Null);
        assert_eq!(call.state(), CallState::Terminated);
        assert_eq!(states.changed().await, Some(CallState::Terminated));
        assert_eq!(states.changed().await, None, "nothing follows TERMINATED");
        let mut fresh = call.watch_state();
        assert_eq!(
            fresh.wait_for(|s| s == CallState::Terminated).await,
            Some(CallState::Terminated)
        );
        assert_eq!(
            fresh.wait_for(|s| s == CallState::Live).await,
            None,
            "a terminated call never goes live"
        );
        assert_eq!(
            call.to_json().unwrap_err().kind(),
            CallErrorKind::InvalidState
        );
        assert!(call.answer().await.unwrap_err().is_closed());
        assert!(call.send_audio(&[0, 0]).await.unwrap_err().is_closed());
        assert!(audio.next().await.is_none());
        call.terminated().await;
    }

    #[tokio::test]
    async fn connect_validates_ring_time() {
        let call = ActiveCall::from_json(
            r#"{"id":"c","caller":"a","callee":"b","session_url":"ws://127.0.0.1:9/x","session_token":"t"}"#,
            &config(),
        )
        .unwrap();
        for bad in [
            Duration::ZERO,
            Duration::from_secs(121),
            Duration::from_millis(1500),
        ] {
            let e = call.connect(bad).await.unwrap_err();
            assert_eq!(e.kind(), CallErrorKind::InvalidArgument);
            assert!(e.to_string().contains("ring_time"), "{e}");
        }
        assert_eq!(call.state(), CallState::New);
    }

    #[test]
    fn wire_events_map_to_variants() {
        let ev = CallEvent::from_wire(media::CallEvent::dtmf('7', 80));
        assert_eq!(
            ev,
            CallEvent::Dtmf {
                digit: "7".into(),
                duration_ms: 80
            }
        );
        let ev = CallEvent::from_wire(media::CallEvent::error(ErrorCode::InternalError, "x"));
        assert!(
            matches!(ev, CallEvent::Error { code: Some(c), .. } if c == ErrorCode::InternalError)
        );
        let ev = CallEvent::from_wire(media::CallEvent {
            event: "call.connected_leg".into(),
            fields: Map::new(),
        });
        assert!(matches!(ev, CallEvent::Other { name, .. } if name == "call.connected_leg"));
    }

    #[test]
    fn audio_channels_are_their_wire_numbers() {
        for id in 0..=u8::MAX {
            assert_eq!(AudioChannel::from(id).id(), id);
        }
        assert_eq!(AudioChannel::Other(2), AudioChannel::Callee);
        assert_eq!(AudioChannel::default(), AudioChannel::Mixed);
    }
}
