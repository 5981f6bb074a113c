//! One MQTT connection, 3.1.1 or 5, behind one small vocabulary: rumqttc has a client
//! and an event loop per protocol version with the same shape but different types. The
//! rest of the connector speaks only [`Client`], [`Events`] and [`Event`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use connector_sdk::backoff::Backoff;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{Outgoing, QoS, TlsConfiguration, Transport, v5};

use crate::config::{MqttConfig, Protocol};

/// A received PUBLISH, whichever the protocol.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The topic it was published to.
    pub topic: String,
    /// The body.
    pub payload: Bytes,
    /// 0 or 1.
    pub qos: u8,
    /// Its packet id (0 with QoS 0).
    pub pkid: u16,
    /// Sent because it was retained, on subscribing.
    pub retain: bool,
    /// A redelivery.
    pub dup: bool,
    /// MQTT 5 user properties, in order.
    pub properties: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
}

/// What the event loop reports.
#[derive(Debug)]
pub enum Event {
    /// Connected; `session_present` when the broker resumed the session.
    Connected { session_present: bool },
    /// A message.
    Publish(Publish),
    /// Our PUBLISH with this packet id went out.
    Published(u16),
    /// The broker acknowledged our PUBLISH `pkid`; `Err` with its reason when it refused.
    PubAck(u16, Result<(), String>),
    /// The broker acknowledged a subscription.
    Subscribed,
    /// A subscription was refused.
    Refused(String),
    /// Our DISCONNECT went out.
    Disconnected,
    /// Anything else (pings, acknowledgements of unsubscribing).
    Other,
}

/// A lost or refused connection.
#[derive(Debug, Clone)]
pub struct LinkError {
    /// The broker refused us for a reason retrying cannot fix (credentials, client id,
    /// protocol version).
    pub fatal: bool,
    /// What happened.
    pub text: String,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn link_error(refused: Option<String>, text: String) -> LinkError {
    // A busy or unavailable server may take us later; the other refusals are final.
    let fatal = refused.is_some_and(|code| !code.contains("Unavailable") && !code.contains("Busy"));
    LinkError { fatal, text }
}

/// The request side of a connection. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Client {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(v5::AsyncClient),
}

/// The event loop of a connection: poll it all the time, or nothing moves.
pub enum Events {
    /// MQTT 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<v5::EventLoop>),
}

/// How to open one connection.
#[derive(Debug, Clone)]
pub struct Session<'a> {
    /// The configuration.
    pub config: &'a MqttConfig,
    /// The client id.
    pub client_id: String,
    /// Start afresh rather than resume.
    pub clean: bool,
    /// Acknowledge only through [`Client::ack`].
    pub manual_acks: bool,
    /// MQTT 5 receive maximum: how many unacknowledged messages the broker may send.
    pub receive_maximum: u16,
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn qos5(q: u8) -> v5::mqttbytes::QoS {
    if q == 0 {
        v5::mqttbytes::QoS::AtMostOnce
    } else {
        v5::mqttbytes::QoS::AtLeastOnce
    }
}

fn tls(config: &MqttConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.tls_ca_file {
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?
            {
                let cert = cert.map_err(|e| format!("reading {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| e.to_string())?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// Builds a connection (it connects on the first poll). `Err`: the TLS setup.
pub fn open(s: &Session<'_>) -> Result<(Client, Events), String> {
    let c = s.config;
    let broker = c.broker()?;
    let transport = if broker.tls {
        Transport::tls_with_config(TlsConfiguration::Rustls(tls(c)?))
    } else {
        Transport::tcp()
    };
    let user = c.username.clone().unwrap_or_default();
    let password = c.password.as_ref().map(|p| p.expose().to_owned());
    let credentials =
        (c.username.is_some() || password.is_some()).then(|| (user, password.unwrap_or_default()));
    // Room for every acknowledgement of a full receive window, and subscriptions: the
    // event loop's task waits on the source's channel, and the source on this one.
    let cap = usize::from(s.receive_maximum) + 256;
    Ok(match c.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&s.client_id, broker.host, broker.port);
            o.set_keep_alive(c.keep_alive)
                .set_clean_session(s.clean)
                .set_manual_acks(s.manual_acks)
                .set_transport(transport);
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            let (client, mut events) = rumqttc::AsyncClient::new(o, cap);
            events
                .network_options
                .set_connection_timeout(c.connect_timeout.as_secs());
            (Client::V4(client), Events::V4(Box::new(events)))
        }
        Protocol::V5 => {
            let mut o = v5::MqttOptions::new(&s.client_id, broker.host, broker.port);
            let expiry = u32::try_from(c.session_expiry.as_secs()).unwrap_or(u32::MAX);
            o.set_keep_alive(c.keep_alive)
                .set_clean_start(s.clean)
                .set_session_expiry_interval((!s.clean).then_some(expiry))
                .set_receive_maximum(Some(s.receive_maximum.max(1)))
                .set_manual_acks(s.manual_acks)
                .set_connection_timeout(c.connect_timeout.as_secs())
                .set_transport(transport);
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            let (client, events) = v5::AsyncClient::new(o, cap);
            (Client::V5(client), Events::V5(Box::new(events)))
        }
    })
}

impl Events {
    /// The next event; an error is a lost connection (polling again reconnects).
    pub async fn poll(&mut self) -> Result<Event, LinkError> {
        match self {
            Self::V4(events) => {
                use rumqttc::{ConnectionError as C, Event as E, Packet as P};
                let event = events.poll().await.map_err(|e| match &e {
                    C::ConnectionRefused(code) => {
                        link_error(Some(format!("{code:?}")), e.to_string())
                    }
                    _ => link_error(None, e.to_string()),
                })?;
                Ok(match event {
                    E::Incoming(P::ConnAck(ack)) => Event::Connected {
                        session_present: ack.session_present,
                    },
                    E::Incoming(P::Publish(p)) => Event::Publish(Publish {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        retain: p.retain,
                        dup: p.dup,
                        properties: Vec::new(),
                        content_type: None,
                    }),
                    E::Incoming(P::PubAck(ack)) => Event::PubAck(ack.pkid, Ok(())),
                    E::Incoming(P::SubAck(ack))
                        if ack
                            .return_codes
                            .contains(&rumqttc::SubscribeReasonCode::Failure) =>
                    {
                        Event::Refused(format!("{:?}", ack.return_codes))
                    }
                    E::Incoming(P::SubAck(_)) => Event::Subscribed,
                    E::Outgoing(Outgoing::Publish(pkid)) => Event::Published(pkid),
                    E::Outgoing(Outgoing::Disconnect) => Event::Disconnected,
                    _ => Event::Other,
                })
            }
            Self::V5(events) => {
                use v5::{ConnectionError as C, Event as E, Incoming as P};
                let event = events.poll().await.map_err(|e| match &e {
                    C::ConnectionRefused(code) => {
                        link_error(Some(format!("{code:?}")), e.to_string())
                    }
                    _ => link_error(None, e.to_string()),
                })?;
                Ok(match event {
                    E::Incoming(P::ConnAck(ack)) => Event::Connected {
                        session_present: ack.session_present,
                    },
                    E::Incoming(P::Publish(p)) => {
                        let (properties, content_type) = p
                            .properties
                            .map(|p| (p.user_properties, p.content_type))
                            .unwrap_or_default();
                        Event::Publish(Publish {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            qos: p.qos as u8,
                            pkid: p.pkid,
                            retain: p.retain,
                            dup: p.dup,
                            properties,
                            content_type,
                        })
                    }
                    E::Incoming(P::PubAck(ack)) => {
                        let ok = matches!(
                            ack.reason,
                            m5::PubAckReason::Success | m5::PubAckReason::NoMatchingSubscribers
                        );
                        let why = format!("{:?}", ack.reason);
                        Event::PubAck(ack.pkid, if ok { Ok(()) } else { Err(why) })
                    }
                    E::Incoming(P::SubAck(ack))
                        if ack
                            .return_codes
                            .iter()
                            .any(|c| !matches!(c, m5::SubscribeReasonCode::Success(_))) =>
                    {
                        Event::Refused(format!("{:?}", ack.return_codes))
                    }
                    E::Incoming(P::SubAck(_)) => Event::Subscribed,
                    E::Outgoing(Outgoing::Publish(pkid)) => Event::Published(pkid),
                    E::Outgoing(Outgoing::Disconnect) => Event::Disconnected,
                    _ => Event::Other,
                })
            }
        }
    }

    /// Polls until `until` picks an event, within `within`.
    pub async fn until<T>(
        &mut self,
        within: Duration,
        mut until: impl FnMut(Event) -> Option<Result<T, String>>,
    ) -> Result<T, String> {
        let wait = async {
            loop {
                let event = self.poll().await.map_err(|e| e.text)?;
                if let Some(done) = until(event) {
                    return done;
                }
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .map_err(|_| format!("no answer from the broker within {within:?}"))?
    }

    /// Polls in a task of its own, handing what matters to [`Driver::rx`]; reconnects
    /// with backoff after a lost connection. `capacity` bounds the messages waiting.
    pub fn drive(self, capacity: usize) -> Driver {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let epoch = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(drive(self, tx, epoch.clone(), stop.clone()));
        Driver {
            rx,
            epoch,
            stop: stop.drop_guard(),
            task,
        }
    }
}

/// What the driving task hands on.
#[derive(Debug)]
pub enum Signal {
    /// Connected (again).
    Connected {
        /// The broker resumed the session: its subscriptions are in place.
        session_present: bool,
    },
    /// The broker acknowledged a subscription.
    Subscribed,
    /// A message, received on connection `epoch`.
    Publish(Publish, u64),
    /// The connection was lost; the task reconnects.
    Lost(LinkError),
    /// A subscription was refused.
    Refused(String),
}

/// An event loop polled by a task: its signals, and which connection is current.
pub struct Driver {
    /// Signals, in order.
    pub rx: mpsc::Receiver<Signal>,
    /// Changes on every connect and every loss: a PUBACK is sent only on the connection
    /// its message came on. After a reconnect the broker sends the unacknowledged
    /// messages again with their packet ids, so an acknowledgement from the older
    /// connection could hit another message that reused the id.
    epoch: Arc<AtomicU64>,
    /// Stops the task when the driver is dropped.
    stop: DropGuard,
    task: JoinHandle<()>,
}

impl Driver {
    /// Whether messages of connection `epoch` may still be acknowledged.
    pub fn current(&self, epoch: u64) -> bool {
        self.epoch.load(Ordering::SeqCst) == epoch
    }

    /// Waits up to `within` for the task to see our DISCONNECT go out, then stops it.
    pub async fn finish(self, within: Duration) {
        let mut task = self.task;
        let stop = self.stop.disarm();
        if tokio::time::timeout(within, &mut task).await.is_err() {
            stop.cancel();
            let _ = task.await;
        }
    }
}

async fn drive(
    mut events: Events,
    tx: mpsc::Sender<Signal>,
    epoch: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut failures = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(30),
    }
    .attempts();
    loop {
        let event = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            event = events.poll() => event,
        };
        let signal = match event {
            Ok(Event::Connected { session_present }) => {
                failures.reset();
                epoch.fetch_add(1, Ordering::SeqCst);
                Signal::Connected { session_present }
            }
            Ok(Event::Publish(p)) => Signal::Publish(p, epoch.load(Ordering::SeqCst)),
            Ok(Event::Subscribed) => Signal::Subscribed,
            Ok(Event::Refused(why)) => Signal::Refused(why),
            Ok(Event::Disconnected) => return,
            Ok(_) => continue,
            Err(e) => {
                epoch.fetch_add(1, Ordering::SeqCst);
                let fatal = e.fatal;
                // Dropped when the channel is full: the source learns of it soon enough.
                let _ = tx.try_send(Signal::Lost(e));
                if fatal {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(failures.next_delay()) => continue,
                }
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            sent = tx.send(signal) => if sent.is_err() { return },
        }
    }
}

impl Client {
    /// Subscribes to `filters` with `qos` (retained messages not sent when `retained` is
    /// off, with MQTT 5; 3.1.1 sends them and the source skips them).
    pub async fn subscribe(&self, filters: &[String], q: u8, retained: bool) -> Result<(), String> {
        if filters.is_empty() {
            return Ok(());
        }
        match self {
            Self::V4(c) => {
                c.subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos(q))),
                )
                .await
            }
            Self::V5(c) => {
                let filters = filters.iter().map(|f| {
                    let mut filter = m5::Filter::new(f.clone(), qos5(q));
                    filter.retain_forward_rule = if retained {
                        m5::RetainForwardRule::OnEverySubscribe
                    } else {
                        m5::RetainForwardRule::Never
                    };
                    filter
                });
                return c.subscribe_many(filters).await.map_err(|e| e.to_string());
            }
        }
        .map_err(|e| e.to_string())
    }

    /// Unsubscribes from `filter`.
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Self::V4(c) => c.unsubscribe(filter).await.map_err(|e| e.to_string()),
            Self::V5(c) => c.unsubscribe(filter).await.map_err(|e| e.to_string()),
        }
    }

    /// Sends the PUBACK of message `pkid` (QoS 1).
    pub async fn ack(&self, pkid: u16) -> Result<(), String> {
        match self {
            Self::V4(c) => {
                let mut p = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            Self::V5(c) => {
                let mut p = m5::Publish::new("", v5::mqttbytes::QoS::AtLeastOnce, Vec::new(), None);
                p.pkid = pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Publishes with QoS 1, not retained; `properties` only with MQTT 5.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        properties: Vec<(String, String)>,
        content_type: Option<String>,
    ) -> Result<(), String> {
        match self {
            Self::V4(c) => {
                c.publish_bytes(topic, QoS::AtLeastOnce, false, payload)
                    .await
            }
            Self::V5(c) => {
                let properties = m5::PublishProperties {
                    user_properties: properties,
                    content_type,
                    ..m5::PublishProperties::default()
                };
                return c
                    .publish_with_properties(
                        topic,
                        v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        payload,
                        properties,
                    )
                    .await
                    .map_err(|e| e.to_string());
            }
        }
        .map_err(|e| e.to_string())
    }

    /// Sends DISCONNECT (the event loop must be polled for it to go out).
    pub async fn disconnect(&self) {
        let _ = match self {
            Self::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Self::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}
