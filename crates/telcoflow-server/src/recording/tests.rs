use super::*;
use crate::call::SamplePool;
use telcoflow_proto::recording::PausedSpan;

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("telcoflow-recordings-{}", Uuid::new_v4()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn store(dir: &Path, retention_days: u64, max_concurrent: usize) -> Arc<Recordings> {
    let config = RecordingConfig {
        dir: dir.to_owned(),
        retention_days,
        max_concurrent,
    };
    Arc::new(Recordings::open(config, TaskTracker::new()).unwrap())
}

fn new_recording(connector: &str) -> NewRecording<'_> {
    NewRecording {
        call_id: "call-1",
        session_id: "session-1",
        connector,
        from: "+100",
        to: "+200",
        trigger: RecordingTrigger::Command,
        rate: SampleRate::Hz8000,
    }
}

/// Sends `frames` stereo frames of (left, right) values, the nth after `lost[n]` lost ones,
/// then stops the recording and waits until its file is finished.
async fn record(
    store: &Arc<Recordings>,
    connector: &str,
    frames: &[(i16, i16, u32)],
    summary: Summary,
) -> RecordingInfo {
    let sink = store.start(new_recording(connector)).unwrap();
    let mut pool = SamplePool::default();
    for &(left, right, lost_before) in frames {
        let stereo: Vec<i16> = (0..160).flat_map(|_| [left, right]).collect();
        let frame = pool.frame(&stereo);
        sink.frames
            .send(Chunk { lost_before, frame })
            .await
            .unwrap();
    }
    store.set_state(&sink.id, RecordingState::Stopping);
    sink.done.send(summary).unwrap();
    drop(sink.frames);
    store
        .finished_info(connector, &sink.id, Duration::from_secs(10))
        .await
        .expect("listed")
        .expect("finished")
}

fn read_wav(path: &Path) -> (hound::WavSpec, Vec<i16>) {
    let mut reader = hound::WavReader::open(path).unwrap();
    let samples = reader.samples::<i16>().map(Result::unwrap).collect();
    (reader.spec(), samples)
}

#[tokio::test]
async fn frames_are_written_as_stereo_with_lost_frames_as_silence() {
    let dir = TempDir::new();
    let store = store(&dir.0, 30, 4);
    // Two frames lost before frame 30, and more than a batch's worth before frame 50.
    let lost = |i: i16| match i {
        30 => 2,
        50 => 120,
        _ => 0,
    };
    let frames: Vec<(i16, i16, u32)> = (0..60).map(|i| (i, -i, lost(i))).collect();
    let summary = Summary {
        paused_spans: vec![PausedSpan {
            at_ms: 200,
            paused_ms: 1500,
        }],
        lost_frames: 125,
        lost_at_end: 3,
    };
    let info = record(&store, "k1", &frames, summary).await;
    assert_eq!(info.state, RecordingState::Complete);
    // 60 frames and 125 lost (3 after the last), 20 ms each.
    assert_eq!(info.duration_ms, 185 * 20);
    assert_eq!(info.lost_frames, 125);
    assert_eq!(info.paused_spans.len(), 1);
    let wav = store.audio_path(&Uuid::parse_str(&info.id).unwrap());
    assert_eq!(info.bytes, std::fs::metadata(&wav).unwrap().len());
    let (spec, samples) = read_wav(&wav);
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (2, 8000, 16)
    );
    assert_eq!(samples.len(), 185 * 160 * 2);
    let frame_of = |n: usize| &samples[n * 320..(n + 1) * 320];
    assert!(frame_of(29).chunks(2).all(|s| s == [29, -29]));
    assert!(
        frame_of(30).iter().all(|s| *s == 0),
        "a lost frame is silence"
    );
    assert!(frame_of(31).iter().all(|s| *s == 0));
    assert!(frame_of(32).chunks(2).all(|s| s == [30, -30]));
    assert!(frame_of(51).chunks(2).all(|s| s == [49, -49]));
    assert!((52..172).all(|n| frame_of(n).iter().all(|s| *s == 0)));
    assert!(frame_of(172).chunks(2).all(|s| s == [50, -50]));
    assert!(frame_of(181).chunks(2).all(|s| s == [59, -59]));
    assert!((182..185).all(|n| frame_of(n).iter().all(|s| *s == 0)));
    // The metadata beside the file says the same, and is found again by a new process.
    let again = self::store(&dir.0, 30, 4);
    let id = Uuid::parse_str(&info.id).unwrap();
    assert_eq!(again.get("k1", &id), Some(info));
}

#[tokio::test]
async fn recordings_are_scoped_to_their_connector_and_paged() {
    let dir = TempDir::new();
    let store = store(&dir.0, 30, 4);
    let a = record(&store, "k1", &[(1, 1, 0)], Summary::default()).await;
    let b = record(&store, "k1", &[(1, 1, 0)], Summary::default()).await;
    let other = record(&store, "k2", &[(1, 1, 0)], Summary::default()).await;
    let id = |i: &RecordingInfo| Uuid::parse_str(&i.id).unwrap();
    assert!(store.get("k1", &id(&other)).is_none());
    assert!(store.get("k2", &id(&other)).is_some());
    let page = store.list("k1", None, 0, 1);
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.next_offset, Some(1));
    let rest = store.list("k1", None, 1, 10);
    assert_eq!(rest.next_offset, None);
    let mut ids: Vec<String> = page
        .items
        .iter()
        .chain(&rest.items)
        .map(|i| i.id.clone())
        .collect();
    ids.sort();
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(store.list("k1", Some("call-1"), 0, 10).items.len(), 2);
    assert_eq!(store.list("k1", Some("call-2"), 0, 10).items.len(), 0);
    assert_eq!(store.delete("k2", &id(&a)), Err(DeleteError::NotFound));
    assert_eq!(store.delete("k1", &id(&a)), Ok(()));
    assert!(!store.audio_path(&id(&a)).exists());
    assert!(!dir.0.join(format!("{}.json", a.id)).exists());
}

#[tokio::test]
async fn the_sweep_deletes_recordings_past_their_retention() {
    let dir = TempDir::new();
    let store = store(&dir.0, 1, 4);
    let info = record(&store, "k1", &[(5, 5, 0)], Summary::default()).await;
    let id = Uuid::parse_str(&info.id).unwrap();
    let ended = SystemTime::UNIX_EPOCH + Duration::from_millis(info.ended_at_ms.unwrap());
    // A running recording is never swept, however old.
    let running = store.start(new_recording("k1")).unwrap();
    let day = Duration::from_secs(86_400);
    assert_eq!(store.sweep(ended + day - Duration::from_secs(1)), 0);
    assert!(store.audio_path(&id).exists());
    assert_eq!(store.sweep(ended + day + Duration::from_secs(1)), 1);
    assert!(store.get("k1", &id).is_none());
    assert!(!store.audio_path(&id).exists());
    assert!(!dir.0.join(format!("{id}.json")).exists());
    assert!(store.get("k1", &running.id).is_some());
    // Retention 0 keeps everything.
    let keep = self::store(&dir.0, 0, 4);
    assert_eq!(keep.sweep(ended + day * 10_000), 0);
}

#[tokio::test]
async fn a_node_records_at_most_max_concurrent_at_once() {
    let dir = TempDir::new();
    let store = store(&dir.0, 30, 1);
    let first = store.start(new_recording("k1")).unwrap();
    assert!(matches!(
        store.start(new_recording("k1")),
        Err(StartError::Full(1))
    ));
    store.set_state(&first.id, RecordingState::Stopping);
    first.done.send(Summary::default()).unwrap();
    drop(first.frames);
    store
        .finished_info("k1", &first.id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert!(store.start(new_recording("k1")).is_ok());
}

#[tokio::test]
async fn a_recording_left_running_by_a_stopped_process_is_incomplete() {
    let dir = TempDir::new();
    let store = store(&dir.0, 30, 4);
    let sink = store.start(new_recording("k1")).unwrap();
    let mut pool = SamplePool::default();
    // Two batches' worth (a second each at 8 kHz), so that a checkpoint is on disk.
    for _ in 0..100 {
        let frame = pool.frame(&[7i16; 320]);
        sink.frames
            .send(Chunk {
                lost_before: 0,
                frame,
            })
            .await
            .unwrap();
    }
    // The call goes away without finishing (its actor failed): no summary.
    let id = sink.id;
    drop(sink);
    store.set_state(&id, RecordingState::Stopping);
    let info = store
        .finished_info("k1", &id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.state, RecordingState::Incomplete);
    assert_eq!(info.duration_ms, 2000);
    // A metadata file still saying "recording" (the process died) is incomplete at start.
    let mut stale = info.clone();
    stale.id = Uuid::new_v4().to_string();
    stale.state = RecordingState::Recording;
    writer::write_info(&dir.0, &stale);
    std::fs::copy(
        store.audio_path(&id),
        dir.0.join(format!("{}.wav", stale.id)),
    )
    .unwrap();
    let reopened = self::store(&dir.0, 30, 4);
    let found = reopened.get("k1", &stale.id.parse().unwrap()).unwrap();
    assert_eq!(found.state, RecordingState::Incomplete);
    assert_eq!(found.duration_ms, 2000);
}
