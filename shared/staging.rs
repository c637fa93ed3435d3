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

/// Whether `select` reads the table `table` (as a whole name, see [`retarget`]).
fn reads(select: &str, table: &str) -> bool {
    retarget(select, table, "") != select
}

/// Small blocks for INSERTs that carry rollup rows: a `topK` summary (migration 005) takes ~0.2 MB
/// in memory against ~1 KB on disk, and squashing a month of them into one block exceeded the
/// server's memory limit (measured: 36,000 rows of `http_log_top_1h`).
const SMALL_BLOCKS: &str =
    "SETTINGS max_block_size = 1024, min_insert_block_size_rows = 1024, min_insert_block_size_bytes = 0";

/// A server whose tables replay and backfill rebuild, and what its tables are called there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildServer {
    /// Its direct (admin) HTTP endpoint.
    pub url: String,
    /// Appended to a table's name on this server: nothing on one server, `_local` on a shard.
    pub suffix: &'static str,
}

impl RebuildServer {
    /// The name table `name` has on this server (`http_log_totals` -> `http_log_totals_local`).
    pub fn table(&self, name: &str) -> String {
        format!("{name}{}", self.suffix)
    }

    /// How a summary names a table of this server: the shard's URL is part of it in cluster mode,
    /// where each shard has its own partitions replaced.
    pub fn label(&self, table: &str) -> String {
        if self.suffix.is_empty() {
            table.to_string()
        } else {
            format!("{table} on {}", self.url)
        }
    }

    /// An admin client for this server (the admin credentials and TLS files of `ch`).
    pub fn client(&self, ch: &ClickHouseSettings) -> anyhow::Result<ClickHouseClient> {
        let server = ClickHouseSettings {
            admin_url: self.url.clone(),
            ..ch.clone()
        };
        Ok(ClickHouseClient::admin(&server)?)
    }
}

/// Where replay and backfill rebuild tables: the one server (`admin_url`), or in cluster mode
/// every shard of `clickhouse.shard_admin_urls`, on its `_local` tables. Partition swaps are per
/// server, and per shard they are exact: each source partition's rows live on one shard (the
/// raw table is sharded by `source_partition`) and each shard's views feed its own rollups from
/// its own raw rows, so a shard's rollups rebuilt from its raw table are what its views would
/// have written. A Keeper cluster (no shard URLs) is refused before anything is touched: its
/// swaps would have to run on one replica of each shard, which nothing here could exercise.
pub fn rebuild_servers(
    ch: &ClickHouseSettings,
    command: &str,
) -> anyhow::Result<Vec<RebuildServer>> {
    match &ch.cluster {
        None => Ok(vec![RebuildServer {
            url: ch.admin_url.clone(),
            suffix: "",
        }]),
        Some(cluster) if ch.shard_admin_urls.is_empty() => bail!(
            "`edgelog {command}` needs clickhouse.shard_admin_urls in cluster mode (clickhouse.cluster \
             = {cluster:?}): it rebuilds each shard's local tables on that shard; a replicated \
             cluster is not supported (docs/LIMITATIONS.md, \"Cluster mode\")"
        ),
        Some(_) => Ok(ch
            .shard_admin_urls
            .iter()
            .map(|url| RebuildServer {
                url: url.clone(),
                suffix: crate::cluster_schema::LOCAL_SUFFIX,
            })
            .collect()),
    }
}

/// A rollup as one server holds it: its name (without the server's suffix), its table on the
/// server, and its view's SELECT, which reads `raw` (the server's raw table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RollupOn {
    pub name: String,
    pub table: String,
    pub select: String,
    pub raw: String,
}

impl RollupOn {
    /// The view's SELECT reading `source` in place of the raw table.
    pub fn reading(&self, source: &str) -> String {
        retarget(&self.select, &self.raw, source)
    }
}

/// The rollups of a server from its views (`rollups`), named as on `server`. A view that does
/// not read the server's raw table is refused: retargeting it would silently rebuild the rollup
/// from whatever it does read.
pub(crate) fn rollups_on(
    views: &[(String, String)],
    db: &str,
    server: &RebuildServer,
) -> anyhow::Result<Vec<RollupOn>> {
    let raw = format!("{db}.{}", server.table("http_log"));
    views
        .iter()
        .map(|(name, select)| {
            if !reads(select, &raw) {
                bail!(
                    "the view of {name} on {} does not read {raw}: {select}",
                    server.url
                );
            }
            Ok(RollupOn {
                name: name.clone(),
                table: server.table(name),
                select: select.clone(),
                raw: raw.clone(),
            })
        })
        .collect()
}

/// Cluster mode's staging raw table for replay: a `Distributed` table `http_log_replay` over each
/// shard's `http_log_local_replay`, with the engine of `http_log` (`engine_full`, as
/// `system.tables` prints it) so that rows are routed to the shard the loader sent them to.
pub(crate) fn staging_distributed_ddl(db: &str, engine_full: &str) -> anyhow::Result<String> {
    let local = format!("'http_log{}'", crate::cluster_schema::LOCAL_SUFFIX);
    if !engine_full.starts_with("Distributed(") || engine_full.matches(&local).count() != 1 {
        bail!("{db}.http_log is not a Distributed table over {local}: {engine_full}");
    }
    let staging_local = format!("'http_log{}{STAGING}'", crate::cluster_schema::LOCAL_SUFFIX);
    Ok(format!(
        "CREATE TABLE {db}.http_log{STAGING} AS {db}.http_log ENGINE = {}",
        engine_full.replace(&local, &staging_local)
    ))
}

/// Each rollup table fed from `http_log` by a materialized view, with that view's SELECT. The
/// refreshable views (answers computed ahead from the rollups, [`refresh_views`]) are not rollups.
pub async fn rollups(ch: &ClickHouseClient, db: &str) -> anyhow::Result<Vec<(String, String)>> {
    let text = ch
        .query(
            "SELECT name, replaceAll(as_select, '\\n', ' ') FROM system.tables \
             WHERE database = {db:String} AND engine = 'MaterializedView' \
             AND name NOT IN (SELECT view FROM system.view_refreshes WHERE database = {db:String}) \
             ORDER BY name FORMAT TSVRaw",
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

/// The refreshable views of `db` (sql/012) after [`refresh_views`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshes {
    pub refreshed: Vec<String>,
    /// Stopped by an operator (`SYSTEM STOP VIEW`): ClickHouse ignores a refresh request for
    /// them, so they still hold their last refresh.
    pub stopped: Vec<String>,
}

/// Refreshes every refreshable view of `db` (sql/012) now and waits for it. After `replay` or
/// `backfill` rebuilt rollups, the answers computed ahead from them then hold the rebuilt days
/// instead of waiting up to a refresh period. A failed refresh fails the caller with ClickHouse's
/// error, and a stopped view is named: what the dashboard reads must not silently stay stale.
pub async fn refresh_views(ch: &ClickHouseClient, db: &str) -> anyhow::Result<Refreshes> {
    let text = ch
        .query(
            "SELECT view, status = 'Disabled' FROM system.view_refreshes \
             WHERE database = {db:String} ORDER BY view FORMAT TSVRaw",
            &[("db", db)],
        )
        .await?;
    let mut out = Refreshes::default();
    for line in text.lines() {
        let Some((view, stopped)) = line.split_once('\t') else {
            bail!("unexpected row of system.view_refreshes: {line:?}");
        };
        if stopped == "1" {
            tracing::warn!(db, view, "refreshable view stopped: not refreshed");
            out.stopped.push(view.to_string());
            continue;
        }
        for verb in ["REFRESH", "WAIT"] {
            ch.query(&format!("SYSTEM {verb} VIEW {db}.`{view}`"), &[])
                .await
                .with_context(|| format!("SYSTEM {verb} VIEW {db}.{view}"))?;
        }
        out.refreshed.push(view.to_string());
    }
    Ok(out)
}

/// [`refresh_views`] on every server, once all of them are rebuilt (in cluster mode each node's
/// view reads every shard), the views labelled with their server.
pub(crate) async fn refresh_views_on(
    servers: &[RebuildServer],
    clients: &[ClickHouseClient],
    db: &str,
) -> anyhow::Result<Refreshes> {
    let mut out = Refreshes::default();
    for (server, client) in servers.iter().zip(clients) {
        let views = refresh_views(client, db)
            .await
            .with_context(|| format!("refreshing views on {}", server.url))?;
        let label = |v: Vec<String>| v.into_iter().map(|v| server.label(&v));
        out.refreshed.extend(label(views.refreshed));
        out.stopped.extend(label(views.stopped));
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

    fn shards() -> ClickHouseSettings {
        ClickHouseSettings {
            cluster: Some("edgelog_shards".into()),
            shard_admin_urls: vec!["http://s1:8123".into(), "http://s2:8123".into()],
            ..ClickHouseSettings::default()
        }
    }

    #[test]
    fn one_server_rebuilds_its_tables_a_cluster_each_shards_locals() {
        let single = ClickHouseSettings::default();
        let servers = rebuild_servers(&single, "backfill").unwrap();
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].url, single.admin_url);
        assert_eq!(servers[0].table("http_log_totals"), "http_log_totals");
        assert_eq!(servers[0].label("http_log_totals"), "http_log_totals");

        let servers = rebuild_servers(&shards(), "backfill").unwrap();
        let urls: Vec<&str> = servers.iter().map(|s| s.url.as_str()).collect();
        assert_eq!(urls, ["http://s1:8123", "http://s2:8123"]);
        assert_eq!(servers[1].table("http_log"), "http_log_local");
        assert_eq!(
            servers[1].label("http_log_local"),
            "http_log_local on http://s2:8123"
        );

        let keeper = ClickHouseSettings {
            shard_admin_urls: Vec::new(),
            ..shards()
        };
        let err = rebuild_servers(&keeper, "replay").unwrap_err().to_string();
        assert!(
            err.contains("`edgelog replay` needs clickhouse.shard_admin_urls"),
            "{err}"
        );
    }

    #[test]
    fn a_shards_rollups_read_its_local_raw_table() {
        let servers = rebuild_servers(&shards(), "backfill").unwrap();
        let views = vec![(
            "http_log_totals".to_string(),
            "SELECT toStartOfMinute(timestamp) AS ts, count() AS requests FROM db.http_log_local GROUP BY ts ".to_string(),
        )];
        let on = rollups_on(&views, "db", &servers[0]).unwrap();
        assert_eq!(on[0].name, "http_log_totals");
        assert_eq!(on[0].table, "http_log_totals_local");
        assert_eq!(
            on[0].reading("db.http_log_local_replay"),
            "SELECT toStartOfMinute(timestamp) AS ts, count() AS requests FROM db.http_log_local_replay GROUP BY ts "
        );
        // The same view on one server reads db.http_log, which this one does not.
        let single = rebuild_servers(&ClickHouseSettings::default(), "backfill").unwrap();
        let err = rollups_on(&views, "db", &single[0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not read db.http_log"), "{err}");
    }

    #[test]
    fn the_staging_distributed_table_routes_like_http_log() {
        let engine = "Distributed('edgelog_shards', 'db', 'http_log_local', source_partition)";
        assert_eq!(
            staging_distributed_ddl("db", engine).unwrap(),
            "CREATE TABLE db.http_log_replay AS db.http_log ENGINE = \
             Distributed('edgelog_shards', 'db', 'http_log_local_replay', source_partition)"
        );
        for wrong in [
            "MergeTree PARTITION BY toYYYYMMDD(timestamp) ORDER BY timestamp",
            "Distributed('c', 'db', 'http_log_other', source_partition)",
        ] {
            assert!(staging_distributed_ddl("db", wrong).is_err(), "{wrong}");
        }
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
