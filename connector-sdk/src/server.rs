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
//! `/drain` stops the connector over HTTP, so it needs a credential and is off unless one
//! is configured ([`DrainToken`]): without a drain token it answers 404 to everything;
//! with one, only `POST` with `Authorization: Bearer <token>` starts the same drain as
//! SIGTERM (any other method: 405; a missing or wrong token: 401), and it answers 200 only
//! once the drain is over: in-flight deliveries finished (or were released at
//! `drain_timeout`) and acknowledged. `metrics_addr` is reachable by whoever scrapes it;
//! an unauthenticated way to stop the connector there would be anyone's. SIGTERM and
//! SIGINT drain with or without a token.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{SdkConfig, Secret};
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
    /// The bearer token a `POST /drain` must carry; `None` turns `/drain` off.
    pub token: Option<DrainToken>,
}

/// The credential of `/drain`. Never printed.
#[derive(Clone, Debug)]
pub struct DrainToken(Secret);

/// The file in `secret_mount_path` a drain token is read from.
pub const DRAIN_TOKEN_FILE: &str = "drain-token";

impl DrainToken {
    /// A token; its surrounding whitespace is not part of it.
    pub fn new(token: &str) -> Self {
        Self(Secret::new(token.trim()))
    }

    /// The token `config` asks for: `drain_token` if set, else the file
    /// [`DRAIN_TOKEN_FILE`] in `secret_mount_path` (trimmed, as the basic-auth files are)
    /// if it exists, else none. A file that exists but cannot be read, or is empty, is an
    /// error: the operator meant to set a token.
    pub fn from_config(config: &SdkConfig) -> Result<Option<Self>, SdkError> {
        if let Some(token) = &config.drain_token {
            return Ok(Some(Self::new(token.expose())));
        }
        let path = config.secret_mount_path.join(DRAIN_TOKEN_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SdkError::DrainTokenFile { path, source }),
        };
        if text.trim().is_empty() {
            return Err(SdkError::DrainTokenEmpty { path });
        }
        Ok(Some(Self::new(&text)))
    }

    /// Whether `headers` carry `Authorization: Bearer <this token>`. The comparison takes
    /// the same time wherever the first difference is, so timing does not reveal a prefix.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
        else {
            return false;
        };
        constant_time_eq(given.as_bytes(), self.0.expose().as_bytes())
    }
}

/// `a == b`, in a time that depends on their lengths only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The router of the metrics and health server; tests call it without a socket.
pub fn router(registry: Arc<Registry>, metrics: Metrics, health: Health, drain: Drain) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/drain", any(drain_handler))
        .with_state(AppState {
            registry,
            metrics,
            health,
            drain,
        })
}

async fn drain_handler(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let Some(token) = &state.drain.token else {
        return (
            StatusCode::NOT_FOUND,
            "/drain is off: no drain token is configured (connector.drain_token, or the file drain-token in secret_mount_path); SIGTERM drains\n",
        )
            .into_response();
    };
    if method != Method::POST {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "POST")],
            "POST /drain with Authorization: Bearer <drain token>\n",
        )
            .into_response();
    }
    if !token.admits(&headers) {
        // The credential itself is never logged.
        tracing::warn!("/drain refused: missing or wrong bearer token");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"drain\"")],
            "Authorization: Bearer <drain token> required\n",
        )
            .into_response();
    }
    if !state.drain.start.is_cancelled() {
        tracing::info!("drain requested on /drain");
        state.drain.start.cancel();
    }
    state.drain.done.cancelled().await;
    (StatusCode::OK, "drained\n").into_response()
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn authorization(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let token = DrainToken::new(" s3cret\n");
        assert!(token.admits(&authorization("Bearer s3cret")));
        assert!(token.admits(&authorization("bearer s3cret")));
        for refused in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Bearer S3CRET",
            "Bearer ",
            "Bearer",
            "s3cret",
            "Basic czNjcmV0Og==",
            "Token s3cret",
        ] {
            assert!(!token.admits(&authorization(refused)), "{refused}");
        }
        assert!(!token.admits(&HeaderMap::new()));
    }

    #[test]
    fn the_token_comes_from_config_else_from_secret_mount_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SdkConfig {
            secret_mount_path: dir.path().to_owned(),
            ..SdkConfig::default()
        };
        assert!(DrainToken::from_config(&config).unwrap().is_none());
        std::fs::write(dir.path().join(DRAIN_TOKEN_FILE), "from-file\n").unwrap();
        let token = DrainToken::from_config(&config).unwrap().unwrap();
        assert!(token.admits(&authorization("Bearer from-file")));
        config.drain_token = Some(Secret::new("from-config"));
        let token = DrainToken::from_config(&config).unwrap().unwrap();
        assert!(token.admits(&authorization("Bearer from-config")));
        assert!(!token.admits(&authorization("Bearer from-file")));
        assert_eq!(format!("{token:?}"), "DrainToken(***)");
        config.drain_token = None;
        std::fs::write(dir.path().join(DRAIN_TOKEN_FILE), "  ").unwrap();
        let err = DrainToken::from_config(&config).unwrap_err();
        assert!(matches!(err, SdkError::DrainTokenEmpty { .. }), "{err}");
    }
}
