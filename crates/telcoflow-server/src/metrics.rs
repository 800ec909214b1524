//! The server's Prometheus metrics (`GET /metrics`): every metric is defined here, on one
//! registry per server, and held as typed handles in [`Metrics`] so that the code that counts
//! does it with one call.
//!
//! Recording is cheap: the handles the audio path uses (frames, drops) are resolved once, when
//! a call or leg starts, and count with one atomic add; label lookups (commands, SIP) happen
//! only on paths that are not per-frame. Labels are bounded: no call ids, no numbers; SIP
//! methods and status codes outside known lists are bucketed (`other`, `4xx`).

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The network a leg is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LegKind {
    /// A simulated phone (`/v1/sim/phone`).
    Sim,
    /// A SIP phone or trunk (RTP).
    Sip,
}

impl LegKind {
    /// Its label, and the name in [`LegStats::kind`](telcoflow_proto::stats::LegStats::kind).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Sim => "sim",
            Self::Sip => "sip",
        }
    }
}

/// Why audio frames were dropped (`telcoflow_frames_dropped_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropCause {
    /// Agent audio beyond what the server asked for (refused).
    AgentOverflow,
    /// Audio to an agent whose media connection is not reading.
    SlowAgent,
    /// Audio to a leg that is not reading.
    LegNotReading,
    /// Leg audio that ran ahead of real time while mixing.
    LegAhead,
    /// Agent audio dropped to win back the delay a stall left.
    StallCatchUp,
    /// RTP packets that arrived after their tick.
    RtpLate,
    /// RTP frames dropped to make room for a burst.
    RtpOverflow,
    /// RTP frames dropped to bring latency down to the target.
    RtpDiscarded,
}

impl DropCause {
    const ALL: [Self; 8] = [
        Self::AgentOverflow,
        Self::SlowAgent,
        Self::LegNotReading,
        Self::LegAhead,
        Self::StallCatchUp,
        Self::RtpLate,
        Self::RtpOverflow,
        Self::RtpDiscarded,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::AgentOverflow => "agent_overflow",
            Self::SlowAgent => "slow_agent",
            Self::LegNotReading => "leg_not_reading",
            Self::LegAhead => "leg_ahead",
            Self::StallCatchUp => "stall_catch_up",
            Self::RtpLate => "rtp_late",
            Self::RtpOverflow => "rtp_overflow",
            Self::RtpDiscarded => "rtp_discarded",
        }
    }
}

/// A bounded queue that overflowed (`telcoflow_queue_overflows_total{queue}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueKind {
    /// Frames towards a control connection: it is closed.
    ControlSend,
    /// Frames towards a media connection: audio dropped, or the connection closed.
    MediaSend,
    /// Call-state outputs towards a leg.
    Leg,
    /// SIP messages towards a TCP connection, or events towards a SIP leg.
    Sip,
}

impl QueueKind {
    const ALL: [Self; 4] = [Self::ControlSend, Self::MediaSend, Self::Leg, Self::Sip];

    fn label(self) -> &'static str {
        match self {
            Self::ControlSend => "control_send",
            Self::MediaSend => "media_send",
            Self::Leg => "leg",
            Self::Sip => "sip",
        }
    }
}

/// The counters of one leg kind, resolved once (cloning a handle is an `Arc` clone).
#[derive(Debug, Clone)]
pub(crate) struct LegCounters {
    /// Frames received from legs of this kind.
    pub(crate) frames_in: IntCounter,
    /// Frames sent to legs of this kind.
    pub(crate) frames_out: IntCounter,
}

/// Decrements a gauge when dropped: a connection counted while it lives.
#[derive(Debug)]
pub(crate) struct Held(IntGauge);

impl Held {
    /// Counts one more in `gauge` until dropped.
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// States of an outbound registration (`telcoflow_sip_registrations{state}`).
pub(crate) const REGISTRATION_STATES: [&str; 5] = [
    "registering",
    "registered",
    "failed",
    "unregistering",
    "unregistered",
];

/// Outcomes of a call (`telcoflow_calls_total{outcome}`): who ended it.
pub(crate) const OUTCOMES: [&str; 5] = ["caller", "no_answer", "agent", "server", "network"];

/// Every metric of one server.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) calls_active: IntGauge,
    calls: IntCounterVec,
    /// Seconds from a call's start (the INVITE, the phone's dial, `session.create`) to its
    /// answer.
    pub(crate) call_setup: Histogram,
    pub(crate) sessions_open: IntGauge,
    pub(crate) sessions: IntCounter,
    pub(crate) control_connections: IntGauge,
    pub(crate) control_connections_total: IntCounter,
    pub(crate) media_connections: IntGauge,
    pub(crate) media_connections_total: IntCounter,
    commands: IntCounterVec,
    command_seconds: HistogramVec,
    /// Audio frames received from agents.
    pub(crate) agent_frames_in: IntCounter,
    /// Audio frames sent to agents.
    pub(crate) agent_frames_out: IntCounter,
    legs: [LegCounters; 2],
    dropped: Vec<IntCounter>,
    concealed_rtp: IntCounter,
    concealed_playout: IntCounter,
    pub(crate) playout_gaps: IntCounter,
    pub(crate) clock_misses: IntCounter,
    pub(crate) interrupts: IntCounter,
    leg_jitter: HistogramVec,
    /// `telcoflow_leg_lost_frames_total` of SIP legs, which RTP legs add to while they run
    /// (simulated phones lose nothing).
    leg_lost_sip: IntCounter,
    sip_requests: IntCounterVec,
    sip_registrations: IntGaugeVec,
    sip_responses: IntCounterVec,
    pub(crate) rtp_ports_in_use: IntGauge,
    /// Recordings running (`call.record`, or a connector's `record = true`).
    pub(crate) recordings_active: IntGauge,
    /// Recording frames lost because the writer was behind (written as silence).
    pub(crate) recording_lost_frames: IntCounter,
    rtp_sessions: IntCounterVec,
    overflows: Vec<IntCounter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a metric; the names and labels are fixed here, so a failure is a bug caught by
/// the first test that starts a server.
fn reg<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    registry
        .register(Box::new(m.clone()))
        .expect("metric names are unique and valid");
    m
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let r = Registry::new();
        let counter =
            |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid metric"));
        let gauge =
            |name: &str, help: &str| reg(&r, IntGauge::new(name, help).expect("valid metric"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let calls = counter_vec(
            "telcoflow_calls_total",
            "Calls ended, by outcome (who ended them).",
            &["outcome"],
        );
        for outcome in OUTCOMES {
            // Every outcome is listed from the start, at 0.
            calls.with_label_values(&[outcome]);
        }
        let call_setup = reg(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "telcoflow_call_setup_seconds",
                    "Time from a call's start to its answer.",
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
            )
            .expect("valid metric"),
        );
        let commands = counter_vec(
            "telcoflow_commands_total",
            "Media-plane commands answered, by command and result (ok or the error code).",
            &["command", "result"],
        );
        let command_seconds = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "telcoflow_command_duration_seconds",
                    "Time from a command's arrival at its call to its response.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0,
                ]),
                &["command"],
            )
            .expect("valid metric"),
        );
        let leg_frames = counter_vec(
            "telcoflow_leg_frames_total",
            "Audio frames between calls and their legs, by leg kind and direction (in: from the leg).",
            &["leg_kind", "direction"],
        );
        let legs = [LegKind::Sim, LegKind::Sip].map(|kind| LegCounters {
            frames_in: leg_frames.with_label_values(&[kind.as_str(), "in"]),
            frames_out: leg_frames.with_label_values(&[kind.as_str(), "out"]),
        });
        let agent_frames = counter_vec(
            "telcoflow_agent_frames_total",
            "Audio frames on media connections, by direction (in: from the agent).",
            &["direction"],
        );
        let dropped_vec = counter_vec(
            "telcoflow_frames_dropped_total",
            "Audio frames dropped, by cause.",
            &["cause"],
        );
        let dropped = DropCause::ALL
            .iter()
            .map(|c| dropped_vec.with_label_values(&[c.label()]))
            .collect();
        let concealed = counter_vec(
            "telcoflow_frames_concealed_total",
            "Audio frames replaced by concealment or silence, by cause.",
            &["cause"],
        );
        let leg_jitter = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "telcoflow_leg_jitter_seconds",
                    "Interarrival jitter of a leg's audio at its end (RFC 3550), by leg kind.",
                )
                .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16]),
                &["leg_kind"],
            )
            .expect("valid metric"),
        );
        let leg_lost = counter_vec(
            "telcoflow_leg_lost_frames_total",
            "Leg audio frames lost (missing or too late to play, and concealed), by leg kind.",
            &["leg_kind"],
        );
        for kind in [LegKind::Sim, LegKind::Sip] {
            // Listed from the start, so that rates and ratios exist before the first loss.
            leg_jitter.with_label_values(&[kind.as_str()]);
            leg_lost.with_label_values(&[kind.as_str()]);
        }
        let rtp_sessions = counter_vec(
            "telcoflow_rtp_sessions_total",
            "RTP sessions of SIP calls opened, by the codec agreed on (PCMU, PCMA, G722).",
            &["codec"],
        );
        for codec in telcoflow_sip::rtp::codec::Codec::ALL {
            // Every codec is listed from the start, at 0.
            rtp_sessions.with_label_values(&[codec.encoding_name()]);
        }
        let sip_requests = counter_vec(
            "telcoflow_sip_requests_total",
            "SIP requests, by direction (in: received) and method.",
            &["direction", "method"],
        );
        let sip_responses = counter_vec(
            "telcoflow_sip_responses_total",
            "SIP responses, by direction (in: received), method (of CSeq) and status code.",
            &["direction", "method", "code"],
        );
        let sip_registrations = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "telcoflow_sip_registrations",
                    "Outbound SIP registrations ([[sip.registrations]]), by state.",
                ),
                &["state"],
            )
            .expect("valid metric"),
        );
        for state in REGISTRATION_STATES {
            sip_registrations.with_label_values(&[state]);
        }
        let overflow_vec = counter_vec(
            "telcoflow_queue_overflows_total",
            "Times a bounded queue was full, by queue.",
            &["queue"],
        );
        let overflows = QueueKind::ALL
            .iter()
            .map(|q| overflow_vec.with_label_values(&[q.label()]))
            .collect();
        Self {
            calls_active: gauge("telcoflow_calls_active", "Calls in progress."),
            calls,
            call_setup,
            sessions_open: gauge("telcoflow_sessions_open", "Sessions open."),
            sessions: counter("telcoflow_sessions_total", "Sessions opened."),
            control_connections: gauge(
                "telcoflow_control_connections",
                "Control connections open (after setup).",
            ),
            control_connections_total: counter(
                "telcoflow_control_connections_total",
                "Control connections set up.",
            ),
            media_connections: gauge("telcoflow_media_connections", "Media connections open."),
            media_connections_total: counter(
                "telcoflow_media_connections_total",
                "Media connections opened.",
            ),
            commands,
            command_seconds,
            agent_frames_in: agent_frames.with_label_values(&["in"]),
            agent_frames_out: agent_frames.with_label_values(&["out"]),
            legs,
            dropped,
            concealed_rtp: concealed.with_label_values(&["rtp_loss"]),
            concealed_playout: concealed.with_label_values(&["playout_gap"]),
            playout_gaps: counter(
                "telcoflow_playout_gaps_total",
                "Times an agent's live audio ran dry at a tick (silence played).",
            ),
            clock_misses: counter(
                "telcoflow_clock_misses_total",
                "Agent frames that missed the media clock's tick by a few milliseconds.",
            ),
            interrupts: counter(
                "telcoflow_interrupts_total",
                "Interrupts (agent.interrupt) handled.",
            ),
            leg_jitter,
            leg_lost_sip: leg_lost.with_label_values(&[LegKind::Sip.as_str()]),
            sip_requests,
            sip_responses,
            sip_registrations,
            rtp_ports_in_use: gauge("telcoflow_rtp_ports_in_use", "RTP port pairs in use."),
            recordings_active: gauge("telcoflow_recordings_active", "Call recordings running."),
            recording_lost_frames: counter(
                "telcoflow_recording_lost_frames_total",
                "Recording frames lost because the writer was behind (written as silence).",
            ),
            rtp_sessions,
            overflows,
            registry: r,
        }
    }

    /// An outbound registration moved from state `from` (none: it just started) to `to`.
    pub(crate) fn sip_registration_moved(&self, from: Option<&str>, to: &str) {
        if let Some(from) = from {
            self.sip_registrations.with_label_values(&[from]).dec();
        }
        self.sip_registrations.with_label_values(&[to]).inc();
    }

    /// A call ended; `outcome` is one of [`OUTCOMES`].
    pub(crate) fn call_ended(&self, outcome: &str) {
        self.calls.with_label_values(&[outcome]).inc();
    }

    /// A command was answered, `seconds` after it arrived.
    pub(crate) fn command(&self, name: &str, error_code: Option<&str>, seconds: f64) {
        let result = error_code.unwrap_or("ok");
        self.commands.with_label_values(&[name, result]).inc();
        self.command_seconds
            .with_label_values(&[name])
            .observe(seconds);
    }

    /// The frame counters of a leg kind.
    pub(crate) fn leg(&self, kind: LegKind) -> &LegCounters {
        &self.legs[kind as usize]
    }

    /// The interarrival jitter histogram of `kind`'s legs, observed once per leg at its end.
    pub(crate) fn leg_jitter(&self, kind: LegKind) -> Histogram {
        self.leg_jitter.with_label_values(&[kind.as_str()])
    }

    /// The counter of dropped frames for `cause`.
    pub(crate) fn dropped(&self, cause: DropCause) -> &IntCounter {
        &self.dropped[DropCause::ALL
            .iter()
            .position(|c| *c == cause)
            .unwrap_or_default()]
    }

    /// The overflow counter of `queue`.
    pub(crate) fn overflow(&self, queue: QueueKind) -> &IntCounter {
        &self.overflows[QueueKind::ALL
            .iter()
            .position(|q| *q == queue)
            .unwrap_or_default()]
    }

    /// What a call's playout buffer and media clock counted, at its end: gaps, the silent
    /// frames they played, clock misses.
    pub(crate) fn playout_ended(&self, gaps: u64, gap_frames: u64, clock_misses: u64) {
        self.playout_gaps.inc_by(gaps);
        self.concealed_playout.inc_by(gap_frames);
        self.clock_misses.inc_by(clock_misses);
    }

    /// Frames an RTP leg concealed since it last said. Legs add their loss as they run, so
    /// that the loss of long calls shows while they last.
    pub(crate) fn rtp_leg_lost(&self, concealed: u64) {
        if concealed > 0 {
            self.leg_lost_sip.inc_by(concealed);
            self.concealed_rtp.inc_by(concealed);
        }
    }

    /// An RTP leg opened its session with `codec` (its SDP encoding name).
    pub(crate) fn rtp_session_opened(&self, codec: &str) {
        self.rtp_sessions.with_label_values(&[codec]).inc();
    }

    /// What an RTP leg's receive side counted, at its end: interarrival jitter, frames
    /// concealed since its last [`Self::rtp_leg_lost`], and frames dropped (late, overflow,
    /// discarded).
    pub(crate) fn rtp_leg_ended(&self, jitter_secs: f64, concealed: u64, dropped: [u64; 3]) {
        self.leg_jitter
            .with_label_values(&[LegKind::Sip.as_str()])
            .observe(jitter_secs);
        self.rtp_leg_lost(concealed);
        let [late, overflow, discarded] = dropped;
        self.dropped(DropCause::RtpLate).inc_by(late);
        self.dropped(DropCause::RtpOverflow).inc_by(overflow);
        self.dropped(DropCause::RtpDiscarded).inc_by(discarded);
    }

    /// A SIP message received (`incoming`) or sent; keep-alives and unparsable bytes are not
    /// counted.
    pub(crate) fn sip_message(&self, incoming: bool, bytes: &[u8]) {
        let direction = if incoming { "in" } else { "out" };
        match sip_labels(bytes) {
            Some(SipLabels::Request(method)) => {
                self.sip_requests
                    .with_label_values(&[direction, method])
                    .inc();
            }
            Some(SipLabels::Response(method, code)) => {
                self.sip_responses
                    .with_label_values(&[direction, method, code])
                    .inc();
            }
            None => {}
        }
    }

    /// The metrics in the Prometheus text format (version 0.0.4).
    pub(crate) fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on a malformed family, which `new` cannot build.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics could not be encoded");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The content type of [`Metrics::encode`].
pub(crate) const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// The labels of a SIP message.
#[derive(Debug, PartialEq, Eq)]
enum SipLabels {
    Request(&'static str),
    Response(&'static str, &'static str),
}

/// Methods counted by name; any other is `other`.
const SIP_METHODS: [&str; 14] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "INFO",
    "UPDATE",
    "PRACK",
    "REFER",
    "NOTIFY",
    "SUBSCRIBE",
    "MESSAGE",
    "PUBLISH",
];

/// Status codes counted by value; any other is counted by class (`4xx`).
const SIP_CODES: [&str; 27] = [
    "100", "180", "181", "182", "183", "200", "202", "400", "401", "403", "404", "405", "407",
    "408", "415", "420", "480", "481", "482", "483", "486", "487", "488", "500", "501", "503",
    "603",
];

fn bucket_method(method: &str) -> &'static str {
    SIP_METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("other")
}

fn bucket_code(code: &str) -> &'static str {
    if let Some(known) = SIP_CODES.iter().find(|c| **c == code) {
        return known;
    }
    match code.as_bytes() {
        [b'1', _, _] => "1xx",
        [b'2', _, _] => "2xx",
        [b'3', _, _] => "3xx",
        [b'4', _, _] => "4xx",
        [b'5', _, _] => "5xx",
        [b'6', _, _] => "6xx",
        _ => "other",
    }
}

/// Reads the start line (and for a response the CSeq's method) without parsing the message:
/// enough for labels, and cheap.
fn sip_labels(bytes: &[u8]) -> Option<SipLabels> {
    let text = std::str::from_utf8(bytes.get(..bytes.len().min(2048))?)
        .or_else(|e| std::str::from_utf8(&bytes[..e.valid_up_to()]))
        .ok()?;
    let first = text.lines().next()?.trim();
    if first.is_empty() {
        return None;
    }
    if let Some(rest) = first.strip_prefix("SIP/2.0 ") {
        let code = rest.split(' ').next().unwrap_or("");
        let valid = code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit());
        let method = text
            .lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("CSeq")
                    .then(|| value.split_whitespace().nth(1))
                    .flatten()
            })
            .map_or("other", bucket_method);
        return Some(SipLabels::Response(
            method,
            if valid { bucket_code(code) } else { "other" },
        ));
    }
    let mut parts = first.split(' ');
    let method = parts.next()?;
    parts
        .next_back()
        .filter(|v| v.starts_with("SIP/"))
        .map(|_| SipLabels::Request(bucket_method(method)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_labels_are_bounded() {
        assert_eq!(
            sip_labels(b"INVITE sip:a@b SIP/2.0\r\nVia: x\r\n\r\n"),
            Some(SipLabels::Request("INVITE"))
        );
        assert_eq!(
            sip_labels(b"FROB sip:a@b SIP/2.0\r\n\r\n"),
            Some(SipLabels::Request("other"))
        );
        assert_eq!(
            sip_labels(b"SIP/2.0 200 OK\r\nCSeq: 1 INVITE\r\n\r\n"),
            Some(SipLabels::Response("INVITE", "200"))
        );
        assert_eq!(
            sip_labels(b"SIP/2.0 499 Odd\r\ncseq: 2 bye\r\n\r\n"),
            Some(SipLabels::Response("BYE", "4xx"))
        );
        assert_eq!(
            sip_labels(b"SIP/2.0 9999 X\r\n\r\n"),
            Some(SipLabels::Response("other", "other"))
        );
        assert_eq!(sip_labels(b"\r\n\r\n"), None);
        assert_eq!(sip_labels(b"garbage"), None);
    }

    #[test]
    fn every_metric_is_listed_and_counts() {
        let m = Metrics::new();
        m.call_ended("caller");
        m.command("call.answer", None, 0.001);
        m.sip_message(true, b"BYE sip:a@b SIP/2.0\r\n\r\n");
        m.leg(LegKind::Sip).frames_in.inc();
        let text = m.encode();
        assert!(
            text.contains("telcoflow_calls_total{outcome=\"caller\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("telcoflow_calls_total{outcome=\"agent\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("telcoflow_commands_total{command=\"call.answer\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("telcoflow_sip_requests_total{direction=\"in\",method=\"BYE\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("telcoflow_leg_frames_total{direction=\"in\",leg_kind=\"sip\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn rtp_loss_moves_while_the_leg_runs_and_the_rest_at_its_end() {
        let m = Metrics::new();
        let lost = "telcoflow_leg_lost_frames_total{leg_kind=\"sip\"}";
        let concealed = "telcoflow_frames_concealed_total{cause=\"rtp_loss\"}";
        m.rtp_leg_lost(3);
        let text = m.encode();
        assert!(text.contains(&format!("{lost} 3")), "{text}");
        assert!(text.contains(&format!("{concealed} 3")), "{text}");
        m.rtp_leg_ended(0.002, 2, [0, 0, 0]);
        let text = m.encode();
        assert!(text.contains(&format!("{lost} 5")), "{text}");
        assert!(text.contains(&format!("{concealed} 5")), "{text}");
        assert!(
            text.contains("telcoflow_leg_jitter_seconds_count{leg_kind=\"sip\"} 1"),
            "{text}"
        );
    }

    /// The dashboard and docs/operations.md name only metrics that exist, and the docs list
    /// every one.
    #[test]
    fn the_dashboard_and_the_docs_match_the_metrics() {
        let m = Metrics::new();
        // Families with labels appear once they have a child.
        m.command("call.answer", None, 0.0);
        m.sip_message(true, b"OPTIONS sip:a@b SIP/2.0\r\n\r\n");
        m.sip_message(false, b"SIP/2.0 200 OK\r\nCSeq: 1 OPTIONS\r\n\r\n");
        let text = m.encode();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(families.len() > 20, "{families:?}");
        let names_in = |doc: &str| -> Vec<String> {
            doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                // Not the crate named in log targets.
                .filter(|w| w.starts_with("telcoflow_") && *w != "telcoflow_server")
                .map(str::to_owned)
                .collect()
        };
        let dashboard = include_str!("../../../docs/grafana-dashboard.json");
        serde_json::from_str::<serde_json::Value>(dashboard).expect("the dashboard is JSON");
        let docs = include_str!("../../../docs/operations.md");
        for name in names_in(dashboard).iter().chain(&names_in(docs)) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|f| families.contains(f))
                .unwrap_or(name);
            assert!(families.contains(&family), "{name} is not a metric");
        }
        for family in &families {
            assert!(
                docs.contains(&format!("`{family}`")),
                "operations.md lacks {family}"
            );
        }
    }
}
