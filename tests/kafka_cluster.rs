//! On the real three-node Kafka cluster (`scripts/stack.sh cluster-up`: KRaft, replication factor
//! 3, min.insync.replicas 2, unclean leader election off), with the local stack's ClickHouse and
//! fast proxy: `edgelog setup` creates replicated topics, and the pipeline stays exactly-once
//! while the node leading an input partition, then the node coordinating the anonymizer's
//! transactions, is SIGKILLed mid-run and brought back (the stages restarted if they exit, as an
//! orchestrator would; the exits are printed).
//!
//! The tests kill nodes, so they take turns (one lock) and start only once every replica is in
//! sync. Without the cluster they fail, saying how to start it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use edgelog::config::{KafkaOptions, Settings};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

const CLUSTER: &str = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094";
const STACK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack.sh");

/// One test at a time touches the cluster: two nodes down at once would stop writes.
static CLUSTER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn require_cluster() {
    let nodes: Vec<(&str, &str)> = CLUSTER
        .split(',')
        .map(|addr| ("Kafka cluster node", addr))
        .collect();
    require_listening(
        &nodes,
        "These tests need the three-node cluster: run `scripts/stack.sh cluster-up` \
         (scripts/test.sh starts it).",
    );
}

/// Runs `scripts/stack.sh ARGS` (off the runtime: it blocks for seconds) and returns its output;
/// panics with its error output if it fails.
async fn stack(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(STACK)
            .args(&args)
            .output()
            .expect("running scripts/stack.sh");
        assert!(
            out.status.success(),
            "stack.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
    .await
    .unwrap()
}

/// The node id `stack.sh cluster-role ...` names.
async fn node_holding(role: &[&str]) -> u32 {
    let mut args = vec!["cluster-role"];
    args.extend_from_slice(role);
    let out = stack(&args).await;
    out.parse()
        .unwrap_or_else(|_| panic!("cluster-role {role:?} printed {out:?}"))
}

async fn wait_in_sync() {
    stack(&["cluster-wait-in-sync", "300"]).await;
}

fn cluster_settings() -> Settings {
    let mut s = fast_loader_settings();
    s.kafka.brokers = CLUSTER.into();
    s.topics.replication_factor = 3;
    s.validated().expect("valid settings")
}

/// Replicas of each partition of `topic`, from the cluster's metadata.
fn replicas(topic: &str) -> Vec<usize> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", CLUSTER)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .unwrap();
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.replicas().len())
        .collect()
}

/// The topic's `min.insync.replicas` as the cluster reports it.
async fn min_insync_replicas(topic: &str) -> String {
    let admin: AdminClient<DefaultClientContext> =
        edgelog::kafka::client_config(&cluster_settings().kafka, &KafkaOptions::default(), &[])
            .create()
            .unwrap();
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    let resource = described.into_iter().next().unwrap().unwrap();
    resource
        .get("min.insync.replicas")
        .and_then(|e| e.value.clone())
        .expect("min.insync.replicas is described")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn setup_creates_topics_on_three_replicas_with_min_isr_two_and_refuses_more_replicas() {
    require_cluster();
    let _turn = CLUSTER_LOCK.lock().await;
    wait_in_sync().await;
    let s = cluster_settings();
    let created = edgelog::setup::create_topics(&s).await.unwrap();
    assert_eq!(created.len(), 4, "{created:?}");
    for topic in [
        &s.topics.input,
        &s.topics.anonymized,
        &s.topics.dead_letter,
        &s.topics.loader_dead_letter,
    ] {
        let t = topic.clone();
        let r = tokio::task::spawn_blocking(move || replicas(&t))
            .await
            .unwrap();
        assert_eq!(r, vec![3; s.topics.partitions as usize], "{topic}");
        assert_eq!(min_insync_replicas(topic).await, "2", "{topic}");
    }
    // Run again: nothing created, nothing refused.
    assert!(edgelog::setup::create_topics(&s).await.unwrap().is_empty());

    // An explicit min.insync.replicas wins over the derived one.
    let mut strict = cluster_settings();
    strict.topics.min_insync_replicas = Some(3);
    edgelog::setup::create_topics(&strict).await.unwrap();
    assert_eq!(min_insync_replicas(&strict.topics.input).await, "3");

    // Four replicas on three brokers: refused before anything is created, naming the setting.
    let mut four = cluster_settings();
    four.topics.replication_factor = 4;
    let err = edgelog::setup::create_topics(&four)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("topics.replication_factor is 4"), "{err}");
    assert!(err.contains("3 broker(s) up"), "{err}");
    let input = four.topics.input.clone();
    let exists = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", CLUSTER)
            .create()
            .unwrap();
        let md = c.fetch_metadata(None, Duration::from_secs(30)).unwrap();
        md.topics().iter().any(|t| t.name() == input)
    })
    .await
    .unwrap();
    assert!(!exists, "no topic was created");
}

/// Rows in `http_log`.
async fn rows(s: &Settings) -> u64 {
    count(format!(
        "SELECT count() FROM {}.http_log",
        s.clickhouse.database
    ))
    .await
}

/// Waits until at least `more` rows beyond `from` have landed: the pipeline makes progress.
async fn wait_progress(s: &Settings, from: u64, more: u64, while_what: &str) -> u64 {
    wait_for(
        &format!("{more} more rows in ClickHouse {while_what}"),
        Duration::from_secs(180),
        || async move {
            let n = rows(s).await;
            (n >= from + more).then_some(n)
        },
    )
    .await
}

/// A stage binary restarted whenever it exits, as an orchestrator would, until dropped. On its
/// own thread (not the runtime's), so a failing assertion never waits for it.
struct Supervised {
    stop: Arc<AtomicBool>,
    exits: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervised {
    fn start(
        name: &'static str,
        make: impl Fn() -> std::process::Command + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let exits = Arc::new(Mutex::new(Vec::new()));
        let (stop2, exits2) = (stop.clone(), exits.clone());
        let thread = std::thread::spawn(move || {
            let mut child = KillOnDrop::spawn(&mut make());
            while !stop2.load(Ordering::Relaxed) {
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("the {name} exited ({status}); starting it again");
                    exits2.lock().unwrap().push(status.to_string());
                    child = KillOnDrop::spawn(&mut make());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            terminate(&child);
            let status = child.wait().unwrap();
            assert!(status.success(), "the {name} stops cleanly: {status}");
        });
        Supervised {
            stop,
            exits,
            thread: Some(thread),
        }
    }

    /// Stops it with SIGTERM (a clean stop exits 0) and returns the unexpected exits before.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let clean = self.thread.take().unwrap().join();
        assert!(clean.is_ok(), "the stage did not stop cleanly");
        self.exits.lock().unwrap().clone()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// SIGKILLs `node`, waits for the pipeline to make progress without it, starts it again and
/// waits until it has caught up.
async fn kill_and_recover(s: &Settings, node: u32, what: &str) {
    let node = node.to_string();
    let before = rows(s).await;
    eprintln!("killing node {node} ({what}) at {before} rows");
    stack(&["cluster-node", &node, "kill"]).await;
    let after = wait_progress(s, before, 1000, &format!("with {what} (node {node}) dead")).await;
    eprintln!("{after} rows with node {node} dead; starting it again");
    stack(&["cluster-node", &node, "start"]).await;
    wait_in_sync().await;
}

// Rows must keep landing within `wait_progress`'s 180 s with a node dead: the anonymizer's calls
// have deadlines in `anonymizer.txn_timeout` (10 s here), and its watchdog ends it 30 s past a
// call's deadline or after 3 × 10 s + 90 s = 120 s without progress (the supervisor then restarts
// it), so a stall like the one of 2026-12-04 (180 s retrying `send_offsets_to_transaction`) fails
// this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipeline_stays_exactly_once_when_the_partition_leader_and_the_txn_coordinator_are_killed()
{
    require_stack();
    require_cluster();
    let _turn = CLUSTER_LOCK.lock().await;
    wait_in_sync().await;
    let mut s = cluster_settings();
    s.anonymizer.txn_max_records = 500;
    edgelog::setup::create_topics(&s).await.unwrap();
    edgelog::setup::apply_schema(&s).await.unwrap();

    // Input flows at a steady rate until both faults are over. The stages are the real binaries,
    // restarted if they exit (the loader does when its group membership expired while the
    // coordinator was gone: a commit answered UnknownMemberId).
    let mut p = s.clone();
    p.producer.rate = 200.0;
    let (stop_producer, producer_stopped) = tokio::sync::oneshot::channel::<()>();
    let producer = tokio::spawn(async move { edgelog::producer::run(&p, producer_stopped).await });
    let anonymizer = {
        let s = s.clone();
        Supervised::start("anonymizer", move || anonymizer_command(&s, "a"))
    };
    let loader = {
        let s = s.clone();
        Supervised::start("loader", move || loader_command(&s))
    };
    wait_progress(&s, 0, 1000, "before any fault").await;

    let leader = node_holding(&["leader", &s.topics.input, "0"]).await;
    kill_and_recover(&s, leader, "the leader of input partition 0").await;
    let txn_id = edgelog::anonymizer::transactional_id(&s.anonymizer.group_id, "a");
    let coordinator = node_holding(&["txn-coordinator", &txn_id]).await;
    kill_and_recover(&s, coordinator, "the anonymizer's transaction coordinator").await;

    stop_producer.send(()).unwrap();
    let report = producer.await.unwrap().unwrap();
    assert_eq!(report.failed, 0, "the producer lost nothing: {report:?}");
    let audit = edgelog::verify::audit_when_drained(&s, Duration::from_secs(300))
        .await
        .unwrap();
    assert!(audit.is_clean() && audit.is_drained(), "{audit}");
    let stored: u64 = audit.partitions.iter().map(|p| p.landed).sum();
    assert_eq!(stored, report.delivered, "{audit}");
    assert_loaded_exactly_once(&s, report.delivered).await;
    eprintln!(
        "exits: anonymizer {:?}, loader {:?}",
        anonymizer.finish(),
        loader.finish()
    );

    // Kafka's own state is replicated like the topics: transactions and group offsets survive a
    // node too.
    for internal in ["__transaction_state", "__consumer_offsets"] {
        let r = tokio::task::spawn_blocking(move || replicas(internal))
            .await
            .unwrap();
        assert!(
            !r.is_empty() && r.iter().all(|&n| n == 3),
            "{internal}: {r:?}"
        );
    }
    admin()
        .query(&format!("DROP DATABASE {}", s.clickhouse.database), &[])
        .await
        .unwrap();
}
