//! The KMS client: the real `aws-sdk-kms` with the default credential chain and region, and an
//! endpoint override that points it at `mock-kms` in local mode.

use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata};

/// Where and how to reach KMS.
#[derive(Debug, Clone, Default)]
pub struct KmsOptions {
    /// Region; default from the environment / profile.
    pub region: Option<String>,
    /// Endpoint override, e.g. `http://127.0.0.1:4566` for mock-kms.
    pub endpoint_url: Option<String>,
    /// Static credentials (access key id, secret); default: the SDK's credential chain.
    pub static_credentials: Option<(String, String)>,
}

/// A KMS client for `options`.
pub async fn client(options: &KmsOptions) -> aws_sdk_kms::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &options.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &options.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some((id, secret)) = &options.static_credentials {
        loader = loader.credentials_provider(aws_sdk_kms::config::Credentials::new(
            id.clone(),
            secret.clone(),
            None,
            None,
            "static",
        ));
    }
    aws_sdk_kms::Client::new(&loader.load().await)
}

/// A KMS failure, named as KMS names it (`AccessDeniedException: …`), or the transport error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct KmsFailure {
    /// The exception name, or `RequestFailed` when KMS was not reached.
    pub code: String,
    /// Detail.
    pub message: String,
}

impl KmsFailure {
    /// From any SDK error.
    pub fn from_sdk<E, R>(e: &aws_sdk_kms::error::SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        match e.code() {
            Some(code) => Self {
                code: code.to_owned(),
                message: e.message().unwrap_or_default().to_owned(),
            },
            None => Self {
                code: "RequestFailed".into(),
                message: DisplayErrorContext(e).to_string(),
            },
        }
    }
}
