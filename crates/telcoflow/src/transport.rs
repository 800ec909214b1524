//! Opening WebSockets: headers, TLS and mapping refusals to [`Error`].

use crate::Error;
#[cfg(feature = "tls")]
use crate::config::Auth;
use std::time::Duration;
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

/// How `wss://` connections are made: the default roots, or a prepared rustls configuration
/// (extra roots, a client certificate). Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Tls {
    #[cfg(feature = "tls")]
    connector: Option<tokio_tungstenite::Connector>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// The connectors for the control connection (with the client certificate, if any) and
    /// for media connections (extra roots only), read from the files once.
    #[cfg(feature = "tls")]
    pub(crate) fn build(
        auth: &Auth,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<(Self, Self), crate::ConfigError> {
        let client = match auth {
            Auth::Mtls {
                cert_path,
                key_path,
            } => Some((cert_path.as_path(), key_path.as_path())),
            Auth::ApiKey { .. } => None,
        };
        if client.is_none() && ca_cert.is_none() {
            return Ok((Self::default(), Self::default()));
        }
        let control = tls::connector(ca_cert, client)?;
        let media = tls::connector(ca_cert, None)?;
        Ok((
            Self {
                connector: Some(control),
            },
            Self {
                connector: Some(media),
            },
        ))
    }
}

/// Read buffer of the SDK's WebSockets. tungstenite zero-fills the free part of its read
/// buffer before every socket read, so the 128 KiB default cost a 128 KiB memset per 20 ms
/// audio frame; larger messages still grow the buffer. Connections also set TCP_NODELAY: 20 ms
/// audio frames must not wait behind Nagle's algorithm.
impl Tls {
    /// The rustls configuration for an `https://` request: the one of these WebSockets
    /// (private CA, client certificate) when there is one, else the webpki roots.
    #[cfg(feature = "tls")]
    pub(crate) fn rustls_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, Error> {
        let connector = match &self.connector {
            Some(c) => c.clone(),
            None => tls::connector(None, None).map_err(|e| Error::connection(e.to_string()))?,
        };
        match connector {
            tokio_tungstenite::Connector::Rustls(c) => Ok(c),
            _ => Err(Error::connection("no rustls configuration")),
        }
    }
}

const WS_READ_BUFFER: usize = 4096;

fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
}

/// Opens the WebSocket, giving up after `timeout`: a peer that accepts the TCP connection but
/// stalls the TLS handshake or the HTTP upgrade must not hold the caller forever.
pub(crate) async fn connect(req: Request, tls: &Tls, timeout: Duration) -> Result<Ws, Error> {
    try_connect(req, tls, timeout).await.map_err(Error::from)
}

/// Why a WebSocket did not open.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The server answered the upgrade with this status and body.
    Refused(StatusCode, String),
    /// Anything else: the connection, TLS, the deadline, the handshake.
    Failed(Error),
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Refused(status, body)
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
            {
                Self::Authentication {
                    message: if body.is_empty() {
                        status.to_string()
                    } else {
                        body
                    },
                }
            }
            OpenError::Refused(status, body) => {
                Self::connection(format!("server answered {status}: {body}"))
            }
            OpenError::Failed(e) => e,
        }
    }
}

/// [`connect`], telling a refusal (and its status) from other failures.
pub(crate) async fn try_connect(
    req: Request,
    tls: &Tls,
    timeout: Duration,
) -> Result<Ws, OpenError> {
    match tokio::time::timeout(timeout, open(req, tls)).await {
        Ok(r) => r,
        Err(_) => Err(OpenError::Failed(Error::connection(format!(
            "timed out opening WebSocket after {timeout:?}"
        )))),
    }
}

async fn open(req: Request, tls: &Tls) -> Result<Ws, OpenError> {
    #[cfg(feature = "tls")]
    let result = match &tls.connector {
        Some(c) => {
            tokio_tungstenite::connect_async_tls_with_config(
                req,
                Some(ws_config()),
                true,
                Some(c.clone()),
            )
            .await
        }
        None => tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true).await,
    };
    #[cfg(not(feature = "tls"))]
    let result = {
        let _ = tls;
        tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true).await
    };
    match result {
        Ok((ws, _response)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                .unwrap_or_default();
            Err(OpenError::Refused(resp.status(), body))
        }
        Err(e) => Err(OpenError::Failed(Error::connection_with(
            "cannot open WebSocket",
            e,
        ))),
    }
}

#[cfg(feature = "tls")]
mod tls {
    //! The rustls client configuration for mTLS.
    use crate::ConfigError;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::path::Path;
    use std::sync::Arc;
    use tokio_tungstenite::Connector;

    /// A rustls connector trusting the webpki roots plus `ca_cert`, presenting `client` if
    /// given. Errors name the config field; key material never reaches a message.
    pub(super) fn connector(
        ca_cert: Option<&Path>,
        client: Option<(&Path, &Path)>,
    ) -> Result<Connector, ConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = ca_cert {
            for cert in read_certs(ca, "ca_cert")? {
                roots.add(cert).map_err(|e| {
                    ConfigError::invalid("ca_cert", format!("{}: {e}", ca.display()))
                })?;
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid("tls", e))?
        .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert_path, key_path)) => {
                let certs = read_certs(cert_path, "cert_path")?;
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|_| {
                    ConfigError::invalid(
                        "key_path",
                        format!("cannot read a private key from {}", key_path.display()),
                    )
                })?;
                builder.with_client_auth_cert(certs, key).map_err(|_| {
                    ConfigError::invalid("key_path", "the key does not match the certificate")
                })?
            }
        };
        Ok(Connector::Rustls(Arc::new(config)))
    }

    fn read_certs(
        path: &Path,
        field: &'static str,
    ) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|_| {
                ConfigError::invalid(
                    field,
                    format!("cannot read certificates from {}", path.display()),
                )
            })?;
        if certs.is_empty() {
            return Err(ConfigError::invalid(
                field,
                format!("no certificate in {}", path.display()),
            ));
        }
        Ok(certs)
    }
}
