//! OpenTelemetry traces, shared by the connectors and the gateway: the OTLP/HTTP
//! (protobuf) exporter set up from the standard `OTEL_*` environment variables, and W3C
//! trace context (`traceparent`, `tracestate`) in and out of HTTP headers.
//!
//! Off unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (and `OTEL_SDK_DISABLED` is not `true`, `OTEL_TRACES_EXPORTER` not `none`). Off, no
//! tracer exists: [`tracer`] is `None` and callers skip every span, so the hot path pays
//! one load of a `OnceLock`. The exporter itself reads the endpoint, headers, timeout
//! and protocol variables; the SDK reads `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`) and `OTEL_SERVICE_NAME`
//! and `OTEL_RESOURCE_ATTRIBUTES` (the service name defaults to the binary's name).
//!
//! Spans are exported in batches from a thread of the SDK's own (a blocking reqwest
//! client), never on the caller's task; [`shutdown`] flushes them before the process
//! exits.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, trace::TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};

pub use opentelemetry;

/// The exporter's setup failed.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// The OTLP exporter could not be built from the `OTEL_EXPORTER_OTLP_*` variables.
    #[error(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP/HTTP exporter: {0}"
    )]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// An endpoint variable is not an absolute `http://` or `https://` URL.
    #[error("{variable}: `{value}` is not an http:// or https:// URL")]
    Endpoint {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
    },
}

/// Checks that each endpoint variable that is set holds an absolute HTTP(S) URL: the
/// exporter would otherwise take a typo and fail on every export, silently.
fn check_endpoints() -> Result<(), OtelError> {
    for variable in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        let Ok(value) = std::env::var(variable) else {
            continue;
        };
        if value.trim().is_empty() {
            continue;
        }
        let valid = value.parse::<http::Uri>().is_ok_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
        });
        if !valid {
            return Err(OtelError::Endpoint { variable, value });
        }
    }
    Ok(())
}

struct Installed {
    provider: SdkTracerProvider,
    tracer: Tracer,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

fn set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the environment asks for traces: an OTLP endpoint is set and the SDK is not
/// disabled.
pub fn configured() -> bool {
    let endpoint = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT");
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    endpoint && !disabled
}

/// Installs the OTLP exporter when the environment configures one (see the module docs);
/// `service_name` unless `OTEL_SERVICE_NAME` says otherwise. Returns whether traces are
/// on. Installing twice keeps the first.
pub fn init(service_name: &str) -> Result<bool, OtelError> {
    if INSTALLED.get().is_some() {
        return Ok(true);
    }
    if !configured() {
        return Ok(false);
    }
    check_endpoints()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("faas-connectors");
    let _ = INSTALLED.set(Installed { provider, tracer });
    Ok(true)
}

/// The tracer, when traces are on.
#[inline]
pub fn tracer() -> Option<&'static Tracer> {
    INSTALLED.get().map(|i| &i.tracer)
}

/// Exports what is left and stops the exporter. Blocks for at most the exporter's
/// timeout; call once, before exiting.
pub fn shutdown() {
    if let Some(installed) = INSTALLED.get()
        && let Err(e) = installed.provider.shutdown()
    {
        tracing::warn!(error = %e, "flushing the last spans failed");
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// A pair of W3C trace context values as a source carries them.
struct Pair<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for Pair<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The remote parent in `headers`' `traceparent`/`tracestate`, parsed by the W3C
/// propagator; `None` when absent or invalid.
pub fn extract(headers: &HeaderMap) -> Option<Context> {
    headers.get(&TRACEPARENT)?;
    remote(TraceContextPropagator::new().extract(&HeaderExtractor(headers)))
}

/// The remote parent a `traceparent` (and `tracestate`) value names; `None` when invalid.
pub fn extract_pair(traceparent: &str, tracestate: Option<&str>) -> Option<Context> {
    let pair = Pair {
        traceparent,
        tracestate,
    };
    remote(TraceContextPropagator::new().extract(&pair))
}

fn remote(cx: Context) -> Option<Context> {
    let valid = cx.span().span_context().is_valid();
    valid.then_some(cx)
}

/// Writes `cx`'s span as `traceparent` (and `tracestate`, when not empty) into `headers`,
/// replacing what was there.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    headers.remove(&TRACEPARENT);
    headers.remove(&TRACESTATE);
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The trace id of `cx`'s span, when it has a valid one.
pub fn trace_id(cx: &Context) -> Option<TraceId> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id())
}

/// The trace id of the `traceparent` in `headers`, when it holds a valid one.
pub fn trace_id_in(headers: &HeaderMap) -> Option<TraceId> {
    extract(headers).as_ref().and_then(trace_id)
}

/// A `tracing` span at info level carrying `trace_id`, so that every log line inside it
/// names the trace (text: `trace{trace_id=...}:`; JSON: the `span` and `spans` fields).
pub fn log_span(trace_id: TraceId) -> tracing::Span {
    tracing::info_span!("trace", trace_id = %trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn extracts_and_injects_w3c_context() {
        let cx = extract_pair(PARENT, Some("vendor=x")).expect("a valid traceparent");
        assert_eq!(
            trace_id(&cx).map(|t| t.to_string()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        inject(&cx, &mut headers);
        assert_eq!(
            headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()),
            Some(PARENT)
        );
        assert_eq!(
            headers.get(&TRACESTATE).and_then(|v| v.to_str().ok()),
            Some("vendor=x")
        );
        let back = extract(&headers).expect("round trip");
        assert_eq!(trace_id(&back), trace_id(&cx));
    }

    #[test]
    fn invalid_context_is_none() {
        assert!(extract_pair("garbage", None).is_none());
        assert!(
            extract_pair(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None
            )
            .is_none()
        );
        assert!(extract(&HeaderMap::new()).is_none());
    }

    #[test]
    fn off_without_an_endpoint() {
        // The test environment sets no OTLP endpoint.
        if !configured() {
            assert!(!init("test").unwrap_or(true));
            assert!(tracer().is_none());
        }
    }
}
