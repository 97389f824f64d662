//! `host serve` configuration: an optional TOML file (unknown keys rejected), overridden by
//! flags and their environment variables. Every default is defined once, in
//! [`ServeConfig::default`].

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything `host serve` can be told.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Client listener address.
    pub listen: SocketAddr,
    /// Operator listener address: `/metrics` (and the health probes) for the operator's
    /// scraper, loopback by default. Metrics tell sizes, timings and counts of every client's
    /// traffic, which the clients' own listener does not hand to anyone who asks.
    pub admin_listen: SocketAddr,
    /// The enclave: `vsock:CID:PORT` on Nitro, `unix:PATH` in local mode, `hvsock:PATH:PORT`
    /// behind an emulator's hybrid vsock socket.
    pub enclave: String,
    /// The sealed model to provision the enclave with; without it the host only relays to an
    /// enclave provisioned by someone else.
    pub sealed: Option<PathBuf>,
    /// KMS region (default: the SDK's chain).
    pub region: Option<String>,
    /// KMS endpoint (mock-kms in local mode).
    pub endpoint_url: Option<String>,
    /// TLS certificate chain (PEM) for the client listener.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Largest request body (413 above).
    pub max_body_bytes: u64,
    /// Time a client has to send a request's headers.
    pub header_timeout_ms: u64,
    /// Time a client has to send a request's whole body.
    pub body_timeout_ms: u64,
    /// A connection with no request in flight and no bytes moving is closed after this.
    pub idle_timeout_ms: u64,
    /// Requests in flight at once (503 with Retry-After above).
    pub max_in_flight: usize,
    /// Requests in flight at once from one client IP (429 with Retry-After above), so one
    /// client cannot take every slot.
    pub max_in_flight_per_client: usize,
    /// A response the client has stopped reading (a write pending, no byte taken) is cut
    /// after this long, which frees its slot here and its sequence in the enclave.
    pub write_stall_ms: u64,
    /// Per-client-IP token bucket: sustained requests per second.
    pub rate_per_second: f64,
    /// Per-client-IP token bucket: burst size.
    pub rate_burst: f64,
    /// Time for the enclave to answer an attestation request, or start a response.
    pub enclave_timeout_ms: u64,
    /// On SIGTERM, time given to in-flight streams before they are cut.
    pub shutdown_grace_ms: u64,
    /// Longest wait between reconnection attempts to the enclave.
    pub max_backoff_ms: u64,
    /// Interval of liveness pings on the control connection.
    pub ping_interval_ms: u64,
    /// Where the enclave's audit records go as JSON lines (default: the log).
    pub audit_log: Option<PathBuf>,
    /// A signed API key list (`host api-keys sign`) to deliver to the enclave after every
    /// provisioning, and again whenever the file changes (checked at each ping).
    pub api_keys: Option<PathBuf>,
    /// Relay worker threads, one single-threaded runtime each (0: one per CPU).
    pub workers: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            enclave: "vsock:16:5000".into(),
            sealed: None,
            region: None,
            endpoint_url: None,
            tls_cert: None,
            tls_key: None,
            max_body_bytes: common::wire::DEFAULT_MAX_REQUEST_BODY as u64,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 120_000,
            max_in_flight: 2048,
            max_in_flight_per_client: 64,
            write_stall_ms: 30_000,
            rate_per_second: 50.0,
            rate_burst: 100.0,
            enclave_timeout_ms: 30_000,
            shutdown_grace_ms: 30_000,
            max_backoff_ms: 10_000,
            ping_interval_ms: 5_000,
            audit_log: None,
            api_keys: None,
            workers: 0,
        }
    }
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys included).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// The file is larger than any configuration needs.
    #[error("{}: {len} bytes is over the {MAX_CONFIG_BYTES}-byte limit", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// A value is out of range, or two values do not go together.
    #[error("{0}")]
    Invalid(&'static str),
    /// `enclave` is not an endpoint.
    #[error(transparent)]
    Endpoint(#[from] common::transport::BadEndpoint),
}

/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 64 << 10;

impl ServeConfig {
    /// Reads a configuration file; missing keys take their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                len,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Checks ranges and pairs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &'static str| Err(ConfigError::Invalid(m));
        if self.admin_listen == self.listen && self.listen.port() != 0 {
            return bad("admin_listen must differ from listen");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert and tls_key go together");
        }
        if !(self.rate_per_second > 0.0 && self.rate_burst >= 1.0) {
            return bad("rate_per_second must be > 0 and rate_burst ≥ 1");
        }
        if self.max_in_flight == 0
            || self.max_in_flight_per_client == 0
            || self.max_body_bytes == 0
            || self.write_stall_ms == 0
        {
            return bad(
                "max_in_flight, max_in_flight_per_client, max_body_bytes and write_stall_ms must be > 0",
            );
        }
        let timeouts = [
            self.header_timeout_ms,
            self.body_timeout_ms,
            self.idle_timeout_ms,
            self.enclave_timeout_ms,
            self.max_backoff_ms,
            self.ping_interval_ms,
        ];
        if timeouts.contains(&0) {
            return bad("timeouts, max_backoff_ms and ping_interval_ms must be > 0");
        }
        self.endpoint()?;
        Ok(())
    }

    /// The enclave's endpoint, parsed.
    pub fn endpoint(&self) -> Result<common::transport::Endpoint, ConfigError> {
        Ok(self.enclave.parse()?)
    }
}

/// Milliseconds as a duration.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_reject_unknown_keys_and_fill_defaults() {
        let dir = std::env::temp_dir().join(format!("serve-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "listen = \"0.0.0.0:9000\"\nmax_in_flight = 7\n").unwrap();
        let c = ServeConfig::from_file(&good).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.max_in_flight, 7);
        assert_eq!(c.max_body_bytes, ServeConfig::default().max_body_bytes);
        c.validate().unwrap();

        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "max_inflight = 7\n").unwrap();
        let e = ServeConfig::from_file(&typo).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");

        let c = ServeConfig {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = ServeConfig {
            enclave: "tcp:1".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
