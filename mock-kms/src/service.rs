//! The KMS operations, as AWS KMS defines them (AWS KMS API Reference), on JSON bodies:
//! `CreateKey`, `DescribeKey`, `PutKeyPolicy`, `GetKeyPolicy`, `CreateAlias`, `Encrypt`,
//! `Decrypt`, `ReEncrypt`, `GenerateDataKey`, `GenerateDataKeyWithoutPlaintext`,
//! `GenerateRandom`, `CreateGrant`, `ListGrants`, `RevokeGrant`.
//!
//! Every request has a caller ([`crate::identity`]); keys belong to their creator's account.
//! Authorization is the key policy's decision for that caller, or, where the policy does not
//! explicitly deny, a grant to the caller (AWS KMS Developer Guide, "Authentication and
//! access control"). As in AWS, a key in another account is reached only by its ARN, and
//! `PutKeyPolicy`, `GetKeyPolicy` and `CreateAlias` never work across accounts. This is what
//! lets the tests show which principal can obtain a model's data key, and how.
//!
//! `Recipient` (on `Decrypt`, `GenerateDataKey`, `GenerateRandom`) works as with Nitro
//! Enclaves (AWS KMS Developer Guide, "How AWS Nitro Enclaves uses AWS KMS"): the attestation
//! document is verified against the trusted roots, its PCRs become the
//! `kms:RecipientAttestation:*` condition values of the key policy, and the plaintext is
//! returned only as `CiphertextForRecipient`, encrypted to the document's public key.
//!
//! No HTTP here; `crate::http` speaks the wire protocol.

use crate::blob;
use crate::identity::{validate_entry, Identities, Principal};
use crate::policy::{caller_values, default_policy, Decision, KeyPolicy};
use crate::store::{Grant, GrantConstraints, Store, StoreError, StoredKey};
use attestation_verifier::{verify, Policy, TrustAnchor, UnixTime, DEFAULT_MAX_CLOCK_SKEW};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use zeroize::Zeroizing;

/// How old an attestation document KMS accepts (AWS KMS rejects documents older than 5 min).
pub const MAX_ATTESTATION_AGE: Duration = Duration::from_secs(300);
/// Largest `Encrypt` plaintext (AWS KMS limit).
pub const MAX_PLAINTEXT: usize = 4096;
/// Largest `NumberOfBytes` for data keys and random bytes (AWS KMS limit).
pub const MAX_NUMBER_OF_BYTES: u64 = 1024;
/// Most grants one key holds (AWS allows 50,000; the mock keeps them in the key's file).
pub const MAX_GRANTS_PER_KEY: usize = 1000;
/// The operations a grant may allow that this mock implements (AWS KMS API Reference,
/// `CreateGrant`, `Operations`).
pub const GRANT_OPERATIONS: [&str; 10] = [
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
    "CreateGrant",
    "RetireGrant",
    "DescribeKey",
    "GenerateRandom",
];

/// An error as KMS reports it: HTTP status, `__type` and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsError {
    /// HTTP status.
    pub status: u16,
    /// The exception name, e.g. `AccessDeniedException`.
    pub kind: &'static str,
    /// Human-readable detail.
    pub message: String,
}

impl KmsError {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind,
            message: message.into(),
        }
    }
    fn validation(message: impl Into<String>) -> Self {
        Self::new("ValidationException", message)
    }
    fn denied(message: impl Into<String>) -> Self {
        Self::new("AccessDeniedException", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new("NotFoundException", message)
    }
    fn invalid_ciphertext() -> Self {
        Self::new("InvalidCiphertextException", "")
    }
    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            kind: "KMSInternalException",
            message: message.into(),
        }
    }
}

impl From<StoreError> for KmsError {
    fn from(e: StoreError) -> Self {
        Self::internal(e.to_string())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RecipientInfo {
    key_encryption_algorithm: Option<String>,
    attestation_document: Option<String>,
}

/// Request fields of all operations; each operation reads the ones it defines.
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct Request {
    key_id: Option<String>,
    target_key_id: Option<String>,
    alias_name: Option<String>,
    description: Option<String>,
    policy: Option<String>,
    policy_name: Option<String>,
    key_usage: Option<String>,
    key_spec: Option<String>,
    customer_master_key_spec: Option<String>,
    plaintext: Option<String>,
    ciphertext_blob: Option<String>,
    encryption_context: Option<BTreeMap<String, String>>,
    encryption_algorithm: Option<String>,
    number_of_bytes: Option<u64>,
    recipient: Option<RecipientInfo>,
    dry_run: Option<bool>,
    bypass_policy_lockout_safety_check: Option<bool>,
    grantee_principal: Option<String>,
    retiring_principal: Option<String>,
    operations: Option<Vec<String>>,
    constraints: Option<GrantConstraints>,
    name: Option<String>,
    /// (`GrantTokens`, like every field not listed here, is ignored: grants take effect at
    /// once in the mock.)
    grant_id: Option<String>,
    source_key_id: Option<String>,
    destination_key_id: Option<String>,
    source_encryption_context: Option<BTreeMap<String, String>>,
    destination_encryption_context: Option<BTreeMap<String, String>>,
    source_encryption_algorithm: Option<String>,
    destination_encryption_algorithm: Option<String>,
}

/// A verified recipient: where to encrypt, and the policy condition values it brings.
struct Attested {
    public_key: Vec<u8>,
    conditions: BTreeMap<String, String>,
}

/// The mock KMS.
pub struct Kms {
    store: Mutex<Store>,
    identities: Identities,
    anchors: Vec<TrustAnchor>,
    region: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

fn decode_b64(field: &str, value: &str) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    B64.decode(value)
        .map(Zeroizing::new)
        .map_err(|_| KmsError::validation(format!("{field} is not valid base64")))
}

fn uuid_v4(rng: &SystemRandom) -> Result<String, KmsError> {
    let mut b = [0u8; 16];
    rng.fill(&mut b)
        .map_err(|_| KmsError::internal("randomness"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn now_secs() -> u64 {
    UnixTime::now().as_millis() / 1000
}

impl Kms {
    /// A KMS with its state in `state_dir`, trusting the AWS Nitro root plus `extra_roots`.
    pub fn open(
        state_dir: &std::path::Path,
        extra_roots: Vec<TrustAnchor>,
        region: &str,
    ) -> Result<Self, StoreError> {
        let mut anchors = vec![TrustAnchor::aws_nitro_root()];
        anchors.extend(extra_roots);
        Ok(Self {
            store: Mutex::new(Store::open(state_dir)?),
            identities: Identities::anyone_is_default_root(),
            anchors,
            region: region.to_owned(),
            rng: SystemRandom::new(),
        })
    }

    /// The same KMS with callers identified by `identities` (`--principal`).
    pub fn with_identities(mut self, identities: Identities) -> Self {
        self.identities = identities;
        self
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // Store methods leave it consistent even if a caller panicked mid-request.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes a stored key under the store's lock, so that concurrent changes (two grants
    /// created at once) both land.
    fn update(
        &self,
        key_id: &str,
        change: impl FnOnce(&mut StoredKey) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        let mut store = self.store();
        let mut key = store
            .key(key_id)
            .cloned()
            .ok_or_else(|| KmsError::not_found(format!("Key '{key_id}' does not exist")))?;
        change(&mut key)?;
        store.put_key(key)?;
        Ok(())
    }

    fn arn(&self, key: &StoredKey) -> String {
        format!(
            "arn:aws:kms:{}:{}:key/{}",
            self.region, key.account, key.key_id
        )
    }

    /// Runs operation `op` (the part after `TrentService.`) on a JSON body, for the caller
    /// that signed with `access_key_id`.
    pub fn handle(&self, access_key_id: &str, op: &str, body: &[u8]) -> Result<Value, KmsError> {
        let caller = self.identities.caller(access_key_id).ok_or_else(|| {
            KmsError::new(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        })?;
        let req: Request = if body.is_empty() {
            Request::default()
        } else {
            serde_json::from_slice(body)
                .map_err(|e| KmsError::new("SerializationException", e.to_string()))?
        };
        if req.dry_run == Some(true) {
            return Err(KmsError::new(
                "DryRunOperationException",
                "DryRun is not supported by the mock",
            ));
        }
        let c = &caller;
        match op {
            "CreateKey" => self.create_key(c, req),
            "DescribeKey" => self.describe_key(c, req),
            "PutKeyPolicy" => self.put_key_policy(c, req),
            "GetKeyPolicy" => self.get_key_policy(c, req),
            "CreateAlias" => self.create_alias(c, req),
            "Encrypt" => self.encrypt(c, req),
            "Decrypt" => self.decrypt(c, req),
            "ReEncrypt" => self.re_encrypt(c, req),
            "GenerateDataKey" => self.generate_data_key(c, req, true),
            "GenerateDataKeyWithoutPlaintext" => self.generate_data_key(c, req, false),
            "GenerateRandom" => self.generate_random(req),
            "CreateGrant" => self.create_grant(c, req),
            "ListGrants" => self.list_grants(c, req),
            "RevokeGrant" => self.revoke_grant(c, req),
            other => Err(KmsError::new(
                "UnknownOperationException",
                format!("{other} is not supported"),
            )),
        }
    }

    /// Resolves a key id, key ARN, alias name or alias ARN for `caller`: ids and alias names
    /// name keys of the caller's own account, ARNs any account's; `same_account_only` for the
    /// operations AWS never allows across accounts.
    fn resolve(
        &self,
        caller: &Principal,
        key_id: Option<&str>,
        same_account_only: bool,
    ) -> Result<StoredKey, KmsError> {
        let id = key_id.ok_or_else(|| KmsError::validation("KeyId is required"))?;
        let store = self.store();
        let not_found = || KmsError::not_found(format!("Key '{id}' does not exist"));
        let arn_prefix = format!("arn:aws:kms:{}:", self.region);
        let (account, uuid) = if let Some(rest) = id.strip_prefix(&arn_prefix) {
            let (account, resource) = rest.split_once(':').ok_or_else(not_found)?;
            let uuid = if let Some(alias) = resource.strip_prefix("alias/") {
                store.alias(&format!("alias/{alias}")).map(str::to_owned)
            } else {
                resource.strip_prefix("key/").map(str::to_owned)
            };
            (account.to_owned(), uuid)
        } else if id.starts_with("alias/") {
            (
                caller.account().to_owned(),
                store.alias(id).map(str::to_owned),
            )
        } else {
            (caller.account().to_owned(), Some(id.to_owned()))
        };
        let key = uuid
            .and_then(|u| store.key(&u).cloned())
            .filter(|k| k.account == account)
            .ok_or_else(not_found)?;
        drop(store);
        if same_account_only && key.account != caller.account() {
            return Err(KmsError::denied(format!(
                "User: {} is not authorized to use {}: this operation does not work across accounts",
                caller.arn(),
                self.arn(&key)
            )));
        }
        self.enabled(key)
    }

    /// `key`, if it may be used.
    fn enabled(&self, key: StoredKey) -> Result<StoredKey, KmsError> {
        if !key.enabled {
            return Err(KmsError::new(
                "DisabledException",
                format!("{} is disabled", self.arn(&key)),
            ));
        }
        Ok(key)
    }

    fn metadata(&self, key: &StoredKey) -> Value {
        json!({
            "AWSAccountId": key.account,
            "KeyId": key.key_id,
            "Arn": self.arn(key),
            "CreationDate": key.creation_date,
            "Enabled": key.enabled,
            "Description": key.description,
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeyState": "Enabled",
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            "MultiRegion": false,
        })
    }

    /// Checks `action` by `caller` on `key`: the key policy with the recipient's, the caller's
    /// and the context's condition values, then the key's grants. Returns the grant that
    /// allowed it, if it took one.
    fn authorize(
        &self,
        caller: &Principal,
        key: &StoredKey,
        action: &str,
        attested: Option<&Attested>,
        context: &BTreeMap<String, String>,
    ) -> Result<Option<Grant>, KmsError> {
        let policy = KeyPolicy::parse(&key.policy)
            .map_err(|e| KmsError::internal(format!("stored policy: {e}")))?;
        let mut values = caller_values(caller);
        if let Some(a) = attested {
            values.extend(a.conditions.clone());
        }
        for (k, v) in context {
            values.insert(
                format!("kms:encryptioncontext:{}", k.to_ascii_lowercase()),
                v.clone(),
            );
        }
        let refuse = |why: &str| {
            Err(KmsError::denied(format!(
                "User: {} is not authorized to perform: {action} on resource: {} {why}",
                caller.arn(),
                self.arn(key)
            )))
        };
        match policy.evaluate(caller, action, &values) {
            Decision::Allow => Ok(None),
            Decision::ExplicitDeny => refuse("with an explicit deny in a resource-based policy"),
            Decision::ImplicitDeny => {
                let operation = action.strip_prefix("kms:").unwrap_or(action);
                match key.grants.iter().find(|g| {
                    caller.is_named_by(&g.grantee_principal)
                        && g.operations.iter().any(|o| o == operation)
                        && g.constraints.as_ref().is_none_or(|c| c.hold(context))
                }) {
                    Some(g) => Ok(Some(g.clone())),
                    None => refuse(&format!(
                        "because no resource-based policy allows the {action} action"
                    )),
                }
            }
        }
    }

    /// AWS's policy lockout safety check (AWS KMS API Reference, `PutKeyPolicy`,
    /// `BypassPolicyLockoutSafetyCheck`): a new policy must let its setter set it again.
    fn check_lockout(
        caller: &Principal,
        policy: &KeyPolicy,
        bypass: Option<bool>,
    ) -> Result<(), KmsError> {
        if bypass == Some(true)
            || policy.evaluate(caller, "kms:PutKeyPolicy", &caller_values(caller))
                == Decision::Allow
        {
            return Ok(());
        }
        Err(KmsError::new(
            "MalformedPolicyDocumentException",
            "The new key policy will not allow you to update the key policy in the future.",
        ))
    }

    /// Verifies a `Recipient`'s attestation document.
    fn attest(&self, recipient: &RecipientInfo) -> Result<Attested, KmsError> {
        match recipient.key_encryption_algorithm.as_deref() {
            Some("RSAES_OAEP_SHA_256") => {}
            other => {
                return Err(KmsError::validation(format!(
                    "Recipient.KeyEncryptionAlgorithm must be RSAES_OAEP_SHA_256, got {other:?}"
                )))
            }
        }
        let doc_b64 = recipient
            .attestation_document
            .as_deref()
            .ok_or_else(|| KmsError::validation("Recipient.AttestationDocument is required"))?;
        let doc = decode_b64("Recipient.AttestationDocument", doc_b64)?;
        // KMS decides on PCRs through the key policy; here only genuineness and freshness.
        // Debug-mode documents are genuine: their zero PCRs simply fail PCR conditions.
        let policy = Policy {
            pcrs: BTreeMap::new(),
            allow_debug: true,
            max_age: Some(MAX_ATTESTATION_AGE),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            nonce: None,
            public_key: None,
            user_data: None,
        };
        let verified = verify(&doc, &self.anchors, UnixTime::now(), &policy)
            .map_err(|e| KmsError::denied(format!("The attestation document is not valid: {e}")))?;
        let public_key = verified
            .public_key()
            .ok_or_else(|| KmsError::validation("The attestation document has no public key"))?
            .to_vec();
        let mut conditions = BTreeMap::new();
        if let Some(pcr0) = verified.pcr(0) {
            conditions.insert(
                "kms:recipientattestation:imagesha384".into(),
                hex::encode(pcr0),
            );
        }
        for (i, v) in verified.pcrs() {
            conditions.insert(format!("kms:recipientattestation:pcr{i}"), hex::encode(v));
        }
        Ok(Attested {
            public_key,
            conditions,
        })
    }

    /// The plaintext as the response carries it: `Plaintext`, or `CiphertextForRecipient`.
    fn deliver(
        &self,
        out: &mut Value,
        plaintext: &[u8],
        attested: Option<&Attested>,
    ) -> Result<(), KmsError> {
        match attested {
            Some(a) => {
                let envelope = common::cms::envelope_for_recipient(&a.public_key, plaintext)
                    .map_err(|e| KmsError::validation(format!("Recipient public key: {e}")))?;
                out["CiphertextForRecipient"] = json!(B64.encode(envelope));
            }
            None => out["Plaintext"] = json!(B64.encode(plaintext)),
        }
        Ok(())
    }

    fn random(&self, n: usize) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let mut out = Zeroizing::new(vec![0u8; n]);
        self.rng
            .fill(&mut out)
            .map_err(|_| KmsError::internal("randomness"))?;
        Ok(out)
    }

    fn create_key(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        if req
            .key_usage
            .as_deref()
            .is_some_and(|u| u != "ENCRYPT_DECRYPT")
        {
            return Err(KmsError::validation(
                "only KeyUsage ENCRYPT_DECRYPT is supported",
            ));
        }
        let spec = req.key_spec.or(req.customer_master_key_spec);
        if spec.as_deref().is_some_and(|s| s != "SYMMETRIC_DEFAULT") {
            return Err(KmsError::validation(
                "only KeySpec SYMMETRIC_DEFAULT is supported",
            ));
        }
        let policy = match req.policy {
            Some(p) => {
                let parsed = KeyPolicy::parse(&p)
                    .map_err(|e| KmsError::new("MalformedPolicyDocumentException", e))?;
                Self::check_lockout(caller, &parsed, req.bypass_policy_lockout_safety_check)?;
                p
            }
            None => default_policy(caller.account()),
        };
        let key = StoredKey {
            key_id: uuid_v4(&self.rng)?,
            creation_date: now_secs(),
            description: req.description.unwrap_or_default(),
            policy,
            material_hex: hex::encode(&*self.random(32)?),
            enabled: true,
            account: caller.account().to_owned(),
            grants: Vec::new(),
        };
        let metadata = self.metadata(&key);
        self.store().put_key(key)?;
        Ok(json!({ "KeyMetadata": metadata }))
    }

    fn describe_key(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        let key = self.resolve(caller, req.key_id.as_deref(), false)?;
        self.authorize(caller, &key, "kms:DescribeKey", None, &BTreeMap::new())?;
        Ok(json!({ "KeyMetadata": self.metadata(&key) }))
    }

    fn check_policy_name(name: Option<&str>) -> Result<(), KmsError> {
        match name {
            None | Some("default") => Ok(()),
            Some(other) => Err(KmsError::not_found(format!(
                "policy {other} does not exist; only 'default'"
            ))),
        }
    }

    fn put_key_policy(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        Self::check_policy_name(req.policy_name.as_deref())?;
        let key = self.resolve(caller, req.key_id.as_deref(), true)?;
        self.authorize(caller, &key, "kms:PutKeyPolicy", None, &BTreeMap::new())?;
        let policy = req
            .policy
            .ok_or_else(|| KmsError::validation("Policy is required"))?;
        let parsed = KeyPolicy::parse(&policy)
            .map_err(|e| KmsError::new("MalformedPolicyDocumentException", e))?;
        Self::check_lockout(caller, &parsed, req.bypass_policy_lockout_safety_check)?;
        self.update(&key.key_id, |k| {
            k.policy = policy;
            Ok(())
        })?;
        Ok(json!({}))
    }

    fn get_key_policy(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        Self::check_policy_name(req.policy_name.as_deref())?;
        let key = self.resolve(caller, req.key_id.as_deref(), true)?;
        self.authorize(caller, &key, "kms:GetKeyPolicy", None, &BTreeMap::new())?;
        Ok(json!({ "Policy": key.policy, "PolicyName": "default" }))
    }

    fn create_alias(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        let alias = req
            .alias_name
            .ok_or_else(|| KmsError::validation("AliasName is required"))?;
        let valid = alias.strip_prefix("alias/").is_some_and(|n| {
            !n.is_empty()
                && n.len() <= 250
                && !n.starts_with("aws/")
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
        });
        if !valid {
            return Err(KmsError::validation(format!("invalid AliasName {alias:?}")));
        }
        let key = self.resolve(caller, req.target_key_id.as_deref(), true)?;
        self.authorize(caller, &key, "kms:CreateAlias", None, &BTreeMap::new())?;
        if !self.store().put_alias(&alias, &key.key_id)? {
            return Err(KmsError::new(
                "AlreadyExistsException",
                format!("An alias with the name {alias} already exists"),
            ));
        }
        Ok(json!({}))
    }

    fn encrypt(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        let key = self.resolve(caller, req.key_id.as_deref(), false)?;
        let context = req.encryption_context.unwrap_or_default();
        self.authorize(caller, &key, "kms:Encrypt", None, &context)?;
        let plaintext = decode_b64(
            "Plaintext",
            req.plaintext
                .as_deref()
                .ok_or_else(|| KmsError::validation("Plaintext is required"))?,
        )?;
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
            return Err(KmsError::validation(format!(
                "Plaintext must be 1 to {MAX_PLAINTEXT} bytes"
            )));
        }
        let blob = blob::seal(&key.key_id, &key.material()?, &context, &plaintext)
            .map_err(|_| KmsError::internal("encryption failed"))?;
        Ok(json!({
            "CiphertextBlob": B64.encode(blob),
            "KeyId": self.arn(&key),
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }))
    }

    fn check_algorithm(algorithm: Option<&str>) -> Result<(), KmsError> {
        match algorithm {
            None | Some("SYMMETRIC_DEFAULT") => Ok(()),
            Some(_) => Err(KmsError::new(
                "IncorrectKeyException",
                "only SYMMETRIC_DEFAULT keys exist here",
            )),
        }
    }

    /// The key a ciphertext names (any account: the blob itself identifies it, as with AWS),
    /// checked against the `KeyId` the request may give.
    fn ciphertext_key(
        &self,
        caller: &Principal,
        blob: &[u8],
        requested: Option<&str>,
    ) -> Result<StoredKey, KmsError> {
        let named = blob::key_id(blob).map_err(|_| KmsError::invalid_ciphertext())?;
        let key = self
            .store()
            .key(named)
            .cloned()
            .ok_or_else(KmsError::invalid_ciphertext)?;
        let key = self.enabled(key)?;
        if let Some(requested) = requested {
            if self.resolve(caller, Some(requested), false)?.key_id != key.key_id {
                return Err(KmsError::new("IncorrectKeyException", "The key ID in the request does not identify the key that encrypted the ciphertext"));
            }
        }
        Ok(key)
    }

    fn decrypt(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        Self::check_algorithm(req.encryption_algorithm.as_deref())?;
        let blob_b64 = req
            .ciphertext_blob
            .as_deref()
            .ok_or_else(|| KmsError::validation("CiphertextBlob is required"))?;
        let blob = decode_b64("CiphertextBlob", blob_b64)?;
        let key = self.ciphertext_key(caller, &blob, req.key_id.as_deref())?;
        let context = req.encryption_context.unwrap_or_default();
        let attested = req.recipient.as_ref().map(|r| self.attest(r)).transpose()?;
        self.authorize(caller, &key, "kms:Decrypt", attested.as_ref(), &context)?;
        let plaintext = blob::open(&key.key_id, &key.material()?, &context, &blob)
            .map_err(|_| KmsError::invalid_ciphertext())?;
        let mut out =
            json!({ "KeyId": self.arn(&key), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT" });
        self.deliver(&mut out, &plaintext, attested.as_ref())?;
        Ok(out)
    }

    /// `ReEncrypt`: decrypts under the source key and encrypts under the destination without
    /// returning the plaintext; needs `kms:ReEncryptFrom` on the source and `kms:ReEncryptTo`
    /// on the destination. It never asks for attestation, which is why a release policy must
    /// not allow it.
    fn re_encrypt(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        Self::check_algorithm(req.source_encryption_algorithm.as_deref())?;
        Self::check_algorithm(req.destination_encryption_algorithm.as_deref())?;
        let blob = decode_b64(
            "CiphertextBlob",
            req.ciphertext_blob
                .as_deref()
                .ok_or_else(|| KmsError::validation("CiphertextBlob is required"))?,
        )?;
        let source = self.ciphertext_key(caller, &blob, req.source_key_id.as_deref())?;
        let destination = self.resolve(caller, req.destination_key_id.as_deref(), false)?;
        let source_context = req.source_encryption_context.unwrap_or_default();
        let destination_context = req.destination_encryption_context.unwrap_or_default();
        self.authorize(caller, &source, "kms:ReEncryptFrom", None, &source_context)?;
        self.authorize(
            caller,
            &destination,
            "kms:ReEncryptTo",
            None,
            &destination_context,
        )?;
        let plaintext = blob::open(&source.key_id, &source.material()?, &source_context, &blob)
            .map_err(|_| KmsError::invalid_ciphertext())?;
        let out = blob::seal(
            &destination.key_id,
            &destination.material()?,
            &destination_context,
            &plaintext,
        )
        .map_err(|_| KmsError::internal("encryption failed"))?;
        Ok(json!({
            "CiphertextBlob": B64.encode(out),
            "SourceKeyId": self.arn(&source),
            "KeyId": self.arn(&destination),
            "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }))
    }

    fn number_of_bytes(req: &Request) -> Result<usize, KmsError> {
        match (req.key_spec.as_deref(), req.number_of_bytes) {
            (Some(_), Some(_)) => Err(KmsError::validation(
                "KeySpec and NumberOfBytes are mutually exclusive",
            )),
            (Some("AES_256"), None) => Ok(32),
            (Some("AES_128"), None) => Ok(16),
            (Some(other), None) => Err(KmsError::validation(format!(
                "KeySpec {other} is not AES_256 or AES_128"
            ))),
            (None, Some(n)) if (1..=MAX_NUMBER_OF_BYTES).contains(&n) => Ok(n as usize),
            (None, Some(n)) => Err(KmsError::validation(format!(
                "NumberOfBytes {n} is not in 1..=1024"
            ))),
            (None, None) => Err(KmsError::validation("KeySpec or NumberOfBytes is required")),
        }
    }

    fn generate_data_key(
        &self,
        caller: &Principal,
        req: Request,
        with_plaintext: bool,
    ) -> Result<Value, KmsError> {
        let key = self.resolve(caller, req.key_id.as_deref(), false)?;
        let n = Self::number_of_bytes(&req)?;
        let context = req.encryption_context.clone().unwrap_or_default();
        let attested = match (&req.recipient, with_plaintext) {
            (Some(r), true) => Some(self.attest(r)?),
            (Some(_), false) => {
                return Err(KmsError::validation(
                    "Recipient is not a parameter of GenerateDataKeyWithoutPlaintext",
                ))
            }
            (None, _) => None,
        };
        let action = if with_plaintext {
            "kms:GenerateDataKey"
        } else {
            "kms:GenerateDataKeyWithoutPlaintext"
        };
        self.authorize(caller, &key, action, attested.as_ref(), &context)?;
        let data_key = self.random(n)?;
        let blob = blob::seal(&key.key_id, &key.material()?, &context, &data_key)
            .map_err(|_| KmsError::internal("encryption failed"))?;
        let mut out = json!({ "CiphertextBlob": B64.encode(blob), "KeyId": self.arn(&key) });
        if with_plaintext {
            self.deliver(&mut out, &data_key, attested.as_ref())?;
        }
        Ok(out)
    }

    fn generate_random(&self, req: Request) -> Result<Value, KmsError> {
        let n = match req.number_of_bytes {
            Some(n) if (1..=MAX_NUMBER_OF_BYTES).contains(&n) => n as usize,
            other => {
                return Err(KmsError::validation(format!(
                    "NumberOfBytes {other:?} is not in 1..=1024"
                )))
            }
        };
        // Not key-scoped: no key policy applies, but a Recipient must still be genuine.
        let attested = req.recipient.as_ref().map(|r| self.attest(r)).transpose()?;
        let bytes = self.random(n)?;
        let mut out = json!({});
        self.deliver(&mut out, &bytes, attested.as_ref())?;
        Ok(out)
    }

    /// `CreateGrant`: allowed by `kms:CreateGrant` in the key policy, or by a grant to the
    /// caller that includes `CreateGrant` and every operation asked for.
    fn create_grant(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        let key = self.resolve(caller, req.key_id.as_deref(), false)?;
        let grantee = req
            .grantee_principal
            .ok_or_else(|| KmsError::validation("GranteePrincipal is required"))?;
        validate_entry(&grantee, false)
            .map_err(|e| KmsError::validation(format!("GranteePrincipal: {e}")))?;
        if let Some(r) = &req.retiring_principal {
            validate_entry(r, false)
                .map_err(|e| KmsError::validation(format!("RetiringPrincipal: {e}")))?;
        }
        let operations = req.operations.unwrap_or_default();
        if operations.is_empty() {
            return Err(KmsError::validation("Operations is required"));
        }
        if let Some(bad) = operations
            .iter()
            .find(|o| !GRANT_OPERATIONS.contains(&o.as_str()))
        {
            return Err(KmsError::validation(format!(
                "Operations: {bad} is not one of {GRANT_OPERATIONS:?}"
            )));
        }
        let name = req.name.unwrap_or_default();
        if name.len() > 256 {
            return Err(KmsError::validation("Name is longer than 256 characters"));
        }
        if let Some(parent) =
            self.authorize(caller, &key, "kms:CreateGrant", None, &BTreeMap::new())?
        {
            if let Some(op) = operations.iter().find(|o| !parent.operations.contains(o)) {
                return Err(KmsError::denied(format!(
                    "User: {} may create grants only for the operations of its own grant; {op} is not one",
                    caller.arn()
                )));
            }
        }
        let grant_id = hex::encode(&*self.random(32)?);
        let grant = Grant {
            grant_id: grant_id.clone(),
            name,
            grantee_principal: grantee,
            retiring_principal: req.retiring_principal,
            operations,
            constraints: req.constraints,
            issuing_account: caller.account().to_owned(),
            creation_date: now_secs(),
        };
        let arn = self.arn(&key);
        self.update(&key.key_id, |k| {
            if k.grants.len() >= MAX_GRANTS_PER_KEY {
                return Err(KmsError::new(
                    "LimitExceededException",
                    format!("{arn} has {MAX_GRANTS_PER_KEY} grants"),
                ));
            }
            k.grants.push(grant);
            Ok(())
        })?;
        Ok(json!({ "GrantId": grant_id, "GrantToken": B64.encode(grant_id.as_bytes()) }))
    }

    fn list_grants(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        let key = self.resolve(caller, req.key_id.as_deref(), false)?;
        self.authorize(caller, &key, "kms:ListGrants", None, &BTreeMap::new())?;
        let grants: Vec<Value> = key
            .grants
            .iter()
            .map(|g| {
                let mut v = serde_json::Map::new();
                v.insert("KeyId".into(), json!(self.arn(&key)));
                v.insert("GrantId".into(), json!(g.grant_id));
                v.insert("Name".into(), json!(g.name));
                v.insert("CreationDate".into(), json!(g.creation_date));
                v.insert("GranteePrincipal".into(), json!(g.grantee_principal));
                v.insert(
                    "IssuingAccount".into(),
                    json!(format!("arn:aws:iam::{}:root", g.issuing_account)),
                );
                v.insert("Operations".into(), json!(g.operations));
                if let Some(r) = &g.retiring_principal {
                    v.insert("RetiringPrincipal".into(), json!(r));
                }
                if let Some(c) = &g.constraints {
                    v.insert("Constraints".into(), json!(c));
                }
                Value::Object(v)
            })
            .collect();
        Ok(json!({ "Grants": grants, "Truncated": false }))
    }

    fn revoke_grant(&self, caller: &Principal, req: Request) -> Result<Value, KmsError> {
        let key = self.resolve(caller, req.key_id.as_deref(), false)?;
        self.authorize(caller, &key, "kms:RevokeGrant", None, &BTreeMap::new())?;
        let id = req
            .grant_id
            .ok_or_else(|| KmsError::validation("GrantId is required"))?;
        self.update(&key.key_id, |k| {
            let before = k.grants.len();
            k.grants.retain(|g| g.grant_id != id);
            if k.grants.len() == before {
                return Err(KmsError::not_found(format!("Grant ID {id} not found")));
            }
            Ok(())
        })?;
        Ok(json!({}))
    }
}
