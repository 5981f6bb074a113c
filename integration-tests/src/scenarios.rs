//! The scenario suite every at-least-once connector runs, against its real broker and its
//! real binary: delivered exactly once in the happy path, a failure leads to redelivery,
//! a 4xx goes to the dead-letter destination once, nothing is lost across SIGKILL and a
//! restart, and SIGTERM drains in-flight work and acknowledges it.
//!
//! A connector's test file implements [`Fixture`] for its broker and calls each scenario.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{FakeGateway, Process, Reply, eventually, free_addr, unique, wait_http};

/// What the suite needs from one broker and its connector.
#[async_trait::async_trait]
pub trait Fixture: Send + Sync {
    /// The connector binary.
    fn binary(&self) -> PathBuf;

    /// Creates a fresh topic (stream, queue, subject) and its dead-letter destination.
    async fn create_topic(&self, topic: &str);

    /// The connector's own TOML sections (everything but `[connector]`) for consuming
    /// `topic`, with dead letters going where [`dead_letters`](Self::dead_letters) reads.
    fn source_config(&self, topic: &str) -> String;

    /// Publishes `payloads` to `topic`, in order.
    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]);

    /// The payloads at `topic`'s dead-letter destination.
    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>>;

    /// Messages of `topic` not yet acknowledged by the connector's group or consumer
    /// (Kafka lag, Redis pending plus unread, SQS visible plus in flight, JetStream
    /// pending plus ack pending).
    async fn unacknowledged(&self, topic: &str) -> u64;
}

/// A connector started for one scenario.
pub struct Started {
    /// The connector process.
    pub process: Process,
    /// Its `/metrics`, `/healthz`, `/readyz` address.
    pub metrics_addr: SocketAddr,
    config: String,
    binary: PathBuf,
}

impl Started {
    /// Starts the connector again with the same configuration (after a kill or stop).
    pub async fn restart(&mut self) {
        self.process = Process::start(&self.binary, &self.config, &[]);
        assert!(
            wait_http(self.metrics_addr, "/readyz", 200, Duration::from_secs(30)).await,
            "connector not ready after restart:\n{}",
            self.process.output()
        );
    }
}

/// Starts `fixture`'s connector for `topic` against `gateway`, waits until `/readyz` says
/// it is ready. `extra` is added to the `[connector]` section.
pub async fn start(
    fixture: &dyn Fixture,
    gateway: &FakeGateway,
    topic: &str,
    extra: &str,
) -> Started {
    let metrics_addr = free_addr();
    let config = format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics_addr}"
rebuild_interval = "500ms"
upstream_timeout = "10s"
max_attempts = 3
drain_timeout = "10s"
{extra}

[connector.backoff]
initial = "50ms"
max = "200ms"

{source}
"#,
        gateway = gateway.url(),
        source = fixture.source_config(topic),
    );
    let binary = fixture.binary();
    let process = Process::start(&binary, &config, &[]);
    assert!(
        wait_http(metrics_addr, "/readyz", 200, Duration::from_secs(30)).await,
        "connector not ready:\n{}",
        process.output()
    );
    Started {
        process,
        metrics_addr,
        config,
        binary,
    }
}

fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i:04}").into_bytes())
        .collect()
}

fn bodies(gateway: &FakeGateway, function: &str) -> Vec<Vec<u8>> {
    gateway
        .requests_to(function)
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect()
}

const WITHIN: Duration = Duration::from_secs(30);

/// Every message reaches the function exactly once, all are acknowledged, and SIGTERM
/// exits 0.
pub async fn delivered_once(fixture: &dyn Fixture) {
    let topic = unique("happy");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("happy-fn", &topic, |_, _| Reply::ok());
    let mut connector = start(fixture, &gw, &topic, "").await;
    let sent = payloads("happy", 20);
    fixture.produce(&topic, &sent).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("happy-fn").len() >= sent.len()).await,
        "only {} of {} delivered:\n{}",
        gw.requests_to("happy-fn").len(),
        sent.len(),
        connector.process.output()
    );
    let got = bodies(&gw, "happy-fn");
    let distinct: BTreeSet<_> = got.iter().cloned().collect();
    assert_eq!(distinct, sent.iter().cloned().collect(), "wrong payloads");
    assert_eq!(got.len(), sent.len(), "duplicates in the happy path");
    let received = gw.requests_to("happy-fn");
    for r in &received {
        assert_eq!(r.header("x-topic").as_deref(), Some(topic.as_str()));
        assert_eq!(r.header("x-delivery-attempt").as_deref(), Some("1"));
        assert!(r.header("ce-id").is_some());
    }
    let ids: BTreeSet<_> = received.iter().filter_map(|r| r.header("ce-id")).collect();
    assert_eq!(ids.len(), sent.len(), "ce-id is not unique per message");
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "messages left unacknowledged: {}",
        fixture.unacknowledged(&topic).await
    );
    let status = connector.process.terminate(WITHIN).await;
    assert!(status.success(), "exit status {status:?}");
}

/// A function that fails the first attempt of every message gets each again, with the
/// same `ce-id` and a higher `X-Delivery-Attempt`, and each is then acknowledged.
pub async fn failure_then_success(fixture: &dyn Fixture) {
    let topic = unique("retry");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("retry-fn", &topic, |req, _| {
        if req.header("x-delivery-attempt").as_deref() == Some("1") {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    });
    let connector = start(fixture, &gw, &topic, "").await;
    let sent = payloads("retry", 10);
    fixture.produce(&topic, &sent).await;
    let succeeded = |gw: &FakeGateway| {
        gw.requests_to("retry-fn")
            .iter()
            .filter(|r| r.header("x-delivery-attempt").as_deref() != Some("1"))
            .map(|r| r.body.to_vec())
            .collect::<BTreeSet<_>>()
    };
    assert!(
        eventually(WITHIN, || succeeded(&gw).len() == sent.len()).await,
        "not every message was retried to success:\n{}",
        connector.process.output()
    );
    let mut ids: BTreeMap<Vec<u8>, BTreeSet<String>> = BTreeMap::new();
    for r in gw.requests_to("retry-fn") {
        ids.entry(r.body.to_vec())
            .or_default()
            .insert(r.header("ce-id").unwrap_or_default());
    }
    assert!(
        ids.values().all(|set| set.len() == 1),
        "ce-id changed between attempts: {ids:?}"
    );
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "retried messages left unacknowledged"
    );
}

/// A 4xx sends the message to the dead-letter destination once, without retrying; the
/// other messages are delivered.
pub async fn dead_letter_on_4xx(fixture: &dyn Fixture) {
    let topic = unique("dlq");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("dlq-fn", &topic, |req, _| {
        if req.body.starts_with(b"bad") {
            Reply::status(422).body(b"rejected")
        } else {
            Reply::ok()
        }
    });
    let connector = start(fixture, &gw, &topic, "").await;
    let sent = vec![b"good-1".to_vec(), b"bad-1".to_vec(), b"good-2".to_vec()];
    fixture.produce(&topic, &sent).await;
    assert!(
        eventually_async(WITHIN, || async {
            !fixture.dead_letters(&topic).await.is_empty()
        })
        .await,
        "nothing reached the dead-letter destination:\n{}",
        connector.process.output()
    );
    assert!(eventually(WITHIN, || gw.requests_to("dlq-fn").len() >= 3).await);
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "messages left unacknowledged after the dead letter"
    );
    assert_eq!(fixture.dead_letters(&topic).await, [b"bad-1".to_vec()]);
    let bad_attempts = gw
        .requests_to("dlq-fn")
        .iter()
        .filter(|r| r.body.starts_with(b"bad"))
        .count();
    assert_eq!(bad_attempts, 1, "a 4xx must not be retried");
}

/// SIGKILL mid-stream, then a restart: every message is delivered at least once.
pub async fn nothing_lost_across_kill(fixture: &dyn Fixture) {
    let topic = unique("kill");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("kill-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(100))
    });
    let mut connector = start(fixture, &gw, &topic, "max_inflight = 4").await;
    let sent = payloads("kill", 40);
    fixture.produce(&topic, &sent).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("kill-fn").len() >= 8).await,
        "nothing delivered before the kill:\n{}",
        connector.process.output()
    );
    connector.process.kill();
    let before_restart = gw.requests_to("kill-fn").len();
    assert!(
        before_restart < sent.len(),
        "all delivered before the kill; test proves nothing"
    );
    connector.restart().await;
    let delivered = |gw: &FakeGateway| bodies(gw, "kill-fn").into_iter().collect::<BTreeSet<_>>();
    assert!(
        eventually(Duration::from_secs(60), || delivered(&gw).len()
            == sent.len())
        .await,
        "lost {} messages across the kill:\n{}",
        sent.len() - delivered(&gw).len(),
        connector.process.output()
    );
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await
    );
}

/// SIGTERM while invocations run: they finish, are acknowledged, and the process exits 0.
pub async fn drain_on_shutdown(fixture: &dyn Fixture) {
    let topic = unique("drain");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("drain-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(1500))
    });
    let mut connector = start(fixture, &gw, &topic, "max_inflight = 5").await;
    let sent = payloads("drain", 5);
    fixture.produce(&topic, &sent).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("drain-fn").len() == sent.len()).await,
        "invocations did not start:\n{}",
        connector.process.output()
    );
    let status = connector.process.terminate(WITHIN).await;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        fixture.unacknowledged(&topic).await,
        0,
        "in-flight messages were not acknowledged after the drain"
    );
}

/// Polls an async condition every 100 ms for up to `within`.
pub async fn eventually_async<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
