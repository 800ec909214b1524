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
