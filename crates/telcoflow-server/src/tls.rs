//! TLS for the listener (`wss://`, `https://`) and client-certificate (mTLS) authentication.
//!
//! With `[tls]` in the configuration the server accepts only TLS. A client certificate is asked
//! for but not required, so API-key clients keep working over TLS; a connector with
//! `client_cert_sha256` accepts the client certificate with that SHA-256 fingerprint in place of
//! an API key. With `client_ca` set, certificates must also chain to that CA; without it, the
//! fingerprint pin alone decides (the TLS handshake still proves the client holds the key).
//!
//! The handshake itself runs in `listener`, under the same deadline as request headers.
//!
//! - `pem`: reading certificates, keys and CAs from PEM files.
//! - `sip`: SIP over TLS (`[sip] tls_*`).

mod pem;
pub(crate) mod sip;

use crate::config::{ConfigError, TlsConfig};
use pem::{invalid, load_certs, load_key, load_roots};
use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Who is on the other end of a connection, as the handlers see it.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    /// The client's address (`/metrics` is open to loopback).
    pub(crate) addr: std::net::SocketAddr,
    /// Lower-case hex SHA-256 of the client certificate, if one was presented.
    pub(crate) cert_sha256: Option<String>,
}

/// Lower-case hex SHA-256 of a DER certificate: the form `client_cert_sha256` takes.
pub fn fingerprint(cert: &[u8]) -> String {
    Sha256::digest(cert)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl crate::config::Config {
    /// Loads the files the configuration names as the server will: the listener's
    /// certificate, key and client CAs (as `serve` does at start), SIP over TLS's, and opens the cluster's
    /// credentials and TLS files. For `telcoflow check`, so that a missing or unusable file
    /// is found before `serve` starts.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        if let Some(tls) = &self.tls {
            server_config(tls)?;
        }
        if let Some(sip) = &self.sip {
            sip::load(sip, self.tls.as_ref())?;
        }
        if let Some(c) = &self.cluster {
            for (what, path) in [
                ("credentials_file", &c.credentials_file),
                ("tls_ca", &c.tls_ca),
                ("tls_cert", &c.tls_cert),
                ("tls_key", &c.tls_key),
            ] {
                if let Some(path) = path {
                    std::fs::File::open(path).map_err(|e| {
                        ConfigError::Invalid(format!("cluster.{what} {}: {e}", path.display()))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Builds the rustls server configuration from `[tls]`.
pub(crate) fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    let certs = load_certs("tls.cert", &tls.cert)?;
    let key = load_key("tls.key", &tls.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ClientCertVerifier> = match &tls.client_ca {
        Some(path) => {
            let roots = load_roots("tls.client_ca", path)?;
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| invalid("tls.client_ca", path, e))?
        }
        None => Arc::new(PinnedClientCerts {
            provider: provider.clone(),
        }),
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("tls: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| ConfigError::Invalid(format!("tls.cert/tls.key: {e}")))?;
    Ok(Arc::new(config))
}

/// Accepts any client certificate whose holder proves possession of its key; which
/// certificates mean which connector is decided by the fingerprint pins afterwards.
#[derive(Debug)]
struct PinnedClientCerts {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for PinnedClientCerts {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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
