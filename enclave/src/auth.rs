//! Client authorization inside the enclave: API keys (carried inside the encrypted request, so
//! the host never sees them) checked against the signed key list (`common::apikeys`), their
//! scopes (the models a key may use) and quotas (requests and tokens per minute), all enforced
//! here. Failures are answered inside the channel with OpenAI's 401, 403 and 429 shapes.
//!
//! Quotas are token buckets (capacity one minute's allowance, refilled continuously): a
//! request is admitted when its key has a request left and a positive token balance, and its
//! worst case (prompt plus `max_tokens`) is reserved before it runs, so concurrent requests
//! cannot together spend more than the balance; what it did not use is refunded at its end.

use crate::openai::ApiError;
use common::apikeys::{parse_key, ApiKeysError, KeyEntry, KeyList};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// The keys in force and their quota state.
#[derive(Debug)]
pub struct Authorizer {
    signer: [u8; 32],
    current: RwLock<Option<Arc<Keys>>>,
    /// The secret of the audit ids, drawn when the enclave starts and never leaving it.
    audit_key: aws_lc_rs::hmac::Key,
}

#[derive(Debug)]
struct Keys {
    serial: u64,
    payload: KeyList,
    by_id: HashMap<String, Arc<Account>>,
}

/// One key's entry and buckets.
#[derive(Debug)]
pub struct Account {
    entry: KeyEntry,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    requests: f64,
    tokens: f64,
    at: Instant,
}

/// An admitted request's key: charge its tokens through it.
#[derive(Debug, Clone)]
pub struct Grant {
    account: Arc<Account>,
    /// The key's id, hashed for audit events.
    pub audit_id: String,
}

impl Grant {
    /// Takes a request's worst case (prompt plus `max_tokens`) from the key's token quota
    /// before it runs, as OpenAI counts `max_tokens` toward the limit: concurrent requests
    /// cannot together spend more than the balance. Refused (429) unless the balance covers
    /// it, or the bucket is full (a request larger than a minute's allowance runs alone, and
    /// the key then waits for the refill). [`Reservation::settle`] refunds what was not used.
    pub fn reserve(&self, tokens: usize) -> Result<Reservation, ApiError> {
        let tpm = self.account.entry.tokens_per_minute;
        if tpm == 0 {
            return Ok(Reservation {
                account: None,
                tokens,
            });
        }
        let mut b = self.account.buckets();
        b.refill(&self.account.entry);
        let full = b.tokens >= f64::from(tpm);
        if (tokens as f64) > b.tokens && !full {
            return Err(rate_limited("tokens", tpm));
        }
        b.tokens -= tokens as f64;
        Ok(Reservation {
            account: Some(self.account.clone()),
            tokens,
        })
    }
}

/// Tokens taken from a key's quota for one request; see [`Grant::reserve`]. Dropped without
/// [`Reservation::settle`] (the request was abandoned mid-way), the whole reservation stays
/// spent.
#[derive(Debug)]
#[must_use = "settle the reservation with the tokens used"]
pub struct Reservation {
    account: Option<Arc<Account>>,
    tokens: usize,
}

impl Reservation {
    /// Refunds the part of the reservation the request did not use (`used` is its prompt
    /// plus completion tokens).
    pub fn settle(self, used: usize) {
        if let Some(account) = &self.account {
            let mut b = account.buckets();
            b.tokens += self.tokens.saturating_sub(used) as f64;
            // Never above a minute's allowance, however the refill and the refund interleave.
            b.tokens = b.tokens.min(f64::from(account.entry.tokens_per_minute));
        }
    }
}

impl Account {
    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Buckets {
    /// Adds what the time since the last look has earned, up to a minute's allowance.
    fn refill(&mut self, e: &KeyEntry) {
        let now = Instant::now();
        let minutes = now.duration_since(self.at).as_secs_f64() / 60.0;
        self.at = now;
        let rpm = f64::from(e.requests_per_minute);
        let tpm = f64::from(e.tokens_per_minute);
        self.requests = (self.requests + minutes * rpm).min(rpm);
        self.tokens = (self.tokens + minutes * tpm).min(tpm);
    }
}

/// The audit form of a key id: the first 16 hex digits of HMAC-SHA256(`key`, id), so audit
/// records can be grouped by key without naming it. Keyed with a secret the enclave draws at
/// start: the host delivers the key list, so it knows every id, and an unkeyed hash would name
/// the key to it by a dictionary of one list. The ids group records within one enclave run.
fn audit_id(key: &aws_lc_rs::hmac::Key, id: &str) -> String {
    let tag = aws_lc_rs::hmac::sign(key, id.as_bytes());
    hex::encode(tag.as_ref().get(..8).unwrap_or_default())
}

impl Authorizer {
    /// An authorizer that trusts lists signed by `signer` and holds none yet.
    pub fn new(signer: [u8; 32]) -> Result<Self, aws_lc_rs::error::Unspecified> {
        let audit_key = aws_lc_rs::hmac::Key::generate(
            aws_lc_rs::hmac::HMAC_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
        )?;
        Ok(Self {
            signer,
            current: RwLock::new(None),
            audit_key,
        })
    }

    /// The serial in force, if any.
    pub fn serial(&self) -> Option<u64> {
        self.read().map(|k| k.serial)
    }

    fn read(&self) -> Option<Arc<Keys>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Verifies and installs a signed list. Keys that stay keep their quota state.
    pub fn load(&self, signed: &[u8]) -> Result<u64, ApiKeysError> {
        let list = KeyList::verify(signed, &self.signer, common::clock::unix_seconds())?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = current.as_ref() {
            if list.serial < k.serial || (list.serial == k.serial && list != k.payload) {
                return Err(ApiKeysError::Rollback {
                    got: list.serial,
                    current: k.serial,
                });
            }
            if list.serial == k.serial {
                return Ok(k.serial);
            }
        }
        let old = current
            .as_ref()
            .map(|k| k.by_id.clone())
            .unwrap_or_default();
        let by_id = list
            .keys
            .iter()
            .map(|e| {
                let account = match old.get(&e.id) {
                    Some(a) if a.entry == *e => a.clone(),
                    _ => Arc::new(Account {
                        entry: e.clone(),
                        buckets: Mutex::new(Buckets {
                            requests: f64::from(e.requests_per_minute),
                            tokens: f64::from(e.tokens_per_minute),
                            at: Instant::now(),
                        }),
                    }),
                };
                (e.id.clone(), account)
            })
            .collect();
        let serial = list.serial;
        *current = Some(Arc::new(Keys {
            serial,
            payload: list,
            by_id,
        }));
        Ok(serial)
    }

    /// Checks the `authorization` header (`Bearer <key>`) for `model`, and takes one request
    /// from the key's quota.
    pub fn authorize(&self, authorization: Option<&[u8]>, model: &str) -> Result<Grant, ApiError> {
        self.authorize_at(authorization, model, common::clock::unix_seconds())
    }

    /// [`Self::authorize`] at `now` (Unix seconds). The list's expiry is checked here, at every
    /// request, not only when a list is loaded: a host that withholds the list revoking a key
    /// would otherwise keep the key alive for as long as the enclave runs.
    fn authorize_at(
        &self,
        authorization: Option<&[u8]>,
        model: &str,
        now: u64,
    ) -> Result<Grant, ApiError> {
        let unauthorized = |code: &'static str, message: &str| {
            ApiError::new(401, "invalid_request_error", Some(code), message)
        };
        let Some(keys) = self.read() else {
            return Err(unauthorized(
                "invalid_api_key",
                "this enclave has no API keys loaded yet",
            ));
        };
        if now > keys.payload.not_after {
            return Err(unauthorized(
                "invalid_api_key",
                &format!(
                    "the API key list in force expired at {} (Unix time); the operator must deliver a current one",
                    keys.payload.not_after
                ),
            ));
        }
        let Some(header) = authorization else {
            return Err(unauthorized(
                "missing_api_key",
                "you didn't provide an API key: send `Authorization: Bearer <key>`",
            ));
        };
        let presented = std::str::from_utf8(header)
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim);
        let wrong = || unauthorized("invalid_api_key", "incorrect API key provided");
        let (id, secret) = presented.and_then(parse_key).ok_or_else(wrong)?;
        let account = keys.by_id.get(id).ok_or_else(wrong)?;
        if !account.entry.matches(&secret) {
            return Err(wrong());
        }
        if !account.entry.allows(model) {
            return Err(ApiError::new(
                403,
                "invalid_request_error",
                Some("model_not_allowed"),
                format!("this API key may not use the model `{model}`"),
            ));
        }
        let e = &account.entry;
        let mut b = account.buckets();
        b.refill(e);
        if e.requests_per_minute > 0 && b.requests < 1.0 {
            return Err(rate_limited("requests", e.requests_per_minute));
        }
        if e.tokens_per_minute > 0 && b.tokens <= 0.0 {
            return Err(rate_limited("tokens", e.tokens_per_minute));
        }
        if e.requests_per_minute > 0 {
            b.requests -= 1.0;
        }
        drop(b);
        Ok(Grant {
            account: account.clone(),
            audit_id: audit_id(&self.audit_key, id),
        })
    }
}

fn rate_limited(what: &str, per_minute: u32) -> ApiError {
    ApiError::new(
        429,
        "rate_limit_error",
        Some("rate_limit_exceeded"),
        format!("rate limit reached for this API key: {per_minute} {what} per minute"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::apikeys::{issue, new_signer};

    fn setup(rpm: u32, tpm: u32) -> (Authorizer, String, aws_lc_rs::signature::Ed25519KeyPair) {
        let (doc, public) = new_signer().unwrap();
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&doc).unwrap();
        let (key, entry) = issue("team-a", vec!["smollm2".into()], rpm, tpm).unwrap();
        let list = KeyList {
            v: 1,
            serial: 1,
            not_after: u64::MAX,
            keys: vec![entry],
        };
        let auth = Authorizer::new(public).unwrap();
        assert_eq!(auth.load(&list.sign(&pair).unwrap()).unwrap(), 1);
        (auth, format!("Bearer {}", key.expose()), pair)
    }

    #[test]
    fn missing_wrong_scope_and_good_keys() {
        let (auth, header, _) = setup(0, 0);
        let code = |r: Result<Grant, ApiError>| r.map(|_| 200).unwrap_or_else(|e| e.status);
        assert_eq!(code(auth.authorize(None, "smollm2")), 401);
        assert_eq!(
            code(auth.authorize(Some(b"Bearer cik_team-a_xxx"), "smollm2")),
            401
        );
        let (other, _) = issue("team-a", vec!["*".into()], 0, 0).unwrap();
        let wrong = format!("Bearer {}", other.expose());
        assert_eq!(code(auth.authorize(Some(wrong.as_bytes()), "smollm2")), 401);
        assert_eq!(code(auth.authorize(Some(header.as_bytes()), "other")), 403);
        let grant = auth.authorize(Some(header.as_bytes()), "smollm2").unwrap();
        assert_eq!(grant.audit_id, audit_id(&auth.audit_key, "team-a"));
        assert_eq!(grant.audit_id.len(), 16);
        let again = auth.authorize(Some(header.as_bytes()), "smollm2").unwrap();
        assert_eq!(again.audit_id, grant.audit_id, "one key, one audit id");
    }

    #[test]
    fn audit_ids_cannot_be_computed_without_the_enclaves_secret() {
        let (first, header, _) = setup(0, 0);
        let (second, _, _) = setup(0, 0);
        let id = first.authorize(Some(header.as_bytes()), "smollm2").unwrap();
        // The former unkeyed form, which the host could compute from the list it delivers.
        let mut msg = b"api-key-id\n".to_vec();
        msg.extend_from_slice(b"team-a");
        let unkeyed = hex::encode(&common::sealed::sha256(&msg)[..8]);
        assert_ne!(id.audit_id, unkeyed);
        assert_ne!(
            audit_id(&first.audit_key, "team-a"),
            audit_id(&second.audit_key, "team-a"),
            "each enclave draws its own secret"
        );
        assert_ne!(
            audit_id(&first.audit_key, "team-a"),
            audit_id(&first.audit_key, "team-b")
        );
    }

    #[test]
    fn a_list_that_expires_while_in_force_stops_admitting_its_keys() {
        let (doc, public) = new_signer().unwrap();
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&doc).unwrap();
        let (key, entry) = issue("team-a", vec!["*".into()], 0, 0).unwrap();
        let now = common::clock::unix_seconds();
        let list = KeyList {
            v: 1,
            serial: 1,
            not_after: now + 60,
            keys: vec![entry],
        };
        let auth = Authorizer::new(public).unwrap();
        auth.load(&list.sign(&pair).unwrap()).unwrap();
        let header = format!("Bearer {}", key.expose());
        assert!(auth
            .authorize_at(Some(header.as_bytes()), "smollm2", now + 60)
            .is_ok());
        // No new list arrives: a minute later the key is refused all the same.
        let e = auth
            .authorize_at(Some(header.as_bytes()), "smollm2", now + 61)
            .unwrap_err();
        assert_eq!((e.status, e.code), (401, Some("invalid_api_key")));
        assert!(e.message.contains("expired"), "{}", e.message);
    }

    #[test]
    fn quotas_run_out() {
        let (auth, header, _) = setup(2, 0);
        assert!(auth.authorize(Some(header.as_bytes()), "smollm2").is_ok());
        assert!(auth.authorize(Some(header.as_bytes()), "smollm2").is_ok());
        let e = auth
            .authorize(Some(header.as_bytes()), "smollm2")
            .unwrap_err();
        assert_eq!((e.status, e.code), (429, Some("rate_limit_exceeded")));

        let (auth, header, _) = setup(0, 100);
        let g = auth.authorize(Some(header.as_bytes()), "smollm2").unwrap();
        g.reserve(150).unwrap().settle(150);
        let e = auth
            .authorize(Some(header.as_bytes()), "smollm2")
            .unwrap_err();
        assert_eq!(e.status, 429);
    }

    #[test]
    fn token_quotas_are_reserved_up_front_and_refunded_after() {
        let (auth, header, _) = setup(0, 100);
        let grant = || auth.authorize(Some(header.as_bytes()), "smollm2").unwrap();
        // Two concurrent requests whose worst cases add up beyond the balance: the second is
        // refused before it runs, not charged after.
        let first = grant().reserve(60).unwrap();
        let e = grant().reserve(60).unwrap_err();
        assert_eq!((e.status, e.code), (429, Some("rate_limit_exceeded")));
        // The first used 10 of its 60: 50 come back, and a 60-token request fits again.
        first.settle(10);
        let second = grant().reserve(60).unwrap();
        second.settle(60);
        assert!(grant().reserve(60).is_err(), "30 left");
        // A request larger than a minute's allowance runs only on a full bucket.
        let (auth, header, _) = setup(0, 100);
        let g = auth.authorize(Some(header.as_bytes()), "smollm2").unwrap();
        let big = g.reserve(500).unwrap();
        assert!(g.reserve(1).is_err(), "the key waits for the refill");
        big.settle(500);
        // Unlimited keys reserve nothing.
        let (auth, header, _) = setup(0, 0);
        let g = auth.authorize(Some(header.as_bytes()), "smollm2").unwrap();
        for _ in 0..10 {
            g.reserve(1 << 20).unwrap().settle(0);
        }
    }

    #[test]
    fn revocation_replaces_the_list_and_rollback_is_refused() {
        let (auth, header, pair) = setup(0, 0);
        let (_, keep) = issue("team-b", vec!["*".into()], 0, 0).unwrap();
        let revoked = KeyList {
            v: 1,
            serial: 2,
            not_after: u64::MAX,
            keys: vec![keep],
        };
        assert_eq!(auth.load(&revoked.sign(&pair).unwrap()).unwrap(), 2);
        assert_eq!(
            auth.authorize(Some(header.as_bytes()), "smollm2")
                .unwrap_err()
                .status,
            401
        );
        let (_, again) = issue("team-a", vec!["*".into()], 0, 0).unwrap();
        let old = KeyList {
            v: 1,
            serial: 1,
            not_after: u64::MAX,
            keys: vec![again],
        };
        assert!(matches!(
            auth.load(&old.sign(&pair).unwrap()),
            Err(ApiKeysError::Rollback { got: 1, current: 2 })
        ));
    }
}
