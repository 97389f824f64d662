//! A configurable Nitro-shaped chain and document builder for negative tests: each test
//! starts from a valid document and breaks exactly one thing.

#![allow(dead_code)]

use attestation_verifier::TrustAnchor;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_ASN1_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
};
use common::cbor::Encoder;
use der::asn1::{Any, BitString, ObjectIdentifier, OctetString, SetOfVec, UtcTime};
use der::{Encode, Tag};
use std::time::Duration;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};
use x509_cert::ext::Extension;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, TbsCertificate, Version};

pub const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
pub const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// Positions: 0 root, 1 regional, 2 zonal, 3 instance, 4 leaf.
pub const LEAF: usize = 4;

/// What to put in one certificate.
#[derive(Clone)]
pub struct Spec {
    pub cn: String,
    /// basicConstraints: None = absent; Some((cA, pathLen)).
    pub basic_constraints: Option<(bool, Option<u8>)>,
    /// keyUsage: None = absent.
    pub key_usage: Option<KeyUsage>,
    pub extra: Vec<Extension>,
    pub not_before: u64,
    pub not_after: u64,
    pub sig_oid: ObjectIdentifier,
    pub version: Version,
    /// Issuer name to write instead of the real issuer's subject.
    pub issuer_name: Option<String>,
    /// Sign with a fresh key instead of the issuer's.
    pub wrong_signer: bool,
}

pub struct Node {
    pub pkcs8: Vec<u8>,
    pub name: Name,
    pub der: Vec<u8>,
}

pub struct Forge {
    pub nodes: Vec<Node>,
    /// The leaf key for raw r‖s COSE signatures.
    pub leaf_signer: EcdsaKeyPair,
    /// Verification time the chain is valid at, in ms.
    pub now_ms: u64,
}

pub fn name(cn: &str) -> Name {
    let atv = AttributeTypeAndValue {
        oid: CN,
        value: Any::new(Tag::Utf8String, cn.as_bytes()).unwrap(),
    };
    RdnSequence(vec![RelativeDistinguishedName(
        SetOfVec::try_from(vec![atv]).unwrap(),
    )])
}

pub fn ext<E: Encode>(oid: &str, critical: bool, value: &E) -> Extension {
    Extension {
        extn_id: ObjectIdentifier::new_unwrap(oid),
        critical,
        extn_value: OctetString::new(value.to_der().unwrap()).unwrap(),
    }
}

fn time(secs: u64) -> Time {
    Time::UtcTime(UtcTime::from_unix_duration(Duration::from_secs(secs)).unwrap())
}

/// The AWS profile for each position, valid around `now` (seconds).
pub fn default_spec(position: usize, now: u64) -> Spec {
    let ca_usage =
        KeyUsage(KeyUsages::DigitalSignature | KeyUsages::KeyCertSign | KeyUsages::CRLSign);
    let (cn, bc, ku) = match position {
        0 => ("forge root", Some((true, None)), Some(ca_usage)),
        1 => ("forge regional", Some((true, Some(2))), Some(ca_usage)),
        2 => ("forge zonal", Some((true, Some(1))), Some(ca_usage)),
        3 => (
            "forge instance",
            Some((true, Some(0))),
            Some(KeyUsage(KeyUsages::KeyCertSign.into())),
        ),
        _ => (
            "forge leaf",
            Some((false, None)),
            Some(KeyUsage(
                KeyUsages::DigitalSignature | KeyUsages::NonRepudiation,
            )),
        ),
    };
    Spec {
        cn: cn.into(),
        basic_constraints: bc,
        key_usage: ku,
        extra: Vec::new(),
        not_before: now - 3600,
        not_after: now + 3 * 3600,
        sig_oid: ECDSA_SHA384,
        version: Version::V3,
        issuer_name: None,
        wrong_signer: false,
    }
}

fn new_key() -> Vec<u8> {
    EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING)
        .unwrap()
        .to_pkcs8v1()
        .unwrap()
        .as_ref()
        .to_vec()
}

fn key(pkcs8: &[u8]) -> EcdsaKeyPair {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8).unwrap()
}

fn build(spec: &Spec, subject_key: &[u8], issuer_name: &Name, issuer_key: &[u8]) -> Vec<u8> {
    let rng = SystemRandom::new();
    let subject = key(subject_key);
    let mut exts = Vec::new();
    if let Some((ca, path_len)) = spec.basic_constraints {
        exts.push(ext(
            "2.5.29.19",
            true,
            &BasicConstraints {
                ca,
                path_len_constraint: path_len,
            },
        ));
    }
    if let Some(ku) = &spec.key_usage {
        exts.push(ext("2.5.29.15", true, ku));
    }
    exts.extend(spec.extra.iter().cloned());
    let alg = AlgorithmIdentifierOwned {
        oid: spec.sig_oid,
        parameters: None,
    };
    let tbs = TbsCertificate {
        version: spec.version,
        serial_number: SerialNumber::new(&[0x01, 0x02, 0x03]).unwrap(),
        signature: alg.clone(),
        issuer: spec
            .issuer_name
            .as_deref()
            .map(name)
            .unwrap_or_else(|| issuer_name.clone()),
        validity: Validity {
            not_before: time(spec.not_before),
            not_after: time(spec.not_after),
        },
        subject: name(&spec.cn),
        subject_public_key_info: SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: EC_PUBLIC_KEY,
                parameters: Some(Any::from(SECP384R1)),
            },
            subject_public_key: BitString::from_bytes(subject.public_key().as_ref()).unwrap(),
        },
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: if spec.version == Version::V3 {
            Some(exts)
        } else {
            None
        },
    };
    let signer = if spec.wrong_signer {
        key(&new_key())
    } else {
        key(issuer_key)
    };
    let sig = signer.sign(&rng, &tbs.to_der().unwrap()).unwrap();
    Certificate {
        tbs_certificate: tbs,
        signature_algorithm: alg,
        signature: BitString::from_bytes(sig.as_ref()).unwrap(),
    }
    .to_der()
    .unwrap()
}

impl Forge {
    /// A valid chain at the current time, after `tweak` has edited each position's spec.
    pub fn new(tweak: impl Fn(usize, &mut Spec)) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut nodes: Vec<Node> = Vec::new();
        for position in 0..=LEAF {
            let mut spec = default_spec(position, now);
            tweak(position, &mut spec);
            let pkcs8 = new_key();
            let (issuer_name, issuer_key) = match nodes.last() {
                Some(parent) => (parent.name.clone(), parent.pkcs8.clone()),
                None => (name(&spec.cn), pkcs8.clone()),
            };
            let der = build(&spec, &pkcs8, &issuer_name, &issuer_key);
            nodes.push(Node {
                pkcs8,
                name: name(&spec.cn),
                der,
            });
        }
        let leaf_signer =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &nodes[LEAF].pkcs8).unwrap();
        Self {
            nodes,
            leaf_signer,
            now_ms: now * 1000,
        }
    }

    pub fn valid() -> Self {
        Self::new(|_, _| {})
    }

    pub fn anchor(&self) -> TrustAnchor {
        TrustAnchor::from_der(&self.nodes[0].der).unwrap()
    }

    /// The default payload: every key in AWS order, 16 PCRs of distinct non-zero values.
    pub fn payload(&self) -> Payload {
        let mut p = Payload {
            entries: Vec::new(),
            indefinite: false,
        };
        p.set(
            "module_id",
            enc(|e| e.text("i-0123456789abcdef0-enc0123456789abcdef")),
        );
        p.set("digest", enc(|e| e.text("SHA384")));
        p.set("timestamp", enc(|e| e.uint(self.now_ms)));
        p.set("pcrs", pcrs(0..16));
        p.set("certificate", enc(|e| e.bytes(&self.nodes[LEAF].der)));
        p.set(
            "cabundle",
            enc(|e| {
                e.array(4);
                for n in &self.nodes[..LEAF] {
                    e.bytes(&n.der);
                }
                e
            }),
        );
        p.set("public_key", enc(|e| e.null()));
        p.set("user_data", enc(|e| e.bytes(b"user")));
        p.set("nonce", enc(|e| e.bytes(b"nonce")));
        p
    }

    pub fn sign(&self, protected: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut s = Encoder::new();
        s.array(4)
            .text("Signature1")
            .bytes(protected)
            .bytes(&[])
            .bytes(payload);
        self.leaf_signer
            .sign(&SystemRandom::new(), &s.into_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    /// A signed document around `payload`.
    pub fn document(&self, payload: &Payload) -> Vec<u8> {
        let bytes = payload.encode();
        let protected = [0xa1, 0x01, 0x38, 0x22];
        let sig = self.sign(&protected, &bytes);
        let mut e = Encoder::new();
        e.array(4)
            .bytes(&protected)
            .map(0)
            .bytes(&bytes)
            .bytes(&sig);
        e.into_bytes()
    }
}

/// A PCR map with value `[i + 1; 48]` for each index.
pub fn pcrs(indices: impl ExactSizeIterator<Item = u8>) -> Vec<u8> {
    enc(|e| {
        e.map(indices.len());
        for i in indices {
            e.uint(u64::from(i)).bytes(&[i.wrapping_add(1); 48]);
        }
        e
    })
}

pub fn enc(f: impl FnOnce(&mut Encoder) -> &mut Encoder) -> Vec<u8> {
    let mut e = Encoder::new();
    f(&mut e);
    e.into_bytes()
}

/// Payload entries as raw CBOR key and value items, in order.
#[derive(Clone)]
pub struct Payload {
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    pub indefinite: bool,
}

impl Payload {
    fn key(k: &str) -> Vec<u8> {
        enc(|e| e.text(k))
    }
    /// Replaces (or appends) the value of `k`.
    pub fn set(&mut self, k: &str, value: Vec<u8>) -> &mut Self {
        let key = Self::key(k);
        match self.entries.iter_mut().find(|(kk, _)| *kk == key) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((key, value)),
        }
        self
    }
    pub fn remove(&mut self, k: &str) -> &mut Self {
        let key = Self::key(k);
        self.entries.retain(|(kk, _)| *kk != key);
        self
    }
    pub fn push_raw(&mut self, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.entries.push((key, value));
        self
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        if self.indefinite {
            e.raw(&[0xbf]);
        } else {
            e.map(self.entries.len());
        }
        for (k, v) in &self.entries {
            e.raw(k).raw(v);
        }
        if self.indefinite {
            e.raw(&[0xff]);
        }
        e.into_bytes()
    }
}
