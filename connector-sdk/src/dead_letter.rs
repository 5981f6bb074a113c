//! Dead letters: a delivery that failed for good, with everything needed to understand and
//! replay it. Each connector implements [`DeadLetterSink`] for its broker (a Kafka topic, a
//! Redis stream, an SQS queue, a NATS subject).

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::function::FunctionRef;
use crate::message::Message;

/// How much of the function's last response body a dead letter keeps.
pub const RESPONSE_EXCERPT_BYTES: usize = 1024;

/// Why a delivery was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The function answered with a status that is not retried (a 4xx by default).
    Rejected,
    /// Every attempt failed with a retryable status or error.
    Exhausted,
    /// The function's filter failed on the message (its error is the letter's error):
    /// nobody could say whether the function wants it.
    FilterFailed,
}

impl DeadLetterReason {
    /// `rejected`, `exhausted` or `filter_failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Exhausted => "exhausted",
            Self::FilterFailed => "filter_failed",
        }
    }
}

/// A delivery that failed for good: the original message plus provenance.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original message: payload, headers and source coordinates.
    pub message: Arc<Message>,
    /// The function that failed.
    pub function: FunctionRef,
    /// Why.
    pub reason: DeadLetterReason,
    /// The last HTTP status, if a response arrived.
    pub status: Option<u16>,
    /// The last transport error, if the last attempt had no response.
    pub error: Option<String>,
    /// The start of the last response body (at most [`RESPONSE_EXCERPT_BYTES`]).
    pub response_excerpt: Bytes,
    /// Attempts made, the broker's earlier deliveries included.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure: SystemTime,
    /// When the last attempt failed.
    pub last_failure: SystemTime,
}

/// The header (or attribute) names under which [`DeadLetter::provenance`] is written.
pub mod names {
    /// The function that failed.
    pub const FUNCTION: &str = "x-dead-letter-function";
    /// `rejected` or `exhausted`.
    pub const REASON: &str = "x-dead-letter-reason";
    /// The last HTTP status.
    pub const STATUS: &str = "x-dead-letter-status";
    /// The last transport error.
    pub const ERROR: &str = "x-dead-letter-error";
    /// The start of the response body (UTF-8, lossy).
    pub const RESPONSE: &str = "x-dead-letter-response";
    /// Attempts made.
    pub const ATTEMPTS: &str = "x-dead-letter-attempts";
    /// RFC 3339 time of the first failure.
    pub const FIRST_FAILURE: &str = "x-dead-letter-first-failure";
    /// RFC 3339 time of the last failure.
    pub const LAST_FAILURE: &str = "x-dead-letter-last-failure";
    /// The original topic.
    pub const TOPIC: &str = "x-dead-letter-topic";
    /// The original `ce-id`.
    pub const ID: &str = "x-dead-letter-id";
    /// RFC 3339 time of the original message (`ce-time`), when it had one.
    pub const TIME: &str = "x-dead-letter-time";
    /// The W3C `traceparent` of the message's trace: its span when traces are on, else
    /// the context it arrived with; absent when it had none.
    pub const TRACEPARENT: &str = "x-dead-letter-traceparent";
    /// Prefix of each source coordinate (`x-dead-letter-source-partition`).
    pub const SOURCE_PREFIX: &str = "x-dead-letter-source-";
}

impl DeadLetter {
    /// Provenance as name/value pairs (names from [`names`]), for brokers that carry
    /// headers or attributes next to the original payload.
    pub fn provenance(&self) -> Vec<(String, String)> {
        let rfc3339 = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        let mut out = vec![
            (names::FUNCTION.to_owned(), self.function.to_string()),
            (names::REASON.to_owned(), self.reason.as_str().to_owned()),
            (names::ATTEMPTS.to_owned(), self.attempts.to_string()),
            (names::FIRST_FAILURE.to_owned(), rfc3339(self.first_failure)),
            (names::LAST_FAILURE.to_owned(), rfc3339(self.last_failure)),
            (names::TOPIC.to_owned(), self.message.topic.clone()),
            (names::ID.to_owned(), self.message.id.clone()),
        ];
        if let Some(time) = self.message.time {
            out.push((names::TIME.to_owned(), rfc3339(time)));
        }
        if let Some(status) = self.status {
            out.push((names::STATUS.to_owned(), status.to_string()));
        }
        if let Some(error) = &self.error {
            out.push((names::ERROR.to_owned(), error.clone()));
        }
        if !self.response_excerpt.is_empty() {
            out.push((
                names::RESPONSE.to_owned(),
                String::from_utf8_lossy(&self.response_excerpt).into_owned(),
            ));
        }
        if let Some(traceparent) = crate::trace::dead_letter_traceparent(&self.message) {
            out.push((names::TRACEPARENT.to_owned(), traceparent));
        }
        for (k, v) in &self.message.coordinates {
            out.push((format!("{}{k}", names::SOURCE_PREFIX), v.clone()));
        }
        out
    }
}

/// Why a dead letter could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeadLetterError(pub String);

impl DeadLetterError {
    /// An error with `message`.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self(message.to_string())
    }
}

/// Where a connector writes dead letters. The dispatcher calls [`write`](Self::write) and
/// completes the delivery as dead-lettered only when it returns `Ok`; an error (after a few
/// tries) leaves the message unacknowledged.
#[async_trait::async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Writes one dead letter durably.
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_carries_everything() {
        let mut message = Message::new("orders", "x", "orders/1/9", "kafka://b/orders")
            .with_coordinate("partition", 1)
            .with_coordinate("offset", 9)
            .with_time(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1500));
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        message.set_trace_context(traceparent.as_bytes(), None);
        let letter = DeadLetter {
            message: Arc::new(message),
            function: FunctionRef::new("f", Some("ns")),
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: None,
            response_excerpt: Bytes::from_static(b"bad input"),
            attempts: 1,
            first_failure: SystemTime::UNIX_EPOCH,
            last_failure: SystemTime::UNIX_EPOCH,
        };
        let p: std::collections::BTreeMap<_, _> = letter.provenance().into_iter().collect();
        assert_eq!(p[names::FUNCTION], "f.ns");
        assert_eq!(p[names::REASON], "rejected");
        assert_eq!(p[names::STATUS], "400");
        assert_eq!(p[names::RESPONSE], "bad input");
        assert_eq!(p[names::ATTEMPTS], "1");
        assert_eq!(p[names::FIRST_FAILURE], "1970-01-01T00:00:00.000Z");
        assert_eq!(p["x-dead-letter-source-partition"], "1");
        assert_eq!(p["x-dead-letter-source-offset"], "9");
        assert_eq!(p[names::ID], "orders/1/9");
        assert_eq!(p[names::TIME], "1970-01-01T00:00:01.500Z");
        assert_eq!(p[names::TRACEPARENT], traceparent);
    }
}
