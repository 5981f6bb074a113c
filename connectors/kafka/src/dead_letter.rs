//! Dead letters to a Kafka topic: the original key, payload and record headers, plus the
//! SDK's provenance headers (`x-dead-letter-function`, `-reason`, `-status`, `-response`,
//! `-attempts`, `-first-failure`, `-last-failure`, `-topic`, `-id`, and
//! `x-dead-letter-source-topic`, `-partition`, `-offset`, `-timestamp`). `kafka-connector
//! replay` reads them back (see `replay`).
//!
//! The record's own key and raw headers travel with the message the dispatcher delivers,
//! as its extension `Arc<Record>` (attached when a dead-letter topic is configured).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use connector_sdk::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::record::Record;

/// Writes dead letters to one topic.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl KafkaDeadLetters {
    /// Dead letters go to `topic` through `producer`.
    pub fn new(producer: FutureProducer, topic: String, timeout: Duration) -> Self {
        Self {
            producer,
            topic,
            timeout,
        }
    }
}

/// The headers of a dead letter: the record's own (`record_headers`), then the
/// provenance.
pub fn dead_letter_headers(
    record_headers: &[(String, Option<Bytes>)],
    letter: &DeadLetter,
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(record_headers.len() + 16);
    for (k, v) in record_headers {
        headers = headers.insert(Header {
            key: k,
            value: v.as_deref(),
        });
    }
    for (k, v) in letter.provenance() {
        headers = headers.insert(Header {
            key: &k,
            value: Some(v.as_bytes()),
        });
    }
    headers
}

#[async_trait::async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let original = letter.message.extensions.get::<Arc<Record>>();
        let (key, record_headers) = match original {
            Some(r) => (r.key.as_deref(), r.headers.as_slice()),
            None => (None, &[][..]),
        };
        let headers = dead_letter_headers(record_headers, letter);
        let mut record = FutureRecord::to(&self.topic)
            .payload(letter.message.payload.as_ref())
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        match self.producer.send(record, self.timeout).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(DeadLetterError::new(format!(
                "writing to dead-letter topic {}: {e}",
                self.topic
            ))),
        }
    }
}
