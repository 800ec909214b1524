//! Which SRTP policy (SDES, `off` / `optional` / `required`) a call's peer has: its own
//! `srtp` on `[[sip.trunks]]`, `[[sip.registrations]]` or `[[sip.accounts]]`, else `[sip]
//! srtp`.
//!
//! An incoming call's peer is, in this order: the registration whose AOR's number it was
//! sent to, the account its INVITE authenticated as, the trunk whose host is its source
//! address; a call we dial goes through the trunk of its destination's host, else the
//! registration of its registrar's host. A trunk host that is a name is resolved once at
//! start ([`PeerSrtp::resolve_trunk_names`]) for matching incoming calls.

use crate::config::SipConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;
use telcoflow_sip::rtp::srtp::MasterKey;
use telcoflow_sip::sip::sdp::{LocalSrtp, SrtpPolicy};
use tracing::warn;

/// The SRTP policies of the configured peers.
#[derive(Debug, Default)]
pub(super) struct PeerSrtp {
    default: SrtpPolicy,
    /// Number (AOR user part) -> policy.
    registrations: HashMap<String, SrtpPolicy>,
    /// Account user name -> policy.
    accounts: HashMap<String, SrtpPolicy>,
    /// Trunk address -> policy (literal hosts, and names once resolved).
    trunks: Vec<(IpAddr, SrtpPolicy)>,
    /// Trunk hosts that are names, to resolve at start.
    trunk_names: Vec<(String, SrtpPolicy)>,
}

/// How long resolving one trunk name at start may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl PeerSrtp {
    /// The policies of `config` (validated: an invalid value counts as `off`).
    pub(super) fn new(config: &SipConfig) -> Self {
        let policy = |own: Option<&String>| config.peer_srtp_policy(own.map(String::as_str));
        let (trunks, trunk_names): (Vec<_>, Vec<_>) = config
            .trunks
            .iter()
            .filter(|t| t.srtp.is_some())
            .map(|t| (host_of(&t.host).to_owned(), policy(t.srtp.as_ref())))
            .partition(|(host, _)| host.parse::<IpAddr>().is_ok());
        Self {
            default: config.peer_srtp_policy(None),
            registrations: config
                .registrations
                .iter()
                .filter(|r| r.srtp.is_some())
                .filter_map(|r| Some((r.aor_user()?, policy(r.srtp.as_ref()))))
                .collect(),
            accounts: config
                .accounts
                .iter()
                .filter(|a| a.srtp.is_some())
                .map(|a| (a.username.clone(), policy(a.srtp.as_ref())))
                .collect(),
            trunks: trunks
                .into_iter()
                .filter_map(|(host, p)| Some((host.parse::<IpAddr>().ok()?.to_canonical(), p)))
                .collect(),
            trunk_names,
        }
    }

    /// Resolves the trunk hosts that are names, so that calls from their addresses get their
    /// policy. A name that does not resolve is a warning, not a stop: the trunk still takes
    /// calls we dial (resolved per call), only its incoming calls get the default policy.
    pub(super) async fn resolve_trunk_names(&mut self) {
        for (name, policy) in std::mem::take(&mut self.trunk_names) {
            let looked_up =
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0)))
                    .await;
            match looked_up {
                Ok(Ok(addrs)) => self
                    .trunks
                    .extend(addrs.map(|a| (a.ip().to_canonical(), policy))),
                Ok(Err(e)) => {
                    warn!(trunk = %name, error = %e, "cannot resolve the trunk host: its srtp does not apply to incoming calls");
                }
                Err(_) => {
                    warn!(trunk = %name, "resolving the trunk host timed out: its srtp does not apply to incoming calls");
                }
            }
        }
    }

    /// The policy of an incoming call to `number`, authenticated as `account` (if the
    /// server asks for accounts), from `source`.
    pub(super) fn incoming(
        &self,
        number: &str,
        account: Option<&str>,
        source: IpAddr,
    ) -> SrtpPolicy {
        let source = source.to_canonical();
        self.registrations
            .get(number)
            .or_else(|| account.and_then(|a| self.accounts.get(a)))
            .or_else(|| {
                self.trunks
                    .iter()
                    .find(|(ip, _)| *ip == source)
                    .map(|(_, p)| p)
            })
            .copied()
            .unwrap_or(self.default)
    }
}

/// `host` of `host[:port]` or `[v6]:port`.
fn host_of(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host_port.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => host_port,
    }
}

/// Our side of SDES for a call under `policy`: a fresh master key unless SRTP is off.
pub(super) fn local_srtp(policy: SrtpPolicy) -> Option<LocalSrtp> {
    (policy != SrtpPolicy::Off).then(|| LocalSrtp::new(policy, MasterKey::random()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SipAccount, SipTrunk};

    #[tokio::test]
    async fn a_trunk_named_by_host_name_applies_to_its_incoming_calls_once_resolved() {
        let config = SipConfig {
            trunks: vec![SipTrunk {
                host: "localhost:5080".into(),
                username: "t".into(),
                password: "p".into(),
                delayed_offer: false,
                srtp: Some("required".into()),
            }],
            ..SipConfig::default()
        };
        let mut peers = PeerSrtp::new(&config);
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(peers.incoming("1", None, loopback), SrtpPolicy::Off);
        peers.resolve_trunk_names().await;
        assert_eq!(peers.incoming("1", None, loopback), SrtpPolicy::Required);
    }

    #[test]
    fn a_peer_setting_wins_over_the_default_in_the_documented_order() {
        let config = SipConfig {
            srtp: "optional".into(),
            trunks: vec![SipTrunk {
                host: "192.0.2.7:5080".into(),
                username: "t".into(),
                password: "p".into(),
                delayed_offer: false,
                srtp: Some("required".into()),
            }],
            accounts: vec![SipAccount {
                username: "pbx".into(),
                password: "p".into(),
                srtp: Some("off".into()),
            }],
            ..SipConfig::default()
        };
        let peers = PeerSrtp::new(&config);
        let trunk: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(peers.incoming("1", None, other), SrtpPolicy::Optional);
        assert_eq!(peers.incoming("1", None, trunk), SrtpPolicy::Required);
        assert_eq!(
            peers.incoming("1", None, "::ffff:192.0.2.7".parse().unwrap()),
            SrtpPolicy::Required
        );
        assert_eq!(peers.incoming("1", Some("pbx"), trunk), SrtpPolicy::Off);
        assert_eq!(host_of("[2001:db8::1]:5060"), "2001:db8::1");
        assert_eq!(host_of("2001:db8::1"), "2001:db8::1");
        assert_eq!(host_of("trunk.example"), "trunk.example");
        assert!(local_srtp(SrtpPolicy::Off).is_none());
        assert_eq!(
            local_srtp(SrtpPolicy::Required).map(|s| s.policy),
            Some(SrtpPolicy::Required)
        );
    }
}
