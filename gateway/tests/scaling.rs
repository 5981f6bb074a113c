//! OpenFaaS's scaling contract in every runtime of the local provider, on the real
//! `gateway` binary with real function processes: `com.openfaas.scale.min` replicas right
//! after deploy, sustained load scales up to `com.openfaas.scale.max` and never beyond,
//! back to the minimum once the load stops, `min == max` never moves, and
//! `/system/scale-function` still sets the count. Also: an empty function name is a 404.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::binary::{Running, start_binary, write_config};
use common::wait_for;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const ECHO_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../config/functions/echo_server.py"
);

/// Load: this many requests kept in flight per function (each about 300 ms), with
/// `com.openfaas.scale.target = 1`, well above `max` replicas' worth.
const CONCURRENCY: usize = 8;
/// Bound on every wait for a replica count.
const LIMIT: Duration = Duration::from_secs(30);

/// A gateway whose autoscaler decides every 100 ms and scales down after 1 s of low load.
async fn gateway(dir: &Path) -> Running {
    let provider = r#"
autoscale_interval = "100ms"
scale_down_after = "1s"
health_interval = "200ms"
"#;
    start_binary(&write_config(dir, provider, "")).await
}

/// The body of the answer to `request`.
async fn text(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

fn labels(min: u64, max: u64) -> Value {
    json!({
        "com.openfaas.scale.min": min.to_string(),
        "com.openfaas.scale.max": max.to_string(),
        "com.openfaas.scale.target": "1",
    })
}

/// One runtime's function: how to deploy it and which path keeps a request busy ~300 ms.
#[derive(Clone)]
enum Runtime {
    /// `sleep 0.3` per request; each replica admits `max_inflight` = 4 at once.
    Process,
    /// `echo_server.py` replicas.
    Http,
    /// An `echo_server.py` the test runs, at this URL.
    Url(String),
}

impl Runtime {
    fn deployment(&self, name: &str, labels: Value) -> Value {
        match self {
            Self::Process => json!({
                "service": name, "image": "i", "envProcess": "sleep 0.3",
                "envVars": {"max_inflight": "4"}, "labels": labels,
            }),
            Self::Http => json!({
                "service": name, "image": "i", "envProcess": format!("python3 {ECHO_SERVER}"),
                "annotations": {"faas-gateway.runtime": "http"}, "labels": labels,
            }),
            Self::Url(url) => json!({
                "service": name, "image": "i",
                "annotations": {"faas-gateway.runtime": "url", "faas-gateway.url": url},
                "labels": labels,
            }),
        }
    }

    fn busy_path(&self, name: &str) -> String {
        match self {
            Self::Process => format!("/function/{name}"),
            Self::Http | Self::Url(_) => format!("/function/{name}?sleep=0.3"),
        }
    }
}

async fn deploy(client: &reqwest::Client, gw: &Running, body: Value) {
    let response = client
        .post(gw.url("/system/functions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(status, 202, "{}", response.text().await.unwrap());
}

async fn get_json(client: &reqwest::Client, gw: &Running, path: &str) -> Value {
    let response = client.get(gw.url(path)).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

/// `replicas` and `availableReplicas` from `/system/function/{name}`.
async fn replicas(client: &reqwest::Client, gw: &Running, name: &str) -> (u64, u64) {
    let status = get_json(client, gw, &format!("/system/function/{name}")).await;
    (
        status["replicas"].as_u64().unwrap(),
        status["availableReplicas"].as_u64().unwrap(),
    )
}

/// The same from `/system/functions`.
async fn listed_replicas(client: &reqwest::Client, gw: &Running, name: &str) -> (u64, u64) {
    let list = get_json(client, gw, "/system/functions").await;
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap();
    (
        entry["replicas"].as_u64().unwrap(),
        entry["availableReplicas"].as_u64().unwrap(),
    )
}

async fn wait_replicas(client: &reqwest::Client, gw: &Running, name: &str, want: (u64, u64)) {
    wait_for(LIMIT, &format!("{name} at {want:?}"), || async {
        (replicas(client, gw, name).await == want).then_some(())
    })
    .await;
}

/// The targets of the autoscaler's scale-ups, from the function's log.
async fn scale_ups(client: &reqwest::Client, gw: &Running, name: &str) -> Vec<u64> {
    let log = text(client.get(gw.url(&format!("/system/logs?name={name}")))).await;
    log.split("Scaling up from ")
        .skip(1)
        .filter_map(|rest| rest.split(" to ").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

/// `CONCURRENCY` requests kept in flight to `path` until the token is cancelled.
fn load(client: &reqwest::Client, url: String) -> (CancellationToken, tokio::task::JoinSet<()>) {
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        let url = url.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                let _ = client.post(&url).body("x").send().await;
            }
        });
    }
    (stop, tasks)
}

/// The contract for one runtime: `scaled` (min 2, max 4) and `fixed` (min = max = 2).
async fn contract(runtime: Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path()).await;
    let client = reqwest::Client::new();
    deploy(&client, &gw, runtime.deployment("scaled", labels(2, 4))).await;
    deploy(&client, &gw, runtime.deployment("fixed", labels(2, 2))).await;
    // Right after deploy the desired count is the minimum; `http` replicas then pass
    // their readiness check, the others are available at once.
    assert_eq!(replicas(&client, &gw, "scaled").await.0, 2);
    assert_eq!(replicas(&client, &gw, "fixed").await.0, 2);
    wait_replicas(&client, &gw, "scaled", (2, 2)).await;
    wait_replicas(&client, &gw, "fixed", (2, 2)).await;

    let scaled_load = load(&client, gw.url(&runtime.busy_path("scaled")));
    let fixed_load = load(&client, gw.url(&runtime.busy_path("fixed")));
    wait_for(LIMIT, "scaled at max under load", || async {
        let (desired, available) = replicas(&client, &gw, "scaled").await;
        assert!(desired <= 4, "beyond max: {desired}");
        assert_eq!(replicas(&client, &gw, "fixed").await.0, 2, "min == max");
        (desired == 4 && available == 4).then_some(())
    })
    .await;
    for (stop, mut tasks) in [scaled_load, fixed_load] {
        stop.cancel();
        while tasks.join_next().await.is_some() {}
    }
    wait_replicas(&client, &gw, "scaled", (2, 2)).await;
    assert_eq!(listed_replicas(&client, &gw, "scaled").await, (2, 2));
    assert_eq!(listed_replicas(&client, &gw, "fixed").await, (2, 2));
    // Every decision the autoscaler took is in the log: it reached max, never beyond, and
    // never touched the fixed function.
    let ups = scale_ups(&client, &gw, "scaled").await;
    assert_eq!(ups.iter().max(), Some(&4), "{ups:?}");
    assert_eq!(scale_ups(&client, &gw, "fixed").await, Vec::<u64>::new());

    // `/system/scale-function` sets the count (capped at max), 0 included, and a request
    // brings a function at zero back to its minimum.
    for (asked, got) in [(3, 3), (9, 4), (0, 0)] {
        let response = client
            .post(gw.url("/system/scale-function/scaled"))
            .json(&json!({"serviceName": "scaled", "replicas": asked}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        assert_eq!(
            replicas(&client, &gw, "scaled").await.0,
            got,
            "asked {asked}"
        );
    }
    wait_replicas(&client, &gw, "scaled", (0, 0)).await;
    let response = client
        .post(gw.url(&runtime.busy_path("scaled")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(replicas(&client, &gw, "scaled").await.0, 2);
    wait_replicas(&client, &gw, "scaled", (2, 2)).await;
    let status = gw.stop().await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn process_functions_scale_between_min_and_max() {
    contract(Runtime::Process).await;
}

#[tokio::test]
async fn http_functions_scale_between_min_and_max() {
    contract(Runtime::Http).await;
}

#[tokio::test]
async fn url_functions_scale_between_min_and_max() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _backend = tokio::process::Command::new("python3")
        .arg(ECHO_SERVER)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_for(LIMIT, "the backend", || {
        let health = client.get(format!("{url}/_/health")).send();
        async move { health.await.ok().filter(|r| r.status() == 200) }
    })
    .await;
    contract(Runtime::Url(url)).await;
}

#[tokio::test]
async fn an_empty_function_name_is_a_missing_function() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path()).await;
    let client = reqwest::Client::new();
    for path in [
        "/function/.openfaas-fn",
        "/function/.openfaas-fn/x",
        "/function/",
        "/function//x",
        "/async-function/.openfaas-fn",
        "/function/nope",
    ] {
        let response = client.post(gw.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    let body = text(client.post(gw.url("/function/.openfaas-fn"))).await;
    assert_eq!(body, "error finding function .openfaas-fn: not found");
    gw.stop().await;
}

/// `POST /system/backlog`: messages waiting for a function scaled to zero give it a
/// replica before any invocation, a backlog per replica above `connector.scale.target`
/// scales it out to max, and once nothing waits it goes back to zero.
#[tokio::test]
async fn a_reported_backlog_wakes_and_scales_a_function() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path()).await;
    let client = reqwest::Client::new();
    let mut deployment = Runtime::Http.deployment(
        "lazy",
        json!({
            "com.openfaas.scale.min": "0",
            "com.openfaas.scale.max": "3",
            "com.openfaas.scale.zero-duration": "1s",
        }),
    );
    deployment["annotations"]["connector.scale.target"] = json!("5");
    deploy(&client, &gw, deployment).await;
    assert_eq!(replicas(&client, &gw, "lazy").await, (0, 0));
    let report = |functions: Value| {
        client
            .post(gw.url("/system/backlog"))
            .json(&json!({"source": "test", "functions": functions}))
            .send()
    };
    let response = report(json!({"lazy": 0, "not-deployed": 4})).await.unwrap();
    assert_eq!(response.status(), 204, "an unknown function is skipped");
    assert_eq!(
        replicas(&client, &gw, "lazy").await,
        (0, 0),
        "nothing waits"
    );
    report(json!({"lazy.openfaas-fn": 2})).await.unwrap();
    assert_eq!(
        replicas(&client, &gw, "lazy").await.0,
        1,
        "a waiting message wakes it at once"
    );
    wait_replicas(&client, &gw, "lazy", (1, 1)).await;
    report(json!({"lazy": 12})).await.unwrap();
    wait_replicas(&client, &gw, "lazy", (3, 3)).await;
    report(json!({"lazy": 0})).await.unwrap();
    wait_replicas(&client, &gw, "lazy", (0, 0)).await;
    let response = client
        .post(gw.url("/system/backlog"))
        .body("{\"functions\": 3}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    gw.stop().await;
}
