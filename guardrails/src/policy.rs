//! The guardrail policy file: TOML, versioned, unknown keys refused, checked whole before the
//! enclave boots with it. Its SHA-256 (of the exact bytes) is part of the runtime
//! configuration measured into PCR17, so a client pins the rules before it sends a prompt.
//!
//! ```toml
//! version = 1
//! block_message = "This request was blocked by the enclave's content policy."
//!
//! [input]                       # structure limits on requests
//! max_chars = 32000             # characters over all messages
//! max_tokens = 2048             # prompt tokens over all messages
//! max_messages = 64
//! allowed_roles = ["system", "user", "assistant"]
//!
//! [[rules]]
//! id = "secrets"                # reported in audit events and metrics
//! kind = "pii"                  # pii | terms | regex | injection
//! detectors = ["aws_access_key_id", "pem_private_key", "jwt"]
//! apply_to = "both"             # input | output | both (default both; injection: input)
//! action = "redact"             # block | redact | flag
//! roles = ["user"]              # input messages of these roles only (default: all)
//! ```
//!
//! `terms` rules list `terms` (whole words, matched on folded text); `regex` rules list
//! `patterns` and, when they act on output, `max_match_chars` (how much a streamed match may
//! need held back); `injection` rules have a `threshold` and optionally their own `signals`.
//! `placeholder` overrides the redaction text, `message` the block message.

use crate::detect::Kind;
use crate::injection::{Signal, DEFAULT_SIGNALS};
use crate::normalize::fold;
use serde::Deserialize;

/// The only version of the format.
pub const POLICY_VERSION: u32 = 1;
/// Largest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// Most rules in a policy.
pub const MAX_RULES: usize = 256;
/// Most terms or patterns in one rule.
pub const MAX_ITEMS: usize = 4096;
/// Longest term or pattern, in characters.
pub const MAX_ITEM_CHARS: usize = 512;
/// Largest hold-back a regex rule may ask for on output.
pub const MAX_HOLD_CHARS: usize = 1024;
/// Compiled size limit of one regex (the regex crate's `size_limit`), against patterns that
/// blow up.
const REGEX_SIZE_LIMIT: usize = 2 << 20;

/// Why a policy is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file is larger than [`MAX_POLICY_BYTES`].
    #[error("the policy is {0} bytes; at most {MAX_POLICY_BYTES} are accepted")]
    TooLarge(usize),
    /// Not UTF-8 TOML of this schema (unknown keys included).
    #[error("the policy does not parse: {0}")]
    Parse(String),
    /// An unknown version.
    #[error("policy version {0} is not supported (this enclave reads version {POLICY_VERSION})")]
    Version(u32),
    /// A rule is wrong; the rule's id and what is wrong.
    #[error("rule {rule:?}: {reason}")]
    Rule {
        /// The rule's id (or its position).
        rule: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Refuse: the request is answered with the block message (input), or the answer stops
    /// with `finish_reason: "content_filter"` (output).
    Block,
    /// Replace the matched text with a typed placeholder.
    Redact,
    /// Let it through; count it and name the rule in the audit event.
    Flag,
}

impl Action {
    /// The name in audit events.
    pub fn name(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Redact => "redact",
            Action::Flag => "flag",
        }
    }
}

/// Where a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyTo {
    /// The request's messages.
    Input,
    /// The generated answer, as it streams.
    Output,
    /// Both.
    Both,
}

/// The kinds of rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// Built-in PII and secret detectors.
    Pii,
    /// A deny-list of whole words or phrases.
    Terms,
    /// A deny-list of regular expressions.
    Regex,
    /// Scored prompt-injection heuristics.
    Injection,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version: 1.
    pub version: u32,
    /// The message a blocked request gets, unless its rule has its own.
    #[serde(default)]
    pub block_message: Option<String>,
    /// Structure limits on input.
    #[serde(default)]
    pub input: InputLimits,
    /// The rules, applied in order.
    #[serde(default)]
    pub rules: Vec<RuleFile>,
}

/// Structure limits on a request's messages.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputLimits {
    /// Characters over all message contents.
    pub max_chars: Option<usize>,
    /// Tokens over all message contents (the model's tokenizer).
    pub max_tokens: Option<usize>,
    /// Messages in one request.
    pub max_messages: Option<usize>,
    /// The roles a message may have.
    pub allowed_roles: Option<Vec<String>>,
}

/// One rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Unique id: letters, digits, `-`, `_`, `.`; at most 64.
    pub id: String,
    /// What it matches.
    pub kind: RuleKind,
    /// What it does.
    pub action: Action,
    /// Input, output or both.
    #[serde(default)]
    pub apply_to: Option<ApplyTo>,
    /// Input messages of these roles only.
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// `pii`: the detectors.
    #[serde(default)]
    pub detectors: Option<Vec<String>>,
    /// `terms`: words or phrases.
    #[serde(default)]
    pub terms: Option<Vec<String>>,
    /// `regex`: patterns (Rust `regex` syntax, matched on folded text).
    #[serde(default)]
    pub patterns: Option<Vec<String>>,
    /// `regex` on output: the longest text a match may span, in characters.
    #[serde(default)]
    pub max_match_chars: Option<usize>,
    /// `injection`: the score at which the rule fires.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// `injection`: signals replacing the built-in ones.
    #[serde(default)]
    pub signals: Option<Vec<SignalFile>>,
    /// Redaction text (default: the detector's, or `[REDACTED]`).
    #[serde(default)]
    pub placeholder: Option<String>,
    /// Block message for this rule.
    #[serde(default)]
    pub message: Option<String>,
}

/// One injection signal as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalFile {
    /// Its name.
    pub id: String,
    /// A regex on the folded, lowercased text.
    pub pattern: String,
    /// What it adds to the score.
    pub weight: f64,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Its id.
    pub id: String,
    /// What it does.
    pub action: Action,
    /// Applies to input.
    pub input: bool,
    /// Applies to output.
    pub output: bool,
    /// Input roles it reads (None: all).
    pub roles: Option<Vec<String>>,
    /// Redaction text override.
    pub placeholder: Option<String>,
    /// Block message override.
    pub message: Option<String>,
    /// The matcher.
    pub matcher: Matcher,
}

/// How a rule finds its matches.
#[derive(Debug)]
pub enum Matcher {
    /// Built-in detectors, on the case-preserving view.
    Pii(Vec<Kind>),
    /// Folded, lowercased whole words; the regex is their alternation.
    Terms {
        /// `\b(?:t1|t2|…)\b`.
        regex: regex::Regex,
        /// The folded terms, for the streaming prefix hold.
        terms: Vec<String>,
    },
    /// Patterns on the lowercased folded view.
    Regex {
        /// The patterns.
        patterns: Vec<regex::Regex>,
        /// Streaming hold-back on output, in characters.
        hold_chars: usize,
    },
    /// Scored signals on the lowercased folded view.
    Injection {
        /// The signals.
        signals: Vec<Signal>,
        /// The score at which it fires.
        threshold: f64,
    },
}

pub(crate) fn compile_regex(p: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(p)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

fn bounded(list: &[String], what: &str) -> Result<(), String> {
    if list.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if list.len() > MAX_ITEMS {
        return Err(format!("more than {MAX_ITEMS} {what}"));
    }
    if let Some(long) = list.iter().find(|t| t.chars().count() > MAX_ITEM_CHARS) {
        let n = long.chars().count();
        return Err(format!(
            "one of {what} has {n} characters; at most {MAX_ITEM_CHARS}"
        ));
    }
    Ok(())
}

impl RuleFile {
    /// Checks the rule and compiles it.
    pub fn compile(self) -> Result<Rule, PolicyError> {
        let id = self.id.clone();
        let err = |reason: String| PolicyError::Rule {
            rule: id.clone(),
            reason,
        };
        let only = |field: &str, present: bool, kinds: &str| {
            if present {
                Err(err(format!("`{field}` applies to {kinds} rules only")))
            } else {
                Ok(())
            }
        };
        only(
            "detectors",
            self.detectors.is_some() && self.kind != RuleKind::Pii,
            "pii",
        )?;
        only(
            "terms",
            self.terms.is_some() && self.kind != RuleKind::Terms,
            "terms",
        )?;
        only(
            "patterns",
            self.patterns.is_some() && self.kind != RuleKind::Regex,
            "regex",
        )?;
        only(
            "max_match_chars",
            self.max_match_chars.is_some() && self.kind != RuleKind::Regex,
            "regex",
        )?;
        only(
            "threshold",
            self.threshold.is_some() && self.kind != RuleKind::Injection,
            "injection",
        )?;
        only(
            "signals",
            self.signals.is_some() && self.kind != RuleKind::Injection,
            "injection",
        )?;
        let default_apply = if self.kind == RuleKind::Injection {
            ApplyTo::Input
        } else {
            ApplyTo::Both
        };
        let apply = self.apply_to.unwrap_or(default_apply);
        let (input, output) = match apply {
            ApplyTo::Input => (true, false),
            ApplyTo::Output => (false, true),
            ApplyTo::Both => (true, true),
        };
        let matcher = match self.kind {
            RuleKind::Pii => {
                let names = self.detectors.unwrap_or_default();
                bounded(&names, "detectors").map_err(err)?;
                let mut kinds = Vec::new();
                for n in &names {
                    let k = Kind::from_name(n).ok_or_else(|| {
                        let known: Vec<_> = crate::detect::ALL.iter().map(|k| k.name()).collect();
                        err(format!(
                            "unknown detector {n:?} (known: {})",
                            known.join(", ")
                        ))
                    })?;
                    if !kinds.contains(&k) {
                        kinds.push(k);
                    }
                }
                Matcher::Pii(kinds)
            }
            RuleKind::Terms => {
                let terms = self.terms.unwrap_or_default();
                bounded(&terms, "terms").map_err(err)?;
                let folded: Vec<String> = terms
                    .iter()
                    .map(|t| fold(t.trim(), true))
                    .filter(|t| !t.is_empty())
                    .collect();
                if folded.len() != terms.len() {
                    return Err(err("a term is empty once folded".into()));
                }
                let alts: Vec<String> = folded.iter().map(|t| regex::escape(t)).collect();
                let regex = compile_regex(&format!(r"\b(?:{})\b", alts.join("|"))).map_err(err)?;
                Matcher::Terms {
                    regex,
                    terms: folded,
                }
            }
            RuleKind::Regex => {
                let patterns = self.patterns.unwrap_or_default();
                bounded(&patterns, "patterns").map_err(err)?;
                let compiled = patterns
                    .iter()
                    .map(|p| compile_regex(p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?;
                let hold_chars = match (output, self.max_match_chars) {
                    (true, None) => {
                        return Err(err(
                            "a regex rule on output needs `max_match_chars` (how much text \
                             a match may span, held back while streaming)"
                                .into(),
                        ))
                    }
                    (_, Some(n)) if n == 0 || n > MAX_HOLD_CHARS => {
                        return Err(err(format!("max_match_chars must be 1..={MAX_HOLD_CHARS}")))
                    }
                    (_, n) => n.unwrap_or(0),
                };
                Matcher::Regex {
                    patterns: compiled,
                    hold_chars,
                }
            }
            RuleKind::Injection => {
                if output {
                    return Err(err("injection rules apply to input only".into()));
                }
                let threshold = self.threshold.unwrap_or(1.0);
                if !(threshold.is_finite() && threshold > 0.0) {
                    return Err(err("threshold must be a positive number".into()));
                }
                let signals = match self.signals {
                    None => DEFAULT_SIGNALS
                        .iter()
                        .map(|(id, p, w)| Signal::new(id, p, *w))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(err)?,
                    Some(list) => {
                        if list.is_empty() || list.len() > MAX_ITEMS {
                            return Err(err(format!("signals must number 1..={MAX_ITEMS}")));
                        }
                        list.iter()
                            .map(|s| {
                                if !s.weight.is_finite() {
                                    return Err(format!("signal {:?}: weight is not finite", s.id));
                                }
                                Signal::new(&s.id, &s.pattern, s.weight)
                            })
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(err)?
                    }
                };
                Matcher::Injection { signals, threshold }
            }
        };
        if let Some(roles) = &self.roles {
            if !input {
                return Err(err("`roles` applies to input rules only".into()));
            }
            if roles.is_empty() {
                return Err(err("roles is empty".into()));
            }
        }
        for (field, v) in [
            ("placeholder", &self.placeholder),
            ("message", &self.message),
        ] {
            if v.as_ref()
                .is_some_and(|s| s.chars().count() > MAX_ITEM_CHARS)
            {
                return Err(err(format!(
                    "{field} is longer than {MAX_ITEM_CHARS} characters"
                )));
            }
        }
        Ok(Rule {
            id: self.id,
            action: self.action,
            input,
            output,
            roles: self.roles,
            placeholder: self.placeholder,
            message: self.message,
            matcher,
        })
    }
}

/// A rule id: 1..=64 of `[A-Za-z0-9_.-]`, so it is safe as a metric label and log field.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}
