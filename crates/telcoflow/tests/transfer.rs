//! `transfer` against the real server, in process, with simulated phones: the server dials the
//! target and bridges it to the caller, then the agent leaves; a target that does not answer
//! leaves the call with the agent.

mod common;

use common::*;
use futures_util::StreamExt as _;
use std::time::Duration;
use telcoflow::{
    AudioChannel, CallErrorKind, CallEvent, CallState, ErrorCode, TelcoflowClient, TransferMethod,
};
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::{Config, RunningServer};

/// The number the agent transfers to (allowed by the connector's `transfer_targets`).
const TARGET: &str = "+4900777";

async fn server() -> RunningServer {
    let mut config = Config::development();
    config.listen = ([127, 0, 0, 1], 0).into();
    config.connectors[0].transfer_targets = vec!["+49007*".into()];
    start_server_with(config).await
}

/// Waits until `phone` hears something other than silence.
async fn hears_voice(phone: &mut Phone) {
    for _ in 0..250 {
        phone.hear(phone.heard.len() + 640).await;
        if energy(&phone.heard[phone.heard.len() - 640..]) > 0 {
            return;
        }
    }
    panic!("no voice heard in 5 s");
}

#[tokio::test]
async fn a_simulated_caller_is_bridged_to_the_target_and_the_agent_leaves() {
    let server = server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (mut caller, call) = dial_and_answer(server.base_url(), &mut events).await;
    let mut call_events = call.events();
    let mut target = Phone::register(server.base_url(), TARGET).await;
    let transferring = {
        let call = call.clone();
        tokio::spawn(async move { call.transfer(TARGET).await })
    };
    target
        .wait_for(|f| matches!(f, NetworkFrame::Incoming { .. }))
        .await;
    target.control().answer().unwrap();
    let outcome = transferring.await.unwrap().expect("transferred");
    assert_eq!(outcome.method, TransferMethod::Bridge);
    assert_eq!(outcome.target, TARGET);
    assert_eq!((outcome.status, outcome.refer_status), (None, None));
    // The agent has left: its call ended as transferred.
    let reason = tokio::time::timeout(WAIT, async {
        loop {
            match call_events.next().await.expect("events until the end") {
                CallEvent::Terminated { reason } => return reason,
                _ => continue,
            }
        }
    })
    .await
    .expect("terminated in time");
    assert_eq!(reason.as_deref(), Some("transferred"));
    assert_eq!(call.state(), CallState::Terminated);
    // The caller and the target hear each other through the server.
    caller.speak(&pattern(3200, 3)).await;
    hears_voice(&mut target).await;
    target.speak(&pattern(3200, 5)).await;
    hears_voice(&mut caller).await;
    caller.hangup();
    target
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_unanswered_transfer_fails_and_the_call_stays_with_the_agent() {
    let server = server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (mut caller, call) = dial_and_answer(server.base_url(), &mut events).await;
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    let mut target = Phone::register(server.base_url(), TARGET).await;
    let e = call
        .transfer_with_ring_time(TARGET, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), CallErrorKind::Rejected, "{e}");
    assert_eq!(e.code(), Some(ErrorCode::CallUnanswered), "{e}");
    target
        .wait_for(|f| matches!(f, NetworkFrame::Incoming { .. }))
        .await;
    target
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;
    // Nobody registered there: the target cannot be reached.
    let e = call.transfer("+4900778").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::CallRejected), "{e}");
    // The call is still the agent's: the caller is heard, and hears the agent.
    assert_ne!(call.state(), CallState::Terminated);
    let spoken = pattern(3200, 7);
    caller.speak(&spoken).await;
    assert!(energy(&first_voiced(&mut audio).await) > 0);
    call.send_audio(&pattern(1600, 11)).await.unwrap();
    hears_voice(&mut caller).await;
    call.disconnect().await.unwrap();
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn bad_or_foreign_targets_are_refused() {
    let server = server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    for (target, says) in [
        ("", "needs a target"),
        ("12ab", "phone number"),
        ("sip:a b@pbx.example", "not a valid sip: URI"),
        ("tel:+4900777", "phone number"),
        (&"1".repeat(300)[..], "longer than 256"),
    ] {
        let e = call.transfer(target).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{target:?}: {e}");
        assert!(e.to_string().contains(says), "{target:?}: {e}");
    }
    // Well formed, but not a target this connector may send calls to.
    let e = call.transfer("+4412345").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
    assert!(e.to_string().contains("transfer_targets"), "{e}");
    let e = call
        .transfer_with_ring_time(TARGET, Duration::from_secs(121))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), CallErrorKind::InvalidArgument);
    assert_ne!(call.state(), CallState::Terminated);
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}
