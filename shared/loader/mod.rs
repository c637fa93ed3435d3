//! Stage two: land every record of `http_log_anon` in ClickHouse exactly once, through a proxy that
//! allows one request per slot (nginx `limit_req`, 1r/m = one per 62.5 s) and 1 MiB per body.
//!
//! A [`Loader`] turns one batch at a time through named phases, each a method:
//! 1. **fill**: give the consumer a moment to deliver a full body's worth of records;
//! 2. **plan**: the first N buffered records (in arrival order, so per partition a contiguous
//!    prefix), N as large as fits `max_body_bytes` once encoded ([`body`]) and compressed;
//! 3. **record**: commit, for every partition of the batch, offset = range start with the ranges
//!    as metadata ([`crate::batch::BatchId::to_metadata`]). Nothing is sent before this is
//!    durable. A batch found recorded after a crash or rebalance is rebuilt from its ranges here;
//! 4. **encode** the body (a planned batch has it already);
//! 5. **send** in the next slot, with `insert_deduplication_token` derived from the batch's id;
//! 6. **confirm**: on success, offset = range end with empty metadata; otherwise what the
//!    outcome calls for (same batch next slot, smaller batches, quarantine, stop).
//!
//! A crash or rebalance anywhere leaves either nothing recorded (the records are read again) or a
//! recorded batch that the partition's next owner rebuilds from the ranges — same records, same
//! bytes, same token — and sends before anything new from that partition, so ClickHouse keeps
//! exactly one copy. Rebalance events (queued by the callback, which runs inside any poll, even
//! one that then times out) are applied before a batch is planned, and no record below the
//! committed offset read at assignment is ever queued.
//!
//! No record can stop the loader or keep it retrying: what it cannot load goes to the loader's
//! dead-letter topic ([`quarantine`]), durably, before any commit passes it. Undecodable records
//! when read; a record whose body alone is over the limit when its batch of one is encoded; a
//! batch ClickHouse refuses for its content ([`classify`]) or the proxy refuses for its size is
//! replaced by smaller ones (`refused.rs`) down to the one record that cannot pass. Batches are
//! planned by the pure rules of [`plan`] (days per insert, body limit).
//!
//! Files: this one keeps the cycle; `state.rs` what is held between steps; `offsets.rs` Kafka's
//! side (reads, recording, commits, rebalances); [`plan`] sizing; `rebuild.rs` re-reading a
//! recorded batch; [`insert`] one request and its outcome; `refused.rs` and [`quarantine`] what
//! cannot pass; `report.rs` metrics and `/status`. Whatever blocks (a broker round trip) or
//! computes for seconds (planning's encodes, a rebuilt batch's body) runs on the blocking pool and
//! is awaited before the next step, so the order above holds while the runtime's threads stay free
//! for the HTTP listener and other tasks; not `block_in_place`, so the library also runs on a
//! current-thread runtime.

pub mod classify;
pub mod insert;
mod offsets;
pub mod plan;
pub mod quarantine;
mod rebuild;
mod refused;
mod report;
mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::AdminClient;

use crate::anon_record::AnonRecord;
use crate::body::{self, insert_url};
use crate::config::Settings;
use crate::dead_letter::Reason;
use crate::health::Health;
use crate::kafka::{client_config, KafkaWatch, WatchedContext};
use crate::topic_id::{topic_id, TopicIdError};
use insert::{InsertClient, Outcome};
use offsets::Offsets;
use plan::{next_planning_lead, plan_prefix, INITIAL_PLANNING_LEAD};
use quarantine::DeadLetters;
use refused::{replace_refused, Next, Refusal};
use report::Report;
use state::State;

/// Crash injection for tests: `LOADER_FAILPOINT=<step>` aborts the process (as a crash would) at
/// that step of a batch's cycle. Read once at start; unset in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The ranges are recorded, nothing sent.
    AfterRecord,
    /// ClickHouse answered (the rows may have landed), offsets not committed.
    AfterResponse,
}

impl Failpoint {
    fn from_env() -> Option<Failpoint> {
        match std::env::var("LOADER_FAILPOINT").ok()?.as_str() {
            "after_record" => Some(Failpoint::AfterRecord),
            "after_response" => Some(Failpoint::AfterResponse),
            other => panic!("unknown LOADER_FAILPOINT {other:?} (after_record, after_response)"),
        }
    }

    fn hit(this: Option<Failpoint>, at: Failpoint) {
        if this == Some(at) {
            eprintln!("LOADER_FAILPOINT {at:?}: aborting");
            std::process::abort();
        }
    }
}

/// Runs CPU-heavy or blocking `f` on the blocking pool; a panic in it is resumed here, as if `f`
/// had run inline.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a blocking task of the loader was cancelled: {e}"),
    }
}

/// Transient failures in a row after which the proxy or ClickHouse counts as down (unready).
const FAILED_SLOTS_UNREADY: u32 = 3;

/// Runs stage two until `shutdown` completes or a permanent error stops it.
pub async fn run(settings: &Settings, shutdown: impl Future) -> anyhow::Result<()> {
    run_with_health(settings, Health::new(stall_limit(settings)), shutdown).await
}

/// Work waiting this long without a confirmed insert makes the loader unready: three slots in a
/// row failed or were taken by someone else.
pub fn stall_limit(settings: &Settings) -> Duration {
    (settings.loader.slot_spacing + settings.loader.request_timeout) * 3
}

/// [`run`], reporting to `health` (served by [`crate::telemetry::start_http`]).
pub async fn run_with_health(
    settings: &Settings,
    health: Arc<Health>,
    shutdown: impl Future,
) -> anyhow::Result<()> {
    let l = &settings.loader;
    tracing::info!(proxy = %settings.clickhouse.url, slot_spacing = ?l.slot_spacing, max_body_bytes = l.max_body_bytes, source_address = ?l.source_address, dedup_token = l.dedup_token, "loader starting");
    let watch = Arc::new(KafkaWatch::new(Some(health.clone())));
    tokio::pin!(shutdown);
    let topic = &settings.topics.anonymized;
    let topic_id = tokio::select! {
        id = wait_for_topic_id(settings, topic, &watch) => id?,
        _ = &mut shutdown => {
            tracing::info!("stopped before the cluster answered");
            return Ok(());
        }
    };
    tracing::info!(%topic, %topic_id, "batches are bound to this incarnation of the topic");
    let loader = Loader {
        settings,
        offsets: Offsets::subscribe(settings, watch.clone())?,
        watch: watch.clone(),
        client: InsertClient::new(&settings.clickhouse, l.source_address, l.request_timeout)?,
        dead_letters: DeadLetters::new(settings, watch)?,
        health,
        failpoint: Failpoint::from_env(),
        st: State::new(l.max_body_bytes, Some(topic_id)),
        slots: Slots::new(),
        report: Report::new(),
    };
    loader.run(shutdown).await?;
    tracing::info!("loader stopped");
    Ok(())
}

/// The anonymized topic's id ([`crate::topic_id`]), retried while the cluster does not answer
/// (unready meanwhile, the reason on `/readyz`); a missing topic is final, and so is a permanent
/// refusal librdkafka reported meanwhile (credentials, ACLs, certificate).
async fn wait_for_topic_id(
    settings: &Settings,
    topic: &str,
    watch: &Arc<KafkaWatch>,
) -> anyhow::Result<String> {
    loop {
        let (s, t, w) = (settings.clone(), topic.to_string(), watch.clone());
        let result = tokio::task::spawn_blocking(move || {
            let admin: AdminClient<WatchedContext> =
                client_config(&s.kafka, &s.loader.kafka_options, &[])
                    .create_with_context(WatchedContext(w))
                    .context("creating the Kafka admin client")?;
            let id = topic_id(admin.inner(), &t, Duration::from_secs(5));
            // Why it timed out, if it did (a refused password, an untrusted certificate) is there.
            crate::kafka::serve_admin_events(admin.inner());
            anyhow::Ok(id)
        })
        .await??;
        match result {
            Ok(id) => {
                watch.reachable();
                return Ok(id);
            }
            Err(e @ TopicIdError::Unreachable { .. }) => {
                // Credentials, ACLs, certificate: waiting would not change them.
                watch.check()?;
                watch.unreachable(&e, "reading the anonymized topic's id at start-up");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(TopicIdError::Refused { code, detail, .. })
                if crate::kafka::permanent_failure(Some(code), &detail).is_some() =>
            {
                let cause = crate::kafka::permanent_failure(Some(code), &detail).expect("checked");
                bail!(
                    "{}",
                    cause.message(&format!("describing topic {topic}: {detail}"))
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// When the proxy takes the next request, and how long before it a new batch is planned.
struct Slots {
    next: Instant,
    /// Planning and encoding start this long before the slot, so that the batch goes out when
    /// the slot opens instead of an encode later (which would stretch every cycle and every
    /// record's wait by that much).
    planning_lead: Duration,
    /// Requests in a row that failed transiently.
    failed_in_a_row: u32,
}

impl Slots {
    fn new() -> Slots {
        Slots {
            next: Instant::now(),
            planning_lead: INITIAL_PLANNING_LEAD,
            failed_in_a_row: 0,
        }
    }

    /// When the next step is due: the slot for a batch ready to go, the planning lead before it
    /// for one still to plan.
    fn due(&self, batch_waiting: bool) -> Instant {
        if batch_waiting {
            self.next
        } else {
            self.next
                .checked_sub(self.planning_lead)
                .unwrap_or(self.next)
        }
    }
}

/// A batch about to be sent: its body, and the URL that carries its token.
struct Request {
    url: String,
    body: Vec<u8>,
}

/// One loader: its consumer, its clients and what it holds between the phases of a batch.
struct Loader<'a> {
    settings: &'a Settings,
    offsets: Offsets,
    client: InsertClient,
    dead_letters: DeadLetters,
    /// What librdkafka reported: a permanent refusal (credentials, ACLs, certificate) stops us.
    watch: Arc<KafkaWatch>,
    health: Arc<Health>,
    failpoint: Option<Failpoint>,
    st: State,
    slots: Slots,
    report: Report,
}

impl Loader<'_> {
    /// The cycle, until `shutdown` completes or a permanent error stops it. A stop request does
    /// not wait for a step to end: a recording or a request left in flight is harmless (the next
    /// owner finishes the recorded batch under the same token).
    async fn run(mut self, shutdown: impl Future) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        loop {
            self.tend().await?;
            let has_work = self.st.has_work();
            let due = self.slots.due(!self.st.batches.is_empty());
            if !has_work || Instant::now() < due {
                let wait = if has_work {
                    tokio::time::Instant::from_std(due)
                } else {
                    tokio::time::Instant::now() + Duration::from_millis(500)
                };
                tokio::select! {
                    _ = &mut shutdown => break,
                    message = self.offsets.recv() => {
                        self.offsets.absorb(&mut self.st, Some(message)).await?
                    }
                    _ = tokio::time::sleep_until(wait) => {}
                }
                continue;
            }
            // A slot is open (or about to) and there is work: finish the oldest batch, or plan a
            // new one from everything already fetched (a slot is too scarce to spend on the first
            // record alone).
            if self.st.batches.is_empty() {
                let planning = Instant::now();
                self.fill().await?;
                if !self.plan().await? {
                    continue; // a rebalance took the work away
                }
                let spacing = self.settings.loader.slot_spacing;
                self.slots.planning_lead = next_planning_lead(planning.elapsed(), spacing);
                if Instant::now() < self.slots.next {
                    continue; // planned ahead: the batch waits for its slot
                }
            }
            let recorded = tokio::select! {
                recorded = self.record() => recorded?,
                _ = &mut shutdown => break,
            };
            if !recorded {
                continue;
            }
            let Some(request) = self.encode().await? else {
                continue;
            };
            let sent_at = Instant::now();
            let compression = self.settings.loader.body_compression;
            let size = request.body.len();
            let outcome = tokio::select! {
                outcome = self.client.send(&request.url, compression, request.body) => outcome,
                _ = &mut shutdown => break,
            };
            Failpoint::hit(self.failpoint, Failpoint::AfterResponse);
            self.confirm(outcome, size, sent_at).await?;
        }
        Ok(())
    }

    /// Between steps: apply rebalances, pause or resume reading, commit past dead letters when
    /// nothing else is left, and tell `/healthz`, `/readyz` and `/status` how things are.
    async fn tend(&mut self) -> anyhow::Result<()> {
        // Credentials, ACLs, certificate: waiting would not change them.
        self.watch.check()?;
        self.offsets.absorb(&mut self.st, None).await?;
        let max_buffer = self.settings.loader.max_buffer_bytes;
        self.offsets.update_pause(&mut self.st, max_buffer)?;
        if !self.st.has_work() {
            // Only undecodable records left to pass: quarantine them and commit past them now,
            // or their partitions would show a lag until some later record arrives.
            self.dead_letters
                .commit_quarantined(&self.offsets, &mut self.st)
                .await?;
        }
        self.health.beat();
        self.health.assigned(self.st.assigned.len());
        if self.st.has_work() {
            self.health.work_pending();
        } else {
            self.health.idle();
        }
        self.report.status(&self.health, &self.st, self.slots.next);
        Ok(())
    }

    /// Phase 1, fill: short of a full body, give the consumer up to a second to deliver more
    /// (right after start-up the first fetches are still arriving); otherwise take what is ready.
    async fn fill(&mut self) -> anyhow::Result<()> {
        let max_buffer = self.settings.loader.max_buffer_bytes;
        let st = &mut self.st;
        let target_rows = (st.body_limit.get() as f64 / st.bytes_per_row.max(1.0)) as usize;
        let fill_until = Instant::now() + Duration::from_secs(1);
        while !st.paused && st.queued_bytes < max_buffer {
            let patience = if st.queue.len() < target_rows && Instant::now() < fill_until {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(20)
            };
            match tokio::time::timeout(patience, self.offsets.recv()).await {
                Ok(message) => self.offsets.absorb(st, Some(message)).await?,
                Err(_) => break, // nothing more ready right now
            }
        }
        Ok(())
    }

    /// Phase 2, plan: the longest prefix of the queue whose body fits (within 2%) becomes the
    /// next batch, with its body. False if a rebalance took the work away.
    async fn plan(&mut self) -> anyhow::Result<bool> {
        // A poll that timed out may still have run the rebalance callback: apply what it queued
        // before planning, or the batch would come from the old assignment and be loaded a
        // second time by whoever reads the partition from its committed offset (found by a
        // 20-minute chaos run: 140 rows twice).
        if self.offsets.apply_rebalances(&mut self.st).await? || self.st.queue.is_empty() {
            return Ok(false);
        }
        // The encodes take seconds: the queue moves to the blocking pool and back (nothing else
        // touches the state meanwhile, the loop is waiting here).
        let l = &self.settings.loader;
        let (compression, max_days) = (l.body_compression, l.max_days_per_batch);
        let queue = std::mem::take(&mut self.st.queue);
        let sizing = self.st.sizing();
        let (queue, planned) = off_runtime(move || {
            let planned = plan_prefix(&queue, sizing, compression, max_days);
            (queue, planned)
        })
        .await;
        self.st.queue = queue;
        self.st.take_planned(planned);
        Ok(true)
    }

    /// Phase 3, record: the oldest batch's ranges are made durable in Kafka before it is sent
    /// (a recovered batch is rebuilt from them first). False if nothing of it is left to send.
    async fn record(&mut self) -> anyhow::Result<bool> {
        // Every undecodable record read so far, including any inside this batch's ranges, is
        // dead-lettered before the batch is recorded or committed.
        self.dead_letters.flush(&mut self.st).await?;
        let batch = self.st.batches.front_mut().expect("planned or recovered");
        if batch.records.is_none() {
            let rebuilt = rebuild::rebuild(self.settings, &batch.ranges).await?;
            if rebuilt.is_empty() {
                // Retention deleted all of it (logged as data loss by `rebuild`), or it held only
                // undecodable records (dead-lettered before it was recorded): nothing to send.
                let batch = self.st.batches.pop_front().expect("present");
                self.offsets.finish(&mut self.st, &batch.ranges).await?;
                return Ok(false);
            }
            batch.records = Some(rebuilt);
        }
        if !batch.recorded {
            let release = std::mem::take(&mut self.st.release);
            self.offsets
                .record(&batch.id(), &release, &self.st.assigned)
                .await?;
            batch.recorded = true;
            Failpoint::hit(self.failpoint, Failpoint::AfterRecord);
        }
        Ok(true)
    }

    /// Phase 4, encode: the oldest batch's body (seconds at xz, off the runtime; a planned batch
    /// has it already) and the URL with its token. `None` if its one record makes a body no
    /// proxy configured for `max_body_bytes` takes: quarantined without spending a slot.
    async fn encode(&mut self) -> anyhow::Result<Option<Request>> {
        let l = &self.settings.loader;
        let batch = self.st.batches.front_mut().expect("recorded");
        if batch.body.is_none() {
            let records = batch.records.take().expect("rebuilt when recorded");
            let compression = l.body_compression;
            let (records, body) = off_runtime(move || {
                let refs: Vec<&AnonRecord> = records.iter().map(|b| &b.record).collect();
                let body = body::encode_body(&refs, compression);
                (records, body)
            })
            .await;
            batch.records = Some(records);
            batch.body = Some(body);
        }
        let rows = batch.records.as_ref().map_or(0, Vec::len);
        let body = batch.body.clone().expect("encoded above");
        if rows == 1 && body.len() > l.max_body_bytes {
            let batch = self.st.batches.pop_front().expect("present");
            let why = format!(
                "this record alone makes a {}-byte body, over loader.max_body_bytes = {}",
                body.len(),
                l.max_body_bytes
            );
            self.dead_letters
                .quarantine(
                    &self.offsets,
                    &mut self.st,
                    batch,
                    Reason::BodyTooLarge,
                    why,
                )
                .await?;
            return Ok(None);
        }
        let topic = self.offsets.topic();
        let token = l.dedup_token.then(|| batch.id().dedup_token(topic));
        let ch = &self.settings.clickhouse;
        let url = insert_url(&ch.url, &ch.database, token.as_deref());
        Ok(Some(Request { url, body }))
    }

    /// Phase 6, confirm: what the answer to the oldest batch's request (`size` bytes, sent at
    /// `sent_at`) means for it.
    async fn confirm(
        &mut self,
        outcome: Outcome,
        size: usize,
        sent_at: Instant,
    ) -> anyhow::Result<()> {
        let l = &self.settings.loader;
        // One failed slot is routine (a dropped connection, a restart); three in a row mean the
        // proxy or ClickHouse is down, the same bar as the stall limit.
        if let Outcome::Transient(why) = &outcome {
            self.slots.failed_in_a_row += 1;
            if self.slots.failed_in_a_row >= FAILED_SLOTS_UNREADY {
                self.health.down("clickhouse", why);
            }
        } else {
            self.slots.failed_in_a_row = 0;
            self.health.up("clickhouse");
        }
        self.slots.next = sent_at + l.slot_spacing;
        self.report.request(&outcome);
        let st = &mut self.st;
        let rows = st
            .batches
            .front()
            .and_then(|b| b.records.as_ref())
            .map_or(0, Vec::len);
        match outcome {
            Outcome::Inserted => {
                let batch = st.batches.pop_front().expect("present");
                self.offsets.finish(st, &batch.ranges).await?;
                self.health.success();
                st.body_limit.inserted();
                st.rejected_in_a_row = 0;
                st.bytes_per_row = size as f64 / rows.max(1) as f64;
                self.report.inserted(l, st, &batch, size, sent_at);
            }
            Outcome::SlotBusy => {
                tracing::info!(ranges = %st.current_ranges(), "proxy slot busy (503); same batch next slot")
            }
            Outcome::TooLarge => {
                // nginx refused the body before ClickHouse saw it, so the batch never existed for
                // ClickHouse: lower the limit and re-plan smaller (its ranges are re-recorded).
                let batch = st.batches.pop_front().expect("present");
                let why =
                    format!("the proxy refused a {size}-byte body holding this record alone (413)");
                let next = replace_refused(st, batch, Refusal::TooLarge { size });
                metrics::gauge!("edgelog_loader_body_limit_bytes").set(st.body_limit.get() as f64);
                tracing::warn!(
                    rows,
                    bytes = size,
                    new_limit = st.body_limit.get(),
                    "body over the proxy's limit (413); planning smaller until inserts pass again"
                );
                self.dead_letters
                    .after_refusal(&self.offsets, st, next, Reason::BodyTooLarge, why)
                    .await?;
            }
            Outcome::Rejected(why) => {
                let batch = st.batches.pop_front().expect("present");
                tracing::warn!(rows, ranges = %batch.ranges, %why, "ClickHouse refused the batch for what it holds; splitting it to isolate the records it refuses");
                let next = replace_refused(st, batch, Refusal::Rejected);
                if matches!(next, Next::Quarantine(_)) {
                    st.rejected_in_a_row += 1;
                    if st.rejected_in_a_row >= l.max_rejected_in_a_row {
                        bail!("ClickHouse refused {} records in a row on their own with no insert passing in between (loader.max_rejected_in_a_row): this looks systematic (schema, encoder), not a few bad records; stopping, nothing committed past the last one: {why}", st.rejected_in_a_row);
                    }
                }
                self.dead_letters
                    .after_refusal(&self.offsets, st, next, Reason::ClickhouseRejected, why)
                    .await?;
            }
            Outcome::Transient(why) => {
                tracing::warn!(%why, ranges = %st.current_ranges(), "insert failed transiently; same batch next slot")
            }
            Outcome::Permanent(why) => {
                bail!("ClickHouse rejected the insert permanently; nothing committed, stopping: {why}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_waiting_goes_at_the_slot_one_to_plan_a_lead_before_it() {
        let mut slots = Slots::new();
        let now = Instant::now();
        slots.next = now + Duration::from_secs(60);
        slots.planning_lead = Duration::from_secs(3);
        assert_eq!(slots.due(true), slots.next);
        assert_eq!(slots.due(false), now + Duration::from_secs(57));
    }
}
