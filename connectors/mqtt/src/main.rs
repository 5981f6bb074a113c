//! `mqtt-connector`: delivers MQTT messages to the functions whose `topic` filters match,
//! at least once with QoS 1.
//!
//! ```text
//! mqtt-connector --config config/mqtt.toml
//! gateway_url=http://127.0.0.1:8080 broker=tcp://127.0.0.1:1883 topic='sensors/#' mqtt-connector
//! mqtt-connector --config config/mqtt.toml replay --dry-run
//! ```
//!
//! See `config/mqtt.toml` for every key and its default.

use connector_sdk::Runtime;
use connector_sdk::cli::{ConnectorArgs, ConnectorCommand};
use connector_sdk::runtime::init_tracing;
use mqtt_connector::NAME;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ConnectorArgs::parse_for(NAME, "Delivers MQTT messages to functions");
    let config = mqtt_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    match args.command {
        Some(ConnectorCommand::Replay(replay)) => {
            let out = &mut std::io::stdout();
            mqtt_connector::replay::run(&config, replay, out)
                .await?
                .check()?;
        }
        None => {
            let runtime = Runtime::new(NAME, config.connector.clone())?;
            mqtt_connector::run(config, runtime).await?;
        }
    }
    Ok(())
}
