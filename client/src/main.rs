//! `client`: verify an enclave, chat with it, or serve the OpenAI API on localhost.
//!
//! ```text
//! client attest --url URL --policy FILE              what was verified, or the failed check
//! client chat   --url URL --policy FILE [PROMPT]     stream an answer (the prompt from stdin if none)
//! client proxy  --listen 127.0.0.1:8080 --url URL --policy FILE
//! client policy --measurements FILE --model-sha256 HEX|--sealed FILE --config-sha256 HEX [--root PEM]
//! ```

use clap::{Args as ClapArgs, Parser, Subcommand};
use client::policy::{ClientPolicyFile, DEFAULT_MAX_AGE_SECS};
use client::{Client, ClientConfig};
use common::bhttp;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "client",
    version,
    about = "Attested, end-to-end encrypted client of the enclave"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch and verify an attestation document; print what was verified.
    Attest(Connect),
    /// Send one chat message and stream the answer to stdout.
    Chat(ChatArgs),
    /// Send a raw prompt to the legacy completions API (base models without a chat template)
    /// and stream the continuation to stdout.
    Complete(ChatArgs),
    /// Serve the OpenAI API on a local address, forwarding through the attested channel.
    Proxy(ProxyArgs),
    /// Print a client policy for an image's measurements, a model and a configuration.
    Policy(PolicyArgs),
}

#[derive(ClapArgs)]
struct Connect {
    /// The relay's base URL.
    #[arg(long, env = "CLIENT_URL")]
    url: String,
    /// The policy file (see `client policy`).
    #[arg(long, env = "CLIENT_POLICY")]
    policy: PathBuf,
    /// Extra PEM roots for the relay's TLS certificate.
    #[arg(long = "tls-root")]
    tls_roots: Vec<PathBuf>,
    /// Seconds a verified key is reused before attesting again.
    #[arg(long, default_value_t = 60)]
    attestation_ttl_secs: u64,
    /// Seconds to wait for the relay (per response chunk once streaming).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

impl Connect {
    fn client(&self) -> Result<Client, String> {
        let policy = ClientPolicyFile::load(&self.policy)
            .and_then(|f| f.to_policy())
            .map_err(|e| e.to_string())?;
        let mut cfg = ClientConfig::new(self.url.clone(), policy);
        cfg.tls_roots = self.tls_roots.clone();
        cfg.attestation_ttl = Duration::from_secs(self.attestation_ttl_secs);
        cfg.timeout = Duration::from_secs(self.timeout_secs);
        Client::new(cfg).map_err(|e| e.to_string())
    }
}

#[derive(ClapArgs)]
struct ChatArgs {
    #[command(flatten)]
    connect: Connect,
    /// The prompt; read from stdin when absent.
    prompt: Option<String>,
    /// A system message (`chat` only).
    #[arg(long)]
    system: Option<String>,
    /// The model (default: the one the enclave attests).
    #[arg(long)]
    model: Option<String>,
    /// Tokens to generate at most.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature (0 is greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// The API key, when the enclave requires one; sent inside the encrypted request.
    #[arg(long, env = "CLIENT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(ClapArgs)]
struct ProxyArgs {
    #[command(flatten)]
    connect: Connect,
    /// Where to serve the OpenAI API. Keep it on loopback: this side is plaintext.
    #[arg(long, env = "CLIENT_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = client::proxy::DEFAULT_MAX_BODY)]
    max_body: usize,
}

#[derive(ClapArgs)]
struct PolicyArgs {
    /// nitro-cli's measurements file (or `mock-ca measurements LABEL` in local mode).
    #[arg(long)]
    measurements: PathBuf,
    /// The model's SHA-256, hex.
    #[arg(long, required_unless_present = "sealed", conflicts_with = "sealed")]
    model_sha256: Option<String>,
    /// Read the model's SHA-256 from a sealed model's header instead.
    #[arg(long)]
    sealed: Option<PathBuf>,
    /// The runtime configuration's SHA-256 (`enclave --print-config`).
    #[arg(long)]
    config_sha256: String,
    /// PEM roots to trust instead of the AWS Nitro root (local mode: the mock CA's root).
    #[arg(long = "root")]
    roots: Vec<PathBuf>,
    /// Accept debug-mode enclaves (never in production).
    #[arg(long)]
    allow_debug: bool,
    /// Maximum document age in seconds.
    #[arg(long, default_value_t = DEFAULT_MAX_AGE_SECS)]
    max_age_secs: u64,
    /// Write the policy here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

async fn attest(args: Connect) -> Result<(), String> {
    let client = args.client()?;
    let attested = client.attest().await.map_err(|e| e.to_string())?;
    let facts = serde_json::to_string_pretty(&attested.facts()).map_err(|e| e.to_string())?;
    println!("{facts}");
    Ok(())
}

/// `client chat` (`raw` false) and `client complete` (`raw` true).
async fn chat(args: ChatArgs, raw: bool) -> Result<(), String> {
    if raw && args.system.is_some() {
        return Err("--system is for `client chat`; `complete` sends the prompt as it is".into());
    }
    let client = args.connect.client()?;
    let prompt = match args.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("stdin: {e}"))?;
            s
        }
    };
    let model = match args.model {
        Some(m) => m,
        None => client
            .attested()
            .await
            .map_err(|e| e.to_string())?
            .binding
            .model
            .clone(),
    };
    let (path, mut body) = if raw {
        (
            "/v1/completions",
            serde_json::json!({"model": model, "prompt": prompt, "stream": true}),
        )
    } else {
        let mut messages = Vec::new();
        if let Some(s) = args.system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": prompt}));
        (
            "/v1/chat/completions",
            serde_json::json!({"model": model, "messages": messages, "stream": true}),
        )
    };
    if let Some(n) = args.max_tokens {
        body.as_object_mut()
            .map(|o| o.insert("max_tokens".into(), n.into()));
    }
    if let Some(t) = args.temperature {
        body.as_object_mut()
            .map(|o| o.insert("temperature".into(), t.into()));
    }
    if let Some(s) = args.seed {
        body.as_object_mut()
            .map(|o| o.insert("seed".into(), s.into()));
    }
    let mut request = bhttp::Request::new(
        "POST",
        path,
        serde_json::to_vec(&body).map_err(|e| e.to_string())?,
    )
    .with_header("content-type", "application/json");
    if let Some(key) = &args.api_key {
        request = request.with_header("authorization", format!("Bearer {key}").into_bytes());
    }
    let mut response = client.send(&request).await.map_err(|e| e.to_string())?;
    let status = response.status;
    if status != 200 {
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let message = v
            .pointer("/error/message")
            .and_then(|c| c.as_str())
            .unwrap_or("no message");
        return Err(format!("the enclave answered {status}: {message}"));
    }
    let mut stdout = std::io::stdout().lock();
    let mut pending = Vec::new();
    while let Some(chunk) = response.chunk().await {
        pending.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        // Server-sent events end with a blank line.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let Some(data) = event.strip_prefix(b"data: ") else {
                continue;
            };
            let data = data.strip_suffix(b"\n\n").unwrap_or(data);
            if data == b"[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(data)
                .map_err(|e| format!("bad event from the enclave: {e}"))?;
            if let Some(e) = v.get("error") {
                let message = e
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("no message");
                return Err(format!("the enclave failed mid-answer: {message}"));
            }
            let text = v
                .pointer(if raw {
                    "/choices/0/text"
                } else {
                    "/choices/0/delta/content"
                })
                .and_then(|c| c.as_str());
            if let Some(text) = text {
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
        }
    }
    let _ = stdout.write_all(b"\n");
    Ok(())
}

async fn proxy(args: ProxyArgs) -> Result<(), String> {
    let client = Arc::new(args.connect.client()?);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", args.listen))?;
    match client.attest().await {
        Ok(a) => tracing::info!(
            model = %a.binding.model,
            key_id = a.binding.key_id,
            "attestation verified"
        ),
        // The enclave may not be ready yet: requests attest again, and fail until it verifies.
        Err(e) => {
            tracing::warn!(error = %e, "attestation failed; nothing is forwarded until it verifies")
        }
    }
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!("serving the OpenAI API on http://{local}/v1");
    tokio::select! {
        r = client::proxy::serve(listener, client, args.max_body) => r.map_err(|e| format!("accept: {e}")),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

fn policy(args: PolicyArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.measurements)
        .map_err(|e| format!("{}: {e}", args.measurements.display()))?;
    let pcrs = attestation_verifier::parse_measurements(&text)
        .map_err(|e| format!("{}: {e}", args.measurements.display()))?;
    let model_sha256 = match (&args.model_sha256, &args.sealed) {
        (Some(h), _) => h.clone(),
        (None, Some(path)) => {
            let mut f =
                std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut head = Vec::new();
            (&mut f)
                .take(common::sealed::MAX_HEADER_LEN as u64)
                .read_to_end(&mut head)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let (header, _) = common::sealed::SealedHeader::decode(&head)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            hex::encode(header.plaintext_sha256)
        }
        (None, None) => return Err("--model-sha256 or --sealed is required".into()),
    };
    // Roots are written as absolute paths: the file resolves relative ones against its own
    // directory, which need not be the directory this command ran in.
    let roots = args
        .roots
        .iter()
        .map(|r| std::fs::canonicalize(r).map_err(|e| format!("{}: {e}", r.display())))
        .collect::<Result<Vec<_>, _>>()?;
    let file = ClientPolicyFile {
        roots,
        allow_debug: args.allow_debug,
        max_age_secs: Some(args.max_age_secs),
        max_clock_skew_secs: None,
        model_sha256,
        config_sha256: args.config_sha256,
        pcrs: pcrs
            .iter()
            .filter(|(i, _)| !matches!(i, 16 | 17))
            .map(|(i, v)| (i.to_string(), hex::encode(v)))
            .collect(),
    };
    // Check it loads as written before publishing it.
    file.to_policy().map_err(|e| e.to_string())?;
    let text = file.to_toml();
    match args.output {
        Some(path) => std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Attest(a) => common::cli::run_main("client", attest(a)),
        Command::Chat(a) => common::cli::run_main("client", chat(a, false)),
        Command::Complete(a) => common::cli::run_main("client", chat(a, true)),
        Command::Proxy(a) => common::cli::run_main("client", proxy(a)),
        Command::Policy(a) => match policy(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("client: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
