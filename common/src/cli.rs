//! The `main` every binary shares: logs to standard error (filtered by `RUST_LOG`, `info` by
//! default), a tokio runtime, and on failure one line `NAME: error` and exit status 1. Code
//! below `main` never reads the environment or prints; it returns errors with context.
//!
//! Log lines are handed to a writer thread that writes them in batches at most every 10 ms: a
//! request's log line costs a channel send on the serving thread instead of a `write(2)`. The channel is bounded
//! (a full one blocks the logger rather than drop lines), and `main` drains it before exit.

use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Lines queued for the writer thread before loggers wait.
const LOG_QUEUE: usize = 16_384;

/// Hands each event's formatted line to the writer thread.
struct Background(SyncSender<Vec<u8>>);

/// One event's line, sent when the formatter is done with it.
struct Line {
    buf: Vec<u8>,
    tx: SyncSender<Vec<u8>>,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.tx.send(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Background {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::with_capacity(256),
            tx: self.0.clone(),
        }
    }
}

/// Writes queued lines to standard error, a batch per wake-up, until every sender is gone. An
/// empty line asks for an acknowledgement once everything before it is written.
fn write_lines(rx: Receiver<Vec<u8>>, ack: SyncSender<()>) {
    let stderr = std::io::stderr();
    let mut out = std::io::BufWriter::with_capacity(64 << 10, stderr.lock());
    while let Ok(first) = rx.recv() {
        let mut flushed = first.is_empty();
        let _ = out.write_all(&first);
        while let Ok(more) = rx.try_recv() {
            flushed |= more.is_empty();
            let _ = out.write_all(&more);
        }
        let _ = out.flush();
        if flushed {
            let _ = ack.try_send(());
        }
        // Let lines gather instead of waking for each one: loggers do not wake a writer
        // that is not waiting.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

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
    let (tx, rx) = sync_channel(LOG_QUEUE);
    let (ack_tx, ack_rx) = sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_lines(rx, ack_tx));
    // Colours only for a terminal: escape codes in a log file are noise (and cost).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(Background(tx.clone()));
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    let code = run_runtime(name, work);
    // An empty line is the flush marker: wait until everything before it is written.
    if spawned.is_ok() && tx.send(Vec::new()).is_ok() {
        let _ = ack_rx.recv_timeout(std::time::Duration::from_secs(2));
    }
    code
}

fn run_runtime<F>(name: &str, work: F) -> ExitCode
where
    F: Future<Output = Result<(), String>>,
{
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
