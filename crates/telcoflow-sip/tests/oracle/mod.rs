//! What must hold for any bytes a peer sends to the SIP and RTP decoders: no panic, errors or
//! values that survive their own serialisation. Shared by `tests/hostile_input.rs` (seeded,
//! bounded, in `cargo test`) and the cargo-fuzz targets under `fuzz/` (coverage-guided), so
//! both check exactly the same things.

// `pub` for the fuzz crate, which includes this file as a public module.
#![allow(unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use telcoflow_sip::rtp::g711::G711;
use telcoflow_sip::rtp::jitter::{FRAME_SAMPLES, FrameKind};
use telcoflow_sip::rtp::packet::{
    DtmfReceiver, RtcpPacket, RtcpPackets, RtpPacket, TelephoneEvent, is_rtcp,
};
use telcoflow_sip::rtp::session::{RtpSession, SessionConfig};
use telcoflow_sip::sip::Transport;
use telcoflow_sip::sip::message::{
    Framing, MAX_MESSAGE_LEN, Message, Request, Response, SipHeaders, frame,
};
use telcoflow_sip::sip::sdp::{LocalMedia, SessionDescription, accept_answer, answer};
use telcoflow_sip::sip::stream::{StreamDecoder, StreamItem};
use telcoflow_sip::sip::transaction::Timers;
use telcoflow_sip::sip::uas::{Uas, UasAction, UasConfig, UasEvent};

const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 40000);

/// One SIP datagram (or one framed stream message): every typed accessor, and a message that
/// parses serialises to bytes that parse to the same message (Content-Length rewritten).
pub fn sip_message(data: &[u8]) {
    let _ = frame(data);
    let Ok(parsed) = Message::parse(data) else {
        return;
    };
    match &parsed {
        Message::Request(r) => {
            touch_headers(r);
            let _ = r.validate();
            let mut stamped = r.clone();
            stamped.stamp_source(PEER);
            touch_headers(&stamped);
            let reply = Response::to_request(r, 486, Some("t"));
            touch_headers(&reply);
            let _ = r.ack_for(&reply).to_bytes();
            let _ = r.cancel().to_bytes();
        }
        Message::Response(r) => touch_headers(r),
    }
    let bytes = parsed.to_bytes();
    let again = Message::parse(&bytes).expect("a serialised message parses");
    assert_eq!(
        without_content_length(again),
        without_content_length(parsed),
        "serialise then parse changed the message"
    );
    if bytes.len() <= MAX_MESSAGE_LEN {
        assert_eq!(
            frame(&bytes),
            Ok(Framing::Message(bytes.len())),
            "the stream framer measures a serialised message exactly"
        );
    }
}

fn touch_headers(m: &impl SipHeaders) {
    if let Ok(vias) = m.vias() {
        for via in vias {
            let _ = (via.branch(), via.received(), via.rport(), via.to_string());
        }
    }
    let _ = m.top_via();
    for name_addr in [m.header_from(), m.header_to()].into_iter().flatten() {
        let _ = (name_addr.tag(), name_addr.to_string());
        if let Ok(uri) = name_addr.sip_uri() {
            let _ = uri.to_string();
        }
    }
    if let Ok(Some(contact)) = m.contact() {
        let _ = contact.sip_uri().map(|u| u.to_string());
    }
    let _ = (m.call_id(), m.cseq(), m.max_forwards(), m.content_type());
}

fn without_content_length(mut m: Message) -> Message {
    match &mut m {
        Message::Request(Request { headers, .. }) | Message::Response(Response { headers, .. }) => {
            headers.remove("Content-Length");
        }
    }
    m
}

/// A SIP-over-TCP byte stream. The first input byte picks the read size; the rest is the
/// stream. Cutting the stream into reads changes nothing about the messages taken off it,
/// each of them is framed exactly, and what stays buffered is bounded.
pub fn sip_stream(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(first % 64) + 1;
    let (whole, whole_err) = drain_stream(stream, stream.len().max(1));
    let (chunked, chunked_err) = drain_stream(stream, read_size);
    assert_eq!(whole, chunked, "messages depend on how the stream was read");
    assert_eq!(
        whole_err, chunked_err,
        "errors depend on how the stream was read"
    );
    for m in &whole {
        assert_eq!(frame(m), Ok(Framing::Message(m.len())));
        sip_message(m);
    }
}

/// The messages taken off `stream` read `read_size` bytes at a time, and the error that ended
/// it, if any.
fn drain_stream(
    stream: &[u8],
    read_size: usize,
) -> (
    Vec<Vec<u8>>,
    Option<telcoflow_sip::sip::message::ParseError>,
) {
    let mut decoder = StreamDecoder::new();
    let mut messages = Vec::new();
    let mut fed = 0;
    for read in stream.chunks(read_size) {
        decoder.extend(read);
        fed += read.len();
        loop {
            match decoder.next_item() {
                Ok(Some(StreamItem::Message(m))) => messages.push(m.to_vec()),
                Ok(Some(StreamItem::Ping | StreamItem::Pong)) => {}
                Ok(None) => break,
                Err(e) => return (messages, Some(e)),
            }
        }
        let held = &stream[fed - decoder.buffered()..fed];
        assert!(
            held.len() <= MAX_MESSAGE_LEN,
            "{} bytes buffered",
            held.len()
        );
        // Line ends wait only while they could still become a CRLFCRLF keep-alive.
        if held.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            assert!(held.len() <= 3, "{} line-end bytes buffered", held.len());
        }
    }
    (messages, None)
}

/// An SDP body (an offer in an INVITE or an answer in a 200): parsing, serialising and
/// parsing again gives the same description; negotiation never panics, and our own answer is
/// one we accept with the same codec.
pub fn sdp(data: &[u8]) {
    let Ok(offer) = SessionDescription::parse_bytes(data) else {
        return;
    };
    let text = offer.to_string();
    let again = SessionDescription::parse(&text).expect("a serialised description parses");
    assert_eq!(again, offer, "serialise then parse changed the description");
    for m in &offer.media {
        let _ = (offer.connection_for(m), offer.direction_for(m));
        let _ = (m.telephone_event(), m.payload_types().count());
        for pt in m.payload_types() {
            let _ = m.g711_for(pt);
        }
    }
    let mut local = LocalMedia::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 20000, 42);
    let _ = accept_answer(&local, &offer);
    for hold in [false, true] {
        local.hold = hold;
        let Ok((ours, negotiated)) = answer(&offer, &local) else {
            continue;
        };
        let ours = SessionDescription::parse(&ours.to_string()).expect("our answer parses");
        let accepted = accept_answer(&local, &ours).expect("our own answer is acceptable");
        assert_eq!(
            (
                accepted.codec,
                accepted.payload_type,
                accepted.telephone_event
            ),
            (
                negotiated.codec,
                negotiated.payload_type,
                negotiated.telephone_event
            )
        );
    }
}

/// One RTP datagram: lengths add up, a packet without padding or extension writes back to the
/// same bytes, and telephone events survive a write and a parse.
pub fn rtp(data: &[u8]) {
    let _ = is_rtcp(data);
    let Ok(packet) = RtpPacket::parse(data) else {
        return;
    };
    let extension_len = packet.extension.map_or(0, |e| 4 + e.data.len());
    assert_eq!(
        packet.header.len() + extension_len + packet.payload.len() + usize::from(packet.padding),
        data.len()
    );
    if packet.extension.is_none() && packet.padding == 0 {
        let mut out = vec![0; data.len()];
        let n = packet
            .header
            .write_packet(packet.payload, &mut out)
            .expect("fits");
        assert_eq!(&out[..n], data, "write changed the packet");
    }
    if let Ok(event) = TelephoneEvent::parse(packet.payload) {
        let mut out = [0; TelephoneEvent::LEN];
        event.write(&mut out).expect("fits");
        assert_eq!(TelephoneEvent::parse(&out), Ok(event));
        let _ = DtmfReceiver::default().handle(packet.header.timestamp, &event, 8000);
    }
}

/// One RTCP datagram: the in-place reader and the owned parser agree, and reports that parse
/// write back to bytes that parse to the same reports.
pub fn rtcp(data: &[u8]) {
    let owned = RtcpPacket::parse_compound(data);
    assert_eq!(owned.is_ok(), RtcpPackets::validate(data).is_ok());
    for view in RtcpPackets::new(data).flatten() {
        let _ = (view.packet_type(), view.ntp_timestamp());
        let _ = view.report_blocks().count();
        let _ = view.to_packet();
    }
    let Ok(packets) = owned else {
        return;
    };
    for packet in packets {
        let mut out = vec![0; 28 + 31 * 24];
        let n = match &packet {
            RtcpPacket::SenderReport(sr) => sr.write(&mut out),
            RtcpPacket::ReceiverReport(rr) => rr.write(&mut out),
            _ => continue,
        }
        .expect("a parsed report fits 31 blocks");
        assert_eq!(
            RtcpPacket::parse_compound(&out[..n]),
            Ok(vec![packet]),
            "write then parse changed the report"
        );
    }
}

/// A call leg's RTP port over time: the input is a script of datagrams (from the peer or a
/// stranger, on the RTP or RTCP port) and 20 ms playout ticks. Nothing panics and every tick
/// yields one frame.
pub fn rtp_session(data: &[u8]) {
    let start = Instant::now();
    let mut now = start;
    let mut config = SessionConfig::new(G711::Pcmu, 0x1234_5678, 1000, 160_000);
    config.telephone_event = Some(101);
    let mut session = RtpSession::new(config, PEER, SocketAddr::new(PEER.ip(), 40001), now);
    let stranger = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66)), 5004);
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 4 {
            0 | 1 => {
                let Some((&len, tail)) = rest.split_first() else {
                    break;
                };
                let take = usize::from(len).min(tail.len());
                let (datagram, tail) = tail.split_at(take);
                rest = tail;
                let source = if op & 0x80 == 0 { PEER } else { stranger };
                if op % 4 == 0 {
                    let _ = session.handle_datagram(source, datagram, now);
                    let _ = session.pop_ahead().map(|f| f.kind);
                } else {
                    let _ = session.handle_rtcp_datagram(source, datagram, now);
                }
            }
            2 => {
                now += Duration::from_millis(20);
                let frame = session.pop_frame(now);
                assert!(frame.samples.len() == FRAME_SAMPLES || frame.kind == FrameKind::Ahead);
                let _ = (session.take_clock_shift(), session.take_clock_restart());
                let _ = session.plays_this_tick();
            }
            _ => {
                // A stall of the owner's clock, up to 2.55 s.
                now += Duration::from_millis(10 * u64::from(op >> 2));
                let _ = session.timed_out(now);
                let mut out = [0; 1500];
                let _ = session.write_audio(&[0; 160], &mut out);
                let _ = session.poll_rtcp(now, Duration::from_secs(1_700_000_000), &mut out);
            }
        }
    }
    let _ = session.stats();
}

/// The endpoint that answers calls, fed a script: SIP messages from a peer over UDP or TCP
/// (each a length byte pair then the bytes), the owner's decisions on the latest call
/// (ringing, answer, reject, hang up) and the clock moving on. Nothing panics, and everything
/// the endpoint sends parses, with a request's mandatory headers in place.
pub fn sip_uas(data: &[u8]) {
    let mut now = Instant::now();
    let config = UasConfig {
        contact: "sip:telcoflow@198.51.100.1:5060".into(),
        sent_by: "198.51.100.1:5060".into(),
        timers: Timers::default(),
        user_agent: "telcoflow".into(),
        codecs: telcoflow_sip::rtp::codec::Codec::ALL.to_vec(),
    };
    let mut uas = Uas::new(config, 7);
    let mut latest = None;
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 4 {
            0 | 1 => {
                let Some((len, tail)) = rest.split_first_chunk::<2>() else {
                    break;
                };
                let take = usize::from(u16::from_be_bytes(*len)).min(tail.len());
                let (message, tail) = tail.split_at(take);
                rest = tail;
                let transport = if op % 4 == 0 {
                    Transport::Udp
                } else {
                    Transport::Tcp
                };
                uas.handle_input(transport, PEER, message, now);
            }
            2 => {
                let Some(call) = latest else { continue };
                let action = match (op >> 2) % 4 {
                    0 => UasAction::Ringing,
                    1 => UasAction::Answer {
                        media: LocalMedia::new(
                            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
                            20000,
                            42,
                        ),
                    },
                    2 => UasAction::Reject {
                        status: u16::from(op) * 3,
                    },
                    _ => UasAction::Hangup,
                };
                let _ = uas.handle_action(call, action, now);
            }
            _ => {
                now += Duration::from_millis(50 * u64::from(op >> 2));
                if uas.poll_timeout().is_some_and(|t| t <= now) {
                    uas.handle_timeout(now);
                }
            }
        }
        while let Some(event) = uas.poll_event() {
            if let UasEvent::IncomingCall(call) = event {
                latest = Some(call.call);
            }
        }
        while let Some(transmit) = uas.poll_transmit() {
            let sent = Message::parse(&transmit.payload).unwrap_or_else(|e| {
                let text = String::from_utf8_lossy(&transmit.payload);
                panic!("we sent what we cannot parse ({e}): {text:?}")
            });
            if let Message::Request(request) = sent {
                request
                    .validate()
                    .unwrap_or_else(|e| panic!("we sent an invalid {} ({e})", request.method));
            }
        }
    }
}
