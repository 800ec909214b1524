//! The agent's playout buffer and pull-based flow control.
//!
//! The server asks the agent for audio (`buffer_request`) so that what it holds plus what it
//! has asked for but not yet received stays near a small target. Audio leaves the buffer one
//! 20 ms frame per tick, in real time; when it runs dry the caller hears silence. Because the
//! server never asks for more than the target, the delay this buffer adds is bounded by it, and
//! an interrupt ([`Playout::clear`]) silences the agent at the next tick.

use std::collections::VecDeque;

/// Target of buffered plus requested audio, in frames (80 ms).
const TARGET_FRAMES: usize = 4;
/// Ask again only when at least this many frames are missing, so that a steady stream costs
/// one request per 40 ms rather than one per frame.
const REQUEST_FRAMES: usize = 2;

#[derive(Debug)]
pub(crate) struct Playout {
    buf: VecDeque<u8>,
    /// Bytes requested and not yet received.
    outstanding: usize,
    frame_bytes: usize,
    max_bytes: usize,
}

/// What [`Playout::push`] did with the audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// Bytes beyond the buffer's limit that were refused.
    pub(crate) overflow: usize,
}

impl Playout {
    pub(crate) fn new(frame_bytes: usize, max_bytes: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(max_bytes.min(TARGET_FRAMES * 4 * frame_bytes)),
            outstanding: 0,
            frame_bytes,
            max_bytes: max_bytes.max(frame_bytes * TARGET_FRAMES),
        }
    }

    /// Changes the frame size (the agent's rate changed) and forgets everything held.
    pub(crate) fn reset(&mut self, frame_bytes: usize) {
        self.buf.clear();
        self.outstanding = 0;
        self.frame_bytes = frame_bytes;
        self.max_bytes = self.max_bytes.max(frame_bytes * TARGET_FRAMES);
    }

    /// A new media connection: the old one's requests will never be answered.
    pub(crate) fn forget_requests(&mut self) {
        self.outstanding = 0;
    }

    pub(crate) fn frame_bytes(&self) -> usize {
        self.frame_bytes
    }

    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Agent audio arrived.
    pub(crate) fn push(&mut self, pcm: &[u8]) -> Pushed {
        self.outstanding = self.outstanding.saturating_sub(pcm.len());
        let room = self.max_bytes.saturating_sub(self.buf.len());
        let take = pcm.len().min(room);
        self.buf.extend(&pcm[..take]);
        Pushed {
            overflow: pcm.len() - take,
        }
    }

    /// How many bytes to request now, if any.
    pub(crate) fn want(&self) -> Option<usize> {
        let target = TARGET_FRAMES * self.frame_bytes;
        let have = self.buf.len() + self.outstanding;
        let missing = target.saturating_sub(have);
        (missing >= REQUEST_FRAMES * self.frame_bytes).then(|| missing - missing % self.frame_bytes)
    }

    pub(crate) fn requested(&mut self, bytes: usize) {
        self.outstanding += bytes;
    }

    /// Takes the next frame into `out` as samples, padding with silence. Returns whether any
    /// agent audio was in it.
    pub(crate) fn pop_frame(&mut self, out: &mut [i16]) -> bool {
        let bytes = (out.len() * 2).min(self.buf.len() & !1);
        let mut filled = 0;
        {
            let mut drain = self.buf.drain(..bytes);
            while let (Some(lo), Some(hi)) = (drain.next(), drain.next()) {
                out[filled] = i16::from_le_bytes([lo, hi]);
                filled += 1;
            }
        }
        out[filled..].fill(0);
        filled > 0
    }

    /// Drops every unplayed byte; returns how many.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.buf.len();
        self.buf.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_up_to_target_and_counts_outstanding() {
        let mut p = Playout::new(640, 32_000);
        assert_eq!(p.want(), Some(4 * 640));
        p.requested(4 * 640);
        assert_eq!(p.want(), None);
        p.push(&[0; 640]);
        assert_eq!(p.want(), None, "received audio is buffered, not missing");
        let mut frame = [0i16; 320];
        assert!(p.pop_frame(&mut frame));
        assert_eq!(
            p.want(),
            None,
            "one frame missing is below the request threshold"
        );
        p.push(&[0; 640]);
        p.pop_frame(&mut frame);
        assert_eq!(p.want(), Some(2 * 640));
    }

    #[test]
    fn pops_in_order_and_pads_with_silence() {
        let mut p = Playout::new(4, 1000);
        p.push(&[1, 0, 2, 0, 3, 0]);
        let mut frame = [9i16; 2];
        assert!(p.pop_frame(&mut frame));
        assert_eq!(frame, [1, 2]);
        assert!(p.pop_frame(&mut frame));
        assert_eq!(frame, [3, 0]);
        assert!(!p.pop_frame(&mut frame));
        assert_eq!(frame, [0, 0]);
    }

    #[test]
    fn odd_byte_waits_for_its_partner() {
        let mut p = Playout::new(4, 1000);
        p.push(&[1, 0, 2]);
        let mut frame = [0i16; 2];
        p.pop_frame(&mut frame);
        assert_eq!(frame, [1, 0]);
        p.push(&[0]);
        p.pop_frame(&mut frame);
        assert_eq!(frame, [2, 0]);
    }

    #[test]
    fn clear_drops_everything_and_overflow_is_reported() {
        let mut p = Playout::new(4, 16);
        assert_eq!(p.push(&[1; 20]).overflow, 4);
        assert_eq!(p.clear(), 16);
        assert_eq!(p.buffered(), 0);
        let mut frame = [5i16; 2];
        assert!(!p.pop_frame(&mut frame));
    }
}
