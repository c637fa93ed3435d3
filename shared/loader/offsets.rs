//! Offsets and rebalances: where the loader's guarantees live in Kafka. A batch's ranges are
//! recorded as commit metadata before it is sent and committed past once ClickHouse confirmed it;
//! an assignment reads them back, so a partition's next owner finishes what its last owner
//! recorded. Every call to the consumer that waits for the broker runs on the blocking pool
//! ([`on_consumer`]) and is awaited before the loop goes on, which keeps the order the
//! guarantees need and the runtime's workers free (a current-thread runtime has only one).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::batch::{BatchId, BatchRanges, PartitionRange};
use crate::config::Settings;
use crate::kafka::{client_config, describe, exactly_once_consumer, KafkaWatch};

use super::off_runtime;
use super::state::{Batch, State};

/// What the rebalance callback saw; handled by the main loop right after `recv` returns.
#[derive(Debug)]
enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked,
}

struct LoaderContext {
    events: Arc<Mutex<Vec<RebalanceEvent>>>,
    watch: Arc<KafkaWatch>,
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
type LoaderConsumer = Arc<StreamConsumer<LoaderContext>>;

/// Runs `f` on the blocking pool and waits for it. The loop waits for each call before its next
/// step, so a commit is durable before anything after it, as with a synchronous call. Not
/// `block_in_place`: that panics on a current-thread runtime.
async fn on_consumer<T: Send + 'static>(
    consumer: &LoaderConsumer,
    f: impl FnOnce(&StreamConsumer<LoaderContext>) -> T + Send + 'static,
) -> T {
    let consumer = consumer.clone();
    off_runtime(move || f(&consumer)).await
}

/// The loader's group consumer with what its rebalance callback queued: every read, offset
/// commit and rebalance of the loader goes through it.
pub(super) struct Offsets {
    consumer: LoaderConsumer,
    topic: String,
    events: Arc<Mutex<Vec<RebalanceEvent>>>,
}

impl Offsets {
    /// The loader's consumer (read_committed, manual commits, eager rebalancing), subscribed to
    /// the anonymized topic. Its librdkafka errors are reported through `watch`.
    pub(super) fn subscribe(
        settings: &Settings,
        watch: Arc<KafkaWatch>,
    ) -> anyhow::Result<Offsets> {
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
        exactly_once_consumer(&mut config, &l.group_id)
            // Eager rebalancing: every rebalance revokes everything, so state is rebuilt from
            // Kafka.
            .set("partition.assignment.strategy", "range");
        tracing::info!(consumer = %describe(&config), %topic, "loader consumer");
        let events = Arc::new(Mutex::new(Vec::new()));
        let consumer: LoaderConsumer = Arc::new(
            config
                .create_with_context(LoaderContext {
                    events: events.clone(),
                    watch,
                })
                .context("creating the consumer")?,
        );
        consumer.subscribe(&[&topic]).context("subscribing")?;
        Ok(Offsets {
            consumer,
            topic,
            events,
        })
    }

    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// The next record (or consumer error); rebalances it caused are queued, applied by
    /// [`Offsets::absorb`].
    pub(super) async fn recv(&self) -> KafkaResult<BorrowedMessage<'_>> {
        self.consumer.recv().await
    }

    /// Applies the rebalance events the callback queued, then buffers `message` if one came.
    /// Events go first: a message returned by `recv` after a rebalance belongs to the new
    /// assignment.
    pub(super) async fn absorb(
        &self,
        st: &mut State,
        message: Option<KafkaResult<BorrowedMessage<'_>>>,
    ) -> anyhow::Result<()> {
        self.apply_rebalances(st).await?;
        match message {
            Some(Ok(m)) => st.buffer(m.partition(), m.offset(), m.payload().unwrap_or(&[])),
            Some(Err(e)) => {
                if let Some(message) = crate::kafka::permanent_error_message(&e) {
                    bail!("{message}");
                }
                tracing::warn!(error = %e, "consumer error")
            }
            None => {}
        }
        Ok(())
    }

    /// Applies the rebalance events the callback queued; true if there were any.
    pub(super) async fn apply_rebalances(&self, st: &mut State) -> anyhow::Result<bool> {
        let drained: Vec<RebalanceEvent> =
            std::mem::take(&mut *self.events.lock().expect("not poisoned"));
        let any = !drained.is_empty();
        for event in drained {
            self.handle_rebalance(st, event).await?;
        }
        Ok(any)
    }

    /// Revoke: forget everything (eager rebalancing revokes all partitions; Kafka holds the
    /// truth). Assign: read committed offsets; recorded batches become the first work, and
    /// consumption resumes after them; committed offsets below the log start are data loss,
    /// reported loudly.
    async fn handle_rebalance(&self, st: &mut State, event: RebalanceEvent) -> anyhow::Result<()> {
        let topic = self.topic.as_str();
        match event {
            RebalanceEvent::Revoked => st.forget_partitions(),
            RebalanceEvent::Assigned(partitions) => {
                let mut tpl = TopicPartitionList::new();
                for &p in &partitions {
                    tpl.add_partition(topic, p);
                }
                let committed = self
                    .committed(tpl)
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
                    let (low, _) = on_consumer(&self.consumer, move |c| {
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
                    // Everything below the committed offset is loaded. The consumer starts from
                    // the offset librdkafka fetched when it applied the assignment; should that
                    // ever be older than what is read here, the records in between are dropped,
                    // not loaded again.
                    if let Offset::Offset(c) = offset {
                        st.skip_below.insert(p, c);
                    }
                    match BatchId::from_metadata(&metadata) {
                        Ok(Some(id)) => {
                            if let (Some(recorded), Some(now)) = (&id.topic_id, &st.topic_id) {
                                if recorded != now {
                                    bail!(
                                        "partition {p} of {topic} holds a batch recorded for \
                                         another incarnation of the topic (id {recorded}, now \
                                         {now}): its offsets index records that no longer exist. \
                                         Reset the loader group's offsets (docs/OPERATIONS.md, \
                                         \"A recreated topic\")"
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

    /// Pauses consumption while the buffer is full ([`State::wants_pause`]).
    pub(super) fn update_pause(&self, st: &mut State, max_bytes: usize) -> anyhow::Result<()> {
        let want_pause = st.wants_pause(max_bytes);
        if want_pause == st.paused || st.assigned.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &st.assigned {
            tpl.add_partition(&self.topic, p);
        }
        if want_pause {
            self.consumer.pause(&tpl)?;
            tracing::debug!(
                queued_bytes = st.queued_bytes,
                "buffer full; consumption paused"
            );
        } else {
            self.consumer.resume(&tpl)?;
        }
        st.paused = want_pause;
        Ok(())
    }

    /// Step 2 of the cycle: make the batch's ranges durable before anything is sent. In the
    /// same commit, `release`d partitions (of a replaced batch, not overwritten by this one) lose
    /// their metadata and keep their offset: nothing of them is loaded yet.
    pub(super) async fn record(
        &self,
        id: &BatchId,
        release: &[PartitionRange],
        assigned: &[i32],
    ) -> anyhow::Result<()> {
        let metadata = id.to_metadata();
        let ranges = &id.ranges;
        let mut tpl = TopicPartitionList::new();
        for r in ranges.ranges() {
            let mut e = tpl.add_partition(&self.topic, r.partition);
            e.set_offset(Offset::Offset(r.start))?;
            e.set_metadata(metadata.as_str());
        }
        for r in release
            .iter()
            .filter(|r| ranges.get(r.partition).is_none() && assigned.contains(&r.partition))
        {
            let mut e = tpl.add_partition(&self.topic, r.partition);
            e.set_offset(Offset::Offset(r.start))?;
            e.set_metadata("");
        }
        self.commit(tpl)
            .await
            .context("recording the batch's ranges")
    }

    /// A batch is done (loaded, or nothing of it left to load): move each partition this loader
    /// still owns past it, clear the record, and forget the dead-lettered records its commit
    /// passes.
    pub(super) async fn finish(&self, st: &mut State, ranges: &BatchRanges) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for r in ranges
            .ranges()
            .iter()
            .filter(|r| st.assigned.contains(&r.partition))
        {
            let mut e = tpl.add_partition(&self.topic, r.partition);
            e.set_offset(Offset::Offset(r.end))?;
            e.set_metadata("");
        }
        if tpl.count() > 0 {
            self.commit(tpl)
                .await
                .context("committing a loaded batch")?;
        }
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

    /// Commits `tpl` synchronously (off the runtime) and waits: durable before the next step.
    /// While the group's coordinator moves (its broker died or restarted: a cluster elects
    /// another within seconds) the same commit is tried again for up to [`COORDINATOR_MOVE`].
    pub(super) async fn commit(&self, tpl: TopicPartitionList) -> KafkaResult<()> {
        self.while_coordinator_moves("offset commit", move |c| c.commit(&tpl, CommitMode::Sync))
            .await
    }

    /// The group's committed offsets (and their metadata: recorded batches) for `tpl`, read
    /// again while the coordinator moves, as [`Offsets::commit`].
    async fn committed(&self, tpl: TopicPartitionList) -> KafkaResult<TopicPartitionList> {
        self.while_coordinator_moves("committed offsets read", move |c| {
            c.committed_offsets(tpl.clone(), Duration::from_secs(30))
        })
        .await
    }

    /// Runs `call` on the consumer (off the runtime) until it succeeds, fails otherwise than
    /// [`coordinator_moving`], or [`COORDINATOR_MOVE`] has passed.
    ///
    /// Not retried, by design: `UnknownMemberId`, `IllegalGeneration` and the like. They mean the
    /// group has moved on without this member (its session expired while the coordinator was
    /// away), so its partitions may already be another member's; the error stops the loader and
    /// the restarted one joins anew and reads its work back from Kafka (recorded batches
    /// included). Carrying on would commit for partitions it no longer owns.
    async fn while_coordinator_moves<T: Send + 'static>(
        &self,
        what: &'static str,
        call: impl Fn(&StreamConsumer<LoaderContext>) -> KafkaResult<T> + Send + Sync + 'static,
    ) -> KafkaResult<T> {
        let call = Arc::new(call);
        let deadline = Instant::now() + COORDINATOR_MOVE;
        loop {
            let attempt = call.clone();
            match on_consumer(&self.consumer, move |c| attempt(c)).await {
                Err(e)
                    if group_error_code(&e).is_some_and(coordinator_moving)
                        && Instant::now() < deadline =>
                {
                    tracing::warn!(error = %e, what, "refused while the group coordinator moves; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                result => return result,
            }
        }
    }
}

/// The code of an error from a group call (an offset commit or a committed-offsets read).
fn group_error_code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::ConsumerCommit(code) | KafkaError::MetadataFetch(code) => Some(*code),
        _ => None,
    }
}

/// How long a commit waits for the group's coordinator to move: a dead broker is fenced after
/// its session (9 s by default) and a new coordinator loads the group's offsets.
const COORDINATOR_MOVE: Duration = Duration::from_secs(30);

/// The call did not happen because the group's coordinator is elsewhere, not known yet (librdkafka
/// answers `WaitingForCoordinator` at once while it looks for it, e.g. with the coordinator's node
/// dead) or not ready yet; the same call passes once librdkafka has found the new one. (Not a
/// fenced generation or an unknown member: those mean the partitions may have moved, which the
/// caller must see.)
fn coordinator_moving(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::CoordinatorNotAvailable
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::WaitingForCoordinator
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_moving_coordinator_makes_a_commit_try_again() {
        for code in [
            RDKafkaErrorCode::NotCoordinator,
            RDKafkaErrorCode::CoordinatorNotAvailable,
            RDKafkaErrorCode::CoordinatorLoadInProgress,
            RDKafkaErrorCode::WaitingForCoordinator,
        ] {
            assert!(coordinator_moving(code), "{code}");
        }
        // The partitions may have moved: the loader must re-read its assignment, not retry.
        for code in [
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::RebalanceInProgress,
            RDKafkaErrorCode::FencedInstanceId,
        ] {
            assert!(!coordinator_moving(code), "{code}");
        }
    }

    #[test]
    fn commits_and_committed_offset_reads_are_both_group_calls() {
        let code = RDKafkaErrorCode::WaitingForCoordinator;
        assert_eq!(
            group_error_code(&KafkaError::ConsumerCommit(code)),
            Some(code)
        );
        assert_eq!(
            group_error_code(&KafkaError::MetadataFetch(code)),
            Some(code)
        );
        assert_eq!(group_error_code(&KafkaError::Canceled), None);
    }
}
