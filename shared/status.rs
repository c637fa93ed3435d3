//! `edgelog status`: where each stage stands, for an operator. Kafka positions of both consumer
//! groups (committed, end, lag, the loader's pending batch), what ClickHouse holds, and the
//! `/status` page of each stage instance it can reach.

use std::fmt::Write;
use std::time::Duration;

use crate::batch::BatchId;
use crate::clickhouse::ClickHouseClient;
use crate::config::Settings;
use crate::kafka::{group_positions, GroupPosition};

/// One consumer group's positions as a table. Lag counts offsets, so it may include a
/// transaction marker or two.
pub fn positions_table(title: &str, positions: &[GroupPosition]) -> String {
    let mut out = format!("{title}\n");
    let _ = writeln!(
        out,
        "  {:>9} {:>12} {:>12} {:>10}  pending batch",
        "partition", "committed", "end", "lag"
    );
    let open: Vec<String> = positions
        .iter()
        .filter(|p| p.stable < p.high)
        .map(|p| {
            format!(
                "{} (stable up to {}, end {})",
                p.partition, p.stable, p.high
            )
        })
        .collect();
    let mut total = 0;
    for p in positions {
        let lag = p.high - p.committed.unwrap_or(p.low).max(p.low);
        total += lag;
        let pending = match BatchId::from_metadata(&p.metadata) {
            Ok(Some(b)) => b.to_string(),
            Ok(None) => "-".to_string(),
            Err(e) => format!("unreadable: {e}"),
        };
        let committed = p
            .committed
            .map_or_else(|| "none".to_string(), |c| c.to_string());
        let _ = writeln!(
            out,
            "  {:>9} {:>12} {:>12} {:>10}  {pending}",
            p.partition, committed, p.high, lag
        );
    }
    let _ = writeln!(out, "  total lag: {total}");
    if !open.is_empty() {
        let _ = writeln!(
            out,
            "  open transactions on partitions {}: normal while a stage writes; one that stays \
             hides what follows it until it commits or times out",
            open.join(", ")
        );
    }
    out
}

/// The whole report. `endpoints` are base URLs of stage instances (`http://host:port`).
pub async fn report(settings: &Settings, endpoints: &[String]) -> String {
    let mut out = String::new();
    for (title, group, topic) in [
        (
            "anonymizer",
            &settings.anonymizer.group_id,
            &settings.topics.input,
        ),
        (
            "loader",
            &settings.loader.group_id,
            &settings.topics.anonymized,
        ),
    ] {
        let (kafka, g, t) = (settings.kafka.clone(), group.clone(), topic.clone());
        let positions = tokio::task::spawn_blocking(move || {
            group_positions(&kafka, &g, &t, Duration::from_secs(10))
        })
        .await
        .expect("the task does not panic");
        match positions {
            Ok(p) => out.push_str(&positions_table(
                &format!("{title}: group {group} on {topic}"),
                &p,
            )),
            Err(e) => {
                let _ = writeln!(out, "{title}: group {group} on {topic}: UNKNOWN ({e})");
            }
        }
    }

    let db = &settings.clickhouse.database;
    // In cluster mode `http_log` is a Distributed table: rows are counted through it, parts are
    // those of every shard's `http_log_local`.
    let (parts, raw_table) = match &settings.clickhouse.cluster {
        Some(cluster) => (
            format!("clusterAllReplicas('{cluster}', system.parts)"),
            "http_log_local",
        ),
        None => ("system.parts".to_string(), "http_log"),
    };
    let sql = format!(
        "SELECT count(), max(timestamp), \
           (SELECT max(modification_time) FROM {parts} \
            WHERE database = {{db:String}} AND table = '{raw_table}' AND active) \
         FROM {db}.http_log FORMAT TSV"
    );
    let answer = match ClickHouseClient::admin(&settings.clickhouse) {
        Ok(client) => client.query(&sql, &[("db", db)]).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(text) => {
            let f: Vec<&str> = text.trim().split('\t').collect();
            if let [rows, newest, written] = f[..] {
                let _ = writeln!(
                    out,
                    "clickhouse: {db}.http_log holds {rows} rows, newest record {newest}, last \
                     part written {written}"
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "clickhouse: UNKNOWN ({e})");
        }
    }

    crate::clickhouse::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("a plain HTTP client builds");
    for base in endpoints {
        let url = format!("{}/status", base.trim_end_matches('/'));
        match http.get(&url).send().await {
            Ok(r) => {
                let text = r.text().await.unwrap_or_default();
                let _ = writeln!(out, "{url}");
                for line in text.lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "{url}: not reachable ({e})");
            }
        }
    }
    out
}

/// The stage endpoints the settings name (this host's instances, as configured).
pub fn configured_endpoints(settings: &Settings) -> Vec<String> {
    [
        settings.anonymizer.metrics_listen,
        settings.loader.metrics_listen,
    ]
    .into_iter()
    .flatten()
    .map(|addr| format!("http://{addr}"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_lag_and_the_pending_batch() {
        let positions = vec![
            GroupPosition {
                partition: 0,
                committed: Some(90),
                metadata: "edgelog.batch.v1;0:90-100".into(),
                low: 0,
                high: 120,
                stable: 120,
            },
            GroupPosition {
                partition: 1,
                committed: None,
                metadata: String::new(),
                low: 5,
                high: 10,
                stable: 8,
            },
        ];
        let text = positions_table("loader", &positions);
        assert!(text.contains("0:90-100"), "{text}");
        assert!(text.contains("none"), "{text}");
        assert!(text.contains("total lag: 35"), "{text}");
        assert!(
            text.contains("open transactions on partitions 1 (stable up to 8, end 10)"),
            "{text}"
        );
    }
}
