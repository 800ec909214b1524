//! SIP media against hostile and unusual peers: a port sprayer cannot take a caller's audio,
//! an SDP naming a third party's address gets it only a few packets, a phone that holds
//! hears nothing, any ptime from 10 to 60 ms is carried sample for sample, and an agent's odd
//! byte waits for the next frame. Phones (and attackers) here are plain UDP sockets speaking
//! SIP text and RTP by hand, and SIPp playing its stock 30 ms speech recording; every test
//! ends with an ordinary call working.

mod common;
mod sipp;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use telcoflow_server::RunningServer;
use telcoflow_server::config::SipConfig;
use telcoflow_sip::rtp::g711::G711;
use telcoflow_sip::rtp::session::UNVERIFIED_SEND_LIMIT;
use tokio::net::UdpSocket;
use tokio::time::Instant;

const MAX_ROUNDS: usize = 400;

fn server_config(rtp_ports: &str, rtp_timeout_secs: u64) -> telcoflow_server::Config {
    let mut config = dev_config();
    config.sip = Some(SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: rtp_ports.into(),
        rtp_timeout_secs,
        ..SipConfig::default()
    });
    config
}

/// As [`server_config`], with RFC 3261's T1 at 50 ms: 64·T1, the wait for an ACK, is 3.2 s.
fn fast_timers(rtp_ports: &str, rtp_timeout_secs: u64) -> telcoflow_server::Config {
    let mut config = server_config(rtp_ports, rtp_timeout_secs);
    if let Some(sip) = &mut config.sip {
        sip.timer_t1_ms = T1_MS;
    }
    config
}

/// T1 of [`fast_timers`], in ms.
const T1_MS: u64 = 50;

/// An SDP offer of PCMU from `ip:port`, with extra attribute lines.
fn offer(ip: &str, port: u16, extra: &str) -> String {
    format!(
        "v=0\r\no=phone 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n{extra}"
    )
}

/// One RTP packet of PCMU.
fn rtp(seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A phone's SIP side: one dialog over UDP, text by hand.
struct SipPhone {
    sock: UdpSocket,
    me: SocketAddr,
    server: SocketAddr,
    call_id: String,
    to_tag: String,
    cseq: u32,
}

impl SipPhone {
    async fn new(server: &RunningServer, call_id: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Self {
            me: sock.local_addr().unwrap(),
            sock,
            server: server.sip_addr().unwrap(),
            call_id: call_id.into(),
            to_tag: String::new(),
            cseq: 0,
        }
    }

    async fn send(&self, method: &str, cseq: u32, body: Option<&str>) {
        let (me, server, call_id, to_tag) = (self.me, self.server, &self.call_id, &self.to_tag);
        let mut msg = format!(
            "{method} sip:+15559990001@{server} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK{method}{cseq}{call_id}\r\n\
             From: <sip:+15551230001@{me}>;tag=phone\r\n\
             To: <sip:+15559990001@{server}>{to_tag}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:phone@{me}>\r\n\
             Max-Forwards: 70\r\n"
        );
        match body {
            Some(b) => msg.push_str(&format!(
                "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )),
            None => msg.push_str("Content-Length: 0\r\n\r\n"),
        }
        self.sock
            .send_to(msg.as_bytes(), self.server)
            .await
            .unwrap();
    }

    async fn recv(&self) -> String {
        let mut buf = vec![0u8; 65536];
        let (n, _) = tokio::time::timeout(WAIT, self.sock.recv_from(&mut buf))
            .await
            .expect("a SIP message in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Sends an INVITE (or re-INVITE) with `sdp`.
    async fn invite(&mut self, sdp: &str) {
        self.cseq += 1;
        self.send("INVITE", self.cseq, Some(sdp)).await;
    }

    /// Waits for the final response to the latest INVITE; returns it (the dialog's tag kept).
    async fn final_response(&mut self) -> String {
        loop {
            let msg = self.recv().await;
            let cseq = format!("CSeq: {} INVITE", self.cseq);
            if msg.starts_with("SIP/2.0 1") || !msg.contains(&cseq) {
                continue;
            }
            if self.to_tag.is_empty() {
                let to = header(&msg, "To");
                if let Some(at) = to.find(";tag=") {
                    self.to_tag = to[at..].to_owned();
                }
            }
            return msg;
        }
    }

    async fn ack(&self) {
        self.send("ACK", self.cseq, None).await;
    }

    async fn bye(&mut self) {
        self.cseq += 1;
        self.send("BYE", self.cseq, None).await;
    }
}

fn header<'a>(msg: &'a str, name: &str) -> &'a str {
    msg.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
        .unwrap_or_else(|| panic!("no {name} in\n{msg}"))
}

fn body(msg: &str) -> &str {
    &msg[msg.find("\r\n\r\n").unwrap() + 4..]
}

/// The RTP port of an SDP answer.
fn answered_port(msg: &str) -> u16 {
    body(msg)
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|m| m.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("m=audio port in the answer")
}

/// The agent's media connection, the audio it owes the server (asked for and not sent), and
/// whether it heard the call end.
struct Agent {
    media: Media,
    owed: usize,
    ended: bool,
}

/// A phone calls in with `sdp`; the agent takes and answers the call. Returns the agent,
/// the 200 and the server's RTP address. No ACK yet.
async fn call_in(
    control: &mut Control,
    phone: &mut SipPhone,
    sdp: &str,
) -> (Agent, String, SocketAddr) {
    phone.invite(sdp).await;
    let call = control.take_call().await;
    let mut media = media(&call).await;
    // The server asks for audio as soon as the media connection is up.
    let request = media.ws.expect_type("buffer_request").await;
    let owed = request["data"]["requested_bytes"].as_u64().unwrap() as usize;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    let ok = phone.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let server_rtp = SocketAddr::from(([127, 0, 0, 1], answered_port(&ok)));
    (
        Agent {
            media,
            owed,
            ended: false,
        },
        ok,
        server_rtp,
    )
}

/// Receives RTP on `sock` until `until`; returns the payloads.
async fn rtp_until(sock: &UdpSocket, until: Instant) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(r) = tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
        let (n, _) = r.unwrap();
        // RTCP (payload types 200-204 with the marker bit) is not audio.
        if n >= 12 && !(200..=204).contains(&buf[1]) {
            got.push(buf[12..n].to_vec());
        }
    }
    got
}

/// The agent answers every `buffer_request` with audio from `source` (called with the byte
/// count asked for) until `until`, and returns the audio frames it heard.
async fn agent_talks(
    agent: &mut Agent,
    until: Instant,
    mut source: impl FnMut(usize) -> Vec<Vec<u8>>,
) -> Vec<Vec<i16>> {
    let media = &mut agent.media;
    if agent.owed > 0 {
        for frame in source(std::mem::take(&mut agent.owed)) {
            media.send_audio(&frame).await;
        }
    }
    let mut heard = Vec::new();
    while let Ok(msg) = tokio::time::timeout_at(until, media.ws.next()).await {
        match msg {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "buffer_request" {
                    let bytes = v["data"]["requested_bytes"].as_u64().unwrap() as usize;
                    for frame in source(bytes) {
                        media.send_audio(&frame).await;
                    }
                } else if v["type"] == "call_event" && v["data"]["event"] == "call.terminated" {
                    agent.ended = true;
                }
            }
            Some(tokio_tungstenite::tungstenite::Message::Binary(b)) if b[0] == 0 => {
                heard.push(samples(&b[1..]));
            }
            Some(_) => {}
            None => break,
        }
    }
    heard
}

/// Waits for the agent to hear the call end.
async fn call_terminated(agent: &mut Agent) {
    while !agent.ended {
        let v = agent.media.ws.expect_type("call_event").await;
        agent.ended = v["data"]["event"] == "call.terminated";
    }
}

/// The RTP payloads already waiting in `sock`.
fn drain_rtp(sock: &UdpSocket) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = sock.try_recv_from(&mut buf) {
        if n >= 12 && !(200..=204).contains(&buf[1]) {
            got.push(buf[12..n].to_vec());
        }
    }
    got
}

/// A constant level, as many bytes as asked for, in one frame.
fn level_source(level: i16) -> impl FnMut(usize) -> Vec<Vec<u8>> {
    move |bytes| vec![pcm_level(level, bytes / 2)]
}

/// An ordinary call: the phone speaks first, then both sides hear each other; BYE ends it.
async fn ordinary_call_works(server: &RunningServer, control: &mut Control, call_id: &str) {
    let mut phone = SipPhone::new(server, call_id).await;
    let rtp_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = rtp_sock.local_addr().unwrap().port();
    let (mut agent, _, server_rtp) =
        call_in(control, &mut phone, &offer("127.0.0.1", port, "")).await;
    phone.ack().await;
    let code = G711::Pcmu.encode_sample(2000);
    let mut heard_phone = false;
    let mut heard_agent = false;
    for round in 0..MAX_ROUNDS {
        let packet = rtp(round as u16, round as u32 * 160, 0x0bad, &[code; 160]);
        rtp_sock.send_to(&packet, server_rtp).await.unwrap();
        let until = Instant::now() + Duration::from_millis(20);
        let (heard, got) = tokio::join!(
            agent_talks(&mut agent, until, level_source(3000)),
            rtp_until(&rtp_sock, until)
        );
        heard_phone |= heard
            .iter()
            .any(|f| f.contains(&G711::Pcmu.decode_sample(code)));
        heard_agent |= got
            .iter()
            .any(|p| p.contains(&G711::Pcmu.encode_sample(3000)));
        if heard_phone && heard_agent {
            break;
        }
    }
    assert!(heard_phone, "the agent hears the phone");
    assert!(heard_agent, "the phone hears the agent");
    phone.bye().await;
    loop {
        let msg = phone.recv().await;
        if msg.contains("BYE") && msg.starts_with("SIP/2.0") {
            assert!(msg.starts_with("SIP/2.0 200"), "{msg}");
            break;
        }
    }
}

#[tokio::test]
async fn a_port_sprayer_cannot_take_a_callers_audio() {
    let server = start(server_config("16200-16299", 30)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let mut phone = SipPhone::new(&server, "spray-1").await;
    let phone_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = phone_rtp.local_addr().unwrap().port();
    // The attacker is another host (another loopback address) that learnt the port.
    let attacker = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let (mut agent, _, server_rtp) =
        call_in(&mut control, &mut phone, &offer("127.0.0.1", port, "")).await;
    phone.ack().await;

    // The attacker sprays before the phone's first packet lands.
    let attack = G711::Pcmu.encode_sample(-8000);
    for seq in 0..50u16 {
        let p = rtp(seq, u32::from(seq) * 160, 0xbad0, &[attack; 160]);
        attacker.send_to(&p, server_rtp).await.unwrap();
    }
    let voice = G711::Pcmu.encode_sample(2000);
    let mut heard: Vec<Vec<i16>> = Vec::new();
    let mut to_phone: Vec<Vec<u8>> = Vec::new();
    for round in 0..MAX_ROUNDS {
        let p = rtp(round as u16, round as u32 * 160, 0x1111, &[voice; 160]);
        phone_rtp.send_to(&p, server_rtp).await.unwrap();
        let until = Instant::now() + Duration::from_millis(20);
        let (h, got) = tokio::join!(
            agent_talks(&mut agent, until, level_source(3000)),
            rtp_until(&phone_rtp, until)
        );
        heard.extend(h);
        to_phone.extend(got);
        let caller = G711::Pcmu.decode_sample(voice);
        if heard.iter().filter(|f| f.contains(&caller)).count() >= 25 && to_phone.len() >= 25 {
            break;
        }
    }
    let attacker_level = G711::Pcmu.decode_sample(attack);
    assert!(
        heard.iter().all(|f| !f.contains(&attacker_level)),
        "the agent never hears the attacker"
    );
    assert!(
        heard
            .iter()
            .filter(|f| f.contains(&G711::Pcmu.decode_sample(voice)))
            .count()
            >= 25,
        "the agent hears the caller"
    );
    assert!(to_phone.len() >= 25, "the caller hears the agent");
    let mut buf = [0u8; 2048];
    assert!(
        attacker.try_recv_from(&mut buf).is_err(),
        "nothing goes to the attacker"
    );
    phone.bye().await;
    ordinary_call_works(&server, &mut control, "spray-2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_sdp_naming_a_third_address_gets_only_a_few_packets_and_the_call_ends() {
    // The RTP timeout is long: the never-ACKed call ends by the ACK timer (64·T1, 3.2 s here).
    let server = start(fast_timers("16300-16399", 30)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let mut phone = SipPhone::new(&server, "amp-1").await;
    // The victim: an address that never asked for anything.
    let victim = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let victim_port = victim.local_addr().unwrap().port();
    let (mut agent, _, _) = call_in(
        &mut control,
        &mut phone,
        &offer("127.0.0.3", victim_port, ""),
    )
    .await;
    // Never ACKed; the agent talks for 2 s.
    let until = Instant::now() + Duration::from_millis(2000);
    let (_, mut got) = tokio::join!(
        agent_talks(&mut agent, until, level_source(3000)),
        rtp_until(&victim, until)
    );
    // The call ends by the ACK timer: the server sends BYE and the agent hears it end.
    let bye = loop {
        let msg = phone.recv().await;
        if msg.starts_with("BYE ") {
            break msg;
        }
    };
    assert!(bye.contains("Call-ID: amp-1"), "{bye}");
    call_terminated(&mut agent).await;
    // The leg has stopped: whatever it sent is in the victim's socket now.
    got.extend(drain_rtp(&victim));
    assert!(
        !got.is_empty() && got.len() <= UNVERIFIED_SEND_LIMIT as usize,
        "{} packets went to the third address (100 frames were spoken)",
        got.len()
    );
    ordinary_call_works(&server, &mut control, "amp-2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_200_never_acked_stops_media_and_ends_with_bye_after_64_t1() {
    let server = start(fast_timers("16700-16799", 30)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let mut phone = SipPhone::new(&server, "noack-1").await;
    let phone_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = phone_rtp.local_addr().unwrap().port();
    let (mut agent, _, server_rtp) =
        call_in(&mut control, &mut phone, &offer("127.0.0.1", port, "")).await;
    let first_ok = Instant::now();
    // The phone sends RTP (its address proven, media flows both ways) but never ACKs.
    let voice = G711::Pcmu.encode_sample(2000);
    let mut to_phone = 0usize;
    let mut resent_oks = 0usize;
    let mut bye = None;
    let mut buf = vec![0u8; 65536];
    for round in 0u32.. {
        let p = rtp(round as u16, round * 160, 0x5555, &[voice; 160]);
        phone_rtp.send_to(&p, server_rtp).await.unwrap();
        let until = Instant::now() + Duration::from_millis(20);
        let (_, got) = tokio::join!(
            agent_talks(&mut agent, until, level_source(3000)),
            rtp_until(&phone_rtp, until)
        );
        to_phone += got.len();
        while let Ok((n, _)) = phone.sock.try_recv_from(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.starts_with("SIP/2.0 200") && msg.contains("CSeq: 1 INVITE") {
                resent_oks += 1;
            } else if msg.starts_with("BYE ") {
                bye = Some(msg);
            }
        }
        if bye.is_some() {
            break;
        }
        assert!(first_ok.elapsed() < WAIT, "no BYE within {WAIT:?}");
    }
    let waited = first_ok.elapsed();
    let bye = bye.unwrap();
    assert!(bye.contains("Call-ID: noack-1"), "{bye}");
    // 64·T1 from the 200 (which left the server before it reached us).
    let timer = Duration::from_millis(64 * T1_MS);
    assert!(
        waited + Duration::from_millis(50) >= timer,
        "BYE after {waited:?}"
    );
    assert!(resent_oks >= 5, "the 200 was resent {resent_oks} times");
    assert!(
        to_phone > UNVERIFIED_SEND_LIMIT as usize,
        "media flowed until the timer: {to_phone} packets"
    );
    // The agent hears the call end, once the leg stopped: nothing reaches the phone after.
    call_terminated(&mut agent).await;
    drain_rtp(&phone_rtp);
    for round in 0..20u16 {
        let p = rtp(round, u32::from(round) * 160, 0x5555, &[voice; 160]);
        phone_rtp.send_to(&p, server_rtp).await.unwrap();
        let until = Instant::now() + Duration::from_millis(20);
        assert!(
            rtp_until(&phone_rtp, until).await.is_empty(),
            "media after the BYE"
        );
    }
    ordinary_call_works(&server, &mut control, "noack-2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_ptime_changed_by_re_invite_is_carried_sample_for_sample() {
    let server = start(server_config("16800-16899", 30)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let mut phone = SipPhone::new(&server, "reptime-1").await;
    let phone_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = phone_rtp.local_addr().unwrap().port();
    let sdp = offer("127.0.0.1", port, "a=ptime:20\r\n");
    let (mut agent, ok, server_rtp) = call_in(&mut control, &mut phone, &sdp).await;
    assert!(body(&ok).contains("a=ptime:20\r\n"), "{ok}");
    phone.ack().await;
    let mut agent_pos = 0usize;
    let mut agent_ramp = move |bytes: usize| {
        let frame: Vec<u8> = (0..bytes / 2)
            .flat_map(|i| {
                G711::Pcmu
                    .decode_sample(ramp_code(agent_pos + i))
                    .to_le_bytes()
            })
            .collect();
        agent_pos += bytes / 2;
        vec![frame]
    };
    let mut heard: Vec<Vec<i16>> = Vec::new();
    let mut to_phone: Vec<Vec<u8>> = Vec::new();
    // The phone's ramp: 1 s at 20 ms, then (after its re-INVITE) 1.5 s at 30 ms, in real
    // time; its sequence numbers and timestamps run on across the change.
    let mut phone_pos = 0usize;
    let mut seq = 30_000u16;
    let mut clock = Instant::now();
    for (ptime, millis) in [(20usize, 1000usize), (30, 1500)] {
        if ptime != 20 {
            let sdp = offer("127.0.0.1", port, &format!("a=ptime:{ptime}\r\n"));
            phone.invite(&sdp).await;
            let ok = phone.final_response().await;
            assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
            assert!(body(&ok).contains(&format!("a=ptime:{ptime}\r\n")), "{ok}");
            phone.ack().await;
            clock = clock.max(Instant::now());
        }
        let samples = ptime * 8;
        for _ in 0..millis / ptime {
            let payload: Vec<u8> = (0..samples).map(|i| ramp_code(phone_pos + i)).collect();
            let p = rtp(seq, phone_pos as u32, 0x6666, &payload);
            phone_rtp.send_to(&p, server_rtp).await.unwrap();
            seq = seq.wrapping_add(1);
            phone_pos += samples;
            clock += Duration::from_millis(ptime as u64);
            let (h, got) = tokio::join!(
                agent_talks(&mut agent, clock, &mut agent_ramp),
                rtp_until(&phone_rtp, clock)
            );
            heard.extend(h);
            to_phone.extend(got);
        }
    }
    // The agent heard the phone's ramp whole across the change.
    let ramp_values: Vec<i16> = (0..127)
        .map(|k| G711::Pcmu.decode_sample(ramp_code(k)))
        .collect();
    let caller: Vec<i16> = heard
        .iter()
        .filter(|f| f.iter().all(|s| ramp_values.contains(s)))
        .flatten()
        .copied()
        .collect();
    assert!(
        !caller.is_empty(),
        "heard {:?}",
        &heard[..heard.len().min(12)]
    );
    let checked = assert_ramp(&caller, "the agent hears the phone across the ptime change");
    assert!(checked >= 16_000, "the agent heard {checked} samples");
    // The phone got 20 ms packets, then 30 ms ones, the agent's ramp unbroken across them.
    let sizes: Vec<usize> = to_phone.iter().map(Vec::len).collect();
    let switch = sizes.iter().position(|&n| n != 160).unwrap_or(sizes.len());
    assert!(
        switch >= 20 && sizes[switch..].len() >= 20 && sizes[switch..].iter().all(|&n| n == 240),
        "packet sizes {sizes:?}"
    );
    let sent: Vec<i16> = to_phone
        .iter()
        .flatten()
        .map(|&c| G711::Pcmu.decode_sample(c))
        .skip_while(|s| !ramp_values.contains(s) || *s == G711::Pcmu.decode_sample(0xFF))
        .collect();
    let checked = assert_ramp(&sent, "the phone hears the agent across the ptime change");
    assert!(checked >= 16_000, "the phone heard {checked} samples");
    phone.bye().await;
    ordinary_call_works(&server, &mut control, "reptime-2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_phone_on_hold_gets_no_media_and_resumes() {
    let server = start(server_config("16400-16499", 30)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let mut phone = SipPhone::new(&server, "hold-1").await;
    let phone_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = phone_rtp.local_addr().unwrap().port();
    let (mut agent, _, server_rtp) =
        call_in(&mut control, &mut phone, &offer("127.0.0.1", port, "")).await;
    phone.ack().await;
    let p = rtp(1, 0, 0x2222, &[0xFF; 160]);
    phone_rtp.send_to(&p, server_rtp).await.unwrap();
    let until = Instant::now() + Duration::from_millis(400);
    let (_, got) = tokio::join!(
        agent_talks(&mut agent, until, level_source(3000)),
        rtp_until(&phone_rtp, until)
    );
    assert!(got.len() >= 5, "the phone hears the agent: {}", got.len());

    for hold in ["sendonly", "inactive"] {
        phone
            .invite(&offer("127.0.0.1", port, &format!("a={hold}\r\n")))
            .await;
        let ok = phone.final_response().await;
        assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
        phone.ack().await;
        // Packets in flight when the hold landed may still come, for a bound of 200 ms.
        let settle = Instant::now() + Duration::from_millis(200);
        tokio::join!(
            agent_talks(&mut agent, settle, level_source(3000)),
            rtp_until(&phone_rtp, settle)
        );
        let until = Instant::now() + Duration::from_millis(1000);
        let (_, got) = tokio::join!(
            agent_talks(&mut agent, until, level_source(3000)),
            rtp_until(&phone_rtp, until)
        );
        assert_eq!(
            got.len(),
            0,
            "nothing is sent to a phone holding with {hold}"
        );

        phone
            .invite(&offer("127.0.0.1", port, "a=sendrecv\r\n"))
            .await;
        let ok = phone.final_response().await;
        assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
        phone.ack().await;
        let until = Instant::now() + Duration::from_millis(400);
        let (_, got) = tokio::join!(
            agent_talks(&mut agent, until, level_source(3000)),
            rtp_until(&phone_rtp, until)
        );
        assert!(got.len() >= 5, "media resumes after {hold}: {}", got.len());
    }
    phone.bye().await;
    ordinary_call_works(&server, &mut control, "hold-2").await;
    server.shutdown().await;
}

/// mu-law codes 0x00..=0x7E decode to 127 distinct values: a stream cycling through them
/// shows any lost, cut or repeated sample.
fn ramp_code(i: usize) -> u8 {
    (i % 127) as u8
}

/// Whether `stream` (decoded samples) continues the ramp without a break, from wherever it
/// starts; returns the number of samples checked.
fn assert_ramp(stream: &[i16], what: &str) -> usize {
    let decode = |c: u8| G711::Pcmu.decode_sample(c);
    let start = (0..127)
        .find(|&k| decode(ramp_code(k)) == stream[0])
        .unwrap_or_else(|| panic!("{what}: {} is not a ramp sample", stream[0]));
    for (i, &s) in stream.iter().enumerate() {
        assert_eq!(
            s,
            decode(ramp_code(start + i)),
            "{what}: sample {i} breaks the ramp (lost, cut or repeated samples)"
        );
    }
    stream.len()
}

#[tokio::test]
async fn every_ptime_from_10_to_60_ms_is_carried_sample_for_sample() {
    let server = start(server_config("16500-16599", 30)).await;
    let mut control = control(&server, 8000, "mixed").await;
    for ptime in [30usize, 10, 60] {
        let mut phone = SipPhone::new(&server, &format!("ptime-{ptime}")).await;
        let phone_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = phone_rtp.local_addr().unwrap().port();
        let sdp = offer("127.0.0.1", port, &format!("a=ptime:{ptime}\r\n"));
        let (mut agent, ok, server_rtp) = call_in(&mut control, &mut phone, &sdp).await;
        assert!(
            body(&ok).contains(&format!("a=ptime:{ptime}\r\n")),
            "answered with the offered ptime: {ok}"
        );
        phone.ack().await;
        let samples_per_packet = ptime * 8;
        // The agent sends a ramp too (as decoded mu-law values: exact through the codec).
        let mut agent_pos = 0usize;
        let agent_ramp = move |bytes: usize| {
            let frame: Vec<u8> = (0..bytes / 2)
                .flat_map(|i| {
                    G711::Pcmu
                        .decode_sample(ramp_code(agent_pos + i))
                        .to_le_bytes()
                })
                .collect();
            agent_pos += bytes / 2;
            vec![frame]
        };
        let mut agent_ramp = Box::new(agent_ramp);
        let mut heard: Vec<Vec<i16>> = Vec::new();
        let mut to_phone: Vec<Vec<u8>> = Vec::new();
        // 2 s of the phone's ramp, in real time.
        let packets = 2000 / ptime;
        let t0 = Instant::now();
        for n in 0..packets {
            let payload: Vec<u8> = (0..samples_per_packet)
                .map(|i| ramp_code(n * samples_per_packet + i))
                .collect();
            let p = rtp(n as u16, (n * samples_per_packet) as u32, 0x3333, &payload);
            phone_rtp.send_to(&p, server_rtp).await.unwrap();
            let until = t0 + Duration::from_millis(((n + 1) * ptime) as u64);
            let (h, got) = tokio::join!(
                agent_talks(&mut agent, until, &mut agent_ramp),
                rtp_until(&phone_rtp, until)
            );
            heard.extend(h);
            to_phone.extend(got);
        }
        // What the agent heard: ramp frames (after the silence before the first packet),
        // each continuing the last; concealment while the buffer adapts is not audio.
        let ramp_values: Vec<i16> = (0..127)
            .map(|k| G711::Pcmu.decode_sample(ramp_code(k)))
            .collect();
        let caller: Vec<i16> = heard
            .iter()
            .filter(|f| f.iter().all(|s| ramp_values.contains(s)))
            .flatten()
            .copied()
            .collect();
        if caller.is_empty() {
            panic!("ptime {ptime}: heard {:?}", &heard[..heard.len().min(12)]);
        }
        let checked = assert_ramp(&caller, &format!("agent hears ptime {ptime}"));
        assert!(
            checked >= 12_000,
            "ptime {ptime}: the agent heard {checked} samples"
        );
        // What the phone got: packets of its ptime, the agent's ramp without a break.
        assert!(
            to_phone.len() > 10,
            "ptime {ptime}: {} packets",
            to_phone.len()
        );
        assert!(
            to_phone.iter().all(|p| p.len() == samples_per_packet),
            "ptime {ptime}: packet sizes {:?}",
            to_phone.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let sent: Vec<i16> = to_phone
            .iter()
            .flatten()
            .map(|&c| G711::Pcmu.decode_sample(c))
            .skip_while(|s| !ramp_values.contains(s) || *s == G711::Pcmu.decode_sample(0xFF))
            .collect();
        let checked = assert_ramp(&sent, &format!("phone hears ptime {ptime}"));
        assert!(
            checked >= 8_000,
            "ptime {ptime}: the phone heard {checked} samples"
        );
        phone.bye().await;
    }
    ordinary_call_works(&server, &mut control, "ptime-after").await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_odd_byte_from_the_agent_waits_for_the_next_frame() {
    let server = start(server_config("16600-16699", 30)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let mut phone = SipPhone::new(&server, "odd-1").await;
    let phone_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = phone_rtp.local_addr().unwrap().port();
    let (mut agent, _, server_rtp) =
        call_in(&mut control, &mut phone, &offer("127.0.0.1", port, "")).await;
    phone.ack().await;
    phone_rtp
        .send_to(&rtp(1, 0, 0x4444, &[0xFF; 160]), server_rtp)
        .await
        .unwrap();
    // The agent's stream of s16le samples is split at odd byte counts: 3 bytes, then the rest.
    let level: i16 = 3000;
    let mut split = true;
    let odd_source = move |bytes: usize| {
        let pcm = pcm_level(level, bytes / 2);
        if std::mem::take(&mut split) {
            vec![pcm[..3].to_vec(), pcm[3..].to_vec()]
        } else {
            vec![pcm]
        }
    };
    let until = Instant::now() + Duration::from_millis(600);
    let (_, got) = tokio::join!(
        agent_talks(&mut agent, until, odd_source),
        rtp_until(&phone_rtp, until)
    );
    let code = G711::Pcmu.encode_sample(level);
    let heard: Vec<u8> = got.into_iter().flatten().filter(|&c| c != 0xFF).collect();
    assert!(heard.len() >= 1600, "{} samples of the agent", heard.len());
    assert!(
        heard.iter().all(|&c| c == code),
        "every sample is the agent's level, none shifted by a byte"
    );
    phone.bye().await;
    ordinary_call_works(&server, &mut control, "odd-2").await;
    server.shutdown().await;
}

/// The A-law payloads of SIPp's `g711a.pcap` (Ethernet, IPv4, UDP, RTP), decoded.
fn pcap_speech() -> Vec<i16> {
    let data = std::fs::read("/usr/share/sip-tester/g711a.pcap").expect("SIPp's g711a.pcap");
    let mut at = 24;
    let mut speech = Vec::new();
    while at + 16 <= data.len() {
        let len = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        let packet = &data[at + 16..at + 16 + len];
        at += 16 + len;
        speech.extend(
            packet[14 + 20 + 8 + 12..]
                .iter()
                .map(|&c| G711::Pcma.decode_sample(c)),
        );
    }
    speech
}

// Two worker threads: the test's own reading of the agent's audio does not hold up the RTP
// leg's task, whose stalls make the jitter buffer drop frames to bound the latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_stock_30_ms_speech_reaches_the_agent_in_order_without_a_cut() {
    sipp_speech_reaches_the_agent(27, "ptime30", "uac_ptime30.xml").await;
}

/// SIPp offers 20 ms, then switches to 30 ms by re-INVITE (its check: the answer says
/// `a=ptime:30`) and plays its recording.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_switching_to_30_ms_by_re_invite_is_heard_in_order_without_a_cut() {
    sipp_speech_reaches_the_agent(29, "reinvite-ptime30", "uac_reinvite_ptime30.xml").await;
}

/// Runs a SIPp scenario that plays `g711a.pcap` to an agent who answers and listens, and
/// checks what the agent heard; then an ordinary call.
async fn sipp_speech_reaches_the_agent(index: u16, name: &str, scenario: &str) {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(index);
    let server = start(sipp::sip_config(ports)).await;
    let mut control = control(&server, 8000, "mixed").await;
    let dir = sipp::work_dir(name);
    let args = sipp::uac_args(&server, ports, scenario, "+15559990001", 1);
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let call = control.take_call().await;
    let mut media = media(&call).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    let mut heard: Vec<Vec<i16>> = Vec::new();
    loop {
        match media.ws.next().await {
            Some(tokio_tungstenite::tungstenite::Message::Binary(b)) if b[0] == 0 => {
                heard.push(samples(&b[1..]));
            }
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "call_event" && v["data"]["event"] == "call.terminated" {
                    break;
                }
            }
            Some(_) => {}
            None => panic!("media connection closed before the call ended"),
        }
    }
    phone.await.unwrap().assert_passed();
    assert_heard_the_recording(&heard);
    ordinary_call_works(&server, &mut control, &format!("{name}-after")).await;
    server.shutdown().await;
}

/// Checks the frames an agent heard of SIPp's recording.
fn assert_heard_the_recording(heard: &[Vec<i16>]) {
    // What the agent heard is the recording from its first frame on, in order, in whole
    // 20 ms frames: nothing cut from the 30 ms packets (a cut, or a lost 30 ms packet, takes
    // two frames or shifts every frame after it), nothing repeated or reordered. Frames that
    // are not the recording's are concealment (a faded repeat while the buffer adapts). The
    // one loss allowed is the jitter buffer's, which drops one frame per tick while its depth
    // is over its bound (after this process stalled on a loaded machine): never two frames in
    // a row. As the recording's silences repeat one frame, every alignment is followed: the
    // recording's frames still to come, each with the fewest frames skipped to get there.
    let speech = pcap_speech();
    let recording: Vec<&[i16]> = speech.chunks_exact(160).collect();
    let mut alignments: BTreeMap<usize, usize> = BTreeMap::from([(0, 0)]);
    for (i, frame) in heard.iter().enumerate() {
        if !recording.contains(&frame.as_slice()) {
            continue;
        }
        let mut next: BTreeMap<usize, usize> = BTreeMap::new();
        let mut keep = |at: usize, skipped: usize| {
            let best = next.entry(at).or_insert(skipped);
            *best = (*best).min(skipped);
        };
        for (&at, &skipped) in &alignments {
            if recording.get(at) == Some(&frame.as_slice()) {
                keep(at + 1, skipped);
            } else if recording.get(at + 1) == Some(&frame.as_slice()) {
                keep(at + 2, skipped + 1);
            }
        }
        assert!(
            !next.is_empty(),
            "heard frame {i} does not follow the recording (frames lost, cut or repeated); \
             it had reached frame {:?}",
            alignments.keys().max()
        );
        alignments = next;
    }
    let (&reached, &skipped) = alignments.iter().next_back().unwrap();
    // SIPp plays 2.5 s (125 frames) before its BYE; the first 1.5 s is heard whatever the
    // jitter buffer's delay at the end.
    assert!(reached >= 75, "{reached} frames of the recording heard");
    assert!(
        skipped * 10 <= reached,
        "{skipped} of {reached} frames dropped by the jitter buffer"
    );
}
