//! The SQS connector's own metrics, next to the SDK's `connector_` delivery metrics:
//! queue depth as KEDA's aws-sqs scaler reads it, and the broker calls that settle
//! messages.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::queue::Depth;

/// A broker call that settles or keeps messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckOp {
    /// DeleteMessageBatch after every delivery completed.
    Delete,
    /// Visibility 0: given back at shutdown.
    Release,
    /// Visibility set to a backoff delay: a failed message comes back later.
    RetryLater,
    /// Visibility renewed for a message still in flight.
    Heartbeat,
}

impl AckOp {
    fn as_str(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Release => "release",
            Self::RetryLater => "retry_later",
            Self::Heartbeat => "heartbeat",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AckLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
    state: &'static str,
}

/// `connector_sqs_*`.
#[derive(Clone, Debug, Default)]
pub struct SqsMetrics {
    acks: Family<AckLabels, Counter>,
    messages: Family<QueueLabels, Gauge>,
    receives: Counter,
    received: Counter,
}

impl SqsMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("connector_sqs");
        r.register(
            "acks",
            "Messages settled with the broker, by operation (delete, release, retry_later, \
             heartbeat) and result (ok, error)",
            m.acks.clone(),
        );
        r.register(
            "queue_messages",
            "Messages in each queue by state (visible, in_flight, delayed), as KEDA's aws-sqs \
             scaler reads them",
            m.messages.clone(),
        );
        r.register("receives", "ReceiveMessage calls", m.receives.clone());
        r.register("received", "Messages received", m.received.clone());
        m
    }

    /// Counts `n` messages settled by `op`.
    pub fn acked(&self, op: AckOp, ok: bool, n: u64) {
        self.acks
            .get_or_create(&AckLabels {
                op: op.as_str(),
                result: if ok { "ok" } else { "error" },
            })
            .inc_by(n);
    }

    /// Counts one ReceiveMessage that returned `n` messages.
    pub fn receive(&self, n: u64) {
        self.receives.inc();
        self.received.inc_by(n);
    }

    /// Records `queue`'s depth.
    pub fn set_depth(&self, queue: &str, depth: Depth) {
        for (state, n) in [
            ("visible", depth.visible),
            ("in_flight", depth.in_flight),
            ("delayed", depth.delayed),
        ] {
            self.messages
                .get_or_create(&QueueLabels {
                    queue: queue.to_owned(),
                    state,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}
