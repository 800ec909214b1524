//! The console: its files served with the right content types, and its live view over a real
//! WebSocket: refused without the right credentials, and showing a connector its own calls,
//! agents and ended calls only. Also the simulated phone's first-frame authentication, which
//! the console's browser phone uses.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use telcoflow_server::RunningServer;
use telcoflow_server::config::{ConnectorConfig, DEV_API_KEY, DEV_CONNECTOR_UUID};

const OTHER_UUID: &str = "00000000-0000-4000-8000-0000000000c2";
const OTHER_KEY: &str = "other-key";
const OTHER_NUMBER: &str = "+15557770001";

/// The development connector (every number) and another that owns [`OTHER_NUMBER`].
fn two_connectors() -> telcoflow_server::Config {
    let mut config = dev_config();
    let mut other = ConnectorConfig::development(OTHER_KEY, OTHER_UUID);
    other.name = Some("other".into());
    other.numbers = vec![OTHER_NUMBER.into()];
    other.connect_default = None;
    other.outbound_caller_id = None;
    config.connectors.push(other);
    config
}

/// `GET path` over a raw socket: status, headers (lower-case names) and body.
async fn get(server: &RunningServer, path: &str) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

#[tokio::test]
async fn console_files_are_served_with_their_content_types() {
    let server = start(dev_config()).await;
    for (path, content_type, needle) in [
        (
            "/console",
            "text/html; charset=utf-8",
            "<title>telcoflow console</title>",
        ),
        (
            "/console/console.js",
            "text/javascript; charset=utf-8",
            "/console/v1/live",
        ),
        (
            "/console/console.css",
            "text/css; charset=utf-8",
            "#phone-status",
        ),
        (
            "/console/phone-worklet.js",
            "text/javascript; charset=utf-8",
            "registerProcessor(\"phone-io\"",
        ),
    ] {
        let (status, headers, body) = get(&server, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), content_type, "{path}");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        let csp = header(&headers, "content-security-policy");
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
        assert!(body.contains(needle), "{path} lacks {needle}");
    }
    let (status, _, _) = get(&server, "/console/secrets.txt").await;
    assert_eq!(status, 404);
    let (status, _, _) = get(&server, "/console/../Cargo.toml").await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

/// A live view logged in as `uuid` / `key`, after its `welcome`.
async fn live(server: &RunningServer, uuid: &str, key: &str) -> (Ws, Value) {
    let url = format!("{}/console/v1/live", server.base_url());
    let mut ws = Ws::connect(&url, &[]).await.expect("live view connects");
    ws.send_json(json!({"type": "auth", "connectorUuid": uuid, "apiKey": key}))
        .await;
    let welcome = ws.expect_type("welcome").await;
    (ws, welcome)
}

/// The first snapshot for which `pred` holds (snapshots come every 500 ms).
async fn snapshot_where(ws: &mut Ws, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot with {what} in time"
        );
        let v = ws.expect_type("snapshot").await;
        if pred(&v) {
            return v;
        }
    }
}

fn ids(v: &Value, list: &str, key: &str) -> Vec<String> {
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[key].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn live_view_refuses_bad_credentials_with_a_reason() {
    let server = start(two_connectors()).await;
    let url = format!("{}/console/v1/live", server.base_url());
    for (first, reason) in [
        (
            json!({"type": "auth", "connectorUuid": DEV_CONNECTOR_UUID, "apiKey": "wrong"}),
            "unknown connector or wrong API key",
        ),
        // Another connector's key does not open this one.
        (
            json!({"type": "auth", "connectorUuid": DEV_CONNECTOR_UUID, "apiKey": OTHER_KEY}),
            "unknown connector or wrong API key",
        ),
        (
            json!({"type": "auth", "connectorUuid": "nobody", "apiKey": DEV_API_KEY}),
            "unknown connector or wrong API key",
        ),
        (
            json!({"type": "hello"}),
            "the first frame must be {\"type\":\"auth\"",
        ),
    ] {
        let mut ws = Ws::connect(&url, &[]).await.expect("upgrade");
        ws.send_json(first.clone()).await;
        let (texts, close) = ws.texts_until_close().await;
        assert!(texts.is_empty(), "nothing before the refusal: {texts:?}");
        let (code, text) = close.expect("a close frame");
        assert_eq!(code, 1008, "{first}");
        assert!(text.contains(reason), "{first}: {text}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn live_view_shows_a_connector_its_own_calls_agents_and_ended_calls() {
    let server = start(two_connectors()).await;
    let (mut mine, welcome) = live(&server, DEV_CONNECTOR_UUID, DEV_API_KEY).await;
    assert_eq!(welcome["connectorUuid"], DEV_CONNECTOR_UUID);
    assert_eq!(welcome["numbers"], json!(["*"]));
    let (mut theirs, _) = live(&server, OTHER_UUID, OTHER_KEY).await;

    // An agent of the development connector takes its call; the other connector's call rings
    // unclaimed.
    let mut control = control(&server, 16000, "mixed").await;
    let mut my_phone = dial(&server, "+15551110001", "+15559990001", 16000).await;
    let mut their_phone = dial(&server, "+15552220002", OTHER_NUMBER, 16000).await;
    let my_call = my_phone.call_id.clone().unwrap();
    let their_call = their_phone.call_id.clone().unwrap();
    let call_in = control.take_call().await;
    assert_eq!(call_in["callId"], my_call.as_str());
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    my_phone.event("answered").await;
    // A loud caller, for the level meter.
    for _ in 0..5 {
        my_phone.send_level(8000, 320).await;
    }

    let v = snapshot_where(&mut mine, "my call answered and loud", |v| {
        v["calls"].as_array().unwrap().iter().any(|c| {
            c["callId"] == my_call.as_str()
                && c["state"] == "answered"
                && c["agent"]["mediaAttached"] == true
                && c["levels"]["fromCallerDbfs"].as_f64().unwrap() > -20.0
        })
    })
    .await;
    assert_eq!(ids(&v, "calls", "callId"), [my_call.as_str()], "{v}");
    assert_eq!(v["callsTotal"], 1);
    let call = &v["calls"][0];
    assert_eq!(call["from"], "+15551110001");
    assert_eq!(call["to"], "+15559990001");
    assert_eq!(call["agent"]["controlId"], control.id.as_str());
    assert!(
        call["quality"]["framesFromCaller"].as_u64().unwrap() >= 5,
        "{call}"
    );
    // The call's quality figures: the caller's summary, and all of them.
    let mos = call["quality"]["mos"].as_f64().unwrap();
    assert!((1.0..=4.5).contains(&mos), "{call}");
    assert_eq!(call["quality"]["stats"]["call_id"], my_call.as_str());
    assert_eq!(call["quality"]["stats"]["legs"][0]["role"], "caller");
    assert_eq!(ids(&v, "agents", "controlId"), [control.id.as_str()]);
    assert_eq!(v["agents"][0]["sessionsHeld"], 1);
    assert_eq!(v["sessions"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["sessions"][0]["heldBy"], control.id.as_str());
    assert!(v["ended"].as_array().unwrap().is_empty());

    let v = snapshot_where(&mut theirs, "their call", |v| {
        !v["calls"].as_array().unwrap().is_empty()
    })
    .await;
    assert_eq!(ids(&v, "calls", "callId"), [their_call.as_str()], "{v}");
    assert_eq!(v["calls"][0]["state"], "offered");
    assert_eq!(v["calls"][0]["agent"]["controlId"], Value::Null);
    assert!(v["agents"].as_array().unwrap().is_empty(), "{v}");

    // The caller hangs up: the call moves to the ended calls, of its connector only.
    my_phone.send_json(json!({"type": "hangup"})).await;
    my_phone.event("hangup").await;
    let v = snapshot_where(&mut mine, "my call ended", |v| {
        v["calls"].as_array().unwrap().is_empty()
    })
    .await;
    assert_eq!(ids(&v, "ended", "callId"), [my_call.as_str()]);
    assert_eq!(v["ended"][0]["outcome"], "caller");
    assert!(v["ended"][0]["talkMs"].is_u64(), "{v}");
    assert_eq!(
        v["ended"][0]["quality"]["stats"]["call_id"],
        my_call.as_str()
    );
    assert!(v["ended"][0]["quality"]["mos"].is_f64(), "{v}");
    let v = theirs.expect_type("snapshot").await;
    assert!(v["ended"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(ids(&v, "calls", "callId"), [their_call]);

    drop(media);
    their_phone.send_json(json!({"type": "hangup"})).await;
    server.shutdown().await;
}

/// A browser phone's connection: `?auth=frame`, then the credentials in the first frame.
async fn phone_in_frame(server: &RunningServer, uuid: &str, key: &str) -> Ws {
    let url = format!("{}/v1/sim/phone?auth=frame", server.base_url());
    let mut ws = Ws::connect(&url, &[]).await.expect("phone connects");
    ws.send_json(json!({"type": "auth", "connectorUuid": uuid, "apiKey": key}))
        .await;
    ws
}

#[tokio::test]
async fn a_phone_authenticates_in_its_first_frame() {
    let server = start(two_connectors()).await;

    let mut refused = phone_in_frame(&server, OTHER_UUID, "wrong").await;
    let (texts, close) = refused.texts_until_close().await;
    assert_eq!(texts[0]["type"], "error");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("wrong API key"), "{reason}");

    // Authenticated as the other connector, the phone may dial its number only, even on a
    // development server that lets anonymous phones dial anything.
    let mut phone = phone_in_frame(&server, OTHER_UUID, OTHER_KEY).await;
    phone
        .send_json(json!({"type": "dial", "from": "+1555", "to": "+15559990001"}))
        .await;
    let error = phone.expect_type("error").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not a number of the connector"),
        "{error}"
    );

    let mut phone = phone_in_frame(&server, OTHER_UUID, OTHER_KEY).await;
    phone
        .send_json(json!({"type": "dial", "from": "+1555", "to": OTHER_NUMBER}))
        .await;
    phone.expect_type("trying").await;

    let mut phone = phone_in_frame(&server, DEV_CONNECTOR_UUID, DEV_API_KEY).await;
    phone
        .send_json(json!({"type": "register", "number": "+15550100"}))
        .await;
    phone.expect_type("registered").await;

    // Any other `auth` option is refused before the upgrade.
    let url = format!("{}/v1/sim/phone?auth=cookie", server.base_url());
    let refused = Ws::connect(&url, &[]).await.err().expect("refused");
    assert_eq!(refused.status, 400);
    server.shutdown().await;
}

#[tokio::test]
async fn live_view_closes_an_oversized_frame_with_1009() {
    let server = start(two_connectors()).await;
    let url = format!("{}/console/v1/live", server.base_url());
    let big = "x".repeat(8192);
    // As its first frame, in place of the credentials.
    let mut ws = Ws::connect(&url, &[]).await.expect("upgrade");
    ws.send_text(&big).await;
    let (_, close) = ws.texts_until_close().await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("4096-byte limit"), "{reason}");
    // Once logged in.
    let (mut ws, _) = live(&server, DEV_CONNECTOR_UUID, DEV_API_KEY).await;
    ws.send_text(&big).await;
    let (_, close) = ws.texts_until_close().await;
    assert_eq!(close.expect("a close frame").0, 1009);
    server.shutdown().await;
}

#[tokio::test]
async fn live_views_are_capped_per_connector() {
    let mut config = two_connectors();
    config.limits.max_console_views_per_connector = 2;
    let server = start(config).await;
    let (mut first, _) = live(&server, DEV_CONNECTOR_UUID, DEV_API_KEY).await;
    let (_second, _) = live(&server, DEV_CONNECTOR_UUID, DEV_API_KEY).await;
    // A third view of the same connector is refused after its login, saying why.
    let url = format!("{}/console/v1/live", server.base_url());
    let mut third = Ws::connect(&url, &[]).await.expect("upgrade");
    third
        .send_json(
            json!({"type": "auth", "connectorUuid": DEV_CONNECTOR_UUID, "apiKey": DEV_API_KEY}),
        )
        .await;
    let (texts, close) = third.texts_until_close().await;
    assert!(texts.is_empty(), "nothing before the refusal: {texts:?}");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008);
    assert!(
        reason.contains("limits.max_console_views_per_connector"),
        "{reason}"
    );
    // Another connector has places of its own.
    let (_other, _) = live(&server, OTHER_UUID, OTHER_KEY).await;
    // A view that ends gives its place back.
    first.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut ws = Ws::connect(&url, &[]).await.expect("upgrade");
        ws.send_json(
            json!({"type": "auth", "connectorUuid": DEV_CONNECTOR_UUID, "apiKey": DEV_API_KEY}),
        )
        .await;
        match ws.next().await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) if t.contains("welcome") => {
                break;
            }
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "the closed view's place was not given back"
            ),
        }
    }
    server.shutdown().await;
}
