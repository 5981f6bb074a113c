//! `rabbitmq-connector` end to end: the real binary against the real RabbitMQ
//! (`RABBITMQ_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`) and a real HTTP
//! gateway. Every test uses its own queues and exchanges. The shared scenario suite runs
//! first (on quorum queues, and the happy path on a classic one); then what is particular
//! to RabbitMQ: replicas sharing a queue, order per routing key, topic-exchange patterns,
//! AMQP headers, dead-letter provenance, a missing queue with `declare = false`, replies
//! to requests with `reply_to` (AMQP RPC).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::rabbitmq_broker::RabbitQueues;
use integration_tests::scenarios::{self, Fixture, eventually_async};
use integration_tests::{
    FakeGateway, Process, Reply, eventually, free_addr, http_get, metric, unique, wait_http,
};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

const WITHIN: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- the shared suite

/// Filters and batches select and group messages on the real broker.
#[tokio::test]
async fn rabbitmq_filters_and_batches() {
    scenarios::filters_and_batches(&RabbitQueues::new()).await;
}

/// SIGKILL mid-batch loses nothing on the real broker.
#[tokio::test]
async fn rabbitmq_batches_lose_nothing_across_kill() {
    scenarios::batches_lose_nothing_across_kill(&RabbitQueues::new()).await;
}

#[tokio::test]
async fn rabbitmq_delivered_once() {
    scenarios::delivered_once(&RabbitQueues::new()).await;
}

#[tokio::test]
async fn rabbitmq_scaler_follows_backlog() {
    integration_tests::keda::scaler_follows_backlog(&RabbitQueues::new()).await;
}

#[tokio::test]
async fn rabbitmq_classic_queue_delivered_once() {
    scenarios::delivered_once(&RabbitQueues::new().classic()).await;
}

#[tokio::test]
async fn rabbitmq_failure_then_success() {
    scenarios::failure_then_success(&RabbitQueues::new()).await;
}

#[tokio::test]
async fn rabbitmq_dead_letter_on_4xx() {
    scenarios::dead_letter_on_4xx(&RabbitQueues::new()).await;
}

#[tokio::test]
async fn rabbitmq_nothing_lost_across_kill() {
    scenarios::nothing_lost_across_kill(&RabbitQueues::new()).await;
}

#[tokio::test]
async fn rabbitmq_drain_on_shutdown() {
    scenarios::drain_on_shutdown(&RabbitQueues::new()).await;
}

/// Held messages (no dead-letter exchange) stay unacknowledged through a long outage and
/// are requeued after `hold_delay` until the function recovers.
#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_long_outage_loses_nothing() {
    scenarios::long_outage_loses_nothing(&RabbitQueues::new()).await;
}

// ---------------------------------------------------------------- RabbitMQ specifics

fn config(gw: &FakeGateway, metrics_addr: SocketAddr, connector: &str, rabbitmq: &str) -> String {
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

{rabbitmq}
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
    async fn start(gw: &FakeGateway, connector: &str, rabbitmq: &str) -> Self {
        let metrics = free_addr();
        let process = Process::start(
            &RabbitQueues::new().binary(),
            &config(gw, metrics, connector, rabbitmq),
            &[],
        );
        assert!(
            wait_http(metrics, "/readyz", 200, WITHIN).await,
            "connector not ready:\n{}",
            process.output()
        );
        Self { process, metrics }
    }

    async fn metrics(&self) -> String {
        http_get(self.metrics, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i:04}").into_bytes())
        .collect()
}

/// Two replicas consuming one queue split its messages; none is delivered twice.
#[tokio::test]
async fn two_replicas_share_a_queue_without_duplicates() {
    let fx = RabbitQueues::new();
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
        "left unacknowledged"
    );
    let got: Vec<Vec<u8>> = gw
        .requests_to("shared-fn")
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect();
    assert_eq!(got.len(), sent.len(), "a message reached both replicas");
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

/// With `ordering = "key"`, messages of one routing key reach the function one after
/// another in queue order, while keys run in parallel; the function subscribes with a
/// topic-exchange pattern.
#[tokio::test]
async fn order_is_kept_per_routing_key() {
    let fx = RabbitQueues::new();
    let p = unique("order");
    fx.declare(&p, &format!("{p}.*")).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered", &format!("{p}.*"), |req, _| {
        // Uneven durations: without ordering, later messages would overtake.
        let n: u64 = String::from_utf8_lossy(&req.body)
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Reply::ok().delay(Duration::from_millis((n * 7) % 20))
    });
    let _connector = Connector::start(
        &gw,
        "ordering = \"key\"\nmax_inflight = 32",
        &fx.source_config(&p),
    )
    .await;
    let keys: Vec<String> = (0..3).map(|i| format!("{p}.k{i}")).collect();
    for n in 0..20 {
        for k in &keys {
            fx.publish(
                k,
                &[format!("{k}-{n}").into_bytes()],
                &FieldTable::default(),
            )
            .await;
        }
    }
    assert!(eventually(WITHIN, || gw.requests_to("ordered").len() >= 60).await);
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in gw.requests_to("ordered") {
        let body = String::from_utf8_lossy(&r.body).into_owned();
        let (k, n) = body.rsplit_once('-').unwrap();
        assert_eq!(r.header("x-topic").as_deref(), Some(k));
        per_key
            .entry(k.to_owned())
            .or_default()
            .push(n.parse().unwrap());
    }
    assert_eq!(per_key.len(), 3);
    for (k, seq) in per_key {
        assert_eq!(seq, (0..20).collect::<Vec<u64>>(), "out of order on {k}");
    }
}

/// Topic-exchange patterns in annotations: `*` one word, `#` any; the connector binds
/// each function's pattern and a message reaches each matching function once.
#[tokio::test]
async fn topic_patterns_bind_and_match_as_the_broker_does() {
    let fx = RabbitQueues::new();
    let p = unique("pat");
    // The queue exists with no bindings: the connector makes them from the topic map.
    fx.declare(&p, &format!("{p}.unused")).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("one-word", &format!("{p}.*"), |_, _| Reply::ok());
    gw.function("any", &format!("{p}.#"), |_, _| Reply::ok());
    let _connector = Connector::start(&gw, "", &fx.source_config(&p)).await;
    fx.publish(
        &format!("{p}.a"),
        &[b"short".to_vec()],
        &FieldTable::default(),
    )
    .await;
    fx.publish(
        &format!("{p}.a.b"),
        &[b"long".to_vec()],
        &FieldTable::default(),
    )
    .await;
    assert!(eventually(WITHIN, || gw.requests_to("any").len() >= 2).await);
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&p).await == 0 }).await,
        "left unacknowledged"
    );
    let bodies = |f: &str| -> Vec<Vec<u8>> {
        gw.requests_to(f)
            .into_iter()
            .map(|r| r.body.to_vec())
            .collect()
    };
    assert_eq!(bodies("one-word"), [b"short".to_vec()]);
    let mut any = bodies("any");
    any.sort();
    assert_eq!(any, [b"long".to_vec(), b"short".to_vec()]);
}

/// AMQP headers reach the function (a publisher's `X-Rabbitmq-*` and `Host` do not), and
/// a dead letter carries them with the provenance and the original routing key.
#[tokio::test]
async fn headers_reach_the_function_and_the_dead_letter() {
    let fx = RabbitQueues::new();
    let topic = unique("hdr");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("hdr-fn", &topic, |_, _| {
        Reply::status(400).body(b"no thanks")
    });
    let connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
    headers.insert("x-priority-level".into(), AMQPValue::LongInt(3));
    headers.insert(
        "X-Rabbitmq-Queue".into(),
        AMQPValue::LongString("spoofed".into()),
    );
    headers.insert("Host".into(), AMQPValue::LongString("evil.example".into()));
    fx.publish(&topic, &[b"payload".to_vec()], &headers).await;
    assert!(
        eventually_async(WITHIN, || async {
            !fx.dead_letters(&topic).await.is_empty()
        })
        .await,
        "no dead letter:\n{}",
        connector.process.output()
    );
    let r = &gw.requests_to("hdr-fn")[0];
    assert_eq!(r.header("x-tenant").as_deref(), Some("acme"));
    assert_eq!(r.header("x-priority-level").as_deref(), Some("3"));
    assert_eq!(
        r.header("x-rabbitmq-queue").as_deref(),
        Some(topic.as_str())
    );
    assert_eq!(
        r.header("x-rabbitmq-exchange").as_deref(),
        Some(fx.exchange())
    );
    assert_eq!(
        r.header("x-rabbitmq-routing-key").as_deref(),
        Some(topic.as_str())
    );
    assert_ne!(r.header("host").as_deref(), Some("evil.example"));
    let letters = fx.browse(&RabbitQueues::dead_letter_queue(&topic)).await;
    assert_eq!(letters.len(), 1);
    let (props, body) = &letters[0];
    assert_eq!(body, b"payload");
    let table = props.headers().clone().unwrap_or_default();
    let text = |name: &str| match table.inner().get(name) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    };
    assert_eq!(text("x-dead-letter-function").as_deref(), Some("hdr-fn"));
    assert_eq!(text("x-dead-letter-status").as_deref(), Some("400"));
    assert_eq!(text("x-dead-letter-response").as_deref(), Some("no thanks"));
    assert_eq!(text("x-dead-letter-topic").as_deref(), Some(topic.as_str()));
    assert_eq!(
        text("x-dead-letter-source-queue").as_deref(),
        Some(topic.as_str())
    );
    assert_eq!(text("x-tenant").as_deref(), Some("acme"));
    assert_eq!(
        props.delivery_mode(),
        &Some(2),
        "dead letters are persistent"
    );
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "the rejected message was not acknowledged after its dead letter was confirmed"
    );
    let m = connector.metrics().await;
    assert_eq!(
        metric(
            &m,
            &format!(r#"connector_rabbitmq_queue_messages_ready{{queue="{topic}"}}"#)
        ),
        Some(0.0),
        "{m}"
    );
}

/// With `declare = false` a queue that does not exist stops the connector at start, with
/// a non-zero exit naming the queue.
#[tokio::test]
async fn a_missing_queue_without_declare_stops_the_connector() {
    let fx = RabbitQueues::new().with_extra_config("declare = false");
    let topic = unique("missing");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("missing-fn", &topic, |_, _| Reply::ok());
    let mut process = Process::start(
        &fx.binary(),
        &config(&gw, free_addr(), "", &fx.source_config(&topic)),
        &[],
    );
    let status = process.wait(WITHIN).await;
    assert!(!status.success(), "{}", process.output());
    let output = process.output();
    assert!(
        output.contains("NOT_FOUND") || output.contains("NOT-FOUND"),
        "{output}"
    );
    assert!(output.contains(&topic), "{output}");
}

// ---------------------------------------------------------------- replies (AMQP RPC)

/// A request: `reply_to` and `correlation_id` set.
fn request(reply_to: &str, correlation_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_reply_to(reply_to.into())
        .with_correlation_id(correlation_id.into())
}

/// A header of an AMQP message as text.
fn amqp_header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// A request with `reply_to` and `correlation_id` gets exactly one reply: the function's
/// body, the request's correlation id, the response's content type and status. The reply
/// is confirmed before the request is acknowledged, so once it is acknowledged the reply
/// is in the requester's queue.
#[tokio::test]
async fn a_request_gets_one_reply_with_the_functions_response() {
    let fx = RabbitQueues::new();
    let topic = unique("rpc");
    fx.create_topic(&topic).await;
    let replies = unique("rpc-replies");
    fx.declare_reply_queue(&replies).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("rpc-fn", &topic, |req, _| {
        let mut body = b"echo:".to_vec();
        body.extend_from_slice(&req.body);
        Reply::status(201)
            .header("content-type", "application/json")
            .body(&body)
    });
    let connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut traced = FieldTable::default();
    traced.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    fx.publish_with(
        &topic,
        b"ping",
        request(&replies, "corr-42").with_headers(traced),
    )
    .await;
    assert!(
        eventually_async(WITHIN, || async {
            !gw.requests_to("rpc-fn").is_empty() && fx.unacknowledged(&topic).await == 0
        })
        .await,
        "the request was not delivered and acknowledged:\n{}",
        connector.process.output()
    );
    let got = fx.browse(&replies).await;
    assert_eq!(got.len(), 1, "exactly one reply");
    let (props, body) = &got[0];
    assert_eq!(body, b"echo:ping");
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-42")
    );
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(
        amqp_header(props, "X-Function-Status").as_deref(),
        Some("201")
    );
    assert_eq!(amqp_header(props, "X-Function").as_deref(), Some("rpc-fn"));
    assert_eq!(amqp_header(props, "x-connector-hops").as_deref(), Some("1"));
    assert_eq!(
        amqp_header(props, "traceparent").as_deref(),
        Some(traceparent),
        "the reply is in the request's trace"
    );
    assert_eq!(props.reply_to(), &None, "a reply asks for no reply");
    assert_eq!(gw.requests_to("rpc-fn").len(), 1);
    let m = connector.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"connector_rabbitmq_replies_total{result="published"}"#
        ),
        Some(1.0),
        "{m}"
    );
    fx.delete_queue(&replies).await;
}

/// With `reply = false` a request is delivered and acknowledged, and nothing is replied.
#[tokio::test]
async fn replies_off_publish_nothing() {
    let fx = RabbitQueues::new().with_extra_config("reply = false");
    let topic = unique("rpc-off");
    fx.create_topic(&topic).await;
    let replies = unique("rpc-off-replies");
    fx.declare_reply_queue(&replies).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("rpc-off-fn", &topic, |_, _| Reply::ok().body(b"pong"));
    let connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    fx.publish_with(&topic, b"ping", request(&replies, "c-1"))
        .await;
    assert!(
        eventually_async(WITHIN, || async {
            !gw.requests_to("rpc-off-fn").is_empty() && fx.unacknowledged(&topic).await == 0
        })
        .await,
        "the request was not delivered and acknowledged:\n{}",
        connector.process.output()
    );
    assert!(
        fx.browse(&replies).await.is_empty(),
        "a reply with replies off"
    );
    let m = connector.metrics().await;
    assert!(!m.contains("connector_rabbitmq_replies_total{"), "{m}");
    fx.delete_queue(&replies).await;
}

/// A message without `reply_to` gets no reply; one whose `reply_to` no queue takes (the
/// requester is gone) is acknowledged all the same, its reply counted as unroutable.
#[tokio::test]
async fn only_requests_with_a_reachable_reply_to_get_replies() {
    let fx = RabbitQueues::new();
    let topic = unique("rpc-mixed");
    fx.create_topic(&topic).await;
    let replies = unique("rpc-mixed-replies");
    fx.declare_reply_queue(&replies).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("rpc-mixed-fn", &topic, |req, _| Reply::ok().body(&req.body));
    let connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    let plain = BasicProperties::default().with_correlation_id("no-reply-to".into());
    fx.publish_with(&topic, b"plain", plain).await;
    fx.publish_with(&topic, b"gone", request(&unique("nobody"), "c-gone"))
        .await;
    fx.publish_with(&topic, b"asked", request(&replies, "c-asked"))
        .await;
    assert!(
        eventually_async(WITHIN, || async {
            gw.requests_to("rpc-mixed-fn").len() >= 3 && fx.unacknowledged(&topic).await == 0
        })
        .await,
        "not all delivered and acknowledged:\n{}",
        connector.process.output()
    );
    let got = fx.browse(&replies).await;
    assert_eq!(got.len(), 1, "one reply, to the one request");
    assert_eq!(got[0].1, b"asked");
    let m = connector.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"connector_rabbitmq_replies_total{result="published"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"connector_rabbitmq_replies_total{result="unroutable"}"#
        ),
        Some(1.0),
        "{m}"
    );
    fx.delete_queue(&replies).await;
}
