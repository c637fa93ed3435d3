//! `edgelog verify`: the audit that proves exactly-once on a real deployment.
//!
//! For each partition of the input topic it compares the offsets that entered (data records below
//! the anonymizer's committed position) with the `source_offset`s in ClickHouse's raw table, net
//! of the dead-letter topic and of what is still in flight (anonymized records the loader has not
//! confirmed). It reports missing, duplicated and unexpected offsets as ranges, and checks that
//! every rollup equals a recount of the raw table.
//!
//! Why no false alarm on a running pipeline: positions are read first (input committed, then the
//! loader's committed position on the anonymized topic), then the in-flight tail, then each
//! bucket. A record below the input snapshot was anonymized before it; it is either below the
//! loader's snapshot, hence durably in ClickHouse, or in the tail read afterwards.
//!
//! Bounded memory at any table size: each partition is audited one offset bucket at a time
//! (`bucket.rs`, `--bucket-offsets`): the bucket's input records are read from Kafka and
//! ClickHouse groups the bucket's rows into runs of offsets, so neither side holds more than one
//! bucket. Rollups are compared one day at a time (`totals.rs`). What stays in memory for the
//! whole run: runs of in-flight and dead-lettered offsets, and at most
//! [`bucket::ANOMALY_RUNS_KEPT`] runs of each kind of anomaly per partition.
//!
//! Incremental: a clean, settled bucket is recorded in `verify_audited` with its row count and an
//! offset fingerprint. An incremental run recomputes both for every recorded bucket with one
//! grouped query (two columns scanned, one group per bucket) and audits again only buckets that
//! are new or changed; likewise closed days in `verify_days_audited`.

pub mod bucket;
pub mod ranges;
pub mod totals;
pub mod uniques;
pub mod watch;

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
pub use bucket::{Anomalies, BucketAudit, DEFAULT_BUCKET_OFFSETS};
pub use ranges::OffsetSet;
pub use totals::TotalsCheck;
use totals::QUERY_MEMORY_LIMIT;
pub use uniques::UniquesCheck;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);
const KAFKA_RETRY_FOR: Duration = Duration::from_secs(120);

/// How to audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditOptions {
    /// Offsets per bucket (the unit of memory on both sides, and of what is remembered).
    pub bucket_offsets: i64,
    /// Skip buckets and days recorded clean whose count and fingerprint are unchanged. `false`
    /// audits everything again (`--full`); clean buckets are recorded either way.
    pub incremental: bool,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            bucket_offsets: DEFAULT_BUCKET_OFFSETS,
            incremental: false,
        }
    }
}

/// What the audit found on one partition of the input topic: counts, and the first runs of each
/// kind of anomaly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionAudit {
    pub partition: i32,
    /// Input log start (older offsets were deleted by retention and cannot be audited).
    pub log_start: i64,
    /// The anonymizer's committed position: offsets below it must be accounted for.
    pub committed: i64,
    /// The input topic's end.
    pub high: i64,
    /// Data records of the input topic in `[log_start, committed)`.
    pub input: u64,
    /// Data records at or above `committed`: not yet anonymized.
    pub not_yet_anonymized: u64,
    /// Input records in `[log_start, committed)` named by a dead-letter topic.
    pub dead_lettered: u64,
    /// Anonymized, not yet confirmed by the loader.
    pub in_flight: u64,
    /// Distinct offsets in `[log_start, committed)` present in ClickHouse.
    pub landed: u64,
    pub missing: Anomalies,
    /// Offsets present more than once, and how many extra rows they make.
    pub duplicated: Anomalies,
    pub duplicate_rows: u64,
    /// Rows whose offset is no input record, or a dead-lettered one.
    pub unexpected: Anomalies,
    /// Rows below the log start: loaded before retention deleted their input; not auditable.
    pub below_log_start: u64,
    /// Buckets read now, and buckets skipped as recorded clean and unchanged.
    pub buckets_audited: u64,
    pub buckets_skipped: u64,
    /// Offsets of `[log_start, high)` that no clean, settled bucket covers yet (not anonymized,
    /// in flight, in the last partial bucket, or in a bucket with a discrepancy).
    pub unaudited: u64,
}

impl PartitionAudit {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.duplicated.is_empty()
    }

    /// Adds one audited bucket.
    pub fn add(&mut self, b: &BucketAudit) {
        self.input += b.input.len();
        self.dead_lettered += b.dead_lettered.len();
        self.landed += b.landed.len();
        self.missing.add(&b.missing());
        self.duplicated.add(&b.duplicated);
        self.duplicate_rows += b.duplicate_rows;
        self.unexpected.add(&b.unexpected());
        self.buckets_audited += 1;
    }

    /// Adds a bucket recorded clean by an earlier run and unchanged since.
    fn add_recorded(&mut self, r: &Recorded) {
        self.input += r.input_records;
        self.dead_lettered += r.dead_lettered;
        self.landed += r.rows;
        self.buckets_skipped += 1;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub partitions: Vec<PartitionAudit>,
    /// Source partitions found in ClickHouse that the input topic does not have: `(partition,
    /// rows)`.
    pub foreign_partitions: Vec<(i32, u64)>,
    pub totals: TotalsCheck,
    /// The unique-client rollups against `uniqExact` from the raw table (`uniques`).
    pub uniques: UniquesCheck,
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
            && self.uniques.is_clean()
            && self.dead_letters.is_clean()
    }

    /// Nothing waiting: every input record anonymized and every anonymized record confirmed.
    pub fn is_drained(&self) -> bool {
        self.open_transactions.is_empty()
            && self
                .partitions
                .iter()
                .all(|p| p.not_yet_anonymized == 0 && p.in_flight == 0)
    }

    pub fn sum(&self, f: impl Fn(&PartitionAudit) -> u64) -> u64 {
        self.partitions.iter().map(f).sum()
    }

    /// Input records that should be in ClickHouse and are not.
    pub fn missing(&self) -> u64 {
        self.sum(|p| p.missing.count)
    }

    /// Rows too many: extra copies of an offset, rows of no (or a dead-lettered) input record,
    /// rows from a partition the input topic does not have.
    pub fn duplicated(&self) -> u64 {
        self.sum(|p| p.duplicate_rows + p.unexpected.count)
            + self.foreign_partitions.iter().map(|p| p.1).sum::<u64>()
    }

    pub fn unaudited(&self) -> u64 {
        self.sum(|p| p.unaudited)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:>9} {:>12} {:>12} {:>10} {:>12} {:>10} {:>9} {:>10} {:>10} {:>12}",
            "partition",
            "input",
            "landed",
            "dead",
            "in flight",
            "waiting",
            "missing",
            "duplicate",
            "unexpected",
            "unaudited"
        )?;
        for p in &self.partitions {
            writeln!(
                f,
                "{:>9} {:>12} {:>12} {:>10} {:>12} {:>10} {:>9} {:>10} {:>10} {:>12}",
                p.partition,
                p.input,
                p.landed,
                p.dead_lettered,
                p.in_flight,
                p.not_yet_anonymized,
                p.missing.count,
                p.duplicate_rows,
                p.unexpected.count,
                p.unaudited
            )?;
        }
        for p in &self.partitions {
            let part = p.partition;
            for (label, a) in [
                ("MISSING    ", &p.missing),
                ("DUPLICATED ", &p.duplicated),
                ("UNEXPECTED ", &p.unexpected),
            ] {
                if a.is_empty() {
                    continue;
                }
                write!(f, "{label} partition {part}: {}", a.shown)?;
                if a.count > a.shown.len() {
                    write!(f, " ({} offsets in all)", a.count)?;
                }
                writeln!(f)?;
            }
            if p.log_start > 0 {
                writeln!(
                    f,
                    "note        partition {part}: offsets below {} were deleted by retention; \
                     {} rows loaded from them are not auditable",
                    p.log_start, p.below_log_start
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
        for r in &t.rollups_differing {
            writeln!(
                f,
                "ROLLUP      {} on {}: {} requests, {} bytes; the raw table has {} rows, {} bytes",
                r.table, r.day, r.requests, r.bytes, r.raw_rows, r.raw_bytes
            )?;
        }
        writeln!(
            f,
            "audited now: {} offset buckets, {} days; skipped as recorded clean and unchanged: \
             {} buckets, {} days",
            self.sum(|p| p.buckets_audited),
            t.days_checked,
            self.sum(|p| p.buckets_skipped),
            t.days_skipped
        )?;
        writeln!(f, "{}", self.uniques)?;
        let verdict = if self.is_clean() { "OK" } else { "FAILED" };
        write!(
            f,
            "{verdict}: {} missing, {} duplicated, {} unexpected; totals {}; {} dead-lettered, \
             {} in flight, {} waiting, {} unaudited{}",
            self.missing(),
            self.sum(|p| p.duplicate_rows),
            self.sum(|p| p.unexpected.count)
                + self.foreign_partitions.iter().map(|p| p.1).sum::<u64>(),
            if t.is_clean() {
                "equal the recount"
            } else {
                "DIFFER from the recount"
            },
            self.sum(|p| p.dead_lettered),
            self.sum(|p| p.in_flight),
            self.sum(|p| p.not_yet_anonymized),
            self.unaudited(),
            if self.is_drained() { " (drained)" } else { "" }
        )
    }
}

/// Runs the audit once, in full, with the default bucket size.
pub async fn audit(settings: &Settings) -> anyhow::Result<Report> {
    audit_with(settings, &AuditOptions::default()).await
}

/// Runs the audit once.
pub async fn audit_with(settings: &Settings, options: &AuditOptions) -> anyhow::Result<Report> {
    let size = options.bucket_offsets;
    if size <= 0 {
        bail!("the bucket size must be positive, not {size}");
    }
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
    let open_transactions = open_transactions(settings, &input_positions, &loader_positions);
    let s = settings.clone();
    let (input, loader) = (input_positions.clone(), loader_positions);
    let mut side =
        tokio::task::spawn_blocking(move || read_kafka_side(&s, &input, &loader)).await??;

    let client = ClickHouseClient::admin(&settings.clickhouse)?;
    let db = &settings.clickhouse.database;
    let topic = &settings.topics.input;
    let recorded = if options.incremental {
        unchanged_recorded(&client, db, topic, size).await?
    } else {
        BTreeMap::new()
    };

    let mut partitions = Vec::new();
    for p in &input_positions {
        let committed = p.committed.unwrap_or(p.low).max(p.low);
        let dead = side.dead.remove(&p.partition).unwrap_or_default();
        let in_flight = side.in_flight.remove(&p.partition).unwrap_or_default();
        let mut a = PartitionAudit {
            partition: p.partition,
            log_start: p.low,
            committed,
            high: p.high,
            not_yet_anonymized: side.waiting.get(&p.partition).copied().unwrap_or(0),
            in_flight: in_flight
                .intersection(&OffsetSet::span(p.low, committed))
                .len(),
            ..PartitionAudit::default()
        };
        let mut settled = 0u64;
        for (start, end) in bucket::buckets(p.low, committed, size) {
            match recorded.get(&(p.partition, start)) {
                Some(r) if r.end == end => a.add_recorded(r),
                _ => {
                    let b = audit_bucket(
                        settings,
                        &client,
                        p.partition,
                        (start, end),
                        &dead,
                        &in_flight,
                    )
                    .await?;
                    a.add(&b);
                    if !(b.is_settled() && bucket::is_whole(start, end, size)) {
                        continue;
                    }
                    record(&client, db, topic, p.partition, &b).await?;
                }
            }
            settled += (end - start) as u64;
        }
        a.unaudited = ((p.high - p.low) as u64).saturating_sub(settled);
        if p.low > 0 {
            a.below_log_start = count(
                &client,
                &format!(
                    "SELECT count() FROM {db}.http_log WHERE source_partition = {{p:Int32}} \
                     AND source_offset < {{o:Int64}} FORMAT TSV"
                ),
                &[("p", &p.partition.to_string()), ("o", &p.low.to_string())],
            )
            .await?;
        }
        partitions.push(a);
    }

    // One group per source partition: bounded whatever the table's size.
    let per_partition = client
        .query(
            &format!(
                "SELECT source_partition, count() FROM {db}.http_log GROUP BY source_partition \
                 ORDER BY source_partition FORMAT TSV"
            ),
            &[],
        )
        .await?;
    let mut foreign_partitions = Vec::new();
    for line in per_partition.lines() {
        let (p, rows) = line
            .split_once('\t')
            .with_context(|| format!("unexpected line from ClickHouse: {line:?}"))?;
        let (p, rows): (i32, u64) = (p.parse()?, rows.parse()?);
        if !partitions.iter().any(|a| a.partition == p) {
            foreign_partitions.push((p, rows));
        }
    }

    let ttl_days = [
        settings.clickhouse.raw_ttl_days,
        settings.clickhouse.totals_ttl_days,
    ]
    .into_iter()
    .filter(|&d| d > 0)
    .min();
    let mut uniques = UniquesCheck::default();
    let totals =
        totals::check_totals(&client, db, ttl_days, options.incremental, &mut uniques).await?;
    Ok(Report {
        partitions,
        foreign_partitions,
        totals,
        uniques,
        open_transactions,
        dead_letters: side.dead_letters,
        undecodable_in_flight: side.undecodable_in_flight,
    })
}

/// Audits `[start, end)` of one partition: its input records from Kafka, its rows grouped into
/// runs by ClickHouse.
async fn audit_bucket(
    settings: &Settings,
    client: &ClickHouseClient,
    partition: i32,
    (start, end): (i64, i64),
    dead: &OffsetSet,
    in_flight: &OffsetSet,
) -> anyhow::Result<BucketAudit> {
    let s = settings.clone();
    let input = tokio::task::spawn_blocking(move || {
        let mut input = OffsetSet::new();
        read_topic(&s, &s.topics.input, &[(partition, start, end)], |m| {
            input.insert(m.offset())
        })?;
        anyhow::Ok(input)
    })
    .await??;
    let db = &settings.clickhouse.database;
    let (landed, _) = offset_runs(client, db, partition, (start, end), false).await?;
    let (duplicated, duplicate_rows) =
        offset_runs(client, db, partition, (start, end), true).await?;
    let span = OffsetSet::span(start, end);
    Ok(BucketAudit {
        start,
        end,
        input,
        dead_lettered: dead.intersection(&span),
        in_flight: in_flight.intersection(&span),
        landed,
        duplicated,
        duplicate_rows,
    })
}

/// A bucket recorded clean by an earlier run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recorded {
    end: i64,
    input_records: u64,
    dead_lettered: u64,
    rows: u64,
}

/// Records a clean, settled bucket with what http_log holds for it now.
async fn record(
    client: &ClickHouseClient,
    db: &str,
    topic: &str,
    partition: i32,
    b: &BucketAudit,
) -> anyhow::Result<()> {
    client
        .query(
            &format!(
                "INSERT INTO {db}.verify_audited (topic, source_partition, first_offset, \
                 end_offset, input_records, dead_lettered, rows, fingerprint) \
                 SELECT {{t:String}}, {{p:Int32}}, {{a:Int64}}, {{b:Int64}}, {{i:UInt64}}, \
                        {{d:UInt64}}, count(), sum(cityHash64(source_offset)) \
                 FROM {db}.http_log WHERE source_partition = {{p:Int32}} \
                 AND source_offset >= {{a:Int64}} AND source_offset < {{b:Int64}}"
            ),
            &[
                ("t", topic),
                ("p", &partition.to_string()),
                ("a", &b.start.to_string()),
                ("b", &b.end.to_string()),
                ("i", &b.input.len().to_string()),
                ("d", &b.dead_lettered.len().to_string()),
            ],
        )
        .await
        .context("recording an audited bucket (run `edgelog setup` to create verify_audited)")?;
    Ok(())
}

/// Buckets of `size` recorded clean whose row count and fingerprint in http_log are unchanged,
/// by `(partition, first offset)`. One scan of two columns, one group per bucket.
async fn unchanged_recorded(
    client: &ClickHouseClient,
    db: &str,
    topic: &str,
    size: i64,
) -> anyhow::Result<BTreeMap<(i32, i64), Recorded>> {
    let text = client
        .query(
            &format!(
                "SELECT r.source_partition, r.first_offset, r.end_offset, r.input_records, \
                        r.dead_lettered, r.rows \
                 FROM (SELECT * FROM {db}.verify_audited FINAL WHERE topic = {{t:String}} \
                       AND end_offset - first_offset = {{size:Int64}}) AS r \
                 INNER JOIN (SELECT source_partition, \
                                    intDiv(source_offset, {{size:Int64}}) * {{size:Int64}} AS first_offset, \
                                    count() AS now_rows, \
                                    sum(cityHash64(source_offset)) AS now_fingerprint \
                             FROM {db}.http_log GROUP BY source_partition, first_offset) AS n \
                 ON r.source_partition = n.source_partition AND r.first_offset = n.first_offset \
                 WHERE r.rows = n.now_rows AND r.fingerprint = n.now_fingerprint \
                 {QUERY_MEMORY_LIMIT} FORMAT TSV"
            ),
            &[("t", topic), ("size", &size.to_string())],
        )
        .await
        .context("reading verify_audited (run `edgelog setup` to create it)")?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [p, first, end, input, dead, rows] = fields[..] else {
            bail!("unexpected line from ClickHouse: {line:?}");
        };
        out.insert(
            (p.parse()?, first.parse()?),
            Recorded {
                end: end.parse()?,
                input_records: input.parse()?,
                dead_lettered: dead.parse()?,
                rows: rows.parse()?,
            },
        );
    }
    Ok(out)
}

async fn count(
    client: &ClickHouseClient,
    sql: &str,
    params: &[(&str, &str)],
) -> anyhow::Result<u64> {
    let text = client.query(sql, params).await?;
    text.trim()
        .parse()
        .with_context(|| format!("unexpected count from ClickHouse: {text:?}"))
}

/// Waits until the pipeline has drained (polling the cheap Kafka side only), then audits. Gives up
/// waiting at `timeout` and audits anyway: the report then shows what is still waiting.
pub async fn audit_when_drained(settings: &Settings, timeout: Duration) -> anyhow::Result<Report> {
    audit_when_drained_with(settings, timeout, &AuditOptions::default()).await
}

pub async fn audit_when_drained_with(
    settings: &Settings,
    timeout: Duration,
    options: &AuditOptions,
) -> anyhow::Result<Report> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = settings.clone();
        let drained = tokio::task::spawn_blocking(move || pipeline_drained(&s)).await??;
        if drained || Instant::now() >= deadline {
            return audit_with(settings, options).await;
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

/// Reads what the buckets need from Kafka besides the input records: the input tails (records
/// waiting for the anonymizer), both dead-letter topics and the loader's unconfirmed tail.
fn read_kafka_side(
    s: &Settings,
    input_positions: &[GroupPosition],
    loader_positions: &[GroupPosition],
) -> anyhow::Result<KafkaSide> {
    let auditable: BTreeMap<i32, (i64, i64)> = input_positions
        .iter()
        .map(|p| {
            (
                p.partition,
                (p.low, p.committed.unwrap_or(p.low).max(p.low)),
            )
        })
        .collect();
    let mut waiting: BTreeMap<i32, u64> = BTreeMap::new();
    read_topic(s, &s.topics.input, &tails(input_positions), |m| {
        *waiting.entry(m.partition()).or_default() += 1;
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
    let mut dead: BTreeMap<i32, OffsetSet> = BTreeMap::new();
    for ((partition, offset), seen) in &sources {
        if let Some(&(low, committed)) = auditable.get(partition) {
            // Below the log start (deleted) or not yet committed: not this audit's business.
            if *offset < low || *offset >= committed {
                continue;
            }
            dead.entry(*partition).or_default().insert(*offset);
        }
        *dead_letters
            .by_reason
            .entry(seen.reason.clone())
            .or_default() += 1;
        dead_letters.repeated_by_anonymizer += u64::from(seen.by_anonymizer > 1);
        dead_letters.repeated_by_loader += u64::from(seen.by_loader > 1);
        dead_letters.in_both_stages += u64::from(seen.by_anonymizer > 0 && seen.by_loader > 0);
    }
    drop(sources);

    let mut in_flight: BTreeMap<i32, OffsetSet> = BTreeMap::new();
    let mut undecodable_in_flight = 0u64;
    read_topic(
        s,
        &s.topics.anonymized,
        &tails(loader_positions),
        |m| match m.payload().map(crate::anon_record::decode) {
            Some(Ok(r)) => {
                if auditable.contains_key(&r.source_partition) {
                    in_flight
                        .entry(r.source_partition)
                        .or_default()
                        .insert(r.source_offset);
                }
            }
            _ => undecodable_in_flight += 1,
        },
    )?;
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
        dead,
        in_flight,
        waiting,
        dead_letters,
        undecodable_in_flight,
    })
}

/// What the audit keeps from Kafka besides the buckets, per input partition.
struct KafkaSide {
    /// Input offsets in `[log start, committed)` named by a dead-letter topic.
    dead: BTreeMap<i32, OffsetSet>,
    /// Input offsets in the loader's unconfirmed tail.
    in_flight: BTreeMap<i32, OffsetSet>,
    /// Data records at or above the anonymizer's position.
    waiting: BTreeMap<i32, u64>,
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

/// Runs of distinct `source_offset`s of `[start, end)` of one source partition (`duplicates`:
/// only offsets present more than once, with the number of extra rows). ClickHouse groups at most
/// the bucket's rows; the answer is one line per run.
async fn offset_runs(
    client: &ClickHouseClient,
    db: &str,
    partition: i32,
    (start, end): (i64, i64),
    duplicates: bool,
) -> anyhow::Result<(OffsetSet, u64)> {
    let having = if duplicates { "HAVING copies > 1" } else { "" };
    // Consecutive offsets minus their rank are constant, so each run is one group.
    let sql = format!(
        "SELECT min(source_offset), max(source_offset), sum(copies - 1) \
         FROM ( \
           SELECT source_offset, copies, \
                  source_offset - row_number() OVER (ORDER BY source_offset) AS run \
           FROM (SELECT source_offset, count() AS copies FROM {db}.http_log \
                 WHERE source_partition = {{p:Int32}} \
                   AND source_offset >= {{a:Int64}} AND source_offset < {{b:Int64}} \
                 GROUP BY source_offset {having}) \
         ) GROUP BY run ORDER BY run {QUERY_MEMORY_LIMIT} FORMAT TSV"
    );
    let text = client
        .query(
            &sql,
            &[
                ("p", &partition.to_string()),
                ("a", &start.to_string()),
                ("b", &end.to_string()),
            ],
        )
        .await?;
    let mut runs = Vec::new();
    let mut extra_rows = 0u64;
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [first, last, extra] = fields[..] else {
            bail!("unexpected line from ClickHouse: {line:?}");
        };
        runs.push((first.parse()?, last.parse()?));
        extra_rows += extra.parse::<u64>()?;
    }
    Ok((OffsetSet::from_runs(runs), extra_rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(runs: &[(i64, i64)]) -> OffsetSet {
        OffsetSet::from_runs(runs.iter().copied())
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
    fn buckets_fold_into_partition_counts() {
        let mut a = PartitionAudit::default();
        a.add(&BucketAudit {
            start: 0,
            end: 10,
            input: set(&[(0, 9)]),
            dead_lettered: set(&[(3, 3)]),
            landed: set(&[(0, 2), (4, 9)]),
            ..BucketAudit::default()
        });
        a.add(&BucketAudit {
            start: 10,
            end: 20,
            input: set(&[(10, 19)]),
            landed: set(&[(10, 14), (16, 19)]),
            duplicated: set(&[(11, 11)]),
            duplicate_rows: 2,
            ..BucketAudit::default()
        });
        assert_eq!((a.input, a.landed, a.dead_lettered), (20, 18, 1));
        assert_eq!(a.missing.shown, set(&[(15, 15)]));
        assert_eq!(a.duplicated.count, 1);
        assert_eq!(a.duplicate_rows, 2);
        assert_eq!(a.buckets_audited, 2);
        assert!(!a.is_clean());
    }

    #[test]
    fn the_verdict_names_every_kind_of_discrepancy() {
        let mut a = PartitionAudit::default();
        a.add(&BucketAudit {
            start: 10,
            end: 110,
            input: set(&[(10, 109)]),
            dead_lettered: set(&[(50, 50)]),
            landed: set(&[(10, 49), (51, 59), (70, 109)]),
            duplicated: set(&[(20, 21)]),
            duplicate_rows: 2,
            ..BucketAudit::default()
        });
        let report = Report {
            partitions: vec![a],
            foreign_partitions: vec![(7, 3)],
            open_transactions: vec![],
            totals: TotalsCheck {
                raw_rows: 5,
                totals_requests: 6,
                ..TotalsCheck::default()
            },
            uniques: UniquesCheck::default(),
            dead_letters: DeadLetterSummary {
                by_reason: [("undecodable".to_string(), 4), ("too_old".to_string(), 1)].into(),
                repeated_by_anonymizer: 1,
                repeated_by_loader: 2,
                ..DeadLetterSummary::default()
            },
            undecodable_in_flight: 0,
        };
        assert!(!report.is_clean());
        assert_eq!(report.missing(), 10);
        assert_eq!(report.duplicated(), 2 + 3);
        let text = report.to_string();
        for needle in [
            "MISSING     partition 0: 60-69",
            "DUPLICATED  partition 0: 20-21",
            "3 rows from source partition 7",
            "dead letters by reason: too_old 1, undecodable 4",
            "DUPLICATED  1 input offsets dead-lettered more than once by the anonymizer",
            "note        2 loader dead letters repeated",
            "audited now: 1 offset buckets",
            "FAILED: 10 missing, 2 duplicated, 3 unexpected; totals DIFFER",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
    }
}
