//! An IVR: greets each caller with a prompt read from a WAV file, then answers every key the
//! caller presses with that key's prompt.
//!
//! ```text
//! telcoflow serve &                                     # a development server
//! cargo run -p telcoflow --example ivr -- PROMPTS_DIR
//! ```
//!
//! then call it from the browser phone of the console (http://127.0.0.1:8080/console, the
//! development connector's key) and press keys on its keypad.
//!
//! PROMPTS_DIR holds `greeting.wav` (played when a call is answered) and, each optional, one
//! prompt per key: `0.wav` to `9.wav`, `star.wav`, `hash.wav`, `A.wav` to `D.wav`, and
//! `invalid.wav` for keys without one (without it those keys are only logged). `*` without a
//! prompt of its own repeats the greeting. Files are any 16-bit WAV, mixed to mono and
//! converted to the call's 16 kHz.
//!
//! A key cuts the prompt that is playing (callers who know the menu type ahead):
//! `clear_send_audio_buffer` drops what is still queued here and what the server has not
//! played yet, and the key's prompt follows at once. Server and credentials as in `echo.rs`.

#[path = "support/wav.rs"]
mod wav;

use futures_util::StreamExt;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use telcoflow::{
    ActiveCall, AudioChannel, CallEvent, SampleRate, TelcoflowClient, TelcoflowClientConfig,
};

const RATE: SampleRate = SampleRate::Hz16000;

/// Every key a phone can send, with the name of its prompt file.
const KEYS: [(char, &str); 16] = [
    ('0', "0"),
    ('1', "1"),
    ('2', "2"),
    ('3', "3"),
    ('4', "4"),
    ('5', "5"),
    ('6', "6"),
    ('7', "7"),
    ('8', "8"),
    ('9', "9"),
    ('*', "star"),
    ('#', "hash"),
    ('A', "A"),
    ('B', "B"),
    ('C', "C"),
    ('D', "D"),
];

/// The IVR's prompts, as s16le mono PCM at `RATE`, padded to whole 20 ms frames.
pub struct Prompts {
    pub greeting: Vec<u8>,
    pub keys: HashMap<char, Vec<u8>>,
    pub invalid: Option<Vec<u8>>,
}

impl Prompts {
    /// Reads the prompts of `dir` (see the module's docs for the file names).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| -> anyhow::Result<Option<Vec<u8>>> {
            let path = dir.join(format!("{name}.wav"));
            if !path.exists() {
                return Ok(None);
            }
            let mut pcm = wav::load(&path, RATE)?;
            wav::pad_to_frames(&mut pcm, RATE);
            Ok(Some(pcm))
        };
        let greeting = read("greeting")?
            .ok_or_else(|| anyhow::anyhow!("{} has no greeting.wav", dir.display()))?;
        let mut keys = HashMap::new();
        for (key, name) in KEYS {
            if let Some(pcm) = read(name)? {
                keys.insert(key, pcm);
            }
        }
        let invalid = read("invalid")?;
        Ok(Self {
            greeting,
            keys,
            invalid,
        })
    }

    /// What to play for `key`, if anything.
    pub fn for_key(&self, key: char) -> Option<&[u8]> {
        match self.keys.get(&key) {
            Some(pcm) => Some(pcm),
            None if key == '*' => Some(&self.greeting),
            None => self.invalid.as_deref(),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: ivr PROMPTS_DIR"))?;
    let prompts = Arc::new(Prompts::load(Path::new(&dir))?);
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
    println!("IVR ready with the prompts of {dir}; Ctrl-C to stop");
    let serving = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .serve(move |call| {
                    let prompts = prompts.clone();
                    async move {
                        match answer_keys(&call, &prompts).await {
                            Ok(keys) => println!("call {}: ended; keys {keys:?}", call.id()),
                            Err(e) => eprintln!("call {}: {e}", call.id()),
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

/// Answers `call`, plays the greeting and each pressed key's prompt until the call ends;
/// returns the keys pressed.
pub async fn answer_keys(call: &ActiveCall, prompts: &Prompts) -> Result<String, telcoflow::Error> {
    let mut events = call.events();
    call.answer().await?;
    // Nothing here listens to the caller's voice; reading it keeps the SDK from reporting
    // it dropped.
    let mut heard = call.audio_stream(AudioChannel::Mixed);
    tokio::spawn(async move { while heard.next().await.is_some() {} });
    call.send_audio(&prompts.greeting).await?;
    let mut pressed = String::new();
    while let Some(event) = events.next().await {
        let CallEvent::Dtmf { digit, .. } = event else {
            continue;
        };
        let Some(key) = digit.chars().next() else {
            continue;
        };
        pressed.push(key);
        println!("call {}: key {key}", call.id());
        let Some(prompt) = prompts.for_key(key) else {
            continue;
        };
        call.clear_send_audio_buffer().await?;
        call.send_audio(prompt).await?;
    }
    Ok(pressed)
}
