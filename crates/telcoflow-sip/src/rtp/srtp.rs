//! SRTP (RFC 3711) for one call leg, keyed by SDES (RFC 4568 `a=crypto` in the SDP).
//!
//! The cipher, key derivation, authentication, rollover counter and replay window are
//! `rtc-srtp`'s (the webrtc-rs SRTP, sans-IO like this crate); this module holds the
//! suites SDES names, the key material the SDP carries, and a pair of contexts per leg:
//! one keyed with our master key for what we send, one with the peer's for what we
//! receive (an SRTP context works one way only).
//!
//! Suites: `AES_CM_128_HMAC_SHA1_80` and `AES_CM_128_HMAC_SHA1_32` (the tag length applies
//! to SRTP; SRTCP always carries the 80-bit tag, RFC 4568 6.2.2).
//!
//! Cost: the crate returns each protected or unprotected packet in a buffer of its own,
//! one allocation per packet; this module copies sent packets back into the caller's
//! buffer so that the caller's send path is unchanged.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use rtc_srtp::context::Context;
use rtc_srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use rtc_srtp::protection_profile::ProtectionProfile;

/// Packets behind the newest one that may still arrive (RFC 3711 3.3.2 asks for at least
/// 64; libsrtp's default is 128).
const REPLAY_WINDOW: usize = 128;

/// An SDES crypto suite we support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SrtpSuite {
    /// `AES_CM_128_HMAC_SHA1_80`: AES-128 counter mode, 80-bit HMAC-SHA1 tag.
    AesCm128HmacSha1_80,
    /// `AES_CM_128_HMAC_SHA1_32`: the same with a 32-bit tag on SRTP (80 on SRTCP).
    AesCm128HmacSha1_32,
}

impl SrtpSuite {
    /// Every supported suite, in the order we offer them.
    pub const ALL: [Self; 2] = [Self::AesCm128HmacSha1_80, Self::AesCm128HmacSha1_32];

    /// The name in `a=crypto`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Self::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }

    /// The suite an `a=crypto` name stands for (names are case-sensitive, RFC 4568 9.2).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Bytes of authentication tag on each SRTP packet.
    pub fn rtp_tag_len(self) -> usize {
        self.profile().rtp_auth_tag_len()
    }

    fn profile(self) -> ProtectionProfile {
        match self {
            Self::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            Self::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        }
    }
}

impl fmt::Display for SrtpSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes of the SRTCP authentication tag of both suites (80 bits), of the E flag and SRTCP
/// index before it, and of the RTCP header and SSRC that stay clear.
const SRTCP_TAG_LEN: usize = 10;
const SRTCP_INDEX_LEN: usize = 4;
const RTCP_HEADER_LEN: usize = 8;

/// Bytes of an AES-128 master key.
pub const MASTER_KEY_LEN: usize = 16;
/// Bytes of a master salt.
pub const MASTER_SALT_LEN: usize = 14;

/// A master key and salt (30 bytes), as `inline:` carries them in base64.
///
/// `Debug` does not show the bytes: keys never reach the logs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MasterKey([u8; MASTER_KEY_LEN + MASTER_SALT_LEN]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Key and salt from their 30 bytes.
    pub fn from_bytes(bytes: [u8; MASTER_KEY_LEN + MASTER_SALT_LEN]) -> Self {
        Self(bytes)
    }

    /// A fresh key from the thread's CSPRNG (`rand`'s, seeded from the OS).
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Decodes the base64 of `inline:` (padded or not); `None` unless it holds 30 bytes.
    pub fn from_base64(text: &str) -> Option<Self> {
        let mut bytes = [0u8; MASTER_KEY_LEN + MASTER_SALT_LEN];
        let trimmed = text.trim_end_matches('=');
        let n = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode_slice(trimmed, &mut bytes)
            .ok()?;
        (n == bytes.len()).then_some(Self(bytes))
    }

    /// The base64 for `inline:` (40 characters, no padding needed).
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    fn key(&self) -> &[u8] {
        &self.0[..MASTER_KEY_LEN]
    }

    fn salt(&self) -> &[u8] {
        &self.0[MASTER_KEY_LEN..]
    }
}

/// What an SDES negotiation settled on: the suite, our key (for what we send) and the
/// peer's (for what we receive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SrtpKeys {
    /// The suite both sides use.
    pub suite: SrtpSuite,
    /// Our master key: we protect with it.
    pub local: MasterKey,
    /// The peer's master key: we unprotect with it.
    pub remote: MasterKey,
}

/// Why a packet could not be protected or unprotected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SrtpError {
    /// The contexts could not be built (the crate refused the key).
    #[error("SRTP context: {0}")]
    Context(String),
    /// A received packet failed authentication, was a replay, or was too short (no detail:
    /// forged packets cost no allocation).
    #[error("SRTP packet rejected")]
    Rejected,
    /// New keys would change the suite under our unchanged master key: the fresh context
    /// would restart the keystream (a two-time pad), so a suite change needs a new key.
    #[error("SRTP suite change without a new master key")]
    SuiteChangeWithSameKey,
    /// A packet to send could not be protected.
    #[error("SRTP protect: {0}")]
    Protect(String),
    /// The protected packet does not fit the caller's buffer.
    #[error("protected packet of {needed} bytes does not fit {have}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
}

/// The SRTP state of one leg: both directions, RTP and RTCP.
///
/// The crate's contexts are `Send` but not `Sync`; each sits in a `Mutex` only so that the
/// session is `Sync` (a leg's task is shared by reference across awaits). It is never
/// locked: every use goes through `&mut self` and [`Mutex::get_mut`].
pub struct SrtpSession {
    keys: SrtpKeys,
    outbound: Mutex<Context>,
    inbound: Mutex<Inbound>,
}

/// The value of a `Mutex` reached through `&mut` (see [`SrtpSession`]): never locked, so
/// never poisoned.
fn unlocked<T>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(PoisonError::into_inner)
}

/// A context keyed with `key`, with replay windows when it is for what we receive.
fn keyed(suite: SrtpSuite, key: &MasterKey, replay: bool) -> Result<Context, SrtpError> {
    let provider =
        rtc_srtp::crypto::default_provider().map_err(|e| SrtpError::Context(e.to_string()))?;
    let (rtp, rtcp) = if replay {
        (
            Some(srtp_replay_protection(REPLAY_WINDOW)),
            Some(srtcp_replay_protection(REPLAY_WINDOW)),
        )
    } else {
        (None, None)
    };
    Context::new(
        key.key(),
        key.salt(),
        suite.profile(),
        rtp,
        rtcp,
        provider.crypto(),
    )
    .map_err(|e| SrtpError::Context(e.to_string()))
}

/// Distinct SSRCs (RTP and RTCP counted apart) that may reach the crate before one of
/// them authenticates.
const MAX_UNAUTHENTICATED_SSRCS: usize = 8;

/// The receiving context, and which SSRCs it has seen.
///
/// The crate makes per-SSRC state (with a replay window) for every packet *before* it checks
/// the tag, and never drops it: forged packets with random SSRCs would grow it without
/// bound. So only SSRCs that have authenticated, plus at most
/// [`MAX_UNAUTHENTICATED_SSRCS`] others, reach it. Once that many others have: while
/// nothing has authenticated yet the context is rebuilt (it holds only forgeries' state, so
/// the peer's first packet still gets through a flood); after that, packets of unknown
/// SSRCs are dropped (rejected) before the crate, since a rebuild would lose the peer's
/// rollover counter and replay window.
struct Inbound {
    context: Context,
    suite: SrtpSuite,
    key: MasterKey,
    /// `(is RTCP, SSRC)` that have authenticated.
    authenticated: HashSet<(bool, u32)>,
    /// `(is RTCP, SSRC)` passed to the crate that have not (yet).
    unauthenticated: HashSet<(bool, u32)>,
}

impl Inbound {
    fn new(suite: SrtpSuite, key: MasterKey) -> Result<Self, SrtpError> {
        Ok(Self {
            context: keyed(suite, &key, true)?,
            suite,
            key,
            authenticated: HashSet::new(),
            unauthenticated: HashSet::new(),
        })
    }

    /// Passes `data` to `decrypt` if its SSRC may reach the crate, and notes the SSRC.
    fn decrypt<E>(
        &mut self,
        id: (bool, u32),
        decrypt: impl FnOnce(&mut Context) -> Result<BytesMut, E>,
    ) -> Result<BytesMut, SrtpError> {
        if !self.authenticated.contains(&id) && !self.unauthenticated.contains(&id) {
            if self.unauthenticated.len() >= MAX_UNAUTHENTICATED_SSRCS {
                if !self.authenticated.is_empty() {
                    return Err(SrtpError::Rejected);
                }
                self.context = keyed(self.suite, &self.key, true)?;
                self.unauthenticated.clear();
            }
            self.unauthenticated.insert(id);
        }
        let plain = decrypt(&mut self.context).map_err(|_| SrtpError::Rejected)?;
        if self.unauthenticated.remove(&id) {
            self.authenticated.insert(id);
        }
        Ok(plain)
    }

    /// SSRCs the crate holds state for.
    #[cfg(test)]
    fn ssrcs(&self) -> usize {
        self.authenticated.len() + self.unauthenticated.len()
    }
}

impl fmt::Debug for SrtpSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SrtpSession")
            .field("suite", &self.keys.suite)
            .finish_non_exhaustive()
    }
}

impl SrtpSession {
    /// Contexts for the negotiated keys; received packets get a replay window.
    pub fn new(keys: SrtpKeys) -> Result<Self, SrtpError> {
        Ok(Self {
            outbound: Mutex::new(keyed(keys.suite, &keys.local, false)?),
            inbound: Mutex::new(Inbound::new(keys.suite, keys.remote)?),
            keys,
        })
    }

    /// Takes new keys, rebuilding only the direction whose key or suite changed: the
    /// outbound context must go on with its rollover counter and SRTCP index, since a fresh
    /// one under the same key and SSRC would repeat keystream already sent. For the same
    /// reason a suite change under our unchanged key is refused
    /// ([`SrtpError::SuiteChangeWithSameKey`]); the session is then unchanged.
    pub fn rekey(&mut self, keys: SrtpKeys) -> Result<(), SrtpError> {
        let suite_changed = keys.suite != self.keys.suite;
        if suite_changed && keys.local == self.keys.local {
            return Err(SrtpError::SuiteChangeWithSameKey);
        }
        let outbound = (suite_changed || keys.local != self.keys.local)
            .then(|| keyed(keys.suite, &keys.local, false))
            .transpose()?;
        let inbound = (suite_changed || keys.remote != self.keys.remote)
            .then(|| Inbound::new(keys.suite, keys.remote))
            .transpose()?;
        if let Some(c) = outbound {
            self.outbound = Mutex::new(c);
        }
        if let Some(c) = inbound {
            self.inbound = Mutex::new(c);
        }
        self.keys = keys;
        Ok(())
    }

    /// The keys the session was built with.
    pub fn keys(&self) -> &SrtpKeys {
        &self.keys
    }

    /// Protects the RTP packet in `buf[..len]` in place; returns the protected length.
    pub fn protect_rtp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let protected = unlocked(&mut self.outbound)
            .encrypt_rtp(&buf[..len])
            .map_err(|e| SrtpError::Protect(e.to_string()))?;
        copy_back(&protected, buf)
    }

    /// Protects the RTCP compound packet in `buf[..len]` in place; returns the new length.
    pub fn protect_rtcp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let protected = unlocked(&mut self.outbound)
            .encrypt_rtcp(&buf[..len])
            .map_err(|e| SrtpError::Protect(e.to_string()))?;
        copy_back(&protected, buf)
    }

    /// Authenticates and decrypts a received SRTP packet (replays are rejected).
    pub fn unprotect_rtp(&mut self, data: &[u8]) -> Result<BytesMut, SrtpError> {
        let ssrc = ssrc_at(data, 8).ok_or(SrtpError::Rejected)?;
        unlocked(&mut self.inbound).decrypt((false, ssrc), |c| c.decrypt_rtp(data))
    }

    /// Authenticates and decrypts a received SRTCP packet (replays are rejected).
    ///
    /// A packet whose E flag is clear is refused here: the crate returns such a packet
    /// without checking its tag, and SDES as we negotiate it (no `UNENCRYPTED_SRTCP`) has
    /// every SRTCP packet encrypted, so a clear flag can only be a forgery.
    pub fn unprotect_rtcp(&mut self, data: &[u8]) -> Result<BytesMut, SrtpError> {
        let e_flag = data
            .len()
            .checked_sub(SRTCP_TAG_LEN + SRTCP_INDEX_LEN)
            .filter(|&at| at >= RTCP_HEADER_LEN)
            .map(|at| data[at] & 0x80 != 0);
        let ssrc = ssrc_at(data, 4).ok_or(SrtpError::Rejected)?;
        if e_flag != Some(true) {
            return Err(SrtpError::Rejected);
        }
        unlocked(&mut self.inbound).decrypt((true, ssrc), |c| c.decrypt_rtcp(data))
    }
}

/// The SSRC at `at` (RTP: 8, RTCP: 4), if the packet is that long.
fn ssrc_at(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at + 4)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn copy_back(protected: &[u8], buf: &mut [u8]) -> Result<usize, SrtpError> {
    let Some(dst) = buf.get_mut(..protected.len()) else {
        return Err(SrtpError::BufferTooSmall {
            needed: protected.len(),
            have: buf.len(),
        });
    };
    dst.copy_from_slice(protected);
    Ok(protected.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 3711 Appendix B.3's master key and salt (key derivation test vectors); the
    /// packet protected with them is libsrtp's reference packet (`srtp_driver`), whose
    /// ciphertext can only come out right when the derived session key, salt and
    /// authentication key are B.3's.
    fn rfc3711_key() -> MasterKey {
        let mut bytes = [0u8; 30];
        bytes[..16].copy_from_slice(&hex("E1F97A0D3E018BE0D64FA32C06DE4139"));
        bytes[16..].copy_from_slice(&hex("0EC675AD498AFEEBB6960B3AABE6"));
        MasterKey::from_bytes(bytes)
    }

    const PLAIN: &str = "800f1234decafbadcafebabeabababababababababababababababab";
    const CIPHER_80: &str =
        "800f1234decafbadcafebabe4e55dc4ce79978d88ca4d215949d2402b78d6acc99ea179b8dbb";

    fn session(suite: SrtpSuite) -> SrtpSession {
        SrtpSession::new(SrtpKeys {
            suite,
            local: rfc3711_key(),
            remote: rfc3711_key(),
        })
        .unwrap()
    }

    #[test]
    fn protects_the_reference_packet_with_both_suites() {
        for (suite, expected) in [
            (SrtpSuite::AesCm128HmacSha1_80, CIPHER_80.to_string()),
            // Same keystream and HMAC; the tag is cut to its first 4 bytes.
            (
                SrtpSuite::AesCm128HmacSha1_32,
                CIPHER_80[..CIPHER_80.len() - 12].to_string(),
            ),
        ] {
            let mut s = session(suite);
            let plain = hex(PLAIN);
            let mut buf = [0u8; 64];
            buf[..plain.len()].copy_from_slice(&plain);
            let len = s.protect_rtp(&mut buf, plain.len()).unwrap();
            assert_eq!(len, plain.len() + suite.rtp_tag_len(), "{suite}");
            assert_eq!(buf[..len], hex(&expected)[..], "{suite}");
            // The inbound context has the same key here: the packet comes back whole.
            assert_eq!(s.unprotect_rtp(&buf[..len]).unwrap()[..], plain[..]);
        }
    }

    #[test]
    fn a_tampered_packet_or_a_replay_is_rejected() {
        let mut s = session(SrtpSuite::AesCm128HmacSha1_80);
        let good = hex(CIPHER_80);
        let mut bad = good.clone();
        bad[14] ^= 1;
        assert!(matches!(s.unprotect_rtp(&bad), Err(SrtpError::Rejected)));
        assert!(s.unprotect_rtp(&good).is_ok());
        assert!(matches!(s.unprotect_rtp(&good), Err(SrtpError::Rejected)));
        // Garbage of every short length is an error, never a panic.
        for n in 0..good.len() {
            assert!(s.unprotect_rtp(&good[..n]).is_err());
            assert!(s.unprotect_rtcp(&good[..n]).is_err());
        }
    }

    #[test]
    fn protects_the_reference_rtcp_packet_with_the_80_bit_tag_on_both_suites() {
        // libsrtp's reference SRTCP packet: SRTCP index 1 with the E bit, then the tag.
        let rtcp = hex("81c8000bcafebabeabababababababababababababababab");
        let expected =
            hex("81c8000bcafebabe7128035be487b9bdbef89041f977a5a880000001993e08cd54d6c1230798");
        for suite in SrtpSuite::ALL {
            let mut s = session(suite);
            let mut buf = [0u8; 64];
            buf[..rtcp.len()].copy_from_slice(&rtcp);
            let len = s.protect_rtcp(&mut buf, rtcp.len()).unwrap();
            assert_eq!(buf[..len], expected[..], "{suite}");
            assert_eq!(s.unprotect_rtcp(&buf[..len]).unwrap()[..], rtcp[..]);
            assert!(s.unprotect_rtcp(&buf[..len]).is_err(), "a replay");
        }
    }

    #[test]
    fn srtcp_with_the_e_flag_cleared_is_refused_not_passed_through() {
        let mut s = session(SrtpSuite::AesCm128HmacSha1_80);
        // A forged RR: clear E flag, any index and tag.
        let forged = hex("80c90001deadbeef000000010000000000000000000000");
        assert!(matches!(
            s.unprotect_rtcp(&forged),
            Err(SrtpError::Rejected)
        ));
    }

    /// Forged packets with distinct SSRCs make the crate keep state per SSRC before the tag
    /// check: only a bounded number reach it, and the peer's packets still get through,
    /// before and after its SSRC has authenticated.
    #[test]
    fn a_flood_of_forged_ssrcs_keeps_bounded_state_and_the_peer_gets_through() {
        let mut sender = session(SrtpSuite::AesCm128HmacSha1_80);
        let mut receiver = session(SrtpSuite::AesCm128HmacSha1_80);
        let genuine = |s: &mut SrtpSession, seq: u16| {
            let mut buf = [0u8; 64];
            let plain = hex(PLAIN);
            buf[..plain.len()].copy_from_slice(&plain);
            buf[2..4].copy_from_slice(&seq.to_be_bytes());
            let len = s.protect_rtp(&mut buf, plain.len()).unwrap();
            buf[..len].to_vec()
        };
        let flood = |r: &mut SrtpSession, from: u32| {
            let mut forged = hex(CIPHER_80);
            for ssrc in from..from + 10_000 {
                forged[8..12].copy_from_slice(&ssrc.to_be_bytes());
                assert_eq!(r.unprotect_rtp(&forged), Err(SrtpError::Rejected));
                forged[1] = 0xc8; // the same as SRTCP
                forged[4..8].copy_from_slice(&ssrc.to_be_bytes());
                assert_eq!(r.unprotect_rtcp(&forged), Err(SrtpError::Rejected));
                forged[1] = 0x0f;
                let held = unlocked(&mut r.inbound).ssrcs();
                assert!(held <= MAX_UNAUTHENTICATED_SSRCS + 1, "{held} SSRCs");
            }
        };
        flood(&mut receiver, 1);
        let first = genuine(&mut sender, 0x1234);
        assert!(receiver.unprotect_rtp(&first).is_ok());
        flood(&mut receiver, 100_000);
        let second = genuine(&mut sender, 0x1235);
        assert!(receiver.unprotect_rtp(&second).is_ok());
        assert_eq!(receiver.unprotect_rtp(&second), Err(SrtpError::Rejected));
    }

    #[test]
    fn a_buffer_without_room_for_the_tag_is_an_error() {
        let mut s = session(SrtpSuite::AesCm128HmacSha1_80);
        let plain = hex(PLAIN);
        let mut buf = plain.clone();
        assert!(matches!(
            s.protect_rtp(&mut buf, plain.len()),
            Err(SrtpError::BufferTooSmall { .. })
        ));
    }

    #[test]
    fn keys_round_trip_through_base64_and_stay_out_of_debug() {
        let key = rfc3711_key();
        let text = key.to_base64();
        assert_eq!(text.len(), 40);
        assert_eq!(MasterKey::from_base64(&text), Some(key));
        assert_eq!(MasterKey::from_base64(&format!("{text}==")), Some(key));
        assert_eq!(MasterKey::from_base64(&text[..36]), None);
        assert_eq!(MasterKey::from_base64("not base64!"), None);
        assert_eq!(format!("{key:?}"), "MasterKey(..)");
        assert_ne!(MasterKey::random(), MasterKey::random());
        assert_eq!(
            SrtpSuite::from_name("AES_CM_128_HMAC_SHA1_32"),
            Some(SrtpSuite::AesCm128HmacSha1_32)
        );
        assert_eq!(SrtpSuite::from_name("AEAD_AES_128_GCM"), None);
    }
}
