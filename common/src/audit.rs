//! The enclave's audit record: one JSON object per request, sent to the host as an `Audit`
//! event on the control connection and counted by the host's metrics. One type for the
//! enclave that writes it and the host that reads it, so a new route or finish reason is one
//! change both sides compile against. Ids, counts, rule ids and actions, status and latency:
//! never content, never a key (the key appears only as its hashed id).

use serde::{Deserialize, Serialize};

/// The version of the record's shape.
pub const AUDIT_VERSION: u32 = 1;

/// One request's audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// [`AUDIT_VERSION`].
    pub v: u32,
    /// A random id for this request, also in the enclave's logs.
    pub request_id: String,
    pub route: Route,
    /// The HTTP status inside the channel (0 when no answer was written).
    pub status: u16,
    /// The API key's audit id (a keyed hash of its id), when one was presented and valid.
    pub key: Option<String>,
    pub model: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: Finish,
    /// The guardrail rules that fired.
    pub guardrails: Vec<AuditHit>,
    pub latency_ms: u64,
}

impl AuditRecord {
    /// A record for a request to `model` that has not been routed or answered yet.
    pub fn new(request_id: String, model: &str) -> Self {
        Self {
            v: AUDIT_VERSION,
            request_id,
            route: Route::Other,
            status: 0,
            key: None,
            model: model.to_string(),
            prompt_tokens: 0,
            completion_tokens: 0,
            finish_reason: Finish::None,
            guardrails: Vec::new(),
            latency_ms: 0,
        }
    }
}

closed_names!(
    /// Which API the request was for.
    Route {
        ChatCompletions = "chat.completions",
        Completions = "completions",
        Models = "models",
    }
);

closed_names!(
    /// How the answer ended: OpenAI's finish reasons, and the ways a request ends without one.
    Finish {
        /// An end-of-generation token or a stop sequence.
        Stop = "stop",
        /// `max_tokens` reached.
        Length = "length",
        /// A guardrail blocked the answer.
        ContentFilter = "content_filter",
        /// The engine failed.
        Error = "error",
        /// The client went away.
        Cancelled = "cancelled",
        /// A replayed request, refused.
        Replayed = "replayed",
        /// No generation (refused before it, or not a generation route).
        None = "none",
    }
);

closed_names!(
    /// What a guardrail rule did.
    HitAction {
        Block = "block",
        Redact = "redact",
        Flag = "flag",
    }
);

closed_names!(
    /// Where a guardrail rule fired.
    HitDirection {
        Input = "input",
        Output = "output",
    }
);

/// A guardrail rule that fired: its id, its action and where. Never the matched text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHit {
    pub rule: String,
    pub action: HitAction,
    pub direction: HitDirection,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_are_the_serde_names_and_unknown_ones_read_as_other() {
        fn check<
            T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + Copy,
        >(
            all: &[T],
            name: fn(T) -> &'static str,
        ) {
            for v in all {
                let json = serde_json::to_string(v).unwrap();
                assert_eq!(json, format!("\"{}\"", name(*v)));
                assert_eq!(serde_json::from_str::<T>(&json).unwrap(), *v);
            }
        }
        check(Route::ALL, Route::name);
        check(Finish::ALL, Finish::name);
        check(HitAction::ALL, HitAction::name);
        check(HitDirection::ALL, HitDirection::name);
        assert_eq!(
            serde_json::from_str::<Finish>("\"tool_calls\"").unwrap(),
            Finish::Other
        );
    }

    #[test]
    fn a_record_round_trips() {
        let mut r = AuditRecord::new("req-1".into(), "m");
        r.route = Route::ChatCompletions;
        r.finish_reason = Finish::ContentFilter;
        r.guardrails.push(AuditHit {
            rule: "secrets".into(),
            action: HitAction::Redact,
            direction: HitDirection::Output,
        });
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""route":"chat.completions""#), "{json}");
        assert_eq!(serde_json::from_str::<AuditRecord>(&json).unwrap(), r);
    }
}
