//! The cron connector's own metrics, next to the SDK's `connector_` delivery metrics.

use std::sync::atomic::AtomicU64;

use connector_sdk::FunctionRef;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// What became of one tick on this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firing {
    /// Invoked and accepted.
    Delivered,
    /// Invoked, and failed for good after its attempts.
    Failed,
    /// Cut short by shutdown (the tick is released to peers, if any).
    Released,
    /// Skipped: the previous run was still going and overlap is forbidden.
    SkippedOverlap,
    /// Skipped: the lease store could not be reached to claim it
    /// (`lock.on_unavailable = "skip"`).
    SkippedLockUnavailable,
    /// Not fired: its time passed while the connector was down or stalled.
    Misfired,
    /// Fired by another replica.
    Peer,
}

impl Firing {
    fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Released => "released",
            Self::SkippedOverlap => "skipped_overlap",
            Self::SkippedLockUnavailable => "skipped_lock_unavailable",
            Self::Misfired => "misfired",
            Self::Peer => "peer",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FiringLabels {
    function: FunctionRef,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function: FunctionRef,
}

/// `connector_cron_*`.
#[derive(Clone, Debug)]
pub struct CronMetrics {
    firings: Family<FiringLabels, Counter>,
    lateness: Histogram,
    misfires: Family<FunctionLabels, Counter>,
    invalid: Gauge,
    scheduled: Gauge,
    next_fire: Family<FunctionLabels, Gauge<f64, AtomicU64>>,
    lock_errors: Counter,
}

impl CronMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            firings: Family::default(),
            // 1 ms .. ~16 s
            lateness: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            misfires: Family::default(),
            invalid: Gauge::default(),
            scheduled: Gauge::default(),
            next_fire: Family::default(),
            lock_errors: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("connector_cron");
        r.register("firings", "Ticks by what became of them", m.firings.clone());
        r.register_with_unit(
            "lateness",
            "Time from a tick's scheduled time to its invocation",
            Unit::Seconds,
            m.lateness.clone(),
        );
        r.register(
            "misfires",
            "Ticks not fired because their time passed while down or stalled",
            m.misfires.clone(),
        );
        r.register(
            "invalid_schedules",
            "Functions whose schedule annotation cannot be used",
            m.invalid.clone(),
        );
        r.register(
            "scheduled_functions",
            "Functions with a valid schedule",
            m.scheduled.clone(),
        );
        r.register_with_unit(
            "next_fire_timestamp",
            "Unix time of each function's next tick",
            Unit::Seconds,
            m.next_fire.clone(),
        );
        r.register(
            "lock_errors",
            "Failed calls to the tick lease store (claiming, watching, finishing ticks), Redis unreachable included",
            m.lock_errors.clone(),
        );
        m
    }

    pub(crate) fn firing(&self, function: &FunctionRef, outcome: Firing) {
        self.firings
            .get_or_create(&FiringLabels {
                function: function.clone(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub(crate) fn lateness(&self, seconds: f64) {
        self.lateness.observe(seconds.max(0.0));
    }

    pub(crate) fn misfired(&self, function: &FunctionRef, ticks: u64) {
        if ticks > 0 {
            self.misfires
                .get_or_create(&FunctionLabels {
                    function: function.clone(),
                })
                .inc_by(ticks);
            self.firings
                .get_or_create(&FiringLabels {
                    function: function.clone(),
                    outcome: Firing::Misfired.as_str(),
                })
                .inc_by(ticks);
        }
    }

    pub(crate) fn set_counts(&self, scheduled: usize, invalid: usize) {
        self.scheduled
            .set(i64::try_from(scheduled).unwrap_or(i64::MAX));
        self.invalid.set(i64::try_from(invalid).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_next(&self, function: &FunctionRef, unix_seconds: f64) {
        self.next_fire
            .get_or_create(&FunctionLabels {
                function: function.clone(),
            })
            .set(unix_seconds);
    }

    pub(crate) fn forget(&self, function: &FunctionRef) {
        self.next_fire.remove(&FunctionLabels {
            function: function.clone(),
        });
    }

    pub(crate) fn lock_error(&self) {
        self.lock_errors.inc();
    }
}
