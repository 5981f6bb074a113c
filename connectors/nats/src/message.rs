//! From a NATS message to the SDK's [`Message`]: what a function sees.
//!
//! Headers sent with every invocation (besides the SDK's `X-Topic`, `ce-*`,
//! `X-Delivery-Attempt`):
//!
//! | header | value |
//! | --- | --- |
//! | `X-Nats-Subject` | the subject the message was published to |
//! | every NATS header | forwarded as is (a `Content-Type` one also sets the content type) |
//! | `X-Nats-Stream`, `X-Nats-Sequence` | JetStream: where the message is stored |
//! | `X-Nats-Delivered` | JetStream: how many times the server delivered it, this one included |
//!
//! `ce-id` is `<stream>/<sequence>` in JetStream mode (the same on every redelivery) and a
//! generated id in core mode (core NATS messages have no identity). `ce-subject` is the
//! subject. The ordering key is the subject, so `ordering = "key"` keeps each subject in
//! order.

use std::time::SystemTime;

use bytes::Bytes;
use connector_sdk::Message;

/// `X-Nats-Subject`.
pub const SUBJECT_HEADER: &str = "X-Nats-Subject";
/// `X-Nats-Stream`.
pub const STREAM_HEADER: &str = "X-Nats-Stream";
/// `X-Nats-Sequence`.
pub const SEQUENCE_HEADER: &str = "X-Nats-Sequence";
/// `X-Nats-Delivered`.
pub const DELIVERED_HEADER: &str = "X-Nats-Delivered";

/// A message on `subject` with the common headers; `headers` are the NATS ones.
pub fn common(
    subject: &str,
    payload: Bytes,
    headers: Option<&async_nats::HeaderMap>,
    id: String,
    source: &str,
) -> Message {
    let mut message = Message::new(subject, payload, id, source)
        .with_subject(subject)
        .with_ordering_key(Bytes::copy_from_slice(subject.as_bytes()))
        .with_coordinate("subject", subject);
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            for value in values {
                let value: &str = value.as_ref();
                if name.eq_ignore_ascii_case("content-type") {
                    message = message.with_content_type(value);
                }
                message.add_header(name, value);
            }
        }
    }
    message.add_header(SUBJECT_HEADER, subject);
    message
}

/// A core NATS message: a fresh id.
pub fn core(message: &async_nats::Message, source: &str) -> Message {
    common(
        message.subject.as_str(),
        message.payload.clone(),
        message.headers.as_ref(),
        uuid::Uuid::new_v4().simple().to_string(),
        source,
    )
    .with_time(SystemTime::now())
}

/// Where a JetStream message sits: parsed from its reply subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    /// The stream.
    pub stream: String,
    /// The consumer.
    pub consumer: String,
    /// The stream sequence.
    pub sequence: u64,
    /// Deliveries so far, this one included.
    pub delivered: u32,
    /// When the server stored it.
    pub published: SystemTime,
}

impl StreamPosition {
    /// The position of `message`, if its reply subject is a JetStream ack subject.
    pub fn of(message: &async_nats::jetstream::Message) -> Option<Self> {
        let info = message.info().ok()?;
        Some(Self {
            stream: info.stream.to_owned(),
            consumer: info.consumer.to_owned(),
            sequence: info.stream_sequence,
            delivered: u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
            published: SystemTime::from(info.published),
        })
    }
}

/// A JetStream message: `ce-id` from its stream and sequence, attempts continuing from
/// the server's delivery count.
pub fn jetstream(
    message: &async_nats::Message,
    position: &StreamPosition,
    source: &str,
) -> Message {
    let mut out = common(
        message.subject.as_str(),
        message.payload.clone(),
        message.headers.as_ref(),
        format!("{}/{}", position.stream, position.sequence),
        source,
    )
    .with_time(position.published)
    .with_prior_attempts(position.delivered.saturating_sub(1))
    .with_coordinate("stream", &position.stream)
    .with_coordinate("sequence", position.sequence)
    .with_coordinate("consumer", &position.consumer);
    out.add_header(STREAM_HEADER, &position.stream);
    out.add_header(SEQUENCE_HEADER, &position.sequence.to_string());
    out.add_header(DELIVERED_HEADER, &position.delivered.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_headers_are_forwarded_and_content_type_taken() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        headers.insert("X-Tenant", "acme");
        let m = common(
            "orders.created",
            Bytes::from_static(b"{}"),
            Some(&headers),
            "id-1".into(),
            "nats://127.0.0.1:4222",
        );
        assert_eq!(m.headers["x-tenant"], "acme");
        assert_eq!(m.headers["x-nats-subject"], "orders.created");
        assert_eq!(
            m.content_type.as_ref().map(|v| v.to_str().unwrap_or("")),
            Some("application/json")
        );
        assert_eq!(m.subject.as_deref(), Some("orders.created"));
        assert_eq!(m.ordering_key.as_deref(), Some(&b"orders.created"[..]));
    }
}
