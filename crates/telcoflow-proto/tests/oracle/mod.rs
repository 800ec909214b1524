//! What must hold for any frame a peer sends to the wire decoders: no panic, errors or values
//! that survive their own encoding. Shared by `tests/hostile_input.rs` (seeded, bounded, in
//! `cargo test`) and the cargo-fuzz targets under `fuzz/` (coverage-guided), so both check
//! exactly the same things.

// `pub` for the fuzz crate, which includes this file as a public module.
#![allow(unreachable_pub)]

use telcoflow_proto::audio::{pcm_to_samples, samples_to_pcm};
use telcoflow_proto::control::{ClientFrame, FrameHeader, ServerFrame};
use telcoflow_proto::media::{AudioFrame, MediaClientFrame, MediaServerFrame};
use telcoflow_proto::sim::{NetworkFrame, PhoneFrame};

/// Decodes `text` as `T`; a frame that decodes encodes to text that decodes to the same frame.
macro_rules! round_trip {
    ($ty:ty, $text:expr) => {
        if let Ok(frame) = <$ty>::decode($text) {
            let encoded = frame.encode();
            let again = <$ty>::decode(&encoded).unwrap_or_else(|e| {
                panic!("{} re-encoded as {encoded} fails: {e}", stringify!($ty))
            });
            assert_eq!(
                again,
                frame,
                "{} changed by encode then decode",
                stringify!($ty)
            );
        }
    };
}

/// A text frame on the control connection, either direction. Invalid UTF-8 never reaches the
/// decoders (WebSocket text is UTF-8), so bytes are read lossily.
pub fn control(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    round_trip!(ClientFrame, &text);
    round_trip!(ServerFrame, &text);
    if let Ok(frame) = ClientFrame::decode(&text) {
        let _ = frame.req_id();
    }
    if let Some(header) = FrameHeader::peek(&text) {
        let _ = (header.kind, header.req_id);
    }
}

/// A text frame on a media connection, either direction.
pub fn media(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    round_trip!(MediaClientFrame, &text);
    round_trip!(MediaServerFrame, &text);
}

/// A text frame of the simulated-phone protocol, either direction.
pub fn sim(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    round_trip!(PhoneFrame, &text);
    round_trip!(NetworkFrame, &text);
}

/// A binary frame on a media connection: channel byte and PCM, which encode back to the same
/// bytes; the PCM converts to samples and back without loss (a trailing odd byte is not a
/// sample).
pub fn audio(data: &[u8]) {
    match AudioFrame::decode(data) {
        Ok(frame) => {
            assert_eq!(
                frame.to_vec(),
                data,
                "AudioFrame changed by decode then encode"
            );
            let mut samples = Vec::new();
            pcm_to_samples(frame.pcm, &mut samples);
            assert_eq!(samples.len(), frame.pcm.len() / 2);
            let mut pcm = Vec::new();
            samples_to_pcm(&samples, &mut pcm);
            assert_eq!(pcm, frame.pcm[..frame.pcm.len() & !1]);
        }
        Err(_) => assert!(
            data.len() < 2,
            "a frame of {} bytes was refused",
            data.len()
        ),
    }
}

/// Every decoder at once: what a fuzzer's bytes would be wherever they arrived.
pub fn any_frame(data: &[u8]) {
    control(data);
    media(data);
    sim(data);
    audio(data);
}
