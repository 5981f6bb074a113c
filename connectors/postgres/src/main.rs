//! `postgres-connector`: delivers PostgreSQL row changes (logical replication, at least
//! once) or notifications (LISTEN/NOTIFY, at most once) to the functions subscribed to
//! their topics.
//!
//! ```text
//! postgres-connector --config config/postgres.toml
//! gateway_url=http://127.0.0.1:8080 postgres_url=postgres://postgres@127.0.0.1/app postgres-connector
//! postgres-connector --config config/postgres.toml replay --dry-run
//! ```
//!
//! See `config/postgres.toml` for every key and its default.

use connector_sdk::Runtime;
use connector_sdk::cli::{ConnectorArgs, ConnectorCommand};
use connector_sdk::runtime::init_tracing;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ConnectorArgs::parse_for(
        "postgres-connector",
        "Delivers PostgreSQL changes and notifications to functions",
    );
    let config = postgres_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    if let Some(ConnectorCommand::Replay(replay)) = args.command {
        postgres_connector::replay::run(&config, replay, &mut std::io::stdout())
            .await?
            .check()?;
        return Ok(());
    }
    let runtime = Runtime::new(postgres_connector::NAME, config.connector.clone())?;
    postgres_connector::run(config, runtime).await?;
    Ok(())
}
