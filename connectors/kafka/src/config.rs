//! The configuration: the SDK's `[connector]` section and our `[kafka]` section, with the
//! OpenFaaS Pro variable names (`broker_hosts`, `group`, `initial_offset`, `topics`), and
//! the librdkafka properties both clients are built from.
//!
//! ```toml
//! [connector]
//! gateway_url = "http://127.0.0.1:8080"
//! topics = ["orders"]          # or leave empty to follow the functions' annotations
//!
//! [kafka]
//! brokers = "kafka-1:9092,kafka-2:9092"
//! group = "faas-group-1"
//! dead_letter_topic = "orders-dead"
//!
//! [kafka.properties]           # both clients: TLS, SASL, tuning
//! "security.protocol" = "SASL_SSL"
//! "sasl.mechanism" = "SCRAM-SHA-512"
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use connector_sdk::SdkConfig;
use connector_sdk::config::{self, ConfigError, ConfigErrors, EnvVar, Ordering, SDK_ENV};
use rdkafka::ClientConfig;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The whole configuration of `kafka-connector`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Gateway, retries, concurrency, ordering, metrics: see `SdkConfig`. Here `ordering`
    /// defaults to `"partition"`: `partition` (records of one partition one after
    /// another), `key` (records with the same key in one partition one after another,
    /// different keys in parallel; records without a key in parallel) or `none`.
    pub connector: SdkConfig,
    /// The Kafka side.
    pub kafka: KafkaConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            connector: SdkConfig {
                ordering: Ordering::Partition,
                ..SdkConfig::default()
            },
            kafka: KafkaConfig::default(),
        }
    }
}

/// Where a consumer group without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitialOffset {
    /// The oldest record still in the partition (also written `oldest`, as OpenFaaS Pro
    /// does, `smallest` or `beginning`).
    #[default]
    Earliest,
    /// Only records produced from now on (also `newest`, `largest` or `end`).
    Latest,
}

impl InitialOffset {
    /// librdkafka's `auto.offset.reset` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
        }
    }
}

impl Serialize for InitialOffset {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for InitialOffset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim().to_ascii_lowercase().as_str() {
            "earliest" | "oldest" | "smallest" | "beginning" => Ok(Self::Earliest),
            "latest" | "newest" | "largest" | "end" => Ok(Self::Latest),
            _ => Err(serde::de::Error::custom(format!(
                "expected \"earliest\" (or \"oldest\") or \"latest\" (or \"newest\"), found {text:?}"
            ))),
        }
    }
}

/// A librdkafka property value; TOML numbers and booleans are written as librdkafka
/// expects them (`1000`, `true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// Text, passed as is.
    Text(String),
    /// An integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
    /// A number with a fraction.
    Float(f64),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Text(s) => f.write_str(s),
            Self::Integer(n) => write!(f, "{n}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Float(x) => write!(f, "{x}"),
        }
    }
}

/// `[kafka]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated (`bootstrap.servers`). Env `broker_hosts`
    /// (OpenFaaS Pro's name) or `broker_host`. (default: `"127.0.0.1:9092"`)
    pub brokers: String,
    /// Consumer group id; replicas with the same group split the partitions.
    /// Env `group`. (default: `"faas-group-1"`, as OpenFaaS Pro)
    pub group: String,
    /// Static group membership (`group.instance.id`, KIP-345): a stable, unique name per
    /// replica (a StatefulSet pod name). A replica restarted under the same name takes its
    /// partitions back at once instead of waiting for the group to notice the old process
    /// is gone and rebalancing. Env `instance_id`. (default: unset: dynamic membership)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Where a group without a committed offset starts: `earliest` (alias `oldest`) or
    /// `latest` (alias `newest`). Env `initial_offset`. (default: `"earliest"`)
    pub initial_offset: InitialOffset,
    /// Topic that receives a record whose delivery failed for good: the original key,
    /// payload and headers plus `x-dead-letter-*` provenance headers. Unset: such a record
    /// holds its partition (or is dropped with `on_exhausted = "drop"`).
    /// Env `dead_letter_topic`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// Topic that receives each function's non-empty 2xx response body, with correlation
    /// headers. A function's `reply-topic` annotation overrides it for that function.
    /// Env `reply_topic`. (default: unset: replies are discarded)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_topic: Option<String>,
    /// Replies carry a hop count (`x-connector-hops`); a reply to a record that already
    /// made this many hops is not published, so a function cannot loop on its own
    /// replies. (default: `4`)
    pub reply_max_hops: u32,
    /// The group session timeout (`session.timeout.ms`): a replica silent this long loses
    /// its partitions. (default: `"45s"`)
    #[serde(with = "config::duration")]
    pub session_timeout: Duration,
    /// On partition revoke, how long in-flight deliveries of the revoked partitions may
    /// take before their offsets are committed and the partitions handed over; must be
    /// shorter than `session_timeout`. Deliveries still running after it complete
    /// unacknowledged: the next owner delivers them again. (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub rebalance_drain_timeout: Duration,
    /// How often completed offsets are committed. Revokes and shutdown also commit.
    /// (default: `"1s"`)
    #[serde(with = "config::duration")]
    pub commit_interval: Duration,
    /// How often lag (log end offset minus committed offset) is measured per partition,
    /// and the brokers probed for `/readyz`. (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub lag_interval: Duration,
    /// Most records of one partition handed to the dispatcher and not yet complete;
    /// beyond it the partition is paused. `0` means automatic: `2` with
    /// `ordering = "partition"` (one running, one ready; more would only wait in line,
    /// hold in-flight slots other partitions could use, and lengthen the drain on
    /// revoke), otherwise only `max_inflight` bounds it. (default: `0`)
    pub max_pending_per_partition: usize,
    /// Most records read from the consumer and waiting for room in the dispatcher, over
    /// all partitions. While this buffer is full the connector stops reading (librdkafka
    /// keeps its own bounded prefetch, so nothing is fetched twice); if it stays full for
    /// a second, the partitions with waiting records are paused so that rebalances are
    /// still served, which drops librdkafka's prefetch for them. (default: `1024`)
    pub max_buffered: usize,
    /// A partition holding at a record (failed for good, not dead-lettered) delivers that
    /// record again on the backoff schedule (`connector.backoff`: `initial`, doubling,
    /// full jitter), so it recovers by itself once the function or the dead-letter topic
    /// is back, within `backoff.max`; functions see the record again (same `ce-id`). This
    /// caps the wait between those retries below `backoff.max`. (default: unset:
    /// `backoff.max`)
    #[serde(
        with = "config::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub hold_retry_interval: Option<Duration>,
    /// How long writing a dead letter or a reply may take (`message.timeout.ms` of the
    /// producer) before it counts as failed. (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub produce_timeout: Duration,
    /// librdkafka properties for both clients (TLS, SASL PLAIN or SCRAM, tuning); they
    /// override the connector's own settings. An unknown property or invalid value fails
    /// at start, naming it. (default: `{}`)
    pub properties: BTreeMap<String, PropertyValue>,
    /// librdkafka properties for the consumer only. (default: `{}`)
    pub consumer_properties: BTreeMap<String, PropertyValue>,
    /// librdkafka properties for the producer (dead letters, replies) only.
    /// (default: `{}`)
    pub producer_properties: BTreeMap<String, PropertyValue>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            group: "faas-group-1".to_owned(),
            instance_id: None,
            initial_offset: InitialOffset::Earliest,
            dead_letter_topic: None,
            reply_topic: None,
            reply_max_hops: 4,
            session_timeout: Duration::from_secs(45),
            rebalance_drain_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            lag_interval: Duration::from_secs(10),
            max_pending_per_partition: 0,
            max_buffered: 1024,
            hold_retry_interval: None,
            produce_timeout: Duration::from_secs(10),
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

/// Our variables, on top of the SDK's (`gateway_url`, `topics`, ...).
pub const ENV: &[EnvVar] = &[
    EnvVar::new("broker_host", "kafka.brokers"),
    EnvVar::new("broker_hosts", "kafka.brokers"),
    EnvVar::new("group", "kafka.group"),
    EnvVar::new("instance_id", "kafka.instance_id"),
    EnvVar::new("initial_offset", "kafka.initial_offset"),
    EnvVar::new("dead_letter_topic", "kafka.dead_letter_topic"),
    EnvVar::new("reply_topic", "kafka.reply_topic"),
];

/// Loads the configuration: defaults, then `file`, then environment variables; then the
/// cross-field checks.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigErrors> {
    let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
    let config: Config = config::load(file, &env)?;
    config.validate()?;
    Ok(config)
}

/// The consumer's settings the connector depends on for at-least-once; a property
/// table cannot change them.
const FIXED_CONSUMER: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

impl Config {
    /// The schedule of a held partition's retries: `backoff`, its cap lowered to
    /// `hold_retry_interval` when that is set and shorter.
    pub fn hold_backoff(
        &self,
        backoff: connector_sdk::backoff::Backoff,
    ) -> connector_sdk::backoff::Backoff {
        connector_sdk::backoff::Backoff {
            initial: backoff.initial,
            max: self
                .kafka
                .hold_retry_interval
                .map_or(backoff.max, |cap| cap.min(backoff.max)),
        }
    }

    /// `max_pending_per_partition` in force (`0`: no per-partition bound).
    pub fn effective_pending_per_partition(&self) -> usize {
        match (
            self.kafka.max_pending_per_partition,
            self.connector.ordering,
        ) {
            (0, Ordering::Partition) => 2,
            (n, _) => n,
        }
    }

    /// Cross-field checks, run before anything connects.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = match self.connector.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e.0,
        };
        let mut fail = |key: &str, message: String| {
            errors.push(ConfigError::invalid(format!("kafka.{key}"), message));
        };
        let k = &self.kafka;
        if k.brokers.split(',').all(|b| b.trim().is_empty()) {
            fail("brokers", "must name at least one broker".to_owned());
        }
        if k.group.trim().is_empty() {
            fail("group", "must not be empty".to_owned());
        }
        if k.max_buffered == 0 {
            fail("max_buffered", "must be at least 1".to_owned());
        }
        for (key, topic) in [
            ("dead_letter_topic", &k.dead_letter_topic),
            ("reply_topic", &k.reply_topic),
        ] {
            if let Some(t) = topic
                && !valid_topic_name(t)
            {
                fail(
                    key,
                    format!("{t:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"),
                );
            }
        }
        let mut topic_errors = Vec::new();
        for t in &self.connector.topics {
            if !valid_topic_name(t) {
                topic_errors.push(ConfigError {
                    key: "connector.topics".to_owned(),
                    origin: "configuration".to_owned(),
                    line: None,
                    message: format!(
                        "{t:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
                    ),
                });
            }
        }
        let session = self.effective_session_timeout();
        if k.rebalance_drain_timeout >= session {
            fail(
                "rebalance_drain_timeout",
                format!(
                    "{} is not shorter than the session timeout {}: the group would evict this replica while it drains",
                    humantime::format_duration(k.rebalance_drain_timeout),
                    humantime::format_duration(session)
                ),
            );
        }
        for (key, d) in [
            ("commit_interval", k.commit_interval),
            ("lag_interval", k.lag_interval),
            ("produce_timeout", k.produce_timeout),
            (
                "hold_retry_interval",
                k.hold_retry_interval.unwrap_or(Duration::MAX),
            ),
        ] {
            if d.is_zero() {
                fail(key, "must be above zero".to_owned());
            }
        }
        for table in ["properties", "consumer_properties"] {
            let map = if table == "properties" {
                &k.properties
            } else {
                &k.consumer_properties
            };
            for (name, _) in FIXED_CONSUMER {
                if map.contains_key(*name) {
                    fail(
                        &format!("{table}.{name}"),
                        "is managed by the connector (offsets are stored and committed only after delivery)".to_owned(),
                    );
                }
            }
        }
        errors.extend(topic_errors);
        ConfigErrors::check(errors)
    }

    /// The session timeout in force: `kafka.session_timeout` unless a property table sets
    /// `session.timeout.ms`.
    pub fn effective_session_timeout(&self) -> Duration {
        let k = &self.kafka;
        k.consumer_properties
            .get("session.timeout.ms")
            .or_else(|| k.properties.get("session.timeout.ms"))
            .and_then(|v| v.to_string().trim().parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(k.session_timeout)
    }

    /// The consumer's librdkafka configuration: our settings, then `properties`, then
    /// `consumer_properties`, then the fixed at-least-once settings.
    pub fn consumer_config(&self) -> ClientConfig {
        let k = &self.kafka;
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &k.brokers)
            .set("group.id", &k.group)
            .set("auto.offset.reset", k.initial_offset.as_str())
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", millis(k.session_timeout))
            .set("client.id", "kafka-connector")
            // Bounded prefetch: the resident memory target under load depends on it.
            .set("queued.max.messages.kbytes", "16384")
            .set("queued.min.messages", "10000")
            .set("fetch.max.bytes", "8388608")
            // With the prefetch bounded, a partition reaches its bound in one fetch; the
            // default second of back-off before fetching it again stalled the whole
            // consumer for that second (seen with tansu: 0.55 of the HTTP ceiling instead
            // of 0.85). Fetching again soon costs a request, not memory.
            .set("fetch.queue.backoff.ms", "10")
            // New topics from the annotations are found within seconds.
            .set("topic.metadata.refresh.interval.ms", "10000");
        if let Some(id) = k.instance_id.as_deref().filter(|id| !id.trim().is_empty()) {
            c.set("group.instance.id", id.trim());
        }
        apply(&mut c, &k.properties);
        apply(&mut c, &k.consumer_properties);
        for (name, value) in FIXED_CONSUMER {
            c.set(*name, *value);
        }
        c
    }

    /// The producer's librdkafka configuration (dead letters and replies): our
    /// settings, then `properties`, then `producer_properties`.
    pub fn producer_config(&self) -> ClientConfig {
        let k = &self.kafka;
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &k.brokers)
            .set("client.id", "kafka-connector")
            .set("message.timeout.ms", millis(k.produce_timeout))
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("queue.buffering.max.kbytes", "16384")
            .set("queue.buffering.max.messages", "10000");
        apply(&mut c, &k.properties);
        apply(&mut c, &k.producer_properties);
        c
    }
}

/// Whether `name` is a legal Kafka topic name: 1 to 249 of `[a-zA-Z0-9._-]`, not `.`
/// or `..`.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

fn apply(c: &mut ClientConfig, table: &BTreeMap<String, PropertyValue>) {
    for (name, value) in table {
        c.set(name, value.to_string());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid_and_order_by_partition() {
        Jail::expect_with(|_| {
            let c = load(None).unwrap();
            assert_eq!(c, Config::default());
            assert_eq!(c.connector.ordering, Ordering::Partition);
            assert_eq!(c.kafka.group, "faas-group-1");
            Ok(())
        });
    }

    #[test]
    fn openfaas_pro_variables_work() {
        Jail::expect_with(|jail| {
            jail.set_env("broker_hosts", "kf-kafka:9092");
            jail.set_env("group", "g2");
            jail.set_env("initial_offset", "oldest");
            jail.set_env("topics", "faas-request,payments");
            let c = load(None).unwrap();
            assert_eq!(c.kafka.brokers, "kf-kafka:9092");
            assert_eq!(c.kafka.group, "g2");
            assert_eq!(c.kafka.initial_offset, InitialOffset::Earliest);
            assert_eq!(c.connector.topics, ["faas-request", "payments"]);
            jail.set_env("initial_offset", "newest");
            assert_eq!(
                load(None).unwrap().kafka.initial_offset,
                InitialOffset::Latest
            );
            jail.set_env("initial_offset", "middle");
            let errs = load(None).unwrap_err();
            assert_eq!(errs.0[0].key, "initial_offset", "{errs}");
            Ok(())
        });
    }

    #[test]
    fn file_sections_and_properties() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "k.toml",
                r#"
                [connector]
                ordering = "key"
                [kafka]
                brokers = "a:1,b:2"
                dead_letter_topic = "dead"
                [kafka.properties]
                "security.protocol" = "SASL_SSL"
                "fetch.min.bytes" = 10
                "enable.ssl.certificate.verification" = true
                "#,
            )?;
            let c = load(Some(Path::new("k.toml"))).unwrap();
            assert_eq!(c.connector.ordering, Ordering::Key);
            let cc = c.consumer_config();
            assert_eq!(cc.get("security.protocol"), Some("SASL_SSL"));
            assert_eq!(cc.get("fetch.min.bytes"), Some("10"));
            assert_eq!(cc.get("enable.ssl.certificate.verification"), Some("true"));
            assert_eq!(cc.get("enable.auto.commit"), Some("false"));
            assert_eq!(cc.get("bootstrap.servers"), Some("a:1,b:2"));
            assert_eq!(cc.get("fetch.queue.backoff.ms"), Some("10"));
            assert_eq!(
                c.producer_config().get("security.protocol"),
                Some("SASL_SSL")
            );
            Ok(())
        });
    }

    /// librdkafka checks `security.protocol` and `sasl.mechanism` against what it was
    /// built with when a client is created: without OpenSSL, SSL, SASL_SSL and SCRAM fail
    /// at start. No broker is contacted here.
    #[test]
    fn tls_and_scram_are_built_in() {
        let mut c = Config::default();
        for (name, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "connector"),
            ("sasl.password", "secret"),
        ] {
            c.kafka
                .properties
                .insert(name.into(), PropertyValue::Text(value.into()));
        }
        let consumer: Result<rdkafka::consumer::BaseConsumer, _> = c.consumer_config().create();
        assert!(consumer.is_ok(), "{:?}", consumer.err());
        let producer: Result<rdkafka::producer::BaseProducer, _> = c.producer_config().create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }

    #[test]
    fn drain_must_be_shorter_than_the_session() {
        let mut c = Config::default();
        c.kafka.rebalance_drain_timeout = Duration::from_secs(60);
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.0[0].key, "kafka.rebalance_drain_timeout", "{errs}");
        c.kafka.rebalance_drain_timeout = Duration::from_secs(5);
        c.kafka
            .properties
            .insert("session.timeout.ms".into(), PropertyValue::Integer(4000));
        assert!(c.validate().is_err());
    }

    #[test]
    fn topic_names_are_checked() {
        assert!(valid_topic_name("orders.v1_eu-west"));
        assert!(!valid_topic_name("with space"));
        assert!(!valid_topic_name(".."));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name(&"x".repeat(250)));
        let mut c = Config::default();
        c.connector.topics = vec!["ok".into(), "not ok".into()];
        c.kafka.dead_letter_topic = Some(String::new());
        let errs = c.validate().unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["kafka.dead_letter_topic", "connector.topics"],
            "{errs}"
        );
    }

    #[test]
    fn auto_commit_cannot_be_turned_back_on() {
        let mut c = Config::default();
        c.kafka.consumer_properties.insert(
            "enable.auto.commit".into(),
            PropertyValue::Text("true".into()),
        );
        let errs = c.validate().unwrap_err();
        assert_eq!(
            errs.0[0].key, "kafka.consumer_properties.enable.auto.commit",
            "{errs}"
        );
    }

    #[test]
    fn the_example_config_documents_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/kafka.toml");
        Jail::expect_with(|_| {
            let c = load(Some(&path)).unwrap();
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named() {
        Jail::expect_with(|jail| {
            jail.create_file("k.toml", "[kafka]\nbroker = \"x\"\n")?;
            let errs = load(Some(Path::new("k.toml"))).unwrap_err();
            assert_eq!(errs.0[0].key, "kafka.broker", "{errs}");
            assert_eq!(errs.0[0].line, Some(2));
            Ok(())
        });
    }
}
