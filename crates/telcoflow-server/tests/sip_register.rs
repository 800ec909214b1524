//! Outbound registration (`[[sip.registrations]]`) against SIPp playing the registrar: digest
//! authentication, the binding's Contact, the status route and gauge, the removal on
//! shutdown, and a failing registrar reported with its status and the wait before a retry.

mod common;
mod sipp;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use telcoflow_server::RunningServer;
use telcoflow_server::config::SipRegistration;

/// A plain HTTP/1.1 GET with extra header lines (each ending in CRLF): status and body.
async fn get(server: &RunningServer, path: &str, headers: &str) -> (u16, String) {
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

const ADMIN: &str = "authorization: Bearer admin-secret\r\n";

/// The first registration's status, polled until `ready` holds (bounded by [`WAIT`]).
async fn registration_until(server: &RunningServer, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = get(server, "/admin/v1/sip/registrations", ADMIN).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let first = v["registrations"][0].clone();
        if ready(&first) {
            return first;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registration never got there: {first}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn registration(port: u16) -> SipRegistration {
    SipRegistration {
        registrar: format!("127.0.0.1:{port}"),
        aor: "sip:+15550100@127.0.0.1".into(),
        username: Some("alice".into()),
        password: Some("s3cret".into()),
        expiry: 120,
        transport: "udp".into(),
        outbound_proxy: None,
        srtp: None,
    }
}

#[tokio::test]
async fn registers_with_digest_auth_and_removes_the_binding_on_shutdown() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(61);
    let dir = sipp::work_dir("register");
    // The registrar first: REGISTERs sent before it listens are retransmitted (UDP, T1).
    let registrar = tokio::spawn({
        let args = sipp::uas_args(ports, "registrar.xml");
        async move { sipp::run(&dir, &args).await }
    });
    let mut config = sipp::sip_config(ports);
    config.admin_token = Some("admin-secret".into());
    let sip = config.sip.as_mut().unwrap();
    sip.timer_t1_ms = 100;
    sip.registrations = vec![registration(ports.sipp_sip)];
    let server = start(config).await;

    let status = registration_until(&server, |r| r["state"] == "registered").await;
    assert_eq!(
        status["registrar"],
        format!("sip:127.0.0.1:{}", ports.sipp_sip)
    );
    assert_eq!(status["aor"], "sip:+15550100@127.0.0.1");
    assert_eq!(status["transport"], "udp");
    assert_eq!(status["expiresSecs"], 120);
    assert!(!status.to_string().contains("s3cret"), "{status}");
    // Operators only: a connector's key is not enough once an admin token is set.
    let (code, body) = get(
        &server,
        "/admin/v1/sip/registrations",
        &format!(
            "x-api-key: {}\r\nx-connector-uuid: {}\r\n",
            telcoflow_server::config::DEV_API_KEY,
            telcoflow_server::config::DEV_CONNECTOR_UUID
        ),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin_token"), "{body}");
    let (code, metrics) = get(&server, "/metrics", "").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("telcoflow_sip_registrations{state=\"registered\"} 1"),
        "{metrics}"
    );

    // Shutting down removes the binding: SIPp's scenario ends with the un-REGISTER.
    server.shutdown().await;
    let outcome = tokio::time::timeout(WAIT, registrar)
        .await
        .expect("the registrar's scenario ends")
        .unwrap();
    outcome.assert_passed();
}

#[tokio::test]
async fn a_failing_registrar_is_reported_with_its_status_and_retry() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(62);
    let dir = sipp::work_dir("register-busy");
    let registrar = tokio::spawn({
        let args = sipp::uas_args(ports, "registrar_busy.xml");
        async move { sipp::run(&dir, &args).await }
    });
    let mut config = sipp::sip_config(ports);
    let sip = config.sip.as_mut().unwrap();
    sip.timer_t1_ms = 100;
    sip.registrations = vec![registration(ports.sipp_sip)];
    let server = start(config).await;

    // Without an admin token, a connector's credentials read it.
    let status = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (code, body) = get(
                &server,
                "/admin/v1/sip/registrations",
                &format!(
                    "x-api-key: {}\r\nx-connector-uuid: {}\r\n",
                    telcoflow_server::config::DEV_API_KEY,
                    telcoflow_server::config::DEV_CONNECTOR_UUID
                ),
            )
            .await;
            assert_eq!(code, 200, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            if v["registrations"][0]["state"] == "failed" {
                break v["registrations"][0].clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "never failed: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert_eq!(status["lastStatus"], 503, "{status}");
    assert_eq!(
        status["retryInSecs"], 7,
        "Retry-After is followed: {status}"
    );
    assert_eq!(status["reason"], "Service Unavailable");
    let (_, body) = get(&server, "/admin/v1/sip/registrations", "").await;
    assert!(
        body.contains("UNAUTHORIZED") || body.contains("nauthorized"),
        "{body}"
    );
    registrar.await.unwrap().assert_passed();
    server.shutdown().await;
}

#[tokio::test]
async fn call_connect_to_the_registrars_host_dials_with_the_registrations_credentials() {
    if !sipp::available() {
        return;
    }
    let ports = sipp::ports(63);
    let dir = sipp::work_dir("register-trunk");
    let mut args = sipp::uas_args(ports, "registrar_trunk.xml");
    // The registration and the call: two SIPp calls.
    let m = args.iter().position(|a| a == "-m").unwrap();
    args[m + 1] = "2".into();
    let trunk = tokio::spawn(async move { sipp::run(&dir, &args).await });
    let mut config = sipp::sip_config(ports);
    config.admin_token = Some("admin-secret".into());
    config.connectors[0].connect.insert(
        "+15559990001".into(),
        format!("sip:+15550200@127.0.0.1:{}", ports.sipp_sip),
    );
    let sip = config.sip.as_mut().unwrap();
    sip.timer_t1_ms = 100;
    // No [[sip.trunks]]: the credentials can only come from the registration.
    sip.registrations = vec![registration(ports.sipp_sip)];
    let (server, _control, _phone, mut media) = answered_call(config, 8000).await;
    registration_until(&server, |r| r["state"] == "registered").await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 10})))
        .await;
    assert_eq!(resp["success"], true, "the trunk refused the call: {resp}");
    let resp = media.command("call.disconnect", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    server.shutdown().await;
    let outcome = tokio::time::timeout(WAIT, trunk)
        .await
        .expect("the trunk's scenario ends")
        .unwrap();
    outcome.assert_passed();
}
