//! Attempts and verdicts: one delivery (a message to one function) invokes its function
//! until the verdict is terminal. Each attempt is classified into a verdict; acting on it
//! ends the delivery (delivered, dropped, dead-lettered or held, retried by the broker) or
//! waits a backoff and tries again.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::batch::{Batcher, Bounds, ItemResult};
use super::cancel::{Cancel, UntilAborted};
use super::completion::released;
use super::dead_letter::Failure;
use super::{Inner, Policy};
use crate::backoff::Backoff;
use crate::dead_letter::DeadLetterReason;
use crate::function::FunctionRef;
use crate::gateway::InvokeError;
use crate::limiter::Limiter;
use crate::message::{DeliveryOutcome, DeliveryReport, InvocationResponse, Message};
use crate::metrics::{UnderWay, status_class};
use crate::policy::{BatchSettings, PolicyOverrides};
use crate::response::InvocationResult;
use crate::trace::AttemptSpan;
use crate::verdict::{StatusClasses, Verdict};

/// One delivery: a message to one function, on the worker whose cancellation it obeys.
#[derive(Clone, Copy)]
pub(super) struct Delivery<'a> {
    pub(super) cancel: &'a Cancel,
    pub(super) message: &'a Arc<Message>,
    pub(super) function: &'a FunctionRef,
}

/// A delivery's effective policy: the connector's settings, where the function's
/// annotations override them. Read once per delivery, so a topic-map swap never changes
/// the rules of a delivery under way.
struct DeliveryPolicy<'a> {
    connector: &'a Policy,
    /// The function's own settings, if its annotations have any.
    overrides: Option<Arc<PolicyOverrides>>,
    max_attempts: u32,
    backoff: Backoff,
    /// One invocation's timeout; `None`: the gateway client's.
    timeout: Option<Duration>,
    /// The function's concurrency limit, if it has one.
    limiter: Option<Arc<Limiter>>,
    /// The function's batches, if it takes batches.
    batcher: Option<Arc<Batcher>>,
}

impl DeliveryPolicy<'_> {
    /// Which statuses are delivered, retried, dead-lettered or dropped.
    fn status(&self) -> &StatusClasses {
        self.overrides
            .as_deref()
            .and_then(|o| o.status.as_ref())
            .unwrap_or(&self.connector.status)
    }
}

/// Where a delivery's attempts stand.
struct Tally {
    /// The attempt number, counting the broker's earlier receives (`prior_attempts`).
    attempt: u32,
    /// Attempts made in this process.
    local: u32,
    /// When the first attempt failed with a retryable verdict, for the dead letter.
    first_failure: Option<SystemTime>,
}

/// What one attempt came to.
struct Tried {
    verdict: Verdict,
    response: Option<Arc<InvocationResponse>>,
    /// The transport error, when no response arrived.
    error: Option<String>,
}

impl Tried {
    /// The response's status code, for the logs.
    fn status(&self) -> Option<u16> {
        self.response.as_ref().map(|r| r.status.as_u16())
    }

    /// The delivery's report, ending with this attempt after `attempts` in this process.
    fn report(
        self,
        function: &FunctionRef,
        outcome: DeliveryOutcome,
        attempts: u32,
    ) -> DeliveryReport {
        DeliveryReport {
            function: function.clone(),
            outcome,
            attempts,
            response: self.response,
            error: self.error,
        }
    }
}

/// A verdict's name, for the attempt's span.
fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Delivered => "delivered",
        Verdict::Retry { .. } => "retry",
        Verdict::DeadLetter => "dead_letter",
        Verdict::Drop => "drop",
    }
}

/// What a delivery does after acting on a verdict.
enum Then {
    /// It ends with this outcome.
    End(DeliveryOutcome),
    /// It tries again after this delay.
    RetryIn(Duration),
}

impl Inner {
    /// One delivery, under its own span: waits for an in-flight permit unless it brings
    /// one, makes its attempts, and counts its outcome.
    pub(super) async fn deliver(
        self: &Arc<Self>,
        cancel: &Cancel,
        message: Arc<Message>,
        function: FunctionRef,
        permit: Option<OwnedSemaphorePermit>,
    ) -> DeliveryReport {
        // At debug level: at the default level an info span formatted its fields for
        // every delivery (about 1.5 µs each, dispatch bench with BENCH_LOG=info). The
        // events logged at info and above name the function, topic and ce_id themselves.
        // `trace{trace_id}` when the message has a trace; the context passed on to the
        // function when traces are off.
        let (log_span, passthrough) = crate::trace::delivery(&message);
        // Made inside `trace`, so that it is its child: a log line's spans are the current
        // span and its parents, not every span entered around it.
        let span = log_span.in_scope(|| {
            tracing::debug_span!(
                "delivery",
                function = %function,
                topic = %message.topic,
                ce_id = %message.id,
            )
        });
        let report = async {
            let policy = self.delivery_policy(&function);
            // A function that takes batches: its delivery holds one of the batcher's
            // places, not an in-flight one (its batch takes that when it is sent).
            let batcher = policy.batcher.clone();
            let _permit = match (batcher, permit) {
                (Some(batcher), permit) => {
                    drop(permit);
                    let place = tokio::select! {
                        p = batcher.place() => p,
                        () = cancel.drain.cancelled() => None,
                    };
                    let Some(place) = place else {
                        return released(&function, 0);
                    };
                    if let Some(handoff) = &cancel.handoff {
                        handoff.placed();
                    }
                    place
                }
                (None, Some(p)) => p,
                (None, None) => {
                    tokio::select! {
                        p = self.permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return released(&function, 0),
                        },
                        () = cancel.drain.cancelled() => return released(&function, 0),
                    }
                }
            };
            let mut under_way = self.metrics.under_way(&function);
            let delivery = Delivery {
                cancel,
                message: &message,
                function: &function,
            };
            self.attempts(delivery, &policy, passthrough.as_ref(), &mut under_way)
                .await
        }
        .instrument(span)
        .instrument(log_span)
        .await;
        self.metrics.delivery_finished(&function, report.outcome);
        report
    }

    /// `function`'s effective policy for one delivery.
    fn delivery_policy(&self, function: &FunctionRef) -> DeliveryPolicy<'_> {
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
        let timeout = own.and_then(|o| o.timeout);
        let limiter = own.and_then(|o| self.limiter(function, o));
        let batcher = policy
            .batch
            .settings(own.map(|o| &o.batch))
            .and_then(|settings| self.batcher(function, settings, timeout, limiter.as_ref()));
        DeliveryPolicy {
            connector: policy,
            overrides,
            max_attempts,
            backoff,
            timeout,
            limiter,
            batcher,
        }
    }

    /// Attempts the delivery until the verdict is terminal, each attempt within its
    /// function's concurrency limit, and waits the backoff between attempts outside it:
    /// a delivery waiting to retry does not keep another message of the function from
    /// running.
    async fn attempts(
        &self,
        delivery: Delivery<'_>,
        policy: &DeliveryPolicy<'_>,
        passthrough: Option<&opentelemetry::Context>,
        under_way: &mut UnderWay,
    ) -> DeliveryReport {
        let Delivery {
            cancel,
            message,
            function,
        } = delivery;
        if let Some(report) = self.screen(delivery, policy).await {
            return report;
        }
        let mut tally = Tally {
            attempt: message.prior_attempts,
            local: 0,
            first_failure: None,
        };
        loop {
            // A batch takes its place under the function's limit when it is sent.
            let limiter = policy.limiter.as_ref().filter(|_| policy.batcher.is_none());
            let running = match limiter {
                Some(l) => tokio::select! {
                    running = l.run() => Some(running),
                    () = cancel.drain.cancelled() => return released(function, tally.local),
                },
                None => None,
            };
            // Closed by `drain`; read without the drain token's lock.
            if self.permits.is_closed() {
                return released(function, tally.local);
            }
            tally.attempt = tally.attempt.saturating_add(1);
            tally.local += 1;
            let span = AttemptSpan::start(message, function, tally.attempt);
            let trace = span.as_ref().map(AttemptSpan::context).or(passthrough);
            let Some(tried) = self.attempt(delivery, policy, tally.attempt, trace).await else {
                return released(function, tally.local);
            };
            let then = self.act_on(delivery, policy, &mut tally, &tried).await;
            if let Some(span) = span {
                let retry_delay = match then {
                    Then::RetryIn(delay) | Then::End(DeliveryOutcome::Retry { after: delay }) => {
                        Some(delay)
                    }
                    Then::End(_) => None,
                };
                span.finish(
                    tried.status(),
                    tried.error.as_deref(),
                    verdict_name(tried.verdict),
                    retry_delay,
                );
            }
            let delay = match then {
                Then::End(outcome) => return tried.report(function, outcome, tally.local),
                Then::RetryIn(delay) => delay,
            };
            drop(running);
            under_way.set_waiting(true);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.drain.cancelled() => {
                    return tried.report(function, DeliveryOutcome::Released, tally.local);
                }
            }
            under_way.set_waiting(false);
        }
    }

    /// The function's filter, if it has one, on the message: the delivery's report when
    /// the filter rejects it (filtered) or fails on it (dead-lettered), else `None`.
    async fn screen(
        &self,
        delivery: Delivery<'_>,
        policy: &DeliveryPolicy<'_>,
    ) -> Option<DeliveryReport> {
        let filter = policy.overrides.as_deref()?.filter.as_ref()?;
        let Delivery {
            message, function, ..
        } = delivery;
        let (outcome, error) = match filter.matches(message, self.gateway.default_event_type()) {
            Ok(true) => return None,
            Ok(false) => (DeliveryOutcome::Filtered, None),
            Err(e) => {
                self.metrics.filter_failed(function);
                let error = e.to_string();
                tracing::warn!(function = %function, topic = %message.topic, ce_id = %message.id, error = %error, "the function's filter failed on this message");
                let now = SystemTime::now();
                let failure = Failure {
                    reason: DeadLetterReason::FilterFailed,
                    attempts: message.prior_attempts,
                    first_failure: now,
                    last_failure: now,
                    response: None,
                    error: Some(&error),
                };
                (self.dead_letter(delivery, failure).await, Some(error))
            }
        };
        Some(DeliveryReport {
            function: function.clone(),
            outcome,
            attempts: 0,
            response: None,
            error,
        })
    }

    /// One attempt: invokes the function, counts the invocation, tells the function's
    /// limiter how it went, offers the result to subscribers, and classifies it. `None`
    /// when the dispatcher aborted the invocation.
    async fn attempt(
        &self,
        delivery: Delivery<'_>,
        policy: &DeliveryPolicy<'_>,
        attempt: u32,
        trace: Option<&opentelemetry::Context>,
    ) -> Option<Tried> {
        let Delivery {
            cancel,
            message,
            function,
        } = delivery;
        if self.policy.print_request_body {
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
        if let Some(batcher) = &policy.batcher {
            let joined = UntilAborted {
                signal: &cancel.signal,
                inner: batcher.join(message, attempt, trace),
            };
            let tried = Self::batch_item(policy, joined.await?)?;
            if !self.subscribers.is_empty() {
                self.publish(delivery, attempt, started.elapsed(), &tried);
            }
            return Some(tried);
        }
        let invocation = UntilAborted {
            signal: &cancel.signal,
            inner: self
                .gateway
                .invoke_traced(function, message, attempt, policy.timeout, trace),
        };
        let result = invocation.await?;
        let took = started.elapsed();
        let tried = match result {
            Ok(resp) => {
                self.metrics
                    .invoked(function, status_class(resp.status), took);
                let verdict =
                    policy
                        .status()
                        .classify(resp.status, &resp.headers, SystemTime::now());
                if let Some(l) = &policy.limiter {
                    if resp.status == http::StatusCode::TOO_MANY_REQUESTS {
                        l.throttled();
                    } else if verdict == Verdict::Delivered {
                        l.succeeded();
                    }
                }
                Tried {
                    verdict,
                    response: Some(Arc::new(resp)),
                    error: None,
                }
            }
            Err(e) => {
                let class = match e {
                    InvokeError::Timeout(_) => "timeout",
                    InvokeError::Transport(_) => "error",
                };
                self.metrics.invoked(function, class, took);
                Tried {
                    verdict: policy.status().classify_transport_error(),
                    response: None,
                    error: Some(e.to_string()),
                }
            }
        };
        if !self.subscribers.is_empty() {
            self.publish(delivery, attempt, took, &tried);
        }
        Some(tried)
    }

    /// What a batch's invocation came to for one item: the response's verdict, retryable
    /// when the function listed the item in `batchItemFailures`; `None` when the batch was
    /// not sent (draining).
    fn batch_item(policy: &DeliveryPolicy<'_>, result: ItemResult) -> Option<Tried> {
        match result {
            ItemResult::Response {
                response,
                failed: true,
            } => Some(Tried {
                verdict: Verdict::Retry { retry_after: None },
                response: Some(response),
                error: Some("listed in the batch's batchItemFailures".to_owned()),
            }),
            ItemResult::Response { response, .. } => Some(Tried {
                verdict: policy.status().classify(
                    response.status,
                    &response.headers,
                    SystemTime::now(),
                ),
                response: Some(response),
                error: None,
            }),
            ItemResult::Error(error) => Some(Tried {
                verdict: policy.status().classify_transport_error(),
                response: None,
                error: Some(error),
            }),
            ItemResult::Released => None,
        }
    }

    /// Whether any function may take batches: the connector's default batch size, or
    /// some function's annotations. Without, no delivery looks for a batcher.
    pub(super) fn may_batch(&self) -> bool {
        self.policy.batch.size > 1 || self.topics.has_policies()
    }

    /// `function`'s batcher, if it takes batches.
    pub(super) fn batcher_of(&self, function: &FunctionRef) -> Option<Arc<Batcher>> {
        self.delivery_policy(function).batcher
    }

    /// `function`'s batcher for `settings`, `timeout` and `limiter`; made (or remade,
    /// after its annotations changed) on first use.
    fn batcher(
        &self,
        function: &FunctionRef,
        settings: BatchSettings,
        timeout: Option<Duration>,
        limiter: Option<&Arc<Limiter>>,
    ) -> Option<Arc<Batcher>> {
        let mut batchers = self
            .batchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match batchers.get(function) {
            Some(b) if b.fits(settings, timeout, limiter) => Some(b.clone()),
            _ => {
                let running = self
                    .topics
                    .policy_for(function)
                    .and_then(|o| o.max_inflight)
                    .unwrap_or(self.max_inflight);
                let b = Batcher::new(
                    function.clone(),
                    settings,
                    timeout,
                    self.gateway.clone(),
                    self.metrics.clone(),
                    Bounds {
                        permits: self.permits.clone(),
                        limiter: limiter.cloned(),
                        running,
                    },
                );
                batchers.insert(function.clone(), b.clone());
                Some(b)
            }
        }
    }

    /// Offers an attempt's result to the response subscribers.
    fn publish(&self, delivery: Delivery<'_>, attempt: u32, took: Duration, tried: &Tried) {
        self.subscribers.publish(
            InvocationResult {
                topic: delivery.message.topic.clone(),
                message_id: delivery.message.id.clone(),
                function: delivery.function.clone(),
                attempt,
                duration: took,
                response: tried.response.clone(),
                error: tried.error.clone(),
            },
            &self.metrics,
        );
    }

    /// Acts on an attempt's verdict: the delivery ends, or tries again after a delay.
    async fn act_on(
        &self,
        delivery: Delivery<'_>,
        policy: &DeliveryPolicy<'_>,
        tally: &mut Tally,
        tried: &Tried,
    ) -> Then {
        match tried.verdict {
            Verdict::Delivered => Then::End(DeliveryOutcome::Delivered),
            Verdict::Drop => {
                tracing::info!(
                    function = %delivery.function,
                    topic = %delivery.message.topic,
                    ce_id = %delivery.message.id,
                    status = ?tried.status(),
                    "dropped by status"
                );
                Then::End(DeliveryOutcome::Dropped)
            }
            Verdict::DeadLetter => {
                let now = SystemTime::now();
                let failure = Failure {
                    reason: DeadLetterReason::Rejected,
                    attempts: tally.attempt,
                    first_failure: tally.first_failure.unwrap_or(now),
                    last_failure: now,
                    response: tried.response.as_deref(),
                    error: tried.error.as_deref(),
                };
                Then::End(self.dead_letter(delivery, failure).await)
            }
            Verdict::Retry { retry_after } => {
                self.on_retryable(delivery, policy, tally, tried, retry_after)
                    .await
            }
        }
    }

    /// Acts on a retryable failure: the broker retries (broker retries, attempts left),
    /// the delivery is dead-lettered (no attempts left), or it waits a backoff of at
    /// least `retry_after` and tries again.
    async fn on_retryable(
        &self,
        delivery: Delivery<'_>,
        policy: &DeliveryPolicy<'_>,
        tally: &mut Tally,
        tried: &Tried,
        retry_after: Option<Duration>,
    ) -> Then {
        let now = SystemTime::now();
        let first = *tally.first_failure.get_or_insert(now);
        let attempt = tally.attempt;
        if policy.connector.broker_retries && attempt < policy.max_attempts {
            // Counted from the broker's redeliveries: the delay grows with
            // every receive, not only within this process.
            let after = policy.backoff.delay_with_hint(attempt, retry_after);
            self.metrics.retried(delivery.function);
            tracing::debug!(
                attempt,
                status = ?tried.status(),
                error = tried.error.as_deref().unwrap_or(""),
                redeliver_in = ?after,
                "attempt failed; the broker redelivers the message"
            );
            return Then::End(DeliveryOutcome::Retry { after });
        }
        if attempt >= policy.max_attempts {
            let failure = Failure {
                reason: DeadLetterReason::Exhausted,
                attempts: attempt,
                first_failure: first,
                last_failure: now,
                response: tried.response.as_deref(),
                error: tried.error.as_deref(),
            };
            return Then::End(self.dead_letter(delivery, failure).await);
        }
        let delay = policy.backoff.delay_with_hint(tally.local, retry_after);
        self.metrics.retried(delivery.function);
        tracing::debug!(
            attempt,
            status = ?tried.status(),
            error = tried.error.as_deref().unwrap_or(""),
            retry_in = ?delay,
            "attempt failed; will retry"
        );
        Then::RetryIn(delay)
    }
}
