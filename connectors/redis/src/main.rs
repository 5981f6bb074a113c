//! `redis-connector`: delivers Redis Streams entries (consumer group, at-least-once) or
//! Pub/Sub messages (at-most-once) to the functions subscribed to each stream or channel.
//!
//! ```text
//! redis-connector --config config/redis.toml
//! gateway_url=http://127.0.0.1:8080 topics=orders redis_url=redis://127.0.0.1:6379 redis-connector
//! redis-connector --config config/redis.toml replay --dry-run
//! redis-connector --config config/redis.toml replay --limit 10
//! ```
//!
//! See `config/redis.toml` for every key and its default.

use std::path::PathBuf;

use connector_sdk::Runtime;
use connector_sdk::runtime::init_tracing;

/// Command line.
#[derive(clap::Parser)]
#[command(about = "Delivers Redis Streams entries and Pub/Sub messages to functions")]
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
    /// its dead-letter stream once delivered.
    Replay(connector_sdk::replay::ReplayArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = redis_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    if let Some(Command::Replay(replay)) = args.command {
        redis_connector::replay::run(&config, replay, &mut std::io::stdout())
            .await?
            .check()?;
        return Ok(());
    }
    let runtime = Runtime::new(redis_connector::NAME, config.connector.clone())?;
    redis_connector::run(config, runtime).await?;
    Ok(())
}
