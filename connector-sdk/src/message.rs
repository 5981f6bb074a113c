//! What a source hands to the dispatcher ([`Message`]) and what it gets back when every
//! delivery of that message is terminal ([`MessageOutcome`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::function::FunctionRef;

/// One event from a source, as the dispatcher delivers it to every subscribed function.
///
/// `id` becomes `ce-id` and must be derived from the message's coordinates in its source
/// (Kafka `topic/partition/offset`, a Redis entry id, an SQS message id) so it is the same
/// on every redelivery and functions can deduplicate on it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic the message arrived on; decides which functions receive it (`X-Topic`).
    pub topic: String,
    /// The body sent to functions, byte for byte.
    pub payload: Bytes,
    /// Stable identity of the message in its source (`ce-id`).
    pub id: String,
    /// Where it came from (`ce-source`), for example `kafka://broker/orders`.
    pub source: String,
    /// `ce-type`; set by the connector (`com.example.order.created`), else
    /// `<connector>.message`.
    pub event_type: Option<String>,
    /// When the event happened (`ce-time`); the broker's timestamp where it has one.
    pub time: Option<SystemTime>,
    /// `ce-subject`, when the source has a natural one (a Kafka key, a NATS subject).
    pub subject: Option<String>,
    /// The message's own content type, used when the connector configures none.
    pub content_type: Option<HeaderValue>,
    /// Source metadata forwarded to the function (`X-Kafka-Partition`, ...). Those that
    /// could change the HTTP exchange or impersonate the connector (`Content-Length`,
    /// `Host`, `Authorization`, `X-Callback-Url`, `X-Topic`, `ce-*`, `Content-Type`, ...)
    /// are withheld: see [`crate::source_headers`]. The SDK's own headers are set after
    /// the rest.
    pub headers: HeaderMap,
    /// With `ordering = "key"`: messages with equal keys are delivered one after another.
    pub ordering_key: Option<Bytes>,
    /// Where the message sits in its source, as name/value pairs (`topic`, `partition`,
    /// `offset`), copied into dead letters as provenance.
    pub coordinates: Vec<(String, String)>,
    /// How many times the broker delivered this message before (its own redelivery count);
    /// attempts continue from there and count against `max_attempts`.
    pub prior_attempts: u32,
    /// What the connector's own dead-letter sink needs of the broker that is not HTTP
    /// shaped (Kafka: the record's key and raw headers), typed and travelling with the
    /// message: a [`DeadLetter`](crate::DeadLetter) carries the message, so the sink
    /// reads it back with `letter.message.extensions.get::<T>()`. Never sent to a
    /// function.
    pub extensions: http::Extensions,
    /// The W3C trace context the event carries in its source (Kafka and NATS headers,
    /// SQS attributes, a Redis entry field, ...), set by the connector with
    /// [`set_trace_context`](Self::set_trace_context); see [`crate::trace`].
    pub trace_context: Option<crate::trace::TraceContext>,
}

impl Message {
    /// A message on `topic` with `payload`, identified by `id` in its `source`.
    pub fn new(
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        id: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            id: id.into(),
            source: source.into(),
            event_type: None,
            time: None,
            subject: None,
            content_type: None,
            headers: HeaderMap::new(),
            ordering_key: None,
            coordinates: Vec::new(),
            prior_attempts: 0,
            extensions: http::Extensions::new(),
            trace_context: None,
        }
    }

    /// Adds a source metadata header; names or values that are not valid HTTP are skipped
    /// (returned as `false`) rather than failing the message.
    pub fn add_header(&mut self, name: &str, value: &str) -> bool {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                self.headers.append(name, value);
                true
            }
            _ => false,
        }
    }

    /// Sets the ordering key.
    pub fn with_ordering_key(mut self, key: impl Into<Bytes>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Adds one provenance coordinate.
    pub fn with_coordinate(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.coordinates.push((name.into(), value.to_string()));
        self
    }

    /// Sets `ce-time`.
    pub fn with_time(mut self, time: SystemTime) -> Self {
        self.time = Some(time);
        self
    }

    /// Sets `ce-subject`.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets `ce-type`.
    pub fn with_event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Sets the message's own content type (ignored when it is not a valid header value).
    pub fn with_content_type(mut self, content_type: &str) -> Self {
        self.content_type = HeaderValue::from_str(content_type).ok();
        self
    }

    /// Attaches `value` for the connector's dead-letter sink (see
    /// [`extensions`](Self::extensions)).
    pub fn with_extension<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.extensions.insert(value);
        self
    }

    /// Sets how many times the broker delivered it before.
    pub fn with_prior_attempts(mut self, prior: u32) -> Self {
        self.prior_attempts = prior;
        self
    }

    /// Whether its payload is read as JSON when it parses: its content type says JSON
    /// (`application/json`, `application/cloudevents+json`, ...) or it has none. A filter's
    /// `data` and a batch item's `data` both follow this rule.
    pub fn may_be_json(&self) -> bool {
        self.content_type
            .as_ref()
            .and_then(|c| c.to_str().ok())
            .is_none_or(|c| c.to_ascii_lowercase().contains("json"))
    }

    /// Its CloudEvents type: its own, else `default` (the connector's `<name>.message`).
    pub fn event_type_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.event_type.as_deref().unwrap_or(default)
    }
}

/// The response of one invocation, as far as it was read.
#[derive(Debug, Clone)]
pub struct InvocationResponse {
    /// HTTP status.
    pub status: http::StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body (up to the SDK's read limit).
    pub body: Bytes,
}

/// How one delivery (message × function) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The function accepted it.
    Delivered,
    /// It was written to the dead-letter destination.
    DeadLettered,
    /// It was discarded by the operator's choice (`drop` statuses, `on_exhausted = "drop"`).
    Dropped,
    /// It failed for good and could not be dead-lettered: its message must stay with the
    /// broker (Kafka: the partition holds; others: no ack, the broker redelivers).
    Held,
    /// Abandoned on shutdown before it finished: release the message to the broker.
    Released,
    /// Only with broker retries ([`DispatcherBuilder::broker_retries`]): an attempt failed
    /// in a way worth retrying and attempts remain, so the delivery ended at once and the
    /// broker is to redeliver the message after `after` (the backoff delay, at least the
    /// function's `Retry-After`).
    ///
    /// [`DispatcherBuilder::broker_retries`]: crate::dispatcher::DispatcherBuilder::broker_retries
    Retry {
        /// How long the broker should keep the message before redelivering it.
        after: Duration,
    },
    /// The function's filter (`connector.filter`) rejected the message: not invoked, and
    /// done with for that function.
    Filtered,
}

impl DeliveryOutcome {
    /// Every outcome's [`as_str`](Self::as_str) name.
    pub const NAMES: [&'static str; 7] = [
        "delivered",
        "dead_lettered",
        "dropped",
        "held",
        "released",
        "retry",
        "filtered",
    ];

    /// Whether this outcome lets its message be acknowledged.
    pub fn allows_ack(self) -> bool {
        matches!(
            self,
            Self::Delivered | Self::DeadLettered | Self::Dropped | Self::Filtered
        )
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::DeadLettered => "dead_lettered",
            Self::Dropped => "dropped",
            Self::Held => "held",
            Self::Released => "released",
            Self::Retry { .. } => "retry",
            Self::Filtered => "filtered",
        }
    }
}

/// The end of one delivery.
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    /// The function.
    pub function: FunctionRef,
    /// How it ended.
    pub outcome: DeliveryOutcome,
    /// Attempts made in this process.
    pub attempts: u32,
    /// The last response, if one arrived (the function's output, for request/reply).
    pub response: Option<Arc<InvocationResponse>>,
    /// The last transport error, if the last attempt had no response.
    pub error: Option<String>,
}

/// What a source does with a message once all its deliveries are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Acknowledge (commit, XACK, delete, ack): every delivery was delivered,
    /// dead-lettered or dropped, or no function subscribes to the topic.
    Ack,
    /// Do not acknowledge: a delivery failed for good and could not be dead-lettered.
    /// The message stays with the broker (Kafka: the partition is stalled at it).
    Hold,
    /// Do not acknowledge, and give it back now (nak, visibility 0): shutdown cut it short.
    Release,
    /// Do not acknowledge; have the broker redeliver it after `after` (SQS: visibility
    /// timeout `after`; JetStream: nak with delay). A delivery is to be retried and the
    /// dispatcher runs with broker retries; `after` is the longest delay its retrying
    /// deliveries asked for. Never produced without
    /// [`DispatcherBuilder::broker_retries`].
    ///
    /// [`DispatcherBuilder::broker_retries`]: crate::dispatcher::DispatcherBuilder::broker_retries
    Retry {
        /// How long the broker should keep the message before redelivering it.
        after: Duration,
    },
}

impl Disposition {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Hold => "hold",
            Self::Release => "release",
            Self::Retry { .. } => "retry",
        }
    }
}

/// The result of dispatching one message: one report per subscribed function.
#[derive(Debug, Clone)]
pub struct MessageOutcome {
    /// The message's `id`.
    pub id: String,
    /// One report per function; empty when no function subscribes to the topic.
    pub deliveries: Vec<DeliveryReport>,
    /// The dispatcher was torn down before the message completed: release it.
    pub interrupted: bool,
    /// No function subscribes to the message's topic, which the connector consumes
    /// because `topics` names it, and `unmatched = "hold"`: hold it.
    pub held_unmatched: bool,
}

impl MessageOutcome {
    /// What the source should do with the message: the worst of its deliveries, in the
    /// order release (shutdown: give it back now), retry (the longest delay asked for),
    /// hold, ack. A retry outranks a hold: the broker redelivers the message either way,
    /// and the retrying delivery wants it back on time.
    pub fn disposition(&self) -> Disposition {
        let outcomes = || self.deliveries.iter().map(|d| d.outcome);
        let retry_after = outcomes()
            .filter_map(|o| match o {
                DeliveryOutcome::Retry { after } => Some(after),
                _ => None,
            })
            .max();
        if self.interrupted || outcomes().any(|o| o == DeliveryOutcome::Released) {
            Disposition::Release
        } else if let Some(after) = retry_after {
            Disposition::Retry { after }
        } else if self.held_unmatched || outcomes().any(|o| o == DeliveryOutcome::Held) {
            Disposition::Hold
        } else {
            Disposition::Ack
        }
    }

    /// Whether no function subscribed to the message's topic.
    pub fn unmatched(&self) -> bool {
        self.deliveries.is_empty() && !self.interrupted
    }
}

/// Header of a reply naming the function's HTTP status (`X-Function-Status`).
pub const REPLY_STATUS_HEADER: &str = "X-Function-Status";
/// Header of a reply naming the function that answered (`X-Function`).
pub const REPLY_FUNCTION_HEADER: &str = "X-Function";

/// The reply to a request (NATS request-reply, AMQP `reply_to`), whatever the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'a> {
    /// The function's HTTP status, or what stood in for it: `404` (no function
    /// subscribes), `503` (the connector is shutting down), `502` (no response).
    pub status: String,
    /// The function whose answer this is.
    pub function: Option<&'a FunctionRef>,
    /// The response's `Content-Type`.
    pub content_type: Option<&'a str>,
    /// The response body, or why there is none.
    pub body: Bytes,
}

impl MessageOutcome {
    /// The reply to a request on `topic` whose deliveries ended as this outcome: the
    /// first delivered function's response, else the first response, else the first
    /// delivery's error.
    pub fn reply(&self, topic: &str) -> Reply<'_> {
        let mut reply = Reply {
            status: String::new(),
            function: None,
            content_type: None,
            body: Bytes::new(),
        };
        if self.interrupted {
            reply.status = "503".into();
            reply.body = Bytes::from_static(b"the connector is shutting down");
            return reply;
        }
        let chosen = self
            .deliveries
            .iter()
            .find(|d| d.outcome == DeliveryOutcome::Delivered && d.response.is_some())
            .or_else(|| self.deliveries.iter().find(|d| d.response.is_some()))
            .or_else(|| self.deliveries.first());
        let Some(delivery) = chosen else {
            reply.status = "404".into();
            reply.body = Bytes::from(format!("no function subscribes to {topic}"));
            return reply;
        };
        reply.function = Some(&delivery.function);
        match &delivery.response {
            Some(response) => {
                reply.status = response.status.as_str().to_owned();
                reply.content_type = response
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                reply.body = response.body.clone();
            }
            None => {
                let released = delivery.outcome == DeliveryOutcome::Released;
                reply.status = if released { "503" } else { "502" }.into();
                reply.body = Bytes::from(delivery.error.clone().unwrap_or_default());
            }
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: DeliveryOutcome) -> DeliveryReport {
        DeliveryReport {
            function: FunctionRef::new("f", None),
            outcome,
            attempts: 1,
            response: None,
            error: None,
        }
    }

    #[test]
    fn disposition_follows_the_worst_delivery() {
        use DeliveryOutcome::*;
        let outcome = |list: &[DeliveryOutcome]| MessageOutcome {
            held_unmatched: false,
            id: "m".into(),
            deliveries: list.iter().copied().map(report).collect(),
            interrupted: false,
        };
        assert_eq!(outcome(&[]).disposition(), Disposition::Ack);
        assert_eq!(
            outcome(&[Delivered, DeadLettered, Dropped]).disposition(),
            Disposition::Ack
        );
        assert_eq!(outcome(&[Delivered, Held]).disposition(), Disposition::Hold);
        assert_eq!(
            outcome(&[Held, Released, Delivered]).disposition(),
            Disposition::Release
        );
        let retry = |secs| Retry {
            after: Duration::from_secs(secs),
        };
        assert_eq!(
            outcome(&[Delivered, retry(2), Held, retry(5), DeadLettered]).disposition(),
            Disposition::Retry {
                after: Duration::from_secs(5)
            }
        );
        assert_eq!(
            outcome(&[retry(2), Released]).disposition(),
            Disposition::Release
        );
        assert!(!retry(1).allows_ack());
        assert_eq!(retry(1).as_str(), "retry");
    }

    #[test]
    fn a_reply_prefers_a_delivered_response() {
        let outcome = |deliveries, interrupted| MessageOutcome {
            id: "m".into(),
            deliveries,
            interrupted,
            held_unmatched: false,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        let answered = |outcome, status: u16| DeliveryReport {
            response: Some(Arc::new(InvocationResponse {
                status: http::StatusCode::from_u16(status).unwrap_or_default(),
                headers: headers.clone(),
                body: Bytes::from_static(b"hi"),
            })),
            ..report(outcome)
        };
        let failed = outcome(vec![answered(DeliveryOutcome::DeadLettered, 422)], false);
        let both = outcome(
            vec![
                answered(DeliveryOutcome::DeadLettered, 422),
                answered(DeliveryOutcome::Delivered, 200),
            ],
            false,
        );
        let reply = both.reply("t");
        assert_eq!(
            (reply.status.as_str(), reply.content_type),
            ("200", Some("text/plain"))
        );
        assert_eq!(failed.reply("t").status, "422");
        let released = outcome(vec![report(DeliveryOutcome::Released)], false);
        assert_eq!(released.reply("t").status, "503");
        let error = DeliveryReport {
            error: Some("timed out".into()),
            ..report(DeliveryOutcome::DeadLettered)
        };
        let errored = outcome(vec![error], false);
        let reply = errored.reply("t");
        assert_eq!(
            (reply.status.as_str(), &reply.body[..]),
            ("502", &b"timed out"[..])
        );
        assert_eq!(reply.function.map(FunctionRef::as_str), Some("f"));
        assert_eq!(outcome(Vec::new(), true).reply("t").status, "503");
        let unmatched = outcome(Vec::new(), false);
        let nobody = unmatched.reply("a.b");
        assert_eq!(
            (nobody.status.as_str(), &nobody.body[..]),
            ("404", &b"no function subscribes to a.b"[..])
        );
    }

    #[test]
    fn invalid_headers_are_skipped() {
        let mut m = Message::new("t", "x", "id", "test");
        assert!(m.add_header("X-Ok", "fine"));
        assert!(!m.add_header("bad header", "x"));
        assert!(!m.add_header("X-Bad", "line\nbreak"));
        assert_eq!(m.headers.len(), 1);
    }
}
