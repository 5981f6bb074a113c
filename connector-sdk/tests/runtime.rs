//! The run harness, topic-map rebuilds and the pump against a real HTTP gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connector_sdk::config::Secret;
use connector_sdk::gateway::GatewayClient;
use connector_sdk::metrics::{Metrics, encode};
use connector_sdk::testing::{FakeGateway, Reply, SystemMode, eventually};
use connector_sdk::topic_map::{TopicMapHandle, rebuild_loop};
use connector_sdk::{Disposition, Message, MessageOutcome, Runtime, Source, SourceError, pump};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A source fed by a channel; records each settle.
struct ChannelSource {
    rx: mpsc::Receiver<Message>,
    settled: Arc<Mutex<Vec<(String, Disposition)>>>,
    flushed: Arc<Mutex<bool>>,
}

#[async_trait::async_trait]
impl Source for ChannelSource {
    type Ack = String;

    async fn pull(&mut self) -> Result<Vec<(Message, String)>, SourceError> {
        match self.rx.recv().await {
            Some(m) => {
                let id = m.id.clone();
                Ok(vec![(m, id)])
            }
            None => std::future::pending().await,
        }
    }

    async fn settle(
        &mut self,
        ack: String,
        disposition: Disposition,
        _outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        self.settled.lock().unwrap().push((ack, disposition));
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        *self.flushed.lock().unwrap() = true;
        Ok(())
    }
}

struct Running {
    tx: mpsc::Sender<Message>,
    settled: Arc<Mutex<Vec<(String, Disposition)>>>,
    flushed: Arc<Mutex<bool>>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), connector_sdk::SdkError>>,
    metrics_addr: SocketAddr,
}

async fn start(config: connector_sdk::SdkConfig) -> Running {
    // Reserve a port for the metrics server so the test knows where to ask.
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = connector_sdk::SdkConfig {
        metrics_addr,
        ..config
    };
    let runtime = Runtime::new("test-connector", config)
        .unwrap()
        .without_signal_handlers();
    let shutdown = runtime.shutdown_token();
    let (tx, rx) = mpsc::channel(100);
    let settled = Arc::new(Mutex::new(Vec::new()));
    let flushed = Arc::new(Mutex::new(false));
    let source = ChannelSource {
        rx,
        settled: settled.clone(),
        flushed: flushed.clone(),
    };
    let handle = tokio::spawn(runtime.run(|ctx| async move { pump(&ctx, source).await }));
    Running {
        tx,
        settled,
        flushed,
        shutdown,
        handle,
        metrics_addr,
    }
}

impl Running {
    /// `n` messages on topic `jobs`, ids `m0` to `m{n-1}`.
    async fn send_jobs(&self, n: usize) {
        for i in 0..n {
            self.tx
                .send(Message::new("jobs", "x", format!("m{i}"), "test://"))
                .await
                .unwrap();
        }
    }
}

/// `config` with `basic_auth` on, user `admin` and password `pw` in a secret mount
/// directory (kept while the returned guard lives).
fn with_basic_auth(
    mut config: connector_sdk::SdkConfig,
) -> (connector_sdk::SdkConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("basic-auth-user"), "admin").unwrap();
    std::fs::write(dir.path().join("basic-auth-password"), "pw").unwrap();
    config.basic_auth = true;
    config.secret_mount_path = dir.path().to_owned();
    (config, dir)
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

async fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    get(addr, path).await.map(|(s, _)| s)
}

async fn wait_status(addr: SocketAddr, path: &str, want: u16) -> bool {
    for _ in 0..500 {
        if status_of(addr, path).await == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn drain_on_shutdown_finishes_in_flight_work_and_acks_it() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", "jobs", |_, _| {
        Reply::ok().delay(Duration::from_millis(400))
    });
    let running = start(gw.config()).await;
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    running.send_jobs(5).await;
    assert!(eventually(Duration::from_secs(5), || gw.requests().len() == 5).await);
    running.shutdown.cancel();
    // Readiness turns 503 while draining.
    assert!(
        wait_status(running.metrics_addr, "/readyz", 503).await || running.handle.is_finished()
    );
    let result = tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("run returns after the drain")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    let settled = running.settled.lock().unwrap().clone();
    assert_eq!(settled.len(), 5, "{settled:?}");
    assert!(
        settled.iter().all(|(_, d)| *d == Disposition::Ack),
        "{settled:?}"
    );
    assert!(*running.flushed.lock().unwrap());
}

/// `POST {path}` with `Authorization: Bearer {token}` when a token is given.
async fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut request = reqwest::Client::new().post(format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let resp = request.send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// Issue 17: without a drain token `/drain` is off. Anyone who could reach
/// `metrics_addr` used to stop the connector with a bare GET.
/// `/admin/status` over the running harness: each subscription's deliveries per second
/// (over the last ten seconds, from the delivered totals sampled every second), and its
/// deliveries under way once all have ended.
#[tokio::test]
async fn admin_status_gives_each_subscription_its_delivery_rate() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "jobs", |_, _| Reply::ok());
    let (config, _secrets) = with_basic_auth(gw.config());
    let running = start(config).await;
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    running.send_jobs(20).await;
    assert!(eventually(Duration::from_secs(5), || gw.requests().len() == 20).await);
    let client = reqwest::Client::new();
    let url = format!("http://{}/admin/status", running.metrics_addr);
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let response = client
            .get(&url)
            .basic_auth("admin", Some("pw"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        last = response.json().await.unwrap();
        let f = &last["subscriptions"][0];
        if f["delivered_per_second"].as_f64().is_some_and(|r| r > 0.0) {
            assert_eq!(f["function"], "f", "{last}");
            assert_eq!(f["totals"]["delivered"], 20, "{last}");
            // 20 deliveries within the ten-second window, over at least one second.
            assert!(
                f["delivered_per_second"].as_f64().unwrap() <= 20.0,
                "{last}"
            );
            assert_eq!(f["attempting"], 0, "{last}");
            assert_eq!(f["retrying"], 0, "{last}");
            running.shutdown.cancel();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no delivery rate within 5 s: {last}");
}

#[tokio::test]
async fn drain_endpoint_is_off_without_a_token() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "jobs", |_, _| Reply::ok());
    let running = start(gw.config()).await;
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    let addr = running.metrics_addr;
    assert_eq!(get(addr, "/drain").await.map(|(s, _)| s), Some(404));
    assert_eq!(post(addr, "/drain", None).await.map(|(s, _)| s), Some(404));
    assert_eq!(
        post(addr, "/drain", Some("guess")).await.map(|(s, _)| s),
        Some(404)
    );
    // Still running and ready: nothing started a drain.
    assert!(!running.shutdown.is_cancelled());
    assert_eq!(status_of(addr, "/readyz").await, Some(200));
    assert!(!running.handle.is_finished());
    running.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("run returns after SIGTERM's drain")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// With a drain token, `/drain` answers only `POST` with `Authorization: Bearer <token>`;
/// anything else is refused and leaves the connector running.
#[tokio::test]
async fn drain_endpoint_needs_post_and_the_bearer_token() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "jobs", |_, _| Reply::ok());
    let running = start(connector_sdk::SdkConfig {
        drain_token: Some(Secret::new("s3cret-token")),
        ..gw.config()
    })
    .await;
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    let addr = running.metrics_addr;
    assert_eq!(post(addr, "/drain", None).await.map(|(s, _)| s), Some(401));
    assert_eq!(
        post(addr, "/drain", Some("s3cret-tokeN"))
            .await
            .map(|(s, _)| s),
        Some(401)
    );
    assert_eq!(
        post(addr, "/drain", Some("s3cret-token-and-more"))
            .await
            .map(|(s, _)| s),
        Some(401)
    );
    let basic = reqwest::Client::new()
        .post(format!("http://{addr}/drain"))
        .basic_auth("s3cret-token", Some(""))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(basic, 401);
    let get_with_token = reqwest::Client::new()
        .get(format!("http://{addr}/drain"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(get_with_token, 405);
    assert!(!running.shutdown.is_cancelled());
    assert_eq!(status_of(addr, "/readyz").await, Some(200));
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        post(addr, "/drain", Some("s3cret-token")),
    )
    .await
    .expect("/drain answers after the drain")
    .expect("/drain answered");
    assert_eq!((status, body.as_str()), (200, "drained\n"));
    let result = tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("run returns after the drain")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// The token can also come from the file `drain-token` in `secret_mount_path` (a
/// Kubernetes Secret mounted there), trimmed as the basic-auth files are.
#[tokio::test]
async fn drain_token_is_read_from_secret_mount_path() {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("drain-token"), "from-a-file\n").unwrap();
    let gw = FakeGateway::start().await.unwrap();
    let running = start(connector_sdk::SdkConfig {
        secret_mount_path: secrets.path().to_owned(),
        ..gw.config()
    })
    .await;
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    let addr = running.metrics_addr;
    assert_eq!(
        post(addr, "/drain", Some("wrong")).await.map(|(s, _)| s),
        Some(401)
    );
    assert_eq!(
        post(addr, "/drain", Some("from-a-file"))
            .await
            .map(|(s, _)| s),
        Some(200)
    );
    let result = tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("run returns after the drain")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");

    // An empty file is a mistake, refused at start rather than taken as "no token".
    std::fs::write(secrets.path().join("drain-token"), " \n").unwrap();
    let err = Runtime::new(
        "test-connector",
        connector_sdk::SdkConfig {
            secret_mount_path: secrets.path().to_owned(),
            ..connector_sdk::SdkConfig::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("drain-token"), "{err}");
}

/// `POST /drain` with the token starts the drain and answers only after the in-flight
/// work finished and was acknowledged; then the runtime returns.
#[tokio::test]
async fn drain_endpoint_answers_once_in_flight_work_is_acknowledged() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", "jobs", |_, _| {
        Reply::ok().delay(Duration::from_millis(400))
    });
    let running = start(connector_sdk::SdkConfig {
        drain_token: Some(Secret::new("t")),
        ..gw.config()
    })
    .await;
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    for i in 0..3 {
        running
            .tx
            .send(Message::new("jobs", "x", format!("m{i}"), "test://"))
            .await
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || gw.requests().len() == 3).await);
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        post(running.metrics_addr, "/drain", Some("t")),
    )
    .await
    .expect("/drain answers after the drain")
    .expect("/drain answered");
    assert_eq!((status, body.as_str()), (200, "drained\n"));
    // By the time it answered, everything in flight was acknowledged.
    let settled = running.settled.lock().unwrap().clone();
    assert_eq!(settled.len(), 3, "{settled:?}");
    assert!(
        settled.iter().all(|(_, d)| *d == Disposition::Ack),
        "{settled:?}"
    );
    assert!(running.shutdown.is_cancelled());
    let result = tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("run returns after the drain")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn drain_timeout_releases_what_did_not_finish() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("stuck", "jobs", |_, _| {
        Reply::ok().delay(Duration::from_secs(30))
    });
    let mut config = gw.config();
    config.drain_timeout = Duration::from_millis(300);
    config.upstream_timeout = Duration::from_secs(60);
    let running = start(config).await;
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    running
        .tx
        .send(Message::new("jobs", "x", "m1", "test://"))
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || gw.requests().len() == 1).await);
    running.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("run returns soon after drain_timeout")
        .unwrap();
    assert!(result.is_ok());
    let settled = running.settled.lock().unwrap().clone();
    assert_eq!(settled, [("m1".to_owned(), Disposition::Release)]);
}

#[tokio::test]
async fn gateway_down_at_start_is_picked_up_when_it_appears() {
    let free = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = connector_sdk::SdkConfig {
        gateway_url: format!("http://{free}"),
        rebuild_interval: Duration::from_millis(100),
        ..connector_sdk::SdkConfig::default()
    };
    let running = start(config).await;
    assert!(wait_status(running.metrics_addr, "/healthz", 200).await);
    let (status, body) = get(running.metrics_addr, "/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("topic map"), "{body}");
    let (_, metrics) = get(running.metrics_addr, "/metrics").await.unwrap();
    assert!(metrics.contains("connector_topic_map_rebuilds_total{result=\"error\"}"));

    let gw = FakeGateway::start_on(free).await.unwrap();
    gw.function("late", "t", |_, _| Reply::ok());
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    running
        .tx
        .send(Message::new("t", "hi", "m1", "test://"))
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || gw.requests().len() == 1).await);
    assert!(
        eventually(Duration::from_secs(5), || running
            .settled
            .lock()
            .unwrap()
            .len()
            == 1)
        .await
    );
    running.shutdown.cancel();
    assert!(running.handle.await.unwrap().is_ok());
}

#[tokio::test]
async fn metrics_endpoint_serves_connector_metrics() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "t", |_, _| Reply::ok());
    let running = start(gw.config()).await;
    assert!(wait_status(running.metrics_addr, "/readyz", 200).await);
    running
        .tx
        .send(Message::new("t", "x", "m1", "test://"))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || running
            .settled
            .lock()
            .unwrap()
            .len()
            == 1)
        .await
    );
    let (status, text) = get(running.metrics_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for needle in [
        "connector_deliveries_total{function=\"f\",outcome=\"delivered\"} 1",
        "connector_messages_total{outcome=\"ack\"} 1",
        "connector_topic_map_functions 1",
        "connector_ready 1",
        "connector_build_info{connector=\"test-connector\"",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    running.shutdown.cancel();
    assert!(running.handle.await.unwrap().is_ok());
}

async fn rebuild_fixture(
    gw: &FakeGateway,
    config: connector_sdk::SdkConfig,
) -> (
    TopicMapHandle,
    prometheus_client::registry::Registry,
    CancellationToken,
) {
    let (metrics, registry) = Metrics::standalone("t");
    let client = GatewayClient::new("t", &config).unwrap();
    let handle = TopicMapHandle::new();
    let stop = CancellationToken::new();
    tokio::spawn(rebuild_loop(
        client,
        handle.clone(),
        ",".into(),
        Duration::from_millis(50),
        metrics,
        stop.clone(),
    ));
    let _ = gw;
    (handle, registry, stop)
}

#[tokio::test]
async fn a_misbehaving_gateway_keeps_the_last_good_map() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "orders", |_, _| Reply::ok());
    let mut config = gw.config();
    config.upstream_timeout = Duration::from_millis(200);
    let (handle, registry, stop) = rebuild_fixture(&gw, config).await;
    handle.wait_ready().await;
    assert!(handle.current().lookup("orders").is_some());

    for mode in [
        SystemMode::Malformed,
        SystemMode::Error500,
        SystemMode::Hang,
    ] {
        let failures_before = failures(&registry);
        gw.set_mode(mode);
        gw.set_functions_json(Vec::new());
        assert!(
            eventually(Duration::from_secs(5), || failures(&registry)
                >= failures_before + 2)
            .await,
            "{mode:?} was not counted as a failed rebuild"
        );
        assert!(
            handle.current().lookup("orders").is_some(),
            "{mode:?} lost the last good map"
        );
        gw.set_mode(SystemMode::Ok);
        gw.function("f", "orders", |_, _| Reply::ok());
    }
    // Back to normal: an empty function list is a valid answer and replaces the map.
    gw.set_functions_json(Vec::new());
    assert!(
        eventually(Duration::from_secs(5), || handle
            .current()
            .lookup("orders")
            .is_none())
        .await
    );
    stop.cancel();
}

fn failures(registry: &prometheus_client::registry::Registry) -> u64 {
    encode(registry)
        .lines()
        .find(|l| l.starts_with("connector_topic_map_rebuilds_total{result=\"error\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn namespaces_qualify_functions_and_basic_auth_is_sent() {
    let gw = FakeGateway::start().await.unwrap();
    gw.set_namespaces(Some(vec!["openfaas-fn".into(), "staging".into()]));
    gw.set_functions_json(vec![serde_json::json!({
        "name": "f", "annotations": {"topic": "t"}
    })]);
    let (config, _secrets) = with_basic_auth(gw.config());
    let (handle, _registry, stop) = rebuild_fixture(&gw, config).await;
    handle.wait_ready().await;
    let names: Vec<String> = handle
        .current()
        .lookup("t")
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(names, ["f.openfaas-fn", "f.staging"]);
    stop.cancel();
    // "admin:pw" in base64.
    assert!(
        gw.system_auth()
            .iter()
            .all(|a| a.as_deref() == Some("Basic YWRtaW46cHc="))
    );
}

#[tokio::test]
async fn source_pull_errors_are_retried_not_fatal() {
    struct Flaky {
        calls: u32,
        done: Arc<Mutex<Vec<Disposition>>>,
    }
    #[async_trait::async_trait]
    impl Source for Flaky {
        type Ack = ();
        async fn pull(&mut self) -> Result<Vec<(Message, ())>, SourceError> {
            self.calls += 1;
            match self.calls {
                1 | 2 => Err(SourceError::transient("broker unreachable")),
                3 => Ok(vec![(Message::new("t", "x", "m", "test://"), ())]),
                _ => std::future::pending().await,
            }
        }
        async fn settle(
            &mut self,
            _: (),
            d: Disposition,
            _: &MessageOutcome,
        ) -> Result<(), SourceError> {
            self.done.lock().unwrap().push(d);
            Ok(())
        }
    }
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "t", |_, _| Reply::ok());
    let mut config = gw.config();
    config.metrics_addr = "127.0.0.1:0".parse().unwrap();
    let runtime = Runtime::new("t", config).unwrap().without_signal_handlers();
    let shutdown = runtime.shutdown_token();
    let done = Arc::new(Mutex::new(Vec::new()));
    let source = Flaky {
        calls: 0,
        done: done.clone(),
    };
    let handle = tokio::spawn(runtime.run(|ctx| async move { pump(&ctx, source).await }));
    assert!(eventually(Duration::from_secs(10), || done.lock().unwrap().len() == 1).await);
    assert_eq!(done.lock().unwrap()[0], Disposition::Ack);
    shutdown.cancel();
    assert!(handle.await.unwrap().is_ok());
}

#[tokio::test]
async fn completions_are_settled_while_the_source_backs_off() {
    /// Delivers one message, then fails every pull, so the pump sits in ever longer
    /// backoff sleeps while the invocation runs.
    struct FailsAfterOne {
        calls: u32,
        settled: Arc<Mutex<Option<std::time::Instant>>>,
    }
    #[async_trait::async_trait]
    impl Source for FailsAfterOne {
        type Ack = ();
        async fn pull(&mut self) -> Result<Vec<(Message, ())>, SourceError> {
            self.calls += 1;
            if self.calls == 1 {
                Ok(vec![(Message::new("t", "x", "m", "test://"), ())])
            } else {
                Err(SourceError::transient("broker unreachable"))
            }
        }
        async fn settle(
            &mut self,
            _: (),
            _: Disposition,
            _: &MessageOutcome,
        ) -> Result<(), SourceError> {
            *self.settled.lock().unwrap() = Some(std::time::Instant::now());
            Ok(())
        }
    }
    let gw = FakeGateway::start().await.unwrap();
    // By the time the function answers, the backoff between pulls is seconds long.
    let slow = Duration::from_secs(3);
    gw.function("f", "t", move |_, _| Reply::ok().delay(slow));
    let mut config = gw.config();
    config.metrics_addr = "127.0.0.1:0".parse().unwrap();
    let runtime = Runtime::new("t", config).unwrap().without_signal_handlers();
    let shutdown = runtime.shutdown_token();
    let settled = Arc::new(Mutex::new(None));
    let source = FailsAfterOne {
        calls: 0,
        settled: settled.clone(),
    };
    let handle = tokio::spawn(runtime.run(|ctx| async move { pump(&ctx, source).await }));
    assert!(
        eventually(Duration::from_secs(20), || settled
            .lock()
            .unwrap()
            .is_some())
        .await
    );
    let answered = gw.requests_to("f")[0].at + slow;
    let lag = settled
        .lock()
        .unwrap()
        .unwrap()
        .saturating_duration_since(answered);
    assert!(
        lag < Duration::from_millis(500),
        "the completion waited {lag:?} for the backoff sleep to end"
    );
    shutdown.cancel();
    assert!(handle.await.unwrap().is_ok());
}
