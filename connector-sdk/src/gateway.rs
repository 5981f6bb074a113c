//! The gateway client: the `/system/*` calls that build the topic map, and function
//! invocation.
//!
//! Invocations go through hyper's pooled client (keep-alive, HTTP/1.1, HTTP/2 over TLS
//! when the gateway offers it) and the rare `/system/*` calls through `reqwest`. The
//! split is for speed: `reqwest` re-parses every request's URL in its redirect and proxy
//! layers, which cost more CPU per delivery than the rest of the SDK together. Neither
//! client follows redirects for invocations or goes through an HTTP proxy.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use reqwest::Url;

use crate::config::{SdkConfig, Secret};
use crate::error::SdkError;
use crate::function::{FunctionRef, FunctionStatus};
use crate::message::{InvocationResponse, Message};
use crate::metrics::Metrics;
use crate::source_headers;

/// How much of a response body is read; the rest is discarded. Functions answering more
/// than this to a connector are almost certainly not meant to be read whole.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Gateway credentials for `/system/*`.
#[derive(Clone, Debug)]
pub struct BasicAuth {
    /// User name.
    pub user: String,
    /// Password (never logged).
    pub password: Secret,
}

impl BasicAuth {
    /// The credentials `config` asks for: none unless `basic_auth`; then
    /// `gateway_username`/`gateway_password` if set, else the files `basic-auth-user` and
    /// `basic-auth-password` in `secret_mount_path` (trimmed, as OpenFaaS reads them).
    pub fn from_config(config: &SdkConfig) -> Result<Option<Self>, SdkError> {
        if !config.basic_auth {
            return Ok(None);
        }
        if let (Some(user), Some(password)) = (&config.gateway_username, &config.gateway_password) {
            return Ok(Some(Self {
                user: user.clone(),
                password: password.clone(),
            }));
        }
        let read = |file: &str| {
            let path = config.secret_mount_path.join(file);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .map_err(|source| SdkError::Credentials { path, source })
        };
        Ok(Some(Self {
            user: read("basic-auth-user")?,
            password: Secret::new(read("basic-auth-password")?),
        }))
    }
}

/// Why an invocation got no response.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No answer within `upstream_timeout`.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, DNS, TLS, or the body could not be read.
    #[error("{0}")]
    Transport(String),
}

/// Talks to an OpenFaaS-compatible gateway.
type Invoker = faas_common::http_client::PooledClient<Full<Bytes>>;

#[derive(Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    invoker: Invoker,
    base: String,
    /// `{base}/function/` or `{base}/async-function/`, parsed once: parsing a URL per
    /// request (host included) costs more than the rest of building it.
    invoke_base: Url,
    auth: Option<BasicAuth>,
    timeout: Duration,
    asynchronous: bool,
    callback_url: Option<HeaderValue>,
    content_type: Option<HeaderValue>,
    connector: HeaderValue,
    user_agent: HeaderValue,
    default_event_type: HeaderValue,
    /// Where withheld source headers are counted (absent for a bare client).
    metrics: Option<Metrics>,
}

static X_TOPIC: HeaderName = HeaderName::from_static("x-topic");
static X_CONNECTOR: HeaderName = HeaderName::from_static("x-connector");
static X_DELIVERY_ATTEMPT: HeaderName = HeaderName::from_static("x-delivery-attempt");
static X_CALLBACK_URL: HeaderName = HeaderName::from_static("x-callback-url");
static CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
static CE_ID: HeaderName = HeaderName::from_static("ce-id");
static CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
static CE_TYPE: HeaderName = HeaderName::from_static("ce-type");
static CE_TIME: HeaderName = HeaderName::from_static("ce-time");
static CE_SUBJECT: HeaderName = HeaderName::from_static("ce-subject");

impl std::fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayClient")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .field("asynchronous", &self.asynchronous)
            .finish_non_exhaustive()
    }
}

/// The pooled client invocations go through: TCP_NODELAY, the configured pool limits,
/// TLS with the Mozilla roots (as the `/system/*` client) when the gateway is `https`.
fn invoker(config: &SdkConfig) -> Result<Invoker, SdkError> {
    faas_common::http_client::pooled(faas_common::http_client::PoolSettings {
        idle_timeout: config.pool_idle_timeout,
        max_idle_per_host: config.pool_max_idle_per_host,
        connect_timeout: config.upstream_timeout.min(Duration::from_secs(10)),
    })
    .map_err(|e| SdkError::HttpClient(e.to_string()))
}

impl GatewayClient {
    /// The `ce-type` of a message without a type of its own (`<connector>.message`).
    pub fn default_event_type(&self) -> &str {
        self.default_event_type.to_str().unwrap_or_default()
    }

    /// A client for `config.gateway_url`, identifying itself as `connector` (the binary
    /// name, sent as `X-Connector` and in `User-Agent`).
    pub fn new(connector: &str, config: &SdkConfig) -> Result<Self, SdkError> {
        let header = |key: &'static str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| SdkError::InvalidHeader { key })
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_idle_timeout(config.pool_idle_timeout)
            .connect_timeout(config.upstream_timeout.min(Duration::from_secs(10)))
            .tcp_nodelay(true)
            // As invocations: the gateway is reached directly, whatever HTTP_PROXY says.
            .no_proxy()
            .build()
            .map_err(|e| SdkError::HttpClient(e.to_string()))?;
        let base = config.gateway_url.trim_end_matches('/').to_owned();
        let route = if config.asynchronous_invocation {
            "async-function"
        } else {
            "function"
        };
        let invoke_base = Url::parse(&format!("{base}/{route}/"))
            .map_err(|e| SdkError::HttpClient(format!("gateway_url {base:?} is not a URL: {e}")))?;
        if invoke_base.cannot_be_a_base() {
            return Err(SdkError::HttpClient(format!(
                "gateway_url {base:?} cannot be a base URL"
            )));
        }
        Ok(Self {
            http,
            invoker: invoker(config)?,
            base,
            invoke_base,
            auth: BasicAuth::from_config(config)?,
            timeout: config.upstream_timeout,
            asynchronous: config.asynchronous_invocation,
            callback_url: config
                .callback_url
                .as_deref()
                .map(|v| header("callback_url", v))
                .transpose()?,
            content_type: config
                .content_type
                .as_deref()
                .map(|v| header("content_type", v))
                .transpose()?,
            connector: header("connector", connector)?,
            default_event_type: header("connector", &format!("{connector}.message"))?,
            user_agent: header(
                "connector",
                &format!("{connector}/{}", env!("CARGO_PKG_VERSION")),
            )?,
            metrics: None,
        })
    }

    /// Counts the source headers this client withholds from invocations in `metrics`
    /// (`connector_source_headers_withheld_total`).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The gateway's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn system(&self, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .get(format!("{}{path}", self.base))
            .timeout(self.timeout)
            .header(USER_AGENT, self.user_agent.clone());
        if let Some(auth) = &self.auth {
            req = req.basic_auth(&auth.user, Some(auth.password.expose()));
        }
        req
    }

    /// `POST /system/backlog`: the messages waiting for each function, as `source` (one
    /// connector process) sees them now (see [`crate::backlog::report_loop`]).
    pub async fn report_backlog(
        &self,
        source: &crate::backlog::ReportSource,
        functions: &std::collections::BTreeMap<crate::FunctionRef, u64>,
    ) -> Result<(), SdkError> {
        let url = format!("{}/system/backlog", self.base);
        let functions: serde_json::Map<String, serde_json::Value> = functions
            .iter()
            .map(|(f, n)| (f.to_string(), (*n).into()))
            .collect();
        let mut body = serde_json::json!({
            "source": source.id,
            "connector": source.connector,
            "functions": functions,
        });
        if let Some(admin) = &source.admin {
            body["admin"] = admin.clone().into();
        }
        let mut req = self
            .http
            .post(&url)
            .timeout(self.timeout)
            .header(USER_AGENT, self.user_agent.clone())
            .json(&body);
        if let Some(auth) = &self.auth {
            req = req.basic_auth(&auth.user, Some(auth.password.expose()));
        }
        let failed = |reason: String| SdkError::ReportBacklog {
            url: url.clone(),
            reason,
        };
        let resp = req.send().await.map_err(|e| failed(e.to_string()))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(failed(format!("status {}", resp.status())))
        }
    }

    /// `GET /system/namespaces`. A gateway without namespace support (404) lists none.
    pub async fn list_namespaces(&self) -> Result<Vec<String>, SdkError> {
        let url = "/system/namespaces";
        let resp = self
            .system(url)
            .send()
            .await
            .map_err(|e| SdkError::ListFunctions {
                url: url.into(),
                reason: e.to_string(),
            })?;
        match resp.status() {
            StatusCode::NOT_FOUND => return Ok(Vec::new()),
            s if s.is_success() => {}
            s => return Err(status_error(url, s)),
        }
        let body = resp.bytes().await.map_err(|e| SdkError::ListFunctions {
            url: url.into(),
            reason: e.to_string(),
        })?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        let namespaces: Option<Vec<String>> =
            serde_json::from_slice(&body).map_err(|e| SdkError::ListFunctions {
                url: url.into(),
                reason: format!("malformed JSON: {e}"),
            })?;
        Ok(namespaces.unwrap_or_default())
    }

    /// `GET /system/functions[?namespace=NS]`.
    pub async fn list_functions(
        &self,
        namespace: Option<&str>,
    ) -> Result<Vec<FunctionStatus>, SdkError> {
        let url = match namespace {
            Some(ns) => format!("/system/functions?namespace={}", encode(ns)),
            None => "/system/functions".to_owned(),
        };
        let resp = self
            .system(&url)
            .send()
            .await
            .map_err(|e| SdkError::ListFunctions {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp.status()));
        }
        let body = resp.bytes().await.map_err(|e| SdkError::ListFunctions {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let mut functions: Vec<FunctionStatus> =
            serde_json::from_slice::<Option<Vec<FunctionStatus>>>(&body)
                .map_err(|e| SdkError::ListFunctions {
                    url: url.clone(),
                    reason: format!("malformed JSON: {e}"),
                })?
                .unwrap_or_default();
        if let Some(ns) = namespace {
            for f in &mut functions {
                if f.namespace.as_deref().is_none_or(str::is_empty) {
                    f.namespace = Some(ns.to_owned());
                }
            }
        }
        Ok(functions)
    }

    /// Every function of every namespace; a gateway that lists no namespaces is asked
    /// once without one.
    pub async fn list_all_functions(&self) -> Result<Vec<FunctionStatus>, SdkError> {
        let namespaces = self.list_namespaces().await?;
        if namespaces.is_empty() {
            return self.list_functions(None).await;
        }
        let mut all = Vec::new();
        for ns in &namespaces {
            all.extend(self.list_functions(Some(ns)).await?);
        }
        Ok(all)
    }

    /// Whether invocations go to `/async-function/`.
    pub fn is_asynchronous(&self) -> bool {
        self.asynchronous
    }

    /// The headers of one invocation of `function` with `message`, attempt number
    /// `attempt` (1-based, counting the broker's earlier deliveries): the message's own
    /// headers that [`source_headers::withheld`] lets through, then the connector's.
    pub fn invocation_headers(&self, message: &Message, attempt: u32) -> HeaderMap {
        // Room for the message's own headers and the dozen of the contract, so that
        // inserting them never grows the map.
        let mut headers = HeaderMap::with_capacity(message.headers.len() + 12);
        for (name, value) in &message.headers {
            match source_headers::withheld(name) {
                None => {
                    headers.append(name.clone(), value.clone());
                }
                Some(rule) => {
                    // The name only: a value may be a credential.
                    tracing::debug!(
                        header = %name,
                        rule,
                        topic = %message.topic,
                        ce_id = %message.id,
                        "source header withheld from the invocation"
                    );
                    if let Some(metrics) = &self.metrics {
                        metrics.source_header_withheld(rule);
                    }
                }
            }
        }
        let mut set = |name: &HeaderName, value: HeaderValue| {
            headers.insert(name.clone(), value);
        };
        if let Some(v) = header_value(&message.topic) {
            set(&X_TOPIC, v);
        }
        set(&X_CONNECTOR, self.connector.clone());
        set(&USER_AGENT, self.user_agent.clone());
        if let Some(ct) = self.content_type.as_ref().or(message.content_type.as_ref()) {
            set(&CONTENT_TYPE, ct.clone());
        }
        set(&X_DELIVERY_ATTEMPT, HeaderValue::from(attempt));
        set(&CE_SPECVERSION, HeaderValue::from_static("1.0"));
        if let Some(v) = header_value(&message.id) {
            set(&CE_ID, v);
        }
        if let Some(v) = header_value(&message.source) {
            set(&CE_SOURCE, v);
        }
        let event_type = match &message.event_type {
            Some(t) => header_value(t),
            None => Some(self.default_event_type.clone()),
        };
        if let Some(v) = event_type {
            set(&CE_TYPE, v);
        }
        let time = message.time.unwrap_or_else(SystemTime::now);
        if let Some(v) = header_value(&humantime::format_rfc3339_millis(time).to_string()) {
            set(&CE_TIME, v);
        }
        if let Some(v) = message.subject.as_deref().and_then(header_value) {
            set(&CE_SUBJECT, v);
        }
        if self.asynchronous
            && let Some(cb) = &self.callback_url
        {
            set(&X_CALLBACK_URL, cb.clone());
        }
        headers
    }

    /// One attempt: `POST {gateway}/function/{fn}` (or `/async-function/`). A response of
    /// any status is `Ok`; the verdict decides what it means. `timeout` replaces
    /// `upstream_timeout` for this call (a function's `connector.timeout`).
    pub async fn invoke(
        &self,
        function: &FunctionRef,
        message: &Message,
        attempt: u32,
        timeout: Option<Duration>,
    ) -> Result<InvocationResponse, InvokeError> {
        self.invoke_traced(function, message, attempt, timeout, None)
            .await
    }

    /// [`invoke`](Self::invoke), carrying `trace` as `traceparent`/`tracestate` (the
    /// delivery attempt's span, or the message's incoming context passed on).
    pub async fn invoke_traced(
        &self,
        function: &FunctionRef,
        message: &Message,
        attempt: u32,
        timeout: Option<Duration>,
        trace: Option<&opentelemetry::Context>,
    ) -> Result<InvocationResponse, InvokeError> {
        let uri = self.function_uri(function)?;
        let mut headers = self.invocation_headers(message, attempt);
        if let Some(cx) = trace {
            faas_common::otel::inject(cx, &mut headers);
        }
        if message.payload.is_empty() {
            // hyper sends no length for an empty body; say it, as other clients do, so
            // that an empty message reaches the function as an empty body.
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(0u32));
        }
        self.exchange(uri, headers, message.payload.clone(), timeout)
            .await
    }

    /// Invokes `function` with a batch: `body` is a CloudEvents JSON batch (the items'
    /// own attributes are inside it, so no `ce-*` header is sent), `topic` its items'
    /// topic when they share one, `attempt` the highest attempt among them, `trace` the
    /// `traceparent`/`tracestate` the request carries.
    pub async fn invoke_batch(
        &self,
        function: &FunctionRef,
        topic: Option<&str>,
        body: Bytes,
        attempt: u32,
        timeout: Option<Duration>,
        trace: Option<&HeaderMap>,
    ) -> Result<InvocationResponse, InvokeError> {
        let uri = self.function_uri(function)?;
        let mut headers = HeaderMap::with_capacity(9);
        for (name, value) in trace.into_iter().flatten() {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(v) = topic.and_then(header_value) {
            headers.insert(X_TOPIC.clone(), v);
        }
        headers.insert(X_CONNECTOR.clone(), self.connector.clone());
        headers.insert(USER_AGENT.clone(), self.user_agent.clone());
        headers.insert(
            CONTENT_TYPE.clone(),
            HeaderValue::from_static("application/cloudevents-batch+json"),
        );
        headers.insert(X_DELIVERY_ATTEMPT.clone(), HeaderValue::from(attempt));
        if self.asynchronous
            && let Some(cb) = &self.callback_url
        {
            headers.insert(X_CALLBACK_URL.clone(), cb.clone());
        }
        self.exchange(uri, headers, body, timeout).await
    }

    /// One request to a function and its response, within `timeout` (else the client's).
    async fn exchange(
        &self,
        uri: http::Uri,
        headers: HeaderMap,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<InvocationResponse, InvokeError> {
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let exchange = async {
            let response = self
                .invoker
                .request(request)
                .await
                .map_err(|e| InvokeError::Transport(error_chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = read_limited(body, &parts.headers)
                .await
                .map_err(|e| InvokeError::Transport(format!("reading the response: {e}")))?;
            Ok(InvocationResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        // The bound covers the whole exchange: connecting, the function's work, the body.
        let timeout = timeout.unwrap_or(self.timeout);
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(InvokeError::Timeout(timeout)))
    }

    /// `{gateway}/function/{name.namespace}`, the name as one path segment.
    fn function_uri(&self, function: &FunctionRef) -> Result<http::Uri, InvokeError> {
        let mut url = self.invoke_base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push(function.as_str());
        }
        http::Uri::try_from(String::from(url))
            .map_err(|e| InvokeError::Transport(format!("invalid function URL: {e}")))
    }
}

/// Reads at most [`MAX_RESPONSE_BYTES`] of a body, discarding the rest.
async fn read_limited<B>(body: B, headers: &HeaderMap) -> Result<Bytes, B::Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n <= MAX_RESPONSE_BYTES) {
        return Ok(body.collect().await?.to_bytes());
    }
    let mut body = body;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame?.into_data() {
            let room = MAX_RESPONSE_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }
    Ok(kept.into())
}

fn header_value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

fn status_error(url: &str, status: StatusCode) -> SdkError {
    let hint = if status == StatusCode::UNAUTHORIZED {
        " (check basic_auth and the credentials in secret_mount_path)"
    } else {
        ""
    };
    SdkError::ListFunctions {
        url: url.to_owned(),
        reason: format!("gateway answered {status}{hint}"),
    }
}

/// The error and its causes on one line: reqwest's top-level message alone ("error
/// sending request") hides the useful part ("connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn encode(s: &str) -> String {
    Url::parse_with_params("http://x/", &[("n", s)])
        .ok()
        .and_then(|u| u.query().map(|q| q.trim_start_matches("n=").to_owned()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(config: SdkConfig) -> GatewayClient {
        GatewayClient::new("test-connector", &config).unwrap()
    }

    #[test]
    fn headers_follow_the_contract() {
        let c = client(SdkConfig::default());
        let mut m = Message::new("orders", "x", "orders/0/42", "kafka://b/orders")
            .with_subject("key-1")
            .with_time(SystemTime::UNIX_EPOCH)
            .with_content_type("application/json");
        m.add_header("X-Kafka-Partition", "0");
        m.add_header("X-Topic", "spoofed");
        let h = c.invocation_headers(&m, 3);
        let get = |k: &str| h.get(k).unwrap().to_str().unwrap().to_owned();
        assert_eq!(get("x-topic"), "orders");
        assert_eq!(h.get_all("x-topic").iter().count(), 1);
        assert_eq!(get("x-connector"), "test-connector");
        assert!(get("user-agent").starts_with("test-connector/"));
        assert_eq!(get("content-type"), "application/json");
        assert_eq!(get("x-delivery-attempt"), "3");
        assert_eq!(get("ce-specversion"), "1.0");
        assert_eq!(get("ce-id"), "orders/0/42");
        assert_eq!(get("ce-source"), "kafka://b/orders");
        assert_eq!(get("ce-type"), "test-connector.message");
        assert_eq!(get("ce-time"), "1970-01-01T00:00:00.000Z");
        assert_eq!(get("ce-subject"), "key-1");
        assert_eq!(get("x-kafka-partition"), "0");
        assert!(h.get("x-callback-url").is_none());
    }

    /// Issue 17: a publisher's headers never reframe the request or speak for the
    /// connector; each one withheld is counted by its rule, and ordinary ones pass.
    #[test]
    fn source_headers_that_reframe_or_impersonate_are_withheld_and_counted() {
        let (metrics, registry) = Metrics::standalone("test-connector");
        let c = client(SdkConfig::default()).with_metrics(metrics);
        // No subject and no content type of its own: nothing of the connector's to
        // replace a spoofed `ce-subject` or `Content-Type`.
        let mut m = Message::new("orders", "x", "orders/0/42", "nats://n/orders");
        for (name, value) in [
            ("Content-Length", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            ("Host", "evil.example"),
            ("Authorization", "Bearer stolen"),
            ("Cookie", "session=1"),
            ("X-Callback-Url", "http://evil.example/collect"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("Proxy-Authorization", "Basic eA=="),
            ("ce-id", "spoofed"),
            ("ce-subject", "spoofed"),
            ("X-Topic", "spoofed"),
            ("Content-Type", "text/evil"),
            ("X-Trace-Me", "yes"),
            ("X-Trace-Me", "twice"),
        ] {
            assert!(m.add_header(name, value));
        }
        let h = c.invocation_headers(&m, 1);
        for gone in [
            "content-length",
            "transfer-encoding",
            "connection",
            "host",
            "authorization",
            "cookie",
            "x-callback-url",
            "x-forwarded-for",
            "proxy-authorization",
            "ce-subject",
            "content-type",
        ] {
            assert!(h.get(gone).is_none(), "{gone} forwarded: {h:?}");
        }
        let all = |name: &str| h.get_all(name).iter().cloned().collect::<Vec<_>>();
        assert_eq!(all("ce-id"), ["orders/0/42"]);
        assert_eq!(all("x-topic"), ["orders"]);
        assert_eq!(all("x-trace-me"), ["yes", "twice"]);
        let text = crate::metrics::encode(&registry);
        for needle in [
            "connector_source_headers_withheld_total{header=\"content-length\"} 1",
            "connector_source_headers_withheld_total{header=\"authorization\"} 1",
            "connector_source_headers_withheld_total{header=\"x-forwarded-*\"} 1",
            "connector_source_headers_withheld_total{header=\"proxy-*\"} 1",
            "connector_source_headers_withheld_total{header=\"ce-*\"} 2",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn configured_content_type_wins_and_callback_goes_with_async() {
        let c = client(SdkConfig {
            content_type: Some("text/plain".into()),
            asynchronous_invocation: true,
            callback_url: Some("http://cb/x".into()),
            ..SdkConfig::default()
        });
        let m = Message::new("t", "x", "id", "s").with_content_type("application/json");
        let h = c.invocation_headers(&m, 1);
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["x-callback-url"], "http://cb/x");
    }

    #[test]
    fn credentials_from_files_or_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("basic-auth-user"), "admin\n").unwrap();
        std::fs::write(dir.path().join("basic-auth-password"), " s3cret \n").unwrap();
        let mut config = SdkConfig {
            basic_auth: true,
            secret_mount_path: dir.path().to_owned(),
            ..SdkConfig::default()
        };
        let auth = BasicAuth::from_config(&config).unwrap().unwrap();
        assert_eq!(auth.user, "admin");
        assert_eq!(auth.password.expose(), "s3cret");
        config.gateway_username = Some("u".into());
        config.gateway_password = Some(Secret::new("p"));
        let auth = BasicAuth::from_config(&config).unwrap().unwrap();
        assert_eq!(auth.user, "u");
        config.gateway_username = None;
        config.secret_mount_path = dir.path().join("missing");
        let err = BasicAuth::from_config(&config).unwrap_err();
        assert!(err.to_string().contains("basic-auth-user"), "{err}");
        config.basic_auth = false;
        assert!(BasicAuth::from_config(&config).unwrap().is_none());
    }

    #[test]
    fn namespace_query_is_encoded() {
        assert_eq!(encode("openfaas-fn"), "openfaas-fn");
        assert_eq!(encode("a b&c"), "a+b%26c");
    }

    #[tokio::test]
    async fn oversized_response_bodies_are_cut_at_the_limit() {
        let big = Bytes::from(vec![7u8; MAX_RESPONSE_BYTES + 10]);
        // Without a declared length the body is read chunk by chunk and cut.
        let stream = futures::stream::iter(
            big.chunks(1 << 20)
                .map(|c| {
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                        Bytes::copy_from_slice(c),
                    ))
                })
                .collect::<Vec<_>>(),
        );
        let body = http_body_util::StreamBody::new(stream);
        let kept = read_limited(body, &HeaderMap::new()).await.unwrap();
        assert_eq!(kept.len(), MAX_RESPONSE_BYTES);
        // A declared length over the limit is cut too.
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(big.len()));
        let kept = read_limited(Full::new(big.clone()), &headers)
            .await
            .unwrap();
        assert_eq!(kept.len(), MAX_RESPONSE_BYTES);
        // Within the limit it is passed whole.
        let small = Bytes::from_static(b"\xff\x00ok");
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(small.len()));
        let kept = read_limited(Full::new(small.clone()), &headers)
            .await
            .unwrap();
        assert_eq!(kept, small);
    }

    #[tokio::test]
    async fn https_gateway_is_spoken_to_over_tls() {
        // A plain-HTTP listener behind an https URL: the client must attempt a TLS
        // handshake (and fail on it), not send plain HTTP.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut socket, &mut first)
                .await
                .unwrap();
            first[0]
        });
        let c = client(SdkConfig {
            gateway_url: format!("https://{addr}"),
            ..SdkConfig::default()
        });
        let function = FunctionRef::new("echo", None);
        let m = Message::new("orders", "x", "orders/0/1", "test://");
        let err = c.invoke(&function, &m, 1, None).await.unwrap_err();
        assert!(matches!(err, InvokeError::Transport(_)), "{err}");
        // 0x16: a TLS handshake record, where plain HTTP would start with `P` (POST).
        assert_eq!(server.await.unwrap(), 0x16);
    }

    #[test]
    fn function_names_are_one_path_segment() {
        let c = client(SdkConfig {
            gateway_url: "http://gw:8080/prefix/".into(),
            ..SdkConfig::default()
        });
        let uri = c
            .function_uri(&FunctionRef::new("fn/../x y", Some("ns")))
            .unwrap();
        assert_eq!(uri, "http://gw:8080/prefix/function/fn%2F..%2Fx%20y.ns");
        let c = client(SdkConfig {
            gateway_url: "https://gw".into(),
            asynchronous_invocation: true,
            ..SdkConfig::default()
        });
        let uri = c.function_uri(&FunctionRef::new("echo", None)).unwrap();
        assert_eq!(uri, "https://gw/async-function/echo");
    }
}
