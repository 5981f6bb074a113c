//! Dead letters on a NATS subject, published through JetStream so the write is
//! confirmed by the stream that captures the subject (a publish nobody stores fails, and
//! the message is then not acknowledged).
//!
//! The dead letter carries the original payload, the original headers (the forwarded NATS
//! headers and `X-Nats-*`), and the SDK's provenance headers (`x-dead-letter-function`,
//! `-reason`, `-status`, `-response`, `-attempts`, `-first-failure`, `-last-failure`,
//! `-topic`, `-id`, `-source-stream`, `-source-sequence`, ...).

use connector_sdk::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};

/// Publishes dead letters to `template` with `{subject}` replaced by the original subject.
pub struct NatsDeadLetters {
    context: async_nats::jetstream::Context,
    template: String,
}

impl NatsDeadLetters {
    /// Dead letters through `client` to `template`.
    pub fn new(client: async_nats::Client, template: String) -> Self {
        Self {
            context: async_nats::jetstream::new(client),
            template,
        }
    }
}

/// Header values are one line: newlines in an error text or a response excerpt become
/// spaces.
fn one_line(value: &str) -> String {
    value.replace(['\r', '\n'], " ")
}

/// The headers of `letter`: original ones, then provenance.
pub fn headers(letter: &DeadLetter) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in &letter.message.headers {
        if let Ok(value) = value.to_str() {
            headers.append(name.as_str(), one_line(value).as_str());
        }
    }
    for (name, value) in letter.provenance() {
        headers.insert(name.as_str(), one_line(&value).as_str());
    }
    headers
}

#[async_trait::async_trait]
impl DeadLetterSink for NatsDeadLetters {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let subject = self.template.replace("{subject}", &letter.message.topic);
        let ack = self
            .context
            .publish_with_headers(
                subject.clone(),
                headers(letter),
                letter.message.payload.clone(),
            )
            .await
            .map_err(|e| DeadLetterError::new(format!("publishing to {subject}: {e}")))?;
        ack.await
            .map_err(|e| DeadLetterError::new(format!("no stream stored {subject}: {e}")))?;
        Ok(())
    }
}
