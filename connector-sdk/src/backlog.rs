//! Per-function backlog: how many messages wait for each function right now.
//!
//! A function's backlog is the sum of
//! - the broker's backlog of every topic it subscribes to, as the source reports it with
//!   [`Metrics::set_backlog`](crate::metrics::Metrics::set_backlog) (a topic's backlog
//!   counts in full for each function subscribed to it; a reported topic is matched to
//!   functions the way the connector matches a message's topic, wildcards included), and
//!   the backlogs the source reports with
//!   [`Metrics::set_shared_backlog`](crate::metrics::Metrics::set_shared_backlog), which
//!   the broker counts per stream, queue, session or slot rather than per topic: those
//!   count for every function the connector serves;
//! - the messages the connector holds for it that are not yet complete: admitted to the
//!   dispatcher and waiting for room, in flight, waiting for a retry, or in a batch. A
//!   message fanned out to several functions counts for each until it is complete.
//!
//! The held counts change on every message, so they are plain counters under a lock held
//! for an addition; a change is announced (a [`watch`] generation) only when a function's
//! held count turns zero or non-zero, or a reported backlog changes: that is all the
//! KEDA scaler's `StreamIsActive` needs to push a flip at once, and costs the delivery
//! path nothing more.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::watch;

use crate::function::FunctionRef;
use crate::topic_map::TopicMap;

/// The functions a message of a topic goes to (the dispatcher's matching).
pub type Resolver = Arc<dyn Fn(&str) -> Arc<[FunctionRef]> + Send + Sync>;

/// One reported source backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceBacklog {
    /// Messages waiting at the broker.
    pub messages: u64,
    /// Counted per stream, queue, session or slot: for every function served.
    pub shared: bool,
}

/// The reported source backlogs, by (topic or stream, partition).
pub type SourceBacklogs = BTreeMap<(String, String), SourceBacklog>;

type Held = HashMap<FunctionRef, u64, rustc_hash::FxBuildHasher>;

/// Every function's backlog: its subscribers' (from `map`, each at least `0`) plus any
/// function still holding messages. `functions_for` matches a reported topic to functions.
pub fn per_function(
    map: &TopicMap,
    functions_for: impl Fn(&str) -> Arc<[FunctionRef]>,
    source: &SourceBacklogs,
    held: &HashMap<FunctionRef, u64, impl std::hash::BuildHasher>,
) -> BTreeMap<FunctionRef, u64> {
    let mut out: BTreeMap<FunctionRef, u64> = map
        .subscribers()
        .iter()
        .map(|s| (s.function.clone(), 0))
        .collect();
    for (function, n) in held {
        let v = out.entry(function.clone()).or_default();
        *v = v.saturating_add(*n);
    }
    for ((topic, _partition), backlog) in source {
        if backlog.shared {
            for s in map.subscribers() {
                if let Some(v) = out.get_mut(&s.function) {
                    *v = v.saturating_add(backlog.messages);
                }
            }
        } else {
            for function in functions_for(topic).iter() {
                let v = out.entry(function.clone()).or_default();
                *v = v.saturating_add(backlog.messages);
            }
        }
    }
    out
}

/// The shared state behind the per-function backlog.
pub struct Backlogs {
    source: Mutex<SourceBacklogs>,
    held: Mutex<Held>,
    /// Bumped when a function's backlog may have turned zero or non-zero.
    changed: watch::Sender<u64>,
    /// Set by the runtime once the dispatcher exists.
    view: OnceLock<(crate::topic_map::TopicMapHandle, Resolver)>,
}

impl std::fmt::Debug for Backlogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backlogs").finish_non_exhaustive()
    }
}

impl Default for Backlogs {
    fn default() -> Self {
        Self {
            source: Mutex::default(),
            held: Mutex::default(),
            changed: watch::Sender::new(0),
            view: OnceLock::new(),
        }
    }
}

impl Backlogs {
    fn announce(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Records a source backlog; announces a change when its value changed.
    pub(crate) fn set_source(&self, topic: &str, partition: &str, backlog: SourceBacklog) {
        let mut source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (topic.to_owned(), partition.to_owned());
        if source.get(&key) != Some(&backlog) {
            source.insert(key, backlog);
            drop(source);
            self.announce();
        }
    }

    /// Forgets a source backlog.
    pub(crate) fn remove_source(&self, topic: &str, partition: &str) {
        let mut source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        if source
            .remove(&(topic.to_owned(), partition.to_owned()))
            .is_some()
        {
            drop(source);
            self.announce();
        }
    }

    /// Counts a message held for `functions` until the guard is dropped.
    pub(crate) fn hold(self: &Arc<Self>, functions: Arc<[FunctionRef]>) -> HeldGuard {
        let mut flipped = false;
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            for f in functions.iter() {
                let n = held.entry(f.clone()).or_default();
                flipped |= *n == 0;
                *n = n.saturating_add(1);
            }
        }
        if flipped {
            self.announce();
        }
        HeldGuard {
            backlogs: self.clone(),
            functions,
        }
    }

    fn release(&self, functions: &[FunctionRef]) {
        let mut flipped = false;
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            for f in functions {
                if let Some(n) = held.get_mut(f) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        held.remove(f);
                        flipped = true;
                    }
                }
            }
        }
        if flipped {
            self.announce();
        }
    }

    /// Lets [`snapshot`](Self::snapshot) resolve topics to functions: set once, by the
    /// runtime (or by a harness that builds its own dispatcher); later calls are ignored.
    pub fn set_view(&self, topics: crate::topic_map::TopicMapHandle, resolver: Resolver) {
        let _ = self.view.set((topics, resolver));
    }

    /// [`set_view`](Self::set_view) with a topic's functions as the map names them
    /// (exact topics, no wildcards).
    pub fn set_exact_view(&self, topics: crate::topic_map::TopicMapHandle) {
        let map = topics.clone();
        self.set_view(
            topics,
            Arc::new(move |topic| {
                map.current()
                    .lookup(topic)
                    .cloned()
                    .unwrap_or_else(|| Arc::new([]))
            }),
        );
    }

    /// Every function's backlog now; empty before the runtime has set the view.
    pub fn snapshot(&self) -> BTreeMap<FunctionRef, u64> {
        let Some((topics, resolver)) = self.view.get() else {
            return BTreeMap::new();
        };
        let map = topics.current();
        let source = self
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let held = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        per_function(&map, |t| resolver(t), &source, &held)
    }

    /// The topic map the snapshot uses, when set.
    pub fn topics(&self) -> Option<&crate::topic_map::TopicMapHandle> {
        self.view.get().map(|(t, _)| t)
    }

    /// Changes when some function's backlog may have turned zero or non-zero, or a
    /// reported backlog changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Who reports a backlog: the gateway tells sources apart by `id`, shows `connector`, and
/// reaches the admin API at `admin` (the gateway's console lists the connectors it
/// supervises from their reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSource {
    /// The same for every report of one connector process.
    pub id: String,
    /// The connector's name (its binary).
    pub connector: String,
    /// `http://host:port` of its admin API, when it has one (`basic_auth` on).
    pub admin: Option<String>,
}

/// How often the backlog is reported to the gateway without a change: scaling out
/// follows the counts between the zero crossings that trigger a report at once.
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `connector.report_backlog`: reports every function's backlog to the gateway as
/// `source` (`POST /system/backlog`) at once when one may have turned zero or non-zero (a
/// function scaled to zero gets a replica as soon as a message waits for it), and every
/// [`REPORT_EVERY`], until `cancel`. A report the gateway does not take is logged (at warn
/// once, then at debug until one is taken again) and the next one goes on schedule.
pub async fn report_loop(
    backlogs: Arc<Backlogs>,
    gateway: crate::gateway::GatewayClient,
    source: ReportSource,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut changes = backlogs.subscribe();
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        if backlogs.topics().is_none() {
            continue;
        }
        let snapshot = backlogs.snapshot();
        match gateway.report_backlog(&source, &snapshot).await {
            Ok(()) => {
                if failing {
                    tracing::info!("backlog reports are taken again");
                }
                failing = false;
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "the gateway did not take the backlog report; retrying every second");
                failing = true;
            }
            Err(e) => tracing::debug!(error = %e, "backlog report not taken"),
        }
    }
}

/// A message held for some functions; dropping it releases them.
pub(crate) struct HeldGuard {
    backlogs: Arc<Backlogs>,
    functions: Arc<[FunctionRef]>,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.backlogs.release(&self.functions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::FunctionStatus;

    fn function(name: &str, topics: &str) -> FunctionStatus {
        FunctionStatus {
            name: name.to_owned(),
            namespace: None,
            annotations: [("topic".to_owned(), topics.to_owned())].into(),
        }
    }

    fn exact(map: &TopicMap) -> impl Fn(&str) -> Arc<[FunctionRef]> + '_ {
        |t| map.lookup(t).cloned().unwrap_or_else(|| Arc::new([]))
    }

    #[test]
    fn a_topic_counts_for_each_subscriber_plus_what_each_holds() {
        let map = TopicMap::build(
            &[
                function("a", "orders,refunds"),
                function("b", "orders"),
                function("c", "audit"),
            ],
            ",",
        );
        let mut source = SourceBacklogs::new();
        let topic = |n| SourceBacklog {
            messages: n,
            shared: false,
        };
        source.insert(("orders".into(), "0".into()), topic(3));
        source.insert(("orders".into(), "1".into()), topic(4));
        source.insert(("refunds".into(), String::new()), topic(5));
        source.insert(("unsubscribed".into(), String::new()), topic(100));
        let mut held = Held::default();
        held.insert(FunctionRef::new("b", None), 2);
        held.insert(FunctionRef::new("gone", None), 1);
        let got = per_function(&map, exact(&map), &source, &held);
        let want: BTreeMap<FunctionRef, u64> = [
            (FunctionRef::new("a", None), 12),
            (FunctionRef::new("b", None), 9),
            (FunctionRef::new("c", None), 0),
            (FunctionRef::new("gone", None), 1),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn a_shared_backlog_counts_for_every_function_and_patterns_match() {
        let map = TopicMap::build(&[function("a", "orders.*"), function("b", "audit")], ",");
        let mut source = SourceBacklogs::new();
        source.insert(
            ("stream".into(), "consumer".into()),
            SourceBacklog {
                messages: 7,
                shared: true,
            },
        );
        source.insert(
            ("orders.eu".into(), String::new()),
            SourceBacklog {
                messages: 2,
                shared: false,
            },
        );
        let pattern =
            |t: &str| map.functions_matching(t, |p, t| p == "orders.*" && t.starts_with("orders."));
        let got = per_function(&map, pattern, &source, &Held::default());
        assert_eq!(got.get(&FunctionRef::new("a", None)), Some(&9));
        assert_eq!(got.get(&FunctionRef::new("b", None)), Some(&7));
    }

    #[tokio::test]
    async fn held_messages_count_until_released_and_flips_are_announced() {
        let backlogs = Arc::new(Backlogs::default());
        let map = TopicMap::build(&[function("a", "t"), function("b", "t")], ",");
        let handle = crate::topic_map::TopicMapHandle::fixed(map);
        let resolver_map = handle.clone();
        backlogs.set_view(
            handle,
            Arc::new(move |t| {
                resolver_map
                    .current()
                    .lookup(t)
                    .cloned()
                    .unwrap_or_else(|| Arc::new([]))
            }),
        );
        let mut changes = backlogs.subscribe();
        changes.mark_unchanged();
        let both: Arc<[FunctionRef]> =
            [FunctionRef::new("a", None), FunctionRef::new("b", None)].into();
        let first = backlogs.hold(both.clone());
        assert!(
            changes.has_changed().unwrap_or(false),
            "0 -> 1 is announced"
        );
        changes.mark_unchanged();
        let second = backlogs.hold([FunctionRef::new("a", None)].into());
        assert!(!changes.has_changed().unwrap_or(true), "1 -> 2 is not");
        let now = backlogs.snapshot();
        assert_eq!(now.get(&FunctionRef::new("a", None)), Some(&2));
        assert_eq!(now.get(&FunctionRef::new("b", None)), Some(&1));
        drop(first);
        assert!(
            changes.has_changed().unwrap_or(false),
            "b back to 0 is announced"
        );
        changes.mark_unchanged();
        drop(second);
        assert!(changes.has_changed().unwrap_or(false));
        let now = backlogs.snapshot();
        assert_eq!(now.get(&FunctionRef::new("a", None)), Some(&0));
        backlogs.set_source(
            "t",
            "",
            SourceBacklog {
                messages: 4,
                shared: false,
            },
        );
        assert_eq!(
            backlogs.snapshot().get(&FunctionRef::new("b", None)),
            Some(&4)
        );
    }
}
