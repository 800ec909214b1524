//! A leg as its call keeps it: the link to it, resamplers between its rate and the agent's,
//! the audio waiting for the mixing tick, and the policy for sending to it.

use super::frames::SamplePool;
use super::leg::{LegId, LegKind, LegLink, LegOutput, LegQuality};
use super::meter::ArrivalMeter;
use crate::audio::Resampler;
use crate::metrics::{DropCause, LegCounters, Metrics, QueueKind};
use prometheus::{Histogram, IntCounter};
use std::collections::VecDeque;
use telcoflow_proto::SampleRate;
use telcoflow_sip::rtp::dtmf_out::{DtmfPlan, ToneGenerator};
use tokio::sync::mpsc;
use tracing::{debug, trace, warn};

/// Frames of leg audio held for mixing before the oldest is dropped (and counted).
const LEG_QUEUE_FRAMES: usize = 10;
/// Slots of a leg's queue kept free of audio for ringing / answered / hang-up.
const LEG_CONTROL_RESERVE: usize = 4;

/// A leg as its call keeps it: its link, resamplers and the audio waiting for the tick.
pub(super) struct Leg {
    pub(super) id: LegId,
    link: LegLink,
    pub(super) up: bool,
    /// Not up yet, but sending early media: its audio is heard while it rings.
    pub(super) early: bool,
    /// Leg rate -> agent rate.
    pub(super) from_leg: Resampler,
    /// Agent rate -> leg rate.
    to_leg: Resampler,
    /// Received audio at the agent rate, waiting for the mixing tick.
    queue: VecDeque<i16>,
    pub(super) dropped_samples: u64,
    /// Buffers of the frames sent to the leg.
    pool: SamplePool,
    /// Its metrics, resolved once: one atomic add per frame.
    counters: LegCounters,
    not_reading: IntCounter,
    ahead: IntCounter,
    overflows: IntCounter,
    /// What the call measures of the leg's audio.
    pub(super) meter: ArrivalMeter,
    /// Where the meter's jitter goes when the leg ends, for a network whose own task does
    /// not measure it (a SIP leg's RTP task observes its RFC 3550 jitter itself).
    jitter_histogram: Option<Histogram>,
    /// DTMF tones being mixed into what a simulated phone hears (`call.send_dtmf`).
    tones: Option<ToneGenerator>,
}

impl Leg {
    pub(super) fn new(id: LegId, link: LegLink, agent_rate: SampleRate, metrics: &Metrics) -> Self {
        let (from_leg, to_leg) = resamplers(link.rate, agent_rate);
        let jitter_histogram = link
            .quality
            .is_none()
            .then(|| metrics.leg_jitter(link.kind));
        Self {
            counters: metrics.leg(link.kind).clone(),
            not_reading: metrics.dropped(DropCause::LegNotReading).clone(),
            ahead: metrics.dropped(DropCause::LegAhead).clone(),
            overflows: metrics.overflow(QueueKind::Leg).clone(),
            id,
            link,
            up: false,
            early: false,
            from_leg,
            to_leg,
            queue: VecDeque::with_capacity(LEG_QUEUE_FRAMES * agent_rate.frame_samples()),
            dropped_samples: 0,
            pool: SamplePool::default(),
            meter: ArrivalMeter::default(),
            jitter_histogram,
            tones: None,
        }
    }

    /// Sends DTMF to the leg: a simulated phone hears dual tones the call mixes into its
    /// audio; a SIP leg's own task sends them (RFC 4733 events, or SIP INFO). A
    /// newer request replaces one still playing.
    pub(super) fn send_dtmf(&mut self, plan: DtmfPlan) {
        match self.link.kind {
            LegKind::Sim => self.tones = Some(ToneGenerator::new(plan, self.link.rate.hz())),
            LegKind::Sip => {
                self.send(LegOutput::Dtmf(plan));
            }
        }
    }

    pub(super) fn kind(&self) -> LegKind {
        self.link.kind
    }

    /// The figures the leg's own task publishes, if its network measures any.
    pub(super) fn quality(&self) -> Option<&LegQuality> {
        self.link.quality.as_deref()
    }

    /// A frame of the leg's audio (at its rate) arrived at `now`.
    pub(super) fn arrived(&mut self, samples: usize, now: tokio::time::Instant) {
        self.meter.arrived(samples, self.link.rate.hz(), now);
    }

    /// The leg's own rate changed (its codec did): audio from now on is at `rate` both ways.
    pub(super) fn set_rate(&mut self, rate: SampleRate, agent_rate: SampleRate) {
        if rate != self.link.rate {
            self.link.rate = rate;
            (self.from_leg, self.to_leg) = resamplers(rate, agent_rate);
        }
    }

    pub(super) fn set_agent_rate(&mut self, agent_rate: SampleRate) {
        (self.from_leg, self.to_leg) = resamplers(self.link.rate, agent_rate);
        self.queue.clear();
    }

    /// Counts a frame received from the leg.
    pub(super) fn received(&self) {
        self.counters.frames_in.inc();
    }

    /// Sends to the leg without waiting. Audio only goes while the queue has room beyond a
    /// reserve, so that call-state outputs (ringing, answered, hang-up) are never the ones lost.
    /// Returns whether the leg took it.
    pub(super) fn send(&self, out: LegOutput) -> bool {
        let is_audio = matches!(out, LegOutput::Audio(_));
        if is_audio && self.link.tx.capacity() <= LEG_CONTROL_RESERVE {
            trace!(leg = self.id.0, "leg is not reading; audio frame dropped");
            self.not_reading.inc();
            return false;
        }
        let sent = self.link.tx.try_send(out);
        if is_audio && sent.is_ok() {
            self.counters.frames_out.inc();
        }
        let took = sent.is_ok();
        if let Err(mpsc::error::TrySendError::Full(_)) = sent {
            self.overflows.inc();
            warn!(
                leg = self.id.0,
                "leg is not reading; call-state output dropped"
            );
        }
        took
    }

    /// Converts agent-rate samples to the leg's rate and sends them as one frame. Returns
    /// false only when the leg did not take the frame (it is not reading): samples the
    /// resampler holds back for now come out in the next frame.
    pub(super) fn play(&mut self, samples: &[i16], scratch: &mut Vec<i16>) -> bool {
        scratch.clear();
        self.to_leg.process(samples, scratch);
        if scratch.is_empty() {
            return true;
        }
        if let Some(tones) = &mut self.tones {
            tones.mix_into(scratch);
            if tones.done() {
                self.tones = None;
            }
        }
        let frame = self.pool.frame(scratch);
        self.send(LegOutput::Audio(frame))
    }

    /// Queues agent-rate samples for the next ticks, keeping at most `LEG_QUEUE_FRAMES`.
    pub(super) fn enqueue(&mut self, samples: &[i16], frame_samples: usize) {
        self.queue.extend(samples);
        let cap = LEG_QUEUE_FRAMES * frame_samples;
        if self.queue.len() > cap {
            let excess = self.queue.len() - cap;
            self.queue.drain(..excess);
            self.dropped_samples += excess as u64;
            self.ahead
                .inc_by(excess.div_ceil(frame_samples.max(1)) as u64);
            debug!(
                leg = self.id.0,
                excess, "leg sent faster than real time; oldest audio dropped"
            );
        }
    }

    pub(super) fn take_frame(&mut self, out: &mut [i16]) {
        self.meter.took(self.queue.len() < out.len());
        let n = out.len().min(self.queue.len());
        for (o, s) in out.iter_mut().zip(self.queue.drain(..n)) {
            *o = s;
        }
        out[n..].fill(0);
    }
}

impl Drop for Leg {
    fn drop(&mut self) {
        // One frame has no spacing to measure.
        if let Some(histogram) = &self.jitter_histogram {
            if self.meter.frames >= 2 {
                histogram.observe(self.meter.jitter);
            }
        }
    }
}

fn resamplers(leg: SampleRate, agent: SampleRate) -> (Resampler, Resampler) {
    // Supported rates are all multiples of 8 kHz, which the FFT resampler handles; a failure
    // here would be a bug, and pass-through keeps audio flowing rather than killing the call.
    let make = |from: SampleRate, to: SampleRate| {
        Resampler::new(from.hz(), to.hz()).unwrap_or_else(|e| {
            warn!(error = %e, "resampler unavailable; passing audio through");
            Resampler::passthrough()
        })
    };
    (make(leg, agent), make(agent, leg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn leg(metrics: &Metrics, kind: LegKind, quality: Option<std::sync::Arc<LegQuality>>) -> Leg {
        let (tx, _rx) = mpsc::channel(8);
        let link = LegLink {
            rate: SampleRate::Hz16000,
            tx,
            kind,
            quality,
        };
        Leg::new(LegId::CALLER, link, SampleRate::Hz16000, metrics)
    }

    #[test]
    fn a_simulated_legs_jitter_is_observed_once_at_its_end() {
        let metrics = Metrics::new();
        let t0 = tokio::time::Instant::now();
        let mut with_audio = leg(&metrics, LegKind::Sim, None);
        for i in 0..10u32 {
            with_audio.arrived(320, t0 + Duration::from_millis(20) * i);
        }
        let mut one_frame = leg(&metrics, LegKind::Sim, None);
        one_frame.arrived(320, t0);
        // A leg whose own task measures its network observes the histogram itself.
        let mut measured = leg(
            &metrics,
            LegKind::Sip,
            Some(std::sync::Arc::new(LegQuality::default())),
        );
        measured.arrived(320, t0);
        measured.arrived(320, t0 + Duration::from_millis(20));
        let count = |kind: &str| {
            let text = metrics.encode();
            let line = format!("telcoflow_leg_jitter_seconds_count{{leg_kind=\"{kind}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()).map(str::to_owned))
                .unwrap_or_else(|| panic!("no {line} in\n{text}"))
        };
        assert_eq!(count("sim"), "0", "observed before the leg ended");
        drop((with_audio, one_frame, measured));
        assert_eq!(count("sim"), "1", "one leg with spacing to measure");
        assert_eq!(count("sip"), "0");
    }
}
