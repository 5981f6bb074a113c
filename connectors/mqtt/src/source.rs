//! The subscription as a [`Source`]: connect, subscribe, receive, acknowledge.
//!
//! The event loop runs on a task of its own ([`Driver`]): it must be polled all the time
//! for keep-alives and acknowledgements to go out, while the pump waits for room in the
//! dispatcher. Messages reach the pump through a channel of `2 × max_inflight` places;
//! with QoS 1 the broker sends at most that many unacknowledged messages (MQTT 5 receive
//! maximum; a 3.1.1 broker has its own window, Mosquitto's `max_inflight_messages`).
//!
//! Acknowledgements are manual. A message is settled once all its deliveries are
//! terminal:
//!
//! | disposition | MQTT |
//! | --- | --- |
//! | ack: delivered, dead-lettered, dropped, or no function | PUBACK (QoS 1) |
//! | release (shutdown), hold (failed for good, no dead letter) | no PUBACK |
//!
//! MQTT has no negative acknowledgement: a message without PUBACK is sent again by the
//! broker when the session resumes (a reconnect or a restart with the same client id and
//! `clean_session = false`), with its packet id, to this process. So SIGKILL loses nothing
//! that was not acknowledged. A held message waits for that reconnect, taking one place
//! of the broker's window meanwhile. A PUBACK goes only on the connection its message came
//! on (see [`Driver`]): after a reconnect the broker redelivers the rest itself.
//!
//! Subscriptions follow the topic map (without `topics` configured): a filter that
//! appears is subscribed, one that disappears unsubscribed. A session the broker did not
//! resume is subscribed afresh. Messages on the dead-letter topic, and retained messages
//! when `retained` is off, are acknowledged and skipped.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use connector_sdk::follow::TopicChanges;
use connector_sdk::topic_pattern::Wildcards;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceContext, SourceError};

use crate::config::MqttConfig;
use crate::driver::{Driver, Signal};
use crate::link::{self, Client, Publish, Session};
use crate::metrics::MqttMetrics;

/// What settling one message needs.
#[derive(Debug, Clone, Copy)]
pub struct Handle {
    epoch: u64,
    pkid: u16,
    qos: u8,
}

/// The subscription as a [`Source`].
pub struct MqttSource {
    config: MqttConfig,
    ctx: SourceContext,
    client: Client,
    driver: Option<Driver>,
    /// Function topics (filters, without the `$share` prefix) subscribed.
    subscribed: BTreeSet<String>,
    changes: TopicChanges,
    /// PUBACKs the event loop had no room for yet, sent before the next ones.
    unsent: VecDeque<Handle>,
    /// A signal taken while batching, handled on the next pull.
    stashed: Option<Signal>,
    metrics: MqttMetrics,
    source: String,
}

impl MqttSource {
    /// Opens the connection and waits (up to `connect_timeout`) until it is subscribed, so
    /// readiness follows a live subscription. A broker that does not answer is left to
    /// `pull`, which reports it and is retried; a refusal of our credentials is fatal.
    pub async fn start(
        ctx: SourceContext,
        config: MqttConfig,
        metrics: MqttMetrics,
    ) -> Result<Self, SourceError> {
        // What the dispatcher holds (twice the deliveries in flight, and what the
        // functions' batches hold): PUBACKs take a moment to reach the broker, and the
        // window they still hold would otherwise leave the dispatcher short of messages.
        let window = u16::try_from(ctx.dispatcher.message_window().max(1)).unwrap_or(u16::MAX);
        let (client, events) = link::open(&Session {
            config: &config,
            client_id: config.client_id.clone(),
            clean: config.clean_session,
            manual_acks: true,
            receive_maximum: window,
        })
        .map_err(SourceError::fatal)?;
        let changes = TopicChanges::new(&ctx);
        let mut source = Self {
            source: crate::source_uri(&config),
            config,
            client,
            driver: Some(Driver::spawn(events, usize::from(window), {
                let metrics = metrics.clone();
                Box::new(move || metrics.held(-1))
            })),
            unsent: VecDeque::new(),
            subscribed: BTreeSet::new(),
            changes,
            stashed: None,
            metrics,
            ctx,
        };
        let within = source.config.connect_timeout;
        let ready = tokio::time::timeout(within, async {
            let mut subscribing = false;
            while let Some(signal) = source.next_signal().await {
                match signal {
                    Signal::Connected { session_present } => {
                        source.connected(session_present).await?;
                        subscribing = !source.subscribed.is_empty();
                        if !subscribing {
                            return Ok(());
                        }
                    }
                    Signal::Subscribed if subscribing => return Ok(()),
                    Signal::Lost(e) if e.fatal => return Err(SourceError::fatal(e)),
                    other => {
                        source.stashed = Some(other);
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        match ready.await {
            Ok(result) => result?,
            Err(_) => {
                tracing::warn!(broker = %source.source, "not connected yet; retrying with backoff")
            }
        }
        Ok(source)
    }

    async fn next_signal(&mut self) -> Option<Signal> {
        if let Some(s) = self.stashed.take() {
            return Some(s);
        }
        self.driver.as_mut()?.rx.recv().await
    }

    async fn connected(&mut self, session_present: bool) -> Result<(), SourceError> {
        self.metrics.connected(true);
        tracing::info!(broker = %self.source, session_present, "connected");
        if !session_present {
            self.subscribed.clear();
        }
        // Due until made: a pull dropped while subscribing subscribes on the next one.
        self.changes.reapply();
        self.follow().await
    }

    /// Subscribes to the wanted filters not subscribed yet; unsubscribes those no longer
    /// wanted. A filter covered by another (`a/+` by `a/#`) is not subscribed: Mosquitto
    /// sends an MQTT 5 session one copy per matching subscription.
    async fn follow(&mut self) -> Result<(), SourceError> {
        let all: BTreeSet<String> = self.ctx.wanted_topics().into_iter().collect();
        let wanted: BTreeSet<String> = all
            .iter()
            .filter(|f| !all.iter().any(|w| w != *f && Wildcards::MQTT.covers(w, f)))
            .cloned()
            .collect();
        let new: Vec<String> = wanted.difference(&self.subscribed).cloned().collect();
        let filters: Vec<String> = new.iter().map(|t| self.config.subscription(t)).collect();
        self.client
            .subscribe(&filters, self.config.qos, self.config.retained)
            .await
            .map_err(SourceError::transient)?;
        for f in &filters {
            tracing::info!(filter = %f, qos = self.config.qos, "subscribing");
        }
        for gone in self.subscribed.difference(&wanted) {
            let filter = self.config.subscription(gone);
            self.client
                .unsubscribe(&filter)
                .await
                .map_err(SourceError::transient)?;
            tracing::info!(filter = %filter, "unsubscribed");
        }
        self.subscribed = wanted;
        self.changes.applied();
        Ok(())
    }

    /// Adds `p` to `batch`, unless it is to be skipped (acknowledged at once).
    fn take(&mut self, p: Publish, epoch: u64, batch: &mut Vec<(Message, Handle)>) {
        let handle = Handle {
            epoch,
            pkid: p.pkid,
            qos: p.qos,
        };
        // Held until its PUBACK is written (or, QoS 0, settled).
        self.metrics.held(1);
        let dead_letter =
            !self.config.dead_letter_topic.is_empty() && p.topic == self.config.dead_letter_topic;
        if dead_letter || (p.retain && !self.config.retained) {
            tracing::debug!(topic = %p.topic, retain = p.retain, "skipped");
            self.ack(handle);
            return;
        }
        batch.push((crate::message::message(&p, &self.source), handle));
    }

    /// Queues `h`'s PUBACK (QoS 1) after those still unsent. The message stays held
    /// until the event loop writes the PUBACK.
    fn ack(&mut self, h: Handle) {
        if h.qos == 1 {
            self.unsent.push_back(h);
            self.send_acks();
        } else {
            self.metrics.held(-1);
        }
    }

    /// Hands the unsent PUBACKs to the event loop, in order, while it has room; drops
    /// those of a connection that is gone (the broker sends their messages again).
    fn send_acks(&mut self) {
        let Some(driver) = &self.driver else { return };
        while let Some(h) = self.unsent.front() {
            if !driver.current(h.epoch) {
                // Its connection is gone: the broker sends the message again.
                self.metrics.held(-1);
            } else if !self.client.try_ack(h.pkid) {
                return;
            }
            self.unsent.pop_front();
        }
    }
}

#[async_trait::async_trait]
impl Source for MqttSource {
    type Ack = Handle;

    async fn pull(&mut self) -> Result<Vec<(Message, Handle)>, SourceError> {
        loop {
            let signal = match self.stashed.take() {
                Some(s) => s,
                None => {
                    let Some(driver) = self.driver.as_mut() else {
                        return Err(SourceError::fatal("the MQTT connection is closed"));
                    };
                    let retry = !self.unsent.is_empty();
                    tokio::select! {
                        biased;
                        () = tokio::time::sleep(Duration::from_millis(2)), if retry => {
                            self.send_acks();
                            continue;
                        }
                        () = self.changes.changed() => {
                            self.follow().await?;
                            continue;
                        }
                        s = driver.rx.recv() => s.ok_or_else(|| SourceError::fatal("the broker refused the connection"))?,
                    }
                }
            };
            match signal {
                Signal::Connected { session_present } => {
                    self.connected(session_present).await?;
                    // An empty batch tells the pump the source recovered (readiness).
                    return Ok(Vec::new());
                }
                Signal::Subscribed => {}
                Signal::Refused(why) => {
                    tracing::error!(reason = %why, "the broker refused a subscription");
                }
                Signal::Lost(e) => {
                    self.metrics.connected(false);
                    return Err(if e.fatal {
                        SourceError::fatal(e)
                    } else {
                        SourceError::transient(e)
                    });
                }
                Signal::Publish(p, epoch) => {
                    let mut batch = Vec::new();
                    self.take(p, epoch, &mut batch);
                    // Take what has already arrived, without waiting.
                    while let Some(Ok(s)) = self.driver.as_mut().map(|d| d.rx.try_recv()) {
                        match s {
                            Signal::Publish(p, epoch) => self.take(p, epoch, &mut batch),
                            other => {
                                self.stashed = Some(other);
                                break;
                            }
                        }
                    }
                    if !batch.is_empty() {
                        return Ok(batch);
                    }
                }
            }
        }
    }

    async fn settle(
        &mut self,
        handle: Handle,
        disposition: Disposition,
        _outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        match disposition {
            Disposition::Ack => self.ack(handle),
            // No negative acknowledgement in MQTT: the broker sends it again when the
            // session resumes.
            Disposition::Hold | Disposition::Release | Disposition::Retry { .. } => {
                self.metrics.held(-1);
                tracing::debug!(
                    pkid = handle.pkid,
                    disposition = disposition.as_str(),
                    "left unacknowledged"
                );
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.unsent.is_empty() && tokio::time::Instant::now() < deadline {
            self.send_acks();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // DISCONNECT follows the acknowledgements queued before it; the session stays.
        self.client.disconnect().await;
        if let Some(driver) = self.driver.take() {
            driver.finish(Duration::from_secs(2)).await;
        }
        self.metrics.connected(false);
        Ok(())
    }
}
