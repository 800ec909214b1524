//! Configured limits: each one, when reached, gives a clear error and nothing panics or grows
//! without bound. Also: a media connection that drops can come back.

mod common;

use common::*;
use serde_json::json;
use telcoflow_server::config::DEV_CONNECT_DESTINATION;

const RATE: u32 = 16000;

#[tokio::test]
async fn calls_per_connector_limit_refuses_the_next_call_as_busy() {
    let mut config = dev_config();
    config.limits.max_calls_per_connector = 1;
    let server = start(config).await;
    let first = dial(&server, "+1", "+2", RATE).await;
    assert!(first.call_id.is_some());
    let mut second = dial(&server, "+1", "+3", RATE).await;
    assert_eq!(second.call_id.as_deref(), Some("refused:busy"));
    second.ws.closed().await;
    // Once the first call ends, the slot is free again.
    drop(first);
    loop {
        let mut next = dial(&server, "+1", "+4", RATE).await;
        if next.call_id.as_deref() != Some("refused:busy") {
            break;
        }
        next.ws.closed().await;
        tokio::task::yield_now().await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn control_connections_per_connector_limit_is_429_with_a_reason() {
    let mut config = dev_config();
    config.limits.max_control_connections_per_connector = 1;
    let server = start(config).await;
    let _first = control(&server, RATE, "mixed").await;
    let url = format!("{}/v1/agent/session-manager", server.base_url());
    let headers = auth_headers(
        telcoflow_server::config::DEV_API_KEY,
        telcoflow_server::config::DEV_CONNECTOR_UUID,
    );
    let refused = Ws::connect(&url, &headers).await.err().unwrap();
    assert_eq!(refused.status, 429);
    assert!(
        refused
            .body
            .contains("max_control_connections_per_connector"),
        "{}",
        refused.body
    );
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_control_frame_closes_the_connection() {
    let mut config = dev_config();
    config.limits.max_control_frame_bytes = 1024;
    let server = start(config).await;
    let mut a = control(&server, RATE, "mixed").await;
    let big = json!({"type": "session.open", "sessionId": "x".repeat(2000)});
    a.ws.send_json(big).await;
    a.ws.closed().await;
    // The server is fine: a new connection works.
    let _b = control(&server, RATE, "mixed").await;
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_media_frame_closes_media_and_the_agent_can_come_back() {
    let mut config = dev_config();
    config.limits.max_media_frame_bytes = 4096;
    let server = start(config).await;
    let mut control = control(&server, RATE, "mixed").await;
    let mut phone = dial(&server, "+1", "+2", RATE).await;
    let call_in = control.take_call().await;
    let mut first = media(&call_in).await;
    assert_eq!(first.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    first.ws.send_binary(vec![0; 5000]).await;
    first.ws.closed().await;
    // The call waits for its agent; the same URL and token attach again.
    let mut second = loop {
        let token = format!("Bearer {}", call_in["token"].as_str().unwrap());
        match Ws::connect(
            call_in["url"].as_str().unwrap(),
            &[("authorization", &token)],
        )
        .await
        {
            Ok(ws) => break Media { ws },
            // The old connection may not have been noticed as gone yet.
            Err(refused) => {
                assert_eq!(refused.status, 409, "{}", refused.body);
                tokio::task::yield_now().await;
            }
        }
    };
    phone.send_level(9, 320).await;
    assert_eq!(second.audio(0).await[0], 9);
    server.shutdown().await;
}

#[tokio::test]
async fn commands_waiting_for_an_answer_are_bounded() {
    let mut config = dev_config();
    config.limits.max_pending_commands_per_call = 1;
    let (server, _control, _phone, mut media) = answered_call(config, RATE).await;
    let _callee = register(&server, DEV_CONNECT_DESTINATION, RATE).await;
    // The connect waits for the destination; a second command finds the limit reached.
    let id = "connect-1";
    media
        .ws
        .send_json(json!({"type": "command", "data": {"command_id": id, "command": "call.connect", "timeout_ms": 10000, "data": {"ringTimeSeconds": 10}}}))
        .await;
    let resp = media.command("agent.interrupt", None).await;
    assert_eq!(resp["success"], false);
    assert_eq!(resp["error_code"], "QUOTA_EXCEEDED");
    assert!(
        resp["error_message"]
            .as_str()
            .unwrap()
            .contains("max_pending_commands_per_call")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_calls_and_connections() {
    let (server, mut control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    server.shutdown().await;
    assert_eq!(phone.event("hangup").await["reason"], "error");
    media.ws.closed().await;
    control.ws.closed().await;
}
