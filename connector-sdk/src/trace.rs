//! W3C trace context through a delivery, and its OpenTelemetry spans.
//!
//! In: a connector sets [`Message::trace_context`] from wherever its source carries the
//! context (Kafka and NATS headers, SQS message attributes, a Redis entry field, ...; see
//! [`Message::set_trace_context`]). A message without one falls back to its own
//! `traceparent`/`tracestate` headers (sources that forward their headers as they are),
//! else to the CloudEvents binary-mode `ce-traceparent`. The value is parsed by the W3C
//! propagator; an invalid one is ignored, and the message starts a new trace.
//!
//! Out: the invocation carries `traceparent`/`tracestate` of the delivery attempt's span
//! (the message's own are withheld from the forwarded headers, see
//! [`crate::source_headers`], so they never contradict it). With traces off, the
//! incoming context is passed on unchanged (validated), so a downstream service that
//! traces still joins the publisher's trace.
//!
//! Spans, when traces are on ([`faas_common::otel`]; none are made otherwise, and the
//! only cost per message is one check of a `OnceLock`):
//! - `process {topic}` (consumer): from submission to acknowledgement, child of the
//!   incoming context; attribute `messaging.wait_before_dispatch_ms` (how long it waited
//!   for a worker) and event `dispatched`.
//! - `invoke {function}` (client), one per attempt: `faas.invoked_name`,
//!   `delivery.attempt`, `http.response.status_code`, `delivery.verdict`,
//!   `delivery.retry_delay_ms` when it is retried. The function receives this span as
//!   its parent.
//! - `dead-letter {function}`: the dead-letter write, with `dead_letter.reason` and
//!   `dead_letter.written`.
//! - `ack`: settling the message, with `messaging.disposition`.
//!
//! Logs: deliveries log inside a `trace{trace_id=...}` span whenever the message has a
//! trace, so every line about it names the trace (text and JSON).

use std::borrow::Cow;
use std::time::Instant;

use faas_common::otel;
use http::HeaderValue;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};

use crate::function::FunctionRef;
use crate::message::Message;

/// The W3C trace context an event arrived with, as its source carried it (unparsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`.
    pub traceparent: HeaderValue,
    /// `tracestate`, if any.
    pub tracestate: Option<HeaderValue>,
}

impl TraceContext {
    /// The context a reply to `message` carries, so the requester sees the reply in its
    /// own trace: the one the request arrived with (see
    /// [`Message::incoming_trace_context`]).
    pub fn for_reply(message: &Message) -> Option<Self> {
        message.incoming_trace_context().map(Cow::into_owned)
    }

    /// `traceparent` and, when set, `tracestate`, as header name and value.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &HeaderValue)> {
        std::iter::once(("traceparent", &self.traceparent))
            .chain(self.tracestate.iter().map(|s| ("tracestate", s)))
    }
}

static CE_TRACEPARENT: http::HeaderName = http::HeaderName::from_static("ce-traceparent");
static CE_TRACESTATE: http::HeaderName = http::HeaderName::from_static("ce-tracestate");

impl Message {
    /// Sets the trace context the event carries in its source; values that are not
    /// valid header text are ignored (the message then starts a new trace).
    pub fn set_trace_context(&mut self, traceparent: &[u8], tracestate: Option<&[u8]>) {
        let Ok(traceparent) = HeaderValue::from_bytes(traceparent) else {
            return;
        };
        self.trace_context = Some(TraceContext {
            traceparent,
            tracestate: tracestate.and_then(|s| HeaderValue::from_bytes(s).ok()),
        });
    }

    /// The trace context the event arrived with: [`trace_context`](Self::trace_context),
    /// else its own `traceparent`/`tracestate` headers, else CloudEvents binary-mode
    /// `ce-traceparent`/`ce-tracestate`, else, for a CloudEvents structured-mode event
    /// (content type `application/cloudevents+json`), the `traceparent`/`tracestate`
    /// attributes of its JSON envelope (the distributed tracing extension). Unparsed.
    pub fn incoming_trace_context(&self) -> Option<Cow<'_, TraceContext>> {
        if let Some(tc) = &self.trace_context {
            return Some(Cow::Borrowed(tc));
        }
        if !self.headers.is_empty() {
            for (parent, state) in [
                (&otel::TRACEPARENT, &otel::TRACESTATE),
                (&CE_TRACEPARENT, &CE_TRACESTATE),
            ] {
                if let Some(tp) = self.headers.get(parent) {
                    return Some(Cow::Owned(TraceContext {
                        traceparent: tp.clone(),
                        tracestate: self.headers.get(state).cloned(),
                    }));
                }
            }
        }
        self.structured_cloud_event_trace().map(Cow::Owned)
    }

    /// The tracing extension of a structured-mode CloudEvent's envelope, if the message is
    /// one and carries it.
    fn structured_cloud_event_trace(&self) -> Option<TraceContext> {
        /// The envelope's attributes this reads; the rest (`data` included) is skipped.
        #[derive(serde::Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            traceparent: Option<Cow<'a, str>>,
            #[serde(borrow)]
            tracestate: Option<Cow<'a, str>>,
        }
        let content_type = self.content_type.as_ref()?.to_str().ok()?;
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/cloudevents+json") {
            return None;
        }
        let envelope: Envelope<'_> = serde_json::from_slice(&self.payload).ok()?;
        Some(TraceContext {
            traceparent: HeaderValue::from_str(&envelope.traceparent?).ok()?,
            tracestate: envelope
                .tracestate
                .and_then(|s| HeaderValue::from_str(&s).ok()),
        })
    }
}

/// The incoming context, parsed: `None` when there is none or it is invalid.
fn remote_parent(message: &Message) -> Option<Context> {
    let tc = message.incoming_trace_context()?;
    let traceparent = tc.traceparent.to_str().ok()?;
    let tracestate = tc.tracestate.as_ref().and_then(|s| s.to_str().ok());
    otel::extract_pair(traceparent, tracestate)
}

/// The message's span while it is delivered: kept in [`Message::extensions`], so every
/// delivery of the message finds it.
#[derive(Clone)]
pub(crate) struct MessageSpan {
    pub(crate) cx: Context,
    submitted: Instant,
}

/// Starts the message's span when traces are on, and keeps it in the message. The
/// returned context settles it ([`acknowledged`]).
pub(crate) fn start_message(message: &mut Message) -> Option<Context> {
    let tracer = otel::tracer()?;
    let parent = remote_parent(message).unwrap_or_default();
    let span = tracer
        .span_builder(format!("process {}", message.topic))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.destination.name", message.topic.clone()),
            KeyValue::new("messaging.message.id", message.id.clone()),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("cloudevents.event_source", message.source.clone()),
        ])
        .start_with_context(tracer, &parent);
    let cx = parent.with_span(span);
    message.extensions.insert(MessageSpan {
        cx: cx.clone(),
        submitted: Instant::now(),
    });
    Some(cx)
}

/// The message's span, when traces are on.
pub(crate) fn message_span(message: &Message) -> Option<&MessageSpan> {
    message.extensions.get::<MessageSpan>()
}

/// A worker took the message: records how long it waited.
pub(crate) fn dispatched(message: &Message) {
    if let Some(s) = message_span(message) {
        let waited = s.submitted.elapsed().as_secs_f64() * 1000.0;
        let span = s.cx.span();
        span.set_attribute(KeyValue::new("messaging.wait_before_dispatch_ms", waited));
        span.add_event("dispatched", vec![KeyValue::new("wait_ms", waited)]);
    }
}

/// For one delivery of `message`: its `trace{trace_id}` log span (the trace of the
/// message's span, else of its incoming context; `Span::none()` when it has neither),
/// and, when traces are off, the incoming context to pass on to the function.
pub(crate) fn delivery(message: &Message) -> (tracing::Span, Option<Context>) {
    if let Some(s) = message_span(message) {
        let span = otel::trace_id(&s.cx).map_or_else(tracing::Span::none, otel::log_span);
        return (span, None);
    }
    let remote = remote_parent(message);
    let span = remote
        .as_ref()
        .and_then(otel::trace_id)
        .map_or_else(tracing::Span::none, otel::log_span);
    (span, remote)
}

/// The span of one invocation attempt.
pub(crate) struct AttemptSpan {
    cx: Context,
}

impl AttemptSpan {
    /// Starts it under the message's span; `None` when traces are off.
    pub(crate) fn start(message: &Message, function: &FunctionRef, attempt: u32) -> Option<Self> {
        let parent = &message_span(message)?.cx;
        let tracer = otel::tracer()?;
        let span = tracer
            .span_builder(format!("invoke {function}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("faas.invoked_name", function.to_string()),
                KeyValue::new("delivery.attempt", i64::from(attempt)),
            ])
            .start_with_context(tracer, parent);
        Some(Self {
            cx: parent.with_span(span),
        })
    }

    /// The context the invocation carries.
    pub(crate) fn context(&self) -> &Context {
        &self.cx
    }

    /// Ends it with what the attempt came to.
    pub(crate) fn finish(
        self,
        status: Option<u16>,
        error: Option<&str>,
        verdict: &'static str,
        retry_delay: Option<std::time::Duration>,
    ) {
        let span = self.cx.span();
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        span.set_attribute(KeyValue::new("delivery.verdict", verdict));
        if let Some(delay) = retry_delay {
            span.set_attribute(KeyValue::new(
                "delivery.retry_delay_ms",
                delay.as_secs_f64() * 1000.0,
            ));
        }
        if verdict != "delivered" {
            let description = match (error, status) {
                (Some(e), _) => e.to_owned(),
                (None, Some(s)) => format!("status {s}"),
                (None, None) => verdict.to_owned(),
            };
            span.set_status(Status::error(description));
        }
        span.end();
    }
}

/// Runs the dead-letter write `write` under a `dead-letter {function}` span when the
/// message is traced.
pub(crate) async fn dead_letter_span<F, T>(
    message: &Message,
    function: &FunctionRef,
    reason: &'static str,
    write: F,
) -> T
where
    F: Future<Output = (T, bool)>,
{
    let Some((parent, tracer)) = message_span(message).zip(otel::tracer()) else {
        return write.await.0;
    };
    let mut span = tracer
        .span_builder(format!("dead-letter {function}"))
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("faas.invoked_name", function.to_string()),
            KeyValue::new("dead_letter.reason", reason),
        ])
        .start_with_context(tracer, &parent.cx);
    let (out, written) = write.await;
    span.set_attribute(KeyValue::new("dead_letter.written", written));
    if !written {
        span.set_status(Status::error("no dead letter written"));
    }
    span.end();
    out
}

/// Runs `settle` (the source's acknowledgement) under an `ack` span, then ends the
/// message's span `cx`.
pub(crate) async fn acknowledged<F: Future<Output = ()>>(
    cx: Option<Context>,
    disposition: &'static str,
    settle: F,
) {
    let Some((cx, tracer)) = cx.zip(otel::tracer()) else {
        return settle.await;
    };
    let mut span = tracer
        .span_builder("ack")
        .with_attributes([KeyValue::new("messaging.disposition", disposition)])
        .start_with_context(tracer, &cx);
    settle.await;
    span.end();
    let message = cx.span();
    message.set_attribute(KeyValue::new("messaging.disposition", disposition));
    message.end();
}

/// The traceparent a dead letter records: the message span's when traced, else the
/// incoming one.
pub(crate) fn dead_letter_traceparent(message: &Message) -> Option<String> {
    let cx = match message_span(message) {
        Some(s) => s.cx.clone(),
        None => remote_parent(message)?,
    };
    let mut headers = http::HeaderMap::new();
    otel::inject(&cx, &mut headers);
    headers
        .get(&otel::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
