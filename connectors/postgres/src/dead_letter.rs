//! Dead letters: one row each in `dead_letter_table`, committed before the original is
//! acknowledged. A failed insert is an error: the dispatcher tries again and then holds
//! the change (the slot stays at it).
//!
//! ```sql
//! CREATE TABLE faas_dead_letters (
//!   id bigserial PRIMARY KEY,
//!   failed_at timestamptz NOT NULL,  -- the last failure
//!   function text NOT NULL,
//!   topic text NOT NULL,
//!   status integer,                  -- the last HTTP status, if any
//!   reason text NOT NULL,            -- rejected | exhausted
//!   message_id text NOT NULL,        -- ce-id
//!   content_type text,
//!   headers jsonb NOT NULL,          -- the headers the function received
//!   provenance jsonb NOT NULL,       -- every x-dead-letter-* pair (coordinates, attempts, ...)
//!   body bytea NOT NULL
//! );
//! ```
//!
//! Created with `create` on; otherwise it must exist with these columns. The insert has
//! a connection of its own, opened on first use and again after a failure.

use std::collections::BTreeMap;

use connector_sdk::{DeadLetter, DeadLetterError, DeadLetterSink};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::config::PgConfig;
use crate::quote_ident;

/// The dead-letter table as a [`DeadLetterSink`].
pub struct TableDeadLetters {
    config: PgConfig,
    insert: String,
    client: Mutex<Option<Client>>,
}

/// `CREATE TABLE IF NOT EXISTS` for `table`.
pub fn create_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, failed_at timestamptz NOT NULL, function text NOT NULL, topic text NOT NULL, status integer, reason text NOT NULL, message_id text NOT NULL, content_type text, headers jsonb NOT NULL, provenance jsonb NOT NULL, body bytea NOT NULL)",
        quote_ident(table)
    )
}

/// Pairs as a JSON object (a repeated name keeps its last value).
pub fn object<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> serde_json::Value {
    let map: BTreeMap<&str, &str> = pairs.into_iter().collect();
    serde_json::json!(map)
}

impl TableDeadLetters {
    /// A sink for `config.dead_letter_table`; connects on first use.
    pub fn new(config: &PgConfig) -> Self {
        Self {
            insert: format!(
                "INSERT INTO {} (failed_at, function, topic, status, reason, message_id, content_type, headers, provenance, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                quote_ident(&config.dead_letter_table)
            ),
            config: config.clone(),
            client: Mutex::new(None),
        }
    }

    async fn write_row(&self, letter: &DeadLetter) -> Result<(), crate::Error> {
        let mut client = self.client.lock().await;
        if client.as_ref().is_none_or(Client::is_closed) {
            let fresh = crate::connect(&self.config).await?;
            if self.config.create {
                fresh
                    .batch_execute(&create_sql(&self.config.dead_letter_table))
                    .await?;
            }
            *client = Some(fresh);
        }
        let Some(sql) = client.as_ref() else {
            return Err(crate::Error::Setup("no connection".to_owned()));
        };
        let m = &letter.message;
        let headers = object(
            m.headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
        );
        let pairs = letter.provenance();
        let provenance = object(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let status = letter.status.map(i32::from);
        let content_type = m.content_type.as_ref().and_then(|v| v.to_str().ok());
        let result = sql
            .execute(
                &self.insert,
                &[
                    &letter.last_failure,
                    &letter.function.to_string(),
                    &m.topic,
                    &status,
                    &letter.reason.as_str(),
                    &m.id,
                    &content_type,
                    &headers,
                    &provenance,
                    &&m.payload[..],
                ],
            )
            .await;
        if let Err(e) = result {
            *client = None;
            return Err(e.into());
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl DeadLetterSink for TableDeadLetters {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        match tokio::time::timeout(self.config.command_timeout, self.write_row(letter)).await {
            Ok(result) => result.map_err(|e| {
                DeadLetterError::new(format!(
                    "inserting into {}: {e}",
                    self.config.dead_letter_table
                ))
            }),
            Err(_) => {
                *self.client.lock().await = None;
                Err(DeadLetterError::new(format!(
                    "inserting into {}: no answer within {:?}",
                    self.config.dead_letter_table, self.config.command_timeout
                )))
            }
        }
    }
}
