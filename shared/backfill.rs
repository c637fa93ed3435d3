//! `edgelog backfill`: rebuild rollups from the raw table, for the days `http_log` still holds.
//!
//! A materialized view sees only the inserts made after it was created. A rollup that a later
//! migration adds (005's top-N summaries, say) is empty for every earlier bucket and partial for
//! the bucket it was created in. Backfill recomputes the chosen rollups' days from `http_log`
//! through each view's own SELECT, one day per INSERT (a month of `topK` states in one GROUP BY
//! would not fit the server's memory), into a staging copy per partition that is swapped in with
//! `REPLACE PARTITION`: the machinery of `edgelog replay`. The result depends only on `http_log`,
//! so running it twice, or on a rollup that was already complete, changes nothing.
//!
//! `http_log` must not change meanwhile (rows a loader inserted into a rollup during the swap
//! would be replaced away), so the loaders must be stopped, as for replay. Days whose raw rows the
//! raw table's TTL may already have deleted are never rebuilt: they would be replaced with less
//! than the rollups hold.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

use crate::clickhouse::ClickHouseClient;
use crate::config::Settings;
use crate::staging::{
    rebuild_servers, rebuild_table, refresh_views_on, refuse_if_loader_running, rollups,
    rollups_on, Days, RebuildServer, Refreshes,
};

/// Which days to rebuild, from what the raw table holds. `raw`: its first and last day (`None`
/// when empty). `kept_from`: the first day whose raw rows are all still kept (`None`: no raw
/// TTL). `requested`: the operator's days, if any; refused where they reach before `kept_from`,
/// since those days would lose what only the rollups still hold. `None`: nothing to do.
pub fn days_to_rebuild(
    raw: Option<(&str, &str)>,
    kept_from: Option<&str>,
    requested: Option<&Days>,
) -> anyhow::Result<Option<Days>> {
    if let (Some(kept), Some(r)) = (kept_from, requested) {
        if r.first.as_str() < kept {
            bail!(
                "http_log keeps raw rows from {kept} on (its TTL): rebuilding {} would replace \
                 what the rollups hold for it with less; start at {kept} or later",
                r.first
            );
        }
    }
    if let Some(r) = requested {
        return Ok(Some(r.clone()));
    }
    let Some((first, last)) = raw else {
        return Ok(None);
    };
    let first = match kept_from {
        Some(kept) if kept > first => kept,
        _ => first,
    };
    if first > last {
        return Ok(None);
    }
    Ok(Some(Days::parse(first, last)?))
}

/// Each day of `days`, in order, as `(day, next day)` condition bounds.
fn each_day(days: &Days) -> anyhow::Result<Vec<Days>> {
    let start = epoch_day(&days.first)?;
    let end = epoch_day(&days.last)?;
    (start..=end)
        .map(|d| {
            let day = crate::staging::day_of_epoch_ms(d as u64 * 86_400_000);
            Days::parse(&day, &day)
        })
        .collect()
}

/// Days since 1970-01-01 of a validated `YYYY-MM-DD` (days-from-civil, H. Hinnant).
fn epoch_day(day: &str) -> anyhow::Result<i64> {
    let part = |r: std::ops::Range<usize>| -> anyhow::Result<i64> {
        day.get(r)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{day:?} is not a day (YYYY-MM-DD)"))
    };
    let (y, m, d) = (part(0..4)?, part(5..7)?, part(8..10)?);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok(era * 146_097 + doe - 719_468)
}

/// What a backfill did: the days, and per table the partitions replaced.
#[derive(Debug, Default)]
pub struct BackfillSummary {
    pub days: Option<Days>,
    pub replaced: BTreeMap<String, Vec<String>>,
    /// The refreshable views, refreshed afterwards (per server in cluster mode).
    pub views: Refreshes,
}

/// Checks that the loaders are stopped, then rebuilds `tables` (empty: every rollup) for `days`
/// (default: every day the raw table still holds whole). In cluster mode the days are those of
/// the whole cluster (read through the Distributed `http_log`), and each shard's `_local`
/// rollups are rebuilt from its own `http_log_local` ([`crate::staging::rebuild_servers`]).
pub async fn backfill(
    settings: &Settings,
    tables: &[String],
    days: Option<&Days>,
) -> anyhow::Result<BackfillSummary> {
    let servers = rebuild_servers(&settings.clickhouse, "backfill")?;
    let s = settings.clone();
    tokio::task::spawn_blocking(move || refuse_if_loader_running(&s)).await??;
    let ch = ClickHouseClient::admin(&settings.clickhouse)?;
    let db = &settings.clickhouse.database;
    let mut summary = plan_days(&ch, db, settings.clickhouse.raw_ttl_days, tables, days).await?;
    let Some(days) = summary.days.clone() else {
        return Ok(summary);
    };
    let mut clients = Vec::new();
    for server in &servers {
        let client = server.client(&settings.clickhouse)?;
        rebuild_on(&client, db, server, tables, &days, &mut summary)
            .await
            .with_context(|| format!("rebuilding rollups on {}", server.url))?;
        clients.push(client);
    }
    // Only once every shard is rebuilt: in cluster mode each node's view reads all of them.
    summary.views = refresh_views_on(&servers, &clients, db).await?;
    Ok(summary)
}

/// The ClickHouse half of [`backfill`] on one server, without the check that nothing inserts
/// meanwhile (the caller's duty): the queries bench uses it on its own database.
pub async fn rebuild_rollups(
    ch: &ClickHouseClient,
    db: &str,
    raw_ttl_days: u32,
    tables: &[String],
    days: Option<&Days>,
) -> anyhow::Result<BackfillSummary> {
    let mut summary = plan_days(ch, db, raw_ttl_days, tables, days).await?;
    let Some(days) = summary.days.clone() else {
        return Ok(summary);
    };
    let server = RebuildServer {
        url: String::new(),
        suffix: "",
    };
    rebuild_on(ch, db, &server, tables, &days, &mut summary).await?;
    Ok(summary)
}

/// Checks that `tables` are rollups of `db`, and decides the days from what `http_log` holds
/// (in cluster mode the Distributed table: the days of every shard).
async fn plan_days(
    ch: &ClickHouseClient,
    db: &str,
    raw_ttl_days: u32,
    tables: &[String],
    days: Option<&Days>,
) -> anyhow::Result<BackfillSummary> {
    let all = rollups(ch, db).await?;
    if let Some(unknown) = tables.iter().find(|t| !all.iter().any(|(r, _)| r == *t)) {
        let names: Vec<&str> = all.iter().map(|(r, _)| r.as_str()).collect();
        bail!(
            "{unknown} is not a rollup of {db} (rollups: {})",
            names.join(", ")
        );
    }
    let text = ch
        .query(
            &format!(
                "SELECT count(), toString(toDate(min(timestamp), 'UTC')), \
                 toString(toDate(max(timestamp), 'UTC')), \
                 toString(toDate(now(), 'UTC') - {{ttl:UInt32}} + 1) \
                 FROM {db}.http_log FORMAT TSV"
            ),
            &[("ttl", &raw_ttl_days.to_string())],
        )
        .await
        .context("reading the days http_log holds")?;
    let f: Vec<&str> = text.trim().split('\t').collect();
    let [rows, first, last, kept] = f[..] else {
        bail!("unexpected answer about http_log's days: {text:?}");
    };
    let raw = (rows != "0").then_some((first, last));
    let kept = (raw_ttl_days > 0).then_some(kept);
    Ok(BackfillSummary {
        days: days_to_rebuild(raw, kept, days)?,
        ..BackfillSummary::default()
    })
}

/// Each chosen rollup of `server` (`tables` empty: every one) as its table there and the
/// SELECTs that rebuild `days` from the server's raw table, one day each.
pub(crate) fn backfill_plan(
    views: &[(String, String)],
    db: &str,
    server: &RebuildServer,
    tables: &[String],
    days: &Days,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let each = each_day(days)?;
    Ok(rollups_on(views, db, server)?
        .into_iter()
        .filter(|r| tables.is_empty() || tables.contains(&r.name))
        .map(|r| {
            let per_day = each
                .iter()
                .map(|day| {
                    r.reading(&format!(
                        "(SELECT * FROM {} WHERE {})",
                        r.raw,
                        day.condition("timestamp")
                    ))
                })
                .collect();
            (r.table, per_day)
        })
        .collect())
}

/// Rebuilds the chosen rollups of one server for `days`, adding what it replaced to `summary`.
async fn rebuild_on(
    ch: &ClickHouseClient,
    db: &str,
    server: &RebuildServer,
    tables: &[String],
    days: &Days,
    summary: &mut BackfillSummary,
) -> anyhow::Result<()> {
    let views = rollups(ch, db).await?;
    for (table, per_day) in backfill_plan(&views, db, server, tables, days)? {
        let parts = rebuild_table(ch, db, &table, "ts", days, Some(&per_day)).await?;
        tracing::info!(table, server = %server.url, partitions = ?parts, "rollup rebuilt from http_log");
        summary.replaced.insert(server.label(&table), parts);
    }
    Ok(())
}

/// The rollup tables of `db` (fed from `http_log` by a materialized view).
pub async fn rollup_tables(ch: &ClickHouseClient, db: &str) -> anyhow::Result<Vec<String>> {
    Ok(rollups(ch, db).await?.into_iter().map(|(t, _)| t).collect())
}

/// The rollups that are not in `before` (taken before a set-up) while `http_log` already holds
/// rows: their views saw none of those rows, so they need a backfill.
pub async fn new_rollups_missing_rows(
    ch: &ClickHouseClient,
    db: &str,
    before: &[String],
) -> anyhow::Result<Vec<String>> {
    let new: Vec<String> = rollup_tables(ch, db)
        .await?
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    if new.is_empty() {
        return Ok(new);
    }
    let rows = ch
        .query(&format!("SELECT count() FROM {db}.http_log"), &[])
        .await?;
    Ok(if rows.trim() == "0" { Vec::new() } else { new })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(a: &str, b: &str) -> Days {
        Days::parse(a, b).unwrap()
    }

    #[test]
    fn by_default_every_day_the_raw_table_holds_whole() {
        let raw = Some(("2026-11-01", "2026-11-30"));
        assert_eq!(
            days_to_rebuild(raw, None, None).unwrap(),
            Some(days("2026-11-01", "2026-11-30"))
        );
        // The TTL may have deleted part of the first day.
        assert_eq!(
            days_to_rebuild(raw, Some("2026-11-05"), None).unwrap(),
            Some(days("2026-11-05", "2026-11-30"))
        );
        assert_eq!(
            days_to_rebuild(raw, Some("2026-10-01"), None).unwrap(),
            Some(days("2026-11-01", "2026-11-30"))
        );
        assert_eq!(days_to_rebuild(None, None, None).unwrap(), None);
        assert_eq!(
            days_to_rebuild(raw, Some("2026-12-02"), None).unwrap(),
            None
        );
    }

    #[test]
    fn requested_days_before_the_raw_retention_are_refused() {
        let raw = Some(("2026-11-01", "2026-11-30"));
        let r = days("2026-11-03", "2026-11-04");
        let err = days_to_rebuild(raw, Some("2026-11-05"), Some(&r)).unwrap_err();
        assert!(err.to_string().contains("from 2026-11-05 on"), "{err}");
        assert_eq!(
            days_to_rebuild(raw, Some("2026-11-03"), Some(&r)).unwrap(),
            Some(r.clone())
        );
        assert_eq!(days_to_rebuild(None, None, Some(&r)).unwrap(), Some(r));
    }

    #[test]
    fn each_shard_rebuilds_its_local_rollups_from_its_local_raw_table_day_by_day() {
        let ch = crate::config::ClickHouseSettings {
            cluster: Some("c".into()),
            shard_admin_urls: vec!["http://s1:8123".into(), "http://s2:8123".into()],
            ..Default::default()
        };
        let servers = rebuild_servers(&ch, "backfill").unwrap();
        let views = vec![
            (
                "http_log_top_1d".to_string(),
                "SELECT 1 FROM db.http_log_local ".to_string(),
            ),
            (
                "http_log_totals".to_string(),
                "SELECT 2 FROM db.http_log_local ".to_string(),
            ),
        ];
        let two_days = days("2026-11-30", "2026-12-01");
        let plan = backfill_plan(
            &views,
            "db",
            &servers[1],
            &["http_log_totals".into()],
            &two_days,
        )
        .unwrap();
        assert_eq!(plan.len(), 1, "only the named rollup");
        let (table, selects) = &plan[0];
        assert_eq!(table, "http_log_totals_local");
        assert_eq!(selects.len(), 2, "one SELECT per day");
        assert!(
            selects[1].starts_with(
                "SELECT 2 FROM (SELECT * FROM db.http_log_local WHERE timestamp >= \
                 toDateTime('2026-12-01 00:00:00', 'UTC')"
            ),
            "{}",
            selects[1]
        );
        let every = backfill_plan(&views, "db", &servers[0], &[], &two_days).unwrap();
        let tables: Vec<&str> = every.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tables, ["http_log_top_1d_local", "http_log_totals_local"]);
    }

    #[test]
    fn days_are_walked_one_by_one_across_months_and_leap_days() {
        let walked: Vec<String> = each_day(&days("2028-02-28", "2028-03-01"))
            .unwrap()
            .into_iter()
            .map(|d| d.first)
            .collect();
        assert_eq!(walked, ["2028-02-28", "2028-02-29", "2028-03-01"]);
        assert_eq!(epoch_day("1970-01-01").unwrap(), 0);
        assert_eq!(epoch_day("2000-03-01").unwrap(), 11_017);
        assert_eq!(
            each_day(&days("2026-12-31", "2026-12-31")).unwrap().len(),
            1
        );
    }
}
