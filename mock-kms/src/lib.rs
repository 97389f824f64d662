//! A local KMS that behaves like AWS KMS for this product's flows: the AWS JSON 1.1 protocol
//! that `aws-sdk-kms`, boto3 and the AWS CLI speak, persisted keys with key policies, and
//! `Recipient` key release to attested Nitro Enclaves (verified with `attestation-verifier`
//! against the AWS root and any extra roots, such as the mock NSM's CA).
//!
//! [`service::Kms`] holds the logic and state without HTTP; [`http::router`] serves it.

#![forbid(unsafe_code)]

pub mod blob;
pub mod http;
pub mod identity;
pub mod policy;
pub mod service;
pub mod store;

pub use service::{Kms, KmsError};

/// Serves `kms` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    kms: std::sync::Arc<Kms>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, http::router(kms))
        .with_graceful_shutdown(shutdown)
        .await
}
