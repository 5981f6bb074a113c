//! Connecting: the SQS client (standard AWS chain, or the configured endpoint and static
//! keys) and the queues, resolved and checked before anything is consumed.

use std::collections::HashMap;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, ProvideCredentials, Region};
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_smithy_http_client::tls;

use crate::SqsError;
use crate::config::{SqsConfig, is_fifo};

/// Builds the client. Credentials are checked here, so a connector without any fails at
/// start naming where it looked.
pub async fn client(config: &SqsConfig) -> Result<Client, SqsError> {
    // rustls with ring: the AWS SDK's default client would build aws-lc-sys.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = &config.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(url) = &config.endpoint_url {
        loader = loader.endpoint_url(url.clone());
    }
    let static_keys = match (&config.access_key_id, &config.secret_access_key) {
        (Some(id), Some(secret)) => {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.expose().to_owned(),
                None,
                None,
                "sqs.access_key_id",
            ));
            true
        }
        _ => false,
    };
    let mut shared = loader.load().await;
    if shared.region().is_none() {
        if config.endpoint_url.is_some() {
            shared = shared
                .into_builder()
                .region(Region::new("us-east-1"))
                .build();
        } else {
            return Err(SqsError::Region);
        }
    }
    let provider = shared
        .credentials_provider()
        .ok_or_else(|| SqsError::Credentials("no credential provider is configured".into()))?;
    if let Err(e) = provider.provide_credentials().await {
        let source = if static_keys {
            "sqs.access_key_id and sqs.secret_access_key"
        } else {
            "the standard chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE and \
             the shared credentials file, web identity, ECS, EC2 instance metadata)"
        };
        return Err(SqsError::Credentials(format!(
            "no usable AWS credentials from {source}: {}",
            causes(&e)
        )));
    }
    Ok(Client::new(&shared))
}

/// An SDK error in one line: SQS's code and message for a service error, else the chain
/// of causes (`dispatch failure: io error: Connection refused`).
pub fn describe<E, R>(e: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    if let SdkError::ServiceError(service) = e {
        let err = service.err();
        if let Some(code) = err.code() {
            return format!("{code}: {}", err.message().unwrap_or("(no message)"));
        }
    }
    causes(e)
}

/// An error and its sources, one after another.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        // Some errors repeat their source in their own message.
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// One queue, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Its name (the default topic).
    pub name: String,
    /// Its URL, for every request.
    pub url: String,
    /// Whether it is a FIFO queue.
    pub fifo: bool,
    /// Its redrive policy (JSON), when it has one.
    pub redrive_policy: Option<String>,
}

impl Queue {
    /// `maxReceiveCount` of its redrive policy, when it has one.
    pub fn max_receive_count(&self) -> Option<u32> {
        let policy: serde_json::Value =
            serde_json::from_str(self.redrive_policy.as_deref()?).ok()?;
        match &policy["maxReceiveCount"] {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
}

/// Finds `spec` (a name or URL) and reads its attributes: a missing queue, or credentials
/// that may not read it, fail here with the queue named.
pub async fn resolve(client: &Client, spec: &str) -> Result<Queue, SqsError> {
    let fail = |e: String| SqsError::Queue {
        queue: spec.to_owned(),
        error: e,
    };
    let url = if spec.starts_with("http://") || spec.starts_with("https://") {
        spec.to_owned()
    } else {
        client
            .get_queue_url()
            .queue_name(spec)
            .send()
            .await
            .map_err(|e| fail(describe(&e)))?
            .queue_url
            .ok_or_else(|| fail("GetQueueUrl returned no URL".into()))?
    };
    let attributes = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .map_err(|e| fail(describe(&e)))?
        .attributes
        .unwrap_or_default();
    let name = name_of(&url).to_owned();
    Ok(Queue {
        fifo: is_fifo(&name)
            || attributes
                .get(&QueueAttributeName::FifoQueue)
                .map(String::as_str)
                == Some("true"),
        redrive_policy: attributes.get(&QueueAttributeName::RedrivePolicy).cloned(),
        name,
        url,
    })
}

/// The last path segment of a queue URL: its name.
pub fn name_of(url: &str) -> &str {
    url.trim_end_matches('/').rsplit('/').next().unwrap_or(url)
}

/// The visible, in-flight and delayed counts of a queue, as KEDA's aws-sqs scaler reads
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Depth {
    /// ApproximateNumberOfMessages.
    pub visible: u64,
    /// ApproximateNumberOfMessagesNotVisible (received, not deleted).
    pub in_flight: u64,
    /// ApproximateNumberOfMessagesDelayed.
    pub delayed: u64,
}

/// Reads a queue's [`Depth`].
pub async fn depth(client: &Client, url: &str) -> Result<Depth, String> {
    let attributes: HashMap<QueueAttributeName, String> = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .map_err(|e| describe(&e))?
        .attributes
        .unwrap_or_default();
    let count = |name: QueueAttributeName| {
        attributes
            .get(&name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Depth {
        visible: count(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_urls() {
        assert_eq!(
            name_of("http://127.0.0.1:4566/000000000000/orders"),
            "orders"
        );
        assert_eq!(
            name_of("https://sqs.eu-west-1.amazonaws.com/1/orders.fifo/"),
            "orders.fifo"
        );
        assert_eq!(name_of("plain"), "plain");
    }

    #[test]
    fn max_receive_count_as_string_or_number() {
        let queue = |policy: Option<&str>| Queue {
            name: "q".into(),
            url: "http://127.0.0.1:4566/000000000000/q".into(),
            fifo: false,
            redrive_policy: policy.map(str::to_owned),
        };
        let arn = "arn:aws:sqs:us-east-1:000000000000:q-dlq";
        let text = format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"2"}}"#);
        assert_eq!(queue(Some(&text)).max_receive_count(), Some(2));
        let number = format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":5}}"#);
        assert_eq!(queue(Some(&number)).max_receive_count(), Some(5));
        assert_eq!(queue(Some("not json")).max_receive_count(), None);
        assert_eq!(queue(None).max_receive_count(), None);
    }
}
