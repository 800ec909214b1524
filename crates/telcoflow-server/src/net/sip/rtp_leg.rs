//! The RTP leg task: one per SIP call, the I/O half of [`RtpSession`].
//!
//! It owns the call's RTP port (one UDP socket, RTCP multiplexed on it), and joins three
//! parties: the call actor (as a [`LegLink`] at the codec's rate: 8 kHz for G.711, 16 kHz for
//! G.722; the call resamples to the agent's rate, and hears of a change of codec rate as
//! `LegEvent::Rate`),
//! the SIP endpoint (signalling, [`Command`] / [`SipEvent`]) and the phone (RTP).
//!
//! - Every 20 ms it pops a frame from the jitter buffer and hands it to the call as
//!   `LegEvent::Audio`; RTCP reports go out when due; no packet for the RTP timeout ends the
//!   call. The tick moves earlier when the session says so, to pop frames shortly after the
//!   phone's packets land rather than up to a frame later.
//! - Each `LegOutput::Audio` frame from the call (paced by the call's own 20 ms clock) is
//!   queued in the session, which packetises it at the negotiated `ptime`. Nothing goes out
//!   while the phone holds the call, and no more than a few packets before the phone has sent
//!   us RTP (see [`RtpSession`]): the SDP address alone proves nothing.
//! - RTP is accepted only from the SDP address or the signalling source (strict latching).
//! - RFC 4733 events and SIP INFO digits become `LegEvent::Dtmf`.
//!
//! Legs carry samples, so the codec (G.711 or G.722) is the only conversion on either path. Hot path buffers
//! (datagram, packet, the frames handed to the call) are allocated once per leg; frames to the
//! call come from a pool whose buffers are reused once the call has consumed them.

use super::link::{Command, LegKey, OutgoingDial, SipEvent};
use super::ports::{PortGuard, RtpSockets};
use crate::call::{
    CallHandle, CallInput, LegEvent, LegId, LegKind, LegLink, LegOutput, LegQuality, NetFigures,
    Refusal, SamplePool,
};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use telcoflow_sip::rtp::codec::Codec;
use telcoflow_sip::rtp::dtmf_out::{EventSender, dtmf_relay_body};
use telcoflow_sip::rtp::jitter::FrameKind;
use telcoflow_sip::rtp::session::{Received, RtpSession, SessionConfig};
use telcoflow_sip::rtp::srtp::{MasterKey, SrtpError};
use telcoflow_sip::sip::sdp::{
    self, LocalMedia, LocalSrtp, Negotiated, SessionDescription, SrtpPolicy,
};
use tokio_util::sync::CancellationToken;

use std::time::Duration;
use telcoflow_proto::SampleRate;
use telcoflow_proto::sim::HangupReason;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

/// Frames queued from the call to the leg (a few hundred ms).
const LEG_QUEUE: usize = 16;
/// Largest datagram we read: RTP for G.711 at 20 ms is 172 bytes; leave room for odd peers.
const DATAGRAM: usize = 2048;
/// How far behind the playout tick may fall and still replay the ticks it missed at once
/// (five frames): beyond that, the frames it would play at once are the latency the jitter
/// buffer's bound is for.
const MAX_TICK_REPLAY: Duration = Duration::from_millis(100);
/// Datagrams taken at once when the tick finds this task stalled (a second of 20 ms packets
/// and a little more): the rest wait for the next turn of the loop.
const MAX_DRAINED_DATAGRAMS: usize = 64;

/// Which side placed the SIP call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// A phone called us (UAS): we answer when the agent does.
    Incoming,
    /// We dialled (UAC) for `call.connect`: the callee answers.
    Outgoing,
}

/// Everything a leg task needs.
pub(super) struct LegParams {
    pub(super) shutdown: CancellationToken,
    pub(super) call: CallHandle,
    pub(super) leg: LegId,
    pub(super) key: LegKey,
    pub(super) direction: Direction,
    pub(super) sockets: RtpSockets,
    pub(super) media: LocalMedia,
    pub(super) rtp_timeout: Duration,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) events: mpsc::Receiver<SipEvent>,
    /// The IP the call's signalling came from (incoming legs): RTP from it may latch, for
    /// phones behind NAT whose SDP names a private address.
    pub(super) signalling: Option<std::net::IpAddr>,
    /// For an outgoing leg: what to dial once the task runs.
    pub(super) dial: Option<OutgoingDial>,
}

/// The receiving end of a [`LegLink`], waiting for its task.
pub(super) struct PendingLeg {
    rx: mpsc::Receiver<LegOutput>,
    quality: Arc<LegQuality>,
    rate: SampleRate,
}

/// A link for the call (at `rate`, the codec's expected rate) and the receiver the leg task
/// will read.
pub(super) fn link(rate: SampleRate) -> (LegLink, PendingLeg) {
    let (tx, rx) = mpsc::channel(LEG_QUEUE);
    let quality = Arc::new(LegQuality::default());
    let link = LegLink {
        rate,
        tx,
        kind: LegKind::Sip,
        quality: Some(quality.clone()),
    };
    (link, PendingLeg { rx, quality, rate })
}

impl PendingLeg {
    /// The leg task's future (spawn it). Fails if the socket cannot join the runtime.
    pub(super) fn start(
        self,
        params: LegParams,
    ) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
        // A second handle on the same socket reads past the runtime's readiness: after a
        // stall the runtime has not polled for readiness yet, and the handle it owns would
        // find nothing to read (see `drop_stale_audio`).
        let stale_reader = params.sockets.rtp.try_clone()?;
        let socket = UdpSocket::from_std(params.sockets.rtp)?;
        let rtcp = UdpSocket::from_std(params.sockets.rtcp)?;
        let leg = RtpLeg {
            shutdown: params.shutdown,
            call: params.call,
            leg: params.leg,
            key: params.key,
            direction: params.direction,
            socket,
            stale_reader,
            rtcp,
            _port: params.sockets.guard,
            media: params.media,
            rtp_timeout: params.rtp_timeout,
            commands: params.commands,
            signalling: params.signalling,
            session: None,
            answered: false,
            early: false,
            packet: vec![0u8; DATAGRAM],
            frames: SamplePool::default(),
            loss_reported: 0,
            ticks_to_loss_report: LOSS_REPORT_TICKS,
            quality: self.quality,
            gaps: 0,
            concealing: false,
            dtmf: None,
            rate: self.rate,
        };
        Ok(leg.run(self.rx, params.events, params.dial))
    }
}

/// The rate of a codec's audio.
fn codec_rate(codec: Codec) -> SampleRate {
    if codec.is_wideband() {
        SampleRate::Hz16000
    } else {
        SampleRate::Hz8000
    }
}

/// The rate of the codec an incoming call's offer will be answered with (8 kHz for an
/// offerless INVITE, or an offer we cannot answer: the leg reports the rate it settles on).
pub(super) fn answer_rate(offer: Option<&SessionDescription>, codecs: &[Codec]) -> SampleRate {
    let mut probe = LocalMedia::new(std::net::Ipv4Addr::LOCALHOST.into(), 9, 0);
    probe.codecs = codecs.to_vec();
    // The codec alone matters here: SRTP offers are answered with the same one.
    probe.srtp = Some(LocalSrtp::new(
        SrtpPolicy::Optional,
        MasterKey::from_bytes([0; 30]),
    ));
    offer
        .and_then(|offer| sdp::answer(offer, &probe).ok())
        .map_or(SampleRate::Hz8000, |(_, n)| codec_rate(n.codec))
}

struct RtpLeg {
    shutdown: CancellationToken,
    call: CallHandle,
    leg: LegId,
    key: LegKey,
    direction: Direction,
    socket: UdpSocket,
    /// The same socket (non-blocking) for [`RtpLeg::drop_stale_audio`].
    stale_reader: std::net::UdpSocket,
    /// RTCP on the RTP port + 1 (RFC 3550 11).
    rtcp: UdpSocket,
    /// Held for the task's lifetime: the port returns to the pool when the task ends.
    _port: PortGuard,
    media: LocalMedia,
    rtp_timeout: Duration,
    commands: mpsc::Sender<Command>,
    /// See [`LegParams::signalling`].
    signalling: Option<std::net::IpAddr>,
    session: Option<RtpSession>,
    /// The SIP call is answered.
    answered: bool,
    /// The callee's early media (183 with SDP) play: the call has been told.
    early: bool,
    packet: Vec<u8>,
    /// Buffers of the frames handed to the call.
    frames: SamplePool,
    /// Frames concealed that the metrics have been told of.
    loss_reported: u64,
    /// Ticks until the loss is next added to the metrics.
    ticks_to_loss_report: u32,
    /// Where the call reads this leg's receive figures.
    quality: Arc<LegQuality>,
    /// Runs of concealed frames so far, and whether the latest tick concealed.
    gaps: u64,
    concealing: bool,
    /// DTMF being sent to the peer, frame by frame in place of or mixed into the audio.
    dtmf: Option<DtmfOut>,
    /// The rate the call has for this leg's audio (see [`RtpLeg::sync_rate`]).
    rate: SampleRate,
}

/// How DTMF reaches the peer: RFC 4733 events when it negotiated telephone-event (with that
/// payload type); else SIP INFO (`application/dtmf-relay`, one per digit, paced like the
/// events) in the call's dialog, whichever side began it.
enum DtmfOut {
    Events(EventSender, u8),
    Info(EventSender, LegKey, u32),
}

/// How often (in 20 ms ticks: a second) an RTP leg adds its loss to the metrics while it runs.
const LOSS_REPORT_TICKS: u32 = 50;

/// How the leg loop goes on.
enum Flow {
    Continue,
    Stop,
}

impl RtpLeg {
    async fn run(
        mut self,
        mut outputs: mpsc::Receiver<LegOutput>,
        mut events: mpsc::Receiver<SipEvent>,
        dial: Option<OutgoingDial>,
    ) {
        if let Some(dial) = dial {
            match dial.into_command().await {
                Ok(cmd) => {
                    if let Command::Dial { config, .. } = &cmd {
                        self.signalling = Some(config.destination.ip());
                    }
                    self.command(cmd).await
                }
                Err(e) => {
                    info!(error = %e, "cannot dial");
                    self.to_call(LegEvent::Rejected(Refusal::Unreachable(e.to_string())))
                        .await;
                    return;
                }
            }
        }
        let mut ticker = tokio::time::interval(telcoflow_sip::rtp::jitter::FRAME_DURATION);
        // Ticks this task was too busy to take (a loaded machine) are taken at once when it
        // runs again, so that the frames that landed meanwhile play out instead of standing
        // as delay; after a longer stall the clock starts afresh (see `MAX_TICK_REPLAY`).
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut datagram = vec![0u8; DATAGRAM];
        let mut rtcp_datagram = vec![0u8; DATAGRAM];
        // One waiter for the task's life: a new one per packet would lock the server-wide
        // token's waiter list twice, a list every call's tasks share.
        let shutdown = self.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        loop {
            let flow = tokio::select! {
                // Cancel-safe: only observes the token.
                () = &mut shutdown => {
                    self.command(Command::Hangup(self.key)).await;
                    Flow::Stop
                }
                // Cancel-safe: mpsc recv.
                out = outputs.recv() => match out {
                    Some(out) => self.on_output(out).await,
                    None => {
                        self.command(Command::Hangup(self.key)).await;
                        Flow::Stop
                    }
                },
                // Cancel-safe: mpsc recv.
                ev = events.recv() => match ev {
                    Some(ev) => self.on_sip(ev).await,
                    None => {
                        self.to_call(LegEvent::Hangup).await;
                        Flow::Stop
                    }
                },
                // Cancel-safe: a datagram is returned whole or left in the socket.
                r = self.socket.recv_from(&mut datagram) => match r {
                    Ok((n, source)) => {
                        let flow = self.on_datagram(source, &datagram[..n], true).await;
                        let restart = self.session.as_mut().and_then(|s| s.take_clock_restart());
                        if let Some(margin) = restart {
                            ticker.reset_at(Instant::now() + margin);
                        }
                        flow
                    }
                    Err(e) => {
                        // ICMP errors from a peer that went away surface here; not fatal.
                        debug!(error = %e, "RTP receive failed");
                        Flow::Continue
                    }
                },
                // Cancel-safe: a datagram is returned whole or left in the socket.
                r = self.rtcp.recv_from(&mut rtcp_datagram) => {
                    if let (Ok((n, source)), Some(session)) = (r, &mut self.session) {
                        let now = Instant::now().into_std();
                        if let Received::Malformed(e) =
                            session.handle_rtcp_datagram(source, &rtcp_datagram[..n], now)
                        {
                            debug!(error = %e, %source, "malformed RTCP");
                        }
                    }
                    Flow::Continue
                }
                // Cancel-safe: a missed tick is replayed later by the interval.
                at = ticker.tick(), if self.session.is_some() => {
                    let behind = Instant::now().saturating_duration_since(at);
                    let mut flow = Flow::Continue;
                    if behind > MAX_TICK_REPLAY {
                        // This task (the server) could not run for a while. The caller's
                        // audio of that time is stale: played out, by the tick moving
                        // earlier, it would keep the call behind for as long (the agent
                        // answers late audio late). It is dropped, counted and logged, and
                        // the clock starts afresh.
                        flow = self.drop_stale_audio(&mut datagram, behind).await;
                        ticker.reset();
                    }
                    if matches!(flow, Flow::Continue) {
                        flow = self.on_tick().await;
                    }
                    self.publish_quality();
                    let shift = self.session.as_mut().and_then(|s| s.take_clock_shift());
                    if let Some(shift) = shift {
                        let shift_us = shift.as_micros() as u64;
                        debug!(shift_us, "RTP playout tick moved earlier");
                        ticker.reset_at(at + telcoflow_sip::rtp::jitter::FRAME_DURATION - shift);
                    }
                    flow
                }
            };
            if matches!(flow, Flow::Stop) {
                break;
            }
        }
        self.publish_quality();
        if let Some(s) = &self.session {
            let stats = s.stats();
            let jitter = s.jitter_buffer().stats();
            info!(
                sent = stats.packets_sent,
                received = stats.packets_received,
                concealed = jitter.concealed,
                late = jitter.late,
                discarded = jitter.discarded,
                overflow = jitter.overflow,
                resumed_late = jitter.resumed_late,
                jitter_us = u64::from(s.jitter_buffer().jitter()) * 125,
                target_ms = s.jitter_buffer().target_delay().as_millis() as u64,
                tick_shifts = s.clock_shifts(),
                rtt_ms = stats.rtt.map_or(0.0, |d| d.as_secs_f64() * 1e3),
                wrong_source = stats.wrong_source,
                samples_withheld = stats.samples_withheld,
                srtp = s.srtp_suite().map_or("none", |suite| suite.name()),
                srtp_rejected = stats.srtp_rejected,
                "RTP leg ended"
            );
            self._port.metrics().rtp_leg_ended(
                f64::from(s.jitter_buffer().jitter()) / 8000.0,
                jitter.concealed.saturating_sub(self.loss_reported),
                [jitter.late, jitter.overflow, jitter.discarded],
            );
        }
        let _ = self.commands.send(Command::Gone(self.key)).await;
    }

    /// Leaves the session's receive figures where the call reads them (every tick: plain
    /// numbers, no allocation).
    fn publish_quality(&self) {
        let Some(s) = &self.session else {
            return;
        };
        let jitter = s.jitter_buffer();
        let reception = s.reception();
        self.quality.set(NetFigures {
            // Timestamp units of 8 kHz: 125 us each.
            jitter: Duration::from_micros(u64::from(jitter.jitter()) * 125),
            expected: reception.expected,
            received: reception.received,
            concealed_frames: jitter.stats().concealed,
            gaps: self.gaps,
            clock_misses: s.clock_misses(),
            rtt: s.stats().rtt,
            buffering: jitter.target_delay(),
            codec: Some(s.codec().encoding_name()),
            srtp: s.srtp_suite().map(|suite| suite.name()),
        });
    }

    async fn command(&self, cmd: Command) {
        if self.commands.send(cmd).await.is_err() {
            debug!("SIP endpoint gone");
        }
    }

    async fn to_call(&self, event: LegEvent) {
        self.call
            .send_data(CallInput::Leg {
                leg: self.leg,
                event,
            })
            .await;
    }

    async fn on_output(&mut self, out: LegOutput) -> Flow {
        match out {
            LegOutput::Ringing => {
                if let LegKey::In(call) = self.key {
                    self.command(Command::Ringing(call)).await;
                }
            }
            LegOutput::Answered => {
                if let LegKey::In(call) = self.key {
                    if !self.answered {
                        self.answered = true;
                        let media = self.media.clone();
                        self.command(Command::Answer { call, media }).await;
                    }
                }
            }
            LegOutput::Audio(samples) => self.send_frame(&samples).await,
            LegOutput::Dtmf(plan) => {
                let pt = self.session.as_ref().and_then(RtpSession::telephone_event);
                debug!(
                    digits = plan.events().len(),
                    rfc4733 = pt.is_some(),
                    "sending DTMF"
                );
                // A newer request replaces one still playing.
                self.dtmf = Some(match (pt, self.key) {
                    (Some(pt), _) => DtmfOut::Events(EventSender::new(plan, 8000), pt),
                    (None, leg) => {
                        let ms = plan.tone_ms();
                        DtmfOut::Info(EventSender::new(plan, 8000), leg, ms)
                    }
                });
            }
            LegOutput::Refer { target } => match self.key {
                LegKey::In(call) => {
                    let cmd = Command::Refer {
                        call,
                        refer_to: target,
                    };
                    self.command(cmd).await;
                }
                // Our UAC sends no REFER: the call dials the target itself instead.
                LegKey::Out(_) => {
                    self.to_call(LegEvent::ReferAnswered { status: 501 }).await;
                }
            },
            LegOutput::Hangup(reason) => {
                let cmd = match (self.key, self.answered) {
                    (LegKey::In(call), false) => Command::Reject {
                        call,
                        status: reject_status(reason),
                    },
                    (key, _) => Command::Hangup(key),
                };
                self.command(cmd).await;
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// One 20 ms frame from the call: audio, or DTMF in its place or mixed in.
    async fn send_frame(&mut self, samples: &[i16]) {
        match &mut self.dtmf {
            None => self.send_audio(samples).await,
            Some(DtmfOut::Info(events, leg, ms)) => {
                let (leg, ms) = (*leg, *ms);
                // The events' schedule, one INFO at the start of each digit; audio goes on.
                let start = events.next_frame(0).filter(|p| p.marker);
                if events.done() {
                    self.dtmf = None;
                }
                if let Some(digit) = start.and_then(|p| p.event.digit()) {
                    let body = dtmf_relay_body(digit, ms);
                    self.command(Command::DtmfInfo { leg, body }).await;
                }
                self.send_audio(samples).await;
            }
            Some(DtmfOut::Events(events, pt)) => {
                let pt = *pt;
                let Some(session) = &mut self.session else {
                    return;
                };
                let packet = events.next_frame(session.send_timestamp());
                if events.done() {
                    self.dtmf = None;
                }
                let Some(packet) = packet else {
                    return self.send_audio(samples).await;
                };
                if !session.may_send() {
                    session.skip_frame();
                    return;
                }
                // RFC 4733 2.5: the event replaces the audio of its time.
                session.drop_queued_audio();
                for _ in 0..packet.copies {
                    match session.write_event(pt, &packet, &mut self.packet) {
                        Ok(len) => {
                            let to = session.remote();
                            if let Err(e) = self.socket.send_to(&self.packet[..len], to).await {
                                debug!(error = %e, %to, "RTP send failed");
                            }
                        }
                        Err(e) => debug!(error = %e, "RTP event not written"),
                    }
                }
                session.skip_frame();
            }
        }
    }

    async fn send_audio(&mut self, samples: &[i16]) {
        let Some(session) = &mut self.session else {
            return;
        };
        session.queue_audio(samples);
        loop {
            match session.poll_audio(&mut self.packet) {
                Ok(Some(len)) => {
                    let to = session.remote();
                    if let Err(e) = self.socket.send_to(&self.packet[..len], to).await {
                        debug!(error = %e, %to, "RTP send failed");
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "RTP packet not written");
                    break;
                }
            }
        }
    }

    async fn on_sip(&mut self, event: SipEvent) -> Flow {
        let now = Instant::now().into_std();
        match event {
            SipEvent::EarlyMedia(negotiated) => {
                let opened = if self.session.is_some() {
                    self.update_session(&negotiated, now)
                } else {
                    self.open_session(&negotiated, now)
                };
                if let Err(e) = opened {
                    return self.srtp_failed(e).await;
                }
                self.sync_rate().await;
                if !self.early {
                    self.early = true;
                    self.to_call(LegEvent::EarlyMedia).await;
                }
            }
            SipEvent::Answered(negotiated) => {
                self.answered = true;
                // After early media the session goes on with the answer's parameters (the
                // same, usually).
                let opened = if self.session.is_some() {
                    self.update_session(&negotiated, now)
                } else {
                    self.open_session(&negotiated, now)
                };
                if let Err(e) = opened {
                    return self.srtp_failed(e).await;
                }
                // Before `Answered`: the call's first frames to the callee are at its rate.
                self.sync_rate().await;
                if self.direction == Direction::Outgoing {
                    self.to_call(LegEvent::Answered).await;
                }
            }
            SipEvent::MediaUpdated(negotiated) => match &mut self.session {
                Some(_) => {
                    if let Err(e) = self.update_session(&negotiated, now) {
                        return self.srtp_failed(e).await;
                    }
                    self.sync_rate().await;
                }
                // An offerless INVITE: the ACK carried the answer.
                None => {
                    if let Err(e) = self.open_session(&negotiated, now) {
                        return self.srtp_failed(e).await;
                    }
                    self.sync_rate().await;
                }
            },
            SipEvent::Failed(status) => {
                info!(status, "SIP call failed");
                self.to_call(LegEvent::Rejected(Refusal::from_sip_status(status)))
                    .await;
                return Flow::Stop;
            }
            SipEvent::Unreachable(reason) => {
                info!(%reason, "SIP call failed");
                self.to_call(LegEvent::Rejected(Refusal::Unreachable(reason)))
                    .await;
                return Flow::Stop;
            }
            SipEvent::Ended => {
                self.to_call(LegEvent::Hangup).await;
                return Flow::Stop;
            }
            SipEvent::Dtmf { digit, duration_ms } => {
                self.to_call(LegEvent::Dtmf { digit, duration_ms }).await;
            }
            SipEvent::ReferAnswered(status) => {
                self.to_call(LegEvent::ReferAnswered { status }).await;
            }
            SipEvent::ReferProgress {
                status,
                reason,
                terminated,
            } => {
                let event = LegEvent::ReferProgress {
                    status,
                    reason,
                    terminated,
                };
                self.to_call(event).await;
            }
        }
        Flow::Continue
    }

    /// New parameters for the open session (a re-INVITE, or the answer after early media).
    fn update_session(
        &mut self,
        negotiated: &Negotiated,
        now: std::time::Instant,
    ) -> Result<(), SrtpError> {
        let Some(s) = &mut self.session else {
            return Ok(());
        };
        s.set_remote(
            negotiated.remote,
            negotiated.remote_rtcp,
            negotiated.codec,
            negotiated.payload_type,
        );
        // A re-offer may rekey SRTP (or, where the policy allows, drop it).
        s.set_srtp(negotiated.srtp)?;
        // The re-offer's ptime (20 ms when it names none): sent packets follow
        // it; received ones of any length are reframed already.
        s.set_ptime(negotiated.ptime);
        s.set_receiving(!negotiated.remote_hold, now);
        // RFC 3264 8.4: nothing to a phone that holds with sendonly/inactive.
        s.set_sending(negotiated.direction.sends());
        debug!(
            remote = %negotiated.remote,
            hold = negotiated.remote_hold,
            ptime = negotiated.ptime,
            codec = %negotiated.codec,
            "media updated"
        );
        Ok(())
    }

    /// Keys the SDP agreed on that SRTP cannot use: the call cannot be carried securely.
    async fn srtp_failed(&mut self, e: SrtpError) -> Flow {
        warn!(error = %e, "SRTP keys unusable; ending the call");
        self.command(Command::Hangup(self.key)).await;
        self.to_call(LegEvent::Hangup).await;
        Flow::Stop
    }

    fn open_session(&mut self, n: &Negotiated, now: std::time::Instant) -> Result<(), SrtpError> {
        let mut config =
            SessionConfig::new(n.codec, rand::random(), rand::random(), rand::random());
        config.payload_type = n.payload_type;
        config.telephone_event = n.telephone_event;
        config.rtp_timeout = self.rtp_timeout;
        config.cname = format!("telcoflow-{}", self.call.call_id);
        config.ptime_ms = n.ptime;
        let mut session = RtpSession::new(config, n.remote, n.remote_rtcp, now);
        if n.remote_hold {
            session.set_receiving(false, now);
        }
        session.set_sending(n.direction.sends());
        if let Some(ip) = self.signalling {
            session.set_signalling_source(ip);
        }
        session.set_srtp(n.srtp)?;
        let srtp = n.srtp.map_or("none", |k| k.suite.name());
        debug!(remote = %n.remote, codec = %n.codec, ptime = n.ptime, srtp, "RTP session open");
        self._port
            .metrics()
            .rtp_session_opened(n.codec.encoding_name());
        self.session = Some(session);
        Ok(())
    }

    /// Tells the call the rate of the session's codec when it is not the one the call has
    /// (G.722 negotiated where G.711 was expected, or a re-INVITE switching between them).
    async fn sync_rate(&mut self) {
        let Some(session) = &self.session else {
            return;
        };
        let rate = codec_rate(session.codec());
        if rate != self.rate {
            debug!(rate = rate.hz(), codec = %session.codec(), "leg rate changed");
            self.rate = rate;
            self.to_call(LegEvent::Rate(rate)).await;
        }
    }

    /// A datagram from the phone. `play_ahead`: in-order audio goes to the call as it lands
    /// (false for stale audio, which waits to be dropped).
    async fn on_datagram(&mut self, source: SocketAddr, data: &[u8], play_ahead: bool) -> Flow {
        let Some(session) = &mut self.session else {
            return Flow::Continue; // no SDP yet: nothing to receive on
        };
        let now = Instant::now().into_std();
        match session.handle_datagram(source, data, now) {
            Received::Dtmf(d) => {
                debug!(digit = %d.digit, duration_ms = d.duration_ms, "DTMF");
                self.to_call(LegEvent::Dtmf {
                    digit: d.digit,
                    duration_ms: d.duration_ms,
                })
                .await;
            }
            Received::Malformed(e) => debug!(error = %e, %source, "malformed RTP"),
            Received::Audio if play_ahead => {
                // In-order audio goes to the call as it lands; the tick only covers for
                // frames that do not come in time.
                if let Some(frame) = session.pop_ahead() {
                    let samples = self.frames.frame(frame.samples);
                    self.to_call(LegEvent::Audio(samples)).await;
                }
            }
            _ => {}
        }
        Flow::Continue
    }

    /// After a stall of this task: takes the packets that landed meanwhile, then drops what
    /// they left in the jitter buffer beyond its target.
    async fn drop_stale_audio(&mut self, datagram: &mut [u8], behind: Duration) -> Flow {
        for _ in 0..MAX_DRAINED_DATAGRAMS {
            // Non-blocking: fails at once when nothing is left to read.
            let Ok((n, source)) = self.stale_reader.recv_from(datagram) else {
                break;
            };
            if matches!(
                self.on_datagram(source, &datagram[..n], false).await,
                Flow::Stop
            ) {
                return Flow::Stop;
            }
        }
        let dropped = self
            .session
            .as_mut()
            .map_or(0, |session| session.drop_jitter_backlog());
        if dropped > 0 {
            let dropped_ms = u64::from(dropped) * 20;
            info!(
                behind_ms = behind.as_millis() as u64,
                dropped_ms, "the server stalled: the phone's audio of that time dropped"
            );
            self.to_call(LegEvent::AudioSkipped { dropped_ms }).await;
        }
        Flow::Continue
    }

    async fn on_tick(&mut self) -> Flow {
        let now = Instant::now().into_std();
        let Some(session) = &mut self.session else {
            return Flow::Continue;
        };
        // Early media may pause or never come: the RTP timeout runs from the answer.
        if self.answered && session.timed_out(now) {
            info!(timeout = ?self.rtp_timeout, "no RTP from the phone; ending the call");
            self.command(Command::Hangup(self.key)).await;
            self.to_call(LegEvent::Hangup).await;
            return Flow::Stop;
        }
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if let Ok(Some(len)) = session.poll_rtcp(now, unix, &mut self.packet) {
            let to = session.rtcp_remote();
            // A peer multiplexing RTCP on its RTP port hears it from our RTP port.
            let from = if to == session.remote() {
                &self.socket
            } else {
                &self.rtcp
            };
            let _ = from.send_to(&self.packet[..len], to).await;
        }
        let Some(session) = &mut self.session else {
            return Flow::Continue;
        };
        self.ticks_to_loss_report -= 1;
        if self.ticks_to_loss_report == 0 {
            self.ticks_to_loss_report = LOSS_REPORT_TICKS;
            let concealed = session.jitter_buffer().stats().concealed;
            self._port
                .metrics()
                .rtp_leg_lost(concealed.saturating_sub(self.loss_reported));
            self.loss_reported = concealed;
        }
        if !session.plays_this_tick() {
            return Flow::Continue;
        }
        let frame = session.pop_frame(now);
        let concealed = frame.kind == FrameKind::Concealed;
        if concealed && !self.concealing {
            self.gaps += 1;
        }
        if frame.kind != FrameKind::Ahead {
            self.concealing = concealed;
        }
        let frame = if frame.kind == FrameKind::Ahead {
            // This tick's frame went to the call when it landed; one held back by the limit
            // on frames ahead may go now.
            match session.pop_ahead() {
                Some(frame) => frame,
                None => return Flow::Continue,
            }
        } else {
            frame
        };
        let samples = self.frames.frame(frame.samples);
        self.to_call(LegEvent::Audio(samples)).await;
        Flow::Continue
    }
}

/// The final response for an unanswered incoming call the server gives up on.
fn reject_status(reason: HangupReason) -> u16 {
    match reason {
        HangupReason::NoAnswer | HangupReason::Remote | HangupReason::Local => 480,
        HangupReason::Busy => 486,
        HangupReason::NotFound => 404,
        HangupReason::Rejected => 603,
        HangupReason::Error => 500,
        HangupReason::Unavailable => 503,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incoming_call_starts_at_the_rate_of_the_codec_it_will_get() {
        let offer = |formats: &str| {
            let text = format!(
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
                 m=audio 4000 RTP/AVP {formats}\r\n"
            );
            SessionDescription::parse(&text).unwrap()
        };
        let default = Codec::ALL;
        let wide_first = [Codec::G722, Codec::Pcmu];
        for (formats, codecs, rate) in [
            ("9 0", &default[..], SampleRate::Hz8000),
            ("9", &default[..], SampleRate::Hz16000),
            ("0 9", &wide_first[..], SampleRate::Hz16000),
            ("0 8", &wide_first[..], SampleRate::Hz8000),
            // Nothing common: 488 follows; the rate does not matter.
            ("18", &default[..], SampleRate::Hz8000),
        ] {
            assert_eq!(
                answer_rate(Some(&offer(formats)), codecs),
                rate,
                "{formats}"
            );
        }
        // An offerless INVITE: 8 kHz until the ACK's answer says otherwise.
        assert_eq!(answer_rate(None, &default), SampleRate::Hz8000);
    }

    #[test]
    fn unanswered_calls_map_to_sip_statuses() {
        assert_eq!(reject_status(HangupReason::NoAnswer), 480);
        assert_eq!(reject_status(HangupReason::Remote), 480);
        assert_eq!(reject_status(HangupReason::Busy), 486);
        assert_eq!(reject_status(HangupReason::Rejected), 603);
        assert_eq!(reject_status(HangupReason::Error), 500);
    }
}
