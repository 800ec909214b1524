//! Received audio: the [`AudioChannel`]s of a call and their [`AudioStream`]s.

use super::event::CallEvent;
use super::{CallCore, emit, emit_client};
use crate::event::ClientEvent;
use bytes::Bytes;
use futures_util::Stream;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::task::{Context, Poll};
use telcoflow_proto::media::{self, AudioFrame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::warn;

/// An audio channel of a call: the call mixed, or one party alone (the server sends those in
/// [`AudioMode::Isolated`](crate::AudioMode)).
///
/// On the wire a channel is a number, the first byte of every binary frame:
/// [`AudioChannel::id`] gives it and `AudioChannel::from(u8)` reads it back. Agent audio goes
/// out on [`AudioChannel::Mixed`] only.
///
/// ```
/// use telcoflow::AudioChannel;
///
/// assert_eq!(AudioChannel::from(1), AudioChannel::Caller);
/// assert_eq!(AudioChannel::Callee.id(), 2);
/// assert_eq!(AudioChannel::from(7), AudioChannel::Other(7));
/// ```
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub enum AudioChannel {
    /// Channel 0: everything the agent hears, mixed (the only channel in mixed mode).
    #[default]
    Mixed,
    /// Channel 1 (isolated mode): the caller alone.
    Caller,
    /// Channel 2 (isolated mode): the connected callee alone (after `connect`).
    Callee,
    /// A channel this SDK has no name for (3 and up). `Other(1)` is the same channel as
    /// `Caller`, and compares equal to it.
    Other(u8),
}

impl AudioChannel {
    /// The channel number on the wire.
    pub const fn id(self) -> u8 {
        match self {
            Self::Mixed => media::CHANNEL_MIXED,
            Self::Caller => media::CHANNEL_CALLER,
            Self::Callee => media::CHANNEL_CALLEE,
            Self::Other(id) => id,
        }
    }
}

impl From<u8> for AudioChannel {
    fn from(id: u8) -> Self {
        match id {
            media::CHANNEL_MIXED => Self::Mixed,
            media::CHANNEL_CALLER => Self::Caller,
            media::CHANNEL_CALLEE => Self::Callee,
            other => Self::Other(other),
        }
    }
}

impl From<AudioChannel> for u8 {
    fn from(channel: AudioChannel) -> Self {
        channel.id()
    }
}

// By number, so that `Other(1)` and `Caller` are one channel.
impl PartialEq for AudioChannel {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for AudioChannel {}

impl Hash for AudioChannel {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id().hash(state);
    }
}

impl fmt::Display for AudioChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mixed => f.write_str("mixed"),
            Self::Caller => f.write_str("caller"),
            Self::Callee => f.write_str("callee"),
            Self::Other(id) => write!(f, "channel {id}"),
        }
    }
}

/// PCM chunks of one channel of a call; ends when the call ends.
#[derive(Debug)]
pub struct AudioStream {
    inner: ReceiverStream<Bytes>,
}

impl AudioStream {
    fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self {
            inner: ReceiverStream::new(rx),
        }
    }
}

impl Stream for AudioStream {
    type Item = Bytes;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The received channels of a call, keyed by their wire number.
pub(super) struct Channels {
    slots: HashMap<u8, ChannelSlot>,
    /// The media connection has ended: new streams end at once.
    finished: bool,
    pub(super) dropped_total: u64,
    capacity: usize,
}

struct ChannelSlot {
    /// `None` once the call has ended, which ends the stream after what it holds.
    tx: Option<mpsc::Sender<Bytes>>,
    /// Receiver not handed out yet (the mixed channel buffers from the start).
    rx: Option<mpsc::Receiver<Bytes>>,
    overflowing: bool,
}

impl Channels {
    /// The mixed channel buffering already; every channel holds up to `capacity` chunks.
    pub(super) fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        let mut slots = HashMap::new();
        slots.insert(
            AudioChannel::Mixed.id(),
            ChannelSlot {
                tx: Some(tx),
                rx: Some(rx),
                overflowing: false,
            },
        );
        Self {
            slots,
            finished: false,
            dropped_total: 0,
            capacity,
        }
    }

    /// The stream of `channel`; an earlier stream of it ends.
    pub(super) fn stream(&mut self, channel: AudioChannel) -> AudioStream {
        let id = channel.id();
        if let Some(rx) = self.slots.get_mut(&id).and_then(|slot| slot.rx.take()) {
            return AudioStream::new(rx);
        }
        if self.finished {
            return AudioStream::new(mpsc::channel(1).1);
        }
        let (tx, rx) = mpsc::channel(self.capacity);
        self.slots.insert(
            id,
            ChannelSlot {
                tx: Some(tx),
                rx: None,
                overflowing: false,
            },
        );
        AudioStream::new(rx)
    }

    /// Ends every stream: handed-out streams end after what they hold; a stream not handed
    /// out yet keeps its buffered audio for a later `audio_stream`.
    pub(super) fn finish(&mut self) {
        self.finished = true;
        self.slots.retain(|_, slot| slot.rx.is_some());
        for slot in self.slots.values_mut() {
            slot.tx = None;
        }
    }
}

/// Hands one received binary frame to its channel's stream.
pub(super) fn on_audio(core: &CallCore, data: Bytes) {
    let frame = match AudioFrame::decode(&data) {
        Ok(f) => f,
        Err(_) => return,
    };
    let id = frame.channel;
    let mut ch = core.channels.lock();
    let Some(slot) = ch.slots.get_mut(&id) else {
        return;
    };
    let Some(tx) = slot.tx.as_ref() else {
        return;
    };
    match tx.try_send(data.slice(1..)) {
        Ok(()) => slot.overflowing = false,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            ch.slots.remove(&id);
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            let first = !slot.overflowing;
            slot.overflowing = true;
            ch.dropped_total += 1;
            let dropped = ch.dropped_total;
            drop(ch);
            if first {
                let channel = AudioChannel::from(id);
                // Report once per overflow episode, not per chunk.
                warn!(
                    %channel,
                    dropped, "received audio dropped: channel not read fast enough"
                );
                emit(core, CallEvent::AudioOverflow { channel, dropped });
                emit_client(
                    core,
                    ClientEvent::AudioOverflow {
                        call_id: core.id.clone(),
                        channel,
                        dropped,
                    },
                );
            }
        }
    }
}
