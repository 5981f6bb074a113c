//! Dead letters: published to `dead_letter_exchange` with the original routing key, the
//! original body and content type, the headers the function received and the SDK's
//! provenance (`x-dead-letter-*`), persistent, `mandatory`, and confirmed by the broker
//! before the original is acknowledged. A letter the broker cannot route (no queue bound)
//! or does not confirm is an error: the dispatcher tries again and then holds the message.
//!
//! Published through a [`ConfirmedPublisher`] of its own (connection `dead-letters`).

use connector_sdk::{DeadLetter, DeadLetterError, DeadLetterSink};
use lapin::BasicProperties;
use lapin::types::ShortString;

use crate::config::RabbitConfig;
use crate::delivery;
use crate::publish::{ConfirmedPublisher, Published};

/// The dead-letter exchange as a [`DeadLetterSink`].
pub struct ExchangeDeadLetters {
    exchange: ShortString,
    publisher: ConfirmedPublisher,
}

impl ExchangeDeadLetters {
    /// A sink for `config.dead_letter_exchange` (validated to be a short string).
    pub fn new(config: &RabbitConfig) -> Result<Self, crate::Error> {
        let exchange = ShortString::try_new(config.dead_letter_exchange.clone())
            .map_err(|e| crate::Error::Setup(format!("dead_letter_exchange: {e}")))?;
        Ok(Self {
            exchange,
            publisher: ConfirmedPublisher::new(config, "dead-letters"),
        })
    }
}

/// The AMQP properties of a dead letter: the function's headers and the provenance.
pub fn properties(letter: &DeadLetter) -> BasicProperties {
    let message = &letter.message;
    let provenance = letter.provenance();
    let headers = message
        .headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
        .chain(provenance.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(delivery::table(headers));
    if let Some(ct) = message
        .content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| ShortString::try_new(v).ok())
    {
        properties = properties.with_content_type(ct);
    }
    properties
}

#[async_trait::async_trait]
impl DeadLetterSink for ExchangeDeadLetters {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        // The routing key came from the broker as a short string; the check only guards a
        // replayed letter's topic.
        let key =
            ShortString::try_new(letter.message.topic.clone()).map_err(DeadLetterError::new)?;
        let published = self
            .publisher
            .publish(
                self.exchange.clone(),
                key.clone(),
                &letter.message.payload,
                properties(letter),
            )
            .await
            .map_err(|e| DeadLetterError::new(format!("{}: {e}", self.exchange)))?;
        match published {
            Published::Confirmed => Ok(()),
            Published::Unroutable => Err(DeadLetterError::new(format!(
                "no queue is bound to {} for routing key {key}: the dead letter would be lost",
                self.exchange
            ))),
        }
    }
}
