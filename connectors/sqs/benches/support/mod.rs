//! What the sqs-connector load programs share: moto's endpoint, a client of it, a queue.

use aws_sdk_sqs::Client;
use connector_sdk::config::Secret;
use sqs_connector::config::SqsConfig;

/// `SQS_ENDPOINT`, default moto's server as scripts/test.sh starts it.
pub fn endpoint() -> String {
    std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// A client of [`endpoint`] with moto's test credentials.
pub async fn client() -> Client {
    sqs_connector::queue::client(&SqsConfig {
        endpoint_url: Some(endpoint()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some(Secret::new("test")),
        ..SqsConfig::default()
    })
    .await
    .unwrap()
}

/// Creates queue `name`; its URL.
pub async fn create_queue(sqs: &Client, name: &str) -> String {
    sqs.create_queue()
        .queue_name(name)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap()
}
