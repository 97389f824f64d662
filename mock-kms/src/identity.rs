//! Who is calling: SigV4 access key ids mapped to IAM principals (`--principal KEY=ARN`), and
//! principal ARNs as IAM writes them (IAM User Guide, "IAM identifiers"; "AWS JSON policy
//! elements: Principal").
//!
//! The mock holds no secrets, so it does not check signatures: the access key id in the
//! `Credential=` part of the `Authorization` header names the caller. That models what AWS
//! enforces (which principal may do what to a key); it is not itself a security boundary.

use std::collections::BTreeMap;

/// The account every caller belongs to when no `--principal` is configured.
pub const DEFAULT_ACCOUNT: &str = "000000000000";

/// Why an identity could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not an IAM principal ARN this mock models.
    #[error("{0:?} is not an IAM principal ARN (arn:aws:iam::ACCOUNT:root|user/NAME|role/NAME, or arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION)")]
    Arn(String),
    /// Not `ACCESS_KEY_ID=ARN`.
    #[error("{0:?} is not ACCESS_KEY_ID=ARN (an access key id is 1 to 128 letters and digits)")]
    Mapping(String),
    /// The same access key id given twice.
    #[error("access key id {0} is mapped twice")]
    Duplicate(String),
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// IAM names: letters, digits and `+=,.@_-` (IAM User Guide, "IAM and AWS STS quotas"), with
/// `/` for paths.
fn is_iam_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && !s.starts_with('/')
        && !s.ends_with('/')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
}

/// An IAM principal: the account root, a user, a role, or a role session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    arn: String,
    account: String,
    /// The ARN policies name this principal by: a role session is named by its role.
    policy_arn: String,
}

impl Principal {
    /// Parses an IAM principal ARN.
    pub fn parse(arn: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::Arn(arn.to_owned());
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some("aws"), Some(service), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        if !is_account(account) {
            return Err(bad());
        }
        let policy_arn = match service {
            "iam" if resource == "root" => arn.to_owned(),
            "iam" => {
                let name = resource
                    .strip_prefix("user/")
                    .or_else(|| resource.strip_prefix("role/"))
                    .ok_or_else(bad)?;
                if !is_iam_name(name) {
                    return Err(bad());
                }
                arn.to_owned()
            }
            "sts" => {
                let rest = resource.strip_prefix("assumed-role/").ok_or_else(bad)?;
                let (role, session) = rest.split_once('/').ok_or_else(bad)?;
                if !is_iam_name(role) || !is_iam_name(session) || session.contains('/') {
                    return Err(bad());
                }
                format!("arn:aws:iam::{account}:role/{role}")
            }
            _ => return Err(bad()),
        };
        Ok(Self {
            arn: arn.to_owned(),
            account: account.to_owned(),
            policy_arn,
        })
    }

    /// The root of `account` (which must be 12 digits).
    pub fn account_root(account: &str) -> Result<Self, IdentityError> {
        Self::parse(&format!("arn:aws:iam::{account}:root"))
    }

    /// The ARN the caller presents (a session's own ARN for a role session).
    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// The caller's account id.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The ARN key policies and grants name this principal by (`aws:PrincipalArn`).
    pub fn policy_arn(&self) -> &str {
        &self.policy_arn
    }

    /// Whether a policy's principal entry names this caller: `*`, the caller's account (its
    /// root ARN or its 12-digit id: every principal of the account, the mock standing in for
    /// that account's IAM policies), or the caller's own ARN.
    pub fn is_named_by(&self, entry: &str) -> bool {
        if entry == "*" {
            return true;
        }
        if is_account(entry) {
            return entry == self.account;
        }
        match entry
            .strip_prefix("arn:aws:iam::")
            .and_then(|r| r.strip_suffix(":root"))
        {
            Some(account) => account == self.account,
            None => entry == self.policy_arn || entry == self.arn,
        }
    }
}

/// Checks a principal entry of a policy or a grant: `*` (policies only), a 12-digit account
/// id, or a principal ARN.
pub fn validate_entry(entry: &str, wildcard_allowed: bool) -> Result<(), IdentityError> {
    if (wildcard_allowed && entry == "*") || is_account(entry) {
        return Ok(());
    }
    Principal::parse(entry).map(|_| ())
}

/// Access key ids and the principals they stand for.
#[derive(Debug, Clone, Default)]
pub struct Identities {
    by_key: BTreeMap<String, Principal>,
}

impl Identities {
    /// No mapping: every caller is the root of [`DEFAULT_ACCOUNT`].
    pub fn anyone_is_default_root() -> Self {
        Self::default()
    }

    /// Adds `access_key_id` → `principal`.
    pub fn add(&mut self, access_key_id: &str, principal: Principal) -> Result<(), IdentityError> {
        if access_key_id.is_empty()
            || access_key_id.len() > 128
            || !access_key_id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(IdentityError::Mapping(access_key_id.to_owned()));
        }
        if self
            .by_key
            .insert(access_key_id.to_owned(), principal)
            .is_some()
        {
            return Err(IdentityError::Duplicate(access_key_id.to_owned()));
        }
        Ok(())
    }

    /// Adds a `ACCESS_KEY_ID=ARN` mapping, as the `--principal` flag gives it.
    pub fn add_mapping(&mut self, mapping: &str) -> Result<(), IdentityError> {
        let (key, arn) = mapping
            .split_once('=')
            .ok_or_else(|| IdentityError::Mapping(mapping.to_owned()))?;
        self.add(key, Principal::parse(arn)?)
    }

    /// The caller behind `access_key_id`; `None` when mappings exist and this key is not one
    /// of them (AWS answers `UnrecognizedClientException`).
    pub fn caller(&self, access_key_id: &str) -> Option<Principal> {
        if self.by_key.is_empty() {
            return Principal::account_root(DEFAULT_ACCOUNT).ok();
        }
        self.by_key.get(access_key_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns() {
        let role = Principal::parse("arn:aws:iam::222222222222:role/parent").unwrap();
        assert_eq!(role.account(), "222222222222");
        let session =
            Principal::parse("arn:aws:sts::222222222222:assumed-role/parent/i-0abc").unwrap();
        assert_eq!(
            session.policy_arn(),
            "arn:aws:iam::222222222222:role/parent"
        );
        assert!(session.is_named_by("arn:aws:iam::222222222222:role/parent"));
        assert!(session.is_named_by("arn:aws:iam::222222222222:root"));
        assert!(session.is_named_by("222222222222"));
        assert!(session.is_named_by("*"));
        assert!(!session.is_named_by("arn:aws:iam::222222222222:role/other"));
        assert!(!session.is_named_by("arn:aws:iam::111111111111:root"));
        assert!(!role.is_named_by("arn:aws:iam::222222222222:role/parent/x"));
        for bad in [
            "",
            "arn:aws:iam::2222:root",
            "arn:aws:iam::222222222222:group/g",
            "arn:aws:iam::222222222222:role/",
            "arn:aws:s3:::bucket",
            "arn:aws:iam:us-east-1:222222222222:root",
            "arn:aws:sts::222222222222:assumed-role/parent",
            "arn:aws:iam::222222222222:user/a b",
        ] {
            assert!(Principal::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mappings() {
        let mut ids = Identities::anyone_is_default_root();
        assert_eq!(
            ids.caller("anything").unwrap().arn(),
            "arn:aws:iam::000000000000:root"
        );
        ids.add_mapping("AKIDOWNER=arn:aws:iam::111111111111:user/owner")
            .unwrap();
        assert_eq!(ids.caller("AKIDOWNER").unwrap().account(), "111111111111");
        assert!(
            ids.caller("anything").is_none(),
            "unmapped keys are unknown"
        );
        assert!(matches!(
            ids.add_mapping("AKIDOWNER=arn:aws:iam::111111111111:root"),
            Err(IdentityError::Duplicate(_))
        ));
        assert!(ids.add_mapping("no-equals").is_err());
        assert!(ids
            .add_mapping("bad key=arn:aws:iam::111111111111:root")
            .is_err());
    }
}
