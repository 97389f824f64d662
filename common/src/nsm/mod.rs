//! The Nitro Secure Module seen through one trait, so that the enclave runs unchanged on
//! `/dev/nsm` (production) and on the mock NSM (local mode and tests).
//!
//! The trait speaks the request and response types of AWS's `aws-nitro-enclaves-nsm-api`
//! crate, the same values the device exchanges as CBOR, so nothing is lost or reinterpreted
//! between the two backends. The typed helpers on [`Nsm`] turn an NSM error code or an
//! unexpected response into an [`NsmError`] instead of leaving callers to match on them.

pub mod device;
#[cfg(feature = "mock-nsm")]
pub mod mock;

pub use aws_nitro_enclaves_nsm_api::api::{Digest, ErrorCode, Request, Response};
use serde_bytes::ByteBuf;

/// Number of PCRs a Nitro NSM exposes (`DescribeNSM.max_pcrs`).
pub const MAX_PCRS: u16 = 32;
/// Size of one SHA-384 PCR value.
pub const PCR_LEN: usize = 48;
/// Largest `user_data`, `nonce` or `public_key` an attestation request may carry.
pub const MAX_ATTESTATION_FIELD_LEN: usize = 1024;

/// What went wrong talking to an NSM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NsmError {
    /// `/dev/nsm` could not be opened (not running in a Nitro Enclave?).
    #[error("cannot open {path}: {source}")]
    Open {
        /// The device path.
        path: &'static str,
        /// Why the open failed.
        source: std::io::Error,
    },
    /// The NSM answered with an error code.
    #[error("NSM refused {request}: {code}")]
    Refused {
        /// The request that failed.
        request: &'static str,
        /// What the NSM said.
        code: NsmErrorCode,
    },
    /// The NSM answered with a response of the wrong kind or shape.
    #[error("NSM gave an unexpected response to {request}")]
    UnexpectedResponse {
        /// The request that got it.
        request: &'static str,
    },
}

/// An NSM error code, comparable and printable (the upstream type is neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NsmErrorCode {
    /// Input argument(s) invalid.
    InvalidArgument,
    /// PCR index out of bounds.
    InvalidIndex,
    /// The response does not correspond to the request.
    InvalidResponse,
    /// The PCR is locked and the operation would modify it.
    ReadOnlyIndex,
    /// Missing capabilities.
    InvalidOperation,
    /// The output buffer is too small.
    BufferTooSmall,
    /// The input is too large.
    InputTooLarge,
    /// The NSM failed internally.
    InternalError,
    /// `Success` sent as an error, which no NSM should do.
    Success,
}

impl From<&ErrorCode> for NsmErrorCode {
    fn from(code: &ErrorCode) -> Self {
        match code {
            ErrorCode::Success => Self::Success,
            ErrorCode::InvalidArgument => Self::InvalidArgument,
            ErrorCode::InvalidIndex => Self::InvalidIndex,
            ErrorCode::InvalidResponse => Self::InvalidResponse,
            ErrorCode::ReadOnlyIndex => Self::ReadOnlyIndex,
            ErrorCode::InvalidOperation => Self::InvalidOperation,
            ErrorCode::BufferTooSmall => Self::BufferTooSmall,
            ErrorCode::InputTooLarge => Self::InputTooLarge,
            ErrorCode::InternalError => Self::InternalError,
        }
    }
}

impl std::fmt::Display for NsmErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One PCR as `DescribePCR` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrState {
    /// Whether the PCR is locked (read-only).
    pub locked: bool,
    /// Its current value.
    pub value: Vec<u8>,
}

/// What `DescribeNSM` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct NsmDescription {
    /// `major.minor.patch` of the NSM API.
    pub version: (u16, u16, u16),
    /// The module id that documents carry.
    pub module_id: String,
    /// How many PCRs there are.
    pub max_pcrs: u16,
    /// Which PCRs are locked.
    pub locked_pcrs: Vec<u16>,
    /// The PCR bank's digest.
    pub digest: Digest,
}

/// The optional fields of an attestation request.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttestationRequest<'a> {
    /// Application data the document signs.
    pub user_data: Option<&'a [u8]>,
    /// The verifier's nonce.
    pub nonce: Option<&'a [u8]>,
    /// A public key the enclave generated and wants attested.
    pub public_key: Option<&'a [u8]>,
}

/// A Nitro Secure Module: the real device, or the mock.
pub trait Nsm: Send + Sync {
    /// Sends one request and returns the NSM's response, as the device driver does.
    fn process(&self, request: Request) -> Response;

    /// `DescribePCR`.
    fn describe_pcr(&self, index: u16) -> Result<PcrState, NsmError> {
        const REQ: &str = "DescribePCR";
        match self.process(Request::DescribePCR { index }) {
            Response::DescribePCR { lock, data } => Ok(PcrState {
                locked: lock,
                value: data,
            }),
            other => Err(unexpected(REQ, &other)),
        }
    }

    /// `ExtendPCR`: PCR = SHA-384(PCR ‖ data). Returns the new value.
    fn extend_pcr(&self, index: u16, data: &[u8]) -> Result<Vec<u8>, NsmError> {
        const REQ: &str = "ExtendPCR";
        match self.process(Request::ExtendPCR {
            index,
            data: data.to_vec(),
        }) {
            Response::ExtendPCR { data } => Ok(data),
            other => Err(unexpected(REQ, &other)),
        }
    }

    /// `LockPCR`: no further extension of PCR `index`.
    fn lock_pcr(&self, index: u16) -> Result<(), NsmError> {
        match self.process(Request::LockPCR { index }) {
            Response::LockPCR => Ok(()),
            other => Err(unexpected("LockPCR", &other)),
        }
    }

    /// `LockPCRs`: locks PCRs `[0, range)`.
    fn lock_pcrs(&self, range: u16) -> Result<(), NsmError> {
        match self.process(Request::LockPCRs { range }) {
            Response::LockPCRs => Ok(()),
            other => Err(unexpected("LockPCRs", &other)),
        }
    }

    /// `DescribeNSM`.
    fn describe(&self) -> Result<NsmDescription, NsmError> {
        match self.process(Request::DescribeNSM) {
            Response::DescribeNSM {
                version_major,
                version_minor,
                version_patch,
                module_id,
                max_pcrs,
                locked_pcrs,
                digest,
            } => Ok(NsmDescription {
                version: (version_major, version_minor, version_patch),
                module_id,
                max_pcrs,
                locked_pcrs: locked_pcrs.into_iter().collect(),
                digest,
            }),
            other => Err(unexpected("DescribeNSM", &other)),
        }
    }

    /// `Attestation`: a signed COSE_Sign1 attestation document.
    fn attest(&self, request: AttestationRequest<'_>) -> Result<Vec<u8>, NsmError> {
        let to_buf = |v: Option<&[u8]>| v.map(|b| ByteBuf::from(b.to_vec()));
        match self.process(Request::Attestation {
            user_data: to_buf(request.user_data),
            nonce: to_buf(request.nonce),
            public_key: to_buf(request.public_key),
        }) {
            Response::Attestation { document } => Ok(document),
            other => Err(unexpected("Attestation", &other)),
        }
    }

    /// `GetRandom`: entropy from the NSM.
    fn get_random(&self) -> Result<Vec<u8>, NsmError> {
        match self.process(Request::GetRandom) {
            Response::GetRandom { random } if !random.is_empty() => Ok(random),
            other => Err(unexpected("GetRandom", &other)),
        }
    }
}

/// Why [`measure_once`] refused.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The NSM refused a request.
    #[error(transparent)]
    Nsm(#[from] NsmError),
    /// The PCR already holds another measurement (it can never change again).
    #[error("PCR{0} already measures something else")]
    AlreadyMeasured(u16),
}

/// Extends the zero-initialised PCR `index` once with the 32-byte `digest` and locks it, so it
/// reads SHA-384(0^48 ‖ digest) for the enclave's lifetime. A PCR already locked to that very
/// value is fine (a retried provisioning); any other state is refused.
pub fn measure_once(nsm: &dyn Nsm, index: u16, digest: &[u8; 32]) -> Result<(), MeasureError> {
    let state = nsm.describe_pcr(index)?;
    if state.locked || state.value.iter().any(|&b| b != 0) {
        return if state.locked && state.value == crate::sealed::model_pcr16(digest) {
            Ok(())
        } else {
            Err(MeasureError::AlreadyMeasured(index))
        };
    }
    nsm.extend_pcr(index, digest)?;
    nsm.lock_pcr(index)?;
    Ok(())
}

fn unexpected(request: &'static str, response: &Response) -> NsmError {
    match response {
        Response::Error(code) => NsmError::Refused {
            request,
            code: code.into(),
        },
        _ => NsmError::UnexpectedResponse { request },
    }
}
