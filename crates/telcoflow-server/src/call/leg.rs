//! A leg: one phone on a call (the caller, or a destination rung by `call.connect`), whatever
//! network it is on. The call actor talks to every leg through these types, so the simulated
//! network and SIP/RTP plug in the same way. Audio is samples ([`SampleFrame`]): each network
//! converts at its own edge (G.711 for RTP, s16le for the simulated phones' WebSocket).

use super::frames::SampleFrame;
use telcoflow_proto::SampleRate;
use telcoflow_proto::sim::HangupReason;
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
    /// A rung destination refused or could not be reached.
    Rejected,
    /// The leg hung up.
    Hangup,
    /// Samples at the leg's rate.
    Audio(SampleFrame),
    /// A key press.
    Dtmf { digit: char, duration_ms: u32 },
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
}

/// How a call reaches one of its legs.
#[derive(Debug, Clone)]
pub(crate) struct LegLink {
    pub(crate) rate: SampleRate,
    pub(crate) tx: mpsc::Sender<LegOutput>,
}
