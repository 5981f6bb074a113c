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
    tracker: TaskTracker,
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
        Dispatcher {
            inner: Arc::new(Inner {
                gateway: self.gateway,
                topics: self.topics,
                matcher: self.matcher,
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
            }),
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
        match &self.inner.matcher {
            Some(matcher) => matcher(&map, topic),
            None => map.lookup(topic).cloned().unwrap_or_else(|| Arc::new([])),
        }
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
        Ok(
            match self
                .start(message, functions, |outcome| async move { outcome })
                .await?
            {
                Started::Task(task) => Completion(CompletionState::Task(task)),
                Started::Ready(outcome, _) => Completion(CompletionState::Ready(Some(outcome))),
            },
        )
    }

    /// Like [`submit`](Self::submit), but instead of returning a [`Completion`] to await,
    /// runs `then` with the outcome at the end of the message's own task. That saves a
    /// task and a wake-up per message for a source whose settling needs no state of the
    /// loop that submitted (Kafka: mark the offset). [`wait_idle`](Self::wait_idle)
    /// waits for `then` too. When the dispatcher is draining, `then` is not run and the
    /// error says so.
    pub async fn submit_then<F, Fut>(&self, message: Message, then: F) -> Result<(), SdkError>
    where
        F: FnOnce(MessageOutcome) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let functions = self.functions_for(&message.topic);
        if let Started::Ready(outcome, then) = self.start(message, functions, then).await? {
            self.inner.tracker.spawn(then(outcome));
        }
        Ok(())
    }

    /// Starts the message's task, which ends with `finish(outcome)`; or, when the outcome
    /// is known at once (no subscriber, a blocked key), gives it back with `finish`.
    async fn start<F, Fut, T>(
        &self,
        message: Message,
        functions: Arc<[FunctionRef]>,
        finish: F,
    ) -> Result<Started<F, T>, SdkError>
    where
        F: FnOnce(MessageOutcome) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        if functions.is_empty() {
            tracing::debug!(topic = %message.topic, ce_id = %message.id, "no function subscribes to this topic");
            self.inner.metrics.message_finished("unmatched");
            let outcome = MessageOutcome {
                id: message.id,
                deliveries: Vec::new(),
                interrupted: false,
            };
            return Ok(Started::Ready(outcome, finish));
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
            return Ok(Started::Ready(outcome, finish));
        }
        let wanted = functions.len().min(self.inner.max_inflight);
        let permits = self
            .inner
            .permits
            .clone()
            .acquire_many_owned(u32::try_from(wanted).unwrap_or(u32::MAX))
            .await
            .map_err(|_| SdkError::DispatcherClosed)?;
        let previous = self.enter_lane(&message);
        let inner = self.inner.clone();
        let task = self.inner.tracker.spawn(async move {
            let (outcome, lane) = inner.run(message, functions, permits, previous).await;
            let disposition = outcome.disposition();
            inner.metrics.message_finished(disposition.as_str());
            if let Some((key, _, _)) = &lane {
                inner.block_after(key, &outcome.id, disposition);
            }
            if let Some((key, id, done)) = lane {
                let _ = done.send(disposition == Disposition::Ack);
                inner.leave_lane(&key, id);
            }
            finish(outcome).await
        });
        Ok(Started::Task(task))
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

/// What [`Dispatcher::start`] did with a message.
enum Started<F, T> {
    /// Its task runs and ends with the finishing step's result.
    Task(tokio::task::JoinHandle<T>),
    /// Its outcome was known at once; the finishing step was not run.
    Ready(MessageOutcome, F),
}

struct LaneTicket {
    key: Bytes,
    id: u64,
    done: oneshot::Sender<bool>,
    previous: Option<oneshot::Receiver<bool>>,
}

impl Inner {
    async fn run(
        self: &Arc<Self>,
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
                () = self.drain.cancelled() => true,
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
                self.deliver(message.clone(), function.clone(), own.pop())
                    .await,
            ],
            _ => {
                let deliveries = functions.iter().map(|function| {
                    let permit = own.pop();
                    self.deliver(message.clone(), function.clone(), permit)
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
                        () = self.drain.cancelled() => return released(&function, 0),
                    }
                }
            };
            self.metrics.inflight().inc();
            let report = self.attempts(&message, &function).await;
            self.metrics.inflight().dec();
            report
        }
        .instrument(span)
        .await;
        self.metrics.delivery_finished(&function, report.outcome);
        report
    }

    async fn attempts(&self, message: &Arc<Message>, function: &FunctionRef) -> DeliveryReport {
        let policy = &self.policy;
        let mut attempt = message.prior_attempts;
        let mut local = 0u32;
        let mut first_failure: Option<SystemTime> = None;
        loop {
            if self.drain.is_cancelled() {
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
                () = self.abort.cancelled() => return released(function, local),
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
                        () = self.drain.cancelled() => return report(DeliveryOutcome::Released),
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
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
                () = self.abort.cancelled() => return DeliveryOutcome::Released,
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
                            () = self.drain.cancelled() => return DeliveryOutcome::Released,
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
    /// The task delivering the message.
    Task(tokio::task::JoinHandle<MessageOutcome>),
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
            // The task fails only if it was torn down (runtime shutdown, panic): the message
            // must go back to the broker.
            CompletionState::Task(task) => Pin::new(task)
                .poll(cx)
                .map(|result| result.unwrap_or_else(|_| interrupted())),
        }
    }
}
