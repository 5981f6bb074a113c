//! `sqs-connector` end to end against moto's SQS server (`SQS_ENDPOINT`, default
//! `http://127.0.0.1:4566`; scripts/test.sh starts it): the shared scenario suite, then
//! FIFO order per group, redelivery after SIGKILL once the visibility timeout lapses, the
//! heartbeat, headers, and startup failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};
use integration_tests::scenarios::{self, Fixture, eventually_async};
use integration_tests::sqs_broker::SqsQueues;
use integration_tests::{
    FakeGateway, Process, Reply, eventually, free_addr, http_get, metric, sqs_endpoint, unique,
    wait_http,
};

const WITHIN: Duration = Duration::from_secs(30);

/// Filters and batches select and group messages on the real broker.
#[tokio::test]
async fn sqs_filters_and_batches() {
    scenarios::filters_and_batches(&SqsQueues::new()).await;
}

/// SIGKILL mid-batch loses nothing on the real broker.
#[tokio::test]
async fn sqs_batches_lose_nothing_across_kill() {
    scenarios::batches_lose_nothing_across_kill(&SqsQueues::new()).await;
}

#[tokio::test]
async fn sqs_delivered_once() {
    scenarios::delivered_once(&SqsQueues::new()).await;
}

#[tokio::test]
async fn sqs_scaler_follows_backlog() {
    integration_tests::keda::scaler_follows_backlog(&SqsQueues::new()).await;
}

#[tokio::test]
async fn sqs_failure_then_success() {
    scenarios::failure_then_success(&SqsQueues::new()).await;
}

#[tokio::test]
async fn sqs_dead_letter_on_4xx() {
    scenarios::dead_letter_on_4xx(&SqsQueues::new()).await;
}

#[tokio::test]
async fn sqs_nothing_lost_across_kill() {
    scenarios::nothing_lost_across_kill(&SqsQueues::new()).await;
}

#[tokio::test]
async fn sqs_drain_on_shutdown() {
    scenarios::drain_on_shutdown(&SqsQueues::new()).await;
}

/// Held messages (no dead-letter queue, no redrive policy) become visible again after a
/// backoff and are received again until the function recovers; none is deleted early.
#[tokio::test(flavor = "multi_thread")]
async fn sqs_long_outage_loses_nothing() {
    scenarios::long_outage_loses_nothing(&SqsQueues::new()).await;
}

/// Fast retries: the backoff for most tests.
const FAST_BACKOFF: &str = "initial = \"50ms\"\nmax = \"200ms\"";

/// A connector for `queue` with `sqs_extra` in `[sqs]` and `connector_extra` in
/// `[connector]`, ready.
async fn start(
    gw: &FakeGateway,
    queue: &str,
    connector_extra: &str,
    sqs_extra: &str,
) -> (Process, std::net::SocketAddr) {
    start_with(
        gw,
        connector_extra,
        FAST_BACKOFF,
        &SqsQueues::section(queue, sqs_extra),
    )
    .await
}

/// A connector with `connector_extra` in `[connector]`, `backoff` as
/// `[connector.backoff]` and `sqs` as its `[sqs]` section, ready.
async fn start_with(
    gw: &FakeGateway,
    connector_extra: &str,
    backoff: &str,
    sqs: &str,
) -> (Process, std::net::SocketAddr) {
    let metrics_addr = free_addr();
    let config = format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics_addr}"
rebuild_interval = "500ms"
upstream_timeout = "10s"
drain_timeout = "5s"
{connector_extra}

[connector.backoff]
{backoff}

{sqs}
"#,
        gateway = gw.url(),
    );
    let binary = integration_tests::binary("sqs-connector", "sqs-connector");
    let process = Process::start(&binary, &config, &[]);
    assert!(
        wait_http(metrics_addr, "/readyz", 200, WITHIN).await,
        "connector not ready:\n{}",
        process.output()
    );
    (process, metrics_addr)
}

/// Messages of one MessageGroupId arrive in the order sent, though the groups are
/// interleaved and consumed in parallel.
#[tokio::test]
async fn sqs_fifo_order_per_group() {
    let sqs = SqsQueues::new();
    let queue = format!("{}.fifo", unique("fifo"));
    let url = sqs.create_queue(&queue).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("fifo-fn", &queue, |_, _| {
        Reply::ok().delay(Duration::from_millis(10))
    });
    let (mut connector, _) = start(&gw, &queue, "", "").await;
    let groups = ["g-a", "g-b", "g-c"];
    let per_group = 12;
    let mut n = 0;
    for i in 0..per_group {
        for (g, group) in groups.iter().enumerate() {
            sqs.client()
                .send_message()
                .queue_url(&url)
                .message_body(format!("{group}:{i:03}"))
                .message_group_id(*group)
                .message_deduplication_id(format!("{g}-{i}"))
                .send()
                .await
                .unwrap();
            n += 1;
        }
    }
    assert!(
        eventually(WITHIN, || gw.requests_to("fifo-fn").len() >= n).await,
        "only {} of {n} delivered:\n{}",
        gw.requests_to("fifo-fn").len(),
        connector.output()
    );
    let mut by_group: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in gw.requests_to("fifo-fn") {
        let body = String::from_utf8(r.body.to_vec()).unwrap();
        let (group, _) = body.split_once(':').unwrap();
        assert_eq!(r.header("x-sqs-message-group-id").as_deref(), Some(group));
        by_group.entry(group.to_owned()).or_default().push(body);
    }
    for (group, bodies) in &by_group {
        let mut sorted = bodies.clone();
        sorted.sort();
        assert_eq!(bodies, &sorted, "group {group} out of order");
        assert_eq!(
            bodies.len(),
            per_group,
            "group {group}: duplicates or losses"
        );
    }
    assert!(
        eventually_async(WITHIN, || async { sqs.unacknowledged(&queue).await == 0 }).await,
        "FIFO messages left undeleted"
    );
    assert!(connector.terminate(WITHIN).await.success());
}

/// SIGKILL while a function runs: the message is not deleted, stays invisible until its
/// visibility timeout lapses, and is then delivered again with its receive count, the
/// same `ce-id`, and the attempt counting on.
#[tokio::test]
async fn sqs_visibility_redelivery_after_sigkill() {
    let sqs = SqsQueues::new();
    let queue = unique("visibility");
    sqs.create_queue(&queue).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow-fn", &queue, |req, _| {
        if req.header("x-sqs-receive-count").as_deref() == Some("1") {
            Reply::ok().delay(Duration::from_secs(60))
        } else {
            Reply::ok()
        }
    });
    let (mut connector, _) = start(&gw, &queue, "", "").await;
    sqs.produce(&queue, &[b"only".to_vec()]).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("slow-fn").len() == 1).await,
        "not delivered:\n{}",
        connector.output()
    );
    connector.kill();
    assert_eq!(
        sqs.unacknowledged(&queue).await,
        1,
        "deleted before completion"
    );
    let (mut connector, _) = start(&gw, &queue, "", "").await;
    assert!(
        eventually(WITHIN, || gw.requests_to("slow-fn").len() == 2).await,
        "not redelivered after the visibility timeout:\n{}",
        connector.output()
    );
    let requests = gw.requests_to("slow-fn");
    let (first, second) = (&requests[0], &requests[1]);
    assert!(
        second.at.duration_since(first.at) >= Duration::from_secs(3),
        "redelivered before the visibility timeout lapsed"
    );
    assert_eq!(second.header("x-sqs-receive-count").as_deref(), Some("2"));
    assert_eq!(second.header("x-delivery-attempt").as_deref(), Some("2"));
    assert_eq!(first.header("ce-id"), second.header("ce-id"));
    assert!(
        eventually_async(WITHIN, || async { sqs.unacknowledged(&queue).await == 0 }).await,
        "redelivered message not deleted"
    );
    assert!(connector.terminate(WITHIN).await.success());
}

/// An invocation longer than the visibility timeout is not redelivered meanwhile: the
/// heartbeat renews the message's visibility.
#[tokio::test]
async fn sqs_heartbeat_covers_long_invocations() {
    let sqs = SqsQueues::new();
    let queue = unique("heartbeat");
    sqs.create_queue(&queue).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("long-fn", &queue, |_, _| {
        Reply::ok().delay(Duration::from_secs(9))
    });
    let (mut connector, _) = start(&gw, &queue, "", "").await;
    sqs.produce(&queue, &[b"long".to_vec()]).await;
    assert!(
        eventually_async(Duration::from_secs(40), || async {
            !gw.requests_to("long-fn").is_empty() && sqs.unacknowledged(&queue).await == 0
        })
        .await,
        "long invocation not completed and deleted:\n{}",
        connector.output()
    );
    assert_eq!(
        gw.requests_to("long-fn").len(),
        1,
        "redelivered while the function was still running (visibility 4s, invocation 9s)"
    );
    assert!(connector.terminate(WITHIN).await.success());
}

/// The SQS headers, message attributes as `X-SQS-Attr-*`, the topic from a message
/// attribute, and the queue depth on `/metrics`.
#[tokio::test]
async fn sqs_headers_topic_attribute_and_metrics() {
    let sqs = SqsQueues::new();
    let queue = unique("headers");
    let url = sqs.create_queue(&queue).await;
    let other_topic = unique("routed");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("queue-fn", &queue, |_, _| Reply::ok());
    gw.function("routed-fn", &other_topic, |_, _| Reply::ok());
    let (mut connector, metrics_addr) = start(&gw, &queue, "", "topic_attribute = \"Topic\"").await;
    let attr = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    };
    let plain = sqs
        .client()
        .send_message()
        .queue_url(&url)
        .message_body("plain")
        .message_attributes("tenant", attr("acme"))
        .send()
        .await
        .unwrap()
        .message_id
        .unwrap();
    sqs.client()
        .send_message()
        .queue_url(&url)
        .message_body("routed")
        .message_attributes("Topic", attr(&other_topic))
        .send()
        .await
        .unwrap();
    assert!(
        eventually(WITHIN, || gw.requests_to("queue-fn").len() == 1
            && gw.requests_to("routed-fn").len() == 1)
        .await,
        "not routed by queue and attribute:\n{}",
        connector.output()
    );
    let r = &gw.requests_to("queue-fn")[0];
    assert_eq!(r.body.as_ref(), b"plain");
    assert_eq!(
        r.header("x-sqs-message-id").as_deref(),
        Some(plain.as_str())
    );
    assert_eq!(r.header("ce-id").as_deref(), Some(plain.as_str()));
    assert_eq!(r.header("x-sqs-queue-url").as_deref(), Some(url.as_str()));
    assert_eq!(r.header("x-sqs-receive-count").as_deref(), Some("1"));
    assert_eq!(r.header("x-sqs-attr-tenant").as_deref(), Some("acme"));
    assert_eq!(r.header("x-topic").as_deref(), Some(queue.as_str()));
    let routed = &gw.requests_to("routed-fn")[0];
    assert_eq!(
        routed.header("x-topic").as_deref(),
        Some(other_topic.as_str())
    );
    let series = format!(r#"connector_sqs_queue_messages{{queue="{queue}",state="visible"}}"#);
    assert!(
        eventually_async(WITHIN, || async {
            http_get(metrics_addr, "/metrics")
                .await
                .and_then(|(_, text)| metric(&text, &series))
                .is_some()
        })
        .await,
        "no queue depth on /metrics"
    );
    assert!(connector.terminate(WITHIN).await.success());
}

/// A queue that does not exist fails the start, naming the queue; so does a visibility
/// timeout that cannot cover the invocation timeout without the heartbeat, naming the fix.
#[tokio::test]
async fn sqs_startup_failures_name_the_cause() {
    let gw = FakeGateway::start().await.unwrap();
    let binary = integration_tests::binary("sqs-connector", "sqs-connector");
    let missing = unique("missing");
    let config = format!(
        "[connector]\ngateway_url = \"{}\"\nmetrics_addr = \"{}\"\n\n{}",
        gw.url(),
        free_addr(),
        SqsQueues::section(&missing, "")
    );
    let mut process = Process::start(&binary, &config, &[]);
    let status = process.wait(WITHIN).await;
    assert!(!status.success(), "started with a missing queue");
    assert!(
        process.output().contains(&missing),
        "error does not name the queue:\n{}",
        process.output()
    );

    let config = format!(
        "[connector]\ngateway_url = \"{}\"\nupstream_timeout = \"30s\"\n\n{}",
        gw.url(),
        SqsQueues::section("anything", "heartbeat = false")
    );
    let mut process = Process::start(&binary, &config, &[]);
    let status = process.wait(WITHIN).await;
    assert!(
        !status.success(),
        "started with visibility 4s < timeout 30s"
    );
    let output = process.output();
    assert!(output.contains("sqs.visibility_timeout"), "{output}");
    assert!(output.contains("sqs.heartbeat = true"), "{output}");
}

/// Without `dead_letter_queue`, a message that fails for good is made visible again after
/// a backoff delay rather than deleted, so the queue's own redrive policy moves it to its
/// dead-letter queue after `maxReceiveCount` receives.
#[tokio::test]
async fn sqs_failed_messages_left_to_the_redrive_policy() {
    let sqs = SqsQueues::new();
    let queue = unique("redrive");
    let dlq = format!("{queue}-dlq");
    let dlq_url = sqs.create_queue(&dlq).await;
    let dlq_arn = sqs
        .client()
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()
        .remove(&QueueAttributeName::QueueArn)
        .unwrap();
    sqs.client()
        .create_queue()
        .queue_name(&queue)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"2"}}"#),
        )
        .send()
        .await
        .unwrap();
    let gw = FakeGateway::start().await.unwrap();
    gw.function("failing-fn", &queue, |_, _| Reply::status(500));
    let (mut connector, _) = start(&gw, &queue, "max_attempts = 2", "").await;
    sqs.produce(&queue, &[b"poison".to_vec()]).await;
    assert!(
        eventually_async(WITHIN, || async { !sqs.peek(&dlq_url).await.is_empty() }).await,
        "the redrive policy did not receive the message:\n{}",
        connector.output()
    );
    assert_eq!(sqs.unacknowledged(&queue).await, 0);
    let receive_counts: std::collections::BTreeSet<String> = gw
        .requests_to("failing-fn")
        .iter()
        .filter_map(|r| r.header("x-sqs-receive-count"))
        .collect();
    assert_eq!(
        receive_counts,
        ["1", "2"].map(String::from).into_iter().collect(),
        "each receive should be tried, and the message given back between them"
    );
    assert!(connector.terminate(WITHIN).await.success());
}

/// An SQS endpoint that goes away mid-run turns `/readyz` to 503 and is retried; when it
/// is back, readiness returns and messages flow again. Runs its own moto server.
#[tokio::test]
async fn sqs_endpoint_outage_shows_in_readyz_and_recovers() {
    let addr = free_addr();
    let endpoint = format!("http://{addr}");
    let start_moto = || {
        std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server on PATH (scripts/test.sh installs it)")
    };
    let sqs = SqsQueues::at(&endpoint);
    let mut moto = start_moto();
    assert!(
        eventually_async(WITHIN, || async {
            sqs.client().list_queues().send().await.is_ok()
        })
        .await,
        "own moto server did not start"
    );
    let queue = unique("outage");
    sqs.create_queue(&queue).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("outage-fn", &queue, |_, _| Reply::ok());
    let metrics_addr = free_addr();
    let config = format!(
        "[connector]\ngateway_url = \"{}\"\nmetrics_addr = \"{metrics_addr}\"\nrebuild_interval = \"500ms\"\n\n{}",
        gw.url(),
        SqsQueues::section(&queue, "").replace(&sqs_endpoint(), &endpoint)
    );
    let binary = integration_tests::binary("sqs-connector", "sqs-connector");
    let mut connector = Process::start(&binary, &config, &[]);
    assert!(
        wait_http(metrics_addr, "/readyz", 200, WITHIN).await,
        "{}",
        connector.output()
    );
    moto.kill().unwrap();
    moto.wait().unwrap();
    assert!(
        wait_http(metrics_addr, "/readyz", 503, WITHIN).await,
        "/readyz still 200 with the endpoint gone:\n{}",
        connector.output()
    );
    assert!(connector.exited().is_none(), "exited on an outage");
    // moto keeps nothing across a restart: the same queue name gives the same URL.
    let mut moto = start_moto();
    assert!(
        eventually_async(WITHIN, || async {
            sqs.client().list_queues().send().await.is_ok()
        })
        .await
    );
    sqs.create_queue(&queue).await;
    assert!(
        wait_http(metrics_addr, "/readyz", 200, Duration::from_secs(60)).await,
        "not ready again after the endpoint came back:\n{}",
        connector.output()
    );
    sqs.produce(&queue, &[b"after".to_vec()]).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("outage-fn").len() == 1).await,
        "{}",
        connector.output()
    );
    assert!(connector.terminate(WITHIN).await.success());
    moto.kill().unwrap();
    moto.wait().unwrap();
}

/// No credentials anywhere in the standard chain: the start fails, naming where it
/// looked.
#[tokio::test]
async fn sqs_missing_credentials_fail_at_start() {
    let gw = FakeGateway::start().await.unwrap();
    let binary = integration_tests::binary("sqs-connector", "sqs-connector");
    let section = SqsQueues::section("anything", "")
        .replace("access_key_id = \"test\"\n", "")
        .replace("secret_access_key = \"test\"\n", "");
    let config = format!(
        "[connector]\ngateway_url = \"{}\"\nmetrics_addr = \"{}\"\n\n{section}",
        gw.url(),
        free_addr(),
    );
    let mut process = Process::start(
        &binary,
        &config,
        &[
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_PROFILE", "none"),
            ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/aws-credentials",
            ),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let status = process.wait(WITHIN).await;
    assert!(!status.success(), "started without credentials");
    assert!(
        process.output().contains("no usable AWS credentials"),
        "{}",
        process.output()
    );
}

/// While `max_inflight` deliveries run, the connector stops receiving: only a bounded
/// number of messages (running, queued for a worker, waiting for room, one batch per
/// poller) are in flight with SQS, and the rest stay visible for other consumers.
#[tokio::test]
async fn sqs_stops_receiving_while_saturated() {
    let sqs = SqsQueues::new();
    let queue = unique("saturated");
    sqs.create_queue(&queue).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("busy-fn", &queue, |_, _| {
        Reply::ok().delay(Duration::from_millis(300))
    });
    let (mut connector, _) = start(
        &gw,
        &queue,
        "max_inflight = 2",
        "pollers = 1\nmax_messages = 1",
    )
    .await;
    let sent: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("busy-{i:02}").into_bytes())
        .collect();
    sqs.produce(&queue, &sent).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("busy-fn").len() >= 3).await,
        "{}",
        connector.output()
    );
    let (visible, in_flight) = sqs.depth(&queue).await;
    // 2 running + 2 in the dispatcher's hand-off queue + 1 waiting for room + 1 in the
    // poller's slot, + 2 awaiting their delete.
    assert!(in_flight <= 8, "{in_flight} received while saturated");
    assert!(visible > 0);
    assert!(
        eventually(WITHIN, || gw.requests_to("busy-fn").len() >= sent.len()).await,
        "{}",
        connector.output()
    );
    assert!(gw.max_inflight() <= 2, "{} concurrent", gw.max_inflight());
    assert!(eventually_async(WITHIN, || async { sqs.unacknowledged(&queue).await == 0 }).await);
    assert!(connector.terminate(WITHIN).await.success());
}

/// With its attempts used up and no dead-letter queue, a failed message is not deleted but
/// given back to SQS after a backoff delay (ChangeMessageVisibility); SQS redelivers it,
/// and the next receive succeeds.
#[tokio::test]
async fn sqs_failure_then_success_through_visibility_redelivery() {
    let sqs = SqsQueues::new();
    let queue = unique("redeliver");
    sqs.create_queue(&queue).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("flaky-fn", &queue, |req, _| {
        if req.header("x-sqs-receive-count").as_deref() == Some("1") {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    });
    let (mut connector, _) = start(&gw, &queue, "max_attempts = 1", "").await;
    sqs.produce(&queue, &[b"flaky".to_vec()]).await;
    assert!(
        eventually_async(WITHIN, || async {
            gw.requests_to("flaky-fn").len() == 2 && sqs.unacknowledged(&queue).await == 0
        })
        .await,
        "not redelivered and deleted:\n{}",
        connector.output()
    );
    let requests = gw.requests_to("flaky-fn");
    assert_eq!(
        requests[1].header("x-sqs-receive-count").as_deref(),
        Some("2")
    );
    assert_eq!(
        requests[1].header("x-delivery-attempt").as_deref(),
        Some("2")
    );
    assert!(
        requests[1].at.duration_since(requests[0].at) >= Duration::from_secs(1),
        "redelivered before the backoff delay"
    );
    assert!(
        requests[1].at.duration_since(requests[0].at) < Duration::from_secs(4),
        "waited for the visibility timeout instead of the backoff delay"
    );
    assert!(connector.terminate(WITHIN).await.success());
}

/// A dead letter in the explicit dead-letter queue carries its provenance as message
/// attributes, and the original is deleted only after it was written.
#[tokio::test]
async fn sqs_dead_letter_carries_provenance_attributes() {
    let sqs = SqsQueues::new();
    let queue = unique("provenance");
    sqs.create_topic(&queue).await;
    let dlq_url = sqs.url(&format!("{queue}-dlq")).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("picky-fn", &queue, |_, _| {
        Reply::status(422).body(b"missing field")
    });
    let (mut connector, _) = start(
        &gw,
        &queue,
        "",
        &format!("dead_letter_queue = \"{queue}-dlq\""),
    )
    .await;
    sqs.produce(&queue, &[b"bad".to_vec()]).await;
    assert!(
        eventually_async(WITHIN, || async { !sqs.peek(&dlq_url).await.is_empty() }).await,
        "{}",
        connector.output()
    );
    let letter = sqs.peek(&dlq_url).await.remove(0);
    assert_eq!(letter.body.as_deref(), Some("bad"));
    let attributes = letter.message_attributes.unwrap_or_default();
    let attr = |name: &str| {
        attributes
            .get(name)
            .and_then(|v| v.string_value.clone())
            .unwrap_or_default()
    };
    assert_eq!(attr("x-dead-letter-function"), "picky-fn");
    assert_eq!(attr("x-dead-letter-reason"), "rejected");
    assert_eq!(attr("x-dead-letter-status"), "422");
    assert_eq!(attr("x-dead-letter-attempts"), "1");
    assert_eq!(attr("x-dead-letter-topic"), queue);
    assert!(attr("x-dead-letter-source-queue").ends_with(&queue));
    let provenance: serde_json::Value =
        serde_json::from_str(&attr("x-dead-letter-provenance")).unwrap();
    assert_eq!(provenance["x-dead-letter-response"], "missing field");
    assert_eq!(
        provenance["x-dead-letter-id"],
        gw.requests_to("picky-fn")[0].header("ce-id").unwrap()
    );
    assert!(eventually_async(WITHIN, || async { sqs.unacknowledged(&queue).await == 0 }).await);
    assert!(connector.terminate(WITHIN).await.success());
}

/// Retries that wait up to 5 s, so a function's `Retry-After` sets the delay exactly.
const SLOW_BACKOFF: &str = "initial = \"50ms\"\nmax = \"5s\"";

/// `[sqs]` for `queue` with a visibility timeout of 30 s: far longer than any retry delay
/// here, so a redelivery after the retry delay cannot be the visibility timeout lapsing.
fn long_visibility_section(queue: &str, extra: &str) -> String {
    SqsQueues::section(queue, extra).replace(
        "visibility_timeout = \"4s\"",
        "visibility_timeout = \"30s\"",
    )
}

/// The number of messages settled by `op` with result `ok`, from `/metrics`.
async fn acks(metrics_addr: std::net::SocketAddr, op: &str) -> f64 {
    let series = format!(r#"connector_sqs_acks_total{{op="{op}",result="ok"}}"#);
    http_get(metrics_addr, "/metrics")
        .await
        .and_then(|(_, text)| metric(&text, &series))
        .unwrap_or(0.0)
}

/// A failed attempt is a durable retry: the message's visibility becomes the retry delay
/// (here the function's `Retry-After: 2`), and SQS redelivers it then, with the receive
/// count as the attempt number and the same `ce-id`; not in process, and not after the
/// 30 s visibility timeout.
#[tokio::test]
async fn sqs_retry_is_redelivered_by_sqs_after_the_backoff_delay() {
    let sqs = SqsQueues::new();
    let queue = unique("durable");
    sqs.create_queue(&queue).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("flaky-fn", &queue, |req, _| {
        if req.header("x-sqs-receive-count").as_deref() == Some("1") {
            Reply::status(503).header("retry-after", "2")
        } else {
            Reply::ok()
        }
    });
    let (mut connector, metrics_addr) =
        start_with(&gw, "", SLOW_BACKOFF, &long_visibility_section(&queue, "")).await;
    sqs.produce(&queue, &[b"retry-me".to_vec()]).await;
    assert!(
        eventually_async(WITHIN, || async {
            gw.requests_to("flaky-fn").len() == 2 && sqs.unacknowledged(&queue).await == 0
        })
        .await,
        "not redelivered and deleted:\n{}",
        connector.output()
    );
    let requests = gw.requests_to("flaky-fn");
    let gap = requests[1].at.duration_since(requests[0].at);
    assert!(
        gap >= Duration::from_secs(2),
        "redelivered after {gap:?}, before Retry-After"
    );
    assert!(
        gap < Duration::from_secs(10),
        "redelivered after {gap:?}: the visibility timeout, not the retry delay"
    );
    assert_eq!(
        requests[1].header("x-sqs-receive-count").as_deref(),
        Some("2")
    );
    assert_eq!(
        requests[1].header("x-delivery-attempt").as_deref(),
        Some("2")
    );
    assert_eq!(requests[0].header("ce-id"), requests[1].header("ce-id"));
    assert_eq!(acks(metrics_addr, "retry_later").await, 1.0);
    assert!(connector.terminate(WITHIN).await.success());
}

/// The connector is SIGKILLed while a retry waits: the message still comes back after the
/// retry delay (visibility 4 s), not after the 30 s visibility timeout, and a new
/// connector delivers it.
#[tokio::test]
async fn sqs_retry_survives_sigkill_during_the_backoff_wait() {
    let sqs = SqsQueues::new();
    let queue = unique("durable-kill");
    sqs.create_queue(&queue).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("flaky-fn", &queue, |req, _| {
        if req.header("x-sqs-receive-count").as_deref() == Some("1") {
            Reply::status(503).header("retry-after", "4")
        } else {
            Reply::ok()
        }
    });
    let section = long_visibility_section(&queue, "");
    let (mut connector, metrics_addr) = start_with(&gw, "", SLOW_BACKOFF, &section).await;
    sqs.produce(&queue, &[b"survive".to_vec()]).await;
    assert!(
        eventually_async(WITHIN, || async {
            acks(metrics_addr, "retry_later").await >= 1.0
        })
        .await,
        "the retry was not handed to SQS:\n{}",
        connector.output()
    );
    connector.kill();
    assert_eq!(gw.requests_to("flaky-fn").len(), 1);
    let (mut connector, _) = start_with(&gw, "", SLOW_BACKOFF, &section).await;
    assert!(
        eventually_async(WITHIN, || async {
            gw.requests_to("flaky-fn").len() == 2 && sqs.unacknowledged(&queue).await == 0
        })
        .await,
        "not redelivered after the kill:\n{}",
        connector.output()
    );
    let requests = gw.requests_to("flaky-fn");
    let gap = requests[1].at.duration_since(requests[0].at);
    assert!(
        gap >= Duration::from_secs(4),
        "redelivered after {gap:?}, before the retry delay"
    );
    assert!(
        gap < Duration::from_secs(20),
        "redelivered after {gap:?}: the visibility timeout, not the retry delay"
    );
    assert_eq!(
        requests[1].header("x-sqs-receive-count").as_deref(),
        Some("2")
    );
    assert!(connector.terminate(WITHIN).await.success());
}

/// On a FIFO queue, a message that fails stops its group: the later messages of the group
/// that arrived in the same receive are given back untouched, and delivered only after
/// the failed one succeeded on its redelivery. Another group goes on meanwhile.
/// `max_attempts` 3: the first message is retrying; 1: it is held (no dead-letter queue).
async fn fifo_group_waits_behind(max_attempts: u32) {
    let sqs = SqsQueues::new();
    let queue = format!("{}.fifo", unique("fifo-stop"));
    let url = sqs.create_queue(&queue).await;
    let mut n = 0;
    for body in ["a-0", "a-1", "a-2", "b-0"] {
        n += 1;
        sqs.client()
            .send_message()
            .queue_url(&url)
            .message_body(body)
            .message_group_id(&body[..1])
            .message_deduplication_id(n.to_string())
            .send()
            .await
            .unwrap();
    }
    let gw = FakeGateway::start().await.unwrap();
    gw.function("fifo-fn", &queue, |req, _| {
        if req.body.as_ref() == b"a-0" && req.header("x-sqs-receive-count").as_deref() == Some("1")
        {
            // Slow enough that a-1 and a-2 of the same receive are queued behind it when
            // it fails (the case of a-0 failing before a-1 was handed over is covered by
            // the dispatcher's strict-lane tests).
            Reply::status(503)
                .header("retry-after", "2")
                .delay(Duration::from_millis(500))
        } else {
            Reply::ok()
        }
    });
    // Both messages of the batch are received at once (pollers = 1, 10 per receive).
    let (mut connector, metrics_addr) = start_with(
        &gw,
        &format!("max_attempts = {max_attempts}"),
        SLOW_BACKOFF,
        &long_visibility_section(&queue, "pollers = 1"),
    )
    .await;
    let bodies = |gw: &FakeGateway| -> Vec<String> {
        gw.requests_to("fifo-fn")
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect()
    };
    assert!(
        eventually_async(WITHIN, || async {
            bodies(&gw).len() == 5 && sqs.unacknowledged(&queue).await == 0
        })
        .await,
        "not all delivered and deleted: {:?}\n{}",
        bodies(&gw),
        connector.output()
    );
    let all = bodies(&gw);
    let group_a: Vec<&String> = all.iter().filter(|b| b.starts_with("a-")).collect();
    assert_eq!(
        group_a,
        ["a-0", "a-0", "a-1", "a-2"],
        "group a out of order: {all:?}"
    );
    let position = |body: &str| all.iter().rposition(|b| b == body).unwrap();
    assert!(
        position("b-0") < position("a-0"),
        "group b waited for group a: {all:?}"
    );
    assert!(
        acks(metrics_addr, "release").await >= 2.0,
        "a-1 and a-2 not released"
    );
    assert!(connector.terminate(WITHIN).await.success());
}

#[tokio::test]
async fn sqs_fifo_retrying_message_stops_its_group() {
    fifo_group_waits_behind(3).await;
}

#[tokio::test]
async fn sqs_fifo_held_message_stops_its_group() {
    fifo_group_waits_behind(1).await;
}
