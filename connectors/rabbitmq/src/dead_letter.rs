//! Dead letters: published to `dead_letter_exchange` with the original routing key, the
//! original body and content type, the headers the function received and the SDK's
//! provenance (`x-dead-letter-*`), persistent, `mandatory`, and confirmed by the broker
//! before the original is acknowledged. A letter the broker cannot route (no queue bound)
//! or does not confirm is an error: the dispatcher tries again and then holds the message.
//!
//! Publishing has a connection of its own, opened on first use and again after a failure:
//! RabbitMQ blocks a publishing connection under memory pressure, and the consumer's acks
//! must not wait behind it.

use connector_sdk::{DeadLetter, DeadLetterError, DeadLetterSink};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use crate::config::RabbitConfig;
use crate::delivery;

/// The dead-letter exchange as a [`DeadLetterSink`].
pub struct ExchangeDeadLetters {
    config: RabbitConfig,
    exchange: ShortString,
    /// The publishing connection and its confirm-mode channel, while they work.
    link: Mutex<Option<(Connection, Channel)>>,
}

impl ExchangeDeadLetters {
    /// A sink for `config.dead_letter_exchange` (validated to be a short string).
    pub fn new(config: &RabbitConfig) -> Result<Self, crate::Error> {
        let exchange = ShortString::try_new(config.dead_letter_exchange.clone())
            .map_err(|e| crate::Error::Setup(format!("dead_letter_exchange: {e}")))?;
        Ok(Self {
            config: config.clone(),
            exchange,
            link: Mutex::new(None),
        })
    }

    async fn channel(&self) -> Result<Channel, crate::Error> {
        let mut link = self.link.lock().await;
        if let Some((connection, channel)) = link.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let connection = crate::connect(&self.config, "dead-letters").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(crate::Error::Connect)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(crate::Error::Connect)?;
        *link = Some((connection, channel.clone()));
        Ok(channel)
    }

    async fn forget(&self) {
        self.link.lock().await.take();
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
        let channel = self.channel().await.map_err(DeadLetterError::new)?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let published = async {
            channel
                .basic_publish(
                    self.exchange.clone(),
                    key.clone(),
                    options,
                    &letter.message.payload,
                    properties(letter),
                )
                .await?
                .await
        };
        let confirmation = match tokio::time::timeout(self.config.command_timeout, published).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.forget().await;
                return Err(DeadLetterError::new(format!(
                    "publishing to {}: {e}",
                    self.exchange
                )));
            }
            Err(_) => {
                self.forget().await;
                return Err(DeadLetterError::new(format!(
                    "{} did not confirm within {:?}",
                    self.exchange, self.config.command_timeout
                )));
            }
        };
        if !confirmation.is_ack() {
            return Err(DeadLetterError::new(format!(
                "{} refused the dead letter (basic.nack)",
                self.exchange
            )));
        }
        if confirmation.take_message().is_some() {
            return Err(DeadLetterError::new(format!(
                "no queue is bound to {} for routing key {key}: the dead letter would be lost",
                self.exchange
            )));
        }
        Ok(())
    }
}
