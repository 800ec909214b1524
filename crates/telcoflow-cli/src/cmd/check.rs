//! `telcoflow check --config FILE`: validates a configuration file as `telcoflow serve
//! --config` would (with the `TELCOFLOW_*` variables of the environment over it) and prints
//! what the server would do, without starting it. The description never prints a secret (API
//! keys, tokens, passwords, a `nats_url`'s user and password), only whether it is set.
//!
//! Exit status 0 when the configuration is valid; otherwise the error is printed (as `serve`
//! would print it: it may quote the part of the file it is about) and the status is non-zero.

use anyhow::Context as _;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use telcoflow_server::Config;
use telcoflow_server::config::env::ENV_SETTINGS;

/// Arguments of `telcoflow check`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The TOML configuration file to check.
    #[arg(long)]
    config: PathBuf,
}

/// Runs `telcoflow check`.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::from_file_with_env(&args.config)
        .and_then(|c| c.check_files().map(|()| c))
        .with_context(|| format!("{} is not valid", args.config.display()))?;
    let from_env: Vec<String> = ENV_SETTINGS
        .iter()
        .map(|s| s.variable())
        .filter(|v| std::env::var_os(v).is_some())
        .collect();
    print!("{}", describe(&args.config, &config, &from_env));
    Ok(ExitCode::SUCCESS)
}

fn set(secret: &Option<String>) -> &'static str {
    match secret.as_deref() {
        Some(s) if !s.is_empty() => "set",
        _ => "not set",
    }
}

/// `url` without the user and password it may carry (`nats://alice:hunter2@host`), and
/// whether it carried any.
fn without_userinfo(url: &str) -> (String, bool) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), false);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => (format!("{scheme}://{}", &rest[at + 1..]), true),
        None => (url.to_owned(), false),
    }
}

/// What the server would do with `config`.
fn describe(path: &std::path::Path, config: &Config, from_env: &[String]) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(format!("{}: valid", path.display()));
    if !from_env.is_empty() {
        line(format!("environment: {}", from_env.join(", ")));
    }
    let scheme = if config.tls.is_some() { "wss" } else { "ws" };
    line(format!(
        "listen: {scheme}://{} (control, media, HTTP API{})",
        config.listen,
        if config.sim.enabled {
            ", simulated phones"
        } else {
            ""
        }
    ));
    if let Some(url) = &config.public_url {
        line(format!("public url: {url}"));
    }
    match &config.tls {
        Some(tls) => line(format!(
            "tls: cert {}, key {}, client certificates {}",
            tls.cert.display(),
            tls.key.display(),
            tls.client_ca
                .as_ref()
                .map_or("by fingerprint only".to_owned(), |ca| format!(
                    "checked against {}",
                    ca.display()
                ))
        )),
        None => line("tls: off".into()),
    }
    line(format!(
        "simulated phones: {}",
        if config.sim.enabled { "on" } else { "off" }
    ));
    match &config.sip {
        Some(sip) => {
            let allow = sip
                .allow
                .as_ref()
                .map_or("every source".to_owned(), |a| a.join(", "));
            line(format!(
                "sip: udp+tcp {}, rtp ports {}, announced as {}, takes INVITEs from {allow}, \
                 {} account(s), {} trunk(s){}",
                sip.listen,
                sip.rtp_ports,
                sip.advertised_ip(),
                sip.accounts.len(),
                sip.trunks.len(),
                if sip.trunks.is_empty() {
                    String::new()
                } else {
                    let hosts: Vec<&str> = sip.trunks.iter().map(|t| t.host.as_str()).collect();
                    format!(" ({})", hosts.join(", "))
                }
            ));
            for r in &sip.registrations {
                line(format!(
                    "  registers {} at {} over {}, asking {} s{}{}",
                    r.aor,
                    r.registrar_uri(),
                    r.transport.to_ascii_lowercase(),
                    r.expiry,
                    r.outbound_proxy
                        .as_deref()
                        .map_or(String::new(), |p| format!(" through {p}")),
                    if r.password.is_some() {
                        " (with a password)"
                    } else {
                        ""
                    }
                ));
            }
        }
        None => line("sip: off".into()),
    }
    line(format!("connectors: {}", config.connectors.len()));
    for c in &config.connectors {
        let mut what = format!("  {}", c.uuid);
        if let Some(name) = &c.name {
            let _ = write!(what, " ({name})");
        }
        let _ = write!(
            what,
            ": numbers [{}], api key set, {} connect route(s)",
            c.numbers.join(", "),
            c.connect.len()
        );
        if let Some(d) = &c.connect_default {
            let _ = write!(what, ", connect default {d}");
        }
        if c.client_cert_sha256.is_some() {
            what.push_str(", client certificate pinned");
        }
        line(what);
    }
    let l = &config.limits;
    line(format!(
        "limits: {} calls and {} control connections per connector, {} connections ({} per IP), \
         {} pending commands per call, frames up to {} B (control) / {} B (media)",
        l.max_calls_per_connector,
        l.max_control_connections_per_connector,
        l.max_connections,
        l.max_connections_per_ip,
        l.max_pending_commands_per_call,
        l.max_control_frame_bytes,
        l.max_media_frame_bytes,
    ));
    line(format!(
        "timers: ring {} s, media token {} s, drain grace {} s",
        config.ring_timeout_secs, config.media_token_ttl_secs, config.drain_grace_secs
    ));
    match &config.cluster {
        Some(c) => {
            let auth = if c.token.is_some() {
                "token"
            } else if c.user.is_some() {
                "user and password"
            } else if c.credentials_file.is_some() {
                "credentials file"
            } else {
                "none"
            };
            let (url, userinfo) = without_userinfo(&c.nats_url);
            let auth = if userinfo && auth == "none" {
                "in the URL"
            } else {
                auth
            };
            let tls =
                c.nats_url.starts_with("tls://") || c.tls_ca.is_some() || c.tls_cert.is_some();
            line(format!(
                "cluster: node {} through {url} (auth: {auth}, tls: {})",
                c.node_id,
                if tls { "on" } else { "off" }
            ));
        }
        None => line("cluster: none (registry in memory)".into()),
    }
    let m = &config.metrics;
    if m.enabled {
        line(
            if set(&m.token) == "set" {
                "metrics: GET /metrics, every client (loopback too) with the token \
                 (Authorization: Bearer)"
            } else {
                "metrics: GET /metrics, open to loopback only (no [metrics] token)"
            }
            .into(),
        );
    } else {
        line("metrics: off".into());
    }
    line(format!(
        "admin token: {}, token secret: {}",
        set(&config.admin_token),
        set(&config.token_secret)
    ));
    out
}
