//! `rabbitmq-connector`: delivers messages of a RabbitMQ queue (AMQP 0-9-1) to the
//! functions subscribed to their routing keys, at least once.
//!
//! ```text
//! rabbitmq-connector --config config/rabbitmq.toml
//! gateway_url=http://127.0.0.1:8080 rabbitmq_url=amqp://guest:guest@127.0.0.1:5672/%2f rabbitmq-connector
//! rabbitmq-connector --config config/rabbitmq.toml replay --dry-run
//! rabbitmq-connector --config config/rabbitmq.toml replay --limit 10
//! ```
//!
//! See `config/rabbitmq.toml` for every key and its default.

use std::path::PathBuf;

use connector_sdk::Runtime;
use connector_sdk::runtime::init_tracing;

/// Command line.
#[derive(clap::Parser)]
#[command(about = "Delivers RabbitMQ messages to functions")]
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
    /// Deliver the dead letters again (to the function named in each), removing each from
    /// the dead-letter queue once delivered.
    Replay(connector_sdk::replay::ReplayArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = rabbitmq_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    if let Some(Command::Replay(replay)) = args.command {
        rabbitmq_connector::replay::run(&config, replay, &mut std::io::stdout())
            .await?
            .check()?;
        return Ok(());
    }
    let runtime = Runtime::new(rabbitmq_connector::NAME, config.connector.clone())?;
    rabbitmq_connector::run(config, runtime).await?;
    Ok(())
}
