//! What one input record puts into the open transaction: its anonymized record, or its dead
//! letter with the reason, and its offset.

use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use rdkafka::Message;

use crate::anon_record::{process as decide, AddressKind, Outcome, StageOne};
use crate::config::Settings;
use crate::dead_letter::{
    error_text, DeadLetterPayload, Reason, HEADER_ERROR, HEADER_OFFSET, HEADER_PARTITION,
    HEADER_REASON, HEADER_STAGE, HEADER_TOPIC,
};
use crate::txn::TxnError;

use super::transaction::{TxnProducer, TxnState};

/// Transforms one input message into the open transaction: its anonymized record, or its dead
/// letter, and its offset.
pub(super) fn handle(
    settings: &Settings,
    stage: &StageOne,
    txn: &TxnProducer,
    state: &mut TxnState,
    msg: &BorrowedMessage<'_>,
    out_partitions: i32,
) -> Result<(), TxnError> {
    txn.begin_if_needed(state)?;
    let started = state.started.unwrap_or_else(std::time::Instant::now);
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
        Outcome::Record {
            bytes,
            kind,
            url_redacted,
        } => {
            if kind == AddressKind::Invalid {
                metrics::counter!("edgelog_anonymizer_invalid_addresses_total").increment(1);
            }
            // Output partition follows the input partition, so per-partition order is kept.
            let record = BaseRecord::<[u8], [u8]>::to(&settings.topics.anonymized)
                .partition(msg.partition().rem_euclid(out_partitions))
                .payload(&bytes[..]);
            match txn.send(started, record)? {
                None => {
                    metrics::counter!("edgelog_anonymizer_records_out_total").increment(1);
                    if url_redacted {
                        metrics::counter!("edgelog_anonymizer_urls_redacted_total", "policy" => stage.url_query.label())
                            .increment(1);
                    }
                }
                // The pre-check let it through, yet the client refused it: still this record's
                // fault alone.
                Some((reason, e)) => {
                    dead_letter(settings, stage, txn, started, msg, reason, &e.to_string())?
                }
            }
        }
        Outcome::DeadLetter { reason, error } => {
            dead_letter(settings, stage, txn, started, msg, reason, &error)?
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
    txn: &TxnProducer,
    started: std::time::Instant,
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
    if let Some((_, e)) = txn.send(started, record)? {
        // The envelope is bounded to fit; a refusal means the limits read at start-up are wrong.
        return Err(TxnError::Fatal(e));
    }
    metrics::counter!("edgelog_anonymizer_dead_letter_total").increment(1);
    metrics::counter!("edgelog_dead_letters_total", "stage" => "anonymizer", "reason" => reason.label())
        .increment(1);
    tracing::debug!(partition = msg.partition(), offset = msg.offset(), %reason, error = error_text(error), "dead-lettered");
    Ok(())
}
