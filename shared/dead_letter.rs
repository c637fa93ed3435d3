//! The dead-letter protocol, shared by both stages and by `verify`: the headers that name where a
//! rejected record came from and why, the reasons (a closed set, each a metric label), and the
//! bounded envelope that makes every dead letter fit its topic.
//!
//! A dead letter always names its **input** position (`http_log` partition and offset): `verify`
//! accounts for every input offset as loaded or dead-lettered, whichever stage rejected it. The
//! one exception is a record the loader cannot decode (`anon_undecodable`): its input position is
//! unknown, so its `edgelog.source.*` headers name the anonymized topic, partition and offset.
//! Loader dead letters also carry `edgelog.anon.*`, the position on the anonymized topic.

use std::borrow::Cow;
use std::fmt;

use sha2::{Digest, Sha256};

/// Input topic of the rejected record.
pub const HEADER_TOPIC: &str = "edgelog.source.topic";
/// Input partition, decimal.
pub const HEADER_PARTITION: &str = "edgelog.source.partition";
/// Input offset, decimal.
pub const HEADER_OFFSET: &str = "edgelog.source.offset";
/// Human-readable error (bounded, see [`error_text`]).
pub const HEADER_ERROR: &str = "edgelog.error";
/// The [`Reason`] label.
pub const HEADER_REASON: &str = "edgelog.reason";
/// The stage that rejected it: `anonymizer` or `loader`.
pub const HEADER_STAGE: &str = "edgelog.stage";
/// Loader dead letters: the anonymized topic the record was read from.
pub const HEADER_ANON_TOPIC: &str = "edgelog.anon.topic";
/// Loader dead letters: the record's partition on the anonymized topic, decimal.
pub const HEADER_ANON_PARTITION: &str = "edgelog.anon.partition";
/// Loader dead letters: the record's offset on the anonymized topic, decimal.
pub const HEADER_ANON_OFFSET: &str = "edgelog.anon.offset";
/// Present only on a truncated envelope: the original payload's size in bytes, decimal.
pub const HEADER_ORIGINAL_SIZE: &str = "edgelog.original.size";
/// Present only on a truncated envelope: SHA-256 of the original payload, lowercase hex.
pub const HEADER_ORIGINAL_SHA256: &str = "edgelog.original.sha256";

/// Why a record was dead-lettered. The label is a metric label, a header value and a line of
/// `verify`'s summary, so it is stable: add variants, never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Stage one: not a Cap'n Proto `HttpLogRecord` (garbage, truncated, trailing bytes, text
    /// that is not UTF-8).
    Undecodable,
    /// Stage one: the anonymized record is larger than the output topic accepts.
    RecordTooLarge,
    /// Stage one: the broker or client refused this one record (invalid message).
    ProduceRejected,
    /// Stage one: the timestamp is outside ClickHouse `DateTime` (1970-01-01 00:00:00 to
    /// 2106-02-07 06:28:15 UTC), which would clamp it silently.
    TimestampOutOfRange,
    /// Stage one: the timestamp is further in the future than `anonymizer.max_future_skew`.
    TimestampInFuture,
    /// Stage one: the record is older than the raw table's TTL minus `anonymizer.retention_margin`;
    /// ClickHouse would drop it at insert.
    OlderThanRetention,
    /// Stage one: a text field is longer than its limit (see `validate`).
    FieldTooLong,
    /// Stage one: a numeric field is outside its range (status, bytes sent, request time).
    ValueOutOfRange,
    /// Loader: a record on the anonymized topic that does not decode (foreign producer, bug).
    AnonUndecodable,
    /// Loader: ClickHouse rejected the record on its own (isolated by bisection).
    ClickhouseRejected,
    /// Loader: the record alone makes a body over the proxy's limit.
    BodyTooLarge,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Undecodable,
        Reason::RecordTooLarge,
        Reason::ProduceRejected,
        Reason::TimestampOutOfRange,
        Reason::TimestampInFuture,
        Reason::OlderThanRetention,
        Reason::FieldTooLong,
        Reason::ValueOutOfRange,
        Reason::AnonUndecodable,
        Reason::ClickhouseRejected,
        Reason::BodyTooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Undecodable => "undecodable",
            Reason::RecordTooLarge => "record_too_large",
            Reason::ProduceRejected => "produce_rejected",
            Reason::TimestampOutOfRange => "timestamp_out_of_range",
            Reason::TimestampInFuture => "timestamp_in_future",
            Reason::OlderThanRetention => "older_than_retention",
            Reason::FieldTooLong => "field_too_long",
            Reason::ValueOutOfRange => "value_out_of_range",
            Reason::AnonUndecodable => "anon_undecodable",
            Reason::ClickhouseRejected => "clickhouse_rejected",
            Reason::BodyTooLarge => "body_too_large",
        }
    }

    pub fn from_label(label: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.label() == label)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Longest error text carried in a header: an error message can quote the record.
pub const MAX_ERROR_BYTES: usize = 1024;

/// `error` cut to at most [`MAX_ERROR_BYTES`] on a character boundary.
pub fn error_text(error: &str) -> &str {
    if error.len() <= MAX_ERROR_BYTES {
        return error;
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// Room kept for the record's headers, key and Kafka's per-record framing when deciding whether
/// a payload fits: generous, so that a payload judged to fit always does.
pub const ENVELOPE_OVERHEAD: usize = 4096;

/// The payload of a dead letter: the original bytes when they fit in `max_message_bytes` (the
/// smaller of the producer's `message.max.bytes` and the topic's `max.message.bytes`), otherwise
/// a bounded envelope: the first bytes of the original, and headers with its size and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPayload<'a> {
    pub bytes: Cow<'a, [u8]>,
    /// `Some((original size, sha256 hex))` when `bytes` is a truncated prefix.
    pub truncated: Option<(usize, String)>,
}

impl<'a> DeadLetterPayload<'a> {
    /// Pure: depends only on the original bytes and the limit.
    pub fn of(original: &'a [u8], max_message_bytes: usize) -> DeadLetterPayload<'a> {
        let room = max_message_bytes.saturating_sub(ENVELOPE_OVERHEAD);
        if original.len() <= room {
            return DeadLetterPayload {
                bytes: Cow::Borrowed(original),
                truncated: None,
            };
        }
        let hash = Sha256::digest(original);
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        DeadLetterPayload {
            bytes: Cow::Borrowed(&original[..room]),
            truncated: Some((original.len(), hex)),
        }
    }

    /// The headers that describe a truncated envelope (none for an original payload).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match &self.truncated {
            None => Vec::new(),
            Some((size, hash)) => vec![
                (HEADER_ORIGINAL_SIZE, size.to_string()),
                (HEADER_ORIGINAL_SHA256, hash.clone()),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels_round_trip_and_are_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Reason::ALL {
            assert_eq!(Reason::from_label(r.label()), Some(r));
            assert!(seen.insert(r.label()));
        }
        assert_eq!(Reason::from_label("nope"), None);
    }

    #[test]
    fn a_small_payload_is_kept_whole() {
        let p = DeadLetterPayload::of(b"abc", 1_000_000);
        assert_eq!(&*p.bytes, b"abc");
        assert!(p.truncated.is_none() && p.headers().is_empty());
    }

    #[test]
    fn a_large_payload_becomes_a_hashed_prefix() {
        let original = vec![7u8; 2_000_000];
        let p = DeadLetterPayload::of(&original, 1_048_588);
        assert_eq!(p.bytes.len(), 1_048_588 - ENVELOPE_OVERHEAD);
        let (size, hash) = p.truncated.clone().unwrap();
        assert_eq!(size, 2_000_000);
        assert_eq!(hash.len(), 64);
        assert_eq!(p.headers().len(), 2);
    }

    #[test]
    fn error_text_is_bounded_on_a_char_boundary() {
        let long = "é".repeat(2000);
        let cut = error_text(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES && long.starts_with(cut));
        assert_eq!(error_text("short"), "short");
    }

    proptest! {
        /// Whatever the payload and limit: the dead letter fits, and is either the original or a
        /// prefix of it with its true size.
        #[test]
        fn the_payload_always_fits(len in 0usize..20_000, limit in 0usize..30_000) {
            let original: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let p = DeadLetterPayload::of(&original, limit);
            prop_assert!(p.bytes.len() + ENVELOPE_OVERHEAD <= limit.max(ENVELOPE_OVERHEAD));
            prop_assert!(original.starts_with(&p.bytes));
            match p.truncated {
                None => prop_assert_eq!(p.bytes.len(), len),
                Some((size, _)) => prop_assert_eq!(size, len),
            }
        }
    }
}
