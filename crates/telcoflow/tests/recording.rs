//! Call recording against the real server, in process: a simulated phone says a 440 Hz tone,
//! the agent answers with 880 Hz, and the WAV downloaded over HTTP has each on its own channel;
//! a pause leaves out what the caller said meanwhile; connectors see only their own recordings.

mod common;

use common::*;
use futures_util::StreamExt;
use std::f64::consts::PI;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use telcoflow::{
    ActiveCall, AudioChannel, AudioStream, CallErrorKind, Error, ErrorCode, RecordingQuery,
    RecordingState, RecordingTrigger, TelcoflowClient,
};
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::Config;
use telcoflow_server::config::{
    ConnectorConfig, DEV_CONNECT_DESTINATION, DEV_CONNECTOR_UUID, RecordingConfig,
};

const RATE: u32 = 16_000;
/// Samples of one 20 ms frame at [`RATE`].
const FRAME: usize = 320;

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4();
        Self(std::env::temp_dir().join(format!("telcoflow-recording-test-{id}")))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn recording_config(dir: &TempDir) -> Config {
    let mut config = Config::development();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.recording = Some(RecordingConfig::new(&dir.0));
    config
}

/// `seconds` of a sine at `hz` (amplitude 8000), at [`RATE`].
fn tone(hz: f64, seconds: f64) -> Vec<i16> {
    let n = (f64::from(RATE) * seconds) as usize;
    (0..n)
        .map(|i| (8000.0 * (2.0 * PI * hz * i as f64 / f64::from(RATE)).sin()) as i16)
        .collect()
}

/// The share of `samples`' power at `hz` (Goertzel): about 1 for a pure tone at `hz`, about
/// 0 for silence or other tones.
fn share(samples: &[i16], hz: f64) -> f64 {
    let n = samples.len() as f64;
    let coeff = 2.0 * (2.0 * PI * hz / f64::from(RATE)).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    let mut energy = 0.0;
    for &x in samples {
        let x = f64::from(x);
        energy += x * x;
        let s = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    if energy < 1.0 {
        return 0.0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    2.0 * power / (n * energy)
}

/// Waits until the agent has heard `frames` 20 ms frames of `hz` from the caller.
async fn hear_tone(audio: &mut AudioStream, hz: f64, frames: usize) {
    hear_tones(audio, &[hz], frames).await;
}

/// Waits until the agent has heard `frames` 20 ms frames with each of `tones` (mixed: each
/// about an equal share).
async fn hear_tones(audio: &mut AudioStream, tones: &[f64], frames: usize) {
    let least = 0.6 / tones.len() as f64;
    let mut pending: Vec<i16> = Vec::new();
    let mut found = 0;
    tokio::time::timeout(WAIT, async {
        while found < frames {
            let chunk = audio.next().await.expect("audio stream open");
            telcoflow_proto::audio::pcm_to_samples(&chunk, &mut pending);
            while pending.len() >= FRAME {
                if tones.iter().all(|hz| share(&pending[..FRAME], *hz) > least) {
                    found += 1;
                }
                pending.drain(..FRAME);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{frames} frames of {tones:?} Hz heard in time"));
}

/// Plays `samples` for the caller without end: a task writing them as the call's buffer takes
/// them (the SDK's buffer takes a write whole or not at all).
fn agent_says(call: &ActiveCall, samples: Vec<i16>) -> tokio::task::JoinHandle<()> {
    let call = call.clone();
    tokio::spawn(async move {
        let mut pcm = Vec::new();
        telcoflow_proto::audio::samples_to_pcm(&samples, &mut pcm);
        for chunk in pcm.chunks(FRAME * 2 * 5).cycle() {
            loop {
                match call.send_audio(chunk).await {
                    Ok(()) => break,
                    // Paced by the server's playout: wait for room.
                    Err(e) if e.kind() == CallErrorKind::BufferFull => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(_) => return,
                }
            }
        }
    })
}

/// The phone plays `samples` from now, instead of what it played.
fn phone_says(phone: &Phone, samples: Vec<i16>) {
    phone.control().stop_audio().expect("phone stops");
    let _ = phone.control().play(samples).expect("phone plays");
}

/// One 20 ms frame of a stereo recording: its left and right samples.
type StereoFrame = (Vec<i16>, Vec<i16>);

/// Per 20 ms frame of a stereo WAV: its left and right samples.
fn frames(wav: &[u8]) -> (hound::WavSpec, Vec<StereoFrame>) {
    let mut reader = hound::WavReader::new(std::io::Cursor::new(wav)).expect("a WAV file");
    let spec = reader.spec();
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let frames = samples
        .chunks_exact(FRAME * 2)
        .map(|f| {
            let left = f.iter().step_by(2).copied().collect();
            let right = f.iter().skip(1).step_by(2).copied().collect();
            (left, right)
        })
        .collect();
    (spec, frames)
}

fn count(frames: &[StereoFrame], f: impl Fn(&StereoFrame) -> bool) -> usize {
    frames.iter().filter(|fr| f(fr)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_is_left_the_agent_right_and_a_pause_leaves_the_caller_out() {
    let dir = TempDir::new();
    let server = start_server_with(recording_config(&dir)).await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    let mut heard = call.audio_stream(AudioChannel::Mixed);
    phone_says(&phone, tone(440.0, 60.0));
    let agent = agent_says(&call, tone(880.0, 1.0));

    let started = call.start_recording().await.unwrap();
    assert_eq!(started.state, RecordingState::Recording);
    assert!(!started.already_recording);
    let id = started.recording_id.clone();
    let again = call.start_recording().await.unwrap();
    assert!(again.already_recording);
    assert_eq!(again.recording_id, id);
    hear_tone(&mut heard, 440.0, 50).await;

    // The caller reads out a secret: paused, it stays out of the recording.
    let paused = call.pause_recording().await.unwrap();
    assert_eq!(paused.state, RecordingState::Paused);
    phone_says(&phone, tone(1000.0, 60.0));
    hear_tone(&mut heard, 1000.0, 25).await;
    phone_says(&phone, tone(440.0, 60.0));
    // Every frame of the secret has passed the call once the tone after it is heard.
    hear_tone(&mut heard, 440.0, 5).await;
    let resumed = call.resume_recording().await.unwrap();
    assert_eq!(resumed.state, RecordingState::Recording);
    hear_tone(&mut heard, 440.0, 50).await;
    let stopped = call.stop_recording().await.unwrap();
    assert_eq!(stopped.state, RecordingState::Stopping);
    // 100 frames heard while recording; each of the two recorded stretches may begin one
    // tick after the first frame heard in it (the command lands between ticks).
    assert!(stopped.duration_ms >= 1960, "{stopped:?}");
    let e = call.stop_recording().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidState), "{e}");
    agent.abort();

    let mut wav = Vec::new();
    let bytes = client.download_recording(&id, &mut wav).await.unwrap();
    assert_eq!(bytes, wav.len() as u64);
    let info = client.recording(&id).await.unwrap();
    assert_eq!(info.state, RecordingState::Complete);
    assert_eq!(info.started_by, RecordingTrigger::Command);
    assert_eq!(info.call_id, call.id());
    assert_eq!(info.bytes, bytes);
    assert_eq!(info.lost_frames, 0);
    assert_eq!(info.paused_spans.len(), 1, "{info:?}");
    assert!(info.paused_spans[0].paused_ms >= 500, "{info:?}");
    let (spec, frames) = frames(&wav);
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (2, RATE, 16)
    );
    assert_eq!(info.duration_ms, frames.len() as u64 * 20);
    assert!(info.duration_ms >= stopped.duration_ms);
    // The paused span is out: the file is as long as the recording's own count.
    let caller_440 = count(&frames, |(l, _)| share(l, 440.0) > 0.5);
    let agent_880 = count(&frames, |(_, r)| share(r, 880.0) > 0.5);
    assert!(caller_440 >= 80, "{caller_440} frames of the caller's tone");
    assert!(agent_880 >= 60, "{agent_880} frames of the agent's tone");
    // Each on its own side, and nothing of the secret anywhere.
    assert_eq!(count(&frames, |(l, _)| share(l, 880.0) > 0.2), 0);
    assert_eq!(count(&frames, |(_, r)| share(r, 440.0) > 0.2), 0);
    assert_eq!(
        count(&frames, |(l, r)| share(l, 1000.0) > 0.1
            || share(r, 1000.0) > 0.1),
        0,
        "paused audio was recorded"
    );
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_destination_is_mixed_with_the_caller_on_the_left() {
    let dir = TempDir::new();
    let server = start_server_with(recording_config(&dir)).await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let mut callee = Phone::register(server.base_url(), DEV_CONNECT_DESTINATION).await;
    let (phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    let mut heard = call.audio_stream(AudioChannel::Mixed);
    let id = call.start_recording().await.unwrap().recording_id;
    phone_says(&phone, tone(440.0, 60.0));
    let agent = agent_says(&call, tone(880.0, 1.0));
    let connecting = {
        let call = call.clone();
        tokio::spawn(async move { call.connect(Duration::from_secs(10)).await })
    };
    callee
        .wait_for(|f| matches!(f, NetworkFrame::Incoming { .. }))
        .await;
    callee.control().answer().unwrap();
    connecting.await.unwrap().unwrap();
    phone_says(&callee, tone(660.0, 60.0));
    hear_tones(&mut heard, &[440.0, 660.0], 50).await;
    call.stop_recording().await.unwrap();
    agent.abort();

    let mut wav = Vec::new();
    client.download_recording(&id, &mut wav).await.unwrap();
    let (_, frames) = frames(&wav);
    let both = count(&frames, |(l, _)| {
        share(l, 440.0) > 0.3 && share(l, 660.0) > 0.3
    });
    assert!(both >= 40, "{both} frames of caller and destination mixed");
    assert!(count(&frames, |(_, r)| share(r, 880.0) > 0.5) >= 40);
    assert_eq!(count(&frames, |(l, _)| share(l, 880.0) > 0.2), 0);
    assert_eq!(count(&frames, |(_, r)| share(r, 660.0) > 0.2), 0);
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}

const OTHER_UUID: &str = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e02";
const OTHER_KEY: &str = "other-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_that_records_by_config_records_every_call_for_itself_alone() {
    let dir = TempDir::new();
    let mut server_config = recording_config(&dir);
    server_config.connectors[0].record = true;
    let mut other = ConnectorConfig::development(OTHER_KEY, OTHER_UUID);
    other.numbers = vec!["+4900002".into()];
    server_config.connectors.push(other);
    let server = start_server_with(server_config).await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    let mut heard = call.audio_stream(AudioChannel::Mixed);
    phone_says(&phone, tone(440.0, 60.0));
    hear_tone(&mut heard, 440.0, 25).await;
    phone.hangup();
    call.terminated().await;

    let page = client
        .list_recordings(&RecordingQuery::default())
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1, "{page:?}");
    let info = &page.items[0];
    assert_eq!(info.started_by, RecordingTrigger::Config);
    assert_eq!(info.connector, DEV_CONNECTOR_UUID);
    let by_call = RecordingQuery::default().call_id(call.id());
    assert_eq!(
        client.list_recordings(&by_call).await.unwrap().items.len(),
        1
    );
    let mut wav = Vec::new();
    client.download_recording(&info.id, &mut wav).await.unwrap();
    let (_, frames) = frames(&wav);
    assert!(count(&frames, |(l, _)| share(l, 440.0) > 0.5) >= 15);

    // Another connector sees none of it.
    let stranger = TelcoflowClient::connect(
        builder(server.base_url())
            .api_key(OTHER_KEY, OTHER_UUID)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let theirs = stranger
        .list_recordings(&RecordingQuery::default())
        .await
        .unwrap();
    assert!(theirs.items.is_empty(), "{theirs:?}");
    let not_found = |e: Error| {
        assert!(
            matches!(&e, Error::RequestFailed { code, .. } if *code == ErrorCode::RecordingNotFound),
            "{e:?}"
        );
    };
    not_found(stranger.recording(&info.id).await.unwrap_err());
    not_found(
        stranger
            .download_recording(&info.id, &mut Vec::new())
            .await
            .unwrap_err(),
    );
    not_found(stranger.delete_recording(&info.id).await.unwrap_err());
    not_found(client.recording("../../etc/passwd").await.unwrap_err());

    // Its owner deletes it: the files go too.
    client.delete_recording(&info.id).await.unwrap();
    not_found(client.recording(&info.id).await.unwrap_err());
    assert!(!dir.0.join(format!("{}.wav", info.id)).exists());
    stranger.shutdown().await;
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn without_recording_configured_the_command_and_the_routes_say_so() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let (phone, call) = dial_and_answer(server.base_url(), &mut events).await;
    let e = call.start_recording().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RecordingNotConfigured), "{e}");
    let e = client
        .list_recordings(&RecordingQuery::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::RequestFailed { code, .. } if *code == ErrorCode::RecordingNotConfigured),
        "{e:?}"
    );
    phone.hangup();
    client.shutdown().await;
    server.shutdown().await;
}
