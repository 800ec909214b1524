//! Outbound calls (`create_session`) and the HTTP session API (`list_sessions`,
//! `close_session`) against the real server, with simulated phones.

mod common;

use common::{
    Phone, WAIT, builder, config, contains, first_voiced, next_call, next_event, pattern,
    start_server, start_server_on,
};
use futures_util::{FutureExt, StreamExt};
use std::time::Duration;
use telcoflow::{
    AudioChannel, CallFlow, CallState, ClientEvent, CloseReason, Error, ErrorCode, InboundCalls,
    SessionMode, SessionQuery, SessionState, TelcoflowClient,
};
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

#[tokio::test]
async fn list_sessions_pages_through_open_sessions_and_close_session_ends_one() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut phones = Vec::new();
    let mut calls = Vec::new();
    for i in 0..3 {
        let number = format!("+491800{i}");
        phones.push(Phone::register(server.base_url(), &number).await);
        calls.push(client.create_session(&number).await.unwrap());
    }
    let created: Vec<String> = calls
        .iter()
        .map(|c| c.session_id().unwrap().to_owned())
        .collect();

    // Two pages of two: all three, oldest first, then no next page.
    let first = client
        .list_sessions(&SessionQuery::open().limit(2))
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.next_offset, Some(2));
    let second = client
        .list_sessions(&SessionQuery::open().limit(2).offset(2))
        .await
        .unwrap();
    assert_eq!(second.next_offset, None);
    // Sessions opened in the same millisecond may come in any order: compared as sets, and
    // the pages do not overlap.
    let mut listed: Vec<String> = first
        .items
        .iter()
        .chain(&second.items)
        .map(|s| s.id.clone())
        .collect();
    listed.sort();
    let mut expected = created.clone();
    expected.sort();
    assert_eq!(listed, expected);
    // Filtered on the far party (a `+` in the query survives).
    let one = client
        .list_sessions(&SessionQuery::open().remote_address("+4918001"))
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    assert_eq!(one.items[0].id, created[1]);
    // A bad page size is the server's typed error.
    let e = client
        .list_sessions(&SessionQuery::default().limit(0))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::RequestFailed { code, .. } if *code == ErrorCode::InvalidRequest),
        "{e:?}"
    );

    // Closing our own session ends its call, and it is no longer listed as open.
    let closed = client.close_session(&created[0]).await.unwrap();
    assert_eq!(closed.reason, CloseReason::SdkRequest);
    assert!(closed.closed_at > 0);
    tokio::time::timeout(WAIT, calls[0].terminated())
        .await
        .expect("the closed session's call ends");
    let open = client.list_sessions(&SessionQuery::open()).await.unwrap();
    let mut still_open: Vec<String> = open.items.iter().map(|s| s.id.clone()).collect();
    still_open.sort();
    let mut expected = created[1..].to_vec();
    expected.sort();
    assert_eq!(still_open, expected);
    let ended = client
        .list_sessions(&SessionQuery::default().state(SessionState::Closed))
        .await
        .unwrap();
    assert_eq!(ended.items.len(), 1);
    assert_eq!(ended.items[0].id, created[0]);

    // Unknown (and already closed) sessions: the typed not-found error.
    for id in ["no-such-session", created[0].as_str()] {
        let e = client.close_session(id).await.unwrap_err();
        assert!(
            matches!(&e, Error::RequestFailed { code, .. } if *code == ErrorCode::SessionNotFound),
            "{id}: {e:?}"
        );
    }
    client.shutdown().await;
    server.shutdown().await;
}

/// Fails if an inbound call was offered to `client`. Offers go to every connection at once:
/// one queued for this connection would arrive before the answer to this later request
/// (in manual mode, notifications are delivered as they are read).
async fn assert_no_offer(client: &TelcoflowClient, events: &mut telcoflow::ClientEvents) {
    let e = client.open_session("no-such-session").await.unwrap_err();
    assert!(matches!(e, Error::RequestFailed { .. }), "{e:?}");
    while let Some(Some(ev)) = events.next().now_or_never() {
        assert!(
            !matches!(
                ev,
                ClientEvent::SessionNotification(_) | ClientEvent::IncomingCall(_)
            ),
            "offered although its call flow says no inbound calls: {ev:?}"
        );
    }
}

#[tokio::test]
async fn setup_call_flow_stops_inbound_offers_also_after_a_reconnection() {
    let server = start_server().await;
    let addr = server.local_addr();
    let url = server.base_url().to_owned();
    let fast = |b: telcoflow::TelcoflowClientConfigBuilder| {
        b.reconnect_delay_fn(|_| Duration::from_millis(50))
            .build()
            .unwrap()
    };
    let dialer = TelcoflowClient::connect(fast(builder(&url).session_mode(SessionMode::Manual)))
        .await
        .unwrap();
    let mut dialer_events = dialer.events();
    dialer
        .setup_call_flow(
            &CallFlow::new()
                .inbound_call(InboundCalls::No)
                .outbound_call(true),
        )
        .await
        .unwrap();
    let agent = TelcoflowClient::connect(fast(builder(&url))).await.unwrap();
    let mut agent_events = agent.events();

    let phone = Phone::dial(&url, "+4912345", "+4900001").await;
    let call = next_call(&mut agent_events).await;
    assert_no_offer(&dialer, &mut dialer_events).await;
    drop(call);
    drop(phone);

    // A new server knows nothing of the flow: the client sends it again.
    server.shutdown().await;
    let server = start_server_on(addr).await;
    for events in [&mut dialer_events, &mut agent_events] {
        next_event(events, |ev| {
            matches!(ev, ClientEvent::Reconnected).then_some(())
        })
        .await;
    }
    let _phone = Phone::dial(&url, "+4912346", "+4900001").await;
    let call = next_call(&mut agent_events).await;
    assert_eq!(call.caller(), "+4912346");
    assert_no_offer(&dialer, &mut dialer_events).await;

    // Inbound calls back on: the dialer is offered calls again.
    dialer
        .setup_call_flow(&CallFlow::new().inbound_call(InboundCalls::All))
        .await
        .unwrap();
    let _phone2 = Phone::dial(&url, "+4912347", "+4900001").await;
    let offered = next_event(&mut dialer_events, |ev| match ev {
        ClientEvent::SessionNotification(n) => Some(n),
        _ => None,
    })
    .await;
    assert_eq!(offered.remote_address, "+4912347");
    dialer.shutdown().await;
    agent.shutdown().await;
    server.shutdown().await;
}
