//! The SDK against the real server, in process, with simulated phones as callers.

mod common;

use common::*;
use futures_util::StreamExt;
use std::time::Duration;
use telcoflow::{
    AudioChannel, CallErrorKind, CallEvent, CallState, ClientEvent, Error, ErrorCode,
    TelcoflowClient,
};
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::config::DEV_CONNECT_DESTINATION;

#[tokio::test]
async fn incoming_call_is_delivered_already_connected() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    assert_eq!(call.state(), CallState::Live);
    assert_eq!(call.caller(), "+4912345");
    assert_eq!(call.callee(), "+4900001");
    assert!(call.session_id().is_some());
    assert!(call.to_json().is_err(), "a live call cannot be handed off");
    call.answer().await.unwrap();
    let answered = phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    assert!(matches!(answered, NetworkFrame::Answered { call_id } if call_id == call.id()));
    // The caller hangs up: the call ends and its audio stream ends.
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    let mut states = call.watch_state();
    assert_eq!(states.current(), CallState::Live);
    phone.hangup();
    tokio::time::timeout(WAIT, call.terminated()).await.unwrap();
    assert_eq!(states.changed().await, Some(CallState::Terminated));
    assert_eq!(states.changed().await, None);
    tokio::time::timeout(WAIT, async { while audio.next().await.is_some() {} })
        .await
        .unwrap();
    assert!(call.answer().await.unwrap_err().is_closed());
    assert!(call.send_audio(&[0; 64]).await.unwrap_err().is_closed());
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn echo_round_trip_returns_the_same_audio() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    // Milliseconds of echo the server reports it dropped to win back a stall's delay (a
    // loaded machine can stall the whole test process for a few frames).
    let (skipped_tx, mut skipped_rx) = tokio::sync::watch::channel(0u64);
    let serving = {
        let client = client.clone();
        let skipped_tx = std::sync::Arc::new(skipped_tx);
        tokio::spawn(async move {
            client
                .serve(move |call| {
                    let skipped_tx = skipped_tx.clone();
                    async move {
                        let mut events = call.events();
                        tokio::spawn(async move {
                            while let Some(ev) = events.next().await {
                                if let CallEvent::AudioSkipped { dropped_ms, .. } = ev {
                                    skipped_tx.send_modify(|ms| *ms += dropped_ms);
                                }
                            }
                        });
                        call.answer().await.unwrap();
                        let mut audio = call.audio_stream(AudioChannel::Mixed);
                        while let Some(chunk) = audio.next().await {
                            if call.send_audio(&chunk).await.is_err() {
                                break;
                            }
                        }
                    }
                })
                .await
        })
    };
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    let spoken = pattern(16_000, 3); // one second at 16 kHz
    phone.speak(&spoken).await;
    // Wait until the whole second has come back (silence before it is fine), but for the
    // frames the server reports it dropped, for at most five seconds of audio.
    let spoken_frames: Vec<&[u8]> = spoken.chunks(640).collect();
    let voiced = |heard: &[u8]| heard.chunks(640).filter(|f| energy(f) > 0).count();
    let mut back = false;
    for _ in 0..250 {
        phone.hear(phone.heard.len() + 640).await;
        let skipped_frames = (*skipped_rx.borrow() / 20) as usize;
        if voiced(&phone.heard) == spoken_frames.len() {
            back = true;
            break;
        }
        if voiced(&phone.heard) + skipped_frames >= spoken_frames.len() {
            // What was dropped may have been silence: half a second more of the call (the
            // echo's delay is won back by now) brings whatever is still on its way.
            phone.hear(phone.heard.len() + 25 * 640).await;
            back = true;
            break;
        }
    }
    assert!(
        back,
        "the spoken second came back, but for what was reported dropped"
    );
    // Playout may insert silence where the echo was late (jitter), and may drop whole frames
    // it reports (a stall's delay won back), but every frame that comes back is intact and
    // in order.
    let voiced: Vec<&[u8]> = phone.heard.chunks(640).filter(|f| energy(f) > 0).collect();
    let mut next = 0;
    for (i, frame) in voiced.iter().enumerate() {
        let skip = spoken_frames[next..]
            .iter()
            .position(|s| s == frame)
            .unwrap_or_else(|| panic!("heard frame {i} is not what was said, or out of order"));
        next += skip + 1;
    }
    let missing_ms = (spoken_frames.len() - voiced.len()) as u64 * 20;
    // A frame missing is one the server said it dropped (what it dropped may also have been
    // silence): wait for its report.
    let reported = tokio::time::timeout(WAIT, skipped_rx.wait_for(|&ms| ms >= missing_ms))
        .await
        .is_ok();
    assert!(
        reported,
        "{missing_ms} ms missing, {} ms reported",
        *skipped_rx.borrow()
    );
    phone.hangup();
    client.shutdown().await;
    serving.await.unwrap().unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn commands_and_their_error_paths() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let mut caller = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;

    // Before answer: connect is refused by the server.
    let e = call.connect(Duration::from_secs(5)).await.unwrap_err();
    assert!(e.is_rejected(), "{e:?}");
    assert_eq!(e.kind(), CallErrorKind::Rejected);
    assert_eq!(e.code(), Some(ErrorCode::InvalidState));
    assert!(e.to_string().contains("INVALID_STATE"), "{e}");
    // It bubbles up through `?` into the client's error, code and all.
    let bubbled: Error = e.into();
    assert_eq!(bubbled.code(), Some(ErrorCode::InvalidState));
    // Ring time is validated before anything is sent.
    assert_eq!(
        call.connect(Duration::from_secs(121))
            .await
            .unwrap_err()
            .kind(),
        CallErrorKind::InvalidArgument
    );

    call.answer().await.unwrap();
    caller
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;

    // whisper / barge / spy need a connected destination.
    for r in [call.whisper().await, call.barge().await, call.spy().await] {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotConnected), "{e:?}");
    }
    // Nobody registered at the destination: rejected.
    let e = call.connect(Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::CallRejected), "{e:?}");

    // A registered destination that does not pick up: unanswered after the ring time.
    let mut callee = Phone::register(server.base_url(), DEV_CONNECT_DESTINATION).await;
    let e = call.connect(Duration::from_secs(1)).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Some(ErrorCode::CallUnanswered | ErrorCode::Timeout)
        ),
        "{e:?}"
    );
    callee
        .wait_for(|f| matches!(f, NetworkFrame::Incoming { .. }))
        .await;
    callee
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;

    // Now the destination answers.
    let connecting = {
        let call = call.clone();
        tokio::spawn(async move { call.connect(Duration::from_secs(10)).await })
    };
    callee
        .wait_for(|f| matches!(f, NetworkFrame::Incoming { .. }))
        .await;
    callee.control().answer().unwrap();
    let r = connecting.await.unwrap().unwrap();
    assert_eq!(r["destination"], DEV_CONNECT_DESTINATION, "{r:?}");
    for r in [call.whisper().await, call.barge().await, call.spy().await] {
        r.unwrap();
    }
    // close after connect: the agent leaves, caller and callee stay connected.
    call.close().await.unwrap();
    assert_eq!(call.state(), CallState::Terminated);
    call.close().await.expect("close is idempotent");
    assert!(call.answer().await.unwrap_err().is_closed());
    let spoken = pattern(3200, 9);
    caller.speak(&spoken).await;
    loop {
        callee.hear(callee.heard.len() + 640).await;
        if energy(&callee.heard[callee.heard.len() - 640..]) > 0 {
            break;
        }
    }
    caller.hangup();
    callee
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;

    // disconnect ends the call for everyone.
    let mut caller2 = Phone::dial(server.base_url(), "+4912346", "+4900001").await;
    let call2 = next_call(&mut events).await;
    call2.answer().await.unwrap();
    call2.disconnect().await.unwrap();
    assert_eq!(call2.state(), CallState::Terminated);
    caller2
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;
    assert!(call2.whisper().await.unwrap_err().is_closed());

    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn interrupt_drops_queued_audio_and_the_caller_hears_it_stop() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (mut phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    // Ten seconds of speech queued at once.
    let speech = pattern(160_000, 1);
    call.send_audio(&speech).await.unwrap();
    // The caller starts hearing it.
    loop {
        phone.hear(phone.heard.len() + 640).await;
        if energy(&phone.heard[phone.heard.len() - 640..]) > 0 {
            break;
        }
    }
    let dropped = call.clear_send_audio_buffer().await.unwrap();
    assert!(
        dropped > 100_000,
        "most of the ten seconds was still queued: {dropped}"
    );
    assert_eq!(call.send_audio_buffer_size(), 0);
    // Within a few frames in flight the caller hears silence, and it stays silent.
    let before = phone.heard.len();
    let mut silent_run = 0;
    while silent_run < 25 {
        phone.hear(phone.heard.len() + 640).await;
        let frame = &phone.heard[phone.heard.len() - 640..];
        silent_run = if energy(frame) == 0 {
            silent_run + 1
        } else {
            0
        };
        assert!(
            phone.heard.len() - before < 640 * 100,
            "still hearing audio two seconds after the interrupt"
        );
    }
    let heard_speech = phone.heard.chunks(640).filter(|f| energy(f) > 0).count();
    assert!(
        heard_speech < 250,
        "heard {heard_speech} frames of 500 queued"
    );
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_write_that_does_not_fit_fails_whole() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(
        builder(server.base_url())
            .buffer_size(4096)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let mut events = client.events();
    let phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    // Not answered: the server asks for no audio yet, so the buffer only fills.
    let e = call.send_audio(&[1; 4097]).await.unwrap_err();
    assert!(e.is_buffer_full(), "{e:?}");
    assert_eq!(
        e.to_string(),
        "outgoing audio buffer full: 4097 bytes do not fit in 4096 free bytes"
    );
    assert_eq!(
        call.send_audio_buffer_size(),
        0,
        "nothing of a failed write is kept"
    );
    call.send_audio(&[1; 3000]).await.unwrap();
    assert_eq!(
        call.send_audio(&[1; 1097]).await.unwrap_err().kind(),
        CallErrorKind::BufferFull
    );
    assert_eq!(call.send_audio_buffer_size(), 3000);
    call.send_audio(&[1; 1096]).await.unwrap();
    phone.hangup();
    tokio::time::timeout(WAIT, call.terminated()).await.unwrap();
    assert_eq!(
        call.send_audio(&[1; 2]).await.unwrap_err().kind(),
        CallErrorKind::Closed
    );
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn dtmf_arrives_as_a_call_event() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    let mut call_events = call.events();
    phone
        .control()
        .dtmf('7', Duration::from_millis(100))
        .unwrap();
    let ev = tokio::time::timeout(WAIT, call_events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev,
        telcoflow::CallEvent::Dtmf {
            digit: "7".into(),
            duration_ms: 100
        }
    );
    phone.hangup();
    // The call's figures come first, then its end.
    let ev = tokio::time::timeout(WAIT, call_events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&ev, telcoflow::CallEvent::Stats(s) if s.call_id == call.id()),
        "{ev:?}"
    );
    let ev = tokio::time::timeout(WAIT, call_events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, telcoflow::CallEvent::Terminated { .. }),
        "{ev:?}"
    );
    assert!(
        tokio::time::timeout(WAIT, call_events.next())
            .await
            .unwrap()
            .is_none()
    );
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_credentials_give_the_servers_message() {
    let server = start_server().await;
    let config = telcoflow::TelcoflowClientConfig::builder()
        .api_key("wrong-key", telcoflow_server::config::DEV_CONNECTOR_UUID)
        .base_url(server.base_url())
        .build()
        .unwrap();
    match TelcoflowClient::connect(config).await {
        Err(Error::Authentication { message }) => {
            assert!(!message.is_empty());
            assert!(
                !message.contains("wrong-key"),
                "the key is not echoed: {message}"
            );
        }
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn client_events_report_connection() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let known = client.sm_ws_id().expect("known as soon as connect returns");
    let mut events = client.events();
    let id = next_event(&mut events, |ev| match ev {
        ClientEvent::Connected { sm_ws_id } => Some(sm_ws_id),
        _ => None,
    })
    .await;
    assert_eq!(known, id);
    client.shutdown().await;
    assert!(
        tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .is_none(),
        "stream ends after shutdown"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unread_audio_overflow_is_counted_and_reported() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(
        builder(server.base_url())
            .audio_channel_capacity(4)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let mut events = client.events();
    let (mut phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    let mut call_events = call.events();
    // Ten frames and more (the phone sends silence while quiet) to a channel nobody reads
    // that holds four.
    phone.speak(&pattern(3200, 2)).await;
    let (channel, dropped) = next_event(&mut events, |ev| match ev {
        ClientEvent::AudioOverflow {
            call_id,
            channel,
            dropped,
        } if call_id == call.id() => Some((channel, dropped)),
        _ => None,
    })
    .await;
    assert_eq!(
        (channel, dropped),
        (AudioChannel::Mixed, 1),
        "reported once, at the first loss"
    );
    let ev = tokio::time::timeout(WAIT, call_events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev,
        telcoflow::CallEvent::AudioOverflow {
            channel: AudioChannel::Mixed,
            dropped: 1
        }
    );
    phone.hangup();
    tokio::time::timeout(WAIT, call.terminated()).await.unwrap();
    assert!(call.audio_dropped() >= 6, "{}", call.audio_dropped());
    // The four oldest chunks are still there, then the stream ends.
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    let mut kept = 0;
    while let Some(chunk) = tokio::time::timeout(WAIT, audio.next()).await.unwrap() {
        assert_eq!(chunk.len(), 640);
        kept += 1;
    }
    assert_eq!(kept, 4);
    client.shutdown().await;
    server.shutdown().await;
}

/// The call's events, read until the stream ends; the `Terminated` ones among them.
async fn terminations(events: telcoflow::CallEvents) -> Vec<telcoflow::CallEvent> {
    let all: Vec<telcoflow::CallEvent> = tokio::time::timeout(WAIT, events.collect())
        .await
        .expect("the event stream ends after the call");
    all.into_iter()
        .filter(|e| matches!(e, telcoflow::CallEvent::Terminated { .. }))
        .collect()
}

/// After `disconnect()` the media connection keeps reading until the server closes it, so
/// the server's own `call.terminated` (reason "agent") lands. Repeated because losing it
/// depended on timing.
#[tokio::test]
async fn disconnect_delivers_the_servers_terminated_with_its_reason() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    for i in 0..5 {
        let mut caller = Phone::dial(server.base_url(), &format!("+49123{i}"), "+4900001").await;
        let call = next_call(&mut events).await;
        let call_events = call.events();
        call.answer().await.unwrap();
        call.disconnect().await.unwrap();
        assert_eq!(call.state(), CallState::Terminated);
        assert_eq!(
            terminations(call_events).await,
            [telcoflow::CallEvent::Terminated {
                reason: Some("agent".into())
            }],
            "exactly the server's termination, with its reason"
        );
        caller
            .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
            .await;
    }
    client.shutdown().await;
    server.shutdown().await;
}

/// A command still waiting when `close()` ends the call gets the server's answer (here
/// CALL_TERMINATED for a pending `call.connect`), not `CallClosed`.
#[tokio::test]
async fn a_command_pending_during_close_gets_the_servers_answer() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let mut callee = Phone::register(server.base_url(), DEV_CONNECT_DESTINATION).await;
    for i in 0..5 {
        let _caller = Phone::dial(server.base_url(), &format!("+49123{i}"), "+4900001").await;
        let call = next_call(&mut events).await;
        let call_events = call.events();
        call.answer().await.unwrap();
        let connecting = {
            let call = call.clone();
            tokio::spawn(async move { call.connect(Duration::from_secs(30)).await })
        };
        // The destination rings: `call.connect` is pending at the server.
        callee
            .wait_for(|f| matches!(f, NetworkFrame::Incoming { .. }))
            .await;
        call.close().await.unwrap();
        let e = tokio::time::timeout(WAIT, connecting)
            .await
            .unwrap()
            .unwrap()
            .expect_err("refused");
        assert_eq!(
            e.code(),
            Some(ErrorCode::CallTerminated),
            "the server answered the pending command: {e:?}"
        );
        assert_eq!(
            terminations(call_events).await,
            [telcoflow::CallEvent::Terminated {
                reason: Some("agent".into())
            }]
        );
        callee
            .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
            .await;
    }
    client.shutdown().await;
    server.shutdown().await;
}

/// Client shutdown ends a call whose media connection is live, with the caller still on the
/// line: the media connection closes from the client's side, the call ends for the
/// application and the caller is hung up.
#[tokio::test]
async fn shutdown_ends_a_live_call_and_its_media_connection() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (mut phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    let mut call_events = call.events();
    tokio::time::timeout(WAIT, client.shutdown())
        .await
        .expect("shutdown waits for the media connection, which ends");
    assert_eq!(call.state(), CallState::Terminated);
    assert!(call.send_audio(&[0; 64]).await.unwrap_err().is_closed());
    let mut ended = false;
    while let Some(ev) = tokio::time::timeout(WAIT, call_events.next())
        .await
        .unwrap()
    {
        ended |= matches!(ev, telcoflow::CallEvent::Terminated { .. });
    }
    assert!(ended, "the call's events end with its termination");
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;
    server.shutdown().await;
}
