//! Call recordings on this node: the directory of WAV files and their metadata, the writer
//! tasks that fill them off the audio path, and the retention sweep.
//!
//! Each recording is two files named by its id alone (a UUID the server makes, never anything
//! a client sent): `<id>.wav` (stereo 16-bit PCM) and `<id>.json` ([`RecordingInfo`]). The
//! index of every recording is kept in memory, read from the JSON files at start, so that the
//! HTTP API lists and checks recordings without touching the disk.
//!
//! A call's actor feeds its recording through a [`RecordingSink`]: one interleaved 20 ms frame
//! per tick over a bounded queue, never waiting (a frame that does not fit is counted as lost
//! and written as silence later). The recording's writer task batches frames and writes them
//! with `hound` in the blocking pool, checkpointing the WAV header after each batch, so that a
//! crash leaves a readable file up to about a second before.

mod writer;

pub(crate) use writer::{Chunk, Summary, unix_ms};

use crate::config::RecordingConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};
use telcoflow_proto::SampleRate;
use telcoflow_proto::recording::{RecordingInfo, RecordingPage, RecordingState, RecordingTrigger};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use uuid::Uuid;

/// Frames a recording's queue holds (one second): the writer's slack for a slow disk.
const QUEUE_FRAMES: usize = 50;

/// The recordings of this node.
#[derive(Debug)]
pub(crate) struct Recordings {
    config: RecordingConfig,
    index: std::sync::Mutex<HashMap<Uuid, RecordingInfo>>,
    /// Recordings started and not yet finished, against `max_concurrent`.
    running: AtomicUsize,
    /// Woken whenever a recording is finished.
    finished: Notify,
    tasks: TaskTracker,
}

/// What a new recording is of.
#[derive(Debug, Clone)]
pub(crate) struct NewRecording<'a> {
    pub(crate) call_id: &'a str,
    pub(crate) session_id: &'a str,
    pub(crate) connector: &'a str,
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) trigger: RecordingTrigger,
    pub(crate) rate: SampleRate,
}

/// Why a recording did not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("{0} recordings are running on this node (recording.max_concurrent)")]
    Full(usize),
}

/// Why a recording was not deleted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DeleteError {
    NotFound,
    Running,
}

/// The call's end of a recording: where its frames go, and how it is finished.
#[derive(Debug)]
pub(crate) struct RecordingSink {
    pub(crate) id: Uuid,
    pub(crate) frames: mpsc::Sender<Chunk>,
    pub(crate) done: oneshot::Sender<Summary>,
}

impl Recordings {
    /// The recordings in `config.dir` (created if missing); recordings left unfinished by an
    /// earlier process are marked [`RecordingState::Incomplete`].
    pub(crate) fn open(config: RecordingConfig, tasks: TaskTracker) -> std::io::Result<Self> {
        std::fs::create_dir_all(&config.dir)?;
        let mut index = HashMap::new();
        for entry in std::fs::read_dir(&config.dir)? {
            let path = entry?.path();
            let Some(id) = recording_id(&path, "json") else {
                continue;
            };
            let info = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<RecordingInfo>(&b).ok());
            let Some(mut info) = info.filter(|i| i.id == id.to_string()) else {
                warn!(file = %path.display(), "unreadable recording metadata; skipped");
                continue;
            };
            if !info.state.is_finished() {
                info.state = RecordingState::Incomplete;
                let wav = config.dir.join(format!("{id}.wav"));
                info.bytes = std::fs::metadata(&wav).map_or(0, |m| m.len());
                if let Ok(reader) = hound::WavReader::open(&wav) {
                    info.duration_ms =
                        u64::from(reader.duration()) * 1000 / u64::from(info.sample_rate.max(1));
                }
                writer::write_info(&config.dir, &info);
            }
            index.insert(id, info);
        }
        info!(dir = %config.dir.display(), recordings = index.len(), "recordings opened");
        Ok(Self {
            config,
            index: std::sync::Mutex::new(index),
            running: AtomicUsize::new(0),
            finished: Notify::new(),
            tasks,
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, RecordingInfo>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a recording: its writer task opens the file and takes the frames the call sends
    /// to the returned sink.
    pub(crate) fn start(
        self: &Arc<Self>,
        new: NewRecording<'_>,
    ) -> Result<RecordingSink, StartError> {
        let max = self.config.max_concurrent;
        let reserved = self
            .running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if reserved.is_err() {
            return Err(StartError::Full(max));
        }
        let id = Uuid::new_v4();
        let info = RecordingInfo {
            id: id.to_string(),
            call_id: new.call_id.to_owned(),
            session_id: new.session_id.to_owned(),
            connector: new.connector.to_owned(),
            from: new.from.to_owned(),
            to: new.to.to_owned(),
            state: RecordingState::Recording,
            started_by: new.trigger,
            started_at_ms: unix_ms(SystemTime::now()),
            ended_at_ms: None,
            duration_ms: 0,
            sample_rate: new.rate.hz(),
            channels: 2,
            paused_spans: Vec::new(),
            lost_frames: 0,
            bytes: 0,
        };
        self.index().insert(id, info.clone());
        let (frames, rx) = mpsc::channel(QUEUE_FRAMES);
        let (done, done_rx) = oneshot::channel();
        let store = self.clone();
        self.tasks.spawn(writer::run(
            self.config.dir.clone(),
            info,
            rx,
            done_rx,
            move |info| store.finished(info),
        ));
        Ok(RecordingSink { id, frames, done })
    }

    /// Notes a running recording's state (paused, recording again, stopping); a finished
    /// one (its writer failed first) stays as it is.
    pub(crate) fn set_state(&self, id: &Uuid, state: RecordingState) {
        if let Some(info) = self.index().get_mut(id).filter(|i| !i.state.is_finished()) {
            info.state = state;
        }
    }

    /// A recording's writer is done: its final metadata, written beside the file.
    fn finished(&self, info: RecordingInfo) {
        if let Ok(id) = Uuid::parse_str(&info.id) {
            self.index().insert(id, info);
        }
        self.running.fetch_sub(1, Ordering::AcqRel);
        self.finished.notify_waiters();
    }

    /// One page of the connector's recordings (of one call when `call_id` is given), oldest
    /// first.
    pub(crate) fn list(
        &self,
        connector: &str,
        call_id: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> RecordingPage {
        let index = self.index();
        let mut items: Vec<&RecordingInfo> = index
            .values()
            .filter(|i| i.connector == connector && call_id.is_none_or(|c| i.call_id == c))
            .collect();
        items.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
        let total = items.len();
        // Only the page is copied out of the index.
        let items: Vec<RecordingInfo> = items
            .into_iter()
            .skip(offset)
            .take(limit)
            .cloned()
            .collect();
        drop(index);
        let next = offset.saturating_add(items.len());
        RecordingPage::new(items, (next < total).then_some(next))
    }

    /// The connector's recording `id`; another connector's is not found alike.
    pub(crate) fn get(&self, connector: &str, id: &Uuid) -> Option<RecordingInfo> {
        self.index()
            .get(id)
            .filter(|i| i.connector == connector)
            .cloned()
    }

    /// The connector's recording `id` once finished: one being finished (stopped, its writer
    /// flushing) is waited for, up to `timeout`. `Err` with the info of one still running.
    pub(crate) async fn finished_info(
        &self,
        connector: &str,
        id: &Uuid,
        timeout: Duration,
    ) -> Option<Result<RecordingInfo, RecordingInfo>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.finished.notified();
            tokio::pin!(notified);
            // Registered before the check, so that a finish between the two is not missed.
            notified.as_mut().enable();
            let info = self.get(connector, id)?;
            if info.state.is_finished() {
                return Some(Ok(info));
            }
            if info.state != RecordingState::Stopping
                || tokio::time::timeout_at(deadline, notified).await.is_err()
            {
                return Some(Err(info));
            }
        }
    }

    /// Where recording `id`'s audio is.
    pub(crate) fn audio_path(&self, id: &Uuid) -> PathBuf {
        self.config.dir.join(format!("{id}.wav"))
    }

    /// Deletes the connector's finished recording `id` (both files). Blocking file I/O.
    pub(crate) fn delete(&self, connector: &str, id: &Uuid) -> Result<(), DeleteError> {
        {
            let mut index = self.index();
            let info = index
                .get(id)
                .filter(|i| i.connector == connector)
                .ok_or(DeleteError::NotFound)?;
            if !info.state.is_finished() {
                return Err(DeleteError::Running);
            }
            index.remove(id);
        }
        self.remove_files(id);
        Ok(())
    }

    fn remove_files(&self, id: &Uuid) {
        for ext in ["wav", "json"] {
            let path = self.config.dir.join(format!("{id}.{ext}"));
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(file = %path.display(), error = %e, "cannot delete a recording file");
                }
            }
        }
    }

    /// Deletes the finished recordings that ended longer than `recording.retention_days`
    /// before `now`; returns how many. Blocking file I/O.
    pub(crate) fn sweep(&self, now: SystemTime) -> usize {
        let Some(retention) = self.config.retention() else {
            return 0;
        };
        let cutoff = unix_ms(now).saturating_sub(retention.as_millis() as u64);
        let expired: Vec<Uuid> = {
            let mut index = self.index();
            let expired: Vec<Uuid> = index
                .iter()
                .filter(|(_, i)| {
                    i.state.is_finished() && i.ended_at_ms.unwrap_or(i.started_at_ms) < cutoff
                })
                .map(|(id, _)| *id)
                .collect();
            for id in &expired {
                index.remove(id);
            }
            expired
        };
        for id in &expired {
            self.remove_files(id);
        }
        if !expired.is_empty() {
            info!(
                deleted = expired.len(),
                retention_days = self.config.retention_days,
                "old recordings deleted"
            );
        }
        expired.len()
    }
}

/// The id of a recording file `<uuid>.<ext>` in the directory, if `path` is one.
fn recording_id(path: &Path, ext: &str) -> Option<Uuid> {
    if path.extension()? != ext {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let id = Uuid::parse_str(stem).ok()?;
    // Only the canonical spelling: the file the server would have made for this id.
    (id.to_string() == stem).then_some(id)
}

#[cfg(test)]
mod tests;
