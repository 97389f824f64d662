//! `host`: operator commands on the parent instance.
//!
//! ```text
//! host seal --kms-key-id ID --in MODEL --out SEALED [--name NAME] [--region R] [--endpoint-url URL]
//! host kms-policy --measurements FILE [--sealed SEALED | --model-sha256 HEX] [--include-pcr N]...
//! host provision --enclave unix:PATH --sealed SEALED [--region R] [--endpoint-url URL]
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
        /// AWS account id.
        #[arg(long, default_value = "000000000000")]
        account: String,
        /// Principal allowed to administer the key and seal (default: the account root).
        #[arg(long)]
        admin_principal: Option<String>,
        /// Principal that calls Decrypt for the enclave, e.g. the parent instance role.
        #[arg(long)]
        enclave_principal: Option<String>,
    },
    /// Provision a running enclave with a sealed model (key release through KMS).
    Provision {
        /// Enclave address: unix:PATH (local mode).
        #[arg(long)]
        enclave: String,
        /// The sealed model.
        #[arg(long)]
        sealed: PathBuf,
        #[command(flatten)]
        kms: KmsArgs,
    },
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
        Command::KmsPolicy {
            measurements,
            sealed,
            model_sha256,
            include,
            account,
            admin_principal,
            enclave_principal,
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
                account,
                admin_principal,
                enclave_principal,
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
            let path = enclave
                .strip_prefix("unix:")
                .ok_or("--enclave must be unix:PATH (vsock arrives with the relay)")?;
            // Check the sealed file before touching the enclave.
            read_sealed_header(&sealed)?;
            let mut conn = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("connect {path}: {e}"))?;
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
    common::cli::run_main("host", run(cli))
}
