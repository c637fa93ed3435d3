//! `anonymizer`: stage one, exactly-once from `http_log` to `http_log_anon`.

use clap::Parser;
use edgelog::cli::{self, CommonArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Anonymize client IPs from the input topic into the anonymized topic, exactly once"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Instance id (transactional.id = <group_id>-<instance_id>); overrides anonymizer.instance_id.
    #[arg(long)]
    instance_id: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut overrides: Vec<(&str, figment::value::Value)> = Vec::new();
    if let Some(id) = &args.instance_id {
        overrides.push(("anonymizer.instance_id", id.as_str().into()));
    }
    let settings = cli::init(&args.common, &overrides);
    let health = edgelog::health::Health::new(edgelog::anonymizer::stall_limit(&settings));
    if let Err(e) =
        edgelog::telemetry::start_http(settings.anonymizer.metrics_listen, Some(health.clone()))
    {
        tracing::error!("{e:#}");
        std::process::exit(2);
    }
    if let Err(e) =
        edgelog::anonymizer::run_with_health(&settings, health, edgelog::shutdown::signal()).await
    {
        // A fatal error (fenced, broken producer): exit non-zero so the orchestrator restarts us.
        tracing::error!("anonymizer stopped: {e:#}");
        std::process::exit(1);
    }
    // Not a return: dropping the runtime would wait for a Kafka call still blocked on a dead
    // cluster (see `SHUTDOWN_GRACE`).
    std::process::exit(0);
}
