//! One call leg's RTP session, sans-IO: symmetric RTP, the receive path into the jitter
//! buffer and DTMF, the send path with sequence/timestamp/SSRC, RTCP reports and the RTP
//! inactivity timeout.
//!
//! Contract (no sockets, no clock reads, no allocation per packet):
//!
//! - [`RtpSession::handle_datagram`] with every datagram read from the call's RTP port, its
//!   source and arrival time. Audio goes into the jitter buffer; the return value tells the
//!   owner about DTMF digits and RTCP.
//! - Every 20 ms tick: [`RtpSession::pop_frame`] for the frame to play towards the agent
//!   (160 samples at 8 kHz for G.711, 320 at 16 kHz for G.722: [`Codec::frame_samples`]), then [`RtpSession::take_clock_shift`]: when it says so, the owner's next tick comes
//!   that much earlier, so that frames are popped soon after their packets land (the phone's
//!   packets arrive at a phase unrelated to the tick; see `crate::phase`).
//! - [`RtpSession::queue_audio`] takes the agent's samples (paced by the call's clock, not
//!   the tick above); then [`RtpSession::poll_audio`] until `None` writes the packets (of
//!   [`SessionConfig::ptime_ms`] each) the owner sends to [`RtpSession::remote`].
//! - [`RtpSession::poll_rtcp`] writes a compound SR/RR + SDES packet when one is due (every
//!   [`SessionConfig::rtcp_interval`]); it takes the wall clock as an argument for the NTP
//!   timestamp. Send it from the RTCP port (ours + 1) to [`RtpSession::rtcp_remote`], and
//!   feed what that port receives to [`RtpSession::handle_rtcp_datagram`]. A peer that
//!   multiplexes RTCP on its RTP port (RFC 5761) is answered the same way.
//! - [`RtpSession::timed_out`] says whether no packet arrived for
//!   [`SessionConfig::rtp_timeout`]; [`RtpSession::set_receiving`] pauses that check while the
//!   peer holds the call.
//!
//! Symmetric RTP (RFC 4961) with strict latching: packets go to the SDP address until the
//! first valid RTP packet arrives, then to that packet's source, which NAT'd phones need. Only
//! a source whose IP is the SDP address's or the signalling source's
//! ([`RtpSession::set_signalling_source`]) can latch: anyone else spraying RTP at our port is
//! ignored, so a caller's audio cannot be taken over. Once latched, packets from other
//! sources are ignored until [`RtpSession::set_remote`] (a new SDP) unlatches. RTCP latches
//! the same way, separately.
//!
//! No amplification: until the peer has sent us valid RTP or RTCP from an allowed source, at
//! most [`UNVERIFIED_SEND_LIMIT`] audio packets go to the SDP address (which anyone can set to
//! a third party's); audio after that is dropped until the peer speaks. Nothing is sent
//! while [`RtpSession::set_sending`] is off (the peer holds the call: `sendonly`/`inactive`).
//!
//! SRTP (SDES): after [`RtpSession::set_srtp`] every packet sent, RTP and RTCP, is
//! protected, and every packet received must authenticate (and not be a replay) before
//! anything else reads it; one that does not is dropped and counted
//! ([`SessionStats::srtp_rejected`], [`Received::Unauthenticated`]). The SRTP crate returns
//! each packet in a buffer of its own: an encrypted session allocates per packet, a plain one
//! does not.
//!
//! Any packetisation: received audio packets of other than 20 ms are split and joined into
//! 20 ms frames by timestamp ([`super::reframe`]), from the first such packet on (a phone may
//! change its `ptime` mid-call: the frames continue the stream's sequence numbers); sent
//! packets carry [`SessionConfig::ptime_ms`] of audio each, changed by
//! [`RtpSession::set_ptime`].

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::codec::{AudioEncoder, Codec, MAX_FRAME_SAMPLES};
use super::jitter::{FRAME_SAMPLES, Frame, JitterBuffer, JitterConfig};
use super::reframe::Reframer;
use super::srtp::{SrtpError, SrtpKeys, SrtpSession, SrtpSuite};
use crate::phase::PhaseAligner;

use super::packet::{
    Dtmf, DtmfReceiver, PacketError, ReceiverReport, ReportBlock, RtcpPackets, RtpHeader,
    RtpPacket, SenderReport, TelephoneEvent, is_rtcp, ntp_timestamp, write_sdes_cname,
};

/// Playout ticks (60 ms) that wait for the phone's first audio packet before the call gets
/// silence instead: phones start sending at once, and an agent still hears a stream soon
/// from one that does not.
pub const FIRST_PACKET_GRACE: u32 = 3;

/// Audio packets sent to an address that has not sent us RTP yet (200 ms at 20 ms): enough
/// for a phone to start hearing before its first packet arrives, too few to make the server
/// an amplifier towards whatever address an SDP names.
pub const UNVERIFIED_SEND_LIMIT: u32 = 10;

/// Payload of the longest packetisation time we send (60 ms), in bytes and timestamp units.
const MAX_PACKET_BYTES: usize = 480;
/// Samples of the longest packet we send: 60 ms at 16 kHz (G.722).
const MAX_PACKET_SAMPLES: usize = 960;

/// Session parameters, from the SDP negotiation and the server config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Codec to send. Received audio is decoded by its own payload type, among the codecs
    /// at this one's rate (PCMU and PCMA alike for G.711).
    pub codec: Codec,
    /// Payload type to send audio with.
    pub payload_type: u8,
    /// Payload type of received telephone-events, if negotiated.
    pub telephone_event: Option<u8>,
    /// Our SSRC (random per session).
    pub ssrc: u32,
    /// First sequence number (random per session, RFC 3550 5.1).
    pub initial_sequence: u16,
    /// First timestamp (random per session).
    pub initial_timestamp: u32,
    /// RTCP CNAME.
    pub cname: String,
    /// No packet for this long ends the call. Default 30 s.
    pub rtp_timeout: Duration,
    /// Time between RTCP reports. Default 5 s (RFC 3550's minimum).
    pub rtcp_interval: Duration,
    /// Jitter buffer settings.
    pub jitter: JitterConfig,
    /// Audio per sent packet, in ms (the negotiated `ptime`). Default 20; clamped to 10-60.
    pub ptime_ms: u32,
}

impl SessionConfig {
    /// Defaults for a codec; pass random `ssrc`, `initial_sequence` and `initial_timestamp`.
    pub fn new(
        codec: impl Into<Codec>,
        ssrc: u32,
        initial_sequence: u16,
        initial_timestamp: u32,
    ) -> Self {
        let codec = codec.into();
        Self {
            codec,
            payload_type: codec.payload_type(),
            telephone_event: None,
            ssrc,
            initial_sequence,
            initial_timestamp,
            cname: "telcoflow".into(),
            rtp_timeout: Duration::from_secs(30),
            rtcp_interval: Duration::from_secs(5),
            jitter: JitterConfig::default(),
            ptime_ms: 20,
        }
    }
}

/// What a received datagram was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Audio, now in the jitter buffer (or dropped as late/duplicate).
    Audio,
    /// A finished DTMF key press.
    Dtmf(Dtmf),
    /// A telephone-event packet that completes nothing yet (or a repeat).
    DtmfProgress,
    /// An RTCP packet (statistics updated).
    Rtcp,
    /// From a source other than the latched one, or (before latching) from an address that
    /// is neither the SDP's nor the signalling source's; ignored.
    WrongSource,
    /// A payload type we did not negotiate (e.g. comfort noise); ignored.
    UnknownPayload(u8),
    /// Not a valid packet.
    Malformed(PacketError),
    /// An SRTP session's packet that failed authentication or was a replay; dropped.
    Unauthenticated,
}

/// Counters for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionStats {
    /// RTP packets sent.
    pub packets_sent: u32,
    /// Payload octets sent.
    pub octets_sent: u32,
    /// RTP packets received from the peer (all payload types).
    pub packets_received: u64,
    /// Packets the peer reports lost (cumulative, from its last RTCP report).
    pub remote_lost: i32,
    /// Interarrival jitter the peer reports, in timestamp units.
    pub remote_jitter: u32,
    /// Datagrams ignored for coming from a source that may not send us media.
    pub wrong_source: u64,
    /// Samples of audio not sent: the peer holds the call, or has not sent us RTP yet.
    pub samples_withheld: u64,
    /// Round trip to the peer from its latest receiver report on one of our sender reports
    /// (RFC 3550 6.4.1: arrival - LSR - DLSR); `None` until the peer reports on one.
    pub rtt: Option<Duration>,
    /// SRTP/SRTCP packets dropped: failed authentication, replayed, or too short.
    pub srtp_rejected: u64,
}

/// What the session received from its peer's current source (RFC 3550 A.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceptionCounts {
    /// Packets expected: the span of sequence numbers seen (extended highest - first + 1).
    pub expected: u64,
    /// Packets received, duplicates included (so possibly more than `expected`).
    pub received: u64,
}

/// A duration in units of 1/65536 s (the middle 32 bits of an NTP timestamp), saturating.
fn ntp_short(d: Duration) -> u32 {
    let units = d.as_secs() * 65536 + u64::from(d.subsec_nanos()) * 65536 / 1_000_000_000;
    units.min(u64::from(u32::MAX)) as u32
}

/// The longest round trip a receiver report may give; longer ones are ignored.
pub const MAX_RTT: Duration = Duration::from_secs(10);
/// [`MAX_RTT`] in units of 1/65536 s.
const MAX_RTT_UNITS: u32 = 10 * 65536;

/// The round trip a receiver report gives (RFC 3550 6.4.1): `arrival - LSR - DLSR`, all in
/// units of 1/65536 s, `arrival` the report's arrival on our NTP clock (middle 32 bits). The
/// arithmetic wraps, as the middle 32 bits of NTP time do every 18 hours. `None` when the
/// report names no sender report of ours (LSR 0), when the result is negative (a report
/// that cannot be from our clock), or above [`MAX_RTT`] (a peer's LSR or DLSR is whatever it
/// says, and a round trip of hours would wreck the call's delay and rating).
pub fn rtt_from_report(arrival: u32, lsr: u32, dlsr: u32) -> Option<Duration> {
    if lsr == 0 {
        return None;
    }
    let rtt = arrival.wrapping_sub(lsr).wrapping_sub(dlsr);
    if rtt >= 1 << 31 || rtt > MAX_RTT_UNITS {
        return None;
    }
    let nanos = u64::from(rtt & 0xffff) * 1_000_000_000 / 65536;
    Some(Duration::from_secs(u64::from(rtt >> 16)) + Duration::from_nanos(nanos))
}

/// RFC 3550 appendix A.1/A.3 reception statistics for one source.
#[derive(Debug, Clone, Copy, Default)]
struct Reception {
    ssrc: u32,
    started: bool,
    base_seq: u32,
    max_seq: u16,
    cycles: u32,
    received: u32,
    expected_prior: u32,
    received_prior: u32,
}

impl Reception {
    fn update(&mut self, ssrc: u32, seq: u16) {
        if !self.started || ssrc != self.ssrc {
            *self = Self {
                ssrc,
                started: true,
                base_seq: u32::from(seq),
                max_seq: seq,
                ..Self::default()
            };
        } else {
            let delta = seq.wrapping_sub(self.max_seq);
            if delta < 3000 {
                if seq < self.max_seq {
                    self.cycles = self.cycles.wrapping_add(1 << 16);
                }
                self.max_seq = seq;
            } else if delta <= u16::MAX - 100 {
                // A big jump: restart counting from here (the peer restarted its stream).
                *self = Self {
                    ssrc,
                    started: true,
                    base_seq: u32::from(seq),
                    max_seq: seq,
                    ..Self::default()
                };
            }
            // Else: a duplicate or reordered packet within 100 behind; counted below.
        }
        self.received += 1;
    }

    fn extended_max(&self) -> u32 {
        self.cycles + u32::from(self.max_seq)
    }

    fn block(&mut self, jitter: u32, last_sr: Option<(u32, Instant)>, now: Instant) -> ReportBlock {
        let expected = self.extended_max().wrapping_sub(self.base_seq) + 1;
        let lost = i64::from(expected) - i64::from(self.received);
        let expected_interval = expected.wrapping_sub(self.expected_prior);
        let received_interval = self.received.wrapping_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = i64::from(expected_interval) - i64::from(received_interval);
        let fraction_lost = if expected_interval == 0 || lost_interval <= 0 {
            0
        } else {
            ((lost_interval << 8) / i64::from(expected_interval)).min(255) as u8
        };
        let (lsr, dlsr) = match last_sr {
            Some((middle, at)) => (middle, ntp_short(now.saturating_duration_since(at))),
            None => (0, 0),
        };
        ReportBlock {
            ssrc: self.ssrc,
            fraction_lost,
            cumulative_lost: lost.clamp(-0x80_0000, 0x7F_FFFF) as i32,
            highest_sequence: self.extended_max(),
            jitter,
            last_sr: lsr,
            delay_since_last_sr: dlsr,
        }
    }
}

/// One call leg's RTP session. See the module docs.
#[derive(Debug)]
pub struct RtpSession {
    config: SessionConfig,
    remote: SocketAddr,
    latched: bool,
    rtcp_remote: SocketAddr,
    rtcp_latched: bool,
    /// The peer sent RTCP on its RTP port: send ours there too.
    rtcp_mux: bool,
    jitter: JitterBuffer,
    /// Moves the playout tick to just after packets land.
    aligner: PhaseAligner,
    /// A move the owner has not applied yet.
    clock_shift: Option<Duration>,
    /// A restart (this long after now) the owner has not applied yet.
    clock_restart: Option<Duration>,
    /// Ticks that waited for the phone's first audio packet.
    silent_ticks: u32,
    /// `resumed_late` of the jitter buffer already reported to the aligner.
    misses_seen: u64,
    dtmf: DtmfReceiver,
    reception: Reception,
    sequence: u16,
    timestamp: u32,
    sent_first: bool,
    last_received: Instant,
    receiving: bool,
    next_rtcp: Instant,
    /// The peer's latest sender report: middle 32 bits of its NTP time, when it arrived.
    last_sr: Option<(u32, Instant)>,
    /// Our latest sender report: middle 32 bits of its NTP time, when it left. It maps our
    /// clock onto NTP time for the round trip (see [`rtt_from_report`]).
    sr_sent: Option<(u32, Instant)>,
    stats: SessionStats,
    encode_buf: [u8; MAX_PACKET_BYTES],
    /// The sent stream's encoder (G.722 keeps state from packet to packet).
    encoder: AudioEncoder,
    /// Audio queued for sending, less than a packet's worth between polls.
    send_buf: Vec<i16>,
    /// The peer receives audio (not on hold).
    sending: bool,
    /// Audio packets sent while not latched.
    unverified_sent: u32,
    /// The SDP's RTP and RTCP addresses (before latching moved them).
    sdp_remote: SocketAddr,
    sdp_rtcp_remote: SocketAddr,
    /// IP of the SDP address: a source that may latch.
    sdp_ip: IpAddr,
    /// IP the signalling came from: a source that may latch (a phone behind NAT).
    signalling_ip: Option<IpAddr>,
    /// Splits and joins packets other than 20 ms, once the peer sends one.
    reframer: Option<Box<Reframer>>,
    /// The report blocks of our RTCP reports (at most one: we hear one source), kept from
    /// one report to the next so that sending a report costs no allocation.
    report_blocks: Vec<ReportBlock>,
    /// SRTP contexts when the stream is encrypted.
    srtp: Option<Box<SrtpSession>>,
}

impl RtpSession {
    /// Starts a session towards the SDP addresses for RTP and RTCP (see
    /// [`Negotiated`](crate::sip::sdp::Negotiated)).
    pub fn new(
        mut config: SessionConfig,
        remote: SocketAddr,
        remote_rtcp: SocketAddr,
        now: Instant,
    ) -> Self {
        let mut jitter = JitterBuffer::new(config.jitter);
        jitter.set_codec(config.codec);
        config.ptime_ms = config.ptime_ms.clamp(10, 60);
        Self {
            remote,
            latched: false,
            rtcp_remote: remote_rtcp,
            rtcp_latched: false,
            rtcp_mux: false,
            jitter,
            aligner: PhaseAligner::default(),
            clock_shift: None,
            clock_restart: None,
            silent_ticks: 0,
            misses_seen: 0,
            dtmf: DtmfReceiver::default(),
            reception: Reception::default(),
            sequence: config.initial_sequence,
            timestamp: config.initial_timestamp,
            sent_first: false,
            last_received: now,
            receiving: true,
            // RFC 3550 6.2: the first report may go after half the interval, so that the
            // peer learns of us (and we of the round trip) sooner.
            next_rtcp: now + config.rtcp_interval / 2,
            last_sr: None,
            sr_sent: None,
            stats: SessionStats::default(),
            encode_buf: [0; MAX_PACKET_BYTES],
            encoder: AudioEncoder::new(config.codec),
            send_buf: Vec::with_capacity(MAX_PACKET_SAMPLES + MAX_FRAME_SAMPLES),
            sending: true,
            unverified_sent: 0,
            sdp_remote: remote,
            sdp_rtcp_remote: remote_rtcp,
            sdp_ip: remote.ip().to_canonical(),
            signalling_ip: None,
            reframer: None,
            report_blocks: Vec::with_capacity(1),
            srtp: None,
            config,
        }
    }

    /// Encrypts the session with these SRTP keys (`None`: plain RTP). Keys equal to the
    /// current ones change nothing; new ones (a re-INVITE that rekeys) rebuild only the
    /// direction whose key or suite changed ([`SrtpSession::rekey`]: what we send keeps its
    /// rollover counter and SRTCP index while our key stays).
    pub fn set_srtp(&mut self, keys: Option<SrtpKeys>) -> Result<(), SrtpError> {
        match (&mut self.srtp, keys) {
            (Some(srtp), Some(keys)) => srtp.rekey(keys)?,
            (srtp, keys) => {
                *srtp = keys.map(SrtpSession::new).transpose()?.map(Box::new);
            }
        }
        Ok(())
    }

    /// The SRTP suite in use, `None` for plain RTP.
    pub fn srtp_suite(&self) -> Option<SrtpSuite> {
        self.srtp.as_ref().map(|s| s.keys().suite)
    }

    /// Protects a packet written into `out[..len]` when the session is encrypted.
    fn protect(&mut self, out: &mut [u8], len: usize, rtcp: bool) -> Result<usize, PacketError> {
        let Some(srtp) = &mut self.srtp else {
            return Ok(len);
        };
        let protected = if rtcp {
            srtp.protect_rtcp(out, len)
        } else {
            srtp.protect_rtp(out, len)
        };
        protected.map_err(|e| match e {
            SrtpError::BufferTooSmall { needed, have } => {
                PacketError::BufferTooSmall { needed, have }
            }
            e => PacketError::Srtp(e.to_string()),
        })
    }

    /// Where to send RTP and RTCP now.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The codec sent with (and the rate of the frames [`RtpSession::pop_frame`] gives).
    pub fn codec(&self) -> Codec {
        self.config.codec
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// What the session received from the peer's current source: packets expected and
    /// received (RFC 3550 A.3), for loss figures.
    pub fn reception(&self) -> ReceptionCounts {
        if !self.reception.started {
            return ReceptionCounts::default();
        }
        let expected = self
            .reception
            .extended_max()
            .wrapping_sub(self.reception.base_seq)
            .wrapping_add(1);
        ReceptionCounts {
            expected: u64::from(expected),
            received: u64::from(self.reception.received),
        }
    }

    /// Times received audio missed the tick that plays it and the tick moved.
    pub fn clock_misses(&self) -> u64 {
        self.aligner.misses()
    }

    /// Drops the received audio buffered beyond the jitter buffer's target (see
    /// [`JitterBuffer::drop_backlog`]); returns how many frames it dropped.
    pub fn drop_jitter_backlog(&mut self) -> u32 {
        self.jitter.drop_backlog()
    }

    /// The jitter buffer (for its statistics).
    pub fn jitter_buffer(&self) -> &JitterBuffer {
        &self.jitter
    }

    /// Where to send RTCP now.
    pub fn rtcp_remote(&self) -> SocketAddr {
        if self.rtcp_mux {
            self.remote
        } else {
            self.rtcp_remote
        }
    }

    /// A new SDP (re-INVITE): the codec may change; new addresses are sent to and latched
    /// afresh, with a new allowance of [`UNVERIFIED_SEND_LIMIT`] packets. The same addresses
    /// (a hold or resume) keep what was latched. A codec at another rate (G.711 and G.722)
    /// changes the rate of the frames both ways from now on (see [`RtpSession::codec`]).
    pub fn set_remote(
        &mut self,
        remote: SocketAddr,
        remote_rtcp: SocketAddr,
        codec: impl Into<Codec>,
        payload_type: u8,
    ) {
        let codec = codec.into();
        if remote != self.sdp_remote {
            self.sdp_remote = remote;
            self.remote = remote;
            self.sdp_ip = remote.ip().to_canonical();
            self.latched = false;
            self.rtcp_mux = false;
            self.unverified_sent = 0;
        }
        if remote_rtcp != self.sdp_rtcp_remote {
            self.sdp_rtcp_remote = remote_rtcp;
            self.rtcp_remote = remote_rtcp;
            self.rtcp_latched = false;
        }
        if codec != self.config.codec {
            if codec.sample_rate() != self.config.codec.sample_rate() {
                // Queued samples are at the old rate: gone, and the send clock moves on.
                self.timestamp = self
                    .timestamp
                    .wrapping_add((self.send_buf.len() / self.samples_per_unit()) as u32);
                self.send_buf.clear();
            }
            self.encoder = AudioEncoder::new(codec);
            self.jitter.set_codec(codec);
        }
        self.config.codec = codec;
        self.config.payload_type = payload_type;
    }

    /// A new packetisation time (a re-INVITE's `ptime`), in ms, clamped to 10-60: packets
    /// sent from now on carry that much audio each; audio already queued goes into them, so
    /// no sample is lost and the timestamps run on. Received packets of any length are taken
    /// whatever was negotiated (see [`super::reframe`]).
    pub fn set_ptime(&mut self, ptime_ms: u32) {
        self.config.ptime_ms = ptime_ms.clamp(10, 60);
    }

    /// Payload bytes (and timestamp units) per sent packet: `ptime` at the 8 kHz RTP clock.
    fn packet_bytes(&self) -> usize {
        self.config.ptime_ms as usize * 8
    }

    /// Samples per sent packet: `ptime` at the codec's rate.
    fn packet_samples(&self) -> usize {
        self.packet_bytes() * self.samples_per_unit()
    }

    /// Audio samples per RTP timestamp unit: 1 for G.711, 2 for G.722.
    fn samples_per_unit(&self) -> usize {
        self.config.codec.samples_per_byte()
    }

    /// The address the call's signalling came from: RTP from its IP may latch too (a phone
    /// behind NAT announces a private address in its SDP).
    pub fn set_signalling_source(&mut self, source: IpAddr) {
        self.signalling_ip = Some(source.to_canonical());
    }

    /// Whether the peer wants our audio (false while it holds the call with `sendonly` or
    /// `inactive`: RFC 3264 8.4 says we must not send then).
    pub fn set_sending(&mut self, sending: bool) {
        self.sending = sending;
    }

    /// Whether audio goes out now: the peer receives, and it has proved its address by
    /// sending to us, or only a few packets have gone there so far.
    pub fn may_send(&self) -> bool {
        self.sending && (self.latched || self.unverified_sent < UNVERIFIED_SEND_LIMIT)
    }

    fn may_latch(&self, source: SocketAddr) -> bool {
        let ip = source.ip().to_canonical();
        ip == self.sdp_ip || Some(ip) == self.signalling_ip
    }

    /// Whether the peer is expected to send (false while it holds the call); the timeout
    /// only runs while true and restarts when set.
    pub fn set_receiving(&mut self, receiving: bool, now: Instant) {
        self.receiving = receiving;
        self.last_received = now;
    }

    /// Whether the RTP timeout has passed without a packet.
    pub fn timed_out(&self, now: Instant) -> bool {
        self.receiving
            && now.saturating_duration_since(self.last_received) >= self.config.rtp_timeout
    }

    /// When [`RtpSession::timed_out`] will become true if nothing arrives (None on hold).
    pub fn timeout_at(&self) -> Option<Instant> {
        self.receiving
            .then(|| self.last_received + self.config.rtp_timeout)
    }

    /// Handles one datagram from the RTP port (RTCP may share it, RFC 5761).
    pub fn handle_datagram(&mut self, source: SocketAddr, data: &[u8], now: Instant) -> Received {
        if (self.latched && source != self.remote) || (!self.latched && !self.may_latch(source)) {
            self.stats.wrong_source += 1;
            return Received::WrongSource;
        }
        let decrypted;
        let data = match &mut self.srtp {
            None => data,
            Some(srtp) => {
                let plain = if is_rtcp(data) {
                    srtp.unprotect_rtcp(data)
                } else {
                    srtp.unprotect_rtp(data)
                };
                match plain {
                    Ok(plain) => {
                        decrypted = plain;
                        &decrypted[..]
                    }
                    Err(_) => {
                        self.stats.srtp_rejected += 1;
                        return Received::Unauthenticated;
                    }
                }
            }
        };
        if is_rtcp(data) {
            // Checked whole first: a malformed datagram changes nothing.
            if let Err(e) = RtcpPackets::validate(data) {
                return Received::Malformed(e);
            }
            self.latch(source);
            self.rtcp_mux = true;
            self.handle_rtcp(data, now);
            return Received::Rtcp;
        }
        let packet = match RtpPacket::parse(data) {
            Ok(p) => p,
            Err(e) => return Received::Malformed(e),
        };
        let pt = packet.header.payload_type;
        let is_dtmf = self.config.telephone_event == Some(pt);
        if !is_dtmf && Codec::from_payload_type(pt).is_none() {
            return Received::UnknownPayload(pt);
        }
        self.latch(source);
        self.last_received = now;
        self.stats.packets_received += 1;
        self.reception
            .update(packet.header.ssrc, packet.header.sequence);
        if is_dtmf {
            return match TelephoneEvent::parse(packet.payload) {
                Ok(ev) => match self
                    .dtmf
                    .handle(packet.header.timestamp, &ev, Codec::CLOCK_RATE)
                {
                    Some(d) => Received::Dtmf(d),
                    None => Received::DtmfProgress,
                },
                Err(e) => Received::Malformed(e),
            };
        }
        if packet.payload.len() != FRAME_SAMPLES && self.reframer.is_none() {
            self.reframer = Some(Box::default());
        }
        match &mut self.reframer {
            Some(reframer) => {
                let jitter = &mut self.jitter;
                reframer.push(&packet, |frame| {
                    jitter.push_frame(frame, now);
                });
                // After the frames: a new stream (SSRC) has restarted the buffer by now, so
                // that its first packet is not measured against the old stream's.
                jitter.packet_arrived(packet.header.timestamp, packet.payload.len(), now);
            }
            None => {
                self.jitter.push(&packet, now);
            }
        }
        let misses = self.jitter.stats().resumed_late;
        if let Some(margin) = self.aligner.first_audio() {
            // The tick started at a phase of its own: play the first packet a margin after
            // it lands and keep time from there.
            self.clock_restart = Some(margin);
        } else if misses != self.misses_seen {
            // The packet landed after its tick: keep more margin before the tick.
            self.misses_seen = misses;
            self.aligner.missed();
        }
        Received::Audio
    }

    fn latch(&mut self, source: SocketAddr) {
        if !self.latched {
            self.remote = source;
            self.latched = true;
        }
    }

    /// Handles one datagram from the RTCP port. RTCP does not count as activity for the RTP
    /// timeout: a peer that stopped sending media is gone even if its RTCP goes on.
    pub fn handle_rtcp_datagram(
        &mut self,
        source: SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Received {
        if (self.rtcp_latched && source != self.rtcp_remote)
            || (!self.rtcp_latched && !self.may_latch(source))
        {
            self.stats.wrong_source += 1;
            return Received::WrongSource;
        }
        let decrypted;
        let data = match &mut self.srtp {
            None => data,
            Some(srtp) => match srtp.unprotect_rtcp(data) {
                Ok(plain) => {
                    decrypted = plain;
                    &decrypted[..]
                }
                Err(_) => {
                    self.stats.srtp_rejected += 1;
                    return Received::Unauthenticated;
                }
            },
        };
        // Checked whole first: a malformed datagram changes nothing.
        if let Err(e) = RtcpPackets::validate(data) {
            return Received::Malformed(e);
        }
        if !self.rtcp_latched {
            self.rtcp_remote = source;
            self.rtcp_latched = true;
        }
        self.handle_rtcp(data, now);
        Received::Rtcp
    }

    /// Takes what the peer's reports say, read in place (a valid compound datagram).
    fn handle_rtcp(&mut self, data: &[u8], now: Instant) {
        for packet in RtcpPackets::new(data).flatten() {
            if let Some(ntp) = packet.ntp_timestamp() {
                // Middle 32 bits of the NTP timestamp, for LSR (RFC 3550 6.4.1).
                self.last_sr = Some(((ntp >> 16) as u32, now));
            }
            if let Some(block) = packet.report_blocks().find(|b| b.ssrc == self.config.ssrc) {
                self.stats.remote_lost = block.cumulative_lost;
                self.stats.remote_jitter = block.jitter;
                if let Some((sent, at)) = self.sr_sent {
                    // Our NTP time now, from the NTP time of our latest report and the
                    // monotonic time since: the wall clock may step, this does not.
                    let arrival = sent.wrapping_add(ntp_short(now.saturating_duration_since(at)));
                    if let Some(rtt) =
                        rtt_from_report(arrival, block.last_sr, block.delay_since_last_sr)
                    {
                        self.stats.rtt = Some(rtt);
                    }
                }
            }
        }
    }

    /// The next frame, now, ahead of its tick, when it has landed in order and the jitter
    /// buffer holds nothing on purpose (see [`JitterBuffer::pop_ahead`]). Call after each
    /// datagram; the tick then returns [`FrameKind::Ahead`](super::jitter::FrameKind::Ahead).
    pub fn pop_ahead(&mut self) -> Option<Frame<'_>> {
        self.jitter.pop_ahead()
    }

    /// The frame to play this tick.
    pub fn pop_frame(&mut self, now: Instant) -> Frame<'_> {
        let frame = self.jitter.pop(now);
        if let Some(shift) = self.aligner.on_tick(frame.slack) {
            self.clock_shift = Some(shift);
        }
        frame
    }

    /// How much earlier than one frame after the last tick the next tick should come, once
    /// per move (`None` when the tick stays put). Packets then land shortly before the tick
    /// that plays them, with a margin from the jitter observed.
    pub fn take_clock_shift(&mut self) -> Option<Duration> {
        self.clock_shift.take()
    }

    /// Whether this tick plays to the call. Not before the phone's first audio packet, for up
    /// to [`FIRST_PACKET_GRACE`] ticks: silence sent to the call before it would reach the
    /// agent at a phase the first packet then changes (see
    /// [`RtpSession::take_clock_restart`]), and an echo of that silence would set the call's
    /// media clock to the stale phase. After the grace a phone that sends nothing still gives
    /// the call a continuous stream (of silence).
    pub fn plays_this_tick(&mut self) -> bool {
        if self.silent_ticks >= FIRST_PACKET_GRACE || self.jitter.stats().received > 0 {
            return true;
        }
        self.silent_ticks += 1;
        false
    }

    /// How long after now the owner's next tick should come, once, when the first audio
    /// landed (`None` otherwise); the ticks after it keep that phase.
    pub fn take_clock_restart(&mut self) -> Option<Duration> {
        self.clock_restart.take()
    }

    /// Times the playout tick was moved earlier.
    pub fn clock_shifts(&self) -> u64 {
        self.aligner.shifts()
    }

    /// Queues the agent's audio for sending; [`RtpSession::poll_audio`] then packetises it.
    /// While [`RtpSession::may_send`] is false the audio is dropped (counted in
    /// [`SessionStats::samples_withheld`]) and the send clock moves on.
    pub fn queue_audio(&mut self, pcm: &[i16]) {
        if !self.may_send() {
            let dropped = self.send_buf.len() + pcm.len();
            self.send_buf.clear();
            self.stats.samples_withheld += dropped as u64;
            self.timestamp = self
                .timestamp
                .wrapping_add((dropped / self.samples_per_unit()) as u32);
            self.sent_first = false;
            return;
        }
        let room = self.send_buf.capacity() - self.send_buf.len();
        if pcm.len() > room {
            // The owner polls after every queue, so this holds less than a packet; a caller
            // that does not poll loses the oldest audio rather than growing the buffer.
            let excess = (pcm.len() - room).min(self.send_buf.len());
            self.send_buf.drain(..excess);
        }
        let take = pcm
            .len()
            .min(self.send_buf.capacity() - self.send_buf.len());
        self.send_buf.extend_from_slice(&pcm[pcm.len() - take..]);
    }

    /// The next packet of queued audio, written into `out` (its length returned), once a
    /// whole packet's worth is queued. Send it to [`RtpSession::remote`]; call until `None`.
    pub fn poll_audio(&mut self, out: &mut [u8]) -> Result<Option<usize>, PacketError> {
        let samples = self.packet_samples();
        if self.send_buf.len() < samples || !self.may_send() {
            return Ok(None);
        }
        let mut pcm = std::mem::take(&mut self.send_buf);
        let written = self.write_audio(&pcm[..samples], out);
        pcm.drain(..samples);
        self.send_buf = pcm;
        if !self.latched {
            self.unverified_sent += 1;
        }
        written.map(Some)
    }

    /// Packetises one packet's worth of samples ([`SessionConfig::ptime_ms`]; shorter input is
    /// padded with silence) into `out` and returns the packet length, whether or not
    /// [`RtpSession::may_send`]. Send it to [`RtpSession::remote`].
    pub fn write_audio(&mut self, pcm: &[i16], out: &mut [u8]) -> Result<usize, PacketError> {
        let samples = self.packet_samples();
        let bytes = self.packet_bytes();
        let pcm = &pcm[..pcm.len().min(samples)];
        let n = if pcm.len() == samples {
            self.encoder.encode(pcm, &mut self.encode_buf[..bytes])
        } else {
            // Padded with silence, encoded as such (G.722's state runs on through it).
            let mut padded = [0i16; MAX_PACKET_SAMPLES];
            padded[..pcm.len()].copy_from_slice(pcm);
            self.encoder
                .encode(&padded[..samples], &mut self.encode_buf[..bytes])
        };
        debug_assert_eq!(n, bytes);
        let mut header = RtpHeader::new(
            self.config.payload_type,
            self.sequence,
            self.timestamp,
            self.config.ssrc,
        );
        // The first packet starts a talk spurt (RFC 3551 4.1).
        header.marker = !self.sent_first;
        let len = header.write_packet(&self.encode_buf[..bytes], out)?;
        let len = self.protect(out, len, false)?;
        self.sent_first = true;
        self.sequence = self.sequence.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(bytes as u32);
        self.stats.packets_sent = self.stats.packets_sent.wrapping_add(1);
        self.stats.octets_sent = self.stats.octets_sent.wrapping_add(bytes as u32);
        Ok(len)
    }

    /// Payload type of telephone-event, if the peer negotiated it.
    pub fn telephone_event(&self) -> Option<u8> {
        self.config.telephone_event
    }

    /// The RTP timestamp the next sent frame carries (where a DTMF event starting now begins).
    pub fn send_timestamp(&self) -> u32 {
        self.timestamp
    }

    /// Writes one RFC 4733 packet of an outgoing event (payload type `payload_type`, the
    /// negotiated telephone-event) into `out` and returns its length. The send clock does not
    /// move: after the frame's packets, call [`RtpSession::skip_frame`], so that the event
    /// replaces the frame's audio and the audio after it starts a new talk spurt.
    pub fn write_event(
        &mut self,
        payload_type: u8,
        packet: &super::dtmf_out::EventPacket,
        out: &mut [u8],
    ) -> Result<usize, PacketError> {
        let mut payload = [0u8; TelephoneEvent::LEN];
        packet.event.write(&mut payload)?;
        let mut header = RtpHeader::new(
            payload_type,
            self.sequence,
            packet.timestamp,
            self.config.ssrc,
        );
        header.marker = packet.marker;
        let len = header.write_packet(&payload, out)?;
        let len = self.protect(out, len, false)?;
        self.sequence = self.sequence.wrapping_add(1);
        self.stats.packets_sent = self.stats.packets_sent.wrapping_add(1);
        self.stats.octets_sent = self
            .stats
            .octets_sent
            .wrapping_add(TelephoneEvent::LEN as u32);
        Ok(len)
    }

    /// Drops audio queued for a packet not yet complete (a DTMF event takes its place).
    pub fn drop_queued_audio(&mut self) {
        self.send_buf.clear();
    }

    /// Advances the send clock by one frame without sending (the agent was silent and we
    /// send nothing): the next packet's timestamp then shows the gap, and it carries the
    /// marker as the start of a new talk spurt.
    pub fn skip_frame(&mut self) {
        self.timestamp = self.timestamp.wrapping_add(FRAME_SAMPLES as u32);
        self.sent_first = false;
    }

    /// When the next RTCP report is due.
    pub fn rtcp_due(&self) -> Instant {
        self.next_rtcp
    }

    /// Writes a compound RTCP packet into `out` if one is due at `now`: an SR if we have
    /// sent, else an RR; a report block if we have received; SDES CNAME. `unix_time` is the
    /// wall clock (for the SR's NTP timestamp).
    pub fn poll_rtcp(
        &mut self,
        now: Instant,
        unix_time: Duration,
        out: &mut [u8],
    ) -> Result<Option<usize>, PacketError> {
        if now < self.next_rtcp {
            return Ok(None);
        }
        self.next_rtcp = now + self.config.rtcp_interval;
        let block = self.reception.started.then(|| {
            self.reception
                .block(self.jitter.jitter(), self.last_sr, now)
        });
        let mut reports = std::mem::take(&mut self.report_blocks);
        reports.clear();
        reports.extend(block);
        let (written, reports) = if self.stats.packets_sent > 0 {
            let ntp = ntp_timestamp(unix_time);
            self.sr_sent = Some(((ntp >> 16) as u32, now));
            let sr = SenderReport {
                ssrc: self.config.ssrc,
                ntp_timestamp: ntp,
                rtp_timestamp: self.timestamp,
                packet_count: self.stats.packets_sent,
                octet_count: self.stats.octets_sent,
                reports,
            };
            (sr.write(out), sr.reports)
        } else {
            let rr = ReceiverReport {
                ssrc: self.config.ssrc,
                reports,
            };
            (rr.write(out), rr.reports)
        };
        self.report_blocks = reports;
        let mut len = written?;
        len += write_sdes_cname(self.config.ssrc, &self.config.cname, &mut out[len..])?;
        self.protect(out, len, true).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::g711::G711;
    use crate::rtp::jitter::{FRAME_DURATION, FrameKind};
    use crate::rtp::packet::RtcpPacket;

    const PEER_SDP: &str = "192.0.2.50:40000";
    const PEER_SDP_RTCP: &str = "192.0.2.50:40001";
    const PEER_NAT: &str = "198.51.100.7:61000";

    fn session(now: Instant) -> RtpSession {
        let mut config = SessionConfig::new(G711::Pcmu, 0x1111, 100, 5000);
        config.telephone_event = Some(101);
        config.jitter.min_delay = Duration::from_millis(20);
        let mut s = RtpSession::new(
            config,
            PEER_SDP.parse().unwrap(),
            PEER_SDP_RTCP.parse().unwrap(),
            now,
        );
        // The INVITE came from the phone's public (NAT) address.
        s.set_signalling_source(PEER_NAT.parse::<SocketAddr>().unwrap().ip());
        s
    }

    #[test]
    fn strict_latching_ignores_sources_outside_the_sdp_and_signalling() {
        let now = Instant::now();
        let mut s = session(now);
        let attacker: SocketAddr = "203.0.113.66:4000".parse().unwrap();
        for seq in 0..50 {
            assert_eq!(
                s.handle_datagram(
                    attacker,
                    &rtp(0, seq, u32::from(seq) * 160, &[0x11; 160]),
                    now
                ),
                Received::WrongSource
            );
        }
        let rr = ReceiverReport {
            ssrc: 0x6666,
            reports: vec![],
        };
        let mut buf = [0u8; 64];
        let n = rr.write(&mut buf).unwrap();
        assert_eq!(
            s.handle_rtcp_datagram(attacker, &buf[..n], now),
            Received::WrongSource
        );
        assert_eq!(s.remote(), PEER_SDP.parse().unwrap(), "not latched");
        assert_eq!(s.rtcp_remote(), PEER_SDP_RTCP.parse().unwrap());
        assert_eq!(s.stats().wrong_source, 51);
        assert_eq!(s.jitter_buffer().stats().received, 0);
        // The phone, from another port of its SDP address, latches.
        let phone: SocketAddr = "192.0.2.50:41000".parse().unwrap();
        assert_eq!(
            s.handle_datagram(phone, &rtp(0, 1, 0, &[0xFF; 160]), now),
            Received::Audio
        );
        assert_eq!(s.remote(), phone);
    }

    #[test]
    fn at_most_a_few_packets_go_to_an_address_that_never_sent_rtp() {
        let now = Instant::now();
        let mut s = session(now);
        let mut out = [0u8; 600];
        let mut sent = 0;
        for _ in 0..1500 {
            s.queue_audio(&[1000; 160]);
            while s.poll_audio(&mut out).unwrap().is_some() {
                sent += 1;
            }
        }
        assert_eq!(sent, UNVERIFIED_SEND_LIMIT);
        assert!(!s.may_send());
        assert_eq!(
            s.stats().samples_withheld,
            (1500 - u64::from(UNVERIFIED_SEND_LIMIT)) * 160
        );
        // Once the phone sends, audio flows again, marked as a new talk spurt with the
        // timestamp showing the gap.
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        s.handle_datagram(src, &rtp(0, 1, 0, &[0xFF; 160]), now);
        assert!(s.may_send());
        s.queue_audio(&[1000; 160]);
        let n = s.poll_audio(&mut out).unwrap().unwrap();
        let p = RtpPacket::parse(&out[..n]).unwrap();
        assert!(p.header.marker);
        assert_eq!(p.header.timestamp, 5000 + 1500 * 160);
    }

    #[test]
    fn nothing_is_sent_while_the_peer_holds() {
        let now = Instant::now();
        let mut s = session(now);
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        s.handle_datagram(src, &rtp(0, 1, 0, &[0xFF; 160]), now);
        let mut out = [0u8; 600];
        s.set_sending(false);
        for _ in 0..100 {
            s.queue_audio(&[1000; 160]);
            assert_eq!(s.poll_audio(&mut out).unwrap(), None);
        }
        s.set_sending(true);
        s.queue_audio(&[1000; 160]);
        assert!(s.poll_audio(&mut out).unwrap().is_some(), "resumed");
        // A hold and resume by re-INVITE names the same address: the latch stays, and audio
        // flows on resume however long the phone was silent.
        let sdp_rtcp: SocketAddr = PEER_SDP_RTCP.parse().unwrap();
        s.set_remote(src, sdp_rtcp, G711::Pcmu, 0);
        let other: SocketAddr = "192.0.2.50:41000".parse().unwrap();
        assert_eq!(
            s.handle_datagram(other, &rtp(0, 2, 160, &[0xFF; 160]), now),
            Received::WrongSource,
            "still latched"
        );
        for _ in 0..100 {
            s.queue_audio(&[1000; 160]);
            assert!(s.poll_audio(&mut out).unwrap().is_some());
        }
    }

    #[test]
    fn sends_packets_of_the_negotiated_ptime_without_losing_samples() {
        for ptime in [10u32, 20, 30, 40, 60] {
            let now = Instant::now();
            let mut config = SessionConfig::new(G711::Pcmu, 1, 0, 0);
            config.ptime_ms = ptime;
            let peer: SocketAddr = PEER_SDP.parse().unwrap();
            let mut s = RtpSession::new(config, peer, peer, now);
            s.handle_datagram(peer, &rtp(0, 1, 0, &[0xFF; 160]), now);
            let mut out = [0u8; 600];
            let mut sent: Vec<u8> = Vec::new();
            let mut timestamps = Vec::new();
            // 1.2 s of a ramp, in the call's 20 ms frames.
            let ramp: Vec<i16> = (0..9600).map(|i| (i % 4000) as i16 * 8).collect();
            for frame in ramp.chunks(160) {
                s.queue_audio(frame);
                while let Some(n) = s.poll_audio(&mut out).unwrap() {
                    let p = RtpPacket::parse(&out[..n]).unwrap();
                    assert_eq!(p.payload.len(), ptime as usize * 8);
                    timestamps.push(p.header.timestamp);
                    sent.extend_from_slice(p.payload);
                }
            }
            let expected: Vec<u8> = ramp.iter().map(|&x| G711::Pcmu.encode_sample(x)).collect();
            assert_eq!(sent, expected, "ptime {ptime}");
            assert!(
                timestamps
                    .windows(2)
                    .all(|w| w[1].wrapping_sub(w[0]) == ptime * 8)
            );
        }
    }

    #[test]
    fn receives_30_ms_packets_as_whole_20_ms_frames() {
        let now = Instant::now();
        let mut s = session(now);
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        // 3 s of a ramp in 240-sample (30 ms) packets, arriving on time.
        let ramp: Vec<u8> = (0..24000u32).map(|i| (i % 250) as u8).collect();
        let mut heard: Vec<u8> = Vec::new();
        let mut tick = now;
        let mut next_packet = 0usize;
        for t in 0..160u32 {
            let at = now + Duration::from_millis(u64::from(t) * 20);
            while next_packet * 240 < ramp.len() && next_packet as u32 * 30 <= t * 20 {
                let start = next_packet * 240;
                let p = rtp(
                    0,
                    next_packet as u16,
                    start as u32,
                    &ramp[start..start + 240],
                );
                assert_eq!(s.handle_datagram(src, &p, at), Received::Audio);
                while let Some(f) = s.pop_ahead() {
                    heard.extend(f.samples.iter().map(|&x| G711::Pcmu.encode_sample(x)));
                }
                next_packet += 1;
            }
            tick = tick.max(at);
            let f = s.pop_frame(tick);
            if f.kind == FrameKind::Audio {
                heard.extend(f.samples.iter().map(|&x| G711::Pcmu.encode_sample(x)));
            }
        }
        // 30 ms packets land in pairs of frames: the buffer waits (concealing while its
        // target grows) but drops nothing.
        let stats = s.jitter_buffer().stats();
        assert_eq!(
            (
                stats.late,
                stats.discarded,
                stats.overflow,
                stats.size_mismatch
            ),
            (0, 0, 0, 0),
            "{stats:?}"
        );
        // Every sample, in order (mu-law codes round-trip exactly, bar 0x7F/0xFF's zero).
        let expected: Vec<u8> = ramp[..heard.len()]
            .iter()
            .map(|&c| G711::Pcmu.encode_sample(G711::Pcmu.decode_sample(c)))
            .collect();
        assert!(heard.len() >= 150 * 160, "{}", heard.len());
        assert_eq!(heard, expected);
    }

    /// Feeds the phone's packets `(sequence, first sample, samples)` of `ramp`, each landing
    /// when its last sample is due (timestamp 0 at `now`), and plays a tick every 20 ms;
    /// returns what was played, as mu-law codes.
    fn play(
        s: &mut RtpSession,
        now: Instant,
        ramp: &[u8],
        packets: &[(u16, usize, usize)],
    ) -> Vec<u8> {
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        let mut heard: Vec<u8> = Vec::new();
        let mut next = 0usize;
        let ticks = packets
            .last()
            .map_or(0, |&(_, at, len)| (at + len) / 160 + 10);
        for t in 0..ticks {
            let at = now + Duration::from_millis(t as u64 * 20);
            while let Some(&(seq, start, len)) = packets.get(next) {
                if start + len > (t + 1) * 160 {
                    break;
                }
                let p = rtp(0, seq, start as u32, &ramp[start..start + len]);
                assert_eq!(s.handle_datagram(src, &p, at), Received::Audio);
                while let Some(f) = s.pop_ahead() {
                    heard.extend(f.samples.iter().map(|&x| G711::Pcmu.encode_sample(x)));
                }
                next += 1;
            }
            let f = s.pop_frame(at);
            if f.kind == FrameKind::Audio {
                heard.extend(f.samples.iter().map(|&x| G711::Pcmu.encode_sample(x)));
            }
        }
        heard
    }

    #[test]
    fn a_ptime_change_mid_call_is_received_and_sent_without_a_sample_lost() {
        // The phone sends 1 s at 20 ms, 1.2 s at 30 ms (its re-INVITE said ptime:30), then 1 s
        // at 20 ms again; its sequence numbers and timestamps run on, from wherever it began.
        let ramp: Vec<u8> = (0..30_000u32).map(|i| (i % 250) as u8).collect();
        for first_seq in [1000u16, 40_000, 65_500] {
            let now = Instant::now();
            let mut s = session(now);
            let mut packets = Vec::new();
            let mut seq = first_seq;
            let mut at = 0usize;
            for (len, count) in [(160, 50), (240, 40), (160, 50)] {
                for _ in 0..count {
                    packets.push((seq, at, len));
                    seq = seq.wrapping_add(1);
                    at += len;
                }
            }
            let heard = play(&mut s, now, &ramp, &packets);
            let stats = s.jitter_buffer().stats();
            assert_eq!(
                (
                    stats.late,
                    stats.discarded,
                    stats.overflow,
                    stats.size_mismatch
                ),
                (0, 0, 0, 0),
                "from {first_seq}: {stats:?}"
            );
            let expected: Vec<u8> = ramp[..at]
                .iter()
                .map(|&c| G711::Pcmu.encode_sample(G711::Pcmu.decode_sample(c)))
                .collect();
            assert_eq!(heard.len(), at, "from {first_seq}: every sample played");
            assert!(heard == expected, "from {first_seq}: the stream breaks");
        }
        let now = Instant::now();
        let mut s = session(now);
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        s.handle_datagram(src, &rtp(0, 1, 0, &[0xFF; 160]), now);

        // Sending follows the new ptime from the next packet: 20 ms, then 30, then 20.
        let mut out = [0u8; 600];
        let mut sent: Vec<u8> = Vec::new();
        let mut sizes = Vec::new();
        let mut timestamps = Vec::new();
        let pcm: Vec<i16> = (0..14_400).map(|i| (i % 4000) as i16 * 8).collect();
        for (i, frame) in pcm.chunks(160).enumerate() {
            match i {
                30 => s.set_ptime(30),
                // 31 frames at 30 ms leave 160 samples queued: they go in the next 20 ms packet.
                61 => s.set_ptime(20),
                _ => {}
            }
            s.queue_audio(frame);
            while let Some(n) = s.poll_audio(&mut out).unwrap() {
                let p = RtpPacket::parse(&out[..n]).unwrap();
                sizes.push(p.payload.len());
                timestamps.push(p.header.timestamp);
                sent.extend_from_slice(p.payload);
            }
        }
        let expected: Vec<u8> = pcm.iter().map(|&x| G711::Pcmu.encode_sample(x)).collect();
        assert_eq!(sent, expected, "every sample sent, in order");
        assert_eq!(&sizes[..30], &[160; 30]);
        assert!(sizes[30..50].iter().all(|&n| n == 240), "{sizes:?}");
        assert_eq!(sizes.last(), Some(&160));
        assert!(
            timestamps
                .windows(2)
                .zip(&sizes)
                .all(|(w, &n)| w[1].wrapping_sub(w[0]) == n as u32),
            "timestamps run on"
        );
    }

    fn rtp(pt: u8, seq: u16, ts: u32, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 12 + payload.len()];
        RtpHeader::new(pt, seq, ts, 0x2222)
            .write_packet(payload, &mut buf)
            .unwrap();
        buf
    }

    #[test]
    fn sends_with_increasing_sequence_and_timestamp() {
        let now = Instant::now();
        let mut s = session(now);
        let mut out = [0u8; 200];
        let mut headers = Vec::new();
        for _ in 0..3 {
            let n = s.write_audio(&[1000; 160], &mut out).unwrap();
            assert_eq!(n, 172);
            let p = RtpPacket::parse(&out[..n]).unwrap();
            assert_eq!(p.payload[0], G711::Pcmu.encode_sample(1000));
            headers.push(p.header);
        }
        assert!(headers[0].marker);
        assert!(!headers[1].marker);
        assert_eq!(
            headers
                .iter()
                .map(|h| (h.sequence, h.timestamp))
                .collect::<Vec<_>>(),
            vec![(100, 5000), (101, 5160), (102, 5320)]
        );
        assert!(
            headers
                .iter()
                .all(|h| h.ssrc == 0x1111 && h.payload_type == 0)
        );
        // A silent gap moves the timestamp on and marks the next packet.
        s.skip_frame();
        let n = s.write_audio(&[0; 80], &mut out).unwrap();
        let p = RtpPacket::parse(&out[..n]).unwrap();
        assert_eq!((p.header.sequence, p.header.timestamp), (103, 5640));
        assert!(p.header.marker);
        // Short input is padded with silence.
        assert_eq!(p.payload[159], 0xFF);
        assert_eq!(s.stats().packets_sent, 4);
    }

    /// Packets land every 20 ms at `1 ms + jitter(i)` after a tick of the leg's original
    /// clock; the tick runs as the leg runs it (moved by `take_clock_shift`). The first
    /// packet's restart is left out, as if it had been used already: the clock starts at the
    /// original phase. Returns the slack of each frame played and the session.
    fn run_ticks(jitter: impl Fn(u16) -> Duration, ticks: u16) -> (Vec<Duration>, RtpSession) {
        run_ticks_from(jitter, ticks, false)
    }

    /// [`run_ticks`], with the first packet's restart applied when `restart`.
    fn run_ticks_from(
        jitter: impl Fn(u16) -> Duration,
        ticks: u16,
        restart: bool,
    ) -> (Vec<Duration>, RtpSession) {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.config.jitter = JitterConfig::default();
        s.jitter = JitterBuffer::new(JitterConfig::default());
        if !restart {
            s.aligner.first_audio();
        }
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        let arrival = |seq: u16| {
            t0 + FRAME_DURATION * u32::from(seq) + Duration::from_millis(1) + jitter(seq)
        };
        let mut tick = t0 + FRAME_DURATION;
        let mut seq = 0u16;
        let mut slacks = Vec::new();
        for _ in 0..ticks {
            while arrival(seq) <= tick {
                let p = rtp(0, seq, u32::from(seq) * 160, &[0xFF; 160]);
                assert_eq!(s.handle_datagram(src, &p, arrival(seq)), Received::Audio);
                if let Some(margin) = s.take_clock_restart() {
                    tick = arrival(seq) + margin;
                }
                seq += 1;
            }
            let f = s.pop_frame(tick);
            if f.kind == FrameKind::Audio {
                slacks.push(f.slack.unwrap());
            }
            tick += FRAME_DURATION;
            if let Some(shift) = s.take_clock_shift() {
                tick -= shift;
            }
        }
        (slacks, s)
    }

    #[test]
    fn the_playout_tick_moves_to_just_after_packets_land() {
        // Packets land 1 ms after each tick: at first each waits 19 ms for the next one.
        let (slacks, s) = run_ticks(|_| Duration::ZERO, 200);
        assert_eq!(slacks[0], Duration::from_millis(19));
        assert_eq!(s.clock_shifts(), 1, "one move, then the tick stays");
        assert_eq!(*slacks.last().unwrap(), Duration::from_millis(3));
        let stats = s.jitter_buffer().stats();
        assert_eq!((stats.concealed, stats.late, stats.discarded), (0, 0, 0));
        assert_eq!(s.jitter_buffer().target_delay(), FRAME_DURATION);
    }

    #[test]
    fn the_first_packet_sets_the_playout_phase() {
        // As above, but the tick restarts a margin after the first packet lands.
        let (slacks, s) = run_ticks_from(|_| Duration::ZERO, 200, true);
        assert!(
            slacks.iter().all(|w| *w == Duration::from_millis(3)),
            "every frame, the first too, waits the margin: {slacks:?}"
        );
        assert_eq!(s.clock_shifts(), 0);
        let stats = s.jitter_buffer().stats();
        assert_eq!((stats.concealed, stats.late, stats.discarded), (0, 0, 0));
    }

    #[test]
    fn ticks_wait_a_little_for_the_first_packet_then_play_silence() {
        let now = Instant::now();
        let mut s = session(now);
        for _ in 0..FIRST_PACKET_GRACE {
            assert!(
                !s.plays_this_tick(),
                "nothing to play before the first packet"
            );
        }
        assert!(s.plays_this_tick(), "then silence: the stream never stalls");
        let mut s = session(now);
        assert!(!s.plays_this_tick());
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        s.handle_datagram(src, &rtp(0, 1, 0, &[0xFF; 160]), now);
        assert!(
            s.plays_this_tick(),
            "the first packet starts playout at once"
        );
        assert!(s.take_clock_restart().is_some());
        assert_eq!(s.take_clock_restart(), None, "once");
    }

    #[test]
    fn a_jittery_stream_keeps_a_margin_and_misses_nothing() {
        // 0-4 ms of arrival jitter in a repeating pattern.
        let (slacks, s) = run_ticks(|i| Duration::from_millis(u64::from(i % 5)), 300);
        assert!(s.clock_shifts() >= 1);
        let tail = &slacks[100..];
        let least = tail.iter().min().unwrap();
        let most = tail.iter().max().unwrap();
        assert!(*least >= Duration::from_millis(3), "{least:?}");
        assert!(*most <= Duration::from_millis(10), "{most:?}");
        let stats = s.jitter_buffer().stats();
        assert_eq!((stats.concealed, stats.resumed_late), (0, 0));
    }

    #[test]
    fn a_late_packet_widens_the_margin() {
        // Once aligned (3 ms margin), packet 60 lands 5 ms late: it misses its tick, plays a
        // tick later, and the frames after it queue one deep until the tick moves again.
        let late = |i: u16| Duration::from_millis(if i == 60 { 5 } else { 0 });
        let (slacks, s) = run_ticks(late, 200);
        let stats = s.jitter_buffer().stats();
        assert_eq!((stats.resumed_late, stats.concealed), (1, 1));
        assert_eq!(stats.discarded, 0);
        // The standing frame is played out by the next moves (the window that saw the late
        // frame itself counts 5 ms of jitter, so the first move keeps a wider margin), and
        // the tick settles with 2 ms more margin than before.
        assert_eq!(s.clock_shifts(), 3);
        assert!(slacks[60..].iter().all(|w| *w <= Duration::from_millis(23)));
        assert_eq!(*slacks.last().unwrap(), Duration::from_millis(5));
    }

    #[test]
    fn symmetric_rtp_latches_to_the_first_source() {
        let now = Instant::now();
        let mut s = session(now);
        assert_eq!(s.remote(), PEER_SDP.parse().unwrap());
        let nat: SocketAddr = PEER_NAT.parse().unwrap();
        assert_eq!(
            s.handle_datagram(nat, &rtp(0, 1, 0, &[0xFF; 160]), now),
            Received::Audio
        );
        assert_eq!(s.remote(), nat);
        // Others are ignored once latched.
        let other: SocketAddr = "203.0.113.66:4000".parse().unwrap();
        assert_eq!(
            s.handle_datagram(other, &rtp(0, 2, 160, &[0xFF; 160]), now),
            Received::WrongSource
        );
        // A new SDP unlatches.
        s.set_remote(other, other, G711::Pcma, 8);
        assert_eq!(
            s.handle_datagram(other, &rtp(8, 3, 320, &[0xD5; 160]), now),
            Received::Audio
        );
        assert_eq!(s.remote(), other);
    }

    #[test]
    fn audio_reaches_the_jitter_buffer_and_dtmf_is_reported_once() {
        let now = Instant::now();
        let mut s = session(now);
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        let code = G711::Pcmu.encode_sample(4000);
        s.handle_datagram(src, &rtp(0, 1, 0, &[code; 160]), now);
        let f = s.pop_frame(now + FRAME_DURATION);
        assert_eq!(f.kind, FrameKind::Audio);
        assert_eq!(f.samples[0], G711::Pcmu.decode_sample(code));
        let ev = |end: bool, dur: u16| {
            let mut p = [0u8; 4];
            TelephoneEvent {
                event: 5,
                end,
                volume: 10,
                duration: dur,
            }
            .write(&mut p)
            .unwrap();
            p
        };
        assert_eq!(
            s.handle_datagram(src, &rtp(101, 2, 160, &ev(false, 160)), now),
            Received::DtmfProgress
        );
        let mut digits = Vec::new();
        for seq in 3..6 {
            if let Received::Dtmf(d) =
                s.handle_datagram(src, &rtp(101, seq, 160, &ev(true, 960)), now)
            {
                digits.push(d);
            }
        }
        assert_eq!(
            digits,
            vec![Dtmf {
                digit: '5',
                duration_ms: 120
            }]
        );
        assert_eq!(
            s.handle_datagram(src, &rtp(13, 9, 0, &[0]), now),
            Received::UnknownPayload(13)
        );
        assert!(matches!(
            s.handle_datagram(src, &[0x80, 0x00, 1], now),
            Received::Malformed(_)
        ));
    }

    #[test]
    fn rtcp_port_latching_and_mux() {
        let now = Instant::now();
        let mut s = session(now);
        assert_eq!(s.rtcp_remote(), PEER_SDP_RTCP.parse().unwrap());
        let rr = ReceiverReport {
            ssrc: 0x2222,
            reports: vec![],
        };
        let mut buf = [0u8; 64];
        let n = rr.write(&mut buf).unwrap();
        let nat: SocketAddr = "198.51.100.7:61001".parse().unwrap();
        assert_eq!(s.handle_rtcp_datagram(nat, &buf[..n], now), Received::Rtcp);
        assert_eq!(s.rtcp_remote(), nat);
        let other: SocketAddr = "203.0.113.1:9".parse().unwrap();
        assert_eq!(
            s.handle_rtcp_datagram(other, &buf[..n], now),
            Received::WrongSource
        );
        assert!(matches!(
            s.handle_rtcp_datagram(nat, &[1, 2, 3], now),
            Received::Malformed(_)
        ));
        // RTCP alone does not keep the RTP timeout away.
        assert!(s.timed_out(now + Duration::from_secs(30)));
        // A peer muxing RTCP on its RTP port gets ours there.
        let mut m = session(now);
        let rtp_src: SocketAddr = PEER_NAT.parse().unwrap();
        assert_eq!(m.handle_datagram(rtp_src, &buf[..n], now), Received::Rtcp);
        assert_eq!(m.rtcp_remote(), rtp_src);
    }

    #[test]
    fn rtp_timeout_and_hold() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        assert_eq!(s.timeout_at(), Some(t0 + Duration::from_secs(30)));
        s.handle_datagram(
            src,
            &rtp(0, 1, 0, &[0xFF; 160]),
            t0 + Duration::from_secs(10),
        );
        assert!(!s.timed_out(t0 + Duration::from_secs(39)));
        assert!(s.timed_out(t0 + Duration::from_secs(40)));
        s.set_receiving(false, t0 + Duration::from_secs(40));
        assert!(!s.timed_out(t0 + Duration::from_secs(400)));
        assert_eq!(s.timeout_at(), None);
        s.set_receiving(true, t0 + Duration::from_secs(400));
        assert!(!s.timed_out(t0 + Duration::from_secs(401)));
        assert!(s.timed_out(t0 + Duration::from_secs(430)));
    }

    #[test]
    fn rtcp_reports_loss_and_reads_the_peer_report() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let src: SocketAddr = PEER_SDP.parse().unwrap();
        let mut out = [0u8; 512];
        assert_eq!(
            s.poll_rtcp(t0, Duration::from_secs(1), &mut out).unwrap(),
            None
        );
        // Receive 1..=10 without 4 and 7: 2 lost of 10. Across a sequence wrap.
        for i in (0u16..10).filter(|i| *i != 3 && *i != 6) {
            let seq = 65530u16.wrapping_add(i);
            s.handle_datagram(src, &rtp(0, seq, u32::from(i) * 160, &[0xFF; 160]), t0);
        }
        // The peer's SR arrives, about us.
        let peer_sr = SenderReport {
            ssrc: 0x2222,
            ntp_timestamp: 0x0000_1234_5678_0000,
            rtp_timestamp: 0,
            packet_count: 10,
            octet_count: 1600,
            reports: vec![ReportBlock {
                ssrc: 0x1111,
                cumulative_lost: 3,
                jitter: 40,
                ..ReportBlock::default()
            }],
        };
        let mut buf = [0u8; 128];
        let n = peer_sr.write(&mut buf).unwrap();
        assert_eq!(s.handle_datagram(src, &buf[..n], t0), Received::Rtcp);
        assert_eq!(s.stats().remote_lost, 3);
        assert_eq!(s.stats().remote_jitter, 40);

        let at = t0 + Duration::from_secs(5);
        let n = s
            .poll_rtcp(at, Duration::from_secs(1_700_000_000), &mut out)
            .unwrap()
            .unwrap();
        let packets = RtcpPacket::parse_compound(&out[..n]).unwrap();
        // Nothing sent yet: a receiver report, then SDES.
        let RtcpPacket::ReceiverReport(rr) = &packets[0] else {
            panic!("{packets:?}");
        };
        assert_eq!(rr.ssrc, 0x1111);
        let b = rr.reports[0];
        assert_eq!(b.ssrc, 0x2222);
        assert_eq!(b.cumulative_lost, 2);
        assert_eq!(b.fraction_lost, (2 * 256 / 10) as u8);
        assert_eq!(b.highest_sequence, (1 << 16) | 3);
        assert_eq!(b.last_sr, 0x1234_5678);
        assert_eq!(b.delay_since_last_sr, 5 * 65536);
        assert!(matches!(packets[1], RtcpPacket::Other { packet_type: 202 }));
        // Not due again until the interval passes.
        assert_eq!(s.poll_rtcp(at, Duration::ZERO, &mut out).unwrap(), None);
        assert_eq!(s.rtcp_due(), at + Duration::from_secs(5));
        // Once we send, it is a sender report.
        s.write_audio(&[0; 160], &mut [0u8; 200]).unwrap();
        let n = s
            .poll_rtcp(
                at + Duration::from_secs(5),
                Duration::from_secs(1),
                &mut out,
            )
            .unwrap()
            .unwrap();
        let packets = RtcpPacket::parse_compound(&out[..n]).unwrap();
        let RtcpPacket::SenderReport(sr) = &packets[0] else {
            panic!("{packets:?}");
        };
        assert_eq!((sr.packet_count, sr.octet_count), (1, 160));
        // No new packets in this interval: nothing lost in it.
        assert_eq!(sr.reports[0].fraction_lost, 0);
    }

    #[test]
    fn rtt_arithmetic_wraps_with_the_ntp_middle_bits() {
        // 1 s 0x8000 units = 1.5 s after LSR, 1 s of it held at the peer: 0.5 s.
        let lsr = 0x0001_0000;
        assert_eq!(
            rtt_from_report(lsr + 0x0001_8000, lsr, 0x0001_0000),
            Some(Duration::from_millis(500))
        );
        // The middle 32 bits wrapped between the SR and the report's arrival.
        let lsr: u32 = 0xFFFF_F000;
        let arrival = lsr.wrapping_add(0x0000_2000);
        assert_eq!(arrival, 0x0000_1000);
        // 0x2000 units = 125 ms, 0x1000 of them held: 62.5 ms.
        assert_eq!(
            rtt_from_report(arrival, lsr, 0x1000),
            Some(Duration::from_micros(62_500))
        );
        // No SR named, or a report from a clock that is not ours (negative).
        assert_eq!(rtt_from_report(0x1234, 0, 0), None);
        assert_eq!(rtt_from_report(0x1000, 0x0800, 0x1000), None);
        assert_eq!(rtt_from_report(5, 5, 0), Some(Duration::ZERO));
        // A peer's made-up LSR/DLSR: 10 s is the most believed, an hour is ignored.
        assert_eq!(
            rtt_from_report(lsr.wrapping_add(10 * 65536), lsr, 0),
            Some(MAX_RTT)
        );
        assert_eq!(
            rtt_from_report(lsr.wrapping_add(10 * 65536 + 1), lsr, 0),
            None
        );
        assert_eq!(
            rtt_from_report(lsr.wrapping_add(3600 * 65536), lsr, 0),
            None
        );
    }

    /// Two sessions keyed crosswise: audio, DTMF and RTCP go through encrypted; a tampered
    /// packet, a replay and a plain packet are dropped and counted, never played.
    #[test]
    fn srtp_pair_exchanges_audio_and_drops_what_fails_authentication() {
        use crate::rtp::srtp::{MasterKey, SrtpKeys};
        let t0 = Instant::now();
        let a_addr: SocketAddr = "10.0.0.1:20000".parse().unwrap();
        let b_addr: SocketAddr = "10.0.0.2:30000".parse().unwrap();
        let (ka, kb) = (MasterKey::random(), MasterKey::random());
        for suite in SrtpSuite::ALL {
            let mut a = RtpSession::new(
                SessionConfig::new(G711::Pcmu, 0xA, 1, 1),
                b_addr,
                b_addr,
                t0,
            );
            let mut b = RtpSession::new(
                SessionConfig::new(G711::Pcmu, 0xB, 1, 1),
                a_addr,
                a_addr,
                t0,
            );
            let keys = |local, remote| {
                Some(SrtpKeys {
                    suite,
                    local,
                    remote,
                })
            };
            a.set_srtp(keys(ka, kb)).unwrap();
            b.set_srtp(keys(kb, ka)).unwrap();
            assert_eq!(a.srtp_suite(), Some(suite));
            let mut buf = [0u8; 512];
            let tone: Vec<i16> = (0..160).map(|i| ((i % 16) * 500) as i16).collect();
            let len = a.write_audio(&tone, &mut buf).unwrap();
            assert_eq!(len, 12 + 160 + suite.rtp_tag_len());
            // The payload on the wire is not the plain encoding.
            let mut plain = [0u8; 160];
            crate::rtp::g711::G711::Pcmu.encode(&tone, &mut plain);
            assert_ne!(buf[12..172], plain[..]);
            let packet = buf[..len].to_vec();
            let mut tampered = packet.clone();
            tampered[20] ^= 0x40;
            assert_eq!(
                b.handle_datagram(a_addr, &tampered, t0),
                Received::Unauthenticated
            );
            assert_eq!(b.handle_datagram(a_addr, &packet, t0), Received::Audio);
            assert_eq!(
                b.handle_datagram(a_addr, &packet, t0),
                Received::Unauthenticated
            );
            // A plain packet from the peer's address is no better than a forged one.
            let plain_packet = rtp(0, 2, 161, &plain);
            assert_eq!(
                b.handle_datagram(a_addr, &plain_packet, t0),
                Received::Unauthenticated
            );
            assert_eq!(b.stats().srtp_rejected, 3);
            assert_eq!(b.stats().packets_received, 1);
            let frame = b.pop_ahead().expect("the decrypted frame");
            let decoded: Vec<i16> = frame.samples.to_vec();
            let mut expected = [0i16; 160];
            crate::rtp::g711::G711::Pcmu.decode(&plain, &mut expected);
            assert_eq!(decoded, expected);
            // RTCP both ways, on the RTP port (mux) and on the RTCP port.
            let n = a
                .poll_rtcp(
                    t0 + Duration::from_secs(5),
                    Duration::from_secs(1),
                    &mut buf,
                )
                .unwrap()
                .unwrap();
            assert_eq!(b.handle_datagram(a_addr, &buf[..n], t0), Received::Rtcp);
            let n = b
                .poll_rtcp(
                    t0 + Duration::from_secs(5),
                    Duration::from_secs(1),
                    &mut buf,
                )
                .unwrap()
                .unwrap();
            assert_eq!(
                a.handle_rtcp_datagram(b_addr, &buf[..n], t0),
                Received::Rtcp
            );
            assert_eq!(
                a.handle_rtcp_datagram(b_addr, &buf[..n], t0),
                Received::Unauthenticated
            );
            // DTMF events are protected too.
            let ev = crate::rtp::dtmf_out::EventPacket {
                event: TelephoneEvent {
                    event: 5,
                    end: true,
                    volume: 10,
                    duration: 800,
                },
                timestamp: 1000,
                marker: true,
                copies: 1,
            };
            let n = a.write_event(101, &ev, &mut buf).unwrap();
            assert_eq!(n, 12 + 4 + suite.rtp_tag_len());
        }
    }

    /// A re-INVITE's new keys replace the contexts; the same keys again change nothing (the
    /// replay window survives); `None` turns the session plain.
    #[test]
    fn srtp_rekeys_only_on_new_keys() {
        use crate::rtp::srtp::{MasterKey, SrtpKeys};
        let t0 = Instant::now();
        let a_addr: SocketAddr = "10.0.0.1:20000".parse().unwrap();
        let b_addr: SocketAddr = "10.0.0.2:30000".parse().unwrap();
        let keys = |local, remote| {
            Some(SrtpKeys {
                suite: SrtpSuite::AesCm128HmacSha1_32,
                local,
                remote,
            })
        };
        let (k1, k2, kb) = (
            MasterKey::random(),
            MasterKey::random(),
            MasterKey::random(),
        );
        let mut a = RtpSession::new(
            SessionConfig::new(G711::Pcmu, 0xA, 1, 1),
            b_addr,
            b_addr,
            t0,
        );
        let mut b = RtpSession::new(
            SessionConfig::new(G711::Pcmu, 0xB, 1, 1),
            a_addr,
            a_addr,
            t0,
        );
        a.set_srtp(keys(k1, kb)).unwrap();
        b.set_srtp(keys(kb, k1)).unwrap();
        let mut buf = [0u8; 512];
        let len = a.write_audio(&[0; 160], &mut buf).unwrap();
        let first = buf[..len].to_vec();
        assert_eq!(b.handle_datagram(a_addr, &first, t0), Received::Audio);
        // The same keys: still the same contexts, so the packet is a replay.
        b.set_srtp(keys(kb, k1)).unwrap();
        assert_eq!(
            b.handle_datagram(a_addr, &first, t0),
            Received::Unauthenticated
        );
        // A rekeys; B still has the old key until its own update.
        a.set_srtp(keys(k2, kb)).unwrap();
        let len = a.write_audio(&[0; 160], &mut buf).unwrap();
        assert_eq!(
            b.handle_datagram(a_addr, &buf[..len], t0),
            Received::Unauthenticated
        );
        b.set_srtp(keys(kb, k2)).unwrap();
        assert_eq!(b.handle_datagram(a_addr, &buf[..len], t0), Received::Audio);
        // Plain again.
        a.set_srtp(None).unwrap();
        assert_eq!(a.srtp_suite(), None);
        let len = a.write_audio(&[0; 160], &mut buf).unwrap();
        assert_eq!(len, 12 + 160);
    }

    /// Our key stays for the call: new keys from the peer rebuild only what we receive with,
    /// so what we send goes on with its SRTCP index (a fresh context would restart it at 1
    /// under the same key: keystream already sent, and a replay to the peer). A suite change
    /// under our unchanged key is refused.
    #[test]
    fn srtp_rekey_of_the_peer_keeps_our_outbound_context() {
        use crate::rtp::srtp::{MasterKey, SrtpKeys};
        let t0 = Instant::now();
        let a_addr: SocketAddr = "10.0.0.1:20000".parse().unwrap();
        let b_addr: SocketAddr = "10.0.0.2:30000".parse().unwrap();
        let keys = |suite, local, remote| {
            Some(SrtpKeys {
                suite,
                local,
                remote,
            })
        };
        let suite = SrtpSuite::AesCm128HmacSha1_80;
        let (ka, kb1, kb2) = (
            MasterKey::random(),
            MasterKey::random(),
            MasterKey::random(),
        );
        let mut a = RtpSession::new(
            SessionConfig::new(G711::Pcmu, 0xA, 1, 1),
            b_addr,
            b_addr,
            t0,
        );
        let mut b = RtpSession::new(
            SessionConfig::new(G711::Pcmu, 0xB, 1, 1),
            a_addr,
            a_addr,
            t0,
        );
        a.set_srtp(keys(suite, ka, kb1)).unwrap();
        b.set_srtp(keys(suite, kb1, ka)).unwrap();
        let mut out = [0u8; 512];
        let wall = Duration::from_secs(1_700_000_000);
        let at = t0 + Duration::from_secs(10);
        let len = a.poll_rtcp(at, wall, &mut out).unwrap().unwrap();
        assert_eq!(
            b.handle_rtcp_datagram(a_addr, &out[..len], at),
            Received::Rtcp
        );
        // The peer rekeys; our key stays.
        a.set_srtp(keys(suite, ka, kb2)).unwrap();
        let at = t0 + Duration::from_secs(30);
        let len = a.poll_rtcp(at, wall, &mut out).unwrap().unwrap();
        let index = u32::from_be_bytes(out[len - 14..len - 10].try_into().unwrap());
        assert_eq!(index, 0x8000_0002, "E flag and the next SRTCP index");
        assert_eq!(
            b.handle_rtcp_datagram(a_addr, &out[..len], at),
            Received::Rtcp
        );
        // The suite cannot change under the same key of ours; nothing changes then.
        assert_eq!(
            a.set_srtp(keys(SrtpSuite::AesCm128HmacSha1_32, ka, kb2)),
            Err(SrtpError::SuiteChangeWithSameKey)
        );
        assert_eq!(a.srtp_suite(), Some(suite));
    }

    fn telcoflow_ntp(wall: Duration) -> u64 {
        crate::rtp::packet::ntp_timestamp(wall)
    }

    /// Two sessions 10 ms apart each way: A's sender report comes back in B's receiver report
    /// 200 ms later, and A reads a 20 ms round trip; B, which sent no SR, reads none.
    #[test]
    fn round_trip_from_a_receiver_report_on_our_sender_report() {
        let t0 = Instant::now();
        let one_way = Duration::from_millis(10);
        let a_addr: SocketAddr = "10.0.0.1:20000".parse().unwrap();
        let b_addr: SocketAddr = "10.0.0.2:30000".parse().unwrap();
        let mut a = RtpSession::new(
            SessionConfig::new(G711::Pcmu, 0xA, 1, 1),
            b_addr,
            b_addr,
            t0,
        );
        let mut b = RtpSession::new(
            SessionConfig::new(G711::Pcmu, 0xB, 1, 1),
            a_addr,
            a_addr,
            t0,
        );
        let mut buf = [0u8; 512];
        for i in 0..10u32 {
            let len = a.write_audio(&[0; 160], &mut buf).unwrap();
            b.handle_datagram(a_addr, &buf[..len], t0 + FRAME_DURATION * i + one_way);
            let len = b.write_audio(&[0; 160], &mut buf).unwrap();
            a.handle_datagram(b_addr, &buf[..len], t0 + FRAME_DURATION * i + one_way);
        }
        assert_eq!(
            b.reception(),
            ReceptionCounts {
                expected: 10,
                received: 10
            }
        );
        // A's SR, wall clock just below a wrap of the middle 32 bits (NTP seconds
        // 2208988800 + 0x817F end in 0xFFFF).
        let wall = Duration::from_secs(0x817F) + Duration::from_millis(999);
        assert_eq!(
            (telcoflow_ntp(wall) >> 16) as u32 >> 16,
            0xFFFF,
            "the SR is just before the wrap"
        );
        let sent = t0 + Duration::from_secs(5);
        let n = a.poll_rtcp(sent, wall, &mut buf).unwrap().unwrap();
        b.handle_rtcp_datagram(a_addr, &buf[..n], sent + one_way);
        // B reports 200 ms after A's SR arrived.
        let reported = sent + one_way + Duration::from_millis(200);
        let n = b
            .poll_rtcp(reported, Duration::from_secs(1), &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(a.stats().rtt, None);
        a.handle_rtcp_datagram(b_addr, &buf[..n], reported + one_way);
        let rtt = a.stats().rtt.expect("a round trip");
        let error = rtt.abs_diff(2 * one_way);
        // Units of 1/65536 s, truncated at each step.
        assert!(error < Duration::from_micros(100), "{rtt:?}");
        // B's own SR was never reported on.
        assert_eq!(b.stats().rtt, None);
    }

    /// Two sessions back to back: audio crosses with loss and reordering, and each side's
    /// RTCP tells the other what it lost.
    #[test]
    fn pair_exchanges_audio_and_reports_loss() {
        let t0 = Instant::now();
        let a_addr: SocketAddr = "10.0.0.1:20000".parse().unwrap();
        let b_addr: SocketAddr = "10.0.0.2:30000".parse().unwrap();
        let b_rtcp: SocketAddr = "10.0.0.2:30001".parse().unwrap();
        let mut a = RtpSession::new(
            SessionConfig::new(G711::Pcma, 0xA, 1, 1),
            b_addr,
            b_rtcp,
            t0,
        );
        let mut b_config = SessionConfig::new(G711::Pcma, 0xB, 2, 2);
        b_config.jitter.min_delay = Duration::from_millis(60);
        let a_rtcp: SocketAddr = "10.0.0.1:20001".parse().unwrap();
        let mut b = RtpSession::new(b_config, a_addr, a_rtcp, t0);
        let mut buf = [0u8; 1500];
        let mut in_flight: Vec<Vec<u8>> = Vec::new();
        let mut heard: Vec<i16> = Vec::new();
        let frame = |n: u32| -> Vec<i16> {
            (0..160)
                .map(|i| ((n * 160 + i) % 200) as i16 * 50)
                .collect()
        };
        for tick in 0..200u32 {
            let now = t0 + FRAME_DURATION * tick;
            let len = a.write_audio(&frame(tick), &mut buf).unwrap();
            // Drop every 25th packet; swap every 10th pair.
            if tick % 25 != 24 {
                in_flight.push(buf[..len].to_vec());
            }
            if tick % 10 == 9 && in_flight.len() >= 2 {
                let n = in_flight.len();
                in_flight.swap(n - 1, n - 2);
            }
            if tick % 2 == 1 {
                for p in in_flight.drain(..) {
                    assert_eq!(b.handle_datagram(a_addr, &p, now), Received::Audio);
                }
            }
            let f = b.pop_frame(now);
            if f.kind == FrameKind::Audio {
                heard.extend_from_slice(f.samples);
            }
        }
        // Audio frames are the sent frames after A-law quantisation, in order.
        assert!(heard.len() >= 160 * 180, "{}", heard.len());
        let first = heard[0];
        let quantised: Vec<i16> = (0..200)
            .flat_map(frame)
            .map(|s| G711::Pcma.decode_sample(G711::Pcma.encode_sample(s)))
            .collect();
        let offset = quantised.iter().position(|&s| s == first).unwrap();
        assert_eq!(&heard[..160], &quantised[offset..offset + 160]);
        assert_eq!(b.jitter_buffer().stats().concealed, 7);
        // B reports to A: 8 dropped, but the last (tick 199) is beyond the highest sequence B
        // has seen, so it is not known lost yet.
        let now = t0 + Duration::from_secs(5);
        let n = b
            .poll_rtcp(now, Duration::from_secs(1), &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(a.handle_datagram(b_addr, &buf[..n], now), Received::Rtcp);
        assert_eq!(a.stats().remote_lost, 7);
        assert_eq!(a.remote(), b_addr);
    }

    /// A tone at 16 kHz, `n` samples from sample `from` on.
    fn tone16k(hz: f64, from: usize, n: usize) -> Vec<i16> {
        (from..from + n)
            .map(|i| (8000.0 * (std::f64::consts::TAU * hz * i as f64 / 16000.0).sin()) as i16)
            .collect()
    }

    /// Power of `x` at `hz` (Goertzel), relative to its total power.
    fn share_at(x: &[i16], hz: f64, rate: f64) -> f64 {
        let w = std::f64::consts::TAU * hz / rate;
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for &v in x {
            let s0 = f64::from(v) + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        let at = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
        let total: f64 = x.iter().map(|&v| f64::from(v).powi(2)).sum();
        2.0 * at / (x.len() as f64 * total.max(1.0))
    }

    /// G.722 between two sessions: 320-sample frames in and out, 160-byte packets whose
    /// timestamps advance 160 per 20 ms (RFC 3551 4.5.2), and a 5 kHz tone (beyond what 8 kHz
    /// carries) arrives as 5 kHz, even when packets arrive out of order.
    #[test]
    fn g722_pair_carries_wideband_audio() {
        let t0 = Instant::now();
        let a_addr: SocketAddr = "10.0.0.1:20000".parse().unwrap();
        let b_addr: SocketAddr = "10.0.0.2:30000".parse().unwrap();
        let mut a_config = SessionConfig::new(Codec::G722, 0xA, 1, 1000);
        a_config.ptime_ms = 30;
        assert_eq!(a_config.payload_type, 9);
        let mut a = RtpSession::new(a_config, b_addr, b_addr, t0);
        let mut b_config = SessionConfig::new(Codec::G722, 0xB, 1, 1);
        b_config.jitter.min_delay = Duration::from_millis(60);
        let mut b = RtpSession::new(b_config, a_addr, a_addr, t0);
        // B must have heard A for A to send past the unverified limit.
        a.handle_datagram(b_addr, &rtp(9, 1, 0, &[0x55; 160]), t0);
        let mut buf = [0u8; 1500];
        let mut packets = Vec::new();
        for tick in 0..100usize {
            a.queue_audio(&tone16k(5000.0, tick * 320, 320));
            while let Some(len) = a.poll_audio(&mut buf).unwrap() {
                packets.push(buf[..len].to_vec());
            }
        }
        // 30 ms packets: 240 bytes, timestamps 240 apart.
        assert_eq!(packets.len(), 66);
        for (i, p) in packets.iter().enumerate() {
            let p = RtpPacket::parse(p).unwrap();
            assert_eq!(p.header.payload_type, 9);
            assert_eq!(p.payload.len(), 240);
            assert_eq!(p.header.timestamp, 1000 + 240 * i as u32);
        }
        // Neighbours swapped in flight.
        for pair in packets.chunks_mut(2) {
            pair.reverse();
        }
        let mut heard = Vec::new();
        for (tick, pair) in packets.chunks(2).enumerate() {
            // Two 30 ms packets per 60 ms: three ticks.
            let now = t0 + Duration::from_millis(60) * tick as u32;
            for p in pair {
                assert_eq!(b.handle_datagram(a_addr, p, now), Received::Audio);
            }
            for k in 0..3u32 {
                let f = b.pop_frame(now + FRAME_DURATION * k);
                assert_eq!(f.samples.len(), 320);
                if f.kind == FrameKind::Audio {
                    heard.extend_from_slice(f.samples);
                }
            }
        }
        assert_eq!(b.jitter_buffer().stats().concealed, 0);
        assert!(heard.len() >= 90 * 320, "{}", heard.len());
        // Past the codec's start-up, the tone is all there is.
        let share = share_at(&heard[3200..], 5000.0, 16000.0);
        assert!(share > 0.95, "{share}");
    }

    /// A re-INVITE from G.711 to G.722 changes the rate both ways; PCMU is refused once G.722
    /// is the codec (another rate).
    #[test]
    fn switching_to_g722_changes_the_frame_rate() {
        let t0 = Instant::now();
        let peer: SocketAddr = "10.0.0.2:30000".parse().unwrap();
        let mut s = RtpSession::new(SessionConfig::new(G711::Pcmu, 1, 0, 0), peer, peer, t0);
        s.handle_datagram(peer, &rtp(0, 1, 0, &[0xFF; 160]), t0);
        assert_eq!(s.pop_frame(t0).samples.len(), 160);
        s.set_remote(peer, peer, Codec::G722, 9);
        assert_eq!(s.codec(), Codec::G722);
        assert_eq!(
            s.handle_datagram(peer, &rtp(0, 2, 160, &[0xFF; 160]), t0),
            Received::Audio
        );
        assert_eq!(s.jitter_buffer().stats().received, 1, "PCMU refused now");
        // G.722 packets play, every frame 320 samples long.
        let mut played = 0;
        for k in 0..5u16 {
            let at = t0 + FRAME_DURATION * (u32::from(k) + 2);
            let ts = 320 + 160 * u32::from(k);
            s.handle_datagram(peer, &rtp(9, 3 + k, ts, &[0xFF; 160]), at);
            let f = s.pop_frame(at);
            assert_eq!(f.samples.len(), 320);
            played += usize::from(f.kind == FrameKind::Audio);
        }
        assert!(played >= 3, "{played}");
        let mut buf = [0u8; 512];
        let len = s.write_audio(&[0; 320], &mut buf).unwrap();
        let p = RtpPacket::parse(&buf[..len]).unwrap();
        assert_eq!((p.header.payload_type, p.payload.len()), (9, 160));
        let first = p.header.timestamp;
        // A short frame is padded with encoded silence.
        let len = s.write_audio(&[0; 100], &mut buf).unwrap();
        let q = RtpPacket::parse(&buf[..len]).unwrap();
        assert_eq!(q.payload.len(), 160);
        assert_eq!(q.header.timestamp, first + 160);
    }
}
