//! `redis-connector` as a library: Redis Streams (consumer groups, at-least-once) and
//! Pub/Sub (at-most-once) to functions, on connector-sdk. The binary is a thin `main`
//! around [`load`] and [`run`]; tests and embedders call them in-process.
//!
//! Modules:
//! - [`config`]: `[connector]` (the SDK's) and `[redis]`, with environment variables.
//! - [`entry`]: stream replies parsed binary-safe and in order; entries shaped into
//!   messages (body field or JSON, content type, ordering key, headers, `ce-id`).
//! - [`streams`]: the consumer-group source: reader, claimer, acker, backlog measurer.
//! - [`pubsub`]: the SUBSCRIBE / PSUBSCRIBE source.
//! - [`dead_letter`]: the dead-letter stream sink.
//! - [`replay`]: `redis-connector replay`: dead letters back to their functions.
//! - [`metrics`]: `connector_redis_*` (pending entries, group lag, claims, errors).
//! - [`error`]: the crate's error type.
//!
//! Request headers: `X-Redis-Stream`, `X-Redis-Id`, `X-Redis-Group` (streams);
//! `X-Redis-Channel`, `X-Redis-Pattern` (Pub/Sub); `X-Redis-Base64-Fields` when a JSON
//! body holds base64 values. `ce-id` is `<stream>/<entry id>`, the same on every
//! redelivery.

pub mod config;
pub mod dead_letter;
pub mod entry;
pub mod error;
pub mod metrics;
pub mod pubsub;
pub mod replay;
pub mod streams;

use std::sync::Arc;

use connector_sdk::{Runtime, pump};
use redis::IntoConnectionInfo;

pub use config::{Config, Mode, RedisConfig, load};
pub use error::Error;

/// The binary's name, sent as `X-Connector`.
pub const NAME: &str = "redis-connector";

/// The Redis client for `config`: the URL, with the configured user and password on top.
pub fn client(config: &RedisConfig) -> Result<redis::Client, Error> {
    let info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(Error::Client)?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose());
    }
    let info = info.set_redis_settings(settings);
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| Error::TlsFile {
            path: path.display().to_string(),
            source,
        })
    };
    let root_cert = config.tls_ca_file.as_deref().map(read).transpose()?;
    let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    if root_cert.is_some() || client_tls.is_some() {
        redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(Error::Client)
    } else {
        redis::Client::open(info).map_err(Error::Client)
    }
}

/// `ce-source` prefix for a client: `redis://host:port/db` (never credentials).
pub fn source_uri(client: &redis::Client) -> String {
    let info = client.get_connection_info();
    let db = info.redis_settings().db();
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}/{db}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}/{db}"),
        redis::ConnectionAddr::Unix(path) => format!("redis+unix://{}/{db}", path.display()),
        _ => "redis://".to_owned(),
    }
}

/// This replica's consumer name: the configured one, else `<hostname>-<random>`.
pub fn consumer_name(config: &RedisConfig) -> String {
    if let Some(name) = &config.consumer {
        return name.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| NAME.to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &random[..8])
}

/// Runs the connector until the runtime's shutdown (SIGTERM/SIGINT, or its token), then
/// drains: in-flight deliveries finish, completed entries are acknowledged, the rest go
/// back to the group.
pub async fn run(config: Config, mut runtime: Runtime) -> Result<(), Error> {
    if config.redis.mode == Mode::Streams && !config.redis.dead_letter_stream.is_empty() {
        // The admin API lists, replays and purges the dead letters as `replay` does.
        runtime = runtime
            .dead_letter_store_with(config.clone(), |c| async move { replay::open(&c).await });
    }
    let client = client(&config.redis)?;
    let source = source_uri(&client);
    let metrics = metrics::RedisMetrics::register(runtime.registry_mut());
    let r = config.redis;
    let shape = entry::Shape {
        body_field: r.body_field.clone(),
        content_type_field: r.content_type_field.clone(),
        key_field: r.key_field.clone(),
        trace_field: r.trace_field.clone(),
        ordering: config.connector.ordering,
        source: source.clone(),
        group: r.group.clone(),
    };
    match r.mode {
        Mode::Streams => {
            let manager_config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(r.command_timeout))
                .set_response_timeout(Some(r.command_timeout))
                .set_number_of_retries(2)
                .set_max_delay(std::time::Duration::from_secs(2));
            let commands = client
                .get_connection_manager_lazy(manager_config)
                .map_err(Error::Client)?;
            if r.dead_letter_stream.is_empty() {
                tracing::warn!(
                    "no dead_letter_stream: deliveries that fail for good stay pending (or are dropped with on_exhausted = \"drop\")"
                );
            } else {
                runtime = runtime.dead_letters(Arc::new(dead_letter::StreamDeadLetters::new(
                    commands.clone(),
                    &r.dead_letter_stream,
                    r.dead_letter_maxlen,
                    metrics.clone(),
                )));
            }
            let settings = streams::Settings {
                group: r.group.clone(),
                consumer: consumer_name(&r),
                start_id: r.start_id.clone(),
                batch_size: r.batch_size.min(config.connector.max_inflight).max(1),
                block: r.block,
                claim_idle: r.claim_idle,
                claim_interval: r.claim_interval,
                metrics_interval: r.metrics_interval,
                delete_consumer_on_exit: r.delete_consumer_on_exit,
                command_timeout: r.command_timeout,
            };
            runtime
                .run(|ctx| async move {
                    let source = streams::StreamsSource::new(
                        ctx.clone(),
                        client,
                        commands,
                        settings,
                        shape,
                        metrics,
                    );
                    pump(&ctx, source).await
                })
                .await?;
        }
        Mode::Pubsub => {
            let ordering = config.connector.ordering;
            runtime
                .run(|ctx| async move {
                    let source = pubsub::PubSubSource::new(
                        ctx.clone(),
                        client,
                        source,
                        ordering,
                        r.command_timeout,
                        metrics,
                    );
                    pump(&ctx, source).await
                })
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use connector_sdk::config::Secret;

    #[test]
    fn credentials_override_the_url_and_stay_out_of_the_source() {
        let config = RedisConfig {
            url: "redis://olduser:oldpw@10.0.0.5:6390/3".into(),
            username: Some("app".into()),
            password: Some(Secret::new("pw")),
            ..RedisConfig::default()
        };
        let c = client(&config).unwrap();
        let settings = c.get_connection_info().redis_settings();
        assert_eq!(settings.username(), Some("app"));
        assert_eq!(settings.password(), Some("pw"));
        assert_eq!(source_uri(&c), "redis://10.0.0.5:6390/3");
        let tls = client(&RedisConfig {
            url: "rediss://cache:6380".into(),
            ..RedisConfig::default()
        })
        .unwrap();
        assert_eq!(source_uri(&tls), "rediss://cache:6380/0");
    }

    #[test]
    fn consumer_names_differ_per_start() {
        let config = RedisConfig::default();
        assert_ne!(consumer_name(&config), consumer_name(&config));
        let fixed = RedisConfig {
            consumer: Some("pod-0".into()),
            ..RedisConfig::default()
        };
        assert_eq!(consumer_name(&fixed), "pod-0");
    }
}
