//! Pull-based flow control and media framing against a scripted media peer, where every
//! frame the SDK sends can be checked byte by byte.

// The handshake callback signature (returning an HTTP response as the error) is tungstenite's.
#![allow(clippy::result_large_err)]

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use telcoflow::{ActiveCall, CallErrorKind, CallState, Error, ErrorCode};
use telcoflow_proto::media::{BufferRequest, CommandResponse, MediaClientFrame, MediaServerFrame};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

fn call_json(url: &str) -> String {
    serde_json::json!({
        "channel": "TELCO", "id": "call-1", "caller": "+1", "callee": "+2",
        "session_url": url, "session_token": "media-token-1"
    })
    .to_string()
}

#[tokio::test]
async fn buffer_requests_are_answered_in_order_with_preferred_frames() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/v1/agent/media/call-1",
        listener.local_addr().unwrap()
    );
    let (auth_tx, auth_rx) = tokio::sync::oneshot::channel();
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let _ = auth_tx.send(auth);
            Ok(resp)
        })
        .await
        .unwrap();
        // The first command opens the connection; answer it, then ask for audio.
        let cmd = match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => match MediaClientFrame::decode(t.as_str()).unwrap() {
                MediaClientFrame::Command(c) => c,
            },
            other => panic!("{other:?}"),
        };
        assert_eq!(cmd.command, "call.answer");
        assert_eq!(cmd.timeout_ms, Some(10_000));
        let resp = MediaServerFrame::CommandResponse(CommandResponse::ok(cmd.command_id, None));
        ws.send(Message::Text(resp.encode().into())).await.unwrap();
        for (requested_bytes, prefer_audio_frame_bytes, channel_id) in
            [(2000, 0, 0), (500, 100, 1), (300, 100, 0)]
        {
            let req = MediaServerFrame::BufferRequest(BufferRequest {
                requested_bytes,
                prefer_audio_frame_bytes,
                channel_id,
            });
            ws.send(Message::Text(req.encode().into())).await.unwrap();
        }
        // Collect binary frames until the next command arrives.
        let mut frames: Vec<Vec<u8>> = Vec::new();
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(b) => frames.push(b.to_vec()),
                Message::Text(t) => {
                    let MediaClientFrame::Command(c) =
                        MediaClientFrame::decode(t.as_str()).unwrap();
                    assert_eq!(c.command, "call.disconnect");
                    let resp = MediaServerFrame::CommandResponse(CommandResponse::error(
                        c.command_id,
                        telcoflow_proto::ErrorCode::InternalError,
                        "refused for the test",
                    ));
                    ws.send(Message::Text(resp.encode().into())).await.unwrap();
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let _ = ws.close(None).await;
        frames
    });

    let config = config("ws://127.0.0.1:1");
    let call = ActiveCall::from_json(&call_json(&url), &config).unwrap();
    call.answer().await.unwrap();
    assert_eq!(
        auth_rx.await.unwrap().as_deref(),
        Some("Bearer media-token-1")
    );
    assert_eq!(call.state(), CallState::Live);
    // 2300 bytes owed on channel 0; 500 extra stay queued because channel 1 gets no audio.
    let audio: Vec<u8> = (0..2800u32).map(|i| (i % 251) as u8).collect();
    call.send_audio(&audio[..1000]).await.unwrap();
    call.send_audio(&audio[1000..]).await.unwrap();
    // Wait until the SDK has sent what was asked for.
    while call.send_audio_buffer_size() > 500 {
        tokio::task::yield_now().await;
    }
    let e = call.disconnect().await.unwrap_err();
    assert!(e.is_rejected(), "{e:?}");
    assert_eq!(e.code(), Some(ErrorCode::InternalError));
    assert_eq!(e.message(), Some("refused for the test"));
    let frames = peer.await.unwrap();
    let sizes: Vec<usize> = frames.iter().map(|f| f.len() - 1).collect();
    assert_eq!(sizes, [960, 960, 80, 100, 100, 100]);
    assert!(
        frames.iter().all(|f| f[0] == 0),
        "agent audio goes on channel 0"
    );
    let sent: Vec<u8> = frames.iter().flat_map(|f| f[1..].to_vec()).collect();
    assert_eq!(sent, audio[..2300]);
    assert_eq!(call.send_audio_buffer_size(), 500);
    tokio::time::timeout(WAIT, call.terminated()).await.unwrap();
    assert!(call.send_audio(&[0, 0]).await.unwrap_err().is_closed());
}

/// A command waiting for its answer when the media connection is lost fails with a connection
/// error: whether the server acted on it is unknown. The SDK then tries to bring the
/// connection back; when the server refuses (the call has ended meanwhile), the call ends.
#[tokio::test]
async fn a_lost_media_connection_fails_the_waiting_command() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/v1/agent/media/call-1",
        listener.local_addr().unwrap()
    );
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        // Read the command, then drop the connection without answering or a close frame.
        let _ = ws.next().await;
        drop(ws);
        let (tcp, _) = listener.accept().await.unwrap();
        let r = tokio_tungstenite::accept_hdr_async(tcp, |_: &Request, _: Response| {
            let mut resp = tokio_tungstenite::tungstenite::http::Response::new(Some(
                "the call has ended".to_owned(),
            ));
            *resp.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
            Err(resp)
        })
        .await;
        assert!(r.is_err());
    });
    let call = ActiveCall::from_json(&call_json(&url), &config("ws://127.0.0.1:1")).unwrap();
    let e = call.answer().await.unwrap_err();
    assert!(e.is_connection(), "{e:?}");
    assert!(e.message().is_some_and(|m| m.contains("lost")), "{e}");
    tokio::time::timeout(WAIT, call.terminated())
        .await
        .expect("the call ends once the connection cannot come back");
    assert_eq!(call.state(), CallState::Terminated);
    peer.await.unwrap();
}

#[tokio::test]
async fn a_refused_media_connection_leaves_the_call_new() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/v1/agent/media/call-1",
        listener.local_addr().unwrap()
    );
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let r = tokio_tungstenite::accept_hdr_async(tcp, |_: &Request, _: Response| {
            let mut resp = tokio_tungstenite::tungstenite::http::Response::new(Some(
                "media token expired".to_owned(),
            ));
            *resp.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
            Err(resp)
        })
        .await;
        assert!(r.is_err());
    });
    let call = ActiveCall::from_json(&call_json(&url), &config("ws://127.0.0.1:1")).unwrap();
    let e = call.answer().await.unwrap_err();
    assert_eq!(e.kind(), CallErrorKind::Authentication);
    assert_eq!(e.message(), Some("media token expired"));
    assert!(Error::from(e).is_authentication());
    assert_eq!(
        call.state(),
        CallState::New,
        "a hand-off or retry is still possible"
    );
    assert!(call.to_json().is_ok());
    peer.await.unwrap();
}

#[tokio::test]
async fn a_control_request_without_response_times_out() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let _setup = ws.next().await;
        let done = telcoflow_proto::control::ServerFrame::SetupDone {
            sm_ws_id: "x".into(),
        };
        ws.send(Message::Text(done.encode().into())).await.unwrap();
        // Read the session.open, never answer; keep reading so pings get pongs.
        while let Some(Ok(_)) = ws.next().await {}
    });
    let config = builder(&url)
        .request_timeout(std::time::Duration::from_millis(200))
        .session_mode(telcoflow::SessionMode::Manual)
        .build()
        .unwrap();
    let client = telcoflow::TelcoflowClient::connect(config).await.unwrap();
    let e = client.open_session("s1").await.unwrap_err();
    assert!(matches!(e, Error::RequestTimeout), "{e:?}");
    assert!(e.is_timeout());
    client.shutdown().await;
    peer.await.unwrap();
}

#[tokio::test]
async fn hostile_media_frames_do_not_break_the_call() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/v1/agent/media/call-1",
        listener.local_addr().unwrap()
    );
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let Message::Text(t) = ws.next().await.unwrap().unwrap() else {
            panic!("command")
        };
        let MediaClientFrame::Command(cmd) = MediaClientFrame::decode(t.as_str()).unwrap();
        let resp = MediaServerFrame::CommandResponse(CommandResponse::ok(cmd.command_id, None));
        ws.send(Message::Text(resp.encode().into())).await.unwrap();
        for text in [
            "not json",
            r#"{"type":"nope","data":{}}"#,
            r#"{"type":"buffer_request","data":{"requested_bytes":-1}}"#,
            r#"{"type":"command_response","data":{"command_id":"unknown","success":true}}"#,
            r#"{"type":"call_event","data":{"event":"call.dtmf","digit":5}}"#,
        ] {
            ws.send(Message::Text(text.into())).await.unwrap();
        }
        ws.send(Message::Binary(vec![7].into())).await.unwrap();
        ws.send(Message::Binary(Vec::new().into())).await.unwrap();
        let huge = MediaServerFrame::BufferRequest(BufferRequest {
            requested_bytes: u32::MAX,
            prefer_audio_frame_bytes: u32::MAX,
            channel_id: 0,
        });
        ws.send(Message::Text(huge.encode().into())).await.unwrap();
        // The audio the application queued arrives in frames no larger than its buffer.
        let Message::Binary(frame) = ws.next().await.unwrap().unwrap() else {
            panic!("audio")
        };
        let ended =
            MediaServerFrame::CallEvent(telcoflow_proto::media::CallEvent::terminated("caller"));
        ws.send(Message::Text(ended.encode().into())).await.unwrap();
        let _ = ws.close(None).await;
        frame.len()
    });
    let config = builder("ws://127.0.0.1:1")
        .buffer_size(4096)
        .build()
        .unwrap();
    let call = ActiveCall::from_json(&call_json(&url), &config).unwrap();
    let mut events = call.events();
    call.answer().await.unwrap();
    call.send_audio(&[3; 4096]).await.unwrap();
    assert_eq!(peer.await.unwrap(), 1 + 4096);
    tokio::time::timeout(WAIT, call.terminated()).await.unwrap();
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        seen.push(ev);
    }
    // The malformed key press is passed on as-is rather than guessed at.
    assert!(matches!(&seen[0], telcoflow::CallEvent::Other { name, .. } if name == "call.dtmf"));
    assert!(matches!(
        &seen[1],
        telcoflow::CallEvent::Terminated { reason: Some(r) } if r == "caller"
    ));
    assert_eq!(seen.len(), 2);
}
