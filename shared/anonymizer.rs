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
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::anon_record::{process as decide, AddressKind, Outcome, StageOne};
use crate::config::Settings;
use crate::dead_letter::{
    error_text, DeadLetterPayload, Reason, ENVELOPE_OVERHEAD, HEADER_ERROR, HEADER_OFFSET,
    HEADER_PARTITION, HEADER_REASON, HEADER_STAGE, HEADER_TOPIC,
};
use crate::health::Health;
use crate::kafka::{
    client_config, describe, means_cluster_unreachable, permanent_error_message, permanent_failure,
    KafkaWatch, WatchedContext,
};
use crate::txn::{classify_produce, with_retries, ProduceErrorAction, TxnError, TxnErrorAction};
use crate::validate::Policy;

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
    producer: ThreadedProducer<WatchedContext>,
    watch: Arc<KafkaWatch>,
    input_topic: String,
    state: Mutex<TxnState>,
    health: Arc<Health>,
    txn_id: String,
    /// `ANONYMIZER_FAILPOINT=send_error_at:<n>`: the n-th `send()` fails (tests only).
    send_error_at: Option<u64>,
    sends: std::sync::atomic::AtomicU64,
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
                self.watch.reachable();
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
fn drain_in_flight(producer: &ThreadedProducer<WatchedContext>) -> Result<(), KafkaError> {
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

/// `e` as an error whose message names a permanent cause (credentials, ACLs, certificate) first.
fn with_cause(e: KafkaError) -> anyhow::Error {
    match permanent_error_message(&e) {
        Some(message) => anyhow::anyhow!(message),
        None => e.into(),
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
        self.shared.watch.observe(&statistics);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.shared.watch.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.watch.error(&error, reason);
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
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || process(&settings, limit, &stop, health, watch))
    };
    tokio::pin!(worker);
    tokio::select! {
        r = &mut worker => r?,
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
const STARTUP_ATTEMPT: Duration = Duration::from_secs(5);

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
            Err(e) => {
                return Err(
                    match e
                        .downcast_ref::<KafkaError>()
                        .and_then(permanent_error_message)
                    {
                        Some(message) => anyhow::anyhow!(message),
                        None => e,
                    },
                )
            }
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
            Err(e) => return Err(with_cause(e)),
        }
    }
    Ok(false)
}

fn process(
    settings: &Settings,
    limit: usize,
    stop: &AtomicBool,
    health: Arc<Health>,
    watch: Arc<KafkaWatch>,
) -> anyhow::Result<()> {
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
    // librdkafka fills a batch up to message.max.bytes: capped at the smallest topic limit, no
    // batch is ever refused by a broker for its size (which would abort every transaction).
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

    let producer: ThreadedProducer<WatchedContext> = producer_config
        .create_with_context(WatchedContext(watch.clone()))
        .context("creating the transactional producer")?;
    if !init_transactions(&producer, &watch, stop)
        .with_context(|| format!("init_transactions for transactional.id {txn_id}"))?
    {
        return Ok(()); // stopped while waiting for the cluster
    }
    let failpoint = Failpoint::from_env();
    let shared = Arc::new(Shared {
        producer,
        watch: watch.clone(),
        input_topic: topics.input.clone(),
        state: Mutex::new(TxnState::default()),
        health: health.clone(),
        txn_id: txn_id.clone(),
        send_error_at: match failpoint {
            Some(Failpoint::SendErrorAt(n)) => Some(n),
            _ => None,
        },
        sends: Default::default(),
    });
    let stage = StageOne {
        ipv6_prefix_bits: a.ipv6_prefix_bits,
        policy: Policy::from_settings(settings),
        max_message_bytes: limit,
    };
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
    tracing::info!(%txn_id, input = %topics.input, output = %topics.anonymized, dead_letter = %topics.dead_letter, out_partitions, message_max_bytes = limit, "anonymizer running");

    let mut abort_injection = match failpoint {
        Some(Failpoint::AbortEvery(every)) => Some(AbortInjection { every, due: 0 }),
        _ => None,
    };
    let result = (|| -> anyhow::Result<()> {
        while !stop.load(Ordering::Relaxed) {
            let polled = consumer.poll(Duration::from_millis(100));
            // Credentials, ACLs, certificate: waiting would not change them.
            watch.check()?;
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
                    if let Some(message) = permanent_error_message(&e) {
                        bail!("{message}");
                    }
                    tracing::warn!(error = %e, "consumer error");
                    Ok(())
                }
                Some(Ok(msg)) => {
                    if !state.open {
                        health.work_pending();
                    }
                    handle(settings, &stage, &shared, &mut state, &msg, out_partitions)
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
                    // Never rewind with the transaction open: what it already holds would
                    // commit together with the second copy of the same input.
                    if let Err(TxnError::Fatal(f)) = shared.abort(&mut state, "abortable error") {
                        bail!("fatal transactional error while aborting: {f}");
                    }
                    // A refused write (a missing ACL) would be refused again after the rewind.
                    if let Some(message) = permanent_error_message(&e) {
                        bail!("{message}");
                    }
                    drop(state);
                    tracing::warn!(error = %e, "transaction aborted; rewinding to the committed offsets");
                    rewind(&consumer)?;
                }
                Err(TxnError::Fatal(e)) => match permanent_error_message(&e) {
                    Some(message) => bail!("{message}"),
                    None => bail!("fatal transactional error (fenced or broken producer): {e}"),
                },
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

/// Fault injection for tests, from `ANONYMIZER_FAILPOINT` (unset in production):
/// - `abort_every:<n>` aborts every n-th transaction instead of committing it, exercising
///   abort-and-rewind against a real broker (an abortable error from the coordinator is hard to
///   provoke on demand);
/// - `send_error_at:<n>` makes the n-th `send()` of the process fail with an abortable error, in
///   the middle of a transaction that already holds records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failpoint {
    AbortEvery(u64),
    SendErrorAt(u64),
}

impl Failpoint {
    fn from_env() -> Option<Failpoint> {
        let value = std::env::var("ANONYMIZER_FAILPOINT").ok()?;
        Some(Failpoint::parse(&value).unwrap_or_else(|| {
            panic!("unknown ANONYMIZER_FAILPOINT {value:?} (abort_every:<n> or send_error_at:<n>)")
        }))
    }

    fn parse(value: &str) -> Option<Failpoint> {
        let (kind, n) = value.split_once(':')?;
        let n = n.parse().ok().filter(|&n| n > 0)?;
        match kind {
            "abort_every" => Some(Failpoint::AbortEvery(n)),
            "send_error_at" => Some(Failpoint::SendErrorAt(n)),
            _ => None,
        }
    }
}

struct AbortInjection {
    every: u64,
    due: u64,
}

impl AbortInjection {
    fn fires(&mut self) -> bool {
        self.due += 1;
        self.due % self.every == 0
    }
}

/// Transforms one input message into the open transaction: its anonymized record, or its dead
/// letter, and its offset.
fn handle(
    settings: &Settings,
    stage: &StageOne,
    shared: &Shared,
    state: &mut TxnState,
    msg: &BorrowedMessage<'_>,
    out_partitions: i32,
) -> Result<(), TxnError> {
    shared.begin_if_needed(state)?;
    let payload = msg.payload().unwrap_or(&[]);
    metrics::counter!("edgelog_anonymizer_records_in_total").increment(1);
    let outcome = decide(
        payload,
        msg.partition(),
        msg.offset(),
        stage,
        crate::clock::now_epoch_ms(),
    );
    match outcome {
        Outcome::Record { bytes, kind } => {
            if kind == AddressKind::Invalid {
                metrics::counter!("edgelog_anonymizer_invalid_addresses_total").increment(1);
            }
            // Output partition follows the input partition, so per-partition order is kept.
            let record = BaseRecord::<[u8], [u8]>::to(&settings.topics.anonymized)
                .partition(msg.partition().rem_euclid(out_partitions))
                .payload(&bytes[..]);
            match send(shared, record)? {
                None => metrics::counter!("edgelog_anonymizer_records_out_total").increment(1),
                // The pre-check let it through, yet the client refused it: still this record's
                // fault alone.
                Some((reason, e)) => {
                    dead_letter(settings, stage, shared, msg, reason, &e.to_string())?
                }
            }
        }
        Outcome::DeadLetter { reason, error } => {
            dead_letter(settings, stage, shared, msg, reason, &error)?
        }
    }
    state.next_offsets.insert(msg.partition(), msg.offset() + 1);
    state.records += 1;
    Ok(())
}

/// A key longer than this is left off the dead letter: it is not needed to find the record
/// (the headers name its position) and must not push the envelope past the limit.
const MAX_DEAD_LETTER_KEY_BYTES: usize = 1024;

/// Sends `msg`'s dead letter: the original payload or a bounded envelope of it, with headers
/// naming its position, the reason and the stage.
fn dead_letter(
    settings: &Settings,
    stage: &StageOne,
    shared: &Shared,
    msg: &BorrowedMessage<'_>,
    reason: Reason,
    error: &str,
) -> Result<(), TxnError> {
    let payload = msg.payload().unwrap_or(&[]);
    let envelope = DeadLetterPayload::of(payload, stage.max_message_bytes);
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let mut headers = OwnedHeaders::new();
    for (key, value) in [
        (HEADER_TOPIC, msg.topic()),
        (HEADER_PARTITION, &partition),
        (HEADER_OFFSET, &offset),
        (HEADER_ERROR, error_text(error)),
        (HEADER_REASON, reason.label()),
        (HEADER_STAGE, "anonymizer"),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    for (key, value) in envelope.headers() {
        headers = headers.insert(Header {
            key,
            value: Some(&value),
        });
    }
    let mut record = BaseRecord::<[u8], [u8]>::to(&settings.topics.dead_letter)
        .payload(&envelope.bytes[..])
        .headers(headers);
    if let Some(key) = msg.key().filter(|k| k.len() <= MAX_DEAD_LETTER_KEY_BYTES) {
        record = record.key(key);
    }
    if let Some((_, e)) = send(shared, record)? {
        // The envelope is bounded to fit; a refusal means the limits read at start-up are wrong.
        return Err(TxnError::Fatal(e));
    }
    metrics::counter!("edgelog_anonymizer_dead_letter_total").increment(1);
    metrics::counter!("edgelog_dead_letters_total", "stage" => "anonymizer", "reason" => reason.label())
        .increment(1);
    tracing::debug!(partition = msg.partition(), offset = msg.offset(), %reason, error = error_text(error), "dead-lettered");
    Ok(())
}

/// Enqueues `record` into the open transaction. `Ok(None)`: sent. `Ok(Some(..))`: refused for
/// this record alone (the caller dead-letters it). `Err(Aborted)`: the caller aborts and rewinds.
fn send(
    shared: &Shared,
    mut record: BaseRecord<'_, [u8], [u8]>,
) -> Result<Option<(Reason, KafkaError)>, TxnError> {
    let n = shared.sends.fetch_add(1, Ordering::Relaxed) + 1;
    if shared.send_error_at == Some(n) {
        tracing::warn!(send = n, "ANONYMIZER_FAILPOINT: failing this send");
        return Err(TxnError::Aborted(KafkaError::MessageProduction(
            RDKafkaErrorCode::Fail,
        )));
    }
    loop {
        let e = match shared.producer.send(record) {
            Ok(()) => return Ok(None),
            Err((e, r)) => {
                record = r;
                e
            }
        };
        let action = match &e {
            KafkaError::MessageProduction(code) => classify_produce(*code),
            _ => ProduceErrorAction::Abort,
        };
        match action {
            // librdkafka's background thread drains the queue.
            ProduceErrorAction::Wait => std::thread::sleep(Duration::from_millis(1)),
            ProduceErrorAction::DeadLetter(reason) => return Ok(Some((reason, e))),
            ProduceErrorAction::Abort => return Err(TxnError::Aborted(e)),
            ProduceErrorAction::Fatal => return Err(TxnError::Fatal(e)),
        }
    }
}

/// The `message.max.bytes` stage one works with: the smallest of the producer's setting and the
/// output and dead-letter topics' `max.message.bytes` (read from the broker), or an error naming
/// every value and key when even a dead-letter envelope cannot fit.
async fn message_limit(settings: &Settings, watch: &Arc<KafkaWatch>) -> anyhow::Result<usize> {
    let (key, producer) = producer_message_max_bytes(settings)?;
    let topics = [&settings.topics.anonymized, &settings.topics.dead_letter];
    let admin: AdminClient<WatchedContext> =
        client_config(&settings.kafka, &settings.anonymizer.kafka_options, &[])
            .create_with_context(WatchedContext(watch.clone()))
            .context("creating the Kafka admin client")?;
    let specifiers: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(STARTUP_ATTEMPT));
    // The Kafka error stays the outermost error: the caller tells "cluster unreachable" by it.
    let described = admin.describe_configs(&specifiers, &opts).await;
    // Why it timed out, if it did (a refused password, an untrusted certificate) is there.
    crate::kafka::serve_admin_events(admin.inner());
    let described = described?;
    let mut limits = Vec::new();
    for (topic, result) in topics.iter().zip(described) {
        let resource = result.map_err(|code| match permanent_failure(Some(code), "") {
            Some(cause) => anyhow::anyhow!(
                cause.message(&format!("describing topic {topic}'s configuration: {code}"))
            ),
            None => anyhow::anyhow!("describing topic {topic}: {code} (run `edgelog setup`)"),
        })?;
        if resource.entries.is_empty() {
            // rust-rdkafka 0.39 drops DescribeConfigs' per-topic error and returns no entries
            // instead: ask the topic's metadata why.
            return Err(empty_configuration(settings, topic).await);
        }
        let value = resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<usize>().ok())
            .with_context(|| format!("topic {topic} reports no max.message.bytes"))?;
        limits.push((topic.to_string(), value));
    }
    let limit = effective_limit((&key, producer), &limits).map_err(anyhow::Error::msg)?;
    tracing::info!(limit, producer, ?limits, "effective message.max.bytes");
    Ok(limit)
}

/// Kafka answered DescribeConfigs for a topic that exists and may be described, with no settings:
/// seen once for a topic created a moment before, and what a user without DESCRIBE_CONFIGS on it
/// gets (rust-rdkafka drops the error code). Retried like an unreachable cluster, the reason shown.
#[derive(Debug, thiserror::Error)]
#[error("Kafka returned no configuration for topic {0}: retrying (if this persists, the user lacks the DESCRIBE_CONFIGS ACL on it)")]
struct NoConfiguration(String);

/// Why DescribeConfigs returned nothing for `topic`, from its metadata: a permanent refusal (no
/// ACL at all on the topic), a missing topic, or [`NoConfiguration`] (retried).
async fn empty_configuration(settings: &Settings, topic: &str) -> anyhow::Error {
    let (s, t) = (settings.clone(), topic.to_string());
    let looked =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Option<RDKafkaErrorCode>> {
            let client: rdkafka::producer::BaseProducer =
                client_config(&s.kafka, &s.anonymizer.kafka_options, &[]).create()?;
            let metadata = client.client().fetch_metadata(Some(&t), STARTUP_ATTEMPT)?;
            Ok(metadata
                .topics()
                .first()
                .and_then(|m| m.error())
                .map(RDKafkaErrorCode::from))
        })
        .await;
    match looked {
        Ok(Ok(Some(code))) => match permanent_failure(Some(code), "") {
            Some(cause) => anyhow::anyhow!(cause.message(&format!("topic {topic}: {code}"))),
            None => anyhow::anyhow!("describing topic {topic}: {code} (run `edgelog setup`)"),
        },
        Ok(Ok(None)) => NoConfiguration(topic.to_string()).into(),
        Ok(Err(e)) => e,
        Err(e) => e.into(),
    }
}

/// librdkafka's default `message.max.bytes`.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The producer's configured `message.max.bytes` and the settings key it came from.
fn producer_message_max_bytes(settings: &Settings) -> anyhow::Result<(String, usize)> {
    let from = |section: &str, v: &str| {
        v.parse::<usize>()
            .map(|n| (format!("{section}.message.max.bytes"), n))
            .with_context(|| format!("`{section}.message.max.bytes` {v:?} is not a number"))
    };
    if let Some(v) = settings.anonymizer.kafka_options.get("message.max.bytes") {
        return from("anonymizer.kafka_options", v);
    }
    if let Some(v) = settings.kafka.options.get("message.max.bytes") {
        return from("kafka.options", v);
    }
    Ok((
        "message.max.bytes (librdkafka default)".into(),
        LIBRDKAFKA_MESSAGE_MAX_BYTES,
    ))
}

/// Smallest effective limit stage one accepts: an envelope's headers and framing plus 1 KiB of
/// the original bytes, so that a dead letter still shows what the record was.
pub const MIN_MESSAGE_BYTES: usize = ENVELOPE_OVERHEAD + 1024;

/// Pure: the smallest of the producer's limit and the topics' limits, if it can hold an
/// envelope; otherwise a message naming each value and where it comes from.
pub fn effective_limit(
    (producer_key, producer): (&str, usize),
    topics: &[(String, usize)],
) -> Result<usize, String> {
    let limit = topics.iter().map(|(_, v)| *v).fold(producer, usize::min);
    if limit >= MIN_MESSAGE_BYTES {
        return Ok(limit);
    }
    let topics: Vec<String> = topics
        .iter()
        .map(|(t, v)| format!("topic {t} max.message.bytes = {v}"))
        .collect();
    Err(format!(
        "the output and dead-letter topics cannot hold a dead-letter envelope: {producer_key} = {producer}, {}; the smallest must be at least {MIN_MESSAGE_BYTES} bytes ({ENVELOPE_OVERHEAD} for headers and framing plus 1 KiB of the record)",
        topics.join(", ")
    ))
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
    fn effective_limit_is_the_smallest_and_must_hold_an_envelope() {
        let topics = |a: usize, d: usize| vec![("anon".to_string(), a), ("dlq".to_string(), d)];
        let p = ("message.max.bytes", 1_000_000);
        assert_eq!(
            effective_limit(p, &topics(1_048_588, 1_048_588)),
            Ok(1_000_000)
        );
        assert_eq!(effective_limit(p, &topics(8_000, 1_048_588)), Ok(8_000));
        assert_eq!(effective_limit(p, &topics(1_048_588, 6_000)), Ok(6_000));
        assert_eq!(
            effective_limit(p, &topics(MIN_MESSAGE_BYTES, 1 << 20)),
            Ok(MIN_MESSAGE_BYTES)
        );
        let err = effective_limit(
            ("anonymizer.kafka_options.message.max.bytes", 1_000_000),
            &topics(1_048_588, MIN_MESSAGE_BYTES - 1),
        )
        .unwrap_err();
        for part in [
            "topic dlq max.message.bytes = 5119",
            "anonymizer.kafka_options.message.max.bytes = 1000000",
        ] {
            assert!(err.contains(part), "{err}");
        }
        assert!(effective_limit(("k", 2_000), &topics(1 << 20, 1 << 20)).is_err());
    }

    #[test]
    fn failpoints_parse() {
        assert_eq!(
            Failpoint::parse("abort_every:3"),
            Some(Failpoint::AbortEvery(3))
        );
        assert_eq!(
            Failpoint::parse("send_error_at:7"),
            Some(Failpoint::SendErrorAt(7))
        );
        for bad in ["abort_every:0", "send_error_at:x", "nope:1", "abort_every"] {
            assert_eq!(Failpoint::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn transactional_id_is_deterministic_per_instance() {
        assert_eq!(
            transactional_id("edgelog-anonymizer", "0"),
            "edgelog-anonymizer-0"
        );
        assert_ne!(transactional_id("g", "0"), transactional_id("g", "1"));
    }
}
