//! A call's quality figures: `GET /public/v1/calls/{id}/stats` while it runs (scoped to its
//! connector) and `CallEvent::Stats` at its end, before `Terminated`; a real server in
//! process, the Rust SDK as an echo agent and a simulated phone as the caller.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use telcoflow::{AudioChannel, CallEvent, TelcoflowClient};
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::config::{ConnectorConfig, DEV_API_KEY, DEV_CONNECTOR_UUID};
use telcoflow_server::{Config, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OTHER_KEY: &str = "other-key";
const OTHER_UUID: &str = "5d7c1e2a-8f3b-4c6d-9e0a-1b2c3d4e5f60";

/// `GET path` with a connector's credentials: status and JSON body.
async fn get(server: &RunningServer, path: &str, key: &str, uuid: &str) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: test\r\nx-api-key: {key}\r\nx-connector-uuid: {uuid}\r\n\
         connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    // The body may come chunked: the JSON is between the first `{` and the last `}`.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => serde_json::from_str(&body[a..=b]).unwrap(),
        _ => Value::Null,
    };
    (status, json)
}

#[tokio::test]
async fn stats_while_the_call_runs_and_at_its_end() {
    let mut config = Config::development();
    let mut other = ConnectorConfig::development(OTHER_KEY, OTHER_UUID);
    other.numbers = vec!["+4999".into()];
    config.connectors.push(other);
    let server = start_server_with(config).await;
    let client = TelcoflowClient::connect(common::config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    let mut call_events = call.events();
    call.answer().await.unwrap();
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    let echo = {
        let call = call.clone();
        tokio::spawn(async move {
            let mut audio = call.audio_stream(AudioChannel::Mixed);
            while let Some(chunk) = audio.next().await {
                if call.send_audio(&chunk).await.is_err() {
                    break;
                }
            }
        })
    };
    // Half a second said, and some of its echo heard: frames moved both ways.
    phone.speak(&pattern(8_000, 1)).await;
    phone.hear(10 * 640).await;

    let path = format!("/public/v1/calls/{}/stats", call.id());
    let (status, stats) = get(&server, &path, DEV_API_KEY, DEV_CONNECTOR_UUID).await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["call_id"], call.id(), "{stats}");
    assert_eq!(stats["session_id"], call.session_id().unwrap(), "{stats}");
    assert!(stats["duration_ms"].as_u64().unwrap() >= 400, "{stats}");
    let caller = &stats["legs"][0];
    assert_eq!(caller["role"], "caller", "{stats}");
    assert_eq!(caller["kind"], "sim", "{stats}");
    // The phone sends a frame every 20 ms from the answer, speaking or not.
    assert!(
        caller["packets_received"].as_u64().unwrap() >= 25,
        "{stats}"
    );
    assert_eq!(caller["packets_lost"], 0, "{stats}");
    assert_eq!(caller["loss_pct"], 0.0, "{stats}");
    assert!(caller["jitter_ms"].as_f64().unwrap() >= 0.0, "{stats}");
    assert!(
        caller.get("rtt_ms").is_none(),
        "no RTCP on a simulated leg: {stats}"
    );
    let mos = caller["mos"].as_f64().unwrap();
    assert!(
        (4.0..=4.5).contains(&mos),
        "a lossless leg rates high: {stats}"
    );
    let agent = &stats["agent"];
    assert!(agent["frames_to_agent"].as_u64().unwrap() >= 25, "{stats}");
    assert!(
        agent["frames_from_agent"].as_u64().unwrap() >= 10,
        "{stats}"
    );
    let received_then = caller["packets_received"].as_u64().unwrap();

    // Another connector's credentials: the call is not found, as an unknown one is.
    let (status, body) = get(&server, &path, OTHER_KEY, OTHER_UUID).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "CALL_NOT_FOUND", "{body}");
    assert!(body["message"].as_str().is_some(), "{body}");
    let unknown = "/public/v1/calls/00000000-0000-0000-0000-000000000000/stats";
    let (status, body) = get(&server, unknown, DEV_API_KEY, DEV_CONNECTOR_UUID).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "CALL_NOT_FOUND", "{body}");
    let (status, body) = get(&server, &path, DEV_API_KEY, "nobody").await;
    assert_eq!(status, 401, "{body}");

    // The caller hangs up: the figures come, then the end.
    phone.hangup();
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(WAIT, call_events.next())
        .await
        .expect("events until the end")
    {
        seen.push(ev);
    }
    let at = |f: fn(&CallEvent) -> bool| seen.iter().position(f);
    let stats_at = at(|e| matches!(e, CallEvent::Stats(_))).expect("call.stats");
    let end_at = at(|e| matches!(e, CallEvent::Terminated { .. })).expect("call.terminated");
    assert_eq!(stats_at + 1, end_at, "stats just before the end: {seen:?}");
    let CallEvent::Stats(last) = &seen[stats_at] else {
        unreachable!()
    };
    assert_eq!(last.call_id, call.id());
    assert_eq!(last.legs[0].kind, "sim");
    assert!(last.legs[0].packets_received >= received_then, "{last:?}");
    assert!(last.agent.frames_from_agent >= 10, "{last:?}");
    // Once ended, the call is gone from the API.
    let (status, _) = get(&server, &path, DEV_API_KEY, DEV_CONNECTOR_UUID).await;
    assert_eq!(status, 404);
    echo.await.unwrap();
    client.shutdown().await;
    server.shutdown().await;
}
