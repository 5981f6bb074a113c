//! Pub/Sub mode: SUBSCRIBE to plain topics, PSUBSCRIBE to topics with glob characters
//! (`*`, `?`, `[`). A message matched by a pattern is delivered on the pattern's topic (a
//! function annotated `topic: orders.*` receives `orders.eu` and `orders.us`), with the
//! real channel in `X-Redis-Channel`.
//!
//! **At-most-once**: Redis keeps no Pub/Sub message for anyone. A message published while
//! the connector is disconnected is never seen; one in flight when the process dies or the
//! drain deadline passes is lost; a message whose delivery fails for good is dead-lettered
//! nowhere (there is no stream to write it to) and dropped after logging. Backpressure
//! cannot reach the publisher: when `max_inflight` is reached, messages wait in Redis's
//! output buffer for this client, and Redis disconnects a client that falls too far behind
//! (`client-output-buffer-limit pubsub`). Use streams mode for anything that must arrive.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, SystemTime};

use connector_sdk::backoff::Backoff;
use connector_sdk::config::Ordering;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceContext, SourceError};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::entry::headers;
use crate::metrics::RedisMetrics;

/// Whether `topic` is subscribed with PSUBSCRIBE.
pub fn is_pattern(topic: &str) -> bool {
    topic.contains(['*', '?', '['])
}

/// The Pub/Sub source.
pub struct PubSubSource {
    ctx: SourceContext,
    client: redis::Client,
    source: String,
    ordering: Ordering,
    command_timeout: Duration,
    metrics: RedisMetrics,
    tx: Option<mpsc::Sender<Message>>,
    rx: mpsc::Receiver<Message>,
    subscriber: Option<JoinHandle<()>>,
}

impl PubSubSource {
    /// A source subscribing to the context's topics. Nothing connects until the first pull.
    pub fn new(
        ctx: SourceContext,
        client: redis::Client,
        source: String,
        ordering: Ordering,
        command_timeout: Duration,
        metrics: RedisMetrics,
    ) -> Self {
        let (tx, rx) = mpsc::channel(256);
        Self {
            ctx,
            client,
            source,
            ordering,
            command_timeout,
            metrics,
            tx: Some(tx),
            rx,
            subscriber: None,
        }
    }
}

#[async_trait::async_trait]
impl Source for PubSubSource {
    type Ack = ();

    async fn pull(&mut self) -> Result<Vec<(Message, ())>, SourceError> {
        if let Some(tx) = self.tx.take() {
            // Not ready until subscribed: a message published before that is never seen.
            self.ctx.health.set_source_ready(false);
            let subscriber = Subscriber {
                ctx: self.ctx.clone(),
                client: self.client.clone(),
                source: self.source.clone(),
                ordering: self.ordering,
                command_timeout: self.command_timeout,
                metrics: self.metrics.clone(),
                tx,
                run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
                sequence: AtomicU64::new(0),
            };
            self.subscriber = Some(tokio::spawn(subscriber.run()));
        }
        let Some(first) = self.rx.recv().await else {
            return std::future::pending().await;
        };
        let mut batch = vec![(first, ())];
        while batch.len() < 64 {
            match self.rx.try_recv() {
                Ok(m) => batch.push((m, ())),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn settle(
        &mut self,
        (): (),
        disposition: Disposition,
        outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        if disposition != Disposition::Ack {
            tracing::warn!(ce_id = %outcome.id, ?disposition, "a Pub/Sub message cannot be redelivered; it is lost");
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        if let Some(s) = self.subscriber.take() {
            let _ = s.await;
        }
        self.rx.close();
        let mut lost = 0usize;
        while self.rx.try_recv().is_ok() {
            lost += 1;
        }
        if lost > 0 {
            tracing::warn!(
                messages = lost,
                "Pub/Sub messages received but not delivered before shutdown are lost"
            );
        }
        Ok(())
    }
}

struct Subscriber {
    ctx: SourceContext,
    client: redis::Client,
    source: String,
    ordering: Ordering,
    command_timeout: Duration,
    metrics: RedisMetrics,
    tx: mpsc::Sender<Message>,
    run_id: String,
    sequence: AtomicU64,
}

impl Subscriber {
    async fn run(self) {
        let stop = self.ctx.shutdown.clone();
        let mut topics = self.ctx.topics.subscribe();
        let follow = self.ctx.topics_follow_map();
        let mut failures = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
        .attempts();
        while !stop.is_cancelled() {
            let connected =
                tokio::time::timeout(self.command_timeout, self.client.get_async_pubsub()).await;
            let pubsub = match connected {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    self.failed("connect", &e.to_string(), &mut failures).await;
                    continue;
                }
                Err(_) => {
                    self.failed("connect", "timed out", &mut failures).await;
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            topics.borrow_and_update();
            let mut subscribed = BTreeSet::new();
            if let Err(e) = self.follow(&mut sink, &mut subscribed).await {
                self.failed("subscribe", &e.to_string(), &mut failures)
                    .await;
                continue;
            }
            failures.reset();
            self.ctx.health.set_source_ready(true);
            tracing::info!(topics = ?subscribed, "subscribed");
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    Ok(()) = topics.changed(), if follow => {
                        topics.borrow_and_update();
                        if let Err(e) = self.follow(&mut sink, &mut subscribed).await {
                            self.failed("subscribe", &e.to_string(), &mut failures).await;
                            break;
                        }
                    }
                    msg = stream.next() => match msg {
                        Some(msg) => {
                            let message = self.message(&msg);
                            tokio::select! {
                                biased;
                                sent = self.tx.send(message) => if sent.is_err() { return },
                                () = stop.cancelled() => return,
                            }
                        }
                        None => {
                            self.failed("read", "connection closed", &mut failures).await;
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Subscribes to wanted topics not yet subscribed and unsubscribes from the others.
    async fn follow(
        &self,
        sink: &mut redis::aio::PubSubSink,
        subscribed: &mut BTreeSet<String>,
    ) -> redis::RedisResult<()> {
        let wanted: BTreeSet<String> = self.ctx.wanted_topics().into_iter().collect();
        for topic in wanted.difference(subscribed) {
            if is_pattern(topic) {
                sink.psubscribe(topic).await?;
            } else {
                sink.subscribe(topic).await?;
            }
        }
        for topic in subscribed.difference(&wanted) {
            if is_pattern(topic) {
                sink.punsubscribe(topic).await?;
            } else {
                sink.unsubscribe(topic).await?;
            }
        }
        *subscribed = wanted;
        Ok(())
    }

    fn message(&self, msg: &redis::Msg) -> Message {
        let channel = msg.get_channel_name().to_owned();
        let pattern: Option<String> = if msg.from_pattern() {
            msg.get_pattern().ok()
        } else {
            None
        };
        let topic = pattern.clone().unwrap_or_else(|| channel.clone());
        let seq = self.sequence.fetch_add(1, AtomicOrdering::Relaxed);
        let mut message = Message::new(
            topic,
            bytes::Bytes::copy_from_slice(msg.get_payload_bytes()),
            // Pub/Sub has no coordinates; unique per message, never redelivered anyway.
            format!("{channel}/{}-{seq}", self.run_id),
            format!("{}/{channel}", self.source),
        )
        .with_event_type("redis.pubsub.message")
        .with_subject(channel.clone())
        .with_time(SystemTime::now())
        .with_coordinate("channel", &channel);
        if self.ordering != Ordering::None {
            message = message.with_ordering_key(channel.clone().into_bytes());
        }
        message.add_header(headers::CHANNEL, &channel);
        if let Some(p) = &pattern {
            message.add_header(headers::PATTERN, p);
        }
        message
    }

    async fn failed(
        &self,
        operation: &'static str,
        error: &str,
        failures: &mut connector_sdk::backoff::Attempts,
    ) {
        self.metrics.error(operation);
        self.ctx.health.set_source_ready(false);
        let delay = failures.next_delay();
        tracing::warn!(operation, error, retry_in = ?delay, "Redis Pub/Sub connection failed; messages published meanwhile are lost");
        tokio::select! {
            () = self.ctx.shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(is_pattern("orders.*"));
        assert!(is_pattern("h?llo"));
        assert!(is_pattern("h[ae]llo"));
        assert!(!is_pattern("orders.eu"));
    }
}
