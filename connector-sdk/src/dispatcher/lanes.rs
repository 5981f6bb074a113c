//! Ordering lanes (`ordering = "key"`): messages with the same key are delivered one
//! after the other, in the order they were placed; other keys run in parallel. With
//! strict lanes, a message that may not be acknowledged releases the rest of its lane,
//! and blocks its key for a while (see the module docs of the dispatcher).

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::admission::Job;
use super::cancel::Cancel;
use super::{Dispatcher, Inner, STRICT_BLOCK_GRACE};
use crate::message::{Disposition, Message};

/// The tail of one ordering lane: the last message queued with a key, and how to learn
/// that it completed (and whether it may be acknowledged).
pub(super) struct Lane {
    id: u64,
    done: oneshot::Receiver<bool>,
}

/// A message's place in its lane: how to signal the next message, and how to learn that
/// the previous one completed.
pub(super) struct LaneTicket {
    pub(super) key: Bytes,
    pub(super) id: u64,
    pub(super) done: oneshot::Sender<bool>,
    pub(super) previous: Option<oneshot::Receiver<bool>>,
}

impl Dispatcher {
    /// Joins the message's lane: it will wait for the lane's previous message, and signal
    /// the next one.
    pub(super) fn enter_lane(&self, job: &mut Job) {
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
}

impl Inner {
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

    /// Ends the lane of `key` if message `id` is still its tail: no message follows it.
    pub(super) fn leave_lane(&self, key: &Bytes, id: u64) {
        if let Ok(mut lanes) = self.lanes.lock()
            && lanes.get(key).is_some_and(|lane| lane.id == id)
        {
            lanes.remove(key);
        }
    }
}
