//! Handing a NEW call to another process: [`ActiveCall::to_json`] and
//! [`ActiveCall::from_json`], in the reference client's JSON.

use super::{ActiveCall, CallLinks, CallParams, CallState};
use crate::config::TelcoflowClientConfig;
use crate::error::{CallError, CallErrorKind};
use serde::{Deserialize, Serialize};

/// The JSON a NEW call is handed over in; the keys are the reference client's.
#[derive(Serialize, Deserialize)]
struct HandOff {
    #[serde(default = "telco")]
    channel: String,
    id: String,
    caller: String,
    callee: String,
    session_url: String,
    session_token: String,
}

fn telco() -> String {
    "TELCO".into()
}

impl ActiveCall {
    /// Rebuilds a NEW call from [`ActiveCall::to_json`] output, using this process's audio
    /// settings. The media connection is not opened until the first command or send.
    ///
    /// Fails with [`CallErrorKind::InvalidHandOff`] when the JSON does not describe a call.
    pub fn from_json(json: &str, config: &TelcoflowClientConfig) -> Result<Self, CallError> {
        let h: HandOff = serde_json::from_str(json)
            .map_err(|e| CallError::with_message(CallErrorKind::InvalidHandOff, e.to_string()))?;
        if h.channel != "TELCO" {
            return Err(CallError::with_message(
                CallErrorKind::InvalidHandOff,
                format!("channel {} is not a call", h.channel),
            ));
        }
        Ok(Self::new(
            CallParams {
                id: h.id,
                session_id: None,
                caller: h.caller,
                callee: h.callee,
                url: h.session_url,
                token: h.session_token,
            },
            config.into(),
            CallLinks::default(),
        ))
    }

    /// Serialises a NEW call (keys `channel`, `id`, `caller`, `callee`, `session_url`,
    /// `session_token`) so that another process can take it over with
    /// [`ActiveCall::from_json`]. The JSON holds the media token: treat it as a secret.
    ///
    /// Fails with [`CallErrorKind::InvalidState`] once the media connection is opening or
    /// open.
    pub fn to_json(&self) -> Result<String, CallError> {
        let state = self.state();
        if state != CallState::New {
            return Err(CallError::with_message(
                CallErrorKind::InvalidState,
                format!("to_json needs a NEW call, this one is {state:?}"),
            ));
        }
        let h = HandOff {
            channel: telco(),
            id: self.core.id.clone(),
            caller: self.core.caller.clone(),
            callee: self.core.callee.clone(),
            session_url: self.core.url.clone(),
            session_token: self.core.token.clone(),
        };
        // Strings only: serialising cannot fail.
        serde_json::to_string(&h)
            .map_err(|e| CallError::with_message(CallErrorKind::InvalidHandOff, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn config() -> TelcoflowClientConfig {
        TelcoflowClientConfig::local("k", "u").unwrap()
    }

    #[test]
    fn json_hand_off_keeps_reference_keys() {
        let call = ActiveCall::new(
            CallParams {
                id: "c1".into(),
                session_id: Some("s1".into()),
                caller: "+1".into(),
                callee: "+2".into(),
                url: "ws://h/v1/agent/media/c1".into(),
                token: "tok".into(),
            },
            (&config()).into(),
            CallLinks::default(),
        );
        let json = call.to_json().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel":"TELCO","id":"c1","caller":"+1","callee":"+2",
                "session_url":"ws://h/v1/agent/media/c1","session_token":"tok"})
        );
        let back = ActiveCall::from_json(&json, &config()).unwrap();
        assert_eq!(
            (back.id(), back.caller(), back.callee()),
            ("c1", "+1", "+2")
        );
        assert_eq!(back.state(), CallState::New);
        assert!(!format!("{back:?}").contains("tok"));
        let e = ActiveCall::from_json("{}", &config()).unwrap_err();
        assert_eq!(e.kind(), CallErrorKind::InvalidHandOff);
        let wa = json.replace("TELCO", "WA");
        let e = ActiveCall::from_json(&wa, &config()).unwrap_err();
        assert_eq!(e.kind(), CallErrorKind::InvalidHandOff);
    }
}
