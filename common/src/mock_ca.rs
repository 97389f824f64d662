//! The mock NSM's certificate authority: a P-384 root persisted in a directory, so that every
//! local process (enclave, client, mock KMS, tests) shares one trust root, and the issuance of
//! the rest of a Nitro-shaped chain (regional → zonal → instance → leaf) under it.
//!
//! The certificate profiles copy real AWS Nitro chains (see `../shared/vectors/nitro`, 2026
//! documents): the same name attribute order and string types, the same extensions with the
//! same criticality, the same validity periods (leaf 3 hours). Only the names say "mock".
//! Local mode only: nothing here is compiled into a production enclave.

use aws_lc_rs::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair, ECDSA_P384_SHA384_ASN1_SIGNING,
};
use der::asn1::{Any, BitString, GeneralizedTime, Ia5String, ObjectIdentifier, OctetString};
use der::asn1::{SetOfVec, UtcTime};
use der::pem::LineEnding;
use der::{DecodePem, Encode, Tag};
use std::path::{Path, PathBuf};
use std::time::Duration;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, CrlDistributionPoints, KeyUsage, KeyUsages,
    SubjectKeyIdentifier,
};
use x509_cert::ext::{AsExtension, Extension};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, TbsCertificate, Version};
use zeroize::Zeroizing;

/// File holding the root certificate (PEM), the one to hand verifiers as a trust root.
pub const ROOT_CERT_FILE: &str = "root.pem";
/// File holding the root private key (PKCS#8 PEM, mode 0600).
pub const ROOT_KEY_FILE: &str = "root.key.pem";

/// Validity of the mock root, as the AWS root: 30 years.
const ROOT_VALIDITY: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");

/// What can go wrong creating, loading or using the mock CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MockCaError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A persisted file is not what the mock CA writes.
    #[error("{path}: {reason}")]
    Invalid {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// ASN.1 encoding failed.
    #[error("DER encoding: {0}")]
    Der(#[from] der::Error),
    /// PEM encoding failed.
    #[error("PEM encoding: {0}")]
    Pem(der::pem::Error),
    /// The crypto library refused an operation (key generation, signing, randomness).
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
    /// The system clock is before 1970.
    #[error("system clock is before the Unix epoch")]
    Clock,
}

impl From<der::pem::Error> for MockCaError {
    fn from(e: der::pem::Error) -> Self {
        Self::Pem(e)
    }
}

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> Result<Duration, MockCaError> {
    crate::clock::since_epoch().ok_or(MockCaError::Clock)
}

/// A signing CA: its key, its certificate, and what children need to link to it.
pub(crate) struct CaKey {
    pair: EcdsaKeyPair,
    pub(crate) cert_der: Vec<u8>,
    subject: Name,
    key_id: Vec<u8>,
    /// Seconds since the epoch at which the certificate expires.
    pub(crate) not_after: u64,
}

/// The persisted mock root.
pub struct MockCa {
    root: CaKey,
    dir: PathBuf,
}

impl std::fmt::Debug for MockCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl MockCa {
    /// Loads the CA in `dir`, creating it first if the directory does not exist.
    ///
    /// Creation is atomic: the files are written in a temporary sibling directory that is then
    /// renamed into place, so a failed or concurrent run never leaves half a CA behind.
    pub fn load_or_create(dir: &Path) -> Result<Self, MockCaError> {
        if dir.exists() {
            return Self::load(dir);
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|source| MockCaError::Io {
            path: parent.clone(),
            source,
        })?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mock-ca".into());
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MockCaError::Io { path, source }
        };
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        let result = (|| {
            let (key_pem, cert_pem) = Self::generate_root()?;
            write_private(&tmp.join(ROOT_KEY_FILE), key_pem.as_bytes())?;
            std::fs::write(tmp.join(ROOT_CERT_FILE), cert_pem.as_bytes())
                .map_err(io(&tmp.join(ROOT_CERT_FILE)))?;
            match std::fs::rename(&tmp, dir) {
                Ok(()) => Ok(()),
                // Another process created it first: theirs wins, ours is discarded.
                Err(_) if dir.exists() => Ok(()),
                Err(source) => Err(MockCaError::Io {
                    path: dir.to_path_buf(),
                    source,
                }),
            }
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        result?;
        Self::load(dir)
    }

    /// Loads an existing CA from `dir`.
    pub fn load(dir: &Path) -> Result<Self, MockCaError> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path)
                .map(Zeroizing::new)
                .map_err(|source| MockCaError::Io { path, source })
        };
        let invalid = |file: &str, reason: String| MockCaError::Invalid {
            path: dir.join(file),
            reason,
        };
        let key_pem = read(ROOT_KEY_FILE)?;
        let cert_pem = read(ROOT_CERT_FILE)?;
        let (label, key_der) = der::pem::decode_vec(&key_pem)
            .map_err(|e| invalid(ROOT_KEY_FILE, format!("not PEM: {e}")))?;
        let key_der = Zeroizing::new(key_der);
        if label != "PRIVATE KEY" {
            return Err(invalid(
                ROOT_KEY_FILE,
                format!("unexpected PEM label {label}"),
            ));
        }
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &key_der)
            .map_err(|e| invalid(ROOT_KEY_FILE, format!("not a P-384 PKCS#8 key: {e}")))?;
        let cert = Certificate::from_pem(cert_pem.as_slice())
            .map_err(|e| invalid(ROOT_CERT_FILE, format!("not a PEM certificate: {e}")))?;
        let spki_key = cert
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes();
        if spki_key != pair.public_key().as_ref() {
            return Err(invalid(
                ROOT_CERT_FILE,
                format!("certificate does not match {ROOT_KEY_FILE}"),
            ));
        }
        let not_after = cert
            .tbs_certificate
            .validity
            .not_after
            .to_unix_duration()
            .as_secs();
        let root = CaKey {
            pair,
            cert_der: cert.to_der()?,
            subject: cert.tbs_certificate.subject.clone(),
            key_id: key_identifier(spki_key),
            not_after,
        };
        Ok(Self {
            root,
            dir: dir.to_path_buf(),
        })
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root.cert_der
    }

    /// The root certificate, PEM: what to pass to a verifier as `--root`.
    pub fn root_pem(&self) -> Result<String, MockCaError> {
        Ok(der::pem::encode_string(
            "CERTIFICATE",
            LineEnding::LF,
            &self.root.cert_der,
        )?)
    }

    /// Where the CA lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn root(&self) -> &CaKey {
        &self.root
    }

    fn generate_root() -> Result<(Zeroizing<String>, String), MockCaError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING)
            .map_err(|_| MockCaError::Crypto("P-384 key generation"))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| MockCaError::Crypto("PKCS#8 export"))?;
        let key_pem = Zeroizing::new(der::pem::encode_string(
            "PRIVATE KEY",
            LineEnding::LF,
            pkcs8.as_ref(),
        )?);
        let now = unix_now()?;
        let subject = name(&[
            (oid::C, Str::Printable("US")),
            (oid::O, Str::Utf8("Mock")),
            (oid::OU, Str::Utf8("Local")),
            (oid::CN, Str::Utf8("mock.nitro-enclaves")),
        ])?;
        let key_id = key_identifier(pair.public_key().as_ref());
        let spec = CertSpec {
            subject: subject.clone(),
            not_before: now.as_secs().saturating_sub(3600),
            not_after: (now + ROOT_VALIDITY).as_secs(),
            public_key: pair.public_key().as_ref().to_vec(),
            profile: Profile::Root,
        };
        // Self-signed: the issuer is the root itself.
        let issuer = CaKey {
            pair,
            cert_der: Vec::new(),
            subject,
            key_id,
            not_after: spec.not_after,
        };
        let cert_der = issue(&issuer, &spec, &rng)?;
        let cert_pem = der::pem::encode_string("CERTIFICATE", LineEnding::LF, &cert_der)?;
        Ok((key_pem, cert_pem))
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), MockCaError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let io = |source| MockCaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)
}

/// RFC 5280 §4.2.1.2 method (1): SHA-1 of the subjectPublicKey bits, as AWS's CAs use.
fn key_identifier(public_key: &[u8]) -> Vec<u8> {
    digest(&SHA1_FOR_LEGACY_USE_ONLY, public_key)
        .as_ref()
        .to_vec()
}

/// A name attribute's string type: AWS uses PrintableString for C and UTF8String elsewhere.
pub(crate) enum Str<'a> {
    Printable(&'a str),
    Utf8(&'a str),
}

/// A distinguished name from attributes in DER order, one attribute per RDN.
pub(crate) fn name(attrs: &[(ObjectIdentifier, Str<'_>)]) -> Result<Name, MockCaError> {
    let mut rdns = Vec::with_capacity(attrs.len());
    for (oid, value) in attrs {
        let value = match value {
            Str::Printable(s) => Any::new(Tag::PrintableString, s.as_bytes())?,
            Str::Utf8(s) => Any::new(Tag::Utf8String, s.as_bytes())?,
        };
        let atv = AttributeTypeAndValue { oid: *oid, value };
        rdns.push(RelativeDistinguishedName(SetOfVec::try_from(vec![atv])?));
    }
    Ok(RdnSequence(rdns))
}

/// Which AWS certificate a new certificate imitates.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Profile {
    Root,
    Regional,
    Zonal,
    Instance,
    Leaf,
}

pub(crate) struct CertSpec {
    pub(crate) subject: Name,
    pub(crate) not_before: u64,
    pub(crate) not_after: u64,
    /// Uncompressed P-384 point.
    pub(crate) public_key: Vec<u8>,
    pub(crate) profile: Profile,
}

fn time(secs: u64) -> Result<Time, MockCaError> {
    let d = Duration::from_secs(secs);
    // RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
    Ok(match UtcTime::from_unix_duration(d) {
        Ok(t) => Time::UtcTime(t),
        Err(_) => Time::GeneralTime(GeneralizedTime::from_unix_duration(d)?),
    })
}

fn extension<E: AsExtension>(
    critical: bool,
    value: &E,
    subject: &Name,
) -> Result<Extension, MockCaError> {
    let mut ext = value.to_extension(subject, &[])?;
    ext.critical = critical;
    Ok(ext)
}

/// The extensions of each AWS profile, in AWS's order and with AWS's criticality.
fn extensions(
    spec: &CertSpec,
    issuer: &CaKey,
    crl_id: &str,
) -> Result<Vec<Extension>, MockCaError> {
    let s = &spec.subject;
    let ca = |path_len: Option<u8>| BasicConstraints {
        ca: true,
        path_len_constraint: path_len,
    };
    let ca_usage =
        KeyUsage(KeyUsages::DigitalSignature | KeyUsages::KeyCertSign | KeyUsages::CRLSign);
    let ski = SubjectKeyIdentifier(OctetString::new(key_identifier(&spec.public_key))?);
    let aki = AuthorityKeyIdentifier {
        key_identifier: Some(OctetString::new(issuer.key_id.clone())?),
        authority_cert_issuer: None,
        authority_cert_serial_number: None,
    };
    let crl = |url: String| -> Result<CrlDistributionPoints, MockCaError> {
        Ok(CrlDistributionPoints(vec![DistributionPoint {
            distribution_point: Some(DistributionPointName::FullName(vec![
                GeneralName::UniformResourceIdentifier(Ia5String::new(&url)?),
            ])),
            reasons: None,
            crl_issuer: None,
        }]))
    };
    Ok(match spec.profile {
        Profile::Root => vec![
            extension(true, &ca(None), s)?,
            extension(false, &ski, s)?,
            extension(true, &ca_usage, s)?,
        ],
        Profile::Regional | Profile::Zonal => {
            let path_len = if spec.profile == Profile::Regional {
                2
            } else {
                1
            };
            vec![
                extension(true, &ca(Some(path_len)), s)?,
                extension(false, &aki, s)?,
                extension(false, &ski, s)?,
                extension(true, &ca_usage, s)?,
                extension(
                    false,
                    &crl(format!(
                        "http://crl.mock.nitro-enclaves.invalid/crl/{crl_id}.crl"
                    ))?,
                    s,
                )?,
            ]
        }
        Profile::Instance => vec![
            extension(true, &ca(Some(0)), s)?,
            extension(true, &KeyUsage(KeyUsages::KeyCertSign.into()), s)?,
            extension(false, &ski, s)?,
            extension(false, &aki, s)?,
        ],
        Profile::Leaf => vec![
            extension(
                true,
                &BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
                s,
            )?,
            extension(
                false,
                &KeyUsage(KeyUsages::DigitalSignature | KeyUsages::NonRepudiation),
                s,
            )?,
        ],
    })
}

/// Random positive serial number of `len` bytes (RFC 5280 §4.1.2.2).
fn serial(rng: &SystemRandom, len: usize) -> Result<SerialNumber, MockCaError> {
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes)
        .map_err(|_| MockCaError::Crypto("random serial"))?;
    if let Some(first) = bytes.first_mut() {
        *first = (*first & 0x7f) | 0x01;
    }
    Ok(SerialNumber::new(&bytes)?)
}

/// Random lowercase hex of `len` characters.
pub(crate) fn random_hex(rng: &SystemRandom, len: usize) -> Result<String, MockCaError> {
    let mut bytes = vec![0u8; len.div_ceil(2)];
    rng.fill(&mut bytes)
        .map_err(|_| MockCaError::Crypto("random identifier"))?;
    let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.truncate(len);
    Ok(s)
}

/// Issues the certificate `spec` describes, signed by `issuer` (ecdsa-with-SHA384).
pub(crate) fn issue(
    issuer: &CaKey,
    spec: &CertSpec,
    rng: &SystemRandom,
) -> Result<Vec<u8>, MockCaError> {
    let alg = AlgorithmIdentifierOwned {
        oid: OID_ECDSA_SHA384,
        parameters: None,
    };
    let serial_len = match spec.profile {
        Profile::Instance => 20,
        _ => 16,
    };
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: serial(rng, serial_len)?,
        signature: alg.clone(),
        issuer: issuer.subject.clone(),
        validity: Validity {
            not_before: time(spec.not_before)?,
            not_after: time(spec.not_after)?,
        },
        subject: spec.subject.clone(),
        subject_public_key_info: SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: OID_EC_PUBLIC_KEY,
                parameters: Some(Any::from(OID_SECP384R1)),
            },
            subject_public_key: BitString::from_bytes(&spec.public_key)?,
        },
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions(spec, issuer, &random_hex(rng, 36)?)?),
    };
    let tbs_der = tbs.to_der()?;
    let signature = issuer
        .pair
        .sign(rng, &tbs_der)
        .map_err(|_| MockCaError::Crypto("certificate signature"))?;
    let cert = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: alg,
        signature: BitString::from_bytes(signature.as_ref())?,
    };
    Ok(cert.to_der()?)
}

/// A new CA key and certificate under `issuer`.
pub(crate) fn issue_ca(
    issuer: &CaKey,
    subject: Name,
    profile: Profile,
    not_before: u64,
    not_after: u64,
    rng: &SystemRandom,
) -> Result<CaKey, MockCaError> {
    let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING)
        .map_err(|_| MockCaError::Crypto("P-384 key generation"))?;
    // A child never outlives its issuer.
    let not_after = not_after.min(issuer.not_after);
    let spec = CertSpec {
        subject: subject.clone(),
        not_before,
        not_after,
        public_key: pair.public_key().as_ref().to_vec(),
        profile,
    };
    let cert_der = issue(issuer, &spec, rng)?;
    Ok(CaKey {
        key_id: key_identifier(&spec.public_key),
        pair,
        cert_der,
        subject,
        not_after,
    })
}

/// A new leaf key (raw r‖s signing, for COSE) and its certificate under `issuer`.
pub(crate) fn issue_leaf(
    issuer: &CaKey,
    subject: Name,
    not_before: u64,
    not_after: u64,
    alg: &'static EcdsaSigningAlgorithm,
    rng: &SystemRandom,
) -> Result<(EcdsaKeyPair, Vec<u8>, u64), MockCaError> {
    let pair =
        EcdsaKeyPair::generate(alg).map_err(|_| MockCaError::Crypto("P-384 key generation"))?;
    let not_after = not_after.min(issuer.not_after);
    let spec = CertSpec {
        subject,
        not_before,
        not_after,
        public_key: pair.public_key().as_ref().to_vec(),
        profile: Profile::Leaf,
    };
    let cert_der = issue(issuer, &spec, rng)?;
    Ok((pair, cert_der, not_after))
}

/// Name attribute OIDs (RFC 4519), for subject names.
pub(crate) mod oid {
    use der::asn1::ObjectIdentifier;
    pub(crate) const C: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.6");
    pub(crate) const ST: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.8");
    pub(crate) const L: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.7");
    pub(crate) const O: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
    pub(crate) const OU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.11");
    pub(crate) const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Decode;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mock-ca-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempdir("reload");
        let a = MockCa::load_or_create(&dir).unwrap();
        let b = MockCa::load_or_create(&dir).unwrap();
        assert_eq!(a.root_der(), b.root_der());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(ROOT_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "private key readable by others");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = tempdir("mismatch-a");
        let b = tempdir("mismatch-b");
        MockCa::load_or_create(&a).unwrap();
        MockCa::load_or_create(&b).unwrap();
        std::fs::copy(b.join(ROOT_CERT_FILE), a.join(ROOT_CERT_FILE)).unwrap();
        let err = MockCa::load(&a).unwrap_err();
        assert!(matches!(err, MockCaError::Invalid { .. }), "{err}");
        std::fs::remove_dir_all(&a).unwrap();
        std::fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn root_has_the_aws_root_profile() {
        let dir = tempdir("profile");
        let ca = MockCa::load_or_create(&dir).unwrap();
        let cert = Certificate::from_der(ca.root_der()).unwrap();
        let tbs = &cert.tbs_certificate;
        assert_eq!(tbs.subject, tbs.issuer);
        let exts = tbs.extensions.as_ref().unwrap();
        let ids: Vec<(String, bool)> = exts
            .iter()
            .map(|e| (e.extn_id.to_string(), e.critical))
            .collect();
        assert_eq!(
            ids,
            [
                ("2.5.29.19".to_string(), true),
                ("2.5.29.14".to_string(), false),
                ("2.5.29.15".to_string(), true)
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
