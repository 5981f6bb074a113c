//! MQTT keeps no queue depth a client can read: a broker queues messages per session and
//! says nothing of how many. The backlog this connector exports is what it holds itself:
//! `connector_mqtt_held_messages`, messages received and not yet acknowledged (in flight,
//! retrying, held after a failure with nowhere to dead-letter them, or settled with their
//! PUBACK not yet written to the broker), also
//! `connector_backlog_messages{topic=<client_id>, partition="held"}`; and
//! `connector_mqtt_connected` (1 while connected). No labels but the client id.

use connector_sdk::metrics::Metrics;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `connector_mqtt_*`.
#[derive(Clone, Debug)]
pub struct MqttMetrics {
    held: Gauge,
    connected: Gauge,
    client_id: String,
    sdk: Metrics,
}

impl MqttMetrics {
    /// Registers the metrics in `registry`; the backlog also goes to `sdk`.
    pub fn register(registry: &mut Registry, sdk: Metrics, client_id: &str) -> Self {
        let m = Self {
            held: Gauge::default(),
            connected: Gauge::default(),
            client_id: client_id.to_owned(),
            sdk,
        };
        let r = registry.sub_registry_with_prefix("connector_mqtt");
        r.register(
            "held_messages",
            "Messages received and not yet acknowledged: in flight, retrying, held, or PUBACK unwritten",
            m.held.clone(),
        );
        r.register(
            "connected",
            "1 while connected to the broker",
            m.connected.clone(),
        );
        m
    }

    /// `by` more (or fewer) messages held.
    pub fn held(&self, by: i64) {
        let now = self.held.inc_by(by) + by;
        self.sdk.set_held_backlog(
            &self.client_id,
            "held",
            u64::try_from(now.max(0)).unwrap_or(0),
        );
    }

    /// Connected or not.
    pub fn connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }
}
