//! MQTT for end-to-end tests, with rumqttc (MQTT 5) as a client of the test's own, as a
//! [`Fixture`] and [`ReplayFixture`].
//!
//! MQTT has no queues to declare and no depth to read, so the fixture does what a client
//! can:
//! - `create_topic` makes the connector's persistent session (`it-<topic>`, subscribed to
//!   the topic) before the connector starts, as declaring a queue does: the broker keeps
//!   what is published from then on for the connector.
//! - `unacknowledged` takes the connector's session over for a moment (same client id;
//!   the running connector is disconnected and reconnects) and counts what the broker
//!   sends it again: the messages never acknowledged. A marker, published to a topic the
//!   session subscribes to for the purpose, arrives after them and ends the count. The
//!   connector does not acknowledge on the new connection what it received on the one
//!   taken over (the broker sends it again), so a count above zero is not asked again for
//!   [`PROBE_PAUSE`]: asked every 100 ms, the takeovers alone would keep it above zero.
//!   A takeover makes the broker send again what the connector settled but had not yet
//!   acknowledged on the wire, which it would then deliver a second time (at least once,
//!   as it should, but not what a scenario counts on): so the probe first waits, for up
//!   to [`SETTLE_WITHIN`], until the connectors the scenario started hold nothing for
//!   the session (`connector_backlog_messages{partition="held"}`, which counts a message
//!   until its PUBACK is written), on three readings in a row 100 ms apart (a written
//!   PUBACK may still be on its way into the broker).
//! - dead letters are read from a session of the fixture's own (`dl-<topic>`), subscribed
//!   to `dead/<topic>` by `create_topic`, ended by a marker in the same way; they are
//!   acknowledged and kept in memory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

use crate::replay::ReplayFixture;
use crate::scenarios::Fixture;

/// `MQTT_URL`, default `tcp://127.0.0.1:1883`.
pub fn mqtt_url() -> String {
    std::env::var("MQTT_URL").unwrap_or_else(|_| "tcp://127.0.0.1:1883".into())
}

/// A received message: topic, payload, user properties.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its MQTT 5 user properties.
    pub properties: Vec<(String, String)>,
}

impl Received {
    /// The value of user property `name`.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Topics on `MQTT_URL`, one connector session per topic.
pub struct MqttTopics {
    host: String,
    port: u16,
    /// Extra lines for the `[mqtt]` section.
    extra: String,
    letters: Mutex<BTreeMap<String, Vec<Received>>>,
    /// The last count above zero per topic, and when it was taken.
    probes: Mutex<BTreeMap<String, (Instant, u64)>>,
    /// Metrics addresses of the connectors started with this fixture.
    connectors: Mutex<Vec<std::net::SocketAddr>>,
}

/// How long a probe waits for the connectors to hold nothing (see the module docs).
pub const SETTLE_WITHIN: Duration = Duration::from_secs(2);

/// How long a count of unacknowledged messages above zero stands (see the module docs).
pub const PROBE_PAUSE: Duration = Duration::from_secs(2);

impl Default for MqttTopics {
    fn default() -> Self {
        Self::new()
    }
}

const WITHIN: Duration = Duration::from_secs(10);
const MARKER: &[u8] = b"--fixture-marker--";

impl MqttTopics {
    /// On `MQTT_URL`.
    pub fn new() -> Self {
        let url = mqtt_url();
        let rest = url.split("://").nth(1).unwrap_or(&url);
        let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
        Self {
            host: host.to_owned(),
            port: port.trim_end_matches('/').parse().unwrap(),
            extra: String::new(),
            letters: Mutex::new(BTreeMap::new()),
            probes: Mutex::new(BTreeMap::new()),
            connectors: Mutex::new(Vec::new()),
        }
    }

    /// With `extra` (TOML lines) at the end of the `[mqtt]` section.
    #[must_use]
    pub fn with_extra_config(mut self, extra: &str) -> Self {
        extra.clone_into(&mut self.extra);
        self
    }

    /// The connector's client id for `topic`.
    pub fn client_id(topic: &str) -> String {
        format!("it-{topic}")
    }

    /// The dead-letter topic of `topic`.
    pub fn dead_letter_topic(topic: &str) -> String {
        format!("dead/{topic}")
    }

    /// A connected client (`clean`: a new session; else resumed, kept 5 minutes).
    pub async fn connect(&self, client_id: &str, clean: bool) -> (AsyncClient, EventLoop) {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        o.set_clean_start(clean)
            .set_session_expiry_interval((!clean).then_some(300))
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(10));
        let (client, mut events) = AsyncClient::new(o, 1024);
        until(&mut events, |p| {
            matches!(p, Packet::ConnAck(_)).then_some(())
        })
        .await;
        (client, events)
    }

    /// Makes the persistent session `client_id`, subscribed to `filters`.
    pub async fn make_session(&self, client_id: &str, filters: &[String]) {
        let (client, mut events) = self.connect(client_id, false).await;
        for f in filters {
            client
                .subscribe(f.as_str(), QoS::AtLeastOnce)
                .await
                .unwrap();
            until(&mut events, |p| {
                matches!(p, Packet::SubAck(_)).then_some(())
            })
            .await;
        }
        disconnect(client, events).await;
    }

    /// Publishes `payloads` to `topic` with QoS 1, in order, each with `properties`, and
    /// waits for every PUBACK.
    pub async fn publish(&self, topic: &str, payloads: &[Vec<u8>], properties: &[(&str, &str)]) {
        let (client, mut events) = self.connect(&crate::unique("pub"), true).await;
        let props = PublishProperties {
            user_properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..PublishProperties::default()
        };
        for p in payloads {
            client
                .publish_with_properties(topic, QoS::AtLeastOnce, false, p.clone(), props.clone())
                .await
                .unwrap();
        }
        let mut acked = 0;
        until(&mut events, |p| {
            if matches!(p, Packet::PubAck(_)) {
                acked += 1;
            }
            (acked == payloads.len()).then_some(())
        })
        .await;
        disconnect(client, events).await;
    }

    /// Reads session `client_id` until a marker sent through `marker_topic` comes back:
    /// what the broker had for it. `ack`: acknowledge what was read.
    async fn read_session(
        &self,
        client_id: &str,
        marker_topic: &str,
        ack: bool,
    ) -> Option<Vec<Received>> {
        let (client, mut events) = self.connect(client_id, false).await;
        client
            .subscribe(marker_topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .publish(marker_topic, QoS::AtLeastOnce, false, MARKER.to_vec())
            .await
            .unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(WITHIN, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if ack || p.payload.as_ref() == MARKER {
                            client.ack(&p).await.unwrap();
                        }
                        if p.payload.as_ref() == MARKER {
                            return true;
                        }
                        got.push(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            properties: p.properties.map(|p| p.user_properties).unwrap_or_default(),
                        });
                    }
                    Ok(_) => {}
                    // Taken over by the connector meanwhile: the count is unknown.
                    Err(_) => return false,
                }
            }
        })
        .await;
        let _ = client.unsubscribe(marker_topic).await;
        disconnect(client, events).await;
        read.ok().filter(|done| *done).map(|_| got)
    }

    /// Whether no running connector holds a message of session `client_id`: received
    /// and not yet acknowledged on the wire.
    async fn settled(&self, client_id: &str) -> bool {
        let series =
            format!("connector_backlog_messages{{topic=\"{client_id}\",partition=\"held\"}}");
        let connectors = self.connectors.lock().unwrap().clone();
        for addr in connectors {
            if let Some((_, text)) = crate::http_get(addr, "/metrics").await
                && crate::metric(&text, &series).is_some_and(|held| held > 0.0)
            {
                return false;
            }
        }
        true
    }

    /// Every dead letter of `topic` so far, with its properties. A letter that comes
    /// again with the same payload and properties (its `x-dead-letter-time` to the
    /// millisecond included) is the same QoS 1 publish delivered twice, which MQTT allows
    /// (a PUBACK lost with a disconnect), not a second dead letter: it is counted once.
    pub async fn letters(&self, topic: &str) -> Vec<Received> {
        let new = self
            .read_session(&format!("dl-{topic}"), &format!("mark/dl-{topic}"), true)
            .await
            .unwrap_or_default();
        let mut letters = self.letters.lock().unwrap();
        let all = letters.entry(topic.to_owned()).or_default();
        for letter in new.into_iter().filter(|r| !r.topic.starts_with("mark/")) {
            let again = all
                .iter()
                .any(|l| l.payload == letter.payload && l.properties == letter.properties);
            if !again {
                all.push(letter);
            }
        }
        all.clone()
    }
}

/// Polls until `f` picks a packet, within [`WITHIN`].
async fn until<T>(events: &mut EventLoop, mut f: impl FnMut(&Packet) -> Option<T>) -> T {
    tokio::time::timeout(WITHIN, async {
        loop {
            if let Event::Incoming(p) = events.poll().await.unwrap()
                && let Some(t) = f(&p)
            {
                return t;
            }
        }
    })
    .await
    .expect("the broker answered in time")
}

/// Sends DISCONNECT (the session stays) and waits until it went out.
async fn disconnect(client: AsyncClient, mut events: EventLoop) {
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(WITHIN, async {
        while let Ok(e) = events.poll().await {
            if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

#[async_trait::async_trait]
impl Fixture for MqttTopics {
    fn binary(&self) -> PathBuf {
        crate::binary("mqtt-connector", "mqtt-connector")
    }

    async fn create_topic(&self, topic: &str) {
        self.make_session(&Self::client_id(topic), &[topic.to_owned()])
            .await;
        self.make_session(&format!("dl-{topic}"), &[Self::dead_letter_topic(topic)])
            .await;
    }

    fn source_config(&self, topic: &str) -> String {
        format!(
            "[mqtt]\nbroker = \"tcp://{}:{}\"\nclient_id = \"{}\"\ndead_letter_topic = \"{}\"\nsession_expiry = \"5m\"\nconnect_timeout = \"5s\"\n{}\n",
            self.host,
            self.port,
            Self::client_id(topic),
            Self::dead_letter_topic(topic),
            self.extra
        )
    }

    fn source_config_without_dead_letters(&self, topic: &str) -> String {
        format!(
            "[mqtt]\nbroker = \"tcp://{}:{}\"\nclient_id = \"{}\"\ndead_letter_topic = \"\"\nsession_expiry = \"5m\"\nconnect_timeout = \"5s\"\n{}\n",
            self.host,
            self.port,
            Self::client_id(topic),
            self.extra
        )
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        self.publish(topic, payloads, &[]).await;
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.letters(topic)
            .await
            .into_iter()
            .map(|r| r.payload)
            .collect()
    }

    fn started(&self, metrics_addr: std::net::SocketAddr) {
        self.connectors.lock().unwrap().push(metrics_addr);
    }

    /// Messages the broker sends the connector's session again; `u64::MAX` when the
    /// marker did not come back (more unacknowledged than the broker's window).
    async fn unacknowledged(&self, topic: &str) -> u64 {
        if let Some((at, count)) = self.probes.lock().unwrap().get(topic)
            && at.elapsed() < PROBE_PAUSE
        {
            return *count;
        }
        let client_id = Self::client_id(topic);
        // Not settled within the time (messages held through an outage, say): the
        // probe goes on, and the broker sends those again, as it would after the outage.
        // Settled on three readings in a row, 100 ms apart: a PUBACK the connector has
        // written may still be on its way into the broker when the gauge reads 0, and
        // a takeover that overtakes it has the broker send the message again (seen in CI:
        // a 4xx dead-lettered twice).
        let stable = std::sync::atomic::AtomicU32::new(0);
        crate::scenarios::eventually_async(SETTLE_WITHIN, || async {
            if self.settled(&client_id).await {
                stable.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= 3
            } else {
                stable.store(0, std::sync::atomic::Ordering::SeqCst);
                false
            }
        })
        .await;
        let marker = format!("mark/{topic}");
        let count = match self
            .read_session(&Self::client_id(topic), &marker, false)
            .await
        {
            Some(got) => got.iter().filter(|r| r.topic != marker).count() as u64,
            None => u64::MAX,
        };
        if count > 0 {
            self.probes
                .lock()
                .unwrap()
                .insert(topic.to_owned(), (Instant::now(), count));
        }
        count
    }
}

#[async_trait::async_trait]
impl ReplayFixture for MqttTopics {
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        // What replay left in its session, read without removing it.
        self.read_session(
            &format!("{}-replay", Self::client_id(topic)),
            &format!("mark/replay-{topic}"),
            false,
        )
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.payload)
        .collect()
    }

    fn headers_allowed_to_differ(&self) -> &[&str] {
        &["x-mqtt-dup"]
    }
}

/// A `Bytes` payload from text.
pub fn payload(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}
