//! The connection: credentials, TLS, reconnection with backoff, and readiness.
//!
//! The client connects in the background and reconnects forever (exponential backoff up
//! to `reconnect_max_delay`), so a server that is down at start or restarted mid-run is
//! never fatal. Every connect and disconnect is logged; [`Connection::follow_readiness`]
//! mirrors the state into `/readyz`, and the sources wait on it before pulling.

use std::time::Duration;

use connector_sdk::SourceError;
use connector_sdk::server::Health;
use tokio::sync::watch;

use crate::NatsError;
use crate::config::NatsConfig;

/// A client and a view of whether it is connected right now.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The client; cheap to clone.
    pub client: async_nats::Client,
    connected: watch::Receiver<bool>,
}

impl Connection {
    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the client is connected, for up to `within`; `false` if it is not.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, self.until_connected()).await,
            Ok(true)
        )
    }

    /// Waits until the client is connected; `false` if the client is gone.
    pub async fn until_connected(&self) -> bool {
        let mut rx = self.connected.clone();
        rx.wait_for(|c| *c).await.is_ok()
    }

    /// While disconnected: marks the source not ready and waits for the client's own
    /// reconnection (it retries with backoff), so pulling resumes the moment it is back.
    pub async fn ensure_connected(&self, health: &Health) -> Result<(), SourceError> {
        if self.is_connected() {
            return Ok(());
        }
        health.set_source_ready(false);
        if self.until_connected().await {
            health.set_source_ready(true);
            Ok(())
        } else {
            Err(SourceError::fatal("the NATS client is closed"))
        }
    }

    /// Mirrors the connection state into readiness until the client is dropped.
    pub fn follow_readiness(
        &self,
        health: Health,
    ) -> impl std::future::Future<Output = ()> + use<> {
        let mut rx = self.connected.clone();
        async move {
            loop {
                let up = *rx.borrow_and_update();
                health.set_source_ready(up);
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Resolves when the connection is lost (at once if it is down).
    pub async fn lost(&self) {
        let mut rx = self.connected.clone();
        // An error means the client is gone: lost as well.
        let _ = rx.wait_for(|c| !*c).await;
    }
}

/// The connect options for `config`: credentials, TLS, names and reconnection.
pub async fn options(config: &NatsConfig) -> Result<async_nats::ConnectOptions, NatsError> {
    let mut options = match &config.credentials_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| NatsError::Credentials(format!("{}: {e}", path.display())))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_owned());
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(seed) = &config.nkey {
        options = options.nkey(seed.expose().to_owned());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let max_delay = config.reconnect_max_delay;
    Ok(options
        .name(&config.client_name)
        .connection_timeout(config.connect_timeout)
        .subscription_capacity(config.subscription_capacity)
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay))
        .retry_on_initial_connect())
}

/// 0 for the first retry, then 100 ms doubling up to `max`.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(100)
        .saturating_mul(2u32.saturating_pow(exp))
        .min(max)
}

/// Connects to `config`'s servers in the background; readiness follows the connection.
pub async fn connect(config: &NatsConfig) -> Result<Connection, NatsError> {
    let (tx, rx) = watch::channel(false);
    let servers: Vec<async_nats::ServerAddr> = config
        .servers()
        .iter()
        .map(|u| u.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| NatsError::Connect(format!("{e}")))?;
    let shown: Vec<String> = config.servers();
    let options = options(config).await?.event_callback(move |event| {
        let tx = tx.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    tracing::info!("connected to NATS");
                    tx.send_replace(true);
                }
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; reconnecting with backoff");
                    tx.send_replace(false);
                }
                async_nats::Event::Closed => {
                    tx.send_replace(false);
                }
                async_nats::Event::SlowConsumer(sid) => {
                    tracing::warn!(
                        subscription = sid,
                        "slow consumer: the server dropped messages for this subscription"
                    );
                }
                other => tracing::info!(event = %other, "NATS event"),
            }
        }
    });
    tracing::info!(servers = ?shown, "connecting to NATS");
    let client = options
        .connect(servers)
        .await
        .map_err(|e| NatsError::Connect(e.to_string()))?;
    Ok(Connection {
        client,
        connected: rx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_is_capped() {
        let max = Duration::from_secs(5);
        assert_eq!(reconnect_delay(1, max), Duration::ZERO);
        assert_eq!(reconnect_delay(2, max), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3, max), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100, max), max);
    }
}
