//! How large a record stage one may produce: the smallest `message.max.bytes` among the
//! producer and the output and dead-letter topics, read once at start-up. Checking each record
//! against it before `send()` keeps every broker refusal for size out of the transactions.

use std::sync::Arc;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};

use crate::config::Settings;
use crate::dead_letter::ENVELOPE_OVERHEAD;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;

use crate::kafka::{client_config, permanent_failure, KafkaWatch, WatchedContext};

use super::STARTUP_ATTEMPT;

/// The `message.max.bytes` stage one works with: the smallest of the producer's setting and the
/// output and dead-letter topics' `max.message.bytes` (read from the broker), or an error naming
/// every value and key when even a dead-letter envelope cannot fit.
pub(super) async fn message_limit(
    settings: &Settings,
    watch: &Arc<KafkaWatch>,
) -> anyhow::Result<usize> {
    let (key, producer) = producer_message_max_bytes(settings)?;
    let topics = [&settings.topics.anonymized, &settings.topics.dead_letter];
    let admin: AdminClient<WatchedContext> =
        client_config(&settings.kafka, &settings.anonymizer.kafka_options, &[])
            .create_with_context(WatchedContext(watch.clone()))
            .context("creating the Kafka admin client")?;
    let specifiers: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(STARTUP_ATTEMPT));
    // The Kafka error stays the outermost error: the caller tells "cluster unreachable" by it.
    let described = admin.describe_configs(&specifiers, &opts).await;
    // Why it timed out, if it did (a refused password, an untrusted certificate) is there.
    crate::kafka::serve_admin_events(admin.inner());
    let described = described?;
    let mut limits = Vec::new();
    for (topic, result) in topics.iter().zip(described) {
        let resource = result.map_err(|code| match permanent_failure(Some(code), "") {
            Some(cause) => anyhow::anyhow!(
                cause.message(&format!("describing topic {topic}'s configuration: {code}"))
            ),
            None => anyhow::anyhow!("describing topic {topic}: {code} (run `edgelog setup`)"),
        })?;
        if resource.entries.is_empty() {
            // rust-rdkafka 0.39 drops DescribeConfigs' per-topic error and returns no entries
            // instead: ask the topic's metadata why.
            return Err(empty_configuration(settings, topic).await);
        }
        let value = resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<usize>().ok())
            .with_context(|| format!("topic {topic} reports no max.message.bytes"))?;
        limits.push((topic.to_string(), value));
    }
    let limit = effective_limit((&key, producer), &limits).map_err(anyhow::Error::msg)?;
    tracing::info!(limit, producer, ?limits, "effective message.max.bytes");
    Ok(limit)
}

/// Kafka answered DescribeConfigs for a topic that exists and may be described, with no settings:
/// seen once for a topic created a moment before, and what a user without DESCRIBE_CONFIGS on it
/// gets (rust-rdkafka drops the error code). Retried like an unreachable cluster, the reason shown.
#[derive(Debug, thiserror::Error)]
#[error("Kafka returned no configuration for topic {0}: retrying (if this persists, the user lacks the DESCRIBE_CONFIGS ACL on it)")]
pub(super) struct NoConfiguration(String);

/// Why DescribeConfigs returned nothing for `topic`, from its metadata: a permanent refusal (no
/// ACL at all on the topic), a missing topic, or [`NoConfiguration`] (retried).
async fn empty_configuration(settings: &Settings, topic: &str) -> anyhow::Error {
    let (s, t) = (settings.clone(), topic.to_string());
    let looked =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Option<RDKafkaErrorCode>> {
            let client: rdkafka::producer::BaseProducer =
                client_config(&s.kafka, &s.anonymizer.kafka_options, &[]).create()?;
            let metadata = client.client().fetch_metadata(Some(&t), STARTUP_ATTEMPT)?;
            Ok(metadata
                .topics()
                .first()
                .and_then(|m| m.error())
                .map(RDKafkaErrorCode::from))
        })
        .await;
    match looked {
        Ok(Ok(Some(code))) => match permanent_failure(Some(code), "") {
            Some(cause) => anyhow::anyhow!(cause.message(&format!("topic {topic}: {code}"))),
            None => anyhow::anyhow!("describing topic {topic}: {code} (run `edgelog setup`)"),
        },
        Ok(Ok(None)) => NoConfiguration(topic.to_string()).into(),
        Ok(Err(e)) => e,
        Err(e) => e.into(),
    }
}

/// librdkafka's default `message.max.bytes`.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The producer's configured `message.max.bytes` and the settings key it came from.
fn producer_message_max_bytes(settings: &Settings) -> anyhow::Result<(String, usize)> {
    let from = |section: &str, v: &str| {
        v.parse::<usize>()
            .map(|n| (format!("{section}.message.max.bytes"), n))
            .with_context(|| format!("`{section}.message.max.bytes` {v:?} is not a number"))
    };
    if let Some(v) = settings.anonymizer.kafka_options.get("message.max.bytes") {
        return from("anonymizer.kafka_options", v);
    }
    if let Some(v) = settings.kafka.options.get("message.max.bytes") {
        return from("kafka.options", v);
    }
    Ok((
        "message.max.bytes (librdkafka default)".into(),
        LIBRDKAFKA_MESSAGE_MAX_BYTES,
    ))
}

/// Smallest effective limit stage one accepts: an envelope's headers and framing plus 1 KiB of
/// the original bytes, so that a dead letter still shows what the record was.
pub const MIN_MESSAGE_BYTES: usize = ENVELOPE_OVERHEAD + 1024;

/// Pure: the smallest of the producer's limit and the topics' limits, if it can hold an
/// envelope; otherwise a message naming each value and where it comes from.
pub fn effective_limit(
    (producer_key, producer): (&str, usize),
    topics: &[(String, usize)],
) -> Result<usize, String> {
    let limit = topics.iter().map(|(_, v)| *v).fold(producer, usize::min);
    if limit >= MIN_MESSAGE_BYTES {
        return Ok(limit);
    }
    let topics: Vec<String> = topics
        .iter()
        .map(|(t, v)| format!("topic {t} max.message.bytes = {v}"))
        .collect();
    Err(format!(
        "the output and dead-letter topics cannot hold a dead-letter envelope: {producer_key} = {producer}, {}; the smallest must be at least {MIN_MESSAGE_BYTES} bytes ({ENVELOPE_OVERHEAD} for headers and framing plus 1 KiB of the record)",
        topics.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_limit_is_the_smallest_and_must_hold_an_envelope() {
        let topics = |a: usize, d: usize| vec![("anon".to_string(), a), ("dlq".to_string(), d)];
        let p = ("message.max.bytes", 1_000_000);
        assert_eq!(
            effective_limit(p, &topics(1_048_588, 1_048_588)),
            Ok(1_000_000)
        );
        assert_eq!(effective_limit(p, &topics(8_000, 1_048_588)), Ok(8_000));
        assert_eq!(effective_limit(p, &topics(1_048_588, 6_000)), Ok(6_000));
        assert_eq!(
            effective_limit(p, &topics(MIN_MESSAGE_BYTES, 1 << 20)),
            Ok(MIN_MESSAGE_BYTES)
        );
        let err = effective_limit(
            ("anonymizer.kafka_options.message.max.bytes", 1_000_000),
            &topics(1_048_588, MIN_MESSAGE_BYTES - 1),
        )
        .unwrap_err();
        for part in [
            "topic dlq max.message.bytes = 5119",
            "anonymizer.kafka_options.message.max.bytes = 1000000",
        ] {
            assert!(err.contains(part), "{err}");
        }
        assert!(effective_limit(("k", 2_000), &topics(1 << 20, 1 << 20)).is_err());
    }
}
