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
        logs.event_format(Text).init();
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

/// The text log format: `2026-11-23T21:01:06.844363Z  INFO target: message key=value …`, as
/// tracing-subscriber's default but cheaper per line (the relay writes one per request): the
/// date is formatted once a second per thread, and integers, strings and booleans are written
/// directly rather than through `Debug`.
struct Text;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Text
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        SECOND.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.0 != now.as_secs() || cache.1.is_empty() {
                *cache = (now.as_secs(), utc_seconds(now.as_secs()));
            }
            w.write_str(&cache.1)
        })?;
        let meta = event.metadata();
        write!(
            w,
            ".{:06}Z {:>5} {}:",
            now.subsec_micros(),
            meta.level(),
            meta.target()
        )?;
        let mut fields = Fields {
            w: w.by_ref(),
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_char('\n')
    }
}

thread_local! {
    /// The last second formatted on this thread, and its text.
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC for seconds since the epoch (days to a civil date as in
/// Howard Hinnant's `civil_from_days`).
fn utc_seconds(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Writes an event's fields: the message first as it is, then ` key=value`.
struct Fields<'a> {
    w: tracing_subscriber::fmt::format::Writer<'a>,
    result: std::fmt::Result,
}

impl Fields<'_> {
    fn put(&mut self, field: &tracing::field::Field, value: std::fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            write!(self.w, " {value}")
        } else {
            write!(self.w, " {}={value}", field.name())
        };
    }
}

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.put(field, format_args!("{value}"));
        } else {
            self.put(field, format_args!("{value:?}"));
        }
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, format_args!("{value}"));
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, format_args!("{value}"));
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, format_args!("{value}"));
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_instants() {
        assert_eq!(utc_seconds(0), "1970-01-01T00:00:00");
        assert_eq!(utc_seconds(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(utc_seconds(1_795_462_866), "2026-11-23T19:41:06");
        assert_eq!(utc_seconds(4_107_542_399), "2100-02-28T23:59:59");
    }
}
