//! `telcoflow serve --config` takes `TELCOFLOW_<SECTION>_<KEY>` variables over the file.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};

/// Kills the server when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    (
        status,
        response.split_once("\r\n\r\n").unwrap().1.to_owned(),
    )
}

#[test]
fn serve_takes_settings_from_the_environment_over_the_file() {
    let path =
        std::env::temp_dir().join(format!("telcoflow-serve-env-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:8080\"\n[[connectors]]\n\
         uuid = \"7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01\"\napi_key = \"k\"\n",
    )
    .unwrap();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_telcoflow"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("TELCOFLOW_SERVER_LISTEN", "127.0.0.1:0")
            .env("TELCOFLOW_METRICS_ENABLED", "false")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("telcoflow starts"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let prefix = "telcoflow server listening on ws://";
    // The ready line comes within moments; a dead process ends the iterator.
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with(prefix))
        .expect("the ready line");
    let _ = std::fs::remove_file(&path);
    let addr = &line[prefix.len()..];
    assert_ne!(addr, "127.0.0.1:8080", "the variable's listen address wins");
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("disabled"), "{body}");
    assert_eq!(get(addr, "/healthz").0, 200);
}
