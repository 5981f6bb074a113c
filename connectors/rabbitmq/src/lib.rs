//! `rabbitmq-connector` as a library: a RabbitMQ queue (AMQP 0-9-1) to functions, at least
//! once, on connector-sdk. The binary is a thin `main` around [`load`] and [`run`]; tests
//! and embedders call them in-process.
//!
//! Modules:
//! - [`config`]: `[connector]` (the SDK's) and `[rabbitmq]`, with environment variables.
//! - [`delivery`]: an AMQP delivery shaped into a message (headers, `ce-id`, delivery
//!   count); topic-exchange pattern matching for the functions' `topic` annotations.
//! - [`source`]: declare, bind, consume with prefetch, ack / requeue per disposition.
//! - [`dead_letter`]: dead letters published to an exchange with publisher confirms.
//! - [`reply`]: responses to requests with `reply_to` (AMQP RPC), confirmed before the
//!   request is acknowledged.
//! - [`publish`]: publishing with publisher confirms, for both.
//! - [`replay`]: `rabbitmq-connector replay`: dead letters back to their functions.
//! - [`metrics`]: queue depth (`connector_rabbitmq_queue_*`, the backlog).
//!
//! Functions subscribe with routing keys or topic-exchange patterns (`orders.*`,
//! `orders.#`), matched as the broker matches them: a message reaches each matching
//! function once.

pub mod config;
pub mod dead_letter;
pub mod delivery;
pub mod metrics;
pub mod publish;
pub mod replay;
pub mod reply;
pub mod source;

use std::sync::Arc;

use connector_sdk::{Runtime, pump};
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPScheme;
use lapin::{Connection, ConnectionProperties};

pub use config::{Config, QueueType, RabbitConfig, load};

/// The binary's name, sent as `X-Connector`.
pub const NAME: &str = "rabbitmq-connector";

/// Why the connector could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot be used as it is (checked before connecting).
    #[error("{0}")]
    Setup(String),
    /// The TLS CA file could not be read.
    #[error("reading {path}: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the broker failed.
    #[error("connecting to RabbitMQ: {0}")]
    Connect(#[source] lapin::Error),
    /// Connecting took longer than `command_timeout`.
    #[error("connecting to RabbitMQ: no answer within {0:?}")]
    ConnectTimeout(std::time::Duration),
    /// The SDK's harness failed (metrics address taken, a fatal source error, ...).
    #[error(transparent)]
    Sdk(#[from] connector_sdk::SdkError),
    /// `replay` stopped: reading, removing or keeping a dead letter failed.
    #[error(transparent)]
    Replay(#[from] connector_sdk::replay::ReplayError),
}

/// `ce-source`: `amqp://host:port/vhost` (never credentials).
pub fn source_uri(config: &RabbitConfig) -> String {
    match config.uri() {
        Ok(uri) => {
            let scheme = match uri.scheme {
                AMQPScheme::AMQPS => "amqps",
                AMQPScheme::AMQP => "amqp",
            };
            format!(
                "{scheme}://{}:{}/{}",
                uri.authority.host, uri.authority.port, uri.vhost
            )
        }
        Err(_) => "amqp://".to_owned(),
    }
}

/// A new connection to the broker, named `rabbitmq-connector (<purpose>)` in the
/// management UI, within `command_timeout`.
pub async fn connect(config: &RabbitConfig, purpose: &str) -> Result<Connection, Error> {
    let uri = config.uri().map_err(Error::Setup)?;
    let tls = match &config.tls_ca_file {
        Some(path) => OwnedTLSConfig {
            identity: None,
            cert_chain: Some(
                std::fs::read_to_string(path).map_err(|source| Error::TlsFile {
                    path: path.display().to_string(),
                    source,
                })?,
            ),
        },
        None => OwnedTLSConfig::default(),
    };
    let properties =
        ConnectionProperties::default().with_connection_name(format!("{NAME} ({purpose})").into());
    let runtime = lapin::runtime::default_runtime().map_err(Error::Connect)?;
    let connecting = Connection::connect_uri_with_config(uri, properties, tls, runtime);
    match tokio::time::timeout(config.command_timeout, connecting).await {
        Ok(result) => result.map_err(Error::Connect),
        Err(_) => Err(Error::ConnectTimeout(config.command_timeout)),
    }
}

/// Runs the connector until the runtime's shutdown (SIGTERM/SIGINT, or its token), then
/// drains: in-flight deliveries finish and are acknowledged, the rest are requeued.
pub async fn run(config: Config, mut runtime: Runtime) -> Result<(), Error> {
    if !config.rabbitmq.dead_letter_exchange.is_empty() {
        // The admin API lists, replays and purges the dead letters as `replay` does.
        runtime = runtime
            .dead_letter_store_with(config.clone(), |c| async move { replay::open(&c).await });
    }
    let sdk_metrics = runtime.metrics().clone();
    let metrics = metrics::RabbitMetrics::register(runtime.registry_mut(), sdk_metrics);
    let r = config.rabbitmq;
    let mut runtime = runtime.matcher(connector_sdk::dispatcher::pattern_matcher(|p, t| {
        connector_sdk::topic_pattern::Wildcards::AMQP.matches(p, t)
    }));
    if r.dead_letter_exchange.is_empty() {
        tracing::warn!(
            "no dead_letter_exchange: deliveries that fail for good are requeued after hold_delay (or dropped with on_exhausted = \"drop\")"
        );
    } else {
        runtime = runtime.dead_letters(Arc::new(dead_letter::ExchangeDeadLetters::new(&r)?));
    }
    let replies = if r.reply {
        Some(Arc::new(reply::Replies::new(&r, metrics.clone())?))
    } else {
        None
    };
    tracing::info!(
        queue = %r.queue,
        exchange = %r.exchange,
        queue_type = r.queue_type.as_str(),
        reply = r.reply,
        source = %source_uri(&r),
        "rabbitmq-connector configured"
    );
    runtime
        .run(|ctx| async move {
            let mut source = source::RabbitSource::new(ctx.clone(), r, metrics, replies)
                .map_err(connector_sdk::SourceError::fatal)?;
            source.connect().await?;
            pump(&ctx, source).await
        })
        .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use connector_sdk::config::Secret;

    #[test]
    fn the_source_names_no_credentials() {
        let config = RabbitConfig {
            url: "amqps://user:pw@mq.internal:5671/prod".into(),
            password: Some(Secret::new("other")),
            ..RabbitConfig::default()
        };
        assert_eq!(source_uri(&config), "amqps://mq.internal:5671/prod");
        assert_eq!(
            source_uri(&RabbitConfig::default()),
            "amqp://127.0.0.1:5672//"
        );
    }
}
