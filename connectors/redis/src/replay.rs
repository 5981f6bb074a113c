//! `redis-connector replay`: dead-letter streams read back with XRANGE and replayed
//! through the SDK's [`Replayer`]; a delivered letter is removed with XDEL.
//!
//! The dead-letter streams are `dead_letter_stream` with `{stream}` replaced by each
//! configured topic (or, with no `topics`, each topic of the gateway's functions), read
//! oldest first up to the last entry present when the replay started. No consumer group
//! is involved: a letter that fails again simply stays in its stream.
//!
//! The replayed message is the original one: the `payload` field, `content-type`, the
//! `header:<name>` fields (`X-Redis-Stream`, `X-Redis-Id`, `X-Redis-Group`, ...) as
//! request headers, `ce-id` `<stream>/<entry id>` and `ce-time` from the original entry id.

use std::collections::VecDeque;
use std::io::Write;

use bytes::Bytes;
use connector_sdk::replay::{
    self, DeadLetterStore, DecodeError, Provenance, ReplayArgs, ReplayLetter, Replayer, StoreError,
    StoredLetter, Summary,
};
use redis::aio::ConnectionManager;

use crate::dead_letter::dead_letter_stream;
use crate::entry::{self, Entry, entry_time};
use crate::{Config, Error, Mode, NAME, client, source_uri};

/// Entries read per XRANGE.
const BATCH: usize = 100;

/// Replays the dead letters of `config`'s streams, writing progress and the summary to
/// `out`.
pub async fn run(
    config: &Config,
    args: ReplayArgs,
    out: &mut (dyn Write + Send),
) -> Result<Summary, Error> {
    let store = open(config).await?;
    let replayer = Replayer::new(NAME, &config.connector, args)?;
    replayer.stop_on_signals()?;
    Ok(replayer.run(store, out).await?)
}

/// The dead-letter streams of `config`, to read from the oldest letter (for `replay` and
/// the admin API).
pub async fn open(config: &Config) -> Result<StreamStore, Error> {
    let r = &config.redis;
    if r.mode == Mode::Pubsub || r.dead_letter_stream.is_empty() {
        return Err(Error::ReplaySetup(
            "nothing to replay: dead letters are written only in streams mode with a dead_letter_stream"
                .to_owned(),
        ));
    }
    let client = client(r)?;
    let source = source_uri(&client);
    let manager_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(r.command_timeout))
        .set_response_timeout(Some(r.command_timeout));
    let conn = client
        .get_connection_manager_with_config(manager_config)
        .await
        .map_err(|e| Error::ReplaySetup(format!("connecting to Redis: {e}")))?;
    let mut streams: Vec<String> = replay::topics(NAME, &config.connector)
        .await?
        .iter()
        .map(|topic| dead_letter_stream(&r.dead_letter_stream, topic))
        .collect();
    // A template without `{stream}` names one stream for every topic.
    streams.dedup();
    Ok(StreamStore {
        conn,
        source,
        streams: streams.into(),
        current: None,
    })
}

/// The dead-letter streams, one after another.
pub struct StreamStore {
    conn: ConnectionManager,
    /// `ce-source` prefix.
    source: String,
    /// Streams not started yet.
    streams: VecDeque<String>,
    /// The stream being read: its name, the last id read, the last id present at start.
    current: Option<Cursor>,
}

struct Cursor {
    stream: String,
    after: Option<String>,
    end: String,
}

/// A letter's place: the stream and the entry id.
pub struct Handle {
    stream: String,
    id: String,
}

impl StreamStore {
    /// Moves to the next non-empty stream; `false` when none is left.
    async fn open_next(&mut self) -> Result<bool, StoreError> {
        while let Some(stream) = self.streams.pop_front() {
            let last: redis::Value = redis::cmd("XREVRANGE")
                .arg(&stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| StoreError::new(format!("XREVRANGE {stream}: {e}")))?;
            let last = entry::parse_entries("XREVRANGE", &last).map_err(StoreError::new)?;
            if let Some(end) = last.into_iter().next() {
                self.current = Some(Cursor {
                    stream,
                    after: None,
                    end: end.id,
                });
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[async_trait::async_trait]
impl DeadLetterStore for StreamStore {
    type Handle = Handle;

    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<Handle>>, StoreError> {
        loop {
            if self.current.is_none() && !self.open_next().await? {
                return Ok(Vec::new());
            }
            let Some(cursor) = self.current.as_mut() else {
                continue;
            };
            let start = match &cursor.after {
                Some(id) => format!("({id}"),
                None => "-".to_owned(),
            };
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(&cursor.stream)
                .arg(start)
                .arg(&cursor.end)
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| StoreError::new(format!("XRANGE {}: {e}", cursor.stream)))?;
            let entries = entry::parse_entries("XRANGE", &reply).map_err(StoreError::new)?;
            let Some(last) = entries.last() else {
                self.current = None;
                continue;
            };
            cursor.after = Some(last.id.clone());
            let stream = cursor.stream.clone();
            return Ok(entries
                .into_iter()
                .map(|e| StoredLetter {
                    location: format!("{stream} {}", e.id),
                    letter: decode(&self.source, &e),
                    handle: Handle {
                        stream: stream.clone(),
                        id: e.id,
                    },
                })
                .collect());
        }
    }

    async fn remove(&mut self, handle: Handle) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("XDEL")
            .arg(&handle.stream)
            .arg(&handle.id)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| StoreError::new(format!("XDEL {} {}: {e}", handle.stream, handle.id)))?;
        Ok(())
    }
}

/// The original message and function of a dead-letter entry (the inverse of
/// `StreamDeadLetters::command`).
fn decode(source: &str, entry: &Entry) -> Result<ReplayLetter, DecodeError> {
    let fields = entry
        .fields
        .as_deref()
        .ok_or_else(|| DecodeError::Malformed("the entry was deleted".to_owned()))?;
    let text = |v: &Bytes| String::from_utf8_lossy(v).into_owned();
    let pairs: Vec<(String, String)> = fields.iter().map(|(k, v)| (text(k), text(v))).collect();
    let provenance = Provenance::parse(&pairs)?;
    let payload = fields
        .iter()
        .find(|(k, _)| k.as_ref() == b"payload")
        .map(|(_, v)| v.clone())
        .ok_or(DecodeError::Missing("payload"))?;
    let stream = provenance
        .coordinate("stream")
        .unwrap_or(&provenance.topic)
        .to_owned();
    let mut message = provenance
        .message(payload, format!("{source}/{stream}"))
        .with_event_type("redis.stream.entry");
    if let Some(time) = provenance.coordinate("id").and_then(entry_time) {
        message = message.with_time(time);
    }
    for (name, value) in &pairs {
        if name == "content-type" {
            message = message.with_content_type(value);
        } else if let Some(header) = name.strip_prefix("header:") {
            message.add_header(header, value);
        }
    }
    Ok(ReplayLetter::new(message, provenance))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use connector_sdk::dead_letter::{DeadLetter, DeadLetterReason};
    use connector_sdk::{FunctionRef, Message};

    use super::*;
    use crate::dead_letter::StreamDeadLetters;

    /// What `StreamDeadLetters` writes decodes back to the original message.
    #[tokio::test]
    async fn decodes_what_the_sink_writes() {
        let mut original = Message::new(
            "orders",
            "{\"a\":1}",
            "orders/1700000000000-0",
            "redis://h:6379/0/orders",
        )
        .with_coordinate("stream", "orders")
        .with_coordinate("id", "1700000000000-0")
        .with_coordinate("group", "g")
        .with_content_type("application/json");
        original.add_header("X-Redis-Stream", "orders");
        original.add_header("X-Redis-Id", "1700000000000-0");
        let letter = DeadLetter {
            message: Arc::new(original.clone()),
            function: FunctionRef::new("f", Some("ns")),
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: None,
            response_excerpt: Bytes::new(),
            attempts: 1,
            first_failure: SystemTime::UNIX_EPOCH,
            last_failure: SystemTime::UNIX_EPOCH,
        };
        // The sink's own XADD; nothing connects (the manager is lazy).
        let conn = redis::Client::open("redis://127.0.0.1:1")
            .unwrap()
            .get_connection_manager_lazy(redis::aio::ConnectionManagerConfig::new())
            .unwrap();
        let metrics = crate::metrics::RedisMetrics::register(&mut Default::default());
        let sink = StreamDeadLetters::new(conn, "{stream}:dead-letter", 0, metrics);
        let args: Vec<Bytes> = sink
            .command(&letter)
            .args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(Bytes::copy_from_slice(b)),
                _ => None,
            })
            .collect();
        assert_eq!(&args[..3], ["XADD", "orders:dead-letter", "*"]);
        // After `XADD <stream> *`: the entry's fields.
        let fields = args[3..]
            .chunks(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect();
        let entry = Entry {
            id: "1800000000000-0".into(),
            fields: Some(fields),
        };
        let got = decode("redis://h:6379/0", &entry).unwrap();
        assert_eq!(got.function.as_str(), "f.ns");
        let m = got.message;
        assert_eq!(m.topic, original.topic);
        assert_eq!(m.payload, original.payload);
        assert_eq!(m.id, original.id);
        assert_eq!(m.source, original.source);
        assert_eq!(m.headers, original.headers);
        assert_eq!(m.content_type, original.content_type);
        assert_eq!(m.coordinates, original.coordinates);
        assert_eq!(m.time, entry_time("1700000000000-0"));
    }
}
