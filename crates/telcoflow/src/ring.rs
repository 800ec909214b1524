//! The outgoing audio buffer of a call.
//!
//! The application writes PCM with [`RingBuffer::write_all`] (never blocks, all or nothing) and
//! the flow-control sender takes it out with [`RingBuffer::read`] when the server asks for
//! audio. A short mutex guards the state; each byte is copied once in (from the caller's slice)
//! and once out (into the frame that goes on the wire).
//!
//! Storage is a queue of fixed-size segments, taken as audio is queued and given back as it
//! is sent, so that a call's memory follows what it has queued, not the most it ever queued:
//! a long synthesised answer queued at once (10 s at 24 kHz is 480 KB) is released once it
//! has played instead of staying resident for the rest of the call. A steady stream stays in
//! the first segment or two and a spare, so it allocates nothing.
//!
//! Marks ([`RingBuffer::mark`]) sit between two bytes of the queue: a read never crosses one,
//! so the audio before a mark leaves in frames of its own, and the mark is then due
//! ([`RingBuffer::take_due_mark`]) before any byte after it.
//!
//! Private to the crate. `benches/ring.rs` compiles this same file into the benchmark, so it
//! uses nothing else of the crate.

use bytes::BufMut;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Context, Poll};

/// Bytes per segment: 170 ms of 24 kHz audio, eight 20 ms frames.
const SEGMENT: usize = 8 * 1024;
/// Emptied segments kept for reuse: one is enough for a queue crossing segment boundaries (the
/// front one is given back as the tail needs a new one) not to allocate per frame.
const SPARES: usize = 1;

/// Why a write to the [`RingBuffer`] was refused; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// The whole write does not fit.
    Full {
        /// Bytes the write needed.
        requested: usize,
        /// Bytes that were free.
        free: usize,
    },
    /// The buffer is closed: the call has ended.
    Closed,
}

/// A named place in the outgoing audio (`ActiveCall::mark`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RingMark {
    /// The call's number for the mark.
    pub(crate) id: u64,
    pub(crate) name: Box<str>,
}

/// What [`RingBuffer::clear`] dropped.
#[derive(Debug, Default)]
pub(crate) struct Cleared {
    pub(crate) bytes: usize,
    /// The marks among them, oldest first.
    pub(crate) marks: Vec<RingMark>,
}

/// A bounded single-consumer byte queue for outgoing audio.
#[derive(Debug)]
pub(crate) struct RingBuffer {
    state: Mutex<State>,
    /// The one reader, woken on write and on close. It registers before it looks at the
    /// state, so a write between its look and its wait still wakes it.
    reader: AtomicWaker,
}

#[derive(Debug)]
struct State {
    /// The queued bytes start at `head` in the first segment and run on through the next.
    segments: VecDeque<Box<[u8]>>,
    spares: Vec<Box<[u8]>>,
    /// Size of every segment: [`SEGMENT`], or the capacity when that is smaller.
    segment: usize,
    capacity: usize,
    /// Offset of the oldest byte in the first segment.
    head: usize,
    /// Bytes stored.
    len: usize,
    closed: bool,
    /// Bytes ever read: the stream offset of the oldest byte queued.
    read: u64,
    /// Marks not yet taken, oldest first, each at the stream offset it goes before.
    marks: VecDeque<(u64, RingMark)>,
}

impl State {
    /// Makes room for `n` more bytes after the queued ones.
    fn reserve(&mut self, n: usize) {
        let needed = (self.head + self.len + n).div_ceil(self.segment);
        while self.segments.len() < needed {
            let seg = self
                .spares
                .pop()
                .unwrap_or_else(|| vec![0; self.segment].into_boxed_slice());
            self.segments.push_back(seg);
        }
    }

    /// Gives back the first segment once everything in it was read.
    fn release_front(&mut self) {
        if let Some(seg) = self.segments.pop_front() {
            self.give_back(seg);
        }
        self.head = 0;
    }

    /// Once empty: back to the start of one segment, the others given back.
    fn reset(&mut self) {
        self.head = 0;
        while self.segments.len() > 1 {
            if let Some(seg) = self.segments.pop_back() {
                self.give_back(seg);
            }
        }
    }

    /// Keeps an emptied segment as a spare, or frees it.
    fn give_back(&mut self, seg: Box<[u8]>) {
        if self.spares.len() < SPARES {
            self.spares.push(seg);
        }
    }
}

impl RingBuffer {
    /// A buffer of `capacity` bytes, rounded up to a power of two (at least 2). Memory is
    /// taken as audio is queued, not up front.
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(2).next_power_of_two();
        Self {
            state: Mutex::new(State {
                segments: VecDeque::new(),
                spares: Vec::new(),
                segment: SEGMENT.min(capacity),
                capacity,
                head: 0,
                len: 0,
                closed: false,
                read: 0,
                marks: VecDeque::new(),
            }),
            reader: AtomicWaker::new(),
        }
    }

    /// Total capacity in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.state.lock().capacity
    }

    /// Bytes waiting to be sent.
    pub(crate) fn len(&self) -> usize {
        self.state.lock().len
    }

    /// True when nothing is queued.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once [`RingBuffer::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Bytes of storage held now (queued audio, rounded up to segments, and spares).
    #[cfg(test)]
    pub(crate) fn resident(&self) -> usize {
        let s = self.state.lock();
        (s.segments.len() + s.spares.len()) * s.segment
    }

    /// Appends all of `data`, or nothing: [`WriteError::Full`] when it does not fit,
    /// [`WriteError::Closed`] after close.
    pub(crate) fn write_all(&self, data: &[u8]) -> Result<(), WriteError> {
        if data.is_empty() {
            return if self.is_closed() {
                Err(WriteError::Closed)
            } else {
                Ok(())
            };
        }
        {
            let mut s = self.state.lock();
            if s.closed {
                return Err(WriteError::Closed);
            }
            let free = s.capacity - s.len;
            if data.len() > free {
                return Err(WriteError::Full {
                    requested: data.len(),
                    free,
                });
            }
            s.reserve(data.len());
            let seg_size = s.segment;
            let mut at = s.head + s.len;
            let mut rest = data;
            while !rest.is_empty() {
                let (i, off) = (at / seg_size, at % seg_size);
                let n = rest.len().min(seg_size - off);
                s.segments[i][off..off + n].copy_from_slice(&rest[..n]);
                rest = &rest[n..];
                at += n;
            }
            s.len += data.len();
        }
        self.reader.wake();
        Ok(())
    }

    /// Drops everything queued, marks included, and returns what that was.
    pub(crate) fn clear(&self) -> Cleared {
        let mut s = self.state.lock();
        let dropped = s.len;
        s.read += dropped as u64;
        s.len = 0;
        s.reset();
        Cleared {
            bytes: dropped,
            marks: s.marks.drain(..).map(|(_, m)| m).collect(),
        }
    }

    /// Places `mark` after the bytes queued so far. Fails only once closed.
    pub(crate) fn mark(&self, mark: RingMark) -> Result<(), WriteError> {
        {
            let mut s = self.state.lock();
            if s.closed {
                return Err(WriteError::Closed);
            }
            let at = s.read + s.len as u64;
            s.marks.push_back((at, mark));
        }
        self.reader.wake();
        Ok(())
    }

    /// The oldest mark, once every byte before it has been read.
    pub(crate) fn take_due_mark(&self) -> Option<RingMark> {
        let mut s = self.state.lock();
        if s.marks.front()?.0 > s.read {
            return None;
        }
        s.marks.pop_front().map(|(_, m)| m)
    }

    /// Closes the buffer: later writes fail with [`WriteError::Closed`]; a waiting reader gets
    /// what is left.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.reader.wake();
    }

    /// Ready once the buffer is closed; until then the task is woken on every write and on
    /// close.
    pub(crate) fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.reader.register(cx.waker());
        if self.is_closed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits until at least `min` bytes are queued (or the buffer is closed), then appends up to
    /// `max` of them to `out` (a `Vec<u8>`, a `BytesMut`, ...) and returns how many. Returns 0
    /// only once closed and empty. `min` is clamped to `1..=capacity` and to `max`.
    ///
    /// Cancel-safe: bytes are only taken in the same poll that returns them.
    // The media driver polls instead; the tests and the ring benchmark read with this.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) async fn read(&self, min: usize, max: usize, out: &mut impl BufMut) -> usize {
        poll_fn(|cx| self.poll_read(cx, min, max, out)).await
    }

    /// [`RingBuffer::read`] as a poll: takes the bytes when `min` are there, else registers
    /// the task to be woken by the next write or by close.
    pub(crate) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        min: usize,
        max: usize,
        out: &mut impl BufMut,
    ) -> Poll<usize> {
        if max == 0 {
            return Poll::Ready(0);
        }
        // Registered before the look, so that a write right after it wakes the task.
        self.reader.register(cx.waker());
        match self.try_read(min, max, out) {
            Some(n) => Poll::Ready(n),
            None => Poll::Pending,
        }
    }

    /// Takes up to `max` bytes if at least `min` are queued or the buffer is closed.
    fn try_read(&self, min: usize, max: usize, out: &mut impl BufMut) -> Option<usize> {
        let mut s = self.state.lock();
        // Never across a mark: the bytes before it go alone, then the mark is due.
        let to_mark = s.marks.front().map(|(at, _)| (at - s.read) as usize);
        if to_mark == Some(0) {
            return None;
        }
        let max = to_mark.map_or(max, |m| max.min(m));
        let min = min.clamp(1, s.capacity).min(max);
        if s.len < min && !s.closed {
            return None;
        }
        let n = s.len.min(max);
        s.read += n as u64;
        let mut left = n;
        while left > 0 {
            let head = s.head;
            let k = left.min(s.segment - head);
            out.put_slice(&s.segments[0][head..head + k]);
            s.head += k;
            s.len -= k;
            left -= k;
            if s.head == s.segment {
                s.release_front();
            }
        }
        if s.len == 0 {
            // Start again at the front: a steady stream then reuses the same segment (and
            // the same few pages).
            s.reset();
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn rounds_capacity_up() {
        assert_eq!(RingBuffer::new(1000).capacity(), 1024);
        assert_eq!(RingBuffer::new(1024).capacity(), 1024);
    }

    #[tokio::test]
    async fn all_or_nothing_and_wraps() {
        let ring = RingBuffer::new(8);
        ring.write_all(&[1, 2, 3, 4, 5, 6]).unwrap();
        match ring.write_all(&[7, 8, 9]) {
            Err(WriteError::Full {
                requested: 3,
                free: 2,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(ring.len(), 6, "a failed write leaves nothing behind");
        let mut out = Vec::new();
        assert_eq!(ring.read(4, 4, &mut out).await, 4);
        assert_eq!(out, [1, 2, 3, 4]);
        // Wraps around the end of the storage.
        ring.write_all(&[7, 8, 9, 10, 11, 12]).unwrap();
        assert_eq!(ring.len(), 8);
        out.clear();
        assert_eq!(ring.read(1, 100, &mut out).await, 8);
        assert_eq!(out, [5, 6, 7, 8, 9, 10, 11, 12]);
        assert!(ring.is_empty());
    }

    #[tokio::test]
    async fn memory_follows_what_is_queued() {
        let ring = RingBuffer::new(1 << 20);
        assert_eq!(ring.resident(), 0, "nothing taken up front");
        // A 10 s answer at 24 kHz, queued at once.
        let answer: Vec<u8> = (0..480_000u32).map(|i| (i % 251) as u8).collect();
        ring.write_all(&answer).unwrap();
        assert!(ring.resident() >= answer.len());
        let mut out = Vec::new();
        while out.len() < answer.len() {
            ring.read(960, 960, &mut out).await;
        }
        assert_eq!(out, answer, "in order across segments");
        assert!(
            ring.resident() <= (1 + SPARES) * SEGMENT,
            "given back once played: {}",
            ring.resident()
        );
        // The same once cleared instead of played.
        ring.write_all(&answer).unwrap();
        assert_eq!(ring.clear().bytes, answer.len());
        assert!(ring.resident() <= (1 + SPARES) * SEGMENT);
    }

    #[tokio::test]
    async fn a_queue_across_segment_boundaries_keeps_its_order() {
        let ring = RingBuffer::new(1 << 16);
        let mut next = 0u8;
        let mut expect = 0u8;
        // About 1.5 segments queued at any time, read in frames: the head crosses a segment
        // boundary every few reads.
        for _ in 0..200 {
            while ring.len() < SEGMENT * 3 / 2 {
                let chunk: Vec<u8> = (0..1000).map(|i| next.wrapping_add(i as u8)).collect();
                next = next.wrapping_add(1000u32 as u8);
                ring.write_all(&chunk).unwrap();
            }
            let mut out = Vec::new();
            ring.read(960, 960, &mut out).await;
            for b in out {
                assert_eq!(b, expect);
                expect = expect.wrapping_add(1);
            }
        }
        assert!(ring.resident() <= (3 + SPARES) * SEGMENT);
    }

    #[tokio::test]
    async fn reads_stop_at_marks_and_clear_drops_them() {
        let ring = RingBuffer::new(64);
        let mark = |id: u64| RingMark {
            id,
            name: id.to_string().into(),
        };
        // Nothing queued: the mark is due at once.
        ring.mark(mark(0)).unwrap();
        assert_eq!(ring.take_due_mark(), Some(mark(0)));
        ring.write_all(&[1; 6]).unwrap();
        ring.mark(mark(1)).unwrap();
        ring.write_all(&[2; 6]).unwrap();
        assert_eq!(ring.take_due_mark(), None, "its audio is still queued");
        let mut out = Vec::new();
        // A frame of 4 bytes, then the 2 before the mark alone, though 4 were asked for.
        assert_eq!(ring.read(4, 4, &mut out).await, 4);
        assert_eq!(ring.read(4, 4, &mut out).await, 2);
        assert_eq!(out, [1; 6]);
        assert_eq!(ring.take_due_mark(), Some(mark(1)));
        ring.mark(mark(2)).unwrap();
        let cleared = ring.clear();
        assert_eq!(cleared.bytes, 6);
        assert_eq!(cleared.marks, [mark(2)]);
        ring.write_all(&[3; 2]).unwrap();
        ring.mark(mark(3)).unwrap();
        out.clear();
        assert_eq!(ring.read(1, 8, &mut out).await, 2);
        assert_eq!(ring.take_due_mark(), Some(mark(3)));
    }

    #[tokio::test]
    async fn clear_returns_dropped_bytes() {
        let ring = RingBuffer::new(16);
        ring.write_all(&[0; 10]).unwrap();
        assert_eq!(ring.clear().bytes, 10);
        assert_eq!(ring.clear().bytes, 0);
        ring.write_all(&[1; 16]).unwrap();
        assert_eq!(ring.len(), 16);
    }

    #[tokio::test]
    async fn close_rejects_writes_and_releases_reader() {
        let ring = Arc::new(RingBuffer::new(16));
        ring.write_all(&[1, 2]).unwrap();
        let reader = {
            let ring = ring.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                let n = ring.read(4, 4, &mut out).await;
                let m = ring.read(4, 4, &mut out).await;
                (n, m, out)
            })
        };
        tokio::task::yield_now().await;
        ring.close();
        let (n, m, out) = reader.await.unwrap();
        assert_eq!((n, m), (2, 0));
        assert_eq!(out, [1, 2]);
        assert!(matches!(ring.write_all(&[1]), Err(WriteError::Closed)));
    }

    #[tokio::test]
    async fn reader_waits_for_min_bytes() {
        let ring = Arc::new(RingBuffer::new(64));
        let reader = {
            let ring = ring.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                ring.read(6, 6, &mut out).await;
                out
            })
        };
        ring.write_all(&[1, 2, 3]).unwrap();
        tokio::task::yield_now().await;
        assert!(!reader.is_finished());
        ring.write_all(&[4, 5, 6, 7]).unwrap();
        assert_eq!(reader.await.unwrap(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(ring.len(), 1);
    }

    #[tokio::test]
    async fn stream_of_bytes_survives_many_wraps() {
        let ring = Arc::new(RingBuffer::new(64));
        let writer = {
            let ring = ring.clone();
            tokio::spawn(async move {
                let mut next = 0u8;
                let mut written = 0usize;
                while written < 10_000 {
                    let chunk: Vec<u8> = (0..7).map(|i| next.wrapping_add(i)).collect();
                    match ring.write_all(&chunk) {
                        Ok(()) => {
                            next = next.wrapping_add(7);
                            written += 7;
                        }
                        Err(WriteError::Full { .. }) => tokio::task::yield_now().await,
                        Err(e) => panic!("{e:?}"),
                    }
                }
                ring.close();
            })
        };
        let mut got = Vec::new();
        loop {
            let mut out = Vec::new();
            if ring.read(5, 13, &mut out).await == 0 {
                break;
            }
            got.extend(out);
        }
        writer.await.unwrap();
        assert_eq!(got.len(), 10_003);
        for (i, b) in got.iter().enumerate() {
            assert_eq!(*b, i as u8);
        }
    }
}
