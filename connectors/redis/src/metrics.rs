//! The connector's own metrics, beside the SDK's `connector_*` delivery metrics.
//!
//! Backlog follows KEDA's redis-streams scaler: `pendingEntriesCount` is the group's
//! XPENDING count, `lagCount` the group's `lag` from XINFO GROUPS (Redis 7+). The SDK's
//! `connector_backlog_messages{topic=<stream>}` is their sum: everything the group has not
//! acknowledged. Labels are stream names (the configured or subscribed topics) and a fixed
//! set of operations: bounded.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// Per-stream labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// The stream key.
    pub stream: String,
}

/// Labels of Redis command failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `connect`, `read`, `claim`, `ack`, `release`, `dead_letter`, `measure`, `subscribe`.
    pub operation: &'static str,
}

/// The Redis metrics. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct RedisMetrics {
    pending: Family<StreamLabels, Gauge>,
    lag: Family<StreamLabels, Gauge>,
    oldest_pending_age: Family<StreamLabels, Gauge<f64, AtomicU64>>,
    claimed: Family<StreamLabels, Counter>,
    body_field_missing: Family<StreamLabels, Counter>,
    errors: Family<OperationLabels, Counter>,
}

impl RedisMetrics {
    /// Creates the metrics and registers them as `connector_redis_*` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("connector_redis");
        r.register(
            "pending_entries",
            "Entries delivered to the group and not yet acknowledged (XPENDING), as KEDA's pendingEntriesCount",
            m.pending.clone(),
        );
        r.register(
            "group_lag",
            "Entries not yet delivered to the group (XINFO GROUPS lag), as KEDA's lagCount",
            m.lag.clone(),
        );
        r.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest pending entry, from its id's timestamp",
            Unit::Seconds,
            m.oldest_pending_age.clone(),
        );
        r.register(
            "claimed_entries",
            "Pending entries claimed from idle consumers (XAUTOCLAIM) and delivered again",
            m.claimed.clone(),
        );
        r.register(
            "body_field_missing",
            "Entries without the configured body field, delivered as the whole entry in JSON",
            m.body_field_missing.clone(),
        );
        r.register(
            "errors",
            "Failed Redis operations, by operation",
            m.errors.clone(),
        );
        m
    }

    fn labels(stream: &str) -> StreamLabels {
        StreamLabels {
            stream: stream.to_owned(),
        }
    }

    /// Records one backlog measurement of `stream`.
    pub fn set_backlog(
        &self,
        stream: &str,
        pending: u64,
        lag: Option<u64>,
        oldest_age: Option<f64>,
    ) {
        let l = Self::labels(stream);
        self.pending
            .get_or_create(&l)
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        match lag {
            Some(lag) => {
                self.lag
                    .get_or_create(&l)
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
            None => {
                self.lag.remove(&l);
            }
        }
        self.oldest_pending_age
            .get_or_create(&l)
            .set(oldest_age.unwrap_or(0.0));
    }

    /// Forgets the series of a stream no longer consumed.
    pub fn forget(&self, stream: &str) {
        let l = Self::labels(stream);
        self.pending.remove(&l);
        self.lag.remove(&l);
        self.oldest_pending_age.remove(&l);
    }

    /// `n` entries of `stream` were claimed.
    pub fn claimed(&self, stream: &str, n: usize) {
        self.claimed
            .get_or_create(&Self::labels(stream))
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// An entry of `stream` lacked the body field.
    pub fn body_field_missing(&self, stream: &str) {
        self.body_field_missing
            .get_or_create(&Self::labels(stream))
            .inc();
    }

    /// A Redis operation failed.
    pub fn error(&self, operation: &'static str) {
        self.errors
            .get_or_create(&OperationLabels { operation })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let mut registry = Registry::default();
        let m = RedisMetrics::register(&mut registry);
        m.set_backlog("orders", 3, Some(7), Some(1.5));
        m.claimed("orders", 2);
        m.error("read");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).ok();
        for needle in [
            "connector_redis_pending_entries{stream=\"orders\"} 3",
            "connector_redis_group_lag{stream=\"orders\"} 7",
            "connector_redis_oldest_pending_age_seconds{stream=\"orders\"} 1.5",
            "connector_redis_claimed_entries_total{stream=\"orders\"} 2",
            "connector_redis_errors_total{operation=\"read\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        m.forget("orders");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).ok();
        assert!(!text.contains("pending_entries{stream=\"orders\"}"));
    }
}
