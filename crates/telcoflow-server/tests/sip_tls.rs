//! SIP over TLS (`[sip] tls_listen`): a raw rustls client on the listener, its handshake
//! deadline, SIPp calling in over TLS through HAProxy, and registering over TLS at SIPp
//! behind HAProxy (and failing to, with a registrar whose certificate is not trusted).
//!
//! Debian's SIPp is built without OpenSSL (`-t l1` is refused), so SIPp speaks TCP to HAProxy
//! in TCP mode, which originates TLS to our listener and checks our certificate against the
//! test CA (or, for the registrar, terminates the TLS we originate): the server sees a real
//! TLS peer, SIPp a plain TCP one.
//!
//! The baresip tests over TLS (calling in, and the server dialling a TLS phone) are in
//! `sip_baresip.rs`.

mod common;
mod sipp;
mod tls_pki;

use common::*;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use telcoflow_server::Config;
use tls_pki::Pki;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A SIP config (`sipp::sip_config`) with a TLS listener on a free port, its certificate
/// issued by `pki` for 127.0.0.1 and localhost.
fn tls_config(ports: sipp::Ports, pki: &Pki, dir: &std::path::Path) -> Config {
    let mut config = sipp::sip_config(ports);
    let issued = pki.issue(dir, "server", &["127.0.0.1", "localhost"]);
    let sip = config.sip.as_mut().unwrap();
    sip.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    sip.tls_cert = Some(issued.cert);
    sip.tls_key = Some(issued.key);
    config
}

fn client_config(pki: &Pki) -> rustls::ClientConfig {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Claims the next call, opens its media connection and answers it.
async fn answer_next(control: &mut Control) -> Media {
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    media
}

/// Waits for the `call.terminated` event, skipping audio and other events.
async fn terminated(media: &mut Media) -> Value {
    loop {
        let v = media.ws.expect_type("call_event").await;
        if v["data"]["event"] == "call.terminated" {
            return v;
        }
    }
}

/// A client that checks the server's certificate against the test CA gets an OPTIONS
/// answered over TLS, with a Via it named TLS.
#[tokio::test]
async fn options_over_tls_is_answered_on_the_same_connection() {
    let pki = Pki::new();
    let dir = sipp::work_dir("tls-options");
    let server = start(tls_config(sipp::ports(70), &pki, &dir)).await;
    let tls_addr = server.sip_tls_addr().expect("a TLS listener");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&pki)));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let options = format!(
        "OPTIONS sip:+15559990001@{tls_addr} SIP/2.0\r\n\
         Via: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKtls1\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=t1\r\n\
         To: <sip:+15559990001@{tls_addr}>\r\n\
         Call-ID: tls-options-1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    tls.write_all(options.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before answering");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer within 5 s");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("SIP/2.0 200"), "{text}");
    assert!(
        text.contains("Via: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKtls1"),
        "{text}"
    );
    server.shutdown().await;
}

/// A peer that opens a connection to the TLS listener and never completes the handshake is
/// closed after `tcp_message_timeout_secs`, as a slow message would be.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_at_the_message_deadline() {
    let pki = Pki::new();
    let dir = sipp::work_dir("tls-stall");
    // No call: none of the ports of index 70 is bound, so the OPTIONS test shares them.
    let mut config = tls_config(sipp::ports(70), &pki, &dir);
    config.sip.as_mut().unwrap().tcp_message_timeout_secs = 1;
    let server = start(config).await;
    let tls_addr = server.sip_tls_addr().unwrap();
    let mut tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    // Half a ClientHello's record header, then nothing.
    tcp.write_all(&[0x16, 0x03]).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed within 5 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed before the deadline: {waited:?}"
    );
    server.shutdown().await;
}

/// Reads from `stream` until it is closed (or fails), at most 5 s; panics if it stays open.
async fn closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("closed within 5 s");
    got
}

/// A peer that completes the handshake but sends only keep-alives (CRLF pings) never
/// delivers a first message: it is closed at `tcp_message_timeout_secs` after the accept,
/// not kept for the idle timeout. Over TCP likewise.
#[tokio::test]
async fn a_connection_without_a_first_message_is_closed_at_the_message_deadline() {
    let pki = Pki::new();
    let dir = sipp::work_dir("tls-no-message");
    let mut config = tls_config(sipp::ports(70), &pki, &dir);
    config.sip.as_mut().unwrap().tcp_message_timeout_secs = 1;
    let server = start(config).await;
    let tls_addr = server.sip_tls_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&pki)));
    let started = std::time::Instant::now();
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(b"\r\n\r\n").await.unwrap();
    tls.flush().await.unwrap();
    let answered = closed(&mut tls).await;
    // The ping's pong, nothing else.
    assert!(
        answered.iter().all(|b| *b == b'\r' || *b == b'\n'),
        "{answered:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed before the deadline: {waited:?}"
    );
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(server.sip_addr().unwrap())
        .await
        .unwrap();
    tcp.write_all(b"\r\n\r\n").await.unwrap();
    closed(&mut tcp).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed before the deadline: {waited:?}"
    );
    server.shutdown().await;
}

/// Without `tls_listen` a `sips:` destination is refused at once, saying why, rather than
/// dialled with a Contact that would bring the callee's requests back in plain text.
#[tokio::test]
async fn call_connect_to_a_sips_destination_needs_the_tls_listener() {
    let mut config = sipp::sip_config(sipp::ports(72));
    config.connectors[0].connect.insert(
        "+15559990001".into(),
        "sips:+15550200@127.0.0.1:5061".into(),
    );
    let (server, _control, _caller, mut media) = answered_call(config, 8000).await;
    let resp = media
        .command(
            "call.connect",
            Some(serde_json::json!({"ringTimeSeconds": 10})),
        )
        .await;
    assert_eq!(resp["success"], false, "{resp}");
    assert!(resp.to_string().contains("tls_listen"), "{resp}");
    server.shutdown().await;
}

/// A connection a peer opened to our TLS listener is not verified: requests we originate
/// to that peer's address never go over it. (Here the peer's address is the connection's
/// own, where nothing listens: the call fails to connect and the peer gets no INVITE.)
#[tokio::test]
async fn our_new_requests_never_go_over_an_accepted_tls_connection() {
    let pki = Pki::new();
    let ports = sipp::ports(73);
    let dir = sipp::work_dir("tls-accepted-reuse");
    let mut config = tls_config(ports, &pki, &dir);
    config.sip.as_mut().unwrap().tls_ca = Some(pki.write_ca(&dir, "ca.pem"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // A port that was free: the peer's connection comes from it, nothing listens on it.
    let peer_port = listener.local_addr().unwrap().port();
    drop(listener);
    config.connectors[0].connect.insert(
        "+15559990001".into(),
        format!("sip:+15550200@127.0.0.1:{peer_port};transport=tls"),
    );
    let (server, _control, _caller, mut media) = answered_call(config, 8000).await;
    let tls_addr = server.sip_tls_addr().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(([127, 0, 0, 1], peer_port).into()).unwrap();
    let tcp = socket.connect(tls_addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&pki)));
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let options = format!(
        "OPTIONS sip:+15559990001@{tls_addr} SIP/2.0\r\n\
         Via: SIP/2.0/TLS 127.0.0.1:{peer_port};branch=z9hG4bKtls2\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=t1\r\n\
         To: <sip:+15559990001@{tls_addr}>\r\n\
         Call-ID: tls-accepted-1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    tls.write_all(options.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before answering");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer within 5 s");
    assert!(got.starts_with(b"SIP/2.0 200"));
    let resp = media
        .command(
            "call.connect",
            Some(serde_json::json!({"ringTimeSeconds": 10})),
        )
        .await;
    assert_eq!(resp["success"], false, "{resp}");
    assert!(resp.to_string().contains("connection to"), "{resp}");
    // Nothing came over the accepted connection.
    got.clear();
    let more = tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await;
    assert!(
        !matches!(more, Ok(Ok(n)) if n > 0),
        "{:?}",
        more.map(|r| r.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()))
    );
    server.shutdown().await;
}

/// Reads one SIP message's header (up to the blank line) off `stream`, keeping the rest.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
) -> String {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            // Body bytes not read yet are left to the next call's search: none has a blank line.
            pending.drain(..(end + 4 + length).min(pending.len()));
            return head;
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed");
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Connections we open are kept per address and checked name: after a `sips:` call to
/// `localhost` (the name the peer's certificate carries), a call to the same address by
/// another name (127.0.0.1, which it does not carry) opens its own connection and fails its
/// check, rather than reusing the first unchecked.
#[tokio::test]
async fn a_second_name_at_the_same_address_is_checked_on_its_own_connection() {
    let localhost: Vec<std::net::SocketAddr> = tokio::net::lookup_host(("localhost", 1))
        .await
        .map(Iterator::collect)
        .unwrap_or_default();
    if localhost.first().map(std::net::SocketAddr::ip) != Some([127, 0, 0, 1].into()) {
        eprintln!("skipped: localhost does not resolve to 127.0.0.1 first");
        return;
    }
    let pki = Pki::new();
    let ports = sipp::ports(74);
    let dir = sipp::work_dir("tls-second-name");
    let peer_cert = pki.issue(&dir, "peer", &["localhost"]);
    let peer_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        CertificateDer::pem_file_iter(&peer_cert.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect(),
        rustls::pki_types::PrivateKeyDer::from_pem_file(&peer_cert.key).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(peer_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // The peer: every INVITE on its first connection is answered 486; later connections
    // only get a handshake.
    let (invites_tx, mut invites_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut pending = Vec::new();
        let mut invites = 0;
        loop {
            let head = tokio::select! {
                head = read_head(&mut tls, &mut pending) => head,
                second = listener.accept() => {
                    // A second connection: the server's check of our certificate fails.
                    let (tcp, _) = second.unwrap();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move { acceptor.accept(tcp).await });
                    continue;
                }
            };
            if !head.starts_with("INVITE ") {
                continue;
            }
            invites += 1;
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .unwrap_or_default()
                    .to_owned()
            };
            let busy = format!(
                "SIP/2.0 486 Busy Here\r\nVia: {}\r\nFrom: {}\r\nTo: {};tag=peer{invites}\r\n\
                 Call-ID: {}\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
                header("Via"),
                header("From"),
                header("To"),
                header("Call-ID"),
                header("CSeq")
            );
            tls.write_all(busy.as_bytes()).await.unwrap();
            tls.flush().await.unwrap();
            let _ = invites_tx.send(invites);
        }
    });
    let mut config = tls_config(ports, &pki, &dir);
    config.sip.as_mut().unwrap().tls_ca = Some(pki.write_ca(&dir, "ca.pem"));
    config.connectors[0].connect.insert(
        "+15559990001".into(),
        format!("sips:+15550200@localhost:{port}"),
    );
    config.connectors[0].connect.insert(
        "+15559990002".into(),
        format!("sips:+15550200@127.0.0.1:{port}"),
    );
    let (server, mut control, _caller, mut media) = answered_call(config, 8000).await;
    let first = media
        .command(
            "call.connect",
            Some(serde_json::json!({"ringTimeSeconds": 10})),
        )
        .await;
    assert_eq!(first["success"], false, "{first}");
    assert_eq!(
        invites_rx.recv().await,
        Some(1),
        "the peer got the first INVITE"
    );
    // A second call, to the number whose destination names the address.
    let mut phone = dial(&server, "+15551230002", "+15559990002", 8000).await;
    let mut media = answer_next(&mut control).await;
    phone.event("answered").await;
    let second = media
        .command(
            "call.connect",
            Some(serde_json::json!({"ringTimeSeconds": 10})),
        )
        .await;
    assert_eq!(second["success"], false, "{second}");
    assert!(
        second.to_string().contains("not valid for name"),
        "{second}"
    );
    assert!(
        invites_rx.try_recv().is_err(),
        "no INVITE over the first connection"
    );
    peer.abort();
    server.shutdown().await;
}

/// TLS connections count under the SIP/TCP limits: with one allowed per source address, a
/// second connection is closed as soon as it is accepted, before any handshake, while the
/// first stays usable.
#[tokio::test]
async fn tls_connections_are_held_to_the_per_source_limit() {
    let pki = Pki::new();
    let dir = sipp::work_dir("tls-limit");
    let mut config = tls_config(sipp::ports(79), &pki, &dir);
    config.sip.as_mut().unwrap().tcp_max_connections_per_ip = 1;
    let server = start(config).await;
    let tls_addr = server.sip_tls_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&pki)));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut first = connector
        .connect(name.clone(), tcp)
        .await
        .expect("handshake");
    let second = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let refused = tokio::time::timeout(WAIT, connector.connect(name, second))
        .await
        .expect("the second connection is closed, not left waiting");
    assert!(refused.is_err(), "a second TLS connection from one address");
    // The first still carries SIP: a CRLF CRLF ping gets its pong.
    first.write_all(b"\r\n\r\n").await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(WAIT, first.read_exact(&mut pong))
        .await
        .expect("a pong in time")
        .unwrap();
    assert_eq!(&pong, b"\r\n");
    server.shutdown().await;
}

/// HAProxy in TCP mode on a free loopback port (see the module docs for why), killed on
/// drop.
struct Proxy {
    child: tokio::process::Child,
    port: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// HAProxy taking plain TCP and originating TLS to `backend`, checking its certificate
/// against `ca` for the name `localhost`.
async fn tls_originator(
    dir: &std::path::Path,
    backend: std::net::SocketAddr,
    ca: &std::path::Path,
) -> Option<Proxy> {
    let server = format!(
        "{backend} ssl verify required ca-file {} verifyhost localhost sni str(localhost)",
        ca.display()
    );
    haproxy_tcp(dir, "", &server).await
}

/// HAProxy terminating TLS with `cert_and_key` (one PEM file) and passing plain TCP on to
/// `backend`.
async fn tls_terminator(
    dir: &std::path::Path,
    cert_and_key: &std::path::Path,
    backend: std::net::SocketAddr,
) -> Option<Proxy> {
    let bind = format!(" ssl crt {}", cert_and_key.display());
    haproxy_tcp(dir, &bind, &backend.to_string()).await
}

/// HAProxy with one frontend (`bind 127.0.0.1:<port><bind>`) and one server (`server`).
async fn haproxy_tcp(dir: &std::path::Path, bind: &str, server: &str) -> Option<Proxy> {
    let Some(bin) = haproxy_bin() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is not installed (apt-get install haproxy, or run .ci/run)"
        );
        eprintln!("skipped: no haproxy (apt-get install haproxy, or set HAPROXY)");
        return None;
    };
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let config = format!(
        "global\n    maxconn 64\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
         frontend sip\n    bind 127.0.0.1:{port}{bind}\n    default_backend peer\n\
         backend peer\n    server s {server}\n"
    );
    let path = dir.join(format!("haproxy-{port}.cfg"));
    std::fs::write(&path, config).unwrap();
    let child = tokio::process::Command::new(&bin)
        // -db: in the foreground, so that the test holds the process.
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    // Listening once a connection is taken (bounded).
    sipp::wait_tcp(port).await;
    Some(Proxy { child, port })
}

/// SIPp calls in over TCP to HAProxy, which carries it over TLS to the server: the call is
/// answered, and SIPp's BYE (over the same TLS connection) ends it.
#[tokio::test]
async fn sipp_calls_in_over_tls_through_haproxy_and_hangs_up() {
    if !sipp::available() {
        return;
    }
    let pki = Pki::new();
    let ports = sipp::ports(72);
    let dir = sipp::work_dir("tls-sipp");
    let server = start(tls_config(ports, &pki, &dir)).await;
    let ca = pki.write_ca(&dir, "ca.pem");
    let Some(proxy) = tls_originator(&dir, server.sip_tls_addr().unwrap(), &ca).await else {
        return;
    };
    let mut control = control(&server, 8000, "mixed").await;
    let mut args = sipp::uac_args(&server, ports, "uac_short.xml", "+15559990001", 1);
    args[0] = format!("127.0.0.1:{}", proxy.port);
    args.extend(["-t".into(), "t1".into()]);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });
    let mut media = answer_next(&mut control).await;
    let ended = terminated(&mut media).await;
    assert_eq!(ended["data"]["reason"], "caller", "{ended}");
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

/// The same path with the server hanging up (no RTP from SIPp): our BYE goes back over the
/// TLS connection the call came in on, through HAProxy, and SIPp answers it.
#[tokio::test]
async fn our_bye_reaches_sipp_over_the_tls_connection_it_called_on() {
    if !sipp::available() {
        return;
    }
    let pki = Pki::new();
    let ports = sipp::ports(73);
    let dir = sipp::work_dir("tls-sipp-bye");
    let mut config = tls_config(ports, &pki, &dir);
    config.sip.as_mut().unwrap().rtp_timeout_secs = 1;
    let server = start(config).await;
    let ca = pki.write_ca(&dir, "ca.pem");
    let Some(proxy) = tls_originator(&dir, server.sip_tls_addr().unwrap(), &ca).await else {
        return;
    };
    let mut control = control(&server, 8000, "mixed").await;
    let mut args = sipp::uac_args(&server, ports, "uac_rtp_silent.xml", "+15559990001", 1);
    args[0] = format!("127.0.0.1:{}", proxy.port);
    args.extend(["-t".into(), "t1".into()]);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });
    let mut media = answer_next(&mut control).await;
    let ended = terminated(&mut media).await;
    assert_eq!(ended["data"]["reason"], "caller", "{ended}");
    // SIPp got the server's BYE and answered it.
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

/// A plain HTTP/1.1 GET of the registrations' status route (no admin token: the development
/// connector's credentials read it), polled until the first one satisfies `ready`.
async fn registration_until(
    server: &telcoflow_server::RunningServer,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap();
        let request = format!(
            "GET /admin/v1/sip/registrations HTTP/1.1\r\nhost: test\r\nx-api-key: {}\r\n\
             x-connector-uuid: {}\r\nconnection: close\r\n\r\n",
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
            .await
            .expect("HTTP answer in time")
            .unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1;
        let v: Value = serde_json::from_str(body).unwrap();
        let first = v["registrations"][0].clone();
        if ready(&first) {
            return first;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registration never got there: {first}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tls_registration(port: u16) -> telcoflow_server::config::SipRegistration {
    telcoflow_server::config::SipRegistration {
        registrar: format!("127.0.0.1:{port}"),
        aor: "sip:+15550100@127.0.0.1".into(),
        username: Some("alice".into()),
        password: Some("s3cret".into()),
        expiry: 120,
        transport: "tls".into(),
        outbound_proxy: None,
        srtp: None,
    }
}

/// `transport = "tls"`: the server registers over TLS (checking the registrar's certificate
/// against `tls_ca`), with a `;transport=tls` Contact on its TLS listener, answers the
/// digest challenge, and removes the binding over TLS on shutdown.
#[tokio::test]
async fn registers_over_tls_and_removes_the_binding_on_shutdown() {
    if !sipp::available() {
        return;
    }
    let pki = Pki::new();
    let ports = sipp::ports(77);
    let dir = sipp::work_dir("tls-register");
    let registrar_cert = pki.issue(&dir, "registrar", &["127.0.0.1", "localhost"]);
    let mut args = sipp::uas_args(ports, "registrar_tls.xml");
    args.extend(["-t".into(), "t1".into()]);
    let registrar = tokio::spawn({
        let dir = dir.clone();
        async move { sipp::run(&dir, &args).await }
    });
    sipp::wait_tcp(ports.sipp_sip).await;
    let backend = std::net::SocketAddr::from(([127, 0, 0, 1], ports.sipp_sip));
    let Some(proxy) = tls_terminator(&dir, &registrar_cert.both, backend).await else {
        return;
    };
    let mut config = tls_config(ports, &pki, &dir);
    let sip = config.sip.as_mut().unwrap();
    sip.tls_ca = Some(pki.write_ca(&dir, "ca.pem"));
    sip.registrations = vec![tls_registration(proxy.port)];
    let server = start(config).await;
    let status = registration_until(&server, |r| r["state"] == "registered").await;
    assert_eq!(status["transport"], "tls", "{status}");
    assert_eq!(status["expiresSecs"], 120, "{status}");
    // Shutting down removes the binding: SIPp's scenario ends with the un-REGISTER.
    server.shutdown().await;
    let outcome = tokio::time::timeout(WAIT, registrar)
        .await
        .expect("the registrar's scenario ends")
        .unwrap();
    outcome.assert_passed();
    drop(proxy);
}

/// A TLS registrar whose certificate does not chain to `tls_ca`: the registration fails at
/// once with 503 and a reason that names the certificate check, and is retried later.
#[tokio::test]
async fn a_tls_registrar_whose_certificate_is_not_trusted_is_reported() {
    let pki = Pki::new();
    let ports = sipp::ports(78);
    let dir = sipp::work_dir("tls-register-untrusted");
    let registrar_cert = pki.issue(&dir, "registrar", &["127.0.0.1", "localhost"]);
    // The handshake fails before anything would reach the backend: none listens there.
    let backend = std::net::SocketAddr::from(([127, 0, 0, 1], ports.sipp_sip));
    let Some(proxy) = tls_terminator(&dir, &registrar_cert.both, backend).await else {
        return;
    };
    let mut config = tls_config(ports, &pki, &dir);
    let sip = config.sip.as_mut().unwrap();
    sip.tls_ca = Some(Pki::new().write_ca(&dir, "other-ca.pem"));
    sip.registrations = vec![tls_registration(proxy.port)];
    let server = start(config).await;
    let status = registration_until(&server, |r| r["state"] == "failed").await;
    assert_eq!(status["lastStatus"], 503, "{status}");
    let reason = status["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("TLS handshake") && reason.contains("certificate"),
        "{status}"
    );
    assert!(
        status["retryInSecs"].as_u64().is_some_and(|s| s >= 1),
        "{status}"
    );
    server.shutdown().await;
}

/// The certificate must name the host dialled: a peer whose certificate (from a trusted CA)
/// is for another name fails `call.connect` at once, saying so.
#[tokio::test]
async fn call_connect_to_a_peer_whose_certificate_names_another_host_fails() {
    let pki = Pki::new();
    let ports = sipp::ports(71);
    let dir = sipp::work_dir("tls-wrong-name");
    let peer_cert = pki.issue(&dir, "peer", &["pbx.example.com"]);
    // The handshake fails before anything would reach the backend: none listens there.
    let backend = std::net::SocketAddr::from(([127, 0, 0, 1], ports.sipp_sip));
    let Some(proxy) = tls_terminator(&dir, &peer_cert.both, backend).await else {
        return;
    };
    let mut config = tls_config(ports, &pki, &dir);
    config.sip.as_mut().unwrap().tls_ca = Some(pki.write_ca(&dir, "ca.pem"));
    config.connectors[0].connect.insert(
        "+15559990001".into(),
        format!("sips:+15550200@127.0.0.1:{}", proxy.port),
    );
    let (server, _control, _caller, mut media) = answered_call(config, 8000).await;
    let resp = media
        .command(
            "call.connect",
            Some(serde_json::json!({"ringTimeSeconds": 10})),
        )
        .await;
    assert_eq!(resp["success"], false, "{resp}");
    let text = resp.to_string();
    assert!(
        text.contains("TLS handshake")
            && text.contains("certificate")
            && text.contains("not valid for name"),
        "{resp}"
    );
    server.shutdown().await;
}
