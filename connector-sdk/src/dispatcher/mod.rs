//! The dispatcher: from a message to one delivery per subscribed function, each with its
//! own attempts, and back to one [`MessageOutcome`] the source turns into its ack.
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
//!    most `max_inflight` deliveries run at once). With `ordering = "key"`, it first waits
//!    for the previous message with the same key to complete; other keys run in parallel.
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
//! Shutdown has two steps. [`Dispatcher::drain`]: no new attempt starts (waiting retries,
//! and messages waiting in the hand-off queue or for their lane, are released), running
//! invocations go on. [`Dispatcher::abort`]:
//! running invocations are cancelled and released.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
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
use crate::limiter::Limiter;
use crate::message::{
    DeliveryOutcome, DeliveryReport, Disposition, InvocationResponse, Message, MessageOutcome,
};
use crate::metrics::{Metrics, status_class};
use crate::policy::PolicyOverrides;
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
    /// `topics` is set and `unmatched = "hold"`: a message without a subscriber is held.
    hold_unmatched: bool,
    /// Concurrency limits of the functions that have one (`connector.max_inflight`,
    /// `connector.adaptive`).
    limiters: Mutex<HashMap<FunctionRef, Arc<Limiter>>>,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
    subscribers: Subscribers,
    metrics: Metrics,
    drain: CancellationToken,
    abort: CancellationToken,
    /// Every worker's abort signal.
    signals: Mutex<Vec<Arc<AbortSignal>>>,
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
        Ok(match self.admit(message, functions) {
            Admitted::Ready(outcome) => Completion(CompletionState::Ready(Some(outcome))),
            Admitted::Run(mut admission) => {
                self.reserve(&mut admission).await?;
                let (tx, rx) = oneshot::channel();
                let finish = Finish::Channel(tx);
                self.place(Job { admission, finish }).await?;
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
        match self.admit(message, functions) {
            Admitted::Ready(outcome) => {
                self.inner.tracker.spawn(then(outcome));
            }
            Admitted::Run(mut admission) => {
                self.reserve(&mut admission).await?;
                let finish = Finish::Then(Box::new(move |outcome| Box::pin(then(outcome))));
                self.place(Job { admission, finish }).await?;
            }
        }
        Ok(())
    }

    /// Decides what happens to `message`: its outcome when it is known at once (no
    /// subscriber, a blocked key), else an admission for a worker.
    fn admit(&self, message: Message, functions: Arc<[FunctionRef]>) -> Admitted {
        if functions.is_empty() {
            tracing::debug!(topic = %message.topic, ce_id = %message.id, held = self.inner.hold_unmatched, "no function subscribes to this topic");
            let held_unmatched = self.inner.hold_unmatched;
            if held_unmatched {
                self.inner.metrics.held_unmatched(&message.topic);
            } else {
                self.inner.metrics.message_finished("unmatched");
            }
            let outcome = MessageOutcome {
                id: message.id,
                deliveries: Vec::new(),
                interrupted: false,
                held_unmatched,
            };
            return Admitted::Ready(outcome);
        }
        if self.inner.blocked_by_earlier(&message) {
            tracing::debug!(topic = %message.topic, ce_id = %message.id, "released: its key is blocked by an unacknowledged message");
            self.inner
                .metrics
                .message_finished(Disposition::Release.as_str());
            return Admitted::Ready(released_all(&message, &functions));
        }
        Admitted::Run(Admission {
            // Shared by its deliveries; behind one pointer, the job is cheap to move
            // through the queue and the futures that carry it.
            message: Arc::new(message),
            functions,
            lane: None,
            token: self.inner.tracker.token(),
            tickets: Vec::new(),
        })
    }

    /// Takes the message's places among the admitted messages of each of its functions
    /// that has a concurrency limit, waiting for the function alone (in function order,
    /// so two submitters never wait on each other). Fails when the dispatcher drains.
    async fn reserve(&self, admission: &mut Admission) -> Result<(), SdkError> {
        let map = self.inner.topics.current();
        if !map.has_policies() {
            return Ok(());
        }
        for function in admission.functions.iter() {
            let Some(limiter) = map
                .policy(function)
                .and_then(|o| self.inner.limiter(function, o))
            else {
                continue;
            };
            let ticket = tokio::select! {
                ticket = limiter.admit() => ticket,
                () = self.inner.drain.cancelled() => return Err(SdkError::DispatcherClosed),
            };
            admission.tickets.push(ticket);
        }
        Ok(())
    }

    /// Whether a message of `topic` would be admitted without waiting for a function's
    /// concurrency limit (for sources that must not wait, like Kafka's poll loop).
    pub fn room_for(&self, topic: &str) -> bool {
        let map = self.inner.topics.current();
        if !map.has_policies() {
            return true;
        }
        self.functions_for(topic).iter().all(|function| {
            map.policy(function)
                .and_then(|o| self.inner.limiter(function, o))
                .is_none_or(|l| l.has_room())
        })
    }

    /// Hands `job` to a worker or the hand-off queue, waiting while both are full. The
    /// message joins its ordering lane at the moment it is placed, so lanes follow the
    /// queue's order. Cancel-safe: a job not yet placed is dropped unseen.
    async fn place(&self, job: Job) -> Result<(), SdkError> {
        let pool = &self.inner.pool;
        // The first look registers no waiter: room at once, the common case, costs none.
        let mut job = match pool.offer(&self.inner, job, |job| self.enter_lane(job)) {
            Offer::Taken => return Ok(()),
            Offer::Closed => return Err(SdkError::DispatcherClosed),
            Offer::Full(job) => job,
        };
        loop {
            // Registered before the second look, so a wake-up in between is not lost.
            let room = pool.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            job = match pool.offer(&self.inner, job, |job| self.enter_lane(job)) {
                Offer::Taken => return Ok(()),
                Offer::Closed => return Err(SdkError::DispatcherClosed),
                Offer::Full(job) => job,
            };
            room.await;
        }
    }

    /// Joins the message's lane: it will wait for the lane's previous message, and signal
    /// the next one.
    fn enter_lane(&self, job: &mut Job) {
        if !self.inner.ordered {
            return;
        }
        let Some(key) = job.admission.message.ordering_key.clone() else {
            return;
        };
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
        job.admission.lane = Some(LaneTicket {
            key,
            id,
            done: done_tx,
            previous: previous.map(|lane| lane.done),
        });
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
}

/// What [`Dispatcher::admit`] did with a message.
enum Admitted {
    /// Its outcome was known at once.
    Ready(MessageOutcome),
    /// A worker delivers it.
    Run(Admission),
}

/// A message admitted for delivery.
struct Admission {
    message: Arc<Message>,
    functions: Arc<[FunctionRef]>,
    /// Its place in its ordering lane, taken when it is handed to a worker or the queue.
    lane: Option<LaneTicket>,
    /// Keeps `wait_idle` waiting until the message is settled.
    token: TaskTrackerToken,
    /// Its places among the admitted messages of its concurrency-limited functions.
    tickets: Vec<OwnedSemaphorePermit>,
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

/// The workers that deliver messages, and the hand-off queue in front of them.
///
/// A worker takes one message at a time and stays alive between messages, so a delivery
/// costs neither a task spawn nor moving a task's state around. A message goes to an idle
/// worker, to a new worker (at most `max_inflight` of them), or into the queue; a worker
/// that finished takes the next message from the queue itself. While the source keeps
/// the queue supplied, no message costs a wake-up: workers never park, and a submitter
/// waiting for room is woken once the queue is down to half, not for every message. At
/// `max_inflight` 64 this is what brings the dispatcher close to a plain loop of HTTP
/// calls (see BENCHMARKS.md).
///
/// Invariants, under the state lock: a worker parks only when the queue is empty, and an
/// offered message goes to a parked worker before the queue, so there is never a parked
/// worker while messages wait. The queue is FIFO and lanes are entered in queue order, so
/// the oldest message a worker holds never waits for its lane: there is no deadlock
/// however few workers there are.
struct Pool {
    state: Mutex<PoolState>,
    /// Submitters waiting for room in the queue.
    room: tokio::sync::Notify,
}

struct PoolState {
    queue: VecDeque<Job>,
    /// How many messages the queue holds at most.
    capacity: usize,
    idle: Vec<Arc<Slot>>,
    /// Workers alive, idle or busy.
    workers: usize,
    max_workers: usize,
    closed: bool,
    /// A submitter found the queue full: wake submitters once it is down to half.
    waiting: bool,
}

/// What [`Pool::offer`] did with a job.
enum Offer {
    Taken,
    /// No room; the job is given back.
    Full(Job),
    /// Draining: the job was dropped.
    Closed,
}

/// Where an idle worker waits for its next message; a wake-up without one means: look
/// at the queue (or exit, when the pool is closed).
#[derive(Default)]
struct Slot {
    job: Mutex<Option<Job>>,
    wake: tokio::sync::Notify,
}

/// What a worker does next.
enum Next {
    Run(Job),
    Park,
    Exit,
}

impl Pool {
    /// A pool of at most `max_workers` workers, with a queue of as many places. With
    /// half as many the dispatch bench's deliveries ran at 0.85 of the client loop
    /// instead of 0.94 (21 rounds each): workers found the queue empty before the
    /// source, woken at half, had refilled it.
    fn new(max_workers: usize) -> Self {
        let capacity = max_workers.max(1);
        Self {
            state: Mutex::new(PoolState {
                // Grown on demand: `max_inflight` may be configured far above what is
                // ever queued.
                queue: VecDeque::new(),
                capacity,
                idle: Vec::new(),
                workers: 0,
                max_workers,
                closed: false,
                waiting: false,
            }),
            room: tokio::sync::Notify::new(),
        }
    }

    /// Hands `job` to an idle worker, a new worker or the queue, calling `placed` on it
    /// first (under the pool's lock, so jobs are placed in the order `placed` sees them).
    fn offer(&self, inner: &Arc<Inner>, mut job: Job, placed: impl FnOnce(&mut Job)) -> Offer {
        let Ok(mut state) = self.state.lock() else {
            // A worker panicked while holding the lock: run the job on a worker of its
            // own rather than lose it.
            placed(&mut job);
            spawn_worker(inner.clone(), Some(job));
            return Offer::Taken;
        };
        if state.closed {
            return Offer::Closed;
        }
        if let Some(slot) = state.idle.pop() {
            placed(&mut job);
            drop(state);
            match slot.job.lock() {
                Ok(mut next) => *next = Some(job),
                // Its worker panicked while holding this lock; start another instead.
                Err(_) => {
                    spawn_worker(inner.clone(), Some(job));
                    return Offer::Taken;
                }
            }
            slot.wake.notify_one();
            return Offer::Taken;
        }
        if state.workers < state.max_workers {
            state.workers += 1;
            placed(&mut job);
            drop(state);
            spawn_worker(inner.clone(), Some(job));
            return Offer::Taken;
        }
        if state.queue.len() < state.capacity {
            placed(&mut job);
            state.queue.push_back(job);
            return Offer::Taken;
        }
        state.waiting = true;
        Offer::Full(job)
    }

    /// The next job for a worker: from the queue, else park (`slot` is registered as
    /// idle), else exit when the pool is closed.
    fn next(&self, slot: &Arc<Slot>) -> Next {
        let Ok(mut state) = self.state.lock() else {
            return Next::Exit;
        };
        if let Some(job) = state.queue.pop_front() {
            let wake = state.waiting && state.queue.len() <= state.capacity / 2;
            if wake {
                state.waiting = false;
            }
            drop(state);
            if wake {
                self.room.notify_waiters();
            }
            return Next::Run(job);
        }
        if state.closed {
            return Next::Exit;
        }
        state.idle.push(slot.clone());
        Next::Park
    }

    /// Messages `offer` takes right now.
    fn room_now(&self) -> usize {
        match self.state.lock() {
            Ok(state) if !state.closed => {
                state.idle.len()
                    + state.max_workers.saturating_sub(state.workers)
                    + (state.capacity - state.queue.len())
            }
            _ => 0,
        }
    }

    /// Refuses new jobs; idle workers exit, busy ones once their message is finished.
    /// Queued messages are finished at once on a task of their own: with the in-flight
    /// permits closed (drain), each is released without an invocation.
    fn close(&self, inner: &Arc<Inner>) {
        let (idle, queued) = match self.state.lock() {
            Ok(mut state) => {
                state.closed = true;
                (
                    std::mem::take(&mut state.idle),
                    std::mem::take(&mut state.queue),
                )
            }
            Err(_) => return,
        };
        for slot in idle {
            slot.wake.notify_one();
        }
        self.room.notify_waiters();
        if queued.is_empty() {
            return;
        }
        // Without a runtime (dropped outside one) the jobs are dropped: their completions
        // resolve as interrupted, which releases the messages too.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let inner = inner.clone();
            runtime.spawn(async move {
                let cancel = Cancel::new(&inner);
                for job in queued {
                    inner.execute(&cancel, job).await;
                }
            });
        }
    }
}

/// A worker's own children of the dispatcher's drain and abort tokens, and its abort
/// signal. Checking or awaiting a token locks its node; with one node per worker,
/// deliveries on both runtime threads do not contend for the dispatcher's. The tokens
/// serve the rare waits (lanes, backoff, dead letters); the invocation, on every
/// delivery, watches the cheaper signal.
struct Cancel {
    drain: CancellationToken,
    abort: CancellationToken,
    signal: Arc<AbortSignal>,
}

impl Cancel {
    fn new(inner: &Inner) -> Self {
        let signal = Arc::new(AbortSignal::default());
        if let Ok(mut signals) = inner.signals.lock() {
            // Those of workers that ended are held by this list alone.
            signals.retain(|s| Arc::strong_count(s) > 1);
            signals.push(signal.clone());
        }
        // `abort` cancels its token before it fires the listed signals: one of the two
        // reaches this worker.
        let abort = inner.abort.child_token();
        if abort.is_cancelled() {
            signal.fire();
        }
        Self {
            drain: inner.drain.child_token(),
            abort,
            signal,
        }
    }
}

/// Interrupts the invocation a worker is running when the dispatcher aborts: a flag and
/// a waker, which an invocation polls for two atomic operations. A cancellation token's
/// `cancelled()` locks a mutex on every poll, and to register and unregister its waiter:
/// about 400 instructions per delivery (callgrind, dispatch bench).
#[derive(Default)]
struct AbortSignal {
    aborted: AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl AbortSignal {
    fn fire(&self) {
        self.aborted.store(true, AtomicOrdering::Release);
        self.waker.wake();
    }
}

pin_project_lite::pin_project! {
    /// `inner`'s output, or `None` once the signal fired.
    struct UntilAborted<'a, F> {
        signal: &'a AbortSignal,
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for UntilAborted<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.signal.aborted.load(AtomicOrdering::Acquire) {
            return Poll::Ready(None);
        }
        this.signal.waker.register(cx.waker());
        // Fired between the first look and the registration: its wake-up went elsewhere.
        if this.signal.aborted.load(AtomicOrdering::Acquire) {
            return Poll::Ready(None);
        }
        this.inner.poll(cx).map(Some)
    }
}

/// Counts a worker out of the pool when it ends, even by a panic; then, if messages are
/// still queued, starts a worker for them.
struct Alive(Arc<Inner>);

impl Drop for Alive {
    fn drop(&mut self) {
        let Ok(mut state) = self.0.pool.state.lock() else {
            return;
        };
        if !state.queue.is_empty() && state.workers <= 1 {
            // The last worker ended with messages queued (a panic): keep them moving,
            // unless the runtime itself is going away.
            drop(state);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(work(self.0.clone(), None));
            }
            return;
        }
        state.workers = state.workers.saturating_sub(1);
    }
}

/// Starts a worker, counted in the pool's `workers` by the caller; it runs `first`, then
/// whatever the queue holds, until the pool closes.
fn spawn_worker(inner: Arc<Inner>, first: Option<Job>) {
    tokio::spawn(work(inner, first));
}

/// A worker's life.
async fn work(inner: Arc<Inner>, first: Option<Job>) {
    let alive = Alive(inner);
    let inner = &alive.0;
    let slot = Arc::new(Slot::default());
    let cancel = Cancel::new(inner);
    if let Some(job) = first {
        inner.execute(&cancel, job).await;
    }
    loop {
        match inner.pool.next(&slot) {
            Next::Run(job) => inner.execute(&cancel, job).await,
            Next::Exit => return,
            Next::Park => {
                slot.wake.notified().await;
                let handed = slot.job.lock().ok().and_then(|mut next| next.take());
                if let Some(job) = handed {
                    inner.execute(&cancel, job).await;
                }
            }
        }
    }
}

struct LaneTicket {
    key: Bytes,
    id: u64,
    done: oneshot::Sender<bool>,
    previous: Option<oneshot::Receiver<bool>>,
}

impl Inner {
    /// `function`'s limiter when `overrides` limit its concurrency; made (or remade, after
    /// its annotations changed) on first use.
    fn limiter(&self, function: &FunctionRef, overrides: &PolicyOverrides) -> Option<Arc<Limiter>> {
        if !overrides.limits_concurrency() {
            return None;
        }
        let max = overrides.max_inflight.unwrap_or(self.max_inflight);
        let mut limiters = self
            .limiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match limiters.get(function) {
            Some(l) if l.fits(max, overrides.adaptive) => Some(l.clone()),
            _ => {
                let l = Limiter::new(max, overrides.adaptive);
                limiters.insert(function.clone(), l.clone());
                Some(l)
            }
        }
    }

    /// Delivers a message, records its outcome, lets its lane go on, and finishes it.
    async fn execute(self: &Arc<Self>, cancel: &Cancel, job: Job) {
        let Job { admission, finish } = job;
        let (outcome, lane) = self
            .run(
                cancel,
                admission.message,
                admission.functions,
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
        message: Arc<Message>,
        functions: Arc<[FunctionRef]>,
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
                return (released_all(&message, &functions), lane);
            }
        }
        // Permits for as many deliveries as may run at once; a fan-out wider than
        // `max_inflight` acquires the rest one by one. The semaphore is closed on drain:
        // a message still waiting is released.
        let wanted = u32::try_from(functions.len().min(self.max_inflight)).unwrap_or(u32::MAX);
        let mut permits = match self.permits.clone().try_acquire_many_owned(wanted) {
            Ok(permits) => permits,
            Err(_) => match self.permits.clone().acquire_many_owned(wanted).await {
                Ok(permits) => permits,
                Err(_) => return (released_all(&message, &functions), lane),
            },
        };
        let deliveries = match &*functions {
            // The common case, without splitting permits or join_all's bookkeeping.
            [function] => vec![
                self.deliver(cancel, message.clone(), function.clone(), Some(permits))
                    .await,
            ],
            _ => {
                let mut own: Vec<OwnedSemaphorePermit> = Vec::with_capacity(functions.len());
                while permits.num_permits() > 1 {
                    match permits.split(1) {
                        Some(p) => own.push(p),
                        None => break,
                    }
                }
                own.push(permits);
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
                held_unmatched: false,
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
        // The function's own settings, where its annotations override the connector's.
        let overrides = self.topics.policy_for(function);
        let own = overrides.as_deref();
        let max_attempts = own
            .and_then(|o| o.max_attempts)
            .unwrap_or(policy.max_attempts);
        let backoff = match own {
            Some(o) => {
                let initial = o.min_wait.unwrap_or(policy.backoff.initial);
                Backoff {
                    initial,
                    max: o.max_wait.unwrap_or(policy.backoff.max).max(initial),
                }
            }
            None => policy.backoff,
        };
        let status = own
            .and_then(|o| o.status.as_ref())
            .unwrap_or(&policy.status);
        let timeout = own.and_then(|o| o.timeout);
        let limiter = own.and_then(|o| self.limiter(function, o));
        let _running = match &limiter {
            Some(l) => tokio::select! {
                running = l.run() => Some(running),
                () = cancel.drain.cancelled() => return released(function, 0),
            },
            None => None,
        };
        let mut attempt = message.prior_attempts;
        let mut local = 0u32;
        let mut first_failure: Option<SystemTime> = None;
        loop {
            // Closed by `drain`; read without the drain token's lock.
            if self.permits.is_closed() {
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
            let invocation = UntilAborted {
                signal: &cancel.signal,
                inner: self.gateway.invoke(function, message, attempt, timeout),
            };
            let Some(result) = invocation.await else {
                return released(function, local);
            };
            let took = started.elapsed();
            let (verdict, response, error) = match result {
                Ok(resp) => {
                    self.metrics
                        .invoked(function, status_class(resp.status), took);
                    let verdict = status.classify(resp.status, &resp.headers, SystemTime::now());
                    if let Some(l) = &limiter {
                        if resp.status == http::StatusCode::TOO_MANY_REQUESTS {
                            l.throttled();
                        } else if verdict == Verdict::Delivered {
                            l.succeeded();
                        }
                    }
                    (verdict, Some(Arc::new(resp)), None)
                }
                Err(e) => {
                    let class = match e {
                        InvokeError::Timeout(_) => "timeout",
                        InvokeError::Transport(_) => "error",
                    };
                    self.metrics.invoked(function, class, took);
                    (status.classify_transport_error(), None, Some(e.to_string()))
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
                    if policy.broker_retries && attempt < max_attempts {
                        // Counted from the broker's redeliveries: the delay grows with
                        // every receive, not only within this process.
                        let after = backoff.delay_with_hint(attempt, retry_after);
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
                    if attempt >= max_attempts {
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
                    let delay = backoff.delay_with_hint(local, retry_after);
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

/// The outcome of a message none of whose deliveries started.
fn released_all(message: &Message, functions: &[FunctionRef]) -> MessageOutcome {
    MessageOutcome {
        id: message.id.clone(),
        deliveries: functions.iter().map(|f| released(f, 0)).collect(),
        interrupted: false,
        held_unmatched: false,
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
            held_unmatched: false,
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
