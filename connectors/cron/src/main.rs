//! `cron-connector`: invokes functions on the schedules in their annotations.
//!
//! ```text
//! cron-connector --config config/cron.toml
//! gateway_url=http://127.0.0.1:8080 cron-connector
//! ```

use std::path::PathBuf;

use clap::Parser;
use connector_sdk::Runtime;
use connector_sdk::runtime::init_tracing;
use cron_connector::config::Config;

/// Invokes functions on the schedules in their `schedule` annotations.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (see config/cron.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    let runtime = Runtime::new(cron_connector::NAME, config.connector.clone())?;
    cron_connector::run(config, runtime).await?;
    Ok(())
}
