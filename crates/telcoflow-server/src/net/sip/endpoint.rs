//! The SIP endpoint task: it owns the UDP socket and the TCP listener (same port), the sans-IO
//! [`Uas`] for incoming calls and one [`OutgoingCall`] per call dialled out. It feeds them what
//! the network sends, sends what they ask, runs their timers, and talks to each call's RTP leg
//! task over small bounded channels ([`super::link`]).
//!
//! Incoming calls: admission ([`super::admission`]: allow list, rate limit, digest) before
//! the UAS keeps anything -> `IncomingCall` -> route the number (404 when no connector takes
//! it) -> `call::spawn_incoming` with an 8 kHz leg -> bind an RTP port, so that only calls
//! offered to an app hold one. Messages whose Call-ID belongs to an outgoing call go to that
//! call; everything else goes to the UAS.
//!
//! SIP/TCP connections are bounded: a connection from a source outside `[sip] allow` is
//! closed as soon as it is accepted, as is one over `tcp_max_connections` at once or over
//! `tcp_max_connections_per_ip` accepted from one source address (IPv6: one /64); a partial message
//! must complete within `tcp_message_timeout_secs`, and a connection with no traffic for
//! `tcp_idle_timeout_secs` is closed unless an incoming call signalled over it is still up
//! (our BYE must be able to reach the phone). SIP over TLS (`[sip] tls_listen`, and the
//! connections we open for `sips:` / `;transport=tls` destinations) runs the same connection
//! code over a TLS stream, under the same limits (they count TCP and TLS connections
//! together); its handshake must complete within `tcp_message_timeout_secs`. A connection we
//! open that fails (refused, or a certificate not trusted) fails at once the outgoing calls
//! and registrations waiting on it, with the reason. Accept errors (no file descriptors left) pause
//! accepting with a growing delay and are logged at most once per 10 s ([`AcceptBackoff`], as the HTTP listener does).

use super::admission::Admission;
use super::link::{Command, LEG_EVENT_QUEUE, LegEvents, LegKey, SipEvent};
use super::ports::MediaEnv;
use super::registrations::{Prepared, Registrations};
use super::rtp_leg::{self, Direction, LegParams};
use crate::call::{self, LegId};
use crate::listener::{AcceptBackoff, source_address};
use crate::metrics::QueueKind;
use crate::state::Shared;
use crate::tls::sip::{SipTls, server_name};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use telcoflow_proto::ErrorCode;
use telcoflow_sip::sip::message::{Message, SipHeaders as _};
use telcoflow_sip::sip::sdp;
use telcoflow_sip::sip::stream::{StreamDecoder, StreamItem};
use telcoflow_sip::sip::uac::{OutgoingCall, UacEvent};
use telcoflow_sip::sip::uas::{self, IncomingCall, Refusal, Uas, UasAction, UasEvent};
use telcoflow_sip::sip::{Transmit, Transport};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

/// Messages queued from all TCP readers to the endpoint.
const TCP_INBOX: usize = 256;
/// Messages queued towards one TCP connection.
const TCP_OUTBOX: usize = 64;
/// A stream connection: its transport (TCP or TLS), its peer and, for a TLS connection we
/// opened, the name its certificate was verified against (`None` for an accepted one, whose
/// peer is not verified: it carries responses and the requests of calls that came in on
/// it, never requests we originate).
type ConnKey = (Transport, SocketAddr, Option<Arc<str>>);
/// How long opening a TCP connection for an outgoing call may take.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// On shutdown, how long BYEs (and CANCELs) are retransmitted while their answers are
/// awaited: well within the 10 s `telcoflow serve` gives a shutdown.
pub(super) const SHUTDOWN_HANGUP_GRACE: Duration = Duration::from_secs(4);
/// The status a REFER that could not be sent is reported with (491 Request Pending: the
/// dialog is not confirmed yet).
const REFER_NOT_SENT: u16 = 491;
/// While an outgoing leg is behind on its SIP events, how often to see whether it has room.
const LEG_EVENTS_RETRY: Duration = Duration::from_millis(20);
/// Limits of SIP/TCP connections (`[sip] tcp_*`).
#[derive(Debug, Clone, Copy)]
pub(super) struct TcpLimits {
    pub(super) max_connections: usize,
    /// Accepted connections from one source address (IPv6: one /64) at once.
    pub(super) max_connections_per_ip: usize,
    pub(super) message_timeout: Duration,
    pub(super) idle_timeout: Duration,
}

/// What the endpoint task runs on, bound before the server's shared state exists.
pub(super) struct Bound {
    pub(super) udp: UdpSocket,
    pub(super) tcp: TcpListener,
    /// The SIP over TLS listener, if `tls_listen` is set.
    pub(super) tls_listener: Option<TcpListener>,
    pub(super) tls: SipTls,
    /// Where the TLS listener is bound.
    pub(super) tls_local: Option<SocketAddr>,
    pub(super) local: SocketAddr,
    pub(super) uas: Uas,
    pub(super) admission: Admission,
    pub(super) tcp_limits: TcpLimits,
    pub(super) media: Arc<MediaEnv>,
    /// A sender of the endpoint's own command queue, for the legs it starts.
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) command_rx: mpsc::Receiver<Command>,
    /// Outbound registrations to run.
    pub(super) registrations: Vec<Prepared>,
}

/// Starts the endpoint task.
pub(super) fn spawn(shared: &Arc<Shared>, bound: Bound) {
    let (tcp_tx, tcp_rx) = mpsc::channel(TCP_INBOX);
    let local = bound.local;
    let endpoint = Endpoint {
        shared: shared.clone(),
        media: bound.media,
        uas: bound.uas,
        admission: bound.admission,
        tcp_limits: bound.tcp_limits,
        tcp_stop: CancellationToken::new(),
        udp: bound.udp,
        legs: HashMap::new(),
        outgoing: HashMap::new(),
        by_call_id: HashMap::new(),
        tcp_conns: HashMap::new(),
        tls: bound.tls,
        tcp_per_source: HashMap::new(),
        tcp_calls: HashMap::new(),
        next_conn: 0,
        tcp_tx,
        commands: bound.commands,
        registrations: Registrations::start(
            bound.registrations,
            shared.sip_registrations.clone(),
            shared.metrics.clone(),
            Instant::now().into_std(),
        ),
    };
    shared.tasks.spawn(
        endpoint
            .run(bound.tcp, bound.tls_listener, tcp_rx, bound.command_rx)
            .instrument(info_span!("sip", %local)),
    );
}

/// Something a TCP or TLS connection's task passes to the endpoint.
enum TcpInput {
    Message(ConnKey, bytes::Bytes),
    /// The connection is closed; with a reason when one we opened could not be (connect
    /// or TLS handshake failed).
    Closed(ConnKey, u64, Option<String>),
}

struct Outgoing {
    call: OutgoingCall,
    events: LegEvents,
    /// Where its requests go.
    conn: ConnKey,
}

struct Endpoint {
    shared: Arc<Shared>,
    media: Arc<MediaEnv>,
    uas: Uas,
    admission: Admission,
    tcp_limits: TcpLimits,
    /// Stops the TCP connection tasks: after the shutdown's BYEs, which may need them.
    tcp_stop: CancellationToken,
    udp: UdpSocket,
    /// Incoming calls' legs.
    legs: HashMap<uas::CallHandle, LegEvents>,
    /// Outgoing calls by key.
    outgoing: HashMap<u64, Outgoing>,
    /// SIP Call-ID -> outgoing key.
    by_call_id: HashMap<String, u64>,
    /// Open TCP and TLS connections by transport and peer.
    tcp_conns: HashMap<ConnKey, TcpConn>,
    tls: SipTls,
    /// Accepted TCP connections in `tcp_conns` per [`source_address`].
    tcp_per_source: HashMap<IpAddr, usize>,
    /// Incoming calls signalled over a TCP connection: its count of live calls, which keeps
    /// it from being closed as idle while a call may still need it (our BYE goes there).
    tcp_calls: HashMap<uas::CallHandle, Arc<AtomicUsize>>,
    next_conn: u64,
    tcp_tx: mpsc::Sender<TcpInput>,
    commands: mpsc::Sender<Command>,
    registrations: Registrations,
}

impl Endpoint {
    async fn run(
        mut self,
        tcp: TcpListener,
        tls_listener: Option<TcpListener>,
        mut tcp_rx: mpsc::Receiver<TcpInput>,
        mut cmd_rx: mpsc::Receiver<Command>,
    ) {
        // One datagram: SIP over UDP stays well under 64 KiB.
        let mut buf = vec![0u8; telcoflow_sip::sip::message::MAX_MESSAGE_LEN];
        let shutdown = self.shared.shutdown.clone();
        let mut accept_backoff = AcceptBackoff::default();
        // Set while accepting is paused after an error.
        let mut accept_resume: Option<Instant> = None;
        // The registrations' first REGISTERs are queued: send them now, not when something
        // first wakes the loop (over TCP and TLS no retransmit timer would, for 64·T1).
        self.drain().await;
        loop {
            let deadline = self.next_timeout();
            let resume = accept_resume.unwrap_or(deadline);
            tokio::select! {
                // Cancel-safe: only observes the token.
                () = shutdown.cancelled() => break,
                // Cancel-safe: a datagram is either returned whole or left in the socket.
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok((n, source)) => self.on_message(Transport::Udp, source, &buf[..n]),
                    // ICMP port unreachable and the like surface here on some systems.
                    Err(e) => debug!(error = %e, "SIP UDP receive failed"),
                },
                // Cancel-safe: accept loses nothing. Off while paused after an error.
                r = tcp.accept(), if accept_resume.is_none() => match r {
                    Ok((stream, peer)) => {
                        accept_backoff.on_success();
                        self.add_tcp(stream, (Transport::Tcp, peer, None));
                    }
                    Err(e) => {
                        let (pause, log) = accept_backoff.on_error(Instant::now());
                        if let Some(suppressed) = log {
                            warn!(error = %e, pause_ms = pause.as_millis() as u64, suppressed, "SIP TCP accept failed; pausing accepts");
                        }
                        accept_resume = Some(Instant::now() + pause);
                    }
                },
                // Cancel-safe: accept loses nothing. Off while paused after an error.
                r = accept_tls(tls_listener.as_ref()), if accept_resume.is_none() => match r {
                    Ok((stream, peer)) => {
                        accept_backoff.on_success();
                        self.add_tcp(stream, (Transport::Tls, peer, None));
                    }
                    Err(e) => {
                        let (pause, log) = accept_backoff.on_error(Instant::now());
                        if let Some(suppressed) = log {
                            warn!(error = %e, pause_ms = pause.as_millis() as u64, suppressed, "SIP TLS accept failed; pausing accepts");
                        }
                        accept_resume = Some(Instant::now() + pause);
                    }
                },
                // Cancel-safe: a sleep; accepting resumes when it ends.
                () = tokio::time::sleep_until(resume), if accept_resume.is_some() => {
                    accept_resume = None;
                }
                // Cancel-safe: mpsc recv.
                Some(input) = tcp_rx.recv() => self.on_tcp_input(input),
                // Cancel-safe: mpsc recv.
                Some(cmd) = cmd_rx.recv() => self.on_command(cmd),
                // Cancel-safe: recomputed every loop.
                () = tokio::time::sleep_until(deadline) => self.on_timeout(),
            }
            self.drain().await;
        }
        drop(tcp);
        drop(tls_listener);
        self.hang_up_all(&mut buf, &mut tcp_rx).await;
        self.tcp_stop.cancel();
        debug!("SIP endpoint stopped");
    }

    fn on_tcp_input(&mut self, input: TcpInput) {
        match input {
            TcpInput::Message((transport, peer, _), bytes) => {
                self.on_message(transport, peer, &bytes);
            }
            TcpInput::Closed(key, id, failure) => {
                // A newer connection to the same peer may have replaced this one.
                if self.tcp_conns.get(&key).is_some_and(|c| c.id == id) {
                    let conn = self.tcp_conns.remove(&key);
                    self.forget_tcp(conn);
                    if let Some(reason) = failure {
                        self.connection_failed(&key, &reason);
                    }
                }
            }
        }
    }

    /// A connection we opened to `key` failed: the outgoing calls that were to use it fail
    /// with `reason` (rather than after 64·T1 without an answer), as do the REGISTERs on
    /// their way there.
    fn connection_failed(&mut self, key: &ConnKey, reason: &str) {
        let failed: Vec<u64> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.conn == *key)
            .map(|(k, _)| *k)
            .collect();
        for k in failed {
            if let Some(o) = self.remove_outgoing(k) {
                let mut events = o.events;
                events.send(SipEvent::Unreachable(reason.to_owned()));
                events.finish();
            }
        }
        self.registrations
            .transport_failed(key, reason, Self::now());
    }

    /// Forgets an outgoing call.
    fn remove_outgoing(&mut self, key: u64) -> Option<Outgoing> {
        let o = self.outgoing.remove(&key)?;
        self.by_call_id.remove(o.call.call_id());
        Some(o)
    }

    /// On shutdown: BYE (or a final response, or CANCEL) for every call, retransmitted by
    /// the transactions' timers (RFC 3261 17.1.2) until answered or for
    /// [`SHUTDOWN_HANGUP_GRACE`]; peers that miss them all end the call by their RTP timeout.
    async fn hang_up_all(&mut self, buf: &mut [u8], tcp_rx: &mut mpsc::Receiver<TcpInput>) {
        let now = Self::now();
        let calls: Vec<uas::CallHandle> = self.legs.keys().copied().collect();
        for call in calls {
            let _ = self.uas.handle_action(call, UasAction::Hangup, now);
        }
        for o in self.outgoing.values_mut() {
            o.call.hangup(now);
        }
        self.registrations.unregister_all(now);
        let give_up = Instant::now() + SHUTDOWN_HANGUP_GRACE;
        loop {
            self.drain().await;
            if self.uas.call_count() == 0
                && self.outgoing.is_empty()
                && self.registrations.all_finished()
            {
                break;
            }
            let deadline = self.next_timeout().min(give_up);
            tokio::select! {
                // Cancel-safe: a datagram is either returned whole or left in the socket.
                r = self.udp.recv_from(buf) => {
                    if let Ok((n, source)) = r {
                        self.on_message(Transport::Udp, source, &buf[..n]);
                    }
                }
                // Cancel-safe: mpsc recv.
                Some(input) = tcp_rx.recv() => self.on_tcp_input(input),
                // Cancel-safe: recomputed every loop.
                () = tokio::time::sleep_until(deadline) => {
                    if Instant::now() >= give_up {
                        debug!(calls = self.uas.call_count(), "shutdown: hang-ups not all answered");
                        break;
                    }
                    self.on_timeout();
                }
            }
        }
    }

    fn now() -> std::time::Instant {
        Instant::now().into_std()
    }

    fn next_timeout(&self) -> Instant {
        let far = Self::now() + Duration::from_secs(3600);
        let mut t = self.uas.poll_timeout().unwrap_or(far);
        for o in self.outgoing.values() {
            if let Some(d) = o.call.poll_timeout() {
                t = t.min(d);
            }
        }
        if let Some(d) = self.registrations.poll_timeout() {
            t = t.min(d);
        }
        // A leg behind on its SIP events: look again soon whether it has room.
        if self.outgoing.values().any(|o| o.events.is_behind())
            || self.legs.values().any(LegEvents::is_behind)
        {
            t = t.min(Self::now() + LEG_EVENTS_RETRY);
        }
        Instant::from_std(t)
    }

    fn on_timeout(&mut self) {
        let now = Self::now();
        if self.uas.poll_timeout().is_some_and(|t| t <= now) {
            self.uas.handle_timeout(now);
        }
        for o in self.outgoing.values_mut() {
            if o.call.poll_timeout().is_some_and(|t| t <= now) {
                o.call.handle_timeout(now);
            }
        }
        self.registrations.handle_timeout(now);
    }

    fn on_message(&mut self, transport: Transport, source: SocketAddr, bytes: &[u8]) {
        let now = Self::now();
        self.shared.metrics.sip_message(true, bytes);
        // Route by Call-ID: our outgoing calls' messages go to their UAC, the answers to
        // our REGISTERs to their registration.
        // Only responses can be a registration's: requests are not parsed twice for it.
        let maybe_registration = !self.registrations.is_empty() && bytes.starts_with(b"SIP/");
        if !self.by_call_id.is_empty() || maybe_registration {
            if let Ok(msg) = Message::parse(bytes) {
                let call_id = match &msg {
                    Message::Request(r) => r.call_id().ok(),
                    Message::Response(r) => r.call_id().ok(),
                };
                if let Some(key) = call_id.and_then(|c| self.by_call_id.get(c)) {
                    if let Some(o) = self.outgoing.get_mut(key) {
                        o.call.handle_input(bytes, now);
                        return;
                    }
                }
                if let (Some(call_id), Message::Response(_)) = (call_id, &msg) {
                    if self.registrations.handle_input(call_id, bytes, now) {
                        return;
                    }
                }
            }
        }
        let admission = &mut self.admission;
        let shared = &self.shared;
        self.uas
            .handle_input_with(transport, source, bytes, now, |request| {
                if shared.is_draining() {
                    // A draining node takes no new call: 503 sends the caller (or the SIP
                    // load balancer in front) to another node, and keeps it away for about
                    // as long as this node may take to stop.
                    let secs = shared.config.drain_grace_secs.max(1);
                    return uas::Admission::Refuse(
                        Refusal::new(503)
                            .with_header("Retry-After", secs.to_string())
                            .stateless(),
                    );
                }
                admission.decide(request, source, now)
            });
    }

    fn on_command(&mut self, cmd: Command) {
        let now = Self::now();
        match cmd {
            Command::Ringing(call) => {
                if let Err(e) = self.uas.handle_action(call, UasAction::Ringing, now) {
                    debug!(error = %e, "ringing not sent");
                }
            }
            Command::Answer { call, media } => {
                match self
                    .uas
                    .handle_action(call, UasAction::Answer { media }, now)
                {
                    Ok(Some(negotiated)) => self.notify_leg(call, SipEvent::Answered(negotiated)),
                    // Offerless INVITE: the media arrive with the ACK (MediaUpdated).
                    Ok(None) => {}
                    Err(e) => {
                        warn!(error = %e, "answer failed");
                        self.notify_leg(call, SipEvent::Ended);
                    }
                }
            }
            Command::Reject { call, status } => {
                if let Err(e) = self
                    .uas
                    .handle_action(call, UasAction::Reject { status }, now)
                {
                    debug!(error = %e, "reject not sent");
                }
            }
            Command::Hangup(LegKey::In(call)) => {
                if let Err(e) = self.uas.handle_action(call, UasAction::Hangup, now) {
                    debug!(error = %e, "hangup not sent");
                }
            }
            Command::DtmfInfo {
                leg: LegKey::In(call),
                body,
            } => {
                let info = UasAction::Info {
                    content_type: "application/dtmf-relay".into(),
                    body,
                };
                if let Err(e) = self.uas.handle_action(call, info, now) {
                    debug!(error = %e, "DTMF INFO not sent");
                }
            }
            Command::DtmfInfo {
                leg: LegKey::Out(key),
                body,
            } => {
                if let Some(o) = self.outgoing.get_mut(&key) {
                    o.call.info("application/dtmf-relay", body, now);
                }
            }
            Command::Refer { call, refer_to } => {
                // Referred-By names this server (RFC 3892): the transfer is ours.
                let refer = UasAction::Refer {
                    refer_to,
                    referred_by: Some(self.uas.contact().to_owned()),
                };
                if let Err(e) = self.uas.handle_action(call, refer, now) {
                    // Not in a confirmed dialog (the ACK has not come, or the call ended).
                    debug!(error = %e, "REFER not sent");
                    self.notify_leg(call, SipEvent::ReferAnswered(REFER_NOT_SENT));
                }
            }
            Command::Hangup(LegKey::Out(key)) => {
                if let Some(o) = self.outgoing.get_mut(&key) {
                    o.call.hangup(now);
                }
            }
            Command::Dial {
                key,
                config,
                media,
                events,
                tls_name,
            } => {
                let conn = (
                    config.transport,
                    config.destination,
                    tls_name.map(Arc::from),
                );
                let call = OutgoingCall::new(*config, media, rand::random(), now);
                self.by_call_id.insert(call.call_id().to_owned(), key);
                let events = LegEvents::new(events);
                self.outgoing.insert(key, Outgoing { call, events, conn });
            }
            Command::Gone(LegKey::In(call)) => self.forget_leg(call),
            Command::Gone(LegKey::Out(_)) => {
                // The UAC finishes its BYE/CANCEL on its own and is dropped when finished.
            }
        }
    }

    fn notify_leg(&mut self, call: uas::CallHandle, event: SipEvent) {
        let ends = matches!(event, SipEvent::Ended);
        if let Some(events) = self.legs.get_mut(&call) {
            if !events.send(event) {
                self.shared.metrics.overflow(QueueKind::Sip).inc();
                debug!("leg not reading SIP events");
            }
        }
        if ends {
            self.forget_leg(call);
        }
    }

    fn forget_leg(&mut self, call: uas::CallHandle) {
        if let Some(events) = self.legs.remove(&call) {
            events.finish();
        }
        if let Some(calls) = self.tcp_calls.remove(&call) {
            calls.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Sends what the UAS and UACs queued and handles their events.
    async fn drain(&mut self) {
        while let Some(t) = self.uas.poll_transmit() {
            self.transmit(t).await;
        }
        while let Some(event) = self.uas.poll_event() {
            self.on_uas_event(event);
            // Acting on an event can queue more (e.g. a 404).
            while let Some(t) = self.uas.poll_transmit() {
                self.transmit(t).await;
            }
        }
        let mut transmits = Vec::new();
        let mut finished = Vec::new();
        for events in self.legs.values_mut() {
            events.flush();
        }
        for (key, o) in &mut self.outgoing {
            o.events.flush();
            while let Some(t) = o.call.poll_transmit() {
                transmits.push((t, o.conn.2.clone()));
            }
            while let Some(event) = o.call.poll_event() {
                let ev = match event {
                    UacEvent::Progress { .. } => None,
                    UacEvent::EarlyMedia { negotiated } => Some(SipEvent::EarlyMedia(negotiated)),
                    UacEvent::Answered { negotiated } => Some(SipEvent::Answered(negotiated)),
                    UacEvent::Failed { status, .. } => Some(SipEvent::Failed(status)),
                    UacEvent::MediaUpdated { negotiated } => {
                        Some(SipEvent::MediaUpdated(negotiated))
                    }
                    UacEvent::RemoteHangup | UacEvent::HungUp | UacEvent::SessionExpired => {
                        Some(SipEvent::Ended)
                    }
                };
                if let Some(ev) = ev {
                    if !o.events.send(ev) {
                        self.shared.metrics.overflow(QueueKind::Sip).inc();
                    }
                }
            }
            if o.call.is_finished() {
                finished.push(*key);
            }
        }
        for key in finished {
            if let Some(o) = self.remove_outgoing(key) {
                let mut events = o.events;
                events.send(SipEvent::Ended);
                events.finish();
            }
        }
        self.registrations.drain(&mut transmits);
        for (t, tls_name) in transmits {
            self.transmit_ours(t, tls_name).await;
        }
    }

    /// Sends what the UAS queued: responses, and the requests of calls that came in. Over
    /// TLS they go back on the connection the call came on: the accepted one from the
    /// peer, else one we opened to it (a registrar sending calls over our registration's).
    async fn transmit(&mut self, t: Transmit) {
        let key = self
            .reply_conn(t.transport, t.destination)
            .unwrap_or_else(|| match t.transport {
                // Nothing open: a new connection, verified against the address.
                Transport::Tls => {
                    let name: Arc<str> = Arc::from(t.destination.ip().to_string());
                    (Transport::Tls, t.destination, Some(name))
                }
                transport => (transport, t.destination, None),
            });
        self.send(t, key).await;
    }

    /// The open connection that messages of a call from `peer` over `transport` came on:
    /// over TLS the accepted one, else one we opened to that peer.
    fn reply_conn(&self, transport: Transport, peer: SocketAddr) -> Option<ConnKey> {
        match transport {
            Transport::Udp => None,
            Transport::Tcp => {
                Some((Transport::Tcp, peer, None)).filter(|k| self.tcp_conns.contains_key(k))
            }
            Transport::Tls => {
                let accepted = (Transport::Tls, peer, None);
                if self.tcp_conns.contains_key(&accepted) {
                    return Some(accepted);
                }
                self.tcp_conns
                    .keys()
                    .find(|(t, p, _)| *t == Transport::Tls && *p == peer)
                    .cloned()
            }
        }
    }

    /// Sends what an outgoing call or a registration queued. Over TLS it goes on a
    /// connection we opened and verified against `tls_name`, never on an accepted one.
    async fn transmit_ours(&mut self, t: Transmit, tls_name: Option<Arc<str>>) {
        let key = match t.transport {
            Transport::Tls => {
                let name = tls_name.unwrap_or_else(|| Arc::from(t.destination.ip().to_string()));
                (Transport::Tls, t.destination, Some(name))
            }
            transport => (transport, t.destination, None),
        };
        self.send(t, key).await;
    }

    async fn send(&mut self, t: Transmit, key: ConnKey) {
        self.shared.metrics.sip_message(false, &t.payload);
        match t.transport {
            Transport::Udp => {
                if let Err(e) = self.udp.send_to(&t.payload, t.destination).await {
                    debug!(error = %e, to = %t.destination, "SIP UDP send failed");
                }
            }
            Transport::Tcp | Transport::Tls => {
                let tx = match self.tcp_conns.get(&key) {
                    Some(conn) => conn.tx.clone(),
                    // Only an outgoing call or a registration sends first over TCP or TLS:
                    // open the connection. (A response whose connection is gone is lost
                    // either way.)
                    None => self.spawn_tcp(key, TcpOrigin::Connect),
                };
                if tx.try_send(t.payload).is_err() {
                    self.shared.metrics.overflow(QueueKind::Sip).inc();
                    warn!(to = %t.destination, transport = t.transport.via_name(), "SIP stream connection not draining; message dropped");
                }
            }
        }
    }

    fn on_uas_event(&mut self, event: UasEvent) {
        let now = Self::now();
        match event {
            UasEvent::IncomingCall(incoming) => self.on_incoming(*incoming, now),
            UasEvent::Cancelled { call }
            | UasEvent::Bye { call }
            | UasEvent::AckTimeout { call }
            | UasEvent::SessionExpired { call }
            | UasEvent::AnswerUnusable { call }
            | UasEvent::PrackTimeout { call } => {
                self.notify_leg(call, SipEvent::Ended);
            }
            UasEvent::MediaUpdated { call, negotiated } => {
                self.notify_leg(call, SipEvent::MediaUpdated(negotiated));
            }
            UasEvent::Dtmf {
                call,
                digit,
                duration_ms,
            } => self.notify_leg(call, SipEvent::Dtmf { digit, duration_ms }),
            UasEvent::ReferAnswered { call, status } => {
                self.notify_leg(call, SipEvent::ReferAnswered(status));
            }
            UasEvent::ReferProgress {
                call,
                status,
                reason,
                terminated,
            } => self.notify_leg(
                call,
                SipEvent::ReferProgress {
                    status,
                    reason,
                    terminated,
                },
            ),
            UasEvent::Ack { .. } => {}
        }
    }

    fn on_incoming(&mut self, incoming: IncomingCall, now: std::time::Instant) {
        let call = incoming.call;
        let reject = |uas: &mut Uas, status: u16| {
            let _ = uas.handle_action(call, UasAction::Reject { status }, now);
        };
        let number = incoming.number.clone();
        let Some(connector) = self.shared.route(&number) else {
            info!(%number, sip_call_id = %incoming.call_id, "no connector for the number: 404");
            return reject(&mut self.uas, 404);
        };
        // The offer must suit the peer's SRTP policy (the UAS has checked the rest).
        let srtp = self
            .admission
            .srtp_policy(&incoming.call_id, &number, incoming.source.ip());
        if let Some(offer) = &incoming.offer {
            let probe = self.media.local_media(9, srtp);
            if let Err(e) = sdp::answer(offer, &probe) {
                info!(%number, sip_call_id = %incoming.call_id, srtp = srtp.as_str(), reason = %e, "offer refused");
                return reject(&mut self.uas, e.status_code());
            }
        }
        // Checked before the app hears of the call; the port itself is taken once the call
        // exists, so calls refused for any other reason never hold one.
        if !self.media.has_free_port() {
            warn!("no free RTP port: 503");
            return reject(&mut self.uas, 503);
        }
        let from = incoming
            .from
            .sip_uri()
            .ok()
            .and_then(|u| u.user)
            .unwrap_or_default();
        let (events_tx, events_rx) = mpsc::channel(LEG_EVENT_QUEUE);
        // The leg needs the call handle and the call needs the leg's link: the leg task starts
        // once the call exists, reading a link made here.
        // At the rate of the codec the offer will be answered with (the leg tells the call
        // if another one is agreed on later).
        let rate = rtp_leg::answer_rate(incoming.offer.as_ref(), &self.media.codecs);
        let (link, pending) = rtp_leg::link(rate);
        let handle = match call::spawn_incoming(&self.shared, connector, &from, &number, link) {
            Ok(h) => h,
            Err(code) => {
                let status = if code == ErrorCode::QuotaExceeded {
                    486
                } else {
                    503
                };
                return reject(&mut self.uas, status);
            }
        };
        info!(%number, %from, call_id = %handle.call_id, sip_call_id = %incoming.call_id, "incoming SIP call");
        let hang_up_call = |uas: &mut Uas| {
            reject(uas, 503);
            handle.send(call::CallInput::Leg {
                leg: LegId::CALLER,
                event: call::LegEvent::Hangup,
            });
        };
        let Some(sockets) = self.media.bind() else {
            warn!("no free RTP port: 503");
            return hang_up_call(&mut self.uas);
        };
        let media = self.media.local_media(sockets.guard.port, srtp);
        let task = pending.start(LegParams {
            shutdown: self.shared.shutdown.clone(),
            call: handle.clone(),
            leg: LegId::CALLER,
            key: LegKey::In(call),
            direction: Direction::Incoming,
            sockets,
            media,
            rtp_timeout: self.media.rtp_timeout,
            commands: self.commands.clone(),
            events: events_rx,
            signalling: Some(incoming.source.ip()),
            dial: None,
        });
        match task {
            Ok(task) => {
                self.legs.insert(call, LegEvents::new(events_tx));
                let conn = [Transport::Tcp, Transport::Tls]
                    .into_iter()
                    .find_map(|t| self.reply_conn(t, incoming.source))
                    .and_then(|key| self.tcp_conns.get(&key));
                if let Some(conn) = conn {
                    conn.calls.fetch_add(1, Ordering::Relaxed);
                    self.tcp_calls.insert(call, conn.calls.clone());
                }
                self.shared.tasks.spawn(task.instrument(info_span!(
                    "sip_in",
                    call_id = %handle.call_id,
                    session_id = %handle.session_id
                )));
            }
            Err(e) => {
                warn!(error = %e, "RTP socket unusable");
                hang_up_call(&mut self.uas);
            }
        }
    }

    /// Takes an accepted connection, or closes it at once (by dropping `stream`) when its
    /// source is outside `[sip] allow` or a connection cap is reached.
    fn add_tcp(&mut self, stream: TcpStream, key: ConnKey) {
        let (transport, peer, _) = key;
        let name = transport.via_name();
        if !self.admission.allows(peer.ip()) {
            debug!(%peer, "SIP {name} connection refused: source outside sip.allow");
            return;
        }
        if self.tcp_conns.len() >= self.tcp_limits.max_connections {
            debug!(%peer, max = self.tcp_limits.max_connections, "SIP {name} connection refused: at the connection limit");
            return;
        }
        let source = source_address(peer.ip());
        let max_per_source = self.tcp_limits.max_connections_per_ip;
        if self.tcp_per_source.get(&source).copied().unwrap_or(0) >= max_per_source {
            debug!(%peer, max = max_per_source, "SIP {name} connection refused: at the limit for its source address");
            return;
        }
        self.spawn_tcp(key, TcpOrigin::Accepted(stream));
    }

    /// Gives back the place of a connection no longer in `tcp_conns` under the per-source cap.
    fn forget_tcp(&mut self, conn: Option<TcpConn>) {
        let Some(source) = conn.and_then(|c| c.source) else {
            return;
        };
        if let Some(open) = self.tcp_per_source.get_mut(&source) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                self.tcp_per_source.remove(&source);
            }
        }
    }

    /// Starts the task of one TCP or TLS connection (accepted, or to be opened to the peer
    /// for an outgoing call or a registration) and returns the queue of what to write on it.
    fn spawn_tcp(&mut self, key: ConnKey, origin: TcpOrigin) -> mpsc::Sender<Vec<u8>> {
        let (transport, peer, ref verify_as) = key;
        // The name the peer's certificate must carry: the host dialled, else its address.
        let tls_name = verify_as
            .as_deref()
            .map_or_else(|| peer.ip().to_string(), str::to_owned);
        let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(TCP_OUTBOX);
        self.next_conn += 1;
        let id = self.next_conn;
        let calls = Arc::new(AtomicUsize::new(0));
        let source = matches!(origin, TcpOrigin::Accepted(_)).then(|| source_address(peer.ip()));
        if let Some(source) = source {
            *self.tcp_per_source.entry(source).or_default() += 1;
        }
        let replaced = self.tcp_conns.insert(
            key.clone(),
            TcpConn {
                id,
                tx: out_tx.clone(),
                calls: calls.clone(),
                source,
            },
        );
        // The replaced connection's own `Closed` will not match: it leaves the count now.
        self.forget_tcp(replaced);
        // An accepted connection must deliver a whole first message within the deadline
        // of one, counted from the accept (handshake included): a peer that connects and
        // only sends keep-alives would otherwise hold its place for the idle timeout.
        let first_message_by = source.map(|_| Instant::now() + self.tcp_limits.message_timeout);
        let conn = Conn {
            key,
            id,
            first_message_by,
            inbox: self.tcp_tx.clone(),
            stop: self.tcp_stop.clone(),
            limits: self.tcp_limits,
            pings: out_tx.clone(),
            out_rx,
            calls,
        };
        let tls = self.tls.clone();
        let accepted = matches!(origin, TcpOrigin::Accepted(_));
        let task = async move {
            let stream = match origin {
                TcpOrigin::Accepted(stream) => stream,
                TcpOrigin::Connect => {
                    let connect =
                        tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(peer));
                    match connect.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            let reason = format!("connection to {peer} failed: {e}");
                            warn!(%peer, "SIP {}: {reason}", transport.via_name());
                            return conn.close(Some(reason)).await;
                        }
                        Err(_) => {
                            let reason = format!("connection to {peer} timed out");
                            warn!(%peer, "SIP {}: {reason}", transport.via_name());
                            return conn.close(Some(reason)).await;
                        }
                    }
                }
            };
            if transport != Transport::Tls {
                return conn.serve(stream).await;
            }
            // The handshake is held to the deadline of a message: a peer that opens a
            // connection and stalls keeps it no longer than one sending a message slowly.
            let deadline = conn.limits.message_timeout;
            let handshake = if accepted {
                let Some(acceptor) = tls.acceptor else {
                    return conn.close(None).await;
                };
                tokio::time::timeout(deadline, acceptor.accept(stream))
                    .await
                    .map(|r| r.map(tokio_rustls::TlsStream::from))
            } else {
                let Some(name) = server_name(&tls_name) else {
                    let reason = format!("{tls_name:?} is not a name a TLS certificate can carry");
                    warn!(%peer, "SIP TLS: {reason}");
                    return conn.close(Some(reason)).await;
                };
                tokio::time::timeout(deadline, tls.connector.connect(name, stream))
                    .await
                    .map(|r| r.map(tokio_rustls::TlsStream::from))
            };
            let reason = match handshake {
                Ok(Ok(stream)) => return conn.serve(stream).await,
                Ok(Err(e)) => format!("TLS handshake with {peer} ({tls_name}) failed: {e}"),
                Err(_) => format!("TLS handshake with {peer} ({tls_name}) timed out"),
            };
            if accepted {
                debug!(%peer, "SIP TLS: {reason}");
                conn.close(None).await;
            } else {
                warn!(%peer, "SIP TLS: {reason}");
                conn.close(Some(reason)).await;
            }
        };
        self.shared
            .tasks
            .spawn(task.instrument(info_span!("sip_tcp", %peer, transport = transport.via_name())));
        out_tx
    }
}

/// Accepts on the TLS listener; without one, never returns.
async fn accept_tls(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// One TCP or TLS connection's task: what it reads goes to the endpoint, what the endpoint
/// queues is written.
struct Conn {
    key: ConnKey,
    id: u64,
    /// For an accepted connection until its first complete message: when it is closed
    /// if none has come.
    first_message_by: Option<Instant>,
    inbox: mpsc::Sender<TcpInput>,
    stop: CancellationToken,
    limits: TcpLimits,
    /// Our own queue, for answering keep-alive pings.
    pings: mpsc::Sender<Vec<u8>>,
    out_rx: mpsc::Receiver<Vec<u8>>,
    /// Live incoming calls signalled over it.
    calls: Arc<AtomicUsize>,
}

impl Conn {
    /// Tells the endpoint the connection is gone (with why, if it never opened).
    async fn close(self, failure: Option<String>) {
        let _ = self
            .inbox
            .send(TcpInput::Closed(self.key, self.id, failure))
            .await;
    }

    /// Reads messages off `stream` and writes the queued ones until the peer closes, a
    /// deadline passes or the endpoint stops.
    async fn serve<S: AsyncRead + AsyncWrite + Send + Unpin>(mut self, stream: S) {
        let peer = self.key.1;
        let limits = self.limits;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut decoder = StreamDecoder::new();
        let mut buf = vec![0u8; 8192];
        let mut last_activity = Instant::now();
        // When the message now buffered began arriving.
        let mut partial_since: Option<Instant> = None;
        loop {
            let idle_at = last_activity + limits.idle_timeout;
            let deadline =
                partial_since.map_or(idle_at, |since| idle_at.min(since + limits.message_timeout));
            let deadline = self
                .first_message_by
                .map_or(deadline, |by| deadline.min(by));
            tokio::select! {
                // Cancel-safe: only observes the token.
                () = self.stop.cancelled() => break,
                // Cancel-safe: a read either returns bytes or none were taken (a TLS
                // stream's read keeps what it decrypted in its buffer).
                r = rd.read(&mut buf) => {
                    let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                    last_activity = Instant::now();
                    decoder.extend(&buf[..n]);
                    loop {
                        match decoder.next_item() {
                            Ok(Some(StreamItem::Message(m))) => {
                                partial_since = None;
                                self.first_message_by = None;
                                if self.inbox.send(TcpInput::Message(self.key.clone(), m)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(Some(StreamItem::Ping)) => {
                                let _ = self.pings.try_send(b"\r\n".to_vec());
                            }
                            Ok(Some(StreamItem::Pong)) => {}
                            Ok(None) => break,
                            Err(e) => {
                                debug!(%peer, error = %e, "SIP stream unusable; closing");
                                return self.close(None).await;
                            }
                        }
                    }
                    if decoder.has_partial_message() {
                        partial_since.get_or_insert(last_activity);
                    } else {
                        partial_since = None;
                    }
                }
                // Cancel-safe: mpsc recv.
                Some(bytes) = self.out_rx.recv() => {
                    let write = async {
                        wr.write_all(&bytes).await?;
                        // TLS holds written records until flushed.
                        wr.flush().await
                    };
                    let write = tokio::time::timeout(limits.message_timeout, write);
                    if !matches!(write.await, Ok(Ok(()))) {
                        debug!(%peer, "SIP stream write failed or stalled; closing");
                        break;
                    }
                    last_activity = Instant::now();
                }
                // Cancel-safe: recomputed every loop.
                () = tokio::time::sleep_until(deadline) => {
                    if self.first_message_by.is_some_and(|by| by <= Instant::now()) {
                        debug!(%peer, "SIP stream connection sent no message in time; closing");
                        break;
                    }
                    if partial_since.is_some_and(|since| since + limits.message_timeout <= Instant::now()) {
                        debug!(%peer, "SIP stream message incomplete past its deadline; closing");
                        break;
                    }
                    if self.calls.load(Ordering::Relaxed) > 0 {
                        // Quiet, but a call signalled here is still up: keep it.
                        last_activity = Instant::now();
                        continue;
                    }
                    debug!(%peer, "SIP stream connection idle; closing");
                    break;
                }
            }
        }
        self.close(None).await;
    }
}

/// An open TCP or TLS connection, as the endpoint sees it.
struct TcpConn {
    /// Tells this connection from a later one with the same peer.
    id: u64,
    /// What to write on it.
    tx: mpsc::Sender<Vec<u8>>,
    /// Live incoming calls signalled over it.
    calls: Arc<AtomicUsize>,
    /// The [`source_address`] of an accepted connection; `None` for one we opened.
    source: Option<IpAddr>,
}

/// Where a TCP or TLS connection comes from.
enum TcpOrigin {
    /// A peer connected to one of our listeners.
    Accepted(TcpStream),
    /// We connect, to send an outgoing call's or a registration's requests.
    Connect,
}
