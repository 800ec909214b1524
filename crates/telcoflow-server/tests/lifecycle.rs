//! How calls end (caller hang-up, close, disconnect, close after connect), isolated channels,
//! resampling between a leg's rate and the agent's, and the HTTP API.

mod common;

use common::*;
use serde_json::{Value, json};
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECT_DESTINATION, DEV_CONNECTOR_UUID};

const RATE: u32 = 16000;
const FRAME: usize = 320;

/// The call's end as the agent sees it: `call.stats` with the call's figures, then
/// `call.terminated` (returned).
async fn stats_then_terminated(media: &mut Media) -> Value {
    let stats = media.ws.expect_type("call_event").await;
    assert_eq!(stats["data"]["event"], "call.stats", "{stats}");
    assert!(
        stats["data"]["call_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{stats}"
    );
    assert_eq!(stats["data"]["legs"][0]["role"], "caller", "{stats}");
    let event = media.ws.expect_type("call_event").await;
    assert_eq!(event["data"]["event"], "call.terminated", "{event}");
    event
}

#[tokio::test]
async fn caller_hangup_terminates_media_then_closes_the_session() {
    let (server, mut control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    phone.send_json(json!({"type": "hangup"})).await;
    let event = stats_then_terminated(&mut media).await;
    assert_eq!(event["data"]["reason"], "caller");
    media.ws.closed().await;
    let closed = control.ws.expect_type("session.closed").await;
    assert_eq!(closed["reason"], "CALL_TERMINATED");
    server.shutdown().await;
}

#[tokio::test]
async fn close_without_connect_ends_the_call() {
    let (server, mut control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    assert_eq!(media.command("call.close", None).await["success"], true);
    stats_then_terminated(&mut media).await;
    media.ws.closed().await;
    assert_eq!(phone.event("hangup").await["reason"], "remote");
    phone.ws.closed().await;
    assert_eq!(
        control.ws.expect_type("session.closed").await["reason"],
        "SDK_REQUEST"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn disconnect_ends_the_call_for_everyone() {
    let (server, mut control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    let mut callee = connect_callee(&server, &mut media).await;
    assert_eq!(
        media.command("call.disconnect", None).await["success"],
        true
    );
    assert_eq!(phone.event("hangup").await["reason"], "remote");
    assert_eq!(callee.event("hangup").await["reason"], "remote");
    media.ws.closed().await;
    assert_eq!(
        control.ws.expect_type("session.closed").await["reason"],
        "SDK_REQUEST"
    );
    server.shutdown().await;
}

/// An agent that closes its media connection itself (a close frame: the Rust SDK whose client
/// shuts down) has left, as with `call.close`: the caller is hung up at once instead of
/// waiting in silence for an agent that will not come back.
#[tokio::test]
async fn an_agent_that_closes_its_media_connection_leaves_the_call() {
    let (server, mut control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    media.ws.close().await;
    assert_eq!(phone.event("hangup").await["reason"], "remote");
    // The agent's own leaving, not the end of the wait for it (`CALL_TERMINATED`).
    assert_eq!(
        control.ws.expect_type("session.closed").await["reason"],
        "SDK_REQUEST"
    );
    server.shutdown().await;
}

/// A bridged call survives its agent closing the media connection: caller and destination
/// stay connected, as after `call.close`.
#[tokio::test]
async fn an_agent_that_closes_its_media_after_connect_leaves_the_parties_talking() {
    let (server, mut control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    let mut callee = connect_callee(&server, &mut media).await;
    media.ws.close().await;
    assert_eq!(
        control.ws.expect_type("session.closed").await["reason"],
        "SDK_REQUEST"
    );
    talk_until(
        &mut phone,
        &mut callee,
        None,
        (111, 222, 0),
        (222, 111, None),
        FRAME,
    )
    .await
    .expect("caller and destination hear each other");
    server.shutdown().await;
}

/// A media connection lost without a close frame (a network blip) leaves the call waiting
/// for the agent, which comes back on the same URL and token, even once the token is past its
/// lifetime (a call may last longer than that), and goes on talking.
#[tokio::test]
async fn a_lost_media_connection_can_come_back_even_with_an_expired_token() {
    let mut config = dev_config();
    config.media_token_ttl_secs = 1;
    let server = start(config).await;
    let mut control = control(&server, RATE, "mixed").await;
    let mut phone = dial(&server, "+15551230001", "+15559990001", RATE).await;
    let call_in = control.take_call().await;
    let mut first = media(&call_in).await;
    assert_eq!(first.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    // Dropped: the TCP connection ends with no WebSocket close frame.
    drop(first);
    // Token lifetimes are wall-clock; wait past it.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let url = call_in["url"].as_str().unwrap();
    let token = format!("Bearer {}", call_in["token"].as_str().unwrap());
    let reconnect = async {
        loop {
            match Ws::connect(url, &[("authorization", &token)]).await {
                Ok(ws) => break Media { ws },
                Err(refused) => {
                    // Only until the server has seen the loss.
                    assert_eq!(refused.status, 409, "{}", refused.body);
                    assert!(
                        refused.body.contains("already open"),
                        "refused for another reason: {}",
                        refused.body
                    );
                    tokio::task::yield_now().await;
                }
            }
        }
    };
    let mut again = tokio::time::timeout(WAIT, reconnect)
        .await
        .expect("the agent comes back in time");
    phone.send_level(1234, FRAME).await;
    assert_eq!(again.audio(0).await, vec![1234; FRAME]);
    // A second connection on the expired token is refused: only a lost one may come back.
    let refused = Ws::connect(url, &[("authorization", &token)])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(
        again.command("call.disconnect", None).await["success"],
        true
    );
    assert_eq!(phone.event("hangup").await["reason"], "remote");
    server.shutdown().await;
}

async fn connect_callee(server: &telcoflow_server::RunningServer, media: &mut Media) -> Phone {
    let mut callee = register(server, DEV_CONNECT_DESTINATION, RATE).await;
    let connect = media.command("call.connect", Some(json!({"ringTimeSeconds": 10})));
    let answer = async {
        callee.event("incoming").await;
        callee.send_json(json!({"type": "answer"})).await;
        callee.event("answered").await;
    };
    let (resp, ()) = tokio::join!(connect, answer);
    assert_eq!(resp["success"], true, "{resp}");
    callee
}

#[tokio::test]
async fn close_after_connect_leaves_caller_and_destination_talking() {
    let (server, mut control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    let mut callee = connect_callee(&server, &mut media).await;
    assert_eq!(media.command("call.close", None).await["success"], true);
    media.ws.closed().await;
    assert_eq!(
        control.ws.expect_type("session.closed").await["reason"],
        "SDK_REQUEST"
    );
    // The two parties still hear each other through the server.
    talk_until(
        &mut phone,
        &mut callee,
        None,
        (111, 222, 0),
        (222, 111, None),
        FRAME,
    )
    .await
    .expect("caller and destination hear each other");
    // Either side hanging up now ends the call for the other.
    callee.send_json(json!({"type": "hangup"})).await;
    assert_eq!(phone.event("hangup").await["reason"], "remote");
    server.shutdown().await;
}

#[tokio::test]
async fn destination_hangup_ends_only_that_leg() {
    let (server, _control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    let mut callee = connect_callee(&server, &mut media).await;
    callee.send_json(json!({"type": "hangup"})).await;
    let event = media.ws.expect_type("call_event").await;
    assert_eq!(event["data"]["event"], "call.connected_leg");
    assert_eq!(event["data"]["state"], "ended");
    // The caller and the agent carry on.
    phone.send_level(77, FRAME).await;
    loop {
        if media.audio(0).await[0] == 77 {
            break;
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn isolated_mode_delivers_each_leg_on_its_own_channel() {
    let server = start(dev_config()).await;
    let mut control = control(&server, RATE, "isolated").await;
    let mut phone = dial(&server, "+1", "+2", RATE).await;
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    phone.send_level(10, FRAME).await;
    assert_eq!(media.audio(0).await[0], 10);
    assert_eq!(media.audio(1).await[0], 10);
    let mut callee = connect_callee(&server, &mut media).await;
    // Each leg on its own channel, the mix on channel 0.
    let mut got = (0, 0, 0);
    for round in 0..150 {
        for _ in 0..if round == 0 { 3 } else { 1 } {
            phone.send_level(10, FRAME).await;
            callee.send_level(20, FRAME).await;
        }
        phone.ws.binary().await;
        callee.ws.binary().await;
        got = (
            media.audio(0).await[0],
            media.audio(1).await[0],
            media.audio(2).await[0],
        );
        if got == (30, 10, 20) {
            break;
        }
    }
    assert_eq!(got, (30, 10, 20));
    server.shutdown().await;
}

fn tone(rate: u32, hz: f64, samples: usize, phase: usize) -> Vec<u8> {
    (phase..phase + samples)
        .flat_map(|i| {
            let v = (i as f64 * hz * std::f64::consts::TAU / f64::from(rate)).sin() * 8000.0;
            (v as i16).to_le_bytes()
        })
        .collect()
}

fn zero_crossings(s: &[i16]) -> usize {
    s.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count()
}

#[tokio::test]
async fn a_narrowband_phone_reaches_a_24khz_agent_resampled() {
    let server = start(dev_config()).await;
    let mut control = control(&server, 24000, "mixed").await;
    let mut phone = dial(&server, "+1", "+2", 8000).await;
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    // One second of a 440 Hz tone at 8 kHz, in 20 ms frames.
    for i in 0..50 {
        phone.ws.send_binary(tone(8000, 440.0, 160, i * 160)).await;
    }
    let mut heard = Vec::new();
    while heard.len() < 24000 {
        let frame = media.audio(0).await;
        assert_eq!(frame.len(), 480, "20 ms at 24 kHz");
        heard.extend(frame);
    }
    // The pitch survives: 440 Hz is ~440 zero crossings over half a second (skip start-up).
    let c = zero_crossings(&heard[2400..2400 + 12000]) as i64;
    assert!((c - 440).abs() <= 6, "{c}");
    // And the agent's 24 kHz audio reaches the phone at 8 kHz.
    for i in 0..10 {
        media.send_audio(&tone(24000, 440.0, 480, i * 480)).await;
    }
    loop {
        let frame = samples(&phone.ws.binary().await);
        assert_eq!(frame.len(), 160, "20 ms at 8 kHz");
        if frame.iter().any(|&s| s.abs() > 1000) {
            break;
        }
    }
    server.shutdown().await;
}

async fn http(
    server: &telcoflow_server::RunningServer,
    method: &str,
    path: &str,
    auth: bool,
) -> (u16, Value) {
    // A minimal HTTP/1.1 client over a raw socket keeps the test dependencies small.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let headers = if auth {
        format!("x-api-key: {DEV_API_KEY}\r\nx-connector-uuid: {DEV_CONNECTOR_UUID}\r\n")
    } else {
        String::new()
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\n{headers}content-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    // Small JSON bodies may come chunked; take the JSON object out of the chunk framing.
    let json = body
        .find('{')
        .and_then(|start| body.rfind('}').map(|end| &body[start..=end]))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or(Value::Null);
    (status, json)
}

#[tokio::test]
async fn http_lists_and_closes_sessions() {
    let (server, mut control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    let (status, body) = http(&server, "GET", "/public/v1/sessions", false).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "UNAUTHORIZED");
    assert_eq!(body["message"], "missing x-api-key header");

    let (status, body) = http(
        &server,
        "GET",
        "/public/v1/sessions?state=OPEN&channel=TELCO",
        true,
    )
    .await;
    assert_eq!(status, 200);
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let session_id = items[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(items[0]["remoteAddress"], "+15551230001");
    assert_eq!(items[0]["state"], "OPEN");
    let (status, body) = http(
        &server,
        "GET",
        "/public/v1/sessions?remoteAddress=%2B1999",
        true,
    )
    .await;
    assert_eq!((status, body["items"].as_array().unwrap().len()), (200, 0));
    let (status, body) = http(&server, "GET", "/public/v1/sessions?state=MAYBE", true).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "INVALID_REQUEST");

    let (status, body) = http(
        &server,
        "POST",
        &format!("/public/v1/sessions/{session_id}/close"),
        true,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reason"], "SDK_REQUEST");
    assert!(body["closedAt"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(phone.event("hangup").await["reason"], "remote");
    stats_then_terminated(&mut media).await;
    assert_eq!(
        control.ws.expect_type("session.closed").await["sessionId"],
        session_id.as_str()
    );

    let (status, body) = http(
        &server,
        "POST",
        &format!("/public/v1/sessions/{session_id}/close"),
        true,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "SESSION_NOT_FOUND");
    let (_, body) = http(&server, "GET", "/public/v1/sessions?state=CLOSED", true).await;
    assert_eq!(body["items"][0]["state"], "CLOSED");
    assert!(body["items"][0]["closedAt"].as_u64().is_some());
    server.shutdown().await;
}
