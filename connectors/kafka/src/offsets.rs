//! The watermark engine: which offset of each partition may be committed.
//!
//! Every record is registered when it arrives from the broker, before anything else can
//! happen to it, and stays *pending* until its message is acknowledged (all deliveries
//! delivered, dead-lettered or dropped by choice). The commit point of a partition is the
//! lowest pending offset, or the *frontier* when nothing is pending: one past the last
//! record received in a verified read. A record that is held (it failed for good and
//! could not be dead-lettered) or released (shutdown cut it short) stays pending, so
//! nothing past it is ever committed.
//!
//! # The frontier moves only through a verified read
//!
//! Offsets may legitimately be missing from a partition (compaction, transaction markers,
//! retention), so a jump in offsets cannot by itself be told from records a fetch skipped.
//! What can be told is whether the read that produced the jump started at or before the
//! frontier. While the consumer reads on from the last record it handed over, it did:
//! a jump is the log's own and the frontier follows it. Whenever the consumer fetches
//! again from a position of its own (an assignment starting at the committed offset, a
//! resume after a pause, a seek), the partition is [`Reading::Verify`]: the first record
//! must be at or below the frontier. A record above it is refused (not registered, not
//! delivered, so never committed past) and the caller seeks the partition back, `1`, `2`,
//! `4`, ... offsets before the frontier, until a read starts at or before it; the records
//! re-read on the way are [`Arrival::Seen`]. A broker that answers a fetch from the middle
//! of a batch with the next batch (tansu does) costs a few seeks; one that answers as
//! Kafka does costs nothing. When nothing arrives at all while the log has records past
//! the frontier, the caller asks [`Watermarks::overdue`] and seeks back the same way.
//!
//! Until the committed offset of a newly assigned partition is known
//! ([`Reading::Unknown`]), its records are refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_sdk::watermark::Watermark;

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

/// How the next record of a partition must relate to the frontier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The committed offset of a newly assigned partition is not known yet: records are
    /// refused until it is.
    Unknown,
    /// The consumer reads on from the last record it handed over (or from where the
    /// reset policy put it, with nothing committed): a jump in offsets is the log's own.
    Continuous,
    /// The consumer fetches again from a position of its own: the first record must be
    /// at or below the frontier.
    Verify {
        /// How far before the frontier the last seek went (`0`: no seek yet).
        step: i64,
        /// The last seek went to the beginning of the partition: any record is a start.
        from_start: bool,
        /// How many times the wait for a first record ran out; each doubles the next
        /// wait, so a broker slow to answer a seek is not sought again before it can.
        waits: u32,
        /// When the verification began, or the last seek was made.
        since: Instant,
    },
}

/// Where to seek a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    /// This offset.
    Offset(i64),
    /// The partition's first offset.
    Beginning,
    /// Where the reset policy (`initial_offset`) puts a consumer with nothing committed.
    Reset,
}

/// What to do with a record that arrived, as [`Watermarks::received`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// New: registered, to be delivered.
    New,
    /// Received before (a re-read after a seek or resume): not delivered again.
    Seen,
    /// Its partition is not assigned (revoked meanwhile): ignore it.
    NotAssigned,
    /// The read it came from started past the frontier: records between may not have
    /// been read. Not registered; seek the partition as given and drop the record.
    Unverified(SeekTo),
    /// The partition's committed offset is not known yet: drop the record (the
    /// partition is sought to that offset once it is known).
    StartUnknown,
}

/// Where a newly assigned partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the group's committed offset.
    Committed(i64),
    /// Nothing committed: where the reset policy (`initial_offset`) puts the consumer.
    Reset,
    /// Not known yet (the committed offset could not be read).
    Unknown,
}

/// One partition's bookkeeping: the SDK's [`Watermark`] over its offsets (the frontier
/// is one past the last offset received in a verified read: everything below it was
/// received, was already committed, or is not in the log), and how reads are verified.
#[derive(Debug, Clone)]
pub struct PartitionOffsets {
    marks: Watermark<i64>,
    reading: Reading,
}

impl Default for PartitionOffsets {
    fn default() -> Self {
        Self {
            marks: Watermark::new(),
            reading: Reading::Continuous,
        }
    }
}

impl PartitionOffsets {
    /// The offset to commit: everything below it is complete. `None` before the first
    /// record.
    pub fn commit_point(&self) -> Option<i64> {
        self.marks.commit_point()
    }

    /// Whether a record is held here.
    pub fn is_held(&self) -> bool {
        self.marks.is_held()
    }

    /// Records not yet complete that are still being worked on.
    pub fn in_flight(&self) -> usize {
        usize::try_from(self.marks.in_flight()).unwrap_or(usize::MAX)
    }

    /// Whether `offset` is not complete yet.
    pub fn is_pending(&self, offset: i64) -> bool {
        self.marks.is_pending(offset)
    }

    /// The frontier: one past the last offset received in a verified read.
    pub fn next(&self) -> Option<i64> {
        self.marks.frontier()
    }

    /// How the next record must relate to the frontier.
    pub fn reading(&self) -> Reading {
        self.reading
    }

    fn start(&mut self, start: Start, now: Instant) {
        match start {
            Start::Committed(offset) => {
                self.marks.advance(offset);
                self.reading = Reading::Verify {
                    step: 0,
                    from_start: false,
                    waits: 0,
                    since: now,
                };
            }
            Start::Reset => self.reading = Reading::Continuous,
            Start::Unknown => self.reading = Reading::Unknown,
        }
    }

    /// The next seek back from the frontier: twice as far as the last one, the
    /// beginning of the partition once that would reach offset `0`.
    /// `timed`: because the wait for a first record ran out, not because one arrived
    /// past the frontier.
    fn seek_back(&mut self, now: Instant, timed: bool) -> SeekTo {
        let (step, _, waits) = self.verifying();
        let waits = waits.saturating_add(u32::from(timed));
        let step = step.saturating_mul(2).max(1);
        let frontier = self.next().unwrap_or(0);
        let to = frontier.saturating_sub(step);
        let (to, from_start) = if to <= 0 {
            (SeekTo::Beginning, true)
        } else {
            (SeekTo::Offset(to), false)
        };
        self.reading = Reading::Verify {
            step,
            from_start,
            waits,
            since: now,
        };
        to
    }

    fn verifying(&self) -> (i64, bool, u32) {
        match self.reading {
            Reading::Verify {
                step,
                from_start,
                waits,
                ..
            } => (step, from_start, waits),
            _ => (0, false, 0),
        }
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
    /// Starts tracking `tp` (assigned), reading from `start`. Keeps what is known if it
    /// is tracked already.
    pub fn assign(&mut self, tp: TopicPartition, start: Start, now: Instant) {
        if self.partitions.contains_key(&tp) {
            return;
        }
        let mut p = PartitionOffsets::default();
        p.start(start, now);
        self.partitions.insert(tp, p);
    }

    /// The committed offset of `tp`, unknown at its assignment, is now known. Returns
    /// where to seek it (records read meanwhile were refused), or `None` when it was
    /// known already or is no longer assigned.
    pub fn start_known(
        &mut self,
        tp: &TopicPartition,
        start: Start,
        now: Instant,
    ) -> Option<SeekTo> {
        let p = self.partitions.get_mut(tp)?;
        if p.reading != Reading::Unknown {
            return None;
        }
        p.start(start, now);
        match start {
            Start::Committed(offset) => Some(SeekTo::Offset(offset)),
            Start::Reset => Some(SeekTo::Reset),
            Start::Unknown => None,
        }
    }

    /// The consumer fetches `tp` again from the frontier (resumed after a pause): its
    /// first record must be at or below the frontier.
    pub fn restart(&mut self, tp: &TopicPartition, now: Instant) {
        if let Some(p) = self.partitions.get_mut(tp)
            && p.next().is_some()
            && p.reading != Reading::Unknown
        {
            p.reading = Reading::Verify {
                step: 0,
                from_start: false,
                waits: 0,
                since: now,
            };
        }
    }

    /// A seek of `tp` failed: the consumer reads on from where it was, so the next
    /// record cannot count as a start from the beginning.
    pub fn seek_failed(&mut self, tp: &TopicPartition, now: Instant) {
        if let Some(p) = self.partitions.get_mut(tp)
            && let Reading::Verify { step, waits, .. } = p.reading
        {
            p.reading = Reading::Verify {
                step,
                from_start: false,
                waits,
                since: now,
            };
        }
    }

    /// Partitions whose verification began at least `patience` ago without a record
    /// (twice that after one timed seek back, four times after two, up to 32 times),
    /// with their frontier, and partitions whose start is unknown (frontier `None`). A
    /// partition sought to its beginning is not listed: any record it brings is a start,
    /// and seeking it there again would only restart the broker's answer.
    /// For the first, the caller looks at the log's end: past the frontier, a fetch
    /// skipped records and [`seek_back`](Self::seek_back) says where to read again; at
    /// the frontier, the partition is [`idle`](Self::idle).
    pub fn overdue(&self, now: Instant, patience: Duration) -> Vec<(TopicPartition, Option<i64>)> {
        let mut out: Vec<(TopicPartition, Option<i64>)> = self
            .partitions
            .iter()
            .filter_map(|(tp, p)| match p.reading {
                Reading::Unknown => Some((tp.clone(), None)),
                Reading::Verify {
                    since,
                    waits,
                    from_start: false,
                    ..
                } if now.saturating_duration_since(since) >= patience * (1 << waits.min(5)) => {
                    Some((tp.clone(), p.next()))
                }
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    /// `tp` is being verified and the log has records past its frontier that never
    /// arrived: where to seek it.
    pub fn seek_back(&mut self, tp: &TopicPartition, now: Instant) -> Option<SeekTo> {
        let p = self.partitions.get_mut(tp)?;
        matches!(p.reading, Reading::Verify { .. }).then(|| p.seek_back(now, true))
    }

    /// `tp` is being verified and the log ends at or before its frontier: the next
    /// record written is the next one read, so the read is continuous from here.
    pub fn idle(&mut self, tp: &TopicPartition, log_end: i64) {
        if let Some(p) = self.partitions.get_mut(tp)
            && matches!(p.reading, Reading::Verify { .. })
            && p.next().is_some_and(|next| log_end <= next)
        {
            p.reading = Reading::Continuous;
        }
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

    /// Registers a received record if it may be delivered: see [`Arrival`]. This is the
    /// only way the frontier moves, so no commit passes an offset that was neither
    /// received nor proven absent by a read that started at or before it.
    pub fn received(&mut self, tp: &TopicPartition, offset: i64, now: Instant) -> Arrival {
        let Some(p) = self.partitions.get_mut(tp) else {
            return Arrival::NotAssigned;
        };
        match p.reading {
            Reading::Unknown => return Arrival::StartUnknown,
            Reading::Continuous => {}
            Reading::Verify { from_start, .. } => {
                if !from_start && p.next().is_some_and(|next| offset > next) {
                    return Arrival::Unverified(p.seek_back(now, false));
                }
                p.reading = Reading::Continuous;
            }
        }
        if p.next().is_some_and(|next| offset < next) {
            return Arrival::Seen;
        }
        p.marks.advance(offset + 1);
        p.marks.receive(offset);
        Arrival::New
    }

    /// Records the outcome of `offset`. Returns `false` if the partition is no longer
    /// tracked (revoked meanwhile) or the offset was not pending.
    pub fn settle(&mut self, tp: &TopicPartition, offset: i64, settled: Settled) -> bool {
        let Some(p) = self.partitions.get_mut(tp) else {
            return false;
        };
        match settled {
            Settled::Ack => p.marks.settle(offset),
            Settled::Hold => p.marks.hold(offset),
            Settled::Release => p.marks.release(offset),
        }
    }

    /// A held record is delivered again: in flight once more. Returns whether it was
    /// held.
    pub fn retry(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        self.partitions
            .get_mut(tp)
            .is_some_and(|p| p.marks.retry(offset))
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
            if let Some(point) = p.marks.take_commit() {
                out.push((tp.clone(), point));
            }
        }
        out.sort();
        out
    }

    /// A commit of `offset` for `tp` failed: commit it again next time.
    pub fn commit_failed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.marks.commit_failed(offset);
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
                p.marks.release(*o);
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

    fn now() -> Instant {
        Instant::now()
    }

    /// Watermarks with `tp()` assigned and nothing committed.
    fn fresh() -> Watermarks {
        let mut w = Watermarks::default();
        w.assign(tp(), Start::Reset, now());
        w
    }

    fn receive(w: &mut Watermarks, offsets: impl IntoIterator<Item = i64>) {
        for o in offsets {
            assert_eq!(w.received(&tp(), o, now()), Arrival::New, "offset {o}");
        }
    }

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut w = fresh();
        assert!(
            w.take_commits().is_empty(),
            "nothing received, nothing to commit"
        );
        receive(&mut w, 10..15);
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
        let mut w = fresh();
        receive(&mut w, 0..5);
        w.settle(&tp(), 0, Settled::Ack);
        w.settle(&tp(), 1, Settled::Hold);
        for o in 2..5 {
            w.settle(&tp(), o, Settled::Ack);
        }
        assert_eq!(w.take_commits(), [(tp(), 1)]);
        assert!(w.get(&tp()).unwrap().is_held());
        receive(&mut w, [5]);
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
        let mut w = fresh();
        receive(&mut w, 0..3);
        w.settle(&tp(), 0, Settled::Ack);
        w.settle(&tp(), 1, Settled::Release);
        w.settle(&tp(), 2, Settled::Ack);
        assert_eq!(w.take_commits(), [(tp(), 1)]);
        assert_eq!(w.total_in_flight(), 0);
    }

    #[test]
    fn gaps_in_a_continuous_read_are_the_logs_own() {
        let mut w = fresh();
        receive(&mut w, [3, 7, 8]);
        for o in [3, 7, 8] {
            w.settle(&tp(), o, Settled::Ack);
        }
        assert_eq!(w.take_commits(), [(tp(), 9)]);
    }

    #[test]
    fn refetched_records_are_seen_not_new() {
        let mut w = fresh();
        assert_eq!(w.received(&tp(), 4, now()), Arrival::New);
        assert_eq!(w.received(&tp(), 4, now()), Arrival::Seen);
        assert_eq!(w.received(&tp(), 2, now()), Arrival::Seen);
        assert_eq!(w.received(&tp(), 5, now()), Arrival::New);
    }

    #[test]
    fn outcomes_after_revoke_are_ignored_and_failed_commits_retried() {
        let mut w = fresh();
        receive(&mut w, [0]);
        assert_eq!(w.take_commits(), [(tp(), 0)]);
        w.commit_failed(&tp(), 0);
        assert_eq!(w.take_commits(), [(tp(), 0)]);
        w.revoke(&tp());
        assert!(!w.settle(&tp(), 0, Settled::Ack));
        assert_eq!(w.received(&tp(), 1, now()), Arrival::NotAssigned);
        assert!(w.take_commits().is_empty());
    }

    /// Issue 16: a resumed partition whose fetch skips the rest of a batch. The skipped
    /// records are never committed past; the partition is sought back until a read
    /// starts at or before the frontier, and the skipped records arrive as new.
    #[test]
    fn a_fetch_that_skips_records_after_a_resume_is_sought_back() {
        let mut w = fresh();
        receive(&mut w, 0..150);
        for o in 0..150 {
            w.settle(&tp(), o, Settled::Ack);
        }
        w.restart(&tp(), now());
        // The broker answers the fetch from 150 with the batch starting at 200.
        assert_eq!(
            w.received(&tp(), 200, now()),
            Arrival::Unverified(SeekTo::Offset(149))
        );
        assert_eq!(w.take_commits(), [(tp(), 150)], "never past 150");
        // Again from 149, 148, 146, ...: still the batch at 200.
        assert_eq!(
            w.received(&tp(), 200, now()),
            Arrival::Unverified(SeekTo::Offset(148))
        );
        assert_eq!(
            w.received(&tp(), 201, now()),
            Arrival::Unverified(SeekTo::Offset(146))
        );
        assert!(w.take_commits().is_empty());
        // A read that starts at or before the frontier: re-read records are seen, then
        // the skipped ones are new.
        assert_eq!(w.received(&tp(), 100, now()), Arrival::Seen);
        assert_eq!(w.get(&tp()).unwrap().reading(), Reading::Continuous);
        for o in 101..150 {
            assert_eq!(w.received(&tp(), o, now()), Arrival::Seen);
        }
        receive(&mut w, 150..210);
        assert!(w.take_commits().is_empty(), "150 is pending");
    }

    #[test]
    fn a_resumed_fetch_that_starts_at_the_frontier_needs_no_seek() {
        let mut w = fresh();
        receive(&mut w, 0..10);
        w.restart(&tp(), now());
        assert_eq!(w.received(&tp(), 10, now()), Arrival::New);
        // Once verified, jumps are the log's own again.
        assert_eq!(w.received(&tp(), 15, now()), Arrival::New);
    }

    #[test]
    fn seeking_back_ends_at_the_beginning_where_any_record_is_a_start() {
        let mut w = fresh();
        receive(&mut w, [5]);
        w.restart(&tp(), now());
        let mut seeks = Vec::new();
        loop {
            match w.received(&tp(), 9, now()) {
                Arrival::Unverified(to) => seeks.push(to),
                other => panic!("{other:?}"),
            }
            if seeks.last() == Some(&SeekTo::Beginning) {
                break;
            }
        }
        assert_eq!(
            seeks,
            [
                SeekTo::Offset(5),
                SeekTo::Offset(4),
                SeekTo::Offset(2),
                SeekTo::Beginning
            ]
        );
        // Retention removed everything up to 7: the first record read is the start.
        assert_eq!(w.received(&tp(), 7, now()), Arrival::New);
    }

    #[test]
    fn an_assigned_partition_starts_at_its_committed_offset() {
        let mut w = Watermarks::default();
        w.assign(tp(), Start::Committed(150), now());
        assert_eq!(w.take_commits(), [(tp(), 150)], "re-commits what it found");
        // The broker skips to 200: records from 150 are unread.
        assert_eq!(
            w.received(&tp(), 200, now()),
            Arrival::Unverified(SeekTo::Offset(149))
        );
        assert_eq!(
            w.received(&tp(), 120, now()),
            Arrival::Seen,
            "committed before"
        );
        assert_eq!(w.received(&tp(), 150, now()), Arrival::New);
    }

    #[test]
    fn an_unknown_start_refuses_records_until_known() {
        let mut w = Watermarks::default();
        w.assign(tp(), Start::Unknown, now());
        assert_eq!(w.received(&tp(), 3, now()), Arrival::StartUnknown);
        assert_eq!(w.overdue(now(), Duration::ZERO), [(tp(), None)]);
        assert!(w.take_commits().is_empty());
        assert_eq!(
            w.start_known(&tp(), Start::Committed(2), now()),
            Some(SeekTo::Offset(2))
        );
        assert_eq!(w.start_known(&tp(), Start::Committed(2), now()), None);
        assert_eq!(w.received(&tp(), 2, now()), Arrival::New);
    }

    #[test]
    fn a_verification_without_records_is_overdue_until_the_log_is_found_idle() {
        let start = Instant::now();
        let mut w = fresh();
        receive(&mut w, 0..10);
        w.restart(&tp(), start);
        let patience = Duration::from_millis(500);
        assert!(w.overdue(start, patience).is_empty());
        let later = start + patience;
        assert_eq!(w.overdue(later, patience), [(tp(), Some(10))]);
        // The log has records past 10 that never came: read again from before.
        assert_eq!(w.seek_back(&tp(), later), Some(SeekTo::Offset(9)));
        assert!(
            w.overdue(later, patience).is_empty(),
            "the seek restarts the wait"
        );
        assert!(
            w.overdue(later + patience, patience).is_empty(),
            "after a timed seek the wait doubles"
        );
        assert_eq!(
            w.overdue(later + patience * 2, patience),
            [(tp(), Some(10))]
        );
        // Nothing past 10 after all: the read is continuous from here.
        w.idle(&tp(), 10);
        assert!(w.overdue(later + patience, patience).is_empty());
        assert_eq!(w.received(&tp(), 12, later), Arrival::New);
    }

    #[test]
    fn a_failed_seek_to_the_beginning_does_not_count_as_one() {
        let mut w = fresh();
        receive(&mut w, [1]);
        w.restart(&tp(), now());
        assert_eq!(
            w.received(&tp(), 9, now()),
            Arrival::Unverified(SeekTo::Offset(1))
        );
        assert_eq!(
            w.received(&tp(), 9, now()),
            Arrival::Unverified(SeekTo::Beginning)
        );
        w.seek_failed(&tp(), now());
        // Still the old read: not a start.
        assert!(matches!(
            w.received(&tp(), 10, now()),
            Arrival::Unverified(_)
        ));
    }

    /// A model of the consumer against a broker that, like tansu, answers a fetch from
    /// the middle of a batch with the next batch: pauses, resumes, seeks and skips at
    /// random. Whatever happens, every committed offset is past only records that were
    /// acknowledged, and every record is eventually received.
    #[test]
    fn commits_never_pass_an_unacknowledged_record_against_a_skipping_broker() {
        use rand::{Rng, SeedableRng};
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            // Batches of 1 to 40 records; offsets 0..len, some absent (compaction).
            let len: i64 = rng.random_range(50..400);
            let present: Vec<bool> = (0..len).map(|_| rng.random_bool(0.9)).collect();
            let mut bases = vec![0i64];
            while let Some(&b) = bases.last() {
                let next = b + rng.random_range(1..40);
                if next >= len {
                    break;
                }
                bases.push(next);
            }
            // The broker: records from the first batch whose base is at or after `from`.
            let fetch = |from: i64| -> Vec<i64> {
                let base = bases.iter().copied().find(|b| *b >= from);
                base.map(|b| (b..len).filter(|o| present[*o as usize]).collect())
                    .unwrap_or_default()
            };
            let mut w = fresh();
            let mut acked = vec![false; len as usize];
            let mut stream: std::collections::VecDeque<i64> = fetch(0).into();
            let mut app_pos = 0i64;
            let mut steps = 0;
            while steps < 20_000 {
                steps += 1;
                // Occasionally pause and resume: the prefetch is dropped, the fetch
                // starts again at the application's position.
                if rng.random_bool(0.05) {
                    w.restart(&tp(), now());
                    stream = fetch(app_pos).into();
                    continue;
                }
                // Settle some pending records at random.
                if rng.random_bool(0.3) {
                    let p = w.get(&tp()).unwrap();
                    let pending: Vec<i64> = (0..len).filter(|o| p.is_pending(*o)).collect();
                    if !pending.is_empty() {
                        let o = pending[rng.random_range(0..pending.len())];
                        w.settle(&tp(), o, Settled::Ack);
                        acked[o as usize] = true;
                    }
                }
                for (_, point) in w.take_commits() {
                    for o in 0..point.min(len) {
                        assert!(
                            !present[o as usize] || acked[o as usize],
                            "seed {seed}: committed {point} past unacknowledged {o}"
                        );
                    }
                }
                let Some(o) = stream.pop_front() else {
                    // Nothing arrives: the caller looks at the log's end.
                    for (tp, frontier) in w.overdue(now(), Duration::ZERO) {
                        let frontier = frontier.unwrap();
                        if frontier < len {
                            if let Some(to) = w.seek_back(&tp, now()) {
                                let from = match to {
                                    SeekTo::Offset(o) => o,
                                    _ => 0,
                                };
                                stream = fetch(from).into();
                                app_pos = from;
                            }
                        } else {
                            w.idle(&tp, len);
                        }
                    }
                    if stream.is_empty() && w.get(&tp()).unwrap().next() == Some(len) {
                        break;
                    }
                    continue;
                };
                app_pos = o + 1;
                match w.received(&tp(), o, now()) {
                    Arrival::New | Arrival::Seen => {}
                    Arrival::Unverified(to) => {
                        let from = match to {
                            SeekTo::Offset(o) => o,
                            _ => 0,
                        };
                        stream = fetch(from).into();
                        app_pos = from;
                    }
                    other => panic!("seed {seed}: {other:?}"),
                }
            }
            let p = w.get(&tp()).unwrap();
            let last_present = (0..len).rev().find(|o| present[*o as usize]);
            if let Some(last) = last_present {
                assert!(
                    p.next().is_some_and(|n| n > last),
                    "seed {seed}: stopped at {:?} of {len}",
                    p.next()
                );
            }
            for o in 0..len {
                if present[o as usize] {
                    assert!(
                        acked[o as usize] || p.is_pending(o),
                        "seed {seed}: record {o} never received"
                    );
                }
            }
        }
    }
}
