//! `enclave`: the process inside the Nitro Enclave.
//!
//! ```text
//! enclave --listen unix:PATH [--max-model-bytes N]
//!         [--mock-ca DIR --mock-image LABEL [--mock-debug]]   (builds with the mock-nsm feature)
//! ```
//! It waits for the host to provision it with a sealed model, unseals it in memory, loads it into
//! the inference engine (then reports `Ready`), and logs content-free events. The client
//! endpoint arrives with the attested-channel issue.

use clap::Parser;
use common::nsm::Nsm;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "enclave", version, about = "Confidential inference enclave")]
struct Args {
    /// Where the host connects: unix:PATH in local mode.
    #[arg(long, env = "ENCLAVE_LISTEN")]
    listen: String,
    /// Largest model accepted, in bytes (the enclave's memory minus the KV caches).
    #[arg(long, env = "ENCLAVE_MAX_MODEL_BYTES", default_value_t = 8 << 30)]
    max_model_bytes: u64,
    /// Inference worker threads (default: the enclave's vCPUs).
    #[arg(long, env = "ENCLAVE_THREADS")]
    threads: Option<usize>,
    /// KV-cache memory shared by all running sequences, in MiB.
    #[arg(long, env = "ENCLAVE_KV_MIB", default_value_t = 80)]
    kv_mib: usize,
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

async fn run(args: Args) -> Result<(), String> {
    let nsm = open_nsm(&args)?;
    let path = PathBuf::from(
        args.listen
            .strip_prefix("unix:")
            .ok_or("--listen must be unix:PATH (vsock arrives with the relay)")?,
    );
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| format!("listen on {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "waiting for the host to provision a model");
    let mut cfg = engine::EngineConfig {
        kv_budget_bytes: args.kv_mib << 20,
        ..Default::default()
    };
    if let Some(t) = args.threads {
        cfg.threads = t;
    }
    let (engine, sha256, name) = loop {
        // A fresh key per attempt, made while no host is waiting on it.
        let recipient = enclave::provision::recipient_key()
            .await
            .map_err(|e| e.to_string())?;
        let (mut conn, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        let cfg = cfg.clone();
        let load = move |m: enclave::provision::LoadedModel| {
            let (sha256, name) = (m.sha256, m.name);
            engine::load(m.weights, cfg)
                .map(|e| (e, sha256, name))
                .map_err(|e| e.to_string())
        };
        match enclave::provision::provision_with(
            &mut conn,
            nsm.clone(),
            args.max_model_bytes,
            recipient,
            load,
        )
        .await
        {
            Ok(loaded) => break loaded,
            // Refuse to serve; say why, and let the host try again (e.g. after a policy fix).
            Err(e) => tracing::error!(error = %e, "provisioning failed; not serving"),
        }
    };
    tracing::info!(
        model = %name,
        sha256 = %hex::encode(sha256),
        context = engine.context_length(),
        kernels = engine::kernels::Kernels::detect().name(),
        "ready"
    );
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::cli::run_main("enclave", run(args))
}
