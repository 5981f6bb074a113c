//! The Kafka connector's own metrics, beside the SDK's (`connector_backlog_messages` is
//! the lag per partition, `connector_partition_stalled` a held partition). Labels come
//! from bounded sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A result label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok`, `error`, or for replies `published`, `failed`, `hop_limit`.
    pub result: &'static str,
}

/// A rebalance event label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `assign`, `revoke`, `lost` or `error`.
    pub event: &'static str,
}

/// `connector_kafka_*`. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct KafkaMetrics {
    commits: Family<ResultLabels, Counter>,
    rebalances: Family<EventLabels, Counter>,
    replies: Family<ResultLabels, Counter>,
    assigned: Gauge,
    paused: Gauge,
    revoke_drain_timeouts: Counter,
    rewinds: Counter,
}

impl KafkaMetrics {
    /// Creates and registers them under `connector_kafka_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("connector_kafka");
        r.register(
            "commits",
            "Offset commits sent, by result",
            m.commits.clone(),
        );
        r.register(
            "rebalances",
            "Partition assignment changes, by event",
            m.rebalances.clone(),
        );
        r.register(
            "replies",
            "Function responses handled for the reply topic, by result",
            m.replies.clone(),
        );
        r.register(
            "assigned_partitions",
            "Partitions assigned to this replica",
            m.assigned.clone(),
        );
        r.register(
            "paused_partitions",
            "Partitions paused for backpressure or because they hold",
            m.paused.clone(),
        );
        r.register(
            "revoke_drain_timeouts",
            "Revokes whose in-flight deliveries did not finish within rebalance_drain_timeout",
            m.revoke_drain_timeouts.clone(),
        );
        r.register(
            "rewinds",
            "Seeks back to read again records that a fetch after a resume, an assignment or a seek skipped",
            m.rewinds.clone(),
        );
        m
    }

    /// One commit request and its result.
    pub fn committed(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.commits.get_or_create(&ResultLabels { result }).inc();
    }

    /// One rebalance event.
    pub fn rebalance(&self, event: &'static str) {
        self.rebalances.get_or_create(&EventLabels { event }).inc();
    }

    /// One reply handled.
    pub fn reply(&self, result: &'static str) {
        self.replies.get_or_create(&ResultLabels { result }).inc();
    }

    /// The number of assigned partitions.
    pub fn set_assigned(&self, n: usize) {
        self.assigned.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The number of paused partitions.
    pub fn set_paused(&self, n: usize) {
        self.paused.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A partition sought back to read skipped records again.
    pub fn rewound(&self) {
        self.rewinds.inc();
    }

    /// A revoke drain hit its deadline.
    pub fn revoke_drain_timed_out(&self) {
        self.revoke_drain_timeouts.inc();
    }
}
