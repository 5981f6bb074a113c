//! The dispatcher: from a message to one delivery per subscribed function, each with its
//! own attempts, and back to one [`MessageOutcome`](crate::MessageOutcome) the source
//! turns into its ack.
//!
//! Life of a message:
//!
//! 1. [`Dispatcher::submit`] looks the topic up in the current topic map. No subscriber:
//!    the outcome is ready at once. If the connector consumes the topic because `topics`
//!    names it, the message is held (`unmatched = "hold"`, the default: it comes back on
//!    the source's hold schedule until a function subscribes; counted as
//!    `unmatched_held`, listed in `/readyz`'s body); otherwise it is acknowledged
//!    (counted as `unmatched`).
//! 2. It waits for room: an idle worker, or a place in the hand-off queue, which holds at
//!    most `max_inflight` messages waiting for a worker. This wait
//!    is the backpressure: a source awaiting `submit` is not pulling. The queue lets a
//!    worker that finished a message take the next one itself, without waking the source
//!    for every message: the source is woken once the queue is down to half.
//! 3. A worker takes the message and waits for in-flight permits, one per delivery (at
//!    most `max_inflight` deliveries run at once). A function that keeps order (the
//!    connector's `ordering = "key"`, or its own `connector.ordering`) first waits, for
//!    its own delivery only, until it is done with the previous message of the same key;
//!    other keys and other functions run in parallel. With strict lanes the whole
//!    message waits for the previous message of its key.
//! 4. Each delivery invokes its function until the verdict is terminal: delivered, dropped,
//!    dead-lettered (at once on a non-retryable status, or after `max_attempts`), or held
//!    (dead-lettering impossible and `on_exhausted = "block"`). Retries wait an
//!    exponential backoff with full jitter, at least `Retry-After`. A delivery that
//!    succeeded is never repeated because a sibling is retrying.
//! 5. When every delivery is terminal the [`Completion`] resolves. The dispatcher never
//!    acknowledges anything itself.
//!
//! Broker retries ([`DispatcherBuilder::broker_retries`], opt-in; the SQS connector uses
//! them): instead of sleeping the backoff in process, a retryable failure with attempts
//! left ends the delivery at once as [`DeliveryOutcome::Retry`], carrying the backoff
//! delay for this attempt number (at least `Retry-After`). The message's disposition is
//! then [`Disposition::Retry`] with the longest such delay, and the source has the broker
//! redeliver it after that delay (SQS: ChangeMessageVisibility). The retry is durable: if
//! the connector dies during the wait, the broker still redelivers the message on time.
//! Attempts continue across redeliveries from [`Message::prior_attempts`] (the broker's
//! receive count), so `max_attempts` counts every receive and exhaustion still
//! dead-letters. The price, on fan-out: the broker redelivers the whole message, so a
//! sibling delivery that already succeeded is invoked again on redelivery (same `ce-id`,
//! on which functions deduplicate), and one that was dead-lettered is dead-lettered again.
//! At-least-once holds; "a delivery that succeeded is not repeated" does not, in this mode.
//!
//! [`DeliveryOutcome::Retry`]: crate::message::DeliveryOutcome::Retry
//! [`Disposition::Retry`]: crate::message::Disposition::Retry
//!
//! Strict lanes ([`DispatcherBuilder::strict_lanes`], opt-in, with `ordering = "key"`):
//! a message whose disposition is not `Ack` (held, retrying, released) releases the
//! messages already queued behind it in its lane, without invoking anything, instead of
//! letting them go ahead. The broker redelivers them after it, so order per key holds
//! (SQS FIFO: later messages of a MessageGroupId that arrived in the same receive).
//! The key stays blocked after that message completed, so a message of the same key
//! submitted a moment later (the rest of its receive, still being handed over) is
//! released at once too. The block ends when the failed message is submitted again
//! (same `id`) or after its retry delay plus [`STRICT_BLOCK_GRACE`], whichever is
//! first: a broker that keeps a key's messages in order does not hand out the key's
//! later messages meanwhile, so only messages received with the failed one can meet it.
//!
//! Shutdown has two steps. [`Dispatcher::drain`]: no new attempt starts (waiting retries,
//! and messages waiting in the hand-off queue or for their lane, are released), running
//! invocations go on. [`Dispatcher::abort`]:
//! running invocations are cancelled and released.

// The public API and the shared state are here; the machinery, by step of a message's
// life (see above), in the submodules.
// 1-2: admit, reserve a function's places, hand off to the pool.
mod admission;
mod batch;
// 4: one delivery's attempts and what each verdict leads to.
mod attempts;
// A worker's drain and abort tokens, and the cheap abort signal.
mod cancel;
// 5: the outcome assembled and handed to the submitter.
mod completion;
// 4: writing dead letters, or holding / dropping what cannot be written.
mod dead_letter;
// 3: ordering lanes, strict-lane blocking.
mod lanes;
// 2-3: the workers and the hand-off queue.
mod pool;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::{OnExhausted, Ordering, SdkConfig};
use crate::dead_letter::DeadLetterSink;
use crate::error::SdkError;
use crate::gateway::GatewayClient;
use crate::limiter::Limiter;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::response::Subscribers;
use crate::topic_map::{FunctionRef, TopicMap, TopicMapHandle};
use crate::verdict::StatusClasses;

use admission::{Admitted, Job};
use cancel::AbortSignal;
pub use completion::Completion;
use lanes::Lane;
use pool::Pool;

/// Finds the functions for a topic in a topic map. The default is exact match; the NATS
/// connector matches subjects against wildcard topics.
pub type Matcher = Arc<dyn Fn(&TopicMap, &str) -> Arc<[FunctionRef]> + Send + Sync>;

/// A [`Matcher`] for topics with wildcards: `matches(pattern, topic)` decides whether a
/// function's topic (a pattern) covers a message's topic. See
/// [`TopicMap::functions_matching`].
pub fn pattern_matcher(matches: fn(&str, &str) -> bool) -> Matcher {
    Arc::new(move |map: &TopicMap, topic: &str| map.functions_matching(topic, matches))
}

/// With strict lanes, how long a key stays blocked after an unacknowledged message
/// beyond its retry delay, unless that message comes back first.
pub const STRICT_BLOCK_GRACE: Duration = Duration::from_secs(5);

/// How many topics' matcher answers are kept before the cache starts over (topics can be
/// unbounded: `orders.<id>` under a wildcard).
const MATCHED_TOPICS: usize = 4096;

/// A custom matcher's answers for one topic map.
#[derive(Default)]
struct MatchCache {
    map: Option<Arc<TopicMap>>,
    by_topic: HashMap<String, Arc<[FunctionRef]>>,
}

/// The connector's delivery settings: every delivery's, unless its function's
/// annotations override them.
#[derive(Debug, Clone)]
struct Policy {
    max_attempts: u32,
    backoff: Backoff,
    status: StatusClasses,
    on_exhausted: OnExhausted,
    print_request_body: bool,
    broker_retries: bool,
    /// Batches of functions whose annotations do not say otherwise.
    batch: crate::policy::BatchDefaults,
}

/// Hands messages to functions. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
    /// Dropped with the last clone: the idle workers then exit.
    _open: Arc<OpenGuard>,
}

/// Closes the worker pool when the last [`Dispatcher`] clone is dropped. The workers hold
/// the dispatcher's state themselves, so without this an idle worker would keep it (and
/// its connection pool) alive for ever.
struct OpenGuard(Arc<Inner>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.pool.close(&self.0);
    }
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("available_permits", &self.inner.permits.available_permits())
            .field("max_inflight", &self.inner.max_inflight)
            .finish()
    }
}

/// The dispatcher's state, shared by its clones and its workers.
struct Inner {
    gateway: GatewayClient,
    topics: TopicMapHandle,
    matcher: Option<Matcher>,
    matched: Mutex<MatchCache>,
    permits: Arc<Semaphore>,
    max_inflight: usize,
    ordered: bool,
    strict_lanes: bool,
    lanes: Mutex<HashMap<lanes::LaneKey, Lane>>,
    /// Strict lanes: keys blocked by an unacknowledged message (its id, and until when).
    blocked: Mutex<HashMap<Bytes, (String, Instant)>>,
    next_lane_id: AtomicU64,
    policy: Policy,
    /// `topics` is set and `unmatched = "hold"`: a message without a subscriber is held.
    hold_unmatched: bool,
    /// Concurrency limits of the functions that have one (`connector.max_inflight`,
    /// `connector.adaptive`).
    limiters: Mutex<HashMap<FunctionRef, Arc<Limiter>>>,
    /// The open batches of the functions that take batches (`connector.batch.size`).
    batchers: Mutex<HashMap<FunctionRef, Arc<batch::Batcher>>>,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
    subscribers: Subscribers,
    metrics: Metrics,
    drain: CancellationToken,
    abort: CancellationToken,
    /// Every worker's abort signal.
    signals: Mutex<Vec<Arc<AbortSignal>>>,
    /// Counts the messages in progress, for `wait_idle`.
    tracker: TaskTracker,
    pool: Pool,
}

/// Builds a [`Dispatcher`].
pub struct DispatcherBuilder {
    gateway: GatewayClient,
    topics: TopicMapHandle,
    metrics: Metrics,
    max_inflight: usize,
    ordering: Ordering,
    policy: Policy,
    hold_unmatched: bool,
    matcher: Option<Matcher>,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
    subscribers: Subscribers,
    strict_lanes: bool,
}

impl DispatcherBuilder {
    /// With `true`, retries go through the broker: a retryable failure with attempts left
    /// ends the delivery at once as [`DeliveryOutcome::Retry`] and the message's
    /// disposition becomes [`Disposition::Retry`]; the source must then have the broker
    /// redeliver it after the delay, and set [`Message::prior_attempts`] from the broker's
    /// redelivery count. See the module docs for what this means on fan-out.
    /// (default: `false`: retries wait in process)
    ///
    /// [`DeliveryOutcome::Retry`]: crate::message::DeliveryOutcome::Retry
    /// [`Disposition::Retry`]: crate::message::Disposition::Retry
    pub fn broker_retries(mut self, on: bool) -> Self {
        self.policy.broker_retries = on;
        self
    }

    /// With `true` and key ordering, a message that may not be acknowledged releases the
    /// messages queued behind it in its lane without delivering them. (default: `false`:
    /// the next message of the lane starts once the previous one is complete, whatever
    /// its disposition)
    pub fn strict_lanes(mut self, on: bool) -> Self {
        self.strict_lanes = on;
        self
    }

    /// Dead letters go to `sink`. Without one, a delivery that fails for good is held (or
    /// dropped with `on_exhausted = "drop"`).
    pub fn dead_letters(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.dead_letters = Some(sink);
        self
    }

    /// Every invocation result is offered to `subscribers`.
    pub fn subscribers(mut self, subscribers: Subscribers) -> Self {
        self.subscribers = subscribers;
        self
    }

    /// Topics are matched with `matcher` instead of exactly.
    pub fn matcher(mut self, matcher: Matcher) -> Self {
        self.matcher = Some(matcher);
        self
    }

    /// Overrides the configured ordering (a connector whose source has no keys).
    pub fn ordering(mut self, ordering: Ordering) -> Self {
        self.ordering = ordering;
        self
    }

    /// The dispatcher.
    pub fn build(self) -> Dispatcher {
        let inner = Arc::new(Inner {
            gateway: self.gateway,
            topics: self.topics,
            matcher: self.matcher,
            matched: Mutex::default(),
            permits: Arc::new(Semaphore::new(self.max_inflight)),
            max_inflight: self.max_inflight,
            ordered: self.ordering != Ordering::None,
            strict_lanes: self.strict_lanes,
            lanes: Mutex::new(HashMap::new()),
            blocked: Mutex::new(HashMap::new()),
            next_lane_id: AtomicU64::new(0),
            policy: self.policy,
            hold_unmatched: self.hold_unmatched,
            limiters: Mutex::new(HashMap::new()),
            batchers: Mutex::new(HashMap::new()),
            dead_letters: self.dead_letters,
            subscribers: self.subscribers,
            metrics: self.metrics,
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
            signals: Mutex::new(Vec::new()),
            tracker: TaskTracker::new(),
            pool: Pool::new(self.max_inflight),
        });
        Dispatcher {
            _open: Arc::new(OpenGuard(inner.clone())),
            inner,
        }
    }
}

impl Dispatcher {
    /// A builder invoking through `gateway`, routing with `topics`, configured by `config`
    /// (`max_inflight`, `max_attempts`, `backoff`, `status`, `on_exhausted`, `ordering`).
    pub fn builder(
        gateway: GatewayClient,
        topics: TopicMapHandle,
        config: &SdkConfig,
        metrics: Metrics,
    ) -> DispatcherBuilder {
        DispatcherBuilder {
            gateway,
            topics,
            metrics,
            max_inflight: config.max_inflight.clamp(1, Semaphore::MAX_PERMITS),
            ordering: config.ordering,
            policy: Policy {
                max_attempts: config.max_attempts.max(1),
                backoff: config.backoff,
                status: config.status.clone(),
                on_exhausted: config.on_exhausted,
                print_request_body: config.print_request_body,
                broker_retries: false,
                batch: config.batch,
            },
            hold_unmatched: !config.topics.is_empty()
                && config.unmatched == crate::config::Unmatched::Hold,
            matcher: None,
            dead_letters: None,
            subscribers: Subscribers::default(),
            strict_lanes: false,
        }
    }

    /// The functions `topic` is delivered to right now.
    pub fn functions_for(&self, topic: &str) -> Arc<[FunctionRef]> {
        let map = self.inner.topics.current();
        let Some(matcher) = &self.inner.matcher else {
            return map.lookup(topic).cloned().unwrap_or_else(|| Arc::new([]));
        };
        // A matcher walks the whole map (wildcards); its answers are kept per topic until
        // the map is replaced.
        let Ok(mut cache) = self.inner.matched.lock() else {
            return matcher(&map, topic);
        };
        if !cache.map.as_ref().is_some_and(|m| Arc::ptr_eq(m, &map)) {
            cache.by_topic.clear();
            cache.map = Some(map.clone());
        }
        if let Some(functions) = cache.by_topic.get(topic) {
            return functions.clone();
        }
        let functions = matcher(&map, topic);
        if cache.by_topic.len() >= MATCHED_TOPICS {
            cache.by_topic.clear();
        }
        cache.by_topic.insert(topic.to_owned(), functions.clone());
        functions
    }

    /// Starts delivering `message`, once there is room (this wait is the backpressure).
    /// The returned [`Completion`] resolves when every delivery is terminal. Fails only
    /// when the dispatcher is draining. Cancel-safe: dropping the future before it resolves
    /// delivers nothing.
    pub async fn submit(&self, mut message: Message) -> Result<Completion, SdkError> {
        let trace = crate::trace::start_message(&mut message);
        // Shared by its deliveries from here on: behind one pointer, the message is not
        // copied again as it moves through admission, the queue and the futures.
        let message = Arc::new(message);
        let functions = self.functions_for(&message.topic);
        Ok(self.submit_shared(message, functions).await?.traced(trace))
    }

    /// Like [`submit`](Self::submit), but to exactly `functions` instead of the topic's
    /// subscribers (the cron connector fires one function per schedule).
    pub async fn submit_to(
        &self,
        message: Message,
        functions: Arc<[FunctionRef]>,
    ) -> Result<Completion, SdkError> {
        let mut message = message;
        let trace = crate::trace::start_message(&mut message);
        Ok(self
            .submit_shared(Arc::new(message), functions)
            .await?
            .traced(trace))
    }

    async fn submit_shared(
        &self,
        message: Arc<Message>,
        functions: Arc<[FunctionRef]>,
    ) -> Result<Completion, SdkError> {
        Ok(match self.admit(message, functions) {
            Admitted::Ready(outcome) => Completion::ready(outcome),
            Admitted::Run(mut admission) => {
                self.reserve(&mut admission).await?;
                let (tx, rx) = oneshot::channel();
                self.place(Job {
                    admission,
                    done: tx,
                })
                .await?;
                Completion::pending(rx)
            }
        })
    }

    /// Whether a message of `topic` would be admitted without waiting for a function's
    /// concurrency limit (for sources that must not wait, like Kafka's poll loop).
    pub fn room_for(&self, topic: &str) -> bool {
        if !self.inner.topics.has_policies() {
            return true;
        }
        let map = self.inner.topics.current();
        self.functions_for(topic).iter().all(|function| {
            map.policy(function)
                .and_then(|o| self.inner.limiter(function, o))
                .is_none_or(|l| l.has_room())
        })
    }

    /// Stops starting new attempts: waiting retries and queued messages are released,
    /// `submit` fails from now on; running invocations continue. Workers release what is
    /// left in the hand-off queue, then exit.
    pub fn drain(&self) {
        self.inner.drain.cancel();
        self.inner.permits.close();
        self.inner.pool.close(&self.inner);
    }

    /// Cancels running invocations; their messages are released.
    pub fn abort(&self) {
        self.drain();
        // The token first: a worker registering its signal after the loop below finds
        // the token cancelled.
        self.inner.abort.cancel();
        if let Ok(signals) = self.inner.signals.lock() {
            for signal in signals.iter() {
                signal.fire();
            }
        }
    }

    /// Waits until every submitted message is complete. Call after [`drain`](Self::drain).
    pub async fn wait_idle(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        self.inner.tracker.reopen();
    }

    /// Deliveries that may start right now: free in-flight permits.
    pub fn available_permits(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// How many messages `submit` takes right now without waiting: idle workers, workers
    /// yet to be started, and free places in the hand-off queue. `0` when draining.
    pub fn room(&self) -> usize {
        self.inner.pool.room_now()
    }

    /// The metrics this dispatcher updates.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// How many messages can be inside the dispatcher at once with the current topic map:
    /// its workers and hand-off queue (twice `max_inflight`), plus, for each function that
    /// takes batches, the messages its batches hold (its limit plus one, times its batch
    /// size). A source whose broker hands out at most a window of unacknowledged messages
    /// (a prefetch, a receive maximum, `max_ack_pending`) sizes it from this, so that
    /// batches can fill.
    pub fn message_window(&self) -> usize {
        let inner = &self.inner;
        let base = inner.max_inflight.saturating_mul(2);
        if !inner.may_batch() {
            return base;
        }
        let map = inner.topics.current();
        let functions: std::collections::HashSet<&FunctionRef> = map
            .entries()
            .flat_map(|(_, functions)| functions.iter())
            .collect();
        functions.into_iter().fold(base, |window, function| {
            let own = map.policy(function);
            let Some(batch) = inner.policy.batch.settings(own.map(|o| &o.batch)) else {
                return window;
            };
            let limit = own
                .and_then(|o| o.max_inflight)
                .unwrap_or(inner.max_inflight);
            window.saturating_add(limit.saturating_add(1).saturating_mul(batch.size))
        })
    }
}
