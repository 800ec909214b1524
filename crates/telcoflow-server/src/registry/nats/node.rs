//! A node's part in the cluster, once it runs: the mirror of the sessions bucket, offers from
//! other nodes to its control connections, requests from other nodes about its calls, and
//! its heartbeat.

use super::record::{
    CallCounts, CloseReply, Holder, NodeBeat, NodeRequest, Offer, SessionRecord, Write,
};
use super::{NODE_TTL, NatsRegistry, lock, writer};
use crate::registry::{CloseError, NodeContext, call_in};
use crate::token::unix_now;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use telcoflow_proto::control::{CloseReason, ServerFrame, SessionState};
use tokio::time::Instant;
use tracing::{debug, warn};

/// An open session of this node held by a control connection: its connector, id, holder.
type Held = (String, String, Holder);

/// How often a node renews its heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Since when a node's heartbeat has been renewed without a gap, as the node saw its writes.
#[derive(Debug, Default)]
pub(super) struct Beating {
    /// The last heartbeat written.
    last: Option<Instant>,
    /// The first of the heartbeats written since the last gap.
    since: Option<Instant>,
}

impl Beating {
    pub(super) fn renewed(&mut self, now: Instant) {
        // A beat missed (this node paused, or its writes slow) counts as a gap too.
        if self.since.is_none() || self.last.is_none_or(|last| now - last > 2 * HEARTBEAT) {
            self.since = Some(now);
        }
        self.last = Some(now);
    }

    pub(super) fn failed(&mut self) {
        self.since = None;
    }

    /// Whether this node may take others for lost: its own heartbeat is current, and has
    /// been for a heartbeat's lifetime. After an outage of its own (of NATS, or of its link to
    /// NATS) the other nodes' heartbeats may have expired meanwhile; they get that long to
    /// renew them before their records are reaped.
    pub(super) fn may_reap(&self, now: Instant) -> bool {
        self.last.is_some_and(|last| now - last <= 2 * HEARTBEAT)
            && self.since.is_some_and(|since| now - since >= NODE_TTL)
    }
}

/// Pause before watching or subscribing again after NATS ended a watch.
const REWATCH_PAUSE: Duration = Duration::from_millis(500);

impl NatsRegistry {
    /// Joins the cluster: subscribes to offers and to requests for this node, starts the
    /// mirror, the writer and the heartbeat. The tasks end with the server.
    pub(crate) async fn start(&self, context: NodeContext) -> Result<(), String> {
        let inner = &self.inner;
        let offers = inner
            .client
            .subscribe("telcoflow.notify.>")
            .await
            .map_err(|e| e.to_string())?;
        let requests = inner
            .client
            .subscribe(format!("telcoflow.node.{}.>", inner.node_id))
            .await
            .map_err(|e| e.to_string())?;
        let watch = inner
            .sessions
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        let context = Arc::new(context);
        let shutdown = context.shutdown.clone();
        if let Some(writes) = lock(&inner.pending_writes).take() {
            context
                .tasks
                .spawn(writer::run(self.clone(), writes, shutdown.clone()));
        }
        context
            .tasks
            .spawn(self.clone().offers(offers, shutdown.clone()));
        context
            .tasks
            .spawn(self.clone().requests(requests, context.clone()));
        context
            .tasks
            .spawn(self.clone().mirror(watch, shutdown.clone()));
        let beat = NodeBeat {
            public_url: context.public_url.clone(),
            draining: false,
            at: unix_now(),
            incarnation: inner.incarnation.clone(),
        };
        // Alive before any record of this node exists, so that no other node takes them for
        // those of a lost node.
        let value = serde_json::to_vec(&beat).map_err(|e| e.to_string())?;
        inner
            .nodes
            .put(&inner.node_id, value.into())
            .await
            .map_err(|e| e.to_string())?;
        lock(&inner.beating).renewed(Instant::now());
        // A node restarted with its old id starts with no calls: what it counted before is gone.
        self.drop_counts_of(&inner.node_id)
            .await
            .map_err(|e| format!("resetting this node's call counts: {e}"))?;
        context
            .tasks
            .spawn(self.clone().heartbeat(beat, shutdown.clone()));
        context
            .tasks
            .spawn(self.clone().watch_nodes(shutdown.clone()));
        context.tasks.spawn(self.clone().reaper(shutdown));
        Ok(())
    }

    /// Notes which node processes renew their heartbeats, watching every heartbeat written
    /// (two processes with the same node id write the same key in turn).
    async fn watch_nodes(self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            if let Ok(mut watch) = self.inner.nodes.watch_all().await {
                loop {
                    let entry = tokio::select! {
                        e = watch.next() => e,
                        () = shutdown.cancelled() => return,
                    };
                    let Some(Ok(entry)) = entry else { break };
                    if entry.operation != kv::Operation::Put {
                        continue;
                    }
                    if let Ok(beat) = serde_json::from_slice::<NodeBeat>(&entry.value) {
                        lock(&self.inner.seen)
                            .insert((entry.key, beat.incarnation), Instant::now());
                    }
                }
            }
            // Heartbeats missed meanwhile are not known: no reaping until a heartbeat's
            // lifetime has been watched again.
            lock(&self.inner.beating).failed();
            tokio::select! {
                () = tokio::time::sleep(REWATCH_PAUSE) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Every heartbeat period, forgets what nodes whose heartbeat expired left in the
    /// cluster.
    async fn reaper(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if !lock(&self.inner.beating).may_reap(Instant::now()) {
                continue;
            }
            if let Err(e) = self.reap().await {
                debug!(error = %e, "lost nodes not reaped this time");
            }
        }
    }

    /// The nodes whose heartbeat has not expired.
    async fn alive_nodes(&self) -> Result<HashSet<String>, String> {
        let mut keys = self.inner.nodes.keys().await.map_err(|e| e.to_string())?;
        let mut alive = HashSet::new();
        while let Some(key) = keys.next().await {
            alive.insert(key.map_err(|e| e.to_string())?);
        }
        Ok(alive)
    }

    /// Deletes the records of lost nodes (their calls ended with them), offers again the
    /// sessions of this node that agents on lost nodes held, and drops lost nodes' call
    /// counts. Every live node does it; each step is harmless when done twice.
    async fn reap(&self) -> Result<(), String> {
        // What nodes left is read before which nodes are alive: a node's heartbeat is written
        // before its first record or count, so that one starting meanwhile is not taken for
        // lost.
        let counted = self.counted_nodes().await?;
        let me = self.me().to_owned();
        let mine = self.inner.incarnation.clone();
        // Each record's owner and its process, and for this process's open records, their
        // holder.
        let records: Vec<(String, u64, String, String, Option<Held>)> = lock(&self.inner.mirror)
            .iter()
            .map(|(key, r)| {
                let held =
                    (r.owner == me && r.incarnation == mine && r.info.state == SessionState::Open)
                        .then(|| r.bound.clone())
                        .flatten()
                        .map(|h| (r.connector.clone(), r.info.id.clone(), h));
                (
                    key.clone(),
                    r.revision,
                    r.owner.clone(),
                    r.incarnation.clone(),
                    held,
                )
            })
            .collect();
        let alive = self.alive_nodes().await?;
        let is_lost = |node: &str| node != me && !alive.contains(node);
        let now = Instant::now();
        let seen = {
            let mut seen = lock(&self.inner.seen);
            seen.retain(|_, at| now - *at <= 2 * NODE_TTL);
            seen.clone()
        };
        // The watch of heartbeats is trusted only while it shows this process's own.
        let watching = seen
            .get(&(me.clone(), mine.clone()))
            .is_some_and(|at| now - *at <= 2 * HEARTBEAT);
        // A record is lost with its node, or with its process: one whose heartbeat this node
        // has not seen for a heartbeat's lifetime (it watched that long: see `may_reap`).
        let record_lost = |owner: &str, incarnation: &str| {
            if incarnation == mine {
                false
            } else if incarnation.is_empty() {
                // Written by a build without processes: not this process's.
                owner == me || is_lost(owner)
            } else {
                is_lost(owner)
                    || (watching
                        && seen
                            .get(&(owner.to_owned(), incarnation.to_owned()))
                            .is_none_or(|at| now - *at > NODE_TTL))
            }
        };
        // Nodes counted in the call counts, whether or not this node saw their records.
        let mut lost_nodes: HashSet<String> =
            counted.into_iter().filter(|node| is_lost(node)).collect();
        let mut lost_records = Vec::new();
        let mut orphaned = Vec::new();
        for (key, revision, owner, incarnation, held) in records {
            if record_lost(&owner, &incarnation) {
                lost_records.push((key, revision));
                // The counts are per node: those of a node whose process changed are the
                // new process's.
                if is_lost(&owner) {
                    lost_nodes.insert(owner);
                }
            } else if let Some((connector, session_id, holder)) = held
                && is_lost(&holder.node)
            {
                lost_nodes.insert(holder.node.clone());
                orphaned.push((connector, session_id, holder));
            }
        }
        for (key, revision) in lost_records {
            debug!(%key, "forgetting a session of a lost node");
            // At the revision seen: a record rewritten since (its node is back) stays.
            Self::delete_at(&self.inner.sessions, &key, revision).await?;
        }
        for (connector, session_id, holder) in orphaned {
            self.release(&connector, &session_id, &holder, &me)
                .await
                .map_err(|e| e.to_string())?;
        }
        for node in &lost_nodes {
            warn!(%node, "node lost: its sessions are forgotten");
            self.drop_counts_of(node).await?;
        }
        Ok(())
    }

    /// The nodes with an entry in some connector's call count.
    async fn counted_nodes(&self) -> Result<HashSet<String>, String> {
        let calls = &self.inner.calls;
        let mut keys = calls.keys().await.map_err(|e| e.to_string())?;
        let mut connectors = Vec::new();
        while let Some(key) = keys.next().await {
            connectors.push(key.map_err(|e| e.to_string())?);
        }
        let mut nodes = HashSet::new();
        for connector in connectors {
            if let Some(value) = calls.get(&connector).await.map_err(|e| e.to_string())? {
                let counts: CallCounts = serde_json::from_slice(&value).unwrap_or_default();
                nodes.extend(counts.into_keys());
            }
        }
        Ok(nodes)
    }

    /// Removes a node's entry from every connector's call count.
    async fn drop_counts_of(&self, node: &str) -> Result<(), String> {
        let calls = &self.inner.calls;
        let mut keys = match calls.keys().await {
            Ok(keys) => keys,
            Err(e) => return Err(e.to_string()),
        };
        let mut connectors = Vec::new();
        while let Some(key) = keys.next().await {
            connectors.push(key.map_err(|e| e.to_string())?);
        }
        for connector in connectors {
            loop {
                let Some(entry) = calls.entry(&connector).await.map_err(|e| e.to_string())? else {
                    break;
                };
                let mut counts: CallCounts =
                    serde_json::from_slice(&entry.value).unwrap_or_default();
                if entry.operation != kv::Operation::Put || counts.remove(node).is_none() {
                    break;
                }
                let value = serde_json::to_vec(&counts).map_err(|e| e.to_string())?;
                match calls.update(&connector, value.into(), entry.revision).await {
                    Ok(_) => break,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        Ok(())
    }

    async fn offers(
        self,
        mut offers: async_nats::Subscriber,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let message = tokio::select! {
                m = offers.next() => m,
                () = shutdown.cancelled() => return,
            };
            let Some(message) = message else { return };
            let Some(connector) = message.subject.strip_prefix("telcoflow.notify.") else {
                continue;
            };
            // A draining node's connections are on their way out: the sessions go to the
            // connector's connections on other nodes, which hear the same offer.
            if self.is_draining() {
                continue;
            }
            match serde_json::from_slice::<Offer>(&message.payload) {
                // Only offers reach agents this way; anything else on the subject is no
                // node's doing.
                Ok(Offer {
                    frame: frame @ ServerFrame::SessionNotify { .. },
                    inbound,
                }) => self.offer_here(connector, &frame, inbound),
                Ok(_) => warn!(
                    connector,
                    "an offer from the cluster that is not session.notify; dropped"
                ),
                Err(e) => warn!(error = %e, "unreadable offer from the cluster"),
            }
        }
    }

    async fn requests(self, mut requests: async_nats::Subscriber, context: Arc<NodeContext>) {
        loop {
            let message = tokio::select! {
                m = requests.next() => m,
                () = context.shutdown.cancelled() => return,
            };
            let Some(message) = message else { return };
            let request = match serde_json::from_slice::<NodeRequest>(&message.payload) {
                Ok(r) => r,
                Err(e) => {
                    warn!(subject = %message.subject, error = %e, "unreadable request from the cluster");
                    continue;
                }
            };
            let this = self.clone();
            let context = context.clone();
            // A close waits for its call to end: each request runs on its own.
            context.tasks.clone().spawn(async move {
                let reply = this.answer(request, &context).await;
                if let (Some(to), Some(reply)) = (message.reply, reply)
                    && let Err(e) = this.inner.client.publish(to, reply.into()).await
                {
                    debug!(error = %e, "reply to another node lost");
                }
            });
        }
    }

    /// Does what another node asks; the JSON reply, if the request has one.
    async fn answer(&self, request: NodeRequest, context: &NodeContext) -> Option<Vec<u8>> {
        let local = self.local();
        let reply = match request {
            NodeRequest::Claimed {
                session_id,
                holder,
                setup,
            } => serde_json::to_vec(&self.claimed_here(&session_id, &holder, setup).await),
            NodeRequest::CallIn {
                session_id,
                sm_ws_id,
            } => {
                let frame = local
                    .ready_for(&session_id, &sm_ws_id)
                    .map(|(call, connector)| {
                        let call_in =
                            call_in(&context.signer, &context.public_url, &connector, &call);
                        local.set_media_token(&session_id, &call_in.token);
                        ServerFrame::CallIn(call_in)
                    });
                serde_json::to_vec(&frame)
            }
            NodeRequest::Close {
                connector,
                session_id,
                reason,
            } => {
                let reply = match local.call_of(&connector, &session_id) {
                    None => CloseReply::NotFound,
                    Some(call) => match super::super::close_call(&call, reason).await {
                        Ok(()) => CloseReply::Closed,
                        Err(CloseError::NotFound) => CloseReply::NotFound,
                        Err(_) => CloseReply::JustEnded,
                    },
                };
                serde_json::to_vec(&reply)
            }
            NodeRequest::Unbind {
                session_id,
                sm_ws_id,
            } => serde_json::to_vec(&local.unbind(&session_id, &sm_ws_id)),
            NodeRequest::Control { sm_ws_id, frame } => {
                // Other nodes tell a holder here only that its session closed.
                if !matches!(frame, ServerFrame::SessionClosed { .. }) {
                    warn!(
                        sm_ws_id,
                        "a frame from the cluster that is not session.closed; dropped"
                    );
                } else if let Some(link) = local.link(&sm_ws_id) {
                    link.send(frame);
                }
                return None;
            }
        };
        reply.ok()
    }

    /// Keeps the mirror of the sessions bucket, watching it again if NATS ends the watch.
    async fn mirror(self, mut watch: kv::Watch, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            loop {
                let entry = tokio::select! {
                    e = watch.next() => e,
                    () = shutdown.cancelled() => return,
                };
                match entry {
                    Some(Ok(entry)) => self.mirrored(entry),
                    Some(Err(e)) => {
                        warn!(error = %e, "watch of the cluster's sessions failed");
                        break;
                    }
                    None => break,
                }
            }
            loop {
                tokio::select! {
                    () = tokio::time::sleep(REWATCH_PAUSE) => {}
                    () = shutdown.cancelled() => return,
                }
                if let Ok(w) = self.inner.sessions.watch_with_history(">").await {
                    // The history comes again: records deleted meanwhile must not linger.
                    let held_here = {
                        let mut mirror = lock(&self.inner.mirror);
                        let held = self.held_here_of_other_processes(&mirror);
                        mirror.clear();
                        held
                    };
                    watch = w;
                    // A record deleted while the watch was down left no trace the new watch
                    // shows: those this node's agents held are looked up once more.
                    if !held_here.is_empty() {
                        tokio::spawn(self.clone().look_up_held(held_here));
                    }
                    break;
                }
            }
        }
    }

    fn mirrored(&self, entry: kv::Entry) {
        let gone = {
            let mut mirror = lock(&self.inner.mirror);
            mirror_entry(&mut mirror, entry)
        };
        if let Some(record) = gone {
            self.lost_with_its_node(&record);
        }
    }

    /// Open records of other processes held by a control connection of this node.
    fn held_here_of_other_processes(
        &self,
        mirror: &HashMap<String, SessionRecord>,
    ) -> Vec<(String, SessionRecord)> {
        mirror
            .iter()
            .filter(|(_, r)| {
                r.info.state == SessionState::Open
                    && !(r.owner == self.me() && r.incarnation == self.inner.incarnation)
                    && r.bound.as_ref().is_some_and(|h| h.node == self.me())
            })
            .map(|(key, r)| (key.clone(), r.clone()))
            .collect()
    }

    /// Tells the holders of the records among `held` that are gone from the bucket that
    /// their calls were lost ([`Self::lost_with_its_node`]).
    async fn look_up_held(self, held: Vec<(String, SessionRecord)>) {
        for (key, record) in held {
            match tokio::time::timeout(super::NATS_TIMEOUT, self.inner.sessions.entry(&key)).await {
                // Deleted (a delete leaves a marker entry until the key is purged).
                Ok(Ok(None)) => self.lost_with_its_node(&record),
                Ok(Ok(Some(entry))) if entry.operation != kv::Operation::Put => {
                    self.lost_with_its_node(&record);
                }
                Ok(Ok(Some(_))) => {}
                Ok(Err(e)) => warn!(%key, error = %e, "cannot look up a session record"),
                Err(_) => {
                    warn!(%key, "cannot look up a session record: no answer from NATS in time")
                }
            }
        }
    }

    /// An open record deleted: its node (or its process) was lost, since records of calls
    /// that end are closed, not deleted, until they are forgotten. Its call ended with that
    /// node, whose `session.closed` never came: the control connection of this node that
    /// held the session gets it now. Whichever node reaped the record, every node sees the
    /// delete, and only the holder's node has the connection.
    fn lost_with_its_node(&self, record: &SessionRecord) {
        let this_process =
            record.owner == self.me() && record.incarnation == self.inner.incarnation;
        if record.info.state != SessionState::Open || this_process {
            return;
        }
        let Some(holder) = record.bound.as_ref().filter(|h| h.node == self.me()) else {
            return;
        };
        let Some(link) = self.local().link(&holder.sm_ws_id) else {
            return;
        };
        debug!(session_id = %record.info.id, owner = %record.owner, "call lost with its node");
        link.send(ServerFrame::SessionClosed {
            session_id: record.info.id.clone(),
            reason: CloseReason::CallTerminated,
        });
    }

    /// After a heartbeat could not be written while NATS is connected: NATS may have lost
    /// its store (one without persistent storage restarted), and with it the buckets. They
    /// are made again (a no-op for buckets that exist), so that the cluster takes calls
    /// again; what the lost buckets held is gone (see docs/cluster.md).
    async fn recreate_buckets(&self) {
        if self.inner.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let js = async_nats::jetstream::new(self.inner.client.clone());
        match tokio::time::timeout(super::NATS_TIMEOUT, super::open_buckets(&js)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot make the cluster's buckets again"),
            Err(_) => warn!("cannot make the cluster's buckets again: no answer from NATS in time"),
        }
    }

    async fn heartbeat(self, mut beat: NodeBeat, shutdown: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                // Cancel-safe: `notify_one` keeps its permit until a waiter takes it.
                () = self.inner.beat_now.notified() => {}
                () = shutdown.cancelled() => break,
            }
            beat.draining = self
                .inner
                .draining
                .load(std::sync::atomic::Ordering::Relaxed);
            beat.at = unix_now();
            let _ = self.inner.writes.send(Write::HealCounts);
            let Ok(value) = serde_json::to_vec(&beat) else {
                continue;
            };
            match self
                .inner
                .nodes
                .put(&self.inner.node_id, value.into())
                .await
            {
                Ok(_) => lock(&self.inner.beating).renewed(Instant::now()),
                Err(e) => {
                    lock(&self.inner.beating).failed();
                    debug!(error = %e, "heartbeat not written");
                    self.recreate_buckets().await;
                }
            }
        }
        // A clean exit: the node is gone at once rather than when its heartbeat expires.
        let _ = self.inner.nodes.delete(&self.inner.node_id).await;
    }
}

/// Applies a watched entry to the mirror; the record a delete removed.
fn mirror_entry(
    mirror: &mut HashMap<String, SessionRecord>,
    entry: kv::Entry,
) -> Option<SessionRecord> {
    match entry.operation {
        kv::Operation::Put => match serde_json::from_slice::<SessionRecord>(&entry.value) {
            // A record of this node's id left from a previous life is reaped once that
            // life's heartbeat is not seen any more, not here: another process with the
            // same id may be running it.
            Ok(mut record) => {
                record.revision = entry.revision;
                mirror.insert(entry.key, record);
            }
            Err(e) => warn!(key = %entry.key, error = %e, "unreadable session record"),
        },
        kv::Operation::Delete | kv::Operation::Purge => return mirror.remove(&entry.key),
    }
    None
}
