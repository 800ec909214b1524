//! `telcoflow serve`: run a Telcoflow server until Ctrl-C or SIGTERM.
//!
//! Stdout carries two kinds of stable lines for scripts:
//!
//! ```text
//! connector uuid=00000000-0000-4000-8000-000000000001 api_key=dev-api-key
//! telcoflow server listening on ws://127.0.0.1:8080
//! ```
//!
//! The credentials line appears for the development connector only (a config file's keys are
//! not echoed); the `listening` line is printed once the listener is bound, so a script can
//! wait for it and read the URL (the real port when `--listen` used port 0).

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use telcoflow_server::config::{ConnectorConfig, DEV_API_KEY, DEV_CONNECTOR_UUID};
use telcoflow_server::{Config, Server};
use tracing::{info, warn};

/// Prefix of the ready line; the URL follows it.
pub(crate) const READY_PREFIX: &str = "telcoflow server listening on ";

/// How long a graceful shutdown may take before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Arguments of `telcoflow serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address to listen on (port 0 picks a free port) [default: 127.0.0.1:8080, or the
    /// config file's `listen`].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// API key of the development connector.
    #[arg(long, env = "TELCOFLOW_API_KEY", conflicts_with = "config")]
    api_key: Option<String>,
    /// UUID of the development connector.
    #[arg(long, env = "TELCOFLOW_CONNECTOR_UUID", conflicts_with = "config")]
    connector_uuid: Option<String>,
    /// TOML configuration file (connectors, numbers, limits).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Runs the server until a signal arrives or it stops by itself.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dev = args.config.is_none();
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => {
            let api_key = args.api_key.as_deref().unwrap_or(DEV_API_KEY);
            let uuid = args.connector_uuid.as_deref().unwrap_or(DEV_CONNECTOR_UUID);
            Config {
                connectors: vec![ConnectorConfig::development(api_key, uuid)],
                ..Config::development()
            }
        }
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let connectors: Vec<(String, String)> = config
        .connectors
        .iter()
        .map(|c| (c.uuid.clone(), c.api_key.clone()))
        .collect();

    let mut server = Server::start(config).await.context("cannot start the server")?;
    for (uuid, api_key) in &connectors {
        if dev {
            println!("connector uuid={uuid} api_key={api_key}");
        } else {
            println!("connector uuid={uuid}");
        }
    }
    println!("{READY_PREFIX}ws://{}", server.local_addr());
    info!(base_url = server.base_url(), http = %server.http_url(), "serving");

    let by_signal = tokio::select! {
        // Cancel-safe: signal futures hold no state worth keeping.
        r = shutdown_signal() => {
            r?;
            true
        }
        // Cancel-safe: awaiting a JoinHandle by reference.
        () = server.wait() => false,
    };
    if by_signal {
        info!("shutting down");
        if tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown()).await.is_err() {
            warn!("connections did not close within {SHUTDOWN_GRACE:?}; exiting anyway");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        warn!("the server stopped by itself");
        Ok(ExitCode::FAILURE)
    }
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    Ok(())
}
