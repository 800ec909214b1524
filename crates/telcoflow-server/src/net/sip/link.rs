//! What the SIP endpoint task and the RTP leg tasks say to each other: legs send
//! [`Command`]s, the endpoint answers with [`SipEvent`]s.

use telcoflow_sip::sip::sdp::{LocalMedia, Negotiated};
use telcoflow_sip::sip::uac::UacConfig;
use telcoflow_sip::sip::uas;
use tokio::sync::mpsc;

/// Commands queued from legs and the dialler to the endpoint.
pub(super) const COMMAND_QUEUE: usize = 256;
/// SIP events queued towards one leg (a handful per call).
pub(super) const LEG_EVENT_QUEUE: usize = 16;
/// `User-Agent` / `Server` header value.
pub(super) const USER_AGENT: &str = concat!("telcoflow/", env!("CARGO_PKG_VERSION"));

/// Identifies a leg to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum LegKey {
    /// An incoming call of the UAS.
    In(uas::CallHandle),
    /// An outgoing call, by the endpoint-wide number it was given.
    Out(u64),
}

/// From a leg to the endpoint.
#[derive(Debug)]
pub(super) enum Command {
    /// 180 Ringing for an incoming call.
    Ringing(uas::CallHandle),
    /// 200 OK with SDP for an incoming call.
    Answer {
        call: uas::CallHandle,
        media: LocalMedia,
    },
    /// A final error response for an unanswered incoming call.
    Reject { call: uas::CallHandle, status: u16 },
    /// BYE (or CANCEL for an unanswered outgoing call).
    Hangup(LegKey),
    /// An INFO with one DTMF digit (`application/dtmf-relay`) in a call's dialog.
    DtmfInfo { leg: LegKey, body: String },
    /// A REFER in an incoming call's dialog: the caller is asked to call `refer_to`.
    Refer {
        call: uas::CallHandle,
        refer_to: String,
    },
    /// Dial out.
    Dial {
        key: u64,
        config: Box<UacConfig>,
        media: LocalMedia,
        events: mpsc::Sender<SipEvent>,
        /// Over TLS: the host name the peer's certificate must carry.
        tls_name: Option<String>,
    },
    /// The leg has ended; forget it.
    Gone(LegKey),
}

/// From the endpoint to a leg.
#[derive(Debug, Clone)]
pub(super) enum SipEvent {
    /// The call is answered (our 200 was sent, or the callee's 200 arrived) with these media.
    Answered(Negotiated),
    /// An outgoing call's callee sent SDP in a provisional response (183): its early media,
    /// played before the answer.
    EarlyMedia(Negotiated),
    /// An outgoing call failed before the answer with this status.
    Failed(u16),
    /// An outgoing call could not reach its destination: the connection (TCP, TLS) to it
    /// failed, for this reason.
    Unreachable(String),
    /// The call ended on the SIP side (BYE, CANCEL, lost ACK, our BYE completed).
    Ended,
    /// New media parameters (re-INVITE, hold).
    MediaUpdated(Negotiated),
    /// A key press sent as SIP INFO.
    Dtmf { digit: char, duration_ms: u32 },
    /// Our REFER got its final answer (202: accepted).
    ReferAnswered(u16),
    /// A NOTIFY of our REFER: the sipfrag's status and reason, and whether it is the last.
    ReferProgress {
        status: u16,
        reason: String,
        terminated: bool,
    },
}

/// A destination's host name that did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {0}")]
pub(super) struct ResolveError(String);

/// What an outgoing leg's task asks the endpoint to dial once it runs.
#[derive(Debug)]
pub(super) struct OutgoingDial {
    pub(super) key: u64,
    pub(super) config: Box<UacConfig>,
    pub(super) media: LocalMedia,
    pub(super) events: mpsc::Sender<SipEvent>,
    /// A host name to resolve into `config.destination` first, with its port.
    pub(super) resolve: Option<(String, u16)>,
    /// Over TLS: the host name the peer's certificate must carry.
    pub(super) tls_name: Option<String>,
}

impl OutgoingDial {
    /// Resolves the destination if needed and gives the command for the endpoint.
    pub(super) async fn into_command(mut self) -> Result<Command, ResolveError> {
        if let Some((host, port)) = self.resolve.take() {
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(ResolveError(host))?;
            self.config.destination = addr;
        }
        Ok(Command::Dial {
            key: self.key,
            config: self.config,
            media: self.media,
            events: self.events,
            tls_name: self.tls_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use telcoflow_sip::sip::Transport;
    use telcoflow_sip::sip::transaction::Timers;

    #[tokio::test]
    async fn dial_names_resolve_in_the_leg() {
        // Only `localhost` (from the hosts file): tests send nothing beyond this machine.
        let (events, _rx) = mpsc::channel(1);
        let dial = |resolve| OutgoingDial {
            key: 1,
            config: Box::new(UacConfig {
                target: "sip:x@localhost:5070".into(),
                destination: "0.0.0.0:5070".parse().unwrap(),
                transport: Transport::Udp,
                from: "sip:a@127.0.0.1".into(),
                contact: "sip:a@127.0.0.1".into(),
                sent_by: "127.0.0.1:5060".into(),
                credentials: None,
                timers: Timers::default(),
                user_agent: USER_AGENT.into(),
                delayed_offer: false,
                session_expires: None,
            }),
            media: LocalMedia::new(IpAddr::from([127, 0, 0, 1]), 20000, 1),
            events: events.clone(),
            resolve,
            tls_name: None,
        };
        match dial(Some(("localhost".into(), 5070))).into_command().await {
            Ok(Command::Dial { config, .. }) => {
                assert!(config.destination.ip().is_loopback());
                assert_eq!(config.destination.port(), 5070);
            }
            other => panic!("{other:?}"),
        }
    }
}
