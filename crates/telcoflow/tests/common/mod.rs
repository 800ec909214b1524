//! Test helpers: an in-process server, client configs and a simulated phone.
#![allow(dead_code, unreachable_pub)]

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use telcoflow::{ClientEvent, ClientEvents, TelcoflowClientConfig, TelcoflowClientConfigBuilder};
use telcoflow_proto::SampleRate;
use telcoflow_proto::sim::{NetworkFrame, PhoneFrame, SIM_PATH};
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};
use telcoflow_server::{Config, RunningServer, Server};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for any single wait in these tests; reaching it is a failure, not a pace.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub async fn start_server() -> RunningServer {
    start_server_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
}

pub async fn start_server_on(addr: SocketAddr) -> RunningServer {
    init_tracing();
    let mut config = Config::development();
    config.listen = addr;
    Server::start(config).await.expect("server starts")
}

pub fn builder(server_url: &str) -> TelcoflowClientConfigBuilder {
    TelcoflowClientConfig::builder()
        .api_key(DEV_API_KEY, DEV_CONNECTOR_UUID)
        .base_url(server_url)
}

pub fn config(server_url: &str) -> TelcoflowClientConfig {
    builder(server_url).build().expect("valid config")
}

/// Waits for the next event matching `pred`, skipping others.
pub async fn next_event<T>(
    events: &mut ClientEvents,
    mut pred: impl FnMut(ClientEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = events.next().await.expect("event stream open");
            if let Some(t) = pred(ev) {
                return t;
            }
        }
    })
    .await
    .expect("expected event in time")
}

pub async fn next_call(events: &mut ClientEvents) -> telcoflow::ActiveCall {
    next_event(events, |ev| match ev {
        ClientEvent::IncomingCall(c) => Some(c),
        _ => None,
    })
    .await
}

/// A simulated phone on the server's `/v1/sim/phone` endpoint.
pub struct Phone {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// PCM heard so far.
    pub heard: Vec<u8>,
    pub call_id: Option<String>,
}

impl Phone {
    async fn open(base_url: &str, hello: PhoneFrame) -> Self {
        let url = format!("{base_url}{SIM_PATH}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("phone connects");
        ws.send(Message::Text(hello.encode().into()))
            .await
            .expect("hello");
        Self {
            ws,
            heard: Vec::new(),
            call_id: None,
        }
    }

    /// Dials `to` from `from` at 16 kHz.
    pub async fn dial(base_url: &str, from: &str, to: &str) -> Self {
        Self::open(
            base_url,
            PhoneFrame::Dial {
                from: from.into(),
                to: to.into(),
                sample_rate: SampleRate::Hz16000,
            },
        )
        .await
    }

    /// Registers at `number` (a `call.connect` destination).
    pub async fn register(base_url: &str, number: &str) -> Self {
        let mut p = Self::open(
            base_url,
            PhoneFrame::Register {
                number: number.into(),
                sample_rate: SampleRate::Hz16000,
            },
        )
        .await;
        p.wait_for(|f| matches!(f, NetworkFrame::Registered { .. }))
            .await;
        p
    }

    /// Next network text frame; audio received meanwhile goes to `heard`. `None` once closed.
    pub async fn next_frame(&mut self) -> Option<NetworkFrame> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("phone hears something in time")
            {
                Some(Ok(Message::Binary(pcm))) => self.heard.extend_from_slice(&pcm),
                Some(Ok(Message::Text(t))) => {
                    let f = NetworkFrame::decode(t.as_str()).expect("network frame");
                    match &f {
                        NetworkFrame::Trying { call_id }
                        | NetworkFrame::Ringing { call_id }
                        | NetworkFrame::Answered { call_id } => {
                            self.call_id = Some(call_id.clone())
                        }
                        _ => {}
                    }
                    return Some(f);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Waits for a frame matching `pred` and returns it.
    pub async fn wait_for(&mut self, pred: impl Fn(&NetworkFrame) -> bool) -> NetworkFrame {
        loop {
            let f = self.next_frame().await.expect("phone connection open");
            if pred(&f) {
                return f;
            }
        }
    }

    /// Reads until at least `bytes` of audio have been heard in total.
    pub async fn hear(&mut self, bytes: usize) {
        while self.heard.len() < bytes {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("audio in time")
            {
                Some(Ok(Message::Binary(pcm))) => self.heard.extend_from_slice(&pcm),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("phone connection failed: {e}"),
                None => panic!("phone connection closed after {} bytes", self.heard.len()),
            }
        }
    }

    /// Sends PCM in 20 ms (640-byte) frames.
    pub async fn speak(&mut self, pcm: &[u8]) {
        for frame in pcm.chunks(640) {
            self.ws
                .send(Message::Binary(frame.to_vec().into()))
                .await
                .expect("phone sends audio");
        }
    }

    pub async fn send(&mut self, frame: PhoneFrame) {
        self.ws
            .send(Message::Text(frame.encode().into()))
            .await
            .expect("phone sends");
    }
}

/// A recognisable, never-silent PCM pattern of `samples` samples.
pub fn pattern(samples: usize, seed: i16) -> Vec<u8> {
    (0..samples)
        .flat_map(|i| {
            let v = 1000 + ((i as i32 * 37 + seed as i32) % 20000) as i16;
            v.to_le_bytes()
        })
        .collect()
}

/// True if `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Mean absolute sample value of a PCM slice.
pub fn energy(pcm: &[u8]) -> u64 {
    let n = pcm.len() / 2;
    if n == 0 {
        return 0;
    }
    pcm.chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]).unsigned_abs() as u64)
        .sum::<u64>()
        / n as u64
}
