//! The agent's commands: `call.answer`, `call.connect` (ringing a destination through the
//! networks), whisper / barge / spy, interrupt, DTMF out, disconnect and close.

use super::actor::{AgentMode, CallActor, PendingConnect, Phase};
use super::leg::{LegId, LegOutput};
use super::legs::Leg;
use serde_json::{Value, json};
use std::time::Duration;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::control::CloseReason;
use telcoflow_proto::media::{
    Command, CommandName, CommandResponse, ConnectData, RING_TIME_RANGE, SendDtmfData,
};
use telcoflow_proto::sim::HangupReason;
use telcoflow_sip::rtp::dtmf_out::{DEFAULT_DURATION_MS, DtmfPlan};
use tracing::{debug, info};

impl CallActor {
    /// A command from the agent's current media connection.
    pub(super) fn on_command(&mut self, cmd: Command) {
        let Some(name) = CommandName::parse(&cmd.command) else {
            let known: Vec<&str> = CommandName::ALL.iter().map(|c| c.as_str()).collect();
            self.respond(CommandResponse::error(
                cmd.command_id,
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command '{}'; known commands: {}",
                    cmd.command,
                    known.join(", ")
                ),
            ));
            return;
        };
        debug!(command = %name, "command");
        let id = cmd.command_id;
        // Bounded by `limits.max_pending_commands_per_call` (the media connection holds back
        // more); a command answered twice or never is forgotten with the call.
        self.commands_started
            .push((id.clone(), name.as_str(), tokio::time::Instant::now()));
        match name {
            CommandName::Answer if self.outbound && self.phase == Phase::Ringing => {
                if self.pending_answer.is_some() {
                    return self.respond(CommandResponse::error(
                        id,
                        ErrorCode::InvalidState,
                        "an answer is already waiting for the far end",
                    ));
                }
                let deadline = cmd
                    .timeout_ms
                    .map(|ms| self.now + Duration::from_millis(ms));
                self.pending_answer = Some((id, deadline));
            }
            CommandName::Answer => {
                let already = self.phase == Phase::Answered;
                if !already {
                    self.phase = Phase::Answered;
                    self.caller.up = true;
                    self.caller.send(LegOutput::Answered);
                    self.count_answer();
                    info!("answered");
                }
                self.respond(CommandResponse::ok(
                    id,
                    Some(json!({ "alreadyAnswered": already })),
                ));
            }
            CommandName::Connect => self.on_connect(id, cmd.data, cmd.timeout_ms),
            CommandName::Whisper | CommandName::Barge | CommandName::Spy => {
                if !self.callee.as_ref().is_some_and(|c| c.up) {
                    self.respond(CommandResponse::error(
                        id,
                        ErrorCode::NotConnected,
                        format!("{name} needs a connected destination: call.connect first"),
                    ));
                    return;
                }
                self.mode = match name {
                    CommandName::Whisper => AgentMode::Whisper,
                    CommandName::Spy => AgentMode::Spy,
                    _ => AgentMode::Barge,
                };
                self.respond(CommandResponse::ok(id, None));
            }
            CommandName::Interrupt => {
                let dropped = self.playout.clear();
                self.shared.metrics.interrupts.inc();
                debug!(dropped, "interrupt");
                self.respond(CommandResponse::ok(
                    id,
                    Some(json!({ "droppedBytes": dropped })),
                ));
            }
            CommandName::SendDtmf => self.on_send_dtmf(id, cmd.data),
            CommandName::Transfer => self.on_transfer(id, cmd.data, cmd.timeout_ms),
            CommandName::Disconnect => {
                self.respond(CommandResponse::ok(id, None));
                self.finish(CloseReason::SdkRequest, HangupReason::Remote);
            }
            CommandName::Close => {
                self.respond(CommandResponse::ok(id, None));
                self.agent_leaves();
            }
        }
    }

    /// `call.send_dtmf`: the digits go to the caller (the party the agent talks to), not to
    /// a connected destination. Answered at once with the digits queued: `queuedMs` says
    /// how long they take to play.
    fn on_send_dtmf(&mut self, id: String, data: Option<Value>) {
        let data = match data.map(serde_json::from_value::<SendDtmfData>) {
            Some(Ok(d)) => d,
            _ => {
                return self.respond(CommandResponse::error(
                    id,
                    ErrorCode::InvalidRequest,
                    "call.send_dtmf needs data {\"digits\": \"1 to 32 of 0-9 * # A-D\", \"durationMs\": 40..=2000}",
                ));
            }
        };
        let duration = data.duration_ms.unwrap_or(DEFAULT_DURATION_MS);
        let plan = match DtmfPlan::new(&data.digits, duration) {
            Ok(plan) => plan,
            Err(e) => {
                return self.respond(CommandResponse::error(id, ErrorCode::InvalidRequest, e));
            }
        };
        if self.phase != Phase::Answered || !self.caller.up {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::InvalidState,
                "answer the call before sending DTMF",
            ));
        }
        let queued = plan.total_ms();
        info!(digits = plan.events().len(), duration, "sending DTMF");
        self.caller.send_dtmf(plan);
        self.respond(CommandResponse::ok(id, Some(json!({ "queuedMs": queued }))));
    }

    fn on_connect(&mut self, id: String, data: Option<Value>, timeout_ms: Option<u64>) {
        let ring_time = match data.map(serde_json::from_value::<ConnectData>) {
            Some(Ok(d)) if RING_TIME_RANGE.contains(&d.ring_time_seconds) => d.ring_time_seconds,
            Some(Ok(d)) => {
                return self.respond(CommandResponse::error(
                    id,
                    ErrorCode::InvalidRequest,
                    format!(
                        "ringTimeSeconds must be 1..=120, got {}",
                        d.ring_time_seconds
                    ),
                ));
            }
            _ => {
                return self.respond(CommandResponse::error(
                    id,
                    ErrorCode::InvalidRequest,
                    "call.connect needs data {\"ringTimeSeconds\": 1..=120}",
                ));
            }
        };
        if self.phase != Phase::Answered {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::InvalidState,
                "answer the call before connecting it",
            ));
        }
        if self.callee.is_some() || self.connect.is_some() {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::InvalidState,
                "the call is already connected or connecting",
            ));
        }
        if self.transfer.is_some() {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::InvalidState,
                "a transfer is under way",
            ));
        }
        let Some(destination) = self
            .connector
            .connect_destination(&self.handle.to)
            .map(str::to_owned)
        else {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::NoRoute,
                format!(
                    "no connect destination is configured for {}",
                    self.handle.to
                ),
            ));
        };
        let now = self.now;
        self.ring_destination(PendingConnect {
            command_id: id,
            leg: LegId(0),
            destination,
            ring_deadline: now + Duration::from_secs(u64::from(ring_time)),
            reply_deadline: timeout_ms.map(|ms| now + Duration::from_millis(ms)),
            transfer: None,
        });
    }

    /// Rings `pending.destination` as a new leg (`call.connect`, or `call.transfer` by
    /// dialling), which answers or refuses later as a leg event.
    pub(super) fn ring_destination(&mut self, mut pending: PendingConnect) {
        let leg = LegId(self.next_leg);
        self.next_leg += 1;
        pending.leg = leg;
        let destination = &pending.destination;
        // The networks pick by address: SIP for `sip:` URIs, else the simulated phones.
        let link = match self.shared.networks.ring(destination, &self.handle, leg) {
            Ok(link) => link,
            Err(e) => {
                let message = format!("{destination} cannot be reached: {e}");
                return self.respond(pending.failure(ErrorCode::CallRejected, message));
            }
        };
        info!(%destination, transfer = pending.transfer.is_some(), "ringing");
        self.callee = Some(Leg::new(leg, link, self.rate(), &self.shared.metrics));
        self.connect = Some(pending);
    }
}
