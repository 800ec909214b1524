//! The console at `/console`: a page served from files built into the binary (no CDN, no build
//! step), and its live view, a WebSocket at [`LIVE_PATH`] that a connector logs in to with its
//! credentials in the first frame and that then sends what the connector has on this node
//! twice a second: calls in progress, open sessions, connected agents and the calls that
//! ended last. Read-only: it changes nothing. See docs/console.md.

use crate::call::{CallHandle, EndedCall, LiveSnapshot};
use crate::config::ConnectorConfig;
use crate::registry::{ControlView, SessionQuery};
use crate::state::Shared;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use telcoflow_proto::control::SessionState;
use telcoflow_proto::sim::AuthFrame;
use telcoflow_proto::stats::CallStats;
use tracing::debug;

/// Path of the live view's WebSocket.
pub(crate) const LIVE_PATH: &str = "/console/v1/live";
/// How often the live view sends a snapshot.
const LIVE_PERIOD: Duration = Duration::from_millis(500);
/// How long a live view has to send its credentials after connecting.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame the live view takes: it only ever receives its auth frame.
const MAX_LIVE_FRAME: usize = 4096;
/// Open sessions listed per snapshot.
const SESSIONS_LISTED: usize = 100;
/// Calls in progress listed per snapshot (the oldest first); `callsTotal` counts them all.
const CALLS_LISTED: usize = 100;
/// How long a snapshot waits for a call's quality figures: a call that cannot answer in time
/// (its queue full) shows its counts alone this time.
const STATS_WAIT: Duration = Duration::from_millis(200);

/// The console's files: name, content type, content.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../console/index.html"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/console.css"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/console.js"),
    ),
    (
        "phone-worklet.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/phone-worklet.js"),
    ),
];

/// The page may load only its own files and talk only to this server.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; media-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn file(name: &str) -> Response {
    let Some((_, content_type, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such file in the console").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        *body,
    )
        .into_response()
}

/// `GET /console`: the page.
pub(crate) async fn index() -> Response {
    file("index.html")
}

/// `GET /console/{file}`: its scripts and styles.
pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    file(&name)
}

/// `GET /console/v1/live`: upgrades; the credentials come in the first frame.
pub(crate) async fn live(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    let token = shared.tasks.token();
    ws.max_message_size(MAX_LIVE_FRAME)
        .max_frame_size(MAX_LIVE_FRAME)
        .on_upgrade(move |socket| async move {
            run_live(shared, socket).await;
            drop(token);
        })
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: crate::close_reason(reason).into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// Tells a live view whose frame was over [`MAX_LIVE_FRAME`] why it is being closed (1009).
async fn close_if_too_big(socket: &mut WebSocket, error: &axum::Error) {
    if let Some(close) = crate::close_for_receive_error(error, "the console live view's limit") {
        let _ = socket.send(Message::Close(Some(close))).await;
    }
}

/// The connector a live view logs in as, from its first frame; refused with a close frame
/// (1008 and why) otherwise.
async fn log_in(shared: &Shared, socket: &mut WebSocket) -> Option<Arc<ConnectorConfig>> {
    let first = tokio::select! {
        r = tokio::time::timeout(AUTH_TIMEOUT, socket.recv()) => r,
        () = shared.shutdown.cancelled() => return None,
    };
    let refused = match first {
        Ok(Some(Ok(Message::Text(text)))) => match AuthFrame::decode(&text) {
            Ok(auth) => match shared.check_key(&auth.connector_uuid, &auth.api_key) {
                Some(connector) => return Some(connector),
                None => "unauthorized: unknown connector or wrong API key".to_owned(),
            },
            Err(_) => "the first frame must be {\"type\":\"auth\",\"connectorUuid\",\"apiKey\"}"
                .to_owned(),
        },
        Ok(Some(Ok(_))) => "the first frame must be a text auth frame".to_owned(),
        Err(_) => "no auth frame in time".to_owned(),
        Ok(Some(Err(e))) => {
            close_if_too_big(socket, &e).await;
            return None;
        }
        Ok(None) => return None,
    };
    debug!(reason = %refused, "console live view refused");
    close(socket, close_code::POLICY, &refused).await;
    None
}

async fn run_live(shared: Arc<Shared>, mut socket: WebSocket) {
    let Some(connector) = log_in(&shared, &mut socket).await else {
        return;
    };
    // Each view costs a snapshot every LIVE_PERIOD: held until the view ends.
    let Some(_slot) = shared.reserve_console_view(&connector.uuid) else {
        let limit = shared.config.limits.max_console_views_per_connector;
        let reason = format!(
            "connector already has {limit} console live views open \
             (limits.max_console_views_per_connector)"
        );
        debug!(%reason, "console live view refused");
        close(&mut socket, close_code::POLICY, &reason).await;
        return;
    };
    let welcome = json!({
        "type": "welcome",
        "connectorUuid": connector.uuid,
        "connectorName": connector.name,
        "numbers": connector.numbers,
        "simPhones": shared.config.sim.enabled,
    });
    if socket
        .send(Message::Text(welcome.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let mut every = tokio::time::interval(LIVE_PERIOD);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Cancel-safe: an interval tick.
            _ = every.tick() => {
                let frame = snapshot(&shared, &connector.uuid).await;
                if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                    return;
                }
            }
            // Cancel-safe: a stream poll. The page sends nothing more; this notices it leave.
            msg = socket.recv() => match msg {
                Some(Err(e)) => {
                    close_if_too_big(&mut socket, &e).await;
                    return;
                }
                Some(Ok(Message::Close(_))) | None => return,
                Some(Ok(_)) => {}
            },
            () = shared.shutdown.cancelled() => {
                close(&mut socket, close_code::AWAY, "the server is shutting down").await;
                return;
            }
        }
    }
}

/// One `snapshot` frame: what `connector` has on this node now.
async fn snapshot(shared: &Shared, connector: &str) -> Value {
    let view = shared.registry.console_view(connector);
    let mut calls: Vec<CallHandle> = shared.registry.running_calls_of(connector);
    calls.sort_by_key(|c| c.live.started_unix_ms);
    let calls_total = calls.len();
    calls.truncate(CALLS_LISTED);
    // Each call's actor answers for its figures between two inputs; asked all at once.
    let calls: Vec<Value> = futures_util::future::join_all(
        calls
            .iter()
            .map(|c| running_call(c, view.holders.get(&*c.session_id))),
    )
    .await;
    // A store out of reach leaves the list empty; the calls and agents are node-local.
    let sessions = shared
        .registry
        .list(&SessionQuery {
            connector,
            channel: None,
            remote_address: None,
            state: Some(SessionState::Open),
            offset: 0,
            limit: SESSIONS_LISTED,
        })
        .await
        .map(|page| page.items)
        .unwrap_or_default();
    let sessions: Vec<Value> = sessions
        .into_iter()
        .map(|s| {
            let holder = view.holders.get(&s.id).cloned();
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["heldBy"] = json!(holder);
            v
        })
        .collect();
    let agents: Vec<Value> = view
        .controls
        .iter()
        .map(|c| agent(c, view.holders.values().filter(|h| **h == c.id).count()))
        .collect();
    let ended: Vec<Value> = shared
        .ended_calls
        .of(connector)
        .iter()
        .map(ended_call)
        .collect();
    json!({
        "type": "snapshot",
        "at": crate::token::unix_now(),
        "calls": calls,
        "callsTotal": calls_total,
        "sessions": sessions,
        "agents": agents,
        "ended": ended,
    })
}

async fn running_call(call: &CallHandle, holder: Option<&String>) -> Value {
    let live = call.live.snapshot();
    let stats = tokio::time::timeout(STATS_WAIT, call.stats())
        .await
        .ok()
        .and_then(Result::ok);
    json!({
        "callId": &*call.call_id,
        "sessionId": &*call.session_id,
        "from": &*call.from,
        "to": &*call.to,
        "state": live.state.as_str(),
        "durationMs": live.duration_ms,
        "talkMs": live.talk_ms,
        "agent": { "mediaAttached": live.agent_attached, "controlId": holder },
        "levels": {
            "fromCallerDbfs": live.level_from_caller_dbfs,
            "toCallerDbfs": live.level_to_caller_dbfs,
        },
        "quality": quality(&live, stats.as_ref()),
    })
}

/// The quality figures of a call as the console shows them: its frame counts, and from its
/// quality figures (`CallStats`, as `GET /public/v1/calls/{id}/stats` gives them) a summary
/// of the caller's side (jitter, loss, concealment, estimated MOS, round trip) and all of
/// them under `stats`.
fn quality(live: &LiveSnapshot, stats: Option<&CallStats>) -> Value {
    let mut q = counts(live);
    let Some(stats) = stats else {
        return q;
    };
    if let Some(caller) = stats.legs.first() {
        q["jitterMs"] = json!(caller.jitter_ms);
        q["lossPct"] = json!(caller.loss_pct);
        q["concealedMs"] = json!(caller.concealed_ms);
        q["mos"] = json!(caller.mos);
        q["rttMs"] = json!(caller.rtt_ms);
        if let Some(codec) = &caller.codec {
            q["codec"] = json!(codec);
        }
    }
    q["stats"] = serde_json::to_value(stats).unwrap_or_default();
    q
}

/// The frames a call counted.
fn counts(live: &LiveSnapshot) -> Value {
    json!({
        "framesFromCaller": live.frames_from_caller,
        "framesToCaller": live.frames_to_caller,
        "framesFromAgent": live.frames_from_agent,
        "framesToAgent": live.frames_to_agent,
        "framesDropped": live.frames_dropped,
        "playoutGaps": live.playout_gaps,
    })
}

fn agent(control: &ControlView, sessions_held: usize) -> Value {
    json!({
        "controlId": control.id,
        "sampleRate": control.setup.sample_rate,
        "audioMode": control.setup.audio_mode,
        "inboundCalls": control.inbound_calls,
        "sessionsHeld": sessions_held,
    })
}

fn ended_call(call: &EndedCall) -> Value {
    let last = &call.last;
    json!({
        "callId": call.call_id,
        "from": call.from,
        "to": call.to,
        "outcome": call.outcome,
        "startedAtMs": call.started_unix_ms,
        "durationMs": last.duration_ms,
        "talkMs": last.talk_ms,
        "quality": quality(last, call.stats.as_ref()),
    })
}
