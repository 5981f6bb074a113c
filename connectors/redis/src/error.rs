//! The crate's error type: one variant per step that can fail before or while running.

use connector_sdk::SdkError;
use connector_sdk::config::ConfigErrors;

/// Why the connector could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (every problem, with its key and origin).
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// The Redis URL or credentials could not be turned into a client.
    #[error("invalid Redis connection settings: {0}")]
    Client(#[source] redis::RedisError),
    /// A TLS file could not be read.
    #[error("reading {path}: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The run harness failed (metrics address in use, signals, a fatal source error).
    #[error(transparent)]
    Runtime(#[from] SdkError),
    /// `replay` cannot start (no dead-letter stream, Redis unreachable).
    #[error("replay: {0}")]
    ReplaySetup(String),
    /// `replay` stopped: reading, removing or keeping a dead letter failed.
    #[error(transparent)]
    Replay(#[from] connector_sdk::replay::ReplayError),
}
