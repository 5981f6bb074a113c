//! Batches (a function's `connector.batch.size`): the function is invoked with several
//! messages at once, as a CloudEvents JSON batch, and answers for each.
//!
//! Each message's delivery to the function runs its attempts as usual; only the
//! invocation of an attempt is shared: the attempt joins the function's open batch and
//! waits for its item's result. A batch is sent when it holds `size` messages or
//! `max_bytes` of payload, or `window` after its first message joined. The request body
//! is a JSON array of structured-mode CloudEvents (`application/cloudevents-batch+json`):
//! `specversion`, `id`, `source`, `type`, `time`, `subject` when set, `topic`,
//! `datacontenttype` when known, `data` (a JSON body as JSON, other text as a string)
//! or `data_base64`, and `traceparent`/`tracestate` (CloudEvents' distributed tracing
//! extension) when the item's delivery is traced or the message arrived with a trace
//! context. The request's own `traceparent` continues the first such item's trace.
//!
//! The response decides per item, as Lambda's `ReportBatchItemFailures` does:
//! - a 2xx without a failure list: every item is delivered;
//! - a 2xx whose body is `{"batchItemFailures": [{"itemIdentifier": "<ce id>"}, ...]}`:
//!   those items failed (retryable) and the rest are delivered. A list that cannot be
//!   read, or names an id that is not in the batch, fails every item: the connector
//!   cannot tell which were handled, and retrying loses nothing;
//! - any other status, or no response: every item gets that verdict.
//!
//! A failed item is retried after its backoff, in whatever batch is open then (so a
//! batch with failures comes back smaller), and dead-lettered alone after its attempts.
//! Acknowledgement stays per message.
//!
//! Bounds. A batch is one invocation: it takes one of the connector's in-flight places
//! (`max_inflight`) and one of the function's own (`connector.max_inflight`) while it is
//! sent, so `max_inflight` counts invocations, as for other functions, not messages. The
//! messages are bounded by the batcher's places: a delivery takes one before it joins
//! and keeps it until it is terminal (retries included), and there are as many as fill
//! a batch in every running place and one more batch filling (`(limit + 1) x size`).
//! A message whose deliveries all have their places leaves its worker (see
//! `completion.rs`), so a worker is not held for a batch's window; when the places are
//! taken, the worker waits, the hand-off queue fills and the source stops pulling.
//! With key ordering a key has one message in flight per function, so a batch holds at
//! most one message per key and order holds within and across batches.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::function::FunctionRef;
use crate::gateway::{GatewayClient, InvokeError};
use crate::limiter::Limiter;
use crate::message::{InvocationResponse, Message};
use crate::metrics::{Metrics, status_class};
use crate::policy::BatchSettings;

/// What a batch's invocation came to for one of its items.
pub(super) enum ItemResult {
    /// The batch's response; `failed` when it lists this item in `batchItemFailures`.
    Response {
        response: Arc<InvocationResponse>,
        failed: bool,
    },
    /// No response: the transport error.
    Error(String),
    /// Not sent: the dispatcher is draining.
    Released,
}

/// A message waiting in a batch for its result.
struct Item {
    message: Arc<Message>,
    attempt: u32,
    /// The attempt's trace context (its span's, or the incoming one when traces are
    /// off), as `traceparent`/`tracestate`: the item's event carries it.
    trace: Option<http::HeaderMap>,
    done: oneshot::Sender<ItemResult>,
}

/// The open batch.
#[derive(Default)]
struct Open {
    items: Vec<Item>,
    bytes: usize,
    /// Counts the batches opened, so a window's timer sends only its own.
    generation: u64,
}

/// A function's batches.
pub(super) struct Batcher {
    function: FunctionRef,
    settings: BatchSettings,
    timeout: Option<Duration>,
    gateway: GatewayClient,
    metrics: Metrics,
    default_type: String,
    open: Mutex<Open>,
    /// The connector's in-flight places: a batch takes one while it is sent.
    permits: Arc<Semaphore>,
    /// The function's own concurrency limit, if it has one: a batch takes one place.
    limiter: Option<Arc<Limiter>>,
    /// The messages' places: taken by a delivery before it joins, until it is terminal.
    places: Arc<Semaphore>,
}

/// What a batcher is made of besides its function and settings.
pub(super) struct Bounds {
    /// The connector's in-flight places.
    pub(super) permits: Arc<Semaphore>,
    /// The function's limiter, if it has one.
    pub(super) limiter: Option<Arc<Limiter>>,
    /// How many batches may be sent at once (the function's limit, else the
    /// connector's `max_inflight`).
    pub(super) running: usize,
}

impl Batcher {
    pub(super) fn new(
        function: FunctionRef,
        settings: BatchSettings,
        timeout: Option<Duration>,
        gateway: GatewayClient,
        metrics: Metrics,
        bounds: Bounds,
    ) -> Arc<Self> {
        let places = bounds
            .running
            .saturating_add(1)
            .saturating_mul(settings.size)
            .min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            permits: bounds.permits,
            limiter: bounds.limiter,
            places: Arc::new(Semaphore::new(places)),
            default_type: gateway.default_event_type().to_owned(),
            function,
            settings,
            timeout,
            gateway,
            metrics,
            open: Mutex::default(),
        })
    }

    /// Whether this batcher sends with `settings`, `timeout` and `limiter` (else it is
    /// replaced).
    pub(super) fn fits(
        &self,
        settings: BatchSettings,
        timeout: Option<Duration>,
        limiter: Option<&Arc<Limiter>>,
    ) -> bool {
        let same_limiter = match (&self.limiter, limiter) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.settings == settings && self.timeout == timeout && same_limiter
    }

    /// Waits for a message's place among the batcher's (`None` would mean its places
    /// were closed, which they never are). Cancel-safe.
    pub(super) async fn place(&self) -> Option<OwnedSemaphorePermit> {
        self.places.clone().acquire_owned().await.ok()
    }

    /// Adds `message` to the open batch and waits for its result. A batch that is full
    /// with it is sent at once; the first message of a batch starts its window.
    pub(super) async fn join(
        self: &Arc<Self>,
        message: &Arc<Message>,
        attempt: u32,
        trace: Option<&opentelemetry::Context>,
    ) -> ItemResult {
        let (tx, rx) = oneshot::channel();
        let item = Item {
            message: message.clone(),
            attempt,
            trace: trace.map(|cx| {
                let mut headers = http::HeaderMap::new();
                faas_common::otel::inject(cx, &mut headers);
                headers
            }),
            done: tx,
        };
        let size = message.payload.len();
        let (full, window) = {
            let Ok(mut open) = self.open.lock() else {
                return ItemResult::Error("the batch's lock was poisoned".to_owned());
            };
            // A message that would take the batch over its byte cap closes it first.
            let spill = (!open.items.is_empty()
                && open.bytes.saturating_add(size) > self.settings.max_bytes)
                .then(|| take(&mut open));
            open.items.push(item);
            open.bytes = open.bytes.saturating_add(size);
            let window = (open.items.len() == 1).then_some(open.generation);
            let full =
                open.items.len() >= self.settings.size || open.bytes >= self.settings.max_bytes;
            let full = full.then(|| take(&mut open));
            (spill.into_iter().chain(full).collect::<Vec<_>>(), window)
        };
        for batch in full {
            self.send(batch);
        }
        if let Some(generation) = window {
            let batcher = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(batcher.settings.window).await;
                batcher.window_closed(generation);
            });
        }
        rx.await
            .unwrap_or_else(|_| ItemResult::Error("the batch was dropped".to_owned()))
    }

    /// Sends the batch opened as `generation` if it is still open.
    fn window_closed(self: &Arc<Self>, generation: u64) {
        let batch = match self.open.lock() {
            Ok(mut open) if open.generation == generation && !open.items.is_empty() => {
                take(&mut open)
            }
            _ => return,
        };
        self.send(batch);
    }

    /// Invokes the function with `items` on a task of its own, once the batch has an
    /// in-flight place (and one under the function's limit), and hands each its result.
    /// Items of a batch that cannot be sent because the dispatcher drains are released.
    fn send(self: &Arc<Self>, items: Vec<Item>) {
        let batcher = self.clone();
        tokio::spawn(async move {
            let running = match &batcher.limiter {
                Some(l) => Some(l.run().await),
                None => None,
            };
            // Closed by `drain`.
            let Ok(permit) = batcher.permits.clone().acquire_owned().await else {
                for item in items {
                    let _ = item.done.send(ItemResult::Released);
                }
                return;
            };
            batcher.invoke(items).await;
            drop(permit);
            drop(running);
        });
    }

    async fn invoke(&self, items: Vec<Item>) {
        let body = match self.body(&items) {
            Ok(body) => body,
            Err(e) => {
                let error = format!("encoding the batch: {e}");
                for item in items {
                    let _ = item.done.send(ItemResult::Error(error.clone()));
                }
                return;
            }
        };
        let first_topic = items.first().map(|i| i.message.topic.as_str());
        let topic = first_topic.filter(|t| items.iter().all(|i| i.message.topic == *t));
        let attempt = items.iter().map(|i| i.attempt).max().unwrap_or(1);
        // The request continues the first traced item's trace; each event carries its own.
        let trace = items.iter().find_map(|i| i.trace.as_ref());
        let started = Instant::now();
        let result = self
            .gateway
            .invoke_batch(&self.function, topic, body, attempt, self.timeout, trace)
            .await;
        let took = started.elapsed();
        match result {
            Ok(response) => {
                self.metrics
                    .invoked(&self.function, status_class(response.status), took);
                if let Some(l) = &self.limiter {
                    if response.status == http::StatusCode::TOO_MANY_REQUESTS {
                        l.throttled();
                    } else if response.status.is_success() {
                        l.succeeded();
                    }
                }
                let failed = failed_items(&response, &items);
                let response = Arc::new(response);
                for item in items {
                    let failed = failed
                        .as_ref()
                        .is_none_or(|ids| ids.contains(&item.message.id));
                    let _ = item.done.send(ItemResult::Response {
                        response: response.clone(),
                        failed: failed && response.status.is_success(),
                    });
                }
            }
            Err(e) => {
                let class = match e {
                    InvokeError::Timeout(_) => "timeout",
                    InvokeError::Transport(_) => "error",
                };
                self.metrics.invoked(&self.function, class, took);
                let error = e.to_string();
                for item in items {
                    let _ = item.done.send(ItemResult::Error(error.clone()));
                }
            }
        }
    }

    /// The CloudEvents JSON batch of `items`.
    fn body(&self, items: &[Item]) -> Result<Bytes, serde_json::Error> {
        let events: Vec<Event<'_>> = items
            .iter()
            .map(|i| {
                let mut event = Event::of(&i.message, &self.default_type);
                if let Some(trace) = &i.trace {
                    let text = |name: &http::HeaderName| trace.get(name)?.to_str().ok();
                    event.traceparent = text(&faas_common::otel::TRACEPARENT);
                    event.tracestate = text(&faas_common::otel::TRACESTATE);
                }
                event
            })
            .collect();
        serde_json::to_vec(&events).map(Bytes::from)
    }
}

/// Takes the open batch, opening the next one.
fn take(open: &mut Open) -> Vec<Item> {
    open.bytes = 0;
    open.generation += 1;
    std::mem::take(&mut open.items)
}

/// The ids a 2xx response reports failed: empty when it reports none, `None` when
/// every item must count as failed (a failure list that cannot be read, or that names
/// an item not in the batch).
fn failed_items(response: &InvocationResponse, items: &[Item]) -> Option<HashSet<String>> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Report {
        #[serde(default)]
        batch_item_failures: Option<Vec<Failure>>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Failure {
        item_identifier: String,
    }
    let body = response.body.as_ref();
    // Not an object (empty, `OK`, a list): no failure list.
    if !response.status.is_success()
        || body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
    {
        return Some(HashSet::new());
    }
    let failures = serde_json::from_slice::<Report>(body)
        .ok()?
        .batch_item_failures
        .unwrap_or_default();
    let failed: HashSet<String> = failures.into_iter().map(|f| f.item_identifier).collect();
    failed
        .iter()
        .all(|id| items.iter().any(|i| i.message.id == *id))
        .then_some(failed)
}

/// One item of a CloudEvents JSON batch.
#[derive(serde::Serialize)]
struct Event<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    topic: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
    /// The distributed tracing extension: the item's trace context.
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Data<'a> {
    Json(&'a serde_json::value::RawValue),
    Text(&'a str),
}

impl<'a> Event<'a> {
    fn of(message: &'a Message, default_type: &'a str) -> Self {
        let content_type = message.content_type.as_ref().and_then(|c| c.to_str().ok());
        let text_declared = content_type
            .is_some_and(|c| c.get(..5).is_some_and(|t| t.eq_ignore_ascii_case("text/")));
        let payload: &'a [u8] = &message.payload;
        let json = message
            .may_be_json()
            .then(|| serde_json::from_slice::<&serde_json::value::RawValue>(payload).ok())
            .flatten();
        let (data, data_base64) = match json {
            Some(raw) => (Some(Data::Json(raw)), None),
            None => match std::str::from_utf8(payload) {
                Ok(text) if text_declared || content_type.is_none() => {
                    (Some(Data::Text(text)), None)
                }
                _ => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(payload)),
                ),
            },
        };
        let time = message.time.unwrap_or_else(SystemTime::now);
        Self {
            specversion: "1.0",
            id: &message.id,
            source: &message.source,
            event_type: message.event_type_or(default_type),
            time: humantime::format_rfc3339_millis(time).to_string(),
            subject: message.subject.as_deref(),
            topic: &message.topic,
            datacontenttype: content_type.or(json.map(|_| "application/json")),
            data,
            data_base64,
            traceparent: None,
            tracestate: None,
        }
    }
}
