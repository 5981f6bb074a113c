//! The watermark engine: which offset of each partition may be committed.
//!
//! Every record is registered when it arrives from the broker, before anything else can
//! happen to it, and stays *pending* until its message is acknowledged (all deliveries
//! delivered, dead-lettered or dropped by choice). The commit point of a partition is the
//! lowest pending offset, or one past the last received offset when nothing is pending:
//! the contiguous prefix of completed offsets. A record that is held (it failed for good
//! and could not be dead-lettered) or released (shutdown cut it short) stays pending, so
//! nothing past it is ever committed. Gaps in the offsets (compaction, transaction
//! markers) need no special case: only offsets that arrived can be pending.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// `topic` / `partition`.
    pub fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Why an offset is not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Waiting for the dispatcher, or parked while its partition is paused.
    InFlight,
    /// Failed for good and not dead-lettered: the partition holds here.
    Held,
    /// Cut short by shutdown: the next owner delivers it again.
    Released,
}

/// One partition's bookkeeping.
#[derive(Debug, Default, Clone)]
pub struct PartitionOffsets {
    pending: BTreeMap<i64, Pending>,
    /// One past the last offset received.
    next: Option<i64>,
    /// The last offset committed (or being committed) by this process.
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// The offset to commit: everything below it is complete. `None` before the first
    /// record.
    pub fn commit_point(&self) -> Option<i64> {
        self.pending.keys().next().copied().or(self.next)
    }

    /// Whether a record is held here.
    pub fn is_held(&self) -> bool {
        self.pending.values().any(|p| *p == Pending::Held)
    }

    /// Records not yet complete that are still being worked on.
    pub fn in_flight(&self) -> usize {
        self.pending
            .values()
            .filter(|p| **p == Pending::InFlight)
            .count()
    }

    /// Whether `offset` is not complete yet.
    pub fn is_pending(&self, offset: i64) -> bool {
        self.pending.contains_key(&offset)
    }

    /// One past the last offset received.
    pub fn next(&self) -> Option<i64> {
        self.next
    }
}

/// The outcome of a registered record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Complete: may be committed past.
    Ack,
    /// Held: the partition stalls here.
    Hold,
    /// Released: not committed, delivered again by the next owner.
    Release,
}

/// Every assigned partition's bookkeeping.
#[derive(Debug, Default)]
pub struct Watermarks {
    partitions: HashMap<TopicPartition, PartitionOffsets>,
}

impl Watermarks {
    /// Starts tracking `tp` (assigned). Keeps what is known if it is tracked already.
    pub fn assign(&mut self, tp: TopicPartition) {
        self.partitions.entry(tp).or_default();
    }

    /// Stops tracking `tp` (revoked or lost); later outcomes for it are ignored.
    pub fn revoke(&mut self, tp: &TopicPartition) -> Option<PartitionOffsets> {
        self.partitions.remove(tp)
    }

    /// Whether `tp` is tracked.
    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.partitions.contains_key(tp)
    }

    /// One partition's state.
    pub fn get(&self, tp: &TopicPartition) -> Option<&PartitionOffsets> {
        self.partitions.get(tp)
    }

    /// Registers a received record. Returns `false` for a record already seen (a
    /// re-fetch after pause or seek): it must not be delivered twice by this process.
    pub fn received(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        let p = self.partitions.entry(tp.clone()).or_default();
        if p.next.is_some_and(|next| offset < next) {
            return false;
        }
        p.next = Some(offset + 1);
        p.pending.insert(offset, Pending::InFlight);
        true
    }

    /// Records the outcome of `offset`. Returns `false` if the partition is no longer
    /// tracked (revoked meanwhile) or the offset was not pending.
    pub fn settle(&mut self, tp: &TopicPartition, offset: i64, settled: Settled) -> bool {
        let Some(p) = self.partitions.get_mut(tp) else {
            return false;
        };
        match (p.pending.get_mut(&offset), settled) {
            (None, _) => false,
            (Some(_), Settled::Ack) => {
                p.pending.remove(&offset);
                true
            }
            (Some(state), Settled::Hold) => {
                *state = Pending::Held;
                true
            }
            (Some(state), Settled::Release) => {
                *state = Pending::Released;
                true
            }
        }
    }

    /// A held record is delivered again: in flight once more. Returns whether it was
    /// held.
    pub fn retry(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        match self
            .partitions
            .get_mut(tp)
            .and_then(|p| p.pending.get_mut(&offset))
        {
            Some(state) if *state == Pending::Held => {
                *state = Pending::InFlight;
                true
            }
            _ => false,
        }
    }

    /// Whether a record of `tp` is held.
    pub fn is_held(&self, tp: &TopicPartition) -> bool {
        self.partitions
            .get(tp)
            .is_some_and(PartitionOffsets::is_held)
    }

    /// Commit points that moved past what was last committed, marked as committed.
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        self.take_commits_where(|_| true)
    }

    /// The same for the partitions `select` accepts.
    pub fn take_commits_where(
        &mut self,
        mut select: impl FnMut(&TopicPartition) -> bool,
    ) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            if !select(tp) {
                continue;
            }
            if let Some(point) = p.commit_point()
                && p.committed.is_none_or(|c| point > c)
            {
                p.committed = Some(point);
                out.push((tp.clone(), point));
            }
        }
        out.sort();
        out
    }

    /// A commit of `offset` for `tp` failed: commit it again next time.
    pub fn commit_failed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp)
            && p.committed == Some(offset)
        {
            p.committed = None;
        }
    }

    /// Records still being worked on in `tp`.
    pub fn in_flight(&self, tp: &TopicPartition) -> usize {
        self.partitions
            .get(tp)
            .map_or(0, PartitionOffsets::in_flight)
    }

    /// Records still being worked on, in all partitions.
    pub fn total_in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(PartitionOffsets::in_flight)
            .sum()
    }

    /// Marks every in-flight record of `tp` released (parked records at shutdown).
    pub fn release_in_flight(&mut self, tp: &TopicPartition, offsets: &[i64]) {
        if let Some(p) = self.partitions.get_mut(tp) {
            for o in offsets {
                if let Some(state) = p.pending.get_mut(o) {
                    *state = Pending::Released;
                }
            }
        }
    }

    /// Every tracked partition.
    pub fn partitions(&self) -> impl Iterator<Item = (&TopicPartition, &PartitionOffsets)> {
        self.partitions.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> TopicPartition {
        TopicPartition::new("t", 0)
    }

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut w = Watermarks::default();
        w.assign(tp());
        assert!(
            w.take_commits().is_empty(),
            "nothing received, nothing to commit"
        );
        for o in 10..15 {
            assert!(w.received(&tp(), o));
        }
        assert_eq!(w.take_commits(), [(tp(), 10)]);
        w.settle(&tp(), 11, Settled::Ack);
        w.settle(&tp(), 13, Settled::Ack);
        assert!(w.take_commits().is_empty(), "10 is still pending");
        w.settle(&tp(), 10, Settled::Ack);
        assert_eq!(w.take_commits(), [(tp(), 12)]);
        w.settle(&tp(), 12, Settled::Ack);
        w.settle(&tp(), 14, Settled::Ack);
        assert_eq!(w.take_commits(), [(tp(), 15)]);
        assert!(w.take_commits().is_empty(), "no commit without progress");
    }

    #[test]
    fn a_held_record_is_never_committed_past() {
        let mut w = Watermarks::default();
        for o in 0..5 {
            w.received(&tp(), o);
        }
        w.settle(&tp(), 0, Settled::Ack);
        w.settle(&tp(), 1, Settled::Hold);
        for o in 2..5 {
            w.settle(&tp(), o, Settled::Ack);
        }
        assert_eq!(w.take_commits(), [(tp(), 1)]);
        assert!(w.get(&tp()).unwrap().is_held());
        w.received(&tp(), 5);
        w.settle(&tp(), 5, Settled::Ack);
        assert!(w.take_commits().is_empty());
        // Delivered again, then dead-lettered: the partition moves on.
        assert!(w.retry(&tp(), 1));
        assert!(!w.is_held(&tp()));
        assert!(w.take_commits().is_empty(), "in flight again");
        w.settle(&tp(), 1, Settled::Ack);
        assert_eq!(w.take_commits(), [(tp(), 6)]);
        assert!(!w.retry(&tp(), 1));
    }

    #[test]
    fn released_records_stay_uncommitted() {
        let mut w = Watermarks::default();
        for o in 0..3 {
            w.received(&tp(), o);
        }
        w.settle(&tp(), 0, Settled::Ack);
        w.settle(&tp(), 1, Settled::Release);
        w.settle(&tp(), 2, Settled::Ack);
        assert_eq!(w.take_commits(), [(tp(), 1)]);
        assert_eq!(w.total_in_flight(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_not_waited_for() {
        let mut w = Watermarks::default();
        for o in [3, 7, 8] {
            w.received(&tp(), o);
        }
        for o in [3, 7, 8] {
            w.settle(&tp(), o, Settled::Ack);
        }
        assert_eq!(w.take_commits(), [(tp(), 9)]);
    }

    #[test]
    fn refetched_records_are_refused() {
        let mut w = Watermarks::default();
        assert!(w.received(&tp(), 4));
        assert!(!w.received(&tp(), 4));
        assert!(!w.received(&tp(), 2));
        assert!(w.received(&tp(), 5));
    }

    #[test]
    fn outcomes_after_revoke_are_ignored_and_failed_commits_retried() {
        let mut w = Watermarks::default();
        w.received(&tp(), 0);
        assert_eq!(w.take_commits(), [(tp(), 0)]);
        w.commit_failed(&tp(), 0);
        assert_eq!(w.take_commits(), [(tp(), 0)]);
        w.revoke(&tp());
        assert!(!w.settle(&tp(), 0, Settled::Ack));
        assert!(w.take_commits().is_empty());
    }
}
