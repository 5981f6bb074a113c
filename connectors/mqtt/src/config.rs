//! The configuration: the SDK's `[connector]` section and our `[mqtt]` section, layered by
//! `connector_sdk::config::load` (defaults, `--config` TOML, environment variables). The
//! variables OpenFaaS's mqtt-connector has keep their names (`broker`, `topic`,
//! `client_id`, `qos`); the rest are `mqtt_*`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use connector_sdk::SdkConfig;
use connector_sdk::config::{self, ConfigError, ConfigErrors, EnvVar, SDK_ENV, Secret};
use serde::{Deserialize, Serialize};

/// The whole configuration of `mqtt-connector`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Gateway, topics, retries, concurrency, metrics: see `SdkConfig`. Topics are MQTT
    /// topic filters (`sensors/+/temperature`, `sensors/#`).
    pub connector: SdkConfig,
    /// Where and how to consume MQTT.
    pub mqtt: MqttConfig,
}

/// The MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// MQTT 5: user properties, shared subscriptions, session expiry, dead letters
    /// (default).
    #[default]
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1: no properties, so no headers from the publisher and no dead letters.
    #[serde(rename = "3.1.1")]
    V311,
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker URL: `tcp://host:1883` (or `mqtt://`), `ssl://host:8883` (or `mqtts://`,
    /// `tls://`) for TLS, the certificate checked against the bundled web PKI roots or
    /// `tls_ca_file`. Env `broker`. (default: `"tcp://127.0.0.1:1883"`)
    pub broker: String,
    /// `"5"` or `"3.1.1"`. Env `mqtt_protocol`. (default: `"5"`)
    pub protocol: Protocol,
    /// The client id: stable, so the broker keeps the session (subscriptions and
    /// unacknowledged messages) across restarts. Replicas sharing a subscription need
    /// different ids. Env `client_id`. (default: `"faas-mqtt-connector"`)
    pub client_id: String,
    /// Start a new session on each connect. Off, a message acknowledged by nobody is
    /// delivered again after a reconnect or restart. Env `clean_session`.
    /// (default: `false`)
    #[serde(with = "config::flag")]
    pub clean_session: bool,
    /// Subscription QoS: `1` (at least once: PUBACK after every delivery is terminal) or
    /// `0` (at most once). Env `qos`. (default: `1`)
    pub qos: u8,
    /// User name. Env `mqtt_username`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password; never logged. Env `mqtt_password`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// PEM file of the CA that signed the broker's certificate (with a TLS `broker`).
    /// Env `mqtt_tls_ca_file`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// MQTT 5 shared subscription group: each filter is subscribed as
    /// `$share/<group>/<filter>`, so replicas in the group split the messages. Empty: a
    /// plain subscription (every replica gets every message). Env `mqtt_share_group`.
    /// (default: `""`)
    pub share_group: String,
    /// Deliver retained messages (sent by the broker on subscribing). Env
    /// `mqtt_retained`. (default: `false`)
    #[serde(with = "config::flag")]
    pub retained: bool,
    /// Keep-alive interval (whole seconds). Env `mqtt_keep_alive`. (default: `"30s"`)
    #[serde(with = "config::duration")]
    pub keep_alive: Duration,
    /// MQTT 5: how long the broker keeps the session after a disconnect (whole
    /// seconds). Env `mqtt_session_expiry`. (default: `"1day"`)
    #[serde(with = "config::duration")]
    pub session_expiry: Duration,
    /// Timeout of connecting (whole seconds). Env `mqtt_connect_timeout`.
    /// (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// MQTT 5: topic dead letters are published to (QoS 1, not retained), with the
    /// provenance as user properties. Messages on it are never consumed as events.
    /// Empty: no dead letters. Env `mqtt_dead_letter_topic`.
    /// (default: `"faas/dead-letter"`)
    pub dead_letter_topic: String,
    /// `replay` stops once no dead letter arrived for this long. Env `mqtt_replay_idle`.
    /// (default: `"2s"`)
    #[serde(with = "config::duration")]
    pub replay_idle: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: "tcp://127.0.0.1:1883".to_owned(),
            protocol: Protocol::V5,
            client_id: "faas-mqtt-connector".to_owned(),
            clean_session: false,
            qos: 1,
            username: None,
            password: None,
            tls_ca_file: None,
            share_group: String::new(),
            retained: false,
            keep_alive: Duration::from_secs(30),
            session_expiry: Duration::from_secs(86_400),
            connect_timeout: Duration::from_secs(10),
            dead_letter_topic: "faas/dead-letter".to_owned(),
            replay_idle: Duration::from_secs(2),
        }
    }
}

/// Where the broker is, from `broker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// Port (1883, 8883 with TLS, unless given).
    pub port: u16,
    /// Whether to speak TLS.
    pub tls: bool,
}

impl MqttConfig {
    /// The broker's address (validated by [`Config::validate`]).
    pub fn broker(&self) -> Result<Broker, String> {
        let url = url::Url::parse(&self.broker).map_err(|e| format!("not a URL: {e}"))?;
        let tls = match url.scheme() {
            "tcp" | "mqtt" => false,
            "ssl" | "tls" | "mqtts" => true,
            other => {
                return Err(format!(
                    "scheme {other}:// is not tcp, mqtt, ssl, tls or mqtts"
                ));
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("no host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(Broker { host, port, tls })
    }

    /// The filter subscribed for a function's `topic`: `$share/<group>/<topic>` in a
    /// share group.
    pub fn subscription(&self, topic: &str) -> String {
        if self.share_group.is_empty() {
            topic.to_owned()
        } else {
            format!("$share/{}/{topic}", self.share_group)
        }
    }

    /// The persistent session that keeps dead letters for `replay`: one per share group
    /// (`<share_group>-replay`), so replicas do not each keep a copy of every letter;
    /// else `<client_id>-replay`.
    pub fn replay_client_id(&self) -> String {
        if self.share_group.is_empty() {
            format!("{}-replay", self.client_id)
        } else {
            format!("{}-replay", self.share_group)
        }
    }
}

/// Our variables, on top of the SDK's (`gateway_url`, `topics`, ...).
pub const ENV: &[EnvVar] = &[
    EnvVar::new("broker", "mqtt.broker"),
    EnvVar::new("topic", "connector.topics"),
    EnvVar::new("client_id", "mqtt.client_id"),
    EnvVar::new("clean_session", "mqtt.clean_session"),
    EnvVar::new("qos", "mqtt.qos"),
    EnvVar::new("mqtt_protocol", "mqtt.protocol"),
    EnvVar::new("mqtt_username", "mqtt.username"),
    EnvVar::new("mqtt_password", "mqtt.password"),
    EnvVar::new("mqtt_tls_ca_file", "mqtt.tls_ca_file"),
    EnvVar::new("mqtt_share_group", "mqtt.share_group"),
    EnvVar::new("mqtt_retained", "mqtt.retained"),
    EnvVar::new("mqtt_keep_alive", "mqtt.keep_alive"),
    EnvVar::new("mqtt_session_expiry", "mqtt.session_expiry"),
    EnvVar::new("mqtt_connect_timeout", "mqtt.connect_timeout"),
    EnvVar::new("mqtt_dead_letter_topic", "mqtt.dead_letter_topic"),
    EnvVar::new("mqtt_replay_idle", "mqtt.replay_idle"),
];

/// Loads the configuration: defaults, then `--config FILE`, then environment variables;
/// then the cross-field checks.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
    let config: Config = config::load(path, &env)?;
    config.validate()?;
    Ok(config)
}

/// Whether `filter` is a valid MQTT topic filter: `#` only as the last level, wildcards
/// only as whole levels.
fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && levels.iter().enumerate().all(|(i, level)| {
            (*level == "#" && i + 1 == levels.len())
                || *level == "+"
                || !(level.contains('#') || level.contains('+'))
        })
}

impl Config {
    /// Cross-field checks, run before anything connects. Keys are named as in TOML.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.connector.validate()?;
        let m = &self.mqtt;
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            errors.push(ConfigError::invalid(format!("mqtt.{key}"), message));
        };
        match m.broker() {
            Err(e) => fail("broker", e),
            Ok(b) if m.tls_ca_file.is_some() && !b.tls => fail(
                "tls_ca_file",
                "a CA file is set but the broker is not ssl://, tls:// or mqtts://".into(),
            ),
            Ok(_) => {}
        }
        if let Some(path) = &m.tls_ca_file
            && !path.is_file()
        {
            fail("tls_ca_file", format!("no such file {}", path.display()));
        }
        if m.client_id.trim().is_empty() {
            fail(
                "client_id",
                "must not be empty: the session is kept by it".into(),
            );
        }
        if m.qos > 1 {
            fail("qos", format!("{} is not 0 or 1", m.qos));
        }
        let v5 = m.protocol == Protocol::V5;
        if !m.share_group.is_empty() {
            if !v5 {
                fail(
                    "share_group",
                    "shared subscriptions need protocol \"5\"".into(),
                );
            }
            if m.share_group.contains(['/', '+', '#']) {
                fail("share_group", "must not contain '/', '+' or '#'".into());
            }
        }
        if !m.dead_letter_topic.is_empty() {
            if !v5 {
                fail(
                    "dead_letter_topic",
                    "dead letters carry their provenance as user properties: they need protocol \"5\" (or set dead_letter_topic = \"\")".into(),
                );
            }
            if m.dead_letter_topic.contains(['+', '#']) {
                fail("dead_letter_topic", "must not contain wildcards".into());
            }
        }
        for (key, d) in [
            ("keep_alive", m.keep_alive),
            ("session_expiry", m.session_expiry),
            ("connect_timeout", m.connect_timeout),
        ] {
            if d.as_secs() == 0 || d.subsec_nanos() != 0 {
                fail(
                    key,
                    format!("{d:?} is not a whole number of seconds above zero"),
                );
            }
        }
        if m.replay_idle.is_zero() {
            fail("replay_idle", "must be above zero".into());
        }
        for topic in &self.connector.topics {
            if !valid_filter(topic) {
                errors.push(ConfigError::invalid(
                    "connector.topics",
                    format!("{topic:?} is not an MQTT topic filter"),
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
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/mqtt.toml");
        Jail::expect_with(|_| {
            assert_eq!(load(Some(Path::new(path))).unwrap(), Config::default());
            Ok(())
        });
    }

    #[test]
    fn openfaas_names_and_secrets() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[mqtt]\nshare_group = \"workers\"\n")?;
            jail.set_env("broker", "ssl://mq.internal");
            jail.set_env("topic", "sensors/#");
            jail.set_env("client_id", "replica-1");
            jail.set_env("qos", "0");
            jail.set_env("mqtt_password", "s3cret");
            let c = load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(c.connector.topics, ["sensors/#"]);
            assert_eq!(c.mqtt.client_id, "replica-1");
            assert_eq!(c.mqtt.qos, 0);
            let b = c.mqtt.broker().unwrap();
            assert_eq!(
                (b.host.as_str(), b.port, b.tls),
                ("mq.internal", 8883, true)
            );
            assert_eq!(c.mqtt.subscription("a/+"), "$share/workers/a/+");
            assert_eq!(c.mqtt.replay_client_id(), "workers-replay");
            assert!(!format!("{c:?}").contains("s3cret"));
            Ok(())
        });
    }

    #[test]
    fn errors_name_key_and_origin() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[mqtt]\nqos = 1\nkeep_alive = 5\n")?;
            let e = load(Some(Path::new("c.toml"))).unwrap_err().to_string();
            assert!(e.contains("mqtt.keep_alive") && e.contains("line 3"), "{e}");
            jail.create_file("d.toml", "")?;
            jail.set_env("mqtt_protocol", "4");
            let e = load(Some(Path::new("d.toml"))).unwrap_err().to_string();
            assert!(e.contains("environment variable mqtt_protocol"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn cross_field_checks() {
        let mut c = Config::default();
        c.mqtt.broker = "http://nope".into();
        c.mqtt.protocol = Protocol::V311;
        c.mqtt.share_group = "g".into();
        c.mqtt.qos = 2;
        c.mqtt.keep_alive = Duration::from_millis(500);
        c.connector.topics = vec!["a/#/b".into()];
        let e = c.validate().unwrap_err().to_string();
        for key in [
            "mqtt.broker",
            "mqtt.share_group",
            "mqtt.dead_letter_topic",
            "mqtt.qos",
            "mqtt.keep_alive",
            "connector.topics",
        ] {
            assert!(e.contains(key), "missing {key} in {e}");
        }
        assert!(valid_filter("a/+/#") && valid_filter("#") && !valid_filter("a#"));
    }
}
