//! The call as the rest of the server sees it: a [`CallHandle`] to reach its actor, the
//! [`CallInput`]s it takes, and how it talks to its agent's media connection ([`MediaLink`],
//! [`MediaOut`], [`AttachError`]). Nothing here knows the actor itself, so the registry and the
//! networks can hold handles without importing the call logic.

use super::leg::{LegEvent, LegId};
use super::live::CallLive;
use bytes::Bytes;
use std::sync::Arc;
use telcoflow_proto::control::{CloseReason, SetupData};
use telcoflow_proto::media::Command;
use telcoflow_proto::stats::CallStats;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::warn;

/// Capacity of a call's lifecycle queue. Lifecycle events are few per call.
const CONTROL_QUEUE: usize = 64;
/// Capacity of a call's audio/command queue: a few frames from each party.
const DATA_QUEUE: usize = 64;
/// Stats requests a call answers at once; more fail fast with [`StatsError::Busy`].
const STATS_IN_FLIGHT: usize = 2;
/// Lifecycle queue slots a stats request never takes: they stay for the inputs that matter
/// (claims, detaches, hangups), whose senders drop them when the queue is full.
const CONTROL_RESERVED: usize = 8;

/// The receiving ends of a call's two queues, for its actor: lifecycle, then data.
pub(super) type Queues = (mpsc::Receiver<CallInput>, mpsc::Receiver<CallInput>);
/// A way to reach a call's actor. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct CallHandle {
    pub(crate) call_id: Arc<str>,
    pub(crate) session_id: Arc<str>,
    pub(crate) from: Arc<str>,
    pub(crate) to: Arc<str>,
    /// The uuid of the connector the call belongs to (empty for a test's detached handle).
    pub(crate) connector: Arc<str>,
    /// What the console shows of the call while it runs.
    pub(crate) live: Arc<CallLive>,
    control: mpsc::Sender<CallInput>,
    data: mpsc::Sender<CallInput>,
    /// Bounds the stats requests in the call's lifecycle queue (see [`Self::stats`]).
    stats_permits: Arc<Semaphore>,
}

/// Why a call gave no quality figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatsError {
    /// The call has ended.
    Ended,
    /// The call is answering as many stats requests as it takes at once, or its lifecycle
    /// queue is busy: ask again shortly.
    Busy,
}

impl CallHandle {
    /// A handle for a new call (fresh call and session ids) and the queues its actor reads.
    pub(super) fn new(from: &str, to: &str, connector: &str) -> (Self, Queues) {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let handle = Self {
            call_id: uuid::Uuid::new_v4().to_string().into(),
            session_id: uuid::Uuid::new_v4().to_string().into(),
            from: from.into(),
            to: to.into(),
            connector: connector.into(),
            live: Arc::new(CallLive::new()),
            control: control_tx,
            data: data_tx,
            stats_permits: Arc::new(Semaphore::new(STATS_IN_FLIGHT)),
        };
        (handle, (control_rx, data_rx))
    }

    /// A handle whose actor is gone, for tests of what only keeps or passes handles.
    #[cfg(test)]
    pub(crate) fn detached(from: &str, to: &str) -> Self {
        Self::new(from, to, "").0
    }

    /// Queues a lifecycle input without waiting. Returns false if the call has ended.
    pub(crate) fn send(&self, input: CallInput) -> bool {
        match self.control.try_send(input) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(call_id = %self.call_id, "call lifecycle queue full");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a lifecycle input, waiting for room: for async callers that must not lose it.
    /// Returns false if the call has ended.
    pub(crate) async fn send_wait(&self, input: CallInput) -> bool {
        self.control.send(input).await.is_ok()
    }

    /// Queues audio or a command, waiting for room. Returns false if the call has ended.
    pub(crate) async fn send_data(&self, input: CallInput) -> bool {
        self.data.send(input).await.is_ok()
    }

    /// The call's quality figures so far (see [`CallStats`]).
    ///
    /// The actor answers between two inputs from a snapshot of its counters and of what its
    /// legs' tasks published last: nothing waits on the audio path, and the audio path waits
    /// on nothing here. For the HTTP API and any view of running calls.
    ///
    /// The request shares the lifecycle queue with inputs that are dropped when it is full,
    /// so it never waits for room: at most [`STATS_IN_FLIGHT`] at once per call, and never in
    /// the queue's last [`CONTROL_RESERVED`] slots; otherwise [`StatsError::Busy`] at once.
    pub(crate) async fn stats(&self) -> Result<CallStats, StatsError> {
        if self.is_ended() {
            return Err(StatsError::Ended);
        }
        let Ok(_permit) = self.stats_permits.try_acquire() else {
            return Err(StatsError::Busy);
        };
        if self.control.capacity() <= CONTROL_RESERVED {
            return Err(StatsError::Busy);
        }
        let (reply, answer) = oneshot::channel();
        match self.control.try_send(CallInput::Stats { reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(StatsError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(StatsError::Ended),
        }
        // Dropped unanswered when the call ends meanwhile.
        answer.await.map_err(|_| StatsError::Ended)
    }

    /// Whether the call's actor has finished.
    pub(crate) fn is_ended(&self) -> bool {
        self.control.is_closed()
    }
}

/// How a call reaches its agent's media connection.
#[derive(Debug)]
pub(crate) struct MediaLink {
    pub(crate) conn_id: u64,
    pub(crate) tx: mpsc::Sender<MediaOut>,
}

/// From a call to its media connection.
#[derive(Debug)]
pub(crate) enum MediaOut {
    Text(String),
    /// A text frame already encoded as JSON (so valid UTF-8), split from pooled storage: the
    /// `buffer_request`s, which go out every 40 ms, cost no allocation.
    Json(Bytes),
    /// A `command_response`: the media connection counts commands in flight by these.
    Response(String),
    Audio(Bytes),
    /// A WebSocket ping carrying its number: the call asks whether the agent is alive, or
    /// measures its round trip (the pong comes back as [`CallInput::MediaPong`]).
    Ping(u32),
    /// Close the connection (after sending what is queued).
    Close,
}

/// Why a media connection could not attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AttachError {
    #[error("a media connection is already open for this call")]
    AlreadyAttached,
    #[error("the agent has left this call")]
    AgentLeft,
    /// Only an agent coming back after a lost connection may use an expired token.
    #[error("media token has expired")]
    TokenExpired,
}

/// Everything a call reacts to.
#[derive(Debug)]
pub(crate) enum CallInput {
    /// A control connection claimed the session; its setup fixes the agent's audio format.
    Claimed { setup: SetupData },
    /// A media connection wants to attach.
    MediaAttach {
        link: MediaLink,
        /// Its token is genuine but past its lifetime.
        token_expired: bool,
        reply: oneshot::Sender<Result<(), AttachError>>,
    },
    /// A media connection went away. `agent_closed`: the agent closed it itself, with a
    /// WebSocket close frame (the Rust SDK when its client shuts down), rather than losing it.
    MediaDetach { conn_id: u64, agent_closed: bool },
    /// A command from the media connection.
    Command { conn_id: u64, command: Command },
    /// Agent audio (channel 0) from the media connection.
    AgentAudio { conn_id: u64, pcm: Bytes },
    /// The media connection got a pong: the agent's side is alive.
    /// `seq`: the number the ping carried, if the pong echoed one.
    MediaPong { conn_id: u64, seq: Option<u32> },
    /// Something from a leg.
    Leg { leg: LegId, event: LegEvent },
    /// Report the call's quality figures so far.
    Stats { reply: oneshot::Sender<CallStats> },
    /// End the call from outside (HTTP close); `done` hears when it has ended.
    Close {
        reason: CloseReason,
        done: Option<oneshot::Sender<()>>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::Poll;

    /// Polls a future once: whether it finished and how.
    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        let waker = futures_util::task::noop_waker();
        f.poll(&mut std::task::Context::from_waker(&waker))
    }

    #[test]
    fn stats_requests_are_bounded_and_leave_the_queue_room() {
        // An actor that does not answer (yet): its queues are alive, nobody reads them.
        let (call, (mut control, _data)) = CallHandle::new("a", "b", "c");
        // Boxed, so that dropping one drops the request (and its permit).
        let mut first = Box::pin(call.stats());
        let mut second = Box::pin(call.stats());
        assert!(poll_once(first.as_mut()).is_pending());
        assert!(poll_once(second.as_mut()).is_pending());
        // A third one fails at once, and queues nothing.
        assert_eq!(
            poll_once(pin!(call.stats())),
            Poll::Ready(Err(StatsError::Busy))
        );
        assert_eq!(control.len(), 2);
        // The actor answers one: room for another.
        let Some(CallInput::Stats { reply }) = control.try_recv().ok() else {
            panic!("a stats request");
        };
        let stats = CallStats {
            call_id: call.call_id.to_string(),
            session_id: call.session_id.to_string(),
            duration_ms: 0,
            legs: Vec::new(),
            agent: Default::default(),
        };
        reply.send(stats).unwrap();
        assert!(matches!(poll_once(first.as_mut()), Poll::Ready(Ok(_))));
        drop(first);
        let mut third = Box::pin(call.stats());
        assert!(poll_once(third.as_mut()).is_pending());
        drop((second, third));
        while control.try_recv().is_ok() {}
        // Both permits are back.
        let mut again = Box::pin(call.stats());
        assert!(poll_once(again.as_mut()).is_pending());
        drop(again);
        while control.try_recv().is_ok() {}

        // A lifecycle queue with only its reserved slots left takes no stats request.
        for _ in 0..CONTROL_QUEUE - CONTROL_RESERVED {
            assert!(call.send(CallInput::MediaDetach {
                conn_id: 1,
                agent_closed: false,
            }));
        }
        assert_eq!(
            poll_once(pin!(call.stats())),
            Poll::Ready(Err(StatsError::Busy))
        );
        assert_eq!(control.len(), CONTROL_QUEUE - CONTROL_RESERVED);

        // An ended call says so.
        drop(control);
        assert_eq!(
            poll_once(pin!(call.stats())),
            Poll::Ready(Err(StatsError::Ended))
        );
    }
}
