//! Bodies are streamed through the gateway, not buffered whole.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::{get, post};
use common::{serve, start, text};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::Notify;

#[tokio::test]
async fn a_streamed_response_arrives_before_the_function_has_finished() {
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let upstream = Router::new()
        .route(
            "/events",
            get(move || {
                let gate = Arc::clone(&gate);
                async move {
                    let stream = futures::stream::unfold(0, move |step| {
                        let gate = Arc::clone(&gate);
                        async move {
                            match step {
                                0 => Some((
                                    Ok::<_, std::io::Error>(Bytes::from("data: first\n\n")),
                                    1,
                                )),
                                1 => {
                                    gate.notified().await;
                                    Some((Ok(Bytes::from("data: second\n\n")), 2))
                                }
                                _ => None,
                            }
                        }
                    });
                    (
                        [("content-type", "text/event-stream")],
                        Body::from_stream(stream),
                    )
                }
            }),
        )
        .route(
            "/upload",
            post(|body: Bytes| async move { format!("{}", body.len()) }),
        )
        .layer(axum::extract::DefaultBodyLimit::disable());
    let (addr, _stop) = serve(upstream).await;
    let gw = start(|_| {}).await;
    gw.deploy(json!({
        "service": "sse", "image": "i",
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{addr}")}
    }))
    .await;
    let response = gw
        .send(
            Request::get("/function/sse/events")
                .header("accept", "text/event-stream")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event arrives while the function still runs")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: first\n\n");
    release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: second\n\n");

    // A large request body goes through in chunks.
    let chunks = futures::stream::iter(
        (0..64).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 128 * 1024]))),
    );
    let response = gw
        .send(
            Request::post("/function/sse/upload")
                .body(Body::from_stream(chunks))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, (64 * 128 * 1024).to_string());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_streamed_body_past_max_body_bytes_gets_413_and_one_within_it_goes_through() {
    let upstream = Router::new()
        .route(
            "/upload",
            post(|body: Bytes| async move { format!("{}", body.len()) }),
        )
        .layer(axum::extract::DefaultBodyLimit::disable());
    let (addr, _stop) = serve(upstream).await;
    let gw = start(|c| c.gateway.max_body_bytes = 256 * 1024).await;
    gw.deploy(json!({
        "service": "up", "image": "i",
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{addr}")}
    }))
    .await;
    // No Content-Length: the gateway counts the bytes on their way through.
    let chunked = |chunks: usize| {
        Body::from_stream(futures::stream::iter(
            (0..chunks).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 64 * 1024]))),
        ))
    };
    let response = gw
        .send(
            Request::post("/function/up/upload")
                .body(chunked(4))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, (4 * 64 * 1024).to_string());
    let response = gw
        .send(
            Request::post("/function/up/upload")
                .body(chunked(5))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        response.headers().contains_key("x-call-id"),
        "a refused request still has its call id"
    );
    gw.shutdown().await;
}
