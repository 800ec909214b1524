//! The agent's playout buffer and pull-based flow control.
//!
//! The server asks the agent for audio (`buffer_request`) so that what it holds plus what it
//! has asked for but not yet received stays near a small target. Audio leaves the buffer one
//! 20 ms frame per tick, in real time; when it runs dry the caller hears silence. Because the
//! server never asks for more than the target, the delay this buffer adds is bounded by it, and
//! an interrupt ([`Playout::clear`]) silences the agent at the next tick.
//!
//! Playout adapts to the agent's delivery jitter: when the clock finds no audio (an underrun)
//! and audio arrives again within a few ticks (a gap, not the end of an utterance), the next
//! start waits for one more frame to be buffered (up to [`MAX_PREBUFFER_FRAMES`]); after a stretch of smooth playout the
//! pre-buffer shrinks again. The request target grows with gaps the same way (up to
//! [`MAX_TARGET_FRAMES`]), which is what feeds an agent whose answers take a long round trip. A steady agent thus costs no extra delay and a jittery one gets
//! just enough to stop the stutter.

use std::collections::VecDeque;
use tokio::time::Instant;

/// Starting target of buffered plus requested audio, in frames (80 ms).
const TARGET_FRAMES: usize = 4;
/// Highest the target grows to (500 ms): enough for an agent half a second of round trip away.
const MAX_TARGET_FRAMES: usize = 25;
/// Ask again only when at least this many frames are missing, so that a steady stream costs
/// one request per 40 ms rather than one per frame.
const REQUEST_FRAMES: usize = 2;
/// Deepest pre-buffer the adaptation goes to (60 ms); below the request target.
pub(crate) const MAX_PREBUFFER_FRAMES: usize = 3;
/// Audio arriving within this many ticks of running dry means the dry spell was a gap.
const GAP_TICKS: u64 = 10;
/// Ticks of smooth playout (5 s) after which the pre-buffer shrinks by a frame.
const SMOOTH_TICKS: u32 = 250;
/// Arrival stamps kept; beyond this, later audio shares the newest stamp.
const MAX_ARRIVALS: usize = 64;

#[derive(Debug)]
pub(crate) struct Playout {
    buf: VecDeque<u8>,
    /// Bytes requested and not yet received.
    outstanding: usize,
    frame_bytes: usize,
    max_bytes: usize,
    /// Playing out (as opposed to waiting for the pre-buffer to fill).
    primed: bool,
    /// Frames to hold before (re)starting playout.
    prebuffer_frames: usize,
    /// Frames of audio to keep buffered or requested. Starts small and grows with gaps, so
    /// that an agent far away (whose answers to requests take a long round trip) still keeps
    /// the buffer fed.
    target_frames: usize,
    /// Ticks spent waiting with some audio buffered but less than the pre-buffer.
    waited: usize,
    tick: u64,
    /// Tick at which playout last found no audio while playing.
    dry_at: Option<u64>,
    smooth_ticks: u32,
    gaps: u64,
    /// When each stretch of buffered audio arrived: (stream offset just past its last byte,
    /// arrival), oldest first. Tells how long played audio waited.
    arrivals: VecDeque<(u64, Instant)>,
    /// Bytes ever buffered and ever played or cleared: offsets into the agent's stream.
    pushed_total: u64,
    consumed_total: u64,
    /// When the last byte of the latest frame played had arrived.
    played_arrival: Option<Instant>,
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
            primed: false,
            prebuffer_frames: 1,
            target_frames: TARGET_FRAMES,
            waited: 0,
            tick: 0,
            dry_at: None,
            smooth_ticks: 0,
            gaps: 0,
            arrivals: VecDeque::with_capacity(MAX_ARRIVALS),
            pushed_total: 0,
            consumed_total: 0,
            played_arrival: None,
        }
    }

    /// Changes the frame size (the agent's rate changed) and forgets everything held.
    pub(crate) fn reset(&mut self, frame_bytes: usize) {
        self.buf.clear();
        self.forget_arrivals();
        self.outstanding = 0;
        self.primed = false;
        self.dry_at = None;
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

    /// Bytes held, not yet played.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Agent audio arrived at `now`.
    pub(crate) fn push(&mut self, pcm: &[u8], now: Instant) -> Pushed {
        if let Some(dry_at) = self.dry_at.take() {
            if self.tick - dry_at <= GAP_TICKS {
                self.gaps += 1;
                self.prebuffer_frames = (self.prebuffer_frames + 1).min(MAX_PREBUFFER_FRAMES);
                let max_target =
                    (self.max_bytes / self.frame_bytes).clamp(TARGET_FRAMES, MAX_TARGET_FRAMES);
                self.target_frames = (self.target_frames + 2).min(max_target);
            }
        }
        self.outstanding = self.outstanding.saturating_sub(pcm.len());
        let room = self.max_bytes.saturating_sub(self.buf.len());
        let take = pcm.len().min(room);
        self.buf.extend(&pcm[..take]);
        if take > 0 {
            self.pushed_total += take as u64;
            if self.arrivals.len() == MAX_ARRIVALS {
                // Later audio joins the newest stretch, stamped now: its wait can only be
                // under-, never over-estimated.
                self.arrivals.pop_back();
            }
            self.arrivals.push_back((self.pushed_total, now));
        }
        Pushed {
            overflow: pcm.len() - take,
        }
    }

    /// How many bytes to request now, if any.
    pub(crate) fn want(&self) -> Option<usize> {
        let target = self.target_frames * self.frame_bytes;
        let have = self.buf.len() + self.outstanding;
        let missing = target.saturating_sub(have);
        (missing >= REQUEST_FRAMES * self.frame_bytes).then(|| missing - missing % self.frame_bytes)
    }

    pub(crate) fn requested(&mut self, bytes: usize) {
        self.outstanding += bytes;
    }

    /// Bytes asked for and not yet received: the agent owes audio.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// When the last byte of the latest frame played had arrived (`None` if that tick played
    /// no agent audio).
    pub(crate) fn played_arrival(&self) -> Option<Instant> {
        self.played_arrival
    }

    /// Marks `bytes` more of the stream as gone (played or cleared); returns when the last of
    /// them had arrived.
    fn consume(&mut self, bytes: usize) -> Option<Instant> {
        self.consumed_total += bytes as u64;
        while let Some(&(end, at)) = self.arrivals.front() {
            if end > self.consumed_total {
                // This stretch holds the last byte consumed, and more.
                return Some(at);
            }
            self.arrivals.pop_front();
            if end == self.consumed_total {
                // It ends with the last byte consumed: the next stretch, if any, came later
                // and is still queued. Going on to it would take a standing queue for a
                // short wait.
                return Some(at);
            }
        }
        None
    }

    fn forget_arrivals(&mut self) {
        self.arrivals.clear();
        self.consumed_total = self.pushed_total;
        self.played_arrival = None;
    }

    /// Takes the next frame into `out` as samples, padding with silence. Returns whether any
    /// agent audio was in it.
    pub(crate) fn pop_frame(&mut self, out: &mut [i16]) -> bool {
        self.tick += 1;
        self.played_arrival = None;
        if self.buf.len() < 2 {
            if self.primed {
                // The clock wanted a frame and none was there: an underrun. Whether it was a
                // gap or the end of an utterance shows when (if) audio comes back.
                self.primed = false;
                self.dry_at = Some(self.tick);
                self.smooth_ticks = 0;
            }
            out.fill(0);
            return false;
        }
        if !self.primed {
            // Start once the pre-buffer is full, or once the audio has waited as many ticks
            // as the pre-buffer is deep (the end of an utterance must not wait forever).
            if self.buf.len() >= self.prebuffer_frames * self.frame_bytes
                || self.waited >= self.prebuffer_frames
            {
                self.primed = true;
                self.waited = 0;
            } else {
                self.waited += 1;
                out.fill(0);
                return false;
            }
        }
        let bytes = (out.len() * 2).min(self.buf.len() & !1);
        let filled = bytes / 2;
        // Converted in one pass over contiguous bytes (a sample may straddle the ring's wrap
        // point otherwise); byte-by-byte draining cost more than the rest of the tick.
        let held = self.buf.make_contiguous();
        for (s, b) in out.iter_mut().zip(held[..bytes].chunks_exact(2)) {
            *s = i16::from_le_bytes([b[0], b[1]]);
        }
        self.buf.drain(..bytes);
        out[filled..].fill(0);
        self.played_arrival = self.consume(bytes);
        self.smooth_ticks += 1;
        if self.smooth_ticks >= SMOOTH_TICKS {
            self.prebuffer_frames = (self.prebuffer_frames - 1).max(1);
            self.target_frames = (self.target_frames - 1).max(TARGET_FRAMES);
            self.smooth_ticks = 0;
        }
        true
    }

    /// Whether the latest tick found no audio while playing: audio arriving now missed that
    /// tick by less than a frame, rather than ending a pause.
    pub(crate) fn ran_dry_at_last_tick(&self) -> bool {
        self.dry_at == Some(self.tick)
    }

    /// Undoes what the latest gap did to the pre-buffer: the caller fixes its cause another
    /// way (the media clock moves, see `crate::phase`).
    pub(crate) fn forgive_gap(&mut self) {
        self.prebuffer_frames = (self.prebuffer_frames - 1).max(1);
    }

    /// Frames currently held before playout (re)starts.
    pub(crate) fn prebuffer_frames(&self) -> usize {
        self.prebuffer_frames
    }

    /// Gaps seen: playout ran dry and audio came back within a few ticks.
    pub(crate) fn gaps(&self) -> u64 {
        self.gaps
    }

    /// Drops every unplayed byte; returns how many.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.buf.len();
        self.buf.clear();
        self.forget_arrivals();
        // Silence after an interrupt is wanted, not a gap to adapt to.
        self.primed = false;
        self.dry_at = None;
        self.waited = 0;
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
        p.push(&[0; 2 * 640], Instant::now());
        assert_eq!(p.want(), None, "received audio is buffered, not missing");
        let mut frame = [0i16; 320];
        assert!(p.pop_frame(&mut frame));
        assert_eq!(
            p.want(),
            None,
            "one frame missing is below the request threshold"
        );
        assert!(p.pop_frame(&mut frame));
        assert_eq!(p.want(), Some(2 * 640));
    }

    #[test]
    fn tells_when_played_audio_arrived() {
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(20);
        let mut p = Playout::new(4, 1000);
        let mut frame = [0i16; 2];
        p.push(&[1, 0, 2, 0, 3, 0], t0);
        p.push(&[4, 0, 5, 0], t1);
        assert!(p.pop_frame(&mut frame));
        assert_eq!(p.played_arrival(), Some(t0));
        assert!(p.pop_frame(&mut frame));
        assert_eq!(frame, [3, 4]);
        assert_eq!(
            p.played_arrival(),
            Some(t1),
            "the frame's last byte came later"
        );
        p.clear();
        p.push(&[6, 0, 7, 0], t1);
        assert!(p.pop_frame(&mut frame));
        assert_eq!(p.played_arrival(), Some(t1), "cleared audio is forgotten");
        assert!(!p.pop_frame(&mut frame));
        assert_eq!(p.played_arrival(), None);
    }

    #[test]
    fn each_whole_frame_played_tells_its_own_arrival() {
        // Agents send whole frames: a queue of two must read as the older frame's wait.
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(20);
        let t2 = t0 + std::time::Duration::from_millis(40);
        let mut p = Playout::new(4, 1000);
        let mut frame = [0i16; 2];
        p.push(&[1, 0, 2, 0], t0);
        p.push(&[3, 0, 4, 0], t1);
        assert!(p.pop_frame(&mut frame));
        assert_eq!(
            p.played_arrival(),
            Some(t0),
            "the queued frame is not the one played"
        );
        p.push(&[5, 0, 6, 0], t2);
        assert!(p.pop_frame(&mut frame));
        assert_eq!(frame, [3, 4]);
        assert_eq!(p.played_arrival(), Some(t1));
        assert!(p.pop_frame(&mut frame));
        assert_eq!(p.played_arrival(), Some(t2));
    }

    #[test]
    fn pops_in_order_and_pads_with_silence() {
        let mut p = Playout::new(4, 1000);
        p.push(&[1, 0, 2, 0, 3, 0], Instant::now());
        let mut frame = [9i16; 2];
        assert!(p.pop_frame(&mut frame));
        assert_eq!(frame, [1, 2]);
        // Once playing, a partial frame plays at once, padded.
        assert!(p.pop_frame(&mut frame));
        assert_eq!(frame, [3, 0]);
        assert!(!p.pop_frame(&mut frame));
        assert_eq!(frame, [0, 0]);
    }

    #[test]
    fn partial_frame_waits_a_tick_then_plays() {
        let mut p = Playout::new(4, 1000);
        p.push(&[1, 0, 2], Instant::now());
        let mut frame = [9i16; 2];
        assert!(
            !p.pop_frame(&mut frame),
            "less than a frame waits one tick for the rest"
        );
        assert_eq!(frame, [0, 0]);
        assert!(p.pop_frame(&mut frame));
        assert_eq!(frame, [1, 0]);
        p.push(&[0], Instant::now());
        let played = (0..3).any(|_| p.pop_frame(&mut frame));
        assert!(played);
        assert_eq!(frame, [2, 0], "the odd byte waited for its partner");
    }

    #[test]
    fn gaps_deepen_the_prebuffer_and_smooth_playout_shrinks_it() {
        let frame = [7u8, 0, 7, 0];
        let mut out = [0i16; 2];
        let mut p = Playout::new(4, 10_000);
        // A frame, a dry tick, then audio again at once: a gap.
        p.push(&frame, Instant::now());
        assert!(p.pop_frame(&mut out));
        assert!(!p.ran_dry_at_last_tick());
        assert!(!p.pop_frame(&mut out));
        assert!(
            p.ran_dry_at_last_tick(),
            "audio now would have missed that tick"
        );
        p.push(&frame, Instant::now());
        assert_eq!((p.gaps(), p.prebuffer_frames()), (1, 2));
        // Now playout waits for two frames (or two ticks) before starting again.
        assert!(!p.pop_frame(&mut out));
        p.push(&frame, Instant::now());
        assert!(p.pop_frame(&mut out));
        assert!(p.pop_frame(&mut out));
        // Audio that comes back long after running dry is a new utterance, not a gap.
        for _ in 0..(GAP_TICKS + 5) {
            p.pop_frame(&mut out);
        }
        p.push(&frame, Instant::now());
        assert_eq!(p.gaps(), 1);
        // Five seconds of smooth playout shrink the pre-buffer again.
        for _ in 0..(SMOOTH_TICKS + 5) {
            p.push(&frame, Instant::now());
            p.pop_frame(&mut out);
        }
        assert_eq!(p.prebuffer_frames(), 1);
    }

    #[test]
    fn a_steady_agent_that_keeps_pace_causes_no_gaps() {
        // One frame arrives between every two ticks, as an echo agent delivers: the buffer is
        // empty after each tick, but the clock never finds it empty.
        let frame = [7u8, 0, 7, 0];
        let mut out = [0i16; 2];
        let mut p = Playout::new(4, 10_000);
        for _ in 0..100 {
            p.push(&frame, Instant::now());
            assert!(p.pop_frame(&mut out));
        }
        assert_eq!((p.gaps(), p.prebuffer_frames()), (0, 1));
    }

    #[test]
    fn a_far_agent_gets_a_larger_request_target() {
        // The agent answers each request 6 ticks (120 ms) after it is made: more than the
        // starting 80 ms target covers. Gaps grow the target until playout runs smoothly.
        let frame_bytes = 4;
        let mut p = Playout::new(frame_bytes, 10_000);
        let mut in_flight: std::collections::VecDeque<(u64, usize)> = Default::default();
        let mut out = [0i16; 2];
        let mut late_gaps = 0;
        for tick in 0..400u64 {
            while in_flight.front().is_some_and(|(due, _)| *due <= tick) {
                let (_, bytes) = in_flight.pop_front().unwrap();
                p.push(&vec![1u8; bytes], Instant::now());
            }
            if let Some(bytes) = p.want() {
                p.requested(bytes);
                in_flight.push_back((tick + 6, bytes));
            }
            let before = p.gaps();
            p.pop_frame(&mut out);
            if tick > 200 && p.gaps() > before {
                late_gaps += 1;
            }
        }
        assert!(
            p.target_frames > TARGET_FRAMES,
            "target grew: {}",
            p.target_frames
        );
        assert!(p.gaps() > 0);
        assert_eq!(late_gaps, 0, "once adapted, playout runs without gaps");
    }

    #[test]
    fn an_interrupt_is_not_a_gap() {
        let frame = [7u8, 0, 7, 0];
        let mut out = [0i16; 2];
        let mut p = Playout::new(4, 10_000);
        p.push(&frame, Instant::now());
        p.push(&frame, Instant::now());
        p.pop_frame(&mut out);
        assert_eq!(p.clear(), 4);
        p.pop_frame(&mut out);
        p.push(&frame, Instant::now());
        assert_eq!((p.gaps(), p.prebuffer_frames()), (0, 1));
    }

    #[test]
    fn clear_drops_everything_and_overflow_is_reported() {
        let mut p = Playout::new(4, 16);
        assert_eq!(p.push(&[1; 20], Instant::now()).overflow, 4);
        assert_eq!(p.clear(), 16);
        assert_eq!(p.buffered(), 0);
        let mut frame = [5i16; 2];
        assert!(!p.pop_frame(&mut frame));
    }
}
