//! Logs (tracing, human or JSON); metrics (Prometheus text on `/metrics`) and health endpoints.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};
use crate::health::{self, Health};

/// Installs the global tracing subscriber. Call once, first thing in `main`.
pub fn init_logging(log: &LogSettings) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&log.level).with_context(|| {
        format!(
            "invalid configuration: `log.level` {:?} is not a tracing filter",
            log.level
        )
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match log.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

/// Serves, on `listen`: Prometheus metrics on `/metrics`, and with a [`Health`] `/healthz`,
/// `/readyz` (200 or 503, reason in the body) and `/status` (see [`crate::health`]). Needs a tokio
/// runtime. `None` disables the listener; metrics are then recorded nowhere. Returns the bound
/// address (useful with port 0).
pub fn start_http(
    listen: Option<SocketAddr>,
    health: Option<Arc<Health>>,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(addr) = listen else { return Ok(None) };
    let metrics = metrics_handle()?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("listening for metrics and health on {addr}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            let service = service_fn(move |request: Request<Incoming>| {
                let (status, body) = respond(request.uri().path(), &metrics, health.as_deref());
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(Full::new(Bytes::from(body)));
                async move { response }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    tracing::info!(%addr, "metrics at http://{addr}/metrics, health at /healthz /readyz /status");
    Ok(Some(addr))
}

/// Bucket bounds of `edgelog_loader_end_to_end_seconds`: fine around one proxy slot (64 s), where
/// the steady-state p99 lives, coarse beyond (a backlog).
pub const END_TO_END_BUCKETS_SECONDS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 55.0, 60.0, 65.0, 70.0, 80.0, 90.0, 120.0,
    180.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0,
];

/// The process-wide Prometheus recorder, installed on first use (several listeners in one
/// process, as in tests, share it).
fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut slot = HANDLE.lock().expect("not poisoned");
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        // A real histogram (cumulative buckets since start) rather than the exporter's default
        // summary over a ~1 min window: with one insert per slot that window holds one batch, and
        // buckets aggregate across loader instances and over any range in Prometheus.
        .set_buckets_for_metric(
            Matcher::Full("edgelog_loader_end_to_end_seconds".into()),
            END_TO_END_BUCKETS_SECONDS,
        )
        .context("end-to-end latency buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        // Histograms are summarised on upkeep; without it they grow until scraped.
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(slot.insert(handle).clone())
}

fn respond(path: &str, metrics: &PrometheusHandle, health: Option<&Health>) -> (u16, String) {
    let now = Instant::now();
    let verdict = |r: Result<String, String>| match r {
        Ok(why) => (200, format!("ok: {why}\n")),
        Err(why) => (503, format!("not ok: {why}\n")),
    };
    match (path, health) {
        ("/metrics", _) => (200, metrics.render()),
        ("/healthz" | "/readyz" | "/status", None) => (200, "ok: no health tracking\n".into()),
        ("/healthz", Some(h)) => verdict(health::liveness(now, &h.snapshot())),
        ("/readyz", Some(h)) => verdict(health::readiness(now, &h.snapshot(), h.stall_after)),
        ("/status", Some(h)) => (
            200,
            health::render_status(now, &h.snapshot(), h.stall_after),
        ),
        _ => (
            404,
            "not found: try /metrics, /healthz, /readyz or /status\n".into(),
        ),
    }
}
