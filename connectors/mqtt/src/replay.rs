//! `mqtt-connector replay`: the dead letters back to their functions, through the SDK's
//! [`Replayer`].
//!
//! The letters are read from the persistent session `<client_id>-replay` (or
//! `<share_group>-replay`: one for all the replicas of a group), which the
//! connector subscribes to `dead_letter_topic` before its first dead letter. A delivered
//! letter is acknowledged (PUBACK: the broker forgets it); one that fails again, is
//! skipped or only listed (`--dry-run`) is left unacknowledged and the broker sends it
//! again at the next replay.
//!
//! What MQTT cannot do: a client cannot ask how many letters wait, so the replay ends once
//! none arrived for `replay_idle`; the broker sends at most its in-flight window of
//! unacknowledged letters (Mosquitto: `max_inflight_messages`, 20 by default), so a run
//! stops early once that many were kept; letters published before the replay session
//! existed (before the connector's first dead letter with this `client_id`), or beyond
//! the broker's queue limit for a session (Mosquitto: `max_queued_messages`, 1000), are
//! not kept for it; a consumer of its own on the topic sees them as they are published.

use std::io::Write;

use connector_sdk::replay::{
    DeadLetterStore, DecodeError, Provenance, ReplayArgs, ReplayLetter, Replayer, StoreError,
    StoredLetter, Summary,
};
use tokio::time::Duration;

use crate::config::Config;
use crate::driver::{Driver, Signal};
use crate::link::{self, Client, Event, Publish, Session};
use crate::{Error, NAME};

/// Replays the dead letters of `config`, writing progress and the summary to `out`.
pub async fn run(
    config: &Config,
    args: ReplayArgs,
    out: &mut (dyn Write + Send),
) -> Result<Summary, Error> {
    let store = open(config).await?;
    let replayer = Replayer::new(NAME, &config.connector, args)?;
    replayer.stop_on_signals()?;
    Ok(replayer.run(store, out).await?)
}

/// The dead-letter topic of `config`, read through the replay's persistent session (for
/// `replay` and the admin API).
pub async fn open(config: &Config) -> Result<TopicStore, Error> {
    let m = &config.mqtt;
    if m.dead_letter_topic.is_empty() {
        return Err(Error::Setup(
            "nothing to replay: no mqtt.dead_letter_topic is configured".to_owned(),
        ));
    }
    let window = 64;
    let (client, mut events) = link::open(&Session {
        config: m,
        client_id: m.replay_client_id(),
        clean: false,
        manual_acks: true,
        receive_maximum: window,
    })
    .map_err(Error::Setup)?;
    events
        .until(m.connect_timeout, |e| {
            matches!(e, Event::Connected { .. }).then_some(Ok(()))
        })
        .await
        .map_err(|e| Error::Setup(format!("{}: {e}", m.broker)))?;
    let driver = Driver::spawn(events, usize::from(window), Box::new(|| {}));
    // Again, harmlessly, in case the session expired since the connector made it.
    client
        .subscribe(std::slice::from_ref(&m.dead_letter_topic), 1, false)
        .await
        .map_err(Error::Setup)?;
    let store = TopicStore {
        client,
        driver: Some(driver),
        idle: m.replay_idle,
        source: crate::source_uri(m),
    };
    Ok(store)
}

/// The replay session, read until it is idle.
pub struct TopicStore {
    client: Client,
    driver: Option<Driver>,
    idle: Duration,
    source: String,
}

#[async_trait::async_trait]
impl DeadLetterStore for TopicStore {
    type Handle = (u64, u16);

    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<(u64, u16)>>, StoreError> {
        let Some(driver) = self.driver.as_mut() else {
            return Ok(Vec::new());
        };
        loop {
            match tokio::time::timeout(self.idle, driver.rx.recv()).await {
                Err(_) | Ok(None) => return Ok(Vec::new()),
                Ok(Some(Signal::Publish(p, epoch))) => {
                    return Ok(vec![StoredLetter {
                        location: format!("{}#{}", p.topic, p.pkid),
                        letter: decode(&p, &self.source),
                        handle: (epoch, p.pkid),
                    }]);
                }
                Ok(Some(Signal::Lost(e))) => return Err(StoreError::new(e)),
                Ok(Some(_)) => {}
            }
        }
    }

    async fn remove(&mut self, (epoch, pkid): (u64, u16)) -> Result<(), StoreError> {
        match &self.driver {
            Some(d) if d.current(epoch) => match self.client.try_ack(pkid) {
                true => Ok(()),
                false => Err(StoreError::new("no room to acknowledge; the letter stays")),
            },
            _ => Err(StoreError::new("the connection was lost; the letter stays")),
        }
    }

    async fn keep(&mut self, _: (u64, u16)) -> Result<(), StoreError> {
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StoreError> {
        self.client.disconnect().await;
        if let Some(driver) = self.driver.take() {
            driver.finish(Duration::from_secs(2)).await;
        }
        Ok(())
    }
}

/// The original message and function of a dead letter (the inverse of what
/// `dead_letter::TopicDeadLetters` publishes).
pub fn decode(p: &Publish, source: &str) -> Result<ReplayLetter, DecodeError> {
    let provenance = Provenance::parse(&p.properties)?;
    let topic = provenance.topic.clone();
    let mut message = provenance
        .message(p.payload.clone(), source)
        .with_subject(&topic)
        .with_ordering_key(bytes::Bytes::copy_from_slice(topic.as_bytes()));
    if let Some(ct) = &p.content_type {
        message = message.with_content_type(ct);
    }
    for (name, value) in &p.properties {
        if !Provenance::is_provenance(name) {
            message.add_header(name, value);
        }
    }
    Ok(ReplayLetter::new(message, provenance))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use connector_sdk::FunctionRef;
    use connector_sdk::dead_letter::{DeadLetter, DeadLetterReason};

    use super::*;

    /// The letter the sink publishes decodes back to the message the function received.
    #[test]
    fn decodes_what_the_sink_writes() {
        let received = Publish {
            topic: "sensors/1".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            qos: 1,
            pkid: 9,
            retain: false,
            dup: false,
            properties: vec![("x-tenant".into(), "acme".into())],
            content_type: Some("application/json".into()),
        };
        let original = crate::message::message(&received, "mqtt://h:1883");
        let letter = DeadLetter {
            message: Arc::new(original.clone()),
            function: FunctionRef::new("f", Some("ns")),
            reason: DeadLetterReason::Rejected,
            status: Some(422),
            error: None,
            response_excerpt: bytes::Bytes::from_static(b"no"),
            attempts: 1,
            first_failure: SystemTime::UNIX_EPOCH,
            last_failure: SystemTime::UNIX_EPOCH,
        };
        let stored = Publish {
            topic: "faas/dead-letter".into(),
            properties: original
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                .chain(letter.provenance())
                .collect(),
            ..received
        };
        let got = decode(&stored, "mqtt://h:1883").unwrap();
        assert_eq!(got.function.as_str(), "f.ns");
        assert_eq!(got.provenance.status, Some(422));
        let m = got.message;
        assert_eq!(
            (m.id.as_str(), m.topic.as_str()),
            (original.id.as_str(), "sensors/1")
        );
        assert_eq!(m.payload, original.payload);
        assert_eq!(m.content_type, original.content_type);
        assert_eq!(m.headers, original.headers);
        assert_eq!(m.coordinates, original.coordinates);
    }

    #[test]
    fn a_letter_without_provenance_is_refused() {
        let p = Publish {
            topic: "t".into(),
            payload: bytes::Bytes::new(),
            qos: 1,
            pkid: 1,
            retain: false,
            dup: false,
            properties: Vec::new(),
            content_type: None,
        };
        assert!(matches!(decode(&p, "s"), Err(DecodeError::Missing(_))));
    }
}
