//! What a call keeps of the caller's hearing beyond the playout buffer: the agent audio heard
//! so far, the marks reached lately (for `since_mark`), and the `call.mark` events owed to a
//! media connection that is away or was lost (see `marks` for how the call uses them).

use std::collections::VecDeque;
use std::time::Duration;
use telcoflow_proto::media::{CallEvent, MAX_MARKS};
use tokio::time::Instant;

/// How long before a lost media connection is noticed a `call.mark` sent on it may have been
/// lost with it: the socket's buffers, and the time to notice.
const RESEND_WINDOW: Duration = Duration::from_secs(2);
/// Reached marks remembered for `since_mark`.
const REACHED_KEPT: usize = MAX_MARKS;
/// Events kept for a media connection that is away: every mark the call can hold, reached
/// or cleared, twice over.
const EVENTS_KEPT: usize = 2 * MAX_MARKS;

#[derive(Debug, Default)]
pub(super) struct MarkLog {
    /// Bytes of agent audio played to a leg that hears the agent.
    pub(super) heard_bytes: u64,
    /// The latest reached marks, oldest first, with `heard_bytes` when each was reached.
    reached: VecDeque<(Box<str>, u64)>,
    /// `call.mark` events for an agent whose media connection is away.
    undelivered: VecDeque<CallEvent>,
    /// `call.mark` events sent lately, to send again if the connection turns out lost.
    recent: VecDeque<(Instant, CallEvent)>,
}

impl MarkLog {
    /// Mark `name` was reached with everything heard so far.
    pub(super) fn reached(&mut self, name: Box<str>) {
        if self.reached.len() == REACHED_KEPT {
            self.reached.pop_front();
        }
        self.reached.push_back((name, self.heard_bytes));
    }

    /// `heard_bytes` when the latest mark named `name` was reached, if it is remembered.
    pub(super) fn heard_at(&self, name: &str) -> Option<u64> {
        self.reached
            .iter()
            .rev()
            .find(|(n, _)| &**n == name)
            .map(|(_, at)| *at)
    }

    /// `ev` went out at `now`: kept for [`RESEND_WINDOW`].
    pub(super) fn sent(&mut self, ev: CallEvent, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > RESEND_WINDOW)
            || self.recent.len() >= EVENTS_KEPT
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, ev));
    }

    /// `ev` waits for the media connection.
    pub(super) fn keep(&mut self, ev: CallEvent) {
        if self.undelivered.len() == EVENTS_KEPT {
            self.undelivered.pop_front();
        }
        self.undelivered.push_back(ev);
    }

    /// The media connection was found lost at `now`: the events sent on it lately wait for
    /// the next one, ahead of any kept since.
    pub(super) fn connection_lost(&mut self, now: Instant) {
        let recent = std::mem::take(&mut self.recent);
        for (_, ev) in recent
            .into_iter()
            .rev()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= RESEND_WINDOW)
        {
            if self.undelivered.len() == EVENTS_KEPT {
                break;
            }
            self.undelivered.push_front(ev);
        }
    }

    /// The next event waiting for the media connection.
    pub(super) fn next_kept(&mut self) -> Option<CallEvent> {
        self.undelivered.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str) -> CallEvent {
        CallEvent::mark(name, None, false, 0)
    }

    #[test]
    fn events_sent_lately_go_again_before_those_kept_since() {
        let t0 = Instant::now();
        let mut log = MarkLog::default();
        log.sent(ev("old"), t0);
        log.sent(ev("a"), t0 + Duration::from_secs(3));
        log.sent(ev("b"), t0 + Duration::from_secs(4));
        log.keep(ev("c"));
        log.connection_lost(t0 + Duration::from_millis(4500));
        let names: Vec<String> = std::iter::from_fn(|| log.next_kept())
            .map(|e| e.str_field("name").unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            ["a", "b", "c"],
            "the one older than 2 s is not repeated"
        );
    }

    #[test]
    fn the_latest_mark_of_a_name_counts() {
        let mut log = MarkLog::default();
        log.reached("s".into());
        log.heard_bytes = 640;
        log.reached("s".into());
        assert_eq!(log.heard_at("s"), Some(640));
        assert_eq!(log.heard_at("t"), None);
    }
}
