//! The secure mode of the local stack (`scripts/stack.sh up --secure`): a SASL_SSL broker with
//! SCRAM users and exactly the ACLs of `scripts/kafka/secure-acls.txt`, HTTPS proxies in front of
//! ClickHouse, and ClickHouse users with the least rights each role needs.
//!
//! - the anonymizer moves every record exactly once as its least-privilege Kafka user;
//! - a stage with a wrong password, a missing ACL or no trust in the broker's CA stops at once
//!   with a message naming the cause (exit status 1: not a retry loop, not a panic);
//! - the loader's ClickHouse user may INSERT through the HTTPS proxy, and cannot read the raw rows
//!   or drop a table.
//!
//! - the whole pipeline, each stage as its own least-privilege Kafka user and the loader through the
//!   HTTPS proxy (`clickhouse.ca_file`) as `edgelog_loader`, lands every record exactly once.
//!
//! Every test here needs the secure parts: they fail, naming the command to start them, when the
//! stack is not up (never skipped).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edgelog::config::{KafkaOptions, Settings};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;
use rdkafka::{Message, Offset, TopicPartitionList};

const SECURE_KAFKA: &str = "127.0.0.1:9192";
const HTTPS_PROXY: &str = "https://127.0.0.1:8443";
const FAST_HTTPS_PROXY: &str = "https://127.0.0.1:8444";

/// Where `scripts/stack.sh` keeps the secure parts' CA and passwords (same default as the script).
fn secure_dir() -> PathBuf {
    let home = std::env::var("EDGESTACK_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/edgelog-stack")
        });
    home.join("run/secure")
}

fn ca_file() -> String {
    secure_dir()
        .join("tls/ca.pem")
        .to_string_lossy()
        .into_owned()
}

/// The SCRAM password `scripts/stack.sh` generated for `user`.
fn password(user: &str) -> String {
    let path = secure_dir().join("passwords").join(user);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "no password for {user} at {}: {e}. Run `scripts/stack.sh up --secure`.",
            path.display()
        )
    })
}

/// Panics with instructions unless the secure parts (and the ClickHouse behind them) answer.
fn require_secure_stack() {
    require_listening(
        &[
            ("the secure Kafka broker (SASL_SSL)", "127.0.0.1:9192"),
            ("the HTTPS proxy (1r/m)", "127.0.0.1:8443"),
            ("the fast HTTPS proxy", "127.0.0.1:8444"),
            ("ClickHouse", "127.0.0.1:8123"),
        ],
        "These tests need the secure stack: run `scripts/stack.sh up --secure` (or \
         `scripts/test.sh`, which starts it).",
    );
    assert!(
        std::path::Path::new(&ca_file()).exists(),
        "no CA at {}: run `scripts/stack.sh up --secure`",
        ca_file()
    );
}

/// Settings named inside the ACL file's test prefixes (sec-in-, sec-anon-, ...), no credentials.
fn secure_settings() -> Settings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut s = Settings::default();
    s.kafka.brokers = SECURE_KAFKA.into();
    s.topics.input = format!("sec-in-{id}");
    s.topics.anonymized = format!("sec-anon-{id}");
    s.topics.dead_letter = format!("sec-dlq-{id}");
    s.topics.loader_dead_letter = format!("sec-loaderdlq-{id}");
    s.topics.partitions = 3;
    s.anonymizer.group_id = format!("sec-anonymizer-{id}");
    s.anonymizer.txn_max_duration = Duration::from_millis(200);
    s.anonymizer.metrics_listen = None;
    s.loader.group_id = format!("sec-loader-{id}");
    s.loader.metrics_listen = None;
    s.loader.source_address = Some(fresh_loopback_ip());
    s.producer.metrics_listen = None;
    s.clickhouse.database = format!("t_{id}");
    s.clickhouse.admin_url = CLICKHOUSE.into();
    s.clickhouse.url = FAST_PROXY.into();
    s.clickhouse.password = edgelog::config::Secret::new(LOADER_PASSWORD);
    s.validated().expect("test settings are valid")
}

/// The librdkafka options of `user` on the secure broker (with its real password).
fn credentials(user: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("security.protocol".into(), "SASL_SSL".into()),
        ("sasl.mechanisms".into(), "SCRAM-SHA-512".into()),
        ("sasl.username".into(), user.into()),
        ("sasl.password".into(), password(user)),
        ("ssl.ca.location".into(), ca_file()),
    ])
}

/// `s` as Kafka user `user`.
fn as_user(s: &Settings, user: &str) -> Settings {
    let mut s = s.clone();
    s.kafka.options = KafkaOptions(credentials(user));
    s
}

/// `cmd` (a stage binary from `anonymizer_command`/`loader_command`) with these Kafka options in
/// its environment, the way an orchestrator passes them.
fn with_kafka_options(mut cmd: Command, options: &BTreeMap<String, String>) -> Command {
    for (k, v) in options {
        let key = format!(
            "EDGELOG_KAFKA__OPTIONS__{}",
            k.replace('.', "_").to_uppercase()
        );
        cmd.env(key, v);
    }
    cmd
}

/// Runs a stage binary until it exits by itself; fails if it is still running after 60 s (it
/// would be waiting or retrying). Returns the exit status and what it logged.
fn run_until_it_stops(mut cmd: Command) -> (ExitStatus, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    cmd.stdout(Stdio::null()).stderr(log.reopen().unwrap());
    let mut child = KillOnDrop::spawn(&mut cmd);
    let started = Instant::now();
    let read = || std::fs::read_to_string(log.path()).unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, read());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still running after 60 s instead of stopping; log:\n{}",
            read()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The stage stopped with exit status 1 (its error path, not a panic's 101), and its log names
/// every one of `cause` and never the password it was given.
fn assert_stopped_naming(what: &str, (status, log): (ExitStatus, String), cause: &[&str]) {
    assert_eq!(status.code(), Some(1), "{what}: {status}; log:\n{log}");
    assert!(!log.contains("panicked"), "{what} panicked:\n{log}");
    for c in cause {
        assert!(
            log.contains(c),
            "{what}: the log does not say {c:?}:\n{log}"
        );
    }
    for user in ["edgelog-anonymizer", "edgelog-loader"] {
        assert!(
            !log.contains(&password(user)),
            "{what}: a password appears in the log"
        );
    }
}

/// Each stage, run as its own Kafka user with `change` made to its options, stops naming `cause`.
fn assert_each_stage_stops_naming(
    s: &Settings,
    change: impl Fn(&mut BTreeMap<String, String>),
    cause: &[&str],
) {
    for (stage, user) in [
        ("anonymizer", "edgelog-anonymizer"),
        ("loader", "edgelog-loader"),
    ] {
        let mut options = credentials(user);
        change(&mut options);
        let cmd = match stage {
            "anonymizer" => secure_anonymizer(s, &options),
            _ => secure_loader(s, &options),
        };
        assert_stopped_naming(stage, run_until_it_stops(cmd), cause);
    }
}

/// Creates the test's topics as the operator (as `edgelog setup` does), then waits until the
/// broker serves their metadata (a stage started a moment after creation was told "unknown topic").
async fn create_topics(s: &Settings) {
    edgelog::setup::create_topics(&as_user(s, "edgelog-operator"))
        .await
        .expect("the operator creates the topics");
    let admin = as_user(s, "admin");
    wait_for("the new topics' metadata", Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let client: rdkafka::producer::BaseProducer =
                    edgelog::kafka::client_config(&admin.kafka, &KafkaOptions::default(), &[])
                        .create()
                        .unwrap();
                let t = &admin.topics;
                [
                    &t.input,
                    &t.anonymized,
                    &t.dead_letter,
                    &t.loader_dead_letter,
                ]
                .iter()
                .all(|topic| {
                    client
                        .client()
                        .fetch_metadata(Some(topic), Duration::from_secs(5))
                        .is_ok_and(|m| {
                            m.topics()
                                .first()
                                .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty())
                        })
                })
                .then_some(())
            })
            .await
            .unwrap()
        }
    })
    .await;
}

fn secure_anonymizer(s: &Settings, options: &BTreeMap<String, String>) -> Command {
    with_kafka_options(anonymizer_command(s, "0"), options)
}

fn secure_loader(s: &Settings, options: &BTreeMap<String, String>) -> Command {
    with_kafka_options(loader_command(s), options)
}

/// Every committed record of `topic`, read as the super user `admin` up to each partition's end.
fn read_committed(s: &Settings, topic: &str) -> Vec<Vec<u8>> {
    let admin = as_user(s, "admin");
    let consumer: BaseConsumer =
        edgelog::kafka::client_config(&admin.kafka, &KafkaOptions::default(), &[])
            .set("group.id", format!("sec-audit-{}", uuid::Uuid::new_v4()))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut open = BTreeSet::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
        open.insert(p.id());
    }
    consumer.assign(&tpl).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !open.is_empty() {
        assert!(Instant::now() < deadline, "reading {topic} took over 60 s");
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => records.push(m.payload().unwrap_or(&[]).to_vec()),
            // read_committed: the end is the last stable offset.
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anonymizer_moves_every_record_exactly_once_as_its_least_privilege_user() {
    require_secure_stack();
    let s = secure_settings();
    create_topics(&s).await;
    let n = 3000;
    let mut p = as_user(&s, "edgelog-producer");
    p.producer.rate = 0.0;
    p.producer.count = Some(n);
    let report = edgelog::producer::run(&p, std::future::pending::<()>())
        .await
        .expect("the producer writes http_log with WRITE alone");
    assert_eq!(report.delivered, n);

    let anonymizer = start_anonymizer(&as_user(&s, "edgelog-anonymizer"));
    let admin = as_user(&s, "admin");
    wait_for(
        "the anonymizer to commit all input",
        Duration::from_secs(120),
        || {
            let (kafka, group, input) = (
                admin.kafka.clone(),
                s.anonymizer.group_id.clone(),
                s.topics.input.clone(),
            );
            async move {
                tokio::task::spawn_blocking(move || {
                    let positions = edgelog::kafka::group_positions(
                        &kafka,
                        &group,
                        &input,
                        Duration::from_secs(10),
                    )
                    .ok()?;
                    positions
                        .iter()
                        .all(|p| p.high == 0 || p.committed.is_some_and(|c| c >= p.high))
                        .then_some(())
                })
                .await
                .unwrap()
            }
        },
    )
    .await;
    anonymizer
        .stop()
        .await
        .expect("the anonymizer stops cleanly");

    let (s2, anon) = (s.clone(), s.topics.anonymized.clone());
    let out = tokio::task::spawn_blocking(move || read_committed(&s2, &anon))
        .await
        .unwrap();
    let sources: BTreeSet<(i32, i64)> = out
        .iter()
        .map(|bytes| {
            let r = edgelog::anon_record::decode(bytes).expect("an anonymized record");
            (r.source_partition, r.source_offset)
        })
        .collect();
    assert_eq!(out.len() as u64, n, "one output record per input record");
    assert_eq!(sources.len() as u64, n, "each input record exactly once");
    let (s3, dlq) = (s.clone(), s.topics.dead_letter.clone());
    let dead = tokio::task::spawn_blocking(move || read_committed(&s3, &dlq))
        .await
        .unwrap();
    assert!(dead.is_empty(), "{} dead letters", dead.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_each_stage_with_authentication_failed() {
    require_secure_stack();
    let s = secure_settings();
    create_topics(&s).await;
    assert_each_stage_stops_naming(
        &s,
        |options| {
            options.insert("sasl.password".into(), "not-the-password".into());
        },
        &["Kafka authentication failed", "SCRAM-SHA-512"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_acl_stops_each_stage_with_authorization_failed() {
    require_secure_stack();
    let s = secure_settings();
    create_topics(&s).await;

    // No transactional-id (and no group) ACL: the group name is outside sec-anonymizer-.
    let mut no_txn_acl = s.clone();
    no_txn_acl.anonymizer.group_id = format!("sec-unlisted-{}", uuid::Uuid::new_v4().simple());
    assert_stopped_naming(
        "anonymizer without a transactional-id ACL",
        run_until_it_stops(secure_anonymizer(
            &no_txn_acl,
            &credentials("edgelog-anonymizer"),
        )),
        &[
            "Kafka authorization failed",
            "Transactional Id authorization failed",
        ],
    );

    // No WRITE on its output: the loader's dead-letter topic stands in for http_log_anon.
    let mut no_write = s.clone();
    no_write.topics.anonymized = s.topics.loader_dead_letter.clone();
    assert_stopped_naming(
        "anonymizer without WRITE on its output topic",
        run_until_it_stops(secure_anonymizer(
            &no_write,
            &credentials("edgelog-anonymizer"),
        )),
        &["Kafka authorization failed", &s.topics.loader_dead_letter],
    );

    // The loader without READ on its group.
    let mut no_group_acl = s.clone();
    no_group_acl.loader.group_id = format!("sec-unlisted-{}", uuid::Uuid::new_v4().simple());
    assert_stopped_naming(
        "loader without a group ACL",
        run_until_it_stops(secure_loader(&no_group_acl, &credentials("edgelog-loader"))),
        &["Kafka authorization failed", "Group authorization failed"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_does_not_trust_the_brokers_ca_stops_naming_the_certificate() {
    require_secure_stack();
    let s = secure_settings();
    create_topics(&s).await;
    assert_each_stage_stops_naming(
        &s,
        |options| {
            options.remove("ssl.ca.location");
        },
        &[
            "Kafka TLS certificate not trusted",
            "certificate verify failed",
        ],
    );
}

/// `curl` to the HTTPS proxy as `user` from `source` (the proxies budget per client address):
/// the HTTP status and the body.
fn curl(base: &str, source: std::net::IpAddr, user: &str, pw: &str, sql: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert", &ca_file()])
        .args(["--interface", &source.to_string()])
        .args(["-u", &format!("{user}:{pw}")])
        .args([
            "-w",
            "\n%{http_code}",
            "--data-binary",
            sql,
            &format!("{base}/"),
        ])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, code) = text.rsplit_once('\n').expect("the status line");
    (code.trim().parse().unwrap(), body.to_string())
}

/// The running ClickHouse knows the users of the current scripts/clickhouse/users.xml.
async fn require_current_clickhouse_users() {
    let known = count(
        "SELECT count() FROM system.users WHERE name IN ('edgelog_reader', 'edgelog_operator')",
    )
    .await;
    assert_eq!(
        known, 2,
        "ClickHouse runs with an older scripts/clickhouse/users.xml (the chdb-core server does not \
         re-read it): run `scripts/stack.sh restart clickhouse`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loaders_clickhouse_user_inserts_over_https_but_cannot_read_raw_rows_or_drop() {
    require_secure_stack();
    require_current_clickhouse_users().await;
    let s = secure_settings();
    edgelog::setup::apply_schema(&s).await.unwrap();
    let db = &s.clickhouse.database;
    let source = fresh_loopback_ip();
    let loader_from =
        |source, base: &str, sql: &str| curl(base, source, "edgelog_loader", LOADER_PASSWORD, sql);
    let loader = |base: &str, sql: &str| loader_from(source, base, sql);

    // Through the original budget (1r/m) once, then the fast proxy.
    let (code, body) = loader(
        HTTPS_PROXY,
        &format!(
            "INSERT INTO {db}.http_log VALUES \
             (now(), 1, 100, 5, 200, 'HIT', 'GET', '10.1.2.0', '/a', 0, 0), \
             (now(), 2, 200, 7, 404, 'MISS', 'GET', '10.1.3.0', '/b', 0, 1)"
        ),
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = loader(HTTPS_PROXY, "SELECT 1");
    assert_eq!(code, 503, "the HTTPS proxy keeps the 1r/m budget: {body}");
    assert_eq!(count(format!("SELECT count() FROM {db}.http_log")).await, 2);
    // The views ran with their definer's rights: the loader has none on the rollups.
    assert_eq!(
        count(format!("SELECT sum(requests) FROM {db}.http_log_totals")).await,
        2
    );

    for sql in [
        format!("SELECT * FROM {db}.http_log"),
        format!("SELECT sum(requests) FROM {db}.http_log_totals"),
        format!("DROP TABLE {db}.http_log"),
        format!("DROP DATABASE {db}"),
    ] {
        // A fresh client address each time: the fast proxy has no burst either (100 ms spacing).
        let (code, body) = loader_from(fresh_loopback_ip(), FAST_HTTPS_PROXY, &sql);
        assert_ne!(code, 200, "{sql}: {body}");
        assert!(
            body.contains("ACCESS_DENIED") && body.contains("Not enough privileges"),
            "{sql}: {code} {body}"
        );
    }
    assert_eq!(count(format!("SELECT count() FROM {db}.http_log")).await, 2);

    // Without the stack's CA the proxy's certificate is not trusted.
    let untrusted = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!("{FAST_HTTPS_PROXY}/ping"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        untrusted.status.code(),
        Some(60),
        "curl without the CA: {}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
}

/// `cmd` (a stage binary) as Kafka user `user` with its password read from the stack's password
/// file (`kafka.secret_files`), logging at debug level into a file: what an orchestrator that
/// mounts secrets runs.
fn with_secret_files(cmd: Command, user: &str, log: &tempfile::NamedTempFile) -> Command {
    let mut options = credentials(user);
    options.remove("sasl.password");
    let mut cmd = with_kafka_options(cmd, &options);
    cmd.env("EDGELOG_LOG__LEVEL", "debug")
        .env(
            "EDGELOG_KAFKA__SECRET_FILES__SASL_PASSWORD",
            secure_dir().join("passwords").join(user),
        )
        .stderr(log.reopen().unwrap());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_lands_every_record_once_over_sasl_ssl_and_https_as_least_privilege_users() {
    require_secure_stack();
    require_current_clickhouse_users().await;
    let mut s = secure_settings();
    s.clickhouse.url = FAST_HTTPS_PROXY.into();
    s.clickhouse.ca_file = Some(ca_file().into());
    edgelog::setup::apply_schema(&s).await.unwrap();
    create_topics(&s).await;
    let n = 5000;
    let mut p = as_user(&s, "edgelog-producer");
    p.producer.rate = 0.0;
    p.producer.count = Some(n);
    let report = edgelog::producer::run(&p, std::future::pending::<()>())
        .await
        .expect("the producer writes http_log");
    assert_eq!(report.delivered, n);

    // Both stages as binaries, every secret from a file, as an orchestrator mounts them.
    let ch_password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ch_password.path(), format!("{LOADER_PASSWORD}\n")).unwrap();
    let (anonymizer_log, loader_log) = (
        tempfile::NamedTempFile::new().unwrap(),
        tempfile::NamedTempFile::new().unwrap(),
    );
    let mut anonymizer_cmd = with_secret_files(
        anonymizer_command(&s, "0"),
        "edgelog-anonymizer",
        &anonymizer_log,
    );
    let mut loader_cmd = with_secret_files(loader_command(&s), "edgelog-loader", &loader_log);
    loader_cmd
        .env_remove("EDGELOG_CLICKHOUSE__PASSWORD")
        .env("EDGELOG_CLICKHOUSE__PASSWORD_FILE", ch_password.path())
        .env("EDGELOG_CLICKHOUSE__CA_FILE", ca_file());
    let anonymizer = KillOnDrop::spawn(&mut anonymizer_cmd);
    let loader = KillOnDrop::spawn(&mut loader_cmd);
    let db = s.clickhouse.database.clone();
    wait_for(
        "every record in ClickHouse over HTTPS",
        Duration::from_secs(180),
        || {
            let db = db.clone();
            async move {
                (count(format!("SELECT count() FROM {db}.http_log")).await >= n).then_some(())
            }
        },
    )
    .await;
    for (name, mut child) in [("anonymizer", anonymizer), ("loader", loader)] {
        terminate(&child);
        let status = child.wait().unwrap();
        assert!(status.success(), "{name} stopped with {status}");
    }
    assert_loaded_exactly_once(&s, n).await;

    // Nothing either stage logged, at debug level, holds a secret it was given.
    for (name, log, said) in [
        ("anonymizer", &anonymizer_log, "anonymizer running"),
        ("loader", &loader_log, "loader starting"),
    ] {
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(text.contains(said), "{name} logged {said:?}:\n{text}");
        for secret in [
            password("edgelog-anonymizer"),
            password("edgelog-loader"),
            LOADER_PASSWORD.to_string(),
        ] {
            assert!(!text.contains(&secret), "{name}'s log holds a secret");
        }
    }
}
