//! The unique-client rollups (migrations 009-011) against an exact recount from `http_log`.
//!
//! One UTC day at a time, on the days `verify` checks the other rollups (`totals::check_totals`),
//! so that ClickHouse holds one day's distinct sets, and a day is recorded as audited only when
//! these agree too.
//!
//! Per bucket of every such table: the request sum must equal the raw rows' count exactly (a
//! distinct count cannot show a double-counted retry, a sum does), and the merged state (`uniq`,
//! or 011's `uniqCombined(17)`) must be within [`RELATIVE_TOLERANCE`] or [`ABSOLUTE_TOLERANCE`]
//! clients, whichever is larger, of `uniqExact(remote_addr)` over the same raw rows. Both are
//! estimates: exact while a state holds few values, within ~1% when it samples or turns into a
//! HyperLogLog (docs/BENCHMARKS.md, "Unique clients"); the absolute slack covers their hash
//! collisions in small buckets.

use std::fmt;

use anyhow::Context;

use super::totals::QUERY_MEMORY_LIMIT;
use crate::clickhouse::ClickHouseClient;

/// A bucket's distinct count may differ from `uniqExact` by this share of it...
pub const RELATIVE_TOLERANCE: f64 = 0.01;
/// ...or by this many clients, whichever is larger.
pub const ABSOLUTE_TOLERANCE: u64 = 2;

/// A unique-client rollup as `verify` recounts it.
#[derive(Debug, Clone, Copy)]
pub struct Rollup {
    pub table: &'static str,
    /// The bucket of a raw row's timestamp, as the table's view computes it.
    pub bucket: &'static str,
    /// The key columns besides the bucket.
    pub keys: &'static [&'static str],
    /// The `-Merge` function of the table's state.
    pub merge: &'static str,
}

const fn rollup(
    table: &'static str,
    bucket: &'static str,
    keys: &'static [&'static str],
    merge: &'static str,
) -> Rollup {
    Rollup {
        table,
        bucket,
        keys,
        merge,
    }
}

const MINUTE: &str = "toStartOfMinute(timestamp)";
const HOUR: &str = "toStartOfHour(timestamp)";
const SIX_HOURS: &str = "toStartOfInterval(timestamp, INTERVAL 6 HOUR)";
const DAY: &str = "toStartOfDay(timestamp)";
const RESOURCE: &[&str] = &["resource_id"];
const STATUS_CACHE: &[&str] = &["response_status", "cache_status"];
const UNIQ: &str = "uniqMerge";
const UNIQ_COMBINED: &str = "uniqCombinedMerge(17)";

/// Every unique-client rollup of the migrations.
pub const TABLES: [Rollup; 13] = [
    rollup("http_log_uniques_by_resource", MINUTE, RESOURCE, UNIQ),
    rollup("http_log_uniques_by_resource_1d", DAY, RESOURCE, UNIQ),
    rollup("http_log_uniques_by_status", MINUTE, STATUS_CACHE, UNIQ),
    rollup("http_log_uniques_by_status_1h", HOUR, STATUS_CACHE, UNIQ),
    rollup("http_log_uniques", MINUTE, &[], UNIQ),
    rollup("http_log_uniques_1h", HOUR, &[], UNIQ),
    // Migration 010: a resource's states keyed by resource, for long-range series.
    rollup("http_log_uniques_by_resource_1h", HOUR, RESOURCE, UNIQ),
    rollup("http_log_uniques_by_resource_keyed_1d", DAY, RESOURCE, UNIQ),
    // Migration 011: uniqCombined(17) states for week- and month-long series.
    rollup("http_log_uniques_6h", SIX_HOURS, &[], UNIQ_COMBINED),
    rollup("http_log_uniques_1d", DAY, &[], UNIQ_COMBINED),
    rollup(
        "http_log_uniques_by_status_6h",
        SIX_HOURS,
        STATUS_CACHE,
        UNIQ_COMBINED,
    ),
    rollup(
        "http_log_uniques_by_status_1d",
        DAY,
        STATUS_CACHE,
        UNIQ_COMBINED,
    ),
    rollup(
        "http_log_uniques_by_resource_combined_1d",
        DAY,
        RESOURCE,
        UNIQ_COMBINED,
    ),
];

/// The rollup kept in `table`, if it is one of [`TABLES`].
pub fn find(table: &str) -> Option<Rollup> {
    TABLES.into_iter().find(|r| r.table == table)
}

/// One table's comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableUniques {
    pub table: String,
    /// Buckets (time bucket and keys) on either side.
    pub buckets: u64,
    /// Buckets whose request sum differs from the raw count (or that one side lacks).
    pub requests_differing: u64,
    /// Buckets whose distinct count is outside the tolerance.
    pub clients_outside: u64,
    /// The largest relative error, in parts per million, of a bucket with at least 100 clients
    /// (where sampling shows).
    pub worst_error_ppm: u64,
}

impl TableUniques {
    pub fn is_clean(&self) -> bool {
        self.requests_differing == 0 && self.clients_outside == 0
    }
}

/// Every unique-client rollup of the database (tables missing from it are not checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UniquesCheck {
    pub tables: Vec<TableUniques>,
}

impl UniquesCheck {
    pub fn is_clean(&self) -> bool {
        self.tables.iter().all(TableUniques::is_clean)
    }

    /// Adds the comparison of more buckets (another day) table by table.
    pub fn add(&mut self, more: UniquesCheck) {
        for t in more.tables {
            match self.tables.iter_mut().find(|mine| mine.table == t.table) {
                Some(mine) => {
                    mine.buckets += t.buckets;
                    mine.requests_differing += t.requests_differing;
                    mine.clients_outside += t.clients_outside;
                    mine.worst_error_ppm = mine.worst_error_ppm.max(t.worst_error_ppm);
                }
                None => self.tables.push(t),
            }
        }
    }
}

impl fmt::Display for UniquesCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tables.is_empty() {
            return write!(f, "unique clients: no unique-client rollups to check");
        }
        let buckets: u64 = self.tables.iter().map(|t| t.buckets).sum();
        let worst = self
            .tables
            .iter()
            .map(|t| t.worst_error_ppm)
            .max()
            .unwrap_or(0);
        write!(
            f,
            "unique clients: {} tables, {buckets} buckets; distinct counts within {}% or {} \
             clients of uniqExact (worst {:.3}% where >= 100 clients)",
            self.tables.len(),
            RELATIVE_TOLERANCE * 100.0,
            ABSOLUTE_TOLERANCE,
            worst as f64 / 10_000.0
        )?;
        for t in self.tables.iter().filter(|t| !t.is_clean()) {
            write!(
                f,
                "\nUNIQUES     {}: {} of {} buckets' requests differ from the raw count, {} \
                 buckets' distinct clients are outside the tolerance",
                t.table, t.requests_differing, t.buckets, t.clients_outside
            )?;
        }
        Ok(())
    }
}

/// The comparison query of one table over the buckets in `[from, until)`, two ClickHouse DateTime
/// expressions on bucket boundaries (`verify` compares one day at a time, so that ClickHouse holds
/// one day's distinct sets, not the table's).
pub fn check_sql(db: &str, rollup: &Rollup, from: &str, until: &str) -> String {
    let Rollup {
        table,
        bucket,
        keys,
        merge,
    } = rollup;
    let keys_list: String = keys.iter().map(|k| format!(", {k}")).collect();
    format!(
        "SELECT count(), \
                countIf(u.r != raw.r), \
                countIf(abs(toInt64(u.c) - toInt64(raw.c)) > greatest({abs}, {rel} * raw.c)), \
                toUInt64(round(1e6 * max(if(raw.c >= 100, \
                    abs(toInt64(u.c) - toInt64(raw.c)) / raw.c, 0)))) \
         FROM (SELECT ts{keys_list}, sum(requests) AS r, {merge}(clients) AS c \
               FROM {db}.{table} WHERE ts >= {from} AND ts < {until} GROUP BY ALL) AS u \
         FULL OUTER JOIN \
              (SELECT {bucket} AS ts{keys_list}, toUInt64(count()) AS r, \
                      uniqExact(remote_addr) AS c \
               FROM {db}.http_log WHERE timestamp >= {from} AND timestamp < {until} \
               GROUP BY ALL) AS raw \
         USING (ts{keys_list}) \
         {QUERY_MEMORY_LIMIT} FORMAT TSV",
        abs = ABSOLUTE_TOLERANCE,
        rel = RELATIVE_TOLERANCE,
    )
}

/// Checks every unique-client rollup that `db` has over `[from, until)` (see [`check_sql`]).
pub async fn check(
    client: &ClickHouseClient,
    db: &str,
    from: &str,
    until: &str,
) -> anyhow::Result<UniquesCheck> {
    let existing = client
        .query(
            "SELECT name FROM system.tables WHERE database = {db:String} \
             AND startsWith(name, 'http_log_uniques') FORMAT TSV",
            &[("db", db)],
        )
        .await?;
    let existing: Vec<&str> = existing.lines().collect();
    let mut out = UniquesCheck::default();
    for rollup in &TABLES {
        let table = rollup.table;
        if !existing.contains(&table) {
            continue;
        }
        let text = client
            .query(&check_sql(db, rollup, from, until), &[])
            .await?;
        let f: Vec<&str> = text.trim().split('\t').collect();
        let parsed = (|| -> Option<TableUniques> {
            Some(TableUniques {
                table: table.to_string(),
                buckets: f.first()?.parse().ok()?,
                requests_differing: f.get(1)?.parse().ok()?,
                clients_outside: f.get(2)?.parse().ok()?,
                worst_error_ppm: f.get(3)?.parse().ok()?,
            })
        })();
        out.tables.push(
            parsed
                .with_context(|| format!("unexpected uniques check answer {text:?} ({table})"))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_of_the_migrations_is_checked_with_its_view_bucket_and_state() {
        let sql: String = crate::setup::MIGRATIONS.iter().map(|m| m.sql).collect();
        for Rollup {
            table,
            bucket,
            keys,
            merge,
        } in TABLES
        {
            let view = format!("${{database}}.{table}_mv\nTO ${{database}}.{table}\n");
            let at = sql
                .find(&view)
                .unwrap_or_else(|| panic!("no view for {table}"));
            let select = &sql[at..sql[at..].find(';').unwrap() + at];
            assert!(select.contains(&format!("{bucket} AS ts")), "{table}");
            let group_by = format!(
                "GROUP BY ts{}",
                keys.iter().map(|k| format!(", {k}")).collect::<String>()
            );
            assert!(select.contains(&group_by), "{table}: {group_by}");
            // The state the view makes and the table keeps is the one `merge` reads.
            let (made, kept) = match merge {
                UNIQ => ("uniqState(remote_addr)", "AggregateFunction(uniq, String)"),
                UNIQ_COMBINED => (
                    "uniqCombinedState(17)(remote_addr)",
                    "AggregateFunction(uniqCombined(17), String)",
                ),
                other => panic!("{table}: no state known for {other}"),
            };
            assert!(select.contains(made), "{table}: {made}");
            let create = format!("CREATE TABLE IF NOT EXISTS ${{database}}.{table}\n");
            let at = sql
                .find(&create)
                .unwrap_or_else(|| panic!("no table {table}"));
            let columns = &sql[at..sql[at..].find("ENGINE").unwrap() + at];
            assert!(columns.contains(kept), "{table}: {kept}");
        }
        // Every unique-client rollup of any migration is checked. Not the answers computed ahead
        // from them (sql/012): those are replaced whole by each refresh, from checked states.
        let computed_ahead = crate::cluster_schema::REFRESHED_TABLES.len();
        assert_eq!(
            sql.matches("CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques")
                .count(),
            TABLES.len() + computed_ahead
        );
    }

    #[test]
    fn the_query_joins_on_bucket_and_keys_and_states_the_tolerance() {
        let sql = check_sql(
            "db",
            &TABLES[2],
            "toDateTime('2026-12-04')",
            "toDateTime('2026-12-04') + INTERVAL 1 DAY",
        );
        assert_eq!(TABLES[2].table, "http_log_uniques_by_status");
        assert!(
            sql.contains("USING (ts, response_status, cache_status)"),
            "{sql}"
        );
        assert!(sql.contains("greatest(2, 0.01 * raw.c)"), "{sql}");
        assert!(
            sql.contains(
                "FROM db.http_log WHERE timestamp >= toDateTime('2026-12-04') \
                 AND timestamp < toDateTime('2026-12-04') + INTERVAL 1 DAY"
            ),
            "{sql}"
        );
        assert!(
            sql.contains("WHERE ts >= toDateTime('2026-12-04') AND ts < toDateTime"),
            "{sql}"
        );
    }

    #[test]
    fn days_add_up_table_by_table() {
        let day = |buckets, outside, ppm| UniquesCheck {
            tables: vec![TableUniques {
                table: "http_log_uniques".into(),
                buckets,
                clients_outside: outside,
                worst_error_ppm: ppm,
                ..TableUniques::default()
            }],
        };
        let mut all = UniquesCheck::default();
        all.add(day(10, 0, 500));
        all.add(day(20, 1, 200));
        assert_eq!(all, day(30, 1, 500));
    }

    #[test]
    fn a_differing_table_is_named() {
        let mut c = UniquesCheck {
            tables: vec![TableUniques {
                table: "http_log_uniques".into(),
                buckets: 10,
                ..TableUniques::default()
            }],
        };
        assert!(c.is_clean());
        assert!(c.to_string().contains("1 tables, 10 buckets"), "{c}");
        c.tables[0].requests_differing = 3;
        assert!(!c.is_clean());
        assert!(
            c.to_string()
                .contains("UNIQUES     http_log_uniques: 3 of 10 buckets' requests differ"),
            "{c}"
        );
    }
}
