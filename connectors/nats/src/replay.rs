//! `nats-connector replay`: dead letters read back from the JetStream stream that
//! captures the dead-letter subject, replayed through the SDK's [`Replayer`]; a delivered
//! letter is deleted from that stream.
//!
//! The dead-letter subjects are `jetstream.dead_letter_subject` with `{subject}` replaced
//! by each configured topic (or, with no `topics`, each topic of the gateway's functions;
//! a wildcard topic gives a wildcard filter). The stream is the one the server says
//! captures them. Replay reads it with an ordered consumer (ephemeral, no acks, nothing
//! left behind on the server) up to the stream's last sequence when the replay started.
//!
//! Removal is a delete of the letter's sequence, not an ack: an ack removes a message
//! only from one consumer's view (unless the stream has work-queue retention), so the
//! letter would still be in the stream for `nats stream view` and for the next replay
//! with another consumer; and an unacknowledged letter kept by a durable consumer would be
//! redelivered to this same run. A letter that fails again is simply left in the stream.
//! A stream configured with `deny_delete` cannot be replayed from: the first removal fails
//! and the replay stops, the delivered letter still in place.
//!
//! The replayed message: the dead letter's payload and headers minus the provenance (so
//! the forwarded NATS headers and `X-Nats-*` are as the function first saw them), its
//! original subject, `ce-id` `<stream>/<sequence>` and `ce-time` of the original (kept in
//! the provenance).

use std::collections::BTreeSet;
use std::io::Write;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use connector_sdk::replay::{
    self, DeadLetterStore, DecodeError, Provenance, ReplayArgs, ReplayLetter, Replayer, StoreError,
    StoredLetter, Summary,
};
use futures::StreamExt;

use crate::config::{Config, Mode};
use crate::{NAME, NatsError, connect};

/// Replays the dead letters of `config`, writing progress and the summary to `out`.
pub async fn run(
    config: &Config,
    args: ReplayArgs,
    out: &mut (dyn Write + Send),
) -> Result<Summary, NatsError> {
    // Checked before the replayer is made, so a misconfiguration says so first.
    let store = open(config).await?;
    let replayer = Replayer::new(NAME, &config.connector, args)?;
    replayer.stop_on_signals()?;
    let client = store.client.clone();
    let summary = replayer.run(store, out).await?;
    if let Err(e) = client.flush().await {
        tracing::debug!(error = %e, "final flush failed");
    }
    Ok(summary)
}

/// The streams that capture `config`'s dead-letter subjects, to read from the oldest
/// letter (for `replay` and the admin API).
pub async fn open(config: &Config) -> Result<SubjectStore, NatsError> {
    let Some(template) = config.jetstream.dead_letter_subject.clone() else {
        return Err(NatsError::ReplaySetup(
            "nothing to replay: no jetstream.dead_letter_subject is configured".to_owned(),
        ));
    };
    if config.nats.mode != Mode::Jetstream {
        return Err(NatsError::ReplaySetup(
            "nothing to replay: dead letters are written only in jetstream mode".to_owned(),
        ));
    }
    let subjects: BTreeSet<String> = replay::topics(NAME, &config.connector)
        .await?
        .iter()
        .map(|topic| template.replace("{subject}", topic))
        .collect();
    let connection = connect::connect(&config.nats).await?;
    if !connection
        .wait_connected(config.connector.upstream_timeout)
        .await
    {
        return Err(NatsError::Connect("not connected to NATS".to_owned()));
    }
    let context = async_nats::jetstream::new(connection.client.clone());
    let mut stores = Vec::new();
    for subject in subjects {
        let name = context
            .stream_by_subject(subject.clone())
            .await
            .map_err(|e| NatsError::ReplaySetup(format!("no stream captures {subject}: {e}")))?;
        let mut stream = context
            .get_stream(&name)
            .await
            .map_err(|e| NatsError::ReplaySetup(format!("stream {name}: {e}")))?;
        let last = stream
            .info()
            .await
            .map_err(|e| NatsError::ReplaySetup(format!("stream {name}: {e}")))?
            .state
            .last_sequence;
        stores.push((name, subject, stream, last));
    }
    Ok(SubjectStore {
        pending: stores,
        current: None,
        source: crate::core::source_name(&config.nats.servers()),
        client: connection.client.clone(),
    })
}

/// The dead-letter subjects, one after another.
pub struct SubjectStore {
    /// (stream name, filter subject, stream, last sequence at start) not read yet.
    pending: Vec<(String, String, Stream, u64)>,
    current: Option<Reading>,
    /// `ce-source`.
    source: String,
    /// The connection's client, flushed when a replay ends.
    client: async_nats::Client,
}

struct Reading {
    name: String,
    stream: Stream,
    last: u64,
    messages: Ordered,
}

/// A letter's stream and sequence.
pub struct Handle {
    stream: Stream,
    name: String,
    sequence: u64,
}

#[async_trait::async_trait]
impl DeadLetterStore for SubjectStore {
    type Handle = Handle;

    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<Handle>>, StoreError> {
        loop {
            if self.current.is_none() {
                let Some((name, subject, stream, last)) = self.pending.pop() else {
                    return Ok(Vec::new());
                };
                let consumer = stream
                    .create_consumer(OrderedConfig {
                        filter_subject: subject.clone(),
                        deliver_policy: DeliverPolicy::All,
                        ..OrderedConfig::default()
                    })
                    .await
                    .map_err(|e| StoreError::new(format!("reading {subject} in {name}: {e}")))?;
                if consumer.cached_info().num_pending == 0 {
                    continue;
                }
                let messages = consumer
                    .messages()
                    .await
                    .map_err(|e| StoreError::new(format!("reading {subject} in {name}: {e}")))?;
                self.current = Some(Reading {
                    name,
                    stream,
                    last,
                    messages,
                });
            }
            let Some(reading) = self.current.as_mut() else {
                continue;
            };
            // The last message says it was the last (`pending` 0); should letters arrive
            // meanwhile and then vanish (deleted by another replay), a silent consumer
            // also means the end instead of waiting for new ones.
            let next = tokio::time::timeout(IDLE_END, reading.messages.next()).await;
            let message = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    return Err(StoreError::new(format!("reading {}: {e}", reading.name)));
                }
                Ok(None) | Err(_) => {
                    self.current = None;
                    continue;
                }
            };
            let (sequence, pending) = message
                .info()
                .map(|i| (i.stream_sequence, i.pending))
                .map_err(|e| StoreError::new(format!("reading {}: {e}", reading.name)))?;
            if sequence > reading.last {
                self.current = None;
                continue;
            }
            let handle = Handle {
                stream: reading.stream.clone(),
                name: reading.name.clone(),
                sequence,
            };
            let location = format!("{}#{sequence} ({})", reading.name, message.subject);
            if pending == 0 || sequence == reading.last {
                self.current = None;
            }
            let letter = decode(&message.message, &self.source);
            return Ok(vec![StoredLetter {
                location,
                letter,
                handle,
            }]);
        }
    }

    async fn remove(&mut self, handle: Handle) -> Result<(), StoreError> {
        handle
            .stream
            .delete_message(handle.sequence)
            .await
            .map(|_| ())
            .map_err(|e| {
                StoreError::new(format!(
                    "deleting {}#{} from the stream: {e}",
                    handle.name, handle.sequence
                ))
            })
    }
}

/// How long the ordered consumer may stay silent before its subject counts as read to the
/// end (every letter up to the last sequence arrives without waiting).
const IDLE_END: std::time::Duration = std::time::Duration::from_secs(2);

/// The original message and function of a dead letter (the inverse of
/// `dead_letter::headers`).
fn decode(letter: &async_nats::Message, source: &str) -> Result<ReplayLetter, DecodeError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(headers) = &letter.headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            for value in values {
                let value: &str = value.as_ref();
                pairs.push((name.to_owned(), value.to_owned()));
            }
        }
    }
    let provenance = Provenance::parse(&pairs)?;
    let subject = provenance.topic.clone();
    let mut message = provenance
        .message(letter.payload.clone(), source)
        .with_subject(&subject)
        .with_ordering_key(Bytes::copy_from_slice(subject.as_bytes()));
    for (name, value) in &pairs {
        if Provenance::is_provenance(name) {
            continue;
        }
        if name.eq_ignore_ascii_case("content-type") {
            message = message.with_content_type(value);
        }
        message.add_header(name, value);
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
    use crate::message::{StreamPosition, jetstream};

    /// What the dead-letter sink publishes decodes back to the message the connector sent.
    #[test]
    fn decodes_what_the_sink_writes() {
        let mut nats_headers = async_nats::HeaderMap::new();
        nats_headers.insert("Content-Type", "application/json");
        nats_headers.insert("X-Tenant", "acme");
        let original_nats = async_nats::Message {
            subject: "orders.created".into(),
            reply: None,
            payload: Bytes::from_static(b"{}"),
            headers: Some(nats_headers),
            status: None,
            description: None,
            length: 0,
        };
        let position = StreamPosition {
            stream: "ORDERS".into(),
            consumer: "c".into(),
            sequence: 7,
            delivered: 1,
            published: SystemTime::UNIX_EPOCH,
        };
        let original = jetstream(&original_nats, position, "nats://h:4222");
        let letter = DeadLetter {
            message: Arc::new(original.clone()),
            function: FunctionRef::new("f", None),
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: None,
            response_excerpt: Bytes::from_static(b"bad\nrequest"),
            attempts: 1,
            first_failure: SystemTime::UNIX_EPOCH,
            last_failure: SystemTime::UNIX_EPOCH,
        };
        let stored = async_nats::Message {
            subject: "dlq.orders.created".into(),
            reply: None,
            payload: original.payload.clone(),
            headers: Some(crate::dead_letter::headers(&letter)),
            status: None,
            description: None,
            length: 0,
        };
        let got = decode(&stored, "nats://h:4222").unwrap();
        assert_eq!(got.function.as_str(), "f");
        assert_eq!(got.provenance.response.as_deref(), Some("bad request"));
        let m = got.message;
        assert_eq!(m.id, "ORDERS/7");
        assert_eq!(m.topic, "orders.created");
        assert_eq!(m.payload, original.payload);
        assert_eq!(m.source, original.source);
        assert_eq!(m.subject, original.subject);
        assert_eq!(m.content_type, original.content_type);
        assert_eq!(m.ordering_key, original.ordering_key);
        // NATS headers are a hash map: the coordinates come back in another order.
        let sorted = |c: &[(String, String)]| c.iter().cloned().collect::<BTreeSet<_>>();
        assert_eq!(sorted(&m.coordinates), sorted(&original.coordinates));
        let mut want: Vec<_> = original.headers.iter().collect();
        let mut have: Vec<_> = m.headers.iter().collect();
        want.sort_by_key(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()));
        have.sort_by_key(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()));
        assert_eq!(have, want);
    }
}
