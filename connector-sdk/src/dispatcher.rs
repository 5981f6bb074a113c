//! The dispatcher: from a message to one delivery per subscribed function, each with its
//! own attempts, and back to one [`MessageOutcome`] the source turns into its ack.
//!
//! Life of a message:
//!
//! 1. [`Dispatcher::submit`] looks the topic up in the current topic map. No subscriber:
//!    the outcome is ready at once (acknowledge; counted as `unmatched`).
//! 2. It waits for in-flight permits, one per delivery (at most `max_inflight` in all).
//!    This wait is the backpressure: a source awaiting `submit` is not pulling.
//! 3. With `ordering = "key"`, the message queues behind the previous message with the
//!    same key and starts only when that one is complete. Other keys run in parallel.
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
//! Shutdown has two steps. [`Dispatcher::drain`]: no new attempt starts (waiting retries
//! and queued messages are released), running invocations go on. [`Dispatcher::abort`]:
//! running invocations are cancelled and released.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{OnExhausted, Ordering, SdkConfig};
use crate::dead_letter::{DeadLetter, DeadLetterReason, DeadLetterSink, RESPONSE_EXCERPT_BYTES};
use crate::error::SdkError;
use crate::gateway::{GatewayClient, InvokeError};
use crate::message::{
    DeliveryOutcome, DeliveryReport, Disposition, InvocationResponse, Message, MessageOutcome,
};
use crate::metrics::{Metrics, status_class};
use crate::response::{InvocationResult, Subscribers};
use crate::topic_map::{FunctionRef, TopicMap, TopicMapHandle};
use crate::verdict::{StatusClasses, Verdict};

/// Finds the functions for a topic in a topic map. The default is exact match; the NATS
/// connector matches subjects against wildcard topics.
pub type Matcher = Arc<dyn Fn(&TopicMap, &str) -> Arc<[FunctionRef]> + Send + Sync>;

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

/// How many times writing one dead letter is tried before the delivery is held.
const DEAD_LETTER_WRITE_TRIES: u32 = 3;

#[derive(Debug, Clone)]
struct Policy {
    max_attempts: u32,
    backoff: Backoff,
    status: StatusClasses,
    on_exhausted: OnExhausted,
    print_request_body: bool,
    broker_retries: bool,
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
        self.0.pool.close();
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

struct Inner {
    gateway: GatewayClient,
    topics: TopicMapHandle,
    matcher: Option<Matcher>,
    matched: Mutex<MatchCache>,
    permits: Arc<Semaphore>,
    max_inflight: usize,
    ordered: bool,
    strict_lanes: bool,
    lanes: Mutex<HashMap<Bytes, Lane>>,
    /// Strict lanes: keys blocked by an unacknowledged message (its id, and until when).
    blocked: Mutex<HashMap<Bytes, (String, Instant)>>,
    next_lane_id: AtomicU64,
    policy: Policy,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
    subscribers: Subscribers,
    metrics: Metrics,
    drain: CancellationToken,
    abort: CancellationToken,
    /// Counts the messages in progress (and settle steps of `submit_then`), for
    /// `wait_idle`.
    tracker: TaskTracker,
    pool: Pool,
}

/// The tail of one ordering lane: the last message queued with a key, and how to learn
/// that it completed (and whether it may be acknowledged).
struct Lane {
    id: u64,
    done: oneshot::Receiver<bool>,
}

/// Builds a [`Dispatcher`].
pub struct DispatcherBuilder {
    gateway: GatewayClient,
    topics: TopicMapHandle,
    metrics: Metrics,
    max_inflight: usize,
    ordering: Ordering,
    policy: Policy,
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
            dead_letters: self.dead_letters,
            subscribers: self.subscribers,
            metrics: self.metrics,
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            pool: Pool::default(),
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
            },
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
    pub async fn submit(&self, message: Message) -> Result<Completion, SdkError> {
        let functions = self.functions_for(&message.topic);
        self.submit_to(message, functions).await
    }

    /// Like [`submit`](Self::submit), but to exactly `functions` instead of the topic's
    /// subscribers (the cron connector fires one function per schedule).
    pub async fn submit_to(
        &self,
        message: Message,
        functions: Arc<[FunctionRef]>,
    ) -> Result<Completion, SdkError> {
        Ok(match self.admit(message, functions).await? {
            Admitted::Ready(outcome) => Completion(CompletionState::Ready(Some(outcome))),
            Admitted::Run(admission) => {
                let (tx, rx) = oneshot::channel();
                let finish = Finish::Channel(tx);
                self.inner.pool.run(&self.inner, Job { admission, finish });
                Completion(CompletionState::Pending(rx))
            }
        })
    }

    /// Like [`submit`](Self::submit), but instead of returning a [`Completion`] to await,
    /// runs `then` with the outcome on the worker that delivered the message, right after
    /// the last delivery. That saves a wake-up per message for a source whose settling
    /// needs no state of the loop that submitted (Kafka: mark the offset). [`wait_idle`](Self::wait_idle)
    /// waits for `then` too. When the dispatcher is draining, `then` is not run and the
    /// error says so.
    pub async fn submit_then<F, Fut>(&self, message: Message, then: F) -> Result<(), SdkError>
    where
        F: FnOnce(MessageOutcome) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let functions = self.functions_for(&message.topic);
        match self.admit(message, functions).await? {
            Admitted::Ready(outcome) => {
                self.inner.tracker.spawn(then(outcome));
            }
            Admitted::Run(admission) => {
                let finish = Finish::Then(Box::new(move |outcome| Box::pin(then(outcome))));
                self.inner.pool.run(&self.inner, Job { admission, finish });
            }
        }
        Ok(())
    }

    /// Waits for room for `message` and joins its ordering lane; or, when its outcome is
    /// known at once (no subscriber, a blocked key), returns that outcome.
    async fn admit(
        &self,
        message: Message,
        functions: Arc<[FunctionRef]>,
    ) -> Result<Admitted, SdkError> {
        if functions.is_empty() {
            tracing::debug!(topic = %message.topic, ce_id = %message.id, "no function subscribes to this topic");
            self.inner.metrics.message_finished("unmatched");
            let outcome = MessageOutcome {
                id: message.id,
                deliveries: Vec::new(),
                interrupted: false,
            };
            return Ok(Admitted::Ready(outcome));
        }
        if self.inner.blocked_by_earlier(&message) {
            tracing::debug!(topic = %message.topic, ce_id = %message.id, "released: its key is blocked by an unacknowledged message");
            self.inner
                .metrics
                .message_finished(Disposition::Release.as_str());
            let outcome = MessageOutcome {
                id: message.id,
                deliveries: functions.iter().map(|f| released(f, 0)).collect(),
                interrupted: false,
            };
            return Ok(Admitted::Ready(outcome));
        }
        let wanted = functions.len().min(self.inner.max_inflight);
        let permits = self
            .inner
            .permits
            .clone()
            .acquire_many_owned(u32::try_from(wanted).unwrap_or(u32::MAX))
            .await
            .map_err(|_| SdkError::DispatcherClosed)?;
        let lane = self.enter_lane(&message);
        Ok(Admitted::Run(Admission {
            message,
            functions,
            permits,
            lane,
            token: self.inner.tracker.token(),
        }))
    }

    /// Joins the message's lane, returning the lane entry to wait on and what to signal.
    fn enter_lane(&self, message: &Message) -> Option<LaneTicket> {
        if !self.inner.ordered {
            return None;
        }
        let key = message.ordering_key.clone()?;
        let id = self
            .inner
            .next_lane_id
            .fetch_add(1, AtomicOrdering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        let previous = match self.inner.lanes.lock() {
            Ok(mut lanes) => lanes.insert(key.clone(), Lane { id, done: done_rx }),
            // A panic elsewhere while holding the lock; ordering cannot be kept, but
            // delivery can.
            Err(_) => None,
        };
        Some(LaneTicket {
            key,
            id,
            done: done_tx,
            previous: previous.map(|lane| lane.done),
        })
    }

    /// Stops starting new attempts: waiting retries and queued messages are released,
    /// `submit` fails from now on; running invocations continue.
    pub fn drain(&self) {
        self.inner.drain.cancel();
        self.inner.permits.close();
        self.inner.pool.close();
    }

    /// Cancels running invocations; their messages are released.
    pub fn abort(&self) {
        self.drain();
        self.inner.abort.cancel();
    }

    /// Waits until every submitted message is complete. Call after [`drain`](Self::drain).
    pub async fn wait_idle(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        self.inner.tracker.reopen();
    }

    /// Deliveries that may start right now before `submit` waits.
    pub fn available_permits(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// The metrics this dispatcher updates.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
}

/// What [`Dispatcher::admit`] did with a message.
// Returned once per message and matched at once: boxing the large variant would cost an
// allocation per message to save a move.
#[allow(clippy::large_enum_variant)]
enum Admitted {
    /// Its outcome was known at once.
    Ready(MessageOutcome),
    /// It has its permits and its place in its lane: a worker delivers it.
    Run(Admission),
}

/// A message admitted for delivery.
struct Admission {
    message: Message,
    functions: Arc<[FunctionRef]>,
    permits: OwnedSemaphorePermit,
    lane: Option<LaneTicket>,
    /// Keeps `wait_idle` waiting until the message is settled.
    token: TaskTrackerToken,
}

/// The settle step of [`Dispatcher::submit_then`], type-erased.
type SettleStep =
    Box<dyn FnOnce(MessageOutcome) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Where a message's outcome goes.
enum Finish {
    /// To the [`Completion`] the submitter awaits.
    Channel(oneshot::Sender<MessageOutcome>),
    /// Into the settle step, run on the worker.
    Then(SettleStep),
}

/// One message for a worker: deliver it, then finish it.
struct Job {
    admission: Admission,
    finish: Finish,
}

/// The workers that deliver messages. A worker takes one message at a time and stays
/// alive between messages, parked in `idle`, so a delivery costs neither a task spawn
/// nor moving a task's state around: at `max_inflight` 64 this is what brings the
/// dispatcher close to a plain loop of HTTP calls (see BENCHMARKS.md). There is no
/// queue: a message goes to an idle worker, or a new worker is started for it. The
/// number of workers follows the messages being delivered or settled at once, which
/// the in-flight permits bound.
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Arc<Slot>>,
    closed: bool,
}

/// Where an idle worker waits for its next message; `None` after a wake-up means exit.
#[derive(Default)]
struct Slot {
    job: Mutex<Option<Job>>,
    wake: tokio::sync::Notify,
}

impl Pool {
    /// Hands `job` to an idle worker, or starts one for it.
    fn run(&self, inner: &Arc<Inner>, job: Job) {
        let idle = self
            .state
            .lock()
            .ok()
            .and_then(|mut state| state.idle.pop());
        match idle {
            Some(slot) => {
                match slot.job.lock() {
                    Ok(mut next) => *next = Some(job),
                    // A worker panicked while holding this lock; start another instead.
                    Err(_) => {
                        spawn_worker(inner.clone(), job);
                        return;
                    }
                }
                slot.wake.notify_one();
            }
            None => spawn_worker(inner.clone(), job),
        }
    }

    /// Parks `slot` as idle; `false` when the pool is closed and the worker should exit.
    fn park(&self, slot: &Arc<Slot>) -> bool {
        match self.state.lock() {
            Ok(mut state) if !state.closed => {
                state.idle.push(slot.clone());
                true
            }
            _ => false,
        }
    }

    /// Makes idle workers exit, and busy ones once their message is finished.
    fn close(&self) {
        let idle = match self.state.lock() {
            Ok(mut state) => {
                state.closed = true;
                std::mem::take(&mut state.idle)
            }
            Err(_) => return,
        };
        for slot in idle {
            slot.wake.notify_one();
        }
    }
}

/// A worker's own children of the dispatcher's drain and abort tokens. Checking or
/// awaiting a token locks its node; with one node per worker, deliveries on both runtime
/// threads do not contend for the dispatcher's.
struct Cancel {
    drain: CancellationToken,
    abort: CancellationToken,
}

fn spawn_worker(inner: Arc<Inner>, first: Job) {
    tokio::spawn(async move {
        let slot = Arc::new(Slot::default());
        let cancel = Cancel {
            drain: inner.drain.child_token(),
            abort: inner.abort.child_token(),
        };
        let mut job = first;
        loop {
            inner.execute(&cancel, job).await;
            if !inner.pool.park(&slot) {
                return;
            }
            slot.wake.notified().await;
            match slot.job.lock().ok().and_then(|mut next| next.take()) {
                Some(next) => job = next,
                None => return,
            }
        }
    });
}

struct LaneTicket {
    key: Bytes,
    id: u64,
    done: oneshot::Sender<bool>,
    previous: Option<oneshot::Receiver<bool>>,
}

impl Inner {
    /// Delivers a message, records its outcome, lets its lane go on, and finishes it.
    async fn execute(self: &Arc<Self>, cancel: &Cancel, job: Job) {
        let Job { admission, finish } = job;
        let (outcome, lane) = self
            .run(
                cancel,
                admission.message,
                admission.functions,
                admission.permits,
                admission.lane,
            )
            .await;
        let disposition = outcome.disposition();
        self.metrics.message_finished(disposition.as_str());
        if let Some((key, id, done)) = lane {
            self.block_after(&key, &outcome.id, disposition);
            let _ = done.send(disposition == Disposition::Ack);
            self.leave_lane(&key, id);
        }
        match finish {
            Finish::Channel(tx) => {
                let _ = tx.send(outcome);
            }
            Finish::Then(then) => then(outcome).await,
        }
        // Only now may `wait_idle` return.
        drop(admission.token);
    }

    async fn run(
        self: &Arc<Self>,
        cancel: &Cancel,
        message: Message,
        functions: Arc<[FunctionRef]>,
        mut permits: OwnedSemaphorePermit,
        lane: Option<LaneTicket>,
    ) -> (MessageOutcome, Option<(Bytes, u64, oneshot::Sender<bool>)>) {
        let (previous, lane) = match lane {
            Some(t) => (t.previous, Some((t.key, t.id, t.done))),
            None => (None, None),
        };
        if let Some(previous) = previous {
            let previous_acked = tokio::select! {
                // An error means the previous message's task ended without signalling,
                // which only happens if it was torn down: complete, and released.
                acked = previous => acked.unwrap_or(false),
                () = cancel.drain.cancelled() => true,
            };
            if self.strict_lanes && !previous_acked {
                // The broker redelivers the previous message; this one must not overtake
                // it, so it goes back too, untouched (and so does the rest of the lane).
                tracing::debug!(topic = %message.topic, ce_id = %message.id, "released behind an unacknowledged message of its lane");
                drop(permits);
                let deliveries = functions.iter().map(|f| released(f, 0)).collect();
                return (
                    MessageOutcome {
                        id: message.id,
                        deliveries,
                        interrupted: false,
                    },
                    lane,
                );
            }
        }
        let message = Arc::new(message);
        let mut own: Vec<OwnedSemaphorePermit> = Vec::with_capacity(functions.len());
        while permits.num_permits() > 1 {
            match permits.split(1) {
                Some(p) => own.push(p),
                None => break,
            }
        }
        own.push(permits);
        let deliveries = match &*functions {
            // The common case, without join_all's bookkeeping.
            [function] => vec![
                self.deliver(cancel, message.clone(), function.clone(), own.pop())
                    .await,
            ],
            _ => {
                let deliveries = functions.iter().map(|function| {
                    let permit = own.pop();
                    self.deliver(cancel, message.clone(), function.clone(), permit)
                });
                join_all(deliveries).await
            }
        };
        (
            MessageOutcome {
                id: message.id.clone(),
                deliveries,
                interrupted: false,
            },
            lane,
        )
    }

    /// Strict lanes: whether `message` must be released because an earlier message of its
    /// key was not acknowledged. The failed message itself, submitted again, lifts the
    /// block.
    fn blocked_by_earlier(&self, message: &Message) -> bool {
        if !self.strict_lanes || !self.ordered {
            return false;
        }
        let Some(key) = &message.ordering_key else {
            return false;
        };
        let Ok(mut blocked) = self.blocked.lock() else {
            return false;
        };
        match blocked.get(key) {
            Some((id, until)) if *id != message.id && Instant::now() < *until => true,
            Some(_) => {
                blocked.remove(key);
                false
            }
            None => false,
        }
    }

    /// Strict lanes: blocks `key` after its message `id` ended with `disposition`, unless
    /// a block is already in force (the first failed message is the one to wait for).
    fn block_after(&self, key: &Bytes, id: &str, disposition: Disposition) {
        if !self.strict_lanes || self.drain.is_cancelled() {
            return;
        }
        let delay = match disposition {
            Disposition::Ack => return,
            Disposition::Retry { after } => after,
            Disposition::Hold | Disposition::Release => Duration::ZERO,
        };
        let until = Instant::now() + delay + STRICT_BLOCK_GRACE;
        if let Ok(mut blocked) = self.blocked.lock() {
            let now = Instant::now();
            blocked.retain(|_, (_, until)| *until > now);
            blocked
                .entry(key.clone())
                .or_insert_with(|| (id.to_owned(), until));
        }
    }

    fn leave_lane(&self, key: &Bytes, id: u64) {
        if let Ok(mut lanes) = self.lanes.lock()
            && lanes.get(key).is_some_and(|lane| lane.id == id)
        {
            lanes.remove(key);
        }
    }

    async fn deliver(
        self: &Arc<Self>,
        cancel: &Cancel,
        message: Arc<Message>,
        function: FunctionRef,
        permit: Option<OwnedSemaphorePermit>,
    ) -> DeliveryReport {
        // At debug level: at the default level an info span formatted its fields for
        // every delivery (about 1.5 µs each, dispatch bench with BENCH_LOG=info). The
        // events logged at info and above name the function, topic and ce_id themselves.
        let span = tracing::debug_span!(
            "delivery",
            function = %function,
            topic = %message.topic,
            ce_id = %message.id,
        );
        let report = async {
            let _permit = match permit {
                Some(p) => p,
                None => {
                    tokio::select! {
                        p = self.permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return released(&function, 0),
                        },
                        () = cancel.drain.cancelled() => return released(&function, 0),
                    }
                }
            };
            self.metrics.inflight().inc();
            let report = self.attempts(cancel, &message, &function).await;
            self.metrics.inflight().dec();
            report
        }
        .instrument(span)
        .await;
        self.metrics.delivery_finished(&function, report.outcome);
        report
    }

    async fn attempts(
        &self,
        cancel: &Cancel,
        message: &Arc<Message>,
        function: &FunctionRef,
    ) -> DeliveryReport {
        let policy = &self.policy;
        let mut attempt = message.prior_attempts;
        let mut local = 0u32;
        let mut first_failure: Option<SystemTime> = None;
        loop {
            if cancel.drain.is_cancelled() {
                return released(function, local);
            }
            attempt = attempt.saturating_add(1);
            local += 1;
            if policy.print_request_body {
                tracing::info!(
                    function = %function,
                    topic = %message.topic,
                    ce_id = %message.id,
                    attempt,
                    body = %String::from_utf8_lossy(&message.payload),
                    "invoking"
                );
            }
            let started = Instant::now();
            let result = tokio::select! {
                biased;
                () = cancel.abort.cancelled() => return released(function, local),
                r = self.gateway.invoke(function, message, attempt) => r,
            };
            let took = started.elapsed();
            let (verdict, response, error) = match result {
                Ok(resp) => {
                    self.metrics
                        .invoked(function, status_class(resp.status), took);
                    let verdict =
                        policy
                            .status
                            .classify(resp.status, &resp.headers, SystemTime::now());
                    (verdict, Some(Arc::new(resp)), None)
                }
                Err(e) => {
                    let class = match e {
                        InvokeError::Timeout(_) => "timeout",
                        InvokeError::Transport(_) => "error",
                    };
                    self.metrics.invoked(function, class, took);
                    (
                        policy.status.classify_transport_error(),
                        None,
                        Some(e.to_string()),
                    )
                }
            };
            if !self.subscribers.is_empty() {
                self.subscribers.publish(
                    InvocationResult {
                        topic: message.topic.clone(),
                        message_id: message.id.clone(),
                        function: function.clone(),
                        attempt,
                        duration: took,
                        response: response.clone(),
                        error: error.clone(),
                    },
                    &self.metrics,
                );
            }
            let report = |outcome| DeliveryReport {
                function: function.clone(),
                outcome,
                attempts: local,
                response: response.clone(),
                error: error.clone(),
            };
            match verdict {
                Verdict::Delivered => return report(DeliveryOutcome::Delivered),
                Verdict::Drop => {
                    tracing::info!(
                        function = %function,
                        topic = %message.topic,
                        ce_id = %message.id,
                        status = ?response.as_ref().map(|r| r.status.as_u16()),
                        "dropped by status"
                    );
                    return report(DeliveryOutcome::Dropped);
                }
                Verdict::DeadLetter => {
                    let now = SystemTime::now();
                    let outcome = self
                        .dead_letter(
                            cancel,
                            message,
                            function,
                            DeadLetterReason::Rejected,
                            attempt,
                            (first_failure.unwrap_or(now), now),
                            response.as_deref(),
                            error.as_deref(),
                        )
                        .await;
                    return report(outcome);
                }
                Verdict::Retry { retry_after } => {
                    let now = SystemTime::now();
                    let first = *first_failure.get_or_insert(now);
                    if policy.broker_retries && attempt < policy.max_attempts {
                        // Counted from the broker's redeliveries: the delay grows with
                        // every receive, not only within this process.
                        let after = policy.backoff.delay_with_hint(attempt, retry_after);
                        self.metrics.retried(function);
                        tracing::debug!(
                            attempt,
                            status = ?response.as_ref().map(|r| r.status.as_u16()),
                            error = error.as_deref().unwrap_or(""),
                            redeliver_in = ?after,
                            "attempt failed; the broker redelivers the message"
                        );
                        return report(DeliveryOutcome::Retry { after });
                    }
                    if attempt >= policy.max_attempts {
                        let outcome = self
                            .dead_letter(
                                cancel,
                                message,
                                function,
                                DeadLetterReason::Exhausted,
                                attempt,
                                (first, now),
                                response.as_deref(),
                                error.as_deref(),
                            )
                            .await;
                        return report(outcome);
                    }
                    let delay = policy.backoff.delay_with_hint(local, retry_after);
                    self.metrics.retried(function);
                    tracing::debug!(
                        attempt,
                        status = ?response.as_ref().map(|r| r.status.as_u16()),
                        error = error.as_deref().unwrap_or(""),
                        retry_in = ?delay,
                        "attempt failed; will retry"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.drain.cancelled() => return report(DeliveryOutcome::Released),
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        cancel: &Cancel,
        message: &Arc<Message>,
        function: &FunctionRef,
        reason: DeadLetterReason,
        attempts: u32,
        (first_failure, last_failure): (SystemTime, SystemTime),
        response: Option<&InvocationResponse>,
        error: Option<&str>,
    ) -> DeliveryOutcome {
        let status = response.map(|r| r.status.as_u16());
        let give_up = |why: &str| {
            let outcome = match self.policy.on_exhausted {
                OnExhausted::Block => DeliveryOutcome::Held,
                OnExhausted::Drop => DeliveryOutcome::Dropped,
            };
            tracing::error!(
                function = %function,
                topic = %message.topic,
                ce_id = %message.id,
                reason = reason.as_str(),
                status,
                attempts,
                outcome = outcome.as_str(),
                "delivery failed for good and {why}"
            );
            outcome
        };
        let Some(sink) = &self.dead_letters else {
            return give_up("no dead-letter destination is configured");
        };
        let letter = DeadLetter {
            message: message.clone(),
            function: function.clone(),
            reason,
            status,
            error: error.map(str::to_owned),
            response_excerpt: response
                .map(|r| r.body.slice(..r.body.len().min(RESPONSE_EXCERPT_BYTES)))
                .unwrap_or_default(),
            attempts,
            first_failure,
            last_failure,
        };
        let mut failures = self.policy.backoff.attempts();
        for try_number in 1..=DEAD_LETTER_WRITE_TRIES {
            let written = tokio::select! {
                biased;
                () = cancel.abort.cancelled() => return DeliveryOutcome::Released,
                r = sink.write(&letter) => r,
            };
            match written {
                Ok(()) => {
                    tracing::warn!(
                        function = %function,
                        topic = %message.topic,
                        ce_id = %message.id,
                        reason = reason.as_str(),
                        status,
                        attempts,
                        "dead-lettered"
                    );
                    return DeliveryOutcome::DeadLettered;
                }
                Err(e) => {
                    self.metrics.dead_letter_failed(function);
                    tracing::warn!(
                        function = %function,
                        topic = %message.topic,
                        ce_id = %message.id,
                        error = %e,
                        try_number,
                        "writing the dead letter failed"
                    );
                    if try_number < DEAD_LETTER_WRITE_TRIES {
                        tokio::select! {
                            () = tokio::time::sleep(failures.next_delay()) => {}
                            () = cancel.drain.cancelled() => return DeliveryOutcome::Released,
                        }
                    }
                }
            }
        }
        give_up("writing the dead letter failed")
    }
}

fn released(function: &FunctionRef, attempts: u32) -> DeliveryReport {
    DeliveryReport {
        function: function.clone(),
        outcome: DeliveryOutcome::Released,
        attempts,
        response: None,
        error: None,
    }
}

/// Resolves to the [`MessageOutcome`] of a submitted message once all its deliveries are
/// terminal.
#[derive(Debug)]
pub struct Completion(CompletionState);

#[derive(Debug)]
enum CompletionState {
    /// Known at submission (no subscriber); taken by the first poll.
    Ready(Option<MessageOutcome>),
    /// Sent by the worker delivering the message.
    Pending(oneshot::Receiver<MessageOutcome>),
}

impl Future for Completion {
    type Output = MessageOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<MessageOutcome> {
        let interrupted = || MessageOutcome {
            id: String::new(),
            deliveries: Vec::new(),
            interrupted: true,
        };
        match &mut self.get_mut().0 {
            CompletionState::Ready(outcome) => {
                Poll::Ready(outcome.take().unwrap_or_else(interrupted))
            }
            // The sender is dropped without an outcome only if the worker was torn down
            // (runtime shutdown, panic): the message must go back to the broker.
            CompletionState::Pending(rx) => Pin::new(rx)
                .poll(cx)
                .map(|result| result.unwrap_or_else(|_| interrupted())),
        }
    }
}
