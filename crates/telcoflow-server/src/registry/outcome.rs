//! What the registry answers: its errors, the outcome of `session.ready`, and pages of the
//! session listing.

use crate::call::CallHandle;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::control::{Channel, SessionInfo, SessionState};

/// The registry's store cannot be reached (a cluster whose NATS is down): the request is
/// refused now rather than left waiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RegistryError {
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
}

impl RegistryError {
    /// The code for an error frame (the wire has no code of its own for it).
    pub(crate) fn code(&self) -> ErrorCode {
        ErrorCode::InternalError
    }
}

/// Why a session could not be claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimError {
    Busy { bound_sm_ws_id: String },
    NotFound,
    Closed,
    Registry(RegistryError),
}

impl ClaimError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Busy { .. } => ErrorCode::SessionBusy,
            Self::NotFound => ErrorCode::SessionNotFound,
            Self::Closed => ErrorCode::SessionClosed,
            Self::Registry(e) => e.code(),
        }
    }
}

impl From<RegistryError> for ClaimError {
    fn from(e: RegistryError) -> Self {
        Self::Registry(e)
    }
}

/// Why a new call's session was not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// The connector is at `limits.max_calls_per_connector`.
    QuotaExceeded,
    Registry(RegistryError),
}

impl OpenError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::QuotaExceeded => ErrorCode::QuotaExceeded,
            Self::Registry(e) => e.code(),
        }
    }
}

/// Why `POST /public/v1/sessions/{id}/close` did not close a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseError {
    /// No open session of the connector with that id.
    NotFound,
    /// The call ended on its own while the close was on its way.
    JustEnded,
    Registry(RegistryError),
}

impl From<RegistryError> for CloseError {
    fn from(e: RegistryError) -> Self {
        Self::Registry(e)
    }
}

/// What to do after a session was marked ready.
#[derive(Debug)]
pub(crate) enum ReadyOutcome {
    /// Send `call.in` for this call of this node (the registry does not build media URLs).
    Call(CallHandle),
    /// Send this `call.in`, built by the node of the call (its media URL and token).
    CallIn(telcoflow_proto::control::ServerFrame),
    /// The session was not claimed by this connection.
    NotOpen,
    /// Nothing to deliver (already ready, or no call).
    Nothing,
}

/// Which sessions `GET /public/v1/sessions` asks for.
#[derive(Debug, Clone)]
pub(crate) struct SessionQuery<'a> {
    pub(crate) connector: &'a str,
    pub(crate) channel: Option<Channel>,
    pub(crate) remote_address: Option<&'a str>,
    pub(crate) state: Option<SessionState>,
    pub(crate) offset: usize,
    pub(crate) limit: usize,
}

/// A page of `GET /public/v1/sessions`.
#[derive(Debug)]
pub(crate) struct SessionPage {
    pub(crate) items: Vec<SessionInfo>,
    /// Offset of the next page, when there are more sessions.
    pub(crate) next_offset: Option<usize>,
}

/// What the console shows of a connector on this node (see `Registry::console_view`).
#[derive(Debug, Default)]
pub(crate) struct ConsoleView {
    pub(crate) controls: Vec<ControlView>,
    /// Session id -> the id of the control connection holding it.
    pub(crate) holders: std::collections::HashMap<String, String>,
}

/// A control connection, as the console shows it.
#[derive(Debug)]
pub(crate) struct ControlView {
    pub(crate) id: String,
    pub(crate) setup: telcoflow_proto::control::SetupData,
    pub(crate) inbound_calls: bool,
}
