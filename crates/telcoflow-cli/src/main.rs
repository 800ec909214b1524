//! The `telcoflow` command.
fn main() {}
