//! The real `gateway` binary: persistence across a restart, graceful stop, the connector
//! supervisor, the embedded async queue on disk running every accepted request after a
//! SIGKILL, and the JetStream queue surviving a restart (real nats-server at `NATS_URL`,
//! default 127.0.0.1:4222).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::{start_binary, write_config};
use common::wait_for;
use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn deployed_functions_survive_a_binary_restart_and_sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "",
        r#"
[[functions]]
name = "configured"
command = "cat"

[[functions]]
name = "env"
command = "env"
"#,
    );
    let client = reqwest::Client::new();
    let gw = start_binary(&config).await;
    let deployed = client
        .post(gw.url("/system/functions"))
        .json(&json!({"service": "api-fn", "image": "i", "envProcess": "wc -c", "labels": {"a": "b"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(deployed.status(), 202);
    let response = client
        .post(gw.url("/function/configured"))
        .body("from toml")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-call-id"));
    assert_eq!(response.text().await.unwrap(), "from toml");
    // Over a real socket the client's address arrives as X-Forwarded-For (ip:port).
    let env = client
        .get(gw.url("/function/env"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let forwarded = env
        .lines()
        .find_map(|l| l.strip_prefix("Http_X_Forwarded_For="))
        .unwrap_or_else(|| panic!("no X-Forwarded-For in {env}"));
    assert!(forwarded.starts_with("127.0.0.1:"), "{forwarded}");
    assert!(
        env.contains(&format!("Http_X_Forwarded_Host={}", gw.addr)),
        "{env}"
    );
    let status = gw.stop().await;
    assert!(status.success(), "exit status {status}");

    let gw = start_binary(&config).await;
    let list: serde_json::Value = client
        .get(gw.url("/system/functions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["api-fn", "configured", "env"]);
    let body = client
        .post(gw.url("/function/api-fn"))
        .body("12345")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body.trim(), "5");
    assert!(gw.stop().await.success());
}

#[tokio::test]
async fn the_supervisor_restarts_a_crashed_connector_and_stops_connectors_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("crasher.py"),
        "import os, sys, time\nprint('started', os.getpid(), os.environ.get('gateway_url'), flush=True)\ntime.sleep(0.2)\nsys.exit(1)\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("steady.py"),
        "import os, signal, sys, time\ndef stop(*_):\n    print('got SIGTERM', flush=True)\n    sys.exit(0)\nsignal.signal(signal.SIGTERM, stop)\nparent = os.getppid()\nprint('steady up', sys.argv[1:], flush=True)\nwhile True:\n    time.sleep(0.1)\n    if os.getppid() != parent:\n        sys.exit(0)  # the gateway died (a failed test): do not linger\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("steady.toml"), "").unwrap();
    let config = write_config(
        dir.path(),
        "",
        &format!(
            r#"
[[connectors]]
name = "crasher"
command = "python3"
args = ["{crasher}"]

[[connectors]]
name = "steady"
command = "python3"
args = ["{steady}"]
config = "steady.toml"
"#,
            crasher = dir.path().join("crasher.py").display(),
            steady = dir.path().join("steady.py").display(),
        ),
    );
    let gw = start_binary(&config).await;
    let pids = wait_for(Duration::from_secs(30), "two starts of the crasher", || {
        let log = gw.log();
        async move {
            let pids: Vec<String> = log
                .iter()
                .filter_map(|l| l.strip_prefix("[crasher] started "))
                .map(|rest| {
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            (pids.len() >= 2).then_some(pids)
        }
    })
    .await;
    assert_ne!(pids[0], pids[1], "a new process each time");
    let log = gw.log();
    let started = log
        .iter()
        .find(|l| l.starts_with("[crasher] started"))
        .unwrap();
    assert!(
        started.ends_with(&format!("http://{}", gw.addr)),
        "gateway_url given: {started}"
    );
    let steady = log
        .iter()
        .find(|l| l.starts_with("[steady] steady up"))
        .unwrap();
    assert!(
        steady.contains("--config") && steady.contains("steady.toml"),
        "{steady}"
    );
    let lines = Arc::clone(&gw.lines);
    assert!(gw.stop().await.success());
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l == "[steady] got SIGTERM"),
        "the connector was stopped with SIGTERM"
    );
}

#[tokio::test]
async fn jetstream_queue_keeps_requests_across_a_gateway_crash() {
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let unique = uuid::Uuid::new_v4().simple().to_string();
    // A function that fails with 503 until the test lets it succeed.
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&healthy);
    let (tx, mut callbacks) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let app = axum::Router::new()
        .route(
            "/fn",
            axum::routing::post(move |body: String| {
                let flag = Arc::clone(&flag);
                async move {
                    if flag.load(std::sync::atomic::Ordering::SeqCst) {
                        (http::StatusCode::OK, format!("done {body}"))
                    } else {
                        (http::StatusCode::SERVICE_UNAVAILABLE, "later".to_owned())
                    }
                }
            }),
        )
        .route(
            "/callback",
            axum::routing::post(move |headers: http::HeaderMap, body: String| {
                let tx = tx.clone();
                async move {
                    let status = headers["x-function-status"].to_str().unwrap().to_owned();
                    let _ = tx.send((status, body));
                    http::StatusCode::OK
                }
            }),
        );
    let (addr, _stop) = common::serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "",
        &format!(
            r#"
[async]
nats_url = "{nats_url}"
nats_stream = "gw-test-{unique}"
nats_subject = "gw-test-{unique}.async"
nats_consumer = "gw-test-{unique}"
nats_ack_wait = "2s"
max_attempts = 100
backoff = {{ initial = "100ms", max = "300ms" }}

[[functions]]
name = "later"
runtime = "url"
url = "http://{addr}/fn"
"#
        ),
    );
    let client = reqwest::Client::new();
    let gw = start_binary(&config).await;
    let accepted = client
        .post(gw.url("/async-function/later"))
        .header("x-callback-url", format!("http://{addr}/callback"))
        .body("job-1")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    // Let it fail at least once, then crash the gateway.
    wait_for(Duration::from_secs(20), "a first failed attempt", || {
        let log = gw.log();
        async move { log.iter().any(|l| l.contains("retrying")).then_some(()) }
    })
    .await;
    gw.kill().await;
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let gw = start_binary(&config).await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(60), callbacks.recv())
        .await
        .expect("the request ran after the restart")
        .unwrap();
    assert_eq!((status.as_str(), body.as_str()), ("200", "done job-1"));
    assert!(gw.stop().await.success());
    // Clean up the test's stream.
    let nats = async_nats::connect(&nats_url).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let _ = js.delete_stream(format!("gw-test-{unique}")).await;
}

/// The default embedded queue (on disk): requests answered 202 are run even when the
/// gateway is killed with SIGKILL while clients are still posting and most accepted
/// requests wait, by the next start on the same state directory. With the queue in memory
/// this fails: the waiting requests are lost.
#[tokio::test]
async fn embedded_queue_runs_every_accepted_request_after_a_sigkill() {
    const REQUESTS: usize = 1000;
    const CONCURRENCY: usize = 4;
    // A slow function that counts the runs of each body.
    let runs = Arc::new(Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let seen = Arc::clone(&runs);
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::post(move |body: String| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                *seen.lock().unwrap().entry(body).or_default() += 1;
                "ok"
            }
        }),
    );
    let (addr, _stop) = common::serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "",
        &format!(
            r#"
[async]
concurrency = {CONCURRENCY}

[[functions]]
name = "slow"
runtime = "url"
url = "http://{addr}/slow"
"#
        ),
    );
    let client = reqwest::Client::new();
    let gw = start_binary(&config).await;
    // Clients keep posting in the background; the kill comes while they do.
    let url = gw.url("/async-function/slow");
    let posting = tokio::spawn(async move {
        let sends = (0..REQUESTS).map(|n| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let response = client.post(url).body(format!("job-{n}")).send().await;
                (n, response.map(|r| r.status()))
            }
        });
        futures::stream::iter(sends)
            .buffer_unordered(16)
            .filter_map(|(n, status)| async move {
                (status.ok()? == http::StatusCode::ACCEPTED).then(|| format!("job-{n}"))
            })
            .collect::<Vec<String>>()
            .await
    });
    wait_for(Duration::from_secs(30), "the first runs", || {
        let runs = Arc::clone(&runs);
        async move { (runs.lock().unwrap().len() >= 20).then_some(()) }
    })
    .await;
    gw.kill().await;
    let ran_before = runs.lock().unwrap().len();
    let accepted = tokio::time::timeout(Duration::from_secs(30), posting)
        .await
        .expect("the clients finish once the gateway is gone")
        .unwrap();
    eprintln!(
        "{} of {REQUESTS} accepted before the kill, {ran_before} of them run",
        accepted.len()
    );
    assert!(
        ran_before < accepted.len() / 2,
        "the kill came mid-queue ({ran_before} of {} accepted had run)",
        accepted.len()
    );

    let gw = start_binary(&config).await;
    wait_for(
        Duration::from_secs(60),
        "every accepted request to run",
        || {
            let runs = Arc::clone(&runs);
            let accepted = &accepted;
            async move {
                let runs = runs.lock().unwrap();
                accepted.iter().all(|b| runs.contains_key(b)).then_some(())
            }
        },
    )
    .await;
    let restart = gw
        .log()
        .into_iter()
        .find(|l| l.contains("async queue store open"))
        .expect("the store is opened at start");
    assert!(!restart.contains("requests=0"), "{restart}");
    // A request the function finished just as the kill came counts as run above but was
    // not finished for the gateway, which runs it again: wait until nothing is left.
    wait_for(Duration::from_secs(60), "the queue to empty", || {
        let gw = &gw;
        async move { (gw.metric("gateway_async_queue_requests").await == Some(0.0)).then_some(()) }
    })
    .await;
    assert!(gw.stop().await.success());
    // Finished requests are removed from the store: the next start finds none.
    let gw = start_binary(&config).await;
    let opened = gw
        .log()
        .into_iter()
        .find(|l| l.contains("async queue store open"))
        .expect("the store is opened at start");
    assert!(opened.contains("requests=0"), "{opened}");
    let repeated = runs.lock().unwrap().values().filter(|n| **n > 1).count();
    // At least once: only requests running at the kill, or finished while their removal
    // waited for the next commit, may have run twice.
    assert!(repeated <= 4 * CONCURRENCY, "{repeated} requests ran twice");
    assert!(gw.stop().await.success());
}

/// A request that was retrying when the gateway was killed goes on after the restart with
/// its attempt count (`X-Delivery-Attempt` continues), and is finished once.
#[tokio::test]
async fn embedded_queue_keeps_a_retry_and_its_attempt_count_across_a_sigkill() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&healthy);
    let (tx, mut attempts) = tokio::sync::mpsc::unbounded_channel::<(u32, bool)>();
    let app = axum::Router::new().route(
        "/fn",
        axum::routing::post(move |headers: http::HeaderMap| {
            let flag = Arc::clone(&flag);
            let tx = tx.clone();
            async move {
                let attempt: u32 = headers["x-delivery-attempt"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let ok = flag.load(std::sync::atomic::Ordering::SeqCst);
                let _ = tx.send((attempt, ok));
                if ok {
                    http::StatusCode::OK
                } else {
                    http::StatusCode::SERVICE_UNAVAILABLE
                }
            }
        }),
    );
    let (addr, _stop) = common::serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "",
        &format!(
            r#"
[async]
max_attempts = 10
backoff = {{ initial = "100ms", max = "200ms" }}

[[functions]]
name = "later"
runtime = "url"
url = "http://{addr}/fn"
"#
        ),
    );
    let client = reqwest::Client::new();
    let gw = start_binary(&config).await;
    let accepted = client
        .post(gw.url("/async-function/later"))
        .body("job")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let mut last = 0;
    while last < 2 {
        let (attempt, _) = tokio::time::timeout(Duration::from_secs(20), attempts.recv())
            .await
            .expect("attempts before the kill")
            .unwrap();
        last = attempt;
    }
    // The retry is stored asynchronously; its log line comes after the update is sent.
    wait_for(Duration::from_secs(10), "the second retry", || {
        let n = gw.log().iter().filter(|l| l.contains("retrying")).count();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    gw.kill().await;
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    while attempts.try_recv().is_ok() {}
    let gw = start_binary(&config).await;
    let (attempt, ok) = tokio::time::timeout(Duration::from_secs(30), attempts.recv())
        .await
        .expect("the request ran after the restart")
        .unwrap();
    assert!(ok);
    assert!(attempt >= 2, "the attempt count went on: {attempt}");
    assert!(gw.stop().await.success());
}

#[tokio::test]
async fn replicas_orphaned_by_a_killed_gateway_are_stopped_by_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/functions/echo_server.py"
    );
    let config = write_config(
        dir.path(),
        "",
        &format!(
            r#"
[[functions]]
name = "echo"
runtime = "http"
command = "python3 {server}"
"#
        ),
    );
    let client = reqwest::Client::new();
    let gw = start_binary(&config).await;
    let pid = wait_for(Duration::from_secs(30), "the replica to answer", || {
        let url = gw.url("/function/echo");
        let client = client.clone();
        async move {
            let body: serde_json::Value = client.post(url).send().await.ok()?.json().await.ok()?;
            body["pid"].as_u64()
        }
    })
    .await;
    gw.kill().await;
    let alive = |pid: u64| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(pid), "the replica outlived the SIGKILLed gateway");
    let gw = start_binary(&config).await;
    wait_for(
        Duration::from_secs(20),
        "the orphan to be stopped",
        || async move { (!alive(pid)).then_some(()) },
    )
    .await;
    assert!(gw.stop().await.success());
}
