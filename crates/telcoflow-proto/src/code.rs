//! Error codes carried in control `response` frames, media `command_response` frames and HTTP
//! error bodies.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Every error code the server sends. Codes travel as SCREAMING_SNAKE_CASE strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Another control connection already claimed the session.
    SessionBusy,
    /// The session has ended.
    SessionClosed,
    /// No session with that id exists (for this connector).
    SessionNotFound,
    /// No running call with that id exists (for this connector).
    CallNotFound,
    /// The session has not been opened (claimed) by this connection.
    SessionNotOpen,
    /// A configured limit was reached.
    QuotaExceeded,
    /// The connector has no route for that channel.
    ChannelNotConfigured,
    /// Too many outbound requests are in flight.
    OutboundOverflow,
    /// Credentials are missing or wrong.
    Unauthorized,
    /// The credentials are valid but not for this resource.
    Forbidden,
    /// The frame or request is malformed.
    InvalidRequest,
    /// The server gave up on a command at the client's deadline.
    Timeout,
    /// `call.connect` rang the destination but nobody answered.
    CallUnanswered,
    /// The command name is not one the server knows.
    UnknownCommand,
    /// The command is not valid in the call's current state.
    InvalidState,
    /// `agent.whisper`/`agent.barge`/`agent.spy` before `call.connect`.
    NotConnected,
    /// The called number has no destination configured.
    NoRoute,
    /// The destination is busy or refused the call.
    CallRejected,
    /// The call has ended.
    CallTerminated,
    /// The agent sent more audio than it was asked for.
    BufferOverflow,
    /// The agent did not read its audio fast enough.
    SlowConsumer,
    /// Something went wrong inside the server.
    InternalError,
    /// Recording is not configured on this server (no `[recording]` section).
    RecordingNotConfigured,
    /// No recording with that id exists (for this connector, on this node).
    RecordingNotFound,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SessionBusy => "SESSION_BUSY",
            Self::SessionClosed => "SESSION_CLOSED",
            Self::SessionNotFound => "SESSION_NOT_FOUND",
            Self::CallNotFound => "CALL_NOT_FOUND",
            Self::SessionNotOpen => "SESSION_NOT_OPEN",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
            Self::ChannelNotConfigured => "CHANNEL_NOT_CONFIGURED",
            Self::OutboundOverflow => "OUTBOUND_OVERFLOW",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Forbidden => "FORBIDDEN",
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::Timeout => "TIMEOUT",
            Self::CallUnanswered => "CALL_UNANSWERED",
            Self::UnknownCommand => "UNKNOWN_COMMAND",
            Self::InvalidState => "INVALID_STATE",
            Self::NotConnected => "NOT_CONNECTED",
            Self::NoRoute => "NO_ROUTE",
            Self::CallRejected => "CALL_REJECTED",
            Self::CallTerminated => "CALL_TERMINATED",
            Self::BufferOverflow => "BUFFER_OVERFLOW",
            Self::SlowConsumer => "SLOW_CONSUMER",
            Self::InternalError => "INTERNAL_ERROR",
            Self::RecordingNotConfigured => "RECORDING_NOT_CONFIGURED",
            Self::RecordingNotFound => "RECORDING_NOT_FOUND",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_matches_as_str() {
        for code in [
            ErrorCode::SessionBusy,
            ErrorCode::CallUnanswered,
            ErrorCode::ChannelNotConfigured,
            ErrorCode::Timeout,
            ErrorCode::CallNotFound,
            ErrorCode::RecordingNotConfigured,
            ErrorCode::RecordingNotFound,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
