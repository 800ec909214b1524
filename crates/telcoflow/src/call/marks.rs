//! The call's marks on the SDK side: numbered as they are placed, followed through the ring
//! buffer, the wire (`agent.mark`) and the server until their `call.mark`, so that each mark
//! gets exactly one [`CallEvent::Mark`](super::CallEvent::Mark), however its audio ends
//! (played, interrupted, a lost connection, the end of the call).

use crate::error::{CallError, CallErrorKind};
use crate::ring::{Cleared, RingMark};
use std::collections::VecDeque;
use telcoflow_proto::media::{
    Command, CommandName, InterruptResult, MAX_MARKS, MarkData, MediaClientFrame, check_mark_name,
};

/// What an interrupt ([`ActiveCall::interrupt`](super::ActiveCall::interrupt)) found: how
/// much of the agent's audio the caller heard, and what it dropped.
///
/// Heard is counted as the server plays the audio to the phone's leg, to one 20 ms frame.
/// An agent keeping a transcript cuts it at `played_ms` (or at its marks, each reported as
/// [`CallEvent::Mark`](super::CallEvent::Mark)) so that it does not believe it said what nobody
/// heard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Interrupted {
    /// Agent audio the caller heard, in ms: since [`Interrupted::since_mark`] when it is set,
    /// else since the call began.
    pub played_ms: u64,
    /// Agent audio the caller heard since the call began, in ms.
    pub played_total_ms: u64,
    /// The mark `played_ms` counts from, when the server knew the one asked for.
    pub since_mark: Option<String>,
    /// Bytes the server held and dropped.
    pub dropped_bytes_server: u64,
    /// Bytes still queued in this SDK and dropped.
    pub dropped_bytes_local: usize,
    /// The marks cleared, in the order they were placed: those the server held, then those
    /// still queued here. Each is also reported as a cleared [`CallEvent::Mark`](super::CallEvent::Mark).
    pub cleared_marks: Vec<String>,
}

impl Interrupted {
    pub(super) fn new(server: InterruptResult, local: Cleared) -> Self {
        let mut cleared_marks = server.cleared_marks;
        cleared_marks.extend(local.marks.into_iter().map(|m| m.name.into()));
        Self {
            played_ms: server.played_ms,
            played_total_ms: server.played_total_ms,
            since_mark: server.since_mark,
            dropped_bytes_server: server.dropped_bytes,
            dropped_bytes_local: local.bytes,
            cleared_marks,
        }
    }
}

/// `command_id` prefix of the `agent.mark` commands this SDK sends, followed by the mark's
/// number: their responses are matched by it, not waited for.
const COMMAND_PREFIX: &str = "mark:";

/// Where a mark is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// In the ring buffer behind audio not sent yet.
    Queued,
    /// `agent.mark` written to the connection, not confirmed yet.
    Sent,
    /// The server confirmed it holds the mark.
    Placed,
}

/// Marks placed and not yet reported, oldest first (at most [`MAX_MARKS`]).
#[derive(Debug, Default)]
pub(super) struct MarkTracker {
    next_id: u64,
    marks: VecDeque<(u64, Box<str>, Stage)>,
}

impl MarkTracker {
    /// A new mark, numbered; refused when the name is out of bounds or too many are
    /// outstanding.
    pub(super) fn add(&mut self, name: &str) -> Result<RingMark, CallError> {
        if let Err(why) = check_mark_name(name) {
            return Err(CallError::with_message(CallErrorKind::InvalidArgument, why));
        }
        if self.marks.len() >= MAX_MARKS {
            return Err(CallError::with_message(
                CallErrorKind::InvalidState,
                format!(
                    "{MAX_MARKS} marks are outstanding already; wait for their CallEvent::Mark"
                ),
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.marks.push_back((id, name.into(), Stage::Queued));
        Ok(RingMark {
            id,
            name: name.into(),
        })
    }

    /// Takes back a mark the ring buffer would not take (the call ended).
    pub(super) fn forget(&mut self, id: u64) {
        self.marks.retain(|(i, ..)| *i != id);
    }

    /// `agent.mark` for `mark`, as the text frame to send; the mark counts as sent.
    pub(super) fn command(&mut self, mark: &RingMark) -> String {
        if let Some(m) = self.marks.iter_mut().find(|(i, ..)| *i == mark.id) {
            m.2 = Stage::Sent;
        }
        let data = serde_json::to_value(MarkData {
            name: mark.name.to_string(),
            id: Some(mark.id),
        })
        .ok();
        MediaClientFrame::Command(Command {
            command_id: format!("{COMMAND_PREFIX}{}", mark.id),
            command: CommandName::Mark.as_str().to_owned(),
            timeout_ms: None,
            data,
        })
        .encode()
    }

    /// The mark number of an `agent.mark` response's `command_id`, if it is one.
    pub(super) fn response_id(command_id: &str) -> Option<u64> {
        command_id.strip_prefix(COMMAND_PREFIX)?.parse().ok()
    }

    /// The server holds mark `id`.
    pub(super) fn placed(&mut self, id: u64) {
        if let Some(m) = self.marks.iter_mut().find(|(i, ..)| *i == id) {
            m.2 = Stage::Placed;
        }
    }

    /// Mark `id` is reported: its name, or `None` if it was reported already.
    pub(super) fn finish(&mut self, id: u64) -> Option<Box<str>> {
        let at = self.marks.iter().position(|(i, ..)| *i == id)?;
        self.marks.remove(at).map(|(_, name, _)| name)
    }

    /// The connection was lost: marks sent on it and not confirmed may never have arrived.
    /// They are given up (reported cleared); a late `call.mark` for one is then ignored.
    pub(super) fn lost_in_transit(&mut self) -> Vec<Box<str>> {
        let mut lost = Vec::new();
        self.marks.retain(|(_, name, stage)| {
            let gone = *stage == Stage::Sent;
            if gone {
                lost.push(name.clone());
            }
            !gone
        });
        lost
    }

    /// The call ended: every mark left will never be reached.
    pub(super) fn drain(&mut self) -> Vec<Box<str>> {
        self.marks.drain(..).map(|(_, name, _)| name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telcoflow_proto::media::MAX_MARK_NAME_BYTES;

    #[test]
    fn marks_are_bounded_numbered_and_reported_once() {
        let mut t = MarkTracker::default();
        assert!(t.add("").is_err());
        assert!(t.add(&"x".repeat(MAX_MARK_NAME_BYTES + 1)).is_err());
        let a = t.add("a").unwrap();
        let b = t.add("b").unwrap();
        assert_ne!(a.id, b.id);
        let text = t.command(&a);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["data"]["command"], "agent.mark");
        assert_eq!(v["data"]["data"]["name"], "a");
        let id = MarkTracker::response_id(v["data"]["command_id"].as_str().unwrap());
        assert_eq!(id, Some(a.id));
        assert_eq!(MarkTracker::response_id("some-uuid"), None);
        // Sent, not confirmed, and the connection drops: given up; `b` was still queued.
        assert_eq!(t.lost_in_transit(), ["a".into()] as [Box<str>; 1]);
        assert_eq!(t.finish(a.id), None, "a late event for it is ignored");
        t.command(&b);
        t.placed(b.id);
        assert!(t.lost_in_transit().is_empty(), "the server holds it");
        assert_eq!(t.finish(b.id).as_deref(), Some("b"));
        assert_eq!(t.finish(b.id), None);
        for i in 0..MAX_MARKS {
            t.add(&i.to_string()).unwrap();
        }
        assert!(t.add("one too many").is_err());
        assert_eq!(t.drain().len(), MAX_MARKS);
        assert!(t.drain().is_empty());
    }
}
