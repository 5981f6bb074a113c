//! `rabbitmq-connector replay`: the dead letters in `dead_letter_queue` back to their
//! functions, through the SDK's [`Replayer`].
//!
//! The queue is read with `basic.get`, up to the number of messages it held when the
//! replay started, each kept unacknowledged while it is replayed: a delivered letter is
//! acknowledged (removed); one that fails again, is skipped or only listed (`--dry-run`)
//! stays unacknowledged until the end, so it is not read twice, and is then requeued.

use std::io::Write;

use bytes::Bytes;
use connector_sdk::replay::{
    DeadLetterStore, DecodeError, Provenance, ReplayArgs, ReplayLetter, Replayer, StoreError,
    StoredLetter, Summary,
};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection};

use crate::config::Config;
use crate::{Error, NAME, delivery};

/// Replays the dead letters of `config`, writing progress and the summary to `out`.
pub async fn run(
    config: &Config,
    args: ReplayArgs,
    out: &mut (dyn Write + Send),
) -> Result<Summary, Error> {
    let store = open(config).await?;
    let replayer = Replayer::new(NAME, &config.connector, args)?;
    replayer.stop_on_signals()?;
    Ok(replayer.run(store, out).await?)
}

/// The dead-letter queue of `config`, to read from the oldest letter (for `replay` and the
/// admin API).
pub async fn open(config: &Config) -> Result<QueueStore, Error> {
    let r = &config.rabbitmq;
    if r.dead_letter_exchange.is_empty() {
        return Err(Error::Setup(
            "nothing to replay: no rabbitmq.dead_letter_exchange is configured".to_owned(),
        ));
    }
    let name = r.dead_letter_queue();
    let queue = ShortString::try_new(name.clone())
        .map_err(|e| Error::Setup(format!("dead_letter_queue: {e}")))?;
    let connection = crate::connect(r, "replay").await?;
    let channel = connection.create_channel().await.map_err(Error::Connect)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let depth = channel
        .queue_declare(queue.clone(), passive, FieldTable::default())
        .await
        .map_err(|e| Error::Setup(format!("dead-letter queue {name}: {e}")))?;
    let store = QueueStore {
        connection,
        channel,
        queue,
        remaining: depth.message_count(),
        read: 0,
        kept: Vec::new(),
        source: crate::source_uri(r),
    };
    Ok(store)
}

/// The dead-letter queue, read once through.
pub struct QueueStore {
    connection: Connection,
    channel: Channel,
    queue: ShortString,
    /// Letters present at the start not read yet.
    remaining: u32,
    read: u64,
    /// Letters not delivered: requeued at the end.
    kept: Vec<Acker>,
    source: String,
}

#[async_trait::async_trait]
impl DeadLetterStore for QueueStore {
    type Handle = Acker;

    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<Acker>>, StoreError> {
        if self.remaining == 0 {
            return Ok(Vec::new());
        }
        let got = self
            .channel
            .basic_get(self.queue.clone(), BasicGetOptions::default())
            .await
            .map_err(|e| StoreError::new(format!("reading {}: {e}", self.queue)))?;
        let Some(got) = got else {
            return Ok(Vec::new());
        };
        self.remaining -= 1;
        self.read += 1;
        let d = got.delivery;
        Ok(vec![StoredLetter {
            location: format!("{}#{}", self.queue, self.read),
            letter: decode(&d.properties, d.data, &self.source),
            handle: d.acker,
        }])
    }

    async fn remove(&mut self, acker: Acker) -> Result<(), StoreError> {
        acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(StoreError::new)
    }

    async fn keep(&mut self, acker: Acker) -> Result<(), StoreError> {
        self.kept.push(acker);
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StoreError> {
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        for acker in self.kept.drain(..) {
            acker.nack(requeue).await.map_err(StoreError::new)?;
        }
        // Closing requeues whatever is still unacknowledged (letters a dry run listed).
        let _ = self.channel.close(200, "replay done".into()).await;
        let _ = self.connection.close(200, "replay done".into()).await;
        Ok(())
    }
}

/// The original message and function of a dead letter (the inverse of
/// `dead_letter::properties`).
pub fn decode(
    properties: &BasicProperties,
    body: Vec<u8>,
    source: &str,
) -> Result<ReplayLetter, DecodeError> {
    let pairs: Vec<(String, String)> = properties
        .headers()
        .as_ref()
        .map(|headers| {
            headers
                .inner()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), delivery::text(v)?)))
                .collect()
        })
        .unwrap_or_default();
    let provenance = Provenance::parse(&pairs)?;
    let topic = provenance.topic.clone();
    let mut message = provenance
        .message(Bytes::from(body), source)
        .with_subject(&topic)
        .with_ordering_key(Bytes::copy_from_slice(topic.as_bytes()));
    if let Some(ct) = properties.content_type() {
        message = message.with_content_type(ct.as_str());
    }
    for (name, value) in &pairs {
        // The broker's own (a quorum queue counts the letter's deliveries; its dead
        // lettering adds `x-death`) were not part of what the function received.
        let brokers = name.eq_ignore_ascii_case("x-delivery-count")
            || name.to_ascii_lowercase().starts_with("x-death")
            || name.to_ascii_lowercase().starts_with("x-first-death")
            || name.to_ascii_lowercase().starts_with("x-last-death");
        if !Provenance::is_provenance(name) && !brokers {
            message.add_header(name, value);
        }
    }
    Ok(ReplayLetter::new(message, provenance))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use connector_sdk::FunctionRef;
    use connector_sdk::dead_letter::{DeadLetter, DeadLetterReason};
    use lapin::types::AMQPValue;

    use super::*;
    use crate::delivery::{Envelope, message};

    /// What the dead-letter sink publishes decodes back to the message the connector sent.
    #[test]
    fn decodes_what_the_sink_writes() {
        let mut headers = FieldTable::default();
        headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
        let props = BasicProperties::default()
            .with_message_id("m-7".into())
            .with_content_type("application/json".into())
            .with_headers(headers);
        let envelope = Envelope {
            queue: "jobs",
            exchange: "amq.topic",
            routing_key: "orders.created",
            redelivered: false,
            quorum: true,
        };
        let original = message(&envelope, &props, b"{}".to_vec(), "amqp://h:5672/");
        let letter = DeadLetter {
            message: Arc::new(original.clone()),
            function: FunctionRef::new("f", None),
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: None,
            response_excerpt: Bytes::from_static(b"bad"),
            attempts: 1,
            first_failure: SystemTime::UNIX_EPOCH,
            last_failure: SystemTime::UNIX_EPOCH,
        };
        let stored = crate::dead_letter::properties(&letter);
        assert_eq!(stored.delivery_mode(), &Some(2));
        let got = decode(&stored, b"{}".to_vec(), "amqp://h:5672/").unwrap();
        assert_eq!(got.function.as_str(), "f");
        assert_eq!(got.provenance.status, Some(400));
        let m = got.message;
        assert_eq!(m.id, "jobs/m-7");
        assert_eq!(m.topic, original.topic);
        assert_eq!(m.payload, original.payload);
        assert_eq!(m.content_type, original.content_type);
        assert_eq!(m.subject, original.subject);
        assert_eq!(m.ordering_key, original.ordering_key);
        // An AMQP table is sorted by name: the coordinates come back in another order.
        let mut want = original.coordinates.clone();
        let mut have = m.coordinates.clone();
        want.sort();
        have.sort();
        assert_eq!(have, want);
        let sorted = |h: &http::HeaderMap| {
            let mut v: Vec<(String, Vec<u8>)> = h
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&m.headers), sorted(&original.headers));
    }

    #[test]
    fn a_letter_without_provenance_is_refused() {
        let e = decode(&BasicProperties::default(), Vec::new(), "s").unwrap_err();
        assert!(matches!(e, DecodeError::Missing(_)), "{e}");
    }
}
