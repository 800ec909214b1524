//! A recording's writer task: frames from the call's queue, batched, written with `hound` in
//! the blocking pool; the WAV header checkpointed after each batch and fixed up at the end,
//! and the metadata written beside it.

use crate::call::SampleFrame;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use telcoflow_proto::recording::{PausedSpan, RecordingInfo, RecordingState};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

/// Audio written in one blocking write, in milliseconds.
const BATCH_MS: usize = 1000;

/// One 20 ms stereo frame (left, right interleaved) from the call, after `lost_before` frames
/// that did not fit the queue (written as silence, so the file keeps the call's timeline).
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) lost_before: u32,
    pub(crate) frame: SampleFrame,
}

/// What the call knows of the recording once it stops.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) paused_spans: Vec<PausedSpan>,
    pub(crate) lost_frames: u64,
}

type Wav = hound::WavWriter<BufWriter<File>>;

/// Writes one recording into `dir` until the call closes its queue, then hands its final
/// metadata to `finished`.
pub(super) async fn run(
    dir: PathBuf,
    mut info: RecordingInfo,
    mut frames: mpsc::Receiver<Chunk>,
    done: oneshot::Receiver<Summary>,
    finished: impl FnOnce(RecordingInfo),
) {
    let path = dir.join(format!("{}.wav", info.id));
    let wav_path = path.clone();
    let info_dir = dir.clone();
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: info.sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let meta = info.clone();
    let created = blocking(move || {
        write_info(&dir, &meta);
        hound::WavWriter::create(&path, spec)
    })
    .await;
    let mut wav = match created {
        Some(Ok(wav)) => Some(wav),
        Some(Err(e)) => {
            error!(recording = %info.id, error = %e, "cannot create the recording file");
            None
        }
        None => None,
    };
    // Samples (both channels) of one 20 ms frame, for the silence of lost frames.
    let frame_samples = info.sample_rate as usize / 50 * 2;
    let batch_samples = info.sample_rate as usize * 2 * BATCH_MS / 1000;
    let mut batch: Vec<i16> = Vec::with_capacity(batch_samples + frame_samples);
    let mut samples_written: u64 = 0;
    let mut failed = wav.is_none();
    while let Some(chunk) = frames.recv().await {
        if failed {
            // Taken and dropped, so that the call never waits on a file that cannot be written.
            continue;
        }
        // Lost frames become silence a batch at a time: a long stall of the disk must not
        // turn into one huge buffer.
        let mut silence = chunk.lost_before as usize * frame_samples;
        let mut frame = Some(chunk.frame);
        while !failed && (silence > 0 || frame.is_some()) {
            let n = silence.min(batch_samples.saturating_sub(batch.len()));
            batch.resize(batch.len() + n, 0);
            silence -= n;
            if silence == 0 {
                if let Some(frame) = frame.take() {
                    batch.extend_from_slice(&frame);
                }
            }
            if batch.len() >= batch_samples {
                match write(&mut wav, &mut batch).await {
                    Ok(n) => samples_written += n,
                    Err(e) => {
                        error!(recording = %info.id, error = %e, "cannot write the recording; the rest of the call is not recorded");
                        failed = true;
                    }
                }
            }
        }
    }
    let summary = done.await;
    if !failed {
        match write(&mut wav, &mut batch).await {
            Ok(n) => samples_written += n,
            Err(e) => {
                error!(recording = %info.id, error = %e, "cannot write the recording");
                failed = true;
            }
        }
    }
    let finalized = match wav.take() {
        Some(wav) => blocking(move || wav.finalize()).await,
        None => None,
    };
    if let Some(Err(e)) = &finalized {
        error!(recording = %info.id, error = %e, "cannot finish the recording file");
        failed = true;
    }
    let complete = !failed && finalized.is_some() && summary.is_ok();
    let summary = summary.unwrap_or_default();
    info.state = if complete {
        RecordingState::Complete
    } else {
        RecordingState::Incomplete
    };
    info.ended_at_ms = Some(unix_ms(SystemTime::now()));
    info.duration_ms = samples_written / 2 * 1000 / u64::from(info.sample_rate.max(1));
    info.paused_spans = summary.paused_spans;
    info.lost_frames = summary.lost_frames;
    if info.lost_frames > 0 {
        warn!(
            recording = %info.id,
            lost_frames = info.lost_frames,
            "the recording's writer fell behind; frames were written as silence"
        );
    }
    let final_info = blocking(move || {
        info.bytes = std::fs::metadata(&wav_path).map_or(0, |m| m.len());
        write_info(&info_dir, &info);
        info
    })
    .await;
    if let Some(info) = final_info {
        debug!(recording = %info.id, duration_ms = info.duration_ms, state = ?info.state, "recording finished");
        finished(info);
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes `batch` to the file and checkpoints its header; returns the samples written.
async fn write(wav: &mut Option<Wav>, batch: &mut Vec<i16>) -> Result<u64, hound::Error> {
    let Some(mut w) = wav.take() else {
        return Ok(0);
    };
    if batch.is_empty() {
        *wav = Some(w);
        return Ok(0);
    }
    let mut samples = std::mem::take(batch);
    let result = blocking(move || {
        let written = (|| {
            let mut i16s = w.get_i16_writer(samples.len() as u32);
            for s in &samples {
                i16s.write_sample(*s);
            }
            i16s.flush()?;
            w.flush()
        })();
        let n = samples.len() as u64;
        samples.clear();
        (w, samples, written.map(|()| n))
    })
    .await;
    match result {
        Some((w, samples, written)) => {
            *wav = Some(w);
            *batch = samples;
            written
        }
        None => Err(hound::Error::IoError(std::io::Error::other(
            "the write was cancelled",
        ))),
    }
}

/// Runs `f` in the blocking pool; `None` if it panicked or the runtime is going away.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// Writes `<id>.json` beside the audio (through a temporary file, so that a reader never sees
/// half of it). Blocking file I/O.
pub(super) fn write_info(dir: &Path, info: &RecordingInfo) {
    let path = dir.join(format!("{}.json", info.id));
    let tmp = dir.join(format!("{}.json.tmp", info.id));
    let result = serde_json::to_vec_pretty(info)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        warn!(file = %path.display(), error = %e, "cannot write the recording's metadata");
    }
}
