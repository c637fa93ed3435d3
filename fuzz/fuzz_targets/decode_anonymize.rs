//! Arbitrary bytes through the anonymizer's per-message function, `anon_record::transform`: the
//! bytes become either an anonymized record or a dead letter, never a panic or a leak.
//!
//! Input layout: byte 0 picks the IPv6 prefix length (any value `config` accepts, 0..=128), the
//! rest is the Kafka payload. Source partition/offset are fixed: they are copied, not parsed.
#![no_main]

use edgelog::anon_record::{decode, transform, AddressKind};
use edgelog::anonymize::{anonymize_ip, INVALID_MARKER};
use edgelog::record::decode_capnp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, payload)) = data.split_first() else {
        return;
    };
    let prefix_bits = first % 129;
    match transform(payload, 7, 1234, prefix_bits) {
        Ok((bytes, kind)) => {
            let out = decode(&bytes).expect("transform output decodes");
            let input = decode_capnp(payload).expect("transform accepted it, so it decodes");
            assert_eq!(
                out.remote_addr,
                anonymize_ip(&input.remote_addr, prefix_bits).as_str()
            );
            match kind {
                AddressKind::Invalid => assert_eq!(out.remote_addr, INVALID_MARKER),
                AddressKind::V4 | AddressKind::V6 => {
                    assert!(out.remote_addr.ends_with('X'), "{:?}", out.remote_addr)
                }
            }
            // The original text survives only when it was the marker itself.
            assert!(
                out.remote_addr != input.remote_addr || input.remote_addr == INVALID_MARKER,
                "{:?} passed through",
                input.remote_addr
            );
            assert_eq!((out.source_partition, out.source_offset), (7, 1234));
            assert_eq!(
                (
                    out.timestamp_epoch_milli,
                    out.resource_id,
                    out.bytes_sent,
                    out.request_time_milli,
                    out.response_status,
                    out.cache_status.as_str(),
                    out.method.as_str(),
                    out.url.as_str(),
                ),
                (
                    input.timestamp_epoch_milli,
                    input.resource_id,
                    input.bytes_sent,
                    input.request_time_milli,
                    input.response_status,
                    input.cache_status.as_str(),
                    input.method.as_str(),
                    input.url.as_str(),
                )
            );
        }
        Err(e) => {
            // The reason goes into the dead letter's `edgelog.error` header; it must say something
            // beyond the fixed prefix.
            let reason = e.to_string();
            let detail = reason
                .strip_prefix("not a Cap'n Proto HttpLogRecord: ")
                .expect("fixed prefix");
            assert!(!detail.trim().is_empty(), "empty reason: {reason:?}");
            assert!(decode_capnp(payload).is_err(), "the two decoders disagree");
        }
    }
});
