//! `telcoflow serve`: run a Telcoflow server until Ctrl-C or SIGTERM.
//!
//! A signal (or `POST /admin/v1/drain`) drains the server: it takes no new calls, moves its
//! agents' control connections off, lets its calls end (for up to `--drain-grace` seconds)
//! and exits 0. A second signal stops it at once.
//!
//! Stdout carries two kinds of stable lines for scripts:
//!
//! ```text
//! connector uuid=00000000-0000-4000-8000-000000000001 api_key=dev-api-key
//! telcoflow server listening on ws://127.0.0.1:8080
//! telcoflow sip listening on udp+tcp 127.0.0.1:5060
//! ```
//!
//! The credentials line appears for the development connector only (a config file's keys are
//! not echoed); the `listening` line is printed once the listener is bound, so a script can
//! wait for it and read the URL (the real port when `--listen` used port 0). The `sip` line
//! follows it when `--sip` (or a config file's `[sip]`) turns the SIP edge on.

use anyhow::Context;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use telcoflow::config::{ENV_API_KEY, ENV_CONNECTOR_UUID};
use telcoflow_server::config::{
    ClusterConfig, ConnectorConfig, DEV_API_KEY, DEV_CONNECTOR_UUID, SipConfig,
};
use telcoflow_server::{Config, Server};
use tracing::{info, warn};

/// Prefix of the ready line; the URL follows it.
pub(crate) const READY_PREFIX: &str = "telcoflow server listening on ";
/// Prefix of the SIP ready line; the address follows it.
pub(crate) const SIP_READY_PREFIX: &str = "telcoflow sip listening on udp+tcp ";

/// How long closing the connections may take, after the drain, before the process exits
/// anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Arguments of `telcoflow serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address to listen on (port 0 picks a free port) [default: 127.0.0.1:8080, or the
    /// config file's `listen`].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// API key of the development connector.
    #[arg(long, env = ENV_API_KEY, conflicts_with = "config")]
    api_key: Option<String>,
    /// UUID of the development connector.
    #[arg(long, env = ENV_CONNECTOR_UUID, conflicts_with = "config")]
    connector_uuid: Option<String>,
    /// TOML configuration file (connectors, numbers, limits).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Take SIP calls on this address, UDP and TCP (e.g. 127.0.0.1:5060) [default: the
    /// config file's `[sip] listen`, else SIP is off].
    #[arg(long)]
    sip: Option<SocketAddr>,
    /// RTP port range for SIP calls, LOW-HIGH [default: 20000-20999].
    #[arg(long, value_name = "LOW-HIGH")]
    rtp_ports: Option<String>,
    /// Address announced to SIP peers in SDP and Contact (a NAT's public address).
    #[arg(long)]
    public_ip: Option<IpAddr>,
    /// New SIP calls (INVITEs) taken per source address per second; 0 for no limit
    /// [default: the config file's `[sip] invite_rate_limit`, else 20].
    #[arg(long, value_name = "N")]
    invite_rate_limit: Option<u32>,
    /// Join a cluster of nodes sharing one registry through this NATS server with JetStream
    /// (nats://HOST:PORT) [default: the config file's `[cluster] nats_url`, else no cluster].
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// This node's name in the cluster, unique, of letters, digits, '_' and '-' [default: the
    /// config file's `[cluster] node_id`].
    #[arg(long, value_name = "NAME")]
    node_id: Option<String>,
    /// On SIGTERM, Ctrl-C or `POST /admin/v1/drain`, how long calls in progress may go on
    /// before they are ended and the server exits [default: the config file's
    /// `drain_grace_secs`, else 30].
    #[arg(long, value_name = "SECS")]
    drain_grace: Option<u64>,
}

/// Applies `--cluster` and `--node-id` over the config file's `[cluster]`.
fn apply_cluster_flags(config: &mut Config, args: &Args) -> anyhow::Result<()> {
    match (&args.cluster, &mut config.cluster) {
        (Some(url), Some(cluster)) => cluster.nats_url = url.clone(),
        (Some(url), None) => {
            config.cluster = Some(ClusterConfig::new(url.clone(), String::new()));
        }
        (None, None) if args.node_id.is_some() => {
            anyhow::bail!("--node-id needs --cluster (or a [cluster] section in the config file)")
        }
        (None, _) => {}
    }
    if let (Some(id), Some(cluster)) = (&args.node_id, &mut config.cluster) {
        cluster.node_id = id.clone();
    }
    Ok(())
}

/// Applies the SIP flags: any of them turns SIP on (with defaults for the rest).
fn apply_sip_flags(config: &mut Config, args: &Args) {
    if args.sip.is_none()
        && args.rtp_ports.is_none()
        && args.public_ip.is_none()
        && args.invite_rate_limit.is_none()
    {
        return;
    }
    let sip = config.sip.get_or_insert_with(SipConfig::default);
    if let Some(addr) = args.sip {
        sip.listen = addr;
    }
    if let Some(ports) = &args.rtp_ports {
        sip.rtp_ports = ports.clone();
    }
    if let Some(ip) = args.public_ip {
        sip.public_ip = Some(ip);
    }
    if let Some(limit) = args.invite_rate_limit {
        sip.invite_rate_limit = limit;
        // The flag says "per second", whatever interval a config file set.
        sip.invite_rate_interval_secs = 1;
    }
}

/// Runs the server until a signal arrives or it stops by itself.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dev = args.config.is_none();
    let mut config = match &args.config {
        // The TELCOFLOW_<SECTION>_<KEY> variables over the file, the flags over both.
        Some(path) => Config::from_file_with_env(path)?,
        None => {
            let api_key = args.api_key.as_deref().unwrap_or(DEV_API_KEY);
            let uuid = args.connector_uuid.as_deref().unwrap_or(DEV_CONNECTOR_UUID);
            Config {
                connectors: vec![ConnectorConfig::development(api_key, uuid)],
                ..Config::development()
            }
            .with_env(telcoflow_server::config::env::process_vars()?)?
        }
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    apply_sip_flags(&mut config, &args);
    apply_cluster_flags(&mut config, &args)?;
    if let Some(secs) = args.drain_grace {
        config.drain_grace_secs = secs;
    }
    let grace = config.drain_grace();
    config.validate()?;
    let connectors: Vec<(String, String)> = config
        .connectors
        .iter()
        .map(|c| (c.uuid.clone(), c.api_key.clone()))
        .collect();

    let mut server = Server::start(config)
        .await
        .context("cannot start the server")?;
    for (uuid, api_key) in &connectors {
        if dev {
            println!("connector uuid={uuid} api_key={api_key}");
        } else {
            println!("connector uuid={uuid}");
        }
    }
    println!("{READY_PREFIX}ws://{}", server.local_addr());
    if let Some(sip) = server.sip_addr() {
        println!("{SIP_READY_PREFIX}{sip}");
    }
    info!(base_url = server.base_url(), http = %server.http_url(), "serving");

    let mut signals = Signals::new()?;
    tokio::select! {
        // Cancel-safe: signal streams keep what arrives until read.
        r = signals.next() => {
            r?;
            let calls = server.drain();
            info!(calls, "signal: draining");
        }
        // Cancel-safe: awaiting a JoinHandle by reference. Ends by itself after a drain
        // asked over HTTP.
        () = server.wait() => {}
    }
    if server.is_draining() {
        // The drain ends the server by itself once its calls are done (or the grace is
        // over); a second signal stops it at once.
        let stopped = tokio::select! {
            () = server.wait() => true,
            r = signals.next() => {
                r?;
                warn!("second signal: stopping now");
                false
            }
            () = tokio::time::sleep(grace + SHUTDOWN_GRACE) => false,
        };
        if !stopped
            && tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown())
                .await
                .is_err()
        {
            warn!("connections did not close within {SHUTDOWN_GRACE:?}; exiting anyway");
        }
        info!("drained; exiting");
        Ok(ExitCode::SUCCESS)
    } else {
        warn!("the server stopped by itself");
        Ok(ExitCode::FAILURE)
    }
}

/// Ctrl-C and (on Unix) SIGTERM, as they come.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot listen for SIGTERM")?,
        })
    }

    /// The next Ctrl-C or SIGTERM.
    async fn next(&mut self) -> anyhow::Result<()> {
        #[cfg(unix)]
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn config_for(argv: &[&str]) -> Config {
        let cli = Cli::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))
            .expect("flags parse");
        let mut config = Config::development();
        apply_sip_flags(&mut config, &cli.args);
        config
    }

    fn cluster_for(argv: &[&str], file: Option<ClusterConfig>) -> anyhow::Result<Config> {
        let cli = Cli::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))
            .expect("flags parse");
        let mut config = Config::development();
        config.cluster = file;
        apply_cluster_flags(&mut config, &cli.args)?;
        Ok(config)
    }

    #[test]
    fn cluster_flags_set_the_cluster_over_the_file() {
        assert!(cluster_for(&[], None).unwrap().cluster.is_none());
        let both = ["--cluster", "nats://127.0.0.1:4222", "--node-id", "node-a"];
        let cluster = cluster_for(&both, None).unwrap().cluster.unwrap();
        assert_eq!(cluster.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(cluster.node_id, "node-a");
        let file = ClusterConfig::new("nats://10.0.0.1:4222", "from-file");
        let renamed = cluster_for(&["--node-id", "node-b"], Some(file.clone()))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(renamed.nats_url, "nats://10.0.0.1:4222");
        assert_eq!(renamed.node_id, "node-b");
        assert_eq!(
            cluster_for(&[], Some(file.clone())).unwrap().cluster,
            Some(file)
        );
        let err = cluster_for(&["--node-id", "x"], None).unwrap_err();
        assert!(
            err.to_string().contains("--node-id needs --cluster"),
            "{err}"
        );
        // --cluster alone leaves the node id empty, which validation refuses by name.
        let alone = cluster_for(&["--cluster", "nats://127.0.0.1:4222"], None).unwrap();
        let err = alone.validate().unwrap_err();
        assert!(err.to_string().contains("cluster.node_id"), "{err}");
    }

    #[test]
    fn sip_flags_turn_sip_on() {
        assert!(config_for(&[]).sip.is_none(), "SIP stays off without flags");
        let config = config_for(&[
            "--sip",
            "127.0.0.1:5070",
            "--rtp-ports",
            "30000-30010",
            "--public-ip",
            "203.0.113.9",
        ]);
        let sip = config.sip.expect("SIP on");
        assert_eq!(sip.listen, "127.0.0.1:5070".parse().unwrap());
        assert_eq!(sip.rtp_port_range().unwrap(), (30000, 30010));
        assert_eq!(sip.advertised_ip().to_string(), "203.0.113.9");
        let only_addr = config_for(&["--sip", "127.0.0.1:0"]).sip.unwrap();
        assert_eq!(only_addr.rtp_ports, "20000-20999");
        assert_eq!(only_addr.invite_rate_limit, 20);
        let unlimited = config_for(&["--sip", "127.0.0.1:0", "--invite-rate-limit", "0"]);
        assert_eq!(unlimited.sip.unwrap().invite_rate_limit, 0);
    }

    #[test]
    fn bad_rtp_range_is_refused() {
        let config = config_for(&["--sip", "127.0.0.1:0", "--rtp-ports", "9-8"]);
        assert!(config.validate().is_err());
    }
}
