//! What the nodes of a cluster write to NATS: KV records, and the messages on its subjects
//! (docs/architecture.md, "Buckets, keys, subjects").

use crate::call::CallHandle;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use telcoflow_proto::control::{CloseReason, ServerFrame, SessionInfo, SetupData};

/// Session records, by [`session_key`].
pub(super) const SESSIONS_BUCKET: &str = "telcoflow_sessions";
/// Open calls per connector, by node ([`CallCounts`]).
pub(super) const CALLS_BUCKET: &str = "telcoflow_calls";
/// Node liveness ([`NodeBeat`]), by node id.
pub(super) const NODES_BUCKET: &str = "telcoflow_nodes";

/// The control connection that holds a session, and its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Holder {
    pub(super) sm_ws_id: String,
    pub(super) node: String,
}

/// A session as the cluster knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SessionRecord {
    pub(super) info: SessionInfo,
    pub(super) connector: String,
    /// The node that runs the call.
    pub(super) owner: String,
    /// The owner's process (a fresh id each time a node starts), so that a record is
    /// neither kept after its process is gone nor taken for one of a previous life by
    /// another process with the same node id. Empty in records of builds without it.
    #[serde(default)]
    pub(super) incarnation: String,
    pub(super) bound: Option<Holder>,
    pub(super) ready: bool,
    pub(super) media_attached: bool,
    /// The revision the record was read at (in the mirror), never written: deletes are
    /// made at it, so that one never removes a record rewritten since.
    #[serde(skip)]
    pub(super) revision: u64,
}

/// Open calls of one connector, per node.
pub(super) type CallCounts = BTreeMap<String, usize>;

/// A node's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct NodeBeat {
    pub(super) public_url: String,
    pub(super) draining: bool,
    pub(super) at: u64,
    /// The node's process ([`SessionRecord::incarnation`]).
    #[serde(default)]
    pub(super) incarnation: String,
}

/// A `session.notify` for every node's control connections of a connector.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Offer {
    pub(super) frame: ServerFrame,
    /// An incoming call: not for connections that turned incoming calls off.
    pub(super) inbound: bool,
}

/// A request to the node that owns a call (or holds a control connection).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum NodeRequest {
    /// The session was claimed: the call learns its agent's format. Replies `bool`.
    Claimed {
        session_id: String,
        holder: Holder,
        setup: SetupData,
    },
    /// `session.ready`: the owner mints the media token and replies `Option<ServerFrame>`,
    /// the `call.in`.
    CallIn {
        session_id: String,
        sm_ws_id: String,
    },
    /// HTTP close: replies a [`CloseReply`] once the call has ended.
    Close {
        connector: String,
        session_id: String,
        reason: CloseReason,
    },
    /// The holder left before the media came up: forget it and its token. Replies `bool`.
    Unbind {
        session_id: String,
        sm_ws_id: String,
    },
    /// A frame for a control connection of the node (no reply).
    Control {
        sm_ws_id: String,
        frame: ServerFrame,
    },
}

impl NodeRequest {
    /// The last token of its subject.
    pub(super) fn op(&self) -> &'static str {
        match self {
            Self::Claimed { .. } => "claimed",
            Self::CallIn { .. } => "call_in",
            Self::Close { .. } => "close",
            Self::Unbind { .. } => "unbind",
            Self::Control { .. } => "control",
        }
    }
}

/// The owner's answer to [`NodeRequest::Close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum CloseReply {
    Closed,
    NotFound,
    JustEnded,
}

/// The key of a session record.
pub(super) fn session_key(connector: &str, session_id: &str) -> String {
    format!("{connector}.{session_id}")
}

/// The subject of offers for a connector.
pub(super) fn notify_subject(connector: &str) -> String {
    format!("telcoflow.notify.{connector}")
}

/// The subject of a request to a node.
pub(super) fn node_subject(node: &str, op: &str) -> String {
    format!("telcoflow.node.{node}.{op}")
}

/// Whether an id that came from the network can be a token of a key or subject (session ids
/// are UUIDs; anything else cannot name a session).
pub(super) fn is_token(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// One write, queued by a method the call actor calls.
/// Applied by the writer task in the order queued.
pub(super) enum Write {
    /// A new call of this node: count it under the cluster's limit, write its record, offer
    /// it; or end it, refused.
    Admit {
        record: Box<SessionRecord>,
        max_calls: usize,
        call: CallHandle,
    },
    MediaAttached {
        key: String,
        attached: bool,
    },
    /// The session ended: its record is closed and its call no longer counted.
    Ended {
        session_id: String,
        key: Option<String>,
        closed_at: u64,
    },
    /// This node's entries in the call counts are set to what it runs.
    HealCounts,
    /// A claim whose owner was not told is given back (see `NatsRegistry::unclaim`).
    Unclaim {
        connector: String,
        session_id: String,
        holder: Holder,
        owner: String,
    },
    /// A closed record is forgotten, unless it was rewritten since `revision`.
    Forget {
        key: String,
        revision: u64,
    },
    Publish {
        subject: String,
        request: NodeRequest,
    },
}
