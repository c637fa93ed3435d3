//! The schema of cluster mode (`clickhouse.cluster`): each statement of `sql/` rewritten so that
//! every table `t` becomes a shard-local table `t_local` plus a `Distributed` table named `t` over
//! the locals of every shard. Everything that reads or writes `t` (the loader, `status`,
//! `verify`, Grafana) keeps its name and sees the whole cluster; the materialized views run on
//! each shard, from the local raw table into the local rollups.
//!
//! Two forms of the same rewrite ([`Form`]):
//! - [`Form::Keeper`], what a production cluster with ClickHouse Keeper runs through one node:
//!   `ON CLUSTER`, `Replicated*MergeTree` engines with the `{shard}`/`{replica}` macros, and
//!   replicated dedup windows in place of the single-node ones;
//! - [`Form::PerShard`], applied by `edgelog setup` to each of `clickhouse.shard_admin_urls`:
//!   the same tables without `ON CLUSTER` and with the unreplicated engines and dedup windows of
//!   `sql/`. This is what the local stack can run (its ClickHouse has no Keeper: see
//!   docs/LIMITATIONS.md).
//!
//! The rewrite is pure text over the statement shapes `sql/` uses; any other shape is refused
//! with an error naming it, so a new migration cannot silently go unsharded.

use std::collections::BTreeMap;

/// Which cluster DDL to produce (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Keeper,
    PerShard,
}

/// The suffix of a shard-local table.
pub const LOCAL_SUFFIX: &str = "_local";

/// `verify`'s record of what it has audited: bookkeeping of the audit, not traffic, so it is not
/// sharded (see `Rewriter::unsharded_table`).
pub const UNSHARDED_TABLES: &[&str] = &["verify_audited", "verify_days_audited"];

/// Tables a refreshable view replaces whole (sql/012): an answer computed ahead from the
/// Distributed tables, so for the whole cluster. Each node keeps and refreshes its own copy, never
/// sharded or replicated (a non-`APPEND` refresh swaps in a new table, which a replicated table's
/// one Keeper path does not allow; and without a Replicated database refreshes are not
/// coordinated between nodes anyway).
pub const REFRESHED_TABLES: &[&str] = &["http_log_uniques_top_trailing"];

/// How long a replicated table remembers the hash (or token) of an inserted block. The loader
/// re-sends a batch until it lands, also after an outage of hours; the single-node window
/// (`non_replicated_deduplication_window`) has no time limit, so the replicated one gets a long
/// one: 7 days, about what 10,000 blocks last at one insert a minute.
pub const REPLICATED_DEDUP_WINDOW_SECONDS: u32 = 604_800;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster mode cannot shard this statement ({reason}): {statement}")]
pub struct UnsupportedStatement {
    pub reason: String,
    pub statement: String,
}

/// A table created by an earlier statement: its columns (the text between the parentheses) and
/// its storage clause (`ENGINE = ...` to the end).
#[derive(Debug, Clone)]
struct TableDef {
    columns: String,
    storage: String,
}

/// Rewrites migrations (each a list of rendered statements, in order) for a cluster. The tables
/// created by earlier migrations are needed to rewrite later ones, so the whole list is
/// rewritten every time; the caller applies the migrations it has not applied yet.
pub fn cluster_migrations(
    migrations: &[Vec<String>],
    cluster: &str,
    database: &str,
    form: Form,
) -> Result<Vec<Vec<String>>, UnsupportedStatement> {
    let mut r = Rewriter {
        cluster,
        db: database,
        form,
        tables: BTreeMap::new(),
    };
    migrations
        .iter()
        .map(|statements| {
            let mut out = Vec::new();
            for s in statements {
                out.extend(r.statement(s)?);
            }
            Ok(out)
        })
        .collect()
}

struct Rewriter<'a> {
    cluster: &'a str,
    db: &'a str,
    form: Form,
    tables: BTreeMap<String, TableDef>,
}

impl Rewriter<'_> {
    fn statement(&mut self, stmt: &str) -> Result<Vec<String>, UnsupportedStatement> {
        let stmt = stmt.trim();
        let refuse = |reason: &str| UnsupportedStatement {
            reason: reason.to_string(),
            statement: stmt.chars().take(200).collect(),
        };
        if let Some(rest) = strip_prefix_ci(stmt, "CREATE TABLE IF NOT EXISTS ") {
            let (name, rest) = self.qualified_name(rest).ok_or_else(|| {
                refuse("the table must be named <database>.<table> with the configured database")
            })?;
            let rest = rest.trim_start();
            let def = if let Some(source) = strip_prefix_ci(rest, "AS ") {
                let (source, tail) = self.qualified_name(source).ok_or_else(|| {
                    refuse("CREATE TABLE ... AS must name a table of the database")
                })?;
                if !tail.trim().is_empty() {
                    return Err(refuse("CREATE TABLE ... AS with its own clauses"));
                }
                self.tables.get(source).cloned().ok_or_else(|| {
                    refuse("CREATE TABLE ... AS a table no earlier migration made")
                })?
            } else if rest.starts_with('(') {
                let close = matching_paren(rest).ok_or_else(|| refuse("unbalanced parentheses"))?;
                let columns = rest[1..close].to_string();
                let storage = rest[close + 1..].trim().to_string();
                if strip_prefix_ci(&storage, "ENGINE = ").is_none() {
                    return Err(refuse("a table without `ENGINE = ` after its columns"));
                }
                TableDef { columns, storage }
            } else {
                return Err(refuse("CREATE TABLE without columns or AS"));
            };
            let name = name.to_string();
            if UNSHARDED_TABLES.contains(&name.as_str()) {
                return self.unsharded_table(&name, &def).map_err(|r| refuse(&r));
            }
            if REFRESHED_TABLES.contains(&name.as_str()) {
                return Ok(vec![self.node_table(&name, &def)]);
            }
            let out = self.table(&name, &def).map_err(|r| refuse(&r))?;
            self.tables.insert(name, def);
            return Ok(out);
        }
        if let Some(rest) = strip_prefix_ci(stmt, "CREATE MATERIALIZED VIEW IF NOT EXISTS ") {
            let (view, rest) = self
                .qualified_name(rest)
                .ok_or_else(|| refuse("the view must be named <database>.<view>"))?;
            if let Some(refresh) = strip_prefix_ci(rest.trim_start(), "REFRESH ") {
                // Reads the Distributed tables as written: its answer is for the whole cluster.
                let target = refresh
                    .split_once("TO ")
                    .and_then(|(_, t)| self.qualified_name(t))
                    .map(|(t, _)| t);
                if !target.is_some_and(|t| REFRESHED_TABLES.contains(&t)) {
                    return Err(refuse(
                        "a refreshable view must write TO one of cluster_schema::REFRESHED_TABLES",
                    ));
                }
                return Ok(vec![format!(
                    "CREATE MATERIALIZED VIEW IF NOT EXISTS {}.{view}{}{rest}",
                    self.db,
                    self.on_cluster(),
                )]);
            }
            if strip_prefix_ci(rest.trim_start(), "TO ").is_none() {
                return Err(refuse("a materialized view without TO <table>"));
            }
            return Ok(vec![format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {}.{view}{}{}",
                self.db,
                self.on_cluster(),
                self.localize(rest)
            )]);
        }
        if let Some(rest) = strip_prefix_ci(stmt, "ALTER TABLE ") {
            let (name, rest) = self
                .qualified_name(rest)
                .ok_or_else(|| refuse("ALTER TABLE must name <database>.<table>"))?;
            let target = if self.tables.contains_key(name) {
                // Only storage matters may change on the locals alone: the Distributed table
                // would need any change of a column's name or type as well.
                if !is_storage_change(rest) {
                    return Err(refuse(
                        "an ALTER of a sharded table other than MODIFY COLUMN ... CODEC or ADD \
                         INDEX (the Distributed table would need it too)",
                    ));
                }
                format!("{name}{LOCAL_SUFFIX}")
            } else if strip_prefix_ci(rest.trim_start(), "MODIFY SQL SECURITY ").is_some() {
                name.to_string()
            } else {
                return Err(refuse("an ALTER of something that is not a known table"));
            };
            return Ok(vec![format!(
                "ALTER TABLE {}.{target}{}{}",
                self.db,
                self.on_cluster(),
                rest
            )]);
        }
        Err(refuse(
            "not CREATE TABLE IF NOT EXISTS, CREATE MATERIALIZED VIEW IF NOT EXISTS or ALTER TABLE",
        ))
    }

    /// The local table and the Distributed table over it.
    fn table(&self, name: &str, def: &TableDef) -> Result<Vec<String>, String> {
        let db = self.db;
        let local = format!("{name}{LOCAL_SUFFIX}");
        let storage = match self.form {
            Form::PerShard => def.storage.clone(),
            Form::Keeper => replicated_storage(
                &def.storage,
                &format!("/clickhouse/tables/{{shard}}/{db}/{local}"),
            )?,
        };
        let on = self.on_cluster();
        // The raw table is sharded by source partition: each Kafka partition's rows land on one
        // shard, the same one on every retry (docs/ARCHITECTURE.md, "Cluster mode"). Rollups are
        // written by the views on each shard, never through their Distributed table, which so
        // has no sharding key (an insert into it with several shards fails).
        let key = if has_column(&def.columns, "source_partition") {
            ", source_partition"
        } else {
            ""
        };
        Ok(vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.{local}{on}\n({})\n{storage}",
                def.columns
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.{name}{on} AS {db}.{local}\n\
                 ENGINE = Distributed('{}', '{db}', '{local}'{key})",
                self.cluster
            ),
        ])
    }

    /// One table under its own name on every node, not split into shards: `verify` reads and
    /// writes it through whichever node it is connected to. With Keeper every node holds the same
    /// rows (one replication path for the whole cluster, no `{shard}`); without Keeper each node
    /// has its own, and `verify` uses the one behind `clickhouse.admin_url`.
    fn unsharded_table(&self, name: &str, def: &TableDef) -> Result<Vec<String>, String> {
        let db = self.db;
        let storage = match self.form {
            Form::PerShard => def.storage.clone(),
            Form::Keeper => {
                replicated_storage(&def.storage, &format!("/clickhouse/tables/all/{db}/{name}"))?
            }
        };
        Ok(vec![format!(
            "CREATE TABLE IF NOT EXISTS {db}.{name}{}\n({})\n{storage}",
            self.on_cluster(),
            def.columns
        )])
    }

    /// One table under its own name on every node, with the storage of `sql/` in both forms.
    fn node_table(&self, name: &str, def: &TableDef) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {}.{name}{}\n({})\n{}",
            self.db,
            self.on_cluster(),
            def.columns,
            def.storage
        )
    }

    fn on_cluster(&self) -> String {
        match self.form {
            Form::Keeper => format!(" ON CLUSTER '{}'", self.cluster),
            Form::PerShard => String::new(),
        }
    }

    /// `<database>.<identifier>` at the start of `text`: the identifier and what follows it.
    fn qualified_name<'t>(&self, text: &'t str) -> Option<(&'t str, &'t str)> {
        let rest = text.strip_prefix(self.db)?.strip_prefix('.')?;
        let end = rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
        (end > 0).then(|| rest.split_at(end))
    }

    /// Every `<database>.<table>` of a known table in `text` turned into its local table.
    fn localize(&self, text: &str) -> String {
        let prefix = format!("{}.", self.db);
        let mut out = String::with_capacity(text.len() + 64);
        let mut rest = text;
        while let Some(at) = rest.find(&prefix) {
            let before_ok = rest[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !is_ident_char(c));
            out.push_str(&rest[..at + prefix.len()]);
            rest = &rest[at + prefix.len()..];
            let end = rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
            let ident = &rest[..end];
            out.push_str(ident);
            if before_ok && self.tables.contains_key(ident) {
                out.push_str(LOCAL_SUFFIX);
            }
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    }
}

/// `ENGINE = XMergeTree[(args)] ...` as `ENGINE = ReplicatedXMergeTree('<path>', '{replica}'
/// [, args]) ...`, with the single-node dedup window replaced by the replicated ones.
fn replicated_storage(storage: &str, path: &str) -> Result<String, String> {
    let after = strip_prefix_ci(storage, "ENGINE = ").ok_or("no `ENGINE = `")?;
    let end = after
        .find(|c: char| !is_ident_char(c))
        .unwrap_or(after.len());
    let (engine, mut tail) = after.split_at(end);
    if !engine.ends_with("MergeTree") || engine.starts_with("Replicated") {
        return Err(format!(
            "engine {engine}: only unreplicated *MergeTree engines are made replicated"
        ));
    }
    let mut args = String::new();
    if tail.starts_with('(') {
        let close = matching_paren(tail).ok_or("unbalanced parentheses in ENGINE")?;
        let inner = tail[1..close].trim();
        if !inner.is_empty() {
            args = format!(", {inner}");
        }
        tail = &tail[close + 1..];
    }
    let tail = tail.replace(
        "non_replicated_deduplication_window = ",
        &format!(
            "replicated_deduplication_window_seconds = {REPLICATED_DEDUP_WINDOW_SECONDS}, \
             replicated_deduplication_window = "
        ),
    );
    Ok(format!(
        "ENGINE = Replicated{engine}('{path}', '{{replica}}'{args}){tail}"
    ))
}

/// `rest` of an ALTER TABLE changes only how the shards store rows: `MODIFY COLUMN <name> <type>
/// CODEC(...)` and `ADD INDEX` (a data-skipping index) clauses.
fn is_storage_change(rest: &str) -> bool {
    split_top_level(rest, ',').iter().all(|clause| {
        let c = clause.trim();
        (strip_prefix_ci(c, "MODIFY COLUMN ").is_some() && c.contains(" CODEC("))
            || strip_prefix_ci(c, "ADD INDEX ").is_some()
    })
}

fn has_column(columns: &str, name: &str) -> bool {
    split_top_level(columns, ',')
        .iter()
        .any(|c| c.split_whitespace().next() == Some(name))
}

/// Splits at `sep` outside parentheses and quotes.
fn split_top_level(text: &str, sep: char) -> Vec<&str> {
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    let mut out = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            c if c == sep && depth == 0 && !quoted => {
                out.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// The index of the `)` closing the `(` that `text` starts with (quotes respected).
fn matching_paren(text: &str) -> Option<usize> {
    let (mut depth, mut quoted) = (0i32, false);
    for (i, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn strip_prefix_ci<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClickHouseSettings;
    use crate::setup::{render, statements, MIGRATIONS};
    use proptest::prelude::*;

    fn rendered() -> Vec<Vec<String>> {
        let ch = ClickHouseSettings::default();
        MIGRATIONS
            .iter()
            .map(|m| statements(&render(m.sql, &ch)))
            .collect()
    }

    fn all(form: Form) -> Vec<String> {
        cluster_migrations(&rendered(), "edge", "edgelog", form)
            .unwrap()
            .concat()
    }

    #[test]
    fn every_table_becomes_a_local_table_and_a_distributed_one() {
        for form in [Form::Keeper, Form::PerShard] {
            let out = all(form);
            let on = if form == Form::Keeper {
                " ON CLUSTER 'edge'"
            } else {
                ""
            };
            let raw_dist = out
                .iter()
                .find(|s| {
                    s.starts_with(&format!(
                        "CREATE TABLE IF NOT EXISTS edgelog.http_log{on} AS"
                    ))
                })
                .expect("a Distributed http_log");
            assert!(
                raw_dist.ends_with(
                    "ENGINE = Distributed('edge', 'edgelog', 'http_log_local', source_partition)"
                ),
                "{raw_dist}"
            );
            let totals_dist = out
                .iter()
                .find(|s| {
                    s.starts_with(&format!(
                        "CREATE TABLE IF NOT EXISTS edgelog.http_log_totals{on} AS"
                    ))
                })
                .unwrap();
            assert!(
                totals_dist.ends_with("'http_log_totals_local')"),
                "{totals_dist}"
            );
            // Every table of sql/ has its pair.
            let creates: Vec<&String> = out
                .iter()
                .filter(|s| s.starts_with("CREATE TABLE"))
                .collect();
            assert_eq!(
                creates.len(),
                2 * crate::capacity::TABLES.len() + UNSHARDED_TABLES.len() + REFRESHED_TABLES.len(),
                "{creates:#?}"
            );
            for s in &out {
                assert_eq!(s.contains("ON CLUSTER"), form == Form::Keeper, "{s}");
                // No statement reads or writes an unsharded name except the Distributed tables'
                // own definitions.
                if s.starts_with("CREATE MATERIALIZED VIEW") && !s.contains("REFRESH EVERY") {
                    assert!(s.contains("TO edgelog.http_log_"), "{s}");
                    assert!(s.contains("FROM edgelog.http_log_local"), "{s}");
                    let (_, to) = s.split_once("TO edgelog.").unwrap();
                    assert!(
                        to.split_whitespace().next().unwrap().ends_with("_local"),
                        "{s}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_keeper_form_replicates_with_macros_and_replicated_dedup_windows() {
        let out = all(Form::Keeper);
        let raw = out
            .iter()
            .find(|s| s.starts_with("CREATE TABLE IF NOT EXISTS edgelog.http_log_local"))
            .unwrap();
        assert!(raw.contains(
            "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/edgelog/http_log_local', '{replica}')"
        ), "{raw}");
        assert!(
            raw.contains("replicated_deduplication_window = 10000"),
            "{raw}"
        );
        assert!(
            raw.contains("replicated_deduplication_window_seconds = 604800"),
            "{raw}"
        );
        assert!(!raw.contains("non_replicated"), "{raw}");
        // CREATE TABLE ... AS is written out in full, with its own replication path.
        let top_1d = out
            .iter()
            .find(|s| s.starts_with("CREATE TABLE IF NOT EXISTS edgelog.http_log_top_1d_local"))
            .unwrap();
        assert!(top_1d.contains(
            "ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/edgelog/http_log_top_1d_local', '{replica}')"
        ), "{top_1d}");
        assert!(top_1d.contains("index_granularity = 64"), "{top_1d}");
        // Every table but the answers computed ahead on each node (see REFRESHED_TABLES).
        let refreshed = |s: &str| {
            REFRESHED_TABLES
                .iter()
                .any(|t| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS edgelog.{t} ")))
        };
        for s in out
            .iter()
            .filter(|s| s.contains("MergeTree") && !refreshed(s))
        {
            assert!(s.contains("ENGINE = Replicated"), "{s}");
        }
        // The codec change applies to the local raw table; the views' rights stay on the views.
        let codecs = out
            .iter()
            .find(|s| s.contains("CODEC(Delta, ZSTD(1))") && s.starts_with("ALTER"))
            .unwrap();
        assert!(
            codecs.starts_with("ALTER TABLE edgelog.http_log_local ON CLUSTER 'edge'\n"),
            "{codecs}"
        );
        assert!(out.contains(
            &"ALTER TABLE edgelog.http_log_totals_mv ON CLUSTER 'edge' MODIFY SQL SECURITY \
              DEFINER DEFINER = CURRENT_USER"
                .to_string()
        ));
    }

    #[test]
    fn the_per_shard_form_keeps_the_engines_and_windows_of_sql() {
        for s in all(Form::PerShard) {
            assert!(!s.contains("Replicated"), "{s}");
            // The audit's bookkeeping is written by `verify` alone, never retried blindly, and
            // a refreshed answer is replaced whole: neither has a dedup window in sql/ either.
            let bookkeeping = UNSHARDED_TABLES
                .iter()
                .chain(REFRESHED_TABLES)
                .any(|t| s.contains(&format!("edgelog.{t}\n")));
            if s.contains("MergeTree") && !bookkeeping {
                assert!(
                    s.contains("non_replicated_deduplication_window = 10000"),
                    "{s}"
                );
            }
        }
    }

    #[test]
    fn unknown_shapes_are_refused() {
        for stmt in [
            "DROP TABLE edgelog.http_log",
            "INSERT INTO edgelog.http_log SELECT 1",
            "CREATE TABLE edgelog.x (a UInt8) ENGINE = MergeTree ORDER BY a",
            "CREATE TABLE IF NOT EXISTS other.x (a UInt8) ENGINE = MergeTree ORDER BY a",
            "CREATE TABLE IF NOT EXISTS edgelog.x AS edgelog.unknown",
            "CREATE TABLE IF NOT EXISTS edgelog.x (a UInt8) ORDER BY a",
            "CREATE VIEW IF NOT EXISTS edgelog.v AS SELECT 1",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS edgelog.v AS SELECT 1",
            "ALTER TABLE edgelog.http_log ADD COLUMN x UInt8",
            "ALTER TABLE edgelog.http_log MODIFY COLUMN source_offset Int64 CODEC(ZSTD(1)), ADD COLUMN x UInt8",
        ] {
            let mut migrations = rendered();
            migrations.push(vec![stmt.to_string()]);
            let err = cluster_migrations(&migrations, "edge", "edgelog", Form::PerShard)
                .expect_err(stmt);
            assert!(err.to_string().contains("cluster mode cannot shard"), "{err}");
        }
        // Only unreplicated MergeTree engines are made replicated.
        let log = vec![vec![
            "CREATE TABLE IF NOT EXISTS edgelog.x (a UInt8) ENGINE = Log".to_string(),
        ]];
        assert!(cluster_migrations(&log, "edge", "edgelog", Form::Keeper).is_err());
    }

    #[test]
    fn the_audit_bookkeeping_is_one_table_on_every_node_and_indexes_go_to_the_locals() {
        let keeper = all(Form::Keeper);
        for table in UNSHARDED_TABLES {
            let made: Vec<&String> = keeper
                .iter()
                .filter(|s| s.contains(&format!("edgelog.{table}")))
                .collect();
            assert_eq!(made.len(), 1, "{made:#?}");
            assert!(made[0].starts_with(&format!(
                "CREATE TABLE IF NOT EXISTS edgelog.{table} ON CLUSTER 'edge'\n"
            )));
            assert!(made[0].contains(&format!(
                "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/edgelog/{table}', '{{replica}}', audited_at)"
            )), "{}", made[0]);
        }
        let index = keeper
            .iter()
            .find(|s| s.contains("ADD INDEX"))
            .expect("the source_offset index");
        assert!(
            index.starts_with("ALTER TABLE edgelog.http_log_local ON CLUSTER 'edge'"),
            "{index}"
        );
    }

    #[test]
    fn the_refreshed_answer_is_a_plain_table_on_every_node_computed_from_the_whole_cluster() {
        for form in [Form::Keeper, Form::PerShard] {
            let out = all(form);
            let on = if form == Form::Keeper {
                " ON CLUSTER 'edge'"
            } else {
                ""
            };
            for table in REFRESHED_TABLES {
                let made: Vec<&String> = out
                    .iter()
                    .filter(|s| s.starts_with("CREATE") && s.contains(&format!("edgelog.{table}")))
                    .collect();
                assert_eq!(made.len(), 2, "the table and its view: {made:#?}");
                assert!(made[0]
                    .starts_with(&format!("CREATE TABLE IF NOT EXISTS edgelog.{table}{on}\n")));
                assert!(made[0].contains("ENGINE = MergeTree"), "{}", made[0]);
                let view = made[1];
                assert!(view.starts_with(&format!(
                    "CREATE MATERIALIZED VIEW IF NOT EXISTS edgelog.{table}_mv{on}\nREFRESH EVERY"
                )));
                assert!(view.contains(&format!("TO edgelog.{table}\n")), "{view}");
                assert!(
                    view.contains("FROM edgelog.http_log_uniques_by_resource_keyed_1d\n"),
                    "the Distributed table, not a shard's: {view}"
                );
                assert!(!view.contains(LOCAL_SUFFIX), "{view}");
            }
        }
        let elsewhere = vec![vec![
            "CREATE TABLE IF NOT EXISTS edgelog.t (x UInt8) ENGINE = MergeTree ORDER BY x"
                .to_string(),
            "CREATE MATERIALIZED VIEW IF NOT EXISTS edgelog.t_mv REFRESH EVERY 1 MINUTE \
             TO edgelog.t AS SELECT 1 AS x"
                .to_string(),
        ]];
        let err = cluster_migrations(&elsewhere, "edge", "edgelog", Form::PerShard).unwrap_err();
        assert!(err.reason.contains("REFRESHED_TABLES"), "{err}");
    }

    #[test]
    fn engine_arguments_follow_the_replication_arguments() {
        let m = vec![vec![
            "CREATE TABLE IF NOT EXISTS edgelog.r (a UInt8, v UInt32) ENGINE = ReplacingMergeTree(v) ORDER BY a"
                .to_string(),
        ]];
        let out = cluster_migrations(&m, "c1", "edgelog", Form::Keeper)
            .unwrap()
            .concat();
        assert!(out[0].contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/edgelog/r_local', '{replica}', v) ORDER BY a"
        ), "{}", out[0]);
    }

    proptest! {
        /// `setup` applies only the migrations a server lacks, rewritten from the whole list: a
        /// migration's statements must not depend on the migrations after it.
        #[test]
        fn a_migration_rewrites_the_same_whatever_follows_it(
            upto in 1usize..=MIGRATIONS.len(),
            keeper in any::<bool>(),
        ) {
            let form = if keeper { Form::Keeper } else { Form::PerShard };
            let all = cluster_migrations(&rendered(), "edge", "edgelog", form).unwrap();
            let prefix =
                cluster_migrations(&rendered()[..upto], "edge", "edgelog", form).unwrap();
            prop_assert_eq!(&all[..upto], &prefix[..]);
        }

        /// Localizing touches exactly the known tables' qualified names: a name that merely starts
        /// like a known table, or is not qualified by the database, is left alone.
        #[test]
        fn localize_rewrites_only_known_qualified_tables(
            suffix in "[a-z_]{0,6}",
            other_db in "[a-z]{1,6}",
        ) {
            let mut r = Rewriter { cluster: "c", db: "edgelog", form: Form::PerShard, tables: BTreeMap::new() };
            r.tables.insert("http_log".into(), TableDef { columns: String::new(), storage: String::new() });
            let text = format!("SELECT * FROM edgelog.http_log{suffix} JOIN {other_db}.http_log USING a");
            let out = r.localize(&text);
            if suffix.is_empty() {
                prop_assert!(out.contains("FROM edgelog.http_log_local JOIN"));
            } else {
                let kept = format!("FROM edgelog.http_log{suffix} JOIN");
                prop_assert!(out.contains(&kept), "{}", out);
            }
            if other_db != "edgelog" {
                let other = format!(" {other_db}.http_log USING");
                prop_assert!(out.contains(&other), "{}", out);
            }
        }

        /// Each form is a function of the statements: rendering twice gives the same DDL, and both
        /// forms create the same set of table names.
        #[test]
        fn both_forms_create_the_same_tables(cluster in "[a-z][a-z0-9_]{0,10}") {
            let names = |form| -> Vec<String> {
                cluster_migrations(&rendered(), &cluster, "edgelog", form).unwrap().concat().iter()
                    .filter_map(|s| s.strip_prefix("CREATE TABLE IF NOT EXISTS edgelog."))
                    .map(|s| s.split(|c: char| !is_ident_char(c)).next().unwrap().to_string())
                    .collect()
            };
            prop_assert_eq!(names(Form::Keeper), names(Form::Keeper));
            prop_assert_eq!(names(Form::Keeper), names(Form::PerShard));
        }
    }
}
