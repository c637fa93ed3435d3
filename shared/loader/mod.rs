//! Stage two: land every record of `http_log_anon` in ClickHouse exactly once, through a proxy that
//! allows one request per slot (nginx `limit_req`, 1r/m = one per 62.5 s) and 1 MiB per body.
//!
//! The cycle of one batch:
//! 1. **Plan**: the first N buffered records (in arrival order, so per partition a contiguous
//!    prefix), N as large as fits `max_body_bytes` once encoded ([`body`]) and compressed.
//! 2. **Record**: commit, for every partition of the batch, offset = range start with the ranges
//!    as metadata ([`crate::batch::BatchId::to_metadata`]). Nothing is sent before this is durable.
//! 3. **Send** in the next slot, with `insert_deduplication_token` derived from the ranges.
//! 4. **Commit**: on success, offset = range end with empty metadata.
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
//! This module keeps the cycle; Kafka's side of it (recording, committing, rebalances) is in
//! `offsets.rs`. Whatever blocks (a broker round trip) or computes for seconds (planning's
//! encodes, a rebuilt batch's body) runs on the blocking pool and is awaited before the next
//! step, so the order above holds while the runtime's threads stay free for the HTTP listener
//! and other tasks; not `block_in_place`, so the library also runs on a current-thread runtime.

pub mod classify;
pub mod insert;
mod offsets;
pub mod plan;
pub mod quarantine;
mod refused;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::anon_record::{self, AnonRecord};
use crate::batch::{BatchId, BatchRanges, PartitionRange};
use crate::body::insert_url;
use crate::body::{self, BodyCompression};
use crate::config::Settings;
use crate::dead_letter::Reason;
use crate::health::Health;
use crate::kafka::{client_config, describe, KafkaWatch, WatchedContext};
use crate::topic_id::{topic_id, TopicIdError};
use insert::{InsertClient, Outcome};
use offsets::{apply_rebalances, finish, record_ranges};
use offsets::{LoaderConsumer, LoaderContext, RebalanceEvent};
use plan::BodyLimit;
use quarantine::{after_refusal, commit_quarantined, flush_dead_letters, quarantine};
use quarantine::{DeadLetter, DeadLetters};
use rdkafka::admin::AdminClient;
use refused::{replace_refused, Next, Refusal};

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

/// A batch whose ranges are recorded (or about to be). `records` is `None` until it is rebuilt.
struct Batch {
    ranges: BatchRanges,
    /// The anonymized topic's id when the batch was planned (`None`: recorded by a loader before
    /// ids were part of a batch); with the ranges, the batch's identity ([`BatchId`]).
    topic_id: Option<String>,
    records: Option<Vec<Buffered>>,
    recorded: bool,
    /// The encoded body, once made (a function of the records: every retry sends these bytes).
    body: Option<Vec<u8>>,
}

impl Batch {
    /// A new batch of `records` (per partition a contiguous run, in offset order): its ranges
    /// hold exactly these records. Recorded before it is sent.
    fn planned(records: Vec<Buffered>, topic_id: Option<String>) -> Batch {
        let ranges = BatchRanges::covering(records.iter().map(|b| (b.partition, b.offset)))
            .expect("a batch has records");
        Batch {
            ranges,
            topic_id,
            records: Some(records),
            recorded: false,
            body: None,
        }
    }

    /// A batch found in commit metadata: rebuilt from its ranges before it is sent.
    fn recorded(id: BatchId) -> Batch {
        Batch {
            ranges: id.ranges,
            topic_id: id.topic_id,
            records: None,
            recorded: true,
            body: None,
        }
    }

    /// What the batch's commit metadata and dedup token are made of.
    fn id(&self) -> BatchId {
        BatchId {
            ranges: self.ranges.clone(),
            topic_id: self.topic_id.clone(),
        }
    }
}

/// A record read from the anonymized topic, with its position there (batches are keyed by it).
struct Buffered {
    partition: i32,
    offset: i64,
    record: AnonRecord,
    bytes: usize,
}

#[derive(Default)]
struct State {
    /// Records read and not yet in a batch, in arrival order.
    queue: VecDeque<Buffered>,
    queued_bytes: usize,
    /// Batches to finish, oldest first. Recovered batches come before anything new.
    batches: VecDeque<Batch>,
    /// Per partition: offsets below this are loaded (committed) or belong to a batch, and are
    /// not queued again.
    skip_below: BTreeMap<i32, i64>,
    assigned: Vec<i32>,
    paused: bool,
    /// Compressed bytes per row of the last body, to size the next batch in one or two tries.
    bytes_per_row: f64,
    /// Final-level body size over planning-level size, learned from the last batch.
    level_ratio: f64,
    /// Largest body to plan: `max_body_bytes`, lowered by a 413, raised again by inserts.
    body_limit: BodyLimit,
    /// Undecodable records read, whose dead letters are not yet acknowledged. Sent before any
    /// offset commit, so no commit ever passes a record without its dead letter being durable.
    undecodable: Vec<DeadLetter>,
    /// Per partition: one past the last dead-lettered undecodable record that no commit has
    /// passed yet. Committed when nothing else is left to load (a batch's commit passes the
    /// others).
    quarantined_to: BTreeMap<i32, i64>,
    /// This loader's partitions of replaced batches whose commit metadata still names them; the
    /// next recording clears it ([`refused`]).
    release: Vec<PartitionRange>,
    /// Records ClickHouse refused on their own since the last successful insert.
    rejected_in_a_row: u32,
    /// Dead letters written by this process, by reason (for `/status`).
    dead_lettered: BTreeMap<Reason, u64>,
    /// The anonymized topic's id (read at start-up): new batches are bound to it.
    topic_id: Option<String>,
}

/// Runs stage two until `shutdown` completes or a permanent error stops it.
pub async fn run(settings: &Settings, shutdown: impl Future) -> anyhow::Result<()> {
    run_with_health(settings, Health::new(stall_limit(settings)), shutdown).await
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
    let topic = settings.topics.anonymized.clone();
    let mut config = client_config(
        &settings.kafka,
        &l.kafka_options,
        &[
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "30000"),
            ("max.poll.interval.ms", "600000"),
            // librdkafka's own prefetch queue is outside max_buffer_bytes; keep it modest too.
            ("queued.max.messages.kbytes", "16384"),
        ],
    );
    config
        .set("group.id", &l.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set(
            "statistics.interval.ms",
            crate::kafka::STATISTICS_INTERVAL_MS,
        )
        // Eager rebalancing: every rebalance revokes everything, so state is rebuilt from Kafka.
        .set("partition.assignment.strategy", "range");
    tracing::info!(consumer = %describe(&config), proxy = %settings.clickhouse.url, slot_spacing = ?l.slot_spacing, max_body_bytes = l.max_body_bytes, source_address = ?l.source_address, dedup_token = l.dedup_token, "loader starting");
    let watch = Arc::new(KafkaWatch::new(Some(health.clone())));
    tokio::pin!(shutdown);
    let topic_id = tokio::select! {
        id = wait_for_topic_id(settings, &topic, &watch) => id?,
        _ = &mut shutdown => {
            tracing::info!("stopped before the cluster answered");
            return Ok(());
        }
    };
    tracing::info!(%topic, %topic_id, "batches are bound to this incarnation of the topic");
    let events = Arc::new(Mutex::new(Vec::new()));
    let consumer: LoaderConsumer = Arc::new(
        config
            .create_with_context(LoaderContext {
                events: events.clone(),
                watch: watch.clone(),
            })
            .context("creating the consumer")?,
    );
    consumer.subscribe(&[&topic]).context("subscribing")?;
    let client = InsertClient::new(
        &settings.clickhouse.user,
        &settings.clickhouse.password,
        l.source_address,
        l.request_timeout,
    );

    let dead_letters = DeadLetters::new(settings, watch.clone())?;

    let failpoint = Failpoint::from_env();
    let mut st = State {
        bytes_per_row: 20.0,
        body_limit: BodyLimit::new(l.max_body_bytes),
        topic_id: Some(topic_id),
        ..State::default()
    };
    let mut next_slot = Instant::now();
    // How long before the slot a new batch is planned and encoded, so that it goes out when the
    // slot opens instead of an encode later (which would stretch every cycle and every record's
    // wait by that much).
    let mut planning_lead = INITIAL_PLANNING_LEAD;
    let mut last_insert: Option<(Instant, usize)> = None;
    let mut last_outcome = "none yet";
    let mut failed_in_a_row = 0u32;
    let mut details_at = Instant::now();
    loop {
        watch.check()?;
        absorb(&consumer, &topic, &mut st, &events, None).await?;
        update_pause(&consumer, &topic, &mut st, l.max_buffer_bytes)?;
        if st.batches.is_empty() && st.queue.is_empty() {
            // Only undecodable records left to pass: quarantine them and commit past them now,
            // or their partitions would show a lag until some later record arrives.
            commit_quarantined(&consumer, &topic, &mut st, &dead_letters).await?;
        }

        let work = !st.batches.is_empty() || !st.queue.is_empty();
        health.beat();
        health.assigned(st.assigned.len());
        if work {
            health.work_pending();
        } else {
            health.idle();
        }
        if details_at.elapsed() >= Duration::from_millis(500) {
            details_at = Instant::now();
            health.details(status_details(&st, next_slot, last_insert, last_outcome));
        }
        let starts_at = if st.batches.is_empty() {
            next_slot.checked_sub(planning_lead).unwrap_or(next_slot)
        } else {
            next_slot
        };
        if !work || Instant::now() < starts_at {
            let wait = if work {
                tokio::time::Instant::from_std(starts_at)
            } else {
                tokio::time::Instant::now() + Duration::from_millis(500)
            };
            tokio::select! {
                _ = &mut shutdown => break,
                message = consumer.recv() => absorb(&consumer, &topic, &mut st, &events, Some(message)).await?,
                _ = tokio::time::sleep_until(wait) => {}
            }
            continue;
        }

        // A slot is open and there is work: finish the oldest batch, or (`planning_lead` before
        // the slot) plan a new one from everything already fetched (a slot is too scarce to
        // spend on the first record alone).
        if st.batches.is_empty() {
            // The lead must cover the fill below as well as the encode.
            let planning = Instant::now();
            // Short of a full body, give the consumer up to a second to deliver more (right after
            // start-up the first fetches are still arriving); otherwise take what is ready.
            let target_rows = (st.body_limit.get() as f64 / st.bytes_per_row.max(1.0)) as usize;
            let fill_until = Instant::now() + Duration::from_secs(1);
            while !st.paused && st.queued_bytes < l.max_buffer_bytes {
                let patience = if st.queue.len() < target_rows && Instant::now() < fill_until {
                    Duration::from_millis(100)
                } else {
                    Duration::from_millis(20)
                };
                match tokio::time::timeout(patience, consumer.recv()).await {
                    Ok(message) => {
                        absorb(&consumer, &topic, &mut st, &events, Some(message)).await?
                    }
                    Err(_) => break, // nothing more ready right now
                }
            }
            // A poll that timed out may still have run the rebalance callback: apply what it
            // queued before planning, or the batch would come from the old assignment and be
            // loaded a second time by whoever reads the partition from its committed offset
            // (found by a 20-minute chaos run: 140 rows twice).
            if apply_rebalances(&consumer, &topic, &mut st, &events).await? || st.queue.is_empty() {
                continue; // a rebalance took the work away
            }
            plan_batch_off_runtime(&mut st, l.body_compression, l.max_days_per_batch).await;
            planning_lead = next_planning_lead(planning.elapsed(), l.slot_spacing);
            if Instant::now() < next_slot {
                continue; // planned ahead: the batch waits for its slot
            }
        }
        // Every undecodable record read so far, including any inside this batch's ranges, is
        // dead-lettered before the batch is recorded or committed.
        flush_dead_letters(&mut st, &dead_letters).await?;
        let batch = st.batches.front_mut().expect("planned or recovered");
        if batch.records.is_none() {
            let rebuilt = tokio::select! {
                rebuilt = rebuild(settings, &batch.ranges) => rebuilt?,
                _ = &mut shutdown => break,
            };
            if rebuilt.is_empty() {
                // Retention deleted all of it (logged as data loss by `rebuild`), or it held only
                // undecodable records (dead-lettered before it was recorded): nothing to send.
                let batch = st.batches.pop_front().expect("present");
                finish(&consumer, &topic, &mut st, &batch.ranges).await?;
                continue;
            }
            batch.records = Some(rebuilt);
        }
        if !batch.recorded {
            let release = std::mem::take(&mut st.release);
            record_ranges(&consumer, &topic, &batch.id(), &release, &st.assigned).await?;
            batch.recorded = true;
            Failpoint::hit(failpoint, Failpoint::AfterRecord);
        }
        if batch.body.is_none() {
            // A rebuilt or re-planned batch: encode it (seconds at xz) off the runtime.
            let records = batch.records.take().expect("rebuilt above");
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
        let records = batch.records.as_ref().expect("rebuilt above");
        let body = batch.body.clone().expect("encoded above");
        if records.len() == 1 && body.len() > l.max_body_bytes {
            // No proxy configured for `max_body_bytes` takes it: quarantine without a slot.
            let batch = st.batches.pop_front().expect("present");
            let why = format!(
                "this record alone makes a {}-byte body, over loader.max_body_bytes = {}",
                body.len(),
                l.max_body_bytes
            );
            quarantine(
                &consumer,
                &topic,
                &mut st,
                &dead_letters,
                batch,
                Reason::BodyTooLarge,
                why,
            )
            .await?;
            continue;
        }
        let token = l.dedup_token.then(|| batch.id().dedup_token(&topic));
        let url = insert_url(
            &settings.clickhouse.url,
            &settings.clickhouse.database,
            token.as_deref(),
        );
        let (rows, size) = (records.len(), body.len());
        let sent_at = Instant::now();
        // A stop request does not wait for the answer: a request left in flight is harmless (the
        // next owner sends the recorded batch again under the same token).
        let outcome = tokio::select! {
            outcome = client.send(&url, l.body_compression, body) => outcome,
            _ = &mut shutdown => break,
        };
        Failpoint::hit(failpoint, Failpoint::AfterResponse);
        // One failed slot is routine (a dropped connection, a restart); three in a row mean the
        // proxy or ClickHouse is down, the same bar as the stall limit.
        match &outcome {
            Outcome::Transient(why) => {
                failed_in_a_row += 1;
                if failed_in_a_row >= FAILED_SLOTS_UNREADY {
                    health.down("clickhouse", why);
                }
            }
            _ => {
                failed_in_a_row = 0;
                health.up("clickhouse");
            }
        }
        next_slot = sent_at + l.slot_spacing;
        let label = match &outcome {
            Outcome::Inserted => "inserted",
            Outcome::SlotBusy => "slot_busy",
            Outcome::TooLarge => "too_large",
            Outcome::Transient(_) => "transient",
            Outcome::Permanent(_) => "permanent",
            Outcome::Rejected(_) => "rejected",
        };
        metrics::counter!("edgelog_loader_requests_total", "outcome" => label).increment(1);
        last_outcome = label;
        match outcome {
            Outcome::Inserted => {
                let batch = st.batches.pop_front().expect("present");
                finish(&consumer, &topic, &mut st, &batch.ranges).await?;
                health.success();
                st.body_limit.inserted();
                st.rejected_in_a_row = 0;
                metrics::gauge!("edgelog_loader_body_limit_bytes").set(st.body_limit.get() as f64);
                last_insert = Some((Instant::now(), rows));
                st.bytes_per_row = size as f64 / rows.max(1) as f64;
                // What one instance can sustain at this compression: a full body per slot.
                let capacity =
                    l.max_body_bytes as f64 / st.bytes_per_row / l.slot_spacing.as_secs_f64();
                metrics::gauge!("edgelog_loader_capacity_rows_per_second").set(capacity);
                metrics::counter!("edgelog_loader_rows_inserted_total").increment(rows as u64);
                metrics::histogram!("edgelog_loader_rows_per_request").record(rows as f64);
                metrics::histogram!("edgelog_loader_body_bytes").record(size as f64);
                // Against the records' MessagePack size on the topic (the body's own uncompressed
                // Native size is not kept): how much the format and compression save per request.
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
            Outcome::SlotBusy => {
                tracing::info!(ranges = %batch_ranges(&st), "proxy slot busy (503); same batch next slot")
            }
            Outcome::TooLarge => {
                // nginx refused the body before ClickHouse saw it, so the batch never existed for
                // ClickHouse: lower the limit and re-plan smaller (its ranges are re-recorded).
                let batch = st.batches.pop_front().expect("present");
                let why =
                    format!("the proxy refused a {size}-byte body holding this record alone (413)");
                let next = replace_refused(&mut st, batch, Refusal::TooLarge { size });
                metrics::gauge!("edgelog_loader_body_limit_bytes").set(st.body_limit.get() as f64);
                tracing::warn!(
                    rows,
                    bytes = size,
                    new_limit = st.body_limit.get(),
                    "body over the proxy's limit (413); planning smaller until inserts pass again"
                );
                after_refusal(
                    &consumer,
                    &topic,
                    &mut st,
                    &dead_letters,
                    next,
                    Reason::BodyTooLarge,
                    why,
                )
                .await?;
            }
            Outcome::Rejected(why) => {
                let batch = st.batches.pop_front().expect("present");
                tracing::warn!(rows, ranges = %batch.ranges, %why, "ClickHouse refused the batch for what it holds; splitting it to isolate the records it refuses");
                let next = replace_refused(&mut st, batch, Refusal::Rejected);
                if matches!(next, Next::Quarantine(_)) {
                    st.rejected_in_a_row += 1;
                    if st.rejected_in_a_row >= l.max_rejected_in_a_row {
                        bail!("ClickHouse refused {} records in a row on their own with no insert passing in between (loader.max_rejected_in_a_row): this looks systematic (schema, encoder), not a few bad records; stopping, nothing committed past the last one: {why}", st.rejected_in_a_row);
                    }
                }
                after_refusal(
                    &consumer,
                    &topic,
                    &mut st,
                    &dead_letters,
                    next,
                    Reason::ClickhouseRejected,
                    why,
                )
                .await?;
            }
            Outcome::Transient(why) => {
                tracing::warn!(%why, ranges = %batch_ranges(&st), "insert failed transiently; same batch next slot")
            }
            Outcome::Permanent(why) => {
                bail!("ClickHouse rejected the insert permanently; nothing committed, stopping: {why}");
            }
        }
    }
    tracing::info!("loader stopped");
    Ok(())
}

/// The loader's lines of `/status`.
fn status_details(
    st: &State,
    next_slot: Instant,
    last_insert: Option<(Instant, usize)>,
    last_outcome: &str,
) -> Vec<(&'static str, String)> {
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
            match last_insert {
                Some((at, rows)) => format!(
                    "{rows} rows, {:.1} s ago",
                    now.duration_since(at).as_secs_f64()
                ),
                None => "none yet".to_string(),
            },
        ),
        ("last request outcome", last_outcome.to_string()),
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

/// Applies the rebalance events the callback queued, then buffers `message` if one came. Events
/// go first: a message returned by `recv` after a rebalance belongs to the new assignment.
async fn absorb(
    consumer: &LoaderConsumer,
    topic: &str,
    st: &mut State,
    events: &Mutex<Vec<RebalanceEvent>>,
    message: Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>>,
) -> anyhow::Result<()> {
    apply_rebalances(consumer, topic, st, events).await?;
    match message {
        Some(Ok(m)) => buffer(st, m.partition(), m.offset(), m.payload().unwrap_or(&[])),
        Some(Err(e)) => {
            if let Some(message) = crate::kafka::permanent_error_message(&e) {
                bail!("{message}");
            }
            tracing::warn!(error = %e, "consumer error");
            Ok(())
        }
        None => Ok(()),
    }
}

fn batch_ranges(st: &State) -> String {
    st.batches
        .front()
        .map(|b| b.ranges.to_string())
        .unwrap_or_default()
}

fn buffer(st: &mut State, partition: i32, offset: i64, payload: &[u8]) -> anyhow::Result<()> {
    if st
        .skip_below
        .get(&partition)
        .is_some_and(|&end| offset < end)
    {
        return Ok(());
    }
    // The anonymizer wrote it, so a record that does not decode is a bug or a foreign producer.
    // It can never load: quarantine it (before any commit passes it) and go on.
    let record = match anon_record::decode(payload) {
        Ok(record) => record,
        Err(e) => {
            st.undecodable.push(DeadLetter::undecodable(
                partition,
                offset,
                payload,
                e.to_string(),
            ));
            return Ok(());
        }
    };
    let bytes = payload.len() + std::mem::size_of::<Buffered>();
    st.queued_bytes += bytes;
    st.queue.push_back(Buffered {
        partition,
        offset,
        record,
        bytes,
    });
    Ok(())
}

/// Takes the longest prefix of the queue whose body fits the body limit (within 2%) as a new
/// batch, with its body. The encodes take seconds, so they run on the blocking pool; the queue
/// moves there and back (nothing else touches the state meanwhile: the loop is waiting here).
async fn plan_batch_off_runtime(st: &mut State, compression: BodyCompression, max_days: usize) {
    let queue = std::mem::take(&mut st.queue);
    let sizing = Sizing::of(st);
    let (queue, planned) = off_runtime(move || {
        let planned = plan_prefix(&queue, sizing, compression, max_days);
        (queue, planned)
    })
    .await;
    st.queue = queue;
    take_planned(st, planned);
}

/// [`plan_batch_off_runtime`] inline: the same plan, for tests.
#[cfg(test)]
fn plan_batch(st: &mut State, compression: BodyCompression, max_days: usize) {
    let planned = plan_prefix(&st.queue, Sizing::of(st), compression, max_days);
    take_planned(st, planned);
}

/// What planning reads from the state besides the queue.
#[derive(Debug, Clone, Copy)]
struct Sizing {
    max_body_bytes: usize,
    /// Final-level over planning-level size (0: not learned yet).
    level_ratio: f64,
    bytes_per_row: f64,
}

impl Sizing {
    fn of(st: &State) -> Sizing {
        Sizing {
            max_body_bytes: st.body_limit.get(),
            level_ratio: st.level_ratio,
            bytes_per_row: st.bytes_per_row,
        }
    }
}

/// A planned prefix of the queue: how many records, their body, the level ratio it measured.
struct Planned {
    n: usize,
    body: Vec<u8>,
    level_ratio: f64,
}

/// The pure core of planning: the longest prefix of `queue` whose body fits (within 2%).
/// Bisection, starting from a guess made with the last body's bytes per row.
fn plan_prefix(
    queue: &VecDeque<Buffered>,
    sizing: Sizing,
    compression: BodyCompression,
    max_days: usize,
) -> Planned {
    let max_body_bytes = sizing.max_body_bytes;
    let len = plan::prefix_within_days(
        queue.iter().map(|b| b.record.timestamp_epoch_milli),
        max_days,
    );
    // Candidates are sized with a cheap zstd level scaled by the learned ratio to the final
    // level; only the chosen batch is encoded at the final level (see docs/BENCHMARKS.md).
    let ratio = if sizing.level_ratio > 0.0 {
        sizing.level_ratio
    } else {
        compression.initial_planning_ratio()
    };
    let refs = |n: usize| -> Vec<&AnonRecord> { queue.iter().take(n).map(|b| &b.record).collect() };
    let planning_size = |n: usize| body::encode_body_at(&refs(n), body::PLANNING_ZSTD_LEVEL).len();
    let fits = |n: usize| planning_size(n) as f64 * ratio <= max_body_bytes as f64;
    let guess = (max_body_bytes as f64 / sizing.bytes_per_row.max(1.0)) as usize;
    let mut n = if guess >= len && fits(len) {
        len
    } else {
        // Invariant: `lo` fits (0 trivially), `hi` does not (or is past the queue).
        let (mut lo, mut hi) = (0, len + 1);
        let mut n = guess.clamp(1, len);
        while hi - lo > 1 && hi - lo > lo / 50 {
            if fits(n) {
                lo = n;
            } else {
                hi = n;
            }
            n = (lo + hi.min(len + 1)) / 2;
            if n > len {
                break;
            }
        }
        // A single record over the limit still goes alone, and the proxy's 413 says so.
        lo.max(1)
    };
    // The ratio is an estimate: shrink until the final body really fits.
    let body = loop {
        let body = body::encode_body(&refs(n), compression);
        if body.len() <= max_body_bytes || n == 1 {
            break body;
        }
        n = ((n as f64 * max_body_bytes as f64 / body.len() as f64 * 0.98) as usize)
            .clamp(1, n - 1);
    };
    let level_ratio = body.len() as f64 / planning_size(n).max(1) as f64;
    Planned {
        n,
        body,
        level_ratio,
    }
}

/// Moves a planned prefix out of the queue into a new batch.
fn take_planned(st: &mut State, planned: Planned) {
    let Planned {
        n,
        body,
        level_ratio,
    } = planned;
    st.level_ratio = level_ratio;
    let records: Vec<Buffered> = st.queue.drain(..n).collect();
    st.queued_bytes -= records.iter().map(|b| b.bytes).sum::<usize>();
    let ranges =
        BatchRanges::covering(records.iter().map(|b| (b.partition, b.offset))).expect("non-empty");
    for r in ranges.ranges() {
        st.skip_below.insert(r.partition, r.end);
    }
    st.batches.push_back(Batch {
        ranges,
        topic_id: st.topic_id.clone(),
        records: Some(records),
        recorded: false,
        body: Some(body),
    });
}

/// Transient failures in a row after which the proxy or ClickHouse counts as down (unready).
const FAILED_SLOTS_UNREADY: u32 = 3;

/// Planning lead before the first batch has measured one: about a full xz body's encode.
const INITIAL_PLANNING_LEAD: Duration = Duration::from_secs(3);

/// The next planning lead, from how long the last planning took: half again plus a quarter of a
/// second (encode time varies with the records and the machine's load), and never more than a
/// quarter of the slot spacing (records read during the lead wait a slot longer).
fn next_planning_lead(last_planning: Duration, slot_spacing: Duration) -> Duration {
    (last_planning.mul_f64(1.5) + Duration::from_millis(250)).min(slot_spacing / 4)
}

/// Puts a batch's records back at the head of the queue (after a 413), to be planned again.
#[cfg(test)]
fn requeue(st: &mut State, batch: Batch) {
    requeue_records(st, batch.records.unwrap_or_default());
}

/// Puts records back at the head of the queue, in their order, to be planned again.
fn requeue_records(st: &mut State, records: Vec<Buffered>) {
    for b in records.into_iter().rev() {
        st.queued_bytes += b.bytes;
        st.queue.push_front(b);
    }
}

/// Pauses consumption while the queue holds more than `max_bytes`; resumes below half of it.
fn update_pause(
    consumer: &LoaderConsumer,
    topic: &str,
    st: &mut State,
    max_bytes: usize,
) -> anyhow::Result<()> {
    let want_pause = if st.paused {
        st.queued_bytes > max_bytes / 2
    } else {
        st.queued_bytes > max_bytes
    };
    if want_pause == st.paused || st.assigned.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for &p in &st.assigned {
        tpl.add_partition(topic, p);
    }
    if want_pause {
        consumer.pause(&tpl)?;
        tracing::debug!(
            queued_bytes = st.queued_bytes,
            "buffer full; consumption paused"
        );
    } else {
        consumer.resume(&tpl)?;
    }
    st.paused = want_pause;
    Ok(())
}

/// Reads exactly the records of `ranges` again (read_committed, by assignment, outside the group).
async fn rebuild(settings: &Settings, ranges: &BatchRanges) -> anyhow::Result<Vec<Buffered>> {
    let settings = settings.clone();
    let ranges = ranges.clone();
    tokio::task::spawn_blocking(move || rebuild_blocking(&settings, &ranges)).await?
}

fn rebuild_blocking(settings: &Settings, ranges: &BatchRanges) -> anyhow::Result<Vec<Buffered>> {
    let topic = &settings.topics.anonymized;
    let mut config = client_config(&settings.kafka, &settings.loader.kafka_options, &[]);
    config
        .set("group.id", format!("{}-rebuild", settings.loader.group_id))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let reader: BaseConsumer = config.create().context("creating the rebuild reader")?;
    let mut tpl = TopicPartitionList::new();
    // Each range ends at a record the batch included, so reading until offset end-1 per partition
    // gets them all; offsets at or past the end are not part of the batch.
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    for r in ranges.ranges() {
        let (low, _) = reader
            .fetch_watermarks(topic, r.partition, Duration::from_secs(30))
            .context("reading the log start of a recorded batch's partition")?;
        if low > r.start {
            // Retention deleted part of the batch before it was confirmed. What is left is sent
            // under the same token: if the whole batch had landed, ClickHouse drops the re-send.
            // (Token-less mode cannot tell, and may store the remainder twice.)
            let lost = low.min(r.end) - r.start;
            metrics::counter!("edgelog_loader_lost_offsets_total").increment(lost as u64);
            tracing::error!(partition = r.partition, batch = %ranges, log_start = low, lost, "DATA LOSS: retention deleted records of a recorded batch before it was confirmed");
        }
        if low < r.end {
            tpl.add_partition_offset(topic, r.partition, Offset::Offset(low.max(r.start)))?;
            remaining.insert(r.partition, r.end - 1);
        }
    }
    if !remaining.is_empty() {
        reader.assign(&tpl)?;
    }
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "rebuilding batch {ranges}: partitions {:?} not read within 300 s",
                remaining.keys()
            );
        }
        let Some(message) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message.context("reading a recorded batch")?;
        let (p, o) = (m.partition(), m.offset());
        if !ranges.contains(p, o) {
            continue;
        }
        let payload = m.payload().unwrap_or(&[]);
        match anon_record::decode(payload) {
            Ok(record) => records.push(Buffered {
                partition: p,
                offset: o,
                record,
                bytes: payload.len(),
            }),
            // Decoding is deterministic, so the first attempt found it undecodable too, and
            // dead-lettered it before it recorded the batch: skip it, as the first attempt did.
            Err(e) => {
                tracing::warn!(partition = p, offset = o, error = %e, "undecodable record inside a recorded batch skipped (dead-lettered before the batch was recorded)")
            }
        }
        if remaining.get(&p) == Some(&o) {
            remaining.remove(&p);
        }
    }
    tracing::info!(%ranges, rows = records.len(), "recorded batch rebuilt");
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProducerSettings;
    use crate::synth::TrafficModel;

    fn queue_of(n: usize, partitions: i32) -> State {
        let mut model = TrafficModel::new(&ProducerSettings::default());
        let mut st = State {
            bytes_per_row: 20.0,
            body_limit: BodyLimit::new(1_000_000),
            ..State::default()
        };
        let mut next = vec![0i64; partitions as usize];
        for i in 0..n {
            let p = (i as i32 * 7 + i as i32 / 3) % partitions;
            let r = model.next_record(1_700_000_000_000 + i as u64);
            let (bytes, _) =
                crate::anon_record::transform(&crate::record::encode_capnp(&r), p, i as i64, 48)
                    .unwrap();
            // Offsets with gaps, like transaction markers leave.
            let offset = next[p as usize];
            next[p as usize] += 1 + (i % 3) as i64;
            buffer(&mut st, p, offset, &bytes).unwrap();
        }
        st
    }

    #[test]
    fn planning_covers_every_offset_exactly_once_within_the_limit() {
        let mut st = queue_of(30_000, 4);
        let all: Vec<(i32, i64)> = st.queue.iter().map(|b| (b.partition, b.offset)).collect();
        let max = 64 * 1024;
        st.body_limit = BodyLimit::new(max);
        let mut seen = Vec::new();
        let mut previous_end: BTreeMap<i32, i64> = BTreeMap::new();
        while !st.queue.is_empty() {
            plan_batch(&mut st, BodyCompression::default(), usize::MAX);
            let batch = st.batches.pop_front().unwrap();
            let records = batch.records.unwrap();
            let refs: Vec<&AnonRecord> = records.iter().map(|b| &b.record).collect();
            let size = body::encode_body(&refs, BodyCompression::default()).len();
            assert!(size <= max, "{size} > {max}");
            if !st.queue.is_empty() {
                assert!(size as f64 > max as f64 * 0.9, "batch well filled: {size}");
            }
            for r in batch.ranges.ranges() {
                let prev = previous_end.insert(r.partition, r.end);
                assert!(
                    prev.is_none_or(|e| e <= r.start),
                    "ranges of one partition never overlap"
                );
            }
            for b in &records {
                assert!(batch.ranges.contains(b.partition, b.offset));
                seen.push((b.partition, b.offset));
            }
            st.bytes_per_row = size as f64 / records.len() as f64;
        }
        assert_eq!(seen, all, "every record once, in order");
    }

    #[test]
    fn planning_starts_ahead_of_the_slot_by_the_last_planning_time_and_some() {
        let slot = Duration::from_secs(64);
        assert_eq!(
            next_planning_lead(Duration::from_secs(2), slot),
            Duration::from_millis(3_250)
        );
        assert_eq!(
            next_planning_lead(Duration::ZERO, slot),
            Duration::from_millis(250)
        );
        // A very slow encode (a loaded machine) does not eat the slot.
        assert_eq!(
            next_planning_lead(Duration::from_secs(60), slot),
            Duration::from_secs(16)
        );
        // Short test spacings keep the same proportion.
        assert_eq!(
            next_planning_lead(Duration::from_secs(1), Duration::from_millis(200)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn a_batch_touches_at_most_max_days() {
        let mut st = queue_of(0, 1);
        let day = 86_400_000u64;
        for i in 0..30i64 {
            let mut r = TrafficModel::new(&ProducerSettings::default()).next_record(0);
            r.timestamp_epoch_milli = 1_700_000_000_000 + (i as u64 / 10) * day;
            let (bytes, _) =
                crate::anon_record::transform(&crate::record::encode_capnp(&r), 0, i, 48).unwrap();
            buffer(&mut st, 0, i, &bytes).unwrap();
        }
        plan_batch(&mut st, BodyCompression::default(), 2);
        assert_eq!(
            st.batches[0].ranges.to_string(),
            "0:0-20",
            "two days of ten records"
        );
        assert_eq!(st.queue.len(), 10);
    }

    #[test]
    fn a_small_queue_goes_in_one_batch() {
        let mut st = queue_of(100, 3);
        plan_batch(&mut st, BodyCompression::default(), usize::MAX);
        assert!(st.queue.is_empty());
        assert_eq!(st.batches.len(), 1);
        assert_eq!(st.queued_bytes, 0);
        assert_eq!(st.batches[0].ranges.ranges().len(), 3);
    }

    #[test]
    fn recorded_ranges_are_skipped_when_read_again() {
        let mut st = queue_of(10, 1);
        plan_batch(&mut st, BodyCompression::default(), usize::MAX);
        let end = st.batches[0].ranges.get(0).unwrap().end;
        let (bytes, _) = crate::anon_record::transform(
            &crate::record::encode_capnp(
                &TrafficModel::new(&ProducerSettings::default()).next_record(0),
            ),
            0,
            0,
            48,
        )
        .unwrap();
        buffer(&mut st, 0, end - 1, &bytes).unwrap();
        assert!(
            st.queue.is_empty(),
            "an offset inside a recorded batch is not queued twice"
        );
        buffer(&mut st, 0, end, &bytes).unwrap();
        assert_eq!(st.queue.len(), 1);
    }
}

/// Property tests of batch planning: consecutive batches take every buffered record once, and a
/// batch's ranges hold exactly its records (a rebuild reads by ranges, so any other record inside
/// them would be loaded twice or lost).
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn anon(partition: i32, offset: i64, url_len: usize, resource: u64) -> AnonRecord {
        AnonRecord {
            version: 1,
            // Seven hours apart: a batch spans days, which planning bounds.
            timestamp_epoch_milli: 1_700_000_000_000 + offset.unsigned_abs() * 25_200_000,
            resource_id: resource,
            bytes_sent: offset.unsigned_abs().wrapping_mul(2_654_435_761),
            request_time_milli: 3,
            response_status: 200,
            cache_status: "HIT".into(),
            method: "GET".into(),
            remote_addr: "10.0.0.X".into(),
            // Varied, poorly compressible text so a few dozen rows fill a small body.
            url: {
                let mut x =
                    (offset as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ partition as u64;
                (0..url_len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        char::from(b'a' + (x % 26) as u8)
                    })
                    .collect()
            },
            source_partition: partition,
            source_offset: offset,
        }
    }

    /// Arrival order across partitions is arbitrary; within a partition offsets rise with gaps
    /// (transaction markers, aborted records).
    fn any_queue() -> impl Strategy<Value = Vec<(i32, i64, usize, u64)>> {
        prop::collection::vec((0i32..4, 1i64..4, 0usize..600, 0u64..5), 1..200).prop_map(|items| {
            let mut next = [0i64; 4];
            items
                .into_iter()
                .map(|(p, gap, url_len, resource)| {
                    let o = next[p as usize];
                    next[p as usize] += gap;
                    (p, o, url_len, resource)
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn consecutive_batches_cover_every_record_once(
            queue in any_queue(),
            limit in 4096usize..12_000,
            bytes_per_row in 1.0f64..500.0,
            too_large in prop::collection::vec(any::<bool>(), 8),
            max_days in prop_oneof![1usize..4, Just(usize::MAX)],
        ) {
            let mut st = State {
                bytes_per_row,
                body_limit: BodyLimit::new(limit),
                ..State::default()
            };
            for &(p, o, url_len, resource) in &queue {
                let bytes = anon_record::encode(&anon(p, o, url_len, resource));
                buffer(&mut st, p, o, &bytes).unwrap();
            }
            let all: Vec<(i32, i64)> = queue.iter().map(|q| (q.0, q.1)).collect();
            let mut taken: Vec<(i32, i64)> = Vec::new();
            let mut previous_end: BTreeMap<i32, i64> = BTreeMap::new();
            let mut refusals = too_large.into_iter();
            while !st.queue.is_empty() {
                plan_batch(&mut st, BodyCompression::default(), max_days);
                prop_assert_eq!(st.batches.len(), 1);
                let mut days: Vec<u64> = st.batches[0]
                    .records
                    .iter()
                    .flatten()
                    .map(|b| b.record.timestamp_epoch_milli / 86_400_000)
                    .collect();
                days.sort();
                days.dedup();
                prop_assert!(days.len() <= max_days, "{} days", days.len());
                // Sometimes the proxy says 413: the loader re-plans smaller from the same queue.
                if refusals.next().unwrap_or(false) && st.body_limit.get() > 4096 {
                    let batch = st.batches.pop_front().unwrap();
                    let limit = st.body_limit.get();
                    st.body_limit.refused(limit);
                    requeue(&mut st, batch);
                    continue;
                }
                let batch = st.batches.pop_front().unwrap();
                let records = batch.records.unwrap();
                let refs: Vec<&AnonRecord> = records.iter().map(|b| &b.record).collect();
                let size = body::encode_body(&refs, BodyCompression::default()).len();
                prop_assert!(size <= st.body_limit.get() || records.len() == 1, "{} > {}", size, st.body_limit.get());
                let mine: Vec<(i32, i64)> = records.iter().map(|b| (b.partition, b.offset)).collect();
                // Exactly the records inside the ranges: none outside, no other inside.
                let inside: Vec<(i32, i64)> = all
                    .iter()
                    .copied()
                    .filter(|&(p, o)| batch.ranges.contains(p, o))
                    .collect();
                let mut sorted = mine.clone();
                sorted.sort();
                let mut inside_sorted = inside;
                inside_sorted.sort();
                prop_assert_eq!(&sorted, &inside_sorted, "ranges {}", batch.ranges);
                for r in batch.ranges.ranges() {
                    let prev = previous_end.insert(r.partition, r.end);
                    prop_assert!(prev.is_none_or(|e| e <= r.start), "overlap at {:?}", r);
                    // No gap: nothing of this partition between the last batch and this one.
                    let from = prev.unwrap_or(i64::MIN);
                    prop_assert!(
                        !all.iter().any(|&(p, o)| p == r.partition && from <= o && o < r.start),
                        "records of partition {} skipped before {:?}", r.partition, r
                    );
                }
                taken.extend(mine);
                prop_assert_eq!(st.queued_bytes, st.queue.iter().map(|b| b.bytes).sum::<usize>());
                st.bytes_per_row = size as f64 / records.len() as f64;
            }
            prop_assert_eq!(taken, all, "every record once, in arrival order");
            prop_assert_eq!(st.queued_bytes, 0);
        }
    }
}
