//! Stage one: consume `http_log`, anonymize, produce `http_log_anon`, exactly once.
//!
//! Every output record (anonymized or dead-lettered) and the input offsets that produced it are
//! written in one Kafka transaction (KIP-98), with the consumer's current group metadata (KIP-447),
//! so a crash at any moment either keeps both or neither. A transaction closes after
//! `txn_max_records` input records or `txn_max_duration`, whichever comes first.
//!
//! All Kafka calls run on one dedicated thread: rdkafka's transaction calls block, and the
//! rebalance callback (which finishes the open transaction before partitions are revoked) runs
//! inside `poll` on that same thread, so the transaction state needs no cross-thread protocol.
//!
//! Files: this one starts the stage and runs its loop (a `Worker`: poll → take the record into
//! the open transaction → close it when due; abort and rewind after an abortable error);
//! `transaction.rs` the transactional producer and the rebalance callback; `output.rs` what one
//! record puts into the transaction (the per-record decision itself is
//! [`crate::anon_record::process`]); `limits.rs` the record size limit read at start-up;
//! `failpoint.rs` fault injection for tests; `watchdog.rs` the progress stamp and the watchdog that
//! ends the stage when a Kafka call overruns every deadline.

mod failpoint;
mod limits;
mod output;
mod transaction;
mod watchdog;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::anon_record::StageOne;
use crate::config::Settings;
use crate::health::Health;
use crate::kafka::{
    client_config, describe, exactly_once_consumer, means_cluster_unreachable,
    permanent_error_message, permanent_failure, KafkaWatch, WatchedContext,
};
use crate::txn::{TxnError, TxnErrorAction};
use crate::validate::Policy;
use failpoint::{AbortInjection, Failpoint};
pub use limits::{effective_limit, MIN_MESSAGE_BYTES};
use limits::{message_limit, NoConfiguration};
use output::handle;
use transaction::{AnonContext, TxnProducer, TxnState};
pub use watchdog::watchdog_limit;
use watchdog::Progress;

/// `transactional.id` of an instance: stable across restarts, so a restarted instance fences its
/// own zombie, and distinct between concurrent instances.
pub fn transactional_id(group_id: &str, instance_id: &str) -> String {
    format!("{group_id}-{instance_id}")
}

/// Runs stage one until `shutdown` completes (then commits the open transaction and leaves the
/// group) or a fatal error occurs.
pub async fn run(settings: &Settings, shutdown: impl Future) -> anyhow::Result<()> {
    run_with_health(settings, Health::new(stall_limit(settings)), shutdown).await
}

/// Work waiting this long without a committed transaction makes the anonymizer unready: several
/// transaction periods, plus time for a rebalance.
pub fn stall_limit(settings: &Settings) -> Duration {
    settings.anonymizer.txn_max_duration * 3 + Duration::from_secs(30)
}

/// [`run`], reporting to `health` (served by [`crate::telemetry::start_http`]).
pub async fn run_with_health(
    settings: &Settings,
    health: Arc<Health>,
    shutdown: impl Future,
) -> anyhow::Result<()> {
    let settings = settings.clone();
    let limit_stuck = watchdog_limit(&settings);
    let progress = Arc::new(Progress::default());
    let watch = Arc::new(KafkaWatch::new(Some(health.clone())));
    tokio::pin!(shutdown);
    let limit = tokio::select! {
        limit = wait_for_message_limit(&settings, &watch) => limit?,
        _ = &mut shutdown => {
            tracing::info!("stopped before the cluster answered");
            return Ok(());
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (stop, progress) = (stop.clone(), progress.clone());
        tokio::task::spawn_blocking(move || {
            process(&settings, limit, &stop, health, watch, progress)
        })
    };
    tokio::pin!(worker);
    tokio::select! {
        r = &mut worker => r?,
        // The thread cannot be interrupted inside librdkafka: the stage ends around it (the
        // binary exits non-zero), and the restarted instance fences it.
        e = watchdog::watch(&progress, limit_stuck) => {
            stop.store(true, Ordering::Relaxed);
            Err(e)
        }
        _ = shutdown => {
            stop.store(true, Ordering::Relaxed);
            // The last commit waits for the cluster; with the cluster gone it would wait out
            // the transaction timeout. Leaving it open is safe: the coordinator aborts it on
            // timeout, or the restarted instance fences and aborts it at once.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut worker).await {
                Ok(r) => r?,
                Err(_) => {
                    tracing::warn!(grace = ?SHUTDOWN_GRACE, "the last transaction did not finish in time; exiting with it open (it will be aborted)");
                    Ok(())
                }
            }
        }
    }
}

/// How long a stopping anonymizer waits for its last transaction to commit.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Per attempt of a start-up call to the cluster: short, so a stop request is seen soon.
pub(super) const STARTUP_ATTEMPT: Duration = Duration::from_secs(5);

/// [`message_limit`], retried while the cluster cannot be reached (the stage stays unready, with
/// the reason on `/readyz`); other errors (a missing topic, limits that cannot work) are final, and
/// so is a permanent refusal librdkafka reported meanwhile (credentials, ACLs, certificate).
async fn wait_for_message_limit(
    settings: &Settings,
    watch: &Arc<KafkaWatch>,
) -> anyhow::Result<usize> {
    loop {
        match message_limit(settings, watch).await {
            Ok(limit) => {
                watch.reachable();
                return Ok(limit);
            }
            Err(e) if unreachable_cluster(&e) || e.is::<NoConfiguration>() => {
                watch.check()?;
                watch.unreachable(&e, "reading the topics' max.message.bytes at start-up");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(with_cause(e)),
        }
    }
}

/// True if `e` is a Kafka error that means "no answer from the cluster", not a refusal.
fn unreachable_cluster(e: &anyhow::Error) -> bool {
    let code = match e.downcast_ref::<KafkaError>() {
        Some(KafkaError::AdminOp(code)) => Some(*code),
        Some(other) => other.rdkafka_error_code(),
        None => None,
    };
    code.is_some_and(|c| {
        means_cluster_unreachable(c)
            || matches!(
                c,
                RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::RequestTimedOut
            )
    })
}

/// `init_transactions` in short attempts until it succeeds (`Ok(true)`), `stop` is set
/// (`Ok(false)`) or it fails for good. Retriable failures while the cluster is away are the
/// expected case, reported through `watch`.
fn init_transactions(
    producer: &ThreadedProducer<WatchedContext>,
    watch: &KafkaWatch,
    stop: &AtomicBool,
) -> anyhow::Result<bool> {
    while !stop.load(Ordering::Relaxed) {
        match producer.init_transactions(STARTUP_ATTEMPT) {
            Ok(()) => {
                watch.reachable();
                return Ok(true);
            }
            Err(e) if crate::txn::classify(&e) == TxnErrorAction::Retry => {
                watch.check()?;
                watch.unreachable(&e, "init_transactions");
            }
            Err(e) => return Err(with_cause(e.into())),
        }
    }
    Ok(false)
}

/// `e` as an error whose message names a permanent cause (credentials, ACLs, certificate) first.
fn with_cause(e: anyhow::Error) -> anyhow::Error {
    match e
        .downcast_ref::<KafkaError>()
        .and_then(permanent_error_message)
    {
        Some(message) => anyhow::anyhow!(message),
        None => e,
    }
}

/// Stage one on its thread: start, run the loop until `stop` is set or a fatal error, finish.
fn process(
    settings: &Settings,
    limit: usize,
    stop: &AtomicBool,
    health: Arc<Health>,
    watch: Arc<KafkaWatch>,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    let Some(mut worker) = Worker::start(settings, limit, stop, health, watch, progress)? else {
        return Ok(()); // stopped while waiting for the cluster
    };
    let result = worker.run(stop);
    worker.leave(result)
}

/// The running stage: its consumer, its transactional producer and what it decides by.
struct Worker<'a> {
    settings: &'a Settings,
    stage: StageOne,
    txn: Arc<TxnProducer>,
    consumer: BaseConsumer<AnonContext>,
    out_partitions: i32,
    health: Arc<Health>,
    progress: Arc<Progress>,
    abort_injection: Option<AbortInjection>,
}

impl<'a> Worker<'a> {
    /// Creates the producer and consumer, initialises transactions (waiting for the cluster
    /// until `stop`: `None` then) and subscribes.
    fn start(
        settings: &'a Settings,
        limit: usize,
        stop: &AtomicBool,
        health: Arc<Health>,
        watch: Arc<KafkaWatch>,
        progress: Arc<Progress>,
    ) -> anyhow::Result<Option<Worker<'a>>> {
        let a = &settings.anonymizer;
        let topics = &settings.topics;
        let txn_id = transactional_id(&a.group_id, &a.instance_id);
        let txn_timeout_ms = a.txn_timeout.as_millis().to_string();

        let mut producer_config = client_config(
            &settings.kafka,
            &a.kafka_options,
            &[
                ("linger.ms", "5"),
                ("compression.type", "lz4"),
                ("batch.size", "1000000"),
            ],
        );
        // The guarantee depends on these; they are not overridable.
        producer_config
            .set("transactional.id", &txn_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("transaction.timeout.ms", &txn_timeout_ms)
            .set("message.timeout.ms", &txn_timeout_ms);
        // librdkafka fills a batch up to message.max.bytes: capped at the smallest topic limit,
        // no batch is ever refused by a broker for its size (which would abort every
        // transaction).
        let batch_size = producer_config
            .get("batch.size")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(limit)
            .min(limit);
        producer_config
            .set("message.max.bytes", limit.to_string())
            .set("batch.size", batch_size.to_string());
        let mut consumer_config = client_config(
            &settings.kafka,
            &a.kafka_options,
            &[
                ("auto.offset.reset", "earliest"),
                ("session.timeout.ms", "10000"),
            ],
        );
        exactly_once_consumer(&mut consumer_config, &a.group_id);
        tracing::info!(producer = %describe(&producer_config), consumer = %describe(&consumer_config), "anonymizer starting");

        let producer: ThreadedProducer<WatchedContext> = producer_config
            .create_with_context(WatchedContext(watch.clone()))
            .context("creating the transactional producer")?;
        if !init_transactions(&producer, &watch, stop)
            .with_context(|| format!("init_transactions for transactional.id {txn_id}"))?
        {
            return Ok(None);
        }
        let failpoint = Failpoint::from_env();
        let txn = Arc::new(TxnProducer {
            producer,
            watch,
            input_topic: topics.input.clone(),
            state: Mutex::new(TxnState::default()),
            health: health.clone(),
            txn_id: txn_id.clone(),
            txn_timeout: a.txn_timeout,
            progress: progress.clone(),
            send_error_at: match failpoint {
                Some(Failpoint::SendErrorAt(n)) => Some(n),
                _ => None,
            },
            sends: Default::default(),
        });
        health.details(vec![("transactional id", txn_id.clone())]);
        let consumer: BaseConsumer<AnonContext> = consumer_config
            .create_with_context(AnonContext { txn: txn.clone() })
            .context("creating the consumer")?;
        let out_partitions = partition_count(&consumer, &topics.anonymized)?;
        consumer
            .subscribe(&[&topics.input])
            .context("subscribing")?;
        tracing::info!(%txn_id, input = %topics.input, output = %topics.anonymized, dead_letter = %topics.dead_letter, out_partitions, message_max_bytes = limit, url_query = a.url_query.label(), "anonymizer running");
        Ok(Some(Worker {
            settings,
            stage: StageOne {
                ipv6_prefix_bits: a.ipv6_prefix_bits,
                policy: Policy::from_settings(settings),
                url_query: a.url_query.clone(),
                max_message_bytes: limit,
            },
            txn,
            consumer,
            out_partitions,
            health,
            progress,
            abort_injection: match failpoint {
                Some(Failpoint::AbortEvery(every)) => Some(AbortInjection { every, due: 0 }),
                _ => None,
            },
        }))
    }

    /// Poll, put the record into the open transaction, close the transaction when it is due;
    /// after an abortable error, abort and rewind. Until `stop` or a fatal error.
    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        // Its own handle: the state's guard borrows it while `close_if_due` borrows `self` mutably.
        let txn = self.txn.clone();
        while !stop.load(Ordering::Relaxed) {
            let polled = self.consumer.poll(Duration::from_millis(100));
            // Credentials, ACLs, certificate: waiting would not change them.
            self.txn.watch.check()?;
            if let Some(Err(e)) = &polled {
                if let Some(message) = permanent_error_message(e) {
                    bail!("{message}");
                }
            }
            self.health.beat();
            self.progress.tick();
            let mut state = txn.state.lock().expect("not poisoned");
            if let Some(e) = state.fatal.take() {
                bail!("fatal transactional error during a rebalance: {e}");
            }
            let outcome = self
                .take(&mut state, polled)
                .and_then(|()| self.close_if_due(&mut state));
            match outcome {
                Ok(()) => {}
                Err(TxnError::Aborted(e)) => {
                    // Never rewind with the transaction open: what it already holds would
                    // commit together with the second copy of the same input.
                    if let Err(TxnError::Fatal(f)) = txn.abort(&mut state, "abortable error") {
                        bail!("fatal transactional error while aborting: {f}");
                    }
                    // A refused write (a missing ACL) would be refused again after the rewind.
                    if let Some(message) = permanent_error_message(&e) {
                        bail!("{message}");
                    }
                    drop(state);
                    tracing::warn!(error = %e, "transaction aborted; rewinding to the committed offsets");
                    self.progress
                        .enter("rewinding to the committed offsets", None);
                    rewind(&self.consumer)?;
                }
                Err(TxnError::Fatal(e)) => match permanent_error_message(&e) {
                    Some(message) => bail!("{message}"),
                    None => bail!("fatal transactional error (fenced or broken producer): {e}"),
                },
            }
        }
        Ok(())
    }

    /// What one poll returned goes into the open transaction (a record) or is reported.
    fn take(
        &self,
        state: &mut TxnState,
        polled: Option<KafkaResult<BorrowedMessage<'_>>>,
    ) -> Result<(), TxnError> {
        match polled {
            None => {
                // Idle moments are cheap enough for the assignment's size (a local call).
                let assigned = self.consumer.assignment().map(|a| a.count()).unwrap_or(0);
                self.health.assigned(assigned);
                if !state.open {
                    self.health.idle();
                }
                Ok(())
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                Ok(())
            }
            Some(Ok(msg)) => {
                if !state.open {
                    self.health.work_pending();
                }
                let (settings, stage) = (self.settings, &self.stage);
                handle(settings, stage, &self.txn, state, &msg, self.out_partitions)
            }
        }
    }

    /// Commits the open transaction after `txn_max_records` records or `txn_max_duration`.
    fn close_if_due(&mut self, state: &mut TxnState) -> Result<(), TxnError> {
        let a = &self.settings.anonymizer;
        let due = state.records >= a.txn_max_records
            || state
                .started
                .is_some_and(|s| s.elapsed() >= a.txn_max_duration);
        if !due {
            Ok(())
        } else if self
            .abort_injection
            .as_mut()
            .is_some_and(AbortInjection::fires)
        {
            self.txn.abort(state, "ANONYMIZER_FAILPOINT")?;
            Err(TxnError::Aborted(KafkaError::Global(
                RDKafkaErrorCode::Fail,
            )))
        } else {
            self.txn.commit(&self.consumer, state)
        }
    }

    /// Commits what is open (unless `result` is already an error) and leaves the group.
    fn leave(self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        let result = result.and_then(|()| {
            let mut state = self.txn.state.lock().expect("not poisoned");
            match self.txn.commit(&self.consumer, &mut state) {
                Ok(()) | Err(TxnError::Aborted(_)) => Ok(()),
                Err(TxnError::Fatal(e)) => bail!("fatal transactional error at shutdown: {e}"),
            }
        });
        // Leaving the group runs the revoke callback; nothing is open any more, so it only logs.
        self.consumer.unsubscribe();
        drop(self.consumer);
        if result.is_ok() {
            tracing::info!("anonymizer stopped cleanly");
        }
        result
    }
}

/// After an abort, the consumer's position is past records whose output was discarded: seek every
/// assigned partition back to its committed offset.
fn rewind(consumer: &BaseConsumer<AnonContext>) -> anyhow::Result<()> {
    let assignment = consumer.assignment()?;
    let committed = consumer.committed_offsets(assignment, Duration::from_secs(30))?;
    let mut positions = TopicPartitionList::new();
    for e in committed.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            // No committed offset yet: auto.offset.reset=earliest means the beginning.
            _ => Offset::Beginning,
        };
        positions.add_partition_offset(e.topic(), e.partition(), offset)?;
    }
    for result in consumer
        .seek_partitions(positions, Duration::from_secs(30))?
        .elements()
    {
        if let Err(e) = result.error() {
            bail!("rewinding {}[{}]: {e}", result.topic(), result.partition());
        }
    }
    Ok(())
}

fn partition_count(consumer: &BaseConsumer<AnonContext>, topic: &str) -> anyhow::Result<i32> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("fetching metadata of {topic}"))?;
    if let Some(code) = metadata.topics().first().and_then(|t| t.error()) {
        let code = RDKafkaErrorCode::from(code);
        if let Some(cause) = permanent_failure(Some(code), "") {
            bail!(
                "{}",
                cause.message(&format!("fetching metadata of {topic}: {code}"))
            );
        }
    }
    let count = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if count == 0 {
        bail!("topic {topic} does not exist (run `edgelog setup`)");
    }
    Ok(count as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactional_id_is_deterministic_per_instance() {
        assert_eq!(
            transactional_id("edgelog-anonymizer", "0"),
            "edgelog-anonymizer-0"
        );
        assert_ne!(transactional_id("g", "0"), transactional_id("g", "1"));
    }
}
