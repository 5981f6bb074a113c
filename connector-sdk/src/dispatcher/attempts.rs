//! Attempts and verdicts: one delivery (a message to one function) invokes its function
//! until the verdict is terminal, and a delivery that failed for good is dead-lettered.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::Inner;
use super::cancel::{Cancel, UntilAborted};
use super::completion::released;
use crate::backoff::Backoff;
use crate::config::OnExhausted;
use crate::dead_letter::{DeadLetter, DeadLetterReason, RESPONSE_EXCERPT_BYTES};
use crate::gateway::InvokeError;
use crate::message::{DeliveryOutcome, DeliveryReport, InvocationResponse, Message};
use crate::metrics::status_class;
use crate::response::InvocationResult;
use crate::topic_map::FunctionRef;
use crate::verdict::Verdict;

/// How many times writing one dead letter is tried before the delivery is held.
const DEAD_LETTER_WRITE_TRIES: u32 = 3;

impl Inner {
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
