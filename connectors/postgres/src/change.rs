//! From a decoded row change to the SDK's [`Message`]: what a function sees.
//!
//! | request | from |
//! | --- | --- |
//! | body (`body = "change"`) | `{"op": "insert"\|"update"\|"delete"\|"truncate", "schema", "table", "lsn", "new": {column: value}, "old": {column: value}}` |
//! | body (`body = "column"`) | the value of `body_column` (of `new`, or `old` for a delete): raw bytes for `bytea`, else its text |
//! | `Content-Type` | `application/json` for `change`, none for `column` (unless `connector.content_type`) |
//! | `X-Topic` | the table's topic (`table_topics`, else `table` in `public`, `schema.table` elsewhere) |
//! | `ce-id` | `<slot>/<commit LSN>/<n>`, the `n`th change of its transaction: the same on every replay |
//! | `ce-time` | the transaction's commit time |
//! | `ce-subject` | `schema.table` |
//! | `X-Postgres-Table`, `X-Postgres-Operation`, `X-Postgres-Lsn` | `schema.table`, the op, the commit LSN |
//!
//! Values are PostgreSQL's text output, typed in JSON where the type says how: `bool` as
//! `true`/`false`, integers and floats as numbers, `json`/`jsonb` embedded, `NULL` as
//! `null`; everything else (numeric, timestamps, arrays, ...) as a string. An unchanged
//! TOASTed value of an update is left out of `new`. `old` is present for updates and
//! deletes when the table's replica identity sends it (the key columns by default,
//! every column with `REPLICA IDENTITY FULL`). The ordering key is the table, so with
//! `ordering = "key"` one table's changes arrive in commit order.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use connector_sdk::Message;
use pg_walstream::{RelationInfo, TupleData};
use serde_json::{Map, Value};

use crate::config::{Body, PgConfig};

/// `X-Postgres-Table`.
pub const TABLE_HEADER: &str = "X-Postgres-Table";
/// `X-Postgres-Operation`.
pub const OPERATION_HEADER: &str = "X-Postgres-Operation";
/// `X-Postgres-Lsn`.
pub const LSN_HEADER: &str = "X-Postgres-Lsn";

/// One change of a transaction, decoded.
#[derive(Debug)]
pub struct Change<'a> {
    /// `insert`, `update`, `delete` or `truncate` (no row).
    pub op: &'static str,
    /// The table, as its latest `Relation` message described it.
    pub relation: &'a RelationInfo,
    /// The new row (insert, update).
    pub new: Option<&'a TupleData>,
    /// The old row or its key (update, delete), as the replica identity sends it.
    pub old: Option<&'a TupleData>,
}

/// Where a change sits: its transaction and place in it.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The slot (part of `ce-id`).
    pub slot: &'a str,
    /// `ce-source`.
    pub source: &'a str,
    /// The transaction's commit LSN.
    pub lsn: u64,
    /// The change's index in its transaction.
    pub seq: u32,
    /// The commit time, microseconds since 2000-01-01.
    pub commit_micros: i64,
}

/// An LSN as PostgreSQL writes it: `16/B374D848`.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The message a change becomes.
pub fn message(change: &Change<'_>, place: &Place<'_>, config: &PgConfig) -> Message {
    let r = change.relation;
    let table = format!("{}.{}", r.namespace, r.relation_name);
    let topic = config.topic(&r.namespace, &r.relation_name);
    let lsn = lsn_text(place.lsn);
    let (payload, json) = match config.body {
        Body::Change => {
            let mut body = Map::new();
            body.insert("op".into(), change.op.into());
            body.insert("schema".into(), Value::from(&*r.namespace));
            body.insert("table".into(), Value::from(&*r.relation_name));
            body.insert("lsn".into(), Value::from(lsn.as_str()));
            for (key, tuple) in [("new", change.new), ("old", change.old)] {
                if let Some(tuple) = tuple {
                    body.insert(key.into(), row(r, tuple));
                }
            }
            (Bytes::from(Value::Object(body).to_string()), true)
        }
        Body::Column => {
            let tuple = change.new.or(change.old);
            (
                tuple
                    .and_then(|t| column(r, t, &config.body_column))
                    .unwrap_or_default(),
                false,
            )
        }
    };
    let id = format!("{}/{lsn}/{}", place.slot, place.seq);
    let mut message = Message::new(topic.clone(), payload, id, place.source)
        .with_subject(&table)
        .with_ordering_key(Bytes::from(topic))
        .with_time(commit_time(place.commit_micros))
        .with_coordinate("table", &table)
        .with_coordinate("lsn", &lsn)
        .with_coordinate("change", place.seq);
    if json {
        message = message.with_content_type("application/json");
    }
    message.add_header(TABLE_HEADER, &table);
    message.add_header(OPERATION_HEADER, change.op);
    message.add_header(LSN_HEADER, &lsn);
    message
}

/// The commit time: PostgreSQL counts microseconds from 2000-01-01.
fn commit_time(micros: i64) -> SystemTime {
    const PG_EPOCH: Duration = Duration::from_secs(946_684_800);
    let base = SystemTime::UNIX_EPOCH + PG_EPOCH;
    if micros >= 0 {
        base + Duration::from_micros(micros.unsigned_abs())
    } else {
        base - Duration::from_micros(micros.unsigned_abs())
    }
}

/// A row as a JSON object, typed where the column type says how.
fn row(relation: &RelationInfo, tuple: &TupleData) -> Value {
    let mut out = Map::new();
    for (info, data) in relation.columns.iter().zip(tuple.columns.iter()) {
        let value = match data.data_type {
            b'u' => continue,
            b't' => typed(info.type_id, &String::from_utf8_lossy(data.as_bytes())),
            _ => Value::Null,
        };
        out.insert(info.name.to_string(), value);
    }
    Value::Object(out)
}

/// One text-format value as JSON, by type OID.
fn typed(type_id: u32, text: &str) -> Value {
    const BOOL: u32 = 16;
    const INTS: [u32; 3] = [20, 21, 23];
    const FLOATS: [u32; 2] = [700, 701];
    const JSON: [u32; 2] = [114, 3802];
    let parsed = match type_id {
        BOOL => Some(Value::Bool(text == "t")),
        t if INTS.contains(&t) => text.parse::<i64>().ok().map(Value::from),
        t if FLOATS.contains(&t) => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number),
        t if JSON.contains(&t) => serde_json::from_str(text).ok(),
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::from(text))
}

/// The raw value of column `name`: bytes for `bytea` (sent as `\x` hex), else the text.
fn column(relation: &RelationInfo, tuple: &TupleData, name: &str) -> Option<Bytes> {
    const BYTEA: u32 = 17;
    let index = relation.columns.iter().position(|c| &*c.name == name)?;
    let data = tuple.columns.get(index).filter(|d| d.data_type == b't')?;
    let raw = data.as_bytes();
    if relation.columns[index].type_id == BYTEA
        && let Some(hex) = raw.strip_prefix(b"\\x")
    {
        return hex::decode(hex).ok().map(Bytes::from);
    }
    Some(Bytes::copy_from_slice(raw))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pg_walstream::{ColumnData, ColumnInfo};

    fn relation() -> RelationInfo {
        let columns = [
            ("id", 23),
            ("ok", 16),
            ("doc", 3802),
            ("blob", 17),
            ("note", 25),
        ]
        .into_iter()
        .map(|(name, oid)| ColumnInfo::new(0, name.into(), oid, -1))
        .collect();
        RelationInfo::new(16384, "public", "orders", b'd', columns)
    }

    fn tuple(values: [Option<&str>; 5]) -> TupleData {
        TupleData::new(
            values
                .into_iter()
                .map(|v| {
                    let mut c = ColumnData::text(v.unwrap_or_default().as_bytes().to_vec());
                    match v {
                        Some("TOAST") => c.data_type = b'u',
                        None => c.data_type = b'n',
                        Some(_) => {}
                    }
                    c
                })
                .collect(),
        )
    }

    fn place() -> Place<'static> {
        Place {
            slot: "s",
            source: "postgres://h:5432/db",
            lsn: (1 << 32) | 0xAB,
            seq: 2,
            commit_micros: 1_000_000,
        }
    }

    #[test]
    fn a_change_becomes_json_with_typed_values() {
        let r = relation();
        let new = tuple([
            Some("7"),
            Some("t"),
            Some("{\"a\":1}"),
            Some("\\x6869"),
            None,
        ]);
        let old = tuple([Some("7"), None, None, None, Some("TOAST")]);
        let change = Change {
            op: "update",
            relation: &r,
            new: Some(&new),
            old: Some(&old),
        };
        let m = message(&change, &place(), &PgConfig::default());
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "op": "update", "schema": "public", "table": "orders", "lsn": "1/AB",
                "new": {"id": 7, "ok": true, "doc": {"a": 1}, "blob": "\\x6869", "note": null},
                "old": {"id": 7, "ok": null, "doc": null, "blob": null},
            })
        );
        assert_eq!(m.topic, "orders");
        assert_eq!(m.id, "s/1/AB/2");
        assert_eq!(m.subject.as_deref(), Some("public.orders"));
        assert_eq!(m.headers.get(OPERATION_HEADER).unwrap(), "update");
        assert_eq!(
            m.time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_801))
        );
    }

    #[test]
    fn the_body_column_alone() {
        let r = relation();
        let row = tuple([Some("1"), None, None, Some("\\x6869"), Some("text")]);
        let change = Change {
            op: "delete",
            relation: &r,
            new: None,
            old: Some(&row),
        };
        let mut config = PgConfig {
            body: Body::Column,
            body_column: "blob".into(),
            ..PgConfig::default()
        };
        assert_eq!(&message(&change, &place(), &config).payload[..], b"hi");
        config.body_column = "note".into();
        let m = message(&change, &place(), &config);
        assert_eq!(&m.payload[..], b"text");
        assert!(m.content_type.is_none());
    }
}
