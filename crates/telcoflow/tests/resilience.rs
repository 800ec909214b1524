//! Heartbeat, reconnection, hand-off between processes and worker pools.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use telcoflow::{
    AudioChannel, CallErrorKind, CallEvent, CallState, ClientEvent, Error, SessionMode,
    TelcoflowClient,
};
use telcoflow_proto::control::{ClientFrame, ServerFrame};
use telcoflow_proto::sim::NetworkFrame;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A peer that completes setup, then stops reading (so it never answers a ping).
#[tokio::test]
async fn heartbeat_detects_a_peer_that_stops_answering_pings() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel();
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let setup = ws.next().await.unwrap().unwrap();
        let frame = ClientFrame::decode(setup.to_text().unwrap()).unwrap();
        assert!(matches!(frame, ClientFrame::Setup { .. }));
        let done = ServerFrame::SetupDone {
            sm_ws_id: "fake-1".into(),
        };
        ws.send(Message::Text(done.encode().into())).await.unwrap();
        // Hold the socket open but never read again: pings go unanswered.
        let _ = stalled_tx.send(());
        let _kept_open = ws;
        tokio::time::sleep(WAIT).await;
    });
    let config = builder(&url)
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(300))
        .reconnect_delay_fn(|_| Duration::from_secs(3600))
        .build()
        .unwrap();
    let client = TelcoflowClient::connect(config).await.unwrap();
    let mut events = client.events();
    stalled_rx.await.unwrap();
    let reason = next_event(&mut events, |ev| match ev {
        ClientEvent::Disconnected { reason } => Some(reason),
        _ => None,
    })
    .await;
    assert!(reason.contains("heartbeat"), "{reason}");
    let (attempt, delay) = next_event(&mut events, |ev| match ev {
        ClientEvent::Reconnecting { attempt, delay } => Some((attempt, delay)),
        _ => None,
    })
    .await;
    assert_eq!(
        (attempt, delay),
        (1, Duration::from_secs(3600)),
        "the injected delay is used"
    );
    client.shutdown().await;
    peer.abort();
}

#[tokio::test]
async fn server_restart_mid_call_then_reconnect_and_take_the_next_call() {
    let server = start_server().await;
    let addr = server.local_addr();
    let url = server.base_url().to_owned();
    let config = builder(&url)
        .reconnect_delay_fn(|_| Duration::from_millis(50))
        .build()
        .unwrap();
    let client = TelcoflowClient::connect(config).await.unwrap();
    let mut events = client.events();
    let first_id = next_event(&mut events, |ev| match ev {
        ClientEvent::Connected { sm_ws_id } => Some(sm_ws_id),
        _ => None,
    })
    .await;
    let _phone = Phone::dial(&url, "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    call.answer().await.unwrap();

    server.shutdown().await;
    next_event(&mut events, |ev| {
        matches!(ev, ClientEvent::Disconnected { .. }).then_some(())
    })
    .await;
    tokio::time::timeout(WAIT, call.terminated())
        .await
        .expect("the call ends with its server");
    // At least one failed attempt while the server is down.
    next_event(&mut events, |ev| match ev {
        ClientEvent::Reconnecting { attempt, .. } if attempt >= 2 => Some(()),
        _ => None,
    })
    .await;

    let server = start_server_on(addr).await;
    let second_id = next_event(&mut events, |ev| match ev {
        ClientEvent::Connected { sm_ws_id } => Some(sm_ws_id),
        _ => None,
    })
    .await;
    assert_ne!(first_id, second_id);
    next_event(&mut events, |ev| {
        matches!(ev, ClientEvent::Reconnected).then_some(())
    })
    .await;

    let mut phone = Phone::dial(&url, "+4912399", "+4900001").await;
    let call = next_call(&mut events).await;
    assert_eq!(call.caller(), "+4912399");
    call.answer().await.unwrap();
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_new_call_is_handed_to_another_client_with_json() {
    let server = start_server().await;
    let front = TelcoflowClient::connect(
        builder(server.base_url())
            .auto_connect_media(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    // The worker claims nothing by itself: calls reach it only by hand-off.
    let worker = TelcoflowClient::connect(
        builder(server.base_url())
            .session_mode(SessionMode::Manual)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let mut events = front.events();
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    assert_eq!(call.state(), CallState::New);
    let json = call.to_json().unwrap();
    drop(call);

    // The other process rebuilds the call and opens the media connection itself.
    let taken = telcoflow::ActiveCall::from_json(&json, worker.config()).unwrap();
    assert_eq!(taken.state(), CallState::New);
    assert_eq!(taken.caller(), "+4912345");
    let mut audio = taken.audio_stream(AudioChannel::Mixed);
    taken.answer().await.unwrap();
    assert_eq!(taken.state(), CallState::Live);
    assert_eq!(
        taken.to_json().unwrap_err().kind(),
        CallErrorKind::InvalidState
    );
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    let spoken = pattern(640, 5);
    phone.speak(&spoken).await;
    let chunk = first_voiced(&mut audio).await;
    assert_eq!(&chunk[..], &spoken[..chunk.len()]);
    taken.disconnect().await.unwrap();
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;
    front.shutdown().await;
    worker.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn worker_pool_shares_calls_with_none_lost_or_answered_twice() {
    const CALLS: usize = 8;
    let server = start_server().await;
    let (answered_tx, mut answered_rx) = tokio::sync::mpsc::channel::<(String, usize)>(CALLS * 2);
    let mut workers = Vec::new();
    let mut serving = Vec::new();
    for w in 0..2 {
        let client = TelcoflowClient::connect(config(server.base_url()))
            .await
            .unwrap();
        let answered_tx = answered_tx.clone();
        let c = client.clone();
        serving.push(tokio::spawn(async move {
            c.serve(move |call| {
                let answered_tx = answered_tx.clone();
                async move {
                    if call.answer().await.is_ok() {
                        let _ = answered_tx.send((call.id().to_owned(), w)).await;
                    }
                    call.terminated().await;
                }
            })
            .await
        }));
        workers.push(client);
    }
    let mut phones = Vec::new();
    for i in 0..CALLS {
        phones.push(Phone::dial(server.base_url(), &format!("+49100{i}"), "+4900001").await);
    }
    let mut ids = Vec::new();
    for p in &mut phones {
        p.wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
            .await;
        ids.push(p.call_id.clone().unwrap());
    }
    let mut answered: HashMap<String, Vec<usize>> = HashMap::new();
    for _ in 0..CALLS {
        let (id, w) = tokio::time::timeout(WAIT, answered_rx.recv())
            .await
            .unwrap()
            .unwrap();
        answered.entry(id).or_default().push(w);
    }
    assert_eq!(answered.len(), CALLS, "every call answered: {answered:?}");
    for id in &ids {
        assert_eq!(answered[id].len(), 1, "call {id} answered once");
    }
    for p in &mut phones {
        p.hangup();
    }
    for w in &workers {
        w.shutdown().await;
    }
    for s in serving {
        s.await.unwrap().unwrap();
    }
    // Nothing was answered twice after the count above either.
    drop(answered_tx);
    assert!(answered_rx.recv().await.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn manual_mode_claims_and_session_busy_is_an_outcome() {
    let server = start_server().await;
    let manual = || {
        builder(server.base_url())
            .session_mode(SessionMode::Manual)
            .build()
            .unwrap()
    };
    let a = TelcoflowClient::connect(manual()).await.unwrap();
    let b = TelcoflowClient::connect(manual()).await.unwrap();
    let mut ea = a.events();
    let mut eb = b.events();
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let na = next_event(&mut ea, |ev| match ev {
        ClientEvent::SessionNotification(n) => Some(n),
        _ => None,
    })
    .await;
    let nb = next_event(&mut eb, |ev| match ev {
        ClientEvent::SessionNotification(n) => Some(n),
        _ => None,
    })
    .await;
    assert_eq!(na.session_id, nb.session_id);
    assert_eq!(na.remote_address, "+4912345");
    let info = a.open_session(&na.session_id).await.unwrap();
    assert_eq!(info.id, na.session_id);
    match b.open_session(&nb.session_id).await {
        Err(Error::SessionBusy { bound_sm_ws_id }) => {
            assert_eq!(Some(bound_sm_ws_id), a.sm_ws_id());
        }
        other => panic!("{other:?}"),
    }
    a.ready(&na.session_id).await.unwrap();
    let call = next_call(&mut ea).await;
    assert_eq!(call.session_id(), Some(na.session_id.as_str()));
    call.answer().await.unwrap();
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    phone.hangup();
    let closed = next_event(&mut ea, |ev| match ev {
        ClientEvent::SessionClosed { session_id, .. } => Some(session_id),
        _ => None,
    })
    .await;
    assert_eq!(closed, na.session_id);
    a.shutdown().await;
    b.shutdown().await;
    server.shutdown().await;
}

/// A TCP proxy in front of the server whose connections can be cut.
struct Proxy {
    url: String,
    cut: tokio::sync::watch::Sender<u32>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), target)
    }

    /// Proxies connections accepted on `listener` to `target`.
    fn serve(listener: TcpListener, target: std::net::SocketAddr) -> Self {
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let (cut, cut_rx) = tokio::sync::watch::channel(0u32);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                let mut cut_rx = cut_rx.clone();
                cut_rx.mark_unchanged();
                conns.spawn(async move {
                    let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self { url, cut, task }
    }

    /// Drops every connection open through the proxy.
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// A media connection that drops (a network blip: no close frame) comes back on its own. The
/// call stays live, the application hears `MediaReconnected`, and audio goes both ways again.
#[tokio::test]
async fn a_lost_media_connection_comes_back_and_the_call_goes_on() {
    init_tracing();
    // Media connections go through the proxy (it is the server's public URL); the control
    // connection and the phone go straight to the server.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut server_config = telcoflow_server::Config::development();
    server_config.listen = "127.0.0.1:0".parse().unwrap();
    server_config.public_url = Some(format!("ws://{}", listener.local_addr().unwrap()));
    let server = telcoflow_server::Server::start(server_config)
        .await
        .unwrap();
    let proxy = Proxy::serve(listener, server.local_addr());
    // The server's own address, not its public URL (which is the proxy's).
    let direct = format!("ws://{}", server.local_addr());
    let client = TelcoflowClient::connect(config(&direct)).await.unwrap();
    let mut events = client.events();
    let (mut phone, call) = dial_and_answer(&direct, &mut events).await;
    let mut call_events = call.events();
    let mut audio = call.audio_stream(AudioChannel::Mixed);

    proxy.cut();
    loop {
        match tokio::time::timeout(WAIT, call_events.next())
            .await
            .unwrap()
        {
            Some(CallEvent::MediaReconnected) => break,
            Some(CallEvent::Terminated { reason }) => panic!("the call ended: {reason:?}"),
            Some(_) => {}
            None => panic!("the call's events ended"),
        }
    }
    assert_eq!(call.state(), CallState::Live);
    // The caller's speech reaches the agent...
    let spoken = pattern(640, 11);
    phone.speak(&spoken).await;
    let chunk = first_voiced(&mut audio).await;
    assert_eq!(&chunk[..], &spoken[..chunk.len()]);
    // ...and the agent's reaches the caller.
    let said = pattern(3200, 5);
    call.send_audio(&said).await.unwrap();
    loop {
        phone.hear(phone.heard.len() + 640).await;
        if contains(&phone.heard, &said[said.len() - 640..]) {
            break;
        }
    }
    call.disconnect().await.unwrap();
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;
    client.shutdown().await;
    proxy.task.abort();
    server.shutdown().await;
}

#[tokio::test]
async fn a_live_call_keeps_running_while_the_control_connection_reconnects() {
    let server = start_server().await;
    let proxy = Proxy::start(server.local_addr()).await;
    // Control goes through the proxy; media URLs from call.in point at the server itself.
    let config = builder(&proxy.url)
        .reconnect_delay_fn(|_| Duration::from_millis(20))
        .build()
        .unwrap();
    let client = TelcoflowClient::connect(config).await.unwrap();
    let mut events = client.events();
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    call.answer().await.unwrap();
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;

    proxy.cut();
    next_event(&mut events, |ev| {
        matches!(ev, ClientEvent::Disconnected { .. }).then_some(())
    })
    .await;
    next_event(&mut events, |ev| {
        matches!(ev, ClientEvent::Reconnected).then_some(())
    })
    .await;

    // The call did not notice: commands and audio still work.
    assert_eq!(call.state(), CallState::Live);
    let spoken = pattern(640, 11);
    phone.speak(&spoken).await;
    let chunk = first_voiced(&mut audio).await;
    assert_eq!(&chunk[..], &spoken[..chunk.len()]);
    call.disconnect().await.unwrap();
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Hangup { .. }))
        .await;
    client.shutdown().await;
    proxy.task.abort();
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_calls_that_never_opened_media() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(
        builder(server.base_url())
            .auto_connect_media(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let mut events = client.events();
    let _phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    assert_eq!(call.state(), CallState::New);
    let waiting = {
        let call = call.clone();
        tokio::spawn(async move { call.terminated().await })
    };
    client.shutdown().await;
    tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(call.state(), CallState::Terminated);
    assert!(call.answer().await.unwrap_err().is_closed());
    server.shutdown().await;
}

/// Accepts TCP connections and never answers on them (no TLS, no HTTP upgrade). Every
/// accepted socket is kept open and its arrival reported on the returned channel.
async fn stalling_listener() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            kept.push(tcp);
            let _ = tx.try_send(());
        }
    });
    (addr, rx, task)
}

fn assert_connect_timeout(e: &Error) {
    match e {
        Error::Connection { message, .. } => {
            assert!(message.contains("timed out"), "{message}");
        }
        other => panic!("expected a connection timeout, got {other:?}"),
    }
}

/// A peer that accepts TCP but never completes the upgrade fails the first connection
/// attempt after `connect_timeout` instead of holding it forever.
#[tokio::test]
async fn connect_times_out_on_a_peer_that_stalls_the_upgrade() {
    init_tracing();
    let (addr, mut accepted, peer) = stalling_listener().await;
    let config = builder(&format!("ws://{addr}"))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let e = tokio::time::timeout(WAIT, TelcoflowClient::connect(config))
        .await
        .expect("connect gives up by itself")
        .unwrap_err();
    assert_connect_timeout(&e);
    tokio::time::timeout(WAIT, accepted.recv())
        .await
        .expect("the peer accepted the TCP connection");
    peer.abort();
}

/// After losing the control connection, a reconnection attempt to a stalling peer times out
/// and the driver goes on with the next attempt.
#[tokio::test]
async fn control_driver_retries_after_a_stalled_reconnection() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(16);
    let peer = tokio::spawn(async move {
        // First connection: complete setup, then drop it.
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let _setup = ws.next().await.unwrap().unwrap();
        let done = ServerFrame::SetupDone {
            sm_ws_id: "fake-1".into(),
        };
        ws.send(Message::Text(done.encode().into())).await.unwrap();
        drop(ws);
        // Later connections: accept and never answer.
        let mut kept = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            kept.push(tcp);
            let _ = accepted_tx.try_send(());
        }
    });
    let config = builder(&url)
        .connect_timeout(Duration::from_millis(200))
        .reconnect_delay_fn(|_| Duration::from_millis(1))
        .build()
        .unwrap();
    let client = TelcoflowClient::connect(config).await.unwrap();
    let mut events = client.events();
    next_event(&mut events, |ev| {
        matches!(ev, ClientEvent::Disconnected { .. }).then_some(())
    })
    .await;
    // Attempt 1 reaches the stalling peer; only its timeout lets attempt 2 start.
    let attempt = next_event(&mut events, |ev| match ev {
        ClientEvent::Reconnecting { attempt, .. } if attempt >= 2 => Some(attempt),
        _ => None,
    })
    .await;
    assert_eq!(attempt, 2);
    tokio::time::timeout(WAIT, accepted.recv())
        .await
        .expect("attempt 1 reached the peer");
    client.shutdown().await;
    peer.abort();
}

/// Opening a call's media connection against a stalling peer fails with a timeout and
/// leaves the call in NEW (not stuck in OPENING).
#[tokio::test]
async fn media_open_times_out_and_the_call_returns_to_new() {
    init_tracing();
    let (addr, mut accepted, peer) = stalling_listener().await;
    let config = builder("ws://127.0.0.1:1")
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let json = format!(
        r#"{{"channel":"TELCO","id":"c1","caller":"+1","callee":"+2","session_url":"ws://{addr}/media","session_token":"t"}}"#
    );
    let call = telcoflow::ActiveCall::from_json(&json, &config).unwrap();
    let e = tokio::time::timeout(WAIT, call.connect_media())
        .await
        .expect("opening gives up by itself")
        .unwrap_err();
    assert!(e.is_connection(), "{e:?}");
    assert!(e.message().is_some_and(|m| m.contains("timed out")), "{e}");
    assert_eq!(call.state(), CallState::New);
    tokio::time::timeout(WAIT, accepted.recv())
        .await
        .expect("the peer accepted the TCP connection");
    peer.abort();
}

/// A loopback address on which nothing listens: connections to it are refused.
fn dead_url() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("ws://{}", probe.local_addr().unwrap())
}

#[tokio::test]
async fn connect_tries_the_base_urls_in_turn() {
    let server = start_server().await;
    let live = server.base_url().to_owned();
    let config = builder(&live)
        .base_urls([dead_url(), live.clone()])
        .build()
        .unwrap();
    let client = TelcoflowClient::connect(config).await.unwrap();
    assert_eq!(client.connected_base_url().as_deref(), Some(live.as_str()));
    let mut events = client.events();
    dial_and_answer(&live, &mut events).await;
    client.shutdown().await;

    // None answers: the first connection fails, as with one URL.
    let config = builder(&live)
        .base_urls([dead_url(), dead_url()])
        .build()
        .unwrap();
    let e = TelcoflowClient::connect(config).await.unwrap_err();
    assert!(!e.is_authentication(), "{e}");
    server.shutdown().await;
}

/// The control connection's events until it is up again after a loss: the base URL it went
/// to, and the largest reconnection attempt number seen before.
async fn reconnected(
    client: &TelcoflowClient,
    events: &mut telcoflow::ClientEvents,
) -> (String, u32) {
    next_event(events, |ev| {
        matches!(ev, ClientEvent::Disconnected { .. }).then_some(())
    })
    .await;
    let mut attempts = 0;
    next_event(events, |ev| match ev {
        ClientEvent::Reconnecting { attempt, .. } => {
            attempts = attempts.max(attempt);
            None
        }
        ClientEvent::Connected { .. } => Some(()),
        _ => None,
    })
    .await;
    (client.connected_base_url().unwrap(), attempts)
}

#[tokio::test]
async fn reconnection_moves_to_the_next_base_url_when_its_node_goes_away() {
    let a = start_server().await;
    let b = start_server().await;
    let c = start_server().await;
    let urls = [a.base_url(), b.base_url(), c.base_url()].map(str::to_owned);
    let addr_a = a.local_addr();
    let config = builder(&urls[0])
        .base_urls(urls.clone())
        .reconnect_delay_fn(|_| Duration::from_millis(50))
        .build()
        .unwrap();
    let client = TelcoflowClient::connect(config).await.unwrap();
    let mut events = client.events();
    assert_eq!(client.connected_base_url().as_ref(), Some(&urls[0]));

    // Node A goes away: the first reconnection attempt reaches node B, which takes calls.
    a.shutdown().await;
    assert_eq!(
        reconnected(&client, &mut events).await,
        (urls[1].clone(), 1)
    );
    dial_and_answer(&urls[1], &mut events).await;

    // Node A is back; node B goes away: the client goes on to node C, the one after B,
    // rather than back to the start of the list.
    let a = start_server_on(addr_a).await;
    b.shutdown().await;
    assert_eq!(
        reconnected(&client, &mut events).await,
        (urls[2].clone(), 1)
    );
    dial_and_answer(&urls[2], &mut events).await;

    // Node C goes away: the client wraps around to node A.
    c.shutdown().await;
    assert_eq!(
        reconnected(&client, &mut events).await,
        (urls[0].clone(), 1)
    );
    dial_and_answer(&urls[0], &mut events).await;
    client.shutdown().await;
    a.shutdown().await;
}
