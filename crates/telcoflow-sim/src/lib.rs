//! A simulated phone: dials a number or waits at one, streams PCM and hears the call.
//!
//! This is the client side of the simulated phone network (protocol in
//! [`telcoflow_proto::sim`]). It is what `telcoflow call` and `telcoflow phone` use, and what
//! tests use to place and take calls against a real server.
//!
//! # Model
//!
//! [`SimPhone::dial`] or [`SimPhone::register`] opens the WebSocket and spawns one driver task
//! that owns it. The phone talks to the task through three parts, which can be used together
//! or split with [`SimPhone::into_parts`]:
//!
//! - [`PhoneControl`] (cheap to clone): answer, reject, hang up, press keys, queue audio to play.
//! - [`PhoneEvents`]: the [`NetworkFrame`] events in arrival order, with
//!   [`PhoneEvents::wait_for`] to wait deterministically for the one a test needs.
//! - [`PhoneAudio`]: what the phone hears, one `Vec<i16>` per 20 ms frame.
//!
//! # Credentials
//!
//! A development server on loopback takes phones as they come. Any other server wants the phone
//! to authenticate as a connector ([`PhoneOptions::credentials`], sent as the `x-api-key` and
//! `x-connector-uuid` headers) and then lets it dial and register only that connector's numbers;
//! a refused upgrade is [`SimError::Refused`] with the server's reason.
//!
//! # Audio timing
//!
//! While a call is up (from `answered` until `hangup`) the driver sends one 20 ms frame every
//! 20 ms, like a microphone: samples queued with [`PhoneControl::play`] when there are any,
//! silence otherwise. The last partial frame of a clip is padded with silence. If the task falls
//! behind (a loaded machine), it sends late rather than in a burst, so no audio is dropped.
//!
//! # Example
//!
//! ```no_run
//! use telcoflow_proto::{SampleRate, sim::NetworkFrame};
//! use telcoflow_sim::SimPhone;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), telcoflow_sim::SimError> {
//! let mut phone = SimPhone::dial("ws://127.0.0.1:8080", "+15551234", "+15550001", SampleRate::Hz16000).await?;
//! phone
//!     .events()
//!     .wait_for(Duration::from_secs(10), |ev| matches!(ev, NetworkFrame::Answered { .. }))
//!     .await?;
//! let tone = vec![1000i16; 16_000];
//! let playback = phone.control().play(tone)?;
//! playback.finished().await;
//! phone.control().hangup()?;
//! # Ok(())
//! # }
//! ```

use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use telcoflow_proto::SampleRate;
use telcoflow_proto::audio::{pcm_to_samples, samples_to_pcm};
use telcoflow_proto::control::{API_KEY_HEADER, CONNECTOR_HEADER};
use telcoflow_proto::sim::{HangupReason, NetworkFrame, PhoneFrame, SIM_PATH};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{Instrument, debug, trace, warn};

/// Frames of received audio buffered by default (60 s of 20 ms frames).
pub const DEFAULT_AUDIO_CAPACITY: usize = 3000;
/// Events buffered by default.
pub const DEFAULT_EVENT_CAPACITY: usize = 256;
/// How long [`SimPhone::register`] waits for `registered` by default.
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands queued towards the driver. Small: commands are rare and each waits its turn.
const COMMAND_CAPACITY: usize = 64;

/// Why a simulated phone operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The base URL is not a `ws://`, `wss://`, `http://` or `https://` URL.
    #[error("invalid server URL {0:?} (expected ws://host:port or http://host:port)")]
    InvalidUrl(String),
    /// The API key or connector UUID cannot be sent as an HTTP header (a control character).
    #[error("the API key or connector UUID is not a valid HTTP header value")]
    InvalidCredentials,
    /// The WebSocket could not be opened.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL.
        url: String,
        /// What went wrong.
        #[source]
        source: Box<tungstenite::Error>,
    },
    /// The server refused the WebSocket upgrade.
    #[error("server refused {url} with HTTP {status}: {body}")]
    Refused {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Response body text.
        body: String,
    },
    /// The connection to the network is gone.
    #[error("the simulated phone connection is closed")]
    Closed,
    /// Nothing matching arrived in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The call ended before what was awaited happened.
    #[error("the call ended ({})", .reason.as_str())]
    Ended {
        /// Why it ended.
        reason: HangupReason,
    },
    /// The network reported an error about a frame this phone sent.
    #[error("the network reported: {0}")]
    Network(String),
    /// The network answered with a frame that does not fit here.
    #[error("unexpected frame from the network: {0:?}")]
    Unexpected(Box<NetworkFrame>),
}

/// Tuning for a simulated phone. Defaults suit tests and the CLI.
#[derive(Debug, Clone)]
pub struct PhoneOptions {
    /// Received audio frames buffered until read; beyond it frames are dropped and counted in
    /// [`PhoneStats::frames_dropped`]. Default [`DEFAULT_AUDIO_CAPACITY`].
    pub audio_capacity: usize,
    /// Events buffered until read; beyond it events are dropped with a warning.
    /// Default [`DEFAULT_EVENT_CAPACITY`].
    pub event_capacity: usize,
    /// How long [`SimPhone::register`] waits for the network to confirm.
    /// Default [`DEFAULT_REGISTER_TIMEOUT`].
    pub register_timeout: Duration,
    /// The connector this phone authenticates as (sent as the `x-api-key` and
    /// `x-connector-uuid` headers). A server that is not a development server on loopback
    /// requires them, and then lets the phone use only that connector's numbers. Default none.
    pub credentials: Option<Credentials>,
}

/// A connector's credentials, as the control plane takes them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// API key (`x-api-key`).
    pub api_key: String,
    /// Connector UUID (`x-connector-uuid`).
    pub connector_uuid: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never in logs.
        f.debug_struct("Credentials")
            .field("connector_uuid", &self.connector_uuid)
            .finish_non_exhaustive()
    }
}

impl Default for PhoneOptions {
    fn default() -> Self {
        Self {
            audio_capacity: DEFAULT_AUDIO_CAPACITY,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            credentials: None,
        }
    }
}

impl PhoneOptions {
    /// Sets [`PhoneOptions::audio_capacity`] (at least 1).
    pub fn audio_capacity(mut self, frames: usize) -> Self {
        self.audio_capacity = frames.max(1);
        self
    }

    /// Sets [`PhoneOptions::event_capacity`] (at least 1).
    pub fn event_capacity(mut self, events: usize) -> Self {
        self.event_capacity = events.max(1);
        self
    }

    /// Sets [`PhoneOptions::register_timeout`].
    pub fn register_timeout(mut self, timeout: Duration) -> Self {
        self.register_timeout = timeout;
        self
    }

    /// Sets [`PhoneOptions::credentials`]: authenticate as this connector.
    pub fn credentials(mut self, api_key: &str, connector_uuid: &str) -> Self {
        self.credentials = Some(Credentials {
            api_key: api_key.to_owned(),
            connector_uuid: connector_uuid.to_owned(),
        });
        self
    }
}

/// Counters of a phone's audio, shared with the driver task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhoneStats {
    /// Samples sent to the network (queued audio and silence).
    pub samples_sent: u64,
    /// Samples received from the network.
    pub samples_received: u64,
    /// Received frames dropped because [`PhoneAudio`] was not read fast enough.
    pub frames_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    samples_sent: AtomicU64,
    samples_received: AtomicU64,
    frames_dropped: AtomicU64,
}

/// Turns a server base URL (`ws://`, `wss://`, `http://`, `https://`, with or without a
/// trailing `/`) into the simulated phone endpoint URL.
pub fn sim_url(base_url: &str) -> Result<String, SimError> {
    Ok(format!("{}{SIM_PATH}", ws_base_url(base_url)?))
}

/// Normalises a server base URL to `ws://host:port` / `wss://host:port` (no trailing `/`).
pub fn ws_base_url(base_url: &str) -> Result<String, SimError> {
    let trimmed = base_url.trim().trim_end_matches('/');
    let (scheme, rest) = trimmed
        .split_once("://")
        .ok_or_else(|| SimError::InvalidUrl(base_url.to_owned()))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return Err(SimError::InvalidUrl(base_url.to_owned())),
    };
    if rest.is_empty() {
        return Err(SimError::InvalidUrl(base_url.to_owned()));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// Read buffer of a phone's WebSocket: small, because tungstenite zero-fills the free part of
/// it before every socket read (the 128 KiB default cost a 128 KiB memset per 20 ms frame);
/// 4 KiB holds a few frames at 24 kHz, and larger messages still grow it.
const WS_READ_BUFFER: usize = 4096;

/// WebSocket settings of a phone.
fn ws_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER)
}

/// The upgrade request, with the credentials as headers when there are any.
fn request(
    url: &str,
    credentials: Option<&Credentials>,
) -> Result<tungstenite::handshake::client::Request, SimError> {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::http::HeaderValue;
    let mut request = url
        .into_client_request()
        .map_err(|_| SimError::InvalidUrl(url.to_owned()))?;
    if let Some(c) = credentials {
        let value = |v: &str| HeaderValue::from_str(v).map_err(|_| SimError::InvalidCredentials);
        let headers = request.headers_mut();
        headers.insert(API_KEY_HEADER, value(&c.api_key)?);
        headers.insert(CONNECTOR_HEADER, value(&c.connector_uuid)?);
    }
    Ok(request)
}

/// A connected simulated phone: a dialled call or a phone registered at a number.
#[derive(Debug)]
pub struct SimPhone {
    control: PhoneControl,
    events: PhoneEvents,
    audio: PhoneAudio,
}

impl SimPhone {
    /// Dials `to` as `from`. Returns once the WebSocket is open and the dial frame is sent;
    /// wait for `trying` / `ringing` / `answered` / `hangup` with [`SimPhone::events`].
    pub async fn dial(
        base_url: &str,
        from: &str,
        to: &str,
        rate: SampleRate,
    ) -> Result<Self, SimError> {
        Self::dial_with(base_url, from, to, rate, PhoneOptions::default()).await
    }

    /// [`SimPhone::dial`] with options.
    pub async fn dial_with(
        base_url: &str,
        from: &str,
        to: &str,
        rate: SampleRate,
        options: PhoneOptions,
    ) -> Result<Self, SimError> {
        let first = PhoneFrame::Dial {
            from: from.to_owned(),
            to: to.to_owned(),
            sample_rate: rate,
        };
        Self::open(base_url, first, rate, false, &options).await
    }

    /// Registers at `number` and waits until the network confirms with `registered`.
    /// Incoming calls then arrive as [`NetworkFrame::Incoming`]; answer with
    /// [`PhoneControl::answer`]. The phone stays registered across calls until closed.
    pub async fn register(
        base_url: &str,
        number: &str,
        rate: SampleRate,
    ) -> Result<Self, SimError> {
        Self::register_with(base_url, number, rate, PhoneOptions::default()).await
    }

    /// [`SimPhone::register`] with options.
    pub async fn register_with(
        base_url: &str,
        number: &str,
        rate: SampleRate,
        options: PhoneOptions,
    ) -> Result<Self, SimError> {
        let first = PhoneFrame::Register {
            number: number.to_owned(),
            sample_rate: rate,
        };
        let mut phone = Self::open(base_url, first, rate, true, &options).await?;
        let registered = phone
            .events
            .wait_for(options.register_timeout, |ev| {
                matches!(ev, NetworkFrame::Registered { .. })
            })
            .await;
        match registered {
            Ok(_) => Ok(phone),
            Err(e) => {
                phone.control.close();
                Err(e)
            }
        }
    }

    async fn open(
        base_url: &str,
        first: PhoneFrame,
        rate: SampleRate,
        registered: bool,
        options: &PhoneOptions,
    ) -> Result<Self, SimError> {
        let url = sim_url(base_url)?;
        let request = request(&url, options.credentials.as_ref())?;
        // TCP_NODELAY: 20 ms audio frames must not wait behind Nagle's algorithm.
        let connected =
            tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true).await;
        let (mut ws, _response) = match connected {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(SimError::Refused { url, status, body });
            }
            Err(e) => {
                return Err(SimError::Connect {
                    url,
                    source: Box::new(e),
                });
            }
        };
        ws.send(Message::text(first.encode()))
            .await
            .map_err(|e| SimError::Connect {
                url: url.clone(),
                source: Box::new(e),
            })?;

        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (event_tx, event_rx) = mpsc::channel(options.event_capacity.max(1));
        let (audio_tx, audio_rx) = mpsc::channel(options.audio_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let driver = Driver {
            rate,
            registered,
            in_call: false,
            queue: VecDeque::new(),
            event_tx,
            audio_tx,
            counters: counters.clone(),
        };
        let span = match &first {
            PhoneFrame::Dial { from, to, .. } => tracing::debug_span!("sim_phone", %from, %to),
            PhoneFrame::Register { number, .. } => tracing::debug_span!("sim_phone", %number),
            _ => tracing::debug_span!("sim_phone"),
        };
        tokio::spawn(driver.run(ws, cmd_rx).instrument(span));
        Ok(Self {
            control: PhoneControl {
                tx: cmd_tx,
                counters,
                rate,
            },
            events: PhoneEvents { rx: event_rx },
            audio: PhoneAudio { rx: audio_rx },
        })
    }

    /// Commands: answer, hang up, play audio.
    pub fn control(&self) -> &PhoneControl {
        &self.control
    }

    /// Network events.
    pub fn events(&mut self) -> &mut PhoneEvents {
        &mut self.events
    }

    /// Received audio.
    pub fn audio(&mut self) -> &mut PhoneAudio {
        &mut self.audio
    }

    /// Splits the phone so events and audio can be awaited at the same time (e.g. in one
    /// `select!`). Dropping every part closes the connection.
    pub fn into_parts(self) -> (PhoneControl, PhoneEvents, PhoneAudio) {
        (self.control, self.events, self.audio)
    }
}

/// Sends commands to a phone. Clones talk to the same phone. Each method only queues the
/// command; it fails with [`SimError::Closed`] once the connection is gone.
#[derive(Debug, Clone)]
pub struct PhoneControl {
    tx: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    rate: SampleRate,
}

impl PhoneControl {
    fn send(&self, command: Command) -> Result<(), SimError> {
        self.tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Closed(_) => SimError::Closed,
            // 64 commands waiting means the driver is stuck; report it as a dead connection
            // rather than block the caller.
            mpsc::error::TrySendError::Full(_) => {
                warn!("simulated phone command queue is full");
                SimError::Closed
            }
        })
    }

    /// Picks up the ringing call (registered phones).
    pub fn answer(&self) -> Result<(), SimError> {
        self.send(Command::Frame(PhoneFrame::Answer))
    }

    /// Refuses the ringing call (registered phones).
    pub fn reject(&self) -> Result<(), SimError> {
        self.send(Command::Frame(PhoneFrame::Reject))
    }

    /// Hangs up the current call.
    pub fn hangup(&self) -> Result<(), SimError> {
        self.send(Command::Frame(PhoneFrame::Hangup))
    }

    /// Presses a key for `duration`.
    pub fn dtmf(&self, digit: char, duration: Duration) -> Result<(), SimError> {
        let duration_ms = u32::try_from(duration.as_millis()).unwrap_or(u32::MAX);
        self.send(Command::Frame(PhoneFrame::Dtmf { digit, duration_ms }))
    }

    /// Queues `samples` (mono s16 at the phone's rate) to be sent in real time, after any clip
    /// already queued. They go out once a call is up.
    pub fn play(&self, samples: Vec<i16>) -> Result<Playback, SimError> {
        let (done_tx, done_rx) = oneshot::channel();
        self.send(Command::Play(Clip {
            samples,
            pos: 0,
            done: Some(done_tx),
        }))?;
        Ok(Playback { done: done_rx })
    }

    /// Drops every queued clip; the phone sends silence from the next frame on.
    pub fn stop_audio(&self) -> Result<(), SimError> {
        self.send(Command::StopAudio)
    }

    /// Closes the WebSocket (a dialled call that is up hangs up first).
    pub fn close(&self) {
        // Already closed is fine: there is nothing left to close.
        let _ = self.send(Command::Close);
    }

    /// The phone's sample rate.
    pub fn sample_rate(&self) -> SampleRate {
        self.rate
    }

    /// Audio counters so far.
    pub fn stats(&self) -> PhoneStats {
        PhoneStats {
            samples_sent: self.counters.samples_sent.load(Ordering::Relaxed),
            samples_received: self.counters.samples_received.load(Ordering::Relaxed),
            frames_dropped: self.counters.frames_dropped.load(Ordering::Relaxed),
        }
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A clip queued with [`PhoneControl::play`].
#[derive(Debug)]
pub struct Playback {
    done: oneshot::Receiver<()>,
}

impl Playback {
    /// Waits until the clip's last frame is sent. Returns `false` if it was cut short
    /// ([`PhoneControl::stop_audio`], hangup or a closed connection).
    pub async fn finished(self) -> bool {
        self.done.await.is_ok()
    }
}

/// The network events of a phone, in arrival order.
#[derive(Debug)]
pub struct PhoneEvents {
    rx: mpsc::Receiver<NetworkFrame>,
}

impl PhoneEvents {
    /// The next event; `None` once the connection is closed and every event was read.
    pub async fn next(&mut self) -> Option<NetworkFrame> {
        self.rx.recv().await
    }

    /// The next event if one is already here.
    pub fn try_next(&mut self) -> Option<NetworkFrame> {
        self.rx.try_recv().ok()
    }

    /// Reads events until one satisfies `pred` and returns it; events before it are
    /// discarded. Fails with [`SimError::Ended`] on a `hangup` that `pred` does not accept,
    /// [`SimError::Network`] on an `error` frame it does not accept, [`SimError::Closed`] when
    /// the connection ends and [`SimError::Timeout`] after `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&NetworkFrame) -> bool,
    ) -> Result<NetworkFrame, SimError> {
        let deadline = Instant::now() + timeout;
        loop {
            let event = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| SimError::Timeout(timeout))?
                .ok_or(SimError::Closed)?;
            if pred(&event) {
                return Ok(event);
            }
            match event {
                NetworkFrame::Hangup { reason, .. } => return Err(SimError::Ended { reason }),
                NetworkFrame::Error { message } => return Err(SimError::Network(message)),
                other => debug!(event = ?other, "skipping event"),
            }
        }
    }
}

/// Audio the phone hears: one `Vec<i16>` per binary frame (20 ms from a well-behaved server).
#[derive(Debug)]
pub struct PhoneAudio {
    rx: mpsc::Receiver<Vec<i16>>,
}

impl PhoneAudio {
    /// The next frame; `None` once the connection is closed and every frame was read.
    pub async fn recv(&mut self) -> Option<Vec<i16>> {
        self.rx.recv().await
    }

    /// The next frame if one is already here.
    pub fn try_recv(&mut self) -> Option<Vec<i16>> {
        self.rx.try_recv().ok()
    }

    /// Reads frames until at least `samples` samples arrived or `timeout` passed, and returns
    /// them (possibly fewer on timeout or close).
    pub async fn collect(&mut self, samples: usize, timeout: Duration) -> Vec<i16> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(samples);
        while out.len() < samples {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(frame)) => out.extend_from_slice(&frame),
                Ok(None) | Err(_) => break,
            }
        }
        out
    }

    /// Discards every frame already received.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while self.rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }
}

enum Command {
    Frame(PhoneFrame),
    Play(Clip),
    StopAudio,
    Close,
}

struct Clip {
    samples: Vec<i16>,
    pos: usize,
    done: Option<oneshot::Sender<()>>,
}

impl Clip {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            // The caller may have dropped its Playback; nobody to tell then.
            let _ = done.send(());
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Owns the WebSocket; see the module doc for the timing rules.
struct Driver {
    rate: SampleRate,
    registered: bool,
    /// A call is up: audio is sent every 20 ms.
    in_call: bool,
    queue: VecDeque<Clip>,
    event_tx: mpsc::Sender<NetworkFrame>,
    audio_tx: mpsc::Sender<Vec<i16>>,
    counters: Arc<Counters>,
}

impl Driver {
    async fn run(mut self, mut ws: Ws, mut cmd_rx: mpsc::Receiver<Command>) {
        let frame_time = Duration::from_millis(u64::from(telcoflow_proto::audio::FRAME_MS));
        let mut ticker = tokio::time::interval(frame_time);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pcm = Vec::with_capacity(self.rate.frame_bytes());
        loop {
            tokio::select! {
                // Cancel-safe: WebSocketStream::next keeps partial frames inside the stream.
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        let frame = match NetworkFrame::decode(text.as_str()) {
                            Ok(frame) => frame,
                            Err(e) => {
                                warn!(error = %e, "undecodable frame from the network");
                                continue;
                            }
                        };
                        debug!(?frame, "network frame");
                        let was_in_call = self.in_call;
                        self.on_event(&frame);
                        if self.in_call && !was_in_call {
                            // First frame of the call goes out now, the next in 20 ms.
                            ticker.reset_immediately();
                        }
                        self.emit(frame);
                    }
                    Some(Ok(Message::Binary(bytes))) => self.on_audio(&bytes),
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(error = %e, "simulated phone connection failed");
                        break;
                    }
                },
                // Cancel-safe: mpsc::Receiver::recv loses nothing when not chosen.
                cmd = cmd_rx.recv() => {
                    let Some(cmd) = cmd else {
                        // Every handle is gone: nobody can use this phone any more.
                        break;
                    };
                    match cmd {
                        Command::Frame(frame) => {
                            self.on_sent(&frame);
                            if ws.send(Message::text(frame.encode())).await.is_err() {
                                break;
                            }
                        }
                        Command::Play(clip) => self.queue.push_back(clip),
                        Command::StopAudio => self.queue.clear(),
                        Command::Close => {
                            if self.in_call && !self.registered {
                                let _ = ws.send(Message::text(PhoneFrame::Hangup.encode())).await;
                            }
                            let _ = ws.close(None).await;
                            break;
                        }
                    }
                }
                // Cancel-safe: Interval::tick. Guard: audio flows only while a call is up.
                _ = ticker.tick(), if self.in_call => {
                    pcm.clear();
                    let frame = self.next_frame();
                    samples_to_pcm(&frame, &mut pcm);
                    trace!(bytes = pcm.len(), "sending audio");
                    if ws.send(Message::binary(pcm.clone())).await.is_err() {
                        break;
                    }
                    self.counters
                        .samples_sent
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
            }
        }
        // Clips not played are cut short: dropping them tells their Playback.
        self.queue.clear();
        debug!("simulated phone closed");
    }

    fn on_event(&mut self, frame: &NetworkFrame) {
        match frame {
            NetworkFrame::Answered { .. } => self.in_call = true,
            NetworkFrame::Hangup { .. } => {
                self.in_call = false;
                self.queue.clear();
            }
            _ => {}
        }
    }

    fn on_sent(&mut self, frame: &PhoneFrame) {
        match frame {
            // A registered phone's call is up as soon as it picks up.
            PhoneFrame::Answer if self.registered => self.in_call = true,
            PhoneFrame::Hangup | PhoneFrame::Reject => {
                self.in_call = false;
                self.queue.clear();
            }
            _ => {}
        }
    }

    fn emit(&self, frame: NetworkFrame) {
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.event_tx.try_send(frame) {
            warn!(?frame, "event queue full, event dropped");
        }
    }

    fn on_audio(&self, bytes: &[u8]) {
        let mut samples = Vec::with_capacity(bytes.len() / 2);
        pcm_to_samples(bytes, &mut samples);
        self.counters
            .samples_received
            .fetch_add(samples.len() as u64, Ordering::Relaxed);
        if let Err(mpsc::error::TrySendError::Full(_)) = self.audio_tx.try_send(samples) {
            self.counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One 20 ms frame: queued clips first, silence to fill.
    fn next_frame(&mut self) -> Vec<i16> {
        let n = self.rate.frame_samples();
        let mut frame = Vec::with_capacity(n);
        while frame.len() < n {
            let Some(clip) = self.queue.front_mut() else {
                break;
            };
            let take = (n - frame.len()).min(clip.samples.len() - clip.pos);
            frame.extend_from_slice(&clip.samples[clip.pos..clip.pos + take]);
            clip.pos += take;
            if clip.pos >= clip.samples.len() {
                clip.finish();
                self.queue.pop_front();
            }
        }
        frame.resize(n, 0);
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            sim_url("ws://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1/sim/phone"
        );
        assert_eq!(
            sim_url("http://127.0.0.1:8080/").unwrap(),
            "ws://127.0.0.1:8080/v1/sim/phone"
        );
        assert_eq!(sim_url("HTTPS://h").unwrap(), "wss://h/v1/sim/phone");
        assert!(matches!(
            sim_url("127.0.0.1:8080"),
            Err(SimError::InvalidUrl(_))
        ));
        assert!(matches!(sim_url("ftp://x"), Err(SimError::InvalidUrl(_))));
        assert!(matches!(sim_url("ws://"), Err(SimError::InvalidUrl(_))));
    }

    fn driver() -> (
        Driver,
        mpsc::Receiver<NetworkFrame>,
        mpsc::Receiver<Vec<i16>>,
    ) {
        let (event_tx, event_rx) = mpsc::channel(4);
        let (audio_tx, audio_rx) = mpsc::channel(2);
        (
            Driver {
                rate: SampleRate::Hz8000,
                registered: false,
                in_call: false,
                queue: VecDeque::new(),
                event_tx,
                audio_tx,
                counters: Arc::default(),
            },
            event_rx,
            audio_rx,
        )
    }

    #[test]
    fn frames_pad_clips_and_fill_with_silence() {
        let (mut d, _e, _a) = driver();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        d.queue.push_back(Clip {
            samples: vec![1; 100],
            pos: 0,
            done: Some(tx1),
        });
        d.queue.push_back(Clip {
            samples: vec![2; 200],
            pos: 0,
            done: Some(tx2),
        });
        // 160 samples per 20 ms at 8 kHz: the first frame spans both clips.
        let f1 = d.next_frame();
        assert_eq!(f1.len(), 160);
        assert!(f1[..100].iter().all(|&s| s == 1));
        assert!(f1[100..].iter().all(|&s| s == 2));
        assert!(rx1.try_recv().is_ok());
        assert!(rx2.try_recv().is_err());
        let f2 = d.next_frame();
        assert!(f2[..140].iter().all(|&s| s == 2));
        assert!(f2[140..].iter().all(|&s| s == 0), "padded with silence");
        assert!(rx2.try_recv().is_ok());
        assert!(d.next_frame().iter().all(|&s| s == 0));
    }

    #[test]
    fn call_state_follows_events_and_commands() {
        let (mut d, _e, _a) = driver();
        d.on_event(&NetworkFrame::Ringing {
            call_id: "c".into(),
        });
        assert!(!d.in_call);
        d.on_event(&NetworkFrame::Answered {
            call_id: "c".into(),
        });
        assert!(d.in_call);
        d.on_sent(&PhoneFrame::Hangup);
        assert!(!d.in_call);
        d.registered = true;
        d.on_sent(&PhoneFrame::Answer);
        assert!(d.in_call);
        d.on_event(&NetworkFrame::Hangup {
            call_id: None,
            reason: HangupReason::Remote,
        });
        assert!(!d.in_call);
    }

    #[test]
    fn audio_overflow_is_counted() {
        let (d, _e, mut a) = driver();
        for _ in 0..3 {
            d.on_audio(&[1, 0, 2, 0, 3]);
        }
        assert_eq!(a.try_recv().unwrap(), vec![1, 2]);
        assert_eq!(d.counters.frames_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(d.counters.samples_received.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn wait_for_skips_and_stops_at_hangup() {
        let (tx, rx) = mpsc::channel(8);
        let mut events = PhoneEvents { rx };
        tx.send(NetworkFrame::Trying {
            call_id: "c".into(),
        })
        .await
        .unwrap();
        tx.send(NetworkFrame::Ringing {
            call_id: "c".into(),
        })
        .await
        .unwrap();
        tx.send(NetworkFrame::Hangup {
            call_id: Some("c".into()),
            reason: HangupReason::NoAnswer,
        })
        .await
        .unwrap();
        let ringing = events
            .wait_for(Duration::from_secs(1), |e| {
                matches!(e, NetworkFrame::Ringing { .. })
            })
            .await
            .unwrap();
        assert_eq!(
            ringing,
            NetworkFrame::Ringing {
                call_id: "c".into()
            }
        );
        let err = events
            .wait_for(Duration::from_secs(1), |e| {
                matches!(e, NetworkFrame::Answered { .. })
            })
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            SimError::Ended {
                reason: HangupReason::NoAnswer
            }
        ));
        drop(tx);
        let err = events
            .wait_for(Duration::from_secs(1), |_| false)
            .await
            .unwrap_err();
        assert!(matches!(err, SimError::Closed));
    }

    #[tokio::test]
    async fn wait_for_times_out() {
        let (_tx, rx) = mpsc::channel::<NetworkFrame>(1);
        let mut events = PhoneEvents { rx };
        let err = events
            .wait_for(Duration::from_millis(20), |_| true)
            .await
            .unwrap_err();
        assert!(matches!(err, SimError::Timeout(_)));
    }
}
