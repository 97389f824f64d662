//! Replay protection for OHTTP requests, as RFC 9458 §6.5 describes it: the client puts a
//! `Date` inside the encrypted request, the enclave refuses a request dated outside a window
//! around its own clock, and remembers the encapsulated key (`enc`, fresh for every request
//! an honest client makes) of every request it has admitted for as long as a request with that
//! date could still be admitted. A relay that posts a captured request again gets a refusal
//! and no answer: no tokens generated, no quota spent, no audit record in the victim's name
//! beyond the refusal itself.
//!
//! Memory is bounded: at most [`MAX_REMEMBERED`] keys, each 32 bytes in a hash set and 40 in the
//! expiry queue (with the set's spare buckets, under 20 MiB in all).
//! When that many admitted requests are still inside their window the enclave refuses new
//! ones with 503 rather than forget one it might be shown again.

use crate::openai::ApiError;
use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

/// How far a request's `Date` may be from the enclave's clock, either way (seconds). SigV4
/// allows five minutes; two keep the cache small and still absorb ordinary clock skew.
pub const WINDOW_SECS: u64 = 120;
/// Most encapsulated keys remembered at once: a key is kept 120 to 240 s, so this admits at
/// least 540 requests a second, sustained.
pub const MAX_REMEMBERED: usize = 1 << 17;
/// The length of an X25519 encapsulated key (RFC 9180 §7.1: Nenc = 32).
const ENC_LEN: usize = 32;
/// Where `enc` starts in a chunked request: key id, KEM, KDF and AEAD ids (RFC 9458 §4.3).
const ENC_AT: usize = 1 + 2 + 2 + 2;

/// The keys admitted within the window.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    seen: HashSet<[u8; ENC_LEN]>,
    /// In admission order, with the time each may be forgotten.
    order: VecDeque<(u64, [u8; ENC_LEN])>,
}

impl ReplayGuard {
    /// Admits the request whose encapsulated body is `body` and whose inner `Date` header is
    /// `date`, at `now` (Unix seconds); or says why not, in OpenAI's error shape.
    pub fn admit(&self, body: &[u8], date: Option<&[u8]>, now: u64) -> Result<(), ApiError> {
        let refused = |code: &'static str, message: String| {
            ApiError::new(400, "invalid_request_error", Some(code), message)
        };
        let Some(date) = date else {
            return Err(refused(
                "missing_date",
                "the encrypted request has no Date header (RFC 9458 §6.5); this client is too old for this enclave".into(),
            ));
        };
        let sent = std::str::from_utf8(date)
            .ok()
            .and_then(|d| httpdate::parse_http_date(d.trim()).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .ok_or_else(|| {
                refused(
                    "invalid_date",
                    "the request's Date header is not an HTTP date".into(),
                )
            })?;
        if sent.abs_diff(now) > WINDOW_SECS {
            return Err(refused(
                "request_expired",
                format!(
                    "the request is dated {sent} but the enclave's clock says {now} (Unix time); requests more than {WINDOW_SECS} s apart are refused as possible replays"
                ),
            ));
        }
        let mut enc = [0u8; ENC_LEN];
        match body.get(ENC_AT..ENC_AT + ENC_LEN) {
            Some(e) => enc.copy_from_slice(e),
            None => {
                return Err(refused(
                    "invalid_request",
                    "the request is too short".into(),
                ))
            }
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.order.front().is_some_and(|(until, _)| *until < now) {
            if let Some((_, old)) = s.order.pop_front() {
                s.seen.remove(&old);
            }
        }
        if s.seen.contains(&enc) {
            return Err(ApiError::new(
                409,
                "invalid_request_error",
                Some("replayed_request"),
                "this request was already answered; it is not answered twice",
            ));
        }
        if s.seen.len() >= MAX_REMEMBERED {
            return Err(ApiError::new(
                503,
                "server_error",
                Some("replay_cache_full"),
                "too many requests in the replay window; retry shortly",
            ));
        }
        // A request dated `sent` can be admitted until `sent + WINDOW_SECS`.
        s.seen.insert(enc);
        s.order.push_back((sent.max(now) + WINDOW_SECS, enc));
        Ok(())
    }

    /// Keys remembered now.
    pub fn remembered(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn body(fill: u8) -> Vec<u8> {
        let mut b = vec![0u8; ENC_AT];
        b.extend([fill; ENC_LEN]);
        b.extend(b"ciphertext");
        b
    }

    fn date(t: u64) -> Vec<u8> {
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
            .into_bytes()
    }

    #[test]
    fn a_request_is_answered_once_and_only_inside_the_window() {
        let g = ReplayGuard::default();
        let now = 1_800_000_000;
        assert!(g.admit(&body(1), Some(&date(now)), now).is_ok());
        let again = g.admit(&body(1), Some(&date(now)), now + 5).unwrap_err();
        assert_eq!((again.status, again.code), (409, Some("replayed_request")));
        // Another request (another encapsulated key) is fine; skew within the window too.
        assert!(g.admit(&body(2), Some(&date(now + 100)), now).is_ok());
        // Outside the window either way, or undated: refused before anything else.
        for (d, code) in [
            (Some(date(now - WINDOW_SECS - 1)), "request_expired"),
            (Some(date(now + WINDOW_SECS + 1)), "request_expired"),
            (Some(b"yesterday".to_vec()), "invalid_date"),
            (None, "missing_date"),
        ] {
            let e = g.admit(&body(3), d.as_deref(), now).unwrap_err();
            assert_eq!((e.status, e.code), (400, Some(code)));
        }
        // Once the first request could no longer be admitted, it is forgotten.
        assert_eq!(g.remembered(), 2);
        let later = now + 2 * WINDOW_SECS + 200;
        assert!(g.admit(&body(4), Some(&date(later)), later).is_ok());
        assert_eq!(g.remembered(), 1);
        // A replay of the first one now is refused by its date.
        let e = g.admit(&body(1), Some(&date(now)), later).unwrap_err();
        assert_eq!(e.code, Some("request_expired"));
    }
}
