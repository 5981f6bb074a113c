//! `/async-function/*` with the embedded queue: 202 and `X-Call-Id`, retries by the
//! verdict rules, and the callback with OpenFaaS's headers to a real HTTP receiver.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::routing::post;
use common::{serve, start};
use http::{Request, StatusCode};
use serde_json::json;
use tokio::sync::mpsc;

/// A function that answers `fail_first` times with `fail_status`, then 200 with the body
/// in upper case; it counts attempts.
async fn flaky_function(
    fail_first: usize,
    fail_status: u16,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&attempts);
    let app = Router::new().fallback(post(move |headers: HeaderMap, body: Bytes| {
        let seen = Arc::clone(&seen);
        async move {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            assert_eq!(headers["x-delivery-attempt"], n.to_string().as_str());
            if n <= fail_first {
                (
                    StatusCode::from_u16(fail_status).unwrap(),
                    "not yet".to_owned(),
                )
            } else {
                (
                    StatusCode::OK,
                    String::from_utf8_lossy(&body).to_uppercase(),
                )
            }
        }
    }));
    (serve(app).await.0, attempts)
}

type Callback = (HeaderMap, Bytes);

async fn callback_receiver() -> (String, mpsc::UnboundedReceiver<Callback>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/done",
        post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((headers, body));
                StatusCode::OK
            }
        }),
    );
    let (addr, _) = serve(app).await;
    (format!("http://{addr}/done"), rx)
}

async fn enqueue(gw: &common::TestGateway, uri: &str, body: &str, callback: &str) -> String {
    let response = gw
        .send(
            Request::post(uri)
                .header("x-callback-url", callback)
                .body(Body::from(body.to_owned()))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    response.headers()["x-call-id"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn retries_on_503_then_calls_back_with_the_result() {
    let (function, attempts) = flaky_function(2, 503).await;
    let (callback, mut received) = callback_receiver().await;
    let gw = start(|_| {}).await;
    gw.deploy(json!({
        "service": "flaky", "image": "i",
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{function}")}
    }))
    .await;
    let call_id = enqueue(&gw, "/async-function/flaky.openfaas-fn", "hello", &callback).await;
    let (headers, body) = tokio::time::timeout(Duration::from_secs(20), received.recv())
        .await
        .expect("callback within 20s")
        .unwrap();
    assert_eq!(body, "HELLO");
    assert_eq!(headers["x-call-id"], call_id.as_str());
    assert_eq!(headers["x-function-status"], "200");
    assert_eq!(headers["x-function-name"], "flaky.openfaas-fn");
    assert!(
        headers["x-duration-seconds"]
            .to_str()
            .unwrap()
            .parse::<f64>()
            .is_ok()
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    // The queued attempts went through the sync path, so the metrics count them.
    assert_eq!(
        gw.json("/system/functions").await[0]["invocationCount"],
        3.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_4xx_is_dead_lettered_at_once_and_reported_to_the_callback() {
    let (function, attempts) = flaky_function(100, 400).await;
    let (callback, mut received) = callback_receiver().await;
    let gw = start(|_| {}).await;
    gw.deploy(json!({
        "service": "picky", "image": "i",
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{function}")}
    }))
    .await;
    enqueue(&gw, "/async-function/picky/sub", "x", &callback).await;
    let (headers, body) = tokio::time::timeout(Duration::from_secs(20), received.recv())
        .await
        .expect("callback within 20s")
        .unwrap();
    assert_eq!(headers["x-function-status"], "400");
    assert_eq!(body, "not yet");
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "no retry on 400");
    gw.shutdown().await;
}

#[tokio::test]
async fn retries_stop_after_max_attempts() {
    let (function, attempts) = flaky_function(100, 500).await;
    let (callback, mut received) = callback_receiver().await;
    let gw = start(|c| c.queue.max_attempts = 3).await;
    gw.deploy(json!({
        "service": "down", "image": "i",
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{function}")}
    }))
    .await;
    enqueue(&gw, "/async-function/down", "x", &callback).await;
    let (headers, _) = tokio::time::timeout(Duration::from_secs(20), received.recv())
        .await
        .expect("callback within 20s")
        .unwrap();
    assert_eq!(headers["x-function-status"], "500");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn async_refuses_bad_requests() {
    let gw = start(|_| {}).await;
    gw.deploy(json!({"service": "echo", "image": "i", "envProcess": "cat"}))
        .await;
    let (status, _) = gw.call("GET", "/async-function/echo", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = gw.call("POST", "/async-function/ghost", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = gw
        .send(
            Request::post("/async-function/echo")
                .header("x-callback-url", "not a url")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Without a callback it is still accepted and run.
    let (status, _) = gw
        .call("POST", "/async-function/echo", "fire and forget")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    common::wait_for(Duration::from_secs(10), "the queued invocation", || async {
        let list = gw.json("/system/functions").await;
        (list[0]["invocationCount"] == 1.0).then_some(())
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn the_queue_reports_the_requests_it_holds_until_they_finish() {
    use tower::ServiceExt;
    // A function that holds every request until the test lets them go.
    let (release, released) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&arrived);
    let app = Router::new().fallback(post(move || {
        let mut released = released.clone();
        let count = Arc::clone(&count);
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = released.wait_for(|r| *r).await;
            StatusCode::OK
        }
    }));
    let (function, _) = serve(app).await;
    let gw = start(|_| {}).await;
    gw.deploy(json!({
        "service": "held", "image": "i",
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{function}")}
    }))
    .await;
    let held = || async {
        let response = gateway::metrics_router(gw.state.clone())
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| {
                l.strip_prefix("gateway_async_queue_requests ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap()
    };
    assert_eq!(held().await, 0);
    for _ in 0..2 {
        let (status, _) = gw.call("POST", "/async-function/held", "x").await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    common::wait_for(Duration::from_secs(10), "both requests running", || async {
        (arrived.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    assert_eq!(held().await, 2);
    release.send_replace(true);
    common::wait_for(
        Duration::from_secs(10),
        "the requests to finish",
        || async { (held().await == 0).then_some(()) },
    )
    .await;
    gw.shutdown().await;
}
