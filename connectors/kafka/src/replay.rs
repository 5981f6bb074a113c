//! `kafka-connector replay`: the dead-letter topic read back and replayed through the
//! SDK's [`Replayer`].
//!
//! A topic cannot delete one record, so "removed" means the replay's own consumer group
//! (`<group>-replay` by default, `--group` to choose) has committed its offset past the
//! letter. Replay reads each partition of `dead_letter_topic` from that group's committed
//! offset (or the beginning) up to the end offset it had when the replay started, one
//! letter at a time, and commits after each:
//!
//! - delivered: commit past it;
//! - not delivered (failed again, or skipped by `--function`, or undecodable): the
//!   offset can only move forward, so the letter is first written again, unchanged, at
//!   the end of the dead-letter topic, and then the offset moves past the original. It
//!   stays a dead letter, and the next replay finds it again. (A crash between the two
//!   steps leaves it twice; its `ce-id` is the same, so functions can deduplicate.)
//!
//! The connector's own group never reads the dead-letter topic, and a dry run commits
//! nothing. The replayed message is the original record as the connector delivered it:
//! the payload, key and record headers the dead letter kept, its topic, partition and
//! offset from the provenance (so `ce-id`, `X-Kafka-*` and `ce-source` are as before).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use connector_sdk::replay::{
    DeadLetterStore, DecodeError, Provenance, ReplayArgs, ReplayLetter, Replayer, StoreError,
    StoredLetter, Summary,
};
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::offsets::TopicPartition;
use crate::record::Record;
use crate::{Config, Error, NAME};

/// Timeout of metadata, offset and watermark requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The replay group for `config` when `--group` is not given.
pub fn default_group(config: &Config) -> String {
    format!("{}-replay", config.kafka.group)
}

/// Replays the dead letters of `config`'s `dead_letter_topic` with consumer group
/// `group`, writing progress and the summary to `out`.
pub async fn run(
    config: &Config,
    args: ReplayArgs,
    group: &str,
    out: &mut (dyn Write + Send),
) -> Result<Summary, Error> {
    let store = open(config, group).await?;
    let replayer = Replayer::new(NAME, &config.connector, args)?;
    replayer.stop_on_signals()?;
    Ok(replayer.run(store, out).await?)
}

/// The dead-letter topic of `config`, read with the consumer group `group` from its
/// committed offsets (for `replay` and, with [`default_group`], the admin API).
pub async fn open(config: &Config, group: &str) -> Result<TopicStore, Error> {
    let Some(topic) = config.kafka.dead_letter_topic.clone() else {
        return Err(Error::ReplaySetup(
            "nothing to replay: no dead_letter_topic is configured".to_owned(),
        ));
    };
    let mut consumer_config = config.consumer_config();
    consumer_config
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("client.id", "kafka-connector-replay");
    // Static membership belongs to the connector's replicas, not to this one-off reader.
    consumer_config.remove("group.instance.id");
    let consumer: StreamConsumer =
        consumer_config
            .create()
            .map_err(|source| Error::CreateClient {
                client: "replay consumer",
                source,
            })?;
    let producer: FutureProducer =
        config
            .producer_config()
            .create()
            .map_err(|source| Error::CreateClient {
                client: "producer",
                source,
            })?;
    let consumer = Arc::new(consumer);
    let ranges = {
        let (consumer, topic) = (consumer.clone(), topic.clone());
        tokio::task::spawn_blocking(move || assign(&consumer, &topic))
            .await
            .map_err(|e| Error::ReplaySetup(e.to_string()))?
            .map_err(|e| Error::ReplaySetup(e.0))?
    };
    let store = TopicStore {
        consumer,
        producer,
        topic,
        ranges,
        connector_group: config.kafka.group.clone(),
        ordering: config.connector.ordering,
        produce_timeout: config.kafka.produce_timeout,
    };
    Ok(store)
}

/// Assigns every partition of `topic` that has letters past the group's committed offset,
/// from there; returns each partition's end (exclusive) at this moment.
fn assign(consumer: &StreamConsumer, topic: &str) -> Result<BTreeMap<i32, i64>, StoreError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| StoreError::new(format!("metadata of {topic}: {e}")))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(StoreError::new(format!(
            "dead-letter topic {topic} does not exist"
        )));
    }
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(wanted, REQUEST_TIMEOUT)
        .map_err(|e| StoreError::new(format!("committed offsets on {topic}: {e}")))?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, e.partition(), REQUEST_TIMEOUT)
            .map_err(|err| StoreError::new(format!("end offsets of {topic}: {err}")))?;
        let start = match e.offset() {
            Offset::Offset(o) if o >= low => o,
            _ => low,
        };
        if start < high {
            assignment
                .add_partition_offset(topic, e.partition(), Offset::Offset(start))
                .map_err(StoreError::new)?;
            ends.insert(e.partition(), high);
        }
    }
    if !ends.is_empty() {
        consumer.assign(&assignment).map_err(StoreError::new)?;
    }
    Ok(ends)
}

/// The dead-letter topic, partition by partition up to the ends seen at start.
pub struct TopicStore {
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    topic: String,
    /// Partitions with letters left, and their end offset (exclusive).
    ranges: BTreeMap<i32, i64>,
    connector_group: String,
    ordering: connector_sdk::config::Ordering,
    produce_timeout: Duration,
}

/// A letter as read: where it is, and what rewriting it needs.
pub struct Handle {
    partition: i32,
    offset: i64,
    key: Option<Bytes>,
    payload: Option<Bytes>,
    headers: Vec<(String, Option<Bytes>)>,
}

impl TopicStore {
    async fn commit_past(&self, partition: i32, offset: i64) -> Result<(), StoreError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset + 1))
            .map_err(StoreError::new)?;
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(StoreError::new)?
            .map_err(|e| StoreError::new(format!("committing the replay group's offset: {e}")))
    }

    fn done_with(&mut self, partition: i32) {
        self.ranges.remove(&partition);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        // Best effort: an unassigned partition only stops prefetching.
        if let Err(e) = self.consumer.incremental_unassign(&tpl) {
            tracing::debug!(error = %e, partition, "unassigning a finished partition");
        }
    }
}

#[async_trait::async_trait]
impl DeadLetterStore for TopicStore {
    type Handle = Handle;

    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<Handle>>, StoreError> {
        while !self.ranges.is_empty() {
            let message = match self.consumer.recv().await {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                    self.done_with(p);
                    continue;
                }
                Err(e) => return Err(StoreError::new(format!("reading {}: {e}", self.topic))),
            };
            let partition = message.partition();
            let Some(&end) = self.ranges.get(&partition) else {
                continue;
            };
            let offset = message.offset();
            if offset >= end {
                // Written after the replay started (perhaps by this replay): not now.
                self.done_with(partition);
                continue;
            }
            let handle = handle(&message);
            let letter = decode(&handle, &self.connector_group, self.ordering);
            if offset + 1 >= end {
                self.done_with(partition);
            }
            return Ok(vec![StoredLetter {
                location: format!("{}/{partition}@{offset}", self.topic),
                letter,
                handle,
            }]);
        }
        Ok(Vec::new())
    }

    async fn remove(&mut self, handle: Handle) -> Result<(), StoreError> {
        self.commit_past(handle.partition, handle.offset).await
    }

    async fn keep(&mut self, handle: Handle) -> Result<(), StoreError> {
        let mut headers = OwnedHeaders::new_with_capacity(handle.headers.len());
        for (key, value) in &handle.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = handle.key.as_deref() {
            record = record.key(key);
        }
        if let Some(payload) = handle.payload.as_deref() {
            record = record.payload(payload);
        }
        self.producer
            .send(record, self.produce_timeout)
            .await
            .map_err(|(e, _)| {
                StoreError::new(format!("writing the letter again to {}: {e}", self.topic))
            })?;
        self.commit_past(handle.partition, handle.offset).await
    }
}

fn handle(m: &BorrowedMessage<'_>) -> Handle {
    Handle {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(Bytes::copy_from_slice),
        payload: m.payload().map(Bytes::copy_from_slice),
        headers: m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The original record and function of a dead letter (the inverse of
/// `dead_letter::dead_letter_headers`).
fn decode(
    letter: &Handle,
    group: &str,
    ordering: connector_sdk::config::Ordering,
) -> Result<ReplayLetter, DecodeError> {
    let text: Vec<(String, String)> = letter
        .headers
        .iter()
        .map(|(k, v)| {
            let value = v
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            (k.clone(), value.into_owned())
        })
        .collect();
    let provenance = Provenance::parse(&text)?;
    let number = |name: &'static str| {
        provenance
            .coordinate(name)
            .ok_or(DecodeError::Missing(name))?
            .parse::<i64>()
            .map_err(|e| DecodeError::Malformed(format!("source {name}: {e}")))
    };
    let partition = i32::try_from(number("partition")?)
        .map_err(|e| DecodeError::Malformed(format!("source partition: {e}")))?;
    let record = Record {
        tp: TopicPartition::new(&provenance.topic, partition),
        offset: number("offset")?,
        key: letter.key.clone(),
        payload: letter.payload.clone().unwrap_or_default(),
        timestamp: provenance
            .coordinate("timestamp")
            .and_then(|t| t.parse().ok()),
        headers: letter
            .headers
            .iter()
            .filter(|(k, _)| !Provenance::is_provenance(k))
            .cloned()
            .collect(),
    };
    let message = record.to_message(group, ordering);
    if message.id != provenance.id {
        return Err(DecodeError::Malformed(format!(
            "the provenance's id {} does not match its coordinates ({})",
            provenance.id, message.id
        )));
    }
    Ok(ReplayLetter::new(message, provenance))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::SystemTime;

    use connector_sdk::FunctionRef;
    use connector_sdk::config::Ordering;
    use connector_sdk::dead_letter::{DeadLetter, DeadLetterReason};
    use rdkafka::message::Headers as _;

    use super::*;
    use crate::dead_letter::dead_letter_headers;

    /// What the dead-letter sink writes decodes back to the message the connector sent.
    #[test]
    fn decodes_what_the_sink_writes() {
        let record = Record {
            tp: TopicPartition::new("orders", 2),
            offset: 41,
            key: Some(Bytes::from_static(b"customer-7")),
            payload: Bytes::from_static(b"{\"n\":1}"),
            timestamp: Some(1_700_000_000_123),
            headers: vec![
                ("trace".into(), Some(Bytes::from_static(b"abc"))),
                ("empty".into(), None),
            ],
        };
        let original = record.to_message("g", Ordering::Partition);
        let letter = DeadLetter {
            message: Arc::new(original.clone()),
            function: FunctionRef::new("f", Some("ns")),
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: None,
            response_excerpt: Bytes::new(),
            attempts: 1,
            first_failure: SystemTime::UNIX_EPOCH,
            last_failure: SystemTime::UNIX_EPOCH,
        };
        let written = dead_letter_headers(&record.headers, &letter);
        let handle = Handle {
            partition: 0,
            offset: 7,
            key: record.key.clone(),
            payload: Some(record.payload.clone()),
            headers: written
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                .collect(),
        };
        let got = decode(&handle, "g", Ordering::Partition).unwrap();
        assert_eq!(got.function.as_str(), "f.ns");
        let m = got.message;
        assert_eq!(m.id, "orders/2/41");
        assert_eq!(m.topic, original.topic);
        assert_eq!(m.payload, original.payload);
        assert_eq!(m.source, original.source);
        assert_eq!(m.headers, original.headers);
        assert_eq!(m.time, original.time);
        assert_eq!(m.subject, original.subject);
        assert_eq!(m.ordering_key, original.ordering_key);
        assert_eq!(m.coordinates, original.coordinates);
    }
}
