//! Stage one against hostile input and failing produces, on the real broker with the real
//! `anonymizer` binary: no record wedges it, is duplicated or vanishes. Every input offset ends up
//! exactly once in either `http_log_anon` or the dead-letter topic, with the expected reason.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::hostile::*;
use common::*;
use edgelog::config::Settings;
use edgelog::dead_letter::{self as dl, Reason, ENVELOPE_OVERHEAD};
use edgelog::record::{encode_capnp, HttpLogRecord};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::Message;

/// Where one input offset ended up.
#[derive(Debug, Clone)]
struct Landed {
    dead_letter: bool,
    headers: BTreeMap<String, String>,
    payload: Vec<u8>,
}

/// Reads the output and the dead-letter topic (read_committed) until `expected` input offsets
/// were seen and nothing more arrived for 3 s. Returns every landing per (partition, offset).
fn read_landed(s: &Settings, expected: usize) -> BTreeMap<(i32, i64), Vec<Landed>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .set("group.id", unique("audit"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&s.topics.anonymized, &s.topics.dead_letter])
        .unwrap();
    let mut seen: BTreeMap<(i32, i64), Vec<Landed>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut quiet = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let payload = m.payload().unwrap_or(&[]).to_vec();
                let headers: BTreeMap<String, String> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                let v = String::from_utf8_lossy(x.value.unwrap_or(&[]));
                                (x.key.to_string(), v.into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let dead_letter = m.topic() == s.topics.dead_letter;
                let key = if dead_letter {
                    (
                        headers[dl::HEADER_PARTITION].parse().unwrap(),
                        headers[dl::HEADER_OFFSET].parse().unwrap(),
                    )
                } else {
                    let r = edgelog::anon_record::decode(&payload).unwrap();
                    (r.source_partition, r.source_offset)
                };
                seen.entry(key).or_default().push(Landed {
                    dead_letter,
                    headers,
                    payload,
                });
                quiet = Instant::now();
            }
            Some(Err(e)) => panic!("{e}"),
            None if seen.len() >= expected && quiet.elapsed() >= Duration::from_secs(3) => break,
            None => {}
        }
    }
    assert!(
        seen.len() >= expected,
        "only {} of {expected} input offsets arrived",
        seen.len()
    );
    seen
}

fn assert_exactly_once(seen: &BTreeMap<(i32, i64), Vec<Landed>>, n: usize) {
    for offset in 0..n as i64 {
        let landed = seen.get(&(0, offset)).map(Vec::len).unwrap_or(0);
        assert_eq!(landed, 1, "input offset {offset} landed {landed} times");
    }
    assert_eq!(seen.len(), n, "nothing unexpected: {:?}", seen.keys());
}

/// `landed` is a dead letter of stage one with `reason`, and its headers name it fully.
fn assert_dead_letter(s: &Settings, offset: i64, landed: &Landed, reason: Reason) {
    assert!(landed.dead_letter, "offset {offset} was not dead-lettered");
    let h = &landed.headers;
    assert_eq!(
        h[dl::HEADER_REASON],
        reason.label(),
        "offset {offset}: {h:?}"
    );
    assert_eq!(h[dl::HEADER_STAGE], "anonymizer");
    assert_eq!(h[dl::HEADER_TOPIC], s.topics.input);
    assert_eq!(h[dl::HEADER_PARTITION], "0");
    assert!(!h[dl::HEADER_ERROR].is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_error_mid_transaction_aborts_it_and_nothing_is_duplicated() {
    require_stack();
    let mut s = isolated_settings();
    s.anonymizer.txn_max_records = 300;
    edgelog::setup::create_topics(&s).await.unwrap();
    let payloads: Vec<Vec<u8>> = (0..1_000)
        .map(|_| encode_capnp(&record(now_ms())))
        .collect();
    produce(&s, &payloads);
    // The 150th send fails with an abortable error while its transaction holds 149 records.
    // Rewinding without aborting would commit those 149 together with their second copies.
    let mut child = KillOnDrop::spawn(
        anonymizer_command(&s, "0").env("ANONYMIZER_FAILPOINT", "send_error_at:150"),
    );
    let seen = tokio::task::spawn_blocking({
        let s = s.clone();
        move || read_landed(&s, 1_000)
    })
    .await
    .unwrap();
    assert_exactly_once(&seen, 1_000);
    assert!(seen.values().all(|l| !l[0].dead_letter));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the anonymizer keeps running"
    );
    child.kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_record_is_dead_lettered_and_its_neighbours_land_once() {
    require_stack();
    let mut s = isolated_settings();
    s.anonymizer.txn_max_records = 300;
    edgelog::setup::create_topics(&s).await.unwrap();
    // The producer's limit, not the topic's: 6000 bytes, so 1904 bytes of room for a record.
    let limit = 6_000;
    let room = limit - ENVELOPE_OVERHEAD;
    let big = HttpLogRecord {
        url: "u".repeat(3_000),
        ..record(now_ms())
    };
    let big_bytes = encode_capnp(&big);
    let mut payloads: Vec<Vec<u8>> = (0..20).map(|_| encode_capnp(&record(now_ms()))).collect();
    payloads.insert(10, big_bytes.clone());
    produce(&s, &payloads);
    let mut child = KillOnDrop::spawn(
        anonymizer_command(&s, "0")
            .env(
                "EDGELOG_ANONYMIZER__KAFKA_OPTIONS__MESSAGE_MAX_BYTES",
                limit.to_string(),
            )
            .env("EDGELOG_ANONYMIZER__MAX_URL_BYTES", "100000"),
    );
    let seen = tokio::task::spawn_blocking({
        let s = s.clone();
        move || read_landed(&s, 21)
    })
    .await
    .unwrap();
    assert_exactly_once(&seen, 21);
    for (&(_, offset), landed) in &seen {
        if offset == 10 {
            let l = &landed[0];
            assert_dead_letter(&s, offset, l, Reason::RecordTooLarge);
            // It does not fit whole: a truncated envelope with the original's size and hash.
            assert_eq!(l.payload, big_bytes[..room]);
            assert_eq!(
                l.headers[dl::HEADER_ORIGINAL_SIZE],
                big_bytes.len().to_string()
            );
            let hash = dl::DeadLetterPayload::of(&big_bytes, limit)
                .truncated
                .unwrap()
                .1;
            assert_eq!(l.headers[dl::HEADER_ORIGINAL_SHA256], hash);
        } else {
            assert!(!landed[0].dead_letter, "offset {offset}");
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the anonymizer keeps running"
    );
    child.kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_that_cannot_hold_an_envelope_stop_the_start_naming_them() {
    require_stack();
    let s = isolated_settings();
    edgelog::setup::create_topics(&s).await.unwrap();
    set_topic_limit(&s, &s.topics.dead_letter, 5_000).await;
    let output = anonymizer_command(&s, "0")
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for part in [
        format!("topic {} max.message.bytes = 5000", s.topics.dead_letter),
        "message.max.bytes (librdkafka default) = 1000000".to_string(),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in {stderr}");
    }
}

/// Every boundary stage one decides on, each as one input record, through the real binary with
/// the output topic's `max.message.bytes` lowered to 12,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_corpus_lands_once_each_in_the_output_or_the_dead_letters() {
    require_stack();
    let mut s = isolated_settings();
    s.anonymizer.max_url_bytes = 100_000;
    let s = s.validated().unwrap();
    edgelog::setup::create_topics(&s).await.unwrap();
    let limit = 12_000;
    set_topic_limit(&s, &s.topics.anonymized, limit).await;

    let cases = stage_one_corpus(&s, limit);
    let payloads: Vec<Vec<u8>> = cases.iter().map(|(_, p, _)| p.clone()).collect();
    produce(&s, &payloads);
    let mut child = KillOnDrop::spawn(
        anonymizer_command(&s, "0").env("EDGELOG_ANONYMIZER__MAX_URL_BYTES", "100000"),
    );
    let seen = tokio::task::spawn_blocking({
        let s = s.clone();
        let n = cases.len();
        move || read_landed(&s, n)
    })
    .await
    .unwrap();
    assert_exactly_once(&seen, cases.len());
    for (offset, (name, payload, expected)) in cases.iter().enumerate() {
        let landed = &seen[&(0, offset as i64)][0];
        match expected {
            None => {
                assert!(
                    !landed.dead_letter,
                    "{name}: dead-lettered {:?}",
                    landed.headers
                );
                assert!(landed.payload.len() + ENVELOPE_OVERHEAD <= limit, "{name}");
            }
            Some(reason) => {
                assert_dead_letter(&s, offset as i64, landed, *reason);
                let truncated = payload.len() + ENVELOPE_OVERHEAD > limit;
                assert_eq!(
                    landed.headers.contains_key(dl::HEADER_ORIGINAL_SIZE),
                    truncated,
                    "{name}"
                );
                let kept = if truncated {
                    limit - ENVELOPE_OVERHEAD
                } else {
                    payload.len()
                };
                assert_eq!(landed.payload, payload[..kept], "{name}");
            }
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the anonymizer keeps running"
    );
    child.kill().unwrap();
}

/// The synthetic producer's hostile records, end to end: stage one dead-letters them, none
/// reaches ClickHouse, and `verify` accounts for their offsets as dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_records_never_reach_clickhouse_and_verify_accounts_for_them() {
    require_stack();
    let mut s = fast_loader_settings();
    s.producer.garbage_share = 0.01;
    s.producer.hostile_share = 0.05;
    let produced = fill_anonymized_topic(&s, 2000).await;
    assert!(produced.hostile > 40, "{produced:?}");
    let loader = start_loader(&s);
    let report = edgelog::verify::audit_when_drained(&s, Duration::from_secs(120))
        .await
        .unwrap();
    loader.stop().await.expect("the loader stops cleanly");
    assert!(report.is_clean() && report.is_drained(), "{report}");
    let landed: u64 = report.partitions.iter().map(|p| p.landed).sum();
    let dead: u64 = report.partitions.iter().map(|p| p.dead_lettered).sum();
    let rejected = produced.garbage + produced.hostile;
    assert_eq!(dead, rejected, "{report}");
    assert_eq!(landed, produced.sent - rejected, "{report}");
    assert_loaded_exactly_once(&s, produced.sent - rejected).await;
}

/// `anonymizer.url_query`, set through the environment as an orchestrator would, on the real
/// binary: what reaches `http_log_anon` holds no query value (or only the allowed parameters)
/// and no fragment, a URL over `max_url_bytes` only because of its query is stored, and a dead
/// letter carries the original bytes, query included (docs/OPERATIONS.md says what to do about
/// that topic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_query_policies_redact_what_leaves_stage_one() {
    require_stack();
    let token = format!("s3cr3t{}", "t".repeat(9_000));
    let urls = [
        "/r7/a.jpg?email=a@b.c&page=2".to_string(),
        format!("/r7/a.jpg?page=3&token={token}"),
        "/r7/a.jpg?lang=en;sid=abc123#access_token=xyz".to_string(),
        "/r7/plain.jpg".to_string(),
    ];
    // (policy variable, value, its metric label, what each URL becomes)
    let policies: [(&str, &str, &str, [&str; 4]); 2] = [
        (
            "EDGELOG_ANONYMIZER__URL_QUERY",
            "drop_values",
            "drop_values",
            [
                "/r7/a.jpg?email=&page=",
                "/r7/a.jpg?page=&token=",
                "/r7/a.jpg?lang=;sid=",
                "/r7/plain.jpg",
            ],
        ),
        (
            "EDGELOG_ANONYMIZER__URL_QUERY__ALLOW",
            "page,lang",
            "allow_list",
            [
                "/r7/a.jpg?page=2",
                "/r7/a.jpg?page=3",
                "/r7/a.jpg?lang=en",
                "/r7/plain.jpg",
            ],
        ),
    ];
    for (var, value, label, stored) in policies {
        let s = isolated_settings();
        edgelog::setup::create_topics(&s).await.unwrap();
        let mut payloads: Vec<Vec<u8>> = urls
            .iter()
            .map(|url| {
                encode_capnp(&HttpLogRecord {
                    url: url.clone(),
                    ..record(now_ms())
                })
            })
            .collect();
        // Rejected for its status: its dead letter is the original record.
        let rejected = encode_capnp(&HttpLogRecord {
            url: "/r7/a.jpg?email=dead@letter.example".into(),
            response_status: 0,
            ..record(now_ms())
        });
        payloads.push(rejected.clone());
        produce(&s, &payloads);
        // A port nothing listens on (bound, then released), to read the binary's metrics.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = KillOnDrop::spawn(anonymizer_command(&s, "0").env(var, value).env(
            "EDGELOG_ANONYMIZER__METRICS_LISTEN",
            format!("127.0.0.1:{port}"),
        ));
        let seen = tokio::task::spawn_blocking({
            let s = s.clone();
            let n = payloads.len();
            move || read_landed(&s, n)
        })
        .await
        .unwrap();
        assert_exactly_once(&seen, payloads.len());
        for (offset, expected) in stored.iter().enumerate() {
            let landed = &seen[&(0, offset as i64)][0];
            assert!(!landed.dead_letter, "{var}={value}: {:?}", landed.headers);
            let url = edgelog::anon_record::decode(&landed.payload).unwrap().url;
            assert_eq!(url, *expected, "{var}={value}");
            for secret in ["a@b.c", "s3cr3t", "abc123", "xyz"] {
                assert!(!url.contains(secret), "{var}={value}: {url}");
            }
        }
        let dead = &seen[&(0, urls.len() as i64)][0];
        assert_dead_letter(&s, urls.len() as i64, dead, Reason::ValueOutOfRange);
        assert_eq!(dead.payload, rejected, "the dead letter is the original");
        // Counted when sent, before the commit that made them readable: three URLs changed (the
        // plain one and the dead letter are not counted).
        edgelog::clickhouse::install_crypto_provider();
        let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let series = format!("edgelog_anonymizer_urls_redacted_total{{policy=\"{label}\"}} ");
        let redacted = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()));
        assert_eq!(redacted, Some("3"), "{var}={value}: {metrics}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the anonymizer keeps running"
        );
        child.kill().unwrap();
    }
}
