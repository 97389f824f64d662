//! The enclave's half of key release and unsealing (DESIGN.md §4.2). Everything the host sends
//! is untrusted; the enclave decides:
//! 1. it reads the sealed header and measures the model's SHA-256 into PCR16, then locks it,
//!    *before* any key arrives, so that whatever weights end up loaded, PCR16 says which
//!    model the header claimed and the SHA-256 check below makes that claim true;
//! 2. it asks the NSM for a document attesting its ephemeral RSA-2048 key, generated for this
//!    attempt only (ahead of time, while waiting for the host: [`recipient_key`]);
//! 3. it opens KMS's `CiphertextForRecipient` with that key (refusing envelopes addressed to
//!    another key), takes the data key, and drops the RSA key;
//! 4. it decrypts the chunks as they arrive straight into the final buffer, hashing them on a
//!    second thread, and accepts the model only if every chunk authenticates and the SHA-256
//!    matches the header (and so PCR16);
//! 5. it reports `Ready`, or `Failed` with a content-free reason, and refuses to serve.

use common::cms::{CmsError, Envelope, RecipientKey};
use common::nsm::{measure_once, AttestationRequest, MeasureError, Nsm, NsmError};
use common::sealed::{allocate, DataKey, SealError, SealedHeader, Unsealer, MODEL_PCR};
use common::wire::io::{handshake, read_frame, write_frame, ConnError};
use common::wire::{Message, DEFAULT_MAX_PAYLOAD};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

/// A model unsealed into enclave memory.
pub struct LoadedModel {
    /// The weights. Zeroized on drop.
    pub weights: Zeroizing<Vec<u8>>,
    /// Their SHA-256, as measured into PCR16.
    pub sha256: [u8; 32],
    /// The model's name from the sealed header.
    pub name: String,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .field("bytes", &self.weights.len())
            .field("sha256", &hex::encode(self.sha256))
            .finish()
    }
}

/// Why provisioning failed. Messages name checks, never content.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The host connection failed or broke the protocol framing.
    #[error("host connection: {0}")]
    Conn(#[from] ConnError),
    /// The host sent a message out of order.
    #[error("protocol: expected {expected}, got {got:?}")]
    Protocol {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        got: Message,
    },
    /// The sealed model is invalid, tampered or truncated.
    #[error("sealed model: {0}")]
    Sealed(#[from] SealError),
    /// The NSM refused.
    #[error("NSM: {0}")]
    Nsm(#[from] NsmError),
    /// KMS refused the key release (as the host reports it).
    #[error("key release refused: {0}")]
    KeyRelease(String),
    /// The key envelope is invalid or not for this enclave.
    #[error("key envelope: {0}")]
    Envelope(#[from] CmsError),
    /// PCR16 already names another model: this enclave can only ever load that one.
    #[error("PCR16 already measures another model; restart the enclave to load a different one")]
    ModelAlreadyMeasured,
    /// The inference engine refused the model. The host learns the category only: the
    /// engine's own message names tensors, merges and template text of a model it must not
    /// read. The detail stays in the enclave's log; `enclave --check-model` on the plaintext
    /// tells the model owner the same.
    #[error("model: {0}")]
    Load(ModelRefused),
    /// A worker thread failed.
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// Why the engine refused a model, by category (see [`ProvisionError::Load`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelRefused {
    /// Not a valid GGUF file, or inconsistent metadata or tensors.
    #[error("invalid model file (run `enclave --check-model` on the plaintext for the details)")]
    Format,
    /// An architecture, tensor type, tokenizer or template the engine does not run.
    #[error(
        "unsupported model: its architecture, a tensor type, its tokenizer or its chat template (run `enclave --check-model` on the plaintext for the details)"
    )]
    Unsupported,
    /// The engine's configuration cannot serve it (the KV budget holds no useful context, …).
    #[error("the engine's configuration cannot serve this model (its KV budget or limits)")]
    Config,
    /// The engine failed to start.
    #[error("the engine failed to start")]
    Engine,
}

impl From<&engine::Error> for ModelRefused {
    fn from(e: &engine::Error) -> Self {
        match e {
            engine::Error::Format(_) => Self::Format,
            engine::Error::Unsupported(_) => Self::Unsupported,
            engine::Error::Config(_) => Self::Config,
            _ => Self::Engine,
        }
    }
}

/// Measures the model into PCR16 and locks it. A retry after a failed attempt (say, a key
/// policy fixed after `AccessDeniedException`) finds PCR16 already locked: that is fine for
/// the same model, and refused for any other, since PCR16 can never change again.
fn measure_model(nsm: &dyn Nsm, sha256: &[u8; 32]) -> Result<(), ProvisionError> {
    measure_once(nsm, MODEL_PCR, sha256).map_err(|e| match e {
        MeasureError::Nsm(e) => ProvisionError::Nsm(e),
        MeasureError::AlreadyMeasured(_) => ProvisionError::ModelAlreadyMeasured,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ProvisionError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ProvisionError::Internal("worker thread failed"))
}

/// A fresh RSA-2048 recipient key, generated on a worker thread (it takes tens of ms).
pub async fn recipient_key() -> Result<RecipientKey, ProvisionError> {
    blocking(RecipientKey::generate).await?.map_err(Into::into)
}

/// Runs provisioning on `conn` with a fresh `recipient` key (used for this attempt only, then
/// dropped); on failure tells the host why before returning the error.
pub async fn provision<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    nsm: Arc<dyn Nsm>,
    max_model: u64,
    recipient: RecipientKey,
) -> Result<LoadedModel, ProvisionError> {
    provision_with(conn, nsm, max_model, recipient, Ok).await
}

/// [`provision`], then `load` on a worker thread (the inference engine, which parses and
/// prepares the weights): `Ready` means the model is loaded and serving, and a model the
/// engine refuses is reported as `Failed` with its category ([`ModelRefused`]).
pub async fn provision_with<S, T, F>(
    conn: &mut S,
    nsm: Arc<dyn Nsm>,
    max_model: u64,
    recipient: RecipientKey,
    load: F,
) -> Result<T, ProvisionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Send + 'static,
    F: FnOnce(LoadedModel) -> Result<T, engine::Error> + Send + 'static,
{
    handshake(conn).await?;
    let header = match read_frame(conn, DEFAULT_MAX_PAYLOAD).await? {
        Message::SealedHeader(b) => b,
        got => {
            return Err(ProvisionError::Protocol {
                expected: "SealedHeader",
                got,
            })
        }
    };
    let loaded = load_from_header(conn, header, nsm, max_model, recipient, load).await;
    match write_frame(conn, &answer(&loaded)).await {
        // Best effort on failure: the connection may be what failed.
        Err(e) if loaded.is_ok() => Err(e.into()),
        _ => loaded.map(|l| l.value),
    }
}

/// A model provisioned and loaded, with what `Ready` reports.
#[derive(Debug)]
pub struct Loaded<T> {
    /// What `load` made of the model.
    pub value: T,
    pub model_sha256: [u8; 32],
    pub model_name: String,
}

/// [`provision_with`] on a connection whose preface and `SealedHeader` frame were already
/// read (by the enclave's listener, which dispatches on a connection's first frame), without
/// the final answer: the listener records the outcome before the host reads it (and may act
/// on it at once), then sends [`answer`].
pub async fn load_from_header<S, T, F>(
    conn: &mut S,
    header_bytes: Vec<u8>,
    nsm: Arc<dyn Nsm>,
    max_model: u64,
    recipient: RecipientKey,
    load: F,
) -> Result<Loaded<T>, ProvisionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Send + 'static,
    F: FnOnce(LoadedModel) -> Result<T, engine::Error> + Send + 'static,
{
    let model = run(conn, header_bytes, nsm, max_model, recipient).await?;
    let (model_sha256, model_name) = (model.sha256, model.name.clone());
    let value = blocking(move || load(model)).await.and_then(|r| {
        r.map_err(|e| {
            // Inside the enclave only: its log is not the host's to read.
            tracing::error!(error = %e, "the engine refused the model");
            ProvisionError::Load(ModelRefused::from(&e))
        })
    })?;
    Ok(Loaded {
        value,
        model_sha256,
        model_name,
    })
}

/// The host's answer to a provisioning: `Ready`, or `Failed` with a content-free reason (the
/// codec cuts it to MAX_REASON at a character boundary).
pub fn answer<T>(outcome: &Result<Loaded<T>, ProvisionError>) -> Message {
    match outcome {
        Ok(l) => Message::Ready {
            model_sha256: l.model_sha256,
            model_name: l.model_name.clone(),
        },
        Err(e) => Message::Failed {
            reason: e.to_string(),
        },
    }
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    header_bytes: Vec<u8>,
    nsm: Arc<dyn Nsm>,
    max_model: u64,
    recipient: RecipientKey,
) -> Result<LoadedModel, ProvisionError> {
    let (header, used) = SealedHeader::decode(&header_bytes)?;
    if used != header_bytes.len() {
        return Err(SealError::TrailingData {
            extra: header_bytes.len() - used,
        }
        .into());
    }
    // Refuse an oversized model before any work.
    if header.plaintext_size > max_model {
        return Err(SealError::HeaderField {
            field: "plaintext_size",
            reason: format!(
                "{} bytes exceeds this enclave's limit of {max_model}",
                header.plaintext_size
            ),
        }
        .into());
    }

    // 1. Measure the claimed model into PCR16 and lock it.
    let sha256 = header.plaintext_sha256;
    let (attestation, recipient) = {
        let nsm = nsm.clone();
        blocking(move || -> Result<(Vec<u8>, RecipientKey), ProvisionError> {
            measure_model(nsm.as_ref(), &sha256)?;
            // 2. The ephemeral key, attested.
            let doc = nsm.attest(AttestationRequest {
                public_key: Some(recipient.public_key_der()),
                ..Default::default()
            })?;
            Ok((doc, recipient))
        })
        .await??
    };
    tracing::info!(model = %header.model_name().unwrap_or_default(), pcr = MODEL_PCR, "model measured; requesting key release");
    write_frame(conn, &Message::KeyReleaseRequest { attestation }).await?;

    // 3. The data key, for this enclave's key only.
    let envelope = match read_frame(conn, DEFAULT_MAX_PAYLOAD).await? {
        Message::KeyReleaseResponse {
            ciphertext_for_recipient,
        } => ciphertext_for_recipient,
        Message::KeyReleaseFailed { error } => return Err(ProvisionError::KeyRelease(error)),
        got => {
            return Err(ProvisionError::Protocol {
                expected: "KeyReleaseResponse",
                got,
            })
        }
    };
    let mut plaintext = recipient.open(&Envelope::parse(&envelope)?)?;
    drop(recipient);
    let key = DataKey::from_slice(&mut plaintext)?;
    drop(plaintext);

    // 4. Stream the chunks into the final buffer, decrypting and hashing on worker threads.
    let mut unsealer = Unsealer::new(&key, &header_bytes)?;
    drop(key);
    let mut weights = allocate(&header, max_model)?;
    let count = header.chunk_count();
    let max_frame = DEFAULT_MAX_PAYLOAD.max(header.chunk_len(0).saturating_add(16));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let worker = tokio::task::spawn_blocking(move || {
        let chunks = std::iter::from_fn(|| rx.blocking_recv());
        let result = common::sealed::unseal_stream(&mut unsealer, chunks, &mut weights);
        result.map(|()| weights)
    });
    let received: Result<(), ProvisionError> = async {
        for _ in 0..count {
            match read_frame(conn, max_frame).await? {
                Message::Chunk(c) => {
                    if tx.send(c).await.is_err() {
                        break; // the worker stopped on an error it will report
                    }
                }
                got => {
                    return Err(ProvisionError::Protocol {
                        expected: "Chunk",
                        got,
                    })
                }
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let weights = worker
        .await
        .map_err(|_| ProvisionError::Internal("unsealing thread failed"))?;
    // A decryption error explains more than the connection error it may have caused.
    let weights = match (weights, received) {
        (Err(e), _) => return Err(e.into()),
        (Ok(_), Err(e)) => return Err(e),
        (Ok(w), Ok(())) => w,
    };
    let name = header.model_name().unwrap_or_default().to_owned();
    tracing::info!(model = %name, bytes = weights.len(), "model unsealed and verified");
    Ok(LoadedModel {
        weights,
        sha256,
        name,
    })
}
