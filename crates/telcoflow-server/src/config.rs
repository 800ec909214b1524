//! Server configuration: listen address, connectors and their numbers, limits, timers.
//!
//! Read from TOML (see `docs/config.md`), or [`Config::development`] for the embedded defaults:
//! one development connector with well-known credentials that every number is routed to.

/// Settings from `TELCOFLOW_<SECTION>_<KEY>` environment variables.
pub mod env;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use telcoflow_sip::rtp::codec::Codec;
use telcoflow_sip::sip::sdp::SrtpPolicy;
use telcoflow_sip::sip::transaction::Timers;

/// API key of the development connector.
pub const DEV_API_KEY: &str = "dev-api-key";
/// UUID of the development connector.
pub const DEV_CONNECTOR_UUID: &str = "00000000-0000-4000-8000-000000000001";
/// Where `call.connect` rings by default in development: a simulated phone registered here.
pub const DEV_CONNECT_DESTINATION: &str = "+15550100";
/// Longest number or address (caller, callee, registered number, `remoteAddress`) accepted
/// from a phone or an agent, in characters: the SIP edge's limit on numbers, so that a number
/// taken over SIP is never refused elsewhere.
pub const MAX_ADDRESS_LEN: usize = telcoflow_sip::sip::message::MAX_NUMBER_LEN;

/// Why a number or address given at the edge is refused, if it is: longer than
/// [`MAX_ADDRESS_LEN`] characters. `field` names it in the message.
pub(crate) fn check_address(field: &str, value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_ADDRESS_LEN {
        return Err(format!(
            "{field} is longer than {MAX_ADDRESS_LEN} characters (the limit for numbers and addresses)"
        ));
    }
    Ok(())
}

/// The length of the scheme of a `sip:` or `sips:` URI (leading spaces included); `None` for
/// anything else.
pub(crate) fn sip_scheme_len(destination: &str) -> Option<usize> {
    let d = destination.trim_start();
    let skipped = destination.len() - d.len();
    ["sip:", "sips:"]
        .into_iter()
        .find(|s| d.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)))
        .map(|s| skipped + s.len())
}

/// Closed sessions kept per connector by default (`limits.max_closed_sessions_per_connector`).
pub const DEFAULT_MAX_CLOSED_SESSIONS: usize = 1000;

/// Everything the server needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP/WebSocket listener. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Base URL that clients use to reach this server (`ws://host:port`), used in the media URLs
    /// handed out in `call.in`. Default: derived from the bound listen address.
    pub public_url: Option<String>,
    /// How long a call may ring before it is given up (unclaimed or unanswered), in seconds.
    /// Default 30.
    pub ring_timeout_secs: u64,
    /// How long a media token stays valid after `call.in`, in seconds. Default 300.
    pub media_token_ttl_secs: u64,
    /// Secret that signs media tokens. Default: random per process.
    pub token_secret: Option<String>,
    /// How often the server pings each control connection, in seconds. Default 30.
    pub control_ping_interval_secs: u64,
    /// A control connection with no frame and no pong for this long is closed as dead, in
    /// seconds. Default 75.
    pub control_idle_timeout_secs: u64,
    /// How long a draining server (SIGTERM, or `POST /admin/v1/drain`) lets its calls run
    /// before it ends those still going, in seconds. Default 30; 0 ends them at once.
    pub drain_grace_secs: u64,
    /// How long a draining server keeps a control connection whose agent has claimed a
    /// session and not opened its media yet, so that an answer under way is not lost, in
    /// seconds (never past the grace). Default 5.
    pub drain_handover_secs: u64,
    /// A token that authorizes the admin routes (`Authorization: Bearer <token>`); once set,
    /// connectors' API keys no longer do. Default: none (any connector's key).
    pub admin_token: Option<String>,
    /// TLS for the listener; with it the server serves `wss://` and `https://` only.
    pub tls: Option<TlsConfig>,
    /// Resource limits.
    pub limits: Limits,
    /// The connectors (applications) this server serves.
    pub connectors: Vec<ConnectorConfig>,
    /// The SIP/RTP edge; without it the server takes calls from simulated phones only.
    pub sip: Option<SipConfig>,
    /// The simulated phone endpoint (`[sim]`).
    pub sim: SimConfig,
    /// Several nodes sharing one registry through NATS (`[cluster]`); without it the server
    /// keeps its registry in memory, alone.
    pub cluster: Option<ClusterConfig>,
    /// The Prometheus endpoint `GET /metrics` (`[metrics]`).
    pub metrics: MetricsConfig,
    /// Call recording (`[recording]`); without it nothing is recorded and `call.record` is
    /// refused.
    pub recording: Option<RecordingConfig>,
}

/// Call recording (`[recording]`): where the files go, how long they are kept, how many calls
/// a node records at once. Connectors with `record = true` record every call; others record
/// when the agent sends `call.record`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecordingConfig {
    /// Directory of the recordings (`<id>.wav` and `<id>.json`), created if missing.
    pub dir: PathBuf,
    /// Finished recordings older than this are deleted, in days. Default 30; 0 keeps them
    /// until deleted over the HTTP API.
    #[serde(default = "RecordingConfig::default_retention_days")]
    pub retention_days: u64,
    /// Recordings running at once on this node; a start beyond it is refused
    /// (`QUOTA_EXCEEDED`, or a warning for a connector that records by config). Default 100.
    #[serde(default = "RecordingConfig::default_max_concurrent")]
    pub max_concurrent: usize,
}

impl RecordingConfig {
    /// Recordings in `dir`, with the default retention and concurrency.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            retention_days: Self::default_retention_days(),
            max_concurrent: Self::default_max_concurrent(),
        }
    }

    fn default_retention_days() -> u64 {
        30
    }

    fn default_max_concurrent() -> usize {
        100
    }

    /// How long finished recordings are kept; `None`: until deleted.
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_days > 0).then(|| Duration::from_secs(self.retention_days * 86_400))
    }
}

/// The Prometheus endpoint `GET /metrics` (`[metrics]`): open to loopback clients, to others
/// with `Authorization: Bearer <token>` when a token is set.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics`. Default true.
    pub enabled: bool,
    /// The bearer token clients other than loopback must present. Default: none (loopback
    /// only).
    pub token: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            token: None,
        }
    }
}

impl std::fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("MetricsConfig")
            .field("enabled", &self.enabled)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Membership of a cluster of nodes that serve as one (`[cluster]`, or `telcoflow serve
/// --cluster URL --node-id NAME`); see docs/cluster.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS server with JetStream (`nats://host:port`).
    pub nats_url: String,
    /// This node's name, unique in the cluster: `[A-Za-z0-9_-]+`, since it appears in NATS
    /// subjects and keys.
    pub node_id: String,
    /// NATS authentication by token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// NATS authentication by user and password (both or neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// NATS authentication by a credentials file (JWT and NKey seed, `.creds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// PEM file of the CAs that sign the NATS server's certificate; TLS is then required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// This node's client certificate and key (PEM), for a NATS server that verifies clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

impl ClusterConfig {
    /// Membership through the NATS server at `nats_url`, without authentication or TLS.
    pub fn new(nats_url: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            node_id: node_id.into(),
            token: None,
            user: None,
            password: None,
            credentials_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let ways = [
            self.token.is_some(),
            self.user.is_some() || self.password.is_some(),
            self.credentials_file.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err(ConfigError::Invalid(
                "cluster: give one of token, user and password, or credentials_file".into(),
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(ConfigError::Invalid(
                "cluster.user and cluster.password go together".into(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "cluster.tls_cert and cluster.tls_key go together".into(),
            ));
        }
        let valid_id = !self.node_id.is_empty()
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_id {
            return Err(ConfigError::Invalid(format!(
                "cluster.node_id must be letters, digits, '_' and '-' (it names NATS subjects and keys), got {:?}",
                self.node_id
            )));
        }
        if !self.nats_url.starts_with("nats://") && !self.nats_url.starts_with("tls://") {
            return Err(ConfigError::Invalid(format!(
                "cluster.nats_url must be nats://HOST:PORT (or tls://HOST:PORT), got {:?}",
                self.nats_url
            )));
        }
        Ok(())
    }
}

/// The simulated phone endpoint `/v1/sim/phone` (`[sim]`): a development tool, off in a
/// configuration file unless enabled.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Accept simulated phones. Default false in a file; [`Config::development`] turns it on.
    pub enabled: bool,
    /// Set by [`Config::development`], never read from a file: on a loopback listen address,
    /// phones may connect without credentials. Anywhere else a phone authenticates as a
    /// connector and reaches only that connector's numbers.
    #[serde(skip)]
    pub development: bool,
}

impl SimConfig {
    /// The embedded development setting: enabled, open to unauthenticated phones on loopback.
    pub fn development() -> Self {
        Self {
            enabled: true,
            development: true,
        }
    }
}

/// The SIP user agent (`[sip]`): where it listens, its RTP ports, and trunks for dialling out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SipConfig {
    /// UDP and TCP address of the SIP listener (the same port for both). Default
    /// `127.0.0.1:5060`.
    pub listen: SocketAddr,
    /// RTP port range `LOW-HIGH`; each call takes one even port. Default `20000-20999`.
    pub rtp_ports: String,
    /// Address announced in SDP and Contact (the NAT's public address). Default: the listen
    /// address (127.0.0.1 when listening on all interfaces).
    pub public_ip: Option<IpAddr>,
    /// A call whose peer sends no RTP for this long ends, in seconds. Default 30.
    pub rtp_timeout_secs: u64,
    /// Trunks `call.connect` may dial through, with their digest credentials.
    pub trunks: Vec<SipTrunk>,
    /// Source networks (CIDR, or single addresses) whose INVITEs are taken; INVITEs from
    /// anywhere else get `403 Forbidden`. `["0.0.0.0/0", "::/0"]` takes every source. Default:
    /// not set, which takes every source but is refused on a non-loopback `listen` without
    /// `accounts` (see [`SipConfig::check_exposure`]).
    pub allow: Option<Vec<String>>,
    /// Callers that must authenticate: with any account set, every INVITE must answer a
    /// digest challenge (`401`) with one of these user names and passwords.
    pub accounts: Vec<SipAccount>,
    /// Realm named in digest challenges. Default `telcoflow`.
    pub realm: String,
    /// INVITEs (new calls) taken from one source address per `invite_rate_interval_secs`;
    /// the excess gets `503` with `Retry-After`. 0 turns the limit off. Default 20.
    pub invite_rate_limit: u32,
    /// The interval of `invite_rate_limit`, in seconds. Default 1.
    pub invite_rate_interval_secs: u64,
    /// A SIP/TCP connection whose partly received message does not complete within this
    /// long is closed, in seconds. Default 10.
    pub tcp_message_timeout_secs: u64,
    /// A SIP/TCP connection with nothing read or written for this long is closed, in
    /// seconds, unless an incoming call signalled over it is still up; CRLF keep-alives
    /// (RFC 5626) count as activity. Default 300.
    pub tcp_idle_timeout_secs: u64,
    /// SIP/TCP connections open at once, accepted and dialled together; further
    /// connections are closed as soon as they are accepted. Default 256.
    pub tcp_max_connections: usize,
    /// SIP/TCP connections accepted from one source address (IPv6: one /64) at once;
    /// further connections from it are closed as soon as they are accepted. Default 32.
    pub tcp_max_connections_per_ip: usize,
    /// RFC 3261's T1 (round-trip estimate), in milliseconds: the first retransmission
    /// interval, and 64·T1 bounds a transaction (an unanswered request, a 200 never ACKed).
    /// 10 to 4000 (T2). Default 500.
    pub timer_t1_ms: u64,
    /// Audio codecs of SIP calls, among `PCMU`, `PCMA` and `G722` (wideband, 16 kHz), in
    /// order of preference: calls we place offer them in this order, and an incoming offer is
    /// answered with the first of these it has, where PCMU and PCMA rank together (between
    /// them, the caller's order holds). Default `["PCMU", "PCMA", "G722"]`: G.722 is offered
    /// after G.711 and taken only from callers that offer no G.711; list `G722` first to
    /// prefer it.
    pub codecs: Vec<String>,
    /// Registrars this server registers at (`[[sip.registrations]]`), so that a trunk or a
    /// hosted PBX sends the calls of an address of record here.
    pub registrations: Vec<SipRegistration>,
    /// Address of the SIP over TLS listener (conventionally port 5061). Default: not set,
    /// no TLS listener; `sips:` and `;transport=tls` destinations are dialled either way.
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener. Default: `[tls] cert`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener. Default: `[tls] key`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that the certificates of the peers we dial over TLS must chain
    /// to. Default: the public web PKI roots (webpki-roots).
    pub tls_ca: Option<PathBuf>,
    /// Whether the certificates of the peers we dial over TLS are checked (chain to
    /// `tls_ca`, name the host dialled, in date). Default true; `false` is for tests and
    /// peers with self-made certificates only.
    pub tls_verify: bool,
    /// SRTP with SDES keys (`a=crypto`) for calls of peers without an `srtp` of their own:
    /// `off` (plain RTP; `RTP/SAVP` offers get `488`), `optional` (SRTP when the caller
    /// offers it; our offers carry `a=crypto` on `RTP/AVP`) or `required` (plain offers get
    /// `488`; our offers are `RTP/SAVP`). Default `off`.
    pub srtp: String,
}

/// The SRTP policy an `srtp` setting names (`at`: where, for the error).
fn srtp_policy(value: &str, at: &str) -> Result<SrtpPolicy, ConfigError> {
    SrtpPolicy::from_name(value.trim()).ok_or_else(|| {
        ConfigError::Invalid(format!(
            "{at} srtp must be \"off\", \"optional\" or \"required\", got {value:?}"
        ))
    })
}

/// An outbound registration (`[[sip.registrations]]`): the server binds its contact to `aor`
/// at `registrar`, refreshes the binding before it expires and removes it on shutdown.
/// Calls the registrar sends to that contact are routed by the AOR's user part (the number),
/// like any other; `call.connect` to a `sip:` URI on the registrar's host dials with these
/// credentials, through `outbound_proxy` when set.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipRegistration {
    /// The registrar: `sip:host[:port]` or `host[:port]` (port 5060 by default, 5061 over
    /// TLS).
    pub registrar: String,
    /// The address of record, `sip:user@domain`: its user part is the number calls to it
    /// arrive for.
    pub aor: String,
    /// Digest user name (default: the AOR's user part).
    #[serde(default)]
    pub username: Option<String>,
    /// Digest password; without one, a challenge fails the registration.
    #[serde(default)]
    pub password: Option<String>,
    /// Lifetime of the binding to ask for, in seconds: 60 to 86400. Default 3600.
    #[serde(default = "default_registration_expiry")]
    pub expiry: u64,
    /// `udp` (default), `tcp` or `tls` (port 5061 by default).
    #[serde(default = "default_registration_transport")]
    pub transport: String,
    /// Where to send instead of the registrar (`sip:host[:port]` or `host[:port]`): the
    /// REGISTERs, and the INVITEs of `call.connect` through this registration.
    #[serde(default)]
    pub outbound_proxy: Option<String>,
    /// SRTP policy (`off`, `optional`, `required`) for calls to and from this registration
    /// (its AOR's number); default `[sip] srtp`.
    #[serde(default)]
    pub srtp: Option<String>,
}

fn default_registration_expiry() -> u64 {
    3600
}

fn default_registration_transport() -> String {
    "udp".into()
}

impl std::fmt::Debug for SipRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("SipRegistration")
            .field("registrar", &self.registrar)
            .field("aor", &self.aor)
            .field("username", &self.username)
            .field("expiry", &self.expiry)
            .field("transport", &self.transport)
            .field("outbound_proxy", &self.outbound_proxy)
            .field("srtp", &self.srtp)
            .finish_non_exhaustive()
    }
}

/// A SIP address as a registration names it: `sip:host[:port]` or `host[:port]`, with
/// `default_port` when it names none.
fn sip_host_port(value: &str, default_port: u16) -> Option<(String, u16)> {
    let uri = if value.starts_with("sip:") || value.starts_with("sips:") {
        value.to_owned()
    } else {
        format!("sip:{value}")
    };
    let parsed = telcoflow_sip::sip::message::SipUri::parse(&uri).ok()?;
    if parsed.host.is_empty() {
        return None;
    }
    Some((parsed.host, parsed.port.unwrap_or(default_port)))
}

impl SipRegistration {
    /// The registrar's host and port.
    pub fn registrar_host_port(&self) -> Option<(String, u16)> {
        sip_host_port(&self.registrar, self.default_port())
    }

    /// 5061 over TLS, else 5060.
    fn default_port(&self) -> u16 {
        if self.is_tls() { 5061 } else { 5060 }
    }

    /// The outbound proxy's host and port, if one is set.
    pub fn proxy_host_port(&self) -> Option<(String, u16)> {
        self.outbound_proxy
            .as_deref()
            .and_then(|p| sip_host_port(p, self.default_port()))
    }

    /// The registrar as a Request-URI: `sip:host[:port]`.
    pub fn registrar_uri(&self) -> String {
        if self.registrar.starts_with("sip:") || self.registrar.starts_with("sips:") {
            self.registrar.clone()
        } else {
            format!("sip:{}", self.registrar)
        }
    }

    /// The AOR's user part (the number calls to it arrive for).
    pub fn aor_user(&self) -> Option<String> {
        telcoflow_sip::sip::message::SipUri::parse(&self.aor)
            .ok()?
            .user
            .filter(|u| !u.is_empty())
    }

    /// Whether it uses TCP.
    pub fn is_tcp(&self) -> bool {
        self.transport.eq_ignore_ascii_case("tcp")
    }

    /// Whether it uses TLS.
    pub fn is_tls(&self) -> bool {
        self.transport.eq_ignore_ascii_case("tls")
    }

    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let at = format!("[[sip.registrations]] #{}", index + 1);
        let invalid = |m: String| Err(ConfigError::Invalid(format!("{at}: {m}")));
        if self.registrar_host_port().is_none() {
            return invalid(format!(
                "registrar must be sip:host[:port] or host[:port], got {:?}",
                self.registrar
            ));
        }
        if !self.aor.starts_with("sip:") || self.aor_user().is_none() {
            return invalid(format!(
                "aor must be a sip: URI with a user part (sip:user@domain), got {:?}",
                self.aor
            ));
        }
        if !(60..=86_400).contains(&self.expiry) {
            return invalid(format!(
                "expiry must be 60 to 86400 seconds, got {}",
                self.expiry
            ));
        }
        if !(self.transport.eq_ignore_ascii_case("udp") || self.is_tcp() || self.is_tls()) {
            return invalid(format!(
                "transport must be \"udp\", \"tcp\" or \"tls\", got {:?}",
                self.transport
            ));
        }
        // A `sips:` URI asks for TLS all the way (RFC 5630).
        let sips = |uri: &str| {
            uri.get(..5)
                .is_some_and(|s| s.eq_ignore_ascii_case("sips:"))
        };
        if !self.is_tls()
            && (sips(&self.registrar) || self.outbound_proxy.as_deref().is_some_and(sips))
        {
            return invalid(format!(
                "a sips: registrar or outbound_proxy needs transport = \"tls\", got {:?}",
                self.transport
            ));
        }
        if self.password.is_some() && self.username.as_deref() == Some("") {
            return invalid("username must not be empty".into());
        }
        if let Some(proxy) = &self.outbound_proxy {
            if sip_host_port(proxy, 5060).is_none() {
                return invalid(format!(
                    "outbound_proxy must be sip:host[:port] or host[:port], got {proxy:?}"
                ));
            }
        }
        Ok(())
    }
}

/// A caller's credentials (`[[sip.accounts]]`), checked by digest authentication.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipAccount {
    /// Digest user name.
    pub username: String,
    /// Digest password.
    pub password: String,
    /// SRTP policy (`off`, `optional`, `required`) for calls this account makes; default
    /// `[sip] srtp`.
    #[serde(default)]
    pub srtp: Option<String>,
}

impl std::fmt::Debug for SipAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("SipAccount")
            .field("username", &self.username)
            .field("srtp", &self.srtp)
            .finish_non_exhaustive()
    }
}

/// A SIP trunk: `sip:` connect destinations whose host is `host` authenticate with these
/// credentials when challenged, and are dialled the way the trunk asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipTrunk {
    /// `host` or `host:port`, as written in the destination URIs.
    pub host: String,
    /// Digest user name (empty: calls through the trunk answer no challenge).
    #[serde(default)]
    pub username: String,
    /// Digest password.
    #[serde(default)]
    pub password: String,
    /// Send INVITEs without SDP (delayed offer): the trunk offers in its 200 and the server
    /// answers in the ACK.
    #[serde(default)]
    pub delayed_offer: bool,
    /// SRTP policy (`off`, `optional`, `required`) for calls dialled through this trunk and
    /// calls from its host (an INVITE whose source address is `host`); default `[sip] srtp`.
    #[serde(default)]
    pub srtp: Option<String>,
}

impl Default for SipConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5060)),
            rtp_ports: "20000-20999".into(),
            public_ip: None,
            rtp_timeout_secs: 30,
            trunks: Vec::new(),
            allow: None,
            accounts: Vec::new(),
            realm: "telcoflow".into(),
            invite_rate_limit: 20,
            invite_rate_interval_secs: 1,
            tcp_message_timeout_secs: 10,
            tcp_idle_timeout_secs: 300,
            tcp_max_connections: 256,
            tcp_max_connections_per_ip: 32,
            timer_t1_ms: 500,
            codecs: Codec::ALL
                .iter()
                .map(|c| c.encoding_name().to_owned())
                .collect(),
            registrations: Vec::new(),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_verify: true,
            srtp: SrtpPolicy::Off.as_str().into(),
        }
    }
}

impl SipConfig {
    /// The RTP port range as `(low, high)`.
    pub fn rtp_port_range(&self) -> Result<(u16, u16), ConfigError> {
        let bad = || {
            ConfigError::Invalid(format!(
                "sip.rtp_ports must be LOW-HIGH with 1024 <= LOW < HIGH <= 65535, got {:?}",
                self.rtp_ports
            ))
        };
        let (low, high) = self.rtp_ports.split_once('-').ok_or_else(bad)?;
        let low: u16 = low.trim().parse().map_err(|_| bad())?;
        let high: u16 = high.trim().parse().map_err(|_| bad())?;
        if low < 1024 || low >= high {
            return Err(bad());
        }
        Ok((low, high))
    }

    /// The default SRTP policy (`srtp`).
    pub fn srtp_policy(&self) -> Result<SrtpPolicy, ConfigError> {
        srtp_policy(&self.srtp, "sip.srtp:")
    }

    /// A peer's SRTP policy: its own `srtp` when set, else `[sip] srtp` (`Off` if invalid,
    /// which validation refuses at start).
    pub fn peer_srtp_policy(&self, own: Option<&str>) -> SrtpPolicy {
        own.map_or_else(|| self.srtp_policy(), |v| srtp_policy(v, ""))
            .unwrap_or_default()
    }

    /// The `codecs` list parsed, in its order.
    pub fn codec_list(&self) -> Result<Vec<Codec>, ConfigError> {
        let mut codecs = Vec::with_capacity(self.codecs.len());
        for name in &self.codecs {
            let codec = Codec::from_name(name.trim()).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "sip.codecs entries must be \"PCMU\", \"PCMA\" or \"G722\", got {name:?}"
                ))
            })?;
            if codecs.contains(&codec) {
                return Err(ConfigError::Invalid(format!(
                    "sip.codecs lists {codec} twice"
                )));
            }
            codecs.push(codec);
        }
        if codecs.is_empty() {
            return Err(ConfigError::Invalid(
                "sip.codecs must list at least one codec".into(),
            ));
        }
        Ok(codecs)
    }

    /// The `allow` list parsed: `None` when not set.
    pub fn allow_networks(&self) -> Result<Option<Vec<ipnet::IpNet>>, ConfigError> {
        let Some(allow) = &self.allow else {
            return Ok(None);
        };
        allow
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::Invalid(format!(
                            "sip.allow entries must be CIDR networks or addresses (\"192.0.2.0/24\", \"198.51.100.7\"), got {entry:?}"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Refuses a SIP listener that anyone on a network could call unchecked: a `listen`
    /// address that is not loopback with neither an `allow` list nor `accounts`.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        let loopback =
            self.listen.ip().is_loopback() && self.tls_listen.is_none_or(|a| a.ip().is_loopback());
        if loopback || self.allow.is_some() || !self.accounts.is_empty() {
            return Ok(());
        }
        Err(ConfigError::Invalid(format!(
            "SIP listens on {} with no [sip] allow list and no [[sip.accounts]]: anyone who can \
             reach it could place calls to your connectors. Set `allow = [\"203.0.113.0/24\"]` \
             under [sip] to the networks of your trunks and PBXs, add [[sip.accounts]] with a \
             username and password that callers must authenticate with, or set \
             `allow = [\"0.0.0.0/0\", \"::/0\"]` to take calls from anywhere",
            match self.tls_listen {
                Some(tls) if self.listen.ip().is_loopback() => tls,
                _ => self.listen,
            }
        )))
    }

    /// The `invite_rate_interval_secs` as a duration.
    pub fn invite_rate_interval(&self) -> Duration {
        Duration::from_secs(self.invite_rate_interval_secs)
    }

    /// The `tcp_message_timeout_secs` as a duration.
    pub fn tcp_message_timeout(&self) -> Duration {
        Duration::from_secs(self.tcp_message_timeout_secs)
    }

    /// The `tcp_idle_timeout_secs` as a duration.
    pub fn tcp_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.tcp_idle_timeout_secs)
    }

    /// The SIP transaction timers: `timer_t1_ms`, and RFC 3261's defaults for T2 and T4.
    pub fn timers(&self) -> Timers {
        Timers {
            t1: Duration::from_millis(self.timer_t1_ms),
            ..Default::default()
        }
    }

    /// RTP inactivity timeout as a duration.
    pub fn rtp_timeout(&self) -> Duration {
        Duration::from_secs(self.rtp_timeout_secs)
    }

    /// The address put in SDP and Contact.
    pub fn advertised_ip(&self) -> IpAddr {
        match self.public_ip {
            Some(ip) => ip,
            None if self.listen.ip().is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            None => self.listen.ip(),
        }
    }

    /// The trunk whose host matches a destination URI's `host[:port]`.
    pub fn trunk_for(&self, host_port: &str) -> Option<&SipTrunk> {
        let host_only = host_port.split(':').next().unwrap_or(host_port);
        self.trunks
            .iter()
            .find(|t| t.host.eq_ignore_ascii_case(host_port))
            .or_else(|| {
                self.trunks
                    .iter()
                    .find(|t| t.host.eq_ignore_ascii_case(host_only))
            })
    }
}

/// Certificate and key of the listener, and optionally the CA that client certificates must
/// chain to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
    /// PEM CA certificates for client certificates (mTLS). Without it, client certificates are
    /// matched by fingerprint alone.
    #[serde(default)]
    pub client_ca: Option<std::path::PathBuf>,
}

/// One connector: credentials, the numbers routed to it and where `call.connect` rings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Connector UUID (`x-connector-uuid`).
    pub uuid: String,
    /// API key (`x-api-key`).
    pub api_key: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Called numbers routed to this connector; `"*"` routes every number no other connector
    /// claims.
    #[serde(default)]
    pub numbers: Vec<String>,
    /// `call.connect` destination per called number: a simulated phone's number, or a SIP URI
    /// (`sip:+200@pbx.example:5060`) dialled through the `[sip]` user agent.
    #[serde(default)]
    pub connect: BTreeMap<String, String>,
    /// `call.connect` destination for called numbers not in `connect`.
    #[serde(default)]
    pub connect_default: Option<String>,
    /// SHA-256 fingerprint (hex) of a client certificate that authenticates as this connector
    /// over mTLS, instead of the API key.
    #[serde(default)]
    pub client_cert_sha256: Option<String>,
    /// Number used as the caller id of outbound calls (`session.create`).
    #[serde(default)]
    pub outbound_caller_id: Option<String>,
    /// Record every call of this connector from its answer to its end (needs
    /// `[recording]`). Default false: calls are recorded when the agent asks
    /// (`call.record`).
    #[serde(default)]
    pub record: bool,
    /// Targets `call.transfer` may send this connector's calls to, beyond its `connect`
    /// destinations (which it may always transfer to): each entry an exact address
    /// (`sip:+15550100@pbx.example`, `+15550100`) or a prefix ending in `*`
    /// (`sip:*` is any SIP URI, `+1555*`).
    #[serde(default)]
    pub transfer_targets: Vec<String>,
}

/// Resource limits. Each one, when reached, gives a clear error rather than a panic or an
/// unbounded queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest control-connection frame accepted, in bytes. Default 64 KiB.
    pub max_control_frame_bytes: usize,
    /// Largest media-connection frame accepted, in bytes. Default 256 KiB.
    pub max_media_frame_bytes: usize,
    /// Control connections one connector may hold open at once. Default 32.
    pub max_control_connections_per_connector: usize,
    /// Calls one connector may have at once. Default 1000.
    pub max_calls_per_connector: usize,
    /// Commands one call may have waiting for an outcome (e.g. `call.connect`). Default 16.
    pub max_pending_commands_per_call: usize,
    /// Frames queued towards one control connection before it is dropped as too slow.
    /// Default 1024.
    pub control_send_queue: usize,
    /// Frames queued towards one media connection; beyond it the agent is told it is too slow.
    /// Default 512 (about 10 s of audio).
    pub media_send_queue: usize,
    /// Agent audio the server holds beyond what it asked for, in milliseconds. Default 1000.
    pub max_playout_ms: u32,
    /// After a stall (the agent's or the server's), drop the agent's live audio that the stall
    /// left standing, up to the silence it caused, so that the delay does not stay for the
    /// rest of the call; every drop is logged and reported as `call.audio_skipped`. Default
    /// true; false keeps every frame and lets the delay stand.
    pub catch_up_after_stall: bool,
    /// Closed sessions kept (for `GET /public/v1/sessions`) per connector; beyond it the
    /// oldest closed one is forgotten first. Default [`DEFAULT_MAX_CLOSED_SESSIONS`].
    pub max_closed_sessions_per_connector: usize,
    /// Console live views (`/console/v1/live`) one connector may have open on a node at once;
    /// beyond it a new one is closed with 1008. Default 8.
    pub max_console_views_per_connector: usize,

    // Connections and deadlines of the HTTP/WebSocket listener.
    /// Connections the listener holds at once (HTTP, control, media and simulated phones
    /// together); beyond it new connections are refused at once. Default 10000.
    pub max_connections: usize,
    /// Connections one source address holds at once (IPv6: one /64 prefix). Default 2000:
    /// above `max_calls_per_connector`, so an agent host behind one address can hold a media
    /// connection for each of its calls besides its control connections.
    pub max_connections_per_ip: usize,
    /// A new connection must finish its TLS handshake, and every HTTP request must bring its
    /// headers, within this many seconds; a silent connection is closed by the same deadline.
    /// Default 10.
    pub header_read_timeout_secs: u64,
    /// A socket write that makes no progress for this many seconds closes the connection (a
    /// client that stopped reading). Default 10.
    pub write_timeout_secs: u64,
}

impl Limits {
    /// The header (and TLS handshake) deadline as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }

    /// The socket write deadline as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_control_frame_bytes: 64 * 1024,
            max_media_frame_bytes: 256 * 1024,
            max_control_connections_per_connector: 32,
            max_calls_per_connector: 1000,
            max_pending_commands_per_call: 16,
            control_send_queue: 1024,
            media_send_queue: 512,
            max_playout_ms: 1000,
            catch_up_after_stall: true,
            max_closed_sessions_per_connector: DEFAULT_MAX_CLOSED_SESSIONS,
            max_console_views_per_connector: 8,

            max_connections: 10_000,
            max_connections_per_ip: 2000,
            header_read_timeout_secs: 10,
            write_timeout_secs: 10,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            ring_timeout_secs: 30,
            media_token_ttl_secs: 300,
            token_secret: None,
            control_ping_interval_secs: 30,
            control_idle_timeout_secs: 75,
            drain_grace_secs: 30,
            drain_handover_secs: 5,
            admin_token: None,
            tls: None,
            limits: Limits::default(),
            connectors: Vec::new(),
            sip: None,
            sim: SimConfig::default(),
            cluster: None,
            metrics: MetricsConfig::default(),
            recording: None,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid configuration: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A `TELCOFLOW_*` environment variable names no setting, or its value is malformed.
    #[error("invalid environment variable {variable}: {message}")]
    Env {
        /// The variable.
        variable: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// The embedded defaults: one development connector ([`DEV_API_KEY`],
    /// [`DEV_CONNECTOR_UUID`]) that every number is routed to, with `call.connect` ringing
    /// [`DEV_CONNECT_DESTINATION`].
    pub fn development() -> Self {
        Self {
            connectors: vec![ConnectorConfig::development(
                DEV_API_KEY,
                DEV_CONNECTOR_UUID,
            )],
            sim: SimConfig::development(),
            ..Self::default()
        }
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.ring_timeout_secs == 0 {
            return invalid("ring_timeout_secs must be at least 1".into());
        }
        if self.media_token_ttl_secs == 0 {
            return invalid("media_token_ttl_secs must be at least 1".into());
        }
        if self.control_ping_interval_secs == 0 || self.control_idle_timeout_secs == 0 {
            return invalid(
                "control_ping_interval_secs and control_idle_timeout_secs must be at least 1"
                    .into(),
            );
        }
        if self.token_secret.as_deref().is_some_and(str::is_empty) {
            // An empty key would sign media tokens that anyone can forge.
            return invalid(
                "token_secret must not be empty (leave it out for a random one)".into(),
            );
        }
        if self.connectors.is_empty() {
            return invalid("at least one [[connectors]] entry is required".into());
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.connectors {
            if c.uuid.is_empty() || c.api_key.is_empty() {
                return invalid("every connector needs a non-empty uuid and api_key".into());
            }
            if !seen.insert(c.uuid.as_str()) {
                return invalid(format!("connector {} is listed twice", c.uuid));
            }
            c.validate_addresses(self.sip.is_some())?;
        }
        let l = &self.limits;
        for (name, v) in [
            ("max_control_frame_bytes", l.max_control_frame_bytes),
            ("max_media_frame_bytes", l.max_media_frame_bytes),
            (
                "max_control_connections_per_connector",
                l.max_control_connections_per_connector,
            ),
            ("max_calls_per_connector", l.max_calls_per_connector),
            (
                "max_pending_commands_per_call",
                l.max_pending_commands_per_call,
            ),
            ("control_send_queue", l.control_send_queue),
            ("media_send_queue", l.media_send_queue),
            (
                "max_closed_sessions_per_connector",
                l.max_closed_sessions_per_connector,
            ),
            (
                "max_console_views_per_connector",
                l.max_console_views_per_connector,
            ),
            ("max_connections", l.max_connections),
            ("max_connections_per_ip", l.max_connections_per_ip),
        ] {
            if v == 0 {
                return invalid(format!("limits.{name} must be at least 1"));
            }
        }
        if l.header_read_timeout_secs == 0 || l.write_timeout_secs == 0 {
            return invalid(
                "limits.header_read_timeout_secs and limits.write_timeout_secs must be at least 1"
                    .into(),
            );
        }
        if l.max_playout_ms < 100 {
            return invalid("limits.max_playout_ms must be at least 100".into());
        }
        if let Some(recording) = &self.recording {
            if recording.dir.as_os_str().is_empty() {
                return invalid("recording.dir must not be empty".into());
            }
            if recording.max_concurrent == 0 {
                return invalid("recording.max_concurrent must be at least 1".into());
            }
        }
        if let Some(c) = self.connectors.iter().find(|c| c.record) {
            if self.recording.is_none() {
                return invalid(format!(
                    "connector {} has record = true, but recording is off: add a [recording] \
                     section with a dir",
                    c.uuid
                ));
            }
        }
        if let Some(sip) = &self.sip {
            sip.rtp_port_range()?;
            if sip.rtp_timeout_secs == 0 {
                return invalid("sip.rtp_timeout_secs must be at least 1".into());
            }
            sip.srtp_policy()?;
            for t in &sip.trunks {
                if t.host.is_empty() {
                    return invalid("every [[sip.trunks]] needs a host".into());
                }
                if t.username.is_empty() && !t.password.is_empty() {
                    return invalid("a [[sip.trunks]] password needs a username".into());
                }
                if let Some(v) = &t.srtp {
                    srtp_policy(v, &format!("[[sip.trunks]] {}:", t.host))?;
                }
            }
            for (i, r) in sip.registrations.iter().enumerate() {
                r.validate(i)?;
                if r.is_tls() && sip.tls_listen.is_none() {
                    // Our Contact must be a TLS listener: else the registrar's calls and
                    // requests in their dialogs would come in plain text.
                    return invalid(format!(
                        "[[sip.registrations]] #{}: transport = \"tls\" needs sip.tls_listen",
                        i + 1
                    ));
                }
                if let Some(v) = &r.srtp {
                    srtp_policy(v, &format!("[[sip.registrations]] #{}:", i + 1))?;
                }
            }
            for a in &sip.accounts {
                if a.username.is_empty() || a.password.is_empty() {
                    return invalid(
                        "every [[sip.accounts]] needs a username and a password".into(),
                    );
                }
                if let Some(v) = &a.srtp {
                    srtp_policy(v, &format!("[[sip.accounts]] {}:", a.username))?;
                }
            }
            sip.allow_networks()?;
            sip.codec_list()?;
            for (name, v) in [
                ("invite_rate_interval_secs", sip.invite_rate_interval_secs),
                ("tcp_message_timeout_secs", sip.tcp_message_timeout_secs),
                ("tcp_idle_timeout_secs", sip.tcp_idle_timeout_secs),
                ("tcp_max_connections", sip.tcp_max_connections as u64),
                (
                    "tcp_max_connections_per_ip",
                    sip.tcp_max_connections_per_ip as u64,
                ),
            ] {
                if v == 0 {
                    return invalid(format!("sip.{name} must be at least 1"));
                }
            }
            if !(10..=4000).contains(&sip.timer_t1_ms) {
                return invalid("sip.timer_t1_ms must be 10 to 4000".into());
            }
            if sip.realm.is_empty() || sip.realm.contains(['"', '\\']) {
                return invalid(
                    "sip.realm must be non-empty, without quotes or backslashes".into(),
                );
            }
            // As loading takes them: both `sip.tls_cert` and `sip.tls_key`, or neither and
            // `[tls]`'s; one without the other is a mistake even when `[tls]` is there.
            if sip.tls_listen.is_some()
                && !matches!(
                    (&sip.tls_cert, &sip.tls_key, &self.tls),
                    (Some(_), Some(_), _) | (None, None, Some(_))
                )
            {
                return invalid(
                    "sip.tls_listen needs a certificate and key: set sip.tls_cert and \
                     sip.tls_key, or [tls] cert and key"
                        .into(),
                );
            }
            sip.check_exposure()?;
        }
        Ok(())
    }

    /// Ring timeout as a duration.
    pub fn ring_timeout(&self) -> Duration {
        Duration::from_secs(self.ring_timeout_secs)
    }

    /// Control ping interval as a duration.
    pub fn control_ping_interval(&self) -> Duration {
        Duration::from_secs(self.control_ping_interval_secs)
    }

    /// Drain grace as a duration.
    pub fn drain_grace(&self) -> Duration {
        Duration::from_secs(self.drain_grace_secs)
    }

    /// How long a draining node's control connection waits for its agent to open the media
    /// of sessions it claimed before it is closed: never past the drain grace.
    pub fn drain_handover(&self) -> Duration {
        Duration::from_secs(self.drain_handover_secs.min(self.drain_grace_secs))
    }

    /// Control idle timeout as a duration.
    pub fn control_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.control_idle_timeout_secs)
    }

    /// Media token lifetime as a duration.
    pub fn media_token_ttl(&self) -> Duration {
        Duration::from_secs(self.media_token_ttl_secs)
    }
}

impl ConnectorConfig {
    /// A connector that takes every number and connects to [`DEV_CONNECT_DESTINATION`].
    pub fn development(api_key: &str, uuid: &str) -> Self {
        Self {
            uuid: uuid.to_owned(),
            api_key: api_key.to_owned(),
            name: Some("development".into()),
            numbers: vec!["*".into()],
            connect: BTreeMap::new(),
            connect_default: Some(DEV_CONNECT_DESTINATION.into()),
            client_cert_sha256: None,
            outbound_caller_id: Some("+15550000".into()),
            record: false,
            transfer_targets: Vec::new(),
        }
    }

    /// Whether `call.transfer` may send a call of this connector to `target`: one of its
    /// `connect` destinations, or a match of its `transfer_targets`.
    pub fn may_transfer_to(&self, target: &str) -> bool {
        let connect = self.connect.values().chain(&self.connect_default);
        connect.into_iter().any(|d| d.trim() == target)
            || self
                .transfer_targets
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => target.starts_with(prefix),
                    None => pattern == target,
                })
    }

    /// Checks the UUID and the addresses `call.connect` would ring: a well-formed UUID, no
    /// empty `sip:` URI, no `sip:` destination without the `[sip]` section, none too long.
    fn validate_addresses(&self, sip_on: bool) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if uuid::Uuid::parse_str(&self.uuid).is_err() {
            return invalid(format!(
                "connectors.uuid must be a UUID (e.g. 7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01), got {:?}",
                self.uuid
            ));
        }
        let destinations = self
            .connect
            .iter()
            .map(|(called, d)| (format!("connectors.connect[{called:?}]"), d))
            .chain(
                self.connect_default
                    .iter()
                    .map(|d| ("connectors.connect_default".to_owned(), d)),
            );
        for (field, destination) in destinations {
            let d = destination.trim();
            let scheme = sip_scheme_len(d);
            let is_sip = scheme.is_some();
            if d.is_empty() || scheme.is_some_and(|n| d[n..].trim().is_empty()) {
                return invalid(format!(
                    "{field} of connector {} is an empty address ({destination:?})",
                    self.uuid
                ));
            }
            if is_sip && !sip_on {
                return invalid(format!(
                    "{field} of connector {} is the SIP URI {destination:?}, but SIP is off: add a [sip] section (or --sip)",
                    self.uuid
                ));
            }
            if let Err(why) = check_address(&field, destination) {
                return invalid(format!("connector {}: {why}", self.uuid));
            }
        }
        for pattern in &self.transfer_targets {
            let len = pattern.chars().count();
            let star = pattern.find('*');
            if len == 0
                || len > telcoflow_proto::media::MAX_TRANSFER_TARGET_LEN
                || star.is_some_and(|at| at + 1 != pattern.len())
                || pattern.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return invalid(format!(
                    "connectors.transfer_targets of connector {} has {pattern:?}: an address of 1 to {} characters without blanks, with `*` only at its end",
                    self.uuid,
                    telcoflow_proto::media::MAX_TRANSFER_TARGET_LEN
                ));
            }
        }
        Ok(())
    }

    /// Where `call.connect` rings for a call to `called`.
    pub fn connect_destination(&self, called: &str) -> Option<&str> {
        self.connect
            .get(called)
            .or(self.connect_default.as_ref())
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_takes_a_dir_and_a_connector_records_only_with_it() {
        let base = "[[connectors]]\nuuid = '7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01'\napi_key = 'k'\n";
        let config =
            Config::from_toml(&format!("[recording]\ndir = '/r'\n{base}record = true\n")).unwrap();
        let recording = config.recording.as_ref().unwrap();
        assert_eq!(recording.retention_days, 30);
        assert_eq!(recording.max_concurrent, 100);
        assert_eq!(
            recording.retention(),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert!(config.connectors[0].record);
        assert!(!Config::from_toml(base).unwrap().connectors[0].record);
        let e = Config::from_toml(&format!("{base}record = true\n")).unwrap_err();
        assert!(e.to_string().contains("[recording]"), "{e}");
        let e = Config::from_toml(&format!("[recording]\ndir = ''\n{base}")).unwrap_err();
        assert!(e.to_string().contains("recording.dir"), "{e}");
        let e = Config::from_toml(&format!(
            "[recording]\ndir = '/r'\nmax_concurrent = 0\n{base}"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("recording.max_concurrent"), "{e}");
        let keep = Config::from_toml(&format!(
            "[recording]\ndir = '/r'\nretention_days = 0\n{base}"
        ))
        .unwrap();
        assert_eq!(keep.recording.unwrap().retention(), None);
    }

    #[test]
    fn parses_toml_with_defaults() {
        let config = Config::from_toml(
            r#"
            listen = "127.0.0.1:9000"
            ring_timeout_secs = 5
            [limits]
            max_calls_per_connector = 2
            [[connectors]]
            uuid = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01"
            api_key = "k1"
            numbers = ["+100"]
            connect = { "+100" = "+200" }
            "#,
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.limits.max_calls_per_connector, 2);
        assert_eq!(config.limits.max_pending_commands_per_call, 16);
        assert_eq!(
            config.connectors[0].connect_destination("+100"),
            Some("+200")
        );
        assert_eq!(config.connectors[0].connect_destination("+101"), None);
    }

    #[test]
    fn documented_example_parses() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc
            .find("```toml")
            .expect("docs/config.md has a toml block")
            + "```toml".len();
        let end = start + doc[start..].find("```").expect("closed block");
        let config = Config::from_toml(&doc[start..end]).expect("documented example is valid");
        assert_eq!(
            config.connectors[0].connect_destination("+4420700000002"),
            Some("+4420700000098")
        );
        assert_eq!(config.limits.max_media_frame_bytes, 262_144);
    }

    #[test]
    fn parses_cluster_section_and_checks_node_id() {
        let connector = r#"
            [[connectors]]
            uuid = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01"
            api_key = "k1"
            "#;
        let config = Config::from_toml(&format!(
            "[cluster]\nnats_url = \"nats://127.0.0.1:4222\"\nnode_id = \"node-a_1\"\n{connector}"
        ))
        .unwrap();
        let cluster = config.cluster.expect("cluster section");
        assert_eq!(cluster.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(cluster.node_id, "node-a_1");
        assert!(Config::from_toml(connector).unwrap().cluster.is_none());
        for bad in ["", "a.b", "a b", "n*", "n>"] {
            let err = Config::from_toml(&format!(
                "[cluster]\nnats_url = \"nats://127.0.0.1:4222\"\nnode_id = {bad:?}\n{connector}"
            ))
            .unwrap_err();
            assert!(
                err.to_string().contains("cluster.node_id"),
                "{bad:?}: {err}"
            );
        }
        let err = Config::from_toml(&format!(
            "[cluster]\nnats_url = \"http://x\"\nnode_id = \"a\"\n{connector}"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("cluster.nats_url"), "{err}");
        let with = |extra: &str| {
            Config::from_toml(&format!(
                "[cluster]\nnats_url = \"tls://n:4222\"\nnode_id = \"a\"\n{extra}\n{connector}"
            ))
        };
        let cluster = with("user = \"u\"\npassword = \"p\"\ntls_ca = \"/etc/ca.pem\"")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(cluster.user.as_deref(), Some("u"));
        assert_eq!(cluster.tls_ca, Some(PathBuf::from("/etc/ca.pem")));
        for (bad, says) in [
            ("user = \"u\"", "go together"),
            ("tls_cert = \"c.pem\"", "go together"),
            ("token = \"t\"\ncredentials_file = \"x.creds\"", "one of"),
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_sip_section() {
        let config = Config::from_toml(
            r#"
            [sip]
            listen = "127.0.0.1:5070"
            rtp_ports = "30000-30100"
            public_ip = "203.0.113.7"
            rtp_timeout_secs = 10
            [[sip.trunks]]
            host = "trunk.example:5080"
            username = "acme"
            password = "secret"
            [[connectors]]
            uuid = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01"
            api_key = "k1"
            numbers = ["+100", "+101"]
            connect = { "+100" = "sip:+200@127.0.0.1:5070", "+101" = "+201" }
            "#,
        )
        .unwrap();
        let sip = config.sip.as_ref().unwrap();
        assert_eq!(sip.listen.port(), 5070);
        assert_eq!(sip.rtp_port_range().unwrap(), (30000, 30100));
        assert_eq!(sip.advertised_ip().to_string(), "203.0.113.7");
        assert_eq!(sip.rtp_timeout(), Duration::from_secs(10));
        assert_eq!(
            sip.trunk_for("trunk.example:5080").unwrap().username,
            "acme"
        );
        assert!(sip.trunk_for("other.example").is_none());
        let c = &config.connectors[0];
        assert_eq!(
            c.connect_destination("+100"),
            Some("sip:+200@127.0.0.1:5070")
        );
        assert_eq!(c.connect_destination("+101"), Some("+201"));
        let defaults = SipConfig::default();
        assert_eq!(defaults.rtp_port_range().unwrap(), (20000, 20999));
        assert_eq!(defaults.rtp_timeout_secs, 30);
    }

    #[test]
    fn a_trunk_may_ask_for_a_delayed_offer_alone() {
        let sip = |trunk: &str| {
            Config::from_toml(&format!(
                "[sip]\nlisten = \"127.0.0.1:5070\"\n[[sip.trunks]]\n{trunk}\n\
                 [[connectors]]\nuuid = \"7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01\"\n\
                 api_key = \"k1\"\nnumbers = [\"+100\"]\n"
            ))
        };
        let config = sip("host = \"cucm.example\"\ndelayed_offer = true").unwrap();
        let trunk = config
            .sip
            .as_ref()
            .unwrap()
            .trunk_for("cucm.example")
            .unwrap();
        assert!(trunk.delayed_offer);
        assert!(trunk.username.is_empty());
        let config = sip("host = \"t.example\"\nusername = \"u\"\npassword = \"p\"").unwrap();
        assert!(!config.sip.unwrap().trunks[0].delayed_offer);
        let err = sip("host = \"t.example\"\npassword = \"p\"").unwrap_err();
        assert!(err.to_string().contains("needs a username"), "{err}");
        let err = sip("host = \"\"").unwrap_err();
        assert!(err.to_string().contains("needs a host"), "{err}");
    }

    #[test]
    fn documented_sip_example_parses() {
        let doc = include_str!("../../../docs/sip.md");
        let start = doc.find("```toml").expect("docs/sip.md has a toml block") + "```toml".len();
        let end = start + doc[start..].find("```").expect("closed block");
        let config = Config::from_toml(&doc[start..end]).expect("documented example is valid");
        let sip = config.sip.as_ref().expect("[sip] section");
        assert_eq!(sip.rtp_port_range().unwrap(), (20000, 20999));
        assert_eq!(
            sip.trunk_for("sip.carrier.example")
                .map(|t| t.username.as_str()),
            Some("acme")
        );
        assert_eq!(
            config.connectors[0].connect_destination("+4420700000002"),
            Some("+15550100")
        );
    }

    #[test]
    fn transfer_targets_are_connect_destinations_and_listed_patterns() {
        let config = Config::from_toml(
            r#"
            [[connectors]]
            uuid = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01"
            api_key = "k1"
            connect = { "+100" = "+200" }
            transfer_targets = ["+1555*", "sip:desk@pbx.example"]
            "#,
        )
        .unwrap();
        let c = &config.connectors[0];
        assert!(c.may_transfer_to("+200"));
        assert!(c.may_transfer_to("+15550100"));
        assert!(c.may_transfer_to("sip:desk@pbx.example"));
        assert!(!c.may_transfer_to("sip:desk@pbx.example:5070"));
        assert!(!c.may_transfer_to("+1666"));
        assert!(!c.may_transfer_to("+20"));
        for bad in [
            "\"\"",
            "\"+1*5\"",
            "\"sip:a b\"",
            &format!("{:?}", "1".repeat(257)),
        ] {
            let text = format!(
                "[[connectors]]\nuuid='7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01'\napi_key='k'\ntransfer_targets=[{bad}]\n"
            );
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains("transfer_targets"), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_bad_sip_values() {
        let base = "[[connectors]]\nuuid='7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01'\napi_key='k'\n";
        for bad in [
            "rtp_ports = '2000'",
            "rtp_ports = '3000-2000'",
            "rtp_ports = '80-90'",
            "rtp_timeout_secs = 0",
        ] {
            let text = format!("[sip]\n{bad}\n{base}");
            assert!(Config::from_toml(&text).is_err(), "{bad}");
        }
        let ok = format!("[sip]\nrtp_ports = '20000-20010'\n{base}");
        Config::from_toml(&ok).unwrap();
        let ok = format!("[sip]\ntimer_t1_ms = 50\n{base}");
        let t1 = Config::from_toml(&ok).unwrap().sip.unwrap().timers().t1;
        assert_eq!(t1, Duration::from_millis(50));
        for bad in [
            "allow = ['10.0.0.0/33']",
            "allow = ['pbx.example']",
            "invite_rate_interval_secs = 0",
            "tcp_message_timeout_secs = 0",
            "tcp_idle_timeout_secs = 0",
            "tcp_max_connections = 0",
            "tcp_max_connections_per_ip = 0",
            "timer_t1_ms = 0",
            "timer_t1_ms = 5000",
            "realm = ''",
            "[[sip.accounts]]\nusername = 'a'\npassword = ''",
        ] {
            let text = format!("[sip]\n{bad}\n{base}");
            assert!(Config::from_toml(&text).is_err(), "{bad}");
        }
        let sip = SipConfig {
            allow: Some(vec!["192.0.2.0/24".into(), " 2001:db8::1 ".into()]),
            ..SipConfig::default()
        };
        let nets = sip.allow_networks().unwrap().unwrap();
        assert!(nets[0].contains(&"192.0.2.200".parse::<IpAddr>().unwrap()));
        assert!(!nets[0].contains(&"192.0.3.1".parse::<IpAddr>().unwrap()));
        assert!(nets[1].contains(&"2001:db8::1".parse::<IpAddr>().unwrap()));
        assert_eq!(SipConfig::default().allow_networks().unwrap(), None);
    }

    #[test]
    fn sip_codecs_are_checked_and_keep_their_order() {
        assert_eq!(
            SipConfig::default().codec_list().unwrap(),
            vec![Codec::Pcmu, Codec::Pcma, Codec::G722]
        );
        let base = "[[connectors]]\nuuid='7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01'\napi_key='k'\n";
        let text = format!("[sip]\ncodecs = ['g722', 'PCMA']\n{base}");
        let sip = Config::from_toml(&text).unwrap().sip.unwrap();
        assert_eq!(sip.codec_list().unwrap(), vec![Codec::G722, Codec::Pcma]);
        for bad in ["[]", "['G729']", "['PCMU', 'pcmu']"] {
            let text = format!("[sip]\ncodecs = {bad}\n{base}");
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains("sip.codecs"), "{bad}: {err}");
        }
    }

    #[test]
    fn sip_on_a_public_address_needs_an_allow_list_or_accounts() {
        let base = "[[connectors]]\nuuid='7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01'\napi_key='k'\n";
        let open = format!("[sip]\nlisten = '0.0.0.0:5060'\n{base}");
        let err = Config::from_toml(&open).unwrap_err().to_string();
        assert!(err.contains("allow = [\"0.0.0.0/0\""), "{err}");
        assert!(err.contains("[[sip.accounts]]"), "{err}");
        for ok in [
            "[sip]\nlisten = '0.0.0.0:5060'\nallow = ['0.0.0.0/0']",
            "[sip]\nlisten = '192.0.2.1:5060'\nallow = ['198.51.100.0/24']",
            "[sip]\nlisten = '0.0.0.0:5060'\n[[sip.accounts]]\nusername = 'a'\npassword = 'p'",
            "[sip]\nlisten = '127.0.0.1:5060'",
            "[sip]\nlisten = '[::1]:5060'",
        ] {
            Config::from_toml(&format!("{ok}\n{base}")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_bad_values() {
        assert!(
            Config::from_toml("ring_timeout_secs = 0\n[[connectors]]\nuuid='7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01'\napi_key='k'")
                .is_err()
        );
        assert!(Config::from_toml("bogus = 1").is_err());
        assert!(Config::from_toml("").is_err(), "no connectors");
        Config::development().validate().unwrap();
    }

    const UUID: &str = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01";

    fn connector_toml(extra: &str) -> String {
        format!("[[connectors]]\nuuid = '{UUID}'\napi_key = 'k'\n{extra}\n")
    }

    fn invalid_message(text: &str) -> String {
        match Config::from_toml(text) {
            Err(ConfigError::Invalid(m)) => m,
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_token_secret_is_refused() {
        let m = invalid_message(&format!("token_secret = ''\n{}", connector_toml("")));
        assert!(m.contains("token_secret"), "{m}");
        Config::from_toml(&format!("token_secret = 's'\n{}", connector_toml(""))).unwrap();
    }

    #[test]
    fn a_connector_uuid_must_be_a_uuid() {
        let m = invalid_message("[[connectors]]\nuuid = 'not-a-uuid'\napi_key = 'k'\n");
        assert!(m.contains("connectors.uuid"), "{m}");
        assert!(m.contains("not-a-uuid"), "{m}");
    }

    #[test]
    fn sip_over_tls_needs_a_certificate_and_counts_as_exposed() {
        let sip = |fields: &str| format!("[sip]\n{fields}\n{}", connector_toml(""));
        let config = Config::from_toml(&sip(
            "tls_listen = '127.0.0.1:5061'\ntls_cert = 'c.pem'\ntls_key = 'k.pem'",
        ))
        .unwrap();
        let s = config.sip.as_ref().unwrap();
        assert_eq!(s.tls_listen, Some("127.0.0.1:5061".parse().unwrap()));
        assert!(s.tls_verify, "checked by default");
        assert!(s.tls_ca.is_none());
        // [tls]'s certificate and key stand in for tls_cert and tls_key.
        Config::from_toml(&format!(
            "[tls]\ncert = 'c'\nkey = 'k'\n{}",
            sip("tls_listen = '127.0.0.1:5061'")
        ))
        .unwrap();
        let m = invalid_message(&sip("tls_listen = '127.0.0.1:5061'\ntls_cert = 'c.pem'"));
        assert!(
            m.contains("sip.tls_listen needs a certificate and key"),
            "{m}"
        );
        // An exposed TLS listener needs allow or accounts, as an exposed listen does.
        let m = invalid_message(&sip(
            "tls_listen = '0.0.0.0:5061'\ntls_cert = 'c'\ntls_key = 'k'",
        ));
        assert!(m.contains("0.0.0.0:5061"), "{m}");
        // `[tls]` does not make up for a missing half: loading would refuse it too.
        let m = invalid_message(&format!(
            "[tls]\ncert = 'c'\nkey = 'k'\n{}",
            sip("tls_listen = '127.0.0.1:5061'\ntls_cert = 'c.pem'")
        ));
        assert!(
            m.contains("sip.tls_listen needs a certificate and key"),
            "{m}"
        );
        // A TLS registration needs our TLS listener, for the registrar's calls to us.
        let registration = "[[sip.registrations]]\nregistrar = 'sips:pbx.example.com'\naor = 'sip:1@pbx.example.com'";
        let m = invalid_message(&sip(&format!("{registration}\ntransport = 'tls'")));
        assert!(
            m.contains("#1") && m.contains("transport = \"tls\" needs sip.tls_listen"),
            "{m}"
        );
        // A sips: registrar is refused over UDP or TCP.
        let listener = "tls_listen = '127.0.0.1:5061'\ntls_cert = 'c'\ntls_key = 'k'";
        for transport in ["udp", "tcp"] {
            let m = invalid_message(&sip(&format!(
                "{listener}\n{registration}\ntransport = '{transport}'"
            )));
            assert!(m.contains("sips: registrar"), "{m}");
        }
        // A TLS registration defaults to port 5061 (and sips: registrars parse).
        let config = Config::from_toml(&sip(&format!(
            "{listener}\n{registration}\ntransport = 'TLS'"
        )))
        .unwrap();
        let r = &config.sip.as_ref().unwrap().registrations[0];
        assert!(r.is_tls());
        assert_eq!(
            r.registrar_host_port(),
            Some(("pbx.example.com".into(), 5061))
        );
        assert_eq!(r.registrar_uri(), "sips:pbx.example.com");
    }

    #[test]
    fn srtp_policies_parse_per_peer_and_bad_ones_name_where() {
        let sip = |extra: &str| {
            format!(
                "[sip]\nlisten = '127.0.0.1:5070'\nsrtp = 'optional'\n{extra}\n{}",
                connector_toml("")
            )
        };
        let config = Config::from_toml(&sip(
            "[[sip.trunks]]\nhost = 't.example'\nusername = 'u'\npassword = 'p'\nsrtp = 'required'",
        ))
        .unwrap();
        let s = config.sip.as_ref().unwrap();
        assert_eq!(s.srtp_policy().unwrap(), SrtpPolicy::Optional);
        assert_eq!(
            s.peer_srtp_policy(s.trunks[0].srtp.as_deref()),
            SrtpPolicy::Required
        );
        assert_eq!(s.peer_srtp_policy(None), SrtpPolicy::Optional);
        assert_eq!(SipConfig::default().srtp_policy().unwrap(), SrtpPolicy::Off);
        for (extra, says) in [
            (
                "[[sip.accounts]]\nusername = 'a'\npassword = 'p'\nsrtp = 'yes'",
                "[[sip.accounts]] a",
            ),
            (
                "[[sip.registrations]]\nregistrar = 'pbx'\naor = 'sip:a@b'\nsrtp = 'sdes'",
                "[[sip.registrations]] #1",
            ),
        ] {
            let err = Config::from_toml(&sip(extra)).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("srtp"), "{err}");
        }
        let err = Config::from_toml(&format!(
            "[sip]\nlisten = '127.0.0.1:5070'\nsrtp = 'always'\n{}",
            connector_toml("")
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("sip.srtp"), "{err}");
    }

    #[test]
    fn sip_registrations_parse_with_defaults_and_bad_ones_say_what_is_wrong() {
        let reg = |fields: &str| {
            format!(
                "[sip]\nlisten = '127.0.0.1:5070'\n[[sip.registrations]]\n{fields}\n{}",
                connector_toml("")
            )
        };
        let config = Config::from_toml(&reg(
            "registrar = 'pbx.example.com:5080'\naor = 'sip:+4420700000001@pbx.example.com'\npassword = 's3cret'",
        ))
        .unwrap();
        let r = &config.sip.as_ref().unwrap().registrations[0];
        assert_eq!(r.expiry, 3600);
        assert!(!r.is_tcp());
        assert_eq!(r.registrar_uri(), "sip:pbx.example.com:5080");
        assert_eq!(
            r.registrar_host_port(),
            Some(("pbx.example.com".into(), 5080))
        );
        assert_eq!(r.aor_user().as_deref(), Some("+4420700000001"));
        assert!(!format!("{r:?}").contains("s3cret"), "{r:?}");
        for (fields, says) in [
            ("registrar = 'sip:'\naor = 'sip:a@b'", "registrar"),
            ("registrar = 'pbx'\naor = 'sip:pbx'", "aor"),
            ("registrar = 'pbx'\naor = 'sip:a@b'\nexpiry = 59", "expiry"),
            (
                "registrar = 'pbx'\naor = 'sip:a@b'\ntransport = 'sctp'",
                "transport",
            ),
            (
                "registrar = 'pbx'\naor = 'sip:a@b'\noutbound_proxy = 'sip:'",
                "outbound_proxy",
            ),
        ] {
            let m = invalid_message(&reg(fields));
            assert!(
                m.contains("[[sip.registrations]] #1") && m.contains(says),
                "{m}"
            );
        }
    }

    #[test]
    fn an_empty_sip_uri_is_refused_with_its_field() {
        let sip = "[sip]\nlisten = '127.0.0.1:5070'\n";
        let m = invalid_message(&format!(
            "{sip}{}",
            connector_toml("connect_default = 'sip:'")
        ));
        assert!(m.contains("connectors.connect_default"), "{m}");
        assert!(m.contains("empty"), "{m}");
        let m = invalid_message(&format!(
            "{sip}{}",
            connector_toml("connect = { '+100' = 'SIP:  ' }")
        ));
        assert!(m.contains("connectors.connect[\"+100\"]"), "{m}");
    }

    #[test]
    fn sip_destinations_need_sip() {
        let m = invalid_message(&connector_toml("connect_default = 'sip:+200@pbx.example'"));
        assert!(m.contains("connectors.connect_default"), "{m}");
        assert!(m.contains("SIP is off"), "{m}");
        let m = invalid_message(&connector_toml(
            "connect = { '+100' = 'sip:+200@pbx.example' }",
        ));
        assert!(m.contains("connectors.connect[\"+100\"]"), "{m}");
        // With [sip] the same destinations are fine.
        Config::from_toml(&format!(
            "[sip]\n{}",
            connector_toml("connect_default = 'sip:+200@pbx.example'")
        ))
        .unwrap();
    }

    #[test]
    fn over_long_destinations_are_refused() {
        let long = "9".repeat(MAX_ADDRESS_LEN + 1);
        let m = invalid_message(&connector_toml(&format!("connect_default = '{long}'")));
        assert!(m.contains("longer than 64"), "{m}");
        let ok = "9".repeat(MAX_ADDRESS_LEN);
        Config::from_toml(&connector_toml(&format!("connect_default = '{ok}'"))).unwrap();
    }

    #[test]
    fn sim_is_off_in_a_file_and_on_in_development() {
        let config = Config::from_toml(&connector_toml("")).unwrap();
        assert!(!config.sim.enabled);
        assert_eq!(
            config.limits.max_closed_sessions_per_connector,
            DEFAULT_MAX_CLOSED_SESSIONS
        );
        let config =
            Config::from_toml(&format!("[sim]\nenabled = true\n{}", connector_toml(""))).unwrap();
        assert!(config.sim.enabled);
        assert!(
            !config.sim.development,
            "a file never opens the sim endpoint to anyone"
        );
        assert!(
            Config::from_toml(&format!(
                "[sim]\ndevelopment = true\n{}",
                connector_toml("")
            ))
            .is_err()
        );
        let dev = Config::development();
        assert!(dev.sim.enabled && dev.sim.development);
        assert!(
            Config::from_toml(&format!(
                "[limits]\nmax_closed_sessions_per_connector = 0\n{}",
                connector_toml("")
            ))
            .is_err()
        );
    }
}
