//! Kafka transactions: the classification of every transactional error, and the retry loop
//! around rdkafka's (blocking) transaction calls.
//!
//! rdkafka's transaction calls block the calling thread, so they run on the anonymizer's own
//! processing thread, never on the async runtime.

use std::time::Duration;

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

/// Runs a transactional call, retrying while librdkafka calls the error retriable (with a short
/// pause), and maps the final outcome to [`TxnErrorAction`].
pub fn with_retries<T>(
    what: &str,
    mut call: impl FnMut() -> Result<T, KafkaError>,
) -> Result<T, (TxnErrorAction, KafkaError)> {
    let mut attempt = 0u32;
    loop {
        match call() {
            Ok(v) => return Ok(v),
            Err(e) => match classify(&e) {
                TxnErrorAction::Retry if attempt < 100 => {
                    attempt += 1;
                    tracing::warn!(call = what, error = %e, attempt, "retriable transactional error; retrying");
                    std::thread::sleep(Duration::from_millis(100.min(10 * u64::from(attempt))));
                }
                action => return Err((action, e)),
            },
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
        let r: Result<u32, _> = with_retries("test", || {
            n += 1;
            Ok(n)
        });
        assert_eq!(r.unwrap(), 1);
    }
}
