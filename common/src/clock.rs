//! The wall clock as time since the Unix epoch, in one place: API-key and token expiry, replay
//! windows, OpenAI's `created`, certificate validity and log timestamps all read it here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch, or `None` if the clock reads earlier (a broken clock, which
/// callers that sign or verify must refuse rather than read as 1970).
pub fn since_epoch() -> Option<Duration> {
    SystemTime::now().duration_since(UNIX_EPOCH).ok()
}

/// Whole seconds since the Unix epoch; 0 if the clock reads earlier, which makes anything with
/// an expiry look expired rather than valid.
pub fn unix_seconds() -> u64 {
    since_epoch().map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_time_after_this_code_was_written() {
        // 2026-01-01T00:00:00Z.
        assert!(unix_seconds() > 1_767_225_600);
        assert_eq!(
            since_epoch().map(|d| d.as_secs() / 10),
            Some(unix_seconds() / 10)
        );
    }
}
