//! The SIP user agent server for incoming calls: a sans-IO endpoint that owns every server
//! transaction and dialog of one SIP listener and speaks in call-level events and actions.
//!
//! Run loop (same shape as the transactions it drives):
//!
//! 1. Feed each received message with [`Uas::handle_input`] (one UDP datagram, or one message
//!    framed off a TCP stream with [`super::message::frame`]), the transport, the source
//!    address and the time. Feed the application's decisions with [`Uas::handle_action`].
//! 2. Drain [`Uas::poll_transmit`] (bytes and where to send them) and [`Uas::poll_event`]
//!    until `None`.
//! 3. Sleep until [`Uas::poll_timeout`], call [`Uas::handle_timeout`], drain again.
//!
//! What it does on its own: `100 Trying` for every INVITE; `488` when an offer has no codec we
//! support (no event then); `400` with the parse error as reason for malformed requests
//! (sent once, statelessly, for requests that cannot be parsed at all but have a Via); `400`
//! for numbers over [`MAX_NUMBER_LEN`] characters;
//! `200` to OPTIONS; `420` when a required extension other than `timer` is asked; `481`
//! for requests in unknown dialogs; `200` + `487` for CANCEL before
//! the answer; `200` to BYE; re-INVITE and UPDATE answered from the call's [`LocalMedia`]
//! (hold and resume, `491` while another is pending); 2xx retransmission until ACK, and BYE
//! when the ACK never comes; RFC 4028 session timers ([`super::session_timer`]): `422` for
//! too short an interval, the timer granted in the 2xx, our UPDATE refreshes when we are the
//! refresher, and BYE ([`UasEvent::SessionExpired`]) when the caller stops refreshing;
//! reliable provisional responses (RFC 3262) for a caller that requires them: RSeq, resent
//! until PRACKed, the 2xx held for the PRACK, `504` ([`UasEvent::PrackTimeout`]) without one; for a
//! REFER we sent ([`UasAction::Refer`]), `200` to each NOTIFY of its subscription (`481`
//! once it has ended or when there is none, `489` for another event package, `400` for a
//! body that is no sipfrag status line).
//!
//! What it leaves to its owner, through [`UasEvent::IncomingCall`]: routing the number (answer
//! [`UasAction::Reject`] with 404 when unknown), ringing, answering with a local RTP address,
//! rejecting (480 on ring timeout) and hanging up.
//!
//! Requests we send in a dialog (BYE) go to the address the INVITE came from, over the same
//! transport: that reaches phones behind NAT and record-routing proxies alike.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use super::message::{
    BRANCH_MAGIC, CSeq, MAX_NUMBER_LEN, Message, Method, NameAddr, Request, Response, SipHeaders,
    SipUri, salvage_request,
};
use super::sdp::{self, LocalMedia, Negotiated, NegotiationError, SessionDescription};
use super::session_timer::{self, Grant, Granted, Refresher};
use super::transaction::{
    InviteServerState, InviteServerTransaction, NonInviteClientTransaction,
    NonInviteServerTransaction, Timers, TransactionEvent, TransactionKey,
};
use super::{Transmit, Transport};

/// Methods we answer, for `Allow` headers.
pub(crate) const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY, PRACK";
/// Extensions we implement, for `Supported` headers and `Require` checks.
const SUPPORTED: &str = "timer, 100rel";
/// The same, one by one.
const EXTENSIONS: [&str; 2] = ["timer", "100rel"];

/// Longest reason phrase of a sipfrag status line kept for the owner; the rest is cut.
const MAX_SIPFRAG_REASON: usize = 128;

/// Identifies a call within one [`Uas`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallHandle(pub u64);

/// What the owner must act on. Exhaustive on purpose: an owner that ignored a new kind of
/// event would lose a call, so adding one is a breaking change its owners must handle.
#[derive(Debug, Clone, PartialEq)]
pub enum UasEvent {
    /// A new call. Answer with [`UasAction`]s: Reject(404) for an unknown number, Ringing,
    /// then Answer or Reject.
    IncomingCall(Box<IncomingCall>),
    /// The caller cancelled before the answer (487 sent). The call is gone.
    Cancelled {
        /// The call.
        call: CallHandle,
    },
    /// The ACK for our 200 arrived: the call is established.
    Ack {
        /// The call.
        call: CallHandle,
    },
    /// Media parameters changed: a re-INVITE was answered (hold, resume, new address), or an
    /// offerless INVITE's ACK carried the answer.
    MediaUpdated {
        /// The call.
        call: CallHandle,
        /// The new parameters.
        negotiated: Negotiated,
    },
    /// The caller hung up (BYE answered with 200). The call is gone.
    Bye {
        /// The call.
        call: CallHandle,
    },
    /// No ACK came for our 200 within 64·T1; we sent BYE. The call is gone.
    AckTimeout {
        /// The call.
        call: CallHandle,
    },
    /// No PRACK came for our reliable provisional response (RFC 3262) within 64·T1; the
    /// INVITE was refused with 504. The call is gone.
    PrackTimeout {
        /// The call.
        call: CallHandle,
    },
    /// The ACK's answer to the offer in our 200 (offerless INVITE) was missing or unusable
    /// (no common codec, or plain RTP when SRTP is required): the call would have no media,
    /// so we sent BYE. The call is gone.
    AnswerUnusable {
        /// The call.
        call: CallHandle,
    },
    /// The caller, which was to refresh the session (RFC 4028), did not in time: it is
    /// taken for gone, and we sent BYE. The call is gone.
    SessionExpired {
        /// The call.
        call: CallHandle,
    },
    /// A key press sent as SIP INFO (`application/dtmf-relay` or `application/dtmf`), which
    /// some phones use instead of RFC 4733 packets.
    Dtmf {
        /// The call.
        call: CallHandle,
        /// `0`-`9`, `*`, `#`, `A`-`D`.
        digit: char,
        /// Key-press length in milliseconds (0 when the phone does not say).
        duration_ms: u32,
    },
    /// Our REFER ([`UasAction::Refer`]) got its final answer: 202 when the caller accepted
    /// to call the target, an error status otherwise (408 when no answer came in time).
    ReferAnswered {
        /// The call.
        call: CallHandle,
        /// The final status.
        status: u16,
    },
    /// A NOTIFY of our REFER's subscription (RFC 3515 2.4.4), answered with 200: the status
    /// line of its `message/sipfrag` body says how the caller's call to the target goes.
    ReferProgress {
        /// The call.
        call: CallHandle,
        /// The sipfrag's status, e.g. 100 (trying), 180, 200 (the target answered).
        status: u16,
        /// Its reason phrase.
        reason: String,
        /// `Subscription-State: terminated`: no more NOTIFYs will come.
        terminated: bool,
    },
}

/// The status line of a `message/sipfrag` body (`SIP/2.0 200 OK`): status and reason.
fn sipfrag_status(body: &[u8]) -> Option<(u16, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.lines().next()?.trim();
    let rest = line.strip_prefix("SIP/2.0 ")?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let status: u16 = code.parse().ok().filter(|s| (100..=699).contains(s))?;
    let reason: String = reason.trim().chars().take(MAX_SIPFRAG_REASON).collect();
    Some((status, reason))
}

/// Reads a DTMF digit from an INFO body: `application/dtmf-relay` (`Signal=5` and
/// `Duration=160` lines) or `application/dtmf` (the digit alone).
fn info_dtmf(request: &Request) -> Option<(char, u32)> {
    let ctype = request.content_type()?.to_ascii_lowercase();
    let body = std::str::from_utf8(&request.body).ok()?;
    let valid = |c: char| {
        let c = c.to_ascii_uppercase();
        (c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D')).then_some(c)
    };
    if ctype.starts_with("application/dtmf-relay") {
        let mut digit = None;
        let mut duration = 0;
        for line in body.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            match key.trim().to_ascii_lowercase().as_str() {
                "signal" => digit = value.chars().next().and_then(valid),
                "duration" => duration = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        return digit.map(|d| (d, duration));
    }
    if ctype.starts_with("application/dtmf") {
        let mut chars = body.trim().chars();
        let d = chars.next().and_then(valid)?;
        return chars.next().is_none().then_some((d, 0));
    }
    None
}

/// Why an INVITE's numbers are refused, as a 400 reason: a user part of the Request-URI, To
/// or From longer than [`MAX_NUMBER_LEN`] characters.
fn overlong_number(request: &Request) -> Option<String> {
    let user_len = |uri: Option<SipUri>| {
        uri.and_then(|u| u.user)
            .map_or(0, |user| user.chars().count())
    };
    let checks = [
        ("Called number", user_len(SipUri::parse(&request.uri).ok())),
        (
            "Called number",
            user_len(request.header_to().ok().and_then(|t| t.sip_uri().ok())),
        ),
        (
            "Caller number",
            user_len(request.header_from().ok().and_then(|f| f.sip_uri().ok())),
        ),
    ];
    checks
        .into_iter()
        .find(|(_, len)| *len > MAX_NUMBER_LEN)
        .map(|(which, _)| format!("{which} longer than {MAX_NUMBER_LEN} characters"))
}

/// A new call, as reported by [`UasEvent::IncomingCall`].
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingCall {
    /// The call.
    pub call: CallHandle,
    /// The dialled number: the Request-URI user part (else To's).
    pub number: String,
    /// The caller (From).
    pub from: NameAddr,
    /// The callee (To, without our tag).
    pub to: NameAddr,
    /// The SIP Call-ID, for logs.
    pub call_id: String,
    /// The caller's SDP offer; `None` for an offerless INVITE (we offer in the 200).
    pub offer: Option<SessionDescription>,
    /// Where the INVITE came from.
    pub source: SocketAddr,
}

/// What the owner decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UasAction {
    /// Send 180 Ringing.
    Ringing,
    /// Send 200 OK with an SDP answer for this local RTP address.
    Answer {
        /// Our media address, port and codecs.
        media: LocalMedia,
    },
    /// Send a final error response (4xx-6xx), e.g. 404, 480, 486.
    Reject {
        /// Status code.
        status: u16,
    },
    /// End the call: BYE once answered, 480 before.
    Hangup,
    /// Send an INFO in the confirmed dialog (e.g. `application/dtmf-relay`, see
    /// [`dtmf_relay_body`](crate::rtp::dtmf_out::dtmf_relay_body)); its answer changes
    /// nothing of the call.
    Info {
        /// Content-Type of the body.
        content_type: String,
        /// The body.
        body: String,
    },
    /// Send a REFER in the dialog (RFC 3515; once the ACK has come, if it has not yet):
    /// the caller is asked to call `refer_to` (a blind transfer). Its answer comes as [`UasEvent::ReferAnswered`], the
    /// NOTIFYs that follow as [`UasEvent::ReferProgress`].
    Refer {
        /// The target URI (`Refer-To`).
        refer_to: String,
        /// Who asks (`Referred-By`, RFC 3892), if anyone is named.
        referred_by: Option<String>,
    },
}

/// Why an action could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    /// No such call (ended, or never existed).
    #[error("unknown call")]
    UnknownCall,
    /// The action does not fit the call's state (e.g. Ringing after the answer).
    #[error("action not valid in this call state")]
    InvalidState,
    /// A Reject status outside 300..=699.
    #[error("invalid final status {0}")]
    InvalidStatus(u16),
    /// The answer could not be negotiated; the call was rejected with the error's status.
    #[error(transparent)]
    Negotiation(#[from] NegotiationError),
}

/// The owner's decision on a new call's INVITE, taken before the UAS creates any call state
/// for it (see [`Uas::handle_input_with`]): source allow-lists, rate limits, authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Take the call: it goes on to [`UasEvent::IncomingCall`].
    Accept,
    /// Answer with this final response; no call is created and no event is reported.
    Refuse(Refusal),
}

/// A final response refusing an INVITE at admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Status code (4xx-6xx), e.g. 401, 403, 503.
    pub status: u16,
    /// Reason phrase; the status's usual one when `None`.
    pub reason: Option<String>,
    /// Headers to add, e.g. `WWW-Authenticate` or `Retry-After`.
    pub headers: Vec<(String, String)>,
    /// Send the response once, with no transaction: nothing is kept, and over UDP it is not
    /// retransmitted until an ACK comes (RFC 3261 17.2.1 would resend an INVITE's final
    /// response about ten times in 32 s). For refusals of sources that may be spoofed (an
    /// allow list, a rate limit), so that the server does not multiply a forger's traffic
    /// towards the address it forged. A retransmitted request is decided on again.
    pub stateless: bool,
}

impl Refusal {
    /// A refusal with this status and no extra header, sent in a transaction.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            reason: None,
            headers: Vec::new(),
            stateless: false,
        }
    }

    /// The same refusal, sent once without a transaction (see [`Refusal::stateless`]).
    pub fn stateless(mut self) -> Self {
        self.stateless = true;
        self
    }

    /// Adds a header to the response.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
}

/// Endpoint settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UasConfig {
    /// Our Contact URI, e.g. `sip:telcoflow@203.0.113.1:5060` (the public address).
    pub contact: String,
    /// Our Via sent-by, `host:port`.
    pub sent_by: String,
    /// Transaction timers.
    pub timers: Timers,
    /// Value of `Server` / `User-Agent` headers.
    pub user_agent: String,
    /// Codecs the owner answers with ([`LocalMedia::codecs`]): an offer with none of them gets
    /// `488` as it arrives, before the owner hears of the call.
    pub codecs: Vec<crate::rtp::codec::Codec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// INVITE received, no final response yet.
    Early,
    /// 200 sent, waiting for ACK.
    Answered,
    /// ACK received.
    Confirmed,
    /// BYE sent, waiting for its response.
    Terminating,
}

#[derive(Debug)]
struct Call {
    state: CallState,
    call_id: String,
    local_tag: String,
    /// Our party with tag (To of the INVITE + tag).
    local: String,
    /// The caller with tag (From of the INVITE).
    remote: String,
    remote_target: String,
    route_set: Vec<String>,
    peer: SocketAddr,
    transport: Transport,
    /// The INVITE's Request-URI was `sips:`: our Contact in the dialog is `sips:` too
    /// (RFC 3261 8.1.1.8).
    secure: bool,
    local_cseq: u32,
    invite_key: TransactionKey,
    invite_cseq: u32,
    offer: Option<SessionDescription>,
    media: Option<LocalMedia>,
    /// We sent an offer in the 200 (offerless INVITE); the ACK carries the answer.
    awaiting_answer_in_ack: bool,
    /// Hangup was asked while waiting for ACK; send BYE once it comes (RFC 3261 15).
    hangup_after_ack: bool,
    /// A REFER asked while waiting for the ACK (`Refer-To`, `Referred-By`): sent once it
    /// comes, since a REFER belongs in a confirmed dialog.
    refer_after_ack: Option<(String, Option<String>)>,
    /// A REFER of ours whose subscription may still send NOTIFYs: sent and not refused, no
    /// `Subscription-State: terminated` yet.
    refer_subscribed: bool,
    /// A re-INVITE answered with 2xx and waiting for its ACK.
    reinvite: Option<PendingReinvite>,
    /// The INVITE's session timer request (RFC 4028), decided on when we answer.
    session_asked: Option<session_timer::Asked>,
    /// The session timer in force, and when we must next act on it: refresh, or end the call.
    session: Option<(Granted, Instant)>,
    /// The caller requires reliable provisional responses (`Require: 100rel`, RFC 3262).
    requires_100rel: bool,
    /// Our reliable provisional response waiting for its PRACK.
    reliable: Option<Reliable>,
    /// The RSeq of our next reliable provisional response.
    next_rseq: u32,
    /// Our 2xx, held until the PRACK of the reliable provisional response before it (so a
    /// caller sees them in order).
    held_answer: Option<Response>,
}

/// A reliable provisional response (RFC 3262 3), resent until its PRACK comes.
#[derive(Debug)]
struct Reliable {
    response: Response,
    rseq: u32,
    /// The next resend, at an interval from T1 doubling each time.
    next_at: Instant,
    interval: std::time::Duration,
    /// 64·T1 after the first sending: the INVITE is refused with 504.
    give_up_at: Instant,
}

#[derive(Debug)]
struct PendingReinvite {
    key: TransactionKey,
    cseq: u32,
    /// Offerless re-INVITE: our 200 carried an offer, the ACK carries the answer.
    awaiting_answer: bool,
}

#[derive(Debug)]
enum ServerTx {
    Invite(InviteServerTransaction),
    NonInvite(NonInviteServerTransaction),
}

#[derive(Debug)]
struct ServerEntry {
    tx: ServerTx,
    call: Option<CallHandle>,
    peer: SocketAddr,
    transport: Transport,
}

#[derive(Debug)]
struct ClientEntry {
    tx: NonInviteClientTransaction,
    call: CallHandle,
    peer: SocketAddr,
    transport: Transport,
    /// What the request is for, which says what its answer does.
    kind: ClientKind,
}

/// The requests we send in a dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    /// Its answer (or timeout) ends the call.
    Bye,
    /// Its answer changes nothing.
    Info,
    /// Its final answer is reported ([`UasEvent::ReferAnswered`]).
    Refer,
}

/// The SIP UAS endpoint. See the module docs for the run loop.
#[derive(Debug)]
pub struct Uas {
    config: UasConfig,
    rng: StdRng,
    next_call: u64,
    calls: HashMap<CallHandle, Call>,
    /// (Call-ID, our tag) -> call.
    dialogs: HashMap<(String, String), CallHandle>,
    server: HashMap<TransactionKey, ServerEntry>,
    client: HashMap<TransactionKey, ClientEntry>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<UasEvent>,
    /// Our Via sent-by on the TLS listener ([`Uas::set_tls`]).
    tls: Option<String>,
}

impl Uas {
    /// Creates an endpoint. `seed` drives tags and branches (use a random seed in production,
    /// a fixed one in tests).
    pub fn new(config: UasConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            next_call: 1,
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            server: HashMap::new(),
            client: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            tls: None,
        }
    }

    /// Takes calls over TLS too: `sent_by` is the TLS listener's advertised `host:port`
    /// (e.g. `203.0.113.1:5061`). A call that came over TLS gets our Contact there (see
    /// [`super::tls_contact`]), with `;transport=tls`, or as a `sips:` URI when its INVITE was
    /// for a `sips:` URI; our requests in its dialog name `sent_by` in their Via.
    pub fn set_tls(&mut self, sent_by: String) {
        self.tls = Some(sent_by);
    }

    /// The next datagram or stream write.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<UasEvent> {
        self.events.pop_front()
    }

    /// When [`Uas::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let server = self.server.values().filter_map(|e| match &e.tx {
            ServerTx::Invite(t) => t.poll_timeout(),
            ServerTx::NonInvite(t) => t.poll_timeout(),
        });
        let client = self.client.values().filter_map(|e| e.tx.poll_timeout());
        let sessions = self
            .calls
            .values()
            .filter(|c| c.state == CallState::Confirmed)
            .filter_map(|c| c.session.map(|(_, at)| at));
        let reliable = self
            .calls
            .values()
            .filter_map(|c| c.reliable.as_ref().map(|r| r.next_at));
        server.chain(client).chain(sessions).chain(reliable).min()
    }

    /// Our Contact URI, as configured.
    pub fn contact(&self) -> &str {
        &self.config.contact
    }

    /// Number of calls being tracked (for metrics and tests).
    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    fn token(&mut self) -> String {
        format!("{:016x}", self.rng.random::<u64>())
    }

    /// Handles one received message, taking every new call.
    pub fn handle_input(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        bytes: &[u8],
        now: Instant,
    ) {
        self.handle_input_with(transport, source, bytes, now, |_| Admission::Accept);
    }

    /// Handles one received message; `admit` decides on each INVITE that would start a new
    /// call (not on retransmissions, re-INVITEs or malformed requests, which never get that
    /// far) before any call state exists for it.
    pub fn handle_input_with(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        bytes: &[u8],
        now: Instant,
        admit: impl FnOnce(&Request) -> Admission,
    ) {
        let message = match Message::parse(bytes) {
            Ok(m) => m,
            Err(err) => {
                // A request whose Via and dialog headers can still be read gets a 400 saying
                // what was wrong; without them there is nobody to answer.
                match salvage_request(bytes) {
                    Some(mut request) if request.method != Method::Ack => {
                        tracing::debug!(%source, cause = %err, "unparseable SIP request: 400");
                        request.stamp_source(source);
                        // Once, statelessly: nothing is kept for input we cannot read.
                        let refusal = Refusal {
                            status: 400,
                            reason: Some(err.reason()),
                            headers: Vec::new(),
                            stateless: true,
                        };
                        self.reply_with(transport, source, request, refusal, now);
                    }
                    _ => tracing::debug!(%source, cause = %err, "dropping unparseable SIP message"),
                }
                return;
            }
        };
        match message {
            Message::Response(r) => self.handle_response(r, now),
            Message::Request(r) => self.handle_request(transport, source, r, now, admit),
        }
    }

    fn handle_response(&mut self, response: Response, now: Instant) {
        let Ok(key) = TransactionKey::for_response(&response) else {
            return;
        };
        if let Some(entry) = self.client.get_mut(&key) {
            entry.tx.handle_response(response, now);
            self.drain_client(&key);
        }
    }

    fn reply(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        request: Request,
        status: u16,
        reason: Option<String>,
        now: Instant,
    ) {
        let refusal = Refusal {
            status,
            reason,
            headers: Vec::new(),
            stateless: false,
        };
        self.reply_with(transport, source, request, refusal, now);
    }

    fn reply_with(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        request: Request,
        refusal: Refusal,
        now: Instant,
    ) {
        let Refusal {
            status,
            reason,
            headers,
            stateless,
        } = refusal;
        // A stateless-looking answer still goes through a transaction so retransmitted
        // requests get the same response.
        let Ok(key) = TransactionKey::for_request(&request) else {
            return;
        };
        let tag = self.token();
        let mut response = Response::to_request(&request, status, Some(&tag));
        if let Some(reason) = reason {
            response = response.with_reason(reason);
        }
        for (name, value) in headers {
            response.headers.push(&name, value);
        }
        if status == 405 || request.method == Method::Options {
            response.headers.push("Allow", ALLOW);
        }
        response
            .headers
            .push("Server", self.config.user_agent.clone());
        if stateless {
            self.transmits.push_back(Transmit {
                transport,
                destination: source,
                payload: response.to_bytes(),
            });
            return;
        }
        if request.method == Method::Invite {
            let tx = InviteServerTransaction::with_final_response(
                request,
                response,
                transport.reliable(),
                self.config.timers,
                now,
            );
            self.insert_server(key, ServerTx::Invite(tx), None, source, transport);
        } else {
            let mut tx = NonInviteServerTransaction::new(
                request,
                transport.reliable(),
                self.config.timers,
                now,
            );
            tx.send_response(response, now);
            self.insert_server(key, ServerTx::NonInvite(tx), None, source, transport);
        }
    }

    fn reply_unsupported(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        request: Request,
        unsupported: &str,
        now: Instant,
    ) {
        let Ok(key) = TransactionKey::for_request(&request) else {
            return;
        };
        let tag = self.token();
        let mut response = Response::to_request(&request, 420, Some(&tag));
        response.headers.push("Unsupported", unsupported);
        response
            .headers
            .push("Server", self.config.user_agent.clone());
        let tx = if request.method == Method::Invite {
            ServerTx::Invite(InviteServerTransaction::with_final_response(
                request,
                response,
                transport.reliable(),
                self.config.timers,
                now,
            ))
        } else {
            let mut tx = NonInviteServerTransaction::new(
                request,
                transport.reliable(),
                self.config.timers,
                now,
            );
            tx.send_response(response, now);
            ServerTx::NonInvite(tx)
        };
        self.insert_server(key, tx, None, source, transport);
    }

    fn insert_server(
        &mut self,
        key: TransactionKey,
        tx: ServerTx,
        call: Option<CallHandle>,
        peer: SocketAddr,
        transport: Transport,
    ) {
        self.server.insert(
            key.clone(),
            ServerEntry {
                tx,
                call,
                peer,
                transport,
            },
        );
        self.drain_server(&key);
    }

    fn handle_request(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        mut request: Request,
        now: Instant,
        admit: impl FnOnce(&Request) -> Admission,
    ) {
        request.stamp_source(source);
        if request.top_via().is_err() {
            tracing::debug!(%source, "dropping SIP request without a usable Via");
            return;
        }
        let key = match TransactionKey::for_request(&request) {
            Ok(k) => k,
            Err(err) => {
                if request.method != Method::Ack {
                    self.reply(transport, source, request, 400, Some(err.reason()), now);
                }
                return;
            }
        };
        // Retransmissions, and ACKs for non-2xx finals, belong to an existing transaction.
        // (A CANCEL's key differs from its INVITE's by method, so it is not caught here.)
        if self.server.contains_key(&key) {
            let is_2xx_ack = request.method == Method::Ack && self.ack_for_accepted(&key);
            if !is_2xx_ack {
                if let Some(entry) = self.server.get_mut(&key) {
                    match &mut entry.tx {
                        ServerTx::Invite(t) => t.handle_request(request, now),
                        ServerTx::NonInvite(t) => t.handle_request(request, now),
                    }
                }
                self.drain_server(&key);
                return;
            }
        }
        if let Err(err) = request.validate() {
            if request.method != Method::Ack {
                self.reply(transport, source, request, 400, Some(err.reason()), now);
            }
            return;
        }
        if request.max_forwards().ok().flatten() == Some(0) && request.method != Method::Ack {
            self.reply(transport, source, request, 483, None, now);
            return;
        }
        // A `sips:` Request-URI asks for TLS on every hop: over UDP or TCP it is not
        // honoured (RFC 5630 section 3.1.3).
        if transport != Transport::Tls
            && request
                .uri
                .get(..5)
                .is_some_and(|s| s.eq_ignore_ascii_case("sips:"))
            && request.method != Method::Ack
        {
            self.reply(transport, source, request, 416, None, now);
            return;
        }
        // We implement no extensions: a request that requires one is refused with the list
        // (RFC 3261 8.2.2.3). ACK and CANCEL never carry Require meaningfully.
        if !matches!(request.method, Method::Ack | Method::Cancel) {
            let required: Vec<String> = request
                .headers
                .values("Require")
                .filter(|r| !EXTENSIONS.iter().any(|e| r.trim().eq_ignore_ascii_case(e)))
                .map(str::to_string)
                .collect();
            if !required.is_empty() {
                self.reply_unsupported(transport, source, request, &required.join(", "), now);
                return;
            }
        }
        let in_dialog = request
            .header_to()
            .ok()
            .and_then(|to| to.tag().map(str::to_string));
        match (&request.method, in_dialog) {
            (Method::Ack, Some(tag)) => self.handle_ack(request, &tag, now),
            (Method::Ack, None) => {}
            (Method::Invite, None) => match admit(&request) {
                Admission::Accept => self.handle_invite(transport, source, key, request, now),
                Admission::Refuse(refusal) => {
                    self.reply_with(transport, source, request, refusal, now);
                }
            },
            (Method::Invite, Some(tag)) => {
                self.handle_reinvite(transport, source, key, request, &tag, now)
            }
            (Method::Cancel, _) => self.handle_cancel(transport, source, key, request, now),
            (Method::Bye, Some(tag)) => self.handle_bye(transport, source, request, &tag, now),
            (Method::Options, _) => self.reply(transport, source, request, 200, None, now),
            (Method::Info, Some(tag)) => {
                let call = self.find_dialog(&request, &tag);
                if let Some(call) = call {
                    if let Some((digit, duration_ms)) = info_dtmf(&request) {
                        self.events.push_back(UasEvent::Dtmf {
                            call,
                            digit,
                            duration_ms,
                        });
                    }
                }
                let status = if call.is_some() { 200 } else { 481 };
                self.reply(transport, source, request, status, None, now)
            }
            (Method::Prack, Some(tag)) => self.handle_prack(transport, source, request, &tag, now),
            (Method::Update, Some(tag)) => {
                self.handle_update(transport, source, key, request, &tag, now)
            }
            (Method::Notify, Some(tag)) => {
                self.handle_notify(transport, source, request, &tag, now)
            }
            (
                Method::Bye | Method::Info | Method::Update | Method::Notify | Method::Prack,
                None,
            ) => self.reply(transport, source, request, 481, None, now),
            _ => self.reply(transport, source, request, 405, None, now),
        }
    }

    /// A NOTIFY in a call's dialog: the progress of a REFER we sent (`Event: refer`), its
    /// `message/sipfrag` body reported as [`UasEvent::ReferProgress`]. Any other event
    /// package is refused with 489, a body that is no status line with 400.
    fn handle_notify(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        request: Request,
        tag: &str,
        now: Instant,
    ) {
        let Some(call) = self.find_dialog(&request, tag) else {
            self.reply(transport, source, request, 481, None, now);
            return;
        };
        let event = request.headers.get("Event").unwrap_or("");
        let package = event.split(';').next().unwrap_or("").trim();
        if !package.eq_ignore_ascii_case("refer") {
            self.reply(transport, source, request, 489, None, now);
            return;
        }
        let subscribed = self.calls.get(&call).is_some_and(|c| c.refer_subscribed);
        if !subscribed {
            let why = Some("Subscription does not exist".to_owned());
            self.reply(transport, source, request, 481, why, now);
            return;
        }
        let Some((status, reason)) = sipfrag_status(&request.body) else {
            let why = Some("Body is not a sipfrag status line".to_owned());
            self.reply(transport, source, request, 400, why, now);
            return;
        };
        let terminated = request
            .headers
            .get("Subscription-State")
            .is_some_and(|s| s.trim().to_ascii_lowercase().starts_with("terminated"));
        if terminated {
            if let Some(c) = self.calls.get_mut(&call) {
                c.refer_subscribed = false;
            }
        }
        self.reply(transport, source, request, 200, None, now);
        self.events.push_back(UasEvent::ReferProgress {
            call,
            status,
            reason,
            terminated,
        });
    }

    /// Whether `key` is an INVITE transaction that sent a 2xx (its ACK has another branch
    /// normally, but some peers reuse the INVITE's).
    fn ack_for_accepted(&self, key: &TransactionKey) -> bool {
        matches!(
            self.server.get(key).map(|e| &e.tx),
            Some(ServerTx::Invite(t)) if t.state() == InviteServerState::Accepted
        )
    }

    fn find_dialog(&self, request: &Request, local_tag: &str) -> Option<CallHandle> {
        let call_id = request.call_id().ok()?;
        let handle = *self
            .dialogs
            .get(&(call_id.to_string(), local_tag.to_string()))?;
        let call = self.calls.get(&handle)?;
        // The remote tag must match too (RFC 3261 12.2.2).
        let from_tag = request.header_from().ok()?.tag().map(str::to_string);
        let remote_tag = NameAddr::parse(&call.remote, "From")
            .ok()
            .and_then(|n| n.tag().map(str::to_string));
        (from_tag == remote_tag).then_some(handle)
    }

    fn handle_invite(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        key: TransactionKey,
        request: Request,
        now: Instant,
    ) {
        if let Some(reason) = overlong_number(&request) {
            self.reply(transport, source, request, 400, Some(reason), now);
            return;
        }
        let offer = if request.body.is_empty() {
            None
        } else {
            let is_sdp = request
                .content_type()
                .is_none_or(|t| t.to_ascii_lowercase().starts_with("application/sdp"));
            if !is_sdp {
                self.reply(transport, source, request, 415, None, now);
                return;
            }
            let parsed = SessionDescription::parse_bytes(&request.body)
                .map_err(NegotiationError::from)
                .and_then(|sd| {
                    // Check now that an answer is possible, so a 488 goes out before
                    // anyone is notified.
                    let mut probe = LocalMedia::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9, 0);
                    probe.codecs.clone_from(&self.config.codecs);
                    // SRTP is the owner's to decide per peer: here any offer we could
                    // answer, plain or with a suite we support, passes.
                    probe.srtp = Some(sdp::LocalSrtp::new(
                        sdp::SrtpPolicy::Optional,
                        crate::rtp::srtp::MasterKey::from_bytes([0; 30]),
                    ));
                    sdp::answer(&sd, &probe).map(|_| sd)
                });
            match parsed {
                Ok(sd) => Some(sd),
                Err(err) => {
                    let reason = err.to_string();
                    self.reply(
                        transport,
                        source,
                        request,
                        err.status_code(),
                        Some(reason),
                        now,
                    );
                    return;
                }
            }
        };
        let session_asked = session_timer::asked(&request);
        let requires_100rel = request
            .headers
            .values("Require")
            .any(|r| r.trim().eq_ignore_ascii_case("100rel"));
        if session_asked.is_some_and(|a| session_timer::grant(a) == Grant::TooSmall) {
            let refusal = Refusal::new(422)
                .with_header("Min-SE", session_timer::MIN_SE.as_secs().to_string());
            self.reply_with(transport, source, request, refusal, now);
            return;
        }
        let (Ok(from), Ok(to), Ok(call_id), Ok(cseq)) = (
            request.header_from(),
            request.header_to(),
            request.call_id().map(str::to_string),
            request.cseq(),
        ) else {
            return; // validate() checked these
        };
        let number = SipUri::parse(&request.uri)
            .ok()
            .and_then(|u| u.user)
            .or_else(|| to.sip_uri().ok().and_then(|u| u.user))
            .unwrap_or_default();
        let remote_target = match request.contact() {
            Ok(Some(c)) => c.uri,
            Ok(None) => from.uri.clone(),
            Err(e) => {
                // It would become the Request-URI of our BYE: the call could then never be
                // ended from our side.
                self.reply(transport, source, request, 400, Some(e.reason()), now);
                return;
            }
        };
        let route_set = request
            .headers
            .values("Record-Route")
            .map(str::to_string)
            .collect();
        let local_tag = self.token();
        let local = format!(
            "{};tag={local_tag}",
            request.headers.get("To").unwrap_or_default()
        );
        let handle = CallHandle(self.next_call);
        self.next_call += 1;
        let tx = InviteServerTransaction::new(
            request.clone(),
            transport.reliable(),
            self.config.timers,
            now,
        );
        self.insert_server(
            key.clone(),
            ServerTx::Invite(tx),
            Some(handle),
            source,
            transport,
        );
        self.dialogs
            .insert((call_id.clone(), local_tag.clone()), handle);
        self.calls.insert(
            handle,
            Call {
                state: CallState::Early,
                call_id: call_id.clone(),
                local_tag,
                local,
                remote: request.headers.get("From").unwrap_or_default().to_string(),
                remote_target,
                route_set,
                peer: source,
                transport,
                secure: request
                    .uri
                    .get(..5)
                    .is_some_and(|s| s.eq_ignore_ascii_case("sips:")),
                local_cseq: self.rng.random_range(1..10_000),
                invite_key: key,
                invite_cseq: cseq.seq,
                offer: offer.clone(),
                media: None,
                awaiting_answer_in_ack: false,
                hangup_after_ack: false,
                refer_after_ack: None,
                refer_subscribed: false,
                reinvite: None,
                session_asked,
                session: None,
                requires_100rel,
                reliable: None,
                next_rseq: self.rng.random_range(1..1 << 30),
                held_answer: None,
            },
        );
        self.events
            .push_back(UasEvent::IncomingCall(Box::new(IncomingCall {
                call: handle,
                number,
                from,
                to,
                call_id,
                offer,
                source,
            })));
    }

    fn handle_ack(&mut self, request: Request, tag: &str, now: Instant) {
        let Some(handle) = self.find_dialog(&request, tag) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        let seq = request.cseq().map(|c| c.seq).ok();
        if call.state == CallState::Confirmed
            && call.reinvite.as_ref().is_some_and(|r| Some(r.cseq) == seq)
        {
            self.handle_reinvite_ack(handle, request, now);
            return;
        }
        if call.state != CallState::Answered || seq != Some(call.invite_cseq) {
            return; // a retransmitted ACK
        }
        call.state = CallState::Confirmed;
        // The answer to the offer of our 200 (offerless INVITE): one we cannot use leaves the
        // call without media, and without an RTP timeout to end it, so the call ends (BYE).
        let mut unusable = false;
        let answer = if call.awaiting_answer_in_ack {
            call.awaiting_answer_in_ack = false;
            let answered = accept_answer_in_ack(call.media.as_mut(), &request.body);
            unusable = answered.is_err();
            answered.ok()
        } else {
            None
        };
        let hangup = call.hangup_after_ack || unusable;
        let refer = call.refer_after_ack.take();
        let key = call.invite_key.clone();
        if let Some(entry) = self.server.get_mut(&key) {
            if let ServerTx::Invite(t) = &mut entry.tx {
                t.handle_request(request, now);
            }
        }
        // drain_server drops the transaction's own Ack event: it is reported per call here.
        self.drain_server(&key);
        self.events.push_back(UasEvent::Ack { call: handle });
        if let Some(negotiated) = answer {
            self.events.push_back(UasEvent::MediaUpdated {
                call: handle,
                negotiated,
            });
        }
        if unusable {
            self.events
                .push_back(UasEvent::AnswerUnusable { call: handle });
        }
        if hangup {
            self.send_bye(handle, now);
        } else if let Some((refer_to, referred_by)) = refer {
            self.send_refer(handle, &refer_to, referred_by.as_deref(), now);
        }
    }

    fn handle_reinvite_ack(&mut self, handle: CallHandle, ack: Request, now: Instant) {
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        let Some(pending) = call.reinvite.take() else {
            return;
        };
        let answer = if pending.awaiting_answer {
            let parsed = SessionDescription::parse_bytes(&ack.body).ok();
            match (parsed, &mut call.media) {
                (Some(sd), Some(media)) => sdp::accept_answer(media, &sd).ok().inspect(|n| {
                    media.keep_srtp(n.srtp);
                }),
                _ => None,
            }
        } else {
            None
        };
        if let Some(entry) = self.server.get_mut(&pending.key) {
            if let ServerTx::Invite(t) = &mut entry.tx {
                t.handle_request(ack, now);
            }
        }
        self.drain_server(&pending.key);
        if let Some(negotiated) = answer {
            self.events.push_back(UasEvent::MediaUpdated {
                call: handle,
                negotiated,
            });
        }
    }

    fn handle_reinvite(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        key: TransactionKey,
        request: Request,
        tag: &str,
        now: Instant,
    ) {
        let Some(handle) = self.find_dialog(&request, tag) else {
            self.reply(transport, source, request, 481, None, now);
            return;
        };
        let pending = self
            .calls
            .get(&handle)
            .is_none_or(|c| c.state != CallState::Confirmed || c.reinvite.is_some());
        if pending {
            self.reply(transport, source, request, 491, None, now);
            return;
        }
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        let Some(mut media) = call.media.clone() else {
            return;
        };
        media.session_version += 1;
        let mut tx = InviteServerTransaction::new(
            request.clone(),
            transport.reliable(),
            self.config.timers,
            now,
        );
        let outcome = if request.body.is_empty() {
            // Offerless re-INVITE: offer our current media; the ACK carries the answer.
            Ok((sdp::offer(&media), None))
        } else {
            SessionDescription::parse_bytes(&request.body)
                .map_err(NegotiationError::from)
                .and_then(|offer| sdp::answer(&offer, &media))
                .map(|(sd, n)| (sd, Some(n)))
        };
        let cseq = request.cseq().map(|c| c.seq).unwrap_or(0);
        match outcome {
            Ok((sd, negotiated)) => {
                // An offer of ours (offerless re-INVITE) settles nothing until its ACK.
                if let Some(n) = &negotiated {
                    media.keep_srtp(n.srtp);
                }
                call.reinvite = Some(PendingReinvite {
                    key: key.clone(),
                    cseq,
                    awaiting_answer: negotiated.is_none(),
                });
                call.media = Some(media);
                let mut response = self.ok_with_sdp(&request, handle, &sd);
                let asked = self.refresh_ask(handle, &request);
                let session = self.start_session(asked, &mut response, now);
                if let Some(call) = self.calls.get_mut(&handle) {
                    call.session = session;
                }
                tx.send_response(response, now);
                if let Some(negotiated) = negotiated {
                    self.events.push_back(UasEvent::MediaUpdated {
                        call: handle,
                        negotiated,
                    });
                }
            }
            Err(err) => {
                let local_tag = call.local_tag.clone();
                let response = Response::to_request(&request, err.status_code(), Some(&local_tag))
                    .with_reason(err.to_string());
                tx.send_response(response, now);
            }
        }
        self.insert_server(key, ServerTx::Invite(tx), None, source, transport);
    }

    /// Our Contact for a call's dialog: over TCP it says so (`;transport=tcp`), so that the
    /// peer sends its requests in the dialog over TCP too (RFC 3261 19.1.1; a URI without the
    /// parameter means UDP); over TLS it is the TLS listener's, with `;transport=tls` or as a
    /// `sips:` URI (RFC 5630) when the caller called a `sips:` URI.
    fn contact_for(&self, handle: CallHandle) -> String {
        let call = self.calls.get(&handle);
        match (call.map(|c| (c.transport, c.secure)), &self.tls) {
            (Some((Transport::Tls, secure)), Some(tls_sent_by)) => {
                format!("<{}>", super::tls_contact("telcoflow", tls_sent_by, secure))
            }
            (Some((Transport::Tcp, _)), _) if !self.config.contact.contains(";transport=") => {
                format!("<{};transport=tcp>", self.config.contact)
            }
            _ => format!("<{}>", self.config.contact),
        }
    }

    fn ok_with_sdp(
        &self,
        request: &Request,
        handle: CallHandle,
        sd: &SessionDescription,
    ) -> Response {
        let tag = self
            .calls
            .get(&handle)
            .map(|c| c.local_tag.clone())
            .unwrap_or_default();
        let mut response = Response::to_request(request, 200, Some(&tag))
            .with_body("application/sdp", sd.to_string());
        response.headers.push("Contact", self.contact_for(handle));
        response.headers.push("Allow", ALLOW);
        response
            .headers
            .push("Server", self.config.user_agent.clone());
        for rr in request.headers.get_all("Record-Route") {
            response.headers.push("Record-Route", rr);
        }
        response
    }

    fn handle_cancel(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        key: TransactionKey,
        request: Request,
        now: Instant,
    ) {
        let invite_key = TransactionKey {
            method: Method::Invite,
            ..key
        };
        let target = self.server.get(&invite_key).and_then(|e| match &e.tx {
            ServerTx::Invite(t) => Some((t.state(), e.call)),
            ServerTx::NonInvite(_) => None,
        });
        let Some((state, call)) = target else {
            self.reply(transport, source, request, 481, None, now);
            return;
        };
        self.reply(transport, source, request, 200, None, now);
        if state != InviteServerState::Proceeding {
            return; // already answered or rejected: CANCEL has no effect
        }
        let Some(handle) = call else { return };
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        if call.state != CallState::Early {
            return;
        }
        self.final_response(handle, 487, now);
        self.events.push_back(UasEvent::Cancelled { call: handle });
    }

    fn handle_bye(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        request: Request,
        tag: &str,
        now: Instant,
    ) {
        let Some(handle) = self.find_dialog(&request, tag) else {
            self.reply(transport, source, request, 481, None, now);
            return;
        };
        self.reply(transport, source, request, 200, None, now);
        if self
            .calls
            .get(&handle)
            .is_some_and(|c| c.state == CallState::Early)
        {
            // BYE in an early dialog ends the INVITE too.
            self.final_response(handle, 487, now);
        }
        self.forget(handle);
        self.events.push_back(UasEvent::Bye { call: handle });
    }

    /// Sends a final non-2xx to the call's INVITE and forgets the call (the transaction
    /// stays to absorb the ACK).
    fn final_response(&mut self, handle: CallHandle, status: u16, now: Instant) {
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        let key = call.invite_key.clone();
        let tag = call.local_tag.clone();
        if let Some(entry) = self.server.get_mut(&key) {
            if let ServerTx::Invite(t) = &mut entry.tx {
                let response = Response::to_request(t.request(), status, Some(&tag));
                t.send_response(response, now);
            }
            entry.call = None;
        }
        self.drain_server(&key);
        self.forget(handle);
    }

    fn forget(&mut self, handle: CallHandle) {
        if let Some(call) = self.calls.remove(&handle) {
            self.dialogs.remove(&(call.call_id, call.local_tag));
        }
    }

    /// Applies the owner's decision for a call. `Answer` returns the negotiated media (None
    /// for an offerless INVITE: it comes as [`UasEvent::MediaUpdated`] with the ACK).
    pub fn handle_action(
        &mut self,
        handle: CallHandle,
        action: UasAction,
        now: Instant,
    ) -> Result<Option<Negotiated>, ActionError> {
        let state = self
            .calls
            .get(&handle)
            .ok_or(ActionError::UnknownCall)?
            .state;
        match (action, state) {
            (UasAction::Ringing, CallState::Early) => {
                self.provisional(handle, 180, now);
                Ok(None)
            }
            (UasAction::Answer { media }, CallState::Early) => self.answer(handle, media, now),
            (UasAction::Reject { status }, CallState::Early) => {
                if !(300..=699).contains(&status) {
                    return Err(ActionError::InvalidStatus(status));
                }
                self.final_response(handle, status, now);
                Ok(None)
            }
            (UasAction::Hangup, CallState::Early) => {
                self.final_response(handle, 480, now);
                Ok(None)
            }
            (UasAction::Hangup, CallState::Answered) => {
                if let Some(call) = self.calls.get_mut(&handle) {
                    call.hangup_after_ack = true;
                }
                Ok(None)
            }
            (UasAction::Hangup, CallState::Confirmed) => {
                self.send_bye(handle, now);
                Ok(None)
            }
            (UasAction::Hangup, CallState::Terminating) => Ok(None),
            (UasAction::Info { content_type, body }, CallState::Confirmed) => {
                let body = Some((content_type.as_str(), body));
                self.send_in_dialog(handle, Method::Info, &[], body, now);
                Ok(None)
            }
            (
                UasAction::Refer {
                    refer_to,
                    referred_by,
                },
                CallState::Confirmed,
            ) => {
                self.send_refer(handle, &refer_to, referred_by.as_deref(), now);
                Ok(None)
            }
            (
                UasAction::Refer {
                    refer_to,
                    referred_by,
                },
                CallState::Answered,
            ) => {
                if let Some(call) = self.calls.get_mut(&handle) {
                    call.refer_after_ack = Some((refer_to, referred_by));
                }
                Ok(None)
            }
            _ => Err(ActionError::InvalidState),
        }
    }

    fn provisional(&mut self, handle: CallHandle, status: u16, now: Instant) {
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        let key = call.invite_key.clone();
        let tag = call.local_tag.clone();
        // One reliable provisional response at a time (RFC 3262 3): a later one is not sent
        // while the last waits for its PRACK.
        let reliable = call.requires_100rel;
        if reliable && call.reliable.is_some() {
            return;
        }
        let rseq = call.next_rseq;
        let contact = self.contact_for(handle);
        let mut sent = None;
        if let Some(entry) = self.server.get_mut(&key) {
            if let ServerTx::Invite(t) = &mut entry.tx {
                let mut response = Response::to_request(t.request(), status, Some(&tag));
                response.headers.push("Contact", contact);
                if reliable {
                    response.headers.push("Require", "100rel");
                    response.headers.push("RSeq", rseq.to_string());
                    sent = Some(response.clone());
                }
                t.send_response(response, now);
            }
        }
        if let (Some(response), Some(call)) = (sent, self.calls.get_mut(&handle)) {
            call.next_rseq += 1;
            let t1 = self.config.timers.t1;
            call.reliable = Some(Reliable {
                response,
                rseq,
                next_at: now + t1,
                interval: t1,
                give_up_at: now + t1 * 64,
            });
        }
        self.drain_server(&key);
    }

    /// PRACK (RFC 3262): acknowledges our reliable provisional response; a 2xx held for it
    /// goes out now.
    fn handle_prack(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        request: Request,
        tag: &str,
        now: Instant,
    ) {
        let call = self.find_dialog(&request, tag);
        // RAck: response-num CSeq-num Method.
        let rack: Option<(u32, u32)> = request.headers.get("RAck").and_then(|v| {
            let mut parts = v.split_whitespace();
            let rseq = parts.next()?.parse().ok()?;
            let cseq = parts.next()?.parse().ok()?;
            parts
                .next()
                .is_some_and(|m| m.eq_ignore_ascii_case("INVITE"))
                .then_some((rseq, cseq))
        });
        let matched = call.filter(|h| {
            self.calls.get(h).is_some_and(|c| {
                c.reliable
                    .as_ref()
                    .is_some_and(|r| rack == Some((r.rseq, c.invite_cseq)))
            })
        });
        let Some(handle) = matched else {
            self.reply(transport, source, request, 481, None, now);
            return;
        };
        self.reply(transport, source, request, 200, None, now);
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        call.reliable = None;
        if let Some(answer) = call.held_answer.take() {
            let key = call.invite_key.clone();
            if let Some(entry) = self.server.get_mut(&key) {
                if let ServerTx::Invite(t) = &mut entry.tx {
                    t.send_response(answer, now);
                }
            }
            self.drain_server(&key);
        }
    }

    /// Resends reliable provisional responses that wait for their PRACK; refuses the INVITE
    /// with 504 when none came in 64·T1 (RFC 3262 3).
    fn reliable_timeouts(&mut self, now: Instant) {
        let mut due: Vec<CallHandle> = self
            .calls
            .iter()
            .filter(|(_, c)| c.reliable.as_ref().is_some_and(|r| r.next_at <= now))
            .map(|(h, _)| *h)
            .collect();
        due.sort();
        for handle in due {
            let Some(call) = self.calls.get_mut(&handle) else {
                continue;
            };
            let Some(r) = call.reliable.as_mut() else {
                continue;
            };
            if now >= r.give_up_at {
                call.reliable = None;
                call.held_answer = None;
                self.events
                    .push_back(UasEvent::PrackTimeout { call: handle });
                self.final_response(handle, 504, now);
                continue;
            }
            r.interval *= 2;
            r.next_at = (now + r.interval).min(r.give_up_at);
            let response = r.response.clone();
            let key = call.invite_key.clone();
            if let Some(entry) = self.server.get_mut(&key) {
                if let ServerTx::Invite(t) = &mut entry.tx {
                    t.send_response(response, now);
                }
            }
            self.drain_server(&key);
        }
    }

    fn answer(
        &mut self,
        handle: CallHandle,
        mut media: LocalMedia,
        now: Instant,
    ) -> Result<Option<Negotiated>, ActionError> {
        let Some(call) = self.calls.get(&handle) else {
            return Err(ActionError::UnknownCall);
        };
        let (sd, negotiated) = match &call.offer {
            Some(offer) => match sdp::answer(offer, &media) {
                Ok((sd, n)) => {
                    media.keep_srtp(n.srtp);
                    (sd, Some(n))
                }
                Err(err) => {
                    self.final_response(handle, err.status_code(), now);
                    return Err(err.into());
                }
            },
            None => (sdp::offer(&media), None),
        };
        let key = call.invite_key.clone();
        let asked = call.session_asked;
        let Some(request) = self.server.get(&key).and_then(|e| match &e.tx {
            ServerTx::Invite(t) => Some(t.request().clone()),
            ServerTx::NonInvite(_) => None,
        }) else {
            return Err(ActionError::InvalidState);
        };
        let mut response = self.ok_with_sdp(&request, handle, &sd);
        let session = self.start_session(asked, &mut response, now);
        let hold = self
            .calls
            .get(&handle)
            .is_some_and(|c| c.reliable.is_some());
        if hold {
            if let Some(call) = self.calls.get_mut(&handle) {
                call.held_answer = Some(response);
            }
        } else if let Some(entry) = self.server.get_mut(&key) {
            if let ServerTx::Invite(t) = &mut entry.tx {
                t.send_response(response, now);
            }
        }
        if let Some(call) = self.calls.get_mut(&handle) {
            call.session = session;
            call.state = CallState::Answered;
            call.awaiting_answer_in_ack = call.offer.is_none();
            call.media = Some(media);
        }
        self.drain_server(&key);
        Ok(negotiated)
    }

    /// Decides on a session timer ask for a 2xx we send (the INVITE's answer, or a refresh):
    /// adds its headers to `response`; returns the timer in force and when to act on it. A
    /// refresh without `Session-Expires` turns the timer off (RFC 4028 9).
    fn start_session(
        &self,
        asked: Option<session_timer::Asked>,
        response: &mut Response,
        now: Instant,
    ) -> Option<(Granted, Instant)> {
        response.headers.push("Supported", SUPPORTED);
        match session_timer::grant(asked?) {
            Grant::Timer(granted) => {
                for (name, value) in granted.headers() {
                    response.headers.push(name, value);
                }
                Some((granted, granted.deadline(now)))
            }
            Grant::None | Grant::TooSmall => None,
        }
    }

    /// A refresh's session timer ask: what the caller said of its support for timers and
    /// UPDATE in the INVITE still holds when a refresh does not repeat it.
    fn refresh_ask(&self, handle: CallHandle, request: &Request) -> Option<session_timer::Asked> {
        let mut asked = session_timer::asked(request)?;
        if let Some(first) = self.calls.get(&handle).and_then(|c| c.session_asked) {
            asked.caller_supports |= first.caller_supports;
            asked.caller_allows_update |= first.caller_allows_update;
        }
        Some(asked)
    }

    /// UPDATE in a dialog (RFC 3311): a session refresh (RFC 4028) and, with an SDP offer, a
    /// media change answered from the call's media as a re-INVITE's would be.
    fn handle_update(
        &mut self,
        transport: Transport,
        source: SocketAddr,
        key: TransactionKey,
        request: Request,
        tag: &str,
        now: Instant,
    ) {
        let Some(handle) = self.find_dialog(&request, tag) else {
            self.reply(transport, source, request, 481, None, now);
            return;
        };
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        let confirmed = call.state == CallState::Confirmed && call.reinvite.is_none();
        let media = call.media.clone();
        let local_tag = call.local_tag.clone();
        let mut response = if request.body.is_empty() {
            Response::to_request(&request, 200, Some(&local_tag))
        } else {
            // An offer while another is open is a glare (RFC 3311 5.2).
            let Some(mut media) = media.filter(|_| confirmed) else {
                self.reply(transport, source, request, 491, None, now);
                return;
            };
            media.session_version += 1;
            let answered = SessionDescription::parse_bytes(&request.body)
                .map_err(NegotiationError::from)
                .and_then(|offer| sdp::answer(&offer, &media));
            match answered {
                Ok((sd, negotiated)) => {
                    media.keep_srtp(negotiated.srtp);
                    if let Some(call) = self.calls.get_mut(&handle) {
                        call.media = Some(media);
                    }
                    self.events.push_back(UasEvent::MediaUpdated {
                        call: handle,
                        negotiated,
                    });
                    Response::to_request(&request, 200, Some(&local_tag))
                        .with_body("application/sdp", sd.to_string())
                }
                Err(err) => {
                    let reason = err.to_string();
                    self.reply(
                        transport,
                        source,
                        request,
                        err.status_code(),
                        Some(reason),
                        now,
                    );
                    return;
                }
            }
        };
        response.headers.push("Contact", self.contact_for(handle));
        response.headers.push("Allow", ALLOW);
        response
            .headers
            .push("Server", self.config.user_agent.clone());
        let asked = self.refresh_ask(handle, &request);
        let session = self.start_session(asked, &mut response, now);
        if let Some(call) = self.calls.get_mut(&handle) {
            call.session = session;
        }
        let mut tx =
            NonInviteServerTransaction::new(request, transport.reliable(), self.config.timers, now);
        tx.send_response(response, now);
        self.insert_server(
            key,
            ServerTx::NonInvite(tx),
            Some(handle),
            source,
            transport,
        );
    }

    /// Acts on the session timers due at `now`: our refresh (an UPDATE), or the end of a
    /// call whose caller did not refresh in time.
    fn session_timeouts(&mut self, now: Instant) {
        let mut due: Vec<(CallHandle, Granted)> = self
            .calls
            .iter()
            .filter(|(_, c)| c.state == CallState::Confirmed)
            .filter_map(|(h, c)| c.session.filter(|(_, at)| *at <= now).map(|(g, _)| (*h, g)))
            .collect();
        due.sort_by_key(|(h, _)| *h);
        for (handle, granted) in due {
            match granted.refresher {
                Refresher::Uas => {
                    if let Some(call) = self.calls.get_mut(&handle) {
                        call.session = Some((granted, granted.deadline(now)));
                    }
                    self.send_refresh(handle, &granted.headers(), now);
                }
                Refresher::Uac => {
                    if let Some(call) = self.calls.get_mut(&handle) {
                        call.session = None;
                    }
                    self.events
                        .push_back(UasEvent::SessionExpired { call: handle });
                    self.send_bye(handle, now);
                }
            }
        }
    }

    /// Our session refresh: an UPDATE without a body, carrying the session timer's headers.
    fn send_refresh(&mut self, handle: CallHandle, headers: &[(&str, String)], now: Instant) {
        self.send_in_dialog(handle, Method::Update, headers, None, now);
    }

    fn send_refer(
        &mut self,
        handle: CallHandle,
        refer_to: &str,
        referred_by: Option<&str>,
        now: Instant,
    ) {
        let mut headers = vec![("Refer-To", format!("<{refer_to}>"))];
        if let Some(by) = referred_by {
            headers.push(("Referred-By", format!("<{by}>")));
        }
        headers.push(("Contact", self.contact_for(handle)));
        if let Some(call) = self.calls.get_mut(&handle) {
            call.refer_subscribed = true;
        }
        self.send_in_dialog(handle, Method::Refer, &headers, None, now);
    }

    fn send_bye(&mut self, handle: CallHandle, now: Instant) {
        self.send_in_dialog(handle, Method::Bye, &[], None, now);
    }

    /// Sends a request in the call's dialog: BYE (which ends the call), INFO or REFER, with
    /// `headers` added.
    fn send_in_dialog(
        &mut self,
        handle: CallHandle,
        method: Method,
        headers: &[(&str, String)],
        body: Option<(&str, String)>,
        now: Instant,
    ) {
        let branch = format!("{BRANCH_MAGIC}{}", self.token());
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        let kind = match method {
            Method::Bye => ClientKind::Bye,
            Method::Refer => ClientKind::Refer,
            _ => ClientKind::Info,
        };
        if kind == ClientKind::Bye {
            call.state = CallState::Terminating;
        }
        call.local_cseq += 1;
        let mut req = Request::new(method.clone(), call.remote_target.clone());
        req.headers.push(
            "Via",
            format!(
                "SIP/2.0/{} {};branch={branch};rport",
                call.transport.via_name(),
                match (&self.tls, call.transport) {
                    (Some(tls_sent_by), Transport::Tls) => tls_sent_by,
                    _ => &self.config.sent_by,
                }
            ),
        );
        req.headers.push("Max-Forwards", "70");
        req.headers.push("From", call.local.clone());
        req.headers.push("To", call.remote.clone());
        req.headers.push("Call-ID", call.call_id.clone());
        req.headers.push(
            "CSeq",
            CSeq {
                seq: call.local_cseq,
                method,
            }
            .to_string(),
        );
        for route in &call.route_set {
            req.headers.push("Route", route.clone());
        }
        req.headers
            .push("User-Agent", self.config.user_agent.clone());
        for (name, value) in headers {
            req.headers.push(name, value.clone());
        }
        if let Some((content_type, body)) = body {
            req = req.with_body(content_type, body);
        }
        let Ok(key) = TransactionKey::for_sent_request(&req) else {
            return;
        };
        let (peer, transport) = (call.peer, call.transport);
        let tx =
            NonInviteClientTransaction::new(req, transport.reliable(), self.config.timers, now);
        self.client.insert(
            key.clone(),
            ClientEntry {
                tx,
                call: handle,
                peer,
                transport,
                kind,
            },
        );
        self.drain_client(&key);
    }

    /// Runs every due timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due: Vec<TransactionKey> = self
            .server
            .iter()
            .filter(|(_, e)| {
                let t = match &e.tx {
                    ServerTx::Invite(t) => t.poll_timeout(),
                    ServerTx::NonInvite(t) => t.poll_timeout(),
                };
                t.is_some_and(|t| t <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        // Map order is random; a fixed order keeps output deterministic.
        due.sort_by(|a, b| a.branch.cmp(&b.branch));
        for key in due {
            if let Some(entry) = self.server.get_mut(&key) {
                match &mut entry.tx {
                    ServerTx::Invite(t) => t.handle_timeout(now),
                    ServerTx::NonInvite(t) => t.handle_timeout(now),
                }
            }
            if let Some(handle) = self.drain_server(&key) {
                // Timer H on an answered call: end it with BYE (RFC 3261 13.3.1.4).
                self.send_bye(handle, now);
            }
        }
        let mut due: Vec<TransactionKey> = self
            .client
            .iter()
            .filter(|(_, e)| e.tx.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        due.sort_by(|a, b| a.branch.cmp(&b.branch));
        for key in due {
            if let Some(entry) = self.client.get_mut(&key) {
                entry.tx.handle_timeout(now);
            }
            self.drain_client(&key);
        }
        self.session_timeouts(now);
        self.reliable_timeouts(now);
    }

    /// Forwards a server transaction's output; returns the call whose 2xx was never ACKed.
    fn drain_server(&mut self, key: &TransactionKey) -> Option<CallHandle> {
        let entry = self.server.get_mut(key)?;
        let (peer, transport, call) = (entry.peer, entry.transport, entry.call);
        let mut timed_out = false;
        loop {
            let (msg, event, terminated) = match &mut entry.tx {
                ServerTx::Invite(t) => (t.poll_transmit(), t.poll_event(), t.is_terminated()),
                ServerTx::NonInvite(t) => (t.poll_transmit(), t.poll_event(), t.is_terminated()),
            };
            if let Some(m) = &msg {
                self.transmits.push_back(Transmit {
                    transport,
                    destination: peer,
                    payload: m.to_bytes(),
                });
            }
            if event == Some(TransactionEvent::Timeout) {
                timed_out = true;
            }
            if msg.is_none() && event.is_none() {
                if terminated {
                    self.server.remove(key);
                }
                break;
            }
        }
        let handle = call.filter(|_| timed_out)?;
        let answered = self
            .calls
            .get(&handle)
            .is_some_and(|c| c.state == CallState::Answered);
        answered.then(|| {
            self.events.push_back(UasEvent::AckTimeout { call: handle });
            handle
        })
    }

    fn drain_client(&mut self, key: &TransactionKey) {
        let Some(entry) = self.client.get_mut(key) else {
            return;
        };
        let (peer, transport, handle) = (entry.peer, entry.transport, entry.call);
        let kind = entry.kind;
        let mut done = None;
        while let Some(m) = entry.tx.poll_transmit() {
            self.transmits.push_back(Transmit {
                transport,
                destination: peer,
                payload: m.to_bytes(),
            });
        }
        while let Some(event) = entry.tx.poll_event() {
            match event {
                TransactionEvent::Response(r) if r.status >= 200 => done = Some(r.status),
                TransactionEvent::Timeout => done = Some(408),
                _ => {}
            }
        }
        if entry.tx.is_terminated() {
            self.client.remove(key);
        }
        match (done, kind) {
            // Our BYE is answered (or gave up): the call is over.
            (Some(_), ClientKind::Bye) => self.forget(handle),
            (Some(status), ClientKind::Refer) => {
                if !(200..300).contains(&status) {
                    // Refused: no subscription, so no NOTIFY is expected.
                    if let Some(call) = self.calls.get_mut(&handle) {
                        call.refer_subscribed = false;
                    }
                }
                self.events.push_back(UasEvent::ReferAnswered {
                    call: handle,
                    status,
                });
            }
            _ => {}
        }
    }
}

/// Reads the answer an ACK carries to the offer in our 200, keeping what it settled on for
/// our side of SRTP; an error when it is missing, unreadable or unusable.
fn accept_answer_in_ack(
    media: Option<&mut LocalMedia>,
    body: &[u8],
) -> Result<Negotiated, NegotiationError> {
    let media = media.ok_or(NegotiationError::NoAudio)?;
    let answer = SessionDescription::parse_bytes(body)?;
    let negotiated = sdp::accept_answer(media, &answer)?;
    media.keep_srtp(negotiated.srtp);
    Ok(negotiated)
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::codec::Codec;
    use crate::sip::sdp::Direction;
    use std::time::Duration;

    const PHONE: &str = "192.0.2.50:5062";

    fn offer_sdp(codecs: &str, direction: &str) -> String {
        format!(
            "v=0\r\no=phone 1 1 IN IP4 192.0.2.50\r\ns=-\r\nc=IN IP4 192.0.2.50\r\nt=0 0\r\n\
m=audio 40000 RTP/AVP {codecs}\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n\
a=ptime:20\r\na={direction}\r\n"
        )
    }

    struct Req<'a> {
        method: &'a str,
        branch: &'a str,
        cseq: u32,
        to_tag: Option<&'a str>,
        body: Option<String>,
    }

    impl<'a> Req<'a> {
        fn new(method: &'a str, branch: &'a str, cseq: u32) -> Self {
            Self {
                method,
                branch,
                cseq,
                to_tag: None,
                body: None,
            }
        }
        fn tag(mut self, tag: &'a str) -> Self {
            self.to_tag = Some(tag);
            self
        }
        fn body(mut self, body: String) -> Self {
            self.body = Some(body);
            self
        }
        fn text(&self) -> String {
            let to_tag = self.to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
            let body = self.body.clone().unwrap_or_default();
            let ctype = if body.is_empty() {
                String::new()
            } else {
                "Content-Type: application/sdp\r\n".to_string()
            };
            let cseq_method = if self.method == "ACK" && self.to_tag.is_none() {
                "ACK"
            } else {
                self.method
            };
            format!(
                "{} sip:+15550100@203.0.113.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.50:5062;branch=z9hG4bK{};rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:alice@192.0.2.50>;tag=alice1\r\n\
To: <sip:+15550100@203.0.113.1>{to_tag}\r\n\
Call-ID: call-abc@192.0.2.50\r\n\
CSeq: {} {cseq_method}\r\n\
Contact: <sip:alice@192.0.2.50:5062>\r\n\
{ctype}Content-Length: {}\r\n\r\n{body}",
                self.method,
                self.branch,
                self.cseq,
                body.len()
            )
        }
    }

    struct Harness {
        uas: Uas,
        now: Instant,
        start: Instant,
    }

    impl Harness {
        fn new() -> Self {
            let now = Instant::now();
            Self {
                uas: Uas::new(
                    UasConfig {
                        contact: "sip:telcoflow@203.0.113.1:5060".into(),
                        sent_by: "203.0.113.1:5060".into(),
                        timers: Timers::default(),
                        user_agent: "telcoflow".into(),
                        codecs: crate::rtp::codec::Codec::ALL.to_vec(),
                    },
                    7,
                ),
                now,
                start: now,
            }
        }
        fn feed(&mut self, req: &Req<'_>) {
            self.uas.handle_input(
                Transport::Udp,
                PHONE.parse().unwrap(),
                req.text().as_bytes(),
                self.now,
            );
        }
        fn feed_raw(&mut self, text: &str) {
            self.uas.handle_input(
                Transport::Udp,
                PHONE.parse().unwrap(),
                text.as_bytes(),
                self.now,
            );
        }
        fn sent(&mut self) -> Vec<Message> {
            std::iter::from_fn(|| self.uas.poll_transmit())
                .map(|t| {
                    assert_eq!(t.destination, PHONE.parse().unwrap());
                    assert_eq!(t.transport, Transport::Udp);
                    Message::parse(&t.payload).unwrap()
                })
                .collect()
        }
        fn statuses(&mut self) -> Vec<u16> {
            self.sent()
                .into_iter()
                .map(|m| match m {
                    Message::Response(r) => r.status,
                    Message::Request(r) => panic!("unexpected request {}", r.method),
                })
                .collect()
        }
        fn events(&mut self) -> Vec<UasEvent> {
            std::iter::from_fn(|| self.uas.poll_event()).collect()
        }
        /// Runs timers up to `until` ms after start, returning (ms, message) sent.
        fn run_until(&mut self, until_ms: u64) -> Vec<(u64, Message)> {
            let until = self.start + Duration::from_millis(until_ms);
            let mut out = Vec::new();
            while let Some(at) = self.uas.poll_timeout() {
                if at > until {
                    break;
                }
                self.now = at;
                self.uas.handle_timeout(at);
                let ms = (at - self.start).as_millis() as u64;
                for m in self.sent() {
                    out.push((ms, m));
                }
            }
            self.now = until;
            out
        }
        /// INVITE with a PCMU/PCMA offer; returns the call and the 100.
        fn incoming(&mut self) -> CallHandle {
            self.feed(&Req::new("INVITE", "inv1", 1).body(offer_sdp("0 8 101", "sendrecv")));
            assert_eq!(self.statuses(), vec![100]);
            match self.events().as_slice() {
                [UasEvent::IncomingCall(ic)] => ic.call,
                other => panic!("unexpected events {other:?}"),
            }
        }
        fn media(&self) -> LocalMedia {
            LocalMedia::new("203.0.113.1".parse().unwrap(), 30000, 99)
        }
        /// Answers and returns our To tag.
        fn answer(&mut self, call: CallHandle) -> String {
            let media = self.media();
            let n = self
                .uas
                .handle_action(call, UasAction::Answer { media }, self.now)
                .unwrap()
                .unwrap();
            assert_eq!(n.codec, Codec::Pcmu);
            let sent = self.sent();
            let [Message::Response(ok)] = sent.as_slice() else {
                panic!("expected one response, got {sent:?}");
            };
            assert_eq!(ok.status, 200);
            ok.header_to().unwrap().tag().unwrap().to_string()
        }
    }

    #[test]
    fn a_contact_with_blanks_is_refused_before_the_call_starts() {
        // Found by fuzzing: the Contact URI became our BYE's Request-URI, and a blank in it
        // made a BYE nobody can parse.
        let mut h = Harness::new();
        let invite = Req::new("INVITE", "inv1", 1)
            .body(offer_sdp("0 101", "sendrecv"))
            .text()
            .replace(
                "<sip:alice@192.0.2.50:5062>",
                "<sip:alice @192.0.2.50:5062>",
            );
        h.feed_raw(&invite);
        let sent = h.sent();
        let [Message::Response(refusal)] = &sent[..] else {
            panic!("{sent:?}");
        };
        assert_eq!(
            (refusal.status, refusal.reason.as_str()),
            (400, "Malformed Contact header")
        );
        assert!(h.events().is_empty());
        assert_eq!(h.uas.call_count(), 0);
    }

    #[test]
    fn call_in_ring_answer_ack_bye() {
        let mut h = Harness::new();
        h.feed(&Req::new("INVITE", "inv1", 1).body(offer_sdp("0 8 101", "sendrecv")));
        assert_eq!(h.statuses(), vec![100]);
        let events = h.events();
        let [UasEvent::IncomingCall(ic)] = events.as_slice() else {
            panic!("unexpected events {events:?}");
        };
        let IncomingCall {
            call,
            number,
            from,
            offer,
            source,
            ..
        } = ic.as_ref();
        let call = *call;
        assert_eq!(number, "+15550100");
        assert_eq!(from.display.as_deref(), Some("Alice"));
        assert!(offer.is_some());
        assert_eq!(*source, PHONE.parse().unwrap());

        h.uas
            .handle_action(call, UasAction::Ringing, h.now)
            .unwrap();
        let sent = h.sent();
        let [Message::Response(ringing)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ringing.status, 180);
        let tag = ringing.header_to().unwrap().tag().unwrap().to_string();
        assert!(ringing.contact().unwrap().is_some());

        let media = h.media();
        let n = h
            .uas
            .handle_action(call, UasAction::Answer { media }, h.now)
            .unwrap()
            .unwrap();
        assert_eq!(n.codec, Codec::Pcmu);
        assert_eq!(n.telephone_event, Some(101));
        assert_eq!(n.remote, "192.0.2.50:40000".parse().unwrap());
        let sent = h.sent();
        let [Message::Response(ok)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ok.status, 200);
        // The same To tag as the 180: one dialog.
        assert_eq!(ok.header_to().unwrap().tag(), Some(tag.as_str()));
        assert_eq!(ok.content_type(), Some("application/sdp"));
        // The Via says where the INVITE really came from (RFC 3581).
        let via = ok.top_via().unwrap();
        assert_eq!(via.received(), Some("192.0.2.50"));
        assert_eq!(via.rport(), Some(5062));
        let body = String::from_utf8(ok.body.clone()).unwrap();
        assert!(body.contains("m=audio 30000 RTP/AVP 0 101\r\n"), "{body}");
        assert!(body.contains("c=IN IP4 203.0.113.1\r\n"));

        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        assert_eq!(h.events(), vec![UasEvent::Ack { call }]);
        assert_eq!(h.sent(), vec![]);
        // Nothing is retransmitted after the ACK.
        assert!(h.run_until(40_000).is_empty());

        h.feed(&Req::new("BYE", "bye1", 2).tag(&tag));
        assert_eq!(h.statuses(), vec![200]);
        assert_eq!(h.events(), vec![UasEvent::Bye { call }]);
        assert_eq!(h.uas.call_count(), 0);
        assert_eq!(
            h.uas.handle_action(call, UasAction::Hangup, h.now),
            Err(ActionError::UnknownCall)
        );
    }

    #[test]
    fn lost_ack_resends_200_then_ends_the_call_with_bye() {
        let mut h = Harness::new();
        let call = h.incoming();
        let tag = h.answer(call);
        let log = h.run_until(40_000);
        let oks: Vec<u64> = log
            .iter()
            .filter(|(_, m)| matches!(m, Message::Response(r) if r.status == 200))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(
            oks,
            vec![
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
        );
        assert_eq!(h.events(), vec![UasEvent::AckTimeout { call }]);
        let byes: Vec<&Request> = log
            .iter()
            .filter_map(|(t, m)| match m {
                Message::Request(r) if *t == 32_000 => Some(r),
                _ => None,
            })
            .collect();
        let bye = byes.first().expect("BYE at Timer H");
        assert_eq!(bye.method, Method::Bye);
        assert_eq!(bye.uri, "sip:alice@192.0.2.50:5062");
        assert_eq!(bye.header_from().unwrap().tag(), Some(tag.as_str()));
        assert_eq!(bye.header_to().unwrap().tag(), Some("alice1"));
        assert_eq!(bye.call_id().unwrap(), "call-abc@192.0.2.50");
        assert_eq!(bye.cseq().unwrap().method, Method::Bye);
        bye.validate().unwrap();
        // The phone answers the BYE: the call is forgotten.
        let ok = Response::to_request(bye, 200, None);
        h.feed_raw(&String::from_utf8(ok.to_bytes()).unwrap());
        assert_eq!(h.uas.call_count(), 0);
    }

    #[test]
    fn cancel_before_answer() {
        let mut h = Harness::new();
        let call = h.incoming();
        h.uas
            .handle_action(call, UasAction::Ringing, h.now)
            .unwrap();
        h.sent();
        h.feed(&Req::new("CANCEL", "inv1", 1));
        assert_eq!(h.statuses(), vec![200, 487]);
        assert_eq!(h.events(), vec![UasEvent::Cancelled { call }]);
        // The ACK for the 487 is absorbed by the INVITE transaction.
        h.feed(&Req::new("ACK", "inv1", 1).tag("whatever"));
        assert_eq!(h.sent(), vec![]);
        assert_eq!(h.uas.call_count(), 0);
        assert_eq!(
            h.uas
                .handle_action(call, UasAction::Answer { media: h.media() }, h.now),
            Err(ActionError::UnknownCall)
        );
        // A CANCEL for an unknown transaction gets 481.
        h.feed(&Req::new("CANCEL", "nope", 1));
        assert_eq!(h.statuses(), vec![481]);
    }

    #[test]
    fn no_common_codec_is_488_without_an_event() {
        let mut h = Harness::new();
        h.feed(&Req::new("INVITE", "inv1", 1).body(offer_sdp("18 101", "sendrecv")));
        assert_eq!(h.statuses(), vec![488]);
        assert!(h.events().is_empty());
        assert_eq!(h.uas.call_count(), 0);
    }

    #[test]
    fn malformed_request_is_400_with_reason() {
        let mut h = Harness::new();
        let text = Req::new("INVITE", "inv1", 1)
            .text()
            .replace("Call-ID: call-abc@192.0.2.50\r\n", "");
        h.feed_raw(&text);
        let sent = h.sent();
        let [Message::Response(r)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(r.status, 400);
        assert_eq!(r.reason, "Missing Call-ID header");
        // Bad SDP is a 400 too.
        h.feed(&Req::new("INVITE", "inv2", 1).body("v=0\r\nm=audio x\r\n".into()));
        assert_eq!(h.statuses(), vec![400]);
        // Garbage without headers is dropped.
        h.feed_raw("hello");
        assert!(h.sent().is_empty());
        assert!(h.events().is_empty());
    }

    #[test]
    fn unparseable_requests_with_a_via_get_400_saying_why() {
        let mut h = Harness::new();
        let invite = Req::new("INVITE", "bad1", 1)
            .body(offer_sdp("0", "sendrecv"))
            .text();
        let bad_length = invite.replacen("Content-Length: ", "Content-Length: x", 1);
        let sip3 = invite.replacen("SIP/2.0\r\nVia", "SIP/3.0\r\nVia", 1);
        for (text, reason) in [
            (bad_length.as_str(), "Malformed Content-Length header"),
            (sip3.as_str(), "Unsupported SIP version"),
        ] {
            h.feed_raw(text);
            let sent = h.sent();
            let [Message::Response(r)] = sent.as_slice() else {
                panic!("{sent:?}");
            };
            assert_eq!((r.status, r.reason.as_str()), (400, reason));
            assert_eq!(r.call_id().unwrap(), "call-abc@192.0.2.50");
        }
        let mut bad_utf8 = Req::new("OPTIONS", "bad2", 2).text().into_bytes();
        bad_utf8[70] = 0xff;
        h.uas
            .handle_input(Transport::Udp, PHONE.parse().unwrap(), &bad_utf8, h.now);
        let sent = h.sent();
        let [Message::Response(r)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(
            (r.status, r.reason.as_str()),
            (400, "Invalid UTF-8 in headers")
        );
        assert!(h.events().is_empty(), "no call from unparseable input");
        // An unparseable ACK is never answered.
        h.feed_raw(
            &Req::new("ACK", "bad3", 1)
                .text()
                .replace("SIP/2.0\r\nVia", "SIP/3.0\r\nVia"),
        );
        assert!(h.sent().is_empty());
    }

    #[test]
    fn numbers_longer_than_64_characters_are_refused() {
        let long = "1".repeat(MAX_NUMBER_LEN + 1);
        let invite = Req::new("INVITE", "long", 1)
            .body(offer_sdp("0", "sendrecv"))
            .text();
        let mut h = Harness::new();
        for (i, (text, reason)) in [
            (
                invite.replacen(
                    "sip:+15550100@203.0.113.1 SIP",
                    &format!("sip:{long}@203.0.113.1 SIP"),
                    1,
                ),
                "Called number longer than 64 characters",
            ),
            (
                invite.replacen("<sip:+15550100@", &format!("<sip:{long}@"), 1),
                "Called number longer than 64 characters",
            ),
            (
                invite.replacen(
                    "sip:alice@192.0.2.50>",
                    &format!("sip:{long}@192.0.2.50>"),
                    1,
                ),
                "Caller number longer than 64 characters",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            // A branch of its own each, else it is a retransmission of the first.
            h.feed_raw(&text.replace("z9hG4bKlong", &format!("z9hG4bKlong{i}")));
            let sent = h.sent();
            let [Message::Response(r)] = sent.as_slice() else {
                panic!("{sent:?}");
            };
            assert_eq!((r.status, r.reason.as_str()), (400, reason));
        }
        assert!(h.events().is_empty());
        // 64 is fine.
        let ok = "2".repeat(MAX_NUMBER_LEN);
        h.feed_raw(&invite.replacen("sip:alice@192.0.2.50>", &format!("sip:{ok}@192.0.2.50>"), 1));
        assert!(matches!(h.events().as_slice(), [UasEvent::IncomingCall(_)]));
    }

    #[test]
    fn admission_refuses_new_calls_before_any_state() {
        let mut h = Harness::new();
        let invite = Req::new("INVITE", "adm1", 1)
            .body(offer_sdp("0", "sendrecv"))
            .text();
        let mut asked = 0;
        let refuse = |r: &Request| {
            assert_eq!(r.method, Method::Invite);
            Admission::Refuse(Refusal::new(503).with_header("Retry-After", "3"))
        };
        for _ in 0..2 {
            // The retransmission is answered by the transaction, without asking again.
            h.uas.handle_input_with(
                Transport::Udp,
                PHONE.parse().unwrap(),
                invite.as_bytes(),
                h.now,
                |r| {
                    asked += 1;
                    refuse(r)
                },
            );
            let sent = h.sent();
            let [Message::Response(r)] = sent.as_slice() else {
                panic!("{sent:?}");
            };
            assert_eq!(r.status, 503);
            assert_eq!(r.headers.get("Retry-After"), Some("3"));
        }
        assert_eq!(asked, 1);
        assert!(h.events().is_empty());
        assert_eq!(h.uas.call_count(), 0);
        // A stateless refusal is sent once and leaves nothing behind, not even timers.
        let mut h = Harness::new();
        let other = Req::new("INVITE", "adm3", 1)
            .body(offer_sdp("0", "sendrecv"))
            .text();
        for _ in 0..2 {
            h.uas.handle_input_with(
                Transport::Udp,
                PHONE.parse().unwrap(),
                other.as_bytes(),
                h.now,
                |_| Admission::Refuse(Refusal::new(403).stateless()),
            );
            assert_eq!(h.statuses(), vec![403], "each copy answered once");
        }
        assert_eq!(
            h.uas.poll_timeout(),
            None,
            "no transaction, no retransmission"
        );
        assert_eq!(h.run_until(40_000).len(), 0);
        // OPTIONS and in-dialog requests are not admission's business.
        h.uas.handle_input_with(
            Transport::Udp,
            PHONE.parse().unwrap(),
            Req::new("OPTIONS", "adm2", 2).text().as_bytes(),
            h.now,
            |_| panic!("asked about OPTIONS"),
        );
        assert_eq!(h.statuses(), vec![200]);
    }

    #[test]
    fn required_extensions_are_refused_with_420() {
        let mut h = Harness::new();
        let text = Req::new("INVITE", "inv1", 1)
            .body(offer_sdp("0", "sendrecv"))
            .text()
            .replace(
                "Max-Forwards: 70\r\n",
                "Max-Forwards: 70\r\nRequire: 100rel, precondition, timer\r\n",
            );
        h.feed_raw(&text);
        let sent = h.sent();
        let [Message::Response(r)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(r.status, 420);
        // Reliable provisional responses and session timers we implement.
        assert_eq!(r.headers.get("Unsupported"), Some("precondition"));
        assert!(h.events().is_empty());
        // Supported (not required) extensions are fine.
        let text = Req::new("INVITE", "inv2", 1)
            .body(offer_sdp("0", "sendrecv"))
            .text()
            .replace(
                "Max-Forwards: 70\r\n",
                "Max-Forwards: 70\r\nSupported: 100rel, timer\r\n",
            );
        h.feed_raw(&text);
        assert_eq!(h.statuses(), vec![100]);
    }

    /// An INVITE with extra header lines (each ending in CRLF), fed raw; returns the call.
    fn incoming_with(h: &mut Harness, headers: &str) -> CallHandle {
        let text = Req::new("INVITE", "inv1", 1)
            .body(offer_sdp("0 8 101", "sendrecv"))
            .text()
            .replace(
                "Max-Forwards: 70\r\n",
                &format!("Max-Forwards: 70\r\n{headers}"),
            );
        h.feed_raw(&text);
        assert_eq!(h.statuses(), vec![100]);
        match h.events().as_slice() {
            [UasEvent::IncomingCall(ic)] => ic.call,
            other => panic!("unexpected events {other:?}"),
        }
    }

    /// Answers and ACKs `call`; returns the 200 and our tag.
    fn answer_and_ack(h: &mut Harness, call: CallHandle) -> (Response, String) {
        let media = h.media();
        h.uas
            .handle_action(call, UasAction::Answer { media }, h.now)
            .unwrap();
        let sent = h.sent();
        let [Message::Response(ok)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        let tag = ok.header_to().unwrap().tag().unwrap().to_string();
        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        assert!(h.sent().is_empty());
        let _ = h.events();
        (ok.clone(), tag)
    }

    #[test]
    fn a_caller_refreshing_keeps_the_call_and_one_that_stops_is_hung_up() {
        let mut h = Harness::new();
        let call = incoming_with(
            &mut h,
            "Session-Expires: 90;refresher=uac\r\nSupported: timer\r\n",
        );
        let (ok, tag) = answer_and_ack(&mut h, call);
        assert_eq!(ok.headers.get("Session-Expires"), Some("90;refresher=uac"));
        assert_eq!(ok.headers.get("Require"), Some("timer"));
        assert!(ok.headers.get("Allow").unwrap().contains("UPDATE"));
        // An UPDATE refresh at 40 s: answered, and the session runs 90 s from there.
        assert!(h.run_until(40_000).is_empty());
        let refresh = Req::new("UPDATE", "up1", 2).tag(&tag).text().replace(
            "Max-Forwards: 70\r\n",
            "Max-Forwards: 70\r\nSession-Expires: 90;refresher=uac\r\n",
        );
        h.feed_raw(&refresh);
        let sent = h.sent();
        let [Message::Response(r)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(r.status, 200);
        assert_eq!(r.headers.get("Session-Expires"), Some("90;refresher=uac"));
        assert!(h.events().is_empty(), "a refresh changes no media");
        // No refresh after that: BYE 30 s before the end (a third of 90 s), at 100 s.
        let sent = h.run_until(99_999);
        assert!(
            sent.iter().all(|(_, m)| !matches!(m, Message::Request(_))),
            "{sent:?}"
        );
        let sent = h.run_until(100_000);
        let Some((at, Message::Request(bye))) = sent.first() else {
            panic!("{sent:?}");
        };
        assert_eq!((*at, &bye.method), (100_000, &Method::Bye));
        assert_eq!(h.events(), [UasEvent::SessionExpired { call }]);
    }

    #[test]
    fn a_required_100rel_ringing_is_resent_until_prack_and_the_200_waits_for_it() {
        let mut h = Harness::new();
        let call = incoming_with(&mut h, "Require: 100rel\r\n");
        h.uas
            .handle_action(call, UasAction::Ringing, h.now)
            .unwrap();
        let sent = h.sent();
        let [Message::Response(ringing)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ringing.status, 180);
        assert_eq!(ringing.headers.get("Require"), Some("100rel"));
        let rseq: u32 = ringing.headers.get("RSeq").unwrap().parse().unwrap();
        let tag = ringing.header_to().unwrap().tag().unwrap().to_string();
        // Resent at T1, then 2·T1 later.
        let resent: Vec<u64> = h
            .run_until(1_600)
            .into_iter()
            .map(|(at, m)| match m {
                Message::Response(r) if r.status == 180 => at,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(resent, [500, 1_500]);
        // The answer is held while the 180 waits for its PRACK.
        let media = h.media();
        h.uas
            .handle_action(call, UasAction::Answer { media }, h.now)
            .unwrap();
        assert!(h.sent().is_empty(), "no 200 before the PRACK");
        // A PRACK for another RSeq is 481; the right one is 200, and the 200 follows.
        let prack = |rseq: u32, branch: &'static str| {
            Req::new("PRACK", branch, 2).tag(&tag).text().replace(
                "Max-Forwards: 70\r\n",
                &format!("Max-Forwards: 70\r\nRAck: {rseq} 1 INVITE\r\n"),
            )
        };
        h.feed_raw(&prack(rseq + 1, "pr1"));
        assert_eq!(h.statuses(), vec![481]);
        h.feed_raw(&prack(rseq, "pr2"));
        let sent = h.sent();
        let statuses: Vec<(u16, String)> = sent
            .iter()
            .map(|m| match m {
                Message::Response(r) => (r.status, r.cseq().unwrap().method.as_str().to_string()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            statuses,
            [(200, "PRACK".to_string()), (200, "INVITE".to_string())]
        );
        // Acknowledged: no more resends of the 180.
        assert!(
            h.run_until(5_000)
                .iter()
                .all(|(_, m)| !matches!(m, Message::Response(r) if r.status == 180))
        );
    }

    #[test]
    fn no_prack_in_64_t1_refuses_the_invite_with_504() {
        let mut h = Harness::new();
        let call = incoming_with(&mut h, "Require: 100rel\r\n");
        h.uas
            .handle_action(call, UasAction::Ringing, h.now)
            .unwrap();
        let _ = h.sent();
        let sent = h.run_until(32_000);
        let finals: Vec<u16> = sent
            .iter()
            .filter_map(|(_, m)| match m {
                Message::Response(r) if r.status >= 200 => Some(r.status),
                _ => None,
            })
            .collect();
        assert_eq!(finals.first(), Some(&504), "{sent:?}");
        assert_eq!(h.events(), [UasEvent::PrackTimeout { call }]);
        assert_eq!(h.uas.call_count(), 0);
    }

    #[test]
    fn a_call_over_tcp_gets_a_contact_saying_tcp() {
        let mut h = Harness::new();
        let invite = Req::new("INVITE", "inv1", 1).body(offer_sdp("0", "sendrecv"));
        h.uas.handle_input(
            Transport::Tcp,
            PHONE.parse().unwrap(),
            invite.text().as_bytes(),
            h.now,
        );
        let call = match h.events().as_slice() {
            [UasEvent::IncomingCall(ic)] => ic.call,
            other => panic!("{other:?}"),
        };
        let media = h.media();
        h.uas
            .handle_action(call, UasAction::Answer { media }, h.now)
            .unwrap();
        let ok = std::iter::from_fn(|| h.uas.poll_transmit())
            .map(|t| {
                assert_eq!(t.transport, Transport::Tcp);
                Message::parse(&t.payload).unwrap()
            })
            .find_map(|m| match m {
                Message::Response(r) if r.status == 200 => Some(r),
                _ => None,
            })
            .expect("a 200");
        assert_eq!(
            ok.headers.get("Contact"),
            Some("<sip:telcoflow@203.0.113.1:5060;transport=tcp>")
        );
    }

    #[test]
    fn a_call_over_tls_gets_the_tls_contact_and_our_bye_says_tls() {
        // (Request-URI, the Contact we answer with.)
        let cases = [
            (
                "sip:+15550100@203.0.113.1",
                "<sip:telcoflow@203.0.113.1:5061;transport=tls>",
            ),
            (
                "sips:+15550100@203.0.113.1",
                "<sips:telcoflow@203.0.113.1:5061>",
            ),
        ];
        for (uri, contact) in cases {
            let mut h = Harness::new();
            h.uas.set_tls("203.0.113.1:5061".into());
            let invite = Req::new("INVITE", "inv1", 1)
                .body(offer_sdp("0", "sendrecv"))
                .text()
                .replacen("sip:+15550100@203.0.113.1", uri, 1)
                .replace("SIP/2.0/UDP", "SIP/2.0/TLS");
            h.uas.handle_input(
                Transport::Tls,
                PHONE.parse().unwrap(),
                invite.as_bytes(),
                h.now,
            );
            let call = match h.events().as_slice() {
                [UasEvent::IncomingCall(ic)] => ic.call,
                other => panic!("{other:?}"),
            };
            let media = h.media();
            h.uas
                .handle_action(call, UasAction::Answer { media }, h.now)
                .unwrap();
            let sent: Vec<Message> = std::iter::from_fn(|| h.uas.poll_transmit())
                .map(|t| {
                    assert_eq!(t.transport, Transport::Tls);
                    Message::parse(&t.payload).unwrap()
                })
                .collect();
            let ok = sent
                .iter()
                .find_map(|m| match m {
                    Message::Response(r) if r.status == 200 => Some(r),
                    _ => None,
                })
                .expect("a 200");
            assert_eq!(ok.headers.get("Contact"), Some(contact), "{uri}");
            let tag = ok.header_to().unwrap().tag().unwrap().to_owned();
            h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
            h.uas.handle_action(call, UasAction::Hangup, h.now).unwrap();
            let bye = std::iter::from_fn(|| h.uas.poll_transmit())
                .find_map(|t| match Message::parse(&t.payload).unwrap() {
                    Message::Request(r) if r.method == Method::Bye => Some((t.transport, r)),
                    _ => None,
                })
                .expect("a BYE");
            assert_eq!(bye.0, Transport::Tls);
            let via = bye.1.headers.get("Via").unwrap();
            assert!(via.starts_with("SIP/2.0/TLS 203.0.113.1:5061;"), "{via}");
        }
    }

    #[test]
    fn a_sips_request_uri_over_udp_or_tcp_is_416() {
        for transport in [Transport::Udp, Transport::Tcp] {
            let mut h = Harness::new();
            let invite = Req::new("INVITE", "inv1", 1)
                .body(offer_sdp("0", "sendrecv"))
                .text()
                .replacen("sip:+15550100@203.0.113.1", "sips:+15550100@203.0.113.1", 1);
            h.uas
                .handle_input(transport, PHONE.parse().unwrap(), invite.as_bytes(), h.now);
            assert!(h.events().is_empty(), "{transport:?}: no call");
            let statuses: Vec<u16> = std::iter::from_fn(|| h.uas.poll_transmit())
                .filter_map(|t| match Message::parse(&t.payload).unwrap() {
                    Message::Response(r) => Some(r.status),
                    Message::Request(_) => None,
                })
                .collect();
            assert_eq!(statuses, [416], "{transport:?}");
        }
    }

    #[test]
    fn too_short_a_session_interval_is_422_with_min_se() {
        let mut h = Harness::new();
        let text = Req::new("INVITE", "inv1", 1)
            .body(offer_sdp("0", "sendrecv"))
            .text()
            .replace("Max-Forwards: 70\r\n", "Max-Forwards: 70\r\nx: 30\r\n");
        h.feed_raw(&text);
        let sent = h.sent();
        let [Message::Response(r)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(r.status, 422);
        assert_eq!(r.headers.get("Min-SE"), Some("90"));
        assert!(h.events().is_empty());
    }

    #[test]
    fn we_refresh_by_update_when_the_caller_cannot() {
        let mut h = Harness::new();
        // A proxy asked for a timer; the caller supports none but allows UPDATE.
        let call = incoming_with(
            &mut h,
            "Session-Expires: 120\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n",
        );
        let (ok, _tag) = answer_and_ack(&mut h, call);
        assert_eq!(ok.headers.get("Session-Expires"), Some("120;refresher=uas"));
        assert_eq!(ok.headers.get("Require"), None);
        let sent = h.run_until(120_000);
        // Each UPDATE's first sending (unanswered here, they are retransmitted too).
        let mut seen = Vec::new();
        let updates: Vec<u64> = sent
            .iter()
            .filter_map(|(at, m)| match m {
                Message::Request(r) if r.method == Method::Update => {
                    assert_eq!(r.headers.get("Session-Expires"), Some("120;refresher=uas"));
                    assert!(r.body.is_empty());
                    let cseq = r.cseq().unwrap().seq;
                    (!seen.contains(&cseq)).then(|| {
                        seen.push(cseq);
                        *at
                    })
                }
                _ => None,
            })
            .collect();
        assert_eq!(updates, [60_000, 120_000], "every half interval");
        assert!(h.events().is_empty());
        // Without UPDATE in its Allow, no timer is granted.
        let mut h = Harness::new();
        let call = incoming_with(&mut h, "Session-Expires: 120\r\n");
        let (ok, _) = answer_and_ack(&mut h, call);
        assert_eq!(ok.headers.get("Session-Expires"), None);
        assert_eq!(ok.headers.get("Supported"), Some("timer, 100rel"));
    }

    #[test]
    fn an_update_with_an_offer_changes_the_media() {
        let mut h = Harness::new();
        let call = h.incoming();
        let (_, tag) = answer_and_ack(&mut h, call);
        h.feed(
            &Req::new("UPDATE", "up1", 2)
                .tag(&tag)
                .body(offer_sdp("0", "sendonly")),
        );
        let sent = h.sent();
        let [Message::Response(r)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(r.status, 200);
        assert!(
            String::from_utf8_lossy(&r.body).contains("a=recvonly"),
            "{r:?}"
        );
        let events = h.events();
        let [UasEvent::MediaUpdated { negotiated, .. }] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert!(negotiated.remote_hold);
        // An UPDATE outside any dialog is 481.
        h.feed(&Req::new("UPDATE", "up2", 3).tag("nobody"));
        assert_eq!(h.statuses(), vec![481]);
    }

    #[test]
    fn dtmf_by_sip_info() {
        let mut h = Harness::new();
        let call = h.incoming();
        let tag = h.answer(call);
        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        h.events();
        for (branch, ctype, body, expect) in [
            (
                "i1",
                "application/dtmf-relay",
                "Signal=5\r\nDuration=160\r\n",
                Some(('5', 160)),
            ),
            (
                "i2",
                "application/dtmf-relay",
                "Signal=#\r\n",
                Some(('#', 0)),
            ),
            ("i3", "application/dtmf", "a", Some(('A', 0))),
            ("i4", "application/dtmf-relay", "Signal=x\r\n", None),
            ("i5", "text/plain", "5", None),
        ] {
            let text = Req::new("INFO", branch, 3)
                .tag(&tag)
                .body(body.into())
                .text()
                .replace("application/sdp", ctype);
            h.feed_raw(&text);
            assert_eq!(h.statuses(), vec![200], "{body}");
            let expected: Vec<UasEvent> = expect
                .map(|(digit, duration_ms)| UasEvent::Dtmf {
                    call,
                    digit,
                    duration_ms,
                })
                .into_iter()
                .collect();
            assert_eq!(h.events(), expected, "{body}");
        }
    }

    #[test]
    fn options_and_unknown_methods() {
        let mut h = Harness::new();
        h.feed(&Req::new("OPTIONS", "o1", 1));
        let sent = h.sent();
        let [Message::Response(r)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(r.status, 200);
        assert!(r.headers.get("Allow").unwrap().contains("INVITE"));
        h.feed(&Req::new("REGISTER", "r1", 1));
        assert_eq!(h.statuses(), vec![405]);
        h.feed(&Req::new("BYE", "b1", 1).tag("unknown"));
        assert_eq!(h.statuses(), vec![481]);
    }

    #[test]
    fn unknown_number_is_rejected_by_the_owner() {
        let mut h = Harness::new();
        let call = h.incoming();
        h.uas
            .handle_action(call, UasAction::Reject { status: 404 }, h.now)
            .unwrap();
        assert_eq!(h.statuses(), vec![404]);
        assert_eq!(h.uas.call_count(), 0);
        assert_eq!(
            h.uas
                .handle_action(call, UasAction::Reject { status: 404 }, h.now),
            Err(ActionError::UnknownCall)
        );
        let other = h.incoming_second();
        assert_eq!(
            h.uas
                .handle_action(other, UasAction::Reject { status: 200 }, h.now),
            Err(ActionError::InvalidStatus(200))
        );
        // Ring timeout.
        h.uas
            .handle_action(other, UasAction::Reject { status: 480 }, h.now)
            .unwrap();
        assert_eq!(h.statuses(), vec![480]);
    }

    impl Harness {
        fn incoming_second(&mut self) -> CallHandle {
            let text = Req::new("INVITE", "inv9", 1)
                .body(offer_sdp("8", "sendrecv"))
                .text()
                .replace("call-abc", "call-second");
            self.feed_raw(&text);
            assert_eq!(self.statuses(), vec![100]);
            match self.events().as_slice() {
                [UasEvent::IncomingCall(ic)] => ic.call,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn retransmitted_invite_is_absorbed() {
        let mut h = Harness::new();
        let call = h.incoming();
        h.uas
            .handle_action(call, UasAction::Ringing, h.now)
            .unwrap();
        h.sent();
        h.feed(&Req::new("INVITE", "inv1", 1).body(offer_sdp("0 8 101", "sendrecv")));
        // The last provisional again, and no second call.
        assert_eq!(h.statuses(), vec![180]);
        assert!(h.events().is_empty());
        assert_eq!(h.uas.call_count(), 1);
    }

    #[test]
    fn info_in_the_dialog_carries_dtmf_and_its_answer_keeps_the_call() {
        let mut h = Harness::new();
        let call = h.incoming();
        let tag = h.answer(call);
        let info = UasAction::Info {
            content_type: "application/dtmf-relay".into(),
            body: crate::rtp::dtmf_out::dtmf_relay_body('5', 100),
        };
        // Not before the dialog is confirmed.
        assert_eq!(
            h.uas.handle_action(call, info.clone(), h.now),
            Err(ActionError::InvalidState)
        );
        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        h.events();
        h.uas.handle_action(call, info, h.now).unwrap();
        let sent = h.sent();
        let [Message::Request(req)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(req.method, Method::Info);
        assert_eq!(req.cseq().unwrap().method, Method::Info);
        assert_eq!(
            req.headers.get("Content-Type"),
            Some("application/dtmf-relay")
        );
        assert_eq!(req.body, b"Signal=5\r\nDuration=100\r\n");
        let ok = Response::to_request(req, 200, None);
        h.feed_raw(&String::from_utf8(ok.to_bytes()).unwrap());
        assert_eq!(h.uas.call_count(), 1, "the call goes on");
        // A later BYE still ends it.
        h.uas.handle_action(call, UasAction::Hangup, h.now).unwrap();
        let sent = h.sent();
        let [Message::Request(bye)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(bye.method, Method::Bye);
        let ok = Response::to_request(bye, 200, None);
        h.feed_raw(&String::from_utf8(ok.to_bytes()).unwrap());
        assert_eq!(h.uas.call_count(), 0);
    }

    #[test]
    fn refer_is_answered_and_its_notifies_report_progress() {
        let mut h = Harness::new();
        let call = h.incoming();
        let tag = h.answer(call);
        let refer = UasAction::Refer {
            refer_to: "sip:+15550199@pbx.example".into(),
            referred_by: Some("sip:telcoflow@203.0.113.1:5060".into()),
        };
        // Asked before the ACK: sent once it comes.
        h.uas.handle_action(call, refer, h.now).unwrap();
        assert!(h.sent().is_empty());
        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        h.events();
        let sent = h.sent();
        let [Message::Request(req)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(req.method, Method::Refer);
        assert_eq!(req.cseq().unwrap().method, Method::Refer);
        assert_eq!(
            req.headers.get("Refer-To"),
            Some("<sip:+15550199@pbx.example>")
        );
        assert_eq!(
            req.headers.get("Referred-By"),
            Some("<sip:telcoflow@203.0.113.1:5060>")
        );
        assert!(req.headers.get("Contact").is_some());
        let accepted = Response::to_request(req, 202, None);
        h.feed_raw(&String::from_utf8(accepted.to_bytes()).unwrap());
        assert_eq!(
            h.events(),
            vec![UasEvent::ReferAnswered { call, status: 202 }]
        );
        // The NOTIFYs come in the dialog, from the caller.
        let notify = |branch: &str, cseq: u32, event: &str, state: &str, frag: &str| {
            Req::new("NOTIFY", branch, cseq)
                .tag(&tag)
                .body(frag.into())
                .text()
                .replace(
                    "Content-Type: application/sdp\r\n",
                    &format!(
                        "Event: {event}\r\nSubscription-State: {state}\r\nContent-Type: message/sipfrag\r\n"
                    ),
                )
        };
        h.feed_raw(&notify(
            "n1",
            2,
            "refer",
            "active;expires=60",
            "SIP/2.0 100 Trying\r\n",
        ));
        assert_eq!(h.statuses(), vec![200]);
        // A body that is no status line, or another event package, is refused.
        h.feed_raw(&notify("n3", 3, "refer", "active", "hello"));
        assert_eq!(h.statuses(), vec![400]);
        h.feed_raw(&notify("n4", 4, "presence", "active", "SIP/2.0 200 OK\r\n"));
        assert_eq!(h.statuses(), vec![489]);
        h.feed_raw(&notify(
            "n2",
            5,
            "refer;id=2",
            "terminated;reason=noresource",
            "SIP/2.0 200 OK\r\n",
        ));
        assert_eq!(h.statuses(), vec![200]);
        assert_eq!(
            h.events(),
            vec![
                UasEvent::ReferProgress {
                    call,
                    status: 100,
                    reason: "Trying".into(),
                    terminated: false,
                },
                UasEvent::ReferProgress {
                    call,
                    status: 200,
                    reason: "OK".into(),
                    terminated: true,
                },
            ]
        );
        // The subscription has ended: a later NOTIFY belongs to none.
        h.feed_raw(&notify(
            "n5",
            6,
            "refer",
            "active",
            "SIP/2.0 180 Ringing\r\n",
        ));
        assert_eq!(h.statuses(), vec![481]);
        assert_eq!(h.events(), vec![]);
        assert_eq!(h.uas.call_count(), 1, "the call goes on until the BYE");
    }

    #[test]
    fn an_unanswered_or_refused_refer_is_reported() {
        let mut h = Harness::new();
        let call = h.incoming();
        let tag = h.answer(call);
        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        h.events();
        let refer = UasAction::Refer {
            refer_to: "sip:bob@pbx.example".into(),
            referred_by: None,
        };
        h.uas.handle_action(call, refer.clone(), h.now).unwrap();
        let sent = h.sent();
        let [Message::Request(req)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(req.headers.get("Referred-By"), None);
        let refused = Response::to_request(req, 405, None);
        h.feed_raw(&String::from_utf8(refused.to_bytes()).unwrap());
        assert_eq!(
            h.events(),
            vec![UasEvent::ReferAnswered { call, status: 405 }]
        );
        // No answer at all: 408 once the transaction gives up (64 T1).
        h.uas.handle_action(call, refer, h.now).unwrap();
        h.run_until(40_000);
        assert_eq!(
            h.events(),
            vec![UasEvent::ReferAnswered { call, status: 408 }]
        );
        assert_eq!(h.uas.call_count(), 1);
    }

    #[test]
    fn sipfrag_status_lines() {
        assert_eq!(
            sipfrag_status(b"SIP/2.0 180 Ringing\r\n"),
            Some((180, "Ringing".into()))
        );
        assert_eq!(sipfrag_status(b"SIP/2.0 603"), Some((603, String::new())));
        assert_eq!(sipfrag_status(b"SIP/2.0 99 Low"), None);
        assert_eq!(sipfrag_status(b"HTTP/1.1 200 OK"), None);
        assert_eq!(sipfrag_status(&[0xff, 0xfe]), None);
        let long = format!("SIP/2.0 200 {}", "x".repeat(500));
        assert_eq!(
            sipfrag_status(long.as_bytes()).unwrap().1.len(),
            MAX_SIPFRAG_REASON
        );
    }

    #[test]
    fn hangup_sends_bye() {
        let mut h = Harness::new();
        let call = h.incoming();
        let tag = h.answer(call);
        // Hangup before the ACK waits for it (RFC 3261 15).
        h.uas.handle_action(call, UasAction::Hangup, h.now).unwrap();
        assert!(h.sent().is_empty());
        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        assert_eq!(h.events(), vec![UasEvent::Ack { call }]);
        let sent = h.sent();
        let [Message::Request(bye)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(bye.method, Method::Bye);
        // Unanswered BYE is retransmitted (Timer E) until the phone answers.
        let log = h.run_until(600);
        assert_eq!(log.len(), 1);
        let ok = Response::to_request(bye, 200, None);
        h.feed_raw(&String::from_utf8(ok.to_bytes()).unwrap());
        assert_eq!(h.uas.call_count(), 0);
        // Hangup before the answer rejects with 480.
        let mut h = Harness::new();
        let call = h.incoming();
        h.uas.handle_action(call, UasAction::Hangup, h.now).unwrap();
        assert_eq!(h.statuses(), vec![480]);
    }

    #[test]
    fn reinvite_changing_ptime_is_answered_and_reported() {
        let mut h = Harness::new();
        let call = h.incoming();
        let tag = h.answer(call);
        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        h.events();
        // Each is answered with the offered ptime within 10-60 ms, else 20; and reported.
        let changes = [("30", 30), ("10", 10), ("60", 60), ("90", 20), ("20", 20)];
        for (cseq, (ptime, answered)) in (2..).zip(changes) {
            let sdp =
                offer_sdp("0 101", "sendrecv").replace("a=ptime:20", &format!("a=ptime:{ptime}"));
            let branch = format!("re{ptime}");
            h.feed(&Req::new("INVITE", &branch, cseq).tag(&tag).body(sdp));
            let sent = h.sent();
            let Some(Message::Response(ok)) = sent.last() else {
                panic!("{sent:?}");
            };
            assert_eq!(ok.status, 200);
            let body = String::from_utf8(ok.body.clone()).unwrap();
            assert!(body.contains(&format!("a=ptime:{answered}\r\n")), "{body}");
            let events = h.events();
            let [UasEvent::MediaUpdated { negotiated, .. }] = events.as_slice() else {
                panic!("{events:?}");
            };
            assert_eq!(negotiated.ptime, answered, "offered {ptime}");
            h.feed(&Req::new("ACK", &format!("ack{ptime}"), cseq).tag(&tag));
            assert!(h.sent().is_empty());
            h.events();
        }
    }

    #[test]
    fn reinvite_hold_and_resume() {
        let mut h = Harness::new();
        let call = h.incoming();
        let tag = h.answer(call);
        h.feed(&Req::new("ACK", "ack1", 1).tag(&tag));
        h.events();
        // Re-INVITE before the dialog is confirmed would be 491; here it is confirmed.
        h.feed(
            &Req::new("INVITE", "re1", 2)
                .tag(&tag)
                .body(offer_sdp("0 101", "sendonly")),
        );
        let sent = h.sent();
        let [Message::Response(trying), Message::Response(ok)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!((trying.status, ok.status), (100, 200));
        let body = String::from_utf8(ok.body.clone()).unwrap();
        assert!(body.contains("a=recvonly\r\n"), "{body}");
        // The o= version moved on from the first answer.
        assert!(body.contains("o=telcoflow 99 100 "), "{body}");
        let events = h.events();
        let [
            UasEvent::MediaUpdated {
                call: c,
                negotiated,
            },
        ] = events.as_slice()
        else {
            panic!("{events:?}");
        };
        assert_eq!(*c, call);
        assert!(negotiated.remote_hold);
        assert_eq!(negotiated.direction, Direction::RecvOnly);
        // A second re-INVITE before the ACK of the first: 491.
        h.feed(
            &Req::new("INVITE", "re2", 3)
                .tag(&tag)
                .body(offer_sdp("0", "sendrecv")),
        );
        assert_eq!(h.statuses(), vec![491]);
        // Its ACK (same branch, non-2xx) stops the 491 retransmissions.
        h.feed(&Req::new("ACK", "re2", 3).tag(&tag));
        assert!(h.sent().is_empty());
        h.feed(&Req::new("ACK", "ack2", 2).tag(&tag));
        assert!(h.sent().is_empty());
        // Resume, now that the first is acknowledged; the 200 stops after the ACK.
        h.feed(
            &Req::new("INVITE", "re3", 4)
                .tag(&tag)
                .body(offer_sdp("0", "sendrecv")),
        );
        assert_eq!(h.statuses(), vec![100, 200]);
        let events = h.events();
        let [UasEvent::MediaUpdated { negotiated, .. }] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert!(!negotiated.remote_hold);
        h.feed(&Req::new("ACK", "ack3", 4).tag(&tag));
        assert!(h.run_until(40_000).is_empty());
        // A re-INVITE without a common codec fails alone; the call goes on.
        h.feed(
            &Req::new("INVITE", "re4", 5)
                .tag(&tag)
                .body(offer_sdp("18", "sendrecv")),
        );
        assert_eq!(h.statuses(), vec![100, 488]);
        assert_eq!(h.uas.call_count(), 1);
    }

    #[test]
    fn offerless_invite_gets_our_offer_and_the_ack_answers() {
        let mut h = Harness::new();
        h.feed(&Req::new("INVITE", "inv1", 1));
        assert_eq!(h.statuses(), vec![100]);
        let events = h.events();
        let [UasEvent::IncomingCall(ic)] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert_eq!(ic.offer, None);
        let call = ic.call;
        let media = h.media();
        let n = h
            .uas
            .handle_action(call, UasAction::Answer { media }, h.now)
            .unwrap();
        assert_eq!(n, None);
        let sent = h.sent();
        let [Message::Response(ok)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        let body = String::from_utf8(ok.body.clone()).unwrap();
        assert!(body.contains("m=audio 30000 RTP/AVP 0 8 9 101"), "{body}");
        let tag = ok.header_to().unwrap().tag().unwrap().to_string();
        h.feed(
            &Req::new("ACK", "ack1", 1)
                .tag(&tag)
                .body(offer_sdp("8 101", "sendrecv")),
        );
        let events = h.events();
        let [
            UasEvent::Ack { .. },
            UasEvent::MediaUpdated { negotiated, .. },
        ] = events.as_slice()
        else {
            panic!("{events:?}");
        };
        assert_eq!(negotiated.codec, Codec::Pcma);
    }

    /// Under `required` we offer RTP/SAVP in the 200; a plain answer in the ACK leaves the
    /// call without media (and without an RTP timeout): the call ends with a BYE.
    #[test]
    fn an_unusable_answer_in_the_ack_ends_the_call() {
        let mut h = Harness::new();
        h.feed(&Req::new("INVITE", "inv1", 1));
        assert_eq!(h.statuses(), vec![100]);
        let events = h.events();
        let [UasEvent::IncomingCall(ic)] = events.as_slice() else {
            panic!("{events:?}");
        };
        let call = ic.call;
        let mut media = h.media();
        media.srtp = Some(sdp::LocalSrtp::new(
            sdp::SrtpPolicy::Required,
            crate::rtp::srtp::MasterKey::random(),
        ));
        h.uas
            .handle_action(call, UasAction::Answer { media }, h.now)
            .unwrap();
        let sent = h.sent();
        let [Message::Response(ok)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert!(String::from_utf8_lossy(&ok.body).contains("RTP/SAVP"));
        let tag = ok.header_to().unwrap().tag().unwrap().to_string();
        h.feed(
            &Req::new("ACK", "ack1", 1)
                .tag(&tag)
                .body(offer_sdp("8 101", "sendrecv")),
        );
        assert_eq!(
            h.events(),
            [UasEvent::Ack { call }, UasEvent::AnswerUnusable { call }]
        );
        let sent = h.sent();
        let [Message::Request(bye)] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(bye.method, Method::Bye);
    }

    #[test]
    fn actions_in_the_wrong_state() {
        let mut h = Harness::new();
        let call = h.incoming();
        let _ = h.answer(call);
        assert_eq!(
            h.uas.handle_action(call, UasAction::Ringing, h.now),
            Err(ActionError::InvalidState)
        );
        assert_eq!(
            h.uas
                .handle_action(CallHandle(999), UasAction::Ringing, h.now),
            Err(ActionError::UnknownCall)
        );
    }
}
