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
/// anonymize the address, encode MessagePack. Pure: the same input gives the same bytes.
pub fn transform(
    payload: &[u8],
    source_partition: i32,
    source_offset: i64,
    ipv6_prefix_bits: u8,
) -> Result<(Vec<u8>, AddressKind), DecodeError> {
    crate::record::with_record(payload, |r| {
        let anonymized = anonymize_ip(r.remote_addr, ipv6_prefix_bits);
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
            let capnp = encode_capnp(&HttpLogRecord {
                remote_addr: addr.into(),
                ..input()
            });
            // decode_anonymize: byte 0 is the IPv6 prefix length, the rest the payload.
            for bits in [0u8, 48, 56, 128] {
                let mut seed = vec![bits];
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
    use proptest::prelude::*;

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
        /// payload becomes a decodable record or a dead letter with a reason, never a panic.
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
            ],
        ) {
            match transform(&payload, 0, 0, 48) {
                Ok((bytes, _)) => {
                    let out = decode(&bytes).unwrap();
                    let input = crate::record::decode_capnp(&payload).unwrap();
                    let expected = anonymize_ip(&input.remote_addr, 48);
                    prop_assert_eq!(out.remote_addr.as_str(), expected.as_str());
                }
                Err(e) => {
                    let reason = e.to_string();
                    let detail = reason.strip_prefix("not a Cap'n Proto HttpLogRecord: ").unwrap();
                    prop_assert!(!detail.trim().is_empty(), "{:?}", reason);
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
