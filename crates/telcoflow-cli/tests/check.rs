//! `telcoflow check --config FILE`: validates a configuration (with the `TELCOFLOW_*`
//! variables over it, as `serve` does) and prints what the server would do, never a secret.

use std::process::{Command, Output};

const UUID: &str = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01";

fn file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "telcoflow-check-{name}-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

fn check(path: &std::path::Path, env: &[(&str, &str)]) -> (Output, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_telcoflow"));
    cmd.args(["check", "--config"]).arg(path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("telcoflow runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

fn valid_file(name: &str) -> std::path::PathBuf {
    file(
        name,
        &format!(
            "listen = \"127.0.0.1:8090\"\nadmin_token = \"admin-secret\"\n\
             [sip]\nlisten = \"127.0.0.1:5090\"\nrtp_ports = \"30000-30100\"\n\
             [[sip.trunks]]\nhost = \"trunk.example\"\nusername = \"acme\"\npassword = \"trunk-secret\"\n\
             [metrics]\ntoken = \"metrics-secret\"\n\
             [[connectors]]\nuuid = \"{UUID}\"\napi_key = \"key-secret\"\nname = \"shop\"\n\
             numbers = [\"+100\"]\nconnect_default = \"+200\"\n"
        ),
    )
}

#[test]
fn a_valid_file_is_described_without_its_secrets() {
    let path = valid_file("valid");
    let (out, stdout, stderr) = check(&path, &[]);
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "{stderr}");
    for says in [
        "valid",
        "listen: ws://127.0.0.1:8090",
        "sip: udp+tcp 127.0.0.1:5090, rtp ports 30000-30100",
        "1 trunk(s) (trunk.example)",
        &format!("{UUID} (shop): numbers [+100]"),
        "connect default +200",
        "cluster: none",
        "limits: 1000 calls",
        "metrics: GET /metrics, every client (loopback too) with the token",
        "admin token: set",
        "recording: off",
    ] {
        assert!(stdout.contains(says), "no {says:?} in:\n{stdout}");
    }
    for secret in [
        "admin-secret",
        "trunk-secret",
        "metrics-secret",
        "key-secret",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
        assert!(!stderr.contains(secret), "{secret} logged:\n{stderr}");
    }
}

#[test]
fn environment_variables_override_the_file() {
    let path = valid_file("env");
    let (out, stdout, stderr) = check(
        &path,
        &[
            ("TELCOFLOW_SERVER_LISTEN", "0.0.0.0:9999"),
            ("TELCOFLOW_METRICS_ENABLED", "false"),
            ("TELCOFLOW_SIP_ENABLED", "false"),
            ("TELCOFLOW_RECORDING_DIR", "/var/lib/telcoflow/rec"),
            ("TELCOFLOW_RECORDING_RETENTION_DAYS", "7"),
        ],
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("recording: into /var/lib/telcoflow/rec, kept 7 days, at most 100"),
        "{stdout}"
    );
    assert!(stdout.contains("listen: ws://0.0.0.0:9999"), "{stdout}");
    assert!(stdout.contains("metrics: off"), "{stdout}");
    assert!(stdout.contains("sip: off"), "{stdout}");
    assert!(stdout.contains("environment: TELCOFLOW_"), "{stdout}");
    let (out, _, stderr) = check(&path, &[("TELCOFLOW_LIMITS_MAX_CONNECTIONS", "lots")]);
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    assert!(
        stderr.contains("TELCOFLOW_LIMITS_MAX_CONNECTIONS") && stderr.contains("whole number"),
        "{stderr}"
    );
}

#[test]
fn a_cluster_url_is_shown_without_its_credentials() {
    for (name, url, shown, tls) in [
        (
            "userinfo",
            "nats://alice:hunter2@127.0.0.1:4222",
            "through nats://127.0.0.1:4222 (auth: in the URL, tls: off)",
            false,
        ),
        (
            "tlsscheme",
            "tls://alice:hunter2@nats.example:4222",
            "through tls://nats.example:4222 (auth: in the URL, tls: on)",
            true,
        ),
    ] {
        let path = file(
            name,
            &format!(
                "[cluster]\nnats_url = \"{url}\"\nnode_id = \"a\"\n\
                 [[connectors]]\nuuid = \"{UUID}\"\napi_key = \"k\"\n"
            ),
        );
        let (out, stdout, stderr) = check(&path, &[]);
        let _ = std::fs::remove_file(&path);
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(stdout.contains(shown), "{name} (tls {tls}): {stdout}");
        for secret in ["alice", "hunter2"] {
            assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
        }
    }
}

#[test]
fn a_tls_file_that_serve_cannot_load_fails_the_check() {
    let path = file(
        "tlsfile",
        &format!(
            "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n\
             [[connectors]]\nuuid = \"{UUID}\"\napi_key = \"k\"\n"
        ),
    );
    let (out, stdout, stderr) = check(&path, &[]);
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("tls.cert") && stderr.contains("/nonexistent/cert.pem"),
        "{stderr}"
    );
}

/// A variable that is not UTF-8 is no reason to fail, unless it is a setting's.
#[cfg(unix)]
#[test]
fn a_variable_that_is_not_utf8_is_skipped_unless_it_is_a_setting() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt as _;
    let path = valid_file("notutf8");
    let run = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_telcoflow"))
            .args(["check", "--config"])
            .arg(&path)
            .env(name, OsStr::from_bytes(b"\xff"))
            .output()
            .expect("telcoflow runs")
    };
    let out = run("BAD");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("TELCOFLOW_SERVER_PUBLIC_URL");
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("TELCOFLOW_SERVER_PUBLIC_URL") && stderr.contains("UTF-8"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_file_fails_with_the_error() {
    for (name, text, says) in [
        ("empty", "", "at least one [[connectors]]"),
        (
            "unknown",
            &format!("bogus = 1\n[[connectors]]\nuuid = \"{UUID}\"\napi_key = \"k\"\n"),
            "bogus",
        ),
        (
            "range",
            &format!(
                "[sip]\nrtp_ports = \"9-8\"\n[[connectors]]\nuuid = \"{UUID}\"\napi_key = \"k\"\n"
            ),
            "sip.rtp_ports",
        ),
    ] {
        let path = file(name, text);
        let (out, stdout, stderr) = check(&path, &[]);
        let _ = std::fs::remove_file(&path);
        assert!(!out.status.success(), "{name}: {stdout}");
        assert!(
            stderr.contains("is not valid") && stderr.contains(says),
            "{name}: {stderr}"
        );
        assert!(stdout.is_empty(), "{name}: {stdout}");
    }
}
