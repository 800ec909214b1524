//! The Telcoflow wire protocol, with no I/O.
//!
//! Everything that crosses a socket between a Telcoflow application and a Telcoflow server is
//! defined here, once, as typed values:
//!
//! - [`control`]: the persistent control connection (`/v1/agent/session-manager`): setup,
//!   session notification and claiming, `call.in`, request/response.
//! - [`media`]: the per-call media connection: commands and their responses, pull-based
//!   flow control (`buffer_request`), call events and the binary audio frame.
//! - [`sim`]: the simulated phone network used for development and tests.
//! - [`audio`]: sample rates, audio modes, frame sizes and PCM helpers.
//! - [`code`]: the error codes both sides use.
//! - [`stats`]: per-call quality figures ([`stats::CallStats`]) and the E-model estimate.
//! - [`recording`]: call recordings as the HTTP API lists them.
//! - [`pool`]: storage outgoing frames are split from without an allocation per frame.
//!
//! The crate neither opens sockets nor reads clocks: the server and the SDK own the I/O and call
//! into it to encode and decode frames. Decoding never panics on hostile input; every failure is
//! a [`DecodeError`].
#![warn(missing_docs)]

pub mod audio;
pub mod code;
pub mod control;
pub mod media;
pub mod pool;
pub mod recording;
pub mod sim;
pub mod stats;

pub use audio::{AudioMode, SampleRate};
pub use code::ErrorCode;

/// The version string this crate's users send as `x-sdk-version`.
pub const PROTOCOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The text was not JSON, or not the JSON shape of any known frame.
    #[error("invalid frame: {0}")]
    Json(#[from] serde_json::Error),
    /// A binary frame was too short to carry audio (fewer than 2 bytes).
    #[error("binary frame of {0} bytes is too short to carry audio")]
    ShortAudio(usize),
}
