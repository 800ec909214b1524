//! What a [`TelcoflowClient`](crate::TelcoflowClient) reports to the application.

use crate::call::{ActiveCall, AudioChannel};
use crate::error::ServerCode;
use futures_util::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use telcoflow_proto::control::{Activity, Channel, CloseReason};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A session offered to this connector (see [`ClientEvent::SessionNotification`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionNotification {
    /// Session id, for [`TelcoflowClient::open_session`](crate::TelcoflowClient::open_session).
    pub session_id: String,
    /// Call or messaging.
    pub channel: Channel,
    /// The far party (the caller's number).
    pub remote_address: String,
    /// Our party (the called number).
    pub local_address: String,
    /// Why it is offered.
    pub activity: Activity,
    /// Unix seconds when the server sent the notification.
    pub created_at: u64,
}

/// Something that happened to the client or one of its calls.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The control connection is up (after every successful setup).
    Connected {
        /// The server's id of this control connection.
        sm_ws_id: String,
    },
    /// The control connection is down; the client reconnects by itself.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The client waits `delay` before reconnection attempt `attempt` (1-based).
    Reconnecting {
        /// Attempt number since the connection was lost.
        attempt: u32,
        /// Backoff delay before it.
        delay: Duration,
    },
    /// The control connection is back (follows the `Connected` of a reconnection).
    Reconnected,
    /// A call for this client: its media connection is already open unless
    /// `auto_connect_media(false)` was configured.
    IncomingCall(ActiveCall),
    /// A session waits to be claimed: every session in [`SessionMode::Manual`](crate::SessionMode),
    /// messaging sessions only in `Auto`.
    SessionNotification(SessionNotification),
    /// A session ended.
    SessionClosed {
        /// The session.
        session_id: String,
        /// Why.
        reason: CloseReason,
    },
    /// The server reported an error on a call (the call may go on), or a call's media
    /// connection could not be opened (the call is not delivered; `code` is `None`).
    CallError {
        /// The call.
        call_id: String,
        /// The server's code, e.g. `TTS_SESSION_ERROR`.
        code: Option<ServerCode>,
        /// The server's message.
        message: Option<String>,
    },
    /// Received audio of a call was dropped because the application did not read it fast enough.
    AudioOverflow {
        /// The call.
        call_id: String,
        /// The channel.
        channel: AudioChannel,
        /// Chunks dropped on that call so far.
        dropped: u64,
    },
}

/// The client's events as a stream; ends after shutdown.
#[derive(Debug)]
pub struct ClientEvents {
    pub(crate) inner: ReceiverStream<ClientEvent>,
}

impl ClientEvents {
    pub(crate) fn new(rx: mpsc::Receiver<ClientEvent>) -> Self {
        Self {
            inner: ReceiverStream::new(rx),
        }
    }
}

impl Stream for ClientEvents {
    type Item = ClientEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientEvent>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
