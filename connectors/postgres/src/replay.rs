//! `postgres-connector replay`: the rows of `dead_letter_table` back to their functions,
//! through the SDK's [`Replayer`], oldest first.
//!
//! Only rows present when the replay started are read (up to the highest `id` then), a
//! hundred at a time. A delivered letter's row is deleted; one that fails again, is
//! skipped or only listed (`--dry-run`) stays as it is.

use std::io::Write;

use bytes::Bytes;
use connector_sdk::replay::{
    DeadLetterStore, DecodeError, Provenance, ReplayArgs, ReplayLetter, Replayer, StoreError,
    StoredLetter, Summary,
};
use tokio_postgres::{Client, Row};

use crate::config::Config;
use crate::{Error, NAME, quote_ident};

/// Replays the dead letters of `config`, writing progress and the summary to `out`.
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

/// The dead-letter table of `config`, to read from the oldest letter (for `replay` and the
/// admin API).
pub async fn open(config: &Config) -> Result<TableStore, Error> {
    let p = &config.postgres;
    if p.dead_letter_table.is_empty() {
        return Err(Error::Setup(
            "nothing to replay: no postgres.dead_letter_table is configured".to_owned(),
        ));
    }
    let client = crate::connect(p).await?;
    let table = quote_ident(&p.dead_letter_table);
    let last: Option<i64> = client
        .query_one(&format!("SELECT max(id) FROM {table}"), &[])
        .await?
        .get(0);
    let store = TableStore {
        select: format!(
            "SELECT id, topic, content_type, headers, provenance, body FROM {table} WHERE id > $1 AND id <= $2 ORDER BY id LIMIT 100"
        ),
        delete: format!("DELETE FROM {table} WHERE id = $1"),
        client,
        after: 0,
        last: last.unwrap_or(0),
        table: p.dead_letter_table.clone(),
        source: crate::source_uri(p),
    };
    Ok(store)
}

/// The dead-letter table, read once through.
pub struct TableStore {
    client: Client,
    select: String,
    delete: String,
    /// The last `id` read.
    after: i64,
    /// The highest `id` when the replay started.
    last: i64,
    table: String,
    source: String,
}

#[async_trait::async_trait]
impl DeadLetterStore for TableStore {
    type Handle = i64;

    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<i64>>, StoreError> {
        let rows = self
            .client
            .query(&self.select, &[&self.after, &self.last])
            .await
            .map_err(|e| StoreError::new(format!("reading {}: {e}", self.table)))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.get(0);
            self.after = id;
            out.push(StoredLetter {
                location: format!("{}#{id}", self.table),
                letter: decode(&row, &self.source),
                handle: id,
            });
        }
        Ok(out)
    }

    async fn remove(&mut self, id: i64) -> Result<(), StoreError> {
        self.client
            .execute(&self.delete, &[&id])
            .await
            .map(|_| ())
            .map_err(StoreError::new)
    }
}

/// The original message and function of a row (the inverse of the sink's insert).
fn decode(row: &Row, source: &str) -> Result<ReplayLetter, DecodeError> {
    let text = |value: serde_json::Value| -> Vec<(String, String)> {
        match value {
            serde_json::Value::Object(map) => map
                .into_iter()
                .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
                .collect(),
            _ => Vec::new(),
        }
    };
    let malformed = |e: tokio_postgres::Error| DecodeError::Malformed(e.to_string());
    let headers = text(row.try_get("headers").map_err(malformed)?);
    let pairs = text(row.try_get("provenance").map_err(malformed)?);
    let body: Vec<u8> = row.try_get("body").map_err(malformed)?;
    let content_type: Option<String> = row.try_get("content_type").map_err(malformed)?;
    let provenance = Provenance::parse(&pairs)?;
    let topic = provenance.topic.clone();
    let mut message = provenance
        .message(Bytes::from(body), source)
        .with_ordering_key(Bytes::copy_from_slice(topic.as_bytes()));
    if let Some(table) = provenance.coordinate("table") {
        message = message.with_subject(table);
    }
    if let Some(ct) = content_type {
        message = message.with_content_type(&ct);
    }
    for (name, value) in &headers {
        message.add_header(name, value);
    }
    Ok(ReplayLetter::new(message, provenance))
}
