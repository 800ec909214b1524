//! The SIP endpoint task: the I/O half of the SIP edge.
//!
//! It owns the UDP socket and the TCP listener (same port), the sans-IO [`Uas`] for incoming
//! calls and one [`OutgoingCall`] per call dialled by `call.connect`. It feeds them what the
//! network sends, sends what they ask, runs their timers, and talks to each call's RTP leg
//! task ([`crate::rtp::leg`]) over small bounded channels: legs send [`Command`]s, the endpoint
//! answers with [`SipEvent`]s.
//!
//! Incoming calls: `IncomingCall` -> route the number (404 when no connector takes it) -> bind
//! an RTP port -> `call::spawn_incoming` with an 8 kHz leg. Messages whose Call-ID belongs to an
//! outgoing call go to that call; everything else goes to the UAS.

use super::digest::Credentials;
use super::message::{Message, SipHeaders as _, SipUri};
use super::sdp::{LocalMedia, Negotiated};
use super::stream::{StreamDecoder, StreamItem};
use super::transaction::Timers;
use super::uac::{OutgoingCall, UacConfig, UacEvent};
use super::uas::{self, IncomingCall, Uas, UasAction, UasConfig, UasEvent};
use super::{Transmit, Transport};
use crate::call::{self, CallHandle, LegId, LegLink};
use crate::config::SipConfig;
use crate::rtp::leg::{self, Direction, LegParams};
use crate::rtp::ports::PortPool;
use crate::state::Shared;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telcoflow_proto::ErrorCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info, info_span, warn};

/// Commands queued from legs and the ring dispatcher to the endpoint.
const COMMAND_QUEUE: usize = 256;
/// SIP events queued towards one leg (a handful per call).
pub(crate) const LEG_EVENT_QUEUE: usize = 16;
/// Messages queued from all TCP readers to the endpoint.
const TCP_INBOX: usize = 256;
/// Messages queued towards one TCP connection.
const TCP_OUTBOX: usize = 64;
/// How long opening a TCP connection for an outgoing call may take.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts to find a free RTP port before giving up on a call.
const BIND_ATTEMPTS: usize = 8;
/// `User-Agent` / `Server` header value.
const USER_AGENT: &str = concat!("telcoflow/", env!("CARGO_PKG_VERSION"));

/// Identifies a leg to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LegKey {
    /// An incoming call of the UAS.
    In(uas::CallHandle),
    /// An outgoing call, by the endpoint-wide number it was given.
    Out(u64),
}

/// From a leg (or the ring dispatcher) to the endpoint.
#[derive(Debug)]
pub(crate) enum Command {
    /// 180 Ringing for an incoming call.
    Ringing(uas::CallHandle),
    /// 200 OK with SDP for an incoming call.
    Answer {
        call: uas::CallHandle,
        media: LocalMedia,
    },
    /// A final error response for an unanswered incoming call.
    Reject { call: uas::CallHandle, status: u16 },
    /// BYE (or CANCEL for an unanswered outgoing call).
    Hangup(LegKey),
    /// Dial out.
    Dial {
        key: u64,
        config: Box<UacConfig>,
        media: LocalMedia,
        events: mpsc::Sender<SipEvent>,
    },
    /// The leg has ended; forget it.
    Gone(LegKey),
}

/// From the endpoint to a leg.
#[derive(Debug, Clone)]
pub(crate) enum SipEvent {
    /// The call is answered (our 200 was sent, or the callee's 200 arrived) with these media.
    Answered(Negotiated),
    /// An outgoing call failed before the answer with this status.
    Failed(u16),
    /// The call ended on the SIP side (BYE, CANCEL, lost ACK, our BYE completed).
    Ended,
    /// New media parameters (re-INVITE, hold).
    MediaUpdated(Negotiated),
    /// A key press sent as SIP INFO.
    Dtmf { digit: char, duration_ms: u32 },
}

/// Why a SIP destination cannot be dialled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("not a valid SIP URI: {0}")]
    BadUri(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("no RTP port is free")]
    NoPort,
}

/// RTP resources shared by the endpoint and the ring dispatcher.
#[derive(Debug)]
pub(crate) struct MediaEnv {
    pool: Mutex<PortPool>,
    /// Address RTP sockets bind to.
    bind_ip: IpAddr,
    /// Address announced in SDP.
    pub(crate) advertised: IpAddr,
    pub(crate) rtp_timeout: Duration,
}

impl MediaEnv {
    /// Binds an RTP socket on a free even port of the range and its RTCP socket on the next
    /// port. The ports return to the pool when the guard drops.
    pub(crate) fn bind(self: &Arc<Self>) -> Option<RtpSockets> {
        for _ in 0..BIND_ATTEMPTS {
            let port = self.lock().allocate()?;
            let bind = |p: u16| {
                let sock = std::net::UdpSocket::bind((self.bind_ip, p)).ok()?;
                sock.set_nonblocking(true).ok()?;
                Some(sock)
            };
            // The pool only hands out even ports whose odd neighbour is in the range.
            match (bind(port), port.checked_add(1).and_then(bind)) {
                (Some(rtp), Some(rtcp)) => {
                    let guard = PortGuard {
                        env: self.clone(),
                        port,
                    };
                    return Some(RtpSockets { rtp, rtcp, guard });
                }
                _ => {
                    debug!(port, "RTP port pair busy; trying another");
                    self.lock().release(port);
                }
            }
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PortPool> {
        // Only plain bookkeeping happens under the lock; a poisoned pool is still consistent.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A call's bound RTP and RTCP sockets.
#[derive(Debug)]
pub(crate) struct RtpSockets {
    pub(crate) rtp: std::net::UdpSocket,
    pub(crate) rtcp: std::net::UdpSocket,
    pub(crate) guard: PortGuard,
}

/// An allocated RTP port pair, released on drop.
#[derive(Debug)]
pub(crate) struct PortGuard {
    env: Arc<MediaEnv>,
    pub(crate) port: u16,
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        self.env.lock().release(self.port);
    }
}

/// How the rest of the server reaches the SIP endpoint.
#[derive(Debug)]
pub(crate) struct SipHandle {
    commands: mpsc::Sender<Command>,
    pub(crate) media: Arc<MediaEnv>,
    config: SipConfig,
    /// `sip:telcoflow@host:port` of this endpoint.
    contact: String,
    sent_by: String,
    next_key: AtomicU64,
}

impl SipHandle {
    /// Dials `uri` for `call` as leg `leg`: binds an RTP port, starts the leg task and asks the
    /// endpoint to send the INVITE. The callee's answer arrives as a leg event.
    pub(crate) fn dial(
        &self,
        shared: &Arc<Shared>,
        uri: &str,
        call: &CallHandle,
        leg: LegId,
    ) -> Result<LegLink, DialError> {
        let parsed = SipUri::parse(uri).map_err(|_| DialError::BadUri(uri.to_owned()))?;
        let port = parsed.port.unwrap_or(5060);
        // A literal address is used as is; a name is resolved by the leg task, so that the
        // call actor calling this never waits on DNS.
        let (destination, resolve) = match parsed.host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => (SocketAddr::new(ip, port), None),
            Err(_) => (
                SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
                Some((parsed.host.clone(), port)),
            ),
        };
        let host_port = match parsed.port {
            Some(p) => format!("{}:{p}", parsed.host),
            None => parsed.host.clone(),
        };
        let credentials = self.config.trunk_for(&host_port).map(|t| Credentials {
            username: t.username.clone(),
            password: t.password.clone(),
        });
        let transport = if parsed
            .params
            .get("transport")
            .is_some_and(|t| t.eq_ignore_ascii_case("tcp"))
        {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        let from_user = sip_user(&call.from);
        let sockets = self.media.bind().ok_or(DialError::NoPort)?;
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let media = LocalMedia::new(
            self.media.advertised,
            sockets.guard.port,
            rand::random::<u32>().into(),
        );
        let config = UacConfig {
            target: uri.to_owned(),
            destination,
            transport,
            from: format!("sip:{from_user}@{}", self.sent_by),
            contact: self.contact.clone(),
            sent_by: self.sent_by.clone(),
            credentials,
            timers: Timers::default(),
            user_agent: USER_AGENT.into(),
        };
        let (events_tx, events_rx) = mpsc::channel(LEG_EVENT_QUEUE);
        let (link, pending) = leg::link();
        let task = pending
            .start(LegParams {
                shared: shared.clone(),
                call: call.clone(),
                leg,
                key: LegKey::Out(key),
                direction: Direction::Outgoing,
                sockets,
                media: media.clone(),
                rtp_timeout: self.media.rtp_timeout,
                commands: self.commands.clone(),
                events: events_rx,
                dial: Some(OutgoingDial {
                    key,
                    config: Box::new(config),
                    media,
                    events: events_tx,
                    resolve,
                }),
            })
            .map_err(|_| DialError::NoPort)?;
        shared
            .tasks
            .spawn(task.instrument(info_span!("sip_out", call_id = %call.call_id, %uri)));
        Ok(link)
    }
}

/// What an outgoing leg's task asks the endpoint to dial once it runs.
#[derive(Debug)]
pub(crate) struct OutgoingDial {
    pub(crate) key: u64,
    pub(crate) config: Box<UacConfig>,
    pub(crate) media: LocalMedia,
    pub(crate) events: mpsc::Sender<SipEvent>,
    /// A host name to resolve into `config.destination` first, with its port.
    pub(crate) resolve: Option<(String, u16)>,
}

impl OutgoingDial {
    /// Resolves the destination if needed and gives the command for the endpoint.
    pub(crate) async fn into_command(mut self) -> Result<Command, DialError> {
        if let Some((host, port)) = self.resolve.take() {
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(DialError::Resolve(host))?;
            self.config.destination = addr;
        }
        Ok(Command::Dial {
            key: self.key,
            config: self.config,
            media: self.media,
            events: self.events,
        })
    }
}

/// A caller id made safe for the user part of a SIP URI (digits, letters, `+-_.`).
fn sip_user(from: &str) -> String {
    let user: String = from
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '_' | '.'))
        .collect();
    if user.is_empty() {
        "telcoflow".into()
    } else {
        user
    }
}

/// Binds the SIP sockets and starts the endpoint task. Returns the bound address.
pub(crate) async fn start(shared: &Arc<Shared>, config: SipConfig) -> std::io::Result<SocketAddr> {
    let (udp, tcp, local) = bind_udp_tcp(config.listen).await?;
    let (low, high) = config
        .rtp_port_range()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let pool = PortPool::new(low, high)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let advertised = config.advertised_ip();
    if config.listen.ip().is_unspecified() && config.public_ip.is_none() {
        warn!(
            %advertised,
            "SIP listens on all interfaces without public_ip: SDP and Contact announce {advertised}; set public_ip (--public-ip) for peers on other machines"
        );
    }
    let sent_by = format!("{}:{}", host_literal(advertised), local.port());
    let contact = format!("sip:telcoflow@{sent_by}");
    let media = Arc::new(MediaEnv {
        pool: Mutex::new(pool),
        bind_ip: local.ip(),
        advertised,
        rtp_timeout: config.rtp_timeout(),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let handle = SipHandle {
        commands: cmd_tx.clone(),
        media: media.clone(),
        config,
        contact: contact.clone(),
        sent_by: sent_by.clone(),
        next_key: AtomicU64::new(1),
    };
    if shared.sip.set(handle).is_err() {
        return Err(std::io::Error::other("SIP endpoint already started"));
    }
    let uas = Uas::new(
        UasConfig {
            contact,
            sent_by,
            timers: Timers::default(),
            user_agent: USER_AGENT.into(),
        },
        rand::random(),
    );
    let (tcp_tx, tcp_rx) = mpsc::channel(TCP_INBOX);
    let endpoint = Endpoint {
        shared: shared.clone(),
        media,
        uas,
        udp,
        legs: HashMap::new(),
        outgoing: HashMap::new(),
        by_call_id: HashMap::new(),
        tcp_conns: HashMap::new(),
        next_conn: 0,
        tcp_tx,
        commands: cmd_tx,
    };
    shared.tasks.spawn(
        endpoint
            .run(tcp, tcp_rx, cmd_rx)
            .instrument(info_span!("sip", %local)),
    );
    info!(%local, "SIP listening on udp+tcp");
    Ok(local)
}

/// Binds UDP and TCP on one port. With port 0 the UDP socket picks it, and if that number is
/// taken for TCP (an outgoing connection's ephemeral port, say), another is tried.
async fn bind_udp_tcp(listen: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener, SocketAddr)> {
    const ATTEMPTS: usize = 16;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let udp = UdpSocket::bind(listen).await?;
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp, local)),
            Err(e) if listen.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")))
}

fn host_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Something a TCP reader task passes to the endpoint.
enum TcpInput {
    Message(SocketAddr, bytes::Bytes),
    Closed(SocketAddr, u64),
}

struct Outgoing {
    call: OutgoingCall,
    events: mpsc::Sender<SipEvent>,
}

struct Endpoint {
    shared: Arc<Shared>,
    media: Arc<MediaEnv>,
    uas: Uas,
    udp: UdpSocket,
    /// Incoming calls' legs.
    legs: HashMap<uas::CallHandle, mpsc::Sender<SipEvent>>,
    /// Outgoing calls by key.
    outgoing: HashMap<u64, Outgoing>,
    /// SIP Call-ID -> outgoing key.
    by_call_id: HashMap<String, u64>,
    /// Open TCP connections by peer: (connection number, write queue).
    tcp_conns: HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)>,
    next_conn: u64,
    tcp_tx: mpsc::Sender<TcpInput>,
    commands: mpsc::Sender<Command>,
}

impl Endpoint {
    async fn run(
        mut self,
        tcp: TcpListener,
        mut tcp_rx: mpsc::Receiver<TcpInput>,
        mut cmd_rx: mpsc::Receiver<Command>,
    ) {
        // One datagram: SIP over UDP stays well under 64 KiB.
        let mut buf = vec![0u8; super::message::MAX_MESSAGE_LEN];
        let shutdown = self.shared.shutdown.clone();
        loop {
            let deadline = self.next_timeout();
            tokio::select! {
                // Cancel-safe: only observes the token.
                () = shutdown.cancelled() => break,
                // Cancel-safe: a datagram is either returned whole or left in the socket.
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok((n, source)) => self.on_message(Transport::Udp, source, &buf[..n]),
                    // ICMP port unreachable and the like surface here on some systems.
                    Err(e) => debug!(error = %e, "SIP UDP receive failed"),
                },
                // Cancel-safe: accept loses nothing.
                r = tcp.accept() => match r {
                    Ok((stream, peer)) => self.add_tcp(stream, peer),
                    Err(e) => warn!(error = %e, "SIP TCP accept failed"),
                },
                // Cancel-safe: mpsc recv.
                Some(input) = tcp_rx.recv() => match input {
                    TcpInput::Message(peer, bytes) => self.on_message(Transport::Tcp, peer, &bytes),
                    TcpInput::Closed(peer, id) => {
                        // A newer connection to the same peer may have replaced this one.
                        if self.tcp_conns.get(&peer).is_some_and(|(c, _)| *c == id) {
                            self.tcp_conns.remove(&peer);
                        }
                    }
                },
                // Cancel-safe: mpsc recv.
                Some(cmd) = cmd_rx.recv() => self.on_command(cmd),
                // Cancel-safe: recomputed every loop.
                () = tokio::time::sleep_until(deadline) => self.on_timeout(),
            }
            self.drain().await;
        }
        self.hang_up_all().await;
        debug!("SIP endpoint stopped");
    }

    /// On shutdown: BYE (or a final response, or CANCEL) for every call, sent once. The
    /// endpoint stops right after, so there are no retransmissions; peers that miss it end
    /// the call by their RTP timeout.
    async fn hang_up_all(&mut self) {
        let now = Self::now();
        let calls: Vec<uas::CallHandle> = self.legs.keys().copied().collect();
        for call in calls {
            let _ = self.uas.handle_action(call, UasAction::Hangup, now);
        }
        for o in self.outgoing.values_mut() {
            o.call.hangup(now);
        }
        while let Some(t) = self.uas.poll_transmit() {
            self.transmit(t).await;
        }
        let mut transmits = Vec::new();
        for o in self.outgoing.values_mut() {
            while let Some(t) = o.call.poll_transmit() {
                transmits.push(t);
            }
        }
        for t in transmits {
            self.transmit(t).await;
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
    }

    fn on_message(&mut self, transport: Transport, source: SocketAddr, bytes: &[u8]) {
        let now = Self::now();
        // Route by Call-ID: our outgoing calls' messages go to their UAC.
        if !self.by_call_id.is_empty() {
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
            }
        }
        self.uas.handle_input(transport, source, bytes, now);
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
            } => {
                let call = OutgoingCall::new(*config, media, rand::random(), now);
                self.by_call_id.insert(call.call_id().to_owned(), key);
                self.outgoing.insert(key, Outgoing { call, events });
            }
            Command::Gone(LegKey::In(call)) => {
                self.legs.remove(&call);
            }
            Command::Gone(LegKey::Out(_)) => {
                // The UAC finishes its BYE/CANCEL on its own and is dropped when finished.
            }
        }
    }

    fn notify_leg(&mut self, call: uas::CallHandle, event: SipEvent) {
        let ends = matches!(event, SipEvent::Ended);
        if let Some(tx) = self.legs.get(&call) {
            if tx.try_send(event).is_err() {
                debug!("leg not reading SIP events");
            }
        }
        if ends {
            self.legs.remove(&call);
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
        for (key, o) in &mut self.outgoing {
            while let Some(t) = o.call.poll_transmit() {
                transmits.push(t);
            }
            while let Some(event) = o.call.poll_event() {
                let ev = match event {
                    UacEvent::Progress { .. } => None,
                    UacEvent::Answered { negotiated } => Some(SipEvent::Answered(negotiated)),
                    UacEvent::Failed { status, .. } => Some(SipEvent::Failed(status)),
                    UacEvent::MediaUpdated { negotiated } => {
                        Some(SipEvent::MediaUpdated(negotiated))
                    }
                    UacEvent::RemoteHangup | UacEvent::HungUp => Some(SipEvent::Ended),
                };
                if let Some(ev) = ev {
                    let _ = o.events.try_send(ev);
                }
            }
            if o.call.is_finished() {
                finished.push(*key);
            }
        }
        for key in finished {
            if let Some(o) = self.outgoing.remove(&key) {
                self.by_call_id.remove(o.call.call_id());
                let _ = o.events.try_send(SipEvent::Ended);
            }
        }
        for t in transmits {
            self.transmit(t).await;
        }
    }

    async fn transmit(&mut self, t: Transmit) {
        match t.transport {
            Transport::Udp => {
                if let Err(e) = self.udp.send_to(&t.payload, t.destination).await {
                    debug!(error = %e, to = %t.destination, "SIP UDP send failed");
                }
            }
            Transport::Tcp => {
                let tx = match self.tcp_conns.get(&t.destination) {
                    Some((_, tx)) => tx.clone(),
                    // Only an outgoing call sends first over TCP: open the connection. (A
                    // response whose connection is gone is lost either way.)
                    None => self.spawn_tcp(t.destination, TcpOrigin::Connect),
                };
                if tx.try_send(t.payload).is_err() {
                    warn!(to = %t.destination, "SIP TCP connection not draining; message dropped");
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
            | UasEvent::AckTimeout { call } => {
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
        let Some(sockets) = self.media.bind() else {
            warn!("no free RTP port: 503");
            return reject(&mut self.uas, 503);
        };
        let from = incoming
            .from
            .sip_uri()
            .ok()
            .and_then(|u| u.user)
            .unwrap_or_default();
        let media = LocalMedia::new(
            self.media.advertised,
            sockets.guard.port,
            rand::random::<u32>().into(),
        );
        let (events_tx, events_rx) = mpsc::channel(LEG_EVENT_QUEUE);
        // The leg needs the call handle and the call needs the leg's link: the leg task starts
        // once the call exists, reading a link made here.
        let (link, pending) = leg::link();
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
        let task = pending.start(LegParams {
            shared: self.shared.clone(),
            call: handle.clone(),
            leg: LegId::CALLER,
            key: LegKey::In(call),
            direction: Direction::Incoming,
            sockets,
            media,
            rtp_timeout: self.media.rtp_timeout,
            commands: self.commands.clone(),
            events: events_rx,
            dial: None,
        });
        match task {
            Ok(task) => {
                self.legs.insert(call, events_tx);
                self.shared
                    .tasks
                    .spawn(task.instrument(info_span!("sip_in", call_id = %handle.call_id)));
            }
            Err(e) => {
                warn!(error = %e, "RTP socket unusable");
                reject(&mut self.uas, 503);
                let input = call::CallInput::Leg {
                    leg: LegId::CALLER,
                    event: call::LegEvent::Hangup,
                };
                handle.send(input);
            }
        }
    }

    fn add_tcp(&mut self, stream: TcpStream, peer: SocketAddr) {
        self.spawn_tcp(peer, TcpOrigin::Accepted(stream));
    }

    /// Starts the task of one TCP connection (accepted, or to be opened to `peer` for an
    /// outgoing call) and returns the queue of what to write on it.
    fn spawn_tcp(&mut self, peer: SocketAddr, origin: TcpOrigin) -> mpsc::Sender<Vec<u8>> {
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(TCP_OUTBOX);
        self.next_conn += 1;
        let id = self.next_conn;
        self.tcp_conns.insert(peer, (id, out_tx.clone()));
        let inbox = self.tcp_tx.clone();
        let shutdown = self.shared.shutdown.clone();
        let pings = out_tx.clone();
        let task = async move {
            let stream = match origin {
                TcpOrigin::Accepted(stream) => stream,
                TcpOrigin::Connect => {
                    let connect =
                        tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(peer));
                    match connect.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            warn!(%peer, error = %e, "SIP TCP connect failed");
                            let _ = inbox.send(TcpInput::Closed(peer, id)).await;
                            return;
                        }
                        Err(_) => {
                            warn!(%peer, "SIP TCP connect timed out");
                            let _ = inbox.send(TcpInput::Closed(peer, id)).await;
                            return;
                        }
                    }
                }
            };
            let (mut rd, mut wr) = stream.into_split();
            let mut decoder = StreamDecoder::new();
            let mut buf = vec![0u8; 8192];
            loop {
                tokio::select! {
                    // Cancel-safe: only observes the token.
                    () = shutdown.cancelled() => break,
                    // Cancel-safe: a read either returns bytes or none were taken.
                    r = rd.read(&mut buf) => {
                        let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                        decoder.extend(&buf[..n]);
                        loop {
                            match decoder.next_item() {
                                Ok(Some(StreamItem::Message(m))) => {
                                    if inbox.send(TcpInput::Message(peer, m)).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(Some(StreamItem::Ping)) => {
                                    let _ = pings.try_send(b"\r\n".to_vec());
                                }
                                Ok(Some(StreamItem::Pong)) => {}
                                Ok(None) => break,
                                Err(e) => {
                                    debug!(%peer, error = %e, "SIP TCP stream unusable; closing");
                                    let _ = inbox.send(TcpInput::Closed(peer, id)).await;
                                    return;
                                }
                            }
                        }
                    }
                    // Cancel-safe: mpsc recv.
                    Some(bytes) = out_rx.recv() => {
                        if wr.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = inbox.send(TcpInput::Closed(peer, id)).await;
        };
        self.shared
            .tasks
            .spawn(task.instrument(info_span!("sip_tcp", %peer)));
        out_tx
    }
}

/// Where a TCP connection comes from.
enum TcpOrigin {
    /// A peer connected to our listener.
    Accepted(TcpStream),
    /// We connect, to send an outgoing call's requests.
    Connect,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(low: u16, high: u16) -> Arc<MediaEnv> {
        Arc::new(MediaEnv {
            pool: Mutex::new(PortPool::new(low, high).unwrap()),
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            advertised: IpAddr::from([127, 0, 0, 1]),
            rtp_timeout: Duration::from_secs(30),
        })
    }

    #[test]
    fn rtp_ports_come_from_the_range_and_go_back_on_drop() {
        let env = env(41000, 41003); // two even ports: 41000, 41002
        let a = env.bind().expect("first pair");
        let b = env.bind().expect("second pair");
        assert_ne!(a.guard.port, b.guard.port);
        for s in [&a, &b] {
            assert_eq!(s.rtp.local_addr().unwrap().port(), s.guard.port);
            assert_eq!(s.rtcp.local_addr().unwrap().port(), s.guard.port + 1);
            assert!((41000..=41003).contains(&s.guard.port) && s.guard.port % 2 == 0);
        }
        assert!(env.bind().is_none(), "the range is used up");
        drop(a);
        let c = env.bind().expect("a released pair is reused");
        assert_eq!(env.lock().in_use(), 2);
        drop(c);
        drop(b);
        assert_eq!(env.lock().in_use(), 0);
    }

    #[test]
    fn a_port_taken_by_another_process_is_skipped() {
        let env = env(41010, 41013);
        // Another process holds the RTCP port of the first pair.
        let squatter = std::net::UdpSocket::bind(("127.0.0.1", 41011)).unwrap();
        let sockets = env.bind().expect("the other pair");
        assert_eq!(sockets.guard.port, 41012);
        assert_eq!(
            env.lock().in_use(),
            1,
            "the busy port went back to the pool"
        );
        drop(squatter);
    }

    #[test]
    fn caller_ids_become_safe_sip_users() {
        assert_eq!(sip_user("+15551230001"), "+15551230001");
        assert_eq!(sip_user("Alice <a@b>"), "Aliceab");
        assert_eq!(sip_user(""), "telcoflow");
        assert_eq!(sip_user(" ;"), "telcoflow");
        assert_eq!(host_literal("::1".parse().unwrap()), "[::1]");
        assert_eq!(host_literal("10.0.0.1".parse().unwrap()), "10.0.0.1");
    }

    #[tokio::test]
    async fn dial_names_resolve_in_the_leg() {
        // Only `localhost` (from the hosts file): tests send nothing beyond this machine.
        let (events, _rx) = mpsc::channel(1);
        let dial = |resolve| OutgoingDial {
            key: 1,
            config: Box::new(UacConfig {
                target: "sip:x@localhost:5070".into(),
                destination: "0.0.0.0:5070".parse().unwrap(),
                transport: Transport::Udp,
                from: "sip:a@127.0.0.1".into(),
                contact: "sip:a@127.0.0.1".into(),
                sent_by: "127.0.0.1:5060".into(),
                credentials: None,
                timers: Timers::default(),
                user_agent: USER_AGENT.into(),
            }),
            media: LocalMedia::new(IpAddr::from([127, 0, 0, 1]), 20000, 1),
            events: events.clone(),
            resolve,
        };
        match dial(Some(("localhost".into(), 5070))).into_command().await {
            Ok(Command::Dial { config, .. }) => {
                assert!(config.destination.ip().is_loopback());
                assert_eq!(config.destination.port(), 5070);
            }
            other => panic!("{other:?}"),
        }
    }
}
