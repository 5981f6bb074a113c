//! Logical replication as a [`Source`]: the slot's changes in, the slot's confirmed
//! position out.
//!
//! On (re)connecting, with `create` on, the publication (`FOR TABLE tables`, or `FOR ALL
//! TABLES`) and the slot (`pgoutput`) are created when missing; with it off, a missing
//! slot stops the connector. Then `START_REPLICATION` from the slot's confirmed position
//! (pgwire-replication), each `pgoutput` message decoded by pg_walstream.
//!
//! PostgreSQL sends a transaction whole, at its commit, and on a restart replays every
//! transaction whose commit is at or past the slot's confirmed position. So the position
//! is per transaction: its commit LSN, known from its `Begin`. Each change is registered
//! at that position in a [`Watermark`]; so is the open transaction itself until its
//! `Commit`, after which the frontier is the commit's end. The confirmed position
//! (standby status update, sent within 100 ms) is the watermark's commit point: the
//! commit LSN of the oldest transaction with a change not yet acknowledged, else the end
//! of the last one. An idle stream's keepalive moves the frontier too, so a slot whose
//! tables are quiet does not hold back WAL.
//!
//! | disposition | effect |
//! | --- | --- |
//! | ack: delivered, dead-lettered, dropped, or no function | the change settles; the position may advance |
//! | release: cut short by shutdown | nothing: the change comes again after the restart |
//! | hold (or retry): failed for good and not dead-lettered | after `hold_delay` the stream is read again from the confirmed position, so the change (and those after it) come again |
//!
//! Changes of an abandoned stream (after a hold, or a lost connection) settle into
//! nothing: their stream's generation is gone, and the replay delivers them again. A
//! crash loses nothing either: whatever was not confirmed is replayed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use connector_sdk::watermark::Watermark;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceError};
use futures::FutureExt;
use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser, RelationInfo};
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use tokio_util::sync::DropGuard;

use crate::change::{self, Change, Place};
use crate::config::PgConfig;
use crate::metrics::PgMetrics;
use crate::{Error, classify, quote_ident};

/// How often, at most, the confirmed position is sent when it moved: a small message, so
/// often enough that the slot trails the deliveries by a fraction of a second.
const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// Most events turned into messages per `pull`.
const BATCH: usize = 256;

/// What settling one change needs: its stream and its transaction's commit LSN.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    generation: u64,
    lsn: u64,
}

/// The transaction being received.
struct Open {
    lsn: u64,
    commit_micros: i64,
    seq: u32,
}

/// The live replication stream.
struct Stream {
    client: ReplicationClient,
    _lag: DropGuard,
}

/// The slot as a [`Source`].
pub struct ReplicationSource {
    config: PgConfig,
    metrics: PgMetrics,
    source: String,
    stream: Option<Stream>,
    parser: LogicalReplicationParser,
    relations: HashMap<u32, RelationInfo>,
    marks: Watermark<u64>,
    generation: u64,
    open: Option<Open>,
    /// A held change: read the stream again from the confirmed position at this time.
    rewind_at: Option<Instant>,
    /// With `topics` configured, the only topics delivered; other tables' changes are
    /// passed over (acknowledged), as a broker connector never reads unlisted topics.
    only: Option<HashSet<String>>,
}

impl ReplicationSource {
    /// A source for `config`; connects on the first `pull`.
    pub fn new(config: PgConfig, topics: &[String], metrics: PgMetrics) -> Self {
        Self {
            only: (!topics.is_empty()).then(|| topics.iter().cloned().collect()),
            source: crate::source_uri(&config),
            config,
            metrics,
            stream: None,
            parser: LogicalReplicationParser::with_protocol_version(1),
            relations: HashMap::new(),
            marks: Watermark::new(),
            generation: 0,
            open: None,
            rewind_at: None,
        }
    }

    /// Creates what is missing (with `create`), then starts streaming.
    async fn open(&mut self) -> Result<Stream, SourceError> {
        self.prepare().await.map_err(classify)?;
        let p = &self.config;
        let pg = p.pg().map_err(|e| SourceError::fatal(Error::Postgres(e)))?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => return Err(SourceError::fatal("postgres.url names no TCP host")),
        };
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let mut cfg = ReplicationConfig::new(
            host,
            pg.get_user().unwrap_or("postgres"),
            password,
            pg.get_dbname().unwrap_or("postgres"),
            &p.slot,
            p.publication.as_str(),
        )
        .with_port(pg.get_ports().first().copied().unwrap_or(5432))
        .with_status_interval(STATUS_INTERVAL)
        .with_application_name(crate::NAME);
        cfg.buffer_events = 4 * BATCH;
        #[cfg(feature = "replication-tls")]
        if p.tls == crate::config::Tls::VerifyFull {
            cfg = cfg.with_tls(pgwire_replication::TlsConfig::verify_full(
                p.tls_ca_file.clone(),
            ));
        }
        let mut client = ReplicationClient::connect(cfg)
            .await
            .map_err(replication_error)?;
        tokio::time::timeout(p.command_timeout, client.wait_started())
            .await
            .map_err(|_| SourceError::transient("START_REPLICATION not answered in time"))?
            .map_err(replication_error)?;
        self.generation += 1;
        self.marks.reset();
        self.relations.clear();
        self.open = None;
        self.parser = LogicalReplicationParser::with_protocol_version(1);
        tracing::info!(slot = %p.slot, publication = %p.publication, "replicating");
        let lag = crate::metrics::measure_lag(p.clone(), self.metrics.clone());
        Ok(Stream { client, _lag: lag })
    }

    /// The publication and slot: created when missing with `create`, else checked.
    async fn prepare(&self) -> Result<(), Error> {
        let p = &self.config;
        let sql = crate::connect(p).await?;
        let exists = async |query: &str, name: &String| -> Result<bool, Error> {
            let n: i64 = sql.query_one(query, &[name]).await?.get(0);
            Ok(n > 0)
        };
        let publication = "SELECT count(*) FROM pg_publication WHERE pubname = $1";
        let slot = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1";
        if !exists(publication, &p.publication).await? {
            if !p.create {
                return Err(Error::Missing(format!("publication {}", p.publication)));
            }
            let tables = if p.tables.is_empty() {
                "ALL TABLES".to_owned()
            } else {
                let list: Vec<String> = p.tables.iter().map(|t| quote_ident(t)).collect();
                format!("TABLE {}", list.join(", "))
            };
            sql.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR {tables}",
                p.publication
            ))
            .await?;
            tracing::info!(publication = %p.publication, "publication created");
        }
        if !exists(slot, &p.slot).await? {
            if !p.create {
                return Err(Error::Missing(format!("replication slot {}", p.slot)));
            }
            sql.query(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&p.slot],
            )
            .await?;
            tracing::info!(slot = %p.slot, "replication slot created");
        }
        Ok(())
    }

    /// Reports the commit point when it moved.
    fn confirm(&mut self) {
        if let Some(point) = self.marks.take_commit()
            && let Some(stream) = &self.stream
        {
            stream.client.update_applied_lsn(Lsn::from_u64(point));
        }
        self.metrics
            .set_held(&self.config.slot, self.marks.pending());
    }

    /// Turns one replication event into messages (none for most). A change that cannot
    /// be decoded is an error, never skipped: skipping it would confirm past it.
    fn event(
        &mut self,
        event: ReplicationEvent,
        out: &mut Vec<(Message, Position)>,
    ) -> Result<(), SourceError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                let lsn = final_lsn.as_u64();
                self.marks.advance(lsn);
                self.marks.receive(lsn);
                self.open = Some(Open {
                    lsn,
                    commit_micros: commit_time_micros,
                    seq: 0,
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(open) = self.open.take() {
                    self.marks.settle(open.lsn);
                }
                self.marks.advance(end_lsn.as_u64());
                self.confirm();
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.open.is_none() && !wal_end.is_zero() {
                    self.marks.advance(wal_end.as_u64());
                    self.confirm();
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                let parsed = self.parser.parse_wal_message_bytes(data).map_err(|e| {
                    SourceError::transient(format!("decoding a pgoutput message: {e}"))
                })?;
                return self.decoded(parsed.message, out);
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    fn decoded(
        &mut self,
        message: LogicalReplicationMessage,
        out: &mut Vec<(Message, Position)>,
    ) -> Result<(), SourceError> {
        use LogicalReplicationMessage as M;
        let (op, relation_ids, new, old) = match &message {
            M::Relation {
                relation_id,
                namespace,
                relation_name,
                replica_identity,
                columns,
            } => {
                let info = RelationInfo::new(
                    *relation_id,
                    namespace.clone(),
                    relation_name.clone(),
                    *replica_identity,
                    columns.clone(),
                );
                self.relations.insert(*relation_id, info);
                return Ok(());
            }
            M::Insert { relation_id, tuple } => ("insert", vec![*relation_id], Some(tuple), None),
            M::Update {
                relation_id,
                old_tuple,
                new_tuple,
                ..
            } => (
                "update",
                vec![*relation_id],
                Some(new_tuple),
                old_tuple.as_ref(),
            ),
            M::Delete {
                relation_id,
                old_tuple,
                ..
            } => ("delete", vec![*relation_id], None, Some(old_tuple)),
            M::Truncate { relation_ids, .. } => ("truncate", relation_ids.clone(), None, None),
            _ => return Ok(()),
        };
        let Some(open) = self.open.as_mut() else {
            return Err(SourceError::transient("a change outside a transaction"));
        };
        for id in relation_ids {
            let Some(relation) = self.relations.get(&id) else {
                return Err(SourceError::transient(format!(
                    "a change of relation {id}, which the stream never described"
                )));
            };
            let place = Place {
                slot: &self.config.slot,
                source: &self.source,
                lsn: open.lsn,
                seq: open.seq,
                commit_micros: open.commit_micros,
            };
            open.seq += 1;
            let change = Change {
                op,
                relation,
                new,
                old,
            };
            let message = change::message(&change, &place, &self.config);
            let unlisted = self
                .only
                .as_ref()
                .is_some_and(|o| !o.contains(&message.topic));
            // Dead letters are rows too (with FOR ALL TABLES): never events.
            let dlt = &self.config.dead_letter_table;
            let dead = message.subject.as_deref() == Some(dlt.as_str())
                || (*relation.namespace == *"public" && *relation.relation_name == **dlt);
            if unlisted || dead {
                continue;
            }
            let position = Position {
                generation: self.generation,
                lsn: open.lsn,
            };
            out.push((message, position));
            self.marks.receive(open.lsn);
        }
        Ok(())
    }

    /// Drops the stream; the next `pull` reads again from the confirmed position.
    fn abandon(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.client.stop();
        }
        self.open = None;
    }
}

/// What woke `pull`.
enum Woke {
    Rewind,
    Event(Result<Option<ReplicationEvent>, PgWireError>),
}

#[async_trait::async_trait]
impl Source for ReplicationSource {
    type Ack = Position;

    async fn pull(&mut self) -> Result<Vec<(Message, Position)>, SourceError> {
        if self.rewind_at.is_some_and(|at| at <= Instant::now()) {
            tracing::info!(
                "reading the slot again from its confirmed position after a held change"
            );
            self.rewind_at = None;
            self.abandon();
        }
        if self.stream.is_none() {
            let stream = self.open().await?;
            self.stream = Some(stream);
        }
        let mut out = Vec::new();
        loop {
            let woke = {
                let Some(stream) = self.stream.as_mut() else {
                    return Err(SourceError::transient("not connected"));
                };
                let rewind = async {
                    match self.rewind_at {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    () = rewind => Woke::Rewind,
                    e = stream.client.recv() => Woke::Event(e),
                }
            };
            let mut event = match woke {
                Woke::Rewind => return Ok(out),
                Woke::Event(Ok(Some(event))) => event,
                Woke::Event(Ok(None)) => {
                    self.abandon();
                    return Err(SourceError::transient("the replication stream ended"));
                }
                Woke::Event(Err(e)) => {
                    self.abandon();
                    return Err(replication_error(e));
                }
            };
            loop {
                if let Err(e) = self.event(event, &mut out) {
                    self.abandon();
                    return Err(e);
                }
                if out.len() >= BATCH {
                    break;
                }
                // Take what has arrived already, without waiting.
                let next = self
                    .stream
                    .as_mut()
                    .and_then(|s| s.client.recv().now_or_never());
                match next {
                    Some(Ok(Some(next))) => event = next,
                    _ => break,
                }
            }
            if !out.is_empty() {
                self.metrics
                    .set_held(&self.config.slot, self.marks.pending());
                return Ok(out);
            }
        }
    }

    async fn settle(
        &mut self,
        position: Position,
        disposition: Disposition,
        _outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        if position.generation != self.generation {
            return Ok(());
        }
        let delay = match disposition {
            Disposition::Ack => {
                self.marks.settle(position.lsn);
                self.confirm();
                return Ok(());
            }
            Disposition::Release => return Ok(()),
            Disposition::Hold => self.config.hold_delay,
            Disposition::Retry { after } => after,
        };
        let at = Instant::now() + delay;
        if self.rewind_at.is_none_or(|t| at < t) {
            self.rewind_at = Some(at);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        self.confirm();
        let Some(stream) = self.stream.take() else {
            return Ok(());
        };
        // pgwire-replication sends no status on stop: wait until the last one went out.
        if let Some(point) = self.marks.commit_point() {
            let deadline = Instant::now() + STATUS_INTERVAL + self.config.command_timeout;
            let metrics = stream.client.metrics();
            while metrics.last_applied_lsn().as_u64() < point
                && Instant::now() < deadline
                && stream.client.is_running()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut client = stream.client;
        let stopped = tokio::time::timeout(self.config.command_timeout, client.shutdown()).await;
        if let Ok(Err(e)) = stopped {
            tracing::debug!(error = %e, "closing the replication stream");
        }
        Ok(())
    }
}

/// Refused credentials stop the connector; the rest is retried.
fn replication_error(e: PgWireError) -> SourceError {
    match e {
        PgWireError::Auth(_) => SourceError::fatal(e),
        other => SourceError::transient(other),
    }
}
