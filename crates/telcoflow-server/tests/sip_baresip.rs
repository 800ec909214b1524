//! baresip, a real softphone, calls in and plays a 440 Hz tone (made with sox); an echo agent
//! written with the Rust SDK (16 kHz) answers and plays back what it hears; baresip's recording
//! of what it heard must hold the tone.
//!
//! A second test: an agent sends DTMF and baresip receives the RFC 4733 events.
//!
//! A third: an agent transfers baresip's call; baresip takes the REFER, calls the target (a
//! number of this same server, whose call the agent answers) and reports it with NOTIFYs.
//!
//! Over TLS (`[sip] tls_listen`, certificates from a CA made at test time): baresip calls in
//! over TLS and hears its tone back, and hangs up with a BYE over TLS; the server dials
//! baresip listening on TLS, checking its certificate against `tls_ca`, and refuses a
//! certificate from another CA with a clear error.
//!
//! Needs `baresip` and `sox`: the test fails without them when `CI` is set and otherwise skips
//! with a notice.

mod common;
mod sipp;
mod tls_pki;

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

/// Appends TLS settings to baresip's config written by [`write_config`]: the CA it trusts
/// (`sip_cafile`), and its own certificate (`sip_certificate`) when it listens on TLS. The
/// account says TLS too.
fn add_tls_config(dir: &Path, ca: &Path, certificate: Option<&Path>, account: &str) {
    let mut config = std::fs::read_to_string(dir.join("config")).unwrap();
    config.push_str(&format!("sip_cafile {}\n", ca.display()));
    if let Some(cert) = certificate {
        config.push_str(&format!("sip_certificate {}\n", cert.display()));
    }
    std::fs::write(dir.join("config"), config).unwrap();
    std::fs::write(dir.join("accounts"), format!("{account}\n")).unwrap();
}

/// A server with SIP over TLS on a free port (certificate for 127.0.0.1 and localhost from
/// `pki`), checking the peers it dials against `trusted` (a CA file).
fn tls_server_config(
    ports: sipp::Ports,
    pki: &tls_pki::Pki,
    dir: &Path,
    trusted: &Path,
) -> telcoflow_server::Config {
    let mut config = sipp::sip_config(ports);
    let issued = pki.issue(dir, "server", &["127.0.0.1", "localhost"]);
    let sip = config.sip.as_mut().unwrap();
    sip.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    sip.tls_cert = Some(issued.cert);
    sip.tls_key = Some(issued.key);
    sip.tls_ca = Some(trusted.to_path_buf());
    config
}

/// baresip calls `sip:...;transport=tls` on the TLS listener and plays its tone; the echo
/// agent answers; baresip hears the tone back, and its BYE (over the TLS connection) ends
/// the call for the agent while baresip still runs.
#[tokio::test]
async fn baresip_calls_in_over_tls_and_hears_its_tone_back() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(74);
    let dir = sipp::work_dir("baresip-tls-in");
    let pki = tls_pki::Pki::new();
    let ca = pki.write_ca(&dir, "ca.pem");
    let server = start(tls_server_config(ports, &pki, &dir, &ca)).await;
    let tls = server.sip_tls_addr().expect("a TLS listener");
    write_config(&dir, 29100);
    add_tls_config(
        &dir,
        &ca,
        None,
        "<sip:baresip@127.0.0.1;transport=tls>;regint=0;audio_codecs=PCMU",
    );
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
    let echoed = Arc::new(AtomicUsize::new(0));
    let (ended_tx, mut ended) = tokio::sync::mpsc::channel(1);
    let agent = {
        let client = client.clone();
        let echoed = echoed.clone();
        tokio::spawn(async move {
            client
                .serve(move |call: telcoflow::ActiveCall| {
                    let (echoed, ended_tx) = (echoed.clone(), ended_tx.clone());
                    async move {
                        let mut events = call.events();
                        if call.answer().await.is_err() {
                            return;
                        }
                        let echo = {
                            let call = call.clone();
                            async move {
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
                        };
                        let end = async {
                            while let Some(ev) = events.next().await {
                                if let telcoflow::CallEvent::Terminated { reason } = ev {
                                    return reason;
                                }
                            }
                            None
                        };
                        let (_, reason) = tokio::join!(echo, end);
                        let _ = ended_tx.send(reason).await;
                    }
                })
                .await
        })
    };
    // baresip hangs up when the 3 s tone ends, and stays up until -t ends it: a call still
    // up then would mean its BYE never arrived.
    let phone = tokio::process::Command::new("baresip")
        .arg("-f")
        .arg(&dir)
        .args([
            "-e",
            &format!("/dial sip:+15559990001@{tls};transport=tls"),
            "-t",
            "8",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("baresip starts");
    let reason = tokio::time::timeout(Duration::from_secs(7), ended.recv()).await;
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
        "baresip never got through over TLS:\n{log}"
    );
    let reason = reason
        .unwrap_or_else(|_| panic!("the call did not end while baresip ran:\n{log}"))
        .expect("the agent saw the end");
    assert_eq!(reason.as_deref(), Some("caller"), "{log}");
    let recording = std::fs::read_dir(dir.join("rec"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .unwrap_or_else(|| panic!("baresip recorded what it heard:\n{log}"));
    let heard = wav_samples(&recording);
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

/// Runs baresip listening on TLS at `127.0.0.1:<sip_port + 1>` (baresip puts TLS one above
/// its `sip_listen` port) with a certificate from `pki`, answering calls at once; returns once
/// it takes TCP connections there (bounded), with the process.
async fn baresip_on_tls(
    dir: &Path,
    pki: &tls_pki::Pki,
    sip_port: u16,
    rtp_low: u16,
    seconds: &str,
) -> tokio::process::Child {
    write_config(dir, rtp_low);
    let config = std::fs::read_to_string(dir.join("config"))
        .unwrap()
        .replace(
            "sip_listen 127.0.0.1:0",
            &format!("sip_listen 127.0.0.1:{sip_port}"),
        );
    std::fs::write(dir.join("config"), config).unwrap();
    let issued = pki.issue(dir, "phone", &["localhost", "127.0.0.1"]);
    let ca = pki.write_ca(dir, "phone-ca.pem");
    add_tls_config(
        dir,
        &ca,
        Some(&issued.both),
        "<sip:baresip@127.0.0.1>;regint=0;answermode=auto;audio_codecs=PCMU",
    );
    let phone = tokio::process::Command::new("baresip")
        .arg("-f")
        .arg(dir)
        .args(["-t", seconds])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("baresip starts");
    sipp::wait_tcp(sip_port + 1).await;
    phone
}

async fn output(phone: tokio::process::Child) -> String {
    let out = tokio::time::timeout(Duration::from_secs(20), phone.wait_with_output())
        .await
        .expect("baresip exits")
        .expect("baresip output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The server dials `sips:` baresip (TLS, its certificate from the CA in `tls_ca`, for its
/// address 127.0.0.1): baresip answers, its tone reaches the agent and comes back to it, and
/// our BYE ends the call.
#[tokio::test]
async fn the_server_dials_a_tls_phone_whose_certificate_it_trusts() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(75);
    let dir = sipp::work_dir("baresip-tls-out");
    let pki = tls_pki::Pki::new();
    let ca = pki.write_ca(&dir, "ca.pem");
    let server = start(tls_server_config(ports, &pki, &dir, &ca)).await;
    let phone_sip = ports.sipp_sip;
    let phone = baresip_on_tls(&dir, &pki, phone_sip, 29300, "8").await;
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
    let uri = format!("sips:baresip@127.0.0.1:{}", phone_sip + 1);
    let call = client.create_session(&uri).await.expect("session.create");
    let answered = call.answer().await;
    // baresip's tone reaches the agent, which sends it back: baresip's recording holds it.
    let mut loudest = 0i32;
    if answered.is_ok() {
        let mut audio = call.audio_stream(telcoflow::AudioChannel::Mixed);
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while let Some(chunk) = audio.next().await {
                let peak = samples(&chunk).iter().map(|s| i32::from(*s).abs()).max();
                loudest = loudest.max(peak.unwrap_or(0));
                let _ = call.send_audio(&chunk).await;
            }
        })
        .await;
        let _ = call.disconnect().await;
    }
    client.shutdown().await;
    let log = output(phone).await;
    answered.unwrap_or_else(|e| panic!("baresip did not answer over TLS: {e}\n{log}"));
    assert!(
        loudest > 2000,
        "the agent heard only silence (peak {loudest}):\n{log}"
    );
    assert!(log.contains("Call established"), "baresip's log:\n{log}");
    let recording = std::fs::read_dir(dir.join("rec"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .unwrap_or_else(|| panic!("baresip recorded what it heard:\n{log}"));
    let heard = wav_samples(&recording);
    assert!(heard.len() >= 16000, "recording too short: {}", heard.len());
    let window = &heard[8000..16000];
    let (tone, other) = (tone_level(window, TONE_HZ), tone_level(window, 1000.0));
    assert!(
        tone > 1000.0 && tone > 20.0 * other,
        "baresip did not hear its tone back: 440 Hz level {tone:.0}, 1 kHz level {other:.0}"
    );
    server.shutdown().await;
}

/// The same TLS phone, but the server trusts another CA: `call.connect` to it fails at once
/// with an error that names the certificate check, and baresip never gets an INVITE.
#[tokio::test]
async fn call_connect_to_a_tls_phone_whose_certificate_is_not_trusted_fails_clearly() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(76);
    let dir = sipp::work_dir("baresip-tls-untrusted");
    let pki = tls_pki::Pki::new();
    let other_ca = tls_pki::Pki::new().write_ca(&dir, "other-ca.pem");
    let mut config = tls_server_config(ports, &pki, &dir, &other_ca);
    let phone_sip = ports.sipp_sip;
    config.connectors[0].connect.insert(
        "+15559990001".into(),
        format!("sip:baresip@127.0.0.1:{};transport=tls", phone_sip + 1),
    );
    let phone = baresip_on_tls(&dir, &pki, phone_sip, 29700, "3").await;
    let (server, _control, _caller, mut media) = answered_call(config, 8000).await;
    let started = std::time::Instant::now();
    let resp = media
        .command(
            "call.connect",
            Some(serde_json::json!({"ringTimeSeconds": 10})),
        )
        .await;
    let waited = started.elapsed();
    assert_eq!(resp["success"], false, "{resp}");
    let text = resp.to_string();
    assert!(
        text.contains("TLS handshake") && text.contains("certificate"),
        "{resp}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "failed at once, not by a SIP timeout: {waited:?}"
    );
    let log = output(phone).await;
    assert!(!log.contains("Incoming call"), "baresip's log:\n{log}");
    server.shutdown().await;
}
