//! TLS and mTLS: `wss://` with a server certificate, a pinned client certificate authenticating
//! in place of an API key, and API keys still working over TLS.

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use std::sync::Arc;
use telcoflow_server::config::{ConnectorConfig, TlsConfig};
use telcoflow_server::{Config, Server, certificate_fingerprint};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, connect_async_tls_with_config};

struct Pki {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        Self {
            ca_der: ca.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `name`: (PEM cert, PEM key, DER cert, DER key).
    fn issue(
        &self,
        name: &str,
    ) -> (
        String,
        String,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.pem(), key.serialize_pem(), cert.der().clone(), key_der)
    }
}

async fn connect(
    url: &str,
    pki: &Pki,
    client: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    headers: &[(&str, &str)],
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    u16,
> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = name.parse().unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match connect_async_tls_with_config(
        request,
        None,
        false,
        Some(Connector::Rustls(Arc::new(config))),
    )
    .await
    {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn pinned_client_certificate_authenticates_over_wss() {
    let pki = Pki::new();
    let dir = std::env::temp_dir().join(format!("telcoflow-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (server_pem, server_key, _, _) = pki.issue("localhost");
    std::fs::write(dir.join("server.pem"), server_pem).unwrap();
    std::fs::write(dir.join("server.key"), server_key).unwrap();
    let (_, _, client_der, client_key) = pki.issue("agent-1");
    let (_, _, stranger_der, stranger_key) = pki.issue("stranger");

    let mut config = Config::development();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tls = Some(TlsConfig {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: None,
    });
    let mut pinned =
        ConnectorConfig::development("unused-key", "00000000-0000-4000-8000-0000000000b3");
    pinned.client_cert_sha256 = Some(certificate_fingerprint(&client_der));
    config.connectors.push(pinned);
    let server = Server::start(config).await.unwrap();
    assert!(server.base_url().starts_with("wss://"));
    let url = format!(
        "wss://localhost:{}/v1/agent/session-manager",
        server.local_addr().port()
    );

    // The pinned certificate alone is enough.
    let mut ws = connect(&url, &pki, Some((client_der, client_key)), &[])
        .await
        .expect("mTLS upgrade");
    ws.send(Message::Text(
        json!({"type": "setup", "data": {}}).to_string().into(),
    ))
    .await
    .unwrap();
    let Some(Ok(Message::Text(done))) = ws.next().await else {
        panic!("no setup.done")
    };
    let done: Value = serde_json::from_str(&done).unwrap();
    assert_eq!(done["type"], "setup.done");

    // A certificate nobody pinned, or none at all, is refused.
    assert_eq!(
        connect(&url, &pki, Some((stranger_der, stranger_key)), &[])
            .await
            .err(),
        Some(401)
    );
    assert_eq!(connect(&url, &pki, None, &[]).await.err(), Some(401));
    // API keys work over TLS as well.
    let headers = [
        ("x-api-key", telcoflow_server::config::DEV_API_KEY),
        (
            "x-connector-uuid",
            telcoflow_server::config::DEV_CONNECTOR_UUID,
        ),
    ];
    assert!(connect(&url, &pki, None, &headers).await.is_ok());
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
