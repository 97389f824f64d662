//! `mock-kms --listen ADDR --state-dir DIR [--trust-root PEM]... [--principal KEY=ARN]...`: a
//! local KMS for tests and local runs. Point any AWS SDK at it with an endpoint override (e.g.
//! `--endpoint-url`).

use attestation_verifier::TrustAnchor;
use clap::Parser;
use context::Context as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Adds what was being done to an error, for the one message the binary prints.
mod context {
    pub trait Context<T> {
        fn context(self, what: impl std::fmt::Display) -> Result<T, String>;
    }
    impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
        fn context(self, what: impl std::fmt::Display) -> Result<T, String> {
            self.map_err(|e| format!("{what}: {e}"))
        }
    }
}

#[derive(Parser)]
#[command(
    name = "mock-kms",
    version,
    about = "A local AWS KMS with Nitro Enclaves Recipient support"
)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:4566.
    #[arg(long, env = "MOCK_KMS_LISTEN", default_value = "127.0.0.1:4566")]
    listen: String,
    /// Directory for keys, policies and aliases (created if missing).
    #[arg(long, env = "MOCK_KMS_STATE_DIR")]
    state_dir: PathBuf,
    /// Extra root certificate (PEM) to trust for attestation documents, besides the AWS
    /// Nitro root: the mock NSM's CA in local mode. Repeatable.
    #[arg(long = "trust-root", value_name = "PEM")]
    trust_roots: Vec<PathBuf>,
    /// Map a SigV4 access key id to an IAM principal, e.g.
    /// `AKIDOWNER=arn:aws:iam::111111111111:user/model-owner`. Repeatable. Once any is given,
    /// requests signed with other access keys are refused (UnrecognizedClientException);
    /// with none, every caller is the root of account 000000000000.
    #[arg(long = "principal", value_name = "ACCESS_KEY_ID=ARN")]
    principals: Vec<String>,
    /// Region named in key ARNs.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
}

async fn run(args: Args) -> Result<(), String> {
    let mut roots = Vec::new();
    for path in &args.trust_roots {
        let pem = std::fs::read(path).context(path.display())?;
        roots.push(TrustAnchor::from_pem(&pem).context(path.display())?);
    }
    let mut identities = mock_kms::identity::Identities::anyone_is_default_root();
    for mapping in &args.principals {
        identities.add_mapping(mapping).context("--principal")?;
    }
    let kms = Kms::open(&args.state_dir, roots, &args.region)
        .context(args.state_dir.display())?
        .with_identities(identities);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .context(format!("listen on {}", args.listen))?;
    let addr = listener.local_addr().context("local address")?;
    tracing::info!(%addr, state_dir = %args.state_dir.display(), roots = args.trust_roots.len() + 1, principals = args.principals.len(), "mock-kms listening");
    // Readiness line for scripts: the bound address (useful with port 0).
    println!("mock-kms listening on http://{addr}");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    mock_kms::serve(listener, Arc::new(kms), shutdown)
        .await
        .context("serve")
}

use mock_kms::Kms;

fn main() -> ExitCode {
    let args = Args::parse();
    common::cli::run_main("mock-kms", run(args))
}
