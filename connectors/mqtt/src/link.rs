//! One MQTT connection, 3.1.1 or 5, behind one small vocabulary: rumqttc has a client and
//! an event loop per protocol version, of the same shape and different types. The rest of
//! the connector speaks only [`Client`], [`Events`] and [`Event`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{Outgoing, TlsConfiguration, Transport, v5};

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
    /// Our PUBACK of a received message went out.
    Acknowledged,
    /// Our DISCONNECT went out.
    Disconnected,
    /// Anything else (pings, acknowledgements of unsubscribing).
    Other,
}

/// A lost or refused connection.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{text}")]
pub struct LinkError {
    /// The broker refused us for a reason retrying cannot fix (credentials, client id,
    /// protocol version); a busy or unavailable server may take us later.
    pub fatal: bool,
    /// What happened.
    pub text: String,
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
    /// Acknowledge only through [`Client::try_ack`].
    pub manual_acks: bool,
    /// MQTT 5 receive maximum: how many unacknowledged messages the broker may send.
    pub receive_maximum: u16,
}

fn tls(config: &MqttConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.tls_ca_file {
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let unreadable = |e: rustls::pki_types::pem::Error| format!("{}: {e}", path.display());
            for cert in CertificateDer::pem_file_iter(path).map_err(unreadable)? {
                roots
                    .add(cert.map_err(unreadable)?)
                    .map_err(|e| e.to_string())?;
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
    let password = c.password.as_ref().map(|p| p.expose().to_owned());
    let credentials = (c.username.is_some() || password.is_some()).then(|| {
        (
            c.username.clone().unwrap_or_default(),
            password.unwrap_or_default(),
        )
    });
    // Acknowledgements are sent without waiting (`try_ack`); this is room for a receive
    // window of them and the subscriptions.
    let cap = usize::from(s.receive_maximum) + 256;
    // The options of both versions have the same setters for what both have.
    macro_rules! common {
        ($o:ident) => {
            $o.set_keep_alive(c.keep_alive)
                .set_manual_acks(s.manual_acks)
                .set_transport(transport);
            if let Some((u, p)) = credentials {
                $o.set_credentials(u, p);
            }
        };
    }
    Ok(match c.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&s.client_id, broker.host, broker.port);
            o.set_clean_session(s.clean);
            common!(o);
            let (client, mut events) = rumqttc::AsyncClient::new(o, cap);
            events
                .network_options
                .set_connection_timeout(c.connect_timeout.as_secs());
            (Client::V4(client), Events::V4(Box::new(events)))
        }
        Protocol::V5 => {
            let mut o = v5::MqttOptions::new(&s.client_id, broker.host, broker.port);
            let expiry = u32::try_from(c.session_expiry.as_secs()).unwrap_or(u32::MAX);
            o.set_clean_start(s.clean)
                .set_session_expiry_interval((!s.clean).then_some(expiry))
                .set_receive_maximum(Some(s.receive_maximum.max(1)))
                .set_connection_timeout(c.connect_timeout.as_secs());
            common!(o);
            let (client, events) = v5::AsyncClient::new(o, cap);
            (Client::V5(client), Events::V5(Box::new(events)))
        }
    })
}

/// One event of either version's event loop (`$m`: the module with its `Event`,
/// `Incoming`, `ConnectionError`), the same packet names in both.
macro_rules! event {
    ($polled:expr, $m:ident, $ok_code:pat, $publish:expr, $puback:expr) => {{
        use $m::{ConnectionError as C, Event as E, Incoming as P};
        let polled: Result<E, C> = $polled;
        Ok(match polled.map_err(|e| LinkError {
            fatal: matches!(&e, C::ConnectionRefused(code)
                if !format!("{code:?}").contains("Unavailable") && !format!("{code:?}").contains("Busy")),
            text: e.to_string(),
        })? {
            E::Incoming(P::ConnAck(ack)) => Event::Connected {
                session_present: ack.session_present,
            },
            E::Incoming(P::Publish(p)) => Event::Publish($publish(p)),
            E::Incoming(P::PubAck(ack)) => Event::PubAck(ack.pkid, $puback(&ack)),
            E::Incoming(P::SubAck(ack)) if ack.return_codes.iter().all(|c| matches!(c, $ok_code)) => {
                Event::Subscribed
            }
            E::Incoming(P::SubAck(ack)) => Event::Refused(format!("{:?}", ack.return_codes)),
            E::Outgoing(Outgoing::Publish(pkid)) => Event::Published(pkid),
            E::Outgoing(Outgoing::PubAck(_)) => Event::Acknowledged,
            E::Outgoing(Outgoing::Disconnect) => Event::Disconnected,
            _ => Event::Other,
        })
    }};
}

impl Events {
    /// The next event; an error is a lost connection (polling again reconnects).
    pub async fn poll(&mut self) -> Result<Event, LinkError> {
        match self {
            Self::V4(events) => event!(
                events.poll().await,
                rumqttc,
                rumqttc::SubscribeReasonCode::Success(_),
                |p: rumqttc::Publish| Publish {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    retain: p.retain,
                    dup: p.dup,
                    properties: Vec::new(),
                    content_type: None,
                },
                |_: &rumqttc::PubAck| Ok(())
            ),
            Self::V5(events) => event!(
                events.poll().await,
                v5,
                m5::SubscribeReasonCode::Success(_),
                |p: m5::Publish| {
                    let (properties, content_type) = p
                        .properties
                        .map(|p| (p.user_properties, p.content_type))
                        .unwrap_or_default();
                    Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        retain: p.retain,
                        dup: p.dup,
                        properties,
                        content_type,
                    }
                },
                |ack: &m5::PubAck| match ack.reason {
                    m5::PubAckReason::Success | m5::PubAckReason::NoMatchingSubscribers => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            ),
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
                if let Some(done) = until(self.poll().await.map_err(|e| e.text)?) {
                    return done;
                }
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .map_err(|_| format!("no answer from the broker within {within:?}"))?
    }
}

/// `$call` on whichever client, its error as text.
macro_rules! each {
    ($client:expr, $c:ident => $call:expr) => {
        match $client {
            Client::V4($c) => $call.map_err(|e| e.to_string()),
            Client::V5($c) => $call.map_err(|e| e.to_string()),
        }
    };
}

impl Client {
    /// Subscribes to `filters` with QoS `q` (retained messages not sent when `retained`
    /// is off, with MQTT 5; 3.1.1 sends them and the source skips them).
    pub async fn subscribe(&self, filters: &[String], q: u8, retained: bool) -> Result<(), String> {
        if filters.is_empty() {
            return Ok(());
        }
        match self {
            Self::V4(c) => {
                let qos = rumqttc::qos(q).map_err(|e| e.to_string())?;
                let filters = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos));
                c.subscribe_many(filters).await.map_err(|e| e.to_string())
            }
            Self::V5(c) => {
                let qos = v5::mqttbytes::qos(q).ok_or("QoS above 2")?;
                let filters = filters.iter().map(|f| {
                    let mut filter = m5::Filter::new(f.clone(), qos);
                    if !retained {
                        filter.retain_forward_rule = m5::RetainForwardRule::Never;
                    }
                    filter
                });
                c.subscribe_many(filters).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Unsubscribes from `filter`.
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), String> {
        each!(self, c => c.unsubscribe(filter).await)
    }

    /// Queues the PUBACK of QoS 1 message `pkid` without waiting: `false` when the queue
    /// to the event loop is full (try again later). Waiting here could deadlock: the
    /// event loop's task may itself be waiting for the source to take a message.
    pub fn try_ack(&self, pkid: u16) -> bool {
        match self {
            Self::V4(c) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
            Self::V5(c) => {
                let qos = v5::mqttbytes::QoS::AtLeastOnce;
                let mut p = m5::Publish::new("", qos, Vec::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
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
            Self::V4(c) => c
                .publish_bytes(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| e.to_string()),
            Self::V5(c) => {
                let properties = m5::PublishProperties {
                    user_properties: properties,
                    content_type,
                    ..m5::PublishProperties::default()
                };
                let qos = v5::mqttbytes::QoS::AtLeastOnce;
                c.publish_with_properties(topic, qos, false, payload, properties)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Sends DISCONNECT (the event loop must be polled for it to go out).
    pub async fn disconnect(&self) {
        let _ = each!(self, c => c.disconnect().await);
    }
}
