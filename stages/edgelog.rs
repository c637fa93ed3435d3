//! `edgelog`: the operator CLI (set-up, effective configuration, traffic totals, audit).

use clap::{Parser, Subcommand};
use edgelog::capacity;
use edgelog::cli::{self, CommonArgs};
use edgelog::clickhouse::ClickHouseClient;

#[derive(Parser)]
#[command(version, about = "Operate an edgelog deployment")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the Kafka topics and apply the ClickHouse schema (idempotent; direct, not via the proxy).
    Setup {
        /// Only the ClickHouse schema.
        #[arg(long, conflicts_with = "kafka_only")]
        clickhouse_only: bool,
        /// Only the Kafka topics.
        #[arg(long)]
        kafka_only: bool,
    },
    /// Print the effective configuration as TOML (secrets redacted).
    Config,
    /// Show traffic totals from the totals table, with unique clients (direct to ClickHouse).
    Totals {
        /// How far back to look, in minutes.
        #[arg(long, default_value_t = 60)]
        minutes: u32,
    },
    /// Where each stage stands: committed offsets, lag, the loader's pending batch, what
    /// ClickHouse holds, and the `/status` page of each stage instance (next proxy slot, last
    /// insert or transaction). Exits 1, naming them on stderr, when lines need attention: a
    /// part that could not be read, a stage not live or not ready, a refreshable view stale,
    /// never refreshed or failed.
    Status {
        /// Base URL of a stage instance's HTTP listener; repeatable. Default: the
        /// `metrics_listen` addresses in the configuration.
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
        /// Read no stage instance, only Kafka and ClickHouse: where each instance's own probes
        /// are watched (the Helm chart's scheduled status check).
        #[arg(long, conflicts_with = "endpoints")]
        no_endpoints: bool,
    },
    /// Audit exactly-once: input offsets versus rows in ClickHouse, plus the dead-letter topic and
    /// what is in flight; and the totals table versus a recount. Exits 1 on any discrepancy.
    ///
    /// Audits one offset bucket per partition at a time (bounded memory at any table size) and
    /// remembers clean buckets and days in ClickHouse (`verify_audited`, `verify_days_audited`):
    /// by default a run audits only what is new or changed since; `--full` audits everything.
    Verify {
        /// First wait up to this long (e.g. `5m`) for the pipeline to drain, then audit; exits 1
        /// if it has not drained by then.
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "watch")]
        wait_drained: Option<std::time::Duration>,
        /// Audit everything again, ignoring what earlier runs recorded as clean.
        #[arg(long)]
        full: bool,
        /// Offsets per bucket: the most rows ClickHouse groups in one query and the client holds.
        #[arg(long, default_value_t = edgelog::verify::DEFAULT_BUCKET_OFFSETS,
              value_parser = clap::value_parser!(i64).range(1..))]
        bucket_offsets: i64,
        /// Audit continuously (incrementally, every `--interval`), exporting the findings as
        /// Prometheus gauges on `--listen` (`/metrics`, `/healthz`, `/readyz`). Runs until
        /// SIGINT/SIGTERM.
        #[arg(long)]
        watch: bool,
        /// Pause between two runs of `--watch`.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Address for `--watch`'s metrics and health endpoints.
        #[arg(long, default_value = "127.0.0.1:9104")]
        listen: std::net::SocketAddr,
    },
    /// Reload whole days (UTC) from the anonymized topic into ClickHouse, replacing what the raw
    /// table and every rollup hold for them (per partition, atomically). Stop the loaders first;
    /// run `verify` afterwards.
    Replay {
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: String,
        /// Last day, YYYY-MM-DD (default: the first).
        #[arg(long)]
        to: Option<String>,
    },
    /// Rebuild rollups from `http_log` for the days it holds whole, per partition atomically: for
    /// a rollup that a migration added to a database that already had data (its view only sees
    /// later inserts), or one that `verify` finds differing. Stop the loaders first.
    Backfill {
        /// Rollup table to rebuild, e.g. `http_log_top_1h`; repeatable. Default: every rollup.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// First day, YYYY-MM-DD (default: the first day http_log holds whole).
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// Last day, YYYY-MM-DD.
        #[arg(long, requires = "from")]
        to: Option<String>,
    },
    /// GET a stage's health endpoint (e.g. `http://127.0.0.1:9103/readyz`); exit 0 on 200, 1
    /// otherwise. For container health checks in images without curl.
    Probe { url: String },
    /// Expected disk use per table for an incoming rate and a retention (no server needed).
    Disk {
        /// Incoming records per second (steady).
        #[arg(long)]
        rate: f64,
        /// How long the rollups keep rows, e.g. 400d (also the raw table's, unless --raw-retention).
        #[arg(long, value_parser = capacity::parse_retention)]
        retention: f64,
        /// How long `http_log` keeps raw rows, e.g. 30d.
        #[arg(long, value_parser = capacity::parse_retention)]
        raw_retention: Option<f64>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before any reqwest client: `probe` runs without `cli::init`.
    edgelog::clickhouse::install_crypto_provider();
    if let Command::Probe { url } = &args.command {
        let ok = match reqwest::get(url).await {
            Ok(r) => {
                let status = r.status();
                println!("{status} {}", r.text().await.unwrap_or_default().trim());
                status.is_success()
            }
            Err(e) => {
                println!("unreachable: {e}");
                false
            }
        };
        std::process::exit(if ok { 0 } else { 1 });
    }
    if let Command::Disk {
        rate,
        retention,
        raw_retention,
    } = args.command
    {
        // Pure arithmetic: no settings, logging or servers.
        let rows = capacity::estimate(rate, retention, raw_retention.unwrap_or(retention));
        println!(
            "{:<32} {:>16} {:>14} {:>12}",
            "table", "rows", "rows/raw row", "disk"
        );
        for e in &rows {
            println!(
                "{:<32} {:>16.0} {:>14.3} {:>12}",
                e.table,
                e.rows,
                e.rows_per_raw_row,
                capacity::human_bytes(e.bytes)
            );
        }
        let total: f64 = rows.iter().map(|e| e.bytes).sum();
        println!(
            "{:<32} {:>16} {:>14} {:>12}",
            "total",
            "",
            "",
            capacity::human_bytes(total)
        );
        println!("(model and assumptions: shared/capacity.rs; traffic shaped like the producer's default model)");
        return Ok(());
    }
    let settings = cli::init(&args.common, &[]);
    match args.command {
        Command::Setup {
            clickhouse_only,
            kafka_only,
        } => {
            if !clickhouse_only {
                let created = edgelog::setup::create_topics(&settings).await?;
                println!("kafka topics ok (created now: {created:?})");
            }
            if !kafka_only {
                let ch = ClickHouseClient::admin(&settings.clickhouse)?;
                let db = &settings.clickhouse.database;
                let before = edgelog::backfill::rollup_tables(&ch, db).await?;
                let applied = edgelog::setup::apply_schema(&settings).await?;
                println!("clickhouse schema ok (migrations applied now: {applied:?})");
                let missing = edgelog::backfill::new_rollups_missing_rows(&ch, db, &before).await?;
                if !missing.is_empty() {
                    let flags: Vec<String> =
                        missing.iter().map(|t| format!("--table {t}")).collect();
                    println!(
                        "new rollups hold none of the rows already in {db}.http_log: stop the \
                         loaders, then run `edgelog backfill {}`",
                        flags.join(" ")
                    );
                }
            }
        }
        Command::Disk { .. } | Command::Probe { .. } => unreachable!("handled before start-up"),
        Command::Config => print!("{}", settings.to_redacted_toml()),
        Command::Totals { minutes } => {
            let client = ClickHouseClient::admin(&settings.clickhouse)?;
            let db = &settings.clickhouse.database;
            // unique_clients: distinct anonymized addresses (IPv4 /24s, IPv6 /48s) in the five
            // minutes, merged from the per-minute states of http_log_uniques (migration 009).
            let sql = format!(
                "SELECT t, reqs, bytes, avg_ms, unique_clients FROM \
                 (SELECT toStartOfFiveMinutes(ts) AS t, sum(requests) AS reqs, \
                  formatReadableSize(sum(bytes_sent)) AS bytes, \
                  round(sum(request_time_milli) / reqs, 1) AS avg_ms \
                  FROM {db}.http_log_totals WHERE ts >= now() - INTERVAL {{m:UInt32}} MINUTE \
                  GROUP BY t) AS totals \
                 LEFT JOIN \
                 (SELECT toStartOfFiveMinutes(ts) AS t, uniqMerge(clients) AS unique_clients \
                  FROM {db}.http_log_uniques WHERE ts >= now() - INTERVAL {{m:UInt32}} MINUTE \
                  GROUP BY t) AS uniques USING t \
                 ORDER BY t FORMAT PrettyCompactMonoBlock"
            );
            print!(
                "{}",
                client.query(&sql, &[("m", &minutes.to_string())]).await?
            );
            let sql = format!(
                "SELECT response_status, cache_status, sum(requests) AS reqs \
                 FROM {db}.http_log_totals WHERE ts >= now() - INTERVAL {{m:UInt32}} MINUTE \
                 GROUP BY response_status, cache_status ORDER BY reqs DESC LIMIT 10 \
                 FORMAT PrettyCompactMonoBlock"
            );
            print!(
                "{}",
                client.query(&sql, &[("m", &minutes.to_string())]).await?
            );
        }
        Command::Replay { from, to } => {
            let days = edgelog::staging::Days::parse(&from, to.as_deref().unwrap_or(&from))?;
            let summary = edgelog::replay::replay(&settings, &days).await?;
            println!(
                "replayed {} rows of {}..={} ({} records read)",
                summary.rows_replayed, days.first, days.last, summary.records_read
            );
            print_rebuilt(&summary.replaced, &summary.views);
        }
        Command::Backfill { tables, from, to } => {
            let days = match (from, to) {
                (Some(from), Some(to)) => Some(edgelog::staging::Days::parse(&from, &to)?),
                _ => None,
            };
            let summary = edgelog::backfill::backfill(&settings, &tables, days.as_ref()).await?;
            match &summary.days {
                None => println!("nothing to rebuild: http_log holds no whole day"),
                Some(d) => println!("rebuilt {}..={} from http_log", d.first, d.last),
            }
            print_rebuilt(&summary.replaced, &summary.views);
        }
        Command::Status {
            endpoints,
            no_endpoints,
        } => {
            let endpoints = if endpoints.is_empty() && !no_endpoints {
                edgelog::status::configured_endpoints(&settings)
            } else {
                endpoints
            };
            let report = edgelog::status::report(&settings, &endpoints).await;
            print!("{}", report.text);
            if !report.attention.is_empty() {
                eprintln!(
                    "edgelog status: {} line(s) need attention:",
                    report.attention.len()
                );
                for line in &report.attention {
                    eprintln!("{}", line.trim_start());
                }
                std::process::exit(1);
            }
        }
        Command::Verify {
            wait_drained,
            full,
            bucket_offsets,
            watch,
            interval,
            listen,
        } => {
            let options = edgelog::verify::AuditOptions {
                bucket_offsets,
                incremental: !full,
            };
            if watch {
                return edgelog::verify::watch::watch(&settings, options, interval, listen).await;
            }
            let report = match wait_drained {
                Some(timeout) => {
                    edgelog::verify::audit_when_drained_with(&settings, timeout, &options).await?
                }
                None => edgelog::verify::audit_with(&settings, &options).await?,
            };
            println!("{report}");
            let undrained = wait_drained.is_some() && !report.is_drained();
            if undrained {
                println!("FAILED: the pipeline did not drain in time");
            }
            if !report.is_clean() || undrained {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// What `replay` and `backfill` replaced, and the views they refreshed afterwards.
fn print_rebuilt(
    replaced: &std::collections::BTreeMap<String, Vec<String>>,
    views: &edgelog::staging::Refreshes,
) {
    for (table, partitions) in replaced {
        println!("  {table}: partitions {}", partitions.join(", "));
    }
    for view in &views.refreshed {
        println!("  {view}: refreshed");
    }
    for view in &views.stopped {
        println!("  {view}: NOT refreshed, it is stopped (SYSTEM START VIEW resumes it)");
    }
}
