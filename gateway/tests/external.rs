//! External provider mode: a gateway with `provider_url` forwards `/system/*` and function
//! calls to a faas-provider. Another gateway with the local provider stands in for the
//! provider here: it serves the same routes faas-provider does.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use common::{serve, start};
use faas_common::config::Secret;
use http::StatusCode;
use serde_json::json;

#[tokio::test]
async fn system_calls_and_invocations_go_to_the_provider() {
    let provider = start(|c| {
        c.gateway.basic_auth = true;
        c.gateway.username = Some("admin".into());
        c.gateway.password = Some(Secret::new("pw"));
    })
    .await;
    let (provider_addr, _stop) = serve(gateway::router(provider.state.clone())).await;
    let gw = start(|c| {
        c.gateway.provider_url = Some(format!("http://{provider_addr}/"));
        c.gateway.basic_auth = true;
        c.gateway.username = Some("admin".into());
        c.gateway.password = Some(Secret::new("pw"));
        c.gateway.upstream_timeout = Duration::from_secs(5);
    })
    .await;
    let auth = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "admin:pw")
    );
    let call = |method: &'static str, uri: &'static str, body: String| {
        let auth = auth.clone();
        let gw = &gw;
        async move {
            let request = http::Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", auth)
                .body(axum::body::Body::from(body))
                .unwrap();
            let response = gw.send(request).await;
            (response.status(), common::text(response).await)
        }
    };
    let deployment = json!({"service": "echo", "image": "i", "envProcess": "cat", "annotations": {"topic": "t"}});
    let (status, body) = call("POST", "/system/functions", deployment.to_string()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // It landed on the provider.
    let on_provider = provider.state.provider.list("openfaas-fn").await.unwrap();
    assert_eq!(on_provider.len(), 1);

    let (status, body) = call("GET", "/system/functions", String::new()).await;
    assert_eq!(status, StatusCode::OK);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["annotations"]["topic"], "t");
    let (status, body) = call("GET", "/system/function/echo.openfaas-fn", String::new()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = call("GET", "/system/function/ghost", String::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = call("GET", "/system/namespaces", String::new()).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"["openfaas-fn"]"#)
    );
    let (status, body) = call("GET", "/system/info", String::new()).await;
    assert_eq!(status, StatusCode::OK);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["provider"]["provider"], "faas-gateway-local");

    // Function calls are open and forwarded with their sub-path.
    let (status, body) = gw.call("POST", "/function/echo/sub?x=1", "through").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "through"));
    assert_eq!(gw.json_with_auth_list(&auth).await, 1.0);

    // Provider errors pass through: PUT of an unknown function stays 404.
    let unknown = json!({"service": "ghost", "image": "i", "envProcess": "cat"});
    let (status, _) = call("PUT", "/system/functions", unknown.to_string()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _) = call(
        "POST",
        "/system/secrets",
        r#"{"name":"k","value":"v"}"#.into(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, body) = call("GET", "/system/secrets", String::new()).await;
    assert_eq!(body, r#"[{"name":"k","namespace":"openfaas-fn"}]"#);
    let (status, _) = call(
        "POST",
        "/system/scale-function/echo",
        r#"{"serviceName":"echo","replicas":0}"#.into(),
    )
    .await;
    assert!(status.is_success());
    let (status, body) = call("GET", "/system/logs?name=echo&tail=5", String::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Forking fprocess."), "{body}");
    let (status, _) = call(
        "DELETE",
        "/system/functions",
        r#"{"functionName":"echo"}"#.into(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        provider
            .state
            .provider
            .list("openfaas-fn")
            .await
            .unwrap()
            .is_empty()
    );
    gw.shutdown().await;
    provider.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_provider_gives_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = start(|c| c.gateway.provider_url = Some(format!("http://{closed}"))).await;
    let (status, _) = gw.call("GET", "/system/functions", "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (status, body) = gw.call("POST", "/function/x", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::BAD_GATEWAY, ""));
    let (status, _) = gw.call("GET", "/healthz", "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    gw.shutdown().await;
}

trait ListCount {
    async fn json_with_auth_list(&self, auth: &str) -> f64;
}

impl ListCount for common::TestGateway {
    /// `invocationCount` of the first function, as the gateway (not the provider) counts it.
    async fn json_with_auth_list(&self, auth: &str) -> f64 {
        let request = http::Request::get("/system/functions")
            .header("authorization", auth)
            .body(axum::body::Body::empty())
            .unwrap();
        let body = common::text(self.send(request).await).await;
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        list[0]["invocationCount"].as_f64().unwrap()
    }
}
