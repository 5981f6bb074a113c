//! `nats-connector`'s configuration: the SDK's `[connector]` section, `[nats]` (the
//! connection, credentials and mode) and `[jetstream]` (stream, consumer, dead letters).
//!
//! OpenFaaS's variables keep working: `broker_host` (a host, port 4222) and `topics`
//! (the subjects, comma-separated).

use std::path::{Path, PathBuf};
use std::time::Duration;

use connector_sdk::SdkConfig;
use connector_sdk::config::{self, ConfigError, ConfigErrors, EnvVar, SDK_ENV, Secret};
use serde::{Deserialize, Serialize};

use crate::subject;

/// How messages are consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Core NATS subscriptions in a queue group: at-most-once. A message that arrives
    /// while no replica is connected, or whose delivery fails for good, is gone (default,
    /// as OpenFaaS's nats-connector).
    #[default]
    Core,
    /// A durable JetStream pull consumer per subject: at-least-once, acknowledged only
    /// once every function accepted the message or it was dead-lettered.
    Jetstream,
}

/// Where a new JetStream consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicy {
    /// Every message still in the stream (default).
    #[default]
    All,
    /// Only messages published after the consumer was created.
    New,
}

/// `[nats]`: the connection and the mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://`, `tls://`). Env `nats_url`.
    /// (default: `"nats://127.0.0.1:4222"`)
    pub url: String,
    /// OpenFaaS's variable: a host name; the URL becomes `nats://<host>:4222` (a
    /// `host:port` keeps its port). When set it wins over `url`. Env `broker_host`.
    /// (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_host: Option<String>,
    /// `core` (at-most-once) or `jetstream` (at-least-once). Env `nats_mode`.
    /// (default: `"core"`)
    pub mode: Mode,
    /// The client name the server shows in its connection list. Env `nats_client_name`.
    /// (default: `"nats-connector"`)
    pub client_name: String,
    /// Core mode: the queue group every replica joins, so each message goes to one
    /// replica. Empty means no group: every replica gets every message.
    /// Env `nats_queue_group`. (default: `"openfaas_nats_worker_group"`)
    pub queue_group: String,
    /// Core mode: a message with a reply subject (a NATS request) gets the function's
    /// response back: the body as is, the status in the `X-Function-Status` header.
    /// Env `nats_reply`. (default: `true`)
    #[serde(with = "config::flag")]
    pub reply: bool,
    /// Core mode: messages buffered per subscription before the server counts this
    /// client as a slow consumer and drops (core NATS is at-most-once).
    /// (default: `65536`)
    pub subscription_capacity: usize,
    /// How long one connection attempt may take. (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts (exponential backoff from 100 ms up to
    /// this). (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub reconnect_max_delay: Duration,
    /// Token authentication. Env `nats_token`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// User for user/password authentication. Env `nats_user`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password for `user`; never logged. Env `nats_password`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// NKey seed (`SU...`) for nkey authentication. Env `nats_nkey`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey: Option<Secret>,
    /// A `.creds` file (JWT and seed) for decentralised authentication.
    /// Env `nats_credentials_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Require TLS even for `nats://` URLs. Env `nats_tls_required`. (default: `false`)
    #[serde(with = "config::flag")]
    pub tls_required: bool,
    /// PEM file of CA certificates to trust, besides the system's. Env `nats_tls_ca_file`.
    /// (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key_file`).
    /// Env `nats_tls_cert_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`. Env `nats_tls_key_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            broker_host: None,
            mode: Mode::Core,
            client_name: "nats-connector".to_owned(),
            queue_group: "openfaas_nats_worker_group".to_owned(),
            reply: true,
            subscription_capacity: 65_536,
            connect_timeout: Duration::from_secs(5),
            reconnect_max_delay: Duration::from_secs(5),
            token: None,
            user: None,
            password: None,
            nkey: None,
            credentials_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl NatsConfig {
    /// The server URLs to connect to: `broker_host` as OpenFaaS builds it, else `url`.
    pub fn servers(&self) -> Vec<String> {
        match self.broker_host.as_deref().map(str::trim) {
            Some(host) if !host.is_empty() => {
                if host.contains("://") {
                    vec![host.to_owned()]
                } else if host.contains(':') {
                    vec![format!("nats://{host}")]
                } else {
                    vec![format!("nats://{host}:4222")]
                }
            }
            _ => self
                .url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// `[jetstream]`: used in `jetstream` mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// The stream to consume. Env `nats_stream`. (default: `"openfaas"`)
    pub stream: String,
    /// Create the stream at start when it does not exist, with `stream_subjects`.
    /// Env `nats_create_stream`. (default: `false`)
    #[serde(with = "config::flag")]
    pub create_stream: bool,
    /// Subjects of a stream created here; empty means the configured `topics`.
    /// (default: `[]`)
    #[serde(with = "config::list")]
    pub stream_subjects: Vec<String>,
    /// Base name of the durable consumers. One consumer is made per subscribed subject
    /// (nats-server before 2.10 has one filter subject per consumer), named
    /// `<consumer>_<subject with . * > replaced>_<hash>`; replicas share them and split
    /// the work. Env `nats_consumer`. (default: `"nats-connector"`)
    pub consumer: String,
    /// Where a consumer created here starts: `all` or `new`. (default: `"all"`)
    pub deliver_policy: DeliverPolicy,
    /// How long the server waits for an acknowledgement before redelivering. In-progress
    /// acknowledgements every `in_progress_interval` keep long invocations from being
    /// redelivered. Env `nats_ack_wait`. (default: `"30s"`)
    #[serde(with = "config::duration")]
    pub ack_wait: Duration,
    /// How often messages being worked on are reported in progress (`+WPI`); `"0s"`
    /// turns it off, and then `ack_wait` must exceed `connector.upstream_timeout`.
    /// (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub in_progress_interval: Duration,
    /// Most unacknowledged messages per consumer across all replicas: the server stops
    /// handing out messages past it. Env `nats_max_ack_pending`. (default: `256`)
    pub max_ack_pending: i64,
    /// Messages asked for per pull request. (default: `32`)
    pub batch: usize,
    /// How long one pull request waits for messages. (default: `"30s"`)
    #[serde(with = "config::duration")]
    pub pull_expires: Duration,
    /// Where dead letters are published, through JetStream (a stream must capture the
    /// subject): `{subject}` is replaced by the original subject. The original payload and
    /// headers go with `x-dead-letter-*` provenance headers, then the message is
    /// terminated. Unset: a delivery that fails for good is not acknowledged; the message
    /// is nakked with backoff and stays in the stream (or is acknowledged and dropped with
    /// `connector.on_exhausted = "drop"`). Env `nats_dead_letter_subject`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_subject: Option<String>,
    /// How often each consumer's pending and ack-pending counts are read for
    /// `/metrics`. (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub backlog_interval: Duration,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            stream: "openfaas".to_owned(),
            create_stream: false,
            stream_subjects: Vec::new(),
            consumer: "nats-connector".to_owned(),
            deliver_policy: DeliverPolicy::All,
            ack_wait: Duration::from_secs(30),
            in_progress_interval: Duration::from_secs(10),
            max_ack_pending: 256,
            batch: 32,
            pull_expires: Duration::from_secs(30),
            dead_letter_subject: None,
            backlog_interval: Duration::from_secs(5),
        }
    }
}

impl JetStreamConfig {
    /// The dead-letter subject for a message on `subject`.
    pub fn dead_letter_subject_for(&self, subject: &str) -> Option<String> {
        self.dead_letter_subject
            .as_deref()
            .map(|t| t.replace("{subject}", subject))
    }
}

/// The whole configuration of `nats-connector`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The SDK section: gateway, topics, retries, metrics address.
    pub connector: SdkConfig,
    /// The connection.
    pub nats: NatsConfig,
    /// JetStream mode.
    pub jetstream: JetStreamConfig,
}

/// This connector's variables, on top of the SDK's.
pub const ENV: &[EnvVar] = &[
    EnvVar::new("nats_url", "nats.url"),
    EnvVar::new("broker_host", "nats.broker_host"),
    EnvVar::new("nats_mode", "nats.mode"),
    EnvVar::new("nats_client_name", "nats.client_name"),
    EnvVar::new("nats_queue_group", "nats.queue_group"),
    EnvVar::new("nats_reply", "nats.reply"),
    EnvVar::new("nats_token", "nats.token"),
    EnvVar::new("nats_user", "nats.user"),
    EnvVar::new("nats_password", "nats.password"),
    EnvVar::new("nats_nkey", "nats.nkey"),
    EnvVar::new("nats_credentials_file", "nats.credentials_file"),
    EnvVar::new("nats_tls_required", "nats.tls_required"),
    EnvVar::new("nats_tls_ca_file", "nats.tls_ca_file"),
    EnvVar::new("nats_tls_cert_file", "nats.tls_cert_file"),
    EnvVar::new("nats_tls_key_file", "nats.tls_key_file"),
    EnvVar::new("nats_stream", "jetstream.stream"),
    EnvVar::new("nats_create_stream", "jetstream.create_stream"),
    EnvVar::new("nats_consumer", "jetstream.consumer"),
    EnvVar::new("nats_ack_wait", "jetstream.ack_wait"),
    EnvVar::new("nats_max_ack_pending", "jetstream.max_ack_pending"),
    EnvVar::new("nats_dead_letter_subject", "jetstream.dead_letter_subject"),
];

impl Config {
    /// Defaults, then `file`, then the environment; then cross-field checks.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
        let config: Self = config::load(file, &env)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that need several fields or a parse; every error names its key.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.connector.validate()?;
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            errors.push(ConfigError::invalid(key.to_owned(), message));
        };
        for topic in &self.connector.topics {
            if let Err(e) = subject::validate_pattern(topic) {
                fail("connector.topics", format!("`{topic}` {e}"));
            }
        }
        let servers = self.nats.servers();
        if servers.is_empty() {
            fail("nats.url", "no server URL given".to_owned());
        }
        for url in &servers {
            if let Err(e) = url.parse::<async_nats::ServerAddr>() {
                fail("nats.url", format!("`{url}` is not a NATS URL: {e}"));
            }
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            fail(
                "nats.user",
                "nats.user and nats.password are set together or not at all".to_owned(),
            );
        }
        let methods = [
            self.nats.token.is_some(),
            self.nats.user.is_some(),
            self.nats.nkey.is_some(),
            self.nats.credentials_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            fail(
                "nats.token",
                "choose one of token, user and password, nkey, credentials_file".to_owned(),
            );
        }
        if let Some(path) = &self.nats.credentials_file
            && !path.is_file()
        {
            fail(
                "nats.credentials_file",
                format!("{} is not a readable file", path.display()),
            );
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            fail(
                "nats.tls_cert_file",
                "nats.tls_cert_file and nats.tls_key_file are set together or not at all"
                    .to_owned(),
            );
        }
        for (key, path) in [
            ("nats.tls_ca_file", &self.nats.tls_ca_file),
            ("nats.tls_cert_file", &self.nats.tls_cert_file),
            ("nats.tls_key_file", &self.nats.tls_key_file),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                fail(key, format!("{} is not a readable file", path.display()));
            }
        }
        if self.nats.subscription_capacity == 0 {
            fail(
                "nats.subscription_capacity",
                "must be at least 1".to_owned(),
            );
        }
        if self.nats.mode == Mode::Jetstream {
            self.validate_jetstream(&mut fail);
        }
        ConfigErrors::check(errors)
    }

    fn validate_jetstream(&self, fail: &mut impl FnMut(&str, String)) {
        let js = &self.jetstream;
        if let Err(e) = subject::validate_name(&js.stream) {
            fail("jetstream.stream", format!("`{}` {e}", js.stream));
        }
        if let Err(e) = subject::validate_name(&js.consumer) {
            fail("jetstream.consumer", format!("`{}` {e}", js.consumer));
        }
        for s in &js.stream_subjects {
            if let Err(e) = subject::validate_pattern(s) {
                fail("jetstream.stream_subjects", format!("`{s}` {e}"));
            }
        }
        if js.create_stream && js.stream_subjects.is_empty() && self.connector.topics.is_empty() {
            fail(
                "jetstream.stream_subjects",
                "create_stream needs the stream's subjects: set jetstream.stream_subjects or connector.topics"
                    .to_owned(),
            );
        }
        if let Some(template) = &js.dead_letter_subject {
            let example = template.replace("{subject}", "orders.created");
            if let Err(e) = subject::validate_subject(&example) {
                fail(
                    "jetstream.dead_letter_subject",
                    format!("`{template}` {e} (a wildcard cannot be published to)"),
                );
            }
        }
        if js.ack_wait < Duration::from_secs(1) {
            fail("jetstream.ack_wait", "must be at least 1s".to_owned());
        }
        let wpi = js.in_progress_interval;
        if wpi.is_zero() {
            if js.ack_wait <= self.connector.upstream_timeout {
                fail(
                    "jetstream.ack_wait",
                    format!(
                        "{} is not longer than connector.upstream_timeout {} and in-progress acknowledgements are off: a slow invocation would be redelivered while it runs; raise ack_wait or set in_progress_interval",
                        humantime::format_duration(js.ack_wait),
                        humantime::format_duration(self.connector.upstream_timeout)
                    ),
                );
            }
        } else if wpi * 2 > js.ack_wait {
            fail(
                "jetstream.in_progress_interval",
                format!(
                    "{} is more than half of jetstream.ack_wait {}: one late report would let the server redeliver a message still being worked on; make it at most a third of ack_wait",
                    humantime::format_duration(wpi),
                    humantime::format_duration(js.ack_wait)
                ),
            );
        }
        if js.max_ack_pending < 1 {
            fail("jetstream.max_ack_pending", "must be at least 1".to_owned());
        }
        if js.batch == 0 {
            fail("jetstream.batch", "must be at least 1".to_owned());
        }
        if js.pull_expires < Duration::from_secs(1) {
            fail("jetstream.pull_expires", "must be at least 1s".to_owned());
        }
        if js.backlog_interval.is_zero() {
            fail(
                "jetstream.backlog_interval",
                "must be above zero".to_owned(),
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid_core_mode_with_openfaas_queue_group() {
        Jail::expect_with(|_| {
            let c = Config::load(None).unwrap();
            assert_eq!(c.nats.mode, Mode::Core);
            assert_eq!(c.nats.queue_group, "openfaas_nats_worker_group");
            assert_eq!(c.nats.servers(), ["nats://127.0.0.1:4222"]);
            Ok(())
        });
    }

    #[test]
    fn the_documented_example_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/nats.toml");
        let example: Config = config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(example, Config::default());
    }

    #[test]
    fn openfaas_variables_work() {
        Jail::expect_with(|jail| {
            jail.set_env("broker_host", "nats");
            jail.set_env("topics", "orders.*, payments.>,");
            jail.set_env("nats_mode", "jetstream");
            jail.set_env("nats_token", "s3cret");
            let c = Config::load(None).unwrap();
            assert_eq!(c.nats.servers(), ["nats://nats:4222"]);
            assert_eq!(c.connector.topics, ["orders.*", "payments.>"]);
            assert_eq!(c.nats.mode, Mode::Jetstream);
            assert!(!format!("{c:?}").contains("s3cret"));
            Ok(())
        });
        let host_port = NatsConfig {
            broker_host: Some("10.0.0.1:4333".into()),
            ..NatsConfig::default()
        };
        assert_eq!(host_port.servers(), ["nats://10.0.0.1:4333"]);
    }

    #[test]
    fn an_invalid_subject_is_refused_with_its_name() {
        Jail::expect_with(|jail| {
            jail.set_env("topics", "good.subject,bad..subject, also bad");
            let errs = Config::load(None).unwrap_err();
            let text = errs.to_string();
            assert!(text.contains("bad..subject"), "{text}");
            assert!(text.contains("also bad"), "{text}");
            assert!(errs.0.iter().all(|e| e.key == "connector.topics"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn jetstream_timeouts_are_checked() {
        let mut c = Config::default();
        c.nats.mode = Mode::Jetstream;
        c.jetstream.ack_wait = Duration::from_secs(10);
        c.jetstream.in_progress_interval = Duration::from_secs(8);
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.0[0].key, "jetstream.in_progress_interval");
        c.jetstream.in_progress_interval = Duration::ZERO;
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.0[0].key, "jetstream.ack_wait");
        assert!(errs.to_string().contains("upstream_timeout"));
        c.jetstream.ack_wait = Duration::from_secs(60);
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "nats.toml",
                "[nats]\nmode = \"jetstream\"\n[jetstream]\ndead_letter_subject = \"dlq.*\"\nstream = \"a.b\"\n",
            )?;
            let errs = Config::load(Some(Path::new("nats.toml"))).unwrap_err();
            let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
            assert!(keys.contains(&"jetstream.stream"), "{errs}");
            assert!(keys.contains(&"jetstream.dead_letter_subject"), "{errs}");
            jail.create_file("nats.toml", "[nats]\nmode = \"sometimes\"\n")?;
            let errs = Config::load(Some(Path::new("nats.toml"))).unwrap_err();
            assert_eq!(errs.0[0].key, "nats.mode");
            assert_eq!(errs.0[0].line, Some(2));
            jail.create_file("nats.toml", "[nats]\nuser = \"u\"\n")?;
            let errs = Config::load(Some(Path::new("nats.toml"))).unwrap_err();
            assert_eq!(errs.0[0].key, "nats.user");
            Ok(())
        });
    }
}
