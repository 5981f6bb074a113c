//! The configuration: the SDK's `[connector]` section and our `[redis]` section, layered
//! by `connector_sdk::config::load` (defaults, `--config` TOML, environment variables).

use std::path::{Path, PathBuf};
use std::time::Duration;

use connector_sdk::SdkConfig;
use connector_sdk::config::{self, ConfigErrors, EnvVar, SDK_ENV, Secret};
use serde::{Deserialize, Serialize};

/// The whole configuration of `redis-connector`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Gateway, topics, retries, concurrency, metrics: see `SdkConfig`. Topics are stream
    /// keys (streams mode) or channels and patterns (pubsub mode).
    pub connector: SdkConfig,
    /// Where and how to consume Redis.
    pub redis: RedisConfig,
}

/// How the connector consumes Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Redis Streams with a consumer group: at-least-once (default).
    #[default]
    Streams,
    /// SUBSCRIBE / PSUBSCRIBE: at-most-once; a message published while the connector is
    /// down or disconnected is never seen, and one in flight at a crash is lost.
    Pubsub,
}

/// `[redis]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Server URL: `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS
    /// (certificates checked against the bundled web PKI roots; append `#insecure` to skip
    /// verification). Env `redis_url`. (default: `"redis://127.0.0.1:6379"`)
    pub url: String,
    /// ACL user name, overriding the URL's. Env `redis_username`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password, overriding the URL's; never logged. Env `redis_password`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// PEM file of the CA that signed the server's certificate (with `rediss://`), instead
    /// of the bundled web PKI roots. Env `redis_tls_ca_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key_file`).
    /// Env `redis_tls_cert_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`. Env `redis_tls_key_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// `streams` (at-least-once) or `pubsub` (at-most-once). Env `redis_mode`.
    /// (default: `"streams"`)
    pub mode: Mode,
    /// Consumer group shared by every replica. Env `redis_group`.
    /// (default: `"faas-connector"`)
    pub group: String,
    /// This replica's consumer name; must differ between replicas. Unset means
    /// `<hostname>-<random>`, a new consumer each start (entries a crashed run left pending
    /// are claimed after `claim_idle`). Set it to a stable per-replica name (a StatefulSet
    /// pod name) to re-read its own pending entries at once after a restart.
    /// Env `redis_consumer`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Where a group this connector creates starts: `"0"` every entry already in the
    /// stream, `"$"` only entries added from now on. An existing group is kept as it is.
    /// Env `redis_start_id`. (default: `"0"`)
    pub start_id: String,
    /// The entry field sent as the request body. Unset, or missing from an entry: the whole
    /// entry as a JSON object (`{"field": "value", ...}`, non-UTF-8 values base64-encoded and
    /// listed in `X-Redis-Base64-Fields`). Env `redis_body_field`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_field: Option<String>,
    /// The entry field holding the body's `Content-Type` (used unless `content_type` is
    /// configured). Env `redis_content_type_field`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type_field: Option<String>,
    /// With `ordering = "key"`: the entry field whose value is the ordering key (entries
    /// without it share one lane per stream). `ordering = "partition"` orders each stream
    /// as one lane. Also sent as `ce-subject`. Env `redis_key_field`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    /// The entry field holding the event's W3C `traceparent`: the parent of the
    /// delivery's trace, sent on as the invocation's `traceparent` (a field named
    /// `tracestate` goes with it). Env `redis_trace_field`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_field: Option<String>,
    /// Dead-letter stream; `{stream}` is replaced by the source stream. Empty: no dead
    /// letters (a delivery that failed for good stays pending, or is dropped with
    /// `on_exhausted = "drop"`). Env `redis_dead_letter_stream`.
    /// (default: `"{stream}:dead-letter"`)
    pub dead_letter_stream: String,
    /// Trim dead-letter streams to about this many entries (`MAXLEN ~`); 0 keeps all.
    /// (default: `0`)
    pub dead_letter_maxlen: usize,
    /// Entries per XREADGROUP and XAUTOCLAIM call (capped at `max_inflight`).
    /// Env `redis_batch_size`. (default: `100`)
    pub batch_size: usize,
    /// How long one XREADGROUP waits for new entries (`BLOCK`). Env `redis_block`.
    /// (default: `"2s"`)
    #[serde(with = "config::duration")]
    pub block: Duration,
    /// A pending entry idle this long (its consumer died, or it was left pending for a
    /// retry) is claimed with XAUTOCLAIM and delivered again. Entries this connector is
    /// working on are re-claimed to itself every third of it, so a slow function is not
    /// mistaken for a dead consumer. Env `redis_claim_idle`. (default: `"60s"`)
    #[serde(with = "config::duration")]
    pub claim_idle: Duration,
    /// How often to look for idle pending entries. Env `redis_claim_interval`.
    /// (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub claim_interval: Duration,
    /// How often pending entries and group lag are measured for `/metrics`.
    /// (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub metrics_interval: Duration,
    /// On a clean exit, remove this consumer from the group when nothing is pending for it
    /// (keeps `XINFO CONSUMERS` from filling with one-off names). (default: `true`)
    #[serde(with = "config::flag")]
    pub delete_consumer_on_exit: bool,
    /// Timeout of connecting and of each non-blocking command. (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub command_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            username: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            mode: Mode::Streams,
            group: "faas-connector".to_owned(),
            consumer: None,
            start_id: "0".to_owned(),
            body_field: None,
            content_type_field: None,
            key_field: None,
            trace_field: None,
            dead_letter_stream: "{stream}:dead-letter".to_owned(),
            dead_letter_maxlen: 0,
            batch_size: 100,
            block: Duration::from_secs(2),
            claim_idle: Duration::from_secs(60),
            claim_interval: Duration::from_secs(10),
            metrics_interval: Duration::from_secs(5),
            delete_consumer_on_exit: true,
            command_timeout: Duration::from_secs(5),
        }
    }
}

/// Our variables, on top of the SDK's (`gateway_url`, `topics`, ...).
pub const ENV: &[EnvVar] = &[
    EnvVar::new("redis_url", "redis.url"),
    EnvVar::new("redis_username", "redis.username"),
    EnvVar::new("redis_password", "redis.password"),
    EnvVar::new("redis_tls_ca_file", "redis.tls_ca_file"),
    EnvVar::new("redis_tls_cert_file", "redis.tls_cert_file"),
    EnvVar::new("redis_tls_key_file", "redis.tls_key_file"),
    EnvVar::new("redis_mode", "redis.mode"),
    EnvVar::new("redis_group", "redis.group"),
    EnvVar::new("redis_consumer", "redis.consumer"),
    EnvVar::new("redis_start_id", "redis.start_id"),
    EnvVar::new("redis_body_field", "redis.body_field"),
    EnvVar::new("redis_content_type_field", "redis.content_type_field"),
    EnvVar::new("redis_key_field", "redis.key_field"),
    EnvVar::new("redis_trace_field", "redis.trace_field"),
    EnvVar::new("redis_dead_letter_stream", "redis.dead_letter_stream"),
    EnvVar::new("redis_batch_size", "redis.batch_size"),
    EnvVar::new("redis_block", "redis.block"),
    EnvVar::new("redis_claim_idle", "redis.claim_idle"),
    EnvVar::new("redis_claim_interval", "redis.claim_interval"),
];

/// Loads the configuration: defaults, then `--config FILE`, then environment variables;
/// then the cross-field checks.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
    let config: Config = config::load(path, &env)?;
    config.validate()?;
    Ok(config)
}

impl Config {
    /// Cross-field checks, run before anything connects. Keys are named as in TOML.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.connector.validate()?;
        let r = &self.redis;
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            errors.push(connector_sdk::config::ConfigError::invalid(
                format!("redis.{key}"),
                message,
            ));
        };
        if let Err(e) = redis::Client::open(r.url.as_str()) {
            fail("url", format!("not a Redis URL: {e}"));
        }
        if r.tls_cert_file.is_some() != r.tls_key_file.is_some() {
            fail(
                "tls_cert_file",
                "tls_cert_file and tls_key_file are set together or not at all".to_owned(),
            );
        }
        let tls_files = [&r.tls_ca_file, &r.tls_cert_file, &r.tls_key_file];
        if tls_files.iter().any(|f| f.is_some()) && !r.url.starts_with("rediss://") {
            fail(
                "tls_ca_file",
                "TLS files are set but the url is not rediss://".to_owned(),
            );
        }
        for (key, file) in ["tls_ca_file", "tls_cert_file", "tls_key_file"]
            .into_iter()
            .zip(tls_files)
        {
            if let Some(path) = file
                && !path.is_file()
            {
                fail(key, format!("no such file {}", path.display()));
            }
        }
        if r.group.trim().is_empty() {
            fail("group", "must not be empty".to_owned());
        }
        if r.consumer.as_deref().is_some_and(|c| c.trim().is_empty()) {
            fail(
                "consumer",
                "must not be empty (leave it unset for a generated name)".to_owned(),
            );
        }
        if r.batch_size == 0 {
            fail("batch_size", "must be at least 1".to_owned());
        }
        if r.block.is_zero() {
            fail(
                "block",
                "must be above zero (BLOCK 0 would wait forever and never notice shutdown)"
                    .to_owned(),
            );
        }
        if r.claim_idle < Duration::from_secs(1) {
            fail(
                "claim_idle",
                "must be at least 1s: entries being worked on are re-claimed every third of it"
                    .to_owned(),
            );
        }
        if r.claim_interval.is_zero() {
            fail("claim_interval", "must be above zero".to_owned());
        }
        if r.metrics_interval.is_zero() {
            fail("metrics_interval", "must be above zero".to_owned());
        }
        if r.command_timeout.is_zero() {
            fail("command_timeout", "must be above zero".to_owned());
        }
        if r.block >= r.claim_idle {
            fail(
                "block",
                format!(
                    "{} is not shorter than claim_idle {}: entries read in one call could be claimed by another replica before they are delivered",
                    humantime::format_duration(r.block),
                    humantime::format_duration(r.claim_idle)
                ),
            );
        }
        if !matches!(r.start_id.as_str(), "0" | "$") && !looks_like_entry_id(&r.start_id) {
            fail(
                "start_id",
                format!(
                    "{:?} is not \"0\", \"$\" or an entry id like \"1700000000000-0\"",
                    r.start_id
                ),
            );
        }
        ConfigErrors::check(errors)
    }
}

fn looks_like_entry_id(id: &str) -> bool {
    let mut parts = id.splitn(2, '-');
    let ms = parts.next().unwrap_or("");
    let seq = parts.next();
    !ms.is_empty()
        && ms.bytes().all(|b| b.is_ascii_digit())
        && seq.is_none_or(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
#[allow(clippy::result_large_err, clippy::unwrap_used)] // figment::Jail's closures
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        let d = RedisConfig::default();
        assert_eq!(d.mode, Mode::Streams);
        assert_eq!(d.dead_letter_stream, "{stream}:dead-letter");
        assert_eq!(d.claim_idle, Duration::from_secs(60));
    }

    #[test]
    fn the_example_config_documents_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/redis.toml");
        Jail::expect_with(|_| {
            let loaded = load(Some(Path::new(path))).unwrap();
            assert_eq!(loaded, Config::default());
            Ok(())
        });
    }

    #[test]
    fn file_then_environment() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
[connector]
topics = ["orders"]

[redis]
url = "rediss://user:pw@cache.internal:6380/2"
group = "billing"
body_field = "payload"
claim_idle = "2m"
"#,
            )?;
            jail.set_env("redis_group", "from-env");
            jail.set_env("redis_mode", "pubsub");
            jail.set_env("redis_password", "s3cret");
            let c = load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(c.connector.topics, ["orders"]);
            assert_eq!(c.redis.url, "rediss://user:pw@cache.internal:6380/2");
            assert_eq!(c.redis.group, "from-env");
            assert_eq!(c.redis.mode, Mode::Pubsub);
            assert_eq!(c.redis.body_field.as_deref(), Some("payload"));
            assert_eq!(c.redis.claim_idle, Duration::from_secs(120));
            assert_eq!(
                c.redis.password.as_ref().map(Secret::expose),
                Some("s3cret")
            );
            assert!(!format!("{c:?}").contains("s3cret"));
            Ok(())
        });
    }

    #[test]
    fn errors_name_key_and_origin() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[redis]\ngroup = \"g\"\nclaim_idle = 60\n")?;
            let e = load(Some(Path::new("c.toml"))).unwrap_err().to_string();
            assert!(e.contains("redis.claim_idle"), "{e}");
            assert!(e.contains("line 3"), "{e}");
            assert!(e.contains("needs a unit"), "{e}");
            jail.create_file("b.toml", "[redis]\nbogus = 1\n")?;
            let e = load(Some(Path::new("b.toml"))).unwrap_err().to_string();
            assert!(e.contains("redis.bogus"), "{e}");
            jail.create_file("d.toml", "")?;
            jail.set_env("redis_batch_size", "many");
            let e = load(Some(Path::new("d.toml"))).unwrap_err().to_string();
            assert!(e.contains("environment variable redis_batch_size"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn cross_field_checks() {
        let mut c = Config::default();
        c.redis.url = "http://nope".into();
        c.redis.block = Duration::from_secs(90);
        c.redis.start_id = "latest".into();
        c.redis.batch_size = 0;
        let e = c.validate().unwrap_err().to_string();
        for key in [
            "redis.url",
            "redis.block",
            "redis.start_id",
            "redis.batch_size",
        ] {
            assert!(e.contains(key), "missing {key} in {e}");
        }
        let mut c = Config::default();
        c.redis.start_id = "1700000000000-5".into();
        c.validate().unwrap();
    }

    #[test]
    fn tls_urls_are_accepted() {
        let mut c = Config::default();
        c.redis.url = "rediss://127.0.0.1:6380/#insecure".into();
        c.validate().unwrap();
        c.redis.url = "redis://127.0.0.1:6380".into();
        c.redis.tls_cert_file = Some("/nonexistent/cert.pem".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("tls_key_file are set together"), "{e}");
        assert!(e.contains("not rediss://"), "{e}");
        assert!(e.contains("no such file /nonexistent/cert.pem"), "{e}");
    }
}
