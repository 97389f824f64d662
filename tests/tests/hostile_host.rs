//! The enclave's listener against a hostile host, speaking the wire protocol directly: an
//! oversize sealed header, frames out of order while provisioning, a second provisioning
//! while one is in progress, request bodies over the limit, silent connections and more
//! connections than the enclave takes. Each is refused or closed, and nothing of it leaves
//! the enclave measured, locked or stuck.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use common::nsm::mock::MockNsm;
use common::nsm::Nsm;
use common::sealed::{SealedHeader, MAX_HEADER_LEN, MODEL_PCR};
use common::transport::Endpoint;
use common::wire::io::{
    handshake, read_frame, read_preface, write_frame, write_preface, write_raw,
};
use common::wire::{raw_header, Message, MessageType, DEFAULT_MAX_PAYLOAD};
use enclave::server::Config;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const KEY: [u8; 32] = [0x5a; 32];

struct Enclave {
    nsm: Arc<MockNsm>,
    path: std::path::PathBuf,
}

/// The real enclave (mock NSM) on a Unix socket of its own, with `edit`'s configuration.
fn start(tag: &str, edit: impl FnOnce(&mut Config)) -> Enclave {
    let local = tests::Local::new();
    let nsm = local.nsm(tests::IMAGE, |_| {});
    let mut cfg = tests::stack::enclave_config();
    edit(&mut cfg);
    let booted = enclave::boot(nsm.clone(), cfg).unwrap();
    let path = tests::tempdir(tag).join("enclave.sock");
    let listener = Endpoint::Unix(path.clone()).bind().unwrap();
    tokio::spawn(async move {
        let _ = booted.enclave.serve(listener).await;
    });
    Enclave { nsm, path }
}

impl Enclave {
    async fn connect(&self) -> UnixStream {
        let mut conn = UnixStream::connect(&self.path).await.unwrap();
        handshake(&mut conn).await.unwrap();
        conn
    }
}

async fn next(conn: &mut UnixStream) -> Message {
    tokio::time::timeout(
        Duration::from_secs(60),
        read_frame(conn, DEFAULT_MAX_PAYLOAD),
    )
    .await
    .expect("the enclave answers")
    .unwrap()
}

/// Whether the enclave closed `conn` (within a generous bound).
async fn closed(conn: &mut UnixStream) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(30),
            read_frame(conn, DEFAULT_MAX_PAYLOAD)
        )
        .await,
        Ok(Err(_))
    )
}

fn sealed_model() -> Vec<u8> {
    tests::seal_with_own_key(&std::fs::read(tests::default_model()).unwrap(), &KEY)
}

fn header_of(sealed: &[u8]) -> Vec<u8> {
    let (_, len) = SealedHeader::decode(sealed).unwrap();
    sealed[..len].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_sealed_header_is_refused_and_pcr16_stays_unlocked() {
    let e = start("hostile-header", |_| {});
    // A real header that says it is one byte over the sealed format's bound, and is.
    let mut header = header_of(&sealed_model());
    header.resize(MAX_HEADER_LEN + 1, 0);
    header[10..14].copy_from_slice(&((MAX_HEADER_LEN + 1) as u32).to_be_bytes());
    let mut conn = e.connect().await;
    write_frame(&mut conn, &Message::SealedHeader(header))
        .await
        .unwrap();
    match next(&mut conn).await {
        Message::Failed { reason } => assert!(reason.contains("header_len"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let pcr16 = e.nsm.describe_pcr(MODEL_PCR).unwrap();
    assert!(!pcr16.locked, "PCR16 must stay unlocked");
    assert!(pcr16.value.iter().all(|b| *b == 0), "nor extended");
    // A frame longer than any exchange may open with is not even read: the connection ends.
    let mut conn = e.connect().await;
    let huge = raw_header(MessageType::SealedHeader, DEFAULT_MAX_PAYLOAD).unwrap();
    conn.write_all(&huge).await.unwrap();
    assert!(closed(&mut conn).await);
    assert!(!e.nsm.describe_pcr(MODEL_PCR).unwrap().locked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_concurrent_provisioning_are_refused_and_the_enclave_recovers() {
    let e = start("hostile-order", |_| {});
    let sealed = sealed_model();
    // The host sends a chunk where the key release response belongs.
    let mut first = e.connect().await;
    write_frame(&mut first, &Message::SealedHeader(header_of(&sealed)))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut first).await,
        Message::KeyReleaseRequest { .. }
    ));
    // Meanwhile a second provisioning is refused: one at a time.
    let mut second = e.connect().await;
    write_frame(&mut second, &Message::SealedHeader(header_of(&sealed)))
        .await
        .unwrap();
    match next(&mut second).await {
        Message::Failed { reason } => {
            assert!(reason.contains("another connection"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    write_raw(&mut first, MessageType::Chunk, b"not yet")
        .await
        .unwrap();
    first.flush().await.unwrap();
    match next(&mut first).await {
        Message::Failed { reason } => {
            assert!(reason.contains("expected KeyReleaseResponse"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // PCR16 names the model now (measured before any key), and a correct provisioning of the
    // same model still succeeds: the refusals left nothing stuck.
    assert!(e.nsm.describe_pcr(MODEL_PCR).unwrap().locked);
    let mut conn = UnixStream::connect(&e.path).await.unwrap();
    match tests::host_with_own_key(&mut conn, &sealed, &KEY).await {
        Some(Message::Ready { model_name, .. }) => assert_eq!(model_name, "smollm2"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_the_limit_are_answered_413() {
    let e = start("hostile-413", |c| c.max_request_bytes = 1000);
    let too_large = |m: Message| match m {
        Message::StreamError { status, reason } => {
            assert_eq!(status, 413, "{reason}");
            assert!(reason.contains("1000"), "{reason}");
        }
        other => panic!("{other:?}"),
    };
    // Over the limit across frames.
    let mut conn = e.connect().await;
    write_frame(&mut conn, &Message::RequestData(vec![1; 600]))
        .await
        .unwrap();
    // The enclave may answer and close on this frame's header, before its payload is written.
    let _ = write_frame(&mut conn, &Message::RequestData(vec![1; 600])).await;
    too_large(next(&mut conn).await);
    // Over the limit in the first frame.
    let mut conn = e.connect().await;
    write_frame(&mut conn, &Message::RequestData(vec![1; 1001]))
        .await
        .unwrap();
    too_large(next(&mut conn).await);
    // A frame that would pass the limit is refused on its header: its payload never comes.
    let mut conn = e.connect().await;
    write_frame(&mut conn, &Message::RequestData(vec![1; 500]))
        .await
        .unwrap();
    conn.write_all(&raw_header(MessageType::RequestData, 4 << 20).unwrap())
        .await
        .unwrap();
    too_large(next(&mut conn).await);
    // Exactly the limit is a body like any other (no model here: 503, not 413).
    let mut conn = e.connect().await;
    write_frame(&mut conn, &Message::RequestData(vec![1; 1000]))
        .await
        .unwrap();
    write_frame(&mut conn, &Message::RequestEnd).await.unwrap();
    match next(&mut conn).await {
        Message::StreamError { status, .. } => assert_eq!(status, 503),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    let e = start("hostile-idle", |c| c.idle_timeout_ms = 300);
    // Nothing after the preface.
    let mut quiet = e.connect().await;
    // Half a request body, then nothing.
    let mut half = e.connect().await;
    write_frame(&mut half, &Message::RequestData(vec![1; 10]))
        .await
        .unwrap();
    // Half a frame header.
    let mut partial = e.connect().await;
    partial
        .write_all(&[MessageType::RequestData as u8, 0])
        .await
        .unwrap();
    for conn in [&mut quiet, &mut half, &mut partial] {
        assert!(closed(conn).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let e = start("hostile-conns", |c| c.max_connections = 2);
    let first = e.connect().await;
    let _second = e.connect().await;
    // The third is in the listener's backlog: the enclave does not take it (no preface).
    let mut third = UnixStream::connect(&e.path).await.unwrap();
    write_preface(&mut third).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), read_preface(&mut third)).await;
    assert!(early.is_err(), "a third connection was served");
    // One closes: the third is served.
    drop(first);
    tokio::time::timeout(Duration::from_secs(30), read_preface(&mut third))
        .await
        .expect("served once a connection closed")
        .unwrap();
}
