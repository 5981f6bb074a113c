//! Core NATS: at-most-once, as in OpenFaaS's nats-connector, without its limits.
//!
//! One queue subscription per subject pattern (the configured `topics`, else the topic
//! map's, followed without a restart), all in the queue group `nats.queue_group`, so
//! replicas share the work and each message reaches one of them. Invocations run in
//! parallel up to `max_inflight` with the SDK's retries; but nothing is acknowledged to
//! the server, so a message whose delivery fails for good, or that arrives while no
//! replica is connected, is lost. Use JetStream mode for at-least-once.
//!
//! Request/reply: a message with a reply subject (sent with `nats request`) gets one
//! answer once its deliveries finish: the body of the first function's response (a
//! delivered one if any), with `X-Function-Status` (the HTTP status), `X-Function` and
//! the response's `Content-Type`. No function subscribed: status 404. No response (the
//! function could not be reached): 502 with the error. Shutdown cut it short: 503.

use std::sync::Arc;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use connector_sdk::trace::TraceContext;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceContext, SourceError};
use futures::StreamExt;
use tokio::sync::watch;

use crate::config::Config;
use crate::connect::Connection;
use crate::message;
use crate::subscriptions::{Event, Subscriptions, spawn_until, wanted};

pub use connector_sdk::message::{
    REPLY_FUNCTION_HEADER as FUNCTION_HEADER, REPLY_STATUS_HEADER as STATUS_HEADER,
};

/// Messages taken from the subscriptions per pull at most.
const PULL_BATCH: usize = 64;

/// What settling a core message needs: where to reply, if anywhere.
#[derive(Debug)]
pub struct CoreAck {
    subject: Subject,
    reply: Option<Subject>,
    /// The request's trace context, for its reply.
    trace: Option<TraceContext>,
}

/// Core subscriptions as a [`Source`].
pub struct CoreSource {
    connection: Connection,
    subscriptions: Subscriptions<async_nats::Message>,
    changes: Option<watch::Receiver<Arc<connector_sdk::TopicMap>>>,
    ctx: SourceContext,
    source: String,
    reply: bool,
    grouped: bool,
}

impl CoreSource {
    /// Subscribes to the wanted subjects.
    pub fn new(config: &Config, connection: Connection, ctx: SourceContext) -> Self {
        let client = connection.client.clone();
        let group = Some(config.nats.queue_group.clone()).filter(|g| !g.is_empty());
        let grouped = group.is_some();
        let capacity = config.connector.max_inflight.max(PULL_BATCH);
        let start: crate::subscriptions::Starter<async_nats::Message> =
            Box::new(move |pattern, tx, token| {
                let client = client.clone();
                let group = group.clone();
                spawn_until(token, forward(client, group, pattern, tx));
            });
        let mut subscriptions = Subscriptions::new(capacity, start);
        subscriptions.reconcile(&wanted(&ctx));
        let changes = ctx.topics_follow_map().then(|| ctx.topics.subscribe());
        Self {
            source: source_name(&config.nats.servers()),
            connection,
            subscriptions,
            changes,
            ctx,
            reply: config.nats.reply,
            grouped,
        }
    }

    fn accept(&self, event: Event<async_nats::Message>) -> Option<(Message, CoreAck)> {
        match event {
            Event::Message { pattern, item } => {
                // In a queue group the server hands a message to one member of the group
                // across all matching subscriptions (groups are by name, not subject), so
                // every copy that arrives is the only one. Without a group each
                // overlapping subscription gets a copy, and only the owner's is delivered.
                if !self.grouped && !self.subscriptions.owns(&pattern, item.subject.as_str()) {
                    return None;
                }
                let message = message::core(&item, &self.source);
                let trace = item
                    .reply
                    .as_ref()
                    .and_then(|_| TraceContext::for_reply(&message));
                Some((
                    message,
                    CoreAck {
                        subject: item.subject,
                        reply: item.reply,
                        trace,
                    },
                ))
            }
            Event::Failed { pattern, error } => {
                tracing::warn!(subject = %pattern, error = %error, "subscription failed");
                None
            }
            Event::Recovered { .. } => None,
        }
    }
}

/// `nats://host:port` of the first server, for `ce-source`.
pub fn source_name(servers: &[String]) -> String {
    let first = servers.first().map(String::as_str).unwrap_or("nats");
    match first.split_once("://") {
        Some((_, rest)) => format!("nats://{}", rest.rsplit('@').next().unwrap_or(rest)),
        None => format!("nats://{first}"),
    }
}

async fn forward(
    client: async_nats::Client,
    group: Option<String>,
    pattern: Arc<str>,
    tx: tokio::sync::mpsc::Sender<Event<async_nats::Message>>,
) {
    let subscribed = match &group {
        Some(group) => {
            client
                .queue_subscribe(pattern.to_string(), group.clone())
                .await
        }
        None => client.subscribe(pattern.to_string()).await,
    };
    let mut subscriber = match subscribed {
        Ok(s) => s,
        Err(e) => {
            let _ = tx
                .send(Event::Failed {
                    pattern,
                    error: e.to_string(),
                })
                .await;
            return;
        }
    };
    while let Some(item) = subscriber.next().await {
        let event = Event::Message {
            pattern: pattern.clone(),
            item,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

#[async_trait::async_trait]
impl Source for CoreSource {
    type Ack = CoreAck;

    async fn pull(&mut self) -> Result<Vec<(Message, CoreAck)>, SourceError> {
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
                return Err(SourceError::fatal("subscriptions closed"));
            };
            let mut batch: Vec<(Message, CoreAck)> = self.accept(event).into_iter().collect();
            while batch.len() < PULL_BATCH {
                let Some(event) = self.subscriptions.try_next() else {
                    break;
                };
                batch.extend(self.accept(event));
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }

    async fn settle(
        &mut self,
        ack: CoreAck,
        disposition: Disposition,
        outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        if disposition != Disposition::Ack {
            tracing::warn!(subject = %ack.subject, ce_id = %outcome.id, ?disposition, "core NATS cannot redeliver: message lost (use JetStream mode for at-least-once)");
        }
        let Some(reply) = ack.reply.filter(|_| self.reply) else {
            return Ok(());
        };
        let (headers, body) = reply_for(&ack.subject, outcome, ack.trace.as_ref());
        self.connection
            .client
            .publish_with_headers(reply, headers, body)
            .await
            .map_err(SourceError::transient)
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        self.subscriptions.clear();
        self.connection
            .client
            .flush()
            .await
            .map_err(SourceError::transient)
    }
}

/// The reply to a request on `subject` whose deliveries ended as `outcome`, as NATS
/// headers (with the request's trace context, when it had one) and a body.
pub fn reply_for(
    subject: &str,
    outcome: &MessageOutcome,
    trace: Option<&TraceContext>,
) -> (HeaderMap, Bytes) {
    let reply = outcome.reply(subject);
    let mut headers = HeaderMap::new();
    for (name, value) in trace.iter().flat_map(|t| t.pairs()) {
        if let Ok(value) = value.to_str() {
            headers.insert(name, value);
        }
    }
    headers.insert(STATUS_HEADER, reply.status.as_str());
    if let Some(function) = reply.function {
        headers.insert(FUNCTION_HEADER, function.as_str());
    }
    if let Some(ct) = reply.content_type {
        headers.insert("Content-Type", ct);
    }
    (headers, reply.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_name_hides_credentials() {
        assert_eq!(
            source_name(&["nats://user:pw@host:4222".into()]),
            "nats://host:4222"
        );
        assert_eq!(source_name(&["host:4222".into()]), "nats://host:4222");
    }

    #[test]
    fn a_request_nobody_subscribes_to_gets_404() {
        let outcome = MessageOutcome {
            held_unmatched: false,
            id: "x".into(),
            deliveries: Vec::new(),
            interrupted: false,
        };
        let (headers, body) = reply_for("a.b", &outcome, None);
        assert_eq!(headers.get(STATUS_HEADER).map(|v| v.as_str()), Some("404"));
        assert_eq!(&body[..], b"no function subscribes to a.b");
    }
}
