//! Stage two keeps exactly-once on real Kafka, nginx and ClickHouse when the loader crashes at
//! each step of a batch, with and without `insert_deduplication_token`.

mod common;

use std::time::Duration;

use common::*;
use edgelog::body::BodyCompression;

/// Crash at `failpoint`, restart, and check the result. Returns the rows ClickHouse held right
/// after the crash (to show which side of the insert the crash was on).
async fn crash_then_recover(
    dedup_token: bool,
    compression: BodyCompression,
    failpoint: &str,
) -> u64 {
    require_stack();
    let mut s = isolated_settings();
    s.loader.dedup_token = dedup_token;
    s.loader.body_compression = compression;
    s.loader.source_address = Some(fresh_loopback_ip());
    let good = fill_anonymized_topic(&s, 5_000).await.sent;

    let status = loader_command(&s)
        .env("LOADER_FAILPOINT", failpoint)
        .status()
        .unwrap();
    assert!(
        !status.success(),
        "the loader crashed at {failpoint}: {status}"
    );
    let db = s.clickhouse.database.clone();
    let after_crash = count(format!("SELECT count() FROM {db}.http_log")).await;

    let mut child = KillOnDrop::spawn(&mut loader_command(&s));
    wait_for("every row in ClickHouse", Duration::from_secs(120), || {
        let sql = format!("SELECT count() FROM {db}.http_log");
        async move { (count(sql).await >= good).then_some(()) }
    })
    .await;
    // Give a wrongly re-sent batch the chance to land: wait until the loader has committed past
    // everything (it commits only after ClickHouse confirmed), then check.
    wait_no_pending_batch(
        &s,
        "the loader to commit past every batch",
        Duration::from_secs(60),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_loaded_exactly_once(&s, good).await;
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
    after_crash
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_recording_the_ranges() {
    let rows_after_crash = crash_then_recover(true, BodyCompression::Zstd, "after_record").await;
    assert_eq!(rows_after_crash, 0, "nothing was sent before the crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_clickhouse_answered_before_commit() {
    let rows_after_crash = crash_then_recover(true, BodyCompression::Zstd, "after_response").await;
    assert!(
        rows_after_crash > 0,
        "the first batch had landed before the crash, so the restart re-sent it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_clickhouse_answered_without_dedup_token() {
    // Token-less mode (ClickHouse 22.1 had no insert_deduplication_token): the rebuilt batch is
    // byte-identical, so ClickHouse's block-hash dedup drops it.
    let rows_after_crash = crash_then_recover(false, BodyCompression::Zstd, "after_response").await;
    assert!(rows_after_crash > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_clickhouse_answered_in_the_mode_for_clickhouse_22_1() {
    // What ClickHouse 22.1 (the original image) takes: no token, gzip bodies (it decodes no zstd
    // request bodies). gzip output is as deterministic as zstd's, so the rebuild dedups by hash.
    let rows_after_crash = crash_then_recover(false, BodyCompression::Gzip, "after_response").await;
    assert!(rows_after_crash > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_batch_is_finished_by_whoever_gets_its_partitions() {
    require_stack();
    let mut s = isolated_settings();
    s.topics.partitions = 4;
    s.loader.source_address = Some(fresh_loopback_ip());
    let good = fill_anonymized_topic(&s, 6_000).await.sent;
    // The first loader records one batch over all its partitions, then dies.
    let status = loader_command(&s)
        .env("LOADER_FAILPOINT", "after_record")
        .status()
        .unwrap();
    assert!(!status.success());
    // The unkeyed producer's sticky partitioner can leave a partition empty; one with no
    // records has nothing to record.
    let pending = committed_vs_end(&s.loader.group_id, &s.topics.anonymized);
    let with_records: Vec<_> = pending.iter().filter(|(_, end, _)| *end > 0).collect();
    assert!(!with_records.is_empty(), "{pending:?}");
    assert!(
        with_records
            .iter()
            .all(|(_, _, m)| m.starts_with("edgelog.batch.v2;")),
        "recorded on every partition that has records: {pending:?}"
    );

    // Two loaders (two client IPs, two proxy budgets) split the partitions between them.
    let mut a = KillOnDrop::spawn(&mut loader_command(&s));
    s.loader.source_address = Some(fresh_loopback_ip());
    let mut b = KillOnDrop::spawn(&mut loader_command(&s));
    let db = s.clickhouse.database.clone();
    wait_no_pending_batch(
        &s,
        "both loaders to finish the recorded batch",
        Duration::from_secs(120),
    )
    .await;
    a.kill().unwrap();
    b.kill().unwrap();
    a.wait().unwrap();
    b.wait().unwrap();
    assert_loaded_exactly_once(&s, good).await;
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}

/// The library runs on a current-thread runtime (`#[tokio::test]`'s default): no blocking call
/// of the loader may use `block_in_place`, which panics there. The run covers each kind: a
/// recorded batch found at assignment (committed offsets, watermarks), rebuilt and encoded; new
/// batches planned, recorded and committed.
#[tokio::test]
async fn the_loader_runs_on_a_current_thread_runtime() {
    require_stack();
    let s = fast_loader_settings();
    let produced = fill_anonymized_topic(&s, 400).await;
    let good = produced.sent - produced.garbage;
    // A crash right after recording leaves a batch for the in-process loader to rebuild.
    let status = loader_command(&s)
        .env("LOADER_FAILPOINT", "after_record")
        .status()
        .unwrap();
    assert!(!status.success(), "the loader crashed after recording");
    assert!(!no_pending_batch(&s.loader.group_id, &s.topics.anonymized));
    // More records after the recorded batch: planned anew by the in-process loader.
    let more = fill_anonymized_topic(&s, 200).await;
    let good = good + more.sent - more.garbage;

    let loader = start_loader(&s);
    wait_drained(&s, Duration::from_secs(120)).await;
    wait_no_pending_batch(
        &s,
        "the loader to commit past every batch",
        Duration::from_secs(60),
    )
    .await;
    loader
        .stop()
        .await
        .expect("the loader stops cleanly on a current-thread runtime");
    assert_loaded_exactly_once(&s, good).await;
    admin()
        .query(&format!("DROP DATABASE {}", s.clickhouse.database), &[])
        .await
        .unwrap();
}
