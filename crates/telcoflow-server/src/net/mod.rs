//! The phone networks a call's legs live on, behind one interface.
//!
//! A call rings a destination through [`Networks::ring`], which picks the [`Network`] that
//! serves that kind of address; the network starts whatever task carries the leg and hands
//! the call a [`LegLink`]. Networks also bring calls in: they spawn a call
//! (`call::spawn_incoming`) with the caller as its first leg.
//!
//! - [`sim`]: the simulated phone network (`/v1/sim/phone`), the embedded default.
//! - [`sip`]: the SIP user agent and its RTP legs (with `[sip]` configured).
//! - [`registration_board`]: what the SIP user agent's outbound registrations last reported.

pub(crate) mod registration_board;
pub(crate) mod sim;
pub(crate) mod sip;

use crate::call::{CallHandle, LegId, LegLink};
use std::fmt;
use std::sync::Arc;

/// The kinds of address a destination can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressKind {
    /// A `sip:` or `sips:` URI.
    Sip,
    /// Anything else: a simulated phone's number.
    Number,
}

impl AddressKind {
    /// The kind of `destination`.
    pub(crate) fn of(destination: &str) -> Self {
        if crate::config::sip_scheme_len(destination).is_some() {
            Self::Sip
        } else {
            Self::Number
        }
    }
}

impl fmt::Display for AddressKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sip => "SIP URI",
            Self::Number => "phone number",
        })
    }
}

/// Why a destination could not be rung.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RingError {
    /// No network of this server serves that kind of address.
    #[error("{}", no_network(*.0))]
    NoNetwork(AddressKind),
    /// The address cannot be parsed.
    #[error("not a valid {kind}: {address}")]
    InvalidAddress {
        /// What it was meant to be.
        kind: AddressKind,
        /// The address as given.
        address: String,
    },
    /// Nobody is at that address.
    #[error("no phone is registered at that number")]
    NotRegistered,
    /// The destination is on another call.
    #[error("the phone is busy")]
    Busy,
    /// No port is free to carry the leg's audio.
    #[error("no RTP port is free")]
    NoMediaPort,
    /// A `sips:` or `;transport=tls` destination without our TLS listener.
    #[error(
        "SIP over TLS needs [sip] tls_listen (with tls_cert and tls_key): the callee must reach us over TLS"
    )]
    NoTlsListener,
}

fn no_network(kind: AddressKind) -> &'static str {
    match kind {
        AddressKind::Sip => "SIP destinations need the [sip] section (or --sip)",
        AddressKind::Number => "phone numbers need the simulated phone network",
    }
}

/// A phone network that can ring a destination for a call.
pub(crate) trait Network: fmt::Debug + Send + Sync {
    /// The kind of address this network serves.
    fn serves(&self) -> AddressKind;

    /// Rings `destination` for `call` as its leg `leg`. The answer (or refusal) arrives later
    /// as a leg event; an error means the ring could not even start.
    fn ring(&self, destination: &str, call: &CallHandle, leg: LegId) -> Result<LegLink, RingError>;
}

/// The networks of this server, by the kind of address each serves.
#[derive(Debug, Default)]
pub(crate) struct Networks {
    networks: Vec<Arc<dyn Network>>,
}

impl Networks {
    /// Adds a network; the first one added for a kind of address serves it.
    pub(crate) fn with(mut self, network: Arc<dyn Network>) -> Self {
        self.networks.push(network);
        self
    }

    /// Rings a destination for `call` as leg `leg`, on the network that serves its kind.
    pub(crate) fn ring(
        &self,
        destination: &str,
        call: &CallHandle,
        leg: LegId,
    ) -> Result<LegLink, RingError> {
        let kind = AddressKind::of(destination);
        let network = self
            .networks
            .iter()
            .find(|n| n.serves() == kind)
            .ok_or(RingError::NoNetwork(kind))?;
        network.ring(destination, call, leg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_uris_are_told_from_numbers() {
        assert_eq!(AddressKind::of("sip:+200@127.0.0.1:5070"), AddressKind::Sip);
        assert_eq!(AddressKind::of("SIP:alice@pbx.example"), AddressKind::Sip);
        assert_eq!(AddressKind::of("+15550100"), AddressKind::Number);
        assert_eq!(AddressKind::of("sips"), AddressKind::Number);
        assert_eq!(AddressKind::of("sips:+200@pbx.example"), AddressKind::Sip);
        assert_eq!(AddressKind::of(" SIPS:alice@pbx.example"), AddressKind::Sip);
        assert_eq!(crate::config::sip_scheme_len(" sips:a@b"), Some(6));
        assert_eq!(crate::config::sip_scheme_len("sip:a@b"), Some(4));
        assert_eq!(crate::config::sip_scheme_len("tel:+1"), None);
    }

    #[test]
    fn a_kind_without_a_network_says_how_to_get_one() {
        assert_eq!(
            RingError::NoNetwork(AddressKind::Sip).to_string(),
            "SIP destinations need the [sip] section (or --sip)"
        );
        let bad = RingError::InvalidAddress {
            kind: AddressKind::Sip,
            address: "sip:".into(),
        };
        assert_eq!(bad.to_string(), "not a valid SIP URI: sip:");
    }
}
