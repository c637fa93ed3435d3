//! What the loader tells operators: the metrics of each request and its lines of `/status`.

use std::time::{Duration, Instant};

use crate::config::LoaderSettings;
use crate::health::Health;

use super::insert::Outcome;
use super::state::{Batch, State};

/// The last request and insert, for `/status`.
pub(super) struct Report {
    last_insert: Option<(Instant, usize)>,
    last_outcome: &'static str,
    details_at: Instant,
}

impl Report {
    pub(super) fn new() -> Report {
        Report {
            last_insert: None,
            last_outcome: "none yet",
            details_at: Instant::now(),
        }
    }

    /// Counts a request by its outcome.
    pub(super) fn request(&mut self, outcome: &Outcome) {
        let label = match outcome {
            Outcome::Inserted => "inserted",
            Outcome::SlotBusy => "slot_busy",
            Outcome::TooLarge => "too_large",
            Outcome::Transient(_) => "transient",
            Outcome::Permanent(_) => "permanent",
            Outcome::Rejected(_) => "rejected",
        };
        metrics::counter!("edgelog_loader_requests_total", "outcome" => label).increment(1);
        self.last_outcome = label;
    }

    /// Records a confirmed insert of `batch` (a `size`-byte body sent at `sent_at`).
    pub(super) fn inserted(
        &mut self,
        l: &LoaderSettings,
        st: &State,
        batch: &Batch,
        size: usize,
        sent_at: Instant,
    ) {
        let rows = batch.records.as_ref().map_or(0, Vec::len);
        self.last_insert = Some((Instant::now(), rows));
        metrics::gauge!("edgelog_loader_body_limit_bytes").set(st.body_limit.get() as f64);
        // What one instance can sustain at this compression: a full body per slot.
        let capacity = l.max_body_bytes as f64 / st.bytes_per_row / l.slot_spacing.as_secs_f64();
        metrics::gauge!("edgelog_loader_capacity_rows_per_second").set(capacity);
        metrics::counter!("edgelog_loader_rows_inserted_total").increment(rows as u64);
        metrics::histogram!("edgelog_loader_rows_per_request").record(rows as f64);
        metrics::histogram!("edgelog_loader_body_bytes").record(size as f64);
        // Against the records' MessagePack size on the topic (the body's own uncompressed Native
        // size is not kept): how much the format and compression save per request.
        let topic_bytes: usize = batch.records.iter().flatten().map(|b| b.bytes).sum();
        metrics::gauge!("edgelog_loader_compression_ratio")
            .set(topic_bytes as f64 / size.max(1) as f64);
        // Per row: record timestamp (set at the edge) to insert confirmed.
        let now = crate::clock::now_epoch_ms();
        let latency = metrics::histogram!("edgelog_loader_end_to_end_seconds");
        for b in batch.records.iter().flatten() {
            latency.record(now.saturating_sub(b.record.timestamp_epoch_milli) as f64 / 1e3);
        }
        tracing::info!(rows, bytes = size, ranges = %batch.ranges, took_ms = sent_at.elapsed().as_millis() as u64, "batch inserted");
    }

    /// Refreshes the loader's `/status` lines, at most twice a second.
    pub(super) fn status(&mut self, health: &Health, st: &State, next_slot: Instant) {
        if self.details_at.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.details_at = Instant::now();
        health.details(self.details(st, next_slot));
    }

    fn details(&self, st: &State, next_slot: Instant) -> Vec<(&'static str, String)> {
        let now = Instant::now();
        vec![
            (
                "next proxy slot",
                match next_slot.checked_duration_since(now) {
                    Some(wait) => format!("in {:.1} s", wait.as_secs_f64()),
                    None => "open".to_string(),
                },
            ),
            (
                "last insert",
                match self.last_insert {
                    Some((at, rows)) => format!(
                        "{rows} rows, {:.1} s ago",
                        now.duration_since(at).as_secs_f64()
                    ),
                    None => "none yet".to_string(),
                },
            ),
            ("last request outcome", self.last_outcome.to_string()),
            (
                "pending batch",
                st.batches
                    .front()
                    .map(|b| b.ranges.to_string())
                    .unwrap_or_else(|| "none".into()),
            ),
            (
                "buffered",
                format!(
                    "{} records, {} bytes{}",
                    st.queue.len(),
                    st.queued_bytes,
                    if st.paused {
                        " (consumption paused)"
                    } else {
                        ""
                    }
                ),
            ),
            ("body limit", format!("{} bytes", st.body_limit.get())),
            (
                "dead-lettered",
                if st.dead_lettered.is_empty() {
                    "none".to_string()
                } else {
                    st.dead_lettered
                        .iter()
                        .map(|(reason, n)| format!("{n} {reason}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ),
        ]
    }
}
