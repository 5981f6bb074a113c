//! The OpenFaaS API through the router (no socket): routes, shapes, auth, bad input,
//! persistence, and the `process` and `url` runtimes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::any;
use base64::Engine;
use common::{start, start_with, text};
use http::{HeaderMap, Request, StatusCode};
use serde_json::json;

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn system_routes_need_basic_auth_with_openfaas_realm_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("auth");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(secrets.join("basic-auth-password"), "s3cret\n").unwrap();
    let gw = start_with(dir, |c| {
        c.gateway.basic_auth = true;
        c.gateway.secret_mount_path = secrets.clone();
    })
    .await;
    for uri in [
        "/system/functions",
        "/system/info",
        "/system/namespaces",
        "/system/secrets",
        "/system/function/x",
    ] {
        let response = gw
            .send(Request::get(uri).body(Body::empty()).unwrap())
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Basic realm=\"Restricted\""
        );
        assert_eq!(text(response).await, "invalid credentials");
    }
    let wrong = Request::get("/system/functions")
        .header("authorization", basic("admin", "nope"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(gw.send(wrong).await.status(), StatusCode::UNAUTHORIZED);
    let right = Request::get("/system/functions")
        .header("authorization", basic("admin", "s3cret"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(gw.send(right).await.status(), StatusCode::OK);
    // Function routes and /healthz stay open.
    let (status, _) = gw.call("GET", "/healthz", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = gw.call("POST", "/function/nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn auth_disabled_tolerates_an_empty_bearer() {
    let gw = start(|_| {}).await;
    let request = Request::get("/system/functions")
        .header("authorization", "Bearer")
        .body(Body::empty())
        .unwrap();
    let response = gw.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "[]");
    gw.shutdown().await;
}

#[tokio::test]
async fn info_and_namespaces_have_the_shapes_clients_need() {
    let gw = start(|_| {}).await;
    let info = gw.json("/system/info").await;
    assert!(info["provider"]["provider"].is_string(), "{info}");
    assert!(info["provider"]["version"]["release"].is_string(), "{info}");
    assert!(info["provider"]["orchestration"].is_string(), "{info}");
    assert!(info["version"]["release"].is_string(), "{info}");
    assert!(info["arch"].is_string(), "{info}");
    assert_eq!(gw.json("/system/namespaces").await, json!(["openfaas-fn"]));
    assert_eq!(
        gw.json("/system/functions?namespace=other").await,
        json!([])
    );
    let (status, body) = gw.call("GET", "/system/nothing", "").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::NOT_FOUND, "404 page not found\n")
    );
    let (status, _) = gw.call("PATCH", "/system/functions", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    gw.shutdown().await;
}

#[tokio::test]
async fn deploy_describe_update_delete_round_trip() {
    let gw = start(|_| {}).await;
    let deployment = json!({
        "service": "echo",
        "image": "ghcr.io/openfaas/alpine:latest",
        "envProcess": "cat",
        "envVars": {"mode": "test"},
        "labels": {"team": "a"},
        "annotations": {"topic": "orders"},
        "limits": {"memory": "128Mi"},
        "requests": {"cpu": "100m"},
        "secrets": null
    });
    gw.deploy(deployment.clone()).await;
    let (status, body) = gw
        .call("POST", "/system/functions", &deployment.to_string())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "second POST: {body}");

    let status = gw.json("/system/function/echo").await;
    assert_eq!(status["name"], "echo");
    assert_eq!(status["image"], "ghcr.io/openfaas/alpine:latest");
    assert_eq!(status["namespace"], "openfaas-fn");
    assert_eq!(status["envProcess"], "cat");
    assert_eq!(status["envVars"], json!({"mode": "test"}));
    assert_eq!(
        status["labels"],
        json!({"team": "a", "faas_function": "echo"})
    );
    assert_eq!(status["annotations"], json!({"topic": "orders"}));
    assert_eq!(status["limits"], json!({"memory": "128Mi"}));
    assert_eq!(status["requests"], json!({"cpu": "100m"}));
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["availableReplicas"], 1);
    assert!(
        status.get("secrets").is_none(),
        "absent fields are left out: {status}"
    );
    assert!(status.get("constraints").is_none());
    assert!(humantime::parse_rfc3339(status["createdAt"].as_str().unwrap()).is_ok());
    // NAME.NAMESPACE and ?namespace= both work.
    assert_eq!(
        gw.json("/system/function/echo.openfaas-fn").await["name"],
        "echo"
    );
    assert_eq!(
        gw.json("/system/function/echo?namespace=openfaas-fn").await["name"],
        "echo"
    );

    let (status, body) = gw.call("POST", "/function/echo.openfaas-fn", "hello").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
    let list = gw.json("/system/functions").await;
    assert_eq!(list[0]["invocationCount"], 1.0);
    assert_eq!(list[0]["availableReplicas"], 1);

    // PUT of an unknown function is 404 (faas-cli then POSTs).
    let unknown = json!({"service": "nope", "image": "x", "envProcess": "cat"});
    let (status, _) = gw
        .call("PUT", "/system/functions", &unknown.to_string())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let updated = json!({"service": "echo", "image": "img:2", "envProcess": "wc -c"});
    let (status, _) = gw
        .call("PUT", "/system/functions", &updated.to_string())
        .await;
    assert_eq!(status, StatusCode::OK);
    let status = gw.json("/system/function/echo").await;
    assert_eq!(status["image"], "img:2");
    assert!(status.get("envVars").is_none());
    let (_, body) = gw.call("POST", "/function/echo", "four").await;
    assert_eq!(body.trim(), "4");

    let delete = json!({"functionName": "echo", "namespace": "openfaas-fn"});
    let (status, _) = gw
        .call("DELETE", "/system/functions", &delete.to_string())
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = gw
        .call("DELETE", "/system/functions", &delete.to_string())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = gw.call("GET", "/system/function/echo", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(gw.json("/system/functions").await, json!([]));
    gw.shutdown().await;
}

#[tokio::test]
async fn deployed_functions_survive_a_restart() {
    let gw = start(|_| {}).await;
    gw.deploy(json!({"service": "keep", "image": "i", "envProcess": "cat", "annotations": {"topic": "t"}}))
        .await;
    let before = gw.json("/system/function/keep").await;
    let dir = gw.shutdown().await;
    let gw = start_with(dir, |_| {}).await;
    let after = gw.json("/system/function/keep").await;
    assert_eq!(after["annotations"], json!({"topic": "t"}));
    assert_eq!(after["createdAt"], before["createdAt"]);
    let (status, body) = gw.call("POST", "/function/keep", "still here").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "still here"));
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_openfaas_codes() {
    let gw = start(|c| {
        c.gateway.max_body_bytes = 1024;
        c.queue.max_body_bytes = 512;
    })
    .await;
    let (status, body) = gw.call("POST", "/system/functions", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("invalid JSON"), "{body}");
    let (status, body) = gw
        .call(
            "POST",
            "/system/functions",
            r#"{"service":"figlet","image":"ghcr.io/openfaas/figlet:latest"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("does not run container images"), "{body}");
    let (status, _) = gw
        .call(
            "POST",
            "/system/functions",
            r#"{"service":"../etc","image":"i","envProcess":"cat"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for uri in [
        "/function/a%2Fb",
        "/function/..",
        "/function/a..b",
        "/system/function/a%20b",
    ] {
        let (status, body) = gw.call("POST", uri, "").await;
        assert!(
            status == StatusCode::BAD_REQUEST
                || (uri.starts_with("/system") && status == StatusCode::METHOD_NOT_ALLOWED),
            "{uri}: {status} {body}"
        );
    }
    let (status, _) = gw.call("GET", "/system/function/a%20b", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = gw.call("POST", "/function/nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "error finding function nope.openfaas-fn: not found");

    gw.deploy(json!({"service": "echo", "image": "i", "envProcess": "cat"}))
        .await;
    let (status, _) = gw.call("POST", "/function/echo", &"x".repeat(2048)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = gw
        .call("POST", "/async-function/echo", &"x".repeat(600))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = gw.call("POST", "/system/scale-function/echo", "{").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = gw
        .call(
            "POST",
            "/system/scale-function/nope",
            r#"{"serviceName":"nope","replicas":1}"#,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

#[tokio::test]
async fn secrets_are_files_and_never_listed_with_values() {
    let gw = start(|_| {}).await;
    let (status, _) = gw
        .call(
            "POST",
            "/system/secrets",
            r#"{"name":"api-key","value":"hunter2"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = gw
        .call(
            "POST",
            "/system/secrets",
            r#"{"name":"api-key","value":"again"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = gw
        .call(
            "POST",
            "/system/secrets",
            r#"{"name":"raw","rawValue":"aGk="}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let list = gw.json("/system/secrets").await;
    assert_eq!(
        list,
        json!([{"name":"api-key","namespace":"openfaas-fn"},{"name":"raw","namespace":"openfaas-fn"}])
    );
    assert!(!list.to_string().contains("hunter2"));
    let (status, _) = gw
        .call(
            "PUT",
            "/system/secrets",
            r#"{"name":"api-key","value":"changed"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = gw
        .call("PUT", "/system/secrets", r#"{"name":"ghost","value":"x"}"#)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = gw
        .call(
            "POST",
            "/system/secrets",
            r#"{"name":"../escape","value":"x"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A function reads its secret as a file in the secrets folder.
    let secrets = gw.path("secrets");
    gw.deploy(json!({
        "service": "reader", "image": "i",
        "envProcess": format!("cat {}", secrets.join("api-key").display()),
        "secrets": ["api-key"]
    }))
    .await;
    let (status, body) = gw.call("POST", "/function/reader", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "changed"));
    let (status, body) = gw
        .call(
            "POST",
            "/system/functions",
            r#"{"service":"needs","image":"i","envProcess":"cat","secrets":["missing"]}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (status, _) = gw
        .call("DELETE", "/system/secrets", r#"{"name":"raw"}"#)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = gw
        .call("DELETE", "/system/secrets", r#"{"name":"raw"}"#)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

#[tokio::test]
async fn process_runtime_follows_the_classic_watchdog() {
    let gw = start(|_| {}).await;
    let script = gw.script(
        "env.py",
        "import os, sys\nbody = sys.stdin.read()\nprint(os.environ.get('Http_X_Custom'), os.environ.get('Http_Method'), os.environ.get('Http_Path'), os.environ.get('Http_Query'), os.environ.get('mode'), os.environ.get('fprocess') is not None, os.environ.get('team'), os.environ.get('com.openfaas.scale.max'), body, sep='|')\nprint('to the log', file=sys.stderr)\n",
    );
    gw.deploy(json!({"service": "env", "image": "i", "envProcess": format!("python3 {script}"), "envVars": {"mode": "m1", "team": "from-env"}, "labels": {"team": "from-label", "com.openfaas.scale.max": "3"}}))
        .await;
    let request = Request::put("/function/env/sub/path?x=1")
        .header("x-custom", "yes")
        .body(Body::from("payload"))
        .unwrap();
    let response = gw.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-duration-seconds"));
    assert!(response.headers().contains_key("x-call-id"));
    assert!(response.headers().contains_key("x-start-time"));
    assert!(
        response.headers()["x-served-by"]
            .to_str()
            .unwrap()
            .starts_with("faas-gateway/")
    );
    assert_eq!(
        text(response).await.trim(),
        "yes|PUT|/sub/path|x=1|m1|True|from-env|3|payload"
    );

    let logs = gw.call("GET", "/system/logs?name=env&tail=10", "").await.1;
    assert!(logs.contains("Forking fprocess."), "{logs}");
    assert!(logs.contains("Wrote "), "{logs}");
    assert!(logs.contains("to the log"), "{logs}");
    let line: serde_json::Value = serde_json::from_str(logs.lines().next().unwrap()).unwrap();
    for key in ["name", "namespace", "instance", "timestamp", "text"] {
        assert!(line.get(key).is_some(), "{line}");
    }
    let (status, body) = gw
        .call(
            "GET",
            "/system/logs?name=env&since=2999-01-01T00:00:00Z",
            "",
        )
        .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, ""),
        "nothing after `since`"
    );
    let (status, body) = gw
        .call(
            "GET",
            "/system/logs?name=env.openfaas-fn&since=2000-01-01T00:00:00Z&tail=-1",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.lines().count() >= 3, "{body}");
    let (status, _) = gw
        .call("GET", "/system/logs?name=env&since=yesterday", "")
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = gw.call("GET", "/system/logs?name=env&tail=x", "").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = gw.call("GET", "/system/logs?name=ghost", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    gw.deploy(json!({"service": "fails", "image": "i", "envProcess": "python3 -c exit"}))
        .await;
    let script = gw.script("fail.py", "import sys\nprint('partial')\nsys.exit(3)\n");
    let update =
        json!({"service": "fails", "image": "i", "envProcess": format!("python3 {script}")});
    gw.call("PUT", "/system/functions", &update.to_string())
        .await;
    let (status, body) = gw.call("POST", "/function/fails", "").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body, "exit status 3\npartial\n");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_hanging_process_gets_504_and_max_inflight_429_while_others_are_served() {
    let gw = start(|_| {}).await;
    gw.deploy(json!({"service": "hang", "image": "i", "envProcess": "sleep 30", "envVars": {"exec_timeout": "2s", "max_inflight": "1"}}))
        .await;
    gw.deploy(json!({"service": "echo", "image": "i", "envProcess": "cat"}))
        .await;
    // Two at once against a limit of one: one runs (and hangs until exec_timeout), the
    // other is refused at once; a different function is served meanwhile.
    let (first, second, other) = tokio::join!(
        gw.call("POST", "/function/hang", ""),
        gw.call("POST", "/function/hang", ""),
        gw.call("POST", "/function/echo", "fine"),
    );
    assert_eq!(other, (StatusCode::OK, "fine".to_owned()));
    let (refused, (status, body)) = if first.0 == StatusCode::TOO_MANY_REQUESTS {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(refused.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.1,
        "Concurrent request limit exceeded. Max concurrent requests: 1"
    );
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "Killed process.\n");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_process_past_the_gateways_upstream_timeout_gets_an_empty_502() {
    let gw = start(|c| c.gateway.upstream_timeout = Duration::from_millis(300)).await;
    gw.deploy(json!({"service": "hang", "image": "i", "envProcess": "sleep 30"}))
        .await;
    let (status, body) = gw.call("POST", "/function/hang", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::BAD_GATEWAY, ""));
    gw.shutdown().await;
}

async fn echo_service() -> std::net::SocketAddr {
    let app = Router::new().fallback(any(|request: Request<Body>| async move {
        let headers: serde_json::Map<String, serde_json::Value> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
            .collect();
        let uri = request.uri().to_string();
        let method = request.method().to_string();
        let body = text(axum::response::Response::new(request.into_body())).await;
        if uri.contains("/slow") {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let mut response =
            axum::Json(json!({"uri": uri, "method": method, "headers": headers, "body": body}))
                .into_response_with_status();
        response
            .headers_mut()
            .insert("x-upstream", http::HeaderValue::from_static("yes"));
        response
    }));
    common::serve(app).await.0
}

trait WithStatus {
    fn into_response_with_status(self) -> axum::response::Response;
}

impl<T: axum::response::IntoResponse> WithStatus for T {
    fn into_response_with_status(self) -> axum::response::Response {
        let mut r = self.into_response();
        *r.status_mut() = StatusCode::CREATED;
        r
    }
}

#[tokio::test]
async fn url_runtime_proxies_with_openfaas_headers() {
    let upstream = echo_service().await;
    let gw = start(|c| c.gateway.upstream_timeout = Duration::from_millis(800)).await;
    gw.deploy(json!({
        "service": "svc", "image": "i",
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{upstream}/base")}
    }))
    .await;
    let request = Request::patch("/function/svc.openfaas-fn/a/b%20c?q=1&r=2")
        .header("host", "gw.example:8080")
        .header("connection", "close, x-drop")
        .header("x-drop", "1")
        .header("keep-alive", "5")
        .header("x-call-id", "given-id")
        .body(Body::from("data"))
        .unwrap();
    let response = gw.send(request).await;
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "status passes through"
    );
    assert_eq!(response.headers()["x-upstream"], "yes");
    assert!(
        !response.headers().contains_key("x-call-id"),
        "a given call id is not echoed"
    );
    let seen: serde_json::Value = serde_json::from_str(&text(response).await).unwrap();
    assert_eq!(seen["uri"], "/base/a/b%20c?q=1&r=2");
    assert_eq!(seen["method"], "PATCH");
    assert_eq!(seen["body"], "data");
    let headers = &seen["headers"];
    assert_eq!(headers["x-call-id"], "given-id");
    assert_eq!(headers["x-forwarded-host"], "gw.example:8080");
    assert!(
        headers["x-start-time"]
            .as_str()
            .unwrap()
            .parse::<u128>()
            .is_ok()
    );
    for gone in ["connection", "keep-alive", "x-drop"] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} was forwarded: {headers}"
        );
    }
    // Upstream timeout: 502 with an empty body; everyone else is still served.
    let (status, body) = gw.call("POST", "/function/svc/slow", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::BAD_GATEWAY, ""));
    let (status, body) = gw.call("GET", "/function/svc/", "").await;
    assert_eq!(status, StatusCode::CREATED);
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        seen["headers"].get("transfer-encoding").is_none(),
        "an empty request is not sent chunked: {seen}"
    );
    // A function with a shorter exec_timeout gets 504.
    gw.deploy(json!({
        "service": "svc2", "image": "i", "envVars": {"exec_timeout": "200ms"},
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{upstream}")}
    }))
    .await;
    let (status, _) = gw.call("POST", "/function/svc2/slow", "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    // Nothing listens: 502.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    gw.deploy(json!({
        "service": "gone", "image": "i",
        "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": format!("http://{closed}")}
    }))
    .await;
    let (status, body) = gw.call("POST", "/function/gone", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::BAD_GATEWAY, ""));
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_use_openfaas_names_and_labels() {
    let gw = start(|_| {}).await;
    gw.deploy(json!({"service": "echo", "image": "i", "envProcess": "cat"}))
        .await;
    gw.call("POST", "/function/echo", "x").await;
    gw.call("POST", "/function/nope", "x").await;
    let metrics = gateway::metrics_router(gw.state.clone());
    use tower::ServiceExt;
    let response = metrics
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let headers: HeaderMap = response.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics")
    );
    let body = text(response).await;
    for needle in [
        r#"gateway_function_invocation_total{function_name="echo.openfaas-fn",code="200"} 1"#,
        r#"gateway_function_invocation_total{function_name="nope.openfaas-fn",code="404"} 1"#,
        r#"gateway_function_invocation_started{function_name="echo.openfaas-fn"} 1"#,
        r#"gateway_service_count{function_name="echo.openfaas-fn"} 1"#,
        r#"gateway_functions_seconds_count{function_name="echo.openfaas-fn",code="200"} 1"#,
    ] {
        assert!(body.contains(needle), "missing {needle}\n{body}");
    }
    let response = metrics
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(text(response).await, "OK");
    gw.shutdown().await;
}

#[tokio::test]
async fn logs_follow_streams_new_lines_and_ends_when_the_gateway_drains() {
    use http_body_util::BodyExt;
    let gw = start(|_| {}).await;
    gw.deploy(json!({"service": "echo", "image": "i", "envProcess": "cat"}))
        .await;
    gw.call("POST", "/function/echo", "one").await;
    let response = gw
        .send(
            Request::get("/system/logs?name=echo&follow=true&tail=1")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("Wrote 3 Bytes"));
    gw.call("POST", "/function/echo", "two").await;
    let next = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(String::from_utf8_lossy(&next).contains("Forking fprocess."));
    let readyz = || async {
        use tower::ServiceExt;
        gateway::metrics_router(gw.state.clone())
            .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    };
    assert_eq!(readyz().await, StatusCode::OK);
    gw.state.draining.cancel();
    assert_eq!(readyz().await, StatusCode::SERVICE_UNAVAILABLE);
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect()).await;
    assert!(rest.is_ok(), "the stream ends on drain");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_deleted_secret_does_not_drop_a_saved_function_on_restart() {
    let gw = start(|_| {}).await;
    let (status, _) = gw
        .call("POST", "/system/secrets", r#"{"name":"key","value":"v"}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    gw.deploy(
        json!({"service": "uses-key", "image": "i", "envProcess": "cat", "secrets": ["key"]}),
    )
    .await;
    let (status, _) = gw
        .call("DELETE", "/system/secrets", r#"{"name":"key"}"#)
        .await;
    assert_eq!(status, StatusCode::OK);
    let dir = gw.shutdown().await;
    let gw = start_with(dir, |_| {}).await;
    let status = gw.json("/system/function/uses-key").await;
    assert_eq!(status["secrets"], json!(["key"]));
    gw.shutdown().await;
}

#[tokio::test]
async fn the_app_answers_as_the_router_does() {
    // `gateway::app` sends `/function/NAME...` to the proxy without the router; every
    // other shape must get the router's answer.
    use tower::ServiceExt as _;
    let gw = start(|_| {}).await;
    gw.deploy(json!({"service": "echo", "image": "i", "envProcess": "cat"}))
        .await;
    let router = gateway::router(gw.state.clone());
    for (method, uri) in [
        ("POST", "/function/echo"),
        ("POST", "/function/echo/"),
        ("POST", "/function/echo/a/b?x=1"),
        ("GET", "/function/echo.openfaas-fn"),
        ("POST", "/function/"),
        ("POST", "/function"),
        ("POST", "/function//x"),
        ("POST", "/function/nope"),
        ("POST", "/function/a%2Fb"),
        ("GET", "/functions/echo"),
        ("GET", "/system/info"),
    ] {
        let request = || {
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::from("hi"))
                .unwrap()
        };
        let via_app = gw.send(request()).await;
        let via_router = router.clone().oneshot(request()).await.unwrap();
        assert_eq!(via_app.status(), via_router.status(), "{method} {uri}");
        assert_eq!(
            text(via_app).await,
            text(via_router).await,
            "{method} {uri}"
        );
    }
    gw.shutdown().await;
}
