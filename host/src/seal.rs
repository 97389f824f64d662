//! `host seal`: seals a model file for an enclave (DESIGN.md §4.1). Two streaming passes over
//! the file: the first measures its size and SHA-256 (which go into the KMS encryption context
//! and the header), the second encrypts it chunk by chunk into a temporary file that is renamed
//! into place only when complete. The plaintext data key is zeroized as soon as the sealer has
//! it, and the model is never held in memory whole.

use crate::kms::KmsFailure;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use common::sealed::{
    hex_lower, DataKey, SealError, SealedHeader, Sealer, CONTEXT_MODEL_NAME, CONTEXT_MODEL_SHA256,
    NONCE_PREFIX_LEN,
};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use zeroize::Zeroize;

/// Why sealing failed.
#[derive(Debug, thiserror::Error)]
pub enum SealFileError {
    /// Reading the model or writing the output failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// KMS refused `GenerateDataKey`.
    #[error("KMS GenerateDataKey: {0}")]
    Kms(KmsFailure),
    /// KMS answered without the fields it must send.
    #[error("KMS GenerateDataKey answered without {0}")]
    KmsResponse(&'static str),
    /// The format refused the input (e.g. chunk size).
    #[error("{0}")]
    Seal(#[from] SealError),
    /// The model changed between the two passes.
    #[error("{0} changed while it was being sealed")]
    Changed(PathBuf),
}

/// What to seal and how.
#[derive(Debug, Clone)]
pub struct SealRequest {
    /// The KMS key (id, ARN or alias).
    pub key_id: String,
    /// The model file.
    pub input: PathBuf,
    /// The sealed file to write.
    pub output: PathBuf,
    /// The model's name (encryption context `model_name`).
    pub name: String,
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
}

/// What was sealed.
#[derive(Debug, Clone)]
pub struct SealSummary {
    /// The header written.
    pub header: SealedHeader,
    /// Size of the sealed file.
    pub sealed_size: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SealFileError + '_ {
    move |source| SealFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Progress on standard error when it is a terminal.
struct Progress {
    total: u64,
    done: u64,
    label: &'static str,
    shown: Option<u64>,
    on: bool,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        Self {
            total,
            done: 0,
            label,
            shown: None,
            on: std::io::stderr().is_terminal(),
        }
    }
    fn add(&mut self, n: usize) {
        self.done += n as u64;
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        if self.on && self.shown != Some(pct) {
            self.shown = Some(pct);
            let width = 30usize;
            let filled = (pct as usize * width) / 100;
            eprint!(
                "\r{:<8} [{}{}] {pct:>3}% {}/{} MiB",
                self.label,
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.done >> 20,
                self.total >> 20
            );
        }
    }
    fn finish(&self) {
        if self.on {
            eprintln!();
        }
    }
}

/// Reads exactly `buf.len()` bytes unless the file ends first; returns how many were read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(buf.get_mut(n..).unwrap_or_default())? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Size and SHA-256 of a file, streamed.
fn measure(path: &Path) -> Result<(u64, [u8; 32]), SealFileError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let total = file.metadata().map_err(io_err(path))?.len();
    let mut progress = Progress::new("hashing", total);
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = read_full(&mut file, &mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        let data = buf.get(..n).unwrap_or_default();
        ctx.update(data);
        size += n as u64;
        progress.add(n);
    }
    progress.finish();
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ctx.finish().as_ref());
    Ok((size, digest))
}

/// Seals `req.input` into `req.output` with a data key from KMS.
pub async fn seal_file(
    kms: &aws_sdk_kms::Client,
    req: &SealRequest,
) -> Result<SealSummary, SealFileError> {
    let (size, sha256) = {
        let input = req.input.clone();
        tokio::task::spawn_blocking(move || measure(&input))
            .await
            .map_err(|e| SealFileError::Io {
                path: req.input.clone(),
                source: std::io::Error::other(e),
            })??
    };
    let context: BTreeMap<String, String> = [
        (CONTEXT_MODEL_SHA256.to_string(), hex_lower(&sha256)),
        (CONTEXT_MODEL_NAME.to_string(), req.name.clone()),
    ]
    .into();
    let out = kms
        .generate_data_key()
        .key_id(&req.key_id)
        .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
        .set_encryption_context(Some(context.clone().into_iter().collect()))
        .send()
        .await
        .map_err(|e| SealFileError::Kms(KmsFailure::from_sdk(&e)))?;
    let mut plaintext = out
        .plaintext
        .ok_or(SealFileError::KmsResponse("Plaintext"))?
        .into_inner();
    let key = DataKey::from_slice(&mut plaintext);
    plaintext.zeroize();
    let key = key?;
    let wrapped_key = out
        .ciphertext_blob
        .ok_or(SealFileError::KmsResponse("CiphertextBlob"))?
        .into_inner();
    let key_id = out.key_id.unwrap_or_else(|| req.key_id.clone());

    let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
    SystemRandom::new()
        .fill(&mut nonce_prefix)
        .map_err(|_| SealError::Crypto("random nonce prefix"))?;
    let header = SealedHeader {
        chunk_size: req.chunk_size,
        plaintext_size: size,
        plaintext_sha256: sha256,
        nonce_prefix,
        key_id,
        wrapped_key,
        context,
    };
    let req = req.clone();
    let h = header.clone();
    tokio::task::spawn_blocking(move || write_sealed(&key, h, &req))
        .await
        .map_err(|e| SealFileError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?
}

fn write_sealed(
    key: &DataKey,
    header: SealedHeader,
    req: &SealRequest,
) -> Result<SealSummary, SealFileError> {
    let dir = req
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = req
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut sealer = Sealer::new(key, header.clone())?;
        let mut input = std::fs::File::open(&req.input).map_err(io_err(&req.input))?;
        let mut out = std::io::BufWriter::with_capacity(
            4 << 20,
            std::fs::File::create(&tmp).map_err(io_err(&tmp))?,
        );
        out.write_all(sealer.header_bytes()).map_err(io_err(&tmp))?;
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut progress = Progress::new("sealing", header.plaintext_size);
        let mut buf = Vec::with_capacity(header.chunk_size as usize + common::sealed::TAG_LEN);
        for index in 0..header.chunk_count() {
            let len = header.plaintext_len(index);
            buf.clear();
            buf.resize(len, 0);
            if read_full(&mut input, &mut buf).map_err(io_err(&req.input))? != len {
                return Err(SealFileError::Changed(req.input.clone()));
            }
            ctx.update(&buf);
            progress.add(len);
            sealer.seal_next(&mut buf)?;
            out.write_all(&buf).map_err(io_err(&tmp))?;
        }
        buf.zeroize();
        progress.finish();
        sealer.finish()?;
        // The model must not have changed since it was measured.
        let mut extra = [0u8; 1];
        if read_full(&mut input, &mut extra).map_err(io_err(&req.input))? != 0
            || ctx.finish().as_ref() != header.plaintext_sha256
        {
            return Err(SealFileError::Changed(req.input.clone()));
        }
        let file = out.into_inner().map_err(|e| SealFileError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&tmp))?;
        let sealed_size = file.metadata().map_err(io_err(&tmp))?.len();
        std::fs::rename(&tmp, &req.output).map_err(io_err(&req.output))?;
        Ok(SealSummary {
            header: header.clone(),
            sealed_size,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
