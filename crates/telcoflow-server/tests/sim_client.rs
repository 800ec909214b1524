//! The simulated phone client (`telcoflow_sim`) against a real server: calls
//! answered by a raw-WebSocket application, audio both ways, hangups, routing failures and
//! registered phones as `call.connect` destinations.

mod common;

use common::{WAIT, control, dev_config, media, pcm_level, start};
use serde_json::json;
use std::time::Duration;
use telcoflow_proto::SampleRate;
use telcoflow_proto::sim::{HangupReason, NetworkFrame};
use telcoflow_server::config::DEV_CONNECT_DESTINATION;
use telcoflow_sim::{PhoneAudio, SimError, SimPhone};

/// Reads received frames until one is entirely `level`; fails after `WAIT`.
async fn hear_level(audio: &mut PhoneAudio, level: i16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, audio.recv())
            .await
            .unwrap_or_else(|_| panic!("no frame at level {level} in time"))
            .expect("phone still connected");
        if !frame.is_empty() && frame.iter().all(|&s| s == level) {
            return;
        }
    }
}

#[tokio::test]
async fn dialled_call_carries_audio_both_ways_and_hangs_up() {
    let server = start(dev_config()).await;
    let mut agent = control(&server, 16000, "mixed").await;
    // The http:// form of the base URL is accepted too.
    let mut phone = SimPhone::dial(
        &server.http_url(),
        "+15551230001",
        "+15559990001",
        SampleRate::Hz16000,
    )
    .await
    .unwrap();
    let call_in = agent.take_call().await;
    let mut media = media(&call_in).await;
    // The server's first pull arrives as soon as the media connection is up; take it before
    // commands and audio reads skip past it.
    let request = tokio::time::timeout(WAIT, media.ws.expect_type("buffer_request"))
        .await
        .expect("buffer_request in time");
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    let answered = phone
        .events()
        .wait_for(WAIT, |e| matches!(e, NetworkFrame::Answered { .. }))
        .await
        .unwrap();
    assert_eq!(
        answered,
        NetworkFrame::Answered {
            call_id: call_in["callId"].as_str().unwrap().to_owned()
        }
    );

    // Application -> phone: answer the server's pull with a constant level.
    let bytes = request["data"]["requested_bytes"].as_u64().unwrap() as usize;
    media.send_audio(&pcm_level(2000, bytes / 2)).await;
    hear_level(phone.audio(), 2000).await;

    // Phone -> application: 200 ms at a constant level, then silence.
    let playback = phone.control().play(vec![1000; 3200]).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, media.audio(0))
            .await
            .expect("the application hears the phone");
        if frame.iter().all(|&s| s == 1000) {
            break;
        }
    }
    assert!(playback.finished().await, "the clip was played to the end");

    // A key press reaches the application as a call event.
    phone
        .control()
        .dtmf('5', Duration::from_millis(120))
        .unwrap();
    let event = tokio::time::timeout(WAIT, media.ws.expect_type("call_event"))
        .await
        .expect("dtmf event in time");
    assert_eq!(event["data"]["digit"], "5", "{event}");
    assert_eq!(event["data"]["duration_ms"], 120, "{event}");

    phone.control().hangup().unwrap();
    let hangup = phone
        .events()
        .wait_for(WAIT, |e| matches!(e, NetworkFrame::Hangup { .. }))
        .await
        .unwrap();
    assert!(
        matches!(
            hangup,
            NetworkFrame::Hangup {
                reason: HangupReason::Local,
                ..
            }
        ),
        "{hangup:?}"
    );
    // The network closes a dialling phone's socket after the hangup.
    assert_eq!(
        tokio::time::timeout(WAIT, phone.events().next())
            .await
            .unwrap(),
        None
    );
    let stats = phone.control().stats();
    assert!(stats.samples_sent >= 3200, "{stats:?}");
    assert!(stats.samples_received > 0, "{stats:?}");
    assert_eq!(stats.frames_dropped, 0, "{stats:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn unrouted_number_ends_the_call_as_not_found() {
    let mut config = dev_config();
    config.connectors[0].numbers = vec!["+15550001".into()];
    let server = start(config).await;
    let mut phone = SimPhone::dial(server.base_url(), "+1555", "+19990000", SampleRate::Hz8000)
        .await
        .unwrap();
    let err = phone
        .events()
        .wait_for(WAIT, |e| matches!(e, NetworkFrame::Answered { .. }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SimError::Ended {
                reason: HangupReason::NotFound
            }
        ),
        "{err:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unclaimed_call_rings_out() {
    let mut config = dev_config();
    config.ring_timeout_secs = 1;
    let server = start(config).await;
    let mut phone = SimPhone::dial(server.base_url(), "+1555", "+15550002", SampleRate::Hz16000)
        .await
        .unwrap();
    let err = phone
        .events()
        .wait_for(WAIT, |e| matches!(e, NetworkFrame::Answered { .. }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SimError::Ended {
                reason: HangupReason::NoAnswer
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        phone.control().stats().samples_sent,
        0,
        "no audio before an answer"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_number_can_be_registered_once() {
    let server = start(dev_config()).await;
    let first = SimPhone::register(server.base_url(), "+15550199", SampleRate::Hz16000)
        .await
        .unwrap();
    let err = SimPhone::register(server.base_url(), "+15550199", SampleRate::Hz16000)
        .await
        .unwrap_err();
    assert!(matches!(err, SimError::Network(_)), "{err:?}");
    // Once the first phone leaves, the number is free again.
    first.control().close();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match SimPhone::register(server.base_url(), "+15550199", SampleRate::Hz16000).await {
            Ok(_) => break,
            Err(SimError::Network(_)) if tokio::time::Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn registered_phone_answers_connect_and_hears_the_caller() {
    let server = start(dev_config()).await;
    let callee = SimPhone::register(
        server.base_url(),
        DEV_CONNECT_DESTINATION,
        SampleRate::Hz8000,
    )
    .await
    .unwrap();
    let (callee_control, mut callee_events, mut callee_audio) = callee.into_parts();
    let mut agent = control(&server, 16000, "mixed").await;
    let caller = SimPhone::dial(
        server.base_url(),
        "+15551230002",
        "+15559990002",
        SampleRate::Hz16000,
    )
    .await
    .unwrap();
    let (caller_control, mut caller_events, _caller_audio) = caller.into_parts();
    let call_in = agent.take_call().await;
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);

    let pick_up = tokio::spawn(async move {
        let incoming = callee_events
            .wait_for(WAIT, |e| matches!(e, NetworkFrame::Incoming { .. }))
            .await
            .unwrap();
        callee_control.answer().unwrap();
        (incoming, callee_control, callee_events)
    });
    let connect = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 5})))
        .await;
    assert_eq!(connect["success"], true, "{connect}");
    let (incoming, callee_control, mut callee_events) = pick_up.await.unwrap();
    let NetworkFrame::Incoming { call_id, to, .. } = incoming else {
        unreachable!()
    };
    assert_eq!(call_id, call_in["callId"].as_str().unwrap());
    assert_eq!(to, DEV_CONNECT_DESTINATION);

    // The caller's audio reaches the connected phone (resampled 16 kHz -> 8 kHz).
    caller_events
        .wait_for(WAIT, |e| matches!(e, NetworkFrame::Answered { .. }))
        .await
        .unwrap();
    caller_control.play(vec![3000; 16000]).unwrap();
    let heard = callee_audio.collect(8000, Duration::from_secs(3)).await;
    let loud = heard.iter().filter(|s| s.unsigned_abs() > 1500).count();
    assert!(
        loud > 1600,
        "callee heard {loud} loud samples of {}",
        heard.len()
    );

    // The caller hangs up: the callee's leg ends and the phone stays registered.
    caller_control.hangup().unwrap();
    let end = callee_events
        .wait_for(WAIT, |e| matches!(e, NetworkFrame::Hangup { .. }))
        .await
        .unwrap();
    assert!(matches!(end, NetworkFrame::Hangup { .. }));
    assert!(!callee_control.is_closed());
    let again = SimPhone::register(
        server.base_url(),
        DEV_CONNECT_DESTINATION,
        SampleRate::Hz8000,
    )
    .await;
    assert!(
        matches!(again, Err(SimError::Network(_))),
        "still registered"
    );
    server.shutdown().await;
}
