//! The configuration: the SDK's `[connector]` section and our `[rabbitmq]` section, layered
//! by `connector_sdk::config::load` (defaults, `--config` TOML, environment variables).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use connector_sdk::SdkConfig;
use connector_sdk::config::{self, ConfigError, ConfigErrors, EnvVar, SDK_ENV, Secret};
use lapin::uri::{AMQPScheme, AMQPUri};
use serde::{Deserialize, Serialize};

/// The whole configuration of `rabbitmq-connector`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Gateway, topics, retries, concurrency, metrics: see `SdkConfig`. Topics are routing
    /// keys or topic-exchange patterns (`orders.*`, `orders.#`), bound to `exchange`.
    pub connector: SdkConfig,
    /// Where and how to consume RabbitMQ.
    pub rabbitmq: RabbitConfig,
}

/// The queue type a declared queue gets (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Replicated, durable, with a delivery count (`x-delivery-count`) that continues the
    /// attempts across redeliveries (default).
    #[default]
    Quorum,
    /// A classic durable queue: no delivery count, a requeued message keeps its place.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

/// `[rabbitmq]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitConfig {
    /// Broker URL: `amqp://[user:password@]host:port/vhost` (the vhost URL-encoded, `%2f`
    /// for `/`), or `amqps://` for TLS (certificates checked against the bundled web PKI
    /// roots, or `tls_ca_file`). Query options such as `?heartbeat=10` are honoured.
    /// Env `rabbitmq_url`. (default: `"amqp://127.0.0.1:5672/%2f"`)
    pub url: String,
    /// User name, overriding the URL's. Env `rabbitmq_username`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password, overriding the URL's; never logged. Env `rabbitmq_password`.
    /// (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// PEM file of the CA that signed the broker's certificate (with `amqps://`), instead
    /// of the bundled web PKI roots. Env `rabbitmq_tls_ca_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// The queue consumed; replicas share it and split its messages.
    /// Env `rabbitmq_queue`. (default: `"faas-connector"`)
    pub queue: String,
    /// Declare the queue (durable, `queue_type`), bind it to `exchange` with every topic,
    /// and declare the dead-letter exchange and queue. `false`: they must exist (a missing
    /// queue stops the connector), and bindings are left as they are.
    /// Env `rabbitmq_declare`. (default: `true`)
    #[serde(with = "config::flag")]
    pub declare: bool,
    /// `quorum` or `classic`, for a queue this connector declares.
    /// Env `rabbitmq_queue_type`. (default: `"quorum"`)
    pub queue_type: QueueType,
    /// The topic exchange the queue is bound to, one binding per topic (the configured
    /// `topics`, else every function's `topic`, followed without a restart). Empty: no
    /// bindings; the queue is consumed as it is. Env `rabbitmq_exchange`.
    /// (default: `"amq.topic"`)
    pub exchange: String,
    /// Exchange dead letters are published to (with publisher confirms), with the original
    /// routing key; declared as a durable topic exchange when `declare` is on. Empty: no
    /// dead letters (a delivery that failed for good is requeued after `hold_delay`, or
    /// dropped with `on_exhausted = "drop"`). Env `rabbitmq_dead_letter_exchange`.
    /// (default: `"faas.dead-letter"`)
    pub dead_letter_exchange: String,
    /// The queue that keeps the dead letters, bound to `dead_letter_exchange` with `#`
    /// when `declare` is on, and read by `replay`; `{queue}` is replaced by `queue`.
    /// Env `rabbitmq_dead_letter_queue`. (default: `"{queue}.dead-letter"`)
    pub dead_letter_queue: String,
    /// Replies (the AMQP RPC pattern): a message with a `reply_to` property gets the
    /// function's response published to `reply_to`, with the request's `correlation_id`,
    /// the response's content type and the HTTP status in `X-Function-Status`, confirmed
    /// by the broker before the request is acknowledged. Env `rabbitmq_reply`.
    /// (default: `true`)
    #[serde(with = "config::flag")]
    pub reply: bool,
    /// The exchange replies are published to, with `reply_to` as the routing key. Empty:
    /// the default exchange, where `reply_to` names the requester's queue (or is
    /// `amq.rabbitmq.reply-to`'s direct reply-to address). A named exchange must exist.
    /// Env `rabbitmq_reply_exchange`. (default: `""`)
    pub reply_exchange: String,
    /// A request that has already made this many hops (its `x-connector-hops` header, one
    /// more on each reply) gets no reply: a chain that turns replies back into requests
    /// cannot loop forever. Env `rabbitmq_reply_max_hops`. (default: `4`)
    pub reply_max_hops: u32,
    /// How long a message that failed for good and could not be dead-lettered stays
    /// unacknowledged before it is requeued (`basic.nack` with requeue) and delivered
    /// again. Env `rabbitmq_hold_delay`. (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub hold_delay: Duration,
    /// How often the queue depth is read (passive `queue.declare`) for `/metrics`.
    /// (default: `"5s"`)
    #[serde(with = "config::duration")]
    pub metrics_interval: Duration,
    /// Timeout of connecting and of each declaration. Env `rabbitmq_command_timeout`.
    /// (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub command_timeout: Duration,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://127.0.0.1:5672/%2f".to_owned(),
            username: None,
            password: None,
            tls_ca_file: None,
            queue: "faas-connector".to_owned(),
            declare: true,
            queue_type: QueueType::Quorum,
            exchange: "amq.topic".to_owned(),
            dead_letter_exchange: "faas.dead-letter".to_owned(),
            dead_letter_queue: "{queue}.dead-letter".to_owned(),
            reply: true,
            reply_exchange: String::new(),
            reply_max_hops: 4,
            hold_delay: Duration::from_secs(5),
            metrics_interval: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
        }
    }
}

impl RabbitConfig {
    /// The URL with the configured credentials on top (validated by [`Config::validate`]).
    pub fn uri(&self) -> Result<AMQPUri, String> {
        let mut uri = AMQPUri::from_str(&self.url)?;
        if let Some(user) = &self.username {
            uri.authority.userinfo.username.clone_from(user);
        }
        if let Some(password) = &self.password {
            password
                .expose()
                .clone_into(&mut uri.authority.userinfo.password);
        }
        Ok(uri)
    }

    /// The dead-letter queue's name.
    pub fn dead_letter_queue(&self) -> String {
        self.dead_letter_queue.replace("{queue}", &self.queue)
    }
}

/// Our variables, on top of the SDK's (`gateway_url`, `topics`, ...).
pub const ENV: &[EnvVar] = &[
    EnvVar::new("rabbitmq_url", "rabbitmq.url"),
    EnvVar::new("rabbitmq_username", "rabbitmq.username"),
    EnvVar::new("rabbitmq_password", "rabbitmq.password"),
    EnvVar::new("rabbitmq_tls_ca_file", "rabbitmq.tls_ca_file"),
    EnvVar::new("rabbitmq_queue", "rabbitmq.queue"),
    EnvVar::new("rabbitmq_declare", "rabbitmq.declare"),
    EnvVar::new("rabbitmq_queue_type", "rabbitmq.queue_type"),
    EnvVar::new("rabbitmq_exchange", "rabbitmq.exchange"),
    EnvVar::new(
        "rabbitmq_dead_letter_exchange",
        "rabbitmq.dead_letter_exchange",
    ),
    EnvVar::new("rabbitmq_dead_letter_queue", "rabbitmq.dead_letter_queue"),
    EnvVar::new("rabbitmq_reply", "rabbitmq.reply"),
    EnvVar::new("rabbitmq_reply_exchange", "rabbitmq.reply_exchange"),
    EnvVar::new("rabbitmq_reply_max_hops", "rabbitmq.reply_max_hops"),
    EnvVar::new("rabbitmq_hold_delay", "rabbitmq.hold_delay"),
    EnvVar::new("rabbitmq_command_timeout", "rabbitmq.command_timeout"),
];

/// Loads the configuration: defaults, then `--config FILE`, then environment variables;
/// then the cross-field checks.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
    let config: Config = config::load(path, &env)?;
    config.validate()?;
    Ok(config)
}

/// AMQP names (queues, exchanges, routing keys) are short strings: at most 255 bytes.
const MAX_NAME: usize = 255;

impl Config {
    /// Cross-field checks, run before anything connects. Keys are named as in TOML.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.connector.validate()?;
        let r = &self.rabbitmq;
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            errors.push(ConfigError::invalid(format!("rabbitmq.{key}"), message));
        };
        match AMQPUri::from_str(&r.url) {
            Err(e) => fail("url", format!("not an AMQP URL: {e}")),
            Ok(uri) => {
                if r.tls_ca_file.is_some() && uri.scheme != AMQPScheme::AMQPS {
                    fail(
                        "tls_ca_file",
                        "a CA file is set but the url is not amqps://".to_owned(),
                    );
                }
            }
        }
        if let Some(path) = &r.tls_ca_file
            && !path.is_file()
        {
            fail("tls_ca_file", format!("no such file {}", path.display()));
        }
        if r.queue.trim().is_empty() {
            fail("queue", "must not be empty".to_owned());
        }
        for (key, name) in [
            ("queue", r.queue.clone()),
            ("exchange", r.exchange.clone()),
            ("dead_letter_exchange", r.dead_letter_exchange.clone()),
            ("dead_letter_queue", r.dead_letter_queue()),
            ("reply_exchange", r.reply_exchange.clone()),
        ] {
            if name.len() > MAX_NAME {
                fail(key, format!("longer than {MAX_NAME} bytes"));
            }
        }
        if !r.dead_letter_exchange.is_empty() && r.dead_letter_queue().trim().is_empty() {
            fail(
                "dead_letter_queue",
                "must not be empty while dead_letter_exchange is set".to_owned(),
            );
        }
        if r.dead_letter_queue() == r.queue {
            fail(
                "dead_letter_queue",
                "must differ from queue: dead letters would be consumed again".to_owned(),
            );
        }
        if r.hold_delay.is_zero() {
            fail(
                "hold_delay",
                "must be above zero (a held message would come straight back)".to_owned(),
            );
        }
        if r.reply && r.reply_max_hops == 0 {
            fail(
                "reply_max_hops",
                "must be above zero (no request could be answered; use reply = false)".to_owned(),
            );
        }
        if r.metrics_interval.is_zero() {
            fail("metrics_interval", "must be above zero".to_owned());
        }
        if r.command_timeout.is_zero() {
            fail("command_timeout", "must be above zero".to_owned());
        }
        for topic in &self.connector.topics {
            if topic.len() > MAX_NAME {
                errors.push(ConfigError::invalid(
                    "connector.topics",
                    format!("{topic:?} is longer than {MAX_NAME} bytes"),
                ));
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
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/rabbitmq.toml");
        Jail::expect_with(|_| {
            assert_eq!(load(Some(Path::new(path))).unwrap(), Config::default());
            Ok(())
        });
    }

    #[test]
    fn file_then_environment_and_credentials_over_the_url() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[connector]\ntopics = [\"orders.*\"]\n\n[rabbitmq]\nurl = \"amqps://u:old@mq.internal:5671/prod\"\nqueue = \"billing\"\nhold_delay = \"2s\"\n",
            )?;
            jail.set_env("rabbitmq_queue_type", "classic");
            jail.set_env("rabbitmq_password", "s3cret");
            jail.set_env("rabbitmq_reply", "false");
            jail.set_env("rabbitmq_reply_exchange", "rpc");
            let c = load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(c.connector.topics, ["orders.*"]);
            assert_eq!(c.rabbitmq.queue, "billing");
            assert_eq!(c.rabbitmq.queue_type, QueueType::Classic);
            assert_eq!(c.rabbitmq.hold_delay, Duration::from_secs(2));
            assert!(!c.rabbitmq.reply);
            assert_eq!(c.rabbitmq.reply_exchange, "rpc");
            assert_eq!(c.rabbitmq.dead_letter_queue(), "billing.dead-letter");
            let uri = c.rabbitmq.uri().unwrap();
            assert_eq!(uri.authority.userinfo.username, "u");
            assert_eq!(uri.authority.userinfo.password, "s3cret");
            assert_eq!(uri.vhost, "prod");
            assert!(!format!("{c:?}").contains("s3cret"));
            Ok(())
        });
    }

    #[test]
    fn errors_name_key_and_origin() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[rabbitmq]\nqueue = \"q\"\nhold_delay = 5\n")?;
            let e = load(Some(Path::new("c.toml"))).unwrap_err().to_string();
            assert!(e.contains("rabbitmq.hold_delay"), "{e}");
            assert!(e.contains("line 3"), "{e}");
            jail.create_file("b.toml", "[rabbitmq]\nbogus = 1\n")?;
            let e = load(Some(Path::new("b.toml"))).unwrap_err().to_string();
            assert!(e.contains("rabbitmq.bogus"), "{e}");
            jail.create_file("d.toml", "")?;
            jail.set_env("rabbitmq_queue_type", "stream");
            let e = load(Some(Path::new("d.toml"))).unwrap_err().to_string();
            assert!(
                e.contains("environment variable rabbitmq_queue_type"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn cross_field_checks() {
        let mut c = Config::default();
        c.rabbitmq.url = "http://nope".into();
        c.rabbitmq.queue = "q".into();
        c.rabbitmq.dead_letter_queue = "{queue}".into();
        c.rabbitmq.hold_delay = Duration::ZERO;
        c.rabbitmq.exchange = "x".repeat(300);
        c.rabbitmq.reply_max_hops = 0;
        c.connector.topics = vec!["t".repeat(256)];
        let e = c.validate().unwrap_err().to_string();
        for key in [
            "rabbitmq.url",
            "rabbitmq.dead_letter_queue",
            "rabbitmq.hold_delay",
            "rabbitmq.exchange",
            "rabbitmq.reply_max_hops",
            "connector.topics",
        ] {
            assert!(e.contains(key), "missing {key} in {e}");
        }
        let mut c = Config::default();
        c.rabbitmq.tls_ca_file = Some("/nonexistent/ca.pem".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not amqps://"), "{e}");
        assert!(e.contains("no such file /nonexistent/ca.pem"), "{e}");
    }
}
