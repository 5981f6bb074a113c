//! PostgreSQL for end-to-end tests: a table per topic (`id bigserial`, `payload bytea`),
//! a publication and a logical replication slot of its own (`it_<topic>`), dead letters
//! in a table of the fixture's own, as a [`Fixture`] and [`ReplayFixture`]. The connector
//! runs in replication mode with `body = "column"`, so each row's `payload` is the body
//! the suite compares.
//!
//! What is unacknowledged is counted from WAL positions: each produced row is its own
//! transaction, and the server's WAL position right after its commit is kept; a row is
//! acknowledged once the slot's `confirmed_flush_lsn` reaches that position.
//!
//! Dropped, the fixture drops what it created (slots first: an abandoned slot retains
//! WAL), waiting a bounded time for a killed connector's walsender to let go of a slot.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::replay::ReplayFixture;
use crate::scenarios::Fixture;

/// `POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn postgres_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A SQL connection of the test's own.
pub async fn connect() -> Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), NoTls)
        .await
        .expect("PostgreSQL at POSTGRES_URL");
    tokio::spawn(connection);
    client
}

/// `name` quoted as an identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The slot and publication name of `topic`.
pub fn slot_of(topic: &str) -> String {
    format!("it_{}", topic.replace('-', "_"))
}

/// Tables named after their topics on `POSTGRES_URL`.
pub struct PgTables {
    dead_letter_table: String,
    /// `postgres.body`.
    body: &'static str,
    /// Extra lines for the `[postgres]` section.
    extra: String,
    /// Per topic, the WAL position after each produced row's commit.
    produced: Mutex<HashMap<String, Vec<i64>>>,
    created: Mutex<Vec<String>>,
}

impl Default for PgTables {
    fn default() -> Self {
        Self::new()
    }
}

impl PgTables {
    /// A fixture with a dead-letter table of its own.
    pub fn new() -> Self {
        Self {
            dead_letter_table: crate::unique("it_dead").replace('-', "_"),
            body: "column",
            extra: String::new(),
            produced: Mutex::default(),
            created: Mutex::default(),
        }
    }

    /// With `body = "change"`: the change as JSON.
    #[must_use]
    pub fn json_body(mut self) -> Self {
        self.body = "change";
        self
    }

    /// With `extra` (TOML lines) at the end of the `[postgres]` section.
    #[must_use]
    pub fn with_extra_config(mut self, extra: &str) -> Self {
        extra.clone_into(&mut self.extra);
        self
    }

    /// The dead-letter table.
    pub fn dead_letter_table(&self) -> &str {
        &self.dead_letter_table
    }

    /// The `[postgres]` section for `topic`, with `dead_letter_table`.
    pub fn section(&self, topic: &str, dead_letter_table: &str) -> String {
        format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\nbody = \"{body}\"\nbody_column = \"payload\"\ndead_letter_table = \"{dead_letter_table}\"\nhold_delay = \"1s\"\nmetrics_interval = \"1s\"\n{extra}\n",
            url = postgres_url(),
            slot = slot_of(topic),
            extra = self.extra,
            body = self.body,
        )
    }

    /// Inserts `payloads` into `topic`'s table, one transaction each, in order.
    pub async fn insert(&self, client: &Client, topic: &str, payloads: &[Vec<u8>]) {
        let insert = format!("INSERT INTO {} (payload) VALUES ($1)", ident(topic));
        let mut positions = Vec::with_capacity(payloads.len());
        for p in payloads {
            client.execute(&insert, &[p]).await.unwrap();
            let row = client
                .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
                .await
                .unwrap();
            positions.push(row.get::<_, i64>(0));
        }
        self.produced
            .lock()
            .unwrap()
            .entry(topic.to_owned())
            .or_default()
            .extend(positions);
    }

    /// The slot's confirmed position (`0` when it has none).
    pub async fn confirmed(client: &Client, topic: &str) -> i64 {
        client
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot_of(topic)],
            )
            .await
            .unwrap()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .unwrap_or(0)
    }

    fn cleanup(&self) -> Vec<String> {
        let mut sql = Vec::new();
        for topic in self.created.lock().unwrap().iter() {
            let slot = slot_of(topic);
            sql.push(format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"
            ));
            sql.push(format!("DROP PUBLICATION IF EXISTS {slot}"));
            sql.push(format!("DROP TABLE IF EXISTS {}", ident(topic)));
        }
        sql.push(format!(
            "DROP TABLE IF EXISTS {}",
            ident(&self.dead_letter_table)
        ));
        sql
    }
}

impl Drop for PgTables {
    fn drop(&mut self) {
        let statements = self.cleanup();
        let slots: Vec<String> = self
            .created
            .lock()
            .unwrap()
            .iter()
            .map(|t| slot_of(t))
            .collect();
        // A runtime of its own on a thread of its own: drop may run inside the test's.
        let dropped = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let client = connect().await;
                // A killed connector's walsender lets go of its slot within moments.
                let deadline = Instant::now() + Duration::from_secs(15);
                loop {
                    let active: i64 = client
                        .query_one(
                            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($1) AND active",
                            &[&slots],
                        )
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0);
                    if active == 0 || Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                for sql in statements {
                    if let Err(e) = client.batch_execute(&sql).await {
                        eprintln!("cleanup {sql}: {e}");
                    }
                }
            });
        });
        let _ = dropped.join();
    }
}

#[async_trait::async_trait]
impl Fixture for PgTables {
    fn binary(&self) -> PathBuf {
        crate::binary("postgres-connector", "postgres-connector")
    }

    async fn create_topic(&self, topic: &str) {
        let client = connect().await;
        let slot = slot_of(topic);
        self.created.lock().unwrap().push(topic.to_owned());
        client
            .batch_execute(&format!(
                "CREATE TABLE {t} (id bigserial PRIMARY KEY, payload bytea NOT NULL); CREATE PUBLICATION {slot} FOR TABLE {t}",
                t = ident(topic)
            ))
            .await
            .unwrap();
        client
            .query(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
    }

    fn source_config(&self, topic: &str) -> String {
        self.section(topic, &self.dead_letter_table)
    }

    fn source_config_without_dead_letters(&self, topic: &str) -> String {
        self.section(topic, "")
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        let client = connect().await;
        self.insert(&client, topic, payloads).await;
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        let client = connect().await;
        let query = format!(
            "SELECT body FROM {} WHERE topic = $1 ORDER BY id",
            ident(&self.dead_letter_table)
        );
        match client.query(&query, &[&topic]).await {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            // Not created yet: no dead letter was written.
            Err(_) => Vec::new(),
        }
    }

    async fn unacknowledged(&self, topic: &str) -> u64 {
        let client = connect().await;
        let confirmed = Self::confirmed(&client, topic).await;
        let produced = self.produced.lock().unwrap();
        produced
            .get(topic)
            .map_or(0, |p| p.iter().filter(|&&at| at > confirmed).count() as u64)
    }
}

#[async_trait::async_trait]
impl ReplayFixture for PgTables {
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.dead_letters(topic).await
    }
}
