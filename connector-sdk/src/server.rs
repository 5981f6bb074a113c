//! `/metrics`, `/healthz`, `/readyz` and `/drain` on `metrics_addr`.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 only when the
//! topic map has been built, the source says it is connected, and the connector is not
//! draining; otherwise 503 with the reasons, one per line. Either way the body lists,
//! one per line after the verdict, the partitions (or streams) that are stalled: holding
//! at a message that failed for good and could not be dead-lettered. A stall does not
//! make the connector unready: restarting it would not help, and the other partitions
//! still flow.
//!
//! `/drain` (GET or POST) starts the same drain as SIGTERM and answers 200 only once it
//! is over: in-flight deliveries finished (or were released at `drain_timeout`) and
//! acknowledged. It is meant for a Kubernetes `preStop` `httpGet` hook, which the kubelet
//! runs to completion before it sends SIGTERM, so the pod's grace period is spent
//! draining and SIGTERM finds nothing left to do. Anyone who can reach `metrics_addr` can
//! stop the connector this way: keep that port inside the cluster.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::SdkError;
use crate::metrics::{Metrics, encode};
use crate::topic_map::TopicMapHandle;

/// How long `/readyz` lists a topic after a message of it was last held for want of a
/// subscriber.
const UNMATCHED_SHOWN_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Readiness inputs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Health {
    topics: TopicMapHandle,
    source_ready: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    stalled: Arc<Mutex<BTreeSet<(String, String)>>>,
    metrics: Metrics,
}

impl Health {
    /// Readiness over `topics` (ready once built); the source starts not ready.
    pub fn new(topics: TopicMapHandle, metrics: Metrics) -> Self {
        Self {
            topics,
            source_ready: Arc::new(AtomicBool::new(false)),
            draining: Arc::new(AtomicBool::new(false)),
            stalled: Arc::default(),
            metrics,
        }
    }

    /// The source is connected and consuming (or not, after it lost its broker).
    pub fn set_source_ready(&self, ready: bool) {
        self.source_ready.store(ready, Ordering::SeqCst);
        self.publish();
    }

    /// The connector is shutting down: readiness fails from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.set_draining(true);
        self.publish();
    }

    /// Marks a partition (or stream; `partition` may be `""`) stalled or flowing, in
    /// `connector_partition_stalled` and in `/readyz`'s body.
    pub fn set_stalled(&self, topic: &str, partition: &str, stalled: bool) {
        self.metrics.set_stalled(topic, partition, stalled);
        let mut set = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (topic.to_owned(), partition.to_owned());
        if stalled {
            set.insert(key);
        } else {
            set.remove(&key);
        }
    }

    /// The stalled partitions, as `/readyz` lists them (`stalled: topic/partition`), then
    /// the topics whose messages were held in the last minute because no function
    /// subscribes to them (`unmatched: topic`).
    pub fn stalled(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .stalled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(topic, partition)| {
                if partition.is_empty() {
                    format!("stalled: {topic}")
                } else {
                    format!("stalled: {topic}/{partition}")
                }
            })
            .collect();
        lines.extend(
            self.metrics
                .held_unmatched_topics(UNMATCHED_SHOWN_FOR)
                .into_iter()
                .map(|topic| {
                    format!("unmatched: {topic} (messages held until a function subscribes)")
                }),
        );
        lines
    }

    /// Why the connector is not ready; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        if !self.topics.is_ready() {
            reasons.push("topic map not built yet (gateway not reached)");
        }
        if !self.source_ready.load(Ordering::SeqCst) {
            reasons.push("source not connected");
        }
        if self.draining.load(Ordering::SeqCst) {
            reasons.push("draining for shutdown");
        }
        reasons
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reasons().is_empty()
    }

    fn publish(&self) {
        self.metrics.set_ready(self.is_ready());
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    metrics: Metrics,
    health: Health,
    drain: Drain,
}

/// How `/drain` starts the drain and learns that it is over.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    /// Cancelled to start the drain (the runtime's root shutdown token).
    pub start: CancellationToken,
    /// Cancelled by the runtime once the drain is over.
    pub done: CancellationToken,
}

/// The router of the metrics and health server; tests call it without a socket.
pub fn router(registry: Arc<Registry>, metrics: Metrics, health: Health, drain: Drain) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/drain", get(drain_handler).post(drain_handler))
        .with_state(AppState {
            registry,
            metrics,
            health,
            drain,
        })
}

async fn drain_handler(State(state): State<AppState>) -> impl IntoResponse {
    if !state.drain.start.is_cancelled() {
        tracing::info!("drain requested on /drain");
        state.drain.start.cancel();
    }
    state.drain.done.cancelled().await;
    (StatusCode::OK, "drained\n")
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.before_scrape();
    state.metrics.set_ready(state.health.is_ready());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        encode(&state.registry),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let reasons = state.health.not_ready_reasons();
    let (status, mut lines) = if reasons.is_empty() {
        (StatusCode::OK, vec!["ready".to_owned()])
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            reasons.into_iter().map(str::to_owned).collect(),
        )
    };
    lines.extend(state.health.stalled());
    (status, lines.join("\n") + "\n")
}

/// Binds `addr` (fails at once if it cannot) and returns the bound address and the
/// serving future, which ends when `shutdown` is cancelled.
pub async fn bind(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>), SdkError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SdkError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| SdkError::Listen { addr, source })?;
    let serve = async move {
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "metrics server stopped");
        }
    };
    Ok((local, serve))
}
