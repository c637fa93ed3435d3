//! `edgelog verify --watch`: the incremental audit on a loop, its findings as Prometheus gauges
//! next to `/healthz` and `/readyz` (alert rules: `deploy/prometheus/verify-alerts.yaml`).
//!
//! Gauges, set after every successful run:
//! - `edgelog_verify_missing`: input records that should be in ClickHouse and are not;
//! - `edgelog_verify_duplicated`: rows too many (extra copies, rows of no or a dead-lettered
//!   input record, rows of a partition the input topic lacks);
//! - `edgelog_verify_unaudited`: input offsets no clean, settled bucket covers yet (grows when the
//!   pipeline or the audit falls behind);
//! - `edgelog_verify_totals_differing`: rollup groups and rollup-days differing from the recount;
//! - `edgelog_verify_last_success_timestamp_seconds` and `edgelog_verify_last_run_seconds`.
//!
//! `edgelog_verify_runs_total{result="clean|discrepancy|error"}` counts runs.
//! `/readyz` is 503 while the last run failed, or when no run has succeeded for two intervals plus
//! half an hour.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{audit_with, AuditOptions, Report};
use crate::config::Settings;
use crate::health::Health;

/// The gauges' values for one report.
pub fn gauges(report: &Report) -> [(&'static str, f64); 4] {
    let t = &report.totals;
    [
        ("edgelog_verify_missing", report.missing() as f64),
        ("edgelog_verify_duplicated", report.duplicated() as f64),
        ("edgelog_verify_unaudited", report.unaudited() as f64),
        (
            "edgelog_verify_totals_differing",
            (t.groups_differing
                + t.rollups_differing.len() as u64
                + u64::from(t.raw_rows != t.totals_requests || t.raw_bytes != t.totals_bytes))
                as f64,
        ),
    ]
}

/// Audits every `interval` until SIGINT/SIGTERM, serving metrics and health on `listen`.
pub async fn watch(
    settings: &Settings,
    options: AuditOptions,
    interval: Duration,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let health = Health::new(interval * 2 + Duration::from_secs(1800));
    let addr = crate::telemetry::start_http(Some(listen), Some(health.clone()))?;
    tracing::info!(?addr, ?interval, "continuous audit started");
    // Readiness wants an assignment; the audit's is the whole input topic.
    health.assigned(1);
    // The loop's own progress is judged by readiness (no success for too long), not liveness: one
    // audit of a large backlog may run longer than the liveness window.
    let beat = {
        let health = health.clone();
        tokio::spawn(async move {
            loop {
                health.beat();
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        })
    };
    let shutdown = crate::shutdown::signal();
    tokio::pin!(shutdown);
    loop {
        health.work_pending();
        let started = Instant::now();
        let run = tokio::select! {
            r = audit_with(settings, &options) => r,
            () = &mut shutdown => break,
        };
        metrics::gauge!("edgelog_verify_last_run_seconds").set(started.elapsed().as_secs_f64());
        match run {
            Ok(report) => {
                for (name, value) in gauges(&report) {
                    metrics::gauge!(name).set(value);
                }
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
                metrics::gauge!("edgelog_verify_last_success_timestamp_seconds").set(now);
                let result = if report.is_clean() {
                    "clean"
                } else {
                    "discrepancy"
                };
                metrics::counter!("edgelog_verify_runs_total", "result" => result).increment(1);
                health.up("audit");
                health.success();
                let last = report.to_string();
                let verdict = last.lines().last().unwrap_or_default().to_string();
                if report.is_clean() {
                    tracing::info!(%verdict, "audit run");
                } else {
                    tracing::warn!(report = %last, "audit found discrepancies");
                }
                health.details(vec![("last audit", verdict)]);
            }
            Err(e) => {
                metrics::counter!("edgelog_verify_runs_total", "result" => "error").increment(1);
                tracing::warn!(error = %format!("{e:#}"), "audit run failed; retrying next interval");
                health.down("audit", &format!("{e:#}"));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut shutdown => break,
        }
    }
    beat.abort();
    tracing::info!("continuous audit stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{BucketAudit, OffsetSet, PartitionAudit, TotalsCheck};

    #[test]
    fn gauges_count_missing_duplicated_and_unaudited() {
        let mut p = PartitionAudit {
            unaudited: 7,
            ..PartitionAudit::default()
        };
        p.add(&BucketAudit {
            start: 0,
            end: 10,
            input: OffsetSet::span(0, 10),
            landed: OffsetSet::span(0, 8),
            duplicated: OffsetSet::span(1, 2),
            duplicate_rows: 3,
            ..BucketAudit::default()
        });
        let report = Report {
            partitions: vec![p],
            foreign_partitions: vec![(9, 4)],
            totals: TotalsCheck {
                groups_differing: 2,
                ..TotalsCheck::default()
            },
            ..Report::default()
        };
        assert_eq!(
            gauges(&report),
            [
                ("edgelog_verify_missing", 2.0),
                ("edgelog_verify_duplicated", 7.0),
                ("edgelog_verify_unaudited", 7.0),
                ("edgelog_verify_totals_differing", 2.0),
            ]
        );
    }
}
