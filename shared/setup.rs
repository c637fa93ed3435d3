//! Idempotent set-up: Kafka topics and the ClickHouse schema (`sql/`), applied directly to the
//! servers, never through the rate-limited proxy.
//!
//! Migrations are the files in `sql/`, embedded in the binary, applied in order once each and
//! recorded in `<database>.schema_migrations`. Their statements use `IF NOT EXISTS`, so a set-up
//! that died half-way can simply run again.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::clickhouse::ClickHouseClient;
use crate::cluster_schema::{cluster_migrations, Form};
use crate::config::{ClickHouseSettings, KafkaOptions, Settings};
use crate::kafka::client_config;

/// A schema migration: version, file name, SQL with `${...}` placeholders.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "001_http_log.sql",
        sql: include_str!("../sql/001_http_log.sql"),
    },
    Migration {
        version: 2,
        name: "002_http_log_totals.sql",
        sql: include_str!("../sql/002_http_log_totals.sql"),
    },
    Migration {
        version: 3,
        name: "003_http_log_rollups.sql",
        sql: include_str!("../sql/003_http_log_rollups.sql"),
    },
    Migration {
        version: 4,
        name: "004_http_log_codecs.sql",
        sql: include_str!("../sql/004_http_log_codecs.sql"),
    },
    Migration {
        version: 5,
        name: "005_http_log_top.sql",
        sql: include_str!("../sql/005_http_log_top.sql"),
    },
    Migration {
        version: 6,
        name: "006_http_log_totals_by_ip_resource_1d.sql",
        sql: include_str!("../sql/006_http_log_totals_by_ip_resource_1d.sql"),
    },
    Migration {
        version: 7,
        name: "007_views_sql_security_definer.sql",
        sql: include_str!("../sql/007_views_sql_security_definer.sql"),
    },
    Migration {
        version: 8,
        name: "008_verify_audited.sql",
        sql: include_str!("../sql/008_verify_audited.sql"),
    },
    Migration {
        version: 9,
        name: "009_http_log_uniques.sql",
        sql: include_str!("../sql/009_http_log_uniques.sql"),
    },
    Migration {
        version: 10,
        name: "010_http_log_uniques_by_resource_keyed.sql",
        sql: include_str!("../sql/010_http_log_uniques_by_resource_keyed.sql"),
    },
    Migration {
        version: 11,
        name: "011_http_log_uniques_coarse.sql",
        sql: include_str!("../sql/011_http_log_uniques_coarse.sql"),
    },
    Migration {
        version: 12,
        name: "012_http_log_uniques_top_trailing.sql",
        sql: include_str!("../sql/012_http_log_uniques_top_trailing.sql"),
    },
];

/// Fills the placeholders of a migration. Only validated settings reach here (the database name
/// is a plain identifier, TTLs are integers), and no value from a record ever does.
pub fn render(sql: &str, ch: &ClickHouseSettings) -> String {
    let ttl = |column: &str, days: u32| {
        if days == 0 {
            String::new()
        } else {
            format!("TTL {column} + INTERVAL {days} DAY")
        }
    };
    sql.replace("${database}", &ch.database)
        .replace("${raw_ttl_clause}", &ttl("timestamp", ch.raw_ttl_days))
        .replace("${totals_ttl_clause}", &ttl("ts", ch.totals_ttl_days))
}

/// Splits a migration into statements at `;` that end a line, dropping `--` comment lines.
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        if line.trim_start().starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if line.trim_end().ends_with(';') {
            let stmt = current.trim().trim_end_matches(';').trim().to_string();
            if !stmt.is_empty() {
                out.push(stmt);
            }
            current.clear();
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// Every migration's statements, in order, as this configuration applies them: as written, or
/// rewritten for cluster mode (`clickhouse.cluster`) in the form `form`.
pub fn migration_statements(
    ch: &ClickHouseSettings,
    form: Form,
) -> anyhow::Result<Vec<Vec<String>>> {
    let plain: Vec<Vec<String>> = MIGRATIONS
        .iter()
        .map(|m| statements(&render(m.sql, ch)))
        .collect();
    match &ch.cluster {
        None => Ok(plain),
        Some(cluster) => Ok(cluster_migrations(&plain, cluster, &ch.database, form)?),
    }
}

/// Applies pending migrations; returns the versions applied by this call. In cluster mode with
/// `clickhouse.shard_admin_urls`, applies the per-shard schema to every shard (a version counts
/// as applied by this call when some shard lacked it); with a cluster and no shard URLs, the
/// `ON CLUSTER` schema through `admin_url` (docs/OPERATIONS.md, "Cluster mode").
pub async fn apply_schema(settings: &Settings) -> anyhow::Result<Vec<u32>> {
    let ch = &settings.clickhouse;
    if ch.shard_admin_urls.is_empty() {
        // One server, or a Keeper cluster reached through one of its nodes (the form matters
        // only with a cluster).
        let on_cluster = match &ch.cluster {
            Some(c) => format!(" ON CLUSTER '{c}'"),
            None => String::new(),
        };
        let client = ClickHouseClient::admin(ch)?;
        let statements = migration_statements(ch, Form::Keeper)?;
        return apply_to(&client, ch, &statements, &on_cluster).await;
    }
    let per_shard = migration_statements(ch, Form::PerShard)?;
    let mut newly = Vec::new();
    for url in &ch.shard_admin_urls {
        let shard = ClickHouseSettings {
            admin_url: url.clone(),
            ..ch.clone()
        };
        let client = ClickHouseClient::admin(&shard)?;
        let applied = apply_to(&client, ch, &per_shard, "")
            .await
            .with_context(|| format!("setting up shard {url}"))?;
        newly.extend(applied);
    }
    newly.sort_unstable();
    newly.dedup();
    Ok(newly)
}

/// Applies the migrations `statements` (one list per entry of [`MIGRATIONS`]) not yet recorded
/// in the server's `schema_migrations`.
async fn apply_to(
    client: &ClickHouseClient,
    ch: &ClickHouseSettings,
    statements: &[Vec<String>],
    on_cluster: &str,
) -> anyhow::Result<Vec<u32>> {
    let db = &ch.database;
    client
        .query(
            &format!("CREATE DATABASE IF NOT EXISTS {db}{on_cluster}"),
            &[],
        )
        .await?;
    // The record of applied migrations stays on the server that applies them.
    client
        .query(
            &format!(
                "CREATE TABLE IF NOT EXISTS {db}.schema_migrations \
                 (version UInt32, name String, applied_at DateTime DEFAULT now()) \
                 ENGINE = MergeTree ORDER BY version"
            ),
            &[],
        )
        .await?;
    let applied = client
        .query(
            &format!("SELECT version FROM {db}.schema_migrations ORDER BY version"),
            &[],
        )
        .await?;
    let applied: Vec<u32> = applied
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let mut newly = Vec::new();
    for (m, stmts) in MIGRATIONS.iter().zip(statements) {
        if applied.contains(&m.version) {
            continue;
        }
        let started = client.query("SELECT now() FORMAT TSVRaw", &[]).await?;
        for stmt in stmts {
            client
                .query(stmt, &[])
                .await
                .with_context(|| format!("applying {} (statement: {stmt})", m.name))?;
        }
        // Before the migration is recorded: if setup stops in between, the next run applies the
        // migration again (its statements are idempotent) and reloads its views then.
        reload_views_changed_since(client, db, on_cluster, started.trim())
            .await
            .with_context(|| format!("reloading the views {} changed", m.name))?;
        client
            .query(
                &format!("INSERT INTO {db}.schema_migrations (version, name) VALUES ({{v:UInt32}}, {{n:String}})"),
                &[("v", &m.version.to_string()), ("n", m.name)],
            )
            .await?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "schema migration applied"
        );
        newly.push(m.version);
    }
    Ok(newly)
}

/// Reloads each materialized view of `db` whose definition changed at or after `since` (the
/// server's `now()` before a migration) from that stored definition (`DETACH` then `ATTACH`), as a
/// server restart would, and returns their names.
///
/// Measured on 26.9: until a view that `ALTER ... MODIFY SQL SECURITY` changed (sql/007, and the
/// ALTERs of 009-012) is reloaded, its output blocks get other dedup tokens than after a reload. A
/// batch first sent after the migration and re-sent after the server's next restart was then
/// counted again by every rollup while the raw table dropped it (a chaos run caught it:
/// docs/LIMITATIONS.md, "Rollups and a ClickHouse restart"). Reloaded here, the views already run
/// as they will after any restart. An insert between the two statements would miss that view, so
/// only the views the migration created or changed are reloaded (their `metadata_modification_time`,
/// which a reload leaves alone, is at least `since`): a rollup that loaders were already feeding
/// is not touched by a migration that leaves it alone.
pub async fn reload_views_changed_since(
    client: &ClickHouseClient,
    db: &str,
    on_cluster: &str,
    since: &str,
) -> anyhow::Result<Vec<String>> {
    let views = client
        .query(
            "SELECT name FROM system.tables WHERE database = {db:String} \
             AND engine = 'MaterializedView' AND metadata_modification_time >= {since:DateTime} \
             ORDER BY name FORMAT TSVRaw",
            &[("db", db), ("since", since)],
        )
        .await?;
    let views: Vec<String> = views.lines().map(str::to_string).collect();
    for view in &views {
        for verb in ["DETACH", "ATTACH"] {
            client
                .query(&format!("{verb} TABLE {db}.`{view}`{on_cluster}"), &[])
                .await
                .with_context(|| format!("{verb} TABLE {db}.{view}: reloading the view"))?;
        }
    }
    if !views.is_empty() {
        tracing::info!(db, views = ?views, "materialized views reloaded");
    }
    Ok(views)
}

/// What the cluster's metadata says: brokers up, and the replicas of each existing topic.
struct ClusterView {
    brokers: usize,
    replicas: BTreeMap<String, usize>,
}

fn cluster_view(settings: &Settings) -> anyhow::Result<ClusterView> {
    let client: BaseConsumer = client_config(&settings.kafka, &KafkaOptions::default(), &[])
        .create()
        .context("creating a Kafka client")?;
    let md = client
        .fetch_metadata(None, Duration::from_secs(30))
        .with_context(|| format!("reading the metadata of {}", settings.kafka.brokers))?;
    let replicas = md
        .topics()
        .iter()
        .filter(|t| !t.partitions().is_empty())
        .map(|t| (t.name().to_string(), t.partitions()[0].replicas().len()))
        .collect();
    Ok(ClusterView {
        brokers: md.brokers().len(),
        replicas,
    })
}

/// Refuses to create topics with more replicas than the cluster has brokers up: Kafka would
/// refuse too, but this names the setting to change.
pub fn check_replication_factor(
    replication_factor: i32,
    brokers: usize,
    to_create: &[&str],
) -> anyhow::Result<()> {
    if to_create.is_empty() || usize::try_from(replication_factor).is_ok_and(|rf| rf <= brokers) {
        return Ok(());
    }
    bail!(
        "topics.replication_factor is {replication_factor}, but the Kafka cluster has {brokers} \
         broker(s) up: cannot create {} with {replication_factor} replicas (lower \
         topics.replication_factor, or start the missing brokers)",
        to_create.join(", ")
    )
}

/// Creates the four topics if missing (`topics.replication_factor` replicas,
/// `min.insync.replicas` from [`crate::config::TopicSettings::effective_min_insync_replicas`])
/// and sets their `retention.ms`. Returns the topics created.
pub async fn create_topics(settings: &Settings) -> anyhow::Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(&settings.kafka, &KafkaOptions::default(), &[])
            .create()
            .context("creating the Kafka admin client")?;
    let t = &settings.topics;
    let retention = t.retention.as_millis().to_string();
    let min_isr = t.effective_min_insync_replicas().to_string();
    let names = [
        &t.input,
        &t.anonymized,
        &t.dead_letter,
        &t.loader_dead_letter,
    ];
    let s = settings.clone();
    let view = tokio::task::spawn_blocking(move || cluster_view(&s)).await??;
    let to_create: Vec<&str> = names
        .iter()
        .filter(|n| !view.replicas.contains_key(n.as_str()))
        .map(|n| n.as_str())
        .collect();
    check_replication_factor(t.replication_factor, view.brokers, &to_create)?;
    for name in names {
        match view.replicas.get(name.as_str()) {
            Some(&have) if i32::try_from(have).ok() != Some(t.replication_factor) => {
                tracing::warn!(
                    topic = name.as_str(),
                    replicas = have,
                    replication_factor = t.replication_factor,
                    "the topic exists with another replication factor; setup leaves it as it is"
                )
            }
            _ => {}
        }
    }
    let new_topics: Vec<NewTopic> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                t.partitions,
                TopicReplication::Fixed(t.replication_factor),
            )
            .set("retention.ms", &retention)
            .set("min.insync.replicas", &min_isr)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut created = Vec::new();
    for result in admin.create_topics(&new_topics, &opts).await? {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    // Existing topics keep their partitions and every setting edgelog does not own, and get the
    // configured retention. Kafka's AlterConfigs (the only alter call rust-rdkafka offers) resets
    // whatever the request leaves out, so the request carries the topic's current dynamic
    // settings too; a topic already as wanted is left untouched.
    let owned = [("retention.ms", retention.as_str())];
    let specifiers: Vec<ResourceSpecifier> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let described = admin
        .describe_configs(&specifiers, &opts)
        .await
        .context("describing the topics' configuration")?;
    let mut wanted_per_topic = Vec::new();
    for (name, result) in names.iter().zip(described) {
        let resource = result.map_err(|code| anyhow::anyhow!("describing topic {name}: {code}"))?;
        let current: BTreeMap<String, String> = resource
            .entries
            .iter()
            .filter(|e| e.source == ConfigSource::DynamicTopic && !e.is_read_only)
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        if let Some(wanted) = topic_config_after(&current, &owned) {
            wanted_per_topic.push((*name, wanted));
        }
    }
    let alters: Vec<AlterConfig> = wanted_per_topic
        .iter()
        .map(|(name, wanted)| {
            wanted.iter().fold(
                AlterConfig::new(ResourceSpecifier::Topic(name)),
                |a, (k, v)| a.set(k, v),
            )
        })
        .collect();
    if !alters.is_empty() {
        for result in admin.alter_configs(&alters, &opts).await? {
            if let Err((resource, code)) = result {
                bail!("setting retention.ms on {resource:?}: {code}");
            }
        }
    }
    Ok(created)
}

/// The whole dynamic configuration a topic should have: its `current` dynamic settings with the
/// `owned` ones set; `None` when nothing would change (so an unchanged topic gets no request).
pub fn topic_config_after(
    current: &BTreeMap<String, String>,
    owned: &[(&str, &str)],
) -> Option<BTreeMap<String, String>> {
    let mut wanted = current.clone();
    for (k, v) in owned {
        wanted.insert((*k).to_string(), (*v).to_string());
    }
    (wanted != *current).then_some(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_config_keeps_what_it_does_not_own() {
        let current: BTreeMap<String, String> = [
            ("min.insync.replicas", "2"),
            ("max.message.bytes", "2000000"),
            ("retention.ms", "1000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let wanted = topic_config_after(&current, &[("retention.ms", "5000")]).unwrap();
        assert_eq!(wanted["min.insync.replicas"], "2");
        assert_eq!(wanted["max.message.bytes"], "2000000");
        assert_eq!(wanted["retention.ms"], "5000");
        assert_eq!(wanted.len(), 3);
        assert_eq!(
            topic_config_after(&wanted, &[("retention.ms", "5000")]),
            None
        );
    }

    #[test]
    fn replication_factor_beyond_the_brokers_up_is_refused_only_for_topics_to_create() {
        assert!(check_replication_factor(3, 3, &["a", "b"]).is_ok());
        assert!(check_replication_factor(1, 3, &["a"]).is_ok());
        // Existing topics keep their replicas: nothing to refuse while a broker is down.
        assert!(check_replication_factor(3, 2, &[]).is_ok());
        let err = check_replication_factor(3, 1, &["in", "out"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("topics.replication_factor is 3"), "{err}");
        assert!(err.contains("1 broker(s) up"), "{err}");
        assert!(err.contains("in, out"), "{err}");
    }

    #[test]
    fn statements_split_at_line_end_semicolons_and_skip_comments() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x String DEFAULT ';')\nENGINE = Log;\n\nCREATE VIEW v AS SELECT 1;\n";
        assert_eq!(
            statements(sql),
            vec![
                "CREATE TABLE a (x String DEFAULT ';')\nENGINE = Log",
                "CREATE VIEW v AS SELECT 1"
            ]
        );
    }

    #[test]
    fn every_migration_renders_without_placeholders_left() {
        let mut ch = ClickHouseSettings::default();
        for days in [0, 30] {
            ch.raw_ttl_days = days;
            ch.totals_ttl_days = days;
            for m in MIGRATIONS {
                let sql = render(m.sql, &ch);
                assert!(!sql.contains("${"), "{}: {sql}", m.name);
                assert!(sql.contains("edgelog."), "{}", m.name);
                // Only migrations that create tables carry a TTL placeholder.
                if m.sql.contains("_ttl_clause}") {
                    assert_eq!(sql.contains("TTL"), days > 0, "{}", m.name);
                } else {
                    assert!(!sql.contains("TTL"), "{}", m.name);
                }
                assert!(!statements(&sql).is_empty());
            }
        }
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:03}_", m.version)));
        }
    }
}
