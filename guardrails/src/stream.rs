//! The streaming output filter: output rules applied to an answer as its tokens arrive.
//!
//! Text is passed on as soon as no redact or block rule could still match across it. What
//! is held back is exactly what could be the start of a match still being written:
//! - for a detector, the text from where its *partial* pattern matches at the end (a run of
//!   digits for card numbers, `AKI` for an AWS key id, `eyJ…` for a JWT, a `-----BEGIN` line);
//! - for a term, the longest end of the text that is a prefix of the term;
//! - for a regex rule, its declared `max_match_chars`;
//! - and any match that reaches the end of the text, since it may still grow.
//!
//! Ordinary prose ends with none of these, so the first token goes out at once. Flag rules
//! hold nothing back: the filter keeps the text they still need to see after it has gone out.
//! Held text is bounded ([`MAX_PENDING`]); past that it is filtered as it stands.

use crate::detect::Kind;
use crate::policy::{Action, Matcher, Rule};
use crate::{
    apply_redactions, push_hit, rule_spans, Blocked, Direction, Guardrails, Hit, Span, Views,
};
use std::sync::Arc;

/// Most text held back, in bytes.
pub const MAX_PENDING: usize = 16 << 10;
/// Text kept before the held part once it has gone out, in bytes.
const CONTEXT: usize = 32;

/// What one step of the filter lets through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterOut {
    /// Text to send now (redactions applied).
    pub text: String,
    /// Set when a block rule fired: send `text`, then end the answer.
    pub blocked: Option<Blocked>,
}

/// Filters one answer. Push text as it is generated; call [`OutputFilter::finish`] at the end.
/// Its `Debug` shows sizes and hits only, never the held text.
pub struct OutputFilter {
    g: Arc<Guardrails>,
    /// Text kept for matching: `buf[..emitted]` has gone out, the rest is held.
    buf: String,
    emitted: usize,
    hits: Vec<Hit>,
    done: bool,
    /// A match outgrew [`MAX_PENDING`]: the rest of the answer is redacted.
    suppressed: bool,
}

impl std::fmt::Debug for OutputFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputFilter")
            .field("held_bytes", &(self.buf.len() - self.emitted))
            .field("hits", &self.hits)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl OutputFilter {
    pub(crate) fn new(g: Arc<Guardrails>) -> Self {
        Self {
            g,
            buf: String::new(),
            emitted: 0,
            hits: Vec::new(),
            done: false,
            suppressed: false,
        }
    }

    /// Whether any rule reads output at all (when none does, the filter passes text through).
    pub fn is_active(&self) -> bool {
        self.g.output_rules().next().is_some()
    }

    /// The rules that fired so far.
    pub fn hits(&self) -> &[Hit] {
        &self.hits
    }

    /// Whether a block ended the answer.
    pub fn is_blocked(&self) -> bool {
        self.done
    }

    /// The next piece of the answer.
    pub fn push(&mut self, text: &str) -> FilterOut {
        if self.done || self.suppressed {
            return FilterOut::default();
        }
        if !self.is_active() {
            return FilterOut {
                text: text.to_string(),
                blocked: None,
            };
        }
        self.buf.push_str(text);
        self.step(false)
    }

    /// The end of the answer: everything still held, filtered.
    pub fn finish(&mut self) -> FilterOut {
        if self.done || self.suppressed || !self.is_active() {
            return FilterOut::default();
        }
        let out = self.step(true);
        self.done = true;
        out
    }

    fn step(&mut self, last: bool) -> FilterOut {
        let g = self.g.clone();
        let views = Views::new(&self.buf);
        let len = self.buf.len();
        // Matches of every output rule, and how far each kind of rule lets text go.
        let mut holding: Vec<(Span, &Arc<str>, Action)> = Vec::new();
        let mut limit = len;
        let mut keep = len;
        for (id, rule) in g.output_rules() {
            let hold = if last {
                len
            } else {
                hold_start(rule, &self.buf, &views)
            };
            let spans = rule_spans(rule, &self.buf, &views);
            match rule.action {
                Action::Flag => {
                    keep = keep.min(hold);
                    let settled = spans.iter().any(|s| last || (s.end < len && s.end <= hold));
                    if settled {
                        push_hit(&mut self.hits, id, Action::Flag, Direction::Output);
                    }
                    for s in &spans {
                        keep = keep.min(s.start.max(self.emitted));
                    }
                }
                Action::Redact | Action::Block => {
                    limit = limit.min(hold);
                    holding.extend(spans.into_iter().map(|s| (s, id, rule.action)));
                }
            }
        }
        let mut overflow = false;
        if !last {
            // A match that reaches the end, or straddles the limit, may still change: hold
            // it whole. Moving the limit back can make another match straddle it.
            loop {
                let before = limit;
                for (s, _, _) in &holding {
                    if s.start < limit && (s.end >= len || s.end > limit) {
                        limit = s.start;
                    }
                }
                if limit == before {
                    break;
                }
            }
            // Too much held: filter it as it stands. A match still growing then covers the
            // rest of the answer, which is suppressed.
            if len - limit.min(len) > MAX_PENDING {
                overflow = true;
                limit = len;
            }
        }
        let limit = limit.max(self.emitted);
        // Settled matches: those that end by the limit, or begin before text already out
        // (a hold that was too short: redact what has not gone out yet).
        let mut redact: Vec<Span> = Vec::new();
        let mut block: Option<(usize, &Arc<str>)> = None;
        let mut growing = false;
        for (s, id, action) in &holding {
            let settled = s.end <= limit || (s.start < self.emitted && s.end > self.emitted);
            if !settled || s.end <= self.emitted {
                continue;
            }
            growing |= s.end >= len;
            push_hit(&mut self.hits, id, *action, Direction::Output);
            match action {
                Action::Block => {
                    if block.is_none_or(|(at, _)| s.start < at) {
                        block = Some((s.start, id));
                    }
                }
                _ => redact.push(s.clone()),
            }
        }
        if let Some((at, id)) = block {
            let cut = at.clamp(self.emitted, limit);
            let text = apply_redactions(&self.buf, self.emitted, cut, &mut redact);
            self.done = true;
            self.wipe();
            return FilterOut {
                text,
                blocked: Some(g.block_for(id)),
            };
        }
        let text = apply_redactions(&self.buf, self.emitted, limit, &mut redact);
        if overflow && growing {
            self.suppressed = true;
            self.wipe();
            return FilterOut {
                text,
                blocked: None,
            };
        }
        // Past the end of a redaction that crossed the limit, nothing more of it goes out.
        let resume = redact
            .iter()
            .map(|s| s.end)
            .filter(|&e| e > limit)
            .max()
            .unwrap_or(limit);
        self.emitted = resume.min(len);
        // Drop what no rule needs to see again, keeping a little context before what is held
        // so that word boundaries read as they do in the whole answer.
        let drop_to = floor_char(&self.buf, keep.min(self.emitted).saturating_sub(CONTEXT));
        if drop_to > 0 {
            let mut gone: String = self.buf.drain(..drop_to).collect();
            crate::zeroize_string(&mut gone);
            self.emitted -= drop_to;
        }
        if last {
            self.wipe();
        }
        FilterOut {
            text,
            blocked: None,
        }
    }

    fn wipe(&mut self) {
        crate::zeroize_string(&mut self.buf);
        self.emitted = 0;
    }
}

impl Drop for OutputFilter {
    fn drop(&mut self) {
        crate::zeroize_string(&mut self.buf);
    }
}

/// The largest char boundary at or before `at`.
fn floor_char(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Where text that `rule` may still match begins (the length of `text` when nothing need be
/// held).
fn hold_start(rule: &Rule, text: &str, views: &Views) -> usize {
    let len = text.len();
    match &rule.matcher {
        Matcher::Pii(kinds) => kinds
            .iter()
            .filter_map(|k: &Kind| k.partial_start(&views.cased.text))
            .map(|p| views.cased.original(p, p + 1).0)
            .min()
            .unwrap_or(len),
        Matcher::Terms { terms, .. } => {
            let folded = &views.lower.text;
            let mut best = folded.len();
            for t in terms {
                // The longest proper prefix of the term that the text ends with, starting at
                // a word boundary.
                for (k, _) in t
                    .char_indices()
                    .skip(1)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    let Some(prefix) = t.get(..k) else { continue };
                    if folded.ends_with(prefix) {
                        let at = folded.len() - prefix.len();
                        let boundary = folded
                            .get(..at)
                            .and_then(|b| b.chars().next_back())
                            .is_none_or(|c| !c.is_alphanumeric());
                        if boundary {
                            best = best.min(at);
                            break;
                        }
                    }
                }
            }
            if best < folded.len() {
                views.lower.original(best, best + 1).0
            } else {
                len
            }
        }
        Matcher::Regex { hold_chars, .. } => text
            .char_indices()
            .rev()
            .nth(hold_chars.saturating_sub(1))
            .map_or(0, |(i, _)| i),
        Matcher::Injection { .. } => len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml: &str) -> Arc<Guardrails> {
        Arc::new(Guardrails::from_toml(toml.as_bytes()).unwrap())
    }

    /// Streams `pieces` through a filter and returns what went out, piece by piece.
    fn run(g: &Arc<Guardrails>, pieces: &[&str]) -> (Vec<String>, Option<Blocked>, Vec<Hit>) {
        let mut f = g.output_filter();
        let mut out = Vec::new();
        for p in pieces {
            let o = f.push(p);
            out.push(o.text);
            if o.blocked.is_some() {
                return (out, o.blocked, f.hits().to_vec());
            }
        }
        let o = f.finish();
        out.push(o.text);
        (out, o.blocked, f.hits().to_vec())
    }

    const SECRETS: &str = r#"
version = 1
[[rules]]
id = "secrets"
kind = "pii"
action = "redact"
detectors = ["aws_access_key_id", "payment_card", "jwt", "pem_private_key"]
[[rules]]
id = "emails"
kind = "pii"
action = "flag"
detectors = ["email"]
[[rules]]
id = "codename"
kind = "terms"
action = "block"
terms = ["project falcon"]
"#;

    #[test]
    fn ordinary_text_goes_out_at_once() {
        let g = policy(SECRETS);
        let (out, blocked, hits) = run(&g, &["Hello", " there", ", friend."]);
        assert_eq!(out, ["Hello", " there", ", friend.", ""]);
        assert!(blocked.is_none() && hits.is_empty());
    }

    #[test]
    fn a_secret_split_across_tokens_is_redacted() {
        let g = policy(SECRETS);
        let (out, _, hits) = run(&g, &["key: AK", "IAIOSF", "ODNN7EX", "AMPLE and", " more"]);
        assert_eq!(out.concat(), "key: [AWS_ACCESS_KEY_ID] and more");
        assert_eq!(out[0], "key: ");
        assert_eq!(hits.len(), 1);
        let (out, _, _) = run(&g, &["pay 4111 ", "1111 1111", " 1111 now"]);
        assert_eq!(out.concat(), "pay [CARD] now");
        let pem = [
            "x -----BEG",
            "IN PRIVATE KEY-----\nMIIE",
            "vQIBADANBg\n-----END PRIVATE KEY-----",
            " done",
        ];
        let (out, _, _) = run(&g, &pem);
        assert_eq!(out.concat(), "x [PRIVATE_KEY] done");
        // A key that never ends is redacted to the end of the answer.
        let (out, _, _) = run(&g, &["x -----BEGIN PRIVATE KEY-----\nMII", "Ev"]);
        assert_eq!(out.concat(), "x [PRIVATE_KEY]");
    }

    #[test]
    fn a_split_term_blocks_and_nothing_after_it_goes_out() {
        let g = policy(SECRETS);
        let (out, blocked, _) = run(&g, &["About pro", "ject fal", "con: secret plans"]);
        assert_eq!(out.concat(), "About ");
        assert_eq!(&*blocked.unwrap().rule, "codename");
        // Zero-width characters inside the streamed term do not hide it.
        let (_, blocked, _) = run(&g, &["project", " fa\u{200B}", "lcon"]);
        assert!(blocked.is_some());
    }

    #[test]
    fn flags_hold_nothing_but_still_see_split_matches() {
        let g = policy(SECRETS);
        let (out, _, hits) = run(&g, &["write to jane", ".doe@exa", "mple.com today"]);
        assert_eq!(out[0], "write to jane");
        assert_eq!(out.concat(), "write to jane.doe@example.com today");
        assert_eq!(hits.len(), 1);
        assert_eq!(&*hits[0].rule, "emails");
    }

    #[test]
    fn debug_output_shows_no_text() {
        let g = policy(SECRETS);
        let mut f = g.output_filter();
        f.push("secret words AKIA");
        let shown = format!(
            "{f:?} {:?}",
            crate::normalize::Folded::new("secret words", true)
        );
        assert!(
            !shown.contains("secret") && !shown.contains("AKIA"),
            "{shown}"
        );
    }

    #[test]
    fn held_text_is_bounded() {
        let g = policy(SECRETS);
        let mut f = g.output_filter();
        let mut total = 0;
        f.push("-----BEGIN PRIVATE KEY-----\n");
        for _ in 0..2000 {
            total += f.push("AAAAAAAAAAAAAAAAAAAA").text.len();
        }
        // The key is redacted however long it runs; the buffer stays bounded, and nothing of
        // the key goes out.
        assert!(f.buf.len() <= MAX_PENDING + 64, "{}", f.buf.len());
        assert_eq!(total, "[PRIVATE_KEY]".len());
        assert_eq!(f.finish().text, "");
    }
}
