//! A bench caller over SIP/RTP (`telcoflow bench --sip`): a phone made of the server's own
//! sans-IO parts ([`OutgoingCall`] for SIP, [`RtpHeader`] / [`RtpPacket`] and [`G711`] for
//! media) on UDP sockets of its own.
//!
//! It sends an INVITE offering PCMU at 20 ms to the number the agents answer, takes the
//! provisional responses, ACKs the 200 (the UAC does), then streams the same marked speech as a
//! simulated caller, one 160-sample PCMU packet every 20 ms, and reads the echo from the RTP the
//! server sends. At the end it hangs up with BYE and expects a 200. Setup time is INVITE sent to
//! 200 OK received.
//!
//! The figures come from the frame markers, which survive mu-law exactly (see
//! [`super::marker`]): loss, duplication and reordering are counted on the marker's sequence
//! number, not the RTP one, which the server renumbers. Received packets are read as they
//! arrive, without a jitter buffer, so lateness is seen as it happens.

use super::caller::{ANSWER_TIMEOUT, CALLED, CallPlan, CallReport, Pacer, Progress, Stream};
use super::stats::us;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;
use telcoflow_sip::rtp::codec::Codec;
use telcoflow_sip::rtp::g711::G711;
use telcoflow_sip::rtp::jitter::FRAME_SAMPLES;
use telcoflow_sip::rtp::packet::{RtpHeader, RtpPacket, is_rtcp};
use telcoflow_sip::sip::message::{Message, Method, SipHeaders};
use telcoflow_sip::sip::sdp::{LocalMedia, Negotiated};
use telcoflow_sip::sip::transaction::Timers;
use telcoflow_sip::sip::uac::{OutgoingCall, UacConfig, UacEvent};
use telcoflow_sip::sip::{Transmit, Transport};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// How long the BYE may take to be answered.
const BYE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest datagram read: SIP responses with SDP are well under this.
const DATAGRAM: usize = 8192;
/// Tries at an RTP port whose neighbour (RTCP) is free too.
const RTP_BIND_ATTEMPTS: usize = 16;

/// The call's sockets and signalling state.
struct Phone {
    sip: UdpSocket,
    rtp: UdpSocket,
    /// Held so the server's RTCP reports (sent to the RTP port + 1) reach a socket of this
    /// call rather than some other process's port; never read.
    _rtcp: UdpSocket,
    uac: OutgoingCall,
    buf: Vec<u8>,
    /// Status of the response to our BYE, once it has come.
    bye_status: Option<u16>,
}

/// Dials `server` over SIP and runs the call to its end.
pub(super) async fn drive(
    plan: &CallPlan,
    server: SocketAddr,
    progress: &Progress,
    report: &mut CallReport,
) -> Result<(), String> {
    let mut phone = Phone::dial(plan, server).await?;
    let started = Instant::now();
    phone.flush().await?;

    // Until answered.
    let answer_deadline = started + ANSWER_TIMEOUT;
    let negotiated = loop {
        let event = tokio::select! {
            // Cancel-safe: recv on a UDP socket loses nothing when not polled to completion.
            r = phone.sip.recv(&mut phone.buf) => {
                let n = r.map_err(|e| format!("SIP socket: {e}"))?;
                phone.input(n);
                phone.next_event()
            }
            // Cancel-safe: sleeps; the UAC\'s next timer is read afresh each turn.
            () = sleep_until_opt(phone.uac.poll_timeout()) => {
                phone.uac.handle_timeout(std_now());
                phone.next_event()
            }
            () = tokio::time::sleep_until(answer_deadline) => {
                phone.uac.cancel(std_now());
                let _ = phone.flush().await;
                return Err("not answered in time".into());
            }
        };
        phone.flush().await?;
        match event {
            Some(UacEvent::Answered { negotiated }) => break negotiated,
            Some(UacEvent::Failed { status, reason }) => {
                return Err(format!("refused: {status} {reason}"));
            }
            Some(UacEvent::RemoteHangup | UacEvent::HungUp) => {
                return Err("call ended before the answer".into());
            }
            _ => {}
        }
    };
    let answered_at = Instant::now();
    report.answered = true;
    report.setup_us = Some(us(answered_at - started));
    progress.answered.fetch_add(1, Ordering::Relaxed);

    let mut stream = Stream::new(plan, answered_at);
    let result = phone.stream(&mut stream, negotiated, progress).await;
    stream.finish(report);
    let hangup = phone.hang_up().await;
    report.hangup_failed = hangup.is_err();
    // A failure while streaming says more than one at hang-up.
    result.and(hangup)
}

fn std_now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_opt(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Binds an RTP socket on `ip` and an RTCP socket on the next port.
async fn bind_rtp(ip: IpAddr) -> Result<(UdpSocket, UdpSocket), String> {
    for _ in 0..RTP_BIND_ATTEMPTS {
        let rtp = UdpSocket::bind((ip, 0))
            .await
            .map_err(|e| format!("cannot bind an RTP socket: {e}"))?;
        let port = rtp.local_addr().map_err(|e| e.to_string())?.port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if let Ok(rtcp) = UdpSocket::bind((ip, next)).await {
            return Ok((rtp, rtcp));
        }
    }
    Err("no free RTP/RTCP port pair".into())
}

impl Phone {
    /// Binds the sockets and queues the INVITE.
    async fn dial(plan: &CallPlan, server: SocketAddr) -> Result<Self, String> {
        let sip = UdpSocket::bind(SocketAddr::new(unspecified(server.ip()), 0))
            .await
            .map_err(|e| format!("cannot bind a SIP socket: {e}"))?;
        // Connecting picks the local address that reaches the server (what SDP must announce)
        // and filters out datagrams from anyone else.
        sip.connect(server)
            .await
            .map_err(|e| format!("cannot reach {server}: {e}"))?;
        let local = sip.local_addr().map_err(|e| e.to_string())?;
        let (rtp, rtcp) = bind_rtp(local.ip()).await?;
        let rtp_port = rtp.local_addr().map_err(|e| e.to_string())?.port();
        let config = UacConfig {
            target: format!("sip:{CALLED}@{server}"),
            destination: server,
            transport: Transport::Udp,
            from: format!("sip:+1555{:07}@{}", plan.index, local.ip()),
            contact: format!("sip:bench@{local}"),
            sent_by: local.to_string(),
            credentials: None,
            timers: Timers::default(),
            user_agent: "telcoflow-bench".into(),
            delayed_offer: false,
            session_expires: None,
        };
        let seed = (plan.index as u64) ^ (u64::from(std::process::id()) << 32);
        let media = LocalMedia {
            codecs: vec![Codec::Pcmu],
            ..LocalMedia::new(local.ip(), rtp_port, seed)
        };
        Ok(Self {
            sip,
            rtp,
            _rtcp: rtcp,
            uac: OutgoingCall::new(config, media, seed, std_now()),
            buf: vec![0; DATAGRAM],
            bye_status: None,
        })
    }

    /// Sends what the UAC has queued.
    async fn flush(&mut self) -> Result<(), String> {
        while let Some(Transmit { payload, .. }) = self.uac.poll_transmit() {
            // The socket is connected to the one destination the UAC uses.
            self.sip
                .send(&payload)
                .await
                .map_err(|e| format!("SIP send failed: {e}"))?;
        }
        Ok(())
    }

    /// Feeds the first `n` bytes of the buffer to the UAC, noting the answer to our BYE.
    fn input(&mut self, n: usize) {
        let bytes = &self.buf[..n];
        if let Ok(Message::Response(r)) = Message::parse(bytes) {
            if r.status >= 200 && r.cseq().is_ok_and(|c| c.method == Method::Bye) {
                self.bye_status = Some(r.status);
            }
        }
        self.uac.handle_input(bytes, std_now());
    }

    /// The event that matters among those queued: one datagram or timer yields at most one
    /// that is not `Progress`, and that one wins over any `Progress`.
    fn next_event(&mut self) -> Option<UacEvent> {
        let mut pick = None;
        while let Some(e) = self.uac.poll_event() {
            if !matches!(e, UacEvent::Progress { .. }) || pick.is_none() {
                pick = Some(e);
            }
        }
        pick
    }

    /// Streams marked speech until the plan's end, reading the echo, plus the drain time.
    async fn stream(
        &mut self,
        stream: &mut Stream<'_>,
        negotiated: Negotiated,
        progress: &Progress,
    ) -> Result<(), String> {
        let mut remote = negotiated.remote;
        let pt = negotiated.payload_type;
        // The answer can only take what was offered: PCMU.
        let codec = negotiated.codec.g711().unwrap_or(G711::Pcmu);
        let mut pacer = Pacer::new(stream.plan.end_at);
        let ssrc = rand_u32(stream.plan.index);
        let mut sequence = ssrc as u16;
        let mut timestamp = ssrc.rotate_left(16);
        let mut payload = [0u8; FRAME_SAMPLES];
        let mut packet = [0u8; 12 + FRAME_SAMPLES];
        let mut rtp_in = vec![0u8; 2048];
        let mut rx = vec![0i16; FRAME_SAMPLES];
        loop {
            tokio::select! {
                // Cancel-safe: UDP recv loses nothing when not polled to completion.
                r = self.rtp.recv_from(&mut rtp_in) => {
                    let (n, _) = r.map_err(|e| format!("RTP socket: {e}"))?;
                    let data = &rtp_in[..n];
                    if is_rtcp(data) {
                        continue;
                    }
                    let Ok(p) = RtpPacket::parse(data) else { continue };
                    if p.header.payload_type != pt {
                        continue;
                    }
                    rx.resize(p.payload.len(), 0);
                    codec.decode(p.payload, &mut rx);
                    progress.frames_heard.fetch_add(1, Ordering::Relaxed);
                    stream.on_samples(&rx, Instant::now());
                }
                // Cancel-safe, as above.
                r = self.sip.recv(&mut self.buf) => {
                    let n = r.map_err(|e| format!("SIP socket: {e}"))?;
                    self.input(n);
                    self.flush().await?;
                    match self.next_event() {
                        Some(UacEvent::RemoteHangup) => return Err("hung up by the server".into()),
                        Some(UacEvent::MediaUpdated { negotiated }) => remote = negotiated.remote,
                        _ => {}
                    }
                }
                // Cancel-safe: sleeps; the UAC\'s next timer is read afresh each turn.
                () = sleep_until_opt(self.uac.poll_timeout()) => {
                    self.uac.handle_timeout(std_now());
                    self.flush().await?;
                    if let Some(UacEvent::RemoteHangup) = self.next_event() {
                        return Err("hung up by the server".into());
                    }
                }
                // Cancel-safe: see Pacer::next_frame_at.
                at = pacer.next_frame_at() => {
                    let Some(now) = at else { return Ok(()) };
                    let n = codec.encode(stream.next_frame(now), &mut payload);
                    let header = RtpHeader::new(pt, sequence, timestamp, ssrc);
                    let len = header
                        .write_packet(&payload[..n], &mut packet)
                        .map_err(|e| format!("RTP packet: {e}"))?;
                    sequence = sequence.wrapping_add(1);
                    timestamp = timestamp.wrapping_add(FRAME_SAMPLES as u32);
                    self.rtp
                        .send_to(&packet[..len], remote)
                        .await
                        .map_err(|e| format!("RTP send failed: {e}"))?;
                    progress.frames_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends BYE and waits for its answer; anything but a 200 is a failure.
    async fn hang_up(&mut self) -> Result<(), String> {
        if self.uac.is_finished() {
            return Ok(());
        }
        self.uac.hangup(std_now());
        self.flush().await?;
        let deadline = Instant::now() + BYE_TIMEOUT;
        loop {
            let event = tokio::select! {
                // Cancel-safe: UDP recv.
                r = self.sip.recv(&mut self.buf) => {
                    let n = r.map_err(|e| format!("SIP socket: {e}"))?;
                    self.input(n);
                    self.next_event()
                }
                // Cancel-safe: sleeps; the UAC\'s next timer is read afresh each turn.
                () = sleep_until_opt(self.uac.poll_timeout()) => {
                    self.uac.handle_timeout(std_now());
                    self.next_event()
                }
                () = tokio::time::sleep_until(deadline) => return Err("BYE not answered".into()),
            };
            self.flush().await?;
            match (event, self.bye_status) {
                (_, Some(200)) => return Ok(()),
                (_, Some(status)) => return Err(format!("BYE answered {status}")),
                (Some(UacEvent::HungUp | UacEvent::RemoteHangup), None) => {
                    return Err("BYE timed out".into());
                }
                _ => {}
            }
        }
    }
}

/// The unspecified address of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::from([0, 0, 0, 0]),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    }
}

/// A per-call pseudo-random 32-bit value (SSRC, first sequence number and timestamp): the
/// caller index mixed with the clock, so that reruns and calls differ (RFC 3550 wants them
/// unpredictable; uniqueness per call is what matters here).
fn rand_u32(index: usize) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // splitmix-style mixing of the two.
    let mut x = ((index as u64) << 32) ^ u64::from(nanos);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)) as u32
}

#[cfg(test)]
mod tests {
    use super::super::caller::{self, speech_for};
    use super::*;
    use std::sync::Arc;
    use telcoflow_proto::SampleRate;
    use telcoflow_server::config::SipConfig;
    use telcoflow_server::{Config, Server};

    #[tokio::test]
    async fn a_refused_invite_is_a_failed_call() {
        let mut config = Config::development();
        config.listen = "127.0.0.1:0".parse().unwrap();
        // No connector takes the number the callers dial: the server answers 404.
        config.connectors[0].numbers = vec!["+15550000001".into()];
        config.sip = Some(SipConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            rtp_ports: "30900-30999".into(),
            ..SipConfig::default()
        });
        let server = Server::start(config).await.expect("server starts");
        let now = Instant::now();
        let plan = CallPlan {
            base_url: server.base_url().to_owned(),
            index: 7,
            rate: SampleRate::Hz8000,
            epoch: now,
            dial_at: now,
            end_at: now + Duration::from_secs(2),
            speech: speech_for(SampleRate::Hz8000),
            sip: server.sip_addr(),
            probes: true,
        };
        let progress = Arc::new(Progress::default());
        let report = caller::run(plan, progress.clone()).await;
        assert!(!report.answered);
        let failure = report.failure.expect("a failure");
        assert!(failure.starts_with("refused: 404"), "{failure}");
        assert_eq!(report.setup_us, None);
        assert_eq!(progress.failed.load(Ordering::Relaxed), 1);
        assert_eq!(progress.answered.load(Ordering::Relaxed), 0);
        server.shutdown().await;
    }
}
