//! Host↔enclave transport: vsock on Nitro, Unix sockets in local mode, behind one endpoint type
//! so the code above sees only a byte stream ([`Conn`]) and cannot tell them apart.
//!
//! **One connection per request.** Provisioning and control (status, pings, audit events)
//! use one long-lived connection; every client request (an attestation document, one OHTTP
//! exchange) runs on a connection of its own, which says what it carries in its first frame.
//! A connection whose exchange ended cleanly is reused for a later request (as HTTP
//! keep-alive does); one cut short is closed. We chose that over multiplexing streams on one
//! connection because:
//! - the kernel's socket buffers are the per-stream flow control: a slow client stalls its
//!   own socket only, with no head-of-line blocking and no window accounting of ours;
//! - closing the connection *is* cancellation: the enclave sees EOF and drops the work;
//! - memory is bounded by (in-flight limit × socket buffers), and a dead enclave fails
//!   each request at once instead of a shared session that has to be torn down;
//! - connecting over vsock or a Unix socket costs tens of microseconds, and the preface is
//!   pipelined with the first frame, so it adds no round trip.
//!
//! Addresses: `unix:PATH`, or `vsock:CID:PORT` (CID `any` to listen on every CID). The
//! enclave's CID is assigned by `nitro-cli run-enclave --enclave-cid`; the parent is CID 3.
//! (AWS Nitro Enclaves user guide, "Nitro Enclaves concepts: vsock".)

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use tokio::io::{AsyncRead, AsyncWrite};

/// A connected byte stream: vsock or Unix.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// A boxed [`Conn`].
pub type BoxConn = Pin<Box<dyn Conn>>;

/// Where to connect or listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path (local mode).
    Unix(PathBuf),
    /// A vsock address.
    Vsock {
        /// Context id; `u32::MAX` (VMADDR_CID_ANY) to listen on all.
        cid: u32,
        /// Port.
        port: u32,
    },
}

/// An address that is neither `unix:PATH` nor `vsock:CID:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad endpoint {0:?}: expected unix:PATH or vsock:CID:PORT")]
pub struct BadEndpoint(pub String);

impl FromStr for Endpoint {
    type Err = BadEndpoint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadEndpoint(s.to_owned());
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let rest = s.strip_prefix("vsock:").ok_or_else(bad)?;
        let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
        let cid = match cid {
            "any" => u32::MAX,
            c => c.parse().map_err(|_| bad())?,
        };
        Ok(Self::Vsock {
            cid,
            port: port.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Vsock {
                cid: u32::MAX,
                port,
            } => write!(f, "vsock:any:{port}"),
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

impl Endpoint {
    /// Connects to the endpoint.
    pub async fn connect(&self) -> io::Result<BoxConn> {
        match self {
            Self::Unix(p) => Ok(Box::pin(tokio::net::UnixStream::connect(p).await?)),
            Self::Vsock { cid, port } => Ok(Box::pin(
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?,
            )),
        }
    }

    /// Listens on the endpoint. A stale Unix socket file left by a previous run is replaced.
    pub fn bind(&self) -> io::Result<Listener> {
        match self {
            Self::Unix(p) => {
                match std::fs::remove_file(p) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                Ok(Listener::Unix(tokio::net::UnixListener::bind(p)?))
            }
            Self::Vsock { cid, port } => Ok(Listener::Vsock(tokio_vsock::VsockListener::bind(
                tokio_vsock::VsockAddr::new(*cid, *port),
            )?)),
        }
    }
}

/// A listening socket of either kind.
#[derive(Debug)]
pub enum Listener {
    /// Unix.
    Unix(tokio::net::UnixListener),
    /// vsock.
    Vsock(tokio_vsock::VsockListener),
}

impl Listener {
    /// The next connection.
    pub async fn accept(&self) -> io::Result<BoxConn> {
        match self {
            Self::Unix(l) => Ok(Box::pin(l.accept().await?.0)),
            Self::Vsock(l) => Ok(Box::pin(l.accept().await?.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        for s in ["unix:/tmp/x.sock", "vsock:16:5000", "vsock:any:5000"] {
            assert_eq!(Endpoint::from_str(s).map(|e| e.to_string()), Ok(s.into()));
        }
        for s in [
            "",
            "unix:",
            "tcp:1",
            "vsock:16",
            "vsock:x:1",
            "vsock:1:70000000000",
        ] {
            assert!(Endpoint::from_str(s).is_err(), "{s}");
        }
    }

    #[tokio::test]
    async fn unix_connects_and_replaces_stale_files() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ep = Endpoint::Unix(dir.join("s.sock"));
        std::fs::write(dir.join("s.sock"), b"stale").unwrap();
        let l = ep.bind().unwrap();
        let server = tokio::spawn(async move {
            let mut c = l.accept().await.unwrap();
            let mut b = [0u8; 2];
            c.read_exact(&mut b).await.unwrap();
            c.write_all(&b).await.unwrap();
        });
        let mut c = ep.connect().await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hi");
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
