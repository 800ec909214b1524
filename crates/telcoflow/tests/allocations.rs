//! Proof that an audio frame costs no heap allocation, anywhere in the echo path.
//!
//! One process holds all of it: the real server (started in-process), a real Rust SDK echo
//! agent (`serve`, `audio_stream` -> `send_audio`) and a caller, all over loopback. The caller
//! is either a simulated phone that speaks the simulated network's protocol over a real
//! WebSocket, or a SIP phone that calls the server's SIP user agent over UDP and streams
//! PCMU over RTP (see [`sip_phone`]). A counting global allocator (private to this test
//! binary, which holds nothing else) counts every `alloc`, `alloc_zeroed` and `realloc` in
//! the process: server, SDK and caller together.
//!
//! After a warm-up (call answered, 100 frames echoed) the count is taken, 200 more
//! 20 ms frames make the round trip caller -> server -> agent -> server -> caller, and the
//! count is taken again. Each echoed frame is four WebSocket messages (caller to server,
//! server to agent, agent to server, server to caller) plus half a `buffer_request` (one
//! every 40 ms), a call-actor hop each way and the SDK's ring buffer. The caller side is
//! allocation-free itself (one prebuilt frame, sent as a shared `Bytes`; received frames are
//! inspected in place), so nothing is excluded from the count. Over SIP the caller's two
//! WebSocket messages are one RTP packet each way instead (the SIP leg's jitter buffer, G.711
//! and the playout tick on the server's side), and RTCP runs both ways (the phone's receiver
//! report every second, the server's sender report every 5 s). The SIP phone's own media work
//! is allocation-free too (its packet, its RTCP report and its receive buffer are built before
//! the window).
//!
//! On a machine that keeps up the window sees no allocation at all. Two kinds can still
//! happen now and then, never per frame, and the bounds leave room for them:
//!
//! - Buffer pools (the SDK's and the server's outgoing frames and texts) take a new block
//!   when frames of the block they would reuse are still queued, that is when a peer is far
//!   behind: at most two allocations per block (17 frames or more). These count as ours:
//!   fewer than one allocation in twenty frames in all ([`MAX_OURS_PER_FRAME`]).
//! - tungstenite's read buffer (a dependency): each WebSocket reads into a 4 KiB `BytesMut`
//!   and hands out every message as a `Bytes` split off it, which is free. When a message's
//!   header arrives and the block has no room left, tungstenite reserves the whole payload;
//!   the block is taken back in place if nothing else holds it and the data fits, otherwise
//!   it allocates a new one (two allocations). That happens when a message of the block is
//!   still on its way through the call (the reader ran ahead of the code it feeds) or
//!   several messages piled up in the socket: on a loaded machine, a few times in 200
//!   frames. These are told apart by their backtrace (`FrameCodec::read_frame`) and allowed
//!   up to one in four frames ([`MAX_READ_BUFFER_PER_FRAME`]); a message kept alive for
//!   long by our code would show up here at about one in two frames per socket.
//!
//! - Call events (`call_event`): a loaded machine may make the server win back a stall
//!   (`call.audio_skipped`) inside the window. An event is not per frame; its allocations,
//!   told apart by their backtrace (made in the call's `send_event`, read by the SDK's
//!   `CallEvent::from_wire`), are bounded on their own ([`MAX_EVENT_ALLOCATIONS`]).
//!
//! Over TLS (`wss://`, both the agent's and the phone's connections) our code still makes
//! none, but rustls (a dependency) takes a new buffer for every record it encrypts and every
//! record it decrypts: eight per echoed frame across the four connections, told apart by
//! their backtrace and bounded by [`MAX_TLS_PER_FRAME`]. Avoiding them would take rustls's
//! unbuffered API, which tokio-rustls does not use.
//!
//! Run it with the figures shown: `cargo test -p telcoflow --test allocations -- --nocapture`.
//! With `ALLOC_TRACE=1` in the environment the allocations of the window are listed by
//! where they happened (also printed when a bound is exceeded); `ALLOC_TRACE_FULL=1` adds
//! their backtraces.
// A global allocator is an `unsafe` trait; this file's allocator only forwards to `System`.
#![allow(unsafe_code)]

mod common;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::path::Path;
#[cfg(not(feature = "tls"))]
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use telcoflow::{AudioChannel, Error, TelcoflowClient, TelcoflowClientConfig};
use telcoflow_proto::SampleRate;
use telcoflow_proto::sim::{NetworkFrame, PhoneFrame, SIM_PATH};
use telcoflow_server::config::{
    DEV_API_KEY, DEV_CONNECT_DESTINATION, DEV_CONNECTOR_UUID, SipConfig,
};
use telcoflow_server::{Config, RunningServer, Server};
use telcoflow_sip::rtp::codec::Codec;
use telcoflow_sip::rtp::g711::G711;
use telcoflow_sip::rtp::jitter::FRAME_SAMPLES;
use telcoflow_sip::rtp::packet::{
    RTP_HEADER_LEN, ReceiverReport, ReportBlock, RtpHeader, RtpPacket, is_rtcp, write_sdes_cname,
};
use telcoflow_sip::sip::sdp::LocalMedia;
use telcoflow_sip::sip::transaction::Timers;
use telcoflow_sip::sip::uac::{OutgoingCall, UacConfig, UacEvent};
use telcoflow_sip::sip::{Transmit, Transport};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Frames echoed before the count starts (2 s): the call is up and every buffer and pool has
/// reached its working size (the server's pools take their second block after 32 frames or
/// some 20 buffer requests).
const WARMUP_FRAMES: u64 = 100;
/// Frames echoed while counting (4 s of audio).
const MEASURED_FRAMES: u64 = 200;
/// Allocations of our own code per echoed frame the test accepts: room for an occasional
/// pool refill on a loaded machine, far below one per frame on any of the paths.
const MAX_OURS_PER_FRAME: f64 = 0.05;
/// Allocations of tungstenite's read buffers per echoed frame the test accepts (see the
/// module documentation).
const MAX_READ_BUFFER_PER_FRAME: f64 = 0.25;
/// Allocations of the window whose backtrace is recorded (so that they can be told apart);
/// beyond these, allocations count as ours.
const MAX_RECORDED: usize = 4096;
/// The frame every allocation of tungstenite's read buffer comes through.
const READ_BUFFER_FRAME: &str = "tungstenite::protocol::frame::FrameCodec::read_frame";
/// Any frame of rustls (or of tokio-rustls, its tokio adapter): over TLS, its record buffers.
const TLS_FRAME: &str = "rustls::";
/// rustls's allocations per echoed frame over TLS: one buffer per record it encrypts and one
/// per record it decrypts, on each of the four connections an echoed frame crosses (a
/// `buffer_request` rides in the record of the audio it follows), and room for half a
/// `buffer_request` per frame in records of its own.
const MAX_TLS_PER_FRAME: f64 = 9.0;
/// Frames through which a call event (`call_event`) is made, sent and read: the server's
/// `send_event`, the SDK's decoding of it. An event is not per frame; on a loaded machine the
/// window may hold a `call.audio_skipped` from a stall catch-up, each costing a dozen.
const EVENT_FRAMES: [&str; 3] = [
    "::send_event",
    "CallEvent::from_wire",
    "media::CallEvent>::deserialize",
];
/// Call events' allocations the window accepts: a few events' worth.
const MAX_EVENT_ALLOCATIONS: u64 = 60;
/// Upper bound for any single wait; reaching it is a failure, not a pace.
const WAIT: Duration = Duration::from_secs(20);

/// Counts allocation calls of the whole process.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Backtraces still to be recorded for allocations inside the window.
static TRACE_LEFT: AtomicUsize = AtomicUsize::new(0);
static TRACES: Mutex<Vec<std::backtrace::Backtrace>> = Mutex::new(Vec::new());

thread_local! {
    /// Set while this thread records a backtrace, whose own allocations are not traced.
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

impl Counting {
    fn note() {
        if TRACING.get() {
            // The recording of a backtrace, not the code under test.
            return;
        }
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        if TRACE_LEFT.load(Ordering::Relaxed) == 0 {
            return;
        }
        TRACING.set(true);
        if TRACE_LEFT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            let trace = std::backtrace::Backtrace::force_capture();
            if let Ok(mut traces) = TRACES.lock() {
                traces.push(trace);
            }
        }
        TRACING.set(false);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; counting
// touches only atomics and a thread-local flag.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note();
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The scenarios share the process-wide counter, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// One call's set-up: who calls, the caller's and the agent's rates, and how many received
/// chunks the echo agent gathers before it sends them back in one `send_audio`.
#[derive(Clone, Copy)]
struct Scenario {
    caller: Caller,
    /// The caller's rate; a SIP phone is always 8000 Hz (G.711).
    caller_rate: SampleRate,
    agent_rate: SampleRate,
    batch: usize,
    /// The agent connects a destination phone (`call.connect`), which talks too: every tick
    /// then mixes caller, destination and agent. Simulated callers only.
    connect: bool,
    /// The server listens with TLS (`wss://`): the agent's and the simulated phone's
    /// connections are encrypted. Simulated callers only.
    tls: bool,
}

/// How the caller reaches the server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// A phone of the simulated network, over the server's WebSocket.
    Sim,
    /// A SIP phone: INVITE over UDP, PCMU over RTP.
    Sip,
}

#[test]
fn echo_frames_do_not_allocate_at_the_agent_rate() {
    run(Scenario {
        caller: Caller::Sim,
        caller_rate: SampleRate::Hz24000,
        agent_rate: SampleRate::Hz24000,
        batch: 1,
        connect: false,
        tls: false,
    });
}

#[test]
fn echo_frames_do_not_allocate_when_resampled() {
    run(Scenario {
        caller: Caller::Sim,
        caller_rate: SampleRate::Hz8000,
        agent_rate: SampleRate::Hz24000,
        batch: 1,
        connect: false,
        tls: false,
    });
}

/// The agent queues 100 ms at a time, as a speech synthesiser does: its SDK then answers each
/// `buffer_request` with frames back to back, and the server reads them back to back.
#[test]
fn echo_frames_do_not_allocate_when_the_agent_sends_in_bursts() {
    run(Scenario {
        caller: Caller::Sim,
        caller_rate: SampleRate::Hz16000,
        agent_rate: SampleRate::Hz16000,
        batch: 5,
        connect: false,
        tls: false,
    });
}

/// The agent connects a destination that talks too: the mixing path of the call actor, and
/// a registered phone's connection.
#[test]
fn echo_frames_do_not_allocate_on_a_connected_call() {
    run(Scenario {
        caller: Caller::Sim,
        caller_rate: SampleRate::Hz16000,
        agent_rate: SampleRate::Hz24000,
        batch: 1,
        connect: true,
        tls: false,
    });
}

/// The caller is a SIP phone: the server's SIP leg (RTP in, jitter buffer, G.711, playout
/// tick, RTP out) at the agent's own rate.
#[test]
fn echo_frames_do_not_allocate_over_sip() {
    run(Scenario {
        caller: Caller::Sip,
        caller_rate: SampleRate::Hz8000,
        agent_rate: SampleRate::Hz8000,
        batch: 1,
        connect: false,
        tls: false,
    });
}

/// A SIP phone and an agent at 24 kHz: the SIP leg's audio is resampled both ways.
#[test]
fn echo_frames_do_not_allocate_over_sip_when_resampled() {
    run(Scenario {
        caller: Caller::Sip,
        caller_rate: SampleRate::Hz8000,
        agent_rate: SampleRate::Hz24000,
        batch: 1,
        connect: false,
        tls: false,
    });
}

/// The agent's and the phone's connections over TLS (`wss://`): the records rustls encrypts
/// and decrypts on both ends, server and SDK.
#[cfg(feature = "tls")]
#[test]
fn echo_frames_over_tls() {
    run(Scenario {
        caller: Caller::Sim,
        caller_rate: SampleRate::Hz24000,
        agent_rate: SampleRate::Hz24000,
        batch: 1,
        connect: false,
        tls: true,
    });
}

fn run(scenario: Scenario) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Logging as a deployment runs it (info, formatted, written nowhere): per-frame code must
    // not cost allocations through spans or events either.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::sink)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let m = runtime
        .block_on(async { tokio::time::timeout(WAIT * 2, measure(scenario)).await })
        .expect("the scenario finishes in time");
    let traces = std::mem::take(&mut *TRACES.lock().unwrap_or_else(|p| p.into_inner()));
    let texts: Vec<String> = traces.iter().map(ToString::to_string).collect();
    // rustls first: over TLS tungstenite's reads go through it.
    let tls = texts.iter().filter(|t| t.contains(TLS_FRAME)).count() as u64;
    let read_buffer = texts
        .iter()
        .filter(|t| !t.contains(TLS_FRAME) && t.contains(READ_BUFFER_FRAME))
        .count() as u64;
    let events = texts
        .iter()
        .filter(|t| !t.contains(TLS_FRAME) && !t.contains(READ_BUFFER_FRAME))
        .filter(|t| EVENT_FRAMES.iter().any(|f| t.contains(f)))
        .count() as u64;
    let ours = m.allocs - read_buffer - tls - events;
    let frames = m.frames as f64;
    let (ours_per_frame, read_buffer_per_frame, tls_per_frame) = (
        ours as f64 / frames,
        read_buffer as f64 / frames,
        tls as f64 / frames,
    );
    let caller = match scenario.caller {
        Caller::Sim => "caller",
        Caller::Sip => "SIP caller (PCMU)",
    };
    println!(
        "{caller} {} Hz, agent {} Hz, agent sends {} frame(s) at a time, connected: {}, TLS: {}: {} \
         allocations over {} echoed frames ({} sent) = {:.3} per frame; ours {ours} \
         ({ours_per_frame:.3} per frame), tungstenite read buffers {read_buffer} \
         ({read_buffer_per_frame:.3} per frame), rustls {tls} ({tls_per_frame:.3} per frame), \
         call events {events}",
        scenario.caller_rate.hz(),
        scenario.agent_rate.hz(),
        scenario.batch,
        scenario.connect,
        scenario.tls,
        m.allocs,
        m.frames,
        m.sent,
        m.allocs as f64 / frames,
    );
    let within = events <= MAX_EVENT_ALLOCATIONS
        && ours_per_frame < MAX_OURS_PER_FRAME
        && read_buffer_per_frame < MAX_READ_BUFFER_PER_FRAME
        && tls_per_frame <= MAX_TLS_PER_FRAME;
    if !within || std::env::var_os("ALLOC_TRACE").is_some() {
        print_sites(&texts);
    }
    assert!(
        events <= MAX_EVENT_ALLOCATIONS,
        "{events} allocations of call events in the window (limit {MAX_EVENT_ALLOCATIONS})"
    );
    assert!(
        ours_per_frame < MAX_OURS_PER_FRAME,
        "{ours_per_frame:.3} allocations per echoed frame (limit {MAX_OURS_PER_FRAME})"
    );
    assert!(
        read_buffer_per_frame < MAX_READ_BUFFER_PER_FRAME,
        "{read_buffer_per_frame:.3} read-buffer allocations per echoed frame \
         (limit {MAX_READ_BUFFER_PER_FRAME})"
    );
    assert!(
        tls_per_frame <= MAX_TLS_PER_FRAME,
        "{tls_per_frame:.3} rustls allocations per echoed frame (limit {MAX_TLS_PER_FRAME})"
    );
}

struct Measured {
    allocs: u64,
    frames: u64,
    sent: u64,
}

/// The measuring window: counts frames sent and echoed, takes the count when the warm-up is
/// over and again when the window is. Allocation-free.
#[derive(Default)]
struct Window {
    echoed: u64,
    sent: u64,
    /// Allocation count and frames sent when the window opened.
    start: Option<(u64, u64)>,
}

impl Window {
    fn sent(&mut self) {
        self.sent += 1;
    }

    /// Notes one echoed frame; the figures once the window is over.
    fn echoed(&mut self) -> Option<Measured> {
        self.echoed += 1;
        if self.echoed == WARMUP_FRAMES {
            self.start = Some((ALLOCS.load(Ordering::SeqCst), self.sent));
            TRACE_LEFT.store(MAX_RECORDED, Ordering::SeqCst);
        } else if self.echoed == WARMUP_FRAMES + MEASURED_FRAMES {
            let allocs = ALLOCS.load(Ordering::SeqCst);
            TRACE_LEFT.store(0, Ordering::SeqCst);
            let (before, sent_before) = self.start.expect("window started");
            return Some(Measured {
                allocs: allocs - before,
                frames: MEASURED_FRAMES,
                sent: self.sent - sent_before,
            });
        }
        None
    }
}

async fn measure(scenario: Scenario) -> Measured {
    let mut config = Config::development();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    if scenario.caller == Caller::Sip {
        config.sip = Some(SipConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            rtp_ports: SIP_RTP_PORTS.into(),
            ..SipConfig::default()
        });
    }
    #[cfg(feature = "tls")]
    let pki = scenario.tls.then(|| serve_tls(&mut config));
    #[cfg(feature = "tls")]
    let ca = pki.as_ref().map(common::pki::Pki::ca);
    #[cfg(not(feature = "tls"))]
    let ca: Option<PathBuf> = None;
    let server = Server::start(config).await.expect("server starts");
    let (client, serving) = echo_agent(&server, scenario, ca.as_deref()).await;
    let measured = match scenario.caller {
        Caller::Sim => sim_phone(&server, scenario, ca.as_deref()).await,
        Caller::Sip => sip_phone(server.sip_addr().expect("SIP is listening")).await,
    };
    client.shutdown().await;
    serving
        .await
        .expect("serve task")
        .expect("serve ends cleanly");
    server.shutdown().await;
    measured
}

/// The server's certificate for a TLS scenario, from a private CA that lives as long as the
/// returned value.
#[cfg(feature = "tls")]
fn serve_tls(config: &mut Config) -> common::pki::Pki {
    let pki = common::pki::Pki::new();
    let (cert, key, _) = pki.issue("server", &["127.0.0.1", "localhost"]);
    config.tls = Some(telcoflow_server::config::TlsConfig {
        cert,
        key,
        client_ca: None,
    });
    pki
}

/// Connects the Rust SDK echo agent (trusting `ca` over TLS): it answers every call (and
/// connects the destination when the scenario says so) and sends back what it hears.
async fn echo_agent(
    server: &RunningServer,
    scenario: Scenario,
    ca: Option<&Path>,
) -> (TelcoflowClient, JoinHandle<Result<(), Error>>) {
    let Scenario {
        agent_rate,
        batch,
        connect,
        ..
    } = scenario;
    let mut builder = TelcoflowClientConfig::builder()
        .api_key(DEV_API_KEY, DEV_CONNECTOR_UUID)
        .base_url(server.base_url())
        .sample_rate(agent_rate);
    if let Some(ca) = ca {
        builder = builder.ca_cert(ca);
    }
    let client_config = builder.build().expect("valid config");
    let client = TelcoflowClient::connect(client_config)
        .await
        .expect("client connects");
    let serving = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .serve(move |call| async move {
                    if call.answer().await.is_err() {
                        return;
                    }
                    if connect {
                        let connected = call.connect(Duration::from_secs(10)).await;
                        if connected.is_err() {
                            return;
                        }
                    }
                    let mut audio = call.audio_stream(AudioChannel::Mixed);
                    // Sized once: the chunks are 20 ms at the agent's rate.
                    let mut gathered = Vec::with_capacity(batch * agent_rate.frame_bytes());
                    let mut chunks = 0;
                    while let Some(chunk) = audio.next().await {
                        gathered.extend_from_slice(&chunk);
                        chunks += 1;
                        if chunks < batch {
                            continue;
                        }
                        chunks = 0;
                        match call.send_audio(&gathered).await {
                            Err(e) if !e.is_buffer_full() => break,
                            _ => {}
                        }
                        gathered.clear();
                    }
                })
                .await
        })
    };
    (client, serving)
}

/// Dials over the simulated network (and registers the destination when the agent connects
/// one), streams a tone until the window is over and hangs up.
async fn sim_phone(server: &RunningServer, scenario: Scenario, ca: Option<&Path>) -> Measured {
    let Scenario {
        caller_rate,
        connect,
        ..
    } = scenario;
    let mut callee = if connect {
        let mut ws = phone(server.base_url(), ca).await;
        let register = PhoneFrame::Register {
            number: DEV_CONNECT_DESTINATION.into(),
            sample_rate: caller_rate,
        };
        ws.send(Message::text(register.encode()))
            .await
            .expect("register");
        wait_for(&mut ws, |f| matches!(f, NetworkFrame::Registered { .. })).await;
        Some(ws)
    } else {
        None
    };
    let mut ws = phone(server.base_url(), ca).await;
    let dial = PhoneFrame::Dial {
        from: "+4912345".into(),
        to: "+4900001".into(),
        sample_rate: caller_rate,
    };
    ws.send(Message::text(dial.encode())).await.expect("dial");
    wait_for(&mut ws, |f| matches!(f, NetworkFrame::Answered { .. })).await;
    if let Some(callee) = callee.as_mut() {
        wait_for(callee, |f| matches!(f, NetworkFrame::Incoming { .. })).await;
        callee
            .send(Message::text(PhoneFrame::Answer.encode()))
            .await
            .expect("answer");
        wait_for(callee, |f| matches!(f, NetworkFrame::Answered { .. })).await;
    }

    // One frame of a never-silent tone, built once; every send shares it.
    let frame: Bytes = tone(caller_rate.frame_samples())
        .flat_map(i16::to_le_bytes)
        .collect::<Vec<u8>>()
        .into();
    // The first clone of a `Bytes` made from a `Vec` sets up its sharing (one allocation);
    // do it outside the window.
    drop(frame.clone());

    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut window = Window::default();
    let measured = loop {
        tokio::select! {
            _ = ticker.tick() => {
                ws.send(Message::Binary(frame.clone())).await.expect("phone sends");
                if let Some(callee) = callee.as_mut() {
                    callee.send(Message::Binary(frame.clone())).await.expect("callee sends");
                }
                window.sent();
            }
            // What the destination hears is not counted, only read (pending without one).
            msg = async {
                match callee.as_mut() {
                    Some(callee) => callee.next().await,
                    None => std::future::pending().await,
                }
            } => {
                let msg = msg.expect("callee connection open").expect("callee connection healthy");
                if let Message::Text(text) = msg {
                    if let Ok(NetworkFrame::Hangup { reason, .. }) = NetworkFrame::decode(text.as_str()) {
                        panic!("destination hung up while measuring: {reason:?}");
                    }
                }
            }
            msg = ws.next() => {
                let msg = msg.expect("phone connection open").expect("phone connection healthy");
                match msg {
                    Message::Binary(pcm) if voiced(&pcm) => {
                        if let Some(measured) = window.echoed() {
                            break measured;
                        }
                    }
                    Message::Text(text) => {
                        if let Ok(NetworkFrame::Hangup { reason, .. }) = NetworkFrame::decode(text.as_str()) {
                            panic!("call ended while measuring: {reason:?}");
                        }
                    }
                    _ => {}
                }
            }
        }
    };

    ws.send(Message::text(PhoneFrame::Hangup.encode()))
        .await
        .expect("hang up");
    drop(ws);
    drop(callee);
    measured
}

/// The samples of a never-silent tone, one frame of `n`.
fn tone(n: usize) -> impl Iterator<Item = i16> {
    (0..n).map(|i| 2000 + (i as i16 % 50) * 100)
}

type Phone =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connection to the simulated phone network (trusting `ca` over TLS), with the small read
/// buffer every WebSocket of the project uses.
async fn phone(base_url: &str, ca: Option<&Path>) -> Phone {
    let url = format!("{base_url}{SIM_PATH}");
    let ws_config = WebSocketConfig::default().read_buffer_size(4096);
    let connected = match ca {
        #[cfg(feature = "tls")]
        Some(ca) => {
            tokio_tungstenite::connect_async_tls_with_config(
                url,
                Some(ws_config),
                true,
                Some(phone_tls(ca)),
            )
            .await
        }
        _ => tokio_tungstenite::connect_async_with_config(url, Some(ws_config), true).await,
    };
    connected.expect("phone connects").0
}

/// A rustls connector that trusts `ca` alone.
#[cfg(feature = "tls")]
fn phone_tls(ca: &Path) -> tokio_tungstenite::Connector {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots
            .add(cert.expect("CA certificate"))
            .expect("CA trusted");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(config))
}

/// Reads until a network event matching `pred` (audio before it is skipped).
async fn wait_for(ws: &mut Phone, pred: impl Fn(&NetworkFrame) -> bool) {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("network event in time")
            .expect("phone connection open")
            .expect("phone connection healthy");
        if let Message::Text(text) = msg {
            let frame = NetworkFrame::decode(text.as_str()).expect("network frame");
            if pred(&frame) {
                return;
            }
            if let NetworkFrame::Hangup { reason, .. } = frame {
                panic!("call ended: {reason:?}");
            }
        }
    }
}

/// Whether a received frame carries the tone rather than the silence played while the
/// agent's audio is not there yet.
fn voiced(pcm: &[u8]) -> bool {
    pcm.chunks_exact(2)
        .any(|s| i16::from_le_bytes([s[0], s[1]]).unsigned_abs() > 500)
}

/// Prints the recorded allocations grouped by where they happened: the innermost frame of
/// the project or of a WebSocket, byte, serialisation or runtime crate, and the innermost
/// project frame.
fn print_sites(traces: &[String]) {
    let mut sites = std::collections::BTreeMap::<String, usize>::new();
    for trace in traces {
        let symbols: Vec<&str> = trace
            .lines()
            .map(str::trim)
            .filter_map(|l| l.split_once(": ").map(|(_, sym)| sym))
            .filter(|sym| !sym.contains("allocations::Counting") && !sym.contains("__rust"))
            .collect();
        let interesting = |sym: &&&str| {
            [
                "telcoflow",
                "tungstenite",
                "bytes::",
                "serde",
                "tokio::",
                "axum",
                "hyper",
                "tracing",
                "allocations::",
            ]
            .iter()
            .any(|k| sym.contains(k))
        };
        let first = symbols.iter().find(interesting).copied().unwrap_or("?");
        let ours = symbols
            .iter()
            .find(|s| s.contains("telcoflow") || s.contains("allocations::"))
            .copied()
            .unwrap_or("?");
        *sites
            .entry(format!("{first}\n        in {ours}"))
            .or_default() += 1;
    }
    println!(
        "{} allocations recorded in the window, by site:",
        traces.len()
    );
    for (site, n) in sites {
        println!("{n:6}  {site}");
    }
    if std::env::var_os("ALLOC_TRACE_FULL").is_some() {
        for (i, t) in traces.iter().enumerate() {
            println!("--- allocation {i} ---\n{t}");
        }
    }
}

/// The server's RTP ports for the SIP scenarios (one call at a time; a port another process
/// holds is skipped by the server).
const SIP_RTP_PORTS: &str = "31000-31099";
/// The number the SIP phone dials (the development connector takes every number).
const SIP_CALLED: &str = "+15550009999";
/// The SIP phone sends an RTCP receiver report every this many RTP packets (1 s).
const RTCP_EVERY: u64 = 50;
/// Largest SIP datagram read: responses with SDP are well under this.
const SIP_DATAGRAM: usize = 8192;

/// A SIP phone made of the server's own sans-IO parts: [`OutgoingCall`] for INVITE, ACK and
/// BYE, [`RtpHeader`] / [`RtpPacket`] and [`G711`] for media, on UDP sockets of its own.
struct SipPhone {
    sip: UdpSocket,
    uac: OutgoingCall,
    buf: Vec<u8>,
}

impl SipPhone {
    /// Sends what the UAC has queued.
    async fn flush(&mut self) {
        while let Some(Transmit { payload, .. }) = self.uac.poll_transmit() {
            // The socket is connected to the server, the one destination the UAC uses.
            self.sip.send(&payload).await.expect("SIP send");
        }
    }

    /// The UAC's next event: reads SIP and runs its timers until there is one.
    async fn next_event(&mut self) -> UacEvent {
        loop {
            if let Some(event) = self.uac.poll_event() {
                return event;
            }
            tokio::select! {
                // Cancel-safe: a UDP recv loses nothing when not polled to completion.
                r = self.sip.recv(&mut self.buf) => {
                    let n = r.expect("SIP socket");
                    self.uac.handle_input(&self.buf[..n], std::time::Instant::now());
                }
                () = sleep_until_opt(self.uac.poll_timeout()) => {
                    self.uac.handle_timeout(std::time::Instant::now());
                }
            }
            self.flush().await;
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_opt(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Binds an RTP socket on 127.0.0.1 and its RTCP socket on the next port.
async fn rtp_pair() -> (UdpSocket, UdpSocket) {
    for _ in 0..16 {
        let rtp = UdpSocket::bind("127.0.0.1:0").await.expect("RTP socket");
        let port = rtp.local_addr().expect("RTP address").port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if let Ok(rtcp) = UdpSocket::bind(("127.0.0.1", next)).await {
            return (rtp, rtcp);
        }
    }
    panic!("no free RTP/RTCP port pair");
}

/// Calls `server` over SIP offering PCMU at 20 ms, takes the answer (the UAC ACKs it), then
/// sends one 160-sample packet of a never-silent tone every 20 ms and reads the server's RTP
/// until the window is over; hangs up with BYE.
async fn sip_phone(server: SocketAddr) -> Measured {
    let sip = UdpSocket::bind("127.0.0.1:0").await.expect("SIP socket");
    sip.connect(server).await.expect("SIP socket connects");
    let local = sip.local_addr().expect("SIP address");
    // The server's RTCP reports reach the RTCP socket (never read); ours leave from it.
    let (rtp, rtcp) = rtp_pair().await;
    let rtp_port = rtp.local_addr().expect("RTP address").port();
    let config = UacConfig {
        target: format!("sip:{SIP_CALLED}@{server}"),
        destination: server,
        transport: Transport::Udp,
        from: format!("sip:+15551230001@{}", local.ip()),
        contact: format!("sip:phone@{local}"),
        sent_by: local.to_string(),
        credentials: None,
        timers: Timers::default(),
        user_agent: "telcoflow-allocations".into(),
        delayed_offer: false,
        session_expires: None,
    };
    let media = LocalMedia {
        codecs: vec![Codec::Pcmu],
        ..LocalMedia::new(local.ip(), rtp_port, 1)
    };
    let mut phone = SipPhone {
        sip,
        uac: OutgoingCall::new(config, media, 1, std::time::Instant::now()),
        buf: vec![0; SIP_DATAGRAM],
    };
    phone.flush().await;
    let negotiated = tokio::time::timeout(WAIT, async {
        loop {
            match phone.next_event().await {
                UacEvent::Answered { negotiated } => break negotiated,
                UacEvent::Progress { .. } => {}
                other => panic!("call not answered: {other:?}"),
            }
        }
    })
    .await
    .expect("answered in time");
    assert_eq!(negotiated.codec, Codec::Pcmu, "the offered codec");
    let (codec, pt) = (G711::Pcmu, negotiated.payload_type);

    // The packet and the receive buffer, built once: each tick rewrites the header in place.
    let mut packet = [0u8; RTP_HEADER_LEN + FRAME_SAMPLES];
    let samples: Vec<i16> = tone(FRAME_SAMPLES).collect();
    codec.encode(&samples, &mut packet[RTP_HEADER_LEN..]);
    let mut received = [0u8; 2048];
    let (ssrc, mut sequence, mut timestamp) = (0x5eed_0001_u32, 1000u16, 160_000u32);
    // A phone's RTCP, built once: a receiver report about the server's stream and the CNAME.
    // Sent every second rather than every 5 s (RFC 3550), so that the window sees several.
    let mut report = [0u8; 128];
    let report_len = {
        let rr = ReceiverReport {
            ssrc,
            reports: vec![ReportBlock {
                ssrc: 0x5eed_0002,
                highest_sequence: 1,
                ..ReportBlock::default()
            }],
        };
        let n = rr.write(&mut report).expect("room for the report");
        n + write_sdes_cname(ssrc, "phone@127.0.0.1", &mut report[n..]).expect("room for SDES")
    };
    let report = &report[..report_len];

    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut window = Window::default();
    let measured = loop {
        tokio::select! {
            _ = ticker.tick() => {
                RtpHeader::new(pt, sequence, timestamp, ssrc)
                    .write(&mut packet)
                    .expect("the packet holds a header");
                sequence = sequence.wrapping_add(1);
                timestamp = timestamp.wrapping_add(FRAME_SAMPLES as u32);
                rtp.send_to(&packet, negotiated.remote).await.expect("RTP send");
                window.sent();
                if window.sent % RTCP_EVERY == 0 {
                    rtcp.send_to(report, negotiated.remote_rtcp).await.expect("RTCP send");
                }
            }
            // Cancel-safe: a UDP recv loses nothing when not polled to completion.
            r = rtp.recv_from(&mut received) => {
                let (n, _) = r.expect("RTP socket");
                let data = &received[..n];
                if is_rtcp(data) {
                    continue;
                }
                let Ok(p) = RtpPacket::parse(data) else { continue };
                let voiced = p.payload.iter().any(|&b| codec.decode_sample(b).unsigned_abs() > 500);
                if p.header.payload_type == pt && voiced {
                    if let Some(measured) = window.echoed() {
                        break measured;
                    }
                }
            }
            // SIP while streaming: nothing is expected; a hang-up by the server fails the test.
            r = phone.sip.recv(&mut phone.buf) => {
                let n = r.expect("SIP socket");
                phone.uac.handle_input(&phone.buf[..n], std::time::Instant::now());
                phone.flush().await;
                while let Some(event) = phone.uac.poll_event() {
                    assert!(
                        !matches!(event, UacEvent::RemoteHangup),
                        "the server hung up while measuring"
                    );
                }
            }
        }
    };

    phone.uac.hangup(std::time::Instant::now());
    phone.flush().await;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match phone.next_event().await {
                UacEvent::HungUp | UacEvent::RemoteHangup => break,
                _ => {}
            }
        }
    })
    .await;
    ended.expect("BYE answered in time");
    measured
}
