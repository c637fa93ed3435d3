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
use crate::body::{encode_body, insert_url_into};
use crate::clickhouse::ClickHouseClient;
use crate::config::{KafkaOptions, Settings};
use crate::kafka::{client_config, group_positions};
use crate::staging::{
    day_of_epoch_ms, rebuild_servers, rebuild_table, refresh_views_on, refuse_if_loader_running,
    rollups, rollups_on, staging_distributed_ddl, Days, RebuildServer, Refreshes, STAGING,
};

/// Rows per staging insert.
const CHUNK_ROWS: usize = 100_000;

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    pub records_read: u64,
    pub rows_replayed: u64,
    /// Table -> partitions replaced.
    pub replaced: BTreeMap<String, Vec<String>>,
    /// The refreshable views, refreshed afterwards (per server in cluster mode).
    pub views: Refreshes,
}

pub async fn replay(settings: &Settings, days: &Days) -> anyhow::Result<ReplaySummary> {
    let servers = rebuild_servers(&settings.clickhouse, "replay")?;
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
    let ch = ClickHouseClient::admin(&settings.clickhouse)?;
    // The staging raw table, on each server; in cluster mode the rows are inserted through a
    // Distributed table over the shards' staging tables, routed as the loader's were.
    let staging_raw = format!("http_log{STAGING}");
    let mut clients = Vec::new();
    for server in &servers {
        let client = server.client(&settings.clickhouse)?;
        let staging = format!("{}{STAGING}", server.table("http_log"));
        for sql in [
            format!("DROP TABLE IF EXISTS {db}.{staging}"),
            format!(
                "CREATE TABLE {db}.{staging} AS {db}.{}",
                server.table("http_log")
            ),
        ] {
            client
                .query(&sql, &[])
                .await
                .with_context(|| format!("creating {staging} on {}", server.url))?;
        }
        clients.push(client);
    }
    if settings.clickhouse.cluster.is_some() {
        let engine = ch
            .query(
                "SELECT engine_full FROM system.tables WHERE database = {db:String} \
                 AND name = 'http_log' FORMAT TSVRaw",
                &[("db", db)],
            )
            .await?;
        ch.query(&format!("DROP TABLE IF EXISTS {db}.{staging_raw}"), &[])
            .await?;
        ch.query(&staging_distributed_ddl(db, engine.trim())?, &[])
            .await?;
    }

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
    let url = insert_url_into(&settings.clickhouse.admin_url, db, &staging_raw, None);
    // The admin endpoint is the same server the loader inserts into: same body encoding.
    let compression = settings.loader.body_compression;
    for chunk in records.chunks(CHUNK_ROWS) {
        let refs: Vec<&AnonRecord> = chunk.iter().collect();
        let answer = ch
            .post(
                &url,
                Some(compression.content_encoding()),
                encode_body(&refs, compression),
            )
            .await?;
        if !answer.is_ok() {
            bail!("inserting into the staging table failed: {answer:?}");
        }
    }
    let mut summary = ReplaySummary {
        records_read: read,
        rows_replayed: records.len() as u64,
        ..ReplaySummary::default()
    };

    // Per server: the raw table first, then every rollup fed from it, from the server's own
    // staging rows.
    if settings.clickhouse.cluster.is_some() {
        ch.query(&format!("DROP TABLE IF EXISTS {db}.{staging_raw}"), &[])
            .await?;
    }
    for (server, client) in servers.iter().zip(&clients) {
        replay_on(client, db, server, days, &mut summary)
            .await
            .with_context(|| format!("replaying on {}", server.url))?;
    }
    // Only once every shard is replayed: in cluster mode each node's view reads all of them.
    summary.views = refresh_views_on(&servers, &clients, db).await?;
    Ok(summary)
}

/// Swaps the days in on one server from its staging raw table, then drops that table.
async fn replay_on(
    ch: &ClickHouseClient,
    db: &str,
    server: &RebuildServer,
    days: &Days,
    summary: &mut ReplaySummary,
) -> anyhow::Result<()> {
    let raw = server.table("http_log");
    let staging = format!("{db}.{raw}{STAGING}");
    let raw_parts = rebuild_table(ch, db, &raw, "timestamp", days, None).await?;
    summary.replaced.insert(server.label(&raw), raw_parts);
    for rollup in rollups_on(&rollups(ch, db).await?, db, server)? {
        let from_staging = rollup.reading(&staging);
        let parts = rebuild_table(ch, db, &rollup.table, "ts", days, Some(&[from_staging])).await?;
        summary.replaced.insert(server.label(&rollup.table), parts);
    }
    ch.query(&format!("DROP TABLE IF EXISTS {staging}"), &[])
        .await?;
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
        // Not written by the anonymizer: the loader quarantined it (loader dead-letter topic),
        // so it was never a row and has none to restore.
        let Ok(r) = anon_record::decode(m.payload().unwrap_or(&[])) else {
            tracing::warn!(
                partition = m.partition(),
                offset = m.offset(),
                "skipping a record that does not decode (the loader quarantined it)"
            );
            continue;
        };
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
