//! JetStream consumer metrics, as KEDA's nats-jetstream scaler reads them (its lag is
//! `num_pending + num_ack_pending`), read from the consumer-info API every
//! `jetstream.backlog_interval`. The sum also goes to the SDK's
//! `connector_backlog_messages{topic=<stream>, partition=<consumer>}`.
//!
//! Labels: stream and consumer (one consumer per subscribed subject: a bounded set).

use connector_sdk::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of per-consumer metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The stream.
    pub stream: String,
    /// The durable consumer.
    pub consumer: String,
}

/// `connector_nats_consumer_*`.
#[derive(Clone, Debug, Default)]
pub struct NatsMetrics {
    pending: Family<ConsumerLabels, Gauge>,
    ack_pending: Family<ConsumerLabels, Gauge>,
    redelivered: Family<ConsumerLabels, Gauge>,
    sdk: Option<Metrics>,
}

/// A consumer's counts, as its info reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerCounts {
    /// Messages in the stream not yet delivered to the consumer.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Delivered more than once and not yet acknowledged.
    pub redelivered: u64,
}

impl NatsMetrics {
    /// Registers the metrics in `registry`; the backlog sum also goes to `sdk`.
    pub fn register(registry: &mut Registry, sdk: Metrics) -> Self {
        let m = Self {
            sdk: Some(sdk),
            ..Self::default()
        };
        let r = registry.sub_registry_with_prefix("connector_nats_consumer");
        r.register(
            "pending",
            "Messages in the stream not yet delivered to the consumer (num_pending)",
            m.pending.clone(),
        );
        r.register(
            "ack_pending",
            "Messages delivered and not yet acknowledged (num_ack_pending)",
            m.ack_pending.clone(),
        );
        r.register(
            "redelivered",
            "Messages delivered more than once and not yet acknowledged (num_redelivered)",
            m.redelivered.clone(),
        );
        m
    }

    /// Records one consumer's counts.
    pub fn set(&self, stream: &str, consumer: &str, counts: ConsumerCounts) {
        let labels = ConsumerLabels {
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
        };
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.pending
            .get_or_create(&labels)
            .set(gauge(counts.pending));
        self.ack_pending
            .get_or_create(&labels)
            .set(gauge(counts.ack_pending));
        self.redelivered
            .get_or_create(&labels)
            .set(gauge(counts.redelivered));
        if let Some(sdk) = &self.sdk {
            sdk.set_shared_backlog(
                stream,
                consumer,
                counts.pending.saturating_add(counts.ack_pending),
            );
        }
    }

    /// Forgets a consumer no longer consumed.
    pub fn remove(&self, stream: &str, consumer: &str) {
        let labels = ConsumerLabels {
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
        };
        self.pending.remove(&labels);
        self.ack_pending.remove(&labels);
        self.redelivered.remove(&labels);
        if let Some(sdk) = &self.sdk {
            sdk.remove_backlog(stream, consumer);
        }
    }
}
