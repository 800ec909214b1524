//! An echo agent: answers every call and plays the caller's voice back.
//!
//! Run a server (`telcoflow serve`), then:
//!
//! ```text
//! cargo run -p telcoflow --example echo
//! ```
//!
//! and call it (`telcoflow call +15550100 --play hello.wav`). Credentials and URL come from
//! `TELCOFLOW_API_KEY`, `TELCOFLOW_CONNECTOR_UUID` and `TELCOFLOW_BASE_URL` (defaults: the
//! development connector on `ws://127.0.0.1:8080`).

use futures_util::StreamExt;
use telcoflow::{ActiveCall, AudioChannel, TelcoflowClient, TelcoflowClientConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
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
        .build()?;
    let client = TelcoflowClient::connect(config).await?;
    println!("echo agent ready; Ctrl-C to stop");
    let serving = {
        let client = client.clone();
        tokio::spawn(async move { client.serve(echo).await })
    };
    tokio::signal::ctrl_c().await?;
    client.shutdown().await;
    serving.await??;
    Ok(())
}

/// One call: answer, then send every chunk heard straight back.
async fn echo(call: ActiveCall) {
    println!("call {} from {}", call.id(), call.caller());
    if let Err(e) = call.answer().await {
        eprintln!("cannot answer: {e}");
        return;
    }
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    while let Some(chunk) = audio.next().await {
        match call.send_audio(&chunk).await {
            // A full buffer drops this chunk; anything else ends the call.
            Err(e) if !e.is_buffer_full() => break,
            _ => {}
        }
    }
    println!("call {} ended", call.id());
}
