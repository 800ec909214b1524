//! A test CA made at test time (rcgen) and certificates it issues, written as PEM files for
//! the server's `[sip] tls_*` keys and for the peers (baresip, HAProxy).
#![allow(dead_code, unreachable_pub)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};

pub struct Pki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// PEM files of one certificate.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one file (baresip's `sip_certificate`).
    pub both: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Names of their own: with rcgen's default name on both, OpenSSL (HAProxy, baresip)
        // takes the issued certificate for a self-signed one.
        params
            .distinguished_name
            .push(DnType::CommonName, "telcoflow test CA");
        let ca = params.self_signed(&key).unwrap();
        Self {
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate to `dir/<name>` and returns its path.
    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    /// A certificate for `names` (DNS names or IP addresses), written in `dir` as
    /// `<stem>.pem`, `<stem>-key.pem` and `<stem>-both.pem`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Issued {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issued = Issued {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
            both: dir.join(format!("{stem}-both.pem")),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        std::fs::write(
            &issued.both,
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )
        .unwrap();
        issued
    }
}
