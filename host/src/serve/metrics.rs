//! The relay's Prometheus metrics, rendered in the text exposition format (Prometheus
//! "Exposition formats", text format 0.0.4). Only routes, statuses, sizes, times and counts:
//! never a byte of a request or response body.

use common::audit::AuditRecord;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Latency histogram bucket bounds, in seconds.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

/// The client listener's routes metrics are kept for (anything else is `other`). `/metrics`
/// is served on the operator's listener only (`ServeConfig::admin_listen`).
pub const ROUTES: [&str; 5] = [
    "/v1/attestation",
    "/v1/ohttp",
    "/healthz",
    "/readyz",
    "other",
];

/// The statuses counted one by one; anything else counts under its class (`2xx`, …).
const STATUSES: [u16; 17] = [
    200, 204, 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 500, 501, 502, 503, 504,
];

/// One counter per route and status, without a lock: one atomic increment per request.
#[derive(Default)]
struct Requests([[AtomicU64; STATUSES.len() + 5]; ROUTES.len()]);

fn status_slot(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|s| *s == status)
        .unwrap_or(STATUSES.len() + usize::from((status / 100).clamp(1, 5)) - 1)
}

fn status_label(slot: usize) -> String {
    match STATUSES.get(slot) {
        Some(s) => s.to_string(),
        None => format!("{}xx", slot + 1 - STATUSES.len()),
    }
}

/// Per-bucket counts (not cumulative: one increment per observation); cumulative sums are
/// made when rendering.
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Shards of the per-request counters: each worker thread counts in its own, so requests on
/// different cores do not fight over cache lines; rendering sums them.
const SHARDS: usize = 8;

/// The counters every request touches.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    requests: Requests,
    latency: [Histogram; ROUTES.len()],
    in_flight: AtomicI64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    ids: AtomicU64,
}

thread_local! {
    /// This thread's shard, assigned round-robin on first use.
    static SHARD: usize = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

/// All of the relay's metrics.
#[derive(Default)]
pub struct Metrics {
    shards: [Shard; SHARDS],
    /// Attestation documents fetched from the enclave.
    pub attestations: AtomicU64,
    /// Control connections established to the enclave.
    pub enclave_connects: AtomicU64,
    /// Provisioning attempts that ended with a ready model.
    pub provisioned_ok: AtomicU64,
    /// Provisioning attempts that failed.
    pub provisioned_failed: AtomicU64,
    /// 1 when the enclave is connected and its model is ready.
    pub ready: AtomicI64,
    /// Requests refused by the per-client rate limit.
    pub rate_limited: AtomicU64,
    /// Audit records received from the enclave.
    pub audit_events: AtomicU64,
    /// Streams cut because the enclave failed or went away mid-response.
    pub upstream_failures: AtomicU64,
    /// Serial of the API key list the enclave last took (0: none).
    pub api_keys_serial: AtomicU64,
    /// API key lists the enclave refused.
    pub api_keys_refused: AtomicU64,
    /// Counters read off the enclave's audit records.
    pub audit: AuditCounters,
}

/// Most distinct guardrail rule labels exported (the policy has at most 256 rules).
const MAX_RULE_LABELS: usize = 256;

/// Counters from the enclave's audit records: answers by status and finish reason, tokens,
/// and guardrail rules by id, action and direction. Labels are checked against fixed sets
/// (rule ids against their charset) so a record cannot blow up the exposition.
#[derive(Default)]
pub struct AuditCounters(std::sync::Mutex<AuditState>);

#[derive(Default)]
struct AuditState {
    statuses: std::collections::BTreeMap<String, u64>,
    finishes: std::collections::BTreeMap<&'static str, u64>,
    rules: std::collections::BTreeMap<(String, &'static str, &'static str), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl AuditCounters {
    /// Counts one audit record (a JSON object from the enclave); malformed ones are skipped.
    /// Names this build does not know count as "other".
    pub fn record(&self, json: &str) {
        let Ok(r) = serde_json::from_str::<AuditRecord>(json) else {
            return;
        };
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *s.statuses
            .entry(status_label(status_slot(r.status)))
            .or_default() += 1;
        *s.finishes.entry(r.finish_reason.name()).or_default() += 1;
        s.prompt_tokens += (r.prompt_tokens as u64).min(1 << 32);
        s.completion_tokens += (r.completion_tokens as u64).min(1 << 32);
        for h in r.guardrails {
            let id_ok = (1..=64).contains(&h.rule.len())
                && h.rule
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            let rule = if id_ok { h.rule } else { "other".into() };
            let key = (rule, h.action.name(), h.direction.name());
            if s.rules.len() < MAX_RULE_LABELS || s.rules.contains_key(&key) {
                *s.rules.entry(key).or_default() += 1;
            }
        }
    }

    fn render(&self, out: &mut String) {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP enclave_responses_total Answers inside the channel by status (from audit records).\n# TYPE enclave_responses_total counter");
        for (status, n) in &s.statuses {
            let _ = writeln!(out, "enclave_responses_total{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP enclave_finish_reasons_total Answers by finish reason.\n# TYPE enclave_finish_reasons_total counter");
        for (reason, n) in &s.finishes {
            let _ = writeln!(
                out,
                "enclave_finish_reasons_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP enclave_tokens_total Prompt and completion tokens.\n# TYPE enclave_tokens_total counter");
        let _ = writeln!(
            out,
            "enclave_tokens_total{{kind=\"prompt\"}} {}",
            s.prompt_tokens
        );
        let _ = writeln!(
            out,
            "enclave_tokens_total{{kind=\"completion\"}} {}",
            s.completion_tokens
        );
        let _ = writeln!(out, "# HELP enclave_guardrail_hits_total Requests on which a guardrail rule fired.\n# TYPE enclave_guardrail_hits_total counter");
        for ((rule, action, direction), n) in &s.rules {
            let _ = writeln!(out, "enclave_guardrail_hits_total{{rule=\"{rule}\",action=\"{action}\",direction=\"{direction}\"}} {n}");
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The metrics name of a request path.
pub fn route_of(path: &str) -> &'static str {
    ROUTES.into_iter().find(|r| *r == path).unwrap_or("other")
}

impl Metrics {
    fn shard(&self) -> (usize, &Shard) {
        let i = SHARD.with(|i| *i);
        let [first, ..] = &self.shards;
        let shard = self.shards.get(i).unwrap_or(first);
        (i, shard)
    }

    /// A request begins: counts it in flight and returns its id (unique in this process).
    pub fn request_started(&self) -> u64 {
        let (i, shard) = self.shard();
        shard.in_flight.fetch_add(1, Ordering::Relaxed);
        shard.ids.fetch_add(1, Ordering::Relaxed) * SHARDS as u64 + i as u64
    }

    /// Request body bytes received.
    pub fn add_bytes_in(&self, n: u64) {
        self.shard().1.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// A request ended (its response sent, or the client gone).
    pub fn request_finished(
        &self,
        route: &'static str,
        status: u16,
        elapsed: Duration,
        bytes_out: u64,
    ) {
        let shard = self.shard().1;
        shard.in_flight.fetch_sub(1, Ordering::Relaxed);
        shard.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        self.observe(route, status, elapsed);
    }

    /// Records one finished request's status and latency.
    pub fn observe(&self, route: &'static str, status: u16, elapsed: Duration) {
        let shard = self.shard().1;
        let i = ROUTES.iter().position(|r| *r == route).unwrap_or(0);
        if let Some(c) = shard
            .requests
            .0
            .get(i)
            .and_then(|r| r.get(status_slot(status)))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(h) = shard.latency.get(i) {
            let secs = elapsed.as_secs_f64();
            if let Some(b) = BUCKETS
                .iter()
                .position(|bound| secs <= *bound)
                .and_then(|k| h.buckets.get(k))
            {
                b.fetch_add(1, Ordering::Relaxed);
            }
            h.count.fetch_add(1, Ordering::Relaxed);
            h.sum_us
                .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        }
    }

    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(f).sum()
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP relay_requests_total HTTP requests by route and status."
        );
        let _ = writeln!(out, "# TYPE relay_requests_total counter");
        for (r, route) in ROUTES.iter().enumerate() {
            for slot in 0..STATUSES.len() + 5 {
                let n = self.sum(|s| {
                    s.requests
                        .0
                        .get(r)
                        .and_then(|c| c.get(slot))
                        .map_or(0, |c| c.load(Ordering::Relaxed))
                });
                if n > 0 {
                    let status = status_label(slot);
                    let _ = writeln!(
                        out,
                        "relay_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP relay_request_duration_seconds Time from request to the end of the response."
        );
        let _ = writeln!(out, "# TYPE relay_request_duration_seconds histogram");
        for (r, route) in ROUTES.iter().enumerate() {
            let hist = |f: &dyn Fn(&Histogram) -> u64| self.sum(|s| s.latency.get(r).map_or(0, f));
            let mut cumulative = 0;
            for (k, bound) in BUCKETS.iter().enumerate() {
                cumulative += hist(&|h| h.buckets.get(k).map_or(0, |b| b.load(Ordering::Relaxed)));
                let _ = writeln!(
                    out,
                    "relay_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let count = hist(&|h| h.count.load(Ordering::Relaxed));
            let _ = writeln!(
                out,
                "relay_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "relay_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                hist(&|h| h.sum_us.load(Ordering::Relaxed)) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "relay_request_duration_seconds_count{{route=\"{route}\"}} {count}"
            );
        }
        let gauges = [
            (
                "relay_in_flight_requests",
                "Requests being served.",
                self.shards
                    .iter()
                    .map(|s| s.in_flight.load(Ordering::Relaxed))
                    .sum(),
            ),
            (
                "relay_enclave_ready",
                "1 when the enclave is connected and its model ready.",
                self.ready.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let bytes = [
            (
                "relay_body_bytes_in_total",
                "Request body bytes received.",
                self.sum(|s| s.bytes_in.load(Ordering::Relaxed)),
            ),
            (
                "relay_body_bytes_out_total",
                "Response body bytes sent.",
                self.sum(|s| s.bytes_out.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, v) in bytes {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let counters = [
            (
                "relay_attestation_requests_total",
                "Attestation documents fetched from the enclave.",
                &self.attestations,
            ),
            (
                "relay_enclave_connects_total",
                "Control connections made to the enclave.",
                &self.enclave_connects,
            ),
            (
                "relay_rate_limited_total",
                "Requests refused by the per-client rate limit.",
                &self.rate_limited,
            ),
            (
                "relay_audit_events_total",
                "Audit records received from the enclave.",
                &self.audit_events,
            ),
            (
                "relay_upstream_failures_total",
                "Streams cut by an enclave failure.",
                &self.upstream_failures,
            ),
            (
                "relay_api_keys_refused_total",
                "API key lists the enclave refused.",
                &self.api_keys_refused,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP relay_provisioning_total Provisioning attempts by result.\n# TYPE relay_provisioning_total counter"
        );
        let _ = writeln!(
            out,
            "relay_provisioning_total{{result=\"ok\"}} {}\nrelay_provisioning_total{{result=\"failed\"}} {}",
            self.provisioned_ok.load(Ordering::Relaxed),
            self.provisioned_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP relay_api_keys_serial Serial of the API key list in force in the enclave.\n# TYPE relay_api_keys_serial gauge\nrelay_api_keys_serial {}",
            self.api_keys_serial.load(Ordering::Relaxed)
        );
        self.audit.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.observe("/v1/ohttp", 200, Duration::from_millis(3));
        m.observe("/v1/ohttp", 200, Duration::from_millis(300));
        m.observe(route_of("/nope"), 404, Duration::from_micros(10));
        m.observe("/readyz", 299, Duration::from_micros(10));
        let text = m.render();
        assert!(text.contains("relay_requests_total{route=\"/v1/ohttp\",status=\"200\"} 2"));
        assert!(text.contains("relay_requests_total{route=\"other\",status=\"404\"} 1"));
        assert!(text
            .contains("relay_request_duration_seconds_bucket{route=\"/v1/ohttp\",le=\"0.005\"} 1"));
        assert!(text
            .contains("relay_request_duration_seconds_bucket{route=\"/v1/ohttp\",le=\"0.5\"} 2"));
        assert!(text.contains("relay_request_duration_seconds_count{route=\"/v1/ohttp\"} 2"));
        assert!(text.contains("relay_requests_total{route=\"/readyz\",status=\"2xx\"} 1"));
    }

    #[test]
    fn audit_records_become_bounded_counters() {
        let m = Metrics::default();
        let rec = r#"{"v":1,"request_id":"x","route":"chat.completions","status":200,"key":null,"model":"m","prompt_tokens":7,"completion_tokens":5,"finish_reason":"content_filter","guardrails":[{"rule":"secrets","action":"redact","direction":"output"},{"rule":"bad label\"","action":"x","direction":"y"}],"latency_ms":3}"#;
        m.audit.record(rec);
        m.audit.record("not json");
        let text = m.render();
        assert!(
            text.contains("enclave_responses_total{status=\"200\"} 1"),
            "{text}"
        );
        assert!(text.contains("enclave_finish_reasons_total{reason=\"content_filter\"} 1"));
        assert!(text.contains("enclave_tokens_total{kind=\"prompt\"} 7"));
        assert!(text.contains(
            "enclave_guardrail_hits_total{rule=\"secrets\",action=\"redact\",direction=\"output\"} 1"
        ));
        assert!(text.contains(
            "enclave_guardrail_hits_total{rule=\"other\",action=\"other\",direction=\"other\"} 1"
        ));
    }
}
