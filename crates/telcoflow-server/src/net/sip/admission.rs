//! Who may start a call over SIP: the endpoint asks [`Admission::decide`] about every INVITE
//! that would start a new call, before the UAS keeps any state for it and before any number
//! is routed to a connector.
//!
//! In order: the source must be in `[sip] allow` (else `403`); it must be under its INVITE
//! rate (`invite_rate_limit` per `invite_rate_interval_secs`, counted per source address and
//! per /64 for IPv6, else `503` with `Retry-After`, logged once per source per interval); with `[[sip.accounts]]`, the INVITE must carry a
//! digest answer to a fresh nonce of ours with an account's password (else `401` with a
//! challenge). Re-INVITEs, BYEs and the like belong to calls already admitted.
//!
//! The `403`, `503` and `401` go out once, without a transaction: their source may be
//! forged, and an INVITE transaction would resend the response about ten times to the forged
//! address. A challenge keeps no state either (its nonce is checked by its HMAC): a caller
//! whose `401` is lost resends its INVITE and is challenged again.

use super::srtp::PeerSrtp;
use crate::config::{ConfigError, SipConfig};
use crate::listener::source_address;
use hmac::{Hmac, Mac as _};
use ipnet::IpNet;
use sha2::Sha256;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq as _;
use telcoflow_sip::sip::digest::{self, Algorithm, Authorization, Challenge};
use telcoflow_sip::sip::message::{Request, SipHeaders as _};
use telcoflow_sip::sip::sdp::SrtpPolicy;
use telcoflow_sip::sip::uas::{self, Refusal};
use tracing::{debug, info, warn};

/// How long a nonce of ours is accepted after it was issued.
const NONCE_LIFETIME: Duration = Duration::from_secs(300);
/// Sources whose INVITE rate is tracked at once. Past this (a flood from very many
/// addresses, which the allow list and authentication still hold), new sources go untracked
/// until the windows of the tracked ones end.
const MAX_TRACKED_SOURCES: usize = 65_536;
/// Digest answers remembered to refuse replays (an eavesdropper resending a caller's
/// INVITE): answers older than a nonce's lifetime are forgotten first.
const MAX_REMEMBERED_ANSWERS: usize = 65_536;

/// The admission policy of one SIP endpoint and its per-source state.
pub(super) struct Admission {
    allow: Option<Vec<IpNet>>,
    /// User name -> password.
    accounts: HashMap<String, String>,
    realm: String,
    rate: RateLimit,
    nonces: Nonces,
    /// Digest answers already used, with when they were first seen.
    used_answers: HashMap<String, Instant>,
    /// The SRTP policy of each peer.
    srtp: PeerSrtp,
    /// The latest INVITE admitted with an account: its Call-ID and the account, read when
    /// the call it starts is reported (see [`Admission::srtp_policy`]).
    authenticated: Option<(String, String)>,
}

impl Admission {
    /// The policy of `config`; an `allow` entry that is not a network or address is an error.
    pub(super) fn new(config: &SipConfig, now: Instant) -> Result<Self, ConfigError> {
        Ok(Self {
            allow: config.allow_networks()?,
            accounts: config
                .accounts
                .iter()
                .map(|a| (a.username.clone(), a.password.clone()))
                .collect(),
            realm: config.realm.clone(),
            rate: RateLimit::new(config.invite_rate_limit, config.invite_rate_interval()),
            nonces: Nonces::new(rand::random(), now),
            used_answers: HashMap::new(),
            srtp: PeerSrtp::new(config),
            authenticated: None,
        })
    }

    /// Resolves the trunk host names of the SRTP policies (see
    /// [`PeerSrtp::resolve_trunk_names`]); once, at start.
    pub(super) async fn resolve_trunk_names(&mut self) {
        self.srtp.resolve_trunk_names().await;
    }

    /// The SRTP policy of an incoming call (SIP Call-ID `call_id`, to `number`, from
    /// `source`): the account is the one its INVITE was just admitted with.
    pub(super) fn srtp_policy(&self, call_id: &str, number: &str, source: IpAddr) -> SrtpPolicy {
        let account = self
            .authenticated
            .as_ref()
            .filter(|(id, _)| id == call_id)
            .map(|(_, user)| user.as_str());
        self.srtp.incoming(number, account, source)
    }

    /// Whether `ip` is in `[sip] allow` (every source is when the list is not set).
    /// IPv4-mapped IPv6 sources (a dual-stack socket) count as the IPv4 address they are.
    pub(super) fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow
            .as_ref()
            .is_none_or(|allow| allow.iter().any(|net| net.contains(&ip)))
    }

    /// Whether the INVITE `request` from `source` may start a call.
    pub(super) fn decide(
        &mut self,
        request: &Request,
        source: SocketAddr,
        now: Instant,
    ) -> uas::Admission {
        if !self.allows(source.ip()) {
            debug!(%source, "INVITE from a source outside sip.allow: 403");
            return uas::Admission::Refuse(Refusal::new(403).stateless());
        }
        if let Err(retry_after) = self.rate.check(source_address(source.ip()), now) {
            let secs = retry_after.as_secs_f64().ceil().max(1.0);
            return uas::Admission::Refuse(
                Refusal::new(503)
                    .with_header("Retry-After", format!("{secs:.0}"))
                    .stateless(),
            );
        }
        if self.accounts.is_empty() {
            return uas::Admission::Accept;
        }
        match self.authenticate(request, now) {
            Ok(username) => {
                debug!(%source, %username, "INVITE authenticated");
                if let Ok(call_id) = request.call_id() {
                    self.authenticated = Some((call_id.to_owned(), username));
                }
                uas::Admission::Accept
            }
            Err(stale) => {
                let mut challenge =
                    Challenge::new(&self.realm, &self.nonces.issue(now), Algorithm::Md5);
                challenge.stale = stale;
                uas::Admission::Refuse(
                    Refusal::new(401)
                        .with_header("WWW-Authenticate", challenge.to_header_value())
                        .stateless(),
                )
            }
        }
    }

    /// The account the request authenticates as; `Err(stale)` when it does not, `stale`
    /// when only the nonce was too old (the caller retries without asking its user).
    fn authenticate(&mut self, request: &Request, now: Instant) -> Result<String, bool> {
        let header = request
            .headers()
            .get("Authorization")
            .or_else(|| request.headers().get("Proxy-Authorization"))
            .ok_or(false)?;
        let auth = Authorization::parse(header).map_err(|_| false)?;
        let password = self.accounts.get(&auth.username).ok_or_else(|| {
            info!(username = %auth.username, "SIP digest for an unknown account");
            false
        })?;
        if auth.realm != self.realm || auth.uri != request.uri {
            return Err(false);
        }
        let fresh = self.nonces.check(&auth.nonce, now).ok_or(false)?;
        if !digest::verify(&auth, password, &request.method) {
            info!(username = %auth.username, "SIP digest with a wrong password");
            return Err(false);
        }
        if !fresh {
            return Err(true);
        }
        if self.used_answers.contains_key(&auth.response) {
            debug!(username = %auth.username, "SIP digest answer replayed");
            return Err(false);
        }
        if self.used_answers.len() >= MAX_REMEMBERED_ANSWERS {
            self.used_answers
                .retain(|_, seen| now.duration_since(*seen) < NONCE_LIFETIME);
        }
        if self.used_answers.len() < MAX_REMEMBERED_ANSWERS {
            self.used_answers.insert(auth.response.clone(), now);
        }
        Ok(auth.username)
    }
}

/// Nonces that need no table: the issue time and an HMAC of it under a per-process key.
struct Nonces {
    key: [u8; 32],
    epoch: Instant,
}

impl Nonces {
    fn new(key: [u8; 32], epoch: Instant) -> Self {
        Self { key, epoch }
    }

    fn mac(&self, issued: &str) -> String {
        // A key of any length is accepted by HMAC.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(issued.as_bytes());
        let tag = mac.finalize().into_bytes();
        tag[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn issue(&self, now: Instant) -> String {
        let issued = format!("{:x}", now.duration_since(self.epoch).as_millis());
        format!("{issued}.{}", self.mac(&issued))
    }

    /// `Some(fresh)` for a nonce of ours, `None` for one we never issued.
    fn check(&self, nonce: &str, now: Instant) -> Option<bool> {
        let (issued, tag) = nonce.split_once('.')?;
        let expected = self.mac(issued);
        // Compared in time independent of where they differ.
        if !bool::from(expected.as_bytes().ct_eq(tag.as_bytes())) {
            return None;
        }
        let issued = u64::from_str_radix(issued, 16).ok()?;
        let age = now
            .duration_since(self.epoch)
            .saturating_sub(Duration::from_millis(issued));
        Some(age <= NONCE_LIFETIME)
    }
}

/// A fixed-window count of INVITEs per source address (IPv6 by its /64, as the connection
/// caps count it: one host usually has a whole /64).
struct RateLimit {
    /// INVITEs per window; 0 means no limit.
    limit: u32,
    interval: Duration,
    windows: HashMap<IpAddr, Window>,
}

struct Window {
    start: Instant,
    taken: u32,
    /// INVITEs refused in this window.
    refused: u64,
}

impl RateLimit {
    fn new(limit: u32, interval: Duration) -> Self {
        Self {
            limit,
            interval,
            windows: HashMap::new(),
        }
    }

    /// `Ok` when `ip` (a [`source_address`]) may send one more INVITE now, else how long
    /// until it may.
    fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        let interval = self.interval;
        if !self.windows.contains_key(&ip) && self.windows.len() >= MAX_TRACKED_SOURCES {
            self.windows
                .retain(|_, w| now.duration_since(w.start) < interval);
            if self.windows.len() >= MAX_TRACKED_SOURCES {
                return Ok(());
            }
        }
        let window = self.windows.entry(ip).or_insert(Window {
            start: now,
            taken: 0,
            refused: 0,
        });
        if now.duration_since(window.start) >= interval {
            *window = Window {
                start: now,
                taken: 0,
                refused: 0,
            };
        }
        if window.taken < self.limit {
            window.taken += 1;
            return Ok(());
        }
        window.refused += 1;
        if window.refused == 1 {
            warn!(
                source = %ip,
                limit = self.limit,
                interval_secs = interval.as_secs(),
                "SIP INVITE rate limit reached: refusing this source's new calls with 503 for the rest of the interval"
            );
        }
        Err(interval.saturating_sub(now.duration_since(window.start)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SipAccount;
    use telcoflow_sip::sip::digest::Credentials;
    use telcoflow_sip::sip::message::{Message, Method};

    const SOURCE: &str = "192.0.2.10:5060";

    fn invite(extra: &str) -> Request {
        let text = format!(
            "INVITE sip:+100@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1\r\n\
             From: <sip:a@192.0.2.10>;tag=1\r\nTo: <sip:+100@192.0.2.1>\r\nCall-ID: c\r\n\
             CSeq: 1 INVITE\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        match Message::parse(text.as_bytes()).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => unreachable!(),
        }
    }

    fn status(a: &uas::Admission) -> u16 {
        match a {
            uas::Admission::Accept => 200,
            uas::Admission::Refuse(r) => r.status,
        }
    }

    #[test]
    fn allow_list_then_rate_limit() {
        let now = Instant::now();
        let config = SipConfig {
            allow: Some(vec!["192.0.2.0/28".into(), "::ffff:198.51.100.1".into()]),
            invite_rate_limit: 3,
            ..SipConfig::default()
        };
        let mut a = Admission::new(&config, now).unwrap();
        let r = invite("");
        let outside: SocketAddr = "192.0.2.99:5060".parse().unwrap();
        assert_eq!(status(&a.decide(&r, outside, now)), 403);
        let mapped: SocketAddr = "[::ffff:192.0.2.3]:5060".parse().unwrap();
        assert_eq!(status(&a.decide(&r, mapped, now)), 200);
        let source = SOURCE.parse().unwrap();
        assert_eq!(status(&a.decide(&r, source, now)), 200);
        assert_eq!(status(&a.decide(&r, source, now)), 200);
        assert_eq!(status(&a.decide(&r, source, now)), 200);
        let later = now + Duration::from_millis(300);
        let uas::Admission::Refuse(refusal) = a.decide(&r, source, later) else {
            panic!("over the limit");
        };
        assert_eq!(refusal.status, 503);
        assert_eq!(
            refusal.headers,
            vec![("Retry-After".to_owned(), "1".to_owned())]
        );
        // Another source has its own count; the next interval starts over.
        assert_eq!(
            status(&a.decide(&r, "192.0.2.11:5060".parse().unwrap(), later)),
            200
        );
        let next = now + Duration::from_secs(1);
        assert_eq!(status(&a.decide(&r, source, next)), 200);
    }

    #[test]
    fn ipv6_sources_are_rate_limited_by_their_64() {
        let now = Instant::now();
        let config = SipConfig {
            invite_rate_limit: 2,
            ..SipConfig::default()
        };
        let mut a = Admission::new(&config, now).unwrap();
        let r = invite("");
        let one: SocketAddr = "[2001:db8:1:2::1]:5060".parse().unwrap();
        let same_64: SocketAddr = "[2001:db8:1:2:ffff::9]:5060".parse().unwrap();
        let other_64: SocketAddr = "[2001:db8:1:3::1]:5060".parse().unwrap();
        assert_eq!(status(&a.decide(&r, one, now)), 200);
        assert_eq!(status(&a.decide(&r, same_64, now)), 200);
        assert_eq!(status(&a.decide(&r, same_64, now)), 503);
        assert_eq!(status(&a.decide(&r, one, now)), 503);
        assert_eq!(status(&a.decide(&r, other_64, now)), 200);
    }

    #[test]
    fn a_bad_allow_entry_is_an_error_naming_it() {
        let config = SipConfig {
            allow: Some(vec!["192.0.2.0/24".into(), "pbx.example".into()]),
            ..SipConfig::default()
        };
        let Err(err) = Admission::new(&config, Instant::now()) else {
            panic!("a bad entry must not allow every source");
        };
        assert!(err.to_string().contains("\"pbx.example\""), "{err}");
    }

    #[test]
    fn accounts_are_challenged_and_checked() {
        let now = Instant::now();
        let config = SipConfig {
            accounts: vec![SipAccount {
                username: "pbx".into(),
                password: "s3cret".into(),
                srtp: None,
            }],
            invite_rate_limit: 0,
            ..SipConfig::default()
        };
        let mut a = Admission::new(&config, now).unwrap();
        let source = SOURCE.parse().unwrap();
        let uas::Admission::Refuse(first) = a.decide(&invite(""), source, now) else {
            panic!("no credentials yet");
        };
        assert_eq!(first.status, 401);
        assert!(first.stateless, "a challenge keeps no transaction");
        let (name, value) = &first.headers[0];
        assert_eq!(name, "WWW-Authenticate");
        let challenge = Challenge::parse(value).unwrap();
        assert_eq!(challenge.realm, "telcoflow");
        let answer = |password: &str, cnonce: &str| {
            let header = digest::authorize(
                &challenge,
                &Credentials {
                    username: "pbx".into(),
                    password: password.into(),
                },
                &Method::Invite,
                "sip:+100@192.0.2.1",
                cnonce,
                1,
            );
            invite(&format!("Authorization: {header}\r\n"))
        };
        assert_eq!(status(&a.decide(&answer("wrong", "c0"), source, now)), 401);
        assert_eq!(status(&a.decide(&answer("s3cret", "c1"), source, now)), 200);
        // The same answer again is a replay.
        assert_eq!(status(&a.decide(&answer("s3cret", "c1"), source, now)), 401);
        // A nonce past its lifetime: challenged again as stale.
        let late = now + NONCE_LIFETIME + Duration::from_secs(1);
        let uas::Admission::Refuse(stale) = a.decide(&answer("s3cret", "c2"), source, late) else {
            panic!("stale nonce accepted");
        };
        assert!(Challenge::parse(&stale.headers[0].1).unwrap().stale);
        // A nonce we never issued.
        let mut forged = challenge.clone();
        forged.nonce = "0.00".into();
        let header = digest::authorize(
            &forged,
            &Credentials {
                username: "pbx".into(),
                password: "s3cret".into(),
            },
            &Method::Invite,
            "sip:+100@192.0.2.1",
            "c3",
            1,
        );
        let r = invite(&format!("Authorization: {header}\r\n"));
        assert_eq!(status(&a.decide(&r, source, now)), 401);
    }
}
