//! The HTTP API under `/public/v1`, authenticated like the control plane. Errors are JSON
//! `{code, message}` with the protocol's error codes, mapped to a status in one place
//! ([`ApiError`]).

use crate::auth::{PhoneQuery, admit_phone, authenticate};
use crate::call::StatsError;
use crate::recording::{DeleteError, Recordings};
use crate::registry::{CloseError, RegistryError, SessionQuery};
use crate::state::Shared;
use crate::tls::PeerInfo;
use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::control::{Channel, CloseReason, SessionState};
use telcoflow_proto::recording::{RecordingInfo, RecordingPage};

/// An API failure.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: ErrorCode,
    message: String,
    /// The registry's store cannot be reached: 503, whatever the code.
    unavailable: bool,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            unavailable: false,
        }
    }

    fn status(&self) -> StatusCode {
        if self.unavailable {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        match self.code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::SessionNotFound
            | ErrorCode::CallNotFound
            | ErrorCode::RecordingNotFound
            | ErrorCode::RecordingNotConfigured => StatusCode::NOT_FOUND,
            ErrorCode::InvalidState => StatusCode::CONFLICT,
            ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        Self {
            code: e.code(),
            message: e.to_string(),
            unavailable: true,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code, "message": self.message });
        (self.status(), Json(body)).into_response()
    }
}

fn auth(
    shared: &Shared,
    headers: &HeaderMap,
    peer: &PeerInfo,
) -> Result<Arc<crate::config::ConnectorConfig>, ApiError> {
    authenticate(shared, headers, peer)
        .map_err(|e| ApiError::new(ErrorCode::Unauthorized, e.to_string()))
}

/// Sessions per page of `GET /public/v1/sessions` when the query gives no `limit`, and the
/// most a `limit` may ask for.
pub(crate) const MAX_SESSIONS_PAGE: usize = 1000;

/// Query of `GET /public/v1/sessions`. Values are strings so that a bad one gets our own
/// message rather than a generic extractor error.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListQuery {
    channel: Option<String>,
    remote_address: Option<String>,
    state: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
}

/// A count from the query: `default` when absent, else a whole number in `min..=max`.
fn parse_count(
    name: &str,
    value: Option<&str>,
    default: usize,
    (min, max): (usize, usize),
) -> Result<usize, ApiError> {
    let Some(value) = value else {
        return Ok(default);
    };
    match value.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{name} must be a whole number from {min} to {max}, got '{value}'"),
        )),
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    name: &str,
    value: &str,
    allowed: &str,
) -> Result<T, ApiError> {
    serde_json::from_value(serde_json::Value::from(value)).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{name} must be one of {allowed}, got '{value}'"),
        )
    })
}

/// `GET /public/v1/sessions?channel=&remoteAddress=&state=&limit=&offset=`: `{"items": [..]}`,
/// oldest first, at most `limit` (default and maximum [`MAX_SESSIONS_PAGE`]) from `offset`
/// (default 0), with `"nextOffset"` when more sessions follow.
pub(crate) async fn list_sessions(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let connector = auth(&shared, &headers, &peer)?;
    let Query(query) =
        query.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let channel: Option<Channel> = query
        .channel
        .as_deref()
        .map(|c| parse("channel", c, "TELCO, WA"))
        .transpose()?;
    let state: Option<SessionState> = query
        .state
        .as_deref()
        .map(|s| parse("state", s, "OPEN, CLOSED"))
        .transpose()?;
    let limit = parse_count(
        "limit",
        query.limit.as_deref(),
        MAX_SESSIONS_PAGE,
        (1, MAX_SESSIONS_PAGE),
    )?;
    let offset = parse_count("offset", query.offset.as_deref(), 0, (0, usize::MAX))?;
    let page = shared
        .registry
        .list(&SessionQuery {
            connector: &connector.uuid,
            channel,
            remote_address: query.remote_address.as_deref(),
            state,
            offset,
            limit,
        })
        .await
        .map_err(ApiError::from)?;
    let mut body = json!({ "items": page.items });
    if let Some(next) = page.next_offset {
        body["nextOffset"] = json!(next);
    }
    Ok(Json(body))
}

/// `GET /public/v1/calls/{id}/stats`: the quality figures of a call this node runs, so far
/// ([`CallStats`](telcoflow_proto::stats::CallStats)). A call that is not running here, or is
/// another connector's, is `404 CALL_NOT_FOUND` alike: a connector learns nothing of calls not
/// its own. A call already answering as many stats requests as it takes, or not answering
/// within [`STATS_TIMEOUT`], is `503 TIMEOUT`: ask again.
pub(crate) async fn call_stats(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    Path(call_id): Path<String>,
) -> Result<Json<telcoflow_proto::stats::CallStats>, ApiError> {
    let connector = auth(&shared, &headers, &peer)?;
    let not_found = || {
        ApiError::new(
            ErrorCode::CallNotFound,
            format!("no running call {call_id}"),
        )
    };
    let call = shared
        .registry
        .call_by_id(&call_id)
        .filter(|c| *c.connector == *connector.uuid)
        .ok_or_else(not_found)?;
    let busy = |message: String| ApiError {
        code: ErrorCode::Timeout,
        message,
        unavailable: true,
    };
    match tokio::time::timeout(STATS_TIMEOUT, call.stats()).await {
        Ok(Ok(stats)) => Ok(Json(stats)),
        Ok(Err(StatsError::Ended)) => Err(not_found()),
        Ok(Err(StatsError::Busy)) => Err(busy(format!(
            "call {call_id} is busy answering other stats requests; retry shortly"
        ))),
        Err(_) => Err(busy(format!(
            "call {call_id} did not report its stats within {} s; retry shortly",
            STATS_TIMEOUT.as_secs()
        ))),
    }
}

/// How long `GET /public/v1/calls/{id}/stats` waits for the call's answer.
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Query of `GET /public/v1/recordings`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RecordingsQuery {
    call_id: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
}

/// Recordings per page of `GET /public/v1/recordings` when the query gives no `limit`, and
/// the most a `limit` may ask for.
pub(crate) const MAX_RECORDINGS_PAGE: usize = 1000;

/// How long a download waits for a stopped recording's file to be finished.
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// This node's recordings, or `404 RECORDING_NOT_CONFIGURED`.
fn recordings(shared: &Shared) -> Result<&Arc<Recordings>, ApiError> {
    shared.recordings.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::RecordingNotConfigured,
            "recording is not configured on this server ([recording] dir)",
        )
    })
}

/// The recording id in a path: only a UUID names a recording (and a file); anything else is
/// not found, like another connector's recording.
fn recording_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id).map_err(|_| recording_not_found(id))
}

fn recording_not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::RecordingNotFound,
        format!("no recording {id} on this node"),
    )
}

/// `GET /public/v1/recordings?callId=&limit=&offset=`: `{"items": [..]}`, the connector's
/// recordings on this node oldest first, at most `limit` (default and maximum
/// [`MAX_RECORDINGS_PAGE`]) from `offset`, with `"nextOffset"` when more follow.
pub(crate) async fn list_recordings(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    query: Result<Query<RecordingsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RecordingPage>, ApiError> {
    let connector = auth(&shared, &headers, &peer)?;
    let store = recordings(&shared)?;
    let Query(query) =
        query.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let limit = parse_count(
        "limit",
        query.limit.as_deref(),
        MAX_RECORDINGS_PAGE,
        (1, MAX_RECORDINGS_PAGE),
    )?;
    let offset = parse_count("offset", query.offset.as_deref(), 0, (0, usize::MAX))?;
    Ok(Json(store.list(
        &connector.uuid,
        query.call_id.as_deref(),
        offset,
        limit,
    )))
}

/// `GET /public/v1/recordings/{id}`: the recording's metadata
/// ([`RecordingInfo`](telcoflow_proto::recording::RecordingInfo)). Another connector's
/// recording is `404 RECORDING_NOT_FOUND`, like one that does not exist.
pub(crate) async fn recording(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<RecordingInfo>, ApiError> {
    let connector = auth(&shared, &headers, &peer)?;
    let store = recordings(&shared)?;
    let uuid = recording_id(&id)?;
    store
        .get(&connector.uuid, &uuid)
        .map(Json)
        .ok_or_else(|| recording_not_found(&id))
}

/// `GET /public/v1/recordings/{id}/audio`: the WAV file (`audio/wav`), streamed. A recording
/// being finished is waited for (a few seconds at most); one still running is `409
/// INVALID_STATE`.
pub(crate) async fn recording_audio(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let connector = auth(&shared, &headers, &peer)?;
    let store = recordings(&shared)?;
    let uuid = recording_id(&id)?;
    match store
        .finished_info(&connector.uuid, &uuid, FINISH_WAIT)
        .await
    {
        None => return Err(recording_not_found(&id)),
        Some(Err(info)) => {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "recording {id} is {}: stop it (call.record) or end the call first",
                    info.state.as_str()
                ),
            ));
        }
        Some(Ok(_)) => {}
    }
    let file = tokio::fs::File::open(store.audio_path(&uuid))
        .await
        .map_err(|_| recording_not_found(&id))?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("audio/wav"),
    );
    if let Some(len) = len {
        h.insert(axum::http::header::CONTENT_LENGTH, len.into());
    }
    // The name is the id the server made (a UUID): nothing a client sent.
    if let Ok(v) = format!("attachment; filename=\"{uuid}.wav\"").parse() {
        h.insert(axum::http::header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// `DELETE /public/v1/recordings/{id}`: deletes a finished recording (`{"deleted": id}`);
/// one still running is `409 INVALID_STATE`.
pub(crate) async fn delete_recording(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let connector = auth(&shared, &headers, &peer)?;
    let store = recordings(&shared)?.clone();
    let uuid = recording_id(&id)?;
    let owner = connector.uuid.clone();
    let deleted = tokio::task::spawn_blocking(move || store.delete(&owner, &uuid))
        .await
        .map_err(|_| ApiError::new(ErrorCode::InternalError, "the deletion failed"))?;
    match deleted {
        Ok(()) => Ok(Json(json!({ "deleted": uuid.to_string() }))),
        Err(DeleteError::NotFound) => Err(recording_not_found(&id)),
        Err(DeleteError::Running) => Err(ApiError::new(
            ErrorCode::InvalidState,
            format!("recording {id} is still running: stop it first"),
        )),
    }
}

/// `POST /public/v1/sessions/{id}/close`: ends the session's call for everyone.
pub(crate) async fn close_session(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    Path(session_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let connector = auth(&shared, &headers, &peer)?;
    let reason = CloseReason::SdkRequest;
    match shared
        .registry
        .close_session(&connector.uuid, &session_id, reason)
        .await
    {
        Ok(()) => {}
        Err(CloseError::NotFound) => {
            return Err(ApiError::new(
                ErrorCode::SessionNotFound,
                format!("no open session {session_id}"),
            ));
        }
        Err(CloseError::JustEnded) => {
            return Err(ApiError::new(
                ErrorCode::SessionNotFound,
                format!("session {session_id} has just ended"),
            ));
        }
        Err(CloseError::Registry(e)) => return Err(e.into()),
    }
    Ok(Json(
        json!({ "closedAt": crate::token::unix_now(), "reason": reason }),
    ))
}

/// `GET /v1/sim/phone`: admits a simulated phone (see `auth::admit_phone`), then upgrades.
pub(crate) async fn sim_phone(
    State(sim): State<crate::net::sim::SimState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    query: Result<Query<PhoneQuery>, axum::extract::rejection::QueryRejection>,
    ws: axum::extract::WebSocketUpgrade,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => return (StatusCode::BAD_REQUEST, e.body_text()).into_response(),
    };
    match admit_phone(&sim.shared, &headers, &query, &peer) {
        Ok(admission) => crate::net::sim::upgrade(sim, ws, admission),
        Err((status, body)) => {
            tracing::debug!(%status, %body, "simulated phone refused");
            (status, body).into_response()
        }
    }
}

/// `GET /readyz`: whether this node takes new calls, for load balancers. 200
/// `{"status": "ready"}`; 503 `{"status": "draining"}` once it drains, or `{"status":
/// "unavailable", "reason": ..}` while its cluster's NATS is out of reach. Unauthenticated,
/// like `/healthz` (which only says the process is alive).
pub(crate) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let (status, body) = if shared.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "draining" }),
        )
    } else if let Some(reason) = shared.registry.unavailable() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "unavailable", "reason": reason }),
        )
    } else {
        (StatusCode::OK, json!({ "status": "ready" }))
    };
    (status, Json(body)).into_response()
}

/// `POST /admin/v1/drain`: starts draining this node (see `drain`); answers at once, 202
/// `{"draining": true, "calls": N, "graceSecs": G}` with the calls still running. Authorized
/// by `Authorization: Bearer <admin_token>` when the config sets one, and then by nothing
/// else: draining stops the node for every connector, so on a server shared by tenants no
/// tenant's key may do it. Without `admin_token`, any connector's credentials (as
/// `/public/v1`). Asking again only reports.
pub(crate) async fn drain(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&shared, &headers, &peer, "draining")?;
    let calls = crate::drain::start(&shared);
    let body = json!({
        "draining": true,
        "calls": calls,
        "graceSecs": shared.config.drain_grace_secs,
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Lets through an operator's request: with `admin_token` set, only that token (a
/// connector's key gets 403, anything else 401); without one, any connector's credentials.
/// `what` names the action in the errors ("draining").
fn admin(
    shared: &Shared,
    headers: &HeaderMap,
    peer: &PeerInfo,
    what: &str,
) -> Result<(), ApiError> {
    if !has_admin_token(shared) {
        return auth(shared, headers, peer).map(|_| ());
    }
    if admin_token_matches(shared, headers) {
        return Ok(());
    }
    Err(if authenticate(shared, headers, peer).is_ok() {
        ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "this server has an admin_token: {what} takes it \
                 (Authorization: Bearer <admin_token>), not a connector's key"
            ),
        )
    } else {
        ApiError::new(
            ErrorCode::Unauthorized,
            format!("{what} takes the admin token: Authorization: Bearer <admin_token>"),
        )
    })
}

/// `GET /admin/v1/sip/registrations`: each outbound SIP registration (`[[sip.registrations]]`)
/// as it last reported, in config order: `{"registrations": [{"registrar", "aor",
/// "transport", "state", "expiresSecs", "lastStatus", "reason", "retryInSecs", "since"}]}`
/// (no credentials). Authorized as `POST /admin/v1/drain`.
pub(crate) async fn sip_registrations(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&shared, &headers, &peer, "reading the SIP registrations")?;
    let body = json!({ "registrations": shared.sip_registrations.snapshot() });
    Ok((StatusCode::OK, Json(body)).into_response())
}

fn has_admin_token(shared: &Shared) -> bool {
    shared
        .config
        .admin_token
        .as_deref()
        .is_some_and(|t| !t.is_empty())
}

/// Whether the request carries the configured admin token (compared in constant time).
fn admin_token_matches(shared: &Shared, headers: &HeaderMap) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(token) = shared
        .config
        .admin_token
        .as_deref()
        .filter(|t| !t.is_empty())
    else {
        return false;
    };
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes())))
}

/// `GET /metrics`: the Prometheus text format. With `[metrics] token` set, every client
/// needs `Authorization: Bearer <token>`; without it, loopback clients only (see
/// [`metrics_access`]); 404 when `[metrics] enabled = false`.
pub(crate) async fn metrics(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Err((status, why)) = metrics_access(&shared.config.metrics, peer.addr.ip(), bearer) {
        return (status, format!("{why}\n")).into_response();
    }
    let m = &shared.metrics;
    // Read at the scrape rather than kept up at each change.
    m.calls_active
        .set(i64::try_from(shared.registry.running_call_count()).unwrap_or(i64::MAX));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        m.encode(),
    )
        .into_response()
}

/// Whether a client at `ip` presenting `bearer` may read `/metrics`: 404 when disabled;
/// with a token configured, 401 to any client without it, loopback included (a reverse
/// proxy on the same host makes every client look like loopback); without one, loopback
/// only, others 403.
fn metrics_access(
    config: &crate::config::MetricsConfig,
    ip: std::net::IpAddr,
    bearer: Option<&str>,
) -> Result<(), (StatusCode, &'static str)> {
    use subtle::ConstantTimeEq as _;
    if !config.enabled {
        return Err((
            StatusCode::NOT_FOUND,
            "metrics are disabled ([metrics] enabled = false)",
        ));
    }
    let Some(token) = config.token.as_deref().filter(|t| !t.is_empty()) else {
        if ip.to_canonical().is_loopback() {
            return Ok(());
        }
        return Err((
            StatusCode::FORBIDDEN,
            "metrics are open to loopback clients only: set [metrics] token to let others \
             in with Authorization: Bearer <token>",
        ));
    };
    match bearer {
        None => Err((
            StatusCode::UNAUTHORIZED,
            "metrics need Authorization: Bearer <token> ([metrics] token)",
        )),
        Some(given) if bool::from(given.as_bytes().ct_eq(token.as_bytes())) => Ok(()),
        Some(_) => Err((
            StatusCode::UNAUTHORIZED,
            "wrong metrics token (Authorization: Bearer <token>, [metrics] token)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricsConfig;

    #[test]
    fn metrics_are_open_on_loopback_without_a_token_and_take_it_from_everyone_with_one() {
        let open = MetricsConfig::default();
        let with_token = MetricsConfig {
            token: Some("s3cret".into()),
            ..MetricsConfig::default()
        };
        let off = MetricsConfig {
            enabled: false,
            ..with_token.clone()
        };
        let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let far: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let status =
            |c: &MetricsConfig, ip, bearer| metrics_access(c, ip, bearer).err().map(|e| e.0);
        assert_eq!(status(&open, lo, None), None);
        assert_eq!(status(&open, lo6, None), None);
        assert_eq!(status(&open, far, None), Some(StatusCode::FORBIDDEN));
        assert_eq!(status(&open, far, Some("x")), Some(StatusCode::FORBIDDEN));
        assert_eq!(
            status(&with_token, far, None),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(&with_token, far, Some("nope")),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(status(&with_token, far, Some("s3cret")), None);
        // A reverse proxy on the same host connects from loopback: the token still counts.
        for ip in [lo, lo6] {
            assert_eq!(
                status(&with_token, ip, None),
                Some(StatusCode::UNAUTHORIZED)
            );
            assert_eq!(
                status(&with_token, ip, Some("nope")),
                Some(StatusCode::UNAUTHORIZED)
            );
            assert_eq!(status(&with_token, ip, Some("s3cret")), None);
        }
        assert_eq!(status(&off, lo, None), Some(StatusCode::NOT_FOUND));
        assert_eq!(
            status(&off, far, Some("s3cret")),
            Some(StatusCode::NOT_FOUND)
        );
    }
}
