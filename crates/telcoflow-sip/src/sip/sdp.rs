//! SDP (RFC 4566) for audio calls and the offer/answer rules (RFC 3264) the server needs.
//!
//! Contract: [`SessionDescription::parse`] accepts any text and returns a typed
//! [`SdpError`] for malformed input (never panics); unknown lines and attributes are kept or
//! skipped, as RFC 4566 asks. [`answer`] negotiates an incoming offer (an INVITE or
//! re-INVITE body): it picks a codec of [`LocalMedia::codecs`] among PCMU (0), PCMA (8) and
//! G.722 (9) by the rule of [`answer`], accepts RFC 4733 `telephone-event` with the offerer's payload type, answers with the
//! offerer's `ptime` when it is within [`PTIME_RANGE_MS`] (else `ptime:20`), and reports hold (`a=sendonly`, `a=inactive`, or the older `c=0.0.0.0`). No common codec gives
//! [`NegotiationError::NoCommonCodec`], whose [`NegotiationError::status_code`] is 488.
//! [`offer`] and [`accept_answer`] are the same rules for calls we place.
//!
//! SRTP with SDES (RFC 4568): [`LocalMedia::srtp`] sets the policy ([`SrtpPolicy`]) and our
//! master key. An offer's `a=crypto` lines are read into [`MediaDescription::crypto`]; the
//! answer takes the first one whose suite we support ([`SrtpSuite`]) with a single
//! `inline:` key and no MKI or session parameters, and answers it with the same tag and our
//! key. `RTP/SAVP` without such a line, or SRTP offered while ours is off, or plain RTP while
//! ours is required, gives a 488 ([`NegotiationError::NoCryptoSuite`],
//! [`NegotiationError::SrtpRefused`], [`NegotiationError::SrtpRequired`]). An `RTP/AVP`
//! offer with `a=crypto` (best-effort SRTP, as some phones send it) is encrypted when our
//! policy allows SRTP. Our offers: `required` sends `RTP/SAVP` with both suites;
//! `optional` sends `RTP/AVP` with both suites' `a=crypto` (best effort: a peer that does
//! not know SDES ignores them and the call is plain).

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::rtp::codec::Codec;
use crate::rtp::g711::G711;
use crate::rtp::srtp::{MasterKey, SrtpKeys, SrtpSuite};

/// Packetisation time we send and ask for, in milliseconds.
pub const PTIME_MS: u32 = 20;
/// Packetisation times (ms) we follow when the peer asks for one; others get [`PTIME_MS`].
pub const PTIME_RANGE_MS: std::ops::RangeInclusive<u32> = 10..=60;

/// The packetisation time to use with a peer that asked for `asked` (ms).
fn ptime_for(asked: Option<u32>) -> u32 {
    asked
        .filter(|p| PTIME_RANGE_MS.contains(p))
        .unwrap_or(PTIME_MS)
}
/// Payload type we offer for telephone-event when we make the offer.
pub const DEFAULT_TELEPHONE_EVENT_PT: u8 = 101;

/// Why SDP text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    /// The body does not start with `v=0`.
    #[error("SDP must start with v=0")]
    MissingVersion,
    /// The body is not UTF-8 text.
    #[error("SDP is not UTF-8")]
    NotUtf8,
    /// A line is not `<letter>=<value>`.
    #[error("line {line}: not a <type>=<value> line")]
    BadLine {
        /// 1-based line number.
        line: usize,
    },
    /// A known line has a value we cannot read.
    #[error("line {line}: invalid {what}")]
    BadValue {
        /// 1-based line number.
        line: usize,
        /// Which field.
        what: &'static str,
    },
}

/// Why an offer or answer cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NegotiationError {
    /// The body is not valid SDP.
    #[error("invalid SDP: {0}")]
    Malformed(#[from] SdpError),
    /// No audio stream with a usable port.
    #[error("no audio stream offered")]
    NoAudio,
    /// Audio is offered, but with none of the codecs we accept ([`LocalMedia::codecs`]).
    #[error("no common codec")]
    NoCommonCodec,
    /// The audio stream has no connection address.
    #[error("audio stream has no connection address")]
    NoConnection,
    /// SRTP is offered (`RTP/SAVP`) with no `a=crypto` we support, or an answer to our
    /// SRTP offer has none of the crypto lines we offered.
    #[error("no supported SRTP crypto suite")]
    NoCryptoSuite,
    /// SRTP is offered but off for this peer.
    #[error("SRTP is not enabled for this peer")]
    SrtpRefused,
    /// Plain RTP is offered or answered but SRTP is required for this peer.
    #[error("SRTP is required for this peer")]
    SrtpRequired,
}

impl NegotiationError {
    /// The SIP status to reject the INVITE with: 400 for unreadable SDP, 488 (Not Acceptable
    /// Here) otherwise.
    pub fn status_code(&self) -> u16 {
        match self {
            Self::Malformed(_) => 400,
            _ => 488,
        }
    }
}

/// Media direction attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// `a=sendrecv` (the default).
    #[default]
    SendRecv,
    /// `a=sendonly`.
    SendOnly,
    /// `a=recvonly`.
    RecvOnly,
    /// `a=inactive`.
    Inactive,
}

impl Direction {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "sendrecv" => Some(Self::SendRecv),
            "sendonly" => Some(Self::SendOnly),
            "recvonly" => Some(Self::RecvOnly),
            "inactive" => Some(Self::Inactive),
            _ => None,
        }
    }

    /// The attribute name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SendRecv => "sendrecv",
            Self::SendOnly => "sendonly",
            Self::RecvOnly => "recvonly",
            Self::Inactive => "inactive",
        }
    }

    /// The direction an answerer uses for this offered direction (RFC 3264 6.1).
    pub fn reversed(self) -> Self {
        match self {
            Self::SendOnly => Self::RecvOnly,
            Self::RecvOnly => Self::SendOnly,
            d => d,
        }
    }

    /// Whether the side using this direction sends media.
    pub fn sends(self) -> bool {
        matches!(self, Self::SendRecv | Self::SendOnly)
    }

    /// Whether the side using this direction receives media.
    pub fn receives(self) -> bool {
        matches!(self, Self::SendRecv | Self::RecvOnly)
    }
}

/// An `a=rtpmap` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpMap {
    /// Payload type.
    pub payload_type: u8,
    /// Encoding name as written (compare case-insensitively).
    pub encoding: String,
    /// Clock rate in Hz.
    pub clock_rate: u32,
    /// Channels, if given.
    pub channels: Option<u8>,
}

/// The `o=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// User name (`-` when none).
    pub username: String,
    /// Session id.
    pub session_id: u64,
    /// Session version; an answerer increments it in each new answer of a session.
    pub session_version: u64,
    /// Address of the originator.
    pub address: IpAddr,
}

/// One `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    /// Media type (`audio`, `video`, ...).
    pub media: String,
    /// Transport port (0 = rejected or disabled stream).
    pub port: u16,
    /// Transport protocol (`RTP/AVP`, ...).
    pub protocol: String,
    /// Format list as written (payload type numbers for RTP).
    pub formats: Vec<String>,
    /// Media-level `c=` address.
    pub connection: Option<IpAddr>,
    /// `a=rtpmap` entries.
    pub rtpmaps: Vec<RtpMap>,
    /// `a=fmtp` entries: payload type and parameters.
    pub fmtps: Vec<(u8, String)>,
    /// `a=ptime`, in milliseconds.
    pub ptime: Option<u32>,
    /// `a=rtcp` port (RFC 3605), when RTCP is not on the RTP port + 1.
    pub rtcp_port: Option<u16>,
    /// Direction attribute, if present at media level.
    pub direction: Option<Direction>,
    /// `a=crypto` lines (RFC 4568), in order.
    pub crypto: Vec<CryptoAttribute>,
    /// Other attributes, verbatim without `a=`.
    pub other: Vec<String>,
}

/// Whether a peer's calls use SRTP (SDES).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SrtpPolicy {
    /// Plain RTP only: `RTP/SAVP` offers are refused, `a=crypto` is ignored.
    #[default]
    Off,
    /// SRTP when the peer offers or accepts it, else plain RTP.
    Optional,
    /// SRTP only: plain offers are refused and a plain answer fails the call.
    Required,
}

impl SrtpPolicy {
    /// The name in the config: `off`, `optional`, `required`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }

    /// The policy a config name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Off, Self::Optional, Self::Required]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name))
    }
}

/// Our side of SDES: the policy, and our master key for what we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSrtp {
    /// Whether SRTP is off, optional or required.
    pub policy: SrtpPolicy,
    /// Our master key and salt, sent in `a=crypto`: kept for the call while the suite stays.
    pub key: MasterKey,
    /// The suite our key protects with once negotiated ([`LocalMedia::keep_srtp`]): a
    /// re-offer offers only it, and an answer that changes it carries a fresh key (a key
    /// restarted under another suite would repeat keystream already sent).
    pub suite: Option<SrtpSuite>,
}

impl LocalSrtp {
    /// Our side under `policy` with `key`, before any negotiation.
    pub fn new(policy: SrtpPolicy, key: MasterKey) -> Self {
        Self {
            policy,
            key,
            suite: None,
        }
    }
}

/// An `a=crypto` line: `TAG SUITE KEY-PARAMS [SESSION-PARAMS]`.
///
/// `Debug` does not show the key parameters: keys never reach the logs.
#[derive(Clone, PartialEq, Eq)]
pub struct CryptoAttribute {
    /// The tag an answer names the chosen line by.
    pub tag: u32,
    /// The suite as written.
    pub suite: String,
    /// Key parameters (`inline:KEY||SALT[|LIFETIME][|MKI:LEN]`, `;`-separated).
    pub key_params: String,
    /// Session parameters, if any.
    pub session_params: Vec<String>,
}

impl fmt::Debug for CryptoAttribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CryptoAttribute")
            .field("tag", &self.tag)
            .field("suite", &self.suite)
            .field("key_params", &"..")
            .field("session_params", &self.session_params)
            .finish()
    }
}

impl CryptoAttribute {
    fn parse(arg: &str) -> Option<Self> {
        let mut f = arg.split_ascii_whitespace();
        let tag = f.next()?.parse().ok()?;
        let suite = f.next()?.to_string();
        let key_params = f.next()?.to_string();
        Some(Self {
            tag,
            suite,
            key_params,
            session_params: f.map(str::to_string).collect(),
        })
    }

    /// The suite and master key, when we can use this line: a suite we support, one
    /// `inline:` key of the right length, no MKI (we key one stream with one key), no session
    /// parameters (each changes the transform, RFC 4568 6.3). A lifetime is accepted and not
    /// enforced: a call never comes near 2^31 packets.
    pub fn usable(&self) -> Option<(SrtpSuite, MasterKey)> {
        let suite = SrtpSuite::from_name(&self.suite)?;
        if !self.session_params.is_empty() || self.key_params.contains(';') {
            return None;
        }
        let inline = self.key_params.strip_prefix("inline:")?;
        let mut parts = inline.split('|');
        let key = MasterKey::from_base64(parts.next()?)?;
        let rest: Vec<&str> = parts.collect();
        let mki = rest.iter().any(|p| p.contains(':'));
        (!mki && rest.len() <= 1).then_some((suite, key))
    }

    fn ours(tag: u32, suite: SrtpSuite, key: &MasterKey) -> Self {
        Self {
            tag,
            suite: suite.name().into(),
            key_params: format!("inline:{}", key.to_base64()),
            session_params: Vec::new(),
        }
    }
}

impl MediaDescription {
    /// An `m=` line with no attributes and no media-level `c=`.
    fn bare(media: String, port: u16, protocol: String, formats: Vec<String>) -> Self {
        Self {
            media,
            port,
            protocol,
            formats,
            connection: None,
            rtpmaps: Vec::new(),
            fmtps: Vec::new(),
            ptime: None,
            rtcp_port: None,
            direction: None,
            crypto: Vec::new(),
            other: Vec::new(),
        }
    }

    /// Payload types in the format list that parse as numbers, in order.
    pub fn payload_types(&self) -> impl Iterator<Item = u8> + '_ {
        self.formats.iter().filter_map(|f| f.parse().ok())
    }

    /// The rtpmap of a payload type.
    pub fn rtpmap(&self, pt: u8) -> Option<&RtpMap> {
        self.rtpmaps.iter().find(|m| m.payload_type == pt)
    }

    /// The G.711 law a payload type stands for here: static 0/8 unless remapped, or a
    /// dynamic type mapped to PCMU/PCMA at 8000 Hz.
    pub fn g711_for(&self, pt: u8) -> Option<G711> {
        match self.rtpmap(pt) {
            Some(map) if map.clock_rate == 8000 => [G711::Pcmu, G711::Pcma]
                .into_iter()
                .find(|law| map.encoding.eq_ignore_ascii_case(law.encoding_name())),
            Some(_) => None,
            None => G711::from_payload_type(pt),
        }
    }

    /// The codec a payload type stands for here: a static type (0, 8, 9) unless remapped, or
    /// a dynamic type mapped to PCMU, PCMA or G722 at 8000 Hz (G.722's RTP clock, RFC 3551
    /// 4.5.2).
    pub fn codec_for(&self, pt: u8) -> Option<Codec> {
        match self.rtpmap(pt) {
            Some(map) if map.clock_rate == Codec::CLOCK_RATE => Codec::from_name(&map.encoding),
            Some(_) => None,
            None => Codec::from_payload_type(pt),
        }
    }

    /// The payload type of `telephone-event/8000`, if offered.
    pub fn telephone_event(&self) -> Option<u8> {
        self.rtpmaps
            .iter()
            .find(|m| m.encoding.eq_ignore_ascii_case("telephone-event") && m.clock_rate == 8000)
            .map(|m| m.payload_type)
    }
}

/// A session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    /// `o=`.
    pub origin: Origin,
    /// `s=`.
    pub session_name: String,
    /// Session-level `c=` address.
    pub connection: Option<IpAddr>,
    /// Session-level direction attribute.
    pub direction: Option<Direction>,
    /// Media sections in order.
    pub media: Vec<MediaDescription>,
}

fn parse_connection(v: &str, line: usize) -> Result<IpAddr, SdpError> {
    let bad = SdpError::BadValue {
        line,
        what: "connection",
    };
    let mut parts = v.split_ascii_whitespace();
    let (Some("IN"), Some(_addrtype), Some(addr)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    // Multicast addresses carry "/ttl"; keep the address.
    let addr = addr.split('/').next().unwrap_or(addr);
    addr.parse().map_err(|_| bad)
}

impl SessionDescription {
    /// Parses a message body.
    pub fn parse_bytes(body: &[u8]) -> Result<Self, SdpError> {
        Self::parse(std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?)
    }

    /// Parses SDP text (CRLF or LF line ends).
    pub fn parse(text: &str) -> Result<Self, SdpError> {
        let mut lines = text
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .enumerate()
            .filter(|(_, l)| !l.is_empty());
        match lines.next() {
            Some((_, "v=0")) => {}
            _ => return Err(SdpError::MissingVersion),
        }
        let mut sd = Self {
            origin: Origin {
                username: "-".into(),
                session_id: 0,
                session_version: 0,
                address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            },
            session_name: "-".into(),
            connection: None,
            direction: None,
            media: Vec::new(),
        };
        for (i, l) in lines {
            let line = i + 1;
            let (kind, value) = match l.split_once('=') {
                Some((k, v)) if k.len() == 1 => (k, v.trim()),
                _ => return Err(SdpError::BadLine { line }),
            };
            let media = sd.media.last_mut();
            match (kind, media) {
                ("o", _) => {
                    let f: Vec<&str> = value.split_ascii_whitespace().collect();
                    let bad = SdpError::BadValue {
                        line,
                        what: "origin",
                    };
                    if f.len() != 6 {
                        return Err(bad);
                    }
                    sd.origin = Origin {
                        username: f[0].to_string(),
                        session_id: f[1].parse().map_err(|_| bad.clone())?,
                        session_version: f[2].parse().map_err(|_| bad.clone())?,
                        address: f[5].parse().map_err(|_| bad)?,
                    };
                }
                ("s", _) => sd.session_name = value.to_string(),
                ("c", None) => sd.connection = Some(parse_connection(value, line)?),
                ("c", Some(m)) => m.connection = Some(parse_connection(value, line)?),
                ("m", _) => {
                    let mut f = value.split_ascii_whitespace();
                    let bad = SdpError::BadValue {
                        line,
                        what: "media",
                    };
                    let (Some(media), Some(port), Some(protocol)) = (f.next(), f.next(), f.next())
                    else {
                        return Err(bad);
                    };
                    // "port/count" is allowed; we use the first port.
                    let port = port.split('/').next().unwrap_or(port);
                    sd.media.push(MediaDescription::bare(
                        media.to_string(),
                        port.parse().map_err(|_| bad)?,
                        protocol.to_string(),
                        f.map(str::to_string).collect(),
                    ));
                }
                ("a", m) => {
                    let (name, arg) = match value.split_once(':') {
                        Some((n, a)) => (n, Some(a.trim())),
                        None => (value, None),
                    };
                    if let Some(dir) = Direction::parse(name) {
                        match m {
                            Some(m) => m.direction = Some(dir),
                            None => sd.direction = Some(dir),
                        }
                        continue;
                    }
                    let Some(m) = m else { continue };
                    match (name, arg) {
                        ("rtpmap", Some(arg)) => {
                            m.rtpmaps.push(parse_rtpmap(arg).ok_or(SdpError::BadValue {
                                line,
                                what: "rtpmap",
                            })?)
                        }
                        ("fmtp", Some(arg)) => {
                            let (pt, params) = arg.split_once(' ').unwrap_or((arg, ""));
                            let pt = pt
                                .parse()
                                .map_err(|_| SdpError::BadValue { line, what: "fmtp" })?;
                            m.fmtps.push((pt, params.trim().to_string()));
                        }
                        ("ptime", Some(arg)) => m.ptime = arg.parse().ok(),
                        // An unreadable line is dropped (it may hold a key, and `other`
                        // is shown in logs), never used to key a stream.
                        ("crypto", Some(arg)) => m.crypto.extend(CryptoAttribute::parse(arg)),
                        ("rtcp", Some(arg)) => {
                            // "port [nettype addrtype address]": the port is what we use.
                            let port = arg.split_ascii_whitespace().next().unwrap_or(arg);
                            m.rtcp_port = port.parse().ok();
                        }
                        _ => m.other.push(value.to_string()),
                    }
                }
                // v, t, b, k, i, u, e, p, z, r lines carry nothing we act on.
                _ => {}
            }
        }
        Ok(sd)
    }

    /// The connection address of a media section (media level, else session level).
    pub fn connection_for(&self, media: &MediaDescription) -> Option<IpAddr> {
        media.connection.or(self.connection)
    }

    /// The direction of a media section (media level, else session level, else sendrecv).
    pub fn direction_for(&self, media: &MediaDescription) -> Direction {
        media.direction.or(self.direction).unwrap_or_default()
    }
}

fn parse_rtpmap(arg: &str) -> Option<RtpMap> {
    let (pt, rest) = arg.split_once(' ')?;
    let mut parts = rest.trim().split('/');
    let encoding = parts.next()?.to_string();
    let clock_rate = parts.next()?.parse().ok()?;
    let channels = match parts.next() {
        Some(c) => Some(c.parse().ok()?),
        None => None,
    };
    Some(RtpMap {
        payload_type: pt.parse().ok()?,
        encoding,
        clock_rate,
        channels,
    })
}

fn addr_line(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("IN IP4 {a}"),
        IpAddr::V6(a) => format!("IN IP6 {a}"),
    }
}

impl std::fmt::Display for SessionDescription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::with_capacity(256);
        let o = &self.origin;
        // Writing into a String cannot fail; the results are ignored for that reason.
        let _ = write!(
            s,
            "v=0\r\no={} {} {} {}\r\ns={}\r\n",
            o.username,
            o.session_id,
            o.session_version,
            addr_line(o.address),
            self.session_name
        );
        if let Some(c) = self.connection {
            let _ = write!(s, "c={}\r\n", addr_line(c));
        }
        s.push_str("t=0 0\r\n");
        if let Some(d) = self.direction {
            let _ = write!(s, "a={}\r\n", d.as_str());
        }
        for m in &self.media {
            let _ = write!(s, "m={} {} {}", m.media, m.port, m.protocol);
            for fmt in &m.formats {
                let _ = write!(s, " {fmt}");
            }
            s.push_str("\r\n");
            if let Some(c) = m.connection {
                let _ = write!(s, "c={}\r\n", addr_line(c));
            }
            for r in &m.rtpmaps {
                let _ = write!(
                    s,
                    "a=rtpmap:{} {}/{}",
                    r.payload_type, r.encoding, r.clock_rate
                );
                if let Some(ch) = r.channels {
                    let _ = write!(s, "/{ch}");
                }
                s.push_str("\r\n");
            }
            for (pt, params) in &m.fmtps {
                let _ = write!(s, "a=fmtp:{pt} {params}\r\n");
            }
            if let Some(p) = m.ptime {
                let _ = write!(s, "a=ptime:{p}\r\n");
            }
            if let Some(p) = m.rtcp_port {
                let _ = write!(s, "a=rtcp:{p}\r\n");
            }
            for c in &m.crypto {
                let _ = write!(s, "a=crypto:{} {} {}", c.tag, c.suite, c.key_params);
                for p in &c.session_params {
                    let _ = write!(s, " {p}");
                }
                s.push_str("\r\n");
            }
            for a in &m.other {
                let _ = write!(s, "a={a}\r\n");
            }
            if let Some(d) = m.direction {
                let _ = write!(s, "a={}\r\n", d.as_str());
            }
        }
        f.write_str(&s)
    }
}

/// Our side of a negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMedia {
    /// Address peers send RTP to (the public IP when configured).
    pub address: IpAddr,
    /// Our RTP port for this call.
    pub port: u16,
    /// Codecs we accept, in the order we offer them, which is also our preference when we
    /// answer (see [`answer`]). Default PCMU, PCMA, G722.
    pub codecs: Vec<Codec>,
    /// `o=` session id, fixed for the call.
    pub session_id: u64,
    /// `o=` version; increment for every new offer or answer in the same call.
    pub session_version: u64,
    /// Whether we put the call on hold ourselves (offer/answer `sendonly`).
    pub hold: bool,
    /// SRTP (SDES) policy and our key; `None` is plain RTP ([`SrtpPolicy::Off`]).
    pub srtp: Option<LocalSrtp>,
}

impl LocalMedia {
    /// Every codec ([`Codec::ALL`]: PCMU, PCMA, G722), not on hold.
    pub fn new(address: IpAddr, port: u16, session_id: u64) -> Self {
        Self {
            address,
            port,
            codecs: Codec::ALL.to_vec(),
            session_id,
            session_version: session_id,
            hold: false,
            srtp: None,
        }
    }

    /// Keeps what a negotiation settled on for our side of SRTP: the key we protect with
    /// (fresh when the suite changed) and its suite, for the next offer or answer. A plain
    /// outcome after an encrypted one retires our key: SRTP resumed later starts its
    /// contexts afresh, so it needs a key that has not protected anything.
    pub fn keep_srtp(&mut self, negotiated: Option<SrtpKeys>) {
        let Some(ours) = &mut self.srtp else {
            return;
        };
        match negotiated {
            Some(keys) => {
                ours.key = keys.local;
                ours.suite = Some(keys.suite);
            }
            None if ours.suite.is_some() => {
                ours.key = MasterKey::random();
                ours.suite = None;
            }
            None => {}
        }
    }

    /// The SRTP policy in force.
    pub fn srtp_policy(&self) -> SrtpPolicy {
        self.srtp.map_or(SrtpPolicy::Off, |s| s.policy)
    }

    fn session(&self, media: Vec<MediaDescription>) -> SessionDescription {
        SessionDescription {
            origin: Origin {
                username: "telcoflow".into(),
                session_id: self.session_id,
                session_version: self.session_version,
                address: self.address,
            },
            session_name: "telcoflow".into(),
            connection: Some(self.address),
            direction: None,
            media,
        }
    }
}

/// The outcome of a negotiation: how to send and receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The codec.
    pub codec: Codec,
    /// Payload type carrying it (the offerer's number).
    pub payload_type: u8,
    /// Payload type of telephone-event, if both sides use it.
    pub telephone_event: Option<u8>,
    /// Where to send RTP (until symmetric RTP learns the real source).
    pub remote: SocketAddr,
    /// Where to send RTCP: the `a=rtcp` port, else the RTP port + 1 (RFC 3550 11).
    pub remote_rtcp: SocketAddr,
    /// Our direction for this stream.
    pub direction: Direction,
    /// The peer put the call on hold (sendonly, inactive, or c=0.0.0.0).
    pub remote_hold: bool,
    /// Index of the audio section in the SDP.
    pub media_index: usize,
    /// Packetisation time to send with, in milliseconds (within [`PTIME_RANGE_MS`]).
    pub ptime: u32,
    /// SRTP keys when the stream is encrypted (SDES), `None` for plain RTP.
    pub srtp: Option<SrtpKeys>,
}

fn rtcp_addr(addr: IpAddr, m: &MediaDescription) -> SocketAddr {
    let port = m.rtcp_port.unwrap_or_else(|| m.port.saturating_add(1));
    SocketAddr::new(addr, port)
}

fn is_unspecified(addr: IpAddr) -> bool {
    addr.is_unspecified()
}

fn audio_media(
    local: &LocalMedia,
    pt: u8,
    codec: Codec,
    te: Option<u8>,
    direction: Direction,
    ptime: u32,
) -> MediaDescription {
    let mut formats = vec![pt.to_string()];
    let mut rtpmaps = vec![RtpMap {
        payload_type: pt,
        encoding: codec.encoding_name().into(),
        clock_rate: Codec::CLOCK_RATE,
        channels: None,
    }];
    let mut fmtps = Vec::new();
    if let Some(te) = te {
        formats.push(te.to_string());
        rtpmaps.push(RtpMap {
            payload_type: te,
            encoding: "telephone-event".into(),
            clock_rate: Codec::CLOCK_RATE,
            channels: None,
        });
        fmtps.push((te, "0-15".to_string()));
    }
    MediaDescription {
        media: "audio".into(),
        port: local.port,
        protocol: "RTP/AVP".into(),
        formats,
        connection: None,
        rtpmaps,
        fmtps,
        ptime: Some(ptime),
        rtcp_port: None,
        direction: Some(direction),
        crypto: Vec::new(),
        other: Vec::new(),
    }
}

/// SRTP for an offered stream under our policy: `Ok(None)` for plain RTP, else the line
/// we take (its tag) and the keys.
fn answer_crypto(
    m: &MediaDescription,
    local: &LocalMedia,
) -> Result<Option<(u32, SrtpKeys)>, NegotiationError> {
    let savp = m.protocol == "RTP/SAVP";
    let Some(ours) = local.srtp.filter(|s| s.policy != SrtpPolicy::Off) else {
        return if savp {
            Err(NegotiationError::SrtpRefused)
        } else {
            Ok(None)
        };
    };
    // A remote key equal to ours would give both directions one keystream.
    let chosen = m.crypto.iter().find_map(|c| {
        c.usable()
            .filter(|(_, remote)| *remote != ours.key)
            .map(|(suite, remote)| {
                // Our key stays with its suite: another suite gets a fresh key.
                let local = match ours.suite {
                    Some(used) if used != suite => MasterKey::random(),
                    _ => ours.key,
                };
                let keys = SrtpKeys {
                    suite,
                    local,
                    remote,
                };
                (c.tag, keys)
            })
    });
    match chosen {
        Some(c) => Ok(Some(c)),
        None if savp => Err(NegotiationError::NoCryptoSuite),
        None if ours.policy == SrtpPolicy::Required => Err(NegotiationError::SrtpRequired),
        None => Ok(None),
    }
}

/// The codec to answer an audio stream with, and its payload type, by the rule [`answer`]
/// states. Between PCMU and PCMA the offerer's order decides because a trunk's choice of law
/// spares it a transcoding; the two are equal in quality.
fn pick_codec(m: &MediaDescription, local: &LocalMedia) -> Option<(u8, Codec)> {
    let rank = |codec: Codec| {
        local
            .codecs
            .iter()
            .position(|c| c.sample_rate() == codec.sample_rate())
    };
    m.payload_types()
        .filter_map(|pt| {
            let codec = m.codec_for(pt).filter(|c| local.codecs.contains(c))?;
            Some((rank(codec)?, pt, codec))
        })
        // The first of the best rank: the offerer's order breaks ties.
        .min_by_key(|&(rank, _, _)| rank)
        .map(|(_, pt, codec)| (pt, codec))
}

/// Answers an offer (RFC 3264 section 6): the first audio stream with a codec we support is
/// accepted; every other stream is rejected (port 0).
///
/// The codec: among the offered codecs that we accept, the one [`LocalMedia::codecs`] lists
/// first, where codecs of one sample rate rank together. Our list decides between wideband
/// (G.722) and narrowband (G.711); between PCMU and PCMA the offerer's order decides. With the
/// default list (PCMU, PCMA, G722) G.722 is taken only when the offer has no G.711; listing
/// G722 first prefers it.
pub fn answer(
    offer: &SessionDescription,
    local: &LocalMedia,
) -> Result<(SessionDescription, Negotiated), NegotiationError> {
    let mut chosen: Option<Negotiated> = None;
    let mut saw_audio = false;
    // Why a stream with a common codec was refused for its SRTP, if one was.
    let mut srtp_refusal = None;
    let mut media = Vec::with_capacity(offer.media.len());
    for (index, m) in offer.media.iter().enumerate() {
        let rejected = MediaDescription::bare(
            m.media.clone(),
            0,
            m.protocol.clone(),
            m.formats.iter().take(1).cloned().collect(),
        );
        let usable_audio = m.media == "audio"
            && m.port != 0
            && (m.protocol == "RTP/AVP" || m.protocol == "RTP/SAVP");
        if chosen.is_some() || !usable_audio {
            media.push(rejected);
            continue;
        }
        saw_audio = true;
        let Some((pt, codec)) = pick_codec(m, local) else {
            media.push(rejected);
            continue;
        };
        let srtp = match answer_crypto(m, local) {
            Ok(srtp) => srtp,
            Err(e) => {
                srtp_refusal.get_or_insert(e);
                media.push(rejected);
                continue;
            }
        };
        let addr = offer
            .connection_for(m)
            .ok_or(NegotiationError::NoConnection)?;
        let offered = offer.direction_for(m);
        let remote_hold = is_unspecified(addr) || !offered.receives();
        let mut direction = if is_unspecified(addr) {
            // RFC 2543 hold: the peer cannot receive; we only listen.
            Direction::RecvOnly
        } else {
            offered.reversed()
        };
        if local.hold {
            direction = match direction {
                Direction::SendRecv | Direction::SendOnly => Direction::SendOnly,
                _ => Direction::Inactive,
            };
        }
        let te = m
            .telephone_event()
            .filter(|te| m.payload_types().any(|p| p == *te));
        // The offerer's ptime is what it wants to receive; we answer with it (so it hears
        // what it asked for) and send with it.
        let ptime = ptime_for(m.ptime);
        let mut answer = audio_media(local, pt, codec, te, direction, ptime);
        if let Some((tag, keys)) = srtp {
            // Same profile as offered (RFC 4568 7.1.2), our key under the offer's tag.
            answer.protocol.clone_from(&m.protocol);
            answer
                .crypto
                .push(CryptoAttribute::ours(tag, keys.suite, &keys.local));
        }
        media.push(answer);
        chosen = Some(Negotiated {
            codec,
            payload_type: pt,
            telephone_event: te,
            remote: SocketAddr::new(addr, m.port),
            remote_rtcp: rtcp_addr(addr, m),
            direction,
            remote_hold,
            media_index: index,
            ptime,
            srtp: srtp.map(|(_, keys)| keys),
        });
    }
    match (chosen, srtp_refusal) {
        (Some(n), _) => Ok((local.session(media), n)),
        (None, Some(e)) => Err(e),
        (None, None) if saw_audio => Err(NegotiationError::NoCommonCodec),
        (None, None) => Err(NegotiationError::NoAudio),
    }
}

/// Builds our offer for an outgoing call: one audio stream with our codecs in order,
/// telephone-event as payload type 101 and ptime 20.
pub fn offer(local: &LocalMedia) -> SessionDescription {
    let direction = if local.hold {
        Direction::SendOnly
    } else {
        Direction::SendRecv
    };
    let mut m = audio_media(
        local,
        0,
        Codec::Pcmu,
        Some(DEFAULT_TELEPHONE_EVENT_PT),
        direction,
        PTIME_MS,
    );
    m.formats.clear();
    m.rtpmaps
        .retain(|r| r.payload_type == DEFAULT_TELEPHONE_EVENT_PT);
    for (i, codec) in local.codecs.iter().enumerate() {
        m.formats.insert(i, codec.payload_type().to_string());
        m.rtpmaps.insert(
            i,
            RtpMap {
                payload_type: codec.payload_type(),
                encoding: codec.encoding_name().into(),
                clock_rate: Codec::CLOCK_RATE,
                channels: None,
            },
        );
    }
    m.formats.push(DEFAULT_TELEPHONE_EVENT_PT.to_string());
    if let Some(ours) = local.srtp.filter(|s| s.policy != SrtpPolicy::Off) {
        if ours.policy == SrtpPolicy::Required {
            m.protocol = "RTP/SAVP".into();
        }
        m.crypto = offered_crypto(&ours);
    }
    local.session(vec![m])
}

/// The `a=crypto` lines of our offers: tag 1 for the 80-bit suite, tag 2 for the 32-bit;
/// once our key protects with a suite, that one alone (our key stays with its suite).
fn offered_crypto(ours: &LocalSrtp) -> Vec<CryptoAttribute> {
    (1..)
        .zip(SrtpSuite::ALL)
        .filter(|(_, suite)| ours.suite.is_none_or(|used| used == *suite))
        .map(|(tag, suite)| CryptoAttribute::ours(tag, suite, &ours.key))
        .collect()
}

/// Reads the answer to an offer made with [`offer`]: the answerer's first codec that we
/// offered wins.
pub fn accept_answer(
    local: &LocalMedia,
    answer: &SessionDescription,
) -> Result<Negotiated, NegotiationError> {
    let (index, m) = answer
        .media
        .iter()
        .enumerate()
        .find(|(_, m)| m.media == "audio" && m.port != 0)
        .ok_or(NegotiationError::NoAudio)?;
    let (pt, codec) = m
        .payload_types()
        .find_map(|pt| {
            m.codec_for(pt)
                .filter(|c| local.codecs.contains(c))
                .map(|c| (pt, c))
        })
        .ok_or(NegotiationError::NoCommonCodec)?;
    let addr = answer
        .connection_for(m)
        .ok_or(NegotiationError::NoConnection)?;
    let answered = answer.direction_for(m);
    let srtp = match local.srtp.filter(|s| s.policy != SrtpPolicy::Off) {
        None => None,
        Some(ours) => {
            let offered = offered_crypto(&ours);
            // The answer names one of our lines by its tag, with the same suite, and a key
            // of its own (ours again would give both directions one keystream).
            let chosen = m.crypto.iter().find_map(|c| {
                offered
                    .iter()
                    .any(|o| o.tag == c.tag && o.suite == c.suite)
                    .then(|| c.usable())
                    .flatten()
                    .filter(|(_, remote)| *remote != ours.key)
            });
            match chosen {
                Some((suite, remote)) => Some(SrtpKeys {
                    suite,
                    local: ours.key,
                    remote,
                }),
                None if ours.policy == SrtpPolicy::Required => {
                    return Err(if m.crypto.is_empty() {
                        NegotiationError::SrtpRequired
                    } else {
                        NegotiationError::NoCryptoSuite
                    });
                }
                None => None,
            }
        }
    };
    Ok(Negotiated {
        codec,
        payload_type: pt,
        telephone_event: m
            .telephone_event()
            .filter(|te| m.payload_types().any(|p| p == *te)),
        remote: SocketAddr::new(addr, m.port),
        remote_rtcp: rtcp_addr(addr, m),
        direction: answered.reversed(),
        remote_hold: is_unspecified(addr) || !answered.receives(),
        media_index: index,
        ptime: ptime_for(m.ptime),
        srtp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINPHONE_OFFER: &str = "v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n\
s=Talk\r\n\
c=IN IP4 192.0.2.10\r\n\
t=0 0\r\n\
m=audio 49170 RTP/AVP 9 8 0 101\r\n\
a=rtpmap:9 G722/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=ptime:20\r\n\
a=sendrecv\r\n\
m=video 51372 RTP/AVP 96\r\n\
a=rtpmap:96 H264/90000\r\n";

    fn local() -> LocalMedia {
        LocalMedia::new("198.51.100.1".parse().unwrap(), 20000, 42)
    }

    #[test]
    fn parses_a_real_offer() {
        let sd = SessionDescription::parse(LINPHONE_OFFER).unwrap();
        assert_eq!(sd.origin.username, "alice");
        assert_eq!(sd.origin.session_version, 2890844526);
        assert_eq!(sd.connection, Some("192.0.2.10".parse().unwrap()));
        assert_eq!(sd.media.len(), 2);
        let a = &sd.media[0];
        assert_eq!(a.port, 49170);
        assert_eq!(a.payload_types().collect::<Vec<_>>(), vec![9, 8, 0, 101]);
        assert_eq!(a.g711_for(9), None);
        assert_eq!(a.g711_for(8), Some(G711::Pcma));
        assert_eq!(a.telephone_event(), Some(101));
        assert_eq!(a.fmtps, vec![(101, "0-16".to_string())]);
        assert_eq!(a.ptime, Some(20));
        assert_eq!(sd.direction_for(a), Direction::SendRecv);
    }

    #[test]
    fn answer_follows_the_offered_ptime_within_range() {
        for (asked, answered) in [
            (Some("30"), 30),
            (Some("10"), 10),
            (Some("60"), 60),
            (Some("5"), 20),
            (Some("120"), 20),
            (None, 20),
        ] {
            let text = match asked {
                Some(p) => LINPHONE_OFFER.replace("a=ptime:20", &format!("a=ptime:{p}")),
                None => LINPHONE_OFFER.replace("a=ptime:20\r\n", ""),
            };
            let offer = SessionDescription::parse(&text).unwrap();
            let (sd, n) = answer(&offer, &local()).unwrap();
            assert_eq!(n.ptime, answered, "{asked:?}");
            assert!(
                sd.to_string().contains(&format!("a=ptime:{answered}\r\n")),
                "{asked:?}"
            );
        }
    }

    #[test]
    fn answer_picks_offerers_first_supported_codec() {
        let offer = SessionDescription::parse(LINPHONE_OFFER).unwrap();
        let (answer, n) = answer(&offer, &local()).unwrap();
        // G722 is first, but our list ranks it after G.711; PCMA is the offerer's first law.
        assert_eq!(n.codec, Codec::Pcma);
        assert_eq!(n.payload_type, 8);
        assert_eq!(n.telephone_event, Some(101));
        assert_eq!(n.remote, "192.0.2.10:49170".parse().unwrap());
        assert_eq!(n.remote_rtcp, "192.0.2.10:49171".parse().unwrap());
        assert!(!n.remote_hold);
        let text = answer.to_string();
        assert!(text.contains("m=audio 20000 RTP/AVP 8 101\r\n"), "{text}");
        assert!(text.contains("a=rtpmap:8 PCMA/8000\r\n"));
        assert!(text.contains("a=rtpmap:101 telephone-event/8000\r\n"));
        assert!(text.contains("a=fmtp:101 0-15\r\n"));
        assert!(text.contains("a=ptime:20\r\n"));
        assert!(text.contains("a=sendrecv\r\n"));
        assert!(text.contains("c=IN IP4 198.51.100.1\r\n"));
        // The video stream is declined with port 0, keeping the m-line count.
        assert!(text.contains("m=video 0 RTP/AVP 96\r\n"));
        // Our answer parses back to the same thing.
        assert_eq!(SessionDescription::parse(&text).unwrap(), answer);
    }

    #[test]
    fn answer_respects_pcmu_first() {
        let text = LINPHONE_OFFER.replace("RTP/AVP 9 8 0 101", "RTP/AVP 0 8 101");
        let offer = SessionDescription::parse(&text).unwrap();
        let (_, n) = answer(&offer, &local()).unwrap();
        assert_eq!(n.codec, Codec::Pcmu);
        // Local support limits the choice.
        let mut only_a = local();
        only_a.codecs = vec![Codec::Pcma];
        assert_eq!(answer(&offer, &only_a).unwrap().1.codec, Codec::Pcma);
    }

    #[test]
    fn static_types_without_rtpmap_and_no_telephone_event() {
        let text =
            "v=0\no=- 1 1 IN IP4 10.0.0.1\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\nm=audio 4000 RTP/AVP 0\n";
        let offer = SessionDescription::parse(text).unwrap();
        let (sdp, n) = answer(&offer, &local()).unwrap();
        assert_eq!(n.codec, Codec::Pcmu);
        assert_eq!(n.telephone_event, None);
        assert!(!sdp.to_string().contains("telephone-event"));
    }

    #[test]
    fn rtcp_attribute_sets_the_rtcp_port() {
        let text = LINPHONE_OFFER.replace(
            "a=ptime:20\r\n",
            "a=ptime:20\r\na=rtcp:53020 IN IP4 192.0.2.10\r\n",
        );
        let offer = SessionDescription::parse(&text).unwrap();
        assert_eq!(offer.media[0].rtcp_port, Some(53020));
        let (_, n) = answer(&offer, &local()).unwrap();
        assert_eq!(n.remote_rtcp, "192.0.2.10:53020".parse().unwrap());
        let mut with = offer.clone();
        with.media[0].rtcp_port = Some(7);
        assert!(with.to_string().contains("a=rtcp:7\r\n"));
    }

    #[test]
    fn no_common_codec_maps_to_488() {
        // G.729 (18) is not ours.
        let text = LINPHONE_OFFER.replace("RTP/AVP 9 8 0 101", "RTP/AVP 18 101");
        let offer = SessionDescription::parse(&text).unwrap();
        let err = answer(&offer, &local()).unwrap_err();
        assert_eq!(err, NegotiationError::NoCommonCodec);
        assert_eq!(err.status_code(), 488);
        let video_only = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=video 5000 RTP/AVP 96\r\n";
        let err = answer(&SessionDescription::parse(video_only).unwrap(), &local()).unwrap_err();
        assert_eq!(err, NegotiationError::NoAudio);
        assert_eq!(err.status_code(), 488);
        assert_eq!(
            NegotiationError::from(SdpError::MissingVersion).status_code(),
            400
        );
    }

    #[test]
    fn hold_detection() {
        for (attr, ours) in [
            ("a=sendonly", Direction::RecvOnly),
            ("a=inactive", Direction::Inactive),
        ] {
            let text = LINPHONE_OFFER.replace("a=sendrecv", attr);
            let (sdp, n) = answer(&SessionDescription::parse(&text).unwrap(), &local()).unwrap();
            assert!(n.remote_hold, "{attr}");
            assert_eq!(n.direction, ours);
            assert!(
                sdp.to_string()
                    .contains(&format!("a={}\r\n", ours.as_str()))
            );
        }
        // Session-level direction applies to media without their own.
        let text = LINPHONE_OFFER
            .replace("a=sendrecv\r\n", "")
            .replace("t=0 0\r\n", "t=0 0\r\na=sendonly\r\n");
        let (_, n) = answer(&SessionDescription::parse(&text).unwrap(), &local()).unwrap();
        assert!(n.remote_hold);
        // RFC 2543 style: connection address 0.0.0.0.
        let text = LINPHONE_OFFER.replace("c=IN IP4 192.0.2.10", "c=IN IP4 0.0.0.0");
        let (_, n) = answer(&SessionDescription::parse(&text).unwrap(), &local()).unwrap();
        assert!(n.remote_hold);
        assert_eq!(n.direction, Direction::RecvOnly);
        // Resume.
        let (_, n) = answer(
            &SessionDescription::parse(LINPHONE_OFFER).unwrap(),
            &local(),
        )
        .unwrap();
        assert!(!n.remote_hold);
        assert_eq!(n.direction, Direction::SendRecv);
    }

    #[test]
    fn our_offer_and_their_answer() {
        let l = local();
        let o = offer(&l).to_string();
        assert!(o.contains("m=audio 20000 RTP/AVP 0 8 9 101\r\n"), "{o}");
        assert!(o.contains(
            "a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:9 G722/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
        ));
        assert!(o.contains("a=fmtp:101 0-15\r\n"));
        // The callee answers with what it picked, seen from its side.
        let callee = LocalMedia::new("192.0.2.20".parse().unwrap(), 30000, 7);
        let (ans, theirs) = answer(&SessionDescription::parse(&o).unwrap(), &callee).unwrap();
        assert_eq!(theirs.remote, "198.51.100.1:20000".parse().unwrap());
        let ours =
            accept_answer(&l, &SessionDescription::parse(&ans.to_string()).unwrap()).unwrap();
        assert_eq!(ours.codec, Codec::Pcmu);
        assert_eq!(ours.telephone_event, Some(101));
        assert_eq!(ours.remote, "192.0.2.20:30000".parse().unwrap());
        assert_eq!(ours.direction, Direction::SendRecv);
    }

    #[test]
    fn local_hold_offers_sendonly() {
        let mut l = local();
        l.hold = true;
        assert!(offer(&l).to_string().contains("a=sendonly\r\n"));
        let (_, n) = answer(&SessionDescription::parse(LINPHONE_OFFER).unwrap(), &l).unwrap();
        assert_eq!(n.direction, Direction::SendOnly);
    }

    #[test]
    fn g722_is_offered_after_g711_by_default_and_in_the_configured_order() {
        let o = offer(&local()).to_string();
        assert!(o.contains("m=audio 20000 RTP/AVP 0 8 9 101\r\n"), "{o}");
        let mut l = local();
        l.codecs = vec![Codec::G722, Codec::Pcma];
        let o = offer(&l).to_string();
        assert!(o.contains("m=audio 20000 RTP/AVP 9 8 101\r\n"), "{o}");
        assert!(
            o.contains("a=rtpmap:9 G722/8000\r\na=rtpmap:8 PCMA/8000\r\n"),
            "{o}"
        );
        assert!(!o.contains("PCMU"), "{o}");
        // The offer parses back to the same codecs.
        let m = &SessionDescription::parse(&o).unwrap().media[0];
        assert_eq!(m.codec_for(9), Some(Codec::G722));
        assert_eq!(m.codec_for(8), Some(Codec::Pcma));
    }

    #[test]
    fn answer_takes_g722_when_preferred_or_alone() {
        // The offer lists G.722 first (LINPHONE_OFFER: 9 8 0).
        let offer = SessionDescription::parse(LINPHONE_OFFER).unwrap();
        // Default list: narrowband first, so the offerer's first law.
        assert_eq!(answer(&offer, &local()).unwrap().1.codec, Codec::Pcma);
        // G722 listed first: preferred whenever offered, wherever the offer puts it.
        let mut wide = local();
        wide.codecs = vec![Codec::G722, Codec::Pcmu, Codec::Pcma];
        for formats in ["9 8 0 101", "0 8 9 101", "8 9 101"] {
            let text = LINPHONE_OFFER.replace("9 8 0 101", formats);
            let offer = SessionDescription::parse(&text).unwrap();
            let (sdp, n) = answer(&offer, &wide).unwrap();
            assert_eq!((n.codec, n.payload_type), (Codec::G722, 9), "{formats}");
            let text = sdp.to_string();
            assert!(text.contains("m=audio 20000 RTP/AVP 9 101\r\n"), "{text}");
            assert!(text.contains("a=rtpmap:9 G722/8000\r\n"), "{text}");
        }
        // Between the laws the offerer's order holds, whatever our list says.
        let mut pcma_first = local();
        pcma_first.codecs = vec![Codec::Pcma, Codec::Pcmu, Codec::G722];
        let text = LINPHONE_OFFER.replace("9 8 0 101", "0 8 101");
        let offer = SessionDescription::parse(&text).unwrap();
        assert_eq!(answer(&offer, &pcma_first).unwrap().1.codec, Codec::Pcmu);
        // G.722 alone: taken with the default list, refused without it.
        let text = LINPHONE_OFFER.replace("9 8 0 101", "9 101");
        let offer = SessionDescription::parse(&text).unwrap();
        assert_eq!(answer(&offer, &local()).unwrap().1.codec, Codec::G722);
        let mut narrow = local();
        narrow.codecs = vec![Codec::Pcmu, Codec::Pcma];
        assert_eq!(
            answer(&offer, &narrow).unwrap_err(),
            NegotiationError::NoCommonCodec
        );
        // A dynamic payload type mapped to G722/8000 is G.722 too; G722/16000 is not RTP's
        // G.722 (RFC 3551 4.5.2).
        for (map, codec) in [("G722/8000", Some(Codec::G722)), ("G722/16000", None)] {
            let text = LINPHONE_OFFER
                .replace("9 8 0 101", "96 101")
                .replace("a=rtpmap:9 G722/8000", &format!("a=rtpmap:96 {map}"));
            let offer = SessionDescription::parse(&text).unwrap();
            assert_eq!(offer.media[0].codec_for(96), codec, "{map}");
            let picked = answer(&offer, &local())
                .ok()
                .map(|(_, n)| (n.codec, n.payload_type));
            assert_eq!(picked, codec.map(|c| (c, 96)), "{map}");
        }
    }

    #[test]
    fn our_g722_offer_and_the_answer_that_takes_it() {
        let mut l = local();
        l.codecs = vec![Codec::G722, Codec::Pcmu];
        let o = offer(&l).to_string();
        let callee = LocalMedia::new("192.0.2.20".parse().unwrap(), 30000, 7);
        // The callee (default list) takes PCMU, the only narrowband codec offered.
        let (ans, _) = answer(&SessionDescription::parse(&o).unwrap(), &callee).unwrap();
        let ours = accept_answer(&l, &SessionDescription::parse(&ans.to_string()).unwrap());
        assert_eq!(ours.unwrap().codec, Codec::Pcmu);
        // A callee that prefers G.722 answers with it, and so do we.
        let mut wide = callee.clone();
        wide.codecs = vec![Codec::G722];
        let (ans, theirs) = answer(&SessionDescription::parse(&o).unwrap(), &wide).unwrap();
        assert_eq!(theirs.codec, Codec::G722);
        let ours = accept_answer(&l, &SessionDescription::parse(&ans.to_string()).unwrap());
        assert_eq!(ours.unwrap().codec, Codec::G722);
        // An answer with a codec we did not offer is refused.
        let mut narrow = local();
        narrow.codecs = vec![Codec::Pcmu];
        let ans = SessionDescription::parse(&ans.to_string()).unwrap();
        assert_eq!(
            accept_answer(&narrow, &ans).unwrap_err(),
            NegotiationError::NoCommonCodec
        );
    }

    const SRTP_KEY_A: &str = "WnD7c1ksDGs+dIefCEo8omPg4uO8DYIinNGL5yxQ";
    const SRTP_KEY_B: &str = "zfaH8EX3W+FmBkGumjTULRQM8mOcSbbfSJRbuRoB";

    fn srtp_offer(protocol: &str, crypto: &[&str]) -> SessionDescription {
        let mut text = format!(
            "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n\
             m=audio 49170 {protocol} 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
        );
        for c in crypto {
            text.push_str(&format!("a=crypto:{c}\r\n"));
        }
        SessionDescription::parse(&text).unwrap()
    }

    fn local_srtp(policy: SrtpPolicy) -> LocalMedia {
        LocalMedia {
            srtp: Some(LocalSrtp::new(
                policy,
                MasterKey::from_base64(SRTP_KEY_B).unwrap(),
            )),
            ..local()
        }
    }

    #[test]
    fn srtp_answer_takes_the_first_supported_suite_with_its_tag_and_our_key() {
        let offer = srtp_offer(
            "RTP/SAVP",
            &[
                &format!("1 AEAD_AES_256_GCM inline:{SRTP_KEY_A}"),
                &format!("2 AES_CM_128_HMAC_SHA1_32 inline:{SRTP_KEY_A}|2^31|1:1"),
                &format!("3 AES_CM_128_HMAC_SHA1_32 inline:{SRTP_KEY_A}|2^31"),
                &format!("4 AES_CM_128_HMAC_SHA1_80 inline:{SRTP_KEY_A}"),
            ],
        );
        assert_eq!(offer.media[0].crypto.len(), 4);
        for policy in [SrtpPolicy::Optional, SrtpPolicy::Required] {
            let (answer, n) = super::answer(&offer, &local_srtp(policy)).unwrap();
            // GCM is not ours and tag 2 has an MKI: tag 3 is the first we can use.
            let keys = n.srtp.unwrap();
            assert_eq!(keys.suite, SrtpSuite::AesCm128HmacSha1_32);
            assert_eq!(keys.remote, MasterKey::from_base64(SRTP_KEY_A).unwrap());
            assert_eq!(keys.local, MasterKey::from_base64(SRTP_KEY_B).unwrap());
            let text = answer.to_string();
            assert!(text.contains("m=audio 20000 RTP/SAVP 0 101\r\n"), "{text}");
            assert!(
                text.contains(&format!(
                    "a=crypto:3 AES_CM_128_HMAC_SHA1_32 inline:{SRTP_KEY_B}\r\n"
                )),
                "{text}"
            );
            assert_eq!(text.matches("a=crypto").count(), 1);
            // The answer reads back as the offerer would read it.
            let reread = SessionDescription::parse(&text).unwrap();
            assert_eq!(reread.media[0].crypto[0].tag, 3);
        }
    }

    #[test]
    fn srtp_refusals_are_488_with_a_reason() {
        let savp_gcm_only = srtp_offer(
            "RTP/SAVP",
            &[&format!("1 AEAD_AES_128_GCM inline:{SRTP_KEY_A}")],
        );
        let savp_bad_key = srtp_offer("RTP/SAVP", &["1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ="]);
        let savp = srtp_offer(
            "RTP/SAVP",
            &[&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{SRTP_KEY_A}")],
        );
        let plain = srtp_offer("RTP/AVP", &[]);
        let cases = [
            (
                &savp_gcm_only,
                SrtpPolicy::Required,
                NegotiationError::NoCryptoSuite,
            ),
            (
                &savp_bad_key,
                SrtpPolicy::Optional,
                NegotiationError::NoCryptoSuite,
            ),
            (&savp, SrtpPolicy::Off, NegotiationError::SrtpRefused),
            (&plain, SrtpPolicy::Required, NegotiationError::SrtpRequired),
        ];
        for (offer, policy, expected) in cases {
            let err = super::answer(offer, &local_srtp(policy)).unwrap_err();
            assert_eq!(err, expected, "{policy:?}");
            assert_eq!(err.status_code(), 488);
        }
        // No SRTP configured at all behaves as off.
        assert_eq!(
            super::answer(&savp, &local()).unwrap_err(),
            NegotiationError::SrtpRefused
        );
    }

    #[test]
    fn plain_and_best_effort_offers_follow_the_policy() {
        let plain = srtp_offer("RTP/AVP", &[]);
        let best_effort = srtp_offer(
            "RTP/AVP",
            &[&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{SRTP_KEY_A}")],
        );
        // Optional: plain stays plain; best effort is encrypted, answered as RTP/AVP.
        let (a, n) = super::answer(&plain, &local_srtp(SrtpPolicy::Optional)).unwrap();
        assert_eq!(n.srtp, None);
        assert!(a.media[0].crypto.is_empty());
        let (a, n) = super::answer(&best_effort, &local_srtp(SrtpPolicy::Required)).unwrap();
        assert_eq!(n.srtp.unwrap().suite, SrtpSuite::AesCm128HmacSha1_80);
        assert_eq!(a.media[0].protocol, "RTP/AVP");
        assert_eq!(a.media[0].crypto[0].tag, 1);
        // Off: the crypto line is ignored.
        let (a, n) = super::answer(&best_effort, &local()).unwrap();
        assert_eq!(n.srtp, None);
        assert!(a.media[0].crypto.is_empty());
    }

    #[test]
    fn our_srtp_offer_and_the_answers_to_it() {
        let ours = MasterKey::from_base64(SRTP_KEY_B).unwrap();
        let required = local_srtp(SrtpPolicy::Required);
        let text = offer(&required).to_string();
        assert!(
            text.contains("m=audio 20000 RTP/SAVP 0 8 9 101\r\n"),
            "{text}"
        );
        assert!(text.contains(&format!(
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{SRTP_KEY_B}\r\n"
        )));
        assert!(text.contains(&format!(
            "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:{SRTP_KEY_B}\r\n"
        )));
        let optional = offer(&local_srtp(SrtpPolicy::Optional)).to_string();
        assert!(optional.contains("RTP/AVP 0 8 9 101") && optional.contains("a=crypto:2 "));
        assert!(!offer(&local()).to_string().contains("crypto"));

        let answer = |protocol: &str, crypto: &[&str]| {
            let mut sd = srtp_offer(protocol, crypto);
            sd.media[0].port = 40000;
            sd
        };
        // Either suite, named by our tag.
        for (line, suite) in [
            (
                format!("1 AES_CM_128_HMAC_SHA1_80 inline:{SRTP_KEY_A}"),
                SrtpSuite::AesCm128HmacSha1_80,
            ),
            (
                format!("2 AES_CM_128_HMAC_SHA1_32 inline:{SRTP_KEY_A}"),
                SrtpSuite::AesCm128HmacSha1_32,
            ),
        ] {
            let n = accept_answer(&required, &answer("RTP/SAVP", &[&line])).unwrap();
            assert_eq!(
                n.srtp,
                Some(SrtpKeys {
                    suite,
                    local: ours,
                    remote: MasterKey::from_base64(SRTP_KEY_A).unwrap()
                })
            );
        }
        // A tag we did not offer with that suite, or no crypto at all, fails a required call.
        let wrong_tag = format!("2 AES_CM_128_HMAC_SHA1_80 inline:{SRTP_KEY_A}");
        assert_eq!(
            accept_answer(&required, &answer("RTP/SAVP", &[&wrong_tag])).unwrap_err(),
            NegotiationError::NoCryptoSuite
        );
        assert_eq!(
            accept_answer(&required, &answer("RTP/AVP", &[])).unwrap_err(),
            NegotiationError::SrtpRequired
        );
        // Optional: a plain answer is a plain call.
        let optional = local_srtp(SrtpPolicy::Optional);
        assert_eq!(
            accept_answer(&optional, &answer("RTP/AVP", &[]))
                .unwrap()
                .srtp,
            None
        );
    }

    /// Our key stays with its suite: once negotiated, a re-offer offers that suite alone and
    /// an answer taking another suite carries a fresh key. A peer key equal to ours is no key.
    /// Key parameters stay out of `Debug`.
    #[test]
    fn our_key_stays_with_its_suite_and_the_peer_cannot_reuse_it() {
        let mut local = local_srtp(SrtpPolicy::Required);
        let ours = local.srtp.unwrap().key;
        let offer_80 = srtp_offer(
            "RTP/SAVP",
            &[&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{SRTP_KEY_A}")],
        );
        let (_, n) = super::answer(&offer_80, &local).unwrap();
        assert_eq!(n.srtp.unwrap().local, ours);
        local.keep_srtp(n.srtp);
        // A re-offer of ours: the suite in use only.
        let reoffer = offer(&local).to_string();
        assert_eq!(reoffer.matches("a=crypto").count(), 1, "{reoffer}");
        assert!(reoffer.contains("a=crypto:1 AES_CM_128_HMAC_SHA1_80 "));
        // The peer re-offers the other suite: our answer carries a new key.
        let offer_32 = srtp_offer(
            "RTP/SAVP",
            &[&format!("1 AES_CM_128_HMAC_SHA1_32 inline:{SRTP_KEY_A}")],
        );
        let (sd, n) = super::answer(&offer_32, &local).unwrap();
        let fresh = n.srtp.unwrap().local;
        assert_ne!(fresh, ours);
        assert!(sd.to_string().contains(&fresh.to_base64()));
        local.keep_srtp(n.srtp);
        assert_eq!(local.srtp.unwrap().key, fresh);
        // The same suite again: the key stays.
        let (_, n) = super::answer(&offer_32, &local).unwrap();
        assert_eq!(n.srtp.unwrap().local, fresh);
        // Our own key offered back is refused.
        let mirror = srtp_offer(
            "RTP/SAVP",
            &[&format!(
                "1 AES_CM_128_HMAC_SHA1_32 inline:{}",
                fresh.to_base64()
            )],
        );
        assert_eq!(
            super::answer(&mirror, &local).unwrap_err(),
            NegotiationError::NoCryptoSuite
        );
        // A plain outcome retires the key; encrypted again, a fresh one.
        local.keep_srtp(None);
        assert_eq!(local.srtp.unwrap().suite, None);
        assert_ne!(local.srtp.unwrap().key, fresh);
        let debug = format!("{:?}", offer_32.media[0].crypto);
        assert!(!debug.contains(SRTP_KEY_A), "{debug}");
    }

    #[test]
    fn malformed_sdp_is_a_typed_error() {
        assert_eq!(SessionDescription::parse(""), Err(SdpError::MissingVersion));
        assert_eq!(
            SessionDescription::parse_bytes(b"v=0\r\ns=\xff\r\n"),
            Err(SdpError::NotUtf8)
        );
        assert_eq!(
            SessionDescription::parse("v=1\r\n"),
            Err(SdpError::MissingVersion)
        );
        assert_eq!(
            SessionDescription::parse("v=0\r\nbogus\r\n"),
            Err(SdpError::BadLine { line: 2 })
        );
        assert!(matches!(
            SessionDescription::parse("v=0\r\nm=audio x RTP/AVP 0\r\n"),
            Err(SdpError::BadValue { what: "media", .. })
        ));
        assert!(matches!(
            SessionDescription::parse("v=0\r\nc=IN IP4 not-an-ip\r\n"),
            Err(SdpError::BadValue {
                what: "connection",
                ..
            })
        ));
        assert!(matches!(
            SessionDescription::parse("v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtpmap:zero PCMU/8000\r\n"),
            Err(SdpError::BadValue { what: "rtpmap", .. })
        ));
        // No connection address at all.
        let text = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
        assert_eq!(
            answer(&SessionDescription::parse(text).unwrap(), &local()).unwrap_err(),
            NegotiationError::NoConnection
        );
    }
}
