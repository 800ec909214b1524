//! `call.send_dtmf` on a SIP call: a phone written here with plain UDP sockets calls in (SIP
//! text by hand) and reads the server's RTP: RFC 4733 events when it offered
//! telephone-event, dual tones in the audio when it did not. Needs no tools.

mod common;

use common::*;
use serde_json::json;
use std::net::SocketAddr;
use telcoflow_server::RunningServer;
use telcoflow_server::config::SipConfig;
use telcoflow_sip::rtp::dtmf_out::detect_digit;
use telcoflow_sip::rtp::g711::G711;
use telcoflow_sip::rtp::packet::{RtpPacket, TelephoneEvent};
use tokio::net::UdpSocket;

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

/// A call in from a hand-written phone, answered by the agent, with the phone's first RTP
/// packet sent. Returns the server, the agent's media connection, the phone's SIP and RTP
/// sockets.
async fn answered_call(
    telephone_event: bool,
    rtp_ports: &str,
) -> (RunningServer, Media, UdpSocket, UdpSocket) {
    let mut config = dev_config();
    config.sip = Some(SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: rtp_ports.into(),
        ..SipConfig::default()
    });
    let server = start(config).await;
    let sip = server.sip_addr().unwrap();
    let mut control = control(&server, 8000, "mixed").await;
    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = phone.local_addr().unwrap();
    let rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rtp_port = rtp.local_addr().unwrap().port();
    let (formats, te) = if telephone_event {
        (
            "0 101",
            "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n",
        )
    } else {
        ("0", "")
    };
    let sdp = format!(
        "v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} RTP/AVP {formats}\r\na=rtpmap:0 PCMU/8000\r\n{te}a=ptime:20\r\n"
    );
    let headers = |method: &str, cseq: u32, branch: &str, to_tag: &str| {
        format!(
            "{method} sip:+15559990001@{sip} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK{branch}\r\n\
             From: <sip:+15551230001@{me}>;tag=phone1\r\n\
             To: <sip:+15559990001@{sip}>{to_tag}\r\n\
             Call-ID: dtmf-out-{rtp_port}\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:phone@{me}>\r\n\
             Max-Forwards: 70\r\n"
        )
    };
    let invite = format!(
        "{}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        headers("INVITE", 1, "inv1", ""),
        sdp.len()
    );
    phone.send_to(invite.as_bytes(), sip).await.unwrap();
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
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
    assert_eq!(
        body.contains("telephone-event"),
        telephone_event,
        "the answer has telephone-event only if offered: {body}"
    );
    let server_rtp: u16 = body
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|m| m.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("m=audio port in the answer");
    let ack = format!(
        "{}Content-Length: 0\r\n\r\n",
        headers("ACK", 1, "ack1", &tag)
    );
    phone.send_to(ack.as_bytes(), sip).await.unwrap();
    // The phone speaks first: the server latches onto its address.
    let mut hello = vec![0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
    hello.extend_from_slice(&[0xFF; 160]);
    rtp.send_to(&hello, SocketAddr::from(([127, 0, 0, 1], server_rtp)))
        .await
        .unwrap();
    (server, media, phone, rtp)
}

async fn recv_rtp(rtp: &UdpSocket, buf: &mut [u8]) -> usize {
    tokio::time::timeout(WAIT, rtp.recv_from(buf))
        .await
        .expect("RTP in time")
        .unwrap()
        .0
}

#[tokio::test]
async fn sip_phone_with_telephone_event_gets_rfc4733_events() {
    let (server, mut media, _phone, rtp) = answered_call(true, "18400-18499").await;
    let resp = media
        .command(
            "call.send_dtmf",
            Some(json!({"digits": "12#", "durationMs": 100})),
        )
        .await;
    assert_eq!(resp["success"], true, "{resp}");
    assert_eq!(resp["result"]["queuedMs"], 420);
    let mut buf = [0u8; 2048];
    // (event, marker, timestamp, end, duration, sequence) of every event packet.
    let mut events = Vec::new();
    let mut last_seq: Option<u16> = None;
    let mut ends = 0;
    for _ in 0..200 {
        let n = recv_rtp(&rtp, &mut buf).await;
        let p = RtpPacket::parse(&buf[..n]).unwrap();
        if let Some(s) = last_seq {
            assert_eq!(p.header.sequence, s.wrapping_add(1), "no sequence gap");
        }
        last_seq = Some(p.header.sequence);
        if p.header.payload_type != 101 {
            assert_eq!(p.header.payload_type, 0, "PCMU or events only");
            if ends == 9 {
                break; // audio again after the last digit
            }
            continue;
        }
        let e = TelephoneEvent::parse(p.payload).unwrap();
        ends += usize::from(e.end);
        events.push((e, p.header.marker, p.header.timestamp));
    }
    assert_eq!(ends, 9, "three end packets per digit");
    let digits: Vec<char> = events
        .iter()
        .filter(|(_, marker, _)| *marker)
        .map(|(e, _, _)| e.digit().unwrap())
        .collect();
    assert_eq!(digits, vec!['1', '2', '#']);
    // Per digit: 5 packets of growing duration (the last one three times, with E), all with
    // the event's first timestamp, the marker on the first only.
    assert_eq!(events.len(), 3 * 7);
    for digit in events.chunks(7) {
        let ts = digit[0].2;
        for (i, (e, marker, t)) in digit.iter().enumerate() {
            assert_eq!(*t, ts, "one timestamp per event");
            assert_eq!(*marker, i == 0);
            assert_eq!(e.duration, 160 * (i.min(4) as u16 + 1));
            assert_eq!(e.end, i >= 4);
            assert_eq!(e.event, digit[0].0.event);
        }
    }
    // 100 ms tone + 60 ms gap between the starts of two events.
    assert_eq!(events[7].2.wrapping_sub(events[0].2), 160 * 8);
    drop(media);
    server.shutdown().await;
}

#[tokio::test]
async fn sip_phone_without_telephone_event_gets_sip_info() {
    let (server, mut media, phone, rtp) = answered_call(false, "18500-18599").await;
    let resp = media
        .command("call.send_dtmf", Some(json!({"digits": "9*D"})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");
    // The default 100 ms per digit.
    assert_eq!(resp["result"]["queuedMs"], 420);
    let mut bodies = Vec::new();
    let mut cseqs = Vec::new();
    while bodies.len() < 3 {
        let msg = recv_sip(&phone).await;
        assert!(msg.starts_with("INFO "), "{msg}");
        assert_eq!(header(&msg, "Content-Type"), "application/dtmf-relay");
        let cseq = header(&msg, "CSeq").to_owned();
        // Retransmissions repeat a CSeq: answer each, count it once.
        let ok = format!(
            "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n",
            header(&msg, "Via"),
            header(&msg, "From"),
            header(&msg, "To"),
            header(&msg, "Call-ID"),
        );
        phone
            .send_to(ok.as_bytes(), server.sip_addr().unwrap())
            .await
            .unwrap();
        if !cseqs.contains(&cseq) {
            cseqs.push(cseq);
            bodies.push(msg[msg.find("\r\n\r\n").unwrap() + 4..].to_owned());
        }
    }
    assert_eq!(
        bodies,
        [
            "Signal=9\r\nDuration=100\r\n",
            "Signal=*\r\nDuration=100\r\n",
            "Signal=D\r\nDuration=100\r\n"
        ]
    );
    // The audio carries no tones meanwhile: the INFO is the DTMF.
    let mut buf = [0u8; 2048];
    let mut pcm = [0i16; 160];
    for _ in 0..25 {
        let n = recv_rtp(&rtp, &mut buf).await;
        let p = RtpPacket::parse(&buf[..n]).unwrap();
        let len = G711::Pcmu.decode(p.payload, &mut pcm);
        assert_eq!(detect_digit(&pcm[..len], 8000), None);
    }
    drop(media);
    server.shutdown().await;
}
