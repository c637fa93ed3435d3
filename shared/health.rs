//! Liveness, readiness and a status page for each stage, served next to `/metrics`.
//!
//! - `/healthz` (liveness): the processing loop came round within [`LIVENESS_WINDOW`]. A loop that
//!   has not is stuck; the orchestrator should restart the process.
//! - `/readyz` (readiness): no dependency (Kafka, ClickHouse, the proxy) is known to be down,
//!   partitions are assigned, and work has not been waiting longer than the stage's stall limit
//!   without a success (a committed transaction, a confirmed insert). Idle with nothing to do is
//!   ready.
//! - `/status`: a few `key: value` lines an operator (or `edgelog status`) reads.
//!
//! The stages only report events; the decisions are the pure functions [`liveness`] and
//! [`readiness`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A processing loop silent for this long is stuck. Longer than any single wait of a loop (the
/// loader's rebuild gives up after 300 s).
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(330);

#[derive(Debug, Clone)]
pub struct HealthState {
    pub started: Instant,
    pub heartbeat: Instant,
    pub assigned: usize,
    pub last_success: Option<Instant>,
    /// Since when work has been waiting without a success in between.
    pub pending_since: Option<Instant>,
    /// Stage-specific lines for `/status`.
    pub details: Vec<(&'static str, String)>,
    /// Dependencies known to be down: name -> (why, since when).
    pub down: BTreeMap<&'static str, (String, Instant)>,
}

/// Shared between a stage's loop (which reports) and the HTTP listener (which reads).
#[derive(Debug)]
pub struct Health {
    state: Mutex<HealthState>,
    /// Work waiting longer than this without a success makes the stage unready.
    pub stall_after: Duration,
}

impl Health {
    pub fn new(stall_after: Duration) -> Arc<Health> {
        let now = Instant::now();
        Arc::new(Health {
            state: Mutex::new(HealthState {
                started: now,
                heartbeat: now,
                assigned: 0,
                last_success: None,
                pending_since: None,
                details: Vec::new(),
                down: BTreeMap::new(),
            }),
            stall_after,
        })
    }

    fn update(&self, f: impl FnOnce(&mut HealthState)) {
        f(&mut self.state.lock().expect("not poisoned"));
    }

    /// The loop came round.
    pub fn beat(&self) {
        self.update(|s| s.heartbeat = Instant::now());
    }

    pub fn assigned(&self, partitions: usize) {
        self.update(|s| s.assigned = partitions);
    }

    /// Work is waiting (records buffered or in an open transaction).
    pub fn work_pending(&self) {
        self.update(|s| {
            s.pending_since.get_or_insert_with(Instant::now);
        });
    }

    /// Nothing is waiting.
    pub fn idle(&self) {
        self.update(|s| s.pending_since = None);
    }

    /// A transaction committed or an insert was confirmed.
    pub fn success(&self) {
        self.update(|s| {
            s.last_success = Some(Instant::now());
            s.pending_since = None;
        });
    }

    /// `dependency` (e.g. "kafka", "clickhouse") failed: the stage is unready until [`Self::up`].
    /// The first reason and time are kept while it stays down.
    pub fn down(&self, dependency: &'static str, why: &str) {
        self.update(|s| {
            s.down
                .entry(dependency)
                .or_insert_with(|| (why.to_string(), Instant::now()));
        });
    }

    /// `dependency` answered again.
    pub fn up(&self, dependency: &'static str) {
        self.update(|s| {
            s.down.remove(dependency);
        });
    }

    pub fn details(&self, details: Vec<(&'static str, String)>) {
        self.update(|s| s.details = details);
    }

    pub fn snapshot(&self) -> HealthState {
        self.state.lock().expect("not poisoned").clone()
    }
}

/// `Ok(reason)` when live, `Err(reason)` when the loop is stuck.
pub fn liveness(now: Instant, s: &HealthState) -> Result<String, String> {
    let silent = now.saturating_duration_since(s.heartbeat);
    if silent > LIVENESS_WINDOW {
        Err(format!(
            "processing loop silent for {:.0} s",
            silent.as_secs_f64()
        ))
    } else {
        Ok(format!(
            "processing loop ran {:.1} s ago",
            silent.as_secs_f64()
        ))
    }
}

/// `Ok(reason)` when ready, `Err(reason)` when not.
pub fn readiness(now: Instant, s: &HealthState, stall_after: Duration) -> Result<String, String> {
    liveness(now, s)?;
    if let Some((name, (why, since))) = s.down.iter().next() {
        return Err(format!(
            "{name} unavailable for {:.0} s: {why}",
            now.saturating_duration_since(*since).as_secs_f64()
        ));
    }
    if s.assigned == 0 {
        return Err("no partitions assigned".into());
    }
    match s.pending_since {
        Some(since) if now.saturating_duration_since(since) > stall_after => Err(format!(
            "work waiting for {:.0} s without a success (limit {:.0} s)",
            now.saturating_duration_since(since).as_secs_f64(),
            stall_after.as_secs_f64()
        )),
        Some(_) => Ok(format!("{} partitions, work in progress", s.assigned)),
        None => Ok(format!("{} partitions, nothing waiting", s.assigned)),
    }
}

/// The `/status` page.
pub fn render_status(now: Instant, s: &HealthState, stall_after: Duration) -> String {
    let ago = |t: Option<Instant>| match t {
        Some(t) => format!(
            "{:.1} s ago",
            now.saturating_duration_since(t).as_secs_f64()
        ),
        None => "never".to_string(),
    };
    let verdict = |r: Result<String, String>| match r {
        Ok(why) => format!("yes ({why})"),
        Err(why) => format!("NO ({why})"),
    };
    let mut out = format!(
        "live: {}\nready: {}\nuptime: {:.0} s\nassigned partitions: {}\nlast success: {}\n",
        verdict(liveness(now, s)),
        verdict(readiness(now, s, stall_after)),
        now.saturating_duration_since(s.started).as_secs_f64(),
        s.assigned,
        ago(s.last_success),
    );
    for (key, value) in &s.details {
        out.push_str(&format!("{key}: {value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(now: Instant) -> HealthState {
        HealthState {
            started: now,
            heartbeat: now,
            assigned: 2,
            last_success: None,
            pending_since: None,
            details: vec![("next proxy slot", "in 3.0 s".into())],
            down: BTreeMap::new(),
        }
    }

    #[test]
    fn a_dependency_down_makes_the_stage_unready_with_the_reason() {
        let h = Health::new(Duration::from_secs(60));
        h.assigned(2);
        h.down("kafka", "all brokers down");
        h.down("kafka", "a later reason does not replace the first");
        let now = Instant::now() + Duration::from_secs(5);
        let err = readiness(now, &h.snapshot(), h.stall_after).unwrap_err();
        assert!(
            err.starts_with("kafka unavailable for 5 s: all brokers down"),
            "{err}"
        );
        h.up("kafka");
        assert!(readiness(now, &h.snapshot(), h.stall_after).is_ok());
    }

    #[test]
    fn idle_with_partitions_is_ready_and_without_them_is_not() {
        let now = Instant::now();
        let mut s = state(now);
        assert!(readiness(now, &s, Duration::from_secs(60)).is_ok());
        s.assigned = 0;
        assert_eq!(
            readiness(now, &s, Duration::from_secs(60)),
            Err("no partitions assigned".into())
        );
    }

    #[test]
    fn work_waiting_past_the_stall_limit_is_unready() {
        let start = Instant::now();
        let mut s = state(start);
        s.pending_since = Some(start);
        let later = start + Duration::from_secs(61);
        s.heartbeat = later;
        assert!(readiness(start + Duration::from_secs(59), &s, Duration::from_secs(60)).is_ok());
        let err = readiness(later, &s, Duration::from_secs(60)).unwrap_err();
        assert!(err.contains("without a success"), "{err}");
    }

    #[test]
    fn a_silent_loop_is_dead_and_therefore_unready() {
        let start = Instant::now();
        let s = state(start);
        let later = start + LIVENESS_WINDOW + Duration::from_secs(1);
        assert!(liveness(later, &s).is_err());
        assert!(readiness(later, &s, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn events_move_the_state() {
        let h = Health::new(Duration::from_secs(60));
        h.assigned(3);
        h.work_pending();
        let first = h.snapshot().pending_since.unwrap();
        h.work_pending();
        assert_eq!(
            h.snapshot().pending_since,
            Some(first),
            "pending keeps its start"
        );
        h.success();
        let s = h.snapshot();
        assert!(s.pending_since.is_none() && s.last_success.is_some());
        let page = render_status(Instant::now(), &s, h.stall_after);
        assert!(
            page.contains("ready: yes (3 partitions, nothing waiting)"),
            "{page}"
        );
        h.details(vec![("open transaction", "12 records".into())]);
        let page = render_status(Instant::now(), &h.snapshot(), h.stall_after);
        assert!(page.contains("open transaction: 12 records"), "{page}");
    }
}
