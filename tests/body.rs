//! ClickHouse itself decodes the loader's insert body back to exactly the records it was made of:
//! every column, realistic records, a body of the real size, awkward strings and extreme numbers.

mod common;

use std::time::Duration;

use common::*;
use edgelog::anon_record::AnonRecord;
use edgelog::body::insert_url;
use edgelog::body::{encode_body, BodyCompression};
use edgelog::loader::insert::Outcome;

/// Strings a text format would choke on, and an empty one.
fn awkward(partition: i32) -> Vec<AnonRecord> {
    let base = realistic_records(1, partition).remove(0);
    [
        "",
        "/tab\there/new\nline/'quote'/\"dq\"/back\\slash",
        "/ünï/código/✓/🦀",
        &"/long".repeat(4_000),
        "\0",
    ]
    .iter()
    .enumerate()
    .map(|(i, url)| AnonRecord {
        url: url.to_string(),
        remote_addr: ["", "invalid", "2001:db8:1:X:X:X:X:X", "1.2.3.X", "\t"][i].into(),
        cache_status: ["", "HIT", "MISS", "ü", "\n"][i].into(),
        method: ["", "GET", "PÖST", "HEAD", "'"][i].into(),
        response_status: [0, 1, 200, 503, u16::MAX][i],
        bytes_sent: [0, 1, u64::MAX, 1 << 40, 7][i],
        request_time_milli: [u64::MAX, 0, 1, 2, 3][i],
        resource_id: [0, u64::MAX, 1, 2, 3][i],
        source_offset: [0, 1, 2, i64::MAX - 1, i64::MAX][i],
        ..base.clone()
    })
    .collect()
}

/// 70,000 distinct URLs: about as many rows as a real body holds, none of them repeating.
fn distinct_urls(n: usize, partition: i32) -> Vec<AnonRecord> {
    let base = realistic_records(1, partition).remove(0);
    (0..n)
        .map(|i| AnonRecord {
            url: format!("/u/{i}"),
            source_offset: i as i64,
            ..base.clone()
        })
        .collect()
}

/// The rows of `http_log` as text, one line per row in (partition, offset) order.
async fn rows_in_clickhouse(db: &str) -> Vec<String> {
    let text = admin()
        .query(
            &format!(
                "SELECT toUnixTimestamp(timestamp), resource_id, bytes_sent, request_time_milli, \
                 response_status, hex(cache_status), hex(method), hex(remote_addr), hex(url), \
                 source_partition, source_offset FROM {db}.http_log \
                 ORDER BY source_partition, source_offset FORMAT TabSeparated"
            ),
            &[],
        )
        .await
        .unwrap();
    text.lines().map(str::to_string).collect()
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02X}")).collect()
}

/// The same text computed from the records: what ClickHouse must hold.
fn expected_rows(records: &[AnonRecord]) -> Vec<String> {
    let mut sorted: Vec<&AnonRecord> = records.iter().collect();
    sorted.sort_by_key(|r| (r.source_partition, r.source_offset));
    sorted
        .iter()
        .map(|r| {
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                r.timestamp_epoch_milli / 1000,
                r.resource_id,
                r.bytes_sent,
                r.request_time_milli,
                r.response_status,
                hex(&r.cache_status),
                hex(&r.method),
                hex(&r.remote_addr),
                hex(&r.url),
                r.source_partition,
                r.source_offset
            )
        })
        .collect()
}

#[tokio::test]
async fn clickhouse_decodes_the_insert_body_to_the_records() {
    require_stack();
    let s = isolated_settings();
    edgelog::setup::apply_schema(&s).await.unwrap();
    let db = &s.clickhouse.database;
    // Every compression the loader offers, each on its own partitions (offsets stay unique).
    let batches: Vec<(BodyCompression, Vec<AnonRecord>)> = BodyCompression::ALL
        .iter()
        .enumerate()
        .flat_map(|(c, &compression)| {
            let p = 3 * c as i32;
            [
                realistic_records(5_000, p),
                awkward(p + 1),
                distinct_urls(70_000, p + 2),
            ]
            .map(|batch| (compression, batch))
        })
        .collect();
    // The loader's own client, straight to ClickHouse as the set-up user.
    let client = admin_insert_client(Duration::from_secs(60));
    for (i, (compression, batch)) in batches.iter().enumerate() {
        let compression = *compression;
        let refs: Vec<&AnonRecord> = batch.iter().collect();
        let url = insert_url(CLICKHOUSE, db, Some(&format!("body-test-{i}")));
        let outcome = client
            .send(&url, compression, encode_body(&refs, compression))
            .await;
        assert!(
            matches!(outcome, Outcome::Inserted),
            "batch {i} ({compression:?}): {outcome:?}"
        );
    }
    let all: Vec<AnonRecord> = batches.into_iter().flat_map(|(_, batch)| batch).collect();
    let got = rows_in_clickhouse(db).await;
    let want = expected_rows(&all);
    assert_eq!(got.len(), want.len(), "row count");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}
