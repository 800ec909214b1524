//! A carrier-like path with real parts: Kamailio (a SIP registrar and record-routing proxy)
//! between baresip (a softphone) and the server. Both register at Kamailio with digest
//! authentication; calls go through it in both directions:
//!
//! - baresip dials the number the server registered: Kamailio finds the server's binding and
//!   relays the INVITE with a Record-Route; an echo agent answers and baresip hears its tone
//!   back; baresip's BYE reaches the server through the proxy.
//! - an agent calls baresip's address of record through the server's registration
//!   (`session.create` to the registrar's host): Kamailio finds baresip's binding, baresip
//!   answers, hears the agent, and the agent's hang-up goes out as a BYE through the proxy.
//! - the first again over SIP over TLS on every hop (the server registering with
//!   `transport = "tls"`, Kamailio relaying to its TLS listener) and SRTP (SDES) between
//!   baresip and the server, which the server's registration requires.
//!
//! Needs `kamailio`, `baresip` and `sox`: the tests fail without them when `CI` is set and
//! otherwise skip with a notice.

mod common;
mod sipp;
mod tls_pki;

use common::*;
use futures_util::StreamExt as _;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telcoflow_server::RunningServer;
use telcoflow_server::config::SipRegistration;
use tokio::process::{Child, Command};

const TONE_HZ: f64 = 440.0;
/// The password Kamailio's challenge checks for every user.
const PASSWORD: &str = "s3cret";
/// The number the server registers (its AOR's user part) and the callers dial.
const SERVER_NUMBER: &str = "+15559990001";
const ADMIN: &str = "authorization: Bearer admin-secret\r\n";
/// How long a whole call through the proxy may take.
const CALL_WAIT: Duration = Duration::from_secs(20);

/// Kamailio from the PATH, or where Debian's package puts it (/usr/sbin, not on every PATH).
fn kamailio_bin() -> &'static str {
    let on_path = std::process::Command::new("kamailio")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if on_path {
        "kamailio"
    } else {
        "/usr/sbin/kamailio"
    }
}

fn tools_available() -> bool {
    let has = |tool: &str, arg: &str| {
        std::process::Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let missing: Vec<&str> = [
        (kamailio_bin(), "-v"),
        ("baresip", "-h"),
        ("sox", "--version"),
    ]
    .into_iter()
    .filter(|(t, a)| !has(t, a))
    .map(|(t, _)| t)
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{missing:?} not installed (apt-get install kamailio baresip sox); the Kamailio tests need them in CI"
        );
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: {missing:?} not installed; skipping the Kamailio test"
    );
    false
}

/// Kamailio as registrar and record-routing proxy on `127.0.0.1:port` (UDP and TCP). Every
/// REGISTER must answer a digest challenge with [`PASSWORD`]; other out-of-dialog requests
/// are relayed to the binding of their request URI's user (404 without one); in-dialog ones
/// follow their Route. Each request and each saved binding is logged, for the assertions.
struct Kamailio {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Kamailio {
    /// Kamailio on `port` (UDP and TCP) and, with a certificate, TLS on `port + 1`.
    async fn start(dir: &Path, port: u16, tls: Option<&tls_pki::Issued>) -> Self {
        let modules = [
            "/usr/lib/x86_64-linux-gnu/kamailio/modules",
            "/usr/lib/kamailio/modules",
        ]
        .into_iter()
        .find(|p| Path::new(p).join("tm.so").exists())
        .expect("Kamailio's modules");
        let tls_config = match tls {
            Some(issued) => {
                let tls_cfg = dir.join("tls.cfg");
                // Kamailio checks no peer's certificate here: the server's own checks are
                // what the tests look at.
                std::fs::write(
                    &tls_cfg,
                    format!(
                        "[server:default]\nmethod = TLSv1.2+\nverify_certificate = no\n\
                         require_certificate = no\nprivate_key = {}\ncertificate = {}\n\n\
                         [client:default]\nmethod = TLSv1.2+\nverify_certificate = no\n\
                         require_certificate = no\n",
                        issued.key.display(),
                        issued.cert.display()
                    ),
                )
                .unwrap();
                format!(
                    "enable_tls=yes\nlisten=tls:127.0.0.1:{}\nloadmodule \"{modules}/tls.so\"\n\
                     modparam(\"tls\", \"config\", \"{}\")\n",
                    port + 1,
                    tls_cfg.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            r#"#!KAMAILIO
debug=2
log_stderror=yes
children=2
tcp_children=2
auto_aliases=no
alias="127.0.0.1:{port}"
listen=udp:127.0.0.1:{port}
listen=tcp:127.0.0.1:{port}
loadpath "{modules}/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "auth.so"
loadmodule "kex.so"
loadmodule "corex.so"
modparam("usrloc", "db_mode", 0)
modparam("rr", "enable_full_lr", 1)
{tls_config}
request_route {{
    xlog("L_NOTICE", "TEST REQ $rm $ru FROM $si:$sp OVER $pr\n");
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{ t_relay(); exit; }}
        if (is_method("ACK")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
        sl_send_reply("404", "Not here");
        exit;
    }}
    if (is_method("CANCEL")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
    if (is_method("REGISTER")) {{
        if (!pv_www_authenticate("$td", "{PASSWORD}", "0")) {{
            www_challenge("$td", "0");
            exit;
        }}
        if (save("location")) {{ xlog("L_NOTICE", "TEST SAVED $tu\n"); }} else {{ sl_reply_error(); }}
        exit;
    }}
    if (is_method("OPTIONS") && $rU == $null) {{ sl_send_reply("200", "OK"); exit; }}
    record_route();
    if (!lookup("location")) {{ sl_send_reply("404", "Not Found"); exit; }}
    t_relay();
}}
"#
        );
        let cfg = dir.join("kamailio.cfg");
        std::fs::write(&cfg, config).unwrap();
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let log = dir.join("kamailio.log");
        let child = Command::new(kamailio_bin())
            .arg("-f")
            .arg(&cfg)
            // In the foreground, logging to stderr; its runtime files in the test's directory.
            .args(["-DD", "-E", "-m", "32", "-M", "4"])
            .arg("-Y")
            .arg(&run)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            // Its own process group: Kamailio forks workers, and all of them go with it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("kamailio starts");
        let kamailio = Self { child, log, port };
        kamailio.wait_ready().await;
        kamailio
    }

    /// Waits (bounded) until Kamailio answers an OPTIONS over UDP.
    async fn wait_ready(&self) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let mut buf = [0u8; 2048];
        for attempt in 0..100 {
            let options = format!(
                "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch=z9hG4bK-ready-{attempt}\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:probe@127.0.0.1>;tag=probe\r\n\
                 To: <sip:127.0.0.1:{port}>\r\n\
                 Call-ID: ready-{attempt}@test\r\n\
                 CSeq: 1 OPTIONS\r\n\
                 Content-Length: 0\r\n\r\n",
                port = self.port
            );
            socket
                .send_to(options.as_bytes(), ("127.0.0.1", self.port))
                .await
                .unwrap();
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf)).await
            {
                return;
            }
        }
        panic!("Kamailio never answered:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until Kamailio has saved a binding for `aor`.
    async fn wait_binding(&self, aor: &str) {
        let line = format!("TEST SAVED {aor}");
        for _ in 0..500 {
            if self.log_text().contains(&line) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no binding for {aor} at Kamailio:\n{}", self.log_text());
    }

    /// The requests Kamailio got, in order: method, source (`ip:port`) and transport
    /// (`udp`, `tcp`, `tls`).
    fn requests(&self) -> Vec<(String, String, String)> {
        self.log_text()
            .lines()
            .filter_map(|l| l.split_once("TEST REQ ").map(|(_, rest)| rest))
            .filter_map(|rest| {
                let (request, source) = rest.split_once(" FROM ")?;
                let (from, transport) = source.split_once(" OVER ")?;
                let method = request.split_whitespace().next()?;
                Some((
                    method.to_owned(),
                    from.to_owned(),
                    transport.trim().to_owned(),
                ))
            })
            .collect()
    }

    /// The methods of the requests Kamailio got from `from` (`ip:port`), in order.
    fn requests_from(&self, from: &str) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|(_, source, _)| source == from)
            .map(|(method, _, _)| method)
            .collect()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        // The whole group (the workers too), by kill(1): the workspace forbids unsafe code.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = self.child.start_kill();
    }
}

/// A server registered at Kamailio as [`SERVER_NUMBER`] with digest credentials, over UDP.
async fn server_registered_at(kamailio: &Kamailio, ports: sipp::Ports) -> RunningServer {
    let mut config = sipp::sip_config(ports);
    config.sip.as_mut().unwrap().registrations = vec![registration(kamailio.port, "udp")];
    start_registered(config, kamailio).await
}

/// The server's registration at Kamailio on `port` over `transport`.
fn registration(port: u16, transport: &str) -> SipRegistration {
    SipRegistration {
        registrar: format!("127.0.0.1:{port}"),
        aor: format!("sip:{SERVER_NUMBER}@127.0.0.1"),
        username: Some("server".into()),
        password: Some(PASSWORD.into()),
        expiry: 300,
        transport: transport.into(),
        outbound_proxy: None,
        srtp: None,
    }
}

/// Starts the server and waits (bounded) until its registration is in place at Kamailio.
async fn start_registered(
    mut config: telcoflow_server::Config,
    kamailio: &Kamailio,
) -> RunningServer {
    config.admin_token = Some("admin-secret".into());
    let server = start(config).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = http_get(&server, "/admin/v1/sip/registrations", ADMIN).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["registrations"][0]["state"] == "registered" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never registered at Kamailio: {v}\n{}",
            kamailio.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kamailio
        .wait_binding(&format!("sip:{SERVER_NUMBER}@127.0.0.1"))
        .await;
    server
}

/// A plain HTTP/1.1 GET with extra header lines: status and body.
async fn http_get(server: &RunningServer, path: &str, headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: test\r\n{headers}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// baresip's config and account in `dir`: it registers at Kamailio as `user`, answers
/// incoming calls at once, plays a 3 s 440 Hz tone (made with sox) into every call and records
/// what it hears in `dir/rec`.
fn write_baresip_config(dir: &Path, kamailio_port: u16, sip_port: u16, rtp_low: u16, user: &str) {
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
        format!(
            "<sip:{user}@127.0.0.1:{kamailio_port}>;auth_user={user};auth_pass={PASSWORD};regint=300;answermode=auto;audio_codecs=PCMU\n"
        ),
    )
    .unwrap();
}

fn spawn_baresip(dir: &Path, extra: &[&str]) -> Child {
    Command::new("baresip")
        .arg("-v")
        .arg("-f")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("baresip starts")
}

async fn output_of(child: Child) -> String {
    let out = tokio::time::timeout(CALL_WAIT, child.wait_with_output())
        .await
        .expect("baresip exits")
        .expect("baresip output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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

/// What baresip recorded hearing in its first call (its first `-dec.wav`: the names carry
/// the time), as samples.
fn heard_by_baresip(dir: &Path, log: &str) -> Vec<i16> {
    let mut recordings: Vec<PathBuf> = std::fs::read_dir(dir.join("rec"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .collect();
    recordings.sort();
    let recording = recordings
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("baresip recorded what it heard:\n{log}"));
    let bytes = std::fs::read(recording).unwrap();
    let data = bytes
        .windows(4)
        .position(|w| w == b"data")
        .expect("a data chunk");
    samples(&bytes[data + 8..])
}

/// The tone is in the second from 0.5 s on: past the echo's start-up, before the hang-up.
fn assert_holds_the_tone(heard: &[i16], log: &str) {
    assert!(
        heard.len() >= 12000,
        "recording too short: {}\n{log}",
        heard.len()
    );
    let window = &heard[4000..12000];
    let tone = tone_level(window, TONE_HZ);
    let other = tone_level(window, 1000.0);
    assert!(
        tone > 1000.0 && tone > 20.0 * other,
        "the recording does not hold the tone: 440 Hz level {tone:.0}, 1 kHz level {other:.0}"
    );
}

async fn agent(server: &RunningServer) -> telcoflow::TelcoflowClient {
    let config = telcoflow::TelcoflowClientConfig::builder()
        .api_key(
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        )
        .base_url(server.base_url())
        .build()
        .expect("SDK config");
    telcoflow::TelcoflowClient::connect(config)
        .await
        .expect("the agent connects")
}

/// Plays back everything the call hears until it ends.
async fn echo(call: &telcoflow::ActiveCall) {
    let mut audio = call.audio_stream(telcoflow::AudioChannel::Mixed);
    while let Some(chunk) = audio.next().await {
        match call.send_audio(&chunk).await {
            Ok(()) => {}
            Err(e) if e.is_buffer_full() => {}
            Err(_) => break,
        }
    }
}

#[tokio::test]
async fn a_phone_registered_at_kamailio_calls_the_servers_number_through_it() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(100);
    let dir = sipp::work_dir("kamailio-in");
    let kamailio = Kamailio::start(&dir, ports.sipp_sip, None).await;
    let server = server_registered_at(&kamailio, ports).await;
    let server_sip = server.sip_addr().unwrap();
    let client = agent(&server).await;
    let (ended_tx, mut ended) = tokio::sync::mpsc::channel(1);
    let serving = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .serve(move |call: telcoflow::ActiveCall| {
                    let ended_tx = ended_tx.clone();
                    async move {
                        if call.answer().await.is_err() {
                            return;
                        }
                        echo(&call).await;
                        call.terminated().await;
                        let _ = ended_tx.send(call.caller().to_owned()).await;
                    }
                })
                .await
        })
    };
    let phone_sip = ports.sipp_sip + 2;
    write_baresip_config(&dir, kamailio.port, phone_sip, 30400, "alice");
    // baresip registers, then dials the server's number at the proxy, hangs up when its 3 s
    // tone ends and exits a little later.
    let phone = spawn_baresip(
        &dir,
        &[
            "-e",
            &format!("/dial sip:{SERVER_NUMBER}@127.0.0.1:{}", kamailio.port),
            "-t",
            "7",
        ],
    );
    let log = output_of(phone).await;
    assert!(
        log.contains("Call established"),
        "baresip never got through:\n{log}\n{}",
        kamailio.log_text()
    );
    let caller = tokio::time::timeout(WAIT, ended.recv())
        .await
        .expect("the call ended at the server after baresip's BYE")
        .expect("the agent saw the end");
    assert_eq!(caller, "alice");
    assert!(
        kamailio
            .log_text()
            .contains("TEST SAVED sip:alice@127.0.0.1"),
        "baresip registered:\n{}",
        kamailio.log_text()
    );
    assert_holds_the_tone(&heard_by_baresip(&dir, &log), &log);
    // baresip's INVITE and its BYE both went through the proxy (the BYE by the Record-Route).
    let from_phone = kamailio.requests_from(&format!("127.0.0.1:{phone_sip}"));
    assert!(
        from_phone.contains(&"INVITE".to_owned()) && from_phone.contains(&"BYE".to_owned()),
        "baresip's requests at the proxy: {from_phone:?}"
    );
    let from_server = kamailio.requests_from(&server_sip.to_string());
    assert!(
        from_server.contains(&"REGISTER".to_owned()),
        "the server's requests at the proxy: {from_server:?}"
    );
    client.shutdown().await;
    let _ = serving.await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_server_calls_a_phone_registered_at_kamailio_through_its_registration() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(101);
    let dir = sipp::work_dir("kamailio-out");
    let kamailio = Kamailio::start(&dir, ports.sipp_sip, None).await;
    let server = server_registered_at(&kamailio, ports).await;
    let server_sip = server.sip_addr().unwrap();
    let phone_sip = ports.sipp_sip + 2;
    write_baresip_config(&dir, kamailio.port, phone_sip, 30600, "bob");
    // baresip registers and waits; it answers the server's call at once.
    let phone = spawn_baresip(&dir, &["-t", "10"]);
    kamailio.wait_binding("sip:bob@127.0.0.1").await;
    let client = agent(&server).await;
    let call = client
        .create_session(&format!("sip:bob@127.0.0.1:{}", kamailio.port))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "session.create through Kamailio failed: {e}\n{}",
                kamailio.log_text()
            )
        });
    // Echo what baresip plays for two seconds and a half, then hang up.
    let _ = tokio::time::timeout(Duration::from_millis(2500), echo(&call)).await;
    call.disconnect().await.expect("the agent hangs up");
    let log = output_of(phone).await;
    assert!(
        log.contains("Call established"),
        "baresip never answered:\n{log}"
    );
    assert_holds_the_tone(&heard_by_baresip(&dir, &log), &log);
    // The INVITE (with the registration's credentials if challenged) and the agent's BYE went
    // out through the proxy, not straight to baresip.
    let from_server = kamailio.requests_from(&server_sip.to_string());
    assert!(
        from_server.contains(&"INVITE".to_owned()) && from_server.contains(&"BYE".to_owned()),
        "the server's requests at the proxy: {from_server:?}\n{}",
        kamailio.log_text()
    );
    assert!(
        log.contains("terminated") || log.contains("closed"),
        "baresip saw the call end:\n{log}"
    );
    client.shutdown().await;
    server.shutdown().await;
}

/// baresip registers at Kamailio over TLS and calls the server's number with SRTP mandatory;
/// the server registered over TLS (checking Kamailio's certificate against the test CA) and
/// requires SRTP for calls to its registration. Every SIP hop is TLS, the media SRTP: the echo
/// comes back, and the call's figures name the suite.
#[tokio::test]
async fn a_phone_calls_the_server_through_kamailio_over_tls_with_srtp() {
    if !tools_available() {
        return;
    }
    let ports = sipp::ports(102);
    let dir = sipp::work_dir("kamailio-tls");
    let pki = tls_pki::Pki::new();
    let ca = pki.write_ca(&dir, "ca.pem");
    let proxy_cert = pki.issue(&dir, "kamailio", &["127.0.0.1", "localhost"]);
    let kamailio = Kamailio::start(&dir, ports.sipp_sip, Some(&proxy_cert)).await;
    let tls_port = kamailio.port + 1;
    let server_cert = pki.issue(&dir, "server", &["127.0.0.1", "localhost"]);
    let mut config = sipp::sip_config(ports);
    let sip = config.sip.as_mut().unwrap();
    sip.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    sip.tls_cert = Some(server_cert.cert.clone());
    sip.tls_key = Some(server_cert.key.clone());
    sip.tls_ca = Some(ca.clone());
    sip.registrations = vec![SipRegistration {
        srtp: Some("required".into()),
        ..registration(tls_port, "tls")
    }];
    let server = start_registered(config, &kamailio).await;
    let http = server.local_addr().to_string();
    let client = agent(&server).await;
    let suite = Arc::new(Mutex::new(None::<String>));
    let (ended_tx, mut ended) = tokio::sync::mpsc::channel(1);
    let serving = {
        let client = client.clone();
        let suite = suite.clone();
        tokio::spawn(async move {
            client
                .serve(move |call: telcoflow::ActiveCall| {
                    let (ended_tx, suite, http) = (ended_tx.clone(), suite.clone(), http.clone());
                    async move {
                        if call.answer().await.is_err() {
                            return;
                        }
                        let stats = format!("/public/v1/calls/{}/stats", call.id());
                        let (status, figures) = http_at(&http, "GET", &stats).await;
                        if status == 200 {
                            *suite.lock().unwrap() =
                                figures["legs"][0]["srtp"].as_str().map(str::to_owned);
                        }
                        echo(&call).await;
                        call.terminated().await;
                        let _ = ended_tx.send(()).await;
                    }
                })
                .await
        })
    };
    let phone_sip = ports.sipp_sip + 2;
    write_baresip_config(&dir, kamailio.port, phone_sip, 30800, "carol");
    // Over TLS to Kamailio, trusting the test CA; SRTP mandatory (RTP/SAVP with a=crypto).
    let mut baresip = std::fs::read_to_string(dir.join("config")).unwrap();
    baresip.push_str(&format!("sip_cafile {}\nmodule srtp.so\n", ca.display()));
    std::fs::write(dir.join("config"), baresip).unwrap();
    std::fs::write(
        dir.join("accounts"),
        format!(
            "<sip:carol@127.0.0.1:{tls_port};transport=tls>;auth_user=carol;auth_pass={PASSWORD};regint=300;answermode=auto;audio_codecs=PCMU;mediaenc=srtp-mand\n"
        ),
    )
    .unwrap();
    let phone = spawn_baresip(
        &dir,
        &[
            "-e",
            &format!("/dial sip:{SERVER_NUMBER}@127.0.0.1:{tls_port};transport=tls"),
            "-t",
            "10",
        ],
    );
    tokio::time::timeout(CALL_WAIT, ended.recv())
        .await
        .expect("the call ended at the server after baresip's BYE");
    // Then the agent calls baresip back through the registration with a plain `sip:` URI on
    // the registrar's host: the registration's transport (TLS) carries it, not UDP.
    let back = client
        .create_session(&format!("sip:carol@127.0.0.1:{tls_port}"))
        .await
        .unwrap_or_else(|e| panic!("the call back failed: {e}\n{}", kamailio.log_text()));
    back.disconnect().await.expect("the agent hangs up");
    let log = output_of(phone).await;
    assert!(
        log.contains("Call established"),
        "baresip never got through:\n{log}\n{}",
        kamailio.log_text()
    );
    assert!(
        kamailio
            .requests()
            .iter()
            .any(|(m, _, t)| m == "INVITE" && t == "tls")
            && kamailio.log_text().contains("TEST REQ INVITE sip:carol@"),
        "the call back did not reach the proxy over TLS:\n{}",
        kamailio.log_text()
    );
    assert_holds_the_tone(&heard_by_baresip(&dir, &log), &log);
    let suite = suite.lock().unwrap().clone();
    assert!(
        suite
            .as_deref()
            .is_some_and(|s| s.starts_with("AES_CM_128_HMAC_SHA1_")),
        "the call's figures name no SRTP suite: {suite:?}"
    );
    assert!(
        kamailio
            .log_text()
            .contains("TEST SAVED sip:carol@127.0.0.1"),
        "baresip registered:\n{}",
        kamailio.log_text()
    );
    // Every request of the call and both registrations came over TLS.
    let requests = kamailio.requests();
    for method in ["REGISTER", "INVITE", "ACK", "BYE"] {
        assert!(
            requests.iter().any(|(m, _, t)| m == method && t == "tls"),
            "no {method} over TLS at the proxy: {requests:?}"
        );
    }
    assert!(
        requests
            .iter()
            .filter(|(m, _, _)| m != "OPTIONS")
            .all(|(_, _, t)| t == "tls"),
        "requests at the proxy not over TLS: {requests:?}"
    );
    client.shutdown().await;
    let _ = serving.await;
    server.shutdown().await;
}
