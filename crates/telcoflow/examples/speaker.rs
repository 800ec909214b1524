//! A speaker: plays a WAV file to every caller and stops the moment the caller speaks.
//!
//! ```text
//! cargo run -p telcoflow --example speaker -- crates/telcoflow-cli/assets/hello.wav
//! ```
//!
//! The file may be any 16-bit WAV; it is mixed to mono and converted (linearly) to the call's
//! 16 kHz. Barge-in: when two chunks in a row of the caller's audio are louder than a mean
//! level of 600, the agent calls `clear_send_audio_buffer`, which drops what is still queued
//! here and what the server has not played yet. Server and credentials as in `echo.rs`.

#[path = "support/wav.rs"]
mod wav;

use futures_util::StreamExt;
use std::sync::Arc;
use telcoflow::{ActiveCall, AudioChannel, SampleRate, TelcoflowClient, TelcoflowClientConfig};

const RATE: SampleRate = SampleRate::Hz16000;
const BARGE_IN_LEVEL: u64 = 600;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: speaker FILE.wav"))?;
    let mut pcm = wav::load(std::path::Path::new(&path), RATE)?;
    wav::pad_to_frames(&mut pcm, RATE);
    let pcm: Arc<[u8]> = pcm.into();
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let config = TelcoflowClientConfig::builder()
        .api_key(
            env("TELCOFLOW_API_KEY", "dev-api-key"),
            env(
                "TELCOFLOW_CONNECTOR_UUID",
                "00000000-0000-4000-8000-000000000001",
            ),
        )
        .base_url(env("TELCOFLOW_BASE_URL", "ws://127.0.0.1:8080"))
        .sample_rate(RATE)
        .build()?;
    let client = TelcoflowClient::connect(config).await?;
    println!("speaker ready with {path}; Ctrl-C to stop");
    let serving = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .serve(move |call| {
                    let pcm = pcm.clone();
                    async move {
                        if let Err(e) = speak(&call, &pcm).await {
                            eprintln!("call {}: {e}", call.id());
                        }
                    }
                })
                .await
        })
    };
    tokio::signal::ctrl_c().await?;
    client.shutdown().await;
    serving.await??;
    Ok(())
}

async fn speak(call: &ActiveCall, pcm: &[u8]) -> Result<(), telcoflow::Error> {
    call.answer().await?;
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    // The default 1 MiB buffer holds 32 s at 16 kHz; longer files are cut there.
    let queued = &pcm[..pcm.len().min(1 << 20) & !1];
    call.send_audio(queued).await?;
    let mut loud = 0;
    let mut speaking = true;
    while let Some(chunk) = audio.next().await {
        loud = if level(&chunk) > BARGE_IN_LEVEL {
            loud + 1
        } else {
            0
        };
        if speaking && loud >= 2 {
            let dropped = call.clear_send_audio_buffer().await?;
            println!("call {}: caller spoke, dropped {dropped} bytes", call.id());
            speaking = false;
        }
    }
    Ok(())
}

/// Mean absolute sample value of s16le PCM.
fn level(pcm: &[u8]) -> u64 {
    let n = (pcm.len() / 2).max(1) as u64;
    pcm.chunks_exact(2)
        .map(|b| u64::from(i16::from_le_bytes([b[0], b[1]]).unsigned_abs()))
        .sum::<u64>()
        / n
}
