//! `/async-function/{name}`: accept (202 and `X-Call-Id`), queue, invoke later with the
//! verdict rules of DESIGN.md, and post the result to `X-Callback-Url`.
//!
//! Two queues share one worker: the embedded queue (the default), and a NATS JetStream
//! stream (`nats_url`) whose retries use JetStream's own redelivery (nak with delay).
//! The embedded queue keeps accepted requests on disk by default ([`store`]: a redb file,
//! written in group commits), so a 202 survives a crash, SIGKILL included, and every
//! request runs at least once; `queue_store = "memory"` keeps them in memory only.

pub mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use faas_common::backoff::Backoff;
use faas_common::verdict::{StatusClasses, Verdict};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::AppState;
use crate::config::AsyncSection;
use crate::error::Error;
use crate::metrics::OutcomeLabel;
use crate::names::FunctionRef;
use crate::provider::Invocation;
use crate::proxy::{
    collect_body, decorate_response, invoke_function, percent_decode, prepare_headers,
    split_function_path,
};
use crate::queue::store::{Record, Store};

/// A queued request, as stored in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedRequest {
    /// `X-Call-Id`.
    pub call_id: String,
    /// The function, `name.namespace`.
    pub function: String,
    /// The sub-path after the name (`/` or `/rest`).
    pub path: String,
    /// The raw query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The request's headers (after the gateway added its own).
    pub headers: Vec<(String, String)>,
    /// The body, base64 in JSON.
    pub body: String,
    /// Where the result goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// When the gateway accepted it (Unix milliseconds).
    pub accepted_at_ms: u64,
}

/// Somewhere to put requests.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Stores `request` for the worker; an error means it was not accepted.
    async fn enqueue(&self, request: QueuedRequest) -> Result<(), Error>;

    /// Requests held now (accepted, not finished), where the queue knows it.
    fn held(&self) -> Option<usize> {
        None
    }
}

/// `POST /async-function/{name}[/path]`.
pub async fn async_route(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let connect = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied();
    match accept(&state, connect.map(|c| c.0), request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn accept(
    state: &AppState,
    client: Option<SocketAddr>,
    request: Request,
) -> Result<Response, Error> {
    let Some(queue) = &state.queue else {
        return Err(Error::NotImplemented(
            "asynchronous invocation is not configured".into(),
        ));
    };
    let (mut parts, body) = request.into_parts();
    if parts.method != Method::POST {
        let mut r = (StatusCode::METHOD_NOT_ALLOWED, "Method not allowed\n").into_response();
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("POST"));
        return Ok(r);
    }
    let raw_path = parts.uri.path().to_owned();
    let (raw_name, sub_path) = split_function_path(&raw_path, "/async-function/")
        .ok_or_else(|| Error::BadRequest("Provide function name in the request path".into()))?;
    let function = FunctionRef::parse_invoked(&percent_decode(raw_name), &state.namespace)?;
    let limit = state.async_max_body_bytes;
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::PayloadTooLarge { limit });
    }
    let callback_url = match parts.headers.get("x-callback-url") {
        Some(v) => {
            let text = v
                .to_str()
                .map_err(|_| Error::BadRequest("X-Callback-Url is not text".into()))?;
            let url = reqwest::Url::parse(text)
                .map_err(|e| Error::BadRequest(format!("X-Callback-Url {text:?}: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(Error::BadRequest(format!(
                    "X-Callback-Url {text:?} is not http(s)"
                )));
            }
            Some(text.to_owned())
        }
        None => None,
    };
    // Unlike OpenFaaS CE, an unknown function is refused now rather than failing later.
    state
        .provider
        .status(&function)
        .await
        .map_err(|e| match e {
            Error::SystemFunctionNotFound(name) => Error::FunctionNotFound(name),
            other => other,
        })?;
    let body = collect_body(body, limit).await?;
    let call = prepare_headers(&mut parts.headers, client);
    parts.headers.remove("x-callback-url");
    // Stored with the request: the trace survives the queue and a restart.
    crate::trace::enqueued(&function.qualified(), &mut parts.headers);
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let queued = QueuedRequest {
        call_id: call.call_id().to_owned(),
        function: function.qualified(),
        path: if sub_path.is_empty() {
            "/".into()
        } else {
            sub_path.to_owned()
        },
        query: parts.uri.query().map(str::to_owned),
        headers,
        body: base64::engine::general_purpose::STANDARD.encode(&body),
        callback_url,
        accepted_at_ms: unix_ms(),
    };
    queue.enqueue(queued).await?;
    state.metrics.async_queued.inc();
    tracing::debug!(function = %function, call_id = call.call_id(), "queued");
    let mut response = StatusCode::ACCEPTED.into_response();
    // The caller needs the id to match the callback, generated or not.
    let echo = crate::proxy::CallHeaders {
        generated: true,
        ..call
    };
    decorate_response(&mut response, &echo);
    Ok(response)
}

/// What one attempt came to.
#[derive(Debug)]
pub enum Attempt {
    /// Finished: delivered, dead-lettered or dropped; the callback gets this response.
    Done {
        /// The verdict.
        verdict: Verdict,
        /// The function's status.
        status: StatusCode,
        /// Its headers.
        headers: HeaderMap,
        /// Its body.
        body: bytes::Bytes,
    },
    /// Try again after this long.
    Retry(Duration),
}

/// Runs queued requests: invoke through the same path as `/function/*` (so metrics count
/// them), classify, and on a terminal outcome post the callback.
pub struct Worker {
    state: AppState,
    classes: StatusClasses,
    backoff: Backoff,
    max_attempts: u32,
    callbacks: reqwest::Client,
    callback_timeout: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// Longest function response kept for the callback.
const CALLBACK_BODY_LIMIT: usize = 16 * 1024 * 1024;

impl Worker {
    /// A worker invoking through `state`.
    pub fn new(state: AppState, config: &AsyncSection, callbacks: reqwest::Client) -> Self {
        Self {
            state,
            classes: config.status.clone(),
            backoff: config.backoff,
            max_attempts: config.max_attempts,
            callbacks,
            callback_timeout: config.callback_timeout,
        }
    }

    /// One attempt (`attempt` is 1-based), in a span naming the request.
    pub async fn attempt(&self, request: &QueuedRequest, attempt: u32) -> Attempt {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "async_request",
            function = %request.function,
            call_id = %request.call_id,
            attempt,
            trace_id = tracing::field::Empty,
        );
        if let Some(id) = faas_common::otel::trace_id_in(&stored_trace(request)) {
            span.record("trace_id", tracing::field::display(id));
        }
        self.attempt_in_span(request, attempt)
            .instrument(span)
            .await
    }

    async fn attempt_in_span(&self, request: &QueuedRequest, attempt: u32) -> Attempt {
        let started = Instant::now();
        let function = match FunctionRef::parse(&request.function, None, &self.state.namespace) {
            Ok(f) => f,
            Err(e) => {
                return Attempt::Done {
                    verdict: Verdict::DeadLetter,
                    status: e.status(),
                    headers: HeaderMap::new(),
                    body: bytes::Bytes::from(e.to_string()),
                };
            }
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &request.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
                headers.append(k, v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&attempt.to_string()) {
            headers.insert("x-delivery-attempt", v);
        }
        if attempt == 1 {
            let accepted = SystemTime::UNIX_EPOCH + Duration::from_millis(request.accepted_at_ms);
            crate::trace::waited(&request.function, &headers, accepted);
        }
        let body = base64::engine::general_purpose::STANDARD
            .decode(&request.body)
            .unwrap_or_default();
        let invocation = Invocation {
            method: Method::POST,
            path: request.path.clone(),
            query: request.query.clone(),
            headers,
            body: Body::from(body),
        };
        let response = invoke_function(&self.state, &function, invocation).await;
        let status = response.status();
        let verdict = self
            .classes
            .classify(status, response.headers(), SystemTime::now());
        match verdict {
            Verdict::Retry { retry_after } if attempt < self.max_attempts => {
                let delay = self.backoff.delay_with_hint(attempt, retry_after);
                tracing::info!(
                    status = status.as_u16(),
                    delay_ms = delay.as_millis() as u64,
                    "retrying"
                );
                self.outcome("retried");
                Attempt::Retry(delay)
            }
            verdict => {
                let verdict = match verdict {
                    // Out of attempts: a retryable failure becomes a dead letter.
                    Verdict::Retry { .. } => Verdict::DeadLetter,
                    v => v,
                };
                let (parts, body) = response.into_parts();
                let body = collect_body(body, CALLBACK_BODY_LIMIT)
                    .await
                    .unwrap_or_default();
                match verdict {
                    Verdict::Delivered => self.outcome("delivered"),
                    Verdict::Drop => self.outcome("dropped"),
                    _ => {
                        self.outcome("dead_letter");
                        tracing::warn!(
                            status = status.as_u16(),
                            body = %String::from_utf8_lossy(&body[..body.len().min(256)]),
                            "async request dead-lettered"
                        );
                    }
                }
                tracing::debug!(
                    seconds = started.elapsed().as_secs_f64(),
                    "async request finished"
                );
                Attempt::Done {
                    verdict,
                    status,
                    headers: parts.headers,
                    body,
                }
            }
        }
    }

    fn outcome(&self, outcome: &'static str) {
        self.state
            .metrics
            .async_outcomes
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Posts the result to the request's callback URL, if it has one. A few quick
    /// attempts; a receiver that stays down is logged and counted, not retried forever.
    pub async fn callback(
        &self,
        request: &QueuedRequest,
        status: StatusCode,
        headers: &HeaderMap,
        body: bytes::Bytes,
        cancel: &CancellationToken,
    ) {
        let Some(url) = &request.callback_url else {
            return;
        };
        let mut out = headers.clone();
        crate::provider::strip_hop_by_hop(&mut out);
        out.remove(axum::http::header::CONTENT_LENGTH);
        let accepted = SystemTime::UNIX_EPOCH + Duration::from_millis(request.accepted_at_ms);
        let seconds = SystemTime::now()
            .duration_since(accepted)
            .unwrap_or_default()
            .as_secs_f64();
        let extra: BTreeMap<&str, String> = BTreeMap::from([
            ("x-call-id", request.call_id.clone()),
            ("x-function-status", status.as_u16().to_string()),
            ("x-function-name", request.function.clone()),
            ("x-duration-seconds", format!("{seconds:.6}")),
        ]);
        for (k, v) in extra {
            if let Ok(v) = HeaderValue::from_str(&v) {
                out.insert(k, v);
            }
        }
        let span = crate::trace::callback(&request.function, &stored_trace(request), &mut out);
        let delivered = self.post_callback(request, url, out, body, cancel).await;
        if let Some(span) = span {
            span.finish(None, !delivered);
        }
    }

    /// Posts the callback, a few quick attempts; whether the receiver took it.
    async fn post_callback(
        &self,
        request: &QueuedRequest,
        url: &str,
        out: HeaderMap,
        body: bytes::Bytes,
        cancel: &CancellationToken,
    ) -> bool {
        for attempt in 1..=3u32 {
            let sent = self
                .callbacks
                .post(url)
                .headers(out.clone())
                .timeout(self.callback_timeout)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return true,
                Ok(r) => {
                    tracing::warn!(call_id = %request.call_id, status = r.status().as_u16(), attempt, "callback refused")
                }
                Err(e) => {
                    tracing::warn!(call_id = %request.call_id, error = %e, attempt, "callback failed")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.backoff.delay(attempt)) => {}
                () = cancel.cancelled() => break,
            }
        }
        self.state.metrics.callback_failures.inc();
        false
    }
}

/// The stored request's `traceparent`/`tracestate`, as headers.
fn stored_trace(request: &QueuedRequest) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in &request.headers {
        if (k.eq_ignore_ascii_case("traceparent") || k.eq_ignore_ascii_case("tracestate"))
            && let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v))
        {
            out.insert(k, v);
        }
    }
    out
}

/// A request the embedded queue holds, from acceptance until it is finished.
#[derive(Debug)]
struct Job {
    /// Its key in the store: the order of acceptance.
    key: u64,
    request: QueuedRequest,
    /// The attempt to make next (1-based).
    attempt: u32,
    /// Its share of `queue_capacity`, given back once it is finished (after its removal
    /// from the store is committed). `None` for requests found in the store beyond the
    /// capacity (it was lowered between two runs): they run, and take no new place.
    place: Option<OwnedSemaphorePermit>,
}

/// The embedded queue: accepted requests wait in a channel (and, with the `disk` store,
/// in a file) and run `concurrency` at a time.
///
/// A request's life: `enqueue` takes a place in `queue_capacity` (503 when none is left),
/// stores the request (waiting for the group commit: the 202 follows a sync to disk) and
/// hands it to the dispatcher. The dispatcher runs it when a slot is free; a retry stores
/// the next attempt number and the time it is due, waits for it, and goes back to the
/// channel; a finished request (delivered, dead-lettered or dropped) is removed from the
/// store after its callback, and its place is given back. After a crash, a restart reads
/// the store and runs every request in it again, in the order they were accepted.
#[derive(Debug)]
pub struct EmbeddedQueue {
    ready: mpsc::UnboundedSender<Job>,
    places: Arc<Semaphore>,
    capacity: usize,
    store: Option<Store>,
    next_key: AtomicU64,
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn enqueue(&self, request: QueuedRequest) -> Result<(), Error> {
        let place = Arc::clone(&self.places).try_acquire_owned().map_err(|_| {
            Error::ServiceUnavailable("Error queuing request: the queue is full\n".into())
        })?;
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        if let Some(store) = &self.store {
            let value = Record {
                attempt: 1,
                not_before_ms: None,
                request: &request,
            }
            .encode()?;
            store.insert(key, value).await?;
        }
        self.ready
            .send(Job {
                key,
                request,
                attempt: 1,
                place: Some(place),
            })
            .map_err(|_| {
                // Stored, though: with the disk store it runs after the restart.
                Error::ServiceUnavailable("Error queuing request: the gateway is stopping\n".into())
            })
    }

    fn held(&self) -> Option<usize> {
        Some(
            self.capacity
                .saturating_sub(self.places.available_permits()),
        )
    }
}

impl EmbeddedQueue {
    /// A queue and the task that works it, stopped by `cancel`. With the `disk` store it
    /// opens the file first and queues what a previous run left in it; with `memory`,
    /// requests still queued when `cancel` fires are abandoned.
    pub async fn start(
        config: &AsyncSection,
        store_path: Option<&Path>,
        worker: Arc<Worker>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Self, Error> {
        let (ready, mut receiver) = mpsc::unbounded_channel::<Job>();
        let places = Arc::new(Semaphore::new(config.queue_capacity));
        let (store, found) = match store_path {
            Some(path) => {
                let (store, found) = Store::open(path).await?;
                tracing::info!(path = %path.display(), requests = found.len(), "async queue store open");
                (Some(store), found)
            }
            None => (None, Vec::new()),
        };
        let next_key = found.last().map_or(0, |(key, _)| key + 1);
        let jobs = TaskTracker::new();
        let now = unix_ms();
        for (key, record) in found {
            let job = Job {
                key,
                request: record.request,
                attempt: record.attempt.max(1),
                place: Arc::clone(&places).try_acquire_owned().ok(),
            };
            match record.not_before_ms.filter(|due| *due > now) {
                Some(due) => {
                    let wait = Duration::from_millis(due - now);
                    jobs.spawn(requeue_after(wait, job, ready.clone(), cancel.clone()));
                }
                None => {
                    let _ = ready.send(job);
                }
            }
        }
        let concurrency = Arc::new(Semaphore::new(config.concurrency));
        let dispatch = Dispatch {
            worker,
            store: store.clone(),
            ready: ready.clone(),
            cancel: cancel.clone(),
        };
        tracker.spawn(async move {
            loop {
                // Take a slot before a job, so at most `concurrency` run (the rest wait in
                // the channel, never an unbounded pile of tasks).
                let permit = tokio::select! {
                    p = Arc::clone(&concurrency).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    () = dispatch.cancel.cancelled() => break,
                };
                let job = tokio::select! {
                    job = receiver.recv() => match job { Some(job) => job, None => break },
                    () = dispatch.cancel.cancelled() => break,
                };
                jobs.spawn(dispatch.clone().run(job, permit));
            }
            // Requests still running finish and are removed; those waiting stay stored.
            jobs.close();
            jobs.wait().await;
            if let Some(store) = &dispatch.store {
                store.close().await;
            }
        });
        Ok(Self {
            ready,
            places,
            capacity: config.queue_capacity,
            store,
            next_key: AtomicU64::new(next_key),
        })
    }
}

/// What a running request needs besides itself.
#[derive(Clone)]
struct Dispatch {
    worker: Arc<Worker>,
    store: Option<Store>,
    ready: mpsc::UnboundedSender<Job>,
    cancel: CancellationToken,
}

impl Dispatch {
    /// One attempt; then the callback and removal, or the retry.
    async fn run(self, mut job: Job, slot: OwnedSemaphorePermit) {
        let outcome = self.worker.attempt(&job.request, job.attempt).await;
        drop(slot);
        match outcome {
            Attempt::Done {
                status,
                headers,
                body,
                ..
            } => {
                self.worker
                    .callback(&job.request, status, &headers, body, &self.cancel)
                    .await;
                match &self.store {
                    Some(store) => store.remove(job.key, job.place.take()),
                    None => drop(job.place.take()),
                }
            }
            Attempt::Retry(delay) => {
                job.attempt += 1;
                if let Some(store) = &self.store {
                    let due = unix_ms()
                        .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                    let record = Record {
                        attempt: job.attempt,
                        not_before_ms: Some(due),
                        request: &job.request,
                    };
                    match record.encode() {
                        Ok(value) => store.update(job.key, value),
                        Err(e) => {
                            tracing::warn!(call_id = %job.request.call_id, error = %e, "cannot store the retry; a restart repeats the last attempt's number")
                        }
                    }
                }
                requeue_after(delay, job, self.ready, self.cancel).await;
            }
        }
    }
}

/// Puts `job` back in the channel after `wait`, unless the gateway stops first (then it
/// stays in the store, if there is one, for the next start).
async fn requeue_after(
    wait: Duration,
    job: Job,
    ready: mpsc::UnboundedSender<Job>,
    cancel: CancellationToken,
) {
    tokio::select! {
        () = tokio::time::sleep(wait) => {
            let _ = ready.send(job);
        }
        () = cancel.cancelled() => {}
    }
}

fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// The JetStream queue: requests are published to a durable stream and consumed by a
/// durable pull consumer shared by every gateway on the stream.
#[derive(Debug)]
pub struct NatsQueue {
    jetstream: async_nats::jetstream::Context,
    subject: String,
}

#[async_trait]
impl Queue for NatsQueue {
    async fn enqueue(&self, request: QueuedRequest) -> Result<(), Error> {
        let payload = serde_json::to_vec(&request)
            .map_err(|e| Error::Internal(format!("Error queuing request: {e}\n")))?;
        // Wait for the stream's acknowledgement: a 202 means the request is stored.
        self.jetstream
            .publish(self.subject.clone(), payload.into())
            .await
            .map_err(|e| Error::Internal(format!("Error queuing request: {e}\n")))?
            .await
            .map_err(|e| Error::Internal(format!("Error queuing request: {e}\n")))?;
        Ok(())
    }
}

impl NatsQueue {
    /// Connects, creates the stream and consumer if missing, and starts consuming.
    pub async fn start(
        config: &AsyncSection,
        url: &str,
        ack_wait: Duration,
        worker: Arc<Worker>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Self, Error> {
        use async_nats::jetstream::{consumer, stream};
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| Error::Nats(format!("cannot connect to {url}: {e}")))?;
        let jetstream = async_nats::jetstream::new(client);
        let stream = jetstream
            .get_or_create_stream(stream::Config {
                name: config.nats_stream.clone(),
                subjects: vec![config.nats_subject.clone()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                ..stream::Config::default()
            })
            .await
            .map_err(|e| Error::Nats(format!("stream {}: {e}", config.nats_stream)))?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &config.nats_consumer,
                consumer::pull::Config {
                    durable_name: Some(config.nats_consumer.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_ack_pending: i64::try_from(config.concurrency.max(1) * 4).unwrap_or(64),
                    ..consumer::pull::Config::default()
                },
            )
            .await
            .map_err(|e| Error::Nats(format!("consumer {}: {e}", config.nats_consumer)))?;
        let concurrency = Arc::new(Semaphore::new(config.concurrency));
        let max_attempts = config.max_attempts;
        let ack_wait = ack_wait.max(Duration::from_secs(1));
        let tasks = tracker.clone();
        tracker.spawn(async move {
            let mut backoff = Backoff::default().attempts();
            'reconnect: loop {
                let messages = tokio::select! {
                    m = consumer.messages() => m,
                    () = cancel.cancelled() => break,
                };
                let mut messages = match messages {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "JetStream consumer unavailable; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(backoff.next_delay()) => continue,
                            () = cancel.cancelled() => break,
                        }
                    }
                };
                loop {
                    let permit = tokio::select! {
                        p = Arc::clone(&concurrency).acquire_owned() => match p { Ok(p) => p, Err(_) => break 'reconnect },
                        () = cancel.cancelled() => break 'reconnect,
                    };
                    let message = tokio::select! {
                        m = messages.next() => m,
                        () = cancel.cancelled() => break 'reconnect,
                    };
                    let message = match message {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "JetStream pull failed");
                            continue;
                        }
                        None => continue 'reconnect,
                    };
                    backoff.reset();
                    let worker = Arc::clone(&worker);
                    let cancel = cancel.clone();
                    tasks.spawn(async move {
                        handle_message(&worker, message, max_attempts, ack_wait, &cancel).await;
                        drop(permit);
                    });
                }
            }
        });
        Ok(Self {
            jetstream,
            subject: config.nats_subject.clone(),
        })
    }
}

async fn handle_message(
    worker: &Worker,
    message: async_nats::jetstream::Message,
    max_attempts: u32,
    ack_wait: Duration,
    cancel: &CancellationToken,
) {
    use async_nats::jetstream::AckKind;
    let request: QueuedRequest = match serde_json::from_slice(&message.payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "unreadable queued request; terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let attempt = message
        .info()
        .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX))
        .unwrap_or(1)
        .clamp(1, max_attempts);
    // An invocation longer than `ack_wait` keeps its message with in-progress acks, so a
    // short `ack_wait` (fast recovery after a crash) does not cut long functions short.
    let work = worker.attempt(&request, attempt);
    tokio::pin!(work);
    let mut keepalive = tokio::time::interval(ack_wait / 2);
    keepalive.tick().await;
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome,
            _ = keepalive.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    };
    match outcome {
        Attempt::Retry(delay) => {
            // Redelivery by the broker: a gateway that crashes now loses no retry.
            if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(error = %e, call_id = %request.call_id, "nak failed; the message comes back after ack_wait");
            }
        }
        Attempt::Done {
            status,
            headers,
            body,
            ..
        } => {
            worker
                .callback(&request, status, &headers, body, cancel)
                .await;
            if let Err(e) = message.double_ack().await {
                tracing::warn!(error = %e, call_id = %request.call_id, "ack failed; the request may run again");
            }
        }
    }
}
