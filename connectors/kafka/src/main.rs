//! `kafka-connector`: delivers Kafka records to the functions subscribed to their topics,
//! at least once.
//!
//! ```text
//! kafka-connector --config config/kafka.toml
//! kafka-connector --config config/kafka.toml replay --dry-run
//! kafka-connector --config config/kafka.toml replay --limit 10
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
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Without a subcommand: run the connector.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Deliver the dead letters again (to the function named in each); the replay's own
    /// consumer group commits past each one delivered.
    Replay {
        #[command(flatten)]
        replay: connector_sdk::replay::ReplayArgs,
        /// The replay's consumer group (default: `<group>-replay`).
        #[arg(long)]
        group: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = kafka_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    if let Some(Command::Replay { replay, group }) = args.command {
        let group = group.unwrap_or_else(|| kafka_connector::replay::default_group(&config));
        kafka_connector::replay::run(&config, replay, &group, &mut std::io::stdout())
            .await?
            .check()?;
        return Ok(());
    }
    let runtime = Runtime::new(kafka_connector::NAME, config.connector.clone())?;
    kafka_connector::run(config, runtime).await?;
    Ok(())
}
