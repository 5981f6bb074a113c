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
use http::{HeaderName, HeaderValue};

/// `X-Nats-Subject`.
pub const SUBJECT_HEADER: &str = "X-Nats-Subject";
/// `X-Nats-Stream`.
pub const STREAM_HEADER: &str = "X-Nats-Stream";
/// `X-Nats-Sequence`.
pub const SEQUENCE_HEADER: &str = "X-Nats-Sequence";
/// `X-Nats-Delivered`.
pub const DELIVERED_HEADER: &str = "X-Nats-Delivered";

/// A message on `subject` with the common headers; `headers` are the NATS ones.
///
/// Built by setting fields rather than through the builder methods, each of which moves
/// the whole message: this runs once per message received.
pub fn common(
    subject: &str,
    payload: Bytes,
    headers: Option<&async_nats::HeaderMap>,
    id: String,
    source: &str,
) -> Message {
    let mut message = Message::new(subject, payload, id, source);
    message.subject = Some(subject.to_owned());
    message.ordering_key = Some(Bytes::copy_from_slice(subject.as_bytes()));
    message
        .coordinates
        .push(("subject".to_owned(), subject.to_owned()));
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            for value in values {
                let value: &str = value.as_ref();
                if name.eq_ignore_ascii_case("content-type") {
                    message.content_type = HeaderValue::from_str(value).ok();
                }
                message.add_header(name, value);
            }
        }
    }
    if let Ok(value) = HeaderValue::from_str(subject) {
        message.headers.append(SUBJECT_HEADER_NAME, value);
    }
    message
}

// The constants above as header names, built at compile time: parsing the mixed-case
// strings allocates per message. The JetStream test checks that both spellings agree.
const SUBJECT_HEADER_NAME: HeaderName = HeaderName::from_static("x-nats-subject");
const STREAM_HEADER_NAME: HeaderName = HeaderName::from_static("x-nats-stream");
const SEQUENCE_HEADER_NAME: HeaderName = HeaderName::from_static("x-nats-sequence");
const DELIVERED_HEADER_NAME: HeaderName = HeaderName::from_static("x-nats-delivered");

/// A core NATS message: a fresh id.
pub fn core(message: &async_nats::Message, source: &str) -> Message {
    let mut out = common(
        message.subject.as_str(),
        message.payload.clone(),
        message.headers.as_ref(),
        uuid::Uuid::new_v4().simple().to_string(),
        source,
    );
    out.time = Some(SystemTime::now());
    out
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
    let sequence = position.sequence.to_string();
    let mut out = common(
        message.subject.as_str(),
        message.payload.clone(),
        message.headers.as_ref(),
        format!("{}/{sequence}", position.stream),
        source,
    );
    out.time = Some(position.published);
    out.prior_attempts = position.delivered.saturating_sub(1);
    out.coordinates.extend([
        ("stream".to_owned(), position.stream.clone()),
        ("sequence".to_owned(), sequence.clone()),
        ("consumer".to_owned(), position.consumer.clone()),
    ]);
    if let Ok(stream) = HeaderValue::from_str(&position.stream) {
        out.headers.append(STREAM_HEADER_NAME, stream);
    }
    if let Ok(sequence) = HeaderValue::from_str(&sequence) {
        out.headers.append(SEQUENCE_HEADER_NAME, sequence);
    }
    out.headers
        .append(DELIVERED_HEADER_NAME, HeaderValue::from(position.delivered));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jetstream_messages_carry_their_position() {
        let nats = async_nats::Message {
            subject: "orders.created".into(),
            reply: None,
            payload: Bytes::from_static(b"{}"),
            headers: None,
            status: None,
            description: None,
            length: 2,
        };
        let position = StreamPosition {
            stream: "ORDERS".into(),
            consumer: "c".into(),
            sequence: 42,
            delivered: 3,
            published: SystemTime::UNIX_EPOCH,
        };
        let m = jetstream(&nats, &position, "nats://127.0.0.1:4222");
        assert_eq!(m.id, "ORDERS/42");
        assert_eq!(m.prior_attempts, 2);
        assert_eq!(m.time, Some(SystemTime::UNIX_EPOCH));
        for (name, value) in [
            (SUBJECT_HEADER, "orders.created"),
            (STREAM_HEADER, "ORDERS"),
            (SEQUENCE_HEADER, "42"),
            (DELIVERED_HEADER, "3"),
        ] {
            assert_eq!(m.headers[name], value, "{name}");
        }
        let coordinates: Vec<(&str, &str)> = m
            .coordinates
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            coordinates,
            [
                ("subject", "orders.created"),
                ("stream", "ORDERS"),
                ("sequence", "42"),
                ("consumer", "c")
            ]
        );
        assert_eq!(m.ordering_key.as_deref(), Some(&b"orders.created"[..]));
    }

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
