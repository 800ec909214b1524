//! The writer task: applies to NATS, in order, what this node's calls reported to the
//! registry without waiting (admission under the call limit, media attachment, the end of a
//! session), retrying while NATS is away.

use super::NatsRegistry;
use super::record::{CallCounts, Offer, SessionRecord, Write, notify_subject};
use crate::call::CallInput;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use telcoflow_proto::control::{Activity, CloseReason, Initiator, SessionState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Attempts of one write while NATS is away, and the pause between them.
const ATTEMPTS: u32 = 20;
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// After shutdown, the writer stops once no write came for this long.
const QUIET_AFTER_SHUTDOWN: Duration = Duration::from_secs(1);

/// Why a write did not happen.
enum Failed {
    /// NATS answered, and no: the call limit is reached.
    Refused,
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> Failed {
    Failed::Nats(e.to_string())
}

/// Runs until shutdown and then until the writes of the calls that end with it are done.
pub(super) async fn run(
    registry: NatsRegistry,
    mut writes: mpsc::UnboundedReceiver<Write>,
    shutdown: CancellationToken,
) {
    let mut writer = Writer {
        registry,
        admitted: HashMap::new(),
        shutdown: shutdown.clone(),
    };
    loop {
        let write = tokio::select! {
            w = writes.recv() => w,
            () = shutdown.cancelled() => break,
        };
        let Some(write) = write else { return };
        writer.apply(write).await;
    }
    while let Ok(Some(write)) = tokio::time::timeout(QUIET_AFTER_SHUTDOWN, writes.recv()).await {
        writer.apply(write).await;
    }
}

struct Writer {
    registry: NatsRegistry,
    /// Sessions of this node counted in the calls bucket, with their connector.
    admitted: HashMap<String, String>,
    shutdown: CancellationToken,
}

impl Writer {
    /// Applies a write, waiting while NATS is away (the writes queue behind it, in order);
    /// gives up after [`ATTEMPTS`] failures while connected, or at once once the server
    /// is shutting down without NATS.
    async fn apply(&mut self, write: Write) {
        let mut attempts = 0;
        let refused = loop {
            if !self.registry.connected() {
                if self.shutdown.is_cancelled() {
                    warn!("cluster write dropped: shutting down without NATS");
                    break true;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            attempts += 1;
            match self.try_apply(&write).await {
                Ok(()) => return,
                Err(Failed::Refused) => {
                    info!("call refused: the connector's call limit is reached in the cluster");
                    break true;
                }
                Err(Failed::Nats(e)) if attempts < ATTEMPTS => {
                    debug!(error = %e, attempts, "cluster write failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(Failed::Nats(e)) => {
                    warn!(error = %e, "cluster write given up");
                    break true;
                }
            }
        };
        // A call that could not be admitted ends, never offered.
        if let (true, Write::Admit { call, .. }) = (refused, write) {
            call.send(CallInput::Close {
                reason: CloseReason::ForceClose,
                done: None,
            });
        }
    }

    async fn try_apply(&mut self, write: &Write) -> Result<(), Failed> {
        let inner = &self.registry.inner;
        match write {
            Write::Admit {
                record, max_calls, ..
            } => {
                let id = &record.info.id;
                let local = self.registry.local();
                // A call that ended while this waited in the queue is neither counted nor
                // offered: its record is written closed, for the listings.
                let ended = match local.info_of(id) {
                    Some(info) if info.state == SessionState::Closed => Some(info),
                    Some(_) => None,
                    None => return Ok(()),
                };
                let mut record = record.clone();
                if let Some(info) = ended {
                    record.info = info;
                } else if !self.admitted.contains_key(id) {
                    self.count(&record.connector, 1, Some(*max_calls)).await?;
                    self.admitted.insert(id.clone(), record.connector.clone());
                }
                let key = super::session_key(&record.connector, id);
                let value = serde_json::to_vec(&record).map_err(nats)?;
                match inner.sessions.create(&key, value.into()).await {
                    Ok(_) => {}
                    // Written by an earlier attempt whose answer was lost.
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(nats(e)),
                }
                // Checked again: the call may have ended while its record was written.
                if record.bound.is_none() && local.is_closed(id) == Some(false) {
                    let offer = Offer {
                        frame: super::notify(
                            &record.info,
                            Activity::NewIncomingCall,
                            record.info.opened_at,
                        ),
                        inbound: record.info.initiator == Initiator::Connector,
                    };
                    let payload = serde_json::to_vec(&offer).map_err(nats)?;
                    inner
                        .client
                        .publish(notify_subject(&record.connector), payload.into())
                        .await
                        .map_err(nats)?;
                }
                Ok(())
            }
            Write::MediaAttached { key, attached } => {
                self.update(key, |r| r.media_attached = *attached).await
            }
            Write::Ended {
                session_id,
                key,
                closed_at,
            } => {
                let closed = match key {
                    Some(key) => {
                        self.update(key, |r| {
                            r.info.state = SessionState::Closed;
                            r.info.closed_at = Some(*closed_at);
                        })
                        .await
                    }
                    None => Ok(()),
                };
                // The place is given back whatever became of the record. Forgotten first:
                // should the decrement be lost, the next heal counts right.
                if let Some(connector) = self.admitted.remove(session_id) {
                    self.count(&connector, -1, None).await?;
                }
                closed
            }
            Write::HealCounts => self.heal_counts().await,
            Write::Unclaim {
                connector,
                session_id,
                holder,
                owner,
            } => self
                .registry
                .unclaim_now(connector, session_id, holder, owner)
                .await
                .map_err(nats),
            Write::Forget { key, revision } => {
                NatsRegistry::delete_at(&inner.sessions, key, *revision)
                    .await
                    .map(drop)
                    .map_err(nats)
            }
            Write::Publish { subject, request } => {
                let payload = serde_json::to_vec(request).map_err(nats)?;
                inner
                    .client
                    .publish(subject.clone(), payload.into())
                    .await
                    .map_err(nats)
            }
        }
    }

    /// Changes a record by compare-and-set, reading it again after a concurrent write. A
    /// record that does not exist (a refused call) is left so.
    async fn update(&self, key: &str, change: impl Fn(&mut SessionRecord)) -> Result<(), Failed> {
        let store = &self.registry.inner.sessions;
        loop {
            let Some(entry) = store.entry(key).await.map_err(nats)? else {
                return Ok(());
            };
            if entry.operation != kv::Operation::Put {
                return Ok(());
            }
            let mut record: SessionRecord = serde_json::from_slice(&entry.value).map_err(nats)?;
            change(&mut record);
            let value = serde_json::to_vec(&record).map_err(nats)?;
            match store.update(key, value.into(), entry.revision).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(nats(e)),
            }
        }
    }

    /// Sets this node's entry in every connector's count to the calls it has admitted and
    /// not yet seen end, so that a write lost while NATS was away does not keep a place taken.
    async fn heal_counts(&self) -> Result<(), Failed> {
        let store = &self.registry.inner.calls;
        let me = self.registry.me();
        let mut mine: HashMap<&str, usize> = HashMap::new();
        for connector in self.admitted.values() {
            *mine.entry(connector).or_default() += 1;
        }
        let mut keys = store.keys().await.map_err(nats)?;
        let mut connectors = Vec::new();
        while let Some(key) = keys.next().await {
            connectors.push(key.map_err(nats)?);
        }
        for connector in connectors {
            let want = mine.get(connector.as_str()).copied().unwrap_or(0);
            loop {
                let Some(entry) = store.entry(&connector).await.map_err(nats)? else {
                    break;
                };
                let mut counts: CallCounts = if entry.operation == kv::Operation::Put {
                    serde_json::from_slice(&entry.value).unwrap_or_default()
                } else {
                    CallCounts::new()
                };
                if counts.get(me).copied().unwrap_or(0) == want {
                    break;
                }
                debug!(%connector, want, "healing this node's call count");
                counts.insert(me.to_owned(), want);
                let value = serde_json::to_vec(&counts).map_err(nats)?;
                match store.update(&connector, value.into(), entry.revision).await {
                    Ok(_) => break,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                    Err(e) => return Err(nats(e)),
                }
            }
        }
        Ok(())
    }

    /// Adds `delta` to this node's count of a connector's calls, by compare-and-set; with a
    /// `limit`, only while the cluster's sum stays within it.
    async fn count(&self, connector: &str, delta: i64, limit: Option<usize>) -> Result<(), Failed> {
        let store = &self.registry.inner.calls;
        let me = self.registry.me();
        loop {
            let entry = store.entry(connector).await.map_err(nats)?;
            let (mut counts, revision): (CallCounts, Option<u64>) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice(&e.value).unwrap_or_default(),
                    Some(e.revision),
                ),
                Some(e) => (CallCounts::new(), Some(e.revision)),
                None => (CallCounts::new(), None),
            };
            if let Some(limit) = limit
                && counts.values().sum::<usize>() >= limit
            {
                return Err(Failed::Refused);
            }
            let mine = counts.entry(me.to_owned()).or_default();
            *mine = mine.saturating_add_signed(delta as isize);
            let value = serde_json::to_vec(&counts).map_err(nats)?;
            let written = match revision {
                Some(revision) => match store.update(connector, value.into(), revision).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                    Err(e) => return Err(nats(e)),
                },
                None => match store.create(connector, value.into()).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(nats(e)),
                },
            };
            if written {
                return Ok(());
            }
        }
    }
}
