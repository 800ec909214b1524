//! Media connection frames: one WebSocket per call.
//!
//! Text frames are JSON `{"type": ..., "data": {...}}`. Binary frames are audio: one channel byte
//! followed by PCM s16le mono at the control connection's sample rate (see [`AudioFrame`]).
//!
//! Flow control is pull-based: the server asks for agent audio with
//! [`MediaServerFrame::BufferRequest`], and the client answers each request, in order, with binary
//! frames of `prefer_audio_frame_bytes` until `requested_bytes` have been sent.
//!
//! Call events beyond the reference SDK's `call.terminated` and `call.error` (clients ignore
//! names they do not know, as the official Python SDK does):
//!
//! | `event` | fields | when |
//! |---|---|---|
//! | `call.dtmf` | `digit`, `duration_ms` | the caller pressed a key |
//! | `call.connected_leg` | `state` (`answered` / `ended`) | the destination of `call.connect` answered or hung up |
//! | `call.stats` | the [`CallStats`](crate::stats::CallStats) fields: `call_id`, `session_id`, `duration_ms`, `legs`, `agent` | at the end of the call, just before `call.terminated`: its quality figures |
//! | `call.transfer_progress` | `method` (`refer`), `status`, `reason` | a SIP caller asked to call a `call.transfer` target (REFER) reports how that call goes: the status line of each NOTIFY's sipfrag (e.g. `100` `Trying`, `180` `Ringing`, `200` `OK`) |
//! | `call.audio_skipped` | `dropped_ms`, `reason` (`agent_stall`, `server_stall`) | `agent_stall`: the server dropped live agent audio to win back the delay a stall of the agent left (one event per catch-up); `server_stall`: the server itself stalled and dropped a phone's audio of that time, stale by then |
//! | `call.mark` | `name`, `id` (if the mark had one), `cleared`, `played_ms` | a mark placed with `agent.mark` was reached: the audio before it has been played to the phone (`cleared: false`), or an interrupt dropped it (`cleared: true`); `played_ms`: agent audio heard since the call began, at that point |
//!
//! Commands beyond the reference SDK's (the official Python SDK never sends them):
//!
//! | `command` | `data` | result |
//! |---|---|---|
//! | `call.send_dtmf` | [`SendDtmfData`]: `digits`, `durationMs` | `{"queuedMs": n}`: sent right away, the digits queued; they reach the caller over the next `n` ms |
//! | `agent.mark` | [`MarkData`]: `name`, `id` | `{"name", "id"}`: the mark is placed after the audio received before it; `call.mark` follows once the caller has heard that audio |
//! | `call.record` | [`RecordData`]: `action` (`start`, `stop`, `pause`, `resume`) | [`RecordResult`]: `recordingId`, `state`, `durationMs` (see [`crate::recording`]) |
//! | `call.transfer` | [`TransferData`]: `target`, `ringTimeSeconds` | once the transfer is done: `{"method": "refer" \| "bridge", "target", ...}`; a failure carries the same `result` beside its error code |
//!
//! `agent.interrupt` takes an optional [`InterruptData`] (`since_mark`) and answers with an
//! [`InterruptResult`]: what the caller heard (`played_ms`), what was dropped (`dropped_bytes`)
//! and the marks it cleared. The official Python SDK sends no data and ignores the result.
//!
//! The server may also send WebSocket pings on the media connection (when live agent audio runs
//! dry, to tell a stalled agent from a paused one); WebSocket libraries answer them by themselves.

use crate::{DecodeError, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Path prefix of media WebSocket endpoints; the full path is `{MEDIA_PATH}/{call_id}`.
pub const MEDIA_PATH: &str = "/v1/agent/media";

/// Channel 0: the call as the agent hears it, every other party mixed.
pub const CHANNEL_MIXED: u8 = 0;
/// Channel 1 (isolated mode): the caller alone.
pub const CHANNEL_CALLER: u8 = 1;
/// Channel 2 (isolated mode): the connected callee alone.
pub const CHANNEL_CALLEE: u8 = 2;

/// Frame size the client uses when a `buffer_request` names none.
pub const DEFAULT_PREFER_FRAME_BYTES: usize = 960;

/// Lowest and highest ring time `call.connect` accepts, in seconds.
pub const RING_TIME_RANGE: std::ops::RangeInclusive<u32> = 1..=120;

/// Most marks (`agent.mark`) a call holds at once, placed and not yet reached or cleared.
pub const MAX_MARKS: usize = 64;
/// Longest mark name, in bytes of UTF-8.
pub const MAX_MARK_NAME_BYTES: usize = 128;

/// Checks a mark name's length (1 to [`MAX_MARK_NAME_BYTES`] bytes); `Err` says what is wrong.
pub fn check_mark_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_MARK_NAME_BYTES {
        return Err(format!(
            "a mark name is 1 to {MAX_MARK_NAME_BYTES} bytes, got {}",
            name.len()
        ));
    }
    Ok(())
}

/// A call command name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandName {
    /// `call.answer`: pick the call up.
    Answer,
    /// `call.connect`: ring the call's destination and bridge it in.
    Connect,
    /// `agent.whisper`: the agent is heard by the connected party only.
    Whisper,
    /// `agent.barge`: the agent is heard by both parties.
    Barge,
    /// `agent.spy`: the agent listens and is heard by nobody.
    Spy,
    /// `call.disconnect`: end the call for everyone.
    Disconnect,
    /// `call.close`: the agent leaves (the call ends unless it was connected).
    Close,
    /// `agent.interrupt`: drop every byte of agent audio not yet played.
    Interrupt,
    /// `call.send_dtmf` (extension): send DTMF digits to the caller ([`SendDtmfData`]).
    SendDtmf,
    /// `agent.mark` (extension): a named mark after the agent audio sent so far
    /// ([`MarkData`]).
    Mark,
    /// `call.record` (extension): start, stop, pause or resume the call's recording
    /// ([`RecordData`]).
    Record,
    /// `call.transfer` (extension): hand the caller over to another party and leave
    /// ([`TransferData`]).
    Transfer,
}

impl CommandName {
    /// Every command.
    pub const ALL: [Self; 12] = [
        Self::Answer,
        Self::Connect,
        Self::Whisper,
        Self::Barge,
        Self::Spy,
        Self::Disconnect,
        Self::Close,
        Self::Interrupt,
        Self::SendDtmf,
        Self::Mark,
        Self::Record,
        Self::Transfer,
    ];

    /// The name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Answer => "call.answer",
            Self::Connect => "call.connect",
            Self::Whisper => "agent.whisper",
            Self::Barge => "agent.barge",
            Self::Spy => "agent.spy",
            Self::Disconnect => "call.disconnect",
            Self::Close => "call.close",
            Self::Interrupt => "agent.interrupt",
            Self::SendDtmf => "call.send_dtmf",
            Self::Mark => "agent.mark",
            Self::Record => "call.record",
            Self::Transfer => "call.transfer",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for CommandName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command as sent by the client. `command` stays a string so that an unknown command can be
/// answered with a clear error instead of failing to decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Id echoed in the response.
    pub command_id: String,
    /// Command name, see [`CommandName`].
    pub command: String,
    /// The client's deadline; the server answers `TIMEOUT` rather than let it pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Command arguments (`call.connect`: [`ConnectData`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// Arguments of `call.connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectData {
    /// How long to ring the destination, 1..=120 seconds.
    pub ring_time_seconds: u32,
}

/// Arguments of `call.send_dtmf` (extension): `{"digits": "12#", "durationMs": 100}`.
///
/// `digits`: 1 to 32 of `0-9 * # A-D`; `durationMs`: tone per digit, 40..=2000 (default 100),
/// rounded up to whole 20 ms frames; digits are 60 ms apart. The server checks them and
/// answers `INVALID_REQUEST` saying what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendDtmfData {
    /// The digits, in order.
    pub digits: String,
    /// Tone per digit, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u32>,
}

/// Arguments of `agent.mark` (extension): `{"name": "sentence-3", "id": 7}`.
///
/// The mark goes after every byte of agent audio sent before the command, in the order of the
/// connection's frames. `name`: 1 to [`MAX_MARK_NAME_BYTES`] bytes; `id`: any number the client
/// picks, echoed in `call.mark` (the Rust SDK numbers its marks to recognise them). A call holds
/// at most [`MAX_MARKS`] marks at once; beyond, `QUOTA_EXCEEDED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkData {
    /// The mark's name.
    pub name: String,
    /// The client's number for the mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

/// Arguments of `agent.interrupt` (all optional; the reference SDK sends none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptData {
    /// Count `played_ms` from this mark (the latest reached with that name) rather than
    /// from the start of the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_mark: Option<String>,
}

/// The result of `agent.interrupt`. Clients that know nothing of it (the official Python SDK)
/// ignore it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptResult {
    /// Bytes of agent audio the server held and dropped.
    pub dropped_bytes: u64,
    /// The same, under its earlier name.
    #[serde(rename = "droppedBytes", default)]
    pub dropped_bytes_compat: u64,
    /// Agent audio the caller heard, in ms: since `since_mark` when it is set, else since the
    /// call began. Counted as it is played to the phone's leg, to one 20 ms frame.
    pub played_ms: u64,
    /// Agent audio the caller heard since the call began, in ms.
    #[serde(default)]
    pub played_total_ms: u64,
    /// The mark `played_ms` counts from: the one asked for, when the call knew it (reached,
    /// or cleared by this interrupt, which makes `played_ms` 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_mark: Option<String>,
    /// Marks the interrupt cleared, in the order they were placed (each also reported as a
    /// `call.mark` with `cleared: true`, sent before this response).
    #[serde(default)]
    pub cleared_marks: Vec<String>,
}

/// Arguments of `call.record` (extension): `{"action": "start"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordData {
    /// What to do with the call's recording.
    pub action: RecordAction,
}

/// What `call.record` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordAction {
    /// Start recording (a recording already running is kept: `alreadyRecording`).
    Start,
    /// Stop and finish the recording; a new `start` begins another one.
    Stop,
    /// Leave audio out of the recording from now on (card numbers and other secrets).
    Pause,
    /// Record again after a pause.
    Resume,
}

impl RecordAction {
    /// The name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Pause => "pause",
            Self::Resume => "resume",
        }
    }
}

/// Result of `call.record` (extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct RecordResult {
    /// The recording the action applied to (its id in the HTTP API).
    pub recording_id: String,
    /// Where the recording is after the action.
    pub state: crate::recording::RecordingState,
    /// Audio in the recording so far (paused time left out), in milliseconds.
    pub duration_ms: u64,
    /// `start` found a recording already running (started by the connector's config or an
    /// earlier `start`) and kept it.
    #[serde(default)]
    pub already_recording: bool,
}

impl RecordResult {
    /// A result for `recording_id`.
    pub fn new(
        recording_id: impl Into<String>,
        state: crate::recording::RecordingState,
        duration_ms: u64,
        already_recording: bool,
    ) -> Self {
        Self {
            recording_id: recording_id.into(),
            state,
            duration_ms,
            already_recording,
        }
    }
}

/// Longest `call.transfer` target, in characters.
pub const MAX_TRANSFER_TARGET_LEN: usize = 256;

/// Ring time of a `call.transfer` that names none, in seconds.
pub const DEFAULT_TRANSFER_RING_SECONDS: u32 = 30;

/// Arguments of `call.transfer` (extension): `{"target": "sip:+15550100@pbx.example"}`.
///
/// `target`: a `sip:` or `sips:` URI, or a phone number (an optional `+` and 1 to 32
/// digits), at most [`MAX_TRANSFER_TARGET_LEN`] characters, and one the connector may
/// transfer to. `ringTimeSeconds`: how long the target may ring, 1..=120 (default
/// [`DEFAULT_TRANSFER_RING_SECONDS`]). A SIP caller is sent a REFER for a SIP target;
/// otherwise the server dials the target, bridges it to the caller and the agent leaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferData {
    /// Where the caller goes.
    pub target: String,
    /// How long the target may ring, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_time_seconds: Option<u32>,
}

/// Text frames the client sends on a media connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum MediaClientFrame {
    /// A call command.
    #[serde(rename = "command")]
    Command(Command),
}

impl MediaClientFrame {
    /// Decodes a text frame.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// Text frames the server sends on a media connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum MediaServerFrame {
    /// The outcome of a command.
    #[serde(rename = "command_response")]
    CommandResponse(CommandResponse),
    /// The server wants more agent audio.
    #[serde(rename = "buffer_request")]
    BufferRequest(BufferRequest),
    /// Something happened to the call.
    #[serde(rename = "call_event")]
    CallEvent(CallEvent),
}

impl MediaServerFrame {
    /// Decodes a text frame.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// `command_response` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// The command's id.
    pub command_id: String,
    /// Whether it succeeded.
    pub success: bool,
    /// Result payload, on success.
    #[serde(default)]
    pub result: Option<Value>,
    /// Error code, on failure (a string so that unknown codes still decode).
    #[serde(default)]
    pub error_code: Option<String>,
    /// Human-readable reason, on failure.
    #[serde(default)]
    pub error_message: Option<String>,
}

impl CommandResponse {
    /// A success with an optional result.
    pub fn ok(command_id: impl Into<String>, result: Option<Value>) -> Self {
        Self {
            command_id: command_id.into(),
            success: true,
            result,
            error_code: None,
            error_message: None,
        }
    }

    /// A failure.
    pub fn error(
        command_id: impl Into<String>,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Self {
        Self {
            command_id: command_id.into(),
            success: false,
            result: None,
            error_code: Some(code.as_str().to_owned()),
            error_message: Some(message.into()),
        }
    }
}

/// `buffer_request` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferRequest {
    /// How many bytes of agent audio the server wants.
    pub requested_bytes: u32,
    /// The size of each binary frame the server would like (20 ms).
    #[serde(default)]
    pub prefer_audio_frame_bytes: u32,
    /// The channel the audio is for (only 0 carries agent audio).
    #[serde(rename = "channelId", default)]
    pub channel_id: u8,
}

/// `call_event` body: an event name plus any extra fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallEvent {
    /// Event name, e.g. [`CallEvent::TERMINATED`].
    pub event: String,
    /// Every other field of the event.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl CallEvent {
    /// The call ended; the media connection closes next.
    pub const TERMINATED: &'static str = "call.terminated";
    /// Something failed on the call; it may go on.
    pub const ERROR: &'static str = "call.error";
    /// The caller pressed a key (RFC 4733).
    pub const DTMF: &'static str = "call.dtmf";
    /// The connected destination answered or hung up (`state`: `answered` / `ended`).
    pub const CONNECTED_LEG: &'static str = "call.connected_leg";
    /// Audio was dropped to win back delay after a stall (`dropped_ms`, `reason`).
    pub const AUDIO_SKIPPED: &'static str = "call.audio_skipped";
    /// How a transfer goes (`method`, `status`, `reason`): a NOTIFY from a referred caller.
    pub const TRANSFER_PROGRESS: &'static str = "call.transfer_progress";
    /// A dialled destination (`destination`) sends early media before it answers: the
    /// party that waits for it hears them (extension).
    pub const EARLY_MEDIA: &'static str = "call.early_media";

    /// The call's quality figures, at its end (the [`CallStats`](crate::stats::CallStats)
    /// fields).
    pub const STATS: &'static str = "call.stats";
    /// A mark was reached or cleared (`name`, `id`, `cleared`, `played_ms`).
    pub const MARK: &'static str = "call.mark";

    /// `call.mark`: mark `name` (the client's `id`, if it gave one) was reached, or cleared
    /// by an interrupt; `played_ms` of agent audio had been heard then.
    pub fn mark(name: &str, id: Option<u64>, cleared: bool, played_ms: u64) -> Self {
        let mut fields = Map::new();
        fields.insert("name".into(), Value::from(name));
        if let Some(id) = id {
            fields.insert("id".into(), Value::from(id));
        }
        fields.insert("cleared".into(), Value::from(cleared));
        fields.insert("played_ms".into(), Value::from(played_ms));
        Self {
            event: Self::MARK.into(),
            fields,
        }
    }

    /// `call.stats` carrying `stats` as its fields.
    pub fn stats(stats: &crate::stats::CallStats) -> Self {
        let fields = match serde_json::to_value(stats) {
            Ok(Value::Object(fields)) => fields,
            // Cannot happen: a struct of numbers and strings is an object.
            _ => Map::new(),
        };
        Self {
            event: Self::STATS.into(),
            fields,
        }
    }

    /// The figures of a `call.stats` event; `None` for another event or a malformed one.
    pub fn to_stats(&self) -> Option<crate::stats::CallStats> {
        if self.event != Self::STATS {
            return None;
        }
        serde_json::from_value(Value::Object(self.fields.clone())).ok()
    }

    /// `call.terminated` with the party that ended the call.
    pub fn terminated(reason: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("reason".into(), Value::from(reason));
        Self {
            event: Self::TERMINATED.into(),
            fields,
        }
    }

    /// `call.error` with a code and message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut fields = Map::new();
        fields.insert("error_code".into(), Value::from(code.as_str()));
        fields.insert("error_message".into(), Value::from(message.into()));
        Self {
            event: Self::ERROR.into(),
            fields,
        }
    }

    /// `call.dtmf` for one key press.
    pub fn dtmf(digit: char, duration_ms: u32) -> Self {
        let mut fields = Map::new();
        fields.insert("digit".into(), Value::from(digit.to_string()));
        fields.insert("duration_ms".into(), Value::from(duration_ms));
        Self {
            event: Self::DTMF.into(),
            fields,
        }
    }

    /// `call.audio_skipped`: `dropped_ms` of audio dropped, and why (e.g. `agent_stall`).
    pub fn audio_skipped(dropped_ms: u64, reason: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("dropped_ms".into(), Value::from(dropped_ms));
        fields.insert("reason".into(), Value::from(reason));
        Self {
            event: Self::AUDIO_SKIPPED.into(),
            fields,
        }
    }

    /// `call.transfer_progress`: the transfer by `method` (`refer`) is at SIP `status`.
    pub fn transfer_progress(method: &str, status: u16, reason: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("method".into(), Value::from(method));
        fields.insert("status".into(), Value::from(status));
        fields.insert("reason".into(), Value::from(reason));
        Self {
            event: Self::TRANSFER_PROGRESS.into(),
            fields,
        }
    }

    /// `call.early_media`: the dialled `destination` plays early media (ringback,
    /// announcements) before answering.
    pub fn early_media(destination: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("destination".into(), Value::from(destination));
        Self {
            event: Self::EARLY_MEDIA.into(),
            fields,
        }
    }

    /// A string field of the event.
    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }
}

/// A binary audio frame: channel id plus PCM payload, borrowed from the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFrame<'a> {
    /// Channel id (see [`CHANNEL_MIXED`]).
    pub channel: u8,
    /// PCM s16le mono.
    pub pcm: &'a [u8],
}

impl<'a> AudioFrame<'a> {
    /// Splits a binary frame into channel and PCM. Frames shorter than 2 bytes carry no audio.
    pub fn decode(frame: &'a [u8]) -> Result<Self, DecodeError> {
        match frame {
            [channel, pcm @ ..] if !pcm.is_empty() => Ok(Self {
                channel: *channel,
                pcm,
            }),
            _ => Err(DecodeError::ShortAudio(frame.len())),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(1 + self.pcm.len());
        out.push(self.channel);
        out.extend_from_slice(self.pcm);
    }

    /// The encoded frame as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.pcm.len());
        self.encode_into(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn command_from_reference_client() {
        let text = r#"{"type":"command","data":{"command_id":"c1","command":"call.connect","timeout_ms":30000,"data":{"ringTimeSeconds":30}}}"#;
        let MediaClientFrame::Command(cmd) = MediaClientFrame::decode(text).unwrap();
        assert_eq!(CommandName::parse(&cmd.command), Some(CommandName::Connect));
        assert_eq!(cmd.timeout_ms, Some(30_000));
        let data: ConnectData = serde_json::from_value(cmd.data.unwrap()).unwrap();
        assert_eq!(data.ring_time_seconds, 30);
        assert_eq!(CommandName::parse("call.fly"), None);
    }

    #[test]
    fn send_dtmf_command_shape() {
        let text = r#"{"type":"command","data":{"command_id":"c2","command":"call.send_dtmf","data":{"digits":"12#","durationMs":80}}}"#;
        let MediaClientFrame::Command(cmd) = MediaClientFrame::decode(text).unwrap();
        assert_eq!(
            CommandName::parse(&cmd.command),
            Some(CommandName::SendDtmf)
        );
        let data: SendDtmfData = serde_json::from_value(cmd.data.unwrap()).unwrap();
        assert_eq!((data.digits.as_str(), data.duration_ms), ("12#", Some(80)));
        let d: SendDtmfData = serde_json::from_value(json!({"digits": "5"})).unwrap();
        assert_eq!(d.duration_ms, None);
    }

    #[test]
    fn mark_and_interrupt_shapes() {
        let cmd: Command = serde_json::from_value(json!({
            "command_id": "m1", "command": "agent.mark", "data": {"name": "s1", "id": 3}
        }))
        .unwrap();
        assert_eq!(CommandName::parse(&cmd.command), Some(CommandName::Mark));
        let data: MarkData = serde_json::from_value(cmd.data.unwrap()).unwrap();
        assert_eq!((data.name.as_str(), data.id), ("s1", Some(3)));
        // The reference SDK's interrupt carries no data; ours may name a mark.
        let d: InterruptData = serde_json::from_value(json!({})).unwrap();
        assert_eq!(d.since_mark, None);
        let result = InterruptResult {
            dropped_bytes: 640,
            dropped_bytes_compat: 640,
            played_ms: 1200,
            played_total_ms: 3000,
            since_mark: Some("s1".into()),
            cleared_marks: vec!["s2".into()],
        };
        let v = serde_json::to_value(&result).unwrap();
        assert_eq!(
            v,
            json!({"dropped_bytes": 640, "droppedBytes": 640, "played_ms": 1200,
                   "played_total_ms": 3000, "since_mark": "s1", "cleared_marks": ["s2"]})
        );
        assert_eq!(
            serde_json::from_value::<InterruptResult>(v).unwrap(),
            result
        );
        let ev = CallEvent::mark("s1", Some(3), false, 1200);
        let text = MediaServerFrame::CallEvent(ev).encode();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back["data"],
            json!({"event": "call.mark", "name": "s1", "id": 3, "cleared": false, "played_ms": 1200})
        );
    }

    #[test]
    fn record_command_shape() {
        let text = r#"{"type":"command","data":{"command_id":"c3","command":"call.record","data":{"action":"pause"}}}"#;
        let MediaClientFrame::Command(cmd) = MediaClientFrame::decode(text).unwrap();
        assert_eq!(CommandName::parse(&cmd.command), Some(CommandName::Record));
        let data: RecordData = serde_json::from_value(cmd.data.unwrap()).unwrap();
        assert_eq!(data.action, RecordAction::Pause);
        assert!(serde_json::from_value::<RecordData>(json!({"action": "rewind"})).is_err());
        let result = RecordResult::new("r1", crate::recording::RecordingState::Paused, 1200, false);
        assert_eq!(
            serde_json::to_value(&result).unwrap(),
            json!({"recordingId": "r1", "state": "paused", "durationMs": 1200, "alreadyRecording": false})
        );
    }

    #[test]
    fn transfer_command_and_progress_shape() {
        let text = r#"{"type":"command","data":{"command_id":"c3","command":"call.transfer","data":{"target":"sip:+200@pbx.example","ringTimeSeconds":20}}}"#;
        let MediaClientFrame::Command(cmd) = MediaClientFrame::decode(text).unwrap();
        assert_eq!(
            CommandName::parse(&cmd.command),
            Some(CommandName::Transfer)
        );
        let data: TransferData = serde_json::from_value(cmd.data.unwrap()).unwrap();
        assert_eq!(data.target, "sip:+200@pbx.example");
        assert_eq!(data.ring_time_seconds, Some(20));
        let d: TransferData = serde_json::from_value(json!({"target": "+200"})).unwrap();
        assert_eq!(d.ring_time_seconds, None);
        let ev = MediaServerFrame::CallEvent(CallEvent::transfer_progress("refer", 180, "Ringing"));
        let v: Value = serde_json::from_str(&ev.encode()).unwrap();
        assert_eq!(
            v,
            json!({"type": "call_event", "data": {"event": "call.transfer_progress",
                "method": "refer", "status": 180, "reason": "Ringing"}})
        );
    }

    #[test]
    fn server_frames_shape() {
        let req = MediaServerFrame::BufferRequest(BufferRequest {
            requested_bytes: 1920,
            prefer_audio_frame_bytes: 640,
            channel_id: 0,
        });
        let v: Value = serde_json::from_str(&req.encode()).unwrap();
        assert_eq!(
            v,
            json!({"type":"buffer_request","data":{"requested_bytes":1920,"prefer_audio_frame_bytes":640,"channelId":0}})
        );
        let ev = MediaServerFrame::CallEvent(CallEvent::dtmf('5', 120));
        let v: Value = serde_json::from_str(&ev.encode()).unwrap();
        assert_eq!(
            v,
            json!({"type":"call_event","data":{"event":"call.dtmf","digit":"5","duration_ms":120}})
        );
        let resp = MediaServerFrame::CommandResponse(CommandResponse::error(
            "c",
            ErrorCode::CallUnanswered,
            "nobody answered",
        ));
        assert_eq!(MediaServerFrame::decode(&resp.encode()).unwrap(), resp);
    }

    #[test]
    fn stats_event_carries_the_figures_as_fields() {
        let stats = crate::stats::CallStats {
            call_id: "c1".into(),
            session_id: "s1".into(),
            duration_ms: 2000,
            legs: Vec::new(),
            agent: crate::stats::AgentStats::default(),
        };
        let ev = CallEvent::stats(&stats);
        let v: Value =
            serde_json::from_str(&MediaServerFrame::CallEvent(ev.clone()).encode()).unwrap();
        assert_eq!(v["data"]["event"], json!("call.stats"));
        assert_eq!(v["data"]["call_id"], json!("c1"));
        assert_eq!(v["data"]["duration_ms"], json!(2000));
        assert_eq!(ev.to_stats(), Some(stats));
        assert_eq!(CallEvent::terminated("caller").to_stats(), None);
    }

    #[test]
    fn audio_frame_bounds() {
        assert!(AudioFrame::decode(&[]).is_err());
        assert!(AudioFrame::decode(&[0]).is_err());
        let f = AudioFrame::decode(&[2, 1, 0]).unwrap();
        assert_eq!((f.channel, f.pcm), (2, &[1u8, 0][..]));
        assert_eq!(f.to_vec(), vec![2, 1, 0]);
    }
}
