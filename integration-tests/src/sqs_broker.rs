//! SQS (moto locally) for end-to-end tests: a [`Fixture`] and [`ReplayFixture`] with a
//! queue per topic and its dead-letter queue `<topic>-dlq`.

use std::path::PathBuf;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{Message, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_smithy_http_client::tls;

use crate::replay::ReplayFixture;
use crate::scenarios::Fixture;
use crate::sqs_endpoint;

/// Queues on `SQS_ENDPOINT`.
pub struct SqsQueues {
    client: Client,
}

impl Default for SqsQueues {
    fn default() -> Self {
        Self::new()
    }
}

impl SqsQueues {
    /// A client for `SQS_ENDPOINT` with moto's test credentials.
    pub fn new() -> Self {
        Self::at(&sqs_endpoint())
    }

    /// A client for the SQS at `endpoint` with moto's test credentials.
    pub fn at(endpoint: &str) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .http_client(http)
            .build();
        Self {
            client: Client::from_conf(config),
        }
    }

    /// The SQS client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates queue `name` (a FIFO queue if it ends in `.fifo`); returns its url.
    pub async fn create_queue(&self, name: &str) -> String {
        let mut request = self.client.create_queue().queue_name(name);
        if name.ends_with(".fifo") {
            request = request.attributes(QueueAttributeName::FifoQueue, "true");
        }
        request.send().await.unwrap().queue_url.unwrap()
    }

    /// SQS's approximate counts of `topic`'s queue: visible, and in flight (received, not
    /// yet deleted or visible again). Asks for `All` attributes: moto then computes the
    /// counts together, where for named attributes it computes each apart, and a
    /// message changing visibility in between is counted twice or not at all (asking
    /// for `All` narrows that window; under load the sum may still be off by a few).
    pub async fn depth(&self, topic: &str) -> (u64, u64) {
        let url = self.url(topic).await;
        let attributes = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap_or_default();
        let count = |name| {
            attributes
                .get(&name)
                .map_or(0, |v| v.parse::<u64>().unwrap())
        };
        (
            count(QueueAttributeName::ApproximateNumberOfMessages),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// The url of queue `name`.
    pub async fn url(&self, name: &str) -> String {
        self.client
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap()
    }

    /// `[sqs]` for `queue` on `SQS_ENDPOINT` with `extra` (TOML lines) at its end, a short
    /// visibility timeout so the kill tests see redelivery quickly.
    pub fn section(queue: &str, extra: &str) -> String {
        format!(
            r#"[sqs]
queues = ["{queue}"]
endpoint_url = "{endpoint}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
wait_time = "1s"
visibility_timeout = "4s"
metrics_interval = "1s"
{extra}
"#,
            endpoint = sqs_endpoint(),
        )
    }

    /// Up to ten messages of the queue at `url`, with their attributes, left visible
    /// (visibility 0 on receive).
    pub async fn peek(&self, url: &str) -> Vec<Message> {
        self.client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Fixture for SqsQueues {
    fn binary(&self) -> PathBuf {
        crate::binary("sqs-connector", "sqs-connector")
    }

    async fn create_topic(&self, topic: &str) {
        self.create_queue(topic).await;
        self.create_queue(&format!("{topic}-dlq")).await;
    }

    /// One poller: moto's ReceiveMessage is not safe against itself, and two running at
    /// once on a queue now and then hand both the same message (with its receive count
    /// raised twice), which the scenarios' exact counts would take for the connector's
    /// doing (CI: a batch holding one message twice). SQS itself does not; the
    /// connector's default of two pollers runs in the SQS tests of their own.
    fn source_config(&self, topic: &str) -> String {
        Self::section(
            topic,
            &format!("pollers = 1\ndead_letter_queue = \"{topic}-dlq\""),
        )
    }

    /// No `dead_letter_queue` (and the test queues have no redrive policy): a held
    /// message is made visible again after the backoff ceiling for its receive count,
    /// one second with the scenarios' backoff. One poller, as above.
    fn source_config_without_dead_letters(&self, topic: &str) -> String {
        Self::section(topic, "pollers = 1")
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        let url = self.url(topic).await;
        for (n, chunk) in payloads.chunks(10).enumerate() {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(format!("m{n}-{i}"))
                        .message_body(String::from_utf8(p.clone()).unwrap())
                        .build()
                        .unwrap()
                })
                .collect();
            let out = self
                .client
                .send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .unwrap();
            assert!(out.failed.is_empty(), "{:?}", out.failed);
        }
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        let url = self.url(&format!("{topic}-dlq")).await;
        self.peek(&url)
            .await
            .into_iter()
            .map(|m| m.body.unwrap_or_default().into_bytes())
            .collect()
    }

    async fn unacknowledged(&self, topic: &str) -> u64 {
        let (visible, in_flight) = self.depth(topic).await;
        visible + in_flight
    }
}

#[async_trait::async_trait]
impl ReplayFixture for SqsQueues {
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.dead_letters(topic).await
    }

    /// `ce-time` is the original's SentTimestamp; the dead letter does not keep it.
    fn headers_allowed_to_differ(&self) -> &[&str] {
        &["ce-time"]
    }
}
