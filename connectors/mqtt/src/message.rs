//! From an MQTT PUBLISH to the SDK's [`Message`]: what a function sees.
//!
//! | request | from |
//! | --- | --- |
//! | body | the payload, byte for byte |
//! | `X-Topic`, `ce-subject` | the topic the message was published to (functions subscribe with filters) |
//! | `Content-Type` | MQTT 5 content type (unless `connector.content_type` is set) |
//! | `ce-id` | QoS 1: `<topic>/<packet id>/<payload hash>`, the same when the broker redelivers it; QoS 0: `<topic>/<random>` |
//! | `X-Mqtt-Topic`, `X-Mqtt-Qos`, `X-Mqtt-Retain`, `X-Mqtt-Dup` | where and how it came |
//! | MQTT 5 user properties | as headers, through the SDK's rules (`connector_sdk::source_headers`: `Host`, `Authorization`, `ce-*`, ... never reach a function); a publisher's `X-Mqtt-*` are dropped, only the connector sets those |
//!
//! MQTT has no message id: a packet id is reused once acknowledged. With QoS 1 it is the
//! same on a redelivery, so with the topic and a hash of the payload it identifies the
//! message across redeliveries well enough to deduplicate; two equal payloads on one
//! topic under one packet id (65,535 messages apart) share it. The ordering key is the
//! topic, so `ordering = "key"` keeps each topic in order.

use std::hash::{Hash, Hasher};
use std::time::SystemTime;

use connector_sdk::Message;

use crate::link::Publish;

/// `X-Mqtt-Topic`.
pub const TOPIC_HEADER: &str = "X-Mqtt-Topic";
/// `X-Mqtt-Qos`.
pub const QOS_HEADER: &str = "X-Mqtt-Qos";
/// `X-Mqtt-Retain`.
pub const RETAIN_HEADER: &str = "X-Mqtt-Retain";
/// `X-Mqtt-Dup`.
pub const DUP_HEADER: &str = "X-Mqtt-Dup";

/// The message `p` becomes. `source` is `ce-source`.
pub fn message(p: &Publish, source: &str) -> Message {
    let id = if p.qos == 0 {
        format!("{}/{}", p.topic, uuid::Uuid::new_v4().simple())
    } else {
        let mut hash = rustc_hash::FxHasher::default();
        p.payload.hash(&mut hash);
        format!("{}/{}/{:016x}", p.topic, p.pkid, hash.finish())
    };
    let mut m = Message::new(p.topic.clone(), p.payload.clone(), id, source)
        .with_subject(&p.topic)
        .with_ordering_key(bytes::Bytes::copy_from_slice(p.topic.as_bytes()))
        .with_time(SystemTime::now())
        .with_coordinate("topic", &p.topic)
        .with_coordinate("qos", p.qos);
    if let Some(ct) = &p.content_type {
        m = m.with_content_type(ct);
    }
    for (name, value) in &p.properties {
        if !name.to_ascii_lowercase().starts_with("x-mqtt-") {
            m.add_header(name, value);
        }
    }
    let flag = |b: bool| if b { "true" } else { "false" };
    m.add_header(TOPIC_HEADER, &p.topic);
    m.add_header(QOS_HEADER, &p.qos.to_string());
    m.add_header(RETAIN_HEADER, flag(p.retain));
    m.add_header(DUP_HEADER, flag(p.dup));
    m
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn publish(qos: u8, pkid: u16, payload: &'static [u8]) -> Publish {
        Publish {
            topic: "sensors/1/temp".into(),
            payload: bytes::Bytes::from_static(payload),
            qos,
            pkid,
            retain: false,
            dup: true,
            properties: vec![
                ("x-tenant".into(), "acme".into()),
                ("X-Mqtt-Topic".into(), "spoofed".into()),
                ("bad header".into(), "x".into()),
            ],
            content_type: Some("application/json".into()),
        }
    }

    #[test]
    fn a_publish_becomes_a_message() {
        let m = message(&publish(1, 7, b"{}"), "mqtt://h:1883");
        assert_eq!(m.topic, "sensors/1/temp");
        assert_eq!(m.content_type.as_ref().unwrap(), "application/json");
        let all = |n: &str| -> Vec<&str> {
            m.headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("x-tenant"), ["acme"]);
        assert_eq!(all("x-mqtt-topic"), ["sensors/1/temp"]);
        assert_eq!(all("x-mqtt-dup"), ["true"]);
        assert_eq!(all("x-mqtt-qos"), ["1"]);
        assert_eq!(m.ordering_key.as_deref(), Some(&b"sensors/1/temp"[..]));
    }

    #[test]
    fn ids_are_stable_for_qos1_redeliveries_only() {
        let a = message(&publish(1, 7, b"x"), "s");
        assert_eq!(a.id, message(&publish(1, 7, b"x"), "s").id);
        assert_ne!(a.id, message(&publish(1, 8, b"x"), "s").id);
        assert_ne!(a.id, message(&publish(1, 7, b"y"), "s").id);
        assert_ne!(
            message(&publish(0, 0, b"x"), "s").id,
            message(&publish(0, 0, b"x"), "s").id
        );
    }
}
