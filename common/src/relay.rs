//! The relay's own error answers, outside the channel (the enclave's answers are inside it):
//! `{"error": {"code": …, "message": …}}`, written by `host serve` and read by the client,
//! which re-attests when the relay says the enclave refused its key. One type for both.

use serde::{Deserialize, Serialize};

closed_names!(
    /// Why the relay answered with an error.
    RelayErrorCode {
        /// The request body was unreadable.
        BadBody = "bad_body",
        /// Not chunked OHTTP's request media type.
        BadContentType = "bad_content_type",
        /// An attestation nonce that is not 32 to 64 hex digits.
        BadNonce = "bad_nonce",
        /// The body did not arrive in time.
        BodyTimeout = "body_timeout",
        BodyTooLarge = "body_too_large",
        /// The enclave failed while answering.
        EnclaveFailed = "enclave_failed",
        /// The enclave refused the request before answering it (for instance, a request for
        /// another gateway key: the client re-attests once).
        EnclaveRefused = "enclave_refused",
        EnclaveTimeout = "enclave_timeout",
        EnclaveUnavailable = "enclave_unavailable",
        MethodNotAllowed = "method_not_allowed",
        NotFound = "not_found",
        /// The enclave has no model yet, or is restarting.
        NotReady = "not_ready",
        /// Every relay slot is busy.
        Overloaded = "overloaded",
        RateLimited = "rate_limited",
        TooManyInFlight = "too_many_in_flight",
    }
);

impl Default for RelayErrorCode {
    fn default() -> Self {
        Self::Other
    }
}

/// The body of a relay error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayErrorBody {
    pub error: RelayError,
}

/// What went wrong, for the client (no content: the relay never sees any).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayError {
    /// Missing (a proxy in front of the relay that does not say why) reads as `Other`.
    #[serde(default)]
    pub code: RelayErrorCode,
    pub message: String,
}

impl RelayErrorBody {
    pub fn new(code: RelayErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: RelayError {
                code,
                message: message.into(),
            },
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a relay error body; `None` if `body` is not one.
    pub fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bodies_round_trip_and_unknown_codes_read_as_other() {
        let b = RelayErrorBody::new(RelayErrorCode::EnclaveRefused, "key mismatch");
        let json = b.to_json();
        assert_eq!(
            json,
            r#"{"error":{"code":"enclave_refused","message":"key mismatch"}}"#
        );
        assert_eq!(RelayErrorBody::parse(json.as_bytes()), Some(b));
        for c in RelayErrorCode::ALL {
            let body = RelayErrorBody::new(*c, "m").to_json();
            assert!(body.contains(&format!("\"{}\"", c.name())), "{body}");
            assert_eq!(
                RelayErrorBody::parse(body.as_bytes()).unwrap().error.code,
                *c
            );
        }
        let newer = br#"{"error":{"code":"something_new","message":"m"}}"#;
        assert_eq!(
            RelayErrorBody::parse(newer).unwrap().error.code,
            RelayErrorCode::Other
        );
        assert_eq!(
            RelayErrorBody::parse(br#"{"error":{"message":"m"}}"#).map(|b| b.error.code),
            Some(RelayErrorCode::Other)
        );
        assert_eq!(RelayErrorBody::parse(b"<html>"), None);
    }
}
