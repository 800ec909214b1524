//! The IVR example against the real server: a simulated phone hears the greeting, presses
//! keys, and hears each key's prompt cut in at once; prompts come from WAV files on disk.

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/ivr.rs"]
mod ivr;

use common::*;
use std::path::PathBuf;
use std::time::Duration;
use telcoflow::TelcoflowClient;
use telcoflow_proto::sim::NetworkFrame;

const FRAME: usize = 640;

/// Writes `seconds` of a sine at `hz` as a 16-bit WAV at `rate` with `channels` channels.
fn write_tone(path: &std::path::Path, hz: f32, seconds: f32, rate: u32, channels: u16) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..(seconds * rate as f32) as u32 {
        let s = (std::f32::consts::TAU * hz * i as f32 / rate as f32).sin() * 8000.0;
        for _ in 0..channels {
            w.write_sample(s as i16).unwrap();
        }
    }
    w.finalize().unwrap();
}

/// The tone a 20 ms frame at 16 kHz carries, told by its zero crossings (2 f / 50 per
/// frame), or None for silence and anything else.
fn tone_of(frame: &[u8]) -> Option<u32> {
    let s: Vec<i16> = frame
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    if s.iter().map(|v| u32::from(v.unsigned_abs())).max()? < 2000 {
        return None;
    }
    let crossings = s.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
    [440, 660, 880]
        .into_iter()
        .find(|hz| crossings.abs_diff((hz * 2 / 50) as usize) <= 3)
}

/// Hears frames until one carries `hz`; returns how many frames that took.
async fn hear_tone(phone: &mut Phone, hz: u32, within_frames: usize) -> usize {
    for n in 1..=within_frames {
        phone.hear(phone.heard.len() + FRAME).await;
        let last = &phone.heard[phone.heard.len() - FRAME..];
        if tone_of(last) == Some(hz) {
            return n;
        }
    }
    panic!("no {hz} Hz within {within_frames} frames");
}

/// The tones of the next `frames` frames heard.
async fn next_tones(phone: &mut Phone, frames: usize) -> Vec<Option<u32>> {
    let start = phone.heard.len();
    phone.hear(start + frames * FRAME).await;
    phone.heard[start..start + frames * FRAME]
        .chunks_exact(FRAME)
        .map(tone_of)
        .collect()
}

fn prompts_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "telcoflow-ivr-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    // A long greeting, so that a key surely cuts it.
    write_tone(&dir.join("greeting.wav"), 440.0, 10.0, 16_000, 1);
    // Another rate and two channels: the example converts them.
    write_tone(&dir.join("1.wav"), 880.0, 0.5, 8_000, 2);
    write_tone(&dir.join("invalid.wav"), 660.0, 0.3, 24_000, 1);
    dir
}

#[tokio::test]
async fn keys_cut_the_prompt_playing_and_play_their_own() {
    let dir = prompts_dir();
    let prompts = ivr::Prompts::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(prompts.for_key('1').is_some() && prompts.for_key('7').is_some());

    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    let ivr = tokio::spawn(async move { ivr::answer_keys(&call, &prompts).await });
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;

    // The greeting plays.
    hear_tone(&mut phone, 440, 50).await;
    assert!(
        next_tones(&mut phone, 10)
            .await
            .iter()
            .all(|t| *t == Some(440))
    );

    // Key 1 cuts it: its prompt follows within the server's playout (a few frames), and
    // after its 25 frames comes silence, not the rest of the greeting.
    phone
        .control()
        .dtmf('1', Duration::from_millis(100))
        .unwrap();
    let waited = hear_tone(&mut phone, 880, 50).await;
    assert!(waited <= 30, "prompt 1 began {waited} frames after the key");
    let after = next_tones(&mut phone, 60).await;
    let played = after.iter().take_while(|t| **t == Some(880)).count();
    assert!(
        (18..=25).contains(&played),
        "prompt 1 lasted {played} frames: {after:?}"
    );
    assert!(
        after[played + 2..].iter().all(Option::is_none),
        "silence after the prompt: {after:?}"
    );

    // A key without a prompt gets the invalid-key prompt.
    phone
        .control()
        .dtmf('7', Duration::from_millis(100))
        .unwrap();
    hear_tone(&mut phone, 660, 50).await;

    phone.hangup();
    let pressed = tokio::time::timeout(WAIT, ivr)
        .await
        .expect("the IVR returns when the call ends")
        .unwrap()
        .unwrap();
    assert_eq!(pressed, "17");
    client.shutdown().await;
    server.shutdown().await;
}
