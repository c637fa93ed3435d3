//! Stage two keeps exactly-once on real Kafka, nginx and ClickHouse when the loader crashes at
//! each step of a batch, with and without `insert_deduplication_token`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use edgelog::config::Settings;

fn loader_command(s: &Settings) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loader"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("EDGELOG_KAFKA__BROKERS", &s.kafka.brokers)
        .env("EDGELOG_TOPICS__ANONYMIZED", &s.topics.anonymized)
        .env("EDGELOG_LOADER__GROUP_ID", &s.loader.group_id)
        .env("EDGELOG_LOADER__SLOT_SPACING", "300ms")
        .env("EDGELOG_LOADER__METRICS_LISTEN", "127.0.0.1:0")
        .env(
            "EDGELOG_LOADER__DEDUP_TOKEN",
            s.loader.dedup_token.to_string(),
        )
        .env(
            "EDGELOG_LOADER__SOURCE_ADDRESS",
            s.loader.source_address.unwrap().to_string(),
        )
        .env("EDGELOG_CLICKHOUSE__URL", &s.clickhouse.url)
        .env("EDGELOG_CLICKHOUSE__DATABASE", &s.clickhouse.database)
        .env(
            "EDGELOG_CLICKHOUSE__PASSWORD",
            s.clickhouse.password.expose(),
        )
        .env("EDGELOG_LOG__LEVEL", "warn")
        // A SIGKILLed member holds its partitions until its session times out: keep that short.
        .env("EDGELOG_KAFKA__OPTIONS__SESSION_TIMEOUT_MS", "6000")
        .env("EDGELOG_KAFKA__OPTIONS__HEARTBEAT_INTERVAL_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

async fn count(sql: String) -> u64 {
    admin()
        .query(&sql, &[])
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Fills the anonymized topic with `n` records (producer + in-process anonymizer) and returns
/// how many good (non-garbage) records it holds.
async fn anonymized_topic_with(s: &mut Settings, n: u64) -> u64 {
    edgelog::setup::create_topics(s).await.unwrap();
    edgelog::setup::apply_schema(s).await.unwrap();
    s.producer.rate = 0.0;
    s.producer.count = Some(n);
    let report = edgelog::producer::run(s, std::future::pending::<()>())
        .await
        .unwrap();
    let good = report.sent - report.garbage;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let anonymizer = {
        let s = s.clone();
        tokio::spawn(async move { edgelog::anonymizer::run(&s, stopped).await })
    };
    let topic = s.topics.anonymized.clone();
    let brokers = s.kafka.brokers.clone();
    wait_for(
        "the anonymized topic to hold every record",
        Duration::from_secs(120),
        || {
            let (topic, brokers) = (topic.clone(), brokers.clone());
            async move {
                let total =
                    tokio::task::spawn_blocking(move || committed_records(&brokers, &topic))
                        .await
                        .unwrap();
                (total >= good).then_some(())
            }
        },
    )
    .await;
    stop.send(()).unwrap();
    anonymizer.await.unwrap().unwrap();
    good
}

/// Records readable with read_committed in `topic` (counted by reading them).
fn committed_records(brokers: &str, topic: &str) -> u64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("count"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut n = 0;
    let mut eofs = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(_)) => n += 1,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                eofs += 1;
                if eofs >= 3 {
                    break;
                }
            }
            Some(Err(e)) => panic!("{e}"),
            None => {}
        }
    }
    n
}

async fn assert_exactly_once(s: &Settings, good: u64) {
    let db = &s.clickhouse.database;
    assert_eq!(
        count(format!("SELECT count() FROM {db}.http_log")).await,
        good,
        "one copy of each row"
    );
    assert_eq!(
        count(format!(
            "SELECT uniqExact(source_partition, source_offset) FROM {db}.http_log"
        ))
        .await,
        good
    );
    assert_eq!(
        count(format!("SELECT sum(requests) FROM {db}.http_log_totals")).await,
        good,
        "totals equal a recount from http_log"
    );
}

/// Crash at `failpoint`, restart, and check the result. Returns the rows ClickHouse held right
/// after the crash (to show which side of the insert the crash was on).
async fn crash_then_recover(dedup_token: bool, failpoint: &str) -> u64 {
    require_stack();
    let mut s = isolated_settings();
    s.loader.dedup_token = dedup_token;
    s.loader.source_address = Some(fresh_loopback_ip());
    let good = anonymized_topic_with(&mut s, 5_000).await;

    let status = loader_command(&s)
        .env("LOADER_FAILPOINT", failpoint)
        .status()
        .unwrap();
    assert!(
        !status.success(),
        "the loader crashed at {failpoint}: {status}"
    );
    let db = s.clickhouse.database.clone();
    let after_crash = count(format!("SELECT count() FROM {db}.http_log")).await;

    let mut child = loader_command(&s).spawn().unwrap();
    wait_for("every row in ClickHouse", Duration::from_secs(120), || {
        let sql = format!("SELECT count() FROM {db}.http_log");
        async move { (count(sql).await >= good).then_some(()) }
    })
    .await;
    // Give a wrongly re-sent batch the chance to land: wait until the loader has committed past
    // everything (it commits only after ClickHouse confirmed), then check.
    let group = s.loader.group_id.clone();
    let topic = s.topics.anonymized.clone();
    wait_for(
        "the loader to commit past every batch",
        Duration::from_secs(60),
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move {
                tokio::task::spawn_blocking(move || no_pending_batch(&group, &topic))
                    .await
                    .unwrap()
                    .then_some(())
            }
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_exactly_once(&s, good).await;
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
    after_crash
}

/// True when the group's committed offsets reach the end of every partition with no recorded batch.
fn no_pending_batch(group: &str, topic: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", group)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    committed.elements().iter().all(|e| {
        let (_, high) = consumer
            .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
            .unwrap();
        // Transaction markers sit after the last record: committed may be just below `high`.
        let near_end = matches!(e.offset(), Offset::Offset(o) if o >= high - 1) || high == 0;
        near_end && e.metadata().is_empty()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_recording_the_ranges() {
    let rows_after_crash = crash_then_recover(true, "after_record").await;
    assert_eq!(rows_after_crash, 0, "nothing was sent before the crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_clickhouse_answered_before_commit() {
    let rows_after_crash = crash_then_recover(true, "after_response").await;
    assert!(
        rows_after_crash > 0,
        "the first batch had landed before the crash, so the restart re-sent it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_clickhouse_answered_without_dedup_token() {
    // Token-less mode (ClickHouse 22.1 had no insert_deduplication_token): the rebuilt batch is
    // byte-identical, so ClickHouse's block-hash dedup drops it.
    let rows_after_crash = crash_then_recover(false, "after_response").await;
    assert!(rows_after_crash > 0);
}
