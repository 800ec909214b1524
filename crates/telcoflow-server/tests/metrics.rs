//! `GET /metrics`: the Prometheus text format (checked by `promtool check metrics`), figures
//! that move with a real call (a simulated phone and a Rust SDK echo agent), SIP counted by
//! method and status, and who may read it.

mod common;
mod sipp;

use common::*;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use telcoflow_server::RunningServer;

/// A GET to `path` at `addr` with `headers` (`name: value\r\n` each): status and body.
async fn get(addr: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: test\r\n{headers}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// The samples of a scrape: `name{labels}` -> value (labels as the server prints them).
fn parse_scrape(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(server: &RunningServer) -> (String, HashMap<String, f64>) {
    let (status, body) = get(server.local_addr(), "/metrics", "").await;
    assert_eq!(status, 200, "{body}");
    let parsed = parse_scrape(&body);
    (body, parsed)
}

fn value(samples: &HashMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or_else(|| {
        let mut keys: Vec<_> = samples.keys().collect();
        keys.sort();
        panic!("no sample {key}; have {keys:#?}")
    })
}

/// Scrapes until `ready` holds for the samples (bounded by [`WAIT`]).
async fn scrape_until(
    server: &RunningServer,
    what: &str,
    ready: impl Fn(&HashMap<String, f64>) -> bool,
) -> (String, HashMap<String, f64>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (text, s) = scrape(server).await;
        if ready(&s) {
            return (text, s);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pipes a scrape through `promtool check metrics` (Debian's `prometheus` package). Without
/// promtool the check is skipped with a message, except under CI, where it fails.
fn promtool_check(text: &str) {
    use std::io::Write as _;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_some_and(|v| v == "true") => {
            panic!("promtool is needed under CI (Debian package prometheus): {e}")
        }
        Err(e) => {
            eprintln!("skipped: promtool check metrics ({e}; install Debian's prometheus)");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// A Rust SDK echo agent: answers every call and sends back what it hears.
async fn echo_agent(base_url: &str) -> telcoflow::TelcoflowClient {
    let sdk = telcoflow::TelcoflowClientConfig::builder()
        .api_key(
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        )
        .base_url(base_url)
        .sample_rate(telcoflow::SampleRate::Hz16000)
        .build()
        .expect("SDK config");
    let client = telcoflow::TelcoflowClient::connect(sdk)
        .await
        .expect("the agent connects");
    tokio::spawn({
        let client = client.clone();
        async move {
            client
                .serve(|call: telcoflow::ActiveCall| async move {
                    if call.answer().await.is_err() {
                        return;
                    }
                    let mut audio = call.audio_stream(telcoflow::AudioChannel::Mixed);
                    while let Some(chunk) = audio.next().await {
                        match call.send_audio(&chunk).await {
                            Ok(()) => {}
                            Err(e) if e.is_buffer_full() => {}
                            Err(_) => break,
                        }
                    }
                })
                .await
        }
    });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_a_real_call_and_pass_promtool() {
    let server = start(dev_config()).await;
    let (before, s0) = scrape(&server).await;
    promtool_check(&before);
    assert_eq!(value(&s0, "telcoflow_calls_total{outcome=\"caller\"}"), 0.0);
    assert_eq!(value(&s0, "telcoflow_calls_active"), 0.0);

    let _agent = echo_agent(server.base_url()).await;
    scrape_until(&server, "the agent's control connection", |s| {
        s.get("telcoflow_control_connections") == Some(&1.0)
    })
    .await;
    let mut phone = dial(&server, "+15550001", "+15550002", 16000).await;
    tokio::time::timeout(WAIT, phone.event("answered"))
        .await
        .expect("answered");
    // Talk until the echo comes back: frames went both ways through the agent.
    let mut echoed = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while echoed < 5 {
        assert!(tokio::time::Instant::now() < deadline, "no echo");
        phone.send_level(3000, 320).await;
        if let Ok(Some(tokio_tungstenite::tungstenite::Message::Binary(frame))) =
            tokio::time::timeout(Duration::from_millis(100), phone.ws.next()).await
        {
            if samples_of(&frame).iter().any(|s| s.abs() > 1000) {
                echoed += 1;
            }
        }
    }
    let (_, during) = scrape(&server).await;
    assert_eq!(value(&during, "telcoflow_calls_active"), 1.0);
    assert_eq!(value(&during, "telcoflow_sessions_open"), 1.0);
    assert_eq!(value(&during, "telcoflow_media_connections"), 1.0);
    phone.send_json(serde_json::json!({"type": "hangup"})).await;

    let (text, s) = scrape_until(&server, "the call's end", |s| {
        s.get("telcoflow_calls_total{outcome=\"caller\"}") == Some(&1.0)
            && s.get("telcoflow_media_connections") == Some(&0.0)
            && s.get("telcoflow_leg_jitter_seconds_count{leg_kind=\"sim\"}") == Some(&1.0)
    })
    .await;
    promtool_check(&text);
    assert_eq!(value(&s, "telcoflow_calls_active"), 0.0);
    assert_eq!(value(&s, "telcoflow_sessions_total"), 1.0);
    assert_eq!(value(&s, "telcoflow_sessions_open"), 0.0);
    assert_eq!(value(&s, "telcoflow_call_setup_seconds_count"), 1.0);
    assert_eq!(value(&s, "telcoflow_control_connections_total"), 1.0);
    assert_eq!(value(&s, "telcoflow_media_connections_total"), 1.0);
    assert_eq!(
        value(
            &s,
            "telcoflow_commands_total{command=\"call.answer\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "telcoflow_command_duration_seconds_count{command=\"call.answer\"}"
        ),
        1.0
    );
    for key in [
        "telcoflow_agent_frames_total{direction=\"in\"}",
        "telcoflow_agent_frames_total{direction=\"out\"}",
        "telcoflow_leg_frames_total{direction=\"in\",leg_kind=\"sim\"}",
        "telcoflow_leg_frames_total{direction=\"out\",leg_kind=\"sim\"}",
    ] {
        assert!(value(&s, key) >= 5.0, "{key}: {}", value(&s, key));
    }
    // The caller leg's arrival jitter, at its end.
    assert_eq!(
        value(&s, "telcoflow_leg_jitter_seconds_count{leg_kind=\"sim\"}"),
        1.0
    );
    // Nothing of SIP moved on a simulated call.
    assert_eq!(
        value(
            &s,
            "telcoflow_leg_frames_total{direction=\"in\",leg_kind=\"sip\"}"
        ),
        0.0
    );
    assert_eq!(value(&s, "telcoflow_rtp_ports_in_use"), 0.0);
    server.shutdown().await;
}

fn samples_of(frame: &[u8]) -> Vec<i16> {
    frame
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

#[tokio::test]
async fn sip_requests_and_responses_are_counted_by_method_and_code() {
    let mut config = dev_config();
    let sip = telcoflow_server::config::SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: "23000-23099".into(),
        ..Default::default()
    };
    config.sip = Some(sip);
    let server = start(config).await;
    let addr = server.sip_addr().unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = sock.local_addr().unwrap();
    for (i, method) in ["OPTIONS", "FROBNICATE"].iter().enumerate() {
        let msg = format!(
            "{method} sip:{addr} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-metrics-{i}\r\n\
             From: <sip:probe@{local}>;tag=1\r\n\
             To: <sip:{addr}>\r\n\
             Call-ID: metrics-{i}\r\n\
             CSeq: 1 {method}\r\n\
             Max-Forwards: 70\r\n\
             Content-Length: 0\r\n\r\n"
        );
        sock.send_to(msg.as_bytes(), addr).await.unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .expect("a SIP response")
            .unwrap();
        assert!(buf[..n].starts_with(b"SIP/2.0 "));
    }
    let (text, s) = scrape_until(&server, "the SIP messages", |s| {
        s.get("telcoflow_sip_requests_total{direction=\"in\",method=\"other\"}") == Some(&1.0)
    })
    .await;
    promtool_check(&text);
    assert_eq!(
        value(
            &s,
            "telcoflow_sip_requests_total{direction=\"in\",method=\"OPTIONS\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "telcoflow_sip_responses_total{code=\"200\",direction=\"out\",method=\"OPTIONS\"}"
        ),
        1.0
    );
    // The unknown method got a response too (405 or 501), counted under "other".
    let other: f64 = s
        .iter()
        .filter(|(k, _)| {
            k.starts_with("telcoflow_sip_responses_total{")
                && k.contains("direction=\"out\",method=\"other\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(other, 1.0, "{text}");
    server.shutdown().await;
}

/// A registered phone's arrival jitter is recorded when its call ends, while the phone stays
/// registered, not when its next call rings.
#[tokio::test]
async fn a_registered_phones_jitter_is_recorded_when_its_call_ends() {
    use serde_json::json;
    // The caller sends no audio: its leg has no jitter to record.
    let (server, _control, _phone, mut media) = answered_call(dev_config(), 8000).await;
    let mut callee = register(
        &server,
        telcoflow_server::config::DEV_CONNECT_DESTINATION,
        8000,
    )
    .await;
    let connect = media.command("call.connect", Some(json!({"ringTimeSeconds": 10})));
    let answer = async {
        callee.event("incoming").await;
        callee.send_json(json!({"type": "answer"})).await;
        callee.event("answered").await;
    };
    let (resp, ()) = tokio::join!(connect, answer);
    assert_eq!(resp["success"], true, "{resp}");
    for _ in 0..5 {
        callee.send_level(500, 160).await;
    }
    let (_, during) = scrape(&server).await;
    assert_eq!(
        value(
            &during,
            "telcoflow_leg_jitter_seconds_count{leg_kind=\"sim\"}"
        ),
        0.0
    );
    callee.send_json(json!({"type": "hangup"})).await;
    scrape_until(&server, "the registered phone's jitter", |s| {
        s.get("telcoflow_leg_jitter_seconds_count{leg_kind=\"sim\"}") == Some(&1.0)
    })
    .await;
    drop(callee);
    server.shutdown().await;
}

/// A non-loopback address of this host, if it has one: the source the kernel would use
/// towards a documentation address (a UDP connect sends nothing).
fn outside_address() -> Option<std::net::IpAddr> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect("192.0.2.1:9").ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn metrics_access_needs_the_token_from_everyone_once_it_is_set() {
    let mut config = dev_config();
    config.listen = "0.0.0.0:0".parse().unwrap();
    config.metrics.token = Some("scrape-me".into());
    let with_token = start(config.clone()).await;
    let port = with_token.local_addr().port();
    let lo = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // A reverse proxy on the same host connects from loopback: with a token, loopback
    // needs it too.
    let (status, body) = get(lo, "/metrics", "").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = get(lo, "/metrics", "authorization: Bearer scrape-me\r\n").await;
    assert_eq!(status, 200);
    assert!(body.contains("telcoflow_calls_total"), "{body}");

    config.metrics.token = None;
    let without_token = start(config.clone()).await;
    let lo = std::net::SocketAddr::from(([127, 0, 0, 1], without_token.local_addr().port()));
    assert_eq!(
        get(lo, "/metrics", "").await.0,
        200,
        "no token: loopback is open"
    );
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.metrics.enabled = false;
    let disabled = start(config).await;
    let (status, body) = get(disabled.local_addr(), "/metrics", "").await;
    assert_eq!(status, 404);
    assert!(body.contains("[metrics] enabled = false"), "{body}");

    let Some(ip) = outside_address() else {
        eprintln!("skipped: this host has no address besides loopback to test from");
        return;
    };
    let far = std::net::SocketAddr::new(ip, port);
    let (status, body) = get(far, "/metrics", "").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let (status, body) = get(far, "/metrics", "authorization: Bearer wrong\r\n").await;
    assert_eq!(status, 401);
    assert!(body.contains("wrong metrics token"), "{body}");
    let (status, body) = get(far, "/metrics", "authorization: Bearer scrape-me\r\n").await;
    assert_eq!(status, 200);
    assert!(body.contains("telcoflow_calls_total"), "{body}");

    let far = std::net::SocketAddr::new(ip, without_token.local_addr().port());
    let (status, body) = get(far, "/metrics", "authorization: Bearer scrape-me\r\n").await;
    assert_eq!(status, 403);
    assert!(body.contains("[metrics] token"), "{body}");
}

/// A SIP call (SIPp plays recorded speech over RTP, then hangs up): the SIP leg's frames,
/// its jitter at the end, its RTP port, and the SIP dialogue by method and code.
#[tokio::test]
async fn a_sip_call_moves_the_rtp_and_sip_metrics() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(31);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("metrics");
    let args = sipp::uac_args(&server, ports, "uac_audio.xml", "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    media.audio(0).await;
    let (_, during) = scrape(&server).await;
    assert_eq!(value(&during, "telcoflow_rtp_ports_in_use"), 1.0);
    phone.await.unwrap().assert_passed();

    let (text, s) = scrape_until(&server, "the SIP call's end", |s| {
        s.get("telcoflow_leg_jitter_seconds_count{leg_kind=\"sip\"}") == Some(&1.0)
            && s.get("telcoflow_calls_total{outcome=\"caller\"}") == Some(&1.0)
    })
    .await;
    promtool_check(&text);
    assert_eq!(value(&s, "telcoflow_rtp_ports_in_use"), 0.0);
    assert!(
        value(
            &s,
            "telcoflow_leg_frames_total{direction=\"in\",leg_kind=\"sip\"}"
        ) > 10.0
    );
    assert!(
        value(
            &s,
            "telcoflow_leg_frames_total{direction=\"out\",leg_kind=\"sip\"}"
        ) > 0.0
    );
    assert!(value(&s, "telcoflow_agent_frames_total{direction=\"out\"}") > 10.0);
    for key in [
        "telcoflow_sip_requests_total{direction=\"in\",method=\"INVITE\"}",
        "telcoflow_sip_requests_total{direction=\"in\",method=\"ACK\"}",
        "telcoflow_sip_requests_total{direction=\"in\",method=\"BYE\"}",
        "telcoflow_sip_responses_total{code=\"200\",direction=\"out\",method=\"INVITE\"}",
        "telcoflow_sip_responses_total{code=\"200\",direction=\"out\",method=\"BYE\"}",
    ] {
        assert!(value(&s, key) >= 1.0, "{key}");
    }
    server.shutdown().await;
}
