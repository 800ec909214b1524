//! How the registry reaches a control connection of this node.

use std::sync::Arc;
use telcoflow_proto::control::{ServerFrame, SetupData};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How a control connection is reached.
#[derive(Debug, Clone)]
pub(crate) struct ControlLink {
    pub(crate) connector: Arc<str>,
    pub(crate) setup: SetupData,
    pub(crate) tx: mpsc::Sender<ServerFrame>,
    /// Cancelled when the connection cannot take a frame: it is not reading and gets closed.
    pub(crate) kill: CancellationToken,
    /// Whether incoming calls are offered to it (`call_flow.setup` `inboundCall: "NO"` turns
    /// this off).
    pub(crate) inbound_calls: bool,
}

impl ControlLink {
    /// Queues a frame; a full queue closes the connection rather than lose frames silently.
    pub(crate) fn send(&self, frame: ServerFrame) {
        if let Err(e) = self.tx.try_send(frame) {
            warn!(error = %e, "control connection is not reading; closing it");
            self.kill.cancel();
        }
    }
}
