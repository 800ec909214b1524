//! The same echo scenario with the reference Python SDK and with this SDK gives the same audio
//! back.
//!
//! Needs the Python SDK: `pip install telcoflow==1.0.0` (the interpreter is `$PYTHON`, default
//! `python3`). Run with `cargo test -p telcoflow --test python_parity -- --ignored`.

mod common;

use common::*;
use futures_util::StreamExt;
use std::io::BufRead;
use std::process::{Command, Stdio};
use telcoflow::TelcoflowClient;
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};

/// One call: say `spoken` once answered, return the voiced 20 ms frames heard back.
async fn echo_call(base_url: &str, spoken: &[u8]) -> Vec<u8> {
    let mut phone = Phone::dial(base_url, "+4912345", "+4900001").await;
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    phone.speak(spoken).await;
    let last = &spoken[spoken.len() - 640..];
    while !contains(&phone.heard, last) {
        phone.hear(phone.heard.len() + 640).await;
    }
    phone.hangup();
    phone
        .heard
        .chunks(640)
        .filter(|f| energy(f) > 0)
        .flatten()
        .copied()
        .collect()
}

#[tokio::test]
#[ignore = "needs the Python SDK: pip install telcoflow==1.0.0"]
async fn python_and_rust_echo_agents_give_the_same_audio_back() {
    let server = start_server().await;
    let spoken = pattern(16_000, 21);

    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let serving = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .serve(|call| async move {
                    call.answer().await.unwrap().into_result().unwrap();
                    let mut audio = call.audio_stream(0);
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
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(python)
        .args([script, server.base_url(), DEV_API_KEY, DEV_CONNECTOR_UUID])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python runs");
    let stdout = child.stdout.take().unwrap();
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
    let python = echo_call(server.base_url(), &spoken).await;
    let _ = child.kill();
    let _ = child.wait();

    assert_eq!(rust.len(), spoken.len());
    assert!(rust == spoken, "the Rust SDK echoes exactly");
    assert_eq!(python.len(), spoken.len());
    assert!(python == rust, "both SDKs give the same audio back");
    server.shutdown().await;
}
