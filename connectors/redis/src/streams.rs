//! Streams mode: a consumer group, at-least-once.
//!
//! Tasks, all stopped by the shutdown token except the acker:
//!
//! - **reader** (its own connection, since XREADGROUP BLOCK holds it): creates the group on
//!   each stream (MKSTREAM; an existing group is kept), first re-reads this consumer's own
//!   pending entries (id `0`, for a stable consumer name after a restart), then loops on
//!   `XREADGROUP ... BLOCK <block> ... >`. A topic change or shutdown interrupts the block
//!   with `CLIENT UNBLOCK` from the command connection, so the read returns at once and
//!   nothing it read is lost. Redis down: reconnect with backoff, `/readyz` 503 meanwhile;
//!   after a reconnect the groups are created again (a restarted Redis without
//!   persistence has none).
//! - **claimer** (command connection): every `claim_interval`, XAUTOCLAIM entries idle
//!   longer than `claim_idle` (a dead consumer's, or ones left pending for a retry) and
//!   deliver them again; every third of `claim_idle`, XCLAIM this consumer's in-flight
//!   entries to itself with JUSTID, which resets their idle time without counting a
//!   delivery, so a slow function is never mistaken for a dead consumer.
//! - **acker**: XACKs completed entries in batches (pipelined per stream), retrying with
//!   backoff while Redis is away (an XACK is idempotent), and gives released entries back
//!   (below). It runs until the source is flushed.
//! - **measurer**: XPENDING and XINFO GROUPS per stream for the backlog metrics.
//!
//! Both producers feed one bounded channel that [`Source::pull`] reads, which keeps `pull`
//! cancel-safe (the pump drops it whenever a completion arrives first) and applies
//! backpressure: when the dispatcher has no room, the pump stops pulling, the channel
//! fills, and the reader stops reading.
//!
//! Dispositions: `Ack` → XACK. `Hold` (failed for good, no dead letter possible) → left
//! pending and no longer refreshed, so it is claimed again after `claim_idle` and retried,
//! its delivery count growing. `Release` (shutdown) → XCLAIM to itself with `IDLE
//! <claim_idle>` so that another replica claims it at once, and `RETRYCOUNT` lowered by one
//! when no attempt was made, so an entry that never reached a function does not count as a
//! delivery. The delivery count of every entry (1 for a new one) becomes the message's
//! prior attempts, so `max_attempts` counts across replicas and restarts.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use connector_sdk::backoff::Backoff;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceContext, SourceError};
use redis::Value;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::entry::{self, Entry, Shape};
use crate::metrics::RedisMetrics;

/// The streams-mode settings the tasks need.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Consumer group.
    pub group: String,
    /// This replica's consumer name.
    pub consumer: String,
    /// Where a created group starts.
    pub start_id: String,
    /// Entries per read or claim.
    pub batch_size: usize,
    /// XREADGROUP BLOCK.
    pub block: Duration,
    /// XAUTOCLAIM min idle.
    pub claim_idle: Duration,
    /// How often to claim.
    pub claim_interval: Duration,
    /// How often to measure the backlog.
    pub metrics_interval: Duration,
    /// Remove the consumer on a clean exit when nothing is pending for it.
    pub delete_consumer_on_exit: bool,
    /// Connect and command timeout.
    pub command_timeout: Duration,
}

/// What settling one entry needs.
#[derive(Debug, Clone)]
pub struct EntryRef {
    stream: Arc<str>,
    id: String,
    deliveries: u64,
}

type Batch = Vec<(Message, EntryRef)>;

enum AckOp {
    Ack(EntryRef),
    Release { entry: EntryRef, attempted: bool },
}

/// State shared by the source and its tasks.
struct Shared {
    client: redis::Client,
    commands: ConnectionManager,
    settings: Settings,
    shape: Shape,
    /// Entries read and not yet acknowledged or given back, per stream.
    in_flight: Mutex<HashMap<Arc<str>, HashSet<String>>>,
    /// Streams whose group exists, as the reader last set them up.
    ready: watch::Sender<Arc<[Arc<str>]>>,
    /// Streams whose own pending entries the reader has not re-read yet. The claimer
    /// leaves them alone until then: re-reading history and claiming both raise an
    /// entry's delivery count, so a claim racing the re-read counted one delivery twice.
    history_pending: Mutex<HashSet<Arc<str>>>,
    metrics: RedisMetrics,
}

impl Shared {
    /// Records which streams still have their own history to re-read.
    fn set_history_pending(&self, history: &BTreeSet<Arc<str>>) {
        let mut pending = self
            .history_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pending.clear();
        pending.extend(history.iter().cloned());
    }

    fn history_pending(&self, stream: &Arc<str>) -> bool {
        self.history_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(stream)
    }

    /// Starts tracking the entries of `batch`, dropping those already in flight here (a
    /// history re-read and a claim can race for the same entry).
    fn track(&self, batch: Batch) -> Batch {
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        batch
            .into_iter()
            .filter(|(_, e)| {
                map.entry(e.stream.clone())
                    .or_default()
                    .insert(e.id.clone())
            })
            .collect()
    }

    fn untrack(&self, entries: &[&EntryRef]) {
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for e in entries {
            if let Some(set) = map.get_mut(&e.stream) {
                set.remove(&e.id);
            }
        }
    }

    fn is_tracked(&self, stream: &str, id: &str) -> bool {
        let map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(stream).is_some_and(|s| s.contains(id))
    }

    fn tracked(&self) -> Vec<(Arc<str>, Vec<String>)> {
        let map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(s, ids)| (s.clone(), ids.iter().cloned().collect()))
            .collect()
    }

    /// Turns parsed entries of `stream` into a batch. `counts` gives delivery counts of
    /// entries read again (history, claims); new entries have been delivered once.
    fn batch(
        &self,
        stream: &str,
        entries: Vec<Entry>,
        counts: &HashMap<String, u64>,
        forget: &mut Vec<EntryRef>,
    ) -> Batch {
        let stream: Arc<str> = Arc::from(stream);
        let mut batch = Vec::with_capacity(entries.len());
        for e in entries {
            let deliveries = counts.get(&e.id).copied().unwrap_or(1);
            let entry_ref = EntryRef {
                stream: stream.clone(),
                id: e.id,
                deliveries,
            };
            let Some(fields) = e.fields else {
                tracing::warn!(stream = %stream, id = %entry_ref.id, "a pending entry was deleted from the stream; acknowledging it without delivery");
                forget.push(entry_ref);
                continue;
            };
            let shaped = self
                .shape
                .message(&stream, &entry_ref.id, &fields, deliveries);
            if shaped.body_field_missing {
                self.metrics.body_field_missing(&stream);
                tracing::debug!(stream = %stream, id = %entry_ref.id, "entry has no body field; delivering the whole entry as JSON");
            }
            batch.push((shaped.message, entry_ref));
        }
        batch
    }

    /// Delivery counts of `ids` in `stream` (pending for this consumer), one pipelined
    /// round trip.
    async fn delivery_counts(
        &self,
        conn: &mut ConnectionManager,
        stream: &str,
        ids: &[&str],
    ) -> redis::RedisResult<HashMap<String, u64>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XPENDING")
                .arg(stream)
                .arg(&self.settings.group)
                .arg(*id)
                .arg(*id)
                .arg(1)
                .arg(&self.settings.consumer);
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        let mut counts = HashMap::new();
        for reply in &replies {
            match entry::parse_delivery_counts(reply) {
                Ok(c) => counts.extend(c),
                Err(e) => tracing::warn!(error = %e, "reading delivery counts"),
            }
        }
        Ok(counts)
    }
}

/// The streams source: what [`connector_sdk::pump`] drives.
pub struct StreamsSource {
    shared: Arc<Shared>,
    ctx: SourceContext,
    tx: Option<mpsc::Sender<Batch>>,
    rx: mpsc::Receiver<Batch>,
    acks: Option<mpsc::UnboundedSender<AckOp>>,
    acker: Option<JoinHandle<()>>,
    producers: Vec<JoinHandle<Vec<EntryRef>>>,
    measurer: Option<JoinHandle<()>>,
}

impl StreamsSource {
    /// A source consuming the context's topics as streams. Nothing connects until the
    /// first pull.
    pub fn new(
        ctx: SourceContext,
        client: redis::Client,
        commands: ConnectionManager,
        settings: Settings,
        shape: Shape,
        metrics: RedisMetrics,
    ) -> Self {
        let (tx, rx) = mpsc::channel(2);
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            client,
            commands,
            settings,
            shape,
            in_flight: Mutex::new(HashMap::new()),
            ready: watch::channel(Arc::from(Vec::new())).0,
            history_pending: Mutex::new(HashSet::new()),
            metrics,
        });
        let acker = tokio::spawn(acker(shared.clone(), ack_rx));
        Self {
            shared,
            ctx,
            tx: Some(tx),
            rx,
            acks: Some(acks),
            acker: Some(acker),
            producers: Vec::new(),
            measurer: None,
        }
    }

    fn start(&mut self, tx: mpsc::Sender<Batch>) {
        tracing::info!(
            group = %self.shared.settings.group,
            consumer = %self.shared.settings.consumer,
            "consuming Redis streams"
        );
        let stop = self.ctx.shutdown.clone();
        let reader = Reader {
            shared: self.shared.clone(),
            ctx: self.ctx.clone(),
            tx: tx.clone(),
            history: BTreeSet::new(),
            history_from: HashMap::new(),
            topics_dirty: false,
        };
        self.producers.push(tokio::spawn(reader.run()));
        self.producers
            .push(tokio::spawn(claimer(self.shared.clone(), tx, stop.clone())));
        self.measurer = Some(tokio::spawn(measurer(
            self.shared.clone(),
            self.ctx.clone(),
            stop,
        )));
    }

    fn send(&self, op: AckOp) {
        if let Some(acks) = &self.acks {
            // The acker only stops after `flush` dropped this sender.
            let _ = acks.send(op);
        }
    }
}

#[async_trait::async_trait]
impl Source for StreamsSource {
    type Ack = EntryRef;

    async fn pull(&mut self) -> Result<Vec<(Message, EntryRef)>, SourceError> {
        if let Some(tx) = self.tx.take() {
            // Not ready until the reader has connected and set up the groups.
            self.ctx.health.set_source_ready(false);
            self.start(tx);
        }
        match self.rx.recv().await {
            Some(batch) => Ok(batch),
            // Every producer stopped: only on shutdown, which the pump checks first.
            None => std::future::pending().await,
        }
    }

    async fn settle(
        &mut self,
        entry: EntryRef,
        disposition: Disposition,
        outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        match disposition {
            Disposition::Ack => self.send(AckOp::Ack(entry)),
            Disposition::Hold => {
                tracing::warn!(
                    stream = %entry.stream,
                    id = %entry.id,
                    deliveries = entry.deliveries,
                    claim_idle = ?self.shared.settings.claim_idle,
                    "entry failed for good and could not be dead-lettered; it stays pending and is retried after claim_idle"
                );
                self.shared.untrack(&[&entry]);
            }
            Disposition::Release => {
                let attempted = outcome.deliveries.iter().any(|d| d.attempts > 0);
                self.send(AckOp::Release { entry, attempted });
            }
            // Only with broker retries, which this connector does not turn on: give it back.
            Disposition::Retry { .. } => {
                let attempted = outcome.deliveries.iter().any(|d| d.attempts > 0);
                self.send(AckOp::Release { entry, attempted });
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        // The producers stop on the shutdown token; what they still held, and what waits
        // in the channel, goes back to the group.
        let mut leftovers = Vec::new();
        for producer in self.producers.drain(..) {
            if let Ok(mut rest) = producer.await {
                leftovers.append(&mut rest);
            }
        }
        self.rx.close();
        while let Ok(batch) = self.rx.try_recv() {
            leftovers.extend(batch.into_iter().map(|(_, e)| e));
        }
        if !leftovers.is_empty() {
            tracing::info!(
                entries = leftovers.len(),
                "giving back entries read but not delivered"
            );
        }
        for entry in leftovers {
            self.send(AckOp::Release {
                entry,
                attempted: false,
            });
        }
        if let Some(m) = self.measurer.take() {
            m.abort();
        }
        self.acks = None;
        if let Some(acker) = self.acker.take() {
            let limit = self.shared.settings.command_timeout * 2;
            if tokio::time::timeout(limit, acker).await.is_err() {
                return Err(SourceError::transient(
                    "acknowledgements could not be written before the deadline; those entries will be delivered again",
                ));
            }
        }
        if self.shared.settings.delete_consumer_on_exit {
            delete_consumer_if_idle(&self.shared).await;
        }
        Ok(())
    }
}

/// Removes this consumer from the group on each stream where nothing is pending for it.
async fn delete_consumer_if_idle(shared: &Shared) {
    let streams: Vec<Arc<str>> = shared.ready.borrow().iter().cloned().collect();
    let mut conn = shared.commands.clone();
    let s = &shared.settings;
    for stream in streams {
        let pending: redis::RedisResult<Value> = redis::cmd("XPENDING")
            .arg(stream.as_ref())
            .arg(&s.group)
            .arg("-")
            .arg("+")
            .arg(1)
            .arg(&s.consumer)
            .query_async(&mut conn)
            .await;
        match pending {
            Ok(Value::Array(rows)) if rows.is_empty() => {
                let deleted: redis::RedisResult<Value> = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(stream.as_ref())
                    .arg(&s.group)
                    .arg(&s.consumer)
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = deleted {
                    tracing::debug!(stream = %stream, error = %e, "removing the consumer failed");
                }
            }
            Ok(_) => {
                tracing::info!(stream = %stream, consumer = %s.consumer, "entries still pending for this consumer; keeping it in the group")
            }
            Err(e) => {
                tracing::debug!(stream = %stream, error = %e, "checking pending entries failed")
            }
        }
    }
}

fn reconnect_backoff() -> connector_sdk::backoff::Attempts {
    Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(10),
    }
    .attempts()
}

/// Sleeps `delay` unless `stop` comes first; returns whether it was stopped.
async fn pause(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// Sends `batch` unless shutdown comes first; then returns it as leftovers.
async fn deliver(
    tx: &mpsc::Sender<Batch>,
    batch: Batch,
    stop: &CancellationToken,
) -> Result<(), Vec<EntryRef>> {
    if batch.is_empty() {
        return Ok(());
    }
    let permit = tokio::select! {
        biased;
        p = tx.reserve() => p.ok(),
        () = stop.cancelled() => None,
    };
    match permit {
        Some(permit) => {
            permit.send(batch);
            Ok(())
        }
        None => Err(batch.into_iter().map(|(_, e)| e).collect()),
    }
}

fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// The reader task: group setup, own history, then new entries.
struct Reader {
    shared: Arc<Shared>,
    ctx: SourceContext,
    tx: mpsc::Sender<Batch>,
    /// Streams whose own pending entries are still to be re-read, and from which id.
    history: BTreeSet<Arc<str>>,
    history_from: HashMap<Arc<str>, String>,
    /// The topic map changed since the streams were last set up.
    topics_dirty: bool,
}

/// Why a read step ended without entries.
enum Step {
    /// Go on.
    Continue,
    /// The connection is broken: reconnect.
    Reconnect,
    /// The groups must be set up again (NOGROUP: deleted, or Redis restarted empty).
    Resetup,
    /// Shutdown: these entries were read and not handed on.
    Stop(Vec<EntryRef>),
}

impl Reader {
    async fn run(mut self) -> Vec<EntryRef> {
        let stop = self.ctx.shutdown.clone();
        let mut topics = self.ctx.topics.subscribe();
        let mut failures = reconnect_backoff();
        let mut ready: Vec<Arc<str>> = Vec::new();
        let mut broken: BTreeSet<String> = BTreeSet::new();
        let mut conn: Option<(MultiplexedConnection, i64)> = None;
        let mut set_up = false;
        loop {
            if stop.is_cancelled() {
                return Vec::new();
            }
            let Some((c, client_id)) = conn.as_mut() else {
                match self.connect().await {
                    Ok(c) => {
                        conn = Some(c);
                        set_up = false;
                    }
                    Err(e) => {
                        self.shared.metrics.error("connect");
                        self.ctx.health.set_source_ready(false);
                        let delay = failures.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, "connecting to Redis failed");
                        if pause(delay, &stop).await {
                            return Vec::new();
                        }
                    }
                }
                continue;
            };
            let wanted: BTreeSet<String> = self.ctx.wanted_topics().into_iter().collect();
            if !set_up || self.topics_dirty || topics.has_changed().unwrap_or(false) {
                topics.borrow_and_update();
                self.topics_dirty = false;
                match self
                    .set_up(c, &wanted, &mut ready, &mut broken, set_up)
                    .await
                {
                    Ok(()) => {
                        set_up = true;
                        failures.reset();
                        self.ctx.health.set_source_ready(true);
                    }
                    Err(e) => {
                        self.shared.metrics.error("connect");
                        self.ctx.health.set_source_ready(false);
                        let delay = failures.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, "setting up consumer groups failed");
                        conn = None;
                        if pause(delay, &stop).await {
                            return Vec::new();
                        }
                        continue;
                    }
                }
            }
            if ready.is_empty() {
                // Nothing to read yet: wait for the topic map to name a stream.
                tokio::select! {
                    () = stop.cancelled() => return Vec::new(),
                    _ = topics.changed() => { self.topics_dirty = true; }
                    () = tokio::time::sleep(self.shared.settings.claim_interval) => { set_up = false; }
                }
                continue;
            }
            let step = if self.history.is_empty() {
                self.read_new(c, *client_id, &ready, &mut topics).await
            } else {
                self.read_history(c).await
            };
            match step {
                Step::Continue => {}
                Step::Stop(rest) => return rest,
                Step::Reconnect => {
                    self.ctx.health.set_source_ready(false);
                    conn = None;
                    let delay = failures.next_delay();
                    if pause(delay, &stop).await {
                        return Vec::new();
                    }
                }
                Step::Resetup => set_up = false,
            }
        }
    }

    async fn connect(&self) -> redis::RedisResult<(MultiplexedConnection, i64)> {
        let s = &self.shared.settings;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(s.command_timeout))
            // The blocking read holds the connection for up to `block`.
            .set_response_timeout(Some(s.block + s.command_timeout));
        let mut conn = self
            .shared
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await?;
        Ok((conn, id))
    }

    /// Creates the group on every wanted stream not yet set up, and forgets streams no
    /// longer wanted. `again`: the connection is the same (a topic change), so streams
    /// already set up are kept.
    async fn set_up(
        &mut self,
        conn: &mut MultiplexedConnection,
        wanted: &BTreeSet<String>,
        ready: &mut Vec<Arc<str>>,
        broken: &mut BTreeSet<String>,
        again: bool,
    ) -> redis::RedisResult<()> {
        if !again {
            ready.clear();
        }
        ready.retain(|s| wanted.contains(s.as_ref()));
        let s = &self.shared.settings;
        for stream in wanted {
            if ready.iter().any(|r| r.as_ref() == stream) {
                continue;
            }
            let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(&s.group)
                .arg(&s.start_id)
                .arg("MKSTREAM")
                .query_async(conn)
                .await;
            match created {
                Ok(_) => {
                    tracing::info!(stream = %stream, group = %s.group, start_id = %s.start_id, "created the consumer group")
                }
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                    return Err(e);
                }
                Err(e) => {
                    if broken.insert(stream.clone()) {
                        tracing::error!(stream = %stream, error = %e, "cannot consume this key as a stream; skipping it");
                    }
                    continue;
                }
            }
            broken.remove(stream);
            let stream: Arc<str> = Arc::from(stream.as_str());
            self.history.insert(stream.clone());
            self.history_from.insert(stream.clone(), "0".to_owned());
            ready.push(stream);
        }
        self.history.retain(|h| ready.contains(h));
        // Before `ready` wakes the claimer.
        self.shared.set_history_pending(&self.history);
        let previous = self.shared.ready.send_replace(Arc::from(ready.clone()));
        for gone in previous.iter().filter(|p| !ready.contains(p)) {
            self.shared.metrics.forget(gone);
            self.ctx.metrics.remove_backlog(gone, "");
        }
        Ok(())
    }

    /// Re-reads this consumer's own pending entries of one stream (after a restart with
    /// the same consumer name).
    async fn read_history(&mut self, conn: &mut MultiplexedConnection) -> Step {
        let Some(stream) = self.history.iter().next().cloned() else {
            return Step::Continue;
        };
        let from = self
            .history_from
            .get(&stream)
            .cloned()
            .unwrap_or_else(|| "0".to_owned());
        let s = &self.shared.settings;
        let read: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&s.group)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(s.batch_size)
            .arg("STREAMS")
            .arg(stream.as_ref())
            .arg(&from)
            .query_async(conn)
            .await;
        let entries = match read {
            Ok(v) => match entry::parse_read(&v) {
                Ok(mut streams) => streams.pop().map(|(_, e)| e).unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable reply; skipping history of this stream");
                    Vec::new()
                }
            },
            Err(e) => return self.failed("read", &e),
        };
        let Some(last) = entries.last().map(|e| e.id.clone()) else {
            self.history.remove(&stream);
            self.history_from.remove(&stream);
            self.shared.set_history_pending(&self.history);
            return Step::Continue;
        };
        self.history_from.insert(stream.clone(), last);
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|e| !self.shared.is_tracked(&stream, &e.id))
            .collect();
        if entries.is_empty() {
            return Step::Continue;
        }
        tracing::info!(stream = %stream, entries = entries.len(), "re-reading this consumer's pending entries");
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let mut commands = self.shared.commands.clone();
        let counts = match self
            .shared
            .delivery_counts(&mut commands, &stream, &ids)
            .await
        {
            Ok(c) => c,
            Err(e) => return self.failed("read", &e),
        };
        self.hand_on(&stream, entries, &counts).await
    }

    async fn read_new(
        &mut self,
        conn: &mut MultiplexedConnection,
        client_id: i64,
        streams: &[Arc<str>],
        topics: &mut watch::Receiver<Arc<connector_sdk::TopicMap>>,
    ) -> Step {
        let s = &self.shared.settings;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&s.group)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(s.batch_size)
            .arg("BLOCK")
            .arg(
                u64::try_from(s.block.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .arg("STREAMS");
        for stream in streams {
            cmd.arg(stream.as_ref());
        }
        for _ in streams {
            cmd.arg(">");
        }
        let follow = self.ctx.topics_follow_map();
        let stop = self.ctx.shutdown.clone();
        let result = {
            let read = cmd.query_async::<Value>(conn);
            tokio::pin!(read);
            let interrupted = tokio::select! {
                biased;
                r = &mut read => Some(r),
                () = stop.cancelled() => None,
                Ok(()) = topics.changed(), if follow => {
                    self.topics_dirty = true;
                    None
                }
            };
            match interrupted {
                Some(r) => r,
                None => {
                    // Wake the blocked read so it returns at once; what it already read
                    // (nothing, or entries that arrived in this instant) is handed on.
                    let mut commands = self.shared.commands.clone();
                    let woke: redis::RedisResult<Value> = redis::cmd("CLIENT")
                        .arg("UNBLOCK")
                        .arg(client_id)
                        .query_async(&mut commands)
                        .await;
                    if let Err(e) = woke {
                        tracing::debug!(error = %e, "CLIENT UNBLOCK failed; waiting for the block to end");
                    }
                    read.await
                }
            }
        };
        let reply = match result {
            Ok(v) => v,
            Err(e) => return self.failed("read", &e),
        };
        let parsed = match entry::parse_read(&reply) {
            Ok(p) => p,
            Err(e) => {
                // Cannot happen with a conforming server; the entries stay pending and
                // are claimed after claim_idle.
                tracing::error!(error = %e, "unreadable XREADGROUP reply");
                self.shared.metrics.error("read");
                return Step::Continue;
            }
        };
        let mut step = Step::Continue;
        for (stream, entries) in parsed {
            if let Step::Stop(mut rest) = self.hand_on(&stream, entries, &HashMap::new()).await {
                match &mut step {
                    Step::Stop(all) => all.append(&mut rest),
                    _ => step = Step::Stop(rest),
                }
            }
        }
        step
    }

    async fn hand_on(
        &self,
        stream: &str,
        entries: Vec<Entry>,
        counts: &HashMap<String, u64>,
    ) -> Step {
        let mut forget = Vec::new();
        let batch = self.shared.batch(stream, entries, counts, &mut forget);
        let batch = self.shared.track(batch);
        for f in forget {
            self.forget(f);
        }
        match deliver(&self.tx, batch, &self.ctx.shutdown).await {
            Ok(()) => Step::Continue,
            Err(rest) => Step::Stop(rest),
        }
    }

    fn forget(&self, entry: EntryRef) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut conn = shared.commands.clone();
            let acked: redis::RedisResult<Value> = redis::cmd("XACK")
                .arg(entry.stream.as_ref())
                .arg(&shared.settings.group)
                .arg(&entry.id)
                .query_async(&mut conn)
                .await;
            if let Err(e) = acked {
                tracing::debug!(error = %e, "acknowledging a deleted entry failed");
            }
        });
    }

    fn failed(&self, operation: &'static str, e: &redis::RedisError) -> Step {
        self.shared.metrics.error(operation);
        if is_nogroup(e) {
            tracing::warn!(error = %e, "the consumer group is gone; creating it again");
            Step::Resetup
        } else {
            tracing::warn!(error = %e, "reading from Redis failed; reconnecting");
            Step::Reconnect
        }
    }
}

/// The claimer task: XAUTOCLAIM idle entries, and keep this consumer's own in-flight
/// entries from looking idle.
async fn claimer(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Batch>,
    stop: CancellationToken,
) -> Vec<EntryRef> {
    let s = shared.settings.clone();
    let refresh_every = s.claim_idle / 3;
    let tick = refresh_every.min(s.claim_interval);
    let mut last_claim: Option<tokio::time::Instant> = None;
    let mut last_refresh = tokio::time::Instant::now();
    let mut ready = shared.ready.subscribe();
    loop {
        // Claim soon after the first streams are set up, then every claim_interval.
        tokio::select! {
            () = stop.cancelled() => return Vec::new(),
            () = tokio::time::sleep(tick) => {}
            Ok(()) = ready.changed(), if last_claim.is_none() => {}
        }
        let mut conn = shared.commands.clone();
        if last_refresh.elapsed() >= refresh_every {
            last_refresh = tokio::time::Instant::now();
            refresh(&shared, &mut conn).await;
        }
        if last_claim.is_some_and(|t| t.elapsed() < s.claim_interval) {
            continue;
        }
        last_claim = Some(tokio::time::Instant::now());
        let streams: Vec<Arc<str>> = ready.borrow_and_update().iter().cloned().collect();
        for stream in streams {
            if shared.history_pending(&stream) {
                // Claimed at a later round, once the reader has re-read it.
                continue;
            }
            if let Err(rest) = claim_stream(&shared, &mut conn, &stream, &tx, &stop).await {
                return rest;
            }
            prune_consumers(&shared, &mut conn, &stream).await;
        }
    }
}

/// Removes consumers of the group that hold nothing and have not read for twice
/// `claim_idle`: replicas that died (a generated consumer name is new each start, so
/// without this the group collects one name per crash). A live consumer reads at least
/// every `block`, shorter than `claim_idle`; and one removed anyway is recreated by its
/// next read, having nothing pending to lose.
async fn prune_consumers(shared: &Shared, conn: &mut ConnectionManager, stream: &str) {
    let s = &shared.settings;
    let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(&s.group)
        .query_async(conn)
        .await;
    let Ok(reply) = reply else {
        return;
    };
    let limit = u64::try_from((s.claim_idle * 2).as_millis()).unwrap_or(u64::MAX);
    for (name, pending, idle) in entry::parse_consumers(&reply) {
        if name == s.consumer || pending > 0 || idle < limit {
            continue;
        }
        let deleted: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(stream)
            .arg(&s.group)
            .arg(&name)
            .query_async(conn)
            .await;
        match deleted {
            Ok(_) => {
                tracing::info!(stream, consumer = %name, "removed an idle consumer with nothing pending")
            }
            Err(e) => {
                tracing::debug!(stream, consumer = %name, error = %e, "removing an idle consumer failed")
            }
        }
    }
}

/// Claims every entry of `stream` idle longer than `claim_idle`, in batches.
async fn claim_stream(
    shared: &Shared,
    conn: &mut ConnectionManager,
    stream: &str,
    tx: &mpsc::Sender<Batch>,
    stop: &CancellationToken,
) -> Result<(), Vec<EntryRef>> {
    let s = &shared.settings;
    let idle_ms = u64::try_from(s.claim_idle.as_millis()).unwrap_or(u64::MAX);
    let mut cursor = "0-0".to_owned();
    // Bounded per round; the next round continues where the backlog still is.
    for _ in 0..64 {
        let reply: redis::RedisResult<Value> = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(&s.group)
            .arg(&s.consumer)
            .arg(idle_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(s.batch_size)
            .query_async(conn)
            .await;
        let (next, entries) = match reply.map(|v| entry::parse_autoclaim(&v)) {
            Ok(Ok(parsed)) => parsed,
            Ok(Err(e)) => {
                tracing::warn!(stream, error = %e, "unreadable XAUTOCLAIM reply");
                return Ok(());
            }
            Err(e) => {
                shared.metrics.error("claim");
                if !is_nogroup(&e) {
                    tracing::warn!(stream, error = %e, "claiming idle entries failed");
                }
                return Ok(());
            }
        };
        // Our own entries still in flight were only refreshed, not lost.
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|e| !shared.is_tracked(stream, &e.id))
            .collect();
        if !entries.is_empty() {
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            let counts = shared
                .delivery_counts(conn, stream, &ids)
                .await
                .unwrap_or_default();
            tracing::info!(
                stream,
                entries = entries.len(),
                "claimed idle pending entries"
            );
            shared.metrics.claimed(stream, entries.len());
            let mut forget = Vec::new();
            let batch = shared.batch(stream, entries, &counts, &mut forget);
            let batch = shared.track(batch);
            deliver(tx, batch, stop).await?;
        }
        if next == "0-0" {
            break;
        }
        cursor = next;
    }
    Ok(())
}

/// XCLAIM this consumer's in-flight entries to itself: resets their idle time so no
/// replica claims them while a function is still working on them. JUSTID does not count
/// a delivery.
async fn refresh(shared: &Shared, conn: &mut ConnectionManager) {
    let s = &shared.settings;
    for (stream, ids) in shared.tracked() {
        for chunk in ids.chunks(500) {
            let mut cmd = redis::cmd("XCLAIM");
            cmd.arg(stream.as_ref())
                .arg(&s.group)
                .arg(&s.consumer)
                .arg(0);
            for id in chunk {
                cmd.arg(id);
            }
            cmd.arg("JUSTID");
            let claimed: redis::RedisResult<Value> = cmd.query_async(conn).await;
            if let Err(e) = claimed {
                shared.metrics.error("claim");
                tracing::debug!(stream = %stream, error = %e, "refreshing in-flight entries failed");
            }
        }
    }
}

/// The acker task: XACK in batches, give released entries back.
async fn acker(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AckOp>) {
    let mut conn = shared.commands.clone();
    let mut failures = reconnect_backoff();
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut acks: HashMap<Arc<str>, Vec<&EntryRef>> = HashMap::new();
        let mut releases = Vec::new();
        for op in &ops {
            match op {
                AckOp::Ack(e) => acks.entry(e.stream.clone()).or_default().push(e),
                AckOp::Release { entry, attempted } => releases.push((entry, *attempted)),
            }
        }
        let s = &shared.settings;
        let idle_ms = u64::try_from(s.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for (stream, entries) in &acks {
            let cmd = pipe.cmd("XACK").arg(stream.as_ref()).arg(&s.group);
            for e in entries {
                cmd.arg(&e.id);
            }
            cmd.ignore();
        }
        for (e, attempted) in &releases {
            let retry_count = if *attempted {
                e.deliveries
            } else {
                e.deliveries.saturating_sub(1)
            };
            pipe.cmd("XCLAIM")
                .arg(e.stream.as_ref())
                .arg(&s.group)
                .arg(&s.consumer)
                .arg(0)
                .arg(&e.id)
                .arg("IDLE")
                .arg(idle_ms)
                .arg("RETRYCOUNT")
                .arg(retry_count)
                .arg("JUSTID")
                .ignore();
        }
        loop {
            let done: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
            match done {
                Ok(()) => {
                    failures.reset();
                    break;
                }
                Err(e) => {
                    shared.metrics.error(if releases.is_empty() {
                        "ack"
                    } else {
                        "release"
                    });
                    let delay = failures.next_delay();
                    tracing::warn!(error = %e, entries = ops.len(), retry_in = ?delay, "acknowledging entries failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        let all: Vec<&EntryRef> = acks
            .values()
            .flatten()
            .copied()
            .chain(releases.iter().map(|(e, _)| *e))
            .collect();
        shared.untrack(&all);
    }
}

/// The measurer task: backlog per stream, as KEDA's redis-streams scaler computes it.
async fn measurer(shared: Arc<Shared>, ctx: SourceContext, stop: CancellationToken) {
    let mut conn = shared.commands.clone();
    loop {
        let streams: Vec<Arc<str>> = shared.ready.borrow().iter().cloned().collect();
        for stream in streams {
            let mut pipe = redis::pipe();
            pipe.cmd("XPENDING")
                .arg(stream.as_ref())
                .arg(&shared.settings.group)
                .cmd("XINFO")
                .arg("GROUPS")
                .arg(stream.as_ref());
            let replies: redis::RedisResult<(Value, Value)> = pipe.query_async(&mut conn).await;
            match replies {
                Ok((pending, groups)) => {
                    let (count, oldest) =
                        entry::parse_pending_summary(&pending).unwrap_or((0, None));
                    let lag = entry::parse_group_lag(&groups, &shared.settings.group);
                    let age = oldest
                        .as_deref()
                        .and_then(entry::entry_time)
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .map(|d| d.as_secs_f64());
                    shared.metrics.set_backlog(&stream, count, lag, age);
                    ctx.metrics
                        .set_backlog(&stream, "", count.saturating_add(lag.unwrap_or(0)));
                }
                Err(e) => {
                    shared.metrics.error("measure");
                    tracing::debug!(stream = %stream, error = %e, "measuring the backlog failed");
                }
            }
        }
        if pause(shared.settings.metrics_interval, &stop).await {
            return;
        }
    }
}
