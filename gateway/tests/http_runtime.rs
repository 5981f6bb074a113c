//! The `http` runtime: replicas that pass readiness, requests spread over them, scale to
//! zero and from zero, autoscaling between min and max.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{TestGateway, start, wait_for};
use http::StatusCode;
use serde_json::{Value, json};

const ECHO_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../config/functions/echo_server.py"
);

fn http_function(name: &str, labels: Value) -> Value {
    json!({
        "service": name,
        "image": "local/echo-server",
        "envProcess": format!("python3 {ECHO_SERVER}"),
        "labels": labels,
        "annotations": {"faas-gateway.runtime": "http"}
    })
}

async fn replicas(gw: &TestGateway, name: &str) -> (u64, u64) {
    let s = gw.json(&format!("/system/function/{name}")).await;
    (
        s["replicas"].as_u64().unwrap(),
        s["availableReplicas"].as_u64().unwrap(),
    )
}

async fn wait_replicas(gw: &TestGateway, name: &str, want: (u64, u64), limit: Duration) {
    wait_for(limit, &format!("{name} at {want:?}"), || async {
        (replicas(gw, name).await == want).then_some(())
    })
    .await;
}

async fn pid_of(gw: &TestGateway, uri: &str) -> u64 {
    let (status, body) = gw.call("POST", uri, "x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["pid"].as_u64().unwrap()
}

#[tokio::test]
async fn replicas_become_ready_and_share_requests() {
    let gw = start(|_| {}).await;
    gw.deploy(http_function(
        "echo",
        json!({"com.openfaas.scale.min": "2", "com.openfaas.scale.max": "2"}),
    ))
    .await;
    wait_replicas(&gw, "echo", (2, 2), Duration::from_secs(20)).await;
    let status = gw.json("/system/function/echo?usage=1").await;
    assert!(
        status["usage"]["totalMemoryBytes"].as_f64().unwrap() > 1_000_000.0,
        "{status}"
    );
    let mut pids = BTreeSet::new();
    for _ in 0..8 {
        pids.insert(pid_of(&gw, "/function/echo/path?q=1").await);
    }
    assert_eq!(
        pids.len(),
        2,
        "requests spread over both replicas: {pids:?}"
    );
    let (status, body) = gw
        .call("GET", "/function/echo.openfaas-fn/a/b?x=y", "")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["path"].as_str(), v["query"].as_str()),
        (Some("/a/b"), Some("x=y"))
    );
    assert!(v["call_id"].is_string());
    let logs = gw.call("GET", "/system/logs?name=echo", "").await.1;
    assert!(logs.contains("listening on 127.0.0.1"), "{logs}");
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_function_scales_to_zero_and_the_next_request_brings_it_back() {
    let gw = start(|_| {}).await;
    gw.deploy(http_function(
        "sleepy",
        json!({"com.openfaas.scale.zero": "true", "com.openfaas.scale.zero-duration": "1s"}),
    ))
    .await;
    wait_replicas(&gw, "sleepy", (1, 1), Duration::from_secs(20)).await;
    pid_of(&gw, "/function/sleepy").await;
    wait_replicas(&gw, "sleepy", (0, 0), Duration::from_secs(20)).await;
    // The first request after zero waits for a ready replica and succeeds.
    pid_of(&gw, "/function/sleepy").await;
    assert_eq!(replicas(&gw, "sleepy").await, (1, 1));
    gw.shutdown().await;
}

#[tokio::test]
async fn scale_api_accepts_zero_and_requests_scale_back_from_it() {
    let gw = start(|_| {}).await;
    gw.deploy(http_function("manual", json!({}))).await;
    wait_replicas(&gw, "manual", (1, 1), Duration::from_secs(20)).await;
    let (status, body) = gw
        .call(
            "POST",
            "/system/scale-function/manual?namespace=openfaas-fn",
            r#"{"serviceName":"manual","replicas":0}"#,
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
    wait_replicas(&gw, "manual", (0, 0), Duration::from_secs(20)).await;
    let list = gw.json("/system/functions").await;
    assert_eq!(list[0]["replicas"], 0);
    pid_of(&gw, "/function/manual.openfaas-fn").await;
    assert_eq!(replicas(&gw, "manual").await, (1, 1));
    gw.shutdown().await;
}

#[tokio::test]
async fn autoscaler_adds_replicas_under_load_and_removes_them_after() {
    let gw = start(|c| c.provider.scale_down_after = Duration::from_millis(500)).await;
    gw.deploy(http_function(
        "busy",
        json!({"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "3", "com.openfaas.scale.target": "1"}),
    ))
    .await;
    wait_replicas(&gw, "busy", (1, 1), Duration::from_secs(20)).await;
    // Keep three slow requests in flight until the autoscaler has reacted.
    let load = {
        let router = gw.router.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            let one = |router: gateway::App| async move {
                use tower::ServiceExt;
                let request = http::Request::post("/function/busy?sleep=0.3")
                    .body(axum::body::Body::empty())
                    .unwrap();
                let _ = router.oneshot(request).await;
            };
            while !token.is_cancelled() {
                tokio::join!(
                    one(router.clone()),
                    one(router.clone()),
                    one(router.clone())
                );
            }
        });
        (stop, handle)
    };
    wait_for(Duration::from_secs(20), "scale up", || async {
        let (desired, available) = replicas(&gw, "busy").await;
        (desired >= 2 && available >= 2).then_some(())
    })
    .await;
    load.0.cancel();
    load.1.await.unwrap();
    wait_replicas(&gw, "busy", (1, 1), Duration::from_secs(20)).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_function_that_never_becomes_ready_gets_504_and_others_keep_working() {
    let gw = start(|c| c.provider.ready_timeout = Duration::from_millis(800)).await;
    let script = gw.script(
        "unhealthy.py",
        "import os\nfrom http.server import BaseHTTPRequestHandler, HTTPServer\nclass H(BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(503)\n        self.end_headers()\nHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n",
    );
    gw.deploy(json!({
        "service": "broken", "image": "i",
        "envProcess": format!("python3 {script}"),
        "annotations": {"faas-gateway.runtime": "http"}
    }))
    .await;
    gw.deploy(json!({"service": "echo", "image": "i", "envProcess": "cat"}))
        .await;
    let (status, body) = gw.call("POST", "/function/broken", "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(body.contains("did not become ready"), "{body}");
    let (status, body) = gw.call("POST", "/function/echo", "ok").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(replicas(&gw, "broken").await.1, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_crashed_replica_is_replaced() {
    let gw = start(|_| {}).await;
    gw.deploy(http_function("crashy", json!({}))).await;
    wait_replicas(&gw, "crashy", (1, 1), Duration::from_secs(20)).await;
    let pid = pid_of(&gw, "/function/crashy").await;
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let new_pid = wait_for(Duration::from_secs(20), "a new replica", || async {
        let (status, body) = gw.call("POST", "/function/crashy", "").await;
        if status != StatusCode::OK {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["pid"].as_u64().filter(|p| *p != pid)
    })
    .await;
    assert_ne!(new_pid, pid);
    gw.shutdown().await;
}
