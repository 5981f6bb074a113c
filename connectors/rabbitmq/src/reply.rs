//! Replies, the AMQP RPC pattern: a request with a `reply_to` property gets the function's
//! response published to `reply_to` (a routing key on `reply_exchange`; on the default
//! exchange `""`, the name of the requester's queue), with publisher confirms.
//!
//! A reply carries:
//!
//! | reply | from |
//! | --- | --- |
//! | body | the response body (a delivered function's if any, else the first response) |
//! | `correlation_id` | the request's |
//! | `content_type` | the response's `Content-Type` |
//! | `delivery_mode` | the request's (persistent requests get persistent replies) |
//! | `X-Function-Status` header | the HTTP status, as nats-connector replies; 404 when no function subscribes, 502 when the function could not be reached |
//! | `X-Function` header | the function that answered |
//! | `x-connector-hops` header | one more than the request's |
//!
//! Only a request that is about to be acknowledged gets a reply (every delivery delivered,
//! dead-lettered or dropped, or no function subscribed): one held or released comes back
//! and is answered then, so a requester gets one reply per request in the normal case (at
//! least once, like every delivery, across a crash between the confirm and the ack).
//!
//! The reply is confirmed before the request is acknowledged. A reply the broker refuses
//! or does not confirm in time is counted (`connector_rabbitmq_replies_total{result=
//! "failed"}`) and the request is held as an undeliverable message is (requeued after
//! `hold_delay`, invoked again): nothing is lost. A reply no queue takes (the requester
//! is gone) is counted as `unroutable` and the request is acknowledged: nobody waits for
//! it. Replies never carry a `reply_to` of their own, so a reply consumed by a connector
//! is never answered; the hop count guards against chains that copy headers: a request
//! that already made `reply_max_hops` hops gets no reply (`hop_limit`).

use bytes::Bytes;
use connector_sdk::MessageOutcome;
use connector_sdk::trace::TraceContext;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::config::RabbitConfig;
use crate::delivery;
use crate::metrics::RabbitMetrics;
use crate::publish::{ConfirmedPublisher, PublishError, Published};

pub use connector_sdk::message::{
    REPLY_FUNCTION_HEADER as FUNCTION_HEADER, REPLY_STATUS_HEADER as STATUS_HEADER,
};
/// The hop count (as kafka-connector's).
pub const HOPS_HEADER: &str = "x-connector-hops";

/// Where a request wants its reply: read from its properties when it is consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The request's routing key (named in a 404's body).
    pub topic: String,
    /// `reply_to`: the routing key of the reply.
    pub routing_key: ShortString,
    /// The request's `correlation_id`, copied to the reply.
    pub correlation_id: Option<ShortString>,
    /// The request's `x-connector-hops`.
    pub hops: u32,
    /// Whether the request was persistent (`delivery_mode` 2).
    pub persistent: bool,
    /// The request's trace context, carried by the reply (set by the source once the
    /// request's message exists).
    pub trace: Option<TraceContext>,
}

impl ReplyTo {
    /// The reply address of a request on `topic`; `None` without a (non-empty) `reply_to`.
    pub fn from_request(topic: &str, properties: &BasicProperties) -> Option<Self> {
        let routing_key = properties
            .reply_to()
            .clone()
            .filter(|r| !r.as_str().is_empty())?;
        let hops = properties
            .headers()
            .as_ref()
            .and_then(|h| {
                h.inner()
                    .iter()
                    .find(|(k, _)| k.as_str().eq_ignore_ascii_case(HOPS_HEADER))
                    .map(|(_, v)| v)
            })
            .and_then(delivery::text)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Some(Self {
            topic: topic.to_owned(),
            routing_key,
            correlation_id: properties.correlation_id().clone(),
            hops,
            persistent: *properties.delivery_mode() == Some(2),
            trace: None,
        })
    }
}

/// Why a reply was not published: the request must not be acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("publishing the reply to {routing_key}: {source}")]
pub struct ReplyError {
    /// Where it was going.
    pub routing_key: String,
    /// Why it failed.
    #[source]
    pub source: PublishError,
}

/// Publishes replies with confirms, on a connection of its own (`replies`).
pub struct Replies {
    exchange: ShortString,
    max_hops: u32,
    publisher: ConfirmedPublisher,
    metrics: RabbitMetrics,
}

impl Replies {
    /// Replies to `config.reply_exchange` (validated to be a short string).
    pub fn new(config: &RabbitConfig, metrics: RabbitMetrics) -> Result<Self, crate::Error> {
        let exchange = ShortString::try_new(config.reply_exchange.clone())
            .map_err(|e| crate::Error::Setup(format!("reply_exchange: {e}")))?;
        Ok(Self {
            exchange,
            max_hops: config.reply_max_hops,
            publisher: ConfirmedPublisher::new(config, "replies"),
            metrics,
        })
    }

    /// Publishes the reply to a request whose deliveries ended as `outcome`, and waits
    /// for its confirmation. `Ok` when it is confirmed, or when there is nobody to take it
    /// (unroutable) or it must not go (hop limit): the request may be acknowledged.
    pub async fn send(&self, to: &ReplyTo, outcome: &MessageOutcome) -> Result<(), ReplyError> {
        if to.hops >= self.max_hops {
            self.metrics.reply("hop_limit");
            tracing::warn!(ce_id = %outcome.id, hops = to.hops, reply_to = %to.routing_key, "reply not published: hop limit reached");
            return Ok(());
        }
        let (properties, body) = reply_for(to, outcome);
        let published = self
            .publisher
            .publish(
                self.exchange.clone(),
                to.routing_key.clone(),
                &body,
                properties,
            )
            .await;
        match published {
            Ok(Published::Confirmed) => {
                self.metrics.reply("published");
                Ok(())
            }
            Ok(Published::Unroutable) => {
                self.metrics.reply("unroutable");
                tracing::warn!(ce_id = %outcome.id, reply_to = %to.routing_key, exchange = %self.exchange, "reply unroutable: no queue takes it (the requester is gone?); the request is acknowledged");
                Ok(())
            }
            Err(source) => {
                self.metrics.reply("failed");
                Err(ReplyError {
                    routing_key: to.routing_key.to_string(),
                    source,
                })
            }
        }
    }
}

/// The reply to a request whose deliveries ended as `outcome` (see
/// [`MessageOutcome::reply`]), as AMQP properties and a body.
pub fn reply_for(to: &ReplyTo, outcome: &MessageOutcome) -> (BasicProperties, Bytes) {
    let reply = outcome.reply(&to.topic);
    let mut headers = FieldTable::default();
    let mut header = |name: &str, value: &str| {
        headers.insert(
            name.into(),
            AMQPValue::LongString(value.as_bytes().to_vec().into()),
        );
    };
    header(HOPS_HEADER, &to.hops.saturating_add(1).to_string());
    for (name, value) in to.trace.iter().flat_map(|t| t.pairs()) {
        header(name, &String::from_utf8_lossy(value.as_bytes()));
    }
    header(STATUS_HEADER, &reply.status);
    if let Some(function) = reply.function {
        header(FUNCTION_HEADER, function.as_str());
    }
    let content_type = reply
        .content_type
        .and_then(|v| ShortString::try_new(v).ok());
    let body = reply.body;
    let mut properties = BasicProperties::default()
        .with_delivery_mode(if to.persistent { 2 } else { 1 })
        .with_headers(headers);
    if let Some(id) = &to.correlation_id {
        properties = properties.with_correlation_id(id.clone());
    }
    if let Some(ct) = content_type {
        properties = properties.with_content_type(ct);
    }
    (properties, body)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use connector_sdk::FunctionRef;
    use connector_sdk::message::DeliveryOutcome;
    use connector_sdk::message::{DeliveryReport, InvocationResponse};

    use super::*;

    fn request(hops: Option<AMQPValue>) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(h) = hops {
            headers.insert(HOPS_HEADER.into(), h);
        }
        BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to.abc".into())
            .with_correlation_id("c-1".into())
            .with_headers(headers)
    }

    fn header(p: &BasicProperties, name: &str) -> Option<String> {
        p.headers()
            .as_ref()?
            .inner()
            .get(name)
            .and_then(delivery::text)
    }

    #[test]
    fn only_a_request_with_reply_to_wants_a_reply() {
        assert_eq!(
            ReplyTo::from_request("t", &BasicProperties::default()),
            None
        );
        let empty = BasicProperties::default().with_reply_to("".into());
        assert_eq!(ReplyTo::from_request("t", &empty), None);
        let to = ReplyTo::from_request("t", &request(Some(AMQPValue::LongInt(2)))).unwrap();
        assert_eq!(to.routing_key.as_str(), "amq.rabbitmq.reply-to.abc");
        assert_eq!(to.correlation_id.as_ref().unwrap().as_str(), "c-1");
        assert_eq!(to.hops, 2);
        assert!(!to.persistent);
        let text = request(Some(AMQPValue::LongString("3".into())));
        assert_eq!(ReplyTo::from_request("t", &text).unwrap().hops, 3);
    }

    #[test]
    fn the_reply_carries_the_response_status_and_correlation_id() {
        let to = ReplyTo::from_request("orders.new", &request(None)).unwrap();
        let mut response_headers = http::HeaderMap::new();
        response_headers.insert("content-type", "application/json".parse().unwrap());
        let response = InvocationResponse {
            status: http::StatusCode::CREATED,
            headers: response_headers,
            body: Bytes::from_static(b"{\"ok\":true}"),
        };
        let outcome = MessageOutcome {
            id: "q/1".into(),
            deliveries: vec![DeliveryReport {
                function: FunctionRef::new("echo", None),
                outcome: DeliveryOutcome::Delivered,
                attempts: 1,
                response: Some(Arc::new(response)),
                error: None,
            }],
            interrupted: false,
            held_unmatched: false,
        };
        let (p, body) = reply_for(&to, &outcome);
        assert_eq!(&body[..], b"{\"ok\":true}");
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(header(&p, STATUS_HEADER).as_deref(), Some("201"));
        assert_eq!(header(&p, FUNCTION_HEADER).as_deref(), Some("echo"));
        assert_eq!(header(&p, HOPS_HEADER).as_deref(), Some("1"));
        assert_eq!(p.reply_to(), &None, "a reply is never answered");
    }

    #[test]
    fn a_request_nobody_subscribes_to_gets_404() {
        let to = ReplyTo::from_request("a.b", &request(None)).unwrap();
        let outcome = MessageOutcome {
            id: "x".into(),
            deliveries: Vec::new(),
            interrupted: false,
            held_unmatched: false,
        };
        let (p, body) = reply_for(&to, &outcome);
        assert_eq!(header(&p, STATUS_HEADER).as_deref(), Some("404"));
        assert_eq!(&body[..], b"no function subscribes to a.b");
    }
}
