//! Outbound registration (RFC 3261 section 10), sans-IO: binds our contact to an address of
//! record at a registrar, answers digest challenges, refreshes the binding before it
//! expires, backs off after failures, and removes the binding on shutdown.
//!
//! Run loop: [`Registration::new`] schedules the first REGISTER at once. Feed every response
//! whose Call-ID is [`Registration::call_id`] to [`Registration::handle_input`], timers to
//! [`Registration::handle_timeout`] at [`Registration::poll_timeout`], and
//! [`Registration::unregister`] on shutdown. After each, drain
//! [`Registration::poll_transmit`] (always towards [`RegisterConfig::destination`]) and
//! [`Registration::poll_event`]. Drop it once [`Registration::is_finished`].
//!
//! Every REGISTER of one registration shares its Call-ID and From tag, with CSeq rising by
//! one (RFC 3261 10.2), so that the registrar sees refreshes of one binding.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use super::digest::{self, Challenge, Credentials};
use super::message::{BRANCH_MAGIC, CSeq, Message, Method, Request, Response};
use super::transaction::{NonInviteClientTransaction, Timers, TransactionEvent, TransactionKey};
use super::{Transmit, Transport};

/// Challenges answered in a row before an attempt counts as failed (a second challenge
/// after our answer means the credentials are wrong, unless the nonce was stale).
const MAX_AUTH_ATTEMPTS: u32 = 2;
/// The first retry after a failure; each further failure doubles it up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// The shortest refresh interval, whatever lifetime a registrar grants: a registrar granting
/// a second must not make us send a REGISTER twice a second.
const MIN_REFRESH: Duration = Duration::from_secs(5);
/// The longest wait between attempts (and the most a `Retry-After` is followed).
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The longest binding asked for, even when a registrar's `Min-Expires` asks for more.
const MAX_EXPIRES: Duration = Duration::from_secs(86_400);
/// How long before a binding expires its refresh goes out at most: half the binding for
/// short ones.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Settings of one registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterConfig {
    /// The registrar's URI, the Request-URI of each REGISTER, e.g. `sip:pbx.example.com`.
    pub registrar: String,
    /// The address of record (From and To), e.g. `sip:+15550100@pbx.example.com`.
    pub aor: String,
    /// Our Contact URI: where calls to the address of record must come.
    pub contact: String,
    /// Where to send (the registrar or an outbound proxy; resolved by the owner).
    pub destination: SocketAddr,
    /// Transport to use.
    pub transport: Transport,
    /// Route header values (an outbound proxy, `<sip:proxy.example.com;lr>`), in order.
    pub route: Vec<String>,
    /// Our Via sent-by, `host:port`.
    pub sent_by: String,
    /// Credentials for 401/407 challenges.
    pub credentials: Option<Credentials>,
    /// The binding's lifetime to ask for.
    pub expires: Duration,
    /// Transaction timers.
    pub timers: Timers,
    /// `User-Agent` header value.
    pub user_agent: String,
}

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// A REGISTER is on its way, and no binding is known to be in place.
    Registering,
    /// The registrar holds our binding (a refresh may be on its way).
    Registered {
        /// Lifetime the registrar granted, from its latest answer.
        expires: Duration,
    },
    /// The latest attempt failed; the next one waits.
    Failed {
        /// The registrar's status (408 when it did not answer).
        status: u16,
        /// Its reason phrase, or what went wrong here.
        reason: String,
        /// Wait before the next attempt.
        retry_in: Duration,
    },
    /// The binding is being removed (REGISTER with `Expires: 0`).
    Unregistering,
    /// No binding, and none will be asked for.
    Unregistered,
}

impl RegistrationState {
    /// A short name for logs and metrics: `registering`, `registered`, `failed`,
    /// `unregistering`, `unregistered`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Registering => "registering",
            Self::Registered { .. } => "registered",
            Self::Failed { .. } => "failed",
            Self::Unregistering => "unregistering",
            Self::Unregistered => "unregistered",
        }
    }
}

/// What the owner learns. Each is also the new [`Registration::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterEvent {
    /// The state changed (every success and failure is reported, refreshes too).
    State(RegistrationState),
}

/// One registration. See the module docs.
#[derive(Debug)]
pub struct Registration {
    config: RegisterConfig,
    rng: StdRng,
    state: RegistrationState,
    call_id: String,
    from_tag: String,
    cseq: u32,
    /// Lifetime asked for: the configured one, or a registrar's `Min-Expires`.
    expires: Duration,
    /// The REGISTER on its way, if any.
    tx: Option<NonInviteClientTransaction>,
    /// Whether `tx` removes the binding.
    tx_unregisters: bool,
    /// Challenges answered since the last attempt began.
    auth_attempts: u32,
    /// The latest challenge, answered again (with the next nonce count) on later requests
    /// so that a refresh needs no extra round trip.
    challenge: Option<(&'static str, Challenge, u32)>,
    /// When the next REGISTER goes out (a refresh or a retry).
    next_at: Option<Instant>,
    /// Wait after the next failure.
    backoff: Duration,
    unregistering: bool,
    transmits: VecDeque<Message>,
    events: VecDeque<RegisterEvent>,
}

impl Registration {
    /// A registration whose first REGISTER goes out at `now` (on the next
    /// [`Registration::handle_timeout`], or at once through [`Registration::poll_transmit`]).
    /// `seed` drives the Call-ID, tag, branches and retry jitter.
    pub fn new(config: RegisterConfig, seed: u64, now: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let host = config.sent_by.split(':').next().unwrap_or("telcoflow");
        let call_id = format!("{:016x}@{host}", rng.random::<u64>());
        let from_tag = format!("{:016x}", rng.random::<u64>());
        let cseq = rng.random_range(1..10_000);
        let expires = config.expires.min(MAX_EXPIRES);
        let mut registration = Self {
            config,
            rng,
            state: RegistrationState::Registering,
            call_id,
            from_tag,
            cseq,
            expires,
            tx: None,
            tx_unregisters: false,
            auth_attempts: 0,
            challenge: None,
            next_at: None,
            backoff: FIRST_BACKOFF,
            unregistering: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        registration.send_register(now, false);
        registration
    }

    /// The SIP Call-ID of every REGISTER (route responses by it).
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// Where the registration stands.
    pub fn state(&self) -> &RegistrationState {
        &self.state
    }

    /// The settings it runs with.
    pub fn config(&self) -> &RegisterConfig {
        &self.config
    }

    /// Whether the binding is gone and nothing is left to send, so it can be dropped.
    pub fn is_finished(&self) -> bool {
        self.state == RegistrationState::Unregistered && self.tx.is_none()
    }

    /// The next message to send to [`RegisterConfig::destination`].
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front().map(|m| Transmit {
            transport: self.config.transport,
            destination: self.config.destination,
            payload: m.to_bytes(),
        })
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RegisterEvent> {
        self.events.pop_front()
    }

    /// When [`Registration::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let tx = self.tx.as_ref().and_then(|t| t.poll_timeout());
        match (tx, self.next_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs due timers: retransmissions, a registrar that does not answer, a refresh or a
    /// retry that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(tx) = &mut self.tx {
            tx.handle_timeout(now);
        }
        self.drain_tx(now);
        if self.tx.is_none() && self.next_at.is_some_and(|at| at <= now) {
            self.next_at = None;
            self.send_register(now, false);
        }
    }

    /// Removes the binding: a REGISTER with `Expires: 0` if one may be in place, then
    /// [`RegistrationState::Unregistered`] once the registrar answers (or does not, in 64·T1).
    pub fn unregister(&mut self, now: Instant) {
        if self.unregistering {
            return;
        }
        self.unregistering = true;
        self.next_at = None;
        let bound = matches!(
            self.state,
            RegistrationState::Registered { .. } | RegistrationState::Registering
        );
        // A REGISTER still on its way is left to its transaction's fate; its answer no
        // longer matters.
        self.tx = None;
        if bound {
            self.set_state(RegistrationState::Unregistering);
            self.send_register(now, true);
        } else {
            self.set_state(RegistrationState::Unregistered);
        }
    }

    /// The connection to the registrar could not be opened (TCP/TLS: refused, or the TLS
    /// handshake failed, as when its certificate is not trusted): the REGISTER on its way
    /// fails at once with 503 (RFC 3261 8.1.3.1) and `reason`, and is retried later like any
    /// failure; an un-REGISTER ends the registration.
    pub fn transport_failed(&mut self, reason: &str, now: Instant) {
        if self.tx.take().is_none() {
            return;
        }
        if self.tx_unregisters {
            self.set_state(RegistrationState::Unregistered);
        } else {
            self.on_failure(503, reason, None, now);
        }
    }

    /// Handles one received message for this registration (responses to our REGISTERs;
    /// anything else is ignored).
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        let response = match Message::parse(bytes) {
            Ok(Message::Response(r)) => r,
            Ok(Message::Request(_)) => return,
            Err(err) => {
                tracing::debug!(cause = %err, "dropping unparseable SIP message");
                return;
            }
        };
        let Ok(key) = TransactionKey::for_response(&response) else {
            return;
        };
        if let Some(tx) = &mut self.tx {
            if TransactionKey::for_sent_request(tx.request()).ok() == Some(key) {
                tx.handle_response(response, now);
            }
        }
        self.drain_tx(now);
    }

    fn set_state(&mut self, state: RegistrationState) {
        self.state = state.clone();
        self.events.push_back(RegisterEvent::State(state));
    }

    fn drain_tx(&mut self, now: Instant) {
        let Some(tx) = &mut self.tx else {
            return;
        };
        while let Some(m) = tx.poll_transmit() {
            self.transmits.push_back(m);
        }
        let mut outcome = None;
        while let Some(event) = tx.poll_event() {
            match event {
                TransactionEvent::Response(r) if r.status >= 200 => outcome = Some(Ok(r)),
                TransactionEvent::Timeout => outcome = Some(Err(())),
                _ => {}
            }
        }
        if tx.is_terminated() || outcome.is_some() {
            // A final answer ends what this registration waits for; the transaction's
            // absorbing of resent answers is not worth keeping it for.
            self.tx = None;
        }
        match outcome {
            Some(Ok(response)) => self.on_final(response, now),
            Some(Err(())) => self.on_failure(408, "Request Timeout (no answer)", None, now),
            None => {}
        }
    }

    fn on_final(&mut self, r: Response, now: Instant) {
        if self.tx_unregisters {
            // Whatever the answer, there is nothing more to do: a refused un-REGISTER
            // leaves a binding that expires on its own.
            if r.status >= 300 {
                tracing::debug!(status = r.status, "registrar refused to remove the binding");
            }
            self.set_state(RegistrationState::Unregistered);
            return;
        }
        match r.status {
            200..=299 => self.on_registered(&r, now),
            401 | 407 => {
                let answered = self.auth_attempts < MAX_AUTH_ATTEMPTS
                    && self.config.credentials.is_some()
                    && self.answer_challenge(&r);
                if answered {
                    self.auth_attempts += 1;
                    self.send_register(now, false);
                } else {
                    let reason = if self.config.credentials.is_none() {
                        "authentication required and no credentials configured".to_string()
                    } else {
                        format!("{} (credentials refused)", r.reason)
                    };
                    self.on_failure(r.status, &reason, None, now);
                }
            }
            423 => {
                // Interval Too Brief: ask again at once for what the registrar wants.
                let min = r
                    .headers
                    .get("Min-Expires")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .filter(|&d| d > self.expires && d <= MAX_EXPIRES);
                match min {
                    Some(min) if self.auth_attempts < MAX_AUTH_ATTEMPTS + 1 => {
                        self.expires = min;
                        self.auth_attempts += 1;
                        self.send_register(now, false);
                    }
                    _ => self.on_failure(423, &r.reason, None, now),
                }
            }
            status => {
                let retry_after = r
                    .headers
                    .get("Retry-After")
                    .and_then(|v| v.split(';').next()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                self.on_failure(status, &r.reason, retry_after, now);
            }
        }
    }

    /// Keeps `r`'s challenge for this and later requests; false if it has none we can answer.
    fn answer_challenge(&mut self, r: &Response) -> bool {
        match digest::challenge_of(r) {
            Some((header, challenge)) => {
                self.challenge = Some((header, challenge, 0));
                true
            }
            None => false,
        }
    }

    fn on_registered(&mut self, r: &Response, now: Instant) {
        let granted = granted_expiry(r, &self.config.contact).unwrap_or(self.expires);
        if granted.is_zero() {
            self.on_failure(r.status, "the registrar kept no binding", None, now);
            return;
        }
        self.auth_attempts = 0;
        self.backoff = FIRST_BACKOFF;
        let refresh_in = (granted / 2)
            .max(granted.saturating_sub(REFRESH_MARGIN))
            .max(MIN_REFRESH);
        self.next_at = Some(now + refresh_in);
        self.set_state(RegistrationState::Registered { expires: granted });
    }

    fn on_failure(
        &mut self,
        status: u16,
        reason: &str,
        retry_after: Option<Duration>,
        now: Instant,
    ) {
        self.auth_attempts = 0;
        // A stale challenge is no use to the next attempt.
        self.challenge = None;
        // ±20 % so that many servers restarted together do not retry in step.
        let jitter = self.rng.random_range(0.8..1.2);
        let wait = match retry_after {
            // `Retry-After: 0` must not make us retry once per round trip.
            Some(after) => after.clamp(FIRST_BACKOFF, MAX_BACKOFF),
            None => self.backoff.mul_f64(jitter).min(MAX_BACKOFF),
        };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.next_at = Some(now + wait);
        self.set_state(RegistrationState::Failed {
            status,
            reason: reason.to_string(),
            retry_in: wait,
        });
    }

    fn send_register(&mut self, now: Instant, unregister: bool) {
        if matches!(self.state, RegistrationState::Failed { .. }) {
            self.set_state(RegistrationState::Registering);
        }
        self.cseq += 1;
        let branch = format!("{BRANCH_MAGIC}{:016x}", self.rng.random::<u64>());
        let expires = if unregister {
            0
        } else {
            self.expires.as_secs()
        };
        let mut r = Request::new(Method::Register, self.config.registrar.clone());
        r.headers.push(
            "Via",
            format!(
                "SIP/2.0/{} {};branch={branch};rport",
                self.config.transport.via_name(),
                self.config.sent_by
            ),
        );
        r.headers.push("Max-Forwards", "70");
        for route in &self.config.route {
            r.headers.push("Route", route.clone());
        }
        r.headers.push(
            "From",
            format!("<{}>;tag={}", self.config.aor, self.from_tag),
        );
        r.headers.push("To", format!("<{}>", self.config.aor));
        r.headers.push("Call-ID", self.call_id.clone());
        r.headers.push(
            "CSeq",
            CSeq {
                seq: self.cseq,
                method: Method::Register,
            }
            .to_string(),
        );
        r.headers.push(
            "Contact",
            format!("<{}>;expires={expires}", self.config.contact),
        );
        r.headers.push("Expires", expires.to_string());
        r.headers.push("Allow", super::uas::ALLOW);
        r.headers.push("User-Agent", self.config.user_agent.clone());
        if let (Some(creds), Some((header, challenge, nc))) =
            (&self.config.credentials, &mut self.challenge)
        {
            *nc += 1;
            let cnonce = format!("{:016x}", self.rng.random::<u64>());
            let value = digest::authorize(
                challenge,
                creds,
                &Method::Register,
                &self.config.registrar,
                &cnonce,
                *nc,
            );
            r.headers.push(header, value);
        }
        let mut tx = NonInviteClientTransaction::new(
            r,
            self.config.transport.reliable(),
            self.config.timers,
            now,
        );
        while let Some(m) = tx.poll_transmit() {
            self.transmits.push_back(m);
        }
        self.tx = Some(tx);
        self.tx_unregisters = unregister;
    }
}

/// The lifetime a 2xx to our REGISTER grants our `contact`: its `expires` parameter in the
/// registrar's list of bindings, else the `Expires` header (RFC 3261 10.2.4).
fn granted_expiry(r: &Response, contact: &str) -> Option<Duration> {
    let ours = |uri: &str| uri.eq_ignore_ascii_case(contact);
    let from_contact = r
        .headers
        .values("Contact")
        .filter_map(|v| super::message::NameAddr::parse(v, "Contact").ok())
        .find(|c| ours(&c.uri))
        .and_then(|c| c.params.get("expires")?.trim().parse::<u64>().ok());
    let from_header = || {
        r.headers
            .get("Expires")
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    from_contact
        .or_else(from_header)
        .map(|s| Duration::from_secs(s.min(MAX_EXPIRES.as_secs())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::digest::{Algorithm, Authorization};
    use crate::sip::message::SipHeaders;

    const CONTACT: &str = "sip:telcoflow@192.0.2.10:5060";

    fn config() -> RegisterConfig {
        RegisterConfig {
            registrar: "sip:pbx.example.com".into(),
            aor: "sip:+15550100@pbx.example.com".into(),
            contact: CONTACT.into(),
            destination: "192.0.2.1:5060".parse().unwrap(),
            transport: Transport::Udp,
            route: Vec::new(),
            sent_by: "192.0.2.10:5060".into(),
            credentials: Some(Credentials {
                username: "alice".into(),
                password: "secret".into(),
            }),
            expires: Duration::from_secs(600),
            timers: Timers::default(),
            user_agent: "telcoflow-test".into(),
        }
    }

    /// The REGISTER just sent.
    fn sent(reg: &mut Registration) -> Request {
        let t = reg.poll_transmit().expect("a REGISTER");
        match Message::parse(&t.payload).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => panic!("a response was sent"),
        }
    }

    fn answer(reg: &mut Registration, to: &Request, status: u16, now: Instant) {
        answer_with(reg, to, status, &[], now);
    }

    fn answer_with(
        reg: &mut Registration,
        to: &Request,
        status: u16,
        headers: &[(&str, &str)],
        now: Instant,
    ) {
        let mut r = Response::to_request(to, status, Some("reg"));
        for (name, value) in headers {
            r.headers.push(name, *value);
        }
        reg.handle_input(&r.to_bytes(), now);
    }

    fn states(reg: &mut Registration) -> Vec<RegistrationState> {
        std::iter::from_fn(|| reg.poll_event())
            .map(|RegisterEvent::State(s)| s)
            .collect()
    }

    fn challenge() -> String {
        Challenge::new("pbx.example.com", "n0nce", Algorithm::Md5).to_header_value()
    }

    #[test]
    fn registers_with_digest_auth_and_refreshes_before_expiry() {
        let t0 = Instant::now();
        let mut reg = Registration::new(config(), 1, t0);
        let first = sent(&mut reg);
        assert_eq!(first.method, Method::Register);
        assert_eq!(first.uri, "sip:pbx.example.com");
        assert_eq!(first.headers.get("Expires"), Some("600"));
        assert!(first.headers.get("Authorization").is_none());
        answer_with(
            &mut reg,
            &first,
            401,
            &[("WWW-Authenticate", &challenge())],
            t0,
        );
        let second = sent(&mut reg);
        let auth = Authorization::parse(second.headers.get("Authorization").unwrap()).unwrap();
        assert!(digest::verify(&auth, "secret", &Method::Register));
        assert_eq!(auth.uri, "sip:pbx.example.com");
        assert_eq!(second.call_id().unwrap(), first.call_id().unwrap());
        assert_eq!(second.cseq().unwrap().seq, first.cseq().unwrap().seq + 1);
        // The registrar grants less than asked, in the Contact's parameter.
        let contact = format!("<{CONTACT}>;expires=300");
        answer_with(&mut reg, &second, 200, &[("Contact", &contact)], t0);
        assert_eq!(
            states(&mut reg),
            [RegistrationState::Registered {
                expires: Duration::from_secs(300)
            }]
        );
        // The refresh goes out 60 s before the binding ends, already authorised.
        assert_eq!(reg.poll_timeout(), Some(t0 + Duration::from_secs(240)));
        reg.handle_timeout(t0 + Duration::from_secs(239));
        assert!(reg.poll_transmit().is_none());
        reg.handle_timeout(t0 + Duration::from_secs(240));
        let refresh = sent(&mut reg);
        assert_eq!(refresh.call_id().unwrap(), first.call_id().unwrap());
        assert_eq!(refresh.cseq().unwrap().seq, first.cseq().unwrap().seq + 2);
        let auth = Authorization::parse(refresh.headers.get("Authorization").unwrap()).unwrap();
        assert!(digest::verify(&auth, "secret", &Method::Register));
        assert_eq!(
            auth.nc.as_deref(),
            Some("00000002"),
            "the second use of the nonce counts 2"
        );
        // A short binding is refreshed halfway.
        answer_with(
            &mut reg,
            &refresh,
            200,
            &[("Expires", "30")],
            t0 + Duration::from_secs(240),
        );
        assert_eq!(reg.poll_timeout(), Some(t0 + Duration::from_secs(240 + 15)));
    }

    #[test]
    fn a_connection_that_cannot_open_fails_the_attempt_with_its_reason() {
        let t0 = Instant::now();
        let mut reg = Registration::new(config(), 1, t0);
        let _ = sent(&mut reg);
        let _ = states(&mut reg);
        reg.transport_failed("TLS: certificate not trusted", t0);
        match states(&mut reg).as_slice() {
            [RegistrationState::Failed { status, reason, .. }] => {
                assert_eq!(*status, 503);
                assert_eq!(reason, "TLS: certificate not trusted");
            }
            other => panic!("{other:?}"),
        }
        // Nothing was on its way any more: a second report changes nothing, and the retry
        // comes later.
        reg.transport_failed("again", t0);
        assert!(states(&mut reg).is_empty());
        assert!(reg.poll_timeout().is_some_and(|t| t > t0));
    }

    #[test]
    fn failures_back_off_doubling_up_to_a_cap_and_success_resets_it() {
        let t0 = Instant::now();
        let mut reg = Registration::new(config(), 2, t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let r = sent(&mut reg);
            answer(&mut reg, &r, 503, now);
            let Some(RegistrationState::Failed {
                status, retry_in, ..
            }) = states(&mut reg).pop()
            else {
                panic!("a failure")
            };
            assert_eq!(status, 503);
            waits.push(retry_in);
            now = reg.poll_timeout().unwrap();
            assert_eq!(now, now.max(t0));
            reg.handle_timeout(now);
        }
        for (i, w) in waits.iter().enumerate() {
            let base = (FIRST_BACKOFF * 2u32.pow(i as u32)).min(MAX_BACKOFF);
            assert!(
                *w >= base.mul_f64(0.8).min(MAX_BACKOFF)
                    && *w <= base.mul_f64(1.2).min(MAX_BACKOFF),
                "wait {i}: {w:?} against {base:?}"
            );
        }
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        // Retry-After is followed, and a success brings the first backoff back.
        let r = sent(&mut reg);
        answer_with(&mut reg, &r, 503, &[("Retry-After", "7")], now);
        assert!(matches!(
            states(&mut reg).pop(),
            Some(RegistrationState::Failed { retry_in, .. }) if retry_in == Duration::from_secs(7)
        ));
        now += Duration::from_secs(7);
        reg.handle_timeout(now);
        let r = sent(&mut reg);
        answer(&mut reg, &r, 200, now);
        let now = reg.poll_timeout().unwrap();
        reg.handle_timeout(now);
        let r = sent(&mut reg);
        answer(&mut reg, &r, 500, now);
        assert!(matches!(
            states(&mut reg).pop(),
            Some(RegistrationState::Failed { retry_in, .. }) if retry_in <= FIRST_BACKOFF.mul_f64(1.2)
        ));
    }

    #[test]
    fn wrong_credentials_fail_after_a_second_challenge() {
        let t0 = Instant::now();
        let mut reg = Registration::new(config(), 3, t0);
        let ch = challenge();
        for _ in 0..2 {
            let r = sent(&mut reg);
            answer_with(&mut reg, &r, 401, &[("WWW-Authenticate", &ch)], t0);
        }
        let r = sent(&mut reg);
        answer_with(&mut reg, &r, 401, &[("WWW-Authenticate", &ch)], t0);
        assert!(
            reg.poll_transmit().is_none(),
            "no third answer to the challenge"
        );
        let Some(RegistrationState::Failed { status, reason, .. }) = states(&mut reg).pop() else {
            panic!("a failure")
        };
        assert_eq!(status, 401);
        assert!(reason.contains("credentials refused"), "{reason}");

        let mut no_creds = config();
        no_creds.credentials = None;
        let mut reg = Registration::new(no_creds, 4, t0);
        let r = sent(&mut reg);
        answer_with(&mut reg, &r, 401, &[("WWW-Authenticate", &ch)], t0);
        let Some(RegistrationState::Failed { reason, .. }) = states(&mut reg).pop() else {
            panic!("a failure")
        };
        assert!(reason.contains("no credentials"), "{reason}");
    }

    #[test]
    fn interval_too_brief_asks_again_for_min_expires() {
        let t0 = Instant::now();
        let mut reg = Registration::new(config(), 5, t0);
        let r = sent(&mut reg);
        answer_with(&mut reg, &r, 423, &[("Min-Expires", "1800")], t0);
        let again = sent(&mut reg);
        assert_eq!(again.headers.get("Expires"), Some("1800"));
        // A Min-Expires beyond a day is not followed.
        let mut reg = Registration::new(config(), 6, t0);
        let r = sent(&mut reg);
        answer_with(&mut reg, &r, 423, &[("Min-Expires", "999999")], t0);
        assert!(reg.poll_transmit().is_none());
        assert!(matches!(
            states(&mut reg).pop(),
            Some(RegistrationState::Failed { status: 423, .. })
        ));
    }

    #[test]
    fn a_silent_registrar_is_a_408_failure_after_64_t1() {
        let t0 = Instant::now();
        let mut reg = Registration::new(config(), 7, t0);
        let _ = sent(&mut reg);
        let mut resent = 0;
        // Bounded: 64·T1 is 32 s and Timer E fires at most every T2 after the first ones.
        for _ in 0..100 {
            let Some(at) = reg.poll_timeout() else { break };
            if matches!(reg.state(), RegistrationState::Failed { .. }) {
                break;
            }
            reg.handle_timeout(at);
            while reg.poll_transmit().is_some() {
                resent += 1;
            }
        }
        assert!(resent >= 5, "UDP retransmissions: {resent}");
        let Some(RegistrationState::Failed { status, .. }) = states(&mut reg).pop() else {
            panic!("a failure")
        };
        assert_eq!(status, 408);
    }

    #[test]
    fn unregister_sends_expires_zero_then_finishes() {
        let t0 = Instant::now();
        let mut reg = Registration::new(config(), 8, t0);
        let r = sent(&mut reg);
        answer(&mut reg, &r, 200, t0);
        let _ = states(&mut reg);
        reg.unregister(t0);
        let bye = sent(&mut reg);
        assert_eq!(bye.headers.get("Expires"), Some("0"));
        assert!(bye.headers.get("Contact").unwrap().ends_with(";expires=0"));
        assert_eq!(states(&mut reg), [RegistrationState::Unregistering]);
        assert!(!reg.is_finished());
        answer(&mut reg, &bye, 200, t0);
        assert_eq!(states(&mut reg), [RegistrationState::Unregistered]);
        assert!(reg.is_finished());
        assert_eq!(reg.poll_timeout(), None, "no refresh after unregistering");

        // A registration that failed has no binding to remove.
        let mut reg = Registration::new(config(), 9, t0);
        let r = sent(&mut reg);
        answer(&mut reg, &r, 403, t0);
        reg.unregister(t0);
        assert!(reg.poll_transmit().is_none());
        assert!(reg.is_finished());
    }

    #[test]
    fn an_outbound_proxy_is_a_route_and_other_call_ids_are_ignored() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.route = vec!["<sip:proxy.example.com;lr>".into()];
        let mut reg = Registration::new(cfg, 10, t0);
        let r = sent(&mut reg);
        assert_eq!(r.headers.get("Route"), Some("<sip:proxy.example.com;lr>"));
        // An answer to another request (another branch) changes nothing.
        let mut other = r.clone();
        other
            .headers
            .set("Via", "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKother");
        answer(&mut reg, &other, 200, t0);
        assert!(states(&mut reg).is_empty());
        assert_eq!(reg.state(), &RegistrationState::Registering);
        reg.handle_input(b"garbage", t0);
        answer(&mut reg, &r, 200, t0);
        assert!(matches!(
            reg.state(),
            RegistrationState::Registered { expires } if *expires == Duration::from_secs(600)
        ));
    }
}
