//! The Telcoflow Rust SDK: put a voice application on phone calls.
//!
//! A [`TelcoflowClient`] keeps one control connection to a Telcoflow server alive (call
//! events, heartbeat, reconnection). For every incoming call it creates an [`ActiveCall`],
//! opens the call's own media connection and hands it to the application already connected.
//! Each call runs in its own task; audio goes out through a per-call ring buffer that the
//! server drains at its playout pace (pull-based flow control). A media connection that breaks
//! is opened again while the server holds the call for its agent
//! ([`CallEvent::MediaReconnected`]).
//!
//! - [`config`]: [`TelcoflowClientConfig`] and its builder.
//! - [`client`]: [`TelcoflowClient`], the control connection.
//! - [`call`]: [`ActiveCall`], its commands, audio and media connection.
//! - [`event`]: [`ClientEvent`] and the event stream.
//! - [`error`]: [`Error`] for the client, [`CallError`] for calls, [`ConfigError`] for
//!   configuration.
//! - `ring` (private): the outgoing audio buffer of a call.
//!
//! Outbound calls: [`TelcoflowClient::create_session`]; the session API over HTTP:
//! [`TelcoflowClient::list_sessions`] and [`TelcoflowClient::close_session`]; which calls
//! a connection is offered: [`TelcoflowClient::setup_call_flow`]. The README maps the
//! Python SDK's API onto these.
//!
//! # Features
//!
//! - `tls` (default): `wss://` URLs, a private CA ([`TelcoflowClientConfigBuilder::ca_cert`])
//!   and mTLS client certificates ([`TelcoflowClientConfigBuilder::mtls`]), with rustls.
//!
//! # Tasks
//!
//! The client runs one task for the control connection and one per open media connection (with
//! a small one beside it that relays shutdown);
//! [`TelcoflowClient::serve`] adds one per call handler. All of them belong to the client and
//! [`TelcoflowClient::shutdown`] waits for them. Read [`TelcoflowClient::events`] (or use
//! `serve`) promptly: when the event buffer is full the control connection waits.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use telcoflow::{ActiveCall, AudioChannel, TelcoflowClient, TelcoflowClientConfig};
//!
//! # async fn run() -> Result<(), telcoflow::Error> {
//! // TELCOFLOW_API_KEY, TELCOFLOW_CONNECTOR_UUID and TELCOFLOW_BASE_URL.
//! let config = TelcoflowClientConfig::from_env()?;
//! let client = TelcoflowClient::connect(config).await?;
//! client
//!     .serve(|call: ActiveCall| async move {
//!         if call.answer().await.is_err() {
//!             return;
//!         }
//!         let mut audio = call.audio_stream(AudioChannel::Mixed);
//!         while let Some(chunk) = audio.next().await {
//!             let _ = call.send_audio(&chunk).await; // echo
//!         }
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod call;
mod call_flow;
pub mod client;
pub mod config;
pub mod error;
pub mod event;
mod http;
mod ring;
mod transport;

pub use call::{
    ActiveCall, AudioChannel, AudioStream, CallEvent, CallEvents, CallState, CallStateWatch,
    TransferMethod, TransferOutcome,
};
pub use call_flow::{CallFlow, InboundCalls};
pub use client::TelcoflowClient;
pub use config::{Auth, Backoff, SessionMode, TelcoflowClientConfig, TelcoflowClientConfigBuilder};
pub use error::{CallError, CallErrorKind, ConfigError, Error, ServerCode};
pub use event::{ClientEvent, ClientEvents, SessionNotification};
pub use http::{CloseResult, SessionPage, SessionQuery};
/// The kind of conversation a session carries (a call or messaging); not to be confused with
/// an [`AudioChannel`] of a call.
pub use telcoflow_proto::control::Channel;
pub use telcoflow_proto::control::{Activity, CloseReason, SessionInfo, SessionState};
pub use telcoflow_proto::stats::{AgentStats, CallStats, LegStats};
pub use telcoflow_proto::{AudioMode, ErrorCode, SampleRate};

// The README's example is compiled with the doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;
