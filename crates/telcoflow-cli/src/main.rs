//! The `telcoflow` command: run a server, place and take simulated phone calls, run voice
//! agents on the Telcoflow SDK and try the whole path end to end.
//!
//! Each subcommand lives in `src/cmd/<name>.rs` and exposes `Args` (a `clap::Args`) and
//! `async fn run(Args) -> anyhow::Result<ExitCode>`. Adding one is one line in [`commands!`]
//! below.

mod wav;

use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;

/// Declares the subcommands: the `cmd` module tree, the clap enum and the dispatch.
macro_rules! commands {
    ($( $(#[$doc:meta])* $variant:ident => $module:ident, )*) => {
        /// One module per subcommand.
        mod cmd {
            $( pub(crate) mod $module; )*
        }

        /// The subcommands.
        #[derive(Debug, clap::Subcommand)]
        enum Command {
            $( $(#[$doc])* $variant(cmd::$module::Args), )*
        }

        impl Command {
            async fn run(self) -> anyhow::Result<ExitCode> {
                match self {
                    $( Self::$variant(args) => cmd::$module::run(args).await, )*
                }
            }
        }
    };
}

commands! {
    /// Run a Telcoflow server (development connector unless --config is given).
    Serve => serve,
    /// Dial a number as a simulated caller; play a WAV, record what the caller hears.
    Call => call,
    /// Wait at a number as a simulated phone (e.g. the destination of call.connect).
    Phone => phone,
    /// Run a voice agent on a server: echo the caller, or speak a WAV file.
    Agent => agent,
    /// Start a server, an echo agent and a simulated caller in this process; show the call.
    Demo => demo,
    /// Measure calls end to end: N callers against echo agents; CPU, memory, latency, losses.
    Bench => bench,
    /// The echo agent `telcoflow bench --agent rust` runs (Rust SDK).
    #[command(hide = true)]
    BenchAgent => bench_agent,
}

/// Telcoflow: connect voice applications to phone calls.
#[derive(Debug, Parser)]
#[command(name = "telcoflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr so stdout stays machine-readable (ready lines, JSON summaries).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command.run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("telcoflow: {e:#}");
            ExitCode::from(2)
        }
    }
}
