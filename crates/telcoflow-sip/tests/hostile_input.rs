//! The SIP and RTP decoders meet hostile input: real messages (the SIPp scenarios' INVITEs,
//! responses and SDP, RTP and RTCP packets) mutated by a seeded generator — bit flips, cuts,
//! splices, repeated runs, huge lengths — must give errors or values that survive their own
//! serialisation, never panics. The checks are `tests/oracle`, the same ones the fuzz targets
//! under `fuzz/` run; this test is their bounded, deterministic run in `cargo test`.

mod oracle;

use std::path::PathBuf;

use telcoflow_sip::sip::message::{MAX_MESSAGE_LEN, Message};
use telcoflow_sip::sip::stream::{StreamDecoder, StreamItem};

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

/// Fragments that steer a mutation towards the grammar's edges.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b"\"",
    b"\\",
    b"=",
    b"/",
    b"@",
    b"[",
    b"]",
    b"\xff",
    b"\xc3",
    b"\0",
    b"Content-Length: ",
    b"l: ",
    b"99999999999999999999",
    b"4294967296",
    b"65536",
    b"-1",
    b"0",
    b"SIP/2.0",
    b"SIP/3.0",
    b"Via: SIP/2.0/TCP [::1]:5060;branch=z9hG4bK;rport",
    b"m=audio 0 RTP/AVP 0",
    b"a=rtpmap:0 PCMU/8000",
    b"a=ptime:0",
    b"c=IN IP6 ::",
    b"\xff\xff",
    b"\x80",
];

/// One mutation of `seed`, sometimes spliced with `other`.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(8) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            1 if at < bytes.len() => bytes[at] = rng.next() as u8,
            2 => bytes.truncate(at),
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                bytes.splice(at..at, token.iter().copied());
            }
            4 => {
                // Splice: this seed's head, the other's tail.
                let from = rng.below(other.len() + 1);
                bytes.truncate(at);
                bytes.extend_from_slice(&other[from..]);
            }
            5 if at < bytes.len() => {
                // A run repeated many times: long lines, many headers, huge fields.
                let end = (at + 1 + rng.below(16)).min(bytes.len());
                let run = bytes[at..end].to_vec();
                let most = if rng.below(8) == 0 { 4000 } else { 40 };
                let times = 1 + rng.below(most);
                let repeated: Vec<u8> = run
                    .iter()
                    .copied()
                    .cycle()
                    .take(run.len() * times)
                    .collect();
                bytes.splice(at..at, repeated);
            }
            6 if at + 1 < bytes.len() => {
                // A binary length field set to an extreme.
                let value: u16 = [0, 1, 0x7fff, 0xffff][rng.below(4)];
                bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
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
fn sip_messages() {
    run("sip", 3_000, 0x5EED_0001, oracle::sip_message);
}

#[test]
fn sip_streams() {
    // Streams of up to 4 KiB, libFuzzer's default length: each is read up to 65 times over (whole,
    // then in reads of 1 to 64 bytes), which keeps the run short in a debug build.
    run("sip_stream", 800, 0x5EED_0002, |data| {
        oracle::sip_stream(&data[..data.len().min(4096)]);
    });
}

#[test]
fn sdp_bodies() {
    run("sdp", 6_000, 0x5EED_0003, oracle::sdp);
}

#[test]
fn rtp_packets() {
    run("rtp", 20_000, 0x5EED_0004, oracle::rtp);
}

#[test]
fn rtcp_packets() {
    run("rtcp", 20_000, 0x5EED_0005, oracle::rtcp);
}

#[test]
fn rtp_sessions() {
    run("rtp_session", 600, 0x5EED_0006, |data| {
        oracle::rtp_session(&data[..data.len().min(4096)]);
    });
}

#[test]
fn sip_endpoints() {
    run("sip_uas", 600, 0x5EED_0007, |data| {
        oracle::sip_uas(&data[..data.len().min(8192)]);
    });
}

#[test]
fn seeds_are_real_messages() {
    // A seed the parser refuses would only ever test the error path.
    for seed in seeds("sip") {
        Message::parse(&seed).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&seed)));
    }
}

#[test]
fn a_flood_of_line_ends_is_not_buffered() {
    // CRs or LFs that never form the CRLFCRLF of a keep-alive used to stay buffered while
    // the decoder waited to see how the run ended: a peer could grow the buffer without bound.
    for byte in [b'\r', b'\n'] {
        let mut decoder = StreamDecoder::new();
        for _ in 0..(4 * MAX_MESSAGE_LEN / 1024) {
            decoder.extend(&[byte; 1024]);
            while let Some(item) = decoder.next_item().expect("line ends are not an error") {
                assert_eq!(item, StreamItem::Pong);
            }
            assert!(
                decoder.buffered() <= 3,
                "{} bytes buffered",
                decoder.buffered()
            );
        }
    }
}
