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
    /// Lost frames after the last one sent (written as silence at the end).
    pub(crate) lost_at_end: u32,
}

/// The audio waiting for the file, written a batch (about a second) at a time.
struct Batches<'a> {
    wav: &'a mut Option<Wav>,
    batch: &'a mut Vec<i16>,
    batch_samples: usize,
    /// Samples (both channels) in the file so far.
    written: u64,
}

impl Batches<'_> {
    /// Appends `silence` samples of silence, then `frame`, writing each batch as it fills:
    /// a long stall of the disk becomes silence a batch at a time, never one huge buffer.
    async fn append(&mut self, mut silence: usize, frame: &[i16]) -> Result<(), hound::Error> {
        loop {
            let n = silence.min(self.batch_samples.saturating_sub(self.batch.len()));
            self.batch.resize(self.batch.len() + n, 0);
            silence -= n;
            if silence == 0 {
                self.batch.extend_from_slice(frame);
            }
            if self.batch.len() >= self.batch_samples {
                self.flush().await?;
            }
            if silence == 0 {
                return Ok(());
            }
        }
    }

    /// Writes what is waiting.
    async fn flush(&mut self) -> Result<(), hound::Error> {
        self.written += write(self.wav, self.batch).await?;
        Ok(())
    }
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
    let mut failed = wav.is_none();
    let mut batches = Batches {
        wav: &mut wav,
        batch: &mut batch,
        batch_samples,
        written: 0,
    };
    while let Some(chunk) = frames.recv().await {
        if failed {
            // Taken and dropped, so that the call never waits on a file that cannot be written.
            continue;
        }
        let silence = chunk.lost_before as usize * frame_samples;
        if let Err(e) = batches.append(silence, &chunk.frame).await {
            error!(recording = %info.id, error = %e, "cannot write the recording; the rest of the call is not recorded");
            failed = true;
        }
    }
    let summary = done.await;
    if !failed {
        // Frames lost at the very end came after the last one the writer took.
        let silence = summary.as_ref().map_or(0, |s| s.lost_at_end as usize) * frame_samples;
        let written = match batches.append(silence, &[]).await {
            Ok(()) => batches.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            error!(recording = %info.id, error = %e, "cannot write the recording");
            failed = true;
        }
    }
    let samples_written = batches.written;
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
