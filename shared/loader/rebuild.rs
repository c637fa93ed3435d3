//! A recorded batch this process did not plan (found in commit metadata after a crash or a
//! rebalance) is read again by its ranges, outside the group, so the next send carries the same
//! records, hence the same bytes and token, as the first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::anon_record;
use crate::batch::BatchRanges;
use crate::config::Settings;
use crate::kafka::client_config;

use super::state::Buffered;

/// Reads exactly the records of `ranges` again (read_committed, by assignment, outside the group).
pub(super) async fn rebuild(
    settings: &Settings,
    ranges: &BatchRanges,
) -> anyhow::Result<Vec<Buffered>> {
    let settings = settings.clone();
    let ranges = ranges.clone();
    tokio::task::spawn_blocking(move || rebuild_blocking(&settings, &ranges)).await?
}

fn rebuild_blocking(settings: &Settings, ranges: &BatchRanges) -> anyhow::Result<Vec<Buffered>> {
    let topic = &settings.topics.anonymized;
    let mut config = client_config(&settings.kafka, &settings.loader.kafka_options, &[]);
    config
        .set("group.id", format!("{}-rebuild", settings.loader.group_id))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let reader: BaseConsumer = config.create().context("creating the rebuild reader")?;
    let mut tpl = TopicPartitionList::new();
    // Each range ends at a record the batch included, so reading until offset end-1 per partition
    // gets them all; offsets at or past the end are not part of the batch.
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    for r in ranges.ranges() {
        let (low, _) = reader
            .fetch_watermarks(topic, r.partition, Duration::from_secs(30))
            .context("reading the log start of a recorded batch's partition")?;
        if low > r.start {
            // Retention deleted part of the batch before it was confirmed. What is left is sent
            // under the same token: if the whole batch had landed, ClickHouse drops the re-send.
            // (Token-less mode cannot tell, and may store the remainder twice.)
            let lost = low.min(r.end) - r.start;
            metrics::counter!("edgelog_loader_lost_offsets_total").increment(lost as u64);
            tracing::error!(partition = r.partition, batch = %ranges, log_start = low, lost, "DATA LOSS: retention deleted records of a recorded batch before it was confirmed");
        }
        if low < r.end {
            tpl.add_partition_offset(topic, r.partition, Offset::Offset(low.max(r.start)))?;
            remaining.insert(r.partition, r.end - 1);
        }
    }
    if !remaining.is_empty() {
        reader.assign(&tpl)?;
    }
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "rebuilding batch {ranges}: partitions {:?} not read within 300 s",
                remaining.keys()
            );
        }
        let Some(message) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message.context("reading a recorded batch")?;
        let (p, o) = (m.partition(), m.offset());
        if !ranges.contains(p, o) {
            continue;
        }
        let payload = m.payload().unwrap_or(&[]);
        match anon_record::decode(payload) {
            Ok(record) => records.push(Buffered {
                partition: p,
                offset: o,
                record,
                bytes: payload.len(),
            }),
            // Decoding is deterministic, so the first attempt found it undecodable too, and
            // dead-lettered it before it recorded the batch: skip it, as the first attempt did.
            Err(e) => {
                tracing::warn!(partition = p, offset = o, error = %e, "undecodable record inside a recorded batch skipped (dead-lettered before the batch was recorded)")
            }
        }
        if remaining.get(&p) == Some(&o) {
            remaining.remove(&p);
        }
    }
    tracing::info!(%ranges, rows = records.len(), "recorded batch rebuilt");
    Ok(records)
}
