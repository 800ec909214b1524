//! Connector authentication by `x-api-key` + `x-connector-uuid`, shared by the control plane
//! and the HTTP API.

use crate::config::ConnectorConfig;
use crate::state::Shared;
use crate::tls::PeerInfo;
use axum::http::HeaderMap;
use std::sync::Arc;
use telcoflow_proto::control::{API_KEY_HEADER, CONNECTOR_HEADER};

/// Why credentials were refused; the text is what the client is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("missing x-api-key header")]
    MissingKey,
    #[error("missing x-connector-uuid header")]
    MissingConnector,
    #[error("unknown connector or wrong API key")]
    Rejected,
    #[error("the client certificate is not registered for any connector")]
    UnknownCertificate,
}

pub(crate) fn authenticate(
    shared: &Shared,
    headers: &HeaderMap,
    peer: &PeerInfo,
) -> Result<Arc<ConnectorConfig>, AuthError> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    let Some(key) = header(API_KEY_HEADER) else {
        // No API key: a pinned client certificate may stand in for it.
        return match &peer.cert_sha256 {
            Some(fp) => shared
                .connector_by_cert(fp)
                .ok_or(AuthError::UnknownCertificate),
            None => Err(AuthError::MissingKey),
        };
    };
    let uuid = header(CONNECTOR_HEADER).ok_or(AuthError::MissingConnector)?;
    // One message for both an unknown connector and a wrong key, so that a caller cannot probe
    // which connector ids exist; the key comparison takes the same time wherever it differs.
    let connector = shared.connector(uuid).ok_or(AuthError::Rejected)?;
    if constant_time_eq(connector.api_key.as_bytes(), key.as_bytes()) {
        Ok(connector.clone())
    } else {
        Err(AuthError::Rejected)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
