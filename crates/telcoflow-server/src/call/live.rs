//! What a call shows while it runs, for the console: its state, whether its agent is on,
//! audio levels both ways and frame counts. The actor writes these with relaxed atomic
//! stores (a few per frame, never a lock); the console reads them whenever it looks.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use telcoflow_proto::stats::CallStats;

/// Ended calls the console lists per connector, newest kept.
pub(crate) const ENDED_CALLS_KEPT: usize = 20;

/// Where a call is, as the console shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum LiveState {
    /// Offered to the connector, nobody has claimed it yet.
    Offered = 0,
    /// An application claimed it; the caller hears ringing.
    Ringing = 1,
    /// Answered: audio flows between the caller and the agent.
    Answered = 2,
    /// Answered, and a `call.connect` destination is up too.
    Connected = 3,
    /// Over.
    Ended = 4,
}

impl LiveState {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Offered => "offered",
            Self::Ringing => "ringing",
            Self::Answered => "answered",
            Self::Connected => "connected",
            Self::Ended => "ended",
        }
    }

    const fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Offered,
            1 => Self::Ringing,
            2 => Self::Answered,
            3 => Self::Connected,
            _ => Self::Ended,
        }
    }
}

/// A call's live figures. One per call, shared by its handle.
#[derive(Debug)]
pub(crate) struct CallLive {
    started: Instant,
    /// Unix milliseconds at the start, for the ended-calls list.
    pub(crate) started_unix_ms: u64,
    state: AtomicU8,
    /// Milliseconds from the start to the answer; 0 until answered.
    answered_after_ms: AtomicU64,
    agent_attached: AtomicBool,
    /// RMS of the latest frame from the caller, in sample units (0..=32767).
    level_from_caller: AtomicU32,
    /// RMS of the latest frame played to the caller.
    level_to_caller: AtomicU32,
    frames_from_caller: AtomicU64,
    frames_to_caller: AtomicU64,
    frames_from_agent: AtomicU64,
    frames_to_agent: AtomicU64,
    /// Frames the agent's media connection could not take (slow consumer).
    frames_dropped: AtomicU64,
    playout_gaps: AtomicU64,
}

/// A copy of a call's live figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LiveSnapshot {
    pub(crate) state: LiveState,
    pub(crate) duration_ms: u64,
    /// Milliseconds since the answer, if answered.
    pub(crate) talk_ms: Option<u64>,
    pub(crate) agent_attached: bool,
    /// Level of the latest caller frame, dBFS (-96 for silence).
    pub(crate) level_from_caller_dbfs: f64,
    /// Level of the latest frame to the caller, dBFS.
    pub(crate) level_to_caller_dbfs: f64,
    pub(crate) frames_from_caller: u64,
    pub(crate) frames_to_caller: u64,
    pub(crate) frames_from_agent: u64,
    pub(crate) frames_to_agent: u64,
    pub(crate) frames_dropped: u64,
    pub(crate) playout_gaps: u64,
}

impl CallLive {
    pub(crate) fn new() -> Self {
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            started: Instant::now(),
            started_unix_ms,
            state: AtomicU8::new(LiveState::Offered as u8),
            answered_after_ms: AtomicU64::new(0),
            agent_attached: AtomicBool::new(false),
            level_from_caller: AtomicU32::new(0),
            level_to_caller: AtomicU32::new(0),
            frames_from_caller: AtomicU64::new(0),
            frames_to_caller: AtomicU64::new(0),
            frames_from_agent: AtomicU64::new(0),
            frames_to_agent: AtomicU64::new(0),
            frames_dropped: AtomicU64::new(0),
            playout_gaps: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self) -> LiveState {
        LiveState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Sets the state at `now`; the first move to answered records the time of the answer.
    pub(super) fn set_state(&self, state: LiveState, now: Instant) {
        let before = self.state.swap(state as u8, Ordering::Relaxed);
        if before < LiveState::Answered as u8
            && matches!(state, LiveState::Answered | LiveState::Connected)
        {
            let after = now
                .saturating_duration_since(self.started)
                .as_millis()
                .max(1) as u64;
            self.answered_after_ms.store(after, Ordering::Relaxed);
        }
    }

    pub(super) fn set_agent_attached(&self, attached: bool) {
        self.agent_attached.store(attached, Ordering::Relaxed);
    }

    /// A frame from the caller.
    pub(super) fn heard_from_caller(&self, samples: &[i16]) {
        self.level_from_caller
            .store(rms(samples), Ordering::Relaxed);
        self.frames_from_caller.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame played to the caller.
    pub(super) fn played_to_caller(&self, samples: &[i16]) {
        self.level_to_caller.store(rms(samples), Ordering::Relaxed);
        self.frames_to_caller.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame of agent audio.
    pub(super) fn heard_from_agent(&self) {
        self.frames_from_agent.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame for the agent's media connection: `sent`, or dropped for a slow consumer.
    pub(super) fn sent_to_agent(&self, sent: bool) {
        let counter = if sent {
            &self.frames_to_agent
        } else {
            &self.frames_dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn set_playout_gaps(&self, gaps: u64) {
        self.playout_gaps.store(gaps, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LiveSnapshot {
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let answered = self.answered_after_ms.load(Ordering::Relaxed);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LiveSnapshot {
            state: self.state(),
            duration_ms,
            talk_ms: (answered > 0).then(|| duration_ms.saturating_sub(answered)),
            agent_attached: self.agent_attached.load(Ordering::Relaxed),
            level_from_caller_dbfs: dbfs(self.level_from_caller.load(Ordering::Relaxed)),
            level_to_caller_dbfs: dbfs(self.level_to_caller.load(Ordering::Relaxed)),
            frames_from_caller: load(&self.frames_from_caller),
            frames_to_caller: load(&self.frames_to_caller),
            frames_from_agent: load(&self.frames_from_agent),
            frames_to_agent: load(&self.frames_to_agent),
            frames_dropped: load(&self.frames_dropped),
            playout_gaps: load(&self.playout_gaps),
        }
    }
}

/// A call that has ended, as the console lists it.
#[derive(Debug, Clone)]
pub(crate) struct EndedCall {
    pub(crate) call_id: String,
    pub(crate) from: String,
    pub(crate) to: String,
    /// Who ended it: `caller`, `agent`, `no_answer`, `server` or `network` (as in the
    /// `call.terminated` event).
    pub(crate) outcome: &'static str,
    pub(crate) started_unix_ms: u64,
    /// Its figures at the end.
    pub(crate) last: LiveSnapshot,
    /// Its quality figures for its whole life (as in `call.stats`).
    pub(crate) stats: Option<CallStats>,
}

/// The latest ended calls of each connector of this node ([`ENDED_CALLS_KEPT`] each).
#[derive(Debug, Default)]
pub(crate) struct EndedCalls {
    by_connector: Mutex<HashMap<Box<str>, VecDeque<EndedCall>>>,
}

impl EndedCalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, VecDeque<EndedCall>>> {
        // Only plain queue operations happen under this lock; a poisoned map is consistent.
        self.by_connector.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the end of a call of `connector` from `from` to `to` with these live figures
    /// (from its actor, once).
    pub(crate) fn record(
        &self,
        connector: &str,
        call_id: &str,
        (from, to): (&str, &str),
        live: &CallLive,
        stats: Option<CallStats>,
        outcome: &'static str,
    ) {
        let ended = EndedCall {
            call_id: call_id.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            outcome,
            started_unix_ms: live.started_unix_ms,
            last: live.snapshot(),
            stats,
        };
        let mut map = self.lock();
        // Connectors come from the configuration, so the map stays as small as it is.
        let calls = map.entry(connector.into()).or_default();
        if calls.len() == ENDED_CALLS_KEPT {
            calls.pop_front();
        }
        calls.push_back(ended);
    }

    /// The ended calls of `connector`, newest first.
    pub(crate) fn of(&self, connector: &str) -> Vec<EndedCall> {
        self.lock()
            .get(connector)
            .map(|calls| calls.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

/// Root mean square of a frame, in sample units.
fn rms(samples: &[i16]) -> u32 {
    if samples.is_empty() {
        return 0;
    }
    let sum: u64 = samples
        .iter()
        .map(|&s| (i64::from(s) * i64::from(s)) as u64)
        .sum();
    ((sum / samples.len() as u64) as f64).sqrt() as u32
}

/// A level in sample units as dBFS, one decimal; silence is -96 (the floor of 16-bit audio).
fn dbfs(rms: u32) -> f64 {
    if rms == 0 {
        return -96.0;
    }
    let db = 20.0 * (f64::from(rms) / 32768.0).log10();
    (db.max(-96.0) * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_rms_in_dbfs() {
        assert_eq!(rms(&[]), 0);
        assert_eq!(rms(&[1000, -1000, 1000, -1000]), 1000);
        assert_eq!(dbfs(0), -96.0);
        assert_eq!(dbfs(32767), 0.0);
        assert_eq!(dbfs(16384), -6.0);
    }

    #[test]
    fn answer_time_is_kept_from_the_first_answer() {
        let live = CallLive::new();
        assert_eq!(live.snapshot().talk_ms, None);
        live.set_state(LiveState::Ringing, Instant::now());
        live.set_state(LiveState::Answered, Instant::now());
        let first = live.answered_after_ms.load(Ordering::Relaxed);
        assert!(first > 0);
        live.set_state(LiveState::Connected, Instant::now());
        assert_eq!(live.answered_after_ms.load(Ordering::Relaxed), first);
        assert_eq!(live.snapshot().state, LiveState::Connected);
        live.heard_from_caller(&[100; 160]);
        live.sent_to_agent(true);
        live.sent_to_agent(false);
        let s = live.snapshot();
        assert_eq!(
            (s.frames_from_caller, s.frames_to_agent, s.frames_dropped),
            (1, 1, 1)
        );
    }

    #[test]
    fn ended_calls_keep_the_newest_per_connector() {
        let ended = EndedCalls::default();
        for i in 0..ENDED_CALLS_KEPT + 3 {
            let from = format!("+1{i}");
            ended.record("a", "id", (&from, "+2"), &CallLive::new(), None, "caller");
        }
        ended.record("b", "id", ("+3", "+4"), &CallLive::new(), None, "agent");
        let a = ended.of("a");
        assert_eq!(a.len(), ENDED_CALLS_KEPT);
        assert_eq!(a[0].from, format!("+1{}", ENDED_CALLS_KEPT + 2));
        assert_eq!(ended.of("b").len(), 1);
        assert!(ended.of("c").is_empty());
    }
}
