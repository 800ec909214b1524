//! The control connection: authentication, setup, notification, claiming, ready / call.in,
//! re-offering, request errors, ping.

mod common;

use common::*;
use serde_json::json;
use telcoflow_server::config::{ConnectorConfig, DEV_API_KEY, DEV_CONNECTOR_UUID};

#[tokio::test]
async fn upgrade_without_or_with_wrong_credentials_is_401_with_a_reason() {
    let server = start(dev_config()).await;
    let url = format!("{}/v1/agent/session-manager", server.base_url());
    let refused = Ws::connect(&url, &[]).await.err().unwrap();
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body, "missing x-api-key header");
    let refused = Ws::connect(&url, &[("x-api-key", DEV_API_KEY)])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (401, "missing x-connector-uuid header")
    );
    let refused = Ws::connect(&url, &auth_headers("wrong", DEV_CONNECTOR_UUID))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("wrong API key"), "{}", refused.body);
    let refused = Ws::connect(&url, &auth_headers(DEV_API_KEY, "nobody"))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 401);
    server.shutdown().await;
}

#[tokio::test]
async fn notify_reaches_every_connection_and_first_open_wins() {
    let server = start(dev_config()).await;
    let mut a = control(&server, 16000, "mixed").await;
    let mut b = control(&server, 16000, "mixed").await;
    assert_ne!(a.id, b.id);
    let mut phone = dial(&server, "+15550001", "+15550002", 16000).await;
    let na = a.ws.expect_type("session.notify").await;
    let nb = b.ws.expect_type("session.notify").await;
    assert_eq!(na["sessionId"], nb["sessionId"]);
    assert_eq!(na["activity"], "NEW_INCOMING_CALL");
    assert_eq!(na["channel"], "TELCO");
    assert_eq!(na["remoteAddress"], "+15550001");
    assert_eq!(na["localAddress"], "+15550002");
    assert!(na["createdAt"].as_u64().unwrap() > 1_600_000_000);
    let session_id = na["sessionId"].as_str().unwrap();

    let won = a.open(session_id).await;
    assert_eq!(won["ok"], true, "{won}");
    let session = &won["content"]["session"];
    assert_eq!(session["id"], session_id);
    assert_eq!(session["channel"], "TELCO");
    assert_eq!(session["initiator"], "CONNECTOR");
    assert_eq!(session["state"], "OPEN");
    assert_eq!(session["remoteAddress"], "+15550001");
    // Claiming rings the caller.
    phone.event("ringing").await;

    let lost = b.open(session_id).await;
    assert_eq!(lost["ok"], false);
    assert_eq!(lost["errorCode"], "SESSION_BUSY");
    assert_eq!(lost["errorContent"]["boundSmWsId"], a.id.as_str());
    // Opening again from the holder is harmless.
    assert_eq!(a.open(session_id).await["ok"], true);

    let unknown = a.open("no-such-session").await;
    assert_eq!(unknown["errorCode"], "SESSION_NOT_FOUND");
    server.shutdown().await;
}

#[tokio::test]
async fn ready_delivers_call_in_with_media_url_and_token() {
    let server = start(dev_config()).await;
    let mut a = control(&server, 16000, "mixed").await;
    let phone = dial(&server, "+1555", "+1666", 16000).await;
    let notify = a.ws.expect_type("session.notify").await;
    let session_id = notify["sessionId"].as_str().unwrap();
    assert_eq!(a.open(session_id).await["ok"], true);
    a.ready(session_id).await;
    let call_in = a.ws.expect_type("call.in").await;
    assert_eq!(call_in["sessionId"], session_id);
    assert_eq!(call_in["callId"].as_str(), phone.call_id.as_deref());
    assert_eq!(call_in["from"], "+1555");
    assert_eq!(call_in["to"], "+1666");
    assert_eq!(call_in["orgUuid"], DEV_CONNECTOR_UUID);
    let url = call_in["url"].as_str().unwrap();
    assert!(url.starts_with(server.base_url()), "{url}");
    assert!(url.ends_with(phone.call_id.as_deref().unwrap()));
    assert!(!call_in["token"].as_str().unwrap().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn another_connectors_session_is_not_found() {
    let mut config = dev_config();
    let mut other =
        ConnectorConfig::development("other-key", "00000000-0000-4000-8000-0000000000a2");
    other.numbers = vec!["+1999".into()];
    config.connectors.push(other);
    let server = start(config).await;
    let mut dev = control(&server, 16000, "mixed").await;
    let mut other = control_as(
        &server,
        "other-key",
        "00000000-0000-4000-8000-0000000000a2",
        16000,
        "mixed",
    )
    .await;
    let _phone = dial(&server, "+1000", "+1999", 16000).await;
    // Routed by number to the other connector only.
    let notify = other.ws.expect_type("session.notify").await;
    let session_id = notify["sessionId"].as_str().unwrap();
    let resp = dev.open(session_id).await;
    assert_eq!(resp["errorCode"], "SESSION_NOT_FOUND");
    assert_eq!(other.open(session_id).await["ok"], true);
    server.shutdown().await;
}

#[tokio::test]
async fn a_claim_dropped_before_ready_is_offered_again_as_resume() {
    let server = start(dev_config()).await;
    let mut a = control(&server, 16000, "mixed").await;
    let mut b = control(&server, 16000, "mixed").await;
    let _phone = dial(&server, "+1", "+2", 16000).await;
    let notify = a.ws.expect_type("session.notify").await;
    b.ws.expect_type("session.notify").await;
    let session_id = notify["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(a.open(&session_id).await["ok"], true);
    drop(a);
    let again = b.ws.expect_type("session.notify").await;
    assert_eq!(again["sessionId"], session_id.as_str());
    assert_eq!(again["activity"], "RESUME");
    assert_eq!(b.open(&session_id).await["ok"], true);
    b.ready(&session_id).await;
    b.ws.expect_type("call.in").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_arriving_later_is_offered_waiting_sessions() {
    let server = start(dev_config()).await;
    let _phone = dial(&server, "+1", "+2", 16000).await;
    let mut late = control(&server, 16000, "mixed").await;
    let notify = late.ws.expect_type("session.notify").await;
    assert_eq!(notify["activity"], "NEW_INCOMING_CALL");
    server.shutdown().await;
}

#[tokio::test]
async fn unclaimed_call_rings_out_after_the_ring_timeout() {
    let mut config = dev_config();
    config.ring_timeout_secs = 1;
    let server = start(config).await;
    let mut a = control(&server, 16000, "mixed").await;
    let mut phone = dial(&server, "+1", "+2", 16000).await;
    a.ws.expect_type("session.notify").await;
    let hangup = phone.event("hangup").await;
    assert_eq!(hangup["reason"], "no_answer");
    phone.ws.closed().await;
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_and_unknown_requests_get_invalid_request_and_the_connection_survives() {
    let server = start(dev_config()).await;
    let mut a = control(&server, 16000, "mixed").await;
    let resp = a.request(json!({"type": "session.fly"})).await;
    assert_eq!(resp["ok"], false);
    assert_eq!(resp["errorCode"], "INVALID_REQUEST");
    let resp = a.request(json!({"type": "session.open"})).await; // no sessionId
    assert_eq!(resp["errorCode"], "INVALID_REQUEST");
    a.ws.send_text("this is not json").await;
    let resp = a
        .request(json!({"type": "session.create", "channel": "WA", "remoteAddress": "+1"}))
        .await;
    assert_eq!(resp["errorCode"], "CHANNEL_NOT_CONFIGURED");
    let resp = a.request(json!({"type": "wa.msg.out", "data": {}})).await;
    assert_eq!(resp["errorCode"], "CHANNEL_NOT_CONFIGURED");
    let resp = a
        .request(json!({"type": "call_flow.setup", "data": {"inboundCall": "ALL"}}))
        .await;
    assert_eq!(resp["ok"], true);
    assert!(a.ws.ping().await, "WebSocket ping answered");
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_number_is_not_found_for_the_phone() {
    let mut config = dev_config();
    config.connectors[0].numbers = vec!["+1000".into()];
    let server = start(config).await;
    let mut phone = dial(&server, "+1", "+2", 16000).await;
    assert_eq!(phone.call_id.as_deref(), Some("refused:not_found"));
    phone.ws.closed().await;
    server.shutdown().await;
}

#[tokio::test]
async fn session_create_places_an_outbound_call_answered_when_the_far_end_picks_up() {
    let server = start(dev_config()).await;
    let mut a = control(&server, 16000, "mixed").await;
    let mut far = register(&server, "+1777", 16000).await;
    let resp = a
        .request(json!({"type": "session.create", "channel": "TELCO", "remoteAddress": "+1777"}))
        .await;
    assert_eq!(resp["ok"], true, "{resp}");
    assert_eq!(resp["content"]["created"], true);
    let session_id = resp["content"]["sessionId"].as_str().unwrap().to_owned();
    // Creating again for the same far party returns the open session.
    let again = a
        .request(json!({"type": "session.create", "channel": "TELCO", "remoteAddress": "+1777"}))
        .await;
    assert_eq!(
        again["content"],
        json!({"sessionId": session_id, "created": false})
    );

    let opened = a.open(&session_id).await;
    assert_eq!(opened["content"]["session"]["initiator"], "SDK");
    a.ready(&session_id).await;
    let call_in = a.ws.expect_type("call.in").await;
    assert_eq!(call_in["to"], "+1777");
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None);
    let pick_up = async {
        let incoming = far.event("incoming").await;
        assert_eq!(incoming["to"], "+1777");
        far.send_json(json!({"type": "answer"})).await;
        far.event("answered").await;
    };
    let (answer, ()) = tokio::join!(answer, pick_up);
    assert_eq!(answer["success"], true, "{answer}");
    far.send_level(321, 320).await;
    assert_eq!(media.audio(0).await[0], 321);

    let unreachable = a
        .request(json!({"type": "session.create", "channel": "TELCO", "remoteAddress": "+1888"}))
        .await;
    assert_eq!(unreachable["errorCode"], "NO_ROUTE");
    server.shutdown().await;
}

#[tokio::test]
async fn call_flow_inbound_no_stops_offers_to_that_connection() {
    let server = start(dev_config()).await;
    let mut outbound_only = control(&server, 16000, "mixed").await;
    let mut b = control(&server, 16000, "mixed").await;
    let resp = outbound_only
        .request(json!({"type": "call_flow.setup", "data": {"inboundCall": "NO", "outboundCall": "ALL"}}))
        .await;
    assert_eq!(resp["ok"], true);
    let bad = outbound_only
        .request(json!({"type": "call_flow.setup", "data": {"inboundCall": "SOMETIMES"}}))
        .await;
    assert_eq!(bad["errorCode"], "INVALID_REQUEST");
    let _phone = dial(&server, "+1", "+2", 16000).await;
    b.ws.expect_type("session.notify").await;
    // Offers go to both queues at once; had one been queued for the outbound-only
    // connection, it would arrive before the response to this later request.
    outbound_only
        .ws
        .send_json(json!({"type": "call_flow.setup", "reqId": "r-after", "data": {}}))
        .await;
    let next = outbound_only.ws.text().await;
    assert_eq!(next["type"], "response", "no offer before it: {next}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_live_call_stays_held_when_its_control_connection_drops() {
    let server = start(dev_config()).await;
    let mut a = control(&server, 16000, "mixed").await;
    let _phone = dial(&server, "+1", "+2", 16000).await;
    let call_in = a.take_call().await;
    let session_id = call_in["sessionId"].as_str().unwrap().to_owned();
    let _media = media(&call_in).await;
    let a_id = a.id.clone();
    drop(a);
    let mut b = control(&server, 16000, "mixed").await;
    // The claim must fail for as long as A's media is up, whenever B's connection notices.
    let resp = b.open(&session_id).await;
    assert_eq!(resp["errorCode"], "SESSION_BUSY", "{resp}");
    assert_eq!(resp["errorContent"]["boundSmWsId"], a_id.as_str());
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_control_connection_is_closed_as_dead() {
    let mut config = dev_config();
    config.control_idle_timeout_secs = 1;
    config.control_ping_interval_secs = 3600;
    let server = start(config).await;
    let mut a = control(&server, 16000, "mixed").await;
    // The client sends nothing; the server gives up on it after the idle timeout.
    a.ws.closed().await;
    server.shutdown().await;
}

#[tokio::test]
async fn outbound_answer_honours_timeout_ms_and_can_wait_again() {
    let server = start(dev_config()).await;
    let mut a = control(&server, 16000, "mixed").await;
    let mut far = register(&server, "+1777", 16000).await;
    let resp = a
        .request(json!({"type": "session.create", "channel": "TELCO", "remoteAddress": "+1777"}))
        .await;
    let session_id = resp["content"]["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(a.open(&session_id).await["ok"], true);
    a.ready(&session_id).await;
    let call_in = a.ws.expect_type("call.in").await;
    let mut media = media(&call_in).await;
    far.event("incoming").await;
    let early = media.command_with_timeout("call.answer", None, 200).await;
    assert_eq!(early["error_code"], "TIMEOUT", "{early}");
    // Still ringing: a new answer waits for the pick-up.
    let answer = media.command("call.answer", None);
    let pick_up = async {
        far.send_json(json!({"type": "answer"})).await;
    };
    let (answer, ()) = tokio::join!(answer, pick_up);
    assert_eq!(answer["success"], true, "{answer}");
    server.shutdown().await;
}
