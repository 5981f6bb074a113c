//! From Redis replies to [`Message`]s: parsing stream entries binary-safe and in order
//! (the `redis` crate's typed replies use a `HashMap`, which loses both the order and
//! repeated field names), and shaping the request body and headers.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use connector_sdk::Message;
use connector_sdk::config::Ordering;
use redis::Value;

/// Source metadata headers sent with every stream entry.
pub mod headers {
    /// The stream key.
    pub const STREAM: &str = "X-Redis-Stream";
    /// The entry id.
    pub const ID: &str = "X-Redis-Id";
    /// The consumer group.
    pub const GROUP: &str = "X-Redis-Group";
    /// Fields whose values were not UTF-8 and are base64 in the JSON body.
    pub const BASE64_FIELDS: &str = "X-Redis-Base64-Fields";
    /// The channel a Pub/Sub message was published to.
    pub const CHANNEL: &str = "X-Redis-Channel";
    /// The pattern a Pub/Sub message matched (PSUBSCRIBE).
    pub const PATTERN: &str = "X-Redis-Pattern";
}

/// One stream entry: its id and its fields in order. `fields` is `None` for an entry that
/// is still pending but was deleted from the stream (trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `1700000000000-0`.
    pub id: String,
    /// Field/value pairs as written by XADD.
    pub fields: Option<Vec<(Bytes, Bytes)>>,
}

/// A reply that does not have the shape the command documents.
#[derive(Debug, thiserror::Error)]
#[error("unexpected reply to {command}: {detail}")]
pub struct ReplyError {
    command: &'static str,
    detail: String,
}

fn unexpected(command: &'static str, v: &Value) -> ReplyError {
    let mut detail = format!("{v:?}");
    detail.truncate(200);
    ReplyError { command, detail }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn bytes(v: &Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        Value::Int(i) => Some(Bytes::from(i.to_string())),
        _ => None,
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// Parses a list of entries: `[[id, [field, value, ...]], ...]` (`nil` fields for a
/// deleted entry).
pub fn parse_entries(command: &'static str, v: &Value) -> Result<Vec<Entry>, ReplyError> {
    let Value::Array(items) = v else {
        return match v {
            Value::Nil => Ok(Vec::new()),
            _ => Err(unexpected(command, v)),
        };
    };
    items
        .iter()
        .map(|item| {
            let Value::Array(pair) = item else {
                return Err(unexpected(command, item));
            };
            let id = pair
                .first()
                .and_then(text)
                .ok_or_else(|| unexpected(command, item))?;
            let fields = match pair.get(1) {
                None | Some(Value::Nil) => None,
                Some(Value::Array(flat)) => Some(
                    flat.chunks(2)
                        .map(|kv| match kv {
                            [k, v] => Ok((
                                bytes(k).ok_or_else(|| unexpected(command, k))?,
                                bytes(v).ok_or_else(|| unexpected(command, v))?,
                            )),
                            _ => Err(unexpected(command, item)),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                Some(Value::Map(pairs)) => Some(
                    pairs
                        .iter()
                        .map(|(k, v)| {
                            Ok((
                                bytes(k).ok_or_else(|| unexpected(command, k))?,
                                bytes(v).ok_or_else(|| unexpected(command, v))?,
                            ))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                Some(other) => return Err(unexpected(command, other)),
            };
            Ok(Entry { id, fields })
        })
        .collect()
}

/// Parses an XREADGROUP reply: `nil` (timed out) or `[[stream, entries], ...]` (RESP2) or
/// a map of stream to entries (RESP3).
pub fn parse_read(v: &Value) -> Result<Vec<(String, Vec<Entry>)>, ReplyError> {
    const CMD: &str = "XREADGROUP";
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => streams
            .iter()
            .map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => Ok((
                    text(&pair[0]).ok_or_else(|| unexpected(CMD, s))?,
                    parse_entries(CMD, &pair[1])?,
                )),
                _ => Err(unexpected(CMD, s)),
            })
            .collect(),
        Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| {
                Ok((
                    text(k).ok_or_else(|| unexpected(CMD, k))?,
                    parse_entries(CMD, v)?,
                ))
            })
            .collect(),
        other => Err(unexpected(CMD, other)),
    }
}

/// Parses an XAUTOCLAIM reply: the next cursor and the claimed entries (entries deleted
/// from the stream are dropped from the pending list by Redis itself and not returned).
pub fn parse_autoclaim(v: &Value) -> Result<(String, Vec<Entry>), ReplyError> {
    const CMD: &str = "XAUTOCLAIM";
    let Value::Array(parts) = v else {
        return Err(unexpected(CMD, v));
    };
    let cursor = parts
        .first()
        .and_then(text)
        .ok_or_else(|| unexpected(CMD, v))?;
    let entries = match parts.get(1) {
        Some(list) => parse_entries(CMD, list)?,
        None => Vec::new(),
    };
    Ok((cursor, entries))
}

/// Parses the extended XPENDING reply (`[[id, consumer, idle, deliveries], ...]`) into
/// each id's delivery count.
pub fn parse_delivery_counts(v: &Value) -> Result<HashMap<String, u64>, ReplyError> {
    const CMD: &str = "XPENDING";
    let Value::Array(items) = v else {
        return match v {
            Value::Nil => Ok(HashMap::new()),
            _ => Err(unexpected(CMD, v)),
        };
    };
    items
        .iter()
        .map(|item| match item {
            Value::Array(row) if row.len() >= 4 => Ok((
                text(&row[0]).ok_or_else(|| unexpected(CMD, item))?,
                int(&row[3]).ok_or_else(|| unexpected(CMD, item))?,
            )),
            _ => Err(unexpected(CMD, item)),
        })
        .collect()
}

/// The summary XPENDING reply: how many entries are pending and the smallest id.
pub fn parse_pending_summary(v: &Value) -> Result<(u64, Option<String>), ReplyError> {
    const CMD: &str = "XPENDING";
    let Value::Array(parts) = v else {
        return Err(unexpected(CMD, v));
    };
    let count = parts
        .first()
        .and_then(int)
        .ok_or_else(|| unexpected(CMD, v))?;
    Ok((count, parts.get(1).and_then(text)))
}

/// The `lag` of `group` in an XINFO GROUPS reply; `None` when Redis cannot tell (entries
/// were deleted) or the group is not listed.
pub fn parse_group_lag(v: &Value, group: &str) -> Option<u64> {
    let Value::Array(groups) = v else {
        return None;
    };
    groups.iter().find_map(|g| {
        let pairs: Vec<(String, &Value)> = match g {
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((text(k)?, v)),
                    _ => None,
                })
                .collect(),
            Value::Map(pairs) => pairs
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, v)))
                .collect(),
            _ => return None,
        };
        let name = pairs
            .iter()
            .find(|(k, _)| k == "name")
            .and_then(|(_, v)| text(v))?;
        if name != group {
            return None;
        }
        pairs
            .iter()
            .find(|(k, _)| k == "lag")
            .and_then(|(_, v)| int(v))
    })
}

/// The consumers in an XINFO CONSUMERS reply: name, pending entries, idle milliseconds.
pub fn parse_consumers(v: &Value) -> Vec<(String, u64, u64)> {
    let Value::Array(consumers) = v else {
        return Vec::new();
    };
    consumers
        .iter()
        .filter_map(|c| {
            let pairs: Vec<(String, &Value)> = match c {
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|kv| match kv {
                        [k, v] => Some((text(k)?, v)),
                        _ => None,
                    })
                    .collect(),
                Value::Map(pairs) => pairs
                    .iter()
                    .filter_map(|(k, v)| Some((text(k)?, v)))
                    .collect(),
                _ => return None,
            };
            let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            Some((
                text(get("name")?)?,
                int(get("pending")?)?,
                int(get("idle")?)?,
            ))
        })
        .collect()
}

/// The time part of an entry id (`<ms>-<seq>`), as a time.
pub fn entry_time(id: &str) -> Option<SystemTime> {
    let ms: u64 = id.split('-').next()?.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// How entries become messages: which field is the body, which the content type, which
/// the ordering key.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The body field, if configured.
    pub body_field: Option<String>,
    /// The content-type field, if configured.
    pub content_type_field: Option<String>,
    /// The ordering-key field, if configured.
    pub key_field: Option<String>,
    /// The field holding the W3C `traceparent`, if configured.
    pub trace_field: Option<String>,
    /// The configured ordering.
    pub ordering: Ordering,
    /// `ce-source` prefix: `redis://host:port/db`.
    pub source: String,
    /// The consumer group (sent as `X-Redis-Group`).
    pub group: String,
}

/// A message built from an entry, and whether its configured body field was missing.
#[derive(Debug)]
pub struct Shaped {
    /// The message.
    pub message: Message,
    /// The body field was configured but absent: the body is the entry as JSON.
    pub body_field_missing: bool,
}

impl Shape {
    /// The message for entry `id` of `stream`, delivered `deliveries` times so far (this
    /// read included).
    pub fn message(
        &self,
        stream: &str,
        id: &str,
        fields: &[(Bytes, Bytes)],
        deliveries: u64,
    ) -> Shaped {
        let field = |name: &Option<String>| {
            let name = name.as_deref()?;
            fields
                .iter()
                .find(|(k, _)| k.as_ref() == name.as_bytes())
                .map(|(_, v)| v.clone())
        };
        let body = field(&self.body_field);
        let body_field_missing = self.body_field.is_some() && body.is_none();
        let (payload, json, binary) = match body {
            Some(body) => (body, false, Vec::new()),
            None => {
                let (json, binary) = entry_json(fields);
                (Bytes::from(json), true, binary)
            }
        };
        let mut message = Message::new(
            stream,
            payload,
            format!("{stream}/{id}"),
            format!("{}/{stream}", self.source),
        )
        .with_event_type("redis.stream.entry")
        .with_coordinate("stream", stream)
        .with_coordinate("id", id)
        .with_coordinate("group", &self.group)
        .with_prior_attempts(u32::try_from(deliveries.saturating_sub(1)).unwrap_or(u32::MAX));
        if let Some(time) = entry_time(id) {
            message = message.with_time(time);
        }
        let content_type = field(&self.content_type_field);
        if let Some(ct) = content_type
            .as_deref()
            .and_then(|c| std::str::from_utf8(c).ok())
        {
            message = message.with_content_type(ct);
        } else if json {
            message = message.with_content_type("application/json");
        }
        let key = field(&self.key_field);
        if let Some(key) = &key {
            message = message.with_subject(String::from_utf8_lossy(key).into_owned());
        }
        match self.ordering {
            // As `key`: a function may still ask for order (`connector.ordering`).
            Ordering::None | Ordering::Key => {
                message = message.with_ordering_key(key.unwrap_or_else(|| lane_of(stream)));
            }
            Ordering::Partition => message = message.with_ordering_key(lane_of(stream)),
        }
        if let Some(traceparent) = field(&self.trace_field) {
            let tracestate = field(&Some("tracestate".to_owned()));
            message.set_trace_context(&traceparent, tracestate.as_deref());
        }
        message.add_header(headers::STREAM, stream);
        message.add_header(headers::ID, id);
        message.add_header(headers::GROUP, &self.group);
        if !binary.is_empty() {
            message.add_header(headers::BASE64_FIELDS, &binary.join(","));
        }
        Shaped {
            message,
            body_field_missing,
        }
    }
}

/// The lane of entries without a key: one per stream. The prefix keeps it apart from any
/// key value.
fn lane_of(stream: &str) -> Bytes {
    Bytes::from(format!("\0stream\0{stream}"))
}

/// The entry as a JSON object, fields in their order (a repeated field appears twice, as
/// Redis keeps it). Values that are not UTF-8 are base64; their names are returned.
pub fn entry_json(fields: &[(Bytes, Bytes)]) -> (String, Vec<String>) {
    let mut out = String::with_capacity(
        2 + fields
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum::<usize>(),
    );
    let mut binary = Vec::new();
    out.push('{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let key = String::from_utf8_lossy(k);
        push_json_string(&mut out, &key);
        out.push(':');
        match std::str::from_utf8(v) {
            Ok(text) => push_json_string(&mut out, text),
            Err(_) => {
                binary.push(key.into_owned());
                push_json_string(
                    &mut out,
                    &base64::engine::general_purpose::STANDARD.encode(v),
                );
            }
        }
    }
    out.push('}');
    (out, binary)
}

fn push_json_string(out: &mut String, s: &str) {
    // Serializing a &str into JSON cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn shape(body: Option<&str>, ordering: Ordering) -> Shape {
        Shape {
            body_field: body.map(str::to_owned),
            content_type_field: Some("ct".into()),
            key_field: Some("user".into()),
            trace_field: None,
            ordering,
            source: "redis://127.0.0.1:6379/0".into(),
            group: "g".into(),
        }
    }

    fn fields(pairs: &[(&str, &[u8])]) -> Vec<(Bytes, Bytes)> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    Bytes::copy_from_slice(k.as_bytes()),
                    Bytes::copy_from_slice(v),
                )
            })
            .collect()
    }

    #[test]
    fn read_reply_keeps_order_repeats_and_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![
                        bulk("b"),
                        bulk("2"),
                        bulk("a"),
                        bulk("1"),
                        bulk("b"),
                        bulk("3"),
                    ]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let parsed = parse_read(&reply).unwrap();
        assert_eq!(parsed.len(), 1);
        let (stream, entries) = &parsed[0];
        assert_eq!(stream, "orders");
        let f = entries[0].fields.as_ref().unwrap();
        let names: Vec<&[u8]> = f.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(names, [b"b".as_ref(), b"a", b"b"]);
        assert_eq!(
            entries[1],
            Entry {
                id: "2-0".into(),
                fields: None
            }
        );
        assert!(parse_read(&Value::Nil).unwrap().is_empty());
        assert!(parse_read(&Value::Int(3)).is_err());
    }

    #[test]
    fn autoclaim_and_pending_replies() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("5-1"),
                Value::Array(vec![bulk("k"), bulk("v")]),
            ])]),
            Value::Array(vec![bulk("4-0")]),
        ]);
        let (cursor, entries) = parse_autoclaim(&reply).unwrap();
        assert_eq!(cursor, "0-0");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "5-1");

        let pending = Value::Array(vec![Value::Array(vec![
            bulk("5-1"),
            bulk("c1"),
            Value::Int(70_000),
            Value::Int(3),
        ])]);
        assert_eq!(parse_delivery_counts(&pending).unwrap()["5-1"], 3);
        let summary = Value::Array(vec![Value::Int(2), bulk("5-1"), bulk("6-0"), Value::Nil]);
        assert_eq!(
            parse_pending_summary(&summary).unwrap(),
            (2, Some("5-1".into()))
        );
        let empty = Value::Array(vec![Value::Int(0), Value::Nil, Value::Nil, Value::Nil]);
        assert_eq!(parse_pending_summary(&empty).unwrap(), (0, None));
    }

    #[test]
    fn group_lag_from_xinfo() {
        let groups = Value::Array(vec![
            Value::Array(vec![
                bulk("name"),
                bulk("other"),
                bulk("lag"),
                Value::Int(9),
            ]),
            Value::Array(vec![
                bulk("name"),
                bulk("g"),
                bulk("pending"),
                Value::Int(1),
                bulk("lag"),
                Value::Int(4),
            ]),
        ]);
        assert_eq!(parse_group_lag(&groups, "g"), Some(4));
        assert_eq!(parse_group_lag(&groups, "missing"), None);
        let unknown = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("g"),
            bulk("lag"),
            Value::Nil,
        ])]);
        assert_eq!(parse_group_lag(&unknown, "g"), None);
    }

    #[test]
    fn consumers_from_xinfo() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("host-1a2b"),
            bulk("pending"),
            Value::Int(2),
            bulk("idle"),
            Value::Int(83_000),
            bulk("inactive"),
            Value::Int(83_000),
        ])]);
        assert_eq!(
            parse_consumers(&reply),
            [("host-1a2b".to_owned(), 2, 83_000)]
        );
        assert!(parse_consumers(&Value::Nil).is_empty());
    }

    #[test]
    fn body_field_content_type_and_headers() {
        let f = fields(&[
            ("payload", b"hello"),
            ("ct", b"text/plain"),
            ("user", b"u1"),
        ]);
        let shaped =
            shape(Some("payload"), Ordering::Key).message("orders", "1700000000000-3", &f, 1);
        let m = shaped.message;
        assert!(!shaped.body_field_missing);
        assert_eq!(m.payload.as_ref(), b"hello");
        assert_eq!(m.id, "orders/1700000000000-3");
        assert_eq!(m.content_type.as_ref().unwrap(), "text/plain");
        assert_eq!(m.headers.get("x-redis-stream").unwrap(), "orders");
        assert_eq!(m.headers.get("x-redis-id").unwrap(), "1700000000000-3");
        assert_eq!(m.ordering_key.as_deref(), Some(b"u1".as_ref()));
        assert_eq!(m.subject.as_deref(), Some("u1"));
        assert_eq!(m.prior_attempts, 0);
        assert_eq!(
            m.time.unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)
        );
        assert!(
            m.coordinates
                .contains(&("id".into(), "1700000000000-3".into()))
        );
    }

    #[test]
    fn missing_body_field_falls_back_to_json() {
        let f = fields(&[("a", b"1"), ("bin", &[0xff, 0x00]), ("a", b"\"q\"")]);
        let shaped = shape(Some("payload"), Ordering::None).message("s", "1-0", &f, 4);
        assert!(shaped.body_field_missing);
        let m = shaped.message;
        assert_eq!(
            std::str::from_utf8(&m.payload).unwrap(),
            r#"{"a":"1","bin":"/wA=","a":"\"q\""}"#
        );
        assert_eq!(m.content_type.as_ref().unwrap(), "application/json");
        assert_eq!(m.headers.get("x-redis-base64-fields").unwrap(), "bin");
        assert_eq!(m.prior_attempts, 3);
        // The stream's lane even without ordering: a function may ask for it.
        assert!(m.ordering_key.is_some());
    }

    #[test]
    fn lanes_per_stream_without_key() {
        let f = fields(&[("x", b"1")]);
        let a = shape(None, Ordering::Key)
            .message("s1", "1-0", &f, 1)
            .message;
        let b = shape(None, Ordering::Partition)
            .message("s1", "2-0", &f, 1)
            .message;
        assert_eq!(a.ordering_key, b.ordering_key);
        assert!(a.ordering_key.is_some());
        let c = shape(None, Ordering::Partition)
            .message("s2", "2-0", &f, 1)
            .message;
        assert_ne!(a.ordering_key, c.ordering_key);
    }
}
