//! Per-call quality figures: [`CallStats`], the body of `GET /public/v1/calls/{id}/stats` and
//! of the `call.stats` call event sent at the end of a call (as its fields, next to `event`).
//!
//! Wire: JSON, keys in snake_case, every figure receive-side (what the server got from each
//! party). Unknown keys are ignored when decoding, so that a newer server may add figures.
//!
//! The estimated MOS comes from the ITU-T G.107 E-model, simplified for G.711 (see
//! [`r_factor`] and [`mos_from_r`]). A leg on G.722 is rated the same way: its R and MOS are
//! on the narrowband scale, as if it were G.711 (see [`LegStats::codec`]).

use serde::{Deserialize, Serialize};

/// Quality figures of one call, so far (on demand) or for its whole life (`call.stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallStats {
    /// The call's id (as in `call.in`).
    pub call_id: String,
    /// Its session's id.
    pub session_id: String,
    /// Milliseconds since the call started (its first leg arrived or was rung).
    pub duration_ms: u64,
    /// The phones on the call: the caller first, then the destination of `call.connect`.
    #[serde(default)]
    pub legs: Vec<LegStats>,
    /// The agent's side: its media connection.
    #[serde(default)]
    pub agent: AgentStats,
}

/// Receive-side figures of one leg (what the server got from that phone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegStats {
    /// `caller` or `callee` (the destination of `call.connect`).
    pub role: String,
    /// The network: `sim` (simulated phone) or `sip` (SIP/RTP).
    pub kind: String,
    /// RFC 3550 interarrival jitter (6.4.1, A.8), in milliseconds: of the RTP timestamps for
    /// `sip`, of the 20 ms frames' arrival for `sim`.
    pub jitter_ms: f64,
    /// Packets (frames for `sim`) the leg should have received: for `sip` the span of RTP
    /// sequence numbers seen (RFC 3550 A.3), for `sim` the frames received (a WebSocket loses
    /// none).
    pub packets_expected: u64,
    /// Packets (frames) received.
    pub packets_received: u64,
    /// `packets_expected - packets_received`, never below 0.
    pub packets_lost: u64,
    /// `packets_lost` as a percentage of `packets_expected` (0 when nothing was expected).
    pub loss_pct: f64,
    /// Milliseconds of this leg's audio the server had to make up because nothing had
    /// arrived in time (packet loss concealment for `sip`, silence for `sim`).
    pub concealed_ms: u64,
    /// Times this leg's playout ran dry: runs of concealed frames.
    pub playout_gaps: u64,
    /// Times this leg's audio missed the tick that plays it and the playout clock moved
    /// (`sip`; 0 for `sim`, whose audio is not played on a clock of its own).
    pub clock_misses: u64,
    /// Round trip to the phone from RTCP (RFC 3550 6.4.1: arrival - LSR - DLSR), once its
    /// receiver report names one of ours; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// E-model transmission rating R (0 to 100), see [`r_factor`].
    pub r_factor: f64,
    /// Estimated MOS (1 to 4.5), see [`mos_from_r`].
    pub mos: f64,
    /// The codec of a `sip` leg: `PCMU`, `PCMA` or `G722` (16 kHz wideband); absent for
    /// `sim` and before a SIP leg has agreed on one. A `G722` leg's `r_factor` and `mos` are
    /// the narrowband E-model's (G.107 with G.711's `Ie = 0`): they rate its loss and delay on
    /// the narrowband scale and do not credit the wider band. The wideband E-model (G.107.1)
    /// rates on another scale (R up to 129), which these figures do not use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
    /// The SRTP suite of an encrypted `sip` leg (SDES): `AES_CM_128_HMAC_SHA1_80` or
    /// `AES_CM_128_HMAC_SHA1_32`; absent for plain RTP and for `sim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srtp: Option<String>,
}

impl LegStats {
    /// Figures with `loss_pct`, `r_factor` and `mos` derived from the counts, `delay_ms` (the
    /// one-way delay the leg's audio adds: buffering, plus half the round trip when known).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        role: &str,
        kind: &str,
        jitter_ms: f64,
        packets_expected: u64,
        packets_received: u64,
        concealed_ms: u64,
        playout_gaps: u64,
        clock_misses: u64,
        rtt_ms: Option<f64>,
        delay_ms: f64,
    ) -> Self {
        let packets_lost = packets_expected.saturating_sub(packets_received);
        let loss_pct = if packets_expected == 0 {
            0.0
        } else {
            packets_lost as f64 * 100.0 / packets_expected as f64
        };
        // Late packets the jitter buffer discarded, and loss a peer's retransmission hid
        // from the sequence numbers, still left a hole in what was played: rate the larger of
        // the loss and the share of the played frames that was made up.
        let played_ms = packets_received
            .saturating_mul(u64::from(crate::audio::FRAME_MS))
            .saturating_add(concealed_ms);
        let concealed_pct = if played_ms == 0 {
            0.0
        } else {
            concealed_ms as f64 * 100.0 / played_ms as f64
        };
        let r = r_factor(delay_ms, loss_pct.max(concealed_pct));
        Self {
            role: role.to_owned(),
            kind: kind.to_owned(),
            jitter_ms: round2(jitter_ms),
            packets_expected,
            packets_received,
            packets_lost,
            loss_pct: round2(loss_pct),
            concealed_ms,
            playout_gaps,
            clock_misses,
            rtt_ms: rtt_ms.map(round2),
            r_factor: round2(r),
            mos: round2(mos_from_r(r)),
            codec: None,
            srtp: None,
        }
    }

    /// The same figures, naming the leg's codec (see [`LegStats::codec`]).
    pub fn with_codec(mut self, codec: Option<&str>) -> Self {
        self.codec = codec.map(str::to_owned);
        self
    }

    /// The same figures, naming the leg's SRTP suite (see [`LegStats::srtp`]).
    pub fn with_srtp(mut self, suite: Option<&str>) -> Self {
        self.srtp = suite.map(str::to_owned);
        self
    }
}

/// The agent's side of a call: audio over its media connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Audio frames the server sent the agent.
    pub frames_to_agent: u64,
    /// Audio frames the server received from the agent.
    pub frames_from_agent: u64,
    /// Times the agent's audio ran dry while it was playing (a tick found nothing to play).
    pub playout_gaps: u64,
    /// Times the agent's audio missed its tick by a few ms and the media clock moved.
    pub clock_misses: u64,
    /// Frames to the agent dropped because it did not read them (`SLOW_CONSUMER`).
    pub dropped_slow_consumer: u64,
    /// Milliseconds of agent audio dropped to win back the delay a stall left
    /// (`call.audio_skipped`, `agent_stall`).
    pub dropped_stall_ms: u64,
    /// Milliseconds of phone audio dropped as stale after the server itself stalled
    /// (`call.audio_skipped`, `server_stall`).
    pub dropped_server_stall_ms: u64,
    /// Bytes of agent audio refused for coming beyond what the server asked for
    /// (`BUFFER_OVERFLOW`).
    pub dropped_overflow_bytes: u64,
}

/// Default R of the E-model with every other parameter at its default (G.107 7.7: R0 - Is).
pub const R_DEFAULT: f64 = 93.2;
/// Packet-loss robustness factor of G.711 with packet loss concealment (G.113 Appendix I).
pub const BPL_G711_PLC: f64 = 25.1;

/// The E-model rating R of a G.711 call, simplified after ITU-T G.107 (06/2015):
/// `R = 93.2 - Id - Ie_eff`, with
///
/// - `Id` the delay impairment, in the usual simplification of G.107's formula for echo-free
///   delay (Cole and Rosenbluth, 2001): `Id = 0.024 d + 0.11 (d - 177.3) H(d - 177.3)`, with
///   `d` the one-way mouth-to-ear delay in ms and `H` the step function;
/// - `Ie_eff = Ie + (95 - Ie) Ppl / (Ppl / BurstR + Bpl)` (G.107 7.4) with `Ie = 0` (G.711),
///   `Bpl = 25.1` (G.711 with PLC, G.113 Appendix I), `BurstR = 1` (random loss) and `Ppl`
///   the loss in percent.
///
/// Clamped to 0..=100.
pub fn r_factor(delay_ms: f64, loss_pct: f64) -> f64 {
    let d = if delay_ms.is_finite() {
        delay_ms.max(0.0)
    } else {
        0.0
    };
    let id = 0.024 * d + if d > 177.3 { 0.11 * (d - 177.3) } else { 0.0 };
    let ppl = if loss_pct.is_finite() {
        loss_pct.clamp(0.0, 100.0)
    } else {
        0.0
    };
    let ie_eff = 95.0 * ppl / (ppl + BPL_G711_PLC);
    (R_DEFAULT - id - ie_eff).clamp(0.0, 100.0)
}

/// Estimated MOS (conversational quality) of a rating R, per ITU-T G.107 Annex B:
/// 1 for `R < 0`, 4.5 for `R > 100`, else `1 + 0.035 R + R (R - 60) (100 - R) 7e-6`, kept
/// within 1 to 4.5 (the polynomial dips just below 1 for R under 6.5).
pub fn mos_from_r(r: f64) -> f64 {
    if r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        (1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6).clamp(1.0, 4.5)
    }
}

fn round2(x: f64) -> f64 {
    if x.is_finite() {
        (x * 100.0).round() / 100.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 0.01
    }

    #[test]
    fn e_model_without_impairment_is_toll_quality() {
        // R = 93.2 is the default rating; G.107 Annex B maps it to MOS 4.41.
        assert!(close(r_factor(0.0, 0.0), 93.2));
        assert!(close(mos_from_r(93.2), 4.41));
    }

    #[test]
    fn delay_impairment_has_its_knee_at_177_ms() {
        // 100 ms: 0.024 * 100 = 2.4.
        assert!(close(r_factor(100.0, 0.0), 90.8));
        // 300 ms: 7.2 + 0.11 * 122.7 = 20.697.
        assert!(close(r_factor(300.0, 0.0), 93.2 - 20.697));
    }

    #[test]
    fn loss_impairment_follows_bpl_for_g711_with_plc() {
        // 1 %: 95 * 1 / 26.1 = 3.64; 10 %: 95 * 10 / 35.1 = 27.07.
        assert!(close(r_factor(0.0, 1.0), 93.2 - 3.6398));
        assert!(close(r_factor(0.0, 10.0), 93.2 - 27.0655));
        // MOS of R = 66.13 (10 % loss): 1 + 2.3147 + 66.13 * 6.13 * 33.87 * 7e-6 = 3.41.
        assert!(close(mos_from_r(r_factor(0.0, 10.0)), 3.41));
    }

    #[test]
    fn mos_is_bounded() {
        assert_eq!(mos_from_r(-5.0), 1.0);
        assert_eq!(mos_from_r(0.0), 1.0);
        assert_eq!(mos_from_r(120.0), 4.5);
        // The polynomial alone gives 0.989 at R = 3.
        for tenth in 0..=1000 {
            let mos = mos_from_r(f64::from(tenth) / 10.0);
            assert!((1.0..=4.5).contains(&mos), "{tenth}: {mos}");
        }
        assert_eq!(mos_from_r(3.0), 1.0);
        assert!(close(
            mos_from_r(50.0),
            1.0 + 1.75 + 50.0 * -10.0 * 50.0 * 7e-6
        ));
        assert_eq!(r_factor(2000.0, 100.0), 0.0);
        // Nonsense input (a clock gone wrong) rates as no impairment rather than NaN.
        assert!(close(r_factor(f64::NAN, f64::NAN), 93.2));
    }

    #[test]
    fn leg_figures_derive_loss_and_mos() {
        let leg = LegStats::new("caller", "sip", 1.234, 100, 90, 200, 3, 1, Some(40.0), 60.0);
        assert_eq!(leg.packets_lost, 10);
        assert_eq!(leg.loss_pct, 10.0);
        assert_eq!(leg.jitter_ms, 1.23);
        // 200 ms concealed of 90 * 20 + 200 = 2000 ms played: 10 %, no more than the loss.
        assert!(close(leg.r_factor, r_factor(60.0, 10.0)));
        // No packet lost, but a quarter of what was played made up (late discards).
        let late = LegStats::new("caller", "sip", 0.0, 100, 100, 2000 / 3, 0, 0, None, 20.0);
        assert_eq!(late.loss_pct, 0.0);
        let share = 666.0 * 100.0 / (2000.0 + 666.0);
        assert!(close(
            late.r_factor,
            (r_factor(20.0, share) * 100.0).round() / 100.0
        ));
        assert!(late.mos < LegStats::new("c", "sip", 0.0, 100, 100, 0, 0, 0, None, 20.0).mos);
        // More received than expected (duplicates): no negative loss.
        let dup = LegStats::new("caller", "sim", 0.0, 5, 6, 0, 0, 0, None, 0.0);
        assert_eq!((dup.packets_lost, dup.loss_pct), (0, 0.0));
        let none = LegStats::new("callee", "sim", 0.0, 0, 0, 0, 0, 0, None, 0.0);
        assert_eq!(none.loss_pct, 0.0);
    }

    #[test]
    fn wire_keys_are_snake_case() {
        let stats = CallStats {
            call_id: "c".into(),
            session_id: "s".into(),
            duration_ms: 1500,
            legs: vec![LegStats::new(
                "caller", "sim", 0.5, 10, 10, 0, 0, 0, None, 20.0,
            )],
            agent: AgentStats {
                frames_to_agent: 70,
                ..AgentStats::default()
            },
        };
        let v = serde_json::to_value(&stats).unwrap();
        assert_eq!(v["call_id"], json!("c"));
        assert_eq!(v["legs"][0]["packets_received"], json!(10));
        assert_eq!(v["legs"][0]["loss_pct"], json!(0.0));
        assert!(v["legs"][0].get("rtt_ms").is_none());
        assert_eq!(v["agent"]["frames_to_agent"], json!(70));
        assert_eq!(v["agent"]["dropped_slow_consumer"], json!(0));
        let back: CallStats = serde_json::from_value(v).unwrap();
        assert_eq!(back, stats);
    }
}
