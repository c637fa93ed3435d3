//! Cluster mode (`clickhouse.cluster`) on two real ClickHouse shards (`scripts/stack.sh
//! shards-up`: HTTP 8133 and 8143, a proxy on 8135 in front of shard 1): `edgelog setup` applies
//! the per-shard schema to both, the loader inserts through the `Distributed` table
//! synchronously, and exactly-once holds across shards when the loader crashes at each step of a
//! batch and when a shard is down. `verify` and `status` read through the Distributed tables;
//! `backfill` and `replay` rebuild each shard's local tables on that shard. The
//! replicated (Keeper) form of the schema, which these servers cannot run, is parsed by the real
//! server. A missing shard fails every test with how to start it.

mod common;

use std::time::Duration;

use common::*;
use edgelog::cluster_schema::Form;
use edgelog::config::Settings;

const SHARD_1: &str = "http://127.0.0.1:8133";
const SHARD_2: &str = "http://127.0.0.1:8143";
const SHARD_PROXY: &str = "http://127.0.0.1:8135";
const CLUSTER: &str = "edgelog_shards";

/// The outage test stops shard 2: no other test of this file may run meanwhile.
static SHARDS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn require_shards() {
    require_stack();
    require_listening(
        &[
            ("ClickHouse shard 1", "127.0.0.1:8133"),
            ("ClickHouse shard 2", "127.0.0.1:8143"),
            ("the shards' proxy", "127.0.0.1:8135"),
        ],
        "Cluster tests need the two shards: run `scripts/stack.sh shards-up` (scripts/test.sh \
         starts them).",
    );
}

/// An isolated pipeline whose ClickHouse is the two-shard cluster; 4 source partitions, so both
/// shards get rows (the sharding key is the source partition).
fn cluster_settings() -> Settings {
    let mut s = isolated_settings();
    s.topics.partitions = 4;
    s.clickhouse.cluster = Some(CLUSTER.into());
    s.clickhouse.shard_admin_urls = vec![SHARD_1.into(), SHARD_2.into()];
    s.clickhouse.admin_url = SHARD_1.into();
    s.clickhouse.url = SHARD_PROXY.into();
    s.loader.source_address = Some(fresh_loopback_ip());
    // Each record to a random partition (librdkafka's sticky partitioner would put a small run's
    // records on one or two partitions, maybe all on one shard).
    s.producer
        .kafka_options
        .0
        .insert("sticky.partitioning.linger.ms".into(), "0".into());
    s
}

fn stack(args: &[&str]) {
    let status = std::process::Command::new("scripts/stack.sh")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/stack.sh {args:?}: {status}");
}

/// Every row on the one shard its source partition maps to (`source_partition % 2`), rows on
/// both shards, and the whole cluster holding each row once.
async fn assert_sharded_exactly_once(s: &Settings, good: u64) {
    assert_loaded_exactly_once_at(SHARD_1, s, good).await;
    let db = &s.clickhouse.database;
    let mut total = 0;
    for (shard, url) in [(0, SHARD_1), (1, SHARD_2)] {
        let local = count_at(url, format!("SELECT count() FROM {db}.http_log_local")).await;
        let elsewhere = count_at(
            url,
            format!(
                "SELECT count() FROM {db}.http_log_local WHERE source_partition % 2 != {shard}"
            ),
        )
        .await;
        assert_eq!(elsewhere, 0, "shard {url} holds only its partitions' rows");
        assert!(local > 0, "shard {url} holds rows");
        let totals = count_at(
            url,
            format!("SELECT sum(requests) FROM {db}.http_log_totals_local"),
        )
        .await;
        assert_eq!(totals, local, "shard {url}'s views fed its own rollups");
        total += local;
    }
    assert_eq!(total, good);
}

/// A shard stopped for an outage, started again when this is dropped (however the test ends).
struct StoppedShard(&'static str);

impl StoppedShard {
    fn stop(n: &'static str) -> StoppedShard {
        stack(&["shard-stop", n]);
        StoppedShard(n)
    }
}

impl Drop for StoppedShard {
    fn drop(&mut self) {
        stack(&["shard-start", self.0]);
    }
}

async fn drop_database(s: &Settings) {
    for url in [SHARD_1, SHARD_2] {
        let client =
            edgelog::clickhouse::ClickHouseClient::new(url, "default", &Default::default())
                .unwrap();
        client
            .query(&format!("DROP DATABASE {}", s.clickhouse.database), &[])
            .await
            .unwrap();
    }
}

/// Crash the loader at `failpoint`, restart it, and check the cluster. Returns the settings and
/// the rows the cluster held right after the crash.
async fn crash_then_recover(failpoint: &str) -> (Settings, u64, u64) {
    let s = cluster_settings();
    let good = fill_anonymized_topic(&s, 3_000).await.sent;
    let status = loader_command(&s)
        .env("LOADER_FAILPOINT", failpoint)
        .status()
        .unwrap();
    assert!(!status.success(), "the loader crashed at {failpoint}");
    let db = s.clickhouse.database.clone();
    let after_crash = count_at(SHARD_1, format!("SELECT count() FROM {db}.http_log")).await;

    let mut child = KillOnDrop::spawn(&mut loader_command(&s));
    wait_no_pending_batch(
        &s,
        "the loader to commit past every batch",
        Duration::from_secs(120),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_sharded_exactly_once(&s, good).await;
    (s, good, after_crash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_recording_the_ranges_on_two_shards() {
    require_shards();
    let _one_at_a_time = SHARDS.lock().await;
    let (s, _, after_crash) = crash_then_recover("after_record").await;
    assert_eq!(after_crash, 0, "nothing was sent before the crash");
    drop_database(&s).await;
}

/// The re-sent batch had landed on both shards: each one drops its part as a duplicate (the
/// token travels with each shard's block). Then `verify` and `status`, which read through the
/// Distributed tables, see the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_both_shards_answered_then_verify_and_status() {
    require_shards();
    let _one_at_a_time = SHARDS.lock().await;
    let (s, good, after_crash) = crash_then_recover("after_response").await;
    assert!(
        after_crash > 0,
        "the first batch had landed before the crash, so the restart re-sent it"
    );

    let report = edgelog::verify::audit(&s).await.unwrap();
    assert!(report.is_clean() && report.is_drained(), "{report}");
    let landed: u64 = report.partitions.iter().map(|p| p.landed).sum();
    assert_eq!(landed, good, "{report}");
    // Every rollup was checked, through its Distributed table.
    assert_eq!(report.totals.raw_rows, good, "{report}");

    let status = edgelog::status::report(&s, &[]).await.text;
    let db = &s.clickhouse.database;
    assert!(
        status.contains(&format!("clickhouse: {db}.http_log holds {good} rows")),
        "{status}"
    );
    assert!(
        !status.contains("1970-01-01"),
        "parts of every shard: {status}"
    );

    assert_sharded_exactly_once(&s, good).await;
    drop_database(&s).await;
}

/// Shard 2 down: every insert fails (retriable) and the loader commits nothing; once it is back,
/// the same batches land, each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_outage_is_waited_out_and_every_row_lands_once() {
    require_shards();
    let _one_at_a_time = SHARDS.lock().await;
    let s = cluster_settings();
    let good = fill_anonymized_topic(&s, 3_000).await.sent;
    let db = s.clickhouse.database.clone();

    let restart = StoppedShard::stop("2");
    let mut child = KillOnDrop::spawn(&mut loader_command(&s));
    // The loader keeps trying: wait until the proxy has passed several of its attempts.
    let stack_home = std::env::var("EDGESTACK_HOME")
        .unwrap_or_else(|_| format!("{}/.cache/edgelog-stack", std::env::var("HOME").unwrap()));
    let proxy_log = format!("{stack_home}/run/proxy-shards/access.log");
    let source = s.loader.source_address.unwrap().to_string();
    wait_for(
        "the loader's failed attempts",
        Duration::from_secs(60),
        || {
            let (log, source) = (proxy_log.clone(), source.clone());
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let failed = text
                    .lines()
                    .filter(|l| l.starts_with(&format!("{source} ")) && l.contains("\" 500 "))
                    .count();
                (failed >= 3).then_some(())
            }
        },
    )
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "a shard outage is retriable: the loader keeps running"
    );
    // Whether shard 1 kept its part of a failed attempt does not matter: the re-send carries
    // the same token, which shard 1 then drops as a duplicate. (Measured here: it keeps none.)
    let on_shard_1 = count_at(SHARD_1, format!("SELECT count() FROM {db}.http_log_local")).await;
    eprintln!("rows on shard 1 while shard 2 was down: {on_shard_1}");
    assert!(!no_pending_batch(&s.loader.group_id, &s.topics.anonymized));

    drop(restart);
    wait_no_pending_batch(
        &s,
        "the loader to commit past every batch",
        Duration::from_secs(120),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_sharded_exactly_once(&s, good).await;
    drop_database(&s).await;
}

/// The schema a Keeper cluster runs (ON CLUSTER, Replicated engines) cannot be created here: the
/// real server parses every statement of it, and knows every engine and table setting it names;
/// `setup` without shard URLs sends it (and is refused here).
#[tokio::test]
async fn the_replicated_schema_parses_on_the_real_server() {
    require_shards();
    let mut s = Settings::default();
    s.clickhouse.cluster = Some(CLUSTER.into());
    let statements = edgelog::setup::migration_statements(&s.clickhouse, Form::Keeper)
        .unwrap()
        .concat();
    let client =
        edgelog::clickhouse::ClickHouseClient::new(SHARD_1, "default", &Default::default())
            .unwrap();
    let mut replicated = 0;
    for stmt in &statements {
        // A String parameter is read as an escaped TSV value: no raw newlines (the statements
        // hold none inside literals).
        let one_line = stmt.replace('\n', " ");
        let formatted = client
            .query("SELECT formatQuery({q:String})", &[("q", &one_line)])
            .await
            .unwrap_or_else(|e| panic!("the server does not parse {stmt}: {e}"));
        assert!(
            formatted.contains("ON CLUSTER edgelog_shards"),
            "{formatted}"
        );
        if stmt.contains("ENGINE = Replicated") {
            replicated += 1;
        }
    }
    // Every sharded table's local, and verify's bookkeeping (one replicated table per node).
    assert_eq!(
        replicated,
        edgelog::capacity::TABLES.len() + edgelog::cluster_schema::UNSHARDED_TABLES.len(),
        "every table's local is replicated"
    );
    for engine in ["ReplicatedMergeTree", "ReplicatedAggregatingMergeTree"] {
        let known = client
            .query(
                "SELECT count() FROM system.table_engines WHERE name = {e:String}",
                &[("e", engine)],
            )
            .await
            .unwrap();
        assert_eq!(known.trim(), "1", "{engine}");
    }
    for setting in [
        "replicated_deduplication_window",
        "replicated_deduplication_window_seconds",
        "index_granularity",
    ] {
        let known = client
            .query(
                "SELECT count() FROM system.merge_tree_settings WHERE name = {n:String}",
                &[("n", setting)],
            )
            .await
            .unwrap();
        assert_eq!(known.trim(), "1", "{setting}");
    }

    // Without shard URLs, setup takes the Keeper path: ON CLUSTER through admin_url, which this
    // server refuses (it has no Keeper) before creating anything.
    let mut keeper = cluster_settings();
    keeper.clickhouse.shard_admin_urls.clear();
    let err = edgelog::setup::apply_schema(&keeper).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("Replicated DDL queries are disabled"),
        "{err:#}"
    );
    let exists = client
        .query(
            "SELECT count() FROM system.databases WHERE name = {db:String}",
            &[("db", &keeper.clickhouse.database)],
        )
        .await
        .unwrap();
    assert_eq!(exists.trim(), "0");
}

async fn run_at(url: &str, sql: &str) {
    edgelog::clickhouse::ClickHouseClient::new(url, "default", &Default::default())
        .unwrap()
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql} at {url}: {e}"));
}

/// Sets up (as `s`'s admin user), fills the anonymized topic with `n` records, runs the loader
/// until every batch is committed and stops it cleanly (it leaves its group, which replay and
/// backfill check). Returns the records that must land, after checking they did, once.
async fn load_and_stop(s: &Settings, n: u64) -> u64 {
    let good = fill_anonymized_topic(s, n).await.sent;
    let mut loader = KillOnDrop::spawn(&mut loader_command(s));
    wait_no_pending_batch(
        s,
        "the loader to commit past every batch",
        Duration::from_secs(120),
    )
    .await;
    terminate(&loader);
    assert!(loader.wait().unwrap().success());
    assert_sharded_exactly_once(s, good).await;
    good
}

/// Every bucket and day, ignoring verify's record of audited ones.
fn full() -> edgelog::verify::AuditOptions {
    edgelog::verify::AuditOptions {
        incremental: false,
        ..Default::default()
    }
}

async fn full_audit(s: &Settings) -> edgelog::verify::Report {
    edgelog::verify::audit_with(s, &full()).await.unwrap()
}

/// The days replay rebuilds: those the test's records can carry.
fn yesterday_and_today() -> edgelog::staging::Days {
    let now = edgelog::clock::now_epoch_ms();
    edgelog::staging::Days::parse(
        &edgelog::staging::day_of_epoch_ms(now - 86_400_000),
        &edgelog::staging::day_of_epoch_ms(now),
    )
    .unwrap()
}

/// Replay and backfill rebuild each shard's `_local` tables on that shard: damage to the rollups
/// of both shards is repaired by a backfill, damage to the raw rows by a replay, and `verify`
/// (full, then incremental from its per-node record) is clean after each. With a shard down both
/// fail, naming what failed, and a re-run once it is back completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_and_replay_rebuild_each_shard_and_a_shard_outage_fails_them_loudly() {
    require_shards();
    let _one_at_a_time = SHARDS.lock().await;
    let s = cluster_settings();
    let good = load_and_stop(&s, 3_000).await;
    let db = s.clickhouse.database.clone();

    // verify's record of clean buckets lives on the node it talks to (admin_url): a second,
    // incremental run skips what the first recorded (whole buckets only, hence small ones).
    let incremental = edgelog::verify::AuditOptions {
        incremental: true,
        bucket_offsets: 256,
    };
    let first = edgelog::verify::audit_with(&s, &incremental).await.unwrap();
    assert!(first.is_clean() && first.is_drained(), "{first}");
    let second = edgelog::verify::audit_with(&s, &incremental).await.unwrap();
    assert!(second.is_clean(), "{second}");
    let skipped: u64 = second.partitions.iter().map(|p| p.buckets_skipped).sum();
    assert!(
        skipped > 0,
        "the incremental run skipped recorded buckets: {second}"
    );

    // Rollups double-counted on each shard (a bug's damage; the raw rows are intact).
    for (url, table) in [
        (SHARD_1, "http_log_totals_by_status_local"),
        (SHARD_2, "http_log_totals_local"),
    ] {
        run_at(
            url,
            &format!(
                "INSERT INTO {db}.{table} SELECT * FROM {db}.{table} LIMIT 3 \
                 SETTINGS insert_deduplicate = 0"
            ),
        )
        .await;
    }
    let damaged = full_audit(&s).await;
    assert!(!damaged.totals.is_clean(), "{damaged}");

    // Shard 2 down: both commands fail, with the cause; nothing is swapped on shard 2.
    let days = yesterday_and_today();
    {
        let _down = StoppedShard::stop("2");
        let err = edgelog::backfill::backfill(&s, &[], None)
            .await
            .unwrap_err();
        eprintln!("backfill with shard 2 down: {err:#}");
        assert!(
            format!("{err:#}").contains("reading the days http_log holds"),
            "{err:#}"
        );
        // Replay gets further: its staging table is made on shard 1, then shard 2 refuses.
        let err = edgelog::replay::replay(&s, &days).await.unwrap_err();
        eprintln!("replay with shard 2 down: {err:#}");
        assert!(
            format!("{err:#}").contains(&format!("http_log_local_replay on {SHARD_2}")),
            "{err:#}"
        );
        // The audit and the status read through the Distributed tables: half a cluster must not
        // pass for a clean one (or for fewer rows), so both say the shard is unreachable.
        let err = edgelog::verify::audit_with(&s, &full()).await.unwrap_err();
        eprintln!("verify with shard 2 down: {err:#}");
        assert!(
            format!("{err:#}").contains("ALL_CONNECTION_TRIES_FAILED"),
            "{err:#}"
        );
        let status = edgelog::status::report(&s, &[]).await;
        let (text, attention) = (&status.text, &status.attention);
        assert!(text.contains("clickhouse: UNKNOWN ("), "{text}");
        assert!(
            text.contains("clickhouse: refreshable views UNKNOWN ("),
            "{text}"
        );
        assert!(!text.contains(" rows, newest record "), "{text}");
        // Both are named as needing attention (`edgelog status` exits 1).
        for part in [
            "clickhouse: UNKNOWN (",
            "clickhouse: refreshable views UNKNOWN (",
        ] {
            assert!(
                attention.iter().any(|l| l.starts_with(part)),
                "{part:?} not in {attention:?}"
            );
        }
    }

    let summary = edgelog::backfill::backfill(&s, &[], None).await.unwrap();
    for url in [SHARD_1, SHARD_2] {
        let key = format!("http_log_totals_local on {url}");
        assert!(!summary.replaced[&key].is_empty(), "{summary:?}");
        // Each node's answer computed ahead, refreshed after both shards were rebuilt, counts
        // the requests of the whole cluster (read through the Distributed tables).
        let view = format!("http_log_uniques_top_trailing_mv on {url}");
        assert!(summary.views.refreshed.contains(&view), "{summary:?}");
        let month = count_at(
            url,
            format!(
                "SELECT sum(requests) FROM {db}.http_log_uniques_top_trailing \
                 WHERE window_days = 30"
            ),
        )
        .await;
        let whole = count_at(
            url,
            format!(
                "SELECT count() FROM {db}.http_log WHERE timestamp >= (SELECT \
                 min(window_start) FROM {db}.http_log_uniques_top_trailing) AND resource_id IN \
                 (SELECT resource_id FROM {db}.http_log_uniques_top_trailing \
                 WHERE window_days = 30)"
            ),
        )
        .await;
        assert!(month > 0, "{url}");
        assert_eq!(
            month, whole,
            "{url}: the window counts every shard's requests"
        );
    }
    let repaired = full_audit(&s).await;
    assert!(repaired.is_clean(), "{repaired}");
    assert_sharded_exactly_once(&s, good).await;

    // Raw rows lost on shard 2 and doubled on shard 1 (whose views count the copies too).
    run_at(
        SHARD_2,
        &format!("DELETE FROM {db}.http_log_local WHERE source_offset % 7 = 3"),
    )
    .await;
    run_at(
        SHARD_1,
        &format!(
            "INSERT INTO {db}.http_log_local SELECT * FROM {db}.http_log_local \
             WHERE source_offset % 5 = 1 SETTINGS insert_deduplicate = 0"
        ),
    )
    .await;
    let damaged = full_audit(&s).await;
    assert!(
        damaged.missing() > 0 && damaged.duplicated() > 0,
        "{damaged}"
    );

    let summary = edgelog::replay::replay(&s, &days).await.unwrap();
    assert_eq!(summary.rows_replayed, good, "{summary:?}");
    for url in [SHARD_1, SHARD_2] {
        let key = format!("http_log_local on {url}");
        assert!(!summary.replaced[&key].is_empty(), "{summary:?}");
    }
    let replayed = edgelog::verify::audit_with(&s, &incremental).await.unwrap();
    assert!(replayed.is_clean(), "{replayed}");
    let replayed = full_audit(&s).await;
    assert!(replayed.is_clean(), "{replayed}");
    assert_sharded_exactly_once(&s, good).await;
    for url in [SHARD_1, SHARD_2] {
        let staging = count_at(
            url,
            format!(
                "SELECT count() FROM system.tables WHERE database = '{db}' \
                 AND name LIKE '%replay%'"
            ),
        )
        .await;
        assert_eq!(staging, 0, "staging tables are dropped on {url}");
    }
    drop_database(&s).await;
}

/// Least privilege in cluster mode: `edgelog_operator` (scripts/clickhouse/users.xml: table
/// engines Distributed and Replicated*, READ ON REMOTE for `status`) runs `setup`, `status`,
/// `verify`, `backfill` and `replay` on the shards, and `edgelog_loader` inserts through the
/// Distributed table. Production's database name, because the operator's grants name it: no other
/// test uses `edgelog` on the shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_and_loader_users_suffice_in_cluster_mode() {
    require_shards();
    let _one_at_a_time = SHARDS.lock().await;
    let mut s = cluster_settings();
    s.clickhouse.database = "edgelog".into();
    s.clickhouse.admin_user = "edgelog_operator".into();
    s.clickhouse.admin_password = edgelog::config::Secret::new("edgelog-operator-dev-password");
    for url in [SHARD_1, SHARD_2] {
        run_at(url, "DROP DATABASE IF EXISTS edgelog SYNC").await;
    }
    // setup runs as the operator.
    let good = load_and_stop(&s, 2_000).await;

    let status = edgelog::status::report(&s, &[]).await.text;
    assert!(
        status.contains(&format!("clickhouse: edgelog.http_log holds {good} rows")),
        "{status}"
    );
    // Each node's refreshable view (sql/012), read through clusterAllReplicas.
    assert_eq!(
        status
            .matches("clickhouse: view http_log_uniques_top_trailing_mv on ")
            .count(),
        2,
        "{status}"
    );
    assert!(!status.contains("UNKNOWN"), "{status}");
    let report = full_audit(&s).await;
    assert!(report.is_clean() && report.is_drained(), "{report}");

    let summary = edgelog::backfill::backfill(&s, &[], None).await.unwrap();
    assert!(!summary.replaced.is_empty(), "{summary:?}");
    let days = yesterday_and_today();
    let summary = edgelog::replay::replay(&s, &days).await.unwrap();
    assert_eq!(summary.rows_replayed, good, "{summary:?}");
    let report = full_audit(&s).await;
    assert!(report.is_clean(), "{report}");
    assert_sharded_exactly_once(&s, good).await;
    drop_database(&s).await;
}
