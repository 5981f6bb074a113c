//! `cron-connector`'s configuration: the SDK's `[connector]` section, `[cron]`, and the
//! optional `[lock]` that makes several replicas fire each tick once.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono_tz::Tz;
use connector_sdk::SdkConfig;
use connector_sdk::config::{self, ConfigError, ConfigErrors, EnvVar, SDK_ENV, Secret};
use serde::{Deserialize, Serialize};

/// What to do with ticks whose time passed while the connector was down or stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// Do not fire them; count them as misfires (default).
    #[default]
    Skip,
    /// Fire once, for the most recent missed tick; count the others as misfires.
    FireOnce,
}

impl FromStr for Misfire {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "skip" => Ok(Self::Skip),
            "fire_once" => Ok(Self::FireOnce),
            other => Err(format!("`{other}` is not `skip` or `fire_once`")),
        }
    }
}

/// What to do with a tick while the function's previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Fire anyway, as OpenFaaS's cron-connector does (default).
    #[default]
    Allow,
    /// Skip the tick and count it.
    Forbid,
}

impl FromStr for Overlap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "allow" => Ok(Self::Allow),
            "forbid" => Ok(Self::Forbid),
            other => Err(format!("`{other}` is not `allow` or `forbid`")),
        }
    }
}

/// What a replica does with a tick when its lease store (`lock.redis_url`) cannot be
/// reached, so the tick cannot be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLockUnavailable {
    /// Skip the tick, log it and count it (default): no replica can claim it, and firing
    /// it anyway would fire it once per replica.
    #[default]
    Skip,
    /// Fire it without a claim, accepting that every replica may fire it.
    Fire,
}

/// `[cron]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CronConfig {
    /// The topic that marks a function as scheduled, alone or among its other topics; also
    /// sent as `X-Topic`. Env `cron_topic`. (default: `"cron-function"`)
    pub topic: String,
    /// IANA time zone of schedules without a `CRON_TZ=` prefix. Env `cron_time_zone`.
    /// (default: `"UTC"`)
    pub time_zone: String,
    /// `skip` or `fire_once`: ticks missed while down or stalled. A function's
    /// `cron.misfire` annotation overrides it. Env `cron_misfire`. (default: `"skip"`)
    pub misfire: Misfire,
    /// A firing starting later than this after its scheduled time is a misfire.
    /// Env `cron_misfire_threshold`. (default: `"1s"`)
    #[serde(with = "config::duration")]
    pub misfire_threshold: Duration,
    /// `allow` or `forbid` a tick while the previous run of the same function is still
    /// going. A function's `cron.overlap` annotation overrides it. Env `cron_overlap`.
    /// (default: `"allow"`)
    pub overlap: Overlap,
}

impl Default for CronConfig {
    fn default() -> Self {
        Self {
            topic: "cron-function".to_owned(),
            time_zone: "UTC".to_owned(),
            misfire: Misfire::Skip,
            misfire_threshold: Duration::from_secs(1),
            overlap: Overlap::Allow,
        }
    }
}

/// `[lock]`: with `redis_url` set, replicas share ticks through Redis leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockConfig {
    /// Redis URL (`redis://`, `rediss://` for TLS). Unset: single-replica behaviour, no
    /// lock. Env `lock_redis_url`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<Secret>,
    /// Prefix of every key this connector writes. Replicas of one deployment share it;
    /// separate deployments on one Redis use different ones. Env `lock_key_prefix`.
    /// (default: `"cron-connector"`)
    pub key_prefix: String,
    /// How long a replica's claim on a tick lasts without renewal. The owner renews it
    /// while the firing runs; if the owner dies, another replica takes the tick over once
    /// it lapses. Env `lock_lease`. (default: `"10s"`)
    #[serde(with = "config::duration")]
    pub lease: Duration,
    /// How long the other replicas keep watching a claimed tick so they can take it over.
    /// (default: `"5m"`)
    #[serde(with = "config::duration")]
    pub takeover_window: Duration,
    /// How long a finished tick is remembered (so a late replica does not fire it again).
    /// (default: `"1h"`)
    #[serde(with = "config::duration")]
    pub retention: Duration,
    /// This replica's name in claims and in the `X-Cron-Replica` header; empty means
    /// `<hostname>-<pid>`. Env `lock_replica_id`. (default: `""`)
    pub replica_id: String,
    /// `skip` or `fire`: a tick due while Redis cannot be reached. `skip` logs it (warn)
    /// and counts it (`connector_cron_firings_total{outcome="skipped_lock_unavailable"}`);
    /// `fire` invokes the function without a claim, so every replica may fire that tick.
    /// The store reconnects with backoff either way. Env `lock_on_unavailable`.
    /// (default: `"skip"`)
    pub on_unavailable: OnLockUnavailable,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            key_prefix: "cron-connector".to_owned(),
            lease: Duration::from_secs(10),
            takeover_window: Duration::from_secs(300),
            retention: Duration::from_secs(3600),
            replica_id: String::new(),
            on_unavailable: OnLockUnavailable::Skip,
        }
    }
}

/// The whole configuration of `cron-connector`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The SDK section: gateway, retries, metrics address.
    pub connector: SdkConfig,
    /// Scheduling.
    pub cron: CronConfig,
    /// Replica coordination.
    pub lock: LockConfig,
}

/// This connector's variables, on top of the SDK's.
pub const ENV: &[EnvVar] = &[
    EnvVar::new("cron_topic", "cron.topic"),
    EnvVar::new("cron_time_zone", "cron.time_zone"),
    EnvVar::new("cron_misfire", "cron.misfire"),
    EnvVar::new("cron_misfire_threshold", "cron.misfire_threshold"),
    EnvVar::new("cron_overlap", "cron.overlap"),
    EnvVar::new("lock_redis_url", "lock.redis_url"),
    EnvVar::new("lock_key_prefix", "lock.key_prefix"),
    EnvVar::new("lock_lease", "lock.lease"),
    EnvVar::new("lock_replica_id", "lock.replica_id"),
    EnvVar::new("lock_on_unavailable", "lock.on_unavailable"),
];

impl Config {
    /// Defaults, then `file`, then the environment; then cross-field checks.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
        let config: Self = config::load(file, &env)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that need several fields or a parse.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.connector.validate()?;
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            errors.push(ConfigError::invalid(key.to_owned(), message));
        };
        if self.cron.topic.trim().is_empty() {
            fail("cron.topic", "must not be empty".to_owned());
        }
        if self.zone().is_none() {
            fail(
                "cron.time_zone",
                format!(
                    "unknown time zone `{}` (expected an IANA name such as Europe/Paris)",
                    self.cron.time_zone
                ),
            );
        }
        if self.lock.redis_url.is_some() {
            if self.lock.lease < Duration::from_millis(500) {
                fail("lock.lease", "must be at least 500ms".to_owned());
            }
            if self.lock.retention <= self.lock.takeover_window {
                fail(
                    "lock.retention",
                    "must be longer than lock.takeover_window, or a tick could fire twice"
                        .to_owned(),
                );
            }
        }
        ConfigErrors::check(errors)
    }

    /// The default time zone.
    pub fn zone(&self) -> Option<Tz> {
        Tz::from_str(self.cron.time_zone.trim()).ok()
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid_and_single_replica() {
        Jail::expect_with(|_| {
            let c = Config::load(None).unwrap();
            assert_eq!(c.cron.topic, "cron-function");
            assert!(c.lock.redis_url.is_none());
            assert_eq!(c.lock.on_unavailable, OnLockUnavailable::Skip);
            Ok(())
        });
    }

    #[test]
    fn file_and_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "cron.toml",
                "[cron]\nmisfire = \"fire_once\"\noverlap = \"forbid\"\ntime_zone = \"Europe/Paris\"\n[lock]\nredis_url = \"redis://127.0.0.1:6379\"\nlease = \"2s\"\n",
            )?;
            jail.set_env("cron_overlap", "allow");
            jail.set_env("gateway_url", "http://gw:8080");
            jail.set_env("lock_on_unavailable", "fire");
            let c = Config::load(Some(Path::new("cron.toml"))).unwrap();
            assert_eq!(c.lock.on_unavailable, OnLockUnavailable::Fire);
            assert_eq!(c.cron.misfire, Misfire::FireOnce);
            assert_eq!(c.cron.overlap, Overlap::Allow);
            assert_eq!(c.zone(), Some(Tz::Europe__Paris));
            assert_eq!(c.lock.lease, Duration::from_secs(2));
            assert_eq!(c.lock.redis_url.unwrap().expose(), "redis://127.0.0.1:6379");
            assert_eq!(c.connector.gateway_url, "http://gw:8080");
            Ok(())
        });
    }

    #[test]
    fn the_documented_example_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cron.toml");
        let example: Config = config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(example, Config::default());
        // Inside a Jail: other tests set variables such as gateway_url meanwhile.
        Jail::expect_with(|_| {
            let quickstart =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/quickstart-cron.toml");
            let quickstart = Config::load(Some(&quickstart)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(quickstart.connector.gateway_url, "http://127.0.0.1:8080");
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_their_key() {
        Jail::expect_with(|jail| {
            jail.create_file("cron.toml", "[cron]\ntime_zone = \"Moon/Base\"\n")?;
            let errs = Config::load(Some(Path::new("cron.toml"))).unwrap_err();
            assert_eq!(errs.0[0].key, "cron.time_zone");
            jail.create_file("cron.toml", "[cron]\nmisfire = \"sometimes\"\n")?;
            let errs = Config::load(Some(Path::new("cron.toml"))).unwrap_err();
            assert_eq!(errs.0[0].key, "cron.misfire");
            assert_eq!(errs.0[0].line, Some(2));
            Ok(())
        });
    }
}
