//! faas-common: what the connectors and the gateway both need, without the connector
//! runtime.
//!
//! connector-sdk re-exports every module here under its old path
//! (`connector_sdk::backoff`, `connector_sdk::verdict`, `connector_sdk::config::load`, ...);
//! the gateway depends on this crate alone, so it links neither the dispatcher, nor the
//! SDK's global allocator, nor its test gateway.
//!
//! Modules:
//! - [`backoff`]: exponential backoff with full jitter, for retries and reconnect loops.
//! - [`verdict`]: what a function's response status means (delivered, retry, drop, dead
//!   letter), the configurable [`StatusClasses`](verdict::StatusClasses), `Retry-After`.
//! - [`config`]: figment layering (defaults, TOML, environment) with errors that name key,
//!   origin and line; [`EnvVar`](config::EnvVar) tables, [`Secret`](config::Secret), and
//!   the `duration`, `flag` and `list` serde helpers.
//! - [`http_client`]: hyper's pooled client with TLS, for invocations and the gateway's
//!   proxy.
//! - [`otel`]: OpenTelemetry traces: the OTLP exporter from the `OTEL_*` variables, W3C
//!   trace context in and out of headers.
//! - [`tls`]: the rustls client configuration (ring, Mozilla roots or a CA file) every
//!   TLS client uses.

pub mod backoff;
pub mod config;
pub mod http_client;
pub mod otel;
pub mod tls;
pub mod verdict;
