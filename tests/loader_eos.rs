//! Stage two keeps exactly-once on real Kafka, nginx and ClickHouse when the loader crashes at
//! each step of a batch, with and without `insert_deduplication_token`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use edgelog::config::Settings;

fn loader_command(s: &Settings) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loader"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("EDGELOG_KAFKA__BROKERS", &s.kafka.brokers)
        .env("EDGELOG_TOPICS__ANONYMIZED", &s.topics.anonymized)
        .env("EDGELOG_LOADER__GROUP_ID", &s.loader.group_id)
        .env("EDGELOG_LOADER__SLOT_SPACING", "300ms")
        .env("EDGELOG_LOADER__METRICS_LISTEN", "127.0.0.1:0")
        .env(
            "EDGELOG_LOADER__DEDUP_TOKEN",
            s.loader.dedup_token.to_string(),
        )
        .env(
            "EDGELOG_LOADER__SOURCE_ADDRESS",
            s.loader.source_address.unwrap().to_string(),
        )
        .env("EDGELOG_CLICKHOUSE__URL", &s.clickhouse.url)
        .env("EDGELOG_CLICKHOUSE__DATABASE", &s.clickhouse.database)
        .env(
            "EDGELOG_CLICKHOUSE__PASSWORD",
            s.clickhouse.password.expose(),
        )
        .env("EDGELOG_LOG__LEVEL", "warn")
        // A SIGKILLed member holds its partitions until its session times out: keep that short.
        .env("EDGELOG_KAFKA__OPTIONS__SESSION_TIMEOUT_MS", "6000")
        .env("EDGELOG_KAFKA__OPTIONS__HEARTBEAT_INTERVAL_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

async fn assert_exactly_once(s: &Settings, good: u64) {
    let db = &s.clickhouse.database;
    assert_eq!(
        count(format!("SELECT count() FROM {db}.http_log")).await,
        good,
        "one copy of each row"
    );
    assert_eq!(
        count(format!(
            "SELECT uniqExact(source_partition, source_offset) FROM {db}.http_log"
        ))
        .await,
        good
    );
    assert_eq!(
        count(format!("SELECT sum(requests) FROM {db}.http_log_totals")).await,
        good,
        "totals equal a recount from http_log"
    );
}

/// Crash at `failpoint`, restart, and check the result. Returns the rows ClickHouse held right
/// after the crash (to show which side of the insert the crash was on).
async fn crash_then_recover(dedup_token: bool, failpoint: &str) -> u64 {
    require_stack();
    let mut s = isolated_settings();
    s.loader.dedup_token = dedup_token;
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

    let mut child = loader_command(&s).spawn().unwrap();
    wait_for("every row in ClickHouse", Duration::from_secs(120), || {
        let sql = format!("SELECT count() FROM {db}.http_log");
        async move { (count(sql).await >= good).then_some(()) }
    })
    .await;
    // Give a wrongly re-sent batch the chance to land: wait until the loader has committed past
    // everything (it commits only after ClickHouse confirmed), then check.
    let group = s.loader.group_id.clone();
    let topic = s.topics.anonymized.clone();
    wait_for(
        "the loader to commit past every batch",
        Duration::from_secs(60),
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move {
                tokio::task::spawn_blocking(move || no_pending_batch(&group, &topic))
                    .await
                    .unwrap()
                    .then_some(())
            }
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_exactly_once(&s, good).await;
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
    after_crash
}

/// True when the group's committed offsets reach the end of every partition with no recorded
/// batch left. The topic is transactional: a commit marker follows the last record, so the loader's
/// committed offset (last record + 1) sits one below the high watermark.
fn no_pending_batch(group: &str, topic: &str) -> bool {
    committed_vs_end(group, topic)
        .iter()
        .all(|(c, high, metadata)| {
            metadata.is_empty() && (*high == 0 || c.is_some_and(|c| c >= high - 1))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_recording_the_ranges() {
    let rows_after_crash = crash_then_recover(true, "after_record").await;
    assert_eq!(rows_after_crash, 0, "nothing was sent before the crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_clickhouse_answered_before_commit() {
    let rows_after_crash = crash_then_recover(true, "after_response").await;
    assert!(
        rows_after_crash > 0,
        "the first batch had landed before the crash, so the restart re-sent it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_clickhouse_answered_without_dedup_token() {
    // Token-less mode (ClickHouse 22.1 had no insert_deduplication_token): the rebuilt batch is
    // byte-identical, so ClickHouse's block-hash dedup drops it.
    let rows_after_crash = crash_then_recover(false, "after_response").await;
    assert!(rows_after_crash > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_batch_is_finished_by_whoever_gets_its_partitions() {
    require_stack();
    let mut s = isolated_settings();
    s.topics.partitions = 4;
    s.loader.source_address = Some(fresh_loopback_ip());
    let good = fill_anonymized_topic(&s, 6_000).await.sent;
    // The first loader records one batch over all four partitions, then dies.
    let status = loader_command(&s)
        .env("LOADER_FAILPOINT", "after_record")
        .status()
        .unwrap();
    assert!(!status.success());
    let pending = committed_vs_end(&s.loader.group_id, &s.topics.anonymized);
    assert!(
        pending
            .iter()
            .all(|(_, _, m)| m.starts_with("edgelog.batch.v1;")),
        "recorded on every partition: {pending:?}"
    );

    // Two loaders (two client IPs, two proxy budgets) split the partitions between them.
    let mut a = loader_command(&s).spawn().unwrap();
    s.loader.source_address = Some(fresh_loopback_ip());
    let mut b = loader_command(&s).spawn().unwrap();
    let db = s.clickhouse.database.clone();
    let (group, topic) = (s.loader.group_id.clone(), s.topics.anonymized.clone());
    wait_for(
        "both loaders to finish the recorded batch",
        Duration::from_secs(120),
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move {
                tokio::task::spawn_blocking(move || no_pending_batch(&group, &topic))
                    .await
                    .unwrap()
                    .then_some(())
            }
        },
    )
    .await;
    a.kill().unwrap();
    b.kill().unwrap();
    a.wait().unwrap();
    b.wait().unwrap();
    assert_exactly_once(&s, good).await;
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}
