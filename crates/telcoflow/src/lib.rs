//! The Telcoflow Rust SDK (work in progress).
