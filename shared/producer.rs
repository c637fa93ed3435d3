//! The synthetic producer: writes [`crate::synth`] traffic to the input topic at a fixed rate or as
//! fast as possible, until a count, a duration or the shutdown future, then reports its rate.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::config::Settings;
use crate::kafka::{client_config, describe};
use crate::synth::{Message, TrafficModel};

/// What a producer run achieved.
#[derive(Debug, Clone, Default)]
pub struct ProducerReport {
    /// Messages handed to librdkafka.
    pub sent: u64,
    /// Of those, garbage payloads (not Cap'n Proto).
    pub garbage: u64,
    /// Of those, hostile records (stage one dead-letters them; see `producer.hostile_share`).
    pub hostile: u64,
    /// Acknowledged by the broker.
    pub delivered: u64,
    /// Failed delivery (after librdkafka's own retries).
    pub failed: u64,
    pub elapsed: Duration,
}

impl ProducerReport {
    pub fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Default)]
struct DeliveryCounter {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("edgelog_producer_delivered_total").increment(1);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("edgelog_producer_failed_total").increment(1);
                tracing::warn!(error = %e, "delivery failed");
            }
        }
    }
}

/// Runs until the configured count or duration is reached or `shutdown` completes, then flushes.
pub async fn run(settings: &Settings, shutdown: impl Future) -> anyhow::Result<ProducerReport> {
    let p = settings.producer.clone();
    let topic = settings.topics.input.clone();
    let config = client_config(
        &settings.kafka,
        &p.kafka_options,
        &[
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", "20"),
            ("compression.type", "lz4"),
            ("queue.buffering.max.messages", "200000"),
        ],
    );
    tracing::info!(config = %describe(&config), %topic, rate = p.rate, count = ?p.count, duration = ?p.duration, seed = p.seed, "producer starting");
    let producer: ThreadedProducer<DeliveryCounter> = config
        .create_with_context(DeliveryCounter::default())
        .context("creating the Kafka producer")?;
    let producer = Arc::new(producer);
    let stop = Arc::new(AtomicBool::new(false));

    let worker = {
        let producer = producer.clone();
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || produce_loop(&producer, &topic, &p, &stop))
    };
    tokio::pin!(worker);
    let report = tokio::select! {
        r = &mut worker => r,
        _ = shutdown => {
            stop.store(true, Ordering::Relaxed);
            worker.await
        }
    };
    let mut report = report.context("producer thread panicked")??;

    let flush_started = Instant::now();
    let flush = {
        let producer = producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(60)))
    };
    flush.await?.context("flushing the producer")?;
    report.elapsed += flush_started.elapsed();
    let ctx = producer.context();
    report.delivered = ctx.delivered.load(Ordering::Relaxed);
    report.failed = ctx.failed.load(Ordering::Relaxed);
    Ok(report)
}

fn produce_loop(
    producer: &ThreadedProducer<DeliveryCounter>,
    topic: &str,
    p: &crate::config::ProducerSettings,
    stop: &AtomicBool,
) -> anyhow::Result<ProducerReport> {
    let mut model = TrafficModel::new(p);
    let started = Instant::now();
    let mut last_progress = started;
    let mut report = ProducerReport::default();
    let limit = p.count.unwrap_or(u64::MAX);
    while report.sent < limit && !stop.load(Ordering::Relaxed) {
        let elapsed = started.elapsed();
        if p.duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        if p.rate > 0.0 {
            // Send whatever is due by now; otherwise wait a little (at most 5 ms, so the stop flag
            // is seen quickly).
            let due = (elapsed.as_secs_f64() * p.rate) as u64 + 1;
            if report.sent >= due {
                let next_at = Duration::from_secs_f64(report.sent as f64 / p.rate);
                std::thread::sleep(
                    next_at
                        .saturating_sub(elapsed)
                        .min(Duration::from_millis(5)),
                );
                continue;
            }
        }
        let message = model.next_message(crate::clock::now_epoch_ms());
        let bytes = message.to_bytes();
        let mut record = BaseRecord::<(), [u8]>::to(topic).payload(&bytes[..]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // Back-pressure: librdkafka's queue is full; its thread drains it.
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                    if stop.load(Ordering::Relaxed) {
                        return Ok(finish(report, started));
                    }
                }
                Err((e, _)) => return Err(e).context("producing a record"),
            }
        }
        report.sent += 1;
        match message {
            Message::Garbage(_) => report.garbage += 1,
            Message::Hostile(_) => report.hostile += 1,
            Message::Record(_) => {}
        }
        metrics::counter!("edgelog_producer_sent_total").increment(1);
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                sent = report.sent,
                rate = format!("{:.0}/s", report.sent as f64 / secs),
                "progress"
            );
        }
    }
    Ok(finish(report, started))
}

fn finish(mut report: ProducerReport, started: Instant) -> ProducerReport {
    report.elapsed = started.elapsed();
    report
}
