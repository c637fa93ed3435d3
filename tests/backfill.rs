//! `edgelog backfill` on the real stack: the upgrade it exists for. A database already holds rows
//! when a migration adds rollups; set-up names them, backfill fills them from `http_log`, and
//! `verify` is clean afterwards. A second run changes nothing.

mod common;

use std::time::Duration;

use common::*;
use edgelog::backfill::{backfill, new_rollups_missing_rows, rollup_tables};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollups_added_after_the_data_are_filled_from_the_raw_table() {
    require_stack();
    let s = fast_loader_settings();
    let produced = fill_anonymized_topic(&s, 3_000).await;
    let good = produced.sent - produced.garbage;
    let db = s.clickhouse.database.clone();

    let loader = start_loader(&s);
    wait_drained(&s, Duration::from_secs(90)).await;
    let refused = backfill(&s, &[], None).await.unwrap_err().to_string();
    assert!(refused.contains("running member"), "{refused}");
    loader.stop().await.unwrap();
    assert_loaded_exactly_once(&s, good).await;

    // As if migration 005 came after the data: its tables and views gone, its record too.
    let ch = admin();
    for sql in [
        format!("DROP VIEW {db}.http_log_top_1h_mv"),
        format!("DROP VIEW {db}.http_log_top_1d_mv"),
        format!("DROP TABLE {db}.http_log_top_1d"),
        format!("DROP TABLE {db}.http_log_top_1h"),
        format!("DELETE FROM {db}.schema_migrations WHERE version = 5"),
    ] {
        ch.query(&sql, &[]).await.unwrap();
    }
    let before = rollup_tables(&ch, &db).await.unwrap();
    assert_eq!(
        edgelog::setup::apply_schema(&s).await.unwrap(),
        vec![5],
        "the upgrade applies 005"
    );
    let missing = new_rollups_missing_rows(&ch, &db, &before).await.unwrap();
    assert_eq!(missing, ["http_log_top_1d", "http_log_top_1h"]);
    let empty = edgelog::verify::audit(&s).await.unwrap();
    assert!(
        !empty.is_clean(),
        "the new rollups hold nothing yet: {empty}"
    );

    let unknown = backfill(&s, &["http_log_nope".into()], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("http_log_nope is not a rollup"),
        "{unknown}"
    );

    let summary = backfill(&s, &missing, None).await.unwrap();
    assert!(summary.days.is_some(), "{summary:?}");
    assert_eq!(
        summary.replaced.keys().collect::<Vec<_>>(),
        ["http_log_top_1d", "http_log_top_1h"],
        "only the named rollups"
    );
    let report = edgelog::verify::audit(&s).await.unwrap();
    assert!(report.is_clean(), "{report}");
    let top = format!(
        "SELECT sum(requests) FROM {db}.http_log_top_1h \
         WHERE response_status = 0 AND cache_status = '*'"
    );
    assert_eq!(count(&top).await, good);

    // Every rollup, again: it depends on http_log only, so nothing changes.
    let summary = backfill(&s, &[], None).await.unwrap();
    assert_eq!(summary.replaced.len(), before.len() + 2, "{summary:?}");
    // The answers computed ahead from the rollups are refreshed once they are rebuilt.
    assert_eq!(
        summary.views.refreshed,
        ["http_log_uniques_top_trailing_mv"]
    );
    assert_eq!(count(&top).await, good);
    let report = edgelog::verify::audit(&s).await.unwrap();
    assert!(report.is_clean(), "{report}");
    let staging = count(format!(
        "SELECT count() FROM system.tables WHERE database = '{db}' AND name LIKE '%replay%'"
    ))
    .await;
    assert_eq!(staging, 0, "staging tables are dropped");
}
