//! `telcoflow bench`: N callers against echo agents, measured end to end.
//!
//! The server runs as a child process (`telcoflow serve` on a free port) unless `--server` is
//! given, and the agents as another (`telcoflow bench-agent` on the Rust SDK, or
//! `bench/python_echo_agent.py` on the official Python SDK), so that each one's CPU and memory
//! can be read from `/proc/<pid>` on its own. The callers run in this process: each streams
//! marked speech in real time (see [`marker`]) and measures every frame's round trip, losses
//! and lateness, and barge-in latency with interrupt probes (see [`caller`]). They dial over
//! the simulated phone network, or with `--sip` over SIP/RTP (see [`sip_caller`]): then the
//! server child also takes SIP on a free UDP port of 127.0.0.1, and everything runs at
//! 8000 Hz, G.711's rate, so that the server only mu-law codes the audio.
//!
//! CPU is measured over a steady window (all calls up: after the ramp plus one second, until
//! the callers stop sending); memory per call is RSS at the end of the window minus RSS before
//! the first call, divided by the calls answered.

pub(crate) mod caller;
mod cluster;
pub(crate) mod marker;
#[cfg(feature = "plot")]
mod plot;
mod scrape;
mod sip_caller;
pub(crate) mod stats;

use anyhow::{Context, bail};
use caller::{CallPlan, CallReport, Progress};
use serde::Serialize;
use stats::{Percentiles, ProcCost, ProcSample, round3};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use telcoflow_proto::SampleRate;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::Instant;

/// How long a child may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for the records of the calls just ended to pass through NATS before the last reading
/// of its counters.
const NATS_SETTLE: Duration = Duration::from_secs(1);
/// Settling time between the last call set up and the start of the CPU window.
const SETTLE: Duration = Duration::from_secs(1);
/// Sample rate without `--sample-rate`, for simulated callers.
const DEFAULT_RATE: u32 = 24_000;
/// First port of the RTP range the server child gets with `--sip`: below Linux's ephemeral
/// range (32768 up), where the callers' own sockets land, for up to about 1,300 calls.
const RTP_LOW: u16 = 30_000;

/// Which agents answer the calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AgentKind {
    /// `telcoflow bench-agent`: an echo agent on the Rust SDK, as a child process.
    Rust,
    /// `bench/python_echo_agent.py` on the official Python SDK, as a child process.
    Python,
    /// Agents already connected to the server.
    External,
}

/// How the callers reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CallerKind {
    /// The simulated phone network (`/v1/sim/phone` WebSockets).
    Sim,
    /// SIP over UDP and RTP (PCMU, 20 ms).
    Sip,
}

impl CallerKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Sim => "sim",
            Self::Sip => "sip",
        }
    }
}

/// Arguments of `telcoflow bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Concurrent calls.
    #[arg(long, default_value_t = 10)]
    calls: usize,
    /// Run several call counts one after the other (e.g. 10,50,100); overrides --calls.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Seconds every call stays up together, after the ramp.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds over which the calls are dialled, evenly spread.
    #[arg(long, default_value_t = 2.0)]
    ramp: f64,
    /// Sample rate of callers and agents: 8000, 16000 or 24000 [default: 24000; with --sip
    /// 8000, the only rate it takes].
    #[arg(long)]
    sample_rate: Option<u32>,
    /// Which agents answer.
    #[arg(long, value_enum, default_value_t = AgentKind::Rust)]
    agent: AgentKind,
    /// An already running server (ws://host:port); by default one is started as a child.
    #[arg(long)]
    server: Option<String>,
    /// Process id of the --server, to measure its CPU and memory.
    #[arg(long, requires = "server")]
    server_pid: Option<u32>,
    /// Process id of the external agents, to measure their CPU and memory.
    #[arg(long)]
    agent_pid: Option<u32>,
    /// Runtime threads of the Rust echo agent: 1 is a single-threaded runtime (like the Python
    /// SDK's asyncio loop), 0 one worker per core.
    #[arg(long, default_value_t = 1, value_name = "N")]
    agent_threads: usize,
    /// Python interpreter for --agent python (a venv with telcoflow==1.0.0).
    #[arg(long, env = "TELCOFLOW_PYTHON", default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The Python echo agent script.
    #[arg(long, default_value = "bench/python_echo_agent.py")]
    python_agent: PathBuf,
    /// Callers over SIP/RTP instead of the simulated network (implies 8000 Hz).
    #[arg(long)]
    sip: bool,
    /// SIP address (UDP) of the --server, for --sip.
    #[arg(long, requires_all = ["sip", "server"])]
    sip_addr: Option<SocketAddr>,
    /// RTP port range of the server child with --sip, LOW-HIGH [default: from 30000, two
    /// ports per call plus a quarter and some to spare].
    #[arg(
        long,
        value_name = "LOW-HIGH",
        requires = "sip",
        conflicts_with = "server"
    )]
    rtp_ports: Option<String>,
    /// Stall the agent process (SIGSTOP, then SIGCONT) for this many milliseconds halfway
    /// through the run, and report the round trip's p50 per second around the stall. Needs an
    /// agent child (--agent rust or python); interrupt probes are off in such a run.
    #[arg(long, value_name = "MS", conflicts_with = "stall_server_ms")]
    stall_agent_ms: Option<u64>,
    /// As --stall-agent-ms, but stall the server child (not with --server).
    #[arg(long, value_name = "MS", conflicts_with = "server")]
    stall_server_ms: Option<u64>,
    /// Also run a cluster of N server children on one nats-server (started with JetStream),
    /// with --calls calls on each node: N x --calls calls dialled over the nodes in turn, the
    /// agents on the first. The single-node run (--calls calls) comes first, then the
    /// cluster's, and the two are compared.
    #[arg(
        long,
        value_name = "N",
        conflicts_with_all = ["server", "sip", "stall_agent_ms", "stall_server_ms"]
    )]
    nodes: Option<usize>,
    /// The nats-server binary for --nodes [default: nats-server on PATH].
    #[arg(long, env = "NATS_SERVER", value_name = "PATH")]
    nats_server: Option<PathBuf>,
    /// Write the figures as JSON here (an object, or {"runs": [...]} for a sweep; with --nodes
    /// {"single_node": ..., "cluster": ..., "cluster_vs_single": ...}).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw CPU, RSS and p99 round trip against the number of calls into this PNG (needs a
    /// build with the `plot` feature).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// CPU and memory of one process, per call.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct AgentHandling {
    /// Frames the agent handled.
    frames: u64,
    /// Receipt to `send_audio` returning, microseconds.
    handle_us_p50: f64,
    handle_us_p99: f64,
    handle_us_max: f64,
}

/// How busy the machine was during the CPU window.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct MachineLoad {
    /// CPUs available.
    cores: usize,
    /// Cores busy on average, every process included (from `/proc/stat`).
    busy_cores: f64,
    /// 1-minute load average at the end of the window.
    loadavg_1m: f64,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunResult {
    pub(crate) calls: usize,
    sample_rate: u32,
    duration_s: f64,
    ramp_s: f64,
    agent_kind: AgentKind,
    /// Runtime threads of the Rust agent (1: single-threaded; 0: one per core); absent for
    /// other agents.
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_threads: Option<usize>,
    /// How the callers came in: `sim` or `sip`.
    callers: CallerKind,
    calls_answered: usize,
    calls_failed: usize,
    /// Answered calls whose hang-up failed (over SIP: the BYE got no 200).
    hangups_failed: usize,
    frames_sent: u64,
    frames_lost: u64,
    frames_duplicated: u64,
    frames_reordered: u64,
    frames_late: u64,
    setup_ms: Percentiles,
    pub(crate) round_trip_ms: Percentiles,
    /// Round trip minus the agent's own handling time (p50): what server, sockets and the
    /// server's 20 ms media clock add.
    server_added_ms: Percentiles,
    interrupt_ms: Percentiles,
    interrupts_failed: u64,
    /// Frames heard carrying another call's marker: crossed audio, always 0 when correct.
    frames_crossed: u64,
    agent_handling: Option<AgentHandling>,
    pub(crate) server: Option<ProcCost>,
    pub(crate) agent: Option<ProcCost>,
    /// CPU of this process (the callers), in cores.
    callers_cpu_cores: f64,
    /// The whole machine during the CPU window: other work competes with the bench.
    machine: MachineLoad,
    /// CPU window used for the per-call-minute figures, seconds.
    window_s: f64,
    /// The first few call failures.
    failures: Vec<String>,
    /// Audio frames the servers dropped on purpose, by cause (their
    /// `telcoflow_frames_dropped_total`, e.g. `stall_catch_up` after a stall): what accounts
    /// for `frames_lost`. Absent when a server's `/metrics` could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_frames_dropped: Option<BTreeMap<String, u64>>,
    /// Round trips around an agent stall (--stall-agent-ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    stall: Option<StallFigures>,
    /// The cluster's own figures, in a --nodes run on the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<cluster::ClusterFigures>,
}

/// A --nodes run: the same calls on one node, then on the cluster.
#[derive(Debug, Clone, Serialize)]
struct ClusterRun {
    single_node: RunResult,
    cluster: RunResult,
    cluster_vs_single: cluster::Comparison,
}

/// Round trip p50 per second around an agent stall.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StallFigures {
    /// Which process was stopped: `agent` or `server`.
    process: &'static str,
    /// How long it was stopped.
    stall_ms: u64,
    /// Per second relative to the stall's start (second 0 holds the stall): the p50 round
    /// trip of the frames heard in it, ms.
    p50_ms_by_second: Vec<(i64, f64)>,
}

/// Runs the bench.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let hz = rate_for(args.sip, args.sample_rate)?;
    if args.sip && args.server.is_some() && args.sip_addr.is_none() {
        bail!("--sip with --server needs --sip-addr, the server's SIP address");
    }
    let rate = SampleRate::from_hz(hz)?;
    let duration = super::call::secs_arg("duration", args.duration)?;
    let ramp = super::call::secs_arg("ramp", args.ramp)?;
    let sizes = if args.sweep.is_empty() {
        vec![args.calls]
    } else {
        args.sweep.clone()
    };
    if sizes.contains(&0) {
        bail!("the number of calls must be at least 1");
    }
    if sizes.iter().any(|&n| n > usize::from(u16::MAX)) {
        bail!("at most {} calls", u16::MAX);
    }
    if duration < Duration::from_secs(1) {
        bail!("--duration must be at least 1 second");
    }
    if args.plot.is_some() && !cfg!(feature = "plot") {
        // Said before the run rather than after minutes of calls.
        bail!(
            "--plot needs a telcoflow built with the plot feature: \
             cargo build --release -p telcoflow-cli --features plot"
        );
    }
    let topology = match args.nodes {
        Some(0) => bail!("--nodes must be at least 1"),
        Some(nodes) => Some((
            nodes,
            cluster::nats_server_bin(args.nats_server.as_deref())?,
        )),
        None => None,
    };
    let mut runs = Vec::new();
    let mut pairs = Vec::new();
    for &n in &sizes {
        let r = run_once(&args, n, rate, duration, ramp, None).await?;
        print_table(&r);
        if let Some((nodes, bin)) = &topology {
            // As many calls on each node as on the single one: a process's CPU per call falls
            // with the calls it carries (its 20 ms ticks serve more of them per wake-up), so
            // only equal loads per process show what the cluster itself costs.
            let total = n
                .checked_mul(*nodes)
                .filter(|&t| t <= usize::from(u16::MAX));
            let total = total.context("too many calls over the nodes")?;
            let c = run_once(&args, total, rate, duration, ramp, Some((*nodes, bin))).await?;
            print_table(&c);
            let figures = c
                .cluster
                .as_ref()
                .context("a cluster run without figures")?;
            let comparison = cluster::Comparison::new(
                &r.setup_ms,
                r.server.as_ref(),
                figures,
                c.server.as_ref(),
            );
            print_comparison(&comparison);
            pairs.push(ClusterRun {
                single_node: r.clone(),
                cluster: c.clone(),
                cluster_vs_single: comparison,
            });
        }
        runs.push(r);
    }
    if runs.len() > 1 {
        print_sweep(&runs);
    }
    if let Some(path) = &args.json {
        let json = match (args.sweep.is_empty(), topology.is_some()) {
            (true, false) => serde_json::to_string_pretty(&runs[0])?,
            (false, false) => serde_json::to_string_pretty(&serde_json::json!({ "runs": runs }))?,
            (true, true) => serde_json::to_string_pretty(&pairs[0])?,
            (false, true) => serde_json::to_string_pretty(&serde_json::json!({ "runs": pairs }))?,
        };
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    #[cfg(feature = "plot")]
    if let Some(path) = &args.plot {
        plot::draw(path, &runs)?;
    }
    let all_answered = runs
        .iter()
        .chain(pairs.iter().map(|p| &p.cluster))
        .all(|r| r.calls_failed == 0 && r.hangups_failed == 0);
    Ok(if all_answered {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The frames every server dropped on purpose, summed by cause; `None` (with a warning) when
/// one cannot be read, e.g. a `--server` whose `/metrics` needs a token.
async fn frames_dropped(base_urls: &[String]) -> Option<BTreeMap<String, u64>> {
    let mut total = BTreeMap::new();
    for url in base_urls {
        match scrape::frames_dropped(url).await {
            Ok(by_cause) => {
                for (cause, n) in by_cause {
                    *total.entry(cause).or_default() += n;
                }
            }
            Err(e) => {
                tracing::warn!(server = %url, "cannot read the server's drop counters: {e:#}");
                return None;
            }
        }
    }
    Some(total)
}

/// A child process and its stdout lines.
struct ChildProc {
    name: &'static str,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    pid: u32,
}

impl ChildProc {
    fn spawn(name: &'static str, mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            // Per-call info logs from hundreds of calls would drown the progress line.
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        let pid = child.id().context("child exited at once")?;
        let stdout = child.stdout.take().context("child stdout not piped")?;
        Ok(Self {
            name,
            child,
            lines: BufReader::new(stdout).lines(),
            pid,
        })
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    async fn wait_line(&mut self, prefix: &str) -> anyhow::Result<String> {
        let name = self.name;
        let found = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = self.lines.next_line().await? {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Ok(rest.to_owned());
                }
            }
            bail!("the {name} exited before it was ready")
        })
        .await;
        match found {
            Ok(r) => r,
            Err(_) => bail!("the {name} was not ready within {READY_TIMEOUT:?}"),
        }
    }

    /// Sends SIGTERM, collects the last stdout line that parses as JSON, waits for the exit.
    async fn stop(mut self) -> Option<serde_json::Value> {
        // SIGTERM through kill(1): the workspace forbids unsafe code, so no libc::kill.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        let mut last = None;
        let read = tokio::time::timeout(STOP_TIMEOUT, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    last = Some(v);
                }
            }
        })
        .await;
        if read.is_err() {
            tracing::warn!(
                process = self.name,
                "did not exit after SIGTERM; killing it"
            );
            let _ = self.child.kill().await;
        }
        let _ = self.child.wait().await;
        last
    }
}

async fn run_once(
    args: &Args,
    n: usize,
    rate: SampleRate,
    duration: Duration,
    ramp: Duration,
    topology: Option<(usize, &std::path::Path)>,
) -> anyhow::Result<RunResult> {
    let exe = std::env::current_exe().context("cannot find the telcoflow binary")?;
    let mut server_children = Vec::new();
    let mut nats = None;
    // One base URL per node (the agents are on the first), the nodes' process ids.
    let (base_urls, server_pids, sip_addr) = match (&args.server, topology) {
        (Some(url), _) => (
            vec![url.clone()],
            args.server_pid.into_iter().collect::<Vec<_>>(),
            args.sip_addr,
        ),
        (None, Some((nodes, bin))) => {
            let server = cluster::Nats::start(bin).await?;
            let mut urls = Vec::new();
            let mut pids = Vec::new();
            for k in 0..nodes {
                let mut cmd = Command::new(&exe);
                cmd.args(["serve", "--listen", "127.0.0.1:0"])
                    .args(["--cluster", &server.url])
                    .args(["--node-id", &format!("bench-node-{k}")]);
                let mut child = ChildProc::spawn("server", cmd)?;
                urls.push(child.wait_line(super::serve::READY_PREFIX).await?);
                pids.push(child.pid);
                server_children.push(child);
            }
            nats = Some(server);
            (urls, pids, None)
        }
        (None, None) => {
            let mut cmd = Command::new(&exe);
            // Its calls are over when it is stopped: no drain to wait for.
            cmd.args(["serve", "--listen", "127.0.0.1:0", "--drain-grace", "0"]);
            if args.sip {
                let range = match &args.rtp_ports {
                    Some(r) => r.clone(),
                    None => rtp_range(n)?,
                };
                // All callers come from 127.0.0.1: no per-source INVITE limit.
                cmd.args(["--sip", "127.0.0.1:0", "--rtp-ports", &range]);
                cmd.args(["--invite-rate-limit", "0"]);
            }
            let mut child = ChildProc::spawn("server", cmd)?;
            let url = child.wait_line(super::serve::READY_PREFIX).await?;
            // The SIP line follows the listening line.
            let sip_addr = if args.sip {
                let line = child.wait_line(super::serve::SIP_READY_PREFIX).await?;
                Some(
                    line.parse::<SocketAddr>()
                        .with_context(|| format!("bad SIP address from the server: {line}"))?,
                )
            } else {
                None
            };
            let pid = child.pid;
            server_children.push(child);
            (vec![url], vec![pid], sip_addr)
        }
    };
    let base_url = base_urls[0].clone();
    let mut agent_child = match args.agent {
        AgentKind::External => None,
        AgentKind::Rust => {
            let mut cmd = Command::new(&exe);
            cmd.arg("bench-agent")
                .args(["--threads", &args.agent_threads.to_string()])
                .args(["--server", &base_url])
                .args(["--sample-rate", &rate.hz().to_string()]);
            Some(ChildProc::spawn("agent", cmd)?)
        }
        AgentKind::Python => {
            if !args.python.exists() {
                bail!(
                    "{} not found: create the venv (python3 -m venv .venv && .venv/bin/pip install telcoflow==1.0.0) or pass --python",
                    args.python.display()
                );
            }
            let mut cmd = Command::new(&args.python);
            cmd.arg(&args.python_agent)
                .args(["--server", &base_url])
                .args(["--sample-rate", &rate.hz().to_string()]);
            Some(ChildProc::spawn("agent", cmd)?)
        }
    };
    if let Some(agent) = &mut agent_child {
        agent.wait_line("ready").await?;
    }
    if args.stall_agent_ms.is_some() && agent_child.is_none() {
        bail!("--stall-agent-ms stalls the agent child: use --agent rust or --agent python");
    }
    let agent_pid = agent_child.as_ref().map(|a| a.pid).or(args.agent_pid);

    let sample = |pid: Option<u32>| pid.and_then(ProcSample::read);
    let nats_pid = nats.as_ref().map(|n| n.pid);
    // Every node's reading, or none if one is missing.
    let sample_nodes = |pids: &[u32]| -> Option<Vec<ProcSample>> {
        if pids.is_empty() {
            return None;
        }
        pids.iter().map(|&p| ProcSample::read(p)).collect()
    };
    // Let the children finish starting up before the idle reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = (sample_nodes(&server_pids), sample(agent_pid));
    let nats_idle = sample(nats_pid);
    let varz = async |at: Instant| match &nats {
        Some(n) => n.varz().await.map(|v| Some((at, v))),
        None => Ok(None),
    };
    let varz_idle = varz(Instant::now()).await?;
    let me = std::process::id();

    let epoch = Instant::now();
    let first_dial = epoch + Duration::from_millis(100);
    let end_at = first_dial + ramp + duration;
    let window_start = (first_dial + ramp + SETTLE).min(end_at - Duration::from_millis(500));
    let window_end = end_at - Duration::from_millis(100);
    let progress = Arc::new(Progress::default());
    let speech = caller::speech_for(rate);
    // Halfway through the time every call is up.
    let stall_at = first_dial + ramp + duration / 2;
    let stalled = match (args.stall_agent_ms, args.stall_server_ms) {
        (Some(ms), _) => agent_child.as_ref().map(|a| ("agent", a.pid, ms)),
        (None, Some(ms)) => server_pids.first().map(|&pid| ("server", pid, ms)),
        (None, None) => None,
    };
    let stall = stalled
        .map(|(_, pid, ms)| tokio::spawn(stall_process(pid, stall_at, Duration::from_millis(ms))));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..n {
        let offset = ramp.mul_f64(i as f64 / n as f64);
        let plan = CallPlan {
            // In turn over the nodes: with N nodes, one call in N lands on the agents' node.
            base_url: base_urls[i % base_urls.len()].clone(),
            index: i,
            rate,
            epoch,
            dial_at: first_dial + offset,
            end_at,
            speech: speech.clone(),
            sip: sip_addr,
            probes: args.stall_agent_ms.or(args.stall_server_ms).is_none(),
        };
        let progress = progress.clone();
        calls.spawn(async move { (i, caller::run(plan, progress).await) });
    }

    // Progress line and the CPU window readings.
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut start_reading = None;
    let mut end_reading = None;
    let mut reports: Vec<CallReport> = Vec::with_capacity(n);
    // Which node each report's call was dialled on.
    let mut report_nodes: Vec<usize> = Vec::with_capacity(n);
    let window_start_sleep = tokio::time::sleep_until(window_start);
    let window_end_sleep = tokio::time::sleep_until(window_end);
    tokio::pin!(window_start_sleep, window_end_sleep);
    let mut start_done = false;
    let (mut varz_start, mut varz_end) = (None, None);
    let mut load = None;
    let mut end_done = false;
    while reports.len() < n {
        tokio::select! {
            r = calls.join_next() => match r {
                Some(Ok((i, report))) => {
                    reports.push(report);
                    report_nodes.push(i % base_urls.len());
                }
                Some(Err(e)) => bail!("a caller task failed: {e}"),
                None => break,
            },
            () = &mut window_start_sleep, if !start_done => {
                start_done = true;
                let now = Instant::now();
                start_reading = Some((now, sample_nodes(&server_pids), sample(agent_pid), ProcSample::read(me), stats::machine_busy_s(), sample(nats_pid)));
                varz_start = varz(now).await?;
            }
            () = &mut window_end_sleep, if !end_done => {
                end_done = true;
                let now = Instant::now();
                end_reading = Some((now, sample_nodes(&server_pids), sample(agent_pid), ProcSample::read(me), stats::machine_busy_s(), sample(nats_pid)));
                varz_end = varz(now).await?;
                load = stats::loadavg();
            }
            _ = tick.tick() => {
                let p = &progress;
                let line = format!(
                    "bench: N={n} {} t={:>4.1}s dialled {} answered {} failed {} ended {} | frames sent {} heard {}",
                    caller_kind(args).as_str(),
                    epoch.elapsed().as_secs_f64(),
                    p.dialled.load(Ordering::Relaxed),
                    p.answered.load(Ordering::Relaxed),
                    p.failed.load(Ordering::Relaxed),
                    p.ended.load(Ordering::Relaxed),
                    p.frames_sent.load(Ordering::Relaxed),
                    p.frames_heard.load(Ordering::Relaxed),
                );
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
            }
        }
    }
    if tty {
        eprintln!();
    }

    if let Some(stall) = stall {
        stall.await.context("the stall task failed")??;
    }
    let server_dropped = frames_dropped(&base_urls).await;
    // The nodes write each ended call's record and count right after its hang-up: a moment
    // for those to pass through NATS before the last reading.
    let varz_done = match &nats {
        Some(_) => {
            tokio::time::sleep(NATS_SETTLE).await;
            varz(Instant::now()).await?
        }
        None => None,
    };
    let handling = match agent_child {
        Some(agent) => agent.stop().await.and_then(|v| {
            let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
            Some(AgentHandling {
                frames: f("frames")? as u64,
                handle_us_p50: f("handle_us_p50")?,
                handle_us_p99: f("handle_us_p99")?,
                handle_us_max: f("handle_us_max")?,
            })
        }),
        None => None,
    };
    futures_util::future::join_all(server_children.into_iter().map(ChildProc::stop)).await;
    if let Some(n) = nats {
        n.stop().await;
    }

    let answered = reports.iter().filter(|r| r.answered).count();
    let mut node_costs = Vec::new();
    let mut nats_cost = None;
    let (server_cost, agent_cost, callers_cpu, machine, window) = match (start_reading, end_reading)
    {
        (Some((t0, s0, a0, m0, b0, n0)), Some((t1, s1, a1, m1, b1, n1))) => {
            let window = t1 - t0;
            let cost = |idle: Option<ProcSample>, a: Option<ProcSample>, b: Option<ProcSample>| {
                Some(ProcCost::new(idle?, a?, b?, window, answered))
            };
            if let (Some(i), Some(a), Some(b)) = (&idle.0, &s0, &s1) {
                node_costs = (0..i.len())
                    .map(|k| cost(i.get(k).copied(), a.get(k).copied(), b.get(k).copied()))
                    .collect();
            }
            nats_cost = cost(nats_idle, n0, n1);
            let sum = |v: Option<Vec<ProcSample>>| v.as_deref().map(ProcSample::sum);
            let (idle_sum, s0, s1) = (sum(idle.0.clone()), sum(s0), sum(s1));
            let callers = match (m0, m1) {
                (Some(a), Some(b)) => round3((b.cpu_s - a.cpu_s) / window.as_secs_f64()),
                _ => 0.0,
            };
            let machine = match (b0, b1) {
                (Some(a), Some(b)) => round3((b - a) / window.as_secs_f64()),
                _ => 0.0,
            };
            (
                cost(idle_sum, s0, s1),
                cost(idle.1, a0, a1),
                callers,
                machine,
                window,
            )
        }
        _ => (None, None, 0.0, 0.0, Duration::ZERO),
    };
    let machine = MachineLoad {
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        busy_cores: machine,
        loadavg_1m: load.unwrap_or(0.0),
    };
    let stall = stalled.map(|(process, _, ms)| StallFigures {
        process,
        stall_ms: ms,
        p50_ms_by_second: p50_by_second(&reports, us_since(epoch, stall_at)),
    });
    let result_setups: Vec<Option<u32>> = reports.iter().map(|r| r.setup_us).collect();
    let mut result = summarise(
        args,
        n,
        rate,
        duration,
        ramp,
        reports,
        handling,
        server_cost,
        agent_cost,
        callers_cpu,
        machine,
        window,
    );
    result.stall = stall;
    result.server_frames_dropped = server_dropped;
    if let Some((nodes, _)) = topology {
        let mut cross = Vec::new();
        let mut same = Vec::new();
        for (r, &node) in result_setups.iter().zip(&report_nodes) {
            if let Some(us) = *r {
                if node == 0 {
                    same.push(us)
                } else {
                    cross.push(us)
                }
            }
        }
        let nats = match (varz_idle, varz_start, varz_end, varz_done) {
            (Some(idle), Some(window_start), Some(window_end), Some(end)) => {
                Some(cluster::NatsFigures::new(
                    &cluster::NatsReadings {
                        idle,
                        window_start,
                        window_end,
                        end,
                    },
                    answered,
                ))
            }
            _ => None,
        };
        result.cluster = Some(cluster::ClusterFigures {
            nodes,
            setup_cross_node_ms: Percentiles::from_us(&mut cross),
            setup_same_node_ms: Percentiles::from_us(&mut same),
            server_per_node: node_costs,
            nats_server: nats_cost,
            nats,
        });
    }
    Ok(result)
}

/// Stops process `pid` at `at` for `len` (SIGSTOP, then SIGCONT, through kill(1): the
/// workspace forbids unsafe code, so no libc::kill).
async fn stall_process(pid: u32, at: Instant, len: Duration) -> anyhow::Result<()> {
    tokio::time::sleep_until(at).await;
    let signal = |sig: &'static str| {
        let pid = pid.to_string();
        async move {
            let status = Command::new("kill").args([sig, &pid]).status().await?;
            anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
            anyhow::Ok(())
        }
    };
    signal("-STOP").await?;
    tokio::time::sleep(len).await;
    signal("-CONT").await
}

fn us_since(epoch: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(epoch).as_micros() as u64
}

/// The p50 round trip of the frames heard in each whole second from 3 s before `stall_us` to
/// the end, by second relative to it.
fn p50_by_second(reports: &[CallReport], stall_us: u64) -> Vec<(i64, f64)> {
    let mut by_second: std::collections::BTreeMap<i64, Vec<u32>> = Default::default();
    for r in reports {
        for (&heard, &rtt) in r.heard_us.iter().zip(&r.rtt_us) {
            let second = (i64::from(heard) - stall_us as i64).div_euclid(1_000_000);
            if second >= -3 {
                by_second.entry(second).or_default().push(rtt);
            }
        }
    }
    by_second
        .into_iter()
        .map(|(s, mut rtts)| (s, Percentiles::from_us(&mut rtts).p50))
        .collect()
}

/// The sample rate of a run: `--sip` takes 8000 Hz only.
fn rate_for(sip: bool, sample_rate: Option<u32>) -> anyhow::Result<u32> {
    Ok(match (sip, sample_rate) {
        (true, Some(hz)) if hz != 8000 => bail!(
            "--sip runs callers and agents at 8000 Hz (G.711's rate, so the server does not \
             resample and the frame markers come back exact): leave out --sample-rate or pass 8000"
        ),
        (true, _) => 8000,
        (false, hz) => hz.unwrap_or(DEFAULT_RATE),
    })
}

fn caller_kind(args: &Args) -> CallerKind {
    if args.sip {
        CallerKind::Sip
    } else {
        CallerKind::Sim
    }
}

/// The server child's RTP range for `n` SIP calls: an even/odd pair per call, with room for
/// pairs still held by calls that just ended and for ports other processes hold (the server
/// skips those).
fn rtp_range(n: usize) -> anyhow::Result<String> {
    let pairs = n + n / 4 + 16;
    let high = usize::from(RTP_LOW) + 2 * pairs - 1;
    if high > usize::from(u16::MAX) {
        bail!("{n} SIP calls need more RTP ports than there are above {RTP_LOW}; pass --rtp-ports");
    }
    Ok(format!("{RTP_LOW}-{high}"))
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    args: &Args,
    n: usize,
    rate: SampleRate,
    duration: Duration,
    ramp: Duration,
    reports: Vec<CallReport>,
    handling: Option<AgentHandling>,
    server: Option<ProcCost>,
    agent: Option<ProcCost>,
    callers_cpu_cores: f64,
    machine: MachineLoad,
    window: Duration,
) -> RunResult {
    let mut setup: Vec<u32> = reports.iter().filter_map(|r| r.setup_us).collect();
    let mut rtt: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.rtt_us.iter().copied())
        .collect();
    let mut interrupt: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.interrupt_us.iter().copied())
        .collect();
    let sum = |f: fn(&CallReport) -> u64| reports.iter().map(f).sum::<u64>();
    let round_trip = Percentiles::from_us(&mut rtt);
    let agent_ms = handling.map_or(0.0, |h| h.handle_us_p50 / 1000.0);
    let answered = reports.iter().filter(|r| r.answered).count();
    RunResult {
        calls: n,
        sample_rate: rate.hz(),
        duration_s: duration.as_secs_f64(),
        ramp_s: ramp.as_secs_f64(),
        agent_kind: args.agent,
        agent_threads: (args.agent == AgentKind::Rust).then_some(args.agent_threads),
        callers: caller_kind(args),
        calls_answered: answered,
        calls_failed: n - answered,
        hangups_failed: reports.iter().filter(|r| r.hangup_failed).count(),
        frames_sent: sum(|r| r.frames_sent),
        frames_lost: sum(|r| r.frames_lost),
        frames_duplicated: sum(|r| r.frames_duplicated),
        frames_reordered: sum(|r| r.frames_reordered),
        frames_late: sum(|r| r.frames_late),
        setup_ms: Percentiles::from_us(&mut setup),
        round_trip_ms: round_trip,
        server_added_ms: round_trip.minus(agent_ms),
        interrupt_ms: Percentiles::from_us(&mut interrupt),
        interrupts_failed: sum(|r| r.probes_failed),
        frames_crossed: sum(|r| r.crossed),
        agent_handling: handling,
        server,
        agent,
        callers_cpu_cores,
        machine,
        window_s: round3(window.as_secs_f64()),
        failures: reports
            .iter()
            .filter_map(|r| r.failure.clone())
            .take(5)
            .collect(),
        server_frames_dropped: None,
        stall: None,
        cluster: None,
    }
}

fn pct(p: &Percentiles) -> String {
    format!(
        "{:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        p.p50, p.p95, p.p99, p.max
    )
}

fn cost(c: &Option<ProcCost>) -> String {
    match c {
        Some(c) => format!(
            "{:>8.3} CPU s/call-min (kernel {:.3}) {:>8.3} MiB/call  ({:.2} cores, RSS {:.1} -> {:.1} MiB)",
            c.cpu_s_per_call_min,
            c.kernel_cpu_s_per_call_min,
            c.rss_mib_per_call,
            c.cpu_cores,
            c.rss_mib_idle,
            c.rss_mib_loaded
        ),
        None => "not measured".into(),
    }
}

fn print_table(r: &RunResult) {
    println!();
    println!(
        "telcoflow bench: {} calls, {} Hz, {:?} agent, callers: {}, {} s + {} s ramp",
        r.calls,
        r.sample_rate,
        r.agent_kind,
        r.callers.as_str(),
        r.duration_s,
        r.ramp_s
    );
    println!(
        "  calls answered / failed   {:>8} / {}",
        r.calls_answered, r.calls_failed
    );
    if r.callers == CallerKind::Sip {
        println!("  hang-ups (BYE) failed     {:>8}", r.hangups_failed);
    }
    println!(
        "  frames sent {}  lost {}  duplicated {}  reordered {}  late(>40ms) {}  crossed {}",
        r.frames_sent,
        r.frames_lost,
        r.frames_duplicated,
        r.frames_reordered,
        r.frames_late,
        r.frames_crossed
    );
    if let Some(dropped) = r
        .server_frames_dropped
        .as_ref()
        .filter(|d| d.values().any(|&n| n > 0))
    {
        let causes: Vec<String> = dropped
            .iter()
            .filter(|&(_, &n)| n > 0)
            .map(|(cause, n)| format!("{cause} {n}"))
            .collect();
        println!(
            "  server dropped on purpose (frames): {}",
            causes.join(", ")
        );
    }
    println!(
        "  {:<24}{:>8} {:>8} {:>8} {:>8}",
        "ms", "p50", "p95", "p99", "max"
    );
    let setup = match r.callers {
        CallerKind::Sim => "setup (dial->answer)",
        CallerKind::Sip => "setup (INVITE->200)",
    };
    println!("  {:<24}{}", setup, pct(&r.setup_ms));
    if let Some(c) = &r.cluster {
        println!(
            "  {:<24}{}",
            "  on another node",
            pct(&c.setup_cross_node_ms)
        );
        println!(
            "  {:<24}{}",
            "  on the agents' node",
            pct(&c.setup_same_node_ms)
        );
    }
    println!("  {:<24}{}", "round trip", pct(&r.round_trip_ms));
    println!(
        "  {:<24}{}",
        "  server-added (est.)",
        pct(&r.server_added_ms)
    );
    println!(
        "  {:<24}{}   ({} probes, {} failed)",
        "interrupt -> silence",
        pct(&r.interrupt_ms),
        r.interrupt_ms.n,
        r.interrupts_failed
    );
    if let Some(h) = &r.agent_handling {
        println!(
            "  agent handling per frame  p50 {:.0} us  p99 {:.0} us  max {:.0} us",
            h.handle_us_p50, h.handle_us_p99, h.handle_us_max
        );
    }
    match &r.cluster {
        Some(c) => {
            println!("  servers {} (the {} nodes)", cost(&r.server), c.nodes);
            for (k, node) in c.server_per_node.iter().enumerate() {
                println!("   node {k} {}", cost(node));
            }
            println!("  nats    {}", cost(&c.nats_server));
            if let Some(n) = &c.nats {
                println!(
                    "  NATS per call            {:.1} msgs in, {:.1} out; {:.0} bytes in, {:.0} out",
                    n.per_call.in_msgs,
                    n.per_call.out_msgs,
                    n.per_call.in_bytes,
                    n.per_call.out_bytes
                );
                println!(
                    "  NATS per s, calls up     {:.1} msgs in, {:.1} out; {:.0} bytes in, {:.0} out",
                    n.steady_per_s.in_msgs,
                    n.steady_per_s.out_msgs,
                    n.steady_per_s.in_bytes,
                    n.steady_per_s.out_bytes
                );
            }
        }
        None => println!("  server  {}", cost(&r.server)),
    }
    println!("  agent   {}", cost(&r.agent));
    println!("  callers {:.2} cores (this process)", r.callers_cpu_cores);
    let ours = r.callers_cpu_cores
        + r.server.map_or(0.0, |c| c.cpu_cores)
        + r.agent.map_or(0.0, |c| c.cpu_cores);
    println!(
        "  machine {:.2} of {} cores busy, {:.2} by other work; load average {:.2}",
        r.machine.busy_cores,
        r.machine.cores,
        (r.machine.busy_cores - ours).max(0.0),
        r.machine.loadavg_1m
    );
    if let Some(s) = &r.stall {
        println!(
            "  {} stalled {} ms at second 0; round trip p50 per second:",
            s.process, s.stall_ms
        );
        for (second, p50) in &s.p50_ms_by_second {
            println!("    {second:>+3} s  {p50:>8.2} ms");
        }
    }
    for f in &r.failures {
        println!("  failure: {f}");
    }
}

fn print_comparison(c: &cluster::Comparison) {
    println!();
    println!("cluster against single node:");
    println!(
        "  setup p50 {:.2} ms on another node, {:.2} ms on one node; p99 {:.2} ms, {:.2} ms",
        c.setup_p50_ms_cross_node,
        c.setup_p50_ms_single,
        c.setup_p99_ms_cross_node,
        c.setup_p99_ms_single
    );
    let ratio = |r: Option<f64>| r.map_or("not measured".to_owned(), |r| format!("{r:.3}"));
    println!(
        "  server CPU {:.3} s/call-min on the nodes, {:.3} on one node: ratio {} ({} with nats-server)",
        c.server_cpu_s_per_call_min_cluster,
        c.server_cpu_s_per_call_min_single,
        ratio(c.server_cpu_ratio),
        ratio(c.server_and_nats_cpu_ratio)
    );
}

fn print_sweep(runs: &[RunResult]) {
    println!();
    println!(
        "{:>6} {:>8} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "calls",
        "answered",
        "lost",
        "late",
        "rtt p50",
        "rtt p99",
        "srv cores",
        "srv MiB",
        "agt cores",
        "agt MiB"
    );
    for r in runs {
        let c = |c: &Option<ProcCost>, f: fn(&ProcCost) -> f64| c.as_ref().map_or(f64::NAN, f);
        println!(
            "{:>6} {:>8} {:>6} {:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.1} {:>9.2} {:>9.1}",
            r.calls,
            r.calls_answered,
            r.frames_lost,
            r.frames_late,
            r.round_trip_ms.p50,
            r.round_trip_ms.p99,
            c(&r.server, |c| c.cpu_cores),
            c(&r.server, |c| c.rss_mib_loaded),
            c(&r.agent, |c| c.cpu_cores),
            c(&r.agent, |c| c.rss_mib_loaded),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_runs_at_8000_hz_only() {
        assert_eq!(rate_for(false, None).unwrap(), 24_000);
        assert_eq!(rate_for(false, Some(16_000)).unwrap(), 16_000);
        assert_eq!(rate_for(true, None).unwrap(), 8000);
        assert_eq!(rate_for(true, Some(8000)).unwrap(), 8000);
        assert!(rate_for(true, Some(24_000)).is_err());
    }

    #[test]
    fn rtp_range_holds_a_pair_per_call_and_spare() {
        assert_eq!(rtp_range(3).unwrap(), "30000-30037");
        let r = rtp_range(500).unwrap();
        let (low, high) = r.split_once('-').unwrap();
        let ports = high.parse::<usize>().unwrap() - low.parse::<usize>().unwrap() + 1;
        assert!(ports >= 2 * 500 + 100, "{r}");
        assert!(rtp_range(20_000).is_err());
    }
}
