//! A SIP call's quality figures: a phone written here (SIP text by hand, RTP and RTCP over
//! plain UDP sockets) skips every tenth packet it sends and answers the server's RTCP sender
//! report with a receiver report. `GET /public/v1/calls/{id}/stats` reports the loss exactly
//! and the round trip; the agent gets the same figures as `call.stats` before
//! `call.terminated`. Needs no tools.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use telcoflow_server::config::SipConfig;
use telcoflow_sip::rtp::g711::G711;
use telcoflow_sip::rtp::packet::{ReceiverReport, ReportBlock, RtcpPacket};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Packets the phone's stream spans (4 s); every tenth (sequence numbers 5, 15, ... 195) is
/// never sent.
const PACKETS: u16 = 200;

/// Binds an RTP socket on an even port and its RTCP socket on the next one.
async fn rtp_pair() -> (UdpSocket, UdpSocket) {
    for port in (17600..17800).step_by(2) {
        if let Ok(rtp) = UdpSocket::bind(("127.0.0.1", port)).await {
            if let Ok(rtcp) = UdpSocket::bind(("127.0.0.1", port + 1)).await {
                return (rtp, rtcp);
            }
        }
    }
    panic!("no free RTP port pair in 17600-17799");
}

async fn recv_sip(sock: &UdpSocket) -> String {
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("a SIP message in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn header<'a>(msg: &'a str, name: &str) -> &'a str {
    msg.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
        .unwrap_or_else(|| panic!("no {name} in\n{msg}"))
}

/// One RTP packet of PCMU.
fn rtp(seq: u16, ts: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&0x5eed_u32.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A duration in units of 1/65536 s (RTCP's DLSR).
fn ntp_short(d: Duration) -> u32 {
    (d.as_secs() * 65536 + u64::from(d.subsec_nanos()) * 65536 / 1_000_000_000) as u32
}

#[tokio::test]
async fn sip_loss_and_round_trip_are_reported_while_the_call_runs_and_at_its_end() {
    let mut config = dev_config();
    config.sip = Some(SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: "16700-16799".into(),
        ..SipConfig::default()
    });
    let server = start(config).await;
    let sip = server.sip_addr().unwrap();
    let mut control = control(&server, 8000, "mixed").await;

    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = phone.local_addr().unwrap();
    let (rtp_sock, rtcp_sock) = rtp_pair().await;
    let rtp_port = rtp_sock.local_addr().unwrap().port();
    let sdp = format!(
        "v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"
    );
    let request = |method: &str, cseq: u32, to_tag: &str, body: &str| {
        let content = if body.is_empty() {
            "Content-Length: 0\r\n\r\n".to_owned()
        } else {
            format!(
                "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        format!(
            "{method} sip:+15559990001@{sip} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK{method}{cseq}\r\n\
             From: <sip:+15551230001@{me}>;tag=phone1\r\n\
             To: <sip:+15559990001@{sip}>{to_tag}\r\n\
             Call-ID: stats-check-1\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:phone@{me}>\r\n\
             Max-Forwards: 70\r\n{content}"
        )
    };
    phone
        .send_to(request("INVITE", 1, "", &sdp).as_bytes(), sip)
        .await
        .unwrap();
    let call_in = control.take_call().await;
    let call_id = call_in["callId"].as_str().unwrap().to_owned();
    let mut media = media(&call_in).await;
    // The server asks for audio as soon as the media connection is up.
    let asked = media.ws.expect_type("buffer_request").await;
    let owed = asked["data"]["requested_bytes"].as_u64().unwrap() as usize;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    let ok = loop {
        let msg = recv_sip(&phone).await;
        if msg.starts_with("SIP/2.0 200") {
            break msg;
        }
        assert!(msg.starts_with("SIP/2.0 1"), "unexpected {msg}");
    };
    let to = header(&ok, "To");
    let tag = to[to.find(";tag=").expect("a To tag")..].to_owned();
    let body = &ok[ok.find("\r\n\r\n").unwrap() + 4..];
    let server_port: u16 = body
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|m| m.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("m=audio port in the answer");
    let server_rtp = SocketAddr::from(([127, 0, 0, 1], server_port));
    let server_rtcp = SocketAddr::from(([127, 0, 0, 1], server_port + 1));
    phone
        .send_to(request("ACK", 1, &tag, "").as_bytes(), sip)
        .await
        .unwrap();

    // The phone streams in real time, every tenth packet lost; the agent answers every
    // buffer request, so the server sends RTP and with it RTCP sender reports. The phone
    // answers the first sender report with a receiver report naming it.
    media.send_audio(&pcm_level(2000, owed / 2)).await;
    let payload = [G711::Pcmu.encode_sample(1000); 160];
    let mut reported = false;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut rtcp_buf = [0u8; 1500];
    for seq in 0..PACKETS {
        ticker.tick().await;
        if seq % 10 != 5 {
            let packet = rtp(seq, u32::from(seq) * 160, &payload);
            rtp_sock.send_to(&packet, server_rtp).await.unwrap();
        }
        // What the server sent the agent meanwhile (a zero timeout still polls once).
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::ZERO, media.ws.next()).await {
            let Message::Text(text) = msg else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == "buffer_request" {
                let bytes = v["data"]["requested_bytes"].as_u64().unwrap() as usize;
                media.send_audio(&pcm_level(2000, bytes / 2)).await;
            }
        }
        while let Ok((n, _)) = rtcp_sock.try_recv_from(&mut rtcp_buf) {
            let arrived = Instant::now();
            let Ok(packets) = RtcpPacket::parse_compound(&rtcp_buf[..n]) else {
                continue;
            };
            let Some(RtcpPacket::SenderReport(sr)) = packets.first() else {
                continue;
            };
            if reported {
                continue;
            }
            // Held a little, as a phone would between reports: the DLSR says how long.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let rr = ReceiverReport {
                ssrc: 0x5eed,
                reports: vec![ReportBlock {
                    ssrc: sr.ssrc,
                    last_sr: (sr.ntp_timestamp >> 16) as u32,
                    delay_since_last_sr: ntp_short(arrived.elapsed()),
                    ..ReportBlock::default()
                }],
            };
            let mut out = [0u8; 128];
            let len = rr.write(&mut out).unwrap();
            rtcp_sock.send_to(&out[..len], server_rtcp).await.unwrap();
            reported = true;
        }
    }
    assert!(reported, "the server sent an RTCP sender report within 4 s");

    // The figures as the leg's task last published them: its tick may not have counted the
    // last packet yet when the first request comes, so wait (bounded) until it has.
    let path = format!("/public/v1/calls/{call_id}/stats");
    let deadline = Instant::now() + WAIT;
    let stats = loop {
        let (status, stats) = http(&server, "GET", &path).await;
        assert_eq!(status, 200, "{stats}");
        let leg = &stats["legs"][0];
        if leg["packets_received"] == 180 && leg.get("rtt_ms").is_some() {
            break stats;
        }
        assert!(Instant::now() < deadline, "figures never settled: {stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let leg = &stats["legs"][0];
    assert_eq!(leg["kind"], "sip", "{stats}");
    assert_eq!(leg["role"], "caller", "{stats}");
    assert_eq!(leg["packets_expected"], 200, "{stats}");
    assert_eq!(leg["packets_lost"], 20, "{stats}");
    assert_eq!(leg["loss_pct"], 10.0, "{stats}");
    // A lost packet is concealed at its tick (or its successor plays late).
    assert!(leg["concealed_ms"].as_u64().unwrap() > 0, "{stats}");
    assert!(leg["playout_gaps"].as_u64().unwrap() > 0, "{stats}");
    // Loopback, plus the up to 20 ms the server's RTCP waits for its tick.
    let rtt = leg["rtt_ms"].as_f64().unwrap();
    assert!((0.0..200.0).contains(&rtt), "{stats}");
    // 10 % loss with G.711 PLC: Ie_eff = 95 * 10 / 35.1 = 27.1, so R is near 66 and MOS
    // about 3.4, whatever the small delay.
    let r = leg["r_factor"].as_f64().unwrap();
    assert!((60.0..66.2).contains(&r), "{stats}");
    let mos = leg["mos"].as_f64().unwrap();
    assert!((3.1..3.45).contains(&mos), "{stats}");
    assert!(
        stats["agent"]["frames_to_agent"].as_u64().unwrap() >= 150,
        "{stats}"
    );
    assert!(
        stats["agent"]["frames_from_agent"].as_u64().unwrap() > 0,
        "{stats}"
    );

    // The phone hangs up: the agent gets the same figures, then the end.
    phone
        .send_to(request("BYE", 2, &tag, "").as_bytes(), sip)
        .await
        .unwrap();
    let event = media.ws.expect_type("call_event").await;
    assert_eq!(event["data"]["event"], "call.stats", "{event}");
    let last: &Value = &event["data"]["legs"][0];
    assert_eq!(last["packets_lost"], 20, "{event}");
    assert_eq!(last["loss_pct"], 10.0, "{event}");
    assert!(last.get("rtt_ms").is_some(), "{event}");
    let event = media.ws.expect_type("call_event").await;
    assert_eq!(event["data"]["event"], "call.terminated", "{event}");
    server.shutdown().await;
}
