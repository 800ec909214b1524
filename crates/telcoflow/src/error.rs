//! The SDK's errors: [`CallError`] for what a call does, [`ConfigError`] for configuration and
//! [`Error`] for the client, which holds either of the other two.
//!
//! Every error can be matched on: [`CallError::kind`] gives a [`CallErrorKind`], the server's
//! code comes typed ([`CallError::code`], an [`ErrorCode`]) or as sent ([`ServerCode`]), and
//! predicates such as [`CallError::is_timeout`] cover the common questions. `?` turns a
//! [`CallError`] or a [`ConfigError`] into an [`Error`]. No error ever carries an API key, a
//! token or key material.

use serde::Deserialize;
use serde::de::IntoDeserializer;
use std::fmt;
use std::hash::{Hash, Hasher};
use telcoflow_proto::ErrorCode;
use telcoflow_proto::media::CommandResponse;

/// Boxed cause of an error.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error code as the server sent it: one this SDK knows ([`ServerCode::known`]) or any
/// other, kept as it came (a newer server, or codes such as `TTS_SESSION_ERROR` in call
/// events).
///
/// ```
/// use telcoflow::{ErrorCode, ServerCode};
///
/// assert_eq!(ServerCode::new("CALL_UNANSWERED"), ErrorCode::CallUnanswered);
/// assert_eq!(ServerCode::new("TTS_SESSION_ERROR").known(), None);
/// assert_eq!(ServerCode::new("TTS_SESSION_ERROR").as_str(), "TTS_SESSION_ERROR");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ServerCode(CodeRepr);

#[derive(Clone, PartialEq, Eq)]
enum CodeRepr {
    Known(ErrorCode),
    /// Never the text of a known code: [`ServerCode::new`] parses first.
    Unknown(Box<str>),
}

impl ServerCode {
    /// The code `code` as found on the wire.
    pub fn new(code: &str) -> Self {
        let parsed: Result<ErrorCode, serde::de::value::Error> =
            ErrorCode::deserialize(code.into_deserializer());
        match parsed {
            Ok(known) => Self(CodeRepr::Known(known)),
            Err(_) => Self(CodeRepr::Unknown(code.into())),
        }
    }

    /// The code, if it is one this SDK knows.
    pub fn known(&self) -> Option<ErrorCode> {
        match &self.0 {
            CodeRepr::Known(c) => Some(*c),
            CodeRepr::Unknown(_) => None,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            CodeRepr::Known(c) => c.as_str(),
            CodeRepr::Unknown(s) => s,
        }
    }
}

impl From<ErrorCode> for ServerCode {
    fn from(code: ErrorCode) -> Self {
        Self(CodeRepr::Known(code))
    }
}

impl PartialEq<ErrorCode> for ServerCode {
    fn eq(&self, other: &ErrorCode) -> bool {
        self.known() == Some(*other)
    }
}

impl Hash for ServerCode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Display for ServerCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ServerCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerCode({:?})", self.as_str())
    }
}

/// What kind of failure a [`CallError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallErrorKind {
    /// The server refused the command; [`CallError::code`] says why, e.g.
    /// [`ErrorCode::CallUnanswered`] after `connect` or [`ErrorCode::NotConnected`].
    Rejected,
    /// No answer in time: the client's deadline passed (no code), or the server gave up at
    /// the command's deadline (code [`ErrorCode::Timeout`]).
    Timeout,
    /// The call has ended, or its media connection is closed.
    Closed,
    /// The outgoing audio buffer has no room for the whole write; nothing was written.
    BufferFull,
    /// The media connection could not be opened, or it was lost before the command was
    /// answered (the command's outcome is unknown).
    Connection,
    /// The server refused the call's media token.
    Authentication,
    /// The client has been shut down.
    Shutdown,
    /// An argument is out of range (e.g. `ring_time`).
    InvalidArgument,
    /// The operation is not valid in the call's current state (e.g. `to_json` on an open call).
    InvalidState,
    /// Hand-off JSON that does not describe a call.
    InvalidHandOff,
}

impl CallErrorKind {
    fn describe(self) -> &'static str {
        match self {
            Self::Rejected => "command refused",
            Self::Timeout => "no answer in time",
            Self::Closed => "the call is closed",
            Self::BufferFull => "outgoing audio buffer full",
            Self::Connection => "media connection failed",
            Self::Authentication => "media connection refused",
            Self::Shutdown => "the client is shut down",
            Self::InvalidArgument => "invalid argument",
            Self::InvalidState => "invalid call state",
            Self::InvalidHandOff => "invalid call JSON",
        }
    }
}

impl fmt::Display for CallErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why an operation on an [`ActiveCall`](crate::ActiveCall) failed.
///
/// ```no_run
/// use std::time::Duration;
/// use telcoflow::{ActiveCall, CallError, ErrorCode};
///
/// async fn bridge(call: &ActiveCall) -> Result<bool, CallError> {
///     match call.connect(Duration::from_secs(30)).await {
///         Ok(_) => Ok(true),
///         Err(e) if e.code() == Some(ErrorCode::CallUnanswered) => Ok(false),
///         Err(e) => Err(e),
///     }
/// }
/// ```
///
/// Cheap to move (two words and a pointer); errors without details (a closed call, a full
/// buffer) are built without allocating, so a rejected audio write costs nothing.
pub struct CallError {
    kind: CallErrorKind,
    detail: Detail,
}

enum Detail {
    None,
    /// A write that did not fit the outgoing buffer.
    Sizes {
        requested: usize,
        free: usize,
    },
    Full(Box<Full>),
}

struct Full {
    code: Option<ServerCode>,
    message: Option<String>,
    source: Option<BoxError>,
}

impl CallError {
    pub(crate) fn new(kind: CallErrorKind) -> Self {
        Self {
            kind,
            detail: Detail::None,
        }
    }

    pub(crate) fn with_message(kind: CallErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            detail: Detail::Full(Box::new(Full {
                code: None,
                message: Some(message.into()),
                source: None,
            })),
        }
    }

    pub(crate) fn buffer_full(requested: usize, free: usize) -> Self {
        Self {
            kind: CallErrorKind::BufferFull,
            detail: Detail::Sizes { requested, free },
        }
    }

    /// The failure of a command the server answered with `success: false`.
    pub(crate) fn from_response(resp: CommandResponse) -> Self {
        let code = resp.error_code.as_deref().map(ServerCode::new);
        let kind = if code.as_ref().is_some_and(|c| *c == ErrorCode::Timeout) {
            CallErrorKind::Timeout
        } else {
            CallErrorKind::Rejected
        };
        Self {
            kind,
            detail: Detail::Full(Box::new(Full {
                code,
                message: resp.error_message,
                source: None,
            })),
        }
    }

    /// A failure of the client (opening the media connection, shutdown) seen by a call.
    pub(crate) fn from_client(e: crate::Error) -> Self {
        use crate::Error as E;
        match e {
            E::Call(e) => e,
            E::Shutdown => Self::new(CallErrorKind::Shutdown),
            E::Authentication { message } => {
                Self::with_message(CallErrorKind::Authentication, message)
            }
            E::Connection { message, source } => Self {
                kind: CallErrorKind::Connection,
                detail: Detail::Full(Box::new(Full {
                    code: None,
                    message: Some(message),
                    source,
                })),
            },
            other => Self::with_message(CallErrorKind::Connection, other.to_string()),
        }
    }

    fn full(&self) -> Option<&Full> {
        match &self.detail {
            Detail::Full(f) => Some(f),
            Detail::None | Detail::Sizes { .. } => None,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> CallErrorKind {
        self.kind
    }

    /// The server's error code, if it sent one this SDK knows (see
    /// [`CallError::server_code`] for any code).
    pub fn code(&self) -> Option<ErrorCode> {
        self.server_code().and_then(ServerCode::known)
    }

    /// The server's error code as sent, known or not.
    pub fn server_code(&self) -> Option<&ServerCode> {
        self.full().and_then(|f| f.code.as_ref())
    }

    /// The server's message, or what went wrong on this side.
    pub fn message(&self) -> Option<&str> {
        self.full().and_then(|f| f.message.as_deref())
    }

    /// The server refused the command ([`CallErrorKind::Rejected`]).
    pub fn is_rejected(&self) -> bool {
        self.kind == CallErrorKind::Rejected
    }

    /// No answer in time, on either side ([`CallErrorKind::Timeout`]).
    pub fn is_timeout(&self) -> bool {
        self.kind == CallErrorKind::Timeout
    }

    /// The call is over: ended, its media connection closed, or the client shut down.
    pub fn is_closed(&self) -> bool {
        matches!(self.kind, CallErrorKind::Closed | CallErrorKind::Shutdown)
    }

    /// The audio write did not fit ([`CallErrorKind::BufferFull`]); nothing was written.
    pub fn is_buffer_full(&self) -> bool {
        self.kind == CallErrorKind::BufferFull
    }

    /// The media connection failed or could not be opened ([`CallErrorKind::Connection`]).
    pub fn is_connection(&self) -> bool {
        self.kind == CallErrorKind::Connection
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.describe())?;
        match &self.detail {
            Detail::None => Ok(()),
            Detail::Sizes { requested, free } => {
                write!(f, ": {requested} bytes do not fit in {free} free bytes")
            }
            Detail::Full(full) => {
                if let Some(code) = &full.code {
                    write!(f, ": {code}")?;
                }
                match &full.message {
                    Some(m) if !m.is_empty() => write!(f, ": {m}"),
                    _ => Ok(()),
                }
            }
        }
    }
}

impl fmt::Debug for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CallError");
        d.field("kind", &self.kind);
        match &self.detail {
            Detail::None => {}
            Detail::Sizes { requested, free } => {
                d.field("requested", requested).field("free", free);
            }
            Detail::Full(full) => {
                if let Some(code) = &full.code {
                    d.field("code", code);
                }
                if let Some(message) = &full.message {
                    d.field("message", message);
                }
                if let Some(source) = &full.source {
                    d.field("source", source);
                }
            }
        }
        d.finish()
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.full()
            .and_then(|f| f.source.as_deref())
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// A configuration that cannot be used: a builder value, or an environment variable read by
/// [`TelcoflowClientConfig::from_env`](crate::TelcoflowClientConfig::from_env). Messages name
/// the field or variable, never a secret's value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A builder value is invalid.
    #[error("invalid config `{field}`: {reason}")]
    Invalid {
        /// The builder field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A required environment variable is not set (or empty).
    #[error("environment variable {name} is not set")]
    MissingEnv {
        /// The variable.
        name: &'static str,
    },
    /// An environment variable has a value that cannot be used.
    #[error("environment variable {name}: {reason}")]
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// Why it cannot be used.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: &'static str, reason: impl fmt::Display) -> Self {
        Self::Invalid {
            field,
            reason: reason.to_string(),
        }
    }
}

/// What can go wrong in the client, and the one error type to bubble any SDK failure up to.
///
/// Variants are meant to be matched on; a failed call operation is [`Error::Call`], a bad
/// configuration [`Error::Config`].
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
        source: Option<BoxError>,
    },
    /// The server refused the credentials; `message` is the server's response body.
    #[error("authentication failed: {message}")]
    Authentication {
        /// The server's explanation.
        message: String,
    },
    /// An operation on a call failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Another control connection already claimed the session. A normal outcome with several
    /// workers on one connector.
    #[error("session already claimed by control connection {bound_sm_ws_id}")]
    SessionBusy {
        /// The server id of the connection that owns the session.
        bound_sm_ws_id: String,
    },
    /// [`TelcoflowClient::create_session`](crate::TelcoflowClient::create_session): this
    /// connector already has an open session with that party (the server answered
    /// `created: false`); claim it with `open_session` if it is yours to take.
    #[error("an open session with that party already exists: {session_id}")]
    SessionExists {
        /// The open session.
        session_id: String,
    },
    /// A control request failed with a server error code other than `SESSION_BUSY`.
    #[error("request failed: {code}: {message}")]
    RequestFailed {
        /// The server's error code.
        code: ServerCode,
        /// The server's explanation.
        message: String,
    },
    /// The server did not answer a control request in time (`request_timeout`).
    #[error("no answer from the server in time")]
    RequestTimeout,
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

    /// True for errors that a retry on a new connection may cure: the control connection, or
    /// a call's media connection.
    pub fn is_connection(&self) -> bool {
        match self {
            Self::Connection { .. } => true,
            Self::Call(e) => e.is_connection(),
            _ => false,
        }
    }

    /// True when the server did not answer in time.
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::RequestTimeout => true,
            Self::Call(e) => e.is_timeout(),
            _ => false,
        }
    }

    /// True when the client is shut down or the call is over.
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Shutdown => true,
            Self::Call(e) => e.is_closed(),
            _ => false,
        }
    }

    /// True when another control connection claimed the session first.
    pub fn is_session_busy(&self) -> bool {
        matches!(self, Self::SessionBusy { .. })
    }

    /// True when the server refused the credentials or a call's media token.
    pub fn is_authentication(&self) -> bool {
        match self {
            Self::Authentication { .. } => true,
            Self::Call(e) => e.kind() == CallErrorKind::Authentication,
            _ => false,
        }
    }

    /// The server's error code, if it sent one this SDK knows.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::SessionBusy { .. } => Some(ErrorCode::SessionBusy),
            Self::RequestFailed { code, .. } => code.known(),
            Self::Call(e) => e.code(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_keep_unknown_ones() {
        let known = ServerCode::new("CALL_UNANSWERED");
        assert_eq!(known.known(), Some(ErrorCode::CallUnanswered));
        assert_eq!(known, ServerCode::from(ErrorCode::CallUnanswered));
        let unknown = ServerCode::new("TTS_SESSION_ERROR");
        assert_eq!(unknown.known(), None);
        assert_eq!(unknown.to_string(), "TTS_SESSION_ERROR");
    }

    #[test]
    fn responses_map_to_kinds() {
        let e =
            CallError::from_response(CommandResponse::error("c", ErrorCode::Timeout, "deadline"));
        assert!(e.is_timeout() && !e.is_rejected());
        assert_eq!(e.code(), Some(ErrorCode::Timeout));
        let e = CallError::from_response(CommandResponse {
            command_id: "c".into(),
            success: false,
            result: None,
            error_code: Some("SOMETHING_NEW".into()),
            error_message: Some("why".into()),
        });
        assert!(e.is_rejected());
        assert_eq!(e.code(), None);
        assert_eq!(
            e.server_code().map(ServerCode::as_str),
            Some("SOMETHING_NEW")
        );
        assert_eq!(e.to_string(), "command refused: SOMETHING_NEW: why");
        let e: Error = e.into();
        assert!(!e.is_timeout());
        assert_eq!(e.to_string(), "command refused: SOMETHING_NEW: why");
    }

    #[test]
    fn plain_errors_stay_small() {
        assert!(std::mem::size_of::<CallError>() <= 4 * std::mem::size_of::<usize>());
        let e = CallError::buffer_full(960, 10);
        assert_eq!(
            e.to_string(),
            "outgoing audio buffer full: 960 bytes do not fit in 10 free bytes"
        );
    }
}
