//! librdkafka client configuration from settings.

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientConfig, Offset};

use crate::config::{is_secret_key, KafkaOptions, KafkaSettings};

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

/// Records of the assigned partitions not yet committed by the group: the sum of high watermark
/// minus committed offset (the log start where nothing is committed). Blocking network calls.
/// Transaction markers count, so an idle transactional topic shows a lag of one per partition.
pub fn committed_lag<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    timeout: Duration,
) -> KafkaResult<i64> {
    let committed = consumer.committed(timeout)?;
    let mut lag = 0;
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let from = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - from).max(0);
    }
    Ok(lag)
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
