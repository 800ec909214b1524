//! Plain HTTP/1.0 GETs of the servers' and nats-server's monitoring routes: the bench reads a
//! handful of documents and needs no HTTP client crate for them.

use anyhow::Context;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one monitoring GET may take.
const GET_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read: `/metrics` of a loaded server is a few tens of KiB.
const MAX_ANSWER: u64 = 4 << 20;

/// The body of `GET path` from `addr` (`host:port`), whatever its status.
pub(crate) async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    tokio::time::timeout(GET_TIMEOUT, async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot reach {addr}"))?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.take(MAX_ANSWER).read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .with_context(|| format!("no body in the answer to GET {path} from {addr}"))?;
        Ok(body.to_owned())
    })
    .await
    .with_context(|| format!("GET {path} from {addr} did not answer in time"))?
}

/// Audio frames the server dropped, by cause (`telcoflow_frames_dropped_total`), read from
/// the `/metrics` of the server at `base_url` (`ws://host:port`). Every drop the server makes
/// on purpose (a documented bound) is counted there, so the bench can tell those from losses
/// nobody accounted for.
pub(crate) async fn frames_dropped(base_url: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let addr = base_url
        .split_once("://")
        .map_or(base_url, |(_, rest)| rest)
        .trim_end_matches('/');
    let body = get(addr, "/metrics").await?;
    Ok(parse_frames_dropped(&body))
}

/// The `cause` label and value of each `telcoflow_frames_dropped_total` sample.
fn parse_frames_dropped(metrics: &str) -> BTreeMap<String, u64> {
    let mut dropped = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("telcoflow_frames_dropped_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let cause = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("cause=\""))
            .and_then(|c| c.strip_suffix('"'));
        let value = value.trim().parse::<f64>().ok();
        if let (Some(cause), Some(value)) = (cause, value) {
            *dropped.entry(cause.to_owned()).or_default() += value as u64;
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_drop_counters_by_cause() {
        let text = "# HELP telcoflow_frames_dropped_total audio frames dropped\n\
            # TYPE telcoflow_frames_dropped_total counter\n\
            telcoflow_frames_dropped_total{cause=\"agent_overflow\"} 0\n\
            telcoflow_frames_dropped_total{cause=\"stall_catch_up\"} 3\n\
            telcoflow_frames_dropped_totally{cause=\"x\"} 9\n\
            telcoflow_frames_sent_total{cause=\"stall_catch_up\"} 7\n";
        let d = parse_frames_dropped(text);
        assert_eq!(d.len(), 2);
        assert_eq!(d["stall_catch_up"], 3);
        assert_eq!(d["agent_overflow"], 0);
    }
}
