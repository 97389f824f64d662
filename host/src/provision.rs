//! The host's half of key release and provisioning (DESIGN.md §4.2): send the sealed header,
//! take the enclave's attestation document to KMS `Decrypt` with `Recipient`, hand back the
//! `CiphertextForRecipient`, then stream the sealed chunks. The host never sees the data key
//! or the weights: KMS encrypts the key to the enclave's attested RSA key.

use crate::kms::KmsFailure;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeyEncryptionMechanism, RecipientInfo};
use common::sealed::{SealError, SealedHeader, PREFIX_LEN};
use common::wire::io::{handshake, read_frame, write_frame, write_raw, ConnError};
use common::wire::{Message, MessageType, DEFAULT_MAX_PAYLOAD};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The sealed file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The sealed file is not valid.
    #[error("sealed file: {0}")]
    Sealed(#[from] SealError),
    /// The enclave connection failed.
    #[error("enclave connection: {0}")]
    Conn(#[from] ConnError),
    /// KMS refused the key release.
    #[error("KMS Decrypt: {0}")]
    Kms(KmsFailure),
    /// The enclave refused or failed, and said why.
    #[error("enclave: {0}")]
    Enclave(String),
    /// The enclave sent something out of order.
    #[error("enclave sent {0:?} out of order")]
    Protocol(Message),
}

impl ProvisionError {
    /// The KMS error name, if KMS refused (e.g. `AccessDeniedException`).
    pub fn kms_code(&self) -> Option<&str> {
        match self {
            Self::Kms(f) => Some(&f.code),
            _ => None,
        }
    }
}

/// What the enclave reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// SHA-256 of the loaded weights (the value measured into PCR16).
    pub model_sha256: [u8; 32],
    /// The model's name.
    pub model_name: String,
}

async fn read_header(
    file: &mut tokio::fs::File,
    path: &Path,
) -> Result<(SealedHeader, Vec<u8>), ProvisionError> {
    let io = |source| ProvisionError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut prefix = [0u8; PREFIX_LEN];
    file.read_exact(&mut prefix).await.map_err(io)?;
    let len = SealedHeader::header_len(&prefix)?;
    let mut bytes = prefix.to_vec();
    bytes.resize(len, 0);
    file.read_exact(bytes.get_mut(PREFIX_LEN..).unwrap_or_default())
        .await
        .map_err(io)?;
    let (header, used) = SealedHeader::decode(&bytes)?;
    debug_assert_eq!(used, bytes.len());
    Ok((header, bytes))
}

/// Provisions the enclave on `conn` with the sealed model at `sealed`.
pub async fn provision<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    kms: &aws_sdk_kms::Client,
    sealed: &Path,
) -> Result<Provisioned, ProvisionError> {
    handshake(conn).await?;
    send_model(conn, kms, sealed).await
}

/// [`provision`] on a connection whose prefaces were already exchanged (`host serve`'s control
/// connection).
pub async fn send_model<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    kms: &aws_sdk_kms::Client,
    sealed: &Path,
) -> Result<Provisioned, ProvisionError> {
    let io = |source| ProvisionError::Io {
        path: sealed.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::open(sealed).await.map_err(io)?;
    let (header, header_bytes) = read_header(&mut file, sealed).await?;
    write_frame(conn, &Message::SealedHeader(header_bytes)).await?;
    let attestation = match read_frame(conn, DEFAULT_MAX_PAYLOAD).await? {
        Message::KeyReleaseRequest { attestation } => attestation,
        Message::Failed { reason } => return Err(ProvisionError::Enclave(reason)),
        other => return Err(ProvisionError::Protocol(other)),
    };
    tracing::info!(key_id = %header.key_id, "requesting key release from KMS for the attested enclave");
    let recipient = RecipientInfo::builder()
        .key_encryption_algorithm(KeyEncryptionMechanism::RsaesOaepSha256)
        .attestation_document(Blob::new(attestation))
        .build();
    let response = kms
        .decrypt()
        .ciphertext_blob(Blob::new(header.wrapped_key.clone()))
        .key_id(&header.key_id)
        .set_encryption_context(Some(header.context.clone().into_iter().collect()))
        .recipient(recipient)
        .send()
        .await;
    let envelope = match response {
        Ok(out) => out
            .ciphertext_for_recipient
            .map(Blob::into_inner)
            .ok_or(KmsFailure {
                code: "MissingCiphertextForRecipient".into(),
                message: "KMS answered a Recipient request without CiphertextForRecipient".into(),
            }),
        Err(e) => Err(KmsFailure::from_sdk(&e)),
    };
    let envelope = match envelope {
        Ok(e) => e,
        Err(failure) => {
            // Tell the enclave why it will get no key, then report it here.
            let error = failure.to_string();
            let _ = write_frame(conn, &Message::KeyReleaseFailed { error }).await;
            return Err(ProvisionError::Kms(failure));
        }
    };
    write_frame(
        conn,
        &Message::KeyReleaseResponse {
            ciphertext_for_recipient: envelope,
        },
    )
    .await?;

    // Stream the chunks as the header lays them out, through one reused buffer; the enclave
    // checks each one.
    let mut buf = vec![0u8; header.chunk_len(0)];
    for index in 0..header.chunk_count() {
        let chunk = buf.get_mut(..header.chunk_len(index)).unwrap_or_default();
        file.read_exact(chunk).await.map_err(io)?;
        write_raw(conn, MessageType::Chunk, chunk).await?;
    }
    conn.flush()
        .await
        .map_err(|e| ProvisionError::Conn(e.into()))?;
    match read_frame(conn, DEFAULT_MAX_PAYLOAD).await? {
        Message::Ready {
            model_sha256,
            model_name,
        } => Ok(Provisioned {
            model_sha256,
            model_name,
        }),
        Message::Failed { reason } => Err(ProvisionError::Enclave(reason)),
        other => Err(ProvisionError::Protocol(other)),
    }
}
