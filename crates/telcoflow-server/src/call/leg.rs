//! A leg: one phone on a call (the caller, or a destination rung by `call.connect`), whatever
//! network it is on. The call actor talks to every leg through these types, so the simulated
//! network and SIP/RTP plug in the same way. Audio is samples ([`SampleFrame`]): each network
//! converts at its own edge (G.711 for RTP, s16le for the simulated phones' WebSocket).

use super::frames::SampleFrame;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telcoflow_proto::sim::HangupReason;
use telcoflow_proto::{ErrorCode, SampleRate};
use tokio::sync::mpsc;

/// Identifies a leg within its call. The caller is always [`LegId::CALLER`]; each
/// `call.connect` attempt gets a fresh id so that late events of an abandoned leg are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LegId(pub(crate) u32);

impl LegId {
    pub(crate) const CALLER: Self = Self(0);
}

/// From a leg to its call.
#[derive(Debug)]
pub(crate) enum LegEvent {
    /// A rung destination picked up.
    Answered,
    /// A rung destination that has not picked up sends early media (a SIP 183 with SDP):
    /// its audio events before the answer are its ringback or announcements.
    EarlyMedia,
    /// A rung destination refused or could not be reached.
    Rejected(Refusal),
    /// The leg hung up.
    Hangup,
    /// Samples at the leg's rate.
    Audio(SampleFrame),
    /// A key press.
    Dtmf { digit: char, duration_ms: u32 },
    /// The leg dropped audio it had received: stale after the server itself stalled.
    AudioSkipped { dropped_ms: u64 },
    /// The caller answered our REFER ([`LegOutput::Refer`]) with this final SIP status
    /// (202: it accepted to call the target).
    ReferAnswered { status: u16 },
    /// How the caller's call to the REFER's target goes (a NOTIFY's sipfrag status line);
    /// `terminated`: the last one.
    ReferProgress {
        status: u16,
        reason: String,
        terminated: bool,
    },
    /// The leg's audio is at this rate from now on, both ways (a SIP leg that negotiated
    /// G.722: 16 kHz, G.711: 8 kHz).
    Rate(SampleRate),
}

/// Why a rung destination did not take the call. Every network says it the same way, so that
/// `call.connect` and an outbound call's `answer` report it with the same code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The destination is on another call (SIP 486, 600).
    Busy,
    /// The destination turned the call down (SIP 603, a simulated phone's `reject`).
    Declined,
    /// It rang and nobody answered (SIP 408, 480, 487).
    NoAnswer,
    /// The destination could not be reached at all: the host does not resolve, the transport
    /// failed, or the far end answered with another final status.
    Unreachable(String),
}

impl Refusal {
    /// The refusal a SIP final status stands for.
    pub(crate) fn from_sip_status(status: u16) -> Self {
        match status {
            486 | 600 => Self::Busy,
            603 | 607 => Self::Declined,
            408 | 480 | 487 => Self::NoAnswer,
            _ => Self::Unreachable(format!("SIP {status}")),
        }
    }

    /// The code an application sees. A destination that rang but did not take the call is
    /// unanswered, whichever way it said so: the reference SDK documents `CALL_UNANSWERED` as the
    /// outcome of a connect that is not picked up, and apps test for it alone. A destination
    /// that never rang is rejected.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Busy | Self::Declined | Self::NoAnswer => ErrorCode::CallUnanswered,
            Self::Unreachable(_) => ErrorCode::CallRejected,
        }
    }
}

impl fmt::Display for Refusal {
    /// Completes "DESTINATION ...".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Busy => f.write_str("is busy"),
            Self::Declined => f.write_str("declined the call"),
            Self::NoAnswer => f.write_str("did not answer"),
            Self::Unreachable(why) => write!(f, "cannot be reached: {why}"),
        }
    }
}

/// From a call to its leg.
#[derive(Debug, Clone)]
pub(crate) enum LegOutput {
    /// An application claimed the call: the caller hears ringing.
    Ringing,
    /// The call is up.
    Answered,
    /// Samples at the leg's rate, one 20 ms frame.
    Audio(SampleFrame),
    /// The call ended for this leg.
    Hangup(HangupReason),
    /// DTMF for the leg to send (`call.send_dtmf`): RFC 4733 events or SIP INFO on a SIP
    /// leg, tones mixed into the audio on a simulated phone.
    Dtmf(telcoflow_sip::rtp::dtmf_out::DtmfPlan),
    /// Ask the caller to call `target` itself (`call.transfer` on an incoming SIP call: a
    /// REFER). Answered with [`LegEvent::ReferAnswered`]; a leg that cannot refer answers 501.
    Refer { target: String },
}

/// How a call reaches one of its legs.
#[derive(Debug, Clone)]
pub(crate) struct LegLink {
    pub(crate) rate: SampleRate,
    pub(crate) tx: mpsc::Sender<LegOutput>,
    /// The network the leg is on (`kind` of its quality figures).
    pub(crate) kind: LegKind,
    /// Receive figures the leg's own task measures (RTP: sequence numbers, jitter buffer,
    /// RTCP), for a network that has them; the call measures the others itself.
    pub(crate) quality: Option<Arc<LegQuality>>,
}

/// The network of a leg: its metrics' label and the `kind` of its quality figures.
pub(crate) use crate::metrics::LegKind;

/// A leg's receive figures as its task measured them last.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct NetFigures {
    /// RFC 3550 interarrival jitter.
    pub(crate) jitter: Duration,
    /// Packets expected (sequence number span) and received.
    pub(crate) expected: u64,
    pub(crate) received: u64,
    /// Frames concealed for loss or lateness, and the runs of them.
    pub(crate) concealed_frames: u64,
    pub(crate) gaps: u64,
    /// Times audio missed its tick and the tick moved.
    pub(crate) clock_misses: u64,
    /// Round trip from RTCP, once known.
    pub(crate) rtt: Option<Duration>,
    /// Delay the leg's buffering adds (the jitter buffer's target).
    pub(crate) buffering: Duration,
    /// The codec's name (`PCMU`, `PCMA`, `G722`), for a network that has codecs.
    pub(crate) codec: Option<&'static str>,
    /// The SRTP suite of an encrypted leg.
    pub(crate) srtp: Option<&'static str>,
}

/// Where a leg's task leaves its [`NetFigures`] for the call to read: written by one task,
/// read on demand, never held across anything. Plain numbers behind a lock: updating costs no
/// allocation, so the task may do it every frame.
#[derive(Debug, Default)]
pub(crate) struct LegQuality(Mutex<NetFigures>);

impl LegQuality {
    pub(crate) fn set(&self, figures: NetFigures) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = figures;
    }

    pub(crate) fn get(&self) -> NetFigures {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_statuses_map_to_refusals_and_codes() {
        assert_eq!(Refusal::from_sip_status(486), Refusal::Busy);
        assert_eq!(Refusal::from_sip_status(603), Refusal::Declined);
        assert_eq!(Refusal::from_sip_status(480), Refusal::NoAnswer);
        assert_eq!(
            Refusal::from_sip_status(404),
            Refusal::Unreachable("SIP 404".into())
        );
        assert_eq!(Refusal::Busy.code(), ErrorCode::CallUnanswered);
        assert_eq!(
            Refusal::Unreachable("x".into()).code(),
            ErrorCode::CallRejected
        );
        assert_eq!(Refusal::Busy.to_string(), "is busy");
    }
}
