//! Attacks on the simulated phone endpoint and on the inputs agents and phones control, each
//! reproduced on loopback and shown to hold: the attacker is refused, the server stays up, and an
//! ordinary call works right after.

mod common;

use common::*;
use serde_json::{Value, json};
use telcoflow_server::Config;
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID, MAX_ADDRESS_LEN};

const RATE: u32 = 16000;

const A_UUID: &str = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01";
const A_KEY: &str = "key-a";
const A_NUMBER: &str = "+4420700000001";
const A_CONNECT: &str = "+4420700000099";
const B_UUID: &str = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e02";
const B_KEY: &str = "key-b";
const B_NUMBER: &str = "+4420700000002";

/// A configuration file's server on loopback: two connectors, simulated phones as `sim` says.
fn file_config(sim: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        listen = "127.0.0.1:0"
        {sim}
        [[connectors]]
        uuid = "{A_UUID}"
        api_key = "{A_KEY}"
        numbers = ["{A_NUMBER}"]
        connect_default = "{A_CONNECT}"
        [[connectors]]
        uuid = "{B_UUID}"
        api_key = "{B_KEY}"
        numbers = ["{B_NUMBER}"]
        "#
    ))
    .expect("valid config")
}

fn sim_url(server: &telcoflow_server::RunningServer) -> String {
    format!("{}/v1/sim/phone", server.base_url())
}

/// Opens a phone with `headers` (and `query`) and sends its first frame; returns the phone's
/// first answer.
async fn phone_with(
    server: &telcoflow_server::RunningServer,
    query: &str,
    headers: &[(&str, &str)],
    first: Value,
) -> Result<(Ws, Value), Refused> {
    let mut ws = Ws::connect(&format!("{}{query}", sim_url(server)), headers).await?;
    ws.send_json(first).await;
    let answer = ws.text().await;
    Ok((ws, answer))
}

fn register_frame(number: &str) -> Value {
    json!({"type": "register", "number": number, "sampleRate": RATE})
}

fn dial_frame(from: &str, to: &str) -> Value {
    json!({"type": "dial", "from": from, "to": to, "sampleRate": RATE})
}

/// An ordinary call of connector A, placed and taken with credentials: caller dials A's number,
/// the agent answers, `call.connect` rings A's registered destination, which answers and hears
/// the caller.
async fn ordinary_connected_call(server: &telcoflow_server::RunningServer, callee: &mut Phone) {
    let mut control = control_as(server, A_KEY, A_UUID, RATE, "mixed").await;
    let (caller, trying) = phone_with(
        server,
        "",
        &auth_headers(A_KEY, A_UUID),
        dial_frame("+15551230001", A_NUMBER),
    )
    .await
    .expect("an authenticated phone dials");
    assert_eq!(trying["type"], "trying", "{trying}");
    let mut caller = Phone {
        ws: caller,
        call_id: trying["callId"].as_str().map(str::to_owned),
    };
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    caller.event("answered").await;
    media
        .ws
        .send_json(json!({"type": "command", "data": {
            "command_id": "connect-1", "command": "call.connect",
            "data": {"ringTimeSeconds": 10}
        }}))
        .await;
    let incoming = callee.event("incoming").await;
    assert_eq!(incoming["to"], A_CONNECT);
    callee.send_json(json!({"type": "answer"})).await;
    let connected = loop {
        let v = media.ws.expect_type("command_response").await;
        if v["data"]["command_id"] == "connect-1" {
            break v["data"].clone();
        }
    };
    assert_eq!(connected["success"], true, "{connected}");
    // The destination hears the caller: the call is really connected.
    talk_until(
        &mut caller,
        callee,
        None,
        (1000, 2000, 0),
        (2000, 1000, None),
        320,
    )
    .await
    .expect("caller and destination hear each other");
    caller.send_json(json!({"type": "hangup"})).await;
    caller.ws.closed().await;
}

#[tokio::test]
async fn a_config_file_without_sim_enabled_refuses_simulated_phones() {
    let server = start(file_config("")).await;
    for headers in [&[][..], &auth_headers(A_KEY, A_UUID)[..]] {
        let refused = Ws::connect(&sim_url(&server), headers).await.err().unwrap();
        assert_eq!(refused.status, 403, "{}", refused.body);
        assert!(
            refused.body.contains("[sim] enabled = true"),
            "{}",
            refused.body
        );
    }
    // The server is fine: an agent connects.
    let _control = control_as(&server, A_KEY, A_UUID, RATE, "mixed").await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_unauthenticated_phone_cannot_take_a_connectors_connect_destination() {
    let server = start(file_config("[sim]\nenabled = true")).await;
    // The attack: register the destination call.connect rings, before its real phone does.
    let refused = phone_with(&server, "", &[], register_frame(A_CONNECT))
        .await
        .err()
        .expect("an unauthenticated phone is refused");
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("x-api-key"), "{}", refused.body);
    // Wrong credentials, in headers or in the query, are refused the same way.
    let refused = Ws::connect(&sim_url(&server), &auth_headers("wrong", A_UUID))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 401, "{}", refused.body);
    let query = format!("?api_key=wrong&connector_uuid={A_UUID}");
    let refused = Ws::connect(&format!("{}{query}", sim_url(&server)), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 401, "{}", refused.body);
    // Another connector's phone may not register it either, nor dial A's number.
    let (mut ws, answer) = phone_with(
        &server,
        "",
        &auth_headers(B_KEY, B_UUID),
        register_frame(A_CONNECT),
    )
    .await
    .expect("B authenticates");
    assert_eq!(answer["type"], "error", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("not a number of the connector"),
        "{answer}"
    );
    ws.closed().await;
    let (mut ws, answer) = phone_with(
        &server,
        "",
        &auth_headers(B_KEY, B_UUID),
        dial_frame("+15551230001", A_NUMBER),
    )
    .await
    .expect("B authenticates");
    assert_eq!(answer["type"], "error", "{answer}");
    ws.closed().await;

    // A's own phone registers its destination with query credentials (as a browser would),
    // and is the one rung when A's agent connects a call.
    let query = format!("?api_key={A_KEY}&connector_uuid={A_UUID}");
    let (callee, registered) = phone_with(&server, &query, &[], register_frame(A_CONNECT))
        .await
        .expect("A's phone registers");
    assert_eq!(registered["type"], "registered", "{registered}");
    let mut callee = Phone {
        ws: callee,
        call_id: None,
    };
    ordinary_connected_call(&server, &mut callee).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_dials_cannot_fill_the_call_limit() {
    let mut config = file_config("[sim]\nenabled = true");
    config.limits.max_calls_per_connector = 2;
    let server = start(config).await;
    // Far more dials than the limit, all without credentials: none of them takes a slot.
    for _ in 0..50 {
        let refused = phone_with(&server, "", &[], dial_frame("+1", A_NUMBER))
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.status, 401);
    }
    // Real callers still get through, up to the limit.
    let mut control = control_as(&server, A_KEY, A_UUID, RATE, "mixed").await;
    let mut callers = Vec::new();
    for _ in 0..2 {
        let (ws, trying) = phone_with(
            &server,
            "",
            &auth_headers(A_KEY, A_UUID),
            dial_frame("+15551230001", A_NUMBER),
        )
        .await
        .expect("authenticated dial");
        assert_eq!(trying["type"], "trying", "{trying}");
        let notify = control.ws.expect_type("session.notify").await;
        assert_eq!(notify["activity"], "NEW_INCOMING_CALL");
        callers.push(ws);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn development_on_loopback_takes_phones_without_credentials() {
    let server = start(dev_config()).await;
    let (_callee, registered) = phone_with(&server, "", &[], register_frame("+15550100"))
        .await
        .expect("open in development");
    assert_eq!(registered["type"], "registered", "{registered}");
    let (_caller, trying) = phone_with(&server, "", &[], dial_frame("+1", "+2"))
        .await
        .expect("open in development");
    assert_eq!(trying["type"], "trying", "{trying}");
    // Credentials given are still checked.
    let refused = Ws::connect(
        &sim_url(&server),
        &auth_headers("wrong", DEV_CONNECTOR_UUID),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(refused.status, 401, "{}", refused.body);
    let (_ws, ok) = phone_with(
        &server,
        "",
        &auth_headers(DEV_API_KEY, DEV_CONNECTOR_UUID),
        dial_frame("+1", "+3"),
    )
    .await
    .expect("right credentials");
    assert_eq!(ok["type"], "trying", "{ok}");
    server.shutdown().await;
}

#[tokio::test]
async fn over_long_numbers_are_refused_at_the_edge() {
    let server = start(dev_config()).await;
    let huge = "9".repeat(64_000);
    let long = "9".repeat(MAX_ADDRESS_LEN + 1);
    for first in [
        dial_frame("+1", &huge),
        dial_frame(&huge, "+2"),
        dial_frame(&long, "+2"),
        register_frame(&huge),
        register_frame(&long),
    ] {
        let (mut ws, answer) = phone_with(&server, "", &[], first.clone())
            .await
            .expect("upgrade");
        assert_eq!(answer["type"], "error", "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("longer than 64 characters"),
            "{answer}"
        );
        ws.closed().await;
    }
    // Nothing was kept: no session exists for any of them.
    let (_, listed) = http(&server, "/public/v1/sessions").await;
    assert_eq!(listed["items"], json!([]), "{listed}");

    // session.create with an over-long remoteAddress: INVALID_REQUEST naming the limit.
    let mut control = control(&server, RATE, "mixed").await;
    let resp = control
        .request(json!({"type": "session.create", "channel": "TELCO", "remoteAddress": huge}))
        .await;
    assert_eq!(resp["ok"], false, "{resp}");
    assert_eq!(resp["errorCode"], "INVALID_REQUEST", "{resp}");
    let message = resp["errorContent"]["message"].as_str().unwrap_or("");
    assert!(message.contains("64"), "{resp}");

    // Exactly at the limit is fine, and an ordinary call works right after.
    let ok = "9".repeat(MAX_ADDRESS_LEN);
    let (_caller, trying) = phone_with(&server, "", &[], dial_frame(&ok, &ok))
        .await
        .expect("upgrade");
    assert_eq!(trying["type"], "trying", "{trying}");
    let call_in = control.take_call().await;
    assert_eq!(call_in["from"], ok.as_str());
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    server.shutdown().await;
}

#[tokio::test]
async fn closed_sessions_are_capped_oldest_first_and_the_list_is_paginated() {
    let mut config = dev_config();
    config.limits.max_closed_sessions_per_connector = 3;
    let server = start(config).await;
    let mut control = control(&server, RATE, "mixed").await;
    let mut closed_ids = Vec::new();
    for i in 0..5 {
        let mut phone = dial(&server, "+1", &format!("+20{i}"), RATE).await;
        let call_in = control.take_call().await;
        closed_ids.push(call_in["sessionId"].as_str().unwrap().to_owned());
        phone.send_json(json!({"type": "hangup"})).await;
        phone.ws.closed().await;
        // The registry closed (and counted) the session before telling its holder.
        let closed = control.ws.expect_type("session.closed").await;
        assert_eq!(closed["sessionId"], call_in["sessionId"]);
    }
    // Only the newest three closed sessions are kept.
    let (status, body) = http(&server, "/public/v1/sessions").await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{body}");
    for id in &closed_ids[2..] {
        assert!(ids.contains(&id.as_str()), "{id} missing from {body}");
    }
    assert!(body.get("nextOffset").is_none(), "{body}");

    // Pages of two: the first has nextOffset, the second does not.
    let (_, first) = http(&server, "/public/v1/sessions?limit=2").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2, "{first}");
    assert_eq!(first["nextOffset"], 2, "{first}");
    let (_, second) = http(&server, "/public/v1/sessions?limit=2&offset=2").await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1, "{second}");
    assert!(second.get("nextOffset").is_none(), "{second}");
    let mut paged: Vec<Value> = first["items"].as_array().unwrap().clone();
    paged.extend(second["items"].as_array().unwrap().iter().cloned());
    assert_eq!(Value::Array(paged), body["items"]);

    for bad in ["limit=0", "limit=1001", "limit=x", "offset=-1"] {
        let (status, body) = http(&server, &format!("/public/v1/sessions?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "INVALID_REQUEST", "{body}");
    }
    // An ordinary call still works.
    let _phone = dial(&server, "+1", "+299", RATE).await;
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    server.shutdown().await;
}

#[tokio::test]
async fn a_media_token_from_before_a_resume_cannot_attach_or_end_the_call() {
    let server = start(dev_config()).await;
    let mut first = control(&server, RATE, "mixed").await;
    let mut phone = dial(&server, "+1", "+2", RATE).await;
    let old_call_in = first.take_call().await;
    let mut second = control(&server, RATE, "mixed").await;
    // The first holder goes away before its media connects: the session is offered again.
    first.ws.close().await;
    let resume = second.ws.expect_type("session.notify").await;
    assert_eq!(resume["activity"], "RESUME", "{resume}");
    let session_id = resume["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(second.open(&session_id).await["ok"], true);
    second.ready(&session_id).await;
    let new_call_in = second.ws.expect_type("call.in").await;
    assert_ne!(new_call_in["token"], old_call_in["token"]);

    // The old holder's token is refused, with a reason.
    let url = old_call_in["url"].as_str().unwrap();
    let old_token = format!("Bearer {}", old_call_in["token"].as_str().unwrap());
    let refused = Ws::connect(url, &[("authorization", &old_token)])
        .await
        .err()
        .expect("old token refused");
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("no longer holds"), "{}", refused.body);

    // The new holder's call goes on: media attaches, the caller is answered and heard.
    let mut media = media(&new_call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    let mut heard = false;
    for _ in 0..100 {
        phone.send_level(1234, 320).await;
        if media.audio(0).await.contains(&1234) {
            heard = true;
            break;
        }
    }
    assert!(heard, "the agent hears the caller");
    // The refused attempt changed nothing: the old token still cannot get in.
    let refused = Ws::connect(url, &[("authorization", &old_token)])
        .await
        .err()
        .expect("old token still refused");
    assert_eq!(refused.status, 401);
    server.shutdown().await;
}

/// `GET` with the development credentials over a raw socket: (status, JSON body).
async fn http(server: &telcoflow_server::RunningServer, path: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: test\r\nx-api-key: {DEV_API_KEY}\r\nx-connector-uuid: {DEV_CONNECTOR_UUID}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let json = body
        .find('{')
        .and_then(|start| body.rfind('}').map(|end| &body[start..=end]))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or(Value::Null);
    (status, json)
}
