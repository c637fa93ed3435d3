//! Upgrading the loader in the middle of a batch, on real Kafka, nginx and ClickHouse.
//!
//! The previous loader recorded a batch as version-1 metadata (`edgelog.batch.v1;<ranges>`),
//! sent it under the version-1 token (topic name + ranges), ClickHouse stored it, and the loader
//! died before committing past it. Today's loader must finish that batch with the version-1
//! token, so that ClickHouse drops the re-send. The control run shows the check has teeth: when
//! the first copy landed under the version-2 token instead (what a naive upgrade would compute),
//! the same re-send is stored a second time.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use edgelog::anon_record::AnonRecord;
use edgelog::batch::{BatchId, BatchRanges, METADATA_PREFIX};
use edgelog::body::encode_body;
use edgelog::body::insert_url;
use edgelog::config::Settings;
use edgelog::loader::insert::{InsertClient, Outcome};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Which token the previous loader's insert landed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstCopy {
    /// The version-1 token, as the previous loader really sent it.
    V1Token,
    /// The version-2 token of the same ranges (the control: not what was sent).
    V2Token,
}

/// The state the previous loader left behind when it died after ClickHouse answered.
struct Upgrade {
    s: Settings,
    /// Records on the anonymized topic (all of them load).
    good: u64,
    ranges: BatchRanges,
    /// Rows of the recorded batch, already in ClickHouse once.
    batch_rows: u64,
    v1_token: String,
}

/// One request that went through [`start_recorder`]: its request line and the answer's status
/// line.
#[derive(Debug, Clone)]
struct Exchange {
    request: String,
    status: String,
}

impl Exchange {
    fn token(&self) -> Option<String> {
        let target = self.request.split(' ').nth(1)?;
        let url = url::Url::parse(&format!("http://recorder{target}")).ok()?;
        url.query_pairs()
            .find(|(k, _)| k == "insert_deduplication_token")
            .map(|(_, v)| v.into_owned())
    }

    fn confirmed(&self) -> bool {
        self.status.split(' ').nth(1) == Some("200")
    }
}

/// Every record of the anonymized topic as `(partition, offset, record)`, each partition in
/// offset order (read_committed, to the end of every partition).
fn read_anonymized(s: &Settings) -> Vec<(i32, i64, AnonRecord)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", unique("upgrade_reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let topic = &s.topics.anonymized;
    let mut tpl = TopicPartitionList::new();
    for p in 0..s.topics.partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut at_end = BTreeSet::new();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while at_end.len() < s.topics.partitions as usize {
        assert!(
            Instant::now() < deadline,
            "reading {topic}: only {at_end:?} reached their end"
        );
        match c.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                let record = edgelog::anon_record::decode(m.payload().unwrap_or(&[]))
                    .expect("stage one writes decodable records");
                records.push((m.partition(), m.offset(), record));
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
        }
    }
    records
}

/// What the previous loader did before sending: commit, on every partition of the batch,
/// offset = range start with the version-1 metadata, in the loader's group.
fn record_v1(s: &Settings, ranges: &BatchRanges) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", &s.loader.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = ranges.to_metadata();
    assert!(metadata.starts_with("edgelog.batch.v1;"), "{metadata}");
    let mut tpl = TopicPartitionList::new();
    for r in ranges.ranges() {
        let mut e = tpl.add_partition(&s.topics.anonymized, r.partition);
        e.set_offset(Offset::Offset(r.start)).unwrap();
        e.set_metadata(metadata.as_str());
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
}

/// The loader group's committed offset and metadata, by partition of the anonymized topic.
fn committed(s: &Settings) -> BTreeMap<i32, (Option<i64>, String)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", &s.loader.group_id)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..s.topics.partitions {
        tpl.add_partition(&s.topics.anonymized, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), (offset, e.metadata().to_string()))
        })
        .collect()
}

/// Sets up a pipeline in the state the previous loader left when it died after ClickHouse had
/// answered its insert: the batch recorded as version 1, its rows stored under `first_copy`'s
/// token, nothing committed past it.
async fn previous_loader_died_after_clickhouse_answered(first_copy: FirstCopy) -> Upgrade {
    require_stack();
    let s = fast_loader_settings();
    fill_anonymized_topic(&s, 300).await;
    let all = {
        let s = s.clone();
        tokio::task::spawn_blocking(move || read_anonymized(&s))
            .await
            .unwrap()
    };
    let good = all.len() as u64;
    assert!(good > 0);

    // The batch: the first half (rounded up) of each partition's records, a contiguous prefix
    // as the loader plans them. The rest is left for batches the new loader plans itself.
    let mut batch: Vec<&(i32, i64, AnonRecord)> = Vec::new();
    for p in 0..s.topics.partitions {
        let of_p: Vec<_> = all.iter().filter(|r| r.0 == p).collect();
        batch.extend(&of_p[..of_p.len().div_ceil(2)]);
    }
    let ranges = BatchRanges::covering(batch.iter().map(|r| (r.0, r.1))).unwrap();
    let batch_rows = batch.len() as u64;
    assert!(batch_rows < good, "some records are left after the batch");
    let topic = &s.topics.anonymized;
    let v1_token = ranges.dedup_token(topic);
    let token = match first_copy {
        FirstCopy::V1Token => v1_token.clone(),
        FirstCopy::V2Token => {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", KAFKA)
                .create()
                .unwrap();
            let id = tokio::task::block_in_place(|| {
                edgelog::topic_id::topic_id(admin.inner(), topic, Duration::from_secs(10))
            })
            .unwrap();
            let v2_token = BatchId::new(ranges.clone(), &id).dedup_token(topic);
            assert_ne!(v2_token, v1_token);
            v2_token
        }
    };

    // Record, then send, as the previous loader did.
    {
        let (s, ranges) = (s.clone(), ranges.clone());
        tokio::task::spawn_blocking(move || record_v1(&s, &ranges))
            .await
            .unwrap();
    }
    let recorded = committed(&s);
    for r in ranges.ranges() {
        assert_eq!(
            recorded[&r.partition],
            (Some(r.start), ranges.to_metadata()),
            "{recorded:?}"
        );
    }
    let records: Vec<&AnonRecord> = batch.iter().map(|r| &r.2).collect();
    let body = encode_body(&records, s.loader.body_compression);
    let url = insert_url(&s.clickhouse.url, &s.clickhouse.database, Some(&token));
    let mut source = fresh_loopback_ip();
    while Some(source) == s.loader.source_address {
        source = fresh_loopback_ip();
    }
    let client = InsertClient::new(&s.clickhouse, Some(source), Duration::from_secs(30)).unwrap();
    let outcome = client.send(&url, s.loader.body_compression, body).await;
    assert_eq!(outcome, Outcome::Inserted, "the previous loader's insert");
    let db = &s.clickhouse.database;
    assert_eq!(
        count(format!("SELECT count() FROM {db}.http_log")).await,
        batch_rows,
        "the previous loader's insert landed"
    );
    assert_eq!(
        count(format!("SELECT sum(requests) FROM {db}.http_log_totals")).await,
        batch_rows
    );
    Upgrade {
        s,
        good,
        ranges,
        batch_rows,
        v1_token,
    }
}

/// Runs today's loader (in-process, through [`start_recorder`]) until everything is loaded and
/// no batch is recorded; returns the requests it sent, in order.
async fn finish_with_new_loader(u: &Upgrade) -> Vec<Exchange> {
    let (addr, exchanges) = start_recorder().await;
    let mut s = u.s.clone();
    s.clickhouse.url = format!("http://{addr}");
    let loader = start_loader(&s);
    wait_drained(&u.s, Duration::from_secs(60)).await;
    wait_no_pending_batch(
        &u.s,
        "the loader to commit past every batch",
        Duration::from_secs(30),
    )
    .await;
    loader.stop().await.expect("the loader stops cleanly");

    // No version-1 record is left, and every partition of the batch moved past it.
    let after = committed(&u.s);
    assert!(
        after.values().all(|(_, m)| !m.starts_with(METADATA_PREFIX)),
        "{after:?}"
    );
    for r in u.ranges.ranges() {
        let (offset, metadata) = &after[&r.partition];
        assert!(offset.is_some_and(|o| o >= r.end), "{r:?}: {after:?}");
        assert_eq!(metadata, "", "{after:?}");
    }
    let exchanges = exchanges.lock().unwrap().clone();
    // The recorded batch is finished before anything new, under its version-1 token, and
    // ClickHouse confirmed it (a copy dropped as a duplicate is confirmed too).
    let first = exchanges.first().expect("the loader sent something");
    assert_eq!(
        first.token().as_deref(),
        Some(u.v1_token.as_str()),
        "{exchanges:#?}"
    );
    assert!(
        exchanges
            .iter()
            .any(|e| e.token().as_deref() == Some(u.v1_token.as_str()) && e.confirmed()),
        "{exchanges:#?}"
    );
    // Everything after it is a new batch: another (version-2) token.
    let resent: Vec<_> = exchanges
        .iter()
        .skip_while(|e| e.token().as_deref() == Some(u.v1_token.as_str()))
        .collect();
    assert!(!resent.is_empty(), "the rest went in new batches");
    assert!(
        resent
            .iter()
            .all(|e| e.token().is_some_and(|t| t != u.v1_token)),
        "{exchanges:#?}"
    );
    exchanges
}

/// Rows of `http_log` stored more than once (by source offset), counting each extra copy.
async fn extra_copies(db: &str) -> u64 {
    count(format!(
        "SELECT sum(c - 1) FROM (SELECT count() AS c FROM {db}.http_log \
         GROUP BY source_partition, source_offset HAVING c > 1)"
    ))
    .await
}

async fn drop_database(s: &Settings) {
    admin()
        .query(&format!("DROP DATABASE {}", s.clickhouse.database), &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_recorded_by_the_previous_version_is_finished_with_its_version_1_token() {
    let u = previous_loader_died_after_clickhouse_answered(FirstCopy::V1Token).await;
    let exchanges = finish_with_new_loader(&u).await;
    let db = &u.s.clickhouse.database;
    assert_eq!(extra_copies(db).await, 0, "the re-send was dropped");
    assert_loaded_exactly_once(&u.s, u.good).await;
    let sent: Vec<(Option<String>, &str)> = exchanges
        .iter()
        .map(|e| (e.token(), e.status.as_str()))
        .collect();
    eprintln!(
        "version-1 batch {} ({} rows of {}, token {}) finished without a duplicate; \
         the loader's requests (token, answer): {sent:?}",
        u.ranges, u.batch_rows, u.good, u.v1_token
    );
    drop_database(&u.s).await;
}

/// The control: the same re-send, but the first copy had landed under the version-2 token of the
/// same ranges. ClickHouse cannot tell it is the same batch and stores it again, so the first
/// test passes because of the version-1 token, not by accident.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_copy_under_another_token_is_stored_twice() {
    let u = previous_loader_died_after_clickhouse_answered(FirstCopy::V2Token).await;
    finish_with_new_loader(&u).await;
    let db = &u.s.clickhouse.database;
    let extra = extra_copies(db).await;
    eprintln!(
        "control: {extra} rows stored twice (batch {} of {} rows)",
        u.ranges, u.batch_rows
    );
    assert_eq!(extra, u.batch_rows, "every row of the batch stored twice");
    assert_eq!(
        count(format!(
            "SELECT count() FROM (SELECT 1 FROM {db}.http_log \
             GROUP BY source_partition, source_offset HAVING count() > 1)"
        ))
        .await,
        u.batch_rows
    );
    assert_eq!(
        count(format!("SELECT count() FROM {db}.http_log")).await,
        u.good + u.batch_rows
    );
    assert_eq!(
        count(format!("SELECT sum(requests) FROM {db}.http_log_totals")).await,
        u.good + u.batch_rows,
        "the totals count the duplicate too"
    );
    drop_database(&u.s).await;
}

/// A TCP forwarder to the fast proxy that notes each connection's request line and the answer's
/// status line. The loader's HTTP client keeps no idle connection, so each insert is a
/// connection of its own. The forwarder reaches the proxy from a fresh address (its budget).
async fn start_recorder() -> (SocketAddr, Arc<Mutex<Vec<Exchange>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let exchanges = Arc::new(Mutex::new(Vec::new()));
    let source = fresh_loopback_ip();
    let log = exchanges.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(forward(client, source, log.clone()));
        }
    });
    (addr, exchanges)
}

async fn forward(
    client: TcpStream,
    source: IpAddr,
    log: Arc<Mutex<Vec<Exchange>>>,
) -> std::io::Result<()> {
    let upstream: SocketAddr = FAST_PROXY.strip_prefix("http://").unwrap().parse().unwrap();
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let upstream = socket.connect(upstream).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let (head, request) = first_line(&mut client_read).await?;
    upstream_write.write_all(&head).await?;
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    });
    let (head, status) = first_line(&mut upstream_read).await?;
    log.lock().unwrap().push(Exchange { request, status });
    client_write.write_all(&head).await?;
    tokio::io::copy(&mut upstream_read, &mut client_write).await?;
    client_write.shutdown().await
}

/// Reads until the first line is complete: everything read so far, and that line.
async fn first_line(from: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(Vec<u8>, String)> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 8192];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..end]).into_owned();
    Ok((head, line))
}
