//! The KMS operations, as AWS KMS defines them (AWS KMS API Reference), on JSON bodies:
//! `CreateKey`, `DescribeKey`, `PutKeyPolicy`, `GetKeyPolicy`, `CreateAlias`, `Encrypt`,
//! `Decrypt`, `GenerateDataKey`, `GenerateDataKeyWithoutPlaintext`, `GenerateRandom`.
//!
//! `Recipient` (on `Decrypt`, `GenerateDataKey`, `GenerateRandom`) works as with Nitro
//! Enclaves (AWS KMS Developer Guide, "How AWS Nitro Enclaves uses AWS KMS"): the attestation
//! document is verified against the trusted roots, its PCRs become the
//! `kms:RecipientAttestation:*` condition values of the key policy, and the plaintext is
//! returned only as `CiphertextForRecipient`, encrypted to the document's public key.
//!
//! No HTTP here; `crate::http` speaks the wire protocol.

use crate::blob;
use crate::policy::{default_policy, KeyPolicy, ACCOUNT};
use crate::store::{Store, StoreError, StoredKey};
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
}

/// A verified recipient: where to encrypt, and the policy condition values it brings.
struct Attested {
    public_key: Vec<u8>,
    conditions: BTreeMap<String, String>,
}

/// The mock KMS.
pub struct Kms {
    store: Mutex<Store>,
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
            anchors,
            region: region.to_owned(),
            rng: SystemRandom::new(),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // Store methods leave it consistent even if a caller panicked mid-request.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arn(&self, key_id: &str) -> String {
        format!("arn:aws:kms:{}:{ACCOUNT}:key/{key_id}", self.region)
    }

    /// Runs operation `op` (the part after `TrentService.`) on a JSON body.
    pub fn handle(&self, op: &str, body: &[u8]) -> Result<Value, KmsError> {
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
        match op {
            "CreateKey" => self.create_key(req),
            "DescribeKey" => self.describe_key(req),
            "PutKeyPolicy" => self.put_key_policy(req),
            "GetKeyPolicy" => self.get_key_policy(req),
            "CreateAlias" => self.create_alias(req),
            "Encrypt" => self.encrypt(req),
            "Decrypt" => self.decrypt(req),
            "GenerateDataKey" => self.generate_data_key(req, true),
            "GenerateDataKeyWithoutPlaintext" => self.generate_data_key(req, false),
            "GenerateRandom" => self.generate_random(req),
            other => Err(KmsError::new(
                "UnknownOperationException",
                format!("{other} is not supported"),
            )),
        }
    }

    /// Resolves a key id, key ARN, alias name or alias ARN.
    fn resolve(&self, key_id: Option<&str>) -> Result<StoredKey, KmsError> {
        let id = key_id.ok_or_else(|| KmsError::validation("KeyId is required"))?;
        let store = self.store();
        let alias_prefix = format!("arn:aws:kms:{}:{ACCOUNT}:alias/", self.region);
        let key_prefix = format!("arn:aws:kms:{}:{ACCOUNT}:key/", self.region);
        let uuid = if let Some(alias) = id.strip_prefix(&alias_prefix) {
            store.alias(&format!("alias/{alias}")).map(str::to_owned)
        } else if id.starts_with("alias/") {
            store.alias(id).map(str::to_owned)
        } else {
            Some(id.strip_prefix(&key_prefix).unwrap_or(id).to_owned())
        };
        let key = uuid
            .and_then(|u| store.key(&u).cloned())
            .ok_or_else(|| KmsError::not_found(format!("Key '{id}' does not exist")))?;
        if !key.enabled {
            return Err(KmsError::new(
                "DisabledException",
                format!("{} is disabled", self.arn(&key.key_id)),
            ));
        }
        Ok(key)
    }

    fn metadata(&self, key: &StoredKey) -> Value {
        json!({
            "AWSAccountId": ACCOUNT,
            "KeyId": key.key_id,
            "Arn": self.arn(&key.key_id),
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

    /// Checks the key policy for `action`, with the recipient's and the context's condition values.
    fn authorize(
        &self,
        key: &StoredKey,
        action: &str,
        attested: Option<&Attested>,
        context: &BTreeMap<String, String>,
    ) -> Result<(), KmsError> {
        let policy = KeyPolicy::parse(&key.policy)
            .map_err(|e| KmsError::internal(format!("stored policy: {e}")))?;
        let mut values: BTreeMap<String, String> =
            attested.map(|a| a.conditions.clone()).unwrap_or_default();
        values.insert("kms:calleraccount".into(), ACCOUNT.into());
        for (k, v) in context {
            values.insert(
                format!("kms:encryptioncontext:{}", k.to_ascii_lowercase()),
                v.clone(),
            );
        }
        if policy.allows(action, &values) {
            Ok(())
        } else {
            Err(KmsError::denied(format!(
                "User: arn:aws:iam::{ACCOUNT}:root is not authorized to perform: {action} on resource: {} because no resource-based policy allows the {action} action",
                self.arn(&key.key_id)
            )))
        }
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

    fn create_key(&self, req: Request) -> Result<Value, KmsError> {
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
                KeyPolicy::parse(&p)
                    .map_err(|e| KmsError::new("MalformedPolicyDocumentException", e))?;
                p
            }
            None => default_policy(),
        };
        let key = StoredKey {
            key_id: uuid_v4(&self.rng)?,
            creation_date: now_secs(),
            description: req.description.unwrap_or_default(),
            policy,
            material_hex: hex::encode(&*self.random(32)?),
            enabled: true,
        };
        let metadata = self.metadata(&key);
        self.store().put_key(key)?;
        Ok(json!({ "KeyMetadata": metadata }))
    }

    fn describe_key(&self, req: Request) -> Result<Value, KmsError> {
        let key = self.resolve(req.key_id.as_deref())?;
        self.authorize(&key, "kms:DescribeKey", None, &BTreeMap::new())?;
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

    fn put_key_policy(&self, req: Request) -> Result<Value, KmsError> {
        Self::check_policy_name(req.policy_name.as_deref())?;
        let mut key = self.resolve(req.key_id.as_deref())?;
        self.authorize(&key, "kms:PutKeyPolicy", None, &BTreeMap::new())?;
        let policy = req
            .policy
            .ok_or_else(|| KmsError::validation("Policy is required"))?;
        KeyPolicy::parse(&policy)
            .map_err(|e| KmsError::new("MalformedPolicyDocumentException", e))?;
        key.policy = policy;
        self.store().put_key(key)?;
        Ok(json!({}))
    }

    fn get_key_policy(&self, req: Request) -> Result<Value, KmsError> {
        Self::check_policy_name(req.policy_name.as_deref())?;
        let key = self.resolve(req.key_id.as_deref())?;
        self.authorize(&key, "kms:GetKeyPolicy", None, &BTreeMap::new())?;
        Ok(json!({ "Policy": key.policy, "PolicyName": "default" }))
    }

    fn create_alias(&self, req: Request) -> Result<Value, KmsError> {
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
        let key = self.resolve(req.target_key_id.as_deref())?;
        self.authorize(&key, "kms:CreateAlias", None, &BTreeMap::new())?;
        if !self.store().put_alias(&alias, &key.key_id)? {
            return Err(KmsError::new(
                "AlreadyExistsException",
                format!("An alias with the name {alias} already exists"),
            ));
        }
        Ok(json!({}))
    }

    fn encrypt(&self, req: Request) -> Result<Value, KmsError> {
        let key = self.resolve(req.key_id.as_deref())?;
        let context = req.encryption_context.unwrap_or_default();
        self.authorize(&key, "kms:Encrypt", None, &context)?;
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
            "KeyId": self.arn(&key.key_id),
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }))
    }

    fn decrypt(&self, req: Request) -> Result<Value, KmsError> {
        if req
            .encryption_algorithm
            .as_deref()
            .is_some_and(|a| a != "SYMMETRIC_DEFAULT")
        {
            return Err(KmsError::new(
                "IncorrectKeyException",
                "only SYMMETRIC_DEFAULT keys exist here",
            ));
        }
        let blob_b64 = req
            .ciphertext_blob
            .as_deref()
            .ok_or_else(|| KmsError::validation("CiphertextBlob is required"))?;
        let blob = decode_b64("CiphertextBlob", blob_b64)?;
        let named = blob::key_id(&blob)
            .map_err(|_| KmsError::invalid_ciphertext())?
            .to_owned();
        let key = self.resolve(Some(&named)).map_err(|e| {
            if e.kind == "NotFoundException" {
                KmsError::invalid_ciphertext()
            } else {
                e
            }
        })?;
        if let Some(requested) = req.key_id.as_deref() {
            if self.resolve(Some(requested))?.key_id != key.key_id {
                return Err(KmsError::new("IncorrectKeyException", "The key ID in the request does not identify the key that encrypted the ciphertext"));
            }
        }
        let context = req.encryption_context.unwrap_or_default();
        let attested = req.recipient.as_ref().map(|r| self.attest(r)).transpose()?;
        self.authorize(&key, "kms:Decrypt", attested.as_ref(), &context)?;
        let plaintext = blob::open(&key.key_id, &key.material()?, &context, &blob)
            .map_err(|_| KmsError::invalid_ciphertext())?;
        let mut out =
            json!({ "KeyId": self.arn(&key.key_id), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT" });
        self.deliver(&mut out, &plaintext, attested.as_ref())?;
        Ok(out)
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

    fn generate_data_key(&self, req: Request, with_plaintext: bool) -> Result<Value, KmsError> {
        let key = self.resolve(req.key_id.as_deref())?;
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
        self.authorize(&key, action, attested.as_ref(), &context)?;
        let data_key = self.random(n)?;
        let blob = blob::seal(&key.key_id, &key.material()?, &context, &data_key)
            .map_err(|_| KmsError::internal("encryption failed"))?;
        let mut out = json!({ "CiphertextBlob": B64.encode(blob), "KeyId": self.arn(&key.key_id) });
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
}
