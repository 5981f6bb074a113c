//! `sqs-connector replay`: the messages of `sqs.dead_letter_queue` replayed through the
//! SDK's [`Replayer`]; a delivered letter is deleted (DeleteMessage).
//!
//! Letters are received one at a time and stay invisible while they are replayed (for
//! `max_attempts` × (`upstream_timeout` + `backoff.max`), so retries fit). Every letter
//! received and not deleted (failed again, skipped, listed by a dry run) is made visible
//! again (visibility 0) when the replay ends. The replay ends when the queue has nothing
//! visible left, or when it receives a letter it already saw in this run (a kept letter
//! whose visibility ran out), so it never loops.
//!
//! The replayed message is rebuilt from the provenance (the `x-dead-letter-provenance`
//! JSON attribute): its topic, body, `ce-id` (the original message id), `ce-source`
//! `sqs://<queue>`, and `X-SQS-Message-ID`, `X-SQS-Queue-URL`, `X-SQS-Receive-Count`,
//! `X-SQS-Message-Group-ID` from the original coordinates, and `ce-time` from the
//! provenance. The original's message attributes (`X-SQS-Attr-*`) are not in a dead
//! letter and so not replayed.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use connector_sdk::replay::{
    DeadLetterStore, DecodeError, Provenance, ReplayArgs, ReplayLetter, Replayer, StoreError,
    StoredLetter, Summary,
};

use crate::config::Config;
use crate::dead_letter::PROVENANCE;
use crate::queue::{self, Queue, describe, name_of};
use crate::source::headers;
use crate::{NAME, SqsError};

/// SQS's longest visibility timeout.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

/// Replays the dead letters of `config`'s `dead_letter_queue`, writing progress and the
/// summary to `out`.
pub async fn run(
    config: &Config,
    args: ReplayArgs,
    out: &mut (dyn Write + Send),
) -> Result<Summary, SqsError> {
    let store = open(config).await?;
    let replayer = Replayer::new(NAME, &config.sdk_config(), args)?;
    replayer.stop_on_signals()?;
    Ok(replayer.run(store, out).await?)
}

/// The dead-letter queue of `config`, to read from the oldest letter (for `replay` and the
/// admin API).
pub async fn open(config: &Config) -> Result<QueueStore, SqsError> {
    let Some(spec) = &config.sqs.dead_letter_queue else {
        return Err(SqsError::ReplaySetup(
            "nothing to replay: no sqs.dead_letter_queue is configured (letters moved by a redrive policy are redriven with SQS's own StartMessageMoveTask)".to_owned(),
        ));
    };
    let sdk = config.sdk_config();
    let client = queue::client(&config.sqs).await?;
    let dlq = queue::resolve(&client, spec).await?;
    let per_attempt = sdk.upstream_timeout + sdk.backoff.max;
    let hold = per_attempt
        .saturating_mul(sdk.max_attempts.max(1))
        .saturating_add(Duration::from_secs(30))
        .min(MAX_VISIBILITY);
    let store = QueueStore {
        client,
        queue: dlq,
        hold_seconds: i32::try_from(hold.as_secs()).unwrap_or(i32::MAX),
        seen: HashSet::new(),
        held: BTreeMap::new(),
        done: false,
    };
    Ok(store)
}

/// The dead-letter queue.
pub struct QueueStore {
    client: Client,
    queue: Queue,
    hold_seconds: i32,
    /// Message ids received in this run.
    seen: HashSet<String>,
    /// Receipt handles of letters received and not deleted, by message id.
    held: BTreeMap<String, String>,
    done: bool,
}

/// A letter's message id and receipt handle.
pub struct Handle {
    id: String,
    receipt: String,
}

#[async_trait::async_trait]
impl DeadLetterStore for QueueStore {
    type Handle = Handle;

    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<Handle>>, StoreError> {
        if self.done {
            return Ok(Vec::new());
        }
        let received = self
            .client
            .receive_message()
            .queue_url(&self.queue.url)
            .max_number_of_messages(1)
            .wait_time_seconds(1)
            .visibility_timeout(self.hold_seconds)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(|e| {
                StoreError::new(format!(
                    "receiving from {}: {}",
                    self.queue.name,
                    describe(&e)
                ))
            })?;
        let Some(m) = received.messages.unwrap_or_default().into_iter().next() else {
            self.done = true;
            return Ok(Vec::new());
        };
        let id = m.message_id.clone().unwrap_or_default();
        let Some(receipt) = m.receipt_handle.clone() else {
            return Err(StoreError::new("a received message had no receipt handle"));
        };
        self.held.insert(id.clone(), receipt.clone());
        if !self.seen.insert(id.clone()) {
            // Seen before in this run: everything was read once.
            self.done = true;
            return Ok(Vec::new());
        }
        let letter = decode(&m);
        Ok(vec![StoredLetter {
            location: format!("{} {id}", self.queue.name),
            letter,
            handle: Handle { id, receipt },
        }])
    }

    async fn remove(&mut self, handle: Handle) -> Result<(), StoreError> {
        self.client
            .delete_message()
            .queue_url(&self.queue.url)
            .receipt_handle(&handle.receipt)
            .send()
            .await
            .map_err(|e| {
                StoreError::new(format!(
                    "DeleteMessage on {}: {}",
                    self.queue.name,
                    describe(&e)
                ))
            })?;
        self.held.remove(&handle.id);
        Ok(())
    }

    /// Everything received and not deleted becomes visible again now, not after the hold.
    async fn finish(&mut self) -> Result<(), StoreError> {
        let mut failed = Vec::new();
        for (id, receipt) in std::mem::take(&mut self.held) {
            if let Err(e) = self
                .client
                .change_message_visibility()
                .queue_url(&self.queue.url)
                .receipt_handle(receipt)
                .visibility_timeout(0)
                .send()
                .await
            {
                tracing::warn!(message_id = %id, error = %describe(&e), "releasing a kept letter failed; it becomes visible when its visibility timeout ends");
                failed.push(id);
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(StoreError::new(format!(
                "{} kept letter(s) stay invisible until their visibility timeout ends",
                failed.len()
            )))
        }
    }
}

/// The original message and function of a dead letter (the inverse of
/// `dead_letter::QueueSink::write`).
fn decode(m: &aws_sdk_sqs::types::Message) -> Result<ReplayLetter, DecodeError> {
    let attributes = m.message_attributes.clone().unwrap_or_default();
    let mut pairs: Vec<(String, String)> = attributes
        .iter()
        .filter(|(name, _)| name.as_str() != PROVENANCE)
        .filter_map(|(name, v)| Some((name.clone(), v.string_value.clone()?)))
        .collect();
    // The full provenance (coordinates included) is the JSON attribute; the attributes of
    // their own are only the first nine of it.
    if let Some(json) = attributes
        .get(PROVENANCE)
        .and_then(|v| v.string_value.as_deref())
    {
        let full: BTreeMap<String, String> = serde_json::from_str(json)
            .map_err(|e| DecodeError::Malformed(format!("{PROVENANCE}: {e}")))?;
        pairs.retain(|(k, _)| !full.contains_key(k));
        pairs.extend(full);
    }
    let provenance = Provenance::parse(&pairs)?;
    let body = m.body.clone().unwrap_or_default();
    let queue_url = provenance
        .coordinate("queue")
        .unwrap_or_default()
        .to_owned();
    let mut message =
        provenance.message(body.into_bytes(), format!("sqs://{}", name_of(&queue_url)));
    if let Some(id) = provenance.coordinate("message-id") {
        message.add_header(headers::MESSAGE_ID, id);
    }
    if !queue_url.is_empty() {
        message.add_header(headers::QUEUE_URL, &queue_url);
    }
    if let Some(count) = provenance.coordinate("receive-count") {
        message.add_header(headers::RECEIVE_COUNT, count);
    }
    if let Some(group) = provenance.coordinate("message-group-id") {
        message.add_header(headers::GROUP_ID, group);
        message = message.with_ordering_key(format!("{queue_url}\n{group}").into_bytes());
    }
    Ok(ReplayLetter::new(message, provenance))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use aws_sdk_sqs::types::MessageAttributeValue;

    use super::*;

    fn attribute(v: &str) -> MessageAttributeValue {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    }

    #[test]
    fn decodes_the_json_provenance() {
        let json = r#"{"x-dead-letter-function":"f.ns","x-dead-letter-reason":"rejected","x-dead-letter-attempts":"1","x-dead-letter-topic":"orders","x-dead-letter-id":"m-1","x-dead-letter-status":"400","x-dead-letter-source-queue":"http://h:4566/000/orders.fifo","x-dead-letter-source-message-id":"m-1","x-dead-letter-source-receive-count":"1","x-dead-letter-source-message-group-id":"g"}"#;
        let m = aws_sdk_sqs::types::Message::builder()
            .body("{\"a\":1}")
            .message_id("dl-9")
            .message_attributes("x-dead-letter-function", attribute("f.ns"))
            .message_attributes(PROVENANCE, attribute(json))
            .build();
        let got = decode(&m).unwrap();
        assert_eq!(got.function.as_str(), "f.ns");
        assert_eq!(got.provenance.status, Some(400));
        let msg = got.message;
        assert_eq!((msg.topic.as_str(), msg.id.as_str()), ("orders", "m-1"));
        assert_eq!(msg.source, "sqs://orders.fifo");
        assert_eq!(&msg.payload[..], b"{\"a\":1}");
        assert_eq!(msg.headers["x-sqs-message-id"], "m-1");
        assert_eq!(
            msg.headers["x-sqs-queue-url"],
            "http://h:4566/000/orders.fifo"
        );
        assert_eq!(msg.headers["x-sqs-receive-count"], "1");
        assert_eq!(msg.headers["x-sqs-message-group-id"], "g");
        assert!(msg.ordering_key.is_some());
    }

    #[test]
    fn a_letter_without_provenance_is_refused() {
        let m = aws_sdk_sqs::types::Message::builder().body("x").build();
        assert!(decode(&m).is_err());
    }
}
