//! Key policies, evaluated as AWS IAM does (IAM User Guide, "Policy evaluation logic"): an
//! explicit `Deny` that matches wins, otherwise a matching `Allow` is needed, otherwise the
//! request is denied. A statement matches when its `Action` matches and every condition
//! holds; a condition on a key the request does not have is false.
//!
//! Supported: `Effect`, `Action` (string or list, `*` wildcards), `Principal` and `Resource`
//! (accepted, not evaluated: the mock has one caller and keys are policy-scoped), and the
//! condition operators `StringEquals` and `StringEqualsIgnoreCase` with string or list values
//! on keys such as `kms:RecipientAttestation:ImageSha384`, `kms:RecipientAttestation:PCR0`…
//! `PCR31` and `kms:EncryptionContext:<key>` (AWS KMS Developer Guide, "Condition keys for
//! AWS Nitro Enclaves"). Anything else is refused when the policy is set, rather than
//! silently ignored.

use serde_json::Value;
use std::collections::BTreeMap;

/// The account the mock pretends to be.
pub const ACCOUNT: &str = "000000000000";

/// The policy a key gets when `CreateKey` names none: the account may do everything.
pub fn default_policy() -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{ACCOUNT}:root") },
            "Action": "kms:*",
            "Resource": "*"
        }]
    })
    .to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    StringEquals,
    StringEqualsIgnoreCase,
}

#[derive(Debug, Clone)]
struct Condition {
    operator: Operator,
    /// Condition key, lower-cased (AWS condition keys are case-insensitive).
    key: String,
    values: Vec<String>,
}

#[derive(Debug, Clone)]
struct Statement {
    effect: Effect,
    actions: Vec<String>,
    conditions: Vec<Condition>,
}

/// A parsed key policy.
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    statements: Vec<Statement>,
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{what} must hold strings"))
            })
            .collect(),
        _ => Err(format!("{what} must be a string or a list of strings")),
    }
}

/// `*` matches any run of characters; comparison ignores ASCII case (IAM actions do).
fn wildcard(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.to_ascii_lowercase(), s.to_ascii_lowercase());
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == s;
    }
    let mut rest = s.as_str();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

impl KeyPolicy {
    /// Parses and validates a policy document.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > 32 * 1024 {
            return Err("policy is larger than 32 KiB".into());
        }
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let obj = doc.as_object().ok_or("policy must be a JSON object")?;
        for k in obj.keys() {
            if !["Version", "Id", "Statement"].contains(&k.as_str()) {
                return Err(format!("unsupported policy element {k}"));
            }
        }
        let raw = match obj.get("Statement") {
            Some(Value::Array(a)) => a.clone(),
            Some(s @ Value::Object(_)) => vec![s.clone()],
            _ => return Err("Statement is missing".into()),
        };
        let mut statements = Vec::with_capacity(raw.len());
        for s in &raw {
            let s = s.as_object().ok_or("each Statement must be an object")?;
            for k in s.keys() {
                if ![
                    "Sid",
                    "Effect",
                    "Principal",
                    "Action",
                    "Resource",
                    "Condition",
                ]
                .contains(&k.as_str())
                {
                    return Err(format!("unsupported statement element {k}"));
                }
            }
            let effect = match s.get("Effect").and_then(Value::as_str) {
                Some("Allow") => Effect::Allow,
                Some("Deny") => Effect::Deny,
                _ => return Err("Effect must be Allow or Deny".into()),
            };
            let actions = strings(s.get("Action").ok_or("Action is missing")?, "Action")?;
            let mut conditions = Vec::new();
            if let Some(c) = s.get("Condition") {
                for (op, block) in c.as_object().ok_or("Condition must be an object")? {
                    let operator = match op.as_str() {
                        "StringEquals" => Operator::StringEquals,
                        "StringEqualsIgnoreCase" => Operator::StringEqualsIgnoreCase,
                        other => return Err(format!("unsupported condition operator {other}")),
                    };
                    for (key, values) in block
                        .as_object()
                        .ok_or("condition blocks must be objects")?
                    {
                        conditions.push(Condition {
                            operator,
                            key: key.to_ascii_lowercase(),
                            values: strings(values, key)?,
                        });
                    }
                }
            }
            statements.push(Statement {
                effect,
                actions,
                conditions,
            });
        }
        Ok(Self { statements })
    }

    /// Whether `action` (e.g. `kms:Decrypt`) is allowed with these request condition values
    /// (keys lower-cased).
    pub fn allows(&self, action: &str, context: &BTreeMap<String, String>) -> bool {
        let matching = |effect| {
            self.statements.iter().any(|s| {
                s.effect == effect
                    && s.actions.iter().any(|a| wildcard(a, action))
                    && s.conditions.iter().all(|c| {
                        context.get(&c.key).is_some_and(|actual| {
                            c.values.iter().any(|v| match c.operator {
                                Operator::StringEquals => v == actual,
                                Operator::StringEqualsIgnoreCase => v.eq_ignore_ascii_case(actual),
                            })
                        })
                    })
            })
        };
        !matching(Effect::Deny) && matching(Effect::Allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect()
    }

    #[test]
    fn attestation_conditions() {
        let p = KeyPolicy::parse(
            r#"{"Statement":[
                {"Effect":"Allow","Action":["kms:Encrypt","kms:GenerateDataKey*"],"Principal":"*","Resource":"*"},
                {"Effect":"Allow","Action":"kms:Decrypt","Principal":"*","Resource":"*",
                 "Condition":{"StringEqualsIgnoreCase":{"kms:RecipientAttestation:ImageSha384":"ABCD","kms:RecipientAttestation:PCR16":["11","22"]}}}
            ]}"#,
        )
        .unwrap();
        assert!(p.allows("kms:Encrypt", &ctx(&[])));
        assert!(p.allows("kms:GenerateDataKeyWithoutPlaintext", &ctx(&[])));
        let good = ctx(&[
            ("kms:RecipientAttestation:ImageSha384", "abcd"),
            ("kms:RecipientAttestation:PCR16", "22"),
        ]);
        assert!(p.allows("kms:Decrypt", &good));
        assert!(
            !p.allows(
                "kms:Decrypt",
                &ctx(&[("kms:RecipientAttestation:ImageSha384", "abcd")])
            ),
            "missing key is false"
        );
        assert!(!p.allows("kms:Decrypt", &ctx(&[])), "no attestation");
        let bad = ctx(&[
            ("kms:RecipientAttestation:ImageSha384", "abce"),
            ("kms:RecipientAttestation:PCR16", "22"),
        ]);
        assert!(!p.allows("kms:Decrypt", &bad));
        assert!(
            !p.allows("kms:CreateAlias", &good),
            "no statement allows it"
        );
    }

    #[test]
    fn deny_wins_and_default_allows() {
        let p = KeyPolicy::parse(
            r#"{"Statement":[{"Effect":"Allow","Action":"kms:*"},{"Effect":"Deny","Action":"kms:Decrypt"}]}"#,
        )
        .unwrap();
        assert!(!p.allows("kms:Decrypt", &ctx(&[])));
        assert!(p.allows("kms:Encrypt", &ctx(&[])));
        assert!(KeyPolicy::parse(&default_policy())
            .unwrap()
            .allows("kms:Decrypt", &ctx(&[])));
    }

    #[test]
    fn unsupported_constructs_are_refused() {
        for bad in [
            "[]",
            r#"{"Statement":[{"Effect":"Maybe","Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","NotAction":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":"kms:*","Condition":{"StringLike":{"a":"b"}}}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":7}]}"#,
        ] {
            assert!(KeyPolicy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("kms:*", "kms:Decrypt"));
        assert!(wildcard("*", "kms:Decrypt"));
        assert!(wildcard("kms:Generate*", "kms:GenerateDataKey"));
        assert!(wildcard("KMS:DECRYPT", "kms:Decrypt"));
        assert!(!wildcard("kms:Encrypt", "kms:EncryptX"));
        assert!(wildcard("kms:*Key*", "kms:GenerateDataKeyPair"));
    }
}
