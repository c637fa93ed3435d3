//! `edgelog status`: where each stage stands, for an operator. Kafka positions of both consumer
//! groups (committed, end, lag, the loader's pending batch), what ClickHouse holds, and the
//! `/status` page of each stage instance it can reach. What needs an operator's attention is
//! also listed apart ([`Report::attention`]), so that the command's exit status can alert.

use std::fmt::Write;
use std::time::Duration;

use crate::batch::BatchId;
use crate::clickhouse::{ClickHouseClient, ClickHouseError};
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

/// What `edgelog status` found.
#[derive(Debug, Default)]
pub struct Report {
    /// The whole report, for people.
    pub text: String,
    /// The lines of `text` that need attention: a part that could not be read (Kafka, ClickHouse,
    /// a stage instance), a stage not live or not ready, a refreshable view stale, never
    /// refreshed or failed. Empty when all is well; `edgelog status` then exits 0, else 1.
    pub attention: Vec<String>,
}

impl Report {
    fn line(&mut self, line: String) {
        self.text.push_str(&line);
        self.text.push('\n');
    }

    fn loud(&mut self, line: String) {
        self.attention.push(line.clone());
        self.line(line);
    }
}

/// The whole report. `endpoints` are base URLs of stage instances (`http://host:port`).
pub async fn report(settings: &Settings, endpoints: &[String]) -> Report {
    let mut out = Report::default();
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
            Ok(p) => out.text.push_str(&positions_table(
                &format!("{title}: group {group} on {topic}"),
                &p,
            )),
            Err(e) => out.loud(format!("{title}: group {group} on {topic}: UNKNOWN ({e})")),
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
    let client = ClickHouseClient::admin(&settings.clickhouse);
    let answer = ask(&client, &sql, db).await;
    match answer {
        Ok(text) => {
            let f: Vec<&str> = text.trim().split('\t').collect();
            if let [rows, newest, written] = f[..] {
                out.line(format!(
                    "clickhouse: {db}.http_log holds {rows} rows, newest record {newest}, last \
                     part written {written}"
                ));
            }
        }
        Err(e) => out.loud(format!("clickhouse: UNKNOWN ({e})")),
    }

    refreshes(&mut out, settings, &client).await;

    crate::clickhouse::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("a plain HTTP client builds");
    for base in endpoints {
        let url = format!("{}/status", base.trim_end_matches('/'));
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => {
                let text = r.text().await.unwrap_or_default();
                out.line(url);
                for line in text.lines() {
                    // `live: NO (...)`, `ready: NO (...)` (health::render_status).
                    if line.contains(": NO (") {
                        out.loud(format!("  {line}"));
                    } else {
                        out.line(format!("  {line}"));
                    }
                }
            }
            Ok(r) => out.loud(format!("{url}: HTTP {}", r.status())),
            Err(e) => out.loud(format!("{url}: not reachable ({e})")),
        }
    }
    out
}

/// `sql` (with the database as `{db:String}`) through the admin client, or why it could not be
/// asked: status reports every part it can, so an error is text for its line.
async fn ask(
    client: &Result<ClickHouseClient, ClickHouseError>,
    sql: &str,
    db: &str,
) -> Result<String, String> {
    match client {
        Ok(client) => client
            .query(sql, &[("db", db)])
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The dashboard reads an answer computed ahead only when it is at most this old (sql/012 and the
/// top-10 panel of docker/grafana/dashboards/edgelog-traffic.json); older, it merges states again.
pub const COMPUTED_AHEAD_MAX_AGE_S: i64 = 600;

/// One line per refreshable view (sql/012) and node: when it last refreshed, and loud when that is
/// too long ago for the dashboard or the last refresh failed.
async fn refreshes(
    out: &mut Report,
    settings: &Settings,
    client: &Result<ClickHouseClient, ClickHouseError>,
) {
    let db = &settings.clickhouse.database;
    let source = match &settings.clickhouse.cluster {
        Some(cluster) => format!("clusterAllReplicas('{cluster}', system.view_refreshes)"),
        None => "system.view_refreshes".to_string(),
    };
    let sql = format!(
        "SELECT view, hostName(), status, ifNull(toString(last_success_time), ''), \
           ifNull(dateDiff('second', last_success_time, now()), -1), \
           ifNull(last_success_duration_ms, 0), toString(next_refresh_time), \
           replaceRegexpAll(exception, '\\s+', ' ') \
         FROM {source} WHERE database = {{db:String}} ORDER BY view, hostName() FORMAT TSVRaw"
    );
    match ask(client, &sql, db).await {
        Ok(text) => {
            for row in text.lines() {
                match refresh_line(&row.split('\t').collect::<Vec<_>>()) {
                    (line, false) => out.line(line),
                    (line, true) => out.loud(line),
                }
            }
        }
        Err(e) => out.loud(format!("clickhouse: refreshable views UNKNOWN ({e})")),
    }
}

/// A row of [`refreshes`]: view, host, status, last success, its age in seconds (-1: never),
/// its duration in ms, next refresh, the last exception. The line, and whether it needs attention.
fn refresh_line(f: &[&str]) -> (String, bool) {
    let [view, host, status, last, age, took, next, exception] = f[..] else {
        return (format!("clickhouse: unexpected refresh row {f:?}"), true);
    };
    let age: i64 = age.parse().unwrap_or(-1);
    let mut line = if age < 0 {
        format!("clickhouse: view {view} on {host}: NEVER REFRESHED ({status}), next {next}")
    } else {
        format!(
            "clickhouse: view {view} on {host}: refreshed {last} ({age} s ago, took {took} ms), \
             {status}, next {next}"
        )
    };
    if age > COMPUTED_AHEAD_MAX_AGE_S {
        line.push_str(&format!(
            "; STALE: older than the dashboard's {COMPUTED_AHEAD_MAX_AGE_S} s, which merges \
             states instead"
        ));
    }
    if !exception.is_empty() {
        line.push_str(&format!("; LAST REFRESH FAILED: {exception}"));
    }
    let loud = !(0..=COMPUTED_AHEAD_MAX_AGE_S).contains(&age) || !exception.is_empty();
    (line, loud)
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
    fn a_refresh_is_loud_when_it_failed_or_is_too_old_for_the_dashboard() {
        let row = |age: &str, exception: &str| {
            refresh_line(&[
                "v_mv",
                "node1",
                "Scheduled",
                "2026-12-07 21:00:00",
                age,
                "1433",
                "2026-12-07 21:05:00",
                exception,
            ])
        };
        let fresh = row("42", "");
        assert_eq!(
            fresh,
            (
                "clickhouse: view v_mv on node1: refreshed 2026-12-07 21:00:00 (42 s ago, took \
                 1433 ms), Scheduled, next 2026-12-07 21:05:00"
                    .to_string(),
                false
            )
        );
        let (line, loud) = row("600", "");
        assert!(
            line.ends_with("next 2026-12-07 21:05:00") && !loud,
            "{line}"
        );
        let (line, loud) = row("601", "");
        assert!(line.contains("STALE") && loud, "{line}");
        let (failed, loud) = row("700", "Code: 241. Memory limit exceeded");
        assert!(
            loud && failed.contains("STALE")
                && failed.ends_with("LAST REFRESH FAILED: Code: 241. Memory limit exceeded"),
            "{failed}"
        );
        // A failure is loud even while the last success is recent.
        assert!(row("30", "Code: 241. Memory limit exceeded").1);
        let (line, loud) = row("-1", "");
        assert!(line.contains("NEVER REFRESHED") && loud, "{line}");
        let (line, loud) = refresh_line(&["too", "short"]);
        assert!(line.contains("unexpected") && loud, "{line}");
    }

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
