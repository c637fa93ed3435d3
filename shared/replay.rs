//! `edgelog replay`: reprocess a range of days from `http_log_anon` into ClickHouse, replacing what
//! is there, without duplicates and without double-counting any rollup.
//!
//! How, and why it is safe:
//! 1. The loader must be stopped (its consumer group has no members) with no recorded batch
//!    pending: rows it inserted while the partitions are being swapped would be replaced away. Its committed offsets bound the replay,
//!    so nothing the loader has not confirmed is loaded twice when it resumes.
//! 2. The anonymized records of those days are read from the log start up to the loader's committed
//!    offsets and inserted into a fresh staging copy of `http_log`.
//! 3. Every table is rebuilt per partition in its own staging copy: the rows of the touched
//!    partitions outside the days are copied over, the days' rows come from the staging raw table
//!    (for the rollups, through their materialized view's own SELECT). Each partition is then
//!    swapped in with `REPLACE PARTITION`, which is atomic per partition.
//! 4. No dedup window is involved: the staging tables are new, and the swap replaces parts
//!    wholesale. Afterwards `edgelog verify` audits the result.
//!
//! Records older than the topic's retention are gone from Kafka; replaying days that reach back
//! that far would replace rows with nothing, so the command refuses unless every day is covered.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::anon_record::{self, AnonRecord};
use crate::body::encode_body;
use crate::clickhouse::ClickHouseClient;
use crate::config::{KafkaOptions, Settings};
use crate::kafka::{client_config, group_positions};
use crate::loader::insert::{insert_url_into, InsertClient, Outcome};

/// Rows per staging insert.
const CHUNK_ROWS: usize = 100_000;
const STAGING: &str = "_replay";

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
    fn contains_epoch_ms(&self, ms: u64) -> bool {
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

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    pub records_read: u64,
    pub rows_replayed: u64,
    /// Table -> partitions replaced.
    pub replaced: BTreeMap<String, Vec<String>>,
}

pub async fn replay(settings: &Settings, days: &Days) -> anyhow::Result<ReplaySummary> {
    let s = settings.clone();
    let positions = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        refuse_if_loader_running(&s)?;
        let positions = group_positions(
            &s.kafka,
            &s.loader.group_id,
            &s.topics.anonymized,
            Duration::from_secs(15),
        )?;
        // A recorded batch may have landed without being committed. Replaying would drop its
        // rows, and the loader's re-send would then be dropped as a duplicate: finish it first.
        if let Some(p) = positions
            .iter()
            .find(|p| crate::batch::BatchId::is_pending(&p.metadata))
        {
            bail!(
                "the loader has a recorded batch pending on partition {} ({}): run the loader \
                 until `edgelog status` shows no pending batch, stop it, then replay",
                p.partition,
                p.metadata
            );
        }
        Ok(positions)
    })
    .await??;

    let db = &settings.clickhouse.database;
    let ch = ClickHouseClient::admin(&settings.clickhouse);
    let staging_raw = format!("http_log{STAGING}");
    ch.query(&format!("DROP TABLE IF EXISTS {db}.{staging_raw}"), &[])
        .await?;
    ch.query(
        &format!("CREATE TABLE {db}.{staging_raw} AS {db}.http_log"),
        &[],
    )
    .await?;

    // The days' records, up to what the loader has confirmed.
    let truncated = positions.iter().any(|p| p.low > 0);
    let s = settings.clone();
    let d = days.clone();
    let (records, read, oldest_kept) =
        tokio::task::spawn_blocking(move || read_days(&s, &positions, &d)).await??;
    if let (Some(oldest), true) = (oldest_kept, truncated) {
        // Retention has deleted the topic's beginning; days from the oldest record on are whole
        // only if the oldest surviving record is older than them.
        if oldest.as_str() >= days.first.as_str() {
            bail!(
                "the anonymized topic starts at {oldest} (retention): replaying from {} would \
                 replace those days with less than they hold; replay from the day after {oldest}",
                days.first
            );
        }
    }
    let client = InsertClient::new(
        &settings.clickhouse.admin_user,
        &settings.clickhouse.admin_password,
        None,
        Duration::from_secs(300),
    );
    let url = insert_url_into(&settings.clickhouse.admin_url, db, &staging_raw, None);
    // The admin endpoint is the same server the loader inserts into: same body encoding.
    let compression = settings.loader.body_compression;
    for chunk in records.chunks(CHUNK_ROWS) {
        let refs: Vec<&AnonRecord> = chunk.iter().collect();
        match client
            .send(&url, compression, encode_body(&refs, compression))
            .await
        {
            Outcome::Inserted => {}
            other => bail!("inserting into the staging table failed: {other:?}"),
        }
    }
    let mut summary = ReplaySummary {
        records_read: read,
        rows_replayed: records.len() as u64,
        ..ReplaySummary::default()
    };

    // The raw table first, then every rollup fed from it.
    let raw_parts = rebuild_table(&ch, db, "http_log", "timestamp", days, None).await?;
    summary.replaced.insert("http_log".into(), raw_parts);
    for (table, select) in rollups(&ch, db).await? {
        let from_staging = retarget(
            &select,
            &format!("{db}.http_log"),
            &format!("{db}.{staging_raw}"),
        );
        let parts = rebuild_table(&ch, db, &table, "ts", days, Some(&[from_staging])).await?;
        summary.replaced.insert(table, parts);
    }
    ch.query(&format!("DROP TABLE IF EXISTS {db}.{staging_raw}"), &[])
        .await?;
    Ok(summary)
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

/// Reads every partition from its log start up to the loader's committed offset, keeping the
/// records of `days`. Returns them, the number of records read, and the day of the oldest record
/// still in the topic.
fn read_days(
    s: &Settings,
    positions: &[crate::kafka::GroupPosition],
    days: &Days,
) -> anyhow::Result<(Vec<AnonRecord>, u64, Option<String>)> {
    let consumer: BaseConsumer = client_config(&s.kafka, &KafkaOptions::default(), &[])
        .set("group.id", format!("{}-replay", s.loader.group_id))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in positions {
        let end = p.committed.unwrap_or(p.low);
        if p.low < end {
            tpl.add_partition_offset(&s.topics.anonymized, p.partition, Offset::Offset(p.low))?;
            open.insert(p.partition, end);
        }
    }
    let (mut kept, mut read, mut oldest) = (Vec::new(), 0u64, None::<String>);
    if open.is_empty() {
        return Ok((kept, read, oldest));
    }
    consumer.assign(&tpl)?;
    let mut idle = 0;
    while !open.is_empty() {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            idle += 1;
            if idle > 60 {
                bail!("no progress reading {} for 30 s", s.topics.anonymized);
            }
            continue;
        };
        idle = 0;
        let m = match message {
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                open.remove(&p);
                continue;
            }
            other => other?,
        };
        let Some(&end) = open.get(&m.partition()) else {
            continue;
        };
        if m.offset() >= end {
            open.remove(&m.partition());
            continue;
        }
        read += 1;
        let r = anon_record::decode(m.payload().unwrap_or(&[]))
            .with_context(|| format!("record at {}:{}", m.partition(), m.offset()))?;
        let day = day_of_epoch_ms(r.timestamp_epoch_milli);
        if oldest.as_ref().is_none_or(|o| &day < o) {
            oldest = Some(day);
        }
        if days.contains_epoch_ms(r.timestamp_epoch_milli) {
            kept.push(r);
        }
        if m.offset() >= end - 1 {
            open.remove(&m.partition());
        }
    }
    Ok((kept, read, oldest))
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
