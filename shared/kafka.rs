//! librdkafka client configuration from settings.

use std::sync::Arc;
use std::time::Instant;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::{is_secret_key, KafkaOptions, KafkaSettings};
use crate::health::Health;
use crate::log_gate::LogGate;

/// A client config: `defaults` (the stage's own choices) < `kafka.options` < the stage's
/// `kafka_options`. What an operator sets always wins; the caller re-asserts the few properties a
/// guarantee depends on after this (see each stage).
pub fn client_config(
    kafka: &KafkaSettings,
    stage_options: &KafkaOptions,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in kafka.options.iter().chain(stage_options.iter()) {
        config.set(k, v);
    }
    config
}

/// Re-asserts, after [`client_config`], what both stages' consumers rely on: group `group_id`,
/// read_committed (aborted output is never seen), and no automatic commit or offset store (a
/// stage commits only what it has made durable downstream). Statistics feed the lag gauge and
/// the cluster watch.
pub fn exactly_once_consumer<'c>(
    config: &'c mut ClientConfig,
    group_id: &str,
) -> &'c mut ClientConfig {
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
}

/// The config as `key=value` pairs with secret values hidden, for logs.
pub fn describe(config: &ClientConfig) -> String {
    let mut pairs: Vec<String> = config
        .config_map()
        .iter()
        .map(|(k, v)| {
            if is_secret_key(k) {
                format!("{k}=***")
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    pairs.sort();
    pairs.join(" ")
}

/// Statistics interval of the consumers: how often the lag gauges are refreshed.
pub const STATISTICS_INTERVAL_MS: &str = "10000";

/// Consumer lag from librdkafka's statistics, summed over the assigned partitions; `None` until
/// known. Per partition: librdkafka's `consumer_lag` (end of the log, the last stable offset for
/// read_committed, minus the committed offset) where it knows it; otherwise the last stable offset
/// minus the application's position. The anonymizer needs the fallback: it commits offsets through
/// its producer's transactions, which the consumer's statistics never see.
///
/// Taken from the statistics callback because a watermark query from the processing loop is a
/// blocking network call (it once stalled the anonymizer for as long as its timeouts added up).
pub fn lag_from_statistics(stats: &Statistics) -> Option<i64> {
    let known: Vec<i64> = stats
        .topics
        .values()
        .flat_map(|t| t.partitions.values())
        .filter(|p| p.partition >= 0 && p.desired)
        .filter_map(|p| match (p.consumer_lag, p.ls_offset, p.app_offset) {
            (lag, _, _) if lag >= 0 => Some(lag),
            (_, end, position) if end >= 0 && position >= 0 => Some((end - position).max(0)),
            _ => None,
        })
        .collect();
    (!known.is_empty()).then(|| known.iter().sum())
}

/// Sets the lag gauge `gauge` from a statistics callback (see [`lag_from_statistics`]).
pub fn record_lag(stats: &Statistics, gauge: &'static str) {
    if let Some(lag) = lag_from_statistics(stats) {
        metrics::gauge!(gauge).set(lag as f64);
    }
}

/// Where a consumer group stands on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPosition {
    pub partition: i32,
    /// The next offset the group will read; `None` if it never committed.
    pub committed: Option<i64>,
    /// Commit metadata (the loader records its pending batch here).
    pub metadata: String,
    /// Log start and high watermark.
    pub low: i64,
    pub high: i64,
    /// Last stable offset: below it every transaction is decided. Below `high` while a
    /// transaction is open (a dead producer's stays open until its transaction timeout), and
    /// read_committed consumers see nothing past it.
    pub stable: i64,
}

/// The committed offsets of `group` on every partition of `topic`, with the watermarks. Blocking:
/// call it from `spawn_blocking`, never from a processing loop.
pub fn group_positions(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    timeout: std::time::Duration,
) -> KafkaResult<Vec<GroupPosition>> {
    let consumer: BaseConsumer = client_config(kafka, &KafkaOptions::default(), &[])
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    // librdkafka asks for watermarks at the client's isolation level: read_uncommitted gives the
    // high watermark, read_committed the last stable offset.
    let uncommitted: BaseConsumer = client_config(kafka, &KafkaOptions::default(), &[])
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut partitions = TopicPartitionList::new();
    for t in metadata.topics() {
        if let Some(e) = t.error() {
            return Err(KafkaError::MetadataFetch(e.into()));
        }
        for p in t.partitions() {
            partitions.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(partitions, timeout)?;
    let mut positions = Vec::new();
    for e in committed.elements() {
        let (low, stable) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        let (_, high) = uncommitted.fetch_watermarks(topic, e.partition(), timeout)?;
        positions.push(GroupPosition {
            partition: e.partition(),
            committed: match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            },
            metadata: e.metadata().to_string(),
            low,
            high,
            stable,
        });
    }
    positions.sort_by_key(|p| p.partition);
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn operator_options_win_and_secrets_are_hidden() {
        let kafka = KafkaSettings {
            brokers: "b:9092".into(),
            options: KafkaOptions(BTreeMap::from([
                ("linger.ms".into(), "7".into()),
                ("sasl.password".into(), "pw".into()),
            ])),
            secret_files: BTreeMap::new(),
        };
        let stage = KafkaOptions(BTreeMap::from([("acks".into(), "1".into())]));
        let c = client_config(&kafka, &stage, &[("linger.ms", "20"), ("acks", "all")]);
        assert_eq!(c.get("linger.ms"), Some("7"));
        assert_eq!(c.get("acks"), Some("1"));
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
        let text = describe(&c);
        assert!(
            text.contains("sasl.password=***") && !text.contains("pw "),
            "{text}"
        );
    }
}

/// What a client's librdkafka reports about its connection to the cluster: errors mark Kafka down
/// on the stage's [`Health`] (unready, with the reason) and every kind of error or log line is
/// logged at a bounded rate ([`LogGate`]). The stage marks Kafka up again when a call succeeds.
/// Each stage's client contexts forward `error` and `log` here.
#[derive(Debug, Default)]
pub struct KafkaWatch {
    health: Option<Arc<Health>>,
    gate: LogGate,
}

impl KafkaWatch {
    pub fn new(health: Option<Arc<Health>>) -> KafkaWatch {
        KafkaWatch {
            health,
            gate: LogGate::default(),
        }
    }

    pub fn error(&self, error: &KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if code.is_some_and(means_cluster_unreachable) {
            if let Some(h) = &self.health {
                h.down("kafka", &format!("{error}: {reason}"));
            }
        }
        let kind = format!("error {code:?}");
        if let Some(suppressed) = self.gate.admit(&kind, Instant::now()) {
            tracing::warn!(target: "librdkafka", %error, reason, suppressed, "Kafka client error");
        }
    }

    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel::*;
        if matches!(level, Info | Debug) {
            tracing::debug!(target: "librdkafka", facility, message);
            return;
        }
        let Some(suppressed) = self.gate.admit(&format!("log {facility}"), Instant::now()) else {
            return;
        };
        match level {
            Emerg | Alert | Critical | Error => {
                tracing::error!(target: "librdkafka", facility, message, suppressed)
            }
            Warning => tracing::warn!(target: "librdkafka", facility, message, suppressed),
            _ => tracing::info!(target: "librdkafka", facility, message, suppressed),
        }
    }

    /// The stage itself found the cluster unreachable (a call timed out, no broker answered).
    pub fn unreachable(&self, error: &dyn std::fmt::Display, during: &str) {
        if let Some(h) = &self.health {
            h.down("kafka", &format!("{during}: {error}"));
        }
        let kind = format!("unreachable {during}");
        if let Some(suppressed) = self.gate.admit(&kind, Instant::now()) {
            tracing::warn!(error = %error, during, suppressed, "Kafka cluster unreachable; retrying");
        }
    }

    /// From a statistics callback: a connection to any broker is up, so the cluster answers.
    /// (Errors mark Kafka down at once; this is how an idle stage sees it come back.)
    pub fn observe(&self, stats: &Statistics) {
        if stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP")
        {
            self.reachable();
        }
    }

    /// A call to the cluster succeeded.
    pub fn reachable(&self) {
        if let Some(h) = &self.health {
            h.up("kafka");
        }
    }
}

/// Errors that mean the client cannot reach the cluster (as opposed to one failed request).
pub fn means_cluster_unreachable(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::SSL
    )
}

/// A client context that only watches ([`KafkaWatch`]): for producers and admin clients that need
/// no callbacks of their own.
pub struct WatchedContext(pub Arc<KafkaWatch>);

impl ClientContext for WatchedContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(&error, reason);
    }
}

impl rdkafka::producer::ProducerContext for WatchedContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl rdkafka::consumer::ConsumerContext for WatchedContext {}
