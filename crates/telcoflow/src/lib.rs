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
//! - [`ring`]: the outgoing audio [`RingBuffer`](ring::RingBuffer).
//! - [`error`]: the one [`Error`] type.
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
//! use telcoflow::{ActiveCall, TelcoflowClient, TelcoflowClientConfig};
//!
//! # async fn run() -> Result<(), telcoflow::Error> {
//! let config = TelcoflowClientConfig::local("dev-api-key", "my-connector-uuid")?;
//! let client = TelcoflowClient::connect(config).await?;
//! client
//!     .serve(|call: ActiveCall| async move {
//!         let _ = call.answer().await;
//!         let mut audio = call.audio_stream(0);
//!         while let Some(chunk) = audio.next().await {
//!             let _ = call.send_audio(&chunk).await; // echo
//!         }
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod call;
pub mod client;
pub mod config;
pub mod error;
pub mod event;
pub mod ring;
mod transport;

pub use call::{ActiveCall, AudioStream, CallEvent, CallEvents, CallState, CommandResult};
pub use client::TelcoflowClient;
pub use config::{Auth, Backoff, SessionMode, TelcoflowClientConfig, TelcoflowClientConfigBuilder};
pub use error::Error;
pub use event::{ClientEvent, ClientEvents, SessionNotification};
pub use telcoflow_proto::control::{Activity, Channel, CloseReason, SessionInfo};
pub use telcoflow_proto::{AudioMode, SampleRate};
