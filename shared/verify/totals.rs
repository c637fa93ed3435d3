//! The rollups against a recount of the raw table, one UTC day at a time: ClickHouse groups one
//! day's rows per query, never the whole table. Closed days found equal are recorded in
//! `verify_days_audited` with the raw count and bytes seen; an incremental run checks a recorded
//! day again only when those changed (one cheap count per day).

use std::collections::BTreeMap;

use anyhow::{bail, Context};

use super::uniques::UniquesCheck;
use crate::clickhouse::ClickHouseClient;

/// Memory one audit query may use in ClickHouse. A bucket or a day that needs more fails with
/// ClickHouse's memory error instead of starving the server; lower `--bucket-offsets` then.
pub const QUERY_MEMORY_LIMIT: &str = "SETTINGS max_memory_usage = 2000000000";

/// Aggregations larger than this spill to disk (the per-day recount of the rollups).
const QUERY_SPILL: &str = "max_bytes_before_external_group_by = 1000000000";

/// The rollups against a recount from the raw table, over the days checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TotalsCheck {
    pub raw_rows: u64,
    pub totals_requests: u64,
    pub raw_bytes: u64,
    pub totals_bytes: u64,
    /// Groups (minute, resource, status, cache status, address) whose sums differ.
    pub groups_differing: u64,
    /// Every other rollup (`http_log_totals_*`, `http_log_top_*`) whose request or byte sum differs
    /// from the raw table's on a day: `(table, day, requests, bytes, raw rows, raw bytes)`.
    pub rollups_differing: Vec<RollupDiffering>,
    /// Days compared now, and days skipped because they were recorded equal and are unchanged.
    pub days_checked: u64,
    pub days_skipped: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupDiffering {
    pub table: String,
    pub day: String,
    pub requests: u64,
    pub bytes: u64,
    pub raw_rows: u64,
    pub raw_bytes: u64,
}

impl TotalsCheck {
    pub fn is_clean(&self) -> bool {
        self.groups_differing == 0
            && self.rollups_differing.is_empty()
            && self.raw_rows == self.totals_requests
            && self.raw_bytes == self.totals_bytes
    }
}

/// Which days to check: every day with raw rows, unless `incremental` and recorded with the same
/// count and bytes. Today is never skipped (it is still being written).
pub fn days_to_check(
    present: &BTreeMap<String, (u64, u64)>,
    recorded: &BTreeMap<String, (u64, u64)>,
    today: &str,
    incremental: bool,
) -> Vec<String> {
    present
        .iter()
        .filter(|(day, seen)| {
            !incremental || day.as_str() >= today || recorded.get(day.as_str()) != Some(seen)
        })
        .map(|(day, _)| day.clone())
        .collect()
}

/// Where rollups and the raw table are compared from: two days inside the shorter TTL (`ttl_days`).
fn compared_since(ttl_days: Option<u32>) -> String {
    match ttl_days {
        Some(d) => format!("toStartOfDay(now() - INTERVAL {d} DAY) + INTERVAL 2 DAY"),
        None => "toDateTime(0)".to_string(),
    }
}

/// `ttl_days`: the shorter TTL of the raw and totals tables. The tables expire rows at different
/// ages, and row by row, so sums are compared only from two days inside the shorter TTL on.
/// The unique-client rollups are compared on the same days into `uniques`: a day is recorded as
/// audited only when both agree.
pub async fn check_totals(
    client: &ClickHouseClient,
    db: &str,
    ttl_days: Option<u32>,
    incremental: bool,
    uniques: &mut UniquesCheck,
) -> anyhow::Result<TotalsCheck> {
    let since = compared_since(ttl_days);
    // One group per day: bounded whatever the table's size.
    let present = day_sums(
        client,
        &format!(
            "SELECT toDate(timestamp) AS d, count(), sum(bytes_sent) FROM {db}.http_log \
             WHERE timestamp >= {since} GROUP BY d ORDER BY d FORMAT TSV"
        ),
    )
    .await?;
    let recorded = day_sums(
        client,
        &format!(
            "SELECT day, raw_rows, raw_bytes FROM {db}.verify_days_audited FINAL ORDER BY day \
             FORMAT TSV"
        ),
    )
    .await
    .context("reading verify_days_audited (run `edgelog setup` to create it)")?;
    let today = client
        .query("SELECT today() FORMAT TSV", &[])
        .await?
        .trim()
        .to_string();
    let rollups = rollup_tables(client, db).await?;

    let mut check = TotalsCheck::default();
    let todo = days_to_check(&present, &recorded, &today, incremental);
    for (day, (rows, bytes)) in &present {
        if !todo.contains(day) {
            check.days_skipped += 1;
            check.raw_rows += rows;
            check.totals_requests += rows;
            check.raw_bytes += bytes;
            check.totals_bytes += bytes;
        }
    }
    for day in &todo {
        let before = check.clone();
        check_day(client, db, day, &rollups, &mut check).await?;
        check.days_checked += 1;
        let start = format!("toDateTime('{day}')");
        let day_uniques =
            super::uniques::check(client, db, &start, &format!("{start} + INTERVAL 1 DAY")).await?;
        let uniques_clean = day_uniques.is_clean();
        uniques.add(day_uniques);
        let day_clean = check.groups_differing == before.groups_differing
            && check.rollups_differing.len() == before.rollups_differing.len()
            && check.raw_rows - before.raw_rows == check.totals_requests - before.totals_requests
            && check.raw_bytes - before.raw_bytes == check.totals_bytes - before.totals_bytes;
        if day_clean && uniques_clean && day.as_str() < today.as_str() {
            let (rows, bytes) = present[day];
            client
                .query(
                    &format!(
                        "INSERT INTO {db}.verify_days_audited (day, raw_rows, raw_bytes) \
                         VALUES ({{d:Date}}, {{r:UInt64}}, {{b:UInt64}})"
                    ),
                    &[
                        ("d", day),
                        ("r", &rows.to_string()),
                        ("b", &bytes.to_string()),
                    ],
                )
                .await?;
        }
    }
    Ok(check)
}

async fn day_sums(
    client: &ClickHouseClient,
    sql: &str,
) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let text = client.query(sql, &[]).await?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [day, rows, bytes] = fields[..] else {
            bail!("unexpected line from ClickHouse: {line:?}");
        };
        out.insert(day.to_string(), (rows.parse()?, bytes.parse()?));
    }
    Ok(out)
}

/// Every rollup table but `http_log_totals` (which is compared group by group).
async fn rollup_tables(client: &ClickHouseClient, db: &str) -> anyhow::Result<Vec<String>> {
    let tables = client
        .query(
            "SELECT name FROM system.tables WHERE database = {db:String} \
             AND (startsWith(name, 'http_log_totals_') OR startsWith(name, 'http_log_top_')) \
             AND (engine LIKE '%MergeTree' OR engine = 'Distributed') \
             AND NOT endsWith(name, '_local') \
             ORDER BY name FORMAT TSV",
            &[("db", db)],
        )
        .await?;
    // In cluster mode every rollup is a Distributed table over its shards' `_local` tables: the
    // Distributed one holds the whole cluster's rows, a local one only its shard's.
    // Names come from system.tables; only plain identifiers are spliced into SQL.
    Ok(tables
        .lines()
        .filter(|t| t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
        .collect())
}

/// Adds one day's comparison to `check`. Every rollup's buckets (a minute to a day) lie inside
/// one UTC day, so a day of raw rows and a day of rollup rows hold the same requests.
async fn check_day(
    client: &ClickHouseClient,
    db: &str,
    day: &str,
    rollups: &[String],
    check: &mut TotalsCheck,
) -> anyhow::Result<()> {
    let day_param = [("day", day)];
    let (raw_where, totals_where) = (
        "WHERE timestamp >= toDateTime({day:Date}) AND timestamp < toDateTime({day:Date} + 1)",
        "WHERE ts >= toDateTime({day:Date}) AND ts < toDateTime({day:Date} + 1)",
    );
    // The recount groups the raw table exactly as the materialized view does. Both sides go into
    // one GROUP BY, the raw side negated: a group whose sums do not cancel differs, including a
    // group present on one side only. One aggregation (no join) spills to disk past
    // QUERY_SPILL_BYTES, so a day of any size fits the memory limit.
    let keys = "ts, resource_id, response_status, cache_status, remote_addr";
    let sql = format!(
        "SELECT \
           (SELECT count() FROM {db}.http_log {raw_where}), \
           (SELECT sum(requests) FROM {db}.http_log_totals {totals_where}), \
           (SELECT sum(bytes_sent) FROM {db}.http_log {raw_where}), \
           (SELECT sum(bytes_sent) FROM {db}.http_log_totals {totals_where}), \
           (SELECT count() FROM ( \
              SELECT {keys}, sum(r) AS r, sum(b) AS b, sum(m) AS m FROM ( \
                SELECT {keys}, toInt64(requests) AS r, toInt64(bytes_sent) AS b, \
                       toInt64(request_time_milli) AS m \
                FROM {db}.http_log_totals {totals_where} \
                UNION ALL \
                SELECT toStartOfMinute(timestamp) AS ts, resource_id, response_status, \
                       cache_status, remote_addr, -1 AS r, -toInt64(bytes_sent) AS b, \
                       -toInt64(request_time_milli) AS m \
                FROM {db}.http_log {raw_where}) \
              GROUP BY {keys} HAVING r != 0 OR b != 0 OR m != 0)) \
         {QUERY_MEMORY_LIMIT}, {QUERY_SPILL} FORMAT TSV"
    );
    let text = client.query(&sql, &day_param).await?;
    let fields: Vec<u64> = text
        .trim()
        .split('\t')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected totals check answer {text:?}"))?;
    let [raw_rows, totals_requests, raw_bytes, totals_bytes, groups_differing] = fields[..] else {
        bail!("unexpected totals check answer {text:?}");
    };
    check.raw_rows += raw_rows;
    check.totals_requests += totals_requests;
    check.raw_bytes += raw_bytes;
    check.totals_bytes += totals_bytes;
    check.groups_differing += groups_differing;
    for table in rollups {
        // The top-N tables hold every filter combination; 0 and '*' rows are the "any" ones.
        let any = if table.starts_with("http_log_top_") {
            " AND response_status = 0 AND cache_status = '*'"
        } else {
            ""
        };
        let text = client
            .query(
                &format!(
                    "SELECT sum(requests), sum(bytes_sent) FROM {db}.{table} {totals_where}{any} \
                     FORMAT TSV"
                ),
                &day_param,
            )
            .await?;
        let sums: Vec<u64> = text
            .trim()
            .split('\t')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("unexpected sums from {table}: {text:?}"))?;
        if sums != [raw_rows, raw_bytes] {
            check.rollups_differing.push(RollupDiffering {
                table: table.clone(),
                day: day.to_string(),
                requests: sums[0],
                bytes: sums[1],
                raw_rows,
                raw_bytes,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incremental_run_skips_closed_days_recorded_unchanged() {
        let present: BTreeMap<String, (u64, u64)> = [
            ("2026-01-01".to_string(), (10, 100)),
            ("2026-01-02".to_string(), (20, 200)),
            ("2026-01-03".to_string(), (30, 300)),
            ("2026-01-04".to_string(), (5, 50)),
        ]
        .into();
        let recorded: BTreeMap<String, (u64, u64)> = [
            ("2026-01-01".to_string(), (10, 100)),
            // A late duplicate since: the count changed.
            ("2026-01-02".to_string(), (19, 190)),
            // Today's rows were recorded by a mistake or a clock jump: today is always checked.
            ("2026-01-04".to_string(), (5, 50)),
        ]
        .into();
        assert_eq!(
            days_to_check(&present, &recorded, "2026-01-04", true),
            vec!["2026-01-02", "2026-01-03", "2026-01-04"]
        );
        assert_eq!(
            days_to_check(&present, &recorded, "2026-01-04", false).len(),
            4
        );
    }
}
