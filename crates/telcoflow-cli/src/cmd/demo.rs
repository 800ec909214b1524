//! `telcoflow demo`: the whole path in one process.
//!
//! Starts a server with the development connector on a free port, an echo agent on the Rust
//! SDK, and a simulated caller that dials in and says a bundled speech sample in real time.
//! Prints what happened (answered, round trip, bytes both ways) and writes what the caller
//! heard to a WAV file.

use super::agent::{EchoStats, decode_wav_bytes, echo, mean_level};
use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use telcoflow::{SampleRate, TelcoflowClient, TelcoflowClientConfig};
use telcoflow_proto::audio::{pcm_to_samples, samples_to_pcm};
use telcoflow_proto::sim::{NetworkFrame, PhoneFrame, SIM_PATH};
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};
use telcoflow_server::{Config, Server};
use tokio_tungstenite::tungstenite::Message;

/// The speech sample the simulated caller says (16 kHz mono, a few seconds).
const HELLO_WAV: &[u8] = include_bytes!("../../assets/hello.wav");
/// Caller and agent both run at 16 kHz.
const RATE: SampleRate = SampleRate::Hz16000;
/// Mean sample level above which a 20 ms frame counts as voiced.
const VOICED: u32 = 200;
/// How long the caller stays on after the sample, to hear the echo out.
const TAIL: Duration = Duration::from_millis(1500);
/// Give up if the call has not finished by then.
const CALL_LIMIT: Duration = Duration::from_secs(120);

/// Arguments of `telcoflow demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where to write what the caller heard (default: a file in the temp directory).
    #[arg(long)]
    record: Option<PathBuf>,
    /// A WAV file for the caller to say instead of the bundled sample.
    #[arg(long)]
    play: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// What the simulated caller observed.
#[derive(Debug, Default)]
struct CallerReport {
    call_id: Option<String>,
    answered_after: Option<Duration>,
    round_trip: Option<Duration>,
    bytes_sent: usize,
    heard: Vec<u8>,
}

/// Runs `telcoflow demo`.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let speech = match &args.play {
        Some(path) => crate::wav::read_mono(path, RATE.hz())?,
        None => decode_wav_bytes(HELLO_WAV, RATE.hz()).context("bundled speech sample")?,
    };
    let mut speech_pcm = Vec::with_capacity(speech.len() * 2);
    samples_to_pcm(&speech, &mut speech_pcm);

    let mut config = Config::development();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = Server::start(config).await.context("starting the server")?;
    let base_url = server.base_url().to_owned();

    let client_config = TelcoflowClientConfig::builder()
        .api_key(DEV_API_KEY, DEV_CONNECTOR_UUID)
        .base_url(&base_url)
        .sample_rate(RATE)
        .build()?;
    let client = TelcoflowClient::connect(client_config)
        .await
        .context("connecting the agent")?;
    let agent_connection = client.sm_ws_id().unwrap_or_default();
    let (stats_tx, mut stats_rx) = tokio::sync::mpsc::channel::<EchoStats>(4);
    let serving = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .serve(move |call| {
                    let stats_tx = stats_tx.clone();
                    async move {
                        let stats = echo(call).await;
                        let _ = stats_tx.send(stats).await;
                    }
                })
                .await
        })
    };

    let from = "+15550001111";
    let to = "+15550002222";
    let report = tokio::time::timeout(CALL_LIMIT, caller(&base_url, from, to, &speech_pcm))
        .await
        .context("the demo call did not finish in time")??;
    let stats = tokio::time::timeout(Duration::from_secs(10), stats_rx.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    client.shutdown().await;
    serving.await.context("agent task")??;
    server.shutdown().await;

    let record = args.record.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("telcoflow-demo-{}.wav", std::process::id()))
    });
    let mut heard = Vec::new();
    pcm_to_samples(&report.heard, &mut heard);
    crate::wav::write_mono(&record, RATE.hz(), &heard)?;

    let secs = |bytes: usize| bytes as f64 / RATE.bytes_per_second() as f64;
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    if args.json {
        let summary = serde_json::json!({
            "server": base_url,
            "callId": report.call_id,
            "answered": report.answered_after.is_some(),
            "answeredAfterMs": ms(report.answered_after),
            "roundTripMs": ms(report.round_trip),
            "callerToAgentBytes": stats.bytes_in,
            "agentToCallerBytes": stats.bytes_out,
            "callerSentBytes": report.bytes_sent,
            "callerHeardBytes": report.heard.len(),
            "recording": record.display().to_string(),
        });
        println!("{summary}");
    } else {
        println!("Telcoflow demo: one call, end to end, in this process");
        println!("  server         {base_url} (development connector)");
        println!(
            "  agent          echo agent on the Rust SDK, control connection {agent_connection}"
        );
        println!(
            "  call           {from} -> {to}, call id {}",
            report.call_id.as_deref().unwrap_or("?")
        );
        match report.answered_after {
            Some(d) => println!("  answered       yes, {} ms after dialling", d.as_millis()),
            None => println!("  answered       no"),
        }
        match report.round_trip {
            Some(d) => println!(
                "  round trip     {} ms from first word said to first word heard back",
                d.as_millis()
            ),
            None => println!("  round trip     the caller never heard their voice back"),
        }
        println!(
            "  caller->agent  {} bytes ({:.1} s of audio) received by the agent",
            stats.bytes_in,
            secs(stats.bytes_in as usize)
        );
        println!(
            "  agent->caller  {} bytes queued by the agent, {} bytes heard by the caller ({:.1} s)",
            stats.bytes_out,
            report.heard.len(),
            secs(report.heard.len())
        );
        println!(
            "  recording      {} (what the caller heard)",
            record.display()
        );
    }
    if report.answered_after.is_none() || report.round_trip.is_none() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The simulated caller: dials, says `pcm` in real time once answered, listens to the end,
/// hangs up.
async fn caller(base_url: &str, from: &str, to: &str, pcm: &[u8]) -> anyhow::Result<CallerReport> {
    let url = format!("{base_url}{SIM_PATH}");
    // Without Nagle: a 20 ms frame must not wait for the ack of the one before it.
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .context("the simulated caller cannot reach the server")?;
    let dial = PhoneFrame::Dial {
        from: from.into(),
        to: to.into(),
        sample_rate: RATE,
    };
    ws.send(Message::Text(dial.encode().into())).await?;
    let dialled = Instant::now();
    let mut report = CallerReport::default();
    let frames: Vec<&[u8]> = pcm.chunks(RATE.frame_bytes()).collect();
    let mut next = 0;
    let mut first_voiced_sent: Option<Instant> = None;
    let mut answered_at: Option<Instant> = None;
    let mut hung_up = false;
    let mut tail_until: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut samples = Vec::new();
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    pcm_to_samples(&data, &mut samples);
                    if report.round_trip.is_none() && mean_level(&samples) > VOICED {
                        if let Some(sent) = first_voiced_sent {
                            report.round_trip = Some(sent.elapsed());
                        }
                    }
                    if answered_at.is_some() {
                        report.heard.extend_from_slice(&data);
                    }
                }
                Some(Ok(Message::Text(text))) => match NetworkFrame::decode(text.as_str()) {
                    Ok(NetworkFrame::Trying { call_id }) => report.call_id = Some(call_id),
                    Ok(NetworkFrame::Answered { .. }) => {
                        answered_at = Some(Instant::now());
                        report.answered_after = Some(dialled.elapsed());
                    }
                    Ok(NetworkFrame::Hangup { reason, .. }) => {
                        if !hung_up && answered_at.is_none() {
                            bail!("the call ended before it was answered ({})", reason.as_str());
                        }
                        break;
                    }
                    Ok(NetworkFrame::Error { message }) => bail!("network error: {message}"),
                    Ok(_) | Err(_) => {}
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            _ = tick.tick(), if answered_at.is_some() && !hung_up => {
                if let Some(frame) = frames.get(next) {
                    pcm_to_samples(frame, &mut samples);
                    if first_voiced_sent.is_none() && mean_level(&samples) > VOICED {
                        first_voiced_sent = Some(Instant::now());
                    }
                    ws.send(Message::Binary(frame.to_vec().into())).await?;
                    report.bytes_sent += frame.len();
                    next += 1;
                } else {
                    let until = *tail_until.get_or_insert_with(|| tokio::time::Instant::now() + TAIL);
                    if tokio::time::Instant::now() >= until {
                        ws.send(Message::Text(PhoneFrame::Hangup.encode().into())).await?;
                        hung_up = true;
                    }
                }
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn demo_call_is_answered_and_echoed() {
        let record =
            std::env::temp_dir().join(format!("telcoflow-demo-test-{}.wav", std::process::id()));
        let code = run(Args {
            record: Some(record.clone()),
            play: None,
            json: true,
        })
        .await
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS, "answered and heard back");
        let heard = hound::WavReader::open(&record).unwrap();
        assert_eq!(heard.spec().sample_rate, 16000);
        // The caller heard at least as long as they spoke (the echo plus silence).
        let spoken = decode_wav_bytes(HELLO_WAV, RATE.hz()).unwrap().len() as u32;
        assert!(
            heard.duration() >= spoken,
            "{} < {spoken}",
            heard.duration()
        );
        let _ = std::fs::remove_file(record);
    }
}
