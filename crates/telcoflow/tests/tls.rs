//! `wss://` with a private CA and mTLS: a client certificate authenticates in place of an API
//! key.
#![cfg(feature = "tls")]

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use telcoflow::{Error, TelcoflowClient, TelcoflowClientConfig};
use telcoflow_server::config::{ConnectorConfig, TlsConfig};
use telcoflow_server::{Config, Server, certificate_fingerprint};

struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        // One directory per instance: tests run in parallel and each removes its own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("telcoflow-sdk-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    /// Issues a certificate for `names`; returns the PEM paths and the DER certificate.
    fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path, cert.der().to_vec())
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mtls(url: &str, cert: &Path, key: &Path, ca: &Path) -> TelcoflowClientConfig {
    TelcoflowClientConfig::builder()
        .mtls(cert, key)
        .ca_cert(ca)
        .base_url(url)
        .build()
        .unwrap()
}

#[tokio::test]
async fn client_certificate_authenticates_over_wss() {
    init_tracing();
    let pki = Pki::new();
    let (server_cert, server_key, _) = pki.issue("server", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key, client_der) = pki.issue("client", &["agent-1"]);
    let (stranger_cert, stranger_key, _) = pki.issue("stranger", &["stranger"]);

    let mut config = Config::development();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tls = Some(TlsConfig {
        cert: server_cert,
        key: server_key,
        client_ca: None,
    });
    let mut pinned = ConnectorConfig::development("unused-key", "mtls-connector");
    pinned.client_cert_sha256 = Some(certificate_fingerprint(&client_der));
    config.connectors.push(pinned);
    let server = Server::start(config).await.unwrap();
    let url = server.base_url().to_owned();
    assert!(url.starts_with("wss://"), "{url}");

    let client = TelcoflowClient::connect(mtls(&url, &client_cert, &client_key, &pki.ca()))
        .await
        .expect("the pinned certificate authenticates");
    assert!(client.sm_ws_id().is_some());
    client.shutdown().await;

    match TelcoflowClient::connect(mtls(&url, &stranger_cert, &stranger_key, &pki.ca())).await {
        Err(Error::Authentication { .. }) => {}
        other => panic!("{other:?}"),
    }

    // API keys work over TLS as well, once the private CA is trusted.
    let with_key = builder(&url).ca_cert(pki.ca()).build().unwrap();
    let client = TelcoflowClient::connect(with_key).await.unwrap();
    client.shutdown().await;

    // Without the CA the server is not trusted.
    let untrusted = builder(&url).build().unwrap();
    match TelcoflowClient::connect(untrusted).await {
        Err(Error::Connection { .. }) => {}
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[test]
fn unreadable_files_are_named_at_build() {
    let pki = Pki::new();
    let (cert, _, _) = pki.issue("c", &["x"]);
    let e = TelcoflowClientConfig::builder()
        .mtls(&cert, pki.dir.join("missing.key"))
        .base_url("wss://h")
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidConfig {
                field: "key_path",
                ..
            }
        ),
        "{e}"
    );
    let e = TelcoflowClientConfig::builder()
        .api_key("k", "u")
        .ca_cert(pki.dir.join("missing-ca.pem"))
        .base_url("wss://h")
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidConfig {
                field: "ca_cert",
                ..
            }
        ),
        "{e}"
    );
}
