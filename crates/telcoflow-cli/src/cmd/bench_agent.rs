//! `telcoflow bench-agent` (hidden): the Rust SDK echo agent that `telcoflow bench --agent rust`
//! runs as a child process.
//!
//! Answers every call and echoes what it hears, unchanged, except for the bench's in-band
//! markers: a `Speak` frame queues one second of tone, a `Stop` frame clears the send buffer
//! (`clear_send_audio_buffer`, the barge-in path). Prints `ready` once the control connection is
//! up; on SIGTERM or Ctrl-C prints one JSON line with the frames handled and the handling time
//! per frame (receipt to `send_audio` returning), then exits.

use super::bench::marker::{Kind, Marker, tone};
use anyhow::Context;
use futures_util::StreamExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use telcoflow::{ActiveCall, AudioChannel, CallError, TelcoflowClient, TelcoflowClientConfig};
use telcoflow_proto::SampleRate;
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};
use tokio::time::Instant;
use tracing::debug;

/// Arguments of `telcoflow bench-agent`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Server base URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    server: String,
    /// API key.
    #[arg(long, default_value = DEV_API_KEY)]
    api_key: String,
    /// Connector UUID.
    #[arg(long, default_value = DEV_CONNECTOR_UUID)]
    connector_uuid: String,
    /// Sample rate: 8000, 16000 or 24000.
    #[arg(long, default_value_t = 24000)]
    sample_rate: u32,
}

/// Handling time histogram: 1 us buckets up to 10 ms. Fixed size and lock-free, so measuring
/// neither allocates per frame nor grows with the number of calls.
const BUCKETS: usize = 10_000;

struct Histogram {
    buckets: Vec<AtomicU64>,
    max_us: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }

    fn add(&self, us: u64) {
        self.buckets[(us as usize).min(BUCKETS)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    fn frames(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn percentile(&self, p: f64) -> u64 {
        let total = self.frames();
        if total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return i as u64;
            }
        }
        self.max_us.load(Ordering::Relaxed)
    }
}

/// Runs the agent until a signal.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rate = SampleRate::from_hz(args.sample_rate)?;
    let config = TelcoflowClientConfig::builder()
        .api_key(args.api_key, args.connector_uuid)
        .base_url(args.server)
        .sample_rate(rate)
        .build()?;
    let client = TelcoflowClient::connect(config)
        .await
        .context("cannot connect to the server")?;
    let hist = Arc::new(Histogram::new());
    let tone: Arc<Vec<u8>> = Arc::new(
        tone(rate.hz() as usize)
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect(),
    );
    println!("ready");

    let h = hist.clone();
    let serve = client.serve(move |call: ActiveCall| {
        let hist = h.clone();
        let tone = tone.clone();
        async move {
            if let Err(e) = echo(&call, &hist, &tone).await {
                debug!(error = %e, "call ended");
            }
        }
    });
    tokio::select! {
        r = serve => r?,
        r = signal() => r?,
    }
    client.shutdown().await;
    let out = serde_json::json!({
        "frames": hist.frames(),
        "handle_us_p50": hist.percentile(50.0),
        "handle_us_p99": hist.percentile(99.0),
        "handle_us_max": hist.max_us.load(Ordering::Relaxed),
    });
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C or SIGTERM (how `telcoflow bench` stops its children).
async fn signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn echo(call: &ActiveCall, hist: &Histogram, tone: &[u8]) -> Result<(), CallError> {
    call.answer().await?;
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    while let Some(chunk) = audio.next().await {
        let start = Instant::now();
        match Marker::read_pcm(&chunk).map(|m| m.kind) {
            Some(Kind::Speak) => call.send_audio(tone).await?,
            Some(Kind::Stop) => {
                call.clear_send_audio_buffer().await?;
            }
            _ => call.send_audio(&chunk).await?,
        }
        hist.add(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    Ok(())
}
