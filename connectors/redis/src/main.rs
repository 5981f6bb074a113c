//! `redis-connector`: delivers Redis Streams entries (consumer group, at-least-once) or
//! Pub/Sub messages (at-most-once) to the functions subscribed to each stream or channel.
//!
//! ```text
//! redis-connector --config config/redis.toml
//! gateway_url=http://127.0.0.1:8080 topics=orders redis_url=redis://127.0.0.1:6379 redis-connector
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
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = redis_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    let runtime = Runtime::new(redis_connector::NAME, config.connector.clone())?;
    redis_connector::run(config, runtime).await?;
    Ok(())
}
