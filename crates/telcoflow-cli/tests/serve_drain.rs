//! `telcoflow serve` drains on SIGTERM: `/readyz` turns 503, new calls are refused as
//! `unavailable`, the call in progress goes on for the grace and is then ended, and the process
//! exits 0.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEV_KEY: &str = "dev-api-key";
const DEV_UUID: &str = "00000000-0000-4000-8000-000000000001";

/// Kills a child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A plain HTTP request to `addr` with the development credentials: status and body.
fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: test\r\nx-api-key: {DEV_KEY}\r\nx-connector-uuid: {DEV_UUID}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// Polls until `done` holds, for at most `bound`.
fn until(bound: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn call(url: &str, from: &str, timeout: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_telcoflow"));
    cmd.args([
        "call",
        "--server",
        url,
        "--from",
        from,
        "--to",
        "+15550001",
        "--timeout",
        timeout,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    cmd
}

#[test]
fn sigterm_drains_the_server_then_it_exits_0() {
    let mut server = Child(
        Command::new(env!("CARGO_BIN_EXE_telcoflow"))
            .args(["serve", "--listen", "127.0.0.1:0", "--drain-grace", "3"])
            .env_remove("TELCOFLOW_API_KEY")
            .env_remove("TELCOFLOW_CONNECTOR_UUID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("telcoflow starts"),
    );
    let prefix = "telcoflow server listening on ";
    let mut lines = BufReader::new(server.0.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let url = lines
        .find(|l| l.starts_with(prefix))
        .expect("the ready line")[prefix.len()..]
        .to_owned();
    // Its later output is read too, so that it never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let addr = url.trim_start_matches("ws://").to_owned();
    assert_eq!(http(&addr, "GET", "/readyz").0, 200);

    // A call nobody answers rings on the server.
    // (It ends by itself within its 20 s timeout, whatever happens here.)
    let ringing = call(&url, "+15551110001", "20").spawn().unwrap();
    until(Duration::from_secs(10), "the call is listed", || {
        http(&addr, "GET", "/public/v1/sessions?state=OPEN")
            .1
            .contains("+15551110001")
    });

    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    until(Duration::from_secs(2), "/readyz says draining", || {
        let (status, body) = http(&addr, "GET", "/readyz");
        status == 503 && body.contains("\"draining\"")
    });
    // A new call is refused, saying why.
    let refused = call(&url, "+15551110002", "5").output().unwrap();
    let summary = String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success(), "{summary}");
    assert!(summary.contains("\"reason\":\"unavailable\""), "{summary}");

    // The ringing call goes on until the grace is over, then it is ended and the server
    // exits 0.
    let drained = Instant::now();
    let ended = ringing.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&ended.stdout);
    assert!(summary.contains("\"hangup_by\":\"remote\""), "{summary}");
    let mut exited = None;
    until(Duration::from_secs(10), "the server exits", || {
        exited = server.0.try_wait().unwrap();
        exited.is_some()
    });
    assert!(exited.unwrap().success(), "{exited:?}");
    assert!(drained.elapsed() >= Duration::from_secs(1), "{drained:?}");
}

#[test]
fn a_drain_asked_over_http_ends_the_process_with_0() {
    let mut server = Child(
        Command::new(env!("CARGO_BIN_EXE_telcoflow"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("TELCOFLOW_API_KEY")
            .env_remove("TELCOFLOW_CONNECTOR_UUID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("telcoflow starts"),
    );
    let prefix = "telcoflow server listening on ";
    let mut lines = BufReader::new(server.0.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let url = lines
        .find(|l| l.starts_with(prefix))
        .expect("the ready line")[prefix.len()..]
        .to_owned();
    std::thread::spawn(move || lines.for_each(drop));
    let (status, body) = http(url.trim_start_matches("ws://"), "POST", "/admin/v1/drain");
    assert_eq!(status, 202, "{body}");
    // No call to wait for: it stops at once.
    let mut exited = None;
    until(Duration::from_secs(10), "the server exits", || {
        exited = server.0.try_wait().unwrap();
        exited.is_some()
    });
    assert!(exited.unwrap().success(), "{exited:?}");
}
