//! Consuming: the poll loop, backpressure by a bounded buffer (pausing partitions only when
//! it stays full), commits of the watermark, and the drain on revoke and on shutdown.
//!
//! # The poll loop
//!
//! One task polls the consumer without ever waiting on the dispatcher, so librdkafka's
//! `max.poll.interval.ms` is never exceeded and rebalance callbacks are served promptly.
//! Each record is registered in the [`Watermarks`] first, then handed to the dispatcher
//! if there is room (a free worker or a place in the dispatcher's hand-off queue, see
//! [`Dispatcher::room`](connector_sdk::Dispatcher::room), and `max_pending_per_partition`). Without room the record is *parked*, in order, behind
//! the other parked records of its partition. Completions free room and wake the loop,
//! which hands parked records over, one partition after another in turn.
//!
//! Backpressure: while `max_buffered` records are parked the loop stops reading.
//! librdkafka's own prefetch is bounded (`queued.max.messages.kbytes`) and simply waits,
//! so nothing is fetched twice; this is the steady state under a backlog. Pausing a
//! partition would make librdkafka drop its prefetch and fetch it again on resume, a
//! broker round trip each time (hundreds of milliseconds on some brokers): the first
//! version of this loop paused at once and ran at a fraction of HTTP speed. Only when the
//! buffer stays full for a second (a slow or unreachable gateway) are the partitions with
//! parked records paused, so that polling, and with it rebalance callbacks, go on; each
//! is resumed once its parked records are all handed over. Memory is bounded by
//! `max_inflight` deliveries, `max_buffered` parked records and librdkafka's prefetch.
//!
//! A submitted record's [`Completion`](connector_sdk::Completion) goes, with the record as
//! its ack handle, to a [`Settler`]: its task settles completed records, not the poll
//! loop, because the rebalance callback runs inside the poll loop and waits for settles.
//! A completed message is settled in the watermarks (after its replies were published);
//! every `commit_interval` the contiguous prefix of completed offsets is committed. A
//! held message (failed for good, not dead-lettered) pauses its partition and marks it
//! stalled (`connector_partition_stalled`, `/readyz`'s body): nothing past it is
//! committed. Its held records are delivered again on the backoff schedule
//! (`backoff.initial` doubling up to `backoff.max`, or `hold_retry_interval` if shorter);
//! once they complete, the parked records flow and the partition is resumed.
//!
//! # Fetching again: resume, assignment, seek
//!
//! A resumed partition is fetched again from the last record handed over; an assigned one
//! from the group's committed offset (looked up in the assignment callback). A broker
//! may answer such a fetch from past where it was asked to start (tansu answers a fetch
//! from the middle of a batch with the next batch), and offsets may be missing from the
//! log legitimately, so the two cannot be told apart from the records alone. The
//! [`Watermarks`] verify each such read: its first record must be at or below the
//! frontier, else it is dropped and the partition sought back until a read starts there
//! (`connector_kafka_rewinds_total`); a fresh fetch that brings nothing while the log has
//! records past the frontier is sought back the same way. So a commit never passes a
//! record that was not received and settled, whatever the broker's fetches skip.
//!
//! # Revoke (state machine in the rebalance callback)
//!
//! `consuming → draining → committed → handed over`. librdkafka calls back inside the
//! poll: the revoked partitions' parked records are dropped, then the callback waits (at
//! most `rebalance_drain_timeout`, validated below the session timeout) until their
//! in-flight deliveries complete, commits their watermarks synchronously, and forgets
//! them. Deliveries that finish later are ignored: the next owner delivers them again
//! (at-least-once). A *lost* assignment (session expired) skips the drain and the commit,
//! since the group already handed the partitions to someone else.
//!
//! # Shutdown
//!
//! Polling stops; parked records are released; in-flight deliveries finish (the SDK
//! cancels them after `drain_timeout`, which releases them); the watermarks are committed
//! synchronously; the consumer leaves the group.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use connector_sdk::backoff::{Attempts, Backoff};
use connector_sdk::config::Ordering;
use connector_sdk::metrics::Metrics;
use connector_sdk::server::Health;
use connector_sdk::source::Settler;
use connector_sdk::{Disposition, MessageOutcome, SourceContext};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, TopicPartitionList as Tpl};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, InitialOffset, valid_topic_name};
use crate::error::Error;
use crate::metrics::KafkaMetrics;
use crate::offsets::{Arrival, SeekTo, Settled, Start, TopicPartition, Watermarks};
use crate::record::Record;
use crate::reply::Replies;

/// The consumer type.
pub type KafkaConsumer = StreamConsumer<ConnectorContext>;

/// State shared by the poll loop, the completion tasks and the rebalance callback.
#[derive(Default)]
pub struct Shared {
    state: Mutex<State>,
    /// Wakes a rebalance callback waiting for in-flight deliveries.
    settled: Condvar,
    /// Wakes the poll loop: room was freed, a partition holds.
    wake: Notify,
    health: OnceLock<Health>,
    sdk_metrics: OnceLock<Metrics>,
}

#[derive(Default)]
struct State {
    marks: Watermarks,
    /// Records received without room, per partition, oldest first.
    parked: HashMap<TopicPartition, VecDeque<Arc<Record>>>,
    /// Records handed to the dispatcher and not yet settled, per partition.
    submitted: HashMap<TopicPartition, usize>,
    /// Partitions that started holding since the loop last looked.
    newly_held: Vec<TopicPartition>,
    /// The held records, to deliver again on the hold's backoff schedule.
    held: HashMap<TopicPartition, Vec<Arc<Record>>>,
    /// Partitions revoked since the loop last looked.
    revoked: Vec<TopicPartition>,
    /// Rebalance callbacks waiting on `settled`: only then does a settle signal it
    /// (signalling a condition variable is a system call even with nobody waiting).
    draining: usize,
}

impl Shared {
    /// Shared state reporting into the SDK's `metrics` (lag, stalled partitions).
    pub fn new(metrics: Metrics) -> Arc<Self> {
        let shared = Self::default();
        let _ = shared.sdk_metrics.set(metrics);
        Arc::new(shared)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the outcome of one record and wakes whoever waits for it.
    fn settle(&self, record: &Arc<Record>, settled: Settled) {
        let tp = &record.tp;
        {
            let mut s = self.lock();
            if s.marks.settle(tp, record.offset, settled) && settled == Settled::Hold {
                s.newly_held.push(tp.clone());
                s.held.entry(tp.clone()).or_default().push(record.clone());
            }
            if let Some(n) = s.submitted.get_mut(tp) {
                *n = n.saturating_sub(1);
            }
            if s.draining > 0 {
                self.settled.notify_all();
            }
        }
        self.wake.notify_one();
    }
}

/// librdkafka callbacks: errors, rebalances, commit results.
pub struct ConnectorContext {
    shared: Arc<Shared>,
    metrics: KafkaMetrics,
    drain_timeout: Duration,
}

impl ConnectorContext {
    /// Callbacks over `shared`.
    pub fn new(shared: Arc<Shared>, metrics: KafkaMetrics, drain_timeout: Duration) -> Self {
        Self {
            shared,
            metrics,
            drain_timeout,
        }
    }

    /// Waits until the revoked partitions have nothing in flight, or the deadline.
    fn drain(&self, revoked: &[TopicPartition]) -> bool {
        let deadline = Instant::now() + self.drain_timeout;
        let mut s = self.shared.lock();
        s.draining += 1;
        let drained = loop {
            let busy: usize = revoked.iter().map(|tp| s.marks.in_flight(tp)).sum();
            if busy == 0 {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    in_flight = busy,
                    "rebalance_drain_timeout reached: handing over partitions with deliveries in flight; they will be delivered again"
                );
                break false;
            }
            s = match self.shared.settled.wait_timeout(s, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        };
        s.draining -= 1;
        drained
    }

    fn revoke(&self, consumer: &rdkafka::consumer::BaseConsumer<Self>, tpl: &Tpl) {
        let revoked = partitions(tpl);
        let lost = consumer.assignment_lost();
        self.metrics.rebalance(if lost { "lost" } else { "revoke" });
        tracing::info!(partitions = %list(&revoked), lost, "partitions revoked");
        {
            let mut s = self.shared.lock();
            for tp in &revoked {
                s.held.remove(tp);
                if let Some(parked) = s.parked.remove(tp) {
                    let offsets: Vec<i64> = parked.iter().map(|r| r.offset).collect();
                    s.marks.release_in_flight(tp, &offsets);
                }
            }
        }
        if !lost {
            let drained = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                    tokio::task::block_in_place(|| self.drain(&revoked))
                }
                // Deliveries cannot progress while this thread waits: do not wait.
                _ => false,
            };
            if !drained {
                self.metrics.revoke_drain_timed_out();
            }
            let commits = {
                let set: HashSet<&TopicPartition> = revoked.iter().collect();
                self.shared
                    .lock()
                    .marks
                    .take_commits_where(|tp| set.contains(tp))
            };
            if !commits.is_empty() {
                let result = consumer.commit(&to_tpl(&commits), CommitMode::Sync);
                self.metrics.committed(result.is_ok());
                match result {
                    Ok(()) => {
                        tracing::info!(offsets = %describe(&commits), "committed revoked partitions")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "committing revoked partitions failed; the next owner may deliver some records again")
                    }
                }
            }
        }
        let mut s = self.shared.lock();
        for tp in &revoked {
            s.marks.revoke(tp);
            s.submitted.remove(tp);
            s.revoked.push(tp.clone());
            let p = tp.partition.to_string();
            if let Some(m) = self.shared.sdk_metrics.get() {
                m.remove_backlog(&tp.topic, &p);
            }
            if let Some(h) = self.shared.health.get() {
                h.set_stalled(&tp.topic, &p, false);
            }
        }
        self.metrics.set_assigned(s.marks.partitions().count());
        drop(s);
        self.shared.wake.notify_one();
    }
}

impl ClientContext for ConnectorContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) && let Some(h) = self.shared.health.get()
        {
            h.set_source_ready(false);
        }
    }
}

impl ConsumerContext for ConnectorContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.revoke(consumer, tpl),
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                self.metrics.rebalance("error");
                tracing::warn!(error = %e, "rebalance error");
            }
        }
    }

    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Assign(tpl) = rebalance {
            // A partition paused before it was revoked (or lost) can come back still
            // paused; our bookkeeping starts afresh, so librdkafka's must too.
            if tpl.count() > 0
                && let Err(e) = consumer.resume(tpl)
            {
                tracing::warn!(error = %e, "resuming newly assigned partitions failed");
            }
            let assigned = partitions(tpl);
            self.metrics.rebalance("assign");
            tracing::info!(partitions = %list(&assigned), "partitions assigned");
            let starts = blocking(|| starts(consumer, tpl));
            let now = Instant::now();
            let mut s = self.shared.lock();
            for tp in assigned {
                let start = starts.get(&tp).copied().unwrap_or(Start::Unknown);
                s.marks.assign(tp, start, now);
            }
            self.metrics.set_assigned(s.marks.partitions().count());
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.metrics.committed(result.is_ok());
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; it is retried");
            let mut s = self.shared.lock();
            for e in offsets.elements() {
                if let Offset::Offset(o) = e.offset() {
                    s.marks
                        .commit_failed(&TopicPartition::new(e.topic(), e.partition()), o);
                }
            }
        }
    }
}

/// How long looking up committed offsets, the log's end or seeking may take.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `f`, a call that blocks on librdkafka, letting the runtime move other tasks off
/// this thread when it can.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Where the partitions of `tpl` start: the group's committed offsets. A partition whose
/// offset cannot be read is left out (its start is unknown and looked up again).
fn starts<C: Consumer<ConnectorContext>>(
    consumer: &C,
    tpl: &Tpl,
) -> HashMap<TopicPartition, Start> {
    match consumer.committed_offsets(tpl.clone(), BROKER_CALL_TIMEOUT) {
        Ok(committed) => committed
            .elements()
            .iter()
            .map(|e| {
                let start = match e.offset() {
                    Offset::Offset(o) => Start::Committed(o),
                    _ => Start::Reset,
                };
                (TopicPartition::new(e.topic(), e.partition()), start)
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading the committed offsets of assigned partitions failed; their records wait until it succeeds");
            HashMap::new()
        }
    }
}

fn partitions(tpl: &Tpl) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

fn list(tps: &[TopicPartition]) -> String {
    tps.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn describe(commits: &[(TopicPartition, i64)]) -> String {
    commits
        .iter()
        .map(|(tp, o)| format!("{tp}@{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn to_tpl(commits: &[(TopicPartition, i64)]) -> Tpl {
    let mut tpl = Tpl::with_capacity(commits.len());
    for (tp, offset) in commits {
        // Only fails for a negative partition, which librdkafka never assigns.
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
    }
    tpl
}

fn one(tp: &TopicPartition) -> Tpl {
    let mut tpl = Tpl::with_capacity(1);
    tpl.add_partition(&tp.topic, tp.partition);
    tpl
}

/// What the poll loop needs besides the SDK's context.
pub struct Parts {
    /// The consumer (subscribed by the loop).
    pub consumer: Arc<KafkaConsumer>,
    /// Shared with the consumer's callbacks.
    pub shared: Arc<Shared>,
    /// Our metrics.
    pub metrics: KafkaMetrics,
    /// Whether a dead-letter topic is configured: each message then carries its record
    /// (key and raw headers) for the dead-letter sink.
    pub dead_letters: bool,
    /// Reply publishing (when configured).
    pub replies: Option<Arc<Replies>>,
}

/// The poll loop and its bookkeeping.
struct Poller {
    ctx: SourceContext,
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    metrics: KafkaMetrics,
    /// Attach the record to each message, for the dead-letter sink.
    dead_letters: bool,
    /// Settles completed records off the poll loop: the rebalance callback, which runs
    /// inside the poll loop, waits for the revoked partitions' records to settle.
    settler: Settler<Arc<Record>>,
    group: String,
    ordering: Ordering,
    per_partition: usize,
    /// Paused for backpressure.
    paused: HashSet<TopicPartition>,
    /// Paused because a record holds, with when to deliver the held records again.
    holding: HashMap<TopicPartition, Hold>,
    /// The schedule of held records' retries: `backoff.initial` doubling up to
    /// `backoff.max` (or `hold_retry_interval` when set and shorter).
    hold_backoff: Backoff,
    /// Where the reset policy puts a partition with nothing committed.
    initial_offset: InitialOffset,
    /// Held records delivered again and not yet complete.
    retrying: HashMap<TopicPartition, Vec<i64>>,
    subscription: Vec<String>,
    /// `max_buffered`: most parked records over all partitions.
    max_buffered: usize,
    /// Since when the parked records fill `max_buffered` (reading stopped).
    full_since: Option<Instant>,
}

/// A partition holding at a record that failed for good.
struct Hold {
    /// When its held records are delivered again.
    at: Instant,
    /// Retries so far, for the backoff schedule.
    attempts: Attempts,
}

/// How long a partition's first fetch after a resume, an assignment or a seek may bring
/// nothing before the log's end is looked at: records past the frontier that never
/// arrived were skipped.
const VERIFY_PATIENCE: Duration = Duration::from_millis(500);

/// How long reading may stop because the buffer is full before the congested partitions
/// are paused and polling goes on (rebalance callbacks run only while polling).
const FULL_BUFFER_PATIENCE: Duration = Duration::from_secs(1);

/// Runs the source until shutdown, then drains and commits.
pub async fn run(ctx: SourceContext, config: &Config, parts: Parts) -> Result<(), Error> {
    let _ = parts.shared.health.set(ctx.health.clone());
    let mut poller = Poller {
        consumer: parts.consumer,
        metrics: parts.metrics,
        dead_letters: parts.dead_letters,
        settler: settler(parts.shared.clone(), parts.replies),
        shared: parts.shared,
        group: config.kafka.group.clone(),
        ordering: ctx.config.ordering,
        per_partition: config.effective_pending_per_partition(),
        paused: HashSet::new(),
        holding: HashMap::new(),
        retrying: HashMap::new(),
        hold_backoff: config.hold_backoff(ctx.config.backoff),
        initial_offset: config.kafka.initial_offset,
        subscription: Vec::new(),
        max_buffered: config.kafka.max_buffered.max(1),
        full_since: None,
        ctx,
    };
    poller.resubscribe();
    let probe_stop = CancellationToken::new();
    let probe = tokio::spawn(probe(
        poller.consumer.clone(),
        poller.ctx.health.clone(),
        poller.ctx.metrics.clone(),
        config.kafka.lag_interval,
        config.kafka.initial_offset,
        probe_stop.clone(),
    ));
    poller.poll(config.kafka.commit_interval).await;
    poller.shut_down().await;
    poller.settler.close().await;
    probe_stop.cancel();
    let _ = probe.await;
    Ok(())
}

impl Poller {
    async fn poll(&mut self, commit_interval: Duration) {
        let follow = self.ctx.topics_follow_map();
        let mut topics = self.ctx.topics.subscribe();
        let mut commit = tokio::time::interval(commit_interval);
        commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut verify = tokio::time::interval(VERIFY_PATIENCE / 2);
        verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.ctx.shutdown.clone();
        let consumer = self.consumer.clone();
        let shared = self.shared.clone();
        loop {
            self.step().await;
            let retry_at = self.holding.values().map(|h| h.at).min();
            let reading = self.may_read();
            let patience_ends = match self.full_since {
                Some(since) if !reading => Some(since + FULL_BUFFER_PATIENCE),
                _ => None,
            };
            // `step` above already applied every completion; the wake-up only matters
            // when nothing else is ready, so it comes last and cannot starve commits or
            // polling under a stream of completions.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = commit.tick() => self.commit_async(),
                _ = verify.tick() => self.check_overdue().await,
                changed = topics.changed(), if follow => {
                    if changed.is_ok() {
                        self.resubscribe();
                    }
                }
                () = sleep_until(retry_at), if retry_at.is_some() => {}
                () = sleep_until(patience_ends), if patience_ends.is_some() => {}
                received = consumer.recv(), if reading => match received {
                    Ok(m) => {
                        let record = Record::from_borrowed(&m);
                        drop(m);
                        self.received(record).await;
                    }
                    Err(e) => self.consume_error(&e),
                },
                () = shared.wake.notified() => {}
            }
        }
    }

    /// Whether to read from the consumer now. With room in the buffer, yes. With the
    /// buffer full, not at first: librdkafka's prefetch waits, to be read as soon as
    /// completions make room. After [`FULL_BUFFER_PATIENCE`] the partitions with parked
    /// records are paused and reading goes on, so rebalances are served; records of other
    /// partitions that arrive meanwhile are parked and their partitions paused too.
    fn may_read(&mut self) -> bool {
        let parked: usize = self.shared.lock().parked.values().map(VecDeque::len).sum();
        if parked < self.max_buffered {
            self.full_since = None;
            return true;
        }
        let since = *self.full_since.get_or_insert_with(Instant::now);
        if since.elapsed() < FULL_BUFFER_PATIENCE {
            return false;
        }
        let congested: Vec<TopicPartition> = self
            .shared
            .lock()
            .parked
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in &congested {
            self.pause(tp);
        }
        true
    }

    fn consume_error(&self, e: &KafkaError) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        match e.rdkafka_error_code() {
            Some(Code::PartitionEOF) => {}
            Some(Code::UnknownTopicOrPartition | Code::UnknownTopic) => {
                tracing::warn!(error = %e, "a subscribed topic does not exist (yet)");
            }
            _ => tracing::warn!(error = %e, "consuming failed"),
        }
    }

    /// Subscribes to the wanted topics if they changed. A topic from an annotation that
    /// is not a legal Kafka name is skipped with a warning; a failed subscription keeps
    /// the previous one and is tried again at the next change of the topic map.
    fn resubscribe(&mut self) {
        let mut wanted: Vec<String> = self
            .ctx
            .wanted_topics()
            .into_iter()
            .filter(|t| {
                let ok = valid_topic_name(t);
                if !ok {
                    tracing::warn!(topic = %t, "not a Kafka topic name: not consumed");
                }
                ok
            })
            .collect();
        wanted.sort();
        wanted.dedup();
        if wanted == self.subscription {
            return;
        }
        if wanted.is_empty() {
            tracing::info!("no topics to consume: unsubscribing");
            self.consumer.unsubscribe();
        } else {
            let names: Vec<&str> = wanted.iter().map(String::as_str).collect();
            if let Err(e) = self.consumer.subscribe(&names) {
                let e = Error::Subscribe {
                    topics: wanted,
                    source: e,
                };
                tracing::error!(error = %e, "keeping the previous subscription");
                return;
            }
            tracing::info!(topics = ?wanted, "subscribed");
        }
        self.subscription = wanted;
    }

    async fn received(&mut self, record: Record) {
        let tp = record.tp.clone();
        let record = Arc::new(record);
        let arrival = {
            let mut s = self.shared.lock();
            let arrival = s.marks.received(&tp, record.offset, Instant::now());
            if arrival == Arrival::New
                && (self.holding.contains_key(&tp)
                    || s.parked.get(&tp).is_some_and(|q| !q.is_empty()))
            {
                s.parked.entry(tp.clone()).or_default().push_back(record);
                return;
            }
            arrival
        };
        match arrival {
            Arrival::New => {}
            Arrival::Unverified(to) => {
                tracing::debug!(partition = %tp, offset = record.offset, "record past the frontier after a fresh fetch: reading the partition again from an earlier offset");
                self.rewind(&tp, to).await;
                return;
            }
            skipped @ (Arrival::Seen | Arrival::NotAssigned | Arrival::StartUnknown) => {
                tracing::trace!(partition = %tp, offset = record.offset, ?skipped, "record skipped");
                return;
            }
        }
        if let Err(record) = self.try_submit(record).await {
            self.shared
                .lock()
                .parked
                .entry(tp)
                .or_default()
                .push_back(record);
        }
    }

    /// Whether the dispatcher can take a record of `tp` without waiting.
    fn has_room(&self, record: &Record) -> bool {
        // A record no function subscribes to completes at once, room or not.
        let subscribed = self
            .ctx
            .topics
            .current()
            .lookup(&record.tp.topic)
            .is_some_and(|f| !f.is_empty());
        if subscribed
            && (self.ctx.dispatcher.room() == 0 || !self.ctx.dispatcher.room_for(&record.tp.topic))
        {
            return false;
        }
        self.per_partition == 0
            || self
                .shared
                .lock()
                .submitted
                .get(&record.tp)
                .copied()
                .unwrap_or(0)
                < self.per_partition
    }

    /// Hands `record` to the dispatcher, or gives it back when there is no room.
    async fn try_submit(&self, record: Arc<Record>) -> Result<(), Arc<Record>> {
        if !self.has_room(&record) {
            return Err(record);
        }
        let mut message = record.to_message(&self.group, self.ordering);
        if self.dead_letters {
            message.extensions.insert(record.clone());
        }
        // Counted before the hand-over: the record may settle (and uncount itself) before
        // `submit` returns.
        *self
            .shared
            .lock()
            .submitted
            .entry(record.tp.clone())
            .or_default() += 1;
        match self.ctx.dispatcher.submit(message).await {
            Ok(completion) => {
                self.settler.push(record, completion);
                Ok(())
            }
            Err(_) => {
                // Draining for shutdown: it stays unsettled, delivered again later.
                if let Some(n) = self.shared.lock().submitted.get_mut(&record.tp) {
                    *n = n.saturating_sub(1);
                }
                Err(record)
            }
        }
    }

    /// Applies what happened meanwhile: holds, revokes, room for parked records.
    async fn step(&mut self) {
        let (held, revoked) = {
            let mut s = self.shared.lock();
            (
                std::mem::take(&mut s.newly_held),
                std::mem::take(&mut s.revoked),
            )
        };
        for tp in revoked {
            self.paused.remove(&tp);
            self.holding.remove(&tp);
            self.retrying.remove(&tp);
        }
        self.metrics.set_paused(self.paused.len());
        for tp in held {
            if !self.holding.contains_key(&tp) {
                let mut attempts = self.hold_backoff.attempts();
                let at = Instant::now() + attempts.next_delay();
                self.holding.insert(tp.clone(), Hold { at, attempts });
                self.pause(&tp);
                self.ctx
                    .health
                    .set_stalled(&tp.topic, &tp.partition.to_string(), true);
            }
        }
        self.retry_held().await;
        self.submit_parked().await;
    }

    /// Hands parked records to the dispatcher while there is room, one per partition in
    /// turn so that no partition starves the others, oldest first within a partition; a
    /// paused partition whose parked records are all submitted is resumed.
    async fn submit_parked(&mut self) {
        let mut candidates: Vec<TopicPartition> = {
            let s = self.shared.lock();
            s.parked
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(tp, _)| tp)
                .chain(self.paused.iter())
                .filter(|tp| !self.holding.contains_key(*tp))
                .cloned()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect()
        };
        while !candidates.is_empty() {
            let mut blocked = Vec::new();
            for (i, tp) in candidates.iter().enumerate() {
                let next = self
                    .shared
                    .lock()
                    .parked
                    .get_mut(tp)
                    .and_then(VecDeque::pop_front);
                let Some(record) = next else {
                    self.resume(tp);
                    blocked.push(i);
                    continue;
                };
                if let Err(record) = self.try_submit(record).await {
                    self.shared
                        .lock()
                        .parked
                        .entry(tp.clone())
                        .or_default()
                        .push_front(record);
                    blocked.push(i);
                }
            }
            if self.ctx.dispatcher.room() == 0 {
                return;
            }
            for i in blocked.into_iter().rev() {
                candidates.swap_remove(i);
            }
        }
    }

    /// Delivers held records again when their time came; ends the hold of partitions
    /// whose held records all completed.
    async fn retry_held(&mut self) {
        let now = Instant::now();
        let partitions: Vec<(TopicPartition, Instant)> = self
            .holding
            .iter()
            .map(|(tp, hold)| (tp.clone(), hold.at))
            .collect();
        for (tp, at) in partitions {
            let (still_held, waiting, retrying) = {
                let s = self.shared.lock();
                let retrying = self.retrying.get(&tp).is_some_and(|offsets| {
                    s.marks
                        .get(&tp)
                        .is_some_and(|p| offsets.iter().any(|o| p.is_pending(*o)))
                });
                (
                    s.marks.is_held(&tp),
                    s.held.get(&tp).is_some_and(|h| !h.is_empty()),
                    retrying,
                )
            };
            if !still_held && !waiting && !retrying {
                // The held records were delivered again and completed: flow again, parked
                // records first.
                self.retrying.remove(&tp);
                tracing::info!(partition = %tp, "partition no longer holds");
                self.holding.remove(&tp);
                self.ctx
                    .health
                    .set_stalled(&tp.topic, &tp.partition.to_string(), false);
                continue;
            }
            if at > now || !waiting {
                continue;
            }
            let records = self.shared.lock().held.remove(&tp).unwrap_or_default();
            tracing::info!(partition = %tp, records = records.len(), "delivering held records again");
            let mut left = Vec::new();
            let mut retried = Vec::new();
            for record in records {
                if !self.shared.lock().marks.retry(&tp, record.offset) {
                    continue;
                }
                let offset = record.offset;
                if let Err(record) = self.try_submit(record).await {
                    self.shared
                        .lock()
                        .marks
                        .settle(&tp, record.offset, Settled::Hold);
                    left.push(record);
                } else {
                    retried.push(offset);
                }
            }
            self.retrying.insert(tp.clone(), retried);
            if !left.is_empty() {
                self.shared
                    .lock()
                    .held
                    .entry(tp.clone())
                    .or_default()
                    .extend(left);
            }
            if let Some(hold) = self.holding.get_mut(&tp) {
                hold.at = now + hold.attempts.next_delay();
            }
        }
    }

    fn pause(&mut self, tp: &TopicPartition) {
        if self.paused.insert(tp.clone()) {
            if let Err(e) = self.consumer.pause(&one(tp)) {
                tracing::warn!(partition = %tp, error = %e, "pausing failed");
            }
            self.metrics.set_paused(self.paused.len());
        }
    }

    /// Resumes `tp`. librdkafka fetches it again from the last record handed over; the
    /// watermarks verify that the fetch starts there.
    fn resume(&mut self, tp: &TopicPartition) {
        if self.paused.remove(tp) {
            if let Err(e) = self.consumer.resume(&one(tp)) {
                tracing::warn!(partition = %tp, error = %e, "resuming failed");
            }
            self.shared.lock().marks.restart(tp, Instant::now());
            self.metrics.set_paused(self.paused.len());
        }
    }

    /// Seeks `tp` to read it again from `to`.
    async fn rewind(&self, tp: &TopicPartition, to: SeekTo) {
        let offset = match to {
            SeekTo::Offset(o) => Offset::Offset(o),
            SeekTo::Beginning => Offset::Beginning,
            SeekTo::Reset => match self.initial_offset {
                InitialOffset::Earliest => Offset::Beginning,
                InitialOffset::Latest => Offset::End,
            },
        };
        self.metrics.rewound();
        tracing::debug!(partition = %tp, ?offset, "seeking back");
        let consumer = self.consumer.clone();
        let (topic, partition) = (tp.topic.clone(), tp.partition);
        let sought = tokio::task::spawn_blocking(move || {
            consumer.seek(&topic, partition, offset, BROKER_CALL_TIMEOUT)
        })
        .await;
        match sought {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(partition = %tp, ?offset, error = %e, "seeking failed; tried again");
                self.shared.lock().marks.seek_failed(tp, Instant::now());
            }
            Err(e) => {
                tracing::error!(partition = %tp, error = %e, "seek task failed; tried again");
                self.shared.lock().marks.seek_failed(tp, Instant::now());
            }
        }
    }

    /// Partitions whose fetch brought nothing since a resume, an assignment or a seek:
    /// if the log has records past the frontier, the fetch skipped them and the partition
    /// is read again from further back; if not, it is idle and reads on. Partitions whose
    /// committed offset is still unknown are looked up again.
    async fn check_overdue(&mut self) {
        let overdue = self
            .shared
            .lock()
            .marks
            .overdue(Instant::now(), VERIFY_PATIENCE);
        for (tp, frontier) in overdue {
            let consumer = self.consumer.clone();
            match frontier {
                None => {
                    let mut tpl = Tpl::with_capacity(1);
                    tpl.add_partition(&tp.topic, tp.partition);
                    let found = tokio::task::spawn_blocking(move || starts(&*consumer, &tpl))
                        .await
                        .unwrap_or_default();
                    let Some(start) = found.get(&tp).copied() else {
                        continue;
                    };
                    let seek = self
                        .shared
                        .lock()
                        .marks
                        .start_known(&tp, start, Instant::now());
                    if let Some(to) = seek {
                        tracing::info!(partition = %tp, ?start, "committed offset found");
                        self.rewind(&tp, to).await;
                    }
                }
                // Paused partitions fetch nothing; they are verified once resumed.
                Some(_) if self.paused.contains(&tp) => {}
                Some(frontier) => {
                    let (topic, partition) = (tp.topic.clone(), tp.partition);
                    let end = tokio::task::spawn_blocking(move || {
                        consumer.fetch_watermarks(&topic, partition, BROKER_CALL_TIMEOUT)
                    })
                    .await;
                    let Ok(Ok((_, end))) = end else {
                        continue;
                    };
                    let seek = {
                        let mut s = self.shared.lock();
                        if end > frontier {
                            s.marks.seek_back(&tp, Instant::now())
                        } else {
                            s.marks.idle(&tp, end);
                            None
                        }
                    };
                    if let Some(to) = seek {
                        tracing::debug!(partition = %tp, frontier, log_end = end, "nothing fetched though the log has records past the frontier");
                        self.rewind(&tp, to).await;
                    }
                }
            }
        }
    }

    fn commit_async(&self) {
        let commits = self.shared.lock().marks.take_commits();
        if commits.is_empty() {
            return;
        }
        tracing::debug!(offsets = %describe(&commits), "committing");
        if let Err(e) = self.consumer.commit(&to_tpl(&commits), CommitMode::Async) {
            self.metrics.committed(false);
            tracing::warn!(error = %e, "offset commit failed; it is retried");
            let mut s = self.shared.lock();
            for (tp, o) in &commits {
                s.marks.commit_failed(tp, *o);
            }
        }
    }

    /// Releases parked records, waits for in-flight ones, commits, leaves the group.
    async fn shut_down(&mut self) {
        {
            let mut s = self.shared.lock();
            let parked: Vec<(TopicPartition, Vec<i64>)> = s
                .parked
                .drain()
                .map(|(tp, q)| (tp, q.iter().map(|r| r.offset).collect()))
                .collect();
            for (tp, offsets) in parked {
                s.marks.release_in_flight(&tp, &offsets);
            }
        }
        loop {
            let wake = self.shared.wake.notified();
            let in_flight = self.shared.lock().marks.total_in_flight();
            if in_flight == 0 {
                break;
            }
            tracing::info!(in_flight, "waiting for in-flight records");
            wake.await;
        }
        let commits = self.shared.lock().marks.take_commits();
        if !commits.is_empty() {
            let consumer = self.consumer.clone();
            let tpl = to_tpl(&commits);
            let result =
                tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
                    .await
                    .unwrap_or_else(|e| {
                        Err(KafkaError::Canceled)
                            .inspect_err(|_| tracing::error!(error = %e, "commit task failed"))
                    });
            self.metrics.committed(result.is_ok());
            match result {
                Ok(()) => tracing::info!(offsets = %describe(&commits), "committed on shutdown"),
                Err(e) => {
                    tracing::error!(error = %e, "final commit failed; those records will be delivered again")
                }
            }
        }
    }
}

/// The settling task: a completed record is acknowledged (its offset may be committed),
/// held (its partition stalls) or released; with replies configured, a record is held
/// until its reply is published.
fn settler(shared: Arc<Shared>, replies: Option<Arc<Replies>>) -> Settler<Arc<Record>> {
    Settler::spawn(move |record: Arc<Record>, outcome: MessageOutcome| {
        let shared = shared.clone();
        let replies = replies.clone();
        async move {
            let mut settled = match outcome.disposition() {
                Disposition::Ack => Settled::Ack,
                Disposition::Hold => Settled::Hold,
                Disposition::Release => Settled::Release,
                // Only with broker retries, which this connector does not turn on.
                Disposition::Retry { .. } => Settled::Release,
            };
            if settled == Settled::Ack
                && let Some(replies) = &replies
                && let Err(e) = replies.publish(&record, &outcome).await
            {
                tracing::error!(error = %e, ce_id = %record.id(), "reply not published: the record holds its partition");
                settled = Settled::Hold;
            }
            if settled == Settled::Hold {
                if outcome.held_unmatched {
                    tracing::warn!(partition = %record.tp, offset = record.offset, "no function subscribes to this topic right now: the record holds its partition until one does");
                } else {
                    tracing::error!(partition = %record.tp, offset = record.offset, "record holds its partition: nothing past it is committed");
                }
            }
            shared.settle(&record, settled);
        }
    })
}

/// Sleeps until `at` (forever when `None`; the branch is disabled then).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Probes the brokers for `/readyz` and measures lag, until `stop`.
async fn probe(
    consumer: Arc<KafkaConsumer>,
    health: Health,
    metrics: Metrics,
    interval: Duration,
    initial: InitialOffset,
    stop: CancellationToken,
) {
    let mut failures = Backoff {
        initial: Duration::from_millis(200),
        max: interval,
    }
    .attempts();
    loop {
        let c = consumer.clone();
        let timeout = interval.clamp(Duration::from_secs(5), Duration::from_secs(10));
        let measured = tokio::task::spawn_blocking(move || measure(&c, timeout, initial)).await;
        let delay = match measured {
            Ok(Ok(lags)) => {
                if failures.failures() > 0 {
                    tracing::info!("brokers reachable again");
                }
                failures.reset();
                health.set_source_ready(true);
                for (tp, lag) in lags {
                    metrics.set_backlog(&tp.topic, &tp.partition.to_string(), lag);
                }
                interval
            }
            Ok(Err(e)) => {
                health.set_source_ready(false);
                let delay = failures.next_delay();
                tracing::warn!(error = %e, failures = failures.failures(), retry_in = ?delay, "brokers not reachable");
                delay
            }
            Err(_) => interval,
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Broker metadata (the readiness probe), then each assigned partition's lag: log end
/// offset minus the group's committed offset.
fn measure(
    consumer: &KafkaConsumer,
    timeout: Duration,
    initial: InitialOffset,
) -> KafkaResult<Vec<(TopicPartition, u64)>> {
    consumer.fetch_metadata(None, timeout)?;
    let assignment = consumer.assignment()?;
    if assignment.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = consumer.committed_offsets(assignment, timeout)?;
    let mut out = Vec::new();
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let lag = match e.offset() {
            Offset::Offset(o) => high - o,
            _ => match initial {
                InitialOffset::Earliest => high - low,
                InitialOffset::Latest => 0,
            },
        };
        out.push((
            TopicPartition::new(e.topic(), e.partition()),
            u64::try_from(lag).unwrap_or(0),
        ));
    }
    Ok(out)
}
