//! `nats-connector`: delivers NATS messages to functions.
//!
//! ```text
//! nats-connector --config config/nats.toml
//! broker_host=nats topics=orders.created gateway_url=http://gateway:8080 nats-connector
//! nats-connector --config config/nats.toml replay --dry-run
//! nats-connector --config config/nats.toml replay --limit 10
//! ```

use std::path::PathBuf;

use clap::Parser;
use connector_sdk::Runtime;
use connector_sdk::runtime::init_tracing;
use nats_connector::config::Config;

/// Delivers NATS messages (core or JetStream) to the functions subscribed to their subjects.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (see config/nats.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Without a subcommand: run the connector.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Deliver the dead letters again (to the function named in each), deleting each from
    /// the stream that captures the dead-letter subject once delivered.
    Replay(connector_sdk::replay::ReplayArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    if let Some(Command::Replay(replay)) = args.command {
        nats_connector::replay::run(&config, replay, &mut std::io::stdout())
            .await?
            .check()?;
        return Ok(());
    }
    let runtime = Runtime::new(nats_connector::NAME, config.connector.clone())?;
    nats_connector::run(config, runtime).await?;
    Ok(())
}
