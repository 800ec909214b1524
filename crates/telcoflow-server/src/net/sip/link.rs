//! What the SIP endpoint task and the RTP leg tasks say to each other: legs send
//! [`Command`]s, the endpoint answers with [`SipEvent`]s.

use std::collections::VecDeque;
use std::time::Duration;

use telcoflow_sip::sip::sdp::{LocalMedia, Negotiated};
use telcoflow_sip::sip::uac::UacConfig;
use telcoflow_sip::sip::uas;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// Commands queued from legs and the dialler to the endpoint.
pub(super) const COMMAND_QUEUE: usize = 256;
/// SIP events queued towards one leg (a handful per call).
pub(super) const LEG_EVENT_QUEUE: usize = 16;
/// How long a finished outgoing call's last events wait for its leg to read them.
const LEG_BACKLOG_WAIT: Duration = Duration::from_secs(30);
/// A bound on a leg's backlog: coalescing keeps an outgoing leg's far under (its final
/// events come once each); past it, key presses and the like are dropped.
const LEG_BACKLOG_MAX: usize = 32;
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

/// A leg's SIP events on their way to it. They go at once while the leg's queue
/// has room; past that they wait here in order, where a newer early media or media update
/// replaces the one waiting before it (only the latest counts), so a burst of provisional
/// responses cannot crowd out the answer, failure or end that follows.
#[derive(Debug)]
pub(super) struct LegEvents {
    tx: mpsc::Sender<SipEvent>,
    backlog: VecDeque<SipEvent>,
}

impl LegEvents {
    pub(super) fn new(tx: mpsc::Sender<SipEvent>) -> Self {
        Self {
            tx,
            backlog: VecDeque::new(),
        }
    }

    /// Sends `event`, or keeps it for [`LegEvents::flush`] while the leg is behind (then
    /// returns false).
    pub(super) fn send(&mut self, event: SipEvent) -> bool {
        self.flush();
        let event = if self.backlog.is_empty() {
            match self.tx.try_send(event) {
                Ok(()) | Err(TrySendError::Closed(_)) => return true,
                Err(TrySendError::Full(event)) => event,
            }
        } else {
            event
        };
        let coalesces = matches!(
            (self.backlog.back(), &event),
            (Some(SipEvent::EarlyMedia(_)), SipEvent::EarlyMedia(_))
                | (Some(SipEvent::MediaUpdated(_)), SipEvent::MediaUpdated(_))
        );
        if coalesces {
            self.backlog.pop_back();
        } else if self.backlog.len() >= LEG_BACKLOG_MAX && !is_final(&event) {
            tracing::debug!("leg far behind; SIP event dropped");
            return false;
        }
        self.backlog.push_back(event);
        false
    }

    /// Moves what waits into the leg's queue as far as it has room.
    pub(super) fn flush(&mut self) {
        while let Some(event) = self.backlog.pop_front() {
            match self.tx.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    self.backlog.push_front(event);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    return;
                }
            }
        }
    }

    /// Whether events wait for room in the leg's queue.
    pub(super) fn is_behind(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// The leg is forgotten: what still waits goes to a task that sends it as
    /// the leg reads (for at most [`LEG_BACKLOG_WAIT`]).
    pub(super) fn finish(mut self) {
        self.flush();
        if self.backlog.is_empty() {
            return;
        }
        let Self { tx, backlog } = self;
        tokio::spawn(async move {
            let send_all = async {
                for event in backlog {
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LEG_BACKLOG_WAIT, send_all).await;
        });
    }
}

/// Whether an event ends the pre-answer phase or the call (never dropped).
fn is_final(event: &SipEvent) -> bool {
    matches!(
        event,
        SipEvent::Answered(_) | SipEvent::Failed(_) | SipEvent::Ended | SipEvent::Unreachable(_)
    )
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

    fn negotiated(port: u16) -> Negotiated {
        let media = LocalMedia::new(IpAddr::from([127, 0, 0, 1]), 20000, 1);
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        );
        let sd = telcoflow_sip::sip::sdp::SessionDescription::parse_bytes(sdp.as_bytes()).unwrap();
        telcoflow_sip::sip::sdp::accept_answer(&media, &sd).unwrap()
    }

    #[tokio::test]
    async fn a_burst_of_early_media_does_not_crowd_out_the_answer_or_the_end() {
        let (tx, mut rx) = mpsc::channel(LEG_EVENT_QUEUE);
        let mut events = LegEvents::new(tx);
        // A callee alternating two SDPs in 183s, far more than the queue holds.
        for i in 0..100 {
            events.send(SipEvent::EarlyMedia(negotiated(40000 + (i % 2) * 2)));
        }
        events.send(SipEvent::Answered(negotiated(40004)));
        events.send(SipEvent::Ended);
        assert!(events.is_behind());
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
            events.flush();
        }
        assert!(!events.is_behind());
        let n = got.len();
        assert_eq!(n, LEG_EVENT_QUEUE + 3, "{got:?}");
        // The latest early media (the 100th: port 40002) comes before the answer.
        assert!(matches!(&got[n - 3], SipEvent::EarlyMedia(m) if m.remote.port() == 40002));
        assert!(matches!(&got[n - 2], SipEvent::Answered(m) if m.remote.port() == 40004));
        assert!(matches!(&got[n - 1], SipEvent::Ended));
    }

    #[tokio::test]
    async fn a_finished_calls_last_events_wait_for_the_leg() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut events = LegEvents::new(tx);
        events.send(SipEvent::EarlyMedia(negotiated(40000)));
        events.send(SipEvent::Failed(486));
        events.send(SipEvent::Ended);
        events.finish();
        assert!(matches!(rx.recv().await, Some(SipEvent::EarlyMedia(_))));
        assert!(matches!(rx.recv().await, Some(SipEvent::Failed(486))));
        assert!(matches!(rx.recv().await, Some(SipEvent::Ended)));
        assert!(rx.recv().await.is_none());
    }

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
