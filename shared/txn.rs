//! Kafka transactions: the classification of every transactional error, and the retry loop
//! around rdkafka's (blocking) transaction calls, bounded in time.
//!
//! rdkafka's transaction calls block the calling thread, so they run on the anonymizer's own
//! processing thread, never on the async runtime.
//!
//! Every call has a deadline ([`budget`], decided by [`next_step`]) and gets a finite librdkafka
//! timeout ([`call_timeout`]). An unbounded retry loop around calls made with an infinite timeout
//! is how the anonymizer once sat for 180 s with a Kafka node dead (docs/LIMITATIONS.md): in
//! librdkafka 2.12 `commit_transaction(-1)` never caps its wait, and
//! `send_offsets_to_transaction` can block past any timeout while the group coordinator is gone
//! (its coordinator request timeout is never checked, librdkafka issue #5456; a decommissioned
//! coordinator stays cached, #5511). The deadlines bound what librdkafka honours; the anonymizer's
//! watchdog (`anonymizer::watchdog_limit`) covers a call that overruns its own timeout.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::dead_letter::Reason;

/// What to do after a transactional call failed (librdkafka's own classification, KIP-98).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnErrorAction {
    /// The same call may be retried as it is.
    Retry,
    /// The transaction must be aborted; then rewind the consumer to its committed offsets.
    Abort,
    /// The producer is unusable (fenced by a newer instance with the same `transactional.id`, or
    /// a broker-side fatal error): stop, and let the orchestrator restart the process.
    Fatal,
}

/// The decision, from librdkafka's three flags. Fatal wins over everything; an error that is
/// none of the three is treated as fatal, because retrying or aborting it is not known to be safe.
pub fn classify_flags(
    is_fatal: bool,
    txn_requires_abort: bool,
    is_retriable: bool,
) -> TxnErrorAction {
    if is_fatal {
        TxnErrorAction::Fatal
    } else if txn_requires_abort {
        TxnErrorAction::Abort
    } else if is_retriable {
        TxnErrorAction::Retry
    } else {
        TxnErrorAction::Fatal
    }
}

/// Classifies an error returned by a transactional call.
pub fn classify(err: &KafkaError) -> TxnErrorAction {
    match err {
        KafkaError::Transaction(e) => {
            classify_flags(e.is_fatal(), e.txn_requires_abort(), e.is_retriable())
        }
        // rdkafka's `commit_transaction` flushes first, with the same timeout: running out of it
        // is the commit's own timeout.
        KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut) => TxnErrorAction::Retry,
        _ => TxnErrorAction::Fatal,
    }
}

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// Aborted (abortable error); the consumer must rewind to its committed offsets.
    #[error("transaction aborted: {0}")]
    Aborted(KafkaError),
    /// Unusable producer; the process must exit.
    #[error("fatal transactional error: {0}")]
    Fatal(KafkaError),
}

/// The transactional call a decision is about: each has its own time budget ([`budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnCall {
    /// `begin_transaction`.
    Begin,
    /// Enqueueing a record on a full queue, and waiting for the records' acknowledgements before
    /// the commit.
    Produce,
    /// `send_offsets_to_transaction`.
    SendOffsets,
    /// `commit_transaction`.
    Commit,
    /// `abort_transaction`; its clock starts when the abort does, not with the transaction.
    Abort,
}

impl TxnCall {
    pub fn name(self) -> &'static str {
        match self {
            TxnCall::Begin => "begin_transaction",
            TxnCall::Produce => "produce",
            TxnCall::SendOffsets => "send_offsets_to_transaction",
            TxnCall::Commit => "commit_transaction",
            TxnCall::Abort => "abort_transaction",
        }
    }
}

/// What to do after a transactional call failed, once its time budget is taken into account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Call again after this pause.
    Retry { after: Duration },
    /// Abort the transaction, then rewind to the committed offsets.
    Abort,
    /// Exit: the orchestrator restarts the process, whose `init_transactions` fences this
    /// producer, and the coordinator aborts (or finishes) the open transaction. Still exactly once.
    Fatal,
}

/// How long a call may go on retrying, from its clock's start (the transaction's start; the
/// abort's own start for [`TxnCall::Abort`]).
///
/// Until the transaction's start + `txn_timeout` everything before the commit may retry: past it
/// the broker aborts the transaction anyway, so the process aborts it too and rewinds. The commit
/// gets one `txn_timeout` more, and gives up fatally: once `commit_transaction` was called,
/// librdkafka refuses `abort_transaction` until the commit's outcome is known, and only a new
/// producer (a restart) learns it. An abort gets one `txn_timeout`; an abort that cannot finish
/// leaves the producer unusable, so that too ends in a restart.
pub fn budget(call: TxnCall, txn_timeout: Duration) -> Duration {
    match call {
        TxnCall::Commit => txn_timeout * 2,
        TxnCall::Begin | TxnCall::Produce | TxnCall::SendOffsets | TxnCall::Abort => txn_timeout,
    }
}

/// The shortest timeout handed to librdkafka: a call near the end of its budget still gets
/// time for one round trip (its result then decides).
pub const MIN_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The timeout for the next attempt of `call`, `elapsed` into its clock: what is left of its
/// budget, at least [`MIN_CALL_TIMEOUT`]. Never infinite: with `-1` librdkafka 2.12's
/// `commit_transaction` and `abort_transaction` wait without bound, and
/// `send_offsets_to_transaction` retries its coordinator request for ever.
pub fn call_timeout(call: TxnCall, elapsed: Duration, txn_timeout: Duration) -> Duration {
    budget(call, txn_timeout)
        .saturating_sub(elapsed)
        .max(MIN_CALL_TIMEOUT)
}

/// The decision after `call` failed with an error classified `action`, on the `attempt`-th try
/// (from 1), `elapsed` into its clock.
pub fn next_step(
    call: TxnCall,
    action: TxnErrorAction,
    attempt: u32,
    elapsed: Duration,
    txn_timeout: Duration,
) -> Step {
    match action {
        TxnErrorAction::Fatal => Step::Fatal,
        // An abort that itself needs an abort: nothing is left to try in this process.
        TxnErrorAction::Abort if call == TxnCall::Abort => Step::Fatal,
        TxnErrorAction::Abort => Step::Abort,
        TxnErrorAction::Retry if elapsed < budget(call, txn_timeout) => Step::Retry {
            after: Duration::from_millis(100.min(10 * u64::from(attempt.max(1)))),
        },
        TxnErrorAction::Retry => match call {
            TxnCall::Commit | TxnCall::Abort => Step::Fatal,
            TxnCall::Begin | TxnCall::Produce | TxnCall::SendOffsets => Step::Abort,
        },
    }
}

/// Runs `call` (given the timeout to pass to librdkafka, [`call_timeout`]), retrying while
/// librdkafka calls the error retriable and the call's budget, counted from `clock`, lasts.
/// An error comes back as [`TxnErrorAction::Abort`] or [`TxnErrorAction::Fatal`] ([`next_step`]).
pub fn with_deadline<T>(
    what: TxnCall,
    clock: Instant,
    txn_timeout: Duration,
    mut call: impl FnMut(Duration) -> Result<T, KafkaError>,
) -> Result<T, (TxnErrorAction, KafkaError)> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let timeout = call_timeout(what, clock.elapsed(), txn_timeout);
        let e = match call(timeout) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let action = classify(&e);
        let elapsed = clock.elapsed();
        match next_step(what, action, attempt, elapsed, txn_timeout) {
            Step::Retry { after } => {
                tracing::warn!(call = what.name(), error = %e, attempt, elapsed_s = elapsed.as_secs_f64(), "retriable transactional error; retrying");
                std::thread::sleep(after);
            }
            Step::Abort => return Err((TxnErrorAction::Abort, e)),
            Step::Fatal => {
                if action == TxnErrorAction::Retry {
                    tracing::error!(call = what.name(), error = %e, attempt, elapsed_s = elapsed.as_secs_f64(), budget_s = budget(what, txn_timeout).as_secs_f64(), "transactional call out of time; giving up");
                }
                return Err((TxnErrorAction::Fatal, e));
            }
        }
    }
}

/// What to do when `send()` (the enqueue into librdkafka) refuses a record inside a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceErrorAction {
    /// The local queue is full: wait for librdkafka to drain it and send again.
    Wait,
    /// The refusal is about this one record: dead-letter it and go on. Retrying or aborting would
    /// meet the same record again, forever.
    DeadLetter(Reason),
    /// Abort the open transaction, then rewind to the committed offsets.
    Abort,
    /// The producer is unusable, or the topic is gone: exit, the orchestrator restarts.
    Fatal,
}

/// The decision for an error code returned by `send()`. Codes that belong to neither a record
/// nor a known fatal state abort: the transaction then holds nothing half-done, and a rewind
/// retries the same input.
pub fn classify_produce(code: RDKafkaErrorCode) -> ProduceErrorAction {
    use RDKafkaErrorCode as C;
    match code {
        C::QueueFull => ProduceErrorAction::Wait,
        C::MessageSizeTooLarge | C::InvalidMessageSize => {
            ProduceErrorAction::DeadLetter(Reason::RecordTooLarge)
        }
        C::InvalidMessage | C::InvalidRecord => {
            ProduceErrorAction::DeadLetter(Reason::ProduceRejected)
        }
        // A deleted topic would fail every record: looping on abort helps nobody.
        C::Fatal
        | C::Fenced
        | C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::UnknownTopic
        | C::UnknownPartition
        | C::UnknownTopicOrPartition => ProduceErrorAction::Fatal,
        _ => ProduceErrorAction::Abort,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TxnErrorAction::*;

    #[test]
    fn produce_error_table() {
        use RDKafkaErrorCode as C;
        for (code, expected) in [
            (C::QueueFull, ProduceErrorAction::Wait),
            (
                C::MessageSizeTooLarge,
                ProduceErrorAction::DeadLetter(Reason::RecordTooLarge),
            ),
            (
                C::InvalidMessage,
                ProduceErrorAction::DeadLetter(Reason::ProduceRejected),
            ),
            (C::Fatal, ProduceErrorAction::Fatal),
            (C::Fenced, ProduceErrorAction::Fatal),
            (C::UnknownTopic, ProduceErrorAction::Fatal),
            (C::State, ProduceErrorAction::Abort),
            (C::Fail, ProduceErrorAction::Abort),
            (C::MessageTimedOut, ProduceErrorAction::Abort),
        ] {
            assert_eq!(classify_produce(code), expected, "{code:?}");
        }
    }

    #[test]
    fn classification_table() {
        // (fatal, abortable, retriable) -> action
        let table = [
            ((true, true, true), Fatal),
            ((true, false, false), Fatal),
            ((false, true, false), Abort),
            ((false, true, true), Abort),
            ((false, false, true), Retry),
            ((false, false, false), Fatal),
        ];
        for ((f, a, r), expected) in table {
            assert_eq!(classify_flags(f, a, r), expected, "{f} {a} {r}");
        }
    }

    #[test]
    fn non_transactional_errors_are_fatal() {
        assert_eq!(classify(&KafkaError::Canceled), Fatal);
    }

    #[test]
    fn retries_stop_at_success() {
        let mut n = 0;
        let r: Result<u32, _> = with_deadline(
            TxnCall::Commit,
            Instant::now(),
            Duration::from_secs(10),
            |t| {
                // The commit's whole budget, less the microseconds since `now()`.
                assert!(t <= secs(20) && t > secs(19), "{t:?}");
                n += 1;
                Ok(n)
            },
        );
        assert_eq!(r.unwrap(), 1);
    }

    #[test]
    fn a_fatal_error_is_not_retried() {
        let mut n = 0;
        let r: Result<(), _> = with_deadline(
            TxnCall::SendOffsets,
            Instant::now(),
            Duration::from_secs(10),
            |_| {
                n += 1;
                Err(KafkaError::Canceled)
            },
        );
        assert_eq!(r.unwrap_err().0, Fatal);
        assert_eq!(n, 1);
    }

    #[test]
    fn a_timed_out_flush_inside_the_commit_is_retriable() {
        assert_eq!(
            classify(&KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)),
            Retry
        );
        assert_eq!(classify(&KafkaError::Flush(RDKafkaErrorCode::Fail)), Fatal);
    }

    const T: Duration = Duration::from_secs(60);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn before_the_commit_retries_last_until_the_transaction_times_out_then_abort() {
        for call in [TxnCall::Begin, TxnCall::Produce, TxnCall::SendOffsets] {
            assert!(
                matches!(next_step(call, Retry, 1, secs(0), T), Step::Retry { .. }),
                "{call:?}"
            );
            assert!(
                matches!(next_step(call, Retry, 500, secs(59), T), Step::Retry { .. }),
                "{call:?}"
            );
            assert_eq!(
                next_step(call, Retry, 501, secs(60), T),
                Step::Abort,
                "{call:?}"
            );
            assert_eq!(
                next_step(call, Retry, 2, secs(600), T),
                Step::Abort,
                "{call:?}"
            );
        }
    }

    #[test]
    fn the_commit_gets_one_more_transaction_timeout_then_the_process_exits() {
        assert!(matches!(
            next_step(TxnCall::Commit, Retry, 3, secs(61), T),
            Step::Retry { .. }
        ));
        assert!(matches!(
            next_step(TxnCall::Commit, Retry, 3, secs(119), T),
            Step::Retry { .. }
        ));
        assert_eq!(
            next_step(TxnCall::Commit, Retry, 3, secs(120), T),
            Step::Fatal
        );
        // An abortable error still aborts, at any time.
        assert_eq!(
            next_step(TxnCall::Commit, Abort, 1, secs(1), T),
            Step::Abort
        );
        assert_eq!(
            next_step(TxnCall::Commit, Abort, 1, secs(500), T),
            Step::Abort
        );
    }

    #[test]
    fn an_abort_gets_one_transaction_timeout_then_the_process_exits() {
        assert!(matches!(
            next_step(TxnCall::Abort, Retry, 1, secs(59), T),
            Step::Retry { .. }
        ));
        assert_eq!(
            next_step(TxnCall::Abort, Retry, 1, secs(60), T),
            Step::Fatal
        );
        assert_eq!(next_step(TxnCall::Abort, Abort, 1, secs(0), T), Step::Fatal);
    }

    #[test]
    fn fatal_is_fatal_for_every_call_at_any_time() {
        for call in [
            TxnCall::Begin,
            TxnCall::Produce,
            TxnCall::SendOffsets,
            TxnCall::Commit,
            TxnCall::Abort,
        ] {
            for elapsed in [secs(0), secs(1000)] {
                assert_eq!(
                    next_step(call, Fatal, 1, elapsed, T),
                    Step::Fatal,
                    "{call:?}"
                );
            }
        }
    }

    #[test]
    fn retry_pauses_grow_to_a_tenth_of_a_second() {
        let after = |attempt| match next_step(TxnCall::SendOffsets, Retry, attempt, secs(0), T) {
            Step::Retry { after } => after,
            other => panic!("{other:?}"),
        };
        assert_eq!(after(1), Duration::from_millis(10));
        assert_eq!(after(5), Duration::from_millis(50));
        assert_eq!(after(10_000), Duration::from_millis(100));
    }

    #[test]
    fn librdkafka_gets_the_rest_of_the_budget_never_less_than_two_seconds_never_infinite() {
        assert_eq!(call_timeout(TxnCall::SendOffsets, secs(0), T), secs(60));
        assert_eq!(call_timeout(TxnCall::SendOffsets, secs(45), T), secs(15));
        assert_eq!(call_timeout(TxnCall::SendOffsets, secs(59), T), secs(2));
        assert_eq!(call_timeout(TxnCall::SendOffsets, secs(300), T), secs(2));
        assert_eq!(call_timeout(TxnCall::Commit, secs(1), T), secs(119));
        assert_eq!(call_timeout(TxnCall::Abort, secs(0), T), secs(60));
    }
}
