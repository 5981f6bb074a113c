//! Shared test helpers: a gateway built in a temp dir, requests through the router without
//! a socket, bounded polling.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod binary;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use gateway::{AppState, Config};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub struct TestGateway {
    pub state: AppState,
    pub router: gateway::App,
    pub dir: tempfile::TempDir,
    pub work: CancellationToken,
    pub tasks: TaskTracker,
}

/// A config whose state and secrets live in `dir`.
pub fn config_in(dir: &Path) -> Config {
    let mut c = Config::default();
    c.gateway.state_dir = dir.join("state");
    c.provider.secrets_path = dir.join("secrets");
    c.provider.health_interval = Duration::from_millis(200);
    c.provider.autoscale_interval = Duration::from_millis(100);
    c.queue.backoff.initial = Duration::from_millis(20);
    c.queue.backoff.max = Duration::from_millis(200);
    c
}

pub async fn start_with(dir: tempfile::TempDir, change: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = config_in(dir.path());
    change(&mut config);
    let work = CancellationToken::new();
    let tasks = TaskTracker::new();
    let state = gateway::build_state(&config, &work, &tasks).await.unwrap();
    let router = gateway::app(state.clone());
    TestGateway {
        state,
        router,
        dir,
        work,
        tasks,
    }
}

pub async fn start(change: impl FnOnce(&mut Config)) -> TestGateway {
    start_with(tempfile::tempdir().unwrap(), change).await
}

impl TestGateway {
    pub async fn send(&self, request: Request<Body>) -> Response<Body> {
        self.router.clone().oneshot(request).await.unwrap()
    }

    pub async fn call(&self, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = self.send(request).await;
        let status = response.status();
        (status, text(response).await)
    }

    pub async fn json(&self, uri: &str) -> serde_json::Value {
        let (status, body) = self.call("GET", uri, "").await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub async fn deploy(&self, json: serde_json::Value) {
        let (status, body) = self
            .call("POST", "/system/functions", &json.to_string())
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "deploy: {body}");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a Python script into the temp dir and returns its path.
    pub fn script(&self, name: &str, text: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    pub async fn shutdown(self) -> tempfile::TempDir {
        self.work.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.state.provider.shutdown().await;
        self.dir
    }
}

pub async fn text(response: Response<Body>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small HTTP server on an ephemeral loopback port.
pub async fn serve(app: Router) -> (std::net::SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(token.cancelled_owned())
            .await
            .unwrap();
    });
    (addr, stop)
}
