//! What every task of the server shares: configuration, connectors, the registry, the phone
//! networks, the token signer and the shutdown signal.

use crate::call::{CallHandle, LegId, LegLink};
use crate::config::{Config, ConnectorConfig};
use crate::registry::Registry;
use crate::sim::network::{Directory, RingError};
use crate::sip::endpoint::SipHandle;
use crate::token::TokenSigner;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    connectors: HashMap<String, Arc<ConnectorConfig>>,
    /// Connectors by the normalised fingerprint of their pinned client certificate.
    cert_pins: HashMap<String, Arc<ConnectorConfig>>,
    pub(crate) registry: Registry,
    pub(crate) phones: Directory,
    /// The SIP edge, when `[sip]` is configured.
    pub(crate) sip: OnceLock<SipHandle>,
    pub(crate) signer: TokenSigner,
    /// Base URL (`ws://host:port`) used in the media URLs of `call.in`.
    pub(crate) public_url: String,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    next_conn: AtomicU64,
}

impl Shared {
    pub(crate) fn new(config: Config, public_url: String) -> Self {
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
        Self {
            config,
            connectors,
            cert_pins,
            registry: Registry::default(),
            phones: Directory::default(),
            sip: OnceLock::new(),
            signer,
            public_url,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            next_conn: AtomicU64::new(1),
        }
    }

    pub(crate) fn connector(&self, uuid: &str) -> Option<&Arc<ConnectorConfig>> {
        self.connectors.get(uuid)
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

    /// Rings a destination for `call` as leg `leg`, whichever network it is on: a `sip:` URI is
    /// dialled by the SIP user agent, anything else is a simulated phone's number.
    pub(crate) fn ring(
        self: &Arc<Self>,
        destination: &str,
        call: &CallHandle,
        leg: LegId,
    ) -> Result<LegLink, RingError> {
        if is_sip_uri(destination) {
            let sip = self.sip.get().ok_or(RingError::NoSip)?;
            return sip
                .dial(self, destination, call, leg)
                .map_err(|e| RingError::Sip(e.to_string()));
        }
        self.phones.ring(destination, call, leg)
    }

    /// A process-unique id for a connection.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Whether a destination is a SIP URI rather than a simulated phone's number.
fn is_sip_uri(destination: &str) -> bool {
    let d = destination.trim_start();
    d.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("sip:"))
}

/// Fingerprints compare without case and without `:` separators (`AB:CD:..` as tools print
/// them, or plain hex).
fn normalize_fingerprint(fp: &str) -> String {
    fp.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sip_uris_are_told_from_numbers() {
        assert!(super::is_sip_uri("sip:+200@127.0.0.1:5070"));
        assert!(super::is_sip_uri("SIP:alice@pbx.example"));
        assert!(!super::is_sip_uri("+15550100"));
        assert!(!super::is_sip_uri("sips"));
    }
}
