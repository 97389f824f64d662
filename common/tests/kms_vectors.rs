//! The real KMS `CiphertextForRecipient` envelopes in `../shared/vectors/kms` parse as
//! documented there, and the one with a known private key decrypts to `Hello, World`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use common::cms::{envelope_for_recipient, CmsError, Envelope, RecipientKey};
use std::path::PathBuf;

fn vector(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/vectors/kms")
        .join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (../shared beside the checkout)", path.display()))
}

fn enclaver_key() -> RecipientKey {
    let pem = vector("kms_enclaver_recipient_private_key.pem");
    let (label, der) = der::pem::decode_vec(&pem).unwrap();
    assert_eq!(label, "PRIVATE KEY");
    RecipientKey::from_pkcs8(&der).unwrap()
}

#[test]
fn enclaver_envelope_decrypts_to_hello_world() {
    let key = enclaver_key();
    let env = Envelope::parse(&vector("kms_enclaver_ciphertext_for_recipient.ber")).unwrap();
    assert_eq!(
        env.subject_key_id,
        key.subject_key_id(),
        "SKI = SHA-256 of the SPKI"
    );
    assert_eq!(&key.open(&env).unwrap()[..], b"Hello, World");
}

#[test]
fn sdk_c_envelopes_parse_to_their_documented_parts() {
    for (input, suffix) in [
        ("kms_sdkc_input_ber.bin", ""),
        ("kms_sdkc_input_ber_w_ctx.bin", "_w_ctx"),
    ] {
        let env = Envelope::parse(&vector(input)).unwrap();
        assert_eq!(
            env.encrypted_key,
            vector(&format!("kms_sdkc_encrypted_key_out{suffix}.bin")),
            "{input}"
        );
        assert_eq!(
            env.iv.to_vec(),
            vector(&format!("kms_sdkc_iv_out{suffix}.bin")),
            "{input}"
        );
        assert_eq!(
            env.ciphertext,
            vector(&format!("kms_sdkc_ciphertext_out{suffix}.bin")),
            "{input}"
        );
        // Addressed to a key we do not have.
        assert_eq!(enclaver_key().open(&env), Err(CmsError::WrongRecipient));
    }
}

#[test]
fn our_envelopes_have_the_real_layout() {
    // Same key as the real envelope, so the same SKI and lengths: the bytes around the
    // random parts must be identical to KMS's.
    let key = enclaver_key();
    let real = vector("kms_enclaver_ciphertext_for_recipient.ber");
    let ours = envelope_for_recipient(key.public_key_der(), b"Hello, World").unwrap();
    assert_eq!(ours.len(), real.len());
    // Prefix up to and including the SKI, and the algorithm identifiers up to the key.
    assert_eq!(ours[..131], real[..131]);
    // After the 256-byte encrypted key: content type, algorithm, IV header, content header.
    assert_eq!(ours[387..415], real[387..415]);
    assert_eq!(ours[431..435], real[431..435]);
    assert_eq!(ours[451..], real[451..]);
    assert_eq!(
        &key.open(&Envelope::parse(&ours).unwrap()).unwrap()[..],
        b"Hello, World"
    );
}

#[test]
fn every_single_byte_corruption_of_the_real_envelope_is_caught() {
    let key = enclaver_key();
    let real = vector("kms_enclaver_ciphertext_for_recipient.ber");
    for i in 0..real.len() {
        let mut t = real.clone();
        t[i] ^= 0x01;
        let result = Envelope::parse(&t).and_then(|e| key.open(&e));
        // A flip in the IV or in the content's first block can still decrypt, but never to
        // the original message: CBC is unauthenticated, which is why the data key is then
        // checked by AES-GCM on the sealed model.
        if let Ok(plain) = result {
            assert_ne!(&plain[..], b"Hello, World", "byte {i}");
        }
    }
}
