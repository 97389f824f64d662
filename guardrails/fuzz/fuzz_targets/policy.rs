//! Fuzzes the policy loader: arbitrary bytes either load or are refused with an error, never
//! a panic (the policy is operator input, but bounded and checked like any other).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = guardrails::Guardrails::from_toml(data);
});
