//! `producer`: synthetic CDN access logs (Cap'n Proto) into the input topic.

use clap::Parser;
use edgelog::cli::{self, CommonArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Write synthetic HttpLogRecord messages to the input topic"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Records per second (0 = as fast as possible); overrides producer.rate.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many records; overrides producer.count.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long, e.g. `30s`; overrides producer.duration.
    #[arg(long)]
    duration: Option<String>,
    /// Seed of the traffic model; overrides producer.seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Share of garbage (non Cap'n Proto) messages; overrides producer.garbage_share.
    #[arg(long)]
    garbage_share: Option<f64>,
    /// Share of hostile records (dead-lettered by stage one); overrides producer.hostile_share.
    #[arg(long)]
    hostile_share: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut overrides: Vec<(&str, figment::value::Value)> = Vec::new();
    if let Some(v) = args.rate {
        overrides.push(("producer.rate", v.into()));
    }
    if let Some(v) = args.count {
        overrides.push(("producer.count", v.into()));
    }
    if let Some(v) = &args.duration {
        overrides.push(("producer.duration", v.as_str().into()));
    }
    if let Some(v) = args.seed {
        overrides.push(("producer.seed", v.into()));
    }
    if let Some(v) = args.garbage_share {
        overrides.push(("producer.garbage_share", v.into()));
    }
    if let Some(v) = args.hostile_share {
        overrides.push(("producer.hostile_share", v.into()));
    }
    let settings = cli::init(&args.common, &overrides);
    edgelog::telemetry::start_http(settings.producer.metrics_listen, None)?;
    let report = edgelog::producer::run(&settings, edgelog::shutdown::signal()).await?;
    println!(
        "produced {} messages ({} garbage, {} hostile) to {}: {} delivered, {} failed in {:.1} s = {:.0} records/s",
        report.sent,
        report.garbage,
        report.hostile,
        settings.topics.input,
        report.delivered,
        report.failed,
        report.elapsed.as_secs_f64(),
        report.rate()
    );
    if report.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
