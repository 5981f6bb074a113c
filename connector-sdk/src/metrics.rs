//! The `connector_` metrics, served as Prometheus text on `/metrics`.
//!
//! Labels come from bounded sets only: function names (one per deployed function), topic
//! and partition names, outcome and status classes. Never message keys or error text.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::function::FunctionRef;
use crate::message::DeliveryOutcome;

/// Labels of per-function metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    /// `name` or `name.namespace`.
    pub function: FunctionRef,
}

/// Labels of delivery outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `name` or `name.namespace`.
    pub function: FunctionRef,
    /// `delivered`, `dead_lettered`, `dropped`, `held`, `released` or `retry` (handed back to
    /// the broker for a retry, with broker retries).
    pub outcome: &'static str,
}

/// Labels of invocation attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvocationLabels {
    /// `name` or `name.namespace`.
    pub function: FunctionRef,
    /// `2xx`, `3xx`, `4xx`, `5xx`, `timeout` or `error`.
    pub status: &'static str,
}

/// Labels of message outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// `ack`, `hold`, `release`, `retry` (broker retries), `unmatched` (no subscriber,
    /// acknowledged) or `unmatched_held` (no subscriber, held).
    pub outcome: &'static str,
}

/// Labels of per-partition source metrics; `partition` is empty where the source has none.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// Topic, stream, queue or subject.
    pub topic: String,
    /// Partition, or empty.
    pub partition: String,
}

/// Labels of withheld source headers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeaderLabels {
    /// The rule that withheld it: a lowercase header name, or `proxy-*`, `x-forwarded-*`,
    /// `ce-*` (see [`crate::source_headers`]); a fixed set.
    pub header: &'static str,
}

/// Labels of topic-map rebuilds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// The status classes of `connector_invocations_total`, in [`FunctionSeries`] order.
const STATUS_CLASSES: [&str; 7] = ["2xx", "3xx", "4xx", "5xx", "other", "timeout", "error"];

/// How many outcomes `connector_deliveries_total` has (see `delivery_finished`).
const DELIVERY_OUTCOMES: usize = 7;

/// The message outcomes of `connector_messages_total`.
const MESSAGE_OUTCOMES: [&str; 5] = ["ack", "hold", "release", "retry", "unmatched"];

/// One function's handles on the per-delivery series, each taken from its family the first
/// time it is used (so a series appears when it first counts, as with the families alone).
/// Every delivery updates three series; through the families that is three label hashes
/// and three reads of a lock both runtime threads contend for.
#[derive(Default)]
struct FunctionSeries {
    invocations: [OnceLock<Counter>; STATUS_CLASSES.len()],
    duration: OnceLock<Histogram>,
    deliveries: [OnceLock<Counter>; DELIVERY_OUTCOMES],
    attempting: OnceLock<Gauge>,
    retrying: OnceLock<Gauge>,
}

// FxHash: looked up twice per delivery; the keys are the operator's function names.
type SeriesMap = HashMap<FunctionRef, Arc<FunctionSeries>, rustc_hash::FxBuildHasher>;

/// The SDK's metrics. Cheap to clone; every clone updates the same series.
#[derive(Clone)]
pub struct Metrics {
    deliveries: Family<DeliveryLabels, Counter>,
    invocations: Family<InvocationLabels, Counter>,
    invocation_duration: Family<FunctionLabels, Histogram>,
    inflight: Gauge,
    /// Per function: deliveries under way, attempting now or waiting out a backoff.
    attempting: Family<FunctionLabels, Gauge>,
    retrying: Family<FunctionLabels, Gauge>,
    retries: Family<FunctionLabels, Counter>,
    dead_letters: Family<FunctionLabels, Counter>,
    dead_letter_failures: Family<FunctionLabels, Counter>,
    filter_errors: Family<FunctionLabels, Counter>,
    messages: Family<MessageLabels, Counter>,
    backlog: Family<PartitionLabels, Gauge>,
    /// Per function: what waits for it (see [`crate::backlog`]), set at scrape time.
    function_backlog: Family<FunctionLabels, Gauge>,
    backlogs: Arc<crate::backlog::Backlogs>,
    stalled: Family<PartitionLabels, Gauge>,
    topic_map_topics: Gauge,
    topic_map_functions: Gauge,
    topic_map_rebuilds: Family<ResultLabels, Counter>,
    topic_map_last_success: Gauge<f64, AtomicU64>,
    topic_map_age: Gauge<f64, AtomicU64>,
    responses_dropped: Counter,
    source_headers_withheld: Family<HeaderLabels, Counter>,
    ready: Gauge,
    draining: Gauge,
    /// Read on every delivery, written once per new function.
    functions: Arc<arc_swap::ArcSwap<SeriesMap>>,
    message_outcomes: Arc<[OnceLock<Counter>; MESSAGE_OUTCOMES.len()]>,
    /// `1` per function whose subscription is skipped for an unusable annotation.
    subscription_invalid: Family<FunctionLabels, Gauge>,
    /// Topics whose messages were held for want of a subscriber, with when last.
    held_unmatched: Arc<std::sync::Mutex<std::collections::BTreeMap<String, std::time::Instant>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("functions", &self.functions.load().len())
            .finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    // 5 ms .. ~82 s: function calls range from no-ops to long batch jobs.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` (whose prefix should be empty:
    /// names here carry `connector_`). `connector` and the SDK version go into
    /// `connector_info`.
    pub fn register(registry: &mut Registry, connector: &str) -> Self {
        let m = Self {
            deliveries: Family::default(),
            invocations: Family::default(),
            invocation_duration: Family::new_with_constructor(duration_histogram),
            inflight: Gauge::default(),
            attempting: Family::default(),
            retrying: Family::default(),
            retries: Family::default(),
            dead_letters: Family::default(),
            dead_letter_failures: Family::default(),
            filter_errors: Family::default(),
            messages: Family::default(),
            backlog: Family::default(),
            function_backlog: Family::default(),
            backlogs: Arc::default(),
            stalled: Family::default(),
            topic_map_topics: Gauge::default(),
            topic_map_functions: Gauge::default(),
            topic_map_rebuilds: Family::default(),
            topic_map_last_success: Gauge::default(),
            topic_map_age: Gauge::default(),
            responses_dropped: Counter::default(),
            source_headers_withheld: Family::default(),
            ready: Gauge::default(),
            draining: Gauge::default(),
            functions: Arc::default(),
            message_outcomes: Arc::default(),
            held_unmatched: Arc::default(),
            subscription_invalid: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("connector");
        let info = prometheus_client::metrics::info::Info::new(vec![
            ("connector".to_owned(), connector.to_owned()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ]);
        r.register("build", "Connector name and SDK version", info);
        r.register(
            "deliveries",
            "Deliveries (message x function) finished, by outcome",
            m.deliveries.clone(),
        );
        r.register(
            "invocations",
            "Invocation attempts, by response status class",
            m.invocations.clone(),
        );
        r.register_with_unit(
            "invocation_duration",
            "Duration of one invocation attempt",
            Unit::Seconds,
            m.invocation_duration.clone(),
        );
        r.register(
            "subscription_invalid",
            "1 for a function whose subscription is skipped because an annotation's value cannot be used",
            m.subscription_invalid.clone(),
        );
        r.register(
            "inflight_deliveries",
            "Deliveries not yet finished, retries waiting included",
            m.inflight.clone(),
        );
        r.register(
            "function_attempting_deliveries",
            "The function's deliveries under way that are not waiting out a backoff: waiting for the function's concurrency limit, calling it, or in a batch",
            m.attempting.clone(),
        );
        r.register(
            "function_retrying_deliveries",
            "The function's deliveries waiting out a backoff before their next attempt",
            m.retrying.clone(),
        );
        r.register(
            "retries",
            "Attempts that will be retried",
            m.retries.clone(),
        );
        r.register(
            "dead_letters",
            "Deliveries written to the dead-letter destination",
            m.dead_letters.clone(),
        );
        r.register(
            "dead_letter_write_failures",
            "Failed writes to the dead-letter destination",
            m.dead_letter_failures.clone(),
        );
        r.register(
            "filter_errors",
            "Messages a function's filter failed on (dead-lettered with reason filter_failed)",
            m.filter_errors.clone(),
        );
        r.register(
            "messages",
            "Messages completed, by what the source does with them",
            m.messages.clone(),
        );
        r.register(
            "backlog_messages",
            "Messages waiting at the source (Kafka lag, Redis pending, SQS visible + in flight, JetStream pending + ack pending)",
            m.backlog.clone(),
        );
        r.register(
            "function_backlog_messages",
            "Messages waiting for the function: the broker backlog of its topics plus the messages the connector holds for it (queued, in flight, retrying, batched)",
            m.function_backlog.clone(),
        );
        r.register(
            "partition_stalled",
            "1 while a partition or stream holds at a message that could not be completed",
            m.stalled.clone(),
        );
        r.register(
            "topic_map_topics",
            "Topics in the current topic map",
            m.topic_map_topics.clone(),
        );
        r.register(
            "topic_map_functions",
            "Functions with at least one topic in the current topic map",
            m.topic_map_functions.clone(),
        );
        r.register(
            "topic_map_rebuilds",
            "Topic map rebuilds, by result",
            m.topic_map_rebuilds.clone(),
        );
        r.register_with_unit(
            "topic_map_last_success_timestamp",
            "Unix time of the last successful topic map build",
            Unit::Seconds,
            m.topic_map_last_success.clone(),
        );
        r.register_with_unit(
            "topic_map_age",
            "Time since the last successful topic map build",
            Unit::Seconds,
            m.topic_map_age.clone(),
        );
        r.register(
            "response_subscriber_dropped",
            "Invocation results not passed to a response subscriber because its buffer was full",
            m.responses_dropped.clone(),
        );
        r.register(
            "source_headers_withheld",
            "Message headers not forwarded to an invocation attempt because they could change the HTTP exchange or impersonate the connector, by rule",
            m.source_headers_withheld.clone(),
        );
        r.register("ready", "1 when /readyz answers 200", m.ready.clone());
        r.register(
            "draining",
            "1 while shutting down and draining in-flight deliveries",
            m.draining.clone(),
        );
        m
    }

    /// A registry holding only fresh SDK metrics: for tests and benchmarks.
    pub fn standalone(connector: &str) -> (Self, Registry) {
        let mut registry = Registry::default();
        let m = Self::register(&mut registry, connector);
        (m, registry)
    }

    /// Runs `f` with `function`'s series, creating them the first time.
    fn with_series<R>(&self, function: &FunctionRef, f: impl FnOnce(&FunctionSeries) -> R) -> R {
        if let Some(series) = self.functions.load().get(function) {
            return f(series);
        }
        self.functions.rcu(|map| {
            let mut map = SeriesMap::clone(map);
            map.entry(function.clone()).or_default();
            map
        });
        match self.functions.load().get(function) {
            Some(series) => f(series),
            None => f(&FunctionSeries::default()),
        }
    }

    pub(crate) fn delivery_finished(&self, function: &FunctionRef, outcome: DeliveryOutcome) {
        let index = match outcome {
            DeliveryOutcome::Delivered => 0,
            DeliveryOutcome::DeadLettered => 1,
            DeliveryOutcome::Dropped => 2,
            DeliveryOutcome::Held => 3,
            DeliveryOutcome::Released => 4,
            DeliveryOutcome::Retry { .. } => 5,
            DeliveryOutcome::Filtered => 6,
        };
        self.with_series(function, |series| {
            series.deliveries[index]
                .get_or_init(|| {
                    self.deliveries
                        .get_or_create(&DeliveryLabels {
                            function: function.clone(),
                            outcome: outcome.as_str(),
                        })
                        .clone()
                })
                .inc();
        });
        if outcome == DeliveryOutcome::DeadLettered {
            self.dead_letters.get_or_create(&fn_labels(function)).inc();
        }
    }

    pub(crate) fn invoked(&self, function: &FunctionRef, status: &'static str, took: Duration) {
        let Some(index) = STATUS_CLASSES.iter().position(|c| *c == status) else {
            self.invocations
                .get_or_create(&InvocationLabels {
                    function: function.clone(),
                    status,
                })
                .inc();
            return;
        };
        self.with_series(function, |series| {
            series.invocations[index]
                .get_or_init(|| {
                    self.invocations
                        .get_or_create(&InvocationLabels {
                            function: function.clone(),
                            status,
                        })
                        .clone()
                })
                .inc();
            series
                .duration
                .get_or_init(|| {
                    self.invocation_duration
                        .get_or_create(&fn_labels(function))
                        .clone()
                })
                .observe(took.as_secs_f64());
        });
    }

    /// How many of `function`'s deliveries ended as `outcome` (a [`DeliveryOutcome`]
    /// name) so far.
    pub fn deliveries_of(&self, function: &FunctionRef, outcome: &'static str) -> u64 {
        self.deliveries
            .get(&DeliveryLabels {
                function: function.clone(),
                outcome,
            })
            .map_or(0, |c| c.get())
    }

    /// How many of `function`'s attempts failed and were retried so far.
    pub fn retries_of(&self, function: &FunctionRef) -> u64 {
        self.retries
            .get(&fn_labels(function))
            .map_or(0, |c| c.get())
    }

    pub(crate) fn retried(&self, function: &FunctionRef) {
        self.retries.get_or_create(&fn_labels(function)).inc();
    }

    pub(crate) fn dead_letter_failed(&self, function: &FunctionRef) {
        self.dead_letter_failures
            .get_or_create(&fn_labels(function))
            .inc();
    }

    pub(crate) fn filter_failed(&self, function: &FunctionRef) {
        self.filter_errors.get_or_create(&fn_labels(function)).inc();
    }

    pub(crate) fn message_finished(&self, outcome: &'static str) {
        let counter = || {
            self.messages
                .get_or_create(&MessageLabels { outcome })
                .clone()
        };
        match MESSAGE_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(index) => self.message_outcomes[index].get_or_init(counter).inc(),
            None => counter().inc(),
        };
    }

    /// The functions whose subscriptions are skipped now; the others' series are removed.
    pub(crate) fn set_invalid_subscriptions<'a>(
        &self,
        functions: impl Iterator<Item = &'a FunctionRef>,
    ) {
        self.subscription_invalid.clear();
        for function in functions {
            self.subscription_invalid
                .get_or_create(&fn_labels(function))
                .set(1);
        }
    }

    /// A message of `topic` was held because no function subscribes to it.
    pub(crate) fn held_unmatched(&self, topic: &str) {
        self.message_finished("unmatched_held");
        let mut held = self
            .held_unmatched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        match held.get_mut(topic) {
            Some(at) => *at = now,
            None => {
                held.insert(topic.to_owned(), now);
            }
        }
    }

    /// Topics a message was held for want of a subscriber within the last `within`.
    pub fn held_unmatched_topics(&self, within: std::time::Duration) -> Vec<String> {
        let mut held = self
            .held_unmatched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.retain(|_, at| at.elapsed() <= within);
        held.keys().cloned().collect()
    }

    /// Deliveries not yet finished, retries waiting included.
    pub fn inflight(&self) -> i64 {
        self.inflight.get()
    }

    /// Counts a delivery of `function` under way (attempting) until the guard is dropped.
    pub(crate) fn under_way(&self, function: &FunctionRef) -> UnderWay {
        let (attempting, retrying) = self.with_series(function, |series| {
            let gauge = |cell: &OnceLock<Gauge>, family: &Family<FunctionLabels, Gauge>| {
                cell.get_or_init(|| family.get_or_create(&fn_labels(function)).clone())
                    .clone()
            };
            (
                gauge(&series.attempting, &self.attempting),
                gauge(&series.retrying, &self.retrying),
            )
        });
        self.inflight.inc();
        attempting.inc();
        UnderWay {
            all: self.inflight.clone(),
            attempting,
            retrying,
            waiting: false,
        }
    }

    /// `function`'s deliveries under way now: (attempting, waiting out a backoff).
    pub fn under_way_of(&self, function: &FunctionRef) -> (i64, i64) {
        let labels = fn_labels(function);
        let get =
            |family: &Family<FunctionLabels, Gauge>| family.get(&labels).map_or(0, |g| g.get());
        (get(&self.attempting), get(&self.retrying))
    }

    pub(crate) fn response_dropped(&self) {
        self.responses_dropped.inc();
    }

    pub(crate) fn source_header_withheld(&self, rule: &'static str) {
        self.source_headers_withheld
            .get_or_create(&HeaderLabels { header: rule })
            .inc();
    }

    pub(crate) fn topic_map_rebuilt(&self, topics: usize, functions: usize) {
        self.topic_map_topics
            .set(i64::try_from(topics).unwrap_or(i64::MAX));
        self.topic_map_functions
            .set(i64::try_from(functions).unwrap_or(i64::MAX));
        self.topic_map_rebuilds
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.topic_map_last_success.set(now.as_secs_f64());
    }

    pub(crate) fn topic_map_failed(&self) {
        self.topic_map_rebuilds
            .get_or_create(&ResultLabels { result: "error" })
            .inc();
    }

    /// Refreshes values computed at scrape time (the topic map's age).
    pub(crate) fn before_scrape(&self) {
        let last = self.topic_map_last_success.get();
        if last > 0.0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            self.topic_map_age.set((now - last).max(0.0));
        }
        // Functions that are gone lose their series.
        self.function_backlog.clear();
        for (function, messages) in self.backlogs.snapshot() {
            self.function_backlog
                .get_or_create(&fn_labels(&function))
                .set(i64::try_from(messages).unwrap_or(i64::MAX));
        }
    }

    /// The per-function backlog's state, shared with the KEDA scaler.
    pub fn backlogs(&self) -> &Arc<crate::backlog::Backlogs> {
        &self.backlogs
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }

    /// Sets the backlog of one topic (and partition, or `""`): Kafka lag, Redis pending,
    /// SQS visible plus in flight, JetStream pending plus ack pending.
    /// The topic's backlog counts for each function subscribed to it (matched as the
    /// connector matches a message's topic).
    pub fn set_backlog(&self, topic: &str, partition: &str, messages: u64) {
        self.record_backlog(topic, partition, messages, false);
    }

    /// Sets a backlog the broker counts per stream, queue, session or slot rather than per
    /// topic (`topic` names that stream or queue): it counts for every function the
    /// connector serves. Exported as `connector_backlog_messages` like the others.
    pub fn set_shared_backlog(&self, stream: &str, partition: &str, messages: u64) {
        self.record_backlog(stream, partition, messages, true);
    }

    /// Sets a backlog series that only counts what the connector itself holds (MQTT and
    /// PostgreSQL, whose brokers cannot count what waits): exported as
    /// `connector_backlog_messages`, not added to function backlogs, which count held
    /// messages per function already.
    pub fn set_held_backlog(&self, topic: &str, partition: &str, messages: u64) {
        self.backlog
            .get_or_create(&PartitionLabels {
                topic: topic.to_owned(),
                partition: partition.to_owned(),
            })
            .set(i64::try_from(messages).unwrap_or(i64::MAX));
    }

    fn record_backlog(&self, topic: &str, partition: &str, messages: u64, shared: bool) {
        self.backlogs.set_source(
            topic,
            partition,
            crate::backlog::SourceBacklog { messages, shared },
        );
        self.backlog
            .get_or_create(&PartitionLabels {
                topic: topic.to_owned(),
                partition: partition.to_owned(),
            })
            .set(i64::try_from(messages).unwrap_or(i64::MAX));
    }

    /// Forgets a topic's backlog series (partition revoked, topic unsubscribed).
    pub fn remove_backlog(&self, topic: &str, partition: &str) {
        self.backlogs.remove_source(topic, partition);
        self.backlog.remove(&PartitionLabels {
            topic: topic.to_owned(),
            partition: partition.to_owned(),
        });
    }

    /// Marks a partition (or stream) stalled or flowing.
    pub fn set_stalled(&self, topic: &str, partition: &str, stalled: bool) {
        self.stalled
            .get_or_create(&PartitionLabels {
                topic: topic.to_owned(),
                partition: partition.to_owned(),
            })
            .set(i64::from(stalled));
    }
}

/// A delivery under way, counted in `connector_inflight_deliveries` and in its function's
/// attempting or retrying gauge until dropped.
pub(crate) struct UnderWay {
    all: Gauge,
    attempting: Gauge,
    retrying: Gauge,
    waiting: bool,
}

impl UnderWay {
    /// The delivery waits out a backoff (`true`) or attempts again (`false`).
    pub(crate) fn set_waiting(&mut self, waiting: bool) {
        if waiting != self.waiting {
            let (from, to) = if waiting {
                (&self.attempting, &self.retrying)
            } else {
                (&self.retrying, &self.attempting)
            };
            from.dec();
            to.inc();
            self.waiting = waiting;
        }
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.all.dec();
        if self.waiting {
            self.retrying.dec();
        } else {
            self.attempting.dec();
        }
    }
}

fn fn_labels(function: &FunctionRef) -> FunctionLabels {
    FunctionLabels {
        function: function.clone(),
    }
}

/// The status class label of a response.
pub(crate) fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Encodes `registry` as Prometheus text.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// A registry shared by the metrics server once every metric is registered.
pub type SharedRegistry = Arc<Registry>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_connector_prefix() {
        let (m, registry) = Metrics::standalone("test-connector");
        let f = FunctionRef::new("echo", Some("openfaas-fn"));
        m.delivery_finished(&f, DeliveryOutcome::DeadLettered);
        m.invoked(&f, "4xx", Duration::from_millis(12));
        m.set_backlog("orders", "0", 7);
        m.topic_map_rebuilt(2, 3);
        m.before_scrape();
        let text = encode(&registry);
        for needle in [
            "connector_build_info{connector=\"test-connector\"",
            "connector_deliveries_total{function=\"echo.openfaas-fn\",outcome=\"dead_lettered\"} 1",
            "connector_dead_letters_total{function=\"echo.openfaas-fn\"} 1",
            "connector_invocations_total{function=\"echo.openfaas-fn\",status=\"4xx\"} 1",
            "connector_invocation_duration_seconds_bucket",
            "connector_backlog_messages{topic=\"orders\",partition=\"0\"} 7",
            "connector_topic_map_topics 2",
            "connector_topic_map_functions 3",
            "connector_topic_map_age_seconds",
            "connector_inflight_deliveries 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn cached_series_count_like_the_families() {
        let (m, registry) = Metrics::standalone("test-connector");
        let (a, b) = (
            FunctionRef::new("a", None),
            FunctionRef::new("b", Some("ns")),
        );
        for _ in 0..3 {
            m.invoked(&a, "2xx", Duration::from_millis(3));
            m.delivery_finished(&a, DeliveryOutcome::Delivered);
            m.message_finished("ack");
        }
        m.invoked(&b, "timeout", Duration::from_secs(1));
        m.invoked(&b, "5xx", Duration::from_millis(7));
        m.delivery_finished(
            &b,
            DeliveryOutcome::Retry {
                after: Duration::from_secs(2),
            },
        );
        m.message_finished("retry");
        let text = encode(&registry);
        for needle in [
            "connector_invocations_total{function=\"a\",status=\"2xx\"} 3",
            "connector_invocations_total{function=\"b.ns\",status=\"timeout\"} 1",
            "connector_invocations_total{function=\"b.ns\",status=\"5xx\"} 1",
            "connector_invocation_duration_seconds_count{function=\"a\"} 3",
            "connector_invocation_duration_seconds_count{function=\"b.ns\"} 2",
            "connector_deliveries_total{function=\"a\",outcome=\"delivered\"} 3",
            "connector_deliveries_total{function=\"b.ns\",outcome=\"retry\"} 1",
            "connector_messages_total{outcome=\"ack\"} 3",
            "connector_messages_total{outcome=\"retry\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        // A series appears when it first counts, not before.
        assert!(!text.contains("outcome=\"held\""), "{text}");
        assert!(!text.contains("status=\"4xx\""), "{text}");
    }
}
