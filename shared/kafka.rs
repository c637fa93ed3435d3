//! librdkafka client configuration from settings.

use std::sync::{Arc, Mutex};
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
    fn refusals_are_permanent_and_named() {
        use PermanentFailure::*;
        use RDKafkaErrorCode as C;
        // The texts librdkafka 2.12 reports against the secure stack (tests/secure.rs).
        let cases = [
            (C::Authentication, "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512", Some(Authentication)),
            (C::SaslAuthenticationFailed, "", Some(Authentication)),
            (C::TopicAuthorizationFailed, "", Some(Authorization)),
            (C::GroupAuthorizationFailed, "", Some(Authorization)),
            (C::TransactionalIdAuthorizationFailed, "", Some(Authorization)),
            (C::ClusterAuthorizationFailed, "", Some(Authorization)),
            (C::SSL, "ssl://127.0.0.1:9192/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured", Some(UntrustedCertificate)),
            // A handshake cut short (a broker restarting) is the cluster being away: retried.
            (C::SSL, "ssl://127.0.0.1:9192/bootstrap: SSL handshake failed: Disconnected: connecting to a PLAINTEXT broker listener?", None),
            (C::AllBrokersDown, "1/1 brokers are down", None),
            (C::BrokerTransportFailure, "Connection refused", None),
            (C::OperationTimedOut, "", None),
            (C::UnknownTopicOrPartition, "", None),
        ];
        for (code, text, want) in cases {
            assert_eq!(permanent_failure(Some(code), text), want, "{code:?} {text}");
        }
        assert_eq!(permanent_failure(None, "certificate verify failed"), None);
        let m = Authorization.message("Broker: Transactional Id authorization failed");
        assert!(
            m.starts_with("Kafka authorization failed")
                && m.ends_with("Transactional Id authorization failed"),
            "{m}"
        );
        assert!(UntrustedCertificate
            .message("x")
            .contains("ssl.ca.location"));
        assert!(Authentication.message("x").contains("sasl.password"));
        assert_eq!(
            permanent_error_message(&KafkaError::AdminOp(C::TopicAuthorizationFailed))
                .map(|m| m.starts_with("Kafka authorization failed")),
            Some(true)
        );
        assert_eq!(
            permanent_error_message(&KafkaError::AdminOp(C::OperationTimedOut)),
            None
        );
    }

    #[test]
    fn the_first_permanent_failure_is_kept_and_stops_the_check() {
        let health = Health::new(std::time::Duration::from_secs(60));
        let watch = KafkaWatch::new(Some(health.clone()));
        watch.error(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert!(
            watch.check().is_ok(),
            "an unreachable cluster is waited for"
        );
        watch.error(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error: invalid credentials",
        );
        watch.error(
            &KafkaError::Global(RDKafkaErrorCode::GroupAuthorizationFailed),
            "later",
        );
        let e = watch.check().unwrap_err().to_string();
        assert!(
            e.starts_with("Kafka authentication failed") && e.contains("invalid credentials"),
            "{e}"
        );
    }

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
///
/// A permanent refusal ([`permanent_failure`]: wrong credentials, a missing ACL, an untrusted
/// certificate) is also kept ([`KafkaWatch::permanent`]): the stage stops with it instead of
/// waiting for a cluster that will never accept it.
#[derive(Debug, Default)]
pub struct KafkaWatch {
    health: Option<Arc<Health>>,
    gate: LogGate,
    permanent: Mutex<Option<String>>,
}

impl KafkaWatch {
    pub fn new(health: Option<Arc<Health>>) -> KafkaWatch {
        KafkaWatch {
            health,
            gate: LogGate::default(),
            permanent: Mutex::new(None),
        }
    }

    /// The first permanent failure librdkafka reported, as a message naming its cause.
    pub fn permanent(&self) -> Option<String> {
        self.permanent.lock().expect("not poisoned").clone()
    }

    /// `Err` with the message of the first permanent failure, if any: for the stages' loops.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.permanent() {
            Some(message) => Err(anyhow::anyhow!(message)),
            None => Ok(()),
        }
    }

    pub fn error(&self, error: &KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if let Some(cause) = permanent_failure(code, &format!("{error} {reason}")) {
            let message = cause.message(&format!("{error}: {reason}"));
            let mut first = self.permanent.lock().expect("not poisoned");
            if first.is_none() {
                tracing::error!(target: "librdkafka", "{message}");
                *first = Some(message.clone());
            }
            drop(first);
            if let Some(h) = &self.health {
                h.down("kafka", &message);
            }
            return;
        }
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

/// Why a Kafka client can never succeed as configured: retrying does not help, an operator must
/// change the configuration, the credentials or the cluster's ACLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermanentFailure {
    /// The cluster refused the credentials (SASL: wrong user or password, wrong mechanism).
    Authentication,
    /// The credentials are fine, an ACL is missing (topic, group, transactional id, cluster).
    Authorization,
    /// The client does not trust the broker's TLS certificate (no or the wrong `ssl.ca.location`,
    /// or the certificate does not name the address connected to).
    UntrustedCertificate,
}

impl PermanentFailure {
    /// A message naming the cause and where to fix it, then librdkafka's own words (`detail`).
    pub fn message(self, detail: &str) -> String {
        let cause = match self {
            PermanentFailure::Authentication => {
                "Kafka authentication failed: the cluster refused the credentials (check kafka.options sasl.username, sasl.password, sasl.mechanisms)"
            }
            PermanentFailure::Authorization => {
                "Kafka authorization failed: an ACL this stage needs is missing (docs/OPERATIONS.md lists each stage's ACLs)"
            }
            PermanentFailure::UntrustedCertificate => {
                "Kafka TLS certificate not trusted: the broker's certificate could not be verified (set kafka.options ssl.ca.location to the CA that signed it)"
            }
        };
        format!("{cause}: {detail}")
    }
}

/// Pure: whether an error librdkafka reported (its code, and its text with the reason) can never
/// go away by retrying. Authentication and authorization errors are permanent by their code; an
/// SSL error only when the text says the certificate failed verification (other SSL errors, such
/// as a handshake cut by a restarting broker, are the cluster being unreachable).
pub fn permanent_failure(code: Option<RDKafkaErrorCode>, text: &str) -> Option<PermanentFailure> {
    use RDKafkaErrorCode::*;
    match code? {
        Authentication | SaslAuthenticationFailed => Some(PermanentFailure::Authentication),
        TopicAuthorizationFailed
        | GroupAuthorizationFailed
        | TransactionalIdAuthorizationFailed
        | ClusterAuthorizationFailed => Some(PermanentFailure::Authorization),
        SSL if text.contains("certificate verify failed") => {
            Some(PermanentFailure::UntrustedCertificate)
        }
        _ => None,
    }
}

/// [`permanent_failure`] of a `KafkaError` returned by a call (admin results carry their code in
/// `AdminOp`), as its message.
pub fn permanent_error_message(error: &KafkaError) -> Option<String> {
    let code = match error {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    permanent_failure(code, &error.to_string()).map(|cause| cause.message(&error.to_string()))
}

/// Errors that mean the client cannot reach the cluster (as opposed to one failed request).
pub fn means_cluster_unreachable(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::Resolve | RDKafkaErrorCode::SSL
    )
}

/// Hands the permanent failures among the events waiting on an admin client's main queue to its
/// [`KafkaWatch`]. rust-rdkafka's `AdminClient` polls only the queue of its own requests, so
/// without this an admin call that fails for a refused password or an untrusted certificate only
/// ever says "timed out". Other errors and log lines go to debug: the caller already reports an
/// unanswered call (at a bounded rate), and the stage's own clients log the same connection.
/// Call it after each admin request (it does not wait).
pub fn serve_admin_events(client: &rdkafka::client::Client<WatchedContext>) {
    use rdkafka::bindings as rd;
    let watch = &client.context().0;
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated string owned by the event, copied before it is destroyed.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: the queue handle and every event polled are destroyed exactly once below; strings
    // are copied while their event lives.
    unsafe {
        let queue = rd::rd_kafka_queue_get_main(client.native_ptr());
        if queue.is_null() {
            return;
        }
        loop {
            let event = rd::rd_kafka_queue_poll(queue, 0);
            if event.is_null() {
                break;
            }
            match rd::rd_kafka_event_type(event) {
                rd::RD_KAFKA_EVENT_ERROR => {
                    let code = RDKafkaErrorCode::from(rd::rd_kafka_event_error(event));
                    let reason = text(rd::rd_kafka_event_error_string(event));
                    let error = KafkaError::Global(code);
                    if permanent_failure(Some(code), &format!("{error} {reason}")).is_some() {
                        watch.error(&error, &reason);
                    } else {
                        tracing::debug!(target: "librdkafka", %error, reason, "admin client error");
                    }
                }
                rd::RD_KAFKA_EVENT_LOG => {
                    let (mut fac, mut message, mut level) = (std::ptr::null(), std::ptr::null(), 0);
                    if rd::rd_kafka_event_log(event, &mut fac, &mut message, &mut level) == 0 {
                        let (facility, message) = (text(fac), text(message));
                        tracing::debug!(target: "librdkafka", level, facility = facility.trim(), message = message.trim(), "admin client");
                    }
                }
                _ => {}
            }
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
    }
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
