//! Dead letters to a Kafka topic: the original key, payload and record headers, plus the
//! SDK's provenance headers (`x-dead-letter-function`, `-reason`, `-status`, `-response`,
//! `-attempts`, `-first-failure`, `-last-failure`, `-topic`, `-id`, and
//! `x-dead-letter-source-topic`, `-partition`, `-offset`, `-timestamp`). `kafka-connector
//! replay` reads them back (see `replay`).
//!
//! The dispatcher only sees HTTP-shaped messages, so the record's own key and headers
//! are kept aside ([`Originals`]) from submit to completion, keyed by `ce-id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use connector_sdk::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::record::Record;

/// The key and headers of a record in flight.
#[derive(Debug, Clone, Default)]
pub struct Original {
    /// Record key.
    pub key: Option<Bytes>,
    /// Record headers.
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// Records in flight, by `ce-id`: bounded by what the dispatcher holds.
#[derive(Debug, Default)]
pub struct Originals {
    map: Mutex<HashMap<String, Original>>,
}

impl Originals {
    /// Keeps `record`'s key and headers until [`remove`](Self::remove).
    pub fn insert(&self, record: &Record) {
        self.lock().insert(
            record.id(),
            Original {
                key: record.key.clone(),
                headers: record.headers.clone(),
            },
        );
    }

    /// Forgets `id`.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    fn get(&self, id: &str) -> Option<Original> {
        self.lock().get(id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Original>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes dead letters to one topic.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
    originals: Arc<Originals>,
    timeout: Duration,
}

impl KafkaDeadLetters {
    /// Dead letters go to `topic` through `producer`.
    pub fn new(
        producer: FutureProducer,
        topic: String,
        originals: Arc<Originals>,
        timeout: Duration,
    ) -> Self {
        Self {
            producer,
            topic,
            originals,
            timeout,
        }
    }
}

/// The headers of a dead letter: the record's own, then the provenance.
pub fn dead_letter_headers(original: &Original, letter: &DeadLetter) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(original.headers.len() + 16);
    for (k, v) in &original.headers {
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
        let original = self.originals.get(&letter.message.id).unwrap_or_default();
        let headers = dead_letter_headers(&original, letter);
        let mut record = FutureRecord::to(&self.topic)
            .payload(letter.message.payload.as_ref())
            .headers(headers);
        if let Some(key) = original.key.as_deref() {
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
