//! Frame storage for the hot path, so that a 20 ms frame costs no allocation:
//! - [`SampleFrame`]s, the samples legs and calls hand each other, taken from a [`SamplePool`]
//!   of buffers that come back once the receiver has dropped them;
//! - [`frame_bytes`] and [`json_bytes`]: s16le audio and JSON text for a WebSocket, split off a
//!   [`FramePool`]'s blocks.

use bytes::{BufMut, Bytes};
use std::ops::Deref;
use std::sync::Arc;
use telcoflow_proto::audio::pcm_to_samples;
use telcoflow_proto::media::MediaServerFrame;
use telcoflow_proto::pool::FramePool;

/// Buffers a [`SamplePool`] keeps: more than any queue a frame waits in (a call's data queue
/// and a simulated phone's hold 64 frames each), so that a pool in steady use allocates nothing.
/// Frames beyond it, while all are out, get a buffer of their own.
const SAMPLE_POOL_FRAMES: usize = 80;

/// Samples a [`SamplePool`] buffer holds without growing: two 20 ms frames at 24 kHz.
const SAMPLE_BUFFER_CAPACITY: usize = 2 * 480;

/// Mono samples at the rate of the leg they come from or go to, usually one 20 ms frame.
/// Cloning shares the samples; the buffer returns to its pool when the last clone is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SampleFrame(Arc<Vec<i16>>);

impl Deref for SampleFrame {
    type Target = [i16];

    fn deref(&self) -> &[i16] {
        &self.0
    }
}

/// Buffers for [`SampleFrame`]s, reused once every frame made from them is dropped.
#[derive(Debug, Default)]
pub(crate) struct SamplePool {
    buffers: Vec<Arc<Vec<i16>>>,
    /// Where to look for a free buffer first: the one after the latest taken, since frames
    /// are consumed in the order they were sent.
    next: usize,
}

impl SamplePool {
    /// A frame holding a copy of `samples`.
    pub(crate) fn frame(&mut self, samples: &[i16]) -> SampleFrame {
        self.frame_with(|buf| {
            buf.clear();
            buf.extend_from_slice(samples);
        })
    }

    /// A frame holding the samples of s16le `pcm` (a trailing odd byte is ignored).
    pub(crate) fn frame_from_pcm(&mut self, pcm: &[u8]) -> SampleFrame {
        self.frame_with(|buf| pcm_to_samples(pcm, buf))
    }

    fn frame_with(&mut self, fill: impl FnOnce(&mut Vec<i16>)) -> SampleFrame {
        let n = self.buffers.len();
        for i in 0..n {
            let at = (self.next + i) % n;
            // `get_mut` succeeds only when no frame of this buffer is alive anywhere.
            if let Some(buf) = Arc::get_mut(&mut self.buffers[at]) {
                fill(buf);
                self.next = (at + 1) % n;
                return SampleFrame(self.buffers[at].clone());
            }
        }
        // Room for two frames at the highest rate: a resampler hands out frames of varying
        // length, and a buffer sized by its first, shorter frame grew when it came back for a
        // longer one.
        let mut buf = Vec::with_capacity(SAMPLE_BUFFER_CAPACITY);
        fill(&mut buf);
        let buf = Arc::new(buf);
        if n < SAMPLE_POOL_FRAMES {
            self.buffers.push(buf.clone());
        }
        SampleFrame(buf)
    }
}

/// Frames a pool's block holds. Each pool has two blocks, so frames must be gone within 32
/// frames (640 ms) of being sent for the blocks to be reused.
const POOL_FRAMES: usize = 32;

/// An s16le frame (with a channel byte first, for the media connection) split off `pool`,
/// whose blocks hold [`POOL_FRAMES`] frames.
pub(crate) fn frame_bytes(pool: &mut FramePool, channel: Option<u8>, samples: &[i16]) -> Bytes {
    let len = usize::from(channel.is_some()) + samples.len() * 2;
    let block = pool.with_room(len, len * POOL_FRAMES);
    if let Some(channel) = channel {
        block.put_u8(channel);
    }
    // Sized once and filled in one vectorised pass; `put_i16_le` per sample re-checked the
    // length for each one and was the server's costliest function of its own.
    let start = block.len();
    block.resize(start + samples.len() * 2, 0);
    telcoflow_proto::audio::write_pcm(samples, &mut block[start..]);
    block.split().freeze()
}

/// Bytes of a text pool's block: some 20 `buffer_request`s (about 90 bytes each).
const TEXT_POOL_BYTES: usize = 2048;
/// Room a text pool must have left to encode a `buffer_request` without growing.
const TEXT_FRAME_ROOM: usize = 256;

/// `frame` as JSON, split off `pool` like [`frame_bytes`] does for audio.
pub(crate) fn json_bytes(pool: &mut FramePool, frame: &MediaServerFrame) -> Bytes {
    let block = pool.with_room(TEXT_FRAME_ROOM, TEXT_POOL_BYTES);
    if serde_json::to_writer((&mut *block).writer(), frame).is_err() {
        // Cannot happen (the writer is memory, every map key is a string); send what
        // `MediaServerFrame::encode` sends in that case.
        block.clear();
        block.put_slice(b"{}");
    }
    block.split().freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use telcoflow_proto::media::{BufferRequest, CHANNEL_CALLER, CHANNEL_MIXED};

    #[test]
    fn json_is_encoded_into_the_pool() {
        let mut pool = FramePool::default();
        let frame = MediaServerFrame::BufferRequest(BufferRequest {
            requested_bytes: 1920,
            prefer_audio_frame_bytes: 960,
            channel_id: CHANNEL_MIXED,
        });
        let first = json_bytes(&mut pool, &frame);
        assert_eq!(&first[..], frame.encode().as_bytes());
        let second = json_bytes(&mut pool, &frame);
        assert_eq!(first, second);
        assert_eq!(first.as_ptr().wrapping_add(first.len()), second.as_ptr());
    }

    #[test]
    fn pool_blocks_are_reused_once_their_frames_are_gone() {
        let mut pool = FramePool::default();
        let samples = [5i16; 480];
        let mut take = || frame_bytes(&mut pool, None, &samples);
        // Frames are dropped at once, as they are once sent; a block holds POOL_FRAMES.
        let a = take().as_ptr();
        for _ in 1..POOL_FRAMES {
            take();
        }
        let b = take().as_ptr();
        for _ in 1..POOL_FRAMES {
            take();
        }
        assert_eq!(take().as_ptr(), a, "block A is taken back");
        for _ in 1..POOL_FRAMES {
            take();
        }
        let held = take();
        assert_eq!(held.as_ptr(), b, "then block B");
        for _ in 1..2 * POOL_FRAMES {
            take();
        }
        // A frame of B is still alive (a peer far behind): a new block takes B's place.
        assert_ne!(take().as_ptr(), b);
        assert_eq!(&held[..2], &[5, 0]);
    }

    #[test]
    fn frames_are_split_from_one_block() {
        let mut pool = FramePool::default();
        let samples = [1i16, -2, 3];
        let first = frame_bytes(&mut pool, Some(CHANNEL_CALLER), &samples);
        assert_eq!(&first[..], &[1, 1, 0, 0xfe, 0xff, 3, 0]);
        let second = frame_bytes(&mut pool, None, &samples);
        assert_eq!(&second[..], &[1, 0, 0xfe, 0xff, 3, 0]);
        // Both came out of the same block: the second starts where the first ends.
        assert_eq!(first.as_ptr().wrapping_add(first.len()), second.as_ptr());
        // A block holds POOL_FRAMES frames before the allocator is asked again.
        let mut last = second;
        for _ in 2..POOL_FRAMES {
            let next = frame_bytes(&mut pool, None, &samples);
            assert_eq!(last.as_ptr().wrapping_add(last.len()), next.as_ptr());
            last = next;
        }
    }

    #[test]
    fn sample_buffers_are_reused_once_their_frames_are_gone() {
        let mut pool = SamplePool::default();
        let first = pool.frame(&[1, 2, 3]);
        let at = first.as_ptr();
        assert_eq!(&first[..], &[1, 2, 3]);
        // Still alive: the next frame needs a buffer of its own.
        let second = pool.frame(&[4, 5]);
        assert_ne!(second.as_ptr(), at);
        drop(first);
        drop(second);
        let third = pool.frame_from_pcm(&[6, 0, 0xff, 0xff, 7]);
        assert_eq!(&third[..], &[6, -1]);
        assert_eq!(third.as_ptr(), at, "the first buffer came back");
        assert_eq!(pool.buffers.len(), 2);
    }

    #[test]
    fn a_pool_whose_frames_are_all_held_stops_growing() {
        let mut pool = SamplePool::default();
        let held: Vec<_> = (0..SAMPLE_POOL_FRAMES + 5)
            .map(|i| pool.frame(&[i as i16]))
            .collect();
        assert_eq!(pool.buffers.len(), SAMPLE_POOL_FRAMES);
        assert!(held.iter().enumerate().all(|(i, f)| f[..] == [i as i16]));
    }
}
