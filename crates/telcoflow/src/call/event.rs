//! What a call reports: its [`CallEvent`]s and its [`CallState`] changes.

use super::CallState;
use super::audio::AudioChannel;
use crate::error::ServerCode;
use futures_util::Stream;
use serde_json::{Map, Value};
use std::pin::Pin;
use std::task::{Context, Poll};
use telcoflow_proto::media;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

/// Something that happened on a call, from [`ActiveCall::events`](super::ActiveCall::events).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CallEvent {
    /// The call ended (`reason` as the server gave it, if any).
    Terminated {
        /// E.g. `caller_hangup`.
        reason: Option<String>,
    },
    /// Something failed on the call; it may go on.
    Error {
        /// E.g. `TTS_SESSION_ERROR` (codes this SDK has no [`ErrorCode`](crate::ErrorCode)
        /// for are kept as sent).
        code: Option<ServerCode>,
        /// The server's message.
        message: Option<String>,
    },
    /// The caller pressed a key.
    Dtmf {
        /// The key (`0`-`9`, `*`, `#`, `A`-`D`).
        digit: String,
        /// How long it was held.
        duration_ms: u32,
    },
    /// The media connection was lost and has been opened again: audio and commands go on.
    /// Commands that were waiting for an answer when it was lost failed with
    /// [`CallErrorKind::Connection`](crate::CallErrorKind::Connection) (their outcome is
    /// unknown). A connection that cannot be brought
    /// back within about 9 s ends the call.
    MediaReconnected,
    /// Received audio was dropped because the application did not read a channel fast enough.
    AudioOverflow {
        /// The channel.
        channel: AudioChannel,
        /// Chunks dropped on this call so far.
        dropped: u64,
    },
    /// The server dropped some of the application's audio to win back delay: after the
    /// application (or its network) stalled, live audio it produced meanwhile would otherwise
    /// reach the caller late for the rest of the call. Audio queued ahead of time (speech
    /// synthesis) is never dropped.
    AudioSkipped {
        /// How much audio was dropped.
        dropped_ms: u64,
        /// Why, as the server gave it (e.g. `agent_stall`).
        reason: Option<String>,
    },
    /// The call's quality figures, sent once at its end just before
    /// [`CallEvent::Terminated`]: per leg jitter, loss, concealment, round trip and an
    /// estimated MOS, and the agent's side (see [`CallStats`](crate::CallStats)).
    /// The same figures are available while the call runs from
    /// `GET /public/v1/calls/{id}/stats`.
    Stats(Box<crate::CallStats>),
    /// How a transfer by REFER goes ([`ActiveCall::transfer`](super::ActiveCall::transfer)):
    /// the status line the SIP caller reports of its call to the target (100 `Trying`, 180
    /// `Ringing`, 200 `OK`, or a failure such as 486 `Busy Here`).
    TransferProgress {
        /// How the transfer is carried out (`refer`).
        method: String,
        /// The SIP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// An event this SDK has no variant for.
    Other {
        /// The event name.
        name: String,
        /// Its other fields.
        fields: Map<String, Value>,
    },
}

impl CallEvent {
    pub(super) fn from_wire(ev: media::CallEvent) -> Self {
        let str_field = |n: &str| ev.fields.get(n).and_then(Value::as_str).map(str::to_owned);
        match ev.event.as_str() {
            media::CallEvent::TERMINATED => Self::Terminated {
                reason: str_field("reason"),
            },
            media::CallEvent::ERROR => Self::Error {
                code: ev
                    .fields
                    .get("error_code")
                    .and_then(Value::as_str)
                    .map(ServerCode::new),
                message: str_field("error_message"),
            },
            media::CallEvent::DTMF => {
                let digit = str_field("digit");
                let duration = ev.fields.get("duration_ms").and_then(Value::as_u64);
                match (digit, duration) {
                    (Some(digit), Some(d)) => Self::Dtmf {
                        digit,
                        duration_ms: u32::try_from(d).unwrap_or(u32::MAX),
                    },
                    _ => Self::Other {
                        name: ev.event,
                        fields: ev.fields,
                    },
                }
            }
            media::CallEvent::AUDIO_SKIPPED => {
                match ev.fields.get("dropped_ms").and_then(Value::as_u64) {
                    Some(dropped_ms) => Self::AudioSkipped {
                        dropped_ms,
                        reason: str_field("reason"),
                    },
                    None => Self::Other {
                        name: ev.event,
                        fields: ev.fields,
                    },
                }
            }
            media::CallEvent::TRANSFER_PROGRESS => {
                let status = ev.fields.get("status").and_then(Value::as_u64);
                match (
                    str_field("method"),
                    status.and_then(|s| u16::try_from(s).ok()),
                ) {
                    (Some(method), Some(status)) => Self::TransferProgress {
                        method,
                        status,
                        reason: str_field("reason").unwrap_or_default(),
                    },
                    _ => Self::Other {
                        name: ev.event,
                        fields: ev.fields,
                    },
                }
            }
            media::CallEvent::STATS => match ev.to_stats() {
                Some(stats) => Self::Stats(Box::new(stats)),
                None => Self::Other {
                    name: ev.event,
                    fields: ev.fields,
                },
            },
            _ => Self::Other {
                name: ev.event,
                fields: ev.fields,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_skipped_is_a_variant_and_a_malformed_one_is_kept_as_sent() {
        let wire = media::CallEvent::audio_skipped(280, "agent_stall");
        assert_eq!(
            CallEvent::from_wire(wire),
            CallEvent::AudioSkipped {
                dropped_ms: 280,
                reason: Some("agent_stall".into())
            }
        );
        let mut odd = media::CallEvent::audio_skipped(0, "agent_stall");
        odd.fields.insert("dropped_ms".into(), Value::from("a lot"));
        assert!(matches!(CallEvent::from_wire(odd), CallEvent::Other { .. }));
    }

    #[test]
    fn transfer_progress_is_a_variant_and_a_malformed_one_is_kept_as_sent() {
        let wire = media::CallEvent::transfer_progress("refer", 180, "Ringing");
        assert_eq!(
            CallEvent::from_wire(wire),
            CallEvent::TransferProgress {
                method: "refer".into(),
                status: 180,
                reason: "Ringing".into()
            }
        );
        let mut odd = media::CallEvent::transfer_progress("refer", 180, "Ringing");
        odd.fields.insert("status".into(), Value::from(70_000));
        assert!(matches!(CallEvent::from_wire(odd), CallEvent::Other { .. }));
    }

    #[test]
    fn stats_is_a_variant_and_a_malformed_one_is_kept_as_sent() {
        let stats = telcoflow_proto::stats::CallStats {
            call_id: "c".into(),
            session_id: "s".into(),
            duration_ms: 10,
            legs: Vec::new(),
            agent: Default::default(),
        };
        assert_eq!(
            CallEvent::from_wire(media::CallEvent::stats(&stats)),
            CallEvent::Stats(Box::new(stats.clone()))
        );
        let mut odd = media::CallEvent::stats(&stats);
        odd.fields
            .insert("duration_ms".into(), Value::from("a while"));
        assert!(matches!(CallEvent::from_wire(odd), CallEvent::Other { .. }));
    }
}

/// The events of one call; ends when the call ends.
#[derive(Debug)]
pub struct CallEvents {
    pub(super) inner: ReceiverStream<CallEvent>,
}

impl Stream for CallEvents {
    type Item = CallEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<CallEvent>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// Every state change of a call, from [`ActiveCall::watch_state`](super::ActiveCall::watch_state).
///
/// ```no_run
/// use telcoflow::{ActiveCall, CallState};
///
/// async fn log_states(call: &ActiveCall) {
///     let mut states = call.watch_state();
///     while let Some(state) = states.changed().await {
///         println!("{}: {state:?}", call.id());
///     }
///     assert_eq!(states.current(), CallState::Terminated);
/// }
/// ```
#[derive(Debug, Clone)]
pub struct CallStateWatch {
    rx: watch::Receiver<CallState>,
}

impl CallStateWatch {
    pub(super) fn new(rx: watch::Receiver<CallState>) -> Self {
        Self { rx }
    }

    /// The state now.
    pub fn current(&self) -> CallState {
        *self.rx.borrow()
    }

    /// Waits for a state this watch has not returned yet and returns it; `None` once the call
    /// is [`CallState::Terminated`] and that was seen (no state follows it). States that
    /// follow each other quickly may be seen only as the last of them.
    pub async fn changed(&mut self) -> Option<CallState> {
        let unseen = self.rx.has_changed().unwrap_or(false);
        if !unseen && *self.rx.borrow() == CallState::Terminated {
            return None;
        }
        // Fails only when the call is gone, which cannot happen before it is terminated.
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }

    /// Waits until the state satisfies `f` (the current state counts) and returns it; `None`
    /// if the call terminated without.
    pub async fn wait_for(&mut self, mut f: impl FnMut(CallState) -> bool) -> Option<CallState> {
        let state = *self
            .rx
            .wait_for(|s| f(*s) || *s == CallState::Terminated)
            .await
            .ok()?;
        f(state).then_some(state)
    }
}
