//! Configuration: built-in defaults, then a TOML file, then environment variables.
//!
//! Every binary has one config struct whose sections are plain structs (no
//! `#[serde(flatten)]`, which would break figment's attribution of errors to their source).
//! The SDK's own section is [`SdkConfig`], under `[connector]` in TOML. Environment
//! variables are read by name from an explicit table ([`EnvVar`]), so the OpenFaaS names
//! (`gateway_url`, `topics`, `upstream_timeout`, ...) work as they do there, and an error in
//! one names the variable, not an internal key path.
//!
//! ```toml
//! [connector]
//! gateway_url = "http://127.0.0.1:8080"
//! upstream_timeout = "30s"
//! max_inflight = 64
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::verdict::StatusClasses;

/// A configuration error: which key, where it came from, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key as the user wrote it: `connector.max_inflight` in a file, `max_inflight`
    /// as a variable.
    pub key: String,
    /// Where the value came from: `file /etc/x.toml`, `environment variable max_inflight`,
    /// or `default`.
    pub origin: String,
    /// The line in the file, when the key is found there.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration")?;
        if !self.key.is_empty() {
            write!(f, " key `{}`", self.key)?;
        }
        write!(f, " ({}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        write!(f, "): {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Several configuration errors, reported together so a user fixes them in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigError {
    /// An error about `key` found by a cross-field check, not tied to a file or variable.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            origin: "configuration".to_owned(),
            line: None,
            message: message.into(),
        }
    }
}

impl ConfigErrors {
    /// One error about `key`, not tied to a file or variable (a cross-field check).
    pub fn single(key: &str, message: impl Into<String>) -> Self {
        Self(vec![ConfigError::invalid(key, message)])
    }

    /// `Ok` when the checks found nothing, else all their errors.
    pub fn check(errors: Vec<ConfigError>) -> Result<(), Self> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Self(errors))
        }
    }
}

/// An environment variable read into a config key: `name` is the variable, `key` the dotted
/// path in the config struct (`connector.gateway_url`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvVar {
    /// The variable's name, exactly as set in the environment.
    pub name: &'static str,
    /// The dotted key it sets.
    pub key: &'static str,
}

impl EnvVar {
    /// `name` sets `key`.
    pub const fn new(name: &'static str, key: &'static str) -> Self {
        Self { name, key }
    }
}

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
    EnvVar::new("drain_timeout", "connector.drain_timeout"),
    EnvVar::new("metrics_addr", "connector.metrics_addr"),
    EnvVar::new("drain_token", "connector.drain_token"),
    EnvVar::new("log_format", "connector.log_format"),
];

/// Loads a binary's configuration: `C::default()`, then `file` (which must exist when
/// given), then the variables of `env` that are set. Every problem is reported with its key
/// and origin; a TOML syntax error with its line.
pub fn load<C>(file: Option<&Path>, env: &[EnvVar]) -> Result<C, ConfigErrors>
where
    C: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(C::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigErrors(vec![ConfigError {
                key: String::new(),
                origin: format!("file {}", path.display()),
                line: None,
                message: "no such file".to_owned(),
            }]));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(EnvProvider { vars: env.to_vec() });
    figment
        .extract::<C>()
        .map_err(|e| ConfigErrors(e.into_iter().map(describe).collect()))
}

/// Turns one figment error into a [`ConfigError`] naming the key the user wrote.
fn describe(e: figment::Error) -> ConfigError {
    let mut path = e.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &e.kind
        && path.last() != Some(field)
    {
        path.push(field.clone());
    }
    let dotted = path.join(".");
    let (key, origin, line) = match e.metadata.as_ref() {
        Some(md) => match &md.source {
            Some(figment::Source::File(file)) => {
                let line = line_of(file, &path);
                (dotted, format!("file {}", file.display()), line)
            }
            _ if md.name == ENV_SOURCE => {
                let name = md.interpolate(&Profile::Default, &path);
                (name.clone(), format!("environment variable {name}"), None)
            }
            _ => (dotted, md.name.to_string(), None),
        },
        None => (dotted, "configuration".to_owned(), None),
    };
    ConfigError {
        key,
        origin,
        line,
        message: e.kind.to_string(),
    }
}

/// The 1-based line where `path` is set in the TOML file `file`, if it can be found.
fn line_of(file: &Path, path: &[String]) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let doc: toml_edit::ImDocument<&str> = toml_edit::ImDocument::parse(text.as_str()).ok()?;
    let mut item: &toml_edit::Item = doc.as_item();
    let mut span = None;
    for segment in path {
        let table = item.as_table_like()?;
        let (key, value) = table.get_key_value(segment)?;
        span = key.span().or_else(|| value.span());
        item = value;
    }
    let offset = span?.start;
    Some(text.get(..offset)?.matches('\n').count() + 1)
}

const ENV_SOURCE: &str = "environment variable";

/// Reads exactly the listed variables. Values are parsed as figment parses environment
/// values (`true`, `64`, `[a, b]`, else a string); the fields' deserializers accept the
/// OpenFaaS spellings (`1` for true, `a,b` for a list).
struct EnvProvider {
    vars: Vec<EnvVar>,
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        let names: BTreeMap<String, String> = self
            .vars
            .iter()
            .map(|v| (v.key.to_owned(), v.name.to_owned()))
            .collect();
        Metadata::named(ENV_SOURCE).interpolater(move |_profile, keys| {
            let dotted = keys.join(".");
            names.get(&dotted).cloned().unwrap_or(dotted)
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for var in &self.vars {
            let Ok(raw) = std::env::var(var.name) else {
                continue;
            };
            let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
            merge_into(&mut dict, figment::util::nest(var.key, value));
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn merge_into(dict: &mut Dict, nested: Value) {
    let Value::Dict(_, incoming) = nested else {
        return;
    };
    for (k, v) in incoming {
        match (dict.get_mut(&k), v) {
            (Some(Value::Dict(_, existing)), Value::Dict(tag, inner)) => {
                merge_into(existing, Value::Dict(tag, inner));
            }
            (_, v) => {
                dict.insert(k, v);
            }
        }
    }
}

/// Serde helpers for durations written as `30s`, `500ms`, `1m30s`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as humantime text (`1m 30s`).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Reads a duration from text with units; a bare number is refused because its unit
    /// would be a guess.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(text) => parse(&text).map_err(serde::de::Error::custom),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "a duration needs a unit: write \"{n}s\" or \"{n}ms\""
            ))),
        }
    }

    /// Parses `30s`, `500ms`, `1m30s`, `1h`.
    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|e| {
            format!(
                "invalid duration {text:?} ({e}); write it like \"30s\", \"500ms\" or \"1m30s\""
            )
        })
    }

    /// The same for `Option<Duration>`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `Some` as text; `None` is skipped by the field's attributes.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Reads an optional duration.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Duration);
            Option::<Wrap>::deserialize(d).map(|w| w.map(|Wrap(d)| d))
        }
    }
}

/// Reads a bool as OpenFaaS does: `true`/`false`, `1`/`0` (also as text).
pub mod flag {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a plain bool.
    pub fn serialize<S: Serializer>(b: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*b)
    }

    /// Accepts `true`, `false`, `1`, `0`, `"true"`, `"1"`, ...
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Int(i64),
            Text(String),
        }
        let bad = |v: &dyn std::fmt::Display| {
            serde::de::Error::custom(format!("expected true, false, 1 or 0, found {v}"))
        };
        match Raw::deserialize(d)? {
            Raw::Bool(b) => Ok(b),
            Raw::Int(1) => Ok(true),
            Raw::Int(0) => Ok(false),
            Raw::Int(n) => Err(bad(&n)),
            Raw::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" | "" => Ok(false),
                _ => Err(bad(&format!("{t:?}"))),
            },
        }
    }
}

/// Reads a list either as an array or as one comma-separated string (`topics=a,b`).
pub mod list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes an array.
    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    /// Accepts `["a", "b"]` or `"a, b"`; entries are trimmed and empties dropped.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            Text(String),
            Int(i64),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(Item),
            Many(Vec<Item>),
        }
        let items = match Raw::deserialize(d)? {
            Raw::One(item) => vec![item],
            Raw::Many(items) => items,
        };
        Ok(items
            .into_iter()
            .flat_map(|item| match item {
                Item::Text(t) => t.split(',').map(|s| s.trim().to_owned()).collect(),
                Item::Int(n) => vec![n.to_string()],
            })
            .filter(|s| !s.is_empty())
            .collect())
    }
}

/// A value that is never printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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
            drain_timeout: Duration::from_secs(30),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 8081)),
            drain_token: None,
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
    fn unknown_key_names_file_line_and_key() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[connector]\ngateway_url = \"http://gw\"\n\n[source]\nbrokerz = \"x\"\n",
            )?;
            let errs = load_test(Some("c.toml")).unwrap_err();
            let e = &errs.0[0];
            assert_eq!(e.key, "source.brokerz");
            assert!(e.origin.ends_with("c.toml"), "{e}");
            assert_eq!(e.line, Some(5));
            assert!(e.message.contains("unknown field"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn wrong_type_in_file_names_key_and_line() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[connector]\nmax_inflight = \"many\"\nupstream_timeout = 30\n",
            )?;
            let errs = load_test(Some("c.toml")).unwrap_err();
            let text = errs.to_string();
            let e = errs
                .0
                .iter()
                .find(|e| e.key == "connector.max_inflight")
                .unwrap_or_else(|| panic!("{text}"));
            assert_eq!(e.line, Some(2), "{text}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[connector]\nupstream_timeout = 30\n")?;
            let errs = load_test(Some("c.toml")).unwrap_err();
            let e = &errs.0[0];
            assert_eq!(e.key, "connector.upstream_timeout");
            assert_eq!(e.line, Some(2));
            assert!(e.message.contains("\"30s\""), "{e}");
            Ok(())
        });
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[connector]\ngateway_url = \n")?;
            let errs = load_test(Some("c.toml")).unwrap_err();
            let text = errs.to_string();
            assert!(text.contains("c.toml"), "{text}");
            assert!(text.contains("line 2"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        Jail::expect_with(|_| {
            let errs = load_test(Some("nope.toml")).unwrap_err();
            assert!(errs.to_string().contains("nope.toml"));
            assert!(errs.to_string().contains("no such file"));
            Ok(())
        });
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        Jail::expect_with(|jail| {
            jail.set_env("max_inflight", "lots");
            jail.set_env("upstream_timeout", "soon");
            let errs = load_test(None).unwrap_err();
            let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
            assert!(keys.contains(&"max_inflight"), "{errs}");
            let e = errs.0.iter().find(|e| e.key == "max_inflight").unwrap();
            assert_eq!(e.origin, "environment variable max_inflight");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("print_response", "maybe");
            let errs = load_test(None).unwrap_err();
            assert_eq!(errs.0[0].key, "print_response", "{errs}");
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
