//! JetStream: at-least-once through durable pull consumers.
//!
//! Setup: the stream `jetstream.stream` must exist, or is created with
//! `jetstream.stream_subjects` when `create_stream` is set. For each subscribed subject
//! pattern (the configured `topics`, else the topic map's, followed without a restart)
//! there is one durable pull consumer filtered on it, named by [`consumer_name`]. One
//! consumer per pattern rather than one with several filter subjects, because
//! nats-server before 2.10 allows only one filter subject per consumer. Replicas share
//! the consumers and so split the messages. A consumer whose pattern leaves the topic map
//! is no longer consumed but is not deleted (another replica may still use it).
//!
//! Each message is handed to the dispatcher and settled when all its deliveries end:
//!
//! | outcome | JetStream |
//! | --- | --- |
//! | every function accepted it, or none subscribes | `+ACK` |
//! | a delivery was dead-lettered (published to `dead_letter_subject`) | `+TERM` |
//! | held: failed for good and could not be dead-lettered | `-NAK` with the backoff delay for its delivery count |
//! | released on shutdown | `-NAK` at once, so another replica takes it |
//!
//! While a message is held by this process (waiting for room, invoking, between retries)
//! it is reported in progress (`+WPI`) every `in_progress_interval`, so a long invocation
//! is not redelivered after `ack_wait`. The server's delivery count continues the
//! attempts (`X-Delivery-Attempt`, `max_attempts`) across redeliveries and restarts.
//! Backpressure: `max_inflight` in this process, `max_ack_pending` per consumer on the
//! server.
//!
//! Order: with `connector.ordering = "key"` the key is the subject, so messages of one
//! subject are delivered one after another in stream order (retries inside this process
//! keep the subject waiting); a message that is nakked (held) or released is redelivered
//! by the server after later ones.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{self, AckKind, stream};
use connector_sdk::backoff::Backoff;
use connector_sdk::message::DeliveryOutcome;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceContext, SourceError};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{Config, DeliverPolicy};
use crate::connect::Connection;
use crate::message::{self, StreamPosition};
use crate::metrics::{ConsumerCounts, NatsMetrics};
use crate::subscriptions::{Event, Starter, Subscriptions, spawn_until, wanted};

/// The durable consumer for `pattern`: `<base>_<pattern with . * > spelled out>_<hash>`.
/// The hash keeps distinct patterns apart whatever their spelling.
pub fn consumer_name(base: &str, pattern: &str) -> String {
    let mut slug = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        match c {
            '.' => slug.push('_'),
            '*' => slug.push_str("any"),
            '>' => slug.push_str("all"),
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => slug.push(c),
            _ => slug.push('-'),
        }
    }
    slug.truncate(48);
    // FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
    let mut hash: u32 = 0x811c_9dc5;
    for b in pattern.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{base}_{slug}_{hash:08x}")
}

/// What the consumer tasks need, shared.
struct Settings {
    stream: String,
    create_stream: bool,
    stream_subjects: Vec<String>,
    consumer_base: String,
    deliver_policy: DeliverPolicy,
    ack_wait: Duration,
    max_ack_pending: i64,
    batch: usize,
    pull_expires: Duration,
    backlog_interval: Duration,
}

/// Replies of the messages this process holds: reported in progress until settled.
/// Keyed by the reply subject itself (a shared buffer: adding one copies nothing).
// FxHash: a reply subject is some 60 bytes the server made up, hashed twice per message;
// SipHash cost about 700 instructions per message here.
#[derive(Clone, Default)]
struct Held(Arc<Mutex<HashSet<Reply, rustc_hash::FxBuildHasher>>>);

/// A reply subject as a set key (`Subject` has no `Hash`), looked up by its text.
#[derive(PartialEq, Eq)]
struct Reply(Subject);

impl std::hash::Hash for Reply {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for Reply {
    fn borrow(&self) -> &str {
        self.0.as_str()
    }
}

impl Held {
    fn add(&self, reply: &Subject) {
        if let Ok(mut set) = self.0.lock() {
            set.insert(Reply(reply.clone()));
        }
    }

    fn remove(&self, reply: &Subject) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(reply.as_str());
        }
    }

    fn snapshot(&self) -> Vec<Subject> {
        self.0
            .lock()
            .map(|set| set.iter().map(|r| r.0.clone()).collect())
            .unwrap_or_default()
    }
}

/// What settling a JetStream message needs.
pub struct JsAck {
    acker: Acker,
    reply: Subject,
    delivered: u32,
}

/// The JetStream consumers as a [`Source`].
pub struct JetStreamSource {
    connection: Connection,
    // Boxed: a JetStream message is some 300 bytes, moved through a channel and a batch.
    subscriptions: Subscriptions<Box<jetstream::Message>>,
    changes: Option<watch::Receiver<Arc<connector_sdk::TopicMap>>>,
    ctx: SourceContext,
    source: String,
    held: Held,
    backoff: Backoff,
    _heartbeats: Option<DropGuard>,
}

impl JetStreamSource {
    /// Starts the consumer tasks for the wanted subjects and the in-progress reports.
    pub fn new(
        config: &Config,
        connection: Connection,
        ctx: SourceContext,
        metrics: NatsMetrics,
    ) -> Self {
        let js = &config.jetstream;
        let settings = Arc::new(Settings {
            stream: js.stream.clone(),
            create_stream: js.create_stream,
            stream_subjects: if js.stream_subjects.is_empty() {
                config.connector.topics.clone()
            } else {
                js.stream_subjects.clone()
            },
            consumer_base: js.consumer.clone(),
            deliver_policy: js.deliver_policy,
            ack_wait: js.ack_wait,
            // Room for what the functions' batches hold, so that they can fill.
            max_ack_pending: js
                .max_ack_pending
                .max(i64::try_from(ctx.dispatcher.message_window()).unwrap_or(i64::MAX)),
            batch: js.batch,
            pull_expires: js.pull_expires,
            backlog_interval: js.backlog_interval,
        });
        let held = Held::default();
        let context = jetstream::new(connection.client.clone());
        let start: Starter<Box<jetstream::Message>> = {
            let held = held.clone();
            Box::new(move |pattern, tx, token| {
                let task = ConsumerTask {
                    context: context.clone(),
                    settings: settings.clone(),
                    pattern,
                    tx,
                    held: held.clone(),
                    metrics: metrics.clone(),
                };
                spawn_until(token, task.run());
            })
        };
        // Room for what the consumers fetch while the dispatcher is saturated; they stop
        // fetching when it is full.
        let capacity = js.batch.max(1);
        let mut subscriptions = Subscriptions::new(capacity, start);
        subscriptions.reconcile(&wanted(&ctx));
        let changes = ctx.topics_follow_map().then(|| ctx.topics.subscribe());
        let heartbeats = (!js.in_progress_interval.is_zero()).then(|| {
            let token = CancellationToken::new();
            let client = connection.client.clone();
            let held = held.clone();
            let every = js.in_progress_interval;
            spawn_until(token.clone(), report_in_progress(client, held, every));
            token.drop_guard()
        });
        Self {
            source: crate::core::source_name(&config.nats.servers()),
            connection,
            subscriptions,
            changes,
            ctx,
            held,
            backoff: config.connector.backoff,
            _heartbeats: heartbeats,
        }
    }

    /// Turns one event into a message to dispatch, acknowledging copies another of our
    /// consumers owns (on a task: `pull` awaits nothing once it holds messages, so a pull
    /// the pump drops loses none of them). `Err` reports a consumer failure.
    fn accept(
        &self,
        event: Event<Box<jetstream::Message>>,
    ) -> Result<Option<(Message, JsAck)>, SourceError> {
        match event {
            Event::Message { pattern, item } => {
                let Some(reply) = item.message.reply.clone() else {
                    tracing::warn!(subject = %item.message.subject, "a JetStream message without a reply subject; skipped");
                    return Ok(None);
                };
                let Some(position) = StreamPosition::of(&item) else {
                    tracing::warn!(subject = %item.message.subject, "cannot read the stream position of a message; skipped");
                    self.held.remove(&reply);
                    return Ok(None);
                };
                if !self
                    .subscriptions
                    .owns(&pattern, item.message.subject.as_str())
                {
                    // An overlapping consumer of ours delivers this message.
                    self.held.remove(&reply);
                    tokio::spawn(async move {
                        if let Err(e) = item.ack().await {
                            tracing::warn!(error = %e, "acknowledging a copy owned by another consumer failed");
                        }
                    });
                    return Ok(None);
                }
                let delivered = position.delivered;
                let message = message::jetstream(&item.message, position, &self.source);
                let (_, acker) = (*item).split();
                Ok(Some((
                    message,
                    JsAck {
                        acker,
                        reply,
                        delivered,
                    },
                )))
            }
            Event::Failed { pattern, error } => Err(SourceError::transient(format!(
                "consumer for `{pattern}`: {error}"
            ))),
            Event::Recovered { pattern } => {
                tracing::info!(subject = %pattern, "consuming again");
                Ok(None)
            }
        }
    }
}

#[async_trait::async_trait]
impl Source for JetStreamSource {
    type Ack = JsAck;

    async fn pull(&mut self) -> Result<Vec<(Message, JsAck)>, SourceError> {
        loop {
            // Cancel-safe: on shutdown the pump drops this wait.
            self.connection.ensure_connected(&self.ctx.health).await?;
            let event = tokio::select! {
                biased;
                () = self.connection.lost() => continue,
                changed = async {
                    match self.changes.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if changed {
                        self.subscriptions.reconcile(&wanted(&self.ctx));
                    } else {
                        self.changes = None;
                    }
                    continue;
                }
                event = self.subscriptions.next() => event,
            };
            let Some(event) = event else {
                return Err(SourceError::fatal("consumers closed"));
            };
            let recovered = matches!(event, Event::Recovered { .. });
            let mut batch: Vec<(Message, JsAck)> = self.accept(event)?.into_iter().collect();
            while batch.len() < 64 {
                let Some(event) = self.subscriptions.try_next() else {
                    break;
                };
                match self.accept(event) {
                    Ok(accepted) => batch.extend(accepted),
                    Err(e) => {
                        tracing::warn!(error = %e, "JetStream consumer failed");
                    }
                }
            }
            // An empty batch after a recovery tells the pump the source is healthy again.
            if !batch.is_empty() || recovered {
                return Ok(batch);
            }
        }
    }

    async fn settle(
        &mut self,
        ack: JsAck,
        disposition: Disposition,
        outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        self.held.remove(&ack.reply);
        let kind = match disposition {
            Disposition::Ack => {
                if outcome
                    .deliveries
                    .iter()
                    .any(|d| d.outcome == DeliveryOutcome::DeadLettered)
                {
                    AckKind::Term
                } else {
                    AckKind::Ack
                }
            }
            Disposition::Hold => {
                let delay = self.backoff.delay(ack.delivered);
                tracing::warn!(ce_id = %outcome.id, delivered = ack.delivered, retry_in = ?delay, "message not completed; the server redelivers it later");
                AckKind::Nak(Some(delay))
            }
            Disposition::Release => AckKind::Nak(None),
            // Only with broker retries, which this connector does not turn on.
            Disposition::Retry { after } => AckKind::Nak(Some(after)),
        };
        ack.acker
            .ack_with(kind)
            .await
            .map_err(SourceError::transient)
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        self.subscriptions.clear();
        // Fetched but never dispatched: give them back now rather than after ack_wait.
        while let Some(event) = self.subscriptions.try_next() {
            if let Event::Message { item, .. } = event
                && let Err(e) = item.ack_with(AckKind::Nak(None)).await
            {
                tracing::debug!(error = %e, "releasing an undispatched message failed");
            }
        }
        self.connection
            .client
            .flush()
            .await
            .map_err(SourceError::transient)?;
        // Acks are fire-and-forget; one request on the same connection returns only after
        // the server has read everything sent before it, acks included. The answer itself
        // is not read (its shape differs between server versions).
        self.connection
            .client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await
            .map(|_| ())
            .map_err(SourceError::transient)
    }
}

/// Reports every held message in progress every `every`.
async fn report_in_progress(client: async_nats::Client, held: Held, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        for reply in held.snapshot() {
            if let Err(e) = client
                .publish(reply, bytes::Bytes::from_static(b"+WPI"))
                .await
            {
                tracing::debug!(error = %e, "in-progress report failed");
            }
        }
    }
}

/// One consumer: created if missing, consumed, its backlog measured; recreated with
/// backoff after any failure.
struct ConsumerTask {
    context: jetstream::Context,
    settings: Arc<Settings>,
    pattern: Arc<str>,
    tx: mpsc::Sender<Event<Box<jetstream::Message>>>,
    held: Held,
    metrics: NatsMetrics,
}

/// Removes a consumer's metrics when its task ends.
struct MetricsGuard {
    metrics: NatsMetrics,
    stream: String,
    consumer: String,
}

impl Drop for MetricsGuard {
    fn drop(&mut self) {
        self.metrics.remove(&self.stream, &self.consumer);
    }
}

/// Why consuming one pattern stopped.
enum ConsumeError {
    /// Worth retrying with backoff.
    Failed(String),
    /// The stream captures no subject the pattern can match: nothing to consume, ever
    /// (a function topic meant for another source). Not a failure of the connector.
    NotInStream(String),
}

impl From<String> for ConsumeError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

impl ConsumerTask {
    async fn run(self) {
        let name = consumer_name(&self.settings.consumer_base, &self.pattern);
        let _guard = MetricsGuard {
            metrics: self.metrics.clone(),
            stream: self.settings.stream.clone(),
            consumer: name.clone(),
        };
        let mut failures = Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
        .attempts();
        loop {
            let failed = failures.failures() > 0;
            let result = self.consume(&name, failed, &mut failures).await;
            let error = match result {
                Ok(()) => "the message stream ended".to_owned(),
                Err(ConsumeError::Failed(e)) => e,
                Err(ConsumeError::NotInStream(captured)) => {
                    tracing::warn!(
                        subject = %self.pattern,
                        stream = %self.settings.stream,
                        stream_subjects = %captured,
                        "the stream captures no message on this subject; not consuming it"
                    );
                    std::future::pending::<()>().await;
                    return;
                }
            };
            tracing::warn!(subject = %self.pattern, consumer = %name, error = %error, "JetStream consumer failed; retrying");
            let event = Event::Failed {
                pattern: self.pattern.clone(),
                error,
            };
            if self.tx.send(event).await.is_err() {
                return;
            }
            tokio::time::sleep(failures.next_delay()).await;
        }
    }

    async fn stream(&self) -> Result<stream::Stream, String> {
        let s = &self.settings;
        if s.create_stream {
            self.context
                .get_or_create_stream(stream::Config {
                    name: s.stream.clone(),
                    subjects: s.stream_subjects.clone(),
                    ..stream::Config::default()
                })
                .await
                .map_err(|e| format!("stream `{}`: {e}", s.stream))
        } else {
            self.context.get_stream(&s.stream).await.map_err(|e| {
                format!(
                    "stream `{}`: {e} (create it, or set jetstream.create_stream)",
                    s.stream
                )
            })
        }
    }

    async fn consumer(&self, name: &str) -> Result<PullConsumer, ConsumeError> {
        let s = &self.settings;
        let stream = self.stream().await?;
        let captured = &stream.cached_info().config.subjects;
        if !captured.is_empty()
            && !captured
                .iter()
                .any(|c| crate::subject::overlaps(c, &self.pattern))
        {
            return Err(ConsumeError::NotInStream(captured.join(", ")));
        }
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    description: Some(format!("nats-connector: {}", self.pattern)),
                    filter_subject: self.pattern.to_string(),
                    deliver_policy: match s.deliver_policy {
                        DeliverPolicy::All => consumer::DeliverPolicy::All,
                        DeliverPolicy::New => consumer::DeliverPolicy::New,
                    },
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: s.ack_wait,
                    max_ack_pending: s.max_ack_pending,
                    ..consumer::pull::Config::default()
                },
            )
            .await
            .map_err(|e| format!("consumer `{name}` on `{}`: {e}", self.pattern))?;
        if let Ok(info) = consumer.info().await {
            if info.config.ack_wait != s.ack_wait {
                tracing::warn!(
                    consumer = %name,
                    server_ack_wait = ?info.config.ack_wait,
                    configured = ?s.ack_wait,
                    "the existing consumer has another ack_wait than configured; the server's applies (delete the consumer to take the new one)"
                );
            }
            // The connector creates its consumers without a delivery limit: a held message
            // (failed for good, no dead-letter subject) is redelivered until it goes
            // through. A consumer made elsewhere with one gives up on it for good.
            if info.config.max_deliver > 0 {
                tracing::warn!(
                    consumer = %name,
                    max_deliver = info.config.max_deliver,
                    "the existing consumer stops redelivering a message after max_deliver deliveries: a message held that often is never delivered again (delete the consumer to have it made without a limit, or set a dead-letter subject)"
                );
            }
        }
        Ok(consumer)
    }

    async fn consume(
        &self,
        name: &str,
        failed: bool,
        failures: &mut connector_sdk::backoff::Attempts,
    ) -> Result<(), ConsumeError> {
        let s = &self.settings;
        let mut consumer = self.consumer(name).await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(s.batch)
            .expires(s.pull_expires)
            .messages()
            .await
            .map_err(|e| format!("pulling from `{name}`: {e}"))?;
        failures.reset();
        if failed {
            let event = Event::Recovered {
                pattern: self.pattern.clone(),
            };
            if self.tx.send(event).await.is_err() {
                return Ok(());
            }
        }
        let mut backlog = tokio::time::interval(s.backlog_interval);
        backlog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = backlog.tick() => match consumer.info().await {
                    Ok(info) => self.metrics.set(&s.stream, name, ConsumerCounts {
                        pending: info.num_pending,
                        ack_pending: u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
                        redelivered: u64::try_from(info.num_redelivered).unwrap_or(u64::MAX),
                    }),
                    Err(e) => tracing::debug!(consumer = %name, error = %e, "reading the consumer's counts failed"),
                },
                next = messages.next() => match next {
                    Some(Ok(message)) => {
                        if let Some(reply) = &message.message.reply {
                            self.held.add(reply);
                        }
                        let event = Event::Message { pattern: self.pattern.clone(), item: Box::new(message) };
                        if self.tx.send(event).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) => return Err(ConsumeError::Failed(format!("pulling from `{name}`: {e}"))),
                    None => return Ok(()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_valid_and_distinct() {
        let a = consumer_name("c", "orders.*");
        let b = consumer_name("c", "orders.any");
        assert_ne!(a, b);
        assert!(a.starts_with("c_orders_any_"), "{a}");
        for name in [a, b, consumer_name("c", ">")] {
            assert_eq!(crate::subject::validate_name(&name), Ok(()), "{name}");
        }
        assert_eq!(consumer_name("c", "x.y"), consumer_name("c", "x.y"));
    }
}
