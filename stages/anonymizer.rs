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
    if let Err(e) = edgelog::telemetry::start_metrics(settings.anonymizer.metrics_listen) {
        tracing::error!("{e:#}");
        std::process::exit(2);
    }
    if let Err(e) = edgelog::anonymizer::run(&settings, edgelog::shutdown::signal()).await {
        // A fatal error (fenced, broken producer): exit non-zero so the orchestrator restarts us.
        tracing::error!("anonymizer stopped: {e:#}");
        std::process::exit(1);
    }
}
