//! Stage one keeps exactly-once on real Kafka through SIGKILLs, a second instance and a zombie.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use edgelog::config::Settings;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;

/// Starts the real `anonymizer` binary with `settings` passed through the environment.
fn spawn_anonymizer(s: &Settings, instance: &str) -> KillOnDrop {
    KillOnDrop::spawn(&mut anonymizer_command(s, instance))
}

/// Reads the anonymized and dead-letter topics with read_committed until `expected` source
/// offsets were seen and nothing more arrived for `settle`. Returns (source partition, offset) ->
/// copies. Panics at `timeout` unless `expected` were seen.
fn read_output(
    s: &Settings,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> BTreeMap<(i32, i64), usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .set("group.id", unique("audit"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&s.topics.anonymized, &s.topics.dead_letter])
        .unwrap();
    let mut seen: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    let mut quiet = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = if m.topic() == s.topics.anonymized {
                    let r = edgelog::anon_record::decode(m.payload().unwrap()).unwrap();
                    (r.source_partition, r.source_offset)
                } else {
                    use rdkafka::message::Headers;
                    let h = m.headers().unwrap();
                    let get = |name: &str| {
                        let v = h.iter().find(|x| x.key == name).unwrap().value.unwrap();
                        std::str::from_utf8(v).unwrap().parse::<i64>().unwrap()
                    };
                    (
                        get("edgelog.source.partition") as i32,
                        get("edgelog.source.offset"),
                    )
                };
                *seen.entry(key).or_default() += 1;
                quiet = Instant::now();
            }
            Some(Err(e)) => panic!("{e}"),
            None if seen.len() >= expected && quiet.elapsed() >= settle => break,
            None => {}
        }
        if settle.is_zero() && seen.len() >= expected {
            break;
        }
    }
    assert!(
        seen.len() >= expected,
        "only {} of {expected} records arrived within {timeout:?}",
        seen.len()
    );
    seen
}

const SETTLE: Duration = Duration::from_secs(5);

/// Offsets of every record in the input topic (the ground truth), read_committed.
fn input_offsets(s: &Settings, expected: usize) -> Vec<(i32, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .set("group.id", unique("truth"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[&s.topics.input]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            out.push((m.partition(), m.offset()));
        }
    }
    out.sort();
    out
}

fn assert_exactly_once(seen: &BTreeMap<(i32, i64), usize>, truth: &[(i32, i64)]) {
    let duplicated: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).take(10).collect();
    assert!(duplicated.is_empty(), "duplicates: {duplicated:?}");
    let missing: Vec<_> = truth
        .iter()
        .filter(|k| !seen.contains_key(k))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert_eq!(seen.len(), truth.len(), "nothing unexpected");
}

/// Reads every input offset and the output (read_committed) and asserts that each input offset
/// is in the output exactly once, and nothing else is. Returns the output's offsets.
async fn assert_output_exactly_once(
    s: &Settings,
    expected: usize,
    timeout: Duration,
) -> BTreeMap<(i32, i64), usize> {
    let s = s.clone();
    let (truth, seen) = tokio::task::spawn_blocking(move || {
        let truth = input_offsets(&s, expected);
        (truth, read_output(&s, expected, timeout, SETTLE))
    })
    .await
    .unwrap();
    assert_eq!(truth.len(), expected, "input offsets read");
    assert_exactly_once(&seen, &truth);
    seen
}

fn settings() -> Settings {
    let mut s = isolated_settings();
    s.topics.partitions = 4;
    s.anonymizer.txn_max_records = 300;
    s.producer.rate = 0.0;
    s.producer.garbage_share = 0.01;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    require_stack();
    let mut s = settings();
    edgelog::setup::create_topics(&s).await.unwrap();
    let total = 40_000u64;
    // The producer runs while the anonymizer is killed and restarted.
    s.producer.count = Some(total);
    s.producer.rate = 8_000.0;
    let producer = {
        let s = s.clone();
        tokio::spawn(async move { edgelog::producer::run(&s, std::future::pending::<()>()).await })
    };
    let mut rng = uuid::Uuid::new_v4().as_u128();
    let mut kills = 0;
    for _ in 0..8 {
        let mut child = spawn_anonymizer(&s, "0");
        rng = rng.rotate_left(7) ^ 0x9e37_79b9;
        let alive = Duration::from_millis(300 + (rng % 1700) as u64);
        tokio::time::sleep(alive).await; // the kill moment itself is the random variable under test
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let report = producer.await.unwrap().unwrap();
    assert_eq!(report.delivered, total);
    // A final clean run drains the rest.
    let mut child = spawn_anonymizer(&s, "0");
    assert_output_exactly_once(&s, total as usize, Duration::from_secs(180)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(kills, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_work_and_one_takes_over_when_the_other_dies() {
    require_stack();
    let mut s = settings();
    edgelog::setup::create_topics(&s).await.unwrap();
    let total = 20_000u64;
    s.producer.count = Some(total);
    s.producer.rate = 5_000.0;
    let producer = {
        let s = s.clone();
        tokio::spawn(async move { edgelog::producer::run(&s, std::future::pending::<()>()).await })
    };
    let mut a = spawn_anonymizer(&s, "a");
    let mut b = spawn_anonymizer(&s, "b");
    // Kill one mid-stream: once output is flowing and well before the producer is done.
    tokio::task::spawn_blocking({
        let s = s.clone();
        move || read_output(&s, 3_000, Duration::from_secs(60), Duration::ZERO)
    })
    .await
    .unwrap();
    b.kill().unwrap();
    b.wait().unwrap();
    producer.await.unwrap().unwrap();
    assert_output_exactly_once(&s, total as usize, Duration::from_secs(180)).await;
    a.kill().unwrap();
    a.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_with_the_same_transactional_id_is_fenced() {
    require_stack();
    let mut s = settings();
    edgelog::setup::create_topics(&s).await.unwrap();
    s.producer.count = Some(1_000);
    edgelog::producer::run(&s, std::future::pending::<()>())
        .await
        .unwrap();
    let mut zombie = spawn_anonymizer(&s, "same");
    // Wait until the first instance has output, so it is mid-life, not starting.
    tokio::task::spawn_blocking({
        let s = s.clone();
        move || read_output(&s, 1, Duration::from_secs(60), Duration::ZERO)
    })
    .await
    .unwrap();
    let mut successor = spawn_anonymizer(&s, "same");
    // The successor's init_transactions fences the zombie: its next transactional call fails
    // fatally and it exits non-zero on its own. A zombie with a transaction open is fenced at
    // once; an idle one only by its next transactional call, which needs input on its partitions
    // after the fencing. The successor joins the group only once its transactions are
    // initialised, so produce the second batch once the zombie is gone or both are members.
    // (Producing at once let an idle zombie commit the whole batch before the successor's
    // init_transactions; it never made another transactional call and was never fenced.)
    let deadline = Instant::now() + Duration::from_secs(60);
    while zombie.try_wait().unwrap().is_none() {
        let group = s.anonymizer.group_id.clone();
        if tokio::task::spawn_blocking(move || stable_members(&group) == Some(2))
            .await
            .unwrap()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the successor never joined the group"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.producer.count = Some(1_000);
    s.producer.seed = 2;
    edgelog::producer::run(&s, std::future::pending::<()>())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = zombie.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the zombie was not fenced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        !status.success(),
        "a fenced instance exits non-zero: {status}"
    );
    assert_output_exactly_once(&s, 2_000, Duration::from_secs(120)).await;
    assert!(
        successor.try_wait().unwrap().is_none(),
        "the successor keeps running"
    );
    successor.kill().unwrap();
    successor.wait().unwrap();
}

/// Records on `topic` as a read_uncommitted consumer sees them: aborted ones included.
fn count_uncommitted(s: &Settings, topic: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .set("group.id", unique("uncommitted"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let (mut n, mut ends) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ends < s.topics.partitions && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(_)) => n += 1,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => ends += 1,
            _ => {}
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_are_rewound_and_redone_exactly_once() {
    require_stack();
    let mut s = settings();
    edgelog::setup::create_topics(&s).await.unwrap();
    let total = 6_000u64;
    s.producer.count = Some(total);
    s.producer.rate = 0.0;
    edgelog::producer::run(&s, std::future::pending::<()>())
        .await
        .unwrap();
    // Every third transaction is aborted instead of committed: its output must vanish and its
    // input be read again from the committed offsets.
    let mut child =
        KillOnDrop::spawn(anonymizer_command(&s, "0").env("ANONYMIZER_FAILPOINT", "abort_every:3"));
    let seen = assert_output_exactly_once(&s, total as usize, Duration::from_secs(120)).await;
    child.kill().unwrap();
    let written = tokio::task::spawn_blocking({
        let s = s.clone();
        move || count_uncommitted(&s, &s.topics.anonymized)
    })
    .await
    .unwrap();
    let anonymized = seen.len() - (total as usize / 100); // minus about 1% garbage
    assert!(
        written > anonymized + 300,
        "aborted transactions wrote records that read_committed never showed: {written} written"
    );
}
