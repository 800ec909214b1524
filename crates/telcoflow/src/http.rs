//! The server's HTTP API: sessions (`/public/v1/sessions`), used by
//! [`TelcoflowClient::list_sessions`](crate::TelcoflowClient::list_sessions) and
//! [`TelcoflowClient::close_session`](crate::TelcoflowClient::close_session), and recordings
//! (`/public/v1/recordings`, an extension of this server), used by
//! [`TelcoflowClient::list_recordings`](crate::TelcoflowClient::list_recordings) and the
//! methods beside it.
//!
//! One HTTP/1.1 connection per request (hyper): these are occasional management calls, and a
//! fresh connection follows the client to whichever base URL it is connected to. Same
//! credentials and TLS settings as the control connection.

use crate::Error;
use crate::config::{Auth, TelcoflowClientConfig};
use crate::error::ServerCode;
use bytes::{Bytes, BytesMut};
use hyper::body::Body;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use std::pin::Pin;
use telcoflow_proto::control::{self, Channel, CloseReason, SessionInfo, SessionState};
use telcoflow_proto::recording::{RecordingInfo, RecordingPage};
use tokio::net::TcpStream;
use tracing::debug;

/// The most of a response body read; the server's pages are far smaller.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Filters and page of [`TelcoflowClient::list_sessions`](crate::TelcoflowClient::list_sessions).
/// The default lists every session of the connector, first page; the Python SDK's
/// `list_sessions` lists open ones ([`SessionQuery::open`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionQuery {
    /// Only sessions of this channel (`channel=`).
    pub channel: Option<Channel>,
    /// Only sessions with this far party (`remoteAddress=`).
    pub remote_address: Option<String>,
    /// Only open or only closed sessions (`state=`).
    pub state: Option<SessionState>,
    /// At most this many (`limit=`, the server's maximum when unset).
    pub limit: Option<usize>,
    /// Skip this many (`offset=`): [`SessionPage::next_offset`] of the previous page.
    pub offset: Option<usize>,
}

impl SessionQuery {
    /// Open sessions only, as the Python SDK lists them.
    pub fn open() -> Self {
        Self::default().state(SessionState::Open)
    }

    /// Filters on the channel.
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self
    }

    /// Filters on the far party.
    pub fn remote_address(mut self, remote_address: impl Into<String>) -> Self {
        self.remote_address = Some(remote_address.into());
        self
    }

    /// Filters on the state.
    pub fn state(mut self, state: SessionState) -> Self {
        self.state = Some(state);
        self
    }

    /// Page size.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Page start.
    pub fn offset(mut self, offset: usize) -> Self {
        self.offset = Some(offset);
        self
    }

    fn to_query_string(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(c) = self.channel {
            pairs.push(("channel", enum_name(c)));
        }
        if let Some(r) = &self.remote_address {
            pairs.push(("remoteAddress", r.clone()));
        }
        if let Some(s) = self.state {
            pairs.push(("state", enum_name(s)));
        }
        if let Some(l) = self.limit {
            pairs.push(("limit", l.to_string()));
        }
        if let Some(o) = self.offset {
            pairs.push(("offset", o.to_string()));
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// The wire name of a unit enum (`TELCO`, `OPEN`).
fn enum_name(v: impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Everything but unreserved characters escaped (RFC 3986), so `+49...` stays a plus.
fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One page of [`TelcoflowClient::list_sessions`](crate::TelcoflowClient::list_sessions).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct SessionPage {
    /// The sessions, oldest first.
    pub items: Vec<SessionInfo>,
    /// Where the next page starts, when more sessions follow.
    #[serde(default)]
    pub next_offset: Option<usize>,
}

/// The result of [`TelcoflowClient::close_session`](crate::TelcoflowClient::close_session).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct CloseResult {
    /// When the server closed it (Unix seconds).
    pub closed_at: u64,
    /// Why: [`CloseReason::SdkRequest`].
    pub reason: CloseReason,
}

/// The HTTP base URL for a WebSocket base URL: `ws://` → `http://`, `wss://` → `https://`.
pub(crate) fn http_base(ws_base: &str) -> Result<String, Error> {
    if let Some(rest) = ws_base.strip_prefix("ws://") {
        Ok(format!("http://{rest}"))
    } else if let Some(rest) = ws_base.strip_prefix("wss://") {
        Ok(format!("https://{rest}"))
    } else {
        Err(Error::connection(format!(
            "base URL {ws_base} is neither ws:// nor wss://"
        )))
    }
}

pub(crate) async fn list(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    query: &SessionQuery,
) -> Result<SessionPage, Error> {
    let qs = query.to_query_string();
    let path = if qs.is_empty() {
        "/public/v1/sessions".to_owned()
    } else {
        format!("/public/v1/sessions?{qs}")
    };
    let body = send(config, ws_base, Method::GET, &path).await?;
    serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("session list: {e}")))
}

/// Filters and page of
/// [`TelcoflowClient::list_recordings`](crate::TelcoflowClient::list_recordings). The default
/// lists the connector's recordings on the node, first page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordingQuery {
    /// Only recordings of this call (`callId=`).
    pub call_id: Option<String>,
    /// At most this many (`limit=`, the server's maximum when unset).
    pub limit: Option<usize>,
    /// Skip this many (`offset=`): [`RecordingPage::next_offset`] of the previous page.
    pub offset: Option<usize>,
}

impl RecordingQuery {
    /// Filters on the call.
    pub fn call_id(mut self, call_id: impl Into<String>) -> Self {
        self.call_id = Some(call_id.into());
        self
    }

    /// Page size.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Page start.
    pub fn offset(mut self, offset: usize) -> Self {
        self.offset = Some(offset);
        self
    }

    fn to_query_string(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(c) = &self.call_id {
            pairs.push(("callId", c.clone()));
        }
        if let Some(l) = self.limit {
            pairs.push(("limit", l.to_string()));
        }
        if let Some(o) = self.offset {
            pairs.push(("offset", o.to_string()));
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

pub(crate) async fn list_recordings(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    query: &RecordingQuery,
) -> Result<RecordingPage, Error> {
    let qs = query.to_query_string();
    let path = if qs.is_empty() {
        "/public/v1/recordings".to_owned()
    } else {
        format!("/public/v1/recordings?{qs}")
    };
    let body = send(config, ws_base, Method::GET, &path).await?;
    serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("recording list: {e}")))
}

pub(crate) async fn recording(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    id: &str,
) -> Result<RecordingInfo, Error> {
    let path = format!("/public/v1/recordings/{}", percent_encode(id));
    let body = send(config, ws_base, Method::GET, &path).await?;
    serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("recording: {e}")))
}

pub(crate) async fn download_recording(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    id: &str,
    out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
) -> Result<u64, Error> {
    let path = format!("/public/v1/recordings/{}/audio", percent_encode(id));
    download(config, ws_base, &path, out).await
}

pub(crate) async fn delete_recording(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    id: &str,
) -> Result<(), Error> {
    let path = format!("/public/v1/recordings/{}", percent_encode(id));
    send(config, ws_base, Method::DELETE, &path).await.map(drop)
}

pub(crate) async fn close(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    session_id: &str,
) -> Result<CloseResult, Error> {
    let path = format!("/public/v1/sessions/{}/close", percent_encode(session_id));
    let body = send(config, ws_base, Method::POST, &path).await?;
    serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("close result: {e}")))
}

/// Sends one request and returns the body of a 2xx answer; any other status is the server's
/// error code ([`Error::RequestFailed`]), or [`Error::Authentication`] for a refused key.
async fn send(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    method: Method,
    path: &str,
) -> Result<Bytes, Error> {
    let exchange = async {
        let (status, body, _driver) = start(config, ws_base, method, path).await?;
        Ok::<_, Error>((status, read_body(body).await?))
    };
    let (status, body) = tokio::time::timeout(config.request_timeout, exchange)
        .await
        .map_err(|_| Error::RequestTimeout)??;
    if status.is_success() {
        return Ok(body);
    }
    Err(status_error(status, &body))
}

/// Sends a GET and streams the body of a 2xx answer into `out`; returns the bytes written.
/// The answer's head must come within the request timeout, and so must each piece of the body
/// (a large file takes as long as it takes, a stalled one fails).
async fn download(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    path: &str,
    out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
) -> Result<u64, Error> {
    use tokio::io::AsyncWriteExt as _;
    let timeout = config.request_timeout;
    let (status, mut body, _driver) =
        tokio::time::timeout(timeout, start(config, ws_base, Method::GET, path))
            .await
            .map_err(|_| Error::RequestTimeout)??;
    if !status.is_success() {
        let body = tokio::time::timeout(timeout, read_body(body))
            .await
            .map_err(|_| Error::RequestTimeout)??;
        return Err(status_error(status, &body));
    }
    let mut written = 0u64;
    loop {
        let frame = tokio::time::timeout(
            timeout,
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)),
        )
        .await
        .map_err(|_| Error::RequestTimeout)?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| Error::connection_with("reading the HTTP body", e))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data)
                .await
                .map_err(|e| Error::connection_with("writing the download", e))?;
            written += data.len() as u64;
        }
    }
    out.flush()
        .await
        .map_err(|e| Error::connection_with("writing the download", e))?;
    Ok(written)
}

/// Aborts the HTTP connection's task when the exchange is over (or given up).
struct ConnectionTask(tokio::task::JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens a connection, sends the request and returns the answer's status and body, with the
/// connection's task (one request per connection).
async fn start(
    config: &TelcoflowClientConfig,
    ws_base: &str,
    method: Method,
    path: &str,
) -> Result<(StatusCode, hyper::body::Incoming, ConnectionTask), Error> {
    let url = format!("{}{path}", http_base(ws_base)?);
    let uri: Uri = url
        .parse()
        .map_err(|e| Error::connection_with(format!("invalid URL {url}"), e))?;
    let io = open(config, &uri).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Error::connection_with("HTTP handshake failed", e))?;
    let driver = ConnectionTask(tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "HTTP connection ended");
        }
    }));
    let mut req = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, host_header(&uri))
        .header(
            control::SDK_VERSION_HEADER,
            telcoflow_proto::PROTOCOL_VERSION,
        );
    if let Auth::ApiKey {
        api_key,
        connector_uuid,
    } = &config.auth
    {
        req = req
            .header(control::API_KEY_HEADER, secret(api_key)?)
            .header(control::CONNECTOR_HEADER, secret(connector_uuid)?);
    }
    let req = req
        .body(String::new())
        .map_err(|e| Error::connection_with("invalid HTTP request", e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::connection_with("HTTP request failed", e))?;
    Ok((resp.status(), resp.into_body(), driver))
}

/// The error a non-2xx answer stands for: its JSON `{code, message}` when it has one.
fn status_error(status: StatusCode, body: &[u8]) -> Error {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = parsed
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Error::Authentication { message };
    }
    let code = parsed
        .get("code")
        .and_then(Value::as_str)
        .map_or_else(|| ServerCode::new(status.as_str()), ServerCode::new);
    Error::RequestFailed { code, message }
}

fn secret(value: &str) -> Result<hyper::header::HeaderValue, Error> {
    let mut v = hyper::header::HeaderValue::from_str(value)
        .map_err(|_| Error::connection("a credential is not a valid header value"))?;
    v.set_sensitive(true);
    Ok(v)
}

fn host_header(uri: &Uri) -> String {
    match (uri.host(), uri.port_u16()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

async fn read_body(mut body: hyper::body::Incoming) -> Result<Bytes, Error> {
    let mut out = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| Error::connection_with("reading the HTTP body", e))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_BODY {
                return Err(Error::Protocol("HTTP response too large".into()));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

async fn open(config: &TelcoflowClientConfig, uri: &Uri) -> Result<Box<dyn Io>, Error> {
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .ok_or_else(|| Error::connection(format!("no host in {uri}")))?;
    // `[::1]` in a URL, `::1` to connect to and to name in TLS.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::time::timeout(config.connect_timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| Error::connection(format!("timed out connecting to {host}:{port}")))?
        .map_err(|e| Error::connection_with(format!("cannot connect to {host}:{port}"), e))?;
    let _ = tcp.set_nodelay(true);
    if !https {
        return Ok(Box::new(tcp));
    }
    tls(config, host, tcp).await
}

#[cfg(feature = "tls")]
async fn tls(
    config: &TelcoflowClientConfig,
    host: &str,
    tcp: TcpStream,
) -> Result<Box<dyn Io>, Error> {
    let rustls = config.control_tls.rustls_config()?;
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| Error::connection_with(format!("invalid TLS server name {host}"), e))?;
    let stream = tokio_rustls::TlsConnector::from(rustls)
        .connect(name, tcp)
        .await
        .map_err(|e| Error::connection_with("TLS handshake failed", e))?;
    Ok(Box::new(stream))
}

#[cfg(not(feature = "tls"))]
async fn tls(
    _config: &TelcoflowClientConfig,
    _host: &str,
    _tcp: TcpStream,
) -> Result<Box<dyn Io>, Error> {
    Err(Error::connection(
        "https:// needs the `tls` feature of the telcoflow crate",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_string_escapes_and_names_enums() {
        let q = SessionQuery::open()
            .channel(Channel::Telco)
            .remote_address("+49 1&2")
            .limit(2)
            .offset(4);
        assert_eq!(
            q.to_query_string(),
            "channel=TELCO&remoteAddress=%2B49%201%262&state=OPEN&limit=2&offset=4"
        );
        assert_eq!(SessionQuery::default().to_query_string(), "");
    }

    #[test]
    fn recording_query_string() {
        let q = RecordingQuery::default().call_id("c 1").limit(5).offset(10);
        assert_eq!(q.to_query_string(), "callId=c%201&limit=5&offset=10");
        assert_eq!(RecordingQuery::default().to_query_string(), "");
    }

    #[test]
    fn http_base_follows_the_websocket_scheme() {
        assert_eq!(http_base("ws://h:1").unwrap(), "http://h:1");
        assert_eq!(http_base("wss://h").unwrap(), "https://h");
        assert!(http_base("ftp://h").is_err());
    }
}
