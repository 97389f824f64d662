//! Key policies, evaluated as AWS IAM does (IAM User Guide, "Policy evaluation logic"): an
//! explicit `Deny` that matches wins, otherwise a matching `Allow` is needed, otherwise the
//! request is denied. A statement matches when its `Action` matches and every condition
//! holds; a condition on a key the request does not have is false.
//!
//! Supported: `Effect`, `Action` (string or list, `*` wildcards), `Principal` (required, as
//! in every key policy: `"*"`, or `{"AWS": …}` with `*`, account ids, account roots, users,
//! roles and role sessions, evaluated by [`Principal::is_named_by`]), `Resource` (accepted,
//! not evaluated: a key policy applies to its own key), and the condition operators
//! `StringEquals`, `StringEqualsIgnoreCase` and `Null` with string or list values on these
//! keys only: `kms:RecipientAttestation:ImageSha384` and `kms:RecipientAttestation:PCR0`…
//! `PCR31` (AWS KMS Developer Guide, "Condition keys for AWS Nitro Enclaves"),
//! `kms:EncryptionContext:<key>`, `kms:CallerAccount`, `aws:PrincipalArn` and
//! `aws:PrincipalAccount`. Anything else is refused when the policy is set, rather than
//! silently ignored: a condition the mock cannot evaluate would make it answer differently
//! from AWS.

use crate::identity::{validate_entry, Principal};
use serde_json::Value;
use std::collections::BTreeMap;

/// The policy a key gets when `CreateKey` names none (AWS KMS Developer Guide, "Default key
/// policy"): the key's account may do everything, through its IAM policies.
pub fn default_policy(account: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{account}:root") },
            "Action": "kms:*",
            "Resource": "*"
        }]
    })
    .to_string()
}

/// The request's condition values, keyed by lower-cased condition key.
pub type ConditionValues = BTreeMap<String, String>;

/// The values every request carries about its caller.
pub fn caller_values(caller: &Principal) -> ConditionValues {
    [
        ("kms:calleraccount", caller.account()),
        ("aws:principalaccount", caller.account()),
        ("aws:principalarn", caller.policy_arn()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Whether the mock evaluates condition key `key` (lower-cased).
fn known_condition_key(key: &str) -> bool {
    if let Some(pcr) = key.strip_prefix("kms:recipientattestation:pcr") {
        let canonical = pcr == "0" || (!pcr.starts_with('0') && !pcr.is_empty() && pcr.len() <= 2);
        return canonical
            && pcr.bytes().all(|b| b.is_ascii_digit())
            && pcr.parse::<u8>().is_ok_and(|i| i <= 31);
    }
    if let Some(k) = key.strip_prefix("kms:encryptioncontext:") {
        return !k.is_empty();
    }
    [
        "kms:recipientattestation:imagesha384",
        "kms:calleraccount",
        "aws:principalarn",
        "aws:principalaccount",
    ]
    .contains(&key)
}

/// The outcome of evaluating a policy for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A matching `Deny`: nothing (no grant either) can allow it.
    ExplicitDeny,
    /// A matching `Allow` and no matching `Deny`.
    Allow,
    /// Nothing matched: denied unless a grant allows it.
    ImplicitDeny,
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
    /// `"true"`: the key is absent from the request; `"false"`: it is present.
    Null,
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
    /// Principal entries; `*` for everyone.
    principals: Vec<String>,
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
            let principals = parse_principal(s.get("Principal").ok_or(
                "Principal is missing (every statement of a key policy names its principals)",
            )?)?;
            let actions = strings(s.get("Action").ok_or("Action is missing")?, "Action")?;
            let mut conditions = Vec::new();
            if let Some(c) = s.get("Condition") {
                for (op, block) in c.as_object().ok_or("Condition must be an object")? {
                    let operator = match op.as_str() {
                        "StringEquals" => Operator::StringEquals,
                        "StringEqualsIgnoreCase" => Operator::StringEqualsIgnoreCase,
                        "Null" => Operator::Null,
                        other => return Err(format!("unsupported condition operator {other}")),
                    };
                    for (key, values) in block
                        .as_object()
                        .ok_or("condition blocks must be objects")?
                    {
                        let lower = key.to_ascii_lowercase();
                        if !known_condition_key(&lower) {
                            return Err(format!("unsupported condition key {key}"));
                        }
                        let values = strings(values, key)?;
                        if operator == Operator::Null
                            && !values.iter().all(|v| v == "true" || v == "false")
                        {
                            return Err(format!("Null on {key} takes \"true\" or \"false\""));
                        }
                        conditions.push(Condition {
                            operator,
                            key: lower,
                            values,
                        });
                    }
                }
            }
            statements.push(Statement {
                effect,
                principals,
                actions,
                conditions,
            });
        }
        Ok(Self { statements })
    }

    /// How the policy decides `action` (e.g. `kms:Decrypt`) by `caller`, with the request's
    /// condition values (keys lower-cased).
    pub fn evaluate(&self, caller: &Principal, action: &str, values: &ConditionValues) -> Decision {
        let matching = |effect| {
            self.statements.iter().any(|s| {
                s.effect == effect
                    && s.principals.iter().any(|p| caller.is_named_by(p))
                    && s.actions.iter().any(|a| wildcard(a, action))
                    && s.conditions.iter().all(|c| c.holds(values))
            })
        };
        if matching(Effect::Deny) {
            Decision::ExplicitDeny
        } else if matching(Effect::Allow) {
            Decision::Allow
        } else {
            Decision::ImplicitDeny
        }
    }
}

impl Condition {
    /// Whether the request's values satisfy this condition; a key the request lacks fails
    /// every operator but `Null`.
    fn holds(&self, values: &ConditionValues) -> bool {
        let actual = values.get(&self.key);
        self.values.iter().any(|v| match (self.operator, actual) {
            (Operator::Null, a) => (v == "true") == a.is_none(),
            (_, None) => false,
            (Operator::StringEquals, Some(a)) => v == a,
            (Operator::StringEqualsIgnoreCase, Some(a)) => v.eq_ignore_ascii_case(a),
        })
    }
}

/// A statement's `Principal`: `"*"`, or `{"AWS": entry or list}`. Service, federated and
/// canonical-user principals are not modelled.
fn parse_principal(v: &Value) -> Result<Vec<String>, String> {
    let entries = match v {
        Value::String(s) if s == "*" => return Ok(vec!["*".into()]),
        Value::Object(o) => {
            if let Some(other) = o.keys().find(|k| k.as_str() != "AWS") {
                return Err(format!("unsupported principal type {other}"));
            }
            strings(
                o.get("AWS").ok_or("Principal needs an AWS entry")?,
                "Principal",
            )?
        }
        _ => return Err("Principal must be \"*\" or {\"AWS\": …}".into()),
    };
    if entries.is_empty() {
        return Err("Principal names nobody".into());
    }
    for e in &entries {
        validate_entry(e, true).map_err(|e| format!("invalid principal: {e}"))?;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> ConditionValues {
        pairs
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect()
    }

    fn who(arn: &str) -> Principal {
        Principal::parse(arn).unwrap()
    }

    fn allows(p: &KeyPolicy, caller: &str, action: &str, values: &ConditionValues) -> bool {
        p.evaluate(&who(caller), action, values) == Decision::Allow
    }

    const ROOT: &str = "arn:aws:iam::000000000000:root";

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
        assert!(allows(&p, ROOT, "kms:Encrypt", &ctx(&[])));
        assert!(allows(
            &p,
            ROOT,
            "kms:GenerateDataKeyWithoutPlaintext",
            &ctx(&[])
        ));
        let good = ctx(&[
            ("kms:RecipientAttestation:ImageSha384", "abcd"),
            ("kms:RecipientAttestation:PCR16", "22"),
        ]);
        assert!(allows(&p, ROOT, "kms:Decrypt", &good));
        assert!(
            !allows(
                &p,
                ROOT,
                "kms:Decrypt",
                &ctx(&[("kms:RecipientAttestation:ImageSha384", "abcd")])
            ),
            "missing key is false"
        );
        assert!(
            !allows(&p, ROOT, "kms:Decrypt", &ctx(&[])),
            "no attestation"
        );
        let bad = ctx(&[
            ("kms:RecipientAttestation:ImageSha384", "abce"),
            ("kms:RecipientAttestation:PCR16", "22"),
        ]);
        assert!(!allows(&p, ROOT, "kms:Decrypt", &bad));
        assert_eq!(
            p.evaluate(&who(ROOT), "kms:CreateAlias", &good),
            Decision::ImplicitDeny,
            "no statement allows it"
        );
    }

    #[test]
    fn principals_are_evaluated() {
        let p = KeyPolicy::parse(
            r#"{"Statement":[
                {"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111111111111:root"},"Action":"kms:PutKeyPolicy"},
                {"Effect":"Allow","Principal":{"AWS":["arn:aws:iam::222222222222:role/parent"]},"Action":"kms:Decrypt"},
                {"Effect":"Allow","Principal":{"AWS":"333333333333"},"Action":"kms:Encrypt"}
            ]}"#,
        )
        .unwrap();
        let none = ctx(&[]);
        assert!(allows(
            &p,
            "arn:aws:iam::111111111111:user/owner",
            "kms:PutKeyPolicy",
            &none
        ));
        assert!(!allows(
            &p,
            "arn:aws:iam::222222222222:role/parent",
            "kms:PutKeyPolicy",
            &none
        ));
        assert!(allows(
            &p,
            "arn:aws:sts::222222222222:assumed-role/parent/i-1",
            "kms:Decrypt",
            &none
        ));
        assert!(!allows(
            &p,
            "arn:aws:iam::222222222222:user/admin",
            "kms:Decrypt",
            &none
        ));
        assert!(
            !allows(&p, "arn:aws:iam::222222222222:root", "kms:Decrypt", &none),
            "naming a role does not name its account"
        );
        assert!(allows(
            &p,
            "arn:aws:iam::333333333333:user/u",
            "kms:Encrypt",
            &none
        ));
    }

    #[test]
    fn deny_wins_null_and_default_allows() {
        let p = KeyPolicy::parse(
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*"},
                {"Effect":"Deny","Principal":{"AWS":"*"},"Action":"kms:Decrypt",
                 "Condition":{"Null":{"kms:RecipientAttestation:ImageSha384":"true"}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            p.evaluate(&who(ROOT), "kms:Decrypt", &ctx(&[])),
            Decision::ExplicitDeny
        );
        assert!(allows(
            &p,
            ROOT,
            "kms:Decrypt",
            &ctx(&[("kms:RecipientAttestation:ImageSha384", "ab")])
        ));
        assert!(allows(&p, ROOT, "kms:Encrypt", &ctx(&[])));
        let d = KeyPolicy::parse(&default_policy("000000000000")).unwrap();
        assert!(allows(&d, ROOT, "kms:Decrypt", &ctx(&[])));
        assert!(allows(
            &d,
            "arn:aws:iam::000000000000:role/r",
            "kms:CreateGrant",
            &ctx(&[])
        ));
        assert!(!allows(
            &d,
            "arn:aws:iam::111111111111:root",
            "kms:Decrypt",
            &ctx(&[])
        ));
    }

    #[test]
    fn unsupported_constructs_are_refused() {
        for bad in [
            "[]",
            r#"{"Statement":[{"Effect":"Maybe","Principal":"*","Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","NotAction":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Condition":{"StringLike":{"kms:CallerAccount":"b"}}}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":7}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"bob"},"Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":[]},"Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","NotPrincipal":{"AWS":"*"},"Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Condition":{"StringEquals":{"kms:ViaService":"ec2"}}}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Condition":{"StringEquals":{"kms:RecipientAttestation:PCR32":"00"}}}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Condition":{"StringEquals":{"kms:RecipientAttestation:PCR016":"00"}}}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Condition":{"Null":{"kms:CallerAccount":"yes"}}}]}"#,
        ] {
            assert!(KeyPolicy::parse(bad).is_err(), "{bad}");
        }
        for good in ["PCR0", "PCR8", "PCR16", "PCR31", "ImageSha384"] {
            let p = format!(
                r#"{{"Statement":[{{"Effect":"Allow","Principal":"*","Action":"kms:Decrypt","Condition":{{"StringEquals":{{"kms:RecipientAttestation:{good}":"00"}}}}}}]}}"#
            );
            assert!(KeyPolicy::parse(&p).is_ok(), "{p}");
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
