//! The gateway's OpenTelemetry spans, when traces are on ([`faas_common::otel`]; off, none
//! is made and requests pass `traceparent` through untouched):
//!
//! - `proxy {function}` (server): one invocation through the gateway, continuing the
//!   caller's `traceparent` (a connector's delivery attempt);
//! - `call {function}` (client), its child: the provider's call to the function, which
//!   receives this span as its parent in `traceparent`;
//! - `enqueue {function}` (producer): `/async-function/` accepting a request. Its context
//!   replaces the request's `traceparent` in the stored headers, so the durable queue
//!   keeps the trace with the request across restarts;
//! - `queue wait {function}`: from acceptance until the first attempt starts;
//! - `callback {function}` (client): posting the result to `X-Callback-Url`, which
//!   receives its `traceparent`.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, StatusCode};
use faas_common::otel;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};

/// A span in progress; ends when finished or dropped.
pub struct Traced {
    cx: Context,
}

impl Traced {
    /// The trace it belongs to.
    pub fn trace_id(&self) -> Option<opentelemetry::trace::TraceId> {
        otel::trace_id(&self.cx)
    }

    /// Ends it with the HTTP status it came to (an error status from 500 up, or when
    /// `failed`).
    pub fn finish(self, status: Option<StatusCode>, failed: bool) {
        let span = self.cx.span();
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
        }
        if failed || status.is_some_and(|s| s.is_server_error()) {
            span.set_status(Status::error(
                status.map_or_else(|| "failed".to_owned(), |s| s.to_string()),
            ));
        }
        span.end();
    }
}

fn start(
    name: String,
    kind: SpanKind,
    function: &str,
    parent: &Context,
    start: Option<SystemTime>,
) -> Option<Traced> {
    let tracer = otel::tracer()?;
    let mut builder = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes([KeyValue::new("faas.invoked_name", function.to_owned())]);
    if let Some(at) = start {
        builder = builder.with_start_time(at);
    }
    let span = builder.start_with_context(tracer, parent);
    Some(Traced {
        cx: parent.with_span(span),
    })
}

/// The proxy span and its `call` child for one invocation of `function`, continuing
/// `headers`' `traceparent`; the call's context replaces it in `headers`.
pub fn proxy(function: &str, headers: &mut HeaderMap) -> Option<(Traced, Traced)> {
    otel::tracer()?;
    let parent = otel::extract(headers).unwrap_or_default();
    let proxy = start(
        format!("proxy {function}"),
        SpanKind::Server,
        function,
        &parent,
        None,
    )?;
    let call = start(
        format!("call {function}"),
        SpanKind::Client,
        function,
        &proxy.cx,
        None,
    )?;
    otel::inject(&call.cx, headers);
    Some((proxy, call))
}

/// The `enqueue` span of an async request: its context replaces `headers`' own, so the
/// stored request carries it. Ended at once: it marks the acceptance.
pub fn enqueued(function: &str, headers: &mut HeaderMap) {
    let parent = otel::extract(headers).unwrap_or_default();
    if let Some(span) = start(
        format!("enqueue {function}"),
        SpanKind::Producer,
        function,
        &parent,
        None,
    ) {
        otel::inject(&span.cx, headers);
        span.finish(Some(StatusCode::ACCEPTED), false);
    }
}

/// The `queue wait` span of a stored request, from `accepted` until now, under the
/// context its stored headers carry.
pub fn waited(function: &str, headers: &HeaderMap, accepted: SystemTime) {
    if otel::tracer().is_none() {
        return;
    }
    let parent = otel::extract(headers).unwrap_or_default();
    if let Some(span) = start(
        format!("queue wait {function}"),
        SpanKind::Internal,
        function,
        &parent,
        Some(accepted),
    ) {
        let waited = SystemTime::now()
            .duration_since(accepted)
            .unwrap_or(Duration::ZERO);
        span.cx.span().set_attribute(KeyValue::new(
            "queue.wait_ms",
            waited.as_secs_f64() * 1000.0,
        ));
        span.finish(None, false);
    }
}

/// The `callback` span, under the context of the stored request's headers `stored`; its
/// context goes into `out`, the callback's headers.
pub fn callback(function: &str, stored: &HeaderMap, out: &mut HeaderMap) -> Option<Traced> {
    otel::tracer()?;
    let parent = otel::extract(stored).unwrap_or_default();
    let span = start(
        format!("callback {function}"),
        SpanKind::Client,
        function,
        &parent,
        None,
    )?;
    otel::inject(&span.cx, out);
    Some(span)
}
