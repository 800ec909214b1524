//! A worker pool: two clients on one connector share the calls.
//!
//! Every call is offered to both control connections; the first to claim it takes it and the
//! other is told `SESSION_BUSY`, which the SDK treats as a normal outcome. Run it against a
//! server and place a few calls at once; each call is answered by exactly one worker.
//!
//! ```text
//! cargo run -p telcoflow --example worker_pool
//! ```
//!
//! Server and credentials as in `echo.rs`. In a real deployment the workers are separate
//! processes or machines; here they are two clients in one process.

use telcoflow::{ActiveCall, TelcoflowClient, TelcoflowClientConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let config = TelcoflowClientConfig::builder()
        .api_key(
            env("TELCOFLOW_API_KEY", "dev-api-key"),
            env(
                "TELCOFLOW_CONNECTOR_UUID",
                "00000000-0000-4000-8000-000000000001",
            ),
        )
        .base_url(env("TELCOFLOW_BASE_URL", "ws://127.0.0.1:8080"))
        .build()?;
    let mut workers = Vec::new();
    let mut serving = tokio::task::JoinSet::new();
    for worker in 1..=2 {
        let client = TelcoflowClient::connect(config.clone()).await?;
        println!(
            "worker {worker} ready (connection {})",
            client.sm_ws_id().unwrap_or_default()
        );
        let c = client.clone();
        serving.spawn(async move { c.serve(move |call| handle(worker, call)).await });
        workers.push(client);
    }
    tokio::signal::ctrl_c().await?;
    for w in &workers {
        w.shutdown().await;
    }
    while let Some(r) = serving.join_next().await {
        r??;
    }
    Ok(())
}

/// Answers, stays on the line for the caller, and says which worker took the call.
async fn handle(worker: u32, call: ActiveCall) {
    println!("worker {worker}: call {} from {}", call.id(), call.caller());
    match call.answer().await {
        Ok(_) => call.terminated().await,
        Err(e) if e.is_rejected() => {
            eprintln!("worker {worker}: answer refused: {:?}", e.code());
        }
        Err(e) => eprintln!("worker {worker}: {e}"),
    }
    println!("worker {worker}: call {} ended", call.id());
}
