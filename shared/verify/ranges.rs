//! Sets of Kafka offsets as sorted runs, so an audit of millions of offsets compares a handful of
//! ranges instead of millions of numbers.

use std::fmt;

/// A set of offsets: sorted, disjoint, non-adjacent inclusive runs `(first, last)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetSet {
    runs: Vec<(i64, i64)>,
}

impl OffsetSet {
    pub fn new() -> OffsetSet {
        OffsetSet::default()
    }

    /// From runs in any order, overlapping or not.
    pub fn from_runs(runs: impl IntoIterator<Item = (i64, i64)>) -> OffsetSet {
        let mut runs: Vec<(i64, i64)> = runs.into_iter().filter(|(a, b)| a <= b).collect();
        runs.sort_unstable();
        let mut set = OffsetSet::new();
        for (first, last) in runs {
            set.push_run(first, last);
        }
        set
    }

    /// `[start, end)`, the way Kafka positions are written.
    pub fn span(start: i64, end: i64) -> OffsetSet {
        OffsetSet::from_runs([(start, end - 1)])
    }

    /// Adds one offset. Cheap when offsets come in ascending order (reading a partition).
    pub fn insert(&mut self, offset: i64) {
        match self.runs.last_mut() {
            Some((_, last)) if offset == *last + 1 => *last = offset,
            Some((first, last)) if (*first..=*last).contains(&offset) => {}
            Some((_, last)) if offset < *last => {
                let merged = OffsetSet::from_runs(self.runs.drain(..).chain([(offset, offset)]));
                *self = merged;
            }
            _ => self.runs.push((offset, offset)),
        }
    }

    /// Appends a run that starts at or after the start of the last one.
    fn push_run(&mut self, first: i64, last: i64) {
        match self.runs.last_mut() {
            Some((_, end)) if first <= *end + 1 => *end = (*end).max(last),
            _ => self.runs.push((first, last)),
        }
    }

    pub fn runs(&self) -> &[(i64, i64)] {
        &self.runs
    }

    /// Number of offsets.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|(a, b)| (b - a + 1) as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn union(&self, other: &OffsetSet) -> OffsetSet {
        OffsetSet::from_runs(self.runs.iter().chain(&other.runs).copied())
    }

    /// Offsets in `self` and not in `other`.
    pub fn difference(&self, other: &OffsetSet) -> OffsetSet {
        let mut out = OffsetSet::new();
        let mut j = 0;
        for &(first, last) in &self.runs {
            let mut from = first;
            while j < other.runs.len() && other.runs[j].1 < from {
                j += 1;
            }
            let mut k = j;
            while from <= last && k < other.runs.len() && other.runs[k].0 <= last {
                let (cut_first, cut_last) = other.runs[k];
                if cut_first > from {
                    out.push_run(from, cut_first - 1);
                }
                from = from.max(cut_last.saturating_add(1));
                k += 1;
            }
            if from <= last {
                out.push_run(from, last);
            }
        }
        out
    }

    /// Offsets in both.
    pub fn intersection(&self, other: &OffsetSet) -> OffsetSet {
        let mut out = OffsetSet::new();
        let (mut i, mut j) = (0, 0);
        while i < self.runs.len() && j < other.runs.len() {
            let (a0, a1) = self.runs[i];
            let (b0, b1) = other.runs[j];
            let (first, last) = (a0.max(b0), a1.min(b1));
            if first <= last {
                out.push_run(first, last);
            }
            if a1 < b1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        out
    }
}

/// At most this many runs are written out; an audit report stays readable when everything is off.
const SHOWN_RUNS: usize = 8;

impl fmt::Display for OffsetSet {
    /// `0-99, 200, 300-301`, then `… (+N more runs)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (first, last)) in self.runs.iter().take(SHOWN_RUNS).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        if self.runs.len() > SHOWN_RUNS {
            write!(f, " … (+{} more runs)", self.runs.len() - SHOWN_RUNS)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn set(runs: &[(i64, i64)]) -> OffsetSet {
        OffsetSet::from_runs(runs.iter().copied())
    }

    fn members(s: &OffsetSet) -> BTreeSet<i64> {
        s.runs().iter().flat_map(|&(a, b)| a..=b).collect()
    }

    #[test]
    fn runs_are_merged_and_counted() {
        let s = set(&[(5, 9), (0, 2), (3, 3), (8, 12), (20, 20)]);
        assert_eq!(s.runs(), &[(0, 3), (5, 12), (20, 20)]);
        assert_eq!(s.len(), 4 + 8 + 1);
        assert_eq!(s.to_string(), "0-3, 5-12, 20");
    }

    #[test]
    fn insert_in_order_builds_runs_and_out_of_order_still_merges() {
        let mut s = OffsetSet::new();
        for o in [0, 1, 2, 4, 5, 9] {
            s.insert(o);
        }
        assert_eq!(s.runs(), &[(0, 2), (4, 5), (9, 9)]);
        s.insert(3);
        s.insert(5);
        assert_eq!(s.runs(), &[(0, 5), (9, 9)]);
    }

    #[test]
    fn difference_and_intersection_match_set_arithmetic() {
        let a = set(&[(0, 10), (20, 30), (40, 40), (50, 60)]);
        let b = set(&[(-5, 0), (5, 6), (10, 22), (29, 45), (55, 55), (70, 80)]);
        let (ma, mb) = (members(&a), members(&b));
        assert_eq!(
            members(&a.difference(&b)),
            ma.difference(&mb).copied().collect()
        );
        assert_eq!(
            members(&b.difference(&a)),
            mb.difference(&ma).copied().collect()
        );
        assert_eq!(
            members(&a.intersection(&b)),
            ma.intersection(&mb).copied().collect()
        );
        assert_eq!(members(&a.union(&b)), ma.union(&mb).copied().collect());
        assert_eq!(a.difference(&a), OffsetSet::new());
        assert_eq!(a.difference(&OffsetSet::new()), a);
    }

    #[test]
    fn a_long_list_is_cut_short() {
        let s = OffsetSet::from_runs((0..20).map(|i| (i * 10, i * 10)));
        assert_eq!(
            s.to_string(),
            "0, 10, 20, 30, 40, 50, 60, 70 … (+12 more runs)"
        );
        assert_eq!(OffsetSet::span(3, 3), OffsetSet::new());
        assert_eq!(OffsetSet::span(3, 5).runs(), &[(3, 4)]);
    }
}
