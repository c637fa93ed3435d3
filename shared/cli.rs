//! What every binary does before its real work: arguments shared by all, settings, telemetry.

use std::path::PathBuf;

use crate::config::{LogFormat, Settings};

/// Flags every binary accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// TOML settings file (defaults < this file < EDGELOG_* environment < flags).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text (same as log.format = "json").
    #[arg(long)]
    pub log_json: bool,
}

/// Loads settings and installs logging; on a configuration error prints it and exits with 2, so a
/// bad key stops the process at start-up with a message naming that key.
pub fn init(common: &CommonArgs, overrides: &[(&str, figment::value::Value)]) -> Settings {
    crate::clickhouse::install_crypto_provider();
    let mut overrides = overrides.to_vec();
    if common.log_json {
        overrides.push(("log.format", "json".into()));
    }
    let settings = match Settings::load(common.config.as_deref(), &overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = crate::telemetry::init_logging(&settings.log) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    debug_assert!(matches!(
        settings.log.format,
        LogFormat::Human | LogFormat::Json
    ));
    settings
}
