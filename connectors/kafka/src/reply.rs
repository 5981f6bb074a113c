//! Replies: each function's non-empty 2xx response body published to a reply topic, the
//! configured `reply_topic` or the function's `reply-topic` annotation.
//!
//! A reply record has the original key, the response body, and headers:
//! `x-reply-function`, `x-reply-to-id` (the request's `ce-id`), `x-reply-source-topic`,
//! `-partition`, `-offset`, `content-type` (the response's), and `x-connector-hops`, one
//! more than the request's. A reply to a record that already made `reply_max_hops` hops
//! is not published (counted as `hop_limit`), so a function subscribed to its own reply
//! topic cannot loop forever.

use std::time::Duration;

use connector_sdk::message::DeliveryOutcome;
use connector_sdk::{MessageOutcome, TopicMapHandle};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::metrics::KafkaMetrics;
use crate::record::{HOPS_HEADER, Record};

/// The annotation naming a function's reply topic.
pub const REPLY_TOPIC_ANNOTATION: &str = "reply-topic";

/// Publishes replies.
pub struct Replies {
    producer: FutureProducer,
    default_topic: Option<String>,
    max_hops: u32,
    topics: TopicMapHandle,
    timeout: Duration,
    metrics: KafkaMetrics,
}

impl Replies {
    /// Replies through `producer`.
    pub fn new(
        producer: FutureProducer,
        default_topic: Option<String>,
        max_hops: u32,
        topics: TopicMapHandle,
        timeout: Duration,
        metrics: KafkaMetrics,
    ) -> Self {
        Self {
            producer,
            default_topic,
            max_hops,
            topics,
            timeout,
            metrics,
        }
    }

    /// Publishes the replies of `record`'s deliveries; an error means one could not be
    /// written (the record must not be committed past).
    pub async fn publish(&self, record: &Record, outcome: &MessageOutcome) -> Result<(), String> {
        let map = self.topics.current();
        for delivery in &outcome.deliveries {
            if delivery.outcome != DeliveryOutcome::Delivered {
                continue;
            }
            let Some(response) = &delivery.response else {
                continue;
            };
            if response.body.is_empty() || !response.status.is_success() {
                continue;
            }
            let topic = map
                .subscribers()
                .iter()
                .find(|s| s.function == delivery.function)
                .and_then(|s| s.annotations.get(REPLY_TOPIC_ANNOTATION))
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .or_else(|| self.default_topic.clone());
            let Some(topic) = topic else {
                continue;
            };
            let hops = record.hops();
            if hops >= self.max_hops {
                self.metrics.reply("hop_limit");
                tracing::warn!(
                    function = %delivery.function,
                    ce_id = %record.id(),
                    hops,
                    "reply not published: hop limit reached"
                );
                continue;
            }
            let id = record.id();
            let function = delivery.function.to_string();
            let partition = record.tp.partition.to_string();
            let offset = record.offset.to_string();
            let next_hops = (hops + 1).to_string();
            let content_type = response
                .headers
                .get(http_content_type())
                .map(|v| v.as_bytes().to_vec());
            let mut headers = OwnedHeaders::new_with_capacity(8)
                .insert(h("x-reply-function", function.as_bytes()))
                .insert(h("x-reply-to-id", id.as_bytes()))
                .insert(h("x-reply-source-topic", record.tp.topic.as_bytes()))
                .insert(h("x-reply-source-partition", partition.as_bytes()))
                .insert(h("x-reply-source-offset", offset.as_bytes()))
                .insert(h(HOPS_HEADER, next_hops.as_bytes()));
            if let Some(ct) = &content_type {
                headers = headers.insert(h("content-type", ct));
            }
            let mut out = FutureRecord::to(&topic)
                .payload(response.body.as_ref())
                .headers(headers);
            if let Some(key) = record.key.as_deref() {
                out = out.key(key);
            }
            if let Err((e, _)) = self.producer.send(out, self.timeout).await {
                self.metrics.reply("failed");
                return Err(format!("publishing the reply to {topic}: {e}"));
            }
            self.metrics.reply("published");
        }
        Ok(())
    }
}

fn h<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

fn http_content_type() -> &'static str {
    "content-type"
}
