//! The registry of a cluster: nodes that share their sessions, claims and call counts
//! through NATS (docs/architecture.md, "Registry and the cluster").
//!
//! Each node keeps what only it can act on in a [`MemoryRegistry`] of its own (its control
//! connections, its calls, their media tokens), and shares the directory through JetStream
//! KV: session records (claims are compare-and-set on a record's revision, so exactly one
//! claimant wins whatever node it is on), call counts per connector, node heartbeats. Offers
//! go out on `telcoflow.notify.<connector>` to every node; what must happen where a call runs
//! is asked of its node on `telcoflow.node.<id>.<op>`.
//!
//! The call actor never waits on NATS: what it reports is applied to the local registry at
//! once and queued to the [`writer`], which writes it to NATS in order.

mod node;
mod record;
#[cfg(test)]
mod tests;
mod writer;

use super::link::ControlLink;
use super::memory::MemoryRegistry;
use super::outcome::{
    ClaimError, CloseError, OpenError, ReadyOutcome, RegistryError, SessionPage, SessionQuery,
};
use crate::call::CallHandle;
use crate::config::ClusterConfig;
use crate::token::unix_now;
use async_nats::jetstream::{self, kv};
use record::{
    CloseReply, Holder, NodeRequest, Offer, SessionRecord, Write, is_token, node_subject,
    notify_subject, session_key,
};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use telcoflow_proto::control::{
    Activity, Channel, CloseReason, Initiator, ServerFrame, SessionInfo, SessionState, SetupData,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How long a directory call waits on NATS before the cluster counts as unavailable.
const NATS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a close asked of another node may take (it waits for the call to end); other
/// requests to a node are answered at once, and wait [`NATS_TIMEOUT`] at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node's heartbeat lives in the nodes bucket without being renewed.
const NODE_TTL: Duration = Duration::from_secs(10);
/// How long a connection that joined remembers what it was offered from the records: the
/// notification of the same offer, published before it joined, may still be on its way.
const JOIN_OFFERS_KEPT: Duration = Duration::from_secs(5);

/// The registry of one node of a cluster. Cheap to clone.
#[derive(Clone)]
pub(crate) struct NatsRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for NatsRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsRegistry")
            .field("node_id", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    node_id: String,
    /// This process of the node: a fresh id each start.
    incarnation: String,
    /// This node's links, calls and tokens.
    local: MemoryRegistry,
    client: async_nats::Client,
    sessions: kv::Store,
    calls: kv::Store,
    nodes: kv::Store,
    /// Every session record of the cluster, by key, kept by a watch of the sessions bucket.
    mirror: Mutex<HashMap<String, SessionRecord>>,
    /// Closed sessions listed per connector (`limits.max_closed_sessions_per_connector`).
    max_closed: usize,
    /// Writes for the writer task; unbounded since the call actor must never wait on it (its
    /// length is bounded by the calls' updates).
    writes: mpsc::UnboundedSender<Write>,
    /// The writer's end, taken when the node starts.
    pending_writes: Mutex<Option<mpsc::UnboundedReceiver<Write>>>,
    /// This node is draining: its heartbeat says so.
    draining: std::sync::atomic::AtomicBool,
    /// Wakes the heartbeat to write at once (when draining starts).
    beat_now: tokio::sync::Notify,
    /// Since when this node's heartbeat has been renewed without a gap.
    beating: Mutex<node::Beating>,
    /// When each node's process was last seen renewing its heartbeat, by (node, incarnation).
    seen: Mutex<HashMap<(String, String), tokio::time::Instant>>,
    /// The offers each control connection that joined lately was sent, by its id.
    joined: Mutex<HashMap<String, JoinOffers>>,
}

/// The offers sent to a connection since it joined, so that none reaches it twice: one from
/// the records as it joins and the notification of the same offer.
struct JoinOffers {
    at: tokio::time::Instant,
    sent: HashSet<(String, Activity)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only map updates run under these locks; the maps stay consistent between statements.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unavailable(e: impl fmt::Display) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

/// Runs a NATS call under [`NATS_TIMEOUT`].
async fn bounded<T, E: fmt::Display>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(NATS_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(format!("{what}: {e}"))),
        Err(_) => Err(unavailable(format!("{what}: no answer from NATS in time"))),
    }
}

/// How often the NATS client pings the server.
const PING_INTERVAL: Duration = Duration::from_secs(2);

/// Authentication and TLS of the connection to NATS, as `[cluster]` gives them.
async fn connect_options(cluster: &ClusterConfig) -> Result<async_nats::ConnectOptions, String> {
    let mut options = match &cluster.credentials_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| format!("cluster.credentials_file {}: {e}", path.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(token) = &cluster.token {
        options = options.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&cluster.user, &cluster.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &cluster.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cluster.tls_cert, &cluster.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// The cluster's buckets (sessions, calls, nodes), each created if it does not exist yet.
pub(super) async fn open_buckets(
    js: &jetstream::Context,
) -> Result<(kv::Store, kv::Store, kv::Store), String> {
    let sessions = bucket(
        js,
        kv::Config {
            bucket: record::SESSIONS_BUCKET.into(),
            history: 1,
            ..Default::default()
        },
    )
    .await?;
    let calls = bucket(
        js,
        kv::Config {
            bucket: record::CALLS_BUCKET.into(),
            history: 1,
            ..Default::default()
        },
    )
    .await?;
    let nodes = bucket(
        js,
        kv::Config {
            bucket: record::NODES_BUCKET.into(),
            history: 1,
            max_age: NODE_TTL,
            ..Default::default()
        },
    )
    .await?;
    Ok((sessions, calls, nodes))
}

/// A bucket, created if it does not exist yet (every node may be the first).
async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, String> {
    let name = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(create) => js
            .get_key_value(&name)
            .await
            .map_err(|e| format!("bucket {name}: {create}; {e}")),
    }
}

impl NatsRegistry {
    /// Connects to NATS and opens (or creates) the cluster's buckets. The node takes part
    /// once [`Self::start`] runs.
    pub(crate) async fn connect(
        cluster: &ClusterConfig,
        max_closed: usize,
    ) -> Result<Self, String> {
        let client = connect_options(cluster)
            .await?
            .name(format!("telcoflow-{}", cluster.node_id))
            // A connection that died silently is noticed within seconds (two pings
            // unanswered), not the client's default two minutes: until then the node would
            // take calls it cannot share.
            .ping_interval(PING_INTERVAL)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connection_timeout(NATS_TIMEOUT)
            // Back within a second of NATS coming back, however long it was away.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 * attempts.min(10) as u64)
            })
            .connect(cluster.nats_url.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let (sessions, calls, nodes) = open_buckets(&jetstream::new(client.clone())).await?;
        let (writes, pending) = mpsc::unbounded_channel();
        Ok(Self {
            inner: Arc::new(Inner {
                node_id: cluster.node_id.clone(),
                incarnation: uuid::Uuid::new_v4().to_string(),
                local: MemoryRegistry::new(max_closed),
                max_closed,
                client,
                sessions,
                calls,
                nodes,
                mirror: Mutex::default(),
                writes,
                pending_writes: Mutex::new(Some(pending)),
                draining: std::sync::atomic::AtomicBool::new(false),
                beat_now: tokio::sync::Notify::new(),
                beating: Mutex::default(),
                seen: Mutex::default(),
                joined: Mutex::default(),
            }),
        })
    }

    fn me(&self) -> &str {
        &self.inner.node_id
    }

    fn local(&self) -> &MemoryRegistry {
        &self.inner.local
    }

    fn write(&self, write: Write) {
        // Fails only once the writer has stopped, at shutdown: nothing is left to tell.
        let _ = self.inner.writes.send(write);
    }

    /// Marks this node draining; its heartbeat is written again at once.
    pub(crate) fn set_draining(&self) {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.beat_now.notify_one();
    }

    fn is_draining(&self) -> bool {
        self.inner
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `sm_ws_id`, a control connection of this node, holds a session whose media is
    /// not up yet, wherever its call runs.
    pub(crate) fn holds_unattached(&self, sm_ws_id: &str) -> bool {
        let me = Holder {
            sm_ws_id: sm_ws_id.to_owned(),
            node: self.me().to_owned(),
        };
        !self.local().unattached_of(sm_ws_id).is_empty()
            || lock(&self.inner.mirror).values().any(|r| {
                r.owner != self.me()
                    && r.bound.as_ref() == Some(&me)
                    && r.info.state == SessionState::Open
                    && !r.media_attached
            })
    }

    /// Why this node cannot take new calls now: `None` while connected to NATS.
    pub(crate) fn unavailable(&self) -> Option<&'static str> {
        (!self.connected()).then_some("not connected to NATS")
    }

    fn connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Directory calls fail at once while NATS is away, rather than wait for their timeout.
    fn check_connected(&self) -> Result<(), RegistryError> {
        if self.connected() {
            Ok(())
        } else {
            Err(unavailable("not connected to NATS"))
        }
    }

    // ---- Node-local ----

    pub(crate) fn local_registry(&self) -> &MemoryRegistry {
        &self.inner.local
    }

    /// Registers a call of this node at once; the writer then admits it under the cluster's
    /// call limit, writes its record and offers it (or ends it, refused).
    pub(crate) fn open_call_session(
        &self,
        connector: &Arc<str>,
        max_calls: usize,
        info: SessionInfo,
        call: CallHandle,
        bound: Option<String>,
    ) -> Result<(), OpenError> {
        if !self.connected() {
            return Err(OpenError::Registry(unavailable(
                "not connected to NATS; new calls are refused until it is back",
            )));
        }
        let record = SessionRecord {
            info: info.clone(),
            connector: connector.to_string(),
            owner: self.me().to_owned(),
            incarnation: self.inner.incarnation.clone(),
            bound: bound.as_ref().map(|sm_ws_id| Holder {
                sm_ws_id: sm_ws_id.clone(),
                node: self.me().to_owned(),
            }),
            ready: false,
            media_attached: false,
            revision: 0,
        };
        self.local()
            .insert_call_session(connector, info, call.clone(), bound);
        self.write(Write::Admit {
            record: Box::new(record),
            max_calls,
            call,
        });
        Ok(())
    }

    pub(crate) fn set_media_attached(&self, session_id: &str, attached: bool) {
        self.local().set_media_attached(session_id, attached);
        if let Some(key) = self.own_key(session_id) {
            self.write(Write::MediaAttached { key, attached });
        }
    }

    pub(crate) fn session_ended(&self, session_id: &str, reason: CloseReason) -> bool {
        let key = self.own_key(session_id);
        let Some(remote) = self.local().end_session(session_id, reason) else {
            return false;
        };
        if let Some((sm_ws_id, node)) = remote {
            let frame = ServerFrame::SessionClosed {
                session_id: session_id.to_owned(),
                reason,
            };
            self.write(Write::Publish {
                subject: node_subject(&node, "control"),
                request: NodeRequest::Control { sm_ws_id, frame },
            });
        }
        self.write(Write::Ended {
            session_id: session_id.to_owned(),
            key,
            closed_at: unix_now(),
        });
        true
    }

    /// The key of a session this node runs, from its local record.
    fn own_key(&self, session_id: &str) -> Option<String> {
        let connector = self.local().connector_of(session_id)?;
        Some(session_key(&connector, session_id))
    }

    pub(crate) fn prune_closed(&self, keep_secs: u64) {
        self.local().prune_closed(keep_secs);
        let now = unix_now();
        let stale: Vec<(String, u64)> = lock(&self.inner.mirror)
            .iter()
            .filter(|(_, r)| {
                r.owner == self.me()
                    && r.info
                        .closed_at
                        .is_some_and(|t| now.saturating_sub(t) >= keep_secs)
            })
            .map(|(k, r)| (k.clone(), r.revision))
            .collect();
        for (key, revision) in stale {
            self.write(Write::Forget { key, revision });
        }
    }

    // ---- Directory ----

    pub(crate) async fn add_control(
        &self,
        sm_ws_id: &str,
        link: ControlLink,
    ) -> Result<(), RegistryError> {
        // Offered from the records, this node's too: a call not admitted yet (or refused)
        // has none, and is offered by its notification once admitted. The connection takes
        // notifications from before the records are read, so that none falls between; what
        // both offer reaches it once (`JoinOffers`).
        lock(&self.inner.joined).insert(
            sm_ws_id.to_owned(),
            JoinOffers {
                at: tokio::time::Instant::now(),
                sent: HashSet::new(),
            },
        );
        self.local().insert_link(sm_ws_id, link.clone());
        let now = unix_now();
        let offers: Vec<ServerFrame> = lock(&self.inner.mirror)
            .values()
            .filter(|r| {
                *r.connector == *link.connector
                    && r.info.state == SessionState::Open
                    && r.bound.is_none()
                    && !r.media_attached
                    && (link.inbound_calls || r.info.initiator != Initiator::Connector)
            })
            .map(|r| {
                let activity = if r.info.initiator == Initiator::Connector && !r.ready {
                    Activity::NewIncomingCall
                } else {
                    Activity::Resume
                };
                notify(&r.info, activity, now)
            })
            .collect();
        for frame in offers {
            if self.first_offer(sm_ws_id, &frame) {
                link.send(frame);
            }
        }
        Ok(())
    }

    /// Whether `frame`, an offer, has not reached the connection `sm_ws_id` since it joined
    /// (and marks it sent). Connections that joined more than [`JOIN_OFFERS_KEPT`] ago get
    /// every offer.
    fn first_offer(&self, sm_ws_id: &str, frame: &ServerFrame) -> bool {
        let ServerFrame::SessionNotify {
            session_id,
            activity,
            ..
        } = frame
        else {
            return true;
        };
        let mut joined = lock(&self.inner.joined);
        let Some(offers) = joined.get_mut(sm_ws_id) else {
            return true;
        };
        if offers.at.elapsed() > JOIN_OFFERS_KEPT {
            joined.remove(sm_ws_id);
            return true;
        }
        offers.sent.insert((session_id.clone(), *activity))
    }

    /// Offers a session from the cluster to this node's connections of `connector`.
    fn offer_here(&self, connector: &str, frame: &ServerFrame, inbound: bool) {
        self.local()
            .offer_where(connector, frame, inbound, |sm_ws_id| {
                self.first_offer(sm_ws_id, frame)
            });
        // Forget the connections that joined long ago, those gone too.
        lock(&self.inner.joined).retain(|_, o| o.at.elapsed() <= JOIN_OFFERS_KEPT);
    }

    pub(crate) async fn remove_control(&self, sm_ws_id: &str) -> Result<(), RegistryError> {
        let Some(link) = self.local().link(sm_ws_id) else {
            return Ok(());
        };
        self.local().remove_link(sm_ws_id);
        lock(&self.inner.joined).remove(sm_ws_id);
        let me = Holder {
            sm_ws_id: sm_ws_id.to_owned(),
            node: self.me().to_owned(),
        };
        // Sessions of other nodes held here, from the mirror; this node's own from its
        // registry, which knows of claims the mirror may not show yet.
        let mut held: Vec<(String, String)> = lock(&self.inner.mirror)
            .values()
            .filter(|r| {
                r.owner != self.me()
                    && r.bound.as_ref() == Some(&me)
                    && r.info.state == SessionState::Open
                    && !r.media_attached
            })
            .map(|r| (r.info.id.clone(), r.owner.clone()))
            .collect();
        held.extend(
            self.local()
                .unattached_of(sm_ws_id)
                .into_iter()
                .map(|id| (id, self.me().to_owned())),
        );
        let mut result = Ok(());
        for (session_id, owner) in held {
            if let Err(e) = self
                .release(&link.connector, &session_id, &me, &owner)
                .await
            {
                result = Err(e);
            }
        }
        result
    }

    /// Offers again (`RESUME`, to every node) a session that `holder` left before its media
    /// came up, and has its owner forget the holder and its token.
    async fn release(
        &self,
        connector: &str,
        session_id: &str,
        holder: &Holder,
        owner: &str,
    ) -> Result<(), RegistryError> {
        let key = session_key(connector, session_id);
        let Some(record) = self.unbind_record(&key, holder).await? else {
            return Ok(());
        };
        let released = if owner == self.me() {
            self.local().unbind(session_id, &holder.sm_ws_id)
        } else {
            let request = NodeRequest::Unbind {
                session_id: session_id.to_owned(),
                sm_ws_id: holder.sm_ws_id.clone(),
            };
            self.request::<bool>(owner, &request).await.unwrap_or(false)
        };
        debug!(%session_id, released, "offering session again");
        let offer = Offer {
            frame: notify(&record.info, Activity::Resume, unix_now()),
            inbound: record.info.initiator == Initiator::Connector,
        };
        self.publish(&notify_subject(connector), &offer).await
    }

    /// Unbinds a record from `holder` if it still holds it and its media is not up; the
    /// record as written.
    async fn unbind_record(
        &self,
        key: &str,
        holder: &Holder,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        loop {
            let Some((mut record, revision)) = self.read(key).await? else {
                return Ok(None);
            };
            if record.bound.as_ref() != Some(holder)
                || record.media_attached
                || record.info.state == SessionState::Closed
            {
                return Ok(None);
            }
            record.bound = None;
            record.ready = false;
            if self.cas(key, &record, revision).await? {
                return Ok(Some(record));
            }
        }
    }

    pub(crate) async fn claim(
        &self,
        sm_ws_id: &str,
        session_id: &str,
    ) -> Result<SessionInfo, ClaimError> {
        let Some(link) = self.local().link(sm_ws_id) else {
            return Err(ClaimError::NotFound);
        };
        if !is_token(session_id) {
            return Err(ClaimError::NotFound);
        }
        let key = session_key(&link.connector, session_id);
        let holder = Holder {
            sm_ws_id: sm_ws_id.to_owned(),
            node: self.me().to_owned(),
        };
        let record = loop {
            let Some((mut record, revision)) = self.read(&key).await? else {
                return Err(ClaimError::NotFound);
            };
            if record.info.state == SessionState::Closed {
                return Err(ClaimError::Closed);
            }
            match &record.bound {
                Some(h) if *h != holder => {
                    return Err(ClaimError::Busy {
                        bound_sm_ws_id: h.sm_ws_id.clone(),
                    });
                }
                // Ours already (a claim asked again): the owner is told again, which it takes
                // as often as it comes.
                Some(_) => break record,
                None => {}
            }
            record.bound = Some(holder.clone());
            // A wrong revision: someone wrote first; read again, to answer busy if it was a
            // claim.
            if self.cas(&key, &record, revision).await? {
                break record;
            }
        };
        let told = if record.owner == self.me() {
            Ok(self.claimed_here(session_id, &holder, link.setup).await)
        } else {
            let request = NodeRequest::Claimed {
                session_id: session_id.to_owned(),
                holder: holder.clone(),
                setup: link.setup,
            };
            self.request::<bool>(&record.owner, &request).await
        };
        match told {
            Ok(true) => Ok(record.info),
            // The owner has no open call for it (it ended meanwhile, or the record outlived
            // its node's restart): closed, rather than held with nobody serving it.
            Ok(false) => {
                debug!(%session_id, "claimed a session whose call has ended");
                if let Err(e) = self.close_record(&key, &holder).await {
                    debug!(%session_id, error = %e, "claimed record of an ended call left to its owner");
                }
                Err(ClaimError::Closed)
            }
            // The owner may never have heard of the claim: the record is given back and the
            // session offered again, so that it does not stay held with nobody serving it.
            Err(e) => {
                self.unclaim(&link.connector, session_id, &holder, &record.owner)
                    .await;
                Err(e.into())
            }
        }
    }

    /// The owner's side of a claim (this node runs the call): binds the session to `holder`.
    /// Held here already by a holder whose claim was given back (its owner's answer came too
    /// late), it goes to the one the record names. False if this node has no open call for
    /// it.
    async fn claimed_here(&self, session_id: &str, holder: &Holder, setup: SetupData) -> bool {
        let local = self.local();
        let node = (holder.node != self.me()).then_some(holder.node.as_str());
        if local.bind(session_id, &holder.sm_ws_id, node, setup) {
            return true;
        }
        if local.is_closed(session_id) != Some(false) {
            return false;
        }
        let Some(key) = self.own_key(session_id) else {
            return false;
        };
        match self.read(&key).await {
            Ok(Some((record, _))) if record.bound.as_ref() == Some(holder) => {
                local.take_over(session_id, &holder.sm_ws_id, node, setup)
            }
            Ok(_) => false,
            Err(e) => {
                debug!(%session_id, error = %e, "claim of a session held here not checked");
                false
            }
        }
    }

    /// Marks closed a record that `holder` claimed of a call that has ended.
    async fn close_record(&self, key: &str, holder: &Holder) -> Result<(), RegistryError> {
        loop {
            let Some((mut record, revision)) = self.read(key).await? else {
                return Ok(());
            };
            if record.bound.as_ref() != Some(holder)
                || record.media_attached
                || record.info.state == SessionState::Closed
            {
                return Ok(());
            }
            record.info.state = SessionState::Closed;
            record.info.closed_at = Some(unix_now());
            if self.cas(key, &record, revision).await? {
                return Ok(());
            }
        }
    }

    /// Gives back a claim whose owner was not told: the record is unbound again (by
    /// compare-and-set, only while it still names `holder`), the owner asked to forget the
    /// holder should the claim reach it late, and the session offered again. Left to the
    /// writer, which waits for NATS, if NATS fails here too.
    async fn unclaim(&self, connector: &str, session_id: &str, holder: &Holder, owner: &str) {
        if let Err(e) = self.unclaim_now(connector, session_id, holder, owner).await {
            debug!(%session_id, error = %e, "claim given back later");
            self.write(Write::Unclaim {
                connector: connector.to_owned(),
                session_id: session_id.to_owned(),
                holder: holder.clone(),
                owner: owner.to_owned(),
            });
        }
    }

    /// [`Self::unclaim`], once.
    async fn unclaim_now(
        &self,
        connector: &str,
        session_id: &str,
        holder: &Holder,
        owner: &str,
    ) -> Result<(), RegistryError> {
        let key = session_key(connector, session_id);
        let Some(record) = self.unbind_record(&key, holder).await? else {
            return Ok(());
        };
        if owner == self.me() {
            self.local().unbind(session_id, &holder.sm_ws_id);
        } else {
            // Not awaited: the owner did not answer just now. Should it bind the holder
            // later anyway, the next claim takes the session over (the record decides).
            let request = NodeRequest::Unbind {
                session_id: session_id.to_owned(),
                sm_ws_id: holder.sm_ws_id.clone(),
            };
            self.publish(&node_subject(owner, request.op()), &request)
                .await?;
        }
        debug!(%session_id, "claim given back; offering session again");
        let offer = Offer {
            frame: notify(&record.info, Activity::Resume, unix_now()),
            inbound: record.info.initiator == Initiator::Connector,
        };
        self.publish(&notify_subject(connector), &offer).await
    }

    pub(crate) async fn ready(
        &self,
        sm_ws_id: &str,
        session_id: &str,
    ) -> Result<ReadyOutcome, RegistryError> {
        let Some(link) = self.local().link(sm_ws_id) else {
            return Ok(ReadyOutcome::NotOpen);
        };
        if !is_token(session_id) {
            return Ok(ReadyOutcome::NotOpen);
        }
        let key = session_key(&link.connector, session_id);
        let holder = Holder {
            sm_ws_id: sm_ws_id.to_owned(),
            node: self.me().to_owned(),
        };
        let owner = loop {
            let Some((mut record, revision)) = self.read(&key).await? else {
                return Ok(ReadyOutcome::NotOpen);
            };
            if record.bound.as_ref() != Some(&holder) || record.info.state != SessionState::Open {
                return Ok(ReadyOutcome::NotOpen);
            }
            if record.ready {
                return Ok(ReadyOutcome::Nothing);
            }
            record.ready = true;
            if self.cas(&key, &record, revision).await? {
                break record.owner;
            }
        };
        if owner == self.me() {
            return Ok(self.local().ready(sm_ws_id, session_id));
        }
        let request = NodeRequest::CallIn {
            session_id: session_id.to_owned(),
            sm_ws_id: sm_ws_id.to_owned(),
        };
        match self.request::<Option<ServerFrame>>(&owner, &request).await {
            Ok(Some(frame)) => Ok(ReadyOutcome::CallIn(frame)),
            Ok(None) => Ok(ReadyOutcome::Nothing),
            // No `call.in` reached the holder: the record is made not ready again, so that a
            // `session.ready` sent again asks the owner again (which answers again).
            Err(e) => {
                if let Err(undo) = self.unready_record(&key, &holder).await {
                    debug!(%session_id, error = %undo, "ready record left ready");
                }
                Err(e)
            }
        }
    }

    /// Makes a record held by `holder` not ready again, while its media is not up.
    async fn unready_record(&self, key: &str, holder: &Holder) -> Result<(), RegistryError> {
        loop {
            let Some((mut record, revision)) = self.read(key).await? else {
                return Ok(());
            };
            if record.bound.as_ref() != Some(holder)
                || !record.ready
                || record.media_attached
                || record.info.state == SessionState::Closed
            {
                return Ok(());
            }
            record.ready = false;
            if self.cas(key, &record, revision).await? {
                return Ok(());
            }
        }
    }

    pub(crate) async fn list(
        &self,
        query: &SessionQuery<'_>,
    ) -> Result<SessionPage, RegistryError> {
        let SessionQuery {
            connector,
            channel,
            remote_address,
            state,
            offset,
            limit,
        } = *query;
        let mirror = lock(&self.inner.mirror);
        // The cluster lists as many closed sessions as one node keeps, the latest closed:
        // the records of older ones stay in NATS until they are forgotten (an hour).
        let mut closed: Vec<(Option<u64>, u64, &str)> = mirror
            .values()
            .filter(|r| r.connector == connector && r.info.state == SessionState::Closed)
            .map(|r| (r.info.closed_at, r.info.opened_at, r.info.id.as_str()))
            .collect();
        closed.sort_unstable_by(|a, b| b.cmp(a));
        let forgotten: HashSet<&str> = closed
            .iter()
            .skip(self.inner.max_closed)
            .map(|(_, _, id)| *id)
            .collect();
        let mut matching: Vec<SessionInfo> = mirror
            .values()
            .filter(|r| r.connector == connector)
            .filter(|r| !forgotten.contains(r.info.id.as_str()))
            .filter(|r| channel.is_none_or(|c| r.info.channel == c))
            .filter(|r| remote_address.is_none_or(|a| r.info.remote_address == a))
            .filter(|r| state.is_none_or(|s| r.info.state == s))
            .map(|r| r.info.clone())
            .collect();
        matching.sort_by(|a, b| a.opened_at.cmp(&b.opened_at).then_with(|| a.id.cmp(&b.id)));
        let total = matching.len();
        let end = offset.saturating_add(limit);
        Ok(SessionPage {
            items: matching.into_iter().skip(offset).take(limit).collect(),
            next_offset: (end < total).then_some(end),
        })
    }

    pub(crate) async fn close_session(
        &self,
        connector: &str,
        session_id: &str,
        reason: CloseReason,
    ) -> Result<(), CloseError> {
        if let Some(call) = self.local().call_of(connector, session_id) {
            return super::close_call(&call, reason).await;
        }
        if !is_token(session_id) {
            return Err(CloseError::NotFound);
        }
        let owner = lock(&self.inner.mirror)
            .get(&session_key(connector, session_id))
            .filter(|r| r.info.state == SessionState::Open && r.owner != self.me())
            .map(|r| r.owner.clone());
        let Some(owner) = owner else {
            return Err(CloseError::NotFound);
        };
        let request = NodeRequest::Close {
            connector: connector.to_owned(),
            session_id: session_id.to_owned(),
            reason,
        };
        match self.request::<CloseReply>(&owner, &request).await? {
            CloseReply::Closed => Ok(()),
            CloseReply::NotFound => Err(CloseError::NotFound),
            CloseReply::JustEnded => Err(CloseError::JustEnded),
        }
    }

    pub(crate) async fn open_session_for(
        &self,
        connector: &str,
        channel: Channel,
        remote: &str,
    ) -> Result<Option<String>, RegistryError> {
        if let Some(id) = self.local().open_session_for(connector, channel, remote) {
            return Ok(Some(id));
        }
        Ok(lock(&self.inner.mirror)
            .values()
            .find(|r| {
                r.connector == connector
                    && r.info.channel == channel
                    && r.info.state == SessionState::Open
                    && r.info.remote_address == remote
            })
            .map(|r| r.info.id.clone()))
    }

    // ---- NATS ----

    /// A record and its revision; `None` when absent or deleted.
    async fn read(&self, key: &str) -> Result<Option<(SessionRecord, u64)>, RegistryError> {
        self.check_connected()?;
        let entry = bounded("reading a session", self.inner.sessions.entry(key)).await?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                let record = serde_json::from_slice(&e.value)
                    .inspect_err(|err| warn!(key, error = %err, "unreadable session record"))
                    .ok()?;
                Some((record, e.revision))
            }))
    }

    /// Deletes a record if its revision is still `revision`; false if it was rewritten (or
    /// deleted) since.
    async fn delete_at(store: &kv::Store, key: &str, revision: u64) -> Result<bool, String> {
        let Err(e) = store.delete_expect_revision(key, Some(revision)).await else {
            return Ok(true);
        };
        // The error does not say whether the revision was wrong: the record says.
        match store.entry(key).await {
            Ok(Some(entry))
                if entry.operation == kv::Operation::Put && entry.revision == revision =>
            {
                Err(e.to_string())
            }
            Ok(_) => Ok(false),
            Err(read) => Err(format!("{e}; {read}")),
        }
    }

    /// Writes a record if its revision is still `revision`; false if someone wrote first.
    async fn cas(
        &self,
        key: &str,
        record: &SessionRecord,
        revision: u64,
    ) -> Result<bool, RegistryError> {
        self.check_connected()?;
        let value = serde_json::to_vec(record).map_err(unavailable)?;
        let update = self.inner.sessions.update(key, value.into(), revision);
        match tokio::time::timeout(NATS_TIMEOUT, update).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Ok(Err(e)) => Err(unavailable(format!("writing a session: {e}"))),
            Err(_) => Err(unavailable(
                "writing a session: no answer from NATS in time",
            )),
        }
    }

    async fn publish(
        &self,
        subject: &str,
        body: &impl serde::Serialize,
    ) -> Result<(), RegistryError> {
        self.check_connected()?;
        let payload = serde_json::to_vec(body).map_err(unavailable)?;
        bounded(
            "publishing",
            self.inner
                .client
                .publish(subject.to_owned(), payload.into()),
        )
        .await
    }

    /// Asks a node and reads its JSON answer.
    async fn request<T: serde::de::DeserializeOwned>(
        &self,
        node: &str,
        request: &NodeRequest,
    ) -> Result<T, RegistryError> {
        self.check_connected()?;
        let payload = serde_json::to_vec(request).map_err(unavailable)?;
        let subject = node_subject(node, request.op());
        let timeout = match request {
            NodeRequest::Close { .. } => REQUEST_TIMEOUT,
            _ => NATS_TIMEOUT,
        };
        let reply =
            tokio::time::timeout(timeout, self.inner.client.request(subject, payload.into()))
                .await
                .map_err(|_| unavailable(format!("node {node} did not answer in time")))?
                .map_err(|e| unavailable(format!("node {node} did not answer: {e}")))?;
        serde_json::from_slice(&reply.payload)
            .map_err(|e| unavailable(format!("node {node} answered badly: {e}")))
    }
}

fn notify(info: &SessionInfo, activity: Activity, now: u64) -> ServerFrame {
    ServerFrame::SessionNotify {
        session_id: info.id.clone(),
        channel: info.channel,
        remote_address: info.remote_address.clone(),
        local_address: info.local_address.clone(),
        activity,
        created_at: now,
    }
}
