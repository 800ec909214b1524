//! SRTP with SDES keys on SIP legs, end to end with baresip (its `srtp` module, libre's SRTP)
//! as the phone. baresip plays a 1 kHz tone (sox-made) over PCMU; an agent on the Rust SDK
//! checks that it hears the tone and echoes what it hears; baresip's recording of the call must
//! hold the tone too, so both directions were encrypted and decrypted right. The call's
//! figures name the SRTP suite.
//!
//! - baresip calls in with SRTP mandatory (`mediaenc=srtp-mand`: `RTP/SAVP` and `a=crypto`)
//!   to a server whose `[sip] srtp` is `required`.
//! - baresip calls in with best-effort SRTP (`mediaenc=srtp`: `RTP/AVP` and `a=crypto`) to a
//!   server whose `[sip] srtp` is `optional`.
//! - The server (SRTP required) dials baresip (`session.create` to a `sip:` URI).
//! - A plain-RTP caller is refused with `488` by a server that requires SRTP, and the agent
//!   never hears of the call.
//!
//! Needs `baresip` (with its srtp module) and `sox`: the tests fail without them when `CI` is
//! set and otherwise skip with a notice.

mod common;
mod sipp;

use common::*;
use futures_util::StreamExt as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telcoflow_server::RunningServer;

const TONE_HZ: f64 = 1000.0;
const SRTP_MODULE: &str = "/usr/lib/baresip/modules/srtp.so";
const SUITES: [&str; 2] = ["AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32"];

fn tools_available() -> bool {
    let has = |tool: &str, arg: &str| {
        std::process::Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let mut missing: Vec<&str> = [("baresip", "-h"), ("sox", "--version")]
        .into_iter()
        .filter(|(t, a)| !has(t, a))
        .map(|(t, _)| t)
        .collect();
    if !Path::new(SRTP_MODULE).exists() {
        missing.push(SRTP_MODULE);
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{missing:?} not installed (apt-get install baresip sox); the SRTP tests need them in CI"
        );
    }
    // Straight to stderr: the test harness captures eprintln!, and the notice must show.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: {missing:?} not installed; skipping the SRTP tests"
    );
    false
}

/// Goertzel magnitude of `freq` in `samples` at `rate`, normalised by length.
fn tone_level(samples: &[i16], freq: f64, rate: f64) -> f64 {
    let k = 2.0 * (2.0 * std::f64::consts::PI * freq / rate).cos();
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for &s in samples {
        (a, b) = (f64::from(s) + k * a - b, a);
    }
    (a * a + b * b - k * a * b).sqrt() / samples.len() as f64
}

/// Whether `samples` (at `rate`) hold the tone clearly: strong, and far above a frequency
/// nearby. Audio decrypted with a wrong key is noise and fails this.
fn holds_tone(samples: &[i16], rate: f64) -> Result<(), String> {
    let tone = tone_level(samples, TONE_HZ, rate);
    let other = tone_level(samples, 2500.0, rate);
    if tone > 1000.0 && tone > 20.0 * other {
        Ok(())
    } else {
        Err(format!(
            "1 kHz level {tone:.0}, 2.5 kHz level {other:.0} in {} samples",
            samples.len()
        ))
    }
}

/// Samples of a 16-bit mono WAV file, and its sample rate.
fn wav(path: &Path) -> (Vec<i16>, u32) {
    let bytes = std::fs::read(path).unwrap();
    let rate = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
    let data = bytes
        .windows(4)
        .position(|w| w == b"data")
        .expect("a data chunk");
    (samples(&bytes[data + 8..]), rate)
}

/// baresip's config: the tone as its microphone, what it hears recorded, PCMU, SRTP as
/// `mediaenc` says (`None`: plain RTP), incoming calls answered at once; SIP on `sip_port`
/// (0: any).
fn write_config(dir: &Path, rtp_low: u16, sip_port: u16, mediaenc: Option<&str>) {
    let tone = dir.join("tone.wav");
    let rec = dir.join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let status = std::process::Command::new("sox")
        .args(["-n", "-r", "8000", "-c", "1", "-b", "16"])
        .arg(&tone)
        .args(["synth", "4", "sine", "1000", "vol", "0.5"])
        .status()
        .expect("sox runs");
    assert!(status.success(), "sox made the tone");
    let config = format!(
        "poll_method epoll\n\
         sip_listen 127.0.0.1:{sip_port}\n\
         net_interface 127.0.0.1\n\
         audio_player aubridge,none\n\
         audio_alert aubridge,none\n\
         audio_source aufile,{tone}\n\
         rtp_ports {rtp_low}-{rtp_high}\n\
         module_path /usr/lib/baresip/modules\n\
         module g711.so\n\
         module srtp.so\n\
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
    let mediaenc = mediaenc.map_or(String::new(), |m| format!(";mediaenc={m}"));
    std::fs::write(
        dir.join("accounts"),
        format!(
            "<sip:baresip@127.0.0.1>;regint=0;answermode=auto;audio_codecs=PCMU/8000/1{mediaenc}\n"
        ),
    )
    .unwrap();
}

/// A server on `ports` whose `[sip] srtp` is `srtp`.
async fn server_with_srtp(ports: sipp::Ports, srtp: &str) -> RunningServer {
    let mut config = sipp::sip_config(ports);
    config.sip.as_mut().unwrap().srtp = srtp.into();
    start(config).await
}

/// A Rust SDK agent at 16 kHz for the development connector.
async fn agent_client(server: &RunningServer) -> telcoflow::TelcoflowClient {
    let config = telcoflow::TelcoflowClientConfig::builder()
        .api_key(
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        )
        .base_url(server.base_url())
        .sample_rate(telcoflow::SampleRate::Hz16000)
        .build()
        .expect("SDK config");
    telcoflow::TelcoflowClient::connect(config)
        .await
        .expect("the agent connects")
}

/// Echoes what the call's caller says, keeping it in `heard` (16 kHz samples); once the
/// call's figures name an SRTP suite, puts the first leg's in `suite`.
async fn echo(
    server_http: String,
    call: telcoflow::ActiveCall,
    heard: Arc<Mutex<Vec<i16>>>,
    suite: Arc<Mutex<Option<String>>>,
) {
    let mut audio = call.audio_stream(telcoflow::AudioChannel::Mixed);
    let stats = format!("/public/v1/calls/{}/stats", call.id());
    let mut chunks = 0u32;
    while let Some(chunk) = audio.next().await {
        heard.lock().unwrap().extend(samples(&chunk));
        match call.send_audio(&chunk).await {
            Ok(()) => {}
            Err(e) if e.is_buffer_full() => {}
            Err(_) => break,
        }
        chunks += 1;
        // Once a second, until the suite shows.
        if chunks % 50 == 10 && suite.lock().unwrap().is_none() {
            let (status, figures) = http_at(&server_http, "GET", &stats).await;
            if status == 200 {
                if let Some(s) = figures["legs"][0]["srtp"].as_str() {
                    *suite.lock().unwrap() = Some(s.to_owned());
                }
            }
        }
    }
}

/// Runs baresip with `args` (bounded), returning its log.
async fn run_baresip(dir: &Path, args: &[&str]) -> String {
    let phone = tokio::process::Command::new("baresip")
        .arg("-f")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("baresip starts");
    let out = tokio::time::timeout(Duration::from_secs(25), phone.wait_with_output())
        .await
        .expect("baresip exits")
        .expect("baresip output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The checks once an encrypted call is over: baresip got through, the agent heard the
/// tone, baresip heard it back, and the call's figures name an SDES suite.
fn check_encrypted_audio(
    dir: &Path,
    log: &str,
    heard: &Mutex<Vec<i16>>,
    suite: &Mutex<Option<String>>,
) {
    assert!(
        log.contains("Call established"),
        "baresip never got through:\n{log}"
    );
    let heard = heard.lock().unwrap();
    assert!(
        heard.len() >= 32_000,
        "the agent heard only {} samples:\n{log}",
        heard.len()
    );
    // The second second: past the start, before the hang-up.
    if let Err(e) = holds_tone(&heard[16_000..32_000], 16000.0) {
        panic!("the agent did not hear the tone: {e}\n{log}");
    }
    let recording = std::fs::read_dir(dir.join("rec"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .unwrap_or_else(|| panic!("baresip recorded what it heard:\n{log}"));
    let (echoed, rate) = wav(&recording);
    let second = rate as usize;
    assert!(
        echoed.len() >= 2 * second,
        "recording too short: {}",
        echoed.len()
    );
    if let Err(e) = holds_tone(&echoed[second..2 * second], f64::from(rate)) {
        panic!("baresip did not hear the tone back: {e}\n{log}");
    }
    let suite = suite.lock().unwrap().clone();
    assert!(
        suite.as_deref().is_some_and(|s| SUITES.contains(&s)),
        "the call's figures name the SRTP suite, got {suite:?}"
    );
    // Which suite baresip's offer or answer led to, for the record.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SRTP suite: {}",
        suite.unwrap_or_default()
    );
}

/// Serves calls with [`echo`]; returns the agent task.
fn serve_echo(
    server: &RunningServer,
    client: &telcoflow::TelcoflowClient,
    heard: &Arc<Mutex<Vec<i16>>>,
    suite: &Arc<Mutex<Option<String>>>,
) -> tokio::task::JoinHandle<impl Send + 'static> {
    let (client, heard, suite) = (client.clone(), heard.clone(), suite.clone());
    let http = server.local_addr().to_string();
    tokio::spawn(async move {
        client
            .serve(move |call: telcoflow::ActiveCall| {
                let (heard, suite, http) = (heard.clone(), suite.clone(), http.clone());
                async move {
                    if call.answer().await.is_ok() {
                        echo(http, call, heard, suite).await;
                    }
                }
            })
            .await
    })
}

#[tokio::test]
async fn a_caller_with_mandatory_srtp_is_heard_and_hears_back() {
    if !tools_available() {
        return;
    }
    let server = server_with_srtp(sipp::ports(80), "required").await;
    let sip = server.sip_addr().unwrap();
    let dir = sipp::work_dir("srtp-in");
    write_config(&dir, 30100, 0, Some("srtp-mand"));
    let client = agent_client(&server).await;
    let heard = Arc::new(Mutex::new(Vec::new()));
    let suite = Arc::new(Mutex::new(None));
    let agent = serve_echo(&server, &client, &heard, &suite);
    // baresip hangs up when the 4 s tone ends; -t stops the process soon after.
    let dial = format!("/dial sip:+15559990001@{sip}");
    let log = run_baresip(&dir, &["-e", &dial, "-t", "7"]).await;
    check_encrypted_audio(&dir, &log, &heard, &suite);
    client.shutdown().await;
    let _ = agent.await;
    server.shutdown().await;
}

/// Best effort: baresip offers `RTP/AVP` with `a=crypto` (`mediaenc=srtp`) to a server whose
/// policy is `optional`; the call is encrypted all the same.
#[tokio::test]
async fn a_best_effort_caller_is_encrypted_when_srtp_is_optional() {
    if !tools_available() {
        return;
    }
    let server = server_with_srtp(sipp::ports(83), "optional").await;
    let sip = server.sip_addr().unwrap();
    let dir = sipp::work_dir("srtp-best-effort");
    write_config(&dir, 30700, 0, Some("srtp"));
    let client = agent_client(&server).await;
    let heard = Arc::new(Mutex::new(Vec::new()));
    let suite = Arc::new(Mutex::new(None));
    let agent = serve_echo(&server, &client, &heard, &suite);
    let dial = format!("/dial sip:+15559990001@{sip}");
    let log = run_baresip(&dir, &["-e", &dial, "-t", "7"]).await;
    check_encrypted_audio(&dir, &log, &heard, &suite);
    client.shutdown().await;
    let _ = agent.await;
    server.shutdown().await;
}

/// The server, requiring SRTP, dials baresip (`session.create` with a `sip:` URI): it offers
/// `RTP/SAVP` with both suites, baresip (SRTP mandatory) answers with one.
#[tokio::test]
async fn a_call_the_server_places_with_srtp_required_is_encrypted_both_ways() {
    if !tools_available() {
        return;
    }
    let server = server_with_srtp(sipp::ports(81), "required").await;
    let dir = sipp::work_dir("srtp-out");
    // baresip's SIP port, apart from SIPp's (25060 + index * 10) and every RTP range.
    let phone_sip = 30990;
    write_config(&dir, 30300, phone_sip, Some("srtp-mand"));
    let client = agent_client(&server).await;
    let phone = tokio::spawn({
        let dir = dir.clone();
        async move { run_baresip(&dir, &["-t", "8"]).await }
    });
    // Dial once baresip listens (bounded).
    let uri = format!("sip:baresip@127.0.0.1:{phone_sip}");
    let mut call = None;
    for _ in 0..50 {
        let listening = std::net::UdpSocket::bind(("127.0.0.1", phone_sip)).is_err();
        if listening {
            call = Some(client.create_session(&uri).await.expect("session.create"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let call = call.expect("baresip listens within 5 s");
    call.answer().await.expect("baresip answers");
    let heard = Arc::new(Mutex::new(Vec::new()));
    let suite = Arc::new(Mutex::new(None));
    let http = server.local_addr().to_string();
    // The tone lasts 4 s; baresip stays on the call until its -t ends it.
    let _ = tokio::time::timeout(
        Duration::from_secs(6),
        echo(http, call.clone(), heard.clone(), suite.clone()),
    )
    .await;
    let _ = call.disconnect().await;
    let log = phone.await.unwrap();
    check_encrypted_audio(&dir, &log, &heard, &suite);
    client.shutdown().await;
    server.shutdown().await;
}

/// A plain-RTP caller to a server that requires SRTP gets `488 Not Acceptable Here`; the
/// agent is never offered the call.
#[tokio::test]
async fn a_plain_caller_is_refused_with_488_when_srtp_is_required() {
    if !tools_available() {
        return;
    }
    let server = server_with_srtp(sipp::ports(82), "required").await;
    let sip = server.sip_addr().unwrap();
    let dir = sipp::work_dir("srtp-plain");
    write_config(&dir, 30500, 0, None);
    let client = agent_client(&server).await;
    let offered = Arc::new(Mutex::new(0u32));
    let agent = {
        let (client, offered) = (client.clone(), offered.clone());
        tokio::spawn(async move {
            client
                .serve(move |_call: telcoflow::ActiveCall| {
                    *offered.lock().unwrap() += 1;
                    async {}
                })
                .await
        })
    };
    let dial = format!("/dial sip:+15559990001@{sip}");
    let log = run_baresip(&dir, &["-e", &dial, "-t", "3"]).await;
    assert!(
        log.contains("488"),
        "baresip was not refused with 488:\n{log}"
    );
    assert!(!log.contains("Call established"), "{log}");
    assert_eq!(*offered.lock().unwrap(), 0, "the agent heard of the call");
    client.shutdown().await;
    let _ = agent.await;
    server.shutdown().await;
}
