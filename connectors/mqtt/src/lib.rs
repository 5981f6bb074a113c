//! `mqtt-connector` as a library: MQTT 3.1.1 or 5 topic filters to functions, at least
//! once with QoS 1, on connector-sdk. The binary is a thin `main` around [`load`] and
//! [`run`]; tests and embedders call them in-process.
//!
//! Modules:
//! - [`config`]: `[connector]` (the SDK's) and `[mqtt]`, with environment variables.
//! - [`link`]: one connection, either protocol version.
//! - [`driver`]: the task that polls a connection and reconnects.
//! - [`message`]: a PUBLISH shaped into a message (headers from user properties, `ce-id`).
//! - [`source`]: subscribe (shared or not), receive, PUBACK once every delivery is terminal.
//! - [`dead_letter`]: dead letters published to a topic, PUBACK awaited.
//! - [`replay`]: `mqtt-connector replay`: dead letters back to their functions.
//! - [`metrics`]: what the connector holds (the backlog MQTT cannot report).
//!
//! Functions subscribe with topic filters (`sensors/+/temp`, `sensors/#`), matched as the
//! broker matches them (`connector_sdk::topic_pattern`): a message reaches each matching
//! function once.

pub mod config;
pub mod dead_letter;
pub mod driver;
pub mod link;
pub mod message;
pub mod metrics;
pub mod replay;
pub mod source;

use std::sync::Arc;

use connector_sdk::topic_pattern::Wildcards;
use connector_sdk::{Runtime, pump};

pub use config::{Config, MqttConfig, Protocol, load};

/// The binary's name, sent as `X-Connector`.
pub const NAME: &str = "mqtt-connector";

/// Why the connector could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or the broker's answer cannot be used as it is.
    #[error("{0}")]
    Setup(String),
    /// The SDK's harness failed (metrics address taken, a fatal source error, ...).
    #[error(transparent)]
    Sdk(#[from] connector_sdk::SdkError),
    /// `replay` stopped: reading or removing a dead letter failed.
    #[error(transparent)]
    Replay(#[from] connector_sdk::replay::ReplayError),
}

/// `ce-source`: `mqtt://host:port` or `mqtts://host:port` (never credentials).
pub fn source_uri(config: &MqttConfig) -> String {
    match config.broker() {
        Ok(b) => format!(
            "{}://{}:{}",
            if b.tls { "mqtts" } else { "mqtt" },
            b.host,
            b.port
        ),
        Err(_) => "mqtt://".to_owned(),
    }
}

/// Whether the function topic `filter` covers the message topic `topic`.
pub fn matches(filter: &str, topic: &str) -> bool {
    Wildcards::MQTT.matches(filter, topic)
}

/// Runs the connector until the runtime's shutdown (SIGTERM/SIGINT, or its token), then
/// drains: in-flight deliveries finish and are acknowledged, the rest stay with the broker.
pub async fn run(config: Config, mut runtime: Runtime) -> Result<(), Error> {
    if !config.mqtt.dead_letter_topic.is_empty() {
        // The admin API lists, replays and purges the dead letters as `replay` does.
        runtime = runtime
            .dead_letter_store_with(config.clone(), |c| async move { replay::open(&c).await });
    }
    let sdk_metrics = runtime.metrics().clone();
    let m = config.mqtt;
    let metrics = metrics::MqttMetrics::register(runtime.registry_mut(), sdk_metrics, &m.client_id);
    let mut runtime = runtime.matcher(connector_sdk::dispatcher::pattern_matcher(matches));
    if m.dead_letter_topic.is_empty() {
        tracing::warn!(
            "no dead_letter_topic: deliveries that fail for good stay unacknowledged until the session resumes (or are dropped with on_exhausted = \"drop\")"
        );
    } else {
        runtime = runtime.dead_letters(Arc::new(dead_letter::TopicDeadLetters::new(&m)));
    }
    tracing::info!(
        broker = %source_uri(&m),
        client_id = %m.client_id,
        qos = m.qos,
        share_group = %m.share_group,
        "mqtt-connector configured"
    );
    runtime
        .run(|ctx| async move {
            let source = source::MqttSource::start(ctx.clone(), m, metrics).await?;
            pump(&ctx, source).await
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_names_no_credentials() {
        let config = MqttConfig {
            broker: "ssl://user:pw@mq.internal".into(),
            ..MqttConfig::default()
        };
        assert_eq!(source_uri(&config), "mqtts://mq.internal:8883");
        assert_eq!(source_uri(&MqttConfig::default()), "mqtt://127.0.0.1:1883");
    }
}
