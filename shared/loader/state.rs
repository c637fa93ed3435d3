//! What the loader holds between two steps: the records read and not yet in a batch, the batches
//! to finish, and what it learned about sizes. In memory only and rebuilt from Kafka after every
//! rebalance (`offsets.rs`), so nothing here is needed for correctness after a crash.

use std::collections::{BTreeMap, VecDeque};

use crate::anon_record::{self, AnonRecord};
use crate::batch::{BatchId, BatchRanges, PartitionRange};
use crate::dead_letter::Reason;

use super::plan::{BodyLimit, Planned, Sizing};
use super::quarantine::DeadLetter;

/// A record read from the anonymized topic, with its position there (batches are keyed by it).
pub(super) struct Buffered {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) record: AnonRecord,
    /// What it costs the buffer (its payload and this struct).
    pub(super) bytes: usize,
}

/// A batch whose ranges are recorded (or about to be). `records` is `None` until it is rebuilt.
pub(super) struct Batch {
    pub(super) ranges: BatchRanges,
    /// The anonymized topic's id when the batch was planned (`None`: recorded by a loader before
    /// ids were part of a batch); with the ranges, the batch's identity ([`BatchId`]).
    pub(super) topic_id: Option<String>,
    pub(super) records: Option<Vec<Buffered>>,
    pub(super) recorded: bool,
    /// The encoded body, once made (a function of the records: every retry sends these bytes).
    pub(super) body: Option<Vec<u8>>,
}

impl Batch {
    /// A new batch of `records` (per partition a contiguous run, in offset order): its ranges
    /// hold exactly these records. Recorded before it is sent.
    pub(super) fn planned(records: Vec<Buffered>, topic_id: Option<String>) -> Batch {
        let ranges = BatchRanges::covering(records.iter().map(|b| (b.partition, b.offset)))
            .expect("a batch has records");
        Batch {
            ranges,
            topic_id,
            records: Some(records),
            recorded: false,
            body: None,
        }
    }

    /// A batch found in commit metadata: rebuilt from its ranges before it is sent.
    pub(super) fn recorded(id: BatchId) -> Batch {
        Batch {
            ranges: id.ranges,
            topic_id: id.topic_id,
            records: None,
            recorded: true,
            body: None,
        }
    }

    /// What the batch's commit metadata and dedup token are made of.
    pub(super) fn id(&self) -> BatchId {
        BatchId {
            ranges: self.ranges.clone(),
            topic_id: self.topic_id.clone(),
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    /// Records read and not yet in a batch, in arrival order.
    pub(super) queue: VecDeque<Buffered>,
    pub(super) queued_bytes: usize,
    /// Batches to finish, oldest first. Recovered batches come before anything new.
    pub(super) batches: VecDeque<Batch>,
    /// Per partition: offsets below this are loaded (committed) or belong to a batch, and are
    /// not queued again.
    pub(super) skip_below: BTreeMap<i32, i64>,
    pub(super) assigned: Vec<i32>,
    pub(super) paused: bool,
    /// Compressed bytes per row of the last body, to size the next batch in one or two tries.
    pub(super) bytes_per_row: f64,
    /// Final-level body size over planning-level size, learned from the last batch.
    pub(super) level_ratio: f64,
    /// Largest body to plan: `max_body_bytes`, lowered by a 413, raised again by inserts.
    pub(super) body_limit: BodyLimit,
    /// Undecodable records read, whose dead letters are not yet acknowledged. Sent before any
    /// offset commit, so no commit ever passes a record without its dead letter being durable.
    pub(super) undecodable: Vec<DeadLetter>,
    /// Per partition: one past the last dead-lettered undecodable record that no commit has
    /// passed yet. Committed when nothing else is left to load (a batch's commit passes the
    /// others).
    pub(super) quarantined_to: BTreeMap<i32, i64>,
    /// This loader's partitions of replaced batches whose commit metadata still names them; the
    /// next recording clears it (`refused.rs`).
    pub(super) release: Vec<PartitionRange>,
    /// Records ClickHouse refused on their own since the last successful insert.
    pub(super) rejected_in_a_row: u32,
    /// Dead letters written by this process, by reason (for `/status`).
    pub(super) dead_lettered: BTreeMap<Reason, u64>,
    /// The anonymized topic's id (read at start-up): new batches are bound to it.
    pub(super) topic_id: Option<String>,
}

impl State {
    /// A loader's state before its first assignment.
    pub(super) fn new(max_body_bytes: usize, topic_id: Option<String>) -> State {
        State {
            bytes_per_row: 20.0,
            body_limit: BodyLimit::new(max_body_bytes),
            topic_id,
            ..State::default()
        }
    }

    /// After a revoke: what was learned about sizes and counted for `/status` stays; everything
    /// else is forgotten (eager rebalancing revokes all partitions; Kafka holds the truth).
    pub(super) fn forget_partitions(&mut self) {
        *self = State {
            bytes_per_row: self.bytes_per_row,
            level_ratio: self.level_ratio,
            body_limit: self.body_limit,
            rejected_in_a_row: self.rejected_in_a_row,
            dead_lettered: std::mem::take(&mut self.dead_lettered),
            topic_id: self.topic_id.take(),
            ..State::default()
        };
    }

    /// Work to do: a batch to finish or records to plan.
    pub(super) fn has_work(&self) -> bool {
        !self.batches.is_empty() || !self.queue.is_empty()
    }

    /// Queues a record read from the topic, unless it is below what is loaded or batched. A
    /// record that does not decode can never load: its dead letter is queued instead (sent before
    /// any commit passes it).
    pub(super) fn buffer(&mut self, partition: i32, offset: i64, payload: &[u8]) {
        if self
            .skip_below
            .get(&partition)
            .is_some_and(|&end| offset < end)
        {
            return;
        }
        // The anonymizer wrote it, so a record that does not decode is a bug or a foreign
        // producer.
        let record = match anon_record::decode(payload) {
            Ok(record) => record,
            Err(e) => {
                self.undecodable.push(DeadLetter::undecodable(
                    partition,
                    offset,
                    payload,
                    e.to_string(),
                ));
                return;
            }
        };
        let bytes = payload.len() + std::mem::size_of::<Buffered>();
        self.queued_bytes += bytes;
        self.queue.push_back(Buffered {
            partition,
            offset,
            record,
            bytes,
        });
    }

    /// What planning reads besides the queue.
    pub(super) fn sizing(&self) -> Sizing {
        Sizing {
            max_body_bytes: self.body_limit.get(),
            level_ratio: self.level_ratio,
            bytes_per_row: self.bytes_per_row,
        }
    }

    /// Moves a planned prefix out of the queue into a new batch.
    pub(super) fn take_planned(&mut self, planned: Planned) {
        let Planned {
            n,
            body,
            level_ratio,
        } = planned;
        self.level_ratio = level_ratio;
        let records: Vec<Buffered> = self.queue.drain(..n).collect();
        self.queued_bytes -= records.iter().map(|b| b.bytes).sum::<usize>();
        let mut batch = Batch::planned(records, self.topic_id.clone());
        for r in batch.ranges.ranges() {
            self.skip_below.insert(r.partition, r.end);
        }
        batch.body = Some(body);
        self.batches.push_back(batch);
    }

    /// Puts records back at the head of the queue, in their order, to be planned again.
    pub(super) fn requeue_records(&mut self, records: Vec<Buffered>) {
        for b in records.into_iter().rev() {
            self.queued_bytes += b.bytes;
            self.queue.push_front(b);
        }
    }

    /// The ranges of the batch being sent, for logs.
    pub(super) fn current_ranges(&self) -> String {
        self.batches
            .front()
            .map(|b| b.ranges.to_string())
            .unwrap_or_default()
    }

    /// Whether consumption should pause: above `max_bytes` buffered; once paused, until below
    /// half of it.
    pub(super) fn wants_pause(&self, max_bytes: usize) -> bool {
        if self.paused {
            self.queued_bytes > max_bytes / 2
        } else {
            self.queued_bytes > max_bytes
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::ProducerSettings;
    use crate::synth::TrafficModel;

    /// `n` synthetic records over `partitions`, arriving interleaved, offsets with gaps (like
    /// transaction markers leave).
    pub(in crate::loader) fn queue_of(n: usize, partitions: i32) -> State {
        let mut model = TrafficModel::new(&ProducerSettings::default());
        let mut st = State::new(1_000_000, None);
        let mut next = vec![0i64; partitions as usize];
        for i in 0..n {
            let p = (i as i32 * 7 + i as i32 / 3) % partitions;
            let r = model.next_record(1_700_000_000_000 + i as u64);
            let (bytes, _) =
                crate::anon_record::transform(&crate::record::encode_capnp(&r), p, i as i64, 48)
                    .unwrap();
            let offset = next[p as usize];
            next[p as usize] += 1 + (i % 3) as i64;
            st.buffer(p, offset, &bytes);
        }
        st
    }

    #[test]
    fn recorded_ranges_are_skipped_when_read_again() {
        let mut st = queue_of(10, 1);
        let n = st.queue.len();
        st.take_planned(Planned {
            n,
            body: Vec::new(),
            level_ratio: 1.0,
        });
        let end = st.batches[0].ranges.get(0).unwrap().end;
        let (bytes, _) = crate::anon_record::transform(
            &crate::record::encode_capnp(
                &TrafficModel::new(&ProducerSettings::default()).next_record(0),
            ),
            0,
            0,
            48,
        )
        .unwrap();
        st.buffer(0, end - 1, &bytes);
        assert!(
            st.queue.is_empty(),
            "an offset inside a recorded batch is not queued twice"
        );
        st.buffer(0, end, &bytes);
        assert_eq!(st.queue.len(), 1);
    }

    #[test]
    fn an_undecodable_record_is_held_for_its_dead_letter_not_queued() {
        let mut st = State::new(1_000_000, None);
        st.buffer(2, 7, b"\xc1 not MessagePack");
        assert!(st.queue.is_empty());
        assert_eq!(st.queued_bytes, 0);
        assert_eq!(st.undecodable.len(), 1);
        assert_eq!(
            (
                st.undecodable[0].anon_partition,
                st.undecodable[0].anon_offset
            ),
            (2, 7)
        );
    }

    #[test]
    fn pausing_has_hysteresis() {
        let mut st = State::new(1_000_000, None);
        st.queued_bytes = 800;
        assert!(!st.wants_pause(1000));
        st.queued_bytes = 1001;
        assert!(st.wants_pause(1000));
        st.paused = true;
        st.queued_bytes = 600;
        assert!(st.wants_pause(1000), "paused until below half");
        st.queued_bytes = 500;
        assert!(!st.wants_pause(1000));
    }

    #[test]
    fn a_revoke_keeps_what_was_learned_and_forgets_the_rest() {
        let mut st = queue_of(10, 2);
        st.bytes_per_row = 13.0;
        st.rejected_in_a_row = 2;
        st.assigned = vec![0, 1];
        st.dead_lettered.insert(Reason::BodyTooLarge, 1);
        st.topic_id = Some("id".into());
        st.forget_partitions();
        assert!(st.queue.is_empty() && st.assigned.is_empty() && st.skip_below.is_empty());
        assert_eq!(st.queued_bytes, 0);
        assert_eq!(st.bytes_per_row, 13.0);
        assert_eq!(st.rejected_in_a_row, 2);
        assert_eq!(st.dead_lettered.len(), 1);
        assert_eq!(st.topic_id.as_deref(), Some("id"));
    }
}
