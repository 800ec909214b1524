//! Storage that outgoing frames are split from, so that a steady stream of frames costs no
//! allocation per frame. Used by the server and the SDK for audio and for `buffer_request`s.

use bytes::BytesMut;

/// Two blocks that frames are written into and split off as shared [`bytes::Bytes`].
///
/// When the current block is used up the two swap: the other block's frames went out long ago
/// and were dropped, so `reserve` takes it back in place. (Reclaiming the block just used up
/// often fails: its last frame may still be queued for a socket.) A new block is allocated only
/// while frames of the old one are still alive, that is when a peer is far behind.
#[derive(Debug, Default)]
pub struct FramePool {
    current: BytesMut,
    spare: BytesMut,
}

impl FramePool {
    /// The block to write the next frame into, with room for `len` bytes; a new or reclaimed
    /// block has room for `block` bytes (at least `len`). Write the frame, then `split()` it off.
    pub fn with_room(&mut self, len: usize, block: usize) -> &mut BytesMut {
        if self.current.capacity() < len {
            std::mem::swap(&mut self.current, &mut self.spare);
            self.current.reserve(block.max(len));
        }
        &mut self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn blocks_are_reused_once_their_frames_are_gone() {
        const FRAME: usize = 961;
        const BLOCK: usize = 2048;
        let per_block = BLOCK / FRAME;
        let mut pool = FramePool::default();
        let mut take = || {
            let block = pool.with_room(FRAME, BLOCK);
            block.put_bytes(7, FRAME);
            block.split().freeze()
        };
        // Fills block A, then block B; the frames are dropped as they would be once sent.
        let a = take().as_ptr();
        for _ in 1..per_block {
            take();
        }
        let b = take().as_ptr();
        for _ in 1..per_block {
            take();
        }
        // A's frames are all gone: A is used again from its start, then B.
        assert_eq!(take().as_ptr(), a);
        for _ in 1..per_block {
            take();
        }
        let held = take();
        assert_eq!(held.as_ptr(), b);
        for _ in 1..per_block {
            take();
        }
        assert_eq!(take().as_ptr(), a);
        for _ in 1..per_block {
            take();
        }
        // A frame of B is still alive (a socket far behind): B is left alone, a new block
        // takes its place.
        assert_ne!(take().as_ptr(), b);
        assert_eq!(&held[..], &[7; FRAME][..]);
    }
}
