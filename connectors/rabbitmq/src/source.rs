//! The queue consumer as a [`Source`]: declare, bind, consume, settle.
//!
//! On (re)connecting: a channel with `basic.qos` prefetch = twice what the dispatcher
//! holds (`Dispatcher::message_window`: twice `max_inflight`, plus what the functions'
//! batches hold; set again when the topic map changes it): the dispatcher's share, and as
//! much again for messages whose acks are on their way (see [`prefetch`]); so the broker
//! never hands this process more unacknowledged messages than that (the backpressure is
//! the broker's); the queue (and the dead-letter exchange and queue)
//! declared when `declare` is on, else checked to exist; one binding of the queue to
//! `exchange` per topic; then `basic.consume` with manual acks. Replicas consuming the
//! same queue split its messages: the broker gives each message to one consumer.
//!
//! Each message is settled once all its deliveries are terminal:
//!
//! | disposition | AMQP |
//! | --- | --- |
//! | ack: delivered, dead-lettered (published and confirmed first), dropped, or no function | `basic.ack`; a request with `reply_to` first gets its reply, published and confirmed (see [`crate::reply`]); a reply that fails holds the request instead |
//! | release: cut short by shutdown | `basic.nack` with requeue, at once |
//! | hold: failed for good and could not be dead-lettered | kept unacknowledged for `hold_delay`, then `basic.nack` with requeue |
//!
//! A held message is not requeued at once: it would come straight back and spin. Kept
//! unacknowledged it also keeps its place: a classic queue requeues a message at its
//! original position, so it is the next one delivered. It is never lost: the broker
//! requeues every unacknowledged message of a channel that closes, so a crash, a lost
//! connection or SIGKILL gives all of them back, to this replica after it reconnects or
//! to another one.
//!
//! Topics follow the topic map without a restart (when `topics` is not configured): a
//! topic that appears is bound, one this process bound that disappears is unbound.
//! Bindings made by an earlier run stay until removed by hand.
//!
//! A broker outage is never fatal: the consumer fails, `pull` reports it, and the next
//! `pull` (after the pump's backoff) connects again. Only what retrying cannot fix stops
//! the connector: refused credentials, a queue that does not exist with `declare` off, a
//! queue declared with other arguments (`PRECONDITION_FAILED`).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use connector_sdk::follow::TopicChanges;
use connector_sdk::trace::TraceContext;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceContext, SourceError};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, Channel, Connection, Consumer, ExchangeKind};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::config::{QueueType, RabbitConfig};
use crate::delivery::{self, Envelope};
use crate::metrics::RabbitMetrics;
use crate::reply::{Replies, ReplyTo};

/// What a live connection consumes through.
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    /// Which link this is: delivery tags are only valid on the channel they came from.
    generation: u64,
    consumer: Consumer,
    /// Stops the queue-depth task with the link.
    _depth: DropGuard,
}

/// What settling one message needs: its acker, and where its reply goes when it is a
/// request (`reply_to`) and replies are on.
pub struct AckHandle {
    acker: Acker,
    /// The delivery tag, and the link it is valid on.
    tag: u64,
    generation: u64,
    reply_to: Option<Box<ReplyTo>>,
}

/// A held message waiting out its delay before it is requeued.
type Waiting = Pin<Box<dyn Future<Output = Acker> + Send + Sync>>;

/// The queue as a [`Source`].
pub struct RabbitSource {
    config: RabbitConfig,
    ctx: SourceContext,
    queue: ShortString,
    prefetch: u16,
    link: Option<Link>,
    /// Counts the links opened.
    generation: u64,
    /// Bindings this process made, to unbind those the topic map drops.
    bound: BTreeSet<String>,
    changes: TopicChanges,
    waiting: FuturesUnordered<Waiting>,
    /// Cancelled on flush: every waiting message is requeued at once.
    requeue_now: CancellationToken,
    metrics: RabbitMetrics,
    source: String,
    /// Publishes replies, when they are on.
    replies: Option<Arc<Replies>>,
    /// Acknowledgements being sent, and replies being published (each then acknowledging
    /// or holding its request): waited for on flush, before the channel closes.
    settling: TaskTracker,
}

impl RabbitSource {
    /// A source for `config`; connects on the first `pull`.
    pub fn new(
        ctx: SourceContext,
        config: RabbitConfig,
        metrics: RabbitMetrics,
        replies: Option<Arc<Replies>>,
    ) -> Result<Self, crate::Error> {
        let queue = ShortString::try_new(config.queue.clone())
            .map_err(|e| crate::Error::Setup(format!("queue: {e}")))?;
        let changes = TopicChanges::new(&ctx);
        let prefetch = prefetch(&ctx);
        Ok(Self {
            source: crate::source_uri(&config),
            config,
            queue,
            prefetch,
            link: None,
            generation: 0,
            bound: BTreeSet::new(),
            changes,
            waiting: FuturesUnordered::new(),
            requeue_now: CancellationToken::new(),
            metrics,
            ctx,
            replies,
            settling: TaskTracker::new(),
        })
    }

    /// Connects before the pump starts, so readiness (which the pump turns on) follows a
    /// consumer that is bound and consuming. A transient failure is left to `pull`, which
    /// retries with the pump's backoff.
    pub async fn connect(&mut self) -> Result<(), SourceError> {
        match self.open().await {
            Ok(link) => {
                self.link = Some(link);
                Ok(())
            }
            Err(SourceError::Transient(e)) => {
                tracing::warn!(error = %e, "connecting to RabbitMQ failed; retrying with backoff");
                Ok(())
            }
            Err(fatal) => Err(fatal),
        }
    }

    /// Connects, declares, binds and starts consuming.
    async fn open(&mut self) -> Result<Link, SourceError> {
        let connection = crate::connect(&self.config, "consumer")
            .await
            .map_err(|e| match e {
                crate::Error::Connect(e) => classify(e),
                other => SourceError::fatal(other),
            })?;
        let connection = Arc::new(connection);
        let channel = self.step(connection.create_channel()).await?;
        self.prefetch = prefetch(&self.ctx);
        self.step(channel.basic_qos(self.prefetch, BasicQosOptions::default()))
            .await?;
        self.declare(&channel).await?;
        self.check_reply_exchange(&channel).await?;
        self.bound.clear();
        self.bind(&channel).await?;
        let consumer = self
            .step(channel.basic_consume(
                self.queue.clone(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ))
            .await?;
        let depth = CancellationToken::new();
        tokio::spawn(crate::metrics::measure_depth(
            connection.clone(),
            self.queue.clone(),
            self.config.metrics_interval,
            self.metrics.clone(),
            depth.clone(),
        ));
        tracing::info!(queue = %self.queue, prefetch = self.prefetch, "consuming");
        self.generation += 1;
        Ok(Link {
            connection,
            channel,
            generation: self.generation,
            consumer,
            _depth: depth.drop_guard(),
        })
    }

    /// One broker call, bounded by `command_timeout`.
    async fn step<T>(
        &self,
        call: impl Future<Output = lapin::Result<T>>,
    ) -> Result<T, SourceError> {
        match tokio::time::timeout(self.config.command_timeout, call).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(SourceError::transient(format!(
                "no answer from RabbitMQ within {:?}",
                self.config.command_timeout
            ))),
        }
    }

    async fn declare(&self, channel: &Channel) -> Result<(), SourceError> {
        let r = &self.config;
        if !r.declare {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            self.step(channel.queue_declare(self.queue.clone(), passive, FieldTable::default()))
                .await?;
            return Ok(());
        }
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(r.queue_type.as_str().into()),
        );
        self.declare_exchange(channel, &r.exchange).await?;
        self.step(channel.queue_declare(
            self.queue.clone(),
            QueueDeclareOptions::durable(),
            arguments.clone(),
        ))
        .await?;
        if !r.dead_letter_exchange.is_empty() {
            let exchange = short(&r.dead_letter_exchange)?;
            let queue = short(&r.dead_letter_queue())?;
            self.declare_exchange(channel, &r.dead_letter_exchange)
                .await?;
            self.step(channel.queue_declare(
                queue.clone(),
                QueueDeclareOptions::durable(),
                arguments,
            ))
            .await?;
            self.step(channel.queue_bind(
                queue,
                exchange,
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .await?;
        }
        Ok(())
    }

    /// A named reply exchange must exist (a passive declare): replies to a missing one
    /// would fail, and hold every request, until someone declares it.
    async fn check_reply_exchange(&self, channel: &Channel) -> Result<(), SourceError> {
        let name = &self.config.reply_exchange;
        if self.replies.is_none() || name.is_empty() {
            return Ok(());
        }
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        self.step(channel.exchange_declare(
            short(name)?,
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        ))
        .await
    }

    /// A durable topic exchange; the predeclared `amq.*` ones (which may not be declared)
    /// and the default exchange (`""`) are taken as they are.
    async fn declare_exchange(&self, channel: &Channel, name: &str) -> Result<(), SourceError> {
        if name.is_empty() || name.starts_with("amq.") {
            return Ok(());
        }
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        self.step(channel.exchange_declare(
            short(name)?,
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        ))
        .await
    }

    /// Binds the wanted topics not bound yet; unbinds those this process bound that are
    /// no longer wanted. Nothing without `declare` or an `exchange`.
    async fn bind(&mut self, channel: &Channel) -> Result<(), SourceError> {
        if !self.config.declare || self.config.exchange.is_empty() {
            return Ok(());
        }
        let exchange = short(&self.config.exchange)?;
        let wanted: BTreeSet<String> = self
            .ctx
            .wanted_topics()
            .into_iter()
            .filter(|t| {
                let ok = ShortString::try_new(t.as_str()).is_ok();
                if !ok {
                    tracing::warn!(topic = %t, "a topic longer than 255 bytes cannot be a binding key; ignored");
                }
                ok
            })
            .collect();
        for topic in wanted.difference(&self.bound.clone()) {
            self.step(channel.queue_bind(
                self.queue.clone(),
                exchange.clone(),
                short(topic)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .await?;
            tracing::info!(exchange = %exchange, binding = %topic, "bound");
            self.bound.insert(topic.clone());
        }
        for topic in self.bound.clone().difference(&wanted) {
            self.step(channel.queue_unbind(
                self.queue.clone(),
                exchange.clone(),
                short(topic)?,
                FieldTable::default(),
            ))
            .await?;
            tracing::info!(exchange = %exchange, binding = %topic, "unbound");
            self.bound.remove(topic);
        }
        Ok(())
    }

    fn message(&self, d: lapin::message::Delivery) -> (Message, AckHandle) {
        let envelope = Envelope {
            queue: self.queue.as_str(),
            exchange: d.exchange.as_str(),
            routing_key: d.routing_key.as_str(),
            redelivered: d.redelivered,
            quorum: self.config.queue_type == QueueType::Quorum,
        };
        let reply_to = self
            .replies
            .as_ref()
            .and_then(|_| ReplyTo::from_request(d.routing_key.as_str(), &d.properties));
        let message = delivery::message(&envelope, &d.properties, d.data, &self.source);
        let reply_to = reply_to.map(|mut to| {
            to.trace = TraceContext::for_reply(&message);
            Box::new(to)
        });
        let handle = AckHandle {
            acker: d.acker,
            tag: d.delivery_tag,
            generation: self.generation,
            reply_to,
        };
        (message, handle)
    }

    /// Keeps `acker`'s message for `delay`, then requeues it (at once on flush).
    fn requeue_after(&mut self, acker: Acker, delay: Duration) {
        let now = self.requeue_now.clone();
        self.waiting.push(Box::pin(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = now.cancelled() => {}
            }
            acker
        }));
    }
}

/// Publishes the reply of a request that is to be acknowledged, on a task of its own (a
/// confirmation is a round trip to the broker; settling other messages does not wait for
/// it), then acknowledges the request; if the reply cannot be published, the request is
/// held as an undeliverable message is: requeued after `hold_delay` (at once on flush).
fn reply_then_ack(
    settling: &TaskTracker,
    replies: Arc<Replies>,
    to: ReplyTo,
    acker: Acker,
    outcome: MessageOutcome,
    hold_delay: Duration,
    requeue_now: CancellationToken,
) {
    settling.spawn(async move {
        match replies.send(&to, &outcome).await {
            Ok(()) => {
                if let Err(e) = acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %e, ce_id = %outcome.id, "acknowledging a replied request failed; it will be redelivered");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ce_id = %outcome.id, hold_delay = ?hold_delay, "reply not published: the request is held, then requeued");
                tokio::select! {
                    () = tokio::time::sleep(hold_delay) => {}
                    () = requeue_now.cancelled() => {}
                }
                if let Err(e) = requeue(&acker).await {
                    tracing::debug!(error = %e, "requeueing a held request failed");
                }
            }
        }
    });
}

/// What woke `pull`. Lives for one turn of the loop: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Event {
    Requeue(Acker),
    TopicsChanged,
    Delivery(Option<lapin::Result<lapin::message::Delivery>>),
}

/// The channel's prefetch: twice what the dispatcher can hold, at most AMQP's 65,535.
/// A message keeps its place in the broker's window until the broker has processed its
/// ack, well after the dispatcher let go of it: a quorum queue settles acks through its
/// Raft log, milliseconds under load. With the window no larger than the dispatcher's,
/// the acks on their way left the dispatcher short of messages (the bench consumed at
/// half the plain consumer's rate); the second half covers them. What the broker may
/// hand over beyond the dispatcher's room waits in the consumer's buffer: bounded.
fn prefetch(ctx: &SourceContext) -> u16 {
    let window = ctx.dispatcher.message_window().max(1).saturating_mul(2);
    u16::try_from(window).unwrap_or(u16::MAX)
}

async fn requeue(acker: &Acker) -> Result<(), SourceError> {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    acker
        .nack(options)
        .await
        .map(|_| ())
        .map_err(SourceError::transient)
}

#[async_trait::async_trait]
impl Source for RabbitSource {
    type Ack = AckHandle;

    async fn pull(&mut self) -> Result<Vec<(Message, AckHandle)>, SourceError> {
        if self.link.is_none() {
            let link = self.open().await?;
            self.link = Some(link);
        }
        loop {
            let event = {
                let Some(link) = self.link.as_mut() else {
                    return Err(SourceError::transient("not connected"));
                };
                tokio::select! {
                    biased;
                    Some(acker) = self.waiting.next(), if !self.waiting.is_empty() => Event::Requeue(acker),
                    () = self.changes.changed() => Event::TopicsChanged,
                    next = link.consumer.next() => Event::Delivery(next),
                }
            };
            match event {
                Event::Requeue(acker) => {
                    // On a task of its own: awaited here, a pull dropped meanwhile (the
                    // pump settling a completion first) would drop the acker with it and
                    // leave the message unacknowledged until the channel closes.
                    self.settling.spawn(async move {
                        if let Err(e) = requeue(&acker).await {
                            // Its channel is gone, and with it the message went back.
                            tracing::debug!(error = %e, "requeueing a held message failed");
                        }
                    });
                }
                Event::TopicsChanged => {
                    // The link stays in place: `pull` is dropped whenever a completion is
                    // settled first, and a link taken out here would go with it (its
                    // connection closed, its unacknowledged messages redelivered).
                    let Some(channel) = self.link.as_ref().map(|l| l.channel.clone()) else {
                        continue;
                    };
                    let wanted = prefetch(&self.ctx);
                    let mut bound = Ok(());
                    if wanted != self.prefetch {
                        bound = self
                            .step(channel.basic_qos(wanted, BasicQosOptions::default()))
                            .await;
                        if bound.is_ok() {
                            tracing::info!(
                                prefetch = wanted,
                                was = self.prefetch,
                                "prefetch changed with the functions' batches"
                            );
                            self.prefetch = wanted;
                        }
                    }
                    if bound.is_ok() {
                        bound = self.bind(&channel).await;
                    }
                    if let Err(e) = bound {
                        self.link = None;
                        return Err(e);
                    }
                    self.changes.applied();
                }
                Event::Delivery(Some(Ok(first))) => {
                    let mut batch = vec![self.message(first)];
                    // Take what has already arrived, without waiting.
                    while batch.len() < usize::from(self.prefetch) {
                        let Some(link) = self.link.as_mut() else {
                            break;
                        };
                        match link.consumer.next().now_or_never() {
                            Some(Some(Ok(d))) => batch.push(self.message(d)),
                            _ => break,
                        }
                    }
                    return Ok(batch);
                }
                Event::Delivery(Some(Err(e))) => {
                    // Whatever closed a working channel (even a 406 for a stale delivery
                    // tag), reconnecting recovers from it.
                    self.link = None;
                    return Err(SourceError::transient(e));
                }
                Event::Delivery(None) => {
                    self.link = None;
                    return Err(SourceError::transient(
                        "the broker cancelled the consumer (queue deleted, or connection lost)",
                    ));
                }
            }
        }
    }

    async fn settle(
        &mut self,
        handle: AckHandle,
        disposition: Disposition,
        outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        let AckHandle {
            acker,
            reply_to,
            tag,
            generation,
        } = handle;
        match disposition {
            Disposition::Ack => {
                if let (Some(to), Some(replies)) = (reply_to, &self.replies) {
                    reply_then_ack(
                        &self.settling,
                        replies.clone(),
                        *to,
                        acker,
                        outcome.clone(),
                        self.config.hold_delay,
                        self.requeue_now.clone(),
                    );
                    return Ok(());
                }
                // Sent straight on the channel and not awaited: `Acker::ack` hands the ack
                // to lapin's internal task, then to its I/O loop, and waiting for each in
                // turn kept the pump from settling and pulling meanwhile (most of the
                // connector's time went to those thread hand-offs). `basic_ack` queues its
                // frame before its first await; what is left is waiting for the write,
                // which nobody needs: frames of a channel go out in order, so the acks
                // precede the close in `flush`. A tag is only valid on its own channel: a
                // message of an earlier link went back to the queue when that one closed.
                let Some(link) = self.link.as_ref().filter(|l| l.generation == generation) else {
                    return Ok(());
                };
                if let Some(Err(e)) = link
                    .channel
                    .basic_ack(tag, BasicAckOptions::default())
                    .now_or_never()
                {
                    return Err(SourceError::transient(e));
                }
                Ok(())
            }
            Disposition::Release => requeue(&acker).await,
            Disposition::Hold => {
                self.requeue_after(acker, self.config.hold_delay);
                Ok(())
            }
            // Only with broker retries, which this connector does not ask for; honoured
            // all the same.
            Disposition::Retry { after } => {
                self.requeue_after(acker, after);
                Ok(())
            }
        }
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        self.requeue_now.cancel();
        // Acks and replies in flight (each reply within command_timeout) finish while the
        // channel is still open.
        self.settling.close();
        self.settling.wait().await;
        while let Some(acker) = self.waiting.next().await {
            if let Err(e) = requeue(&acker).await {
                tracing::debug!(error = %e, "requeueing a held message failed");
            }
        }
        if let Some(link) = self.link.take() {
            // Unacknowledged messages (none, normally) go back to the queue on close.
            let _ = link.channel.close(200, "connector stopping".into()).await;
            let _ = link
                .connection
                .close(200, "connector stopping".into())
                .await;
        }
        Ok(())
    }
}

/// A name from the configuration or the topic map as an AMQP short string.
fn short(name: &str) -> Result<ShortString, SourceError> {
    ShortString::try_new(name).map_err(|e| SourceError::fatal(format!("{name:?}: {e}")))
}

/// Broker refusals that retrying cannot fix are fatal; the rest (I/O, a closed
/// connection, a timeout) transient.
pub fn classify(e: lapin::Error) -> SourceError {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
        && matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
                    | AMQPSoftError::PRECONDITIONFAILED
            )
        )
    {
        return SourceError::fatal(e);
    }
    SourceError::transient(e)
}
