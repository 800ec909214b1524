//! Connector authentication by `x-api-key` + `x-connector-uuid`, shared by the control plane,
//! the HTTP API and the simulated phone endpoint (which also takes them in the query).

use crate::config::ConnectorConfig;
use crate::net::sim::Admission;
use crate::state::Shared;
use crate::tls::PeerInfo;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
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
    shared.check_key(uuid, key).ok_or(AuthError::Rejected)
}

/// Credentials in the query string, for browsers, which cannot set headers on a WebSocket.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct PhoneQuery {
    api_key: Option<String>,
    connector_uuid: Option<String>,
    /// `frame`: the phone authenticates in its first frame (`AuthFrame`), after the upgrade.
    auth: Option<String>,
}

/// Decides whether a simulated phone may connect at all, before the upgrade: the endpoint must
/// be on, and outside development on loopback the phone must authenticate as a connector.
pub(crate) fn admit_phone(
    shared: &Shared,
    headers: &HeaderMap,
    query: &PhoneQuery,
    peer: &PeerInfo,
) -> Result<Admission, (StatusCode, String)> {
    if !shared.config.sim.enabled {
        return Err((
            StatusCode::FORBIDDEN,
            "simulated phones are off on this server ([sim] enabled = true turns them on)".into(),
        ));
    }
    match query.auth.as_deref() {
        None => {}
        // Checked after the upgrade, where a refusal can say why in a close frame a browser
        // can read (it sees nothing of a refused upgrade).
        Some("frame") => return Ok(Admission::InFrame),
        Some(other) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "auth={other} is not an option: auth=frame authenticates in the first frame"
                ),
            ));
        }
    }
    let open = shared.config.sim.development && shared.config.listen.ip().is_loopback();
    let mut headers = headers.clone();
    // Query credentials stand in for headers that are absent; headers win when both are there.
    for (name, value) in [
        (API_KEY_HEADER, &query.api_key),
        (CONNECTOR_HEADER, &query.connector_uuid),
    ] {
        if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.entry(name).or_insert(v);
        }
    }
    let offered = headers.contains_key(API_KEY_HEADER) || peer.cert_sha256.is_some();
    if open && !offered {
        return Ok(Admission::Open);
    }
    match authenticate(shared, &headers, peer) {
        Ok(connector) => Ok(Admission::Connector(connector)),
        // A development server ignores a certificate it does not know rather than refuse.
        Err(_) if open && !headers.contains_key(API_KEY_HEADER) => Ok(Admission::Open),
        Err(e) if !offered => Err((
            StatusCode::UNAUTHORIZED,
            format!(
                "{e}: simulated phones on this server authenticate as a connector (x-api-key and x-connector-uuid headers, or ?api_key=&connector_uuid=)"
            ),
        )),
        Err(e) => Err((StatusCode::UNAUTHORIZED, e.to_string())),
    }
}
