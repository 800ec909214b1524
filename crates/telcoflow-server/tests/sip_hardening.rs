//! The SIP edge under attack and faults, on loopback: a raw UDP/TCP socket plays the attacker
//! with crafted SIP, the server must refuse it the documented way and stay up, and an
//! ordinary call (SIPp, answered by an agent of raw frames) works right after.

mod common;
mod sipp;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use telcoflow_server::config::{SipAccount, SipConfig};
use telcoflow_server::{Config, RunningServer, Server};
use telcoflow_sip::sip::digest::{self, Challenge, Credentials};
use telcoflow_sip::sip::message::{Message, Method, Response, SipHeaders as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

/// The number SIPp's ordinary call dials.
const ORDINARY: &str = "+15559990001";

/// A phone of crafted SIP over UDP.
struct RawPhone {
    sock: UdpSocket,
    server: SocketAddr,
    local: SocketAddr,
}

impl RawPhone {
    async fn bind(ip: &str, server: &RunningServer) -> Self {
        let sock = UdpSocket::bind((ip, 0)).await.expect("bind the phone");
        let local = sock.local_addr().unwrap();
        Self {
            sock,
            server: server.sip_addr().expect("SIP on"),
            local,
        }
    }

    /// An INVITE with a PCMU offer; `extra` are header lines ending in CRLF.
    fn invite(&self, call_id: &str, cseq: u32, to: &str, from: &str, extra: &str) -> String {
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n",
            self.local.port() + 2
        );
        format!(
            "INVITE sip:{to}@{server} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK{call_id}-{cseq};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{from}@{local}>;tag=t{call_id}\r\n\
             To: <sip:{to}@{server}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} INVITE\r\n\
             Contact: <sip:{from}@{local}>\r\n\
             {extra}Content-Type: application/sdp\r\n\
             Content-Length: {}\r\n\r\n{sdp}",
            sdp.len(),
            server = self.server,
            local = self.local,
        )
    }

    async fn send(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.server).await.unwrap();
    }

    async fn recv(&self) -> Message {
        let mut buf = vec![0u8; 65536];
        let (n, _) = tokio::time::timeout(WAIT, self.sock.recv_from(&mut buf))
            .await
            .expect("the server answers in time")
            .unwrap();
        Message::parse(&buf[..n]).expect("the server sends valid SIP")
    }

    /// The next response for `call_id` (its provisional ones too), skipping anything else.
    async fn response(&self, call_id: &str) -> Response {
        loop {
            if let Message::Response(r) = self.recv().await {
                if r.call_id().ok() == Some(call_id) {
                    return r;
                }
            }
        }
    }

    /// The final response for `call_id`.
    async fn final_response(&self, call_id: &str) -> Response {
        loop {
            let r = self.response(call_id).await;
            if r.status >= 200 {
                return r;
            }
        }
    }
}

fn sip_config(index: u16, edit: impl FnOnce(&mut SipConfig)) -> Config {
    let mut config = sipp::sip_config(sipp::ports(index));
    edit(config.sip.as_mut().unwrap());
    config
}

/// Claims the next notified session that is a call to `number`, skipping others.
async fn take_call_to(control: &mut Control, number: &str) -> Value {
    loop {
        let notify = control.ws.expect_type("session.notify").await;
        if !notify.to_string().contains(number) {
            continue;
        }
        let session_id = notify["sessionId"].as_str().unwrap().to_owned();
        let resp = control.open(&session_id).await;
        assert_eq!(resp["ok"], true, "{resp}");
        control.ready(&session_id).await;
        return control.ws.expect_type("call.in").await;
    }
}

/// An ordinary call: SIPp on 127.0.0.1 calls in, the agent answers, SIPp hangs up after a
/// second. `scenario` and `extra` let it authenticate.
async fn ordinary_call(
    server: &RunningServer,
    control: &mut Control,
    index: u16,
    scenario: &str,
    extra: &[&str],
) {
    let dir = sipp::work_dir(&format!("hardening-{index}"));
    let mut args = sipp::uac_args(server, sipp::ports(index), scenario, ORDINARY, 1);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });
    let call_in = take_call_to(control, ORDINARY).await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    loop {
        let v = media.ws.expect_type("call_event").await;
        if v["data"]["event"] == "call.terminated" {
            break;
        }
    }
    phone.await.unwrap().assert_passed();
}

#[tokio::test]
async fn sip_allow_list_refuses_other_sources_with_403_before_any_connector() {
    if !sipp::available() {
        return;
    }
    let index = 25;
    let server = start(sip_config(index, |sip| {
        sip.allow = Some(vec!["127.0.0.1/32".into()]);
    }))
    .await;
    let mut control = control(&server, 8000, "mixed").await;
    // 127.0.0.2 is loopback too, but not in the list.
    let outsider = RawPhone::bind("127.0.0.2", &server).await;
    for i in 0..3 {
        let call_id = format!("outsider{i}");
        let invite = outsider.invite(&call_id, 1, "+15550100", "+19990000403", "");
        outsider.send(invite.as_bytes()).await;
        let r = outsider.response(&call_id).await;
        assert_eq!(r.status, 403, "no 100 Trying, straight 403: {r:?}");
    }
    // The calls never reached the connector: the first session it hears of is SIPp's.
    ordinary_call(&server, &mut control, index, "uac_short.xml", &[]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sip_accounts_challenge_with_401_and_sipp_authenticates() {
    if !sipp::available() {
        return;
    }
    let index = 26;
    let server = start(sip_config(index, |sip| {
        sip.accounts = vec![SipAccount {
            username: "pbx".into(),
            password: "s3cret".into(),
            srtp: None,
        }];
    }))
    .await;
    let mut control = control(&server, 8000, "mixed").await;
    let phone = RawPhone::bind("127.0.0.1", &server).await;
    let invite = phone.invite("auth0", 1, "+15550100", "+15550001", "");
    phone.send(invite.as_bytes()).await;
    let challenge = phone.final_response("auth0").await;
    assert_eq!(challenge.status, 401);
    let www = challenge
        .headers
        .get("WWW-Authenticate")
        .expect("a challenge");
    let parsed = Challenge::parse(www).unwrap();
    assert_eq!(parsed.realm, "telcoflow");
    // Wrong password, and a right one for another Request-URI: challenged again.
    let uri = format!("sip:+15550100@{}", phone.server);
    for (i, (password, hashed_uri)) in [("guess", uri.as_str()), ("s3cret", "sip:x@y")]
        .into_iter()
        .enumerate()
    {
        let auth = digest::authorize(
            &parsed,
            &Credentials {
                username: "pbx".into(),
                password: password.into(),
            },
            &Method::Invite,
            hashed_uri,
            "cn",
            1,
        );
        let call_id = format!("auth{}", i + 1);
        let invite = phone.invite(
            &call_id,
            2,
            "+15550100",
            "+15550001",
            &format!("Authorization: {auth}\r\n"),
        );
        phone.send(invite.as_bytes()).await;
        assert_eq!(phone.final_response(&call_id).await.status, 401);
    }
    // SIPp answers the challenge with the account and its call is taken. (SIPp hashes
    // `sip:host:port` unless told the Request-URI, which the server checks.)
    let auth_uri = format!("{ORDINARY}@{}", phone.server);
    ordinary_call(
        &server,
        &mut control,
        index,
        "uac_digest.xml",
        &["-au", "pbx", "-ap", "s3cret", "-auth_uri", &auth_uri],
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn sip_invite_flood_gets_503_with_retry_after_and_leaves_rtp_ports() {
    if !sipp::available() {
        return;
    }
    let index = 27;
    let ports = sipp::ports(index);
    let server = start(sip_config(index, |sip| {
        // 25 RTP port pairs; the flood may hold only invite_rate_limit of them.
        sip.rtp_ports = format!("{}-{}", ports.rtp_low, ports.rtp_low + 49);
        sip.invite_rate_limit = 20;
        // One long interval, so the count does not depend on how fast this machine is.
        sip.invite_rate_interval_secs = 60;
    }))
    .await;
    let mut control = control(&server, 8000, "mixed").await;
    let attacker = RawPhone::bind("127.0.0.2", &server).await;
    let (mut taken, mut refused) = (0, 0);
    for i in 0..600 {
        let call_id = format!("flood{i}");
        let invite = attacker.invite(&call_id, 1, "+15550100", "+19990000503", "");
        attacker.send(invite.as_bytes()).await;
        let r = attacker.response(&call_id).await;
        match r.status {
            100 => taken += 1,
            503 => {
                let retry: u64 = r.headers.get("Retry-After").unwrap().parse().unwrap();
                assert!((1..=60).contains(&retry), "Retry-After {retry}");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((taken, refused), (20, 580));
    // The 20 calls taken ring and hold 20 ports; the ordinary caller still gets one.
    ordinary_call(&server, &mut control, index, "uac_short.xml", &[]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sip_unparseable_overlong_and_oversized_requests_are_refused_and_the_server_lives() {
    if !sipp::available() {
        return;
    }
    let index = 28;
    let server = start(sip_config(index, |_| {})).await;
    let mut control = control(&server, 8000, "mixed").await;
    let phone = RawPhone::bind("127.0.0.1", &server).await;
    let long = "5".repeat(65);
    let invite = |call_id: &str| phone.invite(call_id, 1, "+15550100", "+15550001", "");
    let bad_utf8 = {
        let mut b = invite("bad2")
            .replacen("From: <", "From: \"\u{1}\" <", 1)
            .into_bytes();
        let i = b.iter().position(|&c| c == 1).unwrap();
        b[i] = 0xff;
        b
    };
    let many_headers: String = (0..200).map(|i| format!("X-Pad-{i}: x\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad1",
            invite("bad1")
                .replacen("Content-Length: ", "Content-Length: x", 1)
                .into_bytes(),
            "Malformed Content-Length header",
        ),
        ("bad2", bad_utf8, "Invalid UTF-8 in headers"),
        (
            "bad3",
            invite("bad3")
                .replacen("SIP/2.0\r\nVia", "SIP/3.0\r\nVia", 1)
                .into_bytes(),
            "Unsupported SIP version",
        ),
        (
            "bad4",
            phone.invite("bad4", 1, &long, "+15550001", "").into_bytes(),
            "Called number longer than 64 characters",
        ),
        (
            "bad5",
            phone.invite("bad5", 1, "+15550100", &long, "").into_bytes(),
            "Caller number longer than 64 characters",
        ),
        (
            "bad6",
            phone
                .invite("bad6", 1, "+15550100", "+15550001", &many_headers)
                .into_bytes(),
            "More than 128 headers",
        ),
    ];
    for (call_id, bytes, reason) in cases {
        phone.send(&bytes).await;
        let r = phone.final_response(call_id).await;
        assert_eq!((r.status, r.reason.as_str()), (400, reason), "{call_id}");
    }
    // Over TCP, an endless header line ends the connection (no message to answer).
    let sip = server.sip_addr().unwrap();
    let mut tcp = TcpStream::connect(sip).await.unwrap();
    let mut line = b"INVITE sip:+15550100@127.0.0.1 SIP/2.0\r\nX-Long: ".to_vec();
    line.extend(std::iter::repeat_n(b'a', 9000));
    let _ = tcp.write_all(&line).await;
    assert_closed(&mut tcp).await;
    ordinary_call(&server, &mut control, index, "uac_short.xml", &[]).await;
    server.shutdown().await;
}

/// Waits (bounded) until the server closes `tcp`, reading and discarding what it sends.
async fn assert_closed(tcp: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open");
}

#[tokio::test]
async fn sip_tcp_slow_partial_idle_and_excess_connections_are_closed() {
    if !sipp::available() {
        return;
    }
    let index = 29;
    let server = start(sip_config(index, |sip| {
        sip.tcp_message_timeout_secs = 1;
        sip.tcp_idle_timeout_secs = 2;
        sip.tcp_max_connections = 3;
    }))
    .await;
    let mut control = control(&server, 8000, "mixed").await;
    let sip = server.sip_addr().unwrap();

    // Three connections fill the limit: one that pings, one sending half an INVITE, one
    // silent (closed at the message timeout: no first message). A fourth is closed as soon
    // as it is accepted.
    let mut pinging = TcpStream::connect(sip).await.unwrap();
    // The pinging connection delivered a first message (else it would be closed at the
    // message timeout); its keep-alives then hold it past the idle timeout.
    pinging
        .write_all(
            b"OPTIONS sip:+15550100@127.0.0.1 SIP/2.0\r\n\
              Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKping\r\n\
              Max-Forwards: 70\r\n\
              From: <sip:probe@127.0.0.1>;tag=p1\r\n\
              To: <sip:+15550100@127.0.0.1>\r\n\
              Call-ID: tcp-ping-1\r\n\
              CSeq: 1 OPTIONS\r\n\
              Content-Length: 0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 2048];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, pinging.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"SIP/2.0 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let mut half = TcpStream::connect(sip).await.unwrap();
    let mut silent = TcpStream::connect(sip).await.unwrap();
    let started = tokio::time::Instant::now();
    half.write_all(
        b"INVITE sip:+15550100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bKh\r\n",
    )
    .await
    .unwrap();
    let mut excess = TcpStream::connect(sip).await.unwrap();
    assert_closed(&mut excess).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the connection over the limit is closed at accept"
    );
    // The half message is cut at the message timeout (1 s), before the idle one (2 s).
    assert_closed(&mut half).await;
    let half_closed_after = started.elapsed();
    assert!(
        half_closed_after < Duration::from_millis(1900),
        "a partial message is cut at 1 s: {half_closed_after:?}"
    );

    let mut pong = [0u8; 8];
    for _ in 0..6 {
        pinging.write_all(b"\r\n\r\n").await.unwrap();
        let n = tokio::time::timeout(WAIT, pinging.read(&mut pong))
            .await
            .expect("a pong")
            .unwrap();
        assert_eq!(&pong[..n], b"\r\n", "CRLF keep-alive answered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // 3 s in: the idle connections are gone, the pinging one is not.
    assert_closed(&mut silent).await;
    pinging.write_all(b"\r\n\r\n").await.unwrap();
    let n = tokio::time::timeout(WAIT, pinging.read(&mut pong))
        .await
        .expect("still open")
        .unwrap();
    assert_eq!(&pong[..n], b"\r\n");
    // Once it stops, it is idle like any other.
    assert_closed(&mut pinging).await;

    ordinary_call(&server, &mut control, index, "uac_short.xml", &[]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sip_bye_on_shutdown_is_retransmitted_until_answered() {
    let mut config = sipp::sip_config(sipp::ports(24));
    // Its own RTP range: index 24's SIPp test does not start a server with this one.
    config.sip.as_mut().unwrap().rtp_ports = "17000-17099".into();
    let server = start(config).await;
    let mut control = control(&server, 8000, "mixed").await;
    let phone = RawPhone::bind("127.0.0.1", &server).await;
    let invite = phone.invite("byecall", 1, "+15550100", "+15550001", "");
    phone.send(invite.as_bytes()).await;
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    let ok = phone.final_response("byecall").await;
    assert_eq!(ok.status, 200);
    let to = ok.headers.get("To").unwrap().to_owned();
    let ack = format!(
        "ACK sip:+15550100@{} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKack\r\n\
         From: <sip:+15550001@{}>;tag=tbyecall\r\nTo: {to}\r\nCall-ID: byecall\r\n\
         CSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        phone.server, phone.local, phone.local
    );
    phone.send(ack.as_bytes()).await;

    let stop = tokio::spawn(server.shutdown());
    let next_bye = || async {
        // Skipping a 200 retransmission that crossed the ACK.
        loop {
            if let Message::Request(r) = phone.recv().await {
                assert_eq!(r.method, Method::Bye, "{r:?}");
                return r;
            }
        }
    };
    // The first BYE is "lost": not answered.
    let first = next_bye().await;
    let sent_at = tokio::time::Instant::now();
    let again = next_bye().await;
    let gap = sent_at.elapsed();
    assert_eq!(
        again.top_via().unwrap().branch(),
        first.top_via().unwrap().branch(),
        "a retransmission of the same transaction"
    );
    assert!(
        gap >= Duration::from_millis(300) && gap < Duration::from_millis(1500),
        "retransmitted after T1 (500 ms), got {gap:?}"
    );
    let mut ok = Response::to_request(&again, 200, None);
    ok.headers.push("Content-Length", "0");
    phone.send(&ok.to_bytes()).await;
    // Answered: the shutdown completes without waiting out its grace.
    tokio::time::timeout(Duration::from_secs(3), stop)
        .await
        .expect("shutdown ends once the BYE is answered")
        .unwrap();
}

#[tokio::test]
async fn sip_on_a_public_address_without_allow_or_accounts_does_not_start() {
    let mut config = dev_config();
    config.sip = Some(SipConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..SipConfig::default()
    });
    let err = Server::start(config.clone()).await.unwrap_err().to_string();
    assert!(err.contains("allow = [\"0.0.0.0/0\""), "{err}");
    assert!(err.contains("[[sip.accounts]]"), "{err}");
    // Opting in to the open world, it starts.
    config.sip.as_mut().unwrap().allow = Some(vec!["0.0.0.0/0".into()]);
    config.sip.as_mut().unwrap().rtp_ports = "17100-17109".into();
    let server = Server::start(config)
        .await
        .expect("starts with an allow list");
    server.shutdown().await;
}

#[tokio::test]
async fn sip_tcp_connection_of_a_live_call_outlasts_the_idle_timeout() {
    if !sipp::available() {
        return;
    }
    let index = 23;
    // SIPp connects up to a second before its INVITE: 2 s leaves it room.
    let server = start(sip_config(index, |sip| sip.tcp_idle_timeout_secs = 2)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("hardening-23");
    // SIPp over TCP sends nothing after its ACK and waits for our BYE on that connection.
    let mut args = sipp::uac_args(
        &server,
        sipp::ports(index),
        "uac_rtp_silent.xml",
        ORDINARY,
        1,
    );
    args.extend(["-t".into(), "t1".into()]);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });
    let call_in = take_call_to(&mut control, ORDINARY).await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    // 4 s of the call's clock: well past the idle timeout with no SIP traffic.
    for _ in 0..200 {
        media.audio(0).await;
    }
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

/// Whether the server answers a CRLF keep-alive on `tcp`: a connection it took.
async fn answers_ping(tcp: &mut TcpStream) -> bool {
    if tcp.write_all(b"\r\n\r\n").await.is_err() {
        return false;
    }
    let mut pong = [0u8; 8];
    matches!(
        tokio::time::timeout(WAIT, tcp.read(&mut pong)).await,
        Ok(Ok(n)) if &pong[..n] == b"\r\n"
    )
}

/// A TCP connection to `server` from the loopback address `ip`.
async fn connect_from(ip: &str, server: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    socket.connect(server).await.unwrap()
}

#[tokio::test]
async fn sip_tcp_from_outside_allow_or_over_the_per_source_cap_is_closed_at_accept() {
    let server = start(sip_config(22, |sip| {
        sip.allow = Some(vec!["127.0.0.1/32".into()]);
        sip.tcp_max_connections_per_ip = 2;
    }))
    .await;
    let sip = server.sip_addr().unwrap();

    // 127.0.0.2 is loopback too, but not in the list: closed without an answer.
    let mut outsider = connect_from("127.0.0.2", sip).await;
    assert_closed(&mut outsider).await;

    // Two connections from 127.0.0.1 are taken; a third from it is closed.
    let mut first = connect_from("127.0.0.1", sip).await;
    let mut second = connect_from("127.0.0.1", sip).await;
    assert!(answers_ping(&mut first).await, "first connection taken");
    assert!(answers_ping(&mut second).await, "second connection taken");
    let mut third = connect_from("127.0.0.1", sip).await;
    assert_closed(&mut third).await;

    // Closing one gives its place back: a new connection is taken once the server has seen
    // the close (bounded retries, each one refused or taken).
    drop(first);
    let mut taken = false;
    for _ in 0..50 {
        let mut again = connect_from("127.0.0.1", sip).await;
        if answers_ping(&mut again).await {
            taken = true;
            break;
        }
    }
    assert!(taken, "a place freed by a closed connection is taken again");
    assert!(answers_ping(&mut second).await, "the others stay open");
    server.shutdown().await;
}

#[tokio::test]
async fn a_draining_server_answers_an_invite_503_with_retry_after() {
    let index = 30;
    let mut config = sip_config(index, |_| {});
    config.drain_grace_secs = 7;
    let server = start(config).await;
    // A call in progress keeps the draining server up.
    let _ringing = dial(&server, "+15550000001", "+15559990001", 8000).await;
    assert_eq!(server.drain(), 1);
    let phone = RawPhone::bind("127.0.0.1", &server).await;
    let invite = phone.invite("drained1", 1, "+15550100", "+15550001", "");
    phone.send(invite.as_bytes()).await;
    let r = phone.final_response("drained1").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers.get("Retry-After"), Some("7"));
    server.shutdown().await;
}
