//! The whole local stack for the attested-channel tests: mock-kms, the real enclave (mock NSM,
//! its own runtime so it can be restarted), `host serve`, and taps that record every byte the
//! untrusted side carries: a Unix-socket tap between the relay and the enclave, and a
//! man-in-the-middle HTTP proxy between the client and the relay that can also misbehave.

use crate::{default_model, start_kms, tempdir, Local, IMAGE};
use bytes::Bytes;
use client::policy::{ClientPolicy, ClientPolicyFile};
use common::nsm::mock::ImageMeasurement;
use common::transport::Endpoint;
use enclave::server::Config;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An enclave on its own runtime, so that stopping it closes every connection it has, as a
/// real enclave restart does.
pub struct RunningEnclave {
    runtime: tokio::runtime::Runtime,
    /// Its serving state, to look at what it is doing (`served()`'s engine stats).
    pub enclave: Arc<enclave::server::Enclave>,
}

impl RunningEnclave {
    /// Boots an enclave of the test image with `cfg` on `endpoint` (`enclave::boot`: PCR17
    /// measured, OHTTP key generated).
    pub fn start(local: &Local, endpoint: &Endpoint, cfg: Config) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let nsm = local.nsm(IMAGE, |_| {});
        let booted = enclave::boot(nsm, cfg).unwrap();
        let listener = {
            let _guard = runtime.enter();
            endpoint.bind().unwrap()
        };
        let enclave = booted.enclave.clone();
        runtime.spawn(async move {
            let _ = booted.enclave.serve(listener).await;
        });
        Self { runtime, enclave }
    }

    /// Stops it: every connection closes.
    pub fn stop(self) {
        self.runtime.shutdown_background();
    }
}

/// The enclave configuration the tests use (2 engine threads).
pub fn enclave_config() -> Config {
    let mut cfg = Config::default();
    cfg.engine.threads = 2;
    cfg
}

/// Copies bytes both ways between `front` (where the relay connects) and `back` (the enclave),
/// recording everything.
pub fn unix_tap(front: &Endpoint, back: Endpoint) -> Arc<Mutex<Vec<u8>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = front.bind().unwrap();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok(conn) = listener.accept().await {
            let back = back.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(up) = back.connect().await else {
                    return;
                };
                let (mut cr, mut cw) = tokio::io::split(conn);
                let (mut ur, mut uw) = tokio::io::split(up);
                let r1 = record.clone();
                let a = async move {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        r1.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = uw.shutdown().await;
                };
                let b = async move {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = ur.read(&mut buf).await {
                        if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(a, b);
            });
        }
    });
    seen
}

/// A stand-in for an emulator's hybrid vsock device (Firecracker's and vhost-device-vsock's
/// host side): a Unix socket at `path` where each connection names a guest port with
/// `CONNECT PORT\n`; the one guest port `port` is `guest` (a Unix endpoint here), answered
/// `OK <n>\n` and spliced through; any other port is refused by closing the connection.
pub fn hybrid_vsock_device(path: &std::path::Path, port: u32, guest: Endpoint) -> HybridCounts {
    let counts = HybridCounts::default();
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let count = counts.clone();
    tokio::spawn(async move {
        let mut host_port = 1u32 << 30;
        while let Ok((mut conn, _)) = listener.accept().await {
            host_port += 1;
            let (guest, count) = (guest.clone(), count.clone());
            tokio::spawn(async move {
                let mut line = Vec::new();
                while line.len() < 64 {
                    match conn.read_u8().await {
                        Ok(b'\n') => break,
                        Ok(b) => line.push(b),
                        Err(_) => return,
                    }
                }
                if line != format!("CONNECT {port}").into_bytes() {
                    count.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let Ok(mut up) = guest.connect().await else {
                    return;
                };
                if conn
                    .write_all(format!("OK {host_port}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                count.spliced.fetch_add(1, Ordering::Relaxed);
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
            });
        }
    });
    counts
}

/// What a [`hybrid_vsock_device`] did.
#[derive(Clone, Default)]
pub struct HybridCounts {
    /// Connections spliced to the guest port.
    pub spliced: Arc<AtomicUsize>,
    /// Connections that named another port, closed.
    pub refused: Arc<AtomicUsize>,
}

/// What the man in the middle does to the exchanges it relays.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// Relays faithfully (and records).
    #[default]
    Pass,
    /// Answers attestation requests with the first document it saw (an old nonce).
    ReplayAttestation,
    /// Replaces the attested public key inside the document with another enclave's.
    SwapKey(Vec<u8>),
    /// Flips one bit of the response body at this offset.
    FlipResponse(usize),
    /// Drops the last `n` bytes of the response body.
    TruncateResponse(usize),
    /// Flips one bit of the request body at this offset.
    FlipRequest(usize),
    /// Answers attestation requests itself with a document the forging NSM
    /// ([`Mitm::forge_with`]) signs for the client's nonce, attesting these fields: a genuine
    /// document in every other respect (chain, image, PCR16, PCR17), to test what the client
    /// checks beyond the verifier's.
    Reattest {
        /// The document's `public_key`.
        public_key: Option<Vec<u8>>,
        /// The document's `user_data`.
        user_data: Option<Vec<u8>>,
    },
    /// Holds the first `/v1/ohttp` response until a second one arrives, then gives each
    /// request the other's response.
    SwapResponses,
    /// Gives every `/v1/ohttp` request the first response it relayed in this mode.
    ReplayResponse,
}

/// What [`Mode::SwapResponses`] and [`Mode::ReplayResponse`] keep between exchanges.
#[derive(Default)]
struct Held {
    /// A response waiting for its swap partner, and where to send the partner's.
    waiting: Option<(Vec<u8>, tokio::sync::oneshot::Sender<Vec<u8>>)>,
    /// The first response relayed in [`Mode::ReplayResponse`].
    first_answer: Option<Vec<u8>>,
}

/// The NSM a [`Mitm`] signs [`Mode::Reattest`] documents with.
type Forger = Arc<Mutex<Option<Arc<common::nsm::mock::MockNsm>>>>;

/// A man-in-the-middle HTTP proxy in front of the relay.
pub struct Mitm {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// What it does now.
    pub mode: Arc<Mutex<Mode>>,
    /// Every request line, header block and body, and every response body, in order.
    pub seen: Arc<Mutex<Vec<u8>>>,
    /// Request lines (`METHOD path`) seen.
    pub requests: Arc<Mutex<Vec<String>>>,
    forger: Forger,
    held: Arc<Mutex<Held>>,
}

impl Mitm {
    /// Starts one in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Shared::default();
        let state = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(mitm_one(upstream, req, state).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            mode: shared.mode,
            seen: shared.seen,
            requests: shared.requests,
            forger: shared.forger,
            held: shared.held,
        }
    }

    /// The NSM that signs [`Mode::Reattest`] documents.
    pub fn forge_with(&self, nsm: Arc<common::nsm::mock::MockNsm>) {
        *self.forger.lock().unwrap() = Some(nsm);
    }

    /// Sets what it does (and forgets responses held by the previous mode).
    pub fn set(&self, mode: Mode) {
        *self.held.lock().unwrap() = Held::default();
        *self.mode.lock().unwrap() = mode;
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// What every exchange of one [`Mitm`] shares.
#[derive(Clone, Default)]
struct Shared {
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Vec<u8>>>,
    requests: Arc<Mutex<Vec<String>>>,
    /// The first attestation document relayed ([`Mode::ReplayAttestation`]).
    first_doc: Arc<Mutex<Option<Vec<u8>>>>,
    forger: Forger,
    held: Arc<Mutex<Held>>,
}

async fn mitm_one(
    upstream: SocketAddr,
    req: hyper::Request<Incoming>,
    state: Shared,
) -> hyper::Response<Full<Bytes>> {
    let Shared {
        mode,
        seen,
        requests,
        first_doc,
        forger,
        held,
    } = state;
    let mode = mode.lock().unwrap().clone();
    let forger = forger.lock().unwrap().clone();
    let (parts, body) = req.into_parts();
    let mut body = body.collect().await.unwrap().to_bytes().to_vec();
    let line = format!(
        "{} {}",
        parts.method,
        parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("")
    );
    requests.lock().unwrap().push(line.clone());
    {
        let mut s = seen.lock().unwrap();
        s.extend_from_slice(line.as_bytes());
        s.extend_from_slice(format!("{:?}", parts.headers).as_bytes());
        s.extend_from_slice(&body);
    }
    if let Mode::FlipRequest(at) = mode {
        if let Some(b) = body.get_mut(at) {
            *b ^= 1;
        }
    }
    let is_doc = parts.uri.path() == "/v1/attestation";
    if let (
        true,
        Mode::Reattest {
            public_key,
            user_data,
        },
    ) = (is_doc, &mode)
    {
        use common::nsm::Nsm;
        let nonce = parts
            .uri
            .query()
            .and_then(|q| q.strip_prefix("nonce="))
            .map(|h| hex::decode(h).unwrap());
        let doc = forger
            .expect("Mode::Reattest needs Mitm::forge_with")
            .attest(common::nsm::AttestationRequest {
                user_data: user_data.as_deref(),
                nonce: nonce.as_deref(),
                public_key: public_key.as_deref(),
            })
            .unwrap();
        return hyper::Response::new(Full::new(Bytes::from(doc)));
    }
    if is_doc && mode == Mode::ReplayAttestation {
        if let Some(doc) = first_doc.lock().unwrap().clone() {
            return hyper::Response::new(Full::new(Bytes::from(doc)));
        }
    }
    let tcp = tokio::net::TcpStream::connect(upstream).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut fwd = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone());
    for (k, v) in &parts.headers {
        fwd = fwd.header(k, v);
    }
    let resp = sender
        .send_request(fwd.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (rparts, rbody) = resp.into_parts();
    let mut rbody = match rbody.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    seen.lock().unwrap().extend_from_slice(&rbody);
    if is_doc && rparts.status == 200 {
        first_doc
            .lock()
            .unwrap()
            .get_or_insert_with(|| rbody.clone());
    }
    match mode {
        Mode::SwapKey(other) if is_doc => {
            let own = attestation_verifier::UnverifiedDocument::parse(&rbody)
                .unwrap()
                .unverified()
                .public_key
                .clone()
                .unwrap();
            assert_eq!(own.len(), other.len());
            let at = rbody
                .windows(own.len())
                .position(|w| w == own.as_slice())
                .unwrap();
            rbody[at..at + own.len()].copy_from_slice(&other);
        }
        Mode::FlipResponse(at) if !is_doc => {
            if let Some(b) = rbody.get_mut(at) {
                *b ^= 1;
            }
        }
        Mode::TruncateResponse(n) if !is_doc => {
            rbody.truncate(rbody.len().saturating_sub(n));
        }
        Mode::SwapResponses if !is_doc => {
            let partner = {
                let mut held = held.lock().unwrap();
                match held.waiting.take() {
                    Some((other, tx)) => {
                        let _ = tx.send(std::mem::replace(&mut rbody, other));
                        None
                    }
                    None => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        held.waiting = Some((rbody.clone(), tx));
                        Some(rx)
                    }
                }
            };
            if let Some(rx) = partner {
                rbody = rx.await.unwrap();
            }
        }
        Mode::ReplayResponse if !is_doc => {
            rbody = held
                .lock()
                .unwrap()
                .first_answer
                .get_or_insert_with(|| rbody.clone())
                .clone();
        }
        _ => {}
    }
    let mut out = hyper::Response::new(Full::new(Bytes::from(rbody)));
    *out.status_mut() = rparts.status;
    *out.headers_mut() = rparts.headers;
    out.headers_mut().remove(hyper::header::CONTENT_LENGTH);
    out.headers_mut().remove(hyper::header::TRANSFER_ENCODING);
    out
}

/// mock-kms, the enclave and the relay, with a tap between the relay and the enclave.
pub struct Stack {
    /// The mock CA.
    pub local: Local,
    /// The relay.
    pub relay: host::serve::Relay,
    /// The enclave.
    pub enclave: Option<RunningEnclave>,
    /// Where the enclave listens.
    pub enclave_endpoint: Endpoint,
    /// Every byte between the relay and the enclave.
    pub tap: Arc<Mutex<Vec<u8>>>,
    /// The model's SHA-256.
    pub model_sha256: [u8; 32],
    /// The enclave's configuration.
    pub cfg: Config,
}

impl Stack {
    /// Starts everything, with the tap, and waits until the relay says ready.
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    /// Starts everything and waits until the relay says ready; `tap` puts the recording tap
    /// between the relay and the enclave (benchmarks leave it out: it is one more hop).
    pub async fn start_with(tap: bool) -> Self {
        Self::start_custom(tap, enclave_config(), |_| {}).await
    }

    /// Starts everything with the enclave configuration `cfg`, and `serve` edited by `edit`
    /// (audit log, API keys, …), and waits until the relay says ready.
    pub async fn start_custom(
        tap: bool,
        cfg: Config,
        edit: impl FnOnce(&mut host::serve::config::ServeConfig),
    ) -> Self {
        Self::start_model(tap, cfg, &default_model(), "smollm2", edit).await
    }

    /// [`Stack::start_custom`] serving the GGUF file `model` under the name `name`.
    pub async fn start_model(
        tap: bool,
        cfg: Config,
        model: &std::path::Path,
        name: &str,
        edit: impl FnOnce(&mut host::serve::config::ServeConfig),
    ) -> Self {
        let local = Local::new();
        let kms_url = start_kms(vec![local.root()]).await;
        let (kms, sealed, model_sha256) = crate::seal_named(&kms_url, IMAGE, model, name).await;
        let dir = tempdir("stack");
        let enclave_endpoint = Endpoint::Unix(dir.join("enclave.sock"));
        let front = Endpoint::Unix(dir.join("tap.sock"));
        let enclave = RunningEnclave::start(&local, &enclave_endpoint, cfg.clone());
        let (relay_to, tap) = if tap {
            (front.clone(), unix_tap(&front, enclave_endpoint.clone()))
        } else {
            (enclave_endpoint.clone(), Arc::default())
        };
        let mut serve = host::serve::config::ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            enclave: relay_to.to_string(),
            sealed: Some(sealed),
            ping_interval_ms: 200,
            max_backoff_ms: 300,
            ..Default::default()
        };
        edit(&mut serve);
        let relay = host::serve::start(serve, Some(kms)).await.unwrap();
        crate::http::wait_ready(relay.local_addr, true, Duration::from_secs(120)).await;
        Self {
            local,
            relay,
            enclave: Some(enclave),
            enclave_endpoint,
            tap,
            model_sha256,
            cfg,
        }
    }

    /// The relay's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.relay.local_addr)
    }

    /// The policy file a client of this stack publishes: the mock image, the model, the
    /// configuration, the mock CA's root.
    pub fn policy_file(&self) -> ClientPolicyFile {
        let m = ImageMeasurement::from_label(IMAGE);
        ClientPolicyFile {
            roots: vec![self.root_pem()],
            allow_debug: false,
            max_age_secs: Some(60),
            max_clock_skew_secs: None,
            model_sha256: hex::encode(self.model_sha256),
            config_sha256: hex::encode(enclave::runtime::RuntimeConfig::of(&self.cfg).sha256()),
            pcrs: [(0, m.pcr0), (1, m.pcr1), (2, m.pcr2)]
                .iter()
                .map(|(i, v)| (i.to_string(), hex::encode(v)))
                .collect(),
        }
    }

    /// The mock CA's root certificate file.
    pub fn root_pem(&self) -> PathBuf {
        self.local.ca_dir.join(common::mock_ca::ROOT_CERT_FILE)
    }

    /// [`Stack::policy_file`], loaded.
    pub fn policy(&self) -> ClientPolicy {
        self.policy_file().to_policy().unwrap()
    }

    /// A client of `url` with this stack's policy.
    pub fn client(&self, url: &str) -> client::Client {
        client::Client::new(client::ClientConfig::new(url, self.policy())).unwrap()
    }

    /// Restarts the enclave (a fresh NSM and key) and waits for the relay to provision it.
    pub async fn restart_enclave(&mut self) {
        if let Some(e) = self.enclave.take() {
            e.stop();
        }
        crate::http::wait_ready(self.relay.local_addr, false, Duration::from_secs(30)).await;
        self.enclave = Some(RunningEnclave::start(
            &self.local,
            &self.enclave_endpoint,
            self.cfg.clone(),
        ));
        crate::http::wait_ready(self.relay.local_addr, true, Duration::from_secs(120)).await;
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        self.relay.shutdown().await;
        if let Some(e) = self.enclave.take() {
            e.stop();
        }
    }
}

/// A chat-completions body for `model`.
pub fn chat_body(model: &str, prompt: &str, stream: bool, max_tokens: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
        "max_tokens": max_tokens,
        "temperature": 0,
    }))
    .unwrap()
}
