//! The RTP the server sends, checked packet by packet: a phone written here with plain UDP
//! sockets calls in (SIP text by hand), and reads the server's RTP and RTCP. Needs no tools.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use telcoflow_server::config::SipConfig;
use tokio::net::UdpSocket;

/// Binds an RTP socket on an even port and its RTCP socket on the next one.
async fn rtp_pair() -> (UdpSocket, UdpSocket) {
    for port in (17000..17400).step_by(2) {
        if let Ok(rtp) = UdpSocket::bind(("127.0.0.1", port)).await {
            if let Ok(rtcp) = UdpSocket::bind(("127.0.0.1", port + 1)).await {
                return (rtp, rtcp);
            }
        }
    }
    panic!("no free RTP port pair in 17000-17399");
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

#[tokio::test]
async fn sip_rtp_packets_have_steady_sequence_timestamp_and_ssrc_and_rtcp_reports_come() {
    let mut config = dev_config();
    config.sip = Some(SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: "16000-16099".into(),
        ..SipConfig::default()
    });
    let server = start(config).await;
    let sip = server.sip_addr().unwrap();
    let mut control = control(&server, 8000, "mixed").await;

    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = phone.local_addr().unwrap();
    let (rtp, rtcp) = rtp_pair().await;
    let rtp_port = rtp.local_addr().unwrap().port();
    let sdp = format!(
        "v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\n"
    );
    let common_headers = |method: &str, cseq: u32, branch: &str, to_tag: &str| {
        format!(
            "{method} sip:+15559990001@{sip} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK{branch}\r\n\
             From: <sip:+15551230001@{me}>;tag=phone1\r\n\
             To: <sip:+15559990001@{sip}>{to_tag}\r\n\
             Call-ID: rtp-check-1\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:phone@{me}>\r\n\
             Max-Forwards: 70\r\n"
        )
    };
    let invite = format!(
        "{}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        common_headers("INVITE", 1, "inv1", ""),
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
    let server_rtp: u16 = body
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|m| m.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("m=audio port in the answer");
    assert!(body.contains("PCMU/8000"), "{body}");
    let ack = format!(
        "{}Content-Length: 0\r\n\r\n",
        common_headers("ACK", 1, "ack1", &tag)
    );
    phone.send_to(ack.as_bytes(), sip).await.unwrap();
    // The phone speaks first, as phones do: the server sends no more than a few packets to
    // an address that has not sent it RTP.
    let mut hello = vec![0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
    hello.extend_from_slice(&[0xFF; 160]);
    rtp.send_to(&hello, ("127.0.0.1", server_rtp))
        .await
        .unwrap();

    // The agent speaks; the server packetises it every 20 ms.
    for _ in 0..20 {
        media.send_audio(&pcm_level(3000, 160)).await;
    }
    let mut buf = [0u8; 2048];
    let mut last: Option<(u16, u32, u32)> = None;
    for _ in 0..25 {
        let (n, from) = tokio::time::timeout(WAIT, rtp.recv_from(&mut buf))
            .await
            .expect("RTP in time")
            .unwrap();
        assert_eq!(
            from,
            SocketAddr::from(([127, 0, 0, 1], server_rtp)),
            "RTP comes from the SDP port"
        );
        assert_eq!(n, 12 + 160, "20 ms of PCMU per packet");
        assert_eq!(buf[0] >> 6, 2, "RTP version 2");
        assert_eq!(buf[1] & 0x7f, 0, "PCMU payload type");
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if let Some((s, t, c)) = last {
            assert_eq!(seq, s.wrapping_add(1), "sequence steps by one");
            assert_eq!(ts, t.wrapping_add(160), "timestamp steps by 160 samples");
            assert_eq!(ssrc, c, "one SSRC");
        }
        last = Some((seq, ts, ssrc));
    }
    let ssrc = last.unwrap().2;

    // RTCP: a sender report from the RTP port + 1 within its 5 s interval.
    let (n, from) = tokio::time::timeout(Duration::from_secs(8), rtcp.recv_from(&mut buf))
        .await
        .expect("RTCP in time")
        .unwrap();
    assert_eq!(from.port(), server_rtp + 1, "RTCP from the port after RTP");
    assert!(n >= 28, "a sender report");
    assert_eq!(buf[0] >> 6, 2);
    assert_eq!(buf[1], 200, "SR");
    assert_eq!(
        u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
        ssrc,
        "the SR is for the RTP stream"
    );

    let bye = format!(
        "{}Content-Length: 0\r\n\r\n",
        common_headers("BYE", 2, "bye1", &tag)
    );
    phone.send_to(bye.as_bytes(), sip).await.unwrap();
    let resp = loop {
        let msg = recv_sip(&phone).await;
        if header(&msg, "CSeq").contains("BYE") {
            break msg;
        }
    };
    assert!(resp.starts_with("SIP/2.0 200"), "{resp}");
    loop {
        let v = media.ws.expect_type("call_event").await;
        if v["data"]["event"] == "call.terminated" {
            assert_eq!(v["data"]["reason"], "caller", "{v}");
            break;
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn sip_call_beyond_the_connectors_limit_gets_486() {
    let mut config = dev_config();
    config.limits.max_calls_per_connector = 1;
    config.sip = Some(SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: "16100-16199".into(),
        ..SipConfig::default()
    });
    let server = start(config).await;
    let sip = server.sip_addr().unwrap();
    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = phone.local_addr().unwrap();
    let invite = |call: &str| {
        let sdp = "v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                   m=audio 36998 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
        format!(
            "INVITE sip:+15559990001@{sip} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK-{call}\r\n\
             From: <sip:+15551230001@{me}>;tag={call}\r\n\
             To: <sip:+15559990001@{sip}>\r\n\
             Call-ID: {call}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:phone@{me}>\r\n\
             Max-Forwards: 70\r\n\
             Content-Type: application/sdp\r\n\
             Content-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        )
    };
    // The first call rings (nobody takes it); the second finds the connector full.
    phone
        .send_to(invite("busy-1").as_bytes(), sip)
        .await
        .unwrap();
    loop {
        let msg = recv_sip(&phone).await;
        if header(&msg, "Call-ID") == "busy-1" && msg.starts_with("SIP/2.0 100") {
            break;
        }
    }
    phone
        .send_to(invite("busy-2").as_bytes(), sip)
        .await
        .unwrap();
    let refused = loop {
        let msg = recv_sip(&phone).await;
        if header(&msg, "Call-ID") == "busy-2" && !msg.starts_with("SIP/2.0 1") {
            break msg;
        }
    };
    assert!(refused.starts_with("SIP/2.0 486"), "{refused}");
    server.shutdown().await;
}
