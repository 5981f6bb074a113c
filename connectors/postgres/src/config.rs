//! The configuration: the SDK's `[connector]` section and our `[postgres]` section, layered
//! by `connector_sdk::config::load` (defaults, `--config` TOML, environment variables).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use connector_sdk::SdkConfig;
use connector_sdk::config::{self, ConfigError, ConfigErrors, EnvVar, SDK_ENV, Secret};
use serde::{Deserialize, Serialize};

/// The whole configuration of `postgres-connector`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Gateway, topics, retries, concurrency, metrics: see `SdkConfig`. Topics are
    /// NOTIFY channels (`notify`) or table topics (`replication`).
    pub connector: SdkConfig,
    /// Where and how to read PostgreSQL.
    pub postgres: PgConfig,
}

/// How events are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Logical replication (`pgoutput`) of a publication's tables: at least once.
    #[default]
    Replication,
    /// LISTEN on every topic as a channel: at most once (NOTIFY has no acknowledgement).
    Notify,
}

/// What a change's request body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// The change as JSON: `{"op", "schema", "table", "lsn", "new", "old"}`.
    #[default]
    Change,
    /// The value of `body_column` alone (raw bytes for `bytea`, else its text): an
    /// outbox table's payload.
    Column,
}

/// TLS towards the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tls {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS, the certificate checked against the web PKI roots or `tls_ca_file`, and the
    /// host name against it.
    VerifyFull,
}

/// `[postgres]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgConfig {
    /// Connection URL or key/value string, as libpq takes it
    /// (`postgres://user@host:5432/db`). Env `postgres_url`.
    /// (default: `"postgres://postgres@127.0.0.1:5432/postgres"`)
    pub url: String,
    /// Password, overriding the URL's; never logged. Env `postgres_password`.
    /// (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// `disable` or `verify_full`. Env `postgres_tls`. (default: `"disable"`)
    pub tls: Tls,
    /// PEM file of the CA that signed the server's certificate, instead of the web PKI
    /// roots. Env `postgres_tls_ca_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// `replication` or `notify`. Env `postgres_mode`. (default: `"replication"`)
    pub mode: Mode,
    /// The logical replication slot (`pgoutput`): letters, digits and `_`.
    /// Env `postgres_slot`. (default: `"faas_connector"`)
    pub slot: String,
    /// The publication whose tables are replicated. Env `postgres_publication`.
    /// (default: `"faas_connector"`)
    pub publication: String,
    /// Create the slot, the publication and the dead-letter table when missing. Off:
    /// they must exist. Env `postgres_create`. (default: `true`)
    #[serde(with = "config::flag")]
    pub create: bool,
    /// Tables of a publication this connector creates (`schema.table` or `table`);
    /// empty: `FOR ALL TABLES` (needs superuser). Env `postgres_tables`.
    /// (default: `[]`)
    #[serde(with = "config::list")]
    pub tables: Vec<String>,
    /// Topic per table (`"public.orders" = "orders-topic"`); a table not listed has
    /// topic `table` in schema `public`, `schema.table` elsewhere. (default: `{}`)
    pub table_topics: BTreeMap<String, String>,
    /// `change` (the change as JSON) or `column` (`body_column`'s value).
    /// Env `postgres_body`. (default: `"change"`)
    pub body: Body,
    /// The column that is the body with `body = "column"`. Env `postgres_body_column`.
    /// (default: `"payload"`)
    pub body_column: String,
    /// Table dead letters are inserted into (created with `create`); empty: none.
    /// Env `postgres_dead_letter_table`. (default: `"faas_dead_letters"`)
    pub dead_letter_table: String,
    /// How long a change that failed for good and could not be dead-lettered waits
    /// before the stream is read again from the slot's confirmed position.
    /// Env `postgres_hold_delay`. (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub hold_delay: Duration,
    /// How often the slot's lag is read for `/metrics`. (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub metrics_interval: Duration,
    /// Timeout of connecting and of each statement. Env `postgres_command_timeout`.
    /// (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub command_timeout: Duration,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/postgres".to_owned(),
            password: None,
            tls: Tls::Disable,
            tls_ca_file: None,
            mode: Mode::Replication,
            slot: "faas_connector".to_owned(),
            publication: "faas_connector".to_owned(),
            create: true,
            tables: Vec::new(),
            table_topics: BTreeMap::new(),
            body: Body::Change,
            body_column: "payload".to_owned(),
            dead_letter_table: "faas_dead_letters".to_owned(),
            hold_delay: Duration::from_secs(5),
            metrics_interval: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
        }
    }
}

impl PgConfig {
    /// The URL parsed, with `password` on top (validated by [`Config::validate`]).
    pub fn pg(&self) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
        let mut pg = tokio_postgres::Config::from_str(&self.url)?;
        if let Some(password) = &self.password {
            pg.password(password.expose());
        }
        pg.connect_timeout(self.command_timeout);
        Ok(pg)
    }

    /// The topic of `schema.table`.
    pub fn topic(&self, schema: &str, table: &str) -> String {
        let qualified = format!("{schema}.{table}");
        if let Some(topic) = self
            .table_topics
            .get(&qualified)
            .or_else(|| (schema == "public").then(|| self.table_topics.get(table))?)
        {
            return topic.clone();
        }
        if schema == "public" {
            table.to_owned()
        } else {
            qualified
        }
    }
}

/// Our variables, on top of the SDK's (`gateway_url`, `topics`, ...).
pub const ENV: &[EnvVar] = &[
    EnvVar::new("postgres_url", "postgres.url"),
    EnvVar::new("postgres_password", "postgres.password"),
    EnvVar::new("postgres_tls", "postgres.tls"),
    EnvVar::new("postgres_tls_ca_file", "postgres.tls_ca_file"),
    EnvVar::new("postgres_mode", "postgres.mode"),
    EnvVar::new("postgres_slot", "postgres.slot"),
    EnvVar::new("postgres_publication", "postgres.publication"),
    EnvVar::new("postgres_create", "postgres.create"),
    EnvVar::new("postgres_tables", "postgres.tables"),
    EnvVar::new("postgres_body", "postgres.body"),
    EnvVar::new("postgres_body_column", "postgres.body_column"),
    EnvVar::new("postgres_dead_letter_table", "postgres.dead_letter_table"),
    EnvVar::new("postgres_hold_delay", "postgres.hold_delay"),
    EnvVar::new("postgres_command_timeout", "postgres.command_timeout"),
];

/// Loads the configuration: defaults, then `--config FILE`, then environment variables;
/// then the cross-field checks.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
    let config: Config = config::load(path, &env)?;
    config.validate()?;
    Ok(config)
}

/// A name PostgreSQL takes unquoted in replication commands (slot and publication names
/// go into `START_REPLICATION` as they are).
fn plain_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Config {
    /// Cross-field checks, run before anything connects. Keys are named as in TOML.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.connector.validate()?;
        let p = &self.postgres;
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            errors.push(ConfigError::invalid(format!("postgres.{key}"), message));
        };
        match p.pg() {
            Err(e) => fail("url", format!("not a PostgreSQL connection string: {e}")),
            Ok(pg) => {
                let tcp = pg
                    .get_hosts()
                    .iter()
                    .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)));
                if !tcp {
                    fail("url", "names no TCP host".to_owned());
                }
            }
        }
        if let Some(path) = &p.tls_ca_file {
            if p.tls == Tls::Disable {
                fail(
                    "tls_ca_file",
                    "a CA file is set but tls is disable".to_owned(),
                );
            }
            if !path.is_file() {
                fail("tls_ca_file", format!("no such file {}", path.display()));
            }
        }
        if p.mode == Mode::Replication {
            // pgwire-replication's TLS builds aws-lc-sys: only with the cargo feature.
            if p.tls != Tls::Disable && !cfg!(feature = "replication-tls") {
                fail(
                    "tls",
                    "TLS in replication mode needs a build with the cargo feature replication-tls"
                        .to_owned(),
                );
            }
            for (key, name) in [("slot", &p.slot), ("publication", &p.publication)] {
                if !plain_name(name) {
                    fail(
                        key,
                        format!("{name:?}: 1 to 63 lower-case letters, digits or _"),
                    );
                }
            }
            if p.body == Body::Column && p.body_column.is_empty() {
                fail(
                    "body_column",
                    "must not be empty with body = \"column\"".to_owned(),
                );
            }
        }
        for (key, value) in [
            ("hold_delay", p.hold_delay),
            ("metrics_interval", p.metrics_interval),
            ("command_timeout", p.command_timeout),
        ] {
            if value.is_zero() {
                fail(key, "must be above zero".to_owned());
            }
        }
        ConfigErrors::check(errors)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err, clippy::unwrap_used)] // figment::Jail's closures
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn the_example_config_documents_the_defaults() {
        Config::default().validate().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/postgres.toml");
        Jail::expect_with(|_| {
            assert_eq!(load(Some(Path::new(path))).unwrap(), Config::default());
            Ok(())
        });
    }

    #[test]
    fn file_environment_and_topics() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[postgres]\nurl = \"postgres://app:old@db.internal/shop\"\nslot = \"shop\"\n\n[postgres.table_topics]\n\"public.orders\" = \"orders-topic\"\n",
            )?;
            jail.set_env("postgres_password", "s3cret");
            jail.set_env("postgres_tables", "orders,audit.log");
            let c = load(Some(Path::new("c.toml"))).unwrap();
            let p = &c.postgres;
            assert_eq!(p.slot, "shop");
            assert_eq!(p.tables, ["orders", "audit.log"]);
            assert_eq!(p.pg().unwrap().get_password(), Some(&b"s3cret"[..]));
            assert!(!format!("{c:?}").contains("s3cret"));
            assert_eq!(p.topic("public", "orders"), "orders-topic");
            assert_eq!(p.topic("public", "items"), "items");
            assert_eq!(p.topic("audit", "log"), "audit.log");
            Ok(())
        });
    }

    #[test]
    fn errors_name_key_and_origin() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[postgres]\nslot = \"Bad-Slot\"\n")?;
            let e = load(Some(Path::new("c.toml"))).unwrap_err().to_string();
            assert!(e.contains("postgres.slot"), "{e}");
            jail.create_file("d.toml", "")?;
            jail.set_env("postgres_mode", "poll");
            let e = load(Some(Path::new("d.toml"))).unwrap_err().to_string();
            assert!(e.contains("environment variable postgres_mode"), "{e}");
            Ok(())
        });
        let mut c = Config::default();
        c.postgres.url = "postgres://h:notaport/db".into();
        c.postgres.tls = Tls::VerifyFull;
        c.postgres.hold_delay = Duration::ZERO;
        let e = c.validate().unwrap_err().to_string();
        for key in ["postgres.url", "postgres.tls", "postgres.hold_delay"] {
            assert!(e.contains(key), "missing {key} in {e}");
        }
    }
}
