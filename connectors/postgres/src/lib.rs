//! `postgres-connector` as a library: PostgreSQL events to functions on connector-sdk. The
//! binary is a thin `main` around [`load`] and [`run`]; tests call them in-process.
//!
//! Two modes:
//! - `replication` (default): logical replication of a publication's tables with the
//!   built-in `pgoutput` plugin. Each row change is an event; the slot's confirmed
//!   position advances only past transactions whose changes were all delivered,
//!   dead-lettered or dropped, so a crash or restart resumes without loss (at least once).
//! - `notify`: `LISTEN` on each topic as a channel. At most once: NOTIFY has no
//!   acknowledgement, and a notification sent while the connector is down is gone.
//!
//! Modules:
//! - [`config`]: `[connector]` (the SDK's) and `[postgres]`, with environment variables.
//! - [`change`]: a decoded row change shaped into a message (the JSON body, headers).
//! - [`replication`]: the replication stream as a `Source`; the slot and publication.
//! - [`notify`]: LISTEN/NOTIFY as a `Source`.
//! - [`dead_letter`]: dead letters inserted into a table; [`replay`] reads them back.
//! - [`metrics`]: the slot's lag in bytes.

pub mod change;
pub mod config;
pub mod dead_letter;
pub mod metrics;
pub mod notify;
pub mod replay;
pub mod replication;

use std::sync::Arc;

use connector_sdk::{Runtime, SourceError, pump};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

pub use config::{Config, Mode, PgConfig, load};

/// The binary's name, sent as `X-Connector`.
pub const NAME: &str = "postgres-connector";

/// Why the connector could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot be used as it is (checked before connecting).
    #[error("{0}")]
    Setup(String),
    /// The TLS configuration could not be built (the CA file, most likely).
    #[error(transparent)]
    Tls(#[from] faas_common::tls::TlsError),
    /// The slot or publication does not exist and `create` is off.
    #[error("{0} does not exist (and postgres.create is off)")]
    Missing(String),
    /// Connecting or a statement failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The SDK's harness failed (metrics address taken, a fatal source error, ...).
    #[error(transparent)]
    Sdk(#[from] connector_sdk::SdkError),
    /// `replay` stopped: reading or deleting a dead letter failed.
    #[error(transparent)]
    Replay(#[from] connector_sdk::replay::ReplayError),
}

/// `ce-source`: `postgres://host:port/db` (never credentials).
pub fn source_uri(config: &PgConfig) -> String {
    let Ok(pg) = config.pg() else {
        return "postgres://".to_owned();
    };
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => String::new(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{host}:{port}/{}",
        pg.get_dbname().unwrap_or_default()
    )
}

/// The TLS connector for tokio-postgres (rustls on ring; used only with `tls` on).
fn tls(config: &PgConfig) -> Result<MakeRustlsConnect, Error> {
    let tls = faas_common::tls::client_config(config.tls_ca_file.as_deref())?;
    Ok(MakeRustlsConnect::new(tls))
}

/// A SQL connection and the connection task's handle, which must be polled (spawned, or
/// read for notifications).
pub type PgConnection = Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Opens a SQL connection; the caller drives `PgConnection`.
pub async fn connect_raw(config: &PgConfig) -> Result<(Client, PgConnection), Error> {
    let mut pg = config.pg()?;
    pg.application_name(NAME);
    pg.ssl_mode(match config.tls {
        config::Tls::Disable => SslMode::Disable,
        config::Tls::VerifyFull => SslMode::Require,
    });
    let connecting = pg.connect(tls(config)?);
    match tokio::time::timeout(config.command_timeout, connecting).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::Setup(format!(
            "connecting to PostgreSQL: no answer within {:?}",
            config.command_timeout
        ))),
    }
}

/// Opens a SQL connection whose connection task runs on its own.
pub async fn connect(config: &PgConfig) -> Result<Client, Error> {
    let (client, connection) = connect_raw(config).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// `name` as one quoted SQL identifier (a NOTIFY channel may hold dots).
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table name as a quoted SQL identifier: `schema.table` becomes `"schema"."table"`.
pub fn quote_ident(name: &str) -> String {
    name.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// Whether a failure is worth retrying: refused credentials and missing objects are not.
pub fn classify(e: Error) -> SourceError {
    let fatal = match &e {
        Error::Postgres(pg) => pg.code().is_some_and(|code| {
            let code = code.code();
            // 28: invalid authorization; 42: syntax error or access rule violation.
            code.starts_with("28") || code.starts_with("42")
        }),
        Error::Setup(_) | Error::Tls(_) => false,
        Error::Missing(_) | Error::Sdk(_) | Error::Replay(_) => true,
    };
    if fatal {
        SourceError::fatal(e)
    } else {
        SourceError::transient(e)
    }
}

/// Runs the connector until the runtime's shutdown (SIGTERM/SIGINT, or its token), then
/// drains: in-flight deliveries finish, and (replication) the slot is confirmed past them.
pub async fn run(config: Config, mut runtime: Runtime) -> Result<(), Error> {
    if !config.postgres.dead_letter_table.is_empty() {
        // The admin API lists, replays and purges the dead letters as `replay` does.
        runtime = runtime
            .dead_letter_store_with(config.clone(), |c| async move { replay::open(&c).await });
    }
    let sdk_metrics = runtime.metrics().clone();
    let metrics = metrics::PgMetrics::register(runtime.registry_mut(), sdk_metrics);
    let p = config.postgres;
    if p.dead_letter_table.is_empty() {
        tracing::warn!(
            "no dead_letter_table: deliveries that fail for good hold the slot (or are dropped with on_exhausted = \"drop\")"
        );
    } else {
        runtime = runtime.dead_letters(Arc::new(dead_letter::TableDeadLetters::new(&p)));
    }
    // A held change is read again, with everything after it, after `hold_delay`: the
    // changes queued behind it in its table's lane are released rather than delivered
    // first, so `ordering = "key"` keeps commit order through failures too.
    runtime = runtime.strict_lanes(p.mode == Mode::Replication);
    tracing::info!(mode = ?p.mode, source = %source_uri(&p), slot = %p.slot, publication = %p.publication, "postgres-connector configured");
    runtime
        .run(|ctx| async move {
            match p.mode {
                Mode::Replication => {
                    let source =
                        replication::ReplicationSource::new(p, &ctx.config.topics, metrics);
                    pump(&ctx, source).await
                }
                Mode::Notify => {
                    let mut source = notify::NotifySource::new(ctx.clone(), p, metrics);
                    source.connect().await?;
                    pump(&ctx, source).await
                }
            }
        })
        .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_the_source_names_no_credentials() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
        assert_eq!(quote_ident("a.b\"c"), "\"a\".\"b\"\"c\"");
        assert_eq!(quote("orders.created"), "\"orders.created\"");
        let config = PgConfig {
            url: "postgres://app:pw@db.internal:6432/shop".into(),
            ..PgConfig::default()
        };
        assert_eq!(source_uri(&config), "postgres://db.internal:6432/shop");
    }
}
