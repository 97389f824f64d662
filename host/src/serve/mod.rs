//! `host serve`: the relay. It listens for clients (HTTP/1.1, optionally TLS), keeps the
//! enclave provisioned, and forwards attestation requests and opaque OHTTP streams to it
//! (DESIGN.md §3). It sees ciphertext, sizes and timing, never content.

mod admin;
pub mod config;
pub mod http;
pub mod limit;
pub mod link;
pub mod metrics;
pub mod supervisor;

use config::{ms, ServeConfig};
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// The listener could not be opened.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The TLS certificate or key file could not be read or holds no usable PEM.
    #[error("TLS: {}: {source}", path.display())]
    TlsFile {
        /// The certificate or key file.
        path: std::path::PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the certificate and key (a mismatched pair, an unsupported key type).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    Audit {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    /// The address it listens on (useful when configured with port 0).
    pub local_addr: std::net::SocketAddr,
    /// The operator's listener (`/metrics`).
    pub admin_addr: std::net::SocketAddr,
    /// Its metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Its view of the enclave.
    pub link: Arc<link::Link>,
    shutdown: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Stops accepting, lets in-flight requests finish within the configured grace period,
    /// and returns when they have (or the period is over).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Starts the relay: the supervisor of the enclave and the client listener.
pub async fn start(
    cfg: ServeConfig,
    kms: Option<aws_sdk_kms::Client>,
) -> Result<Relay, ServeError> {
    cfg.validate()?;
    let endpoint = cfg.endpoint()?;
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ => None,
    };
    let audit = match &cfg.audit_log {
        Some(path) => supervisor::AuditSink::File(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ServeError::Audit {
                    path: path.clone(),
                    source,
                })?,
        ),
        None => supervisor::AuditSink::Log,
    };
    // One listening socket per worker thread (SO_REUSEPORT: the kernel spreads connections
    // over them), all on the port the first one got.
    let workers = match cfg.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let addr = cfg.listen;
    let listen_err = |source| ServeError::Listen { addr, source };
    let first = bind(cfg.listen).map_err(listen_err)?;
    let local_addr = first.local_addr().map_err(listen_err)?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(bind(local_addr).map_err(listen_err)?);
    }
    let admin_err = |source| ServeError::Listen {
        addr: cfg.admin_listen,
        source,
    };
    let admin = TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(admin_err)?;
    let admin_addr = admin.local_addr().map_err(admin_err)?;
    let metrics = Arc::new(metrics::Metrics::default());
    let link = Arc::new(link::Link::new(endpoint));
    let (shutdown, rx) = watch::channel(false);
    tokio::spawn(admin::serve(
        admin,
        metrics.clone(),
        link.clone(),
        rx.clone(),
    ));
    tokio::spawn(supervisor::supervise(
        cfg.clone(),
        link.clone(),
        metrics.clone(),
        kms,
        audit,
        rx.clone(),
    ));
    let app = Arc::new(http::App::new(cfg, metrics.clone(), link.clone()));
    tracing::info!(%local_addr, %admin_addr, tls = tls.is_some(), workers, "relay listening");
    // Thread per core: each worker runs a single-threaded runtime with its own listener,
    // connections and enclave connections, so a request never changes threads.
    let mut threads = Vec::with_capacity(workers);
    for (i, socket) in sockets.into_iter().enumerate() {
        let (app, tls, rx) = (app.clone(), tls.clone(), rx.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ServeError::Listen {
                addr: local_addr,
                source: e,
            })?;
        // Listening starts before `start` returns; the listener belongs to its worker's
        // reactor.
        let listener = {
            let _guard = runtime.enter();
            socket.listen(4096).map_err(listen_err)?
        };
        let thread = std::thread::Builder::new()
            .name(format!("relay-{i}"))
            .spawn(move || runtime.block_on(accept_loop(listener, app, tls, rx)))
            .map_err(|source| ServeError::Listen {
                addr: local_addr,
                source,
            })?;
        threads.push(thread);
    }
    Ok(Relay {
        local_addr,
        admin_addr,
        metrics,
        link,
        shutdown,
        threads,
    })
}

/// A client listening socket, bound and not yet listening (that happens on its worker's
/// runtime). Its backlog is deep enough for bursts of thousands of connections: the default
/// 1024 overflows under load, and the kernel then resets connections.
fn bind(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| ServeError::TlsFile {
            path: cert.to_path_buf(),
            source,
        })?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| ServeError::TlsFile {
        path: key.to_path_buf(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    listener: TcpListener,
    app: Arc<http::App>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let header_timeout = ms(app.cfg.header_timeout_ms);
            let activity = Arc::new(Activity::new(
                ms(app.cfg.idle_timeout_ms),
                header_timeout,
                ms(app.cfg.write_stall_ms),
            ));
            let io: Pin<Box<dyn common::transport::Conn>> = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => Box::pin(s),
                        _ => return,
                    }
                }
                None => Box::pin(tcp),
            };
            let io = TokioIo::new(IdleIo {
                inner: io,
                activity: activity.clone(),
            });
            let svc_activity = activity.clone();
            let svc = hyper::service::service_fn(move |req| {
                svc_activity.started();
                http::handle(app.clone(), peer.ip(), req, svc_activity.clone())
            });
            // No hyper timer: the header timeout is the watchdog's (`Activity::expired`), one
            // timer per connection instead of a new one armed for every request head.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.keep_alive(true);
            let conn = watcher.watch(builder.serve_connection(io, svc));
            let idle = activity.clone();
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "client connection ended");
                    }
                }
                why = idle.expired() => tracing::debug!(why, "client connection closed"),
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    let grace = ms(app.cfg.shutdown_grace_ms);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; cutting the remaining streams");
    }
}

/// Resolves once `shutdown` says true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Whether a connection moves bytes, and how many of its requests are in flight: what its
/// watchdog needs to enforce the idle and header timeouts.
///
/// Reads, writes and requests only bump counters. The clock is read by the watchdog, a few
/// times per timeout period, not on every read and write of every request; and a connection
/// has one timer, not one armed for every request head (a measurable share of the relay's
/// per-request CPU).
#[derive(Debug)]
pub struct Activity {
    moves: AtomicU64,
    requests: AtomicU64,
    busy: AtomicUsize,
    idle: Duration,
    header: Duration,
    /// When a write to the client started waiting (ms after `born`, plus one; 0: none waits).
    blocked: AtomicU64,
    stall: Duration,
    born: Instant,
}

impl Activity {
    /// A connection closed after `idle` without requests or bytes, or after `header` without
    /// a request (between requests, or while a request's head trickles in), or once a write to
    /// the client has waited `stall` (the client stopped reading), requests in flight or not:
    /// a client that streams and never reads would otherwise hold its slots here and its
    /// sequences in the enclave.
    pub fn new(idle: Duration, header: Duration, stall: Duration) -> Self {
        Self {
            moves: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            idle,
            header,
            blocked: AtomicU64::new(0),
            stall,
            born: Instant::now(),
        }
    }

    /// A write could not complete: the client is not reading (yet).
    fn write_waiting(&self) {
        let now = self.born.elapsed().as_millis() as u64 + 1;
        let _ = self
            .blocked
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A write completed.
    fn write_done(&self) {
        self.blocked.store(0, Ordering::Relaxed);
    }

    /// How long a write has been waiting.
    fn stalled_for(&self) -> Duration {
        match self.blocked.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => self
                .born
                .elapsed()
                .saturating_sub(Duration::from_millis(at - 1)),
        }
    }

    fn touch(&self) {
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// A request's head has arrived.
    fn started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// A request of this connection has finished.
    pub fn done(&self) {
        self.busy.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// Resolves, saying which, once the connection has had no request in flight and no
    /// bytes moving for the idle limit, or no request in flight and none started for the
    /// header limit. Each is noticed within a quarter of the shorter one: a connection goes
    /// between 1 and 1.25 times a limit after it was last active.
    async fn expired(&self) -> &'static str {
        let step = (self.idle.min(self.header).min(self.stall) / 4).max(Duration::from_millis(1));
        let mut moves_seen = self.moves.load(Ordering::Relaxed);
        let mut requests_seen = self.requests.load(Ordering::Relaxed);
        let (mut quiet_since, mut waiting_since) = (Instant::now(), Instant::now());
        loop {
            tokio::time::sleep(step).await;
            let now = Instant::now();
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            let moves = self.moves.load(Ordering::Relaxed);
            let requests = self.requests.load(Ordering::Relaxed);
            if busy || moves != moves_seen {
                (moves_seen, quiet_since) = (moves, now);
            }
            if busy || requests != requests_seen {
                (requests_seen, waiting_since) = (requests, now);
            }
            if self.stalled_for() >= self.stall {
                return "the client stopped reading its response";
            }
            if now.duration_since(quiet_since) >= self.idle {
                return "idle";
            }
            if now.duration_since(waiting_since) >= self.header {
                return "no request head in time";
            }
        }
    }
}

/// A client connection that records when it last moved bytes, and since when a write has
/// been waiting for the client to read.
struct IdleIo {
    inner: Pin<Box<dyn common::transport::Conn>>,
    activity: Arc<Activity>,
}

impl IdleIo {
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Pending => self.activity.write_waiting(),
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.write_done();
                self.activity.touch();
            }
            Poll::Ready(_) => self.activity.write_done(),
        }
    }
}

impl AsyncRead for IdleIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = self.inner.as_mut().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = self.inner.as_mut().poll_write(cx, buf);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = self.inner.as_mut().poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}
