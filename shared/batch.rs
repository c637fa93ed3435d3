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
pub const METADATA_PREFIX: &str = "edgelog.batch.v1;";

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

/// Prefix of version 2 of the metadata: the anonymized topic's id, then the ranges.
pub const METADATA_PREFIX_V2: &str = "edgelog.batch.v2;";

/// A batch's identity: the offset ranges and the incarnation of the topic they index. Offsets
/// start again at 0 when a topic is deleted and created again (or a deployment moves to another
/// cluster), so ranges alone could repeat a token ClickHouse still remembers and a new batch would
/// be dropped as its duplicate. Version 2 binds the token to the topic's id (see
/// [`crate::topic_id`]); version 1 (no id) is what batches recorded before it carry, and keeps
/// its own token so that an upgrade finishes such a batch with the token it was first sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchId {
    pub ranges: BatchRanges,
    /// `None`: a version-1 batch.
    pub topic_id: Option<String>,
}

impl BatchId {
    /// A new (version 2) batch of the topic with id `topic_id`.
    pub fn new(ranges: BatchRanges, topic_id: &str) -> BatchId {
        BatchId {
            ranges,
            topic_id: Some(topic_id.to_string()),
        }
    }

    /// Text stored as offset-commit metadata on every partition of the batch.
    pub fn to_metadata(&self) -> String {
        match &self.topic_id {
            None => self.ranges.to_metadata(),
            Some(id) => format!("{METADATA_PREFIX_V2}{id};{}", self.ranges),
        }
    }

    /// True if `text` describes a pending batch of either version (valid or not).
    pub fn is_pending(text: &str) -> bool {
        text.starts_with(METADATA_PREFIX) || text.starts_with(METADATA_PREFIX_V2)
    }

    /// `Ok(None)` for metadata that is not a pending batch (empty, or someone else's).
    pub fn from_metadata(text: &str) -> Result<Option<BatchId>, ParseError> {
        let Some(rest) = text.strip_prefix(METADATA_PREFIX_V2) else {
            return Ok(BatchRanges::from_metadata(text)?.map(|ranges| BatchId {
                ranges,
                topic_id: None,
            }));
        };
        let bad = |why| ParseError {
            text: text.to_string(),
            why,
        };
        let (id, ranges) = rest.split_once(';').ok_or(bad("missing topic id"))?;
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_+/=".contains(&b))
        {
            return Err(bad("topic id is not base64"));
        }
        let ranges = BatchRanges::from_metadata(&format!("{METADATA_PREFIX}{ranges}"))
            .map_err(|e| bad(e.why))?
            .ok_or(bad("no ranges"))?;
        Ok(Some(BatchId::new(ranges, id)))
    }

    /// `insert_deduplication_token`: a UUIDv5 of the topic name, its id (version 2) and the
    /// ranges. The same batch gives the same token whichever instance rebuilds it.
    pub fn dedup_token(&self, topic: &str) -> String {
        match &self.topic_id {
            None => self.ranges.dedup_token(topic),
            Some(id) => {
                let name = format!("{topic};{id};{}", self.ranges);
                uuid::Uuid::new_v5(&TOKEN_NAMESPACE, name.as_bytes()).to_string()
            }
        }
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.ranges, f)
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
    fn version_2_binds_the_token_to_the_topic_id_and_keeps_version_1_tokens() {
        let ranges = BatchRanges::new(vec![r(0, 1, 5), r(1, 2, 3)]).unwrap();
        let v2 = BatchId::new(ranges.clone(), "q0tVAdSgTqWZLH3SVZ1ywA");
        assert_eq!(
            v2.to_metadata(),
            "edgelog.batch.v2;q0tVAdSgTqWZLH3SVZ1ywA;0:1-5,1:2-3"
        );
        assert_eq!(
            BatchId::from_metadata(&v2.to_metadata()).unwrap(),
            Some(v2.clone())
        );
        let recreated = BatchId::new(ranges.clone(), "Zm9vYmFyYmF6cXV4cXV1eA");
        assert_ne!(v2.dedup_token("t"), recreated.dedup_token("t"));
        // A batch recorded by the previous version is finished with the token it was sent with.
        let v1 = BatchId::from_metadata(&ranges.to_metadata())
            .unwrap()
            .unwrap();
        assert_eq!(v1.topic_id, None);
        assert_eq!(v1.dedup_token("t"), ranges.dedup_token("t"));
        assert_eq!(
            v1.dedup_token("t"),
            "3a67865b-8985-5881-a540-8afa9f2a9a6a",
            "version-1 tokens never change"
        );
        assert!(BatchId::is_pending(&v1.to_metadata()) && BatchId::is_pending(&v2.to_metadata()));
        assert_eq!(BatchId::from_metadata("").unwrap(), None);
        for text in [
            "edgelog.batch.v2;",
            "edgelog.batch.v2;0:1-5",
            "edgelog.batch.v2;;0:1-5",
            "edgelog.batch.v2;a b;0:1-5",
            "edgelog.batch.v2;abc;",
            "edgelog.batch.v2;abc;0:5-1",
        ] {
            assert!(BatchId::from_metadata(text).is_err(), "{text}");
        }
    }

    #[test]
    fn metadata_fits_kafkas_default_limit_for_many_partitions() {
        let b = BatchRanges::new(
            (0..100)
                .map(|p| r(p, 1 << 40, (1 << 40) + 1_000_000))
                .collect(),
        )
        .unwrap();
        let v2 = BatchId::new(b, "q0tVAdSgTqWZLH3SVZ1ywA");
        assert!(
            v2.to_metadata().len() < 4096,
            "offset.metadata.max.bytes defaults to 4096"
        );
    }
}

/// Property tests: planning by ranges covers every offset, the metadata text round-trips and the
/// token is a function of the ranges alone.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Records as `(partition, offset)`: few partitions so they share ranges, offsets anywhere a
    /// Kafka offset can be (Kafka never reaches `i64::MAX`: `end` = last + 1 must fit).
    fn any_records() -> impl Strategy<Value = Vec<(i32, i64)>> {
        let partition = prop_oneof![0i32..4, any::<i32>()];
        let offset = prop_oneof![0i64..50, 0..i64::MAX - 1];
        prop::collection::vec((partition, offset), 1..60)
    }

    fn any_ranges() -> impl Strategy<Value = BatchRanges> {
        any_records().prop_map(|r| BatchRanges::covering(r).expect("non-empty, valid offsets"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn covering_contains_every_record_and_is_the_tightest(records in any_records()) {
            let b = BatchRanges::covering(records.iter().copied()).unwrap();
            for &(p, o) in &records {
                prop_assert!(b.contains(p, o), "{}:{} not in {}", p, o, b);
            }
            let partitions: BTreeSet<i32> = records.iter().map(|r| r.0).collect();
            prop_assert_eq!(b.ranges().len(), partitions.len());
            for r in b.ranges() {
                let offsets = records.iter().filter(|x| x.0 == r.partition).map(|x| x.1);
                prop_assert_eq!(r.start, offsets.clone().min().unwrap());
                prop_assert_eq!(r.end, offsets.max().unwrap() + 1);
            }
            // Order of arrival does not matter.
            let mut reversed = records.clone();
            reversed.reverse();
            prop_assert_eq!(BatchRanges::covering(reversed).unwrap(), b);
        }

        #[test]
        fn metadata_round_trips(b in any_ranges()) {
            let text = b.to_metadata();
            prop_assert!(text.starts_with(METADATA_PREFIX));
            prop_assert_eq!(BatchRanges::from_metadata(&text).unwrap(), Some(b));
        }

        /// Whatever the committed metadata holds (another tool's note, a corrupted text), parsing
        /// does not panic, and anything accepted describes valid ranges.
        #[test]
        fn arbitrary_metadata_parses_or_errs(
            tail in prop_oneof![any::<String>(), "[0-9:,+-]{0,40}"],
            prefixed in any::<bool>(),
        ) {
            let text = if prefixed { format!("{METADATA_PREFIX}{tail}") } else { tail };
            if let Ok(Some(b)) = BatchRanges::from_metadata(&text) {
                prop_assert!(b.ranges().iter().all(|r| 0 <= r.start && r.start < r.end));
                prop_assert_eq!(BatchRanges::from_metadata(&b.to_metadata()).unwrap(), Some(b));
            }
        }

        #[test]
        fn dedup_token_is_a_function_of_the_ranges(
            a in any_records(),
            b in any_records(),
            topic in "[a-z_]{1,12}",
        ) {
            let ra = BatchRanges::covering(a.iter().copied()).unwrap();
            let rb = BatchRanges::covering(b.iter().copied()).unwrap();
            // Same ranges built another way (shuffled ranges through `new`) give the same token.
            let mut shuffled = ra.ranges().to_vec();
            shuffled.reverse();
            let same = BatchRanges::new(shuffled).unwrap();
            prop_assert_eq!(ra.dedup_token(&topic), same.dedup_token(&topic));
            prop_assert_eq!(ra == rb, ra.dedup_token(&topic) == rb.dedup_token(&topic));
        }

        /// Neighbouring ranges (one offset more or less on one partition) get different tokens:
        /// random pairs of range sets almost never collide, so test the near misses directly.
        #[test]
        fn dedup_token_changes_with_any_bound(b in any_ranges(), which in any::<prop::sample::Index>(), grow in any::<bool>()) {
            let mut ranges = b.ranges().to_vec();
            let i = which.index(ranges.len());
            let r = &mut ranges[i];
            if grow { r.end += 1 } else if r.end - r.start > 1 { r.end -= 1 } else { r.start += 1; r.end += 1 }
            let changed = BatchRanges::new(ranges).unwrap();
            prop_assert_ne!(&changed, &b);
            prop_assert_ne!(changed.dedup_token("t"), b.dedup_token("t"));
        }
    }
}
