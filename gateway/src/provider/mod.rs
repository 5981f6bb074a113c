//! The seam between the API and whatever runs functions: the [`Provider`] trait, with a
//! local provider (processes on this machine) and an external one (a faas-provider such as
//! faas-netes or faasd over HTTP).

pub mod external;
pub mod local;

use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::body::HttpBody as _;
use futures::stream::BoxStream;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, Uri, header};

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
    /// Messages waiting for `function`, summed over the connectors that report it
    /// (`POST /system/backlog`). The local provider scales on it; a provider that
    /// scales by other means (KEDA on the connectors' own scaler) ignores it.
    async fn set_backlog(&self, _function: &FunctionRef, _messages: u64) -> Result<(), Error> {
        Ok(())
    }
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

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1). Names, not
/// strings: a `&str` name is parsed again on every lookup, twice per request here.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named by `Connection`. On the hot path:
/// nothing is allocated unless a `Connection` header names extra headers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there are none: one pass over a handful of names (compared as known
    // headers, not hashed) instead of nine removals that each hash and probe.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect();
    for name in &HOP_BY_HOP {
        headers.remove(name);
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

/// The client that forwards invocations: hyper's pooled client, without reqwest's
/// per-request layers (redirect policy, proxy matching) that re-parse every URL.
pub type UpstreamClient = faas_common::http_client::PooledClient<Body>;

/// The invocation client: `TCP_NODELAY`, up to 256 idle connections per upstream, kept
/// for 30 s; a connect attempt waits at most `connect_timeout`.
pub fn upstream_client(connect_timeout: Duration) -> Result<UpstreamClient, Error> {
    faas_common::http_client::pooled(faas_common::http_client::PoolSettings {
        idle_timeout: Duration::from_secs(30),
        max_idle_per_host: 256,
        connect_timeout: connect_timeout.min(Duration::from_secs(10)),
    })
    .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))
}

/// Where forwarded requests go: a function's base URL (or a replica's port, or an external
/// provider), parsed once when the function is deployed or the provider configured, so a
/// request only joins its path to it.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without its trailing `/` (empty for none).
    prefix: String,
    /// Where a bare invocation goes: the base URL's path as written, or `/`.
    bare: PathAndQuery,
    /// `Host` for requests to it: host and non-default port, as hyper's client would
    /// write it, built once instead of formatted per request.
    host: HeaderValue,
}

impl Upstream {
    /// An `http` or `https` base URL.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let invalid =
            |why: &str| Error::BadRequest(format!("{url:?} is not an http(s) URL: {why}"));
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        let parts = uri.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(invalid("no scheme or host"));
        };
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid("the scheme is neither http nor https"));
        }
        let path = parts
            .path_and_query
            .as_ref()
            .map_or("/", PathAndQuery::path);
        let prefix = path.trim_end_matches('/').to_owned();
        let bare = if prefix.is_empty() {
            PathAndQuery::from_static("/")
        } else {
            PathAndQuery::try_from(path).map_err(|e| invalid(&e.to_string()))?
        };
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => {
                HeaderValue::try_from(format!("{}:{port}", authority.host()))
            }
            _ => HeaderValue::try_from(authority.host()),
        }
        .map_err(|e| invalid(&e.to_string()))?;
        Ok(Self {
            scheme,
            authority,
            prefix,
            bare,
            host,
        })
    }

    /// `http://127.0.0.1:{port}`: a replica of an `http` function.
    pub fn loopback(port: u16) -> Result<Self, Error> {
        Self::parse(&format!("http://127.0.0.1:{port}"))
    }

    /// The URI of `path` (the sub-path after the function's name, `/` for none) and
    /// `query`. `function` puts `/function/{function}` between the base and the path, as an
    /// external provider serves them; a bare invocation of a base URL with a path
    /// (`http://svc/fn`) goes to that URL as written, not to `http://svc/fn/`.
    fn uri(&self, function: Option<&str>, path: &str, query: Option<&str>) -> Result<Uri, Error> {
        let query = query.filter(|q| !q.is_empty());
        let path_and_query = if function.is_none() && path == "/" && query.is_none() {
            self.bare.clone()
        } else {
            let mut joined = String::with_capacity(
                self.prefix.len() + path.len() + query.map_or(0, |q| q.len() + 1) + 64,
            );
            match function {
                Some(name) => {
                    joined.push_str(&self.prefix);
                    joined.push_str("/function/");
                    joined.push_str(name);
                    if path != "/" {
                        joined.push_str(path);
                    }
                }
                None if path == "/" => joined.push_str(self.bare.path()),
                None => {
                    joined.push_str(&self.prefix);
                    joined.push_str(path);
                }
            }
            if let Some(q) = query {
                joined.push('?');
                joined.push_str(q);
            }
            PathAndQuery::try_from(joined)
                .map_err(|e| Error::BadRequest(format!("invalid path or query: {e}")))?
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|e| Error::BadRequest(format!("invalid URL: {e}")))
    }
}

/// Sends `invocation` to `upstream` (under `/function/{function}` when given) and streams
/// the answer back; `hold` is dropped once the answer's body has been streamed out or
/// dropped. Redirects are passed back, not followed. `deadline` bounds the whole exchange,
/// the answer's body included.
pub async fn forward<H>(
    client: &UpstreamClient,
    upstream: &Upstream,
    function: Option<&str>,
    invocation: Invocation,
    deadline: Deadline,
    hold: H,
) -> Result<Response<Body>, Error>
where
    H: Send + Unpin + 'static,
{
    let Invocation {
        method,
        path,
        query,
        mut headers,
        body,
    } = invocation;
    let uri = upstream.uri(function, &path, query.as_deref())?;
    // The upstream's own `Host`, as hyper's client would write it from the URI.
    headers.insert(header::HOST, upstream.host.clone());
    let request_type = headers.get(header::CONTENT_TYPE).cloned();
    // A request known to be empty is sent as empty, not as a chunked stream (which some
    // servers refuse on a GET, and which costs a round of framing); hyper sends no length
    // for it, so one is said for methods that carry a body. Any other body is streamed,
    // framed by the client's `Content-Length` when it sent one.
    let body = if body.is_end_stream() || body.size_hint().exact() == Some(0) {
        if matches!(method, Method::POST | Method::PUT | Method::PATCH)
            && !headers.contains_key(header::CONTENT_LENGTH)
        {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        Body::empty()
    } else {
        body
    };
    let mut request = http::Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers;
    let mut timer = Box::pin(tokio::time::sleep(deadline.timeout));
    let response = tokio::select! {
        biased;
        response = client.request(request) => response
            .map_err(|e| Error::BadGateway(format!("{uri}: {}", error_chain(&e))))?,
        () = &mut timer => return Err(deadline.exceeded(&uri)),
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::CONTENT_TYPE) {
        parts.headers.insert(
            header::CONTENT_TYPE,
            request_type.unwrap_or(HeaderValue::from_static("text/plain")),
        );
    }
    let body = ForwardedBody {
        inner: body,
        timer,
        timed_out: false,
        _hold: hold,
    };
    // A small answer of declared length is read whole first, so the client gets head and
    // body in one write (see `proxy::SMALL_BODY_BYTES`); others are streamed.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > 0 && n <= crate::proxy::SMALL_BODY_BYTES) {
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .map_err(|e| match e.downcast_ref::<std::io::Error>() {
                Some(io) if io.kind() == std::io::ErrorKind::TimedOut => deadline.exceeded(&uri),
                _ => Error::BadGateway(format!("{uri}: reading the answer: {e}")),
            })?
            .to_bytes();
        return Ok(Response::from_parts(parts, Body::from(bytes)));
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

impl Deadline {
    /// The error of an exchange with `uri` that took longer than this deadline.
    fn exceeded(&self, uri: &Uri) -> Error {
        let took = humantime::format_duration(self.timeout);
        if self.is_exec_timeout {
            Error::GatewayTimeout(format!(
                "function did not answer within its exec_timeout of {took}"
            ))
        } else {
            Error::BadGateway(format!("{uri}: no answer within {took}"))
        }
    }
}

/// A function's answer on its way to the client: ends with an error once the deadline of
/// the exchange passes, and holds `H` (an `http` replica's in-flight count) until done.
struct ForwardedBody<H> {
    inner: hyper::body::Incoming,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    timed_out: bool,
    _hold: H,
}

impl<H: Unpin> http_body::Body for ForwardedBody<H> {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    this.timed_out = true;
                    return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the function's answer took longer than its deadline",
                    )))));
                }
                Poll::Pending
            }
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An error with its causes, which hyper-util's client keeps out of its own message.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The client for `/system/*` calls to an external provider and for async callbacks: no
/// redirects followed, pooled.
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
    fn upstream_uris_join_base_path_sub_path_and_query() {
        let plain = Upstream::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            plain.uri(None, "/", None).unwrap(),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(
            plain.uri(None, "/a/b%20c", Some("x=1")).unwrap(),
            "http://127.0.0.1:8080/a/b%20c?x=1"
        );
        // A bare invocation of a base with a path goes to the base as written.
        let with_path = Upstream::parse("https://svc.example/fn").unwrap();
        assert_eq!(
            with_path.uri(None, "/", None).unwrap(),
            "https://svc.example/fn"
        );
        assert_eq!(
            with_path.uri(None, "/", Some("q")).unwrap(),
            "https://svc.example/fn?q"
        );
        assert_eq!(
            with_path.uri(None, "/x", None).unwrap(),
            "https://svc.example/fn/x"
        );
        let slash = Upstream::parse("http://svc/fn/").unwrap();
        assert_eq!(slash.uri(None, "/", None).unwrap(), "http://svc/fn/");
        assert_eq!(slash.uri(None, "/x", Some("")).unwrap(), "http://svc/fn/x");
        // An external provider serves functions under /function/NAME.
        let provider = Upstream::parse("http://provider:8081/").unwrap();
        assert_eq!(
            provider.uri(Some("echo.fn"), "/", None).unwrap(),
            "http://provider:8081/function/echo.fn"
        );
        assert_eq!(
            provider.uri(Some("echo.fn"), "/sub", Some("a=b")).unwrap(),
            "http://provider:8081/function/echo.fn/sub?a=b"
        );
        assert_eq!(plain.host, "127.0.0.1:8080");
        assert_eq!(with_path.host, "svc.example");
        assert_eq!(
            Upstream::parse("http://user:pw@svc:80/").unwrap().host,
            "svc"
        );
        assert_eq!(
            Upstream::parse("https://svc:8443").unwrap().host,
            "svc:8443"
        );
        assert!(Upstream::parse("ftp://host/").is_err());
        assert!(Upstream::parse("/relative").is_err());
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
