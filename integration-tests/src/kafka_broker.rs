//! Kafka (tansu locally) for end-to-end tests: a [`Fixture`] and [`ReplayFixture`] with
//! one partition per topic, its own group `<topic>-group` and dead-letter topic
//! `<topic>-dead`. Records are produced one per request: tansu 0.6 skips the rest of a
//! batch when a fetch starts in its middle.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Message};

use crate::replay::ReplayFixture;
use crate::scenarios::Fixture;
use crate::{kafka_brokers, unique};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A topic and its dead-letter topic on `KAFKA_BROKERS`.
pub struct KafkaTopics {
    brokers: String,
    producer: FutureProducer,
}

impl Default for KafkaTopics {
    fn default() -> Self {
        Self::new()
    }
}

impl KafkaTopics {
    /// On `KAFKA_BROKERS`.
    pub fn new() -> Self {
        let brokers = kafka_brokers();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("message.timeout.ms", "10000")
            .create()
            .unwrap();
        Self { brokers, producer }
    }

    /// The connector's group for `topic`.
    pub fn group_of(topic: &str) -> String {
        format!("{topic}-group")
    }

    /// The dead-letter topic of `topic`.
    pub fn dead_of(topic: &str) -> String {
        format!("{topic}-dead")
    }

    /// The payloads of `topic`'s single partition after `group`'s committed offset (from
    /// the beginning without a group, or when it committed nothing).
    pub async fn payloads_after(&self, topic: &str, group: Option<&str>) -> Vec<Vec<u8>> {
        let brokers = self.brokers.clone();
        let topic = topic.to_owned();
        let group = group.map(str::to_owned);
        tokio::task::spawn_blocking(move || read_after(&brokers, &topic, group.as_deref()))
            .await
            .unwrap()
    }
}

fn read_after(brokers: &str, topic: &str, group: Option<&str>) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            group.map_or_else(|| unique("reader"), str::to_owned),
        )
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let start = match group {
        Some(_) => match consumer.committed_offsets(tpl, TIMEOUT).unwrap().elements()[0].offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        },
        None => Offset::Beginning,
    };
    let (low, high) = consumer.fetch_watermarks(topic, 0, TIMEOUT).unwrap();
    if let Offset::Offset(o) = start
        && o.max(low) >= high
    {
        return Vec::new();
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, start).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut at_end = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while at_end.is_empty() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(m.payload().unwrap_or_default().to_vec()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    assert!(!at_end.is_empty(), "did not reach the end of {topic}");
    out
}

fn lag(brokers: &str, topic: &str, group: &str) -> u64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = consumer.committed_offsets(tpl, TIMEOUT).unwrap();
    let (low, high) = consumer.fetch_watermarks(topic, 0, TIMEOUT).unwrap();
    let from = match committed.elements()[0].offset() {
        Offset::Offset(o) => o,
        _ => low,
    };
    u64::try_from(high - from).unwrap_or(0)
}

#[async_trait::async_trait]
impl Fixture for KafkaTopics {
    fn binary(&self) -> PathBuf {
        crate::binary("kafka-connector", "kafka-connector")
    }

    async fn create_topic(&self, topic: &str) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let dead = Self::dead_of(topic);
        let new = [
            NewTopic::new(topic, 1, TopicReplication::Fixed(1)),
            NewTopic::new(&dead, 1, TopicReplication::Fixed(1)),
        ];
        for r in admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .unwrap()
        {
            if let Err((t, e)) = r {
                assert!(
                    e == rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                    "creating {t}: {e}"
                );
            }
        }
    }

    fn source_config(&self, topic: &str) -> String {
        format!(
            r#"[kafka]
brokers = "{brokers}"
group = "{group}"
dead_letter_topic = "{dead}"
commit_interval = "200ms"
lag_interval = "1s"
session_timeout = "10s"
rebalance_drain_timeout = "5s"
produce_timeout = "5s"
"#,
            brokers = self.brokers,
            group = Self::group_of(topic),
            dead = Self::dead_of(topic),
        )
    }

    /// [`source_config`](Fixture::source_config) without its `dead_letter_topic`.
    fn source_config_without_dead_letters(&self, topic: &str) -> String {
        self.source_config(topic)
            .lines()
            .filter(|l| !l.starts_with("dead_letter_topic"))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        for p in payloads {
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(p);
            self.producer
                .send(record, TIMEOUT)
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.payloads_after(&Self::dead_of(topic), None).await
    }

    async fn unacknowledged(&self, topic: &str) -> u64 {
        let brokers = self.brokers.clone();
        let (topic, group) = (topic.to_owned(), Self::group_of(topic));
        tokio::task::spawn_blocking(move || lag(&brokers, &topic, &group))
            .await
            .unwrap()
    }
}

#[async_trait::async_trait]
impl ReplayFixture for KafkaTopics {
    /// After the replay group's offset: `kafka-connector replay`'s default group is
    /// `<group>-replay`.
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        let group = format!("{}-replay", Self::group_of(topic));
        self.payloads_after(&Self::dead_of(topic), Some(&group))
            .await
    }
}
