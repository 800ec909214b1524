//! `telcoflow call`: dial a number as a simulated caller.
//!
//! Plays a WAV in real time once the call is answered (silence without `--play`), records what
//! the caller hears from answer to end, hangs up when the file ends plus `--tail`, when the far
//! end hangs up, or at `--timeout`. Prints one JSON summary line on stdout:
//!
//! ```text
//! {"answered":true,"call_id":"…","time_to_answer_ms":412,"seconds_sent":3.02,"seconds_received":3.0,"hangup_by":"caller","reason":"end_of_audio"}
//! ```
//!
//! `hangup_by` is `caller` (this command hung up; `reason` is `end_of_audio` or `timeout`),
//! `remote` (the network sent `hangup`; `reason` is its reason, e.g. `remote`, `no_answer`,
//! `not_found`, `unavailable` from a draining server) or `network` (the connection closed without a `hangup`; `reason` `closed`).
//! Exit status 0 only when the call was answered.
//!
//! A server other than the development one on loopback wants the phone to authenticate as a
//! connector: `--api-key` and `--connector-uuid` (or `TELCOFLOW_API_KEY` and
//! `TELCOFLOW_CONNECTOR_UUID`, as `serve` reads them); `telcoflow phone` takes the same.

use crate::wav;
use anyhow::Context;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use telcoflow::config::{ENV_API_KEY, ENV_CONNECTOR_UUID};
use telcoflow_proto::SampleRate;
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_sim::{PhoneOptions, SimPhone, ws_base_url};
use tokio::time::Instant;
use tracing::info;

/// How long to wait for the network to confirm our hangup before giving up on it.
const HANGUP_CONFIRM: Duration = Duration::from_secs(2);

/// Arguments of `telcoflow call`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Server base URL (ws://host:port; http:// is accepted too).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    server: String,
    /// Caller number.
    #[arg(long, default_value = "+15551230000")]
    from: String,
    /// Called number.
    #[arg(long)]
    to: String,
    /// WAV file to play once answered (any rate, mono or stereo).
    #[arg(long)]
    play: Option<PathBuf>,
    /// Where to write what the caller hears (mono 16-bit WAV at --sample-rate).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Give up (or hang up) this many seconds after dialling.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Seconds to stay on the line after the played file ends.
    #[arg(long, default_value_t = 1.0)]
    tail: f64,
    /// The phone's sample rate: 8000, 16000 or 24000.
    #[arg(long, default_value_t = 16000)]
    sample_rate: u32,
    #[command(flatten)]
    credentials: PhoneCredentials,
}

/// The connector a simulated phone authenticates as (`telcoflow call` and `telcoflow phone`).
#[derive(Debug, Default, clap::Args)]
pub(crate) struct PhoneCredentials {
    /// API key of the connector to authenticate as (with --connector-uuid); needed by servers
    /// other than the development one on loopback.
    #[arg(long, env = ENV_API_KEY, requires = "connector_uuid")]
    api_key: Option<String>,
    /// UUID of the connector to authenticate as (with --api-key).
    #[arg(long, env = ENV_CONNECTOR_UUID, requires = "api_key")]
    connector_uuid: Option<String>,
}

impl PhoneCredentials {
    /// Phone options carrying these credentials, if any were given.
    pub(crate) fn options(&self) -> PhoneOptions {
        match (&self.api_key, &self.connector_uuid) {
            (Some(key), Some(uuid)) => PhoneOptions::default().credentials(key, uuid),
            _ => PhoneOptions::default(),
        }
    }
}

/// The JSON summary line.
#[derive(Debug, Serialize)]
struct Summary {
    answered: bool,
    call_id: Option<String>,
    time_to_answer_ms: Option<u64>,
    seconds_sent: f64,
    seconds_received: f64,
    hangup_by: &'static str,
    reason: String,
}

fn summary(
    answered: bool,
    call_id: Option<String>,
    time_to_answer: Option<Duration>,
    hangup_by: &'static str,
    reason: String,
) -> Summary {
    Summary {
        answered,
        call_id,
        time_to_answer_ms: time_to_answer.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        seconds_sent: 0.0,
        seconds_received: 0.0,
        hangup_by,
        reason,
    }
}

/// Samples as seconds, rounded to milliseconds.
pub(crate) fn seconds(samples: u64, rate: SampleRate) -> f64 {
    (samples as f64 / f64::from(rate.hz()) * 1000.0).round() / 1000.0
}

/// A seconds flag as a duration.
pub(crate) fn secs_arg(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("--{name} must be a non-negative number of seconds"))
}

/// Places the call and prints the summary.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rate = SampleRate::from_hz(args.sample_rate)?;
    let timeout = secs_arg("timeout", args.timeout)?;
    let tail = secs_arg("tail", args.tail)?;
    let base = ws_base_url(&args.server)?;
    let clip = match &args.play {
        Some(path) => Some(wav::read_mono(path, rate.hz())?),
        None => None,
    };

    let started = Instant::now();
    let deadline = started + timeout;
    let options = args.credentials.options();
    let phone = SimPhone::dial_with(&base, &args.from, &args.to, rate, options).await?;
    let (control, mut events, mut audio) = phone.into_parts();
    let mut call_id: Option<String> = None;

    // Phase 1: until answered, refused or out of time.
    let answered_after = loop {
        let event = tokio::select! {
            // Cancel-safe: mpsc receive.
            ev = events.next() => ev,
            () = tokio::time::sleep_until(deadline) => {
                control.hangup().ok();
                control.close();
                let s = summary(false, call_id, None, "caller", "timeout".into());
                return finish(s, &args, rate, &[]);
            }
        };
        match event {
            Some(NetworkFrame::Trying { call_id: id }) => {
                info!(call_id = %id, "trying");
                call_id = Some(id);
            }
            Some(NetworkFrame::Ringing { call_id: id }) => {
                info!(call_id = %id, "ringing");
                call_id = Some(id);
            }
            Some(NetworkFrame::Answered { call_id: id }) => {
                call_id = Some(id);
                break started.elapsed();
            }
            Some(NetworkFrame::Hangup {
                call_id: id,
                reason,
            }) => {
                let s = summary(
                    false,
                    id.or(call_id),
                    None,
                    "remote",
                    reason.as_str().into(),
                );
                return finish(s, &args, rate, &[]);
            }
            Some(NetworkFrame::Error { message }) => {
                anyhow::bail!("the network refused the call: {message}")
            }
            Some(_) => {}
            None => {
                let s = summary(false, call_id, None, "network", "closed".into());
                return finish(s, &args, rate, &[]);
            }
        }
    };
    info!(
        call_id = call_id.as_deref().unwrap_or(""),
        ms = answered_after.as_millis() as u64,
        "answered"
    );
    let sent_before = control.stats().samples_sent;
    audio.drain();

    // Phase 2: play, record, and end the call.
    let mut recording: Vec<i16> = Vec::new();
    let playback = match clip {
        Some(samples) => Some(control.play(samples)?),
        None => None,
    };
    let mut playback_done = std::pin::pin!(async move {
        match playback {
            Some(p) => {
                p.finished().await;
            }
            // No file: only the timeout or the far end ends the call.
            None => std::future::pending().await,
        }
    });
    let mut hang_up_at = deadline;
    let mut by_timeout = true;
    let mut playing = true;
    let (by, reason) = loop {
        tokio::select! {
            // Cancel-safe: mpsc receive.
            frame = audio.recv() => {
                if let Some(frame) = frame {
                    recording.extend_from_slice(&frame);
                }
            }
            // Cancel-safe: mpsc receive.
            ev = events.next() => match ev {
                Some(NetworkFrame::Hangup { reason, .. }) => break ("remote", reason.as_str().to_owned()),
                Some(_) => {}
                None => break ("network", "closed".to_owned()),
            },
            // Polled to completion once; the guard keeps it from being polled again.
            () = &mut playback_done, if playing => {
                playing = false;
                let tail_end = Instant::now() + tail;
                if tail_end < hang_up_at {
                    hang_up_at = tail_end;
                    by_timeout = false;
                }
            }
            () = tokio::time::sleep_until(hang_up_at) => {
                control.hangup().ok();
                break ("caller", if by_timeout { "timeout" } else { "end_of_audio" }.to_owned());
            }
        }
    };
    if by == "caller" {
        // Keep recording until the network confirms, so the file holds everything heard.
        let confirm = Instant::now() + HANGUP_CONFIRM;
        loop {
            tokio::select! {
                frame = audio.recv() => match frame {
                    Some(frame) => recording.extend_from_slice(&frame),
                    None => break,
                },
                ev = events.next() => match ev {
                    Some(NetworkFrame::Hangup { .. }) | None => break,
                    Some(_) => {}
                },
                () = tokio::time::sleep_until(confirm) => break,
            }
        }
    }
    while let Some(frame) = audio.try_recv() {
        recording.extend_from_slice(&frame);
    }
    control.close();
    let mut s = summary(true, call_id, Some(answered_after), by, reason);
    s.seconds_sent = seconds(control.stats().samples_sent - sent_before, rate);
    s.seconds_received = seconds(recording.len() as u64, rate);
    finish(s, &args, rate, &recording)
}

fn finish(
    summary: Summary,
    args: &Args,
    rate: SampleRate,
    recording: &[i16],
) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.record {
        wav::write_mono(path, rate.hz(), recording)?;
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(if summary.answered {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
