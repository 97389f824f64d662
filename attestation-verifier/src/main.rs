//! `attestation-verifier`: verify or inspect an AWS Nitro Enclaves attestation document, or
//! compute an enclave image's PCRs (`measure --eif FILE`).
//!
//! Exit status: 0 the document is valid under the policy; 1 it was rejected (the reason on
//! stderr, and in the JSON with `--json`); 2 a usage or I/O error.

use attestation_verifier::{
    parse_hex, parse_pcr_index, parse_pcr_value, verify, Pcr, Policy, PolicyFile, TrustAnchor,
    UnixTime, UnverifiedDocument, VerifiedDocument,
};
use clap::{Parser, Subcommand};
use der::Decode;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "attestation-verifier",
    version,
    about = "Verify or inspect AWS Nitro Enclaves attestation documents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify a document: COSE envelope, certificate chain, ES384 signature, then the policy.
    Verify(VerifyArgs),
    /// Print every field of a document, without verifying anything.
    Inspect {
        /// File of raw COSE_Sign1 bytes, or `-` for standard input.
        doc: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compute an enclave image's PCR0, PCR1, PCR2 (and PCR8 if signed) as nitro-cli does.
    Measure {
        /// The enclave image file.
        #[arg(long)]
        eif: PathBuf,
    },
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// File of raw COSE_Sign1 bytes, or `-` for standard input.
    doc: PathBuf,
    /// PEM root certificate to trust instead of the embedded AWS Nitro root (repeatable).
    #[arg(long = "root", value_name = "PEM")]
    roots: Vec<PathBuf>,
    /// Verification time: RFC 3339, or integer milliseconds since the Unix epoch. Default: now.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Reject documents older than this many seconds.
    #[arg(long, value_name = "SECS")]
    max_age: Option<u64>,
    /// Allowed clock skew in seconds for documents timestamped in the future (default 60).
    #[arg(long, value_name = "SECS")]
    max_clock_skew: Option<u64>,
    /// Expected PCR value, 96 hex digits (repeatable).
    #[arg(long = "pcr", value_name = "N=HEX")]
    pcrs: Vec<String>,
    /// Accept debug-mode enclaves (PCR0, PCR1 and PCR2 all zero).
    #[arg(long)]
    allow_debug: bool,
    /// Expected nonce, hex.
    #[arg(long, value_name = "HEX")]
    nonce: Option<String>,
    /// Policy file (TOML, or JSON if it ends in .json); flags add to and override it.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

thread_local! {
    /// Standard output, written once at exit: a closed pipe (`| head`) must not panic the CLI.
    static OUT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `println!` into [`OUT`].
macro_rules! outln {
    ($($arg:tt)*) => {
        OUT.with(|o| {
            use std::fmt::Write as _;
            let _ = writeln!(o.borrow_mut(), $($arg)*);
        })
    };
}

fn flush_out() {
    use std::io::Write as _;
    let text = OUT.with(|o| std::mem::take(&mut *o.borrow_mut()));
    let mut stdout = std::io::stdout().lock();
    // A reader that went away is not our error.
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// A usage or I/O failure (exit 2), as opposed to a rejected document (exit 1).
struct UsageError(String);

impl<E: std::fmt::Display> From<E> for UsageError {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify(args) => run_verify(args),
        Command::Inspect { doc, json } => run_inspect(&doc, json),
        Command::Measure { eif } => run_measure(&eif),
    };
    flush_out();
    match result {
        Ok(code) => code,
        Err(UsageError(msg)) => {
            eprintln!("attestation-verifier: {msg}");
            ExitCode::from(2)
        }
    }
}

/// `measure --eif FILE`: nitro-cli's `describe-eif` measurements JSON on stdout.
fn run_measure(eif: &Path) -> Result<ExitCode, UsageError> {
    let m = attestation_verifier::eif::measure_file(eif)
        .map_err(|e| UsageError(format!("{}: {e}", eif.display())))?;
    if !m.crc_ok {
        return Err(UsageError(format!(
            "{}: the CRC-32 in the header does not match the file (corrupted?)",
            eif.display()
        )));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&m.to_json()).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

fn read_doc(path: &Path) -> Result<Vec<u8>, UsageError> {
    // One byte more than the verifier accepts, so an oversized input is reported as such
    // without reading an unbounded stream into memory.
    let limit = attestation_verifier::MAX_DOCUMENT_SIZE as u64 + 1;
    let mut buf = Vec::new();
    if path == Path::new("-") {
        std::io::stdin().take(limit).read_to_end(&mut buf)?;
    } else {
        std::fs::File::open(path)
            .map_err(|e| UsageError(format!("{}: {e}", path.display())))?
            .take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
    }
    Ok(buf)
}

fn parse_time(s: &str) -> Result<UnixTime, UsageError> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(UnixTime::from_millis(ms));
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            UsageError(format!(
                "--at {s:?}: neither RFC 3339 nor milliseconds: {e}"
            ))
        })?;
    let ms = u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| UsageError(format!("--at {s:?} is before 1970")))?;
    Ok(UnixTime::from_millis(ms))
}

fn fmt_ms(ms: u64) -> String {
    i128::from(ms)
        .checked_mul(1_000_000)
        .and_then(|ns| time::OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

fn build_policy(args: &VerifyArgs) -> Result<(Policy, Vec<TrustAnchor>), UsageError> {
    let file = match &args.policy {
        Some(path) => PolicyFile::load(path)?,
        None => PolicyFile::default(),
    };
    let mut policy = file.to_policy()?;
    let mut root_paths = file.roots.clone();
    if !args.roots.is_empty() {
        root_paths = args.roots.clone();
    }
    let mut anchors = Vec::new();
    for path in &root_paths {
        let pem =
            std::fs::read(path).map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
        anchors.push(
            TrustAnchor::from_pem(&pem)
                .map_err(|e| UsageError(format!("{}: {e}", path.display())))?,
        );
    }
    if anchors.is_empty() {
        anchors.push(TrustAnchor::aws_nitro_root());
    }
    for spec in &args.pcrs {
        let (index, value) = spec
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--pcr {spec:?}: expected N=HEX")))?;
        let index = parse_pcr_index(index)?;
        let value: Pcr = parse_pcr_value(&format!("--pcr {index}"), value)?;
        policy.pcrs.insert(index, value);
    }
    policy.allow_debug |= args.allow_debug;
    if let Some(secs) = args.max_age {
        policy.max_age = Some(Duration::from_secs(secs));
    }
    if let Some(secs) = args.max_clock_skew {
        policy.max_clock_skew = Duration::from_secs(secs);
    }
    if let Some(nonce) = &args.nonce {
        policy.nonce = Some(parse_hex("--nonce", nonce)?);
    }
    Ok((policy, anchors))
}

fn run_verify(args: VerifyArgs) -> Result<ExitCode, UsageError> {
    let (policy, anchors) = build_policy(&args)?;
    let now = match &args.at {
        Some(s) => parse_time(s)?,
        None => UnixTime::now(),
    };
    let bytes = read_doc(&args.doc)?;
    match verify(&bytes, &anchors, now, &policy) {
        Ok(doc) => {
            if args.json {
                outln!(
                    "{}",
                    json!({ "valid": true, "document": verified_json(&doc, &anchors) })
                );
            } else {
                print_verified(&doc, &anchors, now);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("REJECTED ({}): {e}", e.check());
            if args.json {
                outln!(
                    "{}",
                    json!({ "valid": false, "error": { "check": e.check(), "message": e.to_string() } })
                );
            }
            Ok(ExitCode::from(1))
        }
    }
}

fn pcrs_json(pcrs: &BTreeMap<u8, Pcr>) -> serde_json::Value {
    pcrs.iter()
        .map(|(i, v)| (i.to_string(), json!(hex::encode(v))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn verified_json(doc: &VerifiedDocument, anchors: &[TrustAnchor]) -> serde_json::Value {
    let root = anchors
        .get(doc.anchor_index())
        .map(|a| hex::encode(a.sha256()));
    json!({
        "module_id": doc.module_id(),
        "timestamp_ms": doc.timestamp().as_millis(),
        "timestamp": fmt_ms(doc.timestamp().as_millis()),
        "debug": doc.is_debug(),
        "root_sha256": root,
        "pcrs": pcrs_json(doc.pcrs()),
        "public_key": doc.public_key().map(hex::encode),
        "user_data": doc.user_data().map(hex::encode),
        "nonce": doc.nonce().map(hex::encode),
    })
}

fn print_verified(doc: &VerifiedDocument, anchors: &[TrustAnchor], now: UnixTime) {
    outln!(
        "VALID attestation document (verified at {})",
        fmt_ms(now.as_millis())
    );
    outln!("module_id:   {}", shown(doc.module_id()));
    outln!(
        "timestamp:   {} ({} ms)",
        fmt_ms(doc.timestamp().as_millis()),
        doc.timestamp().as_millis()
    );
    if let Some(a) = anchors.get(doc.anchor_index()) {
        outln!("root sha256: {}", hex::encode(a.sha256()));
    }
    outln!("debug mode:  {}", doc.is_debug());
    for (i, v) in doc.pcrs() {
        outln!("PCR{i:<2}       {}", hex::encode(v));
    }
    print_optional("public_key", doc.public_key());
    print_optional("user_data", doc.user_data());
    print_optional("nonce", doc.nonce());
}

/// Text from a document (its `module_id`, its certificates' names) as it may reach a terminal:
/// control characters escaped, so a forged document cannot move the cursor, retitle the
/// window or print a line that looks like a verdict.
fn shown(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn print_optional(name: &str, value: Option<&[u8]>) {
    match value {
        None => outln!("{name:<12} (none)"),
        Some(v) => {
            let text = std::str::from_utf8(v)
                .ok()
                .filter(|s| s.chars().all(|c| !c.is_control()));
            match text {
                Some(t) => outln!("{name:<12} {} (text: {t:?})", hex::encode(v)),
                None => outln!("{name:<12} {}", hex::encode(v)),
            }
        }
    }
}

fn cert_json(der: &[u8]) -> serde_json::Value {
    match x509_cert::Certificate::from_der(der) {
        Ok(c) => {
            let t = &c.tbs_certificate;
            let ms = |x: &x509_cert::time::Time| {
                u64::try_from(x.to_unix_duration().as_millis()).unwrap_or(u64::MAX)
            };
            json!({
                "subject": t.subject.to_string(),
                "issuer": t.issuer.to_string(),
                "not_before": fmt_ms(ms(&t.validity.not_before)),
                "not_after": fmt_ms(ms(&t.validity.not_after)),
                "serial": hex::encode(t.serial_number.as_bytes()),
            })
        }
        Err(e) => json!({ "error": format!("not a valid certificate: {e}") }),
    }
}

fn run_inspect(path: &Path, as_json: bool) -> Result<ExitCode, UsageError> {
    let bytes = read_doc(path)?;
    let doc = match UnverifiedDocument::parse(&bytes) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot parse ({}): {e}", e.check());
            return Ok(ExitCode::from(1));
        }
    };
    let f = doc.unverified();
    let certs: Vec<_> = f.cabundle.iter().map(|c| cert_json(c)).collect();
    let value = json!({
        "verified": false,
        "module_id": f.module_id,
        "timestamp_ms": f.timestamp,
        "timestamp": fmt_ms(f.timestamp),
        "digest": "SHA384",
        "pcrs": pcrs_json(&f.pcrs),
        "certificate": cert_json(&f.certificate),
        "cabundle": certs,
        "public_key": f.public_key.as_deref().map(hex::encode),
        "user_data": f.user_data.as_deref().map(hex::encode),
        "nonce": f.nonce.as_deref().map(hex::encode),
    });
    if as_json {
        outln!("{value}");
        return Ok(ExitCode::SUCCESS);
    }
    outln!("UNVERIFIED: these fields are printed as found; nothing here has been checked.");
    outln!("module_id:   {}", shown(&f.module_id));
    outln!("timestamp:   {} ({} ms)", fmt_ms(f.timestamp), f.timestamp);
    outln!("digest:      SHA384");
    for (i, v) in &f.pcrs {
        outln!("PCR{i:<2}       {}", hex::encode(v));
    }
    let show = |label: String, c: &serde_json::Value| {
        outln!("{label}");
        for k in ["subject", "issuer", "not_before", "not_after", "error"] {
            if let Some(v) = c.get(k).and_then(|v| v.as_str()) {
                outln!("    {k:<11} {}", shown(v));
            }
        }
    };
    for (i, c) in value
        .get("cabundle")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .enumerate()
    {
        show(format!("cabundle[{i}]:"), c);
    }
    show(
        "certificate:".into(),
        value.get("certificate").unwrap_or(&serde_json::Value::Null),
    );
    print_optional("public_key", f.public_key.as_deref());
    print_optional("user_data", f.user_data.as_deref());
    print_optional("nonce", f.nonce.as_deref());
    Ok(ExitCode::SUCCESS)
}
