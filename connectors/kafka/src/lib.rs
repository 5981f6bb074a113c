//! `kafka-connector` as a library: at-least-once from Kafka topics to functions.
//!
//! A record's offset is committed only once every function subscribed to its topic
//! accepted it, or it was dead-lettered (or dropped by the operator's choice), and only
//! as part of the contiguous prefix of completed offsets of its partition; a record that
//! can be neither holds its partition. See [`source`] for the poll loop, backpressure and
//! the drain on revoke and shutdown.
//!
//! Modules:
//! - [`config`]: `[connector]` + `[kafka]`, OpenFaaS Pro's variable names, librdkafka
//!   properties.
//! - [`record`]: a record as the function sees it (headers, `ce-id`, ordering lanes).
//! - [`offsets`]: the watermark engine.
//! - [`source`]: consuming, pausing, committing, draining.
//! - [`dead_letter`]: the dead-letter topic with provenance.
//! - [`replay`]: `kafka-connector replay`: dead letters back to their functions.
//! - [`reply`]: response bodies to a reply topic, with a hop guard.
//! - [`metrics`]: the `connector_kafka_*` metrics.

pub mod config;
pub mod dead_letter;
pub mod error;
pub mod metrics;
pub mod offsets;
pub mod record;
pub mod replay;
pub mod reply;
pub mod source;

use std::sync::Arc;

use connector_sdk::Runtime;
use rdkafka::producer::FutureProducer;

pub use config::{Config, load};
pub use error::Error;

use dead_letter::KafkaDeadLetters;
use metrics::KafkaMetrics;
use reply::Replies;
use source::{ConnectorContext, KafkaConsumer, Parts, Shared};

/// The binary's name, sent as `X-Connector`.
pub const NAME: &str = "kafka-connector";

/// Builds the Kafka clients (an invalid librdkafka property fails here, named), then
/// runs until SIGTERM/SIGINT or `runtime`'s shutdown token, then drains and commits.
pub async fn run(config: Config, mut runtime: Runtime) -> Result<(), Error> {
    config.validate()?;
    if config.kafka.dead_letter_topic.is_some() {
        // The admin API lists, replays and purges the dead letters as `replay` does, with
        // the replay's default consumer group.
        runtime = runtime.dead_letter_store_with(config.clone(), |c| async move {
            replay::open(&c, &replay::default_group(&c)).await
        });
    }
    let metrics = KafkaMetrics::register(runtime.registry_mut());
    let shared = Shared::new(runtime.metrics().clone());
    let context = ConnectorContext::new(
        shared.clone(),
        metrics.clone(),
        config.kafka.rebalance_drain_timeout,
    );
    let consumer: KafkaConsumer = config
        .consumer_config()
        .create_with_context(context)
        .map_err(|source| Error::CreateClient {
            client: "consumer",
            source,
        })?;
    // Always built: a function's `reply-topic` annotation needs it even when neither a
    // dead-letter nor a default reply topic is configured.
    let producer: FutureProducer =
        config
            .producer_config()
            .create()
            .map_err(|source| Error::CreateClient {
                client: "producer",
                source,
            })?;
    let dead_letters = config.kafka.dead_letter_topic.is_some();
    if let Some(topic) = &config.kafka.dead_letter_topic {
        runtime = runtime.dead_letters(Arc::new(KafkaDeadLetters::new(
            producer.clone(),
            topic.clone(),
            config.kafka.produce_timeout,
        )));
    }
    let consumer = Arc::new(consumer);
    runtime
        .run(|ctx| async move {
            let replies = Arc::new(Replies::new(
                producer,
                config.kafka.reply_topic.clone(),
                config.kafka.reply_max_hops,
                ctx.topics.clone(),
                config.kafka.produce_timeout,
                metrics.clone(),
            ));
            let parts = Parts {
                consumer,
                shared,
                metrics,
                dead_letters,
                replies: Some(replies),
            };
            source::run(ctx, &config, parts).await
        })
        .await?;
    Ok(())
}
