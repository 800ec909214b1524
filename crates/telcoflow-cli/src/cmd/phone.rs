//! `telcoflow phone`: a simulated phone waiting at a number.
//!
//! Registers at `--number`, then for each incoming call: refuses it (`--reject`), lets it ring
//! (`--no-answer`), or answers after `--answer-after` seconds, plays `--play` once answered and
//! records what it hears until the call ends (or `--hangup-after` seconds after answering).
//! Stdout carries one JSON line when registered and one per call:
//!
//! ```text
//! {"event":"registered","number":"+15550100"}
//! {"event":"call","call_id":"…","from":"+1555…","to":"+15550100","answered":true,"rejected":false,"seconds_sent":2.0,"seconds_received":2.0,"hangup_by":"remote","reason":"remote"}
//! ```
//!
//! With `--once` it exits after the first call. `--record` may contain `{call_id}`, replaced by
//! the call's id; otherwise each call overwrites the file.
//!
//! `--api-key` and `--connector-uuid` (or `TELCOFLOW_API_KEY` and `TELCOFLOW_CONNECTOR_UUID`)
//! authenticate the phone as a connector, as servers other than the development one on
//! loopback require; it may then register only that connector's numbers.

use crate::cmd::call::{PhoneCredentials, seconds, secs_arg};
use crate::wav;
use anyhow::Context;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use telcoflow_proto::SampleRate;
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_sim::{PhoneAudio, PhoneControl, PhoneEvents, SimPhone, ws_base_url};
use tokio::time::Instant;
use tracing::{info, warn};

/// Arguments of `telcoflow phone`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Server base URL (ws://host:port; http:// is accepted too).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    server: String,
    /// The number to wait at.
    #[arg(long)]
    number: String,
    /// Seconds of ringing before answering.
    #[arg(long, default_value_t = 0.0)]
    answer_after: f64,
    /// Refuse every call.
    #[arg(long, conflicts_with = "no_answer")]
    reject: bool,
    /// Never answer: let every call ring until the caller gives up.
    #[arg(long)]
    no_answer: bool,
    /// Hang up this many seconds after answering (default: wait for the far end).
    #[arg(long)]
    hangup_after: Option<f64>,
    /// WAV file to play once answered (any rate, mono or stereo).
    #[arg(long)]
    play: Option<PathBuf>,
    /// Where to write what the phone hears; `{call_id}` is replaced by the call id.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Exit after the first call.
    #[arg(long)]
    once: bool,
    /// The phone's sample rate: 8000, 16000 or 24000.
    #[arg(long, default_value_t = 16000)]
    sample_rate: u32,
    #[command(flatten)]
    credentials: PhoneCredentials,
}

/// One JSON line on stdout.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    Registered {
        number: String,
    },
    Call {
        call_id: String,
        from: String,
        to: String,
        answered: bool,
        rejected: bool,
        seconds_sent: f64,
        seconds_received: f64,
        hangup_by: &'static str,
        reason: String,
    },
}

fn print(line: &Line) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(line)?);
    Ok(())
}

/// Registers and serves calls until `--once` is satisfied or the connection ends.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rate = SampleRate::from_hz(args.sample_rate)?;
    let answer_after = secs_arg("answer-after", args.answer_after)?;
    let hangup_after = args
        .hangup_after
        .map(|s| secs_arg("hangup-after", s))
        .transpose()?;
    let base = ws_base_url(&args.server)?;
    let clip = match &args.play {
        Some(path) => Some(wav::read_mono(path, rate.hz())?),
        None => None,
    };
    let options = args.credentials.options();
    let phone = SimPhone::register_with(&base, &args.number, rate, options)
        .await
        .with_context(|| format!("cannot register {}", args.number))?;
    print(&Line::Registered {
        number: args.number.clone(),
    })?;
    let (control, mut events, mut audio) = phone.into_parts();
    loop {
        let Some(event) = events.next().await else {
            warn!("the network closed the connection");
            return Ok(ExitCode::FAILURE);
        };
        let NetworkFrame::Incoming { call_id, from, to } = event else {
            continue;
        };
        info!(%call_id, %from, %to, "incoming call");
        let call = Call {
            control: &control,
            events: &mut events,
            audio: &mut audio,
            rate,
        };
        let line = call
            .handle(
                &args,
                call_id,
                from,
                to,
                answer_after,
                hangup_after,
                clip.clone(),
            )
            .await?;
        print(&line)?;
        if args.once {
            control.close();
            return Ok(ExitCode::SUCCESS);
        }
    }
}

struct Call<'a> {
    control: &'a PhoneControl,
    events: &'a mut PhoneEvents,
    audio: &'a mut PhoneAudio,
    rate: SampleRate,
}

impl Call<'_> {
    #[allow(clippy::too_many_arguments)]
    async fn handle(
        self,
        args: &Args,
        call_id: String,
        from: String,
        to: String,
        answer_after: Duration,
        hangup_after: Option<Duration>,
        clip: Option<Vec<i16>>,
    ) -> anyhow::Result<Line> {
        let line = |answered, rejected, sent, received, by, reason: String| Line::Call {
            call_id: call_id.clone(),
            from: from.clone(),
            to: to.clone(),
            answered,
            rejected,
            seconds_sent: seconds(sent, self.rate),
            seconds_received: seconds(received, self.rate),
            hangup_by: by,
            reason,
        };
        if args.reject {
            self.control.reject()?;
            return Ok(line(false, true, 0, 0, "phone", "rejected".into()));
        }
        // Ring: until the answer delay passes (never with --no-answer) or the caller gives up.
        let answer_at = (!args.no_answer).then(|| Instant::now() + answer_after);
        loop {
            tokio::select! {
                // Cancel-safe: mpsc receive.
                ev = self.events.next() => match ev {
                    Some(NetworkFrame::Hangup { reason, .. }) => {
                        return Ok(line(false, false, 0, 0, "remote", reason.as_str().into()));
                    }
                    Some(_) => {}
                    None => return Ok(line(false, false, 0, 0, "network", "closed".into())),
                },
                () = sleep_until_opt(answer_at) => break,
            }
        }
        self.audio.drain();
        let before = self.control.stats();
        self.control.answer()?;
        if let Some(samples) = clip {
            // The Playback handle is not needed: the clip simply plays while the call lasts.
            let _ = self.control.play(samples)?;
        }
        let hang_up_at = hangup_after.map(|d| Instant::now() + d);
        let mut recording = Vec::new();
        let (by, reason) = loop {
            tokio::select! {
                // Cancel-safe: mpsc receive.
                frame = self.audio.recv() => {
                    if let Some(frame) = frame {
                        recording.extend_from_slice(&frame);
                    }
                }
                // Cancel-safe: mpsc receive.
                ev = self.events.next() => match ev {
                    Some(NetworkFrame::Hangup { reason, .. }) => break ("remote", reason.as_str().to_owned()),
                    Some(_) => {}
                    None => break ("network", "closed".to_owned()),
                },
                () = sleep_until_opt(hang_up_at) => {
                    self.control.hangup()?;
                    break ("phone", "hangup_after".to_owned());
                }
            }
        };
        while let Some(frame) = self.audio.try_recv() {
            recording.extend_from_slice(&frame);
        }
        if let Some(path) = &args.record {
            let path = PathBuf::from(path.to_string_lossy().replace("{call_id}", &call_id));
            wav::write_mono(&path, self.rate.hz(), &recording)?;
        }
        let sent = self.control.stats().samples_sent - before.samples_sent;
        Ok(line(true, false, sent, recording.len() as u64, by, reason))
    }
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
