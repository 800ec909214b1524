//! A barge-in agent: speaks a long answer, a mark after each sentence, stops the moment the
//! caller talks over it, and cuts its transcript to what the caller actually heard.
//!
//! ```text
//! cargo run -p telcoflow-cli -- serve                      # a server, in another terminal
//! cargo run -p telcoflow --example barge_in
//! # a caller that keeps quiet for 2.5 s, then talks for a second:
//! sox -n -r 16000 -c 1 talk.wav synth 1 sine 300 vol 0.5 pad 2.5
//! cargo run -p telcoflow-cli -- call --to +15550001 --play talk.wav
//! ```
//!
//! The answer is synthesised here, so that the example needs no files: each word is a short
//! tone (its pitch from the word), 240 ms with the pause after it. An LLM agent would queue its
//! TTS audio the same way, sentence by sentence, with `ActiveCall::mark` after each.
//!
//! When two chunks in a row of the caller's audio are louder than a mean level of 600, the
//! agent interrupts with `interrupt_since(last mark reached)`: the marks say which sentences
//! were heard in full, and `played_ms` how much of the next one was, from which the words
//! heard follow. Those go into the transcript; the rest was never said, as far as the caller
//! knows. The agent prints the transcript and leaves the call (a real one would answer the
//! caller next). Server and credentials as in `echo.rs` (`TELCOFLOW_BASE_URL`, ...).
//! `crates/telcoflow/tests/barge_in_example.rs` runs it against a simulated caller.

use futures_util::StreamExt;
use telcoflow::{
    ActiveCall, AudioChannel, CallEvent, SampleRate, TelcoflowClient, TelcoflowClientConfig,
};

const RATE: SampleRate = SampleRate::Hz16000;
const BARGE_IN_LEVEL: u64 = 600;
/// Each word: a tone, then a pause.
pub const WORD_MS: u64 = 180;
pub const PAUSE_MS: u64 = 60;

pub const ANSWER: [&str; 4] = [
    "Thanks for calling, your order shipped this morning.",
    "It should arrive on Thursday between nine and noon.",
    "You will get a text message with the tracking link.",
    "Is there anything else I can help you with today?",
];

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
        .sample_rate(RATE)
        .build()?;
    let client = TelcoflowClient::connect(config).await?;
    println!("barge-in agent ready; Ctrl-C to stop");
    let serving = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .serve(|call| async move {
                    match converse(&call).await {
                        Ok(heard) => println!("call {}: transcript {heard:?}", call.id()),
                        Err(e) => eprintln!("call {}: {e}", call.id()),
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

/// Speaks [`ANSWER`] and returns what of it the caller heard.
pub async fn converse(call: &ActiveCall) -> Result<Vec<String>, telcoflow::Error> {
    call.answer().await?;
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    let mut events = call.events();
    for (i, sentence) in ANSWER.iter().enumerate() {
        call.send_audio(&say(sentence)).await?;
        call.mark(&format!("s{i}")).await?;
    }
    // Sentences heard in full so far: the marks reached.
    let mut heard_sentences = 0;
    let mut loud = 0;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(CallEvent::Mark { name, cleared: false, .. }) => {
                    heard_sentences = sentence_index(&name) + 1;
                    if heard_sentences == ANSWER.len() {
                        // Said in full.
                        return Ok(ANSWER.iter().map(|s| s.to_string()).collect());
                    }
                }
                Some(_) => {}
                None => break,
            },
            chunk = audio.next() => {
                let Some(chunk) = chunk else { break };
                loud = if level(&chunk) > BARGE_IN_LEVEL { loud + 1 } else { 0 };
                if loud < 2 {
                    continue;
                }
                let got = match heard_sentences {
                    0 => call.interrupt().await?,
                    n => call.interrupt_since(&format!("s{}", n - 1)).await?,
                };
                let partial = words_heard(ANSWER[heard_sentences], got.played_ms);
                println!(
                    "call {}: the caller talked over sentence {} after {} ms of it ({} words heard); {} marks cleared",
                    call.id(),
                    heard_sentences,
                    got.played_ms,
                    partial.split_whitespace().count(),
                    got.cleared_marks.len()
                );
                let mut transcript: Vec<String> =
                    ANSWER[..heard_sentences].iter().map(|s| s.to_string()).collect();
                if !partial.is_empty() {
                    transcript.push(format!("{partial}..."));
                }
                return Ok(transcript);
            }
        }
    }
    // The call ended first: every sentence reached was heard.
    Ok(ANSWER[..heard_sentences]
        .iter()
        .map(|s| s.to_string())
        .collect())
}

fn sentence_index(mark: &str) -> usize {
    mark.trim_start_matches('s').parse().unwrap_or(0)
}

/// The words of `sentence` whose tone had started `played_ms` into it.
fn words_heard(sentence: &str, played_ms: u64) -> String {
    let words = played_ms.div_ceil(WORD_MS + PAUSE_MS) as usize;
    sentence
        .split_whitespace()
        .take(words)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Synthesised "speech" for `sentence`: a tone per word, its pitch from the word's letters.
fn say(sentence: &str) -> Vec<u8> {
    let hz = RATE.hz() as f32;
    let mut pcm = Vec::new();
    for word in sentence.split_whitespace() {
        let pitch = 180.0 + (word.bytes().map(u32::from).sum::<u32>() % 200) as f32;
        let tone = (hz * WORD_MS as f32 / 1000.0) as usize;
        for n in 0..tone {
            // A short fade in and out, so that the words do not click.
            let edge = (n.min(tone - n) as f32 / 160.0).min(1.0);
            let s = (2.0 * std::f32::consts::PI * pitch * n as f32 / hz).sin() * 8000.0 * edge;
            pcm.extend_from_slice(&(s as i16).to_le_bytes());
        }
        let pause = (hz * PAUSE_MS as f32 / 1000.0) as usize;
        pcm.extend(std::iter::repeat_n(0u8, pause * 2));
    }
    pcm
}

/// Mean absolute sample value of s16le PCM.
fn level(pcm: &[u8]) -> u64 {
    let n = (pcm.len() / 2).max(1) as u64;
    pcm.chunks_exact(2)
        .map(|b| u64::from(i16::from_le_bytes([b[0], b[1]]).unsigned_abs()))
        .sum::<u64>()
        / n
}
