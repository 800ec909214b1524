//! SIP messages (RFC 3261 section 7): parse, frame, build and serialise requests and responses.
//!
//! Contract:
//!
//! - A UDP datagram holds one message: [`Message::parse`]. A TCP stream holds many:
//!   [`frame`] answers "is a whole message at the start of this buffer?" without decoding it
//!   (by `Content-Length`, which RFC 3261 18.3 makes mandatory on streams), then
//!   [`Message::parse`] decodes exactly those bytes. [`Framing::Incomplete`] is the normal
//!   state of a stream buffer, not an error.
//! - Malformed input yields a [`ParseError`] (never a panic) whose
//!   [`ParseError::reason`] is suitable as the reason phrase of a `400 Bad Request`.
//! - Headers are stored in order with canonical names (compact forms such as `v`, `f`, `i`
//!   expanded) and decoded on demand by typed accessors ([`Via`], [`NameAddr`], [`CSeq`]),
//!   so proxies' and phones' unknown headers pass through untouched.
//! - [`Response::to_request`] builds a response the way RFC 3261 8.2.6 asks: Via, From, To,
//!   Call-ID and CSeq copied, a To tag added when the request had none.
//!
//! Why our own parser: `rsip`, the most used SIP crate, has had no release since 0.4.0
//! (edition 2018, nom 7, early 2022), ships its license only as a file, and has no stream
//! framing; the other SIP crates are younger and thinly used. The grammar the server needs
//! is small, and owning it lets every failure carry a 400 reason.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;

/// Largest message accepted, in bytes: bounds what a peer can make us buffer on a stream.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Most header lines a message may have (after unfolding): bounds the work a peer can cause
/// per message. Real INVITEs through a few proxies carry 15-40.
pub const MAX_HEADER_COUNT: usize = 128;
/// Longest header line, in bytes (a folded header counts its continuation lines too).
pub const MAX_HEADER_LINE_LEN: usize = 8 * 1024;
/// Longest number (user part of a Request-URI, From or To) accepted in a call, in
/// characters. Telephone numbers are at most 15 digits (E.164); 64 leaves room for SIP user
/// names and prefixes.
pub const MAX_NUMBER_LEN: usize = 64;
/// Prefix of RFC 3261 branch parameters (section 8.1.1.7).
pub const BRANCH_MAGIC: &str = "z9hG4bK";

/// Why bytes are not a SIP message. The `Display` text is a short reason for a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Not UTF-8 in the start line or headers.
    #[error("Invalid UTF-8 in headers")]
    NotUtf8,
    /// The start line is neither a request line nor a status line.
    #[error("Malformed start line")]
    BadStartLine,
    /// The SIP version is not SIP/2.0.
    #[error("Unsupported SIP version")]
    BadVersion,
    /// A header line has no colon or an empty name.
    #[error("Malformed header line {0}")]
    BadHeaderLine(usize),
    /// A required header is absent.
    #[error("Missing {0} header")]
    MissingHeader(&'static str),
    /// A header value cannot be decoded.
    #[error("Malformed {0} header")]
    BadHeader(&'static str),
    /// The body is shorter than Content-Length says.
    #[error("Body shorter than Content-Length")]
    TruncatedBody,
    /// No Content-Length on a stream transport.
    #[error("Missing Content-Length on a stream")]
    MissingContentLength,
    /// The message exceeds [`MAX_MESSAGE_LEN`].
    #[error("Message too large")]
    TooLarge,
    /// The header section never ends (no empty line).
    #[error("No end of headers")]
    NoHeaderEnd,
    /// More header lines than [`MAX_HEADER_COUNT`].
    #[error("More than {MAX_HEADER_COUNT} headers")]
    TooManyHeaders,
    /// A header line longer than [`MAX_HEADER_LINE_LEN`].
    #[error("Header line longer than {MAX_HEADER_LINE_LEN} bytes")]
    HeaderLineTooLong,
}

impl ParseError {
    /// Reason phrase for the `400 Bad Request` answering this.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

/// A SIP method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// INVITE.
    Invite,
    /// ACK.
    Ack,
    /// BYE.
    Bye,
    /// CANCEL.
    Cancel,
    /// OPTIONS.
    Options,
    /// REGISTER.
    Register,
    /// INFO.
    Info,
    /// UPDATE.
    Update,
    /// PRACK.
    Prack,
    /// REFER (RFC 3515): asks the peer to call a third party.
    Refer,
    /// NOTIFY (RFC 6665): a subscription's news, e.g. a REFER's progress.
    Notify,
    /// Any other token.
    Other(String),
}

impl Method {
    /// Parses a method token (case-sensitive, as RFC 3261 says).
    pub fn parse(s: &str) -> Self {
        match s {
            "INVITE" => Self::Invite,
            "ACK" => Self::Ack,
            "BYE" => Self::Bye,
            "CANCEL" => Self::Cancel,
            "OPTIONS" => Self::Options,
            "REGISTER" => Self::Register,
            "INFO" => Self::Info,
            "UPDATE" => Self::Update,
            "PRACK" => Self::Prack,
            "REFER" => Self::Refer,
            "NOTIFY" => Self::Notify,
            other => Self::Other(other.to_string()),
        }
    }

    /// The method token.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Invite => "INVITE",
            Self::Ack => "ACK",
            Self::Bye => "BYE",
            Self::Cancel => "CANCEL",
            Self::Options => "OPTIONS",
            Self::Register => "REGISTER",
            Self::Info => "INFO",
            Self::Update => "UPDATE",
            Self::Prack => "PRACK",
            Self::Refer => "REFER",
            Self::Notify => "NOTIFY",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Headers in wire order, names canonicalised.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Headers(Vec<(String, String)>);

const COMPACT: &[(&str, &str)] = &[
    ("v", "Via"),
    ("f", "From"),
    ("t", "To"),
    ("i", "Call-ID"),
    ("m", "Contact"),
    ("l", "Content-Length"),
    ("c", "Content-Type"),
    ("k", "Supported"),
    ("s", "Subject"),
    ("e", "Content-Encoding"),
    ("x", "Session-Expires"),
];

const CANONICAL: &[&str] = &[
    "Via",
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Contact",
    "Content-Length",
    "Content-Type",
    "Max-Forwards",
    "Supported",
    "Allow",
    "User-Agent",
    "Server",
    "Route",
    "Record-Route",
    "WWW-Authenticate",
    "Proxy-Authenticate",
    "Authorization",
    "Proxy-Authorization",
    "Require",
    "Expires",
    "Session-Expires",
    "Min-SE",
];

fn canonical_name(name: &str) -> String {
    if name.len() == 1 {
        if let Some((_, full)) = COMPACT.iter().find(|(c, _)| c.eq_ignore_ascii_case(name)) {
            return (*full).to_string();
        }
    }
    CANONICAL
        .iter()
        .find(|c| c.eq_ignore_ascii_case(name))
        .map_or_else(|| name.to_string(), |c| (*c).to_string())
}

impl Headers {
    /// An empty header list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a header (the name is canonicalised).
    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.0.push((canonical_name(name), value.into()));
    }

    /// Replaces every header of this name by one value, keeping the first one's position.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let name = canonical_name(name);
        let value = value.into();
        match self
            .0
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            Some(i) => {
                self.0[i].1 = value;
                let mut j = 0;
                self.0.retain(|(n, _)| {
                    j += 1;
                    j - 1 == i || !n.eq_ignore_ascii_case(&name)
                });
            }
            None => self.0.push((name, value)),
        }
    }

    /// Removes every header of this name.
    pub fn remove(&mut self, name: &str) {
        let name = canonical_name(name);
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
    }

    /// The first value of a header.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_all(name).next()
    }

    /// Every value of a header, in order, one per header line.
    pub fn get_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        let name = canonical_name(name);
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(_, v)| v.as_str())
    }

    /// Every comma-separated value of a header across its lines (for Via, Contact, Route).
    pub fn values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.get_all(name).flat_map(split_commas)
    }

    /// All headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// Splits a header value at commas outside quotes and angle brackets.
fn split_commas(value: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut quoted, mut angle, mut start) = (false, false, 0);
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'<' if !quoted => angle = true,
            b'>' if !quoted => angle = false,
            b',' if !quoted && !angle => {
                parts.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(value[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty())
}

/// `;name=value` parameters as they appear after a Via, name-addr or URI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Params(Vec<(String, Option<String>)>);

impl Params {
    fn parse(s: &str) -> Self {
        Self(
            s.split(';')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((n, v)) => (n.trim().to_string(), Some(v.trim().to_string())),
                    None => (p.to_string(), None),
                })
                .collect(),
        )
    }

    /// Whether the parameter is present (with or without a value).
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// A parameter's value (None when absent or valueless).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_deref())
    }

    /// Sets (or adds) a parameter.
    pub fn set(&mut self, name: &str, value: Option<String>) {
        match self
            .0
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(entry) => entry.1 = value,
            None => self.0.push((name.to_string(), value)),
        }
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, v) in &self.0 {
            match v {
                Some(v) => write!(f, ";{n}={v}")?,
                None => write!(f, ";{n}")?,
            }
        }
        Ok(())
    }
}

/// One Via entry: `SIP/2.0/UDP host:port;branch=...;received=...;rport=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Transport (`UDP`, `TCP`, ...), upper-cased.
    pub transport: String,
    /// Sent-by host.
    pub host: String,
    /// Sent-by port.
    pub port: Option<u16>,
    /// Parameters.
    pub params: Params,
}

impl Via {
    /// Parses one Via value.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let bad = ParseError::BadHeader("Via");
        let (proto, rest) = s
            .trim()
            .split_once(char::is_whitespace)
            .ok_or(bad.clone())?;
        let mut proto_parts = proto.split('/').map(str::trim);
        let (Some(name), Some(version), Some(transport)) =
            (proto_parts.next(), proto_parts.next(), proto_parts.next())
        else {
            return Err(bad);
        };
        if !name.eq_ignore_ascii_case("SIP") || version != "2.0" {
            return Err(bad);
        }
        let rest = rest.trim();
        let (sent_by, params) = rest.split_once(';').unwrap_or((rest, ""));
        let (host, port) = split_host_port(sent_by.trim()).ok_or(bad)?;
        Ok(Self {
            transport: transport.to_ascii_uppercase(),
            host,
            port,
            params: Params::parse(params),
        })
    }

    /// The branch parameter.
    pub fn branch(&self) -> Option<&str> {
        self.params.get("branch")
    }

    /// The `received` parameter.
    pub fn received(&self) -> Option<&str> {
        self.params.get("received")
    }

    /// The `rport` value, if the parameter is present with one.
    pub fn rport(&self) -> Option<u16> {
        self.params.get("rport").and_then(|v| v.parse().ok())
    }

    /// Records where the request really came from (RFC 3261 18.2.1, RFC 3581): `received`
    /// when the source IP differs from sent-by, and the source port in `rport` if the client
    /// asked for it with an empty `rport`.
    pub fn stamp_source(&mut self, source: SocketAddr) {
        let ip = source.ip().to_string();
        if self.host != ip || self.params.has("rport") {
            self.params.set("received", Some(ip));
        }
        if self.params.has("rport") {
            self.params.set("rport", Some(source.port().to_string()));
        }
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, "{}", self.params)
    }
}

fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if s.is_empty() {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        // IPv6 reference.
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((format!("[{host}]"), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_string(), Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((s.to_string(), None)),
    }
}

/// A SIP or SIPS URI: `sip:user@host:port;params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    /// `sip`, `sips` or `tel`.
    pub scheme: String,
    /// User part (the dialled number for calls to a trunk), if any.
    pub user: Option<String>,
    /// Host.
    pub host: String,
    /// Port.
    pub port: Option<u16>,
    /// URI parameters.
    pub params: Params,
}

impl SipUri {
    /// Parses a URI; URI headers (`?...`) are dropped.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let bad = ParseError::BadHeader("URI");
        let s = s.trim();
        let (scheme, rest) = s.split_once(':').ok_or(bad.clone())?;
        let scheme = scheme.to_ascii_lowercase();
        if !matches!(scheme.as_str(), "sip" | "sips" | "tel") {
            return Err(bad);
        }
        let rest = rest.split('?').next().unwrap_or(rest);
        if scheme == "tel" {
            let (number, params) = rest.split_once(';').unwrap_or((rest, ""));
            return Ok(Self {
                scheme,
                user: Some(number.to_string()),
                host: String::new(),
                port: None,
                params: Params::parse(params),
            });
        }
        let (user, hostpart) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u.split(':').next().unwrap_or(u).to_string()), h),
            None => (None, rest),
        };
        let (hostport, params) = hostpart.split_once(';').unwrap_or((hostpart, ""));
        let (host, port) = split_host_port(hostport).ok_or(bad)?;
        Ok(Self {
            scheme,
            user,
            host,
            port,
            params: Params::parse(params),
        })
    }
}

impl fmt::Display for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.scheme)?;
        if self.scheme == "tel" {
            return write!(f, "{}{}", self.user.as_deref().unwrap_or(""), self.params);
        }
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, "{}", self.params)
    }
}

/// A From, To or Contact value: optional display name, URI, header parameters (tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// Display name without quotes.
    pub display: Option<String>,
    /// The URI text as written (parse with [`SipUri::parse`]).
    pub uri: String,
    /// Header parameters (`tag`, `expires`, ...).
    pub params: Params,
}

impl NameAddr {
    /// Parses a name-addr or addr-spec. A URI with whitespace inside is an error: such a
    /// URI, used as a Request-URI later (a dialog's remote target), would make a request
    /// that nobody can parse.
    pub fn parse(s: &str, header: &'static str) -> Result<Self, ParseError> {
        let bad = ParseError::BadHeader(header);
        let s = s.trim();
        if s == "*" {
            return Ok(Self {
                display: None,
                uri: "*".into(),
                params: Params::default(),
            });
        }
        let (display, uri, params) = if let Some(lt) = s.find('<') {
            let gt = s[lt..].find('>').ok_or(bad.clone())? + lt;
            let display = s[..lt].trim().trim_matches('"').trim();
            (
                (!display.is_empty()).then(|| display.to_string()),
                s[lt + 1..gt].trim().to_string(),
                &s[gt + 1..],
            )
        } else {
            // addr-spec: parameters after the URI belong to the header, not the URI.
            let (uri, params) = s.split_once(';').unwrap_or((s, ""));
            (None, uri.trim().to_string(), params)
        };
        if uri.is_empty() || !uri.contains(':') || uri.contains(char::is_whitespace) {
            return Err(bad);
        }
        Ok(Self {
            display,
            uri,
            params: Params::parse(params),
        })
    }

    /// The tag parameter.
    pub fn tag(&self) -> Option<&str> {
        self.params.get("tag")
    }

    /// The parsed URI.
    pub fn sip_uri(&self) -> Result<SipUri, ParseError> {
        SipUri::parse(&self.uri)
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "\"{d}\" ")?;
        }
        write!(f, "<{}>{}", self.uri, self.params)
    }
}

/// The CSeq header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    /// Sequence number.
    pub seq: u32,
    /// Method.
    pub method: Method,
}

impl CSeq {
    /// Parses `314159 INVITE`.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let bad = ParseError::BadHeader("CSeq");
        let mut parts = s.split_ascii_whitespace();
        let (Some(n), Some(m), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad);
        };
        Ok(Self {
            seq: n.parse().map_err(|_| bad)?,
            method: Method::parse(m),
        })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

/// A SIP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: Method,
    /// Request-URI as written.
    pub uri: String,
    /// Headers.
    pub headers: Headers,
    /// Body.
    pub body: Vec<u8>,
}

/// A SIP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Headers.
    pub headers: Headers,
    /// Body.
    pub body: Vec<u8>,
}

/// A request or a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A request.
    Request(Request),
    /// A response.
    Response(Response),
}

/// Typed access shared by requests and responses.
pub trait SipHeaders {
    /// The headers.
    fn headers(&self) -> &Headers;
    /// The headers, mutably.
    fn headers_mut(&mut self) -> &mut Headers;

    /// Every Via, topmost first.
    fn vias(&self) -> Result<Vec<Via>, ParseError> {
        self.headers().values("Via").map(Via::parse).collect()
    }
    /// The topmost Via.
    fn top_via(&self) -> Result<Via, ParseError> {
        let v = self
            .headers()
            .values("Via")
            .next()
            .ok_or(ParseError::MissingHeader("Via"))?;
        Via::parse(v)
    }
    /// From.
    fn header_from(&self) -> Result<NameAddr, ParseError> {
        let v = self
            .headers()
            .get("From")
            .ok_or(ParseError::MissingHeader("From"))?;
        NameAddr::parse(v, "From")
    }
    /// To.
    fn header_to(&self) -> Result<NameAddr, ParseError> {
        let v = self
            .headers()
            .get("To")
            .ok_or(ParseError::MissingHeader("To"))?;
        NameAddr::parse(v, "To")
    }
    /// Call-ID.
    fn call_id(&self) -> Result<&str, ParseError> {
        self.headers()
            .get("Call-ID")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(ParseError::MissingHeader("Call-ID"))
    }
    /// CSeq.
    fn cseq(&self) -> Result<CSeq, ParseError> {
        CSeq::parse(
            self.headers()
                .get("CSeq")
                .ok_or(ParseError::MissingHeader("CSeq"))?,
        )
    }
    /// The first Contact, if any.
    fn contact(&self) -> Result<Option<NameAddr>, ParseError> {
        self.headers()
            .values("Contact")
            .next()
            .map(|v| NameAddr::parse(v, "Contact"))
            .transpose()
    }
    /// Max-Forwards, if present.
    fn max_forwards(&self) -> Result<Option<u32>, ParseError> {
        self.headers()
            .get("Max-Forwards")
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| ParseError::BadHeader("Max-Forwards"))
            })
            .transpose()
    }
    /// Content-Type, if present.
    fn content_type(&self) -> Option<&str> {
        self.headers().get("Content-Type").map(str::trim)
    }
}

impl SipHeaders for Request {
    fn headers(&self) -> &Headers {
        &self.headers
    }
    fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }
}

impl SipHeaders for Response {
    fn headers(&self) -> &Headers {
        &self.headers
    }
    fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }
}

/// The conventional reason phrase of a status code.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        183 => "Session Progress",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        600 => "Busy Everywhere",
        603 => "Decline",
        _ => match status / 100 {
            1 => "Progress",
            2 => "OK",
            3 => "Redirect",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

impl Request {
    /// A request with no headers.
    pub fn new(method: Method, uri: impl Into<String>) -> Self {
        Self {
            method,
            uri: uri.into(),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// Sets the body and its Content-Type.
    pub fn with_body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.headers.set("Content-Type", content_type);
        self.body = body.into();
        self
    }

    /// Checks the headers every request needs (RFC 3261 8.1.1) and that CSeq's method
    /// matches the request line, so later code can rely on them.
    pub fn validate(&self) -> Result<(), ParseError> {
        let via = self.top_via()?;
        if via.branch().is_none() && self.method != Method::Ack {
            // RFC 2543 peers omit the branch; we key transactions by it, so require it.
            return Err(ParseError::BadHeader("Via"));
        }
        self.header_from()?;
        self.header_to()?;
        self.call_id()?;
        let cseq = self.cseq()?;
        if cseq.method != self.method {
            return Err(ParseError::BadHeader("CSeq"));
        }
        self.max_forwards()?;
        Ok(())
    }

    /// Records in the top Via where the request really came from (`received`, and `rport`
    /// when asked: RFC 3261 18.2.1, RFC 3581), so responses copying it carry the address.
    /// A missing or unreadable Via is left alone.
    pub fn stamp_source(&mut self, source: SocketAddr) {
        let Some(index) = self
            .headers
            .0
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case("Via"))
        else {
            return;
        };
        let line = self.headers.0[index].1.clone();
        let mut values = split_commas(&line);
        let Some(first) = values.next() else {
            return;
        };
        let Ok(mut via) = Via::parse(first) else {
            return;
        };
        via.stamp_source(source);
        let mut rebuilt = via.to_string();
        for rest in values {
            rebuilt.push_str(", ");
            rebuilt.push_str(rest);
        }
        self.headers.0[index].1 = rebuilt;
    }

    /// Serialises the request; Content-Length is always written from the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let start = format!("{} {} SIP/2.0", self.method, self.uri);
        serialize(&start, &self.headers, &self.body)
    }

    /// The ACK for a non-2xx final response to this INVITE (RFC 3261 17.1.1.3): same
    /// Request-URI, top Via, From, Call-ID and CSeq number; To from the response.
    pub fn ack_for(&self, response: &Response) -> Self {
        let mut ack = Self::new(Method::Ack, self.uri.clone());
        if let Some(v) = self.headers.values("Via").next() {
            ack.headers.push("Via", v);
        }
        for name in ["Max-Forwards", "From"] {
            if let Some(v) = self.headers.get(name) {
                ack.headers.push(name, v);
            }
        }
        if let Some(v) = response.headers.get("To") {
            ack.headers.push("To", v);
        }
        if let Some(v) = self.headers.get("Call-ID") {
            ack.headers.push("Call-ID", v);
        }
        let seq = self.cseq().map(|c| c.seq).unwrap_or(0);
        ack.headers.push(
            "CSeq",
            CSeq {
                seq,
                method: Method::Ack,
            }
            .to_string(),
        );
        for v in self.headers.get_all("Route") {
            ack.headers.push("Route", v);
        }
        ack
    }

    /// A CANCEL for this request (RFC 3261 9.1): same Request-URI, top Via, From, To,
    /// Call-ID and CSeq number, method CANCEL.
    pub fn cancel(&self) -> Self {
        let mut ack = self.ack_for(&Response::new(0));
        ack.method = Method::Cancel;
        ack.headers.remove("To");
        if let Some(v) = self.headers.get("To") {
            ack.headers.push("To", v);
        }
        let seq = self.cseq().map(|c| c.seq).unwrap_or(0);
        ack.headers.set(
            "CSeq",
            CSeq {
                seq,
                method: Method::Cancel,
            }
            .to_string(),
        );
        ack
    }
}

impl Response {
    /// A response with the conventional reason phrase and no headers.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            reason: reason_phrase(status).to_string(),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// Builds a response to `request` (RFC 3261 8.2.6): copies Via (all), From, To,
    /// Call-ID and CSeq; adds `to_tag` to To unless the status is 100 or To already has a tag.
    pub fn to_request(request: &Request, status: u16, to_tag: Option<&str>) -> Self {
        let mut r = Self::new(status);
        for v in request.headers.get_all("Via") {
            r.headers.push("Via", v);
        }
        if let Some(v) = request.headers.get("From") {
            r.headers.push("From", v);
        }
        if let Some(to) = request.headers.get("To") {
            let mut to = to.to_string();
            if let (Some(tag), true) = (to_tag, status != 100) {
                let has_tag = NameAddr::parse(&to, "To").is_ok_and(|n| n.tag().is_some());
                if !has_tag {
                    let _ = write!(to, ";tag={tag}");
                }
            }
            r.headers.push("To", to);
        }
        for name in ["Call-ID", "CSeq"] {
            if let Some(v) = request.headers.get(name) {
                r.headers.push(name, v);
            }
        }
        r
    }

    /// Sets the reason phrase (a 400 carries the parse error's reason).
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        // Reason phrases end at the line; keep a peer's text from breaking the framing.
        self.reason = reason.into().replace(['\r', '\n'], " ");
        self
    }

    /// Sets the body and its Content-Type.
    pub fn with_body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.headers.set("Content-Type", content_type);
        self.body = body.into();
        self
    }

    /// Whether this is a provisional (1xx) response.
    pub fn is_provisional(&self) -> bool {
        self.status < 200
    }

    /// Serialises the response; Content-Length is always written from the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let start = format!("SIP/2.0 {} {}", self.status, self.reason);
        serialize(&start, &self.headers, &self.body)
    }
}

fn serialize(start: &str, headers: &Headers, body: &[u8]) -> Vec<u8> {
    let mut s = String::with_capacity(512);
    s.push_str(start);
    s.push_str("\r\n");
    for (n, v) in headers.iter() {
        if n == "Content-Length" {
            continue;
        }
        let _ = write!(s, "{n}: {v}\r\n");
    }
    let _ = write!(s, "Content-Length: {}\r\n\r\n", body.len());
    let mut out = s.into_bytes();
    out.extend_from_slice(body);
    out
}

impl Message {
    /// Decodes one message. On UDP pass the datagram; on a stream pass exactly the bytes
    /// [`frame`] measured. A body longer than Content-Length is cut to it; a shorter one is
    /// an error.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        if buf.len() > MAX_MESSAGE_LEN {
            return Err(ParseError::TooLarge);
        }
        // Senders may prefix keep-alive CRLFs (RFC 3261 7.5 says ignore them).
        let start = buf
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(buf.len());
        let buf = &buf[start..];
        let (head_len, body_start) = find_header_end(buf).ok_or(ParseError::NoHeaderEnd)?;
        let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| ParseError::NotUtf8)?;
        check_head_limits(head.as_bytes())?;
        // `check_head_limits` counted the lines; unfolding only joins them.
        let mut lines = unfold(head).into_iter();
        let start_line = lines.next().ok_or(ParseError::BadStartLine)?;
        if start_line.len() > MAX_HEADER_LINE_LEN {
            return Err(ParseError::HeaderLineTooLong);
        }
        let mut headers = Headers::new();
        for (i, line) in lines.enumerate() {
            let (name, value) = line
                .split_once(':')
                .ok_or(ParseError::BadHeaderLine(i + 2))?;
            let name = name.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(ParseError::BadHeaderLine(i + 2));
            }
            if line.len() > MAX_HEADER_LINE_LEN {
                return Err(ParseError::HeaderLineTooLong);
            }
            headers.push(name, value.trim());
        }
        let rest = &buf[body_start..];
        let body = match headers.get("Content-Length") {
            Some(v) => {
                let n: usize = v
                    .trim()
                    .parse()
                    .map_err(|_| ParseError::BadHeader("Content-Length"))?;
                rest.get(..n).ok_or(ParseError::TruncatedBody)?.to_vec()
            }
            None => rest.to_vec(),
        };
        if let Some(status_line) = start_line.strip_prefix("SIP/") {
            let mut parts = status_line.splitn(3, ' ');
            let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
                return Err(ParseError::BadStartLine);
            };
            if version != "2.0" {
                return Err(ParseError::BadVersion);
            }
            let status: u16 = code.parse().map_err(|_| ParseError::BadStartLine)?;
            if !(100..=699).contains(&status) {
                return Err(ParseError::BadStartLine);
            }
            return Ok(Self::Response(Response {
                status,
                reason: parts.next().unwrap_or("").to_string(),
                headers,
                body,
            }));
        }
        let mut parts = start_line.split(' ');
        let (Some(method), Some(uri), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ParseError::BadStartLine);
        };
        if method.is_empty() || uri.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(ParseError::BadStartLine);
        }
        if version != "SIP/2.0" {
            return Err(ParseError::BadVersion);
        }
        Ok(Self::Request(Request {
            method: Method::parse(method),
            uri: uri.to_string(),
            headers,
            body,
        }))
    }

    /// Serialises the message.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Request(r) => r.to_bytes(),
            Self::Response(r) => r.to_bytes(),
        }
    }
}

/// What can be read of a request that [`Message::parse`] refused (bad Content-Length, bad
/// UTF-8, another SIP version), to answer it with a `400`: its method and Request-URI and
/// the headers a response copies (RFC 3261 8.2.6: Via, From, To, Call-ID, CSeq), with any
/// invalid UTF-8 replaced. `None` when it is a response, or has no request line or no Via
/// (nobody to answer then).
pub fn salvage_request(buf: &[u8]) -> Option<Request> {
    const COPIED: [&str; 5] = ["Via", "From", "To", "Call-ID", "CSeq"];
    let buf = &buf[..buf.len().min(MAX_MESSAGE_LEN)];
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let buf = &buf[start..];
    let head_len = find_header_end(buf).map_or(buf.len(), |(h, _)| h);
    let head = String::from_utf8_lossy(&buf[..head_len]);
    let mut lines = head.split('\n').map(|l| l.trim_end_matches('\r'));
    let mut start_line = lines.next()?.split(' ');
    let (method, uri) = (start_line.next()?, start_line.next()?);
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) || uri.is_empty() {
        return None;
    }
    let mut headers = Headers::new();
    for line in lines.take(MAX_HEADER_COUNT) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = canonical_name(name.trim());
        if COPIED.contains(&name.as_str()) && line.len() <= MAX_HEADER_LINE_LEN {
            headers.push(&name, value.trim());
        }
    }
    headers.get("Via")?;
    Some(Request {
        method: Method::parse(method),
        uri: uri.to_string(),
        headers,
        body: Vec::new(),
    })
}

/// Returns (end of header text, start of body).
fn find_header_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Checks raw header bytes (possibly an unfinished header section) against
/// [`MAX_HEADER_COUNT`] and [`MAX_HEADER_LINE_LEN`], counting physical lines: a folded line
/// is checked again, whole, after unfolding.
fn check_head_limits(head: &[u8]) -> Result<(), ParseError> {
    HeadLimits::default().scan(head)
}

/// The header limits of [`check_head_limits`], kept across the pieces of a header section
/// that arrives over a stream, so that each byte is checked once.
#[derive(Debug, Default)]
pub(crate) struct HeadLimits {
    lines: usize,
    line_len: usize,
}

impl HeadLimits {
    /// Checks the next bytes of the header section.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<(), ParseError> {
        for &b in bytes {
            if b == b'\n' {
                self.line_len = 0;
                continue;
            }
            // Continuation lines (folding) belong to the line before; the start line counts.
            if self.line_len == 0 && b != b' ' && b != b'\t' {
                self.lines += 1;
                if self.lines > MAX_HEADER_COUNT + 1 {
                    return Err(ParseError::TooManyHeaders);
                }
            }
            self.line_len += 1;
            if self.line_len > MAX_HEADER_LINE_LEN + 1 {
                return Err(ParseError::HeaderLineTooLong);
            }
        }
        Ok(())
    }
}

/// Splits header text into lines, joining folded continuation lines (RFC 3261 7.3.1).
fn unfold(head: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in head.split('\n').map(|l| l.trim_end_matches('\r')) {
        match out.last_mut() {
            Some(prev) if line.starts_with([' ', '\t']) => {
                prev.push(' ');
                prev.push_str(line.trim());
            }
            _ if line.is_empty() => {}
            _ => out.push(line.to_string()),
        }
    }
    out
}

/// What [`frame`] found at the start of a stream buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Not a whole message yet: read more.
    Incomplete,
    /// This many bytes of CRLF keep-alive (RFC 5626 4.4.1): consume them, answer a double
    /// CRLF with a single CRLF.
    KeepAlive(usize),
    /// A whole message of this many bytes: pass them to [`Message::parse`] and consume them.
    Message(usize),
}

/// Finds the length of the first message in a stream buffer, without decoding it.
pub fn frame(buf: &[u8]) -> Result<Framing, ParseError> {
    Ok(match measure(buf)? {
        Measure::KeepAlive(n) => Framing::KeepAlive(n),
        Measure::Total(total) if buf.len() >= total => Framing::Message(total),
        Measure::Total(_) | Measure::NoHeaderEnd => Framing::Incomplete,
    })
}

/// What [`measure`] knows of the first message in a stream buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Measure {
    /// This many bytes of CRLF keep-alive.
    KeepAlive(usize),
    /// The header section has not ended yet.
    NoHeaderEnd,
    /// The header section is whole and the message is this many bytes long (the buffer may
    /// hold fewer while the body arrives).
    Total(usize),
}

/// [`frame`], also telling the length of a message whose body is still arriving.
pub(crate) fn measure(buf: &[u8]) -> Result<Measure, ParseError> {
    let crlfs = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if crlfs > 0 {
        return Ok(Measure::KeepAlive(crlfs));
    }
    let Some((head_len, body_start)) = find_header_end(buf) else {
        // A header section still arriving is held to the same limits as a whole one, so a
        // peer cannot make us buffer 64 KiB of one endless line or thousands of tiny ones.
        check_head_limits(buf)?;
        return if buf.len() > MAX_MESSAGE_LEN {
            Err(ParseError::TooLarge)
        } else {
            Ok(Measure::NoHeaderEnd)
        };
    };
    check_head_limits(&buf[..head_len])?;
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| ParseError::NotUtf8)?;
    let mut length = None;
    for line in head.split('\n').skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("Content-Length") || name.eq_ignore_ascii_case("l") {
            length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| ParseError::BadHeader("Content-Length"))?,
            );
        }
    }
    let length = length.ok_or(ParseError::MissingContentLength)?;
    let total = body_start.saturating_add(length);
    if total > MAX_MESSAGE_LEN {
        return Err(ParseError::TooLarge);
    }
    Ok(Measure::Total(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:+15550100@telcoflow.example SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: <sip:+15550100@telcoflow.example>\r\n\
From: \"Alice\" <sip:alice@atlanta.example>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@10.0.0.5:5062>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\n";

    fn invite() -> Request {
        match Message::parse(INVITE.as_bytes()).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => panic!("not a request"),
        }
    }

    #[test]
    fn parses_an_invite() {
        let r = invite();
        assert_eq!(r.method, Method::Invite);
        assert_eq!(r.uri, "sip:+15550100@telcoflow.example");
        r.validate().unwrap();
        let via = r.top_via().unwrap();
        assert_eq!(via.transport, "UDP");
        assert_eq!(via.host, "10.0.0.5");
        assert_eq!(via.port, Some(5062));
        assert_eq!(via.branch(), Some("z9hG4bK776asdhds"));
        assert!(via.params.has("rport"));
        assert_eq!(via.rport(), None);
        let from = r.header_from().unwrap();
        assert_eq!(from.display.as_deref(), Some("Alice"));
        assert_eq!(from.uri, "sip:alice@atlanta.example");
        assert_eq!(from.tag(), Some("1928301774"));
        let to = r.header_to().unwrap();
        assert_eq!(to.tag(), None);
        let uri = to.sip_uri().unwrap();
        assert_eq!(uri.user.as_deref(), Some("+15550100"));
        assert_eq!(uri.host, "telcoflow.example");
        assert_eq!(r.call_id().unwrap(), "a84b4c76e66710@pc33.atlanta.example");
        assert_eq!(
            r.cseq().unwrap(),
            CSeq {
                seq: 314159,
                method: Method::Invite
            }
        );
        assert_eq!(r.contact().unwrap().unwrap().uri, "sip:alice@10.0.0.5:5062");
        assert_eq!(r.max_forwards().unwrap(), Some(70));
        assert_eq!(r.content_type(), Some("application/sdp"));
        assert_eq!(r.body, b"v=0\n");
    }

    #[test]
    fn serialise_round_trip() {
        let r = invite();
        let bytes = r.to_bytes();
        assert_eq!(Message::parse(&bytes).unwrap(), Message::Request(r));
    }

    #[test]
    fn compact_forms_folding_and_multi_value_via() {
        let text = "BYE sip:bob@b.example SIP/2.0\r\n\
v: SIP/2.0/UDP proxy.example;branch=z9hG4bKp1, SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bKa\r\n\
f: <sip:a@a.example>;tag=x\r\n\
t: <sip:b@b.example>\r\n ;tag=y\r\n\
i: abc\r\n\
CSEQ: 2 BYE\r\n\
l: 0\r\n\r\n";
        let Message::Request(r) = Message::parse(text.as_bytes()).unwrap() else {
            panic!("not a request");
        };
        r.validate().unwrap();
        let vias = r.vias().unwrap();
        assert_eq!(vias.len(), 2);
        assert_eq!(vias[0].host, "proxy.example");
        assert_eq!(vias[1].transport, "TCP");
        assert_eq!(r.header_to().unwrap().tag(), Some("y"));
        assert_eq!(r.call_id().unwrap(), "abc");
        assert_eq!(r.headers.get("Content-Length"), Some("0"));
    }

    #[test]
    fn response_to_request_copies_and_tags() {
        let r = invite();
        let ok = Response::to_request(&r, 200, Some("srv1"));
        assert_eq!(ok.reason, "OK");
        assert_eq!(ok.top_via().unwrap().branch(), Some("z9hG4bK776asdhds"));
        assert_eq!(ok.header_from().unwrap().tag(), Some("1928301774"));
        assert_eq!(ok.header_to().unwrap().tag(), Some("srv1"));
        assert_eq!(ok.call_id().unwrap(), r.call_id().unwrap());
        assert_eq!(ok.cseq().unwrap(), r.cseq().unwrap());
        // 100 Trying never gets a tag; an existing tag is kept.
        let trying = Response::to_request(&r, 100, Some("srv1"));
        assert_eq!(trying.header_to().unwrap().tag(), None);
        let again = Response::to_request(&r, 200, Some("srv1"));
        let mut tagged = r.clone();
        tagged.headers.set("To", again.headers.get("To").unwrap());
        let ok2 = Response::to_request(&tagged, 486, Some("other"));
        assert_eq!(ok2.header_to().unwrap().tag(), Some("srv1"));
        // And it parses back.
        let bytes = ok.to_bytes();
        let mut expected = ok;
        expected.headers.push("Content-Length", "0");
        assert_eq!(Message::parse(&bytes).unwrap(), Message::Response(expected));
    }

    #[test]
    fn bad_request_reason_and_reason_sanitised() {
        let text = INVITE.replace("CSeq: 314159 INVITE", "CSeq: many INVITE");
        let Message::Request(r) = Message::parse(text.as_bytes()).unwrap() else {
            panic!("not a request");
        };
        let err = r.validate().unwrap_err();
        assert_eq!(err, ParseError::BadHeader("CSeq"));
        let resp = Response::to_request(&r, 400, Some("t")).with_reason(err.reason());
        assert_eq!(resp.reason, "Malformed CSeq header");
        let weird = Response::new(400).with_reason("a\r\nb");
        assert_eq!(weird.reason, "a  b");
    }

    #[test]
    fn validation_failures() {
        for (from, to, expect) in [
            (
                "Call-ID: a84b4c76e66710@pc33.atlanta.example\r\n",
                "",
                ParseError::MissingHeader("Call-ID"),
            ),
            (
                "CSeq: 314159 INVITE",
                "CSeq: 314159 BYE",
                ParseError::BadHeader("CSeq"),
            ),
            ("branch=z9hG4bK776asdhds;", "", ParseError::BadHeader("Via")),
            (
                "Max-Forwards: 70",
                "Max-Forwards: lots",
                ParseError::BadHeader("Max-Forwards"),
            ),
            (
                "From: \"Alice\" <sip:alice@atlanta.example>;tag=1928301774\r\n",
                "",
                ParseError::MissingHeader("From"),
            ),
            (
                "To: <sip:+15550100@telcoflow.example>",
                "To: <nonsense",
                ParseError::BadHeader("To"),
            ),
        ] {
            let text = INVITE.replace(from, to);
            let Message::Request(r) = Message::parse(text.as_bytes()).unwrap() else {
                panic!("not a request");
            };
            assert_eq!(r.validate().unwrap_err(), expect, "{from}");
        }
    }

    #[test]
    fn malformed_messages() {
        let cases: &[(&[u8], ParseError)] = &[
            (b"", ParseError::NoHeaderEnd),
            (
                b"INVITE sip:x SIP/2.0\r\nVia: x\r\n",
                ParseError::NoHeaderEnd,
            ),
            (b"HELLO\r\n\r\n", ParseError::BadStartLine),
            (b"INVITE sip:x SIP/3.0\r\n\r\n", ParseError::BadVersion),
            (b"SIP/2.0 99 Odd\r\n\r\n", ParseError::BadStartLine),
            (b"SIP/1.0 200 OK\r\n\r\n", ParseError::BadVersion),
            (
                b"INVITE sip:x SIP/2.0\r\nNoColon\r\n\r\n",
                ParseError::BadHeaderLine(2),
            ),
            (
                b"INVITE sip:x SIP/2.0\r\nContent-Length: 10\r\n\r\nabc",
                ParseError::TruncatedBody,
            ),
            (
                b"INVITE sip:x SIP/2.0\r\nContent-Length: -1\r\n\r\n",
                ParseError::BadHeader("Content-Length"),
            ),
            (
                b"INVITE sip:x SIP/2.0\r\nX: \xff\r\n\r\n",
                ParseError::NotUtf8,
            ),
        ];
        for (bytes, expect) in cases {
            assert_eq!(
                Message::parse(bytes).unwrap_err(),
                *expect,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_eq!(
            Message::parse(&vec![b'a'; MAX_MESSAGE_LEN + 1]).unwrap_err(),
            ParseError::TooLarge
        );
    }

    #[test]
    fn parse_never_panics_on_prefixes_and_noise() {
        let bytes = INVITE.as_bytes();
        for n in 0..bytes.len() {
            let _ = Message::parse(&bytes[..n]);
            let _ = frame(&bytes[..n]);
        }
        let mut seed = 7u32;
        let alphabet = b"SIP/2.0 :;<>\"\r\n=,@INVITEVia";
        for _ in 0..5000 {
            let mut buf = Vec::new();
            for _ in 0..(seed % 120) {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                buf.push(alphabet[(seed >> 16) as usize % alphabet.len()]);
            }
            if let Ok(Message::Request(r)) = Message::parse(&buf) {
                let _ = r.validate();
                let _ = r.vias();
                let _ = r.contact();
            }
            let _ = frame(&buf);
        }
    }

    #[test]
    fn stream_framing() {
        let one = INVITE.as_bytes();
        let mut stream = Vec::new();
        stream.extend_from_slice(b"\r\n\r\n");
        stream.extend_from_slice(one);
        stream.extend_from_slice(one);
        stream.extend_from_slice(&one[..30]);
        assert_eq!(frame(&stream).unwrap(), Framing::KeepAlive(4));
        let mut rest = &stream[4..];
        for _ in 0..2 {
            let Framing::Message(n) = frame(rest).unwrap() else {
                panic!("expected a message");
            };
            assert_eq!(n, one.len());
            assert!(matches!(
                Message::parse(&rest[..n]).unwrap(),
                Message::Request(_)
            ));
            rest = &rest[n..];
        }
        assert_eq!(frame(rest).unwrap(), Framing::Incomplete);
        // Headers complete but body not yet.
        assert_eq!(frame(&one[..one.len() - 1]).unwrap(), Framing::Incomplete);
        assert_eq!(
            frame(b"OPTIONS sip:x SIP/2.0\r\nVia: a\r\n\r\n").unwrap_err(),
            ParseError::MissingContentLength
        );
        assert_eq!(
            frame(b"OPTIONS sip:x SIP/2.0\r\nl: 99999999\r\n\r\n").unwrap_err(),
            ParseError::TooLarge
        );
        // One endless line is refused as soon as it passes the line limit.
        assert_eq!(
            frame(&vec![b'a'; MAX_MESSAGE_LEN + 1]).unwrap_err(),
            ParseError::HeaderLineTooLong
        );
        // Lines within the limits that add up past the message limit.
        let mut big = b"OPTIONS sip:x SIP/2.0\r\n".to_vec();
        while big.len() <= MAX_MESSAGE_LEN {
            big.extend_from_slice(&[b'x'; 1000]);
            big.extend_from_slice(b": y\r\n");
        }
        assert_eq!(frame(&big).unwrap_err(), ParseError::TooLarge);
    }

    #[test]
    fn header_limits_are_typed_errors_on_datagrams_and_streams() {
        let with_headers = |n: usize, line: usize| {
            let mut m =
                String::from("OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n");
            for i in 0..n {
                let _ = write!(m, "X-{i}: {}\r\n", "v".repeat(line));
            }
            m.push_str("Content-Length: 0\r\n\r\n");
            m.into_bytes()
        };
        // At the limits: fine.
        let ok = with_headers(MAX_HEADER_COUNT - 2, 10);
        assert!(Message::parse(&ok).is_ok());
        assert!(matches!(frame(&ok), Ok(Framing::Message(_))));
        let long_ok = with_headers(1, MAX_HEADER_LINE_LEN - 10);
        assert!(Message::parse(&long_ok).is_ok());
        // One more header, or a longer line: refused, whole or still arriving.
        let many = with_headers(MAX_HEADER_COUNT, 10);
        assert_eq!(Message::parse(&many), Err(ParseError::TooManyHeaders));
        assert_eq!(frame(&many), Err(ParseError::TooManyHeaders));
        assert_eq!(
            frame(&many[..many.len() - 30]),
            Err(ParseError::TooManyHeaders)
        );
        let long = with_headers(1, MAX_HEADER_LINE_LEN + 1);
        assert_eq!(Message::parse(&long), Err(ParseError::HeaderLineTooLong));
        assert_eq!(
            frame(&long[..long.len() - 25]),
            Err(ParseError::HeaderLineTooLong)
        );
        assert_eq!(
            ParseError::TooManyHeaders.reason(),
            format!("More than {MAX_HEADER_COUNT} headers")
        );
    }

    #[test]
    fn unparseable_requests_are_salvaged_for_a_400() {
        let bad_length = INVITE.replace("Content-Length: 4", "Content-Length: four");
        let bad_utf8 = {
            let mut b = INVITE.replace("Alice", "Al\u{1}ce").into_bytes();
            let i = b.iter().position(|&c| c == 1).unwrap();
            b[i] = 0xff;
            b
        };
        let sip3 = INVITE.replace("SIP/2.0\r\nVia", "SIP/3.0\r\nVia");
        for (bytes, error) in [
            (
                bad_length.into_bytes(),
                ParseError::BadHeader("Content-Length"),
            ),
            (bad_utf8, ParseError::NotUtf8),
            (sip3.into_bytes(), ParseError::BadVersion),
        ] {
            assert_eq!(Message::parse(&bytes), Err(error));
            let r = salvage_request(&bytes).expect("salvaged");
            assert_eq!(r.method, Method::Invite);
            assert_eq!(r.call_id().unwrap(), "a84b4c76e66710@pc33.atlanta.example");
            assert_eq!(r.cseq().unwrap().seq, 314_159);
            assert!(r.top_via().unwrap().branch().is_some());
            assert!(r.header_from().is_ok() && r.header_to().is_ok());
        }
        // Nobody to answer: responses, no request line, no Via.
        assert!(salvage_request(b"SIP/3.0 200 OK\r\nVia: x\r\n\r\n").is_none());
        assert!(salvage_request(b"\xff\xfe\r\nVia: x\r\n\r\n").is_none());
        assert!(salvage_request(b"INVITE sip:x SIP/3.0\r\nTo: <sip:x>\r\n\r\n").is_none());
        assert!(salvage_request(b"").is_none());
    }

    #[test]
    fn via_received_and_rport() {
        let mut via = Via::parse("SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKx;rport").unwrap();
        via.stamp_source("203.0.113.9:40000".parse().unwrap());
        assert_eq!(via.received(), Some("203.0.113.9"));
        assert_eq!(via.rport(), Some(40000));
        assert_eq!(
            via.to_string(),
            "SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKx;rport=40000;received=203.0.113.9"
        );
        // Same address, no rport: nothing added.
        let mut plain = Via::parse("SIP/2.0/TCP 10.0.0.5;branch=z9hG4bKy").unwrap();
        plain.stamp_source("10.0.0.5:5060".parse().unwrap());
        assert_eq!(plain.received(), None);
        assert_eq!(plain.to_string(), "SIP/2.0/TCP 10.0.0.5;branch=z9hG4bKy");
        let v6 = Via::parse("SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKz").unwrap();
        assert_eq!(v6.host, "[2001:db8::1]");
        assert_eq!(v6.port, Some(5060));
        assert!(Via::parse("SIP/2.0/UDP").is_err());
        assert!(Via::parse("HTTP/1.1/TCP host").is_err());
        assert!(Via::parse("SIP/2.0/UDP host:port").is_err());
    }

    #[test]
    fn request_stamp_source_touches_only_the_top_via() {
        let mut r = invite();
        r.headers.set(
            "Via",
            "SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKa;rport, SIP/2.0/UDP proxy;branch=z9hG4bKb",
        );
        r.headers.push("Via", "SIP/2.0/UDP last;branch=z9hG4bKc");
        r.stamp_source("203.0.113.9:40000".parse().unwrap());
        let vias = r.vias().unwrap();
        assert_eq!(vias.len(), 3);
        assert_eq!(vias[0].received(), Some("203.0.113.9"));
        assert_eq!(vias[0].rport(), Some(40000));
        assert_eq!(vias[1].received(), None);
        assert_eq!(vias[2].host, "last");
        let ok = Response::to_request(&r, 200, Some("t"));
        assert_eq!(ok.top_via().unwrap().rport(), Some(40000));
    }

    #[test]
    fn uris_and_name_addrs() {
        let u = SipUri::parse("sip:1000:secret@pbx.example:5080;transport=tcp").unwrap();
        assert_eq!(u.user.as_deref(), Some("1000"));
        assert_eq!(u.host, "pbx.example");
        assert_eq!(u.port, Some(5080));
        assert_eq!(u.params.get("transport"), Some("tcp"));
        let t = SipUri::parse("tel:+15550100;phone-context=x").unwrap();
        assert_eq!(t.user.as_deref(), Some("+15550100"));
        assert!(SipUri::parse("http://x").is_err());
        // addr-spec form: params belong to the header.
        let n = NameAddr::parse("sip:bob@b.example;tag=88", "To").unwrap();
        assert_eq!(n.uri, "sip:bob@b.example");
        assert_eq!(n.tag(), Some("88"));
        assert_eq!(n.to_string(), "<sip:bob@b.example>;tag=88");
        // Commas inside quotes and brackets do not split Contacts.
        let mut h = Headers::new();
        h.push(
            "Contact",
            "\"Doe, J\" <sip:j@x.example;a=1,2>, <sip:k@y.example>",
        );
        let contacts: Vec<&str> = h.values("Contact").collect();
        assert_eq!(contacts.len(), 2);
        assert_eq!(
            NameAddr::parse(contacts[0], "Contact")
                .unwrap()
                .display
                .as_deref(),
            Some("Doe, J")
        );
        // Blanks around the brackets and in the display name are fine; inside a URI they
        // are not.
        let n = NameAddr::parse("  \"Bob B\"  < sip:bob@b.example >;tag=1 ", "To").unwrap();
        assert_eq!(n.uri, "sip:bob@b.example");
        for bad in [
            "<sip:bob @b.example>",
            "\"Bob\" <sip:bob@b.example\t;transport=tcp>",
            "sip:bob @b.example;tag=1",
        ] {
            assert_eq!(
                NameAddr::parse(bad, "Contact"),
                Err(ParseError::BadHeader("Contact")),
                "{bad}"
            );
        }
    }

    #[test]
    fn ack_and_cancel_for_client_transactions() {
        let r = invite();
        let busy = Response::to_request(&r, 486, Some("callee"));
        let ack = r.ack_for(&busy);
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, r.uri);
        assert_eq!(ack.top_via().unwrap().branch(), Some("z9hG4bK776asdhds"));
        assert_eq!(ack.header_to().unwrap().tag(), Some("callee"));
        assert_eq!(
            ack.cseq().unwrap(),
            CSeq {
                seq: 314159,
                method: Method::Ack
            }
        );
        let cancel = r.cancel();
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(cancel.header_to().unwrap().tag(), None);
        assert_eq!(
            cancel.cseq().unwrap(),
            CSeq {
                seq: 314159,
                method: Method::Cancel
            }
        );
        cancel.validate().unwrap();
    }

    #[test]
    fn headers_set_and_remove() {
        let mut h = Headers::new();
        h.push("Route", "<sip:a>");
        h.push("X-One", "1");
        h.push("route", "<sip:b>");
        h.set("Route", "<sip:c>");
        assert_eq!(h.get_all("Route").collect::<Vec<_>>(), vec!["<sip:c>"]);
        assert_eq!(h.iter().next(), Some(("Route", "<sip:c>")));
        h.remove("x-one");
        assert_eq!(h.get("X-One"), None);
    }
}
