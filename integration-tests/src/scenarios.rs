//! The scenario suite every at-least-once connector runs, against its real broker and its
//! real binary: delivered exactly once in the happy path, a failure leads to redelivery,
//! a 4xx goes to the dead-letter destination once, nothing is lost across SIGKILL and a
//! restart, SIGTERM drains in-flight work and acknowledges it, and a long outage of the
//! function with no dead-letter destination (messages held, redelivered, held again)
//! acknowledges nothing early and loses nothing.
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

    /// Like [`source_config`](Self::source_config), but with no dead-letter destination,
    /// so a message that exhausts its attempts is held (`on_exhausted = "block"`), and
    /// with the broker's redelivery of held messages set short (a second or so: Redis
    /// `claim_idle`, SQS visibility, JetStream nak delay). A fixture whose connector
    /// cannot run without one panics.
    fn source_config_without_dead_letters(&self, topic: &str) -> String;

    /// Publishes `payloads` to `topic`, in order.
    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]);

    /// The payloads at `topic`'s dead-letter destination.
    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>>;

    /// Messages of `topic` not yet acknowledged by the connector's group or consumer
    /// (Kafka lag, Redis pending plus unread, SQS visible plus in flight, JetStream
    /// pending plus ack pending).
    async fn unacknowledged(&self, topic: &str) -> u64;

    /// Told of each connector a scenario started, with its metrics address, before the
    /// scenario goes on.
    fn started(&self, _metrics_addr: SocketAddr) {}
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

/// `connector.max_attempts` of every scenario's connector.
pub const MAX_ATTEMPTS: usize = 3;

/// Starts `fixture`'s connector for `topic` against `gateway`, waits until `/readyz` says
/// it is ready. `extra` is added to the `[connector]` section.
pub async fn start(
    fixture: &dyn Fixture,
    gateway: &FakeGateway,
    topic: &str,
    extra: &str,
) -> Started {
    start_with_source(fixture, gateway, extra, &fixture.source_config(topic)).await
}

/// Like [`start`], with `source` as the connector's own sections.
pub async fn start_with_source(
    fixture: &dyn Fixture,
    gateway: &FakeGateway,
    extra: &str,
    source: &str,
) -> Started {
    let metrics_addr = free_addr();
    let config = format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics_addr}"
rebuild_interval = "500ms"
upstream_timeout = "10s"
max_attempts = {MAX_ATTEMPTS}
drain_timeout = "10s"
{extra}

[connector.backoff]
initial = "50ms"
max = "200ms"

{source}
"#,
        gateway = gateway.url(),
    );
    let binary = fixture.binary();
    let process = Process::start(&binary, &config, &[]);
    assert!(
        wait_http(metrics_addr, "/readyz", 200, Duration::from_secs(30)).await,
        "connector not ready:\n{}",
        process.output()
    );
    fixture.started(metrics_addr);
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
    // The connector says it acknowledged all three before the broker is asked: the MQTT
    // fixture asks by taking over the connector's session, and a takeover between the
    // dead letter and the acknowledgement has the broker deliver the message again (at
    // least once, as it should), which would be dead-lettered a second time.
    assert!(
        eventually_async(WITHIN, || async {
            acknowledged(connector.metrics_addr).await >= 3.0
        })
        .await,
        "the connector did not acknowledge all three:\n{}",
        connector.process.output()
    );
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

/// Messages the connector at `metrics_addr` has acknowledged (its
/// `connector_messages_total{outcome="ack"}`).
async fn acknowledged(metrics_addr: SocketAddr) -> f64 {
    let text = crate::http_get(metrics_addr, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    crate::metric(&text, r#"connector_messages_total{outcome="ack"}"#).unwrap_or(0.0)
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
    let delivered = || {
        bodies(&gw, "kill-fn")
            .into_iter()
            .collect::<BTreeSet<_>>()
            .len()
    };
    kill_restart_and_recover(fixture, &mut connector, &topic, sent.len(), delivered).await;
}

/// SIGKILLs `connector` (which must not have delivered all `sent` messages of `topic`
/// yet), restarts it, and waits until `delivered()` (distinct messages the function got)
/// reaches `sent` and the broker holds nothing unacknowledged.
async fn kill_restart_and_recover(
    fixture: &dyn Fixture,
    connector: &mut Started,
    topic: &str,
    sent: usize,
    delivered: impl Fn() -> usize,
) {
    connector.process.kill();
    let before_restart = delivered();
    assert!(
        before_restart < sent,
        "all delivered before the kill; test proves nothing"
    );
    connector.restart().await;
    assert!(
        eventually(Duration::from_secs(60), || delivered() == sent).await,
        "lost {} messages across the kill (had {before_restart} before it):\n{}",
        sent - delivered(),
        connector.process.output()
    );
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(topic).await == 0
        })
        .await,
        "messages left unacknowledged: {}",
        fixture.unacknowledged(topic).await
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

/// A long outage of the function with no dead-letter destination (issue 16, item 4):
/// every message exhausts its attempts and is held (`on_exhausted = "block"`), comes back
/// from the broker and is held again, several times over. All along, every message stays
/// unacknowledged, nothing is dead-lettered and the connector keeps running. Once the
/// function recovers, every message reaches it (at least once) and all are acknowledged.
///
/// The outage ends once the function has failed as many attempts as it takes to exhaust
/// every message once (`MAX_ATTEMPTS × MESSAGES`), and `MESSAGES / 10` messages (or every
/// message attempted, if fewer were) have each been attempted `3 × MAX_ATTEMPTS` times or
/// more: exhausted, held, redelivered
/// and held again, several times over (a redelivered message that already used its
/// attempts gets one more each time). Not every message need be attempted during the
/// outage: held messages may keep the broker from handing out more (JetStream's
/// `max_ack_pending`, a Kafka partition parked behind a held record), or come back first
/// (moto's SQS receives oldest first, at some 50 messages a second); those are delivered
/// after the recovery like the others.
pub async fn long_outage_loses_nothing(fixture: &dyn Fixture) {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    const MESSAGES: usize = 300;
    const OUTAGE_ATTEMPTS: usize = 3 * MAX_ATTEMPTS;
    const HELD_OFTEN: usize = MESSAGES / 10;
    const OUTAGE_LIMIT: Duration = Duration::from_secs(120);
    const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

    let topic = unique("outage");
    fixture.create_topic(&topic).await;
    let up = Arc::new(AtomicBool::new(false));
    let failed: Arc<Mutex<HashMap<Vec<u8>, usize>>> = Arc::default();
    let accepted: Arc<Mutex<BTreeSet<Vec<u8>>>> = Arc::default();
    let gw = FakeGateway::start().await.unwrap();
    {
        let (up, failed, accepted) = (up.clone(), failed.clone(), accepted.clone());
        gw.function("outage-fn", &topic, move |req, _| {
            let body = req.body.to_vec();
            if up.load(SeqCst) {
                accepted.lock().unwrap().insert(body);
                Reply::ok()
            } else {
                *failed.lock().unwrap().entry(body).or_default() += 1;
                Reply::status(500)
            }
        });
    }
    let source = fixture.source_config_without_dead_letters(&topic);
    let mut connector = start_with_source(fixture, &gw, "", &source).await;
    let sent = payloads("outage", MESSAGES);
    fixture.produce(&topic, &sent).await;

    // The outage: check all along that nothing is acknowledged or dead-lettered.
    let started = Instant::now();
    let mut checks = 0u32;
    loop {
        // Read before the checks, so the last round checks after the end condition held.
        let (seen, often, total) = {
            let failed = failed.lock().unwrap();
            (
                failed.len(),
                failed.values().filter(|&&n| n >= OUTAGE_ATTEMPTS).count(),
                failed.values().sum::<usize>(),
            )
        };
        // An acknowledgement lowers the count for good. But a broker's count may be
        // approximate: moto counts SQS's visible and in-flight messages one after the
        // other, and a message received in between is counted twice (or, made visible
        // again in between, not at all). So a few reads, one of which must count every
        // message. And it may lag: a RabbitMQ quorum queue publishes its counts on a tick
        // (every 5 s), so a queue declared a moment ago reads 0 until its first tick. So
        // reads for up to 6 s, one of which must count every message. (Any message
        // acknowledged early also never reaches the function after the recovery, which
        // the end of the scenario checks exactly.)
        let mut counts = Vec::new();
        let reading = Instant::now();
        loop {
            counts.push(fixture.unacknowledged(&topic).await);
            if counts.last() >= Some(&(MESSAGES as u64))
                || reading.elapsed() > Duration::from_secs(6)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        counts.dedup();
        assert!(
            counts.last() >= Some(&(MESSAGES as u64)),
            "{counts:?} of {MESSAGES} messages unacknowledged during the outage, after {:?}: the function accepted none, so every message must stay with the broker:\n{}",
            started.elapsed(),
            connector.process.output()
        );
        let dead = fixture.dead_letters(&topic).await;
        assert!(
            dead.is_empty(),
            "{} messages reached a dead-letter destination with none configured",
            dead.len()
        );
        assert!(
            connector.process.exited().is_none(),
            "the connector exited during the outage:\n{}",
            connector.process.output()
        );
        checks += 1;
        // Where the broker hands out fewer messages than that while some are held (a
        // Kafka partition parks everything behind its held records), every message
        // attempted must have been held several times over.
        if total >= MAX_ATTEMPTS * MESSAGES && seen > 0 && often >= HELD_OFTEN.min(seen) {
            let least = failed.lock().unwrap().values().copied().min().unwrap_or(0);
            eprintln!(
                "outage: {:?}, {total} failed attempts, {seen} of {MESSAGES} messages attempted ({often} of them {OUTAGE_ATTEMPTS} times or more, the least {least} times); {checks} checks",
                started.elapsed()
            );
            break;
        }
        assert!(
            started.elapsed() < OUTAGE_LIMIT,
            "after {OUTAGE_LIMIT:?} of outage: {total} failed attempts, {seen} of {MESSAGES} messages attempted, {often} of them {OUTAGE_ATTEMPTS} times or more (held messages are not redelivered?):\n{}",
            connector.process.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The recovery: every message reaches the function, and all are acknowledged.
    up.store(true, SeqCst);
    let recovered = Instant::now();
    let delivered = || accepted.lock().unwrap().len();
    let all_delivered = eventually(RECOVERY_LIMIT, || delivered() >= MESSAGES).await;
    let missing: Vec<String> = {
        let accepted = accepted.lock().unwrap();
        sent.iter()
            .filter(|p| !accepted.contains(*p))
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    };
    assert!(
        all_delivered && missing.is_empty(),
        "{} of {MESSAGES} messages never reached the function within {RECOVERY_LIMIT:?} of its recovery (first: {:?}):\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        connector.process.output()
    );
    assert_eq!(
        *accepted.lock().unwrap(),
        sent.iter().cloned().collect::<BTreeSet<_>>(),
        "the function accepted payloads that were not sent"
    );
    let delivered_in = recovered.elapsed();
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "{} messages left unacknowledged after every one was delivered:\n{}",
        fixture.unacknowledged(&topic).await,
        connector.process.output()
    );
    eprintln!(
        "recovery: every message delivered in {delivered_in:?}, all acknowledged in {:?}",
        recovered.elapsed()
    );
    assert!(
        fixture.dead_letters(&topic).await.is_empty(),
        "dead letters written after the recovery"
    );
    let status = connector.process.terminate(WITHIN).await;
    assert!(status.success(), "exit status {status:?}");
}

/// Filters and batches (a function's `connector.filter` and `connector.batch.size`)
/// against the real broker: a filter on a JSON field of the body and filters on
/// CloudEvents attributes select exactly the matching messages, a filter that does not
/// compile disables only its own subscription, and a batching function receives every
/// message in batches of at most its size, where an item it reports failed is sent
/// again alone (or in a later batch) and the others are not. Everything is acknowledged
/// in the end.
pub async fn filters_and_batches(fixture: &dyn Fixture) {
    const MESSAGES: u64 = 24;
    const FAILS_ONCE: u64 = 7;
    let topic = unique("select");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    for (name, filter) in [
        ("even-fn", "data.n % 2 == 0"),
        ("typed-fn", "type != 'com.example.other' && size(id) > 0"),
        ("other-type-fn", "type == 'com.example.other'"),
        ("broken-fn", "data.n =="),
    ] {
        gw.function_with_annotations(
            name,
            &[("topic", topic.as_str()), ("connector.filter", filter)],
            |_, _| Reply::ok(),
        );
    }
    gw.function_with_annotations(
        "batch-fn",
        &[
            ("topic", topic.as_str()),
            ("connector.batch.size", "10"),
            ("connector.batch.window", "300ms"),
            // Ordered, a batch holds one message per key: each would wait out the window.
            ("connector.ordering", "none"),
        ],
        |req, _| {
            let items: Vec<serde_json::Value> = serde_json::from_slice(&req.body).unwrap();
            let first = req.header("x-delivery-attempt").as_deref() == Some("1");
            let failures: Vec<_> = items
                .iter()
                .filter(|e| first && e["data"]["n"] == FAILS_ONCE)
                .map(|e| serde_json::json!({"itemIdentifier": e["id"]}))
                .collect();
            Reply::ok().body(
                serde_json::json!({ "batchItemFailures": failures })
                    .to_string()
                    .as_bytes(),
            )
        },
    );
    let connector = start(fixture, &gw, &topic, "max_inflight = 32").await;
    let sent: Vec<Vec<u8>> = (0..MESSAGES)
        .map(|n| format!(r#"{{"n": {n}}}"#).into_bytes())
        .collect();
    fixture.produce(&topic, &sent).await;
    let numbers = |function: &str| -> Vec<u64> {
        gw.requests_to(function)
            .iter()
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let batched = |gw: &FakeGateway| -> Vec<Vec<u64>> {
        gw.requests_to("batch-fn")
            .iter()
            .map(|r| {
                serde_json::from_slice::<Vec<serde_json::Value>>(&r.body)
                    .unwrap()
                    .iter()
                    .map(|e| e["data"]["n"].as_u64().unwrap())
                    .collect()
            })
            .collect()
    };
    let all: BTreeSet<u64> = (0..MESSAGES).collect();
    assert!(
        eventually(WITHIN, || {
            numbers("typed-fn").iter().collect::<BTreeSet<_>>().len() == all.len()
                && batched(&gw)
                    .iter()
                    .flatten()
                    .filter(|n| **n == FAILS_ONCE)
                    .count()
                    >= 2
        })
        .await,
        "typed-fn got {:?}, batch-fn {:?}:\n{}",
        numbers("typed-fn"),
        batched(&gw),
        connector.process.output()
    );
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "messages left unacknowledged: {}",
        fixture.unacknowledged(&topic).await
    );
    let evens: BTreeSet<u64> = all.iter().copied().filter(|n| n % 2 == 0).collect();
    assert_eq!(
        numbers("even-fn").into_iter().collect::<BTreeSet<_>>(),
        evens
    );
    assert_eq!(
        numbers("typed-fn").into_iter().collect::<BTreeSet<_>>(),
        all
    );
    assert!(numbers("other-type-fn").is_empty());
    assert!(
        numbers("broken-fn").is_empty(),
        "a broken filter's function was invoked"
    );
    let batches = batched(&gw);
    assert!(batches.iter().all(|b| b.len() <= 10), "{batches:?}");
    assert!(
        batches.iter().any(|b| b.len() > 1),
        "no batch held two messages: {batches:?}"
    );
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for n in batches.iter().flatten() {
        *counts.entry(*n).or_default() += 1;
    }
    assert_eq!(counts.keys().copied().collect::<BTreeSet<_>>(), all);
    let again: Vec<_> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(
        again,
        [FAILS_ONCE],
        "only the failed item is sent again: {batches:?}"
    );
    let metrics = crate::http_get(connector.metrics_addr, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        metrics.contains(r#"connector_subscription_invalid{function="broken-fn"} 1"#),
        "{metrics}"
    );
}

/// SIGKILL while batches are in the function and others fill: after a restart every
/// message reaches the function (at least once), and all end acknowledged.
pub async fn batches_lose_nothing_across_kill(fixture: &dyn Fixture) {
    const MESSAGES: u64 = 60;
    let topic = unique("batchkill");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "batch-kill-fn",
        &[
            ("topic", topic.as_str()),
            ("connector.batch.size", "10"),
            ("connector.batch.window", "200ms"),
            ("connector.ordering", "none"),
        ],
        |_, _| Reply::ok().delay(Duration::from_millis(300)),
    );
    let mut connector = start(fixture, &gw, &topic, "max_inflight = 2").await;
    let sent: Vec<Vec<u8>> = (0..MESSAGES)
        .map(|n| format!(r#"{{"n": {n}}}"#).into_bytes())
        .collect();
    fixture.produce(&topic, &sent).await;
    let delivered = |gw: &FakeGateway| -> BTreeSet<u64> {
        gw.requests_to("batch-kill-fn")
            .iter()
            .flat_map(|r| {
                serde_json::from_slice::<Vec<serde_json::Value>>(&r.body)
                    .unwrap()
                    .into_iter()
                    .map(|e| e["data"]["n"].as_u64().unwrap())
            })
            .collect()
    };
    assert!(
        eventually(WITHIN, || !gw.requests_to("batch-kill-fn").is_empty()).await,
        "no batch before the kill:\n{}",
        connector.process.output()
    );
    let count = || delivered(&gw).len();
    kill_restart_and_recover(fixture, &mut connector, &topic, sent.len(), count).await;
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
