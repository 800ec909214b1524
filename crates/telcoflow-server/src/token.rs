//! Media tokens: bearer tokens that bind a media connection to one call, signed by the server.
//!
//! Format: `{call_id}.{expires_unix_ms}.{signature}` where the signature is HMAC-SHA256 over
//! `call_id.expires` with the server secret, base64url without padding. The call id travels in
//! clear because it is also in the URL; what matters is that nobody without the secret can make
//! a token for another call or extend one.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks media tokens.
#[derive(Clone)]
pub(crate) struct TokenSigner {
    key: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused. The text is what the client sees in the 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("media token is malformed")]
    Malformed,
    #[error("media token signature is invalid")]
    BadSignature,
    #[error("media token was issued for another call")]
    WrongCall,
    #[error("media token has expired")]
    Expired,
}

impl TokenSigner {
    pub(crate) fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            key: secret.to_vec(),
            ttl,
        }
    }

    /// A signer with a random secret: tokens do not survive a restart, which is what we want
    /// for a single process (calls do not survive one either).
    pub(crate) fn random(ttl: Duration) -> Self {
        let secret: [u8; 32] = rand::random();
        Self::new(&secret, ttl)
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        mac
    }

    pub(crate) fn issue(&self, call_id: &str, now: SystemTime) -> String {
        let expires = unix_ms(now + self.ttl);
        let payload = format!("{call_id}.{expires}");
        let sig = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    pub(crate) fn verify(
        &self,
        token: &str,
        call_id: &str,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (token_call, expires) = payload.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison of the signature.
        self.mac(payload)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        if token_call != call_id {
            return Err(TokenError::WrongCall);
        }
        if unix_ms(now) > expires {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch, as the protocol's timestamps use.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_verify() {
        let signer = TokenSigner::new(b"secret", Duration::from_secs(60));
        let now = SystemTime::now();
        let token = signer.issue("call-1", now);
        assert_eq!(signer.verify(&token, "call-1", now), Ok(()));
        assert_eq!(
            signer.verify(&token, "call-2", now),
            Err(TokenError::WrongCall)
        );
        assert_eq!(
            signer.verify(&token, "call-1", now + Duration::from_secs(61)),
            Err(TokenError::Expired)
        );
        let other = TokenSigner::new(b"other", Duration::from_secs(60));
        assert_eq!(
            other.verify(&token, "call-1", now),
            Err(TokenError::BadSignature)
        );
        // Tampering with the expiry breaks the signature.
        let (rest, sig) = token.rsplit_once('.').unwrap();
        let (call, _) = rest.rsplit_once('.').unwrap();
        let forged = format!("{call}.99999999999999.{sig}");
        assert_eq!(
            signer.verify(&forged, "call-1", now),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            signer.verify("garbage", "call-1", now),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            signer.verify("a.b.c", "call-1", now),
            Err(TokenError::Malformed)
        );
    }
}
