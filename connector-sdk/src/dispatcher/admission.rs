//! Admission: what happens to a submitted message before a worker has it. Its outcome
//! when that is known at once (no subscriber, a blocked key), its places among the
//! admitted messages of its concurrency-limited functions, and its hand-off to a worker
//! or the queue, where the wait for room is the backpressure.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::completion::released_all;
use super::lanes::Lanes;
use super::pool::Offer;
use super::{Dispatcher, Inner};
use crate::backlog::HeldGuard;
use crate::error::SdkError;
use crate::function::FunctionRef;
use crate::limiter::Limiter;
use crate::message::{Disposition, Message, MessageOutcome};
use crate::policy::PolicyOverrides;

/// What [`Dispatcher::admit`] did with a message.
pub(super) enum Admitted {
    /// Its outcome was known at once.
    Ready(MessageOutcome),
    /// A worker delivers it.
    Run(Admission),
}

/// A message admitted for delivery.
pub(super) struct Admission {
    pub(super) message: Arc<Message>,
    pub(super) functions: Arc<[FunctionRef]>,
    /// Its ordering lanes, when it has any: boxed, so that a message without (the common
    /// case) moves a smaller job through the queue and the futures that carry it.
    pub(super) lanes: Option<Box<Lanes>>,
    /// Keeps `wait_idle` waiting until the message is settled.
    pub(super) token: TaskTrackerToken,
    /// Its places among the admitted messages of its concurrency-limited functions.
    pub(super) tickets: Vec<OwnedSemaphorePermit>,
    /// Counts the message in its functions' backlogs until it is settled.
    pub(super) _held: HeldGuard,
}

/// One message for a worker: deliver it, then send its outcome to its [`Completion`].
///
/// [`Completion`]: super::Completion
pub(super) struct Job {
    pub(super) admission: Admission,
    pub(super) done: oneshot::Sender<MessageOutcome>,
}

impl Dispatcher {
    /// Decides what happens to `message`: its outcome when it is known at once (no
    /// subscriber, a blocked key), else an admission for a worker.
    pub(super) fn admit(&self, message: Arc<Message>, functions: Arc<[FunctionRef]>) -> Admitted {
        if functions.is_empty() {
            tracing::debug!(topic = %message.topic, ce_id = %message.id, held = self.inner.hold_unmatched, "no function subscribes to this topic");
            let held_unmatched = self.inner.hold_unmatched;
            if held_unmatched {
                self.inner.metrics.held_unmatched(&message.topic);
            } else {
                self.inner.metrics.message_finished("unmatched");
            }
            let outcome = MessageOutcome {
                id: message.id.clone(),
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
        let lanes = self.inner.lanes_of(&message, &functions);
        let held = self.inner.metrics.backlogs().hold(functions.clone());
        Admitted::Run(Admission {
            _held: held,
            message,
            functions,
            lanes,
            token: self.inner.tracker.token(),
            tickets: Vec::new(),
        })
    }

    /// Takes the message's places among the admitted messages of each of its functions
    /// that has a concurrency limit, waiting for the function alone (in function order,
    /// so two submitters never wait on each other). Fails when the dispatcher drains.
    pub(super) async fn reserve(&self, admission: &mut Admission) -> Result<(), SdkError> {
        if !self.inner.topics.has_policies() {
            return Ok(());
        }
        let map = self.inner.topics.current();
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

    /// Hands `job` to a worker or the hand-off queue, waiting while both are full. The
    /// message joins its ordering lane at the moment it is placed, so lanes follow the
    /// queue's order. Cancel-safe: a job not yet placed is dropped unseen.
    pub(super) async fn place(&self, job: Job) -> Result<(), SdkError> {
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
}

impl Inner {
    /// `function`'s limiter when `overrides` limit its concurrency; made (or remade, after
    /// its annotations changed) on first use.
    pub(super) fn limiter(
        &self,
        function: &FunctionRef,
        overrides: &PolicyOverrides,
    ) -> Option<Arc<Limiter>> {
        if !overrides.limits_concurrency() {
            return None;
        }
        let max = overrides.max_inflight.unwrap_or(self.max_inflight);
        let batch = self
            .policy
            .batch
            .settings(Some(&overrides.batch))
            .map_or(1, |b| b.size);
        let mut limiters = self
            .limiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match limiters.get(function) {
            Some(l) if l.fits(max, overrides.adaptive, batch) => Some(l.clone()),
            _ => {
                let l = Limiter::new(max, overrides.adaptive, batch);
                limiters.insert(function.clone(), l.clone());
                Some(l)
            }
        }
    }
}
