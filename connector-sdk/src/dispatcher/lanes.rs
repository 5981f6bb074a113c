//! Ordering lanes (`ordering = "key"`, or a function's `connector.ordering`): a function
//! receives the messages with the same key one after the other, in the order they were
//! placed; other keys, and functions that are not ordered, run in parallel. A lane is a
//! function's and a key's: a slow or retrying function does not hold up another.
//!
//! With strict lanes (the broker keeps each key's order itself: SQS FIFO) a lane is the
//! key's, for the whole message: a message that may not be acknowledged releases the
//! rest of its lane, and blocks its key for a while (see the module docs of the
//! dispatcher).

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::admission::Job;
use super::cancel::Cancel;
use super::{Dispatcher, Inner, STRICT_BLOCK_GRACE};
use crate::function::FunctionRef;
use crate::message::{DeliveryReport, Disposition, Message};

/// Whose lane: a function's for one key, or (strict lanes) the key's for whole messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct LaneKey {
    pub(super) function: Option<FunctionRef>,
    pub(super) key: Bytes,
}

/// The tail of one ordering lane: the last message queued with a key, and how to learn
/// that it completed (and whether it may be acknowledged).
pub(super) struct Lane {
    id: u64,
    done: oneshot::Receiver<bool>,
}

/// A message's place in its lane: how to signal the next message, and how to learn that
/// the previous one completed.
pub(super) struct LaneTicket {
    pub(super) key: LaneKey,
    pub(super) id: u64,
    pub(super) done: oneshot::Sender<bool>,
    pub(super) previous: Option<oneshot::Receiver<bool>>,
}

/// The lanes an admitted message joins when it is handed to a worker or the queue.
pub(super) enum Lanes {
    /// Strict lanes: the key's lane, for the whole message.
    Whole(Option<LaneTicket>),
    /// The functions (indices into the message's functions) that receive the messages of
    /// its key one after another, and (once placed) their places in those lanes.
    PerFunction {
        ordered: Vec<usize>,
        tickets: Vec<(usize, LaneTicket)>,
    },
}

impl Dispatcher {
    /// Joins the message's lanes: each will wait for the lane's previous message, and
    /// signal the next one. Called in queue order.
    pub(super) fn enter_lane(&self, job: &mut Job) {
        let admission = &mut job.admission;
        let Some(lanes) = admission.lanes.as_deref_mut() else {
            return;
        };
        let Some(key) = admission.message.ordering_key.clone() else {
            return;
        };
        match lanes {
            Lanes::Whole(ticket) => {
                let lane = LaneKey {
                    function: None,
                    key,
                };
                *ticket = Some(self.inner.join(lane));
            }
            Lanes::PerFunction { ordered, tickets } => {
                let functions = &admission.functions;
                *tickets = ordered
                    .iter()
                    .map(|&i| {
                        let lane = LaneKey {
                            function: Some(functions[i].clone()),
                            key: key.clone(),
                        };
                        (i, self.inner.join(lane))
                    })
                    .collect();
            }
        }
    }
}

impl Inner {
    /// The lanes `message` will join: none without a key; with strict lanes the key's
    /// lane when the connector orders; else the lanes of the functions ordered by the
    /// connector's `ordering` or their own `connector.ordering`, if any.
    pub(super) fn lanes_of(
        &self,
        message: &Message,
        functions: &[FunctionRef],
    ) -> Option<Box<Lanes>> {
        message.ordering_key.as_ref()?;
        if self.strict_lanes {
            return self.ordered.then(|| Box::new(Lanes::Whole(None)));
        }
        let ordered: Vec<usize> = if !self.topics.has_policies() {
            if !self.ordered {
                return None;
            }
            (0..functions.len()).collect()
        } else {
            let map = self.topics.current();
            (0..functions.len())
                .filter(|&i| {
                    map.policy(&functions[i])
                        .and_then(|p| p.ordered)
                        .unwrap_or(self.ordered)
                })
                .collect()
        };
        (!ordered.is_empty()).then(|| {
            Box::new(Lanes::PerFunction {
                ordered,
                tickets: Vec::new(),
            })
        })
    }

    /// Takes the next place in `lane`.
    fn join(&self, lane: LaneKey) -> LaneTicket {
        let id = self.next_lane_id.fetch_add(1, AtomicOrdering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        let previous = match self.lanes.lock() {
            Ok(mut lanes) => lanes.insert(lane.clone(), Lane { id, done: done_rx }),
            // A panic elsewhere while holding the lock; ordering cannot be kept, but
            // delivery can.
            Err(_) => None,
        };
        LaneTicket {
            key: lane,
            id,
            done: done_tx,
            previous: previous.map(|lane| lane.done),
        }
    }

    /// One delivery in its function's lane (or, without a ticket, at once): waits for the
    /// function's delivery of the previous message with the key, then for an in-flight
    /// permit, delivers, and lets the lane's next message go.
    pub(super) async fn deliver_in_lane(
        self: &Arc<Self>,
        cancel: &Cancel,
        message: Arc<Message>,
        function: FunctionRef,
        ticket: Option<LaneTicket>,
    ) -> DeliveryReport {
        let Some(ticket) = ticket else {
            return self.deliver(cancel, message, function, None).await;
        };
        if let Some(previous) = ticket.previous {
            // Not strict: the turn comes whatever the previous delivery's verdict.
            self.wait_turn(cancel, &message, previous).await;
        }
        let report = self.deliver(cancel, message, function, None).await;
        let _ = ticket.done.send(true);
        self.leave_lane(&ticket.key, ticket.id);
        report
    }

    /// Waits until the previous message of `message`'s lane completed (or the dispatcher
    /// drains); whether `message` may be delivered now. With strict lanes it may not
    /// when the previous message may not be acknowledged.
    pub(super) async fn wait_turn(
        &self,
        cancel: &Cancel,
        message: &Message,
        previous: oneshot::Receiver<bool>,
    ) -> bool {
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
            return false;
        }
        true
    }

    /// Strict lanes: whether `message` must be released because an earlier message of its
    /// key was not acknowledged. The failed message itself, submitted again, lifts the
    /// block.
    pub(super) fn blocked_by_earlier(&self, message: &Message) -> bool {
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
    pub(super) fn block_after(&self, key: &Bytes, id: &str, disposition: Disposition) {
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

    /// Ends `lane` if message `id` is still its tail: no message follows it.
    pub(super) fn leave_lane(&self, key: &LaneKey, id: u64) {
        if let Ok(mut lanes) = self.lanes.lock()
            && lanes.get(key).is_some_and(|lane| lane.id == id)
        {
            lanes.remove(key);
        }
    }
}
