//! `call.transfer` of a SIP caller: SIPp plays the caller (and, for the fallback, the target)
//! against a real server on 127.0.0.1; an agent written with raw frames (tests/common)
//! answers and transfers.
//!
//! - The caller takes the REFER (202), reports its call to the target with NOTIFY 100 then
//!   200, and gets the server's BYE: the agent sees the progress and the success.
//! - The caller refuses REFER (405): the server dials the target (a second SIPp) itself and
//!   bridges it; the agent leaves.

mod common;
mod sipp;

use common::*;
use serde_json::{Value, json};
use telcoflow_server::Config;

/// Claims the next call, opens its media connection and answers it.
async fn answer_next(control: &mut Control) -> Media {
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    media
}

/// A SIP config for test `index` whose connector may transfer to `target`.
fn config_with_target(ports: sipp::Ports, target: &str) -> Config {
    let mut config = sipp::sip_config(ports);
    config.connectors[0].transfer_targets = vec![target.to_owned()];
    config
}

/// Sends `call.transfer` to `target` and returns every text frame until the server closes
/// the media connection.
async fn transfer_until_closed(media: &mut Media, target: &str) -> Vec<Value> {
    media
        .ws
        .send_json(json!({"type": "command", "data": {
            "command_id": "transfer-1",
            "command": "call.transfer",
            "timeout_ms": 30_000,
            "data": {"target": target, "ringTimeSeconds": 10},
        }}))
        .await;
    media.ws.texts_until_close().await.0
}

/// Where the first frame matching `pred` is in `texts`.
fn position(texts: &[Value], pred: impl Fn(&Value) -> bool) -> usize {
    texts
        .iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no such frame in {texts:#?}"))
}

fn is_event(v: &Value, name: &str) -> bool {
    v["type"] == "call_event" && v["data"]["event"] == name
}

#[tokio::test]
async fn sip_caller_takes_the_refer_and_the_agent_sees_progress_and_success() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(55);
    let target = "sip:transfer-target@127.0.0.1:5999";
    let server = start(config_with_target(ports, target)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("uac_refer");
    let args = sipp::uac_args(&server, ports, "uac_refer.xml", "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    let texts = transfer_until_closed(&mut media, target).await;
    let progress: Vec<(u64, &str)> = texts
        .iter()
        .filter(|v| is_event(v, "call.transfer_progress"))
        .map(|v| {
            assert_eq!(v["data"]["method"], "refer", "{v}");
            (
                v["data"]["status"].as_u64().unwrap(),
                v["data"]["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(progress, vec![(100, "Trying"), (200, "OK")]);
    let response = position(&texts, |v| v["type"] == "command_response");
    let r = &texts[response]["data"];
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(
        r["result"],
        json!({"method": "refer", "target": target, "status": 200})
    );
    let last_progress = texts
        .iter()
        .rposition(|v| is_event(v, "call.transfer_progress"))
        .unwrap();
    let terminated = position(&texts, |v| is_event(v, "call.terminated"));
    assert!(
        last_progress < response && response < terminated,
        "{texts:#?}"
    );
    assert_eq!(texts[terminated]["data"]["reason"], "transferred");
    // SIPp's scenario passes only if the server hung up with BYE after the final NOTIFY.
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_caller_refusing_refer_is_bridged_to_the_target_by_the_server() {
    if !sipp::available() {
        return;
    }
    let caller_ports = sipp::ports(56);
    let target_ports = sipp::ports(57);
    let target = format!("sip:+15550200@127.0.0.1:{}", target_ports.sipp_sip);
    let server = start(config_with_target(caller_ports, &target)).await;
    let mut control = control(&server, 8000, "mixed").await;
    // The target answers, talks for a second and hangs up.
    let target_dir = sipp::work_dir("uas_transfer_target");
    let target_args = sipp::uas_args(target_ports, "uas_answer_bye.xml");
    let target_phone = tokio::spawn(async move { sipp::run(&target_dir, &target_args).await });
    let dir = sipp::work_dir("uac_refer_405");
    let args = sipp::uac_args(
        &server,
        caller_ports,
        "uac_refer_405.xml",
        "+15559990001",
        1,
    );
    let caller = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    let texts = transfer_until_closed(&mut media, &target).await;
    let response = position(&texts, |v| v["type"] == "command_response");
    let r = &texts[response]["data"];
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(
        r["result"],
        json!({"method": "bridge", "target": target, "referStatus": 405})
    );
    let terminated = position(&texts, |v| is_event(v, "call.terminated"));
    assert!(response < terminated, "{texts:#?}");
    assert_eq!(texts[terminated]["data"]["reason"], "transferred");
    assert!(
        !texts.iter().any(|v| is_event(v, "call.transfer_progress")),
        "no REFER progress: {texts:#?}"
    );
    // The target hangs up, and the server hangs up the caller it was bridged to.
    target_phone.await.unwrap().assert_passed();
    caller.await.unwrap().assert_passed();
    server.shutdown().await;
}
