//! `host`: operator commands on the parent instance.
//!
//! ```text
//! host seal --kms-key-id ID --in MODEL --out SEALED [--name NAME] [--region R] [--endpoint-url URL]
//! host kms-policy --measurements FILE [--sealed SEALED | --model-sha256 HEX] [--include-pcr N]...
//!                 --owner-principal ARN --enclave-principal ARN [--immutable]
//! host kms-create-key --policy FILE [--immutable] [--description TEXT] [--region R] [--endpoint-url URL]
//! host provision --enclave unix:PATH|vsock:CID:PORT|hvsock:PATH:PORT --sealed SEALED [--region R] [--endpoint-url URL]
//! host serve [--config FILE] [--listen ADDR] [--admin-listen ADDR] [--enclave ADDR] [--sealed SEALED] [--api-keys F] [limits…]
//! host api-keys init-signer|issue|revoke|sign …      (host::apikeys)
//! ```

use clap::{Parser, Subcommand};
use common::sealed::{model_pcr16, SealedHeader, DEFAULT_CHUNK_SIZE};
use host::kms::KmsOptions;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "host",
    version,
    about = "Host relay and operator commands for the confidential inference enclave"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct KmsArgs {
    /// AWS region (default: from the environment or profile).
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    /// KMS endpoint override, e.g. http://127.0.0.1:4566 for mock-kms.
    #[arg(long, env = "KMS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
}

impl KmsArgs {
    fn options(&self) -> KmsOptions {
        KmsOptions {
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            static_credentials: None,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Seal a model file with a fresh KMS data key (GenerateDataKey, AES-256-GCM STREAM).
    Seal {
        /// KMS key id, ARN or alias.
        #[arg(long)]
        kms_key_id: String,
        /// The model file (e.g. a GGUF).
        #[arg(long = "in")]
        input: PathBuf,
        /// The sealed file to write (atomically).
        #[arg(long = "out")]
        output: PathBuf,
        /// Model name for the encryption context (default: the input's file name).
        #[arg(long)]
        name: Option<String>,
        /// Plaintext bytes per chunk.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        #[command(flatten)]
        kms: KmsArgs,
    },
    /// Create a symmetric KMS key with a key policy (the one `kms-policy` prints); prints its id.
    KmsCreateKey {
        /// The key policy (JSON).
        #[arg(long)]
        policy: PathBuf,
        /// The key's description.
        #[arg(long, default_value = "confidential inference: model data keys")]
        description: String,
        /// The policy grants nobody `PutKeyPolicy` (`kms-policy --immutable`): create it with
        /// BypassPolicyLockoutSafetyCheck, which KMS otherwise requires for such a policy.
        #[arg(long)]
        immutable: bool,
        #[command(flatten)]
        kms: KmsArgs,
    },
    /// Print a KMS key policy that releases the key only to the measured enclave.
    KmsPolicy {
        /// nitro-cli build-enclave / describe-eif output (or the mock's measurements file).
        #[arg(long)]
        measurements: PathBuf,
        /// Bind the key to this sealed model too (PCR16).
        #[arg(long, conflicts_with = "model_sha256")]
        sealed: Option<PathBuf>,
        /// Bind the key to the model with this SHA-256 (PCR16), hex.
        #[arg(long)]
        model_sha256: Option<String>,
        /// Also require these PCRs (3: IAM role, 4: instance, 8: signing certificate).
        #[arg(long = "include-pcr", value_parser = clap::value_parser!(u8).range(3..=8))]
        include: Vec<u8>,
        /// The model owner, who administers the key and seals with it, e.g.
        /// arn:aws:iam::111111111111:root. Must be outside the enclave principal's account
        /// unless --immutable.
        #[arg(long)]
        owner_principal: String,
        /// The principal that calls Decrypt for the enclave: the parent instance's role, e.g.
        /// arn:aws:iam::222222222222:role/parent. Its account gets nothing else.
        #[arg(long)]
        enclave_principal: String,
        /// Grant nobody administration: the key can never be changed, only sealed with and
        /// released to the enclave. Create it with `kms-create-key --immutable`.
        #[arg(long)]
        immutable: bool,
    },
    /// Run the relay: the client HTTP API, kept in front of a provisioned enclave.
    Serve(Box<ServeArgs>),
    /// Administer client API keys: the signer, the key list, the signed list for the relay.
    #[command(subcommand)]
    ApiKeys(ApiKeysCommand),
    /// Provision a running enclave with a sealed model (key release through KMS).
    Provision {
        /// Enclave address: vsock:CID:PORT, unix:PATH in local mode, or hvsock:PATH:PORT
        /// (an emulator's hybrid vsock socket).
        #[arg(long)]
        enclave: String,
        /// The sealed model.
        #[arg(long)]
        sealed: PathBuf,
        #[command(flatten)]
        kms: KmsArgs,
    },
}

/// `host api-keys` subcommands (offline, on the administrator's machine).
#[derive(Subcommand)]
enum ApiKeysCommand {
    /// Create the Ed25519 signer (PKCS#8, mode 0600); prints the public key for the
    /// enclave's --api-key-signer.
    InitSigner {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a signer's public key.
    Public {
        /// The signer's private key file.
        #[arg(long)]
        signer: PathBuf,
    },
    /// Add a key to the (unsigned) list and print it, once.
    Issue {
        /// The key list (JSON; created if missing).
        #[arg(long)]
        list: PathBuf,
        /// The key's id (A-Z a-z 0-9 -, up to 64).
        #[arg(long)]
        id: String,
        /// A model the key may use (repeat; default: all).
        #[arg(long = "model")]
        models: Vec<String>,
        /// Requests per minute (0: no limit).
        #[arg(long, default_value_t = 0)]
        rpm: u32,
        /// Prompt + completion tokens per minute (0: no limit).
        #[arg(long, default_value_t = 0)]
        tpm: u32,
    },
    /// Remove a key from the list (sign and deliver the list to take effect).
    Revoke {
        /// The key list.
        #[arg(long)]
        list: PathBuf,
        /// The key's id.
        #[arg(long)]
        id: String,
    },
    /// Sign the list with the next serial, for the relay's --api-keys.
    Sign {
        /// The key list.
        #[arg(long)]
        list: PathBuf,
        /// The signer's private key file.
        #[arg(long)]
        signer: PathBuf,
        /// Days until the signed list expires.
        #[arg(long, default_value_t = 30)]
        valid_days: u64,
        /// The signed file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

fn api_keys(cmd: ApiKeysCommand) -> Result<(), String> {
    use host::apikeys as a;
    match cmd {
        ApiKeysCommand::InitSigner { out } => {
            let public = a::init_signer(&out).map_err(|e| e.to_string())?;
            println!("{}", hex::encode(public));
        }
        ApiKeysCommand::Public { signer } => {
            let public = a::signer_public(&signer).map_err(|e| e.to_string())?;
            println!("{}", hex::encode(public));
        }
        ApiKeysCommand::Issue {
            list,
            id,
            models,
            rpm,
            tpm,
        } => {
            let key = a::issue_key(&list, &id, models, rpm, tpm).map_err(|e| e.to_string())?;
            println!("{}", key.expose());
        }
        ApiKeysCommand::Revoke { list, id } => {
            a::revoke_key(&list, &id).map_err(|e| e.to_string())?;
            eprintln!("revoked {id}: sign the list and deliver it for this to take effect");
        }
        ApiKeysCommand::Sign {
            list,
            signer,
            valid_days,
            out,
        } => {
            let now = common::clock::unix_seconds();
            let serial = a::sign_list(&list, &signer, &out, now, valid_days.saturating_mul(86_400))
                .map_err(|e| e.to_string())?;
            eprintln!("signed serial {serial} into {}", out.display());
        }
    }
    Ok(())
}

/// `host serve` flags. Each overrides the configuration file's value; defaults live in
/// `ServeConfig::default` only.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (unknown keys are refused).
    #[arg(long, env = "HOST_CONFIG")]
    config: Option<PathBuf>,
    /// Client listener address [default: 127.0.0.1:8000].
    #[arg(long, env = "HOST_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Operator listener for /metrics, /healthz and /readyz [default: 127.0.0.1:9464].
    #[arg(long, env = "HOST_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// The enclave: vsock:CID:PORT, unix:PATH in local mode, or hvsock:PATH:PORT (an
    /// emulator's hybrid vsock socket) [default: vsock:16:5000].
    #[arg(long, env = "HOST_ENCLAVE")]
    enclave: Option<String>,
    /// Sealed model to provision the enclave with, at start and whenever it restarts.
    #[arg(long, env = "HOST_SEALED")]
    sealed: Option<PathBuf>,
    /// TLS certificate chain (PEM) for the client listener.
    #[arg(long, env = "HOST_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "HOST_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Largest request body in bytes [default: 1 MiB].
    #[arg(long, env = "HOST_MAX_BODY_BYTES")]
    max_body_bytes: Option<u64>,
    /// Time for a client to send its request headers, ms [default: 10000].
    #[arg(long, env = "HOST_HEADER_TIMEOUT_MS")]
    header_timeout_ms: Option<u64>,
    /// Time for a client to send a whole request body, ms [default: 30000].
    #[arg(long, env = "HOST_BODY_TIMEOUT_MS")]
    body_timeout_ms: Option<u64>,
    /// Idle connection timeout, ms [default: 120000].
    #[arg(long, env = "HOST_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Requests in flight at once [default: 2048].
    #[arg(long, env = "HOST_MAX_IN_FLIGHT")]
    max_in_flight: Option<usize>,
    /// Requests in flight at once from one client IP [default: 64].
    #[arg(long, env = "HOST_MAX_IN_FLIGHT_PER_CLIENT")]
    max_in_flight_per_client: Option<usize>,
    /// A response the client stops reading is cut after this long, ms [default: 30000].
    #[arg(long, env = "HOST_WRITE_STALL_MS")]
    write_stall_ms: Option<u64>,
    /// Per-client sustained requests per second [default: 50].
    #[arg(long, env = "HOST_RATE_PER_SECOND")]
    rate_per_second: Option<f64>,
    /// Per-client burst [default: 100].
    #[arg(long, env = "HOST_RATE_BURST")]
    rate_burst: Option<f64>,
    /// Time for the enclave to answer, ms [default: 30000].
    #[arg(long, env = "HOST_ENCLAVE_TIMEOUT_MS")]
    enclave_timeout_ms: Option<u64>,
    /// Drain time on SIGTERM, ms [default: 30000].
    #[arg(long, env = "HOST_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// Relay worker threads, one single-threaded runtime each [default: 0, one per CPU].
    #[arg(long, env = "HOST_WORKERS")]
    workers: Option<usize>,
    /// Audit records as JSON lines to this file [default: the log].
    #[arg(long, env = "HOST_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Signed API key list to deliver to the enclave (and again whenever it changes).
    #[arg(long, env = "HOST_API_KEYS")]
    api_keys: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(flatten)]
    kms: KmsArgs,
}

impl ServeArgs {
    fn config(&self) -> Result<host::serve::config::ServeConfig, String> {
        let mut c = match &self.config {
            Some(path) => {
                host::serve::config::ServeConfig::from_file(path).map_err(|e| e.to_string())?
            }
            None => Default::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => {$(if let Some(v) = &self.$f { c.$f = v.clone(); })*};
        }
        macro_rules! set_opt {
            ($($f:ident),*) => {$(if self.$f.is_some() { c.$f = self.$f.clone(); })*};
        }
        set!(
            listen,
            admin_listen,
            enclave,
            max_body_bytes,
            header_timeout_ms,
            body_timeout_ms,
            idle_timeout_ms,
            max_in_flight,
            max_in_flight_per_client,
            write_stall_ms,
            rate_per_second,
            rate_burst,
            enclave_timeout_ms,
            shutdown_grace_ms
        );
        set_opt!(sealed, tls_cert, tls_key, audit_log, api_keys);
        if self.kms.region.is_some() {
            c.region = self.kms.region.clone();
        }
        if self.kms.endpoint_url.is_some() {
            c.endpoint_url = self.kms.endpoint_url.clone();
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

async fn serve(cfg: host::serve::config::ServeConfig) -> Result<(), String> {
    let kms = match &cfg.sealed {
        Some(sealed) => {
            read_sealed_header(sealed)?;
            Some(
                host::kms::client(&KmsOptions {
                    region: cfg.region.clone(),
                    endpoint_url: cfg.endpoint_url.clone(),
                    static_credentials: None,
                })
                .await,
            )
        }
        None => None,
    };
    let relay = host::serve::start(cfg, kms)
        .await
        .map_err(|e| e.to_string())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    relay.shutdown().await;
    Ok(())
}

fn read_sealed_header(path: &PathBuf) -> Result<SealedHeader, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = Vec::new();
    file.take(common::sealed::MAX_HEADER_LEN as u64)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    SealedHeader::decode(&buf)
        .map(|(h, _)| h)
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(args) => serve(args.config()?).await,
        Command::ApiKeys(cmd) => api_keys(cmd),
        Command::Seal {
            kms_key_id,
            input,
            output,
            name,
            chunk_size,
            kms,
        } => {
            let client = host::kms::client(&kms.options()).await;
            let name = name.unwrap_or_else(|| {
                input
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
            let req = host::seal::SealRequest {
                key_id: kms_key_id,
                input,
                output: output.clone(),
                name,
                chunk_size,
            };
            let summary = host::seal::seal_file(&client, &req)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "sealed {} ({} bytes, sha256 {}) with {} into {} ({} bytes)",
                req.name,
                summary.header.plaintext_size,
                hex::encode(summary.header.plaintext_sha256),
                summary.header.key_id,
                output.display(),
                summary.sealed_size
            );
            Ok(())
        }
        Command::KmsCreateKey {
            policy,
            description,
            immutable,
            kms,
        } => {
            let text = std::fs::read_to_string(&policy)
                .map_err(|e| format!("{}: {e}", policy.display()))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| format!("{}: not JSON: {e}", policy.display()))?;
            let client = host::kms::client(&kms.options()).await;
            let out = client
                .create_key()
                .policy(text)
                .description(description)
                .bypass_policy_lockout_safety_check(immutable)
                .send()
                .await
                .map_err(|e| format!("CreateKey: {}", host::kms::KmsFailure::from_sdk(&e)))?;
            let id = out
                .key_metadata
                .map(|m| m.key_id)
                .ok_or("CreateKey returned no key metadata")?;
            println!("{id}");
            Ok(())
        }
        Command::KmsPolicy {
            measurements,
            sealed,
            model_sha256,
            include,
            owner_principal,
            enclave_principal,
            immutable,
        } => {
            let text = std::fs::read_to_string(&measurements)
                .map_err(|e| format!("{}: {e}", measurements.display()))?;
            let m = host::policy::parse_measurements(&text).map_err(|e| e.to_string())?;
            let digest = match (sealed, model_sha256) {
                (Some(path), _) => Some(read_sealed_header(&path)?.plaintext_sha256),
                (None, Some(h)) => Some(
                    hex::decode(&h)
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or("--model-sha256 must be 64 hex digits")?,
                ),
                (None, None) => None,
            };
            let policy = host::policy::generate(&host::policy::PolicyRequest {
                measurements: m,
                include,
                model_pcr16: digest.as_ref().map(model_pcr16),
                owner_principal,
                enclave_principal,
                immutable,
            })
            .map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string_pretty(&policy).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Command::Provision {
            enclave,
            sealed,
            kms,
        } => {
            let endpoint: common::transport::Endpoint =
                enclave.parse().map_err(|e| format!("--enclave: {e}"))?;
            // Check the sealed file before touching the enclave.
            read_sealed_header(&sealed)?;
            let mut conn = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect {endpoint}: {e}"))?;
            let client = host::kms::client(&kms.options()).await;
            match host::provision::provision(&mut conn, &client, &sealed).await {
                Ok(p) => {
                    println!(
                        "enclave ready: model {} (sha256 {})",
                        p.model_name,
                        hex::encode(p.model_sha256)
                    );
                    Ok(())
                }
                // Name the KMS error first: it is what an operator acts on.
                Err(e) => Err(match e.kms_code() {
                    Some(code) => format!("key release refused by KMS: {code} ({e})"),
                    None => e.to_string(),
                }),
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Serve(a) if a.log_format == "json");
    common::cli::run_main_with("host", json, run(cli))
}
