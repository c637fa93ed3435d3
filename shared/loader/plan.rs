//! Pure planning rules of the loader: how many days one insert may touch, how a batch that cannot
//! pass is split, and how the body limit follows the proxy's 413s.

use std::collections::VecDeque;
use std::time::Duration;

use crate::anon_record::AnonRecord;
use crate::body::{self, BodyCompression};

use super::state::Buffered;

/// Milliseconds in a UTC day.
const DAY_MS: u64 = 86_400_000;

/// Smallest body limit the loader plans for (also `loader.max_body_bytes`' lower bound).
pub const MIN_BODY_BYTES: usize = 4096;

/// Length of the longest prefix of `timestamps` (epoch milliseconds, in batch order) that touches
/// at most `max_days` UTC days; at least 1 when there is anything, since one record touches one
/// day.
///
/// `http_log` is partitioned by `toYYYYMMDD(timestamp)` and ClickHouse refuses an insert block
/// spanning more than `max_partitions_per_insert_block` (100 by default) partitions, with the same
/// error on every retry. The table's day is in the server's time zone, and one UTC day overlaps at
/// most two local days, so `max_days` ≤ 50 UTC days keeps any server time zone within 100.
pub fn prefix_within_days(timestamps: impl IntoIterator<Item = u64>, max_days: usize) -> usize {
    let mut days: Vec<u64> = Vec::new();
    let mut n = 0;
    for ts in timestamps {
        let day = ts / DAY_MS;
        if !days.contains(&day) {
            if days.len() >= max_days.max(1) {
                break;
            }
            days.push(day);
        }
        n += 1;
    }
    n
}

/// Splits a batch's records (in batch order, so per partition by rising offset) into two
/// non-empty halves by count. Each half keeps, per partition, a contiguous run of the records,
/// so each is a batch of its own: its ranges hold exactly its records. Needs at least 2 records.
pub fn halves<T>(mut records: Vec<T>) -> (Vec<T>, Vec<T>) {
    assert!(
        records.len() >= 2,
        "a single record is quarantined, not split"
    );
    let second = records.split_off(records.len() / 2);
    (records, second)
}

/// The body size the loader plans for. A 413 lowers it below the refused size; successful
/// inserts raise it back toward `loader.max_body_bytes`, so one transient 413 (a proxy
/// reconfigured for a while, a different proxy behind a balancer) does not cost capacity for good.
///
/// While a refusal is recent the limit stays under it, so a proxy whose real limit is below
/// `max_body_bytes` costs a couple of 413s per [`BodyLimit::FORGET_AFTER`] inserts, not one
/// every other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit {
    max: usize,
    current: usize,
    /// Size of the last refused body, and successful inserts since.
    refused: Option<(usize, u32)>,
}

impl BodyLimit {
    /// Successful inserts after which a refusal no longer caps the climb.
    pub const FORGET_AFTER: u32 = 16;

    pub fn new(max: usize) -> BodyLimit {
        let max = max.max(MIN_BODY_BYTES);
        BodyLimit {
            max,
            current: max,
            refused: None,
        }
    }

    pub fn get(&self) -> usize {
        self.current
    }

    /// The proxy answered 413 to a body of `size` bytes.
    pub fn refused(&mut self, size: usize) {
        self.current = (size * 3 / 4).min(self.current).max(MIN_BODY_BYTES);
        self.refused = Some((size, 0));
    }

    /// An insert passed: climb by an eighth of the maximum, capped under a recent refusal.
    pub fn inserted(&mut self) {
        let ceiling = match &mut self.refused {
            Some((size, since)) => {
                *since += 1;
                if *since >= Self::FORGET_AFTER {
                    self.refused = None;
                    self.max
                } else {
                    (*size / 8 * 7).clamp(MIN_BODY_BYTES, self.max)
                }
            }
            None => self.max,
        };
        let step = (self.max / 8).max(1);
        self.current = (self.current + step).min(ceiling).max(self.current);
    }
}

impl Default for BodyLimit {
    /// The configured maximum's default; `run` starts from `loader.max_body_bytes`.
    fn default() -> Self {
        BodyLimit::new(1_000_000)
    }
}

// Sizing a batch: the longest prefix of the queue whose body fits.

/// What planning reads from the state besides the queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizing {
    pub(super) max_body_bytes: usize,
    /// Final-level over planning-level size (0: not learned yet).
    pub(super) level_ratio: f64,
    pub(super) bytes_per_row: f64,
}

/// A planned prefix of the queue: how many records, their body, the level ratio it measured.
pub(super) struct Planned {
    pub(super) n: usize,
    pub(super) body: Vec<u8>,
    pub(super) level_ratio: f64,
}

/// The pure core of planning: the longest prefix of `queue` whose body fits (within 2%).
/// Bisection, starting from a guess made with the last body's bytes per row.
pub(super) fn plan_prefix(
    queue: &VecDeque<Buffered>,
    sizing: Sizing,
    compression: BodyCompression,
    max_days: usize,
) -> Planned {
    let max_body_bytes = sizing.max_body_bytes;
    let len = prefix_within_days(
        queue.iter().map(|b| b.record.timestamp_epoch_milli),
        max_days,
    );
    // Candidates are sized with a cheap zstd level scaled by the learned ratio to the final
    // level; only the chosen batch is encoded at the final level (see docs/BENCHMARKS.md).
    let ratio = if sizing.level_ratio > 0.0 {
        sizing.level_ratio
    } else {
        compression.initial_planning_ratio()
    };
    let refs = |n: usize| -> Vec<&AnonRecord> { queue.iter().take(n).map(|b| &b.record).collect() };
    let planning_size = |n: usize| body::encode_body_at(&refs(n), body::PLANNING_ZSTD_LEVEL).len();
    let fits = |n: usize| planning_size(n) as f64 * ratio <= max_body_bytes as f64;
    let guess = (max_body_bytes as f64 / sizing.bytes_per_row.max(1.0)) as usize;
    let mut n = if guess >= len && fits(len) {
        len
    } else {
        // Invariant: `lo` fits (0 trivially), `hi` does not (or is past the queue).
        let (mut lo, mut hi) = (0, len + 1);
        let mut n = guess.clamp(1, len);
        while hi - lo > 1 && hi - lo > lo / 50 {
            if fits(n) {
                lo = n;
            } else {
                hi = n;
            }
            n = (lo + hi.min(len + 1)) / 2;
            if n > len {
                break;
            }
        }
        // A single record over the limit still goes alone, and the proxy's 413 says so.
        lo.max(1)
    };
    // The ratio is an estimate: shrink until the final body really fits.
    let body = loop {
        let body = body::encode_body(&refs(n), compression);
        if body.len() <= max_body_bytes || n == 1 {
            break body;
        }
        n = ((n as f64 * max_body_bytes as f64 / body.len() as f64 * 0.98) as usize)
            .clamp(1, n - 1);
    };
    let level_ratio = body.len() as f64 / planning_size(n).max(1) as f64;
    Planned {
        n,
        body,
        level_ratio,
    }
}

/// Planning lead before the first batch has measured one: about a full xz body's encode.
pub(super) const INITIAL_PLANNING_LEAD: Duration = Duration::from_secs(3);

/// The next planning lead, from how long the last planning took: half again plus a quarter of a
/// second (encode time varies with the records and the machine's load), and never more than a
/// quarter of the slot spacing (records read during the lead wait a slot longer).
pub(super) fn next_planning_lead(last_planning: Duration, slot_spacing: Duration) -> Duration {
    (last_planning.mul_f64(1.5) + Duration::from_millis(250)).min(slot_spacing / 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: u64 = DAY_MS;

    #[test]
    fn days_prefix_stops_before_the_day_over_the_limit() {
        let ts = [0, 1, DAY, 5, 2 * DAY, DAY + 3, 3 * DAY];
        assert_eq!(prefix_within_days(ts, 1), 2);
        assert_eq!(prefix_within_days(ts, 2), 4);
        assert_eq!(prefix_within_days(ts, 3), 6);
        assert_eq!(prefix_within_days(ts, 4), 7);
        assert_eq!(prefix_within_days([], 3), 0);
        // Zero is treated as one: a batch always takes its first record.
        assert_eq!(prefix_within_days(ts, 0), 2);
    }

    #[test]
    fn halves_split_by_count() {
        assert_eq!(halves(vec![1, 2, 3]), (vec![1], vec![2, 3]));
        assert_eq!(halves(vec![1, 2]), (vec![1], vec![2]));
    }

    #[test]
    fn body_limit_recovers_after_a_transient_413() {
        let mut l = BodyLimit::new(1_000_000);
        l.refused(1_000_000);
        assert_eq!(l.get(), 750_000);
        l.inserted();
        assert_eq!(l.get(), 875_000, "capped under the recent refusal");
        for _ in 0..BodyLimit::FORGET_AFTER {
            l.inserted();
        }
        assert_eq!(l.get(), 1_000_000, "back to the maximum");
    }

    #[test]
    fn a_proxy_limit_below_max_costs_few_refusals() {
        // The proxy really takes 600 kB; the loader is configured for 1 MB.
        let real = 600_000;
        let mut l = BodyLimit::new(1_000_000);
        let mut refusals = 0;
        for _ in 0..200 {
            if l.get() > real {
                refusals += 1;
                l.refused(l.get());
            } else {
                l.inserted();
            }
        }
        assert!(
            refusals <= 2 * 200 / BodyLimit::FORGET_AFTER as usize + 3,
            "{refusals}"
        );
    }

    proptest! {
        /// Whatever the sequence of answers: the limit stays within [MIN, max], a 413 lowers it
        /// below the refused size, a success never lowers it, and enough successes restore max.
        #[test]
        fn body_limit_bounds(
            max in MIN_BODY_BYTES..4_000_000usize,
            events in prop::collection::vec(prop::option::of(0usize..5_000_000), 0..60),
        ) {
            let mut l = BodyLimit::new(max);
            for e in events {
                let before = l.get();
                match e {
                    Some(size) => {
                        l.refused(size);
                        prop_assert!(l.get() <= before);
                        prop_assert!(l.get() < size || l.get() == MIN_BODY_BYTES);
                    }
                    None => {
                        l.inserted();
                        prop_assert!(l.get() >= before);
                    }
                }
                prop_assert!((MIN_BODY_BYTES..=max).contains(&l.get()));
            }
            for _ in 0..(BodyLimit::FORGET_AFTER + 8) {
                l.inserted();
            }
            prop_assert_eq!(l.get(), max);
        }

        /// The prefix touches at most `max_days` days, and the next record would be one too many.
        #[test]
        fn days_prefix_is_the_longest_within_the_limit(
            ts in prop::collection::vec(0u64..(40 * DAY), 0..300),
            max_days in 1usize..10,
        ) {
            let n = prefix_within_days(ts.iter().copied(), max_days);
            let days = |k: usize| {
                let mut d: Vec<u64> = ts[..k].iter().map(|t| t / DAY).collect();
                d.sort();
                d.dedup();
                d.len()
            };
            prop_assert!(days(n) <= max_days);
            if n < ts.len() {
                prop_assert!(days(n + 1) > max_days);
            }
        }

        /// Halves of per-partition ordered `(partition, offset)` records are batches of their own:
        /// ranges that do not overlap and each hold exactly their half's records.
        #[test]
        fn halves_are_batches_of_their_own(
            items in prop::collection::vec((0i32..4, 1i64..4), 2..100),
        ) {
            let mut next = [0i64; 4];
            let records: Vec<(i32, i64)> = items
                .into_iter()
                .map(|(p, gap)| {
                    let o = next[p as usize];
                    next[p as usize] += gap;
                    (p, o)
                })
                .collect();
            let (a, b) = halves(records.clone());
            prop_assert!(!a.is_empty() && !b.is_empty());
            let ra = crate::batch::BatchRanges::covering(a.iter().copied()).unwrap();
            let rb = crate::batch::BatchRanges::covering(b.iter().copied()).unwrap();
            for &(p, o) in &records {
                prop_assert_eq!(ra.contains(p, o), a.contains(&(p, o)));
                prop_assert_eq!(rb.contains(p, o), b.contains(&(p, o)));
            }
        }
    }
}

#[cfg(test)]
pub(super) mod queue_tests {
    use super::*;
    use crate::config::ProducerSettings;
    use crate::loader::state::tests::queue_of;
    use crate::loader::state::{Batch, State};
    use crate::synth::TrafficModel;
    use std::collections::BTreeMap;

    /// Plans one batch from the queue, as the loader does (there off the runtime).
    pub(in crate::loader) fn plan_batch(
        st: &mut State,
        compression: BodyCompression,
        max_days: usize,
    ) {
        let planned = plan_prefix(&st.queue, st.sizing(), compression, max_days);
        st.take_planned(planned);
    }

    pub(super) fn requeue(st: &mut State, batch: Batch) {
        st.requeue_records(batch.records.unwrap_or_default());
    }

    #[test]
    fn planning_covers_every_offset_exactly_once_within_the_limit() {
        let mut st = queue_of(30_000, 4);
        let all: Vec<(i32, i64)> = st.queue.iter().map(|b| (b.partition, b.offset)).collect();
        let max = 64 * 1024;
        st.body_limit = BodyLimit::new(max);
        let mut seen = Vec::new();
        let mut previous_end: BTreeMap<i32, i64> = BTreeMap::new();
        while !st.queue.is_empty() {
            plan_batch(&mut st, BodyCompression::default(), usize::MAX);
            let batch = st.batches.pop_front().unwrap();
            let records = batch.records.unwrap();
            let refs: Vec<&AnonRecord> = records.iter().map(|b| &b.record).collect();
            let size = body::encode_body(&refs, BodyCompression::default()).len();
            assert!(size <= max, "{size} > {max}");
            if !st.queue.is_empty() {
                assert!(size as f64 > max as f64 * 0.9, "batch well filled: {size}");
            }
            for r in batch.ranges.ranges() {
                let prev = previous_end.insert(r.partition, r.end);
                assert!(
                    prev.is_none_or(|e| e <= r.start),
                    "ranges of one partition never overlap"
                );
            }
            for b in &records {
                assert!(batch.ranges.contains(b.partition, b.offset));
                seen.push((b.partition, b.offset));
            }
            st.bytes_per_row = size as f64 / records.len() as f64;
        }
        assert_eq!(seen, all, "every record once, in order");
    }

    #[test]
    fn planning_starts_ahead_of_the_slot_by_the_last_planning_time_and_some() {
        let slot = Duration::from_secs(64);
        assert_eq!(
            next_planning_lead(Duration::from_secs(2), slot),
            Duration::from_millis(3_250)
        );
        assert_eq!(
            next_planning_lead(Duration::ZERO, slot),
            Duration::from_millis(250)
        );
        // A very slow encode (a loaded machine) does not eat the slot.
        assert_eq!(
            next_planning_lead(Duration::from_secs(60), slot),
            Duration::from_secs(16)
        );
        // Short test spacings keep the same proportion.
        assert_eq!(
            next_planning_lead(Duration::from_secs(1), Duration::from_millis(200)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn a_batch_touches_at_most_max_days() {
        let mut st = queue_of(0, 1);
        let day = 86_400_000u64;
        for i in 0..30i64 {
            let mut r = TrafficModel::new(&ProducerSettings::default()).next_record(0);
            r.timestamp_epoch_milli = 1_700_000_000_000 + (i as u64 / 10) * day;
            let (bytes, _) =
                crate::anon_record::transform(&crate::record::encode_capnp(&r), 0, i, 48).unwrap();
            st.buffer(0, i, &bytes);
        }
        plan_batch(&mut st, BodyCompression::default(), 2);
        assert_eq!(
            st.batches[0].ranges.to_string(),
            "0:0-20",
            "two days of ten records"
        );
        assert_eq!(st.queue.len(), 10);
    }

    #[test]
    fn a_small_queue_goes_in_one_batch() {
        let mut st = queue_of(100, 3);
        plan_batch(&mut st, BodyCompression::default(), usize::MAX);
        assert!(st.queue.is_empty());
        assert_eq!(st.batches.len(), 1);
        assert_eq!(st.queued_bytes, 0);
        assert_eq!(st.batches[0].ranges.ranges().len(), 3);
    }
}

/// Property tests of batch planning: consecutive batches take every buffered record once, and a
/// batch's ranges hold exactly its records (a rebuild reads by ranges, so any other record inside
/// them would be loaded twice or lost).
#[cfg(test)]
mod queue_props {
    use super::queue_tests::{plan_batch, requeue};
    use super::*;
    use crate::anon_record;
    use crate::loader::state::State;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn anon(partition: i32, offset: i64, url_len: usize, resource: u64) -> AnonRecord {
        AnonRecord {
            version: 1,
            // Seven hours apart: a batch spans days, which planning bounds.
            timestamp_epoch_milli: 1_700_000_000_000 + offset.unsigned_abs() * 25_200_000,
            resource_id: resource,
            bytes_sent: offset.unsigned_abs().wrapping_mul(2_654_435_761),
            request_time_milli: 3,
            response_status: 200,
            cache_status: "HIT".into(),
            method: "GET".into(),
            remote_addr: "10.0.0.X".into(),
            // Varied, poorly compressible text so a few dozen rows fill a small body.
            url: {
                let mut x =
                    (offset as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ partition as u64;
                (0..url_len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        char::from(b'a' + (x % 26) as u8)
                    })
                    .collect()
            },
            source_partition: partition,
            source_offset: offset,
        }
    }

    /// Arrival order across partitions is arbitrary; within a partition offsets rise with gaps
    /// (transaction markers, aborted records).
    fn any_queue() -> impl Strategy<Value = Vec<(i32, i64, usize, u64)>> {
        prop::collection::vec((0i32..4, 1i64..4, 0usize..600, 0u64..5), 1..200).prop_map(|items| {
            let mut next = [0i64; 4];
            items
                .into_iter()
                .map(|(p, gap, url_len, resource)| {
                    let o = next[p as usize];
                    next[p as usize] += gap;
                    (p, o, url_len, resource)
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn consecutive_batches_cover_every_record_once(
            queue in any_queue(),
            limit in 4096usize..12_000,
            bytes_per_row in 1.0f64..500.0,
            too_large in prop::collection::vec(any::<bool>(), 8),
            max_days in prop_oneof![1usize..4, Just(usize::MAX)],
        ) {
            let mut st = State::new(limit, None);
            st.bytes_per_row = bytes_per_row;
            for &(p, o, url_len, resource) in &queue {
                let bytes = anon_record::encode(&anon(p, o, url_len, resource));
                st.buffer(p, o, &bytes);
            }
            let all: Vec<(i32, i64)> = queue.iter().map(|q| (q.0, q.1)).collect();
            let mut taken: Vec<(i32, i64)> = Vec::new();
            let mut previous_end: BTreeMap<i32, i64> = BTreeMap::new();
            let mut refusals = too_large.into_iter();
            while !st.queue.is_empty() {
                plan_batch(&mut st, BodyCompression::default(), max_days);
                prop_assert_eq!(st.batches.len(), 1);
                let mut days: Vec<u64> = st.batches[0]
                    .records
                    .iter()
                    .flatten()
                    .map(|b| b.record.timestamp_epoch_milli / 86_400_000)
                    .collect();
                days.sort();
                days.dedup();
                prop_assert!(days.len() <= max_days, "{} days", days.len());
                // Sometimes the proxy says 413: the loader re-plans smaller from the same queue.
                if refusals.next().unwrap_or(false) && st.body_limit.get() > 4096 {
                    let batch = st.batches.pop_front().unwrap();
                    let limit = st.body_limit.get();
                    st.body_limit.refused(limit);
                    requeue(&mut st, batch);
                    continue;
                }
                let batch = st.batches.pop_front().unwrap();
                let records = batch.records.unwrap();
                let refs: Vec<&AnonRecord> = records.iter().map(|b| &b.record).collect();
                let size = body::encode_body(&refs, BodyCompression::default()).len();
                prop_assert!(size <= st.body_limit.get() || records.len() == 1, "{} > {}", size, st.body_limit.get());
                let mine: Vec<(i32, i64)> = records.iter().map(|b| (b.partition, b.offset)).collect();
                // Exactly the records inside the ranges: none outside, no other inside.
                let inside: Vec<(i32, i64)> = all
                    .iter()
                    .copied()
                    .filter(|&(p, o)| batch.ranges.contains(p, o))
                    .collect();
                let mut sorted = mine.clone();
                sorted.sort();
                let mut inside_sorted = inside;
                inside_sorted.sort();
                prop_assert_eq!(&sorted, &inside_sorted, "ranges {}", batch.ranges);
                for r in batch.ranges.ranges() {
                    let prev = previous_end.insert(r.partition, r.end);
                    prop_assert!(prev.is_none_or(|e| e <= r.start), "overlap at {:?}", r);
                    // No gap: nothing of this partition between the last batch and this one.
                    let from = prev.unwrap_or(i64::MIN);
                    prop_assert!(
                        !all.iter().any(|&(p, o)| p == r.partition && from <= o && o < r.start),
                        "records of partition {} skipped before {:?}", r.partition, r
                    );
                }
                taken.extend(mine);
                prop_assert_eq!(st.queued_bytes, st.queue.iter().map(|b| b.bytes).sum::<usize>());
                st.bytes_per_row = size as f64 / records.len() as f64;
            }
            prop_assert_eq!(taken, all, "every record once, in arrival order");
            prop_assert_eq!(st.queued_bytes, 0);
        }
    }
}
