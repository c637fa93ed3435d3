//! Logs (tracing, human or JSON) and metrics (Prometheus text on `/metrics`).

use std::net::SocketAddr;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

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

/// Serves Prometheus metrics on `http://<listen>/metrics` (any path answers). Needs a tokio
/// runtime. `None` disables the listener; metrics are then recorded nowhere.
pub fn start_metrics(listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let Some(addr) = listen else { return Ok(()) };
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("starting the metrics listener on {addr}"))?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}
