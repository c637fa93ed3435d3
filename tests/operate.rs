//! Operating a stage: `/healthz`, `/readyz`, `/status` and `edgelog status` on the real stack.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use edgelog::health::Health;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    edgelog::clickhouse::install_crypto_provider();
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_working_loader_is_ready_and_reports_where_it_stands() {
    require_stack();
    let s = fast_loader_settings();
    fill_anonymized_topic(&s, 500).await;
    let health = Health::new(edgelog::loader::stall_limit(&s));
    let addr = serve_health(&health);
    let loader = start_loader_with_health(&s, health);
    wait_drained(&s, Duration::from_secs(60)).await;
    wait_for(
        "a status page naming the last insert",
        Duration::from_secs(10),
        || async move {
            let (_, page) = get(addr, "/status").await;
            page.contains("rows, ").then_some(())
        },
    )
    .await;

    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("3 partitions"), "{body}");
    let (code, metrics) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("edgelog_loader_rows_inserted_total"),
        "{metrics}"
    );

    // Nothing needs attention once the refreshable view made its first refresh (setup created it
    // moments ago): `edgelog status` would exit 0.
    let endpoints = [format!("http://{addr}")];
    let report = wait_for(
        "a status with nothing needing attention",
        Duration::from_secs(60),
        || async {
            let r = edgelog::status::report(&s, &endpoints).await;
            r.attention.is_empty().then_some(r.text)
        },
    )
    .await;
    for needle in [
        "anonymizer: group",
        "loader: group",
        "total lag: 0",
        "holds 500 rows",
        "next proxy slot:",
        "last insert: ",
        "pending batch: none",
        // Migration 012's refreshable view, created by setup.
        "clickhouse: view http_log_uniques_top_trailing_mv on ",
    ] {
        assert!(report.contains(needle), "{needle:?} not in\n{report}");
    }
    assert!(!report.contains("FAILED"), "{report}");
    let out = edgelog_command(&s, "status")
        .args(["--endpoint", &endpoints[0]])
        .output()
        .expect("the edgelog binary runs");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "edgelog status: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    loader.stop().await.expect("the loader stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loader_that_cannot_insert_becomes_unready_but_stays_live() {
    require_stack();
    let mut s = isolated_settings();
    // Nothing listens on the discard port: every insert fails with connection refused.
    s.clickhouse.url = "http://127.0.0.1:9".into();
    s.loader.slot_spacing = Duration::from_millis(100);
    s.loader.request_timeout = Duration::from_millis(200);
    fill_anonymized_topic(&s, 100).await;
    let health = Health::new(edgelog::loader::stall_limit(&s));
    let addr = serve_health(&health);
    let loader = start_loader_with_health(&s, health);
    let body = wait_for("/readyz to fail", Duration::from_secs(30), || async move {
        let (code, body) = get(addr, "/readyz").await;
        // Unready first for want of partitions, then because the proxy does not answer.
        (code == 503 && body.contains("clickhouse unavailable")).then_some(body)
    })
    .await;
    assert!(body.starts_with("not ok"), "{body}");
    assert!(body.contains("request failed"), "names the failure: {body}");
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 200, "still live: {body}");
    // The status lines are refreshed every 500 ms.
    wait_for(
        "/status to show the failure",
        Duration::from_secs(10),
        || async move {
            let (_, page) = get(addr, "/status").await;
            page.contains("last request outcome: transient")
                .then_some(())
        },
    )
    .await;
    // `edgelog status` names the unready stage as needing attention (and exits 1).
    let report = edgelog::status::report(&s, &[format!("http://{addr}")]).await;
    assert!(
        report
            .attention
            .iter()
            .any(|l| l.trim_start().starts_with("ready: NO (")),
        "{:?}\n{}",
        report.attention,
        report.text
    );
    let out = edgelog_command(&s, "status")
        .args(["--endpoint", &format!("http://{addr}")])
        .output()
        .expect("the edgelog binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("need attention:") && stderr.contains("\nready: NO ("),
        "{stderr}"
    );
    // Without the stage instances (their probes are watched elsewhere) it is Kafka and ClickHouse
    // only, both fine here once the refreshable view made its first refresh.
    let stdout = wait_for(
        "edgelog status --no-endpoints to pass",
        Duration::from_secs(60),
        || async {
            let out = edgelog_command(&s, "status")
                .arg("--no-endpoints")
                .output()
                .expect("the edgelog binary runs");
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).to_string())
        },
    )
    .await;
    assert!(!stdout.contains("/status"), "{stdout}");
    loader.stop().await.expect("the loader stops cleanly");
}
