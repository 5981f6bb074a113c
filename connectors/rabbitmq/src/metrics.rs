//! Queue depth, read with a passive `queue.declare` every `metrics_interval` on a channel
//! of the consumer's connection: `connector_rabbitmq_queue_messages_ready` (messages
//! waiting, not yet delivered to any consumer) and `connector_rabbitmq_queue_consumers`.
//! The ready count is also the SDK's `connector_backlog_messages{topic=<queue>,
//! partition="ready"}`, what an autoscaler reads. Messages delivered and not yet
//! acknowledged are `connector_inflight` in each replica.
//!
//! `connector_rabbitmq_replies_total{result}` counts replies: `published` (confirmed),
//! `unroutable` (confirmed, but no queue took it), `failed` (refused, not confirmed in
//! time, or no connection: the request is held), `hop_limit` (not published).
//!
//! Labels: the queue (one per connector: a bounded set), the reply's result (four).

use std::time::Duration;

use connector_sdk::metrics::Metrics;
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Labels of the queue metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// The queue.
    pub queue: String,
}

/// Labels of the reply counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `published`, `unroutable`, `failed` or `hop_limit`.
    pub result: &'static str,
}

/// `connector_rabbitmq_queue_*` and `connector_rabbitmq_replies_total`.
#[derive(Clone, Debug)]
pub struct RabbitMetrics {
    ready: Family<QueueLabels, Gauge>,
    consumers: Family<QueueLabels, Gauge>,
    replies: Family<ResultLabels, Counter>,
    sdk: Metrics,
}

impl RabbitMetrics {
    /// Registers the metrics in `registry`; the backlog also goes to `sdk`.
    pub fn register(registry: &mut Registry, sdk: Metrics) -> Self {
        let m = Self {
            ready: Family::default(),
            consumers: Family::default(),
            replies: Family::default(),
            sdk,
        };
        registry
            .sub_registry_with_prefix("connector_rabbitmq")
            .register(
                "replies",
                "Replies to requests with reply_to, by result",
                m.replies.clone(),
            );
        let r = registry.sub_registry_with_prefix("connector_rabbitmq_queue");
        r.register(
            "messages_ready",
            "Messages in the queue not yet delivered to a consumer",
            m.ready.clone(),
        );
        r.register(
            "consumers",
            "Consumers of the queue, every replica's",
            m.consumers.clone(),
        );
        m
    }

    /// One reply handled.
    pub fn reply(&self, result: &'static str) {
        self.replies.get_or_create(&ResultLabels { result }).inc();
    }

    /// Records one reading.
    pub fn set(&self, queue: &str, ready: u32, consumers: u32) {
        let labels = QueueLabels {
            queue: queue.to_owned(),
        };
        self.ready.get_or_create(&labels).set(i64::from(ready));
        self.consumers
            .get_or_create(&labels)
            .set(i64::from(consumers));
        self.sdk
            .set_shared_backlog(queue, "ready", u64::from(ready));
    }
}

/// Reads the depth of `queue` every `every` until `stop`; a failed reading opens a new
/// channel next time (a passive declare of a missing queue closes its channel).
pub async fn measure_depth(
    connection: std::sync::Arc<Connection>,
    queue: ShortString,
    every: Duration,
    metrics: RabbitMetrics,
    stop: CancellationToken,
) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut channel: Option<Channel> = None;
    loop {
        let reading = async {
            let ch = match &channel {
                Some(ch) if ch.status().connected() => ch.clone(),
                _ => connection.create_channel().await?,
            };
            channel = Some(ch.clone());
            ch.queue_declare(queue.clone(), passive, FieldTable::default())
                .await
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = tokio::time::timeout(every.max(Duration::from_secs(1)), reading) => match result {
                Ok(Ok(q)) => metrics.set(queue.as_str(), q.message_count(), q.consumer_count()),
                Ok(Err(e)) => tracing::debug!(error = %e, "reading the queue depth failed"),
                Err(_) => tracing::debug!("reading the queue depth timed out"),
            },
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
