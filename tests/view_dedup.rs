//! A retried insert is exact in every rollup, whatever ran on the server in between. The views'
//! output blocks are deduplicated by position, so a retry must be cut into the same blocks as the
//! first attempt; measured on 26.9 before the loader pinned single-level aggregation: a batch re-sent
//! after an unrelated large insert was cut into 256 blocks instead of one, and the rollups counted
//! it again (docs/LIMITATIONS.md, "Rollups and retried inserts").

mod common;

use std::time::Duration;

use common::*;
use edgelog::anon_record::AnonRecord;
use edgelog::body::{encode_body, insert_url, BodyCompression};
use edgelog::loader::insert::Outcome;
use edgelog::verify::{totals, UniquesCheck};

#[tokio::test]
async fn a_batch_resent_after_a_large_insert_is_not_counted_again() {
    require_stack();
    let s = isolated_settings();
    edgelog::setup::apply_schema(&s).await.unwrap();
    let db = &s.clickhouse.database;
    let client = admin_insert_client(Duration::from_secs(120));
    let send = |records: Vec<AnonRecord>, token: &'static str| {
        let client = &client;
        async move {
            let refs: Vec<&AnonRecord> = records.iter().collect();
            let body = encode_body(&refs, BodyCompression::Zstd);
            let url = insert_url(CLICKHOUSE, db, Some(token));
            let outcome = client.send(&url, BodyCompression::Zstd, body).await;
            assert!(matches!(outcome, Outcome::Inserted), "{token}: {outcome:?}");
        }
    };
    let small = realistic_records(8_000, 0);
    // Large enough that the views' GROUP BY over it has well over 100,000 groups (addresses).
    let large = realistic_records(300_000, 1);

    send(small.clone(), "small").await;
    send(large, "large").await;
    // The first batch again, as a loader re-sends a recorded batch after a crash.
    send(small, "small").await;

    assert_eq!(
        count(format!("SELECT count() FROM {db}.http_log")).await,
        308_000,
        "the raw table drops the copy"
    );
    let mut uniques = UniquesCheck::default();
    let check = totals::check_totals(&admin(), db, None, false, &mut uniques)
        .await
        .unwrap();
    assert!(
        check.is_clean() && uniques.is_clean(),
        "every rollup equals a recount of http_log: {check:?} {uniques}"
    );
    assert_eq!(check.totals_requests, 308_000);
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}

/// `edgelog setup` reloads after a migration only the views that migration created or changed:
/// a view's reload opens a moment in which an insert misses it, so a rollup the loaders already
/// feed is left alone by a migration that does not touch it.
#[tokio::test]
async fn a_migration_reloads_only_the_views_it_changed() {
    require_stack();
    let s = isolated_settings();
    edgelog::setup::apply_schema(&s).await.unwrap();
    let db = &s.clickhouse.database;
    let ch = admin();
    // `metadata_modification_time` counts whole seconds: start once the set-up's second is over.
    wait_for(
        "the server's clock past the set-up",
        Duration::from_secs(10),
        || async {
            (count(format!(
                "SELECT now() > (SELECT max(metadata_modification_time) FROM system.tables \
                 WHERE database = '{db}')"
            ))
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    let since = ch.query("SELECT now() FORMAT TSVRaw", &[]).await.unwrap();
    let reload = || edgelog::setup::reload_views_changed_since(&ch, db, "", since.trim());
    assert_eq!(
        reload().await.unwrap(),
        Vec::<String>::new(),
        "nothing changed"
    );
    ch.query(
        &format!(
            "ALTER TABLE {db}.http_log_uniques_1d_mv MODIFY SQL SECURITY DEFINER \
             DEFINER = CURRENT_USER"
        ),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(reload().await.unwrap(), ["http_log_uniques_1d_mv"]);
    // The reloaded view still feeds its rollup.
    let client = admin_insert_client(Duration::from_secs(60));
    let records = realistic_records(100, 0);
    let refs: Vec<&AnonRecord> = records.iter().collect();
    let body = encode_body(&refs, BodyCompression::Zstd);
    let url = insert_url(CLICKHOUSE, db, Some("after-reload"));
    let outcome = client.send(&url, BodyCompression::Zstd, body).await;
    assert!(matches!(outcome, Outcome::Inserted), "{outcome:?}");
    assert_eq!(
        count(format!(
            "SELECT sum(requests) FROM {db}.http_log_uniques_1d"
        ))
        .await,
        100
    );
    ch.query(&format!("DROP DATABASE {db}"), &[]).await.unwrap();
}
