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

use connector_sdk::Runtime;
use connector_sdk::cli::{ConnectorArgs, ConnectorCommand};
use connector_sdk::runtime::init_tracing;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ConnectorArgs::parse_for(
        redis_connector::NAME,
        "Delivers Redis Streams entries and Pub/Sub messages to functions",
    );
    let config = redis_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    match args.command {
        Some(ConnectorCommand::Replay(replay)) => {
            let out = &mut std::io::stdout();
            redis_connector::replay::run(&config, replay, out)
                .await?
                .check()?;
        }
        None => {
            let runtime = Runtime::new(redis_connector::NAME, config.connector.clone())?;
            redis_connector::run(config, runtime).await?;
        }
    }
    Ok(())
}
