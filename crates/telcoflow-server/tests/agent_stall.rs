//! Delay that a stall leaves, won back: the caller's echo is as late after the stall as before,
//! and the agent is told what was dropped (`call.audio_skipped`).
//!
//! - An agent whose media connection stops for 300 ms, with a simulated caller, with a phone
//!   calling over SIP, and with the official Python SDK as the agent.
//! - A server stopped for 500 ms (SIGSTOP) in the middle of a SIP call.
//!
//! An agent's stall is a TCP relay between the agent and the server's media endpoint that stops
//! relaying, in both directions, for 15 of the caller's frames: what a stopped process or a
//! stalled link looks like from the server. It is timed by the frames the caller hears (which
//! the server's media clock paces), not by sleeps. The server's stall is a SIGSTOP of a server
//! in a process of its own. The delay is read off marks: every caller frame carries its number
//! as its samples, so the echo heard tells how many frames behind it is. Over SIP the number
//! is a mu-law code, which comes back exact when the agent runs at 8 kHz (no resampling).

mod common;

use common::{PyAgent, WAIT, dev_config, dial, samples, start};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use telcoflow_server::config::SipConfig;
use telcoflow_sip::rtp::g711::G711;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};

/// Caller frames heard before, during and after the stall.
const BEFORE: usize = 150;
const STALL: usize = 15;
const AFTER: usize = 150;
/// 20 ms at 16 kHz, 16-bit mono.
const FRAME: usize = 640;
/// Samples in a 20 ms frame at 8 kHz: one PCMU payload.
const FRAME_8K: usize = 160;
/// Marks over SIP count modulo this: mu-law codes 0x80.. decode to distinct positive samples
/// (none of them silence), and no delay comes near it.
const MARKS: u32 = 100;

/// Relays TCP connections to `target` (known once the server is up) while `held` is false;
/// held, it reads and writes nothing, so bytes wait in the sockets as they would for a
/// stopped process.
async fn relay(target: Arc<OnceLock<SocketAddr>>, held: watch::Receiver<bool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Some(&target) = target.get() else {
                continue;
            };
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            // Without Nagle on either side, as the endpoints themselves run: a 20 ms frame
            // must not wait for the ack of the one before it.
            if client.set_nodelay(true).is_err() || server.set_nodelay(true).is_err() {
                continue;
            }
            // Only the agent's media connections stall; its control connection and the
            // phone go through as well (the server's public URL is the relay's).
            let mut first = [0u8; 256];
            let Ok(n) = client.peek(&mut first).await else {
                continue;
            };
            let media = first[..n].windows(6).any(|w| w == b"/media");
            let held = if media {
                held.clone()
            } else {
                watch::channel(false).1
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, held.clone()));
            tokio::spawn(pipe(sr, cw, held));
        }
    });
    addr
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if held.wait_for(|h| !h).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just as the stall began wait with the rest.
        if held.wait_for(|h| !h).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A server whose public URL (the agents' media URL) is a [`relay`] to it, and the relay's
/// switch: `true` holds the agents' media connections.
async fn server_behind_relay(
    mut config: telcoflow_server::Config,
) -> (telcoflow_server::RunningServer, watch::Sender<bool>) {
    let target = Arc::new(OnceLock::new());
    let (hold, held) = watch::channel(false);
    let relay_addr = relay(target.clone(), held).await;
    config.public_url = Some(format!("ws://{relay_addr}"));
    let server = start(config).await;
    target.set(server.local_addr()).unwrap();
    (server, hold)
}

/// Holds the relay for the stall's frames, by the count of frames the caller heard.
fn hold_for_the_stall(hold: watch::Sender<bool>) -> impl FnMut(usize) {
    move |n| {
        if n == BEFORE {
            hold.send_replace(true);
        }
        if n == BEFORE + STALL {
            hold.send_replace(false);
        }
    }
}

/// A Rust SDK echo agent at `rate` on the server at `base_url`: it answers every call and
/// sends back what it hears. Yields the `call.audio_skipped` events it gets (`dropped_ms`,
/// `reason`).
async fn echo_agent(
    base_url: &str,
    rate: telcoflow::SampleRate,
) -> (
    telcoflow::TelcoflowClient,
    mpsc::Receiver<(u64, Option<String>)>,
) {
    let sdk = telcoflow::TelcoflowClientConfig::builder()
        .api_key(
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        )
        .base_url(base_url)
        .sample_rate(rate)
        .build()
        .expect("SDK config");
    let client = telcoflow::TelcoflowClient::connect(sdk)
        .await
        .expect("the agent connects");
    let (skipped_tx, skipped) = mpsc::channel(64);
    tokio::spawn({
        let client = client.clone();
        async move {
            client
                .serve(move |call: telcoflow::ActiveCall| {
                    let skipped_tx = skipped_tx.clone();
                    async move {
                        let mut events = call.events();
                        tokio::spawn(async move {
                            while let Some(event) = events.next().await {
                                if let telcoflow::CallEvent::AudioSkipped {
                                    dropped_ms,
                                    reason,
                                    ..
                                } = event
                                {
                                    let _ = skipped_tx.send((dropped_ms, reason)).await;
                                }
                            }
                        });
                        if call.answer().await.is_err() {
                            return;
                        }
                        let mut audio = call.audio_stream(telcoflow::AudioChannel::Mixed);
                        while let Some(chunk) = audio.next().await {
                            match call.send_audio(&chunk).await {
                                Ok(()) => {}
                                Err(e) if e.is_buffer_full() => {}
                                Err(_) => break,
                            }
                        }
                    }
                })
                .await
        }
    });
    (client, skipped)
}

/// The `call.audio_skipped` events the agent got so far.
fn skipped_so_far(
    skipped: &mut mpsc::Receiver<(u64, Option<String>)>,
) -> Vec<(u64, Option<String>)> {
    std::iter::from_fn(|| skipped.try_recv().ok()).collect()
}

/// The audio the agent was told was dropped for `reason`, in ms: the events `so_far` and
/// any that come within [`WAIT`] until one has that reason. A loaded machine may make an
/// answer late enough to count as a short stall of its own, so events of the other reason
/// may come too.
async fn skipped_for(
    skipped: &mut mpsc::Receiver<(u64, Option<String>)>,
    mut so_far: Vec<(u64, Option<String>)>,
    reason: &str,
) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !so_far.iter().any(|(_, why)| why.as_deref() == Some(reason)) {
        match tokio::time::timeout_at(deadline, skipped.recv()).await {
            Ok(Some(event)) => so_far.push(event),
            _ => panic!("no call.audio_skipped with reason {reason}; got {so_far:?}"),
        }
    }
    so_far.extend(skipped_so_far(skipped));
    so_far
        .iter()
        .filter(|(_, why)| why.as_deref() == Some(reason))
        .map(|(ms, _)| ms)
        .sum()
}

/// Taken by each test for its whole length: the tests talk in real time and read delays of a
/// frame, so they run one at a time rather than share two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The delay (in frames) read off the marks of the frames heard, by the count of frames heard
/// before each.
struct Delays(Vec<(usize, i64)>);

impl Delays {
    /// The median delay over the frames heard from `from` to `to`.
    fn window(&self, from: usize, to: usize) -> i64 {
        let within: Vec<i64> = self
            .0
            .iter()
            .filter(|(n, _)| (from..to).contains(n))
            .map(|(_, d)| *d)
            .collect();
        assert!(
            within.len() > (to - from) / 2,
            "only {} marked frames heard among frames {from}..{to}",
            within.len()
        );
        median(within)
    }

    /// Checks that the delay well after the stall (the last 50 frames heard) is at most
    /// `slack` frames over the one just before it (the 50 frames before frame [`BEFORE`]).
    fn assert_back(&self, stall: usize, slack: i64, told: &[(u64, Option<String>)]) {
        let before = self.window(BEFORE - 50, BEFORE);
        let after = self.window(BEFORE + stall + AFTER - 50, BEFORE + stall + AFTER);
        eprintln!("delay in frames: {before} before the stall, {after} after");
        assert!(
            after <= before + slack,
            "delay in frames: {before} before the stall, {after} after; \
             call.audio_skipped (ms, reason): {told:?}"
        );
    }
}

/// A simulated caller (16 kHz) hears `frames` frames while talking in real time by its own
/// clock, as a phone does, each frame's samples its number; `at_frame` is called with the
/// count of frames heard before each one.
async fn sim_talk(
    phone: &mut common::Phone,
    frames: usize,
    mut at_frame: impl FnMut(usize),
) -> Delays {
    let mut delays = Vec::new();
    let mut mark: i16 = 0;
    let mut clock = tokio::time::interval(Duration::from_millis(20));
    let mut n = 0;
    while n < frames {
        tokio::select! {
            _ = clock.tick() => {
                mark += 1;
                phone.send_level(mark, FRAME / 2).await;
            }
            heard = phone.ws.binary() => {
                at_frame(n);
                let level = i64::from(samples(&heard)[FRAME / 4]);
                if level > 0 {
                    delays.push((n, i64::from(mark) - level));
                }
                n += 1;
            }
        }
    }
    Delays(delays)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_agent_connection_leaves_no_delay_and_the_agent_is_told() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, hold) = server_behind_relay(dev_config()).await;
    let (_agent, mut skipped) = echo_agent(server.base_url(), telcoflow::SampleRate::Hz16000).await;

    let mut phone = dial(&server, "+15551230001", "+15559990001", 16000).await;
    tokio::time::timeout(WAIT, phone.event("answered"))
        .await
        .expect("answered");
    let delays = sim_talk(&mut phone, BEFORE + STALL + AFTER, hold_for_the_stall(hold)).await;
    let told = skipped_so_far(&mut skipped);
    delays.assert_back(STALL, 1, &told);
    let dropped_ms = skipped_for(&mut skipped, told, "agent_stall").await;
    assert!(dropped_ms >= 200, "dropped {dropped_ms} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_python_agent_connection_leaves_no_delay() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, hold) = server_behind_relay(dev_config()).await;
    // The official SDK: its media connection goes to the server's public URL, the relay.
    let Some(mut agent) = PyAgent::start(server.base_url()).await else {
        return;
    };
    let mut phone = dial(&server, "+15551230001", "+15559990001", 16000).await;
    tokio::time::timeout(WAIT, phone.event("answered"))
        .await
        .expect("answered");
    agent.event(WAIT, |e| e["event"] == "answered").await;
    let delays = sim_talk(&mut phone, BEFORE + STALL + AFTER, hold_for_the_stall(hold)).await;
    // The Python SDK ignores call.audio_skipped.
    delays.assert_back(STALL, 1, &[]);
}

/// A phone on loopback: SIP text by hand over UDP, one dialog, and PCMU on an RTP socket of
/// its own.
struct SipPhone {
    /// Held for the call's length, so that the server's SIP requests reach a socket; never
    /// read once the call is up.
    _sip: UdpSocket,
    rtp: UdpSocket,
    server_rtp: SocketAddr,
}

/// One SIP request of the phone's dialog.
fn sip_request(
    method: &str,
    cseq: u32,
    me: SocketAddr,
    server: SocketAddr,
    to_tag: &str,
    body: &str,
) -> String {
    let content = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/sdp\r\n".to_owned()
    };
    format!(
        "{method} sip:+15559990001@{server} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {me};branch=z9hG4bKstall{method}{cseq}\r\n\
         From: <sip:+15551230001@{me}>;tag=phone\r\n\
         To: <sip:+15559990001@{server}>{to_tag}\r\n\
         Call-ID: stall-{me}\r\n\
         CSeq: {cseq} {method}\r\n\
         Contact: <sip:phone@{me}>\r\n\
         Max-Forwards: 70\r\n\
         {content}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn sip_header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

impl SipPhone {
    /// Calls the development connector's number at `server` (its SIP address), offering PCMU;
    /// returns once the call is answered and the 200 acknowledged.
    async fn call(server: SocketAddr) -> Self {
        let sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = sip.local_addr().unwrap();
        let port = rtp.local_addr().unwrap().port();
        let sdp = format!(
            "v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"
        );
        let invite = sip_request("INVITE", 1, me, server, "", &sdp);
        sip.send_to(invite.as_bytes(), server).await.unwrap();
        let mut buf = vec![0u8; 65536];
        let ok = loop {
            let (n, _) = tokio::time::timeout(WAIT, sip.recv_from(&mut buf))
                .await
                .expect("an answer to the INVITE in time")
                .unwrap();
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.starts_with("SIP/2.0 1") || !msg.contains("CSeq: 1 INVITE") {
                continue;
            }
            assert!(msg.starts_with("SIP/2.0 200"), "{msg}");
            break msg;
        };
        let to = sip_header(&ok, "To").expect("a To header");
        let to_tag = to.find(";tag=").map_or("", |at| &to[at..]);
        let ack = sip_request("ACK", 1, me, server, to_tag, "");
        sip.send_to(ack.as_bytes(), server).await.unwrap();
        let body = &ok[ok.find("\r\n\r\n").expect("a body") + 4..];
        let rtp_port: u16 = body
            .lines()
            .find_map(|l| l.strip_prefix("m=audio "))
            .and_then(|m| m.split(' ').next())
            .and_then(|p| p.parse().ok())
            .expect("m=audio port in the answer");
        Self {
            _sip: sip,
            rtp,
            server_rtp: SocketAddr::from(([127, 0, 0, 1], rtp_port)),
        }
    }

    /// Hears `frames` RTP packets while sending one marked PCMU packet every 20 ms by its own
    /// clock; `at_frame` is called with the count of packets heard before each one.
    async fn talk(&self, frames: usize, mut at_frame: impl FnMut(usize)) -> Delays {
        let mut delays = Vec::new();
        let mut sent: u32 = 0;
        let mut clock = tokio::time::interval(Duration::from_millis(20));
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while n < frames {
            tokio::select! {
                _ = clock.tick() => {
                    sent += 1;
                    let mut packet = vec![0x80, 0];
                    packet.extend_from_slice(&(sent as u16).to_be_bytes());
                    packet.extend_from_slice(&(sent * FRAME_8K as u32).to_be_bytes());
                    packet.extend_from_slice(&0x5747_a11e_u32.to_be_bytes());
                    packet.extend_from_slice(&[mark_code(sent); FRAME_8K]);
                    self.rtp.send_to(&packet, self.server_rtp).await.unwrap();
                }
                r = tokio::time::timeout(WAIT, self.rtp.recv_from(&mut buf)) => {
                    let (len, _) = r.expect("RTP from the server in time").unwrap();
                    // RTCP (payload types 200-204 with the marker bit) is not audio.
                    if len < 12 || (200..=204).contains(&buf[1]) {
                        continue;
                    }
                    at_frame(n);
                    if let Some(mark) = heard_mark(&buf[12..len]) {
                        delays.push((n, i64::from((sent % MARKS + MARKS - mark) % MARKS)));
                    }
                    n += 1;
                }
            }
        }
        Delays(delays)
    }
}

/// The mu-law code marking frame `n`: decoded, an 8 kHz agent hears a constant sample that
/// encodes back to the same code.
fn mark_code(n: u32) -> u8 {
    0x80 + (n % MARKS) as u8
}

/// The mark a payload carries: every byte the same mark code (concealment or silence is
/// not a mark).
fn heard_mark(payload: &[u8]) -> Option<u32> {
    let first = *payload.first()?;
    let mark = u32::from(first.checked_sub(0x80)?);
    (mark < MARKS && payload.iter().all(|&b| b == first)).then_some(mark)
}

fn sip_config(rtp_ports: &str) -> telcoflow_server::Config {
    let mut config = dev_config();
    config.sip = Some(SipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtp_ports: rtp_ports.into(),
        ..SipConfig::default()
    });
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_agent_connection_leaves_no_delay_on_a_sip_call() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, hold) = server_behind_relay(sip_config("17200-17299")).await;
    let (_agent, mut skipped) = echo_agent(server.base_url(), telcoflow::SampleRate::Hz8000).await;
    let phone = SipPhone::call(server.sip_addr().unwrap()).await;
    let delays = phone
        .talk(BEFORE + STALL + AFTER, hold_for_the_stall(hold))
        .await;
    let told = skipped_so_far(&mut skipped);
    delays.assert_back(STALL, 1, &told);
    let dropped_ms = skipped_for(&mut skipped, told, "agent_stall").await;
    assert!(dropped_ms >= 200, "dropped {dropped_ms} ms");
}

/// Environment of a server run in a process of its own by [`stalled_server_process`].
const SERVER_PROCESS: &str = "TELCOFLOW_TEST_STALL_SERVER";
/// What that process prints before its base URL and SIP address once it listens.
const SERVER_READY: &str = "telcoflow stall test server on ";

/// Not a test: a server with SIP in a process of its own, for [`spawn_server`] (this test
/// binary runs itself with this one test), so that a test can stop it with SIGSTOP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by spawn_server, as a server in a process of its own"]
async fn stalled_server_process() {
    if std::env::var_os(SERVER_PROCESS).is_none() {
        return;
    }
    let mut server = start(sip_config("17300-17399")).await;
    println!(
        "{SERVER_READY}{} {}",
        server.base_url(),
        server.sip_addr().unwrap()
    );
    server.wait().await;
}

/// A server process (see [`stalled_server_process`]), killed when dropped.
struct ServerProcess {
    child: std::process::Child,
    base_url: String,
    sip_addr: SocketAddr,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server() -> ServerProcess {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "stalled_server_process",
            "--nocapture",
        ])
        .env(SERVER_PROCESS, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the server process starts");
    let stdout = child.stdout.take().unwrap();
    // The ready line comes within moments; a process that dies ends the lines.
    let line = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with(SERVER_READY))
        .expect("the server's ready line");
    let (base_url, sip_addr) = line[SERVER_READY.len()..]
        .split_once(' ')
        .expect("base URL and SIP address");
    ServerProcess {
        base_url: base_url.to_owned(),
        sip_addr: sip_addr.parse().unwrap(),
        child,
    }
}

/// Stops process `pid` for `len`: SIGSTOP, then SIGCONT (through kill(1): no unsafe code).
async fn stall_process(pid: u32, len: Duration) {
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {sig} {pid} failed");
    };
    signal("-STOP");
    // The stall itself, not a wait for a result.
    tokio::time::sleep(len).await;
    signal("-CONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_leaves_no_delay_on_a_sip_call_and_the_agent_is_told() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = spawn_server();
    let (_agent, mut skipped) = echo_agent(&server.base_url, telcoflow::SampleRate::Hz8000).await;
    let phone = SipPhone::call(server.sip_addr).await;
    let pid = server.child.id();
    let mut stall = None;
    let delays = phone
        .talk(BEFORE + AFTER, |n| {
            if n == BEFORE {
                stall = Some(tokio::spawn(stall_process(pid, Duration::from_millis(500))));
            }
        })
        .await;
    stall.expect("the stall ran").await.unwrap();
    // A frame or two of slack: on a busy machine the phone's packets reach the server less
    // evenly after its stall, and its jitter buffer rightly holds a little more. Without the
    // drop, the stale audio kept the call 3 frames behind in most runs, and no event came.
    let told = skipped_so_far(&mut skipped);
    delays.assert_back(0, 2, &told);
    let dropped_ms = skipped_for(&mut skipped, told, "server_stall").await;
    assert!(dropped_ms >= 200, "dropped {dropped_ms} ms");
}

#[tokio::test]
async fn marks_survive_mu_law() {
    for n in 0..MARKS {
        let code = mark_code(n);
        let sample = G711::Pcmu.decode_sample(code);
        assert!(sample > 0, "mark {n} is not silence");
        assert_eq!(G711::Pcmu.encode_sample(sample), code, "mark {n}");
        assert_eq!(heard_mark(&[code; FRAME_8K]), Some(n));
    }
}
