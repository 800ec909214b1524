//! Telcoflow's SIP and RTP stack, sans-IO: no sockets, no clock reads, no spawning, no async
//! runtime.
//!
//! - [`sip`]: SIP signalling: messages, stream framing, SDP offer/answer, digest auth,
//!   RFC 3261 transactions, the user agent server (incoming calls) and client (outgoing calls).
//! - [`rtp`]: RTP media: G.711 and G.722, RTP/RTCP/RFC 4733 packets, the jitter buffer, RTP port
//!   bookkeeping and one call leg's RTP session.
//! - [`phase`]: the phase aligner that moves a 20 ms media clock towards the arrival of
//!   audio produced in real time.
//!
//! # Driving contract
//!
//! The owner of a socket (the Telcoflow server's SIP endpoint and RTP legs, or any other
//! program) feeds these types what it reads and the time it read it, then drains what they
//! ask it to do:
//!
//! - SIP: [`sip::uas::Uas::handle_input`] and [`sip::uac::OutgoingCall::handle_input`] take
//!   the bytes of one message and `now`; `poll_transmit` gives the bytes to send,
//!   `poll_event` what happened, `poll_timeout` when to call `handle_timeout` next. After
//!   every mutation, drain them until `None`.
//! - RTP: [`rtp::session::RtpSession`] takes each datagram with its arrival time, and gives
//!   one 20 ms frame per tick of the owner's clock.
//!
//! Everything is deterministic for a given input and clock, so the tests wire two state
//! machines together in memory and advance a fake clock.

#![warn(missing_docs)]

pub mod phase;
pub mod rtp;
pub mod sip;
