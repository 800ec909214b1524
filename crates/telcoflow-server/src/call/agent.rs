//! The agent's side of a call: its media connection coming and going, the audio it sends
//! (into the playout buffer, which moves the media clock), the `buffer_request`s that pace it,
//! and the send policy for everything the call sends it.

use super::actor::{CallActor, Phase};
use super::frames::json_bytes;
use super::handle::{AttachError, MediaLink, MediaOut};
use crate::metrics::{DropCause, QueueKind};
use telcoflow_proto::ErrorCode;
use telcoflow_proto::media::{
    BufferRequest, CHANNEL_MIXED, CallEvent, CommandResponse, MediaServerFrame,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// `reason` of a `call.audio_skipped` event after the agent stalled.
const AUDIO_SKIPPED_STALL: &str = "agent_stall";
/// `reason` of a `call.audio_skipped` event for a party's audio that a stall of the server
/// itself left stale.
pub(super) const AUDIO_SKIPPED_SERVER_STALL: &str = "server_stall";

/// Slots of a media connection's queue kept free of audio, so that responses and events
/// always fit even when the agent reads audio too slowly.
const MEDIA_TEXT_RESERVE: usize = 16;

impl CallActor {
    /// A media connection wants to attach: refused while another is attached, after the agent
    /// has left, or with an expired token unless it comes back after a lost connection.
    pub(super) fn attach(
        &mut self,
        link: MediaLink,
        token_expired: bool,
    ) -> Result<(), AttachError> {
        if self.agent_left {
            return Err(AttachError::AgentLeft);
        }
        if self.media.is_some() {
            return Err(AttachError::AlreadyAttached);
        }
        // A token outlives its lifetime only to bring back a lost connection: a call longer
        // than the lifetime must survive a network blip too.
        if token_expired && self.media_lost_at.is_none() {
            return Err(AttachError::TokenExpired);
        }
        debug!(conn_id = link.conn_id, "media connection attached");
        self.media = Some(link);
        self.media_lost_at = None;
        self.slow_media_reported = false;
        self.playout.forget_requests();
        self.shared
            .registry
            .set_media_attached(&self.handle.session_id, true);
        self.request_audio();
        self.deliver_kept_marks();
        Ok(())
    }

    /// Agent audio (channel 0) from the current media connection, into the playout buffer.
    pub(super) fn on_agent_audio(&mut self, pcm: &[u8]) {
        self.handle.live.heard_from_agent();
        let gaps = self.playout.gaps();
        // Audio that missed the latest tick by less than a frame is the media
        // clock's to answer for; a longer gap (a pause) is the pre-buffer's.
        let missed_tick = self.playout.ran_dry_at_last_tick();
        let pushed = self.playout.push(pcm, self.now);
        self.agent_counts.frames_from += 1;
        self.agent_counts.overflow_bytes += pushed.overflow as u64;
        let first = if self.phase == Phase::Answered {
            self.aligner.first_audio()
        } else {
            None
        };
        if let Some(margin) = first {
            // The clock started with the call, at a phase of its own: play the
            // first audio a margin after it lands and keep time from there.
            self.tick_at = Some(self.now + margin);
        } else if self.playout.gaps() > gaps && missed_tick {
            if let Some(margin) = self.aligner.missed() {
                self.playout.forgive_gap();
                // The frame missed its tick by a few ms: play it a margin after
                // it landed rather than a whole frame later behind the next one.
                // The clock restarts from there; the aligner tightens it again.
                self.tick_at = Some(self.now + margin);
            }
        }
        if pushed.overflow > 0 {
            let frame = self.playout.frame_bytes().max(1);
            self.shared
                .metrics
                .dropped(DropCause::AgentOverflow)
                .inc_by(pushed.overflow.div_ceil(frame) as u64);
        }
        if pushed.overflow == 0 {
            self.overflow_reported = false;
        } else if !self.overflow_reported {
            // Once per episode: a client flooding audio must not also get an
            // event per frame.
            self.overflow_reported = true;
            let message = format!(
                "{} bytes of agent audio beyond what the server asked for were refused",
                pushed.overflow
            );
            self.send_event(CallEvent::error(ErrorCode::BufferOverflow, message));
        }
    }

    /// What playout asks of the call after a tick: a ping when a live stream ran dry (to tell
    /// a stalled agent from a paused one), and the report of a finished catch-up.
    pub(super) fn after_pop(&mut self, now: Instant) {
        if self.media.is_some() {
            if let Some(seq) = self.playout.ping_due(now) {
                self.send_media(MediaOut::Ping(seq));
            }
        }
        if let Some(skipped) = self.playout.take_skipped() {
            let frame = self.playout.frame_bytes().max(1);
            self.shared
                .metrics
                .dropped(DropCause::StallCatchUp)
                .inc_by(skipped.bytes.div_ceil(frame) as u64);
            let dropped_ms = self.bytes_to_ms(skipped.bytes as u64);
            let owed_ms = self.bytes_to_ms(skipped.owed as u64);
            info!(
                dropped_ms,
                owed_ms, "agent audio dropped to win back the delay a stall left"
            );
            self.agent_counts.stall_ms += dropped_ms;
            self.send_event(CallEvent::audio_skipped(dropped_ms, AUDIO_SKIPPED_STALL));
        }
    }

    /// Asks the agent for audio if the playout buffer wants some.
    pub(super) fn request_audio(&mut self) {
        if self.media.is_none() || self.agent_left {
            return;
        }
        if let Some(bytes) = self.playout.want() {
            let frame = MediaServerFrame::BufferRequest(BufferRequest {
                requested_bytes: bytes as u32,
                prefer_audio_frame_bytes: self.playout.frame_bytes() as u32,
                channel_id: CHANNEL_MIXED,
            });
            let json = json_bytes(&mut self.text_pool, &frame);
            if self.send_media(MediaOut::Json(json)) {
                self.playout.requested(bytes);
            }
        }
    }

    pub(super) fn respond(&mut self, response: CommandResponse) {
        let started = self
            .commands_started
            .iter()
            .position(|(id, _, _)| *id == response.command_id)
            .map(|i| self.commands_started.swap_remove(i));
        // An unknown command was never started: counted under one name.
        let (name, at) = started.map_or(("unknown", None), |(_, name, at)| (name, Some(at)));
        let seconds = at.map_or(0.0, |at| at.elapsed().as_secs_f64());
        self.shared
            .metrics
            .command(name, response.error_code.as_deref(), seconds);
        self.send_media(MediaOut::Response(
            MediaServerFrame::CommandResponse(response).encode(),
        ));
    }

    pub(super) fn send_event(&mut self, event: CallEvent) {
        let mut text = MediaServerFrame::CallEvent(event).encode();
        // A string as long as its buffer becomes the socket's `Bytes` with no allocation on
        // the media task, which allocates nothing per frame; an event is rare, this copy cheap.
        text.shrink_to_fit();
        self.send_media(MediaOut::Text(text));
    }

    /// Queues a frame for the media connection without waiting. A connection that cannot keep
    /// up loses audio frames (reported once as `SLOW_CONSUMER`); one that cannot even take a
    /// text frame is closed, since commands and events must not be lost.
    pub(super) fn send_media(&mut self, out: MediaOut) -> bool {
        let Some(media) = &self.media else {
            return false;
        };
        let is_audio = matches!(out, MediaOut::Audio(_));
        if is_audio {
            self.handle
                .live
                .sent_to_agent(media.tx.capacity() > MEDIA_TEXT_RESERVE);
        }
        if is_audio && media.tx.capacity() <= MEDIA_TEXT_RESERVE {
            self.shared.metrics.dropped(DropCause::SlowAgent).inc();
            self.agent_counts.slow_consumer += 1;
            if !self.slow_media_reported {
                self.shared.metrics.overflow(QueueKind::MediaSend).inc();
                self.slow_media_reported = true;
                warn!("agent is not reading its audio; frames are being dropped");
                let ev = MediaServerFrame::CallEvent(CallEvent::error(
                    ErrorCode::SlowConsumer,
                    "the application is not reading audio fast enough; frames were dropped",
                ));
                // The reserve guarantees room for this.
                let _ = media.tx.try_send(MediaOut::Text(ev.encode()));
            }
            return false;
        }
        match media.tx.try_send(out) {
            Ok(()) => {
                self.agent_counts.frames_to += u64::from(is_audio);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.metrics.overflow(QueueKind::MediaSend).inc();
                warn!("media connection cannot take even a control frame; closing it");
                let _ = media.tx.try_send(MediaOut::Close);
                self.detach_media();
                false
            }
            // The connection's task has ended; its detach notice is on the way.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!("media connection already gone");
                self.detach_media();
                false
            }
        }
    }

    /// The media connection is gone without the agent leaving: the call waits for it to come
    /// back with the same URL and token, for [`MEDIA_GRACE`](super::actor::MEDIA_GRACE).
    pub(super) fn detach_media(&mut self) {
        self.media = None;
        self.resend_recent_marks();
        self.shared
            .registry
            .set_media_attached(&self.handle.session_id, false);
        if !self.agent_left {
            self.media_lost_at = Some(self.now);
        }
    }

    pub(super) fn close_media(&mut self) {
        if let Some(media) = self.media.take() {
            let _ = media.tx.try_send(MediaOut::Close);
        }
        self.shared
            .registry
            .set_media_attached(&self.handle.session_id, false);
    }
}
