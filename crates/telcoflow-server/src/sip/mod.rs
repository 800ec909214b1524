//! SIP signalling building blocks, all sans-IO (no sockets, no clock reads, no spawning).
//!
//! A transport task owns the UDP/TCP sockets, feeds datagrams or stream bytes and the current
//! time into these types, and sends what they ask it to send.
//!
//! - [`message`]: SIP requests and responses: parse, stream framing, build, serialise.
//! - [`sdp`]: SDP parse/generate and audio offer/answer (PCMU, PCMA, telephone-event).
//! - [`digest`]: digest authentication answers to 401/407 challenges (dialling out).
//! - [`transaction`]: RFC 3261 client and server transactions with their timers.
//! - [`uas`]: the user agent server for incoming calls: call-level events and actions.

pub mod digest;
pub mod message;
pub mod sdp;
pub mod transaction;
pub mod uas;
