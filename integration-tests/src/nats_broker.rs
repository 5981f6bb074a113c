//! NATS JetStream for end-to-end tests: a [`Fixture`] and [`ReplayFixture`] with one
//! stream per topic (`S_<topic>`) and a dead-letter stream `DL_<topic>` capturing
//! `dlq.<topic>`, consumed by a durable consumer named after a base (`replay-it` unless
//! [`JetStreamTopics::with_consumer`] says otherwise).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::{self, stream};

use crate::nats_url;
use crate::replay::ReplayFixture;
use crate::scenarios::Fixture;

/// JetStream on `NATS_URL`.
pub struct JetStreamTopics {
    js: jetstream::Context,
    /// The base of the connector's consumer names (`[jetstream] consumer`).
    consumer: String,
}

impl JetStreamTopics {
    /// Connected to `NATS_URL`, consumer base `replay-it`.
    pub async fn new() -> Self {
        Self {
            js: jetstream::new(async_nats::connect(nats_url()).await.unwrap()),
            consumer: "replay-it".to_owned(),
        }
    }

    /// With `consumer` as the base of the connector's consumer names.
    #[must_use]
    pub fn with_consumer(mut self, consumer: &str) -> Self {
        consumer.clone_into(&mut self.consumer);
        self
    }

    /// The JetStream context.
    pub fn js(&self) -> &jetstream::Context {
        &self.js
    }

    /// The stream of `topic`.
    pub fn stream_of(topic: &str) -> String {
        format!("S_{topic}")
    }

    /// The dead-letter stream of `topic`.
    pub fn dead_stream_of(topic: &str) -> String {
        format!("DL_{topic}")
    }

    /// Creates stream `name` (in memory, messages kept ten minutes) on `subjects`.
    pub async fn create_stream(&self, name: &str, subjects: Vec<String>) {
        self.js
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects,
                storage: stream::StorageType::Memory,
                max_age: Duration::from_secs(600),
                ..stream::Config::default()
            })
            .await
            .unwrap();
    }

    /// The payloads stored in `stream`, by sequence.
    pub async fn payloads(&self, stream: &str) -> Vec<Vec<u8>> {
        self.stored(stream)
            .await
            .into_iter()
            .map(|m| m.payload.to_vec())
            .collect()
    }

    /// The messages stored in `stream`, by sequence.
    pub async fn stored(&self, stream: &str) -> Vec<StreamMessage> {
        let mut s = self.js.get_stream(stream).await.unwrap();
        let state = s.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(m) = s.get_raw_message(seq).await {
                out.push(m);
            }
        }
        out
    }
}

#[async_trait::async_trait]
impl Fixture for JetStreamTopics {
    fn binary(&self) -> PathBuf {
        crate::binary("nats-connector", "nats-connector")
    }

    async fn create_topic(&self, topic: &str) {
        self.create_stream(&Self::stream_of(topic), vec![topic.to_owned()])
            .await;
        self.create_stream(&Self::dead_stream_of(topic), vec![format!("dlq.{topic}")])
            .await;
    }

    fn source_config(&self, topic: &str) -> String {
        format!(
            r#"[nats]
url = "{url}"
mode = "jetstream"

[jetstream]
stream = "{stream}"
consumer = "{consumer}"
dead_letter_subject = "dlq.{{subject}}"
ack_wait = "5s"
in_progress_interval = "1s"
backlog_interval = "200ms"
"#,
            url = nats_url(),
            stream = Self::stream_of(topic),
            consumer = self.consumer,
        )
    }

    /// No `dead_letter_subject`: a held message is nakked with the backoff delay for its
    /// delivery count (at most 200 ms with the scenarios' backoff).
    fn source_config_without_dead_letters(&self, topic: &str) -> String {
        format!(
            r#"[nats]
url = "{url}"
mode = "jetstream"

[jetstream]
stream = "{stream}"
consumer = "{consumer}"
ack_wait = "5s"
in_progress_interval = "1s"
backlog_interval = "200ms"
"#,
            url = nats_url(),
            stream = Self::stream_of(topic),
            consumer = self.consumer,
        )
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        for p in payloads {
            self.js
                .publish(topic.to_owned(), p.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.payloads(&Self::dead_stream_of(topic)).await
    }

    /// Pending plus ack-pending of the connector's consumer on `topic`; everything stored
    /// while it has none.
    async fn unacknowledged(&self, topic: &str) -> u64 {
        let stream = self.js.get_stream(Self::stream_of(topic)).await.unwrap();
        let name = nats_connector::jetstream::consumer_name(&self.consumer, topic);
        match stream.consumer_info(&name).await {
            Ok(info) => info.num_pending + info.num_ack_pending as u64,
            // No consumer yet: everything in the stream is unacknowledged.
            Err(_) => stream.cached_info().state.messages,
        }
    }
}

#[async_trait::async_trait]
impl ReplayFixture for JetStreamTopics {
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.dead_letters(topic).await
    }

    /// `ce-time` is the original's publication time; the dead letter does not keep it.
    fn headers_allowed_to_differ(&self) -> &[&str] {
        &["ce-time"]
    }
}
