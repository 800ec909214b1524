//! Call recordings as the HTTP API describes them (`GET /public/v1/recordings`), and the
//! states a recording goes through.
//!
//! A recording is a stereo WAV file (16-bit PCM at the call's agent rate): the caller on the
//! left channel (mixed with the connected destination of a `call.connect`, while there is
//! one), the agent's audio as played on the right, one frame of each per 20 ms tick of the
//! call's media clock. Paused time is left out of the file; [`RecordingInfo::paused_spans`]
//! says where and for how long.

use serde::{Deserialize, Serialize};

/// Where a recording is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RecordingState {
    /// Audio is being written.
    Recording,
    /// Paused: no audio is written until it resumes.
    Paused,
    /// Stopped (or the call ended); the file is being finished.
    Stopping,
    /// Finished: the file is complete and can be downloaded.
    Complete,
    /// The server stopped before the recording was finished: the file holds the audio
    /// written up to its last checkpoint (about a second before).
    Incomplete,
}

impl RecordingState {
    /// The name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Recording => "recording",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Complete => "complete",
            Self::Incomplete => "incomplete",
        }
    }

    /// The file is finished (complete or not) and can be downloaded.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Complete | Self::Incomplete)
    }
}

/// Why a recording started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RecordingTrigger {
    /// The connector records every call (`record = true` in its config).
    Config,
    /// The agent sent `call.record` with `start`.
    Command,
}

/// A paused stretch of a recording: its audio is not in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PausedSpan {
    /// Where in the file's audio the pause falls, in milliseconds from its start.
    pub at_ms: u64,
    /// How long the recording was paused, in milliseconds.
    pub paused_ms: u64,
}

/// A recording's metadata (`GET /public/v1/recordings/{id}`; also kept beside the WAV file as
/// `<id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordingInfo {
    /// Recording id (a UUID): `GET /public/v1/recordings/{id}/audio` downloads it.
    pub id: String,
    /// The call recorded.
    pub call_id: String,
    /// The call's session.
    pub session_id: String,
    /// The connector the call belongs to.
    pub connector: String,
    /// The caller's number.
    pub from: String,
    /// The called number.
    pub to: String,
    /// Where the recording is.
    pub state: RecordingState,
    /// Why it started.
    pub started_by: RecordingTrigger,
    /// Unix milliseconds when it started.
    pub started_at_ms: u64,
    /// Unix milliseconds when it stopped, once it has.
    #[serde(default)]
    pub ended_at_ms: Option<u64>,
    /// Audio in the file, in milliseconds (paused time left out).
    pub duration_ms: u64,
    /// Samples per second of each channel.
    pub sample_rate: u32,
    /// Channels: 2, the caller (with any connected destination) left, the agent right.
    pub channels: u16,
    /// Where the recording was paused.
    #[serde(default)]
    pub paused_spans: Vec<PausedSpan>,
    /// 20 ms frames the writer could not take in time (a slow disk), written as silence so
    /// that the file keeps the call's timeline.
    #[serde(default)]
    pub lost_frames: u64,
    /// Size of the WAV file in bytes, once finished.
    #[serde(default)]
    pub bytes: u64,
}

/// One page of `GET /public/v1/recordings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct RecordingPage {
    /// The recordings, oldest first.
    pub items: Vec<RecordingInfo>,
    /// Where the next page starts, when more recordings follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
}

impl RecordingPage {
    /// A page of `items`, with `next_offset` when more follow.
    pub fn new(items: Vec<RecordingInfo>, next_offset: Option<usize>) -> Self {
        Self { items, next_offset }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_camel_case_with_lowercase_states() {
        let info = RecordingInfo {
            id: "r".into(),
            call_id: "c".into(),
            session_id: "s".into(),
            connector: "k".into(),
            from: "+1".into(),
            to: "+2".into(),
            state: RecordingState::Complete,
            started_by: RecordingTrigger::Config,
            started_at_ms: 1,
            ended_at_ms: Some(2),
            duration_ms: 3,
            sample_rate: 16000,
            channels: 2,
            paused_spans: vec![PausedSpan {
                at_ms: 4,
                paused_ms: 5,
            }],
            lost_frames: 0,
            bytes: 44,
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["state"], "complete");
        assert_eq!(json["startedBy"], "config");
        assert_eq!(json["pausedSpans"][0]["atMs"], 4);
        assert_eq!(json["sampleRate"], 16000);
        let back: RecordingInfo = serde_json::from_value(json).unwrap();
        assert_eq!(back, info);
    }
}
