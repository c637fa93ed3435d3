//! Pure planning rules of the loader: how many days one insert may touch, how a batch that cannot
//! pass is split, and how the body limit follows the proxy's 413s.

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
