//! The one error type of the SDK.

use std::fmt;

/// Everything that can go wrong in the SDK.
///
/// Variants are meant to be matched on. Operational command failures (the server said no) are
/// not errors: they come back as a [`CommandResult`](crate::CommandResult) with `success: false`.
/// No variant ever carries an API key, a token or key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The WebSocket could not be opened, or it broke.
    #[error("connection failed: {message}")]
    Connection {
        /// What happened.
        message: String,
        /// The underlying cause, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The server refused the credentials; `message` is the server's response body.
    #[error("authentication failed: {message}")]
    Authentication {
        /// The server's explanation.
        message: String,
    },
    /// The call has ended, or its media connection has closed.
    #[error("the call is closed")]
    CallClosed,
    /// A command failed; see [`CommandResult::into_result`](crate::CommandResult::into_result).
    #[error("command failed: {code}: {message}")]
    CommandFailed {
        /// The server's error code.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server did not answer a request or command in time (its own deadline plus 5 s for
    /// commands, 30 s for control requests).
    #[error("no answer from the server in time")]
    CommandTimeout,
    /// The outgoing audio buffer has no room for the whole write; nothing was written.
    #[error("outgoing audio buffer full: {requested} bytes do not fit in {free} free bytes")]
    BufferFull {
        /// Bytes the write needed.
        requested: usize,
        /// Bytes that were free.
        free: usize,
    },
    /// The outgoing audio buffer is closed: the call has ended.
    #[error("outgoing audio buffer closed")]
    BufferClosed,
    /// Another control connection already claimed the session. A normal outcome with several
    /// workers on one connector.
    #[error("session already claimed by control connection {bound_sm_ws_id}")]
    SessionBusy {
        /// The server id of the connection that owns the session.
        bound_sm_ws_id: String,
    },
    /// A control request failed with a server error code other than `SESSION_BUSY`.
    #[error("request failed: {code}: {message}")]
    RequestFailed {
        /// The server's error code.
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// A configuration value is invalid.
    #[error("invalid config `{field}`: {reason}")]
    InvalidConfig {
        /// The builder field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The operation is not valid in the call's current state.
    #[error("invalid call state: {0}")]
    InvalidState(String),
    /// The server sent something this SDK cannot understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Too many requests are waiting for an answer on the control connection.
    #[error("too many requests in flight")]
    TooManyRequests,
    /// The client has been shut down.
    #[error("the client is shut down")]
    Shutdown,
}

impl Error {
    pub(crate) fn connection(message: impl Into<String>) -> Self {
        Self::Connection {
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn connection_with(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Connection {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl fmt::Display) -> Self {
        Self::InvalidConfig {
            field,
            reason: reason.to_string(),
        }
    }

    /// True for errors that a retry on a new connection may cure.
    pub fn is_connection(&self) -> bool {
        matches!(self, Self::Connection { .. })
    }
}
