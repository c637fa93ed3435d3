//! The loader's dead letters: records it gives up on (undecodable on the anonymized topic, a body
//! over the proxy's limit on their own, rejected by ClickHouse on their own) go to
//! `topics.loader_dead_letter` with headers naming the input position, the anonymized position,
//! the reason and the error.
//!
//! Ordering is the whole guarantee: a dead letter is acknowledged by every in-sync replica
//! (idempotent producer, `acks=all`, the delivery report awaited) before any offset commit moves
//! past its record. A crash in between sends it again on the next attempt, so a reader (`verify`
//! among them) counts distinct positions, never letters.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::anon_record::AnonRecord;
use crate::config::Settings;
use crate::dead_letter::{
    error_text, DeadLetterPayload, Reason, HEADER_ANON_OFFSET, HEADER_ANON_PARTITION,
    HEADER_ANON_TOPIC, HEADER_ERROR, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_STAGE,
    HEADER_TOPIC,
};
use crate::kafka::client_config;
use crate::kafka::{KafkaWatch, WatchedContext};

use super::offsets::Offsets;
use super::refused::Next;
use super::state::{Batch, State};

/// Largest dead letter the loader writes: librdkafka's default `message.max.bytes`, below the
/// broker's default `max.message.bytes` (1048588). Larger payloads become a bounded envelope.
pub const MAX_MESSAGE_BYTES: usize = 1_000_000;

/// One record the loader quarantines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: Reason,
    pub error: String,
    /// Position on the anonymized topic (what the loader's offsets and batches are about).
    pub anon_partition: i32,
    pub anon_offset: i64,
    /// Position on the input topic, when the record decoded far enough to say.
    pub source: Option<(i32, i64)>,
    /// The bytes as read from the anonymized topic (re-encoded for a decoded record: the one
    /// encoder of the topic writes the same bytes).
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// A record the loader could not decode: only its anonymized position is known.
    pub fn undecodable(partition: i32, offset: i64, payload: &[u8], error: String) -> DeadLetter {
        DeadLetter {
            reason: Reason::AnonUndecodable,
            error,
            anon_partition: partition,
            anon_offset: offset,
            source: None,
            payload: payload.to_vec(),
        }
    }

    /// A decoded record given up on for `reason`.
    pub fn of_record(
        reason: Reason,
        error: String,
        partition: i32,
        offset: i64,
        record: &AnonRecord,
    ) -> DeadLetter {
        DeadLetter {
            reason,
            error,
            anon_partition: partition,
            anon_offset: offset,
            source: Some((record.source_partition, record.source_offset)),
            payload: crate::anon_record::encode(record),
        }
    }

    /// The headers (pure). `edgelog.source.*` name the **input** position when it is known, so
    /// `verify` accounts the input offset as dead-lettered; an undecodable record's input position
    /// is unknown, so they name its anonymized position and topic instead (`verify` tells the
    /// two apart by `edgelog.source.topic`). `edgelog.anon.*` always name the anonymized position.
    pub fn headers(
        &self,
        input_topic: &str,
        anon_topic: &str,
        payload: &DeadLetterPayload<'_>,
    ) -> Vec<(&'static str, String)> {
        let (topic, (partition, offset)) = match self.source {
            Some(position) => (input_topic, position),
            None => (anon_topic, (self.anon_partition, self.anon_offset)),
        };
        let mut headers = vec![
            (HEADER_TOPIC, topic.to_string()),
            (HEADER_PARTITION, partition.to_string()),
            (HEADER_OFFSET, offset.to_string()),
            (HEADER_ANON_TOPIC, anon_topic.to_string()),
            (HEADER_ANON_PARTITION, self.anon_partition.to_string()),
            (HEADER_ANON_OFFSET, self.anon_offset.to_string()),
            (HEADER_REASON, self.reason.label().to_string()),
            (HEADER_STAGE, "loader".to_string()),
            (HEADER_ERROR, error_text(&self.error).to_string()),
        ];
        headers.extend(payload.headers());
        headers
    }
}

/// The producer of the loader's dead-letter topic.
pub struct DeadLetters {
    producer: FutureProducer<WatchedContext>,
    topic: String,
    input_topic: String,
    anon_topic: String,
}

impl DeadLetters {
    /// `watch`: the loader's view of the cluster (the producer's errors are logged at a bounded
    /// rate and mark Kafka down, like the consumer's).
    pub fn new(settings: &Settings, watch: Arc<KafkaWatch>) -> anyhow::Result<DeadLetters> {
        let mut config = client_config(
            &settings.kafka,
            &settings.loader.kafka_options,
            &[("linger.ms", "0")],
        );
        // The guarantee depends on these; they are not overridable.
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
            // The loop waits for the delivery report: give up (and exit, to be restarted) well
            // before /healthz would call it stuck (330 s), e.g. when the topic does not exist.
            .set("message.timeout.ms", "120000");
        // Zero from the start, so an alert on the rate sees the series before the first one.
        for reason in [
            Reason::AnonUndecodable,
            Reason::BodyTooLarge,
            Reason::ClickhouseRejected,
        ] {
            metrics::counter!("edgelog_dead_letters_total", "stage" => "loader", "reason" => reason.label())
                .increment(0);
        }
        Ok(DeadLetters {
            producer: config
                .create_with_context(WatchedContext(watch))
                .context("creating the dead-letter producer")?,
            topic: settings.topics.loader_dead_letter.clone(),
            input_topic: settings.topics.input.clone(),
            anon_topic: settings.topics.anonymized.clone(),
        })
    }

    /// Sends every letter and waits until Kafka acknowledged each. An error means some may not
    /// be durable: the caller must not commit past them (it stops, and they are read again).
    pub async fn send_all(&self, letters: &[DeadLetter]) -> anyhow::Result<()> {
        // One at a time: dead letters are rare, and a slot is a minute long.
        for letter in letters {
            self.send(letter).await?;
        }
        Ok(())
    }

    async fn send(&self, letter: &DeadLetter) -> anyhow::Result<()> {
        let payload = DeadLetterPayload::of(&letter.payload, MAX_MESSAGE_BYTES);
        let mut headers = OwnedHeaders::new();
        for (key, value) in letter.headers(&self.input_topic, &self.anon_topic, &payload) {
            headers = headers.insert(Header {
                key,
                value: Some(&value),
            });
        }
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
            .payload(payload.bytes.as_ref())
            .headers(headers);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .with_context(|| {
                format!(
                    "dead-lettering partition {} offset {} of the anonymized topic",
                    letter.anon_partition, letter.anon_offset
                )
            })?;
        metrics::counter!("edgelog_dead_letters_total", "stage" => "loader", "reason" => letter.reason.label())
            .increment(1);
        tracing::warn!(reason = %letter.reason, partition = letter.anon_partition, offset = letter.anon_offset, source = ?letter.source, error = %error_text(&letter.error), "record quarantined in the loader's dead-letter topic");
        Ok(())
    }
}

// In the loop: when dead letters are sent, and what is committed after them.
impl DeadLetters {
    /// Sends the pending dead letters of undecodable records and waits until Kafka has them all.
    pub(super) async fn flush(&self, st: &mut State) -> anyhow::Result<()> {
        if st.undecodable.is_empty() {
            return Ok(());
        }
        self.send_all(&st.undecodable).await?;
        for letter in std::mem::take(&mut st.undecodable) {
            *st.dead_lettered.entry(letter.reason).or_default() += 1;
            let to = st.quarantined_to.entry(letter.anon_partition).or_default();
            *to = (*to).max(letter.anon_offset + 1);
        }
        Ok(())
    }

    /// With nothing queued or batched, every record below a dead-lettered one is loaded:
    /// dead-letter what is pending and commit past it all.
    pub(super) async fn commit_quarantined(
        &self,
        offsets: &Offsets,
        st: &mut State,
    ) -> anyhow::Result<()> {
        self.flush(st).await?;
        let mut tpl = TopicPartitionList::new();
        for (&p, &to) in st
            .quarantined_to
            .iter()
            .filter(|(p, _)| st.assigned.contains(p))
        {
            let mut e = tpl.add_partition(offsets.topic(), p);
            e.set_offset(Offset::Offset(to))?;
            e.set_metadata("");
            let skip = st.skip_below.entry(p).or_default();
            *skip = (*skip).max(to);
        }
        if tpl.count() > 0 {
            offsets
                .commit(tpl)
                .await
                .context("committing past quarantined records")?;
        }
        st.quarantined_to.clear();
        Ok(())
    }

    /// Dead-letters the records of `batch` (one, refused on its own) and commits past it.
    pub(super) async fn quarantine(
        &self,
        offsets: &Offsets,
        st: &mut State,
        batch: Batch,
        reason: Reason,
        why: String,
    ) -> anyhow::Result<()> {
        let letters: Vec<DeadLetter> = batch
            .records
            .iter()
            .flatten()
            .map(|b| DeadLetter::of_record(reason, why.clone(), b.partition, b.offset, &b.record))
            .collect();
        self.send_all(&letters).await?;
        *st.dead_lettered.entry(reason).or_default() += letters.len() as u64;
        offsets.finish(st, &batch.ranges).await
    }

    /// Carries out what [`super::refused::replace_refused`] decided.
    pub(super) async fn after_refusal(
        &self,
        offsets: &Offsets,
        st: &mut State,
        next: Next,
        reason: Reason,
        why: String,
    ) -> anyhow::Result<()> {
        match next {
            Next::Replanned => Ok(()),
            Next::NotOurs(batch) => offsets.finish(st, &batch.ranges).await,
            Next::Quarantine(batch) => self.quarantine(offsets, st, batch, reason, why).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(headers: &'a [(&'static str, String)], key: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_decoded_record_names_its_input_position() {
        let record = AnonRecord {
            version: 1,
            timestamp_epoch_milli: 1,
            resource_id: 2,
            bytes_sent: 3,
            request_time_milli: 4,
            response_status: 200,
            cache_status: "HIT".into(),
            method: "GET".into(),
            remote_addr: "1.2.3.X".into(),
            url: "/poison".into(),
            source_partition: 7,
            source_offset: 4242,
        };
        let letter =
            DeadLetter::of_record(Reason::ClickhouseRejected, "x".repeat(5000), 1, 99, &record);
        let payload = DeadLetterPayload::of(&letter.payload, MAX_MESSAGE_BYTES);
        let h = letter.headers("http_log", "http_log_anon", &payload);
        assert_eq!(get(&h, HEADER_TOPIC), Some("http_log"));
        assert_eq!(get(&h, HEADER_PARTITION), Some("7"));
        assert_eq!(get(&h, HEADER_OFFSET), Some("4242"));
        assert_eq!(get(&h, HEADER_ANON_TOPIC), Some("http_log_anon"));
        assert_eq!(get(&h, HEADER_ANON_PARTITION), Some("1"));
        assert_eq!(get(&h, HEADER_ANON_OFFSET), Some("99"));
        assert_eq!(get(&h, HEADER_REASON), Some("clickhouse_rejected"));
        assert_eq!(get(&h, HEADER_STAGE), Some("loader"));
        assert_eq!(get(&h, HEADER_ERROR).unwrap().len(), 1024, "bounded");
        assert_eq!(
            crate::anon_record::decode(&letter.payload).unwrap(),
            record,
            "the payload is the record as the topic holds it"
        );
    }

    #[test]
    fn an_undecodable_record_names_its_anonymized_position() {
        let letter = DeadLetter::undecodable(2, 17, b"\xff garbage", "not msgpack".into());
        let payload = DeadLetterPayload::of(&letter.payload, MAX_MESSAGE_BYTES);
        let h = letter.headers("http_log", "http_log_anon", &payload);
        assert_eq!(get(&h, HEADER_TOPIC), Some("http_log_anon"));
        assert_eq!(get(&h, HEADER_PARTITION), Some("2"));
        assert_eq!(get(&h, HEADER_OFFSET), Some("17"));
        assert_eq!(get(&h, HEADER_ANON_OFFSET), Some("17"));
        assert_eq!(get(&h, HEADER_REASON), Some("anon_undecodable"));
        assert_eq!(&*payload.bytes, b"\xff garbage");
    }
}
