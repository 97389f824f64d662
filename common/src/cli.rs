//! The `main` every binary shares: logs to standard error (filtered by `RUST_LOG`, `info` by
//! default), a tokio runtime, and on failure one line `NAME: error` and exit status 1. Code
//! below `main` never reads the environment or prints; it returns errors with context.

use std::future::Future;
use std::process::ExitCode;

/// Runs `work` to completion and turns its result into the process's exit status. Logs are
/// text unless `LOG_FORMAT=json`.
pub fn run_main<F>(name: &str, work: F) -> ExitCode
where
    F: Future<Output = Result<(), String>>,
{
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    run_main_with(name, json, work)
}

/// [`run_main`] with the log format chosen by the caller: one JSON object per line, or text.
pub fn run_main_with<F>(name: &str, json: bool, work: F) -> ExitCode
where
    F: Future<Output = Result<(), String>>,
{
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
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
