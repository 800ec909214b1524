//! The same echo scenario with the reference Python SDK and with this SDK gives the same audio
//! back.
//!
//! Needs the Python SDK (`pip install telcoflow==1.0.0`; `.ci/run` installs it in `.venv`).
//! The interpreter is the first of `$PYTHON`, the workspace's `.venv/bin/python` and `python3`
//! that can import it. Without one the test is skipped, except under CI (`CI` set), where that
//! is a failure.

mod common;

use common::*;
use futures_util::StreamExt;
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use telcoflow::{AudioChannel, TelcoflowClient};
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::Config;
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};

/// One call: say `spoken` once answered, return the voiced 20 ms frames heard back.
async fn echo_call(base_url: &str, spoken: &[u8]) -> Vec<u8> {
    let mut phone = Phone::dial(base_url, "+4912345", "+4900001").await;
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    phone.speak(spoken).await;
    let last = &spoken[spoken.len() - 640..];
    // For at most five seconds of audio after the spoken part.
    let mut back = false;
    for _ in 0..250 {
        if contains(&phone.heard, last) {
            back = true;
            break;
        }
        phone.hear(phone.heard.len() + 640).await;
    }
    assert!(
        back,
        "the end of what was said came back within five seconds"
    );
    phone.hangup();
    phone
        .heard
        .chunks(640)
        .filter(|f| energy(f) > 0)
        .flatten()
        .copied()
        .collect()
}

/// Stops the Python agent however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An interpreter that has the Python SDK.
fn python_with_sdk() -> Option<String> {
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python");
    std::env::var("PYTHON")
        .ok()
        .into_iter()
        .chain([venv.to_owned(), "python3".to_owned()])
        .find(|python| {
            Command::new(python)
                .args(["-c", "import telcoflow"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

#[tokio::test]
async fn python_and_rust_echo_agents_give_the_same_audio_back() {
    let Some(python) = python_with_sdk() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Python SDK is not installed (pip install telcoflow==1.0.0)"
        );
        eprintln!("skipped: the Python SDK is not installed (pip install telcoflow==1.0.0)");
        return;
    };
    // The same audio back from both, frame for frame: on a loaded machine the agents'
    // answers can come late enough to count as stalls, whose backlog the server would drop
    // (tests/agent_stall.rs in the server covers that).
    let mut server_config = Config::development();
    server_config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    server_config.limits.catch_up_after_stall = false;
    let server = start_server_with(server_config).await;
    let spoken = pattern(16_000, 21);

    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let serving = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .serve(|call| async move {
                    call.answer().await.unwrap();
                    let mut audio = call.audio_stream(AudioChannel::Mixed);
                    while let Some(chunk) = audio.next().await {
                        if call.send_audio(&chunk).await.is_err() {
                            break;
                        }
                    }
                })
                .await
        })
    };
    let rust = echo_call(server.base_url(), &spoken).await;
    client.shutdown().await;
    serving.await.unwrap().unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/py_echo_agent.py");
    let mut child = Command::new(&python)
        .args([script, server.base_url(), DEV_API_KEY, DEV_CONNECTOR_UUID])
        .stdout(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .expect("python runs");
    let stdout = child.0.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = tokio::time::timeout(WAIT, ready)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(line.trim(), "ready", "the Python agent did not start");
    let from_python = echo_call(server.base_url(), &spoken).await;
    drop(child);

    assert_eq!(rust.len(), spoken.len());
    assert!(rust == spoken, "the Rust SDK echoes exactly");
    assert_eq!(from_python.len(), spoken.len());
    assert!(from_python == rust, "both SDKs give the same audio back");
    server.shutdown().await;
}
