//! Pull-based flow control: the server asks for audio with `buffer_request`s, and the call
//! answers each in order with frames of the size it prefers, taken from the call's ring buffer
//! as the application queues audio. A mark the application placed goes out in its place in
//! the stream: after the frames carrying the audio before it (the last of them cut short at
//! the mark), before any audio after it, whether or not the server is asking for audio.

use crate::ring::{RingBuffer, RingMark};
use bytes::{BufMut, Bytes};
use std::collections::VecDeque;
use std::task::{Context, Poll};
use telcoflow_proto::media::{self, BufferRequest};
use telcoflow_proto::pool::FramePool;
use tracing::trace;

/// Buffer requests kept in order before further ones are merged into the last one.
const MAX_QUEUED_REQUESTS: usize = 256;

/// Bytes of one block of the outgoing frames' [`FramePool`]: two frames of 20 ms at 24 kHz, six at 8 kHz. Small,
/// because both blocks of every call stay resident: larger blocks cost agent memory per call
/// and save nothing once the two blocks take turns.
const FRAME_POOL_BYTES: usize = 2 * 1024;

/// What goes out next on the media connection from the ring buffer.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// A binary audio frame, channel byte included.
    Audio(Bytes),
    /// A mark whose audio has all been sent: `agent.mark` goes out now.
    Mark(RingMark),
}

/// Answers buffer requests in order with frames of the preferred size, each frame waiting for
/// the application's audio.
pub(super) struct FlowControl {
    /// The server's requests not begun yet, oldest first.
    requests: VecDeque<BufferRequest>,
    pool: FramePool,
    /// A frame never exceeds the ring buffer, whatever the server asks for: the buffer could
    /// never fill it, and a hostile size must not drive the allocation below.
    max_frame: usize,
    /// Bytes still owed on the request being answered.
    owed: usize,
    /// Its preferred frame size.
    frame_bytes: usize,
}

impl FlowControl {
    pub(super) fn new(ring_capacity: usize) -> Self {
        Self {
            requests: VecDeque::new(),
            pool: FramePool::default(),
            max_frame: ring_capacity,
            owed: 0,
            frame_bytes: media::DEFAULT_PREFER_FRAME_BYTES,
        }
    }

    /// Drops the requests of a connection that is gone, and what was owed on them.
    pub(super) fn forget_requests(&mut self) {
        self.requests.clear();
        self.owed = 0;
    }

    /// Queues one of the server's requests.
    pub(super) fn request(&mut self, req: BufferRequest) {
        let full = self.requests.len() >= MAX_QUEUED_REQUESTS;
        match self.requests.back_mut() {
            // Past the cap, merge into the last request so the queue stays bounded; the
            // bytes owed are the same, only frame boundaries may differ.
            Some(last) if full => {
                last.requested_bytes = last.requested_bytes.saturating_add(req.requested_bytes);
            }
            _ => self.requests.push_back(req),
        }
    }

    /// The next frame to send, once the server has asked for it and the application has
    /// queued it; `None` once the ring buffer is closed (the call ended).
    ///
    /// Waiting for a request needs no wake-up for the request itself: requests come in through
    /// the driver's reader, which runs before this in every poll. It waits on the ring buffer
    /// only to learn that it closed. Audio is taken from the ring buffer only in the poll that
    /// returns it.
    pub(super) fn poll_next_frame(
        &mut self,
        cx: &mut Context<'_>,
        ring: &RingBuffer,
    ) -> Poll<Option<Outgoing>> {
        if let Some(mark) = ring.take_due_mark() {
            return Poll::Ready(Some(Outgoing::Mark(mark)));
        }
        while self.owed == 0 {
            match self.requests.pop_front() {
                Some(req) => {
                    self.owed = req.requested_bytes as usize;
                    self.frame_bytes = match req.prefer_audio_frame_bytes as usize {
                        0 => media::DEFAULT_PREFER_FRAME_BYTES,
                        n => n,
                    };
                }
                None => return ring.poll_closed(cx).map(|()| None),
            }
        }
        let want = self.frame_bytes.min(self.owed).min(self.max_frame);
        let block = self.pool.with_room(1 + want, FRAME_POOL_BYTES);
        // A poll that found too little audio left its channel byte behind.
        block.clear();
        block.put_u8(media::CHANNEL_MIXED);
        let n = std::task::ready!(ring.poll_read(cx, want, want, block));
        if n == 0 {
            return Poll::Ready(None);
        }
        trace!(bytes = n, "audio frame");
        self.owed -= n;
        Poll::Ready(Some(Outgoing::Audio(block.split().freeze())))
    }
}
