//! `host kms-policy`: the KMS key policy that releases the model's data key only to the
//! measured enclave (AWS KMS Developer Guide, "Condition keys for AWS Nitro Enclaves"):
//! `kms:Decrypt` requires `kms:RecipientAttestation:ImageSha384` (= PCR0) and PCR1, PCR2,
//! optionally PCR3/4/8, and PCR16 (the model). Administration and sealing stay with the
//! account; `kms:ReEncrypt*` is deliberately absent, as it would decrypt without attestation.

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// PCRs read from a measurements file.
pub type Measurements = BTreeMap<u8, String>;

/// Why a measurements file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum MeasurementsError {
    /// Not JSON of the expected shape.
    #[error("measurements file: {0}")]
    Format(String),
}

/// Reads `nitro-cli build-enclave` / `describe-eif` output (`{"Measurements": {"PCR0": …}}`)
/// or the same object without the wrapper (`attestation_verifier::parse_measurements`).
pub fn parse_measurements(json_text: &str) -> Result<Measurements, MeasurementsError> {
    let pcrs = attestation_verifier::parse_measurements(json_text)
        .map_err(|e| MeasurementsError::Format(e.to_string()))?;
    Ok(pcrs.into_iter().map(|(i, v)| (i, hex::encode(v))).collect())
}

/// The measurements file the mock NSM's image would have, in nitro-cli's format.
pub fn measurements_json(pcrs: &BTreeMap<u8, [u8; 48]>) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("HashAlgorithm".into(), json!("Sha384 { ... }"));
    for (i, v) in pcrs {
        m.insert(format!("PCR{i}"), json!(hex::encode(v)));
    }
    json!({ "Measurements": m })
}

/// What the policy grants.
#[derive(Debug, Clone)]
pub struct PolicyRequest {
    /// Image PCRs (0, 1, 2 at least).
    pub measurements: Measurements,
    /// Which optional PCRs (3, 4, 8) to require too.
    pub include: Vec<u8>,
    /// PCR16 of the enclave with the sealed model, if the key is bound to one model.
    pub model_pcr16: Option<[u8; 48]>,
    /// The AWS account id.
    pub account: String,
    /// Who administers the key and seals with it (default: the account root).
    pub admin_principal: Option<String>,
    /// Who calls Decrypt on the enclave's behalf: the parent instance's role (default: the
    /// account root).
    pub enclave_principal: Option<String>,
}

/// The key policy document.
pub fn generate(req: &PolicyRequest) -> Result<Value, MeasurementsError> {
    let root = format!("arn:aws:iam::{}:root", req.account);
    let mut conditions = serde_json::Map::new();
    let pcr = |i: u8| {
        req.measurements.get(&i).cloned().ok_or_else(|| {
            MeasurementsError::Format(format!(
                "PCR{i} is required by the policy but not in the measurements"
            ))
        })
    };
    conditions.insert(
        "kms:RecipientAttestation:ImageSha384".into(),
        json!(pcr(0)?),
    );
    for i in [1u8, 2].into_iter().chain(req.include.iter().copied()) {
        conditions.insert(format!("kms:RecipientAttestation:PCR{i}"), json!(pcr(i)?));
    }
    if let Some(p16) = &req.model_pcr16 {
        conditions.insert(
            "kms:RecipientAttestation:PCR16".into(),
            json!(hex::encode(p16)),
        );
    }
    Ok(json!({
        "Version": "2012-10-17",
        "Id": "confidential-inference-key-policy",
        "Statement": [
            {
                "Sid": "KeyAdministrationAndSealing",
                "Effect": "Allow",
                "Principal": { "AWS": req.admin_principal.clone().unwrap_or_else(|| root.clone()) },
                "Action": [
                    "kms:Create*", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*",
                    "kms:Update*", "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*",
                    "kms:TagResource", "kms:UntagResource", "kms:ScheduleKeyDeletion",
                    "kms:CancelKeyDeletion", "kms:Encrypt", "kms:GenerateDataKey",
                    "kms:GenerateDataKeyWithoutPlaintext"
                ],
                "Resource": "*"
            },
            {
                "Sid": "DecryptOnlyForTheAttestedEnclave",
                "Effect": "Allow",
                "Principal": { "AWS": req.enclave_principal.clone().unwrap_or(root) },
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": { "StringEqualsIgnoreCase": conditions }
            }
        ]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NITRO_CLI_OUTPUT: &str = r#"{
      "Measurements": {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": "7fb5c55bc2ecbb68ed99a13d7122abfc0666b926a79d5379bc58b9445c84217f59cfdd36c08b2c79552928702efe23e4",
        "PCR1": "235c9e6050abf6b993c915505f3220e2d82b51aff830ad14cbecc2eec1bf0b4ae749d311c663f464cde9f718acca5286",
        "PCR2": "0f0ac32c300289e872e6ac4d19b0b5ac4a9b020c98295643ff3978610750ce6a86f7edff24e3c0a4a445f2ff8a9ea79d"
      }
    }"#;

    #[test]
    fn policy_from_nitro_cli_measurements() {
        let m = parse_measurements(NITRO_CLI_OUTPUT).unwrap();
        let p = generate(&PolicyRequest {
            measurements: m,
            include: vec![],
            model_pcr16: Some([7; 48]),
            account: "123456789012".into(),
            admin_principal: None,
            enclave_principal: Some("arn:aws:iam::123456789012:role/parent".into()),
        })
        .unwrap();
        let cond = &p["Statement"][1]["Condition"]["StringEqualsIgnoreCase"];
        assert!(cond["kms:RecipientAttestation:ImageSha384"]
            .as_str()
            .unwrap()
            .starts_with("7fb5c5"));
        assert!(cond["kms:RecipientAttestation:PCR2"]
            .as_str()
            .unwrap()
            .starts_with("0f0ac3"));
        assert_eq!(cond["kms:RecipientAttestation:PCR16"], "07".repeat(48));
        let admin = p["Statement"][0]["Action"].as_array().unwrap();
        assert!(!admin
            .iter()
            .any(|a| a == "kms:Decrypt" || a.as_str().unwrap().starts_with("kms:ReEncrypt")));
    }

    #[test]
    fn bad_measurements() {
        assert!(parse_measurements("{}").is_err());
        assert!(parse_measurements(r#"{"PCR0":"00","PCR1":"00","PCR2":"00"}"#).is_err());
        let m = parse_measurements(NITRO_CLI_OUTPUT).unwrap();
        let req = PolicyRequest {
            measurements: m,
            include: vec![8],
            model_pcr16: None,
            account: "1".into(),
            admin_principal: None,
            enclave_principal: None,
        };
        assert!(generate(&req).is_err(), "PCR8 asked for but not measured");
    }
}
