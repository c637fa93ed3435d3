//! A batch the proxy (413) or ClickHouse (a value, too many partitions) refused for what it
//! holds: it will never pass as it is, so it is replaced by smaller batches, down to one record,
//! which is quarantined. A pure decision on the loader's state; the caller does the I/O.
//!
//! Two rules keep it exactly-once:
//! - Only this loader's partitions are re-planned. An inherited batch may span partitions another
//!   loader owns now; that loader finishes its own part (it found the same batch in its metadata).
//! - The replaced batch's commit metadata must not outlive it: a crash would have the next owner
//!   rebuild it whole and send records a smaller batch already loaded, under another token. So
//!   its partitions are queued for release: the next recording clears the metadata of every one
//!   it does not overwrite, in the same offset commit (see `Offsets::record`).

use super::plan::halves;
use super::state::{Batch, Buffered, State};
use crate::batch::{BatchId, BatchRanges};

/// Why the batch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The proxy's 413 for a body of this many bytes.
    TooLarge { size: usize },
    /// ClickHouse refused the content (`Outcome::Rejected`).
    Rejected,
}

/// What the caller does next.
pub(super) enum Next {
    /// None of its records are on this loader's partitions: commit this loader's partitions of it
    /// as done (they hold nothing to load) and leave the rest to their owners.
    NotOurs(Batch),
    /// One record, refused on its own: quarantine it, then commit past it.
    Quarantine(Batch),
    /// Smaller batches are queued (at the front of the batches, or back in the record queue).
    Replanned,
}

/// Replaces a refused `batch` (already removed from `st.batches`; its records are built).
pub(super) fn replace_refused(st: &mut State, batch: Batch, refusal: Refusal) -> Next {
    let Batch {
        ranges,
        topic_id,
        records,
        recorded,
        ..
    } = batch;
    let records = records.expect("a refused batch was sent, so built");
    let total = records.len();
    let owned: Vec<Buffered> = records
        .into_iter()
        .filter(|b| st.assigned.contains(&b.partition))
        .collect();
    if owned.is_empty() {
        return Next::NotOurs(Batch::recorded(BatchId { ranges, topic_id }));
    }
    if owned.len() == total && total == 1 {
        return Next::Quarantine(Batch {
            ranges,
            topic_id,
            records: Some(owned),
            recorded,
            body: None,
        });
    }
    if recorded {
        release(st, &ranges);
    }
    if owned.len() < total {
        // Other loaders' records may be what was refused: try ours alone before judging them.
        st.batches
            .push_front(Batch::planned(owned, st.topic_id.clone()));
        return Next::Replanned;
    }
    if let Refusal::TooLarge { size } = refusal {
        st.body_limit.refused(size);
        if st.batches.is_empty() {
            // Nothing after it but the queue, whose records follow it on every partition:
            // re-plan from the queue, as large as the lowered limit allows.
            st.requeue_records(owned);
            return Next::Replanned;
        }
        // Batches wait behind it: re-queued records would go after them and break the order
        // commits need (each partition's offset only moves past what is loaded). Halve instead.
    }
    let (first, second) = halves(owned);
    st.batches
        .push_front(Batch::planned(second, st.topic_id.clone()));
    st.batches
        .push_front(Batch::planned(first, st.topic_id.clone()));
    Next::Replanned
}

/// Queues this loader's partitions of a replaced, recorded batch for release.
fn release(st: &mut State, ranges: &BatchRanges) {
    for r in ranges.ranges() {
        if st.assigned.contains(&r.partition) {
            st.release.retain(|old| old.partition != r.partition);
            st.release.push(*r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anon_record::AnonRecord;
    use crate::batch::PartitionRange;

    fn buffered(partition: i32, offset: i64) -> Buffered {
        Buffered {
            partition,
            offset,
            record: AnonRecord {
                version: 1,
                timestamp_epoch_milli: 1_700_000_000_000,
                resource_id: 1,
                bytes_sent: 1,
                request_time_milli: 1,
                response_status: 200,
                cache_status: "HIT".into(),
                method: "GET".into(),
                remote_addr: "1.2.3.X".into(),
                url: format!("/{partition}/{offset}"),
                source_partition: partition,
                source_offset: offset,
            },
            bytes: 100,
        }
    }

    fn batch(records: &[(i32, i64)], recorded: bool) -> Batch {
        let mut b = Batch::planned(records.iter().map(|&(p, o)| buffered(p, o)).collect(), None);
        b.recorded = recorded;
        b
    }

    fn state(assigned: &[i32]) -> State {
        State {
            assigned: assigned.to_vec(),
            body_limit: super::super::plan::BodyLimit::new(1_000_000),
            ..State::default()
        }
    }

    fn positions(b: &Batch) -> Vec<(i32, i64)> {
        b.records
            .iter()
            .flatten()
            .map(|b| (b.partition, b.offset))
            .collect()
    }

    #[test]
    fn a_rejected_batch_is_bisected_and_its_metadata_released() {
        let mut st = state(&[0, 1]);
        let b = batch(&[(0, 5), (1, 3), (0, 6), (1, 4), (0, 8)], true);
        assert!(matches!(
            replace_refused(&mut st, b, Refusal::Rejected),
            Next::Replanned
        ));
        assert_eq!(st.batches.len(), 2);
        assert_eq!(positions(&st.batches[0]), vec![(0, 5), (1, 3)]);
        assert_eq!(positions(&st.batches[1]), vec![(0, 6), (1, 4), (0, 8)]);
        assert_eq!(st.batches[0].ranges.to_string(), "0:5-6,1:3-4");
        assert_eq!(st.batches[1].ranges.to_string(), "0:6-9,1:4-5");
        assert!(!st.batches[0].recorded && !st.batches[1].recorded);
        assert_eq!(
            st.release,
            vec![
                PartitionRange {
                    partition: 0,
                    start: 5,
                    end: 9
                },
                PartitionRange {
                    partition: 1,
                    start: 3,
                    end: 5
                }
            ]
        );
    }

    #[test]
    fn a_single_refused_record_is_quarantined() {
        for refusal in [Refusal::Rejected, Refusal::TooLarge { size: 2_000_000 }] {
            let mut st = state(&[0]);
            match replace_refused(&mut st, batch(&[(0, 7)], true), refusal) {
                Next::Quarantine(b) => assert_eq!(positions(&b), vec![(0, 7)]),
                _ => panic!("quarantined"),
            }
            assert!(st.batches.is_empty() && st.queue.is_empty() && st.release.is_empty());
            assert_eq!(
                st.body_limit.get(),
                1_000_000,
                "one record says nothing of the proxy"
            );
        }
    }

    #[test]
    fn a_413_requeues_smaller_and_lowers_the_limit() {
        let mut st = state(&[0]);
        let b = batch(&[(0, 1), (0, 2), (0, 3)], true);
        assert!(matches!(
            replace_refused(&mut st, b, Refusal::TooLarge { size: 900_000 }),
            Next::Replanned
        ));
        assert_eq!(st.queue.len(), 3);
        assert_eq!(st.queued_bytes, 300);
        assert_eq!(st.body_limit.get(), 675_000);
        assert_eq!(st.release.len(), 1);
    }

    #[test]
    fn a_413_with_batches_behind_halves_to_keep_the_order() {
        let mut st = state(&[0]);
        st.batches.push_back(batch(&[(0, 9)], false));
        let b = batch(&[(0, 1), (0, 2), (0, 3)], true);
        assert!(matches!(
            replace_refused(&mut st, b, Refusal::TooLarge { size: 900_000 }),
            Next::Replanned
        ));
        assert!(st.queue.is_empty(), "not behind the waiting batch");
        let order: Vec<Vec<(i32, i64)>> = st.batches.iter().map(positions).collect();
        assert_eq!(
            order,
            vec![vec![(0, 1)], vec![(0, 2), (0, 3)], vec![(0, 9)]]
        );
        assert_eq!(st.body_limit.get(), 675_000);
    }

    #[test]
    fn an_inherited_batch_is_re_planned_over_our_partitions_only() {
        // Partition 1 now belongs to another loader, which finishes its own part.
        let mut st = state(&[0, 2]);
        let b = batch(&[(0, 5), (1, 3), (2, 9), (1, 4), (0, 6)], true);
        assert!(matches!(
            replace_refused(&mut st, b, Refusal::TooLarge { size: 900_000 }),
            Next::Replanned
        ));
        assert_eq!(st.batches.len(), 1, "ours, tried alone first");
        assert_eq!(positions(&st.batches[0]), vec![(0, 5), (2, 9), (0, 6)]);
        assert!(st.queue.is_empty());
        assert!(
            st.release.iter().all(|r| r.partition != 1),
            "never touch theirs"
        );
        assert_eq!(
            st.body_limit.get(),
            1_000_000,
            "their records may have been the large ones"
        );

        // Only their records: nothing for us to send.
        let mut st = state(&[0]);
        let b = batch(&[(1, 3), (1, 4)], true);
        assert!(matches!(
            replace_refused(&mut st, b, Refusal::Rejected),
            Next::NotOurs(_)
        ));
        assert!(st.batches.is_empty() && st.release.is_empty());
    }

    /// Whole runs: batches planned from a queue, some refused (413 at random, rejected whenever
    /// they hold a poison record), replaced, recorded and loaded. Every good record is loaded
    /// once, every poison record quarantined once, and at every step the commit metadata names
    /// only batches holding nothing already loaded (what a crash there would rebuild and send).
    mod props {
        use super::*;
        use crate::body::BodyCompression;
        use crate::loader::plan::queue_tests::plan_batch;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn refusals_never_lose_duplicate_or_leave_stale_metadata(
                items in prop::collection::vec((0i32..3, 1i64..3, any::<bool>()), 1..40),
                poison_rate in 0u8..4,
                too_large in prop::collection::vec(any::<bool>(), 64),
            ) {
                let mut st = state(&[0, 1, 2]);
                let mut next = [0i64; 3];
                let mut good = Vec::new();
                let mut poison = Vec::new();
                for (i, &(p, gap, coin)) in items.iter().enumerate() {
                    let o = next[p as usize];
                    next[p as usize] += gap;
                    let bad = coin && (i as u8 % 4) < poison_rate;
                    let mut b = buffered(p, o);
                    if bad {
                        b.record.url = "/poison".into();
                        poison.push((p, o));
                    } else {
                        good.push((p, o));
                    }
                    st.buffer(p, o, &crate::anon_record::encode(&b.record));
                }
                let mut metadata: BTreeMap<i32, BatchRanges> = BTreeMap::new();
                let mut committed: BTreeMap<i32, i64> = BTreeMap::new();
                let mut loaded: Vec<(i32, i64)> = Vec::new();
                let mut quarantined: Vec<(i32, i64)> = Vec::new();
                let mut refusals = too_large.into_iter().cycle();
                let mut steps = 0;
                while !st.queue.is_empty() || !st.batches.is_empty() {
                    steps += 1;
                    prop_assert!(steps < 2_000, "no progress");
                    if st.batches.is_empty() {
                        plan_batch(&mut st, BodyCompression::Zstd, usize::MAX);
                    }
                    let mut batch = st.batches.pop_front().unwrap();
                    if !batch.recorded {
                        // What `Offsets::record` commits.
                        let mut commits = Vec::new();
                        for r in std::mem::take(&mut st.release) {
                            if batch.ranges.get(r.partition).is_none() {
                                metadata.remove(&r.partition);
                                commits.push((r.partition, r.start));
                            }
                        }
                        for r in batch.ranges.ranges() {
                            metadata.insert(r.partition, batch.ranges.clone());
                            commits.push((r.partition, r.start));
                        }
                        for (p, o) in commits {
                            let before = committed.insert(p, o).unwrap_or(0);
                            prop_assert!(before <= o, "partition {} committed back from {} to {}", p, before, o);
                        }
                        batch.recorded = true;
                    }
                    for (p, m) in &metadata {
                        prop_assert!(
                            !loaded.iter().any(|&(lp, lo)| m.contains(lp, lo)),
                            "partition {}'s metadata {} would re-send loaded records", p, m
                        );
                    }
                    let positions = positions(&batch);
                    let next = if positions.iter().any(|x| poison.contains(x)) {
                        Some(Refusal::Rejected)
                    } else if positions.len() > 1 && refusals.next().unwrap() {
                        // (A 413 for one record alone is quarantined, by design: not simulated.)
                        Some(Refusal::TooLarge { size: st.body_limit.get() })
                    } else {
                        None
                    };
                    let done = match next {
                        None => {
                            loaded.extend(positions);
                            Some(batch.ranges.clone())
                        }
                        Some(refusal) => match replace_refused(&mut st, batch, refusal) {
                            Next::Quarantine(b) => {
                                quarantined.extend(super::positions(&b));
                                Some(b.ranges)
                            }
                            Next::NotOurs(_) => panic!("every partition is ours"),
                            Next::Replanned => None,
                        },
                    };
                    if let Some(ranges) = done {
                        // What `Offsets::finish` commits.
                        for r in ranges.ranges() {
                            metadata.remove(&r.partition);
                            let before = committed.insert(r.partition, r.end).unwrap_or(0);
                            prop_assert!(before <= r.end, "partition {} committed back", r.partition);
                        }
                        // Everything below a committed offset is loaded or quarantined.
                        for &(p, o) in good.iter().chain(&poison) {
                            if committed.get(&p).is_some_and(|&c| o < c) {
                                prop_assert!(
                                    loaded.contains(&(p, o)) || quarantined.contains(&(p, o)),
                                    "{}:{} committed past but never loaded", p, o
                                );
                            }
                        }
                    }
                }
                let mut sorted = loaded.clone();
                sorted.sort();
                sorted.dedup();
                prop_assert_eq!(sorted.len(), loaded.len(), "loaded twice");
                good.sort();
                prop_assert_eq!(sorted, good);
                quarantined.sort();
                poison.sort();
                prop_assert_eq!(quarantined, poison);
                prop_assert!(metadata.is_empty(), "stale metadata left: {:?}", metadata);
            }
        }
    }
}
