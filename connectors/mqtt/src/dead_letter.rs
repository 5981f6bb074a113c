//! Dead letters (MQTT 5): published to `dead_letter_topic` with QoS 1, not retained, the
//! original payload and content type, the headers the function received and the SDK's
//! provenance (`x-dead-letter-*`) as user properties; written once the broker's PUBACK
//! says it took the letter. A refusal, or no PUBACK within `connect_timeout`, is an
//! error: the dispatcher tries again and then holds the message.
//!
//! Publishing has a connection of its own (client id `<client_id>-dead-letters`, clean),
//! opened on first use and again after a failure, and polled only while a letter is
//! written. Before the first letter, the session `replay` reads
//! (`<client_id>-replay`, or `<share_group>-replay`) is created with its subscription to the dead-letter topic: a
//! broker keeps messages only for subscriptions that exist when they are published.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use connector_sdk::{DeadLetter, DeadLetterError, DeadLetterSink};
use tokio::sync::Mutex;

use crate::config::MqttConfig;
use crate::link::{self, Client, Event, Events, Session};

/// The dead-letter topic as a [`DeadLetterSink`].
pub struct TopicDeadLetters {
    config: MqttConfig,
    /// The publishing connection while it works; `None` until the replay session exists.
    link: Mutex<Option<(Client, Events)>>,
    /// Whether the replay session exists (made once per process).
    parked: AtomicBool,
}

/// Creates the persistent session `replay` reads, subscribed to the dead-letter topic.
pub async fn park_replay_session(config: &MqttConfig) -> Result<(), String> {
    let (client, mut events) = link::open(&Session {
        config,
        client_id: config.replay_client_id(),
        clean: false,
        manual_acks: true,
        receive_maximum: 1,
    })?;
    let within = config.connect_timeout;
    events
        .until(within, |e| {
            matches!(e, Event::Connected { .. }).then_some(Ok(()))
        })
        .await?;
    client
        .subscribe(std::slice::from_ref(&config.dead_letter_topic), 1, false)
        .await?;
    events
        .until(within, |e| match e {
            Event::Subscribed => Some(Ok(())),
            Event::Refused(why) => {
                Some(Err(format!("subscribing to the dead-letter topic: {why}")))
            }
            _ => None,
        })
        .await?;
    client.disconnect().await;
    let _ = events
        .until(within, |e| {
            matches!(e, Event::Disconnected).then_some(Ok(()))
        })
        .await;
    Ok(())
}

impl TopicDeadLetters {
    /// A sink for `config.dead_letter_topic`.
    pub fn new(config: &MqttConfig) -> Self {
        Self {
            config: config.clone(),
            link: Mutex::new(None),
            parked: AtomicBool::new(false),
        }
    }

    async fn open(&self) -> Result<(Client, Events), String> {
        if !self.parked.load(Ordering::SeqCst) {
            park_replay_session(&self.config).await?;
            self.parked.store(true, Ordering::SeqCst);
        }
        let (client, mut events) = link::open(&Session {
            config: &self.config,
            client_id: format!("{}-dead-letters", self.config.client_id),
            clean: true,
            manual_acks: false,
            receive_maximum: 16,
        })?;
        events
            .until(self.config.connect_timeout, |e| {
                matches!(e, Event::Connected { .. }).then_some(Ok(()))
            })
            .await?;
        Ok((client, events))
    }

    async fn publish(
        &self,
        (client, events): &mut (Client, Events),
        letter: &DeadLetter,
    ) -> Result<(), String> {
        let message = &letter.message;
        let properties = message
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .chain(letter.provenance())
            .collect();
        let content_type = message
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let payload: Bytes = message.payload.clone();
        client
            .publish(
                &self.config.dead_letter_topic,
                payload,
                properties,
                content_type,
            )
            .await?;
        let mut pkid = None;
        events
            .until(self.config.connect_timeout, |e| match e {
                Event::Published(id) if pkid.is_none() => {
                    pkid = Some(id);
                    None
                }
                Event::PubAck(id, result) if Some(id) == pkid => Some(result),
                _ => None,
            })
            .await
    }
}

#[async_trait::async_trait]
impl DeadLetterSink for TopicDeadLetters {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let mut link = self.link.lock().await;
        // An idle connection may have been closed by the broker: one more try on a new one.
        let mut last = String::new();
        for _ in 0..2 {
            let mut current = match link.take() {
                Some(l) => l,
                None => self.open().await.map_err(DeadLetterError::new)?,
            };
            match self.publish(&mut current, letter).await {
                Ok(()) => {
                    *link = Some(current);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(DeadLetterError::new(format!(
            "publishing to {}: {last}",
            self.config.dead_letter_topic
        )))
    }
}
