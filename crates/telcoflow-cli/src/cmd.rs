//! One module per subcommand (declared here rather than inside the `commands!` macro so that
//! the tools that walk the module tree, `cargo fmt` among them, see them).

pub(crate) mod agent;
pub(crate) mod bench;
pub(crate) mod bench_agent;
pub(crate) mod call;
pub(crate) mod check;
pub(crate) mod demo;
pub(crate) mod phone;
pub(crate) mod serve;
