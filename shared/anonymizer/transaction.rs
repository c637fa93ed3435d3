//! The transactional producer (a small wrapper in the manner of Materialize's Kafka sink): one
//! open transaction at a time, every error classified ([`crate::txn`]) into retry, abort or
//! fatal; and the consumer context that finishes the open transaction before partitions are
//! revoked (commit) or lost (abort), inside the rebalance callback.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::dead_letter::Reason;
use crate::health::Health;
use crate::kafka::{KafkaWatch, WatchedContext};
use crate::txn::{
    budget, classify_produce, next_step, with_deadline, ProduceErrorAction, Step, TxnCall,
    TxnError, TxnErrorAction, MIN_CALL_TIMEOUT,
};

use super::watchdog::Progress;

/// The open transaction, if any.
#[derive(Debug, Default)]
pub(super) struct TxnState {
    pub(super) open: bool,
    pub(super) started: Option<Instant>,
    pub(super) records: usize,
    /// Next input offset to read, per input partition, for the records in this transaction.
    pub(super) next_offsets: BTreeMap<i32, i64>,
    /// A fatal error seen in the rebalance callback, for the processing loop to act on.
    pub(super) fatal: Option<KafkaError>,
}

/// The transactional producer and its open transaction, shared by the processing loop and the
/// rebalance callback (both on the stage's one thread; the mutex only satisfies the types).
pub(super) struct TxnProducer {
    pub(super) producer: ThreadedProducer<WatchedContext>,
    pub(super) watch: Arc<KafkaWatch>,
    pub(super) input_topic: String,
    pub(super) state: Mutex<TxnState>,
    pub(super) health: Arc<Health>,
    pub(super) txn_id: String,
    /// `anonymizer.txn_timeout`: every call's deadline is counted in it ([`crate::txn::budget`]).
    pub(super) txn_timeout: Duration,
    /// What the processing thread is blocked in, for the watchdog's message.
    pub(super) progress: Arc<Progress>,
    /// `ANONYMIZER_FAILPOINT=send_error_at:<n>`: the n-th `send()` fails (tests only).
    pub(super) send_error_at: Option<u64>,
    pub(super) sends: AtomicU64,
}

impl TxnProducer {
    pub(super) fn begin_if_needed(&self, state: &mut TxnState) -> Result<(), TxnError> {
        if state.open {
            return Ok(());
        }
        self.call(TxnCall::Begin, Instant::now(), |_| {
            self.producer.begin_transaction()
        })
        .map_err(to_txn_error)?;
        state.open = true;
        state.started = Some(Instant::now());
        Ok(())
    }

    /// Sends the input offsets into the transaction and commits it. On an abortable error the
    /// transaction is aborted and `TxnError::Aborted` returned: the caller rewinds.
    pub(super) fn commit(
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
        // The transaction's clock: the broker aborts it `txn_timeout` after its start.
        let started = state.started.unwrap_or_else(Instant::now);
        let t = self.txn_timeout;
        let result = (|| {
            if offsets.count() > 0 {
                // Only missing if the consumer has no group.id, which the config forbids.
                let group = consumer.group_metadata().ok_or((
                    TxnErrorAction::Fatal,
                    KafkaError::Global(RDKafkaErrorCode::InvalidGroupId),
                ))?;
                self.call(TxnCall::SendOffsets, started, |timeout| {
                    self.producer
                        .send_offsets_to_transaction(&offsets, &group, timeout)
                })?;
            }
            self.progress.enter(
                "waiting for acknowledgements",
                Some(started + budget(TxnCall::Produce, t)),
            );
            drain_in_flight(&self.producer, started, t)?;
            self.call(TxnCall::Commit, started, |timeout| {
                self.producer.commit_transaction(timeout)
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
    pub(super) fn abort(&self, state: &mut TxnState, why: &str) -> Result<(), TxnError> {
        if !state.open {
            return Ok(());
        }
        tracing::warn!(records = state.records, why, "aborting transaction");
        // Let in-flight sends settle first: an abort racing the partition registrations of its own
        // transaction was answered INVALID_TXN_STATE (fatal) by Kafka 4.1 in our abort test.
        // Bounded: on a broken connection the abort proceeds and librdkafka purges.
        self.enter(TxnCall::Abort, Instant::now() + ABORT_FLUSH);
        let _ = self.producer.flush(ABORT_FLUSH);
        let result = with_deadline(
            TxnCall::Abort,
            Instant::now(),
            self.txn_timeout,
            |timeout| self.producer.abort_transaction(timeout),
        );
        metrics::counter!("edgelog_anonymizer_transactions_aborted_total").increment(1);
        *state = TxnState {
            fatal: state.fatal.take(),
            ..TxnState::default()
        };
        result.map_err(to_txn_error)
    }

    /// Tells the watchdog the thread is in `call`, whose clock started at `clock`: it ends by the
    /// end of its budget, plus the last attempt's shortest timeout and pause.
    fn enter(&self, call: TxnCall, clock: Instant) {
        let until =
            clock + budget(call, self.txn_timeout) + MIN_CALL_TIMEOUT + Duration::from_secs(1);
        self.progress.enter(call.name(), Some(until));
    }

    /// Runs `call` with its deadline counted from `clock` ([`with_deadline`]), the watchdog told.
    fn call<T>(
        &self,
        call: TxnCall,
        clock: Instant,
        f: impl FnMut(Duration) -> Result<T, KafkaError>,
    ) -> Result<T, (TxnErrorAction, KafkaError)> {
        self.enter(call, clock);
        with_deadline(call, clock, self.txn_timeout, f)
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

    /// Enqueues `record` into the open transaction, which `started` then. `Ok(None)`: sent.
    /// `Ok(Some(..))`: refused for this record alone (the caller dead-letters it).
    /// `Err(Aborted)`: the caller aborts and rewinds (also when the queue stays full until the
    /// transaction's deadline).
    pub(super) fn send(
        &self,
        started: Instant,
        mut record: BaseRecord<'_, [u8], [u8]>,
    ) -> Result<Option<(Reason, KafkaError)>, TxnError> {
        let n = self.sends.fetch_add(1, Ordering::Relaxed) + 1;
        if self.send_error_at == Some(n) {
            tracing::warn!(send = n, "ANONYMIZER_FAILPOINT: failing this send");
            return Err(TxnError::Aborted(KafkaError::MessageProduction(
                RDKafkaErrorCode::Fail,
            )));
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let e = match self.producer.send(record) {
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
                // librdkafka's background thread drains the queue, unless the partition's leader
                // is gone; its records then time out at the transaction's deadline, and so does
                // this wait.
                ProduceErrorAction::Wait => {
                    if !wait_before_deadline(
                        started,
                        self.txn_timeout,
                        attempt,
                        Duration::from_millis(1),
                        "the producer's queue stayed full until the transaction's deadline",
                    ) {
                        return Err(TxnError::Aborted(e));
                    }
                }
                ProduceErrorAction::DeadLetter(reason) => return Ok(Some((reason, e))),
                ProduceErrorAction::Abort => return Err(TxnError::Aborted(e)),
                ProduceErrorAction::Fatal => return Err(TxnError::Fatal(e)),
            }
        }
    }
}

/// How long an abort first lets in-flight sends settle.
const ABORT_FLUSH: Duration = Duration::from_secs(5);

/// Waits until every produced message is acknowledged, until the deadline of the transaction
/// that `started` then (abortable past it). rdkafka's `commit_transaction` flushes first, but its
/// flush polls in 100 ms steps while the `ThreadedProducer`'s own thread consumes the delivery
/// events, so each commit would sleep 100 ms. Zero-timeout flushes in a short loop skip that wait
/// (see docs/BENCHMARKS.md for the before/after).
fn drain_in_flight(
    producer: &ThreadedProducer<WatchedContext>,
    started: Instant,
    txn_timeout: Duration,
) -> Result<(), (TxnErrorAction, KafkaError)> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match producer.flush(Duration::ZERO) {
            Ok(()) => return Ok(()),
            Err(e @ KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                if !wait_before_deadline(
                    started,
                    txn_timeout,
                    attempt,
                    Duration::from_micros(200),
                    "records still unacknowledged at the transaction's deadline",
                ) {
                    return Err((TxnErrorAction::Abort, e));
                }
            }
            Err(e) => return Err((crate::txn::classify(&e), e)),
        }
    }
}

/// A wait on the producer (a full queue, unacknowledged records) in the transaction that
/// `started` then: pauses `pause` and says to go on while the transaction's deadline allows
/// ([`next_step`] for [`TxnCall::Produce`]); past it, logs `why` and says to abort.
fn wait_before_deadline(
    started: Instant,
    txn_timeout: Duration,
    attempt: u32,
    pause: Duration,
    why: &str,
) -> bool {
    let elapsed = started.elapsed();
    match next_step(
        TxnCall::Produce,
        TxnErrorAction::Retry,
        attempt,
        elapsed,
        txn_timeout,
    ) {
        Step::Retry { .. } => {
            std::thread::sleep(pause);
            true
        }
        _ => {
            tracing::warn!(elapsed_s = elapsed.as_secs_f64(), "{why}");
            false
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
pub(super) struct AnonContext {
    pub(super) txn: Arc<TxnProducer>,
}

impl ClientContext for AnonContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        crate::kafka::record_lag(&statistics, "edgelog_anonymizer_lag");
        self.txn.watch.observe(&statistics);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.txn.watch.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.txn.watch.error(&error, reason);
    }
}

impl ConsumerContext for AnonContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let txn = &self.txn;
        let mut state = txn.state.lock().expect("not poisoned");
        let outcome = if consumer.assignment_lost() {
            // Another member may already own these partitions: our output must not commit.
            txn.abort(&mut state, "partitions lost")
        } else {
            tracing::info!(
                partitions = tpl.count(),
                records = state.records,
                "partitions revoked; committing the open transaction"
            );
            txn.commit(consumer, &mut state)
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
