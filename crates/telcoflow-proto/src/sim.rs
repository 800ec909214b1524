//! The simulated phone network: phones that dial in or wait at a number, over a WebSocket.
//!
//! A phone connects to [`SIM_PATH`] and sends one [`PhoneFrame::Dial`] (to call a number) or
//! [`PhoneFrame::Register`] (to be reachable at a number, e.g. as a `call.connect` destination).
//! Afterwards binary frames in both directions are raw PCM s16le mono at the phone's sample
//! rate, with no channel byte: the phone sends its microphone in real time and receives what it
//! hears, a 20 ms frame every 20 ms while a call is up. Text frames carry [`PhoneFrame`] and
//! [`NetworkFrame`] events.

use crate::{DecodeError, SampleRate};
use serde::{Deserialize, Serialize};

/// Path of the simulated phone endpoint.
pub const SIM_PATH: &str = "/v1/sim/phone";

/// Query string with which a phone asks to authenticate in its first frame
/// (`/v1/sim/phone?auth=frame`): browsers cannot set headers on a WebSocket, and credentials
/// in a URL end up in logs and browser history.
pub const AUTH_IN_FRAME_QUERY: &str = "auth=frame";

/// Connector credentials sent as the first text frame of a WebSocket, by a phone that
/// connected with [`AUTH_IN_FRAME_QUERY`] (and by the console's live view):
/// `{"type": "auth", "connectorUuid": "...", "apiKey": "..."}`. Its `Debug` hides the key.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename = "auth", rename_all = "camelCase")]
pub struct AuthFrame {
    /// The connector's UUID.
    pub connector_uuid: String,
    /// The connector's API key.
    pub api_key: String,
}

/// [`AuthFrame`] as it is read: serde checks the tag of an enum, not of a struct.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TaggedAuth {
    #[serde(rename_all = "camelCase")]
    Auth {
        connector_uuid: String,
        api_key: String,
    },
}

impl AuthFrame {
    /// Decodes a text frame; its `type` must be `auth`.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        let TaggedAuth::Auth {
            connector_uuid,
            api_key,
        } = serde_json::from_str(text)?;
        Ok(Self {
            connector_uuid,
            api_key,
        })
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

impl std::fmt::Debug for AuthFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFrame")
            .field("connector_uuid", &self.connector_uuid)
            .field("api_key", &"<hidden>")
            .finish()
    }
}

/// Frames a simulated phone sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PhoneFrame {
    /// Place a call (first frame only).
    #[serde(rename_all = "camelCase")]
    Dial {
        /// Caller number.
        from: String,
        /// Called number.
        to: String,
        /// Rate of the PCM this phone sends and receives.
        #[serde(default)]
        sample_rate: SampleRate,
    },
    /// Wait at a number for calls (first frame only).
    #[serde(rename_all = "camelCase")]
    Register {
        /// The number.
        number: String,
        /// Rate of the PCM this phone sends and receives.
        #[serde(default)]
        sample_rate: SampleRate,
    },
    /// Pick up the ringing call.
    Answer,
    /// Refuse the ringing call.
    Reject,
    /// Hang up.
    Hangup,
    /// Press a key (`0-9`, `*`, `#`, `A-D`).
    Dtmf {
        /// The key.
        digit: char,
        /// How long it was held, in ms.
        #[serde(default)]
        duration_ms: u32,
    },
}

/// Why a simulated call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HangupReason {
    /// This phone hung up.
    Local,
    /// The other party (caller, callee or the agent) hung up.
    Remote,
    /// Nobody answered within the ring time.
    NoAnswer,
    /// The dialled number is not routed anywhere.
    NotFound,
    /// A limit (e.g. concurrent calls per connector) refused the call.
    Busy,
    /// The called phone refused.
    Rejected,
    /// The server failed.
    Error,
    /// The server takes no new calls now (it is draining before it stops): call another
    /// node of the service.
    Unavailable,
}

impl HangupReason {
    /// The reason as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Remote => "remote",
            Self::NoAnswer => "no_answer",
            Self::NotFound => "not_found",
            Self::Busy => "busy",
            Self::Rejected => "rejected",
            Self::Error => "error",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Frames the network sends to a simulated phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NetworkFrame {
    /// A registered phone is now reachable.
    Registered {
        /// The number.
        number: String,
    },
    /// The dialled call exists and is being offered.
    #[serde(rename_all = "camelCase")]
    Trying {
        /// Call id.
        call_id: String,
    },
    /// The far end is ringing (an application claimed the call).
    #[serde(rename_all = "camelCase")]
    Ringing {
        /// Call id.
        call_id: String,
    },
    /// A call arrives at this registered phone.
    #[serde(rename_all = "camelCase")]
    Incoming {
        /// Call id.
        call_id: String,
        /// Caller number.
        from: String,
        /// Called number.
        to: String,
    },
    /// The call is up; audio flows.
    #[serde(rename_all = "camelCase")]
    Answered {
        /// Call id.
        call_id: String,
    },
    /// The call ended.
    #[serde(rename_all = "camelCase")]
    Hangup {
        /// Call id, if a call existed.
        #[serde(default)]
        call_id: Option<String>,
        /// Why.
        reason: HangupReason,
    },
    /// A frame from the phone was not understood.
    Error {
        /// What was wrong.
        message: String,
    },
}

impl PhoneFrame {
    /// Decodes a text frame.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

impl NetworkFrame {
    /// Decodes a text frame.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let dial = PhoneFrame::Dial {
            from: "+1".into(),
            to: "+2".into(),
            sample_rate: SampleRate::Hz8000,
        };
        let text = dial.encode();
        assert_eq!(
            text,
            r#"{"type":"dial","from":"+1","to":"+2","sampleRate":8000}"#
        );
        assert_eq!(PhoneFrame::decode(&text).unwrap(), dial);
        let hangup = NetworkFrame::Hangup {
            call_id: Some("c".into()),
            reason: HangupReason::NoAnswer,
        };
        assert_eq!(NetworkFrame::decode(&hangup.encode()).unwrap(), hangup);
        assert!(PhoneFrame::decode(r#"{"type":"fly"}"#).is_err());
    }

    #[test]
    fn auth_frame_is_tagged_and_hides_its_key() {
        let auth = AuthFrame {
            connector_uuid: "u".into(),
            api_key: "secret".into(),
        };
        let text = auth.encode();
        assert_eq!(
            text,
            r#"{"type":"auth","connectorUuid":"u","apiKey":"secret"}"#
        );
        assert_eq!(AuthFrame::decode(&text).unwrap(), auth);
        assert!(AuthFrame::decode(r#"{"type":"dial","connectorUuid":"u","apiKey":"k"}"#).is_err());
        assert!(!format!("{auth:?}").contains("secret"));
    }
}
