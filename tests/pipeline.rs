//! End to end on the real stack: producer -> anonymizer -> loader -> fast proxy -> ClickHouse.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::Message;

async fn count(sql: String) -> u64 {
    admin()
        .query(&sql, &[])
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_record_lands_once_anonymized_and_garbage_is_dead_lettered() {
    require_stack();
    let mut s = isolated_settings();
    s.producer.rate = 0.0;
    s.producer.count = Some(3000);
    s.producer.garbage_share = 0.02;
    s.producer.malformed_ip_share = 0.01;
    s.producer.ipv6_share = 0.1;
    s.loader.slot_spacing = Duration::from_millis(300);
    s.loader.source_address = Some(fresh_loopback_ip());
    s.anonymizer.txn_max_records = 500;
    edgelog::setup::create_topics(&s).await.unwrap();
    edgelog::setup::apply_schema(&s).await.unwrap();

    let report = edgelog::producer::run(&s, std::future::pending::<()>())
        .await
        .unwrap();
    assert_eq!(report.delivered, 3000);
    assert!(
        report.garbage > 20,
        "the run includes garbage: {}",
        report.garbage
    );
    let good = report.sent - report.garbage;

    let anonymizer = start_anonymizer(&s);
    let loader = start_loader(&s);

    let db = s.clickhouse.database.clone();
    wait_for(
        "all good records in ClickHouse",
        Duration::from_secs(120),
        || {
            let sql = format!("SELECT count() FROM {db}.http_log");
            async move { (count(sql).await >= good).then_some(()) }
        },
    )
    .await;
    anonymizer.stop().await.expect("anonymizer stops cleanly");
    loader.stop().await.expect("loader stops cleanly");

    assert_eq!(
        count(format!("SELECT count() FROM {db}.http_log")).await,
        good,
        "no duplicates"
    );
    assert_eq!(
        count(format!(
            "SELECT uniqExact(source_partition, source_offset) FROM {db}.http_log"
        ))
        .await,
        good,
        "every source offset once"
    );
    assert_eq!(
        count(format!("SELECT sum(requests) FROM {db}.http_log_totals")).await,
        good,
        "totals equal the raw count"
    );
    assert_eq!(
        count(format!("SELECT countIf(match(remote_addr, '^[0-9]+\\\\.[0-9]+\\\\.[0-9]+\\\\.[0-9]+$')) FROM {db}.http_log")).await,
        0,
        "no full IPv4 address reached ClickHouse"
    );
    assert!(
        count(format!(
            "SELECT countIf(remote_addr = 'invalid') FROM {db}.http_log"
        ))
        .await
            > 0
    );
    assert!(
        count(format!(
            "SELECT countIf(remote_addr LIKE '%:X') FROM {db}.http_log"
        ))
        .await
            > 0,
        "IPv6 anonymized"
    );

    // The dead-letter topic holds exactly the garbage, with headers naming its origin.
    let dlq = s.topics.dead_letter.clone();
    let expected = report.garbage as usize;
    let dead = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .set("group.id", unique("dlq_reader"))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        consumer.subscribe(&[&dlq]).unwrap();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut quiet = std::time::Instant::now();
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let headers = m.headers().expect("dead letters carry headers");
                    let names: Vec<String> = headers.iter().map(|h| h.key.to_string()).collect();
                    assert!(
                        m.payload().unwrap().starts_with(b"garbage:"),
                        "original bytes kept"
                    );
                    seen.push(names);
                    quiet = std::time::Instant::now();
                }
                Some(Err(e)) => panic!("{e}"),
                None if seen.len() >= expected && quiet.elapsed() > Duration::from_secs(3) => break,
                None => {}
            }
        }
        seen
    })
    .await
    .unwrap();
    assert_eq!(
        dead.len(),
        expected,
        "every garbage message dead-lettered once"
    );
    for names in dead {
        for h in [
            "edgelog.source.topic",
            "edgelog.source.partition",
            "edgelog.source.offset",
            "edgelog.error",
        ] {
            assert!(names.iter().any(|n| n == h), "header {h} in {names:?}");
        }
    }
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}

/// nginx's access log of the real-rate proxy, as written by scripts/stack.sh.
fn proxy_access_log() -> String {
    let home = std::env::var("EDGESTACK_HOME")
        .unwrap_or_else(|_| format!("{}/.cache/edgelog-stack", std::env::var("HOME").unwrap()));
    std::fs::read_to_string(format!("{home}/run/proxy/access.log")).expect("the proxy's access log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_the_real_one_per_minute_proxy_two_batches_land_without_a_single_503() {
    require_stack();
    let mut s = isolated_settings();
    s.clickhouse.url = PROXY.into(); // the real 1r/m proxy
    let ip = fresh_loopback_ip();
    s.loader.source_address = Some(ip);
    s.producer.rate = 0.0;
    edgelog::setup::create_topics(&s).await.unwrap();
    edgelog::setup::apply_schema(&s).await.unwrap();
    let db = s.clickhouse.database.clone();
    let rows =
        |db: String| async move { count(format!("SELECT count() FROM {db}.http_log")).await };

    let anonymizer = start_anonymizer(&s);
    let loader = start_loader(&s);
    let started = std::time::Instant::now();
    for (batch, seed) in [(1u64, 1u64), (2, 2)] {
        let mut p = s.clone();
        p.producer.count = Some(1000);
        p.producer.seed = seed;
        edgelog::producer::run(&p, std::future::pending::<()>())
            .await
            .unwrap();
        wait_for(
            &format!("batch {batch} in ClickHouse"),
            Duration::from_secs(150),
            || {
                let db = db.clone();
                async move { (rows(db).await >= batch * 1000).then_some(()) }
            },
        )
        .await;
    }
    let elapsed = started.elapsed();
    anonymizer.stop().await.unwrap();
    loader.stop().await.unwrap();

    assert_eq!(rows(db.clone()).await, 2000, "exactly once");
    assert!(
        elapsed >= Duration::from_millis(62_500),
        "the second insert waited for the proxy's next slot"
    );
    let log = proxy_access_log();
    let ours: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with(&format!("{ip} ")))
        .collect();
    let ok = ours.iter().filter(|l| l.contains("\" 200 ")).count();
    let refused = ours.iter().filter(|l| l.contains("\" 503 ")).count();
    assert!(ok >= 2, "at least two inserts went through: {ours:?}");
    assert_eq!(
        refused, 0,
        "the loader never spent a request the proxy would refuse: {ours:?}"
    );
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}
