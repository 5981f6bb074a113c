//! The admin API: what an operator (or the gateway's console) asks a running connector, on
//! `metrics_addr` beside `/metrics`. JSON in and out.
//!
//! Every route needs the connector's own gateway credentials, HTTP Basic: the user and
//! password it calls the gateway with (`basic_auth` with `secret_mount_path`, or
//! `gateway_username`/`gateway_password`), which the gateway's console holds too. A
//! connector without `basic_auth` has no credential to check, so its admin API is off
//! (404 on every route): `metrics_addr` is reachable by whoever scrapes it.
//!
//! - `GET /admin/status`: the connector, its source's health, and each subscription with
//!   its topics, policy, deliveries per second (over the last [`RATE_WINDOW`]), deliveries
//!   under way (attempting or waiting out a backoff), backlog and totals (delivered,
//!   retried, dead-lettered, ...).
//! - `GET /admin/dead-letters?function=&reason=&status=&since=&until=&topic=&key=&offset=&limit=`:
//!   the stored dead letters the filter selects ([`LetterFilter`]), oldest first, a page at
//!   a time ([`LetterPage`]), each with its provenance and a preview of its payload.
//! - `POST /admin/dead-letters/replay` and `POST /admin/dead-letters/purge`, a JSON body
//!   with the same filter fields and `dry_run` (count only) and `limit`: the `replay`
//!   subcommand's own code ([`Replayer`]), so a replayed letter goes through the normal
//!   delivery path and is removed only once delivered. One at a time per connector: a
//!   second while one runs answers 409.
//!
//! Dead-letter routes answer 404 for a connector without a dead-letter destination.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::config::SdkConfig;
use crate::gateway::BasicAuth;
use crate::message::DeliveryOutcome;
use crate::metrics::Metrics;
use crate::replay::{
    DeadLetterStore, LetterFilter, ReplayArgs, ReplayError, Replayer, StoreError, StoredLetter,
    parse_status_filter, parse_time,
};
use crate::server::Health;
use crate::topic_map::{FunctionRef, TopicMapHandle};
use tokio::time::Instant;

/// A store's handle, boxed: what [`BoxedStore`] hands out.
pub type AnyHandle = Box<dyn Any + Send>;

/// What a connector adds to a subscription in `/admin/status` (cron-connector: its next
/// fire times), as `details`.
pub type StatusDetails =
    Arc<dyn Fn(&crate::topic_map::Subscriber) -> Option<serde_json::Value> + Send + Sync>;

/// Opens the connector's dead-letter destination for one admin operation.
pub type StoreFactory =
    Arc<dyn Fn() -> BoxFuture<'static, Result<BoxedStore, StoreError>> + Send + Sync>;

/// Any connector's [`DeadLetterStore`] behind one type.
pub struct BoxedStore(Box<dyn ErasedStore>);

impl BoxedStore {
    /// Boxes `store`.
    pub fn new<S>(store: S) -> Self
    where
        S: DeadLetterStore + 'static,
        S::Handle: 'static,
    {
        Self(Box::new(store))
    }
}

#[async_trait::async_trait]
trait ErasedStore: Send {
    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<AnyHandle>>, StoreError>;
    async fn remove(&mut self, handle: AnyHandle) -> Result<(), StoreError>;
    async fn keep(&mut self, handle: AnyHandle) -> Result<(), StoreError>;
    async fn finish(&mut self) -> Result<(), StoreError>;
}

fn unbox<H: 'static>(handle: AnyHandle) -> Result<H, StoreError> {
    handle
        .downcast::<H>()
        .map(|h| *h)
        .map_err(|_| StoreError::new("a handle of another store"))
}

#[async_trait::async_trait]
impl<S> ErasedStore for S
where
    S: DeadLetterStore,
    S::Handle: 'static,
{
    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<AnyHandle>>, StoreError> {
        let batch = DeadLetterStore::next_batch(self).await?;
        Ok(batch
            .into_iter()
            .map(|s| StoredLetter {
                location: s.location,
                letter: s.letter,
                handle: Box::new(s.handle) as AnyHandle,
            })
            .collect())
    }
    async fn remove(&mut self, handle: AnyHandle) -> Result<(), StoreError> {
        DeadLetterStore::remove(self, unbox(handle)?).await
    }
    async fn keep(&mut self, handle: AnyHandle) -> Result<(), StoreError> {
        DeadLetterStore::keep(self, unbox(handle)?).await
    }
    async fn finish(&mut self) -> Result<(), StoreError> {
        DeadLetterStore::finish(self).await
    }
}

#[async_trait::async_trait]
impl DeadLetterStore for BoxedStore {
    type Handle = AnyHandle;
    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<AnyHandle>>, StoreError> {
        self.0.next_batch().await
    }
    async fn remove(&mut self, handle: AnyHandle) -> Result<(), StoreError> {
        self.0.remove(handle).await
    }
    async fn keep(&mut self, handle: AnyHandle) -> Result<(), StoreError> {
        self.0.keep(handle).await
    }
    async fn finish(&mut self) -> Result<(), StoreError> {
        self.0.finish().await
    }
}

/// What the admin routes read.
#[derive(Clone)]
pub struct Admin {
    pub(crate) name: String,
    pub(crate) config: Arc<SdkConfig>,
    pub(crate) credential: Option<BasicAuth>,
    pub(crate) health: Health,
    pub(crate) metrics: Metrics,
    pub(crate) topics: TopicMapHandle,
    pub(crate) store: Option<StoreFactory>,
    pub(crate) details: Option<StatusDetails>,
    /// Held while a replay or purge runs.
    pub(crate) busy: Arc<tokio::sync::Mutex<()>>,
    pub(crate) rates: Rates,
}

/// The window `/admin/status`'s deliveries per second are averaged over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Each function's delivered total, sampled every second over the last [`RATE_WINDOW`]:
/// a subscription's rate is its total now less the oldest sample's, over the time between.
#[derive(Clone, Default)]
pub(crate) struct Rates(Arc<Mutex<VecDeque<Sample>>>);

/// Each function's delivered total at one instant.
type Sample = (Instant, BTreeMap<FunctionRef, u64>);

impl Rates {
    /// Keeps `totals` as of `at`, and the samples no older than the window before it.
    fn record(&self, at: Instant, totals: BTreeMap<FunctionRef, u64>) {
        let mut samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        samples.push_back((at, totals));
        while samples
            .front()
            .is_some_and(|(then, _)| at.duration_since(*then) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// `function`'s deliveries per second up to `at`, when its total then was `total`:
    /// `None` until a sample at least a second old exists.
    fn per_second(&self, function: &FunctionRef, total: u64, at: Instant) -> Option<f64> {
        let samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (then, totals) = samples.front()?;
        let elapsed = at.duration_since(*then);
        if elapsed < Duration::from_secs(1) {
            return None;
        }
        let before = totals.get(function).copied().unwrap_or(0);
        Some(total.saturating_sub(before) as f64 / elapsed.as_secs_f64())
    }
}

/// Samples every subscriber's delivered total each second for [`Rates`], until `cancel`.
pub(crate) async fn sample_rates(
    rates: Rates,
    metrics: Metrics,
    topics: TopicMapHandle,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let totals = topics
            .current()
            .subscribers()
            .iter()
            .map(|s| {
                (
                    s.function.clone(),
                    metrics.deliveries_of(&s.function, "delivered"),
                )
            })
            .collect();
        rates.record(Instant::now(), totals);
    }
}

/// The admin routes, to merge into the connector's server.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/dead-letters/purge", post(purge))
        .with_state(admin)
}

/// An error answer: status and a JSON `{"error": ...}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    Refusal(status, message.into()).into_response()
}

/// An error answer not made yet: a status and its message.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, axum::Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

impl Admin {
    /// `None` when `headers` carry the credential; else the answer to give.
    fn refuse(&self, headers: &HeaderMap) -> Option<Response> {
        let Some(credential) = &self.credential else {
            return Some(error(
                StatusCode::NOT_FOUND,
                "the admin API is off: the connector has no credential (basic_auth)",
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .and_then(|(_, b64)| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
            })
            .and_then(|raw| String::from_utf8(raw).ok());
        let admitted = given
            .as_deref()
            .and_then(|g| g.split_once(':'))
            .is_some_and(|(user, password)| {
                // Both compared in full, so timing tells nothing about either.
                let u =
                    crate::server::constant_time_eq(user.as_bytes(), credential.user.as_bytes());
                let p = crate::server::constant_time_eq(
                    password.as_bytes(),
                    credential.password.expose().as_bytes(),
                );
                u & p
            });
        if admitted {
            return None;
        }
        tracing::warn!("admin API request refused: missing or wrong credentials");
        Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"connector admin\"")],
                axum::Json(serde_json::json!({"error": "credentials required"})),
            )
                .into_response(),
        )
    }

    /// The dead-letter destination, opened for one operation.
    async fn open(&self) -> Result<BoxedStore, Refusal> {
        let Some(factory) = &self.store else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                "this connector has no dead-letter destination configured".to_owned(),
            ));
        };
        factory().await.map_err(|e| {
            Refusal(
                StatusCode::BAD_GATEWAY,
                format!("opening the dead letters: {e}"),
            )
        })
    }
}

/// One subscription in `/admin/status`.
#[derive(Debug, serde::Serialize)]
struct SubscriptionStatus {
    function: String,
    topics: Vec<String>,
    /// The function's delivery annotations (`connector.*`, `com.openfaas.retry.*`).
    policy: BTreeMap<String, String>,
    /// Deliveries ended as delivered per second, over the last [`RATE_WINDOW`]; `null`
    /// in the connector's first second.
    delivered_per_second: Option<f64>,
    /// Messages waiting for it (see `crate::backlog`).
    backlog: u64,
    /// Deliveries ended so far, by outcome (`delivered`, `dead_lettered`, ...).
    totals: BTreeMap<&'static str, u64>,
    /// Attempts that failed and were retried.
    retried: u64,
    /// Deliveries under way and not waiting out a backoff: waiting for the function's
    /// concurrency limit, calling it, or in a batch.
    attempting: i64,
    /// Deliveries waiting out a backoff before their next attempt.
    retrying: i64,
    /// What the connector adds (cron-connector: `schedule` and `next` fire times).
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
}

async fn status(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if let Some(refused) = admin.refuse(&headers) {
        return refused;
    }
    let map = admin.topics.current();
    let backlogs = admin.metrics.backlogs().snapshot();
    let now = Instant::now();
    let subscriptions: Vec<SubscriptionStatus> = map
        .subscribers()
        .iter()
        .map(|s| {
            let (attempting, retrying) = admin.metrics.under_way_of(&s.function);
            let totals: BTreeMap<&'static str, u64> = DeliveryOutcome::NAMES
                .iter()
                .map(|outcome| (*outcome, admin.metrics.deliveries_of(&s.function, outcome)))
                .collect();
            let delivered = totals.get("delivered").copied().unwrap_or(0);
            SubscriptionStatus {
                function: s.function.to_string(),
                topics: s.topics.clone(),
                policy: s
                    .annotations
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with("connector.") || k.starts_with("com.openfaas.retry")
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                delivered_per_second: admin.rates.per_second(&s.function, delivered, now),
                backlog: backlogs.get(&s.function).copied().unwrap_or(0),
                totals,
                retried: admin.metrics.retries_of(&s.function),
                attempting,
                retrying,
                details: admin.details.as_ref().and_then(|d| d(s)),
            }
        })
        .collect();
    axum::Json(serde_json::json!({
        "connector": admin.name,
        "ready": admin.health.is_ready(),
        "not_ready": admin.health.not_ready_reasons(),
        "stalled": admin.health.stalled(),
        "inflight": admin.metrics.inflight(),
        "dead_letters": admin.store.is_some(),
        "subscriptions": subscriptions,
    }))
    .into_response()
}

/// The filter fields, as query parameters or JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterFields {
    function: Option<String>,
    reason: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    topic: Option<String>,
    key: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
    dry_run: Option<bool>,
}

impl FilterFields {
    fn filter(&self) -> Result<LetterFilter, Refusal> {
        let bad =
            |field: &str, e: String| Refusal(StatusCode::BAD_REQUEST, format!("{field}: {e}"));
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        let time = |field: &str, v: &Option<String>| {
            nonempty(v)
                .map(|t| parse_time(&t).map_err(|e| bad(field, e)))
                .transpose()
        };
        Ok(LetterFilter {
            function: nonempty(&self.function),
            reason: nonempty(&self.reason),
            status: nonempty(&self.status)
                .map(|s| parse_status_filter(&s).map_err(|e| bad("status", e)))
                .transpose()?,
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            topic: nonempty(&self.topic),
            key: nonempty(&self.key),
        })
    }
}

/// The most letters one page shows.
const PAGE_MAX: usize = 500;

async fn list(
    State(admin): State<Admin>,
    headers: HeaderMap,
    query: Result<Query<FilterFields>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = admin.refuse(&headers) {
        return refused;
    }
    let Query(fields) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let filter = match fields.filter() {
        Ok(f) => f,
        Err(answer) => return answer.into_response(),
    };
    let store = match admin.open().await {
        Ok(s) => s,
        Err(answer) => return answer.into_response(),
    };
    let limit = fields.limit.unwrap_or(50).clamp(1, PAGE_MAX);
    match crate::replay::list(store, &filter, fields.offset.unwrap_or(0), limit).await {
        Ok(page) => axum::Json(page).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

async fn replay(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Result<axum::Json<FilterFields>, axum::extract::rejection::JsonRejection>,
) -> Response {
    operate(admin, headers, body, false).await
}

async fn purge(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Result<axum::Json<FilterFields>, axum::extract::rejection::JsonRejection>,
) -> Response {
    operate(admin, headers, body, true).await
}

/// A replay or a purge of what the body's filter selects, through [`Replayer`]: its
/// summary and its output lines.
async fn operate(
    admin: Admin,
    headers: HeaderMap,
    body: Result<axum::Json<FilterFields>, axum::extract::rejection::JsonRejection>,
    purge: bool,
) -> Response {
    if let Some(refused) = admin.refuse(&headers) {
        return refused;
    }
    let axum::Json(fields) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let filter = match fields.filter() {
        Ok(f) => f,
        Err(answer) => return answer.into_response(),
    };
    let Ok(_busy) = admin.busy.try_lock() else {
        return error(
            StatusCode::CONFLICT,
            "a replay or purge is already running on this connector",
        );
    };
    let args = ReplayArgs {
        limit: fields.limit,
        dry_run: fields.dry_run.unwrap_or(false),
        purge,
        filter,
    };
    let replayer = match Replayer::new(&admin.name, &admin.config, args) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let store = match admin.open().await {
        Ok(s) => s,
        Err(answer) => return answer.into_response(),
    };
    let mut out = Vec::new();
    let result = replayer.run(store, &mut out).await;
    let lines: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_owned)
        .collect();
    match result {
        Ok(summary) => {
            tracing::info!(operation = if purge { "purge" } else { "replay" }, %summary, "admin API");
            axum::Json(serde_json::json!({"summary": summary, "output": lines})).into_response()
        }
        Err(e @ ReplayError::Read(_)) => error(StatusCode::BAD_GATEWAY, e.to_string()),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({"error": e.to_string(), "output": lines})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(n: u64) -> BTreeMap<FunctionRef, u64> {
        BTreeMap::from([(FunctionRef::new("f", None), n)])
    }

    #[test]
    fn a_rate_is_taken_over_the_window_once_a_second_has_passed() {
        let f = FunctionRef::new("f", None);
        let other = FunctionRef::new("new", None);
        let rates = Rates::default();
        let start = Instant::now();
        assert_eq!(rates.per_second(&f, 0, start), None, "no sample yet");
        rates.record(start, totals(0));
        let half = start + Duration::from_millis(500);
        assert_eq!(rates.per_second(&f, 10, half), None, "under a second");
        // One sample a second: 50 deliveries a second.
        for s in 1..=20 {
            rates.record(start + Duration::from_secs(s), totals(50 * s));
        }
        let now = start + Duration::from_secs(20);
        // The oldest kept sample is the window's start, 10 s before the last.
        assert_eq!(rates.per_second(&f, 1000, now), Some(50.0));
        // A function subscribed since then counts from zero.
        assert_eq!(rates.per_second(&other, 30, now), Some(3.0));
        // A total that went down (a restarted counter) is no negative rate.
        assert_eq!(rates.per_second(&f, 0, now), Some(0.0));
    }
}
