//! The `main` every binary shares: logs to standard error (filtered by `RUST_LOG`, `info` by
//! default), a tokio runtime, and on failure one line `NAME: error` and exit status 1. Code
//! below `main` never reads the environment or prints; it returns errors with context.

use std::future::Future;
use std::process::ExitCode;

/// Runs `work` to completion and turns its result into the process's exit status.
pub fn run_main<F>(name: &str, work: F) -> ExitCode
where
    F: Future<Output = Result<(), String>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
