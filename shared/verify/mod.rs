//! `edgelog verify`: the audit that proves exactly-once on a real deployment.
//!
//! For each partition of the input topic it compares the offsets that entered (data records below
//! the anonymizer's committed position) with the `source_offset`s in ClickHouse's raw table, net
//! of the dead-letter topic and of what is still in flight (anonymized records the loader has not
//! confirmed). It reports missing, duplicated and unexpected offsets as ranges, and checks that
//! the totals table equals a recount of the raw table.
//!
//! Why no false alarm on a running pipeline: positions are read first (input committed, then the
//! loader's committed position on the anonymized topic), then ClickHouse, then the in-flight tail.
//! A record below the input snapshot was anonymized before it; it is either below the loader's
//! snapshot, hence durably in ClickHouse, or in the tail read afterwards.
//!
//! The heavy lifting runs in ClickHouse (offset runs with a window function, duplicates with a
//! GROUP BY); Kafka is read sequentially once, keeping only runs of offsets.

pub mod ranges;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::ClientContext;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::batch::BatchId;
use crate::clickhouse::ClickHouseClient;
use crate::config::{KafkaOptions, Settings};
use crate::dead_letter::{
    HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_STAGE, HEADER_TOPIC,
};
use crate::kafka::{client_config, group_positions, GroupPosition};
pub use ranges::OffsetSet;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);
const KAFKA_RETRY_FOR: Duration = Duration::from_secs(120);

/// What the audit found on one partition of the input topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionAudit {
    pub partition: i32,
    /// Input log start (older offsets were deleted by retention and cannot be audited).
    pub log_start: i64,
    /// The anonymizer's committed position: offsets below it must be accounted for.
    pub committed: i64,
    /// Data records of the input topic in `[log_start, committed)`.
    pub input: OffsetSet,
    /// Data records at or above `committed`: not yet anonymized.
    pub not_yet_anonymized: u64,
    /// Offsets named by the dead-letter topic.
    pub dead_lettered: OffsetSet,
    /// Anonymized, not yet confirmed by the loader.
    pub in_flight: OffsetSet,
    /// Distinct offsets present in ClickHouse.
    pub landed: OffsetSet,
    /// Offsets present more than once, and how many extra rows they make.
    pub duplicated: OffsetSet,
    pub duplicate_rows: u64,
}

impl PartitionAudit {
    fn auditable(&self) -> OffsetSet {
        OffsetSet::span(self.log_start, self.committed)
    }

    /// What must be in ClickHouse: every input record that was not dead-lettered.
    pub fn expected(&self) -> OffsetSet {
        self.input.difference(&self.dead_lettered)
    }

    pub fn missing(&self) -> OffsetSet {
        self.expected()
            .difference(&self.landed)
            .difference(&self.in_flight)
    }

    /// Rows whose offset is no input record, or a dead-lettered one.
    pub fn unexpected(&self) -> OffsetSet {
        self.landed
            .intersection(&self.auditable())
            .difference(&self.expected())
    }

    /// Rows below the log start: loaded before retention deleted their input; not auditable.
    pub fn below_log_start(&self) -> u64 {
        self.landed
            .intersection(&OffsetSet::span(i64::MIN, self.log_start))
            .len()
    }

    pub fn is_clean(&self) -> bool {
        self.missing().is_empty() && self.unexpected().is_empty() && self.duplicated.is_empty()
    }
}

/// The totals table against a recount from the raw table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TotalsCheck {
    pub raw_rows: u64,
    pub totals_requests: u64,
    pub raw_bytes: u64,
    pub totals_bytes: u64,
    /// Groups (minute, resource, status, cache status, address) whose sums differ.
    pub groups_differing: u64,
    /// Every other rollup (`http_log_totals_*`) whose request or byte sum differs from the raw
    /// table's: `(table, requests, bytes)`.
    pub rollups_differing: Vec<(String, u64, u64)>,
}

impl TotalsCheck {
    pub fn is_clean(&self) -> bool {
        self.groups_differing == 0
            && self.rollups_differing.is_empty()
            && self.raw_rows == self.totals_requests
            && self.raw_bytes == self.totals_bytes
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub partitions: Vec<PartitionAudit>,
    /// Source partitions found in ClickHouse that the input topic does not have.
    pub foreign_partitions: Vec<(i32, u64)>,
    pub totals: TotalsCheck,
    /// `topic:partition` with an open transaction: records behind it are invisible until it
    /// commits or times out, so the audit cannot call the pipeline drained.
    pub open_transactions: Vec<String>,
    pub dead_letters: DeadLetterSummary,
    /// Records in the loader's unconfirmed tail that do not decode: the loader quarantines them.
    pub undecodable_in_flight: u64,
}

/// What both dead-letter topics hold, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterSummary {
    /// Distinct input offsets per reason label (`dead_letter::Reason`; `unlabelled` for dead
    /// letters written before reasons existed).
    pub by_reason: BTreeMap<String, u64>,
    /// Input offsets dead-lettered more than once by stage one, whose dead letters are
    /// transactional: a repeat is a broken guarantee.
    pub repeated_by_anonymizer: u64,
    /// Repeats by the loader, whose quarantine is at-least-once (a crash between the dead letter
    /// and its offset commit writes it again): reported, not a failure.
    pub repeated_by_loader: u64,
    /// Input offsets dead-lettered by both stages.
    pub in_both_stages: u64,
    /// Dead letters that name no input record (e.g. foreign records on the anonymized topic).
    pub without_input_source: u64,
}

impl DeadLetterSummary {
    pub fn is_clean(&self) -> bool {
        self.repeated_by_anonymizer == 0 && self.in_both_stages == 0
    }
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.partitions.iter().all(PartitionAudit::is_clean)
            && self.foreign_partitions.is_empty()
            && self.totals.is_clean()
            && self.dead_letters.is_clean()
    }

    /// Nothing waiting: every input record anonymized and every anonymized record confirmed.
    pub fn is_drained(&self) -> bool {
        self.open_transactions.is_empty()
            && self
                .partitions
                .iter()
                .all(|p| p.not_yet_anonymized == 0 && p.in_flight.is_empty())
    }

    fn sum(&self, f: impl Fn(&PartitionAudit) -> u64) -> u64 {
        self.partitions.iter().map(f).sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:>9} {:>12} {:>12} {:>10} {:>12} {:>10} {:>9} {:>10} {:>10}",
            "partition",
            "input",
            "landed",
            "dead",
            "in flight",
            "waiting",
            "missing",
            "duplicate",
            "unexpected"
        )?;
        for p in &self.partitions {
            writeln!(
                f,
                "{:>9} {:>12} {:>12} {:>10} {:>12} {:>10} {:>9} {:>10} {:>10}",
                p.partition,
                p.input.len(),
                p.landed.len(),
                p.dead_lettered.len(),
                p.in_flight.len(),
                p.not_yet_anonymized,
                p.missing().len(),
                p.duplicate_rows,
                p.unexpected().len()
            )?;
        }
        for p in &self.partitions {
            let part = p.partition;
            if !p.missing().is_empty() {
                writeln!(f, "MISSING     partition {part}: {}", p.missing())?;
            }
            if !p.duplicated.is_empty() {
                writeln!(f, "DUPLICATED  partition {part}: {}", p.duplicated)?;
            }
            if !p.unexpected().is_empty() {
                writeln!(f, "UNEXPECTED  partition {part}: {}", p.unexpected())?;
            }
            if p.log_start > 0 {
                writeln!(
                    f,
                    "note        partition {part}: offsets below {} were deleted by retention; \
                     {} rows loaded from them are not auditable",
                    p.log_start,
                    p.below_log_start()
                )?;
            }
        }
        for (partition, rows) in &self.foreign_partitions {
            writeln!(
                f,
                "UNEXPECTED  {rows} rows from source partition {partition}, which the input \
                 topic does not have"
            )?;
        }
        if !self.open_transactions.is_empty() {
            writeln!(
                f,
                "note        open transactions on {}: what follows them is not visible yet",
                self.open_transactions.join(", ")
            )?;
        }
        let d = &self.dead_letters;
        if !d.by_reason.is_empty() {
            let reasons: Vec<String> = d
                .by_reason
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            writeln!(f, "dead letters by reason: {}", reasons.join(", "))?;
        }
        if d.repeated_by_anonymizer > 0 {
            writeln!(
                f,
                "DUPLICATED  {} input offsets dead-lettered more than once by the anonymizer",
                d.repeated_by_anonymizer
            )?;
        }
        if d.in_both_stages > 0 {
            writeln!(
                f,
                "DUPLICATED  {} input offsets dead-lettered by both stages",
                d.in_both_stages
            )?;
        }
        if d.repeated_by_loader > 0 {
            writeln!(
                f,
                "note        {} loader dead letters repeated (a quarantine retried after a \
                 crash; counted once)",
                d.repeated_by_loader
            )?;
        }
        if d.without_input_source > 0 {
            writeln!(
                f,
                "note        {} dead letters name no input record (foreign records on the \
                 anonymized topic, quarantined by the loader)",
                d.without_input_source
            )?;
        }
        if self.undecodable_in_flight > 0 {
            writeln!(
                f,
                "note        {} undecodable records wait in the loader's tail (it quarantines \
                 them)",
                self.undecodable_in_flight
            )?;
        }
        let t = &self.totals;
        writeln!(
            f,
            "totals table: {} requests, {} bytes; recount of raw table: {} rows, {} bytes; {} \
             groups differ",
            t.totals_requests, t.totals_bytes, t.raw_rows, t.raw_bytes, t.groups_differing
        )?;
        for (table, requests, bytes) in &t.rollups_differing {
            writeln!(
                f,
                "ROLLUP      {table}: {requests} requests, {bytes} bytes; the raw table has {} \
                 rows, {} bytes",
                t.raw_rows, t.raw_bytes
            )?;
        }
        let verdict = if self.is_clean() { "OK" } else { "FAILED" };
        write!(
            f,
            "{verdict}: {} missing, {} duplicated, {} unexpected; totals {}; {} dead-lettered, \
             {} in flight, {} waiting{}",
            self.sum(|p| p.missing().len()),
            self.sum(|p| p.duplicate_rows),
            self.sum(|p| p.unexpected().len())
                + self.foreign_partitions.iter().map(|p| p.1).sum::<u64>(),
            if t.is_clean() {
                "equal the recount"
            } else {
                "DIFFER from the recount"
            },
            self.sum(|p| p.dead_lettered.len()),
            self.sum(|p| p.in_flight.len()),
            self.sum(|p| p.not_yet_anonymized),
            if self.is_drained() { " (drained)" } else { "" }
        )
    }
}

/// Runs the audit once.
pub async fn audit(settings: &Settings) -> anyhow::Result<Report> {
    let s = settings.clone();
    let (input_positions, loader_positions) = tokio::task::spawn_blocking(move || {
        let input = positions(&s, &s.anonymizer.group_id, &s.topics.input)?;
        let loader = positions(&s, &s.loader.group_id, &s.topics.anonymized)?;
        anyhow::Ok((input, loader))
    })
    .await??;
    if input_positions.is_empty() {
        bail!("input topic {} has no partitions", settings.topics.input);
    }

    let client = ClickHouseClient::admin(&settings.clickhouse)?;
    let db = &settings.clickhouse.database;
    let landed = offset_runs(&client, db, false).await?;
    let duplicated = offset_runs(&client, db, true).await?;
    let ttl_days = [
        settings.clickhouse.raw_ttl_days,
        settings.clickhouse.totals_ttl_days,
    ]
    .into_iter()
    .filter(|&d| d > 0)
    .min();
    let totals = check_totals(&client, db, ttl_days).await?;

    let open_transactions = open_transactions(settings, &input_positions, &loader_positions);
    let s = settings.clone();
    let KafkaSide {
        mut partitions,
        dead_letters,
        undecodable_in_flight,
    } = tokio::task::spawn_blocking(move || {
        read_kafka_side(&s, &input_positions, &loader_positions)
    })
    .await??;

    let mut foreign_partitions = Vec::new();
    for (partition, (offsets, _)) in landed {
        match partitions.iter_mut().find(|p| p.partition == partition) {
            Some(p) => p.landed = offsets,
            None => foreign_partitions.push((partition, offsets.len())),
        }
    }
    for (partition, (offsets, extra_rows)) in duplicated {
        if let Some(p) = partitions.iter_mut().find(|p| p.partition == partition) {
            p.duplicated = offsets;
            p.duplicate_rows = extra_rows;
        }
    }
    Ok(Report {
        partitions,
        foreign_partitions,
        totals,
        open_transactions,
        dead_letters,
        undecodable_in_flight,
    })
}

/// Waits until the pipeline has drained (polling the cheap Kafka side only), then audits. Gives up
/// waiting at `timeout` and audits anyway: the report then shows what is still waiting.
pub async fn audit_when_drained(settings: &Settings, timeout: Duration) -> anyhow::Result<Report> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = settings.clone();
        let drained = tokio::task::spawn_blocking(move || pipeline_drained(&s)).await??;
        if drained || Instant::now() >= deadline {
            return audit(settings).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// True when the anonymizer has committed every input record and the loader every anonymized one.
pub fn pipeline_drained(s: &Settings) -> anyhow::Result<bool> {
    let input = positions(s, &s.anonymizer.group_id, &s.topics.input)?;
    let loader = positions(s, &s.loader.group_id, &s.topics.anonymized)?;
    // Positions can stop short of the high watermark by a transaction marker, so the tails are
    // read to see whether they hold records.
    if !open_transactions(s, &input, &loader).is_empty() {
        return Ok(false);
    }
    let mut waiting = 0;
    read_topic(s, &s.topics.input, &tails(&input), |_| waiting += 1)?;
    read_topic(s, &s.topics.anonymized, &tails(&loader), |_| waiting += 1)?;
    Ok(waiting == 0)
}

fn open_transactions(
    s: &Settings,
    input: &[GroupPosition],
    anonymized: &[GroupPosition],
) -> Vec<String> {
    let input = input.iter().map(|p| (&s.topics.input, p));
    let anonymized = anonymized.iter().map(|p| (&s.topics.anonymized, p));
    input
        .chain(anonymized)
        .filter(|(_, p)| p.stable < p.high)
        .map(|(topic, p)| format!("{topic}:{}", p.partition))
        .collect()
}

/// `[committed, high)` of each partition (from the log start if the group never committed).
fn tails(positions: &[GroupPosition]) -> Vec<(i32, i64, i64)> {
    positions
        .iter()
        .map(|p| (p.partition, p.committed.unwrap_or(p.low).max(p.low), p.high))
        .collect()
}

/// `group_positions`, retried for a while: right after a broker restart the group coordinator
/// answers "not coordinator" or "loading" until it has read its log.
fn positions(s: &Settings, group: &str, topic: &str) -> anyhow::Result<Vec<GroupPosition>> {
    let deadline = Instant::now() + KAFKA_RETRY_FOR;
    loop {
        match group_positions(&s.kafka, group, topic, KAFKA_TIMEOUT) {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() < deadline => {
                tracing::info!(%e, group, topic, "reading committed offsets failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("committed offsets of {group} on {topic}"))
            }
        }
    }
}

/// Reads the input topic, both dead-letter topics and the loader's unconfirmed tail.
fn read_kafka_side(
    s: &Settings,
    input_positions: &[GroupPosition],
    loader_positions: &[GroupPosition],
) -> anyhow::Result<KafkaSide> {
    let mut audits: BTreeMap<i32, PartitionAudit> = input_positions
        .iter()
        .map(|p| {
            let audit = PartitionAudit {
                partition: p.partition,
                log_start: p.low,
                committed: p.committed.unwrap_or(p.low).max(p.low),
                ..PartitionAudit::default()
            };
            (p.partition, audit)
        })
        .collect();

    let whole: Vec<(i32, i64, i64)> = input_positions
        .iter()
        .map(|p| (p.partition, p.low, p.high))
        .collect();
    read_topic(s, &s.topics.input, &whole, |m| {
        let a = audits.get_mut(&m.partition()).expect("assigned partition");
        if m.offset() < a.committed {
            a.input.insert(m.offset());
        } else {
            a.not_yet_anonymized += 1;
        }
    })?;

    let mut sources: BTreeMap<(i32, i64), DeadLetterSeen> = BTreeMap::new();
    let mut dead_letters = DeadLetterSummary::default();
    for topic in [&s.topics.dead_letter, &s.topics.loader_dead_letter] {
        let Some(spans) = whole_topic(s, topic)? else {
            tracing::warn!(
                topic,
                "dead-letter topic does not exist (run `edgelog setup`)"
            );
            continue;
        };
        read_topic(s, topic, &spans, |m| match dead_letter_source(m) {
            Some(source) if source.topic == s.topics.input => {
                let seen = sources
                    .entry((source.partition, source.offset))
                    .or_default();
                seen.add(&source);
            }
            _ => dead_letters.without_input_source += 1,
        })?;
    }
    for ((partition, offset), seen) in &sources {
        if let Some(a) = audits.get_mut(partition) {
            // Below the log start (deleted) or not yet committed: not this audit's business.
            if *offset < a.log_start || *offset >= a.committed {
                continue;
            }
            a.dead_lettered.insert(*offset);
        }
        *dead_letters
            .by_reason
            .entry(seen.reason.clone())
            .or_default() += 1;
        dead_letters.repeated_by_anonymizer += u64::from(seen.by_anonymizer > 1);
        dead_letters.repeated_by_loader += u64::from(seen.by_loader > 1);
        dead_letters.in_both_stages += u64::from(seen.by_anonymizer > 0 && seen.by_loader > 0);
    }

    let mut undecodable_in_flight = 0u64;
    read_topic(
        s,
        &s.topics.anonymized,
        &tails(loader_positions),
        |m| match m.payload().map(crate::anon_record::decode) {
            Some(Ok(r)) => {
                if let Some(a) = audits.get_mut(&r.source_partition) {
                    a.in_flight.insert(r.source_offset);
                }
            }
            _ => undecodable_in_flight += 1,
        },
    )?;
    for a in audits.values_mut() {
        a.dead_lettered = a.dead_lettered.intersection(&a.auditable());
        a.in_flight = a.in_flight.intersection(&a.auditable());
    }
    // The loader's pending batch, if any, is part of the tail read above; parsing it here only
    // catches a corrupt record of it early, with a clear message.
    for p in loader_positions {
        BatchId::from_metadata(&p.metadata).with_context(|| {
            format!(
                "commit metadata of the loader on partition {} of {}",
                p.partition, s.topics.anonymized
            )
        })?;
    }
    Ok(KafkaSide {
        partitions: audits.into_values().collect(),
        dead_letters,
        undecodable_in_flight,
    })
}

struct KafkaSide {
    partitions: Vec<PartitionAudit>,
    dead_letters: DeadLetterSummary,
    undecodable_in_flight: u64,
}

/// How often, by which stage and why one input offset was dead-lettered.
#[derive(Debug, Default)]
struct DeadLetterSeen {
    by_anonymizer: u32,
    by_loader: u32,
    reason: String,
}

impl DeadLetterSeen {
    fn add(&mut self, source: &DeadLetterSource) {
        if source.stage.as_deref() == Some("loader") {
            self.by_loader += 1;
        } else {
            self.by_anonymizer += 1;
        }
        if self.reason.is_empty() {
            self.reason = source.reason.clone().unwrap_or_else(|| "unlabelled".into());
        }
    }
}

/// `(partition, log start, end)` of every partition of `topic`; `None` if it does not exist.
fn whole_topic(s: &Settings, topic: &str) -> anyhow::Result<Option<Vec<(i32, i64, i64)>>> {
    match group_positions(&s.kafka, "edgelog-verify", topic, KAFKA_TIMEOUT) {
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => Ok(None),
        Err(_) => {
            let p = positions(s, "edgelog-verify", topic)?;
            Ok(Some(
                p.iter().map(|p| (p.partition, p.low, p.high)).collect(),
            ))
        }
        Ok(p) => Ok(Some(
            p.iter().map(|p| (p.partition, p.low, p.high)).collect(),
        )),
    }
}

/// librdkafka also reports partition ends as client errors; here they are the expected way a read
/// ends, not something to log.
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(%error, reason, "Kafka client error while auditing");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// Where a dead letter came from, by its headers (`shared/dead_letter.rs`).
struct DeadLetterSource {
    topic: String,
    partition: i32,
    offset: i64,
    stage: Option<String>,
    reason: Option<String>,
}

fn dead_letter_source(m: &BorrowedMessage<'_>) -> Option<DeadLetterSource> {
    let headers = m.headers()?;
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_string)
    };
    Some(DeadLetterSource {
        topic: get(HEADER_TOPIC)?,
        partition: get(HEADER_PARTITION)?.parse().ok()?,
        offset: get(HEADER_OFFSET)?.parse().ok()?,
        stage: get(HEADER_STAGE),
        reason: get(HEADER_REASON),
    })
}

/// Reads `[from, to)` of each `(partition, from, to)` with read_committed, calling `each` for
/// every record. A partition is done at `to - 1` or at its end (aborted records and transaction
/// markers make the last offsets invisible).
fn read_topic(
    s: &Settings,
    topic: &str,
    spans: &[(i32, i64, i64)],
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> anyhow::Result<()> {
    let mut open: BTreeMap<i32, i64> = spans
        .iter()
        .filter(|(_, from, to)| from < to)
        .map(|&(p, _, to)| (p, to))
        .collect();
    if open.is_empty() {
        return Ok(());
    }
    let consumer: BaseConsumer<QuietEof> = client_config(
        &s.kafka,
        &KafkaOptions::default(),
        &[
            ("group.id", "edgelog-verify"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("isolation.level", "read_committed"),
            ("enable.partition.eof", "true"),
            ("fetch.max.bytes", "52428800"),
        ],
    )
    .create_with_context(QuietEof)?;
    let mut assignment = TopicPartitionList::new();
    for &(p, from, to) in spans {
        if from < to {
            assignment.add_partition_offset(topic, p, Offset::Offset(from))?;
        }
    }
    consumer.assign(&assignment)?;
    let mut last_progress = Instant::now();
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            None => {
                if last_progress.elapsed() > KAFKA_TIMEOUT {
                    bail!("no progress reading {topic} for {KAFKA_TIMEOUT:?}; partitions left: {open:?}");
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("reading {topic}")),
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let Some(&to) = open.get(&m.partition()) else {
                    continue;
                };
                if m.offset() < to {
                    each(&m);
                }
                if m.offset() >= to - 1 {
                    open.remove(&m.partition());
                }
            }
        }
    }
    Ok(())
}

/// Runs of distinct `source_offset`s per source partition (`duplicates`: only offsets present more
/// than once, with the number of extra rows).
async fn offset_runs(
    client: &ClickHouseClient,
    db: &str,
    duplicates: bool,
) -> anyhow::Result<BTreeMap<i32, (OffsetSet, u64)>> {
    let having = if duplicates { "HAVING copies > 1" } else { "" };
    // Consecutive offsets minus their rank are constant, so each run is one group.
    let sql = format!(
        "SELECT source_partition, min(source_offset), max(source_offset), sum(copies - 1) \
         FROM ( \
           SELECT source_partition, source_offset, copies, \
                  source_offset - row_number() OVER (PARTITION BY source_partition ORDER BY source_offset) AS run \
           FROM (SELECT source_partition, source_offset, count() AS copies FROM {db}.http_log \
                 GROUP BY source_partition, source_offset {having}) \
         ) GROUP BY source_partition, run ORDER BY source_partition, run FORMAT TSV"
    );
    let text = client.query(&sql, &[]).await?;
    let mut out: BTreeMap<i32, (OffsetSet, u64)> = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [p, first, last, extra] = fields[..] else {
            bail!("unexpected line from ClickHouse: {line:?}");
        };
        let entry = out.entry(p.parse()?).or_default();
        entry.0 = entry
            .0
            .union(&OffsetSet::from_runs([(first.parse()?, last.parse()?)]));
        entry.1 += extra.parse::<u64>()?;
    }
    Ok(out)
}

/// `ttl_days`: the shorter TTL of the raw and totals tables. The tables expire rows at different
/// ages, and row by row, so sums are compared only from two days inside the shorter TTL on.
async fn check_totals(
    client: &ClickHouseClient,
    db: &str,
    ttl_days: Option<u32>,
) -> anyhow::Result<TotalsCheck> {
    let since = match ttl_days {
        Some(d) => format!("toStartOfDay(now() - INTERVAL {d} DAY) + INTERVAL 2 DAY"),
        None => "toDateTime(0)".to_string(),
    };
    let (raw_where, totals_where) = (
        format!("WHERE timestamp >= {since}"),
        format!("WHERE ts >= {since}"),
    );
    // The recount groups the raw table exactly as the materialized view does; the comparison is
    // a full join on the group keys. Without join_use_nulls a group missing on one side gets
    // zero sums there, so it counts as differing (no real group has zero requests).
    let sql = format!(
        "WITH \
           t AS (SELECT ts, resource_id, response_status, cache_status, remote_addr, \
                        sum(requests) AS r, sum(bytes_sent) AS b, sum(request_time_milli) AS m \
                 FROM {db}.http_log_totals {totals_where} GROUP BY ALL), \
           raw AS (SELECT toStartOfMinute(timestamp) AS ts, resource_id, response_status, \
                        cache_status, remote_addr, toUInt64(count()) AS r, sum(bytes_sent) AS b, \
                        sum(request_time_milli) AS m \
                 FROM {db}.http_log {raw_where} GROUP BY ALL) \
         SELECT \
           (SELECT count() FROM {db}.http_log {raw_where}), \
           (SELECT sum(requests) FROM {db}.http_log_totals {totals_where}), \
           (SELECT sum(bytes_sent) FROM {db}.http_log {raw_where}), \
           (SELECT sum(bytes_sent) FROM {db}.http_log_totals {totals_where}), \
           (SELECT count() FROM t FULL OUTER JOIN raw \
              USING (ts, resource_id, response_status, cache_status, remote_addr) \
            WHERE t.r != raw.r OR t.b != raw.b OR t.m != raw.m) \
         FORMAT TSV"
    );
    let text = client.query(&sql, &[]).await?;
    let fields: Vec<u64> = text
        .trim()
        .split('\t')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected totals check answer {text:?}"))?;
    let [raw_rows, totals_requests, raw_bytes, totals_bytes, groups_differing] = fields[..] else {
        bail!("unexpected totals check answer {text:?}");
    };
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
    let mut rollups_differing = Vec::new();
    // In cluster mode every rollup is a Distributed table over its shards' `_local` tables: the
    // Distributed one holds the whole cluster's rows, a local one only its shard's.
    // Names come from system.tables; only plain identifiers are spliced into SQL.
    for table in tables
        .lines()
        .filter(|t| t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
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
                &[],
            )
            .await?;
        let sums: Vec<u64> = text
            .trim()
            .split('\t')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("unexpected sums from {table}: {text:?}"))?;
        if sums != [raw_rows, raw_bytes] {
            rollups_differing.push((table.to_string(), sums[0], sums[1]));
        }
    }
    Ok(TotalsCheck {
        raw_rows,
        totals_requests,
        raw_bytes,
        totals_bytes,
        groups_differing,
        rollups_differing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(runs: &[(i64, i64)]) -> OffsetSet {
        OffsetSet::from_runs(runs.iter().copied())
    }

    fn audit() -> PartitionAudit {
        PartitionAudit {
            partition: 0,
            log_start: 10,
            committed: 110,
            input: set(&[(10, 109)]),
            dead_lettered: set(&[(50, 50)]),
            in_flight: set(&[(100, 109)]),
            landed: set(&[(0, 49), (51, 99)]),
            ..PartitionAudit::default()
        }
    }

    #[test]
    fn a_complete_partition_is_clean() {
        let a = audit();
        assert!(a.is_clean(), "{:?} {:?}", a.missing(), a.unexpected());
        assert_eq!(a.below_log_start(), 10);
        assert_eq!(a.expected().len(), 99);
    }

    #[test]
    fn a_gap_is_missing_unless_in_flight() {
        let mut a = audit();
        a.landed = set(&[(10, 49), (51, 59), (70, 99)]);
        assert_eq!(a.missing(), set(&[(60, 69)]));
        a.in_flight = set(&[(60, 69), (100, 109)]);
        assert!(a.is_clean());
    }

    #[test]
    fn a_dead_lettered_or_foreign_offset_in_clickhouse_is_unexpected() {
        let mut a = audit();
        a.landed = set(&[(10, 99)]);
        assert_eq!(a.unexpected(), set(&[(50, 50)]));
        // A transaction marker's offset is no input record: a row claiming it is unexpected.
        a.input = set(&[(10, 104), (106, 109)]);
        a.landed = set(&[(10, 49), (51, 109)]);
        a.in_flight = OffsetSet::new();
        assert_eq!(a.unexpected(), set(&[(105, 105)]));
        // Rows above the snapshot are not judged: they were anonymized after it.
        a.landed = set(&[(10, 49), (51, 104), (106, 200)]);
        assert!(a.is_clean());
    }

    #[test]
    fn loader_dead_letter_repeats_are_a_note_stage_one_repeats_a_failure() {
        let mut d = DeadLetterSummary {
            repeated_by_loader: 3,
            ..DeadLetterSummary::default()
        };
        assert!(d.is_clean());
        d.repeated_by_anonymizer = 1;
        assert!(!d.is_clean());
        d.repeated_by_anonymizer = 0;
        d.in_both_stages = 1;
        assert!(!d.is_clean());
    }

    #[test]
    fn the_verdict_names_every_kind_of_discrepancy() {
        let mut a = audit();
        a.landed = set(&[(10, 49), (51, 59), (70, 99)]);
        a.duplicated = set(&[(20, 21)]);
        a.duplicate_rows = 2;
        let report = Report {
            partitions: vec![a],
            foreign_partitions: vec![(7, 3)],
            open_transactions: vec![],
            totals: TotalsCheck {
                raw_rows: 5,
                totals_requests: 6,
                ..TotalsCheck::default()
            },
            dead_letters: DeadLetterSummary {
                by_reason: [("undecodable".to_string(), 4), ("too_old".to_string(), 1)].into(),
                repeated_by_anonymizer: 1,
                repeated_by_loader: 2,
                ..DeadLetterSummary::default()
            },
            undecodable_in_flight: 0,
        };
        assert!(!report.is_clean());
        let text = report.to_string();
        for needle in [
            "MISSING     partition 0: 60-69",
            "DUPLICATED  partition 0: 20-21",
            "3 rows from source partition 7",
            "dead letters by reason: too_old 1, undecodable 4",
            "DUPLICATED  1 input offsets dead-lettered more than once by the anonymizer",
            "note        2 loader dead letters repeated",
            "FAILED: 10 missing, 2 duplicated, 3 unexpected; totals DIFFER",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
    }
}
