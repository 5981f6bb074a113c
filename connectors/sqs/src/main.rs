//! `sqs-connector`: invokes functions for AWS SQS messages.
//!
//! ```text
//! sqs-connector --config config/sqs.toml
//! sqs_queues=orders gateway_url=http://127.0.0.1:8080 sqs-connector
//! sqs-connector --config config/sqs.toml replay --dry-run
//! sqs-connector --config config/sqs.toml replay --limit 10
//! ```

use connector_sdk::Runtime;
use connector_sdk::cli::{ConnectorArgs, ConnectorCommand};
use connector_sdk::runtime::init_tracing;
use sqs_connector::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ConnectorArgs::parse_for(
        sqs_connector::NAME,
        "Invokes the functions subscribed to each SQS message's topic; deletes it once done",
    );
    let config = Config::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    match args.command {
        Some(ConnectorCommand::Replay(replay)) => {
            let out = &mut std::io::stdout();
            sqs_connector::replay::run(&config, replay, out)
                .await?
                .check()?;
        }
        None => {
            let runtime = Runtime::new(sqs_connector::NAME, config.sdk_config())?;
            sqs_connector::run(config, runtime).await?;
        }
    }
    Ok(())
}
