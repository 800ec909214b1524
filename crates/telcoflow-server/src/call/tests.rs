//! The call's decisions on time, driven with `now` values built by adding durations (no
//! clock read, no sockets, no sleeps), and its media clock's catch-up in paused time.
//!
//! A call here is a real actor on a real `Shared`; its legs, media connection and the network
//! it rings are the channels those would read, held by the test.

use super::actor::{CallActor, MEDIA_GRACE};
use super::handle::{CallHandle, CallInput, MediaLink, MediaOut, Queues};
use super::leg::{LegEvent, LegId, LegKind, LegLink, LegOutput, Refusal};
use crate::config::{Config, ConnectorConfig};
use crate::net::{AddressKind, Network, Networks, RingError};
use crate::state::Shared;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telcoflow_proto::SampleRate;
use telcoflow_proto::control::CloseReason;
use telcoflow_proto::media::{Command, CommandResponse, MediaServerFrame};
use telcoflow_proto::sim::HangupReason;
use telcoflow_sip::phase::PhaseAligner;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const MS: Duration = Duration::from_millis(1);
const RING_TIMEOUT: Duration = Duration::from_secs(30);
const CONN: u64 = 7;

/// The phones `call.connect` rings: each ring's outputs, kept for the test to read.
#[derive(Debug, Default)]
struct Phones {
    rung: Mutex<Vec<(LegId, mpsc::Receiver<LegOutput>)>>,
}

impl Network for Phones {
    fn serves(&self) -> AddressKind {
        AddressKind::Number
    }

    fn ring(&self, _: &str, _: &CallHandle, leg: LegId) -> Result<LegLink, RingError> {
        let (tx, rx) = mpsc::channel(64);
        self.rung.lock().unwrap().push((leg, rx));
        Ok(LegLink {
            rate: SampleRate::Hz16000,
            tx,
            kind: LegKind::Sim,
            quality: None,
        })
    }
}

struct Call {
    actor: CallActor,
    handle: CallHandle,
    queues: Queues,
    caller: mpsc::Receiver<LegOutput>,
    media: mpsc::Receiver<MediaOut>,
    phones: Arc<Phones>,
    /// When the call started: every instant of a test is this plus a duration.
    t0: Instant,
}

impl Call {
    /// A ringing incoming call at 16 kHz, with no media connection yet.
    fn incoming() -> Self {
        Self::new(None)
    }

    /// An outbound call (`session.create`) ringing its far end, the caller leg.
    fn outbound() -> Self {
        Self::new(Some(Default::default()))
    }

    fn new(outbound: Option<telcoflow_proto::control::SetupData>) -> Self {
        Self::new_on(outbound, LegKind::Sim)
    }

    /// A call whose caller is on the network `kind`.
    fn new_on(outbound: Option<telcoflow_proto::control::SetupData>, kind: LegKind) -> Self {
        Self::build(outbound, kind, None)
    }

    /// A call on a server that records into `recordings`.
    fn with_recordings(
        outbound: Option<telcoflow_proto::control::SetupData>,
        recordings: Option<Arc<crate::recording::Recordings>>,
    ) -> Self {
        Self::build(outbound, LegKind::Sim, recordings)
    }

    fn build(
        outbound: Option<telcoflow_proto::control::SetupData>,
        kind: LegKind,
        recordings: Option<Arc<crate::recording::Recordings>>,
    ) -> Self {
        let config = Config {
            ring_timeout_secs: RING_TIMEOUT.as_secs(),
            ..Config::development()
        };
        let phones = Arc::new(Phones::default());
        let mut shared = Shared::new(
            config,
            "ws://127.0.0.1:0".into(),
            Networks::default().with(phones.clone()),
            TaskTracker::new(),
            CancellationToken::new(),
        );
        shared.recordings = recordings;
        let shared = Arc::new(shared);
        let mut connector = ConnectorConfig::development("key", "connector");
        connector.transfer_targets = vec!["sip:*".into(), "+1555*".into()];
        let connector = Arc::new(connector);
        let (handle, queues) = CallHandle::new("+15550100", "+15550200", "connector");
        let (tx, caller) = mpsc::channel(64);
        let link = LegLink {
            rate: SampleRate::Hz16000,
            tx,
            kind,
            quality: None,
        };
        let t0 = Instant::now();
        let actor = CallActor::new(shared, connector, handle.clone(), link, outbound, t0);
        let (_, media) = mpsc::channel(1);
        Self {
            actor,
            handle,
            queues,
            caller,
            media,
            phones,
            t0,
        }
    }

    fn at(&self, after: Duration) -> Instant {
        self.t0 + after
    }

    fn input(&mut self, input: CallInput, after: Duration) {
        let now = self.at(after);
        self.actor.on_input(input, now);
    }

    /// Attaches a media connection (id [`CONN`]) at `after`.
    fn attach(&mut self, after: Duration) {
        let (tx, media) = mpsc::channel(64);
        let (reply, mut result) = oneshot::channel();
        let link = MediaLink { conn_id: CONN, tx };
        let attach = CallInput::MediaAttach {
            link,
            token_expired: false,
            reply,
        };
        self.input(attach, after);
        assert_eq!(result.try_recv(), Ok(Ok(())));
        self.media = media;
    }

    fn command(
        &mut self,
        after: Duration,
        name: &str,
        data: Option<Value>,
        timeout_ms: Option<u64>,
    ) {
        let command = Command {
            command_id: name.into(),
            command: name.into(),
            timeout_ms,
            data,
        };
        let input = CallInput::Command {
            conn_id: CONN,
            command,
        };
        self.input(input, after);
    }

    /// Claimed, media attached and answered at `after`.
    fn answered(after: Duration) -> Self {
        Self::answered_on(after, LegKind::Sim)
    }

    /// An incoming call from network `kind`, claimed, media attached and answered at `after`.
    fn answered_on(after: Duration, kind: LegKind) -> Self {
        let mut call = Self::new_on(None, kind);
        let setup = Default::default();
        call.input(CallInput::Claimed { setup }, after);
        call.attach(after);
        call.command(after, "call.answer", None, None);
        assert!(call.response().success);
        assert!(matches!(call.caller.try_recv(), Ok(LegOutput::Ringing)));
        assert!(matches!(call.caller.try_recv(), Ok(LegOutput::Answered)));
        call
    }

    /// The next command response the media connection got (skipping other frames).
    fn response(&mut self) -> CommandResponse {
        while let Ok(out) = self.media.try_recv() {
            if let MediaOut::Response(text) = out {
                match MediaServerFrame::decode(&text) {
                    Ok(MediaServerFrame::CommandResponse(r)) => return r,
                    other => panic!("not a command response: {other:?}"),
                }
            }
        }
        panic!("no command response");
    }

    fn hangup_of(rx: &mut mpsc::Receiver<LegOutput>) -> Option<HangupReason> {
        std::iter::from_fn(|| rx.try_recv().ok()).find_map(|out| match out {
            LegOutput::Hangup(reason) => Some(reason),
            _ => None,
        })
    }

    /// The destination leg `call.connect` rang.
    fn rung(&self) -> mpsc::Receiver<LegOutput> {
        let (leg, rx) = self.phones.rung.lock().unwrap().pop().expect("a ring");
        assert_eq!(leg, LegId(1));
        rx
    }

    fn connect(&mut self, after: Duration, ring_secs: u32, timeout_ms: Option<u64>) {
        let data = json!({ "ringTimeSeconds": ring_secs });
        self.command(after, "call.connect", Some(data), timeout_ms);
    }
}

#[test]
fn a_call_nobody_answers_ends_at_the_ring_timeout() {
    let mut call = Call::incoming();
    assert_eq!(call.actor.next_deadline(), Some(call.at(RING_TIMEOUT)));
    call.actor.on_deadline(call.at(RING_TIMEOUT - MS));
    assert!(!call.actor.ended, "a millisecond early");
    assert!(call.caller.try_recv().is_err());
    call.actor.on_deadline(call.at(RING_TIMEOUT));
    assert!(call.actor.ended);
    assert_eq!(
        Call::hangup_of(&mut call.caller),
        Some(HangupReason::NoAnswer)
    );
}

#[test]
fn an_answered_call_has_no_ring_deadline() {
    let call = Call::answered(Duration::from_secs(3));
    assert_eq!(call.actor.next_deadline(), None);
}

#[test]
fn a_lost_media_connection_ends_the_call_after_the_grace() {
    let mut call = Call::answered(Duration::ZERO);
    let lost = Duration::from_secs(5);
    let detach = CallInput::MediaDetach {
        conn_id: CONN,
        agent_closed: false,
    };
    call.input(detach, lost);
    assert_eq!(
        call.actor.next_deadline(),
        Some(call.at(lost + MEDIA_GRACE))
    );
    call.actor.on_deadline(call.at(lost + MEDIA_GRACE - MS));
    assert!(!call.actor.ended, "a millisecond early");
    call.actor.on_deadline(call.at(lost + MEDIA_GRACE));
    assert!(call.actor.ended);
    assert_eq!(
        Call::hangup_of(&mut call.caller),
        Some(HangupReason::Remote)
    );
}

#[test]
fn an_agent_back_within_the_grace_keeps_the_call() {
    let mut call = Call::answered(Duration::ZERO);
    let detach = CallInput::MediaDetach {
        conn_id: CONN,
        agent_closed: false,
    };
    call.input(detach, Duration::from_secs(1));
    call.attach(Duration::from_secs(1) + MEDIA_GRACE - MS);
    assert_eq!(call.actor.next_deadline(), None);
    call.actor.on_deadline(call.at(Duration::from_secs(60)));
    assert!(!call.actor.ended);
}

#[test]
fn connect_gives_up_at_its_ring_time() {
    let mut call = Call::answered(Duration::ZERO);
    let sent = Duration::from_secs(2);
    call.connect(sent, 5, None);
    let mut callee = call.rung();
    let ring_end = sent + Duration::from_secs(5);
    assert_eq!(call.actor.next_deadline(), Some(call.at(ring_end)));
    call.actor.on_deadline(call.at(ring_end - MS));
    assert!(callee.try_recv().is_err(), "a millisecond early");
    call.actor.on_deadline(call.at(ring_end));
    let response = call.response();
    assert!(!response.success);
    assert_eq!(response.error_code.as_deref(), Some("CALL_UNANSWERED"));
    assert_eq!(Call::hangup_of(&mut callee), Some(HangupReason::NoAnswer));
    assert!(!call.actor.ended, "the caller stays with the agent");
    assert_eq!(call.actor.next_deadline(), None);
}

#[test]
fn connect_gives_up_at_the_commands_timeout_before_its_ring_time() {
    let mut call = Call::answered(Duration::ZERO);
    let sent = Duration::from_secs(2);
    call.connect(sent, 5, Some(1500));
    let mut callee = call.rung();
    let timeout = sent + 1500 * MS;
    assert_eq!(call.actor.next_deadline(), Some(call.at(timeout)));
    call.actor.on_deadline(call.at(timeout));
    let response = call.response();
    assert_eq!(response.error_code.as_deref(), Some("TIMEOUT"));
    assert_eq!(Call::hangup_of(&mut callee), Some(HangupReason::Remote));
}

#[test]
fn a_destination_answering_in_time_clears_the_connect_deadlines() {
    let mut call = Call::answered(Duration::ZERO);
    call.connect(Duration::from_secs(1), 5, Some(3000));
    let _callee = call.rung();
    let answered = CallInput::Leg {
        leg: LegId(1),
        event: LegEvent::Answered,
    };
    call.input(answered, Duration::from_secs(3));
    assert!(call.response().success);
    assert_eq!(call.actor.next_deadline(), None);
}

/// The media clock starts at the answer, at a phase of its own; the agent's first audio
/// restarts it a margin after that audio landed.
#[test]
fn the_first_agent_audio_moves_the_next_tick_to_just_after_it() {
    let mut call = Call::answered(Duration::ZERO);
    let frame = call.actor.playout.frame_bytes();
    let landed = Duration::from_millis(37);
    let audio = CallInput::AgentAudio {
        conn_id: CONN,
        pcm: vec![0u8; frame].into(),
    };
    call.input(audio, landed);
    let margin = PhaseAligner::default().first_audio().unwrap();
    assert_eq!(call.actor.tick_at, Some(call.at(landed + margin)));
}

/// Agent audio that lands just after the tick it was due for (playout ran dry there) is
/// played a margin after it lands, not a whole frame later at the next tick.
#[test]
fn a_frame_that_misses_its_tick_plays_soon_after_it_lands() {
    let mut call = Call::answered(Duration::ZERO);
    let frame = call.actor.playout.frame_bytes();
    let audio = || CallInput::AgentAudio {
        conn_id: CONN,
        pcm: vec![1u8; frame].into(),
    };
    call.input(audio(), 5 * MS);
    let first_tick = call
        .actor
        .tick_at
        .take()
        .expect("the first audio moves the clock");
    assert!(call.actor.on_tick(first_tick).is_none());
    // The next tick finds nothing: the agent's next frame is late.
    let next_tick = first_tick + 20 * MS;
    call.actor.on_tick(next_tick);
    assert!(call.actor.playout.ran_dry_at_last_tick());
    let landed = next_tick + 3 * MS - call.t0;
    call.input(audio(), landed);
    let at = call.actor.tick_at.expect("the late frame moves the clock");
    assert!(
        at > call.at(landed) && at < next_tick + 20 * MS,
        "plays {:?} after landing",
        at - call.at(landed)
    );
}

/// A stalled call catches up: the ticks it missed come at once, so its legs still get one
/// frame per 20 ms of the time that passed. Paused time: the stall is a jump of the clock.
#[tokio::test(start_paused = true)]
async fn the_media_clock_catches_up_after_a_stall() {
    let Call {
        actor,
        handle,
        queues: (control, data),
        mut caller,
        ..
    } = Call::incoming();
    let task = tokio::spawn(actor.run(control, data));
    let (tx, mut media) = mpsc::channel(64);
    let (reply, attached) = oneshot::channel();
    handle
        .send_wait(CallInput::Claimed {
            setup: Default::default(),
        })
        .await;
    let link = MediaLink { conn_id: CONN, tx };
    let attach = CallInput::MediaAttach {
        link,
        token_expired: false,
        reply,
    };
    handle.send_wait(attach).await;
    assert_eq!(attached.await, Ok(Ok(())));
    let answer = Command {
        command_id: "a".into(),
        command: "call.answer".into(),
        timeout_ms: None,
        data: None,
    };
    handle
        .send_data(CallInput::Command {
            conn_id: CONN,
            command: answer,
        })
        .await;
    // The answer is handled (and the clock started) before its response arrives.
    loop {
        if let Some(MediaOut::Response(_)) = media.recv().await {
            break;
        }
    }
    let answered_at = Instant::now();
    assert!(matches!(caller.recv().await, Some(LegOutput::Ringing)));
    assert!(matches!(caller.recv().await, Some(LegOutput::Answered)));

    tokio::time::advance(100 * MS).await;
    for tick in 1..=5 {
        let frame = caller.recv().await;
        assert!(matches!(frame, Some(LegOutput::Audio(_))), "tick {tick}");
        assert_eq!(
            Instant::now(),
            answered_at + 100 * MS,
            "tick {tick} of the stall comes at once"
        );
    }
    assert!(matches!(caller.recv().await, Some(LegOutput::Audio(_))));
    assert_eq!(Instant::now(), answered_at + 120 * MS, "then one per 20 ms");
    let close = CallInput::Close {
        reason: CloseReason::ForceClose,
        done: None,
    };
    assert!(handle.send(close));
    task.await.unwrap();
}

#[test]
fn a_busy_destination_is_unanswered_on_connect() {
    let mut call = Call::answered(Duration::ZERO);
    call.connect(MS, 5, None);
    let _callee = call.rung();
    let busy = CallInput::Leg {
        leg: LegId(1),
        event: LegEvent::Rejected(Refusal::Busy),
    };
    call.input(busy, 2 * MS);
    let response = call.response();
    assert_eq!(response.error_code.as_deref(), Some("CALL_UNANSWERED"));
    let message = response.error_message.unwrap_or_default();
    assert!(message.contains("is busy"), "{message}");
    assert!(!call.actor.ended, "the caller stays with the agent");
}

#[test]
fn a_busy_far_end_answers_an_outbound_answer_as_connect_would() {
    let mut call = Call::outbound();
    call.attach(MS);
    call.command(MS, "call.answer", None, None);
    let busy = CallInput::Leg {
        leg: LegId::CALLER,
        event: LegEvent::Rejected(Refusal::Busy),
    };
    call.input(busy, 2 * MS);
    let response = call.response();
    assert!(!response.success);
    assert_eq!(response.error_code.as_deref(), Some("CALL_UNANSWERED"));
    let message = response.error_message.unwrap_or_default();
    assert!(message.contains("is busy"), "{message}");
    assert!(call.actor.ended);
}

#[test]
fn an_unreachable_far_end_says_why() {
    let mut call = Call::outbound();
    call.attach(MS);
    call.command(MS, "call.answer", None, None);
    let unreachable = CallInput::Leg {
        leg: LegId::CALLER,
        event: LegEvent::Rejected(Refusal::Unreachable("cannot resolve pbx.invalid".into())),
    };
    call.input(unreachable, 2 * MS);
    let response = call.response();
    assert_eq!(response.error_code.as_deref(), Some("CALL_REJECTED"));
    let message = response.error_message.unwrap_or_default();
    assert!(message.contains("cannot resolve pbx.invalid"), "{message}");
}

/// What an agent's media connection saw over some ticks.
#[derive(Debug, Default)]
struct AgentSaw {
    /// Pings that came while the agent was stalled.
    stalled_pings: usize,
    /// `dropped_ms` of every `call.audio_skipped` event.
    skipped_ms: Vec<u64>,
    /// Frames of the agent's audio waiting, in its ring or the server's buffer, at each tick:
    /// the delay the caller hears beyond the network's, in frames.
    waiting: Vec<usize>,
    /// Frames the agent sent.
    sent: usize,
    /// Frames left in the agent's ring at the end.
    backlog: usize,
}

impl AgentSaw {
    /// The most frames waiting at any tick in `ticks` (ticks count from 1).
    fn worst(&self, ticks: std::ops::Range<u64>) -> usize {
        let waiting = &self.waiting[(ticks.start - 1) as usize..(ticks.end - 1) as usize];
        waiting.iter().copied().max().unwrap()
    }
}

/// Runs ticks `1..ticks` of an answered call with an agent that keeps a ring of frames and
/// sends them as the server asks, like the SDKs: `ahead` frames queued at the start, then
/// `makes(tick)` more each tick (an echo makes one). While `stalled(tick)` it reads and sends
/// nothing and answers no ping; otherwise it answers pings at once.
fn run_agent(
    ticks: u64,
    ahead: usize,
    makes: impl Fn(u64) -> usize,
    stalled: impl Fn(u64) -> bool,
) -> AgentSaw {
    let mut call = Call::answered(Duration::ZERO);
    let frame = call.actor.playout.frame_bytes();
    // The request sent at attach was read with the answer's response.
    let mut owed = call.actor.playout.outstanding();
    let mut ring = ahead;
    let mut saw = AgentSaw::default();
    let mut pongs: Vec<u32> = Vec::new();
    for tick in 1..ticks {
        let now = 20 * MS * tick as u32;
        ring += makes(tick);
        if !stalled(tick) {
            for seq in pongs.drain(..) {
                call.input(
                    CallInput::MediaPong {
                        conn_id: CONN,
                        seq: Some(seq),
                    },
                    now,
                );
            }
            while owed >= frame && ring > 0 {
                owed -= frame;
                ring -= 1;
                saw.sent += 1;
                let audio = CallInput::AgentAudio {
                    conn_id: CONN,
                    pcm: vec![1u8; frame].into(),
                };
                call.input(audio, now);
            }
        }
        call.actor.on_tick(call.at(now + 10 * MS));
        saw.waiting
            .push(ring + call.actor.playout.buffered() / frame);
        while let Ok(out) = call.media.try_recv() {
            match out {
                MediaOut::Ping(seq) => {
                    if stalled(tick) {
                        saw.stalled_pings += 1;
                        pongs.push(seq);
                    } else {
                        let pong = CallInput::MediaPong {
                            conn_id: CONN,
                            seq: Some(seq),
                        };
                        call.input(pong, now + 11 * MS);
                    }
                }
                MediaOut::Json(json) => {
                    let text = std::str::from_utf8(&json).unwrap();
                    if let Ok(MediaServerFrame::BufferRequest(req)) = MediaServerFrame::decode(text)
                    {
                        owed += req.requested_bytes as usize;
                    }
                }
                MediaOut::Text(text) => {
                    if let Ok(MediaServerFrame::CallEvent(ev)) = MediaServerFrame::decode(&text) {
                        if ev.event == "call.audio_skipped" {
                            assert_eq!(ev.str_field("reason"), Some("agent_stall"));
                            saw.skipped_ms
                                .push(ev.fields["dropped_ms"].as_u64().unwrap());
                        }
                    }
                }
                _ => {}
            }
        }
        while call.caller.try_recv().is_ok() {}
    }
    saw.backlog = ring;
    saw
}

/// An echo agent stalls for 300 ms: the call pings it when its live audio runs dry, gets no
/// pong until the stall ends, drops the backlog the stall left and reports it once.
#[test]
fn a_stalled_live_agent_is_pinged_and_its_backlog_dropped_and_reported() {
    let stalled = |t| (100..115).contains(&t);
    let saw = run_agent(300, 0, |_| 1, stalled);
    assert!(saw.stalled_pings >= 1, "pinged when the live audio ran dry");
    assert_eq!(saw.skipped_ms.len(), 1, "one report: {:?}", saw.skipped_ms);
    assert!(
        (280..=380).contains(&saw.skipped_ms[0]),
        "about the stall's length dropped: {:?}",
        saw.skipped_ms
    );
    assert!(
        saw.backlog <= 2,
        "the agent's backlog drained: {}",
        saw.backlog
    );
    assert!(saw.worst(215 + 50..299) <= saw.worst(50..100));
}

/// A short stall (40 ms, under the old fixed prompt-pong bound) and then a long one: each
/// leaves no standing delay, and the first does not make the stream look queued ahead, so the
/// second is caught too.
#[test]
fn a_short_stall_then_a_long_one_both_leave_no_delay() {
    let stalled = |t| (100..102).contains(&t) || (200..215).contains(&t);
    let saw = run_agent(400, 0, |_| 1, stalled);
    let before = saw.worst(50..100);
    assert!(before <= 2, "just in time before: {before} frames");
    assert_eq!(saw.worst(160..200), before, "back after the short stall");
    assert_eq!(saw.worst(315..400), before, "back after the long stall");
    let dropped: u64 = saw.skipped_ms.iter().sum();
    assert!(
        (320..=460).contains(&dropped),
        "about both stalls dropped: {:?}",
        saw.skipped_ms
    );
}

/// Several short stalls in a row never add up to a standing delay.
#[test]
fn short_stalls_do_not_add_up() {
    let stalled = |t: u64| t >= 100 && t % 60 < 2;
    let saw = run_agent(500, 0, |_| 1, stalled);
    let before = saw.worst(50..100);
    assert!(saw.worst(450..480) <= before, "no standing delay");
    assert!(!saw.skipped_ms.is_empty());
}

/// A 10 s answer synthesised and queued at once plays in full through a long and a short
/// stall of the agent: it owes nothing, so nothing is dropped or reported.
#[test]
fn a_queued_ahead_answer_plays_in_full_across_stalls() {
    let stalled = |t| (100..115).contains(&t) || (200..202).contains(&t);
    let saw = run_agent(600, 500, |_| 0, stalled);
    assert_eq!(saw.sent, 500, "every frame sent");
    assert_eq!(saw.skipped_ms, Vec::<u64>::new());
    assert_eq!(saw.waiting.last(), Some(&0), "and played");
}

/// A live agent that pauses (it answers the ping at once) and then sends its next answer
/// faster than real time loses nothing.
#[test]
fn a_pause_then_an_answer_sent_at_once_loses_nothing() {
    let makes = |t: u64| match t {
        100..115 => 0,
        115 => 20,
        _ => 1,
    };
    let saw = run_agent(300, 0, makes, |_| false);
    assert_eq!(saw.skipped_ms, Vec::<u64>::new());
}

/// A call whose server records into a directory of its own (removed when dropped).
struct Recorded {
    call: Call,
    store: Arc<crate::recording::Recordings>,
    dir: std::path::PathBuf,
}

impl Recorded {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("telcoflow-call-rec-{}", uuid::Uuid::new_v4()));
        let config = crate::config::RecordingConfig::new(&dir);
        let store =
            Arc::new(crate::recording::Recordings::open(config, TaskTracker::new()).unwrap());
        let mut call = Call::with_recordings(None, Some(store.clone()));
        let setup = Default::default();
        call.input(CallInput::Claimed { setup }, MS);
        call.attach(MS);
        Self { call, store, dir }
    }

    fn record(&mut self, after: Duration, action: Value) -> CommandResponse {
        self.call.command(after, "call.record", Some(action), None);
        self.call.response()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn call_record_checks_its_input_and_the_call_state() {
    let mut r = Recorded::new();
    let bad = r.record(MS, json!({ "action": "rewind" }));
    assert_eq!(bad.error_code.as_deref(), Some("INVALID_REQUEST"));
    assert!(
        bad.error_message.as_deref().unwrap().contains("\"start\""),
        "{bad:?}"
    );
    r.call.command(MS, "call.record", None, None);
    assert_eq!(
        r.call.response().error_code.as_deref(),
        Some("INVALID_REQUEST")
    );
    let early = r.record(MS, json!({ "action": "start" }));
    assert_eq!(
        early.error_code.as_deref(),
        Some("INVALID_STATE"),
        "{early:?}"
    );
    r.call.command(MS * 2, "call.answer", None, None);
    assert!(r.call.response().success);
    let stop = r.record(MS * 3, json!({ "action": "stop" }));
    assert_eq!(stop.error_code.as_deref(), Some("INVALID_STATE"));
    assert!(
        stop.error_message
            .as_deref()
            .unwrap()
            .contains("no recording"),
        "{stop:?}"
    );
    // Without [recording], the command says so.
    let mut plain = Call::answered(MS);
    plain.command(
        MS * 2,
        "call.record",
        Some(json!({ "action": "start" })),
        None,
    );
    let off = plain.response();
    assert_eq!(off.error_code.as_deref(), Some("RECORDING_NOT_CONFIGURED"));
    assert!(
        off.error_message
            .as_deref()
            .unwrap()
            .contains("[recording]"),
        "{off:?}"
    );
}

#[tokio::test]
async fn ticks_record_caller_left_and_agent_right_and_a_pause_leaves_audio_out() {
    let mut r = Recorded::new();
    r.call.command(MS * 2, "call.answer", None, None);
    assert!(r.call.response().success);
    let started = r.record(MS * 3, json!({ "action": "start" }));
    assert!(started.success, "{started:?}");
    let result = started.result.unwrap();
    assert_eq!(result["state"], "recording");
    assert_eq!(result["alreadyRecording"], false);
    let id: uuid::Uuid = result["recordingId"].as_str().unwrap().parse().unwrap();
    let again = r.record(MS * 3, json!({ "action": "start" }));
    assert_eq!(again.result.unwrap()["alreadyRecording"], true);
    // Each 20 ms: a caller frame of value 100 + n lands, then the agent's frame of -n is
    // played at the tick. Frames 10..20 are paused.
    let n = SampleRate::Hz16000.frame_samples();
    let pcm = |v: i16| -> Vec<u8> { (0..n).flat_map(|_| v.to_le_bytes()).collect() };
    let mut pool = super::frames::SamplePool::default();
    for i in 0..30u64 {
        let t = MS * 10 + MS * 20 * i as u32;
        if i == 10 {
            assert!(r.record(t, json!({ "action": "pause" })).success);
        }
        if i == 20 {
            let resumed = r.record(t, json!({ "action": "resume" }));
            assert_eq!(resumed.result.unwrap()["state"], "recording");
        }
        let frame = pool.frame(&vec![100 + i as i16; n]);
        r.call.input(
            CallInput::Leg {
                leg: LegId::CALLER,
                event: LegEvent::Audio(frame),
            },
            t,
        );
        r.call.input(
            CallInput::AgentAudio {
                conn_id: CONN,
                pcm: pcm(-(i as i16)).into(),
            },
            t,
        );
        let now = r.call.at(t + MS * 5);
        r.call.actor.on_tick(now);
    }
    let stopped = r.record(MS * 700, json!({ "action": "stop" }));
    assert_eq!(stopped.result.unwrap()["state"], "stopping");
    let info = r
        .store
        .finished_info("connector", &id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.paused_spans.len(), 1);
    assert_eq!(info.paused_spans[0].paused_ms, 200);
    assert_eq!(info.paused_spans[0].at_ms, 200);
    assert_eq!(info.duration_ms, 20 * 20);
    let mut reader = hound::WavReader::open(r.store.audio_path(&id)).unwrap();
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let frames: Vec<(i16, i16)> = samples
        .chunks_exact(2 * n)
        .map(|f| (f[2 * n - 2], f[2 * n - 1]))
        .collect();
    assert_eq!(frames.len(), 20);
    let left: Vec<i16> = frames.iter().map(|f| f.0).collect();
    let right: Vec<i16> = frames.iter().map(|f| f.1).collect();
    // Nothing of frames 10..20 on either side: the pause left them out.
    for v in 110..120 {
        assert!(
            !left.contains(&v),
            "paused caller audio {v} recorded: {left:?}"
        );
    }
    for v in -19..=-10 {
        assert!(
            !right.contains(&v),
            "paused agent audio {v} recorded: {right:?}"
        );
    }
    // The caller's frames in order (two frames behind, the queue's priming), the agent's as
    // played.
    let heard_left: Vec<i16> = left.iter().copied().filter(|v| *v != 0).collect();
    assert!(heard_left.windows(2).all(|w| w[0] < w[1]), "{left:?}");
    assert!(
        heard_left.contains(&100) && heard_left.contains(&127),
        "{left:?}"
    );
    assert!(right.iter().all(|v| *v <= 0), "{right:?}");
    assert!(right.contains(&-25), "{right:?}");
}

#[tokio::test]
async fn a_writer_that_falls_behind_never_stalls_the_call_and_its_losses_are_counted() {
    let mut r = Recorded::new();
    r.call.command(MS * 2, "call.answer", None, None);
    assert!(r.call.response().success);
    let started = r.record(MS * 3, json!({ "action": "start" }));
    let id: uuid::Uuid = started.result.unwrap()["recordingId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // 60 ticks without yielding to the writer task (this runtime has one thread): its queue
    // takes 50 frames, the other 10 are lost, and every tick still plays to the caller.
    let n = SampleRate::Hz16000.frame_samples();
    let pcm: Vec<u8> = (0..n).flat_map(|_| 7i16.to_le_bytes()).collect();
    let mut played = 0;
    for i in 0..60u32 {
        let t = MS * 10 + MS * 20 * i;
        let audio = CallInput::AgentAudio {
            conn_id: CONN,
            pcm: pcm.clone().into(),
        };
        r.call.input(audio, t);
        let now = r.call.at(t + MS * 5);
        r.call.actor.on_tick(now);
        // The caller's leg reads what it is sent.
        played += std::iter::from_fn(|| r.call.caller.try_recv().ok())
            .filter(|out| matches!(out, LegOutput::Audio(_)))
            .count();
    }
    assert_eq!(played, 60);
    let metrics = r.call.actor.shared.metrics.clone();
    assert_eq!(metrics.recordings_active.get(), 1);
    assert_eq!(metrics.recording_lost_frames.get(), 10);
    let stopped = r.record(MS * 1300, json!({ "action": "stop" }));
    assert_eq!(
        metrics.recordings_active.get(),
        0,
        "a stopped recording is not active"
    );
    assert_eq!(stopped.result.unwrap()["durationMs"], 1200);
    let info = r
        .store
        .finished_info("connector", &id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.lost_frames, 10);
    // The lost frames are silence at the end: the file keeps the call's timeline.
    assert_eq!(info.duration_ms, 1200);
    let mut reader = hound::WavReader::open(r.store.audio_path(&id)).unwrap();
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let right = |frame: usize| {
        samples[frame * 2 * n + 1..(frame + 1) * 2 * n]
            .iter()
            .step_by(2)
    };
    assert!(right(49).all(|s| *s == 7));
    assert!((50..60).all(|f| right(f).all(|s| *s == 0)));
}

impl Call {
    fn transfer(&mut self, after: Duration, target: &str, timeout_ms: Option<u64>) {
        let data = json!({ "target": target, "ringTimeSeconds": 20 });
        self.command(after, "call.transfer", Some(data), timeout_ms);
    }

    fn caller_event(&mut self, event: LegEvent, after: Duration) {
        let leg = LegId::CALLER;
        self.input(CallInput::Leg { leg, event }, after);
    }

    /// Every text frame the media connection got since the last look.
    fn frames(&mut self) -> Vec<MediaServerFrame> {
        std::iter::from_fn(|| self.media.try_recv().ok())
            .filter_map(|out| match out {
                MediaOut::Text(t) | MediaOut::Response(t) => MediaServerFrame::decode(&t).ok(),
                _ => None,
            })
            .collect()
    }

    /// A SIP caller answered at 0 s, sent a REFER to `TARGET` at 1 s.
    fn referred(timeout_ms: Option<u64>) -> Self {
        let mut call = Self::answered_on(Duration::ZERO, LegKind::Sip);
        call.transfer(Duration::from_secs(1), TARGET, timeout_ms);
        match call.caller.try_recv() {
            Ok(LegOutput::Refer { target }) => assert_eq!(target, TARGET),
            other => panic!("no REFER: {other:?}"),
        }
        call
    }
}

const TARGET: &str = "sip:desk@pbx.example";

fn events_of(frames: &[MediaServerFrame]) -> Vec<(String, Value)> {
    frames
        .iter()
        .filter_map(|f| match f {
            MediaServerFrame::CallEvent(e) => {
                Some((e.event.clone(), Value::Object(e.fields.clone())))
            }
            _ => None,
        })
        .collect()
}

fn response_of(frames: &[MediaServerFrame]) -> CommandResponse {
    frames
        .iter()
        .find_map(|f| match f {
            MediaServerFrame::CommandResponse(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no response in {frames:?}"))
}

#[test]
fn a_refer_nobody_answers_fails_at_its_deadline_and_the_call_stays() {
    let mut call = Call::referred(None);
    let deadline = Duration::from_secs(41);
    assert_eq!(call.actor.next_deadline(), Some(call.at(deadline)));
    call.actor.on_deadline(call.at(deadline - MS));
    assert!(call.frames().is_empty(), "a millisecond early");
    call.actor.on_deadline(call.at(deadline));
    let r = response_of(&call.frames());
    assert_eq!(r.error_code.as_deref(), Some("TIMEOUT"));
    assert_eq!(
        r.result,
        Some(json!({"method": "refer", "target": TARGET, "status": 408}))
    );
    assert!(!call.actor.ended);
    assert_eq!(call.actor.next_deadline(), None);
}

#[test]
fn an_accepted_refer_ends_the_call_as_transferred_at_the_final_notify() {
    let mut call = Call::referred(None);
    call.caller_event(
        LegEvent::ReferAnswered { status: 202 },
        Duration::from_secs(2),
    );
    // The ring time (20 s) and the margin for the final NOTIFY, from the 202.
    let deadline = Duration::from_secs(2 + 20) + super::transfer::NOTIFY_MARGIN;
    assert_eq!(call.actor.next_deadline(), Some(call.at(deadline)));
    let progress = |status, reason: &str, terminated| LegEvent::ReferProgress {
        status,
        reason: reason.into(),
        terminated,
    };
    call.caller_event(progress(100, "Trying", false), Duration::from_secs(2));
    call.caller_event(progress(180, "Ringing", false), Duration::from_secs(3));
    assert!(!call.actor.ended);
    call.caller_event(progress(200, "OK", true), Duration::from_secs(5));
    let frames = call.frames();
    let r = response_of(&frames);
    assert!(r.success, "{r:?}");
    assert_eq!(
        r.result,
        Some(json!({"method": "refer", "target": TARGET, "status": 200}))
    );
    let events = events_of(&frames);
    let progress: Vec<&Value> = events
        .iter()
        .filter(|(name, _)| name == "call.transfer_progress")
        .map(|(_, fields)| &fields["status"])
        .collect();
    assert_eq!(progress, [&json!(100), &json!(180), &json!(200)]);
    let (last, fields) = events.last().unwrap();
    assert_eq!(
        (last.as_str(), &fields["reason"]),
        ("call.terminated", &json!("transferred"))
    );
    assert!(call.actor.ended);
    // The server ends its dialog with the caller (BYE).
    assert_eq!(
        Call::hangup_of(&mut call.caller),
        Some(HangupReason::Remote)
    );
}

#[test]
fn an_accepted_refer_with_no_final_notify_fails_in_time() {
    let mut call = Call::referred(None);
    call.caller_event(
        LegEvent::ReferAnswered { status: 202 },
        Duration::from_secs(2),
    );
    let deadline = Duration::from_secs(2 + 20) + super::transfer::NOTIFY_MARGIN;
    call.actor.on_deadline(call.at(deadline));
    let r = response_of(&call.frames());
    assert_eq!(r.error_code.as_deref(), Some("TIMEOUT"));
    assert_eq!(r.result.unwrap()["status"], 202);
    assert!(!call.actor.ended);
    // A final NOTIFY after the command gave up still hands the caller over.
    let done = LegEvent::ReferProgress {
        status: 200,
        reason: "OK".into(),
        terminated: true,
    };
    call.caller_event(done, deadline + MS);
    assert!(call.actor.ended);
}

#[test]
fn a_target_that_does_not_answer_leaves_the_call_with_the_agent() {
    let mut call = Call::referred(None);
    call.caller_event(
        LegEvent::ReferAnswered { status: 202 },
        Duration::from_secs(2),
    );
    let busy = LegEvent::ReferProgress {
        status: 486,
        reason: "Busy Here".into(),
        terminated: true,
    };
    call.caller_event(busy, Duration::from_secs(3));
    let r = response_of(&call.frames());
    assert_eq!(r.error_code.as_deref(), Some("CALL_UNANSWERED"));
    assert_eq!(r.result.unwrap()["status"], 486);
    assert!(!call.actor.ended);
    assert_eq!(call.actor.next_deadline(), None);
    // Another transfer may follow.
    call.transfer(Duration::from_secs(4), TARGET, None);
    assert!(matches!(
        call.caller.try_recv(),
        Ok(LegOutput::Refer { .. })
    ));
}

#[test]
fn a_refused_refer_fails_with_its_status_unless_refer_is_unsupported() {
    let mut call = Call::referred(None);
    call.caller_event(
        LegEvent::ReferAnswered { status: 603 },
        Duration::from_secs(2),
    );
    let r = response_of(&call.frames());
    assert_eq!(r.error_code.as_deref(), Some("CALL_REJECTED"));
    assert!(r.error_message.unwrap().contains("SIP 603"));
    assert!(!call.actor.ended);
}

#[test]
fn a_caller_without_refer_is_bridged_to_the_target_the_server_dials() {
    let mut call = Call::answered_on(Duration::ZERO, LegKind::Sip);
    // A number is always dialled, even for a SIP caller.
    call.transfer(Duration::from_secs(1), "+15550300", None);
    let _callee = call.rung();
    assert!(call.caller.try_recv().is_err(), "no REFER for a number");
    let answered = CallInput::Leg {
        leg: LegId(1),
        event: LegEvent::Answered,
    };
    call.input(answered, Duration::from_secs(2));
    let frames = call.frames();
    let r = response_of(&frames);
    assert_eq!(
        r.result,
        Some(json!({"method": "bridge", "target": "+15550300"}))
    );
    assert!(call.actor.agent_left && !call.actor.ended);
    let (last, fields) = events_of(&frames).pop().unwrap();
    assert_eq!(
        (last.as_str(), &fields["reason"]),
        ("call.terminated", &json!("transferred"))
    );
}

#[test]
fn refer_refused_as_unsupported_falls_back_to_dialling() {
    let mut call = Call::referred(None);
    call.caller_event(
        LegEvent::ReferAnswered { status: 405 },
        Duration::from_secs(2),
    );
    // The Phones network serves numbers only: the SIP target cannot be dialled here.
    let r = response_of(&call.frames());
    assert_eq!(r.error_code.as_deref(), Some("CALL_REJECTED"));
    assert_eq!(
        r.result,
        Some(json!({"method": "bridge", "target": TARGET, "referStatus": 405}))
    );
    assert!(!call.actor.ended);
}

#[test]
fn one_transfer_at_a_time_and_no_connect_meanwhile() {
    let mut call = Call::referred(Some(5000));
    call.transfer(Duration::from_secs(2), TARGET, None);
    assert_eq!(call.response().error_code.as_deref(), Some("INVALID_STATE"));
    call.connect(Duration::from_secs(2), 5, None);
    assert_eq!(call.response().error_code.as_deref(), Some("INVALID_STATE"));
    // The command's own timeout comes before the REFER's deadline.
    assert_eq!(
        call.actor.next_deadline(),
        Some(call.at(Duration::from_secs(6)))
    );
    call.actor.on_deadline(call.at(Duration::from_secs(6)));
    assert_eq!(call.response().error_code.as_deref(), Some("TIMEOUT"));
    // The caller hanging up during a transfer fails it.
    call.transfer(Duration::from_secs(7), TARGET, None);
    call.caller_event(LegEvent::Hangup, Duration::from_secs(8));
    assert_eq!(
        call.response().error_code.as_deref(),
        Some("CALL_TERMINATED")
    );
}

/// The loudest sample of each audio frame the caller got since the last look.
fn caller_levels(rx: &mut mpsc::Receiver<LegOutput>) -> Vec<i16> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|out| match out {
            LegOutput::Audio(frame) => Some(frame.iter().map(|s| s.saturating_abs()).max()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn the_caller_hears_a_ringing_destinations_early_media_until_it_refuses() {
    let mut call = Call::answered(Duration::ZERO);
    call.frames();
    call.connect(MS, 20, None);
    let _callee = call.rung();
    let n = SampleRate::Hz16000.frame_samples();
    let mut pool = super::frames::SamplePool::default();
    let from_callee = |call: &mut Call, event: LegEvent, t: Duration| {
        call.input(
            CallInput::Leg {
                leg: LegId(1),
                event,
            },
            t,
        );
    };
    // Audio before any early media is nobody's.
    from_callee(
        &mut call,
        LegEvent::Audio(pool.frame(&vec![3000; n])),
        MS * 5,
    );
    call.actor.on_tick(call.at(MS * 10));
    assert!(caller_levels(&mut call.caller).iter().all(|l| *l == 0));
    from_callee(&mut call, LegEvent::EarlyMedia, MS * 20);
    let events = events_of(&call.frames());
    assert!(
        matches!(events.as_slice(), [(name, fields)] if name == "call.early_media" && fields["destination"].is_string()),
        "{events:?}"
    );
    for i in 0..5u32 {
        let t = MS * 30 + MS * 20 * i;
        from_callee(&mut call, LegEvent::Audio(pool.frame(&vec![3000; n])), t);
        call.actor.on_tick(call.at(t + MS * 5));
    }
    let heard = caller_levels(&mut call.caller);
    assert!(
        heard.iter().filter(|l| **l >= 2900).count() >= 4,
        "{heard:?}"
    );
    // The destination refuses: the connect fails, and the caller hears the silent agent.
    from_callee(&mut call, LegEvent::Rejected(Refusal::Busy), MS * 200);
    let response = response_of(&call.frames());
    assert_eq!(response.error_code.as_deref(), Some("CALL_UNANSWERED"));
    for i in 0..5u32 {
        call.actor.on_tick(call.at(MS * 210 + MS * 20 * i));
    }
    let heard = caller_levels(&mut call.caller);
    assert!(
        !heard.is_empty() && heard.iter().all(|l| *l == 0),
        "{heard:?}"
    );
}
