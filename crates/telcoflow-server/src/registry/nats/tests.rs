//! A node's registry and its writer against a real nats-server (started by each test on a
//! free port), for what the cluster tests cannot bring about at will: the order in which a
//! node's own writes reach NATS.

use super::record::{self, CallCounts, Offer};
use super::{NatsRegistry, lock, writer};
use crate::call::CallHandle;
use crate::config::ClusterConfig;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use telcoflow_proto::control::{
    Channel, CloseReason, Initiator, ServerFrame, SessionInfo, SessionState,
};
use tokio_util::sync::CancellationToken;

const CONNECTOR: &str = "00000000-0000-4000-8000-000000000001";
const WAIT: Duration = Duration::from_secs(5);

/// A nats-server with JetStream, killed (and its store removed) on drop.
struct Nats {
    child: tokio::process::Child,
    store: std::path::PathBuf,
    url: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Starts a nats-server (`NATS_SERVER`, else the workspace's `.venv`); None when there is
/// none, outside CI.
async fn nats() -> Option<Nats> {
    nats_with(&[]).await
}

/// [`nats`] with more arguments for nats-server.
async fn nats_with(extra: &[&str]) -> Option<Nats> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let bin = std::env::var_os("NATS_SERVER")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../.venv/bin/nats-server");
            venv.is_file().then_some(venv)
        });
    let Some(bin) = bin else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server is not installed (set NATS_SERVER)"
        );
        eprintln!("skipped: no nats-server (set NATS_SERVER)");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = std::env::temp_dir().join(format!("telcoflow-nats-{}", uuid::Uuid::new_v4()));
    let mut child = tokio::process::Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store)
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server runs");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Server is ready") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "nats-server did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Some(Nats {
        child,
        store,
        url: format!("nats://127.0.0.1:{port}"),
    })
}

async fn node(nats: &Nats, id: &str) -> NatsRegistry {
    let cluster = ClusterConfig::new(nats.url.clone(), id);
    NatsRegistry::connect(&cluster, 100).await.unwrap()
}

/// Starts the node's writer on what was queued so far and what comes next.
fn run_writer(registry: &NatsRegistry, shutdown: &CancellationToken) {
    let writes = lock(&registry.inner.pending_writes).take().unwrap();
    tokio::spawn(writer::run(registry.clone(), writes, shutdown.clone()));
}

/// Opens an incoming call's session on `registry`, as a network edge does.
fn open_call(registry: &NatsRegistry, remote: &str) -> String {
    let call = CallHandle::detached(remote, "+15559990001");
    let info = SessionInfo {
        id: call.session_id.to_string(),
        channel: Channel::Telco,
        initiator: Initiator::Connector,
        state: SessionState::Open,
        remote_address: remote.into(),
        local_address: "+15559990001".into(),
        opened_at: crate::token::unix_now(),
        closed_at: None,
    };
    let connector: Arc<str> = CONNECTOR.into();
    registry
        .open_call_session(&connector, 10, info, call.clone(), None)
        .unwrap();
    call.session_id.to_string()
}

/// The session id of the next offer on `offers`.
async fn next_offer(offers: &mut async_nats::Subscriber) -> String {
    let message = tokio::time::timeout(WAIT, offers.next())
        .await
        .expect("an offer in time")
        .unwrap();
    let offer: Offer = serde_json::from_slice(&message.payload).unwrap();
    match offer.frame {
        ServerFrame::SessionNotify { session_id, .. } => session_id,
        other => panic!("not an offer: {other:?}"),
    }
}

#[tokio::test]
async fn a_call_that_ended_before_its_admission_is_neither_offered_nor_counted() {
    let Some(nats) = nats().await else {
        return;
    };
    let registry = node(&nats, "node-a").await;
    let mut offers = registry
        .inner
        .client
        .subscribe("telcoflow.notify.>")
        .await
        .unwrap();
    registry.inner.client.flush().await.unwrap();
    // The call ends while its admission still waits for the writer; another call follows.
    let ended = open_call(&registry, "+15550000001");
    assert!(registry.session_ended(&ended, CloseReason::CallTerminated));
    let next = open_call(&registry, "+15550000002");
    let shutdown = CancellationToken::new();
    run_writer(&registry, &shutdown);

    // The writer goes in order: the first offer is that of the call that goes on.
    assert_eq!(next_offer(&mut offers).await, next);
    let key = record::session_key(CONNECTOR, &ended);
    let stored = registry.inner.sessions.get(&key).await.unwrap();
    let closed: record::SessionRecord = serde_json::from_slice(&stored.unwrap()).unwrap();
    assert_eq!(closed.info.state, SessionState::Closed);
    assert!(closed.info.closed_at.is_some());
    // Only the call that goes on is counted.
    let counts = registry.inner.calls.get(CONNECTOR).await.unwrap().unwrap();
    let counts: CallCounts = serde_json::from_slice(&counts).unwrap();
    assert_eq!(counts.get("node-a"), Some(&1), "{counts:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn the_holder_on_another_node_is_told_when_the_call_ends() {
    let Some(nats) = nats().await else {
        return;
    };
    let registry = node(&nats, "node-a").await;
    let mut told = registry
        .inner
        .client
        .subscribe("telcoflow.node.node-b.control")
        .await
        .unwrap();
    registry.inner.client.flush().await.unwrap();
    let shutdown = CancellationToken::new();
    run_writer(&registry, &shutdown);
    let id = open_call(&registry, "+15550000001");
    let holder = record::Holder {
        sm_ws_id: "sm-on-b".into(),
        node: "node-b".into(),
    };
    // The claim from node B is taken once or twice (told again), then the call ends: the
    // holder's node is found with the holder, under the lock that closes the session.
    for _ in 0..2 {
        assert!(
            registry
                .claimed_here(&id, &holder, Default::default())
                .await
        );
    }
    assert!(registry.session_ended(&id, CloseReason::CallTerminated));
    let message = tokio::time::timeout(WAIT, told.next())
        .await
        .expect("the holder's node is told in time")
        .unwrap();
    match serde_json::from_slice(&message.payload).unwrap() {
        record::NodeRequest::Control {
            sm_ws_id,
            frame: ServerFrame::SessionClosed { session_id, .. },
        } => {
            assert_eq!(sm_ws_id, "sm-on-b");
            assert_eq!(session_id, id);
        }
        other => panic!("not a session.closed: {other:?}"),
    }
    // A claim that comes after the end binds nothing.
    assert!(
        !registry
            .claimed_here(&id, &holder, Default::default())
            .await
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_record_rewritten_since_it_was_seen_is_not_deleted() {
    let Some(nats) = nats().await else {
        return;
    };
    let registry = node(&nats, "node-a").await;
    let sessions = &registry.inner.sessions;
    let shutdown = CancellationToken::new();
    run_writer(&registry, &shutdown);
    // Seen at one revision, rewritten since (by its node, come back): it stays.
    let kept = record::session_key(CONNECTOR, "rewritten");
    let seen = sessions.put(&kept, "seen".into()).await.unwrap();
    sessions.put(&kept, "rewritten".into()).await.unwrap();
    registry.write(record::Write::Forget {
        key: kept.clone(),
        revision: seen,
    });
    // One seen at its current revision goes; the writer goes in order.
    let gone = record::session_key(CONNECTOR, "unchanged");
    let current = sessions.put(&gone, "unchanged".into()).await.unwrap();
    let mut watch = sessions.watch(&gone).await.unwrap();
    registry.write(record::Write::Forget {
        key: gone.clone(),
        revision: current,
    });
    let deleted = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("deleted in time")
        .unwrap()
        .unwrap();
    assert_eq!(
        deleted.operation,
        async_nats::jetstream::kv::Operation::Delete
    );
    let left = sessions.get(&kept).await.unwrap();
    assert_eq!(left.as_deref(), Some(&b"rewritten"[..]));
    shutdown.cancel();
}

#[test]
fn a_node_reaps_only_once_its_own_heartbeat_has_lived_a_lifetime() {
    use super::NODE_TTL;
    use super::node::Beating;
    use tokio::time::Instant;
    let start = Instant::now();
    let at = |secs: u64| start + Duration::from_secs(secs);
    let mut beating = Beating::default();
    assert!(!beating.may_reap(start));
    // Renewed every 2 s from the start: not before a lifetime has passed.
    for t in (0..=12).step_by(2) {
        beating.renewed(at(t));
    }
    assert!(!beating.may_reap(at(9)));
    assert!(beating.may_reap(at(12)));
    // Its own write fails (NATS away): no reaping, and not again until a lifetime after it
    // is renewed again.
    beating.failed();
    assert!(!beating.may_reap(at(13)));
    beating.renewed(at(14));
    assert!(!beating.may_reap(at(14) + NODE_TTL - Duration::from_secs(1)));
    for t in (16..=24).step_by(2) {
        beating.renewed(at(t));
    }
    assert!(beating.may_reap(at(24)));
    // A gap in its heartbeats (the node paused) counts as an outage too.
    beating.renewed(at(40));
    assert!(!beating.may_reap(at(40)));
    // Its heartbeat not renewed lately: no reaping.
    assert!(!beating.may_reap(at(60)));
}

#[tokio::test]
async fn a_claim_of_a_call_that_has_ended_closes_its_record() {
    let Some(nats) = nats().await else {
        return;
    };
    let registry = node(&nats, "node-a").await;
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let link = crate::registry::ControlLink {
        connector: CONNECTOR.into(),
        setup: Default::default(),
        tx,
        kill: CancellationToken::new(),
        inbound_calls: true,
    };
    registry.local().insert_link("sm-1", link);
    // The call has ended here, but its record still says open (the writer has not got to
    // it): the claim wins the record, and the owner (this node) has no call to bind.
    let id = open_call(&registry, "+15550000001");
    assert!(registry.session_ended(&id, CloseReason::CallTerminated));
    let key = record::session_key(CONNECTOR, &id);
    let open = record::SessionRecord {
        info: SessionInfo {
            state: SessionState::Open,
            closed_at: None,
            ..registry.local().info_of(&id).unwrap()
        },
        connector: CONNECTOR.into(),
        owner: "node-a".into(),
        incarnation: registry.inner.incarnation.clone(),
        bound: None,
        ready: false,
        media_attached: false,
        revision: 0,
    };
    registry
        .inner
        .sessions
        .create(&key, serde_json::to_vec(&open).unwrap().into())
        .await
        .unwrap();
    let claimed = registry.claim("sm-1", &id).await;
    assert!(
        matches!(claimed, Err(super::ClaimError::Closed)),
        "{claimed:?}"
    );
    let stored = registry.inner.sessions.get(&key).await.unwrap().unwrap();
    let stored: record::SessionRecord = serde_json::from_slice(&stored).unwrap();
    assert_eq!(stored.info.state, SessionState::Closed);
    assert!(stored.info.closed_at.is_some());
}

#[tokio::test]
async fn a_node_authenticates_to_nats_as_configured_and_says_why_it_cannot() {
    let Some(nats) = nats_with(&["--auth", "s3cret-token"]).await else {
        return;
    };
    let Err(refused) =
        NatsRegistry::connect(&ClusterConfig::new(nats.url.clone(), "node-a"), 100).await
    else {
        panic!("no token, no entry");
    };
    assert!(
        refused.to_lowercase().contains("authorization"),
        "says why: {refused}"
    );
    let mut wrong = ClusterConfig::new(nats.url.clone(), "node-a");
    wrong.token = Some("guess".into());
    assert!(NatsRegistry::connect(&wrong, 100).await.is_err());
    let mut cluster = ClusterConfig::new(nats.url.clone(), "node-a");
    cluster.token = Some("s3cret-token".into());
    let node = NatsRegistry::connect(&cluster, 100)
        .await
        .expect("the token lets it in");
    // It reaches JetStream: the buckets exist.
    assert!(node.inner.sessions.status().await.is_ok());
}

#[tokio::test]
async fn the_cluster_lists_as_many_closed_sessions_as_one_node_keeps() {
    let Some(nats) = nats().await else {
        return;
    };
    let registry = NatsRegistry::connect(&ClusterConfig::new(nats.url.clone(), "node-a"), 2)
        .await
        .unwrap();
    let record = |id: &str, closed_at: Option<u64>| record::SessionRecord {
        info: SessionInfo {
            id: id.into(),
            channel: Channel::Telco,
            initiator: Initiator::Connector,
            state: if closed_at.is_some() {
                SessionState::Closed
            } else {
                SessionState::Open
            },
            remote_address: "+15550000001".into(),
            local_address: "+15559990001".into(),
            opened_at: 100,
            closed_at,
        },
        connector: CONNECTOR.into(),
        owner: "node-b".into(),
        incarnation: String::new(),
        bound: None,
        ready: false,
        media_attached: false,
        revision: 0,
    };
    {
        let mut mirror = lock(&registry.inner.mirror);
        for (id, closed_at) in [
            ("c1", Some(200)),
            ("c2", Some(400)),
            ("c3", Some(300)),
            ("c4", Some(100)),
            ("o1", None),
        ] {
            mirror.insert(record::session_key(CONNECTOR, id), record(id, closed_at));
        }
    }
    let page = registry
        .list(&crate::registry::SessionQuery {
            connector: CONNECTOR,
            channel: None,
            remote_address: None,
            state: None,
            offset: 0,
            limit: 100,
        })
        .await
        .unwrap();
    let mut ids: Vec<&str> = page.items.iter().map(|s| s.id.as_str()).collect();
    ids.sort_unstable();
    // The open one, and the two closed last; the older closed ones are not listed.
    assert_eq!(ids, ["c2", "c3", "o1"]);
}
