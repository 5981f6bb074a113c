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

use std::path::PathBuf;

use connector_sdk::Runtime;
use connector_sdk::runtime::init_tracing;

/// Command line.
#[derive(clap::Parser)]
#[command(about = "Delivers MQTT messages to functions")]
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
    /// Deliver the dead letters again (to the function named in each), acknowledging each
    /// once delivered.
    Replay(connector_sdk::replay::ReplayArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = mqtt_connector::load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    if let Some(Command::Replay(replay)) = args.command {
        mqtt_connector::replay::run(&config, replay, &mut std::io::stdout())
            .await?
            .check()?;
        return Ok(());
    }
    let runtime = Runtime::new(mqtt_connector::NAME, config.connector.clone())?;
    mqtt_connector::run(config, runtime).await?;
    Ok(())
}
