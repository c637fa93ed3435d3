//! Stage two against records that cannot load as they are, on the real Kafka, nginx and
//! ClickHouse: garbage on the anonymized topic, a batch spanning more days than ClickHouse takes
//! in one insert, a record ClickHouse refuses on its own, a record too large for any body. The
//! loader never stops or loops: every valid record lands exactly once, every bad one is in the
//! loader's dead-letter topic with headers naming it, and the offsets move past all of them.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use edgelog::anon_record::{self, AnonRecord};
use edgelog::config::Settings;
use edgelog::dead_letter::{
    HEADER_ANON_OFFSET, HEADER_ANON_PARTITION, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON,
    HEADER_STAGE, HEADER_TOPIC,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

const DAY_MS: u64 = 86_400_000;

/// A valid anonymized record whose input position is `(partition, offset)`.
fn record(partition: i32, offset: i64, timestamp_ms: u64, url: String) -> AnonRecord {
    AnonRecord {
        version: 1,
        timestamp_epoch_milli: timestamp_ms,
        resource_id: (offset % 7) as u64,
        bytes_sent: 1000 + offset as u64,
        request_time_milli: 5,
        response_status: 200,
        cache_status: "HIT".into(),
        method: "GET".into(),
        remote_addr: "10.1.2.X".into(),
        url,
        source_partition: partition,
        source_offset: offset,
    }
}

fn now_ms() -> u64 {
    edgelog::clock::now_epoch_ms()
}

/// What goes on one partition of the anonymized topic, in order.
enum Item {
    Good(AnonRecord),
    Raw(Vec<u8>),
}

/// Creates the topics and schema, then writes `items` (per anonymized partition, in order)
/// straight to the anonymized topic, as a foreign producer would.
async fn write_anonymized(s: &Settings, items: Vec<(i32, Item)>) {
    edgelog::setup::create_topics(s).await.unwrap();
    edgelog::setup::apply_schema(s).await.unwrap();
    produce(s, items).await;
}

/// Writes `items` to the anonymized topic (records up to 4 MB: the topic must take them).
async fn produce(s: &Settings, items: Vec<(i32, Item)>) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap();
    for (partition, item) in items {
        let bytes = match item {
            Item::Good(r) => anon_record::encode(&r),
            Item::Raw(b) => b,
        };
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to(&s.topics.anonymized)
                    .partition(partition)
                    .payload(&bytes),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// One dead letter as read back: its headers and payload.
#[derive(Debug)]
struct Letter {
    headers: BTreeMap<String, String>,
    payload: Vec<u8>,
}

impl Letter {
    fn get(&self, key: &str) -> &str {
        self.headers
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("header {key} missing: {self:?}"))
    }
}

/// The distinct `(partition, offset)` the letters name by the two headers (a letter may be
/// written twice), each asserted to carry `reason`.
fn distinct_positions(
    letters: &[Letter],
    reason: &str,
    partition_header: &str,
    offset_header: &str,
) -> std::collections::BTreeSet<(String, String)> {
    letters
        .iter()
        .map(|l| {
            assert_eq!(l.get(HEADER_REASON), reason);
            (
                l.get(partition_header).to_string(),
                l.get(offset_header).to_string(),
            )
        })
        .collect()
}

/// Every record of the loader's dead-letter topic.
fn read_dead_letters(s: &Settings) -> Vec<Letter> {
    let topic = &s.topics.loader_dead_letter;
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for p in md.topics()[0].partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        remaining += high - low;
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while remaining > 0 {
        assert!(std::time::Instant::now() < deadline, "reading dead letters");
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        let mut headers = BTreeMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_string(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        letters.push(Letter {
            headers,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
        remaining -= 1;
    }
    letters
}

/// Waits until `good` rows are in ClickHouse and the loader's group has committed to the very end
/// of every partition (past trailing bad records too) with no batch pending.
async fn wait_loaded(s: &Settings, good: u64) {
    let db = s.clickhouse.database.clone();
    wait_for("every valid row", Duration::from_secs(120), || {
        let sql = format!("SELECT count() FROM {db}.http_log");
        async move { (count(sql).await >= good).then_some(()) }
    })
    .await;
    let (group, topic) = (s.loader.group_id.clone(), s.topics.anonymized.clone());
    wait_for(
        "the loader to commit past every record",
        Duration::from_secs(60),
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    // Written without transactions: the end is the high watermark itself.
                    committed_vs_end(&group, &topic)
                        .iter()
                        .all(|(c, high, md)| md.is_empty() && (*high == 0 || *c == Some(*high)))
                })
                .await
                .unwrap()
                .then_some(())
            }
        },
    )
    .await;
}

async fn drop_database(s: &Settings) {
    admin()
        .query(&format!("DROP DATABASE {}", s.clickhouse.database), &[])
        .await
        .unwrap();
}

/// Incompressible printable text of `len` characters.
fn noise(len: usize) -> String {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect()
}

/// Lines of the fast proxy's access log sent from `ip`, by HTTP status.
fn proxy_statuses(ip: std::net::IpAddr) -> BTreeMap<u16, usize> {
    let home = std::env::var("EDGESTACK_HOME")
        .unwrap_or_else(|_| format!("{}/.cache/edgelog-stack", std::env::var("HOME").unwrap()));
    let log = std::fs::read_to_string(format!("{home}/run/proxy-fast/access.log")).unwrap();
    let mut statuses = BTreeMap::new();
    for line in log.lines().filter(|l| l.starts_with(&format!("{ip} "))) {
        // Combined format: `... "POST /?... HTTP/1.1" 200 123 ...`
        let status = line
            .split('"')
            .nth(2)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        *statuses.entry(status).or_default() += 1;
    }
    statuses
}

/// Garbage of three kinds between valid records on every partition, and last on one: valid rows
/// land once, each garbage record is in the dead-letter topic once, offsets reach the end, and
/// the loader keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_the_anonymized_topic_is_quarantined_and_the_loader_goes_on() {
    require_stack();
    let s = fast_loader_settings();
    let t0 = now_ms();
    let mut items = Vec::new();
    let mut garbage = Vec::new(); // (anonymized partition, offset)
    for p in 0..3 {
        let mut offset = 0;
        for i in 0..100i64 {
            if i % 40 == 13 {
                let bytes = match i / 40 {
                    0 => b"\xc1 not msgpack".to_vec(),
                    1 => Vec::new(),
                    // Valid MessagePack, unknown record version.
                    _ => anon_record::encode(&AnonRecord {
                        version: 9,
                        ..record(p, 1_000_000 + i, t0, "/v9".into())
                    }),
                };
                items.push((p, Item::Raw(bytes)));
                garbage.push((p, offset));
                offset += 1;
            }
            items.push((p, Item::Good(record(p, i, t0, format!("/r/{p}/{i}")))));
            offset += 1;
        }
        if p == 0 {
            items.push((p, Item::Raw(b"trailing garbage".to_vec())));
            garbage.push((p, offset));
        }
    }
    write_anonymized(&s, items).await;
    let loader = start_loader(&s);
    wait_loaded(&s, 300).await;
    // It stops only when asked: had it stopped on the garbage, this would be its error.
    loader
        .stop()
        .await
        .expect("the loader kept running and stops cleanly");
    assert_loaded_exactly_once(&s, 300).await;

    let letters = read_dead_letters(&s);
    let mut quarantined: Vec<(i32, i64)> = letters
        .iter()
        .map(|l| {
            assert_eq!(l.get(HEADER_REASON), "anon_undecodable");
            assert_eq!(l.get(HEADER_STAGE), "loader");
            // The input position is unknown: the source headers name the anonymized topic.
            assert_eq!(l.get(HEADER_TOPIC), s.topics.anonymized);
            assert_eq!(l.get(HEADER_PARTITION), l.get(HEADER_ANON_PARTITION));
            assert_eq!(l.get(HEADER_OFFSET), l.get(HEADER_ANON_OFFSET));
            (
                l.get(HEADER_ANON_PARTITION).parse().unwrap(),
                l.get(HEADER_ANON_OFFSET).parse().unwrap(),
            )
        })
        .collect();
    quarantined.sort();
    garbage.sort();
    assert_eq!(quarantined, garbage, "each garbage record once");
    drop_database(&s).await;
}

/// The loader binary crashes right after recording a batch whose ranges hold garbage; its
/// successor rebuilds the batch, skips the same records, and loads the rest once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_inside_a_recorded_batch_is_skipped_the_same_way_after_a_crash() {
    require_stack();
    let s = fast_loader_settings();
    let t0 = now_ms();
    let mut items = Vec::new();
    for p in 0..3 {
        for i in 0..200i64 {
            if i == 77 {
                items.push((p, Item::Raw(b"\x92\x01".to_vec())));
            }
            items.push((p, Item::Good(record(p, i, t0, format!("/c/{i}")))));
        }
    }
    write_anonymized(&s, items).await;
    let status = loader_command(&s)
        .env("EDGELOG_TOPICS__INPUT", &s.topics.input)
        .env("LOADER_FAILPOINT", "after_record")
        .status()
        .unwrap();
    assert!(!status.success(), "the first loader crashed: {status}");
    let _second =
        KillOnDrop::spawn(loader_command(&s).env("EDGELOG_TOPICS__INPUT", &s.topics.input));
    wait_loaded(&s, 600).await;
    assert_loaded_exactly_once(&s, 600).await;
    let letters = read_dead_letters(&s);
    let distinct = distinct_positions(
        &letters,
        "anon_undecodable",
        HEADER_ANON_PARTITION,
        HEADER_ANON_OFFSET,
    );
    assert_eq!(
        distinct.len(),
        3,
        "one garbage record per partition: {letters:?}"
    );
    drop_database(&s).await;
}

/// 150 records on 150 different days. Planned by days (the default 50 per insert), ClickHouse
/// never answers TOO_MANY_PARTITIONS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_spanning_many_days_is_planned_within_the_partition_limit() {
    require_stack();
    let s = fast_loader_settings();
    many_days(&s).await;
    let statuses = proxy_statuses(s.loader.source_address.unwrap());
    assert!(
        statuses.keys().all(|&status| status == 200),
        "no insert refused: {statuses:?}"
    );
    drop_database(&s).await;
}

/// The same backlog with the day rule lifted (as an inherited batch planned by an older loader
/// would be): ClickHouse refuses the insert (252, too many partitions), the loader splits it
/// instead of retrying it forever, and everything lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_over_the_partition_limit_is_split_not_retried() {
    require_stack();
    let mut s = fast_loader_settings();
    s.loader.max_days_per_batch = 1000;
    many_days(&s).await;
    let statuses = proxy_statuses(s.loader.source_address.unwrap());
    assert!(
        statuses.keys().any(|&status| status != 200),
        "ClickHouse refused the first batch: {statuses:?}"
    );
    drop_database(&s).await;
}

async fn many_days(s: &Settings) {
    // Days ahead of now, so that the raw table's TTL does not delete them.
    let t0 = now_ms();
    let items: Vec<(i32, Item)> = (0..150i64)
        .map(|i| {
            let p = (i % 3) as i32;
            let r = record(p, i, t0 + i as u64 * DAY_MS, format!("/d/{i}"));
            (p, Item::Good(r))
        })
        .collect();
    write_anonymized(s, items).await;
    let loader = start_loader(s);
    wait_loaded(s, 150).await;
    loader.stop().await.unwrap();
    assert_loaded_exactly_once(s, 150).await;
    assert_eq!(
        count(format!(
            "SELECT uniqExact(toYYYYMMDD(timestamp)) FROM {}.http_log",
            s.clickhouse.database
        ))
        .await,
        150
    );
    assert!(read_dead_letters(s).is_empty(), "nothing quarantined");
}

/// A table constraint refuses one URL (ClickHouse code 469 for the whole insert): the loader
/// bisects until the two refused records are alone, quarantines them with ClickHouse's reason,
/// and loads everything else once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_clickhouse_refuses_are_isolated_by_bisection_and_quarantined() {
    require_stack();
    let s = fast_loader_settings();
    let db = s.clickhouse.database.clone();
    let t0 = now_ms();
    let mut items = Vec::new();
    let poison = [(1, 40i64), (2, 77i64)];
    for p in 0..3 {
        for i in 0..100i64 {
            let url = if poison.contains(&(p, i)) {
                "/poison".to_string()
            } else {
                format!("/ok/{p}/{i}")
            };
            items.push((p, Item::Good(record(p, i, t0, url))));
        }
    }
    write_anonymized(&s, items).await;
    admin()
        .query(
            &format!("ALTER TABLE {db}.http_log ADD CONSTRAINT no_poison CHECK url != '/poison'"),
            &[],
        )
        .await
        .unwrap();
    let loader = start_loader(&s);
    wait_loaded(&s, 298).await;
    loader
        .stop()
        .await
        .expect("the loader kept running and stops cleanly");
    assert_loaded_exactly_once(&s, 298).await;
    assert_eq!(
        count(format!(
            "SELECT count() FROM {db}.http_log WHERE url = '/poison'"
        ))
        .await,
        0
    );
    let letters = read_dead_letters(&s);
    let mut quarantined: Vec<(i32, i64)> = letters
        .iter()
        .map(|l| {
            assert_eq!(l.get(HEADER_REASON), "clickhouse_rejected");
            assert_eq!(l.get(HEADER_STAGE), "loader");
            assert_eq!(
                l.get(HEADER_TOPIC),
                s.topics.input,
                "names the input position"
            );
            assert!(l.get("edgelog.error").contains("469"), "{l:?}");
            let r = anon_record::decode(&l.payload).expect("the record itself");
            assert_eq!(r.url, "/poison");
            let (p, o) = (
                l.get(HEADER_PARTITION).parse().unwrap(),
                l.get(HEADER_OFFSET).parse().unwrap(),
            );
            assert_eq!((r.source_partition, r.source_offset), (p, o));
            (p, o)
        })
        .collect();
    quarantined.sort();
    assert_eq!(quarantined, poison.to_vec(), "each refused record once");
    drop_database(&s).await;
}

/// One record whose body alone is over `loader.max_body_bytes` is quarantined before it costs a
/// slot; the rest load once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_too_large_for_any_body_is_quarantined() {
    require_stack();
    let mut s = fast_loader_settings();
    s.loader.max_body_bytes = 16_384;
    let t0 = now_ms();
    // Incompressible text: a body holding it cannot get under 16 kB.
    let huge = noise(200_000);
    let mut items = Vec::new();
    for i in 0..200i64 {
        let p = (i % 3) as i32;
        let url = if i == 100 {
            huge.clone()
        } else {
            format!("/s/{i}")
        };
        items.push((p, Item::Good(record(p, i, t0, url))));
    }
    write_anonymized(&s, items).await;
    let loader = start_loader(&s);
    wait_loaded(&s, 199).await;
    loader.stop().await.unwrap();
    assert_loaded_exactly_once(&s, 199).await;
    let letters = read_dead_letters(&s);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!(l.get(HEADER_REASON), "body_too_large");
    assert_eq!(l.get(HEADER_PARTITION), "1");
    assert_eq!(l.get(HEADER_OFFSET), "100");
    assert_eq!(anon_record::decode(&l.payload).unwrap().url, huge);
    let statuses = proxy_statuses(s.loader.source_address.unwrap());
    assert_eq!(statuses.get(&413), None, "never sent: {statuses:?}");
    drop_database(&s).await;
}

/// One record that fits `loader.max_body_bytes` (3 MB) but not nginx's 1 MiB: the proxy answers
/// 413 to every batch holding it. The loader lowers its body limit, loads the records around
/// it, sends it alone, and on that 413 quarantines it (as a bounded envelope: it is larger than
/// a dead letter may be) instead of retrying it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_the_proxy_refuses_alone_is_quarantined_not_retried() {
    require_stack();
    let mut s = fast_loader_settings();
    s.loader.max_body_bytes = 3_000_000;
    edgelog::setup::create_topics(&s).await.unwrap();
    edgelog::setup::apply_schema(&s).await.unwrap();
    // The anonymized topic must take a 1.5 MB record (set-up leaves Kafka's 1 MB default).
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin_client: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .create()
            .unwrap();
    let alter = AlterConfig::new(ResourceSpecifier::Topic(&s.topics.anonymized))
        .set("max.message.bytes", "4000000")
        .set("retention.ms", "604800000");
    for r in admin_client
        .alter_configs(&[alter], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let t0 = now_ms();
    let huge = noise(1_500_000);
    let items: Vec<(i32, Item)> = (0..300i64)
        .map(|i| {
            let p = (i % 3) as i32;
            let url = if i == 150 {
                huge.clone()
            } else {
                format!("/b/{i}")
            };
            (p, Item::Good(record(p, i, t0, url)))
        })
        .collect();
    produce(&s, items).await;
    let loader = start_loader(&s);
    wait_loaded(&s, 299).await;
    loader.stop().await.unwrap();
    assert_loaded_exactly_once(&s, 299).await;
    let letters = read_dead_letters(&s);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!(l.get(HEADER_REASON), "body_too_large");
    assert_eq!(
        (l.get(HEADER_PARTITION), l.get(HEADER_OFFSET)),
        ("0", "150")
    );
    assert!(
        l.get("edgelog.error").contains("413"),
        "{:?}",
        l.get("edgelog.error")
    );
    let original = anon_record::encode(&record(0, 150, t0, huge));
    assert_eq!(
        l.get("edgelog.original.size"),
        original.len().to_string(),
        "a bounded envelope of the record"
    );
    assert!(original.starts_with(&l.payload));
    let statuses = proxy_statuses(s.loader.source_address.unwrap());
    assert!(statuses.get(&413).is_some_and(|&n| n >= 1), "{statuses:?}");
    drop_database(&s).await;
}

/// A batch recorded by a loader that is gone, spanning three partitions, with a record
/// ClickHouse refuses on partition 1. Two loaders inherit it (one owns partitions 0 and 1, the
/// other 2): each sends it whole under its token, each re-plans only its own partitions when it
/// is refused, and only the owner of partition 1 quarantines the record. Whatever the timing of
/// the group, every valid record lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_inherited_batch_is_re_planned_by_each_owner_over_its_own_partitions() {
    require_stack();
    let s = fast_loader_settings();
    let db = s.clickhouse.database.clone();
    let t0 = now_ms();
    let mut items = Vec::new();
    for p in 0..3 {
        for i in 0..40i64 {
            items.push((p, Item::Good(record(p, i, t0, format!("/i/{p}/{i}")))));
        }
    }
    items.push((1, Item::Good(record(1, 999, t0, "/poison".into()))));
    for i in 40..45i64 {
        items.push((1, Item::Good(record(1, i, t0, format!("/i/1/{i}")))));
    }
    write_anonymized(&s, items).await;
    admin()
        .query(
            &format!("ALTER TABLE {db}.http_log ADD CONSTRAINT no_poison CHECK url != '/poison'"),
            &[],
        )
        .await
        .unwrap();
    // What the loader that died had recorded: one batch over everything.
    let ranges = edgelog::batch::BatchRanges::new(vec![
        edgelog::batch::PartitionRange {
            partition: 0,
            start: 0,
            end: 40,
        },
        edgelog::batch::PartitionRange {
            partition: 1,
            start: 0,
            end: 46,
        },
        edgelog::batch::PartitionRange {
            partition: 2,
            start: 0,
            end: 40,
        },
    ])
    .unwrap();
    {
        use rdkafka::consumer::CommitMode;
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .set("group.id", &s.loader.group_id)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = ranges.to_metadata();
        let mut tpl = TopicPartitionList::new();
        for r in ranges.ranges() {
            let mut e = tpl.add_partition(&s.topics.anonymized, r.partition);
            e.set_offset(Offset::Offset(r.start)).unwrap();
            e.set_metadata(metadata.as_str());
        }
        c.commit(&tpl, CommitMode::Sync).unwrap();
    }
    let mut other = s.clone();
    other.loader.source_address = Some(fresh_loopback_ip());
    let (a, b) = (start_loader(&s), start_loader(&other));
    wait_loaded(&s, 125).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_loaded_exactly_once(&s, 125).await;
    eprintln!(
        "requests by status: {:?} and {:?}",
        proxy_statuses(s.loader.source_address.unwrap()),
        proxy_statuses(other.loader.source_address.unwrap())
    );
    let letters = read_dead_letters(&s);
    let distinct = distinct_positions(
        &letters,
        "clickhouse_rejected",
        HEADER_PARTITION,
        HEADER_OFFSET,
    );
    assert_eq!(
        distinct.into_iter().collect::<Vec<_>>(),
        vec![("1".to_string(), "999".to_string())]
    );
    drop_database(&s).await;
}
