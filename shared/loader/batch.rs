//! Batches: which records one insert carries, described by per-partition offset ranges.
//!
//! The ranges are the batch's identity. They are written into the committed offsets' metadata
//! before the insert is sent; after any crash or rebalance, whoever owns a partition with such
//! metadata rebuilds the batch from exactly those ranges, so the body bytes and the
//! `insert_deduplication_token` come out identical and ClickHouse drops a copy that had landed.

use std::collections::BTreeMap;
use std::fmt;

/// Half-open offset range `[start, end)` of one partition of the anonymized topic. `end` is the
/// last included offset + 1, which is also the offset to commit once the batch has landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartitionRange {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

/// The offset ranges of one batch, sorted by partition, one range per partition at most.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BatchRanges(Vec<PartitionRange>);

/// Prefix of the committed-offset metadata that marks a pending batch.
const METADATA_PREFIX: &str = "edgelog.batch.v1;";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad batch metadata {text:?}: {why}")]
pub struct ParseError {
    text: String,
    why: &'static str,
}

impl BatchRanges {
    /// Builds from ranges in any order; rejects empty or overlapping descriptions.
    pub fn new(mut ranges: Vec<PartitionRange>) -> Option<BatchRanges> {
        ranges.sort();
        let ok = !ranges.is_empty()
            && ranges.iter().all(|r| r.start >= 0 && r.start < r.end)
            && ranges.windows(2).all(|w| w[0].partition != w[1].partition);
        ok.then_some(BatchRanges(ranges))
    }

    /// The ranges covering `(partition, offset)` pairs: from each partition's first offset to its
    /// last + 1. The caller guarantees the pairs are a contiguous prefix of each partition as read.
    pub fn covering(records: impl IntoIterator<Item = (i32, i64)>) -> Option<BatchRanges> {
        let mut bounds: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for (p, o) in records {
            let e = bounds.entry(p).or_insert((o, o));
            e.0 = e.0.min(o);
            e.1 = e.1.max(o);
        }
        BatchRanges::new(
            bounds
                .into_iter()
                .map(|(partition, (lo, hi))| PartitionRange {
                    partition,
                    start: lo,
                    end: hi + 1,
                })
                .collect(),
        )
    }

    pub fn ranges(&self) -> &[PartitionRange] {
        &self.0
    }

    pub fn get(&self, partition: i32) -> Option<PartitionRange> {
        self.0.iter().copied().find(|r| r.partition == partition)
    }

    pub fn contains(&self, partition: i32, offset: i64) -> bool {
        self.get(partition)
            .is_some_and(|r| r.start <= offset && offset < r.end)
    }

    /// Number of offsets spanned (an upper bound of the records: transaction markers and aborted
    /// records occupy offsets too).
    pub fn span(&self) -> i64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }

    /// Text stored as offset-commit metadata on every partition of the batch.
    pub fn to_metadata(&self) -> String {
        format!("{METADATA_PREFIX}{self}")
    }

    /// `Ok(None)` for metadata that is not a pending batch (empty, or someone else's).
    pub fn from_metadata(text: &str) -> Result<Option<BatchRanges>, ParseError> {
        let Some(body) = text.strip_prefix(METADATA_PREFIX) else {
            return Ok(None);
        };
        let bad = |why| ParseError {
            text: text.to_string(),
            why,
        };
        let mut ranges = Vec::new();
        for item in body.split(',') {
            let (p, span) = item.split_once(':').ok_or(bad("missing ':'"))?;
            let (s, e) = span.split_once('-').ok_or(bad("missing '-'"))?;
            ranges.push(PartitionRange {
                partition: p.parse().map_err(|_| bad("partition is not an integer"))?,
                start: s.parse().map_err(|_| bad("start is not an integer"))?,
                end: e.parse().map_err(|_| bad("end is not an integer"))?,
            });
        }
        BatchRanges::new(ranges)
            .map(Some)
            .ok_or(bad("empty, inverted or overlapping ranges"))
    }

    /// `insert_deduplication_token`: a UUIDv5 of the topic and the ranges. Same ranges, same token,
    /// whichever instance rebuilds the batch.
    pub fn dedup_token(&self, topic: &str) -> String {
        let name = format!("{topic};{self}");
        uuid::Uuid::new_v5(&TOKEN_NAMESPACE, name.as_bytes()).to_string()
    }
}

/// Namespace of the dedup-token UUIDs (a fixed random UUID; changing it changes every token).
const TOKEN_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1c_2b1e_9d1a_4d7e_8a53_0c7b_e2f4_a901);

impl fmt::Display for BatchRanges {
    /// Canonical text: `partition:start-end` joined by `,`, sorted by partition.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}-{}", r.partition, r.start, r.end)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(partition: i32, start: i64, end: i64) -> PartitionRange {
        PartitionRange {
            partition,
            start,
            end,
        }
    }

    #[test]
    fn covering_takes_first_to_last_plus_one() {
        let b = BatchRanges::covering([(2, 10), (0, 5), (2, 11), (2, 14), (0, 6)]).unwrap();
        assert_eq!(b.ranges(), &[r(0, 5, 7), r(2, 10, 15)]);
        assert!(b.contains(2, 14) && !b.contains(2, 15) && !b.contains(1, 0));
        assert_eq!(b.span(), 7);
        assert!(BatchRanges::covering([]).is_none());
    }

    #[test]
    fn metadata_round_trips() {
        let b = BatchRanges::new(vec![r(3, 7, 99), r(0, 100, 250)]).unwrap();
        assert_eq!(b.to_metadata(), "edgelog.batch.v1;0:100-250,3:7-99");
        assert_eq!(
            BatchRanges::from_metadata(&b.to_metadata()).unwrap(),
            Some(b)
        );
        assert_eq!(BatchRanges::from_metadata("").unwrap(), None);
        assert_eq!(
            BatchRanges::from_metadata("other tool's note").unwrap(),
            None
        );
    }

    #[test]
    fn bad_metadata_is_an_error_not_a_batch() {
        for text in [
            "edgelog.batch.v1;",
            "edgelog.batch.v1;0:5",
            "edgelog.batch.v1;x:1-2",
            "edgelog.batch.v1;0:9-3",
            "edgelog.batch.v1;0:1-3,0:3-5",
            "edgelog.batch.v1;0:-1-3",
        ] {
            assert!(BatchRanges::from_metadata(text).is_err(), "{text}");
        }
    }

    #[test]
    fn token_depends_on_ranges_and_topic_only() {
        let a = BatchRanges::new(vec![r(0, 1, 5), r(1, 2, 3)]).unwrap();
        let same = BatchRanges::new(vec![r(1, 2, 3), r(0, 1, 5)]).unwrap();
        let other = BatchRanges::new(vec![r(0, 1, 6), r(1, 2, 3)]).unwrap();
        assert_eq!(a.dedup_token("t"), same.dedup_token("t"));
        assert_ne!(a.dedup_token("t"), other.dedup_token("t"));
        assert_ne!(a.dedup_token("t"), a.dedup_token("u"));
        assert_eq!(a.dedup_token("t").len(), 36);
    }

    #[test]
    fn metadata_fits_kafkas_default_limit_for_many_partitions() {
        let b = BatchRanges::new(
            (0..100)
                .map(|p| r(p, 1 << 40, (1 << 40) + 1_000_000))
                .collect(),
        )
        .unwrap();
        assert!(
            b.to_metadata().len() < 4096,
            "offset.metadata.max.bytes defaults to 4096"
        );
    }
}
