//! The SIP edge: a SIP user agent (UDP and TCP on one port, TLS on another) that takes calls
//! from phones and trunks, dials `sip:` and `sips:` destinations, and carries each call's audio
//! over RTP.
//!
//! - [`SipNetwork`]: the [`Network`] that rings `sip:` destinations.
//! - `endpoint`: the task that owns the SIP sockets and drives the sans-IO user agents of
//!   `telcoflow_sip`.
//! - `rtp_leg`: one task per SIP call that owns its RTP socket and plays the call's leg.
//! - `admission`: who may start a call (allow list, INVITE rate per source, digest).
//! - `link`: what the endpoint and the legs say to each other; `ports`: the RTP port range.
//! - `registrations`: outbound registrations (`[[sip.registrations]]`) the endpoint runs.
//!
//! SIP over TLS's certificates and checks are set up in `crate::tls::sip`.
//!
//! How a SIP leg maps onto a call's leg events and outputs (`call::leg`):
//!
//! | call side | incoming call ([`Uas`]) | outgoing call ([`OutgoingCall`]) |
//! |---|---|---|
//! | new call | `UasEvent::IncomingCall` (Reject 404 if the number has no route) | `OutgoingCall::new` |
//! | ringing | `LegOutput::Ringing` -> `UasAction::Ringing` | `UacEvent::Progress` |
//! | early media | (none sent) | `UacEvent::EarlyMedia` -> the RTP session opens on the 183's SDP, `LegEvent::EarlyMedia`, then its audio before the answer |
//! | answered | `LegOutput::Answered` -> `UasAction::Answer` | `UacEvent::Answered` -> `LegEvent::Answered` |
//! | refused | ring timeout -> `UasAction::Reject { status: 480 }` | `UacEvent::Failed` -> `LegEvent::Rejected` |
//! | hang-up from the phone | `UasEvent::Cancelled` / `Bye` / `AckTimeout` / `SessionExpired` -> `LegEvent::Hangup` | `UacEvent::RemoteHangup` / `SessionExpired` -> `LegEvent::Hangup` |
//! | hang-up from the call | `LegOutput::Hangup` -> `UasAction::Hangup` | `OutgoingCall::hangup` |
//! | audio, DTMF | `rtp::session::RtpSession`: `pop_frame` -> `LegEvent::Audio`, `Received::Dtmf` -> `LegEvent::Dtmf`, `LegOutput::Audio` -> `queue_audio`/`poll_audio` (8 kHz) | same |
//! | DTMF by SIP INFO | `UasEvent::Dtmf` -> `LegEvent::Dtmf` | (not parsed) |
//! | transfer (REFER) | `LegOutput::Refer` -> `UasAction::Refer`; `UasEvent::ReferAnswered` / `ReferProgress` (NOTIFY) -> `LegEvent::ReferAnswered` / `ReferProgress` | (no REFER: 501, the call dials the target) |
//! | media change | `UasEvent::MediaUpdated` -> `RtpSession::set_remote(remote, remote_rtcp, ..)`, `set_ptime(ptime)`, `set_receiving(!remote_hold)`, `set_sending(direction.sends())` | `UacEvent::MediaUpdated` likewise |
//! | RTP timeout | `RtpSession::timed_out` -> `UasAction::Hangup` + `LegEvent::Hangup` | `OutgoingCall::hangup` likewise |
//!
//! [`OutgoingCall`]: telcoflow_sip::sip::uac::OutgoingCall

mod admission;
mod endpoint;
mod link;
mod ports;
mod registrations;
mod rtp_leg;
mod srtp;

use super::{AddressKind, Network, RingError};
use crate::call::{CallHandle, LegId, LegLink};
use crate::config::SipConfig;
use crate::state::Shared;
use link::{COMMAND_QUEUE, Command, LEG_EVENT_QUEUE, LegKey, OutgoingDial, USER_AGENT};
use ports::MediaEnv;
use rtp_leg::{Direction, LegParams};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use telcoflow_proto::SampleRate;
use telcoflow_sip::rtp::ports::PortPool;
use telcoflow_sip::sip::Transport;
use telcoflow_sip::sip::digest::Credentials;
use telcoflow_sip::sip::message::SipUri;
use telcoflow_sip::sip::uac::{DEFAULT_SESSION_EXPIRES, UacConfig};
use telcoflow_sip::sip::uas::{Uas, UasConfig};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, info, info_span, warn};

/// Dials `sip:` destinations for the calls: the SIP edge's [`Network`].
#[derive(Debug)]
pub(crate) struct SipNetwork {
    commands: mpsc::Sender<Command>,
    media: Arc<MediaEnv>,
    config: SipConfig,
    /// `sip:telcoflow@host:port` of this endpoint.
    contact: String,
    sent_by: String,
    /// `host:port` of the TLS listener, if there is one.
    tls_sent_by: Option<String>,
    next_key: AtomicU64,
    /// Outbound registrations, for dialling through their registrars.
    registrations: Vec<registrations::Prepared>,
    /// Where leg tasks are spawned, and what stops them.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Network for SipNetwork {
    fn serves(&self) -> AddressKind {
        AddressKind::Sip
    }

    /// Dials `uri` for `call` as leg `leg`: binds an RTP port, starts the leg task and asks the
    /// endpoint to send the INVITE. The callee's answer arrives as a leg event.
    fn ring(&self, uri: &str, call: &CallHandle, leg: LegId) -> Result<LegLink, RingError> {
        let parsed = SipUri::parse(uri).map_err(|_| RingError::InvalidAddress {
            kind: AddressKind::Sip,
            address: uri.to_owned(),
        })?;
        // `sips:` and `;transport=tls` go over TLS (RFC 3261 26.2.2; 5061 by default).
        let named = match parsed.params.get("transport") {
            _ if parsed.scheme.eq_ignore_ascii_case("sips") => Some(Transport::Tls),
            Some(t) if t.eq_ignore_ascii_case("tls") => Some(Transport::Tls),
            Some(t) if t.eq_ignore_ascii_case("tcp") => Some(Transport::Tcp),
            Some(t) if t.eq_ignore_ascii_case("udp") => Some(Transport::Udp),
            _ => None,
        };
        // A destination on a registrar's host goes through that registration: its
        // credentials (unless a trunk of the same host has its own), its outbound proxy,
        // its address of record as the caller, and, unless the URI names one, its transport
        // (so that a TLS registration's credentials never go out in plain text). Without a
        // port or transport in the URI, the registrar may be on either default port.
        let registration = match (parsed.port, named) {
            (Some(port), _) => self.registration_for(&parsed.host, port),
            (None, Some(Transport::Tls)) => self.registration_for(&parsed.host, 5061),
            (None, Some(_)) => self.registration_for(&parsed.host, 5060),
            (None, None) => self
                .registration_for(&parsed.host, 5060)
                .or_else(|| self.registration_for(&parsed.host, 5061)),
        };
        let transport = named
            .or_else(|| {
                registration.map(|(i, _)| {
                    let r = &self.config.registrations[i];
                    if r.is_tls() {
                        Transport::Tls
                    } else if r.is_tcp() {
                        Transport::Tcp
                    } else {
                        Transport::Udp
                    }
                })
            })
            .unwrap_or(Transport::Udp);
        // Without our TLS listener there is nowhere the callee could reach us over TLS in
        // the dialog: refuse rather than have its BYE and re-INVITE come in plain text.
        if transport == Transport::Tls && self.tls_sent_by.is_none() {
            return Err(RingError::NoTlsListener);
        }
        let default_port = if transport == Transport::Tls {
            5061
        } else {
            5060
        };
        // The registrar's own port when the URI names none.
        let port = parsed
            .port
            .or_else(|| {
                registration
                    .and_then(|(i, _)| self.config.registrations[i].registrar_host_port())
                    .map(|(_, p)| p)
            })
            .unwrap_or(default_port);
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
        let trunk_config = self.config.trunk_for(&host_port);
        let trunk_srtp = trunk_config.and_then(|t| t.srtp.as_deref());
        let trunk = trunk_config
            .filter(|t| !t.username.is_empty())
            .map(|t| Credentials {
                username: t.username.clone(),
                password: t.password.clone(),
            });
        let credentials = trunk.or_else(|| {
            registration
                .and_then(|(i, _)| registrations::credentials(&self.config.registrations[i]))
        });
        let (destination, resolve) = match registration.and_then(|(_, p)| p.proxy) {
            Some(proxy) => (proxy, None),
            None => (destination, resolve),
        };
        // Over TLS the certificate must name the host we connect to: the outbound proxy's
        // when the call goes through one, else the URI's.
        let tls_name = (transport == Transport::Tls).then(|| {
            registration
                .and_then(|(i, _)| self.config.registrations[i].proxy_host_port())
                .map_or_else(|| parsed.host.clone(), |(host, _)| host)
        });
        let from_user = sip_user(&call.from);
        let sockets = self.media.bind().ok_or(RingError::NoMediaPort)?;
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        // The trunk's SRTP policy, else the registration's, else `[sip] srtp`.
        let srtp = self.config.peer_srtp_policy(trunk_srtp.or_else(|| {
            registration.and_then(|(i, _)| self.config.registrations[i].srtp.as_deref())
        }));
        let media = self.media.local_media(sockets.guard.port, srtp);
        let config = UacConfig {
            target: uri.to_owned(),
            destination,
            transport,
            from: match registration {
                Some((_, p)) => p.register.aor.clone(),
                None => format!("sip:{from_user}@{}", self.sent_by),
            },
            // Over TCP and TLS our Contact says so, for the callee's requests in the
            // dialog; over TLS it is our TLS listener (checked above).
            contact: match (transport, &self.tls_sent_by) {
                (Transport::Tcp, _) => format!("{};transport=tcp", self.contact),
                (Transport::Tls, Some(tls)) => telcoflow_sip::sip::tls_contact(
                    "telcoflow",
                    tls,
                    parsed.scheme.eq_ignore_ascii_case("sips"),
                ),
                (Transport::Udp | Transport::Tls, _) => self.contact.clone(),
            },
            sent_by: match (transport, &self.tls_sent_by) {
                (Transport::Tls, Some(tls)) => tls.clone(),
                _ => self.sent_by.clone(),
            },
            credentials,
            timers: self.config.timers(),
            user_agent: USER_AGENT.into(),
            delayed_offer: trunk_config.is_some_and(|t| t.delayed_offer),
            session_expires: Some(DEFAULT_SESSION_EXPIRES),
        };
        let (events_tx, events_rx) = mpsc::channel(LEG_EVENT_QUEUE);
        // The callee picks the codec: the leg tells the call its rate when it answers.
        let (link, pending) = rtp_leg::link(SampleRate::Hz8000);
        let task = pending
            .start(LegParams {
                shutdown: self.shutdown.clone(),
                call: call.clone(),
                leg,
                key: LegKey::Out(key),
                direction: Direction::Outgoing,
                sockets,
                media: media.clone(),
                rtp_timeout: self.media.rtp_timeout,
                commands: self.commands.clone(),
                events: events_rx,
                // Learnt from the dial's destination once it is resolved.
                signalling: None,
                dial: Some(OutgoingDial {
                    key,
                    config: Box::new(config),
                    media,
                    events: events_tx,
                    resolve,
                    tls_name,
                }),
            })
            .map_err(|_| RingError::NoMediaPort)?;
        self.tasks.spawn(task.instrument(info_span!(
            "sip_out",
            call_id = %call.call_id,
            session_id = %call.session_id,
            %uri
        )));
        Ok(link)
    }
}

impl SipNetwork {
    /// The registration whose registrar is `host` (and `port`), with its index in the config.
    fn registration_for(&self, host: &str, port: u16) -> Option<(usize, &registrations::Prepared)> {
        self.config
            .registrations
            .iter()
            .zip(&self.registrations)
            .enumerate()
            .find(|(_, (r, _))| {
                r.registrar_host_port()
                    .is_some_and(|(h, p)| h.eq_ignore_ascii_case(host) && p == port)
            })
            .map(|(i, (_, p))| (i, p))
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

/// The SIP edge with its sockets bound, before the server's shared state exists: its
/// [`SipNetwork`] goes into that state, then [`BoundSip::start`] starts the endpoint task.
pub(crate) struct BoundSip {
    network: Arc<SipNetwork>,
    endpoint: endpoint::Bound,
}

/// Binds the SIP sockets (UDP and TCP on one port, the TLS listener if `tls_listen` is set)
/// and prepares the endpoint. Leg tasks are spawned on `tasks` and stop with `shutdown`.
pub(crate) async fn bind(
    config: SipConfig,
    tls: crate::tls::sip::SipTls,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    metrics: &Arc<crate::metrics::Metrics>,
) -> std::io::Result<BoundSip> {
    // `Config::validate` has refused an exposed listener (`SipConfig::check_exposure`).
    let mut admission = admission::Admission::new(&config, std::time::Instant::now())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    admission.resolve_trunk_names().await;
    let (udp, tcp, local) = bind_udp_tcp(config.listen).await?;
    let tls_listener =
        match config.tls_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("sip.tls_listen {addr}: {e}"))
            })?),
            None => None,
        };
    let tls_local = tls_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let (low, high) = config
        .rtp_port_range()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let pool = PortPool::new(low, high, rand::random())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let codecs = config
        .codec_list()
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
    let tls_sent_by = tls_local.map(|l| format!("{}:{}", host_literal(advertised), l.port()));
    let prepared = registrations::prepare(&config, &sent_by, &sent_by, tls_sent_by.as_deref())
        .await
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let media = Arc::new(MediaEnv::new(
        pool,
        local.ip(),
        advertised,
        config.rtp_timeout(),
        metrics.clone(),
        codecs.clone(),
    ));
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let tcp_limits = endpoint::TcpLimits {
        max_connections: config.tcp_max_connections,
        max_connections_per_ip: config.tcp_max_connections_per_ip,
        message_timeout: config.tcp_message_timeout(),
        idle_timeout: config.tcp_idle_timeout(),
    };
    let network = Arc::new(SipNetwork {
        commands: commands.clone(),
        media: media.clone(),
        config,
        contact: contact.clone(),
        sent_by: sent_by.clone(),
        tls_sent_by: tls_sent_by.clone(),
        registrations: prepared.clone(),
        next_key: AtomicU64::new(1),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    });
    let mut uas = Uas::new(
        UasConfig {
            contact,
            sent_by,
            timers: network.config.timers(),
            user_agent: USER_AGENT.into(),
            codecs,
        },
        rand::random(),
    );
    if let Some(tls) = &tls_sent_by {
        uas.set_tls(tls.clone());
    }
    let endpoint = endpoint::Bound {
        udp,
        tcp,
        tls_listener,
        tls,
        tls_local,
        local,
        uas,
        admission,
        tcp_limits,
        media,
        commands,
        command_rx,
        registrations: prepared,
    };
    Ok(BoundSip { network, endpoint })
}

impl BoundSip {
    /// The network that dials out through this edge.
    pub(crate) fn network(&self) -> Arc<SipNetwork> {
        self.network.clone()
    }

    /// Where the SIP over TLS listener is bound, if there is one.
    pub(crate) fn tls_local(&self) -> Option<SocketAddr> {
        self.endpoint.tls_local
    }

    /// Starts the endpoint task, which takes incoming calls into `shared`. Returns the bound
    /// address.
    pub(crate) fn start(self, shared: &Arc<Shared>) -> SocketAddr {
        let local = self.endpoint.local;
        if let Some(tls) = self.endpoint.tls_local {
            info!(%tls, "SIP listening on tls");
        }
        endpoint::spawn(shared, self.endpoint);
        info!(%local, "SIP listening on udp+tcp");
        local
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_ids_become_safe_sip_users() {
        assert_eq!(sip_user("+15551230001"), "+15551230001");
        assert_eq!(sip_user("Alice <a@b>"), "Aliceab");
        assert_eq!(sip_user(""), "telcoflow");
        assert_eq!(sip_user(" ;"), "telcoflow");
        assert_eq!(host_literal("::1".parse().unwrap()), "[::1]");
        assert_eq!(host_literal("10.0.0.1".parse().unwrap()), "10.0.0.1");
    }
}
