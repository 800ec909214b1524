//! [`ActiveCall::transfer`]: hand the caller over to another party (`call.transfer`, an
//! extension of this server), and its typed outcome.

use super::ActiveCall;
use crate::error::{CallError, CallErrorKind};
use serde_json::Value;
use std::time::Duration;
use telcoflow_proto::media::{self, CommandName, TransferData};

/// Ring time of [`ActiveCall::transfer`].
const DEFAULT_RING_TIME: Duration =
    Duration::from_secs(media::DEFAULT_TRANSFER_RING_SECONDS as u64);
/// Beyond the ring time, how long a transfer may take: the REFER's answer (up to 32 s) and
/// the server's margin for the final NOTIFY (10 s), with room to spare.
const TRANSFER_MARGIN: Duration = Duration::from_secs(45);

/// How a transfer was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransferMethod {
    /// The SIP caller was sent a REFER and called the target itself; the server's call ended.
    Refer,
    /// The server dialled the target and bridged it to the caller; the agent left.
    Bridge,
}

/// A transfer that succeeded (see [`ActiveCall::transfer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferOutcome {
    /// How.
    pub method: TransferMethod,
    /// The target, as the server took it.
    pub target: String,
    /// [`TransferMethod::Refer`]: the final SIP status the caller reported (200 when the
    /// target answered).
    pub status: Option<u16>,
    /// [`TransferMethod::Bridge`] after a refused REFER: the caller's answer to it (e.g. 405).
    pub refer_status: Option<u16>,
}

impl TransferOutcome {
    fn from_result(result: &Value) -> Option<Self> {
        let method = match result.get("method")?.as_str()? {
            "refer" => TransferMethod::Refer,
            "bridge" => TransferMethod::Bridge,
            _ => return None,
        };
        let status = |name: &str| {
            result
                .get(name)
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
        };
        Some(Self {
            method,
            target: result.get("target")?.as_str()?.to_owned(),
            status: status("status"),
            refer_status: status("referStatus"),
        })
    }
}

impl ActiveCall {
    /// Hands the caller over to `target` (a `sip:` / `sips:` URI, or a phone number) and
    /// leaves the call (`call.transfer`, an extension of this server), letting it ring for
    /// 30 s. See [`ActiveCall::transfer_with_ring_time`].
    pub async fn transfer(&self, target: &str) -> Result<TransferOutcome, CallError> {
        self.transfer_with_ring_time(target, DEFAULT_RING_TIME)
            .await
    }

    /// Hands the caller over to `target`, letting it ring for `ring_time` (1..=120 s, whole
    /// seconds), and returns once the transfer is done.
    ///
    /// A caller that called in over SIP is sent a REFER to a SIP target and calls it
    /// itself ([`TransferMethod::Refer`]); its progress comes as
    /// [`CallEvent::TransferProgress`](super::CallEvent::TransferProgress), and the call ends
    /// (reason `transferred`) once the target answers. Any other caller, or a number as the
    /// target, or a SIP caller that refuses REFER: the server dials the target, bridges it to
    /// the caller and the agent leaves ([`TransferMethod::Bridge`]).
    ///
    /// Fails, with the call still with the agent, with code
    /// [`ErrorCode::CallUnanswered`](crate::ErrorCode::CallUnanswered) when the target does
    /// not answer, [`CallRejected`](crate::ErrorCode::CallRejected) when it or the caller
    /// refuses, [`Timeout`](crate::ErrorCode::Timeout) when the caller does not say in time,
    /// [`InvalidRequest`](crate::ErrorCode::InvalidRequest) for a target of the wrong form and
    /// [`Forbidden`](crate::ErrorCode::Forbidden) for one the connector may not transfer to.
    pub async fn transfer_with_ring_time(
        &self,
        target: &str,
        ring_time: Duration,
    ) -> Result<TransferOutcome, CallError> {
        let secs = u32::try_from(ring_time.as_secs()).unwrap_or(u32::MAX);
        if !media::RING_TIME_RANGE.contains(&secs) || ring_time.subsec_nanos() != 0 {
            return Err(CallError::with_message(
                CallErrorKind::InvalidArgument,
                format!("ring_time {ring_time:?} is not a whole number of seconds in 1..=120"),
            ));
        }
        let data = serde_json::to_value(TransferData {
            target: target.to_owned(),
            ring_time_seconds: Some(secs),
        })
        .ok();
        let result = self
            .command(CommandName::Transfer, data, ring_time + TRANSFER_MARGIN)
            .await?;
        TransferOutcome::from_result(&result).ok_or_else(|| {
            CallError::with_message(
                CallErrorKind::Connection,
                format!("call.transfer succeeded with an unreadable result: {result}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outcomes_read_from_results() {
        let refer = json!({"method": "refer", "target": "sip:a@b", "status": 200});
        assert_eq!(
            TransferOutcome::from_result(&refer),
            Some(TransferOutcome {
                method: TransferMethod::Refer,
                target: "sip:a@b".into(),
                status: Some(200),
                refer_status: None,
            })
        );
        let bridge = json!({"method": "bridge", "target": "+200", "referStatus": 405});
        let outcome = TransferOutcome::from_result(&bridge).unwrap();
        assert_eq!(outcome.method, TransferMethod::Bridge);
        assert_eq!(outcome.refer_status, Some(405));
        assert_eq!(
            TransferOutcome::from_result(&json!({"method": "fax"})),
            None
        );
    }
}
