//! G.722 wideband on SIP legs, end to end with baresip (its `g722` module, spandsp's codec) as
//! the phone. baresip plays a 5 kHz tone (sox-made, 16 kHz): above the 4 kHz a G.711 leg can
//! carry, so it reaches the agent only over a 16 kHz leg. An agent on 16 kHz audio with the
//! Rust SDK checks that it hears the tone and echoes what it hears; baresip's recording of the
//! call must hold the tone too, and the call's figures name the codec.
//!
//! - baresip calls in offering only G.722 (the default `codecs` answer it).
//! - baresip calls in offering PCMU first and G.722 second, to a server whose `codecs` list
//!   G722 first: the server prefers G.722.
//! - The server dials baresip (`session.create` to a `sip:` URI), offering its default list
//!   (PCMU, PCMA, G722); baresip, taking only G.722, answers with it.
//!
//! Needs `baresip` (with its g722 module) and `sox`: the tests fail without them when `CI` is
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

/// Above 4 kHz: only wideband carries it.
const TONE_HZ: f64 = 5000.0;
const RATE: f64 = 16000.0;
const G722_MODULE: &str = "/usr/lib/baresip/modules/g722.so";

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
    if !Path::new(G722_MODULE).exists() {
        missing.push(G722_MODULE);
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{missing:?} not installed (apt-get install baresip sox); the G.722 tests need them in CI"
        );
    }
    // Straight to stderr: the test harness captures eprintln!, and the notice must show.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: {missing:?} not installed; skipping the G.722 tests"
    );
    false
}

/// Goertzel magnitude of `freq` in 16 kHz `samples`, normalised by length.
fn tone_level(samples: &[i16], freq: f64) -> f64 {
    let k = 2.0 * (2.0 * std::f64::consts::PI * freq / RATE).cos();
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for &s in samples {
        (a, b) = (f64::from(s) + k * a - b, a);
    }
    (a * a + b * b - k * a * b).sqrt() / samples.len() as f64
}

/// Whether `samples` hold the tone clearly: strong, and far above a frequency nearby.
fn holds_tone(samples: &[i16]) -> Result<(), String> {
    let tone = tone_level(samples, TONE_HZ);
    let other = tone_level(samples, 3000.0);
    if tone > 1000.0 && tone > 20.0 * other {
        Ok(())
    } else {
        Err(format!(
            "5 kHz level {tone:.0}, 3 kHz level {other:.0} in {} samples",
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

/// baresip's config: the tone as its microphone, what it hears recorded, only `codecs`
/// offered and taken (baresip names them with their audio rate: `G722/16000/1`), incoming
/// calls answered at once; SIP on `sip_port` (0: any).
fn write_config(dir: &Path, rtp_low: u16, sip_port: u16, codecs: &str) {
    let tone = dir.join("tone.wav");
    let rec = dir.join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let status = std::process::Command::new("sox")
        .args(["-n", "-r", "16000", "-c", "1", "-b", "16"])
        .arg(&tone)
        .args(["synth", "4", "sine", "5000", "vol", "0.5"])
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
         module g722.so\n\
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
        format!("<sip:baresip@127.0.0.1>;regint=0;answermode=auto;audio_codecs={codecs}\n"),
    )
    .unwrap();
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
/// call's figures name a codec, puts the first leg's in `codec`.
async fn echo(
    server_http: String,
    call: telcoflow::ActiveCall,
    heard: Arc<Mutex<Vec<i16>>>,
    codec: Arc<Mutex<Option<String>>>,
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
        // Once a second, until the codec shows.
        if chunks % 50 == 10 && codec.lock().unwrap().is_none() {
            let (status, figures) = http_at(&server_http, "GET", &stats).await;
            if status == 200 {
                if let Some(c) = figures["legs"][0]["codec"].as_str() {
                    *codec.lock().unwrap() = Some(c.to_owned());
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

/// What baresip heard: its recording of the call's decoded audio.
fn baresip_heard(dir: &Path, log: &str) -> (Vec<i16>, u32) {
    let recording = std::fs::read_dir(dir.join("rec"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .unwrap_or_else(|| panic!("baresip recorded what it heard:\n{log}"));
    wav(&recording)
}

/// The checks every test makes once the call is over: baresip got through, the agent heard
/// the 5 kHz tone, baresip heard it back at 16 kHz, and the call's figures say G722.
fn check_wideband(dir: &Path, log: &str, heard: &Mutex<Vec<i16>>, codec: &Mutex<Option<String>>) {
    assert!(
        log.contains("Call established"),
        "baresip never got through:\n{log}"
    );
    let heard = heard.lock().unwrap();
    // The second second: past the start, before the hang-up.
    assert!(
        heard.len() >= 32_000,
        "the agent heard only {} samples",
        heard.len()
    );
    if let Err(e) = holds_tone(&heard[16_000..32_000]) {
        panic!("the agent did not hear the 5 kHz tone: {e}\n{log}");
    }
    let (echoed, rate) = baresip_heard(dir, log);
    assert_eq!(rate, 16000, "baresip decoded at 16 kHz (G.722)");
    assert!(
        echoed.len() >= 32_000,
        "recording too short: {}",
        echoed.len()
    );
    if let Err(e) = holds_tone(&echoed[16_000..32_000]) {
        panic!("baresip did not hear the 5 kHz tone back: {e}");
    }
    assert_eq!(
        codec.lock().unwrap().as_deref(),
        Some("G722"),
        "the call's figures name the codec"
    );
}

/// baresip calls in offering `offered`; the server runs with `codecs`.
async fn call_in(index: u16, baresip_rtp: u16, offered: &str, codecs: Option<Vec<&str>>) {
    let ports = sipp::ports(index);
    let mut config = sipp::sip_config(ports);
    if let (Some(sip), Some(codecs)) = (config.sip.as_mut(), codecs) {
        sip.codecs = codecs.into_iter().map(str::to_owned).collect();
    }
    let server = start(config).await;
    let sip = server.sip_addr().unwrap();
    let dir = sipp::work_dir(&format!("g722-in-{index}"));
    write_config(&dir, baresip_rtp, 0, offered);
    let client = agent_client(&server).await;
    let heard = Arc::new(Mutex::new(Vec::new()));
    let codec = Arc::new(Mutex::new(None));
    let agent = {
        let (client, heard, codec) = (client.clone(), heard.clone(), codec.clone());
        let http = server.local_addr().to_string();
        tokio::spawn(async move {
            client
                .serve(move |call: telcoflow::ActiveCall| {
                    let (heard, codec, http) = (heard.clone(), codec.clone(), http.clone());
                    async move {
                        if call.answer().await.is_ok() {
                            echo(http, call, heard, codec).await;
                        }
                    }
                })
                .await
        })
    };
    // baresip hangs up when the 4 s tone ends; -t stops the process soon after.
    let dial = format!("/dial sip:+15559990001@{sip}");
    let log = run_baresip(&dir, &["-e", &dial, "-t", "7"]).await;
    check_wideband(&dir, &log, &heard, &codec);
    client.shutdown().await;
    let _ = agent.await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_g722_caller_gets_g722_at_16_khz() {
    if !tools_available() {
        return;
    }
    call_in(45, 29500, "G722/16000/1", None).await;
}

#[tokio::test]
async fn a_server_that_prefers_g722_answers_with_it() {
    if !tools_available() {
        return;
    }
    call_in(
        46,
        29600,
        "PCMU/8000/1,G722/16000/1",
        Some(vec!["G722", "PCMU", "PCMA"]),
    )
    .await;
}

/// The server dials baresip (`session.create` with a `sip:` URI), offering PCMU, PCMA and
/// G722; baresip takes only G.722 and answers at once.
#[tokio::test]
async fn a_call_the_server_places_to_a_g722_phone_is_wideband() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(47);
    let server = start(sipp::sip_config(ports)).await;
    let dir = sipp::work_dir("g722-out");
    // baresip's SIP port, apart from SIPp's (25060 + index * 10) and every RTP range.
    let phone_sip = 29990;
    write_config(&dir, 29800, phone_sip, "G722/16000/1");
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
    let codec = Arc::new(Mutex::new(None));
    let http = server.local_addr().to_string();
    // The tone lasts 4 s; baresip stays on the call until its -t ends it.
    let _ = tokio::time::timeout(
        Duration::from_secs(6),
        echo(http, call.clone(), heard.clone(), codec.clone()),
    )
    .await;
    let _ = call.disconnect().await;
    let log = phone.await.unwrap();
    check_wideband(&dir, &log, &heard, &codec);
    client.shutdown().await;
    server.shutdown().await;
}
