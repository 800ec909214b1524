//! Several server nodes in one process sharing one registry through a real nats-server
//! (started by each test on a free port): offers, claims, listings, HTTP close and the call
//! limit span the nodes; `call.connect` and the hand-off of a call work across them.

mod common;
mod sipp;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use telcoflow_server::RunningServer;

const RATE: u32 = 16000;
/// Samples of one 20 ms frame at [`RATE`].
const FRAME: usize = 320;

/// The listing on `server` once `done` holds for it (polled; fails after [`WAIT`]).
async fn listing_until(server: &RunningServer, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = http(server, "GET", "/public/v1/sessions").await;
        assert_eq!(status, 200, "{body}");
        let items = body["items"].as_array().cloned().unwrap_or_default();
        if done(&items) {
            return items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "listing on {} never got there: {body}",
            server.base_url()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn session_of<'a>(items: &'a [Value], remote: &str) -> Option<&'a Value> {
    items.iter().find(|s| s["remoteAddress"] == remote)
}

fn open_with(items: &[Value], remote: &str) -> bool {
    session_of(items, remote).is_some_and(|s| s["state"] == "OPEN")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_one_node_takes_and_echoes_a_call_that_arrived_on_another() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    let mut agent = control(&a, RATE, "mixed").await;
    let mut phone = dial(&b, "+15551230001", "+15559990001", RATE).await;
    assert!(phone.call_id.is_some(), "{:?}", phone.call_id);

    let call_in = agent.take_call().await;
    let url = call_in["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{}/", b.base_url())),
        "media URL {url} is not on node B ({})",
        b.base_url()
    );
    assert_eq!(call_in["callId"].as_str(), phone.call_id.as_deref());
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    phone.event("answered").await;

    // The caller's audio reaches the agent, which sends each frame back; the caller hears
    // its own level.
    let mut agent_heard = false;
    let mut caller_heard = false;
    for _ in 0..150 {
        phone.send_level(1234, FRAME).await;
        let heard = media.audio(0).await;
        agent_heard |= heard[FRAME / 2] == 1234;
        media.send_audio(&pcm_level(heard[FRAME / 2], FRAME)).await;
        let back = samples(&phone.ws.binary().await);
        if back[FRAME / 2] == 1234 {
            caller_heard = true;
            break;
        }
    }
    assert!(
        agent_heard,
        "the agent on node A never heard the caller on node B"
    );
    assert!(caller_heard, "the caller never heard the echo");

    // The caller hangs up on node B: the agent's control connection on node A is told.
    phone.send_json(json!({"type": "hangup"})).await;
    let closed = agent.ws.expect_type("session.closed").await;
    assert_eq!(closed["sessionId"], call_in["sessionId"], "{closed}");
    listing_until(&a, |items| {
        session_of(items, "+15551230001").is_some_and(|s| s["state"] == "CLOSED")
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_two_agents_on_two_nodes_wins_a_session() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    let mut on_a = control(&a, RATE, "mixed").await;
    let mut on_b = control(&b, RATE, "mixed").await;
    // Calls arriving on either node, each raced for by both agents at once.
    for round in 0..6 {
        let edge = if round % 2 == 0 { &a } else { &b };
        let mut phone = dial(edge, &format!("+1555000{round}"), "+15559990001", RATE).await;
        let seen_a = on_a.ws.expect_type("session.notify").await;
        let seen_b = on_b.ws.expect_type("session.notify").await;
        assert_eq!(seen_a["sessionId"], seen_b["sessionId"]);
        let id = seen_a["sessionId"].as_str().unwrap().to_owned();
        let (ra, rb) = tokio::join!(on_a.open(&id), on_b.open(&id));
        let (winner, loser, winner_id) = match (ra["ok"] == true, rb["ok"] == true) {
            (true, false) => (ra, rb, on_a.id.clone()),
            (false, true) => (rb, ra, on_b.id.clone()),
            _ => panic!("round {round}: not exactly one winner: {ra} / {rb}"),
        };
        assert_eq!(winner["content"]["session"]["id"], id.as_str(), "{winner}");
        assert_eq!(loser["errorCode"], "SESSION_BUSY", "{loser}");
        assert_eq!(
            loser["errorContent"]["boundSmWsId"],
            winner_id.as_str(),
            "{loser}"
        );
        // Claiming rings the caller, on its own node.
        phone.event("ringing").await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_and_close_on_either_node_span_the_cluster() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    let _on_a = dial(&a, "+15550000001", "+15559990001", RATE).await;
    let mut on_b = dial(&b, "+15550000002", "+15559990001", RATE).await;
    let both =
        |items: &[Value]| open_with(items, "+15550000001") && open_with(items, "+15550000002");
    listing_until(&a, both).await;
    let items = listing_until(&b, both).await;
    let b_session = session_of(&items, "+15550000002").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // An agent that connects now, to either node, is offered both unheld sessions.
    for node in [&a, &b] {
        let mut late = control(node, RATE, "mixed").await;
        let mut offered = vec![
            late.ws.expect_type("session.notify").await["remoteAddress"].clone(),
            late.ws.expect_type("session.notify").await["remoteAddress"].clone(),
        ];
        offered.sort_by_key(|v| v.to_string());
        assert_eq!(offered, ["+15550000001", "+15550000002"]);
    }

    // Node A closes the call that node B runs.
    let (status, body) = http(
        &a,
        "POST",
        &format!("/public/v1/sessions/{b_session}/close"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    on_b.event("hangup").await;
    let closed = |items: &[Value]| {
        session_of(items, "+15550000002").is_some_and(|s| s["state"] == "CLOSED")
            && open_with(items, "+15550000001")
    };
    listing_until(&a, closed).await;
    listing_until(&b, closed).await;

    // Closing it again, or a session nobody has, is a 404 on either node.
    let (status, _) = http(
        &b,
        "POST",
        &format!("/public/v1/sessions/{b_session}/close"),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = http(
        &a,
        "POST",
        "/public/v1/sessions/00000000-0000-4000-8000-00000000dead/close",
    )
    .await;
    assert_eq!(status, 404);
    a.shutdown().await;
    b.shutdown().await;
}

/// Whether a call just dialled was taken (it shows in `lister`'s listing) or refused (the
/// phone is hung up).
async fn admitted(lister: &RunningServer, phone: &mut Phone, remote: &str) -> bool {
    admitted_within(lister, phone, remote, WAIT).await
}

/// [`admitted`], waiting at most `bound` for either.
async fn admitted_within(
    lister: &RunningServer,
    phone: &mut Phone,
    remote: &str,
    bound: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while tokio::time::Instant::now() < deadline {
        let (_, body) = http(lister, "GET", "/public/v1/sessions?state=OPEN").await;
        if session_of(body["items"].as_array().unwrap(), remote).is_some() {
            return true;
        }
        tokio::select! {
            frame = phone.ws.text() => {
                if frame["type"] == "hangup" {
                    return false;
                }
            }
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    panic!("call from {remote} neither taken nor refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_limit_holds_across_nodes() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let node = |id: &str| {
        let mut config = node_config(&nats, id);
        config.limits.max_calls_per_connector = 2;
        config
    };
    let a = start(node("node-a")).await;
    let b = start(node("node-b")).await;
    let mut first = dial(&a, "+15550000001", "+15559990001", RATE).await;
    assert!(admitted(&b, &mut first, "+15550000001").await);
    let mut second = dial(&b, "+15550000002", "+15559990001", RATE).await;
    assert!(admitted(&a, &mut second, "+15550000002").await);
    // Two calls run in the cluster, one per node: a third is refused on either node.
    let mut third = dial(&a, "+15550000003", "+15559990001", RATE).await;
    assert!(!admitted(&b, &mut third, "+15550000003").await);
    let mut fourth = dial(&b, "+15550000004", "+15559990001", RATE).await;
    assert!(!admitted(&a, &mut fourth, "+15550000004").await);
    let (_, body) = http(&a, "GET", "/public/v1/sessions").await;
    let items = body["items"].as_array().unwrap();
    assert!(session_of(items, "+15550000003").is_none(), "{body}");
    assert!(session_of(items, "+15550000004").is_none(), "{body}");

    // Once a call ends, its place is free again, on the other node too.
    drop(first);
    listing_until(&b, |items| {
        session_of(items, "+15550000001").is_some_and(|s| s["state"] == "CLOSED")
    })
    .await;
    let mut taken = false;
    for attempt in 0..20 {
        let remote = format!("+155500001{attempt:02}");
        let mut next = dial(&b, &remote, "+15559990001", RATE).await;
        if admitted(&a, &mut next, &remote).await {
            taken = true;
            break;
        }
    }
    assert!(taken, "the freed place was never given to a new call");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_control_connection_hands_its_session_to_another_node() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    let mut leaving = control(&a, RATE, "mixed").await;
    let mut phone = dial(&b, "+15550000001", "+15559990001", RATE).await;
    let notify = leaving.ws.expect_type("session.notify").await;
    let id = notify["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(leaving.open(&id).await["ok"], true);
    leaving.ready(&id).await;
    let stale = leaving.ws.expect_type("call.in").await;

    // Another agent, on the call's own node, joins after the claim: nothing to offer it.
    let mut staying = control(&b, RATE, "mixed").await;
    let busy = staying.open(&id).await;
    assert_eq!(busy["errorCode"], "SESSION_BUSY", "{busy}");
    assert_eq!(busy["errorContent"]["boundSmWsId"], leaving.id.as_str());

    // The holder on node A drops before its media came up: the session is offered again.
    leaving.ws.close().await;
    drop(leaving);
    let resume = staying.ws.expect_type("session.notify").await;
    assert_eq!(resume["sessionId"], id.as_str(), "{resume}");
    assert_eq!(resume["activity"], "RESUME", "{resume}");
    assert_eq!(staying.open(&id).await["ok"], true);
    staying.ready(&id).await;
    let call_in = staying.ws.expect_type("call.in").await;
    assert!(call_in["url"].as_str().unwrap().starts_with(b.base_url()));
    assert_ne!(call_in["token"], stale["token"]);

    // The token minted for the agent that left no longer attaches; the new one does.
    let url = stale["url"].as_str().unwrap();
    let bearer = format!("Bearer {}", stale["token"].as_str().unwrap());
    assert!(
        common::Ws::connect(url, &[("authorization", &bearer)])
            .await
            .is_err(),
        "the departed agent's token still attaches"
    );
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    phone.event("answered").await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Environment of a node run in a process of its own by [`node_process`].
const NODE_NATS: &str = "TELCOFLOW_TEST_NODE_NATS";
const NODE_ID: &str = "TELCOFLOW_TEST_NODE_ID";
const NODE_MAX_CALLS: &str = "TELCOFLOW_TEST_NODE_MAX_CALLS";
const NODE_DRAIN_GRACE: &str = "TELCOFLOW_TEST_NODE_DRAIN_GRACE";
const NODE_DRAIN_HANDOVER: &str = "TELCOFLOW_TEST_NODE_DRAIN_HANDOVER";
/// What that process prints before its base URL once it listens.
const NODE_READY: &str = "telcoflow test node listening on ";

/// Not a test: a node in a process of its own, for [`spawn_node`] (this test binary runs
/// itself with this one test and the node's environment), so that a test can `kill -9` it.
#[tokio::test]
#[ignore = "run by spawn_node, as a node in a process of its own"]
async fn node_process() {
    let (Ok(nats), Ok(id)) = (std::env::var(NODE_NATS), std::env::var(NODE_ID)) else {
        return;
    };
    let mut config = node_config_at(&nats, &id);
    if let Ok(max) = std::env::var(NODE_MAX_CALLS) {
        config.limits.max_calls_per_connector = max.parse().unwrap();
    }
    if let Ok(grace) = std::env::var(NODE_DRAIN_GRACE) {
        config.drain_grace_secs = grace.parse().unwrap();
    }
    if let Ok(handover) = std::env::var(NODE_DRAIN_HANDOVER) {
        config.drain_handover_secs = handover.parse().unwrap();
    }
    let mut server = start(config).await;
    println!("{NODE_READY}{}", server.base_url());
    // SIGTERM drains the node, as it does `telcoflow serve`; the process ends once the
    // drain has stopped the server, with status 0 only if it did drain.
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let stopped = tokio::select! {
        _ = term.recv() => {
            server.drain();
            false
        }
        () = server.wait() => true,
    };
    if !stopped {
        server.wait().await;
    }
    assert!(server.is_draining(), "the node stopped without a drain");
}

/// A node process (see [`node_process`]), killed when dropped.
struct NodeProcess {
    child: std::process::Child,
    base_url: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(nats: &NatsServer, id: &str, max_calls: usize) -> NodeProcess {
    spawn_node_with(nats, id, max_calls, 30, 5)
}

/// [`spawn_node`] with a drain grace and a drain handover of so many seconds.
fn spawn_node_with(
    nats: &NatsServer,
    id: &str,
    max_calls: usize,
    drain_grace: u64,
    drain_handover: u64,
) -> NodeProcess {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "node_process", "--nocapture"])
        .env(NODE_NATS, &nats.url)
        .env(NODE_ID, id)
        .env(NODE_MAX_CALLS, max_calls.to_string())
        .env(NODE_DRAIN_GRACE, drain_grace.to_string())
        .env(NODE_DRAIN_HANDOVER, drain_handover.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the node process starts");
    let stdout = child.stdout.take().unwrap();
    // The ready line comes within moments; a process that dies ends the lines.
    let mut lines = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok);
    let line = lines
        .find(|l| l.starts_with(NODE_READY))
        .expect("the node's ready line");
    // Its later output is read too: a write to a closed pipe would fail the process.
    std::thread::spawn(move || lines.for_each(drop));
    NodeProcess {
        child,
        base_url: line[NODE_READY.len()..].to_owned(),
    }
}

impl NodeProcess {
    /// `host:port` of its listener.
    fn addr(&self) -> &str {
        self.base_url.trim_start_matches("ws://")
    }

    /// Its exit status, once it exits within `bound`.
    async fn exited_within(&mut self, bound: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node did not exit within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether it is still running.
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// Sends a signal to a node process: `STOP` stands for a node that stops answering (as in a
/// long pause), `CONT` lets it go on.
fn signal(node: &NodeProcess, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(node.child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} failed");
}

/// A bucket of the cluster, to read (or write) directly.
async fn bucket(nats: &NatsServer, name: &str) -> async_nats::jetstream::kv::Store {
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    async_nats::jetstream::new(client)
        .get_key_value(name)
        .await
        .unwrap()
}

/// The key of a session record of the development connector.
fn record_key(session_id: &str) -> String {
    format!(
        "{}.{session_id}",
        telcoflow_server::config::DEV_CONNECTOR_UUID
    )
}

/// A session's record as NATS holds it.
async fn record(sessions: &async_nats::jetstream::kv::Store, session_id: &str) -> Value {
    let value = sessions
        .get(record_key(session_id))
        .await
        .unwrap()
        .expect("the record exists");
    serde_json::from_slice(&value).unwrap()
}

/// The next value written under a watched key, within `bound`.
async fn next_put(watch: &mut async_nats::jetstream::kv::Watch, bound: Duration) -> Value {
    use futures_util::StreamExt as _;
    let entry = tokio::time::timeout(bound, watch.next())
        .await
        .expect("a write in time")
        .expect("the watch goes on")
        .unwrap();
    serde_json::from_slice(&entry.value).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_or_ready_that_the_owner_never_answered_is_given_back() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let mut config = node_config(&nats, "node-a");
    // Pings keep the agents' connections busy while a request to node B waits out its
    // timeout, longer than the test client waits for one frame.
    config.control_ping_interval_secs = 1;
    let a = start(config).await;
    let b = spawn_node(&nats, "node-b", 10);
    let sessions = bucket(&nats, "telcoflow_sessions").await;
    let nodes = bucket(&nats, "telcoflow_nodes").await;
    let mut first = control(&a, RATE, "mixed").await;
    let mut second = control(&a, RATE, "mixed").await;
    let mut phone = dial_url(&b.base_url, "+15550000001", "+15559990001", RATE).await;
    let id = first.ws.expect_type("session.notify").await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    second.ws.expect_type("session.notify").await;

    // Node B, which runs the call, stops answering: the claim's request to it times out.
    signal(&b, "STOP");
    first
        .ws
        .send_json(json!({"type": "session.open", "sessionId": id, "reqId": "stuck"}))
        .await;
    // Meanwhile the connection is not held up: a call that arrives on node A is offered to
    // it while the claim waits out its request to node B (a connection held up by the claim
    // would send the offer only with the claim's answer, seconds after it was made).
    let mut other = dial(&a, "+15550000002", "+15559990001", RATE).await;
    let offered = tokio::time::timeout(Duration::from_secs(1), first.ws.text())
        .await
        .expect("offered while the claim waits");
    assert_eq!(offered["type"], "session.notify", "{offered}");
    assert_ne!(offered["sessionId"], id.as_str(), "{offered}");
    let failed = first.ws.expect_type("response").await;
    signal(&b, "CONT");
    assert_eq!(failed["reqId"], "stuck", "{failed}");
    assert_eq!(failed["errorCode"], "INTERNAL_ERROR", "{failed}");
    other.send_json(json!({"type": "hangup"})).await;
    // The claim was given back before the answer: nobody holds the record, and the session
    // is offered again.
    let held = record(&sessions, &id).await;
    assert_eq!(held["bound"], Value::Null, "{held}");
    let resume = tokio::time::timeout(WAIT, async {
        loop {
            let notify = second.ws.expect_type("session.notify").await;
            if notify["sessionId"] == id.as_str() {
                return notify;
            }
        }
    })
    .await
    .expect("the session is offered again");
    assert_eq!(resume["activity"], "RESUME", "{resume}");
    // Node B may have taken the first claim late; the record decides who holds it.
    let won = second.open(&id).await;
    assert_eq!(won["ok"], true, "{won}");
    let busy = first.open(&id).await;
    assert_eq!(busy["errorCode"], "SESSION_BUSY", "{busy}");

    // Once node B's heartbeat is renewed (so that it is not taken for lost), it stops
    // answering again: the `session.ready` gets no `call.in`, and the record is made not
    // ready again.
    let mut beats = nodes.watch("node-b").await.unwrap();
    next_put(&mut beats, WAIT).await;
    let mut writes = sessions.watch(record_key(&id)).await.unwrap();
    signal(&b, "STOP");
    second.ready(&id).await;
    assert_eq!(next_put(&mut writes, WAIT).await["ready"], true);
    let undone = next_put(&mut writes, Duration::from_secs(10)).await;
    signal(&b, "CONT");
    assert_eq!(undone["ready"], false, "{undone}");
    assert_eq!(undone["bound"]["sm_ws_id"], second.id.as_str(), "{undone}");

    // Asked again, node B answers (again): the agent gets its `call.in` and the call goes on.
    second.ready(&id).await;
    let call_in = second.ws.expect_type("call.in").await;
    assert!(call_in["url"].as_str().unwrap().starts_with(&b.base_url));
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None).await;
    assert_eq!(answer["success"], true, "{answer}");
    phone.event("answered").await;
    a.shutdown().await;
}

/// The listing on `server` once `done` holds for it, polled for at most `bound`.
async fn listing_within(
    server: &RunningServer,
    bound: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> std::time::Duration {
    let started = tokio::time::Instant::now();
    loop {
        let (_, body) = http(server, "GET", "/public/v1/sessions").await;
        if done(body["items"].as_array().unwrap()) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "listing never got there in {bound:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_ends_only_its_calls_and_a_restarted_one_rejoins() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let mut config = node_config(&nats, "node-a");
    config.limits.max_calls_per_connector = 2;
    // Pings keep the agent's control connection busy while it waits for node B's loss to be
    // noticed, longer than the test client waits for one frame.
    config.control_ping_interval_secs = 1;
    let a = start(config).await;
    let b = spawn_node(&nats, "node-b", 2);

    // A call on node A, taken and answered by an agent on node A.
    let mut agent = control(&a, RATE, "mixed").await;
    let mut phone_a = dial(&a, "+15550000001", "+15559990001", RATE).await;
    let call_in = agent.take_call().await;
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone_a.event("answered").await;
    // A call on node B, taken and answered by the same agent on node A: its media goes to
    // node B.
    let mut phone_b = dial_url(&b.base_url, "+15550000002", "+15559990001", RATE).await;
    assert!(phone_b.call_id.is_some());
    let call_in_b = agent.take_call().await;
    let lost_id = call_in_b["sessionId"].as_str().unwrap().to_owned();
    assert!(call_in_b["url"].as_str().unwrap().starts_with(&b.base_url));
    let mut media_b = common::media(&call_in_b).await;
    assert_eq!(media_b.command("call.answer", None).await["success"], true);
    phone_b.event("answered").await;
    listing_within(&a, WAIT, |items| open_with(items, "+15550000002")).await;

    // kill -9: node B's session leaves the listing within 15 s; its caller and the agent's
    // media connection to it are cut off.
    let killed = tokio::time::Instant::now();
    drop(b);
    phone_b.ws.closed().await;
    media_b.ws.closed().await;
    let took = listing_within(&a, Duration::from_secs(15), |items| {
        session_of(items, "+15550000002").is_none() && open_with(items, "+15550000001")
    })
    .await;
    eprintln!("node B's session left the listing {took:?} after the kill");
    // The agent, on node A, is told on its control connection that the call on node B ended,
    // as it would be of any call that ends; and of that call only.
    let closed = tokio::time::timeout(
        Duration::from_secs(15),
        agent.ws.expect_type("session.closed"),
    )
    .await
    .expect("session.closed for the lost node's call within 15 s of the kill");
    assert_eq!(closed["sessionId"], lost_id.as_str(), "{closed}");
    assert_eq!(closed["reason"], "CALL_TERMINATED", "{closed}");
    eprintln!(
        "the agent got session.closed {:?} after the kill",
        killed.elapsed()
    );

    // The call on node A went on untouched.
    let mut heard = false;
    for _ in 0..50 {
        phone_a.send_level(777, FRAME).await;
        if media.audio(0).await[FRAME / 2] == 777 {
            heard = true;
            break;
        }
    }
    assert!(heard, "the call on node A stopped carrying audio");

    // Node B restarted with its id takes calls again, counted afresh: with node A's call,
    // the two places of the limit are one each.
    let b = spawn_node(&nats, "node-b", 2);
    let mut again = dial_url(&b.base_url, "+15550000003", "+15559990001", RATE).await;
    assert!(admitted(&a, &mut again, "+15550000003").await);
    let mut over = dial(&a, "+15550000004", "+15559990001", RATE).await;
    assert!(!admitted(&a, &mut over, "+15550000004").await);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_nats_is_down_calls_go_on_and_new_ones_fail_fast_until_it_is_back() {
    let Some(mut nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    // A call on node B, held by an agent on node A, with its media on node B.
    let mut agent = control(&a, RATE, "mixed").await;
    let mut phone = dial(&b, "+15550000001", "+15559990001", RATE).await;
    let call_in = agent.take_call().await;
    let session_id = call_in["sessionId"].as_str().unwrap().to_owned();
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    listing_until(&a, |items| open_with(items, "+15550000001")).await;

    nats.stop().await;
    // New calls are refused at once, once the node has seen NATS go.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let refused = dial(&b, "+15550000002", "+15559990001", RATE).await;
        if refused.call_id.as_deref() == Some("refused:error") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node B still takes calls with NATS down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Load balancers are told not to send it anything new.
    let (status, body) = http(&b, "GET", "/readyz").await;
    assert_eq!(
        (status, &body["status"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    // Closing a call on another node needs NATS: 503, saying so.
    let (status, body) = http(
        &a,
        "POST",
        &format!("/public/v1/sessions/{session_id}/close"),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.to_string().contains("cluster is unavailable"),
        "{body}"
    );
    // The call in progress goes on: the caller still reaches the agent.
    let mut heard = false;
    for _ in 0..50 {
        phone.send_level(555, FRAME).await;
        if media.audio(0).await[FRAME / 2] == 555 {
            heard = true;
            break;
        }
    }
    assert!(heard, "the call stopped carrying audio with NATS down");

    // NATS is back: the nodes reconnect by themselves and take calls across nodes again.
    nats.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let remote = format!("+155500002{attempt:02}");
        let mut next = dial(&b, &remote, "+15559990001", RATE).await;
        if next.call_id.as_deref() != Some("refused:error")
            && admitted(&a, &mut next, &remote).await
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cluster did not come back after NATS did"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = http(&b, "GET", "/readyz").await;
    assert_eq!((status, &body["status"]), (200, &json!("ready")), "{body}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_count_left_wrong_is_healed_by_its_node() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let node = |id: &str| {
        let mut config = node_config(&nats, id);
        config.limits.max_calls_per_connector = 1;
        config
    };
    let a = start(node("node-a")).await;
    let b = start(node("node-b")).await;
    // Node B's count says it runs calls it does not (a decrement lost while NATS was away).
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let calls = async_nats::jetstream::new(client)
        .get_key_value("telcoflow_calls")
        .await
        .unwrap();
    calls
        .put(
            telcoflow_server::config::DEV_CONNECTOR_UUID,
            r#"{"node-b":3}"#.into(),
        )
        .await
        .unwrap();
    let mut refused = dial(&a, "+15550000001", "+15559990001", RATE).await;
    assert!(!admitted(&a, &mut refused, "+15550000001").await);
    // Within a heartbeat or two node B sets its entry back to what it runs: nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let remote = format!("+155500003{attempt:02}");
        let mut next = dial(&a, &remote, "+15559990001", RATE).await;
        if admitted(&a, &mut next, &remote).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node B's count was never healed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_create_is_idempotent_across_nodes() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    let mut far = register(&a, "+1777", RATE).await;
    let mut on_a = control(&a, RATE, "mixed").await;
    let mut on_b = control(&b, RATE, "mixed").await;
    let create = json!({"type": "session.create", "channel": "TELCO", "remoteAddress": "+1777"});
    let created = on_a.request(create.clone()).await;
    assert_eq!(created["content"]["created"], true, "{created}");
    let session_id = created["content"]["sessionId"].as_str().unwrap().to_owned();
    // Once node B knows of it, creating it from node B returns node A's open session.
    listing_until(&b, |items| open_with(items, "+1777")).await;
    let again = on_b.request(create).await;
    assert_eq!(
        again["content"],
        json!({"sessionId": session_id, "created": false}),
        "{again}"
    );
    // Held by its creator: the agent on node B cannot take it.
    let busy = on_b.open(&session_id).await;
    assert_eq!(busy["errorCode"], "SESSION_BUSY", "{busy}");
    assert_eq!(busy["errorContent"]["boundSmWsId"], on_a.id.as_str());
    // Its creator connects it, on node A.
    assert_eq!(on_a.open(&session_id).await["ok"], true);
    on_a.ready(&session_id).await;
    let call_in = on_a.ws.expect_type("call.in").await;
    assert!(call_in["url"].as_str().unwrap().starts_with(a.base_url()));
    let mut media = media(&call_in).await;
    let answer = media.command("call.answer", None);
    let pick_up = async {
        far.event("incoming").await;
        far.send_json(json!({"type": "answer"})).await;
        far.event("answered").await;
    };
    let (answer, ()) = tokio::join!(answer, pick_up);
    assert_eq!(answer["success"], true, "{answer}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_record_cannot_be_closed_still_gives_its_place_back() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let mut config = node_config(&nats, "node-a");
    config.limits.max_calls_per_connector = 1;
    let a = start(config).await;
    let sessions = bucket(&nats, "telcoflow_sessions").await;
    let mut first = dial(&a, "+15550000001", "+15559990001", RATE).await;
    let items = listing_until(&a, |items| open_with(items, "+15550000001")).await;
    let id = session_of(&items, "+15550000001").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Its record can no longer be read, so that closing it fails every time (it stands for a
    // write that never gets through); then the call ends.
    sessions
        .put(record_key(&id), "not a record".into())
        .await
        .unwrap();
    first.send_json(json!({"type": "hangup"})).await;
    // The writer gives up on the record (retrying for some 5 s, the writes after it
    // waiting), not on the place: the next call is taken.
    let mut next = dial(&a, "+15550000002", "+15559990001", RATE).await;
    assert!(
        admitted_within(&a, &mut next, "+15550000002", Duration::from_secs(15)).await,
        "the ended call's place was never given back"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_count_of_a_node_gone_without_records_is_dropped() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let mut config = node_config(&nats, "node-a");
    config.limits.max_calls_per_connector = 1;
    let a = start(config).await;
    // A node with no heartbeat and no session records is still counted (its records were
    // reaped, or never written, before its count was).
    let calls = bucket(&nats, "telcoflow_calls").await;
    let connector = telcoflow_server::config::DEV_CONNECTOR_UUID;
    let mut writes = calls.watch(connector).await.unwrap();
    calls
        .put(connector, r#"{"node-gone":1}"#.into())
        .await
        .unwrap();
    assert_eq!(next_put(&mut writes, WAIT).await, json!({"node-gone": 1}));
    // Node A drops it within a reaper's round or two, once its own heartbeat has lived for
    // a heartbeat's lifetime (10 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let counts = next_put(&mut writes, left).await;
        if counts.get("node-gone").is_none() {
            break;
        }
    }
    let mut next = dial(&a, "+15550000001", "+15559990001", RATE).await;
    assert!(admitted(&a, &mut next, "+15550000001").await);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_long_nats_outage_no_node_reaps_another_that_is_slow_to_come_back() {
    let Some(mut nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = spawn_node(&nats, "node-b", 10);
    let sessions = bucket(&nats, "telcoflow_sessions").await;
    let _phone = dial_url(&b.base_url, "+15550000001", "+15559990001", RATE).await;
    let items = listing_until(&a, |items| open_with(items, "+15550000001")).await;
    let id = session_of(&items, "+15550000001").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // NATS goes away for longer than a heartbeat lives, and node B is slow to come back
    // after it (paused here): when NATS is back, node B's heartbeat has expired.
    signal(&b, "STOP");
    nats.stop().await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    nats.restart().await;
    let sessions_back = bucket(&nats, "telcoflow_sessions").await;
    drop(sessions);
    let mut writes = sessions_back.watch(record_key(&id)).await.unwrap();
    let back = tokio::time::Instant::now();
    let nodes = bucket(&nats, "telcoflow_nodes").await;
    let mut beats = nodes.watch("node-b").await.unwrap();
    // Node A is back at once; node B some seconds later.
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal(&b, "CONT");
    next_put(&mut beats, Duration::from_secs(10)).await;
    // Node A gives node B a heartbeat's lifetime after its own return before it takes it
    // for lost: node B's session is never deleted.
    let watched_until = back + Duration::from_secs(14);
    use futures_util::StreamExt as _;
    while let Ok(entry) = tokio::time::timeout_at(watched_until, writes.next()).await {
        let entry = entry.expect("the watch goes on").unwrap();
        assert_eq!(
            entry.operation,
            async_nats::jetstream::kv::Operation::Put,
            "node B's session was reaped after the outage"
        );
    }
    listing_until(&a, |items| open_with(items, "+15550000001")).await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_one_node_id_do_not_reap_each_others_records() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let first = spawn_node(&nats, "node-b", 10);
    let sessions = bucket(&nats, "telcoflow_sessions").await;
    let _phone = dial_url(&first.base_url, "+15550000001", "+15559990001", RATE).await;
    let items = listing_until(&a, |items| open_with(items, "+15550000001")).await;
    let id = session_of(&items, "+15550000001").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut writes = sessions.watch(record_key(&id)).await.unwrap();

    // A second process started by mistake with the same node id: neither it (which sees a
    // record of its node id that it does not run) nor node A (which sees two processes
    // renew one heartbeat) takes the first process's call for gone, for longer than a
    // heartbeat's lifetime past the second one's own wait before reaping.
    let second = spawn_node(&nats, "node-b", 10);
    let watched_until = tokio::time::Instant::now() + Duration::from_secs(14);
    use futures_util::StreamExt as _;
    while let Ok(entry) = tokio::time::timeout_at(watched_until, writes.next()).await {
        let entry = entry.expect("the watch goes on").unwrap();
        assert_eq!(
            entry.operation,
            async_nats::jetstream::kv::Operation::Put,
            "the first process's session was deleted"
        );
    }
    listing_until(&a, |items| open_with(items, "+15550000001")).await;

    // The first process is killed: its record goes once its heartbeat is no longer seen,
    // though the node id lives on in the second.
    drop(first);
    let took = listing_within(&a, Duration::from_secs(20), |items| {
        session_of(items, "+15550000001").is_none()
    })
    .await;
    eprintln!("the killed process's session left the listing {took:?} after the kill");
    drop(second);
    a.shutdown().await;
}

/// A call placed on `node` (a base URL) from `from`: once the echo agent says it answered it,
/// the caller hears its own level back. The agent's event for it.
async fn echoed_call(
    agent: &mut PyAgent,
    node: &str,
    from: &str,
    bound: Duration,
) -> (Phone, Value) {
    let mut phone = dial_url(node, from, "+15559990001", RATE).await;
    assert!(phone.call_id.is_some(), "{:?}", phone.call_id);
    let answered = agent
        .event(bound, |e| e["event"] == "answered" && e["from"] == from)
        .await;
    phone.event("answered").await;
    assert!(
        hears_echo(&mut phone, 1111, FRAME, 250).await,
        "the call from {from} on {node} does not echo"
    );
    (phone, answered)
}

/// The official Python SDK, given one base URL (HAProxy with the shipped
/// `deploy/haproxy.cfg` in front of three nodes), keeps serving calls while the nodes behind
/// the balancer are killed: the node its control connection goes through, then the node of
/// a call it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_python_sdk_keeps_serving_while_nodes_are_killed() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let ids = ["node-a", "node-b", "node-c"];
    let mut nodes: std::collections::HashMap<&str, NodeProcess> = ids
        .iter()
        .map(|id| (*id, spawn_node(&nats, id, 10)))
        .collect();
    let backends: Vec<(&str, &str)> = nodes
        .iter()
        .map(|(id, node)| (*id, node.base_url.as_str()))
        .collect();
    let Some(proxy) = haproxy(&backends).await else {
        return;
    };
    let Some(mut agent) = PyAgent::start(&proxy.base_url).await else {
        return;
    };
    let first = proxy.server_of_the_connection(&ids, WAIT).await;
    let others: Vec<&str> = ids.iter().copied().filter(|id| *id != first).collect();
    eprintln!("the agent's control connection goes through {first}");

    // Before: a call on another node is answered and echoes.
    let (mut before, _) =
        echoed_call(&mut agent, &nodes[others[0]].base_url, "+15550000101", WAIT).await;

    // kill -9 of the node the control connection goes through: the agent reconnects through
    // the balancer to a surviving node. The call in progress goes on (its media is on its own
    // node, not behind the balancer).
    let killed = tokio::time::Instant::now();
    drop(nodes.remove(first.as_str()));
    let second = proxy
        .server_of_the_connection(&others, Duration::from_secs(15))
        .await;
    eprintln!(
        "the agent reconnected through {second} {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        hears_echo(&mut before, 2222, FRAME, 250).await,
        "the call in progress stopped echoing"
    );

    // After: a call on each surviving node is answered and echoes.
    for (i, id) in others.iter().enumerate() {
        let from = format!("+1555000020{i}");
        echoed_call(
            &mut agent,
            &nodes[id].base_url,
            &from,
            Duration::from_secs(15),
        )
        .await;
    }

    // The node of a call the agent holds (not the node of its control connection) is killed:
    // the official SDK closes that session with CALL_TERMINATED.
    let third = *others.iter().find(|id| **id != second).unwrap();
    let (mut lost, answered) = echoed_call(
        &mut agent,
        &nodes[third].base_url,
        "+15550000301",
        Duration::from_secs(15),
    )
    .await;
    let lost_id = answered["sessionId"].clone();
    let killed = tokio::time::Instant::now();
    drop(nodes.remove(third));
    lost.ws.closed().await;
    let closed = agent
        .event(Duration::from_secs(20), |e| {
            e["event"] == "closed" && e["sessionId"] == lost_id
        })
        .await;
    assert_eq!(closed["reason"], "CALL_TERMINATED", "{closed}");
    eprintln!(
        "the Python SDK closed the lost call's session {:?} after the kill",
        killed.elapsed()
    );

    // The last node still serves.
    echoed_call(
        &mut agent,
        &nodes[second.as_str()].base_url,
        "+15550000401",
        Duration::from_secs(15),
    )
    .await;
}

/// The call's node, told by an agent on another node to `call.connect`, rings the destination
/// itself: a simulated phone registered on that node, or (below) a `sip:` URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_connect_from_an_agent_on_another_node_rings_the_destination_from_the_calls_node() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    let mut callee = register(&b, telcoflow_server::config::DEV_CONNECT_DESTINATION, RATE).await;
    let mut agent = control(&a, RATE, "mixed").await;
    let mut phone = dial(&b, "+15551230001", "+15559990001", RATE).await;
    let call_in = agent.take_call().await;
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;

    let connect = media.command("call.connect", Some(json!({"ringTimeSeconds": 10})));
    let answer = async {
        let incoming = callee.event("incoming").await;
        assert_eq!(incoming["from"], "+15551230001", "{incoming}");
        callee.send_json(json!({"type": "answer"})).await;
        callee.event("answered").await;
    };
    let (resp, ()) = tokio::join!(connect, answer);
    assert_eq!(resp["success"], true, "{resp}");
    assert_eq!(
        resp["result"]["destination"],
        telcoflow_server::config::DEV_CONNECT_DESTINATION
    );

    // Barge, the default: the destination hears the caller (the agent is silent) and the
    // caller hears the destination, all on node B.
    let (mut callee_heard, mut caller_heard) = (false, false);
    for _ in 0..150 {
        phone.send_level(1000, FRAME).await;
        callee.send_level(2000, FRAME).await;
        callee_heard |= samples(&callee.ws.binary().await)[FRAME / 2] == 1000;
        caller_heard |= samples(&phone.ws.binary().await)[FRAME / 2] == 2000;
        if callee_heard && caller_heard {
            break;
        }
    }
    assert!(callee_heard, "the destination never heard the caller");
    assert!(caller_heard, "the caller never heard the destination");
    // The agent on node A hears both parties through its media connection to node B.
    let mut agent_heard = false;
    for _ in 0..150 {
        phone.send_level(1000, FRAME).await;
        callee.send_level(2000, FRAME).await;
        if media.audio(0).await[FRAME / 2] == 3000 {
            agent_heard = true;
            break;
        }
    }
    assert!(agent_heard, "the agent never heard both parties");
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    callee.event("hangup").await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_connect_from_an_agent_on_another_node_dials_a_sip_uri_from_the_calls_node() {
    if !sipp::available() {
        return;
    }
    let Some(nats) = nats_server().await else {
        return;
    };
    let ports = sipp::ports(33);
    let dir = sipp::work_dir("cluster-connect");
    let mut args = sipp::uas_args(ports, "uas_answer.xml");
    // The SIP phone sends back whatever it hears, so the caller hears itself through it.
    args.push("-rtp_echo".into());
    let sip_phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let a = start(node_config(&nats, "node-a")).await;
    // Only node B, the call's node, has SIP: it alone dials out.
    let mut config_b = sipp::sip_config(ports);
    config_b.cluster = node_config(&nats, "node-b").cluster;
    config_b.connectors[0].connect.insert(
        "+15559990001".into(),
        format!("sip:+15550200@127.0.0.1:{}", ports.sipp_sip),
    );
    let b = start(config_b).await;
    let mut agent = control(&a, 8000, "mixed").await;
    let mut phone = dial(&b, "+15551230001", "+15559990001", 8000).await;
    let call_in = agent.take_call().await;
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "{resp}");

    let frame = 160;
    let level: i16 = 5000;
    let mut heard = 0;
    for round in 0..150 {
        let n = if round == 0 { 3 } else { 1 };
        for _ in 0..n {
            phone.send_level(level, frame).await;
        }
        heard = i32::from(samples(&phone.ws.binary().await)[frame / 2]);
        if (heard - i32::from(level)).abs() < 500 {
            break;
        }
    }
    assert!(
        (heard - i32::from(level)).abs() < 500,
        "the caller heard {heard} through the SIP phone, expected about {level}"
    );
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    sip_phone.await.unwrap().assert_passed();
    a.shutdown().await;
    b.shutdown().await;
}

/// The Rust SDK's hand-off across nodes: an agent on node A is offered a call that arrived on
/// node C, serialises it with `to_json` and leaves; an agent of another process, configured for
/// node B, rebuilds it with `from_json`, answers and echoes. The media goes to node C all along,
/// and node A's agent leaving does not hand the session to anyone else: its media is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_held_on_one_node_is_handed_off_to_an_agent_on_another() {
    use futures_util::StreamExt as _;
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    let c = start(node_config(&nats, "node-c")).await;
    let sdk_config = |server: &RunningServer, auto_connect_media: bool| {
        telcoflow::TelcoflowClientConfig::builder()
            .api_key(
                telcoflow_server::config::DEV_API_KEY,
                telcoflow_server::config::DEV_CONNECTOR_UUID,
            )
            .base_url(server.base_url())
            .sample_rate(telcoflow::SampleRate::Hz16000)
            .auto_connect_media(auto_connect_media)
            .build()
            .expect("SDK config")
    };
    // The first agent only forwards calls: it leaves their media connection unopened, so
    // that they can be serialised.
    let first = telcoflow::TelcoflowClient::connect(sdk_config(&a, false))
        .await
        .expect("the first agent connects");
    // A raw control connection on node B stands for the other agents of the connector: it
    // must not be offered the session again once the hand-off has taken it.
    let mut other = control(&b, RATE, "mixed").await;
    let mut events = first.events();
    let mut phone = dial(&c, "+15551230001", "+15559990001", RATE).await;
    let json = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if let telcoflow::ClientEvent::IncomingCall(call) = ev {
                return call.to_json().expect("a NEW call serialises");
            }
        }
        panic!("the first agent's events ended");
    })
    .await
    .expect("the first agent is offered the call");
    let handed: Value = serde_json::from_str(&json).unwrap();
    assert!(
        handed["session_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/", c.base_url())),
        "{handed}"
    );
    // The notify that reached node B's connection too, before node A's agent claimed it.
    let notify = other.ws.expect_type("session.notify").await;
    let session_id = notify["sessionId"].as_str().unwrap().to_owned();
    let first_id = first.sm_ws_id().expect("the first agent's connection id");

    let call = telcoflow::ActiveCall::from_json(&json, &sdk_config(&b, true)).expect("from_json");
    call.answer().await.expect("answer after the hand-off");
    phone.event("answered").await;
    // Node A's agent leaves once the call is taken over.
    first.shutdown().await;
    let echo = tokio::spawn({
        let call = call.clone();
        async move {
            let mut audio = call.audio_stream(telcoflow::AudioChannel::Mixed);
            while let Some(chunk) = audio.next().await {
                if call.send_audio(&chunk).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut caller_heard = false;
    for _ in 0..150 {
        phone.send_level(1234, FRAME).await;
        if samples(&phone.ws.binary().await)[FRAME / 2] == 1234 {
            caller_heard = true;
            break;
        }
    }
    assert!(
        caller_heard,
        "the caller never heard the echo after the hand-off"
    );
    // The session went to nobody else when node A's agent left (its media is up): another
    // claimant is told it is busy, held still by the agent that left, and was offered nothing.
    let busy = other.open(&session_id).await;
    assert_eq!(busy["errorCode"], "SESSION_BUSY", "{busy}");
    assert_eq!(
        busy["errorContent"]["boundSmWsId"],
        first_id.as_str(),
        "{busy}"
    );
    phone.send_json(json!({"type": "hangup"})).await;
    tokio::time::timeout(WAIT, echo)
        .await
        .expect("the echo ends with the call")
        .unwrap();
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

/// Whether the caller hears its own `level` back through an agent that echoes every frame
/// it hears (within a few hundred frames).
async fn echoes(phone: &mut Phone, media: &mut Media, level: i16) -> bool {
    for _ in 0..150 {
        phone.send_level(level, FRAME).await;
        let heard = media.audio(0).await;
        media.send_audio(&pcm_level(heard[FRAME / 2], FRAME)).await;
        if samples(&phone.ws.binary().await)[FRAME / 2] == level {
            return true;
        }
    }
    false
}

/// Node `id`'s heartbeat once `done` holds for it (polled; fails after [`WAIT`]).
async fn heartbeat_until(
    nodes: &async_nats::jetstream::kv::Store,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let beat = match nodes.get(id).await.unwrap() {
            Some(value) => serde_json::from_slice(&value).unwrap(),
            None => Value::Null,
        };
        if done(&beat) {
            return beat;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "heartbeat of {id} never got there: {beat}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_takes_no_new_call_hands_its_agents_over_and_exits_when_its_call_ends() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    // Its agent's claim below is never followed by media: node B keeps the connection for one
    // second of handover, then hands the session over.
    let mut b = spawn_node_with(&nats, "node-b", 10, 30, 1);
    let nodes = bucket(&nats, "telcoflow_nodes").await;
    let mut on_a = control(&a, RATE, "mixed").await;
    let mut on_b = control_url(&b.base_url, RATE, "mixed").await;

    // A call on node B, answered by the agent on node A: its media runs on node B.
    let mut phone = dial_url(&b.base_url, "+15550000001", "+15559990001", RATE).await;
    on_b.ws.expect_type("session.notify").await;
    let call_in = on_a.take_call().await;
    assert!(call_in["url"].as_str().unwrap().starts_with(&b.base_url));
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    assert!(echoes(&mut phone, &mut media, 1234).await);
    // A call on node A, claimed by the agent on node B, whose media is not up yet.
    let _waiting = dial(&a, "+15550000002", "+15559990001", RATE).await;
    let waiting_id = on_b.ws.expect_type("session.notify").await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    on_a.ws.expect_type("session.notify").await;
    assert_eq!(on_b.open(&waiting_id).await["ok"], true);

    let term = tokio::time::Instant::now();
    signal(&b, "TERM");
    heartbeat_until(&nodes, "node-b", |beat| beat["draining"] == true).await;
    // A call that arrives while node B drains is offered on node A only: node B's agent is
    // on its way out.
    let _arriving = dial(&a, "+15550000004", "+15559990001", RATE).await;
    // Node B closes its agent's control connection, to be opened again elsewhere, once its
    // handover is over...
    let (frames, closed) = on_b.ws.texts_until_close().await;
    let (code, reason) = closed.expect("a close frame");
    assert_eq!(code, 1001, "{reason}");
    let offered_on_b: Vec<_> = frames
        .iter()
        .filter(|f| f["type"] == "session.notify")
        .collect();
    let closed_after = term.elapsed();
    assert!(closed_after >= Duration::from_secs(1), "{closed_after:?}");
    assert!(offered_on_b.is_empty(), "{offered_on_b:?}");
    // ... and the session it held, not yet connected, is offered again on node A, as is the
    // new call.
    let mut resume = Value::Null;
    let mut arrived = false;
    while resume.is_null() || !arrived {
        let notify = on_a.ws.expect_type("session.notify").await;
        if notify["sessionId"] == waiting_id.as_str() {
            resume = notify;
        } else {
            assert_eq!(notify["remoteAddress"], "+15550000004", "{notify}");
            arrived = true;
        }
    }
    eprintln!(
        "after SIGTERM: control connection closed in {closed_after:?}, session offered again in {:?}",
        term.elapsed()
    );
    assert_eq!(resume["activity"], "RESUME", "{resume}");
    assert_eq!(on_a.open(&waiting_id).await["ok"], true);
    on_a.ready(&waiting_id).await;
    let moved = on_a.ws.expect_type("call.in").await;
    assert!(moved["url"].as_str().unwrap().starts_with(a.base_url()));

    // Node B takes no new call nor control connection, and says so.
    let refused = dial_url(&b.base_url, "+15550000003", "+15559990001", RATE).await;
    assert_eq!(refused.call_id.as_deref(), Some("refused:unavailable"));
    let (status, body) = http_at(b.addr(), "GET", "/readyz").await;
    assert_eq!(
        (status, &body["status"]),
        (503, &json!("draining")),
        "{body}"
    );
    let (status, body) = http(&a, "GET", "/readyz").await;
    assert_eq!((status, &body["status"]), (200, &json!("ready")), "{body}");
    let url = format!("{}/v1/agent/session-manager", b.base_url);
    let headers = auth_headers(
        telcoflow_server::config::DEV_API_KEY,
        telcoflow_server::config::DEV_CONNECTOR_UUID,
    );
    let err = Ws::connect(&url, &headers).await.err().expect("refused");
    assert_eq!(err.status, 503, "{}", err.body);
    heartbeat_until(&nodes, "node-b", |beat| beat["draining"] == true).await;

    // Its call in progress goes on untouched, and the node with it.
    assert!(echoes(&mut phone, &mut media, 4321).await);
    assert!(b.running());
    // The caller hangs up: the call ends as any call does, and node B exits 0.
    hang_up(&mut phone, &mut media).await;
    let hung_up = tokio::time::Instant::now();
    let status = b.exited_within(WAIT).await;
    eprintln!(
        "node B exited {:?} after its last call ended",
        hung_up.elapsed()
    );
    assert!(status.success(), "node B exited with {status}");
    heartbeat_until(&nodes, "node-b", Value::is_null).await;
    listing_until(&a, |items| {
        session_of(items, "+15550000001").is_some_and(|s| s["state"] == "CLOSED")
    })
    .await;
    a.shutdown().await;
}

/// A call dialled on the node at `base_url`, taken by `agent` and answered; its caller hears
/// the agent's echo.
async fn answered_on(base_url: &str, agent: &mut Control, from: &str) -> (Phone, Media) {
    let mut phone = dial_url(base_url, from, "+15559990001", RATE).await;
    assert!(phone.call_id.is_some(), "{:?}", phone.call_id);
    let call_in = agent.take_call().await;
    assert!(call_in["url"].as_str().unwrap().starts_with(base_url));
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    assert!(echoes(&mut phone, &mut media, 1000).await);
    (phone, media)
}

/// The caller hangs up: its agent is told the caller ended the call.
async fn hang_up(phone: &mut Phone, media: &mut Media) {
    phone.send_json(json!({"type": "hangup"})).await;
    let ended = terminated(media).await;
    assert_eq!(ended["data"]["reason"], "caller", "{ended}");
}

/// The call's `call.terminated`. Other events may come first: the echo above sends faster
/// than real time, so the call may report agent audio beyond its playout limit.
async fn terminated(media: &mut Media) -> Value {
    loop {
        let event = media.ws.expect_type("call_event").await;
        if event["data"]["event"] == "call.terminated" {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_drops_no_call() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let ids = ["node-a", "node-b"];
    let mut nodes = [spawn_node(&nats, ids[0], 10), spawn_node(&nats, ids[1], 10)];
    let mut agent = control_url(&nodes[0].base_url, RATE, "mixed").await;
    let mut agent_on = 0;
    // Calls by the node that runs them, each echoed by the agent.
    let mut calls = Vec::new();
    let mut callers = (1..).map(|n| format!("+155500001{n:02}"));
    for (i, node) in nodes.iter().enumerate() {
        let from = callers.next().unwrap();
        calls.push((i, answered_on(&node.base_url, &mut agent, &from).await));
    }
    for restart in 0..nodes.len() {
        let other = 1 - restart;
        signal(&nodes[restart], "TERM");
        if agent_on == restart {
            // The agent is moved off, and reconnects (as through a load balancer that asks
            // `/readyz`) to the node that stays.
            let (code, reason) = agent.ws.close_frame().await.expect("a close frame");
            assert_eq!(code, 1001, "{reason}");
            let (status, _) = http_at(nodes[other].addr(), "GET", "/readyz").await;
            assert_eq!(status, 200);
            agent = control_url(&nodes[other].base_url, RATE, "mixed").await;
            agent_on = other;
        }
        // New calls go to the node that stays; the draining node refuses them.
        let from = callers.next().unwrap();
        let refused = dial_url(&nodes[restart].base_url, &from, "+15559990001", RATE).await;
        assert_eq!(refused.call_id.as_deref(), Some("refused:unavailable"));
        let from = callers.next().unwrap();
        calls.push((
            other,
            answered_on(&nodes[other].base_url, &mut agent, &from).await,
        ));
        // Every call goes on, on either node.
        for (_, (phone, media)) in &mut calls {
            assert!(echoes(phone, media, 2000 + restart as i16).await);
        }
        // The calls of the draining node end when their callers hang up; it then exits 0,
        // and starts again with its id.
        let (mut ending, staying): (Vec<_>, Vec<_>) =
            calls.into_iter().partition(|(node, _)| *node == restart);
        for (_, (phone, media)) in &mut ending {
            hang_up(phone, media).await;
        }
        let status = nodes[restart].exited_within(WAIT).await;
        assert!(status.success(), "{} exited with {status}", ids[restart]);
        nodes[restart] = spawn_node(&nats, ids[restart], 10);
        calls = staying;
        let from = callers.next().unwrap();
        calls.push((
            restart,
            answered_on(&nodes[restart].base_url, &mut agent, &from).await,
        ));
    }
    // After the restart of every node, the calls still up end as usual.
    for (_, (phone, media)) in &mut calls {
        assert!(echoes(phone, media, 3000).await);
        hang_up(phone, media).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_nats_lost_its_store_the_nodes_make_their_buckets_again() {
    let Some(mut nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    let b = start(node_config(&nats, "node-b")).await;
    let mut agent = control(&a, RATE, "mixed").await;
    nats.stop().await;
    nats.restart_empty().await;
    // Once the nodes are back on NATS and have made the buckets again, a call that arrives
    // on node B is offered to the agent on node A and taken, as before (a failed heartbeat,
    // every 2 s, makes them).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut tries = 0u32;
    let call_in = loop {
        tries += 1;
        let mut phone = dial(&b, "+15550000001", "+15559990001", RATE).await;
        if phone
            .call_id
            .as_deref()
            .is_some_and(|id| !id.starts_with("refused:"))
        {
            let notified = tokio::time::timeout(
                Duration::from_secs(3),
                agent.ws.expect_type("session.notify"),
            )
            .await;
            if let Ok(notify) = notified {
                let id = notify["sessionId"].as_str().unwrap().to_owned();
                let opened = agent.open(&id).await;
                if opened["ok"] == true {
                    agent.ready(&id).await;
                    break (agent.ws.expect_type("call.in").await, phone);
                }
            }
        }
        phone.send_json(json!({"type": "hangup"})).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "no call offered across nodes after NATS came back empty ({tries} tries)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (call_in, mut phone) = call_in;
    assert!(call_in["url"].as_str().unwrap().starts_with(b.base_url()));
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A SIP call that arrives on node B is offered to an agent on node A, whose `call.in` sends
/// its media straight to node B; the agent hears its own audio back through the phone (SIPp
/// echoes RTP), and the phone's BYE ends the call for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sip_call_on_one_node_is_taken_and_echoed_by_an_agent_on_another() {
    if !sipp::available() {
        return;
    }
    let Some(nats) = nats_server().await else {
        return;
    };
    let ports = sipp::ports(34);
    let a = start(node_config(&nats, "node-a")).await;
    let mut config_b = sipp::sip_config(ports);
    config_b.cluster = node_config(&nats, "node-b").cluster;
    let b = start(config_b).await;
    let mut agent = control(&a, 16000, "mixed").await;
    let dir = sipp::work_dir("cluster-sip-in");
    let mut args = sipp::uac_args(&b, ports, "uac_short.xml", "+15559990001", 1);
    args.push("-rtp_echo".into());
    let phone = tokio::spawn(async move { sipp::run(&dir, &args).await });

    let call_in = agent.take_call().await;
    assert!(
        call_in["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/", b.base_url())),
        "media goes to the call's node: {call_in}"
    );
    let mut media = media(&call_in).await;
    assert_eq!(media.command("call.answer", None).await["success"], true);
    let frame = 320; // 20 ms at 16 kHz
    let level: i16 = 6000;
    let mut heard = 0;
    for round in 0..100 {
        let n = if round == 0 { 5 } else { 1 };
        for _ in 0..n {
            media.send_audio(&pcm_level(level, frame)).await;
        }
        let samples = media.audio(0).await;
        heard = i32::from(samples[samples.len() / 2]);
        if (heard - i32::from(level)).abs() < 600 {
            break;
        }
    }
    assert!(
        (heard - i32::from(level)).abs() < 600,
        "the echo through the phone came back as {heard}, expected about {level}"
    );
    terminated(&mut media).await;
    phone.await.unwrap().assert_passed();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_joins_is_offered_a_waiting_session_once() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let a = start(node_config(&nats, "node-a")).await;
    // A call waits, offered to nobody yet; node A's records show it.
    let _phone = dial(&a, "+15550000001", "+15559990001", RATE).await;
    listing_until(&a, |items| open_with(items, "+15550000001")).await;
    let mut agent = control(&a, RATE, "mixed").await;
    let offer = agent.ws.expect_type("session.notify").await;
    assert_eq!(offer["activity"], "NEW_INCOMING_CALL", "{offer}");

    // The notification of the same offer, published before the agent joined, reaches the
    // node only now; then one for another session, after it on the same subject.
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let subject = format!(
        "telcoflow.notify.{}",
        telcoflow_server::config::DEV_CONNECTOR_UUID
    );
    let mut later = offer.clone();
    later["sessionId"] = json!("a-later-session");
    for frame in [&offer, &later] {
        let payload = serde_json::to_vec(&json!({"frame": frame, "inbound": true})).unwrap();
        client
            .publish(subject.clone(), payload.into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let next = agent.ws.expect_type("session.notify").await;
    assert_eq!(
        next["sessionId"], "a-later-session",
        "offered twice: {next}"
    );
    a.shutdown().await;
}

/// A TCP relay to NATS for one node, which the test can cut (every connection dropped, new
/// ones refused) and restore: that node alone loses NATS.
struct NatsRelay {
    url: String,
    up: tokio::sync::watch::Sender<bool>,
}

impl NatsRelay {
    async fn start(nats: &NatsServer) -> Self {
        let upstream = nats.url.trim_start_matches("nats://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let (up, _) = tokio::sync::watch::channel(true);
        let watch = up.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*watch.borrow() {
                    continue;
                }
                let mut cut = watch.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { url, up }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

#[tokio::test]
async fn a_node_cut_off_from_nats_while_another_was_lost_tells_its_agents_once_back() {
    let Some(nats) = nats_server().await else {
        return;
    };
    let relay = NatsRelay::start(&nats).await;
    let mut config = node_config_at(&relay.url, "node-a");
    // Pings keep the agent's control connection busy while the test waits.
    config.control_ping_interval_secs = 1;
    let a = start(config).await;
    let b = spawn_node(&nats, "node-b", 10);
    let c = start(node_config(&nats, "node-c")).await;

    // A call on node B, claimed by an agent on node A, whose media is not up yet.
    let mut agent = control(&a, RATE, "mixed").await;
    let _phone = dial_url(&b.base_url, "+15550000001", "+15559990001", RATE).await;
    let call_in = agent.take_call().await;
    let lost_id = call_in["sessionId"].as_str().unwrap().to_owned();
    let sessions = bucket(&nats, "telcoflow_sessions").await;
    let key = record_key(&lost_id);
    let deadline = tokio::time::Instant::now() + WAIT;
    while sessions
        .get(&key)
        .await
        .unwrap()
        .is_none_or(|v| serde_json::from_slice::<Value>(&v).unwrap()["bound"].is_null())
    {
        assert!(tokio::time::Instant::now() < deadline, "never bound");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listing_within(&a, WAIT, |items| open_with(items, "+15550000001")).await;

    // Node A loses NATS; meanwhile node B is killed and node C reaps its session.
    relay.cut();
    drop(b);
    listing_within(&c, Duration::from_secs(20), |items| {
        session_of(items, "+15550000001").is_none()
    })
    .await;
    // Node A comes back: its agent learns that the call it held was lost.
    relay.restore();
    let closed = tokio::time::timeout(
        Duration::from_secs(15),
        agent.ws.expect_type("session.closed"),
    )
    .await
    .expect("session.closed for the lost call once node A is back");
    assert_eq!(closed["sessionId"], lost_id.as_str(), "{closed}");
    assert_eq!(closed["reason"], "CALL_TERMINATED", "{closed}");
    a.shutdown().await;
    c.shutdown().await;
}
