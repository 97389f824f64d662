//! The AWS JSON 1.1 wire protocol: `POST /` with `X-Amz-Target: TrentService.<Operation>`,
//! a JSON body, and errors as HTTP 400 with `{"__type": …, "message": …}` (AWS KMS API
//! Reference, "Common Errors"). Requests must carry a SigV4 `Authorization` header, as every
//! SDK sends; its access key id names the caller (`crate::identity`), its signature is not
//! checked (the mock holds no secrets).

use crate::service::{Kms, KmsError};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest request body accepted (KMS requests are small: 4 KiB plaintexts, 16 KiB documents).
pub const MAX_BODY: usize = 256 * 1024;
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

static REQUEST_ID: AtomicU64 = AtomicU64::new(1);

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    let id = REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static(CONTENT_TYPE));
    if let Ok(v) = HeaderValue::from_str(&format!("mock-{id:016x}")) {
        r.headers_mut().insert("x-amzn-requestid", v);
    }
    r
}

fn error(e: &KmsError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    reply(
        status,
        serde_json::json!({ "__type": e.kind, "message": e.message }),
    )
}

async fn handle(State(kms): State<Arc<Kms>>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Some(op) = target.strip_prefix("TrentService.").map(str::to_owned) else {
        return error(&KmsError {
            status: 400,
            kind: "UnknownOperationException",
            message: format!("X-Amz-Target {target:?} is not a TrentService operation"),
        });
    };
    let Some(access_key_id) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(access_key_id)
    else {
        return error(&KmsError {
            status: 400,
            kind: "MissingAuthenticationTokenException",
            message: "Missing Authentication Token".into(),
        });
    };
    // RSA and ECDSA work: keep it off the async workers.
    let result = tokio::task::spawn_blocking({
        let kms = kms.clone();
        let op = op.clone();
        move || kms.handle(&access_key_id, &op, &body)
    })
    .await;
    let result = result.unwrap_or_else(|_| {
        Err(KmsError {
            status: 500,
            kind: "KMSInternalException",
            message: "request handler failed".into(),
        })
    });
    match result {
        Ok(v) => {
            tracing::info!(op = %op, status = 200, "kms request");
            reply(StatusCode::OK, v)
        }
        Err(e) => {
            // The message names checks and keys, never plaintext.
            tracing::info!(op = %op, status = e.status, error = e.kind, message = %e.message, "kms request refused");
            error(&e)
        }
    }
}

/// The access key id of a SigV4 `Authorization` header (AWS General Reference, "Signature
/// Version 4"): `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request, …,
/// Signature=…`.
fn access_key_id(authorization: &str) -> Option<String> {
    let rest = authorization.strip_prefix("AWS4-HMAC-SHA256 ")?;
    if !rest.contains("Signature=") {
        return None;
    }
    let credential = rest
        .split(',')
        .find_map(|part| part.trim().strip_prefix("Credential="))?;
    let (key, _scope) = credential.split_once('/')?;
    (!key.is_empty()).then(|| key.to_owned())
}

/// The mock's HTTP routes.
pub fn router(kms: Arc<Kms>) -> Router {
    Router::new()
        .route("/", post(handle))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(kms)
}

#[cfg(test)]
mod tests {
    use super::access_key_id;

    #[test]
    fn the_access_key_id_of_a_sigv4_header() {
        let h = "AWS4-HMAC-SHA256 Credential=AKIDOWNER/20261202/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date, Signature=abcd";
        assert_eq!(access_key_id(h).as_deref(), Some("AKIDOWNER"));
        for bad in [
            "",
            "Basic dXNlcjpwYXNz",
            "AWS4-HMAC-SHA256 Credential=AKIDOWNER/20261202/us-east-1/kms/aws4_request",
            "AWS4-HMAC-SHA256 Credential=/20261202/x, Signature=abcd",
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=abcd",
        ] {
            assert_eq!(access_key_id(bad), None, "{bad}");
        }
    }
}
