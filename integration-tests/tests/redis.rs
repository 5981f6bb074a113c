//! `redis-connector` end to end: the real binary against the real Redis (`REDIS_URL`,
//! default `redis://127.0.0.1:6379`) and a real HTTP gateway. Every test uses its own
//! stream and group names. The shared scenario suite runs first; then what is particular
//! to Redis: replicas sharing a group, claiming after SIGKILL, the delivery count deciding
//! dead letters, Pub/Sub, a Redis of our own (on a free loopback port) down at start and
//! restarted mid-run. The machine's shared Redis is never stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::redis_broker::{OwnRedis, RedisStreams};
use integration_tests::scenarios::{self, Fixture, eventually_async};
use integration_tests::{
    FakeGateway, Process, Reply, eventually, free_addr, http_get, metric, redis_url, unique,
    wait_http,
};
use redis::AsyncCommands;
use redis::Value;

const WITHIN: Duration = Duration::from_secs(30);

fn binary() -> PathBuf {
    integration_tests::binary("redis-connector", "redis-connector")
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

// ---------------------------------------------------------------- the shared suite

/// Filters and batches select and group messages on the real broker.
#[tokio::test]
async fn redis_filters_and_batches() {
    scenarios::filters_and_batches(&RedisStreams::new()).await;
}

/// SIGKILL mid-batch loses nothing on the real broker.
#[tokio::test]
async fn redis_batches_lose_nothing_across_kill() {
    scenarios::batches_lose_nothing_across_kill(&RedisStreams::new()).await;
}

#[tokio::test]
async fn redis_delivered_once() {
    scenarios::delivered_once(&RedisStreams::new()).await;
}

#[tokio::test]
async fn redis_scaler_follows_backlog() {
    integration_tests::keda::scaler_follows_backlog(&RedisStreams::new()).await;
}

#[tokio::test]
async fn redis_failure_then_success() {
    scenarios::failure_then_success(&RedisStreams::new()).await;
}

#[tokio::test]
async fn redis_dead_letter_on_4xx() {
    scenarios::dead_letter_on_4xx(&RedisStreams::new()).await;
}

#[tokio::test]
async fn redis_nothing_lost_across_kill() {
    scenarios::nothing_lost_across_kill(&RedisStreams::new()).await;
}

#[tokio::test]
async fn redis_drain_on_shutdown() {
    scenarios::drain_on_shutdown(&RedisStreams::new()).await;
}

/// Held entries (no dead-letter stream) stay pending through a long outage and are
/// claimed again until the function recovers.
#[tokio::test(flavor = "multi_thread")]
async fn redis_long_outage_loses_nothing() {
    scenarios::long_outage_loses_nothing(&RedisStreams::new()).await;
}

// ---------------------------------------------------------------- Redis specifics

fn config(gw: &FakeGateway, metrics_addr: SocketAddr, connector: &str, redis: &str) -> String {
    format!(
        r#"[connector]
gateway_url = "{gw}"
metrics_addr = "{metrics_addr}"
rebuild_interval = "300ms"
upstream_timeout = "10s"
max_attempts = 3
{connector}

[connector.backoff]
initial = "50ms"
max = "200ms"

{redis}
"#,
        gw = gw.url(),
    )
}

/// A connector process and its metrics address.
struct Connector {
    process: Process,
    metrics: SocketAddr,
}

impl Connector {
    async fn start(gw: &FakeGateway, connector: &str, redis: &str) -> Self {
        let c = Self::spawn(gw, connector, redis);
        assert!(
            wait_http(c.metrics, "/readyz", 200, WITHIN).await,
            "connector not ready:\n{}",
            c.process.output()
        );
        c
    }

    fn spawn(gw: &FakeGateway, connector: &str, redis: &str) -> Self {
        let metrics = free_addr();
        let process = Process::start(&binary(), &config(gw, metrics, connector, redis), &[]);
        Self { process, metrics }
    }

    async fn metrics(&self) -> String {
        http_get(self.metrics, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

fn bodies(gw: &FakeGateway, function: &str) -> Vec<Vec<u8>> {
    gw.requests_to(function)
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect()
}

fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i:04}").into_bytes())
        .collect()
}

/// Two replicas in one group split the stream between them; nothing is delivered twice.
#[tokio::test]
async fn two_replicas_share_the_work_without_duplicates() {
    let fx = RedisStreams::new();
    let topic = unique("shared");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("shared-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(20))
    });
    let source = fx.source_config(&topic);
    let a = Connector::start(&gw, "max_inflight = 4", &source).await;
    let b = Connector::start(&gw, "max_inflight = 4", &source).await;
    let sent = payloads("shared", 200);
    fx.produce(&topic, &sent).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("shared-fn").len() >= sent.len()).await,
        "only {} of {} delivered",
        gw.requests_to("shared-fn").len(),
        sent.len()
    );
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "left unacknowledged: {:?}",
        fx.backlog(&topic).await
    );
    let got = bodies(&gw, "shared-fn");
    assert_eq!(got.len(), sent.len(), "duplicates in the happy path");
    assert_eq!(
        got.into_iter().collect::<BTreeSet<_>>(),
        sent.iter().cloned().collect::<BTreeSet<_>>()
    );
    let series = r#"connector_deliveries_total{function="shared-fn",outcome="delivered"}"#;
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    let (da, db) = (
        metric(&ma, series).unwrap_or(0.0),
        metric(&mb, series).unwrap_or(0.0),
    );
    assert_eq!(da + db, sent.len() as f64);
    assert!(
        da > 0.0 && db > 0.0,
        "one replica did all the work: {da} / {db}"
    );
}

/// A replica killed mid-stream: another replica of the group claims its pending entries
/// after `claim_idle` and delivers them, with the same `ce-id` and a higher attempt.
#[tokio::test]
async fn entries_of_a_killed_replica_are_claimed_by_another() {
    let fx = RedisStreams::new();
    let topic = unique("claim");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("claim-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(400))
    });
    let source = fx.source_config(&topic);
    let mut doomed = Connector::start(&gw, "max_inflight = 8", &source).await;
    let sent = payloads("claim", 8);
    fx.produce(&topic, &sent).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("claim-fn").len() >= 8).await,
        "the first replica did not take the entries"
    );
    // All eight are in flight at the first replica (each takes 400 ms): kill it.
    doomed.process.kill();
    let (pending, _) = fx.backlog(&topic).await;
    assert!(pending > 0, "nothing left pending; the test proves nothing");
    let _survivor = Connector::start(&gw, "max_inflight = 8", &source).await;
    let delivered_again = |gw: &FakeGateway| {
        gw.requests_to("claim-fn")
            .iter()
            .filter(|r| r.header("x-delivery-attempt").as_deref() != Some("1"))
            .count()
    };
    assert!(
        eventually(WITHIN, || delivered_again(&gw) >= pending as usize).await,
        "claimed entries were not delivered again"
    );
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "left unacknowledged: {:?}",
        fx.backlog(&topic).await
    );
    let mut ids: BTreeMap<Vec<u8>, BTreeSet<String>> = BTreeMap::new();
    for r in gw.requests_to("claim-fn") {
        assert_eq!(r.header("x-redis-stream").as_deref(), Some(topic.as_str()));
        let id = r.header("x-redis-id").unwrap();
        assert_eq!(r.header("ce-id").unwrap(), format!("{topic}/{id}"));
        ids.entry(r.body.to_vec())
            .or_default()
            .insert(r.header("ce-id").unwrap());
    }
    assert_eq!(ids.len(), sent.len());
    assert!(ids.values().all(|s| s.len() == 1), "ce-id changed: {ids:?}");
    // The dead replica, holding nothing now, is removed from the group after twice
    // claim_idle; the survivor stays.
    assert!(
        eventually_async(WITHIN, || async { fx.consumers(&topic).await.len() == 1 }).await,
        "the dead consumer was not removed: {:?}",
        fx.consumers(&topic).await
    );
}

/// SIGTERM with invocations that outlast `drain_timeout`: the process exits 0 and gives its
/// entries back to the group (idle time set to `claim_idle`), so another replica claims
/// them at once instead of after `claim_idle`.
#[tokio::test]
async fn entries_cut_short_by_shutdown_are_released_to_the_group() {
    let fx = RedisStreams::new().with_claim_idle("30s");
    let topic = unique("release");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("release-fn", &topic, |_, call| {
        // The first replica's invocations hang past its drain deadline.
        Reply::ok().delay(if call < 3 {
            Duration::from_secs(20)
        } else {
            Duration::ZERO
        })
    });
    let source = fx.source_config(&topic);
    let mut first =
        Connector::start(&gw, "max_inflight = 3\ndrain_timeout = \"500ms\"", &source).await;
    fx.produce(&topic, &payloads("release", 3)).await;
    assert!(eventually(WITHIN, || gw.requests_to("release-fn").len() == 3).await);
    let status = first.process.terminate(WITHIN).await;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        fx.backlog(&topic).await.0,
        3,
        "released entries stay pending"
    );
    let _second = Connector::start(&gw, "", &source).await;
    assert!(
        eventually_async(Duration::from_secs(15), || async {
            fx.unacknowledged(&topic).await == 0
        })
        .await,
        "released entries were not claimed at once: {:?}",
        fx.backlog(&topic).await
    );
    let again: BTreeSet<Vec<u8>> = gw.requests_to("release-fn")[3..]
        .iter()
        .map(|r| r.body.to_vec())
        .collect();
    assert_eq!(again, payloads("release", 3).into_iter().collect());
}

/// With a stable consumer name, a restarted replica re-reads its own pending entries at
/// once, long before `claim_idle`.
#[tokio::test]
async fn a_restarted_consumer_rereads_its_own_pending_entries() {
    let fx = RedisStreams::new()
        .with_extra_config(&format!("consumer = \"{}\"", unique("pod")))
        .with_claim_idle("5m");
    let topic = unique("history");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("history-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(500))
    });
    let source = fx.source_config(&topic);
    let mut first = Connector::start(&gw, "max_inflight = 4", &source).await;
    let sent = payloads("history", 4);
    fx.produce(&topic, &sent).await;
    assert!(eventually(WITHIN, || gw.requests_to("history-fn").len() >= 4).await);
    first.process.kill();
    assert_eq!(fx.backlog(&topic).await.0, 4, "entries should be pending");
    let _again = Connector::start(&gw, "max_inflight = 4", &source).await;
    assert!(
        eventually_async(Duration::from_secs(20), || async {
            fx.unacknowledged(&topic).await == 0
        })
        .await,
        "own pending entries not re-read: {:?}",
        fx.backlog(&topic).await
    );
    let second: Vec<_> = gw
        .requests_to("history-fn")
        .into_iter()
        .filter(|r| r.header("x-delivery-attempt").as_deref() == Some("2"))
        .collect();
    assert_eq!(
        second.len(),
        4,
        "each entry once more, as its second delivery"
    );
}

/// An entry the group already delivered often (its delivery count) is dead-lettered after
/// one more failed attempt: `max_attempts` counts across replicas and restarts. The dead
/// letter carries provenance, and the original is acknowledged.
#[tokio::test]
async fn the_delivery_count_decides_the_dead_letter() {
    let fx = RedisStreams::new();
    let topic = unique("poison");
    fx.create_topic(&topic).await;
    fx.produce(&topic, &[b"poison".to_vec()]).await;
    // A consumer that died after five deliveries of the entry.
    let mut c = fx.conn().await;
    let read: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(fx.group())
        .arg("ghost")
        .arg("STREAMS")
        .arg(&topic)
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_ne!(read, Value::Nil);
    let id: String = {
        let ids: Value = redis::cmd("XPENDING")
            .arg(&topic)
            .arg(fx.group())
            .arg("-")
            .arg("+")
            .arg(1)
            .query_async(&mut c)
            .await
            .unwrap();
        match ids {
            Value::Array(rows) => match &rows[0] {
                Value::Array(row) => match &row[0] {
                    Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    };
    let _: Value = redis::cmd("XCLAIM")
        .arg(&topic)
        .arg(fx.group())
        .arg("ghost")
        .arg(0)
        .arg(&id)
        .arg("IDLE")
        .arg(600_000)
        .arg("RETRYCOUNT")
        .arg(5)
        .arg("JUSTID")
        .query_async(&mut c)
        .await
        .unwrap();
    let gw = FakeGateway::start().await.unwrap();
    gw.function("poison-fn", &topic, |_, _| Reply::status(503).body(b"busy"));
    let _connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    assert!(
        eventually_async(WITHIN, || async {
            !fx.dead_letters(&topic).await.is_empty()
        })
        .await,
        "not dead-lettered"
    );
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "the original was not acknowledged"
    );
    let requests = gw.requests_to("poison-fn");
    assert_eq!(
        requests.len(),
        1,
        "one attempt after five deliveries elsewhere"
    );
    assert_eq!(
        requests[0].header("x-delivery-attempt").as_deref(),
        Some("6")
    );
    let letters = fx.dead_letter_entries(&topic).await;
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    let text = |k: &str| String::from_utf8(l.get(k).cloned().unwrap_or_default()).unwrap();
    assert_eq!(text("payload"), "poison");
    assert_eq!(text("x-dead-letter-function"), "poison-fn");
    assert_eq!(text("x-dead-letter-reason"), "exhausted");
    assert_eq!(text("x-dead-letter-status"), "503");
    assert_eq!(text("x-dead-letter-response"), "busy");
    assert_eq!(text("x-dead-letter-attempts"), "6");
    assert_eq!(text("x-dead-letter-source-stream"), topic);
    assert_eq!(text("x-dead-letter-source-id"), id);
    assert_eq!(text("x-dead-letter-id"), format!("{topic}/{id}"));
}

/// An entry without the configured body field is delivered as the whole entry in JSON,
/// never dropped; the content type comes from the configured field.
#[tokio::test]
async fn entries_without_the_body_field_arrive_as_json() {
    let fx = RedisStreams::new().with_extra_config("content_type_field = \"ct\"");
    let topic = unique("shape");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("shape-fn", &topic, |_, _| Reply::ok());
    let connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    let mut c = fx.conn().await;
    let _: String = c
        .xadd(
            &topic,
            "*",
            &[("payload", "<p>hi</p>"), ("ct", "text/html")],
        )
        .await
        .unwrap();
    let _: String = c
        .xadd(&topic, "*", &[("order", "7"), ("amount", "9.50")])
        .await
        .unwrap();
    assert!(eventually(WITHIN, || gw.requests_to("shape-fn").len() == 2).await);
    let r = gw.requests_to("shape-fn");
    let html = r.iter().find(|r| r.body.as_ref() == b"<p>hi</p>").unwrap();
    assert_eq!(html.header("content-type").as_deref(), Some("text/html"));
    let json = r.iter().find(|r| r.body.starts_with(b"{")).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
    assert_eq!(parsed, serde_json::json!({"order": "7", "amount": "9.50"}));
    assert_eq!(
        json.header("content-type").as_deref(),
        Some("application/json")
    );
    let text = connector.metrics().await;
    assert_eq!(
        metric(
            &text,
            &format!("connector_redis_body_field_missing_total{{stream=\"{topic}\"}}")
        ),
        Some(1.0)
    );
}

/// Pending entries and group lag are exported per stream, and fall back to zero once the
/// function caught up.
#[tokio::test]
async fn backlog_metrics_follow_pending_and_lag() {
    let fx = RedisStreams::new();
    let topic = unique("backlog");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("backlog-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(150))
    });
    let connector = Connector::start(&gw, "max_inflight = 1", &fx.source_config(&topic)).await;
    fx.produce(&topic, &payloads("backlog", 20)).await;
    let series = |name: &str| format!("{name}{{stream=\"{topic}\"}}");
    let backlog = format!("connector_backlog_messages{{topic=\"{topic}\",partition=\"\"}}");
    assert!(
        eventually_async(WITHIN, || async {
            let t = connector.metrics().await;
            metric(&t, &series("connector_redis_pending_entries")).unwrap_or(0.0) >= 1.0
                && metric(&t, &series("connector_redis_group_lag")).unwrap_or(0.0) >= 1.0
                && metric(&t, &backlog).unwrap_or(0.0) >= 2.0
        })
        .await,
        "no backlog seen:\n{}",
        connector.metrics().await
    );
    assert!(
        eventually_async(WITHIN, || async {
            let t = connector.metrics().await;
            metric(&t, &series("connector_redis_pending_entries")) == Some(0.0)
                && metric(&t, &series("connector_redis_group_lag")) == Some(0.0)
                && metric(&t, &backlog) == Some(0.0)
        })
        .await,
        "backlog did not drop to zero:\n{}",
        connector.metrics().await
    );
}

/// With topics from the topic map, a function subscribing to a new stream is served
/// without a restart.
#[tokio::test]
async fn follows_topic_map_changes() {
    let fx = RedisStreams::new();
    let first = unique("follow-a");
    let second = unique("follow-b");
    fx.create_topic(&first).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("follow-a-fn", &first, |_, _| Reply::ok());
    let _connector = Connector::start(&gw, "", &fx.source_config(&first)).await;
    fx.produce(&first, &[b"a".to_vec()]).await;
    assert!(eventually(WITHIN, || gw.requests_to("follow-a-fn").len() == 1).await);
    gw.function("follow-b-fn", &second, |_, _| Reply::ok());
    fx.produce(&second, &[b"b".to_vec()]).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("follow-b-fn").len() == 1).await,
        "the new stream was not consumed"
    );
}

/// Pub/Sub mode: channels and patterns, delivered with their channel.
#[tokio::test]
async fn pubsub_delivers_channels_and_patterns() {
    let channel = unique("chan");
    let prefix = unique("pat");
    let pattern = format!("{prefix}.*");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("chan-fn", &channel, |_, _| Reply::ok());
    gw.function("pat-fn", &pattern, |_, _| Reply::ok());
    let _connector = Connector::start(
        &gw,
        "",
        &format!("[redis]\nurl = \"{}\"\nmode = \"pubsub\"\n", redis_url()),
    )
    .await;
    let mut c = connection(&redis_url()).await;
    // Subscribed before ready, so one subscriber hears each message.
    let heard: i64 = c.publish(&channel, "hello").await.unwrap();
    assert_eq!(heard, 1);
    let heard: i64 = c.publish(format!("{prefix}.eu"), "bonjour").await.unwrap();
    assert_eq!(heard, 1);
    assert!(eventually(WITHIN, || gw.requests_to("chan-fn").len() == 1).await);
    assert!(eventually(WITHIN, || gw.requests_to("pat-fn").len() == 1).await);
    let plain = &gw.requests_to("chan-fn")[0];
    assert_eq!(plain.body.as_ref(), b"hello");
    assert_eq!(
        plain.header("x-redis-channel").as_deref(),
        Some(channel.as_str())
    );
    let matched = &gw.requests_to("pat-fn")[0];
    assert_eq!(matched.body.as_ref(), b"bonjour");
    assert_eq!(matched.header("x-topic").as_deref(), Some(pattern.as_str()));
    assert_eq!(
        matched.header("x-redis-channel"),
        Some(format!("{prefix}.eu"))
    );
    assert_eq!(
        matched.header("x-redis-pattern").as_deref(),
        Some(pattern.as_str())
    );
}

/// Redis down at start: not ready, retried with backoff; up: ready and delivering;
/// restarted empty mid-run: not ready meanwhile, then the group is created again and
/// delivery resumes.
#[tokio::test]
async fn redis_down_at_start_and_restarted_mid_run() {
    let mut own = OwnRedis::new();
    let fx = RedisStreams::new().with_url(own.url());
    let topic = unique("restart");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("restart-fn", &topic, |_, _| Reply::ok());
    let connector = Connector::spawn(&gw, "", &fx.source_config(&topic));
    assert!(
        wait_http(connector.metrics, "/healthz", 200, WITHIN).await,
        "not serving health:\n{}",
        connector.process.output()
    );
    let (status, body) = http_get(connector.metrics, "/readyz").await.unwrap();
    assert_eq!(status, 503, "ready without Redis: {body}");
    own.start().await;
    assert!(
        wait_http(connector.metrics, "/readyz", 200, WITHIN).await,
        "not ready once Redis is up:\n{}",
        connector.process.output()
    );
    fx.produce(&topic, &[b"before".to_vec()]).await;
    assert!(eventually(WITHIN, || gw.requests_to("restart-fn").len() == 1).await);

    own.stop();
    assert!(
        wait_http(connector.metrics, "/readyz", 503, WITHIN).await,
        "still ready with Redis down"
    );
    own.start().await;
    assert!(
        wait_http(connector.metrics, "/readyz", 200, WITHIN).await,
        "not ready after Redis came back:\n{}",
        connector.process.output()
    );
    // The restarted Redis is empty: the connector created the stream and group again.
    assert!(
        eventually_async(WITHIN, || async {
            let mut c = fx.conn().await;
            let groups: redis::RedisResult<Value> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&topic)
                .query_async(&mut c)
                .await;
            matches!(groups, Ok(Value::Array(g)) if !g.is_empty())
        })
        .await,
        "group not created again"
    );
    fx.produce(&topic, &[b"after".to_vec()]).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("restart-fn").len() == 2).await,
        "not delivering after the restart:\n{}",
        connector.process.output()
    );
    assert_eq!(
        bodies(&gw, "restart-fn"),
        [b"before".to_vec(), b"after".to_vec()]
    );
}

/// `rediss://` with a private CA (`tls_ca_file`): consumed over TLS end to end.
#[tokio::test]
async fn streams_over_tls_with_a_private_ca() {
    let mut own = OwnRedis::new();
    let ca = own.start_tls().await;
    let url = format!("rediss://127.0.0.1:{}", own.port());
    let fx = RedisStreams::new()
        .with_url(url)
        .with_extra_config(&format!("tls_ca_file = \"{}\"", ca.display()))
        .with_tls_ca(ca);
    let topic = unique("tls");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("tls-fn", &topic, |_, _| Reply::ok());
    // The connector verifies the server's certificate against the CA.
    let connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    fx.produce(&topic, &[b"secret".to_vec()]).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("tls-fn").len() == 1).await,
        "not delivered over TLS:\n{}",
        connector.process.output()
    );
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "not acknowledged over TLS"
    );
}

/// With no dead-letter stream, a delivery that fails for good is not acknowledged: the
/// entry stays pending, is claimed again after `claim_idle` and retried.
#[tokio::test]
async fn held_entries_stay_pending_and_are_retried() {
    let fx = RedisStreams::new().with_extra_config("dead_letter_stream = \"\"");
    let topic = unique("held");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("held-fn", &topic, |_, call| {
        if call == 0 {
            Reply::status(422)
        } else {
            Reply::ok()
        }
    });
    let _connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    fx.produce(&topic, &[b"held".to_vec()]).await;
    assert!(eventually(WITHIN, || gw.requests_to("held-fn").len() == 1).await);
    assert_eq!(
        fx.backlog(&topic).await.0,
        1,
        "a rejected entry without a dead-letter stream must stay pending"
    );
    assert!(
        eventually(WITHIN, || gw.requests_to("held-fn").len() == 2).await,
        "the held entry was not retried"
    );
    let second = &gw.requests_to("held-fn")[1];
    assert_eq!(second.header("x-delivery-attempt").as_deref(), Some("2"));
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "not acknowledged after the retry succeeded"
    );
    assert!(fx.dead_letters(&topic).await.is_empty());
}

/// `ordering = "key"`: entries with the same key field one after another, in stream
/// order; different keys in parallel.
#[tokio::test]
async fn key_ordering_serialises_each_key() {
    let fx = RedisStreams::new().with_extra_config("key_field = \"user\"");
    let topic = unique("ordered");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(150))
    });
    let _connector = Connector::start(
        &gw,
        "max_inflight = 8\nordering = \"key\"",
        &fx.source_config(&topic),
    )
    .await;
    let mut c = fx.conn().await;
    let mut pipe = redis::pipe();
    for i in 0..4 {
        for user in ["ann", "bob"] {
            pipe.cmd("XADD")
                .arg(&topic)
                .arg("*")
                .arg("user")
                .arg(user)
                .arg("payload")
                .arg(format!("{user}-{i}"))
                .ignore();
        }
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    assert!(eventually(WITHIN, || gw.requests_to("ordered-fn").len() == 8).await);
    let requests = gw.requests_to("ordered-fn");
    for user in ["ann", "bob"] {
        let mine: Vec<_> = requests
            .iter()
            .filter(|r| r.body.starts_with(user.as_bytes()))
            .collect();
        let order: Vec<String> = mine
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect();
        let expected: Vec<String> = (0..4).map(|i| format!("{user}-{i}")).collect();
        assert_eq!(order, expected, "out of order for {user}");
        for pair in mine.windows(2) {
            assert!(
                pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(140),
                "{user}: the next entry started before the previous one finished"
            );
        }
    }
    let first_ann = requests
        .iter()
        .find(|r| r.body.starts_with(b"ann"))
        .unwrap();
    let first_bob = requests
        .iter()
        .find(|r| r.body.starts_with(b"bob"))
        .unwrap();
    let apart = if first_ann.at > first_bob.at {
        first_ann.at.duration_since(first_bob.at)
    } else {
        first_bob.at.duration_since(first_ann.at)
    };
    assert!(
        apart < Duration::from_millis(140),
        "different keys did not run in parallel"
    );
}
