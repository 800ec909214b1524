//! What each outbound SIP registration (`[[sip.registrations]]`) last reported: kept by the SIP
//! endpoint (`net::sip`), read by `GET /admin/v1/sip/registrations`.

use serde::Serialize;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use telcoflow_sip::sip::register::RegistrationState;

/// What one registration last reported, as the status route shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RegistrationStatus {
    pub(crate) registrar: String,
    pub(crate) aor: String,
    pub(crate) transport: &'static str,
    /// `registering`, `registered`, `failed`, `unregistering`, `unregistered`.
    pub(crate) state: &'static str,
    /// The lifetime the registrar granted, while registered.
    pub(crate) expires_secs: Option<u64>,
    /// The registrar's status of the latest failure (408: no answer).
    pub(crate) last_status: Option<u16>,
    /// Why the latest attempt failed.
    pub(crate) reason: Option<String>,
    /// Wait before the next attempt, after a failure.
    pub(crate) retry_in_secs: Option<u64>,
    /// When the state last changed, in seconds since the Unix epoch.
    pub(crate) since: u64,
}

/// Every registration's latest status, shared with the HTTP route.
#[derive(Debug, Default)]
pub(crate) struct RegistrationBoard(Mutex<Vec<RegistrationStatus>>);

impl RegistrationBoard {
    /// Starts over with these statuses (the registrations just started).
    pub(crate) fn reset(&self, all: Vec<RegistrationStatus>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = all;
    }

    /// A copy of every status, in config order.
    pub(crate) fn snapshot(&self) -> Vec<RegistrationStatus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, index: usize, state: &RegistrationState) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = all.get_mut(index) else {
            return;
        };
        s.state = state.name();
        s.since = unix_now();
        s.expires_secs = None;
        s.retry_in_secs = None;
        match state {
            RegistrationState::Registered { expires } => {
                s.expires_secs = Some(expires.as_secs());
                s.last_status = None;
                s.reason = None;
            }
            RegistrationState::Failed {
                status,
                reason,
                retry_in,
            } => {
                s.last_status = Some(*status);
                s.reason = Some(reason.clone());
                s.retry_in_secs = Some(retry_in.as_secs());
            }
            _ => {}
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
