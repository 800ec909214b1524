//! [`TelcoflowClient`]: the persistent control connection and the calls it delivers.
//!
//! One driver task owns the control WebSocket: it sends `setup`, claims sessions, keeps the
//! connection alive with pings, reconnects with backoff and turns server frames into
//! [`ClientEvent`]s. Handles talk to it over a bounded queue. Calls whose media connection is
//! open do not depend on the control connection and go on while it reconnects.

use crate::Error;
use crate::call::{ActiveCall, CallLinks, CallParams, CallState};
use crate::call_flow::CallFlow;
use crate::config::{Auth, SessionMode, TelcoflowClientConfig};
use crate::error::ServerCode;
use crate::event::{ClientEvent, ClientEvents, SessionNotification};
use crate::http::{CloseResult, RecordingQuery, SessionPage, SessionQuery};
use crate::transport::{self, Ws};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::control::{
    self, CallIn, Channel, ClientFrame, Response, ServerFrame, SessionInfo, SetupData,
};
use telcoflow_proto::recording::{RecordingInfo, RecordingPage};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

/// Requests from handles queued towards the driver.
const COMMAND_QUEUE: usize = 64;

/// A connection to a Telcoflow server for one connector. Cheap to clone.
///
/// ```no_run
/// use futures_util::StreamExt;
/// use telcoflow::{ClientEvent, TelcoflowClient, TelcoflowClientConfig};
///
/// # async fn run() -> Result<(), telcoflow::Error> {
/// let client = TelcoflowClient::connect(TelcoflowClientConfig::local("key", "connector")?).await?;
/// let mut events = client.events();
/// while let Some(event) = events.next().await {
///     match event {
///         ClientEvent::IncomingCall(call) => {
///             // Already connected: answer and talk.
///             tokio::spawn(async move {
///                 let _ = call.answer().await;
///                 call.terminated().await;
///             });
///         }
///         ClientEvent::Disconnected { reason } => eprintln!("control connection lost: {reason}"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TelcoflowClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for TelcoflowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelcoflowClient")
            .field("config", &self.inner.config)
            .field("connection", &*self.inner.connection.borrow())
            .finish_non_exhaustive()
    }
}

struct ClientInner {
    config: Arc<TelcoflowClientConfig>,
    commands: mpsc::Sender<DriverCommand>,
    events: Mutex<Option<mpsc::Receiver<ClientEvent>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    connection: watch::Receiver<Option<Connection>>,
    /// The `data` of the last accepted `call_flow.setup`, sent again after a reconnection.
    call_flow: Arc<Mutex<Option<Value>>>,
    /// Stops everything when the last handle is dropped without `shutdown`.
    _guard: DropGuard,
}

/// The control connection that is up.
#[derive(Debug, Clone)]
struct Connection {
    /// The server's id of it.
    sm_ws_id: String,
    /// The base URL it went to.
    base_url: String,
}

enum DriverCommand {
    Request {
        frame: ClientFrame,
        reply: oneshot::Sender<Result<Response, Error>>,
    },
    Send(ClientFrame),
    /// Hands the `call.in` of an outbound session to `reply` instead of the event stream.
    /// Queued before the session's `session.ready`, so registered before the call can come.
    AwaitCall {
        session_id: String,
        reply: oneshot::Sender<Result<ActiveCall, Error>>,
    },
}

/// Outbound sessions whose call a [`TelcoflowClient::create_session`] waits for.
type AwaitedCalls = Arc<Mutex<HashMap<String, oneshot::Sender<Result<ActiveCall, Error>>>>>;

enum Pending {
    /// An application request waiting for its response.
    Waiter(oneshot::Sender<Result<Response, Error>>),
    /// An automatic `session.open`; on success the client sends `session.ready`.
    AutoClaim(String),
}

impl TelcoflowClient {
    /// Connects, sends `setup` and waits for `setup.done`, trying each of the configured
    /// base URLs in turn ([`TelcoflowClientConfigBuilder::base_urls`](crate::TelcoflowClientConfigBuilder::base_urls)).
    /// Fails if none of them completes this first attempt ([`Error::Authentication`] with
    /// the server's message on refused credentials); after that the client reconnects by
    /// itself, forever, until [`TelcoflowClient::shutdown`].
    pub async fn connect(config: TelcoflowClientConfig) -> Result<Self, Error> {
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (ev_tx, ev_rx) = mpsc::channel(config.event_capacity);
        let (connection_tx, connection_rx) = watch::channel(None);
        let (first_tx, first_rx) = oneshot::channel();
        let call_flow = Arc::new(Mutex::new(None));
        let driver = Driver {
            config: config.clone(),
            commands: cmd_rx,
            events: ev_tx,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            connection: connection_tx,
            awaited: AwaitedCalls::default(),
            call_flow: call_flow.clone(),
        };
        tracker.spawn(driver.run(first_tx).instrument(debug_span!("control")));
        let client = Self {
            inner: Arc::new(ClientInner {
                config,
                commands: cmd_tx,
                events: Mutex::new(Some(ev_rx)),
                shutdown: shutdown.clone(),
                tracker,
                connection: connection_rx,
                call_flow,
                _guard: shutdown.drop_guard(),
            }),
        };
        match first_rx.await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(e)) => {
                client.shutdown().await;
                Err(e)
            }
            Err(_) => {
                client.shutdown().await;
                Err(Error::connection("the client stopped while connecting"))
            }
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TelcoflowClientConfig {
        &self.inner.config
    }

    /// The server's id of the current control connection, if connected.
    pub fn sm_ws_id(&self) -> Option<String> {
        self.inner
            .connection
            .borrow()
            .as_ref()
            .map(|c| c.sm_ws_id.clone())
    }

    /// The base URL of the current control connection, if connected: one of
    /// [`TelcoflowClientConfig::base_urls`].
    pub fn connected_base_url(&self) -> Option<String> {
        self.inner
            .connection
            .borrow()
            .as_ref()
            .map(|c| c.base_url.clone())
    }

    /// The event stream. The first call takes it; later calls get a stream that ends at once.
    /// Read it promptly: when its buffer (`event_capacity`) is full the control connection
    /// waits.
    pub fn events(&self) -> ClientEvents {
        let rx = self
            .inner
            .events
            .lock()
            .take()
            .unwrap_or_else(|| mpsc::channel(1).1);
        ClientEvents::new(rx)
    }

    /// Runs `handler` for every incoming call, each in its own task, until the client shuts
    /// down. When a handler returns while its call is still up, the call is closed. Takes the
    /// event stream (see [`TelcoflowClient::events`]); other events are only logged.
    pub async fn serve<F, Fut>(&self, handler: F) -> Result<(), Error>
    where
        F: Fn(ActiveCall) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut events = self.events();
        while let Some(ev) = events.next().await {
            match ev {
                ClientEvent::IncomingCall(call) => {
                    let span = debug_span!("call", call_id = %call.id());
                    let fut = handler(call.clone());
                    self.inner.tracker.spawn(
                        async move {
                            fut.await;
                            if call.state() != CallState::Terminated {
                                if let Err(e) = call.close().await {
                                    debug!(error = %e, "closing the call after its handler");
                                }
                            }
                        }
                        .instrument(span),
                    );
                }
                other => debug!(event = ?other, "event"),
            }
        }
        Ok(())
    }

    /// Claims a notified session (manual mode). [`Error::SessionBusy`] means another
    /// connection was first: a normal outcome with several workers.
    pub async fn open_session(&self, session_id: &str) -> Result<SessionInfo, Error> {
        let r = self
            .request(ClientFrame::SessionOpen {
                session_id: session_id.to_owned(),
                req_id: None,
            })
            .await?;
        if !r.ok {
            return Err(response_error(r));
        }
        let session = r
            .content
            .as_ref()
            .and_then(|c| c.get("session"))
            .cloned()
            .unwrap_or(Value::Null);
        serde_json::from_value(session)
            .map_err(|e| Error::Protocol(format!("session.open response: {e}")))
    }

    /// Places an outbound call to `remote_address` (`session.create`), claims its session and
    /// returns the call with its media connection open (unless
    /// [`auto_connect_media`](crate::TelcoflowClientConfigBuilder::auto_connect_media) is off)
    /// while the far end rings. [`ActiveCall::answer`] then waits for the pick-up and fails
    /// with the server's reason (busy, no answer, refused) if there is none.
    ///
    /// Errors: [`Error::SessionExists`] when this connector already has an open session with
    /// that party; [`Error::RequestFailed`] with the server's code, e.g.
    /// [`ErrorCode::NoRoute`] for a number nobody can reach, [`ErrorCode::QuotaExceeded`] at
    /// the connector's call limit, [`ErrorCode::InvalidRequest`] for a malformed address.
    /// The Python SDK's `create_session` does the same in one call followed by
    /// `session.ready()`.
    pub async fn create_session(&self, remote_address: &str) -> Result<ActiveCall, Error> {
        let r = self
            .request(ClientFrame::SessionCreate {
                channel: Channel::Telco,
                remote_address: remote_address.to_owned(),
                req_id: None,
            })
            .await?;
        if !r.ok {
            return Err(response_error(r));
        }
        let content = r.content.unwrap_or(Value::Null);
        let session_id = content
            .get("sessionId")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Protocol("session.create response without sessionId".into()))?
            .to_owned();
        if content.get("created").and_then(Value::as_bool) == Some(false) {
            return Err(Error::SessionExists { session_id });
        }
        self.open_session(&session_id).await?;
        let (tx, rx) = oneshot::channel();
        // In this order on one queue: the waiter is in place before the server can answer
        // `session.ready` with the call.
        for cmd in [
            DriverCommand::AwaitCall {
                session_id: session_id.clone(),
                reply: tx,
            },
            DriverCommand::Send(ClientFrame::SessionReady { session_id }),
        ] {
            self.inner
                .commands
                .send(cmd)
                .await
                .map_err(|_| Error::Shutdown)?;
        }
        // The call comes right after `session.ready`; its media connection takes one more
        // round trip.
        match tokio::time::timeout(self.inner.config.request_timeout * 2, rx).await {
            Err(_) => Err(Error::RequestTimeout),
            Ok(Err(_)) => Err(Error::Shutdown),
            Ok(Ok(r)) => r,
        }
    }

    /// Chooses which calls the server offers to this connection (`call_flow.setup`), e.g.
    /// none for a dialer that only places calls with [`TelcoflowClient::create_session`].
    /// Unlike the Python SDK's `setup_call_flow`, which is sent once, the client sends the
    /// last accepted flow again after every reconnection. Inbound calls delivered in
    /// [`SessionMode::Auto`] and [`SessionMode::Manual`] alike follow it.
    pub async fn setup_call_flow(&self, flow: &CallFlow) -> Result<(), Error> {
        let data =
            serde_json::to_value(flow).map_err(|e| Error::Protocol(format!("call flow: {e}")))?;
        let r = self
            .request(ClientFrame::CallFlowSetup {
                data: data.clone(),
                req_id: None,
            })
            .await?;
        if !r.ok {
            return Err(response_error(r));
        }
        *self.inner.call_flow.lock() = Some(data);
        Ok(())
    }

    /// Lists the connector's sessions over HTTP (`GET /public/v1/sessions`), one page: pass
    /// [`SessionPage::next_offset`] as the next query's offset for the rest. Goes to the base
    /// URL the control connection is on (`ws://` as `http://`, `wss://` as `https://`), with
    /// the same credentials and TLS settings.
    pub async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage, Error> {
        crate::http::list(&self.inner.config, &self.http_base_url(), query).await
    }

    /// Ends a session's call for everyone over HTTP (`POST /public/v1/sessions/{id}/close`).
    /// A session that is not open (unknown, another connector's, already ended) is
    /// [`Error::RequestFailed`] with [`ErrorCode::SessionNotFound`]; the Python SDK returns
    /// a result with reason `NOT_FOUND` instead.
    pub async fn close_session(&self, session_id: &str) -> Result<CloseResult, Error> {
        crate::http::close(&self.inner.config, &self.http_base_url(), session_id).await
    }

    /// Lists the connector's recordings on the server over HTTP (`GET /public/v1/recordings`,
    /// an extension of this server), one page, oldest first: pass
    /// [`RecordingPage::next_offset`] as the next query's offset for the rest. In a cluster,
    /// each node lists the recordings of the calls it ran. A server without recording fails
    /// with code [`ErrorCode::RecordingNotConfigured`].
    pub async fn list_recordings(&self, query: &RecordingQuery) -> Result<RecordingPage, Error> {
        crate::http::list_recordings(&self.inner.config, &self.http_base_url(), query).await
    }

    /// One recording's metadata (`GET /public/v1/recordings/{id}`): its call, state, duration,
    /// paused spans and lost frames. Unknown, or another connector's: code
    /// [`ErrorCode::RecordingNotFound`].
    pub async fn recording(&self, id: &str) -> Result<RecordingInfo, Error> {
        crate::http::recording(&self.inner.config, &self.http_base_url(), id).await
    }

    /// Downloads a finished recording's WAV file into `out`, streamed
    /// (`GET /public/v1/recordings/{id}/audio`); returns the bytes written. One still
    /// recording fails with code [`ErrorCode::InvalidState`] (a stopped one being finished is
    /// waited for); unknown, or another connector's, with [`ErrorCode::RecordingNotFound`].
    ///
    /// ```no_run
    /// # async fn run(client: telcoflow::TelcoflowClient, id: &str) -> Result<(), telcoflow::Error> {
    /// let mut wav = Vec::new();
    /// client.download_recording(id, &mut wav).await?;
    /// # Ok(()) }
    /// ```
    pub async fn download_recording(
        &self,
        id: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<u64, Error> {
        crate::http::download_recording(&self.inner.config, &self.http_base_url(), id, out).await
    }

    /// Deletes a finished recording on the server (`DELETE /public/v1/recordings/{id}`).
    pub async fn delete_recording(&self, id: &str) -> Result<(), Error> {
        crate::http::delete_recording(&self.inner.config, &self.http_base_url(), id).await
    }

    /// The base URL of the live control connection, else the first configured.
    fn http_base_url(&self) -> String {
        self.connected_base_url()
            .unwrap_or_else(|| self.inner.config.base_url().to_owned())
    }

    /// Tells the server this connection is ready for the claimed session's call (manual
    /// mode).
    pub async fn ready(&self, session_id: &str) -> Result<(), Error> {
        self.inner
            .commands
            .send(DriverCommand::Send(ClientFrame::SessionReady {
                session_id: session_id.to_owned(),
            }))
            .await
            .map_err(|_| Error::Shutdown)
    }

    /// Sends a control request and waits for its `response` (at most `request_timeout`).
    async fn request(&self, frame: ClientFrame) -> Result<Response, Error> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(DriverCommand::Request { frame, reply: tx })
            .await
            .map_err(|_| Error::Shutdown)?;
        match tokio::time::timeout(self.inner.config.request_timeout, rx).await {
            Err(_) => Err(Error::RequestTimeout),
            Ok(Err(_)) => Err(Error::Shutdown),
            Ok(Ok(r)) => r,
        }
    }

    /// Closes the control connection and every call's media connection, then waits for every
    /// task of the client, call handlers included, to finish.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

fn response_error(r: Response) -> Error {
    let code = ServerCode::new(r.error_code.as_deref().unwrap_or_default());
    if code == ErrorCode::SessionBusy {
        let bound = r
            .error_content
            .as_ref()
            .and_then(|c| c.get("boundSmWsId"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        return Error::SessionBusy {
            bound_sm_ws_id: bound,
        };
    }
    let message = match r.error_content {
        Some(Value::String(s)) => s,
        Some(Value::Object(o)) => o
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| Value::Object(o).to_string()),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    Error::RequestFailed { code, message }
}

/// Why a connection ended.
enum Exit {
    Shutdown,
    Lost(String),
}

struct Driver {
    config: Arc<TelcoflowClientConfig>,
    commands: mpsc::Receiver<DriverCommand>,
    events: mpsc::Sender<ClientEvent>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    connection: watch::Sender<Option<Connection>>,
    awaited: AwaitedCalls,
    call_flow: Arc<Mutex<Option<Value>>>,
}

impl Driver {
    async fn run(mut self, first: oneshot::Sender<Result<(), Error>>) {
        let mut first = Some(first);
        let mut attempt: u32 = 0;
        let mut connected_before = false;
        // The base URL each round of attempts starts with.
        let mut first_url = 0;
        loop {
            if attempt > 0 {
                let delay = self.config.reconnect_delay(attempt);
                debug!(attempt, ?delay, "reconnecting");
                if !self
                    .emit(ClientEvent::Reconnecting { attempt, delay })
                    .await
                    || !self.wait_disconnected(delay).await
                {
                    break;
                }
            }
            let connected = tokio::select! {
                r = connect_to_any(&self.config, first_url) => r,
                () = self.shutdown.cancelled() => break,
            };
            let (ws, sm_ws_id, url) = match connected {
                Ok(c) => c,
                Err(e) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(e));
                        return;
                    }
                    warn!(error = %e, attempt, "control connection attempt failed");
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            };
            let base_url = self.config.base_urls[url].clone();
            info!(%sm_ws_id, %base_url, "control connection up");
            // Set before `connect` returns, so that `sm_ws_id()` is known at once.
            self.connection.send_replace(Some(Connection {
                sm_ws_id: sm_ws_id.clone(),
                base_url,
            }));
            if let Some(f) = first.take() {
                let _ = f.send(Ok(()));
            }
            if !self
                .emit(ClientEvent::Connected {
                    sm_ws_id: sm_ws_id.clone(),
                })
                .await
            {
                break;
            }
            if connected_before && !self.emit(ClientEvent::Reconnected).await {
                break;
            }
            connected_before = true;
            let span = debug_span!("connection", %sm_ws_id);
            let exit = self.run_connection(ws).instrument(span).await;
            self.connection.send_replace(None);
            match exit {
                Exit::Shutdown => break,
                Exit::Lost(reason) => {
                    warn!(%reason, "control connection lost");
                    if !self.emit(ClientEvent::Disconnected { reason }).await {
                        break;
                    }
                    attempt = 1;
                    // The node may have gone away: the others first, it last.
                    first_url = (url + 1) % self.config.base_urls.len();
                }
            }
        }
        // Requests still queued get an answer instead of waiting for their timeout.
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                DriverCommand::Request { reply, .. } => {
                    let _ = reply.send(Err(Error::Shutdown));
                }
                DriverCommand::AwaitCall { reply, .. } => {
                    let _ = reply.send(Err(Error::Shutdown));
                }
                DriverCommand::Send(_) => {}
            }
        }
        for (_, reply) in self.awaited.lock().drain() {
            let _ = reply.send(Err(Error::Shutdown));
        }
        debug!("control driver stopped");
    }

    /// Delivers an event; false if the client is shutting down.
    async fn emit(&self, ev: ClientEvent) -> bool {
        tokio::select! {
            // A closed receiver (the application dropped the stream) is not a reason to stop.
            _ = self.events.send(ev) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Sleeps for the backoff delay, refusing requests meanwhile; false on shutdown.
    async fn wait_disconnected(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                () = self.shutdown.cancelled() => return false,
                cmd = self.commands.recv() => match cmd {
                    Some(DriverCommand::Request { reply, .. }) => {
                        let _ = reply.send(Err(Error::connection("not connected")));
                    }
                    Some(DriverCommand::AwaitCall { reply, .. }) => {
                        let _ = reply.send(Err(Error::connection("not connected")));
                    }
                    Some(DriverCommand::Send(_)) => {}
                    None => return false,
                },
            }
        }
    }

    async fn run_connection(&mut self, mut ws: Ws) -> Exit {
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let hb = self.config.heartbeat_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + hb, hb);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pong_deadline: Option<Instant> = None;
        // A new connection starts with the server's default flow: restore the application's.
        let call_flow = self.call_flow.lock().clone();
        if let Some(data) = call_flow {
            let frame = ClientFrame::CallFlowSetup { data, req_id: None };
            if let Err(e) = Self::send_frame(&mut ws, &frame).await {
                return Exit::Lost(e);
            }
        }
        let exit = loop {
            let deadline = pong_deadline;
            // Every branch is cancel-safe: `recv`, `next`, `tick`, `sleep_until` and
            // `cancelled` lose nothing when another branch wins.
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break Exit::Shutdown;
                }
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { break Exit::Shutdown };
                    if let Err(e) = self.on_command(&mut ws, &mut pending, cmd).await {
                        break Exit::Lost(e);
                    }
                }
                msg = ws.next() => match msg {
                    None => break Exit::Lost("closed by server".into()),
                    Some(Err(e)) => break Exit::Lost(format!("read failed: {e}")),
                    Some(Ok(Message::Text(text))) => {
                        if let Err(e) = self.on_frame(&mut ws, &mut pending, text.as_str()).await {
                            break Exit::Lost(e);
                        }
                    }
                    Some(Ok(Message::Pong(_))) => pong_deadline = None,
                    Some(Ok(Message::Close(frame))) => {
                        break Exit::Lost(match frame {
                            Some(f) => format!("closed by server: {} {}", f.code, f.reason),
                            None => "closed by server".into(),
                        });
                    }
                    Some(Ok(_)) => {}
                },
                _ = ping.tick() => {
                    if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                        break Exit::Lost(format!("ping failed: {e}"));
                    }
                    if pong_deadline.is_none() {
                        pong_deadline = Some(Instant::now() + self.config.heartbeat_timeout);
                    }
                }
                () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => {
                    break Exit::Lost("heartbeat timeout: no pong".into());
                }
            }
        };
        for (_, p) in pending.drain() {
            if let Pending::Waiter(tx) = p {
                let _ = tx.send(Err(Error::connection("control connection lost")));
            }
        }
        // Their `call.in` would come on this connection only.
        for (_, reply) in self.awaited.lock().drain() {
            let _ = reply.send(Err(Error::connection("control connection lost")));
        }
        exit
    }

    async fn send_frame(ws: &mut Ws, frame: &ClientFrame) -> Result<(), String> {
        ws.send(Message::Text(frame.encode().into()))
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    /// Registers a pending request under a fresh id; gives it back when the table is full.
    fn register(
        &self,
        pending: &mut HashMap<String, Pending>,
        p: Pending,
    ) -> Result<String, Pending> {
        if pending.len() >= self.config.max_pending_requests {
            // Waiters that gave up (timed out) hold a slot for nothing.
            pending.retain(|_, p| !matches!(p, Pending::Waiter(tx) if tx.is_closed()));
            if pending.len() >= self.config.max_pending_requests {
                return Err(p);
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        pending.insert(id.clone(), p);
        Ok(id)
    }

    async fn on_command(
        &self,
        ws: &mut Ws,
        pending: &mut HashMap<String, Pending>,
        cmd: DriverCommand,
    ) -> Result<(), String> {
        match cmd {
            DriverCommand::Send(frame) => Self::send_frame(ws, &frame).await,
            DriverCommand::AwaitCall { session_id, reply } => {
                let mut awaited = self.awaited.lock();
                // Waiters that gave up (timed out, dropped) leave nothing behind.
                awaited.retain(|_, r| !r.is_closed());
                awaited.insert(session_id, reply);
                Ok(())
            }
            DriverCommand::Request { mut frame, reply } => {
                let id = match self.register(pending, Pending::Waiter(reply)) {
                    Ok(id) => id,
                    Err(p) => {
                        if let Pending::Waiter(reply) = p {
                            let _ = reply.send(Err(Error::TooManyRequests));
                        }
                        return Ok(());
                    }
                };
                set_req_id(&mut frame, id.clone());
                debug!(req_id = %id, "request");
                Self::send_frame(ws, &frame).await
            }
        }
    }

    async fn on_frame(
        &self,
        ws: &mut Ws,
        pending: &mut HashMap<String, Pending>,
        text: &str,
    ) -> Result<(), String> {
        let frame = match ServerFrame::decode(text) {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e, "ignoring undecodable control frame");
                return Ok(());
            }
        };
        match frame {
            ServerFrame::SetupDone { .. } => debug!("late setup.done ignored"),
            ServerFrame::Response(r) => {
                let Some(id) = r.req_id.clone() else {
                    debug!("response without reqId ignored");
                    return Ok(());
                };
                match pending.remove(&id) {
                    Some(Pending::Waiter(tx)) => {
                        let _ = tx.send(Ok(r));
                    }
                    Some(Pending::AutoClaim(session_id)) => {
                        if r.ok {
                            debug!(%session_id, "session claimed");
                            Self::send_frame(ws, &ClientFrame::SessionReady { session_id }).await?;
                        } else if r.error_code.as_deref() == Some(ErrorCode::SessionBusy.as_str()) {
                            debug!(%session_id, "session claimed by another connection");
                        } else {
                            warn!(%session_id, code = ?r.error_code, "session.open refused");
                        }
                    }
                    None => debug!(req_id = %id, "response to an unknown request"),
                }
            }
            ServerFrame::SessionNotify {
                session_id,
                channel,
                remote_address,
                local_address,
                activity,
                created_at,
            } => {
                debug!(%session_id, ?activity, "session.notify");
                let notification = SessionNotification {
                    session_id,
                    channel,
                    remote_address,
                    local_address,
                    activity,
                    created_at,
                };
                self.on_session_notify(ws, pending, notification).await?;
            }
            ServerFrame::CallIn(call_in) => self.on_call_in(call_in).await,
            ServerFrame::SessionClosed { session_id, reason } => {
                debug!(%session_id, ?reason, "session.closed");
                self.emit(ClientEvent::SessionClosed { session_id, reason })
                    .await;
            }
            ServerFrame::WaMsgIn { session_id, .. } => {
                debug!(%session_id, "message ignored: messaging is not supported by this SDK");
            }
        }
        Ok(())
    }

    /// A session offered to the connector: claimed at once (calls, in
    /// [`SessionMode::Auto`]) or handed to the application.
    async fn on_session_notify(
        &self,
        ws: &mut Ws,
        pending: &mut HashMap<String, Pending>,
        notification: SessionNotification,
    ) -> Result<(), String> {
        match self.config.session_mode {
            // Calls only: a messaging session claimed here would be lost to the
            // connector's other clients, since this SDK does not handle messages.
            SessionMode::Auto if notification.channel == Channel::Telco => {
                let session_id = notification.session_id;
                let Ok(id) = self.register(pending, Pending::AutoClaim(session_id.clone())) else {
                    warn!(%session_id, "too many requests in flight; session not claimed");
                    return Ok(());
                };
                let frame = ClientFrame::SessionOpen {
                    session_id,
                    req_id: Some(id),
                };
                Self::send_frame(ws, &frame).await?;
            }
            SessionMode::Auto | SessionMode::Manual => {
                self.emit(ClientEvent::SessionNotification(notification))
                    .await;
            }
        }
        Ok(())
    }

    async fn on_call_in(&self, c: CallIn) {
        let span = debug_span!("call", call_id = %c.call_id);
        span.in_scope(|| debug!(session_id = %c.session_id, "call.in"));
        let waiter = self.awaited.lock().remove(&c.session_id);
        let call = ActiveCall::new(
            CallParams {
                id: c.call_id,
                session_id: Some(c.session_id),
                caller: c.from,
                callee: c.to,
                url: c.url,
                token: c.token,
            },
            (&*self.config).into(),
            CallLinks {
                client_events: Some(self.events.downgrade()),
                shutdown: Some(self.shutdown.clone()),
                tracker: Some(self.tracker.clone()),
            },
        );
        let waiter = match waiter {
            Some(w) if !self.config.auto_connect_media => match w.send(Ok(call)) {
                Ok(()) => return,
                // The creator gave up: the application still gets the call.
                Err(call) => {
                    if let Ok(call) = call {
                        self.emit(ClientEvent::IncomingCall(call)).await;
                    }
                    return;
                }
            },
            w => w,
        };
        if !self.config.auto_connect_media {
            self.emit(ClientEvent::IncomingCall(call)).await;
            return;
        }
        // Opening the media connection takes a round trip: do it beside the driver so the
        // control connection keeps flowing.
        let events = self.events.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(
            async move {
                let connected = call.connect_media().await;
                if let Some(waiter) = waiter {
                    let result = connected.map(|()| call.clone()).map_err(Error::from);
                    match waiter.send(result) {
                        Ok(()) => return,
                        // The creator gave up: deliver it as any other call below.
                        Err(Ok(_)) => {}
                        Err(Err(e)) => {
                            warn!(error = %e, "media connection of an outbound call failed");
                            return;
                        }
                    }
                    tokio::select! {
                        _ = events.send(ClientEvent::IncomingCall(call)) => {}
                        () = shutdown.cancelled() => {}
                    }
                    return;
                }
                match connected {
                    Ok(()) => {
                        tokio::select! {
                            _ = events.send(ClientEvent::IncomingCall(call)) => {}
                            () = shutdown.cancelled() => {}
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "media connection failed; call not delivered");
                        let ev = ClientEvent::CallError {
                            call_id: call.id().to_owned(),
                            code: None,
                            // A connection error says so itself; others (a refused token)
                            // get the context.
                            message: Some(if e.is_connection() {
                                e.to_string()
                            } else {
                                format!("media connection failed: {e}")
                            }),
                        };
                        tokio::select! {
                            _ = events.send(ev) => {}
                            () = shutdown.cancelled() => {}
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
}

fn set_req_id(frame: &mut ClientFrame, id: String) {
    match frame {
        ClientFrame::SessionOpen { req_id, .. }
        | ClientFrame::SessionCreate { req_id, .. }
        | ClientFrame::CallFlowSetup { req_id, .. }
        | ClientFrame::WaMsgOut { req_id, .. } => *req_id = Some(id),
        ClientFrame::Setup { .. } | ClientFrame::SessionReady { .. } => {}
    }
}

/// Tries each base URL once, from `first` on and wrapping around, until one completes
/// `setup`; the connection, its id and the index of its URL. When none does, the error of a
/// refused authentication if there was one (it says more than a refused connection), else
/// the last.
async fn connect_to_any(
    config: &TelcoflowClientConfig,
    first: usize,
) -> Result<(Ws, String, usize), Error> {
    let count = config.base_urls.len();
    let mut failed: Option<Error> = None;
    for index in (first..first + count).map(|i| i % count) {
        match connect_and_setup(config, index).await {
            Ok((ws, sm_ws_id)) => return Ok((ws, sm_ws_id, index)),
            Err(e) => {
                if count > 1 {
                    debug!(base_url = %config.base_urls[index], error = %e, "base URL not reached");
                }
                if !failed.as_ref().is_some_and(Error::is_authentication) {
                    failed = Some(e);
                }
            }
        }
    }
    Err(failed.unwrap_or_else(|| Error::connection("no base URL")))
}

/// Opens the control WebSocket on base URL `index` and completes `setup`.
async fn connect_and_setup(
    config: &TelcoflowClientConfig,
    index: usize,
) -> Result<(Ws, String), Error> {
    let mut req = transport::request(&config.control_url(index))?;
    if let Auth::ApiKey {
        api_key,
        connector_uuid,
    } = &config.auth
    {
        transport::add_secret(&mut req, control::API_KEY_HEADER, api_key)?;
        transport::add_secret(&mut req, control::CONNECTOR_HEADER, connector_uuid)?;
    }
    let mut ws = transport::connect(req, &config.control_tls, config.connect_timeout).await?;
    let setup = ClientFrame::Setup {
        data: SetupData {
            sample_rate: config.sample_rate,
            audio_mode: config.audio_mode,
        },
    };
    ws.send(Message::Text(setup.encode().into()))
        .await
        .map_err(|e| Error::connection_with("cannot send setup", e))?;
    let wait = async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(t)) => match ServerFrame::decode(t.as_str()) {
                    Ok(ServerFrame::SetupDone { sm_ws_id }) => return Ok(sm_ws_id),
                    // Only the kind: a frame such as `call.in` carries a media token.
                    Ok(_) => debug!(
                        kind = ?control::FrameHeader::peek(t.as_str()).and_then(|h| h.kind),
                        "frame before setup.done ignored"
                    ),
                    Err(e) => debug!(error = %e, "undecodable frame before setup.done"),
                },
                Ok(Message::Close(f)) => {
                    return Err(Error::connection(format!(
                        "closed during setup{}",
                        f.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(Error::connection_with("setup failed", e)),
            }
        }
        Err(Error::connection("closed during setup"))
    };
    let sm_ws_id = tokio::time::timeout(config.setup_timeout, wait)
        .await
        .map_err(|_| Error::connection("no setup.done in time"))??;
    Ok((ws, sm_ws_id))
}
