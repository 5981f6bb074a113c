//! From a Kafka record to the SDK's [`Message`]: payload byte for byte, and the headers a
//! function receives.
//!
//! | header | value |
//! | --- | --- |
//! | `X-Kafka-Topic`, `X-Kafka-Partition`, `X-Kafka-Offset` | the record's coordinates |
//! | `X-Kafka-Key` | the key as text; base64 with `X-Kafka-Key-Enc: b64` when it is not UTF-8 (or not a valid header value) |
//! | `X-Kafka-Timestamp` | the record's timestamp, milliseconds since the Unix epoch |
//! | `X-Kafka-<name>` | each record header, as OpenFaaS Pro forwards them; base64 with `X-Kafka-<name>-Enc: b64` when not text. The coordinates above win over a record header of the same name |
//! | `ce-id` | `<topic>/<partition>/<offset>`, the same on every redelivery |
//! | `ce-source` | `kafka://<group>/<topic>` |
//! | `ce-time`, `ce-subject` | the record timestamp; the key when it is text |
//! | `Content-Type` | a record header `content-type`, unless the connector configures one |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use connector_sdk::Message;
use connector_sdk::config::Ordering;
use rdkafka::Message as _;
use rdkafka::message::{BorrowedMessage, Headers};

use crate::offsets::TopicPartition;

/// The record header carrying how many replies led to this record.
pub const HOPS_HEADER: &str = "x-connector-hops";

/// A record copied out of librdkafka's buffers.
#[derive(Debug, Clone)]
pub struct Record {
    /// Where it is.
    pub tp: TopicPartition,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Bytes>,
    /// Its value; a null value is delivered as an empty body.
    pub payload: Bytes,
    /// Milliseconds since the epoch, when the broker gave one.
    pub timestamp: Option<i64>,
    /// Its headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
}

impl Record {
    /// Copies `m`.
    pub fn from_borrowed(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            tp: TopicPartition::new(m.topic(), m.partition()),
            offset: m.offset(),
            key: m.key().map(Bytes::copy_from_slice),
            payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
            timestamp: m.timestamp().to_millis(),
            headers,
        }
    }

    /// The hop count of a reply record (0 for any other record).
    pub fn hops(&self) -> u32 {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(HOPS_HEADER))
            .and_then(|(_, v)| v.as_ref())
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `ce-id`: `<topic>/<partition>/<offset>`.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.tp.topic, self.tp.partition, self.offset)
    }

    /// The message handed to the dispatcher. The record's `traceparent`/`tracestate`
    /// headers become its trace context (see connector-sdk's `trace` module).
    pub fn to_message(&self, group: &str, ordering: Ordering) -> Message {
        let tp = &self.tp;
        let mut m = Message::new(
            tp.topic.as_ref(),
            self.payload.clone(),
            self.id(),
            format!("kafka://{group}/{}", tp.topic),
        )
        .with_coordinate("topic", &tp.topic)
        .with_coordinate("partition", tp.partition)
        .with_coordinate("offset", self.offset);
        if let Some(ts) = self.timestamp {
            // In dead letters' provenance, so a replay restores `ce-time` and the header.
            m = m.with_coordinate("timestamp", ts);
        }
        let (mut traceparent, mut tracestate) = (None, None);
        for (name, value) in &self.headers {
            // W3C trace context (and CloudEvents' Kafka binding, `ce_traceparent`): the
            // parent of the delivery's span, sent on as the invocation's own
            // `traceparent`, not also as `X-Kafka-traceparent` beside it.
            if is_trace_header(name, "traceparent") {
                traceparent = value.as_ref();
                continue;
            }
            if is_trace_header(name, "tracestate") {
                tracestate = value.as_ref();
                continue;
            }
            if name.eq_ignore_ascii_case("content-type")
                && let Some(ct) = value.as_ref().and_then(|v| std::str::from_utf8(v).ok())
            {
                m = m.with_content_type(ct);
            }
            let header = format!("X-Kafka-{name}");
            if let Some(v) = value {
                add_text_or_b64(&mut m, &header, v);
            } else {
                m.add_header(&header, "");
            }
        }
        if let Some(parent) = traceparent {
            m.set_trace_context(parent, tracestate.map(|s| &s[..]));
        }
        // Ours last, replacing any record header that spells the same name.
        for name in [
            "x-kafka-topic",
            "x-kafka-partition",
            "x-kafka-offset",
            "x-kafka-key",
            "x-kafka-key-enc",
            "x-kafka-timestamp",
        ] {
            m.headers.remove(name);
        }
        m.add_header("X-Kafka-Topic", &tp.topic);
        m.add_header("X-Kafka-Partition", &tp.partition.to_string());
        m.add_header("X-Kafka-Offset", &self.offset.to_string());
        if let Some(key) = &self.key
            && add_text_or_b64(&mut m, "X-Kafka-Key", key)
            && let Ok(text) = std::str::from_utf8(key)
        {
            m = m.with_subject(text);
        }
        if let Some(ts) = self.timestamp {
            m.add_header("X-Kafka-Timestamp", &ts.to_string());
            if let Ok(ms) = u64::try_from(ts) {
                m = m.with_time(UNIX_EPOCH + Duration::from_millis(ms));
            }
        }
        match ordering {
            // The partition: a function may still ask for order (`connector.ordering`).
            Ordering::None | Ordering::Partition => m = m.with_ordering_key(self.lane(None)),
            Ordering::Key => {
                if let Some(key) = &self.key {
                    m = m.with_ordering_key(self.lane(Some(key)));
                }
            }
        }
        m
    }

    /// The ordering lane: the partition, and the key within it in `key` mode.
    fn lane(&self, key: Option<&Bytes>) -> Bytes {
        let mut lane = Vec::with_capacity(self.tp.topic.len() + 8 + key.map_or(0, |k| k.len()));
        lane.extend_from_slice(self.tp.topic.as_bytes());
        lane.push(0);
        lane.extend_from_slice(&self.tp.partition.to_be_bytes());
        if let Some(k) = key {
            lane.push(0);
            lane.extend_from_slice(k);
        }
        Bytes::from(lane)
    }
}

/// Adds `name: value` as text when `value` is UTF-8 and a valid header value, else
/// base64 with `<name>-Enc: b64`. Returns whether it went as text.
fn add_text_or_b64(m: &mut Message, name: &str, value: &[u8]) -> bool {
    if let Ok(text) = std::str::from_utf8(value)
        && m.add_header(name, text)
    {
        return true;
    }
    m.add_header(name, &B64.encode(value));
    m.add_header(&format!("{name}-Enc"), "b64");
    false
}

/// Milliseconds since the epoch of `t`.
pub fn epoch_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whether record header `name` is the W3C `field` (`traceparent`, `tracestate`), plain
/// or as CloudEvents' Kafka binding spells its extensions (`ce_traceparent`).
fn is_trace_header(name: &str, field: &str) -> bool {
    name.eq_ignore_ascii_case(field)
        || name
            .strip_prefix("ce_")
            .is_some_and(|rest| rest.eq_ignore_ascii_case(field))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            tp: TopicPartition::new("orders", 3),
            offset: 42,
            key: Some(Bytes::from_static(b"customer-7")),
            payload: Bytes::from_static(&[0xff, 0x00, 0xfe]),
            timestamp: Some(1_700_000_000_123),
            headers: vec![
                ("trace".into(), Some(Bytes::from_static(b"abc"))),
                ("bin".into(), Some(Bytes::from_static(&[0x00, 0x9f]))),
                ("Partition".into(), Some(Bytes::from_static(b"spoofed"))),
                (
                    "content-type".into(),
                    Some(Bytes::from_static(b"application/json")),
                ),
            ],
        }
    }

    #[test]
    fn trace_context_is_taken_not_forwarded() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut r = record();
        r.headers
            .push(("traceparent".into(), Some(Bytes::from(parent))));
        r.headers
            .push(("tracestate".into(), Some(Bytes::from_static(b"v=1"))));
        let m = r.to_message("g", Ordering::None);
        let tc = m.trace_context.clone().unwrap();
        assert_eq!(tc.traceparent, parent);
        assert_eq!(tc.tracestate.unwrap(), "v=1");
        assert_eq!(header(&m, "x-kafka-traceparent"), None);
        assert_eq!(header(&m, "x-kafka-tracestate"), None);
        // CloudEvents' Kafka binding.
        let mut r = record();
        r.headers
            .push(("ce_traceparent".into(), Some(Bytes::from(parent))));
        let m = r.to_message("g", Ordering::None);
        assert_eq!(m.trace_context.unwrap().traceparent, parent);
    }

    fn header(m: &Message, name: &str) -> Option<String> {
        m.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    #[test]
    fn headers_follow_the_contract() {
        let m = record().to_message("g", Ordering::Partition);
        assert_eq!(m.id, "orders/3/42");
        assert_eq!(m.source, "kafka://g/orders");
        assert_eq!(&m.payload[..], &[0xff, 0x00, 0xfe], "payload byte for byte");
        assert_eq!(header(&m, "x-kafka-topic").as_deref(), Some("orders"));
        assert_eq!(header(&m, "x-kafka-partition").as_deref(), Some("3"));
        assert_eq!(m.headers.get_all("x-kafka-partition").iter().count(), 1);
        assert_eq!(header(&m, "x-kafka-offset").as_deref(), Some("42"));
        assert_eq!(header(&m, "x-kafka-key").as_deref(), Some("customer-7"));
        assert_eq!(header(&m, "x-kafka-key-enc"), None);
        assert_eq!(
            header(&m, "x-kafka-timestamp").as_deref(),
            Some("1700000000123")
        );
        assert_eq!(header(&m, "x-kafka-trace").as_deref(), Some("abc"));
        assert_eq!(header(&m, "x-kafka-bin").as_deref(), Some("AJ8="));
        assert_eq!(header(&m, "x-kafka-bin-enc").as_deref(), Some("b64"));
        assert_eq!(m.subject.as_deref(), Some("customer-7"));
        assert_eq!(
            m.content_type.as_ref().map(|v| v.to_str().unwrap()),
            Some("application/json")
        );
        let coords: Vec<_> = m
            .coordinates
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            coords,
            [
                "topic=orders",
                "partition=3",
                "offset=42",
                "timestamp=1700000000123"
            ]
        );
    }

    #[test]
    fn binary_keys_go_as_base64() {
        let mut r = record();
        r.key = Some(Bytes::from_static(&[0xff, 0xfe]));
        let m = r.to_message("g", Ordering::None);
        assert_eq!(header(&m, "x-kafka-key").as_deref(), Some("//4="));
        assert_eq!(header(&m, "x-kafka-key-enc").as_deref(), Some("b64"));
        assert_eq!(m.subject, None);
    }

    #[test]
    fn lanes_per_partition_or_per_key() {
        let a = record();
        let mut b = record();
        b.key = Some(Bytes::from_static(b"other"));
        let lane = |r: &Record, o| r.to_message("g", o).ordering_key.unwrap();
        assert_eq!(lane(&a, Ordering::Partition), lane(&b, Ordering::Partition));
        // Without ordering the partition too, for functions that ask for it.
        assert_eq!(lane(&a, Ordering::None), lane(&b, Ordering::Partition));
        assert_ne!(lane(&a, Ordering::Key), lane(&b, Ordering::Key));
        b.key = None;
        assert_eq!(b.to_message("g", Ordering::Key).ordering_key, None);
    }

    #[test]
    fn hop_count_is_read_from_the_header() {
        let mut r = record();
        assert_eq!(r.hops(), 0);
        r.headers
            .push((HOPS_HEADER.into(), Some(Bytes::from_static(b"3"))));
        assert_eq!(r.hops(), 3);
    }
}
