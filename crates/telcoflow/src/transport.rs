//! Opening WebSockets: headers, TLS and mapping refusals to [`Error`].

use crate::Error;
use crate::config::Auth;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket, plain or TLS.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Builds an upgrade request for `url` with the SDK version header.
pub(crate) fn request(url: &str) -> Result<Request, Error> {
    let mut req = url
        .into_client_request()
        .map_err(|e| Error::connection_with(format!("invalid URL {url}"), e))?;
    req.headers_mut().insert(
        telcoflow_proto::control::SDK_VERSION_HEADER,
        HeaderValue::from_static(telcoflow_proto::PROTOCOL_VERSION),
    );
    Ok(req)
}

/// Adds a secret header. The value is marked sensitive so that `http`'s `Debug` hides it.
pub(crate) fn add_secret(req: &mut Request, name: &'static str, value: &str) -> Result<(), Error> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| Error::connection(format!("header {name} has an invalid value")))?;
    v.set_sensitive(true);
    req.headers_mut().insert(name, v);
    Ok(())
}

/// Opens the WebSocket. `auth` selects an mTLS client certificate when it is one.
/// Read buffer of the SDK's WebSockets. tungstenite zero-fills the free part of its read
/// buffer before every socket read, so the 128 KiB default cost a 128 KiB memset per 20 ms
/// audio frame; larger messages still grow the buffer.
const WS_READ_BUFFER: usize = 4096;

fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
}

pub(crate) async fn connect(req: Request, auth: Option<&Auth>) -> Result<Ws, Error> {
    let result = match auth {
        #[cfg(feature = "tls")]
        Some(Auth::Mtls {
            cert_path,
            key_path,
        }) => {
            let connector = tls::mtls_connector(cert_path, key_path)?;
            tokio_tungstenite::connect_async_tls_with_config(
                req,
                Some(ws_config()),
                true,
                Some(connector),
            )
            .await
        }
        // TCP_NODELAY: 20 ms audio frames must not wait behind Nagle's algorithm.
        _ => tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true).await,
    };
    match result {
        Ok((ws, _response)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                .unwrap_or_default();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                Err(Error::Authentication {
                    message: if body.is_empty() {
                        status.to_string()
                    } else {
                        body
                    },
                })
            } else {
                Err(Error::connection(format!(
                    "server answered {status}: {body}"
                )))
            }
        }
        Err(e) => Err(Error::connection_with("cannot open WebSocket", e)),
    }
}

#[cfg(feature = "tls")]
mod tls {
    //! The rustls client configuration for mTLS.
    use crate::Error;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::path::Path;
    use std::sync::Arc;
    use tokio_tungstenite::Connector;

    pub(super) fn mtls_connector(cert_path: &Path, key_path: &Path) -> Result<Connector, Error> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|_| {
                Error::config(
                    "cert_path",
                    format!("cannot read certificates from {}", cert_path.display()),
                )
            })?;
        // The key's content never reaches an error message; only its path does.
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|_| {
            Error::config(
                "key_path",
                format!("cannot read a private key from {}", key_path.display()),
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::connection_with("TLS setup failed", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|_| Error::config("key_path", "the key does not match the certificate"))?;
        Ok(Connector::Rustls(Arc::new(config)))
    }
}
