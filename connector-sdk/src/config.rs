//! Configuration: built-in defaults, then a TOML file, then environment variables.
//!
//! The loading itself ([`load`], [`ConfigErrors`], [`EnvVar`], [`Secret`] and the
//! `duration`, `flag` and `list` serde helpers) lives in `faas_common::config`, shared
//! with the gateway, and is re-exported here so connectors keep one import path. What is
//! the connectors' own stays here: the SDK's section [`SdkConfig`], under `[connector]` in
//! TOML, and its variables [`SDK_ENV`], the OpenFaaS names (`gateway_url`, `topics`,
//! `upstream_timeout`, ...) that work as they do there.
//!
//! ```toml
//! [connector]
//! gateway_url = "http://127.0.0.1:8080"
//! upstream_timeout = "30s"
//! max_inflight = 64
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use faas_common::config::{
    ConfigError, ConfigErrors, EnvVar, Secret, duration, flag, list, load,
};

use crate::backoff::Backoff;
use crate::verdict::StatusClasses;

/// The variables of the SDK section: OpenFaaS's connector names plus ours, all lower case
/// as OpenFaaS writes them.
pub const SDK_ENV: &[EnvVar] = &[
    EnvVar::new("gateway_url", "connector.gateway_url"),
    EnvVar::new("topics", "connector.topics"),
    EnvVar::new("upstream_timeout", "connector.upstream_timeout"),
    EnvVar::new("rebuild_interval", "connector.rebuild_interval"),
    EnvVar::new("print_response", "connector.print_response"),
    EnvVar::new("print_response_body", "connector.print_response_body"),
    EnvVar::new("print_request_body", "connector.print_request_body"),
    EnvVar::new("topic_delimiter", "connector.topic_delimiter"),
    EnvVar::new(
        "asynchronous_invocation",
        "connector.asynchronous_invocation",
    ),
    EnvVar::new("callback_url", "connector.callback_url"),
    EnvVar::new("content_type", "connector.content_type"),
    EnvVar::new("basic_auth", "connector.basic_auth"),
    EnvVar::new("secret_mount_path", "connector.secret_mount_path"),
    EnvVar::new("gateway_username", "connector.gateway_username"),
    EnvVar::new("gateway_password", "connector.gateway_password"),
    EnvVar::new("max_inflight", "connector.max_inflight"),
    EnvVar::new("max_attempts", "connector.max_attempts"),
    EnvVar::new("on_exhausted", "connector.on_exhausted"),
    EnvVar::new("unmatched", "connector.unmatched"),
    EnvVar::new("ordering", "connector.ordering"),
    EnvVar::new("batch_size", "connector.batch.size"),
    EnvVar::new("batch_window", "connector.batch.window"),
    EnvVar::new("batch_max_bytes", "connector.batch.max_bytes"),
    EnvVar::new("drain_timeout", "connector.drain_timeout"),
    EnvVar::new("metrics_addr", "connector.metrics_addr"),
    EnvVar::new("drain_token", "connector.drain_token"),
    EnvVar::new("scaler_addr", "connector.scaler_addr"),
    EnvVar::new("report_backlog", "connector.report_backlog"),
    EnvVar::new("log_format", "connector.log_format"),
];

/// What happens to a delivery that used up `max_attempts` and could not be dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Do not acknowledge: the message stays with the broker (default).
    #[default]
    Block,
    /// Acknowledge and discard it, counted as dropped.
    Drop,
}

/// What happens to a message of a topic the connector consumes because `topics` names it,
/// when no function subscribes to that topic at that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Do not acknowledge: the message stays with the broker and comes back on its hold
    /// schedule until a function subscribes (default). A redeploy, or a provider that
    /// briefly lists nothing, loses nothing.
    #[default]
    Hold,
    /// Acknowledge it and count it (`unmatched`), as OpenFaaS's connectors do.
    Ack,
}

/// In which order a connector's messages are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// Any order, all in parallel up to `max_inflight` (default).
    #[default]
    None,
    /// Messages with the same ordering key one after another (each complete before the
    /// next starts); different keys in parallel. The connector says what the key is (Kafka:
    /// the partition in `partition` mode, the record key in `key` mode).
    Key,
    /// Kafka's default: one lane per partition. Other sources treat it as `key`.
    Partition,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The SDK's section of every connector's configuration (`[connector]` in TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SdkConfig {
    /// Base URL of the OpenFaaS-compatible gateway. Env `gateway_url`.
    /// (default: `"http://127.0.0.1:8080"`)
    pub gateway_url: String,
    /// Topics to consume; empty means every topic in the topic map, following its changes.
    /// Env `topics`, comma-separated. (default: `[]`)
    #[serde(with = "list")]
    pub topics: Vec<String>,
    /// Timeout of one invocation request, and of the gateway's `/system/*` calls.
    /// Env `upstream_timeout`. (default: `"30s"`)
    #[serde(with = "duration")]
    pub upstream_timeout: Duration,
    /// How often the topic map is rebuilt from the gateway. Env `rebuild_interval`.
    /// (default: `"10s"`)
    #[serde(with = "duration")]
    pub rebuild_interval: Duration,
    /// Log each invocation's status. Env `print_response`. (default: `false`)
    #[serde(with = "flag")]
    pub print_response: bool,
    /// Also log each response body (needs `print_response`). Env `print_response_body`.
    /// (default: `false`)
    #[serde(with = "flag")]
    pub print_response_body: bool,
    /// Log each request body before invoking. Env `print_request_body`. (default: `false`)
    #[serde(with = "flag")]
    pub print_request_body: bool,
    /// Separator between topics in a function's `topic` annotation. Env `topic_delimiter`.
    /// (default: `","`)
    pub topic_delimiter: String,
    /// Invoke through `/async-function/` (the gateway queues the call and answers 202).
    /// Env `asynchronous_invocation`. (default: `false`)
    #[serde(with = "flag")]
    pub asynchronous_invocation: bool,
    /// With asynchronous invocation, sent as `X-Callback-Url` so the gateway posts the
    /// result there. Env `callback_url`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// `Content-Type` of every invocation; unset means the message's own, if the source
    /// carries one. Env `content_type`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Send basic auth on the gateway's `/system/*` calls, with the credentials read from
    /// `secret_mount_path` unless `gateway_username` and `gateway_password` are set.
    /// Env `basic_auth`. (default: `false`)
    #[serde(with = "flag")]
    pub basic_auth: bool,
    /// Folder holding the files `basic-auth-user` and `basic-auth-password`, and
    /// optionally `drain-token` (see `drain_token`). Env `secret_mount_path`.
    /// (default: `"/var/secrets"`)
    pub secret_mount_path: PathBuf,
    /// Gateway user, instead of the file. Env `gateway_username`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_username: Option<String>,
    /// Gateway password, instead of the file; never logged. Env `gateway_password`.
    /// (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_password: Option<Secret>,
    /// Most deliveries (message × function) not yet finished, retries waiting included.
    /// As many messages more may wait in the dispatcher's hand-off queue; when that
    /// is full too, the source stops pulling. Env `max_inflight`. (default: `64`)
    pub max_inflight: usize,
    /// Attempts per delivery before it is dead-lettered. Env `max_attempts`. (default: `5`)
    pub max_attempts: u32,
    /// Backoff between attempts: full jitter between zero and
    /// `min(max, initial * 2^(attempt-1))`. (default: `{ initial = "500ms", max = "60s" }`)
    pub backoff: Backoff,
    /// Which response statuses mean delivered, retry or drop (anything else is
    /// dead-lettered). (default: delivered `["2xx"]`, retry `["408", "409", "425", "429",
    /// "5xx"]`, drop `[]`)
    pub status: StatusClasses,
    /// `block`: a delivery out of attempts that cannot be dead-lettered leaves its message
    /// unacknowledged with the broker; `drop`: it is acknowledged and counted as dropped.
    /// Env `on_exhausted`. (default: `"block"`)
    pub on_exhausted: OnExhausted,
    /// With `topics` set: `hold` leaves a message of a listed topic that no function
    /// subscribes to right now unacknowledged with the broker, to come back until one
    /// does; `ack` acknowledges and counts it. Without `topics`, the connector consumes
    /// only topics some function subscribes to, and a message of a topic whose last
    /// subscriber just left is acknowledged. Env `unmatched`. (default: `"hold"`)
    pub unmatched: Unmatched,
    /// `none`, `key` or `partition` (see each connector for what the key is).
    /// Env `ordering`. (default: `"none"`)
    pub ordering: Ordering,
    /// Batches for every function (a function's `connector.batch.*` annotations override
    /// them): `size` 1 (the default) sends one message per invocation.
    pub batch: crate::policy::BatchDefaults,
    /// On SIGTERM or SIGINT, how long in-flight invocations may take to finish before they
    /// are abandoned and their messages released. Env `drain_timeout`. (default: `"30s"`)
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// Address of `/metrics`, `/healthz`, `/readyz` and `/drain`. Env `metrics_addr`.
    /// (default: `"0.0.0.0:8081"`)
    pub metrics_addr: SocketAddr,
    /// The bearer token `POST /drain` must carry (`Authorization: Bearer <token>`) to stop
    /// the connector over HTTP; never logged. Unset: the file `drain-token` in
    /// `secret_mount_path` if there is one, else `/drain` is off (404) and only SIGTERM or
    /// SIGINT drain. Env `drain_token`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_token: Option<Secret>,
    /// Address of KEDA's external scaler (gRPC: `IsActive`, `StreamIsActive`,
    /// `GetMetricSpec`, `GetMetrics` on each function's backlog; see docs/scaling.md).
    /// Unset: not served. Env `scaler_addr`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaler_addr: Option<SocketAddr>,
    /// Report each function's backlog to the gateway (`POST /system/backlog`) whenever one
    /// turns zero or non-zero, and every second: the bundled gateway scales its functions
    /// on it (it sets this for the connectors it supervises). Off for an OpenFaaS gateway,
    /// which has no such route. Env `report_backlog`. (default: `false`)
    pub report_backlog: bool,
    /// `text` or `json`; the level comes from `RUST_LOG` (default `info`).
    /// Env `log_format`. (default: `"text"`)
    pub log_format: LogFormat,
    /// Idle keep-alive connections kept per host. (default: `128`)
    pub pool_max_idle_per_host: usize,
    /// How long an idle keep-alive connection is kept. (default: `"90s"`)
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
}

impl Default for SdkConfig {
    fn default() -> Self {
        Self {
            gateway_url: "http://127.0.0.1:8080".to_owned(),
            topics: Vec::new(),
            upstream_timeout: Duration::from_secs(30),
            rebuild_interval: Duration::from_secs(10),
            print_response: false,
            print_response_body: false,
            print_request_body: false,
            topic_delimiter: ",".to_owned(),
            asynchronous_invocation: false,
            callback_url: None,
            content_type: None,
            basic_auth: false,
            secret_mount_path: PathBuf::from("/var/secrets"),
            gateway_username: None,
            gateway_password: None,
            max_inflight: 64,
            max_attempts: 5,
            backoff: Backoff::default(),
            status: StatusClasses::default(),
            on_exhausted: OnExhausted::Block,
            unmatched: Unmatched::Hold,
            ordering: Ordering::None,
            batch: crate::policy::BatchDefaults::default(),
            drain_timeout: Duration::from_secs(30),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 8081)),
            drain_token: None,
            scaler_addr: None,
            report_backlog: false,
            log_format: LogFormat::Text,
            pool_max_idle_per_host: 128,
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

impl SdkConfig {
    /// Cross-field checks, run before anything connects. Keys are named as in TOML.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            errors.push(ConfigError::invalid(format!("connector.{key}"), message));
        };
        match reqwest::Url::parse(&self.gateway_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            Ok(url) => fail(
                "gateway_url",
                format!("scheme `{}` is not http or https", url.scheme()),
            ),
            Err(e) => fail(
                "gateway_url",
                format!("{:?} is not a URL: {e}", self.gateway_url),
            ),
        }
        if let Some(callback) = &self.callback_url
            && let Err(e) = reqwest::Url::parse(callback)
        {
            fail("callback_url", format!("{callback:?} is not a URL: {e}"));
        }
        if self.max_inflight == 0 {
            fail("max_inflight", "must be at least 1".to_owned());
        }
        if self.max_attempts == 0 {
            fail("max_attempts", "must be at least 1".to_owned());
        }
        if self.upstream_timeout.is_zero() {
            fail(
                "upstream_timeout",
                "must be above zero (an invocation without a timeout can hang forever)".to_owned(),
            );
        }
        if self.rebuild_interval.is_zero() {
            fail("rebuild_interval", "must be above zero".to_owned());
        }
        if self.backoff.initial > self.backoff.max {
            fail(
                "backoff.initial",
                format!(
                    "{} is longer than backoff.max {}",
                    humantime::format_duration(self.backoff.initial),
                    humantime::format_duration(self.backoff.max)
                ),
            );
        }
        if self
            .drain_token
            .as_ref()
            .is_some_and(|t| t.expose().trim().is_empty())
        {
            fail(
                "drain_token",
                "must not be empty (unset it to turn /drain off)".to_owned(),
            );
        }
        if self.gateway_username.is_some() != self.gateway_password.is_some() {
            fail(
                "gateway_username",
                "gateway_username and gateway_password are set together or not at all".to_owned(),
            );
        }
        ConfigErrors::check(errors)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use std::path::Path;

    use super::*;
    use figment::Jail;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct TestConfig {
        connector: SdkConfig,
        source: SourceSection,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct SourceSection {
        brokers: String,
        #[serde(with = "duration")]
        poll: Duration,
    }

    impl Default for SourceSection {
        fn default() -> Self {
            Self {
                brokers: "127.0.0.1:9092".into(),
                poll: Duration::from_secs(1),
            }
        }
    }

    const ENV: &[EnvVar] = &[EnvVar::new("broker_hosts", "source.brokers")];

    fn env() -> Vec<EnvVar> {
        SDK_ENV.iter().chain(ENV).copied().collect()
    }

    fn load_test(file: Option<&str>) -> Result<TestConfig, ConfigErrors> {
        load(file.map(Path::new), &env())
    }

    #[test]
    fn defaults_without_file_or_env() {
        Jail::expect_with(|_| {
            let c = load_test(None).unwrap();
            assert_eq!(c, TestConfig::default());
            c.connector.validate().unwrap();
            Ok(())
        });
    }

    #[test]
    fn file_then_env_layering() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
                [connector]
                gateway_url = "http://gw:8080"
                upstream_timeout = "1m30s"
                max_inflight = 8
                topics = ["a", "b"]

                [connector.backoff]
                initial = "100ms"

                [source]
                brokers = "k1:9092"
                "#,
            )?;
            let c = load_test(Some("c.toml")).unwrap();
            assert_eq!(c.connector.gateway_url, "http://gw:8080");
            assert_eq!(c.connector.upstream_timeout, Duration::from_secs(90));
            assert_eq!(c.connector.max_inflight, 8);
            assert_eq!(c.connector.topics, ["a", "b"]);
            assert_eq!(c.connector.backoff.initial, Duration::from_millis(100));
            assert_eq!(c.connector.backoff.max, Duration::from_secs(60));
            assert_eq!(c.source.brokers, "k1:9092");

            jail.set_env("gateway_url", "http://from-env:8080");
            jail.set_env("max_inflight", "3");
            jail.set_env("topics", "x, y,,z");
            jail.set_env("broker_hosts", "k2:9092");
            jail.set_env("print_response", "1");
            jail.set_env("basic_auth", "true");
            jail.set_env("asynchronous_invocation", "0");
            let c = load_test(Some("c.toml")).unwrap();
            assert_eq!(c.connector.gateway_url, "http://from-env:8080");
            assert_eq!(c.connector.max_inflight, 3);
            assert_eq!(c.connector.topics, ["x", "y", "z"]);
            assert_eq!(c.source.brokers, "k2:9092");
            assert!(c.connector.print_response);
            assert!(c.connector.basic_auth);
            assert!(!c.connector.asynchronous_invocation);
            assert_eq!(c.connector.upstream_timeout, Duration::from_secs(90));
            Ok(())
        });
    }

    #[test]
    fn status_classes_and_enums_from_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
                [connector]
                on_exhausted = "drop"
                ordering = "key"
                log_format = "json"
                [connector.status]
                retry = ["5xx", 404]
                "#,
            )?;
            let c = load_test(Some("c.toml")).unwrap();
            assert_eq!(c.connector.on_exhausted, OnExhausted::Drop);
            assert_eq!(c.connector.ordering, Ordering::Key);
            assert_eq!(c.connector.log_format, LogFormat::Json);
            assert_eq!(c.connector.status.retry.len(), 2);
            assert_eq!(
                c.connector.status.delivered,
                StatusClasses::default().delivered
            );

            jail.create_file("bad.toml", "[connector.status]\nretry = [\"6xx\"]\n")?;
            let errs = load_test(Some("bad.toml")).unwrap_err();
            assert!(
                errs.0[0].key.starts_with("connector.status.retry"),
                "{errs}"
            );
            Ok(())
        });
    }

    #[test]
    fn validation_names_the_key() {
        let c = SdkConfig {
            max_inflight: 0,
            gateway_url: "ftp://x".into(),
            drain_token: Some(Secret::new(" ")),
            ..SdkConfig::default()
        };
        let errs = c.validate().unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "connector.gateway_url",
                "connector.max_inflight",
                "connector.drain_token"
            ]
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = SdkConfig {
            gateway_password: Some(Secret::new("hunter2")),
            drain_token: Some(Secret::new("drain-hunter2")),
            ..SdkConfig::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
