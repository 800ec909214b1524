//! The control connection against a scripted server: the exact frames the SDK sends, and what
//! it makes of malformed ones.

// The handshake callback signature (returning an HTTP response as the error) is tungstenite's.
#![allow(clippy::result_large_err)]

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use telcoflow::{CallState, ClientEvent, TelcoflowClient};
use telcoflow_proto::control::{CallIn, ServerFrame};
use telcoflow_proto::media::{CallEvent, MediaServerFrame};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(_) => panic!("closed"),
            _ => {}
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

#[tokio::test]
async fn auto_mode_speaks_the_reference_frames_and_survives_garbage() {
    init_tracing();
    let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let media = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("ws://{}", control.local_addr().unwrap());
    let media_url = format!("ws://{}/v1/agent/media/c1", media.local_addr().unwrap());

    let (media_open_tx, media_open_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let media_peer = tokio::spawn(async move {
        let (tcp, _) = media.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let _ = media_open_tx.send(());
        go_rx.await.unwrap();
        let err = MediaServerFrame::CallEvent(CallEvent::error(
            telcoflow_proto::ErrorCode::InternalError,
            "tts failed",
        ));
        ws.send(Message::Text(err.encode().into())).await.unwrap();
        let end = MediaServerFrame::CallEvent(CallEvent::terminated("caller"));
        ws.send(Message::Text(end.encode().into())).await.unwrap();
        let _ = ws.close(None).await;
    });

    let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
    let control_peer = tokio::spawn(async move {
        let (tcp, _) = control.accept().await.unwrap();
        let mut headers = None;
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            headers = Some(req.headers().clone());
            Ok(resp)
        })
        .await
        .unwrap();
        let headers = headers.unwrap();
        assert_eq!(headers["x-api-key"], telcoflow_server::config::DEV_API_KEY);
        assert_eq!(
            headers["x-connector-uuid"],
            telcoflow_server::config::DEV_CONNECTOR_UUID
        );
        assert!(headers.contains_key("x-sdk-version"));
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "setup", "data": {"sampleRate": 24000, "audioMode": "isolated"}})
        );
        send(&mut ws, json!({"type": "setup.done", "smWsId": "sm-1"})).await;
        // Garbage first: none of it may stop the connection.
        for text in [
            "{",
            r#"{"type":"mystery"}"#,
            r#"{"type":"response","reqId":"nobody","ok":true}"#,
            r#"{"type":"call.in","sessionId":"s0"}"#,
        ] {
            ws.send(Message::Text(text.into())).await.unwrap();
        }
        ws.send(Message::Binary(vec![1, 2, 3].into()))
            .await
            .unwrap();
        // A messaging session is left alone; a call session is claimed.
        send(&mut ws, json!({"type": "session.notify", "sessionId": "wa-1", "channel": "WA",
            "remoteAddress": "+1", "localAddress": "+2", "activity": "NEW_INCOMING_MESSAGE", "createdAt": 1})).await;
        send(&mut ws, json!({"type": "session.notify", "sessionId": "s1", "channel": "TELCO",
            "remoteAddress": "+49111", "localAddress": "+49222", "activity": "NEW_INCOMING_CALL", "createdAt": 2})).await;
        let open = next_json(&mut ws).await;
        assert_eq!(open["type"], "session.open");
        assert_eq!(open["sessionId"], "s1");
        let req_id = open["reqId"].as_str().expect("reqId").to_owned();
        send(
            &mut ws,
            json!({"type": "response", "reqId": req_id, "ok": true,
            "content": {"session": {"id": "s1"}}}),
        )
        .await;
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "session.ready", "sessionId": "s1"})
        );
        let call_in = ServerFrame::CallIn(CallIn {
            session_id: "s1".into(),
            call_id: "c1".into(),
            org_uuid: String::new(),
            from: "+49111".into(),
            to: "+49222".into(),
            url: media_url,
            token: "t".into(),
        });
        ws.send(Message::Text(call_in.encode().into()))
            .await
            .unwrap();
        // A call whose media connection cannot be opened.
        second_rx.await.unwrap();
        let unreachable = ServerFrame::CallIn(CallIn {
            session_id: "s2".into(),
            call_id: "c2".into(),
            org_uuid: String::new(),
            from: "+49111".into(),
            to: "+49222".into(),
            url: "ws://127.0.0.1:1/v1/agent/media/c2".into(),
            token: "t2".into(),
        });
        ws.send(Message::Text(unreachable.encode().into()))
            .await
            .unwrap();
        // Stay up until the client leaves.
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    });

    let config = builder(&base)
        .sample_rate(telcoflow::SampleRate::Hz24000)
        .audio_mode(telcoflow::AudioMode::Isolated)
        .build()
        .unwrap();
    let client = TelcoflowClient::connect(config).await.unwrap();
    let mut events = client.events();
    let wa = next_event(&mut events, |ev| match ev {
        ClientEvent::SessionNotification(n) => Some(n),
        _ => None,
    })
    .await;
    assert_eq!(wa.session_id, "wa-1");
    let mut media_open_rx = media_open_rx;
    let call = next_call(&mut events).await;
    // Delivered only once its media connection was open.
    assert!(media_open_rx.try_recv().is_ok());
    assert_eq!((call.id(), call.session_id()), ("c1", Some("s1")));
    assert_eq!(call.state(), CallState::Live);
    go_tx.send(()).unwrap();
    let (call_id, code, message) = next_event(&mut events, |ev| match ev {
        ClientEvent::CallError {
            call_id,
            code,
            message,
        } => Some((call_id, code, message)),
        _ => None,
    })
    .await;
    assert_eq!(call_id, "c1");
    assert_eq!(
        code.and_then(|c| c.known()),
        Some(telcoflow::ErrorCode::InternalError)
    );
    assert_eq!(message.as_deref(), Some("tts failed"));
    tokio::time::timeout(WAIT, call.terminated()).await.unwrap();
    second_tx.send(()).unwrap();
    let (call_id, code, message) = next_event(&mut events, |ev| match ev {
        ClientEvent::IncomingCall(c) => panic!("undeliverable call delivered: {c:?}"),
        ClientEvent::CallError {
            call_id,
            code,
            message,
        } => Some((call_id, code, message)),
        _ => None,
    })
    .await;
    assert_eq!((call_id.as_str(), code), ("c2", None));
    assert!(message.unwrap().contains("media connection failed"));
    client.shutdown().await;
    media_peer.await.unwrap();
    control_peer.await.unwrap();
}
