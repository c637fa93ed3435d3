//! Logging a repeating condition at a bounded rate: a dead broker makes librdkafka report the
//! same error several times a second, which buries everything else and costs disk. The first
//! occurrence of each kind is logged at once; repeats within the interval are counted and the
//! count is logged with the next occurrence after it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default interval between two log lines of the same kind.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct LogGate {
    every: Duration,
    kinds: Mutex<HashMap<String, Kind>>,
}

#[derive(Debug, Clone, Copy)]
struct Kind {
    logged_at: Instant,
    suppressed: u64,
}

impl LogGate {
    pub fn new(every: Duration) -> LogGate {
        LogGate {
            every,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when an occurrence of `kind` at `now` should be logged, `n` being how many were
    /// suppressed since the last line; `None` when it should only be counted.
    pub fn admit(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().expect("not poisoned");
        match kinds.get_mut(kind) {
            Some(k) if now.saturating_duration_since(k.logged_at) < self.every => {
                k.suppressed += 1;
                None
            }
            Some(k) => {
                let suppressed = k.suppressed;
                *k = Kind {
                    logged_at: now,
                    suppressed: 0,
                };
                Some(suppressed)
            }
            None => {
                kinds.insert(
                    kind.to_string(),
                    Kind {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

impl Default for LogGate {
    fn default() -> Self {
        LogGate::new(DEFAULT_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_is_logged_repeats_are_counted_into_the_next_line() {
        let gate = LogGate::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(gate.admit("down", t0), Some(0));
        assert_eq!(gate.admit("other", t0), Some(0), "kinds are independent");
        for i in 1..=5 {
            assert_eq!(gate.admit("down", t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(gate.admit("down", t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(gate.admit("down", t0 + Duration::from_secs(11)), None);
    }

    proptest! {
        /// However fast a condition repeats, at most one line per interval per kind (plus the
        /// first), and no occurrence goes uncounted.
        #[test]
        fn lines_are_bounded_and_every_occurrence_counted(gaps_ms in prop::collection::vec(0u64..3000, 1..500)) {
            let gate = LogGate::new(Duration::from_secs(10));
            let t0 = Instant::now();
            let mut t = t0;
            let (mut lines, mut counted) = (0u64, 0u64);
            for gap in &gaps_ms {
                t += Duration::from_millis(*gap);
                if let Some(suppressed) = gate.admit("k", t) {
                    lines += 1;
                    counted += 1 + suppressed;
                }
            }
            let span = t.duration_since(t0).as_secs();
            prop_assert!(lines <= 1 + span / 10 + 1, "{} lines in {} s", lines, span);
            let pending = gate.kinds.lock().unwrap()["k"].suppressed;
            prop_assert_eq!(counted + pending, gaps_ms.len() as u64);
        }
    }
}
