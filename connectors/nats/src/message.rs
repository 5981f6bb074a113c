//! From a NATS message to the SDK's [`Message`]: what a function sees.
//!
//! Headers sent with every invocation (besides the SDK's `X-Topic`, `ce-*`,
//! `X-Delivery-Attempt`):
//!
//! | header | value |
//! | --- | --- |
//! | `X-Nats-Subject` | the subject the message was published to |
//! | every NATS header | forwarded as is, except those the SDK withholds (`connector_sdk::source_headers`: `Content-Length`, `Host`, `Authorization`, `X-Callback-Url`, `ce-*`, ...) and the `X-Nats-*` ones below, which only the connector sets; a `Content-Type` one sets the content type |
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
            if is_ours(name) {
                // The connector's own metadata: a publisher's copy would sit beside it.
                continue;
            }
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

/// Whether `name` is one of the `X-Nats-*` headers this connector sets itself.
fn is_ours(name: &str) -> bool {
    [
        SUBJECT_HEADER,
        STREAM_HEADER,
        SEQUENCE_HEADER,
        DELIVERED_HEADER,
    ]
    .iter()
    .any(|ours| ours.eq_ignore_ascii_case(name))
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
        if let Some(position) = message.reply.as_deref().and_then(Self::parse) {
            return Some(position);
        }
        // A layout the fast path does not know: async-nats' own parser.
        let info = message.info().ok()?;
        Some(Self {
            stream: info.stream.to_owned(),
            consumer: info.consumer.to_owned(),
            sequence: info.stream_sequence,
            delivered: u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
            published: SystemTime::from(info.published),
        })
    }

    /// Parses an ack subject in one pass over its bytes:
    /// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<nanos>.<pending>`,
    /// or the same after `<domain>.<account hash>` with a trailing token (servers 2.10 and
    /// later). async-nats' `Message::info` gives the same answer at about ten times the cost
    /// (it splits with a `char` searcher, about 2,000 instructions per message).
    pub fn parse(reply: &str) -> Option<Self> {
        let rest = reply.strip_prefix("$JS.ACK.")?;
        let mut tokens = [""; 12];
        let mut count = 0;
        let mut start = 0;
        for (i, byte) in rest.bytes().enumerate() {
            if byte == b'.' {
                *tokens.get_mut(count)? = rest.get(start..i)?;
                count += 1;
                start = i + 1;
            }
        }
        *tokens.get_mut(count)? = rest.get(start..)?;
        count += 1;
        let t = match count {
            7 => &tokens[..7],
            10.. => &tokens[2..9],
            _ => return None,
        };
        let nanos: u64 = t[5].parse().ok()?;
        Some(Self {
            stream: t[0].to_owned(),
            consumer: t[1].to_owned(),
            sequence: t[3].parse().ok()?,
            delivered: u32::try_from(t[2].parse::<u64>().ok()?.max(1)).unwrap_or(u32::MAX),
            published: SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos),
        })
    }
}

/// A JetStream message: `ce-id` from its stream and sequence, attempts continuing from
/// the server's delivery count.
/// Takes the position by value: its strings become the provenance coordinates.
pub fn jetstream(message: &async_nats::Message, position: StreamPosition, source: &str) -> Message {
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
    if let Ok(stream) = HeaderValue::from_str(&position.stream) {
        out.headers.append(STREAM_HEADER_NAME, stream);
    }
    if let Ok(sequence) = HeaderValue::from_str(&sequence) {
        out.headers.append(SEQUENCE_HEADER_NAME, sequence);
    }
    out.headers
        .append(DELIVERED_HEADER_NAME, HeaderValue::from(position.delivered));
    out.coordinates.extend([
        ("stream".to_owned(), position.stream),
        ("sequence".to_owned(), sequence),
        ("consumer".to_owned(), position.consumer),
    ]);
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
        let m = jetstream(&nats, position, "nats://127.0.0.1:4222");
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

    #[tokio::test]
    async fn ack_subjects_parse_as_async_nats_parses_them() {
        // A client that never connects (nothing listens there): only a context is needed.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .unwrap();
        let ts = 1_733_462_400_123_456_789u64;
        for reply in [
            format!("$JS.ACK.ORDERS.c1.3.42.17.{ts}.5"),
            format!("$JS.ACK._.ACCHASH.ORDERS.c1.3.42.17.{ts}.5.tok"),
            format!("$JS.ACK.hub.ACCHASH.ORDERS.c1.3.42.17.{ts}.5.tok"),
        ] {
            let message = async_nats::jetstream::Message {
                message: async_nats::Message {
                    subject: "orders.created".into(),
                    reply: Some(reply.as_str().into()),
                    payload: Bytes::new(),
                    headers: None,
                    status: None,
                    description: None,
                    length: 0,
                },
                context: async_nats::jetstream::new(client.clone()),
            };
            let info = message.info().unwrap();
            let parsed = StreamPosition::parse(&reply).expect(&reply);
            assert_eq!(parsed.stream, info.stream, "{reply}");
            assert_eq!(parsed.consumer, info.consumer);
            assert_eq!(parsed.sequence, info.stream_sequence);
            assert_eq!(i64::from(parsed.delivered), info.delivered);
            assert_eq!(parsed.published, SystemTime::from(info.published));
        }
        for bad in [
            "$JS.ACK.ORDERS.c1.3.42.17",
            "$JS.ACK.ORDERS.c1.x.42.17.1.5",
            "_INBOX.abc",
            "$JS.ACK.a.b.c.d.e.f.g.h",
            "$JS.ACK.a.b.c.d.e.f.g.h.i.j.k.l.m",
        ] {
            assert_eq!(StreamPosition::parse(bad), None, "{bad}");
        }
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

    /// Issue 17: a publisher cannot add its own `X-Nats-*` values beside the
    /// connector's (the function would read whichever comes first).
    #[test]
    fn a_publisher_cannot_spoof_the_connectors_own_headers() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("X-Nats-Subject", "spoofed");
        headers.insert("x-nats-stream", "spoofed");
        headers.insert("X-NATS-SEQUENCE", "1");
        headers.insert("X-Nats-Delivered", "9");
        headers.insert("X-Nats-Other", "kept");
        let position = StreamPosition {
            stream: "ORDERS".into(),
            consumer: "c".into(),
            sequence: 42,
            delivered: 2,
            published: SystemTime::UNIX_EPOCH,
        };
        let message = async_nats::Message {
            subject: "orders.created".into(),
            reply: None,
            payload: Bytes::from_static(b"{}"),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let core_message = core(&message, "nats://n");
        let all = |m: &Message, name: &str| -> Vec<String> {
            m.headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or("").to_owned())
                .collect()
        };
        assert_eq!(all(&core_message, "x-nats-subject"), ["orders.created"]);
        assert!(all(&core_message, "x-nats-stream").is_empty());
        assert!(all(&core_message, "x-nats-delivered").is_empty());
        assert_eq!(all(&core_message, "x-nats-other"), ["kept"]);
        let js = jetstream(&message, position, "nats://n");
        assert_eq!(all(&js, "x-nats-subject"), ["orders.created"]);
        assert_eq!(all(&js, "x-nats-stream"), ["ORDERS"]);
        assert_eq!(all(&js, "x-nats-sequence"), ["42"]);
        assert_eq!(all(&js, "x-nats-delivered"), ["2"]);
    }
}
