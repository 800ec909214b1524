//! `telcoflow agent`: a voice agent built on the SDK, against any Telcoflow server.
//!
//! - `telcoflow agent echo`: answers every call and plays the caller's voice back.
//! - `telcoflow agent speak FILE.wav`: answers and plays the file (any WAV, converted to the
//!   call's rate); the moment the caller speaks, by the energy of their audio, it stops.
//!
//! Credentials and URL come from flags or `TELCOFLOW_API_KEY`, `TELCOFLOW_CONNECTOR_UUID`,
//! `TELCOFLOW_BASE_URL`, `TELCOFLOW_CA_CERT`; flags win. The names are the SDK's
//! (`telcoflow::config::ENV_*`, which `TelcoflowClientConfig::from_env` reads too); clap reads
//! the variables, not `from_env`, so that each flag overrides its variable and the default URL
//! is a local server's rather than production's.

use anyhow::Context as _;
use futures_util::StreamExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use telcoflow::config::{ENV_API_KEY, ENV_BASE_URL, ENV_CA_CERT, ENV_CONNECTOR_UUID};
use telcoflow::{
    ActiveCall, AudioChannel, CallError, SampleRate, TelcoflowClient, TelcoflowClientConfig,
};
use telcoflow_proto::audio::{pcm_to_samples, samples_to_pcm};
use tracing::{info, warn};

/// Arguments of `telcoflow agent`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Answer every call and play the caller's own voice back.
    Echo {
        #[command(flatten)]
        conn: Connection,
    },
    /// Answer every call and play a WAV file; stop the moment the caller speaks.
    Speak {
        /// The WAV file (any rate, any channel count; converted to the call's format).
        file: PathBuf,
        /// Mean absolute sample level of caller audio that counts as speech (0..32767).
        #[arg(long, default_value_t = 600)]
        barge_in_level: u32,
        #[command(flatten)]
        conn: Connection,
    },
}

/// How to reach the server.
#[derive(Debug, clap::Args)]
struct Connection {
    /// Server WebSocket base URL; several (the nodes of a cluster), separated by commas,
    /// are tried in turn.
    #[arg(
        long,
        env = ENV_BASE_URL,
        default_value = "ws://127.0.0.1:8080"
    )]
    server: String,
    /// API key of the connector (with --connector-uuid).
    #[arg(
        long,
        env = ENV_API_KEY,
        hide_env_values = true,
        required_unless_present = "client_cert"
    )]
    api_key: Option<String>,
    /// Connector UUID (with --api-key).
    #[arg(
        long,
        env = ENV_CONNECTOR_UUID,
        required_unless_present = "client_cert"
    )]
    connector_uuid: Option<String>,
    /// PEM client certificate: authenticate with mTLS instead of an API key (wss:// only).
    #[arg(long, requires = "client_key", conflicts_with = "api_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// PEM root certificates to trust besides the public ones (a private server's CA).
    #[arg(long, env = ENV_CA_CERT)]
    ca_cert: Option<PathBuf>,
    /// PCM sample rate of the calls: 8000, 16000 or 24000.
    #[arg(long, default_value_t = 16000)]
    sample_rate: u32,
    /// Stop after this many calls have ended (default: run until Ctrl-C).
    #[arg(long)]
    max_calls: Option<usize>,
}

impl Connection {
    fn config(&self) -> anyhow::Result<TelcoflowClientConfig> {
        let rate = SampleRate::from_hz(self.sample_rate)?;
        let mut builder = TelcoflowClientConfig::builder()
            .base_urls(self.server.split(',').map(str::trim))
            .sample_rate(rate);
        builder = match (
            &self.client_cert,
            &self.client_key,
            &self.api_key,
            &self.connector_uuid,
        ) {
            (Some(cert), Some(key), _, _) => builder.mtls(cert, key),
            (_, _, Some(api_key), Some(uuid)) => builder.api_key(api_key, uuid),
            _ => anyhow::bail!(
                "give --api-key and --connector-uuid, or --client-cert and --client-key"
            ),
        };
        if let Some(ca) = &self.ca_cert {
            builder = builder.ca_cert(ca);
        }
        Ok(builder.build()?)
    }
}

/// Runs `telcoflow agent`.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.mode {
        Mode::Echo { conn } => {
            serve(&conn, |call| async move {
                let stats = echo(call).await;
                info!(
                    bytes_in = stats.bytes_in,
                    bytes_out = stats.bytes_out,
                    "call ended"
                );
            })
            .await
        }
        Mode::Speak {
            file,
            barge_in_level,
            conn,
        } => {
            let rate = SampleRate::from_hz(conn.sample_rate)?;
            let samples = crate::wav::read_mono(&file, rate.hz())?;
            let mut pcm = Vec::with_capacity(samples.len() * 2);
            samples_to_pcm(&samples, &mut pcm);
            let pcm: Arc<[u8]> = pcm.into();
            info!(
                file = %file.display(),
                seconds = samples.len() as f64 / f64::from(rate.hz()),
                "loaded"
            );
            serve(&conn, move |call| {
                let pcm = pcm.clone();
                async move {
                    match speak(call, &pcm, barge_in_level).await {
                        Ok(SpeakOutcome::Finished) => info!("call ended; the file was played"),
                        Ok(SpeakOutcome::Interrupted { dropped }) => {
                            info!(dropped, "call ended; the caller interrupted the file");
                        }
                        Err(e) => warn!(error = %e, "call failed"),
                    }
                }
            })
            .await
        }
    }
}

/// Connects and runs `handler` per call until Ctrl-C or `--max-calls`.
async fn serve<F, Fut>(conn: &Connection, handler: F) -> anyhow::Result<ExitCode>
where
    F: Fn(ActiveCall) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let client = TelcoflowClient::connect(conn.config()?)
        .await
        .with_context(|| format!("cannot connect to {}", conn.server))?;
    println!(
        "agent ready on {} (connection {})",
        conn.server,
        client.sm_ws_id().unwrap_or_default()
    );
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let max = conn.max_calls;
    let serving = {
        let client = client.clone();
        let done = done.clone();
        let all_done = all_done.clone();
        let handler = Arc::new(handler);
        tokio::spawn(async move {
            client
                .serve(move |call| {
                    let handler = handler.clone();
                    let done = done.clone();
                    let all_done = all_done.clone();
                    async move {
                        info!(call_id = %call.id(), caller = %call.caller(), "incoming call");
                        handler(call).await;
                        let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                        if max.is_some_and(|m| n >= m) {
                            all_done.notify_one();
                        }
                    }
                })
                .await
        })
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        () = all_done.notified() => {}
    }
    client.shutdown().await;
    serving.await.context("serve task")??;
    println!("handled {} calls", done.load(Ordering::SeqCst));
    Ok(ExitCode::SUCCESS)
}

/// What an echo call moved.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EchoStats {
    /// PCM bytes heard from the caller.
    pub(crate) bytes_in: u64,
    /// PCM bytes queued back to the caller.
    pub(crate) bytes_out: u64,
}

/// Answers and plays the caller's audio back until the call ends.
pub(crate) async fn echo(call: ActiveCall) -> EchoStats {
    let mut stats = EchoStats::default();
    match call.answer().await {
        Ok(_) => {}
        Err(e) if e.is_rejected() => {
            warn!(code = ?e.server_code(), "answer refused");
            return stats;
        }
        Err(e) => {
            warn!(error = %e, "answer failed");
            return stats;
        }
    }
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    while let Some(chunk) = audio.next().await {
        stats.bytes_in += chunk.len() as u64;
        match call.send_audio(&chunk).await {
            Ok(()) => stats.bytes_out += chunk.len() as u64,
            // The caller outruns playout only if the server stalls; dropping is the echo's
            // best answer.
            Err(e) if e.is_buffer_full() => {}
            Err(_) => break,
        }
    }
    stats
}

/// Bytes of the file kept queued ahead of playout while speaking.
const SPEAK_QUEUE: usize = 1 << 19;

/// How a `speak` call went.
#[derive(Debug)]
pub(crate) enum SpeakOutcome {
    /// The whole file was queued and the caller did not talk over it.
    Finished,
    /// The caller spoke; `dropped` bytes of queued audio were discarded.
    Interrupted {
        /// Bytes of the file that were never played.
        dropped: usize,
    },
}

/// Answers, plays `pcm` and stops it the moment the caller speaks.
pub(crate) async fn speak(
    call: ActiveCall,
    pcm: &[u8],
    barge_in_level: u32,
) -> Result<SpeakOutcome, CallError> {
    call.answer().await?;
    let mut audio = call.audio_stream(AudioChannel::Mixed);
    let mut rest = pcm;
    let mut samples = Vec::new();
    let mut loud_chunks = 0;
    let mut outcome = SpeakOutcome::Finished;
    // Feed the file in slices as the ring buffer makes room, listening all the time.
    let mut feed = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            chunk = audio.next() => {
                let Some(chunk) = chunk else { break };
                pcm_to_samples(&chunk, &mut samples);
                let level = mean_level(&samples);
                // Two loud chunks in a row, so one click does not stop the agent.
                loud_chunks = if level >= barge_in_level { loud_chunks + 1 } else { 0 };
                if loud_chunks >= 2 && matches!(outcome, SpeakOutcome::Finished) && (!rest.is_empty() || call.send_audio_buffer_size() > 0) {
                    let dropped = call.clear_send_audio_buffer().await? + rest.len();
                    rest = &[];
                    info!(dropped, "caller spoke: stopped speaking");
                    outcome = SpeakOutcome::Interrupted { dropped };
                }
            }
            _ = feed.tick(), if !rest.is_empty() => {
                // Keep at most half the (default 1 MiB) ring buffer queued so that a slice
                // always fits.
                let room = SPEAK_QUEUE.saturating_sub(call.send_audio_buffer_size());
                let n = room.min(rest.len()) & !1;
                if n > 0 {
                    call.send_audio(&rest[..n]).await?;
                    rest = &rest[n..];
                }
            }
        }
    }
    Ok(outcome)
}

/// Mean absolute sample value.
pub(crate) fn mean_level(samples: &[i16]) -> u32 {
    if samples.is_empty() {
        return 0;
    }
    let sum: u64 = samples.iter().map(|s| u64::from(s.unsigned_abs())).sum();
    u32::try_from(sum / samples.len() as u64).unwrap_or(u32::MAX)
}

/// Decodes an in-memory 16-bit WAV (the bundled sample) as mono s16 at `rate` Hz.
pub(crate) fn decode_wav_bytes(bytes: &[u8], rate: u32) -> anyhow::Result<Vec<i16>> {
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes))?;
    let spec = reader.spec();
    anyhow::ensure!(
        spec.bits_per_sample == 16 && spec.sample_format == hound::SampleFormat::Int,
        "only 16-bit integer WAV data is supported here"
    );
    let channels = usize::from(spec.channels.max(1));
    let interleaved: Vec<i16> = reader.into_samples::<i16>().collect::<Result<_, _>>()?;
    let mono: Vec<i16> = interleaved
        .chunks(channels)
        .map(|f| (f.iter().map(|&s| i32::from(s)).sum::<i32>() / f.len() as i32) as i16)
        .collect();
    crate::wav::resample(&mono, spec.sample_rate, rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_bytes(rate: u32, channels: u16, samples: &[i16]) -> Vec<u8> {
        let mut cursor = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut cursor, spec).unwrap();
        for s in samples {
            w.write_sample(*s).unwrap();
        }
        w.finalize().unwrap();
        cursor.into_inner()
    }

    #[test]
    fn stereo_is_mixed_down_and_rates_converted() {
        let stereo: Vec<i16> = (0..1600).flat_map(|_| [1000i16, 3000]).collect();
        let mono = decode_wav_bytes(&wav_bytes(16000, 2, &stereo), 16000).unwrap();
        assert_eq!(mono.len(), 1600);
        assert!(mono.iter().all(|s| (*s - 2000).abs() <= 1));
        let tone: Vec<i16> = (0..4800)
            .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
            .collect();
        let down = decode_wav_bytes(&wav_bytes(24000, 1, &tone), 8000).unwrap();
        assert_eq!(down.len(), 1600);
        assert!(mean_level(&down) > 3000, "the tone survives conversion");
    }

    /// The caller talks over the file: the agent stops and the caller hears silence.
    #[tokio::test]
    async fn speak_stops_the_moment_the_caller_speaks() {
        use telcoflow_proto::sim::NetworkFrame;
        use telcoflow_sim::SimPhone;
        const WAIT: Duration = Duration::from_secs(20);

        let mut config = telcoflow_server::Config::development();
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let server = telcoflow_server::Server::start(config).await.unwrap();
        let client = TelcoflowClient::connect(
            TelcoflowClientConfig::builder()
                .api_key(
                    telcoflow_server::config::DEV_API_KEY,
                    telcoflow_server::config::DEV_CONNECTOR_UUID,
                )
                .base_url(server.base_url())
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
        // Ten seconds of a steady tone to speak.
        let tone: Vec<i16> = (0..160_000)
            .map(|i| ((i as f32 * 0.07).sin() * 6000.0) as i16)
            .collect();
        let mut pcm = Vec::new();
        samples_to_pcm(&tone, &mut pcm);
        let pcm: Arc<[u8]> = pcm.into();
        let (outcome_tx, mut outcome_rx) = tokio::sync::mpsc::channel(1);
        let serving = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .serve(move |call| {
                        let pcm = pcm.clone();
                        let outcome_tx = outcome_tx.clone();
                        async move {
                            let outcome = speak(call, &pcm, 600).await;
                            let _ = outcome_tx.send(outcome).await;
                        }
                    })
                    .await
            })
        };
        let mut phone = SimPhone::dial(server.base_url(), "+1", "+2", SampleRate::Hz16000)
            .await
            .unwrap();
        phone
            .events()
            .wait_for(WAIT, |f| matches!(f, NetworkFrame::Answered { .. }))
            .await
            .unwrap();
        // The agent is speaking.
        loop {
            let frame = tokio::time::timeout(WAIT, phone.audio().recv())
                .await
                .unwrap()
                .unwrap();
            if mean_level(&frame) > 1000 {
                break;
            }
        }
        // The caller talks: a loud 200 ms.
        let shout = vec![8000i16; 3200];
        let played = phone.control().play(shout).unwrap();
        assert!(played.finished().await);
        // Within a couple of seconds of frames, the caller hears the agent stop for good.
        let mut silent = 0;
        let mut frames = 0;
        while silent < 25 {
            let frame = tokio::time::timeout(WAIT, phone.audio().recv())
                .await
                .unwrap()
                .unwrap();
            silent = if mean_level(&frame) == 0 {
                silent + 1
            } else {
                0
            };
            frames += 1;
            assert!(frames < 100, "the agent kept speaking");
        }
        phone.control().hangup().unwrap();
        let outcome = tokio::time::timeout(WAIT, outcome_rx.recv())
            .await
            .unwrap()
            .unwrap();
        match outcome {
            Ok(SpeakOutcome::Interrupted { dropped }) => assert!(dropped > 100_000, "{dropped}"),
            other => panic!("{other:?}"),
        }
        client.shutdown().await;
        serving.await.unwrap().unwrap();
        server.shutdown().await;
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = Args::augment_args(clap::Command::new("agent"));
        Args::from_arg_matches(&cmd.try_get_matches_from(args)?)
    }

    #[test]
    fn flags_parse_and_credentials_are_required() {
        let args = parse(&[
            "agent",
            "echo",
            "--server",
            "ws://10.0.0.1:9",
            "--api-key",
            "k",
            "--connector-uuid",
            "u",
            "--sample-rate",
            "24000",
            "--max-calls",
            "3",
        ])
        .unwrap();
        let Mode::Echo { conn } = args.mode else {
            panic!("echo")
        };
        assert_eq!(conn.server, "ws://10.0.0.1:9");
        assert_eq!(conn.max_calls, Some(3));
        let several = Connection {
            server: "ws://10.0.0.1:9, ws://10.0.0.2:9".into(),
            ..conn
        };
        assert_eq!(
            several.config().unwrap().base_urls(),
            ["ws://10.0.0.1:9", "ws://10.0.0.2:9"]
        );
        let conn = several;
        assert_eq!(conn.config().unwrap().sample_rate(), SampleRate::Hz24000);
        let args = parse(&[
            "agent",
            "speak",
            "x.wav",
            "--api-key",
            "k",
            "--connector-uuid",
            "u",
        ])
        .unwrap();
        let Mode::Speak { file, conn, .. } = args.mode else {
            panic!("speak")
        };
        assert_eq!(file, PathBuf::from("x.wav"));
        if std::env::var_os("TELCOFLOW_BASE_URL").is_none() {
            assert_eq!(conn.server, "ws://127.0.0.1:8080");
        }
        if std::env::var_os("TELCOFLOW_API_KEY").is_none() {
            assert!(parse(&["agent", "echo", "--connector-uuid", "u"]).is_err());
        }
        let bad = Connection {
            sample_rate: 44100,
            ..conn
        };
        assert!(bad.config().is_err());
        // mTLS instead of an API key: the files are read when the config is built.
        let args = parse(&[
            "agent",
            "echo",
            "--server",
            "wss://h",
            "--client-cert",
            "/nonexistent/c.pem",
            "--client-key",
            "/nonexistent/c.key",
        ]);
        if std::env::var_os("TELCOFLOW_API_KEY").is_none() {
            let Mode::Echo { conn } = args.unwrap().mode else {
                panic!("echo")
            };
            let e = conn.config().unwrap_err().to_string();
            assert!(e.contains("cert_path"), "{e}");
        }
        assert!(
            parse(&[
                "agent",
                "echo",
                "--client-cert",
                "c.pem",
                "--connector-uuid",
                "u"
            ])
            .is_err()
        );
    }

    #[tokio::test]
    async fn echo_agent_stops_after_max_calls() {
        use telcoflow_proto::sim::NetworkFrame;
        use telcoflow_sim::SimPhone;
        let mut config = telcoflow_server::Config::development();
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let server = telcoflow_server::Server::start(config).await.unwrap();
        let agent = tokio::spawn(run(Args {
            mode: Mode::Echo {
                conn: Connection {
                    server: server.base_url().to_owned(),
                    api_key: Some(telcoflow_server::config::DEV_API_KEY.into()),
                    connector_uuid: Some(telcoflow_server::config::DEV_CONNECTOR_UUID.into()),
                    client_cert: None,
                    client_key: None,
                    ca_cert: None,
                    sample_rate: 16000,
                    max_calls: Some(1),
                },
            },
        }));
        let mut phone = SimPhone::dial(server.base_url(), "+1", "+2", SampleRate::Hz16000)
            .await
            .unwrap();
        phone
            .events()
            .wait_for(Duration::from_secs(20), |f| {
                matches!(f, NetworkFrame::Answered { .. })
            })
            .await
            .unwrap();
        phone.control().hangup().unwrap();
        let code = tokio::time::timeout(Duration::from_secs(20), agent)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        server.shutdown().await;
    }

    #[test]
    fn bundled_sample_decodes() {
        let s = decode_wav_bytes(include_bytes!("../../assets/hello.wav"), 16000).unwrap();
        assert!(s.len() > 16000, "a few seconds of speech");
        assert!(mean_level(&s) > 100);
    }
}
