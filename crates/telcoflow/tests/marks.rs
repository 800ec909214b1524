//! Marks and what the caller heard, against the real server in process with a simulated
//! phone that records what it hears: each mark is reached once the phone has been played the
//! audio before it, an interrupt reports how much the phone heard (compared with the phone's
//! own recording, to one 20 ms frame) and clears the marks it drops.

mod common;

use common::*;
use futures_util::StreamExt;
use std::time::Duration;
use telcoflow::{ActiveCall, CallErrorKind, CallEvent, CallEvents, TelcoflowClient};
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::config::DEV_CONNECT_DESTINATION;
use tokio::task::JoinHandle;

/// Bytes per ms of the SDK's default 16 kHz audio, which the phone hears unresampled.
const BYTES_PER_MS: usize = 32;

/// Never-silent audio of `ms` milliseconds.
fn speech(ms: usize, seed: i16) -> Vec<u8> {
    pattern(ms * BYTES_PER_MS / 2, seed)
}

/// Milliseconds of the agent's audio in what the phone heard: its non-silent samples (the
/// agent's audio never has a zero sample; the silence between is all zeros).
fn heard_ms(pcm: &[u8]) -> usize {
    let samples = pcm
        .chunks_exact(2)
        .filter(|b| i16::from_le_bytes([b[0], b[1]]) != 0)
        .count();
    samples * 2 / BYTES_PER_MS
}

/// The phone listens in a task of its own (a phone that stops reading loses audio) until it
/// has heard `ms` of audio, agent or silence, and hands itself back.
fn listen(mut phone: Phone, ms: usize) -> JoinHandle<Phone> {
    tokio::spawn(async move {
        let until = phone.heard.len() + ms * BYTES_PER_MS;
        phone.hear(until).await;
        phone
    })
}

/// The next mark event, skipping others.
async fn next_mark(events: &mut CallEvents) -> (String, bool, Option<u64>) {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.next().await.expect("call events open") {
                CallEvent::Mark {
                    name,
                    cleared,
                    played_ms,
                    ..
                } => return (name, cleared, played_ms),
                _ => continue,
            }
        }
    })
    .await
    .expect("a mark event in time")
}

async fn answered(
    server: &telcoflow_server::RunningServer,
) -> (TelcoflowClient, Phone, ActiveCall) {
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    (client, phone, call)
}

#[tokio::test]
async fn marks_are_reached_in_order_as_the_caller_hears_the_audio_before_them() {
    let server = start_server().await;
    let (client, phone, call) = answered(&server).await;
    let mut events = call.events();
    // A mark with nothing queued is reached at once.
    call.mark("start").await.unwrap();
    assert_eq!(
        next_mark(&mut events).await,
        ("start".into(), false, Some(0))
    );
    let phone = listen(phone, 2_000);
    // Three sentences of 300, 450 and 170 ms (not whole frames), a mark after each.
    let sentences = [300, 450, 170];
    for (i, ms) in sentences.iter().enumerate() {
        call.send_audio(&speech(*ms, i as i16)).await.unwrap();
        call.mark(&format!("s{i}")).await.unwrap();
    }
    let mut total = 0;
    for (i, ms) in sentences.iter().enumerate() {
        total += ms;
        let (name, cleared, played) = next_mark(&mut events).await;
        assert_eq!((name.as_str(), cleared), (format!("s{i}").as_str(), false));
        // Counted when played, to the frame that carried the sentence's last byte.
        let played = played.expect("the server says what was heard") as usize;
        assert!(
            played >= total && played <= total + 20,
            "s{i}: {played} ms heard at its mark, {total} ms said"
        );
    }
    let phone = phone.await.unwrap();
    let heard = heard_ms(&phone.heard);
    assert!(
        heard.abs_diff(total) <= 1,
        "the phone heard {heard} ms of the {total} ms said"
    );
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_interrupt_tells_what_the_phone_heard_and_clears_the_marks_it_drops() {
    let server = start_server().await;
    let (client, phone, call) = answered(&server).await;
    let mut events = call.events();
    let phone = listen(phone, 2_000);
    // Five sentences of 400 ms, each followed by a mark: two seconds queued at once, most of
    // it waiting in the SDK's ring buffer.
    for i in 0..5 {
        if i == 1 {
            call.send_audio(&speech(100, i)).await.unwrap();
            call.mark("probe").await.unwrap();
            call.send_audio(&speech(300, i)).await.unwrap();
        } else {
            call.send_audio(&speech(400, i)).await.unwrap();
        }
        call.mark(&format!("s{i}")).await.unwrap();
    }
    let queued = 5 * 400 * BYTES_PER_MS;
    let (name, cleared, at_s0) = next_mark(&mut events).await;
    assert_eq!((name.as_str(), cleared), ("s0", false));
    // The caller talks over the agent during the second sentence, once its first 100 ms
    // have been heard.
    assert_eq!(next_mark(&mut events).await.0, "probe");
    let got = call.interrupt_since("s0").await.unwrap();
    assert_eq!(got.since_mark.as_deref(), Some("s0"));
    let at_s0 = at_s0.unwrap();
    assert_eq!(got.played_ms, got.played_total_ms - at_s0);
    assert!(
        got.played_ms >= 100 && got.played_total_ms < 800,
        "interrupted in the second sentence: {got:?}"
    );
    // Every byte is accounted for: heard, dropped by the server, or dropped here.
    let heard_bytes = got.played_total_ms as usize * BYTES_PER_MS;
    let accounted = heard_bytes + got.dropped_bytes_server as usize + got.dropped_bytes_local;
    assert!(
        accounted.abs_diff(queued) < BYTES_PER_MS,
        "{accounted} of {queued} bytes accounted for: {got:?}"
    );
    // The marks after the interruption are cleared, each reported once, in order.
    let cleared_names: Vec<String> = (1..5).map(|i| format!("s{i}")).collect();
    assert_eq!(got.cleared_marks, cleared_names);
    for want in &cleared_names {
        let (name, cleared, played) = next_mark(&mut events).await;
        assert_eq!((&name, cleared), (want, true));
        assert_eq!(played, Some(got.played_total_ms));
    }
    // What the phone recorded is what the server said was heard, to one 20 ms frame.
    let phone = phone.await.unwrap();
    let heard = heard_ms(&phone.heard) as u64;
    assert!(
        heard.abs_diff(got.played_total_ms) <= 20,
        "the phone heard {heard} ms, the interrupt said {} ms",
        got.played_total_ms
    );
    // The call goes on: a new mark after new audio is reached.
    let phone = listen(phone, 600);
    call.send_audio(&speech(100, 9)).await.unwrap();
    call.mark("after").await.unwrap();
    let (name, cleared, played) = next_mark(&mut events).await;
    assert_eq!((name.as_str(), cleared), ("after", false));
    assert!(played.unwrap() >= got.played_total_ms + 100);
    let phone = phone.await.unwrap();
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn clear_send_audio_buffer_still_returns_the_local_bytes_and_reports_marks() {
    let server = start_server().await;
    let (client, phone, call) = answered(&server).await;
    let mut events = call.events();
    let phone = listen(phone, 400);
    call.send_audio(&speech(2_000, 1)).await.unwrap();
    call.mark("end").await.unwrap();
    let dropped = call.clear_send_audio_buffer().await.unwrap();
    assert!(dropped > 0, "most of two seconds was still queued here");
    let (name, cleared, _) = next_mark(&mut events).await;
    assert_eq!((name.as_str(), cleared), ("end", true));
    // An interrupt with nothing left clears nothing and hears no more.
    let again = call.interrupt().await.unwrap();
    assert!(again.cleared_marks.is_empty());
    assert_eq!(again.dropped_bytes_local, 0);
    assert_eq!(again.played_ms, again.played_total_ms);
    let phone = phone.await.unwrap();
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn marks_are_bounded_and_names_checked() {
    let server = start_server().await;
    let (client, phone, call) = answered(&server).await;
    let mut events = call.events();
    let phone = listen(phone, 200);
    let e = call.mark("").await.unwrap_err();
    assert_eq!(e.kind(), CallErrorKind::InvalidArgument);
    let e = call.mark(&"x".repeat(129)).await.unwrap_err();
    assert_eq!(e.kind(), CallErrorKind::InvalidArgument);
    // Behind ten seconds of audio, 64 marks wait; the 65th is refused.
    call.send_audio(&speech(10_000, 2)).await.unwrap();
    for i in 0..64 {
        call.mark(&i.to_string()).await.unwrap();
    }
    let e = call.mark("65th").await.unwrap_err();
    assert_eq!(e.kind(), CallErrorKind::InvalidState, "{e}");
    let got = call.interrupt().await.unwrap();
    assert_eq!(got.cleared_marks.len(), 64);
    for i in 0..64 {
        assert_eq!(next_mark(&mut events).await.0, i.to_string());
    }
    // Room again once they are reported.
    call.mark("room").await.unwrap();
    assert_eq!(next_mark(&mut events).await.0, "room");
    let phone = phone.await.unwrap();
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn marks_outstanding_when_the_call_ends_are_reported_cleared() {
    let server = start_server().await;
    let (client, phone, call) = answered(&server).await;
    let mut events = call.events();
    call.send_audio(&speech(3_000, 3)).await.unwrap();
    call.mark("never").await.unwrap();
    phone.hangup();
    let (name, cleared, _) = next_mark(&mut events).await;
    assert_eq!((name.as_str(), cleared), ("never", true));
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn after_connect_audio_counts_as_heard_when_a_party_hears_the_agent() {
    let server = start_server().await;
    let (client, phone, call) = answered(&server).await;
    let mut events = call.events();
    let dest = Phone::register(server.base_url(), DEV_CONNECT_DESTINATION).await;
    let connecting = {
        let call = call.clone();
        tokio::spawn(async move { call.connect(Duration::from_secs(5)).await })
    };
    let mut dest = dest;
    dest.wait_for(|f| matches!(f, NetworkFrame::Incoming { .. }))
        .await;
    dest.control().answer().unwrap();
    connecting.await.unwrap().unwrap();
    let phone = listen(phone, 1_500);
    let dest = listen(dest, 1_500);
    // Heard by both (barge, the default), by nobody (spy), by the destination (whisper).
    call.send_audio(&speech(300, 4)).await.unwrap();
    call.mark("barged").await.unwrap();
    let (_, _, barged) = next_mark(&mut events).await;
    call.spy().await.unwrap();
    call.send_audio(&speech(300, 5)).await.unwrap();
    call.mark("spied").await.unwrap();
    let (name, cleared, spied) = next_mark(&mut events).await;
    assert_eq!((name.as_str(), cleared), ("spied", false));
    call.whisper().await.unwrap();
    call.send_audio(&speech(200, 6)).await.unwrap();
    call.mark("whispered").await.unwrap();
    let (_, _, whispered) = next_mark(&mut events).await;
    let barged = barged.unwrap();
    assert!((300..=320).contains(&barged), "{barged}");
    assert_eq!(spied, Some(barged), "nobody heard the spy's audio");
    let whispered = whispered.unwrap();
    assert!(
        (barged + 200..=barged + 220).contains(&whispered),
        "{barged} then {whispered}"
    );
    let (phone, dest) = (phone.await.unwrap(), dest.await.unwrap());
    // The caller heard the barge only; the destination the barge and the whisper.
    assert!(heard_ms(&phone.heard).abs_diff(300) <= 20);
    assert!(heard_ms(&dest.heard).abs_diff(500) <= 20);
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

/// A TCP proxy in front of the server whose connections can be cut (a network blip: no
/// close frame).
struct Proxy {
    cut: tokio::sync::watch::Sender<u32>,
    task: JoinHandle<()>,
}

impl Proxy {
    fn serve(listener: tokio::net::TcpListener, target: std::net::SocketAddr) -> Self {
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
        Self { cut, task }
    }

    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

#[tokio::test]
async fn each_mark_is_reported_once_across_a_lost_media_connection() {
    // Media goes through the proxy (the server's public URL); control and phone go direct.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut server_config = telcoflow_server::Config::development();
    server_config.listen = "127.0.0.1:0".parse().unwrap();
    server_config.public_url = Some(format!("ws://{}", listener.local_addr().unwrap()));
    let server = start_server_with(server_config).await;
    let proxy = Proxy::serve(listener, server.local_addr());
    let direct = format!("ws://{}", server.local_addr());
    let client = TelcoflowClient::connect(config(&direct)).await.unwrap();
    let mut client_events = client.events();
    let (phone, call) = dial_and_answer(&direct, &mut client_events).await;
    let mut events = call.events();
    let phone = listen(phone, 2_500);
    for (name, ms) in [("a", 300), ("b", 600), ("c", 300)] {
        call.send_audio(&speech(ms, 7)).await.unwrap();
        call.mark(name).await.unwrap();
    }
    assert_eq!(
        next_mark(&mut events).await,
        ("a".into(), false, Some(next_ms(300)))
    );
    proxy.cut();
    // Every mark left is reported once, in order, whatever the connection lost; the one
    // still queued here when it was lost is reached after the reconnection.
    let mut marks = Vec::new();
    let mut reconnected = false;
    let mut ended = false;
    while !ended {
        match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
            Some(CallEvent::MediaReconnected) => reconnected = true,
            Some(CallEvent::Mark { name, cleared, .. }) => {
                marks.push((name, cleared));
                if marks.len() == 2 {
                    // Nothing more may come: end the call and read to its end.
                    call.disconnect().await.unwrap();
                }
            }
            Some(CallEvent::Terminated { .. }) | None => ended = true,
            Some(_) => {}
        }
    }
    assert!(reconnected);
    let names: Vec<&str> = marks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b", "c"], "{marks:?}");
    assert_eq!(marks[1], ("c".into(), false));
    drop(phone);
    client.shutdown().await;
    proxy.task.abort();
    server.shutdown().await;
}

/// `played_ms` at a mark after `ms` of audio: the frame that carried its last byte.
fn next_ms(ms: u64) -> u64 {
    ms.div_ceil(20) * 20
}

#[tokio::test]
async fn played_ms_holds_when_the_agent_speaks_at_another_rate_than_the_phone() {
    // The agent at 24 kHz, the phone at 16 kHz: the call resamples what the phone hears.
    let server = start_server().await;
    let config = builder(server.base_url())
        .sample_rate(telcoflow::SampleRate::Hz24000)
        .build()
        .unwrap();
    let client = TelcoflowClient::connect(config).await.unwrap();
    let mut client_events = client.events();
    let (phone, call) = dial_and_answer(server.base_url(), &mut client_events).await;
    let mut events = call.events();
    let phone = listen(phone, 1_500);
    // 48 bytes per ms at 24 kHz: 300 ms, a mark, then 700 ms more.
    let at_24k = |ms: usize, seed: i16| pattern(ms * 24, seed);
    call.send_audio(&at_24k(300, 1)).await.unwrap();
    call.mark("probe").await.unwrap();
    call.send_audio(&at_24k(700, 2)).await.unwrap();
    assert_eq!(next_mark(&mut events).await.0, "probe");
    let got = call.interrupt().await.unwrap();
    assert!(
        got.played_total_ms >= 300 && got.played_total_ms < 1_000,
        "{got:?}"
    );
    let phone = phone.await.unwrap();
    // The resampler rings a sample or two into the silence around the speech: a few ms.
    let heard = heard_ms(&phone.heard) as u64;
    assert!(
        heard.abs_diff(got.played_total_ms) <= 20,
        "the phone heard {heard} ms, the interrupt said {} ms",
        got.played_total_ms
    );
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}
