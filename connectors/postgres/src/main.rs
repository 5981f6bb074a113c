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

use std::path::PathBuf;

use connector_sdk::Runtime;
use connector_sdk::runtime::init_tracing;

/// Command line.
#[derive(clap::Parser)]
#[command(about = "Delivers PostgreSQL changes and notifications to functions")]
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
    /// Deliver the dead letters again (to the function named in each), deleting each row
    /// from the dead-letter table once delivered.
    Replay(connector_sdk::replay::ReplayArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = postgres_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    if let Some(Command::Replay(replay)) = args.command {
        postgres_connector::replay::run(&config, replay, &mut std::io::stdout())
            .await?
            .check()?;
        return Ok(());
    }
    let runtime = Runtime::new(postgres_connector::NAME, config.connector.clone())?;
    postgres_connector::run(config, runtime).await?;
    Ok(())
}
