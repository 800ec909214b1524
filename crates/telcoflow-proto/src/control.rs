//! Control connection frames (`/v1/agent/session-manager`).
//!
//! All frames are JSON text objects tagged by `"type"`. Field names are camelCase on the wire,
//! as the reference client sends and expects them.
//!
//! The exchange: the client sends [`ClientFrame::Setup`] and waits for
//! [`ServerFrame::SetupDone`]. The server then announces each new session with
//! [`ServerFrame::SessionNotify`] to every control connection of the connector; one of them claims
//! it with [`ClientFrame::SessionOpen`] (a request answered by [`ServerFrame::Response`]) and
//! signals with [`ClientFrame::SessionReady`] that it may receive [`ServerFrame::CallIn`], which
//! carries the media connection URL and token.

use crate::{AudioMode, DecodeError, ErrorCode, SampleRate};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Path of the control WebSocket endpoint.
pub const CONTROL_PATH: &str = "/v1/agent/session-manager";

/// Header carrying the API key.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Header carrying the connector UUID.
pub const CONNECTOR_HEADER: &str = "x-connector-uuid";
/// Header carrying the client library version.
pub const SDK_VERSION_HEADER: &str = "x-sdk-version";

/// The kind of conversation a session carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Channel {
    /// A phone call.
    #[serde(rename = "TELCO")]
    Telco,
    /// A messaging conversation.
    #[serde(rename = "WA")]
    Wa,
}

/// Why a `session.notify` was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Activity {
    /// A new call arrived.
    NewIncomingCall,
    /// A new message arrived.
    NewIncomingMessage,
    /// A session whose claimant went away before it was ready is offered again.
    Resume,
}

/// Why a session closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CloseReason {
    /// The application asked for it (`call.close`, `call.disconnect`, HTTP close).
    SdkRequest,
    /// The server or an operator closed it.
    ForceClose,
    /// The call ended (hang-up, ring-out, failure).
    CallTerminated,
}

/// Who opened a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Initiator {
    /// The application, with `session.create`.
    Sdk,
    /// The phone network (an incoming call).
    Connector,
}

/// Whether a session is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SessionState {
    /// Running.
    Open,
    /// Ended.
    Closed,
}

/// Audio settings chosen by the control connection in `setup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetupData {
    /// Rate of the PCM on every media connection of this control connection.
    #[serde(default)]
    pub sample_rate: SampleRate,
    /// Whether isolated leg channels are delivered as well as the mix.
    #[serde(default)]
    pub audio_mode: AudioMode,
}

/// A session as the server describes it in responses and in the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// Channel.
    pub channel: Channel,
    /// Who created it.
    pub initiator: Initiator,
    /// Open or closed.
    pub state: SessionState,
    /// The far party (the caller's number for incoming calls).
    pub remote_address: String,
    /// Our party (the called number for incoming calls).
    pub local_address: String,
    /// Unix seconds when the session opened.
    pub opened_at: u64,
    /// Unix seconds when it closed, if it has.
    #[serde(default)]
    pub closed_at: Option<u64>,
}

/// Frames an application sends on the control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ClientFrame {
    /// Chooses the audio format; answered by `setup.done`.
    #[serde(rename = "setup")]
    Setup {
        /// The audio settings.
        #[serde(default)]
        data: SetupData,
    },
    /// Claims a notified session.
    #[serde(rename = "session.open", rename_all = "camelCase")]
    SessionOpen {
        /// The session to claim.
        session_id: String,
        /// Request id echoed in the response.
        #[serde(default)]
        req_id: Option<String>,
    },
    /// The claimant is ready for `call.in` and messages of the session.
    #[serde(rename = "session.ready", rename_all = "camelCase")]
    SessionReady {
        /// The claimed session.
        session_id: String,
    },
    /// Creates a session from the application side (an outbound call).
    #[serde(rename = "session.create", rename_all = "camelCase")]
    SessionCreate {
        /// The channel.
        channel: Channel,
        /// The far party (number to call).
        remote_address: String,
        /// Request id echoed in the response.
        #[serde(default)]
        req_id: Option<String>,
    },
    /// Chooses which calls and messages reach this connector.
    #[serde(rename = "call_flow.setup", rename_all = "camelCase")]
    CallFlowSetup {
        /// The flow (`inboundCall`, `outboundCall`, ...).
        #[serde(default)]
        data: Value,
        /// Request id echoed in the response.
        #[serde(default)]
        req_id: Option<String>,
    },
    /// Sends a message on a messaging session.
    #[serde(rename = "wa.msg.out", rename_all = "camelCase")]
    WaMsgOut {
        /// The message.
        #[serde(default)]
        data: Value,
        /// Request id echoed in the response.
        #[serde(default)]
        req_id: Option<String>,
    },
}

impl ClientFrame {
    /// Decodes a text frame.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        encode(self)
    }

    /// The request id, for frames that expect a `response`.
    pub fn req_id(&self) -> Option<&str> {
        match self {
            Self::SessionOpen { req_id, .. }
            | Self::SessionCreate { req_id, .. }
            | Self::CallFlowSetup { req_id, .. }
            | Self::WaMsgOut { req_id, .. } => req_id.as_deref(),
            Self::Setup { .. } | Self::SessionReady { .. } => None,
        }
    }
}

/// Best-effort look at a frame that failed to decode: its `type` and `reqId`, so that the
/// server can still answer a malformed request with `INVALID_REQUEST`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FrameHeader {
    /// The frame's `type`, if it had a string one.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The frame's `reqId`, if it had a string one.
    #[serde(default)]
    pub req_id: Option<String>,
}

impl FrameHeader {
    /// Reads `type` and `reqId` from any JSON object; `None` if the text is not one.
    pub fn peek(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

/// Frames the server sends on the control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerFrame {
    /// Setup accepted.
    #[serde(rename = "setup.done", rename_all = "camelCase")]
    SetupDone {
        /// The server's id for this control connection.
        sm_ws_id: String,
    },
    /// The answer to a request carrying `reqId`.
    #[serde(rename = "response", rename_all = "camelCase")]
    Response(Response),
    /// A session is waiting to be claimed.
    #[serde(rename = "session.notify", rename_all = "camelCase")]
    SessionNotify {
        /// Session id.
        session_id: String,
        /// Channel.
        channel: Channel,
        /// The far party.
        remote_address: String,
        /// Our party.
        local_address: String,
        /// Why it is offered.
        activity: Activity,
        /// Unix seconds when this notification was sent.
        created_at: u64,
    },
    /// A claimed, ready session has a call: open its media connection.
    #[serde(rename = "call.in", rename_all = "camelCase")]
    CallIn(CallIn),
    /// A session ended.
    #[serde(rename = "session.closed", rename_all = "camelCase")]
    SessionClosed {
        /// Session id.
        session_id: String,
        /// Why.
        reason: CloseReason,
    },
    /// A message arrived on a messaging session.
    #[serde(rename = "wa.msg.in", rename_all = "camelCase")]
    WaMsgIn {
        /// Session id.
        session_id: String,
        /// Sender address.
        sender: String,
        /// Message body.
        content: Value,
    },
}

impl ServerFrame {
    /// Decodes a text frame.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        encode(self)
    }
}

/// `response` frame body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// The request's id.
    #[serde(default)]
    pub req_id: Option<String>,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// The error code, on failure (a string so that unknown codes still decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Details of the failure (for `SESSION_BUSY`: `{boundSmWsId}`), or a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_content: Option<Value>,
}

impl Response {
    /// A successful response.
    pub fn ok(req_id: Option<String>, content: Value) -> Self {
        Self {
            req_id,
            ok: true,
            content: Some(content),
            error_code: None,
            error_content: None,
        }
    }

    /// A failed response.
    pub fn error(req_id: Option<String>, code: ErrorCode, content: Value) -> Self {
        Self {
            req_id,
            ok: false,
            content: None,
            error_code: Some(code.as_str().to_owned()),
            error_content: Some(content),
        }
    }
}

/// `call.in` frame body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallIn {
    /// Session id.
    pub session_id: String,
    /// Call id.
    pub call_id: String,
    /// The organisation (connector) the call belongs to.
    #[serde(default)]
    pub org_uuid: String,
    /// Caller number.
    pub from: String,
    /// Called number.
    pub to: String,
    /// Media connection URL.
    pub url: String,
    /// Bearer token for the media connection.
    pub token: String,
}

fn encode<T: Serialize>(frame: &T) -> String {
    // Serialising these types cannot fail: every field is a string, number, bool or an
    // already-valid `Value`, and no map has non-string keys.
    serde_json::to_string(frame).unwrap_or_else(|_| String::from("{}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_reference_client_frames() {
        let setup = ClientFrame::decode(
            r#"{"type":"setup","data":{"sampleRate":24000,"audioMode":"isolated"}}"#,
        )
        .unwrap();
        assert_eq!(
            setup,
            ClientFrame::Setup {
                data: SetupData {
                    sample_rate: SampleRate::Hz24000,
                    audio_mode: AudioMode::Isolated
                }
            }
        );
        let open = ClientFrame::decode(r#"{"type":"session.open","sessionId":"s1","reqId":"r1"}"#)
            .unwrap();
        assert_eq!(open.req_id(), Some("r1"));
        let create = ClientFrame::decode(
            r#"{"type":"session.create","channel":"TELCO","remoteAddress":"+1","reqId":"r2"}"#,
        )
        .unwrap();
        assert!(matches!(
            create,
            ClientFrame::SessionCreate {
                channel: Channel::Telco,
                ..
            }
        ));
    }

    #[test]
    fn unknown_type_is_an_error_and_header_still_readable() {
        let text = r#"{"type":"nope","reqId":"r9"}"#;
        assert!(ClientFrame::decode(text).is_err());
        let header = FrameHeader::peek(text).unwrap();
        assert_eq!(header.kind.as_deref(), Some("nope"));
        assert_eq!(header.req_id.as_deref(), Some("r9"));
        assert!(FrameHeader::peek("not json").is_none());
    }

    #[test]
    fn server_frames_use_wire_names() {
        let busy = ServerFrame::Response(Response::error(
            Some("r1".into()),
            ErrorCode::SessionBusy,
            json!({"boundSmWsId": "c1"}),
        ));
        let v: Value = serde_json::from_str(&busy.encode()).unwrap();
        assert_eq!(
            v,
            json!({"type":"response","reqId":"r1","ok":false,"errorCode":"SESSION_BUSY","errorContent":{"boundSmWsId":"c1"}})
        );
        let notify = ServerFrame::SessionNotify {
            session_id: "s".into(),
            channel: Channel::Telco,
            remote_address: "+1".into(),
            local_address: "+2".into(),
            activity: Activity::Resume,
            created_at: 5,
        };
        let v: Value = serde_json::from_str(&notify.encode()).unwrap();
        assert_eq!(v["type"], "session.notify");
        assert_eq!(v["activity"], "RESUME");
        assert_eq!(v["remoteAddress"], "+1");
        assert_eq!(ServerFrame::decode(&notify.encode()).unwrap(), notify);
    }
}
