//! The audit on the real stack: clean after an honest run, and it names every kind of damage done
//! to ClickHouse behind the pipeline's back.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use edgelog::config::Settings;
use edgelog::verify::{audit_with, AuditOptions, OffsetSet, PartitionAudit};

/// `edgelog verify` as an operator runs it, configured through the environment.
fn verify_command(s: &Settings) -> Command {
    edgelog_command(s, "verify")
}

fn verify_cli(s: &Settings, args: &[&str]) -> (i32, String) {
    let out = verify_command(s)
        .args(args)
        .output()
        .expect("the edgelog binary runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The `source_offset`s ClickHouse holds for one partition, ascending.
async fn offsets_in_clickhouse(s: &Settings, partition: i32) -> Vec<i64> {
    let text = admin()
        .query(
            &format!(
                "SELECT source_offset FROM {}.http_log WHERE source_partition = {partition} \
                 ORDER BY source_offset FORMAT TSV",
                s.clickhouse.database
            ),
            &[],
        )
        .await
        .unwrap();
    text.lines().map(|l| l.parse().unwrap()).collect()
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
    let landed = report.sum(|p| p.landed);
    let dead = report.sum(|p| p.dead_lettered);
    assert_eq!(landed, produced.sent - produced.garbage, "{report}");
    assert_eq!(dead, produced.garbage, "{report}");
    assert!(dead > 0, "the run includes garbage");
    let (code, text) = verify_cli(&s, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("OK: 0 missing, 0 duplicated, 0 unexpected"),
        "{text}"
    );

    // Damage: a duplicated pair, a deleted row, a dead-lettered offset and a foreign partition.
    let db = &s.clickhouse.database;
    // The unkeyed producer's sticky partitioner can leave a partition empty: damage only
    // partitions that hold rows (the first and the last such; they may be the same one).
    let with_rows: Vec<_> = report.partitions.iter().filter(|p| p.landed >= 3).collect();
    let p0 = with_rows[0];
    let dup_first = offsets_in_clickhouse(&s, p0.partition).await[0];
    let deleted_partition = with_rows[with_rows.len() - 1].partition;
    let deleted_offset = *offsets_in_clickhouse(&s, deleted_partition)
        .await
        .last()
        .unwrap();
    // An offset below the committed position that is not in ClickHouse in a clean audit: a
    // dead-lettered record (or a transaction marker: a row claiming either is unexpected).
    let mut dead = None;
    for p in report.partitions.iter().filter(|p| p.dead_lettered > 0) {
        let landed = offsets_in_clickhouse(&s, p.partition).await;
        dead = (p.log_start..p.committed)
            .find(|o| landed.binary_search(o).is_err())
            .map(|o| (p.partition, o));
        if dead.is_some() {
            break;
        }
    }
    let (dead_partition, dead_offset) = dead.expect("a dead-lettered offset");
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
        part(p0.partition).duplicated.shown,
        OffsetSet::from_runs([(dup_first, dup_first + 1)]),
        "{damaged}"
    );
    assert_eq!(part(p0.partition).duplicate_rows, 2);
    assert_eq!(
        part(deleted_partition).missing.shown,
        OffsetSet::from_runs([(deleted_offset, deleted_offset)]),
        "{damaged}"
    );
    assert_eq!(
        part(dead_partition).unexpected.shown,
        OffsetSet::from_runs([(dead_offset, dead_offset)]),
        "{damaged}"
    );
    assert_eq!(damaged.foreign_partitions, vec![(99, 1)]);
    assert!(
        damaged.totals.groups_differing >= 1 && !damaged.totals.is_clean(),
        "the deleted row is still counted in the totals: {damaged}"
    );
    let (code, text) = verify_cli(&s, &[]);
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

/// Bounded and incremental: the same audit in buckets of 50 offsets, clean buckets remembered and
/// skipped by the next run, damage planted in two different buckets found by both the full and
/// the incremental audit, and `--watch` exporting it as gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_buckets_are_remembered_when_clean_and_damage_in_two_of_them_is_found() {
    require_stack();
    let mut s = fast_loader_settings();
    s.producer.garbage_share = 0.03;
    let produced = fill_anonymized_topic(&s, 900).await;
    let loader = start_loader(&s);
    wait_drained(&s, Duration::from_secs(120)).await;
    loader.stop().await.expect("the loader stops cleanly");

    let size = 50;
    let incremental = AuditOptions {
        bucket_offsets: size,
        incremental: true,
    };
    let full = AuditOptions {
        incremental: false,
        ..incremental
    };
    let first = audit_with(&s, &incremental).await.unwrap();
    assert!(first.is_clean() && first.is_drained(), "{first}");
    assert_eq!(first.sum(|p| p.buckets_skipped), 0, "{first}");
    assert!(first.sum(|p| p.buckets_audited) >= 900 / 50, "{first}");
    assert_eq!(
        first.sum(|p| p.landed),
        produced.sent - produced.garbage,
        "{first}"
    );
    // One bucket per partition counts the same.
    let whole = edgelog::verify::audit(&s).await.unwrap();
    for f in [
        |p: &PartitionAudit| p.input,
        |p: &PartitionAudit| p.landed,
        |p: &PartitionAudit| p.dead_lettered,
    ] {
        assert_eq!(first.sum(f), whole.sum(f), "{first}\n{whole}");
    }

    // The re-run reads only each partition's last, partial bucket.
    let second = audit_with(&s, &incremental).await.unwrap();
    assert!(second.is_clean(), "{second}");
    assert!(second.sum(|p| p.buckets_audited) <= 3, "{second}");
    assert_eq!(
        second.sum(|p| p.buckets_skipped),
        first.sum(|p| p.buckets_audited) - second.sum(|p| p.buckets_audited),
        "{second}"
    );
    assert_eq!(second.sum(|p| p.landed), first.sum(|p| p.landed));
    assert_eq!(second.unaudited(), first.unaudited());
    assert!(second.to_string().contains("OK: 0 missing"), "{second}");

    // Damage in two whole buckets of one partition: a row deleted from the first, a row
    // duplicated in the second.
    let p = first
        .partitions
        .iter()
        .find(|p| p.committed >= 3 * size)
        .expect("a partition with two whole buckets");
    let landed = offsets_in_clickhouse(&s, p.partition).await;
    let deleted = *landed.iter().find(|&&o| o < size).unwrap();
    let duplicated = *landed
        .iter()
        .find(|&&o| (size..2 * size).contains(&o))
        .unwrap();
    let db = &s.clickhouse.database;
    for sql in [
        format!(
            "DELETE FROM {db}.http_log WHERE source_partition = {} AND source_offset = {deleted}",
            p.partition
        ),
        format!(
            "INSERT INTO {db}.http_log SELECT * FROM {db}.http_log WHERE source_partition = {} \
             AND source_offset = {duplicated} SETTINGS insert_deduplicate = 0",
            p.partition
        ),
    ] {
        admin().query(&sql, &[]).await.unwrap();
    }
    for options in [incremental, full] {
        let damaged = audit_with(&s, &options).await.unwrap();
        assert!(!damaged.is_clean(), "{damaged}");
        let a = damaged
            .partitions
            .iter()
            .find(|a| a.partition == p.partition)
            .unwrap();
        assert_eq!(
            a.missing.shown,
            OffsetSet::from_runs([(deleted, deleted)]),
            "{damaged}"
        );
        assert_eq!(
            a.duplicated.shown,
            OffsetSet::from_runs([(duplicated, duplicated)]),
            "{damaged}"
        );
        assert_eq!((a.missing.count, a.duplicate_rows), (1, 1), "{damaged}");
        assert_eq!((damaged.missing(), damaged.duplicated()), (1, 1));
        if options.incremental {
            // The two changed buckets and the partial ones; the rest still skipped.
            assert!(damaged.sum(|p| p.buckets_audited) <= 3 + 2, "{damaged}");
            assert!(damaged.sum(|p| p.buckets_skipped) > 0, "{damaged}");
        }
    }
    let (code, text) = verify_cli(&s, &["--bucket-offsets", "50"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("MISSING     partition {}: {deleted}", p.partition)),
        "{text}"
    );

    // The continuous audit exports the damage as gauges and is ready.
    edgelog::clickhouse::install_crypto_provider();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _watch = KillOnDrop::spawn(verify_command(&s).args([
        "--watch",
        "--bucket-offsets",
        "50",
        "--interval",
        "1s",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]));
    let metrics = wait_for(
        "the watch mode to export its gauges",
        Duration::from_secs(60),
        || async move {
            let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("edgelog_verify_missing").then_some(text)
        },
    )
    .await;
    for line in [
        "edgelog_verify_missing 1",
        "edgelog_verify_duplicated 1",
        "edgelog_verify_runs_total{result=\"discrepancy\"}",
        "edgelog_verify_last_success_timestamp_seconds",
    ] {
        assert!(metrics.contains(line), "{line:?} not in\n{metrics}");
    }
    let unaudited = format!(
        "edgelog_verify_unaudited {}",
        second.unaudited() + 2 * size as u64
    );
    assert!(
        metrics.contains(&unaudited),
        "{unaudited:?} not in\n{metrics}"
    );
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}
