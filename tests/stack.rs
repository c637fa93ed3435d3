//! The local stack is real: Kafka transactions abort, ClickHouse dedups by token, the proxy limits.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::Message;

fn read_all(topic: &str, isolation: &str, expected_at_least: usize) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    // Read until the expected number arrived and then no more for 3 s (to catch extras).
    let mut quiet_since = std::time::Instant::now();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.push(String::from_utf8_lossy(m.payload().unwrap_or(&[])).into_owned());
                quiet_since = std::time::Instant::now();
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None if out.len() >= expected_at_least
                && quiet_since.elapsed() > Duration::from_secs(3) =>
            {
                break
            }
            None => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transaction_is_invisible_to_read_committed_readers() {
    require_stack();
    let mut settings = isolated_settings();
    settings.topics.partitions = 1;
    edgelog::setup::create_topics(&settings).await.unwrap();
    let topic = settings.topics.input.clone();
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        let producer: ThreadedProducer<_> = ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .set("transactional.id", unique("txn"))
            .create()
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        producer
            .send(BaseRecord::<(), str>::to(&t).payload("aborted"))
            .unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
        producer.abort_transaction(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        producer
            .send(BaseRecord::<(), str>::to(&t).payload("committed"))
            .unwrap();
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap();
    })
    .await
    .unwrap();
    let t = topic.clone();
    let committed = tokio::task::spawn_blocking(move || read_all(&t, "read_committed", 1))
        .await
        .unwrap();
    assert_eq!(committed, vec!["committed".to_string()]);
    // The aborted record is really in the log: a read_uncommitted reader sees it.
    let uncommitted = tokio::task::spawn_blocking(move || read_all(&topic, "read_uncommitted", 2))
        .await
        .unwrap();
    assert_eq!(
        uncommitted,
        vec!["aborted".to_string(), "committed".to_string()]
    );
}

#[tokio::test]
async fn the_same_dedup_token_lands_once() {
    require_stack();
    let ch = admin();
    let db = unique("dedup");
    ch.query(&format!("CREATE DATABASE {db}"), &[])
        .await
        .unwrap();
    ch.query(
        &format!(
            "CREATE TABLE {db}.t (x UInt32) ENGINE = MergeTree ORDER BY x \
             SETTINGS non_replicated_deduplication_window = 100"
        ),
        &[],
    )
    .await
    .unwrap();
    let insert = |token: &'static str| {
        let ch = ch.clone();
        let db = db.clone();
        async move {
            ch.query(
                &format!("INSERT INTO {db}.t SETTINGS insert_deduplication_token = '{token}', async_insert = 0 VALUES (1), (2), (3)"),
                &[],
            )
            .await
            .unwrap();
        }
    };
    insert("a").await;
    insert("a").await;
    let count = ch
        .query(&format!("SELECT count() FROM {db}.t"), &[])
        .await
        .unwrap();
    assert_eq!(count.trim(), "3", "same token twice: one copy");
    insert("b").await;
    let count = ch
        .query(&format!("SELECT count() FROM {db}.t"), &[])
        .await
        .unwrap();
    assert_eq!(count.trim(), "6", "another token: a second copy");
    ch.query(&format!("DROP DATABASE {db}"), &[]).await.unwrap();
}

#[tokio::test]
async fn the_real_rate_proxy_allows_one_request_per_minute_and_one_mebibyte() {
    require_stack();
    edgelog::clickhouse::install_crypto_provider();
    let client = reqwest::Client::builder()
        .local_address(fresh_loopback_ip())
        .build()
        .unwrap();
    let ping = || client.get(format!("{PROXY}/ping")).send();
    assert_eq!(
        ping().await.unwrap().status().as_u16(),
        200,
        "a fresh client IP gets its first request"
    );
    assert_eq!(
        ping().await.unwrap().status().as_u16(),
        503,
        "the second within the minute is refused"
    );

    let other = reqwest::Client::builder()
        .local_address(fresh_loopback_ip())
        .build()
        .unwrap();
    let big = vec![b'x'; 1_200_000];
    let status = other
        .post(format!("{PROXY}/"))
        .body(big)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 413, "bodies over nginx's default 1 MiB are refused");
}

/// `edgelog setup` owns `retention.ms` only: re-running it on topics an operator tuned keeps
/// their other settings (Kafka's AlterConfigs would reset whatever the request leaves out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_keeps_topic_settings_it_does_not_own() {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ConfigSource, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    require_stack();
    let mut settings = isolated_settings();
    edgelog::setup::create_topics(&settings).await.unwrap();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .create()
        .unwrap();
    let opts = AdminOptions::new();
    let topic = settings.topics.anonymized.clone();
    let tuned = AlterConfig::new(ResourceSpecifier::Topic(&topic))
        .set("retention.ms", "3600000")
        .set("min.insync.replicas", "1")
        .set("max.message.bytes", "2000000")
        .set("cleanup.policy", "delete");
    for r in admin.alter_configs([&tuned], &opts).await.unwrap() {
        r.unwrap();
    }

    settings.topics.retention = Duration::from_secs(2 * 24 * 3600);
    edgelog::setup::create_topics(&settings).await.unwrap();

    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&topic)], &opts)
        .await
        .unwrap();
    let resource = described.into_iter().next().unwrap().unwrap();
    let dynamic = |name: &str| {
        let e = resource.get(name).unwrap();
        assert_eq!(e.source, ConfigSource::DynamicTopic, "{name}: {e:?}");
        e.value.clone().unwrap()
    };
    assert_eq!(
        dynamic("retention.ms"),
        "172800000",
        "setup's own setting applied"
    );
    assert_eq!(dynamic("min.insync.replicas"), "1");
    assert_eq!(dynamic("max.message.bytes"), "2000000");
    assert_eq!(dynamic("cleanup.policy"), "delete");
}

/// A recreated topic gets a new id: what binds the loader's dedup tokens to the topic's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_has_a_new_id() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    require_stack();
    let settings = isolated_settings();
    edgelog::setup::create_topics(&settings).await.unwrap();
    let topic = settings.topics.anonymized.clone();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .create()
        .unwrap();
    let id = |topic: &str| {
        edgelog::topic_id::topic_id(admin.inner(), topic, Duration::from_secs(10)).unwrap()
    };
    let first = id(&topic);
    assert_eq!(first.len(), 22, "{first}");
    assert_ne!(first, edgelog::topic_id::ZERO_TOPIC_ID);
    assert_eq!(id(&topic), first, "stable while the topic lives");
    assert_ne!(id(&settings.topics.input), first, "each topic its own");

    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.delete_topics(&[&topic], &opts).await.unwrap() {
        r.unwrap();
    }
    // Deletion is asynchronous in the controller: create again until the name is free.
    wait_for(
        "a new id after recreating the topic",
        Duration::from_secs(60),
        || {
            let (settings, admin, topic, first) = (&settings, &admin, &topic, &first);
            async move {
                edgelog::setup::create_topics(settings).await.unwrap();
                edgelog::topic_id::topic_id(admin.inner(), topic, Duration::from_secs(10))
                    .ok()
                    .filter(|second| second != first)
            }
        },
    )
    .await;
    let missing =
        edgelog::topic_id::topic_id(admin.inner(), "no_such_topic_x", Duration::from_secs(10));
    assert!(missing.is_err(), "{missing:?}");
}
