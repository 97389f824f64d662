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
//!
//! And `hvsock:PATH:PORT`, hybrid vsock: the host side of a virtio-vsock device that a user-space
//! VMM (Firecracker, QEMU with vhost-device-vsock) exposes as a Unix socket at `PATH`. To reach
//! guest port `PORT`, the host connects to `PATH`, writes `CONNECT PORT\n` and reads
//! `OK HOST_PORT\n`; after that the socket carries the stream. A guest's connection to the host's
//! port `PORT` arrives on the Unix socket `PATH_PORT`, which is what listening on it binds.
//! (Firecracker, docs/vsock.md, "Host-initiated connections" and "Guest-initiated
//! connections".) It lets the emulated enclave be reached without touching a real vsock CID.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    /// A guest's vsock port behind a hybrid-vsock Unix socket (module docs).
    HybridVsock {
        /// The VMM's Unix socket.
        path: PathBuf,
        /// The guest's port.
        port: u32,
    },
}

/// An address that is none of `unix:PATH`, `vsock:CID:PORT`, `hvsock:PATH:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad endpoint {0:?}: expected unix:PATH, vsock:CID:PORT or hvsock:PATH:PORT")]
pub struct BadEndpoint(pub String);

/// Longest answer to `CONNECT` we read (`OK ` and a 32-bit port fit in 14 bytes).
const MAX_CONNECT_ANSWER: usize = 32;

/// Time the VMM has to answer `CONNECT` (it answers once the guest accepted).
const CONNECT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl FromStr for Endpoint {
    type Err = BadEndpoint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadEndpoint(s.to_owned());
        if let Some(rest) = s.strip_prefix("hvsock:") {
            let (path, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Self::HybridVsock {
                path: PathBuf::from(path),
                port: port.parse().map_err(|_| bad())?,
            });
        }
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
            Self::HybridVsock { path, port } => write!(f, "hvsock:{}:{port}", path.display()),
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
            Self::HybridVsock { path, port } => {
                let mut s = tokio::net::UnixStream::connect(path).await?;
                s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
                tokio::time::timeout(CONNECT_ANSWER_TIMEOUT, connect_answer(&mut s))
                    .await
                    .map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no answer to CONNECT {port} from {}", path.display()),
                        )
                    })??;
                Ok(Box::pin(s))
            }
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
            Self::HybridVsock { path, port } => {
                let mut name = path.as_os_str().to_owned();
                name.push(format!("_{port}"));
                Self::Unix(PathBuf::from(name)).bind()
            }
        }
    }
}

/// Reads the VMM's answer to `CONNECT`, byte by byte (what follows the line is the guest's),
/// and accepts `OK <port>`.
async fn connect_answer(s: &mut tokio::net::UnixStream) -> io::Result<()> {
    let mut line = Vec::with_capacity(MAX_CONNECT_ANSWER);
    loop {
        let b = match s.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the hybrid vsock device closed the connection: nothing listens on that guest port",
            )),
            Err(e) => return Err(e),
        };
        if b == b'\n' {
            break;
        }
        if line.len() == MAX_CONNECT_ANSWER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the hybrid vsock device's answer to CONNECT is too long",
            ));
        }
        line.push(b);
    }
    let port = line.strip_prefix(b"OK ").and_then(|p| {
        std::str::from_utf8(p)
            .ok()
            .and_then(|p| p.trim_end_matches('\r').parse::<u32>().ok())
    });
    match port {
        Some(_) => Ok(()),
        None => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "the hybrid vsock device refused: {:?}",
                String::from_utf8_lossy(&line)
            ),
        )),
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
        for s in [
            "unix:/tmp/x.sock",
            "vsock:16:5000",
            "vsock:any:5000",
            "hvsock:/tmp/v.sock:5000",
            "hvsock:/tmp/a:b.sock:5000",
        ] {
            assert_eq!(Endpoint::from_str(s).map(|e| e.to_string()), Ok(s.into()));
        }
        assert_eq!(
            Endpoint::from_str("hvsock:/tmp/a:b.sock:5000"),
            Ok(Endpoint::HybridVsock {
                path: "/tmp/a:b.sock".into(),
                port: 5000
            })
        );
        for s in [
            "",
            "unix:",
            "tcp:1",
            "vsock:16",
            "vsock:x:1",
            "vsock:1:70000000000",
            "hvsock:/tmp/v.sock",
            "hvsock::5000",
            "hvsock:/tmp/v.sock:x",
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

    /// A stand-in for the VMM's hybrid vsock socket: answers each connection's `CONNECT` line
    /// with `answer` (`None`: closes it), then echoes what follows.
    fn hybrid_device(
        path: &std::path::Path,
        answer: Option<&'static [u8]>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let Ok((s, _)) = listener.accept().await else {
                return seen;
            };
            let mut s = tokio::io::BufReader::new(s);
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            seen.push(line);
            let Some(answer) = answer else {
                return seen;
            };
            s.get_mut().write_all(answer).await.unwrap();
            let mut b = [0u8; 5];
            if s.read_exact(&mut b).await.is_ok() {
                s.get_mut().write_all(&b).await.unwrap();
            }
            seen
        })
    }

    #[tokio::test]
    async fn hybrid_vsock_connects_through_the_connect_line() {
        let dir = std::env::temp_dir().join(format!("hvsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let ep = Endpoint::HybridVsock {
            path: sock.clone(),
            port: 5000,
        };
        // Accepted: the stream starts right after the answer's line, nothing of it swallowed.
        let device = hybrid_device(&sock, Some(b"OK 1073741824\nhello"));
        let mut c = ep.connect().await.unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
        c.write_all(b"12345").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"12345");
        assert_eq!(device.await.unwrap(), ["CONNECT 5000\n"]);
        // Refused (nothing listens on the guest port), an error line, an endless line.
        for answer in [
            None,
            Some(&b"ERR no listener\n"[..]),
            Some(&[b'O'; 100][..]),
        ] {
            std::fs::remove_file(&sock).unwrap();
            let device = hybrid_device(&sock, answer);
            let e = match ep.connect().await {
                Ok(_) => panic!("{answer:?} accepted"),
                Err(e) => e,
            };
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::InvalidData
                ),
                "{answer:?}: {e}"
            );
            device.abort();
        }
        // Listening on it is the VMM's socket for guest-initiated connections: PATH_PORT.
        let l = ep.bind().unwrap();
        assert!(dir.join("v.sock_5000").exists());
        drop(l);
        let _ = std::fs::remove_dir_all(dir);
    }
}
