//! No API key or media token in the SDK's logs, even at trace level.

mod common;

use common::*;
use std::io::Write;
use std::sync::{Arc, Mutex};
use telcoflow::TelcoflowClient;
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::config::DEV_API_KEY;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.target() == "telcoflow" || m.target().starts_with("telcoflow::")
            })),
    );
    // The test runtime is single-threaded, so every SDK task logs through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = start_server().await;
    let client = TelcoflowClient::connect(
        builder(server.base_url())
            .auto_connect_media(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let mut events = client.events();
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    let json: serde_json::Value = serde_json::from_str(&call.to_json().unwrap()).unwrap();
    let token = json["session_token"].as_str().unwrap().to_owned();
    call.answer().await.unwrap();
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    call.send_audio(&pattern(3200, 1)).await.unwrap();
    phone.hear(6400).await;
    phone.hangup();
    tokio::time::timeout(WAIT, call.terminated()).await.unwrap();
    let debug = format!("{call:?} {client:?}");
    client.shutdown().await;
    server.shutdown().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("command"),
        "trace logging was captured: {logs}"
    );
    for secret in [DEV_API_KEY, token.as_str()] {
        assert!(!logs.contains(secret), "a secret is in the logs");
        assert!(!debug.contains(secret), "a secret is in a Debug output");
    }
}
