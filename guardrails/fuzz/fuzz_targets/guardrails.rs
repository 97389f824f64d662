//! Fuzzes what clients control: message text through the input check and answers through the
//! streaming output filter (split into pieces at fuzzer-chosen points), under the default
//! policy. Nothing may panic; text on which no rule fires must come through unchanged.

#![no_main]

use guardrails::Guardrails;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

fn policy() -> &'static Arc<Guardrails> {
    static P: OnceLock<Arc<Guardrails>> = OnceLock::new();
    P.get_or_init(|| Arc::new(Guardrails::default_policy().unwrap()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    let g = policy();
    let mut content = text.clone();
    let v = g.check_input(&mut [("user", &mut content)], &|s: &str| s.len());
    if v.hits.is_empty() {
        assert_eq!(content, text);
    }
    // Stream it in pieces of `cut % 16 + 1` characters.
    let step = usize::from(cut % 16) + 1;
    let chars: Vec<char> = text.chars().collect();
    let mut f = g.output_filter();
    let mut out = String::new();
    let mut blocked = false;
    for piece in chars.chunks(step) {
        let o = f.push(&piece.iter().collect::<String>());
        out.push_str(&o.text);
        blocked |= o.blocked.is_some();
    }
    out.push_str(&f.finish().text);
    if f.hits().is_empty() && !blocked {
        assert_eq!(out, text);
    }
});
