//! [`ActiveCall`]: one phone call, its commands, its audio and its media connection.
//!
//! The media connection is one WebSocket per call. A driver task owns it: it reads audio and
//! events, answers the server's `buffer_request`s from the call's [`RingBuffer`] (pull-based
//! flow control) and writes commands. The [`ActiveCall`] handle talks to it through a bounded
//! queue and shared state.

use crate::Error;
use crate::config::TelcoflowClientConfig;
use crate::event::ClientEvent;
use crate::ring::RingBuffer;
use crate::transport::{self, OpenError, Tls, Ws};
use bytes::{BufMut, Bytes};
use futures_util::task::AtomicWaker;
use futures_util::{SinkExt, Stream, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use telcoflow_proto::media::{
    self, AudioFrame, BufferRequest, Command, CommandName, CommandResponse, ConnectData,
    MediaClientFrame, MediaServerFrame,
};
use telcoflow_proto::pool::FramePool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{Instrument, debug, debug_span, trace, warn};

/// Client-side deadline of every command but `call.connect`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than the server's deadline the client waits for a command response.
const COMMAND_GRACE: Duration = Duration::from_secs(5);
/// Frames queued towards the media WebSocket (commands and audio).
const OUT_QUEUE: usize = 32;
/// Buffer requests kept in order before further ones are merged into the last one.
const MAX_QUEUED_REQUESTS: usize = 256;
/// Call events buffered for the application before further ones are dropped (and logged).
const CALL_EVENT_CAPACITY: usize = 64;
/// How long the media connection keeps reading after the call ended (`call.terminated`,
/// `close`, `disconnect`) while waiting for the server to close it: frames already in flight,
/// such as the server's `call.terminated` or answers to concurrent commands, still land, and
/// a server that never closes cannot hold the connection open.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a media connection that was lost (not closed) is tried again: the server keeps a
/// call waiting for its agent for 10 s.
const MEDIA_RECONNECT_WINDOW: Duration = Duration::from_secs(9);
/// First pause between two attempts to bring a lost media connection back; it doubles up to
/// [`MEDIA_RECONNECT_MAX_DELAY`].
const MEDIA_RECONNECT_DELAY: Duration = Duration::from_millis(50);
const MEDIA_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

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

/// The outcome of a command the server answered, or timed out on its side.
///
/// Operational failures (`success: false`, e.g. `CALL_UNANSWERED`, or `TIMEOUT` from the
/// server) are results, not errors; a closed call or a lost connection is an [`Error`].
#[derive(Debug, Clone, PartialEq)]
pub struct CommandResult {
    /// Whether the command succeeded.
    pub success: bool,
    /// The server's error code on failure.
    pub error_code: Option<String>,
    /// The server's message on failure.
    pub error_message: Option<String>,
    /// The result payload on success.
    pub payload: Option<Value>,
}

impl CommandResult {
    fn ok() -> Self {
        Self {
            success: true,
            error_code: None,
            error_message: None,
            payload: None,
        }
    }

    /// The payload on success, [`Error::CommandFailed`] otherwise.
    pub fn into_result(self) -> Result<Option<Value>, Error> {
        if self.success {
            Ok(self.payload)
        } else {
            Err(Error::CommandFailed {
                code: self.error_code.unwrap_or_default(),
                message: self.error_message.unwrap_or_default(),
            })
        }
    }
}

impl From<CommandResponse> for CommandResult {
    fn from(r: CommandResponse) -> Self {
        Self {
            success: r.success,
            error_code: r.error_code,
            error_message: r.error_message,
            payload: r.result,
        }
    }
}

/// Something that happened on a call, from [`ActiveCall::events`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CallEvent {
    /// The call ended (`reason` as the server gave it, if any).
    Terminated {
        /// E.g. `caller_hangup`.
        reason: Option<String>,
    },
    /// Something failed on the call; it may go on.
    Error {
        /// E.g. `TTS_SESSION_ERROR`.
        code: Option<String>,
        /// The server's message.
        message: Option<String>,
    },
    /// The caller pressed a key.
    Dtmf {
        /// The key (`0`-`9`, `*`, `#`, `A`-`D`).
        digit: String,
        /// How long it was held.
        duration_ms: u32,
    },
    /// The media connection was lost and has been opened again: audio and commands go on.
    /// Commands that were waiting for an answer when it was lost failed with
    /// [`Error::Connection`] (their outcome is unknown). A connection that cannot be brought
    /// back within about 9 s ends the call.
    MediaReconnected,
    /// Received audio was dropped because the application did not read a channel fast enough.
    AudioOverflow {
        /// The channel.
        channel: u8,
        /// Chunks dropped on this call so far.
        dropped: u64,
    },
    /// An event this SDK has no variant for.
    Other {
        /// The event name.
        name: String,
        /// Its other fields.
        fields: Map<String, Value>,
    },
}

impl CallEvent {
    fn from_wire(ev: media::CallEvent) -> Self {
        let str_field = |n: &str| ev.fields.get(n).and_then(Value::as_str).map(str::to_owned);
        match ev.event.as_str() {
            media::CallEvent::TERMINATED => Self::Terminated {
                reason: str_field("reason"),
            },
            media::CallEvent::ERROR => Self::Error {
                code: str_field("error_code"),
                message: str_field("error_message"),
            },
            media::CallEvent::DTMF => {
                let digit = str_field("digit");
                let duration = ev.fields.get("duration_ms").and_then(Value::as_u64);
                match (digit, duration) {
                    (Some(digit), Some(d)) => Self::Dtmf {
                        digit,
                        duration_ms: u32::try_from(d).unwrap_or(u32::MAX),
                    },
                    _ => Self::Other {
                        name: ev.event,
                        fields: ev.fields,
                    },
                }
            }
            _ => Self::Other {
                name: ev.event,
                fields: ev.fields,
            },
        }
    }
}

/// The JSON a NEW call is handed over in; the keys are the reference client's.
#[derive(Serialize, Deserialize)]
struct HandOff {
    #[serde(default = "telco")]
    channel: String,
    id: String,
    caller: String,
    callee: String,
    session_url: String,
    session_token: String,
}

fn telco() -> String {
    "TELCO".into()
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
/// ```no_run
/// use futures_util::StreamExt;
/// use telcoflow::{ActiveCall, Error};
///
/// async fn echo(call: ActiveCall) -> Result<(), Error> {
///     call.answer().await?.into_result()?;
///     let mut audio = call.audio_stream(0);
///     while let Some(chunk) = audio.next().await {
///         // Play the caller's own voice back; a full buffer just drops this chunk.
///         match call.send_audio(&chunk).await {
///             Ok(()) | Err(Error::BufferFull { .. }) => {}
///             Err(e) => return Err(e),
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

struct Channels {
    slots: HashMap<u8, ChannelSlot>,
    /// The media connection has ended: new streams end at once.
    finished: bool,
    dropped_total: u64,
}

impl Channels {
    /// Ends every stream: handed-out streams end after what they hold; a stream not handed
    /// out yet keeps its buffered audio for a later `audio_stream`.
    fn finish(&mut self) {
        self.finished = true;
        self.slots.retain(|_, slot| slot.rx.is_some());
        for slot in self.slots.values_mut() {
            slot.tx = None;
        }
    }
}

struct ChannelSlot {
    /// `None` once the call has ended, which ends the stream after what it holds.
    tx: Option<mpsc::Sender<Bytes>>,
    /// Receiver not handed out yet (channel 0 buffers from the start).
    rx: Option<mpsc::Receiver<Bytes>>,
    overflowing: bool,
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
}

#[derive(Default)]
struct Pending {
    map: HashMap<String, oneshot::Sender<Result<CommandResponse, Error>>>,
    closed: bool,
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
        let (tx0, rx0) = mpsc::channel(settings.audio_channel_capacity);
        let mut slots = HashMap::new();
        slots.insert(
            media::CHANNEL_MIXED,
            ChannelSlot {
                tx: Some(tx0),
                rx: Some(rx0),
                overflowing: false,
            },
        );
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
            channels: Mutex::new(Channels {
                slots,
                finished: false,
                dropped_total: 0,
            }),
            events_tx: Mutex::new(Some(events_tx)),
            events_rx: Mutex::new(Some(events_rx)),
            tracker,
        });
        Self {
            core,
            _guard: Arc::new(cancel.drop_guard()),
        }
    }

    /// Rebuilds a NEW call from [`ActiveCall::to_json`] output, using this process's audio
    /// settings. The media connection is not opened until the first command or send.
    pub fn from_json(json: &str, config: &TelcoflowClientConfig) -> Result<Self, Error> {
        let h: HandOff = serde_json::from_str(json)
            .map_err(|e| Error::Protocol(format!("invalid call JSON: {e}")))?;
        if h.channel != "TELCO" {
            return Err(Error::Protocol(format!(
                "channel {} is not a call",
                h.channel
            )));
        }
        Ok(Self::new(
            CallParams {
                id: h.id,
                session_id: None,
                caller: h.caller,
                callee: h.callee,
                url: h.session_url,
                token: h.session_token,
            },
            config.into(),
            CallLinks::default(),
        ))
    }

    /// Serialises a NEW call (keys `channel`, `id`, `caller`, `callee`, `session_url`,
    /// `session_token`) so that another process can take it over with
    /// [`ActiveCall::from_json`]. The JSON holds the media token: treat it as a secret.
    ///
    /// Fails with [`Error::InvalidState`] once the media connection is opening or open.
    pub fn to_json(&self) -> Result<String, Error> {
        let state = self.state();
        if state != CallState::New {
            return Err(Error::InvalidState(format!(
                "to_json needs a NEW call, this one is {state:?}"
            )));
        }
        let h = HandOff {
            channel: telco(),
            id: self.core.id.clone(),
            caller: self.core.caller.clone(),
            callee: self.core.callee.clone(),
            session_url: self.core.url.clone(),
            session_token: self.core.token.clone(),
        };
        serde_json::to_string(&h).map_err(|e| Error::Protocol(e.to_string()))
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

    /// A receiver that sees every state change.
    pub fn watch_state(&self) -> watch::Receiver<CallState> {
        self.core.state.subscribe()
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
    pub async fn connect_media(&self) -> Result<(), Error> {
        self.media().await.map(drop)
    }

    /// Picks the call up (`call.answer`, 10 s).
    pub async fn answer(&self) -> Result<CommandResult, Error> {
        self.command(CommandName::Answer, None, COMMAND_TIMEOUT)
            .await
    }

    /// Rings the call's configured destination for `ring_time` (1..=120 s, whole seconds) and
    /// bridges it in (`call.connect`). An unanswered destination gives a result with
    /// `error_code` `CALL_UNANSWERED`.
    pub async fn connect(&self, ring_time: Duration) -> Result<CommandResult, Error> {
        let secs = u32::try_from(ring_time.as_secs()).unwrap_or(u32::MAX);
        if !media::RING_TIME_RANGE.contains(&secs) || ring_time.subsec_nanos() != 0 {
            return Err(Error::config(
                "ring_time",
                format!("{ring_time:?} is not a whole number of seconds in 1..=120"),
            ));
        }
        let data = serde_json::to_value(ConnectData {
            ring_time_seconds: secs,
        })
        .ok();
        self.command(CommandName::Connect, data, ring_time).await
    }

    /// The agent is heard by the connected party only (`agent.whisper`; needs `connect`).
    pub async fn whisper(&self) -> Result<CommandResult, Error> {
        self.command(CommandName::Whisper, None, COMMAND_TIMEOUT)
            .await
    }

    /// The agent is heard by both parties (`agent.barge`; needs `connect`).
    pub async fn barge(&self) -> Result<CommandResult, Error> {
        self.command(CommandName::Barge, None, COMMAND_TIMEOUT)
            .await
    }

    /// The agent listens and is heard by nobody (`agent.spy`; needs `connect`).
    pub async fn spy(&self) -> Result<CommandResult, Error> {
        self.command(CommandName::Spy, None, COMMAND_TIMEOUT).await
    }

    /// Ends the call for everyone (`call.disconnect`). Succeeds at once if it already ended.
    pub async fn disconnect(&self) -> Result<CommandResult, Error> {
        if self.state() == CallState::Terminated {
            return Ok(CommandResult::ok());
        }
        let r = self
            .command(CommandName::Disconnect, None, COMMAND_TIMEOUT)
            .await?;
        if r.success {
            self.finish_locally();
        }
        Ok(r)
    }

    /// The agent leaves (`call.close`): after `connect` the two parties stay connected,
    /// otherwise the call ends. A call whose media connection never opened is only marked
    /// terminated here. Succeeds at once if the call already ended.
    pub async fn close(&self) -> Result<CommandResult, Error> {
        let state = self.state();
        if state == CallState::Terminated {
            return Ok(CommandResult::ok());
        }
        if state == CallState::New {
            self.finish_locally();
            return Ok(CommandResult::ok());
        }
        let r = self
            .command(CommandName::Close, None, COMMAND_TIMEOUT)
            .await?;
        if r.success {
            self.finish_locally();
        }
        Ok(r)
    }

    /// Queues PCM (s16le mono at the configured rate) for the caller. All or nothing:
    /// [`Error::BufferFull`] when it does not fit, [`Error::BufferClosed`] after the call ended.
    /// The server pulls the audio at its playout pace.
    pub async fn send_audio(&self, pcm: &[u8]) -> Result<(), Error> {
        match self.state() {
            CallState::Terminated => return Err(Error::BufferClosed),
            CallState::Live => {
                if let Some(m) = self.core.media.lock().clone() {
                    return m.ring.write_all(pcm);
                }
            }
            CallState::New | CallState::Opening => {}
        }
        let media = self.media().await.map_err(|e| match e {
            Error::CallClosed => Error::BufferClosed,
            e => e,
        })?;
        media.ring.write_all(pcm)
    }

    /// Bytes queued for the caller and not yet sent (0 before the media connection opens).
    pub fn send_audio_buffer_size(&self) -> usize {
        self.core.media.lock().as_ref().map_or(0, |m| m.ring.len())
    }

    /// Drops every queued byte and tells the server to drop what it has not played yet
    /// (`agent.interrupt`). Returns the bytes dropped here. Use it when the caller starts
    /// talking over the agent.
    pub async fn clear_send_audio_buffer(&self) -> Result<usize, Error> {
        if self.state() == CallState::Terminated {
            return Err(Error::CallClosed);
        }
        let media = self.media().await?;
        let dropped = media.ring.clear();
        let r = self
            .command(CommandName::Interrupt, None, COMMAND_TIMEOUT)
            .await?;
        if !r.success {
            debug!(call_id = %self.core.id, code = ?r.error_code, "agent.interrupt refused");
        }
        Ok(dropped)
    }

    /// PCM received on `channel` (0 = the call mixed; 1, 2 = single legs in isolated mode),
    /// as a stream that ends when the call ends. Channel 0 buffers from the moment the call
    /// is created; other channels from the moment they are asked for. Asking for the same
    /// channel again ends the earlier stream. A slow reader loses chunks, reported as
    /// [`CallEvent::AudioOverflow`].
    pub fn audio_stream(&self, channel: u8) -> AudioStream {
        let mut ch = self.core.channels.lock();
        if let Some(slot) = ch.slots.get_mut(&channel) {
            if let Some(rx) = slot.rx.take() {
                return AudioStream {
                    inner: ReceiverStream::new(rx),
                };
            }
        }
        if ch.finished {
            let (_, rx) = mpsc::channel(1);
            return AudioStream {
                inner: ReceiverStream::new(rx),
            };
        }
        let (tx, rx) = mpsc::channel(self.core.settings.audio_channel_capacity);
        ch.slots.insert(
            channel,
            ChannelSlot {
                tx: Some(tx),
                rx: None,
                overflowing: false,
            },
        );
        AudioStream {
            inner: ReceiverStream::new(rx),
        }
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

    async fn command(
        &self,
        name: CommandName,
        data: Option<Value>,
        timeout: Duration,
    ) -> Result<CommandResult, Error> {
        let media = self.media().await?;
        let command_id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        {
            let mut p = media.pending.lock();
            if p.closed {
                return Err(Error::CallClosed);
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
            return Err(Error::CallClosed);
        }
        match tokio::time::timeout(timeout + COMMAND_GRACE, rx).await {
            Err(_) => {
                media.pending.lock().map.remove(&command_id);
                Err(Error::CommandTimeout)
            }
            Ok(Err(_)) => Err(Error::CallClosed),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(resp))) => Ok(resp.into()),
        }
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
    async fn media(&self) -> Result<Arc<Media>, Error> {
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
        match Box::pin(open_media(&self.core))
            .instrument(span.clone())
            .await
            .map_err(Error::from)
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
                });
                *self.core.media.lock() = Some(media.clone());
                self.core.state.send_replace(CallState::Live);
                let core = self.core.clone();
                let m = media.clone();
                self.core
                    .tracker
                    .spawn(drive_media(core, m, ws, out_rx).instrument(span));
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
                Err(e)
            }
        }
    }

    fn live_media(&self) -> Result<Option<Arc<Media>>, Error> {
        match self.state() {
            CallState::Terminated => Err(Error::CallClosed),
            CallState::Live => Ok(self.core.media.lock().clone()),
            CallState::New | CallState::Opening => Ok(None),
        }
    }
}

async fn open_media(core: &CallCore) -> Result<Ws, OpenError> {
    if core.cancel.is_cancelled() {
        return Err(OpenError::Failed(Error::Shutdown));
    }
    let mut req = transport::request(&core.url).map_err(OpenError::Failed)?;
    transport::add_secret(&mut req, "authorization", &format!("Bearer {}", core.token))
        .map_err(OpenError::Failed)?;
    debug!("opening media connection");
    tokio::select! {
        r = transport::try_connect(req, &core.settings.tls, core.settings.connect_timeout) => r,
        () = core.cancel.cancelled() => Err(OpenError::Failed(Error::Shutdown)),
    }
}

/// Opens the media connection again after it was lost, while the server keeps the call
/// waiting for its agent: same URL and token, attempts spaced out from
/// [`MEDIA_RECONNECT_DELAY`] to [`MEDIA_RECONNECT_MAX_DELAY`]. `None` once the call has ended,
/// the client shuts down, the server refuses for any other reason than the old connection
/// still being attached (409), or [`MEDIA_RECONNECT_WINDOW`] has passed.
async fn reopen_media(core: &CallCore, media: &Media) -> Option<Ws> {
    let deadline = tokio::time::Instant::now() + MEDIA_RECONNECT_WINDOW;
    let mut delay = MEDIA_RECONNECT_DELAY;
    loop {
        if media.ring.is_closed() || media.shutdown.load(Ordering::Acquire) {
            return None;
        }
        match tokio::time::timeout_at(deadline, open_media(core)).await {
            Err(_) => return None,
            Ok(Ok(ws)) => return Some(ws),
            // The server has not seen the loss yet.
            Ok(Err(OpenError::Refused(StatusCode::CONFLICT, _))) => {}
            Ok(Err(OpenError::Refused(status, body))) => {
                debug!(%status, body, "media connection refused; the call cannot come back");
                return None;
            }
            Ok(Err(OpenError::Failed(Error::Shutdown))) => return None,
            Ok(Err(OpenError::Failed(e))) => debug!(error = %e, "media connection not back yet"),
        }
        let next = tokio::time::Instant::now() + delay;
        if next >= deadline {
            return None;
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = core.cancel.cancelled() => return None,
        }
        delay = (delay * 2).min(MEDIA_RECONNECT_MAX_DELAY);
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

/// Owns the media WebSocket until it closes, the call ends or the client shuts down.
async fn drive_media(
    core: Arc<CallCore>,
    media: Arc<Media>,
    mut ws: Ws,
    mut out_rx: mpsc::Receiver<Message>,
) {
    debug!("media connection open");
    // Shutdown reaches the driver as a flag and a wake-up: polling the token's waiter on each
    // of the driver's polls would take two locks per frame.
    let _watcher = AbortOnDropHandle::new(tokio::spawn({
        let cancel = core.cancel.clone();
        let media = media.clone();
        async move {
            cancel.cancelled().await;
            media.shutdown.store(true, Ordering::Release);
            media.driver.wake();
        }
    }));
    let mut flow = FlowControl::new(media.ring.capacity());
    let reason = loop {
        let ended = {
            let grace = std::pin::pin!(tokio::time::sleep(CLOSE_GRACE));
            let mut driver = MediaDriver {
                core: &core,
                media: &media,
                ws: &mut ws,
                out_rx: &mut out_rx,
                flow: &mut flow,
                grace,
                call_live: true,
                flushing: false,
            };
            std::future::poll_fn(|cx| driver.poll(cx)).await
        };
        let reason = match ended {
            Ended::Done(reason) => break reason,
            Ended::Lost(reason) => reason,
        };
        debug!(reason, "media connection lost; bringing it back");
        // What was on its way over the lost connection has an unknown outcome.
        fail_commands(&media, &mut out_rx, || {
            Error::connection("the media connection was lost before the command was answered")
        });
        match reopen_media(&core, &media).await {
            Some(reopened) => {
                debug!("media connection back");
                ws = reopened;
                // The server asks for audio again on the new connection.
                flow.forget_requests();
                emit(&core, CallEvent::MediaReconnected);
            }
            None => break reason,
        }
    };
    debug!(reason, "media connection closing");
    // Commands sent from now on fail at once.
    drop(out_rx);
    set_terminated(&core);
    media.ring.close();
    {
        let mut p = media.pending.lock();
        p.closed = true;
        for (_, tx) in p.map.drain() {
            let _ = tx.send(Err(Error::CallClosed));
        }
    }
    core.channels.lock().finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    // The server's own `call.terminated` (with its reason) was already delivered if it came;
    // otherwise the stream still ends with one.
    if !media.terminated_seen.load(Ordering::Acquire) {
        emit(&core, CallEvent::Terminated { reason: None });
    }
    core.events_tx.lock().take();
}

/// How a media connection ended, with the reason for the log.
enum Ended {
    /// For good: closed by either side, the call over, or the client shutting down.
    Done(&'static str),
    /// Lost: a transport error, or the connection ended without a close frame. The server
    /// keeps the call waiting for its agent for a while.
    Lost(&'static str),
}

/// The media connection's reader and writer, polled as one future by one task: the socket
/// is not split (no lock between the halves), and the writer needs no wake-up for the
/// server's buffer requests, because they come in through the reader, which runs first in
/// every poll.
struct MediaDriver<'a> {
    core: &'a CallCore,
    media: &'a Media,
    ws: &'a mut Ws,
    out_rx: &'a mut mpsc::Receiver<Message>,
    flow: &'a mut FlowControl,
    /// Armed once the call has ended (the ring buffer closed): commands still go out (a
    /// `close` sent last), and the reader goes on until the server closes the connection, for
    /// at most this long.
    grace: Pin<&'a mut tokio::time::Sleep>,
    call_live: bool,
    /// A frame was handed to the socket and is not flushed yet.
    flushing: bool,
}

impl MediaDriver<'_> {
    /// Ready once the connection ends, with how.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        self.media.driver.register(cx.waker());
        if self.media.shutdown.load(Ordering::Acquire) {
            return Poll::Ready(Ended::Done("shutdown"));
        }
        // Reader first: frames that have arrived are handled, and their buffer requests
        // queued, before the writer looks and before the grace period can end the connection.
        loop {
            let msg = match self.ws.poll_next_unpin(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => return Poll::Ready(Ended::Done("closed by server")),
                Poll::Ready(Some(Err(e))) => {
                    debug!(error = %e, "media connection failed");
                    return Poll::Ready(Ended::Lost("connection error"));
                }
                Poll::Ready(Some(Ok(msg))) => msg,
            };
            match msg {
                Message::Binary(data) => on_audio(self.core, data),
                // After `call.terminated` keep reading until the server closes, so that
                // frames already sent still land.
                Message::Text(text) => on_text(self.core, self.media, self.flow, &text),
                Message::Close(_) => return Poll::Ready(Ended::Done("closed by server")),
                _ => {}
            }
        }
        self.poll_write(cx)
    }

    /// Sends what is due, commands first, until nothing is or the socket is full. Audio
    /// frames go straight from the ring buffer to the socket.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        loop {
            if self.flushing {
                match self.ws.poll_flush_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        debug!(error = %e, "media send failed");
                        return Poll::Ready(Ended::Lost("send failed"));
                    }
                    Poll::Ready(Ok(())) => self.flushing = false,
                }
            }
            match self.ws.poll_ready_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "media send failed");
                    return Poll::Ready(Ended::Lost("send failed"));
                }
                Poll::Ready(Ok(())) => {}
            }
            let msg = match self.out_rx.poll_recv(cx) {
                Poll::Ready(Some(m)) => m,
                // Every sender is gone: nothing can be sent any more.
                Poll::Ready(None) => return Poll::Ready(Ended::Done("command queue closed")),
                Poll::Pending if self.call_live => {
                    match self.flow.poll_next_frame(cx, &self.media.ring) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(frame)) => Message::Binary(frame),
                        Poll::Ready(None) => {
                            debug!(
                                "call ended; waiting for the server to close the media connection"
                            );
                            self.call_live = false;
                            let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
                            self.grace.as_mut().reset(deadline);
                            continue;
                        }
                    }
                }
                Poll::Pending => {
                    return match self.grace.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            Poll::Ready(Ended::Done("server did not close after the call ended"))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            };
            if let Err(e) = self.ws.start_send_unpin(msg) {
                debug!(error = %e, "media send failed");
                return Poll::Ready(Ended::Lost("send failed"));
            }
            self.flushing = true;
        }
    }
}

/// Fails every command waiting for an answer, and drops those not sent yet, with `error`.
fn fail_commands(media: &Media, out_rx: &mut mpsc::Receiver<Message>, error: impl Fn() -> Error) {
    while out_rx.try_recv().is_ok() {}
    for (_, tx) in media.pending.lock().map.drain() {
        let _ = tx.send(Err(error()));
    }
}

/// Handles one text frame.
fn on_text(core: &CallCore, media: &Media, flow: &mut FlowControl, text: &str) {
    let frame = match MediaServerFrame::decode(text) {
        Ok(f) => f,
        Err(e) => {
            debug!(error = %e, "ignoring undecodable media frame");
            return;
        }
    };
    match frame {
        MediaServerFrame::CommandResponse(resp) => {
            debug!(command_id = %resp.command_id, success = resp.success, code = ?resp.error_code, "command response");
            if let Some(tx) = media.pending.lock().map.remove(&resp.command_id) {
                let _ = tx.send(Ok(resp));
            }
        }
        MediaServerFrame::BufferRequest(req) => {
            trace!(
                requested = req.requested_bytes,
                frame = req.prefer_audio_frame_bytes,
                channel = req.channel_id,
                "buffer request"
            );
            if req.channel_id != media::CHANNEL_MIXED || req.requested_bytes == 0 {
                // Only channel 0 carries agent audio.
                return;
            }
            flow.request(req);
        }
        MediaServerFrame::CallEvent(ev) => {
            let ev = CallEvent::from_wire(ev);
            debug!(event = ?ev, "call event");
            let ended = matches!(ev, CallEvent::Terminated { .. });
            if let CallEvent::Error { code, message } = &ev {
                emit_client(
                    core,
                    ClientEvent::CallError {
                        call_id: core.id.clone(),
                        code: code.clone(),
                        message: message.clone(),
                    },
                );
            }
            if ended {
                media.terminated_seen.store(true, Ordering::Release);
                set_terminated(core);
                media.ring.close();
            }
            emit(core, ev);
        }
    }
}

fn on_audio(core: &CallCore, data: Bytes) {
    let frame = match AudioFrame::decode(&data) {
        Ok(f) => f,
        Err(_) => return,
    };
    let channel = frame.channel;
    let mut ch = core.channels.lock();
    let Some(slot) = ch.slots.get_mut(&channel) else {
        return;
    };
    let Some(tx) = slot.tx.as_ref() else {
        return;
    };
    match tx.try_send(data.slice(1..)) {
        Ok(()) => slot.overflowing = false,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            ch.slots.remove(&channel);
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            let first = !slot.overflowing;
            slot.overflowing = true;
            ch.dropped_total += 1;
            let dropped = ch.dropped_total;
            drop(ch);
            if first {
                // Report once per overflow episode, not per chunk.
                warn!(
                    channel,
                    dropped, "received audio dropped: channel not read fast enough"
                );
                emit(core, CallEvent::AudioOverflow { channel, dropped });
                emit_client(
                    core,
                    ClientEvent::AudioOverflow {
                        call_id: core.id.clone(),
                        channel,
                        dropped,
                    },
                );
            }
        }
    }
}

/// Bytes of one block of the outgoing frames' [`FramePool`]: two frames of 20 ms at 24 kHz, six at 8 kHz. Small,
/// because both blocks of every call stay resident: larger blocks cost agent memory per call
/// and save nothing once the two blocks take turns.
const FRAME_POOL_BYTES: usize = 2 * 1024;

/// Answers buffer requests in order with frames of the preferred size, each frame waiting for
/// the application's audio.
struct FlowControl {
    /// The server's requests not begun yet, oldest first.
    requests: VecDeque<BufferRequest>,
    pool: FramePool,
    /// A frame never exceeds the ring buffer, whatever the server asks for: the buffer could
    /// never fill it, and a hostile size must not drive the allocation below.
    max_frame: usize,
    /// Bytes still owed on the request being answered.
    owed: usize,
    /// Its preferred frame size.
    frame_bytes: usize,
}

impl FlowControl {
    fn new(ring_capacity: usize) -> Self {
        Self {
            requests: VecDeque::new(),
            pool: FramePool::default(),
            max_frame: ring_capacity,
            owed: 0,
            frame_bytes: media::DEFAULT_PREFER_FRAME_BYTES,
        }
    }

    /// Drops the requests of a connection that is gone, and what was owed on them.
    fn forget_requests(&mut self) {
        self.requests.clear();
        self.owed = 0;
    }

    /// Queues one of the server's requests.
    fn request(&mut self, req: BufferRequest) {
        let full = self.requests.len() >= MAX_QUEUED_REQUESTS;
        match self.requests.back_mut() {
            // Past the cap, merge into the last request so the queue stays bounded; the
            // bytes owed are the same, only frame boundaries may differ.
            Some(last) if full => {
                last.requested_bytes = last.requested_bytes.saturating_add(req.requested_bytes);
            }
            _ => self.requests.push_back(req),
        }
    }

    /// The next frame to send, once the server has asked for it and the application has
    /// queued it; `None` once the ring buffer is closed (the call ended).
    ///
    /// Waiting for a request needs no wake-up for the request itself: requests come in through
    /// the driver's reader, which runs before this in every poll. It waits on the ring buffer
    /// only to learn that it closed. Audio is taken from the ring buffer only in the poll that
    /// returns it.
    fn poll_next_frame(&mut self, cx: &mut Context<'_>, ring: &RingBuffer) -> Poll<Option<Bytes>> {
        while self.owed == 0 {
            match self.requests.pop_front() {
                Some(req) => {
                    self.owed = req.requested_bytes as usize;
                    self.frame_bytes = match req.prefer_audio_frame_bytes as usize {
                        0 => media::DEFAULT_PREFER_FRAME_BYTES,
                        n => n,
                    };
                }
                None => return ring.poll_closed(cx).map(|()| None),
            }
        }
        let want = self.frame_bytes.min(self.owed).min(self.max_frame);
        let block = self.pool.with_room(1 + want, FRAME_POOL_BYTES);
        // A poll that found too little audio left its channel byte behind.
        block.clear();
        block.put_u8(media::CHANNEL_MIXED);
        let n = std::task::ready!(ring.poll_read(cx, want, want, block));
        if n == 0 {
            return Poll::Ready(None);
        }
        trace!(bytes = n, "audio frame");
        self.owed -= n;
        Poll::Ready(Some(block.split().freeze()))
    }
}

/// PCM chunks of one channel of a call; ends when the call ends.
#[derive(Debug)]
pub struct AudioStream {
    inner: ReceiverStream<Bytes>,
}

impl Stream for AudioStream {
    type Item = Bytes;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The events of one call; ends when the call ends.
#[derive(Debug)]
pub struct CallEvents {
    inner: ReceiverStream<CallEvent>,
}

impl Stream for CallEvents {
    type Item = CallEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<CallEvent>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TelcoflowClientConfig {
        TelcoflowClientConfig::local("k", "u").unwrap()
    }

    #[test]
    fn json_hand_off_keeps_reference_keys() {
        let call = ActiveCall::new(
            CallParams {
                id: "c1".into(),
                session_id: Some("s1".into()),
                caller: "+1".into(),
                callee: "+2".into(),
                url: "ws://h/v1/agent/media/c1".into(),
                token: "tok".into(),
            },
            (&config()).into(),
            CallLinks::default(),
        );
        let json = call.to_json().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel":"TELCO","id":"c1","caller":"+1","callee":"+2",
                "session_url":"ws://h/v1/agent/media/c1","session_token":"tok"})
        );
        let back = ActiveCall::from_json(&json, &config()).unwrap();
        assert_eq!(
            (back.id(), back.caller(), back.callee()),
            ("c1", "+1", "+2")
        );
        assert_eq!(back.state(), CallState::New);
        assert!(!format!("{back:?}").contains("tok"));
        assert!(ActiveCall::from_json("{}", &config()).is_err());
    }

    #[tokio::test]
    async fn close_of_a_new_call_is_local() {
        let call = ActiveCall::from_json(
            r#"{"channel":"TELCO","id":"c","caller":"a","callee":"b","session_url":"ws://127.0.0.1:9/x","session_token":"t"}"#,
            &config(),
        )
        .unwrap();
        let mut audio = call.audio_stream(0);
        assert!(call.close().await.unwrap().success);
        assert_eq!(call.state(), CallState::Terminated);
        assert!(call.to_json().is_err());
        assert!(matches!(call.answer().await, Err(Error::CallClosed)));
        assert!(matches!(
            call.send_audio(&[0, 0]).await,
            Err(Error::BufferClosed)
        ));
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
            assert!(matches!(
                call.connect(bad).await,
                Err(Error::InvalidConfig {
                    field: "ring_time",
                    ..
                })
            ));
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
        let ev = CallEvent::from_wire(media::CallEvent::error(
            telcoflow_proto::ErrorCode::InternalError,
            "x",
        ));
        assert!(matches!(ev, CallEvent::Error { code: Some(c), .. } if c == "INTERNAL_ERROR"));
        let ev = CallEvent::from_wire(media::CallEvent {
            event: "call.connected_leg".into(),
            fields: Map::new(),
        });
        assert!(matches!(ev, CallEvent::Other { name, .. } if name == "call.connected_leg"));
    }
}
