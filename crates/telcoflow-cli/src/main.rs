//! The `telcoflow` command: run a server, place and take simulated phone calls, run voice
//! agents on the Telcoflow SDK and try the whole path end to end.
//!
//! Each subcommand lives in `src/cmd/<name>.rs` and exposes `Args` (a `clap::Args`) and
//! `async fn run(Args) -> anyhow::Result<ExitCode>`. Adding one is its `mod` line in
//! `src/cmd.rs` and one line in the `commands!` invocation below, which declares [`Command`]
//! and its dispatch.

mod cmd;
mod log;
mod wav;

use clap::Parser;
use std::process::ExitCode;

/// Declares the subcommands: the clap enum and the dispatch.
macro_rules! commands {
    ($( $(#[$doc:meta])* $variant:ident => $module:ident, )*) => {
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
    /// Validate a configuration file and print what the server would do, without starting it.
    Check => check,
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
    /// Runtime worker threads: 1 runs everything on the main thread, 0 one per core
    /// [default: 1 for bench-agent, else 0].
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Log format on stderr: text, or json (one JSON object per line, with the call's
    /// call_id and session_id as fields).
    #[arg(long, global = true, value_enum, default_value_t = log::LogFormat::Text)]
    log_format: log::LogFormat,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Worker threads of the runtime: the echo agent the bench runs is single-threaded like the
    /// Python SDK's asyncio loop it is compared with (and one thread spares it the cross-thread
    /// wake-ups that cost more than its frames); everything else uses every core.
    fn threads(&self) -> usize {
        let default = match self.command {
            Command::BenchAgent(_) => 1,
            _ => 0,
        };
        self.threads.unwrap_or(default)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match cli.threads() {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b.enable_all().build()
        }
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("telcoflow: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    // Logs go to stderr so stdout stays machine-readable (ready lines, JSON summaries).
    log::init(cli.log_format);
    match cli.command.run().await {
        Ok(code) => code,
        Err(e) => {
            if cli.log_format == log::LogFormat::Json {
                // A log collector reads stderr as JSON lines: the error is one of them.
                tracing::error!("{e:#}");
            } else {
                eprintln!("telcoflow: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(args: &[&str]) -> usize {
        Cli::try_parse_from(args)
            .expect("arguments parse")
            .threads()
    }

    #[test]
    fn the_bench_agent_runs_on_one_thread_unless_told() {
        assert_eq!(threads(&["telcoflow", "bench-agent"]), 1);
        assert_eq!(threads(&["telcoflow", "bench-agent", "--threads", "0"]), 0);
        assert_eq!(threads(&["telcoflow", "--threads", "3", "bench-agent"]), 3);
    }

    #[test]
    fn other_commands_use_every_core_unless_told() {
        assert_eq!(threads(&["telcoflow", "serve"]), 0);
        assert_eq!(threads(&["telcoflow", "serve", "--threads", "1"]), 1);
    }
}
