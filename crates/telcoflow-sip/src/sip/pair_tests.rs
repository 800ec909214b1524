//! Pair tests: our user agent client and server wired back to back in memory, with a fake
//! clock and a network that can drop chosen messages (quinn's `Pair`, str0m's `progress`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Transport;
use super::message::Message;
use super::sdp::LocalMedia;
use super::transaction::Timers;
use super::uac::{OutgoingCall, UacConfig, UacEvent};
use super::uas::{CallHandle, Uas, UasAction, UasConfig, UasEvent};
use crate::rtp::codec::Codec;

const UAC_ADDR: &str = "192.0.2.10:5060";
const UAS_ADDR: &str = "192.0.2.20:5060";

/// Summary of a message on the wire, for drop rules and assertions.
fn describe(payload: &[u8]) -> String {
    match Message::parse(payload) {
        Ok(Message::Request(r)) => r.method.to_string(),
        Ok(Message::Response(r)) => {
            let method = super::message::SipHeaders::cseq(&r)
                .map(|c| c.method.to_string())
                .unwrap_or_default();
            format!("{} {method}", r.status)
        }
        Err(_) => "garbage".into(),
    }
}

struct Pair {
    uac: OutgoingCall,
    uas: Uas,
    now: Instant,
    start: Instant,
    /// Messages matching this (by description) are dropped, `drops` times.
    drop_rule: Option<(String, usize)>,
    /// Everything that crossed the wire: (ms, direction, description).
    wire: Vec<(u64, &'static str, String)>,
    uac_events: Vec<UacEvent>,
    uas_events: Vec<UasEvent>,
    /// Every payload that crossed the wire, in order.
    payloads: Vec<Vec<u8>>,
}

impl Pair {
    fn new() -> Self {
        Self::asking_for_a_session(None)
    }

    /// A pair whose caller asks for a session timer of `session_expires`.
    fn asking_for_a_session(session_expires: Option<Duration>) -> Self {
        let now = Instant::now();
        let uac = OutgoingCall::new(
            UacConfig {
                target: "sip:+15550100@192.0.2.20".into(),
                destination: UAS_ADDR.parse().unwrap(),
                transport: Transport::Udp,
                from: "sip:+15550199@192.0.2.10".into(),
                contact: format!("sip:caller@{UAC_ADDR}"),
                sent_by: UAC_ADDR.into(),
                credentials: None,
                timers: Timers::default(),
                user_agent: "caller".into(),
                delayed_offer: false,
                session_expires,
            },
            LocalMedia::new("192.0.2.10".parse().unwrap(), 20000, 1),
            11,
            now,
        );
        let uas = Uas::new(
            UasConfig {
                contact: format!("sip:telcoflow@{UAS_ADDR}"),
                sent_by: UAS_ADDR.into(),
                timers: Timers::default(),
                user_agent: "telcoflow".into(),
                codecs: Codec::ALL.to_vec(),
            },
            12,
        );
        Self {
            uac,
            uas,
            now,
            start: now,
            drop_rule: None,
            wire: Vec::new(),
            uac_events: Vec::new(),
            uas_events: Vec::new(),
            payloads: Vec::new(),
        }
    }

    fn dropped(&mut self, what: &str) -> bool {
        match &mut self.drop_rule {
            Some((rule, n)) if *n > 0 && rule == what => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Delivers messages both ways until both sides are quiet at the current time.
    fn progress(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.uac.poll_transmit() {
                moved = true;
                let what = describe(&t.payload);
                let ms = (self.now - self.start).as_millis() as u64;
                self.payloads.push(t.payload.clone());
                if self.dropped(&what) {
                    self.wire.push((ms, "uac->uas dropped", what));
                    continue;
                }
                self.wire.push((ms, "uac->uas", what));
                let from: SocketAddr = UAC_ADDR.parse().unwrap();
                self.uas
                    .handle_input(Transport::Udp, from, &t.payload, self.now);
            }
            while let Some(t) = self.uas.poll_transmit() {
                moved = true;
                assert_eq!(t.destination, UAC_ADDR.parse().unwrap());
                let what = describe(&t.payload);
                let ms = (self.now - self.start).as_millis() as u64;
                self.payloads.push(t.payload.clone());
                if self.dropped(&what) {
                    self.wire.push((ms, "uas->uac dropped", what));
                    continue;
                }
                self.wire.push((ms, "uas->uac", what));
                self.uac.handle_input(&t.payload, self.now);
            }
            while let Some(e) = self.uac.poll_event() {
                moved = true;
                self.uac_events.push(e);
            }
            while let Some(e) = self.uas.poll_event() {
                moved = true;
                self.uas_events.push(e);
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs timers and deliveries until `ms` after the start.
    fn run_until(&mut self, ms: u64) {
        self.progress();
        let until = self.start + Duration::from_millis(ms);
        loop {
            let next = [self.uac.poll_timeout(), self.uas.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(at) if at <= until => {
                    self.now = at;
                    self.uac.handle_timeout(at);
                    self.uas.handle_timeout(at);
                    self.progress();
                }
                _ => break,
            }
        }
        self.now = until;
    }

    fn incoming_call(&mut self) -> CallHandle {
        self.progress();
        match self.uas_events.as_slice() {
            [UasEvent::IncomingCall(ic)] => ic.call,
            other => panic!("{other:?}"),
        }
    }

    fn answer(&mut self, call: CallHandle) {
        let media = LocalMedia::new("192.0.2.20".parse().unwrap(), 30000, 2);
        self.uas
            .handle_action(call, UasAction::Answer { media }, self.now)
            .unwrap();
        self.progress();
    }

    fn wire_of(&self, what: &str) -> Vec<u64> {
        self.wire
            .iter()
            .filter(|(_, dir, w)| w == what && !dir.ends_with("dropped"))
            .map(|(t, _, _)| *t)
            .collect()
    }
}

#[test]
fn call_answer_and_caller_hangs_up() {
    let mut p = Pair::new();
    let call = p.incoming_call();
    p.uas
        .handle_action(call, UasAction::Ringing, p.now)
        .unwrap();
    p.answer(call);
    let [
        UacEvent::Progress { status: 180 },
        UacEvent::Answered { negotiated },
    ] = p.uac_events.as_slice()
    else {
        panic!("{:?}", p.uac_events);
    };
    assert_eq!(negotiated.codec, Codec::Pcmu);
    assert_eq!(negotiated.remote, "192.0.2.20:30000".parse().unwrap());
    assert!(matches!(p.uas_events.last(), Some(UasEvent::Ack { call: c }) if *c == call));
    p.uac.hangup(p.now);
    p.progress();
    assert_eq!(p.uac_events.last(), Some(&UacEvent::HungUp));
    assert_eq!(p.uas_events.last(), Some(&UasEvent::Bye { call }));
    p.run_until(40_000);
    assert!(p.uac.is_finished());
    assert_eq!(p.uas.call_count(), 0);
    assert_eq!(p.uas.poll_timeout(), None);
}

#[test]
fn server_hangs_up() {
    let mut p = Pair::new();
    let call = p.incoming_call();
    p.answer(call);
    p.uas.handle_action(call, UasAction::Hangup, p.now).unwrap();
    p.progress();
    assert_eq!(p.uac_events.last(), Some(&UacEvent::RemoteHangup));
    assert_eq!(p.uas.call_count(), 0);
    p.run_until(40_000);
    assert!(p.uac.is_finished());
}

#[test]
fn lost_acks_are_recovered_by_200_retransmission() {
    let mut p = Pair::new();
    p.drop_rule = Some(("ACK".into(), 2));
    let call = p.incoming_call();
    p.answer(call);
    assert!(
        !p.uas_events
            .iter()
            .any(|e| matches!(e, UasEvent::Ack { .. }))
    );
    p.run_until(5_000);
    // The 200 went out at 0, then again at 500 and 1500 ms; the third ACK got through.
    assert_eq!(p.wire_of("200 INVITE"), vec![0, 500, 1500]);
    assert!(
        p.uas_events
            .iter()
            .any(|e| matches!(e, UasEvent::Ack { .. }))
    );
    // One Answered event despite three 200s.
    let answered = p
        .uac_events
        .iter()
        .filter(|e| matches!(e, UacEvent::Answered { .. }))
        .count();
    assert_eq!(answered, 1);
}

#[test]
fn caller_cancels_while_ringing() {
    let mut p = Pair::new();
    let call = p.incoming_call();
    p.uas
        .handle_action(call, UasAction::Ringing, p.now)
        .unwrap();
    p.progress();
    p.uac.cancel(p.now);
    p.progress();
    assert!(p.uas_events.contains(&UasEvent::Cancelled { call }));
    assert!(matches!(
        p.uac_events.last(),
        Some(UacEvent::Failed { status: 487, .. })
    ));
    assert_eq!(p.wire_of("200 CANCEL").len(), 1);
    p.run_until(40_000);
    assert!(p.uac.is_finished());
    assert_eq!(p.uas.call_count(), 0);
    // The 487 was ACKed, so it was sent once only.
    assert_eq!(p.wire_of("487 INVITE"), vec![0]);
}

#[test]
fn rejected_call_and_lost_invite() {
    let mut p = Pair::new();
    // The first INVITE is lost; Timer A resends it.
    p.drop_rule = Some(("INVITE".into(), 1));
    p.run_until(600);
    let call = match p.uas_events.as_slice() {
        [UasEvent::IncomingCall(ic)] => ic.call,
        other => panic!("{other:?}"),
    };
    p.uas
        .handle_action(call, UasAction::Reject { status: 404 }, p.now)
        .unwrap();
    p.progress();
    assert!(matches!(
        p.uac_events.as_slice(),
        [UacEvent::Failed { status: 404, .. }]
    ));
    assert_eq!(p.wire_of("INVITE"), vec![500]);
    let acks = p.wire.iter().filter(|(_, _, w)| w == "ACK").count();
    assert_eq!(acks, 1);
    assert!(p.wire.iter().all(|(_, _, w)| w != "garbage"));
}

/// Mutated copies of every message of a real call, fed to both sides: nothing panics, and
/// the endpoints keep working afterwards.
#[test]
fn mutated_messages_never_panic() {
    let mut p = Pair::new();
    let call = p.incoming_call();
    p.uas
        .handle_action(call, UasAction::Ringing, p.now)
        .unwrap();
    p.answer(call);
    // A whole call's messages to mutate: INVITE, 100, 180, 200, ACK, BYE, 200.
    let mut real = Pair::new();
    let c = real.incoming_call();
    real.uas
        .handle_action(c, UasAction::Ringing, real.now)
        .unwrap();
    real.answer(c);
    real.uac.hangup(real.now);
    real.progress();
    let samples = real.payloads;
    assert_eq!(samples.len(), 7);
    let mut seed = 99u32;
    let mut next = move || {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        seed >> 8
    };
    let noise = b"\r\n:;,<>\"= \x00\xffSIP/2.0 INVITE ACK BYE CANCEL 200 Via tag=z9hG4bK0";
    let from: SocketAddr = UAC_ADDR.parse().unwrap();
    for round in 0..4000 {
        let base = &samples[round % samples.len()];
        let mut m = base.clone();
        for _ in 0..1 + next() % 6 {
            if m.is_empty() {
                break;
            }
            let at = next() as usize % m.len();
            match next() % 4 {
                0 => m[at] = noise[next() as usize % noise.len()],
                1 => {
                    m.remove(at);
                }
                2 => m.insert(at, noise[next() as usize % noise.len()]),
                _ => m.truncate(at),
            }
        }
        p.uas.handle_input(Transport::Udp, from, &m, p.now);
        p.uac.handle_input(&m, p.now);
        while p.uas.poll_transmit().is_some() {}
        while p.uac.poll_transmit().is_some() {}
        while p.uas.poll_event().is_some() {}
        while p.uac.poll_event().is_some() {}
    }
    // Timers still run without panicking, and a fresh call still works end to end.
    p.run_until(60_000);
    let mut fresh = Pair::new();
    let call = fresh.incoming_call();
    fresh.answer(call);
    assert!(matches!(
        fresh.uac_events.last(),
        Some(UacEvent::Answered { .. })
    ));
}

#[test]
fn our_dialler_refreshes_the_session_our_uas_grants() {
    let mut p = Pair::asking_for_a_session(Some(Duration::from_secs(90)));
    let call = p.incoming_call();
    p.answer(call);
    assert!(matches!(
        p.uac_events.last(),
        Some(UacEvent::Answered { .. })
    ));
    // The UAS lets the caller, which supports timers, refresh: an UPDATE every 45 s, each
    // answered, and neither side ends the call (the UAS would at 60 s without one).
    p.run_until(200_000);
    assert_eq!(p.wire_of("UPDATE"), vec![45_000, 90_000, 135_000, 180_000]);
    assert_eq!(p.wire_of("200 UPDATE").len(), 4);
    assert!(
        !p.uac_events
            .iter()
            .any(|e| matches!(e, UacEvent::SessionExpired | UacEvent::RemoteHangup)),
        "{:?}",
        p.uac_events
    );
    assert!(
        !p.uas_events
            .iter()
            .any(|e| matches!(e, UasEvent::SessionExpired { .. } | UasEvent::Bye { .. })),
        "{:?}",
        p.uas_events
    );
    assert_eq!(p.uas.call_count(), 1);
}
