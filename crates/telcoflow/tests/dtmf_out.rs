//! `send_dtmf` against the real server, in process: a simulated phone hears the digits as
//! dual tones, found by Goertzel in what it heard.

mod common;

use common::*;
use std::time::Duration;
use telcoflow::{CallErrorKind, ErrorCode, TelcoflowClient};
use telcoflow_sip::rtp::dtmf_out::detect_digit;

/// The digits heard in s16le PCM at 16 kHz, one per run of 20 ms frames that show it.
fn digits_heard(pcm: &[u8]) -> String {
    let samples: Vec<i16> = pcm
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    let mut heard = String::new();
    let mut last = None;
    for frame in samples.chunks_exact(320) {
        let d = detect_digit(frame, 16_000);
        if let Some(c) = d.filter(|_| d != last) {
            heard.push(c);
        }
        last = d;
    }
    heard
}

#[tokio::test]
async fn the_caller_hears_the_digits_sent() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (mut phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    let result = call
        .send_dtmf("12#", Duration::from_millis(100))
        .await
        .unwrap();
    // Three 100 ms tones, 60 ms apart.
    assert_eq!(result["queuedMs"], 420);
    // The tones and then some silence: at most three seconds of audio.
    let mut heard = String::new();
    for _ in 0..150 {
        phone.hear(phone.heard.len() + 640).await;
        heard = digits_heard(&phone.heard);
        if heard.len() >= 3 {
            break;
        }
    }
    assert_eq!(heard, "12#");
    // The last tone ends, and nothing follows it.
    phone.hear(phone.heard.len() + 640 * 25).await;
    assert_eq!(digits_heard(&phone.heard), "12#");
    let tail = &phone.heard[phone.heard.len() - 640 * 10..];
    assert_eq!(energy(tail), 0, "silence after the digits");
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn bad_digits_or_durations_are_invalid_requests() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    for (digits, ms, says) in [
        ("12x", 100, "'x'"),
        ("", 100, "empty"),
        (&"1".repeat(33)[..], 100, "at most 32"),
        ("1", 39, "durationMs"),
        ("1", 2001, "durationMs"),
    ] {
        let e = call
            .send_dtmf(digits, Duration::from_millis(ms))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), CallErrorKind::Rejected, "{digits:?} {ms}");
        assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
        assert!(e.to_string().contains(says), "{e}");
    }
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}
