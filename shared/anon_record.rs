//! The anonymized record on `http_log_anon`: MessagePack written with rmp-serde.
//!
//! Encoding (version 1): a MessagePack array of 12 elements, in this order:
//! `[version=1, timestamp_epoch_milli, resource_id, bytes_sent, request_time_milli,
//!   response_status, cache_status, method, remote_addr, url, source_partition, source_offset]`.
//! Integers use MessagePack's smallest form; strings are str. `remote_addr` is already anonymized
//! (see [`crate::anonymize`]). `source_partition`/`source_offset` name the record's position in the
//! input topic: the loader stores them and `verify` audits by them.
//!
//! A reader accepts only the versions it knows; a new field means a new version.

use serde::{Deserialize, Serialize};

use crate::anonymize::{anonymize_ip, Anonymized};
use crate::dead_letter::{Reason, ENVELOPE_OVERHEAD};
use crate::record::DecodeError;

pub const VERSION: u8 = 1;

/// Generic over the string type so the anonymizer can encode borrowed text (zero-copy from the
/// Cap'n Proto message) and the loader can decode owned text; both share one field order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnonRecord<S = String> {
    pub version: u8,
    pub timestamp_epoch_milli: u64,
    pub resource_id: u64,
    pub bytes_sent: u64,
    pub request_time_milli: u64,
    pub response_status: u16,
    pub cache_status: S,
    pub method: S,
    pub remote_addr: S,
    pub url: S,
    pub source_partition: i32,
    pub source_offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AnonDecodeError {
    #[error("not an anonymized record: {0}")]
    Format(#[from] rmp_serde::decode::Error),
    #[error("unsupported anonymized record version {0}")]
    Version(u8),
}

pub fn decode(bytes: &[u8]) -> Result<AnonRecord, AnonDecodeError> {
    let r: AnonRecord = rmp_serde::from_slice(bytes)?;
    if r.version != VERSION {
        return Err(AnonDecodeError::Version(r.version));
    }
    Ok(r)
}

/// Appends the version-1 encoding of `r` to `buf`: the one encoder of the topic, shared by
/// [`transform`] and by tests and fuzz targets that must produce exactly what stage one writes.
pub fn encode_into<S: Serialize>(r: &AnonRecord<S>, buf: &mut Vec<u8>) {
    r.serialize(&mut rmp_serde::Serializer::new(buf))
        .expect("serialising to a Vec cannot fail");
}

/// [`encode_into`] a fresh buffer.
pub fn encode<S: Serialize>(r: &AnonRecord<S>) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(r, &mut buf);
    buf
}

/// How the client address was classified, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressKind {
    V4,
    V6,
    Invalid,
}

/// The whole stage-one transformation of one input message: decode Cap'n Proto (zero-copy),
/// anonymize the address, encode MessagePack. Pure: the same input gives the same bytes. No
/// URL policy (the URL is kept), no validity policy and no size check: [`process`] is what stage
/// one runs.
pub fn transform(
    payload: &[u8],
    source_partition: i32,
    source_offset: i64,
    ipv6_prefix_bits: u8,
) -> Result<(Vec<u8>, AddressKind), DecodeError> {
    crate::record::with_record(payload, |r| {
        anonymized_bytes(&r, source_partition, source_offset, ipv6_prefix_bits)
    })
}

fn anonymized_bytes(
    r: &crate::record::RecordView<'_>,
    source_partition: i32,
    source_offset: i64,
    ipv6_prefix_bits: u8,
) -> (Vec<u8>, AddressKind) {
    let anonymized = match crate::validate::address_to_parse(r.remote_addr) {
        Some(addr) => anonymize_ip(addr, ipv6_prefix_bits),
        None => Anonymized::Invalid,
    };
    let kind = match anonymized {
        Anonymized::V4(_) => AddressKind::V4,
        Anonymized::V6(_) => AddressKind::V6,
        Anonymized::Invalid => AddressKind::Invalid,
    };
    let out = AnonRecord::<&str> {
        version: VERSION,
        timestamp_epoch_milli: r.timestamp_epoch_milli,
        resource_id: r.resource_id,
        bytes_sent: r.bytes_sent,
        request_time_milli: r.request_time_milli,
        response_status: r.response_status,
        cache_status: r.cache_status,
        method: r.method,
        remote_addr: anonymized.as_str(),
        url: r.url,
        source_partition,
        source_offset,
    };
    let mut buf = Vec::with_capacity(64 + r.url.len());
    encode_into(&out, &mut buf);
    (buf, kind)
}

/// What stage one needs to decide about one record, fixed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOne {
    pub ipv6_prefix_bits: u8,
    pub policy: crate::validate::Policy,
    /// What is kept of the URL's query and fragment (`anonymizer.url_query`).
    pub url_query: crate::url_query::UrlQuery,
    /// The effective `message.max.bytes` of the output: the smallest of the producer's and the
    /// topics' limits (see `anonymizer::effective_limit`).
    pub max_message_bytes: usize,
}

/// Stage one's decision for one input message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Produce these bytes to the anonymized topic. `url_redacted`: the URL policy changed the
    /// URL's query or fragment.
    Record {
        bytes: Vec<u8>,
        kind: AddressKind,
        url_redacted: bool,
    },
    /// Dead-letter the original payload with this reason and error text.
    DeadLetter { reason: Reason, error: String },
}

/// True when a record of `len` payload bytes fits a topic whose effective limit is
/// `max_message_bytes`: the same room [`crate::dead_letter::DeadLetterPayload`] keeps for headers
/// and Kafka's framing, so that the broker never sees a record the size check let through.
pub fn fits(len: usize, max_message_bytes: usize) -> bool {
    len.saturating_add(ENVELOPE_OVERHEAD) <= max_message_bytes
}

/// The whole per-record decision of stage one: decode → URL policy → validate → anonymize →
/// encode → size check. Pure (`now_ms` is given), so the anonymizer, the property tests and the
/// fuzz target run the very same decision. Deciding size here, before `send()`, matters: a size
/// the broker rejects arrives in a delivery report and makes the whole transaction abortable.
///
/// The URL policy comes before validation, so `max_url_bytes` bounds the URL as stored: a long
/// URL whose query the policy shortens enough is stored, not dead-lettered (and a dead letter
/// would carry its original bytes, query included).
pub fn process(
    payload: &[u8],
    source_partition: i32,
    source_offset: i64,
    stage: &StageOne,
    now_ms: u64,
) -> Outcome {
    let decided = crate::record::with_record(payload, |r| {
        let url = stage.url_query.apply(r.url);
        let url_redacted = matches!(url, std::borrow::Cow::Owned(_));
        let r = crate::record::RecordView { url: &url, ..r };
        if let Err(rejection) = crate::validate::check(&r, &stage.policy, now_ms) {
            return Outcome::DeadLetter {
                reason: rejection.reason,
                error: rejection.error,
            };
        }
        let (bytes, kind) =
            anonymized_bytes(&r, source_partition, source_offset, stage.ipv6_prefix_bits);
        if !fits(bytes.len(), stage.max_message_bytes) {
            return Outcome::DeadLetter {
                reason: Reason::RecordTooLarge,
                error: format!(
                    "anonymized record has {} bytes; with {ENVELOPE_OVERHEAD} bytes kept for framing it exceeds the effective message.max.bytes {}",
                    bytes.len(),
                    stage.max_message_bytes
                ),
            };
        }
        Outcome::Record {
            bytes,
            kind,
            url_redacted,
        }
    });
    decided.unwrap_or_else(|e| Outcome::DeadLetter {
        reason: Reason::Undecodable,
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode_capnp, HttpLogRecord};

    fn input() -> HttpLogRecord {
        HttpLogRecord {
            timestamp_epoch_milli: 1_700_000_000_123,
            resource_id: 42,
            bytes_sent: 1234,
            request_time_milli: 17,
            response_status: 404,
            cache_status: "MISS".into(),
            method: "GET".into(),
            remote_addr: "1.2.3.4".into(),
            url: "/r42/assets/7.jpg".into(),
        }
    }

    #[test]
    fn transform_anonymizes_and_round_trips() {
        let (bytes, kind) = transform(&encode_capnp(&input()), 3, 99, 48).unwrap();
        assert_eq!(kind, AddressKind::V4);
        let r = decode(&bytes).unwrap();
        let i = input();
        assert_eq!(r.remote_addr, "1.2.3.X");
        assert_eq!((r.source_partition, r.source_offset), (3, 99));
        assert_eq!(
            (
                r.timestamp_epoch_milli,
                r.resource_id,
                r.bytes_sent,
                r.request_time_milli,
                r.response_status
            ),
            (
                i.timestamp_epoch_milli,
                i.resource_id,
                i.bytes_sent,
                i.request_time_milli,
                i.response_status
            )
        );
        assert_eq!(
            (r.cache_status.as_str(), r.method.as_str(), r.url.as_str()),
            ("MISS", "GET", i.url.as_str())
        );
    }

    #[test]
    fn encoding_is_the_documented_array() {
        let (bytes, _) = transform(&encode_capnp(&input()), 0, 0, 48).unwrap();
        assert_eq!(bytes[0], 0x9c, "fixarray of 12");
        assert_eq!(bytes[1], VERSION, "version first");
    }

    #[test]
    fn invalid_addresses_are_marked_not_dropped() {
        let mut i = input();
        i.remote_addr = "999.1.1.1".into();
        let (bytes, kind) = transform(&encode_capnp(&i), 0, 1, 48).unwrap();
        assert_eq!(kind, AddressKind::Invalid);
        assert_eq!(
            decode(&bytes).unwrap().remote_addr,
            crate::anonymize::INVALID_MARKER
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(transform(b"garbage:123", 0, 1, 48).is_err());
    }

    /// Starting corpora for the fuzz targets in `fuzz/` (libFuzzer alone takes long to find Cap'n
    /// Proto's segment table). Ignored: run with `cargo test --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes files under fuzz/corpus"]
    fn write_fuzz_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let (decode_anonymize, anon_decode) =
            (root.join("decode_anonymize"), root.join("anon_decode"));
        std::fs::create_dir_all(&decode_anonymize).unwrap();
        std::fs::create_dir_all(&anon_decode).unwrap();
        let addrs = [
            "1.2.3.4",
            "::ffff:10.0.0.1",
            "2001:db8:85a3:8d3:1319:8a2e:370:7348",
            "fe80::1%eth0",
            crate::anonymize::INVALID_MARKER,
            "",
            " 010.1.1.1 ",
        ];
        for (i, addr) in addrs.into_iter().enumerate() {
            // Inside the fuzz target's time window (its "now" is 1_780_000_000_000).
            let capnp = encode_capnp(&HttpLogRecord {
                remote_addr: addr.into(),
                timestamp_epoch_milli: 1_779_999_999_000,
                url: "/r42/assets/7.jpg?page=2&email=a%40b.c;lang=en#top".into(),
                ..input()
            });
            // decode_anonymize: byte 0 is the IPv6 prefix length, byte 1 the message limit
            // (0 = 1,000,000), byte 2 the URL policy (mod 3), the rest the payload.
            for (bits, url_policy) in [(0u8, 0u8), (48, 1), (56, 2), (128, 0)] {
                let mut seed = vec![bits, 0, url_policy];
                seed.extend_from_slice(&capnp);
                std::fs::write(decode_anonymize.join(format!("seed-{i}-{bits}")), seed).unwrap();
            }
            let (anon, _) = transform(&capnp, 1, i as i64, 48).unwrap();
            std::fs::write(anon_decode.join(format!("seed-{i}")), anon).unwrap();
        }
    }

    #[test]
    fn unknown_version_is_rejected() {
        let (mut bytes, _) = transform(&encode_capnp(&input()), 0, 0, 48).unwrap();
        bytes[1] = 2;
        assert!(matches!(decode(&bytes), Err(AnonDecodeError::Version(2))));
    }
}

/// Property tests: the MessagePack encoding round-trips, and stage one's transform keeps every
/// field but the address.
#[cfg(test)]
mod props {
    use super::*;
    use crate::record::encode_capnp;
    use crate::record::props::any_record;
    use crate::record::HttpLogRecord;
    use crate::url_query::{AllowList, UrlQuery};
    use proptest::prelude::*;

    const NOW: u64 = 1_780_000_000_000;

    fn stage() -> StageOne {
        StageOne {
            ipv6_prefix_bits: 48,
            policy: crate::validate::Policy::from_settings(&crate::config::Settings::default()),
            url_query: UrlQuery::Keep,
            max_message_bytes: 1_000_000,
        }
    }

    fn any_url_query() -> impl Strategy<Value = UrlQuery> {
        prop_oneof![
            Just(UrlQuery::Keep),
            Just(UrlQuery::DropValues),
            Just(UrlQuery::AllowList(AllowList::new(["page", "lang"]))),
        ]
    }

    /// Records near the policy's bounds, so the property sees every verdict, not only rejections;
    /// some URLs carry a query (and cross `max_url_bytes` only because of it) and a fragment.
    fn plausible_record() -> impl Strategy<Value = HttpLogRecord> {
        (
            NOW - 31 * 86_400_000..NOW + 4_000_000,
            prop_oneof![95u16..605, any::<u16>()],
            prop_oneof![0usize..300, 8180usize..8200],
            prop_oneof![Just("1.2.3.4".to_string()), ".{0,70}"],
            prop_oneof![
                Just(String::new()),
                "\\?(page=[0-9]{1,2}|email=[a-z]{1,5}@x\\.y|lang=en|t=[a-f0-9]{1,8})([&;](page=[0-9]|email=a@b|x)){0,3}(#[a-z=]{0,6})?",
            ],
        )
            .prop_map(|(ts, status, url_len, addr, query)| HttpLogRecord {
                timestamp_epoch_milli: ts,
                resource_id: 1,
                bytes_sent: 100,
                request_time_milli: 5,
                response_status: status,
                cache_status: "HIT".into(),
                method: "GET".into(),
                remote_addr: addr,
                url: "u".repeat(url_len) + &query,
            })
    }

    fn any_anon_record() -> impl Strategy<Value = AnonRecord> {
        (
            any::<(u64, u64, u64, u64, u16)>(),
            any::<(String, String, String, String)>(),
            any::<(i32, i64)>(),
        )
            .prop_map(
                |((ts, resource, bytes, millis, status), (cache, method, addr, url), (p, o))| {
                    AnonRecord {
                        version: VERSION,
                        timestamp_epoch_milli: ts,
                        resource_id: resource,
                        bytes_sent: bytes,
                        request_time_milli: millis,
                        response_status: status,
                        cache_status: cache,
                        method,
                        remote_addr: addr,
                        url,
                        source_partition: p,
                        source_offset: o,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn msgpack_round_trips(r in any_anon_record()) {
            let bytes = encode(&r);
            prop_assert_eq!(bytes[0], 0x9c, "fixarray of 12");
            prop_assert_eq!(decode(&bytes).unwrap(), r.clone());
            // Borrowed text (what `transform` encodes) gives the same bytes as owned text.
            let borrowed = AnonRecord::<&str> {
                version: r.version,
                timestamp_epoch_milli: r.timestamp_epoch_milli,
                resource_id: r.resource_id,
                bytes_sent: r.bytes_sent,
                request_time_milli: r.request_time_milli,
                response_status: r.response_status,
                cache_status: &r.cache_status,
                method: &r.method,
                remote_addr: &r.remote_addr,
                url: &r.url,
                source_partition: r.source_partition,
                source_offset: r.source_offset,
            };
            prop_assert_eq!(encode(&borrowed), bytes);
        }

        #[test]
        fn other_versions_are_rejected(r in any_anon_record(), version in any::<u8>()) {
            prop_assume!(version != VERSION);
            let bytes = encode(&AnonRecord { version, ..r });
            prop_assert!(matches!(decode(&bytes), Err(AnonDecodeError::Version(v)) if v == version));
        }

        #[test]
        fn truncated_records_are_rejected(r in any_anon_record(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&r);
            prop_assert!(decode(&bytes[..cut.index(bytes.len())]).is_err());
        }

        /// The fuzz target `decode_anonymize`'s invariant, cheaply on every `cargo test`: any
        /// payload becomes a record that decodes, passes the policy and fits, or a dead letter
        /// with a reason and a text; never a panic.
        #[test]
        fn any_payload_is_a_record_or_a_reason(
            payload in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                (any_record(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4))
                    .prop_map(|(r, flips)| {
                        let mut bytes = encode_capnp(&r);
                        for (i, b) in flips {
                            let i = i.index(bytes.len());
                            bytes[i] ^= b;
                        }
                        bytes
                    }),
                plausible_record().prop_map(|r| encode_capnp(&r)),
            ],
            limit in prop_oneof![Just(1_000_000usize), 4096usize..4500],
            url_query in any_url_query(),
        ) {
            let stage = StageOne { max_message_bytes: limit, url_query, ..stage() };
            match process(&payload, 0, 0, &stage, NOW) {
                Outcome::Record { bytes, kind, url_redacted } => {
                    prop_assert!(fits(bytes.len(), limit));
                    let out = decode(&bytes).unwrap();
                    let input = crate::record::decode_capnp(&payload).unwrap();
                    let stored_url = stage.url_query.apply(&input.url);
                    // The policy's verdict is on the URL as stored.
                    crate::record::with_record(&payload, |v| {
                        let v = crate::record::RecordView { url: &stored_url, ..v };
                        crate::validate::check(&v, &stage.policy, NOW).unwrap()
                    }).unwrap();
                    prop_assert_eq!(kind == AddressKind::Invalid, out.remote_addr == crate::anonymize::INVALID_MARKER);
                    prop_assert_eq!(url_redacted, out.url != input.url);
                    prop_assert_eq!(&out.url, &*stored_url);
                    if stage.url_query != UrlQuery::Keep {
                        prop_assert!(!out.url.contains('#'), "{:?}", out.url);
                    }
                }
                Outcome::DeadLetter { reason, error } => {
                    prop_assert!(!error.trim().is_empty());
                    prop_assert!(crate::dead_letter::Reason::ALL.contains(&reason));
                    let decodes = crate::record::decode_capnp(&payload).is_ok();
                    prop_assert_eq!(reason == Reason::Undecodable, !decodes, "{}", error);
                    if reason == Reason::Undecodable {
                        let detail = error.strip_prefix("not a Cap'n Proto HttpLogRecord: ").unwrap();
                        prop_assert!(!detail.trim().is_empty(), "{:?}", error);
                    }
                    let dlq = crate::dead_letter::DeadLetterPayload::of(&payload, limit);
                    prop_assert!(fits(dlq.bytes.len(), limit.max(ENVELOPE_OVERHEAD)));
                }
            }
        }

        #[test]
        fn transform_keeps_every_field_but_the_address(
            input in any_record(),
            partition in any::<i32>(),
            offset in any::<i64>(),
            prefix in 0u8..=128,
        ) {
            let (bytes, kind) = transform(&encode_capnp(&input), partition, offset, prefix).unwrap();
            let out = decode(&bytes).unwrap();
            let anonymized = anonymize_ip(&input.remote_addr, prefix);
            prop_assert_eq!(out.remote_addr.as_str(), anonymized.as_str());
            prop_assert_eq!(kind == AddressKind::Invalid, anonymized == Anonymized::Invalid);
            let expected = AnonRecord {
                version: VERSION,
                timestamp_epoch_milli: input.timestamp_epoch_milli,
                resource_id: input.resource_id,
                bytes_sent: input.bytes_sent,
                request_time_milli: input.request_time_milli,
                response_status: input.response_status,
                cache_status: input.cache_status,
                method: input.method,
                remote_addr: out.remote_addr.clone(),
                url: input.url,
                source_partition: partition,
                source_offset: offset,
            };
            prop_assert_eq!(out, expected);
        }
    }
}

/// Stage one's decision at its boundaries: validity reasons, and the size check just under, at
/// and just over the effective limit.
#[cfg(test)]
mod process_tests {
    use super::*;
    use crate::record::{encode_capnp, HttpLogRecord};
    use crate::url_query::{AllowList, UrlQuery};

    const NOW: u64 = 1_780_000_000_000;

    fn stage(limit: usize) -> StageOne {
        StageOne {
            ipv6_prefix_bits: 48,
            policy: crate::validate::Policy::from_settings(&crate::config::Settings::default()),
            url_query: UrlQuery::Keep,
            max_message_bytes: limit,
        }
    }

    fn record(url_len: usize) -> HttpLogRecord {
        HttpLogRecord {
            timestamp_epoch_milli: NOW,
            resource_id: 7,
            bytes_sent: 1,
            request_time_milli: 1,
            response_status: 200,
            cache_status: "HIT".into(),
            method: "GET".into(),
            remote_addr: "1.2.3.4".into(),
            url: "u".repeat(url_len),
        }
    }

    fn encoded_len(url_len: usize) -> usize {
        match process(&encode_capnp(&record(url_len)), 1, 2, &stage(1 << 20), NOW) {
            Outcome::Record { bytes, .. } => bytes.len(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn size_boundaries() {
        // str16 header from 256 bytes on: one more URL byte is one more record byte.
        let url = 1000;
        let len = encoded_len(url);
        assert_eq!(encoded_len(url + 1), len + 1);
        let limit = len + ENVELOPE_OVERHEAD;
        for (url_len, fits) in [(url - 1, true), (url, true), (url + 1, false)] {
            let out = process(&encode_capnp(&record(url_len)), 1, 2, &stage(limit), NOW);
            match out {
                Outcome::Record { .. } => assert!(fits, "{url_len}"),
                Outcome::DeadLetter { reason, .. } => {
                    assert!(!fits, "{url_len}");
                    assert_eq!(reason, Reason::RecordTooLarge);
                }
            }
        }
    }

    #[test]
    fn reasons() {
        let s = stage(1_000_000);
        let run = |r: HttpLogRecord| match process(&encode_capnp(&r), 0, 0, &s, NOW) {
            Outcome::Record { .. } => None,
            Outcome::DeadLetter { reason, .. } => Some(reason),
        };
        assert_eq!(run(record(10)), None);
        assert_eq!(
            run(HttpLogRecord {
                timestamp_epoch_milli: u64::MAX,
                ..record(1)
            }),
            Some(Reason::TimestampOutOfRange)
        );
        assert_eq!(
            run(HttpLogRecord {
                response_status: 0,
                ..record(1)
            }),
            Some(Reason::ValueOutOfRange)
        );
        assert_eq!(run(record(8193)), Some(Reason::FieldTooLong));
        let long_addr = HttpLogRecord {
            remote_addr: "9".repeat(100_000),
            ..record(1)
        };
        assert!(matches!(
            process(&encode_capnp(&long_addr), 0, 0, &s, NOW),
            Outcome::Record {
                kind: AddressKind::Invalid,
                ..
            }
        ));
        assert!(matches!(
            process(b"garbage", 0, 0, &s, NOW),
            Outcome::DeadLetter {
                reason: Reason::Undecodable,
                ..
            }
        ));
    }

    /// The URL policy runs before the checks: `max_url_bytes` and the size check see the URL as
    /// stored, so a URL over the bound only because of its query is stored once the policy
    /// removes the query, and dead-lettered (original bytes) under `keep`.
    #[test]
    fn the_policy_runs_before_the_url_and_size_checks() {
        let long_token = format!("/r7/a.jpg?page=2&token={}", "t".repeat(9000));
        let r = HttpLogRecord {
            url: long_token.clone(),
            ..record(0)
        };
        let run = |url_query: UrlQuery, limit: usize| {
            let s = StageOne {
                url_query,
                ..stage(limit)
            };
            process(&encode_capnp(&r), 0, 0, &s, NOW)
        };
        assert!(matches!(
            run(UrlQuery::Keep, 1_000_000),
            Outcome::DeadLetter {
                reason: Reason::FieldTooLong,
                ..
            }
        ));
        let page = UrlQuery::AllowList(AllowList::new(["page"]));
        for (policy, stored) in [
            (page.clone(), "/r7/a.jpg?page=2"),
            (UrlQuery::DropValues, "/r7/a.jpg?page=&token="),
        ] {
            match run(policy, 1_000_000) {
                Outcome::Record {
                    bytes,
                    url_redacted,
                    ..
                } => {
                    assert!(url_redacted);
                    assert_eq!(decode(&bytes).unwrap().url, stored);
                }
                other => panic!("{other:?}"),
            }
        }
        // The size check measures the redacted record: a limit the original URL's record would
        // exceed many times over passes the redacted one.
        let small = encoded_len(0) + ENVELOPE_OVERHEAD + 64;
        assert!(matches!(run(page, small), Outcome::Record { .. }));
    }

    #[test]
    fn url_redacted_says_whether_the_url_changed() {
        let s = StageOne {
            url_query: UrlQuery::DropValues,
            ..stage(1_000_000)
        };
        for (url, stored, redacted) in [
            ("/a?email=a@b.c&page=2", "/a?email=&page=", true),
            ("/a?email=&page=", "/a?email=&page=", false),
            ("/a#frag", "/a", true),
            ("/plain", "/plain", false),
        ] {
            let r = HttpLogRecord {
                url: url.into(),
                ..record(0)
            };
            match process(&encode_capnp(&r), 0, 0, &s, NOW) {
                Outcome::Record {
                    bytes,
                    url_redacted,
                    ..
                } => {
                    assert_eq!(url_redacted, redacted, "{url}");
                    assert_eq!(decode(&bytes).unwrap().url, stored);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
