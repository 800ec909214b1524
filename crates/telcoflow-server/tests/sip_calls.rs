//! Phones calling in over SIP: SIPp plays the phone against a real server on 127.0.0.1, and
//! an agent written with raw frames (tests/common) takes the calls.

mod common;
mod sipp;

use common::*;
use serde_json::{Value, json};

/// Claims the next call, opens its media connection and answers it.
async fn answer_next(control: &mut Control) -> Media {
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    media
}

/// The loudest sample of a frame.
fn peak(samples: &[i16]) -> i32 {
    samples
        .iter()
        .map(|s| i32::from(*s).abs())
        .max()
        .unwrap_or(0)
}

/// Waits for the `call.terminated` event, skipping audio and other events.
async fn terminated(media: &mut Media) -> Value {
    loop {
        let v = media.ws.expect_type("call_event").await;
        if v["data"]["event"] == "call.terminated" {
            return v;
        }
    }
}

/// SIPp calls in with `scenario` and plays recorded speech; the agent must hear it, then the
/// phone's BYE ends the call.
async fn agent_hears_speech(index: u16, scenario: &str) {
    let ports = sipp::ports(index);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir(scenario);
    let args = sipp::uac_args(&server, ports, scenario, "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    // SIPp plays recorded speech (PCMA); the agent must hear it at its rate.
    let mut loudest = 0;
    for _ in 0..150 {
        loudest = loudest.max(peak(&media.audio(0).await));
        if loudest > 2000 {
            break;
        }
    }
    assert!(
        loudest > 2000,
        "the agent heard only silence (peak {loudest})"
    );
    // SIPp hangs up with BYE: the app sees the call end.
    let ended = terminated(&mut media).await;
    assert_eq!(ended["data"]["reason"], "caller", "{ended}");
    control.ws.expect_type("session.closed").await;
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_call_in_hears_rtp_audio_and_bye_ends_the_call() {
    if sipp::available() {
        agent_hears_speech(0, "uac_audio.xml").await;
    }
}

#[tokio::test]
async fn sip_offerless_invite_is_offered_in_200_and_answered_in_ack() {
    if sipp::available() {
        agent_hears_speech(22, "uac_late_offer.xml").await;
    }
}

#[tokio::test]
async fn sip_agent_audio_reaches_the_phone_over_rtp() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(1);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 16000, "mixed").await;
    let dir = sipp::work_dir("echo");
    // -rtp_echo: SIPp sends every RTP packet it gets back to its sender, so the agent hears
    // its own audio after a round trip through RTP, G.711 and the jitter buffer.
    let mut args = sipp::uac_args(&server, ports, "uac_short.xml", "+15559990001", 1);
    args.push("-rtp_echo".into());
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    let frame = 320; // 20 ms at 16 kHz
    let level: i16 = 6000;
    let mut heard = 0;
    for round in 0..100 {
        // Stay a few frames ahead of the call's clock.
        let n = if round == 0 { 5 } else { 1 };
        for _ in 0..n {
            media.send_audio(&pcm_level(level, frame)).await;
        }
        let samples = media.audio(0).await;
        heard = i32::from(samples[samples.len() / 2]);
        // G.711 and resampling keep a constant level within a few percent.
        if (heard - i32::from(level)).abs() < 600 {
            break;
        }
    }
    assert!(
        (heard - i32::from(level)).abs() < 600,
        "the echo through the phone came back as {heard}, expected about {level}"
    );
    terminated(&mut media).await;
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

/// SIPp calls in with `scenario`, which presses one key; the app must get it as `call.dtmf`.
async fn app_gets_digit(index: u16, scenario: &str, digit: &str) {
    let ports = sipp::ports(index);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir(scenario);
    let args = sipp::uac_args(&server, ports, scenario, "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    let dtmf = loop {
        let v = media.ws.expect_type("call_event").await;
        assert_ne!(
            v["data"]["event"], "call.terminated",
            "no DTMF before the end: {v}"
        );
        if v["data"]["event"] == "call.dtmf" {
            break v;
        }
    };
    assert_eq!(dtmf["data"]["digit"], digit, "{dtmf}");
    assert!(dtmf["data"]["duration_ms"].as_u64().unwrap() > 0, "{dtmf}");
    terminated(&mut media).await;
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_rfc4733_dtmf_reaches_the_app_as_call_dtmf() {
    if sipp::available() {
        app_gets_digit(2, "uac_dtmf.xml", "5").await;
    }
}

#[tokio::test]
async fn sip_info_dtmf_reaches_the_app_as_call_dtmf() {
    if sipp::available() {
        app_gets_digit(23, "uac_info_dtmf.xml", "7").await;
    }
}

#[tokio::test]
async fn sip_unknown_number_gets_404() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(3);
    let mut config = sipp::sip_config(ports);
    config.connectors[0].numbers = vec!["+15559990001".into()];
    let server = start(config).await;
    let dir = sipp::work_dir("404");
    let args = sipp::uac_args(&server, ports, "uac_404.xml", "+19999999999", 1);
    sipp::run(&dir, &args).await.assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_offer_without_common_codec_gets_488() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(4);
    let server = start(sipp::sip_config(ports)).await;
    let dir = sipp::work_dir("488");
    let args = sipp::uac_args(&server, ports, "uac_488.xml", "+15559990001", 1);
    sipp::run(&dir, &args).await.assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_unclaimed_call_gets_480_after_the_ring_timeout() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(5);
    let mut config = sipp::sip_config(ports);
    config.ring_timeout_secs = 1;
    let server = start(config).await;
    let dir = sipp::work_dir("480");
    let args = sipp::uac_args(&server, ports, "uac_480.xml", "+15559990001", 1);
    sipp::run(&dir, &args).await.assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_cancel_while_ringing_gets_487_and_closes_the_session() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(6);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("cancel");
    let args = sipp::uac_args(&server, ports, "uac_cancel.xml", "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    // Claiming the session rings the phone (180); SIPp then cancels.
    let notify = control.ws.expect_type("session.notify").await;
    let session_id = notify["sessionId"].as_str().unwrap().to_owned();
    let opened = control.open(&session_id).await;
    assert_eq!(opened["ok"], true, "{opened}");
    let closed = control.ws.expect_type("session.closed").await;
    assert_eq!(closed["sessionId"], session_id.as_str(), "{closed}");
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_lost_ack_makes_the_server_resend_200() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(7);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("lost-ack");
    let mut args = sipp::uac_args(&server, ports, "uac_lost_ack.xml", "+15559990001", 1);
    let log = dir.join("messages.log");
    args.extend([
        "-trace_msg".into(),
        "-message_file".into(),
        log.display().to_string(),
    ]);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    terminated(&mut media).await;
    phone.await.unwrap().assert_passed();
    let trace = std::fs::read_to_string(&log).expect("SIPp message log");
    // Each received message is logged as a block starting with its first line.
    let invite_200s = trace
        .split("message received")
        .skip(1)
        .filter(|block| {
            let body = block
                .split_once("\n\n")
                .map_or(*block, |(_, b)| b)
                .trim_start();
            body.starts_with("SIP/2.0 200")
                && body
                    .lines()
                    .any(|l| l.to_ascii_lowercase().starts_with("cseq:") && l.contains("INVITE"))
        })
        .count();
    assert!(
        invite_200s >= 2,
        "expected the 200 OK to be resent while the ACK was missing, saw {invite_200s}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn sip_twenty_concurrent_calls_are_all_answered_and_their_ports_reused() {
    if !sipp::available() {
        return;
    }
    const CALLS: usize = 20;
    let ports = sipp::ports(8);
    let mut config = sipp::sip_config(ports);
    // 25 RTP/RTCP pairs: the second batch of 20 calls only fits if the first one's ports went
    // back to the pool.
    config.sip.as_mut().unwrap().rtp_ports = format!("{}-{}", ports.rtp_low, ports.rtp_low + 49);
    let server = start(config).await;
    let mut control = control(&server, 8000, "mixed").await;
    for batch in 0..2 {
        let dir = sipp::work_dir(&format!("load-{batch}"));
        let args = sipp::uac_args(
            &server,
            ports,
            "uac_short.xml",
            "+15559990001",
            CALLS as u32,
        );
        let phones = tokio::spawn(async move { sipp::run(&dir, &args).await });

        // One control connection takes every call; each call's media runs in its own task.
        let mut calls = tokio::task::JoinSet::new();
        let mut pending_open = std::collections::HashMap::new();
        let mut answered = 0;
        while answered < CALLS {
            let v = control.ws.text().await;
            match v["type"].as_str() {
                Some("session.notify") => {
                    let session_id = v["sessionId"].as_str().unwrap().to_owned();
                    let req_id = uuid::Uuid::new_v4().to_string();
                    control
                    .ws
                    .send_json(
                        json!({"type": "session.open", "sessionId": session_id, "reqId": req_id}),
                    )
                    .await;
                    pending_open.insert(req_id, session_id);
                }
                Some("response") => {
                    let req_id = v["reqId"].as_str().unwrap_or_default();
                    if let Some(session_id) = pending_open.remove(req_id) {
                        assert_eq!(v["ok"], true, "{v}");
                        control.ready(&session_id).await;
                    }
                }
                Some("call.in") => {
                    answered += 1;
                    calls.spawn(async move {
                        let mut media = media(&v).await;
                        let answer = media.command("call.answer", None).await;
                        assert_eq!(answer["success"], true, "{answer}");
                        terminated(&mut media).await
                    });
                }
                _ => {}
            }
        }
        let mut ended = 0;
        while let Some(r) = calls.join_next().await {
            let v = r.expect("call task");
            assert_eq!(v["data"]["reason"], "caller", "{v}");
            ended += 1;
        }
        assert_eq!(ended, CALLS);
        phones.await.unwrap().assert_passed();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn sip_reinvite_hold_is_answered_recvonly_and_the_call_goes_on() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(12);
    let mut config = sipp::sip_config(ports);
    // The phone sends no RTP at all: on hold that must not count as silence.
    config.sip.as_mut().unwrap().rtp_timeout_secs = 1;
    let server = start(config).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("hold");
    let args = sipp::uac_args(&server, ports, "uac_hold.xml", "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    // The hold does not end the call: it ends with SIPp's BYE, after the re-INVITE.
    let ended = terminated(&mut media).await;
    assert_eq!(ended["data"]["reason"], "caller", "{ended}");
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_session_timer_is_granted_and_refreshed_by_update() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(64);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("session-timer");
    let args = sipp::uac_args(&server, ports, "uac_session_timer.xml", "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    // The refresh does not end the call: it ends with SIPp's BYE, after the UPDATE.
    let ended = terminated(&mut media).await;
    assert_eq!(ended["data"]["reason"], "caller", "{ended}");
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_rtp_timeout_ends_the_call_with_bye() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(13);
    let mut config = sipp::sip_config(ports);
    config.sip.as_mut().unwrap().rtp_timeout_secs = 1;
    let server = start(config).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("rtp-timeout");
    let args = sipp::uac_args(&server, ports, "uac_rtp_silent.xml", "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    let ended = terminated(&mut media).await;
    assert_eq!(ended["data"]["reason"], "caller", "{ended}");
    // SIPp got the server's BYE and answered it.
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_options_gets_200_and_malformed_request_gets_400_with_reason() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(14);
    let server = start(sipp::sip_config(ports)).await;
    let dir = sipp::work_dir("options");
    let args = sipp::uac_args(&server, ports, "options.xml", "+15559990001", 1);
    sipp::run(&dir, &args).await.assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_call_over_tcp_is_answered_and_ended() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(15);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("tcp");
    let mut args = sipp::uac_args(&server, ports, "uac_short.xml", "+15559990001", 1);
    args.extend(["-t".into(), "t1".into()]);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    let ended = terminated(&mut media).await;
    assert_eq!(ended["data"]["reason"], "caller", "{ended}");
    phone.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn sip_server_shutdown_sends_bye_to_calls_in_progress() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(21);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir("shutdown");
    // The phone sends no RTP and waits for a BYE; the RTP timeout (30 s) is far beyond the
    // scenario's 10 s wait, so only the shutdown can send it.
    let args = sipp::uac_args(&server, ports, "uac_rtp_silent.xml", "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let mut media = answer_next(&mut control).await;
    // A BYE may only follow the phone's ACK, which SIPp sends the moment our 200 arrives; ten
    // frames of audio at the agent (200 ms of the call's clock) leave ample room for it.
    for _ in 0..10 {
        media.audio(0).await;
    }
    server.shutdown().await;
    phone.await.unwrap().assert_passed();
}
