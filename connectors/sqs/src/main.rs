//! `sqs-connector`: invokes functions for AWS SQS messages.
//!
//! ```text
//! sqs-connector --config config/sqs.toml
//! sqs_queues=orders gateway_url=http://127.0.0.1:8080 sqs-connector
//! sqs-connector --config config/sqs.toml replay --dry-run
//! sqs-connector --config config/sqs.toml replay --limit 10
//! ```

use std::path::PathBuf;

use clap::Parser;
use connector_sdk::Runtime;
use connector_sdk::runtime::init_tracing;
use sqs_connector::config::Config;

/// Invokes the functions subscribed to each SQS message's topic; deletes it once done.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (see config/sqs.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Without a subcommand: run the connector.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Deliver the messages of sqs.dead_letter_queue again (to the function named in
    /// each), deleting each once delivered.
    Replay(connector_sdk::replay::ReplayArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    if let Some(Command::Replay(replay)) = args.command {
        sqs_connector::replay::run(&config, replay, &mut std::io::stdout())
            .await?
            .check()?;
        return Ok(());
    }
    let runtime = Runtime::new(sqs_connector::NAME, config.sdk_config())?;
    sqs_connector::run(config, runtime).await?;
    Ok(())
}
