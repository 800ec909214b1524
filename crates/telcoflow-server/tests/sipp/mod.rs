//! Helpers for tests with SIPp (Debian package `sip-tester`) as the real SIP peer: a server
//! with SIP on 127.0.0.1, port plans that keep concurrent tests apart, and running `sipp`
//! with a timeout.
//!
//! Without `sipp` the tests fail when `CI` is set, and otherwise skip with a printed notice.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use telcoflow_server::config::SipConfig;
use telcoflow_server::{Config, RunningServer};

/// Longest one SIPp run may take.
pub const SIPP_TIMEOUT: Duration = Duration::from_secs(40);

/// Whether `sipp` can run. Panics in CI when it cannot, so a missing tool is never mistaken
/// for a passing test.
pub fn available() -> bool {
    let found = std::process::Command::new("sipp")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!(
                "sipp is not installed (apt-get install sip-tester); the SIP tests need it in CI"
            );
        }
        // Straight to stderr: the test harness captures eprintln!, and the notice must show.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: sipp is not installed; skipping this SIP test (apt-get install sip-tester)"
        );
    }
    found
}

/// Ports one test uses, apart from every other test's: `index` is unique per test (0..=29).
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// SIPp's own SIP port (when it plays a phone that the server dials).
    pub sipp_sip: u16,
    /// SIPp's media port (-mp); it uses this and the next three.
    pub sipp_media: u16,
    /// The server's RTP range.
    pub rtp_low: u16,
    pub rtp_high: u16,
}

pub fn ports(index: u16) -> Ports {
    Ports {
        sipp_sip: 25060 + index * 10,
        sipp_media: 26000 + index * 10,
        rtp_low: 10000 + index * 200,
        rtp_high: 10000 + index * 200 + 199,
    }
}

/// A development config with SIP on 127.0.0.1 (a free port) and this test's RTP range.
pub fn sip_config(ports: Ports) -> Config {
    let mut config = crate::common::dev_config();
    config.sip = Some(SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: format!("{}-{}", ports.rtp_low, ports.rtp_high),
        ..SipConfig::default()
    });
    config
}

/// A scenario file in `tests/sip/`.
pub fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sip")
        .join(name)
}

/// A fresh directory for SIPp's log files.
pub fn work_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("telcoflow-sipp-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a SIPp run left.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Panics with SIPp's output unless every call passed (exit code 0).
    pub fn assert_passed(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "sipp failed\n--- stdout\n{}\n--- stderr\n{}",
            tail(&self.stdout),
            tail(&self.stderr)
        );
    }
}

fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(4000);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

/// Runs SIPp to completion (or kills it after [`SIPP_TIMEOUT`]).
pub async fn run(dir: &PathBuf, args: &[String]) -> Outcome {
    let child = tokio::process::Command::new("sipp")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sipp starts");
    let out = tokio::time::timeout(SIPP_TIMEOUT, child.wait_with_output())
        .await
        .expect("sipp finishes in time")
        .expect("sipp output");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Arguments for SIPp calling `number` at the server with `scenario_file`, `calls` calls.
pub fn uac_args(
    server: &RunningServer,
    ports: Ports,
    scenario_file: &str,
    number: &str,
    calls: u32,
) -> Vec<String> {
    let sip = server.sip_addr().expect("server has SIP");
    let mut args: Vec<String> = vec![
        sip.to_string(),
        "-sf".into(),
        scenario(scenario_file).display().to_string(),
        "-s".into(),
        number.into(),
        "-i".into(),
        "127.0.0.1".into(),
        "-mp".into(),
        ports.sipp_media.to_string(),
        "-m".into(),
        calls.to_string(),
        "-l".into(),
        calls.to_string(),
        "-r".into(),
        calls.to_string(),
        "-nostdin".into(),
        "-timeout".into(),
        "30s".into(),
        "-timeout_error".into(),
    ];
    args.push("-trace_err".into());
    args
}

/// Arguments for SIPp as a phone (UAS) on its own port, taking one call.
pub fn uas_args(ports: Ports, scenario_file: &str) -> Vec<String> {
    vec![
        "-sf".into(),
        scenario(scenario_file).display().to_string(),
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        ports.sipp_sip.to_string(),
        "-mp".into(),
        ports.sipp_media.to_string(),
        "-m".into(),
        "1".into(),
        "-nostdin".into(),
        "-timeout".into(),
        "30s".into(),
        "-timeout_error".into(),
        "-trace_err".into(),
    ]
}

/// Waits until SIPp accepts TCP connections on `port` (it takes a moment to start).
pub async fn wait_tcp(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIPp never listened on TCP port {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
