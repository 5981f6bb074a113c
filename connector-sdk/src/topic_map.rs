//! The topic map: which functions subscribe to which topic.
//!
//! [`TopicMap::build`] is a pure function of the gateway's function list. The current map
//! lives in a [`TopicMapHandle`]: an immutable snapshot behind an `Arc`, swapped atomically
//! on each successful rebuild, so lookups never wait on a rebuild. Sources that subscribe
//! per topic watch it with [`TopicMapHandle::subscribe`] and are woken only when the map
//! actually changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
// Defined in a leaf module that the gateway client, messages and metrics import without
// importing the topic map (which imports them); still public here, where they always were.
pub use crate::function::{FunctionRef, FunctionStatus};
use crate::gateway::GatewayClient;
use crate::metrics::Metrics;
use crate::policy::{PolicyError, PolicyOverrides};

/// A function subscribed to at least one topic, with its annotations (the cron connector
/// reads `schedule` from them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    /// How to invoke it.
    pub function: FunctionRef,
    /// All of its annotations.
    pub annotations: BTreeMap<String, String>,
    /// The topics it subscribes to, in annotation order.
    pub topics: Vec<String>,
    /// Its delivery settings, from its annotations (see [`crate::policy`]).
    pub policy: Arc<PolicyOverrides>,
}

/// An immutable snapshot: topic → functions.
#[derive(Debug, Clone)]
pub struct TopicMap {
    topics: BTreeMap<String, Arc<[FunctionRef]>>,
    subscribers: Vec<Subscriber>,
    /// Functions whose annotations override a delivery setting.
    policies: HashMap<FunctionRef, Arc<PolicyOverrides>, rustc_hash::FxBuildHasher>,
    /// Functions skipped because an annotation's value cannot be used.
    invalid: Vec<(FunctionRef, PolicyError)>,
    built_at: Instant,
    built_at_wall: SystemTime,
}

impl PartialEq for TopicMap {
    /// Two maps are equal when they route the same way and carry the same annotations,
    /// whenever they were built.
    fn eq(&self, other: &Self) -> bool {
        self.topics == other.topics
            && self.subscribers == other.subscribers
            && self.invalid == other.invalid
    }
}

impl Default for TopicMap {
    fn default() -> Self {
        Self::from_subscribers(Vec::new(), Vec::new())
    }
}

/// The annotation naming a function's topics.
pub const TOPIC_ANNOTATION: &str = "topic";

impl TopicMap {
    /// Builds the map from the function lists of each namespace. A function's `topic`
    /// annotation is split on `delimiter` (an empty delimiter means the whole value is one
    /// topic), each topic trimmed, empties ignored. Its delivery annotations are read
    /// ([`crate::policy`]); a function with a value that cannot be used is left out and
    /// listed in [`invalid`](Self::invalid).
    pub fn build<'a>(
        functions: impl IntoIterator<Item = &'a FunctionStatus>,
        delimiter: &str,
    ) -> Self {
        let mut subscribers = Vec::new();
        let mut invalid = Vec::new();
        for f in functions {
            let Some(annotation) = f.annotations.get(TOPIC_ANNOTATION) else {
                continue;
            };
            let mut topics: Vec<String> = Vec::new();
            let parts: Box<dyn Iterator<Item = &str>> = if delimiter.is_empty() {
                Box::new(std::iter::once(annotation.as_str()))
            } else {
                Box::new(annotation.split(delimiter))
            };
            for topic in parts.map(str::trim).filter(|t| !t.is_empty()) {
                if !topics.iter().any(|t| t == topic) {
                    topics.push(topic.to_owned());
                }
            }
            if topics.is_empty() {
                continue;
            }
            let function = FunctionRef::new(&f.name, f.namespace.as_deref());
            let policy = match PolicyOverrides::from_annotations(&f.annotations) {
                Ok(policy) => Arc::new(policy),
                Err(e) => {
                    invalid.push((function, e));
                    continue;
                }
            };
            subscribers.push(Subscriber {
                function,
                annotations: f.annotations.clone(),
                topics,
                policy,
            });
        }
        subscribers.sort_by(|a, b| a.function.cmp(&b.function));
        subscribers.dedup_by(|a, b| a.function == b.function);
        invalid.sort_by(|a: &(FunctionRef, PolicyError), b| a.0.cmp(&b.0));
        invalid.dedup_by(|a, b| a.0 == b.0);
        Self::from_subscribers(subscribers, invalid)
    }

    fn from_subscribers(
        subscribers: Vec<Subscriber>,
        invalid: Vec<(FunctionRef, PolicyError)>,
    ) -> Self {
        let policies = subscribers
            .iter()
            .filter(|s| !s.policy.is_empty())
            .map(|s| (s.function.clone(), s.policy.clone()))
            .collect();
        let mut topics: BTreeMap<String, Vec<FunctionRef>> = BTreeMap::new();
        for s in &subscribers {
            for t in &s.topics {
                topics
                    .entry(t.clone())
                    .or_default()
                    .push(s.function.clone());
            }
        }
        Self {
            topics: topics.into_iter().map(|(t, f)| (t, f.into())).collect(),
            subscribers,
            policies,
            invalid,
            built_at: Instant::now(),
            built_at_wall: SystemTime::now(),
        }
    }

    /// `function`'s delivery settings when its annotations override any.
    pub fn policy(&self, function: &FunctionRef) -> Option<&Arc<PolicyOverrides>> {
        if self.policies.is_empty() {
            return None;
        }
        self.policies.get(function)
    }

    /// Whether some function's annotations override a delivery setting.
    pub fn has_policies(&self) -> bool {
        !self.policies.is_empty()
    }

    /// Functions left out because an annotation's value cannot be used, with why.
    pub fn invalid(&self) -> &[(FunctionRef, PolicyError)] {
        &self.invalid
    }

    /// The functions subscribed to exactly `topic`.
    pub fn lookup(&self, topic: &str) -> Option<&Arc<[FunctionRef]>> {
        self.topics.get(topic)
    }

    /// Every topic some function subscribes to, sorted.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.topics.keys().map(String::as_str)
    }

    /// The set of topics, for comparing one snapshot with the next.
    pub fn topic_set(&self) -> BTreeSet<String> {
        self.topics.keys().cloned().collect()
    }

    /// Every (topic, functions) pair, for sources with their own matching (NATS wildcards).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Arc<[FunctionRef]>)> {
        self.topics.iter().map(|(t, f)| (t.as_str(), f))
    }

    /// The functions subscribed to `topic` through any pattern that `matches(pattern,
    /// topic)` accepts, each once, in topic order: for sources whose topics have wildcards
    /// of their own (NATS `*` and `>`, AMQP topic exchanges' `*` and `#`).
    pub fn functions_matching(
        &self,
        topic: &str,
        matches: impl Fn(&str, &str) -> bool,
    ) -> Arc<[FunctionRef]> {
        let mut functions: Vec<FunctionRef> = Vec::new();
        for (pattern, subscribers) in self.entries() {
            if matches(pattern, topic) {
                for f in subscribers.iter() {
                    if !functions.contains(f) {
                        functions.push(f.clone());
                    }
                }
            }
        }
        functions.into()
    }

    /// Every function with at least one topic, sorted by name.
    pub fn subscribers(&self) -> &[Subscriber] {
        &self.subscribers
    }

    /// Number of functions with at least one topic.
    pub fn function_count(&self) -> usize {
        self.subscribers.len()
    }

    /// How long ago this snapshot was built.
    pub fn age(&self) -> Duration {
        self.built_at.elapsed()
    }

    /// When this snapshot was built (wall clock).
    pub fn built_at(&self) -> SystemTime {
        self.built_at_wall
    }
}

/// The current topic map, shared by the rebuild loop, the dispatcher and the source.
#[derive(Clone)]
pub struct TopicMapHandle {
    current: Arc<ArcSwap<TopicMap>>,
    changes: Arc<watch::Sender<Arc<TopicMap>>>,
    ready: Arc<watch::Sender<bool>>,
}

impl fmt::Debug for TopicMapHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicMapHandle")
            .field("topics", &self.current.load().topics.len())
            .field("ready", &*self.ready.borrow())
            .finish()
    }
}

impl Default for TopicMapHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl TopicMapHandle {
    /// An empty map that is not ready until the first [`replace`](Self::replace).
    pub fn new() -> Self {
        let empty = Arc::new(TopicMap::default());
        Self {
            current: Arc::new(ArcSwap::new(empty.clone())),
            changes: Arc::new(watch::channel(empty).0),
            ready: Arc::new(watch::channel(false).0),
        }
    }

    /// A handle already holding `map` and ready: for sources with a fixed topic list and
    /// for tests.
    pub fn fixed(map: TopicMap) -> Self {
        let handle = Self::new();
        handle.replace(map);
        handle
    }

    /// The current snapshot. Never waits.
    pub fn current(&self) -> Arc<TopicMap> {
        self.current.load_full()
    }

    /// `function`'s delivery settings in the current map, when its annotations override
    /// any. Cheap when no function overrides anything.
    pub fn policy_for(&self, function: &FunctionRef) -> Option<Arc<PolicyOverrides>> {
        let map = self.current.load();
        map.policy(function).cloned()
    }

    /// Whether some function in the current map overrides a delivery setting. Takes no
    /// reference on the map: checked for every message.
    pub fn has_policies(&self) -> bool {
        self.current.load().has_policies()
    }

    /// Installs `map`; watchers are woken only if it differs from the current one.
    /// Returns whether it changed.
    pub fn replace(&self, map: TopicMap) -> bool {
        let map = Arc::new(map);
        let changed = **self.current.load() != *map;
        self.current.store(map.clone());
        self.ready.send_replace(true);
        self.changes.send_if_modified(|slot| {
            *slot = map;
            changed
        });
        changed
    }

    /// Whether a map has been installed since start.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until a map has been installed.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // `wait_for` only fails when the sender is gone, and `self` holds it.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// A receiver that sees each changed map. The first `changed()` fires on the first
    /// change after subscribing; `borrow()` gives the latest.
    pub fn subscribe(&self) -> watch::Receiver<Arc<TopicMap>> {
        self.changes.subscribe()
    }
}

/// Keeps `handle` current: builds the map at once, then every `interval`. A failed build
/// keeps the last good map, is logged and counted, and is retried with backoff (never more
/// than `interval` apart). Never returns until `shutdown` is cancelled.
pub async fn rebuild_loop(
    gateway: GatewayClient,
    handle: TopicMapHandle,
    delimiter: String,
    interval: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut failures = Backoff {
        initial: Duration::from_millis(250).min(interval),
        max: interval,
    }
    .attempts();
    loop {
        let wait = match gateway.list_all_functions().await {
            Ok(functions) => {
                let map = TopicMap::build(&functions, &delimiter);
                let before = handle.current();
                for (function, e) in map.invalid() {
                    if !before
                        .invalid()
                        .iter()
                        .any(|(f, old)| f == function && old == e)
                    {
                        tracing::error!(function = %function, key = e.key, error = %e, "subscription skipped until its annotation is fixed");
                    }
                }
                metrics.set_invalid_subscriptions(map.invalid().iter().map(|(f, _)| f));
                let (topics, count) = (map.topics.len(), map.function_count());
                let first = !handle.is_ready();
                let changed = handle.replace(map);
                metrics.topic_map_rebuilt(topics, count);
                if first || changed {
                    tracing::info!(topics, functions = count, "topic map updated");
                } else {
                    tracing::debug!(topics, functions = count, "topic map unchanged");
                }
                if failures.failures() > 0 {
                    tracing::info!("gateway reachable again");
                }
                failures.reset();
                interval
            }
            Err(e) => {
                metrics.topic_map_failed();
                let delay = failures.next_delay();
                tracing::warn!(
                    error = %e,
                    failures = failures.failures(),
                    retry_in = ?delay,
                    "topic map rebuild failed; keeping the last good map"
                );
                delay
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, ns: Option<&str>, topic: Option<&str>) -> FunctionStatus {
        let mut annotations = BTreeMap::new();
        if let Some(t) = topic {
            annotations.insert(TOPIC_ANNOTATION.to_owned(), t.to_owned());
        }
        FunctionStatus {
            name: name.into(),
            namespace: ns.map(Into::into),
            annotations,
        }
    }

    fn names(map: &TopicMap, topic: &str) -> Vec<String> {
        map.lookup(topic)
            .map(|fs| fs.iter().map(|f| f.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn functions_matching_a_pattern_each_once() {
        let fs = [
            function("exact", None, Some("a.b")),
            function("prefix", None, Some("a.")),
            function("both", None, Some("a., a.b")),
            function("other", None, Some("c")),
        ];
        let map = TopicMap::build(&fs, ",");
        let prefix = |pattern: &str, topic: &str| topic.starts_with(pattern);
        let got: Vec<String> = map
            .functions_matching("a.b", prefix)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["both", "prefix", "exact"]);
        assert!(map.functions_matching("d", prefix).is_empty());
    }

    #[test]
    fn splits_trims_and_ignores_empties() {
        let fs = [
            function("a", None, Some("orders, payments ,,  ")),
            function("b", None, Some("payments")),
            function("c", None, None),
            function("d", None, Some("  ")),
        ];
        let map = TopicMap::build(&fs, ",");
        assert_eq!(map.topics().collect::<Vec<_>>(), ["orders", "payments"]);
        assert_eq!(names(&map, "orders"), ["a"]);
        assert_eq!(names(&map, "payments"), ["a", "b"]);
        assert_eq!(map.function_count(), 2);
        assert!(map.lookup("Orders").is_none(), "matching is exact");
    }

    #[test]
    fn other_and_empty_delimiters() {
        let fs = [function("a", None, Some("x;y,z"))];
        let map = TopicMap::build(&fs, ";");
        assert_eq!(map.topics().collect::<Vec<_>>(), ["x", "y,z"]);
        let map = TopicMap::build(&fs, "");
        assert_eq!(map.topics().collect::<Vec<_>>(), ["x;y,z"]);
    }

    #[test]
    fn namespaces_qualify_names() {
        let fs = [
            function("a", Some("openfaas-fn"), Some("t")),
            function("a", Some("staging"), Some("t")),
            function("b", Some(""), Some("t")),
        ];
        let map = TopicMap::build(&fs, ",");
        assert_eq!(names(&map, "t"), ["a.openfaas-fn", "a.staging", "b"]);
    }

    #[test]
    fn duplicate_topics_in_one_annotation_count_once() {
        let map = TopicMap::build(&[function("a", None, Some("t,t, t"))], ",");
        assert_eq!(names(&map, "t"), ["a"]);
    }

    #[test]
    fn parses_gateway_json_with_null_and_odd_annotations() {
        let json = r#"[
            {"name":"a","namespace":"openfaas-fn","annotations":{"topic":"x","n":3}},
            {"name":"b","annotations":null,"replicas":1},
            {"name":"c"},
            {"name":"d","annotations":{"topic":null}}
        ]"#;
        let fs: Vec<FunctionStatus> = serde_json::from_str(json).unwrap();
        let map = TopicMap::build(&fs, ",");
        assert_eq!(names(&map, "x"), ["a.openfaas-fn"]);
        assert_eq!(map.function_count(), 1);
    }

    #[tokio::test]
    async fn handle_swaps_and_notifies_only_on_change() {
        let handle = TopicMapHandle::new();
        assert!(!handle.is_ready());
        let mut rx = handle.subscribe();
        let m1 = TopicMap::build(&[function("a", None, Some("t"))], ",");
        assert!(handle.replace(m1.clone()));
        assert!(handle.is_ready());
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().topic_set().len(), 1);
        assert!(!handle.replace(m1), "identical map is no change");
        assert!(!rx.has_changed().unwrap());
        let m2 = TopicMap::build(&[function("a", None, Some("t,u"))], ",");
        assert!(handle.replace(m2));
        assert!(rx.has_changed().unwrap());
        assert_eq!(names(&handle.current(), "u"), ["a"]);
    }
}
