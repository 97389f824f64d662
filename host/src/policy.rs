//! `host kms-policy`: the KMS key policy that releases the model's data key only to the
//! measured enclave (AWS KMS Developer Guide, "Condition keys for AWS Nitro Enclaves"):
//! `kms:Decrypt` requires `kms:RecipientAttestation:ImageSha384` (= PCR0) and PCR1, PCR2,
//! optionally PCR3/4/8, and PCR16 (the model).
//!
//! Who holds what (docs/security.md, "Key ownership"): the key lives in the **model owner's**
//! account and the owner administers it and seals with it; the **enclave principal** (the
//! parent instance's role, in the operator's account) may only `Decrypt` with those
//! attestation conditions. Nobody in the operator's account gets `CreateGrant`,
//! `PutKeyPolicy` or `ReEncrypt*`, and an explicit `Deny` says so, so that no later `Allow`
//! or grant can hand the operator a decrypt without attestation (a grant or a rewritten
//! policy would be enough for it to unwrap the sealed header's data key on its own). When
//! owner and operator share an account, the account's administrators are the operator: the
//! policy is then refused unless it is immutable (it grants nobody administration, and the
//! key must be created with `BypassPolicyLockoutSafetyCheck`).

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// PCRs read from a measurements file.
pub type Measurements = BTreeMap<u8, String>;

/// Why a measurements file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum MeasurementsError {
    /// Not JSON of the expected shape.
    #[error("measurements file: {0}")]
    Format(#[from] attestation_verifier::PolicyError),
    /// The policy requires a PCR the measurements do not give.
    #[error("PCR{0} is required by the policy but not in the measurements")]
    Missing(u8),
}

/// Reads `nitro-cli build-enclave` / `describe-eif` output (`{"Measurements": {"PCR0": …}}`)
/// or the same object without the wrapper (`attestation_verifier::parse_measurements`).
pub fn parse_measurements(json_text: &str) -> Result<Measurements, MeasurementsError> {
    let pcrs = attestation_verifier::parse_measurements(json_text)?;
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

/// Why no policy was generated.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The measurements lack a PCR the policy needs.
    #[error(transparent)]
    Measurements(#[from] MeasurementsError),
    /// A principal is not an IAM principal ARN.
    #[error("{flag}: {value:?} is not an IAM principal ARN (arn:aws:iam::ACCOUNT:root, :user/NAME or :role/NAME)")]
    Principal {
        /// The flag.
        flag: &'static str,
        /// What it was given.
        value: String,
    },
    /// Owner and enclave principal in one account, and the policy not immutable.
    #[error("the owner and the enclave principal are both in account {0}: that account's administrators (the operator) could administer the key, grant themselves Decrypt and unseal the model. Create the key in the model owner's own account, or pass --immutable for a policy that grants nobody administration")]
    SharedAccount(String),
}

/// The account of an IAM principal ARN (`arn:aws:iam::ACCOUNT:root|user/…|role/…`), if it
/// is one; `*` and anything else is refused, as a policy that names "anyone" here would be.
pub fn principal_account(arn: &str) -> Option<&str> {
    let rest = arn.strip_prefix("arn:aws:iam::")?;
    let (account, resource) = rest.split_once(':')?;
    let named = resource == "root"
        || ["user/", "role/"].iter().any(|p| {
            resource
                .strip_prefix(p)
                .is_some_and(|n| !n.is_empty() && !n.contains(char::is_whitespace))
        });
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) && named).then_some(account)
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
    /// The model owner: administers the key (unless `immutable`) and seals with it.
    pub owner_principal: String,
    /// Who calls Decrypt on the enclave's behalf: the parent instance's role.
    pub enclave_principal: String,
    /// Grant nobody administration (the key can then never be changed).
    pub immutable: bool,
}

/// What the owner may do besides sealing: administration, without `CreateGrant` (nobody
/// needs grants here) and without any decrypting operation.
const OWNER_ADMINISTRATION: [&str; 16] = [
    "kms:PutKeyPolicy",
    "kms:ListGrants",
    "kms:RevokeGrant",
    "kms:ListResourceTags",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:UpdateKeyDescription",
    "kms:EnableKey",
    "kms:DisableKey",
    "kms:EnableKeyRotation",
    "kms:GetKeyRotationStatus",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
    "kms:CreateAlias",
    "kms:UpdateAlias",
    "kms:DeleteAlias",
];

/// Sealing and reading the key's description and policy.
const OWNER_SEALING: [&str; 5] = [
    "kms:DescribeKey",
    "kms:GetKeyPolicy",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
];

/// What nobody in the enclave principal's account may ever do to the key.
const OPERATOR_NEVER: [&str; 4] = [
    "kms:CreateGrant",
    "kms:PutKeyPolicy",
    "kms:ReEncrypt*",
    "kms:RetireGrant",
];

/// The key policy document.
pub fn generate(req: &PolicyRequest) -> Result<Value, PolicyError> {
    let owner_account =
        principal_account(&req.owner_principal).ok_or_else(|| PolicyError::Principal {
            flag: "--owner-principal",
            value: req.owner_principal.clone(),
        })?;
    let operator_account =
        principal_account(&req.enclave_principal).ok_or_else(|| PolicyError::Principal {
            flag: "--enclave-principal",
            value: req.enclave_principal.clone(),
        })?;
    if owner_account == operator_account && !req.immutable {
        return Err(PolicyError::SharedAccount(owner_account.to_owned()));
    }
    let mut conditions = serde_json::Map::new();
    let pcr = |i: u8| {
        req.measurements
            .get(&i)
            .cloned()
            .ok_or(MeasurementsError::Missing(i))
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
    // Denies name the operator's account by `aws:PrincipalAccount` under `Principal: *`, as
    // IAM recommends for "everyone in that account" (IAM User Guide, "AWS global condition
    // context keys"), rather than by the account's root ARN.
    let in_operator_account = json!({ "aws:PrincipalAccount": operator_account });
    let mut statements = Vec::new();
    if !req.immutable {
        statements.push(json!({
            "Sid": "OwnerAdministers",
            "Effect": "Allow",
            "Principal": { "AWS": req.owner_principal },
            "Action": OWNER_ADMINISTRATION,
            "Resource": "*"
        }));
    }
    statements.extend([
        json!({
            "Sid": "OwnerSeals",
            "Effect": "Allow",
            "Principal": { "AWS": req.owner_principal },
            "Action": OWNER_SEALING,
            "Resource": "*"
        }),
        json!({
            "Sid": "DecryptOnlyForTheAttestedEnclave",
            "Effect": "Allow",
            "Principal": { "AWS": req.enclave_principal },
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": { "StringEqualsIgnoreCase": conditions }
        }),
        json!({
            "Sid": "OperatorAccountNeverControlsTheKey",
            "Effect": "Deny",
            "Principal": { "AWS": "*" },
            "Action": OPERATOR_NEVER,
            "Resource": "*",
            "Condition": { "StringEquals": in_operator_account }
        }),
        json!({
            "Sid": "OperatorAccountNeverDecryptsUnattested",
            "Effect": "Deny",
            "Principal": { "AWS": "*" },
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {
                "StringEquals": in_operator_account,
                "Null": { "kms:RecipientAttestation:ImageSha384": "true" }
            }
        }),
    ]);
    let id = if req.immutable {
        "confidential-inference-key-policy-immutable"
    } else {
        "confidential-inference-key-policy"
    };
    Ok(json!({ "Version": "2012-10-17", "Id": id, "Statement": statements }))
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

    const OWNER: &str = "arn:aws:iam::111111111111:root";
    const PARENT: &str = "arn:aws:iam::222222222222:role/parent";

    fn request(owner: &str, enclave: &str, immutable: bool) -> PolicyRequest {
        PolicyRequest {
            measurements: parse_measurements(NITRO_CLI_OUTPUT).unwrap(),
            include: vec![],
            model_pcr16: Some([7; 48]),
            owner_principal: owner.into(),
            enclave_principal: enclave.into(),
            immutable,
        }
    }

    fn statement<'a>(p: &'a Value, sid: &str) -> &'a Value {
        p["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Sid"] == sid)
            .unwrap_or_else(|| panic!("no statement {sid}"))
    }

    fn actions(s: &Value) -> Vec<String> {
        match &s["Action"] {
            Value::String(a) => vec![a.clone()],
            v => v
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect(),
        }
    }

    #[test]
    fn policy_from_nitro_cli_measurements() {
        let p = generate(&request(OWNER, PARENT, false)).unwrap();
        let release = statement(&p, "DecryptOnlyForTheAttestedEnclave");
        assert_eq!(release["Principal"]["AWS"], PARENT);
        let cond = &release["Condition"]["StringEqualsIgnoreCase"];
        assert!(cond["kms:RecipientAttestation:ImageSha384"]
            .as_str()
            .unwrap()
            .starts_with("7fb5c5"));
        assert!(cond["kms:RecipientAttestation:PCR2"]
            .as_str()
            .unwrap()
            .starts_with("0f0ac3"));
        assert_eq!(cond["kms:RecipientAttestation:PCR16"], "07".repeat(48));
        // Every Allow but the release goes to the owner, and none of them decrypts, grants
        // or re-encrypts.
        for s in p["Statement"].as_array().unwrap() {
            if s["Effect"] != "Allow" || s["Sid"] == "DecryptOnlyForTheAttestedEnclave" {
                continue;
            }
            assert_eq!(s["Principal"]["AWS"], OWNER, "{s}");
            for a in actions(s) {
                assert!(
                    !a.contains('*')
                        && a != "kms:Decrypt"
                        && a != "kms:CreateGrant"
                        && !a.starts_with("kms:ReEncrypt"),
                    "{a}"
                );
            }
        }
        assert!(actions(statement(&p, "OwnerAdministers")).contains(&"kms:PutKeyPolicy".into()));
        let never = statement(&p, "OperatorAccountNeverControlsTheKey");
        assert_eq!(never["Effect"], "Deny");
        assert_eq!(
            never["Condition"]["StringEquals"]["aws:PrincipalAccount"],
            "222222222222"
        );
        for a in ["kms:CreateGrant", "kms:PutKeyPolicy", "kms:ReEncrypt*"] {
            assert!(actions(never).contains(&a.to_owned()), "{a}");
        }
        let unattested = statement(&p, "OperatorAccountNeverDecryptsUnattested");
        assert_eq!(
            unattested["Condition"]["Null"]["kms:RecipientAttestation:ImageSha384"],
            "true"
        );
    }

    #[test]
    fn owner_and_operator_in_one_account_need_an_immutable_policy() {
        let same = "arn:aws:iam::222222222222:root";
        assert!(matches!(
            generate(&request(same, PARENT, false)),
            Err(PolicyError::SharedAccount(a)) if a == "222222222222"
        ));
        let p = generate(&request(same, PARENT, true)).unwrap();
        assert_eq!(p["Id"], "confidential-inference-key-policy-immutable");
        let allowed: Vec<String> = p["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["Effect"] == "Allow")
            .flat_map(actions)
            .collect();
        assert!(!allowed.contains(&"kms:PutKeyPolicy".to_owned()));
        assert!(allowed.contains(&"kms:GenerateDataKey".to_owned()));
    }

    #[test]
    fn principals_must_be_iam_arns() {
        for bad in [
            "*",
            "",
            "222222222222",
            "arn:aws:iam::22:root",
            "arn:aws:iam::222222222222:group/g",
            "arn:aws:iam::222222222222:role/",
        ] {
            assert!(
                matches!(
                    generate(&request(bad, PARENT, false)),
                    Err(PolicyError::Principal {
                        flag: "--owner-principal",
                        ..
                    })
                ),
                "{bad}"
            );
            assert!(
                matches!(
                    generate(&request(OWNER, bad, false)),
                    Err(PolicyError::Principal {
                        flag: "--enclave-principal",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_measurements() {
        assert!(parse_measurements("{}").is_err());
        assert!(parse_measurements(r#"{"PCR0":"00","PCR1":"00","PCR2":"00"}"#).is_err());
        let mut req = request(OWNER, PARENT, false);
        req.include = vec![8];
        assert!(
            matches!(generate(&req), Err(PolicyError::Measurements(_))),
            "PCR8 asked for but not measured"
        );
    }
}
