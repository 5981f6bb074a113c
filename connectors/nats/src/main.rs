//! `nats-connector`: delivers NATS messages to functions.
//!
//! ```text
//! nats-connector --config config/nats.toml
//! broker_host=nats topics=orders.created gateway_url=http://gateway:8080 nats-connector
//! nats-connector --config config/nats.toml replay --dry-run
//! nats-connector --config config/nats.toml replay --limit 10
//! ```

use connector_sdk::Runtime;
use connector_sdk::cli::{ConnectorArgs, ConnectorCommand};
use connector_sdk::runtime::init_tracing;
use nats_connector::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ConnectorArgs::parse_for(
        nats_connector::NAME,
        "Delivers NATS messages (core or JetStream) to the functions subscribed to their subjects",
    );
    let config = Config::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    match args.command {
        Some(ConnectorCommand::Replay(replay)) => {
            let out = &mut std::io::stdout();
            nats_connector::replay::run(&config, replay, out)
                .await?
                .check()?;
        }
        None => {
            let runtime = Runtime::new(nats_connector::NAME, config.connector.clone())?;
            nats_connector::run(config, runtime).await?;
        }
    }
    Ok(())
}
