//! baresip, a real softphone, calls in and plays a 440 Hz tone (made with sox); an echo agent
//! written with the Rust SDK (16 kHz) answers and plays back what it hears; baresip's recording
//! of what it heard must hold the tone.
//!
//! A second test: an agent sends DTMF and baresip receives the RFC 4733 events.
//!
//! A third: an agent transfers baresip's call; baresip takes the REFER, calls the target (a
//! number of this same server, whose call the agent answers) and reports it with NOTIFYs.
//!
//! Needs `baresip` and `sox`: the test fails without them when `CI` is set and otherwise skips
//! with a notice.

mod common;
mod sipp;

use common::*;
use futures_util::StreamExt as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const TONE_HZ: f64 = 440.0;

fn tools_available() -> bool {
    let has = |tool: &str, arg: &str| {
        std::process::Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let missing: Vec<&str> = [("baresip", "-h"), ("sox", "--version")]
        .into_iter()
        .filter(|(t, a)| !has(t, a))
        .map(|(t, _)| t)
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{missing:?} not installed (apt-get install baresip sox); the baresip test needs them in CI"
        );
    }
    // Straight to stderr: the test harness captures eprintln!, and the notice must show.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: {missing:?} not installed; skipping the baresip test"
    );
    false
}

/// Goertzel magnitude of `freq` in `samples` (8 kHz), normalised by length.
fn tone_level(samples: &[i16], freq: f64) -> f64 {
    let k = 2.0 * (2.0 * std::f64::consts::PI * freq / 8000.0).cos();
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for &s in samples {
        (a, b) = (f64::from(s) + k * a - b, a);
    }
    (a * a + b * b - k * a * b).sqrt() / samples.len() as f64
}

/// Samples of a 16-bit mono WAV file (the data chunk, found by its tag).
fn wav_samples(path: &Path) -> Vec<i16> {
    let bytes = std::fs::read(path).unwrap();
    let data = bytes
        .windows(4)
        .position(|w| w == b"data")
        .expect("a data chunk");
    samples(&bytes[data + 8..])
}

fn write_config(dir: &Path, rtp_low: u16) {
    let tone = dir.join("tone.wav");
    let rec = dir.join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let status = std::process::Command::new("sox")
        .args(["-n", "-r", "8000", "-c", "1", "-b", "16"])
        .arg(&tone)
        .args(["synth", "3", "sine", "440", "vol", "0.5"])
        .status()
        .expect("sox runs");
    assert!(status.success(), "sox made the tone");
    // No sound card: audio comes from the WAV (aufile) and what baresip hears is recorded by
    // the sndfile filter; the player is a bridge that goes nowhere.
    let config = format!(
        "poll_method epoll\n\
         sip_listen 127.0.0.1:0\n\
         net_interface 127.0.0.1\n\
         audio_player aubridge,none\n\
         audio_alert aubridge,none\n\
         audio_source aufile,{tone}\n\
         rtp_ports {rtp_low}-{rtp_high}\n\
         module_path /usr/lib/baresip/modules\n\
         module g711.so\n\
         module aufile.so\n\
         module aubridge.so\n\
         module sndfile.so\n\
         module menu.so\n\
         module_app account.so\n\
         snd_path {rec}\n",
        tone = tone.display(),
        rec = rec.display(),
        rtp_high = rtp_low + 99,
    );
    std::fs::write(dir.join("config"), config).unwrap();
    std::fs::write(
        dir.join("accounts"),
        "<sip:baresip@127.0.0.1>;regint=0;audio_codecs=PCMU\n",
    )
    .unwrap();
}

#[tokio::test]
async fn baresip_hears_its_tone_back_through_an_echo_agent() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(20);
    let server = start(sipp::sip_config(ports)).await;
    let sip = server.sip_addr().unwrap();
    let dir = sipp::work_dir("baresip");
    // baresip's own RTP ports, apart from every SIPp media port.
    write_config(&dir, 29000);
    let config = telcoflow::TelcoflowClientConfig::builder()
        .api_key(
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        )
        .base_url(server.base_url())
        .sample_rate(telcoflow::SampleRate::Hz16000)
        .build()
        .expect("SDK config");
    let client = telcoflow::TelcoflowClient::connect(config)
        .await
        .expect("the agent connects");
    let echoed = Arc::new(AtomicUsize::new(0));
    let agent = {
        let client = client.clone();
        let echoed = echoed.clone();
        tokio::spawn(async move {
            client
                .serve(move |call: telcoflow::ActiveCall| {
                    let echoed = echoed.clone();
                    async move {
                        if call.answer().await.is_err() {
                            return;
                        }
                        let mut audio = call.audio_stream(telcoflow::AudioChannel::Mixed);
                        while let Some(chunk) = audio.next().await {
                            match call.send_audio(&chunk).await {
                                Ok(()) => {
                                    echoed.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) if e.is_buffer_full() => {}
                                Err(_) => break,
                            }
                        }
                    }
                })
                .await
        })
    };

    // baresip hangs up when the 3 s tone ends; -t stops the process soon after.
    let phone = tokio::process::Command::new("baresip")
        .arg("-f")
        .arg(&dir)
        .args(["-e", &format!("/dial sip:+15559990001@{sip}"), "-t", "6"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("baresip starts");

    let out = tokio::time::timeout(Duration::from_secs(20), phone.wait_with_output())
        .await
        .expect("baresip exits")
        .expect("baresip output");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("Call established"),
        "baresip never got through:\n{log}"
    );
    let recording = std::fs::read_dir(dir.join("rec"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .unwrap_or_else(|| panic!("baresip recorded what it heard:\n{log}"));
    let heard = wav_samples(&recording);
    // The second second: past the echo's start-up delay, before the hang-up.
    assert!(heard.len() >= 16000, "recording too short: {}", heard.len());
    let window = &heard[8000..16000];
    let tone = tone_level(window, TONE_HZ);
    let other = tone_level(window, 1000.0);
    assert!(
        tone > 1000.0 && tone > 20.0 * other,
        "the recording does not hold the tone: 440 Hz level {tone:.0}, 1 kHz level {other:.0}"
    );
    let echoed = echoed.load(Ordering::Relaxed);
    assert!(echoed > 50, "the agent echoed only {echoed} chunks");
    client.shutdown().await;
    let _ = agent.await;
    server.shutdown().await;
}

/// baresip (which offers telephone-event) hears the digits an agent sends as RFC 4733 events:
/// its log names each DTMF event it receives.
#[tokio::test]
async fn baresip_receives_the_digits_an_agent_sends() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(40);
    let server = start(sipp::sip_config(ports)).await;
    let sip = server.sip_addr().unwrap();
    let dir = sipp::work_dir("baresip-dtmf");
    write_config(&dir, 29200);
    let config = telcoflow::TelcoflowClientConfig::builder()
        .api_key(
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        )
        .base_url(server.base_url())
        .build()
        .expect("SDK config");
    let client = telcoflow::TelcoflowClient::connect(config)
        .await
        .expect("the agent connects");
    let sent = Arc::new(AtomicUsize::new(0));
    let agent = {
        let client = client.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            client
                .serve(move |call: telcoflow::ActiveCall| {
                    let sent = sent.clone();
                    async move {
                        if call.answer().await.is_err() {
                            return;
                        }
                        if call
                            .send_dtmf("12#", Duration::from_millis(100))
                            .await
                            .is_ok()
                        {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        call.terminated().await;
                    }
                })
                .await
        })
    };
    let phone = tokio::process::Command::new("baresip")
        .arg("-v")
        .arg("-f")
        .arg(&dir)
        .args(["-e", &format!("/dial sip:+15559990001@{sip}"), "-t", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("baresip starts");
    let out = tokio::time::timeout(Duration::from_secs(20), phone.wait_with_output())
        .await
        .expect("baresip exits")
        .expect("baresip output");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.contains("Call established"),
        "baresip never got through:\n{log}"
    );
    assert_eq!(sent.load(Ordering::Relaxed), 1, "send_dtmf answered");
    // baresip logs each event's start and its end (once, though three end packets came).
    let events: Vec<&str> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("received event: "))
        .collect();
    assert_eq!(
        events,
        [
            "'1' (end=0)",
            "'1' (end=1)",
            "'2' (end=0)",
            "'2' (end=1)",
            "'#' (end=0)",
            "'#' (end=1)"
        ],
        "baresip's log:\n{log}"
    );
    client.shutdown().await;
    let _ = agent.await;
    server.shutdown().await;
}

/// The agent transfers baresip's call to another number of this server: baresip takes the
/// REFER, calls that number itself (the agent answers it), reports the call with NOTIFYs and
/// gets our BYE. The agent sees the progress and a transfer by REFER that succeeded.
#[tokio::test]
async fn baresip_takes_the_refer_and_calls_the_transfer_target() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(58);
    let mut server_config = sipp::sip_config(ports);
    server_config.connectors[0].transfer_targets = vec!["sip:+15559990002@*".into()];
    let server = start(server_config).await;
    let sip = server.sip_addr().unwrap();
    let target = format!("sip:+15559990002@{sip}");
    let dir = sipp::work_dir("baresip-transfer");
    write_config(&dir, 29400);
    let config = telcoflow::TelcoflowClientConfig::builder()
        .api_key(
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        )
        .base_url(server.base_url())
        .build()
        .expect("SDK config");
    let client = telcoflow::TelcoflowClient::connect(config)
        .await
        .expect("the agent connects");
    let (results, mut outcomes) = tokio::sync::mpsc::channel(4);
    let agent = {
        let client = client.clone();
        let target = target.clone();
        tokio::spawn(async move {
            client
                .serve(move |call: telcoflow::ActiveCall| {
                    let (results, target) = (results.clone(), target.clone());
                    async move {
                        if call.answer().await.is_err() {
                            return;
                        }
                        if call.callee() == "+15559990002" {
                            // The transferred caller arrives.
                            let _ = results.send(Err(call.clone())).await;
                            call.terminated().await;
                            return;
                        }
                        let mut events = call.events();
                        let outcome = call.transfer(&target).await;
                        let mut progress = Vec::new();
                        while let Some(ev) = events.next().await {
                            if let telcoflow::CallEvent::TransferProgress { status, .. } = ev {
                                progress.push(status);
                            }
                        }
                        let _ = results.send(Ok((outcome, progress))).await;
                    }
                })
                .await
        })
    };
    let mut phone = tokio::process::Command::new("baresip")
        .arg("-v")
        .arg("-f")
        .arg(&dir)
        .args(["-e", &format!("/dial sip:+15559990001@{sip}"), "-t", "15"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("baresip starts");
    // The transfer's outcome and the target's call, whichever comes first.
    let received = tokio::time::timeout(Duration::from_secs(15), async {
        let (mut arrived, mut transfer) = (None, None);
        while arrived.is_none() || transfer.is_none() {
            match outcomes.recv().await {
                Some(Err(call)) => arrived = Some(call),
                Some(Ok(result)) => transfer = Some(result),
                None => break,
            }
        }
        (arrived, transfer)
    })
    .await;
    // The agent hangs up the target's call while baresip can still answer the BYE.
    if let Ok((Some(target_call), _)) = &received {
        let _ = target_call.disconnect().await;
    }
    client.shutdown().await;
    let _ = agent.await;
    server.shutdown().await;
    let _ = phone.start_kill();
    let out = phone.wait_with_output().await.expect("baresip output");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let Ok((arrived, Some(transfer))) = received else {
        panic!("no transfer outcome in time; baresip's log:\n{log}");
    };
    assert!(
        log.contains("transferring call") && log.contains("Call established: sip:+15559990002@"),
        "baresip took the REFER and reached the target:\n{log}"
    );
    let arrived = arrived.map(|call| call.caller().to_owned());
    assert_eq!(arrived.as_deref(), Some("baresip"), "the target's caller");
    let (outcome, progress) = transfer;
    let outcome = outcome.unwrap_or_else(|e| panic!("transfer failed: {e}; baresip's log:\n{log}"));
    assert_eq!(outcome.method, telcoflow::TransferMethod::Refer);
    assert_eq!(outcome.status, Some(200));
    assert_eq!(outcome.target, target);
    assert_eq!(progress.first(), Some(&100), "{progress:?}");
    assert_eq!(progress.last(), Some(&200), "{progress:?}");
}
