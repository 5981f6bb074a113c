//! The crate's error type: one variant per step that can fail.

use connector_sdk::SdkError;
use connector_sdk::config::ConfigErrors;
use rdkafka::error::KafkaError;

/// What stopped the connector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (key and origin named).
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// librdkafka refused the configuration: its message names the property.
    #[error("creating the Kafka {client} failed: {source}")]
    CreateClient {
        /// `consumer` or `producer`.
        client: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// Subscribing to the topics failed.
    #[error("subscribing to {topics:?} failed: {source}")]
    Subscribe {
        /// The topics.
        topics: Vec<String>,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The SDK's harness failed (metrics address in use, signals).
    #[error(transparent)]
    Runtime(#[from] SdkError),
    /// `replay` cannot start (no dead-letter topic, the topic or its offsets unreadable).
    #[error("replay: {0}")]
    ReplaySetup(String),
    /// `replay` stopped: reading, removing or keeping a dead letter failed.
    #[error(transparent)]
    Replay(#[from] connector_sdk::replay::ReplayError),
}
