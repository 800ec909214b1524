//! RTP media building blocks for SIP calls, all sans-IO (no sockets, no clock reads):
//!
//! - [`codec`]: the codecs a leg negotiates (PCMU, PCMA, G.722) and their encoder/decoder state.
//! - [`dtmf_out`]: DTMF the server sends: RFC 4733 packets and Q.23 dual tones.
//! - [`g711`]: PCMU / PCMA encode and decode.
//! - [`g722`]: G.722 (16 kHz wideband) encode and decode.
//! - [`packet`]: RTP header, RFC 4733 telephone events, RTCP sender/receiver reports.
//! - [`jitter`]: adaptive jitter buffer for 20 ms frames (decoded in playout order).
//! - [`reframe`]: packets of any `ptime` split and joined into 20 ms frames by timestamp.
//! - [`ports`]: even RTP ports of the configured range, handed out round-robin.
//! - [`srtp`]: SRTP (RFC 3711) keyed by SDES: the two AES-CM suites, master keys, a leg's contexts.
//! - [`session`]: one call leg's RTP session: symmetric RTP, send/receive, DTMF, RTCP, timeout.
//!
//! A media task (in the Telcoflow server: one RTP leg per SIP call) owns a socket and feeds datagrams and the current time into these types.

pub mod codec;
pub mod dtmf_out;
pub mod g711;
pub mod g722;
pub mod jitter;
pub mod packet;
pub mod ports;
pub mod reframe;
pub mod session;
pub mod srtp;
