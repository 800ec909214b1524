//! Decoders meet hostile input: random bytes, truncated frames and mutated valid frames must
//! give errors, never panics. A small deterministic generator keeps the run reproducible.

use telcoflow_proto::control::{ClientFrame, FrameHeader, ServerFrame};
use telcoflow_proto::media::{AudioFrame, MediaClientFrame, MediaServerFrame};
use telcoflow_proto::sim::{NetworkFrame, PhoneFrame};

/// xorshift64*: deterministic, good enough to scatter bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

const SAMPLES: &[&str] = &[
    r#"{"type":"setup","data":{"sampleRate":24000,"audioMode":"isolated"}}"#,
    r#"{"type":"session.open","sessionId":"s1","reqId":"r1"}"#,
    r#"{"type":"session.create","channel":"TELCO","remoteAddress":"+1","reqId":"r2"}"#,
    r#"{"type":"command","data":{"command_id":"c1","command":"call.connect","timeout_ms":30000,"data":{"ringTimeSeconds":30}}}"#,
    r#"{"type":"buffer_request","data":{"requested_bytes":1920,"prefer_audio_frame_bytes":640,"channelId":0}}"#,
    r#"{"type":"dial","from":"+1","to":"+2","sampleRate":8000}"#,
    r#"{"type":"call.in","sessionId":"s","callId":"c","orgUuid":"o","from":"+1","to":"+2","url":"ws://x","token":"t"}"#,
];

fn decode_all(text: &str) {
    let _ = ClientFrame::decode(text);
    let _ = ServerFrame::decode(text);
    let _ = MediaClientFrame::decode(text);
    let _ = MediaServerFrame::decode(text);
    let _ = PhoneFrame::decode(text);
    let _ = NetworkFrame::decode(text);
    let _ = FrameHeader::peek(text);
}

#[test]
fn mutated_frames_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..20_000 {
        let sample = SAMPLES[round % SAMPLES.len()].as_bytes();
        let mut bytes = sample.to_vec();
        for _ in 0..(rng.next() % 4 + 1) {
            let at = (rng.next() as usize) % bytes.len();
            match rng.next() % 3 {
                0 => bytes[at] = rng.next() as u8,
                1 => bytes.truncate(at),
                _ => bytes.insert(at, b"{}[]\",:0-e\\"[(rng.next() % 11) as usize]),
            }
            if bytes.is_empty() {
                break;
            }
        }
        decode_all(&String::from_utf8_lossy(&bytes));
        let _ = AudioFrame::decode(&bytes);
    }
}

#[test]
fn every_truncation_of_valid_frames_is_an_error_or_a_frame() {
    for sample in SAMPLES {
        for end in 0..sample.len() {
            decode_all(&sample[..end]);
        }
    }
    for len in 0..4 {
        let frame = vec![7u8; len];
        assert_eq!(AudioFrame::decode(&frame).is_ok(), len >= 2);
    }
}

#[test]
fn deeply_nested_json_is_refused_not_overflowed() {
    let deep = "[".repeat(100_000);
    decode_all(&deep);
    let deep_obj = format!("{{\"type\":\"setup\",\"data\":{}}}", "[".repeat(50_000));
    assert!(ClientFrame::decode(&deep_obj).is_err());
}
