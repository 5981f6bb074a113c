//! `nats-connector`: delivers NATS messages to the functions subscribed to their subjects.
//!
//! Two modes (`nats.mode`):
//!
//! - `core` (default, as OpenFaaS's nats-connector): queue subscriptions in
//!   `openfaas_nats_worker_group`, at-most-once; request/reply returns the function's
//!   response to the requester. See [`core`].
//! - `jetstream`: durable pull consumers, at-least-once, with acks after completion,
//!   naks with backoff, dead letters with provenance then `+TERM`, and in-progress
//!   reports for long invocations. See [`jetstream`].
//!
//! In both modes function annotations may use NATS wildcards (`orders.*`, `orders.>`),
//! matched as the server matches them ([`subject`]); a message reaches each matching
//! function once. The subscribed subjects are the configured `topics`, else every topic
//! of the topic map, followed without a restart. What a function receives is in
//! [`message`].
//!
//! Modules: [`config`] (`[nats]`, `[jetstream]`), [`connect`] (credentials, TLS,
//! reconnection, readiness), [`subscriptions`] (one task per subject pattern),
//! [`dead_letter`] (the dead-letter subject), [`replay`] (`nats-connector replay`:
//! dead letters back to their functions), [`metrics`] (consumer pending and
//! ack-pending).

pub mod config;
pub mod connect;
pub mod core;
pub mod dead_letter;
pub mod jetstream;
pub mod message;
pub mod metrics;
pub mod replay;
pub mod subject;
pub mod subscriptions;

use std::sync::Arc;

use connector_sdk::{Runtime, pump};

use crate::config::{Config, Mode};
use crate::core::CoreSource;
use crate::dead_letter::NatsDeadLetters;
use crate::jetstream::JetStreamSource;
use crate::metrics::NatsMetrics;

/// The binary's name, sent as `X-Connector`.
pub const NAME: &str = "nats-connector";

/// Why the connector could not run.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server addresses could not be used.
    #[error("connecting to NATS: {0}")]
    Connect(String),
    /// The credentials file could not be read.
    #[error("reading NATS credentials {0}")]
    Credentials(String),
    /// The SDK's harness failed (metrics address taken, a fatal source error, ...).
    #[error(transparent)]
    Sdk(#[from] connector_sdk::SdkError),
    /// `replay` cannot start (no dead-letter subject, no stream captures it).
    #[error("replay: {0}")]
    ReplaySetup(String),
    /// `replay` stopped: reading, removing or keeping a dead letter failed.
    #[error(transparent)]
    Replay(#[from] connector_sdk::replay::ReplayError),
}

/// Runs the connector until SIGTERM or SIGINT (or `runtime`'s shutdown token).
pub async fn run(config: Config, mut runtime: Runtime) -> Result<(), NatsError> {
    if config.nats.mode == Mode::Jetstream && config.jetstream.dead_letter_subject.is_some() {
        // The admin API lists, replays and purges the dead letters as `replay` does.
        runtime = runtime
            .dead_letter_store_with(config.clone(), |c| async move { replay::open(&c).await });
    }
    let sdk_metrics = runtime.metrics().clone();
    let metrics = NatsMetrics::register(runtime.registry_mut(), sdk_metrics);
    let connection = connect::connect(&config.nats).await?;
    let mut runtime = runtime.matcher(subject::matcher());
    if config.nats.mode == Mode::Jetstream
        && let Some(template) = &config.jetstream.dead_letter_subject
    {
        runtime = runtime.dead_letters(Arc::new(NatsDeadLetters::new(
            connection.client.clone(),
            template.clone(),
        )));
    }
    tracing::info!(
        mode = ?config.nats.mode,
        queue_group = %config.nats.queue_group,
        stream = %config.jetstream.stream,
        "nats-connector configured"
    );
    runtime
        .run(|ctx| async move {
            let readiness = tokio::spawn(connection.follow_readiness(ctx.health.clone()));
            let result = match config.nats.mode {
                Mode::Core => {
                    pump(
                        &ctx,
                        CoreSource::new(&config, connection.clone(), ctx.clone()),
                    )
                    .await
                }
                Mode::Jetstream => {
                    let source =
                        JetStreamSource::new(&config, connection.clone(), ctx.clone(), metrics);
                    pump(&ctx, source).await
                }
            };
            readiness.abort();
            if let Err(e) = connection.client.flush().await {
                tracing::debug!(error = %e, "final flush failed");
            }
            result
        })
        .await?;
    Ok(())
}
