//! The call's side of its recording: on every 20 ms tick, one stereo frame (the caller, with
//! any connected destination, left; the agent as played, right) to the recording's writer,
//! without waiting or allocating; and `call.record` (start, stop, pause, resume).
//!
//! Caller audio alone with the agent goes to the agent as it lands, between ticks: here it
//! waits in a small queue primed with two frames, so that a frame landing just after its tick
//! is not taken as a gap. Pausing leaves audio out of the file (it is not replaced by
//! silence); the paused spans are kept in the metadata.

use super::actor::{CallActor, Phase};
use super::frames::SamplePool;
use crate::recording::{Chunk, NewRecording, RecordingSink, StartError, Summary};
use serde_json::Value;
use std::collections::VecDeque;
use telcoflow_proto::media::{CommandResponse, RecordAction, RecordData, RecordResult};
use telcoflow_proto::recording::{PausedSpan, RecordingState, RecordingTrigger};
use telcoflow_proto::{ErrorCode, SampleRate};
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tracing::{info, warn};

/// What `call.record` answers on a server without `[recording]`.
const NOT_CONFIGURED: &str =
    "recording is not configured on this server: add a [recording] section with a dir";
/// Caller frames queued before the first is taken (absorbs arrival jitter against the tick).
const CALLER_PRIME_FRAMES: usize = 2;
/// Caller frames queued at most; beyond, the oldest are dropped (the phone's clock runs fast).
const CALLER_MAX_FRAMES: usize = 6;

/// A running recording, as its call keeps it.
pub(super) struct Recorder {
    sink: RecordingSink,
    rate: SampleRate,
    paused_since: Option<Instant>,
    spans: Vec<PausedSpan>,
    /// Frames in the file so far, lost ones included (its timeline).
    frames: u64,
    lost: u64,
    /// Frames lost since the last one the writer took.
    lost_pending: u32,
    /// Caller audio (agent rate) waiting for its tick, while the caller is alone.
    caller: VecDeque<i16>,
    caller_primed: bool,
    stereo: Vec<i16>,
    pool: SamplePool,
    /// Counts this recording in `telcoflow_recordings_active` while it runs.
    _active: crate::metrics::Held,
    lost_frames: prometheus::IntCounter,
}

impl Recorder {
    fn new(sink: RecordingSink, rate: SampleRate, metrics: &crate::metrics::Metrics) -> Self {
        let n = rate.frame_samples();
        Self {
            sink,
            rate,
            paused_since: None,
            spans: Vec::new(),
            frames: 0,
            lost: 0,
            lost_pending: 0,
            caller: VecDeque::with_capacity(CALLER_MAX_FRAMES * n),
            caller_primed: false,
            stereo: Vec::with_capacity(2 * n),
            pool: SamplePool::default(),
            _active: crate::metrics::Held::new(&metrics.recordings_active),
            lost_frames: metrics.recording_lost_frames.clone(),
        }
    }

    fn id(&self) -> String {
        self.sink.id.to_string()
    }

    fn state(&self) -> RecordingState {
        if self.paused_since.is_some() {
            RecordingState::Paused
        } else {
            RecordingState::Recording
        }
    }

    fn duration_ms(&self) -> u64 {
        self.frames * u64::from(telcoflow_proto::audio::FRAME_MS)
    }

    fn result(&self, state: RecordingState, already: bool) -> Option<Value> {
        let result = RecordResult::new(self.id(), state, self.duration_ms(), already);
        serde_json::to_value(result).ok()
    }

    /// Caller audio at the agent rate that went to the agent as it landed.
    pub(super) fn caller_audio(&mut self, samples: &[i16]) {
        if self.paused_since.is_some() {
            return;
        }
        self.caller.extend(samples);
        let max = CALLER_MAX_FRAMES * self.rate.frame_samples();
        if self.caller.len() > max {
            let excess = self.caller.len() - max;
            self.caller.drain(..excess);
        }
    }

    /// One tick: `left` is the caller's frame (mixed with the destination's) when the tick
    /// has one, else the queued caller audio is taken; `right` the agent's frame as played, if
    /// any. Returns false once the writer is gone.
    pub(super) fn tick(&mut self, left: Option<&[i16]>, right: Option<&[i16]>) -> bool {
        if self.paused_since.is_some() {
            return true;
        }
        let n = self.rate.frame_samples();
        self.stereo.clear();
        self.stereo.resize(2 * n, 0);
        match left {
            Some(left) => {
                // Connected: the caller comes mixed on the tick; what queued alone is stale.
                self.caller.clear();
                for (o, s) in self.stereo.chunks_exact_mut(2).zip(left) {
                    o[0] = *s;
                }
            }
            None => {
                let primed = self.caller.len() >= CALLER_PRIME_FRAMES * n;
                self.caller_primed |= primed;
                if self.caller_primed {
                    let take = n.min(self.caller.len());
                    for (o, s) in self
                        .stereo
                        .chunks_exact_mut(2)
                        .zip(self.caller.drain(..take))
                    {
                        o[0] = s;
                    }
                    // Ran dry (the caller stopped sending): prime again before taking more.
                    self.caller_primed = take == n;
                }
            }
        }
        if let Some(right) = right {
            for (o, s) in self.stereo.chunks_exact_mut(2).zip(right) {
                o[1] = *s;
            }
        }
        self.frames += 1;
        let frame = self.pool.frame(&self.stereo);
        let chunk = Chunk {
            lost_before: self.lost_pending,
            frame,
        };
        match self.sink.frames.try_send(chunk) {
            Ok(()) => self.lost_pending = 0,
            Err(TrySendError::Full(_)) => {
                if self.lost == 0 {
                    warn!(recording = %self.sink.id, "the recording's writer is behind; frames are lost");
                }
                self.lost += 1;
                self.lost_pending += 1;
                self.lost_frames.inc();
            }
            Err(TrySendError::Closed(_)) => return false,
        }
        true
    }

    fn pause(&mut self, now: Instant) {
        if self.paused_since.is_none() {
            self.paused_since = Some(now);
            self.caller.clear();
            self.caller_primed = false;
        }
    }

    fn resume(&mut self, now: Instant) {
        if let Some(since) = self.paused_since.take() {
            self.spans.push(PausedSpan {
                at_ms: self.duration_ms(),
                paused_ms: now.saturating_duration_since(since).as_millis() as u64,
            });
        }
    }

    /// Stops the recording; its writer finishes the file.
    fn finish(mut self, now: Instant) -> u64 {
        self.resume(now);
        let duration = self.duration_ms();
        let summary = Summary {
            paused_spans: std::mem::take(&mut self.spans),
            lost_frames: self.lost,
            lost_at_end: self.lost_pending,
        };
        let _ = self.sink.done.send(summary);
        duration
    }
}

impl CallActor {
    /// Starts a recording of the call; `Err` says why not, for the app.
    fn start_recording(&mut self, trigger: RecordingTrigger) -> Result<(), (ErrorCode, String)> {
        let Some(store) = self.shared.recordings.clone() else {
            return Err((ErrorCode::RecordingNotConfigured, NOT_CONFIGURED.to_owned()));
        };
        let h = &self.handle;
        let sink = store
            .start(NewRecording {
                call_id: &h.call_id,
                session_id: &h.session_id,
                connector: &h.connector,
                from: &h.from,
                to: &h.to,
                trigger,
                rate: self.rate(),
            })
            .map_err(|e| match e {
                StartError::Full(_) => (ErrorCode::QuotaExceeded, e.to_string()),
            })?;
        info!(recording = %sink.id, ?trigger, "recording started");
        self.recorder = Some(Recorder::new(sink, self.rate(), &self.shared.metrics));
        Ok(())
    }

    /// The call was answered: a connector that records every call starts recording.
    pub(super) fn record_by_config(&mut self) {
        if self.connector.record && self.recorder.is_none() {
            if let Err((_, why)) = self.start_recording(RecordingTrigger::Config) {
                warn!(%why, "the call is not recorded");
            }
        }
    }

    /// Stops the call's recording, if one runs; returns what it holds, in milliseconds.
    pub(super) fn stop_recording(&mut self) -> Option<(String, u64)> {
        let recorder = self.recorder.take()?;
        let id = recorder.id();
        if let Some(store) = &self.shared.recordings {
            store.set_state(&recorder.sink.id, RecordingState::Stopping);
        }
        let duration = recorder.finish(self.now);
        info!(recording = %id, duration_ms = duration, "recording stopped");
        Some((id, duration))
    }

    /// Feeds the recording one tick of audio (see [`Recorder::tick`]).
    pub(super) fn record_tick(&mut self, left: Option<&[i16]>, right: Option<&[i16]>) {
        let rate = self.rate();
        let Some(recorder) = &mut self.recorder else {
            return;
        };
        if recorder.rate != rate {
            // The agent's format changed under the recording (a new claim): this one ends.
            warn!("the call's audio format changed; its recording stops");
            self.stop_recording();
            return;
        }
        if !recorder.tick(left, right) {
            warn!("the recording's writer is gone; the recording stops");
            self.stop_recording();
        }
    }

    /// `call.record`: start, stop, pause or resume the call's recording.
    pub(super) fn on_record(&mut self, id: String, data: Option<Value>) {
        let action = match data.map(serde_json::from_value::<RecordData>) {
            Some(Ok(d)) => d.action,
            _ => {
                return self.respond(CommandResponse::error(
                    id,
                    ErrorCode::InvalidRequest,
                    "call.record needs data {\"action\": \"start\" | \"stop\" | \"pause\" | \"resume\"}",
                ));
            }
        };
        if self.shared.recordings.is_none() {
            return self.respond(CommandResponse::error(
                id,
                ErrorCode::RecordingNotConfigured,
                NOT_CONFIGURED,
            ));
        }
        let now = self.now;
        let result = match (action, self.recorder.as_mut()) {
            (RecordAction::Start, Some(r)) => Ok(r.result(r.state(), true)),
            (RecordAction::Start, None) if self.phase != Phase::Answered => Err((
                ErrorCode::InvalidState,
                "answer the call before recording it".to_owned(),
            )),
            (RecordAction::Start, None) => {
                self.start_recording(RecordingTrigger::Command).map(|()| {
                    self.recorder
                        .as_ref()
                        .and_then(|r| r.result(RecordingState::Recording, false))
                })
            }
            (RecordAction::Pause | RecordAction::Resume, Some(r)) => {
                if action == RecordAction::Pause {
                    r.pause(now);
                } else {
                    r.resume(now);
                }
                let state = r.state();
                if let Some(store) = &self.shared.recordings {
                    store.set_state(&r.sink.id, state);
                }
                info!(recording = %r.sink.id, action = action.as_str(), "recording");
                Ok(r.result(state, false))
            }
            (RecordAction::Stop, Some(_)) => {
                let (recording_id, duration) = self.stop_recording().unwrap_or_default();
                let result =
                    RecordResult::new(recording_id, RecordingState::Stopping, duration, false);
                Ok(serde_json::to_value(result).ok())
            }
            (_, None) => Err((
                ErrorCode::InvalidState,
                format!(
                    "no recording is running to {}: start one first",
                    action.as_str()
                ),
            )),
        };
        match result {
            Ok(value) => self.respond(CommandResponse::ok(id, value)),
            Err((code, message)) => self.respond(CommandResponse::error(id, code, message)),
        }
    }
}
