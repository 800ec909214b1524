//! What every task of the server shares: configuration, connectors, the registry, the phone
//! networks (behind their interface), the token signer and the shutdown signal.

use crate::call::EndedCalls;
use crate::config::{Config, ConnectorConfig};
use crate::net::Networks;
use crate::registry::Registry;
use crate::token::TokenSigner;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    connectors: HashMap<String, Arc<ConnectorConfig>>,
    /// Connectors by the normalised fingerprint of their pinned client certificate.
    cert_pins: HashMap<String, Arc<ConnectorConfig>>,
    pub(crate) registry: Registry,
    /// The phone networks calls ring destinations on.
    pub(crate) networks: Networks,
    pub(crate) signer: TokenSigner,
    /// Base URL (`ws://host:port`) used in the media URLs of `call.in`.
    pub(crate) public_url: String,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the server starts draining: from then on it takes no new calls or
    /// control connections, and closes those it has (see `drain`).
    pub(crate) draining: CancellationToken,
    /// Set by the first request to drain, which alone starts it.
    pub(crate) drain_started: std::sync::atomic::AtomicBool,
    pub(crate) tasks: TaskTracker,
    /// The latest ended calls of each connector, for the console.
    pub(crate) ended_calls: EndedCalls,
    next_conn: AtomicU64,
    /// The Prometheus metrics (`GET /metrics`).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// What each outbound SIP registration last reported (empty without any).
    pub(crate) sip_registrations: Arc<crate::net::registration_board::RegistrationBoard>,
    /// Console live views open on this node, per connector.
    console_views: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

/// A console live view's place under `limits.max_console_views_per_connector`, given back
/// when dropped.
#[derive(Debug)]
pub(crate) struct ConsoleViewSlot {
    views: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    connector: String,
}

impl Drop for ConsoleViewSlot {
    fn drop(&mut self) {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = views.get_mut(&self.connector) {
            *n -= 1;
            if *n == 0 {
                views.remove(&self.connector);
            }
        }
    }
}

impl Shared {
    /// `tasks` and `shutdown` are the ones the networks were given.
    pub(crate) fn new(
        config: Config,
        public_url: String,
        networks: Networks,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let signer = match &config.token_secret {
            Some(secret) => TokenSigner::new(secret.as_bytes(), config.media_token_ttl()),
            None => TokenSigner::random(config.media_token_ttl()),
        };
        let connectors: HashMap<String, Arc<ConnectorConfig>> = config
            .connectors
            .iter()
            .map(|c| (c.uuid.clone(), Arc::new(c.clone())))
            .collect();
        let cert_pins = connectors
            .values()
            .filter_map(|c| {
                let pin = c.client_cert_sha256.as_deref()?;
                Some((normalize_fingerprint(pin), c.clone()))
            })
            .collect();
        let registry = Registry::in_memory(config.limits.max_closed_sessions_per_connector);
        Self {
            config,
            connectors,
            cert_pins,
            registry,
            networks,
            signer,
            public_url,
            shutdown,
            draining: CancellationToken::new(),
            drain_started: std::sync::atomic::AtomicBool::new(false),
            tasks,
            ended_calls: EndedCalls::default(),
            next_conn: AtomicU64::new(1),
            metrics: Arc::default(),
            sip_registrations: Arc::default(),
            console_views: Arc::default(),
        }
    }

    /// A place for one more console live view of `connector`, if it has fewer than
    /// `limits.max_console_views_per_connector` open on this node.
    pub(crate) fn reserve_console_view(&self, connector: &str) -> Option<ConsoleViewSlot> {
        let limit = self.config.limits.max_console_views_per_connector;
        let mut views = self.console_views.lock().unwrap_or_else(|e| e.into_inner());
        let n = views.entry(connector.to_owned()).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(ConsoleViewSlot {
            views: self.console_views.clone(),
            connector: connector.to_owned(),
        })
    }

    pub(crate) fn connector(&self, uuid: &str) -> Option<&Arc<ConnectorConfig>> {
        self.connectors.get(uuid)
    }

    /// The connector `uuid` if `key` is its API key. One answer for an unknown connector and a
    /// wrong key, so that a caller cannot probe which connector ids exist; the key comparison
    /// takes the same time wherever it differs.
    pub(crate) fn check_key(&self, uuid: &str, key: &str) -> Option<Arc<ConnectorConfig>> {
        use subtle::ConstantTimeEq as _;
        let connector = self.connector(uuid)?;
        bool::from(connector.api_key.as_bytes().ct_eq(key.as_bytes())).then(|| connector.clone())
    }

    /// The connector whose pinned client certificate has this fingerprint.
    pub(crate) fn connector_by_cert(&self, sha256: &str) -> Option<Arc<ConnectorConfig>> {
        self.cert_pins.get(&normalize_fingerprint(sha256)).cloned()
    }

    /// The connector a called number is routed to: an exact number first, then a `"*"`.
    pub(crate) fn route(&self, called: &str) -> Option<Arc<ConnectorConfig>> {
        let by = |pred: &dyn Fn(&str) -> bool| {
            self.config
                .connectors
                .iter()
                .find(|c| c.numbers.iter().any(|n| pred(n)))
                .and_then(|c| self.connectors.get(&c.uuid).cloned())
        };
        by(&|n| n == called).or_else(|| by(&|n| n == "*"))
    }

    /// Whether the server is draining (takes no new calls).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// A process-unique id for a connection.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Fingerprints compare without case and without `:` separators (`AB:CD:..` as tools print
/// them, or plain hex).
fn normalize_fingerprint(fp: &str) -> String {
    fp.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}
