//! The gateway's metrics, with OpenFaaS's names and labels (faasd's Prometheus scrapes
//! them on :8082): `gateway_function_invocation_total{function_name,code}`,
//! `gateway_functions_seconds{function_name,code}`,
//! `gateway_function_invocation_started{function_name}` and
//! `gateway_service_count{function_name}`, plus the async queue's own counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

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

/// One function's metric handles, looked up once per request instead of once per metric
/// (each family lookup hashes the labels and allocates them).
#[derive(Debug)]
pub struct FunctionMetrics {
    function_name: String,
    /// `gateway_function_invocation_started{function_name}`.
    pub started: PlainCounter,
    total: Counter,
    /// `(code, invocation_total, seconds)` per status code seen: a handful per function.
    by_code: RwLock<Vec<(u16, Counter, Histogram)>>,
    invocations: Family<CodeLabels, Counter>,
    seconds: Family<CodeLabels, Histogram, fn() -> Histogram>,
}

impl FunctionMetrics {
    /// Counts one finished invocation.
    pub fn observe(&self, code: u16, seconds: f64) {
        self.total.inc();
        {
            let known = self.by_code.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, count, histogram)) = known.iter().find(|(c, ..)| *c == code) {
                count.inc();
                histogram.observe(seconds);
                return;
            }
        }
        let labels = CodeLabels {
            function_name: self.function_name.clone(),
            code: code.to_string(),
        };
        let count = self.invocations.get_or_create(&labels).clone();
        let histogram = self.seconds.get_or_create(&labels).clone();
        count.inc();
        histogram.observe(seconds);
        let mut known = self.by_code.write().unwrap_or_else(PoisonError::into_inner);
        if !known.iter().any(|(c, ..)| *c == code) {
            known.push((code, count, histogram));
        }
    }
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
    /// `gateway_async_queue_requests`, refreshed before every scrape.
    pub async_queue_requests: Gauge,
    /// Each function's handles, by `name.namespace`.
    functions: RwLock<HashMap<String, Arc<FunctionMetrics>>>,
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
        let async_queue_requests = Gauge::default();
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
        registry.register(
            "gateway_async_queue_requests",
            "Requests the embedded queue holds: accepted and not finished, running and retrying included",
            async_queue_requests.clone(),
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
            async_queue_requests,
            functions: RwLock::default(),
        }
    }

    /// The handles of `function_name`'s metrics, created on its first invocation.
    pub fn function(&self, function_name: &str) -> Arc<FunctionMetrics> {
        if let Some(known) = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(function_name)
        {
            return Arc::clone(known);
        }
        let label = FunctionLabel {
            function_name: function_name.to_owned(),
        };
        let created = Arc::new(FunctionMetrics {
            function_name: function_name.to_owned(),
            started: self.started.get_or_create(&label).clone(),
            total: self.totals.get_or_create(&label).clone(),
            by_code: RwLock::default(),
            invocations: self.invocations.clone(),
            seconds: self.seconds.clone(),
        });
        Arc::clone(
            self.functions
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(function_name.to_owned())
                .or_insert(created),
        )
    }

    /// Counts one finished invocation.
    pub fn observe(&self, function_name: &str, code: u16, seconds: f64) {
        self.function(function_name).observe(code, seconds);
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
        m.function("echo.openfaas-fn").started.inc();
        m.observe("echo.openfaas-fn", 200, 0.02);
        // Through cached handles: the same series, not new ones.
        let echo = m.function("echo.openfaas-fn");
        echo.observe(200, 0.5);
        echo.observe(500, 0.02);
        m.set_service_counts(&[("echo.openfaas-fn".into(), 2)]);
        let text = m.encode().unwrap();
        for line in [
            "gateway_function_invocation_total{function_name=\"echo.openfaas-fn\",code=\"200\"} 2",
            "gateway_function_invocation_total{function_name=\"echo.openfaas-fn\",code=\"500\"} 1",
            "gateway_functions_seconds_count{function_name=\"echo.openfaas-fn\",code=\"200\"} 2",
            "gateway_function_invocation_started{function_name=\"echo.openfaas-fn\"} 1",
            "gateway_service_count{function_name=\"echo.openfaas-fn\"} 2",
            "gateway_functions_seconds_bucket{le=\"0.025\",function_name=\"echo.openfaas-fn\",code=\"200\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert_eq!(m.invocation_count("echo.openfaas-fn"), 3.0);
    }
}
