//! The attested end-to-end channel on the whole local stack (DESIGN.md §4.3-4.4): the client
//! verifies the enclave before sending anything, and the relay (the untrusted side) carries
//! only ciphertext. A man in the middle between the client and the relay replays documents,
//! swaps keys and tampers with ciphertext; every attempt is refused, and nothing it sees, logs
//! or exports contains the prompt or the answer.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use client::attest::AttestError;
use client::ClientError;
use common::bhttp::Request;
use std::sync::{Arc, Mutex};
use tests::stack::{chat_body, Mitm, Mode, Stack};

fn logs() -> Arc<Mutex<Vec<u8>>> {
    tests::captured_logs()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The man in the middle saw `count` requests, every one an attestation request, and never
/// the prompt "must not be sent".
fn only_attestations_crossed(mitm: &Mitm, count: usize) {
    let requests = mitm.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), count, "{requests:?}");
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("GET /v1/attestation")),
        "{requests:?}"
    );
    assert!(!contains(&mitm.seen.lock().unwrap(), b"must not be sent"));
}

fn chat(model: &str, prompt: &str, stream: bool, max_tokens: u32) -> Request {
    Request::new(
        "POST",
        "/v1/chat/completions",
        chat_body(model, prompt, stream, max_tokens),
    )
    .with_header("content-type", "application/json")
}

/// The text of a streamed answer (SSE `chat.completion.chunk` events).
fn sse_text(body: &[u8]) -> String {
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let mut out = String::new();
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        if data == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            out.push_str(t);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_the_relay_and_nothing_readable_crosses_it() {
    let logs = logs();
    let stack = Stack::start().await;
    let mitm = Mitm::start(stack.relay.local_addr).await;
    let client = stack.client(&mitm.url());

    // Verified first: the document names the model and the key.
    let attested = client.attest().await.unwrap();
    assert_eq!(attested.binding.model, "smollm2");
    assert_eq!(attested.binding.model_sha256, stack.model_sha256);
    let model = attested.binding.model.clone();

    let canary = "CANARY-5d1e9b-prompt-never-leaves";
    let prompt = format!("Repeat this code exactly: {canary}");
    let mut streamed = client.send(&chat(&model, &prompt, true, 24)).await.unwrap();
    assert_eq!(streamed.status, 200);
    assert_eq!(
        streamed.header("content-type"),
        Some(&b"text/event-stream"[..])
    );
    let mut body = Vec::new();
    while let Some(c) = streamed.chunk().await {
        body.extend(c.unwrap());
    }
    let answer = sse_text(&body);
    assert!(answer.len() >= 10, "{answer:?}");

    let whole = client
        .send(&chat(&model, &prompt, false, 24))
        .await
        .unwrap();
    assert_eq!(whole.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&whole.bytes().await.unwrap()).unwrap();
    assert_eq!(v["object"], "chat.completion");
    // Greedy decoding: the same answer both ways.
    assert_eq!(v["choices"][0]["message"]["content"], answer.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 24);

    let models = client
        .send(&Request::new("GET", "/v1/models", vec![]))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&models.bytes().await.unwrap()).unwrap();
    assert_eq!(v["data"][0]["id"], "smollm2");

    // Content errors travel inside the channel: the relay saw 200s only.
    let unknown = client
        .send(&chat("gpt-4", &prompt, false, 4))
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);
    let v: serde_json::Value = serde_json::from_slice(&unknown.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    let too_long = client
        .send(&chat(&model, &prompt, false, 1_000_000))
        .await
        .unwrap();
    assert_eq!(too_long.status, 400);
    let v: serde_json::Value = serde_json::from_slice(&too_long.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let bad = Request::new("POST", "/v1/chat/completions", b"{not json".to_vec());
    assert_eq!(client.send(&bad).await.unwrap().status, 400);
    assert_eq!(client.attestation_count(), 1, "the verified key is reused");

    let metrics = tests::http::request(stack.relay.admin_addr, "GET", "/metrics", None, b"").await;
    let metrics = metrics.body;
    let forwarded = mitm.seen.lock().unwrap().clone();
    let to_enclave = stack.tap.lock().unwrap().clone();
    let logged = logs.lock().unwrap().clone();
    assert!(!forwarded.is_empty() && !to_enclave.is_empty() && !logged.is_empty());
    for (what, bytes) in [
        ("client↔relay", &forwarded),
        ("relay↔enclave", &to_enclave),
        ("logs", &logged),
        ("metrics", &metrics),
    ] {
        assert!(
            !contains(bytes, canary.as_bytes()),
            "the prompt is readable in {what}"
        );
        assert!(
            !contains(bytes, answer.as_bytes()),
            "the answer is readable in {what}"
        );
    }
    // The relay carried OHTTP, and only that.
    let requests = mitm.requests.lock().unwrap().clone();
    assert!(requests
        .iter()
        .all(|r| r.starts_with("GET /v1/attestation?nonce=") || r == "POST /v1/ohttp"));
    stack.stop().await;
}

/// Opens a whole sealed response: its status and body.
fn open(mut opener: common::channel::ResponseOpener, sealed: &[u8]) -> (u16, Vec<u8>) {
    let mut plain = opener.push(sealed, 1 << 20).unwrap();
    plain.extend(opener.finish(1 << 20).unwrap());
    let mut decoder = common::bhttp::ResponseDecoder::new();
    let (mut status, mut body) = (0, Vec::new());
    for part in decoder.push(&plain).unwrap() {
        match part {
            common::bhttp::ResponsePart::Head(h) => status = h.status,
            common::bhttp::ResponsePart::Data(d) => body.extend(d),
            common::bhttp::ResponsePart::End => {}
        }
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_is_refused_and_generates_nothing() {
    let stack = Stack::start().await;
    let client = stack.client(&stack.url());
    let key_config = client.attest().await.unwrap().key_config.clone();
    let dated = chat("smollm2", "Say hello.", false, 8).with_header(
        "date",
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    );
    let (body, opener) = common::channel::encapsulate(&key_config, &dated.encode()).unwrap();
    let post = || {
        tests::http::request(
            stack.relay.local_addr,
            "POST",
            "/v1/ohttp",
            Some(common::channel::REQUEST_MEDIA_TYPE),
            &body,
        )
    };
    let first = post().await;
    assert_eq!(first.status, 200);
    let (status, answer) = open(opener, &first.body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let metrics = || async {
        let m = tests::http::request(stack.relay.admin_addr, "GET", "/metrics", None, b"").await;
        String::from_utf8(m.body).unwrap()
    };
    let completion = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("enclave_tokens_total{kind=\"completion\"}"))
            .map(str::to_string)
    };
    // The relay posts the captured body three more times: refused inside the channel (the
    // relay sees only sealed 200s), nothing generated, each refusal counted.
    // The first answer's audit record reaches the metrics asynchronously: wait for it.
    let mut before = None;
    for _ in 0..100 {
        before = completion(&metrics().await);
        if before.as_deref().is_some_and(|l| !l.ends_with(" 0")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        let again = post().await;
        assert_eq!(again.status, 200);
        assert!(!again.body.is_empty());
    }
    let mut m = String::new();
    for _ in 0..100 {
        m = metrics().await;
        if m.contains("enclave_finish_reasons_total{reason=\"replayed\"} 3") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        m.contains("enclave_finish_reasons_total{reason=\"replayed\"} 3"),
        "{m}"
    );
    assert_eq!(completion(&m), before, "replays generated tokens");
    // An undated request (a client from before the check) is refused too.
    let (undated, opener) =
        common::channel::encapsulate(&key_config, &chat("smollm2", "hi", false, 4).encode())
            .unwrap();
    let r = tests::http::request(
        stack.relay.local_addr,
        "POST",
        "/v1/ohttp",
        Some(common::channel::REQUEST_MEDIA_TYPE),
        &undated,
    )
    .await;
    let (status, body) = open(opener, &r.body);
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "missing_date");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_policies_refuse_before_any_request_body() {
    let stack = Stack::start().await;
    let mitm = Mitm::start(stack.relay.local_addr).await;
    type Edit = Box<dyn Fn(&mut client::policy::ClientPolicyFile)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "PCR0",
            Box::new(|p| {
                p.pcrs.insert("0".into(), "ab".repeat(48));
            }),
        ),
        (
            "PCR16 (model)",
            Box::new(|p| p.model_sha256 = "cd".repeat(32)),
        ),
        (
            "PCR17 (configuration)",
            Box::new(|p| p.config_sha256 = "ef".repeat(32)),
        ),
        ("root", Box::new(|p| p.roots = vec![])),
    ];
    for (what, edit) in cases {
        let mut file = stack.policy_file();
        edit(&mut file);
        let policy = file.to_policy().unwrap();
        let client = client::Client::new(client::ClientConfig::new(mitm.url(), policy)).unwrap();
        let err = client
            .send(&chat("smollm2", "must not be sent", false, 4))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Attestation(AttestError::Document(_))),
            "{what}: {err}"
        );
    }
    only_attestations_crossed(&mitm, 4);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_documents_and_swapped_keys_are_refused() {
    let stack = Stack::start().await;
    let mitm = Mitm::start(stack.relay.local_addr).await;
    // A first client's exchange lets the relay keep a genuine document.
    stack.client(&mitm.url()).attest().await.unwrap();

    mitm.set(Mode::ReplayAttestation);
    let err = stack.client(&mitm.url()).attest().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Attestation(AttestError::Document(e)) if e.to_string().contains("nonce")),
        "{err}"
    );

    // Another key in the genuine document: the signature no longer holds.
    let other = common::channel::GatewayKey::generate().unwrap();
    mitm.set(Mode::SwapKey(other.encoded_config().to_vec()));
    let err = stack.client(&mitm.url()).attest().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Attestation(AttestError::Document(_))),
        "{err}"
    );
    let requests = mitm.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("GET /v1/attestation")),
        "{requests:?}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_binding_refusal_has_its_own_error_and_nothing_is_sent() {
    use common::binding::Binding;
    use common::nsm::Nsm;
    let stack = Stack::start().await;
    let mitm = Mitm::start(stack.relay.local_addr).await;
    let genuine = stack.client(&mitm.url()).attest().await.unwrap();
    // An NSM of the same CA and image that measured the same model and configuration: its
    // documents pass every check of the verifier, so what fails below is the binding.
    let forger = stack.local.nsm(tests::IMAGE, |_| {});
    // (Measured and locked, as the enclave does: documents show PCR16/17 only once locked.)
    forger
        .extend_pcr(16, &genuine.binding.model_sha256)
        .unwrap();
    forger
        .extend_pcr(17, &genuine.binding.config_sha256)
        .unwrap();
    forger.lock_pcr(16).unwrap();
    forger.lock_pcr(17).unwrap();
    mitm.forge_with(forger);
    let key = genuine.key_config.clone();
    let bound = |edit: fn(&mut Binding)| {
        let mut b = genuine.binding.clone();
        edit(&mut b);
        Some(b.encode())
    };
    // The forger itself is faithful: with the genuine fields, its document is accepted.
    mitm.set(Mode::Reattest {
        public_key: Some(key.clone()),
        user_data: bound(|_| {}),
    });
    let same = stack.client(&mitm.url()).attest().await.unwrap();
    assert_eq!(same.key_config, key);

    let other_key = common::channel::GatewayKey::generate().unwrap();
    type Check = fn(&AttestError) -> bool;
    // What the case is, the document's public_key and user_data, the error expected.
    type Case = (&'static str, Option<Vec<u8>>, Option<Vec<u8>>, Check);
    let cases: Vec<Case> = vec![
        (
            "another key than the bound one",
            Some(other_key.encoded_config().to_vec()),
            bound(|_| {}),
            |e| matches!(e, AttestError::KeyNotBound),
        ),
        (
            "the binding names another model",
            Some(key.clone()),
            bound(|b| b.model_sha256 = [9; 32]),
            |e| matches!(e, AttestError::DigestMismatch("model")),
        ),
        (
            "the binding names another configuration",
            Some(key.clone()),
            bound(|b| b.config_sha256 = [9; 32]),
            |e| matches!(e, AttestError::DigestMismatch("configuration")),
        ),
        (
            "the binding names another key id",
            Some(key.clone()),
            bound(|b| b.key_id ^= 1),
            |e| matches!(e, AttestError::KeyIdMismatch),
        ),
        ("no key", None, bound(|_| {}), |e| {
            matches!(e, AttestError::NoKey)
        }),
        ("no binding", Some(key.clone()), None, |e| {
            matches!(e, AttestError::NoBinding)
        }),
        (
            "not a binding",
            Some(key.clone()),
            Some(b"user data of another product".to_vec()),
            |e| matches!(e, AttestError::Binding(_)),
        ),
    ];
    let before = mitm.requests.lock().unwrap().len();
    for (what, public_key, user_data, check) in cases {
        mitm.set(Mode::Reattest {
            public_key,
            user_data,
        });
        let err = stack
            .client(&mitm.url())
            .send(&chat("smollm2", "must not be sent", false, 4))
            .await
            .unwrap_err();
        match &err {
            ClientError::Attestation(e) if check(e) => {}
            other => panic!("{what}: {other}"),
        }
    }
    only_attestations_crossed(&mitm, before + 7);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_truncated_ciphertext_fails_without_showing_text() {
    let stack = Stack::start().await;
    let mitm = Mitm::start(stack.relay.local_addr).await;
    let client = stack.client(&mitm.url());
    let req = chat("smollm2", "Say hello.", false, 8);
    let good = client.send(&req).await.unwrap().bytes().await.unwrap();
    assert!(!good.is_empty());

    // Any bit of the response: the stream fails; nothing decrypted from a bad chunk is shown.
    for at in [0, 20, 40, 60] {
        mitm.set(Mode::FlipResponse(at));
        let result = match client.send(&req).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        assert!(result.is_err(), "flip at {at} went unnoticed");
    }
    // The final chunk removed: truncation is an error, not a short answer.
    mitm.set(Mode::TruncateResponse(17));
    let truncated = match client.send(&req).await {
        Ok(r) => r.bytes().await,
        Err(e) => Err(e),
    };
    assert!(truncated.is_err());

    // A tampered request does not decrypt in the enclave; the client re-attests once (the key
    // is the same), and reports the refusal.
    mitm.set(Mode::FlipRequest(50));
    let err = client.send(&req).await.unwrap_err();
    assert!(matches!(err, ClientError::KeyRefused(_)), "{err}");
    mitm.set(Mode::Pass);
    let again = client.send(&req).await.unwrap().bytes().await.unwrap();
    let content = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b).unwrap()["choices"][0]["message"]["content"]
            .clone()
    };
    assert_eq!(content(&again), content(&good));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_streamed_through_relay_channel_and_gateway() {
    let stack = Stack::start().await;
    // Straight to the relay: the man in the middle of the other tests buffers whole bodies.
    let client = stack.client(&stack.url());
    let engine = stack.enclave.as_ref().unwrap().enclave.served().unwrap();
    // Up to 512 tokens (the greedy answer repeats itself past 128): seconds of generation at full
    // speed, so that a client that is slow to be scheduled (the tests share two cores) still
    // reads its first piece before the end.
    let mut streamed = client
        .send(&chat("smollm2", "Tell me about the sea.", true, 512))
        .await
        .unwrap();
    assert_eq!(streamed.status, 200);
    // Streamed, not merely cut in pieces: the first piece reaches the client while the enclave
    // is still generating the answer. A relay, channel or gateway that buffered the whole
    // response would deliver it only after the sequence had left the engine.
    let mut body = streamed.chunk().await.unwrap().unwrap();
    let running = engine.engine.stats().running;
    assert_eq!(running, 1, "the first piece arrived after generation ended");
    while let Some(c) = streamed.chunk().await {
        body.extend(c.unwrap());
    }
    assert!(!sse_text(&body).is_empty());
    stack.stop().await;
}

/// Sends `req` and reads its whole answer.
async fn answer(client: &client::Client, req: &Request) -> Result<Vec<u8>, ClientError> {
    client.send(req).await?.bytes().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_swapped_or_replayed_between_concurrent_requests_are_refused() {
    let stack = Stack::start().await;
    let mitm = Mitm::start(stack.relay.local_addr).await;
    let client = stack.client(&mitm.url());
    client.attest().await.unwrap();
    let (a, b) = (
        chat("smollm2", "Say hello.", false, 8),
        chat("smollm2", "Name a colour.", false, 8),
    );
    let own_a = answer(&client, &a).await.unwrap();
    // Each response is sealed under a key derived from its own request's encapsulation
    // (RFC 9458 §4.4): given the other's, each client fails before any content is shown.
    mitm.set(Mode::SwapResponses);
    let (ra, rb) = tokio::join!(answer(&client, &a), answer(&client, &b));
    for (what, r) in [("a", ra), ("b", rb)] {
        assert!(
            matches!(r, Err(ClientError::Channel(_))),
            "{what}: {:?}",
            r.map(|b| String::from_utf8_lossy(&b).into_owned())
        );
    }
    // One answer given to both: the request it belongs to reads it, the other fails.
    mitm.set(Mode::ReplayResponse);
    let (ra, rb) = tokio::join!(answer(&client, &a), answer(&client, &b));
    let (ok, refused): (Vec<_>, Vec<_>) = [ra, rb].into_iter().partition(Result::is_ok);
    assert_eq!((ok.len(), refused.len()), (1, 1), "{ok:?} {refused:?}");
    assert!(matches!(refused[0], Err(ClientError::Channel(_))));
    // Greedy: whichever it was, its text is its own request's answer.
    let text = ok.into_iter().next().unwrap().unwrap();
    let own_b = {
        mitm.set(Mode::Pass);
        answer(&client, &b).await.unwrap()
    };
    let content = |body: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(body).unwrap()["choices"][0]["message"]
            ["content"]
            .clone()
    };
    assert!(
        [content(&own_a), content(&own_b)].contains(&content(&text)),
        "{}",
        String::from_utf8_lossy(&text)
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_restart_between_requests_re_attests_and_succeeds() {
    let mut stack = Stack::start().await;
    let client = stack.client(&stack.url());
    let req = chat("smollm2", "Say hello.", false, 8);
    let before = client.attested().await.unwrap();
    let first = client.send(&req).await.unwrap().bytes().await.unwrap();
    stack.restart_enclave().await;
    // The cached key is stale: the gateway refuses it, the client attests the new key, retries.
    let second = client.send(&req).await.unwrap().bytes().await.unwrap();
    let after = client.attested().await.unwrap();
    assert_ne!(before.key_config, after.key_config);
    assert_eq!(client.attestation_count(), 2);
    let text = |b: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(text(&first), text(&second));
    stack.stop().await;
}

#[test]
fn boot_measures_and_locks_pcr17_before_any_document() {
    use common::nsm::Nsm;
    let local = tests::Local::new();
    let nsm = local.nsm(tests::IMAGE, |_| {});
    let cfg = tests::stack::enclave_config();
    let booted = enclave::boot(nsm.clone(), cfg.clone()).unwrap();
    let want = enclave::runtime::RuntimeConfig::of(&cfg).sha256();
    assert_eq!(booted.config_sha256, want);
    let pcr17 = nsm.describe_pcr(17).unwrap();
    assert!(pcr17.locked);
    assert_eq!(pcr17.value, common::binding::config_pcr17(&want));
    // The same enclave cannot later claim another configuration.
    let mut other = cfg;
    other.max_request_bytes += 1;
    assert!(matches!(
        enclave::boot(nsm, other),
        Err(enclave::BootError::Measure(
            common::nsm::MeasureError::AlreadyMeasured(17)
        ))
    ));
}
