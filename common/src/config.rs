//! Configuration loading shared by every binary: built-in defaults, then a TOML file, then
//! environment variables.
//!
//! Every binary has one config struct whose sections are plain structs (no
//! `#[serde(flatten)]`, which would break figment's attribution of errors to their source).
//! Environment variables are read by name from an explicit table ([`EnvVar`]), so a binary
//! can keep the names its users already set (OpenFaaS's `gateway_url`, `upstream_timeout`,
//! ...), and an error in one names the variable, not an internal key path. What a section
//! holds is each binary's business: the connectors' `[connector]` section lives in
//! connector-sdk, the gateway's sections in the gateway.
//!
//! The serde helpers [`duration`], [`flag`] and [`list`] read the spellings users write
//! (`"30s"`, `1` for true, `"a,b"`); [`Secret`] keeps a value out of logs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A configuration error: which key, where it came from, and what is wrong with it.
///
/// `Display` is written by hand below: the key and the line are left out when unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// Several configuration errors, reported together so a user fixes them in one go; the
/// error type of [`load`] and of every binary's cross-field checks. `Display` puts one
/// error on each line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backoff::Backoff;
    use figment::Jail;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct TestConfig {
        server: ServerSection,
        source: SourceSection,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct ServerSection {
        url: String,
        #[serde(with = "duration")]
        timeout: Duration,
        max_inflight: usize,
        #[serde(with = "list")]
        topics: Vec<String>,
        #[serde(with = "flag")]
        verbose: bool,
        #[serde(with = "flag")]
        quiet: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        password: Option<Secret>,
        backoff: Backoff,
    }

    impl Default for ServerSection {
        fn default() -> Self {
            Self {
                url: "http://127.0.0.1:8080".into(),
                timeout: Duration::from_secs(30),
                max_inflight: 64,
                topics: Vec::new(),
                verbose: false,
                quiet: true,
                password: None,
                backoff: Backoff::default(),
            }
        }
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

    const ENV: &[EnvVar] = &[
        EnvVar::new("url", "server.url"),
        EnvVar::new("timeout", "server.timeout"),
        EnvVar::new("max_inflight", "server.max_inflight"),
        EnvVar::new("topics", "server.topics"),
        EnvVar::new("verbose", "server.verbose"),
        EnvVar::new("quiet", "server.quiet"),
        EnvVar::new("password", "server.password"),
        EnvVar::new("broker_hosts", "source.brokers"),
    ];

    fn load_test(file: Option<&str>) -> Result<TestConfig, ConfigErrors> {
        load(file.map(Path::new), ENV)
    }

    #[test]
    fn defaults_without_file_or_env() {
        Jail::expect_with(|_| {
            assert_eq!(load_test(None).unwrap(), TestConfig::default());
            Ok(())
        });
    }

    #[test]
    fn file_then_env_layering() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
                [server]
                url = "http://gw:8080"
                timeout = "1m30s"
                max_inflight = 8
                topics = ["a", "b"]

                [server.backoff]
                initial = "100ms"

                [source]
                brokers = "k1:9092"
                "#,
            )?;
            let c = load_test(Some("c.toml")).unwrap();
            assert_eq!(c.server.url, "http://gw:8080");
            assert_eq!(c.server.timeout, Duration::from_secs(90));
            assert_eq!(c.server.max_inflight, 8);
            assert_eq!(c.server.topics, ["a", "b"]);
            assert_eq!(c.server.backoff.initial, Duration::from_millis(100));
            assert_eq!(c.server.backoff.max, Duration::from_secs(60));
            assert_eq!(c.source.brokers, "k1:9092");

            jail.set_env("url", "http://from-env:8080");
            jail.set_env("max_inflight", "3");
            jail.set_env("topics", "x, y,,z");
            jail.set_env("broker_hosts", "k2:9092");
            jail.set_env("verbose", "1");
            jail.set_env("quiet", "0");
            jail.set_env("password", "hunter2");
            let c = load_test(Some("c.toml")).unwrap();
            assert_eq!(c.server.url, "http://from-env:8080");
            assert_eq!(c.server.max_inflight, 3);
            assert_eq!(c.server.topics, ["x", "y", "z"]);
            assert_eq!(c.source.brokers, "k2:9092");
            assert!(c.server.verbose);
            assert!(!c.server.quiet);
            assert_eq!(c.server.password, Some(Secret::new("hunter2")));
            assert_eq!(c.server.timeout, Duration::from_secs(90));
            Ok(())
        });
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[server]\nurl = \"http://gw\"\n\n[source]\nbrokerz = \"x\"\n",
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
                "[server]\nmax_inflight = \"many\"\ntimeout = 30\n",
            )?;
            let errs = load_test(Some("c.toml")).unwrap_err();
            let text = errs.to_string();
            let e = errs
                .0
                .iter()
                .find(|e| e.key == "server.max_inflight")
                .unwrap_or_else(|| panic!("{text}"));
            assert_eq!(e.line, Some(2), "{text}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[server]\ntimeout = 30\n")?;
            let errs = load_test(Some("c.toml")).unwrap_err();
            let e = &errs.0[0];
            assert_eq!(e.key, "server.timeout");
            assert_eq!(e.line, Some(2));
            assert!(e.message.contains("\"30s\""), "{e}");
            Ok(())
        });
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[server]\nurl = \n")?;
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
            jail.set_env("timeout", "soon");
            let errs = load_test(None).unwrap_err();
            let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
            assert!(keys.contains(&"max_inflight"), "{errs}");
            let e = errs.0.iter().find(|e| e.key == "max_inflight").unwrap();
            assert_eq!(e.origin, "environment variable max_inflight");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("verbose", "maybe");
            let errs = load_test(None).unwrap_err();
            assert_eq!(errs.0[0].key, "verbose", "{errs}");
            Ok(())
        });
    }

    #[test]
    fn cross_field_errors_are_listed_one_per_line() {
        assert_eq!(ConfigErrors::check(Vec::new()), Ok(()));
        let errs = ConfigErrors::check(vec![
            ConfigError::invalid("server.url", "not a URL"),
            ConfigError::invalid("server.max_inflight", "must be at least 1"),
        ])
        .unwrap_err();
        assert_eq!(
            errs.to_string(),
            "invalid configuration key `server.url` (configuration): not a URL\n\
             invalid configuration key `server.max_inflight` (configuration): must be at least 1"
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = TestConfig {
            server: ServerSection {
                password: Some(Secret::new("hunter2")),
                ..ServerSection::default()
            },
            ..TestConfig::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(Secret::new("hunter2").expose(), "hunter2");
    }
}
