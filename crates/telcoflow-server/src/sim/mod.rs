//! The simulated phone network: the embedded default "telephony" for development and tests.
//!
//! - `network`: the server side, the `/v1/sim/phone` endpoint where simulated phones dial and
//!   register.
//! - [`client`]: a simulated phone, the client side, used by `telcoflow call`, `telcoflow phone`
//!   and tests.

pub mod client;
pub(crate) mod network;
