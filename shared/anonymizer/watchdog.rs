//! The processing thread's progress stamp and the watchdog that ends a stage stuck inside a
//! Kafka call.
//!
//! Every transactional call has a deadline (`crate::txn`), but librdkafka does not always honour
//! the timeout it is given (`send_offsets_to_transaction` with the group coordinator dead,
//! librdkafka issues #5456 and #5511), and a thread blocked in C cannot be interrupted. So the
//! async side watches the stamp, and when a call is [`CALL_OVERRUN`] past its deadline, or the
//! loop has not come round for [`watchdog_limit`], the stage returns an error ([`verdict`]): the
//! binary logs it and exits non-zero, and the orchestrator's restart fences the stuck producer
//! (the coordinator aborts its open transaction). Sitting stuck helps nobody; exactly-once holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Settings;

/// No progress for this long ends the stage. The bounded waits of one round of the loop add up
/// to 3 × `txn_timeout` (everything before the commit until the transaction's start + timeout,
/// the commit one timeout more, then an abort one timeout) plus about 65 s (the rewind's two 30 s
/// consumer calls, the 5 s flush before an abort); 90 s covers those with a margin, so only a
/// call that overruns its own timeout trips it.
pub fn watchdog_limit(settings: &Settings) -> Duration {
    settings.anonymizer.txn_timeout * 3 + Duration::from_secs(90)
}

/// A transactional call still running this long after its own deadline is stuck in librdkafka
/// (its timeouts and retries all end by the deadline): seen in `scripts/chaos.sh --cluster`, an
/// instance sat in one call for 100+ s after its group coordinator's node was killed, and would
/// otherwise have waited for [`watchdog_limit`].
pub const CALL_OVERRUN: Duration = Duration::from_secs(30);

/// When the processing thread last came round its loop, and which call it entered since.
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    /// Milliseconds from `origin` to the last tick, plus one; 0 before the first (the loop has
    /// not started: waiting for the cluster at start-up is not being stuck).
    last: AtomicU64,
    doing: Mutex<Doing>,
}

/// What the thread entered last, and when that must be over by (a transactional call's deadline).
#[derive(Debug, Clone, Copy)]
struct Doing {
    what: &'static str,
    until: Option<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            doing: Mutex::new(Doing {
                what: "starting",
                until: None,
            }),
        }
    }
}

impl Progress {
    /// The loop came round.
    pub fn tick(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.last.store(ms, Ordering::Relaxed);
        self.enter("the processing loop", None);
    }

    /// The thread is about to block in `what` (named in the watchdog's message), which ends by
    /// `until` if it is a call with a deadline.
    pub fn enter(&self, what: &'static str, until: Option<Instant>) {
        *self.doing.lock().expect("not poisoned") = Doing { what, until };
    }

    /// How long since the last tick at `now`, what the thread entered since, and how far past
    /// that call's deadline it is; `None` before the first tick.
    pub fn stuck_for(&self, now: Instant) -> Option<(Duration, &'static str, Option<Duration>)> {
        let last = self.last.load(Ordering::Relaxed);
        (last > 0).then(|| {
            let at = self.origin + Duration::from_millis(last - 1);
            let doing = *self.doing.lock().expect("not poisoned");
            (
                now.saturating_duration_since(at),
                doing.what,
                doing.until.and_then(|u| now.checked_duration_since(u)),
            )
        })
    }
}

/// The watchdog's decision: why the stage must stop, if it must. `stuck` is what
/// [`Progress::stuck_for`] says.
pub fn verdict(
    stuck: Option<(Duration, &'static str, Option<Duration>)>,
    limit: Duration,
) -> Option<String> {
    let (stuck, doing, overrun) = stuck?;
    if overrun.is_some_and(|o| o > CALL_OVERRUN) {
        Some(format!(
            "watchdog: {doing} still blocked {:.0} s past its deadline (no progress for {:.0} s); \
             librdkafka overran its timeout",
            overrun.unwrap_or_default().as_secs_f64(),
            stuck.as_secs_f64()
        ))
    } else if stuck > limit {
        Some(format!(
            "watchdog: no progress for {:.0} s, blocked in {doing} (limit {:.0} s = 3 × \
             anonymizer.txn_timeout + 90 s)",
            stuck.as_secs_f64(),
            limit.as_secs_f64()
        ))
    } else {
        None
    }
}

/// Resolves, with the error the stage stops with, once [`verdict`] says so.
pub async fn watch(progress: &Progress, limit: Duration) -> anyhow::Error {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        if let Some(why) = verdict(progress.stuck_for(Instant::now()), limit) {
            return anyhow::anyhow!(
                "{why}; exiting so that a restarted instance fences this one (its open \
                 transaction is aborted, nothing is lost or doubled)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_three_transaction_timeouts_and_a_minute_and_a_half() {
        let mut s = Settings::default();
        assert_eq!(watchdog_limit(&s), Duration::from_secs(270));
        s.anonymizer.txn_timeout = Duration::from_secs(10);
        assert_eq!(watchdog_limit(&s), Duration::from_secs(120));
    }

    #[test]
    fn not_stuck_before_the_loop_starts_then_counted_from_the_last_tick() {
        let p = Progress::default();
        assert_eq!(p.stuck_for(Instant::now() + Duration::from_secs(999)), None);
        p.tick();
        let (stuck, doing, overrun) = p.stuck_for(Instant::now()).unwrap();
        assert!(stuck < Duration::from_secs(1), "{stuck:?}");
        assert_eq!((doing, overrun), ("the processing loop", None));
        let until = Instant::now() + Duration::from_secs(60);
        p.enter("send_offsets_to_transaction", Some(until));
        let (_, _, overrun) = p.stuck_for(Instant::now()).unwrap();
        assert_eq!(overrun, None, "before its deadline");
        let (stuck, doing, overrun) = p
            .stuck_for(Instant::now() + Duration::from_secs(300))
            .unwrap();
        assert!(stuck >= Duration::from_secs(300), "{stuck:?}");
        assert_eq!(doing, "send_offsets_to_transaction");
        assert!(overrun.unwrap() >= Duration::from_secs(240), "{overrun:?}");
        p.tick();
        assert!(p.stuck_for(Instant::now()).unwrap().0 < Duration::from_secs(1));
    }

    #[test]
    fn a_call_past_its_deadline_stops_the_stage_before_the_loop_limit() {
        let limit = Duration::from_secs(270);
        let s = Duration::from_secs;
        assert_eq!(verdict(None, limit), None, "not started");
        assert_eq!(
            verdict(Some((s(269), "the processing loop", None)), limit),
            None
        );
        assert_eq!(
            verdict(Some((s(100), "commit_transaction", Some(s(30)))), limit),
            None
        );
        let why = verdict(Some((s(100), "commit_transaction", Some(s(31)))), limit).unwrap();
        assert!(
            why.contains("commit_transaction still blocked 31 s past its deadline"),
            "{why}"
        );
        let why = verdict(Some((s(271), "rewinding", None)), limit).unwrap();
        assert!(
            why.contains("no progress for 271 s, blocked in rewinding"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn the_watchdog_fires_past_the_limit_naming_the_call_and_not_before() {
        let stuck = Progress {
            origin: Instant::now() - Duration::from_secs(10),
            last: AtomicU64::new(1),
            doing: Mutex::new(Doing {
                what: "commit_transaction",
                until: None,
            }),
        };
        let e = tokio::time::timeout(
            Duration::from_secs(5),
            watch(&stuck, Duration::from_secs(5)),
        )
        .await
        .expect("fires at its first check")
        .to_string();
        assert!(e.contains("blocked in commit_transaction"), "{e}");
        assert!(e.contains("limit 5 s"), "{e}");

        let fresh = Progress::default();
        fresh.tick();
        let waited = tokio::time::timeout(
            Duration::from_millis(1500),
            watch(&fresh, Duration::from_secs(60)),
        )
        .await;
        assert!(waited.is_err(), "fired without being stuck");
    }
}
