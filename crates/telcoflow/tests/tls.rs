//! `wss://` with a private CA and mTLS: a client certificate authenticates in place of an API
//! key.
#![cfg(feature = "tls")]

mod common;

use common::pki::Pki;
use common::*;
use std::path::Path;
use telcoflow::{ConfigError, Error, TelcoflowClient, TelcoflowClientConfig};
use telcoflow_server::config::{ConnectorConfig, TlsConfig};
use telcoflow_server::{Config, Server, certificate_fingerprint};

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
    let mut pinned =
        ConnectorConfig::development("unused-key", "00000000-0000-4000-8000-0000000000b3");
    pinned.client_cert_sha256 = Some(certificate_fingerprint(&client_der));
    config.connectors.push(pinned);
    let server = Server::start(config).await.unwrap();
    let url = server.base_url().to_owned();
    assert!(url.starts_with("wss://"), "{url}");

    let client = TelcoflowClient::connect(mtls(&url, &client_cert, &client_key, &pki.ca()))
        .await
        .expect("the pinned certificate authenticates");
    assert!(client.sm_ws_id().is_some());
    // The HTTP session API goes over https:// with the same certificate.
    let page = client
        .list_sessions(&telcoflow::SessionQuery::open())
        .await
        .expect("https with the client certificate");
    assert!(page.items.is_empty());
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
            ConfigError::Invalid {
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
            ConfigError::Invalid {
                field: "ca_cert",
                ..
            }
        ),
        "{e}"
    );
}
