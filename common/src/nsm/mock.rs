//! A mock Nitro Secure Module for local mode and tests (cargo feature `mock-nsm`).
//!
//! It behaves as the real NSM does, per AWS's NSM API (`aws-nitro-enclaves-nsm-api`) and the
//! documents real enclaves emit, except that its certificate chain ends in a [`MockCa`] root
//! instead of the AWS Nitro Enclaves root:
//! - 32 SHA-384 PCRs; `ExtendPCR` sets PCR = SHA-384(PCR ‖ data). PCR0-15 belong to the
//!   platform and are locked at creation, PCR0-4 (and PCR8 when configured) holding the image
//!   measurement; PCR16-31 are the application's until it locks them.
//! - Attestation documents have the real shape byte for byte: an untagged COSE_Sign1 whose
//!   protected header is `{1: -35}` (ES384), an empty unprotected map, a payload with the nine
//!   keys in AWS's order, and a raw 96-byte r‖s signature by a leaf that lives 3 hours.
//!   A document carries PCR0-15 and every locked application PCR ("all locked PCRs at the
//!   moment the attestation document was generated", nsm-api `AttestationDoc::pcrs`).
//! - In debug mode PCR0, PCR1 and PCR2 read as zero, as in a debug-mode enclave.

use super::{Digest, ErrorCode, Request, Response, MAX_ATTESTATION_FIELD_LEN, MAX_PCRS, PCR_LEN};
use crate::cbor::Encoder;
use crate::mock_ca::{self, oid, CaKey, MockCa, MockCaError, Profile, Str};
use aws_lc_rs::digest::{Context, SHA384};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use x509_cert::name::Name;
use zeroize::Zeroizing;

/// COSE protected header `{1: -35}`: alg ES384 (RFC 9053 §2.1), exactly as real NSMs send it.
pub const PROTECTED_HEADER: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];
/// How many bytes one `GetRandom` returns.
pub const RANDOM_LEN: usize = 256;
/// Largest `ExtendPCR` data accepted: the driver's whole request buffer (`NSM_REQUEST_MAX_SIZE`).
pub const MAX_EXTEND_LEN: usize = 0x1000;
/// PCRs `[0, PLATFORM_PCRS)` belong to the platform and are locked from the start.
pub const PLATFORM_PCRS: u16 = 16;

// Validity periods of the AWS chain's levels, as observed in real documents.
const REGIONAL_SECS: u64 = 20 * 24 * 3600;
const ZONAL_SECS: u64 = 5 * 24 * 3600 + 18 * 3600;
const INSTANCE_SECS: u64 = 24 * 3600;
const LEAF_SECS: u64 = 3 * 3600;
/// A level is re-issued when it has less than this left, so a fresh document's chain is never
/// about to expire.
const ROTATE_MARGIN_SECS: u64 = 10 * 60;

/// PCR values that `nitro-cli build-enclave` would report for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeasurement {
    /// Enclave image file.
    pub pcr0: [u8; PCR_LEN],
    /// Linux kernel and bootstrap.
    pub pcr1: [u8; PCR_LEN],
    /// Application.
    pub pcr2: [u8; PCR_LEN],
    /// IAM role of the parent instance.
    pub pcr3: [u8; PCR_LEN],
    /// Parent instance id.
    pub pcr4: [u8; PCR_LEN],
    /// Signing certificate of a signed EIF, if the image is signed.
    pub pcr8: Option<[u8; PCR_LEN]>,
}

impl ImageMeasurement {
    /// A deterministic measurement derived from `label`, so that separate local processes agree
    /// on the mock enclave's PCRs without passing them around: PCRn = SHA-384("mock-nsm/pcrN/" ‖ label).
    pub fn from_label(label: &str) -> Self {
        let pcr = |n: u8| {
            let mut ctx = Context::new(&SHA384);
            ctx.update(format!("mock-nsm/pcr{n}/").as_bytes());
            ctx.update(label.as_bytes());
            let mut out = [0u8; PCR_LEN];
            out.copy_from_slice(ctx.finish().as_ref());
            out
        };
        Self {
            pcr0: pcr(0),
            pcr1: pcr(1),
            pcr2: pcr(2),
            pcr3: pcr(3),
            pcr4: pcr(4),
            pcr8: None,
        }
    }
}

/// The mock NSM's clock: time since the Unix epoch. The system clock unless a test sets one.
pub type Clock = std::sync::Arc<dyn Fn() -> std::time::Duration + Send + Sync>;

/// How to build a mock NSM.
#[derive(Clone)]
pub struct MockNsmConfig {
    /// The image the mock pretends to run.
    pub measurement: ImageMeasurement,
    /// Debug mode: PCR0/1/2 read as zero.
    pub debug: bool,
    /// The region named in the chain's subjects.
    pub region: String,
    /// Where document timestamps and certificate validity come from.
    pub clock: Option<Clock>,
}

impl std::fmt::Debug for MockNsmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockNsmConfig")
            .field("measurement", &self.measurement)
            .field("debug", &self.debug)
            .field("region", &self.region)
            .field("clock", &self.clock.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl MockNsmConfig {
    /// A production-mode mock running `measurement`, on the system clock.
    pub fn new(measurement: ImageMeasurement) -> Self {
        Self {
            measurement,
            debug: false,
            region: "local-1".into(),
            clock: None,
        }
    }
}

/// An NSM signing identity as files (see [`MockNsm::signer`]). `Debug` leaves the key out.
pub struct Signer {
    /// The leaf's P-384 private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
    /// The leaf certificate, PEM.
    pub certificate_pem: String,
    /// Root, regional, zonal and instance certificates, PEM, in that order.
    pub cabundle_pem: String,
    /// When the leaf expires, in seconds since the epoch.
    pub not_after: u64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

struct Leaf {
    pair: EcdsaKeyPair,
    cert_der: Vec<u8>,
    not_after: u64,
}

struct Chain {
    regional: CaKey,
    zonal: CaKey,
    instance: CaKey,
    leaf: Leaf,
}

/// One PCR.
#[derive(Clone, Copy)]
struct Register {
    value: [u8; PCR_LEN],
    locked: bool,
}

struct State {
    registers: [Register; MAX_PCRS as usize],
    chain: Option<Chain>,
}

impl State {
    /// The register at `index`, or the NSM's `InvalidIndex`.
    fn register(&mut self, index: u16) -> Result<&mut Register, ErrorCode> {
        self.registers
            .get_mut(usize::from(index))
            .ok_or(ErrorCode::InvalidIndex)
    }
}

/// The mock NSM. Thread-safe; cheap to share behind an `Arc`.
pub struct MockNsm {
    ca: MockCa,
    region: String,
    instance_id: String,
    module_id: String,
    rng: SystemRandom,
    clock: Option<Clock>,
    state: Mutex<State>,
}

impl std::fmt::Debug for MockNsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockNsm")
            .field("module_id", &self.module_id)
            .finish_non_exhaustive()
    }
}

impl MockNsm {
    /// A new mock NSM whose chain ends in `ca`, with the image PCRs of `config` set and locked.
    pub fn new(ca: MockCa, config: MockNsmConfig) -> Result<Self, MockCaError> {
        let rng = SystemRandom::new();
        let instance_id = format!("i-{}", mock_ca::random_hex(&rng, 17)?);
        let module_id = format!("{instance_id}-enc{}", mock_ca::random_hex(&rng, 16)?);
        let m = &config.measurement;
        let zero = [0u8; PCR_LEN];
        let (pcr0, pcr1, pcr2) = if config.debug {
            (zero, zero, zero)
        } else {
            (m.pcr0, m.pcr1, m.pcr2)
        };
        let image = [
            pcr0,
            pcr1,
            pcr2,
            m.pcr3,
            m.pcr4,
            zero,
            zero,
            zero,
            m.pcr8.unwrap_or(zero),
        ];
        let mut registers = [Register {
            value: zero,
            locked: false,
        }; MAX_PCRS as usize];
        for (i, r) in registers.iter_mut().enumerate() {
            r.value = image.get(i).copied().unwrap_or(zero);
            r.locked = i < usize::from(PLATFORM_PCRS);
        }
        let nsm = Self {
            ca,
            region: config.region,
            clock: config.clock,
            instance_id,
            module_id,
            rng,
            state: Mutex::new(State {
                registers,
                chain: None,
            }),
        };
        // Issue the chain now, so a broken CA fails here and not at the first attestation.
        {
            let mut state = nsm.lock();
            nsm.ensure_chain(&mut state)?;
        }
        Ok(nsm)
    }

    /// The module id documents carry (`i-<17 hex>-enc<16 hex>`).
    pub fn module_id(&self) -> &str {
        &self.module_id
    }

    /// This NSM's signing identity for an emulated NSM in another process (QEMU's virtio-nsm
    /// with scripts/qemu/virtio-nsm-signing.patch): the leaf's private key (PKCS#8 PEM), the
    /// leaf certificate and the cabundle from the root down (PEM), the chain this mock signs
    /// with, so documents from either verify against the same local root. The leaf lives as
    /// long as AWS's do ([`LEAF_SECS`]): whoever uses it re-exports before it ends.
    pub fn signer(&self) -> Result<Signer, MockCaError> {
        let mut state = self.lock();
        self.ensure_chain(&mut state)?;
        let chain = state
            .chain
            .as_ref()
            .ok_or(MockCaError::Crypto("certificate chain"))?;
        let pkcs8 = chain
            .leaf
            .pair
            .to_pkcs8v1()
            .map_err(|_| MockCaError::Crypto("PKCS#8 export"))?;
        let pem =
            |der: &[u8]| der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der);
        let mut cabundle = String::new();
        for der in [
            self.ca.root_der(),
            &chain.regional.cert_der,
            &chain.zonal.cert_der,
            &chain.instance.cert_der,
        ] {
            cabundle.push_str(&pem(der)?);
        }
        Ok(Signer {
            key_pem: Zeroizing::new(der::pem::encode_string(
                "PRIVATE KEY",
                der::pem::LineEnding::LF,
                pkcs8.as_ref(),
            )?),
            certificate_pem: pem(&chain.leaf.cert_der)?,
            cabundle_pem: cabundle,
            not_after: chain.leaf.not_after,
        })
    }

    fn now(&self) -> Result<std::time::Duration, MockCaError> {
        match &self.clock {
            Some(clock) => Ok(clock()),
            None => mock_ca::unix_now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No operation panics while holding the lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn subject(&self, level: Profile, id: &str) -> Result<Name, MockCaError> {
        use Str::{Printable as P, Utf8 as U};
        let region = self.region.as_str();
        // Attribute order and string types as in AWS's chain (2026 documents).
        let name = match level {
            Profile::Regional => mock_ca::name(&[
                (oid::C, P("US")),
                (oid::O, U("Mock")),
                (oid::OU, U("Local")),
                (oid::CN, U(&format!("{id}.{region}.mock.nitro-enclaves"))),
            ])?,
            Profile::Zonal => mock_ca::name(&[
                (
                    oid::CN,
                    U(&format!("{id}.zonal.{region}.mock.nitro-enclaves")),
                ),
                (oid::OU, U("Local")),
                (oid::O, U("Mock")),
                (oid::C, P("US")),
                (oid::ST, U("WA")),
                (oid::L, U("Seattle")),
            ])?,
            Profile::Instance | Profile::Leaf | Profile::Root => {
                let cn = match level {
                    Profile::Instance => format!("{id}.{region}.mock.nitro-enclaves"),
                    _ => format!("{id}.{region}.mock"),
                };
                mock_ca::name(&[
                    (oid::C, P("US")),
                    (oid::ST, U("Washington")),
                    (oid::L, U("Seattle")),
                    (oid::O, U("Mock")),
                    (oid::OU, U("Local")),
                    (oid::CN, U(&cn)),
                ])?
            }
        };
        Ok(name)
    }

    /// Issues whatever part of the chain is missing or about to expire.
    fn ensure_chain(&self, state: &mut State) -> Result<(), MockCaError> {
        let now = self.now()?.as_secs();
        let fresh = |not_after: u64| not_after > now + ROTATE_MARGIN_SECS;
        let rng = &self.rng;
        let hex16 = || mock_ca::random_hex(rng, 16);
        let mut chain = match state.chain.take() {
            Some(c) if fresh(c.regional.not_after) => c,
            _ => {
                let regional = mock_ca::issue_ca(
                    self.ca.root(),
                    self.subject(Profile::Regional, &hex16()?)?,
                    Profile::Regional,
                    now.saturating_sub(3600),
                    now + REGIONAL_SECS,
                    rng,
                )?;
                let zonal = self.issue_zonal(&regional, now)?;
                let instance = self.issue_instance(&zonal, now)?;
                let leaf = self.issue_leaf(&instance, now)?;
                Chain {
                    regional,
                    zonal,
                    instance,
                    leaf,
                }
            }
        };
        if !fresh(chain.zonal.not_after) {
            chain.zonal = self.issue_zonal(&chain.regional, now)?;
            chain.instance = self.issue_instance(&chain.zonal, now)?;
            chain.leaf = self.issue_leaf(&chain.instance, now)?;
        } else if !fresh(chain.instance.not_after) {
            chain.instance = self.issue_instance(&chain.zonal, now)?;
            chain.leaf = self.issue_leaf(&chain.instance, now)?;
        } else if !fresh(chain.leaf.not_after) {
            chain.leaf = self.issue_leaf(&chain.instance, now)?;
        }
        state.chain = Some(chain);
        Ok(())
    }

    fn issue_zonal(&self, regional: &CaKey, now: u64) -> Result<CaKey, MockCaError> {
        let id = mock_ca::random_hex(&self.rng, 16)?;
        mock_ca::issue_ca(
            regional,
            self.subject(Profile::Zonal, &id)?,
            Profile::Zonal,
            now.saturating_sub(600),
            now + ZONAL_SECS,
            &self.rng,
        )
    }

    fn issue_instance(&self, zonal: &CaKey, now: u64) -> Result<CaKey, MockCaError> {
        mock_ca::issue_ca(
            zonal,
            self.subject(Profile::Instance, &self.instance_id)?,
            Profile::Instance,
            now.saturating_sub(60),
            now + INSTANCE_SECS,
            &self.rng,
        )
    }

    fn issue_leaf(&self, instance: &CaKey, now: u64) -> Result<Leaf, MockCaError> {
        let (pair, cert_der, not_after) = mock_ca::issue_leaf(
            instance,
            self.subject(Profile::Leaf, &self.module_id)?,
            now,
            now + LEAF_SECS,
            &ECDSA_P384_SHA384_FIXED_SIGNING,
            &self.rng,
        )?;
        Ok(Leaf {
            pair,
            cert_der,
            not_after,
        })
    }

    fn attestation(
        &self,
        user_data: Option<&[u8]>,
        nonce: Option<&[u8]>,
        public_key: Option<&[u8]>,
    ) -> Result<Vec<u8>, ErrorCode> {
        let too_large = |f: Option<&[u8]>| f.is_some_and(|v| v.len() > MAX_ATTESTATION_FIELD_LEN);
        if too_large(user_data) || too_large(nonce) || too_large(public_key) {
            return Err(ErrorCode::InputTooLarge);
        }
        let timestamp_ms = self
            .now()
            .map_err(|_| ErrorCode::InternalError)?
            .as_millis() as u64;
        let mut state = self.lock();
        self.ensure_chain(&mut state)
            .map_err(|_| ErrorCode::InternalError)?;
        let chain = state.chain.as_ref().ok_or(ErrorCode::InternalError)?;

        let included: Vec<(usize, [u8; PCR_LEN])> = state
            .registers
            .iter()
            .enumerate()
            .filter(|(i, r)| *i < usize::from(PLATFORM_PCRS) || r.locked)
            .map(|(i, r)| (i, r.value))
            .collect();
        let mut p = Encoder::with_capacity(4096 + 3 * MAX_ATTESTATION_FIELD_LEN);
        p.map(9);
        p.text("module_id").text(&self.module_id);
        p.text("digest").text("SHA384");
        p.text("timestamp").uint(timestamp_ms);
        p.text("pcrs").map(included.len());
        for (i, value) in &included {
            p.uint(*i as u64).bytes(value);
        }
        p.text("certificate").bytes(&chain.leaf.cert_der);
        p.text("cabundle").array(4);
        for cert in [
            self.ca.root_der(),
            &chain.regional.cert_der,
            &chain.zonal.cert_der,
            &chain.instance.cert_der,
        ] {
            p.bytes(cert);
        }
        p.text("public_key").opt_bytes(public_key);
        p.text("user_data").opt_bytes(user_data);
        p.text("nonce").opt_bytes(nonce);
        let payload = p.into_bytes();

        // Sig_structure (RFC 9052 §4.4): ["Signature1", protected, external_aad = h'', payload].
        let mut to_sign = Encoder::with_capacity(payload.len() + 32);
        to_sign
            .array(4)
            .text("Signature1")
            .bytes(&PROTECTED_HEADER)
            .bytes(&[])
            .bytes(&payload);
        let signature = chain
            .leaf
            .pair
            .sign(&self.rng, &to_sign.into_bytes())
            .map_err(|_| ErrorCode::InternalError)?;
        drop(state);

        let mut doc = Encoder::with_capacity(payload.len() + 128);
        doc.array(4)
            .bytes(&PROTECTED_HEADER)
            .map(0)
            .bytes(&payload)
            .bytes(signature.as_ref());
        Ok(doc.into_bytes())
    }

    fn handle(&self, request: Request) -> Result<Response, ErrorCode> {
        Ok(match request {
            Request::DescribePCR { index } => {
                let mut state = self.lock();
                let r = state.register(index)?;
                Response::DescribePCR {
                    lock: r.locked,
                    data: r.value.to_vec(),
                }
            }
            Request::ExtendPCR { index, data } => {
                let mut state = self.lock();
                let r = state.register(index)?;
                if data.len() > MAX_EXTEND_LEN {
                    return Err(ErrorCode::InputTooLarge);
                }
                if r.locked {
                    return Err(ErrorCode::ReadOnlyIndex);
                }
                let mut ctx = Context::new(&SHA384);
                ctx.update(&r.value);
                ctx.update(&data);
                r.value.copy_from_slice(ctx.finish().as_ref());
                Response::ExtendPCR {
                    data: r.value.to_vec(),
                }
            }
            Request::LockPCR { index } => {
                self.lock().register(index)?.locked = true;
                Response::LockPCR
            }
            Request::LockPCRs { range } => {
                if range > MAX_PCRS {
                    return Err(ErrorCode::InvalidIndex);
                }
                let mut state = self.lock();
                for r in state.registers.iter_mut().take(usize::from(range)) {
                    r.locked = true;
                }
                Response::LockPCRs
            }
            Request::DescribeNSM => {
                let state = self.lock();
                let locked_pcrs: BTreeSet<u16> = (0..MAX_PCRS)
                    .zip(state.registers.iter())
                    .filter(|(_, r)| r.locked)
                    .map(|(i, _)| i)
                    .collect();
                Response::DescribeNSM {
                    version_major: 1,
                    version_minor: 0,
                    version_patch: 0,
                    module_id: self.module_id.clone(),
                    max_pcrs: MAX_PCRS,
                    locked_pcrs,
                    digest: Digest::SHA384,
                }
            }
            Request::Attestation {
                user_data,
                nonce,
                public_key,
            } => Response::Attestation {
                document: self.attestation(
                    user_data.as_deref().map(|b| b.as_slice()),
                    nonce.as_deref().map(|b| b.as_slice()),
                    public_key.as_deref().map(|b| b.as_slice()),
                )?,
            },
            Request::GetRandom => {
                let mut random = vec![0u8; RANDOM_LEN];
                self.rng
                    .fill(&mut random)
                    .map_err(|_| ErrorCode::InternalError)?;
                Response::GetRandom { random }
            }
            // Request is non-exhaustive upstream: a request this mock does not know is one
            // the real NSM of this API version does not know either.
            _ => return Err(ErrorCode::InvalidOperation),
        })
    }
}

impl super::Nsm for MockNsm {
    fn process(&self, request: Request) -> Response {
        self.handle(request).unwrap_or_else(Response::Error)
    }
}
