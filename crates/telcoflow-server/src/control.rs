//! The control plane: `/v1/agent/session-manager`, one persistent WebSocket per application
//! process.
//!
//! After authentication on upgrade, the client must send `setup`; the connection then joins its
//! connector in the registry and receives `session.notify` for every new session. Requests
//! (`session.open`, `session.create`, ...) are answered with `response` frames carrying their
//! `reqId`. Frames the server cannot decode are answered with `INVALID_REQUEST` when they carry
//! a `reqId`, and otherwise logged; the connection stays up either way.

use crate::auth::authenticate;
use crate::call::CallHandle;
use crate::config::{ConnectorConfig, check_address};
use crate::registry::{self, ClaimError, ControlLink, ReadyOutcome};
use crate::state::Shared;
use crate::tls::PeerInfo;
use axum::extract::ws::{
    CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code,
    rejection::WebSocketUpgradeRejection,
};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::control::{
    Channel, ClientFrame, FrameHeader, Response as Reply, ServerFrame, SetupData,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// How long a new connection has to send `setup`.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Client frames read ahead of the one being handled; beyond it the connection is not read
/// until one is done (a client that floods requests waits for its answers).
const FRAMES_AHEAD: usize = 32;
/// How often a draining node's connection looks whether its agent's media is up.
const HANDOVER_POLL: Duration = Duration::from_millis(50);

/// `GET /v1/agent/session-manager`.
pub(crate) async fn control_ws(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let connector = match authenticate(&shared, &headers, &peer) {
        Ok(c) => c,
        Err(e) => return (StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    if shared.is_draining() {
        // Its clients reconnect (through a load balancer) to a node that stays.
        let body = "this node is draining: connect to another node of the service";
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    let limit = shared.config.limits.max_control_connections_per_connector;
    // The place is held from here until the connection ends (dropped with the upgrade task, or
    // with the handler if the upgrade never happens).
    let Some(slot) = shared.registry.reserve_control(&connector.uuid, limit) else {
        let body = format!(
            "connector already has {limit} control connections (limits.max_control_connections_per_connector)"
        );
        return (StatusCode::TOO_MANY_REQUESTS, body).into_response();
    };
    let token = shared.tasks.token();
    ws.max_message_size(shared.config.limits.max_control_frame_bytes)
        .read_buffer_size(crate::WS_READ_BUFFER)
        .max_frame_size(shared.config.limits.max_control_frame_bytes)
        .on_upgrade(move |socket| async move {
            let sm_ws_id = uuid::Uuid::new_v4().to_string();
            let span = info_span!("control", sm_ws_id = %sm_ws_id, connector = %connector.uuid);
            run(shared, connector, socket, sm_ws_id)
                .instrument(span)
                .await;
            drop(slot);
            drop(token);
        })
}

async fn run(
    shared: Arc<Shared>,
    connector: Arc<ConnectorConfig>,
    mut socket: WebSocket,
    sm_ws_id: String,
) {
    let Some(setup) = wait_for_setup(&shared, &mut socket).await else {
        return;
    };
    let (tx, mut rx) = mpsc::channel(shared.config.limits.control_send_queue);
    let kill = CancellationToken::new();
    let done = ServerFrame::SetupDone {
        sm_ws_id: sm_ws_id.clone(),
    };
    if socket
        .send(Message::Text(done.encode().into()))
        .await
        .is_err()
    {
        return;
    }
    let link = ControlLink {
        connector: connector.uuid.as_str().into(),
        setup,
        tx,
        kill: kill.clone(),
        inbound_calls: true,
    };
    if let Err(e) = shared.registry.add_control(&sm_ws_id, link.clone()).await {
        // The connection still hears of new sessions; those already waiting are not offered.
        warn!(error = %e, "cannot offer the connector's waiting sessions");
    }
    shared.metrics.control_connections_total.inc();
    let _open = crate::metrics::Held::new(&shared.metrics.control_connections);
    info!(
        sample_rate = setup.sample_rate.hz(),
        audio_mode = setup.audio_mode.as_str(),
        "control connection ready"
    );
    let mut conn = Conn {
        shared: shared.clone(),
        connector,
        sm_ws_id: sm_ws_id.clone(),
        link,
    };
    // Frames are handled in order by a task of their own: a request that waits on the
    // cluster (a claim whose owner node is slow, up to its request timeout) must not hold up
    // the frames going out to the client, its pings or the close of the connection.
    let (frames, mut incoming) = mpsc::channel::<Utf8Bytes>(FRAMES_AHEAD);
    let handler = tokio::spawn(
        async move {
            while let Some(text) = incoming.recv().await {
                conn.on_text(&text).await;
            }
        }
        .in_current_span(),
    );
    // The server pings too, so that a client that never sends anything still proves it is
    // alive with pongs; a connection silent past the idle timeout is dead (no FIN arrived)
    // and is dropped, which offers its waiting sessions to the others.
    let mut ping = tokio::time::interval(shared.config.control_ping_interval());
    ping.reset();
    let idle_timeout = shared.config.control_idle_timeout();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    // Set when the node starts draining: the connection leaves once its agent has opened the
    // media of the sessions it claimed, or at this instant.
    let mut leave_by: Option<tokio::time::Instant> = None;
    let handover = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(handover);
    loop {
        tokio::select! {
            // Cancel-safe: WebSocket::recv is a stream poll.
            msg = socket.recv() => {
                idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                match msg {
                Some(Ok(Message::Text(text))) => {
                    if frames.send(text).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Binary(_))) => debug!("binary frame on the control connection ignored"),
                Some(Ok(_)) => {} // ping/pong are answered by the WebSocket layer
                Some(Err(e)) => {
                    debug!(error = %e, "control connection failed");
                    close_if_too_big(&mut socket, &e).await;
                    break;
                }
                None => break,
                }
            }
            // Cancel-safe: a missed tick is just late.
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            // Cancel-safe: the sleep is pinned and only reset.
            () = &mut idle => {
                warn!("nothing heard from the client for {idle_timeout:?}; closing");
                let close = CloseFrame {
                    code: close_code::AWAY,
                    reason: "idle: no frame or pong within the idle timeout".into(),
                };
                let _ = socket.send(Message::Close(Some(close))).await;
                break;
            }
            // Cancel-safe: mpsc recv. `None` cannot happen while `conn.tx` lives.
            Some(frame) = rx.recv() => {
                if let Err(e) = socket.send(Message::Text(frame.encode().into())).await {
                    // A client that stopped reading ends here after limits.write_timeout_secs.
                    info!(error = %e, "cannot write to the control connection; closing");
                    break;
                }
            }
            // Cancel-safe: only observes the token.
            () = kill.cancelled() => {
                shared.metrics.overflow(crate::metrics::QueueKind::ControlSend).inc();
                let close = CloseFrame {
                    code: close_code::POLICY,
                    reason: "send queue full: the client is not reading its frames".into(),
                };
                let _ = socket.send(Message::Close(Some(close))).await;
                break;
            }
            // Cancel-safe: only observes the token.
            () = shared.draining.cancelled(), if leave_by.is_none() => {
                leave_by = Some(tokio::time::Instant::now() + shared.config.drain_handover());
                handover.as_mut().reset(tokio::time::Instant::now());
            }
            // Cancel-safe: the sleep is pinned and only reset.
            () = &mut handover, if leave_by.is_some() => {
                // An agent that claimed a session and is opening its media (the official SDK
                // opens it at `answer()`) keeps this connection until the media is up: closed
                // now, its claim would be offered again and its media token refused.
                let now = tokio::time::Instant::now();
                if shared.registry.holds_unattached(&sm_ws_id)
                    && leave_by.is_some_and(|by| now < by)
                {
                    handover.as_mut().reset(now + HANDOVER_POLL);
                    continue;
                }
                // 1001 (Going Away): the client reconnects, through its load balancer, to
                // another node (the SDKs take 1001 as a normal close, where 1012 would be
                // logged as an error); the sessions it still held whose media is not up are
                // offered again there (RESUME) below. Calls whose media is up go on over their
                // media connections.
                let close = CloseFrame {
                    code: close_code::AWAY,
                    reason: "this node is draining: reconnect to another node".into(),
                };
                let _ = socket.send(Message::Close(Some(close))).await;
                break;
            }
            // Cancel-safe: only observes the token.
            () = shared.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
        }
    }
    // The frames read so far are handled before the connection leaves the registry, so that
    // a claim it made is released with it rather than left bound. Each is bounded by the
    // registry's own deadlines.
    drop(frames);
    let _ = handler.await;
    if let Err(e) = shared.registry.remove_control(&sm_ws_id).await {
        warn!(error = %e, "cannot offer the sessions this connection held to the others");
    }
    info!("control connection closed");
}

async fn wait_for_setup(shared: &Shared, socket: &mut WebSocket) -> Option<SetupData> {
    let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    loop {
        let msg = tokio::select! {
            r = tokio::time::timeout_at(deadline, socket.recv()) => r,
            () = shared.shutdown.cancelled() => return None,
        };
        match msg {
            Ok(Some(Ok(Message::Text(text)))) => match ClientFrame::decode(&text) {
                Ok(ClientFrame::Setup { data }) => return Some(data),
                Ok(frame) => {
                    if let Some(req_id) = frame.req_id() {
                        let reply = Reply::error(
                            Some(req_id.to_owned()),
                            ErrorCode::InvalidRequest,
                            json!({"message": "send setup first"}),
                        );
                        let _ = socket
                            .send(Message::Text(ServerFrame::Response(reply).encode().into()))
                            .await;
                    }
                }
                Err(e) => debug!(error = %e, "undecodable frame before setup"),
            },
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => {
                close_if_too_big(socket, &e).await;
                return None;
            }
            Ok(None) => return None,
            Err(_) => {
                warn!("no setup within {SETUP_TIMEOUT:?}; closing");
                let _ = socket.send(Message::Close(None)).await;
                return None;
            }
        }
    }
}

/// Tells a client whose frame was over `max_control_frame_bytes` why it is being closed.
async fn close_if_too_big(socket: &mut WebSocket, error: &axum::Error) {
    if let Some(close) = crate::close_for_receive_error(error, "limits.max_control_frame_bytes") {
        let _ = socket.send(Message::Close(Some(close))).await;
    }
}

struct Conn {
    shared: Arc<Shared>,
    connector: Arc<ConnectorConfig>,
    sm_ws_id: String,
    link: ControlLink,
}

impl Conn {
    fn send(&self, frame: ServerFrame) {
        self.link.send(frame);
    }

    fn reply_ok(&self, req_id: Option<String>, content: serde_json::Value) {
        self.send(ServerFrame::Response(Reply::ok(req_id, content)));
    }

    fn reply_err(&self, req_id: Option<String>, code: ErrorCode, message: impl Into<String>) {
        let content = json!({ "message": message.into() });
        self.send(ServerFrame::Response(Reply::error(req_id, code, content)));
    }

    /// Handles one frame. Directory requests are awaited here, so the connection's frames
    /// are answered in order.
    async fn on_text(&mut self, text: &str) {
        let frame = match ClientFrame::decode(text) {
            Ok(frame) => frame,
            Err(e) => {
                let header = FrameHeader::peek(text).unwrap_or_default();
                debug!(kind = ?header.kind, error = %e, "undecodable control frame");
                if header.req_id.is_some() {
                    let what = header.kind.as_deref().unwrap_or("(no type)");
                    self.reply_err(
                        header.req_id,
                        ErrorCode::InvalidRequest,
                        format!("cannot decode '{what}' frame: {e}"),
                    );
                }
                return;
            }
        };
        debug!(?frame, "control frame");
        match frame {
            ClientFrame::Setup { .. } => debug!("repeated setup ignored"),
            ClientFrame::SessionOpen { session_id, req_id } => {
                match self
                    .shared
                    .registry
                    .claim(&self.sm_ws_id, &session_id)
                    .await
                {
                    Ok(info) => self.reply_ok(req_id, json!({ "session": info })),
                    Err(e) => {
                        let content = match &e {
                            ClaimError::Busy { bound_sm_ws_id } => {
                                json!({ "boundSmWsId": bound_sm_ws_id })
                            }
                            ClaimError::Registry(e) => json!({ "message": e.to_string() }),
                            _ => {
                                json!({ "message": format!("session {session_id} cannot be opened") })
                            }
                        };
                        self.send(ServerFrame::Response(Reply::error(
                            req_id,
                            e.code(),
                            content,
                        )));
                    }
                }
            }
            ClientFrame::SessionReady { session_id } => {
                match self
                    .shared
                    .registry
                    .ready(&self.sm_ws_id, &session_id)
                    .await
                {
                    Ok(ReadyOutcome::Call(call)) => self.send(self.call_in(&call)),
                    Ok(ReadyOutcome::CallIn(frame)) => self.send(frame),
                    Ok(ReadyOutcome::NotOpen) => {
                        debug!(%session_id, "session.ready for a session this connection does not hold")
                    }
                    Ok(ReadyOutcome::Nothing) => {}
                    // `session.ready` has no reply to carry an error: the app waits for a
                    // `call.in` that does not come, as for any call it did not get.
                    Err(e) => warn!(%session_id, error = %e, "session.ready not delivered"),
                }
            }
            ClientFrame::SessionCreate {
                channel,
                remote_address,
                req_id,
            } => {
                self.on_create(channel, &remote_address, req_id).await;
            }
            ClientFrame::CallFlowSetup { data, req_id } => self.on_call_flow(&data, req_id),
            ClientFrame::WaMsgOut { req_id, .. } => {
                self.reply_err(
                    req_id,
                    ErrorCode::ChannelNotConfigured,
                    "messaging (WA) is not configured on this server",
                );
            }
        }
    }

    /// `call_flow.setup`: `inboundCall` "NO" stops incoming calls being offered to this
    /// connection; "ALL" (and "MISSED_ONLY", which this server treats as "ALL": it has no
    /// human queue for calls to be missed by) offers them. The other keys are accepted as is.
    fn on_call_flow(&self, data: &serde_json::Value, req_id: Option<String>) {
        let inbound = match data.get("inboundCall").and_then(serde_json::Value::as_str) {
            None | Some("ALL" | "MISSED_ONLY") => true,
            Some("NO") => false,
            Some(other) => {
                return self.reply_err(
                    req_id,
                    ErrorCode::InvalidRequest,
                    format!("inboundCall must be ALL, MISSED_ONLY or NO, got '{other}'"),
                );
            }
        };
        self.shared
            .registry
            .set_inbound_calls(&self.sm_ws_id, inbound);
        self.reply_ok(req_id, json!({}));
    }

    async fn on_create(&self, channel: Channel, remote: &str, req_id: Option<String>) {
        if channel != Channel::Telco {
            return self.reply_err(
                req_id,
                ErrorCode::ChannelNotConfigured,
                "messaging (WA) is not configured on this server",
            );
        }
        // Checked before anything stores it: sessions keep their remote address after closing.
        if let Err(why) = check_address("remoteAddress", remote) {
            return self.reply_err(req_id, ErrorCode::InvalidRequest, why);
        }
        match self
            .shared
            .registry
            .open_session_for(&self.connector.uuid, channel, remote)
            .await
        {
            Ok(Some(existing)) => {
                return self.reply_ok(req_id, json!({ "sessionId": existing, "created": false }));
            }
            Ok(None) => {}
            Err(e) => return self.reply_err(req_id, e.code(), e.to_string()),
        }
        match crate::call::spawn_outbound(
            &self.shared,
            self.connector.clone(),
            &self.sm_ws_id,
            self.link.setup,
            remote,
        ) {
            Ok(call) => self.reply_ok(
                req_id,
                json!({ "sessionId": call.session_id.as_ref(), "created": true }),
            ),
            Err((code, message)) => self.reply_err(req_id, code, message),
        }
    }

    fn call_in(&self, call: &CallHandle) -> ServerFrame {
        let call_in = registry::call_in(
            &self.shared.signer,
            &self.shared.public_url,
            &self.connector.uuid,
            call,
        );
        self.shared
            .registry
            .set_media_token(&call.session_id, &call_in.token);
        ServerFrame::CallIn(call_in)
    }
}
