//! Marks and `played_ms` on a SIP leg, over the wire frames alone: an agent speaking raw
//! frames places a mark in its stream, hears `call.mark` once the phone has been sent the
//! audio before it, interrupts, and the phone (a UDP socket decoding RTP by hand) heard as
//! much of the agent as the interrupt's `played_ms` says, to one 20 ms frame.

mod common;

use common::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use telcoflow_server::RunningServer;
use telcoflow_server::config::SipConfig;
use telcoflow_sip::rtp::g711::G711;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// The agent's level: the phone hears it as one PCMU code, silence as another.
const LEVEL: i16 = 3000;
/// Bytes of 8 kHz s16le audio per ms.
const BYTES_PER_MS: usize = 16;

async fn sip_server() -> RunningServer {
    let mut config = dev_config();
    config.sip = Some(SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: "16900-16949".into(),
        ..SipConfig::default()
    });
    start(config).await
}

/// Sends an INVITE offering PCMU from `rtp_port`; returns the phone's SIP socket.
async fn invite(server: &RunningServer, rtp_port: u16) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (me, to) = (sock.local_addr().unwrap(), server.sip_addr().unwrap());
    let sdp = format!(
        "v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    );
    let msg = format!(
        "INVITE sip:+15559990001@{to} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {me};branch=z9hG4bKmarks1\r\n\
         From: <sip:+15551230001@{me}>;tag=phone\r\n\
         To: <sip:+15559990001@{to}>\r\n\
         Call-ID: marks-1\r\nCSeq: 1 INVITE\r\nContact: <sip:phone@{me}>\r\n\
         Max-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    sock.send_to(msg.as_bytes(), to).await.unwrap();
    sock
}

/// Waits for the 200 to the INVITE and ACKs it; returns the server's RTP address.
async fn answer_and_ack(sip: &UdpSocket, server: &RunningServer) -> SocketAddr {
    let mut buf = vec![0u8; 65536];
    let ok = loop {
        let (n, _) = tokio::time::timeout(WAIT, sip.recv_from(&mut buf))
            .await
            .expect("a SIP response in time")
            .unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.starts_with("SIP/2.0 200") {
            break msg;
        }
    };
    let to_tag = ok
        .lines()
        .find(|l| l.starts_with("To:"))
        .and_then(|l| l.find(";tag=").map(|at| l[at..].to_owned()))
        .expect("a To tag");
    let port: u16 = ok
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|m| m.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("m=audio in the answer");
    let (me, to) = (sip.local_addr().unwrap(), server.sip_addr().unwrap());
    let ack = format!(
        "ACK sip:+15559990001@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKmarks2\r\n\
         From: <sip:+15551230001@{me}>;tag=phone\r\nTo: <sip:+15559990001@{to}>{to_tag}\r\n\
         Call-ID: marks-1\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    sip.send_to(ack.as_bytes(), to).await.unwrap();
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The phone: sends a packet of silence every 20 ms (so that the server has seen its RTP)
/// and keeps every payload it receives, until told to stop after `n` more packets.
fn phone_rtp(
    sock: UdpSocket,
    server_rtp: SocketAddr,
    stop: oneshot::Receiver<usize>,
) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut heard = Vec::new();
        let mut buf = [0u8; 2048];
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut stop = stop;
        let mut more: Option<usize> = None;
        // Bounded: the test stops it long before (20 s of packets).
        for seq in 0..1000u16 {
            if more == Some(0) {
                break;
            }
            tokio::select! {
                n = &mut stop, if more.is_none() => more = Some(n.unwrap_or(0)),
                _ = tick.tick() => {
                    let mut p = vec![0x80, 0];
                    p.extend_from_slice(&seq.to_be_bytes());
                    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
                    p.extend_from_slice(&0x3a3a_3a3au32.to_be_bytes());
                    p.extend_from_slice(&[0xFF; 160]);
                    let _ = sock.send_to(&p, server_rtp).await;
                }
            }
            while let Ok((n, _)) = sock.try_recv_from(&mut buf) {
                // RTCP (payload types 200-204 with the marker bit) is not audio.
                if n > 12 && !(200..=204).contains(&buf[1]) {
                    heard.extend_from_slice(&buf[12..n]);
                    if let Some(m) = &mut more {
                        *m = m.saturating_sub(1);
                    }
                }
            }
        }
        heard
    })
}

#[tokio::test]
async fn a_sip_phone_hears_what_played_ms_says_and_marks_follow_it() {
    let server = sip_server().await;
    let mut control = control(&server, 8000, "mixed").await;
    let rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sip = invite(&server, rtp.local_addr().unwrap().port()).await;
    let call = control.take_call().await;
    let mut media = media(&call).await;
    // The server asks for audio as soon as the media connection is up; answered below.
    let first = media.ws.expect_type("buffer_request").await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    let server_rtp = answer_and_ack(&sip, &server).await;
    let (stop, stopped) = oneshot::channel();
    let phone = phone_rtp(rtp, server_rtp, stopped);

    // Two seconds to say; a mark after the first 400 ms. The agent answers each request in
    // order, and sends the mark in its place in the stream.
    let total = 2_000 * BYTES_PER_MS;
    let mark_at = 400 * BYTES_PER_MS;
    let mut sent = 0;
    let mut mark_sent = false;
    let mut reached: Option<Value> = None;
    let mut requests_after_mark = 0;
    let mut pending = Some(first);
    // Bounded by the two seconds of audio: about 50 requests, and the events between.
    for _ in 0..2_000 {
        if reached.is_some() && requests_after_mark >= 5 {
            break;
        }
        let v = match pending.take() {
            Some(v) => v,
            None => match media.ws.next().await {
                Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
                _ => continue,
            },
        };
        match v["type"].as_str() {
            Some("buffer_request") => {
                if reached.is_some() {
                    requests_after_mark += 1;
                }
                let mut want = v["data"]["requested_bytes"].as_u64().unwrap() as usize;
                while want > 0 && sent < total {
                    let until = if mark_sent { total } else { mark_at };
                    let n = want.min(320).min(until - sent);
                    media.send_audio(&pcm_level(LEVEL, n / 2)).await;
                    sent += n;
                    want -= n;
                    if sent == mark_at && !mark_sent {
                        let cmd = json!({"type": "command", "data": {
                            "command_id": "m1", "command": "agent.mark",
                            "data": {"name": "first", "id": 1}}});
                        media.ws.send_json(cmd).await;
                        mark_sent = true;
                    }
                }
            }
            Some("call_event") if v["data"]["event"] == "call.mark" => {
                reached = Some(v["data"].clone());
            }
            Some("command_response") => {
                assert_eq!(v["data"]["success"], true, "{v}");
            }
            _ => {}
        }
    }
    let reached = reached.expect("the mark was reached");
    assert_eq!(reached["name"], "first");
    assert_eq!(reached["id"], 1);
    assert_eq!(reached["cleared"], false);
    let at_mark = reached["played_ms"].as_u64().unwrap();
    assert!((400..=420).contains(&at_mark), "{reached}");

    let r = media
        .command("agent.interrupt", Some(json!({"since_mark": "first"})))
        .await;
    assert_eq!(r["success"], true, "{r}");
    let result = &r["result"];
    let played_total = result["played_total_ms"].as_u64().unwrap();
    assert_eq!(result["since_mark"], "first");
    assert_eq!(
        result["played_ms"].as_u64().unwrap(),
        played_total - at_mark
    );
    assert!(played_total > at_mark, "{result}");
    let dropped = result["dropped_bytes"].as_u64().unwrap() as usize;
    assert_eq!(result["droppedBytes"], result["dropped_bytes"]);
    // Every byte sent was heard or dropped by the interrupt.
    let accounted = played_total as usize * BYTES_PER_MS + dropped;
    assert!(
        accounted.abs_diff(sent) < BYTES_PER_MS,
        "{accounted} of {sent}"
    );

    // The phone listens to 15 more packets (300 ms): what it heard of the agent is what the
    // server said.
    let _ = stop.send(15);
    let heard = phone.await.unwrap();
    let code = G711::Pcmu.encode_sample(LEVEL);
    let heard_ms = heard.iter().filter(|&&c| c == code).count() as u64 / 8;
    assert!(
        heard_ms.abs_diff(played_total) <= 20,
        "the phone heard {heard_ms} ms of the agent, played_ms says {played_total}"
    );
    server.shutdown().await;
}
