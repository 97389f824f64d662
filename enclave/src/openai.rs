//! The OpenAI chat-completions API, and the legacy completions API for base models without a
//! chat template, as the enclave serves them inside the encrypted channel: request parsing and
//! validation, and the `chat.completion` / `chat.completion.chunk` / `text_completion` objects,
//! server-sent events and error bodies that go back (platform.openai.com/docs/api-reference/chat,
//! platform.openai.com/docs/api-reference/completions).
//!
//! Errors carry OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and never
//! echo the request's content.

use serde::{Deserialize, Serialize};
use serde_json::json;

/// Most messages in one request.
pub const MAX_MESSAGES: usize = 256;
/// Most stop sequences (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// A chat-completions request. Fields the enclave does not implement are refused when they
/// would change the answer (`n > 1`, tools, logprobs), and ignored when they would not.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Which model.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Stream `chat.completion.chunk` events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Tokens to generate at most (deprecated name).
    pub max_tokens: Option<u32>,
    /// Tokens to generate at most.
    pub max_completion_tokens: Option<u32>,
    /// 0..=2.
    pub temperature: Option<f32>,
    /// (0, 1].
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// Up to 4 stop sequences.
    pub stop: Option<Stop>,
    /// -2..=2.
    pub frequency_penalty: Option<f32>,
    /// -2..=2.
    pub presence_penalty: Option<f32>,
    /// Choices to generate: only 1.
    pub n: Option<u32>,
    /// Log probabilities: not supported.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Tools: not supported.
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
}

/// Streaming options.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A legacy completions request (`POST /v1/completions`): a raw prompt, no chat template.
/// As with chat, what would change the answer and is not implemented is refused (`n`,
/// `best_of` > 1, `echo`, `suffix`, `logprobs`).
#[derive(Debug, Deserialize)]
pub struct TextRequest {
    /// Which model.
    pub model: String,
    /// The prompt: a string, or an array holding one string.
    pub prompt: Option<Prompt>,
    /// Stream `text_completion` events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Tokens to generate at most; OpenAI's default is 16.
    pub max_tokens: Option<u32>,
    /// 0..=2.
    pub temperature: Option<f32>,
    /// (0, 1].
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// Up to 4 stop sequences.
    pub stop: Option<Stop>,
    /// -2..=2.
    pub frequency_penalty: Option<f32>,
    /// -2..=2.
    pub presence_penalty: Option<f32>,
    /// Choices to generate: only 1.
    pub n: Option<u32>,
    /// Candidates to pick from: only 1.
    pub best_of: Option<u32>,
    /// Log probabilities of this many tokens: not supported.
    pub logprobs: Option<u32>,
    /// Echo the prompt back: not supported.
    #[serde(default)]
    pub echo: bool,
    /// Text after the completion: not supported.
    pub suffix: Option<String>,
}

/// OpenAI's default `max_tokens` for legacy completions.
pub const TEXT_DEFAULT_MAX_TOKENS: usize = 16;

/// `prompt`: one string, or a batch of which only one element is accepted. Token-id prompts
/// are refused: they would bypass the input guardrails' view of the text.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    One(String),
    /// A batch.
    Many(Vec<String>),
}

// The prompt is user data: never in Debug output.
impl std::fmt::Debug for Prompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prompt")
    }
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// One message.
#[derive(Deserialize)]
pub struct ChatMessage {
    /// system, developer, user, assistant.
    pub role: String,
    /// Text, or an array of content parts of which only text parts are accepted.
    #[serde(default)]
    pub content: Option<Content>,
}

// Message content is user data: never in Debug output.
impl std::fmt::Debug for ChatMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatMessage")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Message content.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<Part>),
}

/// A content part.
#[derive(Deserialize)]
pub struct Part {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    #[serde(default)]
    pub text: Option<String>,
}

/// An API error: status, type, code, parameter and a content-free message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status inside the channel.
    pub status: u16,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: Option<&'static str>,
    /// The offending parameter.
    pub param: Option<&'static str>,
    /// What is wrong.
    pub message: String,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            code: None,
            param,
            message: message.into(),
        }
    }

    /// An error with every field given.
    pub fn new(
        status: u16,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }))
        .unwrap_or_default()
    }

    /// A request an input guardrail blocked: 400 with OpenAI's `content_filter` code and the
    /// policy's message.
    pub fn content_filter(message: &str) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            code: Some("content_filter"),
            param: Some("messages"),
            message: message.to_string(),
        }
    }

    /// From an engine error (whose messages never contain prompt or output text).
    pub fn from_engine(e: &engine::Error) -> Self {
        match e {
            engine::Error::ContextLength { .. } => Self {
                code: Some("context_length_exceeded"),
                param: Some("messages"),
                ..Self::invalid(None, e.to_string())
            },
            engine::Error::InvalidRequest(_) => Self::invalid(None, e.to_string()),
            engine::Error::QueueFull { .. } => {
                Self::new(429, "rate_limit_error", Some("engine_busy"), e.to_string())
            }
            engine::Error::ContextFull { .. } => {
                Self::new(400, "invalid_request_error", None, e.to_string())
            }
            _ => Self::new(500, "server_error", None, e.to_string()),
        }
    }
}

/// What a request asks the model to continue.
#[derive(Debug)]
pub enum Input {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<engine::Message>),
    /// A raw prompt (legacy completions).
    Text(String),
}

impl Input {
    /// The texts the input guardrails check, with the role each is checked as.
    pub fn texts(&mut self) -> Vec<(&str, &mut String)> {
        match self {
            Input::Chat(messages) => messages
                .iter_mut()
                .map(|m| {
                    let engine::Message { role, content } = m;
                    (role.as_str(), content)
                })
                .collect(),
            Input::Text(prompt) => vec![("user", prompt)],
        }
    }

    /// Wipes the request's text.
    pub fn zeroize(&mut self) {
        use zeroize::Zeroize;
        for (_, t) in self.texts() {
            t.zeroize();
        }
    }
}

/// A validated request, ready for the engine.
#[derive(Debug)]
pub struct Prepared {
    /// The conversation or the prompt.
    pub input: Input,
    /// Generation parameters.
    pub params: engine::GenerationParams,
    /// Stream the answer.
    pub stream: bool,
    /// Send usage in a last streaming chunk.
    pub include_usage: bool,
}

/// The body parsed as `T`, or an error that says where it is wrong without quoting it
/// (serde's own messages can quote input values; the category and position cannot).
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let why = match e.classify() {
            serde_json::error::Category::Eof => "truncated JSON",
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Data => "a missing field or a value of the wrong type",
            serde_json::error::Category::Io => "an unreadable body",
        };
        ApiError::invalid(
            None,
            format!(
                "the request body is not a valid {what}: {why} at line {} column {}",
                e.line(),
                e.column()
            ),
        )
    })
}

fn check_model(model: &str, served: &str) -> Result<(), ApiError> {
    if model == served {
        return Ok(());
    }
    Err(ApiError {
        status: 404,
        kind: "invalid_request_error",
        code: Some("model_not_found"),
        param: Some("model"),
        message: format!("this enclave serves only the model `{served}`"),
    })
}

/// The sampling and length parameters both APIs share.
struct Common {
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    max_tokens: Option<u32>,
    stream: bool,
    stream_options: Option<StreamOptions>,
}

fn finish_prepare(input: Input, c: Common) -> Result<Prepared, ApiError> {
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("at most {MAX_STOP} stop sequences are accepted"),
        ));
    }
    let defaults = engine::SamplingParams::default();
    let sampling = engine::SamplingParams {
        temperature: c.temperature.unwrap_or(defaults.temperature),
        top_p: c.top_p.unwrap_or(defaults.top_p),
        seed: c.seed.map(|s| s as u64),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        ..defaults
    };
    sampling.validate().map_err(|e| ApiError::from_engine(&e))?;
    if c.max_tokens == Some(0) {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            "max_tokens must be at least 1",
        ));
    }
    Ok(Prepared {
        input,
        params: engine::GenerationParams {
            max_tokens: c.max_tokens.map(|n| n as usize),
            stop,
            sampling,
            ignore_eos: false,
        },
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Parses and validates a legacy completions body for the model `served`.
pub fn prepare_text(body: &[u8], served: &str) -> Result<Prepared, ApiError> {
    let req: TextRequest = parse(body, "completions request")?;
    check_model(&req.model, served)?;
    let prompt = match req.prompt {
        None => String::new(),
        Some(Prompt::One(p)) => p,
        Some(Prompt::Many(mut v)) if v.len() == 1 => v.pop().unwrap_or_default(),
        Some(Prompt::Many(_)) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "only one prompt per request is supported",
            ))
        }
    };
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
    }
    if req.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            Some("best_of"),
            "only best_of = 1 is supported",
        ));
    }
    if req.logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid(
            Some("logprobs"),
            "logprobs are not supported",
        ));
    }
    if req.echo {
        return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(Some("suffix"), "suffix is not supported"));
    }
    finish_prepare(
        Input::Text(prompt),
        Common {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            stop: req.stop,
            frequency_penalty: req.frequency_penalty,
            presence_penalty: req.presence_penalty,
            max_tokens: Some(req.max_tokens.unwrap_or(TEXT_DEFAULT_MAX_TOKENS as u32)),
            stream: req.stream,
            stream_options: req.stream_options,
        },
    )
}

/// Parses and validates a chat-completions body for the model `served`.
pub fn prepare(body: &[u8], served: &str) -> Result<Prepared, ApiError> {
    let req: ChatRequest = parse(body, "chat request")?;
    check_model(&req.model, served)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages must not be empty",
        ));
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            Some("messages"),
            format!("at most {MAX_MESSAGES} messages are accepted"),
        ));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid(
            Some("logprobs"),
            "logprobs are not supported",
        ));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid(Some("tools"), "tools are not supported"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant") => r,
            _ => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "a message role must be system, developer, user or assistant",
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        _ => {
                            return Err(ApiError::invalid(
                                Some("messages"),
                                "only text content parts are supported",
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(engine::Message::new(role, content));
    }
    finish_prepare(
        Input::Chat(messages),
        Common {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            stop: req.stop,
            frequency_penalty: req.frequency_penalty,
            presence_penalty: req.presence_penalty,
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            stream: req.stream,
            stream_options: req.stream_options,
        },
    )
}

/// What every object of one completion shares.
#[derive(Debug, Clone)]
pub struct Completion {
    /// `chatcmpl-…`, or `cmpl-…` for a legacy completion.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model's name.
    pub model: String,
    /// A legacy `text_completion` rather than a chat completion.
    text: bool,
}

#[derive(Serialize)]
struct UsageJson {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

fn usage(u: &engine::Usage) -> UsageJson {
    UsageJson {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
    }
}

/// An engine finish reason as OpenAI names it ([`common::audit::Finish::name`]).
pub fn finish(r: engine::FinishReason) -> common::audit::Finish {
    match r {
        engine::FinishReason::Stop => common::audit::Finish::Stop,
        engine::FinishReason::Length => common::audit::Finish::Length,
    }
}

impl Completion {
    /// A new chat completion's identity.
    pub fn new(model: &str) -> Self {
        Self::with_prefix(model, "chatcmpl", false)
    }

    /// A new legacy (`text_completion`) completion's identity.
    pub fn new_text(model: &str) -> Self {
        Self::with_prefix(model, "cmpl", true)
    }

    fn with_prefix(model: &str, prefix: &str, text: bool) -> Self {
        let mut id = [0u8; 12];
        // An id needs no secrecy; a failed RNG leaves zeros, still a valid id.
        let _ = aws_lc_rs::rand::fill(&mut id);
        let created = common::clock::unix_seconds();
        Self {
            id: format!("{prefix}-{}", hex::encode(id)),
            created,
            model: model.to_owned(),
            text,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.text, chunk) {
            (true, _) => "text_completion",
            (false, false) => "chat.completion",
            (false, true) => "chat.completion.chunk",
        }
    }

    /// The non-streaming answer: one `chat.completion` or `text_completion`. `reason` is
    /// OpenAI's finish reason (`stop`, `length`, `content_filter`); `refusal` the guardrail's
    /// message when an output rule stopped the answer (legacy completions have no field for
    /// it in OpenAI's schema; it goes in a `refusal` field of the choice).
    pub fn whole(
        &self,
        text: &str,
        reason: &str,
        refusal: Option<&str>,
        u: &engine::Usage,
    ) -> Vec<u8> {
        let choice = if self.text {
            json!({
                "index": 0,
                "text": text,
                "refusal": refusal,
                "logprobs": null,
                "finish_reason": reason,
            })
        } else {
            json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": refusal},
                "logprobs": null,
                "finish_reason": reason,
            })
        };
        serde_json::to_vec(&json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(u),
        }))
        .unwrap_or_default()
    }

    /// One streaming event. `delta` is the chat delta; a legacy completion takes its `content`
    /// as `text` and its `refusal` as is.
    fn chunk(&self, delta: serde_json::Value, reason: Option<&str>) -> Vec<u8> {
        let choice = if self.text {
            let mut c = json!({
                "index": 0,
                "text": delta.get("content").cloned().unwrap_or_else(|| json!("")),
                "logprobs": null,
                "finish_reason": reason,
            });
            if let (Some(r), Some(obj)) = (delta.get("refusal"), c.as_object_mut()) {
                obj.insert("refusal".into(), r.clone());
            }
            c
        } else {
            json!({
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": reason,
            })
        };
        self.event(&json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }))
    }

    fn event(&self, v: &serde_json::Value) -> Vec<u8> {
        let mut out = b"data: ".to_vec();
        // Writing a JSON value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, v);
        out.extend_from_slice(b"\n\n");
        out
    }

    /// The first streaming event: the assistant's role (chat only; empty for a legacy
    /// completion, which has no roles).
    pub fn role_event(&self) -> Vec<u8> {
        if self.text {
            return Vec::new();
        }
        self.chunk(json!({"role": "assistant", "content": ""}), None)
    }

    /// A streaming event with new text.
    pub fn text_event(&self, text: &str) -> Vec<u8> {
        self.chunk(json!({"content": text}), None)
    }

    /// A streaming event with the guardrail's refusal message (an output rule blocked).
    pub fn refusal_event(&self, message: &str) -> Vec<u8> {
        self.chunk(json!({"refusal": message}), None)
    }

    /// The last events: the finish reason, the usage if asked for, and `[DONE]`.
    pub fn done_events(&self, reason: &str, u: &engine::Usage, include_usage: bool) -> Vec<u8> {
        let mut out = self.chunk(json!({}), Some(reason));
        if include_usage {
            out.extend(self.event(&json!({
                "id": self.id,
                "object": self.object(true),
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(u),
            })));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }

    /// An error in the middle of a stream (OpenAI sends an `error` object as an event).
    pub fn error_event(&self, e: &ApiError) -> Vec<u8> {
        let mut out = b"data: ".to_vec();
        out.extend(e.body());
        out.extend_from_slice(b"\n\n");
        out
    }
}

/// `GET /v1/models`.
pub fn models(model: &str, created: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "enclave"}],
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_request_is_prepared() {
        let body = br#"{"model":"m","messages":[{"role":"developer","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}],
            "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"temperature":0,
            "top_p":0.5,"seed":3,"stop":"x","user":"ignored","n":1}"#;
        let p = prepare(body, "m").unwrap();
        let Input::Chat(messages) = &p.input else {
            panic!("a chat request gives a conversation")
        };
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[1].content, "hi there");
        assert!(p.stream && p.include_usage);
        assert_eq!(p.params.max_tokens, Some(5));
        assert_eq!(p.params.stop, vec!["x".to_string()]);
        assert_eq!(p.params.sampling.seed, Some(3));
        assert_eq!(p.params.sampling.top_p, 0.5);
    }

    #[test]
    fn bad_requests_get_openai_errors_without_content() {
        let err = |body: &str| prepare(body.as_bytes(), "m").unwrap_err();
        let e = err(r#"{"model":"other","messages":[{"role":"user","content":"SECRET"}]}"#);
        assert_eq!((e.status, e.code), (404, Some("model_not_found")));
        assert!(!String::from_utf8(e.body()).unwrap().contains("SECRET"));
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":"SECRET"}"#);
        assert_eq!(e.status, 400);
        assert!(!e.message.contains("SECRET"), "{}", e.message);
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":17}]}"#);
        assert_eq!(e.status, 400);
        assert_eq!(
            err(r#"{"model":"m","messages":[]}"#).param,
            Some("messages")
        );
        let e = err(r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#);
        assert_eq!(e.param, Some("messages"));
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#);
        assert_eq!(e.param, Some("n"));
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#);
        assert_eq!(e.status, 400);
        let e = err(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
        );
        assert_eq!(e.param, Some("stop"));
        let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn a_legacy_completions_request_is_prepared() {
        let body = br#"{"model":"m","prompt":["Once upon"],"max_tokens":7,"temperature":0,
            "top_p":0.9,"seed":1,"stop":["\n"],"stream":true,"logprobs":0,"echo":false,"n":1,"user":"u"}"#;
        let p = prepare_text(body, "m").unwrap();
        let Input::Text(prompt) = &p.input else {
            panic!("a completions request gives a prompt")
        };
        assert_eq!(prompt, "Once upon");
        assert_eq!(p.params.max_tokens, Some(7));
        assert_eq!(p.params.stop, vec!["\n".to_string()]);
        assert!(p.stream);
        // OpenAI's default length for legacy completions.
        let p = prepare_text(br#"{"model":"m","prompt":"x"}"#, "m").unwrap();
        assert_eq!(p.params.max_tokens, Some(TEXT_DEFAULT_MAX_TOKENS));

        let err = |body: &str| prepare_text(body.as_bytes(), "m").unwrap_err();
        assert_eq!(
            err(r#"{"model":"m","prompt":["a","b"]}"#).param,
            Some("prompt")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":"a","echo":true}"#).param,
            Some("echo")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":"a","best_of":2}"#).param,
            Some("best_of")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":"a","logprobs":2}"#).param,
            Some("logprobs")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":"a","suffix":"z"}"#).param,
            Some("suffix")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":"a","max_tokens":0}"#).param,
            Some("max_tokens")
        );
        let e = err(r#"{"model":"other","prompt":"SECRET"}"#);
        assert_eq!((e.status, e.code), (404, Some("model_not_found")));
        // Token-id prompts are refused, without quoting them.
        let e = err(r#"{"model":"m","prompt":[1,2,3]}"#);
        assert_eq!(e.status, 400);
    }

    #[test]
    fn legacy_completion_objects_have_openai_shape() {
        let c = Completion::new_text("m");
        assert!(c.id.starts_with("cmpl-"));
        assert!(c.role_event().is_empty());
        let ev = String::from_utf8(c.text_event("Hi")).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(ev.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "Hi");
        assert!(v["choices"][0]["finish_reason"].is_null());
        let u = engine::Usage {
            prompt_tokens: 2,
            completion_tokens: 1,
            total_tokens: 3,
        };
        let done = String::from_utf8(c.done_events("stop", &u, true)).unwrap();
        assert!(done.contains(r#""finish_reason":"stop""#) && done.contains(r#""total_tokens":3"#));
        assert!(done.ends_with("data: [DONE]\n\n"));
        let whole: serde_json::Value =
            serde_json::from_slice(&c.whole("Hi", "length", None, &u)).unwrap();
        assert_eq!(whole["object"], "text_completion");
        assert_eq!(whole["choices"][0]["text"], "Hi");
        assert_eq!(whole["choices"][0]["finish_reason"], "length");
        assert_eq!(whole["usage"]["completion_tokens"], 1);
    }

    #[test]
    fn stream_events_are_sse_chunks() {
        let c = Completion::new("m");
        let role = String::from_utf8(c.role_event()).unwrap();
        assert!(role.starts_with("data: {") && role.ends_with("}\n\n"));
        let v: serde_json::Value =
            serde_json::from_str(role.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
        let u = engine::Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
        };
        let done = String::from_utf8(c.done_events("length", &u, true)).unwrap();
        assert!(done.ends_with("data: [DONE]\n\n"));
        assert!(done.contains(r#""finish_reason":"length""#));
        assert!(done.contains(r#""total_tokens":5"#));
        let whole: serde_json::Value =
            serde_json::from_slice(&c.whole("hi", "stop", None, &u)).unwrap();
        assert_eq!(whole["choices"][0]["message"]["content"], "hi");
        assert_eq!(whole["usage"]["prompt_tokens"], 3);
    }
}
