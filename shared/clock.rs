//! Wall-clock time as the records carry it: milliseconds since the Unix epoch. The one impure
//! input of stage one's validity policy and of the loader's latency histogram; pure code takes
//! "now" as a parameter instead of calling this.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
