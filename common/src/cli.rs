//! The `main` every binary shares: logs to standard error (filtered by `RUST_LOG`, `info` by
//! default), a tokio runtime, and on failure one line `NAME: error` and exit status 1. Code
//! below `main` never reads the environment or prints; it returns errors with context.
//!
//! Log lines go into a buffer of the thread that logs them, and a writer thread sweeps the
//! buffers every 10 ms and writes them out in one batch: a request's log line costs an
//! uncontended lock and a copy on the serving thread, not a `write(2)`. A buffer that reaches
//! 1 MiB is written out by its own thread (backpressure, never a lost line), and `main`
//! sweeps once more before exit.

use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};

/// Bytes a thread may buffer before it writes them itself.
const MAX_BUFFERED: usize = 1 << 20;

type Buffer = Arc<Mutex<Vec<u8>>>;

/// Every thread's log buffer.
fn buffers() -> &'static Mutex<Vec<Buffer>> {
    static ALL: OnceLock<Mutex<Vec<Buffer>>> = OnceLock::new();
    ALL.get_or_init(|| Mutex::new(Vec::new()))
}

thread_local! {
    /// This thread's buffer, registered on first use.
    static MINE: Buffer = {
        let b: Buffer = Arc::default();
        buffers().lock().unwrap_or_else(|e| e.into_inner()).push(b.clone());
        b
    };
}

/// Writes `bytes` to standard error (a failure to log has nowhere to be reported).
fn emit(bytes: &[u8]) {
    let _ = std::io::stderr().lock().write_all(bytes);
}

/// Writes out every buffer, and forgets the buffers of threads that have ended.
fn sweep(scratch: &mut Vec<u8>) {
    let mut all = buffers().lock().unwrap_or_else(|e| e.into_inner());
    for b in all.iter() {
        std::mem::swap(&mut *b.lock().unwrap_or_else(|e| e.into_inner()), scratch);
        if !scratch.is_empty() {
            emit(scratch);
            scratch.clear();
        }
    }
    // Only the list holds the buffer of a thread that has exited, and it is empty now.
    all.retain(|b| Arc::strong_count(b) > 1);
}

/// The `MakeWriter` for the formatter: each event's line goes to this thread's buffer.
struct Background;

/// Appends to this thread's buffer.
struct Line;

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        MINE.with(|mine| {
            let mut buf = mine.lock().unwrap_or_else(|e| e.into_inner());
            buf.extend_from_slice(b);
            if buf.len() >= MAX_BUFFERED {
                emit(&buf);
                buf.clear();
            }
        });
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Background {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// The writer thread: a sweep every 10 ms.
fn write_lines() {
    let mut scratch = Vec::new();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(10));
        sweep(&mut scratch);
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
    // Detached: it sleeps between sweeps, and `main` sweeps a last time itself.
    let _ = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(write_lines);
    // Colours only for a terminal: escape codes in a log file are noise (and cost).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(Background);
    if json {
        logs.json().init();
    } else {
        logs.event_format(Text).init();
    }
    let code = run_runtime(name, work);
    sweep(&mut Vec::new());
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
        let now = crate::clock::since_epoch().unwrap_or_default();
        SECOND.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.0 != now.as_secs() || cache.1.is_empty() {
                *cache = (now.as_secs(), utc_seconds(now.as_secs()));
            }
            w.write_str(&cache.1)
        })?;
        let meta = event.metadata();
        w.write_char('.')?;
        put_padded(&mut w, u64::from(now.subsec_micros()), 6)?;
        w.write_str(match *meta.level() {
            tracing::Level::ERROR => "Z ERROR ",
            tracing::Level::WARN => "Z  WARN ",
            tracing::Level::INFO => "Z  INFO ",
            tracing::Level::DEBUG => "Z DEBUG ",
            tracing::Level::TRACE => "Z TRACE ",
        })?;
        w.write_str(meta.target())?;
        w.write_char(':')?;
        let mut fields = Fields {
            w: w.by_ref(),
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_char('\n')
    }
}

/// Writes `v` in decimal, zero-padded to `width` digits, without `core::fmt` (a tenth of
/// the instructions, and the relay writes several integers per request).
fn put_padded(w: &mut impl std::fmt::Write, mut v: u64, width: usize) -> std::fmt::Result {
    let mut buf = [b'0'; 20];
    let mut start = buf.len();
    while v > 0 || start == buf.len() {
        start -= 1;
        if let Some(d) = buf.get_mut(start) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
    }
    let start = start.min(buf.len().saturating_sub(width));
    w.write_str(std::str::from_utf8(buf.get(start..).unwrap_or_default()).unwrap_or_default())
}

/// Whether `Debug` would print `s` as it is between quotes: printable ASCII, no quote or
/// backslash.
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
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
    /// Writes ` key=` (nothing for the message), then the value with `value`.
    fn put(
        &mut self,
        field: &tracing::field::Field,
        value: impl FnOnce(&mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result,
    ) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.w.write_char(' ')?;
            if field.name() != "message" {
                self.w.write_str(field.name())?;
                self.w.write_char('=')?;
            }
            value(&mut self.w)
        })();
    }
}

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.put(field, |w| w.write_str(value));
        } else if plain(value) {
            self.put(field, |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            });
        } else {
            // Escaped, so a value cannot forge a line or a field.
            self.put(field, |w| write!(w, "{value:?}"));
        }
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, |w| put_padded(w, value, 1));
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, |w| {
            if value < 0 {
                w.write_char('-')?;
            }
            put_padded(w, value.unsigned_abs(), 1)
        });
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, |w| w.write_str(if value { "true" } else { "false" }));
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        // `%x` fields and the message arrive here too, as Display text: a model name from a
        // sealed header or a KMS error message is the host's to choose, so nothing written
        // here may break the line or pass for another field.
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.put(field, |w| put_without_controls(w, &text));
        } else if one_token(&text) {
            self.put(field, |w| w.write_str(&text));
        } else {
            self.put(field, |w| write!(w, "{text:?}"));
        }
    }
}

/// Writes `s` with its control characters escaped as `Debug` escapes them (a message keeps
/// its quotes and spaces; only a line break or a terminal escape could forge anything).
fn put_without_controls(w: &mut impl std::fmt::Write, s: &str) -> std::fmt::Result {
    for c in s.chars() {
        if c.is_control() {
            write!(w, "{}", c.escape_debug())?;
        } else {
            w.write_char(c)?;
        }
    }
    Ok(())
}

/// Whether a field value's text can be written as it is and still read back as one value: a
/// bare word (no space, quote, `=`, backslash or control character: numbers, durations,
/// `Some(3)`), or a string as `Debug` quotes it (every inner quote escaped, no control
/// characters, so it ends where its closing quote is).
fn one_token(s: &str) -> bool {
    let bare = !s.is_empty()
        && s.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '=' | '\\'));
    bare || quoted(s)
}

/// Whether `s` is one `"…"` string with every inner quote and backslash escaped.
fn quoted(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return false;
    };
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            // The guard consumes the escaped character; a trailing backslash escapes nothing.
            '\\' if chars.next().is_none() => return false,
            '"' => return false,
            c if c.is_control() => return false,
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_strings_print_as_display_and_debug_do() {
        for (v, width) in [
            (0u64, 1),
            (7, 1),
            (42, 6),
            (999_999, 6),
            (u64::MAX, 1),
            (12, 1),
        ] {
            let mut s = String::new();
            put_padded(&mut s, v, width).unwrap();
            assert_eq!(s, format!("{v:0width$}"));
        }
        // The fast path is taken only where Debug would add nothing but the quotes.
        for text in ["/v1/ohttp", "a b", "", "~"] {
            assert!(plain(text), "{text:?}");
            assert_eq!(format!("{text:?}"), format!("\"{text}\""));
        }
        for text in ["quote\"", "back\\slash", "line\nbreak", "tab\t", "\u{7f}"] {
            assert!(!plain(text), "{text:?}");
        }
    }

    #[test]
    fn only_values_that_read_back_as_one_token_are_written_bare() {
        for bare in [
            "0.5",
            "12ms",
            "Some(3)",
            "[1,2]",
            "\"a b\"",
            "\"a\\\"b\"",
            "\"é\"",
        ] {
            assert!(one_token(bare), "{bare}");
        }
        for not in [
            "",
            "a b",
            "x admin=true",
            "a=b",
            "\"a\" admin=\"b\"",
            "\"a\\\"",
            "line\nbreak",
            "\"line\nbreak\"",
            "\u{1b}[2J",
            "\"",
        ] {
            assert!(!one_token(not), "{not:?}");
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_has_the_time_level_target_message_and_fields() {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .event_format(Text)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                id = 7u64,
                n = -3i64,
                ok = true,
                route = "/v1/ohttp",
                note = "a\"b\nc",
                "request"
            );
            // Display fields and the message carry host-chosen text (a model name, a KMS
            // error): they may neither start a line nor pass for another field.
            let name = "m\n2026-01-01T00:00:00.000000Z  INFO forged: x";
            let kms = "denied\" admin=\"true";
            tracing::warn!(model = %name, error = %kms, n = ?3, s = ?"q", "seal {name}");
            tracing::warn!(ratio = 0.5, "slow");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for line in &lines {
            let (stamp, _) = line.split_at(27);
            let b = stamp.as_bytes();
            assert!(
                stamp.ends_with('Z') && b[10] == b'T' && b[19] == b'.',
                "{line}"
            );
            assert!(stamp[20..26].bytes().all(|c| c.is_ascii_digit()), "{line}");
        }
        assert_eq!(
            &lines[0][27..],
            r#"  INFO common::cli::tests: request id=7 n=-3 ok=true route="/v1/ohttp" note="a\"b\nc""#
        );
        assert_eq!(
            &lines[1][27..],
            r#"  WARN common::cli::tests: seal m\n2026-01-01T00:00:00.000000Z  INFO forged: x model="m\n2026-01-01T00:00:00.000000Z  INFO forged: x" error="denied\" admin=\"true" n=3 s="q""#
        );
        assert_eq!(&lines[2][27..], "  WARN common::cli::tests: slow ratio=0.5");
    }

    #[test]
    fn civil_dates_match_known_instants() {
        assert_eq!(utc_seconds(0), "1970-01-01T00:00:00");
        assert_eq!(utc_seconds(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(utc_seconds(1_795_462_866), "2026-11-23T19:41:06");
        assert_eq!(utc_seconds(4_107_542_399), "2100-02-28T23:59:59");
    }
}
