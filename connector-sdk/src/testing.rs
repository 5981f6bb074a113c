//! Test support for connector authors: a real HTTP server (axum) playing an
//! OpenFaaS-compatible gateway and its functions.
//!
//! Each function's behaviour is a closure from (request, call number) to a [`Reply`];
//! every request is recorded with its headers, body and arrival time, and concurrency is
//! tracked. `/system/*` can be switched to fail in the ways real gateways do
//! ([`SystemMode`]). The SDK's own tests and the end-to-end tests use it; so can yours.
//!
//! [`load`] holds what the connectors' load programs share: the no-op function in a child
//! process, the plain HTTP ceiling, and `/proc` readings of the connector process.

pub mod load;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::SdkConfig;
use crate::topic_map::{FunctionStatus, TopicMap, TopicMapHandle};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a function answers.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn ok() -> Self {
        Self::status(200)
    }
    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// One request a function received.
#[derive(Clone, Debug)]
pub struct Received {
    pub function: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

type Behaviour = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

/// How `/system/*` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemMode {
    Ok,
    Error500,
    Malformed,
    Hang,
}

#[derive(Default)]
struct Shared {
    functions: Mutex<Vec<serde_json::Value>>,
    namespaces: Mutex<Option<Vec<String>>>,
    mode: Mutex<Option<SystemMode>>,
    behaviours: Mutex<HashMap<String, Behaviour>>,
    calls: Mutex<HashMap<String, usize>>,
    requests: Mutex<Vec<Received>>,
    system_calls: AtomicUsize,
    system_auth: Mutex<Vec<Option<String>>>,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
}

/// The fake gateway. Dropping it stops the server.
pub struct FakeGateway {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeGateway {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on `addr` (to bring a gateway up where a connector already looks for one).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/system/namespaces", get(namespaces))
            .route("/system/functions", get(functions))
            .route("/function/{name}", post(invoke))
            .route("/async-function/{name}", post(invoke_async))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "fake gateway stopped");
            }
        });
        Ok(Self { addr, shared, stop })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers function `name` subscribed to `topics` (the annotation text), answering
    /// with `behaviour`.
    pub fn function(
        &self,
        name: &str,
        topics: &str,
        behaviour: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) {
        self.function_with_annotations(name, &[("topic", topics)], behaviour);
    }

    /// Registers (or replaces) function `name` with `annotations`, answering with
    /// `behaviour`.
    pub fn function_with_annotations(
        &self,
        name: &str,
        annotations: &[(&str, &str)],
        behaviour: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) {
        self.set_annotations(name, annotations);
        self.shared
            .behaviours
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), Arc::new(behaviour));
    }

    /// Replaces the annotations of function `name` (adding it to the list if needed),
    /// keeping its behaviour.
    pub fn set_annotations(&self, name: &str, annotations: &[(&str, &str)]) {
        let annotations: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned())))
            .collect();
        let mut functions = self
            .shared
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        functions.retain(|f| f.get("name").and_then(|n| n.as_str()) != Some(name));
        functions.push(serde_json::json!({
            "name": name,
            "annotations": annotations,
            "replicas": 1
        }));
    }

    /// Removes function `name` from the list (its behaviour stays, for late calls).
    pub fn remove_function(&self, name: &str) {
        self.shared
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|f| f.get("name").and_then(|n| n.as_str()) != Some(name));
    }

    pub fn set_functions_json(&self, list: Vec<serde_json::Value>) {
        *self
            .shared
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = list;
    }

    pub fn set_namespaces(&self, namespaces: Option<Vec<String>>) {
        *self
            .shared
            .namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = namespaces;
    }

    pub fn set_mode(&self, mode: SystemMode) {
        *self
            .shared
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(mode);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn requests_to(&self, function: &str) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.function == function)
            .collect()
    }

    pub fn max_inflight(&self) -> usize {
        self.shared.max_inflight.load(Ordering::SeqCst)
    }

    pub fn system_calls(&self) -> usize {
        self.shared.system_calls.load(Ordering::SeqCst)
    }

    pub fn system_auth(&self) -> Vec<Option<String>> {
        self.shared
            .system_auth
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The topic map this gateway's function list produces.
    pub fn topic_map(&self) -> TopicMapHandle {
        let list: Vec<FunctionStatus> = self
            .shared
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect();
        TopicMapHandle::fixed(TopicMap::build(&list, ","))
    }

    /// An SDK config pointing at this gateway, with fast retries.
    pub fn config(&self) -> SdkConfig {
        let mut c = SdkConfig {
            gateway_url: self.url(),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream_timeout: Duration::from_secs(5),
            rebuild_interval: Duration::from_millis(100),
            ..SdkConfig::default()
        };
        c.backoff.initial = Duration::from_millis(10);
        c.backoff.max = Duration::from_millis(50);
        c
    }
}

async fn system_gate(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    shared.system_calls.fetch_add(1, Ordering::SeqCst);
    shared
        .system_auth
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(
            headers
                .get("authorization")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        );
    let mode = shared
        .mode
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .unwrap_or(SystemMode::Ok);
    match mode {
        SystemMode::Ok => None,
        SystemMode::Error500 => Some((StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()),
        SystemMode::Malformed => Some((StatusCode::OK, "{not json").into_response()),
        SystemMode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            None
        }
    }
}

async fn namespaces(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = system_gate(&shared, &headers).await {
        return r;
    }
    let ns = shared
        .namespaces
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match ns {
        Some(list) => axum::Json(list).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn functions(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = system_gate(&shared, &headers).await {
        return r;
    }
    let list = shared
        .functions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    axum::Json(list).into_response()
}

async fn invoke_async(
    state: State<Arc<Shared>>,
    path: Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = invoke(state, path, headers, body).await;
    if r.status().is_success() {
        StatusCode::ACCEPTED.into_response()
    } else {
        r
    }
}

async fn invoke(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Received {
        function: name.clone(),
        headers,
        body,
        at: Instant::now(),
    };
    shared
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(received.clone());
    let behaviour = shared
        .behaviours
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&name)
        .cloned();
    let Some(behaviour) = behaviour else {
        return (StatusCode::NOT_FOUND, "no such function").into_response();
    };
    let call = {
        let mut calls = shared.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let n = calls.entry(name).or_default();
        *n += 1;
        *n - 1
    };
    let now = shared.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_inflight.fetch_max(now, Ordering::SeqCst);
    let reply = behaviour(&received, call);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    shared.inflight.fetch_sub(1, Ordering::SeqCst);
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    for (k, v) in reply.headers {
        if let Ok(v) = v.parse() {
            response.headers_mut().insert(k, v);
        }
    }
    response
}

/// Polls `check` every 10 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
