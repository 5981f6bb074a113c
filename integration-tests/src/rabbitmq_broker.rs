//! RabbitMQ for end-to-end tests: a queue per topic, bound to an exchange of the fixture's
//! own with the topic as binding key, dead letters to an exchange of its own kept in
//! `<queue>.dead-letter`, as a [`Fixture`] and [`ReplayFixture`].
//!
//! The fixture declares what the connector declares (same arguments), before the
//! connector starts, so nothing published first is unroutable. Unacknowledged counts come
//! from `rabbitmqctl list_queues` (ready plus unacknowledged): AMQP itself reports only
//! the ready ones.

use std::path::PathBuf;
use std::process::Command;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::rabbitmq_url;
use crate::replay::ReplayFixture;
use crate::scenarios::Fixture;

/// Queues named after their topics on `RABBITMQ_URL`.
pub struct RabbitQueues {
    url: String,
    exchange: String,
    dead_letter_exchange: String,
    queue_type: &'static str,
    /// Extra lines for the `[rabbitmq]` section.
    extra: String,
}

impl Default for RabbitQueues {
    fn default() -> Self {
        Self::new()
    }
}

impl RabbitQueues {
    /// Quorum queues, fresh exchanges.
    pub fn new() -> Self {
        Self {
            url: rabbitmq_url(),
            exchange: crate::unique("it-events"),
            dead_letter_exchange: crate::unique("it-dead"),
            queue_type: "quorum",
            extra: String::new(),
        }
    }

    /// Classic queues instead of quorum ones.
    #[must_use]
    pub fn classic(mut self) -> Self {
        self.queue_type = "classic";
        self
    }

    /// With `extra` (TOML lines) at the end of the `[rabbitmq]` section.
    #[must_use]
    pub fn with_extra_config(mut self, extra: &str) -> Self {
        extra.clone_into(&mut self.extra);
        self
    }

    /// The exchange topics are published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The dead-letter queue of `queue`.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead-letter")
    }

    /// A connection of the test's own.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .unwrap()
    }

    /// A channel in confirm mode on a new connection (dropped with it).
    pub async fn channel(&self) -> (Connection, Channel) {
        let connection = self.connect().await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        (connection, channel)
    }

    fn arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.queue_type.into()),
        );
        arguments
    }

    /// Declares `queue` with the connector's arguments, bound to the exchange with
    /// `binding`, and its dead-letter queue.
    pub async fn declare(&self, queue: &str, binding: &str) {
        let (_connection, channel) = self.channel().await;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for exchange in [&self.exchange, &self.dead_letter_exchange] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        let dead = Self::dead_letter_queue(queue);
        for (q, exchange, key) in [
            (queue, &self.exchange, binding),
            (dead.as_str(), &self.dead_letter_exchange, "#"),
        ] {
            channel
                .queue_declare(q.into(), QueueDeclareOptions::durable(), self.arguments())
                .await
                .unwrap();
            channel
                .queue_bind(
                    q.into(),
                    exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
    }

    /// Publishes `payloads` with `routing_key`, persistent and confirmed, in order, with
    /// `headers` on each.
    pub async fn publish(&self, routing_key: &str, payloads: &[Vec<u8>], headers: &FieldTable) {
        let (connection, channel) = self.channel().await;
        let mut confirms = Vec::new();
        for p in payloads {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers.clone());
            confirms.push(
                channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        routing_key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        p,
                        properties,
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            let c = confirm.await.unwrap();
            assert!(c.is_ack(), "not confirmed");
            assert!(c.take_message().is_none(), "unroutable: {routing_key}");
        }
        let _ = connection.close(200, "done".into()).await;
    }

    /// Publishes one message with `routing_key` and `properties`, confirmed.
    pub async fn publish_with(
        &self,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) {
        let (connection, channel) = self.channel().await;
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "not confirmed");
        assert!(
            confirm.take_message().is_none(),
            "unroutable: {routing_key}"
        );
        let _ = connection.close(200, "done".into()).await;
    }

    /// A classic, non-durable queue of the test's own for replies (a requester's queue),
    /// deleted again by [`Self::delete_queue`].
    pub async fn declare_reply_queue(&self, queue: &str) {
        let connection = self.connect().await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = connection.close(200, "declared".into()).await;
    }

    /// Deletes `queue`.
    pub async fn delete_queue(&self, queue: &str) {
        let connection = self.connect().await;
        let channel = connection.create_channel().await.unwrap();
        let _ = channel
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await;
        let _ = connection.close(200, "deleted".into()).await;
    }

    /// Every message of `queue`: properties and body, oldest first, left in the queue.
    pub async fn browse(&self, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        let connection = self.connect().await;
        let channel = connection.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = channel
            .basic_get(ShortString::from(queue), BasicGetOptions::default())
            .await
            .unwrap_or(None)
        {
            out.push((m.delivery.properties, m.delivery.data));
        }
        // Closing gives every message back, unchanged but for the redelivered flag.
        let _ = channel.close(200, "browsed".into()).await;
        let _ = connection.close(200, "browsed".into()).await;
        out
    }

    /// Ready plus unacknowledged messages of `queue`, as the broker counts them. A failed
    /// `rabbitmqctl` (slow to start under load) or a listing without the queue is asked
    /// again, a few times, rather than read as zero: zero means "all acknowledged".
    pub fn depth(queue: &str) -> u64 {
        let mut last = String::new();
        for _ in 0..10 {
            let out = Command::new("rabbitmqctl")
                .args([
                    "list_queues",
                    "-q",
                    "--no-table-headers",
                    "name",
                    "messages",
                ])
                .output()
                .expect("rabbitmqctl is installed with the broker");
            let count = out.status.success().then(|| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|line| {
                        let mut words = line.split_whitespace();
                        (words.next() == Some(queue))
                            .then(|| words.next().and_then(|n| n.parse().ok()))
                            .flatten()
                    })
                    .next()
            });
            if let Some(Some(count)) = count {
                return count;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("rabbitmqctl list_queues did not list {queue}: {last}");
    }
}

#[async_trait::async_trait]
impl Fixture for RabbitQueues {
    fn binary(&self) -> PathBuf {
        crate::binary("rabbitmq-connector", "rabbitmq-connector")
    }

    async fn create_topic(&self, topic: &str) {
        self.declare(topic, topic).await;
    }

    fn source_config(&self, topic: &str) -> String {
        format!(
            r#"[rabbitmq]
url = "{url}"
queue = "{topic}"
queue_type = "{queue_type}"
exchange = "{exchange}"
dead_letter_exchange = "{dead}"
metrics_interval = "200ms"
{extra}
"#,
            url = self.url,
            queue_type = self.queue_type,
            exchange = self.exchange,
            dead = self.dead_letter_exchange,
            extra = self.extra,
        )
    }

    /// No dead-letter exchange; a held message is requeued after one second.
    fn source_config_without_dead_letters(&self, topic: &str) -> String {
        format!(
            r#"[rabbitmq]
url = "{url}"
queue = "{topic}"
queue_type = "{queue_type}"
exchange = "{exchange}"
dead_letter_exchange = ""
hold_delay = "1s"
metrics_interval = "200ms"
{extra}
"#,
            url = self.url,
            queue_type = self.queue_type,
            exchange = self.exchange,
            extra = self.extra,
        )
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        self.publish(topic, payloads, &FieldTable::default()).await;
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.browse(&Self::dead_letter_queue(topic))
            .await
            .into_iter()
            .map(|(_, body)| body)
            .collect()
    }

    async fn unacknowledged(&self, topic: &str) -> u64 {
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || Self::depth(&topic))
            .await
            .unwrap()
    }
}

#[async_trait::async_trait]
impl ReplayFixture for RabbitQueues {
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.dead_letters(topic).await
    }

    /// The replayed letter was read from the dead-letter queue, so the broker's view of it
    /// differs; what the connector itself sends is the same.
    fn headers_allowed_to_differ(&self) -> &[&str] {
        &[]
    }
}
