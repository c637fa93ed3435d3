//! Query time and disk use of the totals table(s) against the raw table, on a large dataset drawn
//! from the producer's traffic model. Needs the local ClickHouse (direct HTTP, not the proxy).
//!
//!   cargo bench --bench queries -- --rows 100000000 [--reuse] [--optimize] [--samples 100]
//!
//! Phases:
//! 1. Schema: database `edgelog_bench` (never `edgelog` or `it_*`) gets the shipped migrations
//!    through `setup::apply_schema`, so what is measured is what ships. TTLs are off: the data sits
//!    at fixed past dates (ending 2026-11-23 00:00 UTC) and must not expire between runs.
//! 2. Load: `--rows` records from `synth::TrafficModel` (default producer settings), timestamps
//!    spread evenly over `--days`, addresses anonymized as stage one does, encoded by the loader's
//!    own Native encoder and inserted into `http_log` with the loader's insert URL (pinned settings,
//!    dedup token, `deduplicate_blocks_in_dependent_materialized_views`), so the materialized views
//!    fill the rollups exactly as in production. Skipped when `http_log` already holds the rows.
//! 3. Settle: wait for background merges to stop (or `OPTIMIZE ... FINAL` with `--optimize`), then
//!    part counts, rows and bytes per row of every table from `system.parts`.
//! 4. Queries: per window (1 h, 24 h, 7 d, 30 d) `--samples` random Grafana series queries (a random
//!    subset of resource, status, cache status, IP, values taken from one random record of the
//!    model, so heavy hitters are picked as often as the traffic has them) and `--top-samples`
//!    top-10 panels (IPs or resources, random subset of the other filters). Each runs against the
//!    route(s) chosen by `--routes` and its first `--raw-samples` also against `http_log`; every
//!    rollup answer is checked equal to the raw answer. Wall time is client-side; server time and
//!    rows read come from the `X-ClickHouse-Summary` header (the local server has no query_log).
//!
//! Optional phases: `--check-dedup` re-sends the first batch with its token (a loader retry) and
//! checks that no table changed; `--cardinality` prints rollup rows per raw row against raw rows
//! per bucket (the constants of `shared/capacity.rs`); `--raw-layouts-days D` copies the last D
//! days into alternative ORDER BYs/codecs of `http_log` and compares bytes per column and query
//! times (the copies are dropped afterwards).

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use edgelog::anon_record::{AnonRecord, VERSION};
use edgelog::anonymize::anonymize_ip;
use edgelog::backfill::{rebuild_rollups, rollup_tables};
use edgelog::body::encode_native;
use edgelog::body::insert_url;
use edgelog::clickhouse::ClickHouseClient;
use edgelog::config::{ProducerSettings, Settings};
use edgelog::synth::TrafficModel;
use edgelog::verify::uniques;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// End of the synthetic data: 2026-11-23 00:00:00 UTC (fixed, so reruns reuse the same data).
const DATA_END_S: u64 = 1_795_392_000;

#[derive(Parser)]
struct Args {
    /// Raw records to load.
    #[arg(long, default_value_t = 100_000_000)]
    rows: u64,
    /// Time span the records are spread over, in days, ending at DATA_END.
    #[arg(long, default_value_t = 30)]
    days: u64,
    /// Rows per insert.
    #[arg(long, default_value_t = 1_000_000)]
    batch: usize,
    /// Keep existing data when `http_log` already holds at least `--rows` rows.
    #[arg(long)]
    reuse: bool,
    /// Drop the bench database first.
    #[arg(long)]
    drop: bool,
    /// OPTIMIZE TABLE ... FINAL every table before the queries (default: wait for merges only).
    #[arg(long)]
    optimize: bool,
    /// Longest wait for background merges to stop, in seconds.
    #[arg(long, default_value_t = 900)]
    settle_secs: u64,
    /// Series queries per window.
    #[arg(long, default_value_t = 100)]
    samples: usize,
    /// Top-10 panel queries per window (alternately IPs and resources).
    #[arg(long, default_value_t = 40)]
    top_samples: usize,
    /// How many of each window's series (and top) queries also run against the raw table.
    #[arg(long, default_value_t = 20)]
    raw_samples: usize,
    /// Query routes to measure: `shipped` (everything from http_log_totals) and/or `tiered`
    /// (the rollups of migration 003, chosen by the filters).
    #[arg(long, value_delimiter = ',', default_value = "shipped,tiered")]
    routes: Vec<String>,
    /// Skip the query phase (load and sizes only).
    #[arg(long)]
    no_queries: bool,
    /// Measure the unique-client panels (migrations 009-012) instead of the totals queries: per window
    /// (24 h, 7 d, 30 d ending at DATA_END) `--samples` each of the overall series, a
    /// status/cache series, one resource's series and the top 10 resources by unique clients,
    /// the first `--raw-samples` of each also against `uniqExact` on `http_log`.
    #[arg(long)]
    uniques: bool,
    /// With `--uniques`: also run this many of each window's panels as the dashboard asked them
    /// before (the series before migration 011, ~200 points: per-minute states over a day,
    /// hourly from 7 days on; the top 10 before 012, merged from 010's daily states of the 100
    /// busiest resources), and print both.
    #[arg(long, default_value_t = 0)]
    baseline_samples: usize,
    /// Compare alternative ORDER BYs and codecs of `http_log` on a slice of the data (bytes per
    /// row per column and raw-query times); this many days of the loaded data.
    #[arg(long, default_value_t = 0)]
    raw_layouts_days: u64,
    /// Resend the first batch with its token (a loader retry) and check no table changes.
    #[arg(long)]
    check_dedup: bool,
    /// Also measure rollup rows per raw row as a function of raw rows per bucket (the constants
    /// of `shared/capacity.rs`).
    #[arg(long)]
    cardinality: bool,
    #[arg(long, default_value = "http://127.0.0.1:8123/")]
    url: String,
    #[arg(long, default_value = "edgelog_bench")]
    database: String,
    /// Seed of the traffic model (the query sampler uses seed + 1).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Ch {
    http: reqwest::Client,
    url: String,
}

impl Ch {
    /// One statement; `params` become `param_<name>` so values never enter the SQL text.
    async fn query(&self, sql: &str, params: &[(String, String)]) -> anyhow::Result<String> {
        Ok(self.query_summary(sql, params).await?.0)
    }

    /// [`Ch::query`] plus the server's own elapsed time (ms) and rows read, from the
    /// `X-ClickHouse-Summary` header. `wait_end_of_query` makes the header final (the local server
    /// has no `system.query_log`); results here are small, so buffering them costs nothing.
    async fn query_summary(
        &self,
        sql: &str,
        params: &[(String, String)],
    ) -> anyhow::Result<(String, Option<(f64, f64)>)> {
        let mut q: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (format!("param_{k}"), v.clone()))
            .collect();
        q.push(("wait_end_of_query".into(), "1".into()));
        let resp = self
            .http
            .post(&self.url)
            .query(&q)
            .body(sql.to_string())
            .send()
            .await?;
        let status = resp.status();
        let summary = resp
            .headers()
            .get("X-ClickHouse-Summary")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| {
                Some((
                    summary_field(s, "elapsed_ns")? / 1e6,
                    summary_field(s, "read_rows")?,
                ))
            });
        let body = resp.text().await?;
        anyhow::ensure!(status.is_success(), "HTTP {status}: {body}\nquery: {sql}");
        Ok((body, summary))
    }

    async fn scalar(&self, sql: &str) -> anyhow::Result<f64> {
        Ok(self.query(sql, &[]).await?.trim().parse()?)
    }
}

/// A numeric field of the summary header (`{"read_rows":"81921",...}`): values are quoted numbers.
fn summary_field(summary: &str, name: &str) -> Option<f64> {
    let rest = &summary[summary.find(&format!("\"{name}\":\""))? + name.len() + 4..];
    rest[..rest.find('"')?].parse().ok()
}

fn anonymized(model: &mut TrafficModel, ts_ms: u64, offset: i64) -> AnonRecord {
    let r = model.next_record(ts_ms);
    AnonRecord {
        version: VERSION,
        timestamp_epoch_milli: r.timestamp_epoch_milli,
        resource_id: r.resource_id,
        bytes_sent: r.bytes_sent,
        request_time_milli: r.request_time_milli,
        response_status: r.response_status,
        cache_status: r.cache_status,
        method: r.method,
        remote_addr: anonymize_ip(&r.remote_addr, 48).as_str().to_string(),
        url: r.url,
        source_partition: (offset % 4) as i32,
        source_offset: offset,
    }
}

/// The Native body of records `range` out of `n` spread over `days` (the model must have produced
/// exactly `range.start` records before).
fn batch_body(model: &mut TrafficModel, range: std::ops::Range<u64>, n: u64, days: u64) -> Vec<u8> {
    let span_ms = days * 86_400_000;
    let start_ms = DATA_END_S * 1000 - span_ms;
    let records: Vec<AnonRecord> = range
        .map(|k| {
            let ts = start_ms + (k as u128 * span_ms as u128 / n as u128) as u64;
            anonymized(model, ts, k as i64)
        })
        .collect();
    let refs: Vec<&AnonRecord> = records.iter().collect();
    encode_native(&refs)
}

/// Sends the first batch again with its original token, as a loader retry would, and checks that
/// no table changed: every materialized-view target must deduplicate it.
async fn check_dedup(ch: &Ch, a: &Args) -> anyhow::Result<()> {
    let db = &a.database;
    let tables = ch
        .query(
            &format!(
                "SELECT name FROM system.tables WHERE database = '{db}' \
                 AND name LIKE 'http_log%' AND engine LIKE '%MergeTree' ORDER BY name"
            ),
            &[],
        )
        .await?;
    let sums = || async {
        let mut out = Vec::new();
        for t in tables.lines() {
            let col = if t == "http_log" {
                "count()"
            } else {
                "sum(requests)"
            };
            out.push((
                t.to_string(),
                ch.scalar(&format!("SELECT {col} FROM {db}.{t}")).await?,
            ));
        }
        anyhow::Ok(out)
    };
    let before = sums().await?;
    let p = ProducerSettings {
        seed: a.seed,
        ..ProducerSettings::default()
    };
    let mut model = TrafficModel::new(&p);
    let body = batch_body(&mut model, 0..(a.batch as u64).min(a.rows), a.rows, a.days);
    let token = format!("bench-seed{}-rows{}-batch0", a.seed, a.rows);
    let resp = ch
        .http
        .post(insert_url(&a.url, db, Some(&token)))
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "resend: {}", resp.text().await?);
    let after = sums().await?;
    for ((t, x), (_, y)) in before.iter().zip(&after) {
        println!(
            "  dedup check {t}: {x} -> {y} {}",
            if x == y { "ok" } else { "CHANGED" }
        );
    }
    anyhow::ensure!(before == after, "a retried insert changed the totals");
    Ok(())
}

async fn load(ch: &Ch, a: &Args) -> anyhow::Result<()> {
    let n = a.rows;
    let days = a.days;
    let batch = a.batch as u64;
    let seed = a.seed;
    // Generation and encoding run on their own thread, one body ahead of the insert in flight.
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>, f64)>(1);
    let generator = std::thread::spawn(move || {
        let p = ProducerSettings {
            seed,
            ..ProducerSettings::default()
        };
        let mut model = TrafficModel::new(&p);
        let mut i = 0u64;
        let mut b = 0u64;
        while i < n {
            let t = Instant::now();
            let end = (i + batch).min(n);
            let body = batch_body(&mut model, i..end, n, days);
            if tx.send((b, body, t.elapsed().as_secs_f64())).is_err() {
                return;
            }
            i = end;
            b += 1;
        }
    });
    let started = Instant::now();
    let (mut gen_s, mut insert_s, mut sent) = (0.0, 0.0, 0u64);
    loop {
        let rx_ref = &rx;
        let Ok((b, body, g)) = tokio::task::block_in_place(|| rx_ref.recv()) else {
            break;
        };
        gen_s += g;
        let token = format!("bench-seed{seed}-rows{n}-batch{b}");
        let url = insert_url(&a.url, &a.database, Some(&token));
        let t = Instant::now();
        let resp = ch.http.post(&url).body(body).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::ensure!(status.is_success(), "insert {b}: HTTP {status}: {text}");
        insert_s += t.elapsed().as_secs_f64();
        sent = ((b + 1) * batch).min(n);
        if b % 10 == 9 || sent == n {
            let el = started.elapsed().as_secs_f64();
            println!(
                "  loaded {sent} rows in {el:.0} s ({:.0} rows/s; generate+encode {gen_s:.0} s, insert {insert_s:.0} s)",
                sent as f64 / el
            );
        }
    }
    generator.join().expect("generator thread");
    anyhow::ensure!(sent == n, "generator stopped early at {sent}");
    let el = started.elapsed().as_secs_f64();
    println!(
        "load: {n} rows in {el:.0} s = {:.0} rows/s (inserts alone {insert_s:.0} s = {:.0} rows/s)",
        n as f64 / el,
        n as f64 / insert_s
    );
    Ok(())
}

/// Fills rollups that a later migration added to a database already holding data (their views
/// only see new inserts): each view's own SELECT over `http_log` (as `edgelog replay` finds
/// them), one day at a time.
async fn backfill(ch: &Ch, a: &Args, settings: &Settings) -> anyhow::Result<()> {
    let db = &a.database;
    if ch
        .scalar(&format!("SELECT count() FROM {db}.http_log"))
        .await?
        == 0.0
    {
        return Ok(());
    }
    let admin = ClickHouseClient::admin(&settings.clickhouse)?;
    let mut empty = Vec::new();
    for table in rollup_tables(&admin, db).await? {
        // The unique-client panels read nothing else: a database loaded with only their
        // migrations (scripts/uniques-load.sh) is not backfilled with every other rollup.
        if a.uniques && !table.starts_with("http_log_uniques") {
            continue;
        }
        if ch
            .scalar(&format!("SELECT count() FROM {db}.{table}"))
            .await?
            == 0.0
        {
            empty.push(table);
        }
    }
    if empty.is_empty() {
        return Ok(());
    }
    // Nothing else writes to the bench database; TTLs are off (0 days).
    let t = Instant::now();
    rebuild_rollups(&admin, db, 0, &empty, None).await?;
    println!(
        "backfill: {} from http_log in {:.0} s",
        empty.join(", "),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn parts_report(ch: &Ch, db: &str, raw_rows: f64) -> anyhow::Result<()> {
    let sql = format!(
        "SELECT table, count(), sum(rows), sum(data_compressed_bytes), sum(data_uncompressed_bytes) \
         FROM system.parts WHERE database = '{db}' AND active AND table != 'schema_migrations' \
         GROUP BY table ORDER BY table FORMAT TSV"
    );
    println!("| table | active parts | rows | rows per raw row | compressed | B/row | uncompressed B/row |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for line in ch.query(&sql, &[]).await?.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let rows: f64 = f[2].parse()?;
        let comp: f64 = f[3].parse()?;
        let unc: f64 = f[4].parse()?;
        println!(
            "| {} | {} | {} | {:.3} | {:.1} MiB | {:.2} | {:.1} |",
            f[0],
            f[1],
            f[2],
            rows / raw_rows,
            comp / 1048576.0,
            comp / rows.max(1.0),
            unc / rows.max(1.0)
        );
    }
    Ok(())
}

async fn settle(ch: &Ch, a: &Args) -> anyhow::Result<()> {
    let db = &a.database;
    let t = Instant::now();
    if a.optimize {
        let tables = ch
            .query(
                &format!(
                    "SELECT name FROM system.tables WHERE database = '{db}' \
                     AND engine LIKE '%MergeTree' AND name != 'schema_migrations'"
                ),
                &[],
            )
            .await?;
        for table in tables.lines() {
            let t1 = Instant::now();
            ch.query(&format!("OPTIMIZE TABLE {db}.{table} FINAL"), &[])
                .await?;
            println!(
                "  OPTIMIZE TABLE {table} FINAL: {:.0} s",
                t1.elapsed().as_secs_f64()
            );
        }
    }
    let mut quiet = 0;
    while quiet < 3 && t.elapsed().as_secs() < a.settle_secs {
        let merging = ch
            .scalar(&format!(
                "SELECT count() FROM system.merges WHERE database = '{db}'"
            ))
            .await?;
        quiet = if merging == 0.0 { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    println!(
        "settle: {:.0} s ({})",
        t.elapsed().as_secs_f64(),
        if quiet >= 3 {
            "no merges running"
        } else {
            "timed out, merges still running"
        }
    );
    Ok(())
}

#[derive(Clone, Default, Debug)]
struct Filters {
    resource: Option<u64>,
    status: Option<u16>,
    cache: Option<String>,
    ip: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Panel {
    /// Time series with this bucket (seconds).
    Series(u32),
    TopIps,
    TopResources,
}

#[derive(Clone, Debug)]
struct Query {
    panel: Panel,
    filters: Filters,
    from: u64,
    to: u64,
}

/// A table that can answer a query: its name and how its columns are spelled.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Table {
    name: &'static str,
    ts: &'static str,
    requests: &'static str,
    resource: bool,
    ip: bool,
    /// Holds per-hour `topK` summaries (migration 005, with a per-day twin `_1d`) instead of
    /// sums: answers top-10 panels only, over whole hours.
    sketch: bool,
}

const RAW: Table = Table {
    name: "http_log",
    ts: "timestamp",
    requests: "count()",
    resource: true,
    ip: true,
    sketch: false,
};
const TOTALS: Table = Table {
    name: "http_log_totals",
    ts: "ts",
    requests: "sum(requests)",
    resource: true,
    ip: true,
    sketch: false,
};
const BY_RESOURCE: Table = Table {
    name: "http_log_totals_by_resource",
    ts: "ts",
    requests: "sum(requests)",
    resource: true,
    ip: false,
    sketch: false,
};
const BY_IP: Table = Table {
    name: "http_log_totals_by_ip",
    ts: "ts",
    requests: "sum(requests)",
    resource: false,
    ip: true,
    sketch: false,
};
const BY_STATUS: Table = Table {
    name: "http_log_totals_by_status",
    ts: "ts",
    requests: "sum(requests)",
    resource: false,
    ip: false,
    sketch: false,
};

const BY_RESOURCE_1H: Table = Table {
    name: "http_log_totals_by_resource_1h",
    ..BY_RESOURCE
};
const BY_STATUS_1H: Table = Table {
    name: "http_log_totals_by_status_1h",
    ..BY_STATUS
};

/// The smallest table of migration 003 that holds every column the query needs, at hour
/// resolution when the window and the buckets are whole hours.
fn tiered(q: &Query) -> Table {
    let needs_resource = q.filters.resource.is_some() || q.panel == Panel::TopResources;
    let needs_ip = q.filters.ip.is_some() || q.panel == Panel::TopIps;
    let hourly = q.from % 3600 == 0
        && q.to % 3600 == 0
        && match q.panel {
            Panel::Series(bucket) => bucket % 3600 == 0,
            _ => true,
        };
    match (needs_resource, needs_ip, hourly) {
        (true, true, _) => TOTALS,
        (true, false, false) => BY_RESOURCE,
        (true, false, true) => BY_RESOURCE_1H,
        (false, true, _) => BY_IP,
        (false, false, false) => BY_STATUS,
        (false, false, true) => BY_STATUS_1H,
    }
}

const TOP_1H: Table = Table {
    name: "http_log_top_1h",
    ts: "ts",
    requests: "",
    resource: false,
    ip: false,
    sketch: true,
};

/// Migration 006: exact daily sums keyed by client, for the top resources of one client.
const BY_IP_RESOURCE_1D: Table = Table {
    name: "http_log_totals_by_ip_resource_1d",
    ..TOTALS
};

/// Windows up to this long are answered from `http_log` by the `top` route: its daily partitions
/// and resource-first key make a short exact top 10 cheaper than any rollup (measured, 1 h).
const TOP_RAW_MAX_SECS: u64 = 3 * 3600;

/// [`tiered`] plus migrations 005 and 006 for top-10 panels: short windows from the raw table;
/// longer whole-hour windows without a resource (top IPs) or IP (top resources) filter from the
/// summaries; the top resources of one client over whole days from its daily sums; the other
/// filter combinations stay on the exact rollups.
fn top(q: &Query) -> Table {
    let whole_hours = q.from % 3600 == 0 && q.to % 3600 == 0;
    let whole_days = q.from % 86_400 == 0 && q.to % 86_400 == 0;
    match q.panel {
        Panel::Series(_) => tiered(q),
        _ if q.to - q.from <= TOP_RAW_MAX_SECS => RAW,
        Panel::TopIps if q.filters.resource.is_none() && whole_hours => TOP_1H,
        Panel::TopResources if q.filters.ip.is_none() && whole_hours => TOP_1H,
        Panel::TopResources if whole_days => BY_IP_RESOURCE_1D,
        _ => tiered(q),
    }
}

fn route(name: &str, q: &Query) -> Table {
    match name {
        "shipped" => TOTALS,
        "tiered" => tiered(q),
        "top" => top(q),
        "raw" => RAW,
        other => panic!("unknown route {other}"),
    }
}

/// SQL and parameters; table names and bucket sizes come from this file, values only as params.
fn sql(db: &str, t: Table, q: &Query) -> (String, Vec<(String, String)>) {
    if t.sketch {
        return sketch_sql(db, t, q);
    }
    assert!(t.resource || q.filters.resource.is_none());
    assert!(t.ip || q.filters.ip.is_none());
    let mut params = vec![
        ("from".to_string(), q.from.to_string()),
        ("to".to_string(), q.to.to_string()),
    ];
    let mut wh = format!(
        "{ts} >= {{from:DateTime}} AND {ts} < {{to:DateTime}}",
        ts = t.ts
    );
    let f = &q.filters;
    if let Some(r) = f.resource {
        wh.push_str(" AND resource_id = {r:UInt64}");
        params.push(("r".into(), r.to_string()));
    }
    if let Some(s) = f.status {
        wh.push_str(" AND response_status = {s:UInt16}");
        params.push(("s".into(), s.to_string()));
    }
    if let Some(c) = &f.cache {
        wh.push_str(" AND cache_status = {c:String}");
        params.push(("c".into(), c.clone()));
    }
    if let Some(ip) = &f.ip {
        wh.push_str(" AND remote_addr = {ip:String}");
        params.push(("ip".into(), ip.clone()));
    }
    let (name, reqs) = (t.name, t.requests);
    let body = match q.panel {
        Panel::Series(bucket) => format!(
            "SELECT toStartOfInterval({ts}, INTERVAL {bucket} SECOND) AS t, {reqs} AS requests, \
             sum(bytes_sent) AS bytes, sum(request_time_milli) AS time_ms \
             FROM {db}.{name} WHERE {wh} GROUP BY t ORDER BY t",
            ts = t.ts
        ),
        Panel::TopIps => format!(
            "SELECT remote_addr, {reqs} AS requests FROM {db}.{name} WHERE {wh} \
             GROUP BY remote_addr ORDER BY requests DESC, remote_addr LIMIT 10"
        ),
        Panel::TopResources => format!(
            "SELECT resource_id, {reqs} AS requests FROM {db}.{name} WHERE {wh} \
             GROUP BY resource_id ORDER BY requests DESC, resource_id LIMIT 10"
        ),
    };
    (
        format!("{body} SETTINGS use_query_cache = 0 FORMAT TSV"),
        params,
    )
}

/// A top-10 panel from the summaries: the whole days inside the window from `_1d`, the hours at
/// its ends from `_1h` (0 and '*' stand for "any status" and "any cache status"), merged, first
/// 10 of the merged 20, ranked by the lower bound `count - error` (see sql/005_http_log_top.sql
/// for why that is the exact count of a busy item).
fn sketch_sql(db: &str, t: Table, q: &Query) -> (String, Vec<(String, String)>) {
    assert!(q.filters.resource.is_none() && q.filters.ip.is_none());
    let params = vec![
        ("from".to_string(), q.from.to_string()),
        ("to".to_string(), q.to.to_string()),
        ("s".to_string(), q.filters.status.unwrap_or(0).to_string()),
        (
            "c".to_string(),
            q.filters.cache.clone().unwrap_or_else(|| "*".into()),
        ),
    ];
    let (item, state) = match q.panel {
        Panel::TopIps => ("remote_addr", "top_ips"),
        Panel::TopResources => ("resource_id", "top_resources"),
        Panel::Series(_) => unreachable!("summaries answer top-10 panels only"),
    };
    let hourly = t.name;
    let daily = hourly.replace("_1h", "_1d");
    let filter = "response_status = {s:UInt16} AND cache_status = {c:String}";
    let sql = format!(
        "WITH {{from:DateTime}} AS f, {{to:DateTime}} AS t, \
           if(toStartOfDay(f) = f, f, toStartOfDay(f) + INTERVAL 1 DAY) AS d1, \
           greatest(toStartOfDay(t), d1) AS d2 \
         SELECT tupleElement(x, 1) AS {item}, tupleElement(x, 2) - tupleElement(x, 3) AS requests \
         FROM (SELECT arrayJoin(topKMerge(20, 15, 'counts')(s)) AS x FROM ( \
           SELECT {state} AS s FROM {db}.{daily} WHERE ts >= d1 AND ts < d2 AND {filter} \
           UNION ALL \
           SELECT {state} AS s FROM {db}.{hourly} \
           WHERE ts >= f AND ts < t AND (ts < d1 OR ts >= d2) AND {filter})) \
         ORDER BY requests DESC, {item} LIMIT 10 SETTINGS use_query_cache = 0 FORMAT TSV"
    );
    (sql, params)
}

/// How a route's answer compares with the first route's (exact) one.
#[derive(Debug, PartialEq)]
enum Agreement {
    Equal,
    /// A top-10 answer (`item<TAB>count` lines): the same items in the same order, no count
    /// higher than the exact one, the lowest `max_low` below (`max_rel` of the exact count).
    RankedAlike {
        max_low: u64,
        max_rel: f64,
    },
    Different,
}

fn compare(exact: &str, other: &str) -> Agreement {
    if exact == other {
        return Agreement::Equal;
    }
    let rows = |s: &str| -> Option<Vec<(String, u64)>> {
        s.lines()
            .map(|l| {
                let (item, count) = l.split_once('\t')?;
                Some((item.to_string(), count.parse().ok()?))
            })
            .collect()
    };
    let (Some(e), Some(o)) = (rows(exact), rows(other)) else {
        return Agreement::Different;
    };
    if e.len() != o.len() || e.iter().zip(&o).any(|(a, b)| a.0 != b.0 || b.1 > a.1) {
        return Agreement::Different;
    }
    let (mut max_low, mut max_rel) = (0, 0f64);
    for (a, b) in e.iter().zip(&o) {
        max_low = max_low.max(a.1 - b.1);
        max_rel = max_rel.max((a.1 - b.1) as f64 / a.1 as f64);
    }
    Agreement::RankedAlike { max_low, max_rel }
}

struct Window {
    label: &'static str,
    secs: u64,
    bucket: u32,
}

const WINDOWS: [Window; 4] = [
    Window {
        label: "1 h",
        secs: 3600,
        bucket: 60,
    },
    Window {
        label: "24 h",
        secs: 86_400,
        bucket: 300,
    },
    Window {
        label: "7 d",
        secs: 7 * 86_400,
        bucket: 3600,
    },
    Window {
        label: "30 d",
        secs: 30 * 86_400,
        bucket: 6 * 3600,
    },
];

fn sample_queries(a: &Args, w: &Window, rng: &mut StdRng, pool: &[AnonRecord]) -> Vec<Query> {
    let data_start = DATA_END_S - a.days * 86_400;
    let pick = |rng: &mut StdRng, mask: u8, panel: Panel| {
        let r = &pool[rng.random_range(0..pool.len())];
        let filters = Filters {
            resource: (mask & 1 != 0).then_some(r.resource_id),
            status: (mask & 2 != 0).then_some(r.response_status),
            cache: (mask & 4 != 0).then(|| r.cache_status.clone()),
            ip: (mask & 8 != 0).then(|| r.remote_addr.clone()),
        };
        // A window anywhere inside the data (the whole span for 30 d), aligned to its bucket up
        // to an hour, as a dashboard snaps its time range: minutes for 1 h and 24 h, hours for
        // 7 d and 30 d.
        // Top-10 panels snap to whole hours (the summaries of migration 005 are hourly), the top
        // resources of one client over a day or more to whole days (migration 006 is daily).
        let align = match panel {
            Panel::Series(_) => u64::from(w.bucket).min(3600),
            Panel::TopResources if filters.ip.is_some() && w.secs >= 86_400 => 86_400,
            _ => 3600,
        };
        let latest_start = DATA_END_S.saturating_sub(w.secs).max(data_start);
        let steps = (latest_start - data_start) / align;
        let from = data_start + align * rng.random_range(0..=steps);
        Query {
            panel,
            filters,
            from,
            to: from + w.secs,
        }
    };
    let mut out: Vec<Query> = (0..a.samples)
        .map(|_| {
            let mask = rng.random_range(0..16u8);
            pick(rng, mask, Panel::Series(w.bucket))
        })
        .collect();
    for i in 0..a.top_samples {
        // The top-IP panel never filters by IP, the top-resource panel never by resource.
        let mask = rng.random_range(0..8u8);
        let q = if i % 2 == 0 {
            pick(rng, mask, Panel::TopIps)
        } else {
            pick(rng, mask << 1, Panel::TopResources)
        };
        out.push(q);
    }
    out
}

struct Timing {
    window: &'static str,
    panel: &'static str,
    route: String,
    table: &'static str,
    index: usize,
    query_id: String,
    wall_ms: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(v: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Sorted wall times, server times and rows read of a selection of queries.
struct Spread {
    wall: Vec<f64>,
    server: Vec<f64>,
    rows: Vec<f64>,
}

fn spread(sel: &[&Timing], server: &HashMap<String, (f64, f64)>) -> Spread {
    let summary = |t: &Timing| server.get(&t.query_id).copied();
    Spread {
        wall: sorted(sel.iter().map(|t| t.wall_ms)),
        server: sorted(sel.iter().filter_map(|t| summary(t).map(|s| s.0))),
        rows: sorted(sel.iter().filter_map(|t| summary(t).map(|s| s.1))),
    }
}

/// Records the queries draw their resources, addresses and statuses from: the producer's model
/// under its own seed, so they hit the data as the dashboards would.
fn query_pool(seed: u64) -> Vec<AnonRecord> {
    let p = ProducerSettings {
        seed: seed + 1,
        ..ProducerSettings::default()
    };
    let mut m = TrafficModel::new(&p);
    (0..50_000).map(|k| anonymized(&mut m, 0, k)).collect()
}

async fn run_queries(ch: &Ch, a: &Args) -> anyhow::Result<()> {
    let db = &a.database;

    let mut rng = StdRng::seed_from_u64(a.seed + 1);
    let pool = query_pool(a.seed);
    let mut timings = Vec::new();
    let mut server: HashMap<String, (f64, f64)> = HashMap::new();
    let mut mismatches = 0;
    // Top-10 answers from the summaries: same items in the same order, counts a little low.
    let (mut ranked_alike, mut worst_low, mut worst_rel) = (0, 0u64, 0f64);
    let mut n = 0usize;
    // Warm-up: a few queries per route so the first measured one does not pay for opening files.
    for w in &WINDOWS {
        for q in sample_queries(a, w, &mut rng.clone(), &pool).iter().take(3) {
            for r in a.routes.iter().map(String::as_str).chain(["raw"]) {
                let (s, p) = sql(db, route(r, q), q);
                ch.query(&s, &p).await?;
            }
        }
    }
    for w in &WINDOWS {
        let queries = sample_queries(a, w, &mut rng, &pool);
        let t = Instant::now();
        for (i, q) in queries.iter().enumerate() {
            let in_raw = if matches!(q.panel, Panel::Series(_)) {
                i < a.raw_samples
            } else {
                i - a.samples < a.raw_samples
            };
            let panel = match q.panel {
                Panel::Series(_) => "series",
                Panel::TopIps => "top IPs",
                Panel::TopResources => "top resources",
            };
            let mut routes: Vec<&str> = a.routes.iter().map(String::as_str).collect();
            if in_raw {
                routes.push("raw");
            }
            let mut answers = Vec::new();
            for r in routes {
                let table = route(r, q);
                let (s, p) = sql(db, table, q);
                n += 1;
                let id = format!("q{n}");
                let t0 = Instant::now();
                let (answer, summary) = ch.query_summary(&s, &p).await?;
                if let Some(sm) = summary {
                    server.insert(id.clone(), sm);
                }
                let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
                answers.push((r, answer));
                timings.push(Timing {
                    window: w.label,
                    panel,
                    route: r.to_string(),
                    table: table.name,
                    index: i,
                    query_id: id,
                    wall_ms,
                });
            }
            for (r, ans) in &answers[1..] {
                match compare(&answers[0].1, ans) {
                    Agreement::Equal => {}
                    Agreement::RankedAlike { max_low, max_rel } => {
                        ranked_alike += 1;
                        worst_low = worst_low.max(max_low);
                        worst_rel = worst_rel.max(max_rel);
                        eprintln!(
                            "same ranking, counts up to {max_low} low ({:.1e}): {} vs {r} for {q:?}",
                            max_rel, answers[0].0
                        );
                    }
                    Agreement::Different => {
                        mismatches += 1;
                        eprintln!(
                            "MISMATCH {} vs {r} for {q:?}:\n{}\n---\n{ans}",
                            answers[0].0, answers[0].1
                        );
                    }
                }
            }
        }
        println!(
            "  window {}: {} queries in {:.0} s",
            w.label,
            queries.len(),
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "answers compared: {mismatches} mismatches (rollup vs raw and between routes); \
         {ranked_alike} top-10 answers with the same items in the same order but counts up to \
         {worst_low} low (relative {worst_rel:.1e})"
    );

    println!();
    println!("Per window, panel and route: wall time client-side (ms), server time from X-ClickHouse-Summary (ms), rows read.");
    println!();
    println!("| window | panel | route | n | p50 | p95 | p99 | max | server p50 | server p99 | rows read p50 | rows read max |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut routes: Vec<String> = a.routes.clone();
    routes.push("raw".into());
    for w in &WINDOWS {
        for panel in ["series", "top IPs", "top resources", "all"] {
            for r in &routes {
                let sel: Vec<&Timing> = timings
                    .iter()
                    .filter(|t| {
                        t.window == w.label && (panel == "all" || t.panel == panel) && t.route == *r
                    })
                    .collect();
                if sel.is_empty() {
                    continue;
                }
                let Spread {
                    wall,
                    server: srv,
                    rows,
                } = spread(&sel, &server);
                println!(
                    "| {} | {panel} | {r} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} |",
                    w.label,
                    sel.len(),
                    pct(&wall, 0.5),
                    pct(&wall, 0.95),
                    pct(&wall, 0.99),
                    wall.last().copied().unwrap_or(f64::NAN),
                    pct(&srv, 0.5),
                    pct(&srv, 0.99),
                    pct(&rows, 0.5),
                    rows.last().copied().unwrap_or(f64::NAN),
                );
            }
        }
    }
    println!();
    println!("Same queries against the raw table (the subset that ran on both), wall ms:");
    println!();
    println!("| window | route | panels | n | route p50 | raw p50 | route p99 | raw p99 | p50 ratio | p99 ratio | median per-query ratio |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for w in &WINDOWS {
        for (r, panel) in a
            .routes
            .iter()
            .flat_map(|r| ["series", "top-10 panels", "all"].map(|p| (r, p)))
        {
            let in_panel = |t: &&Timing| match panel {
                "series" => t.panel == "series",
                "top-10 panels" => t.panel != "series",
                _ => true,
            };
            let raw: HashMap<(usize, &str), f64> = timings
                .iter()
                .filter(in_panel)
                .filter(|t| t.window == w.label && t.route == "raw")
                .map(|t| ((t.index, t.panel), t.wall_ms))
                .collect();
            let pairs: Vec<(f64, f64)> = timings
                .iter()
                .filter(in_panel)
                .filter(|t| t.window == w.label && t.route == *r)
                .filter_map(|t| raw.get(&(t.index, t.panel)).map(|raw| (t.wall_ms, *raw)))
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let ours = sorted(pairs.iter().map(|p| p.0));
            let raws = sorted(pairs.iter().map(|p| p.1));
            let ratios = sorted(pairs.iter().map(|p| p.1 / p.0));
            println!(
                "| {} | {r} | {panel} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}× | {:.1}× | {:.1}× |",
                w.label,
                pairs.len(),
                pct(&ours, 0.5),
                pct(&raws, 0.5),
                pct(&ours, 0.99),
                pct(&raws, 0.99),
                pct(&raws, 0.5) / pct(&ours, 0.5),
                pct(&raws, 0.99) / pct(&ours, 0.99),
                pct(&ratios, 0.5),
            );
        }
    }
    // Top-10 panels per table that answered them: the routes mix tables by filter combination.
    println!();
    println!("Top-10 panels by the table that answered, wall ms:");
    println!();
    println!("| window | panel | route | table | n | p50 | p95 | p99 | max | rows read max |");
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|");
    for w in &WINDOWS {
        let mut keys: Vec<(&str, &str, &str)> = timings
            .iter()
            .filter(|t| t.window == w.label && t.panel != "series")
            .map(|t| (t.panel, t.route.as_str(), t.table))
            .collect();
        keys.sort();
        keys.dedup();
        for (panel, r, table) in keys {
            let sel: Vec<&Timing> = timings
                .iter()
                .filter(|t| {
                    t.window == w.label && t.panel == panel && t.route == r && t.table == table
                })
                .collect();
            let Spread { wall, rows, .. } = spread(&sel, &server);
            println!(
                "| {} | {panel} | {r} | {table} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
                w.label,
                sel.len(),
                pct(&wall, 0.5),
                pct(&wall, 0.95),
                pct(&wall, 0.99),
                wall.last().copied().unwrap_or(f64::NAN),
                rows.last().copied().unwrap_or(f64::NAN),
            );
        }
    }
    // The slowest rollup queries, to see which filter combinations hurt.
    println!();
    println!("Slowest 6 queries per rollup route:");
    let mut slow: Vec<&Timing> = timings.iter().filter(|t| t.route != "raw").collect();
    slow.sort_by(|x, y| y.wall_ms.total_cmp(&x.wall_ms));
    let mut shown: HashMap<&str, usize> = HashMap::new();
    for t in slow {
        let k = shown.entry(t.route.as_str()).or_default();
        *k += 1;
        if *k > 6 {
            continue;
        }
        let rows = server.get(&t.query_id).map_or(f64::NAN, |s| s.1);
        println!(
            "  {:.1} ms {} {} {} on {} (#{}, rows read {rows})",
            t.wall_ms, t.window, t.panel, t.route, t.table, t.index
        );
    }
    Ok(())
}

/// Candidate layouts of the raw table: (name, column definitions, ORDER BY). `shipped` repeats
/// `sql/001_http_log.sql`.
const RAW_LAYOUTS: [(&str, &str, &str); 5] = [
    (
        "shipped",
        SHIPPED_COLUMNS,
        "resource_id, response_status, cache_status, timestamp",
    ),
    (
        "codecs",
        "timestamp DateTime CODEC(DoubleDelta, ZSTD(1)), resource_id UInt64 CODEC(ZSTD(1)), \
         bytes_sent UInt64 CODEC(ZSTD(3)), request_time_milli UInt64 CODEC(T64, ZSTD(3)), \
         response_status UInt16 CODEC(ZSTD(1)), cache_status LowCardinality(String), \
         method LowCardinality(String), remote_addr String CODEC(ZSTD(3)), \
         url String CODEC(ZSTD(3)), source_partition Int32 CODEC(ZSTD(1)), \
         source_offset Int64 CODEC(Delta, ZSTD(1))",
        "resource_id, response_status, cache_status, timestamp",
    ),
    (
        "ip_in_key",
        SHIPPED_COLUMNS,
        "resource_id, response_status, cache_status, remote_addr, timestamp",
    ),
    (
        "url_in_key",
        SHIPPED_COLUMNS,
        "resource_id, url, response_status, cache_status, timestamp",
    ),
    (
        "hour_first",
        SHIPPED_COLUMNS,
        "toStartOfHour(timestamp), resource_id, response_status, cache_status, timestamp",
    ),
];

const SHIPPED_COLUMNS: &str = "timestamp DateTime CODEC(Delta, ZSTD(1)), resource_id UInt64, \
    bytes_sent UInt64 CODEC(ZSTD(1)), request_time_milli UInt64 CODEC(ZSTD(1)), \
    response_status UInt16, cache_status LowCardinality(String), method LowCardinality(String), \
    remote_addr String CODEC(ZSTD(1)), url String CODEC(ZSTD(1)), source_partition Int32, \
    source_offset Int64";

/// Copies a slice of `http_log` into each candidate layout (merged to one part per partition),
/// then prints bytes per row (total and per column) and the raw-query times of the same random
/// series queries (24 h window) on each.
async fn raw_layouts(ch: &Ch, a: &Args) -> anyhow::Result<()> {
    let db = &a.database;
    let from = DATA_END_S - a.raw_layouts_days * 86_400;
    let params = [("from".to_string(), from.to_string())];
    println!();
    println!(
        "Raw-table layouts on the last {} days of the data:",
        a.raw_layouts_days
    );
    for (name, columns, order) in RAW_LAYOUTS {
        let table = format!("{db}.raw_layout_{name}");
        ch.query(&format!("DROP TABLE IF EXISTS {table}"), &[])
            .await?;
        ch.query(
            &format!(
                "CREATE TABLE {table} ({columns}) ENGINE = MergeTree \
                 PARTITION BY toYYYYMMDD(timestamp) ORDER BY ({order})"
            ),
            &[],
        )
        .await?;
        ch.query(
            &format!(
                "INSERT INTO {table} SELECT * FROM {db}.http_log \
                 WHERE timestamp >= {{from:DateTime}}"
            ),
            &params,
        )
        .await?;
        ch.query(&format!("OPTIMIZE TABLE {table} FINAL"), &[])
            .await?;
    }
    let sizes = ch
        .query(
            &format!(
                "SELECT table, name, sum(data_compressed_bytes) FROM system.columns \
                 WHERE database = '{db}' AND table LIKE 'raw_layout_%' \
                 GROUP BY table, name FORMAT TSV"
            ),
            &[],
        )
        .await?;
    let rows = ch
        .scalar(&format!("SELECT count() FROM {db}.raw_layout_shipped"))
        .await?;
    let cols: Vec<&str> = vec![
        "timestamp",
        "resource_id",
        "bytes_sent",
        "request_time_milli",
        "response_status",
        "cache_status",
        "method",
        "remote_addr",
        "url",
        "source_partition",
        "source_offset",
    ];
    let mut per: HashMap<(String, String), f64> = HashMap::new();
    for l in sizes.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        per.insert((f[0].to_string(), f[1].to_string()), f[2].parse()?);
    }
    println!();
    print!("| layout | ORDER BY | B/row |");
    for c in &cols {
        print!(" {c} |");
    }
    println!();
    println!("|---|---|---:|{}", "---:|".repeat(cols.len()));
    for (name, _, order) in RAW_LAYOUTS {
        let t = format!("raw_layout_{name}");
        let total: f64 = cols
            .iter()
            .map(|c| per.get(&(t.clone(), c.to_string())).copied().unwrap_or(0.0))
            .sum();
        print!("| {name} | {order} | {:.2} |", total / rows);
        for c in &cols {
            let b = per.get(&(t.clone(), c.to_string())).copied().unwrap_or(0.0);
            print!(" {:.2} |", b / rows);
        }
        println!();
    }
    // The same random series and top-N queries (24 h window inside the slice) on every layout.
    let w = Window {
        label: "24 h",
        secs: 86_400,
        bucket: 300,
    };
    let sub = Args {
        days: a.raw_layouts_days,
        ..Args::parse_from(["queries", "--samples", "40", "--top-samples", "10"])
    };
    let pool: Vec<AnonRecord> = {
        let p = ProducerSettings {
            seed: a.seed + 2,
            ..ProducerSettings::default()
        };
        let mut m = TrafficModel::new(&p);
        (0..50_000).map(|k| anonymized(&mut m, 0, k)).collect()
    };
    let queries = sample_queries(&sub, &w, &mut StdRng::seed_from_u64(a.seed + 2), &pool);
    println!();
    println!("| layout | n | p50 ms | p95 ms | p99 ms | rows read p50 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, _, _) in RAW_LAYOUTS {
        let t = Table {
            name: Box::leak(format!("raw_layout_{name}").into_boxed_str()),
            ..RAW
        };
        let mut wall = Vec::new();
        let mut read = Vec::new();
        for q in &queries {
            let (s, p) = sql(db, t, q);
            let t0 = Instant::now();
            let (_, summary) = ch.query_summary(&s, &p).await?;
            wall.push(t0.elapsed().as_secs_f64() * 1000.0);
            read.push(summary.map_or(f64::NAN, |s| s.1));
        }
        let wall = sorted(wall.into_iter());
        let read = sorted(read.into_iter());
        println!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.0} |",
            wall.len(),
            pct(&wall, 0.5),
            pct(&wall, 0.95),
            pct(&wall, 0.99),
            pct(&read, 0.5)
        );
    }
    // The copies have served; left in place they would show up in every later parts report.
    for (name, _, _) in RAW_LAYOUTS {
        ch.query(&format!("DROP TABLE IF EXISTS {db}.raw_layout_{name}"), &[])
            .await?;
    }
    Ok(())
}

/// Rows a rollup keeps per raw row, as a function of n = raw rows per bucket. The traffic model is
/// stationary, so one bucket of k minutes at rate r holds the same combinations as one minute at
/// rate k*r: grouping the loaded data by longer intervals stands in for higher rates, and keeping
/// every m-th record (by offset) for lower ones. Three days of data keep each query short.
async fn cardinality(ch: &Ch, a: &Args) -> anyhow::Result<()> {
    let db = &a.database;
    let days = 3u64.min(a.days);
    let from = DATA_END_S - days * 86_400;
    let rate = a.rows as f64 / (a.days * 86_400) as f64;
    let dims = [
        (
            "resource, status, cache, ip",
            "resource_id, response_status, cache_status, remote_addr",
        ),
        (
            "ip, status, cache",
            "remote_addr, response_status, cache_status",
        ),
        (
            "resource, status, cache",
            "resource_id, response_status, cache_status",
        ),
        ("status, cache", "response_status, cache_status"),
    ];
    // (keep every m-th record, bucket seconds)
    let cases: [(u64, u64); 8] = [
        (100, 60),
        (10, 60),
        (1, 60),
        (1, 600),
        (1, 3600),
        (1, 6 * 3600),
        (1, 86_400),
        (1, 3 * 86_400),
    ];
    println!();
    println!("Rollup rows per raw row by raw rows per bucket (n), from {days} days of the data at {rate:.2} records/s:");
    println!();
    print!("| n (raw rows per bucket) |");
    for (label, _) in &dims {
        print!(" {label} |");
    }
    println!();
    println!("|---:|---:|---:|---:|---:|");
    for (m, bucket) in cases {
        let n = rate * bucket as f64 / m as f64;
        print!("| {n:.0} |");
        for (_, cols) in &dims {
            let q = format!(
                "SELECT count() / sum(c) FROM (SELECT count() AS c FROM {db}.http_log \
                 WHERE timestamp >= {{from:DateTime}} AND source_offset % {m} = 0 \
                 GROUP BY toStartOfInterval(timestamp, INTERVAL {bucket} SECOND), {cols})"
            );
            let v: f64 = ch
                .query(&q, &[("from".into(), from.to_string())])
                .await?
                .trim()
                .parse()?;
            print!(" {v:.4} |");
        }
        println!();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    edgelog::clickhouse::install_crypto_provider();
    let ch = Ch {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(7200))
            .build()?,
        url: a.url.clone(),
    };
    println!(
        "queries bench: rows {}, days {}, database {}, routes {:?}",
        a.rows, a.days, a.database, a.routes
    );
    if a.drop {
        ch.query(&format!("DROP DATABASE IF EXISTS {}", a.database), &[])
            .await?;
    }
    let mut settings = Settings::default();
    settings.clickhouse.admin_url = a.url.clone();
    settings.clickhouse.database = a.database.clone();
    settings.clickhouse.raw_ttl_days = 0;
    settings.clickhouse.totals_ttl_days = 0;
    let applied = edgelog::setup::apply_schema(&settings).await?;
    println!("schema: migrations applied now {applied:?}");

    let have = ch
        .scalar(&format!("SELECT count() FROM {}.http_log", a.database))
        .await? as u64;
    if have >= a.rows && a.reuse {
        println!("load: skipped, http_log already holds {have} rows (--reuse)");
    } else {
        anyhow::ensure!(
            have == 0,
            "http_log holds {have} rows; rerun with --reuse (if ≥ --rows) or --drop"
        );
        load(&ch, &a).await?;
    }
    backfill(&ch, &a, &settings).await?;
    if a.check_dedup {
        check_dedup(&ch, &a).await?;
    }
    settle(&ch, &a).await?;
    let raw_rows = ch
        .scalar(&format!("SELECT count() FROM {}.http_log", a.database))
        .await?;
    parts_report(&ch, &a.database, raw_rows).await?;
    if a.cardinality {
        cardinality(&ch, &a).await?;
    }
    if a.raw_layouts_days > 0 {
        raw_layouts(&ch, &a).await?;
    }
    if a.uniques {
        uniques_queries(&ch, &a).await?;
    } else if !a.no_queries {
        run_queries(&ch, &a).await?;
    }
    Ok(())
}

/// How many resources the top-10 panel merges states of: the busiest by requests over the days
/// the range touches (docker/grafana, "Top 10 resources by unique clients").
const TOP_CANDIDATES: u32 = 100;

/// The traffic dashboard's top-10 query itself, its macros filled as Grafana's ClickHouse data
/// source fills them (no filter), over `db`.
fn dashboard_top_sql(db: &str, from: u64, to: u64) -> String {
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(
        "../docker/grafana/dashboards/edgelog-traffic.json"
    ))
    .expect("the dashboard is JSON");
    let panel = dashboard["panels"]
        .as_array()
        .and_then(|p| {
            p.iter()
                .find(|p| p["title"] == "Top 10 resources by unique clients")
        })
        .expect("the traffic dashboard has a top-10 panel");
    panel["targets"][0]["rawSql"]
        .as_str()
        .expect("a raw SQL query")
        .replace("edgelog.", &format!("{db}."))
        .replace("$__fromTime", &format!("toDateTime({from})"))
        .replace("$__toTime", &format!("toDateTime({to})"))
        .replace(
            "$__timeFilter(ts)",
            &format!("ts >= toDateTime({from}) AND ts <= toDateTime({to})"),
        )
        .replace("${resource:sqlstring}", "''")
        .replace("${ip:sqlstring}", "''")
        .replace("${status:sqlstring}", "'__all__'")
        .replace("${cache:sqlstring}", "'__all__'")
        + "\nFORMAT TSV"
}

/// Fills migration 012's table as its refresh would have at DATA_END (the view's own SELECT with
/// `now()` as DATA_END), with the view stopped so that no refresh replaces it meanwhile: the
/// dashboard then reads it for the 7- and 30-day windows ending at DATA_END.
async fn compute_ahead_at_data_end(ch: &Ch, db: &str) -> anyhow::Result<()> {
    let view = "http_log_uniques_top_trailing_mv";
    ch.query(&format!("SYSTEM STOP VIEW {db}.{view}"), &[])
        .await?;
    ch.query(&format!("SYSTEM CANCEL VIEW {db}.{view}"), &[])
        .await?;
    let select = ch
        .query(
            "SELECT as_select FROM system.tables WHERE database = {db:String} \
             AND name = {view:String} FORMAT TSVRaw",
            &[("db".into(), db.into()), ("view".into(), view.into())],
        )
        .await?;
    anyhow::ensure!(
        select.matches("now()").count() == 1,
        "{view}'s SELECT should read the clock once: {select}"
    );
    let select = select
        .trim()
        .replace("now()", &format!("toDateTime({DATA_END_S})"));
    ch.query(
        &format!("TRUNCATE TABLE {db}.http_log_uniques_top_trailing"),
        &[],
    )
    .await?;
    let t = Instant::now();
    let response = ch
        .http
        .post(&ch.url)
        .query(&[("wait_end_of_query", "1")])
        .body(format!(
            "INSERT INTO {db}.http_log_uniques_top_trailing {select}"
        ))
        .send()
        .await?;
    let memory = response
        .headers()
        .get("X-ClickHouse-Summary")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| summary_field(s, "memory_usage"));
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "HTTP {status}: {}",
        response.text().await?
    );
    println!(
        "012: computed ahead as of DATA_END in {:.1} s, peak memory {} (the refresh's own SELECT)",
        t.elapsed().as_secs_f64(),
        memory.map_or("unknown".to_string(), |b| format!("{:.0} MB", b / 1e6))
    );
    Ok(())
}

/// A unique-client panel as the traffic dashboard asks it (docker/grafana, sql/009-012), with
/// the exact answer from the raw table for comparison. `from`/`to`: epoch seconds. `baseline`:
/// as the dashboard asked it before (the series: before migration 011; the top 10: before 012).
fn uniques_sql(
    db: &str,
    kind: &str,
    from: u64,
    to: u64,
    q: &AnonRecord,
    baseline: bool,
) -> (String, String) {
    let window = format!("ts >= toDateTime({from}) AND ts < toDateTime({to})");
    let raw_window = format!("timestamp >= toDateTime({from}) AND timestamp < toDateTime({to})");
    // The series' bucket: the dashboard asks for ~30 points (hours over a day, 6 hours over a
    // week, days over a month); before 011, ~200 (minutes over a day, hours from 7 days on).
    let span = to - from;
    let bucket_s: u64 = match (baseline, span) {
        (false, s) if s >= 30 * 86_400 => 86_400,
        (false, s) if s >= 7 * 86_400 => 21_600,
        (false, _) => 3_600,
        (true, s) if s >= 7 * 86_400 => 3_600,
        (true, _) => 60,
    };
    let bucket = format!("toStartOfInterval(ts, INTERVAL {bucket_s} second)");
    let raw_bucket = format!("toStartOfInterval(timestamp, INTERVAL {bucket_s} second)");
    // Distinct clients per bucket of the raw rows matching `filter`.
    let exact = |filter: &str| {
        format!(
            "SELECT {raw_bucket} AS ts, uniqExact(remote_addr) FROM {db}.http_log \
             WHERE {raw_window}{filter} GROUP BY ts ORDER BY ts FORMAT TSV"
        )
    };
    // The table of a bucket (009's and 011's suffixes) and the -Merge of its state, as `verify`
    // knows it.
    let table = |name: String| -> (String, &str) {
        let merge = uniques::find(&name)
            .unwrap_or_else(|| panic!("{name} is not a unique-client rollup"))
            .merge;
        (name, merge)
    };
    let suffixed = |base: &str| {
        table(match bucket_s {
            60 => base.to_string(),
            3_600 => format!("{base}_1h"),
            21_600 => format!("{base}_6h"),
            _ => format!("{base}_1d"),
        })
    };
    let (status, cache, resource) = (q.response_status, &q.cache_status, q.resource_id);
    match kind {
        "series" => {
            let (t, merge) = suffixed("http_log_uniques");
            (
                format!(
                    "SELECT {bucket} AS b, {merge}(clients) FROM {db}.{t} WHERE {window} \
                     GROUP BY b ORDER BY b FORMAT TSV"
                ),
                exact(""),
            )
        }
        "status series" => {
            let (t, merge) = suffixed("http_log_uniques_by_status");
            let filter = format!(" AND response_status = {status} AND cache_status = '{cache}'");
            (
                format!(
                    "SELECT {bucket} AS b, {merge}(clients) FROM {db}.{t} WHERE {window}{filter} \
                     GROUP BY b ORDER BY b FORMAT TSV"
                ),
                exact(&filter),
            )
        }
        "resource series" => {
            // Keyed by resource: minutes (009), hours (010, also for 6-hour buckets) or days
            // (011).
            let (t, merge) = table(
                match bucket_s {
                    60 => "http_log_uniques_by_resource",
                    86_400 => "http_log_uniques_by_resource_combined_1d",
                    _ => "http_log_uniques_by_resource_1h",
                }
                .to_string(),
            );
            let filter = format!(" AND resource_id = {resource}");
            (
                format!(
                    "SELECT {bucket} AS b, {merge}(clients) FROM {db}.{t} \
                     WHERE {window}{filter} GROUP BY b ORDER BY b FORMAT TSV"
                ),
                exact(&filter),
            )
        }
        _ => {
            // Whole UTC days from a day on (the start rounds down to midnight), minutes below.
            let daily = to - from >= 86_400;
            let from = if daily { from / 86_400 * 86_400 } else { from };
            (
                if baseline {
                    let t = if daily {
                        "http_log_uniques_by_resource_keyed_1d"
                    } else {
                        "http_log_uniques_by_resource"
                    };
                    // Before 012: the states of the busiest resources by requests on the days
                    // the range touches, read by key (010).
                    format!(
                        "SELECT resource_id, uniqMerge(clients) AS c FROM {db}.{t} \
                         WHERE ts >= toDateTime({from}) AND ts < toDateTime({to}) \
                         AND resource_id IN (SELECT resource_id \
                         FROM {db}.http_log_uniques_by_resource_1d \
                         WHERE ts >= toStartOfDay(toDateTime({from})) AND ts < toDateTime({to}) \
                         GROUP BY resource_id ORDER BY sum(requests) DESC, resource_id \
                         LIMIT {TOP_CANDIDATES}) \
                         GROUP BY resource_id ORDER BY c DESC, resource_id LIMIT 10 FORMAT TSV"
                    )
                } else {
                    dashboard_top_sql(db, from, to)
                },
                format!(
                    "SELECT resource_id, uniqExact(remote_addr) AS c FROM {db}.http_log \
                     WHERE timestamp >= toDateTime({from}) AND timestamp < toDateTime({to}) \
                     GROUP BY resource_id ORDER BY c DESC, resource_id LIMIT 10 FORMAT TSV"
                ),
            )
        }
    }
}

/// Largest relative difference of the second column between two `key \t count` answers, and
/// whether they list the same keys in the same order.
fn uniques_error(rollup: &str, exact: &str) -> (f64, bool) {
    let parse = |t: &str| -> Vec<(String, f64)> {
        t.lines()
            .filter_map(|l| {
                // The key and the count; the dashboard's top 10 has the requests after them.
                let mut f = l.split('\t');
                let (k, v) = (f.next()?, f.next()?);
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    };
    let (r, e) = (parse(rollup), parse(exact));
    let same_keys = r.iter().map(|x| &x.0).eq(e.iter().map(|x| &x.0));
    let exact_of: HashMap<&str, f64> = e.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let worst = r
        .iter()
        .filter_map(|(k, v)| exact_of.get(k.as_str()).map(|x| (v - x).abs() / x.max(1.0)))
        .fold(0.0, f64::max);
    (worst, same_keys)
}

async fn uniques_queries(ch: &Ch, a: &Args) -> anyhow::Result<()> {
    let db = &a.database;
    compute_ahead_at_data_end(ch, db).await?;
    let mut rng = StdRng::seed_from_u64(a.seed + 1);
    let pool = query_pool(a.seed);
    let kinds = [
        "series",
        "status series",
        "resource series",
        "top resources",
    ];
    println!(
        "unique-client panels (ms; server time from X-ClickHouse-Summary; error against uniqExact; \
         route: now as shipped, before as the dashboard asked before migration 011, the top 10 \
         before 012):"
    );
    println!(
        "{:>6} {:>16} {:>6} {:>5} {:>8} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "window", "panel", "route", "n", "p50", "p99", "max", "srv p99", "rows p99", "worst err"
    );
    for (label, secs) in [
        ("24 h", 86_400u64),
        ("7 d", 7 * 86_400),
        ("30 d", 30 * 86_400),
    ] {
        let to = DATA_END_S;
        let from = to - secs;
        for kind in kinds {
            // The baseline asks about the same resources and status/cache pairs.
            let picks: Vec<&AnonRecord> = (0..a.samples.max(a.baseline_samples) + 1)
                .map(|_| &pool[rng.random_range(0..pool.len())])
                .collect();
            for (route, baseline, samples) in [
                ("now", false, a.samples),
                ("before", true, a.baseline_samples),
            ] {
                if samples == 0 {
                    continue;
                }
                let (mut wall, mut srv, mut rows) = (Vec::new(), Vec::new(), Vec::new());
                let (mut worst, mut reordered) = (0f64, 0usize);
                for (i, q) in picks.iter().take(samples + 1).enumerate() {
                    let (sql, exact) = uniques_sql(db, kind, from, to, q, baseline);
                    let t = Instant::now();
                    let (answer, summary) = ch.query_summary(&sql, &[]).await?;
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    if i == 0 {
                        continue; // warm-up
                    }
                    wall.push(ms);
                    if let Some((s, r)) = summary {
                        srv.push(s);
                        rows.push(r);
                    }
                    if i <= a.raw_samples {
                        let (e, same) = uniques_error(&answer, &ch.query(&exact, &[]).await?);
                        worst = worst.max(e);
                        reordered += usize::from(!same);
                    }
                }
                let (wall, srv, rows) = (
                    sorted(wall.into_iter()),
                    sorted(srv.into_iter()),
                    sorted(rows.into_iter()),
                );
                println!(
                    "{label:>6} {kind:>16} {route:>6} {:>5} {:>8.1} {:>8.1} {:>8.1} {:>10.1} {:>10.0} \
                     {:>11.3}%{}",
                    wall.len(),
                    pct(&wall, 0.5),
                    pct(&wall, 0.99),
                    pct(&wall, 1.0),
                    pct(&srv, 0.99),
                    pct(&rows, 0.99),
                    worst * 100.0,
                    if reordered > 0 {
                        format!(" ({reordered} answers ordered or keyed differently)")
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    Ok(())
}
