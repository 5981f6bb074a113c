//! SQS (moto locally) for end-to-end tests: a [`Fixture`] and [`ReplayFixture`] with a
//! queue per topic and its dead-letter queue `<topic>-dlq`.

use std::path::PathBuf;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;
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
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(sqs_endpoint())
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .http_client(http)
            .build();
        Self {
            client: Client::from_conf(config),
        }
    }

    async fn url(&self, name: &str) -> String {
        self.client
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap()
    }

    /// The bodies of the messages visible in queue `name`, without hiding them.
    pub async fn peek(&self, name: &str) -> Vec<Vec<u8>> {
        let url = self.url(name).await;
        self.client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.body.unwrap_or_default().into_bytes())
            .collect()
    }
}

#[async_trait::async_trait]
impl Fixture for SqsQueues {
    fn binary(&self) -> PathBuf {
        crate::binary("sqs-connector", "sqs-connector")
    }

    async fn create_topic(&self, topic: &str) {
        for name in [topic.to_owned(), format!("{topic}-dlq")] {
            self.client
                .create_queue()
                .queue_name(name)
                .send()
                .await
                .unwrap();
        }
    }

    fn source_config(&self, topic: &str) -> String {
        format!(
            r#"[sqs]
queues = ["{topic}"]
endpoint_url = "{endpoint}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
wait_time = "1s"
visibility_timeout = "4s"
metrics_interval = "1s"
dead_letter_queue = "{topic}-dlq"
"#,
            endpoint = sqs_endpoint(),
        )
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        let url = self.url(topic).await;
        for p in payloads {
            self.client
                .send_message()
                .queue_url(&url)
                .message_body(String::from_utf8(p.clone()).unwrap())
                .send()
                .await
                .unwrap();
        }
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.peek(&format!("{topic}-dlq")).await
    }

    async fn unacknowledged(&self, topic: &str) -> u64 {
        let url = self.url(topic).await;
        let attributes = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap_or_default();
        attributes.values().map(|v| v.parse::<u64>().unwrap()).sum()
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
