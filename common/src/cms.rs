//! KMS's `CiphertextForRecipient`: CMS EnvelopedData (RFC 5652 §6) in the exact profile AWS
//! KMS returns for a `Recipient` (AWS KMS Developer Guide, "How AWS Nitro Enclaves uses AWS
//! KMS"; `../shared/vectors/kms/README.md`):
//!
//! - BER with indefinite lengths; EnvelopedData version 2 with one KeyTransRecipientInfo,
//!   version 2, identified by SubjectKeyIdentifier = SHA-256 of the recipient's DER SPKI;
//! - key transport RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 8017 §7.1, RFC 4055 §4.1);
//! - content AES-256-CBC with PKCS#7 padding (RFC 3565), the encrypted content either a
//!   primitive `[0]` or a constructed, indefinite `[0]` of OCTET STRINGs.
//!
//! CMS is not signed: anyone who knows the recipient's public key can build one. That is why
//! the enclave binds the model by PCR16 and checks the weights' SHA-256 (DESIGN.md §4.2).
//!
//! [`RecipientKey`] is the enclave's ephemeral RSA-2048 key; [`envelope_for_recipient`] builds
//! the same layout for the mock KMS.

use aws_lc_rs::cipher::{
    DecryptionContext, EncryptionContext, PaddedBlockDecryptingKey, PaddedBlockEncryptingKey,
    UnboundCipherKey, AES_256,
};
use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, OAEP_SHA256_MGF1SHA256,
};
use zeroize::{Zeroize, Zeroizing};

/// Largest envelope accepted. KMS plaintexts are at most 4096 bytes (Decrypt) and 1024
/// (GenerateRandom); with an RSA-4096 recipient the envelope stays far below this.
pub const MAX_ENVELOPE: usize = 16 * 1024;
/// Deepest BER nesting accepted (KMS's layout is 10 deep).
const MAX_DEPTH: u8 = 16;

// DER encodings of the object identifiers in KMS's profile, without tag and length.
const OID_ENVELOPED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03];
const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
const OID_RSAES_OAEP: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x07];
const OID_MGF1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const OID_AES256_CBC: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x2a];

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CmsError {
    /// Larger than [`MAX_ENVELOPE`].
    #[error("envelope of {0} bytes is larger than {MAX_ENVELOPE}")]
    TooLarge(usize),
    /// Not well-formed BER, or not the expected structure.
    #[error("malformed envelope at byte {offset}: {what}")]
    Malformed {
        /// Where.
        offset: usize,
        /// What was expected.
        what: &'static str,
    },
    /// Well-formed, but outside KMS's profile.
    #[error("unsupported envelope: {0}")]
    Unsupported(&'static str),
    /// The envelope is addressed to another key.
    #[error("envelope is addressed to another recipient key")]
    WrongRecipient,
    /// RSA-OAEP decryption of the content key failed.
    #[error("cannot decrypt the content-encryption key")]
    KeyDecryption,
    /// AES-CBC decryption or its padding failed.
    #[error("cannot decrypt the content")]
    ContentDecryption,
    /// The crypto library refused (key generation, encoding, randomness).
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

/// One BER element: its tag byte and contents (for constructed elements, the encodings of
/// its children, without any end-of-contents marker).
#[derive(Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    offset: usize,
    content: &'a [u8],
    content_offset: usize,
}

/// A cursor over consecutive BER elements.
struct Ber<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the whole envelope, for error messages.
    base: usize,
    depth: u8,
}

impl<'a> Ber<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            base: 0,
            depth: 0,
        }
    }

    fn inside(tlv: &Tlv<'a>, depth: u8) -> Result<Self, CmsError> {
        if depth >= MAX_DEPTH {
            return Err(CmsError::Malformed {
                offset: tlv.offset,
                what: "nesting too deep",
            });
        }
        Ok(Self {
            buf: tlv.content,
            pos: 0,
            base: tlv.content_offset,
            depth: depth + 1,
        })
    }

    fn err(&self, what: &'static str) -> CmsError {
        CmsError::Malformed {
            offset: self.base + self.pos,
            what,
        }
    }

    fn byte(&mut self) -> Result<u8, CmsError> {
        let b = *self.buf.get(self.pos).ok_or(self.err("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn at_eoc(&self) -> bool {
        self.buf.get(self.pos..self.pos + 2) == Some(&[0, 0])
    }

    /// Reads the next element, finding the end of an indefinite-length one by walking its
    /// children (X.690 §8.1.3.6).
    fn next(&mut self) -> Result<Tlv<'a>, CmsError> {
        let offset = self.base + self.pos;
        let tag = self.byte()?;
        if tag & 0x1f == 0x1f {
            return Err(self.err("multi-byte tags are not used by KMS"));
        }
        let constructed = tag & 0x20 != 0;
        let first = self.byte()?;
        let start = self.pos;
        let end = match first {
            0x80 => {
                if !constructed {
                    return Err(self.err("indefinite length on a primitive element"));
                }
                let mut children = Ber {
                    buf: self.buf,
                    pos: start,
                    base: self.base,
                    depth: self.depth,
                };
                if self.depth >= MAX_DEPTH {
                    return Err(self.err("nesting too deep"));
                }
                children.depth += 1;
                while !children.at_eoc() {
                    children.next()?;
                }
                let end = children.pos;
                self.pos = end + 2; // skip end-of-contents
                let content = self.buf.get(start..end).ok_or(self.err("truncated"))?;
                return Ok(Tlv {
                    tag,
                    offset,
                    content,
                    content_offset: self.base + start,
                });
            }
            0..=0x7f => start + usize::from(first),
            0x81..=0x84 => {
                let mut len = 0usize;
                for _ in 0..(first & 0x7f) {
                    len = (len << 8) | usize::from(self.byte()?);
                }
                self.pos + len
            }
            _ => return Err(self.err("unsupported length form")),
        };
        let start = self.pos;
        let content = self
            .buf
            .get(start..end)
            .ok_or(self.err("length past the end"))?;
        self.pos = end;
        Ok(Tlv {
            tag,
            offset,
            content,
            content_offset: self.base + start,
        })
    }

    fn expect(&mut self, tag: u8, what: &'static str) -> Result<Tlv<'a>, CmsError> {
        if self.at_end() {
            return Err(self.err(what));
        }
        let t = self.next()?;
        if t.tag != tag {
            return Err(CmsError::Malformed {
                offset: t.offset,
                what,
            });
        }
        Ok(t)
    }

    fn child(&self, tlv: &Tlv<'a>) -> Result<Ber<'a>, CmsError> {
        Self::inside(tlv, self.depth)
    }

    fn finish(&self, what: &'static str) -> Result<(), CmsError> {
        if self.at_end() {
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    fn expect_oid(&mut self, oid: &[u8], what: &'static str) -> Result<(), CmsError> {
        let t = self.expect(0x06, what)?;
        if t.content != oid {
            return Err(CmsError::Unsupported(what));
        }
        Ok(())
    }

    fn expect_small_int(&mut self, value: u8, what: &'static str) -> Result<(), CmsError> {
        let t = self.expect(0x02, what)?;
        if t.content != [value] {
            return Err(CmsError::Unsupported(what));
        }
        Ok(())
    }

    /// `AlgorithmIdentifier { sha256, NULL or absent }` (RFC 4055 §2.1 allows both).
    fn expect_sha256(&mut self, what: &'static str) -> Result<(), CmsError> {
        let alg = self.expect(0x30, what)?;
        let mut a = self.child(&alg)?;
        a.expect_oid(OID_SHA256, what)?;
        if !a.at_end() {
            let null = a.expect(0x05, what)?;
            if !null.content.is_empty() {
                return Err(CmsError::Unsupported(what));
            }
        }
        a.finish(what)
    }
}

/// The parts of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The recipient's SubjectKeyIdentifier.
    pub subject_key_id: Vec<u8>,
    /// The RSA-OAEP encrypted content key.
    pub encrypted_key: Vec<u8>,
    /// The AES-CBC IV.
    pub iv: [u8; 16],
    /// The AES-256-CBC ciphertext.
    pub ciphertext: Vec<u8>,
}

impl Envelope {
    /// Parses KMS's `CiphertextForRecipient`.
    pub fn parse(ber: &[u8]) -> Result<Self, CmsError> {
        if ber.len() > MAX_ENVELOPE {
            return Err(CmsError::TooLarge(ber.len()));
        }
        let mut top = Ber::new(ber);
        let content_info = top.expect(0x30, "ContentInfo")?;
        top.finish("bytes after ContentInfo")?;
        let mut ci = top.child(&content_info)?;
        ci.expect_oid(OID_ENVELOPED_DATA, "content type envelopedData")?;
        let explicit = ci.expect(0xa0, "[0] content")?;
        ci.finish("bytes after ContentInfo content")?;
        let mut e = ci.child(&explicit)?;
        let enveloped = e.expect(0x30, "EnvelopedData")?;
        e.finish("bytes after EnvelopedData")?;

        let mut ed = e.child(&enveloped)?;
        ed.expect_small_int(2, "EnvelopedData version 2")?;
        let infos = ed.expect(0x31, "recipientInfos (originatorInfo is not supported)")?;
        let mut ri = ed.child(&infos)?;
        let ktri = ri.expect(0x30, "KeyTransRecipientInfo")?;
        if !ri.at_end() {
            return Err(CmsError::Unsupported("more than one recipient"));
        }
        let (subject_key_id, encrypted_key) = parse_ktri(&ri.child(&ktri)?)?;

        let eci = ed.expect(0x30, "EncryptedContentInfo")?;
        if !ed.at_end() {
            return Err(CmsError::Unsupported("unprotected attributes"));
        }
        let mut c = ed.child(&eci)?;
        c.expect_oid(OID_DATA, "content type data")?;
        let alg = c.expect(0x30, "contentEncryptionAlgorithm")?;
        let mut a = c.child(&alg)?;
        a.expect_oid(OID_AES256_CBC, "content encryption aes256-CBC")?;
        let iv = a.expect(0x04, "AES-CBC IV")?;
        a.finish("bytes after the IV")?;
        let iv: [u8; 16] = iv
            .content
            .try_into()
            .map_err(|_| CmsError::Unsupported("IV is not 16 bytes"))?;
        let content = c.expect_either(0x80, 0xa0, "encryptedContent [0]")?;
        c.finish("bytes after encryptedContent")?;
        let ciphertext = if content.tag == 0x80 {
            content.content.to_vec()
        } else {
            // Constructed form: the concatenation of its OCTET STRING segments.
            let mut parts = c.child(&content)?;
            let mut out = Vec::with_capacity(content.content.len());
            while !parts.at_end() {
                out.extend_from_slice(parts.expect(0x04, "encryptedContent segment")?.content);
            }
            out
        };
        if ciphertext.is_empty() || ciphertext.len() % 16 != 0 {
            return Err(CmsError::Unsupported("ciphertext is not whole AES blocks"));
        }
        Ok(Self {
            subject_key_id,
            encrypted_key,
            iv,
            ciphertext,
        })
    }
}

impl<'a> Ber<'a> {
    fn expect_either(&mut self, a: u8, b: u8, what: &'static str) -> Result<Tlv<'a>, CmsError> {
        if self.at_end() {
            return Err(self.err(what));
        }
        let t = self.next()?;
        if t.tag != a && t.tag != b {
            return Err(CmsError::Malformed {
                offset: t.offset,
                what,
            });
        }
        Ok(t)
    }
}

fn parse_ktri(k: &Ber<'_>) -> Result<(Vec<u8>, Vec<u8>), CmsError> {
    let mut k = Ber { ..*k };
    k.expect_small_int(2, "KeyTransRecipientInfo version 2")?;
    let ski = k.expect(0x80, "rid [0] SubjectKeyIdentifier")?;
    let alg = k.expect(0x30, "keyEncryptionAlgorithm")?;
    let mut a = k.child(&alg)?;
    a.expect_oid(OID_RSAES_OAEP, "key encryption rsaesOaep")?;
    // RSAES-OAEP-params (RFC 4055 §4.1): hash [0] SHA-256, mask [1] MGF1(SHA-256),
    // no [2] label (the default, empty).
    let params = a.expect(0x30, "RSAES-OAEP-params")?;
    a.finish("bytes after RSAES-OAEP-params")?;
    let mut p = a.child(&params)?;
    let hash = p.expect(0xa0, "OAEP hashAlgorithm [0]")?;
    let mut h = p.child(&hash)?;
    h.expect_sha256("OAEP hash SHA-256")?;
    h.finish("bytes after OAEP hash")?;
    let mgf = p.expect(0xa1, "OAEP maskGenAlgorithm [1]")?;
    p.finish("OAEP label (pSourceAlgorithm) is not supported")?;
    let mut m = p.child(&mgf)?;
    let mgf_alg = m.expect(0x30, "MGF AlgorithmIdentifier")?;
    m.finish("bytes after MGF")?;
    let mut mg = m.child(&mgf_alg)?;
    mg.expect_oid(OID_MGF1, "mask generation MGF1")?;
    mg.expect_sha256("MGF1 hash SHA-256")?;
    mg.finish("bytes after MGF1 parameters")?;
    let encrypted_key = k.expect(0x04, "encryptedKey")?;
    k.finish("bytes after encryptedKey")?;
    Ok((ski.content.to_vec(), encrypted_key.content.to_vec()))
}

/// The enclave's ephemeral RSA key for KMS key release. Never leaves the enclave; the
/// private key is freed (and cleansed by AWS-LC) on drop.
pub struct RecipientKey {
    key: OaepPrivateDecryptingKey,
    spki: Vec<u8>,
}

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecipientKey")
            .field(
                "spki_sha256",
                &crate::sealed::hex_lower(&self.subject_key_id()),
            )
            .finish_non_exhaustive()
    }
}

impl RecipientKey {
    /// A fresh RSA-2048 key, as KMS's `Recipient` requires.
    pub fn generate() -> Result<Self, CmsError> {
        let key = PrivateDecryptingKey::generate(KeySize::Rsa2048)
            .map_err(|_| CmsError::Crypto("RSA-2048 key generation"))?;
        Self::from_private(key)
    }

    /// A key from PKCS#8 (tests with the real vector's key).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CmsError> {
        let key = PrivateDecryptingKey::from_pkcs8(pkcs8)
            .map_err(|_| CmsError::Crypto("not an RSA PKCS#8 key"))?;
        Self::from_private(key)
    }

    fn from_private(key: PrivateDecryptingKey) -> Result<Self, CmsError> {
        let spki = key
            .public_key()
            .as_der()
            .map_err(|_| CmsError::Crypto("SPKI encoding"))?
            .as_ref()
            .to_vec();
        let key =
            OaepPrivateDecryptingKey::new(key).map_err(|_| CmsError::Crypto("RSA-OAEP key"))?;
        Ok(Self { key, spki })
    }

    /// The DER SubjectPublicKeyInfo: the attestation document's `public_key`.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    /// SHA-256 of the SPKI: the SubjectKeyIdentifier KMS addresses the envelope to.
    pub fn subject_key_id(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, &self.spki).as_ref());
        out
    }

    /// Decrypts an envelope addressed to this key.
    pub fn open(&self, envelope: &Envelope) -> Result<Zeroizing<Vec<u8>>, CmsError> {
        if envelope.subject_key_id != self.subject_key_id() {
            return Err(CmsError::WrongRecipient);
        }
        let mut cek = Zeroizing::new(vec![0u8; self.key.min_output_size()]);
        let cek_len = self
            .key
            .decrypt(
                &OAEP_SHA256_MGF1SHA256,
                &envelope.encrypted_key,
                &mut cek,
                None,
            )
            .map_err(|_| CmsError::KeyDecryption)?
            .len();
        let cek = cek.get(..cek_len).ok_or(CmsError::KeyDecryption)?;
        let key = UnboundCipherKey::new(&AES_256, cek).map_err(|_| CmsError::KeyDecryption)?;
        let key = PaddedBlockDecryptingKey::cbc_pkcs7(key).map_err(|_| CmsError::KeyDecryption)?;
        let mut buf = Zeroizing::new(envelope.ciphertext.clone());
        let len = key
            .decrypt(
                &mut buf,
                DecryptionContext::Iv128(FixedLength::from(envelope.iv)),
            )
            .map_err(|_| CmsError::ContentDecryption)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// Appends a definite BER/DER length.
fn push_len(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        _ => {
            out.push(0x82);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// Builds what KMS returns as `CiphertextForRecipient` for `plaintext`, addressed to the RSA
/// key in `recipient_spki`, in KMS's byte layout (indefinite lengths where KMS uses them).
pub fn envelope_for_recipient(
    recipient_spki: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CmsError> {
    if plaintext.len() > 8192 {
        return Err(CmsError::TooLarge(plaintext.len()));
    }
    let rng = SystemRandom::new();
    let public = PublicEncryptingKey::from_der(recipient_spki)
        .map_err(|_| CmsError::Unsupported("recipient key is not an RSA SubjectPublicKeyInfo"))?;
    let public =
        OaepPublicEncryptingKey::new(public).map_err(|_| CmsError::Crypto("RSA-OAEP key"))?;
    let mut cek = Zeroizing::new([0u8; 32]);
    let mut iv = [0u8; 16];
    rng.fill(cek.as_mut())
        .map_err(|_| CmsError::Crypto("random key"))?;
    rng.fill(&mut iv)
        .map_err(|_| CmsError::Crypto("random IV"))?;
    let mut encrypted_key = vec![0u8; public.ciphertext_size()];
    let encrypted_key = public
        .encrypt(
            &OAEP_SHA256_MGF1SHA256,
            cek.as_ref(),
            &mut encrypted_key,
            None,
        )
        .map_err(|_| CmsError::Crypto("RSA-OAEP encryption"))?
        .to_vec();
    let key =
        UnboundCipherKey::new(&AES_256, cek.as_ref()).map_err(|_| CmsError::Crypto("AES key"))?;
    let key =
        PaddedBlockEncryptingKey::cbc_pkcs7(key).map_err(|_| CmsError::Crypto("AES-CBC key"))?;
    let mut ciphertext = plaintext.to_vec();
    key.less_safe_encrypt(
        &mut ciphertext,
        EncryptionContext::Iv128(FixedLength::from(iv)),
    )
    .map_err(|_| CmsError::Crypto("AES-CBC encryption"))?;

    let ski = digest(&SHA256, recipient_spki);
    let sha256_alg = [tlv(0x06, OID_SHA256), tlv(0x05, &[])].concat();
    let oaep_params = tlv(
        0x30,
        &[
            tlv(0xa0, &tlv(0x30, &sha256_alg)),
            tlv(
                0xa1,
                &tlv(
                    0x30,
                    &[tlv(0x06, OID_MGF1), tlv(0x30, &sha256_alg)].concat(),
                ),
            ),
        ]
        .concat(),
    );
    let ktri = tlv(
        0x30,
        &[
            tlv(0x02, &[2]),
            tlv(0x80, ski.as_ref()),
            tlv(0x30, &[tlv(0x06, OID_RSAES_OAEP), oaep_params].concat()),
            tlv(0x04, &encrypted_key),
        ]
        .concat(),
    );
    // Indefinite-length constructed elements, as KMS sends them: 0x30 0x80 … 0x00 0x00.
    let mut out = Vec::with_capacity(ciphertext.len() + 512);
    out.extend_from_slice(&[0x30, 0x80]);
    out.extend_from_slice(&tlv(0x06, OID_ENVELOPED_DATA));
    out.extend_from_slice(&[0xa0, 0x80, 0x30, 0x80]);
    out.extend_from_slice(&tlv(0x02, &[2]));
    out.extend_from_slice(&tlv(0x31, &ktri));
    out.extend_from_slice(&[0x30, 0x80]);
    out.extend_from_slice(&tlv(0x06, OID_DATA));
    out.extend_from_slice(&tlv(
        0x30,
        &[tlv(0x06, OID_AES256_CBC), tlv(0x04, &iv)].concat(),
    ));
    out.extend_from_slice(&[0xa0, 0x80]);
    out.extend_from_slice(&tlv(0x04, &ciphertext));
    out.extend_from_slice(&[0; 10]); // five end-of-contents markers
    ciphertext.zeroize();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_a_fresh_key() {
        let key = RecipientKey::generate().unwrap();
        for len in [0, 1, 15, 16, 32, 1024, 4096] {
            let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let env = envelope_for_recipient(key.public_key_der(), &plaintext).unwrap();
            let parsed = Envelope::parse(&env).unwrap();
            assert_eq!(parsed.subject_key_id, key.subject_key_id());
            assert_eq!(&key.open(&parsed).unwrap()[..], &plaintext[..], "{len}");
        }
    }

    #[test]
    fn another_recipient_is_refused() {
        let a = RecipientKey::generate().unwrap();
        let b = RecipientKey::generate().unwrap();
        let env = Envelope::parse(&envelope_for_recipient(a.public_key_der(), b"secret").unwrap())
            .unwrap();
        assert_eq!(b.open(&env), Err(CmsError::WrongRecipient));
        // Same SKI claimed, wrong key: decryption fails rather than yielding garbage.
        let mut forged = env.clone();
        forged.subject_key_id = b.subject_key_id().to_vec();
        assert_eq!(b.open(&forged), Err(CmsError::KeyDecryption));
    }

    #[test]
    fn hostile_input_is_an_error() {
        let key = RecipientKey::generate().unwrap();
        let env = envelope_for_recipient(key.public_key_der(), b"0123456789abcdef0123").unwrap();
        for cut in 0..env.len() {
            assert!(Envelope::parse(&env[..cut]).is_err(), "truncated at {cut}");
        }
        let mut extra = env.clone();
        extra.push(0);
        assert!(Envelope::parse(&extra).is_err());
        // Deep nesting of indefinite lengths stops at the bound.
        let deep: Vec<u8> = std::iter::repeat_n([0x30u8, 0x80], 200).flatten().collect();
        assert!(Envelope::parse(&deep).is_err());
        assert!(matches!(
            Envelope::parse(&vec![0u8; MAX_ENVELOPE + 1]),
            Err(CmsError::TooLarge(_))
        ));
    }
}
