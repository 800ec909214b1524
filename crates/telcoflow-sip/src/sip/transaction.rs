//! RFC 3261 section 17 transactions, sans-IO: the INVITE and non-INVITE server transactions
//! (incoming calls) and client transactions (calls we place), with the RFC 6026 `Accepted`
//! states so 2xx retransmission and its ACK are handled here too.
//!
//! Run loop, the same for all four types:
//!
//! 1. Create the transaction with the first request (`new(.., now)`), or feed it input:
//!    `handle_request(req, now)` (server: retransmitted request, ACK), `send_response(resp,
//!    now)` (server: the transaction user answers), `handle_response(resp, now)` (client).
//! 2. Drain outputs until `None`: [`poll_transmit`](InviteServerTransaction::poll_transmit)
//!    gives messages to send to the transaction's peer (the owner knows the address),
//!    `poll_event` gives what the transaction user must act on.
//! 3. Sleep until `poll_timeout()`, then call `handle_timeout(now)` and drain again.
//! 4. Drop the transaction once `is_terminated()`.
//!
//! Matching messages to transactions is the owner's job; [`TransactionKey`] gives the RFC 3261
//! 17.1.3 / 17.2.3 keys. The ACK for a 2xx has a branch of its own, so the owner routes it by
//! dialog (Call-ID, CSeq number) to the INVITE server transaction that sent the 2xx.
//!
//! Timers (unreliable transport; on TCP the retransmit timers are off and the wait timers I,
//! J, K, D are zero):
//!
//! | timer | transaction | value |
//! |---|---|---|
//! | A / B | INVITE client: resend INVITE / give up | T1 doubling / 64·T1 |
//! | D | INVITE client: absorb resent non-2xx finals | 32 s |
//! | M | INVITE client: pass resent 2xx up | 64·T1 |
//! | E / F | non-INVITE client: resend / give up | T1 doubling to T2 / 64·T1 |
//! | K | non-INVITE client: absorb resent finals | T4 |
//! | G / H | INVITE server: resend final (2xx too) / give up waiting for ACK | T1 doubling to T2 / 64·T1 |
//! | I | INVITE server: absorb ACK retransmissions | T4 |
//! | J | non-INVITE server: absorb request retransmissions | 64·T1 |

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::message::{Message, Method, ParseError, Request, Response, SipHeaders};

/// RFC 3261 timer base values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// RTT estimate. Default 500 ms.
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses. Default 4 s.
    pub t2: Duration,
    /// Maximum time a message stays in the network. Default 5 s.
    pub t4: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl Timers {
    fn t1x64(&self) -> Duration {
        self.t1 * 64
    }
}

/// What a transaction tells its user.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransactionEvent {
    /// Client: a response to pass to the transaction user (each provisional, the final, and
    /// resent 2xx so the user can resend its ACK).
    Response(Response),
    /// INVITE server: the ACK for our 2xx arrived (it may carry an SDP answer).
    Ack(Request),
    /// Client: no final response in time (Timer B / F); act as if 408 was received.
    /// INVITE server: no ACK for our final response (Timer H); for a 2xx, end the call with BYE.
    Timeout,
}

/// The RFC 3261 transaction key: top Via branch and sent-by, and the method (ACK matches
/// INVITE).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransactionKey {
    /// Top Via branch.
    pub branch: String,
    /// Top Via sent-by `host[:port]` (part of the server key, RFC 3261 17.2.3).
    pub sent_by: String,
    /// CSeq method, with ACK folded into INVITE.
    pub method: Method,
}

impl TransactionKey {
    fn build(branch: Option<&str>, sent_by: String, method: Method) -> Result<Self, ParseError> {
        let branch = branch
            .filter(|b| b.starts_with(super::message::BRANCH_MAGIC))
            .ok_or(ParseError::BadHeader("Via"))?;
        let method = if method == Method::Ack {
            Method::Invite
        } else {
            method
        };
        Ok(Self {
            branch: branch.to_string(),
            sent_by,
            method,
        })
    }

    /// Server-side key of an incoming request. An ACK for a non-2xx maps onto its INVITE's
    /// key; a CANCEL has a key of its own (look up the INVITE with method INVITE).
    pub fn for_request(request: &Request) -> Result<Self, ParseError> {
        let via = request.top_via()?;
        let sent_by = match via.port {
            Some(p) => format!("{}:{p}", via.host.to_ascii_lowercase()),
            None => via.host.to_ascii_lowercase(),
        };
        Self::build(via.branch(), sent_by, request.method.clone())
    }

    /// Client-side key of an incoming response (branch and CSeq method; sent-by is ours and
    /// left empty).
    pub fn for_response(response: &Response) -> Result<Self, ParseError> {
        let via = response.top_via()?;
        Self::build(via.branch(), String::new(), response.cseq()?.method)
    }

    /// Client-side key of a request we send (matches [`TransactionKey::for_response`]).
    pub fn for_sent_request(request: &Request) -> Result<Self, ParseError> {
        let via = request.top_via()?;
        Self::build(via.branch(), String::new(), request.method.clone())
    }
}

/// A retransmission timer that doubles up to an optional cap.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    at: Instant,
    interval: Duration,
    cap: Option<Duration>,
}

impl Backoff {
    fn start(now: Instant, first: Duration, cap: Option<Duration>) -> Self {
        Self {
            at: now + first,
            interval: first,
            cap,
        }
    }

    fn fire(&mut self, now: Instant) {
        let doubled = self.interval * 2;
        self.interval = match self.cap {
            Some(cap) => doubled.min(cap),
            None => doubled,
        };
        self.at = now + self.interval;
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Outputs and timers every transaction has.
#[derive(Debug)]
struct Core {
    timers: Timers,
    reliable: bool,
    transmits: VecDeque<Message>,
    events: VecDeque<TransactionEvent>,
    retransmit: Option<Backoff>,
    deadline: Option<Instant>,
}

impl Core {
    fn new(timers: Timers, reliable: bool) -> Self {
        Self {
            timers,
            reliable,
            transmits: VecDeque::with_capacity(2),
            events: VecDeque::with_capacity(2),
            retransmit: None,
            deadline: None,
        }
    }

    /// Starts the retransmit timer on unreliable transports only.
    fn start_retransmit(&mut self, now: Instant, cap: Option<Duration>) {
        self.retransmit = (!self.reliable).then(|| Backoff::start(now, self.timers.t1, cap));
    }

    fn wait(&self, unreliable: Duration) -> Duration {
        if self.reliable {
            Duration::ZERO
        } else {
            unreliable
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        earliest(self.retransmit.map(|r| r.at), self.deadline)
    }

    fn deadline_due(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// Returns true (and re-arms) when the retransmit timer is due.
    fn retransmit_due(&mut self, now: Instant) -> bool {
        match &mut self.retransmit {
            Some(r) if r.at <= now => {
                r.fire(now);
                true
            }
            _ => false,
        }
    }

    fn stop(&mut self) {
        self.retransmit = None;
        self.deadline = None;
    }
}

macro_rules! drain_methods {
    () => {
        /// The next message to send to the peer.
        pub fn poll_transmit(&mut self) -> Option<Message> {
            self.core.transmits.pop_front()
        }

        /// The next event for the transaction user.
        pub fn poll_event(&mut self) -> Option<TransactionEvent> {
            self.core.events.pop_front()
        }

        /// When [`Self::handle_timeout`] must next be called; `None` when no timer runs.
        pub fn poll_timeout(&self) -> Option<Instant> {
            self.core.poll_timeout()
        }
    };
}

/// States of the INVITE server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteServerState {
    /// Waiting for the transaction user's final response.
    Proceeding,
    /// A non-2xx final was sent; resending it until ACK (Timers G, H).
    Completed,
    /// ACK for the non-2xx arrived; absorbing its retransmissions (Timer I).
    Confirmed,
    /// A 2xx was sent; resending it until ACK (RFC 6026; Timers G, H as in 13.3.1.4).
    Accepted,
    /// Done.
    Terminated,
}

/// The INVITE server transaction (RFC 3261 17.2.1, RFC 6026 7.1).
#[derive(Debug)]
pub struct InviteServerTransaction {
    core: Core,
    state: InviteServerState,
    last_response: Option<Response>,
    request: Request,
}

impl InviteServerTransaction {
    /// Starts on a new INVITE and queues `100 Trying` at once (the server then never leaves
    /// a caller retransmitting while the call is routed).
    pub fn new(request: Request, reliable: bool, timers: Timers, _now: Instant) -> Self {
        let mut core = Core::new(timers, reliable);
        let trying = Response::to_request(&request, 100, None);
        core.transmits.push_back(Message::Response(trying.clone()));
        Self {
            core,
            state: InviteServerState::Proceeding,
            last_response: Some(trying),
            request,
        }
    }

    /// Starts on an INVITE answered at once with a final response (a 400, 488, 491...), so
    /// no `100 Trying` precedes it.
    pub fn with_final_response(
        request: Request,
        response: Response,
        reliable: bool,
        timers: Timers,
        now: Instant,
    ) -> Self {
        let mut tx = Self::new(request, reliable, timers, now);
        tx.core.transmits.clear();
        tx.last_response = None;
        tx.send_response(response, now);
        tx
    }

    drain_methods!();

    /// The INVITE that started the transaction.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The current state.
    pub fn state(&self) -> InviteServerState {
        self.state
    }

    /// Whether the transaction is over and can be dropped.
    pub fn is_terminated(&self) -> bool {
        self.state == InviteServerState::Terminated
    }

    /// The transaction user responds. Responses after the final one are ignored.
    pub fn send_response(&mut self, response: Response, now: Instant) {
        if self.state != InviteServerState::Proceeding {
            return;
        }
        self.core
            .transmits
            .push_back(Message::Response(response.clone()));
        let status = response.status;
        self.last_response = Some(response);
        if status < 200 {
            return;
        }
        let t2 = self.core.timers.t2;
        if status < 300 {
            // 2xx retransmission is end to end (13.3.1.4): resend on any transport.
            self.core.retransmit = Some(Backoff::start(now, self.core.timers.t1, Some(t2)));
            self.state = InviteServerState::Accepted;
        } else {
            self.core.start_retransmit(now, Some(t2));
            self.state = InviteServerState::Completed;
        }
        self.core.deadline = Some(now + self.core.timers.t1x64());
    }

    /// A request matched to this transaction: a retransmitted INVITE or an ACK.
    pub fn handle_request(&mut self, request: Request, now: Instant) {
        match (request.method.clone(), self.state) {
            (Method::Invite, InviteServerState::Proceeding | InviteServerState::Completed) => {
                if let Some(r) = &self.last_response {
                    self.core.transmits.push_back(Message::Response(r.clone()));
                }
            }
            (Method::Ack, InviteServerState::Completed) => {
                self.core.stop();
                self.core.deadline = Some(now + self.core.wait(self.core.timers.t4));
                self.state = InviteServerState::Confirmed;
            }
            (Method::Ack, InviteServerState::Accepted) => {
                self.core.stop();
                self.state = InviteServerState::Terminated;
                self.core.events.push_back(TransactionEvent::Ack(request));
            }
            // INVITE retransmissions in Accepted are absorbed (RFC 6026 7.1): the 2xx
            // timer already resends. Anything else has no effect.
            _ => {}
        }
    }

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            InviteServerState::Completed | InviteServerState::Accepted => {
                if self.core.deadline_due(now) {
                    // Timer H: the ACK never came.
                    self.core.stop();
                    self.state = InviteServerState::Terminated;
                    self.core.events.push_back(TransactionEvent::Timeout);
                } else if self.core.retransmit_due(now) {
                    // Timer G (or the 2xx timer).
                    if let Some(r) = &self.last_response {
                        self.core.transmits.push_back(Message::Response(r.clone()));
                    }
                }
            }
            InviteServerState::Confirmed if self.core.deadline_due(now) => {
                // Timer I.
                self.core.stop();
                self.state = InviteServerState::Terminated;
            }
            _ => {}
        }
    }
}

/// States of the non-INVITE server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonInviteServerState {
    /// No response sent yet.
    Trying,
    /// A provisional response was sent.
    Proceeding,
    /// The final response was sent; absorbing retransmissions (Timer J).
    Completed,
    /// Done.
    Terminated,
}

/// The non-INVITE server transaction (RFC 3261 17.2.2): BYE, CANCEL, OPTIONS, ...
#[derive(Debug)]
pub struct NonInviteServerTransaction {
    core: Core,
    state: NonInviteServerState,
    last_response: Option<Response>,
    request: Request,
}

impl NonInviteServerTransaction {
    /// Starts on a new request.
    pub fn new(request: Request, reliable: bool, timers: Timers, _now: Instant) -> Self {
        Self {
            core: Core::new(timers, reliable),
            state: NonInviteServerState::Trying,
            last_response: None,
            request,
        }
    }

    drain_methods!();

    /// The request that started the transaction.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The current state.
    pub fn state(&self) -> NonInviteServerState {
        self.state
    }

    /// Whether the transaction is over and can be dropped.
    pub fn is_terminated(&self) -> bool {
        self.state == NonInviteServerState::Terminated
    }

    /// The transaction user responds. Responses after the final one are ignored.
    pub fn send_response(&mut self, response: Response, now: Instant) {
        if matches!(
            self.state,
            NonInviteServerState::Completed | NonInviteServerState::Terminated
        ) {
            return;
        }
        self.core
            .transmits
            .push_back(Message::Response(response.clone()));
        let fin = response.status >= 200;
        self.last_response = Some(response);
        if fin {
            self.state = NonInviteServerState::Completed;
            // Timer J.
            self.core.deadline = Some(now + self.core.wait(self.core.timers.t1x64()));
        } else {
            self.state = NonInviteServerState::Proceeding;
        }
    }

    /// A retransmission of the request: resend the last response, if any.
    pub fn handle_request(&mut self, _request: Request, _now: Instant) {
        if matches!(
            self.state,
            NonInviteServerState::Proceeding | NonInviteServerState::Completed
        ) {
            if let Some(r) = &self.last_response {
                self.core.transmits.push_back(Message::Response(r.clone()));
            }
        }
    }

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == NonInviteServerState::Completed && self.core.deadline_due(now) {
            self.core.stop();
            self.state = NonInviteServerState::Terminated;
        }
    }
}

/// States of the INVITE client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteClientState {
    /// INVITE sent, nothing heard (Timers A, B).
    Calling,
    /// A provisional response arrived.
    Proceeding,
    /// A non-2xx final arrived and was ACKed; absorbing retransmissions (Timer D).
    Completed,
    /// A 2xx arrived; passing resent 2xx up for the user's ACK (RFC 6026 Timer M).
    Accepted,
    /// Done.
    Terminated,
}

/// The INVITE client transaction (RFC 3261 17.1.1, RFC 6026 7.2).
#[derive(Debug)]
pub struct InviteClientTransaction {
    core: Core,
    state: InviteClientState,
    request: Request,
    ack: Option<Request>,
}

impl InviteClientTransaction {
    /// Starts by queueing the INVITE. Its top Via must carry a fresh `z9hG4bK` branch.
    pub fn new(request: Request, reliable: bool, timers: Timers, now: Instant) -> Self {
        let mut core = Core::new(timers, reliable);
        core.transmits.push_back(Message::Request(request.clone()));
        // Timer A doubles without a cap for INVITE (17.1.1.2).
        core.start_retransmit(now, None);
        core.deadline = Some(now + timers.t1x64());
        Self {
            core,
            state: InviteClientState::Calling,
            request,
            ack: None,
        }
    }

    drain_methods!();

    /// The INVITE (for building CANCEL with [`Request::cancel`]).
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The current state.
    pub fn state(&self) -> InviteClientState {
        self.state
    }

    /// Whether the transaction is over and can be dropped.
    pub fn is_terminated(&self) -> bool {
        self.state == InviteClientState::Terminated
    }

    /// A response matched to this transaction.
    pub fn handle_response(&mut self, response: Response, now: Instant) {
        let status = response.status;
        match self.state {
            InviteClientState::Calling | InviteClientState::Proceeding => {
                if status < 200 {
                    self.core.retransmit = None;
                    // Timer B only guards Calling; the user runs its own ring timeout.
                    self.core.deadline = None;
                    self.state = InviteClientState::Proceeding;
                } else if status < 300 {
                    self.core.stop();
                    self.core.deadline = Some(now + self.core.timers.t1x64());
                    self.state = InviteClientState::Accepted;
                } else {
                    self.core.stop();
                    let ack = self.request.ack_for(&response);
                    self.core.transmits.push_back(Message::Request(ack.clone()));
                    self.ack = Some(ack);
                    self.core.deadline = Some(now + self.core.wait(Duration::from_secs(32)));
                    self.state = InviteClientState::Completed;
                }
                self.core
                    .events
                    .push_back(TransactionEvent::Response(response));
            }
            InviteClientState::Completed if status >= 300 => {
                if let Some(ack) = &self.ack {
                    self.core.transmits.push_back(Message::Request(ack.clone()));
                }
            }
            InviteClientState::Accepted if (200..300).contains(&status) => {
                self.core
                    .events
                    .push_back(TransactionEvent::Response(response));
            }
            _ => {}
        }
    }

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            InviteClientState::Calling => {
                if self.core.deadline_due(now) {
                    // Timer B.
                    self.core.stop();
                    self.state = InviteClientState::Terminated;
                    self.core.events.push_back(TransactionEvent::Timeout);
                } else if self.core.retransmit_due(now) {
                    // Timer A.
                    self.core
                        .transmits
                        .push_back(Message::Request(self.request.clone()));
                }
            }
            InviteClientState::Completed | InviteClientState::Accepted
                if self.core.deadline_due(now) =>
            {
                // Timer D / M.
                self.core.stop();
                self.state = InviteClientState::Terminated;
            }
            _ => {}
        }
    }
}

/// States of the non-INVITE client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonInviteClientState {
    /// Request sent (Timers E, F).
    Trying,
    /// A provisional response arrived (Timer E at T2).
    Proceeding,
    /// The final response arrived; absorbing retransmissions (Timer K).
    Completed,
    /// Done.
    Terminated,
}

/// The non-INVITE client transaction (RFC 3261 17.1.2): BYE, CANCEL, OPTIONS we send.
#[derive(Debug)]
pub struct NonInviteClientTransaction {
    core: Core,
    state: NonInviteClientState,
    request: Request,
}

impl NonInviteClientTransaction {
    /// Starts by queueing the request.
    pub fn new(request: Request, reliable: bool, timers: Timers, now: Instant) -> Self {
        let mut core = Core::new(timers, reliable);
        core.transmits.push_back(Message::Request(request.clone()));
        core.start_retransmit(now, Some(timers.t2));
        core.deadline = Some(now + timers.t1x64());
        Self {
            core,
            state: NonInviteClientState::Trying,
            request,
        }
    }

    drain_methods!();

    /// The request.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The current state.
    pub fn state(&self) -> NonInviteClientState {
        self.state
    }

    /// Whether the transaction is over and can be dropped.
    pub fn is_terminated(&self) -> bool {
        self.state == NonInviteClientState::Terminated
    }

    /// A response matched to this transaction.
    pub fn handle_response(&mut self, response: Response, now: Instant) {
        if !matches!(
            self.state,
            NonInviteClientState::Trying | NonInviteClientState::Proceeding
        ) {
            return;
        }
        if response.status < 200 {
            if self.state == NonInviteClientState::Trying {
                self.state = NonInviteClientState::Proceeding;
                // 17.1.2.2: in Proceeding, Timer E fires every T2.
                if let Some(r) = &mut self.core.retransmit {
                    r.interval = self.core.timers.t2;
                    r.cap = Some(self.core.timers.t2);
                    r.at = r.at.min(now + self.core.timers.t2);
                }
            }
        } else {
            self.core.stop();
            // Timer K.
            self.core.deadline = Some(now + self.core.wait(self.core.timers.t4));
            self.state = NonInviteClientState::Completed;
        }
        self.core
            .events
            .push_back(TransactionEvent::Response(response));
    }

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            NonInviteClientState::Trying | NonInviteClientState::Proceeding => {
                if self.core.deadline_due(now) {
                    // Timer F.
                    self.core.stop();
                    self.state = NonInviteClientState::Terminated;
                    self.core.events.push_back(TransactionEvent::Timeout);
                } else if self.core.retransmit_due(now) {
                    // Timer E.
                    self.core
                        .transmits
                        .push_back(Message::Request(self.request.clone()));
                }
            }
            NonInviteClientState::Completed if self.core.deadline_due(now) => {
                self.core.stop();
                self.state = NonInviteClientState::Terminated;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn request(method: &str) -> Request {
        let text = format!(
            "{method} sip:100@server SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKabc\r\n\
From: <sip:alice@a>;tag=a1\r\n\
To: <sip:100@server>\r\n\
Call-ID: call-1\r\n\
CSeq: 1 {method}\r\n\
Max-Forwards: 70\r\n\
Content-Length: 0\r\n\r\n"
        );
        match Message::parse(text.as_bytes()).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => unreachable!(),
        }
    }

    fn ack_for_2xx() -> Request {
        let mut ack = request("ACK");
        ack.headers
            .set("Via", "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKother");
        ack
    }

    /// Drives any transaction's timers up to `until`, recording (ms since start, status or
    /// method) of everything transmitted.
    macro_rules! drive {
        ($tx:expr, $start:expr, $until:expr, $log:expr) => {
            while let Some(at) = $tx.poll_timeout() {
                if at > $until {
                    break;
                }
                $tx.handle_timeout(at);
                while let Some(m) = $tx.poll_transmit() {
                    let what = match m {
                        Message::Request(r) => r.method.to_string(),
                        Message::Response(r) => r.status.to_string(),
                    };
                    $log.push(((at - $start).as_millis() as u64, what));
                }
            }
        };
    }

    fn statuses(tx: &mut InviteServerTransaction) -> Vec<u16> {
        let mut out = Vec::new();
        while let Some(m) = tx.poll_transmit() {
            if let Message::Response(r) = m {
                out.push(r.status);
            }
        }
        out
    }

    #[test]
    fn invite_server_lost_ack_resends_200_with_backoff_until_timer_h() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let mut tx = InviteServerTransaction::new(invite.clone(), false, Timers::default(), t0);
        assert_eq!(statuses(&mut tx), vec![100]);
        tx.send_response(Response::to_request(&invite, 180, Some("s")), t0);
        tx.send_response(Response::to_request(&invite, 200, Some("s")), t0);
        assert_eq!(statuses(&mut tx), vec![180, 200]);
        assert_eq!(tx.state(), InviteServerState::Accepted);
        let mut log = Vec::new();
        drive!(tx, t0, t0 + Duration::from_secs(40), log);
        let times: Vec<u64> = log.iter().map(|(t, _)| *t).collect();
        // T1, 2T1, 4T1, then capped at T2 = 4 s, until Timer H at 64 T1 = 32 s.
        assert_eq!(
            times,
            vec![
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
        );
        assert!(log.iter().all(|(_, s)| s == "200"));
        assert_eq!(tx.poll_event(), Some(TransactionEvent::Timeout));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn invite_server_ack_stops_2xx_retransmission() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let mut tx = InviteServerTransaction::new(invite.clone(), false, Timers::default(), t0);
        tx.send_response(Response::to_request(&invite, 200, Some("s")), t0);
        statuses(&mut tx);
        let mut log = Vec::new();
        drive!(tx, t0, t0 + 2000 * MS, log);
        assert_eq!(log.len(), 2); // at 500 and 1500 ms
        // A retransmitted INVITE in Accepted is absorbed.
        tx.handle_request(invite, t0 + 2000 * MS);
        assert_eq!(tx.poll_transmit(), None);
        let ack = ack_for_2xx();
        tx.handle_request(ack.clone(), t0 + 2100 * MS);
        assert_eq!(tx.poll_event(), Some(TransactionEvent::Ack(ack)));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn invite_server_non_2xx_timers_g_h_i() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let mut tx = InviteServerTransaction::new(invite.clone(), false, Timers::default(), t0);
        // Retransmitted INVITE while proceeding: resend the last provisional.
        tx.handle_request(invite.clone(), t0 + 100 * MS);
        assert_eq!(statuses(&mut tx), vec![100, 100]);
        tx.send_response(Response::to_request(&invite, 486, Some("s")), t0);
        assert_eq!(statuses(&mut tx), vec![486]);
        assert_eq!(tx.state(), InviteServerState::Completed);
        let mut log = Vec::new();
        drive!(tx, t0, t0 + 4000 * MS, log);
        assert_eq!(
            log,
            vec![
                (500, "486".into()),
                (1500, "486".into()),
                (3500, "486".into())
            ]
        );
        // Retransmitted INVITE in Completed: resend the final.
        tx.handle_request(invite, t0 + 4000 * MS);
        assert_eq!(statuses(&mut tx), vec![486]);
        tx.handle_request(request("ACK"), t0 + 4100 * MS);
        assert_eq!(tx.state(), InviteServerState::Confirmed);
        assert_eq!(tx.poll_event(), None);
        // Timer I = T4 absorbs ACK retransmissions, then the transaction ends.
        assert_eq!(tx.poll_timeout(), Some(t0 + 9100 * MS));
        tx.handle_request(request("ACK"), t0 + 5000 * MS);
        assert_eq!(tx.poll_transmit(), None);
        tx.handle_timeout(t0 + 9100 * MS);
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_server_non_2xx_without_ack_times_out() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let mut tx = InviteServerTransaction::new(invite.clone(), false, Timers::default(), t0);
        tx.send_response(Response::to_request(&invite, 487, Some("s")), t0);
        assert_eq!(statuses(&mut tx), vec![100, 487]);
        let mut log = Vec::new();
        drive!(tx, t0, t0 + Duration::from_secs(60), log);
        assert_eq!(log.len(), 10);
        assert_eq!(tx.poll_event(), Some(TransactionEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_server_immediate_final_has_no_trying() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let resp = Response::to_request(&invite, 488, Some("s"));
        let mut tx = InviteServerTransaction::with_final_response(
            invite,
            resp,
            false,
            Timers::default(),
            t0,
        );
        assert_eq!(statuses(&mut tx), vec![488]);
        assert_eq!(tx.state(), InviteServerState::Completed);
    }

    #[test]
    fn invite_server_over_tcp_resends_only_2xx() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let mut tx = InviteServerTransaction::new(invite.clone(), true, Timers::default(), t0);
        tx.send_response(Response::to_request(&invite, 404, Some("s")), t0);
        statuses(&mut tx);
        // No Timer G on a reliable transport, Timer H still guards the ACK.
        assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        tx.handle_request(request("ACK"), t0 + 10 * MS);
        // Timer I is zero on TCP.
        assert_eq!(tx.poll_timeout(), Some(t0 + 10 * MS));
        tx.handle_timeout(t0 + 10 * MS);
        assert!(tx.is_terminated());
    }

    #[test]
    fn non_invite_server_timer_j() {
        let t0 = Instant::now();
        let bye = request("BYE");
        let mut tx = NonInviteServerTransaction::new(bye.clone(), false, Timers::default(), t0);
        // Retransmission before any response is absorbed.
        tx.handle_request(bye.clone(), t0 + 500 * MS);
        assert_eq!(tx.poll_transmit(), None);
        tx.send_response(Response::to_request(&bye, 200, Some("s")), t0 + 600 * MS);
        assert!(matches!(tx.poll_transmit(), Some(Message::Response(r)) if r.status == 200));
        tx.handle_request(bye, t0 + 1000 * MS);
        assert!(matches!(tx.poll_transmit(), Some(Message::Response(r)) if r.status == 200));
        // A second final is ignored.
        tx.send_response(Response::new(500), t0 + 1000 * MS);
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(
            tx.poll_timeout(),
            Some(t0 + 600 * MS + Duration::from_secs(32))
        );
        tx.handle_timeout(t0 + 600 * MS + Duration::from_secs(32));
        assert!(tx.is_terminated());
    }

    fn response(req: &Request, status: u16) -> Response {
        Response::to_request(req, status, Some("callee"))
    }

    #[test]
    fn invite_client_timer_a_doubles_until_timer_b() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let mut tx = InviteClientTransaction::new(invite, false, Timers::default(), t0);
        assert!(
            matches!(tx.poll_transmit(), Some(Message::Request(r)) if r.method == Method::Invite)
        );
        let mut log = Vec::new();
        drive!(tx, t0, t0 + Duration::from_secs(40), log);
        let times: Vec<u64> = log.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, vec![500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(tx.poll_event(), Some(TransactionEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_client_provisional_then_error_acks() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let mut tx = InviteClientTransaction::new(invite.clone(), false, Timers::default(), t0);
        tx.poll_transmit();
        tx.handle_response(response(&invite, 180), t0 + 100 * MS);
        assert_eq!(tx.state(), InviteClientState::Proceeding);
        assert!(matches!(tx.poll_event(), Some(TransactionEvent::Response(r)) if r.status == 180));
        // No retransmissions and no Timer B while proceeding.
        assert_eq!(tx.poll_timeout(), None);
        tx.handle_response(response(&invite, 486), t0 + 5000 * MS);
        let Some(Message::Request(ack)) = tx.poll_transmit() else {
            panic!("expected ACK");
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.header_to().unwrap().tag(), Some("callee"));
        assert_eq!(ack.top_via().unwrap().branch(), Some("z9hG4bKabc"));
        assert!(matches!(tx.poll_event(), Some(TransactionEvent::Response(r)) if r.status == 486));
        // The resent 486 gets the ACK again and is not passed up.
        tx.handle_response(response(&invite, 486), t0 + 5500 * MS);
        assert!(matches!(tx.poll_transmit(), Some(Message::Request(r)) if r.method == Method::Ack));
        assert_eq!(tx.poll_event(), None);
        // Timer D.
        assert_eq!(tx.poll_timeout(), Some(t0 + 37000 * MS));
        tx.handle_timeout(t0 + 37000 * MS);
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_client_2xx_and_resent_2xx_reach_the_user() {
        let t0 = Instant::now();
        let invite = request("INVITE");
        let mut tx = InviteClientTransaction::new(invite.clone(), false, Timers::default(), t0);
        tx.poll_transmit();
        tx.handle_response(response(&invite, 200), t0 + 100 * MS);
        assert_eq!(tx.state(), InviteClientState::Accepted);
        assert!(matches!(tx.poll_event(), Some(TransactionEvent::Response(r)) if r.status == 200));
        // The transaction does not ACK a 2xx: that is the dialog's job.
        assert_eq!(tx.poll_transmit(), None);
        tx.handle_response(response(&invite, 200), t0 + 600 * MS);
        assert!(matches!(tx.poll_event(), Some(TransactionEvent::Response(r)) if r.status == 200));
        tx.handle_timeout(t0 + 100 * MS + Duration::from_secs(32));
        assert!(tx.is_terminated());
    }

    #[test]
    fn non_invite_client_timers_e_f() {
        let t0 = Instant::now();
        let bye = request("BYE");
        let mut tx = NonInviteClientTransaction::new(bye, false, Timers::default(), t0);
        tx.poll_transmit();
        let mut log = Vec::new();
        drive!(tx, t0, t0 + Duration::from_secs(40), log);
        let times: Vec<u64> = log.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            times,
            vec![
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
        );
        assert_eq!(tx.poll_event(), Some(TransactionEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn non_invite_client_proceeding_and_timer_k() {
        let t0 = Instant::now();
        let opts = request("OPTIONS");
        let mut tx = NonInviteClientTransaction::new(opts.clone(), false, Timers::default(), t0);
        tx.poll_transmit();
        tx.handle_response(response(&opts, 100), t0 + 100 * MS);
        assert_eq!(tx.state(), NonInviteClientState::Proceeding);
        let mut log = Vec::new();
        drive!(tx, t0, t0 + 9000 * MS, log);
        // The first resend stays at 500 ms; from then on every T2.
        assert_eq!(
            log.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![500, 4500, 8500]
        );
        tx.handle_response(response(&opts, 200), t0 + 9000 * MS);
        assert_eq!(tx.state(), NonInviteClientState::Completed);
        let events: Vec<u16> = std::iter::from_fn(|| tx.poll_event())
            .map(|e| match e {
                TransactionEvent::Response(r) => r.status,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(events, vec![100, 200]);
        // Late resends of the final are absorbed; Timer K ends it.
        tx.handle_response(response(&opts, 200), t0 + 9100 * MS);
        assert_eq!(tx.poll_event(), None);
        tx.handle_timeout(t0 + 14000 * MS);
        assert!(tx.is_terminated());
    }

    #[test]
    fn reliable_client_does_not_retransmit() {
        let t0 = Instant::now();
        let mut tx = NonInviteClientTransaction::new(request("BYE"), true, Timers::default(), t0);
        tx.poll_transmit();
        assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        let mut inv = InviteClientTransaction::new(request("INVITE"), true, Timers::default(), t0);
        inv.poll_transmit();
        assert_eq!(inv.poll_timeout(), Some(t0 + Duration::from_secs(32)));
    }

    #[test]
    fn transaction_keys() {
        let invite = request("INVITE");
        let ack = request("ACK");
        let cancel = request("CANCEL");
        let k = TransactionKey::for_request(&invite).unwrap();
        assert_eq!(k, TransactionKey::for_request(&ack).unwrap());
        assert_ne!(k, TransactionKey::for_request(&cancel).unwrap());
        assert_eq!(k.sent_by, "10.0.0.5:5060");
        let resp = response(&invite, 180);
        assert_eq!(
            TransactionKey::for_response(&resp).unwrap(),
            TransactionKey::for_sent_request(&invite).unwrap()
        );
        let mut old = invite;
        old.headers.set("Via", "SIP/2.0/UDP 10.0.0.5;branch=1234");
        assert!(TransactionKey::for_request(&old).is_err());
    }
}
