//! `enclave`: the process inside the Nitro Enclave.
//!
//! ```text
//! enclave --listen unix:PATH|vsock:any:PORT [--max-model-bytes N] [--max-streams N] …
//!         [--guardrails FILE | --no-guardrails] [--api-key-signer HEX]
//!         [--mock-ca DIR --mock-image LABEL [--mock-debug]]   (builds with the mock-nsm feature)
//! enclave --print-config [same limits]
//! enclave --check-model MODEL.gguf [same limits]
//! ```
//! At boot it measures its runtime configuration into PCR17 and locks it, and generates its
//! OHTTP key. It waits for the host to provision it with a sealed model, unseals it in memory,
//! loads it into the inference engine (then reports `Ready`), and serves the host's control
//! connection, client attestation documents, and encrypted client requests
//! (`enclave::server`, `enclave::gateway`). `--print-config` prints the measured configuration,
//! its SHA-256 and PCR17, for the client policy, and exits. `--check-model` loads a plaintext
//! GGUF file as provisioning would, under the same limits, and says whether this enclave can
//! serve it and, if not, why: model owners and `make run` use it before sealing a model.

use clap::Parser;
use common::nsm::Nsm;
use common::transport::Endpoint;
use enclave::runtime::RuntimeConfig;
use enclave::server::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "enclave", version, about = "Confidential inference enclave")]
struct Args {
    /// Where the host connects: vsock:any:PORT on Nitro, unix:PATH in local mode.
    #[arg(long, env = "ENCLAVE_LISTEN", required_unless_present_any = ["print_config", "check_model"])]
    listen: Option<String>,
    /// Print the measured runtime configuration (JSON), its SHA-256 and PCR17, and exit.
    #[arg(long)]
    print_config: bool,
    /// Load this plaintext GGUF model as provisioning would, under the same limits, print
    /// what was loaded or why it cannot be served, and exit (2 if it cannot).
    #[arg(long, value_name = "MODEL.gguf", conflicts_with = "print_config")]
    check_model: Option<PathBuf>,
    /// Client request streams served at once; more get 503.
    #[arg(long, env = "ENCLAVE_MAX_STREAMS", default_value_t = Config::default().max_streams)]
    max_streams: usize,
    /// Largest client request body, in bytes.
    #[arg(long, env = "ENCLAVE_MAX_REQUEST_BYTES", default_value_t = Config::default().max_request_bytes)]
    max_request_bytes: usize,
    /// Connections from the host open at once; the next waits until one closes.
    #[arg(long, env = "ENCLAVE_MAX_CONNECTIONS", default_value_t = Config::default().max_connections)]
    max_connections: usize,
    /// A host connection that sends nothing for this long while a frame is awaited is closed, ms.
    #[arg(long, env = "ENCLAVE_IDLE_TIMEOUT_MS", default_value_t = Config::default().idle_timeout_ms)]
    idle_timeout_ms: u64,
    /// Largest model accepted, in bytes (the enclave's memory minus the KV caches).
    #[arg(long, env = "ENCLAVE_MAX_MODEL_BYTES", default_value_t = Config::default().max_model_bytes)]
    max_model_bytes: u64,
    /// Streamed tokens within this many ms of the last sealed chunk go out together.
    #[arg(long, env = "ENCLAVE_STREAM_FLUSH_MS", default_value_t = Config::default().stream_flush_ms)]
    stream_flush_ms: u64,
    /// Sealed response chunks are padded to a multiple of this many bytes (0: no padding), so
    /// their sizes do not show the tokens' lengths.
    #[arg(long, env = "ENCLAVE_STREAM_PAD_BYTES", default_value_t = Config::default().stream_pad_bytes)]
    stream_pad_bytes: usize,
    /// Inference worker threads (default: the enclave's vCPUs).
    #[arg(long, env = "ENCLAVE_THREADS")]
    threads: Option<usize>,
    /// KV-cache memory shared by all running sequences, in MiB.
    #[arg(long, env = "ENCLAVE_KV_MIB", default_value_t = Config::default().engine.kv_budget_bytes >> 20)]
    kv_mib: usize,
    /// The guardrail policy file (TOML; docs/guardrails.md). Without it the built-in default
    /// policy applies. Measured into PCR17. In an image, the file is part of the image.
    #[arg(long, env = "ENCLAVE_GUARDRAILS", conflicts_with = "no_guardrails")]
    guardrails: Option<PathBuf>,
    /// Run without guardrails (measured: clients see `"guardrails": null`).
    #[arg(long)]
    no_guardrails: bool,
    /// Require API keys from lists signed by this Ed25519 public key (64 hex digits; `host
    /// api-keys init-signer` makes one). Measured into PCR17.
    #[arg(long, env = "ENCLAVE_API_KEY_SIGNER")]
    api_key_signer: Option<String>,
    /// Use the mock NSM with the CA in this directory (local mode only).
    #[cfg(feature = "mock-nsm")]
    #[arg(long)]
    mock_ca: Option<PathBuf>,
    /// Image label the mock NSM derives PCR0-4 from (see `ImageMeasurement::from_label`).
    #[cfg(feature = "mock-nsm")]
    #[arg(long, default_value = "enclave")]
    mock_image: String,
    /// Run the mock NSM in debug mode (PCR0-2 zero).
    #[cfg(feature = "mock-nsm")]
    #[arg(long)]
    mock_debug: bool,
}

fn open_nsm(args: &Args) -> Result<Arc<dyn Nsm>, String> {
    #[cfg(feature = "mock-nsm")]
    if let Some(dir) = &args.mock_ca {
        use common::nsm::mock::{ImageMeasurement, MockNsm, MockNsmConfig};
        let ca = common::mock_ca::MockCa::load(dir).map_err(|e| format!("mock CA: {e}"))?;
        let mut config = MockNsmConfig::new(ImageMeasurement::from_label(&args.mock_image));
        config.debug = args.mock_debug;
        tracing::warn!("using the MOCK NSM: documents chain to the local mock CA, not to AWS");
        return Ok(Arc::new(
            MockNsm::new(ca, config).map_err(|e| format!("mock NSM: {e}"))?,
        ));
    }
    let _ = args;
    Ok(Arc::new(
        common::nsm::device::DeviceNsm::open().map_err(|e| e.to_string())?,
    ))
}

fn config(args: &Args) -> Result<Config, String> {
    let mut cfg = Config {
        max_model_bytes: args.max_model_bytes,
        max_streams: args.max_streams,
        max_request_bytes: args.max_request_bytes,
        max_connections: args.max_connections,
        idle_timeout_ms: args.idle_timeout_ms,
        stream_flush_ms: args.stream_flush_ms,
        stream_pad_bytes: args.stream_pad_bytes,
        ..Config::default()
    };
    cfg.engine.kv_budget_bytes = args.kv_mib << 20;
    if let Some(t) = args.threads {
        cfg.engine.threads = t;
    }
    if args.no_guardrails {
        cfg.guardrails = None;
    } else if let Some(path) = &args.guardrails {
        let bytes = read_bounded(path, guardrails::policy::MAX_POLICY_BYTES)
            .map_err(|e| format!("--guardrails {}: {e}", path.display()))?;
        let g = guardrails::Guardrails::from_toml(&bytes)
            .map_err(|e| format!("--guardrails {}: {e}", path.display()))?;
        cfg.guardrails = Some(Arc::new(g));
    } else if cfg.guardrails.is_none() {
        return Err("the built-in guardrail policy does not load".into());
    }
    if let Some(hex_key) = &args.api_key_signer {
        let key = hex::decode(hex_key.trim())
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or("--api-key-signer: expected 64 hex digits (an Ed25519 public key)")?;
        cfg.api_key_signer = Some(key);
    }
    Ok(cfg)
}

/// Reads at most `max` bytes of a file, refusing larger ones.
fn read_bounded(path: &std::path::Path, max: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(bytes)
}

async fn run(args: Args) -> Result<(), String> {
    let nsm = open_nsm(&args)?;
    let booted = enclave::boot(nsm, config(&args)?).map_err(|e| e.to_string())?;
    let listen = args.listen.as_deref().unwrap_or_default();
    let endpoint: Endpoint = listen.parse().map_err(|e| format!("--listen: {e}"))?;
    let listener = endpoint
        .bind()
        .map_err(|e| format!("listen on {endpoint}: {e}"))?;
    tracing::info!(
        config_sha256 = %hex::encode(booted.config_sha256),
        key_id = booted.key_id,
        "runtime configuration measured into PCR17; OHTTP key generated"
    );
    let enclave = booted.enclave;
    tracing::info!(%endpoint, "waiting for the host to provision a model");
    tokio::select! {
        r = enclave.serve(listener) => r.map_err(|e| format!("accept on {endpoint}: {e}")),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// `--print-config`: what an operator publishes for clients' policies.
fn print_config(args: &Args) -> ExitCode {
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("enclave: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = RuntimeConfig::of(&cfg);
    let json = String::from_utf8_lossy(&runtime.canonical()).into_owned();
    println!("{json}");
    println!("config_sha256 = \"{}\"", hex::encode(runtime.sha256()));
    println!("pcr17 = \"{}\"", hex::encode(runtime.pcr17()));
    ExitCode::SUCCESS
}

/// `--check-model`: the checks provisioning makes after unsealing (size, format, family,
/// tensor types, tokenizer, chat template, KV budget), on a plaintext file.
fn check_model(args: &Args, path: &std::path::Path) -> ExitCode {
    let fail = |e: String| {
        eprintln!("enclave: {}: {e}", path.display());
        ExitCode::from(2)
    };
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let limit = usize::try_from(cfg.max_model_bytes).unwrap_or(usize::MAX);
    let bytes = match read_bounded(path, limit) {
        Ok(b) => zeroize::Zeroizing::new(b),
        Err(e) => return fail(format!("{e} (--max-model-bytes)")),
    };
    let size = bytes.len();
    match engine::load(bytes, cfg.engine.clone()) {
        Ok(engine) => {
            println!(
                "{}: {} ({} MiB); context {} tokens in a {} MiB KV budget ({:.1} KiB per token)",
                path.display(),
                engine.describe(),
                size >> 20,
                engine.context_length(),
                cfg.engine.kv_budget_bytes >> 20,
                engine.kv_bytes_per_token() as f64 / 1024.0
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_config {
        return print_config(&args);
    }
    if let Some(path) = &args.check_model {
        return check_model(&args, path);
    }
    common::cli::run_main("enclave", run(args))
}
