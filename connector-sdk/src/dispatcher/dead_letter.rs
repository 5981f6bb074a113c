//! Dead-letter writing: a delivery that failed for good goes to the dead-letter sink,
//! tried a few times; when that is impossible it is held or dropped (`on_exhausted`).

use std::sync::Arc;
use std::time::SystemTime;

use super::Inner;
use super::attempts::Delivery;
use crate::config::OnExhausted;
use crate::dead_letter::{DeadLetter, DeadLetterReason, DeadLetterSink, RESPONSE_EXCERPT_BYTES};
use crate::message::{DeliveryOutcome, InvocationResponse};

/// How many times writing one dead letter is tried before the delivery is held.
const DEAD_LETTER_WRITE_TRIES: u32 = 3;

/// How a delivery failed for good: what its dead letter records.
pub(super) struct Failure<'a> {
    pub(super) reason: DeadLetterReason,
    /// The attempt number of the last attempt, counting the broker's earlier receives.
    pub(super) attempts: u32,
    pub(super) first_failure: SystemTime,
    pub(super) last_failure: SystemTime,
    /// The last response, if one arrived.
    pub(super) response: Option<&'a InvocationResponse>,
    /// The last transport error, if the last attempt had no response.
    pub(super) error: Option<&'a str>,
}

impl Failure<'_> {
    /// The last response's status code.
    fn status(&self) -> Option<u16> {
        self.response.map(|r| r.status.as_u16())
    }

    /// The dead letter of `delivery`.
    fn letter(&self, delivery: Delivery<'_>) -> DeadLetter {
        DeadLetter {
            message: delivery.message.clone(),
            function: delivery.function.clone(),
            reason: self.reason,
            status: self.status(),
            error: self.error.map(str::to_owned),
            response_excerpt: self
                .response
                .map(|r| r.body.slice(..r.body.len().min(RESPONSE_EXCERPT_BYTES)))
                .unwrap_or_default(),
            attempts: self.attempts,
            first_failure: self.first_failure,
            last_failure: self.last_failure,
        }
    }
}

impl Inner {
    /// Writes the dead letter of a delivery that failed for good, retrying a failed write
    /// after a backoff. The delivery is released when the dispatcher aborts (or drains
    /// during a backoff), and held or dropped when no letter can be written.
    pub(super) async fn dead_letter(
        &self,
        delivery: Delivery<'_>,
        failure: Failure<'_>,
    ) -> DeliveryOutcome {
        let Some(sink) = &self.dead_letters else {
            return self.give_up(
                delivery,
                &failure,
                "no dead-letter destination is configured",
            );
        };
        let Delivery {
            message, function, ..
        } = delivery;
        let letter = failure.letter(delivery);
        let write = async {
            let outcome = self.write_letter(delivery, &failure, sink, &letter).await;
            (outcome, outcome == DeliveryOutcome::DeadLettered)
        };
        crate::trace::dead_letter_span(message, function, failure.reason.as_str(), write).await
    }

    /// Writes `letter` to `sink`, tried [`DEAD_LETTER_WRITE_TRIES`] times.
    async fn write_letter(
        &self,
        delivery: Delivery<'_>,
        failure: &Failure<'_>,
        sink: &Arc<dyn DeadLetterSink>,
        letter: &DeadLetter,
    ) -> DeliveryOutcome {
        let Delivery {
            cancel,
            message,
            function,
        } = delivery;
        let mut failures = self.policy.backoff.attempts();
        for try_number in 1..=DEAD_LETTER_WRITE_TRIES {
            let written = tokio::select! {
                biased;
                () = cancel.abort.cancelled() => return DeliveryOutcome::Released,
                r = sink.write(letter) => r,
            };
            match written {
                Ok(()) => {
                    tracing::warn!(
                        function = %function,
                        topic = %message.topic,
                        ce_id = %message.id,
                        reason = failure.reason.as_str(),
                        status = failure.status(),
                        attempts = failure.attempts,
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
        self.give_up(delivery, failure, "writing the dead letter failed")
    }

    /// The outcome of a delivery that failed for good and could not be dead-lettered:
    /// held or dropped, as `on_exhausted` says; logged with `why`.
    fn give_up(&self, delivery: Delivery<'_>, failure: &Failure<'_>, why: &str) -> DeliveryOutcome {
        let outcome = match self.policy.on_exhausted {
            OnExhausted::Block => DeliveryOutcome::Held,
            OnExhausted::Drop => DeliveryOutcome::Dropped,
        };
        tracing::error!(
            function = %delivery.function,
            topic = %delivery.message.topic,
            ce_id = %delivery.message.id,
            reason = failure.reason.as_str(),
            status = failure.status(),
            attempts = failure.attempts,
            outcome = outcome.as_str(),
            "delivery failed for good and {why}"
        );
        outcome
    }
}
