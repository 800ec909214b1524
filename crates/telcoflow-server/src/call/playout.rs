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
//!
//! Playout also undoes the delay a stalled agent leaves behind. An agent whose process or
//! network stops for a moment (a GC pause, a slow link) keeps producing live audio afterwards
//! into its own ring buffer, which this buffer then pulls at real-time pace: the stall's length
//! would stay in the call as delay. So the stream is classified by how requests are answered:
//! *live* when audio arrives just in time (little buffered at each tick, requests outstanding),
//! *ahead* otherwise (synthesised speech queued at once keeps the buffer at its target). When a
//! live stream runs dry, the server pings the agent ([`Playout::ping_due`]); a prompt pong
//! ([`Playout::pong`]) means the agent is alive and merely paused. Otherwise the silence played
//! until audio comes back is time owed, and for [`CATCH_UP_TICKS`] after that, audio held
//! beyond what a live stream holds at a tick is dropped, oldest first, up to the time owed,
//! while a few extra frames are requested to drain the agent's backlog. Audio arriving at
//! real-time pace never builds up, so it is never dropped; an ahead stream owes nothing. What
//! was dropped is handed to the call ([`Playout::take_skipped`]) to be logged and reported.
//!
//! Marks (`agent.mark`) sit in the stream at the end of the audio received before them. A mark
//! is reached once every byte before it has left the buffer: played at a tick, or dropped by a
//! catch-up (whose audio nobody will hear, but the mark must not be lost). An interrupt
//! ([`Playout::clear`]) clears the marks it drops with the audio ([`Playout::take_cleared_marks`]).

use std::collections::VecDeque;
use std::time::Duration;
use telcoflow_proto::media::MAX_MARKS;
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
/// Most frames a just-in-time stream holds at a tick: the frame that arrived since the last
/// tick, and one more for jitter.
const LIVE_HELD_FRAMES: usize = 2;
/// Just-in-time ticks in a row after which the stream counts as live.
const LIVE_TICKS: u32 = 5;
/// Shortest dry spell counted as a stall: audio that missed a single tick was late by less
/// than a frame, which is delivery jitter (the pre-buffer's business), not a stall.
const MIN_STALL_TICKS: u64 = 2;
/// Longest dry spell counted as a stall (1 s): a longer one ends an utterance.
const MAX_STALL_TICKS: u64 = 50;
/// How long after audio comes back from a stall its time owed may be dropped (2 s).
const CATCH_UP_TICKS: u64 = 100;
/// Frames kept at a tick while catching up: what a live stream holds.
const CATCH_UP_KEEP_FRAMES: usize = 1;
/// Ticks owed beyond the agent's silence: what it made while its last request was on the way
/// (a request can wait for the next caller frame). Only audio held beyond a frame is dropped,
/// and the catch-up ends once the backlog is drained, so owing a little more costs nothing.
const OWED_MARGIN_TICKS: u64 = 2;
/// Ticks in a row with the backlog drained that end a catch-up.
const DRAINED_TICKS: u32 = 3;
/// Frames requested beyond the target while catching up, to drain the agent's backlog.
const CATCH_UP_EXTRA_FRAMES: usize = 4;
/// A pong within this long of its ping shows the agent alive: the dry spell is a pause. The
/// bound used once the agent's round trip is measured (see [`Playout::prompt_pong`]) is
/// tighter, never looser.
const PROMPT_PONG: Duration = Duration::from_millis(60);
/// Least prompt-pong bound: scheduling noise on a busy machine.
const MIN_PROMPT_PONG: Duration = Duration::from_millis(10);
/// Round trips kept to learn the agent's usual one; their median is robust to the odd slow one.
const RTT_SAMPLES: usize = 9;
/// Ticks between pings that measure the round trip (1 s), the first at the first tick.
const PROBE_TICKS: u64 = 50;
/// Ticks a pause is watched once audio is back, asking for more than a live stream can have.
const WATCH_TICKS: u64 = 10;

/// A live stream ran dry and the agent has not (yet) shown itself alive.
#[derive(Debug, Clone, Copy)]
struct SuspectedStall {
    /// Tick that first found no audio.
    dry_tick: u64,
    /// Tick of the last audio before it: the agent has been silent since.
    silent_from: u64,
    /// When the ping for it went out, and its number, once it has.
    ping: Option<(u32, Instant)>,
    /// The server itself stalled (its tick came late): the agent's pong says nothing.
    server: bool,
}

/// A live stream ran dry and the agent answered the ping promptly: a pause, unless the audio
/// that comes back turns out to be a backlog (the agent stalled briefly just before the ping).
#[derive(Debug, Clone, Copy)]
struct Pause {
    /// Tick that first found no audio.
    dry_tick: u64,
    /// Tick of the last audio before it.
    silent_from: u64,
    /// Tick audio came back, once it has.
    back_tick: Option<u64>,
    /// Watched ticks, since audio came back, at which every request was answered.
    answered: u32,
}

/// Audio dropped by one catch-up after a stall, from [`Playout::take_skipped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skipped {
    /// Bytes of agent audio dropped.
    pub(crate) bytes: usize,
    /// Bytes the stall had left owed (silence played while the agent was stalled).
    pub(crate) owed: usize,
}

/// A mark the agent placed in its audio (`agent.mark`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) name: Box<str>,
    /// The client's number for it, echoed in its event.
    pub(crate) id: Option<u64>,
}

/// The call holds [`MAX_MARKS`] marks already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooManyMarks;

#[derive(Debug)]
pub(crate) struct Playout {
    buf: VecDeque<u8>,
    /// Marks not reached yet, oldest first, each with its place in the agent's stream (the
    /// `pushed_total` when it came): reached once `consumed_total` gets there.
    marks: VecDeque<(u64, Mark)>,
    /// Marks an interrupt or a reset dropped, waiting to be reported.
    cleared_marks: Vec<Mark>,
    /// Bytes of agent audio the latest tick played.
    last_played: usize,
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
    /// Silent frames the gaps played: ticks from running dry to the audio's return.
    gap_frames: u64,
    /// When each stretch of buffered audio arrived: (stream offset just past its last byte,
    /// arrival), oldest first. Tells how long played audio waited.
    arrivals: VecDeque<(u64, Instant)>,
    /// Bytes ever buffered and ever played or cleared: offsets into the agent's stream.
    pushed_total: u64,
    consumed_total: u64,
    /// When the last byte of the latest frame played had arrived.
    played_arrival: Option<Instant>,
    /// Ticks in a row that played audio which arrived just in time.
    live_ticks: u32,
    /// A live stream that ran dry, until audio comes back or the agent answers a ping.
    stall: Option<SuspectedStall>,
    /// Bytes of silence a stall inserted and not yet won back.
    owed: usize,
    /// Owed at the start of the current catch-up.
    owed_at_start: usize,
    /// Last tick of the current catch-up.
    catch_up_until: Option<u64>,
    /// Bytes dropped by the current catch-up.
    skipped: usize,
    /// Ticks in a row the current catch-up found the agent's backlog drained.
    drained_ticks: u32,
    /// Whether a stall's backlog is dropped at all (`limits.catch_up_after_stall`).
    catch_up_enabled: bool,
    /// A finished catch-up waiting to be reported.
    skipped_report: Option<Skipped>,
    /// Bytes ever dropped by catch-ups.
    skipped_total: u64,
    /// The tick being played came late (see [`Playout::late_tick`]).
    late_tick: bool,
    /// A dry spell of a live stream judged a pause, watched until it proves one.
    pause: Option<Pause>,
    /// Tick of the latest audio received.
    pushed_tick: u64,
    /// The ping awaiting its pong: number, when sent.
    ping_out: Option<(u32, Instant)>,
    next_ping: u32,
    /// Tick of the next round-trip ping.
    probe_tick: u64,
    /// Latest measured round trips of pings on the media connection.
    rtts: VecDeque<Duration>,
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
            marks: VecDeque::new(),
            cleared_marks: Vec::new(),
            last_played: 0,
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
            gap_frames: 0,
            arrivals: VecDeque::with_capacity(MAX_ARRIVALS),
            pushed_total: 0,
            consumed_total: 0,
            played_arrival: None,
            live_ticks: 0,
            stall: None,
            owed: 0,
            owed_at_start: 0,
            catch_up_until: None,
            skipped: 0,
            drained_ticks: 0,
            catch_up_enabled: true,
            skipped_report: None,
            skipped_total: 0,
            late_tick: false,
            pause: None,
            pushed_tick: 0,
            ping_out: None,
            next_ping: 0,
            probe_tick: 1,
            rtts: VecDeque::with_capacity(RTT_SAMPLES),
        }
    }

    /// Whether the backlog a stall leaves standing is dropped (the default) or kept.
    pub(crate) fn set_catch_up(&mut self, enabled: bool) {
        self.catch_up_enabled = enabled;
    }

    /// Changes the frame size (the agent's rate changed) and forgets everything held.
    pub(crate) fn reset(&mut self, frame_bytes: usize) {
        self.clear_marks();
        self.buf.clear();
        self.forget_arrivals();
        self.outstanding = 0;
        self.primed = false;
        self.dry_at = None;
        self.forget_stall();
        self.live_ticks = 0;
        self.frame_bytes = frame_bytes;
        self.max_bytes = self.max_bytes.max(frame_bytes * TARGET_FRAMES);
    }

    /// A new media connection: the old one's requests will never be answered.
    pub(crate) fn forget_requests(&mut self) {
        self.outstanding = 0;
        // Its pings will not be answered either; the new one's round trip is measured afresh.
        self.ping_out = None;
        self.rtts.clear();
        self.probe_tick = self.tick + 1;
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
        if let Some(stall) = self.stall.take() {
            // Audio is back and the agent never showed itself alive in between: it made
            // audio all the while it sent none, and that backlog now stands as delay. The
            // silence played is the most of it, the buffer it had left played before that.
            let dry_ticks = self.tick + 1 - stall.dry_tick;
            if (MIN_STALL_TICKS..=MAX_STALL_TICKS).contains(&dry_ticks) {
                self.owed += (self.tick + 1 + OWED_MARGIN_TICKS - stall.silent_from) as usize
                    * self.frame_bytes;
                self.owed_at_start = self.owed;
                self.catch_up_until = Some(self.tick + CATCH_UP_TICKS);
                // A stall, not delivery jitter: no reason to hold more audio from now on.
                self.dry_at = None;
            }
        }
        if let Some(pause) = &mut self.pause {
            if pause.back_tick.is_none() {
                let dry_ticks = self.tick + 1 - pause.dry_tick;
                if (MIN_STALL_TICKS..=MAX_STALL_TICKS).contains(&dry_ticks) {
                    pause.back_tick = Some(self.tick);
                } else {
                    self.pause = None;
                }
            }
        }
        if self.catch_up_until.is_some() {
            // Running dry while the backlog drains is the catch-up's doing, not jitter.
            self.dry_at = None;
        }
        if let Some(dry_at) = self.dry_at.take() {
            if self.tick - dry_at <= GAP_TICKS {
                self.gaps += 1;
                self.gap_frames += self.tick + 1 - dry_at;
                self.prebuffer_frames = (self.prebuffer_frames + 1).min(MAX_PREBUFFER_FRAMES);
                let max_target =
                    (self.max_bytes / self.frame_bytes).clamp(TARGET_FRAMES, MAX_TARGET_FRAMES);
                self.target_frames = (self.target_frames + 2).min(max_target);
            }
        }
        self.outstanding = self.outstanding.saturating_sub(pcm.len());
        self.pushed_tick = self.tick;
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
        let catch_up = if self.catch_up_until.is_some() {
            self.owed
                .div_ceil(self.frame_bytes)
                .min(CATCH_UP_EXTRA_FRAMES)
        } else if self.pause.is_some_and(|p| p.back_tick.is_some()) {
            // Ask for more than a live stream can have: an agent with audio ahead sends it at
            // once, one answering as it produces leaves the request open.
            CATCH_UP_EXTRA_FRAMES
        } else {
            0
        };
        let target = (self.target_frames + catch_up) * self.frame_bytes;
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
        self.last_played = 0;
        self.played_arrival = None;
        let late_tick = std::mem::take(&mut self.late_tick);
        if late_tick {
            if let Some(stall) = &mut self.stall {
                stall.server = true;
            }
        }
        self.watch_pause();
        self.catch_up();
        if self
            .stall
            .is_some_and(|s| self.tick - s.dry_tick >= MAX_STALL_TICKS)
        {
            // Dry this long, it is the end of an utterance: nothing will be owed.
            self.stall = None;
        }
        let held = self.buf.len();
        if held < 2 {
            if self.primed {
                // The clock wanted a frame and none was there: an underrun. Whether it was a
                // gap or the end of an utterance shows when (if) audio comes back.
                self.primed = false;
                self.dry_at = Some(self.tick);
                self.smooth_ticks = 0;
                if self.is_live() && self.outstanding > 0 && self.catch_up_until.is_none() {
                    self.stall = Some(SuspectedStall {
                        dry_tick: self.tick,
                        silent_from: self.pushed_tick,
                        ping: None,
                        server: late_tick,
                    });
                    self.pause = None;
                }
                self.live_ticks = 0;
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
        if self.catch_up_until.is_none() {
            // A pre-buffer grown for jitter (a loaded machine) holds live audio longer; a
            // stream answered from a queue ahead still holds nearly its whole target.
            let live_held = LIVE_HELD_FRAMES.max(self.prebuffer_frames + 1).min(
                self.target_frames
                    .saturating_sub(REQUEST_FRAMES)
                    .max(LIVE_HELD_FRAMES),
            ) * self.frame_bytes;
            if held <= live_held && self.outstanding > 0 {
                self.live_ticks = self.live_ticks.saturating_add(1);
            } else if held > live_held {
                self.live_ticks = 0;
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
        self.last_played = bytes;
        self.played_arrival = self.consume(bytes);
        self.smooth_ticks += 1;
        if self.smooth_ticks >= SMOOTH_TICKS {
            self.prebuffer_frames = (self.prebuffer_frames - 1).max(1);
            self.target_frames = (self.target_frames - 1).max(TARGET_FRAMES);
            self.smooth_ticks = 0;
        }
        true
    }

    /// Whether the stream is live: the agent has answered requests just in time lately.
    pub(crate) fn is_live(&self) -> bool {
        self.live_ticks >= LIVE_TICKS
    }

    /// Drops audio a stall left standing, at the start of a tick: whatever is held beyond what
    /// a live stream holds, up to the time owed. Audio arriving at real-time pace is never
    /// held beyond that, so only the agent's backlog is dropped.
    fn catch_up(&mut self) {
        let Some(until) = self.catch_up_until else {
            return;
        };
        if !self.catch_up_enabled {
            // The stall is still told apart (and a live stream's next one caught), but what
            // it left standing is kept.
            self.owed = 0;
        }
        let keep = CATCH_UP_KEEP_FRAMES * self.frame_bytes;
        let excess = self.buf.len().saturating_sub(keep);
        let drop = excess.min(self.owed);
        // Whole frames only, so that the samples keep their alignment.
        let drop = drop - drop % self.frame_bytes;
        if drop > 0 {
            self.buf.drain(..drop);
            self.consume(drop);
            self.owed -= drop;
            self.skipped += drop;
            self.skipped_total += drop as u64;
        }
        // Nothing beyond a frame held while a request stays open: the agent sends as it
        // makes, its backlog is gone. What is still owed was an overestimate; ending here
        // lets the stream count as live again, so that the next stall is caught.
        if drop == 0 && self.buf.len() <= keep && self.outstanding > 0 {
            self.drained_ticks += 1;
        } else {
            self.drained_ticks = 0;
        }
        if self.owed < self.frame_bytes || self.tick >= until || self.drained_ticks >= DRAINED_TICKS
        {
            self.finish_catch_up();
        }
    }

    fn finish_catch_up(&mut self) {
        if self.catch_up_until.take().is_some() && self.skipped > 0 {
            self.skipped_report = Some(Skipped {
                bytes: self.skipped,
                owed: self.owed_at_start,
            });
        }
        self.owed = 0;
        self.owed_at_start = 0;
        self.drained_ticks = 0;
        self.skipped = 0;
    }

    fn forget_stall(&mut self) {
        self.stall = None;
        self.pause = None;
        self.finish_catch_up();
    }

    /// Whether the audio that came back after a pause is a backlog: while it is watched, more
    /// is asked for than a live stream can have. An agent with audio ahead (an answer sent at
    /// once) answers every request in full, and nothing is owed; one that leaves requests open
    /// for the whole watch produces as it goes, so what it sent at once is what it made while
    /// briefly stalled, and the dry spell is owed as after any stall.
    fn watch_pause(&mut self) {
        let Some(pause) = &mut self.pause else {
            return;
        };
        let Some(back) = pause.back_tick else {
            if self.tick - pause.dry_tick >= MAX_STALL_TICKS {
                self.pause = None;
            }
            return;
        };
        // For two ticks after audio is back, the larger request may not be out yet (it can
        // wait for the next caller frame) or may still be in flight.
        if self.tick > back + 2 && self.outstanding == 0 {
            pause.answered += 1;
        }
        if pause.answered > 0 {
            self.pause = None;
        } else if self.tick >= back + WATCH_TICKS {
            let silent_ticks = back + 1 - pause.silent_from;
            self.pause = None;
            self.owed += (silent_ticks + OWED_MARGIN_TICKS) as usize * self.frame_bytes;
            self.owed_at_start = self.owed;
            self.catch_up_until = Some(self.tick + CATCH_UP_TICKS);
        }
    }

    /// How long a pong may take and still show the agent alive: twice the agent's usual round
    /// trip plus scheduling noise, once measured; [`PROMPT_PONG`] before.
    pub(crate) fn prompt_pong(&self) -> Duration {
        if self.rtts.len() < 3 {
            return PROMPT_PONG;
        }
        // On the stack: this runs on the media tick, which allocates nothing per frame.
        let mut rtts = [Duration::ZERO; RTT_SAMPLES];
        let n = self.rtts.len().min(RTT_SAMPLES);
        for (slot, rtt) in rtts.iter_mut().zip(&self.rtts) {
            *slot = *rtt;
        }
        let rtts = &mut rtts[..n];
        rtts.sort_unstable();
        (rtts[n / 2] * 2 + MIN_PROMPT_PONG).clamp(MIN_PROMPT_PONG, PROMPT_PONG)
    }

    /// Whether to ping the agent now, and the ping's number: a live stream has just run dry,
    /// or the agent's round trip is due to be measured. Records `now` as the ping's time.
    pub(crate) fn ping_due(&mut self, now: Instant) -> Option<u32> {
        let seq = self.next_ping;
        match &mut self.stall {
            Some(stall) if stall.ping.is_none() && !stall.server => {
                stall.ping = Some((seq, now));
            }
            Some(_) => return None,
            None if self.tick >= self.probe_tick && !self.late_tick => {
                // Quickly at first, so that the round trip is known early in the call.
                let every = if self.rtts.len() < 3 {
                    PROBE_TICKS / 10
                } else {
                    PROBE_TICKS
                };
                self.probe_tick = self.tick + every;
            }
            None => return None,
        }
        self.next_ping = seq.wrapping_add(1);
        self.ping_out = Some((seq, now));
        Some(seq)
    }

    /// The agent answered ping `seq` (`None`: a pong without our number) at `now`. A prompt
    /// answer while dry shows it alive: the dry spell is a pause in its audio, and nothing is
    /// owed for it unless the audio that comes back proves a backlog.
    pub(crate) fn pong(&mut self, seq: Option<u32>, now: Instant) {
        let Some((out, sent)) = self.ping_out else {
            return;
        };
        if seq.is_some_and(|seq| seq != out) {
            // An older ping's: it says nothing of the latest.
            return;
        }
        self.ping_out = None;
        let rtt = now.saturating_duration_since(sent);
        match self.stall {
            Some(stall) if stall.ping.is_some_and(|(n, _)| n == out) => {
                if !stall.server && rtt <= self.prompt_pong() {
                    self.stall = None;
                    self.pause = Some(Pause {
                        dry_tick: stall.dry_tick,
                        silent_from: stall.silent_from,
                        back_tick: None,
                        answered: 0,
                    });
                }
            }
            _ => {
                if self.rtts.len() == RTT_SAMPLES {
                    self.rtts.pop_front();
                }
                self.rtts.push_back(rtt);
            }
        }
    }

    /// The coming tick is three frames or more late: the server itself stalled, and the ticks it
    /// missed are about to be replayed at once. Caller audio reached the agent late by as
    /// much, so the agent's answers will stand that much behind: a live stream that runs dry in
    /// this burst owes the silence, whatever the agent's pong says.
    pub(crate) fn late_tick(&mut self) {
        self.late_tick = true;
    }

    /// A catch-up that dropped audio and has finished, once.
    pub(crate) fn take_skipped(&mut self) -> Option<Skipped> {
        self.skipped_report.take()
    }

    /// Bytes ever dropped to win back the time stalls left owed.
    pub(crate) fn skipped_total(&self) -> u64 {
        self.skipped_total
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

    /// Silent frames played in gaps, from running dry until the audio came back.
    pub(crate) fn gap_frames(&self) -> u64 {
        self.gap_frames
    }

    /// Places a mark after the audio received so far. With nothing held, it is reached at
    /// once ([`Playout::pop_reached_mark`]).
    pub(crate) fn place_mark(&mut self, mark: Mark) -> Result<(), TooManyMarks> {
        if self.marks.len() >= MAX_MARKS {
            return Err(TooManyMarks);
        }
        self.marks.push_back((self.pushed_total, mark));
        Ok(())
    }

    /// The oldest mark whose audio has all left the buffer (played, or dropped by a
    /// catch-up), if any.
    pub(crate) fn pop_reached_mark(&mut self) -> Option<Mark> {
        if self.marks.front()?.0 > self.consumed_total {
            return None;
        }
        self.marks.pop_front().map(|(_, mark)| mark)
    }

    /// Marks not reached yet.
    #[cfg(test)]
    pub(crate) fn marks_held(&self) -> usize {
        self.marks.len()
    }

    /// The marks the latest interrupt (or reset) dropped, oldest first.
    pub(crate) fn take_cleared_marks(&mut self) -> Vec<Mark> {
        std::mem::take(&mut self.cleared_marks)
    }

    fn clear_marks(&mut self) {
        self.cleared_marks
            .extend(self.marks.drain(..).map(|(_, mark)| mark));
    }

    /// Bytes of agent audio the latest tick played (0 for silence).
    pub(crate) fn last_played(&self) -> usize {
        self.last_played
    }

    /// Drops every unplayed byte and the marks among them; returns how many bytes.
    pub(crate) fn clear(&mut self) -> usize {
        self.clear_marks();
        let n = self.buf.len();
        self.buf.clear();
        self.forget_arrivals();
        // Silence after an interrupt is wanted, not a gap to adapt to.
        self.primed = false;
        self.dry_at = None;
        self.waited = 0;
        self.forget_stall();
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
        assert_eq!(p.gap_frames(), 1, "the one dry tick");
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
        assert_eq!((p.gaps(), p.gap_frames()), (1, 1));
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

    fn mark(name: &str) -> Mark {
        Mark {
            name: name.into(),
            id: None,
        }
    }

    fn reached(p: &mut Playout) -> Vec<String> {
        std::iter::from_fn(|| p.pop_reached_mark())
            .map(|m| m.name.into())
            .collect()
    }

    #[test]
    fn a_mark_is_reached_when_the_audio_before_it_has_played() {
        let mut p = Playout::new(4, 10_000);
        let mut out = [0i16; 2];
        // A frame and a half, the mark, then more audio.
        p.push(&[1; 6], Instant::now());
        p.place_mark(mark("a")).unwrap();
        p.push(&[1; 8], Instant::now());
        assert_eq!(p.marks_held(), 1);
        assert!(p.pop_frame(&mut out));
        assert_eq!(p.last_played(), 4);
        assert!(reached(&mut p).is_empty(), "half of its audio still held");
        assert!(p.pop_frame(&mut out));
        assert_eq!(reached(&mut p), ["a"]);
        assert_eq!(p.marks_held(), 0);
    }

    #[test]
    fn a_mark_with_nothing_held_is_reached_at_once() {
        let mut p = Playout::new(4, 10_000);
        p.place_mark(mark("now")).unwrap();
        assert_eq!(reached(&mut p), ["now"]);
        // Also after everything held has played.
        let mut out = [0i16; 2];
        p.push(&[1; 4], Instant::now());
        p.pop_frame(&mut out);
        p.place_mark(mark("again")).unwrap();
        assert_eq!(reached(&mut p), ["again"]);
    }

    #[test]
    fn clear_and_reset_report_the_marks_they_drop() {
        let mut p = Playout::new(4, 10_000);
        let mut out = [0i16; 2];
        p.push(&[1; 4], Instant::now());
        p.place_mark(mark("played")).unwrap();
        p.push(&[1; 8], Instant::now());
        p.place_mark(mark("b")).unwrap();
        p.place_mark(mark("c")).unwrap();
        p.pop_frame(&mut out);
        assert_eq!(reached(&mut p), ["played"]);
        assert_eq!(p.clear(), 8);
        let cleared: Vec<_> = p.take_cleared_marks().into_iter().map(|m| m.name).collect();
        assert_eq!(cleared, ["b".into(), "c".into()] as [Box<str>; 2]);
        assert!(
            reached(&mut p).is_empty(),
            "cleared marks are never reached"
        );
        p.push(&[1; 4], Instant::now());
        p.place_mark(mark("d")).unwrap();
        p.reset(4);
        assert_eq!(p.take_cleared_marks().len(), 1);
        assert!(p.take_cleared_marks().is_empty());
    }

    #[test]
    fn marks_are_bounded() {
        let mut p = Playout::new(4, 10_000);
        p.push(&[1; 4], Instant::now());
        for i in 0..MAX_MARKS {
            p.place_mark(mark(&i.to_string())).unwrap();
        }
        assert_eq!(p.place_mark(mark("one too many")), Err(TooManyMarks));
        let mut out = [0i16; 2];
        p.pop_frame(&mut out);
        assert_eq!(reached(&mut p).len(), MAX_MARKS);
        p.place_mark(mark("room again")).unwrap();
    }

    #[test]
    fn marks_in_audio_a_catch_up_drops_are_reached_not_lost() {
        // A live echo agent stalls; each frame it makes carries a mark. The catch-up drops
        // part of its backlog, marks included in what it drops: each is still reached, in
        // order, none left behind.
        let mut p = Playout::new(FRAME, 10_000);
        let mut agent = Agent::new();
        let t0 = Instant::now();
        let mut out = [0i16; FRAME / 2];
        let mut placed = 0u32;
        let mut seen = Vec::new();
        for tick in 0..400u64 {
            let now = t0 + TICK * tick as u32;
            if tick == 200 {
                agent.stalled_until = 215;
            }
            agent.inbox.push_back(tick as i16);
            if !agent.stalled(tick) {
                if let Some(seq) = agent.ping_waiting.take() {
                    p.pong(Some(seq), now);
                }
                agent.ring.extend(agent.inbox.drain(..));
                while agent.owed >= FRAME {
                    let Some(stamp) = agent.ring.pop_front() else {
                        break;
                    };
                    agent.owed -= FRAME;
                    let b = stamp.to_le_bytes();
                    p.push(&[b[0], b[1], b[0], b[1]], now);
                    p.place_mark(mark(&placed.to_string())).unwrap();
                    placed += 1;
                }
            }
            p.pop_frame(&mut out);
            seen.extend(reached(&mut p));
            if let Some(seq) = p.ping_due(now + TICK / 2) {
                if agent.stalled(tick) {
                    agent.ping_waiting = Some(seq);
                } else {
                    p.pong(Some(seq), now + TICK / 2 + Duration::from_millis(1));
                }
            }
            if let Some(bytes) = p.want() {
                p.requested(bytes);
                agent.owed += bytes;
            }
        }
        assert!(p.skipped_total() > 0, "the stall's backlog was dropped");
        let expected: Vec<String> = (0..placed - p.marks_held() as u32)
            .map(|i| i.to_string())
            .collect();
        assert_eq!(seen, expected, "every mark reached, in order");
        assert!(p.marks_held() <= 2);
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

    /// An agent on the far side of the media connection, one step per 20 ms tick: it answers
    /// the buffer's requests in order with whole frames from its own ring buffer, as the Rust
    /// SDK does, and answers pings unless stalled. Every frame's samples carry the tick it was
    /// made at, so the delay of each played frame reads off its samples.
    struct Agent {
        /// Frames waiting in the agent's ring (their stamps).
        ring: VecDeque<i16>,
        /// Bytes the server asked for and the agent has not sent yet.
        owed: usize,
        /// Caller frames (stamps) sent to the agent and not read yet.
        inbox: VecDeque<i16>,
        /// Stalled until this tick (exclusive): reads and sends nothing.
        stalled_until: u64,
        /// A ping waits for its pong.
        ping_waiting: Option<u32>,
    }

    const FRAME: usize = 4;
    const TICK: std::time::Duration = std::time::Duration::from_millis(20);

    impl Agent {
        fn new() -> Self {
            Self {
                ring: VecDeque::new(),
                owed: 0,
                inbox: VecDeque::new(),
                stalled_until: 0,
                ping_waiting: None,
            }
        }

        fn stalled(&self, tick: u64) -> bool {
            tick < self.stalled_until
        }
    }

    /// Runs `ticks` ticks of a call. `caller(tick)`: whether the caller's frame of that tick
    /// is echoed (a live agent), or `None` to echo nothing. Returns the delay of each tick
    /// that played agent audio, in ticks, by tick.
    fn run(
        p: &mut Playout,
        agent: &mut Agent,
        ticks: std::ops::Range<u64>,
        mut stall_at: impl FnMut(u64) -> Option<u64>,
        mut makes: impl FnMut(u64) -> usize,
    ) -> Vec<(u64, i64)> {
        let t0 = Instant::now();
        let mut delays = Vec::new();
        let mut out = [0i16; FRAME / 2];
        for tick in ticks {
            let now = t0 + TICK * tick as u32;
            if let Some(len) = stall_at(tick) {
                agent.stalled_until = tick + len;
            }
            // The caller's audio of this tick reaches the agent at once.
            for _ in 0..makes(tick) {
                agent.inbox.push_back(tick as i16);
            }
            if !agent.stalled(tick) {
                if let Some(seq) = agent.ping_waiting.take() {
                    p.pong(Some(seq), now);
                }
                agent.ring.extend(agent.inbox.drain(..));
                while agent.owed >= FRAME {
                    let Some(stamp) = agent.ring.pop_front() else {
                        break;
                    };
                    agent.owed -= FRAME;
                    let b = stamp.to_le_bytes();
                    p.push(&[b[0], b[1], b[0], b[1]], now);
                }
            }
            let tick_at = now + TICK / 2;
            if p.pop_frame(&mut out) {
                delays.push((tick, tick as i64 - i64::from(out[0])));
            }
            if let Some(seq) = p.ping_due(tick_at) {
                if agent.stalled(tick) {
                    agent.ping_waiting = Some(seq);
                } else {
                    p.pong(Some(seq), tick_at + Duration::from_millis(1));
                }
            }
            if let Some(bytes) = p.want() {
                p.requested(bytes);
                agent.owed += bytes;
            }
        }
        delays
    }

    fn median(delays: &[(u64, i64)], from: u64, to: u64) -> i64 {
        let mut d: Vec<i64> = delays
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, d)| *d)
            .collect();
        assert!(!d.is_empty(), "audio played in {from}..{to}");
        d.sort_unstable();
        d[d.len() / 2]
    }

    #[test]
    fn a_live_stream_wins_back_the_delay_of_a_stall() {
        let mut p = Playout::new(FRAME, 10_000);
        let mut agent = Agent::new();
        // An echo agent: one frame per tick. Stalls of 300 ms at 4 s and of 500 ms at 10 s.
        let stalls = |t| match t {
            200 => Some(15),
            500 => Some(25),
            _ => None,
        };
        let delays = run(&mut p, &mut agent, 0..800, stalls, |_| 1);
        let before = median(&delays, 100, 200);
        assert!(before <= 1, "just in time before: {before} ticks");
        // Within 2 s of the stall's end, the delay is back.
        let after_first = median(&delays, 215 + 100, 500);
        assert!(
            after_first <= before,
            "back after the 300 ms stall: {after_first}"
        );
        let after_second = median(&delays, 525 + 100, 800);
        assert!(
            after_second <= before,
            "stalls do not add up: {after_second}"
        );
        let worst_late = delays
            .iter()
            .filter(|(t, _)| (215 + 100..500).contains(t) || *t >= 625)
            .map(|(_, d)| *d)
            .max()
            .unwrap();
        assert!(worst_late <= before, "every later frame: {worst_late}");
        // What was dropped is what the stalls owed: 15 + 25 frames, give or take the frame
        // the agent had buffered.
        let dropped = p.skipped_total() as usize / FRAME;
        assert!((38..=41).contains(&dropped), "dropped {dropped} frames");
        assert_eq!(agent.ring.len(), 0, "the agent's backlog drained");
    }

    #[test]
    fn without_catch_up_a_stall_keeps_every_frame_and_its_delay() {
        let mut p = Playout::new(FRAME, 10_000);
        p.set_catch_up(false);
        let mut agent = Agent::new();
        let stalls = |t| (t == 200).then_some(15);
        let delays = run(&mut p, &mut agent, 0..500, stalls, |_| 1);
        let before = median(&delays, 100, 200);
        let after = median(&delays, 315, 500);
        assert!(
            after >= before + 14,
            "the stall's delay stands: {before} -> {after}"
        );
        assert_eq!(p.skipped_total(), 0);
        assert_eq!(p.take_skipped(), None);
        // Every frame the agent made was played, in order.
        let played: Vec<u64> = delays.iter().map(|(t, d)| (*t as i64 - d) as u64).collect();
        assert!(
            played.windows(2).all(|w| w[1] == w[0] + 1),
            "no frame dropped"
        );
    }

    #[test]
    fn audio_that_misses_a_single_tick_is_jitter_and_never_dropped() {
        let mut p = Playout::new(FRAME, 10_000);
        let mut agent = Agent::new();
        // The agent stops for 40 ms now and then (a busy machine): the frame it had sent
        // covers one tick, the next finds nothing, and its audio is back before the one
        // after. One dry tick is delivery jitter, not a stall, and costs no audio.
        let hiccups = |t: u64| (t >= 100 && t % 50 == 0).then_some(2);
        run(&mut p, &mut agent, 0..600, hiccups, |_| 1);
        assert_eq!(p.skipped_total(), 0);
        assert_eq!(p.take_skipped(), None);
    }

    #[test]
    fn a_finished_catch_up_is_reported_once() {
        let mut p = Playout::new(FRAME, 10_000);
        let mut agent = Agent::new();
        let stalls = |t| (t == 100).then_some(15);
        run(&mut p, &mut agent, 0..150, stalls, |_| 1);
        let skipped = p.take_skipped().expect("a report");
        let owed = skipped.owed / FRAME;
        assert!(
            (14..=20).contains(&owed),
            "the silent ticks of the stall: {owed}"
        );
        assert_eq!(skipped.bytes, p.skipped_total() as usize);
        assert_eq!(p.take_skipped(), None);
    }

    #[test]
    fn audio_queued_ahead_plays_in_full_across_a_stall() {
        let mut p = Playout::new(FRAME, 10_000);
        let mut agent = Agent::new();
        // A 10 s synthesised answer, queued at once: frames stamped 0..500 in order.
        agent.ring.extend(0..500i16);
        let stalls = |t| match t {
            100 => Some(15),
            300 => Some(25),
            _ => None,
        };
        let mut played = Vec::new();
        let delays = run(&mut p, &mut agent, 0..700, stalls, |_| 0);
        for (tick, delay) in delays {
            played.push((tick as i64 - delay) as i16);
        }
        assert_eq!(
            played,
            (0..500).collect::<Vec<_>>(),
            "every frame, in order"
        );
        assert_eq!(p.skipped_total(), 0);
        assert_eq!(p.take_skipped(), None);
    }

    #[test]
    fn a_live_agent_that_pauses_loses_nothing() {
        let mut p = Playout::new(FRAME, 10_000);
        let mut agent = Agent::new();
        // A speech-to-speech model: live, silent for 300 ms while it thinks (alive: it answers
        // pings), then its next answer partly at once, faster than real time.
        let makes = |t: u64| match t {
            200..215 => 0,
            215 => 8,
            _ => 1,
        };
        let delays = run(&mut p, &mut agent, 0..400, |_| None, makes);
        assert_eq!(p.skipped_total(), 0);
        assert_eq!(p.take_skipped(), None);
        assert_plays_all_made(&delays, 200..400, makes);
    }

    /// Every frame made in `ticks` played, in order, but for the few still queued at the end.
    fn assert_plays_all_made(
        delays: &[(u64, i64)],
        ticks: std::ops::Range<u64>,
        makes: impl Fn(u64) -> usize,
    ) {
        let made: Vec<i64> = ticks
            .clone()
            .flat_map(|t| std::iter::repeat_n(t as i64, makes(t)))
            .collect();
        let played: Vec<i64> = delays
            .iter()
            .map(|(t, d)| *t as i64 - d)
            .filter(|stamp| *stamp >= ticks.start as i64)
            .collect();
        assert_eq!(
            played,
            made[..played.len()],
            "played in order, none skipped"
        );
        assert!(
            made.len() - played.len() <= 8,
            "{} left",
            made.len() - played.len()
        );
    }

    #[test]
    fn real_time_audio_after_a_stall_is_not_dropped() {
        // The agent stalls and makes nothing meanwhile: after it, audio comes at real-time
        // pace, so nothing stands to be won back and nothing is dropped.
        let mut p = Playout::new(FRAME, 10_000);
        let mut agent = Agent::new();
        let stalls = |t| (t == 100).then_some(15);
        let makes = |t: u64| usize::from(!(100..115).contains(&t));
        let delays = run(&mut p, &mut agent, 0..300, stalls, makes);
        assert_eq!(p.skipped_total(), 0);
        assert_plays_all_made(&delays, 100..300, makes);
    }

    #[test]
    fn a_stall_of_the_server_itself_is_won_back_though_the_agent_answers_pings() {
        // The server stops for 300 ms: the caller's audio of that time reaches the agent late
        // and all at once, and the missed ticks are replayed in a burst before the agent's
        // answers come back. The agent was alive all along (it answers a ping at once), yet its
        // echo now stands 300 ms behind.
        let mut p = Playout::new(FRAME, 10_000);
        let mut agent = Agent::new();
        let t0 = Instant::now();
        let mut out = [0i16; FRAME / 2];
        let mut delays = Vec::new();
        let mut pushed = 0;
        for tick in 0..400u64 {
            let now = t0 + TICK * tick as u32;
            agent.inbox.push_back(tick as i16);
            if (200..215).contains(&tick) {
                continue;
            }
            // Back from the stall, the missed ticks come at once, late.
            let burst = if tick == 215 { 16 } else { 1 };
            for i in 0..burst {
                if i + 1 < burst {
                    p.late_tick();
                }
                if p.pop_frame(&mut out) {
                    delays.push((tick, tick as i64 - i64::from(out[0])));
                }
                if let Some(seq) = p.ping_due(now) {
                    p.pong(Some(seq), now + Duration::from_millis(1));
                }
            }
            if let Some(bytes) = p.want() {
                p.requested(bytes);
                agent.owed += bytes;
            }
            // The caller's audio reaches the agent, which echoes it as the server asks.
            agent.ring.extend(agent.inbox.drain(..));
            while agent.owed >= FRAME {
                let Some(stamp) = agent.ring.pop_front() else {
                    break;
                };
                agent.owed -= FRAME;
                let b = stamp.to_le_bytes();
                p.push(&[b[0], b[1], b[0], b[1]], now);
                pushed += 1;
            }
        }
        assert!(pushed > 0);
        let before = median(&delays, 100, 200);
        let after = median(&delays, 215 + 100, 400);
        assert_eq!(after, before, "back within 2 s of the server's stall");
        assert!(p.skipped_total() > 0);
    }
}
