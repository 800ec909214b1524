//! Client configuration: credentials, server URL, audio settings, timers and reconnection.

use crate::ConfigError;
use crate::transport::Tls;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use telcoflow_proto::{AudioMode, SampleRate};

/// Base URL of a server running on this machine with its default settings.
pub const LOCAL_BASE_URL: &str = "ws://127.0.0.1:8080";
/// Base URL of the hosted Telcoflow service.
pub const PRODUCTION_BASE_URL: &str = "wss://wss-prod.agentao.com";

/// Environment variable of the API key, read by [`TelcoflowClientConfig::from_env`] (and the
/// `telcoflow` command line).
pub const ENV_API_KEY: &str = "TELCOFLOW_API_KEY";
/// Environment variable of the connector UUID.
pub const ENV_CONNECTOR_UUID: &str = "TELCOFLOW_CONNECTOR_UUID";
/// Environment variable of the WebSocket base URL.
pub const ENV_BASE_URL: &str = "TELCOFLOW_BASE_URL";
/// Environment variable of a PEM file of extra root certificates.
pub const ENV_CA_CERT: &str = "TELCOFLOW_CA_CERT";
/// Environment variable of the PEM client certificate (mTLS instead of an API key).
pub const ENV_CLIENT_CERT: &str = "TELCOFLOW_CLIENT_CERT";
/// Environment variable of the PEM private key of the client certificate.
pub const ENV_CLIENT_KEY: &str = "TELCOFLOW_CLIENT_KEY";
/// Environment variable of the sample rate in Hz.
pub const ENV_SAMPLE_RATE: &str = "TELCOFLOW_SAMPLE_RATE";

/// The builder field each variable sets, to name the variable when its value is refused.
const ENV_FIELDS: [(&str, &str); 7] = [
    ("api_key", ENV_API_KEY),
    ("connector_uuid", ENV_CONNECTOR_UUID),
    ("base_url", ENV_BASE_URL),
    ("base_urls", ENV_BASE_URL),
    ("ca_cert", ENV_CA_CERT),
    ("cert_path", ENV_CLIENT_CERT),
    ("key_path", ENV_CLIENT_KEY),
];

/// How the client proves who it is.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Auth {
    /// `x-api-key` and `x-connector-uuid` headers.
    ApiKey {
        /// The API key (secret; never printed).
        api_key: String,
        /// The connector UUID.
        connector_uuid: String,
    },
    /// A TLS client certificate (needs the `tls` feature and a `wss://` URL).
    Mtls {
        /// PEM certificate chain.
        cert_path: PathBuf,
        /// PEM private key (never read into logs or errors).
        key_path: PathBuf,
    },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ApiKey { connector_uuid, .. } => f
                .debug_struct("ApiKey")
                .field("api_key", &"<redacted>")
                .field("connector_uuid", connector_uuid)
                .finish(),
            Self::Mtls {
                cert_path,
                key_path,
            } => f
                .debug_struct("Mtls")
                .field("cert_path", cert_path)
                .field("key_path", key_path)
                .finish(),
        }
    }
}

/// Whether the client claims sessions itself or leaves it to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionMode {
    /// Claim every notified call session, mark it ready and deliver its calls (the default).
    /// Messaging sessions are left unclaimed and reported as
    /// [`ClientEvent::SessionNotification`](crate::ClientEvent).
    #[default]
    Auto,
    /// Deliver each notification as [`ClientEvent::SessionNotification`](crate::ClientEvent);
    /// the application claims with [`TelcoflowClient::open_session`](crate::TelcoflowClient::open_session)
    /// and then calls [`TelcoflowClient::ready`](crate::TelcoflowClient::ready).
    Manual,
}

/// Computes the delay before reconnection attempt `attempt` (1-based).
pub type DelayFn = Arc<dyn Fn(u32) -> Duration + Send + Sync>;

/// Jittered exponential backoff between reconnection attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first attempt. Default 0.5 s.
    pub min: Duration,
    /// Growth per attempt. Default 1.5.
    pub factor: f64,
    /// Largest delay before jitter. Default 10 s.
    pub max: Duration,
    /// Extra random fraction added on top, 0.0..=jitter. Default 0.2 (0..20 %).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(500),
            factor: 1.5,
            max: Duration::from_secs(10),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before the `attempt`-th reconnection (1-based) without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.min.as_secs_f64() * self.factor.powi(exp);
        Duration::from_secs_f64(secs.min(self.max.as_secs_f64()))
    }

    /// The delay before the `attempt`-th reconnection with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let jitter = if self.jitter > 0.0 {
            rand::random::<f64>() * self.jitter
        } else {
            0.0
        };
        self.base_delay(attempt).mul_f64(1.0 + jitter)
    }
}

/// Configuration of a [`TelcoflowClient`](crate::TelcoflowClient). Build it with
/// [`TelcoflowClientConfig::builder`], [`TelcoflowClientConfig::local`] or
/// [`TelcoflowClientConfig::production`].
///
/// ```
/// use std::time::Duration;
/// use telcoflow::{SampleRate, TelcoflowClientConfig};
///
/// let config = TelcoflowClientConfig::builder()
///     .api_key("my-key", "my-connector-uuid")
///     .base_url("ws://127.0.0.1:8080")
///     .sample_rate(SampleRate::Hz24000)
///     .heartbeat_interval(Duration::from_secs(15))
///     .build()?;
/// assert_eq!(config.sample_rate(), SampleRate::Hz24000);
/// # Ok::<(), telcoflow::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct TelcoflowClientConfig {
    pub(crate) auth: Auth,
    /// At least one, each without a trailing slash.
    pub(crate) base_urls: Vec<String>,
    pub(crate) sample_rate: SampleRate,
    pub(crate) audio_mode: AudioMode,
    pub(crate) buffer_size: usize,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) setup_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_pending_requests: usize,
    pub(crate) event_capacity: usize,
    pub(crate) audio_channel_capacity: usize,
    pub(crate) session_mode: SessionMode,
    pub(crate) auto_connect_media: bool,
    pub(crate) backoff: Backoff,
    pub(crate) delay_fn: Option<DelayFn>,
    pub(crate) ca_cert: Option<PathBuf>,
    /// TLS for the control connection (carries the client certificate, if any).
    pub(crate) control_tls: Tls,
    /// TLS for media connections.
    pub(crate) media_tls: Tls,
}

impl fmt::Debug for TelcoflowClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelcoflowClientConfig")
            .field("auth", &self.auth)
            .field("base_urls", &self.base_urls)
            .field("sample_rate", &self.sample_rate)
            .field("audio_mode", &self.audio_mode)
            .field("buffer_size", &self.buffer_size)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("session_mode", &self.session_mode)
            .field("auto_connect_media", &self.auto_connect_media)
            .field("backoff", &self.backoff)
            .field("ca_cert", &self.ca_cert)
            .finish_non_exhaustive()
    }
}

impl TelcoflowClientConfig {
    /// A builder with every default and no credentials.
    pub fn builder() -> TelcoflowClientConfigBuilder {
        TelcoflowClientConfigBuilder::default()
    }

    /// A server on this machine ([`LOCAL_BASE_URL`]) with API key authentication.
    pub fn local(
        api_key: impl Into<String>,
        connector_uuid: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        Self::builder()
            .api_key(api_key, connector_uuid)
            .base_url(LOCAL_BASE_URL)
            .build()
    }

    /// The hosted service ([`PRODUCTION_BASE_URL`]) with API key authentication.
    pub fn production(
        api_key: impl Into<String>,
        connector_uuid: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        Self::builder()
            .api_key(api_key, connector_uuid)
            .base_url(PRODUCTION_BASE_URL)
            .build()
    }

    /// A configuration from the environment; every other setting keeps its default.
    ///
    /// | Variable | Meaning | Default |
    /// |---|---|---|
    /// | `TELCOFLOW_API_KEY` | API key | required, unless mTLS |
    /// | `TELCOFLOW_CONNECTOR_UUID` | connector UUID | required with the API key |
    /// | `TELCOFLOW_BASE_URL` | `ws://` or `wss://` base URL; several separated by commas (see [`TelcoflowClientConfigBuilder::base_urls`]) | [`PRODUCTION_BASE_URL`] |
    /// | `TELCOFLOW_CA_CERT` | PEM roots to trust besides the public ones | none |
    /// | `TELCOFLOW_CLIENT_CERT`, `TELCOFLOW_CLIENT_KEY` | PEM certificate and key: mTLS instead of an API key | none |
    /// | `TELCOFLOW_SAMPLE_RATE` | 8000, 16000 or 24000 | 16000 |
    ///
    /// The first four are the names the `telcoflow` command line reads. An empty variable
    /// counts as unset. Errors name the variable ([`ConfigError::MissingEnv`],
    /// [`ConfigError::InvalidEnv`]), never a secret's value. To change further settings,
    /// start from [`TelcoflowClientConfigBuilder::from_env`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), telcoflow::Error> {
    /// let config = telcoflow::TelcoflowClientConfig::from_env()?;
    /// let client = telcoflow::TelcoflowClient::connect(config).await?;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(std::env::var)
    }

    /// [`TelcoflowClientConfig::from_env`] with `var` in place of the process environment.
    fn from_lookup(
        var: impl Fn(&'static str) -> Result<String, std::env::VarError>,
    ) -> Result<Self, ConfigError> {
        TelcoflowClientConfigBuilder::from_lookup(var)?
            .build()
            .map_err(|e| match e {
                ConfigError::Invalid { field, reason } => {
                    match ENV_FIELDS.iter().find(|(f, _)| *f == field) {
                        Some((_, name)) => ConfigError::InvalidEnv { name, reason },
                        None => ConfigError::Invalid { field, reason },
                    }
                }
                other => other,
            })
    }

    /// The credentials.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }
    /// WebSocket base URL, without a trailing slash: the first of [`Self::base_urls`].
    pub fn base_url(&self) -> &str {
        &self.base_urls[0]
    }
    /// Every base URL, in the order the client tries them (at least one).
    pub fn base_urls(&self) -> &[String] {
        &self.base_urls
    }
    /// PCM sample rate of every call.
    pub fn sample_rate(&self) -> SampleRate {
        self.sample_rate
    }
    /// Mixed or isolated audio.
    pub fn audio_mode(&self) -> AudioMode {
        self.audio_mode
    }
    /// Bytes of the outgoing audio ring buffer of each call.
    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }
    /// Session claiming mode.
    pub fn session_mode(&self) -> SessionMode {
        self.session_mode
    }
    /// Whether incoming calls are delivered with their media connection already open.
    pub fn auto_connect_media(&self) -> bool {
        self.auto_connect_media
    }
    /// Heartbeat ping interval.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }
    /// How long after a ping without a pong the connection counts as dead.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_timeout
    }
    /// How long opening a WebSocket (TCP, TLS and HTTP upgrade) may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The delay before reconnection attempt `attempt` (1-based).
    pub fn reconnect_delay(&self, attempt: u32) -> Duration {
        match &self.delay_fn {
            Some(f) => f(attempt),
            None => self.backoff.delay(attempt),
        }
    }

    /// The control connection's URL on base URL `index` (wrapping around the list).
    pub(crate) fn control_url(&self, index: usize) -> String {
        format!(
            "{}{}",
            self.base_urls[index % self.base_urls.len()],
            telcoflow_proto::control::CONTROL_PATH
        )
    }
}

/// Builder of [`TelcoflowClientConfig`]; every setter takes and returns the builder by value.
#[derive(Clone)]
pub struct TelcoflowClientConfigBuilder {
    auth: Option<Auth>,
    base_urls: Vec<String>,
    sample_rate: SampleRate,
    audio_mode: AudioMode,
    buffer_size: usize,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    connect_timeout: Duration,
    setup_timeout: Duration,
    request_timeout: Duration,
    max_pending_requests: usize,
    event_capacity: usize,
    audio_channel_capacity: usize,
    session_mode: SessionMode,
    auto_connect_media: bool,
    backoff: Backoff,
    delay_fn: Option<DelayFn>,
    ca_cert: Option<PathBuf>,
}

impl fmt::Debug for TelcoflowClientConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelcoflowClientConfigBuilder")
            .field("auth", &self.auth)
            .field("base_urls", &self.base_urls)
            .finish_non_exhaustive()
    }
}

impl Default for TelcoflowClientConfigBuilder {
    fn default() -> Self {
        Self {
            auth: None,
            base_urls: vec![PRODUCTION_BASE_URL.to_owned()],
            sample_rate: SampleRate::default(),
            audio_mode: AudioMode::default(),
            buffer_size: 1 << 20,
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            setup_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_pending_requests: 1024,
            event_capacity: 256,
            audio_channel_capacity: 256,
            session_mode: SessionMode::Auto,
            auto_connect_media: true,
            backoff: Backoff::default(),
            delay_fn: None,
            ca_cert: None,
        }
    }
}

impl TelcoflowClientConfigBuilder {
    /// A builder set from the environment (the variables of
    /// [`TelcoflowClientConfig::from_env`]); values are checked by [`Self::build`], except
    /// that missing credentials and an unreadable variable fail here.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(std::env::var)
    }

    fn from_lookup(
        var: impl Fn(&'static str) -> Result<String, std::env::VarError>,
    ) -> Result<Self, ConfigError> {
        let get = |name: &'static str| match var(name) {
            Ok(v) if v.is_empty() => Ok(None),
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::InvalidEnv {
                name,
                reason: "is not valid Unicode".into(),
            }),
        };
        let mut builder = Self::default();
        if let Some(urls) = get(ENV_BASE_URL)? {
            builder = builder.base_urls(urls.split(',').map(str::trim));
        }
        builder = match (get(ENV_CLIENT_CERT)?, get(ENV_CLIENT_KEY)?) {
            (Some(cert), Some(key)) => builder.mtls(cert, key),
            (Some(_), None) => {
                return Err(ConfigError::MissingEnv {
                    name: ENV_CLIENT_KEY,
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::MissingEnv {
                    name: ENV_CLIENT_CERT,
                });
            }
            (None, None) => {
                let api_key =
                    get(ENV_API_KEY)?.ok_or(ConfigError::MissingEnv { name: ENV_API_KEY })?;
                let connector = get(ENV_CONNECTOR_UUID)?.ok_or(ConfigError::MissingEnv {
                    name: ENV_CONNECTOR_UUID,
                })?;
                builder.api_key(api_key, connector)
            }
        };
        if let Some(ca) = get(ENV_CA_CERT)? {
            builder = builder.ca_cert(ca);
        }
        if let Some(rate) = get(ENV_SAMPLE_RATE)? {
            let rate = rate
                .parse::<u32>()
                .ok()
                .and_then(|hz| SampleRate::from_hz(hz).ok())
                .ok_or_else(|| ConfigError::InvalidEnv {
                    name: ENV_SAMPLE_RATE,
                    reason: format!("{rate} is not 8000, 16000 or 24000"),
                })?;
            builder = builder.sample_rate(rate);
        }
        Ok(builder)
    }

    /// Authenticate with an API key and connector UUID (headers `x-api-key`,
    /// `x-connector-uuid`).
    pub fn api_key(
        mut self,
        api_key: impl Into<String>,
        connector_uuid: impl Into<String>,
    ) -> Self {
        self.auth = Some(Auth::ApiKey {
            api_key: api_key.into(),
            connector_uuid: connector_uuid.into(),
        });
        self
    }

    /// Authenticate with a TLS client certificate and key (PEM files; needs the `tls` feature).
    pub fn mtls(mut self, cert_path: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Self {
        self.auth = Some(Auth::Mtls {
            cert_path: cert_path.into(),
            key_path: key_path.into(),
        });
        self
    }

    /// A PEM file of root certificates to trust for `wss://` besides the public webpki roots
    /// (a private deployment's CA). Needs the `tls` feature. Default: none.
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// WebSocket base URL (`ws://` or `wss://`). Default [`PRODUCTION_BASE_URL`]. Replaces
    /// any URLs set before; for several, see [`Self::base_urls`].
    pub fn base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_urls = vec![base_url.into()];
        self
    }

    /// Several base URLs of one service (the nodes of a cluster), tried in turn. Replaces any
    /// set before.
    ///
    /// On [`TelcoflowClient::connect`](crate::TelcoflowClient::connect) the client tries them
    /// in order until one completes `setup`. When the control connection is lost, each
    /// reconnection attempt (after the backoff delay) tries them all once, starting with the
    /// URL after the one that was lost, so that a node that went away is tried last.
    ///
    /// ```
    /// let config = telcoflow::TelcoflowClientConfig::builder()
    ///     .api_key("my-key", "my-connector-uuid")
    ///     .base_urls(["ws://10.0.0.1:8080", "ws://10.0.0.2:8080"])
    ///     .build()?;
    /// assert_eq!(config.base_urls().len(), 2);
    /// # Ok::<(), telcoflow::ConfigError>(())
    /// ```
    pub fn base_urls<I>(mut self, base_urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.base_urls = base_urls.into_iter().map(Into::into).collect();
        self
    }

    /// PCM sample rate of every call. Default 16000 Hz.
    pub fn sample_rate(mut self, rate: SampleRate) -> Self {
        self.sample_rate = rate;
        self
    }

    /// Mixed (channel 0 only) or isolated (plus one channel per leg). Default mixed.
    pub fn audio_mode(mut self, mode: AudioMode) -> Self {
        self.audio_mode = mode;
        self
    }

    /// Size of each call's outgoing audio ring buffer in bytes; a power of two, at least 1 KiB.
    /// Default 1 MiB (about 33 s at 16 kHz).
    pub fn buffer_size(mut self, bytes: usize) -> Self {
        self.buffer_size = bytes;
        self
    }

    /// WebSocket ping interval on the control connection. Default 30 s.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// How long to wait for a pong before the control connection counts as dead. Default 10 s.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// How long opening a WebSocket (TCP connect, TLS handshake and HTTP upgrade) may take,
    /// for the control connection and for every media connection. Default 10 s. A peer that
    /// accepts the TCP connection but never completes the upgrade then fails the attempt with
    /// [`Error::Connection`](crate::Error::Connection) instead of holding it forever.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for `setup.done`. Default 10 s.
    pub fn setup_timeout(mut self, timeout: Duration) -> Self {
        self.setup_timeout = timeout;
        self
    }

    /// How long to wait for the `response` of a control request. Default 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Control requests that may wait for a response at once. Default 1024.
    pub fn max_pending_requests(mut self, n: usize) -> Self {
        self.max_pending_requests = n;
        self
    }

    /// Client events buffered for the application. Default 256.
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n;
        self
    }

    /// Received audio chunks buffered per channel of a call before further chunks are dropped
    /// (and reported). Default 256 (about 5 s of 20 ms frames).
    pub fn audio_channel_capacity(mut self, n: usize) -> Self {
        self.audio_channel_capacity = n;
        self
    }

    /// Session claiming mode. Default [`SessionMode::Auto`].
    pub fn session_mode(mut self, mode: SessionMode) -> Self {
        self.session_mode = mode;
        self
    }

    /// Whether to open each incoming call's media connection before delivering it. Default
    /// true. With false, calls arrive in state NEW and can be handed to another process with
    /// [`ActiveCall::to_json`](crate::ActiveCall::to_json).
    pub fn auto_connect_media(mut self, yes: bool) -> Self {
        self.auto_connect_media = yes;
        self
    }

    /// Reconnection backoff. Default 0.5 s, x1.5, max 10 s, +0..20 % jitter.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Replaces the backoff with a function of the attempt number (1-based).
    pub fn reconnect_delay_fn(
        mut self,
        f: impl Fn(u32) -> Duration + Send + Sync + 'static,
    ) -> Self {
        self.delay_fn = Some(Arc::new(f));
        self
    }

    /// Checks every value and builds the configuration.
    pub fn build(self) -> Result<TelcoflowClientConfig, ConfigError> {
        let auth = self
            .auth
            .ok_or_else(|| ConfigError::invalid("auth", "set api_key(..) or mtls(..)"))?;
        match &auth {
            Auth::ApiKey {
                api_key,
                connector_uuid,
            } => {
                if api_key.is_empty() {
                    return Err(ConfigError::invalid("api_key", "must not be empty"));
                }
                if connector_uuid.is_empty() {
                    return Err(ConfigError::invalid("connector_uuid", "must not be empty"));
                }
                if !header_safe(api_key) {
                    return Err(ConfigError::invalid(
                        "api_key",
                        "contains characters not allowed in a header",
                    ));
                }
                if !header_safe(connector_uuid) {
                    return Err(ConfigError::invalid(
                        "connector_uuid",
                        "contains characters not allowed in a header",
                    ));
                }
            }
            Auth::Mtls {
                cert_path,
                key_path,
            } => {
                if cert_path.as_os_str().is_empty() {
                    return Err(ConfigError::invalid("cert_path", "must not be empty"));
                }
                if key_path.as_os_str().is_empty() {
                    return Err(ConfigError::invalid("key_path", "must not be empty"));
                }
                if !cfg!(feature = "tls") {
                    return Err(ConfigError::invalid("auth", "mTLS needs the `tls` feature"));
                }
                if !self.base_urls.iter().all(|u| u.starts_with("wss://")) {
                    return Err(ConfigError::invalid(
                        url_field(&self.base_urls),
                        "mTLS needs a wss:// URL",
                    ));
                }
            }
        }
        let field = url_field(&self.base_urls);
        if self.base_urls.is_empty() {
            return Err(ConfigError::invalid(field, "needs at least one URL"));
        }
        let base_urls: Vec<String> = self
            .base_urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect();
        for base_url in &base_urls {
            let Some(host) = base_url
                .strip_prefix("ws://")
                .or_else(|| base_url.strip_prefix("wss://"))
            else {
                return Err(ConfigError::invalid(
                    field,
                    "must start with ws:// or wss://",
                ));
            };
            if host.is_empty() {
                return Err(ConfigError::invalid(field, "has no host"));
            }
            if base_url.starts_with("wss://") && !cfg!(feature = "tls") {
                return Err(ConfigError::invalid(
                    field,
                    "wss:// needs the `tls` feature",
                ));
            }
        }
        if !self.buffer_size.is_power_of_two() || self.buffer_size < 1024 {
            return Err(ConfigError::invalid(
                "buffer_size",
                format!(
                    "{} is not a power of two of at least 1024",
                    self.buffer_size
                ),
            ));
        }
        for (field, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("connect_timeout", self.connect_timeout),
            ("setup_timeout", self.setup_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(field, "must be greater than zero"));
            }
        }
        for (field, n) in [
            ("max_pending_requests", self.max_pending_requests),
            ("event_capacity", self.event_capacity),
            ("audio_channel_capacity", self.audio_channel_capacity),
        ] {
            if n == 0 {
                return Err(ConfigError::invalid(field, "must be at least 1"));
            }
        }
        let b = self.backoff;
        if b.min.is_zero() || b.max < b.min {
            return Err(ConfigError::invalid("backoff", "needs 0 < min <= max"));
        }
        if !(b.factor.is_finite() && b.factor >= 1.0) {
            return Err(ConfigError::invalid(
                "backoff",
                "factor must be at least 1.0",
            ));
        }
        if !(b.jitter.is_finite() && (0.0..=1.0).contains(&b.jitter)) {
            return Err(ConfigError::invalid(
                "backoff",
                "jitter must be within 0.0..=1.0",
            ));
        }
        if let Some(ca) = &self.ca_cert {
            if ca.as_os_str().is_empty() {
                return Err(ConfigError::invalid("ca_cert", "must not be empty"));
            }
            if !cfg!(feature = "tls") {
                return Err(ConfigError::invalid("ca_cert", "needs the `tls` feature"));
            }
        }
        #[cfg(feature = "tls")]
        let (control_tls, media_tls) = Tls::build(&auth, self.ca_cert.as_deref())?;
        #[cfg(not(feature = "tls"))]
        let (control_tls, media_tls) = (Tls::default(), Tls::default());
        Ok(TelcoflowClientConfig {
            auth,
            base_urls,
            sample_rate: self.sample_rate,
            audio_mode: self.audio_mode,
            buffer_size: self.buffer_size,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            connect_timeout: self.connect_timeout,
            setup_timeout: self.setup_timeout,
            request_timeout: self.request_timeout,
            max_pending_requests: self.max_pending_requests,
            event_capacity: self.event_capacity,
            audio_channel_capacity: self.audio_channel_capacity,
            session_mode: self.session_mode,
            auto_connect_media: self.auto_connect_media,
            backoff: self.backoff,
            delay_fn: self.delay_fn,
            ca_cert: self.ca_cert,
            control_tls,
            media_tls,
        })
    }
}

/// The field named in errors about the base URLs: as the application set them.
fn url_field(base_urls: &[String]) -> &'static str {
    if base_urls.len() == 1 {
        "base_url"
    } else {
        "base_urls"
    }
}

fn header_safe(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn local_defaults() {
        let c = TelcoflowClientConfig::local("k", "u").unwrap();
        assert_eq!(c.base_url(), "ws://127.0.0.1:8080");
        assert_eq!(
            c.control_url(0),
            "ws://127.0.0.1:8080/v1/agent/session-manager"
        );
        assert_eq!(c.base_urls(), ["ws://127.0.0.1:8080"]);
        assert_eq!(c.buffer_size(), 1 << 20);
        assert_eq!(c.sample_rate(), SampleRate::Hz16000);
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(30));
        assert_eq!(c.heartbeat_timeout(), Duration::from_secs(10));
        assert_eq!(c.connect_timeout(), Duration::from_secs(10));
        assert_eq!(c.session_mode(), SessionMode::Auto);
    }

    #[test]
    fn invalid_values_name_the_field() {
        let b = || {
            TelcoflowClientConfig::builder()
                .api_key("k", "u")
                .base_url("ws://h")
        };
        assert_eq!(
            field_of(b().buffer_size(1000).build().unwrap_err()),
            "buffer_size"
        );
        assert_eq!(
            field_of(b().buffer_size(512).build().unwrap_err()),
            "buffer_size"
        );
        assert_eq!(
            field_of(b().base_url("http://x").build().unwrap_err()),
            "base_url"
        );
        assert_eq!(
            field_of(b().heartbeat_timeout(Duration::ZERO).build().unwrap_err()),
            "heartbeat_timeout"
        );
        assert_eq!(
            field_of(b().connect_timeout(Duration::ZERO).build().unwrap_err()),
            "connect_timeout"
        );
        assert_eq!(
            field_of(b().api_key("", "u").build().unwrap_err()),
            "api_key"
        );
        assert_eq!(
            field_of(b().api_key("k", "").build().unwrap_err()),
            "connector_uuid"
        );
        assert_eq!(
            field_of(TelcoflowClientConfig::builder().build().unwrap_err()),
            "auth"
        );
        let e = b().buffer_size(3).build().unwrap_err();
        assert!(e.to_string().contains("buffer_size"), "{e}");
        assert!(b().buffer_size(4096).build().is_ok());
    }

    #[test]
    fn several_base_urls_are_checked_and_kept_in_order() {
        let b = || TelcoflowClientConfig::builder().api_key("k", "u");
        let c = b().base_urls(["ws://a:1/", "ws://b:2"]).build().unwrap();
        assert_eq!(c.base_urls(), ["ws://a:1", "ws://b:2"]);
        assert_eq!(c.base_url(), "ws://a:1");
        assert_eq!(c.control_url(1), "ws://b:2/v1/agent/session-manager");
        assert_eq!(c.control_url(2), "ws://a:1/v1/agent/session-manager");
        let none: [&str; 0] = [];
        assert_eq!(
            field_of(b().base_urls(none).build().unwrap_err()),
            "base_urls"
        );
        assert_eq!(
            field_of(b().base_urls(["ws://a", "http://b"]).build().unwrap_err()),
            "base_urls"
        );
        // The last setter wins.
        let c = b()
            .base_urls(["ws://a", "ws://b"])
            .base_url("ws://c")
            .build()
            .unwrap();
        assert_eq!(c.base_urls(), ["ws://c"]);
        // From the environment, separated by commas.
        let c = TelcoflowClientConfig::from_lookup(env(&[
            ("TELCOFLOW_API_KEY", "k"),
            ("TELCOFLOW_CONNECTOR_UUID", "u"),
            ("TELCOFLOW_BASE_URL", "ws://a:1, ws://b:2"),
        ]))
        .unwrap();
        assert_eq!(c.base_urls(), ["ws://a:1", "ws://b:2"]);
        let e = TelcoflowClientConfig::from_lookup(env(&[
            ("TELCOFLOW_API_KEY", "k"),
            ("TELCOFLOW_CONNECTOR_UUID", "u"),
            ("TELCOFLOW_BASE_URL", "ws://a:1,"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("TELCOFLOW_BASE_URL"), "{e}");
    }

    #[test]
    fn mtls_needs_wss_and_the_tls_feature() {
        let b = TelcoflowClientConfig::builder().mtls("client.pem", "client.key");
        let e = b.clone().base_url("ws://h").build().unwrap_err();
        let expected = if cfg!(feature = "tls") {
            "base_url"
        } else {
            "auth"
        };
        assert_eq!(field_of(e), expected);
        // The files are read at build time: a missing certificate is named.
        let e = b.base_url("wss://h").build().unwrap_err();
        let expected = if cfg!(feature = "tls") {
            "cert_path"
        } else {
            "auth"
        };
        assert_eq!(field_of(e), expected);
        let c = TelcoflowClientConfig::builder()
            .mtls("", "k")
            .base_url("wss://h")
            .build();
        assert_eq!(field_of(c.unwrap_err()), "cert_path");
    }

    #[test]
    fn debug_hides_the_api_key() {
        let c = TelcoflowClientConfig::local("super-secret-key", "conn").unwrap();
        let text = format!(
            "{c:?} {:?}",
            TelcoflowClientConfig::builder().api_key("super-secret-key", "c")
        );
        assert!(!text.contains("super-secret-key"), "{text}");
        assert!(text.contains("conn"));
    }

    fn env<'a>(
        vars: &'a [(&str, &str)],
    ) -> impl Fn(&'static str) -> Result<String, std::env::VarError> + 'a {
        |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
                .ok_or(std::env::VarError::NotPresent)
        }
    }

    #[test]
    fn from_env_reads_the_cli_variables() {
        let c = TelcoflowClientConfig::from_lookup(env(&[
            ("TELCOFLOW_API_KEY", "secret-key"),
            ("TELCOFLOW_CONNECTOR_UUID", "conn"),
            ("TELCOFLOW_BASE_URL", "ws://127.0.0.1:9/"),
            ("TELCOFLOW_SAMPLE_RATE", "24000"),
        ]))
        .unwrap();
        assert_eq!(c.base_url(), "ws://127.0.0.1:9");
        assert_eq!(c.sample_rate(), SampleRate::Hz24000);
        assert_eq!(
            c.auth(),
            &Auth::ApiKey {
                api_key: "secret-key".into(),
                connector_uuid: "conn".into()
            }
        );
        // Defaults where unset (an empty value is unset).
        let c = TelcoflowClientConfig::from_lookup(env(&[
            ("TELCOFLOW_API_KEY", "k"),
            ("TELCOFLOW_CONNECTOR_UUID", "u"),
            ("TELCOFLOW_BASE_URL", ""),
        ]))
        .unwrap();
        assert_eq!(c.base_url(), PRODUCTION_BASE_URL);
        assert_eq!(c.sample_rate(), SampleRate::Hz16000);
    }

    #[test]
    fn from_env_names_missing_and_bad_variables() {
        let missing = |vars: &[(&str, &str)]| match TelcoflowClientConfig::from_lookup(env(vars)) {
            Err(ConfigError::MissingEnv { name }) => name,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(missing(&[]), "TELCOFLOW_API_KEY");
        assert_eq!(
            missing(&[("TELCOFLOW_API_KEY", "k")]),
            "TELCOFLOW_CONNECTOR_UUID"
        );
        assert_eq!(
            missing(&[("TELCOFLOW_CLIENT_CERT", "c.pem")]),
            "TELCOFLOW_CLIENT_KEY"
        );
        let invalid = |vars: &[(&str, &str)]| match TelcoflowClientConfig::from_lookup(env(vars)) {
            Err(e @ ConfigError::InvalidEnv { .. }) => e,
            other => panic!("unexpected {other:?}"),
        };
        let creds = [
            ("TELCOFLOW_API_KEY", "k"),
            ("TELCOFLOW_CONNECTOR_UUID", "u"),
        ];
        let e = invalid(&[creds[0], creds[1], ("TELCOFLOW_SAMPLE_RATE", "44100")]);
        assert!(e.to_string().contains("TELCOFLOW_SAMPLE_RATE"), "{e}");
        let e = invalid(&[creds[0], creds[1], ("TELCOFLOW_BASE_URL", "http://h")]);
        assert!(e.to_string().contains("TELCOFLOW_BASE_URL"), "{e}");
        // A refused secret is named, never shown.
        let e = invalid(&[("TELCOFLOW_API_KEY", "top\nsecret"), creds[1]]);
        assert!(
            matches!(
                e,
                ConfigError::InvalidEnv {
                    name: "TELCOFLOW_API_KEY",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!format!("{e} {e:?}").contains("secret"), "{e}");
        let not_unicode = |name: &'static str| {
            if name == "TELCOFLOW_BASE_URL" {
                Err(std::env::VarError::NotUnicode("\u{fffd}".into()))
            } else {
                Ok("x".to_owned())
            }
        };
        assert!(matches!(
            TelcoflowClientConfig::from_lookup(not_unicode),
            Err(ConfigError::InvalidEnv {
                name: "TELCOFLOW_BASE_URL",
                ..
            })
        ));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.base_delay(1), Duration::from_millis(500));
        assert_eq!(b.base_delay(2), Duration::from_millis(750));
        assert_eq!(b.base_delay(3), Duration::from_micros(1_125_000));
        assert_eq!(b.base_delay(30), Duration::from_secs(10));
        for attempt in 1..20 {
            let d = b.delay(attempt);
            let base = b.base_delay(attempt);
            assert!(d >= base && d <= base.mul_f64(1.2), "{d:?} vs {base:?}");
        }
        let c = TelcoflowClientConfig::builder()
            .api_key("k", "u")
            .reconnect_delay_fn(|n| Duration::from_millis(u64::from(n)))
            .base_url("ws://h")
            .build()
            .unwrap();
        assert_eq!(c.reconnect_delay(7), Duration::from_millis(7));
    }
}
