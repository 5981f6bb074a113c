//! From an AMQP delivery to the SDK's [`Message`]: what a function sees.
//!
//! | request | from |
//! | --- | --- |
//! | body | the message body, byte for byte |
//! | `X-Topic` | the routing key (functions subscribe with routing keys or patterns) |
//! | `Content-Type` | the `content_type` property (unless `connector.content_type` is set) |
//! | `ce-id` | `<queue>/<message_id>` when the publisher set `message_id` (the same on every redelivery); else `<queue>/<random>` |
//! | `ce-time` | the `timestamp` property, else the time of receipt |
//! | `ce-subject` | the routing key |
//! | `X-Rabbitmq-Exchange`, `X-Rabbitmq-Routing-Key`, `X-Rabbitmq-Queue` | where it came from |
//! | `X-Rabbitmq-Redelivered` | `true` when the broker delivered it before |
//! | `X-Rabbitmq-Delivery-Count` | quorum queues: earlier deliveries (`x-delivery-count`) |
//! | every AMQP header | as is when its value is a string, number or boolean; except those the SDK withholds (`connector_sdk::source_headers`) and the `X-Rabbitmq-*` ones above, which only the connector sets |
//!
//! With a quorum queue the broker's delivery count continues the attempts across
//! redeliveries and restarts (`X-Delivery-Attempt`, `max_attempts`); a classic queue has
//! none, and a publisher's `x-delivery-count` is then ignored. The ordering key is the
//! routing key, so `ordering = "key"` keeps each routing key in order.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use connector_sdk::Message;
use http::HeaderValue;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

/// `X-Rabbitmq-Exchange`.
pub const EXCHANGE_HEADER: &str = "X-Rabbitmq-Exchange";
/// `X-Rabbitmq-Routing-Key`.
pub const ROUTING_KEY_HEADER: &str = "X-Rabbitmq-Routing-Key";
/// `X-Rabbitmq-Queue`.
pub const QUEUE_HEADER: &str = "X-Rabbitmq-Queue";
/// `X-Rabbitmq-Redelivered`.
pub const REDELIVERED_HEADER: &str = "X-Rabbitmq-Redelivered";
/// `X-Rabbitmq-Delivery-Count`.
pub const DELIVERY_COUNT_HEADER: &str = "X-Rabbitmq-Delivery-Count";
/// The quorum queue's count of earlier deliveries.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// What the broker told about one delivery, besides its body and properties.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// The exchange it was published to (empty: the default exchange).
    pub exchange: &'a str,
    /// Its routing key.
    pub routing_key: &'a str,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// Whether the queue is a quorum queue, whose `x-delivery-count` is the broker's.
    pub quorum: bool,
}

/// The message a delivery becomes. `source` is `ce-source`.
pub fn message(
    envelope: &Envelope<'_>,
    properties: &BasicProperties,
    body: Vec<u8>,
    source: &str,
) -> Message {
    let id = match properties.message_id() {
        Some(id) if !id.as_str().is_empty() => format!("{}/{}", envelope.queue, id.as_str()),
        _ => format!("{}/{}", envelope.queue, uuid::Uuid::new_v4().simple()),
    };
    let key = envelope.routing_key;
    let mut message = Message::new(key, Bytes::from(body), id, source);
    message.subject = Some(key.to_owned());
    message.ordering_key = Some(Bytes::copy_from_slice(key.as_bytes()));
    message.time = Some(properties.timestamp().map_or_else(SystemTime::now, |t| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t)
    }));
    if let Some(ct) = properties.content_type() {
        message.content_type = HeaderValue::from_str(ct.as_str()).ok();
    }
    let mut delivery_count = None;
    if let Some(headers) = properties.headers() {
        for (name, value) in headers.inner() {
            let name = name.as_str();
            if name.eq_ignore_ascii_case(DELIVERY_COUNT) {
                delivery_count = integer(value);
                continue;
            }
            if is_ours(name) {
                continue;
            }
            if let Some(text) = text(value) {
                message.add_header(name, &text);
            }
        }
    }
    message.add_header(EXCHANGE_HEADER, envelope.exchange);
    message.add_header(ROUTING_KEY_HEADER, key);
    message.add_header(QUEUE_HEADER, envelope.queue);
    message.add_header(
        REDELIVERED_HEADER,
        if envelope.redelivered {
            "true"
        } else {
            "false"
        },
    );
    if envelope.quorum
        && let Some(count) = delivery_count
    {
        let count = u32::try_from(count.max(0)).unwrap_or(u32::MAX);
        message.prior_attempts = count;
        message.add_header(DELIVERY_COUNT_HEADER, &count.to_string());
    }
    message.coordinates.extend([
        ("queue".to_owned(), envelope.queue.to_owned()),
        ("exchange".to_owned(), envelope.exchange.to_owned()),
        ("routing_key".to_owned(), key.to_owned()),
    ]);
    message
}

/// Whether `name` is one of the `X-Rabbitmq-*` headers this connector sets itself.
fn is_ours(name: &str) -> bool {
    [
        EXCHANGE_HEADER,
        ROUTING_KEY_HEADER,
        QUEUE_HEADER,
        REDELIVERED_HEADER,
        DELIVERY_COUNT_HEADER,
    ]
    .iter()
    .any(|ours| ours.eq_ignore_ascii_case(name))
}

/// A header value as text: strings (valid UTF-8), numbers, booleans and timestamps;
/// tables, arrays and raw bytes have no single text form and are skipped.
pub fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.to_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        other => integer(other)?.to_string(),
    })
}

fn integer(value: &AMQPValue) -> Option<i64> {
    Some(match value {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    })
}

/// Name/value pairs as an AMQP header table (names longer than an AMQP short string
/// cannot be keys and are skipped).
pub fn table<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in pairs {
        if let Ok(key) = lapin::types::ShortString::try_new(name) {
            table.insert(key, AMQPValue::LongString(value.as_bytes().to_vec().into()));
        }
    }
    table
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn envelope(quorum: bool) -> Envelope<'static> {
        Envelope {
            queue: "jobs",
            exchange: "amq.topic",
            routing_key: "orders.created",
            redelivered: true,
            quorum,
        }
    }

    fn all(m: &Message, name: &str) -> Vec<String> {
        m.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .collect()
    }

    #[test]
    fn a_delivery_becomes_a_message() {
        let mut headers = FieldTable::default();
        headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
        headers.insert("x-count".into(), AMQPValue::LongInt(7));
        headers.insert(
            "x-nested".into(),
            AMQPValue::FieldTable(FieldTable::default()),
        );
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        headers.insert(
            "X-Rabbitmq-Queue".into(),
            AMQPValue::LongString("spoofed".into()),
        );
        let properties = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_timestamp(1_700_000_000)
            .with_headers(headers);
        let m = message(&envelope(true), &properties, b"{}".to_vec(), "amqp://h/");
        assert_eq!(m.topic, "orders.created");
        assert_eq!(m.id, "jobs/m-1");
        assert_eq!(m.payload, Bytes::from_static(b"{}"));
        assert_eq!(m.content_type.as_ref().unwrap(), "application/json");
        assert_eq!(
            m.time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(m.prior_attempts, 2);
        assert_eq!(all(&m, "x-tenant"), ["acme"]);
        assert_eq!(all(&m, "x-count"), ["7"]);
        assert!(all(&m, "x-nested").is_empty());
        assert_eq!(all(&m, "x-rabbitmq-queue"), ["jobs"]);
        assert_eq!(all(&m, "x-rabbitmq-exchange"), ["amq.topic"]);
        assert_eq!(all(&m, "x-rabbitmq-redelivered"), ["true"]);
        assert_eq!(all(&m, "x-rabbitmq-delivery-count"), ["2"]);
        assert_eq!(m.ordering_key.as_deref(), Some(&b"orders.created"[..]));
        assert_eq!(
            m.coordinates[2],
            ("routing_key".into(), "orders.created".into())
        );
    }

    /// A classic queue has no delivery count: a publisher's cannot shorten the attempts.
    #[test]
    fn a_publishers_delivery_count_is_ignored_on_classic_queues() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(99));
        let properties = BasicProperties::default().with_headers(headers);
        let m = message(&envelope(false), &properties, Vec::new(), "amqp://h/");
        assert_eq!(m.prior_attempts, 0);
        assert!(all(&m, "x-rabbitmq-delivery-count").is_empty());
        assert!(m.id.starts_with("jobs/"));
        let again = message(&envelope(false), &properties, Vec::new(), "amqp://h/");
        assert_ne!(
            m.id, again.id,
            "without message_id each delivery is its own"
        );
    }
}
