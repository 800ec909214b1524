//! Certificates, private keys and CA bundles read from PEM files, with errors that name the
//! configuration key and the file.

use crate::config::ConfigError;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub(super) fn invalid(
    what: &str,
    path: &std::path::Path,
    e: impl std::fmt::Display,
) -> ConfigError {
    ConfigError::Invalid(format!("{what} {}: {e}", path.display()))
}

/// The certificate chain in the PEM file `path`, the value of config key `what`.
pub(crate) fn load_certs(
    what: &str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(what, path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(what, path, e))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The private key in the PEM file `path`, the value of config key `what`.
pub(crate) fn load_key(
    what: &str,
    path: &std::path::Path,
) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| invalid(what, path, e))
}

/// The CA certificates in the PEM file `path`, the value of config key `what`.
pub(crate) fn load_roots(what: &str, path: &std::path::Path) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| invalid(what, path, e))? {
        let cert = cert.map_err(|e| invalid(what, path, e))?;
        roots.add(cert).map_err(|e| invalid(what, path, e))?;
    }
    if roots.is_empty() {
        return Err(invalid(what, path, "no certificate in the file"));
    }
    Ok(roots)
}
