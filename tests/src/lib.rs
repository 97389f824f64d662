//! Whole-stack integration tests in local mode.
//!
//! The tests themselves live in `tests/`; this library holds what they share.

#![forbid(unsafe_code)]
