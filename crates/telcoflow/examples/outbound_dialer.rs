//! An outbound dialer: calls a number, plays a WAV file (or a tone) once it is answered, and
//! hangs up.
//!
//! ```text
//! telcoflow serve &                                  # a development server
//! telcoflow phone --number +4917001 &                # someone to call (answers)
//! cargo run -p telcoflow --example outbound_dialer -- +4917001 crates/telcoflow-cli/assets/hello.wav
//! ```
//!
//! Without a file it plays two seconds of a 440 Hz tone. The connection takes no inbound
//! calls (`setup_call_flow`), so that a dialer on a busy connector is not offered them.
//! `create_session` returns the call ringing; `answer` waits for the pick-up and says why
//! when there is none. Server and credentials as in `echo.rs`.

#[path = "support/wav.rs"]
mod wav;

use futures_util::StreamExt;
use std::time::Duration;
use telcoflow::{
    AudioChannel, CallFlow, CallState, Error, ErrorCode, InboundCalls, SampleRate, TelcoflowClient,
    TelcoflowClientConfig,
};

const RATE: SampleRate = SampleRate::Hz16000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let number = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: outbound_dialer NUMBER [FILE.wav]"))?;
    let mut pcm = match args.next() {
        Some(path) => wav::load(std::path::Path::new(&path), RATE)?,
        None => wav::tone(440.0, Duration::from_secs(2), RATE),
    };
    // The server takes whole 20 ms frames: pad the tail with silence so that it plays too.
    wav::pad_to_frames(&mut pcm, RATE);
    let frame = wav::frame_bytes(RATE);
    // The default buffer holds 32 s at 16 kHz; longer audio is cut there.
    pcm.truncate((1 << 20) / frame * frame);
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
    client
        .setup_call_flow(
            &CallFlow::new()
                .inbound_call(InboundCalls::No)
                .outbound_call(true),
        )
        .await?;
    let result = dial(&client, &number, &pcm).await;
    client.shutdown().await;
    result
}

async fn dial(client: &TelcoflowClient, number: &str, pcm: &[u8]) -> anyhow::Result<()> {
    let call = match client.create_session(number).await {
        Ok(call) => call,
        Err(Error::RequestFailed { code, message }) if code == ErrorCode::NoRoute => {
            anyhow::bail!("no route: {message}")
        }
        Err(e) => return Err(e.into()),
    };
    println!("calling {number} (call {})", call.id());
    if let Err(e) = call.answer().await {
        // Busy, no answer, refused: the server's code says which.
        anyhow::bail!("{number} did not answer: {e}");
    }
    // Nothing here listens to the far end; reading its audio keeps the SDK from reporting
    // it dropped.
    let mut heard = call.audio_stream(AudioChannel::Mixed);
    tokio::spawn(async move { while heard.next().await.is_some() {} });
    println!(
        "{number} answered; playing {} ms",
        pcm.len() * 500 / RATE.hz() as usize
    );
    call.send_audio(pcm).await?;
    // The server pulls the audio at its playout pace: the buffer empties as it is played.
    let playing = async {
        while call.send_audio_buffer_size() > 0 && call.state() != CallState::Terminated {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What the server pulled last is still on its way to the phone.
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    tokio::select! {
        () = playing => {
            call.close().await?;
            println!("done; hung up");
        }
        () = call.terminated() => println!("{number} hung up first"),
    }
    Ok(())
}
