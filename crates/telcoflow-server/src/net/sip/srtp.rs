//! Which SRTP policy (SDES, `off` / `optional` / `required`) a call's peer has: its own
//! `srtp` on `[[sip.trunks]]`, `[[sip.registrations]]` or `[[sip.accounts]]`, else `[sip]
//! srtp`.
//!
//! An incoming call's peer is, in this order: the registration whose AOR's number it was
//! sent to, the account its INVITE authenticated as, the trunk whose host is its source
//! address; a call we dial goes through the trunk of its destination's host, else the
//! registration of its registrar's host.

use crate::config::SipConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use telcoflow_sip::rtp::srtp::MasterKey;
use telcoflow_sip::sip::sdp::{LocalSrtp, SrtpPolicy};

/// The SRTP policies of the configured peers.
#[derive(Debug, Default)]
pub(super) struct PeerSrtp {
    default: SrtpPolicy,
    /// Number (AOR user part) -> policy.
    registrations: HashMap<String, SrtpPolicy>,
    /// Account user name -> policy.
    accounts: HashMap<String, SrtpPolicy>,
    /// Trunk host (without port) -> policy.
    trunks: Vec<(String, SrtpPolicy)>,
}

impl PeerSrtp {
    /// The policies of `config` (validated: an invalid value counts as `off`).
    pub(super) fn new(config: &SipConfig) -> Self {
        let policy = |own: Option<&String>| config.peer_srtp_policy(own.map(String::as_str));
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
            trunks: config
                .trunks
                .iter()
                .filter(|t| t.srtp.is_some())
                .map(|t| (host_of(&t.host).to_owned(), policy(t.srtp.as_ref())))
                .collect(),
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
                    .find(|(host, _)| host.parse::<IpAddr>().is_ok_and(|ip| ip == source))
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
    (policy != SrtpPolicy::Off).then(|| LocalSrtp {
        policy,
        key: MasterKey::random(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SipAccount, SipTrunk};

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
