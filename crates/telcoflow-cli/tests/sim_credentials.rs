//! `telcoflow call` and `telcoflow phone` against a configured server whose simulated phones
//! must authenticate: refused without credentials, admitted with `--api-key`/`--connector-uuid`
//! or the `TELCOFLOW_*` environment variables that `serve` reads.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};

const UUID: &str = "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01";
const KEY: &str = "cli-test-key";
const NUMBER: &str = "+4420700000001";
const CONNECT: &str = "+4420700000099";

/// Kills a child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `telcoflow serve --config` with simulated phones enabled; returns it and its URL.
fn serve(name: &str) -> (Child, String, std::path::PathBuf) {
    let path =
        std::env::temp_dir().join(format!("telcoflow-cli-{name}-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\n[sim]\nenabled = true\n[[connectors]]\nuuid = \"{UUID}\"\n\
             api_key = \"{KEY}\"\nnumbers = [\"{NUMBER}\"]\nconnect_default = \"{CONNECT}\"\n"
        ),
    )
    .unwrap();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_telcoflow"))
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("TELCOFLOW_API_KEY")
            .env_remove("TELCOFLOW_CONNECTOR_UUID")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("telcoflow starts"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let prefix = "telcoflow server listening on ";
    // The ready line comes within moments; a dead process ends the iterator.
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with(prefix))
        .expect("the ready line");
    (child, line[prefix.len()..].to_owned(), path)
}

/// `telcoflow <args>` with no credentials in the environment unless `env` gives them.
fn telcoflow(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_telcoflow"));
    cmd.args(args)
        .env_remove("TELCOFLOW_API_KEY")
        .env_remove("TELCOFLOW_CONNECTOR_UUID")
        .envs(env.iter().copied());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("telcoflow runs")
}

/// Starts `telcoflow phone` and returns its first stdout line (the process is killed after).
fn first_phone_line(cmd: &mut Command) -> String {
    let mut child = Child(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("phone starts"),
    );
    let stdout = child.0.stdout.take().unwrap();
    BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .next()
        .unwrap_or_default()
}

#[test]
fn phone_and_call_need_credentials_on_a_configured_server() {
    let (_server, url, config) = serve("creds");

    // Without credentials: refused with the server's reason, non-zero exit.
    let out = run(&mut telcoflow(
        &["phone", "--server", &url, "--number", CONNECT, "--once"],
        &[],
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    let out = run(&mut telcoflow(
        &["call", "--server", &url, "--to", NUMBER, "--timeout", "1"],
        &[],
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");

    // With flags: the phone registers.
    let line = first_phone_line(&mut telcoflow(
        &[
            "phone",
            "--server",
            &url,
            "--number",
            CONNECT,
            "--api-key",
            KEY,
            "--connector-uuid",
            UUID,
        ],
        &[],
    ));
    assert!(line.contains("\"registered\""), "{line}");

    // With the environment variables `serve` reads: the call is admitted and rings (nobody
    // answers, so it ends at its timeout rather than being refused).
    let out = run(&mut telcoflow(
        &["call", "--server", &url, "--to", NUMBER, "--timeout", "1"],
        &[
            ("TELCOFLOW_API_KEY", KEY),
            ("TELCOFLOW_CONNECTOR_UUID", UUID),
        ],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"reason\":\"timeout\""), "{stdout}");
    assert!(stdout.contains("\"call_id\":\""), "{stdout}");

    // A number of no connector of these credentials is refused with the network's reason.
    let out = run(&mut telcoflow(
        &["phone", "--server", &url, "--number", "+15550100", "--once"],
        &[
            ("TELCOFLOW_API_KEY", KEY),
            ("TELCOFLOW_CONNECTOR_UUID", UUID),
        ],
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a number of the connector"), "{stderr}");
    let _ = std::fs::remove_file(config);
}
