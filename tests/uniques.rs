//! The unique-client rollups (migrations 009-011) on the real ClickHouse: fed by the loader's own
//! inserts, unchanged by a retried batch, checked by `verify` against `uniqExact`, caught when
//! tampered with, and filled by `backfill` when the migration comes after the data.

mod common;

use std::time::Duration;

use common::*;
use edgelog::anon_record::{decode, transform, AnonRecord};
use edgelog::backfill::{new_rollups_missing_rows, rebuild_rollups, rollup_tables};
use edgelog::body::{encode_body, insert_url, BodyCompression};
use edgelog::loader::insert::{InsertClient, Outcome};
use edgelog::record::encode_capnp;
use edgelog::synth::TrafficModel;
use edgelog::verify::uniques::{self, UniquesCheck};

/// `n` records of the producer's model as stage one writes them, over the last three hours.
fn records(n: usize) -> Vec<AnonRecord> {
    let mut model = TrafficModel::new(&Default::default());
    let span_ms = 3 * 3_600_000u64;
    let start = edgelog::clock::now_epoch_ms() - span_ms;
    (0..n)
        .map(|i| {
            let ts = start + i as u64 * span_ms / n as u64;
            let payload = encode_capnp(&model.next_record(ts));
            decode(&transform(&payload, (i % 3) as i32, i as i64, 48).unwrap().0).unwrap()
        })
        .collect()
}

async fn check(db: &str) -> UniquesCheck {
    uniques::check(&admin(), db, "toDateTime(0)", "toDateTime(4294967295)")
        .await
        .unwrap()
}

fn uniques_tables() -> Vec<String> {
    uniques::TABLES
        .iter()
        .map(|t| t.table.to_string())
        .collect()
}

/// A query of the traffic dashboard, as written (Grafana's macros and variables unfilled): the
/// panel titled `title`.
fn dashboard_query(title: &str) -> String {
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(
        "../docker/grafana/dashboards/edgelog-traffic.json"
    ))
    .unwrap();
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == title)
        .unwrap_or_else(|| panic!("the traffic dashboard has a {title:?} panel"));
    panel["targets"][0]["rawSql"].as_str().unwrap().to_string()
}

/// `template` with Grafana's macros and variables filled in as the ClickHouse data source fills
/// them, reading database `db`.
fn dashboard_series(
    template: &str,
    db: &str,
    from: u64,
    to: u64,
    interval_s: u64,
    filter: &Filter,
) -> String {
    let quoted = |v: &str| format!("'{v}'");
    template
        .replace("edgelog.", &format!("{db}."))
        .replace("$__fromTime", &format!("toDateTime({from})"))
        .replace("$__toTime", &format!("toDateTime({to})"))
        .replace(
            "$__timeInterval(ts)",
            &format!("toStartOfInterval(toDateTime(ts), INTERVAL {interval_s} second)"),
        )
        .replace(
            "$__timeFilter(ts)",
            &format!("ts >= toDateTime({from}) AND ts <= toDateTime({to})"),
        )
        .replace("$__interval_s", &interval_s.to_string())
        .replace("${resource:sqlstring}", &quoted(&filter.resource))
        .replace("${ip:sqlstring}", "''")
        .replace("${status:sqlstring}", &quoted(&filter.status))
        .replace("${cache:sqlstring}", "'__all__'")
}

/// The dashboard's variables: empty or `__all__` for no filter (cache status: none).
struct Filter {
    resource: String,
    status: String,
    /// The same filter on `http_log`, for the exact recount.
    raw: String,
    /// The table the dashboard should read at a whole-day interval (the coarsest route).
    daily_table: &'static str,
}

/// The rows a query read, from ClickHouse's `X-ClickHouse-Summary` header.
async fn rows_read(sql: &str) -> u64 {
    edgelog::clickhouse::install_crypto_provider();
    let response = reqwest::Client::new()
        .post(format!("{CLICKHOUSE}/?wait_end_of_query=1"))
        .body(format!("{sql}\nFORMAT Null"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{sql}");
    let summary: serde_json::Value =
        serde_json::from_slice(response.headers()["X-ClickHouse-Summary"].as_bytes()).unwrap();
    summary["read_rows"].as_str().unwrap().parse().unwrap()
}

/// Every route of the panel (interval × filter) gives each bucket's request count exactly and its
/// distinct clients within verify's tolerance of `uniqExact` over the raw rows, and the coarse
/// routes read few rows (the table the interval calls for, not the per-minute states).
async fn the_dashboard_series_matches_an_exact_recount_at_every_interval(db: &str) {
    let (resource, status) = {
        let text = admin()
            .query(
                &format!(
                    "SELECT toString(resource_id), toString(response_status) FROM {db}.http_log \
                     GROUP BY ALL ORDER BY count() DESC LIMIT 1 FORMAT TSV"
                ),
                &[],
            )
            .await
            .unwrap();
        let (r, s) = text.trim().split_once('\t').unwrap();
        (r.to_string(), s.to_string())
    };
    let filters = [
        Filter {
            resource: String::new(),
            status: "__all__".into(),
            raw: "1".into(),
            daily_table: "http_log_uniques_1d",
        },
        Filter {
            resource: String::new(),
            raw: format!("toString(response_status) = '{status}'"),
            status,
            daily_table: "http_log_uniques_by_status_1d",
        },
        Filter {
            raw: format!("toString(resource_id) = '{resource}'"),
            resource,
            status: "__all__".into(),
            daily_table: "http_log_uniques_by_resource_combined_1d",
        },
    ];
    // The records span the last three hours: from the day before's midnight on, every bucket
    // lies wholly inside the range.
    let from = count(format!(
        "SELECT toUInt32(toStartOfDay(min(timestamp))) - 86400 FROM {db}.http_log"
    ))
    .await;
    let to = from + 4 * 86_400;
    let template = dashboard_query("Unique clients");
    for filter in &filters {
        for interval_s in [60u64, 300, 3_600, 7_200, 21_600, 43_200, 86_400] {
            let panel = dashboard_series(&template, db, from, to, interval_s, filter);
            let answer = admin()
                .query(&format!("{panel}\nFORMAT TSV"), &[])
                .await
                .unwrap_or_else(|e| panic!("{e}: {panel}"));
            let exact = admin()
                .query(
                    &format!(
                        "SELECT toStartOfInterval(timestamp, INTERVAL {interval_s} second) AS time, \
                         uniqExact(remote_addr), count() FROM {db}.http_log \
                         WHERE {} GROUP BY time ORDER BY time FORMAT TSV",
                        filter.raw
                    ),
                    &[],
                )
                .await
                .unwrap();
            let rows = |t: &str| -> Vec<(String, u64, u64)> {
                t.lines()
                    .map(|l| {
                        let f: Vec<&str> = l.split('\t').collect();
                        (
                            f[0].to_string(),
                            f[1].parse().unwrap(),
                            f[2].parse().unwrap(),
                        )
                    })
                    .collect()
            };
            let (got, want) = (rows(&answer), rows(&exact));
            let what = format!("interval {interval_s} s, filter {:?}", filter.raw);
            assert!(!want.is_empty(), "{what}");
            assert_eq!(got.len(), want.len(), "{what}: {answer} against {exact}");
            for ((t, clients, requests), (t_exact, clients_exact, requests_exact)) in
                got.iter().zip(&want)
            {
                assert_eq!((t, requests), (t_exact, requests_exact), "{what}");
                let slack = (*clients_exact as f64 * uniques::RELATIVE_TOLERANCE)
                    .max(uniques::ABSOLUTE_TOLERANCE as f64);
                assert!(
                    clients.abs_diff(*clients_exact) as f64 <= slack,
                    "{what} at {t}: {clients} clients against uniqExact {clients_exact}"
                );
            }
            if interval_s == 86_400 {
                // Whole days read the daily table alone: at most its rows, which are far fewer
                // than the per-minute states of three hours.
                let read = rows_read(&panel).await;
                let daily = count(format!("SELECT count() FROM {db}.{}", filter.daily_table)).await;
                assert!(
                    (1..=daily).contains(&read),
                    "{what}: read {read} rows, {} has {daily}",
                    filter.daily_table
                );
            }
        }
    }
}

/// The top-10 panel over "Last 24 hours" to "Last 30 days": read from the counts computed ahead
/// (sql/012) when fresh for the range, merged from the daily states otherwise, the same answer
/// both ways and within verify's tolerance of `uniqExact` over the raw rows.
async fn the_top_10_reads_counts_computed_ahead_for_the_last_day_to_30_days(db: &str) {
    let ch = admin();
    let view = "http_log_uniques_top_trailing_mv";
    // What `replay` and `backfill` do when they finish: refresh now and wait for it; a view an
    // operator stopped is named, not refreshed (ClickHouse would ignore the request).
    let system_view = |verb: &'static str| {
        let ch = admin();
        async move {
            ch.query(&format!("SYSTEM {verb} VIEW {db}.{view}"), &[])
                .await
                .unwrap()
        }
    };
    system_view("STOP").await;
    let stopped = edgelog::staging::refresh_views(&ch, db).await.unwrap();
    assert_eq!(
        (stopped.refreshed.len(), stopped.stopped.as_slice()),
        (0, &[view.to_string()][..])
    );
    system_view("START").await;
    let refreshed = edgelog::staging::refresh_views(&ch, db).await.unwrap();
    assert_eq!(refreshed.refreshed, [view]);
    assert!(refreshed.stopped.is_empty());
    let computed_at = count(format!(
        "SELECT toUInt32(max(computed_at)) FROM {db}.http_log_uniques_top_trailing"
    ))
    .await;
    assert!(computed_at > 0, "the refresh wrote its windows");
    let ahead_rows = count(format!(
        "SELECT count() FROM {db}.http_log_uniques_top_trailing"
    ))
    .await;
    let template = dashboard_query("Top 10 resources by unique clients");
    let no_filter = Filter {
        resource: String::new(),
        status: "__all__".into(),
        raw: "1".into(),
        daily_table: "http_log_uniques_by_resource_keyed_1d",
    };
    for days in [1u64, 2, 7, 30] {
        let from = computed_at - days * 86_400;
        let ask = |to: u64| {
            let panel = dashboard_series(&template, db, from, to, 60, &no_filter);
            async move {
                let answer = admin()
                    .query(&format!("{panel}\nFORMAT TSV"), &[])
                    .await
                    .unwrap_or_else(|e| panic!("{e}: {panel}"));
                (answer, rows_read(&panel).await)
            }
        };
        // Asked right after the refresh: the counts computed ahead, a few thousand rows at most.
        let (ahead, read_ahead) = ask(computed_at + 5).await;
        assert!(
            read_ahead <= 2 * ahead_rows,
            "{days} d: read {read_ahead} rows, the table computed ahead has {ahead_rows}"
        );
        // Past the 10 minutes the panel trusts a refresh: the states, and the same answer.
        let (merged, read_merged) = ask(computed_at + 601).await;
        assert!(read_merged > 2 * ahead_rows, "{days} d: read {read_merged}");
        assert_eq!(ahead, merged, "{days} d: computed ahead and merged differ");

        let exact = admin()
            .query(
                &format!(
                    "SELECT toString(resource_id), uniqExact(remote_addr), count() \
                     FROM {db}.http_log \
                     WHERE timestamp >= toStartOfDay(toDateTime({from})) \
                       AND timestamp <= toDateTime({computed_at}) \
                     GROUP BY resource_id FORMAT TSV"
                ),
                &[],
            )
            .await
            .unwrap();
        let exact: std::collections::HashMap<String, (u64, u64)> = exact
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (
                    f[0].to_string(),
                    (f[1].parse().unwrap(), f[2].parse().unwrap()),
                )
            })
            .collect();
        let mut counts: Vec<u64> = exact.values().map(|(c, _)| *c).collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let tenth = counts[9];
        let rows: Vec<&str> = ahead.lines().collect();
        assert_eq!(rows.len(), 10, "{days} d: {ahead}");
        for row in rows {
            let f: Vec<&str> = row.split('\t').collect();
            let (clients, requests): (u64, u64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
            let (clients_exact, requests_exact) = exact[f[0]];
            let slack = (clients_exact as f64 * uniques::RELATIVE_TOLERANCE)
                .max(uniques::ABSOLUTE_TOLERANCE as f64);
            assert_eq!(requests, requests_exact, "{days} d, resource {}", f[0]);
            assert!(
                clients.abs_diff(clients_exact) as f64 <= slack,
                "{days} d, resource {}: {clients} clients against uniqExact {clients_exact}",
                f[0]
            );
            // Ranked within the estimate's error of the exact top 10.
            assert!(
                clients_exact as f64 >= tenth as f64 - 2.0 * slack,
                "{days} d, resource {} ({clients_exact}) is not in the exact top 10 (10th: {tenth})",
                f[0]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_clients_are_exact_under_retries_verified_and_backfilled() {
    require_stack();
    let s = isolated_settings();
    edgelog::setup::apply_schema(&s).await.unwrap();
    let db = s.clickhouse.database.clone();
    let all = records(30_000);
    let batches: Vec<&[AnonRecord]> = all.chunks(10_000).collect();

    // The loader's client and user through the fast proxy, from an address of its own.
    let client = InsertClient::new(
        &s.clickhouse,
        Some(fresh_loopback_ip()),
        Duration::from_secs(60),
    )
    .unwrap();
    let send = |i: usize| {
        let refs: Vec<&AnonRecord> = batches[i].iter().collect();
        let body = encode_body(&refs, BodyCompression::Xz);
        let url = insert_url(&s.clickhouse.url, &db, Some(&format!("uniques-test-{i}")));
        let client = &client;
        async move { client.send(&url, BodyCompression::Xz, body).await }
    };
    for i in 0..batches.len() {
        let outcome = send(i).await;
        assert!(
            matches!(outcome, Outcome::Inserted),
            "batch {i}: {outcome:?}"
        );
    }
    let clean = check(&db).await;
    assert_eq!(clean.tables.len(), uniques::TABLES.len(), "{clean}");
    assert!(clean.is_clean(), "{clean}");
    assert!(clean.tables.iter().all(|t| t.buckets > 0), "{clean:?}");
    the_dashboard_series_matches_an_exact_recount_at_every_interval(&db).await;
    the_top_10_reads_counts_computed_ahead_for_the_last_day_to_30_days(&db).await;

    // A loader retry: the middle batch again under its token. Nothing may change, the request
    // sums least of all (a distinct count would hide a double-counted batch).
    let per_table = || async {
        let mut out = Vec::new();
        for t in uniques_tables() {
            out.push(count(format!("SELECT sum(requests) FROM {db}.{t}")).await);
        }
        out
    };
    let before = per_table().await;
    assert!(before.iter().all(|&r| r == all.len() as u64), "{before:?}");
    let outcome = send(1).await;
    assert!(matches!(outcome, Outcome::Inserted), "retry: {outcome:?}");
    assert_eq!(
        per_table().await,
        before,
        "a retried batch changed a rollup"
    );
    let exact = count(format!("SELECT uniqExact(remote_addr) FROM {db}.http_log")).await;
    let merged = count(format!(
        "SELECT uniqMerge(clients) FROM {db}.http_log_uniques_1h"
    ))
    .await;
    assert!(exact > 1_000, "the model has many clients: {exact}");
    assert!(
        merged.abs_diff(exact) as f64 <= (exact as f64 * uniques::RELATIVE_TOLERANCE).max(2.0),
        "three hours merged: {merged} against uniqExact {exact}"
    );
    assert!(check(&db).await.is_clean());

    // Tampering behind the pipeline's back: a double-counted bucket, and clients that never came.
    for sql in [
        format!(
            "INSERT INTO {db}.http_log_uniques_by_status SELECT * FROM {db}.http_log_uniques_by_status \
             LIMIT 3 SETTINGS insert_deduplicate = 0"
        ),
        format!(
            "INSERT INTO {db}.http_log_uniques_1h SELECT toStartOfHour(now() - INTERVAL 10 DAY), \
             0, uniqState(toString(number)) FROM numbers(50) SETTINGS insert_deduplicate = 0"
        ),
        // A day of all traffic (migration 011's uniqCombined states) with clients that never came.
        format!(
            "INSERT INTO {db}.http_log_uniques_1d SELECT toStartOfDay(now() - INTERVAL 10 DAY), \
             0, uniqCombinedState(17)(toString(number)) FROM numbers(50) \
             SETTINGS insert_deduplicate = 0"
        ),
        // A resource's day (migration 010) that lost its clients but kept its request count.
        format!(
            "INSERT INTO {db}.http_log_uniques_by_resource_keyed_1d SELECT ts, resource_id, 0, \
             uniqState(toString(number)) FROM {db}.http_log_uniques_by_resource_keyed_1d, \
             numbers(40) AS n GROUP BY ts, resource_id ORDER BY resource_id DESC, ts LIMIT 1 \
             SETTINGS insert_deduplicate = 0"
        ),
    ] {
        admin().query(&sql, &[]).await.unwrap();
    }
    let damaged = check(&db).await;
    assert!(!damaged.is_clean(), "{damaged}");
    let table = |name: &str| {
        damaged
            .tables
            .iter()
            .find(|t| t.table == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        table("http_log_uniques_by_status").requests_differing,
        3,
        "{damaged}"
    );
    let hour = table("http_log_uniques_1h");
    assert_eq!(
        (hour.requests_differing, hour.clients_outside),
        (0, 1),
        "{damaged}"
    );
    let all_day = table("http_log_uniques_1d");
    assert_eq!(
        (all_day.requests_differing, all_day.clients_outside),
        (0, 1),
        "{damaged}"
    );
    let day = table("http_log_uniques_by_resource_keyed_1d");
    assert_eq!(
        (day.requests_differing, day.clients_outside),
        (0, 1),
        "{damaged}"
    );
    let text = damaged.to_string();
    assert!(text.contains("UNIQUES     http_log_uniques_1h:"), "{text}");

    // As if migrations 009-011 came after the data: their tables gone and their records too.
    // Set-up names the thirteen as needing a backfill, which fills them from http_log.
    let ch = admin();
    for t in uniques_tables() {
        ch.query(&format!("DROP VIEW {db}.{t}_mv"), &[])
            .await
            .unwrap();
        ch.query(&format!("DROP TABLE {db}.{t}"), &[])
            .await
            .unwrap();
    }
    ch.query(
        &format!("DELETE FROM {db}.schema_migrations WHERE version IN (9, 10, 11)"),
        &[],
    )
    .await
    .unwrap();
    let before = rollup_tables(&ch, &db).await.unwrap();
    assert_eq!(
        edgelog::setup::apply_schema(&s).await.unwrap(),
        vec![9, 10, 11]
    );
    let mut missing = new_rollups_missing_rows(&ch, &db, &before).await.unwrap();
    missing.sort();
    let mut want = uniques_tables();
    want.sort();
    assert_eq!(missing, want);
    let empty = check(&db).await;
    assert!(
        empty
            .tables
            .iter()
            .all(|t| t.requests_differing == t.buckets),
        "the new tables hold nothing yet: {empty:?}"
    );
    let summary = rebuild_rollups(&ch, &db, s.clickhouse.raw_ttl_days, &missing, None)
        .await
        .unwrap();
    assert_eq!(summary.replaced.len(), uniques::TABLES.len(), "{summary:?}");
    let rebuilt = check(&db).await;
    assert!(rebuilt.is_clean(), "{rebuilt}");
    let buckets = |c: &UniquesCheck| c.tables.iter().map(|t| t.buckets).collect::<Vec<_>>();
    assert_eq!(
        buckets(&rebuilt),
        buckets(&clean),
        "the backfill gives what the views gave"
    );

    // `edgelog totals` as an operator runs it: the unique_clients column of the last minutes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgelog"))
        .args(["totals", "--minutes", "240"])
        .env("EDGELOG_CLICKHOUSE__DATABASE", &db)
        .env("EDGELOG_CLICKHOUSE__ADMIN_URL", CLICKHOUSE)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("unique_clients"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    ch.query(&format!("DROP DATABASE {db}"), &[]).await.unwrap();
}
