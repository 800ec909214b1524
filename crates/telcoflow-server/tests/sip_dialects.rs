//! SIP dialects of the calls the server dials (`call.connect`, `session.create`): early media
//! in a 183, PRACK for a reliable provisional response (RFC 3262), session timers (RFC 4028)
//! and a delayed offer for a trunk that asks for one. SIPp plays the dialled phone.

mod common;
mod sipp;

use common::*;
use serde_json::{Value, json};

const CALLED: &str = "+15559990001";
/// A frame whose loudest sample reaches this carries speech (the caller is otherwise alone
/// with a silent agent, whose frames are all zero).
const SPEECH: i16 = 1000;
/// Phone frames read at most while waiting for speech (6 s of 20 ms frames).
const MAX_FRAMES: usize = 300;

/// The SIPp scenarios grant 4 s session intervals, under our Min-SE of 90 s: let the
/// server follow them (in this test process only), so a refresh comes in 2 s, not 45 s.
fn short_session_intervals() {
    telcoflow_sip::sip::uac::lower_session_floor_for_tests(std::time::Duration::from_secs(2));
}

fn connect_config(ports: sipp::Ports) -> telcoflow_server::Config {
    let mut config = sipp::sip_config(ports);
    config.connectors[0].connect.insert(
        CALLED.into(),
        format!("sip:+15550200@127.0.0.1:{}", ports.sipp_sip),
    );
    config
}

fn loudest(samples: &[i16]) -> i16 {
    samples
        .iter()
        .map(|s| s.saturating_abs())
        .max()
        .unwrap_or(0)
}

/// Sends `call.connect` without waiting for its response; returns its command id.
async fn send_connect(media: &mut Media) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let cmd = json!({"command_id": id, "command": "call.connect",
        "data": {"ringTimeSeconds": 20}, "timeout_ms": 20_000});
    media
        .ws
        .send_json(json!({"type": "command", "data": cmd}))
        .await;
    id
}

/// Reads the caller's audio until a frame carries speech; panics after [`MAX_FRAMES`].
async fn caller_hears_speech(phone: &mut Phone) {
    for _ in 0..MAX_FRAMES {
        if loudest(&samples(&phone.ws.binary().await)) >= SPEECH {
            return;
        }
    }
    panic!("the caller heard no speech in {MAX_FRAMES} frames");
}

/// The media connection's texts up to the response to command `id`: the `call_event`s'
/// names before it, and the response.
async fn events_until_response(media: &mut Media, id: &str) -> (Vec<String>, Value) {
    let mut events = Vec::new();
    loop {
        let v = media.ws.text().await;
        if v["type"] == "call_event" {
            events.push(v["data"]["event"].as_str().unwrap_or_default().to_owned());
        } else if v["type"] == "command_response" && v["data"]["command_id"] == id {
            return (events, v["data"].clone());
        }
    }
}

#[tokio::test]
async fn the_caller_hears_a_destinations_early_media_then_its_answer() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(90);
    let dir = sipp::work_dir("early-media");
    let args = sipp::uas_args(ports, "uas_early_media.xml");
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, mut phone, mut media) = answered_call(connect_config(ports), 8000).await;
    let id = send_connect(&mut media).await;
    // The destination's 183 speech reaches the caller; the agent says nothing.
    caller_hears_speech(&mut phone).await;
    let (events, resp) = events_until_response(&mut media, &id).await;
    assert_eq!(resp["success"], true, "{resp}");
    assert!(
        events.iter().any(|e| e == "call.early_media"),
        "no call.early_media before the answer: {events:?}"
    );
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn early_media_stop_when_the_destination_then_refuses() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(91);
    let dir = sipp::work_dir("early-busy");
    let args = sipp::uas_args(ports, "uas_early_busy.xml");
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, mut phone, mut media) = answered_call(connect_config(ports), 8000).await;
    let id = send_connect(&mut media).await;
    // Heard although the destination never answers: early media.
    caller_hears_speech(&mut phone).await;
    let (_, resp) = events_until_response(&mut media, &id).await;
    assert_eq!(resp["success"], false, "{resp}");
    assert_eq!(resp["error_code"], "CALL_UNANSWERED", "{resp}");
    assert!(
        resp["error_message"].as_str().unwrap().contains("is busy"),
        "{resp}"
    );
    sip_phone.await.unwrap().assert_passed();
    // The speech stops (SIPp's player goes on sending to a port that is closed now): past
    // the frames already on their way (10 silent ones in a row), the caller hears nothing but
    // the silent agent.
    let mut silent = 0;
    for _ in 0..MAX_FRAMES {
        let level = loudest(&samples(&phone.ws.binary().await));
        if level == 0 {
            silent += 1;
            if silent == 60 {
                break;
            }
        } else {
            assert!(silent < 10, "speech ({level}) after {silent} silent frames");
            silent = 0;
        }
    }
    assert_eq!(silent, 60, "the early media did not stop");
    server.shutdown().await;
}

#[tokio::test]
async fn a_reliable_183_is_pracked_and_the_session_refreshed_by_update() {
    if !sipp::available() {
        return;
    }
    short_session_intervals();
    let ports = sipp::ports(92);
    let dir = sipp::work_dir("prack-timer");
    let args = sipp::uas_args(ports, "uas_100rel_timer.xml");
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, _phone, mut media) = answered_call(connect_config(ports), 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");
    // SIPp checks the INVITE's Supported / Session-Expires / Min-SE, our PRACK's RAck and
    // our UPDATE's Session-Expires (it granted 4 s with us refreshing: the UPDATE comes at
    // 2 s), then hangs up.
    loop {
        let v = media.ws.expect_type("call_event").await;
        assert_ne!(v["data"]["event"], "call.terminated", "{v}");
        if v["data"]["state"] == "ended" {
            break;
        }
    }
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn a_422_raises_the_interval_and_a_callee_that_stops_refreshing_is_hung_up_on() {
    if !sipp::available() {
        return;
    }
    short_session_intervals();
    let ports = sipp::ports(95);
    let dir = sipp::work_dir("422-expiry");
    let args = sipp::uas_args(ports, "uas_422_expiry.xml");
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, _phone, mut media) = answered_call(connect_config(ports), 8000).await;
    // SIPp refuses our 1800 s with 422 (Min-SE 3600), checks the retry asks for 3600 s, grants
    // 4 s with itself refreshing, and never does: our BYE ends the destination's leg.
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");
    loop {
        let v = media.ws.expect_type("call_event").await;
        assert_ne!(v["data"]["event"], "call.terminated", "{v}");
        if v["data"]["state"] == "ended" {
            break;
        }
    }
    sip_phone.await.unwrap().assert_passed();
    // The caller stays with the agent.
    let resp = media.command("agent.interrupt", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_delayed_offer_trunk_gets_an_invite_without_sdp_and_our_answer_in_the_ack() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(93);
    let dir = sipp::work_dir("delayed-offer");
    let mut args = sipp::uas_args(ports, "uas_delayed_offer.xml");
    args.push("-rtp_echo".into());
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut config = connect_config(ports);
    config
        .sip
        .as_mut()
        .unwrap()
        .trunks
        .push(telcoflow_server::config::SipTrunk {
            host: format!("127.0.0.1:{}", ports.sipp_sip),
            username: String::new(),
            password: String::new(),
            delayed_offer: true,
            srtp: None,
        });
    let (server, _control, mut phone, mut media) = answered_call(config, 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");
    // The media agreed in the ACK work: the caller hears itself echoed by the trunk (G.711
    // keeps the level within a few percent).
    let (frame, level) = (160, 5000);
    let mut heard = 0;
    for round in 0..150 {
        for _ in 0..if round == 0 { 3 } else { 1 } {
            phone.send_level(level, frame).await;
        }
        heard = i32::from(samples(&phone.ws.binary().await)[frame / 2]);
        if (heard - i32::from(level)).abs() < 500 {
            break;
        }
    }
    assert!(
        (heard - i32::from(level)).abs() < 500,
        "the caller heard {heard} through the trunk, expected about {level}"
    );
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn the_agent_hears_the_early_media_of_a_session_create_call() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(94);
    let dir = sipp::work_dir("early-outbound");
    let args = sipp::uas_args(ports, "uas_early_media.xml");
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 16000, "mixed").await;
    let remote = format!("sip:+15550300@127.0.0.1:{}", ports.sipp_sip);
    let resp = control
        .request(json!({"type": "session.create", "channel": "TELCO", "remoteAddress": remote}))
        .await;
    assert_eq!(resp["ok"], true, "{resp}");
    let session_id = resp["content"]["sessionId"].as_str().unwrap().to_owned();
    let opened = control.open(&session_id).await;
    assert_eq!(opened["ok"], true, "{opened}");
    control.ready(&session_id).await;
    let call_in = control.ws.expect_type("call.in").await;
    let mut media = media(&call_in).await;
    // `call.answer` waits for the far end; meanwhile the agent hears its early media.
    let id = uuid::Uuid::new_v4().to_string();
    let cmd = json!({"command_id": id, "command": "call.answer", "timeout_ms": 20_000});
    media
        .ws
        .send_json(json!({"type": "command", "data": cmd}))
        .await;
    let mut heard = false;
    for _ in 0..MAX_FRAMES {
        if loudest(&media.audio(0).await) >= SPEECH {
            heard = true;
            break;
        }
    }
    assert!(heard, "the agent heard no early media");
    let (_, resp) = events_until_response(&mut media, &id).await;
    assert_eq!(resp["success"], true, "{resp}");
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}
