//! Shared helpers of the integration tests. They need the local stack (`scripts/stack.sh up`):
//! real Apache Kafka on 127.0.0.1:9092, real ClickHouse on 8123, nginx proxies on 8124 (1r/m, the
//! original) and 8125 (600r/m, for tests that need many slots). A missing server fails the test
//! with a message saying how to start it; nothing is skipped silently.

#![allow(dead_code)]

pub mod hostile;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use edgelog::clickhouse::ClickHouseClient;
use edgelog::config::Settings;

pub const KAFKA: &str = "127.0.0.1:9092";
pub const CLICKHOUSE: &str = "http://127.0.0.1:8123";
pub const PROXY: &str = "http://127.0.0.1:8124";
pub const FAST_PROXY: &str = "http://127.0.0.1:8125";
pub const LOADER_PASSWORD: &str = "edgelog-dev-password";

/// Panics with instructions unless every server of the stack accepts connections.
pub fn require_stack() {
    require_listening(
        &[
            ("Kafka", "127.0.0.1:9092"),
            ("ClickHouse", "127.0.0.1:8123"),
            ("proxy (1r/m)", "127.0.0.1:8124"),
            ("fast proxy", "127.0.0.1:8125"),
        ],
        "Integration tests need the local stack: run `scripts/stack.sh up` (or \
         `scripts/test.sh`, which starts it).",
    );
}

/// Panics with `{name} is not running on {addr}. {how_to_start}` unless every `(name, addr)`
/// accepts connections.
pub fn require_listening(servers: &[(&str, &str)], how_to_start: &str) {
    for (name, addr) in servers {
        let sock: SocketAddr = addr.parse().unwrap();
        if TcpStream::connect_timeout(&sock, Duration::from_secs(2)).is_err() {
            panic!("{name} is not running on {addr}. {how_to_start}");
        }
    }
}

/// `n` records of the producer's model on `partition` (offsets from 0), as stage one writes them
/// to the anonymized topic.
pub fn realistic_records(n: usize, partition: i32) -> Vec<edgelog::anon_record::AnonRecord> {
    use edgelog::anon_record::{decode, transform};
    let mut model = edgelog::synth::TrafficModel::new(&Default::default());
    let start = edgelog::clock::now_epoch_ms();
    (0..n)
        .map(|i| {
            let payload = edgelog::record::encode_capnp(&model.next_record(start + i as u64));
            decode(&transform(&payload, partition, i as i64, 48).unwrap().0).unwrap()
        })
        .collect()
}

/// A name unique to this test run, usable as a topic, group or database name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Settings for an isolated pipeline: own topics, groups and database.
pub fn isolated_settings() -> Settings {
    let id = unique("t");
    let mut s = Settings::default();
    s.kafka.brokers = KAFKA.into();
    s.topics.input = format!("{id}_in");
    s.topics.anonymized = format!("{id}_anon");
    s.topics.dead_letter = format!("{id}_dlq");
    s.topics.loader_dead_letter = format!("{id}_anon_dlq");
    s.topics.partitions = 3;
    s.anonymizer.group_id = format!("{id}_anonymizer");
    s.anonymizer.metrics_listen = None;
    s.loader.group_id = format!("{id}_loader");
    s.loader.metrics_listen = None;
    s.producer.metrics_listen = None;
    s.clickhouse.database = id;
    s.clickhouse.admin_url = CLICKHOUSE.into();
    s.clickhouse.url = FAST_PROXY.into();
    s.clickhouse.password = edgelog::config::Secret::new(LOADER_PASSWORD);
    s.validated().expect("test settings are valid")
}

/// [`isolated_settings`] for a loader through the fast proxy: a slot every 300 ms, from an
/// address of its own (the proxy's budget is per client address).
pub fn fast_loader_settings() -> Settings {
    let mut s = isolated_settings();
    s.loader.slot_spacing = Duration::from_millis(300);
    s.loader.source_address = Some(fresh_loopback_ip());
    s
}

pub fn admin() -> ClickHouseClient {
    ClickHouseClient::new(CLICKHOUSE, "default", &Default::default()).expect("a plain-HTTP client")
}

/// The loader's insert client, straight to the stack's ClickHouse as the set-up user.
pub fn admin_insert_client(timeout: Duration) -> edgelog::loader::insert::InsertClient {
    let as_admin = edgelog::config::ClickHouseSettings {
        url: CLICKHOUSE.into(),
        user: "default".into(),
        ..Default::default()
    };
    edgelog::loader::insert::InsertClient::new(&as_admin, None, timeout).unwrap()
}

/// Polls `probe` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Members of consumer group `group` once it is stable; `None` while it rebalances.
pub fn stable_members(group: &str) -> Option<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .create()
        .unwrap();
    let list = c
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .ok()?;
    let g = list.groups().first()?;
    (g.state() == "Stable").then(|| g.members().len())
}

/// Waits until consumer group `group` is stable with `n` members.
pub async fn wait_group_stable(group: &str, n: usize) {
    wait_for(
        &format!("group {group} to be stable with {n} member(s)"),
        Duration::from_secs(60),
        || {
            let group = group.to_string();
            async move {
                tokio::task::spawn_blocking(move || stable_members(&group) == Some(n))
                    .await
                    .unwrap()
                    .then_some(())
            }
        },
    )
    .await;
}

/// A loopback source address unlikely to have used the proxy's budget in the last minute
/// (nginx budgets per client IP; all of 127.0.0.0/8 reaches the proxy on Linux).
pub fn fresh_loopback_ip() -> std::net::IpAddr {
    let n = uuid::Uuid::new_v4().as_u128();
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        77,
        (n >> 8) as u8,
        (n as u8).max(1),
    ))
}

/// Runs a one-number `SELECT` on the admin endpoint.
pub async fn count(sql: impl AsRef<str>) -> u64 {
    count_at(CLICKHOUSE, sql).await
}

/// Runs a one-number `SELECT` as `default` on the ClickHouse at `url` (a shard, say).
pub async fn count_at(url: &str, sql: impl AsRef<str>) -> u64 {
    let client = ClickHouseClient::new(url, "default", &Default::default()).unwrap();
    let text = client.query(sql.as_ref(), &[]).await.unwrap();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text:?} from {} at {url}", sql.as_ref()))
}

/// Per partition of `topic`: (`group`'s committed offset, high watermark, commit metadata).
pub fn committed_vs_end(group: &str, topic: &str) -> Vec<(Option<i64>, i64, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", group)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    // A group's coordinator may not answer yet on a broker that just started (NOT_COORDINATOR,
    // COORDINATOR_LOAD_IN_PROGRESS): ask again until it does.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let committed = loop {
        match c.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(committed) => break committed,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("committed offsets of {group} on {topic}: {e}; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("committed offsets of {group} on {topic}: {e}"),
        }
    };
    committed
        .elements()
        .iter()
        .map(|e| {
            let (_, high) = c
                .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
                .unwrap();
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (offset, high, e.metadata().to_string())
        })
        .collect()
}

/// `group` has committed to the end of `topic` (a topic written without transactions).
pub fn committed_to_end(group: &str, topic: &str) -> bool {
    committed_vs_end(group, topic)
        .iter()
        // An empty partition has nothing to commit (a small run may leave one empty).
        .all(|(c, high, _)| *high == 0 || c.is_some_and(|c| c >= *high))
}

/// A stage running in-process until [`Running::stop`].
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Asks the stage to shut down and returns how it ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

pub fn start_anonymizer(s: &Settings) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = s.clone();
    Running {
        stop,
        task: tokio::spawn(async move { edgelog::anonymizer::run(&s, stopped).await }),
    }
}

pub fn start_loader(s: &Settings) -> Running {
    start_loader_with_health(s, edgelog::health::Health::new(Duration::from_secs(3600)))
}

pub fn start_loader_with_health(
    s: &Settings,
    health: std::sync::Arc<edgelog::health::Health>,
) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = s.clone();
    Running {
        stop,
        task: tokio::spawn(
            async move { edgelog::loader::run_with_health(&s, health, stopped).await },
        ),
    }
}

/// Creates the topics and schema, produces `n` records as fast as possible and anonymizes them
/// all (the anonymizer has committed to the end of the input when this returns).
pub async fn fill_anonymized_topic(s: &Settings, n: u64) -> edgelog::producer::ProducerReport {
    edgelog::setup::create_topics(s).await.unwrap();
    edgelog::setup::apply_schema(s).await.unwrap();
    let mut p = s.clone();
    p.producer.rate = 0.0;
    p.producer.count = Some(n);
    let report = edgelog::producer::run(&p, std::future::pending::<()>())
        .await
        .unwrap();
    assert_eq!(report.delivered, n);
    let anonymizer = start_anonymizer(s);
    let (group, input) = (s.anonymizer.group_id.clone(), s.topics.input.clone());
    wait_for(
        "the anonymizer to commit all input",
        Duration::from_secs(120),
        || {
            let (group, input) = (group.clone(), input.clone());
            async move {
                tokio::task::spawn_blocking(move || committed_to_end(&group, &input))
                    .await
                    .unwrap()
                    .then_some(())
            }
        },
    )
    .await;
    anonymizer
        .stop()
        .await
        .expect("the anonymizer stops cleanly");
    report
}

/// The real `anonymizer` binary configured through the environment, as an orchestrator runs it.
pub fn anonymizer_command(s: &Settings, instance: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_anonymizer"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("EDGELOG_KAFKA__BROKERS", &s.kafka.brokers)
        .env("EDGELOG_TOPICS__INPUT", &s.topics.input)
        .env("EDGELOG_TOPICS__ANONYMIZED", &s.topics.anonymized)
        .env("EDGELOG_TOPICS__DEAD_LETTER", &s.topics.dead_letter)
        .env("EDGELOG_ANONYMIZER__GROUP_ID", &s.anonymizer.group_id)
        .env("EDGELOG_ANONYMIZER__INSTANCE_ID", instance)
        .env(
            "EDGELOG_ANONYMIZER__TXN_MAX_RECORDS",
            s.anonymizer.txn_max_records.to_string(),
        )
        .env("EDGELOG_ANONYMIZER__TXN_MAX_DURATION", "200ms")
        // A SIGKILLed instance's open transaction hides everything after it on its partitions
        // until it times out (when the instance does not come back to fence it): keep it short.
        .env("EDGELOG_ANONYMIZER__TXN_TIMEOUT", "10s")
        .env("EDGELOG_ANONYMIZER__METRICS_LISTEN", "127.0.0.1:0")
        .env("EDGELOG_LOG__LEVEL", "warn");
    short_sessions(&mut cmd);
    cmd
}

/// The real `loader` binary configured through the environment (slots every 300 ms).
/// An `edgelog` operator command (`verify`, `status`) as an operator runs it, configured through
/// the environment.
pub fn edgelog_command(s: &Settings, subcommand: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgelog"));
    cmd.arg(subcommand)
        .env("EDGELOG_KAFKA__BROKERS", &s.kafka.brokers)
        .env("EDGELOG_TOPICS__INPUT", &s.topics.input)
        .env("EDGELOG_TOPICS__ANONYMIZED", &s.topics.anonymized)
        .env("EDGELOG_TOPICS__DEAD_LETTER", &s.topics.dead_letter)
        .env(
            "EDGELOG_TOPICS__LOADER_DEAD_LETTER",
            &s.topics.loader_dead_letter,
        )
        .env("EDGELOG_ANONYMIZER__GROUP_ID", &s.anonymizer.group_id)
        .env("EDGELOG_LOADER__GROUP_ID", &s.loader.group_id)
        .env("EDGELOG_CLICKHOUSE__DATABASE", &s.clickhouse.database)
        .env("EDGELOG_CLICKHOUSE__ADMIN_URL", &s.clickhouse.admin_url);
    cmd
}

pub fn loader_command(s: &Settings) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loader"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("EDGELOG_KAFKA__BROKERS", &s.kafka.brokers)
        .env("EDGELOG_TOPICS__ANONYMIZED", &s.topics.anonymized)
        .env(
            "EDGELOG_TOPICS__LOADER_DEAD_LETTER",
            &s.topics.loader_dead_letter,
        )
        .env("EDGELOG_LOADER__GROUP_ID", &s.loader.group_id)
        .env("EDGELOG_LOADER__SLOT_SPACING", "300ms")
        .env("EDGELOG_LOADER__METRICS_LISTEN", "127.0.0.1:0")
        .env(
            "EDGELOG_LOADER__DEDUP_TOKEN",
            s.loader.dedup_token.to_string(),
        )
        // The setting's values are the Content-Encoding names.
        .env(
            "EDGELOG_LOADER__BODY_COMPRESSION",
            s.loader.body_compression.content_encoding(),
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
        .env("EDGELOG_LOG__LEVEL", "warn");
    short_sessions(&mut cmd);
    cmd
}

/// A SIGKILLed member holds its partitions until its session times out: keep that short.
fn short_sessions(cmd: &mut std::process::Command) {
    cmd.env("EDGELOG_KAFKA__OPTIONS__SESSION_TIMEOUT_MS", "6000")
        .env("EDGELOG_KAFKA__OPTIONS__HEARTBEAT_INTERVAL_MS", "1000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
}

/// True when the group's committed offsets reach the end of every partition with no recorded
/// batch left. The topic is transactional: a commit marker follows the last record, so the loader's
/// committed offset (last record + 1) sits one below the high watermark.
pub fn no_pending_batch(group: &str, topic: &str) -> bool {
    committed_vs_end(group, topic)
        .iter()
        .all(|(c, high, metadata)| {
            metadata.is_empty() && (*high == 0 || c.is_some_and(|c| c >= high - 1))
        })
}

/// Waits until the loader group has no recorded batch left and has committed to the end.
pub async fn wait_no_pending_batch(s: &Settings, what: &str, timeout: Duration) {
    let (group, topic) = (s.loader.group_id.clone(), s.topics.anonymized.clone());
    wait_for(what, timeout, || {
        let (group, topic) = (group.clone(), topic.clone());
        async move {
            tokio::task::spawn_blocking(move || no_pending_batch(&group, &topic))
                .await
                .unwrap()
                .then_some(())
        }
    })
    .await;
}

/// Sends SIGTERM (a clean stop: the stage finishes its work and leaves the group).
pub fn terminate(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A child process killed when dropped, so a failing test leaves no stage running (an orphan
/// would also hold the test runner's output pipe open).
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    pub fn spawn(cmd: &mut std::process::Command) -> KillOnDrop {
        KillOnDrop(cmd.spawn().expect("starting a stage binary"))
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the pipeline has drained: no input waiting for the anonymizer, nothing anonymized
/// waiting for the loader, no open transaction (see `edgelog::verify::pipeline_drained`).
pub async fn wait_drained(s: &Settings, timeout: Duration) {
    wait_for("the pipeline to drain", timeout, || {
        let s = s.clone();
        async move {
            tokio::task::spawn_blocking(move || edgelog::verify::pipeline_drained(&s).unwrap())
                .await
                .unwrap()
                .then_some(())
        }
    })
    .await;
}

/// The HTTP listener (`/metrics`, `/healthz`, `/readyz`, `/status`) on a free port.
pub fn serve_health(health: &std::sync::Arc<edgelog::health::Health>) -> std::net::SocketAddr {
    edgelog::telemetry::start_http(Some("127.0.0.1:0".parse().unwrap()), Some(health.clone()))
        .unwrap()
        .expect("a listen address was given")
}

/// One copy of each of `good` rows in `http_log` (by source offset), and totals that equal a
/// recount.
pub async fn assert_loaded_exactly_once(s: &Settings, good: u64) {
    assert_loaded_exactly_once_at(CLICKHOUSE, s, good).await
}

/// [`assert_loaded_exactly_once`] on the ClickHouse at `url` (in cluster mode, a shard that holds
/// the Distributed tables: the counts cover every shard).
pub async fn assert_loaded_exactly_once_at(url: &str, s: &Settings, good: u64) {
    let db = &s.clickhouse.database;
    assert_eq!(
        count_at(url, format!("SELECT count() FROM {db}.http_log")).await,
        good,
        "one copy of each row"
    );
    assert_eq!(
        count_at(
            url,
            format!("SELECT uniqExact(source_partition, source_offset) FROM {db}.http_log")
        )
        .await,
        good
    );
    // A stopped loader drops its request in flight, but ClickHouse finishes an insert whose body
    // it has: its raw part is visible before its views have written theirs. So the totals are
    // waited for (an insert that never completes times out here), then must be exact.
    let totals_sql = format!("SELECT sum(requests) FROM {db}.http_log_totals");
    let totals = wait_for(
        "the views of the last insert (totals reaching the raw count)",
        Duration::from_secs(60),
        || {
            let sql = totals_sql.clone();
            async move {
                let n = count_at(url, sql).await;
                (n >= good).then_some(n)
            }
        },
    )
    .await;
    assert_eq!(totals, good, "totals equal a recount from http_log");
}
