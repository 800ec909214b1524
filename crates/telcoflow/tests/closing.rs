//! Ending a call while frames are still in flight, against a scripted media peer (a real
//! WebSocket on 127.0.0.1) that holds its last frames back until the client is idle.
//!
//! The clock starts paused: a virtual `sleep` in the test returns only once every task is
//! waiting, which is how the test knows the client had every chance to drop the connection.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use telcoflow::{ActiveCall, AudioChannel, CallEvent, CallEvents, CallState};
use telcoflow_proto::media::{self, CommandResponse, MediaClientFrame, MediaServerFrame};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// What the peer does once it has answered the ending command (`call.close` or
/// `call.disconnect`) and been told to go on.
#[derive(Clone, Copy)]
enum After {
    /// Answer the held command, send `call.terminated` ("agent"), close.
    TerminateAndClose,
    /// Send `call.terminated` ("agent") and keep the connection open forever.
    TerminateAndStayOpen,
}

/// Starts the peer and returns a call rebuilt for it. The peer answers the ending command at
/// once, holds every other command, and waits for `go` before its last frames.
async fn scripted_call(after: After, go: oneshot::Receiver<()>) -> ActiveCall {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let mut held = Vec::new();
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            let MediaClientFrame::Command(cmd) = MediaClientFrame::decode(text.as_str()).unwrap();
            if cmd.command == "call.close" || cmd.command == "call.disconnect" {
                let ok =
                    MediaServerFrame::CommandResponse(CommandResponse::ok(cmd.command_id, None));
                ws.send(Message::Text(ok.encode().into())).await.unwrap();
                break;
            }
            held.push(cmd.command_id);
        }
        go.await.unwrap();
        // The client may be gone already (that is the failure the tests look for).
        for id in held {
            let ok = MediaServerFrame::CommandResponse(CommandResponse::ok(id, None));
            let _ = ws.send(Message::Text(ok.encode().into())).await;
        }
        let ended = MediaServerFrame::CallEvent(media::CallEvent::terminated("agent"));
        let _ = ws.send(Message::Text(ended.encode().into())).await;
        match after {
            After::TerminateAndClose => {
                let _ = ws.close(None).await;
            }
            After::TerminateAndStayOpen => {
                let _kept_open = ws;
                std::future::pending::<()>().await;
            }
        }
    });
    let json = format!(
        r#"{{"channel":"TELCO","id":"c1","caller":"+1","callee":"+2","session_url":"ws://{addr}/media","session_token":"t"}}"#
    );
    let call = ActiveCall::from_json(&json, &config("ws://127.0.0.1:1")).unwrap();
    call.connect_media().await.unwrap();
    assert_eq!(call.state(), CallState::Live);
    call
}

/// Returns once every task is idle (the paused clock only moves then), and lets the clock
/// run again so that the grace period cannot race the peer's last frames.
async fn until_idle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::resume();
}

async fn all_events(events: CallEvents) -> Vec<CallEvent> {
    tokio::time::timeout(WAIT, events.collect())
        .await
        .expect("the event stream ends")
}

fn agent_terminated() -> CallEvent {
    CallEvent::Terminated {
        reason: Some("agent".into()),
    }
}

#[tokio::test(start_paused = true)]
async fn terminated_sent_after_the_disconnect_answer_still_lands() {
    let (go, go_rx) = oneshot::channel();
    let call = scripted_call(After::TerminateAndClose, go_rx).await;
    let events = call.events();
    call.disconnect().await.unwrap();
    assert_eq!(call.state(), CallState::Terminated);
    until_idle().await;
    go.send(()).unwrap();
    assert_eq!(all_events(events).await, [agent_terminated()]);
}

#[tokio::test(start_paused = true)]
async fn a_command_sent_with_close_gets_the_servers_answer() {
    let (go, go_rx) = oneshot::channel();
    let call = scripted_call(After::TerminateAndClose, go_rx).await;
    let events = call.events();
    let spying = {
        let call = call.clone();
        tokio::spawn(async move { call.spy().await })
    };
    // The spy command goes out first; the peer holds its answer.
    tokio::task::yield_now().await;
    call.close().await.unwrap();
    until_idle().await;
    go.send(()).unwrap();
    let r = spying
        .await
        .unwrap()
        .expect("the answer sent after close's still lands");
    assert_eq!(r, serde_json::Value::Null, "spy has no result");
    assert_eq!(all_events(events).await, [agent_terminated()]);
}

/// A peer that never closes holds the connection only for the short grace period (real
/// time: about two seconds).
#[tokio::test]
async fn a_peer_that_never_closes_is_dropped_after_the_grace_period() {
    let (go, go_rx) = oneshot::channel();
    let call = scripted_call(After::TerminateAndStayOpen, go_rx).await;
    let events = call.events();
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    let started = tokio::time::Instant::now();
    call.disconnect().await.unwrap();
    go.send(()).unwrap();
    assert_eq!(all_events(events).await, [agent_terminated()]);
    tokio::time::timeout(WAIT, async { while audio.next().await.is_some() {} })
        .await
        .expect("the audio stream ends once the connection is dropped");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
