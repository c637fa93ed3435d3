//! Arbitrary bytes through stage one's whole per-record decision, `anon_record::process`
//! (decode → validate → anonymize → encode → size check): the bytes become either a record that
//! decodes, passes the validity policy and fits the limit, or a dead letter with a reason, never
//! a panic or a leak.
//!
//! Input layout: byte 0 picks the IPv6 prefix length (any value `config` accepts, 0..=128), byte 1
//! the effective message limit (0 = 1,000,000, else 5,120 + 16 × byte: the smallest limit stage
//! one starts with and up), byte 2 the URL policy (byte mod 3: `keep`, `drop_values`, an
//! allow-list of `page` and `lang`), the rest is the Kafka payload. "Now" and the source position
//! are fixed: the policy's time windows are property-tested in `validate`.
#![no_main]

use edgelog::anon_record::{decode, fits, process, Outcome, StageOne};
use edgelog::anonymize::{anonymize_ip, Anonymized, INVALID_MARKER};
use edgelog::config::Settings;
use edgelog::dead_letter::{DeadLetterPayload, Reason};
use edgelog::record::{decode_capnp, with_record, RecordView};
use edgelog::url_query::{AllowList, UrlQuery};
use edgelog::validate::{address_to_parse, check, Policy};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_780_000_000_000;

fuzz_target!(|data: &[u8]| {
    let [first, second, third, payload @ ..] = data else {
        return;
    };
    let url_query = match third % 3 {
        0 => UrlQuery::Keep,
        1 => UrlQuery::DropValues,
        _ => UrlQuery::AllowList(AllowList::new(["page", "lang"])),
    };
    let prefix_bits = first % 129;
    let limit = match second {
        0 => 1_000_000,
        n => 5_120 + 16 * usize::from(*n),
    };
    let stage = StageOne {
        ipv6_prefix_bits: prefix_bits,
        policy: Policy::from_settings(&Settings::default()),
        url_query,
        max_message_bytes: limit,
    };
    match process(payload, 7, 1234, &stage, NOW) {
        Outcome::Record {
            bytes,
            url_redacted,
            ..
        } => {
            assert!(
                fits(bytes.len(), limit),
                "{} bytes over {limit}",
                bytes.len()
            );
            let out = decode(&bytes).expect("process output decodes");
            let input = decode_capnp(payload).expect("process accepted it, so it decodes");
            // The URL as the policy leaves it is what is stored and what the checks saw.
            let stored_url = stage.url_query.apply(&input.url);
            with_record(payload, |v| {
                check(
                    &RecordView {
                        url: &stored_url,
                        ..v
                    },
                    &stage.policy,
                    NOW,
                )
            })
            .unwrap()
            .expect("process accepted it, so the policy does");
            assert_eq!(url_redacted, stored_url != input.url);
            if stage.url_query != UrlQuery::Keep {
                assert!(!out.url.contains('#'), "a fragment passed: {:?}", out.url);
            }
            let expected = address_to_parse(&input.remote_addr)
                .map(|a| anonymize_ip(a, prefix_bits))
                .unwrap_or(Anonymized::Invalid);
            assert_eq!(out.remote_addr, expected.as_str());
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
                    &*stored_url,
                )
            );
        }
        Outcome::DeadLetter { reason, error } => {
            // The error goes into the dead letter's `edgelog.error` header: it must say something.
            assert!(!error.trim().is_empty(), "empty error for {reason}");
            assert_eq!(
                reason == Reason::Undecodable,
                decode_capnp(payload).is_err(),
                "the two decoders disagree: {reason} {error}"
            );
            let envelope = DeadLetterPayload::of(payload, limit);
            assert!(fits(envelope.bytes.len(), limit));
            assert!(payload.starts_with(&envelope.bytes));
        }
    }
});
