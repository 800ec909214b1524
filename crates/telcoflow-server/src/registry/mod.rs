//! The call/session registry: which sessions exist, which control connection holds each, and
//! which control connections each connector has.
//!
//! This is the one piece of shared state of the server. Its interface has two halves, so that
//! it can live in a distributed store (docs/architecture.md, "Registry and the cluster")
//! without the planes around it changing shape:
//!
//! - **Node-local, synchronous.** What only this node can know or act on: its control
//!   connections, the calls it runs (by call id), their media tokens and media attachment.
//!   The call actor uses only this half and never awaits it ([`Registry::open_call_session`],
//!   [`Registry::session_ended`], [`Registry::set_media_attached`], ...): an implementation
//!   whose records live elsewhere updates them from a queue of its own, so one slow store
//!   cannot stall a call.
//! - **Directory, asynchronous.** What may span nodes: claims, `session.ready`, listings,
//!   closing a session wherever its call runs, offering sessions to control connections.
//!   The control plane and the HTTP API await these; each fails with
//!   [`RegistryError::Unavailable`] when the store cannot be reached, which the planes turn
//!   into an error frame or an HTTP 503.
//!
//! Two implementations stand behind it: [`MemoryRegistry`], everything in one process under
//! one lock, every directory call answered without waiting (the default); and
//! [`NatsRegistry`], nodes of a cluster sharing the directory through NATS (`[cluster]`).

mod link;
mod memory;
mod nats;
mod outcome;

pub(crate) use link::ControlLink;
pub(crate) use memory::MemoryRegistry;
pub(crate) use nats::NatsRegistry;
pub(crate) use outcome::{
    ClaimError, CloseError, ConsoleView, ControlView, OpenError, ReadyOutcome, RegistryError,
    SessionPage, SessionQuery,
};

use crate::call::{CallHandle, CallInput};
use crate::token::TokenSigner;
use std::sync::Arc;
use std::time::SystemTime;
use telcoflow_proto::control::{CallIn, Channel, CloseReason, SessionInfo};
use telcoflow_proto::media::MEDIA_PATH;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A control connection's place under `max_control_connections_per_connector`, given back
/// when dropped.
#[derive(Debug)]
pub(crate) struct ControlSlot {
    registry: Registry,
    connector: Arc<str>,
}

impl Drop for ControlSlot {
    fn drop(&mut self) {
        self.registry.release_control(&self.connector);
    }
}

/// The registry. Cheap to clone. One variant per implementation; the planes see only these
/// methods.
#[derive(Debug, Clone)]
pub(crate) enum Registry {
    /// Everything in this process (the default, and the only one without `--cluster`).
    Memory(MemoryRegistry),
    /// A node of a cluster (`--cluster`).
    Nats(NatsRegistry),
}

impl Registry {
    /// The in-memory registry, keeping at most `max_closed` closed sessions per connector.
    pub(crate) fn in_memory(max_closed: usize) -> Self {
        Self::Memory(MemoryRegistry::new(max_closed))
    }

    /// A node of the cluster `cluster`, connected to its NATS; it takes part once started.
    pub(crate) async fn cluster(
        cluster: &crate::config::ClusterConfig,
        max_closed: usize,
    ) -> Result<Self, String> {
        Ok(Self::Nats(
            NatsRegistry::connect(cluster, max_closed).await?,
        ))
    }

    /// Starts what the registry runs in the background (nothing in memory).
    pub(crate) async fn start(&self, context: NodeContext) -> Result<(), String> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Nats(n) => n.start(context).await,
        }
    }

    // ---- Node-local, synchronous: never waits on anything but a short map update. ----

    /// A place for one more control connection of `connector` on this node, if it holds
    /// fewer than `limit`. Taken before the upgrade is answered, so that connections still in
    /// their handshake or before `setup` count too.
    pub(crate) fn reserve_control(&self, connector: &str, limit: usize) -> Option<ControlSlot> {
        let reserved = match self {
            Self::Memory(m) => m.reserve_control(connector, limit),
            Self::Nats(n) => n.local_registry().reserve_control(connector, limit),
        };
        reserved.then(|| ControlSlot {
            registry: self.clone(),
            connector: connector.into(),
        })
    }

    fn release_control(&self, connector: &str) {
        match self {
            Self::Memory(m) => m.release_control(connector),
            Self::Nats(n) => n.local_registry().release_control(connector),
        }
    }

    /// `call_flow.setup`: whether incoming calls are offered to this connection.
    pub(crate) fn set_inbound_calls(&self, sm_ws_id: &str, inbound_calls: bool) {
        match self {
            Self::Memory(m) => m.set_inbound_calls(sm_ws_id, inbound_calls),
            Self::Nats(n) => n
                .local_registry()
                .set_inbound_calls(sm_ws_id, inbound_calls),
        }
    }

    /// Registers the session of a new call run by this node and offers it to the connector's
    /// control connections (unless `bound`, for a call a connection created). Fails with
    /// [`OpenError::QuotaExceeded`] at the connector's call limit.
    ///
    /// Synchronous so that a network edge can answer at once (SIP answers from its own loop).
    /// A store that cannot check the limit without waiting registers the call here and admits
    /// it afterwards, closing it (`CallInput::Close`) if it is over the limit.
    pub(crate) fn open_call_session(
        &self,
        connector: &Arc<str>,
        max_calls: usize,
        info: SessionInfo,
        call: CallHandle,
        bound: Option<String>,
    ) -> Result<(), OpenError> {
        match self {
            Self::Memory(m) => m.open_call_session(connector, max_calls, info, call, bound),
            Self::Nats(n) => n.open_call_session(connector, max_calls, info, call, bound),
        }
    }

    /// Makes a call this node runs reachable by its id (for the media plane).
    pub(crate) fn index_call(&self, call: &CallHandle) {
        match self {
            Self::Memory(m) => m.index_call(call),
            Self::Nats(n) => n.local_registry().index_call(call),
        }
    }

    /// Forgets a finished call.
    pub(crate) fn unindex_call(&self, call_id: &str) {
        match self {
            Self::Memory(m) => m.unindex_call(call_id),
            Self::Nats(n) => n.local_registry().unindex_call(call_id),
        }
    }

    /// A call this node runs, by id.
    pub(crate) fn call_by_id(&self, call_id: &str) -> Option<CallHandle> {
        match self {
            Self::Memory(m) => m.call_by_id(call_id),
            Self::Nats(n) => n.local_registry().call_by_id(call_id),
        }
    }

    /// Every call this node runs.
    pub(crate) fn running_calls(&self) -> Vec<CallHandle> {
        match self {
            Self::Memory(m) => m.running_calls(),
            Self::Nats(n) => n.local_registry().running_calls(),
        }
    }

    /// The calls of `connector` this node runs, picked out under the registry's lock (the
    /// console asks twice a second per view: it clones no other connector's handles).
    pub(crate) fn running_calls_of(&self, connector: &str) -> Vec<CallHandle> {
        match self {
            Self::Memory(m) => m.running_calls_of(connector),
            Self::Nats(n) => n.local_registry().running_calls_of(connector),
        }
    }

    /// The control connections of `connector` on this node and who holds its open sessions,
    /// for the console (read-only).
    pub(crate) fn console_view(&self, connector: &str) -> ConsoleView {
        match self {
            Self::Memory(m) => m.console_view(connector),
            Self::Nats(n) => n.local_registry().console_view(connector),
        }
    }

    /// How many calls this node runs.
    pub(crate) fn running_call_count(&self) -> usize {
        match self {
            Self::Memory(m) => m.running_call_count(),
            Self::Nats(n) => n.local_registry().running_call_count(),
        }
    }

    /// This node is draining: it says so in its heartbeat at once, so that the cluster sees
    /// it (nothing to say without a cluster).
    pub(crate) fn set_draining(&self) {
        match self {
            Self::Memory(_) => {}
            Self::Nats(n) => n.set_draining(),
        }
    }

    /// Whether the control connection `sm_ws_id` of this node holds a session whose media is
    /// not up yet: its agent is still to open it, through this connection's claim.
    pub(crate) fn holds_unattached(&self, sm_ws_id: &str) -> bool {
        match self {
            Self::Memory(m) => !m.unattached_of(sm_ws_id).is_empty(),
            Self::Nats(n) => n.holds_unattached(sm_ws_id),
        }
    }

    /// Why this node cannot take new calls now, if its store is out of reach (a cluster
    /// whose NATS is away); `None` when it can.
    pub(crate) fn unavailable(&self) -> Option<&'static str> {
        match self {
            Self::Memory(_) => None,
            Self::Nats(n) => n.unavailable(),
        }
    }

    /// Records the media token handed to the session's holder in `call.in`.
    pub(crate) fn set_media_token(&self, session_id: &str, token: &str) {
        match self {
            Self::Memory(m) => m.set_media_token(session_id, token),
            Self::Nats(n) => n.local_registry().set_media_token(session_id, token),
        }
    }

    /// Whether `token` is the one handed to the session's current holder.
    pub(crate) fn is_current_media_token(&self, session_id: &str, token: &str) -> bool {
        match self {
            Self::Memory(m) => m.is_current_media_token(session_id, token),
            Self::Nats(n) => n.local_registry().is_current_media_token(session_id, token),
        }
    }

    /// The media connection of a session's call is up (or down again). From the call actor.
    pub(crate) fn set_media_attached(&self, session_id: &str, attached: bool) {
        match self {
            Self::Memory(m) => m.set_media_attached(session_id, attached),
            Self::Nats(n) => n.set_media_attached(session_id, attached),
        }
    }

    /// A call's session has ended: tells its holder with `session.closed` and frees the call
    /// slot. From the call actor; returns false if it was already closed.
    pub(crate) fn session_ended(&self, session_id: &str, reason: CloseReason) -> bool {
        match self {
            Self::Memory(m) => m.session_ended(session_id, reason),
            Self::Nats(n) => n.session_ended(session_id, reason),
        }
    }

    /// Forgets closed sessions older than `keep_secs`, so the registry does not grow forever.
    pub(crate) fn prune_closed(&self, keep_secs: u64) {
        match self {
            Self::Memory(m) => m.prune_closed(keep_secs),
            Self::Nats(n) => n.prune_closed(keep_secs),
        }
    }

    // ---- Directory, asynchronous: may reach other nodes. ----

    /// Adds a control connection after `setup` and offers it every session of its connector
    /// that nobody holds. The connection is added even when the offers fail.
    pub(crate) async fn add_control(
        &self,
        sm_ws_id: &str,
        link: ControlLink,
    ) -> Result<(), RegistryError> {
        match self {
            Self::Memory(m) => {
                m.add_control(sm_ws_id, link);
                Ok(())
            }
            Self::Nats(n) => n.add_control(sm_ws_id, link).await,
        }
    }

    /// Removes a control connection. Sessions it held whose media is not connected yet are
    /// offered again (`RESUME`) to the connector's other connections; the others stay held.
    /// The connection is removed even when the offers fail.
    pub(crate) async fn remove_control(&self, sm_ws_id: &str) -> Result<(), RegistryError> {
        match self {
            Self::Memory(m) => {
                m.remove_control(sm_ws_id);
                Ok(())
            }
            Self::Nats(n) => n.remove_control(sm_ws_id).await,
        }
    }

    /// `session.open`: claims a session for a control connection; exactly one claimant wins.
    pub(crate) async fn claim(
        &self,
        sm_ws_id: &str,
        session_id: &str,
    ) -> Result<SessionInfo, ClaimError> {
        match self {
            Self::Memory(m) => m.claim(sm_ws_id, session_id),
            Self::Nats(n) => n.claim(sm_ws_id, session_id).await,
        }
    }

    /// `session.ready`.
    pub(crate) async fn ready(
        &self,
        sm_ws_id: &str,
        session_id: &str,
    ) -> Result<ReadyOutcome, RegistryError> {
        match self {
            Self::Memory(m) => Ok(m.ready(sm_ws_id, session_id)),
            Self::Nats(n) => n.ready(sm_ws_id, session_id).await,
        }
    }

    /// One page of a connector's sessions for the HTTP API, oldest first.
    pub(crate) async fn list(
        &self,
        query: &SessionQuery<'_>,
    ) -> Result<SessionPage, RegistryError> {
        match self {
            Self::Memory(m) => Ok(m.list(query)),
            Self::Nats(n) => n.list(query).await,
        }
    }

    /// Ends an open session's call for everyone (HTTP close) and waits until it has ended.
    pub(crate) async fn close_session(
        &self,
        connector: &str,
        session_id: &str,
        reason: CloseReason,
    ) -> Result<(), CloseError> {
        let call = match self {
            Self::Memory(m) => m.call_of(connector, session_id),
            Self::Nats(n) => return n.close_session(connector, session_id, reason).await,
        };
        let Some(call) = call else {
            return Err(CloseError::NotFound);
        };
        close_call(&call, reason).await
    }

    /// An open session of `connector` with this far party, for `session.create` idempotency.
    pub(crate) async fn open_session_for(
        &self,
        connector: &str,
        channel: Channel,
        remote: &str,
    ) -> Result<Option<String>, RegistryError> {
        match self {
            Self::Memory(m) => Ok(m.open_session_for(connector, channel, remote)),
            Self::Nats(n) => n.open_session_for(connector, channel, remote).await,
        }
    }
}

/// The `call.in` of a call of this node: its media URL here and a fresh token. The caller
/// records the token ([`Registry::set_media_token`]): from then on it is the only one that
/// attaches (one minted for an earlier holder of the session, before a RESUME, is refused).
pub(crate) fn call_in(
    signer: &TokenSigner,
    public_url: &str,
    org_uuid: &str,
    call: &CallHandle,
) -> CallIn {
    CallIn {
        session_id: call.session_id.to_string(),
        call_id: call.call_id.to_string(),
        org_uuid: org_uuid.to_owned(),
        from: call.from.to_string(),
        to: call.to.to_string(),
        url: format!("{public_url}{MEDIA_PATH}/{}", call.call_id),
        token: signer.issue(&call.call_id, SystemTime::now()),
    }
}

/// What a cluster node runs in the background needs of the server.
pub(crate) struct NodeContext {
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    /// Mints the media tokens of this node's `call.in`s asked for by other nodes.
    pub(crate) signer: TokenSigner,
    /// This node's base URL, in those `call.in`s.
    pub(crate) public_url: String,
}

/// Closes a call this node runs and waits for it to end.
async fn close_call(call: &CallHandle, reason: CloseReason) -> Result<(), CloseError> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let close = CallInput::Close {
        reason,
        done: Some(done_tx),
    };
    if !call.send_wait(close).await {
        return Err(CloseError::JustEnded);
    }
    // The sender drops without a value if the call ended on its own meanwhile: closed either way.
    let _ = done_rx.await;
    Ok(())
}
