//! The seam between the API and whatever runs functions: the [`Provider`] trait, with a
//! local provider (processes on this machine) and an external one (a faas-provider such as
//! faas-netes or faasd over HTTP).

pub mod external;
pub mod local;

use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use futures::stream::BoxStream;
use http::{HeaderMap, HeaderValue, Method, Response, header};

use crate::error::Error;
use crate::names::FunctionRef;
use crate::types::{FunctionDeployment, FunctionStatus, LogMessage, ProviderInfo, Secret};

/// One request on its way to a function: the gateway has already added the call id and
/// forwarding headers and removed hop-by-hop ones.
#[derive(Debug)]
pub struct Invocation {
    /// The method, passed through.
    pub method: Method,
    /// The sub-path after `/function/NAME`: `/` or `/rest/of/path`.
    pub path: String,
    /// The raw query string, without `?`.
    pub query: Option<String>,
    /// The headers to send.
    pub headers: HeaderMap,
    /// The body, streamed.
    pub body: Body,
}

/// What `/system/logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogRequest {
    /// The function.
    pub function: Option<FunctionRef>,
    /// Only lines of this instance.
    pub instance: Option<String>,
    /// Only the last `tail` lines of the history (`None`: all).
    pub tail: Option<usize>,
    /// Only lines at or after this time.
    pub since: Option<std::time::SystemTime>,
    /// Keep the stream open and send new lines as they come.
    pub follow: bool,
    /// The raw query, for providers that forward it.
    pub raw_query: Option<String>,
    /// The caller's `Authorization`, forwarded as OpenFaaS does.
    pub authorization: Option<HeaderValue>,
}

/// A stream of log lines.
pub type LogStream = BoxStream<'static, LogMessage>;

/// Lists, deploys, scales and invokes functions. Every method takes names already
/// validated and resolved to a namespace.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `GET /system/functions`.
    async fn list(&self, namespace: &str) -> Result<Vec<FunctionStatus>, Error>;
    /// `GET /system/function/{name}`.
    async fn status(&self, function: &FunctionRef) -> Result<FunctionStatus, Error>;
    /// `POST /system/functions`; an existing function is refused with 400.
    async fn deploy(&self, deployment: FunctionDeployment, namespace: &str) -> Result<(), Error>;
    /// `PUT /system/functions`; an unknown function is 404.
    async fn update(&self, deployment: FunctionDeployment, namespace: &str) -> Result<(), Error>;
    /// `DELETE /system/functions`.
    async fn delete(&self, function: &FunctionRef) -> Result<(), Error>;
    /// `POST /system/scale-function/{name}`; 0 is allowed.
    async fn scale(&self, function: &FunctionRef, replicas: u64) -> Result<(), Error>;
    /// `GET /system/namespaces`.
    async fn namespaces(&self) -> Result<Vec<String>, Error>;
    /// The provider part of `/system/info`.
    async fn info(&self) -> Result<ProviderInfo, Error>;
    /// `GET /system/secrets`: names only.
    async fn list_secrets(&self, namespace: &str) -> Result<Vec<Secret>, Error>;
    /// `POST /system/secrets`; an existing secret is 409.
    async fn create_secret(&self, secret: Secret, namespace: &str) -> Result<(), Error>;
    /// `PUT /system/secrets`; an unknown secret is 404.
    async fn update_secret(&self, secret: Secret, namespace: &str) -> Result<(), Error>;
    /// `DELETE /system/secrets`; an unknown secret is 404.
    async fn delete_secret(&self, name: &str, namespace: &str) -> Result<(), Error>;
    /// `GET /system/logs`.
    async fn logs(&self, request: LogRequest) -> Result<LogStream, Error>;
    /// Runs one invocation and answers with the function's response, body streamed.
    async fn invoke(
        &self,
        function: &FunctionRef,
        invocation: Invocation,
    ) -> Result<Response<Body>, Error>;
    /// `GET /healthz`.
    async fn health(&self) -> Result<(), Error>;
    /// Stops everything the provider started (function processes).
    async fn shutdown(&self);
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those named by `Connection`. On the hot path:
/// nothing is allocated unless a `Connection` header names extra headers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| http::HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    for name in named {
        headers.remove(name);
    }
}

/// Which limit a forwarded request runs under, and what passing it means.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// How long the whole exchange may take.
    pub timeout: Duration,
    /// Passing it is the function's own `exec_timeout` (504) rather than the gateway's
    /// `upstream_timeout` (502).
    pub is_exec_timeout: bool,
}

impl Deadline {
    /// The shorter of the function's `exec_timeout` and the gateway's `upstream_timeout`.
    pub fn new(upstream_timeout: Duration, exec_timeout: Option<Duration>) -> Self {
        match exec_timeout {
            Some(exec) if !exec.is_zero() && exec < upstream_timeout => Self {
                timeout: exec,
                is_exec_timeout: true,
            },
            _ => Self {
                timeout: upstream_timeout,
                is_exec_timeout: false,
            },
        }
    }
}

/// Sends `invocation` to `base` + sub-path + query and streams the answer back. Redirects
/// are passed back, not followed (the client is built that way).
pub async fn forward(
    client: &reqwest::Client,
    base: &str,
    invocation: Invocation,
    deadline: Deadline,
) -> Result<Response<Body>, Error> {
    let Invocation {
        method,
        path,
        query,
        mut headers,
        body,
    } = invocation;
    // A bare invocation of a base URL with a path (`http://svc/fn`) goes to that URL as
    // written, not to `http://svc/fn/`.
    let base_has_path = base
        .split_once("://")
        .is_some_and(|(_, rest)| rest.trim_end_matches('/').contains('/'));
    let mut url = if path == "/" && base_has_path {
        base.to_owned()
    } else {
        format!("{}{}", base.trim_end_matches('/'), path)
    };
    if let Some(q) = query.as_deref().filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(q);
    }
    headers.remove(header::HOST);
    let request_type = headers.get(header::CONTENT_TYPE).cloned();
    let request = client
        .request(method, &url)
        .headers(headers)
        .timeout(deadline.timeout)
        .body(upstream_body(body));
    let response = request.send().await.map_err(|e| {
        if e.is_timeout() && deadline.is_exec_timeout {
            Error::GatewayTimeout(format!(
                "function did not answer within its exec_timeout of {}",
                humantime::format_duration(deadline.timeout)
            ))
        } else {
            Error::BadGateway(format!("{url}: {e}"))
        }
    })?;
    let (mut parts, body) = Response::<reqwest::Body>::from(response).into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::CONTENT_TYPE) {
        parts.headers.insert(
            header::CONTENT_TYPE,
            request_type.unwrap_or(HeaderValue::from_static("text/plain")),
        );
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The body sent upstream: a request known to be empty is sent as empty (not as a chunked
/// stream, which some servers refuse on a GET and which costs a round of framing), any
/// other is streamed; a `Content-Length` the client sent is kept, so hyper frames by it.
fn upstream_body(body: Body) -> reqwest::Body {
    use axum::body::HttpBody;
    if body.is_end_stream() || body.size_hint().exact() == Some(0) {
        reqwest::Body::from(bytes::Bytes::new())
    } else {
        reqwest::Body::wrap_stream(body.into_data_stream())
    }
}

/// The HTTP client used toward functions and providers: no redirects followed, pooled.
pub fn http_client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))
}

/// Reads a Go-style duration (`10s`, `1m30s`) or a plain integer of seconds, as the
/// watchdogs read `exec_timeout`.
pub fn parse_watchdog_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-call-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-call-id"]);
    }

    #[test]
    fn deadline_picks_the_shorter() {
        let d = Deadline::new(Duration::from_secs(60), Some(Duration::from_secs(2)));
        assert!(d.is_exec_timeout);
        let d = Deadline::new(Duration::from_secs(1), Some(Duration::from_secs(2)));
        assert!(!d.is_exec_timeout);
        assert_eq!(d.timeout, Duration::from_secs(1));
    }

    #[test]
    fn watchdog_durations() {
        assert_eq!(parse_watchdog_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_watchdog_duration("1m30s"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_watchdog_duration("soon"), None);
    }
}
