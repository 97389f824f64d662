//! Python's boto3 (what users and the AWS CLI build on) talks to mock-kms: SigV4-signed JSON
//! 1.1 requests, blobs, and error codes. `make test` installs boto3 first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

#[test]
fn boto3_client_works() {
    let state = std::env::temp_dir().join(format!("mock-kms-boto3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let kms = Arc::new(mock_kms::Kms::open(&state, vec![], "us-east-1").unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(mock_kms::serve(listener, kms, std::future::pending()));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/boto3_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&url)
        .output()
        .expect("python3 (make test installs boto3)");
    assert!(
        out.status.success(),
        "boto3 client failed (is boto3 installed? `make test` installs it):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let _ = std::fs::remove_dir_all(&state);
}
