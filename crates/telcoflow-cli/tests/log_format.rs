//! `--log-format json`: every line on stderr is one JSON object, and the lines logged inside
//! a call carry its `call_id` and `session_id` as fields.

use std::process::Command;

/// A short tone for the demo's caller to say, so that the call is brief.
fn tone_wav(path: &std::path::Path) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..4800 {
        let t = f64::from(i) / 16000.0;
        w.write_sample((8000.0 * (t * 440.0 * std::f64::consts::TAU).sin()) as i16)
            .unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn json_logs_are_one_object_per_line_with_the_call_and_session_ids() {
    let dir = std::env::temp_dir();
    let wav = dir.join(format!("telcoflow-log-format-{}.wav", std::process::id()));
    let heard = dir.join(format!(
        "telcoflow-log-format-{}-heard.wav",
        std::process::id()
    ));
    tone_wav(&wav);
    let out = Command::new(env!("CARGO_BIN_EXE_telcoflow"))
        .args(["--log-format", "json", "demo", "--play"])
        .arg(&wav)
        .arg("--record")
        .arg(&heard)
        .env("RUST_LOG", "info")
        .output()
        .expect("telcoflow runs");
    let _ = std::fs::remove_file(&wav);
    let _ = std::fs::remove_file(&heard);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{stderr}");
    for line in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line[key].is_string(), "no {key}: {line}");
        }
    }
    let in_call: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "call started" || l["message"] == "call ended")
        .collect();
    assert_eq!(in_call.len(), 2, "{stderr}");
    let call_id = in_call[0]["call_id"].as_str().expect("call_id");
    let session_id = in_call[0]["session_id"].as_str().expect("session_id");
    assert!(!call_id.is_empty() && !session_id.is_empty() && call_id != session_id);
    assert_eq!(in_call[1]["call_id"], call_id);
    assert_eq!(in_call[1]["session_id"], session_id);
}

#[test]
fn with_json_logs_a_fatal_error_is_a_json_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_telcoflow"))
        .args([
            "--log-format",
            "json",
            "check",
            "--config",
            "/nonexistent/telcoflow.toml",
        ])
        .output()
        .expect("telcoflow runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}")))
        .collect();
    let error = lines
        .iter()
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot read /nonexistent/telcoflow.toml")),
        "{error}"
    );
}

#[test]
fn a_bad_log_format_is_refused_and_errors_stay_plain_text() {
    let out = Command::new(env!("CARGO_BIN_EXE_telcoflow"))
        .args(["check", "--config", "/nonexistent/telcoflow.toml"])
        .output()
        .expect("telcoflow runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read /nonexistent/telcoflow.toml"),
        "{stderr}"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_telcoflow"))
        .args(["--log-format", "xml", "check", "--config", "x"])
        .output()
        .expect("telcoflow runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("json"));
}
