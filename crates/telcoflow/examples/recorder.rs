//! A recording echo agent: answers every call, records it on the server, plays the caller's
//! voice back, pauses the recording while the caller presses `*` (say, before reading out a
//! card number) and resumes it on `#`. When the call ends, it downloads the recording into
//! the current directory as `<recording id>.wav` (caller left, agent right).
//!
//! Run a server that records (`TELCOFLOW_RECORDING_DIR=/tmp/recordings telcoflow serve`),
//! then:
//!
//! ```text
//! cargo run -p telcoflow --example recorder
//! ```
//!
//! and call it (`telcoflow call +15550100 --play hello.wav`). Credentials and URL come from
//! `TELCOFLOW_API_KEY`, `TELCOFLOW_CONNECTOR_UUID` and `TELCOFLOW_BASE_URL` (defaults: the
//! development connector on `ws://127.0.0.1:8080`).

use futures_util::StreamExt;
use telcoflow::{ActiveCall, AudioChannel, CallEvent, TelcoflowClient, TelcoflowClientConfig};

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
    println!("recording agent ready; Ctrl-C to stop");
    let serving = {
        let client = client.clone();
        let downloads = client.clone();
        tokio::spawn(async move {
            client
                .serve(move |call| record_and_echo(downloads.clone(), call))
                .await
        })
    };
    tokio::signal::ctrl_c().await?;
    client.shutdown().await;
    serving.await??;
    Ok(())
}

/// One call: answer, record, echo; `*` pauses the recording and `#` resumes it.
async fn record_and_echo(client: TelcoflowClient, call: ActiveCall) {
    println!("call {} from {}", call.id(), call.caller());
    if let Err(e) = call.answer().await {
        eprintln!("cannot answer: {e}");
        return;
    }
    let recording = match call.start_recording().await {
        Ok(r) => r.recording_id,
        Err(e) => {
            eprintln!("cannot record: {e}");
            return;
        }
    };
    let keys = {
        let call = call.clone();
        tokio::spawn(async move {
            let mut events = call.events();
            while let Some(event) = events.next().await {
                let result = match event {
                    CallEvent::Dtmf { digit, .. } if digit == "*" => call.pause_recording().await,
                    CallEvent::Dtmf { digit, .. } if digit == "#" => call.resume_recording().await,
                    _ => continue,
                };
                match result {
                    Ok(r) => println!("recording {}: {:?}", r.recording_id, r.state),
                    Err(e) => eprintln!("recording: {e}"),
                }
            }
        })
    };
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    while let Some(chunk) = audio.next().await {
        match call.send_audio(&chunk).await {
            // A full buffer drops this chunk; anything else ends the call.
            Err(e) if !e.is_buffer_full() => break,
            _ => {}
        }
    }
    keys.abort();
    // The call has ended, so has its recording: the download waits for its file.
    let mut wav = Vec::new();
    match client.download_recording(&recording, &mut wav).await {
        Ok(bytes) => match std::fs::write(format!("{recording}.wav"), &wav) {
            Ok(()) => println!("call {} ended; {recording}.wav ({bytes} bytes)", call.id()),
            Err(e) => eprintln!("cannot save {recording}.wav: {e}"),
        },
        Err(e) => eprintln!("cannot download recording {recording}: {e}"),
    }
}
