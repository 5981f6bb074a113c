//! The backlog. Replication: `connector_postgres_slot_lag_bytes{slot}`, the WAL the slot
//! holds back (`pg_current_wal_lsn() - confirmed_flush_lsn`, read every
//! `metrics_interval` on a connection of its own), and the changes the connector holds
//! (received, not yet acknowledged) as `connector_backlog_messages{topic=<slot>,
//! partition="held"}`. Notify: the notifications held (received, not yet complete) as
//! `connector_backlog_messages{topic="notify", partition="held"}`.
//!
//! Labels: the slot (one per connector: a bounded set).

use connector_sdk::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::PgConfig;

/// Labels of the slot metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    /// The replication slot.
    pub slot: String,
}

/// `connector_postgres_slot_lag_bytes` and the SDK's backlog.
#[derive(Clone, Debug)]
pub struct PgMetrics {
    lag: Family<SlotLabels, Gauge>,
    sdk: Metrics,
}

impl PgMetrics {
    /// Registers the metrics in `registry`; the held count goes to `sdk`.
    pub fn register(registry: &mut Registry, sdk: Metrics) -> Self {
        let m = Self {
            lag: Family::default(),
            sdk,
        };
        registry.register(
            "connector_postgres_slot_lag_bytes",
            "WAL bytes between the server's current position and the slot's confirmed one",
            m.lag.clone(),
        );
        m
    }

    /// Messages received and not yet acknowledged (`topic` is the slot, or `notify`).
    pub fn set_held(&self, topic: &str, held: u64) {
        self.sdk.set_held_backlog(topic, "held", held);
    }

    fn set_lag(&self, slot: &str, bytes: i64) {
        self.lag
            .get_or_create(&SlotLabels {
                slot: slot.to_owned(),
            })
            .set(bytes);
    }
}

/// Reads the slot's lag every `metrics_interval` until the guard is dropped.
pub fn measure_lag(config: PgConfig, metrics: PgMetrics) -> DropGuard {
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    tokio::spawn(async move {
        let mut client = None;
        loop {
            let reading = async {
                if client.is_none() {
                    client = Some(crate::connect(&config).await?);
                }
                let Some(sql) = &client else {
                    return Ok(None);
                };
                let row = sql
                    .query_opt(
                        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                        &[&config.slot],
                    )
                    .await?;
                Ok::<_, crate::Error>(row.and_then(|r| r.get::<_, Option<i64>>(0)))
            };
            tokio::select! {
                () = stop.cancelled() => return,
                read = tokio::time::timeout(config.command_timeout, reading) => match read {
                    Ok(Ok(Some(bytes))) => metrics.set_lag(&config.slot, bytes),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "reading the slot's lag failed");
                        client = None;
                    }
                    Err(_) => client = None,
                },
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(config.metrics_interval) => {}
            }
        }
    });
    guard
}
