//! LISTEN/NOTIFY as a [`Source`]: at most once.
//!
//! One connection LISTENs on every topic as a channel (the configured `topics`, else
//! every function's, followed without a restart). Each notification becomes a message:
//! topic = channel, body = payload, `ce-id` = `<channel>/<server pid>/<random>`,
//! `X-Postgres-Channel` and `X-Postgres-Pid` as headers. NOTIFY has no acknowledgement
//! and no history: a notification sent while the connector is down or reconnecting is
//! gone, and one whose delivery is held (failed for good, not dead-lettered) or released
//! by shutdown is dropped with a warning. Deliveries still get retries and dead letters.
//!
//! Notifications wait in a bounded queue; while it is full the connection is not read
//! and the server queues them (`pg_notification_queue_usage()`): backpressure, no
//! unbounded buffer.

use std::collections::BTreeSet;

use connector_sdk::follow::TopicChanges;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceContext, SourceError};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::config::PgConfig;
use crate::metrics::PgMetrics;
use crate::{classify, quote};

/// `X-Postgres-Channel`.
pub const CHANNEL_HEADER: &str = "X-Postgres-Channel";
/// `X-Postgres-Pid`.
pub const PID_HEADER: &str = "X-Postgres-Pid";

type Received = Result<Notification, tokio_postgres::Error>;

/// A listening connection.
struct Link {
    client: Client,
    rx: mpsc::Receiver<Received>,
}

/// LISTEN/NOTIFY as a [`Source`].
pub struct NotifySource {
    config: PgConfig,
    ctx: SourceContext,
    metrics: PgMetrics,
    source: String,
    link: Option<Link>,
    listening: BTreeSet<String>,
    changes: TopicChanges,
    held: u64,
}

impl NotifySource {
    /// A source for `config`; connects on the first `pull`.
    pub fn new(ctx: SourceContext, config: PgConfig, metrics: PgMetrics) -> Self {
        let changes = TopicChanges::new(&ctx);
        Self {
            source: crate::source_uri(&config),
            config,
            ctx,
            metrics,
            link: None,
            listening: BTreeSet::new(),
            changes,
            held: 0,
        }
    }

    /// Connects and LISTENs before the pump starts, so that readiness (which the pump
    /// turns on) follows a listening connection; a transient failure is left to `pull`.
    pub async fn connect(&mut self) -> Result<(), SourceError> {
        let listening = match self.open().await {
            Ok(link) => {
                self.link = Some(link);
                self.listen().await
            }
            Err(e) => Err(e),
        };
        match listening {
            Err(SourceError::Transient(e)) => {
                tracing::warn!(error = %e, "connecting to PostgreSQL failed; retrying with backoff");
                self.link = None;
                Ok(())
            }
            other => other,
        }
    }

    async fn open(&mut self) -> Result<Link, SourceError> {
        let (client, mut connection) = crate::connect_raw(&self.config).await.map_err(classify)?;
        let capacity = self.ctx.config.max_inflight.clamp(64, 4096);
        let (tx, rx) = mpsc::channel::<Received>(capacity);
        tokio::spawn(async move {
            loop {
                match futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(Ok(n)).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    None => return,
                }
            }
        });
        self.listening.clear();
        Ok(Link { client, rx })
    }

    /// LISTENs on the wanted channels not listened to yet; UNLISTENs the others.
    async fn listen(&mut self) -> Result<(), SourceError> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        let wanted: BTreeSet<String> = self.ctx.wanted_topics().into_iter().collect();
        let mut sql = String::new();
        for channel in wanted.difference(&self.listening) {
            sql.push_str(&format!("LISTEN {};", quote(channel)));
        }
        for channel in self.listening.difference(&wanted) {
            sql.push_str(&format!("UNLISTEN {};", quote(channel)));
        }
        if sql.is_empty() {
            self.changes.applied();
            return Ok(());
        }
        let run = link.client.batch_execute(&sql);
        match tokio::time::timeout(self.config.command_timeout, run).await {
            Ok(Ok(())) => {
                tracing::info!(channels = ?wanted, "listening");
                self.listening = wanted;
                self.changes.applied();
                Ok(())
            }
            Ok(Err(e)) => Err(classify(e.into())),
            Err(_) => Err(SourceError::transient("LISTEN not answered in time")),
        }
    }

    fn message(&self, n: &Notification) -> Message {
        let id = format!(
            "{}/{}/{}",
            n.channel(),
            n.process_id(),
            uuid::Uuid::new_v4().simple()
        );
        let mut message = Message::new(
            n.channel(),
            bytes::Bytes::copy_from_slice(n.payload().as_bytes()),
            id,
            self.source.as_str(),
        )
        .with_subject(n.channel())
        .with_time(std::time::SystemTime::now())
        .with_coordinate("channel", n.channel())
        .with_coordinate("pid", n.process_id());
        message.add_header(CHANNEL_HEADER, n.channel());
        message.add_header(PID_HEADER, &n.process_id().to_string());
        message
    }
}

#[async_trait::async_trait]
impl Source for NotifySource {
    type Ack = ();

    async fn pull(&mut self) -> Result<Vec<(Message, ())>, SourceError> {
        if self.link.is_none() {
            self.link = Some(self.open().await?);
        }
        if let Err(e) = self.listen().await {
            self.link = None;
            return Err(e);
        }
        loop {
            let Some(link) = self.link.as_mut() else {
                return Err(SourceError::transient("not connected"));
            };
            let next = tokio::select! {
                biased;
                () = self.changes.changed() => None,
                next = link.rx.recv() => Some(next),
            };
            let first = match next {
                None => {
                    if let Err(e) = self.listen().await {
                        self.link = None;
                        return Err(e);
                    }
                    continue;
                }
                Some(Some(Ok(n))) => n,
                Some(Some(Err(e))) => {
                    self.link = None;
                    return Err(classify(e.into()));
                }
                Some(None) => {
                    self.link = None;
                    return Err(SourceError::transient("the connection closed"));
                }
            };
            let mut received = vec![first];
            while let Some(Some(Ok(n))) = link.rx.recv().now_or_never() {
                received.push(n);
            }
            let batch: Vec<(Message, ())> =
                received.iter().map(|n| (self.message(n), ())).collect();
            self.held += batch.len() as u64;
            self.metrics.set_held("notify", self.held);
            return Ok(batch);
        }
    }

    async fn settle(
        &mut self,
        (): (),
        disposition: Disposition,
        outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        self.held = self.held.saturating_sub(1);
        self.metrics.set_held("notify", self.held);
        if disposition != Disposition::Ack {
            tracing::warn!(ce_id = %outcome.id, ?disposition, "a notification that was not delivered is dropped: NOTIFY cannot redeliver");
        }
        Ok(())
    }
}
