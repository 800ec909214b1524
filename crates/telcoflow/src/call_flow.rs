//! [`CallFlow`]: which calls and messages the server offers to a control connection
//! (`call_flow.setup`), set with
//! [`TelcoflowClient::setup_call_flow`](crate::TelcoflowClient::setup_call_flow).

use serde::Serialize;

/// Which inbound calls reach the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum InboundCalls {
    /// Every inbound call (what a connection gets before any `call_flow.setup`).
    All,
    /// Calls nobody else took; this server offers them like [`InboundCalls::All`].
    MissedOnly,
    /// None: an outbound-only connection (a dialer).
    #[default]
    No,
}

/// The call flow of a control connection, in the shape of the `call_flow.setup` frame's
/// `data`. Starts with everything off, as the Python SDK's `CallFlowBuilder`.
///
/// ```
/// use telcoflow::{CallFlow, InboundCalls};
/// let dialer = CallFlow::new().inbound_call(InboundCalls::No).outbound_call(true);
/// assert_eq!(dialer.inbound_call, InboundCalls::No);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct CallFlow {
    /// Which inbound calls reach the connection (`inboundCall`).
    pub inbound_call: InboundCalls,
    /// Outbound calls wanted (`outboundCall`); this server places them whatever it says.
    pub outbound_call: bool,
    /// Inbound messages wanted (`inboundMessage`; messaging is not served by this SDK).
    pub inbound_message: bool,
    /// Outbound messages wanted (`outboundMessage`).
    pub outbound_message: bool,
}

impl CallFlow {
    /// Everything off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets which inbound calls reach the connection.
    pub fn inbound_call(mut self, mode: InboundCalls) -> Self {
        self.inbound_call = mode;
        self
    }

    /// Sets whether outbound calls are wanted.
    pub fn outbound_call(mut self, enabled: bool) -> Self {
        self.outbound_call = enabled;
        self
    }

    /// Sets whether inbound messages are wanted.
    pub fn inbound_message(mut self, enabled: bool) -> Self {
        self.inbound_message = enabled;
        self
    }

    /// Sets whether outbound messages are wanted.
    pub fn outbound_message(mut self, enabled: bool) -> Self {
        self.outbound_message = enabled;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_the_frame_data() {
        let flow = CallFlow::new()
            .inbound_call(InboundCalls::MissedOnly)
            .outbound_call(true);
        assert_eq!(
            serde_json::to_value(flow).unwrap(),
            serde_json::json!({
                "inboundCall": "MISSED_ONLY",
                "outboundCall": true,
                "inboundMessage": false,
                "outboundMessage": false
            })
        );
    }
}
