//! Dead letters to an explicit SQS queue: the original body, with the provenance as
//! message attributes. SQS allows 10 attributes per message, so the nine most useful
//! provenance entries are attributes of their own and the whole provenance (response
//! excerpt, error and source coordinates included) is the JSON attribute
//! `x-dead-letter-provenance`.

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::MessageAttributeValue;
use connector_sdk::dead_letter::names;
use connector_sdk::{DeadLetter, DeadLetterError, DeadLetterSink};

use crate::queue::Queue;

/// The attribute holding the complete provenance as a JSON object.
pub const PROVENANCE: &str = "x-dead-letter-provenance";

/// Provenance entries that get an attribute of their own, in this order.
const OWN_ATTRIBUTES: &[&str] = &[
    names::FUNCTION,
    names::REASON,
    names::STATUS,
    names::ATTEMPTS,
    names::TOPIC,
    names::ID,
    names::FIRST_FAILURE,
    names::LAST_FAILURE,
    "x-dead-letter-source-queue",
];

/// Sends dead letters to `queue`.
#[derive(Debug, Clone)]
pub struct QueueSink {
    client: Client,
    queue: Queue,
}

impl QueueSink {
    /// A sink writing to `queue`.
    pub fn new(client: Client, queue: Queue) -> Self {
        Self { client, queue }
    }
}

fn string_attribute(value: &str) -> Option<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .ok()
}

/// A JSON object of string pairs (no serde_json needed for flat text).
fn json_object(pairs: &[(String, String)]) -> String {
    let escape = |s: &str| {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    };
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}:{}", escape(k), escape(v)))
        .collect();
    format!("{{{}}}", body.join(","))
}

#[async_trait::async_trait]
impl DeadLetterSink for QueueSink {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let provenance = letter.provenance();
        let mut request = self
            .client
            .send_message()
            .queue_url(&self.queue.url)
            .message_body(String::from_utf8_lossy(&letter.message.payload).into_owned());
        for name in OWN_ATTRIBUTES {
            if let Some((_, value)) = provenance.iter().find(|(k, _)| k == name)
                && let Some(v) = string_attribute(value)
            {
                request = request.message_attributes(*name, v);
            }
        }
        if let Some(v) = string_attribute(&json_object(&provenance)) {
            request = request.message_attributes(PROVENANCE, v);
        }
        if self.queue.fifo {
            let group = letter
                .message
                .coordinates
                .iter()
                .find(|(k, _)| k == "message-group-id")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| letter.message.topic.clone());
            let mut dedup = format!("{}-{}", letter.message.id, letter.function);
            dedup.retain(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            dedup.truncate(128);
            request = request
                .message_group_id(group)
                .message_deduplication_id(dedup);
        }
        request.send().await.map(|_| ()).map_err(|e| {
            DeadLetterError::new(format!(
                "SendMessage to dead-letter queue {}: {}",
                self.queue.name,
                crate::queue::describe(&e)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_json_is_escaped() {
        let json = json_object(&[
            ("a".into(), "plain".into()),
            ("b".into(), "quote \" back \\ nl \n".into()),
        ]);
        assert_eq!(json, r#"{"a":"plain","b":"quote \" back \\ nl \n"}"#);
    }
}
