//! Decoders meet hostile input: random bytes, truncated frames and mutated valid frames must
//! give errors or frames that survive their own encoding, never panics. A small deterministic
//! generator keeps the run reproducible. The checks of the seeded runs are `tests/oracle`, the
//! same ones the fuzz targets under `fuzz/` run; seeds are `tests/data`, real frames of each
//! connection.

mod oracle;

use std::path::PathBuf;

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

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
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

/// Fragments that steer a mutation towards JSON's edges and the frames' fields.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"-0",
    b"1e999",
    b"-1",
    b"18446744073709551616",
    b"4294967296",
    b"256",
    b"1.5",
    b"\"type\":",
    b"\"data\":{}",
    b"\"sampleRate\":",
    b"\"reqId\":",
    b"\"digit\":\"",
    b"\xff",
    b"\xf0\x9f\x98\x80",
    b"\0",
];

/// One mutation of `seed`, sometimes spliced with `other`.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(7) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            1 if at < bytes.len() => bytes[at] = rng.next() as u8,
            2 => bytes.truncate(at),
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                bytes.splice(at..at, token.iter().copied());
            }
            4 => {
                let from = rng.below(other.len() + 1);
                bytes.truncate(at);
                bytes.extend_from_slice(&other[from..]);
            }
            5 if at < bytes.len() => {
                // A run repeated: long strings, deep nesting, huge numbers.
                let end = (at + 1 + rng.below(8)).min(bytes.len());
                let run = bytes[at..end].to_vec();
                let most = if rng.below(8) == 0 { 2000 } else { 20 };
                let times = 1 + rng.below(most);
                let repeated: Vec<u8> = run
                    .iter()
                    .copied()
                    .cycle()
                    .take(run.len() * times)
                    .collect();
                bytes.splice(at..at, repeated);
            }
            _ if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => bytes.push(rng.next() as u8),
        }
    }
    bytes
}

/// The seed files of `tests/data/<dir>`, in name order.
fn seeds(dir: &str) -> Vec<Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|entry| entry.expect("readable entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("readable seed"))
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {}", path.display());
    seeds
}

/// Runs `check` on every seed as it is, then on `rounds` mutations of them.
fn run(dir: &str, rounds: usize, seed: u64, check: fn(&[u8])) {
    let seeds = seeds(dir);
    for s in &seeds {
        check(s);
    }
    let mut rng = Rng(seed);
    for round in 0..rounds {
        let a = &seeds[round % seeds.len()];
        let b = &seeds[rng.below(seeds.len())];
        check(&mutate(&mut rng, a, b));
    }
}

#[test]
fn control_frames_survive_mutation() {
    run("control", 6_000, 0x5EED_0101, oracle::control);
}

#[test]
fn media_frames_survive_mutation() {
    run("media", 6_000, 0x5EED_0102, oracle::media);
}

#[test]
fn sim_frames_survive_mutation() {
    run("sim", 6_000, 0x5EED_0103, oracle::sim);
}

#[test]
fn audio_frames_survive_mutation() {
    run("audio", 6_000, 0x5EED_0104, oracle::audio);
}

#[test]
fn any_frame_on_any_connection() {
    // A frame meant for one connection arriving on another is refused just as cleanly.
    let all: Vec<Vec<u8>> = ["control", "media", "sim", "audio"]
        .into_iter()
        .flat_map(seeds)
        .collect();
    for frame in &all {
        oracle::any_frame(frame);
    }
}

#[test]
fn seeds_are_real_frames() {
    // A seed no decoder accepts would only ever test the error path.
    use telcoflow_proto::control::{ClientFrame, ServerFrame};
    use telcoflow_proto::media::{MediaClientFrame, MediaServerFrame};
    use telcoflow_proto::sim::{NetworkFrame, PhoneFrame};
    for (dir, decodes) in [
        (
            "control",
            (|t| ClientFrame::decode(t).is_ok() || ServerFrame::decode(t).is_ok())
                as fn(&str) -> bool,
        ),
        ("media", |t| {
            MediaClientFrame::decode(t).is_ok() || MediaServerFrame::decode(t).is_ok()
        }),
        ("sim", |t| {
            PhoneFrame::decode(t).is_ok() || NetworkFrame::decode(t).is_ok()
        }),
    ] {
        for seed in seeds(dir) {
            let text = String::from_utf8(seed).expect("UTF-8 seed");
            assert!(decodes(&text), "{dir} seed does not decode: {text}");
        }
    }
}
