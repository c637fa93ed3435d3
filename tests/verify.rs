//! The audit on the real stack: clean after an honest run, and it names every kind of damage done
//! to ClickHouse behind the pipeline's back.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use edgelog::config::Settings;
use edgelog::verify::OffsetSet;

/// `edgelog verify` as an operator runs it, configured through the environment.
fn verify_cli(s: &Settings) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgelog"))
        .arg("verify")
        .env("EDGELOG_KAFKA__BROKERS", &s.kafka.brokers)
        .env("EDGELOG_TOPICS__INPUT", &s.topics.input)
        .env("EDGELOG_TOPICS__ANONYMIZED", &s.topics.anonymized)
        .env("EDGELOG_TOPICS__DEAD_LETTER", &s.topics.dead_letter)
        .env(
            "EDGELOG_TOPICS__LOADER_DEAD_LETTER",
            &s.topics.loader_dead_letter,
        )
        .env("EDGELOG_ANONYMIZER__GROUP_ID", &s.anonymizer.group_id)
        .env("EDGELOG_LOADER__GROUP_ID", &s.loader.group_id)
        .env("EDGELOG_CLICKHOUSE__DATABASE", &s.clickhouse.database)
        .env("EDGELOG_CLICKHOUSE__ADMIN_URL", &s.clickhouse.admin_url)
        .output()
        .expect("the edgelog binary runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_is_clean_after_a_run_and_names_every_discrepancy_after_tampering() {
    require_stack();
    let mut s = fast_loader_settings();
    s.producer.garbage_share = 0.03;
    let produced = fill_anonymized_topic(&s, 2000).await;
    let loader = start_loader(&s);
    let report = edgelog::verify::audit_when_drained(&s, Duration::from_secs(120))
        .await
        .unwrap();
    loader.stop().await.expect("the loader stops cleanly");

    assert!(report.is_clean() && report.is_drained(), "{report}");
    let landed: u64 = report.partitions.iter().map(|p| p.landed.len()).sum();
    let dead: u64 = report
        .partitions
        .iter()
        .map(|p| p.dead_lettered.len())
        .sum();
    assert_eq!(landed, produced.sent - produced.garbage, "{report}");
    assert_eq!(dead, produced.garbage, "{report}");
    assert!(dead > 0, "the run includes garbage");
    let (code, text) = verify_cli(&s);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("OK: 0 missing, 0 duplicated, 0 unexpected"),
        "{text}"
    );

    // Damage: a duplicated pair, a deleted row, a dead-lettered offset and a foreign partition.
    let db = &s.clickhouse.database;
    // The unkeyed producer's sticky partitioner can leave a partition empty: damage only
    // partitions that hold rows (the first and the last such; they may be the same one).
    let with_rows: Vec<_> = report
        .partitions
        .iter()
        .filter(|p| p.landed.len() >= 3)
        .collect();
    let p0 = with_rows[0];
    let (dup_first, _) = p0.landed.runs()[0];
    let deleted_partition = with_rows[with_rows.len() - 1].partition;
    let (_, deleted_offset) = *with_rows[with_rows.len() - 1].landed.runs().last().unwrap();
    let (dead_partition, dead_offset) = report
        .partitions
        .iter()
        .find_map(|p| p.dead_lettered.runs().first().map(|r| (p.partition, r.0)))
        .unwrap();
    for sql in [
        format!(
            "INSERT INTO {db}.http_log SELECT * FROM {db}.http_log WHERE source_partition = {} \
             AND source_offset IN ({dup_first}, {}) SETTINGS insert_deduplicate = 0",
            p0.partition,
            dup_first + 1
        ),
        format!(
            "DELETE FROM {db}.http_log WHERE source_partition = {deleted_partition} \
             AND source_offset = {deleted_offset}"
        ),
        format!(
            "INSERT INTO {db}.http_log (timestamp, remote_addr, source_partition, source_offset) \
             VALUES (now(), '1.2.3.X', {dead_partition}, {dead_offset}), (now(), '1.2.3.X', 99, 0)"
        ),
    ] {
        admin().query(&sql, &[]).await.unwrap();
    }

    let damaged = edgelog::verify::audit(&s).await.unwrap();
    assert!(!damaged.is_clean(), "{damaged}");
    let part = |p: i32| {
        damaged
            .partitions
            .iter()
            .find(|a| a.partition == p)
            .unwrap()
    };
    assert_eq!(
        part(p0.partition).duplicated,
        OffsetSet::from_runs([(dup_first, dup_first + 1)]),
        "{damaged}"
    );
    assert_eq!(part(p0.partition).duplicate_rows, 2);
    assert_eq!(
        part(deleted_partition).missing(),
        OffsetSet::from_runs([(deleted_offset, deleted_offset)]),
        "{damaged}"
    );
    assert_eq!(
        part(dead_partition).unexpected(),
        OffsetSet::from_runs([(dead_offset, dead_offset)]),
        "{damaged}"
    );
    assert_eq!(damaged.foreign_partitions, vec![(99, 1)]);
    assert!(
        damaged.totals.groups_differing >= 1 && !damaged.totals.is_clean(),
        "the deleted row is still counted in the totals: {damaged}"
    );
    let (code, text) = verify_cli(&s);
    assert_eq!(code, 1, "{text}");
    for needle in [
        format!("MISSING     partition {deleted_partition}: {deleted_offset}"),
        format!(
            "DUPLICATED  partition {}: {dup_first}-{}",
            p0.partition,
            dup_first + 1
        ),
        "FAILED:".to_string(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in\n{text}");
    }
}
