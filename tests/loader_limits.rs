//! The loader's limits on the real stack. Memory stays bounded whatever the backlog. Data loss is
//! detected, never hidden: when Kafka retention deletes anonymized records before the loader
//! confirmed them, the loader says so (log + `edgelog_loader_lost_offsets_total`) and `verify`
//! reports those records as missing.

mod common;

use std::time::Duration;

use common::*;
use edgelog::batch::BatchId;
use edgelog::config::Settings;
use edgelog::health::Health;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};

/// Deletes the anonymized topic's records below `to[partition]`, as retention would.
async fn delete_below(s: &Settings, to: &[(i32, i64)]) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for &(p, o) in to {
        tpl.add_partition_offset(&s.topics.anonymized, p, Offset::Offset(o))
            .unwrap();
    }
    let result = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .unwrap();
    for e in result.elements() {
        e.error().unwrap();
    }
}

async fn lost_offsets_metric(addr: std::net::SocketAddr) -> u64 {
    edgelog::clickhouse::install_crypto_provider();
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("edgelog_loader_lost_offsets_total "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_deleted_before_loading_are_reported_as_lost() {
    require_stack();
    let mut s = isolated_settings();
    s.producer.garbage_share = 0.0;
    s.loader.slot_spacing = Duration::from_millis(300);
    s.loader.source_address = Some(fresh_loopback_ip());
    let health = Health::new(Duration::from_secs(3600));
    let addr = serve_health(&health);

    // Case 1: the loader is down while retention passes its committed offsets.
    fill_anonymized_topic(&s, 1_500).await;
    let loader = start_loader_with_health(&s, health.clone());
    wait_drained(&s, Duration::from_secs(90)).await;
    loader.stop().await.unwrap();
    fill_anonymized_topic(&s, 1_500).await;
    let before = committed_vs_end(&s.loader.group_id, &s.topics.anonymized);
    // Keep the last 20 offsets of each partition; delete the rest of what was never loaded.
    // (The producer's sticky partitioning may leave a partition with fewer new records.)
    let cut: Vec<(i32, i64)> = before
        .iter()
        .enumerate()
        .map(|(p, (c, high, _))| (p as i32, (high - 20).max(c.unwrap())))
        .collect();
    delete_below(&s, &cut).await;
    let lost: u64 = before
        .iter()
        .zip(&cut)
        .map(|((c, _, _), (_, low))| (low - c.unwrap()) as u64)
        .sum();
    assert!(lost > 0, "something was deleted before loading");

    // Case 2: a recorded batch loses its first records before it is rebuilt.
    let loader = start_loader_with_health(&s, health.clone());
    wait_drained(&s, Duration::from_secs(90)).await;
    loader.stop().await.unwrap();
    assert_eq!(lost_offsets_metric(addr).await, lost, "case 1 counted");
    fill_anonymized_topic(&s, 1_500).await;
    let crashed = loader_command(&s)
        .env("LOADER_FAILPOINT", "after_record")
        .status()
        .unwrap();
    assert!(!crashed.success());
    let recorded = committed_vs_end(&s.loader.group_id, &s.topics.anonymized);
    // Cut 10 offsets (or all) from the start of the recorded batch on each of its partitions.
    let mut lost_in_batch = 0u64;
    let cut2: Vec<(i32, i64)> = recorded
        .iter()
        .enumerate()
        .filter_map(|(p, (_, _, meta))| {
            let ranges = BatchId::from_metadata(meta).unwrap()?.ranges;
            let r = ranges.get(p as i32).unwrap();
            let to = (r.start + 10).min(r.end);
            lost_in_batch += (to - r.start) as u64;
            Some((p as i32, to))
        })
        .collect();
    assert!(lost_in_batch > 0, "a batch was recorded: {recorded:?}");
    delete_below(&s, &cut2).await;
    let loader = start_loader_with_health(&s, health);
    wait_drained(&s, Duration::from_secs(90)).await;
    loader.stop().await.unwrap();
    assert_eq!(
        lost_offsets_metric(addr).await,
        lost + lost_in_batch,
        "case 2 counted"
    );

    // The audit names the lost records as missing (offsets also count transaction markers, so
    // there are at most as many missing records as lost offsets), and nothing else is wrong.
    let report = edgelog::verify::audit(&s).await.unwrap();
    let missing: u64 = report.partitions.iter().map(|p| p.missing.count).sum();
    let worse: u64 = report
        .partitions
        .iter()
        .map(|p| p.unexpected.count + p.duplicate_rows)
        .sum();
    assert!(missing > 0 && missing <= lost + 30, "{report}");
    assert_eq!(worse, 0, "{report}");
}

/// `buffered: N records, M bytes` from a `/status` page.
fn buffered_bytes(page: &str) -> Option<(usize, bool)> {
    let line = page.lines().find(|l| l.starts_with("buffered: "))?;
    let bytes = line.split(", ").nth(1)?.split(' ').next()?.parse().ok()?;
    Some((bytes, line.contains("paused")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_buffer_stays_bounded_under_a_backlog() {
    require_stack();
    let mut s = isolated_settings();
    s.loader.max_body_bytes = 64 * 1024;
    s.loader.max_buffer_bytes = 128 * 1024;
    s.loader.slot_spacing = Duration::from_secs(1);
    s.loader.source_address = Some(fresh_loopback_ip());
    let good = fill_anonymized_topic(&s, 30_000).await;
    let health = Health::new(Duration::from_secs(3600));
    let loader = start_loader_with_health(&s, health.clone());
    let mut most = 0;
    let mut paused_seen = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let page = edgelog::health::render_status(
            std::time::Instant::now(),
            &health.snapshot(),
            health.stall_after,
        );
        if let Some((bytes, paused)) = buffered_bytes(&page) {
            most = most.max(bytes);
            paused_seen |= paused;
        }
        let s2 = s.clone();
        if tokio::task::spawn_blocking(move || edgelog::verify::pipeline_drained(&s2).unwrap())
            .await
            .unwrap()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not drained in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loader.stop().await.unwrap();
    // Consumption pauses once the buffer passes its limit; one more fetched record may land.
    assert!(paused_seen, "a 30k backlog must fill a 128 KiB buffer");
    assert!(most <= 128 * 1024 + 1024, "buffer peaked at {most} bytes");
    let report = edgelog::verify::audit(&s).await.unwrap();
    assert!(report.is_clean(), "{report}");
    let landed: u64 = report.partitions.iter().map(|p| p.landed).sum();
    assert_eq!(landed, good.sent - good.garbage);
}
