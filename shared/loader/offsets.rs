//! Offsets and rebalances: where the loader's guarantees live in Kafka. A batch's ranges are
//! recorded as commit metadata before it is sent and committed past once ClickHouse confirmed it;
//! an assignment reads them back, so a partition's next owner finishes what its last owner
//! recorded. Every call to the consumer that waits for the broker runs on the blocking pool
//! ([`on_consumer`]) and is awaited before the loop goes on, which keeps the order the
//! guarantees need and the runtime's workers free (a current-thread runtime has only one).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::batch::{BatchId, BatchRanges, PartitionRange};
use crate::kafka::KafkaWatch;

use super::{off_runtime, Batch, State};

/// What the rebalance callback saw; handled by the main loop right after `recv` returns.
#[derive(Debug)]
pub(super) enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked,
}

pub(super) struct LoaderContext {
    pub(super) events: Arc<Mutex<Vec<RebalanceEvent>>>,
    pub(super) watch: Arc<KafkaWatch>,
}

impl ClientContext for LoaderContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        crate::kafka::record_lag(&statistics, "edgelog_loader_lag");
        self.watch.observe(&statistics);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.watch.log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.watch.error(&error, reason);
    }
}

impl ConsumerContext for LoaderContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(tpl) => {
                RebalanceEvent::Assigned(tpl.elements().iter().map(|e| e.partition()).collect())
            }
            Rebalance::Revoke(_) => RebalanceEvent::Revoked,
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        self.events.lock().expect("not poisoned").push(event);
    }
}

/// The loader's consumer, shared with the blocking pool: its synchronous calls (commits, offset
/// and watermark reads) run there via [`on_consumer`], never on a runtime worker.
pub(super) type LoaderConsumer = Arc<StreamConsumer<LoaderContext>>;

/// Runs `f` on the blocking pool and waits for it. The loop waits for each call before its next
/// step, so a commit is durable before anything after it, as with a synchronous call. Not
/// `block_in_place`: that panics on a current-thread runtime.
pub(super) async fn on_consumer<T: Send + 'static>(
    consumer: &LoaderConsumer,
    f: impl FnOnce(&StreamConsumer<LoaderContext>) -> T + Send + 'static,
) -> T {
    let consumer = consumer.clone();
    off_runtime(move || f(&consumer)).await
}

/// Applies the rebalance events the callback queued; true if there were any.
pub(super) async fn apply_rebalances(
    consumer: &LoaderConsumer,
    topic: &str,
    st: &mut State,
    events: &Mutex<Vec<RebalanceEvent>>,
) -> anyhow::Result<bool> {
    let drained: Vec<RebalanceEvent> = std::mem::take(&mut *events.lock().expect("not poisoned"));
    let any = !drained.is_empty();
    for event in drained {
        handle_rebalance(consumer, topic, st, event).await?;
    }
    Ok(any)
}

/// Revoke: forget everything (eager rebalancing revokes all partitions; Kafka holds the truth).
/// Assign: read committed offsets; recorded batches become the first work, and consumption
/// resumes after them; committed offsets below the log start are data loss, reported loudly.
pub(super) async fn handle_rebalance(
    consumer: &LoaderConsumer,
    topic: &str,
    st: &mut State,
    event: RebalanceEvent,
) -> anyhow::Result<()> {
    match event {
        RebalanceEvent::Revoked => {
            // Keep what was learned about sizes; forget everything else.
            *st = State {
                bytes_per_row: st.bytes_per_row,
                level_ratio: st.level_ratio,
                body_limit: st.body_limit,
                rejected_in_a_row: st.rejected_in_a_row,
                dead_lettered: std::mem::take(&mut st.dead_lettered),
                ..State::default()
            };
        }
        RebalanceEvent::Assigned(partitions) => {
            let mut tpl = TopicPartitionList::new();
            for &p in &partitions {
                tpl.add_partition(topic, p);
            }
            let committed = on_consumer(consumer, move |c| {
                c.committed_offsets(tpl, Duration::from_secs(30))
            })
            .await
            .context("reading committed offsets")?;
            // Owned: the list's elements point into it and cannot be held across an await.
            let committed: Vec<(i32, Offset, String)> = committed
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset(), e.metadata().to_string()))
                .collect();
            for (p, offset, metadata) in committed {
                let t = topic.to_string();
                let (low, _) = on_consumer(consumer, move |c| {
                    c.fetch_watermarks(&t, p, Duration::from_secs(30))
                })
                .await?;
                // A recorded batch's own losses are counted when it is rebuilt.
                let pending = BatchId::is_pending(&metadata);
                if let (Offset::Offset(c), false) = (offset, pending) {
                    if c < low {
                        metrics::counter!("edgelog_loader_lost_offsets_total")
                            .increment((low - c) as u64);
                        tracing::error!(
                            partition = p,
                            committed = c,
                            log_start = low,
                            lost = low - c,
                            "DATA LOSS: retention deleted records before they were loaded"
                        );
                    }
                }
                // Everything below the committed offset is loaded. The consumer starts from the
                // offset librdkafka fetched when it applied the assignment; should that ever be
                // older than what is read here, the records in between are dropped, not loaded
                // again.
                if let Offset::Offset(c) = offset {
                    st.skip_below.insert(p, c);
                }
                match BatchId::from_metadata(&metadata) {
                    Ok(Some(id)) => {
                        if let (Some(recorded), Some(now)) = (&id.topic_id, &st.topic_id) {
                            if recorded != now {
                                bail!(
                                    "partition {p} of {topic} holds a batch recorded for another \
                                     incarnation of the topic (id {recorded}, now {now}): its \
                                     offsets index records that no longer exist. Reset the loader \
                                     group's offsets (docs/OPERATIONS.md, \"A recreated topic\")"
                                );
                            }
                        }
                        if let Some(r) = id.ranges.get(p) {
                            let skip = st.skip_below.entry(p).or_default();
                            *skip = (*skip).max(r.end);
                        }
                        if !st.batches.iter().any(|b| b.id() == id) {
                            tracing::info!(partition = p, batch = %id, "recorded batch found; finishing it before anything new");
                            st.batches.push_back(Batch::recorded(id));
                        }
                    }
                    Ok(None) => {}
                    Err(err) => bail!("partition {p}: {err}"),
                }
            }
            st.assigned = partitions;
            tracing::info!(partitions = ?st.assigned, recovered_batches = st.batches.len(), "partitions assigned");
        }
    }
    Ok(())
}

/// Step 2 of the cycle: make the batch's ranges durable before anything is sent. In the same
/// commit, `release`d partitions (of a replaced batch, not overwritten by this one) lose their
/// metadata and keep their offset: nothing of them is loaded yet.
pub(super) async fn record_ranges(
    consumer: &LoaderConsumer,
    topic: &str,
    id: &BatchId,
    release: &[PartitionRange],
    assigned: &[i32],
) -> anyhow::Result<()> {
    let metadata = id.to_metadata();
    let ranges = &id.ranges;
    let mut tpl = TopicPartitionList::new();
    for r in ranges.ranges() {
        let mut e = tpl.add_partition(topic, r.partition);
        e.set_offset(Offset::Offset(r.start))?;
        e.set_metadata(metadata.as_str());
    }
    for r in release
        .iter()
        .filter(|r| ranges.get(r.partition).is_none() && assigned.contains(&r.partition))
    {
        let mut e = tpl.add_partition(topic, r.partition);
        e.set_offset(Offset::Offset(r.start))?;
        e.set_metadata("");
    }
    on_consumer(consumer, move |c| c.commit(&tpl, CommitMode::Sync))
        .await
        .context("recording the batch's ranges")?;
    Ok(())
}

/// Step 4: the batch landed; move each partition we still own past it and clear the record.
async fn commit_done(
    consumer: &LoaderConsumer,
    topic: &str,
    assigned: &[i32],
    ranges: &BatchRanges,
) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for r in ranges
        .ranges()
        .iter()
        .filter(|r| assigned.contains(&r.partition))
    {
        let mut e = tpl.add_partition(topic, r.partition);
        e.set_offset(Offset::Offset(r.end))?;
        e.set_metadata("");
    }
    if tpl.count() > 0 {
        on_consumer(consumer, move |c| c.commit(&tpl, CommitMode::Sync))
            .await
            .context("committing a loaded batch")?;
    }
    Ok(())
}

/// A batch is done (loaded, or nothing of it left to load): commit past it and forget the
/// dead-lettered records its commit passes.
pub(super) async fn finish(
    consumer: &LoaderConsumer,
    topic: &str,
    st: &mut State,
    ranges: &BatchRanges,
) -> anyhow::Result<()> {
    commit_done(consumer, topic, &st.assigned, ranges).await?;
    for r in ranges.ranges() {
        if st
            .quarantined_to
            .get(&r.partition)
            .is_some_and(|&to| to <= r.end)
        {
            st.quarantined_to.remove(&r.partition);
        }
    }
    Ok(())
}
