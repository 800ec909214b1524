//! Draining: how a server stops without dropping calls (SIGTERM to `telcoflow serve`,
//! `POST /admin/v1/drain`, or [`crate::RunningServer::drain`]).
//!
//! In order: the server stops taking new calls and control connections (`Shared::draining`:
//! simulated phones are hung up with `unavailable`, SIP INVITEs get `503` with
//! `Retry-After`, `/readyz` answers 503) and, in a cluster, says so in its heartbeat; its
//! control connections are closed with 1001 (Going Away), once their agents have opened the
//! media of the sessions they claimed (or after `Config::drain_handover`), which offers the
//! sessions they still held whose media is not up to the connector's other connections
//! (`RESUME`), on other nodes, and no offer reaches them meanwhile; the calls it runs go on to their end for up to `drain_grace_secs`, after which
//! those left are closed (their agents get `call.terminated`, their callers a hang-up or a
//! BYE); then the server stops.

use crate::registry::Registry;
use crate::state::Shared;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use telcoflow_proto::control::CloseReason;
use tracing::{info, warn};

/// How often the drain looks whether calls are left.
const POLL: Duration = Duration::from_millis(50);
/// How long calls closed after the grace have to end.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Starts draining, once; later calls only report. Returns the number of calls running.
pub(crate) fn start(shared: &Arc<Shared>) -> usize {
    let calls = shared.registry.running_call_count();
    // Whoever sets the flag first starts the drain; the token then tells everyone else.
    if shared.drain_started.swap(true, Ordering::SeqCst) {
        return calls;
    }
    shared.draining.cancel();
    info!(
        calls,
        grace_secs = shared.config.drain_grace_secs,
        "draining: no new calls; control connections closed; waiting for the calls to end"
    );
    shared.registry.set_draining();
    let task = shared.clone();
    shared.tasks.spawn(async move { run(&task).await });
    calls
}

async fn run(shared: &Shared) {
    let grace = shared.config.drain_grace();
    let in_time = tokio::select! {
        done = wait_for_calls(&shared.registry, grace) => done,
        // Stopped at once meanwhile (a second signal): nothing left to wait for.
        () = shared.shutdown.cancelled() => return,
    };
    if !in_time {
        let left = shared.registry.running_calls();
        warn!(
            calls = left.len(),
            "drain grace over: ending the calls still running"
        );
        for call in &left {
            call.send(crate::call::CallInput::Close {
                reason: CloseReason::ForceClose,
                done: None,
            });
        }
        if !wait_for_calls(&shared.registry, CLOSE_WAIT).await {
            warn!("calls did not end in time after being closed; stopping anyway");
        }
    }
    info!("drained: stopping");
    shared.shutdown.cancel();
}

/// Whether every call of this node ended within `bound`.
async fn wait_for_calls(registry: &Registry, bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if registry.running_call_count() == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}
