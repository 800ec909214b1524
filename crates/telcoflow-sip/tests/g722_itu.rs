//! Our G.722 (`telcoflow_sip::rtp::g722`) against the ITU-T G.722 Appendix II digital test
//! sequences, word for word.
//!
//! The sequences are ITU copyright material and are not in the repository. To run the test,
//! put the ASCII files (`g722-ascii/` of the G.722 test vector distribution: `T1C1.XMT`,
//! `T2R1.COD`, ...) in a directory and name it:
//!
//! ```text
//! G722_ITU_VECTORS=/path/to/g722-ascii cargo test -p telcoflow-sip --test g722_itu
//! ```
//!
//! Without `G722_ITU_VECTORS` each test prints a notice and passes; with it, a missing file,
//! a line whose checksum is wrong, or any differing value fails.
//!
//! The sequences drive the sub-band ADPCM coders with the QMF bypassed (so the QMF is left to
//! `tests/g722_ffmpeg.rs`). Encoder: each input word, a 16-bit sample, is the sample of both
//! bands (shifted right once to the coders' 15 bits); the 8-bit code must equal the upper byte
//! of the reference word. Decoder, mode 1 (64 kbit/s, the only mode SIP legs use): each code
//! (the upper byte of its word) is decoded; the lower band's output, shifted left once, must
//! equal the `.RC1` word and the upper band's the `.RC0` word. The 56 and 48 kbit/s outputs
//! (`.RC2`, `.RC3`) are not checked: the codec has no such modes.
//!
//! A word with its lowest bit set is the reset pattern (`0001`): it starts and ends every
//! file, sits at the same places in input and reference, and puts the coder back in its
//! starting state; nothing is compared there. Every file is two `/* */` comment lines and
//! lines of sixteen 4-digit hex words plus a 2-digit checksum (the two's complement of the sum
//! of the line's 64 characters, as ASCII), which is checked too.

use std::path::{Path, PathBuf};
use telcoflow_sip::rtp::g722::{G722Decoder, G722Encoder};

/// The directory `G722_ITU_VECTORS` names, or `None` (with a notice) when it is unset.
fn vectors_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("G722_ITU_VECTORS").map(PathBuf::from);
    if dir.is_none() {
        eprintln!("skipped {test}: G722_ITU_VECTORS is not set (see tests/g722_itu.rs)");
    }
    dir
}

/// The 16-bit words of one sequence file, each line's checksum checked.
fn read_sequence(dir: &Path, name: &str) -> Vec<u16> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (G722_ITU_VECTORS is set)", path.display()));
    let mut words = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with("/*") {
            continue;
        }
        let where_ = format!("{} line {}", path.display(), n + 1);
        assert!(
            line.len() == 66 && line.bytes().all(|b| b.is_ascii_hexdigit()),
            "{where_}: not 16 words and a checksum: {line:?}"
        );
        let (data, check) = line.split_at(64);
        let sum = data.bytes().fold(0u8, |s, b| s.wrapping_add(b));
        let check = u8::from_str_radix(check, 16).unwrap();
        assert_eq!(sum.wrapping_add(check), 0, "{where_}: checksum");
        for i in (0..64).step_by(4) {
            words.push(u16::from_str_radix(&data[i..i + 4], 16).unwrap());
        }
    }
    assert!(!words.is_empty(), "{}: no data", path.display());
    words
}

fn is_reset(word: u16) -> bool {
    word & 1 == 1
}

/// Values compared and differences found, the first few described.
#[derive(Default)]
struct Tally {
    compared: usize,
    differ: usize,
    first: Vec<String>,
}

impl Tally {
    fn check(&mut self, what: &str, index: usize, got: u16, want: u16) {
        self.compared += 1;
        if got != want {
            self.differ += 1;
            if self.first.len() < 10 {
                self.first
                    .push(format!("{what}[{index}]: got {got:04X}, want {want:04X}"));
            }
        }
    }

    fn assert_none_differ(&self, test: &str) {
        assert!(self.compared > 0, "{test}: nothing compared");
        assert_eq!(
            self.differ,
            0,
            "{test}: {} of {} values differ:\n{}",
            self.differ,
            self.compared,
            self.first.join("\n")
        );
        eprintln!("{test}: {} values compared, all equal", self.compared);
    }
}

/// Encodes `input` with the QMF bypassed and compares the codes with `codes`.
fn encoder_test(input: &str, codes: &str) {
    let test = format!("encoder {input} -> {codes}");
    let Some(dir) = vectors_dir(&test) else {
        return;
    };
    let (input_words, code_words) = (read_sequence(&dir, input), read_sequence(&dir, codes));
    assert_eq!(input_words.len(), code_words.len(), "{test}: lengths");
    let mut encoder = G722Encoder::new();
    let mut tally = Tally::default();
    for (i, (&x, &want)) in input_words.iter().zip(&code_words).enumerate() {
        if is_reset(x) {
            assert!(is_reset(want), "{test}: reset at {i} in {input} only");
            encoder = G722Encoder::new();
            continue;
        }
        // Reinterpreted as the 16-bit sample it is; both bands take its 15 upper bits.
        let sample = i32::from(x as i16) >> 1;
        let code = encoder.encode_bands(sample, sample);
        tally.check(codes, i, u16::from(code), want >> 8);
    }
    tally.assert_none_differ(&test);
}

/// Decodes `codes` (64 kbit/s) with the QMF bypassed and compares the lower band's output
/// with `low` and the upper band's with `high`.
fn decoder_test(codes: &str, low: &str, high: &str) {
    let test = format!("decoder {codes} -> {low} + {high}");
    let Some(dir) = vectors_dir(&test) else {
        return;
    };
    let code_words = read_sequence(&dir, codes);
    let (low_words, high_words) = (read_sequence(&dir, low), read_sequence(&dir, high));
    assert_eq!(code_words.len(), low_words.len(), "{test}: lengths");
    assert_eq!(code_words.len(), high_words.len(), "{test}: lengths");
    let mut decoder = G722Decoder::new();
    let mut tally = Tally::default();
    for (i, &word) in code_words.iter().enumerate() {
        if is_reset(word) {
            assert!(
                is_reset(low_words[i]) && is_reset(high_words[i]),
                "{test}: reset at {i} in {codes} only"
            );
            decoder = G722Decoder::new();
            continue;
        }
        let (rlow, rhigh) = decoder.decode_bands((word >> 8) as u8);
        // The 15-bit band outputs, as the 16-bit words the files hold.
        tally.check(low, i, (rlow << 1) as u16, low_words[i]);
        tally.check(high, i, (rhigh << 1) as u16, high_words[i]);
    }
    tally.assert_none_differ(&test);
}

#[test]
fn encoder_t1c1_to_t2r1() {
    encoder_test("T1C1.XMT", "T2R1.COD");
}

#[test]
fn encoder_t1c2_to_t2r2() {
    encoder_test("T1C2.XMT", "T2R2.COD");
}

#[test]
fn decoder_t2r1_to_t3l1_t3h1() {
    decoder_test("T2R1.COD", "T3L1.RC1", "T3H1.RC0");
}

#[test]
fn decoder_t2r2_to_t3l2_t3h2() {
    decoder_test("T2R2.COD", "T3L2.RC1", "T3H2.RC0");
}

#[test]
fn decoder_t1d3_to_t3l3_t3h3() {
    decoder_test("T1D3.COD", "T3L3.RC1", "T3H3.RC0");
}
