//! The gateway's metrics, with OpenFaaS's names and labels (faasd's Prometheus scrapes
//! them on :8082): `gateway_function_invocation_total{function_name,code}`,
//! `gateway_functions_seconds{function_name,code}`,
//! `gateway_function_invocation_started{function_name}` and
//! `gateway_service_count{function_name}`, plus the async queue's own counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// `function_name` and `code`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// `name.namespace`.
    pub function_name: String,
    /// The HTTP status as text.
    pub code: String,
}

/// `function_name` alone.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    /// `name.namespace`.
    pub function_name: String,
}

/// `outcome` of an async request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `delivered`, `retried`, `dead_letter`, `dropped`.
    pub outcome: &'static str,
}

/// A counter exposed under its exact name, without the `_total` suffix the OpenMetrics
/// encoder adds to counters: OpenFaaS's `gateway_function_invocation_started` has none,
/// and dashboards query it by that name. It is typed `unknown`, which OpenMetrics allows
/// for a sample named like its family.
#[derive(Debug, Clone, Default)]
pub struct PlainCounter(Arc<AtomicU64>);

impl PlainCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl TypedMetric for PlainCounter {
    const TYPE: MetricType = MetricType::Unknown;
}

impl EncodeMetric for PlainCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}

fn seconds_histogram() -> Histogram {
    // Prometheus's default buckets, as OpenFaaS uses.
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Every metric the gateway exposes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `gateway_function_invocation_total`.
    pub invocations: Family<CodeLabels, Counter>,
    /// `gateway_functions_seconds`.
    pub seconds: Family<CodeLabels, Histogram, fn() -> Histogram>,
    /// `gateway_function_invocation_started`.
    pub started: Family<FunctionLabel, PlainCounter>,
    /// `gateway_service_count`, refilled before every scrape.
    pub service_count: Family<FunctionLabel, Gauge>,
    /// Invocations per function, any code: `invocationCount` (not exposed).
    totals: Family<FunctionLabel, Counter>,
    /// `gateway_async_queued_total`.
    pub async_queued: Counter,
    /// `gateway_async_completed_total{outcome}`.
    pub async_outcomes: Family<OutcomeLabel, Counter>,
    /// `gateway_async_callback_failures_total`.
    pub callback_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let invocations = Family::<CodeLabels, Counter>::default();
        let seconds = Family::<CodeLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            seconds_histogram,
        );
        let started = Family::<FunctionLabel, PlainCounter>::default();
        let service_count = Family::<FunctionLabel, Gauge>::default();
        let async_queued = Counter::default();
        let async_outcomes = Family::<OutcomeLabel, Counter>::default();
        let callback_failures = Counter::default();
        registry.register(
            "gateway_function_invocation",
            "Function invocations by status code",
            invocations.clone(),
        );
        registry.register(
            "gateway_functions_seconds",
            "Function invocation time taken",
            seconds.clone(),
        );
        registry.register(
            "gateway_function_invocation_started",
            "Function invocations started",
            started.clone(),
        );
        registry.register(
            "gateway_service_count",
            "Desired replicas per function",
            service_count.clone(),
        );
        registry.register(
            "gateway_async_queued",
            "Requests accepted by /async-function",
            async_queued.clone(),
        );
        registry.register(
            "gateway_async_completed",
            "Queued requests finished, by outcome (retried counts each retry)",
            async_outcomes.clone(),
        );
        registry.register(
            "gateway_async_callback_failures",
            "Callbacks that could not be delivered",
            callback_failures.clone(),
        );
        Self {
            registry,
            invocations,
            seconds,
            started,
            service_count,
            totals: Family::default(),
            async_queued,
            async_outcomes,
            callback_failures,
        }
    }

    /// Counts one finished invocation.
    pub fn observe(&self, function_name: &str, code: u16, seconds: f64) {
        let labels = CodeLabels {
            function_name: function_name.to_owned(),
            code: code.to_string(),
        };
        self.invocations.get_or_create(&labels).inc();
        self.totals
            .get_or_create(&FunctionLabel {
                function_name: function_name.to_owned(),
            })
            .inc();
        self.seconds.get_or_create(&labels).observe(seconds);
    }

    /// Invocations of `function_name` with any code, for `invocationCount`.
    pub fn invocation_count(&self, function_name: &str) -> f64 {
        let label = FunctionLabel {
            function_name: function_name.to_owned(),
        };
        self.totals.get(&label).map_or(0, |c| c.get()) as f64
    }

    /// Replaces the replica gauges.
    pub fn set_service_counts(&self, counts: &[(String, u64)]) {
        self.service_count.clear();
        for (name, replicas) in counts {
            self.service_count
                .get_or_create(&FunctionLabel {
                    function_name: name.clone(),
                })
                .set(i64::try_from(*replicas).unwrap_or(i64::MAX));
        }
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openfaas_names_in_the_exposition() {
        let m = Metrics::new();
        m.started
            .get_or_create(&FunctionLabel {
                function_name: "echo.openfaas-fn".into(),
            })
            .inc();
        m.observe("echo.openfaas-fn", 200, 0.02);
        m.observe("echo.openfaas-fn", 500, 0.02);
        m.set_service_counts(&[("echo.openfaas-fn".into(), 2)]);
        let text = m.encode().unwrap();
        for line in [
            "gateway_function_invocation_total{function_name=\"echo.openfaas-fn\",code=\"200\"} 1",
            "gateway_function_invocation_started{function_name=\"echo.openfaas-fn\"} 1",
            "gateway_service_count{function_name=\"echo.openfaas-fn\"} 2",
            "gateway_functions_seconds_bucket{le=\"0.025\",function_name=\"echo.openfaas-fn\",code=\"200\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert_eq!(m.invocation_count("echo.openfaas-fn"), 2.0);
    }
}
