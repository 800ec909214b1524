//! One outgoing call as a SIP user agent client, sans-IO: INVITE with our SDP offer, digest
//! authentication retry on 401/407, ringing, answer with ACK, CANCEL, BYE in both directions.
//!
//! Run loop: [`OutgoingCall::new`] queues the INVITE. Feed every message whose Call-ID is
//! [`OutgoingCall::call_id`] to [`OutgoingCall::handle_input`] (responses to our requests and
//! the callee's in-dialog requests), actions to [`OutgoingCall::cancel`] and
//! [`OutgoingCall::hangup`], and timers to [`OutgoingCall::handle_timeout`] at
//! [`OutgoingCall::poll_timeout`]. After each, drain [`OutgoingCall::poll_transmit`] (always
//! towards the configured destination over the given transport) and
//! [`OutgoingCall::poll_event`]. Drop the call once [`OutgoingCall::is_finished`].
//!
//! Dialects (RFC 3262, 4028, 3264): the INVITE says `Supported: 100rel, timer`. A reliable
//! provisional response (`Require: 100rel` with an `RSeq`) is answered with PRACK in its early
//! dialog, in RSeq order; forked responses (To tags) each have their early dialog, with its own
//! RSeq, target, route set and early media (at most 8), and the 2xx takes
//! those of its own. A provisional response with SDP is the callee's early media
//! ([`UacEvent::EarlyMedia`]); a 200 without SDP after it keeps those media. With
//! [`UacConfig::session_expires`] the INVITE asks for a session timer (`Min-SE: 90`; a 422
//! raises it to the callee's `Min-SE` and retries): when the 200 makes us the refresher we send
//! UPDATE every half interval (a re-INVITE with our offer to a callee whose `Allow` lacks
//! UPDATE, or after a 405/501 to one), else we end the call (BYE,
//! [`UacEvent::SessionExpired`]) when no refresh came by the interval less min(32 s, a third).
//! The interval granted is held between our `Min-SE` and what we asked (a callee's own
//! refresh: under a day); a refused refresh is tried again in 2.1-4 s until the session
//! expires. With [`UacConfig::delayed_offer`] the
//! INVITE has no SDP: the callee offers in its 200 and our answer goes in the ACK, or offers
//! in a reliable provisional response and our answer goes in the PRACK (early media then).
//!
//! The ring timeout is the owner's: call [`OutgoingCall::cancel`] when it expires. A CANCEL
//! asked before any provisional response waits for one (RFC 3261 9.1); if none comes, the
//! INVITE's Timer B ends the call with a 408. If no final response follows a CANCEL within
//! 64·T1 the call ends with 487, and an answer arriving later still is ACKed and ended.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use super::digest::{self, Credentials};
use super::message::{BRANCH_MAGIC, CSeq, Headers, Message, Method, Request, Response, SipHeaders};
use super::sdp::{self, LocalMedia, Negotiated, SessionDescription};
use super::session_timer::{self, MIN_SE, Refresher};
use super::transaction::{
    InviteClientTransaction, InviteServerTransaction, NonInviteClientTransaction,
    NonInviteServerTransaction, Timers, TransactionEvent, TransactionKey,
};
use super::{Transmit, Transport};

/// How many times one call answers authentication challenges before giving up.
const MAX_AUTH_ATTEMPTS: u32 = 2;
/// How many times one call retries after `422 Session Interval Too Small`.
const MAX_SESSION_RETRIES: u32 = 2;
/// The session interval our INVITE asks for by default (RFC 4028 suggests 1800 s).
pub const DEFAULT_SESSION_EXPIRES: Duration = Duration::from_secs(1800);
/// The largest `Min-SE` a 422 may raise our ask to (a day): a larger one fails the call.
const MAX_SESSION_EXPIRES: Duration = Duration::from_secs(86_400);
/// Lowers the shortest session interval acted on, our `Min-SE` otherwise, for the whole
/// process: for tests that cannot wait 45 s for a refresh. Never called by the server.
#[doc(hidden)]
pub fn lower_session_floor_for_tests(floor: Duration) {
    let ms = u64::try_from(floor.as_millis()).unwrap_or(u64::MAX);
    SESSION_FLOOR_OVERRIDE_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// See [`lower_session_floor_for_tests`]; 0 when not lowered.
static SESSION_FLOOR_OVERRIDE_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Settings for an outgoing call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UacConfig {
    /// Request-URI and To, e.g. `sip:+15550100@trunk.example`.
    pub target: String,
    /// Where to send (the trunk or phone; resolved by the owner).
    pub destination: SocketAddr,
    /// Transport to use.
    pub transport: Transport,
    /// Our From URI (the caller id), e.g. `sip:+15550199@telcoflow.example`.
    pub from: String,
    /// Our Contact URI.
    pub contact: String,
    /// Our Via sent-by, `host:port`.
    pub sent_by: String,
    /// Credentials for 401/407 challenges.
    pub credentials: Option<Credentials>,
    /// Transaction timers.
    pub timers: Timers,
    /// `User-Agent` header value.
    pub user_agent: String,
    /// Send the INVITE without SDP (delayed offer): the callee offers in its 200 and our
    /// answer goes in the ACK.
    pub delayed_offer: bool,
    /// The session interval the INVITE asks for (`Session-Expires`, RFC 4028, with
    /// `Min-SE: 90`); `None` asks for no session timer.
    pub session_expires: Option<Duration>,
}

/// What the owner must act on. Exhaustive on purpose: an owner that ignored a new kind of
/// event would lose a call, so adding one is a breaking change its owners must handle.
#[derive(Debug, Clone, PartialEq)]
pub enum UacEvent {
    /// A provisional response (180 Ringing, 183 Session Progress).
    Progress {
        /// Its status.
        status: u16,
    },
    /// The callee answered; media parameters are negotiated. ACK has been sent.
    Answered {
        /// Media parameters.
        negotiated: Negotiated,
    },
    /// The call failed before being answered: the final status (408 for no response, 487
    /// after our CANCEL, 488 for an unusable answer). The call is finished.
    Failed {
        /// Final status.
        status: u16,
        /// Reason phrase.
        reason: String,
    },
    /// A provisional response (183, 180) carried SDP: the callee's early media, to play
    /// before the answer. Comes again when a later provisional response changes them.
    EarlyMedia {
        /// Media parameters.
        negotiated: Negotiated,
    },
    /// The session timer ran out (RFC 4028): the callee did not refresh in time, or our
    /// refresh was answered 408/481 or not at all. BYE has been sent; the call is finished.
    SessionExpired,
    /// The callee re-negotiated media (re-INVITE or UPDATE).
    MediaUpdated {
        /// New parameters.
        negotiated: Negotiated,
    },
    /// The callee hung up. The call is finished.
    RemoteHangup,
    /// Our BYE completed (answered or timed out). The call is finished.
    HungUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Calling,
    Ringing,
    Answered,
    Terminating,
    Finished,
}

/// The session timer of an answered call.
#[derive(Debug, Clone, Copy)]
struct SessionTimer {
    interval: Duration,
    /// We refresh (UPDATE every half interval); else the callee does, and we end the call at
    /// the expiry.
    we_refresh: bool,
    /// When to refresh or end the call; `None` while our refresh awaits its answer.
    due: Option<Instant>,
    /// When the session ends without a refresh (RFC 4028 10; for us as the refresher, the
    /// last refresh plus the interval): retries of a refused refresh stop there.
    expires_at: Instant,
}

/// The dialog state a request in it needs: the callee's tag, target and route set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Dialog {
    remote_tag: Option<String>,
    remote_target: Option<String>,
    route_set: Vec<String>,
}

impl Dialog {
    /// The dialog a response creates (an early one from a provisional response).
    fn of(r: &Response) -> Self {
        // A UAC takes the Record-Route set in reverse (RFC 3261 12.1.2).
        let mut route_set: Vec<String> = r
            .headers
            .values("Record-Route")
            .map(str::to_string)
            .collect();
        route_set.reverse();
        Self {
            remote_tag: r.header_to().ok().and_then(|t| t.tag().map(str::to_string)),
            // The target becomes the Request-URI of our requests in the dialog: a Contact
            // that does not parse (a blank in its URI, say) is ignored.
            remote_target: r.contact().ok().flatten().map(|c| c.uri),
            route_set,
        }
    }
}

/// An early dialog (RFC 3262 4): forked provisional responses with different To tags each
/// have their own RSeq space, target and early media.
#[derive(Debug, Clone)]
struct EarlyDialog {
    dialog: Dialog,
    /// The highest RSeq of its reliable provisional responses we PRACKed.
    last_rseq: Option<u32>,
    /// Its early media (a provisional response's SDP).
    media: Option<Negotiated>,
}

/// How many early dialogs (forks) one call keeps; provisional responses of more are only
/// reported as progress.
const MAX_EARLY_DIALOGS: usize = 8;

/// The methods we take in a dialog, for `Allow`. Not PRACK: we send no reliable provisional
/// response for one to acknowledge, and answer it 405.
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE";

/// One outgoing call. See the module docs.
#[derive(Debug)]
pub struct OutgoingCall {
    config: UacConfig,
    media: LocalMedia,
    rng: StdRng,
    state: State,
    call_id: String,
    local_tag: String,
    /// The dialog, once a 2xx has confirmed it.
    dialog: Dialog,
    /// The early dialogs of the provisional responses so far.
    early_dialogs: Vec<EarlyDialog>,
    /// Other forks that answered too, by To tag, with the ACK for their 2xx's resends.
    extra_answers: Vec<(Option<String>, Request)>,
    cseq: u32,
    auth_attempts: u32,
    /// The current INVITE transaction (a new one per authentication retry). Only `None`
    /// while `new` builds the first request.
    invite: Option<InviteClientTransaction>,
    /// Time of the latest input, for transactions created while handling it.
    last_now: Instant,
    ack: Option<Request>,
    cancel_pending: bool,
    cancelled: bool,
    /// After a CANCEL, when to stop waiting for the INVITE's final response (RFC 3261 9.1).
    give_up_at: Option<Instant>,
    clients: Vec<NonInviteClientTransaction>,
    servers: Vec<(TransactionKey, NonInviteServerTransaction)>,
    reinvites: Vec<(TransactionKey, InviteServerTransaction)>,
    transmits: VecDeque<Message>,
    events: VecDeque<UacEvent>,
    /// The early media last reported (of whichever early dialog sent them).
    early: Option<Negotiated>,
    /// The session interval the INVITE asks for, and its `Min-SE` (both raised by a 422).
    session_expires: Option<Duration>,
    min_se: Duration,
    session_retries: u32,
    /// The 422s to our refreshes since the last refresh that went through.
    refresh_retries: u32,
    /// The latest challenge answered (its header name for the answer) and the nonce count
    /// of its latest use, to answer it anew in a retry after 422.
    challenge: Option<(&'static str, digest::Challenge, u32)>,
    /// The session timer in force once answered.
    session: Option<SessionTimer>,
    /// The callee takes UPDATE (its 200 lists it in `Allow`, or has no `Allow`): our
    /// refreshes are UPDATEs, else re-INVITEs.
    peer_allows_update: bool,
    /// Our refreshing re-INVITE, and the ACK of its 2xx.
    refresh_invite: Option<InviteClientTransaction>,
    refresh_ack: Option<Request>,
}

impl OutgoingCall {
    /// Starts the call: queues the INVITE with an offer for `media`. `seed` drives the
    /// Call-ID, tags and branches.
    pub fn new(config: UacConfig, media: LocalMedia, seed: u64, now: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let host = config.sent_by.split(':').next().unwrap_or("telcoflow");
        let call_id = format!("{:016x}@{host}", rng.random::<u64>());
        let local_tag = format!("{:016x}", rng.random::<u64>());
        let cseq = rng.random_range(1..10_000);
        let mut call = Self {
            invite: None,
            last_now: now,
            config,
            media,
            rng,
            state: State::Calling,
            call_id,
            local_tag,
            dialog: Dialog::default(),
            early_dialogs: Vec::new(),
            extra_answers: Vec::new(),
            cseq,
            auth_attempts: 0,
            ack: None,
            cancel_pending: false,
            cancelled: false,
            give_up_at: None,
            clients: Vec::new(),
            servers: Vec::new(),
            reinvites: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            early: None,
            session_expires: None,
            min_se: MIN_SE,
            session_retries: 0,
            refresh_retries: 0,
            challenge: None,
            session: None,
            peer_allows_update: true,
            refresh_invite: None,
            refresh_ack: None,
        };
        call.session_expires = call.config.session_expires;
        let invite = call.build_invite(None);
        call.invite = Some(InviteClientTransaction::new(
            invite,
            call.config.transport.reliable(),
            call.config.timers,
            now,
        ));
        call.drain_invite();
        call
    }

    /// The SIP Call-ID (route incoming messages by it).
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// Whether the call is over and its last requests (ACK, BYE) are done, so it can be
    /// dropped.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished && self.clients.is_empty()
    }

    /// The next message to send to [`UacConfig::destination`].
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front().map(|m| Transmit {
            transport: self.config.transport,
            destination: self.config.destination,
            payload: m.to_bytes(),
        })
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<UacEvent> {
        self.events.pop_front()
    }

    /// When [`OutgoingCall::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.invite
            .as_ref()
            .and_then(InviteClientTransaction::poll_timeout)
            .into_iter()
            .chain(self.clients.iter().filter_map(|t| t.poll_timeout()))
            .chain(self.servers.iter().filter_map(|(_, t)| t.poll_timeout()))
            .chain(self.reinvites.iter().filter_map(|(_, t)| t.poll_timeout()))
            .chain(self.give_up_at.filter(|_| self.is_ringing()))
            .chain(
                self.session
                    .and_then(|t| t.due)
                    .filter(|_| self.state == State::Answered),
            )
            .chain(
                self.refresh_invite
                    .as_ref()
                    .and_then(InviteClientTransaction::poll_timeout),
            )
            .min()
    }

    fn branch(&mut self) -> String {
        format!("{BRANCH_MAGIC}{:016x}", self.rng.random::<u64>())
    }

    fn via(&mut self) -> String {
        let branch = self.branch();
        format!(
            "SIP/2.0/{} {};branch={branch};rport",
            self.config.transport.via_name(),
            self.config.sent_by
        )
    }

    fn local_party(&self) -> String {
        format!("<{}>;tag={}", self.config.from, self.local_tag)
    }

    fn remote_party(&self, dialog: &Dialog) -> String {
        match &dialog.remote_tag {
            Some(tag) => format!("<{}>;tag={tag}", self.config.target),
            None => format!("<{}>", self.config.target),
        }
    }

    fn build_invite(&mut self, authorization: Option<(&'static str, String)>) -> Request {
        let via = self.via();
        let mut r = Request::new(Method::Invite, self.config.target.clone());
        r.headers.push("Via", via);
        r.headers.push("Max-Forwards", "70");
        r.headers.push("From", self.local_party());
        // No To tag: a retry after 401/407/422 starts afresh, whatever early dialogs its
        // predecessor had.
        r.headers.push("To", format!("<{}>", self.config.target));
        r.headers.push("Call-ID", self.call_id.clone());
        r.headers.push(
            "CSeq",
            CSeq {
                seq: self.cseq,
                method: Method::Invite,
            }
            .to_string(),
        );
        r.headers
            .push("Contact", format!("<{}>", self.config.contact));
        r.headers.push("Allow", ALLOW);
        match self.session_expires {
            Some(interval) => {
                r.headers.push("Supported", "100rel, timer");
                r.headers
                    .push("Session-Expires", interval.as_secs().to_string());
                r.headers.push("Min-SE", self.min_se.as_secs().to_string());
            }
            None => r.headers.push("Supported", "100rel"),
        }
        r.headers.push("User-Agent", self.config.user_agent.clone());
        if let Some((name, value)) = authorization {
            r.headers.push(name, value);
        }
        if self.config.delayed_offer {
            return r;
        }
        r.with_body("application/sdp", sdp::offer(&self.media).to_string())
    }

    /// Sends the INVITE again with a new CSeq (after a challenge or a 422). The old
    /// transaction has ACKed the final response itself; its remaining job (absorbing resent
    /// responses) is not worth keeping it for.
    fn retry_invite(&mut self, authorization: Option<(&'static str, String)>) {
        // The new INVITE's responses start new early dialogs (RFC 3261 8.1.3.5: a new
        // request outside any dialog).
        self.dialog = Dialog::default();
        self.early_dialogs.clear();
        self.early = None;
        self.cseq += 1;
        let invite = self.build_invite(authorization);
        let mut tx = InviteClientTransaction::new(
            invite,
            self.config.transport.reliable(),
            self.config.timers,
            self.last_now,
        );
        while let Some(m) = tx.poll_transmit() {
            self.transmits.push_back(m);
        }
        self.invite = Some(tx);
    }

    /// A request in the confirmed dialog (ACK, BYE, INFO, refreshes) per RFC 3261 12.2.1.1.
    fn dialog_request(&mut self, method: Method, seq: u32) -> Request {
        let dialog = self.dialog.clone();
        self.request_in(&dialog, method, seq)
    }

    /// A request in `dialog`, confirmed or early (PRACK).
    fn request_in(&mut self, dialog: &Dialog, method: Method, seq: u32) -> Request {
        let via = self.via();
        let uri = dialog
            .remote_target
            .clone()
            .unwrap_or_else(|| self.config.target.clone());
        let mut r = Request::new(method.clone(), uri);
        r.headers.push("Via", via);
        r.headers.push("Max-Forwards", "70");
        r.headers.push("From", self.local_party());
        r.headers.push("To", self.remote_party(dialog));
        r.headers.push("Call-ID", self.call_id.clone());
        r.headers.push("CSeq", CSeq { seq, method }.to_string());
        for route in &dialog.route_set {
            r.headers.push("Route", route.clone());
        }
        r.headers.push("User-Agent", self.config.user_agent.clone());
        r
    }

    /// Handles one received message for this call.
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        self.last_now = now;
        match Message::parse(bytes) {
            Ok(Message::Response(r)) => self.handle_response(r, now),
            Ok(Message::Request(r)) => self.handle_request(r, now),
            Err(err) => tracing::debug!(cause = %err, "dropping unparseable SIP message"),
        }
    }

    fn handle_response(&mut self, response: Response, now: Instant) {
        let Ok(key) = TransactionKey::for_response(&response) else {
            return;
        };
        if let Some(invite) = &mut self.invite {
            if TransactionKey::for_sent_request(invite.request()).ok() == Some(key.clone()) {
                invite.handle_response(response, now);
                self.drain_invite();
                return;
            }
        }
        if let Some(tx) = &mut self.refresh_invite {
            if TransactionKey::for_sent_request(tx.request()).ok() == Some(key.clone()) {
                tx.handle_response(response, now);
                self.drain_refresh_invite();
                return;
            }
        }
        if let Some(tx) = self
            .clients
            .iter_mut()
            .find(|t| TransactionKey::for_sent_request(t.request()).ok().as_ref() == Some(&key))
        {
            tx.handle_response(response, now);
        }
        self.drain_clients();
    }

    fn drain_invite(&mut self) {
        let Some(invite) = &mut self.invite else {
            return;
        };
        let mut events = Vec::new();
        while let Some(m) = invite.poll_transmit() {
            self.transmits.push_back(m);
        }
        while let Some(event) = invite.poll_event() {
            events.push(event);
        }
        for event in events {
            match event {
                TransactionEvent::Response(r) => self.on_invite_response(r),
                TransactionEvent::Timeout => self.fail(408, "Request Timeout"),
                _ => {}
            }
        }
    }

    fn fail(&mut self, status: u16, reason: &str) {
        if matches!(self.state, State::Calling | State::Ringing) {
            self.state = State::Finished;
            self.events.push_back(UacEvent::Failed {
                status,
                reason: reason.to_string(),
            });
        }
    }

    fn on_invite_response(&mut self, r: Response) {
        let status = r.status;
        if status < 200 {
            if self.state == State::Calling {
                self.state = State::Ringing;
            }
            if self.cancel_pending {
                self.cancel_pending = false;
                self.send_cancel();
            }
            if status > 100 {
                self.events.push_back(UacEvent::Progress { status });
                self.on_provisional(&r);
            }
            return;
        }
        if status < 300 {
            self.on_2xx(r);
            return;
        }
        if (status == 401 || status == 407)
            && !self.cancelled
            && self.auth_attempts < MAX_AUTH_ATTEMPTS
        {
            if let (true, Some((header, challenge))) =
                (self.config.credentials.is_some(), digest::challenge_of(&r))
            {
                self.auth_attempts += 1;
                self.challenge = Some((header, challenge, 0));
                let authorization = self.authorization();
                self.retry_invite(authorization);
                return;
            }
        }
        if status == 422 && !self.cancelled && self.session_retries < MAX_SESSION_RETRIES {
            // RFC 4028 7.3: ask again with the callee's Min-SE.
            let min_se = r
                .headers
                .get("Min-SE")
                .and_then(session_timer::parse_min_se);
            if let (Some(asked), Some(min_se)) = (self.session_expires, min_se) {
                if min_se > asked && min_se <= MAX_SESSION_EXPIRES {
                    self.session_retries += 1;
                    self.session_expires = Some(min_se);
                    self.min_se = min_se;
                    let authorization = self.authorization();
                    self.retry_invite(authorization);
                    return;
                }
            }
        }
        self.fail(status, &r.reason);
    }

    /// The credentials header answering the latest challenge, with a fresh cnonce and the
    /// next nonce count (RFC 7616 3.4: each use of a nonce counts up).
    fn authorization(&mut self) -> Option<(&'static str, String)> {
        let creds = self.config.credentials.clone()?;
        let cnonce = format!("{:016x}", self.rng.random::<u64>());
        let (header, challenge, nc) = self.challenge.as_mut()?;
        *nc += 1;
        let value = digest::authorize(
            challenge,
            &creds,
            &Method::Invite,
            &self.config.target,
            &cnonce,
            *nc,
        );
        Some((header, value))
    }

    /// A provisional response past 100: PRACK when it is reliable, early media when it
    /// carries SDP, each in the early dialog of its To tag.
    fn on_provisional(&mut self, r: &Response) {
        let Some(i) = self.early_dialog(r) else {
            tracing::debug!("too many early dialogs; provisional response only reported");
            return;
        };
        let reliable = session_timer::lists(&r.headers, "Require", "100rel");
        let rseq = r
            .headers
            .get("RSeq")
            .and_then(|v| v.trim().parse::<u32>().ok());
        if let (true, Some(rseq)) = (reliable, rseq) {
            let early = &mut self.early_dialogs[i];
            // In order only (RFC 3262 4): a resend is PRACKed by our PRACK's own
            // transaction, and one out of order comes again once its predecessor is in.
            if early
                .last_rseq
                .is_some_and(|last| Some(rseq) != last.checked_add(1))
            {
                return;
            }
            early.last_rseq = Some(rseq);
            let dialog = early.dialog.clone();
            let invite_seq = r.cseq().map(|c| c.seq).unwrap_or(self.cseq);
            self.cseq += 1;
            let mut prack = self.request_in(&dialog, Method::Prack, self.cseq);
            prack
                .headers
                .push("RAck", format!("{rseq} {invite_seq} INVITE"));
            // A delayed offer's callee may offer in a reliable provisional response: the
            // answer goes in the PRACK (RFC 3262 5), and its media play early.
            let offers = self.config.delayed_offer
                && self.early_dialogs[i].media.is_none()
                && !r.body.is_empty();
            if offers && !self.cancelled {
                let outcome = SessionDescription::parse_bytes(&r.body)
                    .map_err(sdp::NegotiationError::from)
                    .and_then(|offer| sdp::answer(&offer, &self.media));
                match outcome {
                    Ok((answer, negotiated)) => {
                        prack = prack.with_body("application/sdp", answer.to_string());
                        self.early_dialogs[i].media = Some(negotiated);
                        self.early = Some(negotiated);
                        self.events.push_back(UacEvent::EarlyMedia { negotiated });
                    }
                    Err(err) => {
                        tracing::debug!(cause = %err, "offer in a provisional response not usable")
                    }
                }
            }
            let tx = NonInviteClientTransaction::new(
                prack,
                self.config.transport.reliable(),
                self.config.timers,
                self.last_now,
            );
            self.clients.push(tx);
            self.drain_clients();
        }
        // With a delayed offer, SDP in an unreliable provisional response is an offer the 200
        // repeats: no early media then.
        if self.config.delayed_offer || self.cancelled || r.body.is_empty() {
            return;
        }
        let negotiated = SessionDescription::parse_bytes(&r.body)
            .map_err(sdp::NegotiationError::from)
            .and_then(|sd| sdp::accept_answer(&self.media, &sd));
        match negotiated {
            Ok(negotiated) => {
                self.early_dialogs[i].media = Some(negotiated);
                if self.early != Some(negotiated) {
                    self.early = Some(negotiated);
                    self.events.push_back(UacEvent::EarlyMedia { negotiated });
                }
            }
            Err(err) => tracing::debug!(cause = %err, "early media SDP not usable; ignored"),
        }
    }

    /// The index of the early dialog of a provisional response's To tag, created with the
    /// response's target and route set when new; `None` past `MAX_EARLY_DIALOGS`.
    fn early_dialog(&mut self, r: &Response) -> Option<usize> {
        let tag = r.header_to().ok().and_then(|t| t.tag().map(str::to_string));
        if let Some(i) = self
            .early_dialogs
            .iter()
            .position(|d| d.dialog.remote_tag == tag)
        {
            return Some(i);
        }
        if self.early_dialogs.len() >= MAX_EARLY_DIALOGS {
            return None;
        }
        self.early_dialogs.push(EarlyDialog {
            dialog: Dialog::of(r),
            last_rseq: None,
            media: None,
        });
        Some(self.early_dialogs.len() - 1)
    }

    fn is_ringing(&self) -> bool {
        matches!(self.state, State::Calling | State::Ringing)
    }

    fn on_2xx(&mut self, r: Response) {
        let first = self.ack.is_none();
        // With a delayed offer, the 200's offer and our answer (which the ACK carries).
        let mut offered = None;
        // The early media of the 2xx's own early dialog, not of another fork's.
        let mut early = None;
        let tag = r.header_to().ok().and_then(|t| t.tag().map(str::to_string));
        if !first && tag != self.dialog.remote_tag {
            self.on_extra_answer(&r, tag);
            return;
        }
        if first {
            // The first 2xx establishes the dialog.
            self.dialog = Dialog::of(&r);
            early = self
                .early_dialogs
                .iter()
                .find(|d| d.dialog.remote_tag == self.dialog.remote_tag)
                .and_then(|d| d.media);
            let seq = r.cseq().map(|c| c.seq).unwrap_or(self.cseq);
            let mut ack = self.dialog_request(Method::Ack, seq);
            if let (true, Some(early)) = (self.config.delayed_offer, early) {
                // Offer and answer are done (the answer went in a PRACK): the ACK has none.
                offered = Some(Ok(early));
            } else if self.config.delayed_offer && self.is_ringing() && !self.cancelled {
                let outcome = SessionDescription::parse_bytes(&r.body)
                    .map_err(sdp::NegotiationError::from)
                    .and_then(|offer| sdp::answer(&offer, &self.media));
                offered = Some(match outcome {
                    Ok((answer, negotiated)) => {
                        ack = ack.with_body("application/sdp", answer.to_string());
                        Ok(negotiated)
                    }
                    Err(err) => Err(err),
                });
            }
            self.ack = Some(ack);
        }
        // Every 2xx, first or resent, gets the ACK (13.2.2.4).
        if let Some(ack) = &self.ack {
            self.transmits.push_back(Message::Request(ack.clone()));
        }
        if !self.is_ringing() {
            if first && self.cancelled {
                // An answer after we gave up on a CANCEL: end the call it opened.
                self.send_bye(true);
            }
            return;
        }
        let negotiated = match (offered, early) {
            (Some(outcome), _) => outcome,
            // The answer came with the early media already (RFC 3261 13.2.1: the 200 may
            // repeat it or carry none).
            (None, Some(early)) if r.body.is_empty() => Ok(early),
            (None, _) => SessionDescription::parse_bytes(&r.body)
                .map_err(sdp::NegotiationError::from)
                .and_then(|sd| sdp::accept_answer(&self.media, &sd)),
        };
        match (negotiated, self.cancelled) {
            (Ok(negotiated), false) => {
                self.state = State::Answered;
                self.peer_allows_update = r.headers.get("Allow").is_none()
                    || session_timer::lists(&r.headers, "Allow", "UPDATE");
                self.arm_session_timer(&r.headers, false);
                self.events.push_back(UacEvent::Answered { negotiated });
            }
            (Err(err), false) => {
                // Answered with something we cannot use: confirm, then end it.
                self.fail(err.status_code(), &err.to_string());
                self.send_bye(true);
            }
            (_, true) => {
                // Our CANCEL lost the race with the answer: end the call.
                self.fail(487, "Request Terminated");
                self.send_bye(true);
            }
        }
    }

    /// A 2xx from a fork other than the one that answered first (RFC 3261 13.2.2.4): its
    /// dialog is confirmed with an ACK and ended with a BYE; its resends get the ACK again.
    /// Past [`MAX_EARLY_DIALOGS`] such forks, a 2xx is ignored (its sender gives up on the
    /// ACK and ends the call itself).
    fn on_extra_answer(&mut self, r: &Response, tag: Option<String>) {
        if let Some((_, ack)) = self.extra_answers.iter().find(|(t, _)| *t == tag) {
            self.transmits.push_back(Message::Request(ack.clone()));
            return;
        }
        if self.extra_answers.len() >= MAX_EARLY_DIALOGS {
            return;
        }
        let fork = Dialog::of(r);
        let seq = r.cseq().map(|c| c.seq).unwrap_or(self.cseq);
        let ack = self.request_in(&fork, Method::Ack, seq);
        self.transmits.push_back(Message::Request(ack.clone()));
        self.extra_answers.push((tag, ack));
        self.cseq += 1;
        let bye = self.request_in(&fork, Method::Bye, self.cseq);
        let tx = NonInviteClientTransaction::new(
            bye,
            self.config.transport.reliable(),
            self.config.timers,
            self.last_now,
        );
        self.clients.push(tx);
        self.drain_clients();
    }

    fn send_cancel(&mut self) {
        let Some(invite) = &self.invite else {
            return;
        };
        let cancel = invite.request().cancel();
        let tx = NonInviteClientTransaction::new(
            cancel,
            self.config.transport.reliable(),
            self.config.timers,
            self.last_now,
        );
        self.clients.push(tx);
        self.drain_clients();
    }

    /// Sends an INFO in the answered call's dialog (`application/dtmf-relay` DTMF, say); its
    /// answer changes nothing. Ignored before the answer and after the hang-up.
    pub fn info(&mut self, content_type: &str, body: String, now: Instant) {
        self.last_now = now;
        if self.state != State::Answered {
            return;
        }
        self.cseq += 1;
        let info = self
            .dialog_request(Method::Info, self.cseq)
            .with_body(content_type, body);
        let tx = NonInviteClientTransaction::new(
            info,
            self.config.transport.reliable(),
            self.config.timers,
            now,
        );
        self.clients.push(tx);
        self.drain_clients();
    }

    fn send_bye(&mut self, silent: bool) {
        self.cseq += 1;
        let bye = self.dialog_request(Method::Bye, self.cseq);
        let tx = NonInviteClientTransaction::new(
            bye,
            self.config.transport.reliable(),
            self.config.timers,
            self.last_now,
        );
        self.clients.push(tx);
        if !silent {
            self.state = State::Terminating;
        }
        self.drain_clients();
    }

    fn drain_clients(&mut self) {
        let mut finished_bye = false;
        // Final outcomes of our session refreshes (`None`: no answer).
        let mut refreshes = Vec::new();
        for tx in &mut self.clients {
            while let Some(m) = tx.poll_transmit() {
                self.transmits.push_back(m);
            }
            while let Some(event) = tx.poll_event() {
                let outcome = match event {
                    TransactionEvent::Response(r) if r.status >= 200 => Some(Some(r)),
                    TransactionEvent::Timeout => Some(None),
                    _ => None,
                };
                let Some(outcome) = outcome else {
                    continue;
                };
                match tx.request().method {
                    // Ours, not a BYE ending another fork's answer.
                    Method::Bye
                        if tx
                            .request()
                            .header_to()
                            .ok()
                            .and_then(|t| t.tag().map(str::to_string))
                            == self.dialog.remote_tag =>
                    {
                        finished_bye = true
                    }
                    Method::Update => refreshes.push(outcome),
                    _ => {}
                }
            }
        }
        self.clients.retain(|t| !t.is_terminated());
        if finished_bye && self.state == State::Terminating {
            self.state = State::Finished;
            self.events.push_back(UacEvent::HungUp);
        }
        for outcome in refreshes {
            self.on_refresh_answered(outcome);
        }
    }

    /// Sets the session timer from the `Session-Expires` of a 2xx to our request (`uac` is
    /// us) or of the callee's refresh (`peer_request`: `uac` is the callee; without a
    /// refresher it goes on refreshing). No `Session-Expires`: no timer. Returns the headers
    /// for our 2xx to a callee's refresh.
    fn arm_session_timer(
        &mut self,
        headers: &Headers,
        peer_request: bool,
    ) -> Vec<(&'static str, String)> {
        let Some((interval, refresher)) = headers
            .get("Session-Expires")
            .and_then(session_timer::parse_session_expires)
        else {
            self.session = None;
            return Vec::new();
        };
        // The interval is the peer's number: bound it before it meets an Instant. A 2xx to
        // our request may only lower what we asked (RFC 4028 7.4); the callee's own refresh
        // is held to our maximum.
        let ceiling = if peer_request {
            MAX_SESSION_EXPIRES
        } else {
            self.session
                .map(|t| t.interval)
                .or(self.session_expires)
                .unwrap_or(MAX_SESSION_EXPIRES)
                .min(MAX_SESSION_EXPIRES)
        };
        // Nor less than our Min-SE (RFC 4028: the peer may not go below it), else a callee
        // granting 2 s would have a refresh every second.
        let floor = match SESSION_FLOOR_OVERRIDE_MS.load(std::sync::atomic::Ordering::Relaxed) {
            0 => self.min_se,
            ms => self.min_se.min(Duration::from_millis(ms)),
        };
        let interval = interval.min(ceiling).max(floor);
        let we_refresh = if peer_request {
            refresher == Some(Refresher::Uas)
        } else {
            refresher != Some(Refresher::Uas)
        };
        let now = self.last_now;
        let due = if we_refresh {
            later(now, interval / 2)
        } else {
            // Bounded above: no overflow.
            session_timer::expiry(interval, now)
        };
        self.session = Some(SessionTimer {
            interval,
            we_refresh,
            due: Some(due),
            expires_at: if we_refresh {
                later(now, interval)
            } else {
                due
            },
        });
        let mut reply = vec![(
            "Session-Expires",
            format!(
                "{};refresher={}",
                interval.as_secs(),
                if we_refresh { "uas" } else { "uac" }
            ),
        )];
        if session_timer::lists(headers, "Supported", "timer")
            || session_timer::lists(headers, "Require", "timer")
        {
            reply.push(("Require", "timer".into()));
        }
        reply
    }

    /// Refreshes the session with an UPDATE (no SDP: the media stay as they are), or with a
    /// re-INVITE offering our media again when the callee does not take UPDATE.
    fn send_refresh(&mut self) {
        let Some(timer) = &mut self.session else {
            return;
        };
        timer.due = None;
        let interval = timer.interval;
        self.cseq += 1;
        let method = if self.peer_allows_update {
            Method::Update
        } else {
            Method::Invite
        };
        let mut refresh = self.dialog_request(method.clone(), self.cseq);
        refresh.headers.push(
            "Session-Expires",
            format!("{};refresher=uac", interval.as_secs()),
        );
        refresh
            .headers
            .push("Min-SE", self.min_se.as_secs().to_string());
        refresh.headers.push("Supported", "timer");
        refresh
            .headers
            .push("Contact", format!("<{}>", self.config.contact));
        if method == Method::Invite {
            refresh.headers.push("Allow", ALLOW);
            let offer = sdp::offer(&self.media).to_string();
            let mut tx = InviteClientTransaction::new(
                refresh.with_body("application/sdp", offer),
                self.config.transport.reliable(),
                self.config.timers,
                self.last_now,
            );
            while let Some(m) = tx.poll_transmit() {
                self.transmits.push_back(m);
            }
            self.refresh_invite = Some(tx);
            self.refresh_ack = None;
            return;
        }
        let tx = NonInviteClientTransaction::new(
            refresh,
            self.config.transport.reliable(),
            self.config.timers,
            self.last_now,
        );
        self.clients.push(tx);
        self.drain_clients();
    }

    /// What our refreshing re-INVITE's transaction sends and hears: every 2xx is ACKed (the
    /// first one's answer may change the media), the final outcome goes to
    /// [`OutgoingCall::on_refresh_answered`].
    fn drain_refresh_invite(&mut self) {
        let Some(tx) = &mut self.refresh_invite else {
            return;
        };
        while let Some(m) = tx.poll_transmit() {
            self.transmits.push_back(m);
        }
        let events: Vec<TransactionEvent> = std::iter::from_fn(|| tx.poll_event()).collect();
        if tx.is_terminated() {
            self.refresh_invite = None;
        }
        for event in events {
            match event {
                TransactionEvent::Response(r) if (200..300).contains(&r.status) => {
                    let first = self.refresh_ack.is_none();
                    if first {
                        let seq = r.cseq().map(|c| c.seq).unwrap_or(self.cseq);
                        self.refresh_ack = Some(self.dialog_request(Method::Ack, seq));
                    }
                    if let Some(ack) = &self.refresh_ack {
                        self.transmits.push_back(Message::Request(ack.clone()));
                    }
                    if !first {
                        continue;
                    }
                    let answer = SessionDescription::parse_bytes(&r.body)
                        .map_err(sdp::NegotiationError::from)
                        .and_then(|sd| sdp::accept_answer(&self.media, &sd));
                    if let Ok(negotiated) = answer {
                        self.events.push_back(UacEvent::MediaUpdated { negotiated });
                    }
                    self.on_refresh_answered(Some(r));
                }
                TransactionEvent::Response(r) if r.status >= 300 => {
                    self.on_refresh_answered(Some(r));
                }
                TransactionEvent::Timeout => self.on_refresh_answered(None),
                _ => {}
            }
        }
    }

    /// Our refresh's final answer (RFC 4028 10): a 2xx sets the timer anew; a 422 retries
    /// with its Min-SE (a bounded number of times); 408, 481 or none ends the call; 405 or
    /// 501 to an UPDATE turns to re-INVITE at once; another refusal (491, say) tries again
    /// in a few seconds, until the session expires.
    fn on_refresh_answered(&mut self, outcome: Option<Response>) {
        if self.state != State::Answered {
            return;
        }
        let Some(r) = outcome else {
            return self.expire();
        };
        match r.status {
            200..=299 => {
                self.refresh_retries = 0;
                self.arm_session_timer(&r.headers, false);
            }
            422 => {
                let min_se = r
                    .headers
                    .get("Min-SE")
                    .and_then(session_timer::parse_min_se);
                match (self.session, min_se) {
                    (Some(mut timer), Some(min_se))
                        if min_se > timer.interval
                            && min_se <= MAX_SESSION_EXPIRES
                            && self.refresh_retries < MAX_SESSION_RETRIES =>
                    {
                        self.refresh_retries += 1;
                        self.min_se = min_se;
                        timer.interval = min_se;
                        self.session = Some(timer);
                        self.send_refresh();
                    }
                    _ => self.refresh_later(),
                }
            }
            408 | 481 => self.expire(),
            405 | 501
                if self.peer_allows_update
                    && r.cseq().is_ok_and(|c| c.method == Method::Update) =>
            {
                // The callee does not take UPDATE after all (its 200 had no Allow).
                self.peer_allows_update = false;
                self.send_refresh();
            }
            status => {
                tracing::debug!(status, "session refresh refused; trying again later");
                self.refresh_later();
            }
        }
    }

    /// Tries the refresh again in 2.1 to 4 s (RFC 3261 14.1's pause after a 491, as good
    /// after any refusal), or ends the call when the session expires first.
    fn refresh_later(&mut self) {
        let delay = Duration::from_millis(self.rng.random_range(2100..=4000));
        let now = self.last_now;
        if let Some(timer) = &mut self.session {
            timer.due = Some(later(now, delay).min(timer.expires_at));
        }
    }

    /// Ends the answered call for want of a refresh: BYE and [`UacEvent::SessionExpired`].
    fn expire(&mut self) {
        if self.state != State::Answered {
            return;
        }
        self.session = None;
        self.state = State::Finished;
        self.events.push_back(UacEvent::SessionExpired);
        self.send_bye(true);
    }

    fn handle_request(&mut self, request: Request, now: Instant) {
        self.last_now = now;
        let Ok(key) = TransactionKey::for_request(&request) else {
            return;
        };
        // Retransmissions.
        if let Some((_, tx)) = self.servers.iter_mut().find(|(k, _)| *k == key) {
            tx.handle_request(request, now);
            self.drain_servers();
            return;
        }
        if let Some((_, tx)) = self.reinvites.iter_mut().find(|(k, _)| *k == key) {
            tx.handle_request(request, now);
            self.drain_servers();
            return;
        }
        let ours = request
            .header_to()
            .ok()
            .and_then(|t| t.tag().map(str::to_string))
            == Some(self.local_tag.clone())
            && request
                .header_from()
                .ok()
                .and_then(|f| f.tag().map(str::to_string))
                == self.dialog.remote_tag;
        if request.method == Method::Ack {
            // ACK for a re-INVITE 2xx we sent: stop its retransmissions.
            let seq = request.cseq().map(|c| c.seq).ok();
            for (_, tx) in &mut self.reinvites {
                if tx.request().cseq().map(|c| c.seq).ok() == seq {
                    tx.handle_request(request.clone(), now);
                }
            }
            self.drain_servers();
            return;
        }
        let status = if !ours || request.validate().is_err() {
            481
        } else {
            match request.method {
                Method::Bye => 200,
                Method::Invite | Method::Update => {
                    self.handle_offer(key, request, now);
                    return;
                }
                Method::Options | Method::Info => 200,
                _ => 405,
            }
        };
        let mut response = Response::to_request(&request, status, Some(&self.local_tag));
        if status == 405 {
            // RFC 3261 21.4.6: a 405 says what is allowed.
            response.headers.push("Allow", ALLOW);
        }
        let is_bye = request.method == Method::Bye;
        let mut tx = NonInviteServerTransaction::new(
            request,
            self.config.transport.reliable(),
            self.config.timers,
            now,
        );
        tx.send_response(response, now);
        self.servers.push((key, tx));
        self.drain_servers();
        if is_bye && status == 200 && self.state == State::Answered {
            self.state = State::Finished;
            self.events.push_back(UacEvent::RemoteHangup);
        }
    }

    /// A re-INVITE or UPDATE from the callee: a new offer to answer (an UPDATE may carry
    /// none), and a session refresh when the call has a timer or the request asks for one.
    fn handle_offer(&mut self, key: TransactionKey, request: Request, now: Instant) {
        let outcome = if request.method == Method::Update && request.body.is_empty() {
            Ok(None)
        } else {
            self.media.session_version += 1;
            SessionDescription::parse_bytes(&request.body)
                .map_err(sdp::NegotiationError::from)
                .and_then(|offer| sdp::answer(&offer, &self.media))
                .map(Some)
        };
        let response = match outcome {
            Ok(answer) => {
                let mut r = Response::to_request(&request, 200, Some(&self.local_tag));
                if let Some((sd, negotiated)) = answer {
                    self.events.push_back(UacEvent::MediaUpdated { negotiated });
                    r = r.with_body("application/sdp", sd.to_string());
                }
                r.headers
                    .push("Contact", format!("<{}>", self.config.contact));
                if self.state == State::Answered {
                    for (name, value) in self.arm_session_timer(&request.headers, true) {
                        r.headers.push(name, value);
                    }
                }
                r
            }
            Err(err) => Response::to_request(&request, err.status_code(), Some(&self.local_tag))
                .with_reason(err.to_string()),
        };
        if request.method == Method::Update {
            let mut tx = NonInviteServerTransaction::new(
                request,
                self.config.transport.reliable(),
                self.config.timers,
                now,
            );
            tx.send_response(response, now);
            self.servers.push((key, tx));
        } else {
            let mut tx = InviteServerTransaction::new(
                request,
                self.config.transport.reliable(),
                self.config.timers,
                now,
            );
            tx.send_response(response, now);
            self.reinvites.push((key, tx));
        }
        self.drain_servers();
    }

    fn drain_servers(&mut self) {
        for (_, tx) in &mut self.servers {
            while let Some(m) = tx.poll_transmit() {
                self.transmits.push_back(m);
            }
            while tx.poll_event().is_some() {}
        }
        for (_, tx) in &mut self.reinvites {
            while let Some(m) = tx.poll_transmit() {
                self.transmits.push_back(m);
            }
            while tx.poll_event().is_some() {}
        }
        self.servers.retain(|(_, t)| !t.is_terminated());
        self.reinvites.retain(|(_, t)| !t.is_terminated());
    }

    /// Gives up ringing (ring timeout, or the app cancelled): CANCEL now, or once the first
    /// provisional response arrives. The call ends with `Failed { status: 487 }`.
    pub fn cancel(&mut self, now: Instant) {
        self.last_now = now;
        if self.cancelled || !matches!(self.state, State::Calling | State::Ringing) {
            return;
        }
        self.cancelled = true;
        self.give_up_at = Some(now + self.config.timers.t1 * 64);
        if self.state == State::Ringing {
            self.send_cancel();
        } else {
            self.cancel_pending = true;
        }
    }

    /// Ends an answered call with BYE (finishes with [`UacEvent::HungUp`]); before the
    /// answer, the same as [`OutgoingCall::cancel`].
    pub fn hangup(&mut self, now: Instant) {
        self.last_now = now;
        match self.state {
            State::Calling | State::Ringing => self.cancel(now),
            State::Answered => self.send_bye(false),
            State::Terminating | State::Finished => {}
        }
    }

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        if self.is_ringing() && self.give_up_at.is_some_and(|t| t <= now) {
            // The callee never answered the INVITE after our CANCEL.
            self.fail(487, "Request Terminated");
        }
        if let Some(timer) = self.session.filter(|_| self.state == State::Answered) {
            if timer.due.is_some_and(|t| t <= now) {
                if timer.we_refresh && now < timer.expires_at {
                    self.send_refresh();
                } else {
                    tracing::info!("session not refreshed by the callee; ending the call");
                    self.expire();
                }
            }
        }
        if let Some(invite) = &mut self.invite {
            if invite.poll_timeout().is_some_and(|t| t <= now) {
                invite.handle_timeout(now);
                self.drain_invite();
            }
        }
        if let Some(tx) = &mut self.refresh_invite {
            if tx.poll_timeout().is_some_and(|t| t <= now) {
                tx.handle_timeout(now);
                self.drain_refresh_invite();
            }
        }
        for tx in &mut self.clients {
            if tx.poll_timeout().is_some_and(|t| t <= now) {
                tx.handle_timeout(now);
            }
        }
        self.drain_clients();
        for (_, tx) in &mut self.servers {
            if tx.poll_timeout().is_some_and(|t| t <= now) {
                tx.handle_timeout(now);
            }
        }
        for (_, tx) in &mut self.reinvites {
            if tx.poll_timeout().is_some_and(|t| t <= now) {
                tx.handle_timeout(now);
            }
        }
        self.drain_servers();
    }
}

/// `now` plus `delay`, saturating far in the future instead of overflowing.
fn later(now: Instant, delay: Duration) -> Instant {
    now.checked_add(delay)
        .or_else(|| now.checked_add(MAX_SESSION_EXPIRES))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::codec::Codec;
    use crate::sip::sdp::Direction;
    use std::time::Duration;

    const TRUNK: &str = "192.0.2.80:5060";

    fn config(credentials: Option<Credentials>) -> UacConfig {
        UacConfig {
            target: "sip:+15550100@trunk.example".into(),
            destination: TRUNK.parse().unwrap(),
            transport: Transport::Udp,
            from: "sip:+15550199@telcoflow.example".into(),
            contact: "sip:telcoflow@203.0.113.1:5060".into(),
            sent_by: "203.0.113.1:5060".into(),
            credentials,
            timers: Timers::default(),
            user_agent: "telcoflow".into(),
            delayed_offer: false,
            session_expires: None,
        }
    }

    fn media() -> LocalMedia {
        LocalMedia::new("203.0.113.1".parse().unwrap(), 30000, 5)
    }

    fn callee_sdp(direction: &str) -> String {
        format!(
            "v=0\r\no=callee 1 1 IN IP4 192.0.2.90\r\ns=-\r\nc=IN IP4 192.0.2.90\r\nt=0 0\r\n\
m=audio 50000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a={direction}\r\n"
        )
    }

    struct Harness {
        call: OutgoingCall,
        now: Instant,
        start: Instant,
    }

    impl Harness {
        fn new(credentials: Option<Credentials>) -> Self {
            Self::with(config(credentials))
        }
        fn with(config: UacConfig) -> Self {
            let now = Instant::now();
            Self {
                call: OutgoingCall::new(config, media(), 3, now),
                now,
                start: now,
            }
        }
        /// A response with extra headers.
        fn respond_with(
            &mut self,
            to: &Request,
            status: u16,
            headers: &[(&str, &str)],
            body: Option<String>,
        ) {
            let mut r = Response::to_request(to, status, Some("callee9"));
            r.headers.push("Contact", "<sip:callee@192.0.2.90:5070>");
            for (name, value) in headers {
                r.headers.push(name, *value);
            }
            if let Some(b) = body {
                r = r.with_body("application/sdp", b);
            }
            self.call.handle_input(&r.to_bytes(), self.now);
        }
        fn sent(&mut self) -> Vec<Request> {
            std::iter::from_fn(|| self.call.poll_transmit())
                .map(|t| {
                    assert_eq!(t.destination, TRUNK.parse().unwrap());
                    match Message::parse(&t.payload).unwrap() {
                        Message::Request(r) => r,
                        Message::Response(r) => panic!("unexpected response {}", r.status),
                    }
                })
                .collect()
        }
        fn sent_responses(&mut self) -> Vec<u16> {
            std::iter::from_fn(|| self.call.poll_transmit())
                .map(|t| match Message::parse(&t.payload).unwrap() {
                    Message::Response(r) => r.status,
                    Message::Request(r) => panic!("unexpected request {}", r.method),
                })
                .collect()
        }
        fn events(&mut self) -> Vec<UacEvent> {
            std::iter::from_fn(|| self.call.poll_event()).collect()
        }
        fn respond(&mut self, to: &Request, status: u16, body: Option<String>) {
            let mut r = Response::to_request(to, status, Some("callee9"));
            r.headers.push("Contact", "<sip:callee@192.0.2.90:5070>");
            r.headers
                .push("Record-Route", "<sip:p1.example;lr>, <sip:p2.example;lr>");
            if let Some(b) = body {
                r = r.with_body("application/sdp", b);
            }
            self.call.handle_input(&r.to_bytes(), self.now);
        }
        fn request_from_callee(&mut self, method: &str, cseq: u32, body: Option<String>) {
            let body = body.unwrap_or_default();
            let text = format!(
                "{method} sip:telcoflow@203.0.113.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.90:5070;branch=z9hG4bKcallee{cseq}\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15550100@trunk.example>;tag=callee9\r\n\
To: <sip:+15550199@telcoflow.example>;tag={}\r\n\
Call-ID: {}\r\n\
CSeq: {cseq} {method}\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{body}",
                self.call.local_tag,
                self.call.call_id,
                body.len()
            );
            self.call.handle_input(text.as_bytes(), self.now);
        }
        /// An in-dialog request from the callee with extra headers and no body.
        fn request_from_callee_with(&mut self, method: &str, cseq: u32, headers: &[(&str, &str)]) {
            let mut text = format!(
                "{method} sip:telcoflow@203.0.113.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.90:5070;branch=z9hG4bKcallee{cseq}\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15550100@trunk.example>;tag=callee9\r\n\
To: <sip:+15550199@telcoflow.example>;tag={}\r\n\
Call-ID: {}\r\n\
CSeq: {cseq} {method}\r\n",
                self.call.local_tag, self.call.call_id,
            );
            for (name, value) in headers {
                text.push_str(&format!("{name}: {value}\r\n"));
            }
            text.push_str("Content-Length: 0\r\n\r\n");
            self.call.handle_input(text.as_bytes(), self.now);
        }
        /// Runs timers up to `ms` until the call sends a request; the clock stays there.
        fn next_request(&mut self, ms: u64) -> Option<(u64, Request)> {
            let until = self.start + Duration::from_millis(ms);
            while let Some(at) = self.call.poll_timeout() {
                if at > until {
                    break;
                }
                self.now = at;
                self.call.handle_timeout(at);
                if let Some(r) = self.sent().into_iter().next() {
                    return Some(((at - self.start).as_millis() as u64, r));
                }
            }
            None
        }
        fn run_until(&mut self, ms: u64) -> Vec<(u64, Request)> {
            let until = self.start + Duration::from_millis(ms);
            let mut out = Vec::new();
            while let Some(at) = self.call.poll_timeout() {
                if at > until {
                    break;
                }
                self.now = at;
                self.call.handle_timeout(at);
                for r in self.sent() {
                    out.push(((at - self.start).as_millis() as u64, r));
                }
            }
            self.now = until;
            out
        }
        /// Runs the call to the answer; returns the INVITE.
        fn answered(&mut self) -> Request {
            let invite = self.sent().remove(0);
            self.respond(&invite, 180, None);
            self.respond(&invite, 200, Some(callee_sdp("sendrecv")));
            self.sent();
            self.events();
            invite
        }
    }

    #[test]
    fn dial_ring_answer_ack_hangup() {
        let mut h = Harness::new(None);
        let sent = h.sent();
        let [invite] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        invite.validate().unwrap();
        assert_eq!(invite.uri, "sip:+15550100@trunk.example");
        assert_eq!(invite.header_to().unwrap().tag(), None);
        assert!(invite.header_from().unwrap().tag().is_some());
        assert_eq!(invite.call_id().unwrap(), h.call.call_id());
        let body = String::from_utf8(invite.body.clone()).unwrap();
        assert!(body.contains("m=audio 30000 RTP/AVP 0 8 9 101"), "{body}");

        h.respond(invite, 100, None);
        h.respond(invite, 180, None);
        assert_eq!(h.events(), vec![UacEvent::Progress { status: 180 }]);
        h.respond(invite, 200, Some(callee_sdp("sendrecv")));
        let events = h.events();
        let [UacEvent::Answered { negotiated }] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert_eq!(negotiated.codec, Codec::Pcma);
        assert_eq!(negotiated.remote, "192.0.2.90:50000".parse().unwrap());
        let sent = h.sent();
        let [ack] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, "sip:callee@192.0.2.90:5070");
        assert_eq!(ack.header_to().unwrap().tag(), Some("callee9"));
        assert_eq!(ack.cseq().unwrap().seq, invite.cseq().unwrap().seq);
        assert_ne!(
            ack.top_via().unwrap().branch(),
            invite.top_via().unwrap().branch()
        );
        // Routes in reverse order of Record-Route.
        let routes: Vec<&str> = ack.headers.values("Route").collect();
        assert_eq!(routes, vec!["<sip:p2.example;lr>", "<sip:p1.example;lr>"]);
        // A resent 200 is ACKed again, without a new event.
        h.respond(invite, 200, Some(callee_sdp("sendrecv")));
        assert_eq!(h.sent().len(), 1);
        assert!(h.events().is_empty());

        h.call.hangup(h.now);
        let sent = h.sent();
        let [bye] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(bye.method, Method::Bye);
        assert!(bye.cseq().unwrap().seq > invite.cseq().unwrap().seq);
        let ok = Response::to_request(bye, 200, None);
        h.call.handle_input(&ok.to_bytes(), h.now);
        assert_eq!(h.events(), vec![UacEvent::HungUp]);
        // Finished once Timer K has absorbed late responses.
        assert!(!h.call.is_finished());
        h.run_until(10_000);
        assert!(h.call.is_finished());
    }

    #[test]
    fn a_contact_with_blanks_is_not_used_as_the_target() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        let mut ok = Response::to_request(&invite, 200, Some("callee9"))
            .with_body("application/sdp", callee_sdp("sendrecv"));
        ok.headers.push("Contact", "<sip:callee @192.0.2.90:5070>");
        h.call.handle_input(&ok.to_bytes(), h.now);
        let sent = h.sent();
        let [ack] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, "sip:+15550100@trunk.example");
    }

    #[test]
    fn digest_challenge_is_answered_once_per_attempt() {
        let creds = Credentials {
            username: "1000".into(),
            password: "secret".into(),
        };
        let mut h = Harness::new(Some(creds));
        let invite = h.sent().remove(0);
        let mut challenge = Response::to_request(&invite, 407, Some("trunk"));
        challenge.headers.push(
            "Proxy-Authenticate",
            "Digest realm=\"trunk.example\", nonce=\"n1\", qop=\"auth\"",
        );
        h.call.handle_input(&challenge.to_bytes(), h.now);
        let sent = h.sent();
        let [ack, retry] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(retry.method, Method::Invite);
        assert_eq!(retry.cseq().unwrap().seq, invite.cseq().unwrap().seq + 1);
        let auth = retry.headers.get("Proxy-Authorization").unwrap();
        assert!(
            auth.starts_with("Digest username=\"1000\", realm=\"trunk.example\", nonce=\"n1\"")
        );
        assert!(auth.contains("qop=auth"));
        assert!(h.events().is_empty());
        // The retry is challenged again, then once more: give up after two attempts.
        let mut again = Response::to_request(retry, 407, Some("trunk"));
        again.headers.push(
            "Proxy-Authenticate",
            "Digest realm=\"trunk.example\", nonce=\"n2\"",
        );
        h.call.handle_input(&again.to_bytes(), h.now);
        let third = h.sent().pop().unwrap();
        assert_eq!(third.method, Method::Invite);
        let mut last = Response::to_request(&third, 407, Some("trunk"));
        last.headers.push(
            "Proxy-Authenticate",
            "Digest realm=\"trunk.example\", nonce=\"n3\"",
        );
        h.call.handle_input(&last.to_bytes(), h.now);
        assert_eq!(h.sent().len(), 1); // only the ACK
        assert_eq!(
            h.events(),
            vec![UacEvent::Failed {
                status: 407,
                reason: "Proxy Authentication Required".into()
            }]
        );
    }

    #[test]
    fn challenge_without_credentials_fails() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        let mut challenge = Response::to_request(&invite, 401, Some("trunk"));
        challenge
            .headers
            .push("WWW-Authenticate", "Digest realm=\"r\", nonce=\"n\"");
        h.call.handle_input(&challenge.to_bytes(), h.now);
        assert!(matches!(
            h.events().as_slice(),
            [UacEvent::Failed { status: 401, .. }]
        ));
    }

    #[test]
    fn cancel_waits_for_a_provisional_then_ends_with_487() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        h.call.cancel(h.now);
        assert!(
            h.sent().is_empty(),
            "no CANCEL before a provisional response"
        );
        h.respond(&invite, 180, None);
        let sent = h.sent();
        let [cancel] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(
            cancel.top_via().unwrap().branch(),
            invite.top_via().unwrap().branch()
        );
        assert_eq!(cancel.cseq().unwrap().seq, invite.cseq().unwrap().seq);
        h.call
            .handle_input(&Response::to_request(cancel, 200, None).to_bytes(), h.now);
        h.respond(&invite, 487, None);
        let sent = h.sent();
        assert!(matches!(sent.as_slice(), [ack] if ack.method == Method::Ack));
        let events = h.events();
        assert_eq!(events[0], UacEvent::Progress { status: 180 });
        assert!(matches!(events[1], UacEvent::Failed { status: 487, .. }));
    }

    #[test]
    fn answer_racing_a_cancel_is_acked_and_ended() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        h.respond(&invite, 180, None);
        h.call.cancel(h.now);
        h.sent();
        h.respond(&invite, 200, Some(callee_sdp("sendrecv")));
        let methods: Vec<Method> = h.sent().into_iter().map(|r| r.method).collect();
        assert_eq!(methods, vec![Method::Ack, Method::Bye]);
        assert!(matches!(
            h.events().as_slice(),
            [
                UacEvent::Progress { .. },
                UacEvent::Failed { status: 487, .. }
            ]
        ));
    }

    #[test]
    fn cancel_without_any_final_response_gives_up_after_64_t1() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        h.respond(&invite, 180, None);
        h.call.cancel(h.now);
        h.sent();
        // The callee never answers the CANCEL nor the INVITE.
        h.run_until(40_000);
        assert!(matches!(
            h.events().as_slice(),
            [
                UacEvent::Progress { .. },
                UacEvent::Failed { status: 487, .. }
            ]
        ));
        assert!(h.call.is_finished());
        // A very late 200 is ACKed and ended with BYE.
        h.respond(&invite, 200, Some(callee_sdp("sendrecv")));
        let methods: Vec<Method> = h.sent().into_iter().map(|r| r.method).collect();
        assert_eq!(methods, vec![Method::Ack, Method::Bye]);
        assert!(h.events().is_empty());
    }

    #[test]
    fn no_response_times_out_with_408() {
        let mut h = Harness::new(None);
        h.sent();
        let log = h.run_until(40_000);
        let resends: Vec<u64> = log.iter().map(|(t, _)| *t).collect();
        assert_eq!(resends, vec![500, 1500, 3500, 7500, 15500, 31500]);
        assert!(matches!(
            h.events().as_slice(),
            [UacEvent::Failed { status: 408, .. }]
        ));
        assert!(h.call.is_finished());
    }

    #[test]
    fn busy_is_acked_and_reported() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        h.respond(&invite, 486, None);
        assert!(matches!(h.sent().as_slice(), [ack] if ack.method == Method::Ack));
        assert_eq!(
            h.events(),
            vec![UacEvent::Failed {
                status: 486,
                reason: "Busy Here".into()
            }]
        );
    }

    #[test]
    fn callee_hangs_up() {
        let mut h = Harness::new(None);
        h.answered();
        h.request_from_callee("BYE", 50, None);
        assert_eq!(h.sent_responses(), vec![200]);
        assert_eq!(h.events(), vec![UacEvent::RemoteHangup]);
        // A resent BYE gets the same answer.
        h.request_from_callee("BYE", 50, None);
        assert_eq!(h.sent_responses(), vec![200]);
        assert!(h.call.is_finished());
    }

    #[test]
    fn callee_puts_the_call_on_hold() {
        let mut h = Harness::new(None);
        h.answered();
        h.request_from_callee("INVITE", 51, Some(callee_sdp("sendonly")));
        assert_eq!(h.sent_responses(), vec![100, 200]);
        let events = h.events();
        let [UacEvent::MediaUpdated { negotiated }] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert!(negotiated.remote_hold);
        assert_eq!(negotiated.direction, Direction::RecvOnly);
        // Its ACK stops the 200 retransmissions.
        h.request_from_callee("ACK", 51, None);
        assert!(h.run_until(40_000).is_empty());
    }

    fn timed(session_expires: u64) -> UacConfig {
        UacConfig {
            session_expires: Some(Duration::from_secs(session_expires)),
            ..config(None)
        }
    }

    #[test]
    fn early_media_of_a_183_play_until_a_200_without_sdp() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        assert_eq!(invite.headers.get("Supported"), Some("100rel"));
        assert!(invite.headers.get("Session-Expires").is_none());
        h.respond(&invite, 183, Some(callee_sdp("sendrecv")));
        let events = h.events();
        let [
            UacEvent::Progress { status: 183 },
            UacEvent::EarlyMedia { negotiated: early },
        ] = events.as_slice()
        else {
            panic!("{events:?}");
        };
        assert_eq!(early.remote, "192.0.2.90:50000".parse().unwrap());
        assert_eq!(early.codec, Codec::Pcma);
        // The same SDP again (a 180 repeating it) is no news.
        h.respond(&invite, 180, Some(callee_sdp("sendrecv")));
        assert_eq!(h.events(), vec![UacEvent::Progress { status: 180 }]);
        h.respond(&invite, 200, None);
        let events = h.events();
        let [UacEvent::Answered { negotiated }] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert_eq!(negotiated, early);
        assert!(matches!(h.sent().as_slice(), [ack] if ack.method == Method::Ack));
    }

    #[test]
    fn early_media_then_a_refusal_fails_the_call() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        h.respond(&invite, 183, Some(callee_sdp("sendrecv")));
        h.respond(&invite, 486, None);
        let events = h.events();
        assert!(
            matches!(
                events.as_slice(),
                [
                    UacEvent::Progress { .. },
                    UacEvent::EarlyMedia { .. },
                    UacEvent::Failed { status: 486, .. }
                ]
            ),
            "{events:?}"
        );
        assert!(h.call.is_finished());
    }

    #[test]
    fn a_reliable_183_is_pracked_once_in_its_early_dialog() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        let reliable = [("Require", "100rel"), ("RSeq", "7")];
        h.respond_with(&invite, 183, &reliable, Some(callee_sdp("sendrecv")));
        let sent = h.sent();
        let [prack] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(prack.method, Method::Prack);
        prack.validate().unwrap();
        assert_eq!(prack.uri, "sip:callee@192.0.2.90:5070");
        assert_eq!(prack.header_to().unwrap().tag(), Some("callee9"));
        let invite_seq = invite.cseq().unwrap().seq;
        assert_eq!(
            prack.headers.get("RAck"),
            Some(format!("7 {invite_seq} INVITE").as_str())
        );
        assert!(prack.cseq().unwrap().seq > invite_seq);
        // Its resend is not PRACKed again (the PRACK's transaction resends itself).
        h.respond_with(&invite, 183, &reliable, Some(callee_sdp("sendrecv")));
        assert!(h.sent().is_empty());
        // A new reliable response is.
        h.respond_with(&invite, 180, &[("Require", "100rel"), ("RSeq", "8")], None);
        let sent = h.sent();
        assert!(
            matches!(sent.as_slice(), [p] if p.headers.get("RAck") == Some(format!("8 {invite_seq} INVITE").as_str())),
            "{sent:?}"
        );
        let ok = Response::to_request(&sent[0], 200, None);
        h.call.handle_input(&ok.to_bytes(), h.now);
        // The 200 to the INVITE still gets the INVITE's ACK.
        h.respond(&invite, 200, None);
        let sent = h.sent();
        assert!(
            matches!(sent.as_slice(), [ack] if ack.method == Method::Ack && ack.cseq().unwrap().seq == invite_seq),
            "{sent:?}"
        );
        assert!(matches!(h.events().last(), Some(UacEvent::Answered { .. })));
    }

    #[test]
    fn the_invite_asks_for_a_session_timer_and_we_refresh_by_update() {
        let mut h = Harness::with(timed(1800));
        let invite = h.sent().remove(0);
        assert_eq!(invite.headers.get("Supported"), Some("100rel, timer"));
        assert_eq!(invite.headers.get("Session-Expires"), Some("1800"));
        assert_eq!(invite.headers.get("Min-SE"), Some("90"));
        assert!(
            invite.headers.values("Allow").any(|m| m == "UPDATE"),
            "{invite:?}"
        );
        h.respond_with(
            &invite,
            200,
            &[
                ("Session-Expires", "120;refresher=uac"),
                ("Require", "timer"),
            ],
            Some(callee_sdp("sendrecv")),
        );
        h.sent();
        h.events();
        // Half the interval: 60 s.
        assert!(h.run_until(59_999).is_empty());
        let log = h.run_until(60_000);
        let [(60_000, update)] = log.as_slice() else {
            panic!("{log:?}");
        };
        assert_eq!(update.method, Method::Update);
        update.validate().unwrap();
        assert_eq!(
            update.headers.get("Session-Expires"),
            Some("120;refresher=uac")
        );
        assert!(update.body.is_empty());
        assert_eq!(update.uri, "sip:callee@192.0.2.90:5070");
        // Answered, the next refresh is half an interval later.
        let mut ok = Response::to_request(update, 200, None);
        ok.headers.push("Session-Expires", "120;refresher=uac");
        h.call.handle_input(&ok.to_bytes(), h.now);
        let log = h.run_until(120_000);
        let [(120_000, again)] = log.as_slice() else {
            panic!("{log:?}");
        };
        assert_eq!(again.method, Method::Update);
        // No answer at all (Timer F, 64·T1): the call is over.
        let log = h.run_until(200_000);
        assert!(log.iter().any(|(_, r)| r.method == Method::Bye), "{log:?}");
        assert_eq!(h.events(), vec![UacEvent::SessionExpired]);
    }

    #[test]
    fn a_silent_refresher_is_hung_up_on_and_a_refresh_keeps_the_call() {
        let mut h = Harness::with(timed(1800));
        let invite = h.sent().remove(0);
        h.respond_with(
            &invite,
            200,
            &[("Session-Expires", "90;refresher=uas")],
            Some(callee_sdp("sendrecv")),
        );
        h.sent();
        h.events();
        // The callee refreshes with an UPDATE at 40 s: answered with the timer.
        h.run_until(40_000);
        let body = String::new();
        let update = format!(
            "UPDATE sip:telcoflow@203.0.113.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.90:5070;branch=z9hG4bKupd1\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15550100@trunk.example>;tag=callee9\r\n\
To: <sip:+15550199@telcoflow.example>;tag={}\r\n\
Call-ID: {}\r\n\
CSeq: 60 UPDATE\r\n\
Supported: timer\r\n\
Session-Expires: 90;refresher=uac\r\n\
Content-Length: {}\r\n\r\n{body}",
            h.call.local_tag,
            h.call.call_id,
            body.len()
        );
        h.call.handle_input(update.as_bytes(), h.now);
        let sent: Vec<Response> = std::iter::from_fn(|| h.call.poll_transmit())
            .map(|t| match Message::parse(&t.payload).unwrap() {
                Message::Response(r) => r,
                Message::Request(r) => panic!("unexpected {}", r.method),
            })
            .collect();
        let [ok] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ok.status, 200);
        assert_eq!(ok.headers.get("Session-Expires"), Some("90;refresher=uac"));
        assert_eq!(ok.headers.get("Require"), Some("timer"));
        // Not at 60 s (90 - 30) after the answer: 60 s after the refresh, at 100 s.
        let log = h.run_until(99_999);
        assert!(log.iter().all(|(_, r)| r.method != Method::Bye), "{log:?}");
        assert!(h.events().is_empty());
        let log = h.run_until(100_000);
        assert!(
            matches!(log.as_slice(), [(100_000, bye)] if bye.method == Method::Bye),
            "{log:?}"
        );
        assert_eq!(h.events(), vec![UacEvent::SessionExpired]);
    }

    #[test]
    fn a_422_raises_the_interval_to_its_min_se() {
        let mut h = Harness::with(timed(90));
        let invite = h.sent().remove(0);
        h.respond_with(&invite, 422, &[("Min-SE", "300")], None);
        let sent = h.sent();
        let [ack, retry] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(retry.method, Method::Invite);
        assert_eq!(retry.cseq().unwrap().seq, invite.cseq().unwrap().seq + 1);
        assert_eq!(retry.headers.get("Session-Expires"), Some("300"));
        assert_eq!(retry.headers.get("Min-SE"), Some("300"));
        assert!(h.events().is_empty());
        // A 422 that asks for no more than we did fails the call (no loop).
        h.respond_with(retry, 422, &[("Min-SE", "300")], None);
        assert!(matches!(
            h.events().as_slice(),
            [UacEvent::Failed { status: 422, .. }]
        ));
    }

    #[test]
    fn a_delayed_offer_takes_the_200s_offer_and_answers_in_the_ack() {
        let mut h = Harness::with(UacConfig {
            delayed_offer: true,
            ..config(None)
        });
        let invite = h.sent().remove(0);
        assert!(invite.body.is_empty(), "{invite:?}");
        assert!(invite.headers.get("Content-Type").is_none());
        // SDP in a provisional response is no early media here.
        h.respond(&invite, 183, Some(callee_sdp("sendrecv")));
        assert_eq!(h.events(), vec![UacEvent::Progress { status: 183 }]);
        h.respond(&invite, 200, Some(callee_sdp("sendrecv")));
        let events = h.events();
        let [UacEvent::Answered { negotiated }] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert_eq!(negotiated.codec, Codec::Pcma);
        assert_eq!(negotiated.remote, "192.0.2.90:50000".parse().unwrap());
        let sent = h.sent();
        let [ack] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.headers.get("Content-Type"), Some("application/sdp"));
        let answer = String::from_utf8(ack.body.clone()).unwrap();
        assert!(answer.contains("m=audio 30000 RTP/AVP 8"), "{answer}");
        // A resent 200 gets the same ACK.
        h.respond(&invite, 200, Some(callee_sdp("sendrecv")));
        assert_eq!(h.sent(), vec![ack.clone()]);
    }

    #[test]
    fn a_delayed_offer_answered_without_an_offer_is_ended() {
        let mut h = Harness::with(UacConfig {
            delayed_offer: true,
            ..config(None)
        });
        let invite = h.sent().remove(0);
        h.respond(&invite, 200, None);
        let methods: Vec<Method> = h.sent().into_iter().map(|r| r.method).collect();
        assert_eq!(methods, vec![Method::Ack, Method::Bye]);
        assert!(matches!(h.events().as_slice(), [UacEvent::Failed { .. }]));
    }

    #[test]
    fn a_callee_without_update_is_refreshed_by_re_invite() {
        let mut h = Harness::with(timed(1800));
        let invite = h.sent().remove(0);
        h.respond_with(
            &invite,
            200,
            &[
                ("Session-Expires", "120;refresher=uac"),
                ("Allow", "INVITE, ACK, CANCEL, BYE"),
            ],
            Some(callee_sdp("sendrecv")),
        );
        h.sent();
        h.events();
        let log = h.run_until(60_000);
        let [(60_000, reinvite)] = log.as_slice() else {
            panic!("{log:?}");
        };
        assert_eq!(reinvite.method, Method::Invite);
        reinvite.validate().unwrap();
        assert_eq!(reinvite.header_to().unwrap().tag(), Some("callee9"));
        assert_eq!(
            reinvite.headers.get("Session-Expires"),
            Some("120;refresher=uac")
        );
        let offer = String::from_utf8(reinvite.body.clone()).unwrap();
        assert!(offer.contains("m=audio 30000"), "{offer}");
        // Its 200 is ACKed (again when resent), and sets the timer anew.
        let ok = [("Session-Expires", "120;refresher=uac")];
        h.respond_with(reinvite, 200, &ok, Some(callee_sdp("sendrecv")));
        let sent = h.sent();
        let [ack] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.cseq().unwrap().seq, reinvite.cseq().unwrap().seq);
        assert!(matches!(
            h.events().as_slice(),
            [UacEvent::MediaUpdated { .. }]
        ));
        h.respond_with(reinvite, 200, &ok, Some(callee_sdp("sendrecv")));
        assert_eq!(h.sent(), vec![ack.clone()]);
        assert!(h.events().is_empty());
        let log = h.run_until(120_000);
        assert!(
            log.iter()
                .any(|(t, r)| *t == 120_000 && r.method == Method::Invite),
            "{log:?}"
        );
    }

    #[test]
    fn a_delayed_offer_in_a_reliable_183_is_answered_in_the_prack() {
        let mut h = Harness::with(UacConfig {
            delayed_offer: true,
            ..config(None)
        });
        let invite = h.sent().remove(0);
        let reliable = [("Require", "100rel"), ("RSeq", "1")];
        h.respond_with(&invite, 183, &reliable, Some(callee_sdp("sendrecv")));
        let sent = h.sent();
        let [prack] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(prack.method, Method::Prack);
        let answer = String::from_utf8(prack.body.clone()).unwrap();
        assert!(answer.contains("m=audio 30000 RTP/AVP 8"), "{answer}");
        let events = h.events();
        let [
            UacEvent::Progress { status: 183 },
            UacEvent::EarlyMedia { negotiated: early },
        ] = events.as_slice()
        else {
            panic!("{events:?}");
        };
        assert_eq!(early.remote, "192.0.2.90:50000".parse().unwrap());
        h.call
            .handle_input(&Response::to_request(prack, 200, None).to_bytes(), h.now);
        // The 200 carries no SDP: the media are those agreed; the ACK has no body.
        h.respond(&invite, 200, None);
        let events = h.events();
        assert!(
            matches!(events.as_slice(), [UacEvent::Answered { negotiated }] if negotiated == early),
            "{events:?}"
        );
        let sent = h.sent();
        assert!(
            matches!(sent.as_slice(), [ack] if ack.method == Method::Ack && ack.body.is_empty()),
            "{sent:?}"
        );
    }

    #[test]
    fn an_unbounded_session_expires_in_the_200_is_held_to_what_we_asked() {
        let mut h = Harness::with(timed(1800));
        let invite = h.sent().remove(0);
        h.respond_with(
            &invite,
            200,
            &[("Session-Expires", "18446744073709551615;refresher=uas")],
            Some(callee_sdp("sendrecv")),
        );
        h.sent();
        assert!(matches!(h.events().as_slice(), [UacEvent::Answered { .. }]));
        // The callee refreshes; we end the call at 1800 s less 32 s without one.
        let log = h.run_until(1_767_999);
        assert!(log.is_empty(), "{log:?}");
        let log = h.run_until(1_768_000);
        assert!(
            matches!(log.as_slice(), [(1_768_000, bye)] if bye.method == Method::Bye),
            "{log:?}"
        );
    }

    #[test]
    fn an_unbounded_session_expires_in_the_callees_update_is_held_to_our_maximum() {
        let mut h = Harness::with(timed(1800));
        h.answered();
        h.request_from_callee_with(
            "UPDATE",
            60,
            &[
                ("Supported", "timer"),
                ("Session-Expires", "18446744073709551615;refresher=uac"),
            ],
        );
        let sent: Vec<Response> = std::iter::from_fn(|| h.call.poll_transmit())
            .map(|t| match Message::parse(&t.payload).unwrap() {
                Message::Response(r) => r,
                Message::Request(r) => panic!("unexpected {}", r.method),
            })
            .collect();
        let [ok] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(ok.status, 200);
        assert_eq!(
            ok.headers.get("Session-Expires"),
            Some(format!("{};refresher=uac", MAX_SESSION_EXPIRES.as_secs()).as_str())
        );
    }

    /// A response from the fork with To tag `tag` and Contact `sip:<tag>@192.0.2.90`.
    fn fork_response(
        to: &Request,
        status: u16,
        tag: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Vec<u8> {
        let mut r = Response::to_request(to, status, Some(tag));
        r.headers.push("Contact", format!("<sip:{tag}@192.0.2.90>"));
        for (name, value) in headers {
            r.headers.push(name, *value);
        }
        if let Some(b) = body {
            r = r.with_body("application/sdp", b);
        }
        r.to_bytes()
    }

    #[test]
    fn forked_reliable_183s_are_pracked_each_in_its_own_early_dialog() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        let invite_seq = invite.cseq().unwrap().seq;
        let a = fork_response(
            &invite,
            183,
            "forka",
            &[("Require", "100rel"), ("RSeq", "5")],
            Some(callee_sdp("sendrecv")),
        );
        h.call.handle_input(&a, h.now);
        let sent = h.sent();
        assert!(
            matches!(sent.as_slice(), [p] if p.method == Method::Prack),
            "{sent:?}"
        );
        // Fork B numbers its own RSeq from 1: PRACKed in B's dialog, not A's.
        let other_sdp = callee_sdp("sendrecv").replace("50000", "50002");
        for rseq in ["1", "2"] {
            let b = fork_response(
                &invite,
                183,
                "forkb",
                &[("Require", "100rel"), ("RSeq", rseq)],
                Some(other_sdp.clone()),
            );
            h.call.handle_input(&b, h.now);
            let sent = h.sent();
            let [prack] = sent.as_slice() else {
                panic!("{sent:?}");
            };
            assert_eq!(prack.method, Method::Prack);
            assert_eq!(prack.header_to().unwrap().tag(), Some("forkb"));
            assert_eq!(prack.uri, "sip:forkb@192.0.2.90");
            assert_eq!(
                prack.headers.get("RAck"),
                Some(format!("{rseq} {invite_seq} INVITE").as_str())
            );
        }
        // A's next reliable response still counts from A's 5.
        let a = fork_response(
            &invite,
            180,
            "forka",
            &[("Require", "100rel"), ("RSeq", "6")],
            None,
        );
        h.call.handle_input(&a, h.now);
        let sent = h.sent();
        assert!(
            matches!(sent.as_slice(), [p] if p.header_to().unwrap().tag() == Some("forka") && p.uri == "sip:forka@192.0.2.90"),
            "{sent:?}"
        );
        h.events();
        // B answers without SDP: B's early media, not A's.
        h.call
            .handle_input(&fork_response(&invite, 200, "forkb", &[], None), h.now);
        let events = h.events();
        let [UacEvent::Answered { negotiated }] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert_eq!(negotiated.remote, "192.0.2.90:50002".parse().unwrap());
    }

    #[test]
    fn a_200_without_sdp_from_a_fork_without_early_media_is_not_given_anothers() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        h.call.handle_input(
            &fork_response(&invite, 183, "forka", &[], Some(callee_sdp("sendrecv"))),
            h.now,
        );
        h.events();
        h.call
            .handle_input(&fork_response(&invite, 200, "forkb", &[], None), h.now);
        let events = h.events();
        assert!(
            matches!(events.as_slice(), [UacEvent::Failed { .. }]),
            "{events:?}"
        );
    }

    #[test]
    fn early_dialogs_past_the_bound_are_only_progress() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        for fork in 0..MAX_EARLY_DIALOGS + 2 {
            let tag = format!("fork{fork}");
            let r = fork_response(
                &invite,
                183,
                &tag,
                &[("Require", "100rel"), ("RSeq", "1")],
                None,
            );
            h.call.handle_input(&r, h.now);
        }
        let pracks = h
            .sent()
            .into_iter()
            .filter(|r| r.method == Method::Prack)
            .count();
        assert_eq!(pracks, MAX_EARLY_DIALOGS);
        assert_eq!(h.events().len(), MAX_EARLY_DIALOGS + 2);
    }

    #[test]
    fn an_out_of_order_rseq_is_not_pracked() {
        let mut h = Harness::new(None);
        let invite = h.sent().remove(0);
        let r = |rseq| {
            fork_response(
                &invite,
                183,
                "forka",
                &[("Require", "100rel"), ("RSeq", rseq)],
                None,
            )
        };
        h.call.handle_input(&r("5"), h.now);
        assert_eq!(h.sent().len(), 1);
        h.call.handle_input(&r("7"), h.now);
        assert!(h.sent().is_empty(), "RSeq 7 before 6");
        h.call.handle_input(&r("6"), h.now);
        assert_eq!(h.sent().len(), 1);
    }

    #[test]
    fn a_retry_after_a_challenge_leaves_the_early_dialog_behind() {
        let creds = Credentials {
            username: "1000".into(),
            password: "secret".into(),
        };
        let mut h = Harness::with(UacConfig {
            session_expires: Some(Duration::from_secs(90)),
            ..config(Some(creds))
        });
        let invite = h.sent().remove(0);
        let reliable = [("Require", "100rel"), ("RSeq", "4")];
        h.call.handle_input(
            &fork_response(
                &invite,
                183,
                "forka",
                &reliable,
                Some(callee_sdp("sendrecv")),
            ),
            h.now,
        );
        assert_eq!(h.sent().len(), 1);
        let mut challenge = Response::to_request(&invite, 401, Some("forka"));
        challenge.headers.push(
            "WWW-Authenticate",
            "Digest realm=\"trunk.example\", nonce=\"n1\", qop=\"auth\"",
        );
        h.call.handle_input(&challenge.to_bytes(), h.now);
        let retry = h.sent().pop().unwrap();
        assert_eq!(retry.method, Method::Invite);
        assert_eq!(retry.header_to().unwrap().tag(), None);
        let first_auth = retry.headers.get("Authorization").unwrap().to_string();
        assert!(first_auth.contains("nc=00000001"), "{first_auth}");
        // The same callee's first reliable response to the retry is PRACKed again.
        h.call
            .handle_input(&fork_response(&retry, 183, "forka", &reliable, None), h.now);
        let sent = h.sent();
        assert!(
            matches!(sent.as_slice(), [p] if p.method == Method::Prack),
            "{sent:?}"
        );
        // A 422 retry answers the challenge anew: the next nonce count, a fresh cnonce.
        h.respond_with(&retry, 422, &[("Min-SE", "300")], None);
        let again = h.sent().pop().unwrap();
        assert_eq!(again.method, Method::Invite);
        assert_eq!(again.header_to().unwrap().tag(), None);
        let auth = again.headers.get("Authorization").unwrap();
        assert!(auth.contains("nc=00000002"), "{auth}");
        assert_ne!(auth, first_auth);
        // Its 200 without SDP has no early media to fall back on.
        h.call
            .handle_input(&fork_response(&again, 200, "forka", &[], None), h.now);
        let events = h.events();
        assert!(
            matches!(events.last(), Some(UacEvent::Failed { .. })),
            "{events:?}"
        );
    }

    /// Answers the call with a session timer of `interval` s that we refresh, `allow`ing what
    /// it says (no `Allow` when `None`).
    fn refreshing(interval: u64, allow: Option<&str>) -> Harness {
        let mut h = Harness::with(timed(1800));
        let invite = h.sent().remove(0);
        let se = format!("{interval};refresher=uac");
        let mut headers = vec![("Session-Expires", se.as_str())];
        if let Some(allow) = allow {
            headers.push(("Allow", allow));
        }
        h.respond_with(&invite, 200, &headers, Some(callee_sdp("sendrecv")));
        h.sent();
        h.events();
        h
    }

    #[test]
    fn a_refused_refresh_is_retried_within_seconds_until_the_session_expires() {
        let mut h = refreshing(120, None);
        let log = h.run_until(60_000);
        let [(60_000, update)] = log.as_slice() else {
            panic!("{log:?}");
        };
        h.respond(update, 491, None);
        let mut last = 60_000;
        let mut refusals = 0;
        loop {
            let Some((at, r)) = h.next_request(last + 4_000) else {
                panic!("no retry within 4 s of {last}");
            };
            if r.method == Method::Bye {
                // Not a moment before the session's end.
                assert_eq!(at, 120_000);
                break;
            }
            assert_eq!(r.method, Method::Update);
            assert!(at >= last + 2_100, "{at} after {last}");
            last = at;
            refusals += 1;
            assert!(refusals < 30, "bounded by the expiry");
            h.respond(&r, 500, None);
        }
        assert_eq!(h.events(), vec![UacEvent::SessionExpired]);
    }

    #[test]
    fn a_refresh_retried_after_a_refusal_keeps_the_call() {
        let mut h = refreshing(120, None);
        let log = h.run_until(60_000);
        h.respond(&log[0].1, 491, None);
        let (_, retry) = h.next_request(64_000).unwrap();
        let retry = &retry;
        let mut ok = Response::to_request(retry, 200, None);
        ok.headers.push("Session-Expires", "120;refresher=uac");
        h.call.handle_input(&ok.to_bytes(), h.now);
        let log = h.run_until(130_000);
        assert!(
            log.iter().all(|(_, r)| r.method == Method::Update),
            "{log:?}"
        );
        assert!(h.events().is_empty());
    }

    #[test]
    fn a_405_to_our_update_turns_to_re_invite_at_once() {
        let mut h = refreshing(120, None);
        let log = h.run_until(60_000);
        let [(60_000, update)] = log.as_slice() else {
            panic!("{log:?}");
        };
        assert_eq!(update.method, Method::Update);
        h.respond(update, 405, None);
        let sent = h.sent();
        let [reinvite] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(reinvite.method, Method::Invite);
        assert_eq!(
            reinvite.headers.get("Session-Expires"),
            Some("120;refresher=uac")
        );
    }

    #[test]
    fn session_too_small_answers_to_our_refresh_are_followed_a_bounded_number_of_times() {
        let mut h = refreshing(120, None);
        let log = h.run_until(60_000);
        let mut refresh = log[0].1.clone();
        let mut immediate = 0;
        for min_se in 121..200 {
            let min_se = min_se.to_string();
            h.respond_with(&refresh, 422, &[("Min-SE", min_se.as_str())], None);
            let sent = h.sent();
            match sent.as_slice() {
                [again] => {
                    immediate += 1;
                    refresh = again.clone();
                }
                [] => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(immediate, MAX_SESSION_RETRIES);
    }

    #[test]
    fn a_granted_interval_under_our_min_se_is_raised_to_it() {
        let mut h = refreshing(2, None);
        // Not every second: half our Min-SE of 90 s.
        let log = h.run_until(45_000);
        let [(45_000, update)] = log.as_slice() else {
            panic!("{log:?}");
        };
        assert_eq!(
            update.headers.get("Session-Expires"),
            Some("90;refresher=uac")
        );
    }

    #[test]
    fn a_callees_refresh_under_our_min_se_is_held_to_it() {
        let mut h = Harness::with(timed(1800));
        h.answered();
        h.request_from_callee_with(
            "UPDATE",
            60,
            &[
                ("Supported", "timer"),
                ("Session-Expires", "1;refresher=uas"),
            ],
        );
        let sent: Vec<Response> = std::iter::from_fn(|| h.call.poll_transmit())
            .map(|t| match Message::parse(&t.payload).unwrap() {
                Message::Response(r) => r,
                Message::Request(r) => panic!("unexpected {}", r.method),
            })
            .collect();
        assert!(
            matches!(sent.as_slice(), [ok] if ok.headers.get("Session-Expires") == Some("90;refresher=uas")),
            "{sent:?}"
        );
        let log = h.run_until(44_999);
        assert!(log.is_empty(), "{log:?}");
    }

    #[test]
    fn prack_is_not_advertised_and_an_incoming_one_is_405_with_allow() {
        let mut h = Harness::new(None);
        let invite = h.answered();
        let allow: Vec<&str> = invite.headers.values("Allow").collect();
        assert!(!allow.contains(&"PRACK"), "{allow:?}");
        assert!(allow.contains(&"UPDATE"), "{allow:?}");
        h.request_from_callee_with("PRACK", 61, &[("RAck", "1 1 INVITE")]);
        let sent: Vec<Response> = std::iter::from_fn(|| h.call.poll_transmit())
            .map(|t| match Message::parse(&t.payload).unwrap() {
                Message::Response(r) => r,
                Message::Request(r) => panic!("unexpected {}", r.method),
            })
            .collect();
        let [refusal] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(refusal.status, 405);
        assert!(refusal.headers.values("Allow").all(|m| m != "PRACK"));
        assert!(refusal.headers.values("Allow").any(|m| m == "BYE"));
    }

    #[test]
    fn a_second_forks_answer_is_acked_and_ended_in_its_own_dialog() {
        let mut h = Harness::new(None);
        let invite = h.answered();
        let other = fork_response(&invite, 200, "forkb", &[], Some(callee_sdp("sendrecv")));
        h.call.handle_input(&other, h.now);
        let sent = h.sent();
        let [ack, bye] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        for r in [ack, bye] {
            assert_eq!(r.header_to().unwrap().tag(), Some("forkb"));
            assert_eq!(r.uri, "sip:forkb@192.0.2.90");
        }
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(bye.method, Method::Bye);
        assert!(h.events().is_empty(), "the call goes on with the first");
        // Its resend gets the ACK again, no second BYE.
        h.call.handle_input(&other, h.now);
        let sent = h.sent();
        assert!(
            matches!(sent.as_slice(), [again] if again == ack),
            "{sent:?}"
        );
        // The fork's BYE completing is not our hang-up.
        h.call
            .handle_input(&Response::to_request(bye, 200, None).to_bytes(), h.now);
        assert!(h.events().is_empty());
        // The first fork's dialog still works.
        h.call.hangup(h.now);
        let sent = h.sent();
        assert!(
            matches!(sent.as_slice(), [b] if b.method == Method::Bye && b.header_to().unwrap().tag() == Some("callee9")),
            "{sent:?}"
        );
    }
}
