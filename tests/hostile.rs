//! The whole pipeline against hostile input, on the real stack: every boundary stage one decides
//! on, a record ClickHouse refuses on its own, and foreign records on the anonymized topic go
//! through both stages together. Both keep running, every input offset is loaded once or
//! dead-lettered once with the expected reason, and `verify` is clean and names the reasons.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::hostile::*;
use common::*;
use edgelog::dead_letter::Reason;
use edgelog::record::{encode_capnp, HttpLogRecord};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_records_are_loaded_or_dead_lettered_once_and_verify_names_why() {
    require_stack();
    let mut s = fast_loader_settings();
    s.anonymizer.max_url_bytes = 100_000;
    let s = s.validated().unwrap();
    edgelog::setup::create_topics(&s).await.unwrap();
    edgelog::setup::apply_schema(&s).await.unwrap();
    let limit = 12_000;
    set_topic_limit(&s, &s.topics.anonymized, limit).await;
    // Something only ClickHouse can judge: it refuses the whole insert (code 469), and the loader
    // has to find the one record by splitting the batch.
    let db = &s.clickhouse.database;
    admin()
        .query(
            &format!("ALTER TABLE {db}.http_log ADD CONSTRAINT no_poison CHECK url != '/poison'"),
            &[],
        )
        .await
        .unwrap();

    let mut cases = stage_one_corpus(&s, limit);
    let poison = encode_capnp(&HttpLogRecord {
        url: "/poison".into(),
        ..record(now_ms())
    });
    cases.insert(
        cases.len() / 2,
        (
            "refused by ClickHouse",
            poison,
            Some(Reason::ClickhouseRejected),
        ),
    );
    let payloads: Vec<Vec<u8>> = cases.iter().map(|(_, p, _)| p.clone()).collect();
    produce(&s, &payloads);
    // Not written by the anonymizer: the loader quarantines them; they name no input record.
    let foreign = [b"not messagepack".to_vec(), vec![0x9c, 0xff, 0x00]];
    produce_to(&s, &s.topics.anonymized, &foreign);

    let anonymizer = start_anonymizer(&s);
    let loader = start_loader(&s);
    let report = edgelog::verify::audit_when_drained(&s, Duration::from_secs(180))
        .await
        .unwrap();
    assert!(report.is_clean() && report.is_drained(), "{report}");

    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for (_, _, reason) in &cases {
        if let Some(r) = reason {
            *expected.entry(r.label().to_string()).or_default() += 1;
        }
    }
    assert_eq!(report.dead_letters.by_reason, expected, "{report}");
    assert_eq!(
        report.dead_letters.without_input_source,
        foreign.len() as u64,
        "{report}"
    );
    let stored = cases.iter().filter(|(_, _, r)| r.is_none()).count() as u64;
    let landed: u64 = report.partitions.iter().map(|p| p.landed).sum();
    assert_eq!(landed, stored, "{report}");
    assert_loaded_exactly_once(&s, stored).await;
    let text = report.to_string();
    assert!(text.contains("dead letters by reason: "), "{text}");
    assert!(text.contains("clickhouse_rejected 1"), "{text}");

    // Neither stage stopped on any of it.
    anonymizer
        .stop()
        .await
        .expect("the anonymizer ran to the end");
    loader.stop().await.expect("the loader ran to the end");
}
