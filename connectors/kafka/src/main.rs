//! `kafka-connector`: delivers Kafka records to the functions subscribed to their topics,
//! at least once.
//!
//! ```text
//! kafka-connector --config config/kafka.toml
//! ```
//!
//! Every setting can also come from the environment, with OpenFaaS's names
//! (`gateway_url`, `topics`, `broker_hosts`, `group`, `initial_offset`, ...); see
//! config/kafka.toml for every key and its default.

use std::path::PathBuf;

use connector_sdk::Runtime;
use connector_sdk::runtime::init_tracing;

/// Command line.
#[derive(clap::Parser)]
#[command(about = "Delivers Kafka records to functions, at least once", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = kafka_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    let runtime = Runtime::new(kafka_connector::NAME, config.connector.clone())?;
    kafka_connector::run(config, runtime).await?;
    Ok(())
}
