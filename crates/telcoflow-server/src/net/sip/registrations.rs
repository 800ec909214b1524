//! Outbound registrations (`[[sip.registrations]]`): the endpoint task drives one sans-IO
//! [`Registration`] per registrar; this module builds them from the config, keeps what each
//! one last reported on a board (`GET /admin/v1/sip/registrations`, the
//! `telcoflow_sip_registrations` gauge, the logs), and tells dialling which registration a
//! `sip:` destination goes through.

use crate::config::{SipConfig, SipRegistration};
use crate::metrics::Metrics;
use crate::net::registration_board::{RegistrationBoard, RegistrationStatus, unix_now};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use telcoflow_sip::sip::digest::Credentials;
use telcoflow_sip::sip::register::{
    RegisterConfig, RegisterEvent, Registration, RegistrationState,
};
use telcoflow_sip::sip::{Transmit, Transport};
use tracing::{info, warn};

/// How long resolving a registrar's (or proxy's) name may take at startup.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A registration's settings with its addresses resolved, ready to run.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) register: RegisterConfig,
    /// Where `call.connect` through this registration sends its INVITEs when an outbound
    /// proxy is set.
    pub(crate) proxy: Option<SocketAddr>,
    /// Over TLS: the host name the registrar's (or proxy's) certificate must carry.
    pub(crate) tls_name: Option<String>,
}

/// Resolves and builds every `[[sip.registrations]]` entry. A name that does not resolve
/// stops the start with a message naming it: a registration that cannot run is a
/// configuration error, not something to find out from missing calls.
pub(crate) async fn prepare(
    config: &SipConfig,
    sent_by: &str,
    advertised: &str,
    tls_sent_by: Option<&str>,
) -> Result<Vec<Prepared>, String> {
    let mut out = Vec::with_capacity(config.registrations.len());
    for (i, r) in config.registrations.iter().enumerate() {
        let at = format!("[[sip.registrations]] #{}", i + 1);
        let (host, port) = r
            .proxy_host_port()
            .or_else(|| r.registrar_host_port())
            .ok_or_else(|| format!("{at}: no registrar"))?;
        let destination = resolve(&host, port)
            .await
            .map_err(|e| format!("{at}: cannot resolve {host}:{port}: {e}"))?;
        let proxy = r.outbound_proxy.is_some().then_some(destination);
        let user = r.aor_user().unwrap_or_else(|| "telcoflow".into());
        let transport = if r.is_tls() {
            Transport::Tls
        } else if r.is_tcp() {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        let contact = match (transport, tls_sent_by) {
            (Transport::Tcp, _) => format!("sip:{user}@{advertised};transport=tcp"),
            // Over TLS our contact is the TLS listener (config validation requires one):
            // the registrar's calls must reach us over TLS, never in plain text.
            (Transport::Tls, Some(tls)) => {
                telcoflow_sip::sip::tls_contact(&user, tls, r.registrar_uri().starts_with("sips:"))
            }
            (Transport::Tls, None) => {
                return Err(format!("{at}: transport = \"tls\" needs sip.tls_listen"));
            }
            (Transport::Udp, _) => format!("sip:{user}@{advertised}"),
        };
        let route = match &r.outbound_proxy {
            Some(p) if p.starts_with("sip:") || p.starts_with("sips:") => {
                vec![format!("<{p};lr>")]
            }
            Some(p) => vec![format!("<sip:{p};lr>")],
            None => Vec::new(),
        };
        out.push(Prepared {
            register: RegisterConfig {
                registrar: r.registrar_uri(),
                aor: r.aor.clone(),
                contact,
                destination,
                transport,
                route,
                sent_by: match (transport, tls_sent_by) {
                    (Transport::Tls, Some(tls)) => tls.to_owned(),
                    _ => sent_by.to_owned(),
                },
                credentials: credentials(r),
                expires: Duration::from_secs(r.expiry),
                timers: config.timers(),
                user_agent: super::link::USER_AGENT.into(),
            },
            proxy,
            tls_name: (transport == Transport::Tls).then(|| host.clone()),
        });
    }
    Ok(out)
}

/// The digest credentials of a registration, if it has a password.
pub(crate) fn credentials(r: &SipRegistration) -> Option<Credentials> {
    let password = r.password.clone()?;
    let username = r
        .username
        .clone()
        .or_else(|| r.aor_user())
        .unwrap_or_default();
    Some(Credentials { username, password })
}

async fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let mut addrs = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS timed out"))??;
    addrs
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}

/// The registrations the endpoint task runs, with their board.
pub(super) struct Registrations {
    running: Vec<Registration>,
    /// Over TLS, the name each registrar's (or proxy's) certificate must carry.
    tls_names: Vec<Option<Arc<str>>>,
    /// The state each one last reported (for the gauge's move), kept here rather than read
    /// back from the board under its lock on every drain.
    reported: Vec<&'static str>,
    board: Arc<RegistrationBoard>,
    metrics: Arc<Metrics>,
}

impl Registrations {
    /// Starts every registration: their first REGISTERs are queued at once.
    pub(super) fn start(
        prepared: Vec<Prepared>,
        board: Arc<RegistrationBoard>,
        metrics: Arc<Metrics>,
        now: std::time::Instant,
    ) -> Self {
        let tls_names = prepared
            .iter()
            .map(|p| p.tls_name.as_deref().map(Arc::from))
            .collect();
        let running: Vec<Registration> = prepared
            .into_iter()
            .map(|p| Registration::new(p.register, rand::random(), now))
            .collect();
        board.reset(
            running
                .iter()
                .map(|r| RegistrationStatus {
                    registrar: r.config().registrar.clone(),
                    aor: r.config().aor.clone(),
                    transport: match r.config().transport {
                        Transport::Udp => "udp",
                        Transport::Tcp => "tcp",
                        Transport::Tls => "tls",
                    },
                    state: r.state().name(),
                    expires_secs: None,
                    last_status: None,
                    reason: None,
                    retry_in_secs: None,
                    since: unix_now(),
                })
                .collect(),
        );
        for r in &running {
            metrics.sip_registration_moved(None, r.state().name());
        }
        Self {
            reported: running.iter().map(|r| r.state().name()).collect(),
            running,
            tls_names,
            board,
            metrics,
        }
    }

    /// Whether there are none.
    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Passes `bytes` to the registration whose Call-ID it is; false if none.
    pub(super) fn handle_input(
        &mut self,
        call_id: &str,
        bytes: &[u8],
        now: std::time::Instant,
    ) -> bool {
        match self.running.iter_mut().find(|r| r.call_id() == call_id) {
            Some(r) => {
                r.handle_input(bytes, now);
                true
            }
            None => false,
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<std::time::Instant> {
        self.running
            .iter()
            .filter_map(Registration::poll_timeout)
            .min()
    }

    pub(super) fn handle_timeout(&mut self, now: std::time::Instant) {
        for r in &mut self.running {
            if r.poll_timeout().is_some_and(|t| t <= now) {
                r.handle_timeout(now);
            }
        }
    }

    /// The connection `key` to a registrar failed: the REGISTERs on their way over it fail
    /// with `reason` (and are retried later).
    pub(super) fn transport_failed(
        &mut self,
        key: &(Transport, SocketAddr, Option<Arc<str>>),
        reason: &str,
        now: std::time::Instant,
    ) {
        for (r, name) in self.running.iter_mut().zip(&self.tls_names) {
            let (transport, destination, verified) = key;
            if (r.config().transport, r.config().destination) == (*transport, *destination)
                && (*transport != Transport::Tls || verified == name)
            {
                r.transport_failed(reason, now);
            }
        }
    }

    /// Removes every binding (shutdown).
    pub(super) fn unregister_all(&mut self, now: std::time::Instant) {
        for r in &mut self.running {
            r.unregister(now);
        }
    }

    /// Whether every binding is removed and nothing is left to send.
    pub(super) fn all_finished(&self) -> bool {
        self.running.iter().all(Registration::is_finished)
    }

    /// What the registrations want sent, each with the name the TLS peer must be verified
    /// as; their state changes go to the board, the gauge and the log.
    pub(super) fn drain(&mut self, out: &mut Vec<(Transmit, Option<Arc<str>>)>) {
        for (i, r) in self.running.iter_mut().enumerate() {
            while let Some(t) = r.poll_transmit() {
                out.push((t, self.tls_names[i].clone()));
            }
            while let Some(RegisterEvent::State(state)) = r.poll_event() {
                let config = r.config();
                match &state {
                    RegistrationState::Registered { expires } => info!(
                        registrar = %config.registrar,
                        aor = %config.aor,
                        expires_secs = expires.as_secs(),
                        "SIP registration in place"
                    ),
                    RegistrationState::Failed {
                        status,
                        reason,
                        retry_in,
                    } => warn!(
                        registrar = %config.registrar,
                        aor = %config.aor,
                        status,
                        %reason,
                        retry_in_secs = retry_in.as_secs(),
                        "SIP registration failed; retrying"
                    ),
                    other => info!(
                        registrar = %config.registrar,
                        aor = %config.aor,
                        state = other.name(),
                        "SIP registration"
                    ),
                }
                self.metrics
                    .sip_registration_moved(Some(self.reported[i]), state.name());
                self.reported[i] = state.name();
                self.board.set(i, &state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tls_registration_has_the_tls_contact_and_a_sips_proxy_route() {
        let config = SipConfig {
            registrations: vec![SipRegistration {
                registrar: "sips:127.0.0.1".into(),
                aor: "sip:+15550100@127.0.0.1".into(),
                username: None,
                password: None,
                expiry: 120,
                transport: "tls".into(),
                outbound_proxy: Some("sips:127.0.0.2:5071".into()),
                srtp: None,
            }],
            ..SipConfig::default()
        };
        let prepared = prepare(
            &config,
            "192.0.2.1:5060",
            "192.0.2.1:5060",
            Some("192.0.2.1:5061"),
        )
        .await
        .unwrap();
        let p = &prepared[0];
        assert_eq!(p.register.route, ["<sips:127.0.0.2:5071;lr>"]);
        assert_eq!(p.register.contact, "sips:+15550100@192.0.2.1:5061");
        assert_eq!(p.register.sent_by, "192.0.2.1:5061");
        assert_eq!(p.register.destination, "127.0.0.2:5071".parse().unwrap());
        assert_eq!(p.tls_name.as_deref(), Some("127.0.0.2"));
        // Without the TLS listener there is no Contact to give: refused.
        let e = prepare(&config, "192.0.2.1:5060", "192.0.2.1:5060", None)
            .await
            .unwrap_err();
        assert!(e.contains("needs sip.tls_listen"), "{e}");
    }
}
