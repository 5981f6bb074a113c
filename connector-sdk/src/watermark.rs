//! A contiguous watermark: how far a source may acknowledge when its broker takes one
//! position ("everything before here is done") rather than per-message acks.
//!
//! Kafka commits an offset per partition, PostgreSQL confirms one LSN per replication
//! slot: both may only move past messages whose deliveries are all terminal, while
//! messages complete out of order. [`Watermark`] keeps the positions still pending (with
//! how many messages each has: a PostgreSQL transaction carries several changes, one
//! position) and the *frontier*, the position up to which everything was received. The
//! commit point is the lowest pending position, or the frontier when nothing is pending.
//!
//! A message that is held or released is not settled: its position stays pending and
//! nothing at or past it is committed until it completes (after a redelivery) or the
//! process restarts from the last commit. [`hold`](Watermark::hold) and
//! [`release`](Watermark::release) record why, for a source that tells the two apart
//! (Kafka stalls a partition at a held record, and delivers it again with
//! [`retry`](Watermark::retry)).

use std::collections::BTreeMap;

/// The messages still pending at one position, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    /// Being delivered.
    working: u32,
    /// Failed for good and kept by the broker: the stream stalls here.
    held: u32,
    /// Given back (a shutdown cut them short): the next reader delivers them again.
    released: u32,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.working == 0 && self.held == 0 && self.released == 0
    }
}

/// Pending positions and the frontier of one stream (a partition, a slot).
#[derive(Debug, Clone)]
pub struct Watermark<P> {
    /// Positions with messages not yet complete.
    pending: BTreeMap<P, Slot>,
    /// Everything below it was received (and is pending or complete).
    frontier: Option<P>,
    /// The last commit point handed out by [`take_commit`](Self::take_commit).
    committed: Option<P>,
}

impl<P> Default for Watermark<P> {
    fn default() -> Self {
        Self {
            pending: BTreeMap::new(),
            frontier: None,
            committed: None,
        }
    }
}

impl<P: Ord + Copy> Watermark<P> {
    /// An empty watermark: nothing received, nothing to commit.
    pub fn new() -> Self {
        Self::default()
    }

    /// One more message at `at`, pending until [`settle`](Self::settle)d. `at` must not
    /// be below the frontier's last commit (a redelivery after a restart starts afresh).
    pub fn receive(&mut self, at: P) {
        self.pending.entry(at).or_default().working += 1;
    }

    /// One message at `at` is complete (one being delivered, else a held one, else a
    /// released one). Returns `false` when none was pending there (settled twice, or
    /// from before a [`reset`](Self::reset)).
    pub fn settle(&mut self, at: P) -> bool {
        let Some(slot) = self.pending.get_mut(&at) else {
            return false;
        };
        if slot.working > 0 {
            slot.working -= 1;
        } else if slot.held > 0 {
            slot.held -= 1;
        } else {
            slot.released = slot.released.saturating_sub(1);
        }
        if slot.is_empty() {
            self.pending.remove(&at);
        }
        true
    }

    /// One message at `at` being delivered is held: pending, and counted by
    /// [`is_held`](Self::is_held). Returns `false` when none was being delivered there.
    pub fn hold(&mut self, at: P) -> bool {
        self.move_one(at, |s| &mut s.working, |s| &mut s.held)
    }

    /// One held message at `at` is delivered again. Returns whether one was held.
    pub fn retry(&mut self, at: P) -> bool {
        self.move_one(at, |s| &mut s.held, |s| &mut s.working)
    }

    /// One message at `at` being delivered (else a held one) is given back: pending
    /// until a restart. Returns `false` when none was pending there.
    pub fn release(&mut self, at: P) -> bool {
        self.move_one(at, |s| &mut s.working, |s| &mut s.released)
            || self.move_one(at, |s| &mut s.held, |s| &mut s.released)
    }

    fn move_one(
        &mut self,
        at: P,
        from: impl Fn(&mut Slot) -> &mut u32,
        to: impl Fn(&mut Slot) -> &mut u32,
    ) -> bool {
        let Some(slot) = self.pending.get_mut(&at) else {
            return false;
        };
        if *from(slot) == 0 {
            return false;
        }
        *from(slot) -= 1;
        *to(slot) += 1;
        true
    }

    /// Everything below `to` was received: the frontier moves there (never back).
    pub fn advance(&mut self, to: P) {
        if self.frontier.is_none_or(|f| to > f) {
            self.frontier = Some(to);
        }
    }

    /// Where everything below was received; `None` before anything was.
    pub fn frontier(&self) -> Option<P> {
        self.frontier
    }

    /// The position everything before which is complete: the lowest pending one, else
    /// the frontier. `None` before anything was received.
    pub fn commit_point(&self) -> Option<P> {
        self.pending.keys().next().copied().or(self.frontier)
    }

    /// The commit point, when it moved past the last one taken; marked as taken.
    pub fn take_commit(&mut self) -> Option<P> {
        let point = self.commit_point()?;
        if self.committed.is_some_and(|c| point <= c) {
            return None;
        }
        self.committed = Some(point);
        Some(point)
    }

    /// Committing `at`, taken by [`take_commit`](Self::take_commit), failed: the next
    /// `take_commit` hands it out again.
    pub fn commit_failed(&mut self, at: P) {
        if self.committed == Some(at) {
            self.committed = None;
        }
    }

    /// Messages not complete yet.
    pub fn pending(&self) -> u64 {
        self.pending
            .values()
            .map(|s| u64::from(s.working) + u64::from(s.held) + u64::from(s.released))
            .sum()
    }

    /// Messages being delivered (neither held nor released).
    pub fn in_flight(&self) -> u64 {
        self.pending.values().map(|s| u64::from(s.working)).sum()
    }

    /// Whether a message is held.
    pub fn is_held(&self) -> bool {
        self.pending.values().any(|s| s.held > 0)
    }

    /// Whether a message at `at` is not complete yet.
    pub fn is_pending(&self, at: P) -> bool {
        self.pending.contains_key(&at)
    }

    /// Forgets everything pending and the frontier (the stream is read again from the
    /// last commit); the last commit is kept, so no commit goes back.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.frontier = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_past_complete_positions() {
        let mut w = Watermark::new();
        assert_eq!(w.take_commit(), None, "nothing received");
        // A transaction at 10 with two changes, then one at 20 with one.
        w.advance(10);
        w.receive(10);
        w.receive(10);
        w.advance(15);
        w.advance(20);
        w.receive(20);
        w.advance(25);
        assert_eq!(w.take_commit(), Some(10));
        assert!(w.settle(20));
        assert_eq!(w.take_commit(), None, "10 is still pending");
        assert!(w.settle(10));
        assert_eq!(w.take_commit(), None, "one change of 10 is left");
        assert_eq!(w.pending(), 1);
        assert!(w.settle(10));
        assert_eq!(w.take_commit(), Some(25));
        assert!(!w.settle(10), "settled twice");
        assert_eq!(w.take_commit(), None, "no progress");
        w.advance(30);
        assert_eq!(w.take_commit(), Some(30), "an idle stream moves on");
    }

    #[test]
    fn a_never_settled_position_holds_every_later_one() {
        let mut w = Watermark::new();
        for at in [1, 2, 3] {
            w.advance(at);
            w.receive(at);
        }
        w.settle(1);
        w.settle(3);
        w.advance(4);
        assert_eq!(w.take_commit(), Some(2));
        w.advance(9);
        assert_eq!(w.take_commit(), None);
        w.reset();
        assert_eq!(w.pending(), 0);
        w.advance(2);
        assert_eq!(w.take_commit(), None, "never back past the last commit");
        w.advance(5);
        assert_eq!(w.take_commit(), Some(5));
    }

    #[test]
    fn held_and_released_positions_stay_pending_and_are_told_apart() {
        let mut w = Watermark::new();
        for at in [1, 2, 3] {
            w.advance(at + 1);
            w.receive(at);
        }
        assert_eq!(w.in_flight(), 3);
        assert!(w.hold(1));
        assert!(!w.hold(1), "nothing left being delivered at 1");
        assert!(w.is_held());
        assert!(w.release(2));
        assert_eq!((w.in_flight(), w.pending()), (1, 3));
        assert!(w.settle(3));
        assert_eq!(w.take_commit(), Some(1), "held at 1");
        assert!(w.retry(1));
        assert!(!w.is_held());
        assert!(w.settle(1));
        assert_eq!(w.take_commit(), Some(2), "released at 2");
        assert!(w.is_pending(2));
        assert!(w.settle(2));
        assert_eq!(w.take_commit(), Some(4));
        w.commit_failed(4);
        assert_eq!(
            w.take_commit(),
            Some(4),
            "a failed commit is handed out again"
        );
        assert_eq!(w.frontier(), Some(4));
    }
}
