//! Outbound calls (`create_session`) and the HTTP session API (`list_sessions`,
//! `close_session`) against the real server, with simulated phones.

mod common;

use common::{Phone, WAIT, config, contains, first_voiced, pattern, start_server};
use telcoflow::{AudioChannel, CallState, Error, ErrorCode, TelcoflowClient};
use telcoflow_proto::sim::NetworkFrame;

#[tokio::test]
async fn create_session_calls_a_phone_that_answers_talks_and_hangs_up() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut far = Phone::register(server.base_url(), "+4917001").await;
    let call = client.create_session("+4917001").await.unwrap();
    assert_eq!(call.state(), CallState::Live);
    assert_eq!(call.callee(), "+4917001");

    // Creating it again while it is open: a typed error naming the session.
    let again = client.create_session("+4917001").await.unwrap_err();
    match again {
        Error::SessionExists { session_id } => {
            assert_eq!(Some(session_id.as_str()), call.session_id());
        }
        other => panic!("expected SessionExists, got {other:?}"),
    }

    // `answer` waits for the far end to pick up.
    let answering = {
        let call = call.clone();
        tokio::spawn(async move { call.answer().await })
    };
    far.wait_for(|f| matches!(f, NetworkFrame::Incoming { .. }))
        .await;
    far.control().answer().unwrap();
    tokio::time::timeout(WAIT, answering)
        .await
        .unwrap()
        .unwrap()
        .expect("answered");

    // Audio flows both ways.
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    let said = pattern(1600, 7);
    far.speak(&said).await;
    assert!(common::energy(&first_voiced(&mut audio).await) > 0);
    let sent = pattern(3200, 3);
    call.send_audio(&sent).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            far.hear(far.heard.len() + 640).await;
            if contains(&far.heard, &sent[..640]) {
                break;
            }
        }
    })
    .await
    .expect("the phone hears the app");

    far.hangup();
    tokio::time::timeout(WAIT, call.terminated())
        .await
        .expect("call ends when the phone hangs up");
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn create_session_to_an_unknown_number_is_a_typed_error() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let e = client.create_session("+4917999").await.unwrap_err();
    match &e {
        Error::RequestFailed { code, .. } => assert_eq!(*code, ErrorCode::NoRoute, "{e}"),
        other => panic!("expected RequestFailed, got {other:?}"),
    }
    client.shutdown().await;
    server.shutdown().await;
}
