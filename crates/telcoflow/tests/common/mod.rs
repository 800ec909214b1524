//! Test helpers: an in-process server, client configs and a simulated phone.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "tls")]
pub mod pki;

use futures_util::StreamExt;
use std::net::SocketAddr;
use std::time::Duration;
use telcoflow::{ClientEvent, ClientEvents, TelcoflowClientConfig, TelcoflowClientConfigBuilder};
use telcoflow_proto::SampleRate;
use telcoflow_proto::audio::{pcm_to_samples, samples_to_pcm};
use telcoflow_proto::sim::NetworkFrame;
use telcoflow_server::config::{DEV_API_KEY, DEV_CONNECTOR_UUID};
use telcoflow_server::{Config, RunningServer, Server};
use telcoflow_sim::{PhoneControl, SimPhone};

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
    let mut config = Config::development();
    config.listen = addr;
    start_server_with(config).await
}

pub async fn start_server_with(config: Config) -> RunningServer {
    init_tracing();
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

/// Dials the server at `server_url` from a simulated phone, answers the call that `events`
/// delivers and waits until the phone hears it answered.
pub async fn dial_and_answer(
    server_url: &str,
    events: &mut ClientEvents,
) -> (Phone, telcoflow::ActiveCall) {
    let mut phone = Phone::dial(server_url, "+4912345", "+4900001").await;
    let call = next_call(events).await;
    call.answer().await.expect("answered");
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    (phone, call)
}

/// A simulated phone (the server crate's `SimPhone`) with what it heard kept as bytes.
pub struct Phone {
    phone: SimPhone,
    /// PCM heard so far (s16le at 16 kHz), from the moment the call is up.
    pub heard: Vec<u8>,
    pub call_id: Option<String>,
}

impl Phone {
    fn new(phone: SimPhone) -> Self {
        Self {
            phone,
            heard: Vec::new(),
            call_id: None,
        }
    }

    /// Dials `to` from `from` at 16 kHz.
    pub async fn dial(base_url: &str, from: &str, to: &str) -> Self {
        Self::new(
            SimPhone::dial(base_url, from, to, SampleRate::Hz16000)
                .await
                .expect("phone dials"),
        )
    }

    /// Registers at `number` (a `call.connect` destination).
    pub async fn register(base_url: &str, number: &str) -> Self {
        Self::new(
            SimPhone::register(base_url, number, SampleRate::Hz16000)
                .await
                .expect("phone registers"),
        )
    }

    /// Waits for a network event matching `pred` and returns it (earlier ones are skipped).
    pub async fn wait_for(&mut self, pred: impl Fn(&NetworkFrame) -> bool) -> NetworkFrame {
        loop {
            let f = tokio::time::timeout(WAIT, self.phone.events().next())
                .await
                .expect("phone event in time")
                .expect("phone connection open");
            match &f {
                NetworkFrame::Trying { call_id }
                | NetworkFrame::Ringing { call_id }
                | NetworkFrame::Answered { call_id } => self.call_id = Some(call_id.clone()),
                _ => {}
            }
            if pred(&f) {
                return f;
            }
        }
    }

    /// Reads until at least `bytes` of audio have been heard in total.
    pub async fn hear(&mut self, bytes: usize) {
        while self.heard.len() < bytes {
            let frame = tokio::time::timeout(WAIT, self.phone.audio().recv())
                .await
                .expect("audio in time")
                .unwrap_or_else(|| panic!("phone closed after {} bytes", self.heard.len()));
            samples_to_pcm(&frame, &mut self.heard);
        }
    }

    /// Says `pcm` (s16le) in real time and waits until the last frame is sent.
    pub async fn speak(&mut self, pcm: &[u8]) {
        let mut samples = Vec::new();
        pcm_to_samples(pcm, &mut samples);
        let playback = self.phone.control().play(samples).expect("phone plays");
        assert!(
            tokio::time::timeout(WAIT, playback.finished())
                .await
                .expect("playback in time"),
            "playback cut short"
        );
    }

    pub fn control(&self) -> &PhoneControl {
        self.phone.control()
    }

    pub fn hangup(&self) {
        self.control().hangup().expect("phone hangs up");
    }
}

/// The first chunk of `audio` that is not silence (the phone sends silence while quiet).
pub async fn first_voiced(audio: &mut telcoflow::AudioStream) -> bytes::Bytes {
    tokio::time::timeout(WAIT, async {
        loop {
            let chunk = audio.next().await.expect("audio stream open");
            if energy(&chunk) > 0 {
                return chunk;
            }
        }
    })
    .await
    .expect("voiced audio in time")
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
