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

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::anon_record::{transform, AddressKind};
use crate::config::Settings;
use crate::dead_letter::{HEADER_ERROR, HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC};
use crate::health::Health;
use crate::kafka::{client_config, describe};
use crate::txn::{with_retries, TxnError, TxnErrorAction};

/// `transactional.id` of an instance: stable across restarts, so a restarted instance fences its
/// own zombie, and distinct between concurrent instances.
pub fn transactional_id(group_id: &str, instance_id: &str) -> String {
    format!("{group_id}-{instance_id}")
}

/// The open transaction, if any.
#[derive(Debug, Default)]
struct TxnState {
    open: bool,
    started: Option<Instant>,
    records: usize,
    /// Next input offset to read, per input partition, for the records in this transaction.
    next_offsets: BTreeMap<i32, i64>,
    /// A fatal error seen in the rebalance callback, for the processing loop to act on.
    fatal: Option<KafkaError>,
}

struct Shared {
    producer: ThreadedProducer<DefaultProducerContext>,
    input_topic: String,
    state: Mutex<TxnState>,
    health: Arc<Health>,
    txn_id: String,
}

impl Shared {
    fn begin_if_needed(&self, state: &mut TxnState) -> Result<(), TxnError> {
        if state.open {
            return Ok(());
        }
        with_retries("begin_transaction", || self.producer.begin_transaction())
            .map_err(to_txn_error)?;
        state.open = true;
        state.started = Some(Instant::now());
        Ok(())
    }

    /// Sends the input offsets into the transaction and commits it. On an abortable error the
    /// transaction is aborted and `TxnError::Aborted` returned: the caller rewinds.
    fn commit(
        &self,
        consumer: &BaseConsumer<AnonContext>,
        state: &mut TxnState,
    ) -> Result<(), TxnError> {
        if !state.open {
            return Ok(());
        }
        let mut offsets = TopicPartitionList::new();
        for (&partition, &next) in &state.next_offsets {
            offsets
                .add_partition_offset(&self.input_topic, partition, Offset::Offset(next))
                .expect("a fresh list accepts any offset");
        }
        let result = (|| {
            if offsets.count() > 0 {
                // Only missing if the consumer has no group.id, which the config forbids.
                let group = consumer.group_metadata().ok_or((
                    TxnErrorAction::Fatal,
                    KafkaError::Global(RDKafkaErrorCode::InvalidGroupId),
                ))?;
                with_retries("send_offsets_to_transaction", || {
                    self.producer
                        .send_offsets_to_transaction(&offsets, &group, Timeout::Never)
                })?;
            }
            drain_in_flight(&self.producer).map_err(|e| (crate::txn::classify(&e), e))?;
            with_retries("commit_transaction", || {
                self.producer.commit_transaction(Timeout::Never)
            })
        })();
        let elapsed = state.started.map(|s| s.elapsed()).unwrap_or_default();
        match result {
            Ok(()) => {
                metrics::counter!("edgelog_anonymizer_transactions_committed_total").increment(1);
                metrics::histogram!("edgelog_anonymizer_transaction_seconds")
                    .record(elapsed.as_secs_f64());
                tracing::debug!(records = state.records, ?elapsed, "transaction committed");
                self.health.success();
                self.health.details(vec![
                    ("transactional id", self.txn_id.clone()),
                    (
                        "last transaction",
                        format!(
                            "{} records in {:.0} ms",
                            state.records,
                            elapsed.as_secs_f64() * 1e3
                        ),
                    ),
                ]);
                *state = TxnState {
                    fatal: state.fatal.take(),
                    ..TxnState::default()
                };
                Ok(())
            }
            Err((action, e)) => self.fail(state, action, e),
        }
    }

    /// Aborts the open transaction (used on lost partitions and after abortable errors).
    fn abort(&self, state: &mut TxnState, why: &str) -> Result<(), TxnError> {
        if !state.open {
            return Ok(());
        }
        tracing::warn!(records = state.records, why, "aborting transaction");
        // Let in-flight sends settle first: an abort racing the partition registrations of its own
        // transaction was answered INVALID_TXN_STATE (fatal) by Kafka 4.1 in our abort test.
        // Bounded: on a broken connection the abort proceeds and librdkafka purges.
        let _ = self.producer.flush(Duration::from_secs(5));
        let result = with_retries("abort_transaction", || {
            self.producer.abort_transaction(Timeout::Never)
        });
        metrics::counter!("edgelog_anonymizer_transactions_aborted_total").increment(1);
        *state = TxnState {
            fatal: state.fatal.take(),
            ..TxnState::default()
        };
        result.map_err(to_txn_error)
    }

    fn fail(
        &self,
        state: &mut TxnState,
        action: TxnErrorAction,
        e: KafkaError,
    ) -> Result<(), TxnError> {
        match action {
            TxnErrorAction::Abort | TxnErrorAction::Retry => {
                self.abort(state, "abortable error")?;
                Err(TxnError::Aborted(e))
            }
            TxnErrorAction::Fatal => Err(TxnError::Fatal(e)),
        }
    }
}

/// Waits until every produced message is acknowledged. rdkafka's `commit_transaction` flushes
/// first, but its flush polls in 100 ms steps while the `ThreadedProducer`'s own thread consumes
/// the delivery events, so each commit would sleep 100 ms. Zero-timeout flushes in a short loop
/// skip that wait (see docs/BENCHMARKS.md for the before/after).
fn drain_in_flight(producer: &ThreadedProducer<DefaultProducerContext>) -> Result<(), KafkaError> {
    loop {
        match producer.flush(Duration::ZERO) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
}

fn to_txn_error((action, e): (TxnErrorAction, KafkaError)) -> TxnError {
    match action {
        TxnErrorAction::Fatal => TxnError::Fatal(e),
        _ => TxnError::Aborted(e),
    }
}

/// Consumer context: finishes the open transaction inside the rebalance callback.
struct AnonContext {
    shared: Arc<Shared>,
}

impl ClientContext for AnonContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        crate::kafka::record_lag(&statistics, "edgelog_anonymizer_lag");
    }
}

impl ConsumerContext for AnonContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let shared = &self.shared;
        let mut state = shared.state.lock().expect("not poisoned");
        let outcome = if consumer.assignment_lost() {
            // Another member may already own these partitions: our output must not commit.
            shared.abort(&mut state, "partitions lost")
        } else {
            tracing::info!(
                partitions = tpl.count(),
                records = state.records,
                "partitions revoked; committing the open transaction"
            );
            shared.commit(consumer, &mut state)
        };
        match outcome {
            Ok(()) | Err(TxnError::Aborted(_)) => {}
            Err(TxnError::Fatal(e)) => state.fatal = Some(e),
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "partitions assigned");
        }
    }
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
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || process(&settings, &stop, health))
    };
    tokio::pin!(worker);
    tokio::select! {
        r = &mut worker => r?,
        _ = shutdown => {
            stop.store(true, Ordering::Relaxed);
            worker.await?
        }
    }
}

fn process(settings: &Settings, stop: &AtomicBool, health: Arc<Health>) -> anyhow::Result<()> {
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
    let mut consumer_config = client_config(
        &settings.kafka,
        &a.kafka_options,
        &[
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "10000"),
        ],
    );
    consumer_config
        .set("group.id", &a.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set(
            "statistics.interval.ms",
            crate::kafka::STATISTICS_INTERVAL_MS,
        );
    tracing::info!(producer = %describe(&producer_config), consumer = %describe(&consumer_config), "anonymizer starting");

    let producer: ThreadedProducer<DefaultProducerContext> = producer_config
        .create()
        .context("creating the transactional producer")?;
    with_retries("init_transactions", || {
        producer.init_transactions(a.txn_timeout)
    })
    .map_err(|(_, e)| e)
    .with_context(|| format!("init_transactions for transactional.id {txn_id}"))?;
    let shared = Arc::new(Shared {
        producer,
        input_topic: topics.input.clone(),
        state: Mutex::new(TxnState::default()),
        health: health.clone(),
        txn_id: txn_id.clone(),
    });
    health.details(vec![("transactional id", txn_id.clone())]);
    let consumer: BaseConsumer<AnonContext> = consumer_config
        .create_with_context(AnonContext {
            shared: shared.clone(),
        })
        .context("creating the consumer")?;
    let out_partitions = partition_count(&consumer, &topics.anonymized)?;
    consumer
        .subscribe(&[&topics.input])
        .context("subscribing")?;
    tracing::info!(%txn_id, input = %topics.input, output = %topics.anonymized, dead_letter = %topics.dead_letter, out_partitions, "anonymizer running");

    let mut abort_injection = AbortInjection::from_env();
    let result = (|| -> anyhow::Result<()> {
        while !stop.load(Ordering::Relaxed) {
            let polled = consumer.poll(Duration::from_millis(100));
            health.beat();
            let mut state = shared.state.lock().expect("not poisoned");
            if let Some(e) = state.fatal.take() {
                bail!("fatal transactional error during a rebalance: {e}");
            }
            let outcome = match polled {
                None => {
                    // Idle moments are cheap enough for the assignment's size (a local call).
                    health.assigned(consumer.assignment().map(|a| a.count()).unwrap_or(0));
                    if !state.open {
                        health.idle();
                    }
                    Ok(())
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    Ok(())
                }
                Some(Ok(msg)) => {
                    if !state.open {
                        health.work_pending();
                    }
                    handle(settings, &shared, &mut state, &msg, out_partitions)
                }
            };
            let outcome = outcome.and_then(|()| {
                let due = state.records >= a.txn_max_records
                    || state
                        .started
                        .is_some_and(|s| s.elapsed() >= a.txn_max_duration);
                if !due {
                    Ok(())
                } else if abort_injection.as_mut().is_some_and(AbortInjection::fires) {
                    shared.abort(&mut state, "ANONYMIZER_FAILPOINT")?;
                    Err(TxnError::Aborted(KafkaError::Global(
                        RDKafkaErrorCode::Fail,
                    )))
                } else {
                    shared.commit(&consumer, &mut state)
                }
            });
            match outcome {
                Ok(()) => {}
                Err(TxnError::Aborted(e)) => {
                    drop(state);
                    tracing::warn!(error = %e, "transaction aborted; rewinding to the committed offsets");
                    rewind(&consumer)?;
                }
                Err(TxnError::Fatal(e)) => {
                    bail!("fatal transactional error (fenced or broken producer): {e}")
                }
            }
        }
        let mut state = shared.state.lock().expect("not poisoned");
        match shared.commit(&consumer, &mut state) {
            Ok(()) | Err(TxnError::Aborted(_)) => Ok(()),
            Err(TxnError::Fatal(e)) => bail!("fatal transactional error at shutdown: {e}"),
        }
    })();
    // Leaving the group runs the revoke callback; nothing is open any more, so it only logs.
    consumer.unsubscribe();
    drop(consumer);
    if result.is_ok() {
        tracing::info!("anonymizer stopped cleanly");
    }
    result
}

/// Fault injection for tests: `ANONYMIZER_FAILPOINT=abort_every:<n>` aborts every n-th
/// transaction instead of committing it, exercising abort-and-rewind against a real broker (an
/// abortable error from the coordinator is hard to provoke on demand). Unset in production.
struct AbortInjection {
    every: u64,
    due: u64,
}

impl AbortInjection {
    fn from_env() -> Option<AbortInjection> {
        let value = std::env::var("ANONYMIZER_FAILPOINT").ok()?;
        let every = value
            .strip_prefix("abort_every:")
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("unknown ANONYMIZER_FAILPOINT {value:?} (abort_every:<n>)"));
        Some(AbortInjection { every, due: 0 })
    }

    fn fires(&mut self) -> bool {
        self.due += 1;
        self.due % self.every == 0
    }
}

/// Transforms one input message into the open transaction.
fn handle(
    settings: &Settings,
    shared: &Shared,
    state: &mut TxnState,
    msg: &BorrowedMessage<'_>,
    out_partitions: i32,
) -> Result<(), TxnError> {
    shared.begin_if_needed(state)?;
    let topics = &settings.topics;
    let payload = msg.payload().unwrap_or(&[]);
    metrics::counter!("edgelog_anonymizer_records_in_total").increment(1);
    match transform(
        payload,
        msg.partition(),
        msg.offset(),
        settings.anonymizer.ipv6_prefix_bits,
    ) {
        Ok((bytes, kind)) => {
            if kind == AddressKind::Invalid {
                metrics::counter!("edgelog_anonymizer_invalid_addresses_total").increment(1);
            }
            // Output partition follows the input partition, so per-partition order is kept.
            let record = BaseRecord::<[u8], [u8]>::to(&topics.anonymized)
                .partition(msg.partition().rem_euclid(out_partitions))
                .payload(&bytes[..]);
            send(shared, record)?;
            metrics::counter!("edgelog_anonymizer_records_out_total").increment(1);
        }
        Err(e) => {
            let error = e.to_string();
            let partition = msg.partition().to_string();
            let offset = msg.offset().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_TOPIC,
                    value: Some(msg.topic()),
                })
                .insert(Header {
                    key: HEADER_PARTITION,
                    value: Some(&partition),
                })
                .insert(Header {
                    key: HEADER_OFFSET,
                    value: Some(&offset),
                })
                .insert(Header {
                    key: HEADER_ERROR,
                    value: Some(&error),
                });
            let mut record = BaseRecord::<[u8], [u8]>::to(&topics.dead_letter)
                .payload(payload)
                .headers(headers);
            if let Some(key) = msg.key() {
                record = record.key(key);
            }
            send(shared, record)?;
            metrics::counter!("edgelog_anonymizer_dead_letter_total").increment(1);
            tracing::debug!(partition = msg.partition(), offset = msg.offset(), %error, "dead-lettered");
        }
    }
    state.next_offsets.insert(msg.partition(), msg.offset() + 1);
    state.records += 1;
    Ok(())
}

fn send(shared: &Shared, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), TxnError> {
    loop {
        match shared.producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // librdkafka's background thread drains the queue.
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(TxnError::Aborted(e)),
        }
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
