//! The checks behind the fuzz targets. They live with the crates' own tests
//! (`crates/*/tests/oracle`), which run them on seeded mutations in `cargo test`; the targets
//! here run the same checks under libFuzzer.

/// SIP messages and stream framing, SDP, RTP and RTCP.
#[path = "../../crates/telcoflow-sip/tests/oracle/mod.rs"]
pub mod sip;

/// Control, media and simulated-phone frames, binary audio frames.
#[path = "../../crates/telcoflow-proto/tests/oracle/mod.rs"]
pub mod proto;
