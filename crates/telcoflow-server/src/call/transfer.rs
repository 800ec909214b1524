//! `call.transfer`: hand the caller over to another party, and the agent leaves.
//!
//! - A caller that called in over SIP, to a `sip:` / `sips:` target: a blind transfer with
//!   REFER (RFC 3515) in the caller's dialog. Its answer (202, or an error) and the NOTIFYs
//!   that follow (their sipfrag status lines, passed on as `call.transfer_progress`) say how
//!   the caller's own call to the target goes; a final 2xx ends our call (BYE, RFC 5589) as
//!   `transferred`. A caller that refuses REFER itself (403, 405, 420, 489, 501) is transferred
//!   by dialling instead.
//! - Any other caller (a simulated phone, a call we placed), or a number as the target: the
//!   server dials the target like `call.connect`; once it answers, the agent leaves like
//!   `call.close` and the caller and the target stay bridged. A target that does not answer
//!   leaves the call with the agent.
//!
//! The command's response comes with the outcome, bounded: the REFER's answer by its
//! transaction (32 s over UDP), then the final NOTIFY by the ring time plus
//! [`NOTIFY_MARGIN`]; the dialled target by the ring time; all by the command's `timeout_ms`.

use super::actor::{BridgeTransfer, CallActor, PendingConnect, PendingTransfer, Phase};
use super::leg::{LegKind, LegOutput, Refusal};
use serde_json::{Value, json};
use std::time::Duration;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::control::CloseReason;
use telcoflow_proto::media::{
    CallEvent, CommandResponse, DEFAULT_TRANSFER_RING_SECONDS, MAX_TRANSFER_TARGET_LEN,
    RING_TIME_RANGE, TransferData,
};
use telcoflow_proto::sim::HangupReason;
use telcoflow_sip::sip::message::SipUri;
use tokio::time::Instant;
use tracing::{debug, info};

/// How long the REFER's answer may take: its transaction gives up after 64·T1 (32 s) and
/// reports 408; this bounds a leg that never reports at all.
const REFER_ANSWER_DEADLINE: Duration = Duration::from_secs(40);
/// Beyond the ring time, how long the final NOTIFY may take after the 202.
pub(super) const NOTIFY_MARGIN: Duration = Duration::from_secs(10);
/// `call.transfer_progress` events a call passes on at most: a caller cannot flood the agent
/// with NOTIFYs.
const MAX_PROGRESS_EVENTS: u32 = 32;
/// Longest number a target may be, in digits.
const MAX_NUMBER_DIGITS: usize = 32;
/// REFER answers that mean the caller does not do REFER at all (forbidden, not allowed, bad
/// extension, bad event, not implemented): the server dials the target itself instead.
const REFER_UNSUPPORTED: [u16; 5] = [403, 405, 420, 489, 501];

/// The kinds of address a transfer target can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Sip,
    /// `sips:`: reachable by REFER only (the server dials no TLS).
    Sips,
    Number,
}

/// Checks a target's form: a `sip:` / `sips:` URI or a number (an optional `+` and 1 to 32
/// digits), at most [`MAX_TRANSFER_TARGET_LEN`] characters.
fn target_kind(target: &str) -> Result<Target, String> {
    if target.is_empty() {
        return Err("call.transfer needs a target".into());
    }
    if target.chars().count() > MAX_TRANSFER_TARGET_LEN {
        return Err(format!(
            "the target is longer than {MAX_TRANSFER_TARGET_LEN} characters"
        ));
    }
    let scheme = target.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    if let Some(scheme @ ("sip" | "sips")) = scheme.as_deref() {
        // It goes into a Refer-To header between angle brackets.
        let unsafe_char = |c: char| c.is_whitespace() || c.is_control() || "<>\"".contains(c);
        let parsed = SipUri::parse(target).ok().filter(|u| !u.host.is_empty());
        if target.chars().any(unsafe_char) || parsed.is_none() {
            return Err(format!(
                "the target {target:?} is not a valid {scheme}: URI"
            ));
        }
        return Ok(if scheme == "sip" {
            Target::Sip
        } else {
            Target::Sips
        });
    }
    let digits = target.strip_prefix('+').unwrap_or(target);
    if (1..=MAX_NUMBER_DIGITS).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Ok(Target::Number);
    }
    Err(format!(
        "the target must be a sip: or sips: URI or a phone number (an optional + and 1 to {MAX_NUMBER_DIGITS} digits), got {target:?}"
    ))
}

impl PendingConnect {
    /// The failure response of this `call.connect`, or of this transfer by dialling (whose
    /// `result` says how it was tried).
    pub(super) fn failure(self, code: ErrorCode, message: impl Into<String>) -> CommandResponse {
        let mut response = CommandResponse::error(self.command_id, code, message);
        if let Some(t) = self.transfer {
            response.result = Some(bridge_result(&self.destination, t));
        }
        response
    }
}

fn bridge_result(target: &str, t: BridgeTransfer) -> Value {
    let mut result = json!({ "method": "bridge", "target": target });
    if let Some(status) = t.refer_status {
        result["referStatus"] = Value::from(status);
    }
    result
}

fn refer_result(target: &str, status: u16) -> Value {
    json!({ "method": "refer", "target": target, "status": status })
}

impl CallActor {
    /// `call.transfer {"target": ..., "ringTimeSeconds": ...}`.
    pub(super) fn on_transfer(&mut self, id: String, data: Option<Value>, timeout_ms: Option<u64>) {
        let invalid = |message: String| {
            CommandResponse::error(id.clone(), ErrorCode::InvalidRequest, message)
        };
        let data = match data.map(serde_json::from_value::<TransferData>) {
            Some(Ok(d)) => d,
            _ => {
                return self.respond(invalid(
                    "call.transfer needs data {\"target\": \"a sip: or sips: URI, or a phone number\", \"ringTimeSeconds\": 1..=120}".into(),
                ));
            }
        };
        let ring_time = data
            .ring_time_seconds
            .unwrap_or(DEFAULT_TRANSFER_RING_SECONDS);
        if !RING_TIME_RANGE.contains(&ring_time) {
            return self.respond(invalid(format!(
                "ringTimeSeconds must be 1..=120, got {ring_time}"
            )));
        }
        let target = data.target.trim().to_owned();
        let kind = match target_kind(&target) {
            Ok(kind) => kind,
            Err(why) => return self.respond(invalid(why)),
        };
        let state_error = if self.phase != Phase::Answered {
            Some("answer the call before transferring it")
        } else if self.transfer.is_some() {
            Some("a transfer is already under way")
        } else if self.callee.is_some() || self.connect.is_some() {
            Some(
                "the call is connected or connecting: transfer it before call.connect (or leave the parties talking with call.close)",
            )
        } else {
            None
        };
        if let Some(message) = state_error {
            return self.respond(CommandResponse::error(id, ErrorCode::InvalidState, message));
        }
        if !self.connector.may_transfer_to(&target) {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::Forbidden,
                format!(
                    "{target} is not a transfer target of this connector: add it to the connector's transfer_targets"
                ),
            ));
        }
        let reply_deadline = timeout_ms.map(|ms| self.now + Duration::from_millis(ms));
        // Only the UAS side of a SIP call sends REFER: a call we placed is dialled over.
        let refer = self.caller.kind() == LegKind::Sip && !self.outbound && kind != Target::Number;
        if refer {
            info!(%target, "transferring the caller by REFER");
            self.caller.send(LegOutput::Refer {
                target: target.clone(),
            });
            self.referred = true;
            self.transfer = Some(PendingTransfer {
                command_id: id,
                target,
                ring_time,
                accepted: false,
                deadline: self.now + REFER_ANSWER_DEADLINE,
                reply_deadline,
            });
            return;
        }
        if kind == Target::Sips {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::NoRoute,
                "a sips: target is reached by REFER only, which only a caller on SIP can take",
            ));
        }
        info!(%target, "transferring the caller by dialling the target");
        self.dial_transfer(id, target, ring_time, reply_deadline, None);
    }

    /// Dials the target for a transfer; its answer is handled like `call.connect`'s, then
    /// [`Self::bridge_transfer_answered`].
    fn dial_transfer(
        &mut self,
        id: String,
        target: String,
        ring_time: u32,
        reply_deadline: Option<Instant>,
        refer_status: Option<u16>,
    ) {
        let pending = PendingConnect {
            command_id: id,
            leg: super::leg::LegId(0),
            destination: target,
            ring_deadline: self.now + Duration::from_secs(u64::from(ring_time)),
            reply_deadline,
            transfer: Some(BridgeTransfer { refer_status }),
        };
        let sips = pending.destination.get(..5);
        if sips.is_some_and(|s| s.eq_ignore_ascii_case("sips:")) {
            return self.respond(pending.failure(
                ErrorCode::NoRoute,
                "a sips: target is reached by REFER only, and the caller refused REFER",
            ));
        }
        self.ring_destination(pending);
    }

    /// The dialled target answered: the transfer is done, the agent leaves the caller and
    /// the target talking.
    pub(super) fn bridge_transfer_answered(&mut self, c: PendingConnect) {
        let result = bridge_result(
            &c.destination,
            c.transfer.unwrap_or(BridgeTransfer { refer_status: None }),
        );
        info!(target = %c.destination, "transferred: the caller and the target are bridged");
        self.respond(CommandResponse::ok(c.command_id, Some(result)));
        self.leave_connected("transferred");
    }

    /// The caller's final answer to our REFER.
    pub(super) fn on_refer_answered(&mut self, status: u16) {
        let Some(t) = self.transfer.as_mut().filter(|t| !t.accepted) else {
            debug!(status, "REFER answer with no transfer waiting for it");
            return;
        };
        if (200..300).contains(&status) {
            info!(status, "the caller accepted the transfer");
            t.accepted = true;
            t.deadline = self.now + Duration::from_secs(u64::from(t.ring_time)) + NOTIFY_MARGIN;
            return;
        }
        let Some(t) = self.transfer.take() else {
            return;
        };
        if REFER_UNSUPPORTED.contains(&status) {
            info!(status, target = %t.target, "the caller refused REFER; dialling the target");
            return self.dial_transfer(
                t.command_id,
                t.target,
                t.ring_time,
                t.reply_deadline,
                Some(status),
            );
        }
        info!(status, "the caller refused the transfer");
        let (code, message) = if status == 408 {
            (
                ErrorCode::Timeout,
                "the caller did not answer the REFER".to_owned(),
            )
        } else {
            (
                ErrorCode::CallRejected,
                format!("the caller refused the transfer: SIP {status}"),
            )
        };
        let mut response = CommandResponse::error(t.command_id, code, message);
        response.result = Some(refer_result(&t.target, status));
        self.respond(response);
    }

    /// A NOTIFY from the referred caller: how its call to the target goes.
    pub(super) fn on_refer_progress(&mut self, status: u16, reason: &str, terminated: bool) {
        if !self.referred {
            debug!(status, "NOTIFY for a REFER this call never sent");
            return;
        }
        if self.transfer_events < MAX_PROGRESS_EVENTS {
            self.transfer_events += 1;
            self.send_event(CallEvent::transfer_progress("refer", status, reason));
        } else {
            debug!(status, "transfer progress beyond the bound not passed on");
        }
        if (200..300).contains(&status) {
            match self.transfer.take() {
                Some(t) => {
                    info!(status, target = %t.target, "transferred: the caller reached the target");
                    let result = refer_result(&t.target, status);
                    self.respond(CommandResponse::ok(t.command_id, Some(result)));
                }
                // After the command gave up waiting: the caller is with the target all the same.
                None => info!(status, "transferred after the command's deadline"),
            }
            // RFC 5589 6.1: the transferor ends its dialog with the transferee.
            self.transferred = true;
            self.finish(CloseReason::SdkRequest, HangupReason::Remote);
            return;
        }
        if status < 200 && !terminated {
            return;
        }
        let Some(t) = self.transfer.take() else {
            return;
        };
        // A final failure, or a subscription that ended without a final status.
        let (code, message) = if status >= 300 {
            let refusal = Refusal::from_sip_status(status);
            (refusal.code(), format!("{} {refusal}", t.target))
        } else {
            (
                ErrorCode::CallRejected,
                "the caller ended the transfer's subscription with no final status".to_owned(),
            )
        };
        info!(status, "the transfer failed; the call stays with the agent");
        let mut response = CommandResponse::error(t.command_id, code, message);
        response.result = Some(refer_result(&t.target, status));
        self.respond(response);
    }

    /// A REFER transfer whose answer or final NOTIFY did not come in time fails; the call
    /// stays with the agent.
    pub(super) fn transfer_deadline(&mut self, now: Instant) {
        let due = self
            .transfer
            .as_ref()
            .is_some_and(|t| now >= t.deadline || t.reply_deadline.is_some_and(|r| now >= r));
        if !due {
            return;
        }
        let Some(t) = self.transfer.take() else {
            return;
        };
        let message = if t.accepted {
            "the caller accepted the transfer but sent no final NOTIFY in time"
        } else {
            "the caller did not answer the REFER in time"
        };
        info!(accepted = t.accepted, "transfer timed out");
        let mut response = CommandResponse::error(t.command_id, ErrorCode::Timeout, message);
        let status = if t.accepted { 202 } else { 408 };
        response.result = Some(refer_result(&t.target, status));
        self.respond(response);
    }

    /// The call ends with a REFER transfer waiting: it fails.
    pub(super) fn transfer_ended_with_call(&mut self) {
        if let Some(t) = self.transfer.take() {
            let mut response = CommandResponse::error(
                t.command_id,
                ErrorCode::CallTerminated,
                "the call ended before the transfer completed",
            );
            let status = if t.accepted { 202 } else { 0 };
            response.result = Some(refer_result(&t.target, status));
            self.respond(response);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_sip_uris_or_numbers() {
        assert_eq!(target_kind("sip:+200@127.0.0.1:5070"), Ok(Target::Sip));
        assert_eq!(target_kind("SIP:desk@pbx.example"), Ok(Target::Sip));
        assert_eq!(target_kind("sips:desk@pbx.example"), Ok(Target::Sips));
        assert_eq!(target_kind("+15550100"), Ok(Target::Number));
        assert_eq!(target_kind("200"), Ok(Target::Number));
        for bad in [
            "",
            "+",
            "12a",
            "+1 555",
            "tel:+1555",
            "sip:",
            "sip:a b@host",
            "sip:a@host>;x=<y",
            "http://example.com",
        ] {
            assert!(target_kind(bad).is_err(), "{bad:?}");
        }
        assert!(target_kind(&"1".repeat(33)).is_err());
        let long = format!("sip:{}@pbx.example", "a".repeat(250));
        assert!(target_kind(&long).unwrap_err().contains("longer than 256"));
    }
}
