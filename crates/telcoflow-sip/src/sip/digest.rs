//! HTTP digest authentication for SIP (RFC 3261 22.4, RFC 2617, RFC 7616): answering a
//! trunk's `401` / `407` challenge when we dial out, and checking the answers of peers that
//! call us ([`Challenge::to_header_value`], [`Authorization::parse`], [`verify`]).
//!
//! Contract: pure functions, no clock or randomness inside. The caller passes the client
//! nonce (`cnonce`, random per challenge) and the nonce count, so results are reproducible.
//! Flow: on a 401 or 407, [`challenge_of`] finds the challenge and the header to answer
//! with; [`authorize`] builds that header's value; resend the request with a new CSeq and
//! branch and the header added. Algorithms: MD5, MD5-sess, SHA-256, SHA-256-sess; qop `auth`
//! when offered, else the RFC 2069 form (no qop).

use md5::{Digest as _, Md5};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use super::message::{Method, Response, SipHeaders};

/// Why a challenge cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// The scheme is not Digest.
    #[error("not a Digest challenge")]
    NotDigest,
    /// A required parameter (realm, nonce) is missing.
    #[error("challenge lacks {0}")]
    Missing(&'static str),
    /// The algorithm is not one we implement.
    #[error("unsupported digest algorithm {0}")]
    UnsupportedAlgorithm(String),
    /// Only `auth-int` is offered, which we do not implement.
    #[error("unsupported qop {0}")]
    UnsupportedQop(String),
}

/// Digest hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// MD5 (the default when none is named).
    Md5,
    /// MD5-sess.
    Md5Sess,
    /// SHA-256 (RFC 7616).
    Sha256,
    /// SHA-256-sess.
    Sha256Sess,
}

impl Algorithm {
    fn parse(s: &str) -> Result<Self, DigestError> {
        match s.to_ascii_uppercase().as_str() {
            "MD5" => Ok(Self::Md5),
            "MD5-SESS" => Ok(Self::Md5Sess),
            "SHA-256" => Ok(Self::Sha256),
            "SHA-256-SESS" => Ok(Self::Sha256Sess),
            _ => Err(DigestError::UnsupportedAlgorithm(s.to_string())),
        }
    }

    /// The token as written in headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Md5 => "MD5",
            Self::Md5Sess => "MD5-sess",
            Self::Sha256 => "SHA-256",
            Self::Sha256Sess => "SHA-256-sess",
        }
    }

    fn hash(self, data: &str) -> String {
        let bytes: Vec<u8> = match self {
            Self::Md5 | Self::Md5Sess => Md5::digest(data.as_bytes()).to_vec(),
            Self::Sha256 | Self::Sha256Sess => Sha256::digest(data.as_bytes()).to_vec(),
        };
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 0x0F)]));
        }
        hex
    }

    fn is_sess(self) -> bool {
        matches!(self, Self::Md5Sess | Self::Sha256Sess)
    }
}

/// A parsed `WWW-Authenticate` / `Proxy-Authenticate` Digest challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Protection space.
    pub realm: String,
    /// Server nonce.
    pub nonce: String,
    /// Opaque value to echo.
    pub opaque: Option<String>,
    /// Hash algorithm.
    pub algorithm: Algorithm,
    /// Whether qop=auth was offered (else the RFC 2069 form is used).
    pub qop_auth: bool,
    /// The previous nonce expired; the credentials were right.
    pub stale: bool,
}

/// Splits `a="x, y", b=z` into pairs, honouring quotes and backslash escapes.
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if name.is_empty() {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        out.push((name, value));
    }
}

/// The parameters of a `Digest ...` header value (a challenge or an answer to one).
fn digest_params(value: &str) -> Result<Vec<(String, String)>, DigestError> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("Digest") {
        return Err(DigestError::NotDigest);
    }
    Ok(auth_params(rest))
}

/// The `algorithm` parameter's value; MD5 when it is absent.
fn algorithm_param(value: Option<&str>) -> Result<Algorithm, DigestError> {
    value.map_or(Ok(Algorithm::Md5), Algorithm::parse)
}

impl Challenge {
    /// Parses a challenge header value.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        let params = digest_params(value)?;
        let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        let algorithm = algorithm_param(get("algorithm"))?;
        let qop_auth = match get("qop") {
            None => false,
            Some(q) => {
                let offered: Vec<&str> = q.split(',').map(str::trim).collect();
                if offered.iter().any(|o| o.eq_ignore_ascii_case("auth")) {
                    true
                } else {
                    return Err(DigestError::UnsupportedQop(q.to_string()));
                }
            }
        };
        Ok(Self {
            realm: get("realm")
                .ok_or(DigestError::Missing("realm"))?
                .to_string(),
            nonce: get("nonce")
                .ok_or(DigestError::Missing("nonce"))?
                .to_string(),
            opaque: get("opaque").map(str::to_string),
            algorithm,
            qop_auth,
            stale: get("stale").is_some_and(|s| s.eq_ignore_ascii_case("true")),
        })
    }
}

impl Challenge {
    /// A challenge to send in a `WWW-Authenticate` / `Proxy-Authenticate` header.
    pub fn new(realm: &str, nonce: &str, algorithm: Algorithm) -> Self {
        Self {
            realm: realm.to_owned(),
            nonce: nonce.to_owned(),
            opaque: None,
            algorithm,
            qop_auth: true,
            stale: false,
        }
    }

    /// The header value, e.g. `Digest realm="x", nonce="n", algorithm=MD5, qop="auth"`.
    pub fn to_header_value(&self) -> String {
        let mut out = format!(
            "Digest realm={}, nonce={}, algorithm={}",
            quote(&self.realm),
            quote(&self.nonce),
            self.algorithm.as_str()
        );
        if self.qop_auth {
            out.push_str(", qop=\"auth\"");
        }
        if let Some(o) = &self.opaque {
            out.push_str(&format!(", opaque={}", quote(o)));
        }
        if self.stale {
            out.push_str(", stale=true");
        }
        out
    }
}

/// An `Authorization` / `Proxy-Authorization` Digest header sent to us by a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// User name.
    pub username: String,
    /// Protection space the caller answered.
    pub realm: String,
    /// The nonce we sent.
    pub nonce: String,
    /// The Request-URI the caller hashed.
    pub uri: String,
    /// The hash to check.
    pub response: String,
    /// Hash algorithm.
    pub algorithm: Algorithm,
    /// Client nonce (with qop or a -sess algorithm).
    pub cnonce: Option<String>,
    /// Nonce count as sent (8 hex digits), with qop.
    pub nc: Option<String>,
    /// Whether the caller used qop=auth (else the RFC 2069 form).
    pub qop_auth: bool,
}

impl Authorization {
    /// Parses a header value.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        let params = digest_params(value)?;
        let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let need = |n: &'static str| get(n).ok_or(DigestError::Missing(n));
        let algorithm = algorithm_param(get("algorithm").as_deref())?;
        let qop_auth = match get("qop") {
            None => false,
            Some(q) if q.eq_ignore_ascii_case("auth") => true,
            Some(q) => return Err(DigestError::UnsupportedQop(q)),
        };
        Ok(Self {
            username: need("username")?,
            realm: need("realm")?,
            nonce: need("nonce")?,
            uri: need("uri")?,
            response: need("response")?,
            algorithm,
            cnonce: get("cnonce"),
            nc: get("nc"),
            qop_auth,
        })
    }
}

/// Whether `auth` answers a challenge for `method` with the right password. The caller
/// checks separately that the nonce is one it issued and still fresh, and that the realm
/// and user name are the ones it expects.
pub fn verify(auth: &Authorization, password: &str, method: &Method) -> bool {
    let needs_cnonce = auth.qop_auth || auth.algorithm.is_sess();
    let (cnonce, nc) = match (&auth.cnonce, &auth.nc) {
        (Some(c), Some(n)) if auth.qop_auth => (c.as_str(), n.as_str()),
        (Some(c), _) if !auth.qop_auth => (c.as_str(), ""),
        (None, _) if !needs_cnonce => ("", ""),
        _ => return false,
    };
    let expected = digest_response(
        auth.algorithm,
        &auth.username,
        &auth.realm,
        password,
        &auth.nonce,
        method,
        &auth.uri,
        cnonce,
        nc,
        auth.qop_auth,
    );
    // Compared in time independent of where they differ.
    bool::from(
        expected
            .as_bytes()
            .ct_eq(auth.response.to_ascii_lowercase().as_bytes()),
    )
}

/// The `response` value of RFC 7616 3.4.1 (RFC 2069 form without qop).
#[allow(clippy::too_many_arguments)]
fn digest_response(
    alg: Algorithm,
    username: &str,
    realm: &str,
    password: &str,
    nonce: &str,
    method: &Method,
    uri: &str,
    cnonce: &str,
    nc: &str,
    qop_auth: bool,
) -> String {
    let mut ha1 = alg.hash(&format!("{username}:{realm}:{password}"));
    if alg.is_sess() {
        ha1 = alg.hash(&format!("{ha1}:{nonce}:{cnonce}"));
    }
    let ha2 = alg.hash(&format!("{}:{uri}", method.as_str()));
    if qop_auth {
        alg.hash(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
    } else {
        alg.hash(&format!("{ha1}:{nonce}:{ha2}"))
    }
}

/// The header carrying a challenge in `response`, and the header that must answer it:
/// `WWW-Authenticate` -> `Authorization` for 401, `Proxy-Authenticate` ->
/// `Proxy-Authorization` for 407. The first Digest challenge we can answer wins.
pub fn challenge_of(response: &Response) -> Option<(&'static str, Challenge)> {
    let (ask, answer) = match response.status {
        401 => ("WWW-Authenticate", "Authorization"),
        407 => ("Proxy-Authenticate", "Proxy-Authorization"),
        _ => return None,
    };
    response
        .headers()
        .get_all(ask)
        .find_map(|v| Challenge::parse(v).ok())
        .map(|c| (answer, c))
}

/// User credentials for a trunk.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Authentication user name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Builds the `Authorization` / `Proxy-Authorization` value answering `challenge` for a
/// request `method` to `uri` (the Request-URI as sent). `cnonce` is a fresh random string and
/// `nc` counts requests made with this nonce, starting at 1.
pub fn authorize(
    challenge: &Challenge,
    credentials: &Credentials,
    method: &Method,
    uri: &str,
    cnonce: &str,
    nc: u32,
) -> String {
    let alg = challenge.algorithm;
    let nc = format!("{nc:08x}");
    let response = digest_response(
        alg,
        &credentials.username,
        &challenge.realm,
        &credentials.password,
        &challenge.nonce,
        method,
        uri,
        cnonce,
        &nc,
        challenge.qop_auth,
    );
    let mut out = format!(
        "Digest username={}, realm={}, nonce={}, uri={}, response={}, algorithm={}",
        quote(&credentials.username),
        quote(&challenge.realm),
        quote(&challenge.nonce),
        quote(uri),
        quote(&response),
        alg.as_str()
    );
    if challenge.qop_auth || alg.is_sess() {
        out.push_str(&format!(", cnonce={}", quote(cnonce)));
    }
    if challenge.qop_auth {
        out.push_str(&format!(", qop=auth, nc={nc}"));
    }
    if let Some(o) = &challenge.opaque {
        out.push_str(&format!(", opaque={}", quote(o)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response_param(header: &str) -> String {
        auth_params(header.trim_start_matches("Digest "))
            .into_iter()
            .find(|(k, _)| k == "response")
            .map(|(_, v)| v)
            .unwrap()
    }

    fn mufasa(password: &str) -> Credentials {
        Credentials {
            username: "Mufasa".into(),
            password: password.into(),
        }
    }

    #[test]
    fn rfc2617_md5_example() {
        let c = Challenge::parse(
            "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", \
             nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", \
             opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .unwrap();
        assert!(c.qop_auth);
        assert_eq!(c.algorithm, Algorithm::Md5);
        let h = authorize(
            &c,
            &mufasa("Circle Of Life"),
            &Method::Other("GET".into()),
            "/dir/index.html",
            "0a4f113b",
            1,
        );
        assert_eq!(response_param(&h), "6629fae49393a05397450978507c4ef1");
        assert!(h.contains("nc=00000001"));
        assert!(h.contains("qop=auth"));
        assert!(h.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""));
    }

    #[test]
    fn rfc7616_md5_and_sha256_examples() {
        let base = "realm=\"http-auth@example.org\", qop=\"auth, auth-int\", \
                    nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\", \
                    opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\"";
        let cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        let get = Method::Other("GET".into());
        let md5 = Challenge::parse(&format!("Digest {base}, algorithm=MD5")).unwrap();
        let h = authorize(
            &md5,
            &mufasa("Circle of Life"),
            &get,
            "/dir/index.html",
            cnonce,
            1,
        );
        assert_eq!(response_param(&h), "8ca523f5e9506fed4657c9700eebdbec");
        let sha = Challenge::parse(&format!("Digest {base}, algorithm=SHA-256")).unwrap();
        assert_eq!(sha.algorithm, Algorithm::Sha256);
        let h = authorize(
            &sha,
            &mufasa("Circle of Life"),
            &get,
            "/dir/index.html",
            cnonce,
            1,
        );
        assert_eq!(
            response_param(&h),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn sip_challenge_without_qop() {
        // RFC 2069 form as many trunks still send it: response = MD5(HA1:nonce:HA2).
        let resp = {
            let mut r = Response::new(407);
            r.headers.push(
                "Proxy-Authenticate",
                "Digest realm=\"trunk.example\", nonce=\"abc123\"",
            );
            r
        };
        let (header, c) = challenge_of(&resp).unwrap();
        assert_eq!(header, "Proxy-Authorization");
        assert!(!c.qop_auth);
        let creds = Credentials {
            username: "1000".into(),
            password: "secret".into(),
        };
        let h = authorize(
            &c,
            &creds,
            &Method::Invite,
            "sip:+15550100@trunk.example",
            "x",
            1,
        );
        // Computed independently: md5(md5("1000:trunk.example:secret") + ":abc123:" +
        // md5("INVITE:sip:+15550100@trunk.example")).
        let ha1 = Algorithm::Md5.hash("1000:trunk.example:secret");
        let ha2 = Algorithm::Md5.hash("INVITE:sip:+15550100@trunk.example");
        assert_eq!(
            response_param(&h),
            Algorithm::Md5.hash(&format!("{ha1}:abc123:{ha2}"))
        );
        assert_eq!(Algorithm::Md5.hash(""), "d41d8cd98f00b204e9800998ecf8427e");
        assert!(!h.contains("qop="));
        assert!(!h.contains("cnonce="));
        assert!(h.starts_with("Digest username=\"1000\", realm=\"trunk.example\""));
    }

    #[test]
    fn md5_sess_uses_cnonce_in_ha1() {
        let c = Challenge::parse("Digest realm=\"r\", nonce=\"n\", algorithm=MD5-sess, qop=auth")
            .unwrap();
        let creds = mufasa("p");
        let a = authorize(&c, &creds, &Method::Register, "sip:r", "c1", 1);
        let b = authorize(&c, &creds, &Method::Register, "sip:r", "c2", 1);
        assert_ne!(response_param(&a), response_param(&b));
        let ha1 = Algorithm::Md5.hash(&format!("{}:n:c1", Algorithm::Md5.hash("Mufasa:r:p")));
        let ha2 = Algorithm::Md5.hash("REGISTER:sip:r");
        assert_eq!(
            response_param(&a),
            Algorithm::Md5.hash(&format!("{ha1}:n:00000001:c1:auth:{ha2}"))
        );
    }

    #[test]
    fn our_challenges_are_answered_and_verified() {
        for alg in [Algorithm::Md5, Algorithm::Sha256, Algorithm::Md5Sess] {
            for qop in [true, false] {
                let mut ours = Challenge::new("telcoflow", "n0nce", alg);
                ours.qop_auth = qop;
                // What a phone reads from our header, and answers.
                let theirs = Challenge::parse(&ours.to_header_value()).unwrap();
                assert_eq!(theirs, ours);
                let uri = "sip:+15550100@203.0.113.1";
                let header = authorize(&theirs, &mufasa("pw"), &Method::Invite, uri, "cn", 1);
                let auth = Authorization::parse(&header).unwrap();
                assert_eq!((auth.username.as_str(), auth.uri.as_str()), ("Mufasa", uri));
                assert!(verify(&auth, "pw", &Method::Invite), "{alg:?} qop={qop}");
                assert!(!verify(&auth, "pW", &Method::Invite));
                assert!(!verify(&auth, "pw", &Method::Bye), "bound to the method");
                let mut other_nonce = auth.clone();
                other_nonce.nonce = "n1".into();
                assert!(!verify(&other_nonce, "pw", &Method::Invite));
                let mut short = auth.clone();
                short.response.pop();
                assert!(!verify(&short, "pw", &Method::Invite));
            }
        }
        assert_eq!(
            Authorization::parse("Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\""),
            Err(DigestError::Missing("response"))
        );
        assert_eq!(
            Authorization::parse("Basic YTpi"),
            Err(DigestError::NotDigest)
        );
    }

    #[test]
    fn bad_challenges() {
        assert_eq!(
            Challenge::parse("Basic realm=\"x\""),
            Err(DigestError::NotDigest)
        );
        assert_eq!(
            Challenge::parse("Digest nonce=\"n\""),
            Err(DigestError::Missing("realm"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"r\""),
            Err(DigestError::Missing("nonce"))
        );
        assert!(matches!(
            Challenge::parse("Digest realm=\"r\", nonce=\"n\", algorithm=SHA-512-256"),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
        assert!(matches!(
            Challenge::parse("Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\""),
            Err(DigestError::UnsupportedQop(_))
        ));
        let stale = Challenge::parse("Digest realm=\"a, b\", nonce=\"n\", stale=TRUE").unwrap();
        assert!(stale.stale);
        assert_eq!(stale.realm, "a, b");
        assert!(challenge_of(&Response::new(401)).is_none());
        assert!(challenge_of(&Response::new(403)).is_none());
        let creds = format!("{:?}", mufasa("hunter2"));
        assert!(!creds.contains("hunter2"));
    }
}
