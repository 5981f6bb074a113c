//! `sqs-connector`'s configuration: the SDK's `[connector]` section and `[sqs]`.

use std::path::Path;
use std::time::Duration;

use connector_sdk::SdkConfig;
use connector_sdk::config::{self, ConfigError, ConfigErrors, EnvVar, Ordering, SDK_ENV, Secret};
use serde::{Deserialize, Serialize};

/// SQS's own limits.
pub const MAX_WAIT_TIME: Duration = Duration::from_secs(20);
/// At most this many messages per ReceiveMessage (and per batch request).
pub const MAX_BATCH: i32 = 10;
/// SQS's longest visibility timeout (12 hours).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// `[sqs]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqsConfig {
    /// Queues to consume, by name (`orders`, `orders.fifo`) or URL
    /// (`https://sqs.eu-west-1.amazonaws.com/123456789012/orders`). Each message's topic is
    /// its queue's name unless `topic_attribute` says otherwise. Env `sqs_queues`,
    /// comma-separated; OpenFaaS's `queue_url` works too. (default: `[]`, which is an error)
    #[serde(with = "config::list")]
    pub queues: Vec<String>,
    /// AWS region; unset means the standard chain (`AWS_REGION`, `AWS_DEFAULT_REGION`,
    /// the profile, IMDS), and `us-east-1` when that finds none but `endpoint_url` is set.
    /// Env `sqs_region`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Another SQS endpoint: LocalStack, ElasticMQ or moto (`http://127.0.0.1:4566`).
    /// Env `sqs_endpoint_url`. (default: unset: AWS)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Static access key, instead of the standard credential chain (environment,
    /// profile, web identity, ECS, IMDS). Set it together with `secret_access_key`; prefer
    /// the chain outside tests. Env `sqs_access_key_id`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// The secret of `access_key_id`; never logged. Env `sqs_secret_access_key`.
    /// (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Secret>,
    /// A String message attribute naming the message's topic; messages without it go to
    /// their queue's name. Several topics can then share one queue. Env
    /// `sqs_topic_attribute`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_attribute: Option<String>,
    /// Long-poll wait of one ReceiveMessage, at most `20s`. Env `sqs_wait_time`.
    /// (default: `"20s"`)
    #[serde(with = "config::duration")]
    pub wait_time: Duration,
    /// Messages per ReceiveMessage, 1 to 10. Env `sqs_max_messages`. (default: `10`)
    pub max_messages: i32,
    /// Concurrent ReceiveMessage loops per queue. Env `sqs_pollers`. (default: `2`)
    pub pollers: usize,
    /// How long a received message stays invisible to other consumers; the heartbeat
    /// renews it while the message's deliveries run. Env `sqs_visibility_timeout`.
    /// (default: `"30s"`)
    #[serde(with = "config::duration")]
    pub visibility_timeout: Duration,
    /// Renew the visibility of messages still in flight every quarter of
    /// `visibility_timeout`, so long invocations are not redelivered meanwhile (retries
    /// do not need it: a retrying message is given back with its backoff delay). Without it, `visibility_timeout` must exceed
    /// `connector.upstream_timeout`. Env `sqs_heartbeat`. (default: `true`)
    #[serde(with = "config::flag")]
    pub heartbeat: bool,
    /// Where dead letters go: a queue name or URL. Each one is the original body with
    /// `x-dead-letter-*` message attributes, written before the original is deleted.
    /// Unset: failed messages are left to the queue's own redrive policy (each comes back
    /// after a backoff delay, and SQS moves it after `maxReceiveCount` receives).
    /// Env `sqs_dead_letter_queue`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
    /// How often the queues' visible, in-flight and delayed counts are read for
    /// `/metrics`. Env `sqs_metrics_interval`. (default: `"15s"`)
    #[serde(with = "config::duration")]
    pub metrics_interval: Duration,
}

impl Default for SqsConfig {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            region: None,
            endpoint_url: None,
            access_key_id: None,
            secret_access_key: None,
            topic_attribute: None,
            wait_time: MAX_WAIT_TIME,
            max_messages: MAX_BATCH,
            pollers: 2,
            visibility_timeout: Duration::from_secs(30),
            heartbeat: true,
            dead_letter_queue: None,
            metrics_interval: Duration::from_secs(15),
        }
    }
}

/// The whole configuration of `sqs-connector`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The SDK section: gateway, retries, metrics address.
    pub connector: SdkConfig,
    /// The queues and how they are consumed.
    pub sqs: SqsConfig,
}

/// This connector's variables, on top of the SDK's.
pub const ENV: &[EnvVar] = &[
    EnvVar::new("sqs_queues", "sqs.queues"),
    EnvVar::new("queue_url", "sqs.queues"),
    EnvVar::new("sqs_region", "sqs.region"),
    EnvVar::new("sqs_endpoint_url", "sqs.endpoint_url"),
    EnvVar::new("sqs_access_key_id", "sqs.access_key_id"),
    EnvVar::new("sqs_secret_access_key", "sqs.secret_access_key"),
    EnvVar::new("sqs_topic_attribute", "sqs.topic_attribute"),
    EnvVar::new("sqs_wait_time", "sqs.wait_time"),
    EnvVar::new("sqs_max_messages", "sqs.max_messages"),
    EnvVar::new("sqs_pollers", "sqs.pollers"),
    EnvVar::new("sqs_visibility_timeout", "sqs.visibility_timeout"),
    EnvVar::new("sqs_heartbeat", "sqs.heartbeat"),
    EnvVar::new("sqs_dead_letter_queue", "sqs.dead_letter_queue"),
    EnvVar::new("sqs_metrics_interval", "sqs.metrics_interval"),
];

impl Config {
    /// Defaults, then `file`, then the environment; then cross-field checks.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
        let config: Self = config::load(file, &env)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that need several fields.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.connector.validate()?;
        let sqs = &self.sqs;
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            errors.push(ConfigError::invalid(key.to_owned(), message));
        };
        if sqs.queues.is_empty() {
            fail(
                "sqs.queues",
                "set at least one queue name or URL (env sqs_queues)".to_owned(),
            );
        }
        if sqs.wait_time > MAX_WAIT_TIME {
            fail(
                "sqs.wait_time",
                "must be at most 20s (SQS's limit)".to_owned(),
            );
        }
        if !(1..=MAX_BATCH).contains(&sqs.max_messages) {
            fail("sqs.max_messages", "must be from 1 to 10".to_owned());
        }
        if sqs.pollers == 0 {
            fail("sqs.pollers", "must be at least 1".to_owned());
        }
        if sqs.visibility_timeout < Duration::from_secs(3)
            || sqs.visibility_timeout > MAX_VISIBILITY
        {
            fail(
                "sqs.visibility_timeout",
                "must be from 3s to 12h (SQS's limit is 12h; the heartbeat needs whole seconds)"
                    .to_owned(),
            );
        }
        let timeout = self.connector.upstream_timeout;
        if !sqs.heartbeat && sqs.visibility_timeout <= timeout {
            fail(
                "sqs.visibility_timeout",
                format!(
                    "{} does not cover connector.upstream_timeout ({}) and sqs.heartbeat is off, so \
                     a message could be redelivered while its function still runs; set \
                     sqs.visibility_timeout above {}, or set \
                     sqs.heartbeat = true",
                    humantime::format_duration(sqs.visibility_timeout),
                    humantime::format_duration(timeout),
                    humantime::format_duration(timeout),
                ),
            );
        }
        if sqs.access_key_id.is_some() != sqs.secret_access_key.is_some() {
            fail(
                "sqs.access_key_id",
                "set sqs.access_key_id and sqs.secret_access_key together or not at all".to_owned(),
            );
        }
        if sqs.metrics_interval < Duration::from_secs(1) {
            fail("sqs.metrics_interval", "must be at least 1s".to_owned());
        }
        ConfigErrors::check(errors)
    }

    /// Whether any queue is a FIFO queue (its name ends in `.fifo`).
    pub fn has_fifo_queue(&self) -> bool {
        self.sqs.queues.iter().any(|q| is_fifo(q))
    }

    /// The SDK section the runtime is built with: FIFO queues need per-group order, so
    /// `ordering = "none"` becomes `"key"` (the key is the MessageGroupId) when one is
    /// consumed.
    pub fn sdk_config(&self) -> SdkConfig {
        let mut sdk = self.connector.clone();
        if self.has_fifo_queue() && sdk.ordering == Ordering::None {
            sdk.ordering = Ordering::Key;
        }
        sdk
    }
}

/// Whether the queue named or addressed by `queue` is FIFO.
pub fn is_fifo(queue: &str) -> bool {
    queue.trim_end_matches('/').ends_with(".fifo")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn the_documented_example_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/sqs.toml");
        let example: Config = config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(example, Config::default());
    }

    #[test]
    fn defaults_need_a_queue() {
        Jail::expect_with(|_| {
            let errs = Config::load(None).unwrap_err();
            assert_eq!(errs.0[0].key, "sqs.queues");
            Ok(())
        });
    }

    #[test]
    fn file_and_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "sqs.toml",
                "[sqs]\nqueues = [\"a\", \"b.fifo\"]\nwait_time = \"5s\"\nendpoint_url = \"http://127.0.0.1:4566\"\n",
            )?;
            jail.set_env("sqs_pollers", "4");
            jail.set_env("queue_url", "https://sqs.eu-west-1.amazonaws.com/1/x,y");
            let c = Config::load(Some(Path::new("sqs.toml"))).unwrap();
            assert_eq!(
                c.sqs.queues,
                ["https://sqs.eu-west-1.amazonaws.com/1/x", "y"]
            );
            assert_eq!(c.sqs.pollers, 4);
            assert_eq!(c.sqs.wait_time, Duration::from_secs(5));
            assert!(!c.has_fifo_queue());
            Ok(())
        });
    }

    #[test]
    fn fifo_queues_turn_on_key_ordering() {
        let mut c = Config::default();
        c.sqs.queues = vec!["orders.fifo".into()];
        assert_eq!(c.sdk_config().ordering, Ordering::Key);
        c.sqs.queues = vec!["orders".into()];
        assert_eq!(c.sdk_config().ordering, Ordering::None);
    }

    #[test]
    fn visibility_must_cover_the_invocation_without_heartbeat() {
        let mut c = Config::default();
        c.sqs.queues = vec!["q".into()];
        c.validate().unwrap();
        c.sqs.heartbeat = false;
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.0[0].key, "sqs.visibility_timeout");
        assert!(errs.0[0].message.contains("sqs.heartbeat = true"), "{errs}");
        c.sqs.visibility_timeout = Duration::from_secs(60);
        c.validate().unwrap();
    }

    #[test]
    fn limits_are_checked() {
        let mut c = Config::default();
        c.sqs.queues = vec!["q".into()];
        c.sqs.max_messages = 11;
        c.sqs.wait_time = Duration::from_secs(21);
        c.sqs.access_key_id = Some("AKIA".into());
        let keys: Vec<String> = c
            .validate()
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(
            keys,
            ["sqs.wait_time", "sqs.max_messages", "sqs.access_key_id"]
        );
    }
}
