//! `edgelog replay` on the real stack: damaged days are rebuilt from the anonymized topic, and
//! `verify` is clean afterwards (no duplicate rows, no double-counted rollup).

mod common;

use std::time::Duration;

use common::*;
use edgelog::replay::replay;
use edgelog::staging::Days;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_rebuilds_damaged_days_exactly() {
    require_stack();
    let s = fast_loader_settings();
    let produced = fill_anonymized_topic(&s, 3_000).await;
    let good = produced.sent - produced.garbage;
    // A foreign record on the anonymized topic: the loader quarantines it, replay skips it.
    common::hostile::produce_to(
        &s,
        &s.topics.anonymized,
        &[b"not an anonymized record".to_vec()],
    );
    let db = s.clickhouse.database.clone();
    // Records carry the producer's clock; a run across midnight spans two days.
    let now = edgelog::clock::now_epoch_ms();
    let today = edgelog::staging::day_of_epoch_ms(now);
    let yesterday = edgelog::staging::day_of_epoch_ms(now - 86_400_000);
    let days = Days::parse(&yesterday, &today).unwrap();

    let loader = start_loader(&s);
    wait_drained(&s, Duration::from_secs(90)).await;
    let refused = replay(&s, &days).await.unwrap_err().to_string();
    assert!(refused.contains("running member"), "{refused}");
    loader.stop().await.unwrap();

    // The damage a bug could do: rows lost, rows doubled, a rollup double-counted.
    for sql in [
        format!("DELETE FROM {db}.http_log WHERE source_offset % 97 = 5"),
        format!(
            "INSERT INTO {db}.http_log SELECT * FROM {db}.http_log WHERE source_offset % 89 = 3 \
             SETTINGS insert_deduplicate = 0"
        ),
        format!(
            "INSERT INTO {db}.http_log_totals_by_status SELECT * FROM {db}.http_log_totals_by_status \
             LIMIT 3 SETTINGS insert_deduplicate = 0"
        ),
        format!(
            "INSERT INTO {db}.http_log_uniques_by_resource SELECT * FROM {db}.http_log_uniques_by_resource \
             LIMIT 3 SETTINGS insert_deduplicate = 0"
        ),
    ] {
        admin().query(&sql, &[]).await.unwrap();
    }
    let damaged = edgelog::verify::audit(&s).await.unwrap();
    assert!(!damaged.is_clean(), "{damaged}");
    assert!(!damaged.uniques.is_clean(), "{damaged}");

    let summary = replay(&s, &days).await.unwrap();
    assert_eq!(summary.rows_replayed, good);
    assert!(!summary.replaced["http_log"].is_empty(), "{summary:?}");
    assert_eq!(
        summary.views.refreshed,
        ["http_log_uniques_top_trailing_mv"]
    );
    assert!(
        summary.replaced.contains_key("http_log_totals"),
        "{summary:?}"
    );

    let report = edgelog::verify::audit(&s).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.dead_letters.without_input_source, 1, "{report}");
    let landed: u64 = report.partitions.iter().map(|p| p.landed).sum();
    assert_eq!(landed, good, "{report}");
    let staging = count(format!(
        "SELECT count() FROM system.tables WHERE database = '{db}' AND name LIKE '%replay%'"
    ))
    .await;
    assert_eq!(staging, 0, "staging tables are dropped");
}
