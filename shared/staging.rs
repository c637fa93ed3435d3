//! Rebuilding tables per partition in staging copies and swapping them in (`REPLACE PARTITION`,
//! atomic per partition): the machinery `edgelog replay` and `edgelog backfill` share, with the
//! day ranges both take and the guard that no loader is running.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::clickhouse::ClickHouseClient;
use crate::config::{ClickHouseSettings, KafkaOptions, Settings};
use crate::kafka::client_config;

/// Suffix of the staging copy of a table.
pub(crate) const STAGING: &str = "_replay";

/// A half-open range of UTC days, `[first, last]` as `YYYY-MM-DD`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Days {
    pub first: String,
    pub last: String,
}

impl Days {
    pub fn parse(first: &str, last: &str) -> anyhow::Result<Days> {
        for d in [first, last] {
            let ok = d.len() == 10
                && d.chars().enumerate().all(|(i, c)| {
                    if i == 4 || i == 7 {
                        c == '-'
                    } else {
                        c.is_ascii_digit()
                    }
                });
            if !ok {
                bail!("{d:?} is not a day (YYYY-MM-DD)");
            }
        }
        if first > last {
            bail!("the first day {first} is after the last day {last}");
        }
        Ok(Days {
            first: first.to_string(),
            last: last.to_string(),
        })
    }

    /// A ClickHouse condition on `column` (a DateTime) selecting these days.
    pub(crate) fn condition(&self, column: &str) -> String {
        format!(
            "{column} >= toDateTime('{} 00:00:00', 'UTC') AND {column} < toDateTime('{} 00:00:00', 'UTC') + INTERVAL 1 DAY",
            self.first, self.last
        )
    }

    /// Whether the record's timestamp (epoch milliseconds) falls in these days.
    pub(crate) fn contains_epoch_ms(&self, ms: u64) -> bool {
        let day = day_of_epoch_ms(ms);
        day.as_str() >= self.first.as_str() && day.as_str() <= self.last.as_str()
    }
}

/// `YYYY-MM-DD` (UTC) of an epoch time in milliseconds (civil-from-days, H. Hinnant).
pub fn day_of_epoch_ms(ms: u64) -> String {
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

pub(crate) fn refuse_if_loader_running(s: &Settings) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client_config(&s.kafka, &KafkaOptions::default(), &[])
        .set("group.id", format!("{}-replay", s.loader.group_id))
        .create()?;
    let groups = consumer
        .fetch_group_list(Some(&s.loader.group_id), Duration::from_secs(15))
        .context("describing the loader's consumer group")?;
    let members: usize = groups.groups().iter().map(|g| g.members().len()).sum();
    if members > 0 {
        bail!(
            "the loader group {} has {members} running member(s): stop the loaders first (they \
             resume where they left off after the replay)",
            s.loader.group_id
        );
    }
    Ok(())
}

/// `select` reading `to` wherever it read the table `from`. ClickHouse prints a view's SELECT its
/// own way, so the name can be followed by a space, a `)` or the end; a longer name that starts
/// with `from` (`http_log_totals`) is a different table and stays.
pub(crate) fn retarget(select: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(select.len());
    let mut rest = select;
    while let Some(i) = rest.find(from) {
        let after = &rest[i + from.len()..];
        let whole = !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        out.push_str(&rest[..i]);
        out.push_str(if whole { to } else { from });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Small blocks for INSERTs that carry rollup rows: a `topK` summary (migration 005) takes ~0.2 MB
/// in memory against ~1 KB on disk, and squashing a month of them into one block exceeded the
/// server's memory limit (measured: 36,000 rows of `http_log_top_1h`).
const SMALL_BLOCKS: &str =
    "SETTINGS max_block_size = 1024, min_insert_block_size_rows = 1024, min_insert_block_size_bytes = 0";

/// Staging copies and partition swaps work on one server's MergeTree tables; in cluster mode
/// `http_log` and the rollups are Distributed tables over each shard's locals, which this does not
/// rebuild (docs/LIMITATIONS.md, "Cluster mode"). Refuses before anything is touched.
pub fn refuse_in_cluster_mode(ch: &ClickHouseSettings, command: &str) -> anyhow::Result<()> {
    if let Some(cluster) = &ch.cluster {
        bail!(
            "`edgelog {command}` does not run in cluster mode (clickhouse.cluster = {cluster:?}): \
             it rebuilds tables by swapping partitions on one server, and the tables here are \
             sharded; see docs/LIMITATIONS.md"
        );
    }
    Ok(())
}

/// Each rollup table fed from `http_log` by a materialized view, with that view's SELECT.
pub async fn rollups(ch: &ClickHouseClient, db: &str) -> anyhow::Result<Vec<(String, String)>> {
    let text = ch
        .query(
            "SELECT name, replaceAll(as_select, '\\n', ' ') FROM system.tables \
             WHERE database = {db:String} AND engine = 'MaterializedView' ORDER BY name \
             FORMAT TSVRaw",
            &[("db", db)],
        )
        .await?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((view, select)) = line.split_once('\t') else {
            continue;
        };
        // Views are named `<table>_mv` (sql/); the target is the table.
        let Some(table) = view.strip_suffix("_mv") else {
            bail!("materialized view {view} does not follow the `<table>_mv` naming");
        };
        if !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("unexpected table name {table:?}");
        }
        out.push((table.to_string(), format!("{select} ")));
    }
    Ok(out)
}

/// Rebuilds the partitions of `table` that `days` touch in a staging copy and swaps them in.
/// `selects`: where the days' rows come from, inserted one after the other (`None`: the raw
/// staging table itself).
pub(crate) async fn rebuild_table(
    ch: &ClickHouseClient,
    db: &str,
    table: &str,
    time_column: &str,
    days: &Days,
    selects: Option<&[String]>,
) -> anyhow::Result<Vec<String>> {
    let staging = format!("{table}{STAGING}");
    let in_days = days.condition(time_column);
    let touched =
        |t: &str| format!("SELECT DISTINCT _partition_id FROM {db}.{t} WHERE {in_days} FORMAT TSV");
    if let Some(selects) = selects {
        ch.query(&format!("DROP TABLE IF EXISTS {db}.{staging}"), &[])
            .await?;
        ch.query(&format!("CREATE TABLE {db}.{staging} AS {db}.{table}"), &[])
            .await?;
        for select in selects {
            ch.query(
                &format!("INSERT INTO {db}.{staging} {select} {SMALL_BLOCKS}"),
                &[],
            )
            .await?;
        }
    }
    // Partitions to replace: those the days touch in the live table or in the new rows.
    let mut partitions: Vec<String> = ch
        .query(&touched(table), &[])
        .await?
        .lines()
        .map(String::from)
        .collect();
    partitions.extend(
        ch.query(&touched(&staging), &[])
            .await?
            .lines()
            .map(String::from),
    );
    partitions.sort();
    partitions.dedup();
    // The rest of those partitions is carried over unchanged.
    for id in &partitions {
        ch.query(
            &format!(
                "INSERT INTO {db}.{staging} SELECT * FROM {db}.{table} \
                 WHERE _partition_id = {{id:String}} AND NOT ({in_days}) {SMALL_BLOCKS}"
            ),
            &[("id", id)],
        )
        .await?;
    }
    for id in &partitions {
        ch.query(
            &format!(
                "ALTER TABLE {db}.{table} REPLACE PARTITION ID {{id:String}} FROM {db}.{staging}"
            ),
            &[("id", id)],
        )
        .await
        .with_context(|| format!("replacing partition {id} of {table}"))?;
    }
    if selects.is_some() {
        ch.query(&format!("DROP TABLE IF EXISTS {db}.{staging}"), &[])
            .await?;
    }
    Ok(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retarget_replaces_the_whole_table_name_only() {
        let select = "SELECT x FROM (SELECT a FROM db.http_log) GROUP BY x";
        assert_eq!(
            retarget(select, "db.http_log", "db.staging"),
            "SELECT x FROM (SELECT a FROM db.staging) GROUP BY x"
        );
        assert_eq!(
            retarget(
                "SELECT 1 FROM db.http_log GROUP BY ts",
                "db.http_log",
                "db.s"
            ),
            "SELECT 1 FROM db.s GROUP BY ts"
        );
        assert_eq!(
            retarget("FROM db.http_log", "db.http_log", "db.s"),
            "FROM db.s"
        );
        assert_eq!(
            retarget("FROM db.http_log_totals", "db.http_log", "db.s"),
            "FROM db.http_log_totals"
        );
    }

    #[test]
    fn days_are_validated_and_matched() {
        assert!(Days::parse("2026-11-23", "2026-11-22").is_err());
        assert!(Days::parse("2026-1-23", "2026-11-23").is_err());
        assert!(Days::parse("2026-11-23'; DROP", "2026-11-23").is_err());
        let d = Days::parse("2026-11-22", "2026-11-23").unwrap();
        assert_eq!(day_of_epoch_ms(0), "1970-01-01");
        assert_eq!(day_of_epoch_ms(951_782_400_000), "2000-02-29");
        // 2026-11-23T12:00:00Z
        assert!(d.contains_epoch_ms(1_795_435_200_000));
        assert!(!d.contains_epoch_ms(1_795_435_200_000 + 86_400_000));
        assert!(d.condition("ts").contains("'2026-11-22 00:00:00'"));
    }
}
