//! Marks and what the caller heard: `agent.mark` places a named mark after the agent audio
//! received so far, `call.mark` tells the agent when the caller has heard everything before
//! it (or that an interrupt cleared it), and `agent.interrupt` answers with how much of the
//! agent's audio the caller heard (`played_ms`) and what it dropped.
//!
//! Heard means played to a leg that hears the agent, at the tick that plays it: the caller
//! alone with the agent or after `agent.barge`, the destination after `agent.whisper`;
//! nobody after `agent.spy` (marks are still reached there: the audio before them is gone).
//! Events of marks reached while the media connection is away wait for it to come back, and
//! those sent in the last 2 s before the server noticed the loss are sent again then (they
//! may have been lost with it): a client tells a repeat by the mark's `id`.

use super::actor::CallActor;
use super::playout::Mark;
use serde_json::{Value, json};
use telcoflow_proto::ErrorCode;
use telcoflow_proto::media::{
    CallEvent, CommandResponse, InterruptData, InterruptResult, MAX_MARKS, MarkData,
    check_mark_name,
};
use tracing::debug;

impl CallActor {
    /// `agent.mark`: places the mark after the audio received so far.
    pub(super) fn on_mark(&mut self, id: String, data: Option<Value>) {
        let data = match data.map(serde_json::from_value::<MarkData>) {
            Some(Ok(d)) => d,
            _ => {
                return self.respond(CommandResponse::error(
                    id,
                    ErrorCode::InvalidRequest,
                    "agent.mark needs data {\"name\": \"1 to 128 bytes\", \"id\": n}",
                ));
            }
        };
        if let Err(why) = check_mark_name(&data.name) {
            return self.respond(CommandResponse::error(id, ErrorCode::InvalidRequest, why));
        }
        let mark = Mark {
            name: data.name.as_str().into(),
            id: data.id,
        };
        if self.playout.place_mark(mark).is_err() {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::QuotaExceeded,
                format!(
                    "a call holds at most {MAX_MARKS} marks not yet reached; wait for call.mark events"
                ),
            ));
        }
        self.respond(CommandResponse::ok(
            id,
            Some(json!({ "name": data.name, "id": data.id })),
        ));
        // With no audio held, the caller has heard everything before it already.
        self.report_reached_marks();
    }

    /// Counts the agent audio the latest tick played, if a leg that hears the agent took it.
    pub(super) fn count_heard(&mut self, heard: bool) {
        if heard {
            self.marks.heard_bytes += self.playout.last_played() as u64;
        }
    }

    /// Reports every mark whose audio has all been played (after a tick, or at once).
    pub(super) fn report_reached_marks(&mut self) {
        while let Some(mark) = self.playout.pop_reached_mark() {
            let heard = self.marks.heard_bytes;
            debug!(name = %mark.name, "mark reached");
            let ev = CallEvent::mark(&mark.name, mark.id, false, self.bytes_to_ms(heard));
            self.marks.reached(mark.name);
            self.send_mark_event(ev);
        }
    }

    /// `agent.interrupt`: drops the agent audio held and its marks, and tells what the caller
    /// heard.
    pub(super) fn on_interrupt(&mut self, id: String, data: Option<Value>) {
        // A malformed argument must not keep the caller listening to an interrupted agent.
        let since = data
            .and_then(|d| serde_json::from_value::<InterruptData>(d).ok())
            .and_then(|d| d.since_mark);
        self.report_reached_marks();
        let dropped = self.playout.clear() as u64;
        self.shared.metrics.interrupts.inc();
        let heard = self.marks.heard_bytes;
        let cleared = self.playout.take_cleared_marks();
        let played_total_ms = self.bytes_to_ms(heard);
        for mark in &cleared {
            let ev = CallEvent::mark(&mark.name, mark.id, true, played_total_ms);
            self.send_mark_event(ev);
        }
        let from = since.as_deref().and_then(|name| {
            if cleared.iter().any(|m| &*m.name == name) {
                // Placed after everything heard: nothing of it was heard.
                Some(heard)
            } else {
                self.marks.heard_at(name)
            }
        });
        let result = InterruptResult {
            dropped_bytes: dropped,
            dropped_bytes_compat: dropped,
            played_ms: self.bytes_to_ms(heard.saturating_sub(from.unwrap_or(0))),
            played_total_ms,
            since_mark: since.filter(|_| from.is_some()),
            cleared_marks: cleared.into_iter().map(|m| m.name.into()).collect(),
        };
        debug!(dropped, played_total_ms, "interrupt");
        self.respond(CommandResponse::ok(id, serde_json::to_value(result).ok()));
    }

    /// Sends a `call.mark`, or keeps it until the media connection is back.
    fn send_mark_event(&mut self, ev: CallEvent) {
        if self.media.is_some() {
            self.marks.sent(ev.clone(), self.now);
            self.send_event(ev);
        } else {
            self.marks.keep(ev);
        }
    }

    /// The media connection was lost: the `call.mark` events sent on it lately go again on
    /// the next one.
    pub(super) fn resend_recent_marks(&mut self) {
        self.marks.connection_lost(self.now);
    }

    /// Delivers the `call.mark` events kept while the media connection was away.
    pub(super) fn deliver_kept_marks(&mut self) {
        while self.media.is_some() {
            let Some(ev) = self.marks.next_kept() else {
                break;
            };
            self.send_event(ev);
        }
    }
}
