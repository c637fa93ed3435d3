//! `loader`: stage two, exactly-once from `http_log_anon` into ClickHouse through the proxy.

use clap::Parser;
use edgelog::cli::{self, CommonArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Load anonymized records into ClickHouse through the rate-limited proxy, exactly once"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let settings = cli::init(&args.common, &[]);
    let health = edgelog::health::Health::new(edgelog::loader::stall_limit(&settings));
    if let Err(e) =
        edgelog::telemetry::start_http(settings.loader.metrics_listen, Some(health.clone()))
    {
        tracing::error!("{e:#}");
        std::process::exit(2);
    }
    if let Err(e) =
        edgelog::loader::run_with_health(&settings, health, edgelog::shutdown::signal()).await
    {
        tracing::error!("loader stopped: {e:#}");
        std::process::exit(1);
    }
    // Not a return: dropping the runtime would wait for a blocking Kafka call (a rebuild's read)
    // still waiting on a dead cluster.
    std::process::exit(0);
}
