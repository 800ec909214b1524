//! SIP over TLS: the rustls configurations of the TLS listener (`[sip] tls_listen`,
//! `tls_cert`, `tls_key`, else `[tls]`'s certificate and key) and of the connections we open
//! to `sips:` / `;transport=tls` destinations and registrars, whose certificates must chain to
//! `tls_ca` (default: the web PKI roots) and name the host dialled (unless `tls_verify` is
//! off).
//!
//! The connections themselves are the SIP/TCP ones of `endpoint` with a TLS stream inside:
//! same framing, deadlines and limits; the handshake runs in the connection's task under
//! `tcp_message_timeout_secs`.

use super::pem::{load_certs, load_key, load_roots};
use crate::config::{ConfigError, SipConfig, TlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::sync::Arc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The TLS side of the SIP edge.
#[derive(Clone)]
pub(crate) struct SipTls {
    /// For the listener; `None` without `tls_listen`.
    pub(crate) acceptor: Option<TlsAcceptor>,
    /// For the connections we open.
    pub(crate) connector: TlsConnector,
}

impl std::fmt::Debug for SipTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SipTls")
            .field("listener", &self.acceptor.is_some())
            .finish_non_exhaustive()
    }
}

/// Loads the certificate, key and CAs `[sip]` names (with `[tls]`'s certificate and key as
/// the listener's default). A missing or unusable file is an error naming its key.
pub(crate) fn load(sip: &SipConfig, tls: Option<&TlsConfig>) -> Result<SipTls, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let acceptor = match sip.tls_listen {
        Some(_) => {
            let (certs, key) = match (&sip.tls_cert, &sip.tls_key, tls) {
                (Some(cert), Some(key), _) => (
                    load_certs("sip.tls_cert", cert)?,
                    load_key("sip.tls_key", key)?,
                ),
                (None, None, Some(tls)) => (
                    load_certs("tls.cert", &tls.cert)?,
                    load_key("tls.key", &tls.key)?,
                ),
                _ => {
                    return Err(ConfigError::Invalid(
                        "sip.tls_listen needs a certificate and key: set both sip.tls_cert and \
                         sip.tls_key, or [tls] cert and key"
                            .into(),
                    ));
                }
            };
            let config = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| ConfigError::Invalid(format!("sip.tls_listen: {e}")))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| ConfigError::Invalid(format!("sip.tls_cert/sip.tls_key: {e}")))?;
            Some(TlsAcceptor::from(Arc::new(config)))
        }
        None => None,
    };
    let roots = match &sip.tls_ca {
        Some(path) => load_roots("sip.tls_ca", path)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("sip.tls_ca: {e}")))?;
    let client = if sip.tls_verify {
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert { provider }))
            .with_no_client_auth()
    };
    Ok(SipTls {
        acceptor,
        connector: TlsConnector::from(Arc::new(client)),
    })
}

/// The name a TLS peer's certificate must carry: the host of the URI dialled (a name, or
/// an IP address).
pub(crate) fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.trim_matches(['[', ']']).to_owned()).ok()
}

/// `tls_verify = false`: any certificate is taken (the handshake still checks that the peer
/// holds its key).
#[derive(Debug)]
struct AnyServerCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
