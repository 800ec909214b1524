//! SIP signalling building blocks, all sans-IO (no sockets, no clock reads, no spawning).
//!
//! A transport task (in the Telcoflow server: its SIP endpoint) owns the UDP/TCP/TLS sockets,
//! feeds datagrams or stream bytes and the current time into these types, and sends what they
//! ask it to send.
//!
//! - [`message`]: SIP requests and responses: parse, stream framing, build, serialise.
//! - [`stream`]: cutting a TCP byte stream into messages and keep-alives.
//! - [`sdp`]: SDP parse/generate and audio offer/answer (PCMU, PCMA, telephone-event).
//! - [`digest`]: digest authentication answers to 401/407 challenges (dialling out).
//! - [`transaction`]: RFC 3261 client and server transactions with their timers.
//! - [`uas`]: the user agent server for incoming calls: call-level events and actions.
//! - [`session_timer`]: RFC 4028 session timers of the calls the UAS answers.
//! - [`uac`]: one outgoing call (dialling out): INVITE, auth retry, CANCEL, BYE.
//! - [`register`]: outbound registration: REGISTER with digest auth, refresh, back-off,
//!   removal.

pub mod digest;
pub mod message;
pub mod register;
pub mod sdp;
pub mod session_timer;
pub mod stream;
pub mod transaction;
pub mod uac;
pub mod uas;

#[cfg(test)]
mod pair_tests;

use std::net::SocketAddr;

/// The transport a message came over or must leave by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP (unreliable: the transactions retransmit).
    Udp,
    /// TCP (reliable). Send on the connection from `destination`.
    Tcp,
    /// TLS over TCP (reliable, `SIP/2.0/TLS`). Send on the TLS connection from `destination`.
    Tls,
}

impl Transport {
    pub(crate) fn reliable(self) -> bool {
        matches!(self, Self::Tcp | Self::Tls)
    }

    /// Its name in a Via header: `UDP`, `TCP`, `TLS`.
    pub fn via_name(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
            Self::Tls => "TLS",
        }
    }
}

/// Our Contact URI over TLS, the one place it is built: `user` at the TLS listener's
/// advertised `host:port`, as a `sips:` URI when the peer asked for one (RFC 5630), else
/// `sip:` with `;transport=tls` (a URI without the parameter means UDP). Its Via sent-by is
/// that same `host:port`.
pub fn tls_contact(user: &str, tls_host_port: &str, sips: bool) -> String {
    if sips {
        format!("sips:{user}@{tls_host_port}")
    } else {
        format!("sip:{user}@{tls_host_port};transport=tls")
    }
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Transport to use.
    pub transport: Transport,
    /// Peer address (for TCP: the connection to that peer).
    pub destination: SocketAddr,
    /// A serialised SIP message.
    pub payload: Vec<u8>,
}
