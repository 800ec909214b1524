//! Moves a 20 ms clock so that audio that lands in real time is played soon after it lands,
//! not up to a frame (or more) later.
//!
//! Two clocks use it, with the same rules:
//!
//! - each call's media clock (in the Telcoflow server), against audio an agent produces in
//!   real time;
//! - each SIP leg's playout tick (the server's RTP leg), against RTP packets from the phone, which land
//!   every 20 ms at a phase of their own (see
//!   [`RtpSession::take_clock_shift`](crate::rtp::session::RtpSession::take_clock_shift)).
//!
//! Such a clock starts at an arbitrary phase relative to the audio it plays. Audio that comes
//! in real time (an echo, a streaming voice pipeline paced by the caller's speech, a phone's
//! RTP stream) lands at a steady offset from the tick that plays it; when a frame lands just
//! after a tick it waits almost a whole frame in the buffer, and a frame that once missed its
//! tick leaves a standing queue behind it. Either wait is pure added latency, on top of every
//! other hop.
//!
//! The aligner watches how long each frame of such audio waited. After a window of steady
//! playout it moves the clock earlier, leaving a safety margin sized from the jitter it saw,
//! so that the next frames still arrive before their tick. It only ever moves the clock
//! earlier; a frame that misses its tick anyway is handled by the buffer's own pre-buffer
//! and widens the margin for next time. Audio sent ahead of time (a text-to-speech agent
//! answering requests from a full buffer) is not paced by its source, and its clock stays
//! put. The far end sees one short frame interval, which its jitter buffer absorbs like any
//! early packet.

use std::time::Duration;

/// Consecutive ticks of agent-paced audio (0.5 s) before the clock may move again.
const WINDOW_TICKS: usize = 25;
/// The first window is shorter (0.1 s): until then every frame of the call waits up to a
/// whole frame, and a first move with a little less evidence is corrected by the later ones.
const FIRST_WINDOW_TICKS: usize = 5;
/// Least margin kept between the latest expected arrival and the tick. Covers the timer's
/// 1 ms granularity and scheduling noise.
const MIN_MARGIN: Duration = Duration::from_millis(3);
/// Most margin, and most jitter the aligner works with: beyond it the pre-buffer is the
/// better tool.
const MAX_MARGIN: Duration = Duration::from_millis(10);
/// Margin added each time audio misses its tick.
const MISS_MARGIN: Duration = Duration::from_millis(2);
/// Moves smaller than this are not worth a short frame interval.
const MIN_SHIFT: Duration = Duration::from_millis(2);
/// Consecutive ticks that all waited at least [`STANDING_WAIT`] move the clock at once, without
/// waiting for the window to fill: a standing queue left by a miss upstream (another clock
/// that restarted, a packet that came late), not jitter.
const STANDING_TICKS: usize = 5;
/// A wait no margin asks for: beyond the widest margin by more than a move's worth.
const STANDING_WAIT: Duration = Duration::from_millis(12);

/// Learns the wait of just-in-time audio and says when to move the clock.
#[derive(Debug, Default)]
pub struct PhaseAligner {
    /// Waits seen in this window (the first `ticks` of them).
    waits: [Duration; WINDOW_TICKS],
    ticks: usize,
    /// Consecutive ticks, up to now, that waited at least [`STANDING_WAIT`].
    standing: usize,
    /// Margin added after frames missed their tick.
    extra_margin: Duration,
    shifts: u64,
    /// Times audio missed its tick.
    misses: u64,
    /// The first audio has landed (and set the clock's phase).
    started: bool,
}

impl PhaseAligner {
    /// One tick of the clock. `waited` is how long the frame just played had waited in the
    /// buffer, when the agent paces the audio; `None` for any other tick (silence, audio sent
    /// ahead, an underrun), which starts a new window.
    ///
    /// Returns how much earlier the next tick should come, if the clock should move.
    pub fn on_tick(&mut self, waited: Option<Duration>) -> Option<Duration> {
        let Some(waited) = waited else {
            self.restart();
            return None;
        };
        self.standing = if waited >= STANDING_WAIT {
            self.standing + 1
        } else {
            0
        };
        let window = if self.shifts == 0 {
            FIRST_WINDOW_TICKS
        } else {
            WINDOW_TICKS
        };
        self.waits[self.ticks] = waited;
        self.ticks += 1;
        let window = if self.standing >= STANDING_TICKS {
            // Judge the standing ticks alone: the earlier ones of the window may predate
            // whatever left the queue.
            self.waits
                .copy_within(self.ticks - STANDING_TICKS..self.ticks, 0);
            STANDING_TICKS
        } else if self.ticks < window {
            return None;
        } else {
            window
        };
        let waits = &mut self.waits[..window];
        waits.sort_unstable();
        let least = waits[0];
        // Jitter is read from the shorter half of the waits: a frame that queued behind a
        // burst or a late tick waited long, but says nothing about how late the next frame
        // may land; late frames show up as short waits, and the least wait is the latest.
        let jitter = waits[window / 2] - least;
        // The least wait is already the latest arrival seen; half the jitter again covers
        // arrivals a little later than any in the window.
        let margin = (MIN_MARGIN + jitter / 2 + self.extra_margin).min(MAX_MARGIN);
        self.restart();
        if jitter >= MAX_MARGIN {
            tracing::trace!(
                jitter_us = jitter.as_micros() as u64,
                "too much jitter to align"
            );
            return None;
        }
        let shift = least.saturating_sub(margin);
        if shift < MIN_SHIFT {
            return None;
        }
        self.shifts += 1;
        Some(shift)
    }

    /// The first audio landed. The clock started at an arbitrary phase (an echo's frames land
    /// just after its ticks: the caller starts talking when the clock starts), so the caller
    /// returns the margin after which to restart it: this frame plays then, rather than up to a
    /// frame later, and the first window checks the phase against the frames that follow.
    /// `Some` once.
    pub fn first_audio(&mut self) -> Option<Duration> {
        if self.started {
            return None;
        }
        self.started = true;
        self.restart();
        Some(self.margin())
    }

    /// Audio missed its tick (playout ran dry and the audio came right after): keep more
    /// margin from now on. While the margin can still widen, returns it: the caller restarts
    /// its clock that long after the late audio landed, so that the late frame plays then
    /// instead of a frame later and the frames behind it keep the margin. `None` once the
    /// margin is at its widest: misses are then the playout pre-buffer's to absorb.
    pub fn missed(&mut self) -> Option<Duration> {
        let room = MAX_MARGIN - MIN_MARGIN;
        let owned = self.extra_margin < room;
        self.misses += 1;
        self.extra_margin = (self.extra_margin + MISS_MARGIN).min(room);
        self.restart();
        owned.then_some(self.margin())
    }

    /// Times the clock was moved.
    pub fn shifts(&self) -> u64 {
        self.shifts
    }

    /// Times audio missed its tick.
    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// The margin kept now between the latest expected arrival and the tick.
    pub fn margin(&self) -> Duration {
        MIN_MARGIN + self.extra_margin
    }

    fn restart(&mut self) {
        self.ticks = 0;
        self.standing = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    /// Runs the aligner against an agent whose frames land at `arrival` (ms after a tick of
    /// the original clock, plus `jitter(i)`) and returns the final wait of each frame.
    fn simulate(arrival: f64, jitter: impl Fn(u32) -> f64, ticks: u32) -> (Vec<f64>, u64) {
        let mut a = PhaseAligner::default();
        // The clock's phase: ticks at `phase + 20 k` ms.
        let mut phase = 20.0;
        let mut waits = Vec::new();
        for i in 0..ticks {
            let landed = arrival + jitter(i);
            // The tick that plays this frame is the first one at or after it lands.
            let mut wait = (phase - landed).rem_euclid(20.0);
            if wait == 0.0 {
                wait = 20.0;
            }
            waits.push(wait);
            if let Some(shift) = a.on_tick(Some(ms(wait))) {
                phase -= shift.as_secs_f64() * 1000.0;
            }
        }
        (waits, a.shifts())
    }

    #[test]
    fn a_steady_agent_gets_its_wait_cut_to_the_margin() {
        // Frames land 1 ms after each tick: each waits 19 ms for the next one.
        let (waits, shifts) = simulate(1.0, |_| 0.0, 200);
        assert_eq!(waits[0], 19.0);
        assert_eq!(shifts, 1, "one move, then the clock stays");
        let last = *waits.last().unwrap();
        assert!(
            (last - 3.0).abs() < 1e-6,
            "waits the minimum margin: {last}"
        );
    }

    #[test]
    fn jitter_widens_the_margin_and_no_frame_misses_its_tick() {
        // Up to 4 ms of arrival jitter, in a repeating pattern.
        let (waits, shifts) = simulate(1.0, |i| f64::from(i % 5), 300);
        assert!(shifts >= 1);
        let tail = &waits[100..];
        let least = tail.iter().cloned().fold(f64::MAX, f64::min);
        assert!(
            least >= 2.9,
            "frames keep at least the base margin before their tick: {least}"
        );
        let most = tail.iter().cloned().fold(0.0, f64::max);
        assert!(most <= 10.0, "and wait less than half a frame: {most}");
    }

    #[test]
    fn silence_or_buffered_audio_never_moves_the_clock() {
        let mut a = PhaseAligner::default();
        for i in 0..1000 {
            // Every fourth tick is not agent-paced (silence, audio sent ahead): no window
            // ever completes.
            let waited = (i % 4 != 0).then(|| ms(15.0));
            assert_eq!(a.on_tick(waited), None);
        }
        assert_eq!(a.shifts(), 0);
    }

    #[test]
    fn a_standing_queue_is_played_out_at_once() {
        // Frames wait 23 ms: one frame queued behind the one playing, 3 ms of phase. Five
        // such ticks are enough; the window need not fill.
        let mut a = PhaseAligner::default();
        let moves: Vec<_> = (0..STANDING_TICKS)
            .map(|_| a.on_tick(Some(ms(23.0))))
            .collect();
        assert!(moves[..STANDING_TICKS - 1].iter().all(Option::is_none));
        assert_eq!(
            moves[STANDING_TICKS - 1],
            Some(ms(20.0)),
            "one early tick plays the queued frame"
        );
    }

    #[test]
    fn audio_that_comes_earlier_all_at_once_is_followed_within_a_few_ticks() {
        // Settled at the margin, then from frame 100 on the frames land 15 ms earlier (a clock
        // upstream moved): each would wait 18 ms.
        let (waits, _) = simulate(1.0, |i| if i >= 100 { -15.0 } else { 0.0 }, 200);
        assert!((waits[99] - 3.0).abs() < 1e-6, "{:?}", &waits[90..100]);
        assert!(waits[100] > 17.0);
        assert!(
            waits[100 + STANDING_TICKS..].iter().all(|w| *w <= 5.0),
            "back at the margin after {STANDING_TICKS} ticks, not a window: {:?}",
            &waits[100..130]
        );
    }

    #[test]
    fn a_few_long_waits_do_not_count_as_jitter() {
        // Two frames in the window queued behind a late tick.
        let mut a = PhaseAligner::default();
        let shift = (0..WINDOW_TICKS)
            .filter_map(|i| a.on_tick(Some(ms(if i % 12 == 5 { 31.0 } else { 11.0 }))))
            .next();
        assert_eq!(shift, Some(ms(8.0)));
    }

    #[test]
    fn a_miss_widens_the_margin() {
        let run = |a: &mut PhaseAligner| {
            (0..WINDOW_TICKS)
                .filter_map(|_| a.on_tick(Some(ms(19.0))))
                .next()
        };
        let mut a = PhaseAligner::default();
        assert_eq!(
            a.missed(),
            Some(ms(5.0)),
            "restart 5 ms after the late frame"
        );
        assert_eq!(run(&mut a), Some(ms(14.0)));
        assert_eq!(a.missed(), Some(ms(7.0)));
        assert_eq!(run(&mut a), Some(ms(12.0)));
        assert_eq!(a.missed(), Some(ms(9.0)));
        assert_eq!(a.missed(), Some(ms(10.0)));
        assert_eq!(
            a.missed(),
            None,
            "past the widest margin, misses go back to the pre-buffer"
        );
    }

    #[test]
    fn the_first_audio_sets_the_phase_once() {
        let mut a = PhaseAligner::default();
        assert_eq!(a.first_audio(), Some(MIN_MARGIN));
        assert_eq!(a.first_audio(), None);
        // The frames after it wait the margin: the clock stays, and the next window is still
        // the short first one.
        let moves = (0..FIRST_WINDOW_TICKS).filter_map(|_| a.on_tick(Some(ms(3.0))));
        assert_eq!(moves.count(), 0);
        assert_eq!(a.shifts(), 0);
        let moved = (0..FIRST_WINDOW_TICKS).filter_map(|_| a.on_tick(Some(ms(12.0))));
        assert_eq!(
            moved.collect::<Vec<_>>(),
            vec![ms(9.0)],
            "the first window corrects a first frame that came late"
        );
    }

    #[test]
    fn heavy_jitter_leaves_the_clock_alone() {
        // Arrivals spread evenly over most of a frame.
        let mut a = PhaseAligner::default();
        for i in 0..100u32 {
            let waited = ms(f64::from(1 + (i * 7) % 19));
            assert_eq!(a.on_tick(Some(waited)), None);
        }
    }
}
