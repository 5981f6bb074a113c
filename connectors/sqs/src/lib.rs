//! `sqs-connector`: invokes the functions subscribed to each AWS SQS message's topic, and
//! deletes the message only once every delivery is complete.
//!
//! A message's topic is its queue's name, or the String message attribute named by
//! `sqs.topic_attribute`. Each function receives the body with `X-Topic`, `ce-id` = the
//! SQS message id, and the headers in [`source::headers`]: `X-SQS-Message-ID`,
//! `X-SQS-Queue-URL`, `X-SQS-Receive-Count`, `X-SQS-Message-Group-ID` (FIFO) and
//! `X-SQS-Attr-<name>` per String or Number message attribute. Retries of a message
//! continue across receives: `X-Delivery-Attempt` starts from its receive count.
//!
//! Retries are durable: the dispatcher runs with broker retries, so a failed attempt that
//! may be retried ends its delivery at once, and the message's visibility is set to the
//! backoff delay (ChangeMessageVisibility, at least the function's `Retry-After`, in whole
//! seconds). SQS redelivers it after that delay whether or not this process is still
//! alive, and its receive count carries the attempt number, so `max_attempts` counts
//! across receives and exhaustion still dead-letters. On fan-out (several functions on
//! one topic) the whole message comes back, so a function that already accepted it is
//! invoked again with the same `ce-id`: functions deduplicate on it. A message whose
//! attempts are used up and that cannot be dead-lettered is made visible again after a
//! backoff delay too, so SQS redelivers it and the queue's redrive policy counts the
//! receive.
//!
//! FIFO queues: messages of one MessageGroupId go one after another (the group id is the
//! SDK's ordering key). A message that is retrying or held stops its group: the messages
//! of the group received with it and queued behind it are released (visibility 0) without
//! being delivered, and SQS, which hands out nothing more of a group while a message of it
//! is in flight, delivers them again after it.
//!
//! Modules: [`config`] (`[sqs]`), [`queue`] (client, queue resolution, depth),
//! [`source`] (pollers, settle), [`acker`] (batched deletes, visibility changes,
//! heartbeat), [`dead_letter`] (the explicit dead-letter queue), [`replay`]
//! (`sqs-connector replay`: dead letters back to their functions), [`metrics`]
//! (`connector_sqs_*`).

pub mod acker;
pub mod config;
pub mod dead_letter;
pub mod metrics;
pub mod queue;
pub mod replay;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::Client;
use connector_sdk::{Runtime, SourceContext, pump};
use tokio_util::sync::CancellationToken;

use crate::acker::Acker;
use crate::config::Config;
use crate::dead_letter::QueueSink;
use crate::metrics::SqsMetrics;
use crate::queue::Queue;
use crate::source::{PollSettings, SqsSource};

/// The binary's name, sent as `X-Connector`.
pub const NAME: &str = "sqs-connector";

/// Why the connector could not run.
#[derive(Debug, thiserror::Error)]
pub enum SqsError {
    /// No region in the configuration or the standard chain.
    #[error(
        "no AWS region: set sqs.region (env sqs_region) or AWS_REGION, or a region in the AWS profile"
    )]
    Region,
    /// No usable credentials.
    #[error("{0}")]
    Credentials(String),
    /// A queue is missing or cannot be read.
    #[error("queue `{queue}`: {error}")]
    Queue {
        /// The queue as configured.
        queue: String,
        /// What SQS said.
        error: String,
    },
    /// Consuming failed for good.
    #[error("consuming: {0}")]
    Source(#[from] connector_sdk::SourceError),
    /// The SDK's harness failed (metrics address taken, ...).
    #[error(transparent)]
    Sdk(#[from] connector_sdk::SdkError),
    /// `replay` cannot start (no dead-letter queue configured).
    #[error("replay: {0}")]
    ReplaySetup(String),
    /// `replay` stopped: reading, removing or releasing a dead letter failed.
    #[error(transparent)]
    Replay(#[from] connector_sdk::replay::ReplayError),
}

/// Connects, checks every queue, then runs until SIGTERM or SIGINT (or `runtime`'s
/// shutdown token). `runtime` should be built from [`Config::sdk_config`].
pub async fn run(config: Config, mut runtime: Runtime) -> Result<(), SqsError> {
    if config.sqs.dead_letter_queue.is_some() {
        // The admin API lists, replays and purges the dead letters as `replay` does.
        runtime = runtime
            .dead_letter_store_with(config.clone(), |c| async move { replay::open(&c).await });
    }
    let metrics = SqsMetrics::register(runtime.registry_mut());
    let client = queue::client(&config.sqs).await?;
    let mut queues = Vec::new();
    for spec in &config.sqs.queues {
        let queue = queue::resolve(&client, spec).await?;
        tracing::info!(queue = %queue.name, url = %queue.url, fifo = queue.fifo, "consuming");
        let max_attempts = config.connector.max_attempts;
        if let Some(receives) = queue.max_receive_count()
            && receives < max_attempts
        {
            // Every retry is a receive: SQS moves the message before the connector
            // would dead-letter it with provenance.
            tracing::warn!(queue = %queue.name, max_receive_count = receives, max_attempts, "the queue's redrive policy moves a message after fewer receives than connector.max_attempts: each retry is a receive, so SQS takes failing messages to its dead-letter queue after {receives} attempts, without the connector's provenance");
        }
        queues.push(queue);
    }
    match &config.sqs.dead_letter_queue {
        Some(spec) => {
            let dlq = queue::resolve(&client, spec).await?;
            tracing::info!(queue = %dlq.name, "dead letters go to this queue, with provenance attributes, before the original is deleted");
            runtime = runtime.dead_letters(Arc::new(QueueSink::new(client.clone(), dlq)));
        }
        None => {
            for q in &queues {
                match &q.redrive_policy {
                    Some(policy) => {
                        tracing::info!(queue = %q.name, redrive_policy = %policy, "no sqs.dead_letter_queue: failed messages are left to the queue's redrive policy")
                    }
                    None => {
                        tracing::warn!(queue = %q.name, "no sqs.dead_letter_queue and no redrive policy: a message that fails for good is redelivered until the queue's retention period drops it")
                    }
                }
            }
        }
    }
    let sqs = config.sqs.clone();
    runtime = runtime.broker_retries(true).strict_lanes(true);
    runtime
        .run(|ctx: SourceContext| async move {
            let depth = tokio::spawn(depth_loop(
                client.clone(),
                queues.clone(),
                metrics.clone(),
                ctx.clone(),
                sqs.metrics_interval,
                sqs.topic_attribute.is_some(),
            ));
            let (acker, acker_tasks) = Acker::start(
                client.clone(),
                sqs.visibility_timeout,
                sqs.heartbeat,
                metrics.clone(),
            );
            let source = SqsSource::start(
                client,
                &queues,
                sqs.pollers,
                PollSettings::new(&sqs),
                acker,
                acker_tasks,
                metrics,
                ctx.config.backoff,
                &ctx.shutdown,
            );
            let result = pump(&ctx, source).await;
            depth.abort();
            result.map_err(SqsError::from)
        })
        .await?;
    Ok(())
}

/// Reads each queue's depth every `interval` into `connector_sqs_queue_messages` and the
/// SDK's backlog gauge (visible plus in flight).
async fn depth_loop(
    client: Client,
    queues: Vec<Queue>,
    metrics: SqsMetrics,
    ctx: SourceContext,
    interval: Duration,
    // With `topic_attribute`, a queue carries several topics: its depth counts for every
    // function rather than for the topic named like the queue.
    shared: bool,
) {
    let stop: CancellationToken = ctx.shutdown.clone();
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for q in &queues {
            match queue::depth(&client, &q.url).await {
                Ok(depth) => {
                    metrics.set_depth(&q.name, depth);
                    let messages = depth.visible + depth.in_flight;
                    if shared {
                        ctx.metrics.set_shared_backlog(&q.name, "", messages);
                    } else {
                        ctx.metrics.set_backlog(&q.name, "", messages);
                    }
                }
                Err(e) => {
                    tracing::debug!(queue = %q.name, error = %e, "reading queue depth failed")
                }
            }
        }
    }
}
