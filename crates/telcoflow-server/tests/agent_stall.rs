//! A Rust SDK echo agent whose media connection stops for 300 ms: the delay the caller hears
//! comes back and the agent is told what was dropped (`call.audio_skipped`).
//!
//! The stall is a TCP relay between the agent and the server's media endpoint that stops
//! relaying, in both directions, for 15 of the caller's frames: what a stopped process or a
//! stalled link looks like from the server. It is timed by the caller's frames (which the
//! server's media clock paces), not by sleeps, and the delay is read off marks: every caller
//! frame carries its number as its samples, so the echo heard tells how many frames behind it
//! is.

mod common;

use common::{WAIT, dev_config, dial, samples, start};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Caller frames before, during and after the stall.
const BEFORE: usize = 150;
const STALL: usize = 15;
const AFTER: usize = 150;
/// 20 ms at 16 kHz, 16-bit mono.
const FRAME: usize = 640;

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

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_agent_connection_leaves_no_delay_and_the_agent_is_told() {
    let target = Arc::new(OnceLock::new());
    let (hold, held) = watch::channel(false);
    let relay_addr = relay(target.clone(), held).await;
    let mut config = dev_config();
    config.public_url = Some(format!("ws://{relay_addr}"));
    let server = start(config).await;
    target.set(server.local_addr()).unwrap();

    let sdk = telcoflow::TelcoflowClientConfig::builder()
        .api_key(
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        )
        .base_url(server.base_url())
        .sample_rate(telcoflow::SampleRate::Hz16000)
        .build()
        .expect("SDK config");
    let client = telcoflow::TelcoflowClient::connect(sdk)
        .await
        .expect("the agent connects");
    let (skipped_tx, mut skipped) = mpsc::channel(8);
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

    let mut phone = dial(&server, "+15551230001", "+15559990001", 16000).await;
    tokio::time::timeout(WAIT, phone.event("answered"))
        .await
        .expect("answered");
    // The caller talks in real time by its own clock, as a phone does; the stall is timed by
    // the frames it hears, which the server's media clock paces.
    let mut delays: Vec<(usize, i64)> = Vec::new();
    let mut mark: i16 = 0;
    let mut clock = tokio::time::interval(std::time::Duration::from_millis(20));
    let mut n = 0;
    while n < BEFORE + STALL + AFTER {
        tokio::select! {
            _ = clock.tick() => {
                mark += 1;
                phone.send_level(mark, FRAME / 2).await;
            }
            heard = phone.ws.binary() => {
                if n == BEFORE {
                    hold.send_replace(true);
                }
                if n == BEFORE + STALL {
                    hold.send_replace(false);
                }
                let level = i64::from(samples(&heard)[FRAME / 4]);
                if level > 0 {
                    delays.push((n, i64::from(mark) - level));
                }
                n += 1;
            }
        }
    }
    let window = |from: usize, to: usize| {
        median(
            delays
                .iter()
                .filter(|(n, _)| (from..to).contains(n))
                .map(|(_, d)| *d)
                .collect(),
        )
    };
    let before = window(BEFORE - 50, BEFORE);
    let after = window(BEFORE + STALL + 100, BEFORE + STALL + AFTER);
    assert!(
        after <= before + 1,
        "delay in frames: {before} before the stall, {after} after"
    );
    let (dropped_ms, reason) = tokio::time::timeout(WAIT, skipped.recv())
        .await
        .expect("call.audio_skipped arrives")
        .expect("an event");
    assert_eq!(reason.as_deref(), Some("agent_stall"));
    assert!(dropped_ms >= 200, "dropped {dropped_ms} ms");
}
