//! Stage one on the real broker: records/s and CPU/record of the transactional anonymizer at
//! several transaction sizes, against a plain non-transactional passthrough (consume + produce the
//! same bytes, auto-commit) on the same broker in the same run. Needs the local stack.
//!
//!   scripts/stack.sh up && cargo bench --bench stage_one [-- RECORDS]   (default 1,000,000)
//!
//! On another cluster, as the stages are pointed at one: `EDGELOG_KAFKA__BROKERS` and
//! `EDGELOG_TOPICS__REPLICATION_FACTOR` (e.g. the local three-node cluster of
//! `scripts/stack.sh cluster-up`: 127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094 and 3).
//!
//! CPU is this process's user+system time (/proc/self/stat) per record: the anonymizer or the
//! passthrough run in-process, so librdkafka's threads are included.

use std::time::{Duration, Instant};

use edgelog::config::Settings;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// The brokers to measure on: `EDGELOG_KAFKA__BROKERS`, or the local single broker.
fn brokers() -> String {
    std::env::var("EDGELOG_KAFKA__BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn settings(tag: &str) -> Settings {
    let id = format!("bench_{tag}_{}", uuid::Uuid::new_v4().simple());
    let mut s = Settings::default();
    s.kafka.brokers = brokers();
    if let Ok(rf) = std::env::var("EDGELOG_TOPICS__REPLICATION_FACTOR") {
        s.topics.replication_factor = rf.parse().expect("a replication factor");
    }
    s.topics.input = format!("{id}_in");
    s.topics.anonymized = format!("{id}_anon");
    s.topics.dead_letter = format!("{id}_dlq");
    s.anonymizer.group_id = format!("{id}_g");
    s.anonymizer.metrics_listen = None;
    s.producer.metrics_listen = None;
    s.producer.rate = 0.0;
    s
}

/// A client that reads `group`'s committed offsets (it never joins the group).
fn offsets_reader(group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap()
}

/// Every partition's committed offset (of the reader's group) has reached its high watermark.
fn caught_up(c: &BaseConsumer, topic: &str) -> bool {
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    committed.elements().iter().all(|e| {
        let (_, high) = c
            .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
            .unwrap();
        matches!(e.offset(), Offset::Offset(o) if o >= high)
    })
}

async fn fill(s: &Settings, n: u64) {
    edgelog::setup::create_topics(s).await.unwrap();
    let mut s = s.clone();
    s.producer.count = Some(n);
    let r = edgelog::producer::run(&s, std::future::pending::<()>())
        .await
        .unwrap();
    assert_eq!(r.delivered, n);
}

async fn anonymizer(n: u64, txn_records: usize, txn_duration: Duration) -> (f64, f64) {
    let mut s = settings("txn");
    s.anonymizer.txn_max_records = txn_records;
    s.anonymizer.txn_max_duration = txn_duration;
    fill(&s, n).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let task = {
        let s = s.clone();
        tokio::spawn(async move { edgelog::anonymizer::run(&s, stopped).await })
    };
    let reader = std::sync::Arc::new(offsets_reader(&s.anonymizer.group_id));
    loop {
        let (r, t) = (reader.clone(), s.topics.input.clone());
        if tokio::task::spawn_blocking(move || caught_up(&r, &t))
            .await
            .unwrap()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    (n as f64 / elapsed, cpu * 1e9 / n as f64)
}

fn passthrough(s: &Settings, n: u64) -> (f64, f64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{}_plain", s.anonymizer.group_id))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("batch.size", "1000000")
        .create()
        .unwrap();
    consumer.subscribe(&[&s.topics.input]).unwrap();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            let mut rec = BaseRecord::<[u8], [u8]>::to(&s.topics.anonymized)
                .partition(m.partition())
                .payload(m.payload().unwrap());
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            done += 1;
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    (
        n as f64 / t0.elapsed().as_secs_f64(),
        (cpu_seconds() - cpu0) * 1e9 / n as f64,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let plain = settings("plain");
    println!(
        "stage one on Kafka {}, {n} records, 4 partitions, {} replica(s)",
        plain.kafka.brokers, plain.topics.replication_factor
    );
    fill(&plain, n).await;
    let (plain_rate, plain_cpu) = tokio::task::spawn_blocking(move || passthrough(&plain, n))
        .await
        .unwrap();
    println!("| mode | records/s | % of passthrough | CPU ns/record |");
    println!("|---|---:|---:|---:|");
    println!(
        "| passthrough (no transactions, no transform) | {plain_rate:.0} | 100% | {plain_cpu:.0} |"
    );
    for (records, ms) in [(1_000, 100), (10_000, 500), (50_000, 2_000)] {
        let (rate, cpu) = anonymizer(n, records, Duration::from_millis(ms)).await;
        println!(
            "| anonymizer, transactions of <= {records} records / {ms} ms | {rate:.0} | {:.0}% | {cpu:.0} |",
            100.0 * rate / plain_rate
        );
    }
}
