//! Publishing with publisher confirms, shared by dead letters and replies: a message
//! counts as written only once the broker has confirmed it (`basic.ack` on a
//! confirm-select channel); a `basic.nack`, an error or no confirmation within
//! `command_timeout` is a failure.
//!
//! Each publisher has a connection of its own, opened on first use and again after a
//! failure: RabbitMQ blocks a publishing connection under memory pressure, and the
//! consumer's acks must not wait behind it. Publishes share its one channel and wait for
//! their confirmations concurrently.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use crate::config::RabbitConfig;

/// How a confirmed publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Routed to at least one queue, and confirmed.
    Confirmed,
    /// Confirmed, but no queue was bound for its routing key: the broker returned it
    /// (`mandatory`) and it is gone.
    Unroutable,
}

/// Why a publish is not known to be written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No channel: connecting or opening it failed.
    #[error("connecting: {0}")]
    Connect(#[source] crate::Error),
    /// The publish itself failed (the channel or connection closed).
    #[error("publishing: {0}")]
    Publish(#[source] lapin::Error),
    /// The broker did not confirm in time.
    #[error("no confirmation within {0:?}")]
    Timeout(Duration),
    /// The broker refused it (`basic.nack`).
    #[error("the broker refused it (basic.nack)")]
    Refused,
}

/// A connection and its confirm-mode channel, opened when first needed.
pub struct ConfirmedPublisher {
    config: RabbitConfig,
    /// Names the connection in the management UI.
    purpose: &'static str,
    /// The publishing connection and its channel, while they work.
    link: Mutex<Option<(Connection, Channel)>>,
}

impl ConfirmedPublisher {
    /// A publisher to the broker of `config`, its connection named after `purpose`.
    pub fn new(config: &RabbitConfig, purpose: &'static str) -> Self {
        Self {
            config: config.clone(),
            purpose,
            link: Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<Channel, crate::Error> {
        let mut link = self.link.lock().await;
        if let Some((connection, channel)) = link.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let connection = crate::connect(&self.config, self.purpose).await?;
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

    /// Publishes `payload` to `exchange` with `routing_key`, `mandatory`, and waits for
    /// the broker's confirmation, all of it within `command_timeout`.
    pub async fn publish(
        &self,
        exchange: ShortString,
        routing_key: ShortString,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<Published, PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let published = async {
            let channel = self.channel().await.map_err(PublishError::Connect)?;
            channel
                .basic_publish(exchange, routing_key, options, payload, properties)
                .await
                .map_err(PublishError::Publish)?
                .await
                .map_err(PublishError::Publish)
        };
        let timeout = self.config.command_timeout;
        let confirmation = match tokio::time::timeout(timeout, published).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.forget().await;
                return Err(e);
            }
            Err(_) => {
                // A channel that does not confirm is not trusted with the next one.
                self.forget().await;
                return Err(PublishError::Timeout(timeout));
            }
        };
        if !confirmation.is_ack() {
            return Err(PublishError::Refused);
        }
        Ok(match confirmation.take_message() {
            Some(_) => Published::Unroutable,
            None => Published::Confirmed,
        })
    }
}
