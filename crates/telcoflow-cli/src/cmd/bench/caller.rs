//! One bench caller: dials over the simulated phone network (or over SIP/RTP, see
//! [`super::sip_caller`]), streams marked speech in real time, reads the echo and runs
//! interrupt probes. [`Stream`] is the transport-free part both kinds of caller share.
//!
//! The caller speaks the simulated network protocol ([`telcoflow_proto::sim`]) directly rather
//! than through `telcoflow_sim`, because the measurement needs to stamp each
//! frame with the instant it is actually written to the socket and to choose each frame's
//! kind at that instant; the reusable phone paces queued clips on its own clock.
//!
//! # Interrupt probe
//!
//! Every few seconds the caller sends one [`Kind::Speak`] frame and then [`Kind::Probe`]
//! frames. Once it has heard the agent's tone for [`TONE_HEARD`], it sends [`Kind::Stop`] and
//! times how long until the first frame that is not tone arrives (silence or echo). Frames
//! sent during a probe are echoed but excluded from loss, lateness and round trip figures,
//! since the agent's buffer clear drops them on purpose.

use super::marker::{Kind, Marker, Scanner, is_tone, speech};
use super::stats::us;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use telcoflow_proto::SampleRate;
use telcoflow_proto::audio::{pcm_to_samples, samples_to_pcm};
use telcoflow_proto::sim::{NetworkFrame, PhoneFrame};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

/// How long a call may take to be answered.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the caller keeps listening after its last frame, so echoes in flight arrive.
pub(super) const DRAIN: Duration = Duration::from_millis(600);
/// The number every caller dials (the development connector takes every number).
pub(super) const CALLED: &str = "+15550009999";
/// First probe this long after answer, then every [`PROBE_EVERY`].
const FIRST_PROBE: Duration = Duration::from_secs(1);
/// Time between probe starts.
const PROBE_EVERY: Duration = Duration::from_secs(4);
/// Tone heard this long before the caller barges in.
const TONE_HEARD: Duration = Duration::from_millis(200);
/// A probe that sees no tone, or no end of tone, within this is given up (counted).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A probe starts only if the call has at least this long left (tone, barge-in, settle).
const PROBE_ROOM: Duration = Duration::from_millis(1500);
/// After the tone stops, probe frames continue this long so that the counted stream restarts
/// cleanly behind anything the clear dropped.
const PROBE_SETTLE: Duration = Duration::from_millis(100);
/// A frame arriving this much later than the call's typical (median) round trip is late: a
/// phone's 40 ms jitter buffer would already have played a gap in its place.
pub(crate) const LATE: Duration = Duration::from_millis(40);

/// What one call is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct CallPlan {
    pub(crate) base_url: String,
    pub(crate) index: usize,
    pub(crate) rate: SampleRate,
    /// Run epoch: frame stamps are microseconds since this instant.
    pub(crate) epoch: Instant,
    /// When to dial.
    pub(crate) dial_at: Instant,
    /// When to stop sending.
    pub(crate) end_at: Instant,
    /// Pre-made speech, looped.
    pub(crate) speech: Arc<Vec<i16>>,
    /// Dial over SIP/RTP to this SIP address instead of the simulated network.
    pub(crate) sip: Option<SocketAddr>,
    /// Run interrupt probes (off when measuring a stall: an interrupt clears the backlog a
    /// stall leaves, which would hide it).
    pub(crate) probes: bool,
}

/// Live counters shared by every caller, for the progress line.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) dialled: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) ended: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) frames_heard: AtomicU64,
}

/// What one call measured.
#[derive(Debug, Default)]
pub(crate) struct CallReport {
    pub(crate) answered: bool,
    /// Answered, but the hang-up failed (over SIP: the BYE got no 200).
    pub(crate) hangup_failed: bool,
    pub(crate) failure: Option<String>,
    pub(crate) setup_us: Option<u32>,
    /// Counted (data) frames sent.
    pub(crate) frames_sent: u64,
    /// All frames sent, probes included.
    pub(crate) frames_sent_all: u64,
    pub(crate) frames_lost: u64,
    pub(crate) frames_duplicated: u64,
    pub(crate) frames_reordered: u64,
    pub(crate) frames_late: u64,
    /// Round trip of every counted frame heard back.
    pub(crate) rtt_us: Vec<u32>,
    /// When each of them was heard, microseconds since the run's epoch.
    pub(crate) heard_us: Vec<u32>,
    /// Stop sent -> first non-tone frame, per completed probe.
    pub(crate) interrupt_us: Vec<u32>,
    pub(crate) probes_failed: u64,
    /// Frames heard that carried another caller's marker (should never happen).
    pub(crate) crossed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ProbeState {
    Idle {
        next: Instant,
    },
    /// Speak sent; waiting for the tone.
    WaitTone {
        since: Instant,
    },
    /// Tone heard at `heard`; stop goes out at `heard + TONE_HEARD`.
    Hearing {
        heard: Instant,
    },
    /// Stop sent at `at`; waiting for a frame that is not tone.
    Stopped {
        at: Instant,
    },
    /// Tone gone; counted frames resume at `until`.
    Settle {
        until: Instant,
    },
}

/// Runs one call to its end. Never fails: problems are recorded in the report.
pub(crate) async fn run(plan: CallPlan, progress: Arc<Progress>) -> CallReport {
    let mut report = CallReport::default();
    tokio::time::sleep_until(plan.dial_at).await;
    progress.dialled.fetch_add(1, Ordering::Relaxed);
    let result = match plan.sip {
        Some(addr) => super::sip_caller::drive(&plan, addr, &progress, &mut report).await,
        None => drive(&plan, &progress, &mut report).await,
    };
    if let Err(e) = result {
        report.failure = Some(e);
    }
    if report.answered {
        progress.ended.fetch_add(1, Ordering::Relaxed);
    } else {
        progress.failed.fetch_add(1, Ordering::Relaxed);
    }
    report
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn drive(
    plan: &CallPlan,
    progress: &Progress,
    report: &mut CallReport,
) -> Result<(), String> {
    let url = telcoflow_sim::sim_url(&plan.base_url).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // TCP_NODELAY, like a real media client: frames must not wait behind Nagle's algorithm.
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true)
            .await
            .map_err(|e| format!("connect: {e}"))?;
    let dial = PhoneFrame::Dial {
        from: format!("+1555{:07}", plan.index),
        to: CALLED.into(),
        sample_rate: plan.rate,
    };
    send_text(&mut ws, dial.encode()).await?;

    // Until answered.
    let answer_deadline = started + ANSWER_TIMEOUT;
    loop {
        let msg = tokio::select! {
            // Cancel-safe: WebSocketStream::next keeps partial frames inside the stream.
            m = ws.next() => m,
            () = tokio::time::sleep_until(answer_deadline) => {
                let _ = ws.close(None).await;
                return Err("not answered in time".into());
            }
        };
        match msg {
            Some(Ok(Message::Text(t))) => match NetworkFrame::decode(t.as_str()) {
                Ok(NetworkFrame::Answered { .. }) => break,
                Ok(NetworkFrame::Hangup { reason, .. }) => {
                    return Err(format!("hung up before answer: {}", reason.as_str()));
                }
                Ok(NetworkFrame::Error { message }) => return Err(format!("refused: {message}")),
                Ok(_) => {}
                Err(e) => return Err(format!("bad frame from the network: {e}")),
            },
            Some(Ok(Message::Close(_))) | None => return Err("closed before answer".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("connection failed: {e}")),
        }
    }
    let answered_at = Instant::now();
    report.answered = true;
    report.setup_us = Some(us(answered_at - started));
    progress.answered.fetch_add(1, Ordering::Relaxed);

    let mut stream = Stream::new(plan, answered_at);
    let result = run_ws(&mut stream, &mut ws, progress).await;
    stream.finish(report);
    let _ = ws.send(Message::text(PhoneFrame::Hangup.encode())).await;
    let _ = ws.close(None).await;
    result
}

/// A small read buffer: tungstenite zero-fills the free part of it before every socket read.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

async fn send_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("send failed: {e}"))
}

/// The streaming phase over the simulated network.
async fn run_ws(stream: &mut Stream<'_>, ws: &mut Ws, progress: &Progress) -> Result<(), String> {
    let mut pacer = Pacer::new(stream.plan.end_at);
    let mut pcm = Vec::with_capacity(stream.frame.len() * 2);
    let mut rx = Vec::with_capacity(stream.frame.len());
    loop {
        tokio::select! {
            // Cancel-safe: WebSocketStream::next keeps partial frames inside the stream.
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    progress.frames_heard.fetch_add(1, Ordering::Relaxed);
                    rx.clear();
                    pcm_to_samples(&b, &mut rx);
                    stream.on_samples(&rx, Instant::now());
                }
                Some(Ok(Message::Text(t))) => {
                    if let Ok(NetworkFrame::Hangup { reason, .. }) = NetworkFrame::decode(t.as_str()) {
                        return Err(format!("hung up by the network: {}", reason.as_str()));
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Err("network closed the call".into()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("connection failed: {e}")),
            },
            // Cancel-safe: see Pacer::next_frame_at.
            at = pacer.next_frame_at() => {
                let Some(now) = at else { return Ok(()) };
                pcm.clear();
                samples_to_pcm(stream.next_frame(now), &mut pcm);
                ws.send(Message::binary(pcm.clone()))
                    .await
                    .map_err(|e| format!("send failed: {e}"))?;
                progress.frames_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The sending clock of the streaming phase, whatever carries it: a frame every 20 ms until
/// the plan's end, then a drain of [`DRAIN`] for the audio still on its way back.
pub(super) struct Pacer {
    ticker: Interval,
    end_at: Instant,
    sending: bool,
    drain_until: Instant,
}

impl Pacer {
    pub(super) fn new(end_at: Instant) -> Self {
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        // Like a microphone that fell behind: send late rather than in a burst.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            ticker,
            end_at,
            sending: true,
            drain_until: end_at + DRAIN,
        }
    }

    /// Waits until the next frame is due and returns the time to stamp it with; `None` once
    /// the drain after the last frame is over.
    ///
    /// Cancel-safe: `Interval::tick` is, and the switch to draining is stored before the
    /// drain's sleep, which a later call starts again with the same deadline.
    pub(super) async fn next_frame_at(&mut self) -> Option<Instant> {
        if self.sending {
            self.ticker.tick().await;
            let now = Instant::now();
            if now < self.end_at {
                return Some(now);
            }
            self.sending = false;
            self.drain_until = now + DRAIN;
        }
        tokio::time::sleep_until(self.drain_until).await;
        None
    }
}

/// The streaming phase of a call, whatever carries it: builds each marked frame, and reads
/// what comes back for round trips, losses and the interrupt probes.
pub(super) struct Stream<'a> {
    pub(super) plan: &'a CallPlan,
    seq: u32,
    speech_pos: usize,
    frame: Vec<i16>,
    scanner: Scanner,
    /// Markers found in the latest audio (kept to reuse its storage).
    found: Vec<Marker>,
    probe: ProbeState,
    /// Per data sequence number: times heard.
    heard: Vec<u8>,
    is_data: Vec<bool>,
    highest: Option<u32>,
    /// Round trip of each counted frame heard, microseconds.
    rtt_us: Vec<u32>,
    /// When each was heard, microseconds since the epoch.
    heard_us: Vec<u32>,
    interrupt_us: Vec<u32>,
    probes_failed: u64,
    crossed: u64,
    duplicated: u64,
    reordered: u64,
    sent_all: u64,
}

impl<'a> Stream<'a> {
    pub(super) fn new(plan: &'a CallPlan, answered_at: Instant) -> Self {
        let n = plan.rate.frame_samples();
        let frames = (plan
            .end_at
            .saturating_duration_since(answered_at)
            .as_millis()
            / 20) as usize
            + 8;
        Self {
            plan,
            seq: 0,
            speech_pos: (plan.index * 997) % plan.speech.len().max(1),
            frame: vec![0; n],
            scanner: Scanner::default(),
            found: Vec::with_capacity(4),
            probe: ProbeState::Idle {
                // Never, without probes: no probe starts at or after `end_at`.
                next: if plan.probes {
                    answered_at + FIRST_PROBE
                } else {
                    plan.end_at
                },
            },
            heard: Vec::with_capacity(frames),
            is_data: Vec::with_capacity(frames),
            highest: None,
            rtt_us: Vec::with_capacity(frames),
            heard_us: Vec::with_capacity(frames),
            interrupt_us: Vec::new(),
            probes_failed: 0,
            crossed: 0,
            duplicated: 0,
            reordered: 0,
            sent_all: 0,
        }
    }

    fn kind_now(&mut self, now: Instant) -> Kind {
        match self.probe {
            ProbeState::Idle { next } if now >= next && now + PROBE_ROOM < self.plan.end_at => {
                self.probe = ProbeState::WaitTone { since: now };
                Kind::Speak
            }
            ProbeState::Idle { .. } => Kind::Data,
            ProbeState::WaitTone { since } if now - since > PROBE_TIMEOUT => self.give_up(now),
            ProbeState::Hearing { heard } if now - heard >= TONE_HEARD => {
                self.probe = ProbeState::Stopped { at: now };
                Kind::Stop
            }
            ProbeState::Stopped { at } if now - at > PROBE_TIMEOUT => self.give_up(now),
            ProbeState::Settle { until } if now >= until => {
                self.probe = ProbeState::Idle {
                    next: now + PROBE_EVERY,
                };
                Kind::Data
            }
            _ => Kind::Probe,
        }
    }

    fn give_up(&mut self, now: Instant) -> Kind {
        self.probes_failed += 1;
        self.probe = ProbeState::Settle {
            until: now + Duration::from_secs(1),
        };
        Kind::Probe
    }

    /// The next frame to send at `now`: speech with its marker. Counts it as sent.
    pub(super) fn next_frame(&mut self, now: Instant) -> &[i16] {
        let kind = self.kind_now(now);
        // Copied in at most two runs (the clip wraps): a modulo per sample made this the
        // bench process's costliest function, which at hundreds of calls eats into the cores
        // the server and agents are measured on.
        let speech = &self.plan.speech;
        let mut filled = 0;
        while filled < self.frame.len() && !speech.is_empty() {
            let take = (self.frame.len() - filled).min(speech.len() - self.speech_pos);
            self.frame[filled..filled + take]
                .copy_from_slice(&speech[self.speech_pos..self.speech_pos + take]);
            filled += take;
            self.speech_pos = (self.speech_pos + take) % speech.len();
        }
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        Marker {
            kind,
            caller: self.plan.index as u16,
            seq,
            sent_us: us(now - self.plan.epoch),
        }
        .write(&mut self.frame);
        self.heard.push(0);
        self.is_data.push(kind == Kind::Data);
        self.sent_all += 1;
        &self.frame
    }

    /// Audio heard from the agent at `now`, as samples (any chunking).
    pub(super) fn on_samples(&mut self, rx: &[i16], now: Instant) {
        let tone = is_tone(rx);
        match self.probe {
            ProbeState::WaitTone { .. } if tone => self.probe = ProbeState::Hearing { heard: now },
            ProbeState::Stopped { at } if !tone => {
                self.interrupt_us.push(us(now - at));
                self.probe = ProbeState::Settle {
                    until: now + PROBE_SETTLE,
                };
            }
            _ => {}
        }
        let now_us = us(now - self.plan.epoch);
        let me = self.plan.index as u16;
        let mut found = std::mem::take(&mut self.found);
        found.clear();
        self.scanner.scan(rx, |m| found.push(m));
        for &m in &found {
            if m.caller != me {
                self.crossed += 1;
                continue;
            }
            // The marker's own sequence number, not the transport's (RTP renumbers).
            let i = m.seq as usize;
            if m.kind != Kind::Data || self.is_data.get(i) != Some(&true) {
                continue;
            }
            self.heard[i] = self.heard[i].saturating_add(1);
            if self.heard[i] > 1 {
                self.duplicated += 1;
                continue;
            }
            match self.highest {
                Some(h) if m.seq < h => self.reordered += 1,
                _ => self.highest = Some(m.seq),
            }
            self.rtt_us.push(now_us.wrapping_sub(m.sent_us));
            self.heard_us.push(now_us);
        }
        self.found = found;
    }

    pub(super) fn finish(&self, report: &mut CallReport) {
        let data = self.is_data.iter().filter(|&&d| d).count() as u64;
        let heard = self
            .is_data
            .iter()
            .zip(&self.heard)
            .filter(|&(&d, &h)| d && h > 0)
            .count() as u64;
        report.frames_sent = data;
        report.frames_sent_all = self.sent_all;
        report.frames_lost = data - heard;
        report.frames_duplicated = self.duplicated;
        report.frames_reordered = self.reordered;
        report.rtt_us = self.rtt_us.clone();
        report.heard_us = self.heard_us.clone();
        let mut sorted = report.rtt_us.clone();
        sorted.sort_unstable();
        let typical = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
        let late = us(LATE);
        report.frames_late = sorted
            .iter()
            .filter(|&&r| r.saturating_sub(typical) > late)
            .count() as u64;
        report.interrupt_us = self.interrupt_us.clone();
        report.probes_failed = self.probes_failed;
        report.crossed = self.crossed;
    }
}

/// The speech every caller loops over (from its own offset): 3.1 s, so that calls differ.
pub(crate) fn speech_for(rate: SampleRate) -> Arc<Vec<i16>> {
    Arc::new(speech(rate.hz(), rate.hz() as usize * 31 / 10))
}
