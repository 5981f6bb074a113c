//! The SDK's error type: one variant per step that can fail.

use std::path::PathBuf;

use crate::config::ConfigErrors;

/// Errors of connector-sdk.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The configuration is invalid; each error names its key and origin.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A gateway credential file could not be read.
    #[error("cannot read gateway credentials from {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The drain token file in `secret_mount_path` exists but could not be read.
    #[error("cannot read the drain token from {path}: {source}")]
    DrainTokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The drain token file in `secret_mount_path` is empty: a mistake, not "no token".
    #[error("the drain token file {path} is empty (remove it to turn /drain off)")]
    DrainTokenEmpty {
        /// The file.
        path: PathBuf,
    },
    /// A configured value cannot be sent as an HTTP header.
    #[error("configuration key `{key}` is not a valid HTTP header value")]
    InvalidHeader {
        /// The key.
        key: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    /// A backlog report was not taken by the gateway.
    #[error("reporting the backlog to {url} failed: {reason}")]
    ReportBacklog {
        /// Where it went.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Listing namespaces or functions on the gateway failed.
    #[error("listing functions ({url}) failed: {reason}")]
    ListFunctions {
        /// The `/system/*` path.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The metrics and health server could not listen.
    #[error("cannot listen on metrics_addr {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The KEDA scaler could not listen.
    #[error("cannot listen on scaler_addr {addr}: {source}")]
    ListenScaler {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The OTLP trace exporter could not be set up from the `OTEL_*` variables.
    #[error(transparent)]
    Telemetry(#[from] faas_common::otel::OtelError),
    /// The dispatcher no longer accepts messages (it is shutting down).
    #[error("the dispatcher is closed")]
    DispatcherClosed,
    /// The connector's source failed.
    #[error("source failed: {0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
}
