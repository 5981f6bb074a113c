//! Completion: a message's deliveries assembled into its [`MessageOutcome`], and the
//! outcome handed to the [`Completion`] future its submitter holds.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::join_all;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::Inner;
use super::admission::Job;
use super::cancel::{Cancel, FinishOnDrop, Handoff};
use super::lanes::{LaneKey, LaneTicket, Lanes};
use crate::function::FunctionRef;
use crate::message::{DeliveryOutcome, DeliveryReport, Disposition, Message, MessageOutcome};

impl Inner {
    /// Delivers a message, records its outcome, lets its lane go on, and finishes it. A
    /// message with deliveries to functions that take batches is handed to a task of its
    /// own once those have their places (see `batch.rs`): a worker is not held for a
    /// batch's window.
    pub(super) async fn execute(self: &Arc<Self>, cancel: &Cancel, job: Job) {
        let batched = if self.may_batch() {
            job.admission
                .functions
                .iter()
                .filter(|f| self.batcher_of(f).is_some())
                .count()
        } else {
            0
        };
        if batched == 0 {
            return self.finish(cancel, job).await;
        }
        let handoff = Arc::new(Handoff::new(batched));
        let inner = self.clone();
        let own = Cancel::detached(cancel, self, handoff.clone());
        tokio::spawn(async move {
            let _finished = own.handoff.clone().map(FinishOnDrop);
            inner.finish(&own, job).await;
        });
        handoff.wait().await;
    }

    /// [`execute`](Self::execute) on this task.
    async fn finish(self: &Arc<Self>, cancel: &Cancel, job: Job) {
        let Job { admission, done } = job;
        crate::trace::dispatched(&admission.message);
        let (outcome, lane) = self
            .run(
                cancel,
                admission.message,
                admission.functions,
                admission.lanes,
            )
            .await;
        let disposition = outcome.disposition();
        self.metrics.message_finished(disposition.as_str());
        if let Some((key, id, done)) = lane {
            self.block_after(&key.key, &outcome.id, disposition);
            let _ = done.send(disposition == Disposition::Ack);
            self.leave_lane(&key, id);
        }
        let _ = done.send(outcome);
        // Only now may `wait_idle` return.
        drop(admission.token);
    }

    /// Waits for the message's turn in its lane and for in-flight permits, runs its
    /// deliveries, and assembles their reports into the message's outcome. Returns the
    /// message's lane place too, for `execute` to pass on.
    async fn run(
        self: &Arc<Self>,
        cancel: &Cancel,
        message: Arc<Message>,
        functions: Arc<[FunctionRef]>,
        lanes: Option<Box<Lanes>>,
    ) -> (
        MessageOutcome,
        Option<(LaneKey, u64, oneshot::Sender<bool>)>,
    ) {
        let lane = match lanes.map(|lanes| *lanes) {
            Some(Lanes::Whole(ticket)) => ticket,
            Some(Lanes::PerFunction { tickets, .. }) if !tickets.is_empty() => {
                let deliveries = self
                    .run_in_lanes(cancel, &message, &functions, tickets)
                    .await;
                let outcome = MessageOutcome {
                    id: message.id.clone(),
                    deliveries,
                    interrupted: false,
                    held_unmatched: false,
                };
                return (outcome, None);
            }
            Some(Lanes::PerFunction { .. }) | None => None,
        };
        let (previous, lane) = match lane {
            Some(t) => (t.previous, Some((t.key, t.id, t.done))),
            None => (None, None),
        };
        if let Some(previous) = previous
            && !self.wait_turn(cancel, &message, previous).await
        {
            return (released_all(&message, &functions), lane);
        }
        if cancel.handoff.is_some() {
            // Some deliveries take batch places instead of in-flight permits: each
            // delivery takes its own.
            let deliveries = functions
                .iter()
                .map(|function| self.deliver(cancel, message.clone(), function.clone(), None));
            let deliveries = join_all(deliveries).await;
            let outcome = MessageOutcome {
                id: message.id.clone(),
                deliveries,
                interrupted: false,
                held_unmatched: false,
            };
            return (outcome, lane);
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
}

impl Inner {
    /// The deliveries of a message some of whose functions keep their order: each of
    /// those waits for its function's lane before it takes a permit (so a waiting
    /// delivery holds none); the others start at once.
    async fn run_in_lanes(
        self: &Arc<Self>,
        cancel: &Cancel,
        message: &Arc<Message>,
        functions: &[FunctionRef],
        mut tickets: Vec<(usize, LaneTicket)>,
    ) -> Vec<DeliveryReport> {
        if let [function] = functions {
            let ticket = tickets.pop().map(|(_, t)| t);
            let delivery = self.deliver_in_lane(cancel, message.clone(), function.clone(), ticket);
            return vec![delivery.await];
        }
        let deliveries = functions.iter().enumerate().map(|(i, function)| {
            let ticket = tickets
                .iter()
                .position(|(j, _)| *j == i)
                .map(|at| tickets.swap_remove(at).1);
            self.deliver_in_lane(cancel, message.clone(), function.clone(), ticket)
        });
        join_all(deliveries).await
    }
}

/// The outcome of a message none of whose deliveries started.
pub(super) fn released_all(message: &Message, functions: &[FunctionRef]) -> MessageOutcome {
    MessageOutcome {
        id: message.id.clone(),
        deliveries: functions.iter().map(|f| released(f, 0)).collect(),
        interrupted: false,
        held_unmatched: false,
    }
}

/// The report of a delivery released after `attempts` attempts, with no response kept.
pub(super) fn released(function: &FunctionRef, attempts: u32) -> DeliveryReport {
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
pub struct Completion(CompletionState, Option<opentelemetry::Context>);

#[derive(Debug)]
enum CompletionState {
    /// Known at submission (no subscriber); taken by the first poll.
    Ready(Option<MessageOutcome>),
    /// Sent by the worker delivering the message.
    Pending(oneshot::Receiver<MessageOutcome>),
}

impl Completion {
    /// A completion whose outcome was known at submission.
    pub(super) fn ready(outcome: MessageOutcome) -> Self {
        Self(CompletionState::Ready(Some(outcome)), None)
    }

    /// A completion the worker delivering the message resolves through `rx`.
    pub(super) fn pending(rx: oneshot::Receiver<MessageOutcome>) -> Self {
        Self(CompletionState::Pending(rx), None)
    }
}

impl Completion {
    /// With the message's span (traces on), for the acknowledgement to end.
    pub(super) fn traced(mut self, cx: Option<opentelemetry::Context>) -> Self {
        self.1 = cx;
        self
    }

    /// The message's span, taken for its acknowledgement ([`crate::source`] settles
    /// under it). Dropped with the completion otherwise: the span then ends there.
    pub(crate) fn take_trace(&mut self) -> Option<opentelemetry::Context> {
        self.1.take()
    }
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
