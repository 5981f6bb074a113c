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
//! A message that is held or released is simply never settled: its position stays
//! pending and nothing at or past it is committed until it completes (after a
//! redelivery) or the process restarts from the last commit.

use std::collections::BTreeMap;

/// Pending positions and the frontier of one stream (a partition, a slot).
#[derive(Debug, Clone)]
pub struct Watermark<P> {
    /// Positions with messages not yet complete, and how many.
    pending: BTreeMap<P, u32>,
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
        *self.pending.entry(at).or_insert(0) += 1;
    }

    /// One message at `at` is complete. Returns `false` when none was pending there
    /// (settled twice, or from before a [`reset`](Self::reset)).
    pub fn settle(&mut self, at: P) -> bool {
        match self.pending.get_mut(&at) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.pending.remove(&at);
                true
            }
            None => false,
        }
    }

    /// Everything below `to` was received: the frontier moves there (never back).
    pub fn advance(&mut self, to: P) {
        if self.frontier.is_none_or(|f| to > f) {
            self.frontier = Some(to);
        }
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

    /// Messages not complete yet.
    pub fn pending(&self) -> u64 {
        self.pending.values().map(|n| u64::from(*n)).sum()
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
}
