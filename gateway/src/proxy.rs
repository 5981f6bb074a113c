//! `/function/{name}[/path]`: the synchronous invocation path, shared by the async worker.
//! Adds the call id, start time and forwarding headers, strips hop-by-hop headers, keeps
//! the sub-path and query, counts the OpenFaaS metrics, and streams both bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body_util::BodyExt as _;

use crate::AppState;
use crate::error::Error;
use crate::names::FunctionRef;
use crate::provider::{Invocation, strip_hop_by_hop};

/// Bodies up to this size, with a declared length, are read whole before they are
/// forwarded; larger ones and those without a length are streamed.
pub const SMALL_BODY_BYTES: usize = 64 * 1024;

/// `X-Served-By`.
pub const SERVED_BY: &str = concat!("faas-gateway/", env!("CARGO_PKG_VERSION"));

// Header names as constants: a `&str` name is parsed again on every insert.
static X_CALL_ID: HeaderName = HeaderName::from_static("x-call-id");
static X_START_TIME: HeaderName = HeaderName::from_static("x-start-time");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

/// The name and sub-path of `/function/NAME[/rest]` or `/async-function/NAME[/rest]`,
/// read from the raw path so the sub-path keeps its encoding.
pub fn split_function_path<'a>(path: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = path.strip_prefix(prefix)?;
    Some(match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    })
}

/// Call-id and timing headers of one request, as header values: built once, then put on
/// the forwarded request and on the response by reference count, not copied again.
#[derive(Debug, Clone)]
pub struct CallHeaders {
    /// The call id (the client's, or generated).
    pub call_id: HeaderValue,
    /// Whether the gateway generated it (then it is echoed in the response).
    pub generated: bool,
    /// `X-Start-Time`: Unix nanoseconds.
    pub start_time: HeaderValue,
}

impl CallHeaders {
    /// The call id as text (always visible ASCII: a client's id that is not was replaced).
    pub fn call_id(&self) -> &str {
        self.call_id.to_str().unwrap_or_default()
    }
}

/// `value` in decimal, as a header value, without an intermediate `String`.
fn decimal_header(value: u128) -> Option<HeaderValue> {
    use std::io::Write as _;
    let mut buffer = [0u8; 40];
    let mut cursor = std::io::Cursor::new(&mut buffer[..]);
    write!(cursor, "{value}").ok()?;
    let written = usize::try_from(cursor.position()).ok()?;
    HeaderValue::from_bytes(buffer.get(..written)?).ok()
}

/// The client's address (`ip:port`) as a header value, without an intermediate `String`.
fn address_header(address: SocketAddr) -> Option<HeaderValue> {
    use std::io::Write as _;
    let mut buffer = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buffer[..]);
    write!(cursor, "{address}").ok()?;
    let written = usize::try_from(cursor.position()).ok()?;
    HeaderValue::from_bytes(buffer.get(..written)?).ok()
}

/// Prepares the headers sent to the function: hop-by-hop removed, `X-Call-Id`,
/// `X-Start-Time`, and `X-Forwarded-For` / `X-Forwarded-Host` when absent.
pub fn prepare_headers(headers: &mut HeaderMap, client: Option<SocketAddr>) -> CallHeaders {
    strip_hop_by_hop(headers);
    // The client's id is kept when it is text; cloning a parsed value shares its bytes.
    let existing = headers
        .get(&X_CALL_ID)
        .filter(|v| !v.is_empty() && v.to_str().is_ok())
        .cloned();
    let generated = existing.is_none();
    let call_id = existing.unwrap_or_else(|| {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        // A UUID's text is visible ASCII, always a valid header value.
        HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static(""))
    });
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let start_time = decimal_header(nanos).unwrap_or(HeaderValue::from_static("0"));
    headers.insert(X_CALL_ID.clone(), call_id.clone());
    headers.append(X_START_TIME.clone(), start_time.clone());
    if !headers.contains_key(&X_FORWARDED_FOR)
        && let Some(addr) = client.and_then(address_header)
    {
        headers.insert(X_FORWARDED_FOR.clone(), addr);
    }
    if !headers.contains_key(&X_FORWARDED_HOST)
        && let Some(host) = headers.get(header::HOST).cloned()
    {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    CallHeaders {
        call_id,
        generated,
        start_time,
    }
}

/// Adds `X-Call-Id` (when generated), `X-Start-Time` and `X-Served-By` to a response.
pub fn decorate_response(response: &mut Response, call: &CallHeaders) {
    let headers = response.headers_mut();
    if call.generated {
        headers.insert(X_CALL_ID.clone(), call.call_id.clone());
    }
    headers.append(X_START_TIME.clone(), call.start_time.clone());
    headers.insert(X_SERVED_BY.clone(), HeaderValue::from_static(SERVED_BY));
}

/// Invokes `function` through the provider, counting the OpenFaaS metrics. Errors become
/// their OpenFaaS responses here, so the metrics see the status the client sees.
pub async fn invoke_function(
    state: &AppState,
    function: &FunctionRef,
    mut invocation: Invocation,
) -> Response {
    let label = function.qualified();
    let metrics = state.metrics.function(&label);
    metrics.started.inc();
    let began = Instant::now();
    // Traces on: the proxy span and the provider's call, whose context the function gets.
    let spans = crate::trace::proxy(&label, &mut invocation.headers);
    // What the provider logs about a traced invocation names the trace: the call's (read
    // from its span, not parsed again from the header it just wrote), or with traces off
    // the request's `traceparent` (no span at all for a request without one).
    let trace_id = match &spans {
        Some((_, call)) => call.trace_id(),
        None => faas_common::otel::trace_id_in(&invocation.headers),
    };
    let log_span = trace_id.map(faas_common::otel::log_span);
    let invoked = async {
        match state.provider.invoke(function, invocation).await {
            Ok(response) => (response.into_response(), false),
            Err(e) => {
                tracing::debug!(function = %label, error = %e, "invocation failed");
                (e.into_response(), true)
            }
        }
    };
    let (response, failed) = match log_span {
        Some(span) => tracing::Instrument::instrument(invoked, span).await,
        None => invoked.await,
    };
    if let Some((proxy, call)) = spans {
        call.finish(Some(response.status()), failed);
        proxy.finish(Some(response.status()), false);
    }
    metrics.observe(response.status().as_u16(), began.elapsed().as_secs_f64());
    response
}

/// Any method on `/function/{name}`, `/function/{name}/` and `/function/{name}/{*path}`.
pub async fn function_route(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let connect = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied();
    let (mut parts, body) = request.into_parts();
    // Taken out of the request so the path is borrowed, not copied.
    let uri = std::mem::take(&mut parts.uri);
    let Some((raw_name, sub_path)) = split_function_path(uri.path(), "/function/") else {
        return Error::BadRequest("Provide function name in the request path".into())
            .into_response();
    };
    let name = percent_decode(raw_name);
    let function = match FunctionRef::parse_invoked(&name, &state.namespace) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes) {
        return Error::PayloadTooLarge {
            limit: state.max_body_bytes,
        }
        .into_response();
    }
    let call = prepare_headers(&mut parts.headers, connect.map(|c| c.0));
    // With a declared length within the limit hyper reads exactly that many bytes, so only
    // a body without one (chunked) needs counting on its way through.
    let (body, exceeded) = match declared {
        // A small body is read whole before it is forwarded, as nginx does by default
        // (`proxy_request_buffering`): the function then gets the head and the body in one
        // write. Streamed through, the head left before the body had come through hyper's
        // body channel, which cost the function a second read and both sides a wake-up.
        Some(n) if n > 0 && n <= SMALL_BODY_BYTES => match collect_body(body, n).await {
            Ok(bytes) => (Body::from(bytes), Arc::new(AtomicBool::new(false))),
            Err(e) => return e.into_response(),
        },
        _ if declared.is_some() || axum::body::HttpBody::size_hint(&body).exact() == Some(0) => {
            (body, Arc::new(AtomicBool::new(false)))
        }
        _ => limit_body(body, state.max_body_bytes),
    };
    let invocation = Invocation {
        method: parts.method,
        path: if sub_path.is_empty() {
            "/".to_owned()
        } else {
            sub_path.to_owned()
        },
        query: uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
    };
    let mut response = invoke_function(&state, &function, invocation).await;
    if exceeded.load(Ordering::SeqCst) {
        // The body was cut at the limit, so whatever the function answered is about a
        // truncated request: the client gets 413 instead.
        response = Error::PayloadTooLarge {
            limit: state.max_body_bytes,
        }
        .into_response();
    }
    decorate_response(&mut response, &call);
    response
}

/// Streams `body` but stops with an error after `limit` bytes, raising the returned flag.
/// Bodies without `Content-Length` are checked this way, without buffering them.
pub fn limit_body(body: Body, limit: usize) -> (Body, Arc<AtomicBool>) {
    let exceeded = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&exceeded);
    let mut seen = 0usize;
    let stream = body.into_data_stream().map(move |chunk| match chunk {
        Ok(bytes) => {
            seen = seen.saturating_add(bytes.len());
            if seen > limit {
                flag.store(true, Ordering::SeqCst);
                Err(std::io::Error::other("request body too large"))
            } else {
                Ok(bytes)
            }
        }
        Err(e) => Err(std::io::Error::other(e)),
    });
    (Body::from_stream(stream), exceeded)
}

/// Decodes `%XX` escapes so `a%2Fb` is checked (and refused) as `a/b`. A name without
/// `%` (every valid one) is borrowed as it is.
pub fn percent_decode(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw.contains('%') {
        return std::borrow::Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Reads a whole body up to `limit` bytes (for callers that must buffer, like the async
/// queue).
pub async fn collect_body(body: Body, limit: usize) -> Result<bytes::Bytes, Error> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(Error::PayloadTooLarge { limit })
        }
        Err(e) => Err(Error::BadRequest(format!("cannot read the body: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_name_and_sub_path() {
        assert_eq!(
            split_function_path("/function/echo", "/function/"),
            Some(("echo", ""))
        );
        assert_eq!(
            split_function_path("/function/echo.ns/a/b%20c", "/function/"),
            Some(("echo.ns", "/a/b%20c"))
        );
        assert_eq!(
            split_function_path("/function/echo/", "/function/"),
            Some(("echo", "/"))
        );
    }

    #[test]
    fn decodes_escapes() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%2e%2e"), "..");
        assert!(matches!(
            percent_decode("echo.fn"),
            std::borrow::Cow::Borrowed("echo.fn")
        ));
    }

    #[test]
    fn call_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("gw:8080"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        let call = prepare_headers(&mut h, Some("10.0.0.1:5000".parse().unwrap()));
        assert!(call.generated);
        assert_eq!(h["x-call-id"], call.call_id());
        assert_eq!(call.call_id().len(), 36, "a UUID: {}", call.call_id());
        let nanos: u128 = h["x-start-time"].to_str().unwrap().parse().unwrap();
        assert!(
            nanos > 1_600_000_000_000_000_000,
            "Unix nanoseconds: {nanos}"
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1:5000");
        assert_eq!(h["x-forwarded-host"], "gw:8080");
        assert!(!h.contains_key("connection"));
        let mut h = HeaderMap::new();
        h.insert("x-call-id", HeaderValue::from_static("given"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        let call = prepare_headers(&mut h, Some("10.0.0.1:5000".parse().unwrap()));
        assert!(!call.generated);
        assert_eq!(call.call_id(), "given");
        assert_eq!(h.get_all("x-call-id").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4");
    }
}
