//! `telcoflow serve --sip`: the binary binds SIP and says where, and answers SIP OPTIONS there.

use std::io::{BufRead as _, BufReader};
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Kills the server when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_with_sip_prints_the_sip_address_and_answers_options() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_telcoflow"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--sip",
                "127.0.0.1:0",
                "--rtp-ports",
                "18000-18099",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("telcoflow starts"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let prefix = "telcoflow sip listening on udp+tcp ";
    // The ready lines come within moments; a dead process ends the iterator.
    let sip_line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with(prefix))
        .expect("the sip ready line");
    let addr: std::net::SocketAddr = sip_line[prefix.len()..].parse().expect("an address");
    assert_ne!(addr.port(), 0, "the real port is printed");

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = sock.local_addr().unwrap();
    let options = format!(
        "OPTIONS sip:{addr} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-cli-1\r\n\
         From: <sip:probe@{local}>;tag=1\r\n\
         To: <sip:{addr}>\r\n\
         Call-ID: cli-options-1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    );
    sock.send_to(options.as_bytes(), addr).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).expect("a response to OPTIONS");
    let response = String::from_utf8_lossy(&buf[..n]);
    assert!(response.starts_with("SIP/2.0 200"), "{response}");
}

/// Waits for `child` to exit within `bound`, killing it (and failing) otherwise.
fn exit_within(child: &mut Child, bound: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_refuses_sip_on_a_public_address_without_allow_or_accounts() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_telcoflow"))
            .args(["serve", "--listen", "127.0.0.1:0", "--sip", "0.0.0.0:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("telcoflow starts"),
    );
    let status = exit_within(&mut child, Duration::from_secs(10));
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("allow = [\"0.0.0.0/0\""), "{stderr}");
    assert!(stderr.contains("[[sip.accounts]]"), "{stderr}");
}

/// CPU time (user + system) the process `pid` has used, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

#[test]
fn sip_tcp_accept_backs_off_when_file_descriptors_run_out() {
    if !std::path::Path::new("/proc/self/stat").exists()
        || Command::new("prlimit").arg("--version").output().is_err()
    {
        eprintln!("NOTICE: no /proc or prlimit; skipping");
        return;
    }
    // All connections come from 127.0.0.1: lift the per-source cap above their number, so
    // that it is the descriptors that run out, not the cap that closes them.
    let config = std::env::temp_dir().join(format!(
        "telcoflow-cli-accept-backoff-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\n[sip]\ntcp_max_connections_per_ip = 200\n[[connectors]]\n\
         uuid = \"7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01\"\napi_key = \"accept-backoff\"\n\
         numbers = [\"+4420700000001\"]\n",
    )
    .unwrap();
    // Few file descriptors: a few dozen SIP/TCP connections use them all up.
    let mut child = Child(
        Command::new("prlimit")
            .args(["--nofile=48:48", env!("CARGO_BIN_EXE_telcoflow")])
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--sip",
                "127.0.0.1:0",
                "--rtp-ports",
                "18200-18209",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("telcoflow starts"),
    );
    let pid = child.0.id();
    let prefix = "telcoflow sip listening on udp+tcp ";
    let sip_line = BufReader::new(child.0.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with(prefix))
        .expect("the sip ready line");
    let addr: std::net::SocketAddr = sip_line[prefix.len()..].parse().expect("an address");
    let stderr = child.0.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let cpu_before = cpu_time(pid);
    // More connections than the server has descriptors for; the kernel completes them all.
    let conns: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cpu_time(pid) - cpu_before;
    let accept_errors: Vec<String> = lines_rx
        .try_iter()
        .filter(|l| l.contains("SIP TCP accept failed"))
        .collect();
    assert!(
        !accept_errors.is_empty(),
        "the descriptors ran out (else this test tests nothing)"
    );
    assert!(
        accept_errors.len() <= 2,
        "accept errors are logged once per 10 s: {accept_errors:#?}"
    );
    assert!(
        cpu < Duration::from_millis(1000),
        "3 s of failing accepts took {cpu:?} of CPU"
    );

    // Alive meanwhile: OPTIONS over UDP needs no new descriptor.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = sock.local_addr().unwrap();
    let options = |call_id: &str, transport: &str| {
        format!(
            "OPTIONS sip:{addr} SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {local};branch=z9hG4bK-{call_id}\r\n\
             From: <sip:probe@{local}>;tag=1\r\n\
             To: <sip:{addr}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 OPTIONS\r\n\
             Max-Forwards: 70\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    sock.send_to(options("fd-udp", "UDP").as_bytes(), addr)
        .unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).expect("a response to OPTIONS");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("SIP/2.0 200"));

    // Once the connections go, descriptors are free again and TCP works.
    drop(conns);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        std::io::Write::write_all(&mut tcp, options("fd-tcp", "TCP").as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        if let Ok(n) = std::io::Read::read(&mut tcp, &mut buf) {
            if String::from_utf8_lossy(&buf[..n]).starts_with("SIP/2.0 200") {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIP over TCP never recovered"
        );
    }
    let _ = std::fs::remove_file(&config);
}
