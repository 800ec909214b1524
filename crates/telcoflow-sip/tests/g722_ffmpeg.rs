//! Our G.722 (`telcoflow_sip::rtp::g722`) against an independent implementation: FFmpeg's `g722` encoder and decoder (libavcodec), bit for bit.
//!
//! The ITU-T G.722 test sequences (Appendix II, run by `tests/g722_itu.rs` when they are at
//! hand) bypass the QMF and are not redistributable. FFmpeg's codec is a separate
//! implementation that passes them, so agreeing with it bit for bit on a wide range of signals
//! (a sweep across the whole 50-7000 Hz band, a tone above 4 kHz, speech-like noise, and
//! arbitrary codes on the decoder side, which reach every quantiser level) checks the whole
//! codec, QMF included, on every run.
//!
//! The signals are made by sox when the test runs; nothing is stored. Needs `sox` and `ffmpeg`
//! (`apt-get install sox ffmpeg`, as `.ci/run` does): without them the test fails when `CI`
//! is set and is skipped otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use telcoflow_sip::rtp::g722::{G722Decoder, G722Encoder};

/// Whether `sox` and `ffmpeg` run; without them under CI, a failure.
fn tools_present() -> bool {
    let runs = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let present = runs("sox", "--version") && runs("ffmpeg", "-version");
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "sox and ffmpeg are needed (apt-get install sox ffmpeg)"
        );
        eprintln!("skipped: sox or ffmpeg is not installed");
    }
    present
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("telcoflow-g722-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Raw 16 kHz mono s16le made by sox: `effects` after `synth`.
fn sox_signal(dir: &Path, name: &str, effects: &[&str]) -> Vec<i16> {
    let path = dir.join(format!("{name}.raw"));
    run(Command::new("sox")
        .args(["-n", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed"])
        .arg(&path)
        .args(effects));
    samples(&std::fs::read(&path).unwrap())
}

fn samples(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn ffmpeg(args: &[&str], input: &Path, output: &Path) {
    run(Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(&args[..args.len() / 2])
        .arg("-i")
        .arg(input)
        .args(&args[args.len() / 2..])
        .arg(output));
}

/// FFmpeg's G.722 encoding of `pcm`.
fn ffmpeg_encode(dir: &Path, pcm: &[i16]) -> Vec<u8> {
    let input = dir.join("in.raw");
    let bytes: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(&input, bytes).unwrap();
    let output = dir.join("out.g722");
    ffmpeg(
        &["-f", "s16le", "-ar", "16000", "-ac", "1", "-f", "g722"],
        &input,
        &output,
    );
    std::fs::read(output).unwrap()
}

/// FFmpeg's G.722 decoding of `codes`.
fn ffmpeg_decode(dir: &Path, codes: &[u8]) -> Vec<i16> {
    let input = dir.join("in.g722");
    std::fs::write(&input, codes).unwrap();
    let output = dir.join("out.raw");
    ffmpeg(&["-f", "g722", "-f", "s16le"], &input, &output);
    samples(&std::fs::read(output).unwrap())
}

/// Ours, 20 ms (320 samples, 160 bytes) at a time as the RTP session does.
fn our_encode(pcm: &[i16]) -> Vec<u8> {
    let mut enc = G722Encoder::new();
    let mut out = Vec::new();
    for frame in pcm.chunks(320) {
        let mut bytes = [0u8; 160];
        let n = enc.encode(frame, &mut bytes);
        out.extend_from_slice(&bytes[..n]);
    }
    out
}

fn our_decode(codes: &[u8]) -> Vec<i16> {
    let mut dec = G722Decoder::new();
    let mut out = Vec::new();
    for frame in codes.chunks(160) {
        let mut pcm = [0i16; 320];
        let n = dec.decode(frame, &mut pcm);
        out.extend_from_slice(&pcm[..n]);
    }
    out
}

/// Index and values of the first difference, for the failure message.
fn first_difference<T: PartialEq + Copy>(a: &[T], b: &[T]) -> Option<(usize, T, T)> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map(|i| (i, a[i], b[i]))
}

/// Test signals: a sweep over the whole band, a loud 5 kHz tone (only the upper sub-band
/// carries it), clipped pink noise (every code of both sub-bands), and silence.
fn signals(dir: &Path) -> Vec<(&'static str, Vec<i16>)> {
    vec![
        (
            "sweep",
            sox_signal(
                dir,
                "sweep",
                &["synth", "4", "sine", "50:7950", "vol", "0.7"],
            ),
        ),
        (
            "tone5k",
            sox_signal(dir, "tone5k", &["synth", "1", "sine", "5000", "vol", "0.9"]),
        ),
        (
            "noise",
            sox_signal(dir, "noise", &["synth", "2", "pinknoise", "vol", "1.5"]),
        ),
        ("silence", vec![0; 3200]),
    ]
}

#[test]
fn encoder_matches_ffmpeg_bit_for_bit() {
    if !tools_present() {
        return;
    }
    let dir = scratch("enc");
    for (name, pcm) in signals(&dir) {
        assert_eq!(pcm.len() % 320, 0, "{name}: whole frames");
        let theirs = ffmpeg_encode(&dir, &pcm);
        let ours = our_encode(&pcm);
        assert_eq!(ours.len(), pcm.len() / 2, "{name}");
        assert_eq!(theirs.len(), ours.len(), "{name}");
        assert_eq!(
            first_difference(&ours, &theirs),
            None,
            "{name}: (byte, ours, ffmpeg's)"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn decoder_matches_ffmpeg_bit_for_bit() {
    if !tools_present() {
        return;
    }
    let dir = scratch("dec");
    let mut streams: Vec<(&str, Vec<u8>)> = signals(&dir)
        .into_iter()
        .map(|(name, pcm)| (name, ffmpeg_encode(&dir, &pcm)))
        .collect();
    // Arbitrary codes, as a corrupted or hostile stream would carry (xorshift, fixed seed).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let arbitrary = (0..16_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    streams.push(("arbitrary", arbitrary));
    for (name, codes) in streams {
        let theirs = ffmpeg_decode(&dir, &codes);
        let ours = our_decode(&codes);
        assert_eq!(ours.len(), codes.len() * 2, "{name}");
        assert_eq!(theirs.len(), ours.len(), "{name}");
        assert_eq!(
            first_difference(&ours, &theirs),
            None,
            "{name}: (sample, ours, ffmpeg's)"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Signal-to-noise ratio (dB) of a round trip through ours of a sox-made tone at `hz`.
fn round_trip_snr(dir: &Path, hz: u32) -> f64 {
    let freq = hz.to_string();
    let pcm = sox_signal(dir, "tone", &["synth", "1", "sine", &freq, "vol", "0.5"]);
    let back = our_decode(&our_encode(&pcm));
    // The two QMF filters delay by 22 samples in all.
    let (mut signal, mut noise) = (0.0f64, 0.0f64);
    for (want, got) in pcm[1000..15000].iter().zip(&back[1022..15022]) {
        signal += f64::from(*want).powi(2);
        noise += (f64::from(*want) - f64::from(*got)).powi(2);
    }
    10.0 * (signal / noise.max(1.0)).log10()
}

/// What a round trip keeps: a 1 kHz tone in the lower band (6 bits a sample) nearly whole, a
/// 5 kHz tone (beyond narrowband: only the upper band, 2 bits a sample, carries it) with the
/// upper band's coarser SNR. Bit-exact with FFmpeg already says the codec is right; this says
/// the wideband path is audible.
#[test]
fn round_trip_keeps_tones_in_both_bands() {
    if !tools_present() {
        return;
    }
    let dir = scratch("trip");
    for (hz, least_db) in [(1000, 30.0), (5000, 18.0)] {
        let snr = round_trip_snr(&dir, hz);
        eprintln!("{hz} Hz: SNR {snr:.1} dB");
        assert!(snr > least_db, "{hz} Hz: SNR {snr:.1} dB");
    }
    let _ = std::fs::remove_dir_all(dir);
}
