//! Draining one server (no cluster): it takes no new calls, closes its control connections,
//! lets its calls run for the grace, then ends those left and stops; the admin route and
//! `/readyz`.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use telcoflow_server::RunningServer;
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};

const RATE: u32 = 16000;
const FRAME: usize = 320;

/// An HTTP request with exactly these headers: status and JSON body.
async fn request(server: &RunningServer, method: &str, path: &str, headers: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\n{headers}content-length: 0\r\nconnection: close\r\n\r\n"
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

/// Waits until the server stops by itself.
async fn stops(mut server: RunningServer) {
    tokio::time::timeout(WAIT, server.wait())
        .await
        .expect("the server stops by itself");
    assert!(server.is_draining());
}

#[tokio::test]
async fn a_drained_server_lets_its_call_run_for_the_grace_then_ends_it() {
    let mut config = dev_config();
    config.drain_grace_secs = 1;
    let (server, mut control, mut phone, mut media) = answered_call(config, RATE).await;
    let (status, body) = http(&server, "GET", "/readyz").await;
    assert_eq!((status, body), (200, json!({"status": "ready"})));

    let started = tokio::time::Instant::now();
    assert_eq!(server.drain(), 1);
    let (code, reason) = control.ws.close_frame().await.expect("a close frame");
    assert_eq!(code, 1001, "{reason}");
    let (status, body) = http(&server, "GET", "/readyz").await;
    assert_eq!((status, body), (503, json!({"status": "draining"})));
    // Liveness is not readiness: the process still runs, and says so.
    assert_eq!(http(&server, "GET", "/healthz").await.0, 200);
    let refused = dial(&server, "+15550000002", "+15559990001", RATE).await;
    assert_eq!(refused.call_id.as_deref(), Some("refused:unavailable"));
    let url = format!("{}/v1/agent/session-manager", server.base_url());
    let err = Ws::connect(&url, &auth_headers(DEV_API_KEY, DEV_CONNECTOR_UUID))
        .await
        .err()
        .expect("a new control connection is refused");
    assert_eq!(err.status, 503, "{}", err.body);

    // The call goes on during the grace: the caller reaches the agent and hears it.
    let mut heard = false;
    for _ in 0..50 {
        phone.send_level(777, FRAME).await;
        let got = media.audio(0).await[FRAME / 2];
        media.send_audio(&pcm_level(got, FRAME)).await;
        if samples(&phone.ws.binary().await)[FRAME / 2] == 777 {
            heard = true;
            break;
        }
    }
    assert!(heard, "the call stopped carrying audio in the drain");

    // Past the grace the server ends it: the agent is told, the caller hung up.
    loop {
        let v = media.ws.expect_type("call_event").await;
        if v["data"]["event"] == "call.terminated" {
            break;
        }
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    let hangup = phone.event("hangup").await;
    assert_eq!(hangup["reason"], "remote", "{hangup}");
    stops(server).await;
}

#[tokio::test]
async fn a_server_without_calls_stops_at_once_when_drained_over_http() {
    let server = start(dev_config()).await;
    let (status, body) = http(&server, "POST", "/admin/v1/drain").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"draining": true, "calls": 0, "graceSecs": 30}));
    stops(server).await;
}

#[tokio::test]
async fn the_drain_route_takes_only_the_admin_token_when_one_is_set() {
    let mut config = dev_config();
    config.admin_token = Some("op-token".into());
    let server = start(config).await;
    let refusals = [
        ("", 401),
        ("authorization: Bearer not-the-token\r\n", 401),
        (
            "x-api-key: wrong\r\nx-connector-uuid: 00000000-0000-4000-8000-000000000001\r\n",
            401,
        ),
    ];
    for (headers, expected) in refusals {
        let (status, body) = request(&server, "POST", "/admin/v1/drain", headers).await;
        assert_eq!(status, expected, "{headers:?}: {body}");
    }
    // A tenant's own key does not drain a node every tenant shares.
    let tenant = format!("x-api-key: {DEV_API_KEY}\r\nx-connector-uuid: {DEV_CONNECTOR_UUID}\r\n");
    let (status, body) = request(&server, "POST", "/admin/v1/drain", &tenant).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("admin_token"),
        "{body}"
    );
    assert!(!server.is_draining());
    // Readiness needs no credentials.
    let (status, _) = request(&server, "GET", "/readyz", "").await;
    assert_eq!(status, 200);
    let (status, body) = request(
        &server,
        "POST",
        "/admin/v1/drain",
        "authorization: Bearer op-token\r\n",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    stops(server).await;
}

#[tokio::test]
async fn without_an_admin_token_the_drain_route_takes_a_connector_key_only() {
    let server = start(dev_config()).await;
    let (status, body) = request(&server, "POST", "/admin/v1/drain", "").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = request(
        &server,
        "POST",
        "/admin/v1/drain",
        "authorization: Bearer anything\r\n",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(!server.is_draining());
    let tenant = format!("x-api-key: {DEV_API_KEY}\r\nx-connector-uuid: {DEV_CONNECTOR_UUID}\r\n");
    let (status, body) = request(&server, "POST", "/admin/v1/drain", &tenant).await;
    assert_eq!(status, 202, "{body}");
    stops(server).await;
}

#[tokio::test]
async fn a_draining_server_keeps_a_control_connection_until_its_agent_opened_the_media_it_claimed()
{
    let server = start(dev_config()).await;
    let mut control = control(&server, RATE, "mixed").await;
    let mut phone = dial(&server, "+15551230001", "+15559990001", RATE).await;
    // Claimed and readied, its media not opened yet (the official SDK opens it at `answer()`).
    let call_in = control.take_call().await;
    assert_eq!(server.drain(), 1);

    // The connection stays while its agent has media to open: it still answers.
    let reply = control
        .request(json!({"type": "call_flow.setup", "data": {"inboundCall": "ALL"}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    // The media token it was given still opens the call's media.
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    phone.event("answered").await;
    // Then the connection is moved off the node.
    let (code, reason) = control.ws.close_frame().await.expect("a close frame");
    assert_eq!(code, 1001, "{reason}");
    assert!(
        hears_echo_through(&mut phone, &mut media).await,
        "the call stopped carrying audio"
    );
}

#[tokio::test]
async fn a_draining_server_closes_a_control_connection_whose_agent_never_opens_its_media() {
    let mut config = dev_config();
    config.drain_grace_secs = 1;
    let server = start(config).await;
    let mut control = control(&server, RATE, "mixed").await;
    let _phone = dial(&server, "+15551230001", "+15559990001", RATE).await;
    let _call_in = control.take_call().await;
    let started = tokio::time::Instant::now();
    assert_eq!(server.drain(), 1);
    // It waits no longer than the handover bound (here the one-second grace).
    let (code, reason) = control.ws.close_frame().await.expect("a close frame");
    assert_eq!(code, 1001, "{reason}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    stops(server).await;
}

/// The phone hears a level the agent echoes back.
async fn hears_echo_through(phone: &mut Phone, media: &mut Media) -> bool {
    for _ in 0..50 {
        phone.send_level(777, FRAME).await;
        let got = media.audio(0).await[FRAME / 2];
        media.send_audio(&pcm_level(got, FRAME)).await;
        if samples(&phone.ws.binary().await)[FRAME / 2] == 777 {
            return true;
        }
    }
    false
}
