//! The hostile corpus and its helpers, shared by the stage-one test and the end-to-end one.

use std::time::Duration;

use edgelog::anon_record::{process, Outcome, StageOne};
use edgelog::config::Settings;
use edgelog::dead_letter::{Reason, ENVELOPE_OVERHEAD};
use edgelog::record::{encode_capnp, HttpLogRecord};
use edgelog::validate::{Policy, DATETIME_MAX_MS, MAX_LABEL_BYTES};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// Writes `payloads` to partition 0 of the input topic, in order (offsets 0, 1, ...).
pub fn produce(s: &Settings, payloads: &[Vec<u8>]) {
    produce_to(s, &s.topics.input, payloads);
}

pub const DAY: u64 = 86_400_000;

/// Writes `payloads` to partition 0 of `topic`, in order (offsets 0, 1, ...).
pub fn produce_to(s: &Settings, topic: &str, payloads: &[Vec<u8>]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    for p in payloads {
        producer
            .send(
                BaseRecord::<(), [u8]>::to(topic)
                    .partition(0)
                    .payload(&p[..]),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

pub async fn set_topic_limit(s: &Settings, topic: &str, bytes: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .create()
        .unwrap();
    let value = bytes.to_string();
    let alter = AlterConfig::new(ResourceSpecifier::Topic(topic))
        .set("max.message.bytes", &value)
        .set("retention.ms", "604800000");
    for r in admin
        .alter_configs(&[alter], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    // The broker applies the change a moment after answering: a stage started before it reads
    // the old limit (seen under load as a corpus record sent instead of dead-lettered).
    super::wait_for(
        &format!("{topic}'s max.message.bytes to read {bytes}"),
        Duration::from_secs(30),
        || async {
            let described = admin
                .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
                .await
                .ok()?;
            let resource = described.into_iter().next()?.ok()?;
            let value = resource.get("max.message.bytes")?.value.clone()?;
            (value == bytes.to_string()).then_some(())
        },
    )
    .await;
}

pub fn now_ms() -> u64 {
    edgelog::clock::now_epoch_ms()
}

pub fn record(ts: u64) -> HttpLogRecord {
    HttpLogRecord {
        timestamp_epoch_milli: ts,
        resource_id: 7,
        bytes_sent: 1234,
        request_time_milli: 12,
        response_status: 200,
        cache_status: "HIT".into(),
        method: "GET".into(),
        remote_addr: "10.1.2.3".into(),
        url: "/r7/a.jpg".into(),
    }
}

/// `r` encoded, then the bytes of `marker` (a unique text placed in one field) overwritten with
/// bytes that are not UTF-8.
pub fn with_invalid_utf8(r: HttpLogRecord, marker: &str) -> Vec<u8> {
    let mut bytes = encode_capnp(&r);
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("marker encoded verbatim");
    bytes[at..at + marker.len()].fill(0xff);
    bytes
}

/// Every boundary stage one decides on, one input record each, with the dead-letter reason
/// expected (`None`: it is stored). `limit` is the output topic's `max.message.bytes` (the size
/// cases sit around it); the anonymizer must run with `anonymizer.max_url_bytes` = 100,000.
pub fn stage_one_corpus(
    s: &Settings,
    limit: usize,
) -> Vec<(&'static str, Vec<u8>, Option<Reason>)> {
    let policy = Policy::from_settings(s);
    let (skew, age) = (policy.max_future_skew_ms, policy.max_age_ms.unwrap());
    let now = now_ms();
    // The anonymizer's clock reads later than `now` by up to the test's duration: the accepted
    // cases lean inwards by 2 minutes, the rejected ones outwards.
    let slack = 120_000;
    // The output size of a record with a URL of `n` bytes (offsets below 128 encode alike).
    let stage = StageOne {
        ipv6_prefix_bits: 48,
        policy,
        url_query: s.anonymizer.url_query.clone(),
        max_message_bytes: usize::MAX,
    };
    let size_of = |n: usize| match process(
        &encode_capnp(&HttpLogRecord {
            url: "u".repeat(n),
            ..record(now)
        }),
        0,
        1,
        &stage,
        now,
    ) {
        Outcome::Record { bytes, .. } => bytes.len(),
        o => panic!("{o:?}"),
    };
    let at_limit = limit - ENVELOPE_OVERHEAD - (size_of(1000) - 1000);
    assert_eq!(size_of(at_limit) + ENVELOPE_OVERHEAD, limit);

    use Reason::*;
    let r = record;
    let url = |n: usize| HttpLogRecord {
        url: "u".repeat(n),
        ..r(now)
    };
    let long_label = "L".repeat(MAX_LABEL_BYTES + 1);
    let good = encode_capnp(&r(now));
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0; 8]);
    let cases: Vec<(&'static str, Vec<u8>, Option<Reason>)> = vec![
        ("plain", good.clone(), None),
        ("size: just under", encode_capnp(&url(at_limit - 1)), None),
        ("size: at the limit", encode_capnp(&url(at_limit)), None),
        (
            "size: just over",
            encode_capnp(&url(at_limit + 1)),
            Some(RecordTooLarge),
        ),
        (
            "size: far over",
            encode_capnp(&url(50_000)),
            Some(RecordTooLarge),
        ),
        (
            "url: over max_url_bytes",
            encode_capnp(&url(100_001)),
            Some(FieldTooLong),
        ),
        ("ts: 0", encode_capnp(&r(0)), Some(OlderThanRetention)),
        (
            "ts: DateTime max",
            encode_capnp(&r(DATETIME_MAX_MS)),
            Some(TimestampInFuture),
        ),
        (
            "ts: DateTime max + 1 s",
            encode_capnp(&r(DATETIME_MAX_MS + 1000)),
            Some(TimestampOutOfRange),
        ),
        (
            "ts: u64::MAX",
            encode_capnp(&r(u64::MAX)),
            Some(TimestampOutOfRange),
        ),
        (
            "ts: now + skew - 1 s",
            encode_capnp(&r(now + skew - 1000)),
            None,
        ),
        (
            "ts: now + skew + 1 s",
            encode_capnp(&r(now + skew + slack)),
            Some(TimestampInFuture),
        ),
        (
            "ts: now - age + margin",
            encode_capnp(&r(now - age + slack)),
            None,
        ),
        (
            "ts: now - age - 1 s",
            encode_capnp(&r(now - age - 1000)),
            Some(OlderThanRetention),
        ),
        (
            "ts: now - 40 days",
            encode_capnp(&r(now - 40 * DAY)),
            Some(OlderThanRetention),
        ),
        (
            "status 0",
            encode_capnp(&HttpLogRecord {
                response_status: 0,
                ..r(now)
            }),
            Some(ValueOutOfRange),
        ),
        (
            "status 99",
            encode_capnp(&HttpLogRecord {
                response_status: 99,
                ..r(now)
            }),
            Some(ValueOutOfRange),
        ),
        (
            "status 100",
            encode_capnp(&HttpLogRecord {
                response_status: 100,
                ..r(now)
            }),
            None,
        ),
        (
            "status 599",
            encode_capnp(&HttpLogRecord {
                response_status: 599,
                ..r(now)
            }),
            None,
        ),
        (
            "status 600",
            encode_capnp(&HttpLogRecord {
                response_status: 600,
                ..r(now)
            }),
            Some(ValueOutOfRange),
        ),
        (
            "status u16::MAX",
            encode_capnp(&HttpLogRecord {
                response_status: u16::MAX,
                ..r(now)
            }),
            Some(ValueOutOfRange),
        ),
        (
            "resource_id u64::MAX",
            encode_capnp(&HttpLogRecord {
                resource_id: u64::MAX,
                ..r(now)
            }),
            None,
        ),
        (
            "bytes_sent u64::MAX",
            encode_capnp(&HttpLogRecord {
                bytes_sent: u64::MAX,
                ..r(now)
            }),
            Some(ValueOutOfRange),
        ),
        (
            "request_time u64::MAX",
            encode_capnp(&HttpLogRecord {
                request_time_milli: u64::MAX,
                ..r(now)
            }),
            Some(ValueOutOfRange),
        ),
        (
            "method too long",
            encode_capnp(&HttpLogRecord {
                method: long_label.clone(),
                ..r(now)
            }),
            Some(FieldTooLong),
        ),
        (
            "cache_status too long",
            encode_capnp(&HttpLogRecord {
                cache_status: long_label.clone(),
                ..r(now)
            }),
            Some(FieldTooLong),
        ),
        (
            "address 100 KB: stored as invalid",
            encode_capnp(&HttpLogRecord {
                remote_addr: "9".repeat(100_000),
                ..r(now)
            }),
            None,
        ),
        (
            "address empty: stored as invalid",
            encode_capnp(&HttpLogRecord {
                remote_addr: String::new(),
                ..r(now)
            }),
            None,
        ),
        (
            "utf-8: url",
            with_invalid_utf8(
                HttpLogRecord {
                    url: "@@URL@@".into(),
                    ..r(now)
                },
                "@@URL@@",
            ),
            Some(Undecodable),
        ),
        (
            "utf-8: method",
            with_invalid_utf8(
                HttpLogRecord {
                    method: "@@MTH@@".into(),
                    ..r(now)
                },
                "@@MTH@@",
            ),
            Some(Undecodable),
        ),
        (
            "utf-8: cache_status",
            with_invalid_utf8(
                HttpLogRecord {
                    cache_status: "@@CST@@".into(),
                    ..r(now)
                },
                "@@CST@@",
            ),
            Some(Undecodable),
        ),
        (
            "utf-8: remote_addr",
            with_invalid_utf8(
                HttpLogRecord {
                    remote_addr: "@@ADR@@".into(),
                    ..r(now)
                },
                "@@ADR@@",
            ),
            Some(Undecodable),
        ),
        ("empty payload", Vec::new(), Some(Undecodable)),
        ("garbage", b"garbage: not capnp".to_vec(), Some(Undecodable)),
        (
            "truncated frame",
            good[..good.len() / 2].to_vec(),
            Some(Undecodable),
        ),
        ("trailing bytes", trailing, Some(Undecodable)),
        ("garbage, 100 KB", vec![0xab; 100_000], Some(Undecodable)),
        ("plain, last", good.clone(), None),
    ];
    cases
}
