//! `call.connect` dialling out over SIP: the caller is a simulated phone, the destination is
//! SIPp playing a SIP phone, so one call has a phone of each network on its two ends.

mod common;
mod sipp;

use common::*;
use serde_json::json;

const CALLED: &str = "+15559990001";

fn connect_config(ports: sipp::Ports) -> telcoflow_server::Config {
    let mut config = sipp::sip_config(ports);
    config.connectors[0].connect.insert(
        CALLED.into(),
        format!("sip:+15550200@127.0.0.1:{}", ports.sipp_sip),
    );
    config
}

#[tokio::test]
async fn sip_connect_rings_a_sip_phone_that_answers_and_audio_flows() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(10);
    let dir = sipp::work_dir("connect-answer");
    let mut args = sipp::uas_args(ports, "uas_answer.xml");
    // The SIP phone sends back whatever it hears, so the caller hears itself through it.
    args.push("-rtp_echo".into());
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, mut phone, mut media) = answered_call(connect_config(ports), 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");

    // Barge (the default): the caller hears the destination, here its own voice echoed back
    // over RTP by the SIP phone.
    let frame = 160;
    let level: i16 = 5000;
    let mut heard = 0;
    for round in 0..150 {
        let n = if round == 0 { 3 } else { 1 };
        for _ in 0..n {
            phone.send_level(level, frame).await;
        }
        let samples = samples(&phone.ws.binary().await);
        heard = i32::from(samples[frame / 2]);
        if (heard - i32::from(level)).abs() < 500 {
            break;
        }
    }
    assert!(
        (heard - i32::from(level)).abs() < 500,
        "the caller heard {heard} through the SIP phone, expected about {level}"
    );
    // The app hangs up: the SIP phone gets a BYE and its scenario completes.
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_connect_to_a_phone_that_never_answers_is_call_unanswered() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(11);
    let dir = sipp::work_dir("connect-noanswer");
    let args = sipp::uas_args(ports, "uas_noanswer.xml");
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, _phone, mut media) = answered_call(connect_config(ports), 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 1})))
        .await;
    assert_eq!(resp["success"], false, "{resp}");
    assert_eq!(resp["error_code"], "CALL_UNANSWERED", "{resp}");
    // The server gave up with CANCEL; SIPp saw CANCEL, answered 487 and got the ACK.
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn a_busy_sip_phone_is_call_unanswered_saying_busy() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(28);
    let dir = sipp::work_dir("busy");
    let args = sipp::uas_args(ports, "uas_busy.xml");
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, _phone, mut media) = answered_call(connect_config(ports), 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 5})))
        .await;
    assert_eq!(resp["success"], false, "{resp}");
    assert_eq!(resp["error_code"], "CALL_UNANSWERED", "{resp}");
    let message = resp["error_message"].as_str().unwrap();
    assert!(message.contains("is busy"), "{message}");
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_connect_without_sip_configured_is_refused() {
    let mut config = dev_config();
    config.connectors[0]
        .connect
        .insert(CALLED.into(), "sip:+15550200@127.0.0.1:5999".into());
    // Refused when the server starts, naming the field, rather than at call time.
    let err = telcoflow_server::Server::start(config)
        .await
        .expect_err("a sip: destination without [sip] is refused");
    let message = err.to_string();
    assert!(message.contains("connectors.connect"), "{message}");
    assert!(message.contains("[sip]"), "{message}");
}

#[tokio::test]
async fn sip_callee_hanging_up_ends_its_leg_and_the_call_goes_on() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(16);
    let dir = sipp::work_dir("connect-bye");
    let args = sipp::uas_args(ports, "uas_answer_bye.xml");
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, _phone, mut media) = answered_call(connect_config(ports), 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");
    // The SIP phone hangs up: the app hears that the connected leg ended, the call stays.
    let event = loop {
        let v = media.ws.expect_type("call_event").await;
        assert_ne!(v["data"]["event"], "call.terminated", "{v}");
        if v["data"]["state"] == "ended" {
            break v;
        }
    };
    assert_eq!(event["data"]["state"], "ended", "{event}");
    sip_phone.await.unwrap().assert_passed();
    // The caller and the agent are still on the call.
    let resp = media.command("agent.interrupt", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    server.shutdown().await;
}

#[tokio::test]
async fn sip_callee_hears_the_agent_as_whisper_barge_and_spy_say_and_stays_after_close() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(17);
    let dir = sipp::work_dir("connect-modes");
    let mut args = sipp::uas_args(ports, "uas_answer.xml");
    // The SIP phone echoes what it hears, so the caller learns what the callee heard.
    args.push("-rtp_echo".into());
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let (server, _control, mut phone, mut media) = answered_call(connect_config(ports), 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");

    // The caller is silent and the agent speaks at 4000. What the caller hears:
    // barge: the agent directly + the agent echoed by the callee; whisper: only the echo (the
    // callee heard the agent); spy: nothing (nobody hears the agent).
    let frame = 160;
    let agent: i16 = 4000;
    for (mode, expect) in [
        ("agent.barge", 8000),
        ("agent.whisper", 4000),
        ("agent.spy", 0),
    ] {
        let resp = media.command(mode, None).await;
        assert_eq!(resp["success"], true, "{mode}: {resp}");
        let mut heard = i32::MIN;
        for round in 0..250 {
            let n = if round == 0 { 3 } else { 1 };
            for _ in 0..n {
                media.send_audio(&pcm_level(agent, frame)).await;
                phone.send_level(0, frame).await;
            }
            heard = i32::from(samples(&phone.ws.binary().await)[frame / 2]);
            if (heard - expect).abs() < 500 {
                break;
            }
        }
        assert!(
            (heard - expect).abs() < 500,
            "{mode}: the caller heard {heard}, expected about {expect}"
        );
    }
    // The agent leaves: caller and SIP phone go on talking through the server.
    let resp = media.command("call.close", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    let caller: i16 = 3000;
    let mut heard = 0;
    for round in 0..250 {
        let n = if round == 0 { 3 } else { 1 };
        for _ in 0..n {
            phone.send_level(caller, frame).await;
        }
        heard = i32::from(samples(&phone.ws.binary().await)[frame / 2]);
        if (heard - i32::from(caller)).abs() < 400 {
            break;
        }
    }
    assert!(
        (heard - i32::from(caller)).abs() < 400,
        "after call.close the caller heard {heard}, expected its echo of about {caller}"
    );
    // The caller hangs up: the SIP phone gets its BYE.
    phone.send_json(json!({"type": "hangup"})).await;
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_connect_through_a_trunk_answers_its_digest_challenge() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(18);
    let dir = sipp::work_dir("connect-auth");
    let args = sipp::uas_args(ports, "uas_auth.xml");
    let trunk = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut config = connect_config(ports);
    config
        .sip
        .as_mut()
        .unwrap()
        .trunks
        .push(telcoflow_server::config::SipTrunk {
            host: format!("127.0.0.1:{}", ports.sipp_sip),
            username: "acme".into(),
            password: "s3cret".into(),
            delayed_offer: false,
            srtp: None,
        });
    let (server, _control, _phone, mut media) = answered_call(config, 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(
        resp["success"], true,
        "the trunk refused the credentials: {resp}"
    );
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    trunk.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_session_create_calls_a_sip_uri_and_audio_flows() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(19);
    let dir = sipp::work_dir("outbound");
    let mut args = sipp::uas_args(ports, "uas_answer.xml");
    args.push("-rtp_echo".into());
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
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");

    // The SIP phone echoes: the agent hears itself.
    let frame = 320;
    let level: i16 = 5000;
    let mut heard = 0;
    for round in 0..150 {
        let n = if round == 0 { 5 } else { 1 };
        for _ in 0..n {
            media.send_audio(&pcm_level(level, frame)).await;
        }
        let samples = media.audio(0).await;
        heard = i32::from(samples[samples.len() / 2]);
        if (heard - i32::from(level)).abs() < 500 {
            break;
        }
    }
    assert!(
        (heard - i32::from(level)).abs() < 500,
        "the agent heard {heard} back from the SIP phone, expected about {level}"
    );
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_connect_over_tcp_rings_answers_and_hangs_up() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(24);
    let dir = sipp::work_dir("connect-tcp");
    let mut args = sipp::uas_args(ports, "uas_answer.xml");
    args.extend(["-t".into(), "t1".into()]);
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut config = sipp::sip_config(ports);
    config.connectors[0].connect.insert(
        CALLED.into(),
        format!("sip:+15550200@127.0.0.1:{};transport=tcp", ports.sipp_sip),
    );
    // Over TCP nothing is retransmitted: dial only once SIPp listens.
    sipp::wait_tcp(ports.sipp_sip).await;
    let (server, _control, _phone, mut media) = answered_call(config, 8000).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

/// A SIP destination the server dialled that negotiated no telephone-event gets the agent's
/// DTMF as SIP INFO in the call's dialog.
#[tokio::test]
async fn dtmf_to_a_dialled_sip_phone_without_telephone_event_goes_as_info() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(66);
    let dir = sipp::work_dir("dialled-info");
    let args = sipp::uas_args(ports, "uas_info_dtmf.xml");
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
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    let resp = media
        .command(
            "call.send_dtmf",
            Some(json!({"digits": "12", "durationMs": 100})),
        )
        .await;
    assert_eq!(resp["success"], true, "{resp}");
    // SIPp answers both INFOs (its scenario fails on a BYE before the second): wait until
    // the server has counted both answers, then hang up.
    let deadline = tokio::time::Instant::now() + WAIT;
    let answered = "telcoflow_sip_responses_total{code=\"200\",direction=\"in\",method=\"INFO\"} 2";
    loop {
        let metrics = http_get(&server, "/metrics").await;
        if metrics.contains(answered) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the INFOs were never answered:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    sip_phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

/// The body of a plain HTTP/1.1 GET to the server.
async fn http_get(server: &telcoflow_server::RunningServer, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}
