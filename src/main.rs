//! The `mlbench` binary: parses flags, sets up logging, runs the command and maps errors to
//! exit statuses (2 for bad input, 1 for internal failures).

mod cli;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    mlbench::util::tune_allocator();
    mlbench::util::tune_threads();
    // `mlbench ... | head` ends quietly instead of panicking on a closed pipe.
    // SAFETY: `signal` with SIG_DFL installs no handler code of ours, and it is called before
    // other threads start, so nothing races on the signal table.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = cli::Cli::parse();
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("mlbench={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = cli::run(cli) {
        let interrupted = e.chain().any(|c| {
            matches!(
                c.downcast_ref(),
                Some(
                    mlbench::Error::Interrupted { .. }
                        | mlbench::Error::EvalInterrupted { .. }
                        | mlbench::Error::GridInterrupted { .. }
                )
            )
        });
        let user = e
            .chain()
            .find_map(|c| c.downcast_ref::<mlbench::Error>())
            .map(mlbench::Error::is_user_error)
            .unwrap_or(false);
        eprintln!("error: {e:#}");
        std::process::exit(match (interrupted, user) {
            (true, _) => 130,
            (false, true) => 2,
            (false, false) => 1,
        });
    }
}
