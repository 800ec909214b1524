//! The outgoing audio ring buffer of a call.
//!
//! The application writes PCM with [`RingBuffer::write_all`] (never blocks, all or nothing) and
//! the flow-control sender takes it out with [`RingBuffer::read`] when the server asks for
//! audio. Storage is one preallocated power-of-two block; a short mutex guards the indices and
//! each byte is copied once in (from the caller's slice) and once out (into the frame that goes
//! on the wire).

use crate::Error;
use bytes::BufMut;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// A bounded single-consumer byte queue for outgoing audio.
#[derive(Debug)]
pub struct RingBuffer {
    state: Mutex<State>,
    /// Wakes the one reader on write and on close. `notify_one` keeps a permit when the reader
    /// is not waiting yet, so a write between its check and its wait is not lost.
    readable: Notify,
}

#[derive(Debug)]
struct State {
    buf: Box<[u8]>,
    /// Index of the oldest byte.
    head: usize,
    /// Bytes stored.
    len: usize,
    closed: bool,
}

impl State {
    fn mask(&self) -> usize {
        self.buf.len() - 1
    }
}

impl RingBuffer {
    /// A buffer of `capacity` bytes, rounded up to a power of two (at least 2).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(2).next_power_of_two();
        Self {
            state: Mutex::new(State {
                buf: vec![0; capacity].into_boxed_slice(),
                head: 0,
                len: 0,
                closed: false,
            }),
            readable: Notify::new(),
        }
    }

    /// Total capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.state.lock().buf.len()
    }

    /// Bytes waiting to be sent.
    pub fn len(&self) -> usize {
        self.state.lock().len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once [`RingBuffer::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Appends all of `data`, or nothing: [`Error::BufferFull`] when it does not fit,
    /// [`Error::BufferClosed`] after close.
    pub fn write_all(&self, data: &[u8]) -> Result<(), Error> {
        if data.is_empty() {
            return if self.is_closed() {
                Err(Error::BufferClosed)
            } else {
                Ok(())
            };
        }
        {
            let mut s = self.state.lock();
            if s.closed {
                return Err(Error::BufferClosed);
            }
            let cap = s.buf.len();
            let free = cap - s.len;
            if data.len() > free {
                return Err(Error::BufferFull {
                    requested: data.len(),
                    free,
                });
            }
            let tail = (s.head + s.len) & s.mask();
            let first = data.len().min(cap - tail);
            s.buf[tail..tail + first].copy_from_slice(&data[..first]);
            s.buf[..data.len() - first].copy_from_slice(&data[first..]);
            s.len += data.len();
        }
        self.readable.notify_one();
        Ok(())
    }

    /// Drops everything queued and returns how many bytes that was.
    pub fn clear(&self) -> usize {
        let mut s = self.state.lock();
        let dropped = s.len;
        s.len = 0;
        s.head = 0;
        dropped
    }

    /// Closes the buffer: later writes fail with [`Error::BufferClosed`]; a waiting reader gets
    /// what is left.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.readable.notify_one();
    }

    /// Waits until at least `min` bytes are queued (or the buffer is closed), then appends up to
    /// `max` of them to `out` (a `Vec<u8>`, a `BytesMut`, ...) and returns how many. Returns 0
    /// only once closed and empty. `min` is clamped to `1..=capacity` and to `max`.
    ///
    /// Cancel-safe: bytes are only taken in the same poll that returns them.
    pub async fn read(&self, min: usize, max: usize, out: &mut impl BufMut) -> usize {
        if max == 0 {
            return 0;
        }
        loop {
            {
                let mut s = self.state.lock();
                let min = min.clamp(1, s.buf.len()).min(max);
                if s.len >= min || s.closed {
                    let n = s.len.min(max);
                    let cap = s.buf.len();
                    let first = n.min(cap - s.head);
                    out.put_slice(&s.buf[s.head..s.head + first]);
                    out.put_slice(&s.buf[..n - first]);
                    s.head = (s.head + n) & s.mask();
                    s.len -= n;
                    if s.len == 0 {
                        // Start again at the front: a steady stream then reuses the same few
                        // pages instead of walking through (and making resident) all of the
                        // buffer, which is 1 MiB per call by default.
                        s.head = 0;
                    }
                    return n;
                }
            }
            self.readable.notified().await;
        }
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
            Err(Error::BufferFull {
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
    async fn clear_returns_dropped_bytes() {
        let ring = RingBuffer::new(16);
        ring.write_all(&[0; 10]).unwrap();
        assert_eq!(ring.clear(), 10);
        assert_eq!(ring.clear(), 0);
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
        assert!(matches!(ring.write_all(&[1]), Err(Error::BufferClosed)));
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
                        Err(Error::BufferFull { .. }) => tokio::task::yield_now().await,
                        Err(e) => panic!("{e}"),
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
