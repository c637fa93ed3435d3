//! The audit of one offset bucket of one partition, and how buckets are cut and folded into a
//! partition's totals. Pure: the I/O is in `mod.rs`.
//!
//! A bucket is `[k * size, (k + 1) * size)` clipped to what can be audited. Aligning buckets to
//! multiples of the size keeps them the same from one run to the next, so a clean bucket recorded
//! in `verify_audited` is recognised again.

use super::ranges::OffsetSet;

/// Offsets per bucket unless `--bucket-offsets` says otherwise. ClickHouse groups at most this
/// many offsets per query (~0.3 GB at 4Mi), the client holds the bucket's runs.
pub const DEFAULT_BUCKET_OFFSETS: i64 = 4_194_304;

/// At most this many runs of each kind of anomaly are kept per partition for the report; the
/// counts stay exact. A catastrophe (every other row missing) must not make the audit run out of
/// memory.
pub const ANOMALY_RUNS_KEPT: usize = 1000;

/// Aligned buckets covering `[from, to)`, each `(start, end)` clipped to it.
pub fn buckets(from: i64, to: i64, size: i64) -> Vec<(i64, i64)> {
    assert!(size > 0, "bucket size must be positive");
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let end = ((start.div_euclid(size) + 1) * size).min(to);
        out.push((start, end));
        start = end;
    }
    out
}

/// Whether `(start, end)` is a whole aligned bucket (only those are recorded as audited).
pub fn is_whole(start: i64, end: i64, size: i64) -> bool {
    start.rem_euclid(size) == 0 && end - start == size
}

/// Everything known about one bucket `[start, end)` of a partition, as offset sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketAudit {
    pub start: i64,
    pub end: i64,
    /// Data records of the input topic in the bucket (all below the anonymizer's position).
    pub input: OffsetSet,
    /// Offsets named by a dead-letter topic.
    pub dead_lettered: OffsetSet,
    /// Anonymized, not yet confirmed by the loader.
    pub in_flight: OffsetSet,
    /// Distinct offsets present in ClickHouse.
    pub landed: OffsetSet,
    /// Offsets present more than once, and how many extra rows they make.
    pub duplicated: OffsetSet,
    pub duplicate_rows: u64,
}

impl BucketAudit {
    fn span(&self) -> OffsetSet {
        OffsetSet::span(self.start, self.end)
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
            .intersection(&self.span())
            .difference(&self.expected())
    }

    pub fn is_clean(&self) -> bool {
        self.missing().is_empty() && self.unexpected().is_empty() && self.duplicated.is_empty()
    }

    /// Clean and final: nothing of it still in flight, so a later run need not read it again.
    pub fn is_settled(&self) -> bool {
        self.is_clean() && self.in_flight.intersection(&self.span()).is_empty()
    }

    /// Rows ClickHouse holds for the bucket (what the cheap re-check counts).
    pub fn rows(&self) -> u64 {
        self.landed.len() + self.duplicate_rows
    }
}

/// Offsets of one kind of anomaly: an exact count and the first [`ANOMALY_RUNS_KEPT`] runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Anomalies {
    pub count: u64,
    pub shown: OffsetSet,
}

impl Anomalies {
    pub fn add(&mut self, offsets: &OffsetSet) {
        self.count += offsets.len();
        let room = ANOMALY_RUNS_KEPT.saturating_sub(self.shown.runs().len());
        if room > 0 {
            let kept = OffsetSet::from_runs(offsets.runs().iter().take(room).copied());
            self.shown = self.shown.union(&kept);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(runs: &[(i64, i64)]) -> OffsetSet {
        OffsetSet::from_runs(runs.iter().copied())
    }

    fn bucket() -> BucketAudit {
        BucketAudit {
            start: 10,
            end: 110,
            input: set(&[(10, 109)]),
            dead_lettered: set(&[(50, 50)]),
            in_flight: set(&[(100, 109)]),
            landed: set(&[(10, 49), (51, 99)]),
            ..BucketAudit::default()
        }
    }

    #[test]
    fn buckets_are_aligned_and_cover_the_span() {
        assert_eq!(buckets(5, 25, 10), vec![(5, 10), (10, 20), (20, 25)]);
        assert_eq!(buckets(10, 30, 10), vec![(10, 20), (20, 30)]);
        assert_eq!(buckets(7, 7, 10), vec![]);
        assert_eq!(buckets(0, 3, 10), vec![(0, 3)]);
        assert!(is_whole(10, 20, 10));
        assert!(!is_whole(5, 10, 10));
        assert!(!is_whole(20, 25, 10));
    }

    #[test]
    fn a_complete_bucket_is_clean_but_not_settled_while_in_flight() {
        let mut b = bucket();
        assert!(b.is_clean(), "{:?} {:?}", b.missing(), b.unexpected());
        assert!(!b.is_settled());
        assert_eq!(b.expected().len(), 99);
        b.landed = set(&[(10, 49), (51, 109)]);
        b.in_flight = OffsetSet::new();
        assert!(b.is_settled());
        assert_eq!(b.rows(), 99);
    }

    #[test]
    fn a_gap_is_missing_unless_in_flight() {
        let mut b = bucket();
        b.landed = set(&[(10, 49), (51, 59), (70, 99)]);
        assert_eq!(b.missing(), set(&[(60, 69)]));
        b.in_flight = set(&[(60, 69), (100, 109)]);
        assert!(b.is_clean());
    }

    #[test]
    fn a_dead_lettered_or_foreign_offset_in_clickhouse_is_unexpected() {
        let mut b = bucket();
        b.landed = set(&[(10, 99)]);
        assert_eq!(b.unexpected(), set(&[(50, 50)]));
        // A transaction marker's offset is no input record: a row claiming it is unexpected.
        b.input = set(&[(10, 104), (106, 109)]);
        b.landed = set(&[(10, 49), (51, 109)]);
        b.in_flight = OffsetSet::new();
        assert_eq!(b.unexpected(), set(&[(105, 105)]));
    }

    #[test]
    fn a_duplicate_makes_a_bucket_dirty() {
        let mut b = bucket();
        b.duplicated = set(&[(20, 20)]);
        b.duplicate_rows = 1;
        assert!(!b.is_clean());
        assert_eq!(b.rows(), 99 - 10 + 1);
    }

    #[test]
    fn anomalies_count_everything_and_keep_the_first_runs() {
        let mut a = Anomalies::default();
        a.add(&OffsetSet::from_runs(
            (0..ANOMALY_RUNS_KEPT as i64 + 5).map(|i| (i * 10, i * 10 + 1)),
        ));
        a.add(&set(&[(1_000_000, 1_000_009)]));
        assert_eq!(a.count, 2 * (ANOMALY_RUNS_KEPT as u64 + 5) + 10);
        assert_eq!(a.shown.runs().len(), ANOMALY_RUNS_KEPT);
        assert_eq!(a.shown.runs()[0], (0, 1));
    }
}
