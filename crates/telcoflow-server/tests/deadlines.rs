//! Connections and deadlines of the HTTP/WebSocket listener, each attack reproduced on loopback
//! and shown held: slowloris and silent connections are closed by the header deadline, the
//! connection caps refuse the excess, a client that stops reading is dropped after the write
//! deadline (control and media), the control-connection limit counts from the upgrade, and an
//! oversized frame is answered with close code 1009. After each, the server is alive and an
//! ordinary call works.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};
use telcoflow_server::{Config, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const RATE: u32 = 16000;
/// Bound on anything that the configured one-second deadlines should end well before.
const BOUND: Duration = Duration::from_secs(15);

fn short_deadlines() -> Config {
    let mut config = dev_config();
    config.limits.header_read_timeout_secs = 1;
    config.limits.write_timeout_secs = 1;
    config
}

/// An ordinary call: the phone is answered by the agent and its audio reaches the agent.
async fn ordinary_call_works(server: &RunningServer) {
    ordinary_call_on(server, control(server, RATE, "mixed").await).await;
}

async fn ordinary_call_on(server: &RunningServer, mut control: Control) {
    let mut phone = dial(server, "+15551230001", "+15559990001", RATE).await;
    assert!(phone.call_id.is_some(), "the call was refused");
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    phone.event("answered").await;
    phone.send_level(1234, 320).await;
    assert_eq!(media.audio(0).await[0], 1234);
}

/// Reads until the server closes the connection; returns what was read.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Waits for the server to close a connection opened at `opened`; with `trickle`, it first
/// sends a request line and then one header line every 300 ms, never ending the headers.
/// Returns how long the connection lived.
async fn held_until_closed(mut stream: TcpStream, opened: Instant, trickle: bool) -> Duration {
    if !trickle {
        assert!(read_until_closed(&mut stream).await.is_empty());
        return opened.elapsed();
    }
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    let lines = async move {
        for n in 0.. {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if write
                .write_all(format!("x-slow-{n}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let mut buf = [0u8; 1024];
    tokio::select! {
        () = lines => {}
        r = read.read(&mut buf) => assert!(matches!(r, Ok(0) | Err(_)), "{r:?}"),
    }
    opened.elapsed()
}

/// Opens a connection, as one of many, and holds it until the server closes it.
async fn open_and_hold(
    clients: &mut tokio::task::JoinSet<Duration>,
    addr: SocketAddr,
    trickle: bool,
) {
    let opened = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    clients.spawn(held_until_closed(stream, opened, trickle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_connections_are_closed_by_the_header_deadline() {
    let server = start(short_deadlines()).await;
    let addr = server.local_addr();
    let mut clients = tokio::task::JoinSet::new();
    // 300 slowloris connections and 200 silent ones, all held at once.
    for i in 0..500 {
        open_and_hold(&mut clients, addr, i < 300).await;
    }
    let lifetimes = tokio::time::timeout(BOUND, clients.join_all())
        .await
        .expect("every slow and silent connection is closed by the deadline");
    // Closed by the deadline (1 s here), not before it.
    let shortest = lifetimes.iter().min().unwrap();
    assert!(*shortest >= Duration::from_millis(900), "{shortest:?}");
    // A request that brings its headers in time is served on the same listener.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let response = String::from_utf8(read_until_closed(&mut stream).await).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    ordinary_call_works(&server).await;
    server.shutdown().await;
}

/// A connection from `source` (any 127.x.y.z reaches the loopback listener).
async fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(server).await.unwrap()
}

/// Whether the listener serves a request on this connection (kept alive afterwards).
async fn served(stream: &mut TcpStream) -> bool {
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(BOUND, stream.read(&mut buf))
        .await
        .expect("an answer or a close in time")
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    head.starts_with("HTTP/1.1 200")
}

/// A refused connection: a 503 naming the limits, then the close.
async fn refused(mut stream: TcpStream) {
    let got = tokio::time::timeout(BOUND, read_until_closed(&mut stream))
        .await
        .expect("a refused connection is closed at once");
    let got = String::from_utf8(got).unwrap();
    assert!(
        got.starts_with("HTTP/1.1 503") && got.contains("max_connections"),
        "{got}"
    );
}

/// Connects from `source` until the listener serves the connection: a closed connection's
/// place comes back once the server has seen the close, which the client cannot wait on.
async fn place_comes_back(source: &str, addr: SocketAddr) -> TcpStream {
    for _ in 0..500 {
        let mut stream = connect_from(source, addr).await;
        if served(&mut stream).await {
            return stream;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the place of a closed connection never came back");
}

#[tokio::test]
async fn connections_per_address_are_capped_and_others_still_call() {
    let mut config = dev_config();
    config.limits.max_connections_per_ip = 4;
    let server = start(config).await;
    let addr = server.local_addr();
    // The attacker at 127.0.0.2 holds all it may.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = connect_from("127.0.0.2", addr).await;
        assert!(served(&mut stream).await);
        held.push(stream);
    }
    for _ in 0..20 {
        refused(connect_from("127.0.0.2", addr).await).await;
    }
    // Everyone else still calls (control, phone and media from 127.0.0.1).
    ordinary_call_works(&server).await;
    // The held connections were not disturbed, and a closed one gives its place back.
    for stream in &mut held {
        assert!(served(stream).await);
    }
    drop(held.pop());
    held.push(place_comes_back("127.0.0.2", addr).await);
    server.shutdown().await;
}

#[tokio::test]
async fn connections_in_total_are_capped_and_places_come_back() {
    let mut config = dev_config();
    config.limits.max_connections = 6;
    config.limits.max_connections_per_ip = 3;
    let server = start(config).await;
    let addr = server.local_addr();
    let mut held = Vec::new();
    for source in [
        "127.0.0.2",
        "127.0.0.2",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.3",
        "127.0.0.4",
    ] {
        let mut stream = connect_from(source, addr).await;
        assert!(served(&mut stream).await, "{source}");
        held.push(stream);
    }
    // Over max_connections, whatever the address.
    for source in ["127.0.0.4", "127.0.0.5", "127.0.0.1"] {
        refused(connect_from(source, addr).await).await;
    }
    for stream in &mut held {
        assert!(served(stream).await);
    }
    // Closed connections give their places back: three, enough for an ordinary call.
    held.truncate(3);
    let mut probes = Vec::new();
    for _ in 0..3 {
        probes.push(place_comes_back("127.0.0.5", addr).await);
    }
    refused(connect_from("127.0.0.6", addr).await).await;
    server.shutdown().await;
}

/// A WebSocket client on its own socket; with `recv_buffer`, a small receive buffer so that a
/// client that stops reading blocks the server's writes soon.
async fn raw_ws(
    url: &str,
    headers: &[(&str, &str)],
    recv_buffer: Option<u32>,
) -> WebSocketStream<TcpStream> {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = name.parse().unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    let addr: SocketAddr = request.uri().authority().unwrap().as_str().parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrade")
        .0
}

/// The next text frame as JSON whose `type` is `kind`.
async fn raw_expect(ws: &mut WebSocketStream<TcpStream>, kind: &str) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frame in time")
            .expect("connection open")
            .expect("frame");
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// Sends frames made by `frame` and never reads, until a send fails: the server has closed the
/// connection (its reset fails the write). Returns how many frames went out.
async fn flood_without_reading(
    ws: &mut WebSocketStream<TcpStream>,
    frame: impl Fn(u32) -> Value,
) -> u32 {
    let flood = async {
        for i in 0..2_000_000 {
            if ws
                .send(Message::Text(frame(i).to_string().into()))
                .await
                .is_err()
            {
                return i;
            }
        }
        panic!("the server kept taking frames from a client that does not read");
    };
    tokio::time::timeout(BOUND, flood)
        .await
        .expect("the server drops a client that stops reading within the bound")
}

fn control_url(server: &RunningServer) -> String {
    format!("{}/v1/agent/session-manager", server.base_url())
}

#[tokio::test]
async fn a_control_client_that_stops_reading_is_dropped_after_the_write_deadline() {
    let server = start(short_deadlines()).await;
    let auth = auth_headers(DEV_API_KEY, DEV_CONNECTOR_UUID);
    let mut stuck = raw_ws(&control_url(&server), &auth, Some(4096)).await;
    let mut other = control(&server, RATE, "mixed").await;
    stuck
        .send(Message::Text(
            json!({"type": "setup", "data": {"sampleRate": RATE, "audioMode": "mixed"}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    raw_expect(&mut stuck, "setup.done").await;
    // The stuck client claims a call first, so that its drop shows at the other connection.
    let mut phone = dial(&server, "+15551230001", "+15559990001", RATE).await;
    let notify = raw_expect(&mut stuck, "session.notify").await;
    other.ws.expect_type("session.notify").await;
    let session_id = notify["sessionId"].as_str().unwrap().to_owned();
    let open = json!({"type": "session.open", "sessionId": session_id, "reqId": "claim"});
    stuck
        .send(Message::Text(open.to_string().into()))
        .await
        .unwrap();
    assert_eq!(raw_expect(&mut stuck, "response").await["ok"], true);
    // From here on it never reads, and asks for answers until the server gives up on it.
    let sent = flood_without_reading(&mut stuck, |i| {
        json!({"type": "session.open", "sessionId": format!("no-such-session-{i}"), "reqId": i.to_string()})
    })
    .await;
    assert!(sent > 0);
    // Dropped as any lost control connection: its claimed session is offered again.
    let again = other.ws.expect_type("session.notify").await;
    assert_eq!(again["sessionId"], session_id.as_str());
    assert_eq!(again["activity"], "RESUME");
    assert_eq!(other.open(&session_id).await["ok"], true);
    other.ready(&session_id).await;
    let call_in = other.ws.expect_type("call.in").await;
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    phone.send_level(77, 320).await;
    assert_eq!(media.audio(0).await[0], 77);
    ordinary_call_works(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_media_client_that_stops_reading_is_dropped_as_a_lost_media_connection() {
    let server = start(short_deadlines()).await;
    let mut control = control(&server, RATE, "mixed").await;
    let mut phone = dial(&server, "+15551230001", "+15559990001", RATE).await;
    let call_in = control.take_call().await;
    let token = format!("Bearer {}", call_in["token"].as_str().unwrap());
    let url = call_in["url"].as_str().unwrap();
    let mut stuck = raw_ws(url, &[("authorization", &token)], Some(4096)).await;
    let answer = json!({"type": "command", "data": {"command_id": "answer", "command": "call.answer", "timeout_ms": 10000}});
    stuck
        .send(Message::Text(answer.to_string().into()))
        .await
        .unwrap();
    let response = raw_expect(&mut stuck, "command_response").await;
    assert_eq!(response["data"]["success"], true, "{response}");
    phone.event("answered").await;
    // From here on it never reads; every malformed command is answered with an error.
    let sent = flood_without_reading(
        &mut stuck,
        |i| json!({"type": "command", "data": {"command_id": format!("bad-{i}")}}),
    )
    .await;
    assert!(sent > 0);
    // The call treats it as a lost media connection: it waits, and the agent comes back on the
    // same URL and token (409 while the old connection is still being let go).
    let mut back = None;
    for _ in 0..500 {
        match Ws::connect(url, &[("authorization", &token)]).await {
            Ok(ws) => {
                back = Some(Media { ws });
                break;
            }
            Err(refused) => {
                assert_eq!(refused.status, 409, "{}", refused.body);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let mut back = back.expect("the agent reattaches");
    phone.send_level(55, 320).await;
    assert_eq!(back.audio(0).await[0], 55);
    ordinary_call_works(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn parallel_control_upgrades_count_against_the_limit_from_the_upgrade() {
    let mut config = dev_config();
    config.limits.max_control_connections_per_connector = 32;
    let server = start(config).await;
    let url = control_url(&server);
    let mut upgrades = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let url = url.clone();
        upgrades.spawn(async move {
            Ws::connect(&url, &auth_headers(DEV_API_KEY, DEV_CONNECTOR_UUID)).await
        });
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    let results = tokio::time::timeout(BOUND, upgrades.join_all())
        .await
        .expect("every upgrade is answered");
    for result in results {
        match result {
            // Held open, none of them sends setup.
            Ok(ws) => accepted.push(ws),
            Err(r) => {
                assert_eq!(r.status, 429, "{}", r.body);
                assert!(
                    r.body.contains("max_control_connections_per_connector"),
                    "{}",
                    r.body
                );
                refused += 1;
            }
        }
    }
    assert_eq!(accepted.len(), 32);
    assert_eq!(refused, 168);
    // Closed connections give their places back.
    drop(accepted);
    let control = 'free: {
        for _ in 0..500 {
            match Ws::connect(&url, &auth_headers(DEV_API_KEY, DEV_CONNECTOR_UUID)).await {
                Ok(mut ws) => {
                    ws.send_json(json!({"type": "setup", "data": {"sampleRate": RATE, "audioMode": "mixed"}}))
                        .await;
                    let done = ws.expect_type("setup.done").await;
                    let id = done["smWsId"].as_str().unwrap().to_owned();
                    break 'free Control { ws, id };
                }
                Err(r) => {
                    assert_eq!(r.status, 429, "{}", r.body);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        panic!("the places of closed control connections never came back");
    };
    ordinary_call_on(&server, control).await;
    server.shutdown().await;
}

/// Reads until the close frame and returns its code and reason.
async fn close_frame(ws: &mut WebSocketStream<TcpStream>) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(close)))) => {
                return (close.code, close.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(_)) => continue,
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_oversized_control_frame_is_closed_with_1009() {
    let mut config = dev_config();
    config.limits.max_control_frame_bytes = 1024;
    let server = start(config).await;
    let auth = auth_headers(DEV_API_KEY, DEV_CONNECTOR_UUID);
    let mut ws = raw_ws(&control_url(&server), &auth, None).await;
    let setup = json!({"type": "setup", "data": {"sampleRate": RATE, "audioMode": "mixed"}});
    ws.send(Message::Text(setup.to_string().into()))
        .await
        .unwrap();
    raw_expect(&mut ws, "setup.done").await;
    let big = json!({"type": "session.open", "sessionId": "x".repeat(2000)});
    ws.send(Message::Text(big.to_string().into()))
        .await
        .unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, CloseCode::Size);
    assert!(
        reason.contains("limits.max_control_frame_bytes"),
        "{reason}"
    );
    // Before setup too.
    let mut early = raw_ws(&control_url(&server), &auth, None).await;
    early
        .send(Message::Text(big.to_string().into()))
        .await
        .unwrap();
    assert_eq!(close_frame(&mut early).await.0, CloseCode::Size);
    ordinary_call_works(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_media_frame_is_closed_with_1009() {
    let mut config = dev_config();
    config.limits.max_media_frame_bytes = 4096;
    let server = start(config).await;
    let mut control = control(&server, RATE, "mixed").await;
    let _phone = dial(&server, "+15551230001", "+15559990001", RATE).await;
    let call_in = control.take_call().await;
    let token = format!("Bearer {}", call_in["token"].as_str().unwrap());
    let mut ws = raw_ws(
        call_in["url"].as_str().unwrap(),
        &[("authorization", &token)],
        None,
    )
    .await;
    ws.send(Message::Binary(vec![0; 5000].into()))
        .await
        .unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, CloseCode::Size);
    assert!(reason.contains("limits.max_media_frame_bytes"), "{reason}");
    ordinary_call_works(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_phone_frame_is_closed_with_1009() {
    let server = start(dev_config()).await;
    let url = format!("{}/v1/sim/phone", server.base_url());
    let mut ws = raw_ws(&url, &[], None).await;
    ws.send(Message::Binary(vec![0; 70_000].into()))
        .await
        .unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, CloseCode::Size);
    assert!(reason.contains("simulated phone"), "{reason}");
    ordinary_call_works(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_must_finish_within_the_header_deadline() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("telcoflow-deadlines-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let mut config = short_deadlines();
    config.tls = Some(telcoflow_server::config::TlsConfig {
        cert,
        key,
        client_ca: None,
    });
    let server = start(config).await;
    let addr = server.local_addr();
    // Silent, and a handshake that stops after a few bytes of its ClientHello.
    let opened = Instant::now();
    let silent = held_until_closed(TcpStream::connect(addr).await.unwrap(), opened, false);
    let stalled = async {
        let opened = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
        read_until_closed(&mut stream).await;
        opened.elapsed()
    };
    let (silent, stalled) = tokio::time::timeout(BOUND, async { tokio::join!(silent, stalled) })
        .await
        .expect("unfinished handshakes are closed by the deadline");
    assert!(silent >= Duration::from_millis(900), "{silent:?}");
    assert!(stalled >= Duration::from_millis(900), "{stalled:?}");
    // A real handshake and request are served.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn shutdown_is_not_held_up_by_a_connection_still_sending_headers() {
    let mut config = dev_config();
    config.limits.header_read_timeout_secs = 60;
    let server = start(config).await;
    let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
    let mut partial = TcpStream::connect(server.local_addr()).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    // Both are in the server's hands before it is told to stop.
    let mut probe = TcpStream::connect(server.local_addr()).await.unwrap();
    assert!(served(&mut probe).await);
    tokio::time::timeout(BOUND, server.shutdown())
        .await
        .expect("shutdown ends within its grace, long before the header deadline");
    assert!(read_until_closed(&mut silent).await.is_empty());
    assert!(read_until_closed(&mut partial).await.is_empty());
}
