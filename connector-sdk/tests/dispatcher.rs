//! The dispatcher against a real HTTP server playing gateway and functions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use connector_sdk::config::{OnExhausted, Ordering};
use connector_sdk::dead_letter::{DeadLetter, DeadLetterError, DeadLetterReason, DeadLetterSink};
use connector_sdk::gateway::GatewayClient;
use connector_sdk::metrics::{Metrics, encode};
use connector_sdk::testing::{FakeGateway, Reply, eventually};
use connector_sdk::{DeliveryOutcome, Dispatcher, Disposition, Message, SdkConfig};
use futures::FutureExt;
use prometheus_client::registry::Registry;

#[derive(Default)]
struct RecordingSink {
    letters: Mutex<Vec<DeadLetter>>,
    fail: bool,
}

#[async_trait::async_trait]
impl DeadLetterSink for RecordingSink {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        if self.fail {
            return Err(DeadLetterError::new("dead-letter store unavailable"));
        }
        self.letters.lock().unwrap().push(letter.clone());
        Ok(())
    }
}

struct Setup {
    dispatcher: Dispatcher,
    metrics: Metrics,
    registry: Registry,
    topics: connector_sdk::topic_map::TopicMapHandle,
}

fn dispatcher(gw: &FakeGateway, config: SdkConfig, sink: Option<Arc<RecordingSink>>) -> Setup {
    setup(gw, config, sink, false)
}

/// A dispatcher on `gw`'s topic map; with `broker_retries`, strict lanes too (as a
/// connector whose broker redelivers).
fn setup(
    gw: &FakeGateway,
    config: SdkConfig,
    sink: Option<Arc<RecordingSink>>,
    broker_retries: bool,
) -> Setup {
    let (metrics, registry) = Metrics::standalone("test-connector");
    let client = GatewayClient::new("test-connector", &config).unwrap();
    let topics = gw.topic_map();
    let mut builder = Dispatcher::builder(client, topics.clone(), &config, metrics.clone());
    if broker_retries {
        builder = builder.broker_retries(true).strict_lanes(true);
    }
    if let Some(sink) = sink {
        builder = builder.dead_letters(sink);
    }
    Setup {
        dispatcher: builder.build(),
        metrics,
        registry,
        topics,
    }
}

fn message(topic: &str, body: &str, id: &str) -> Message {
    Message::new(topic, body.to_owned(), id, "test://source")
}

/// Submits `n` messages with `body` on `topic`, ids `<prefix>0` to `<prefix>{n-1}`.
async fn submit_all(
    dispatcher: &Dispatcher,
    topic: &str,
    body: &str,
    prefix: &str,
    n: usize,
) -> Vec<connector_sdk::Completion> {
    let mut completions = Vec::with_capacity(n);
    for i in 0..n {
        let m = message(topic, body, &format!("{prefix}{i}"));
        completions.push(dispatcher.submit(m).await.unwrap());
    }
    completions
}

#[tokio::test]
async fn retry_then_success_delivers_once_with_stable_id() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("flaky", "orders", |_, call| {
        if call < 2 {
            Reply::status(503)
        } else {
            Reply::ok().body(b"done")
        }
    });
    let setup = dispatcher(&gw, gw.config(), None);
    let outcome = setup
        .dispatcher
        .submit(message("orders", "hello", "orders/0/1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.disposition(), Disposition::Ack);
    let report = &outcome.deliveries[0];
    assert_eq!(report.outcome, DeliveryOutcome::Delivered);
    assert_eq!(report.attempts, 3);
    assert_eq!(&report.response.as_ref().unwrap().body[..], b"done");
    let seen = gw.requests_to("flaky");
    let attempts: Vec<String> = seen
        .iter()
        .map(|r| r.header("x-delivery-attempt").unwrap())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(
        seen.iter()
            .all(|r| r.header("ce-id").unwrap() == "orders/0/1")
    );
    assert!(seen.iter().all(|r| &r.body[..] == b"hello"));
    let text = encode(&setup.registry);
    assert!(
        text.contains("connector_retries_total{function=\"flaky\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("connector_deliveries_total{function=\"flaky\",outcome=\"delivered\"} 1")
    );
}

#[tokio::test]
async fn client_error_goes_to_the_dead_letter_hook_once_with_provenance() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("strict", "orders", |_, _| {
        Reply::status(422).body(b"amount must be positive")
    });
    let sink = Arc::new(RecordingSink::default());
    let setup = dispatcher(&gw, gw.config(), Some(sink.clone()));
    let msg = message("orders", "{\"amount\":-1}", "orders/3/77")
        .with_coordinate("partition", 3)
        .with_coordinate("offset", 77);
    let outcome = setup.dispatcher.submit(msg).await.unwrap().await;
    assert_eq!(outcome.disposition(), Disposition::Ack);
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::DeadLettered);
    assert_eq!(gw.requests_to("strict").len(), 1, "a 4xx is not retried");
    let letters = sink.letters.lock().unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.reason, DeadLetterReason::Rejected);
    assert_eq!(letter.status, Some(422));
    assert_eq!(letter.function.as_str(), "strict");
    assert_eq!(&letter.response_excerpt[..], b"amount must be positive");
    assert_eq!(&letter.message.payload[..], b"{\"amount\":-1}");
    assert_eq!(letter.attempts, 1);
    assert!(letter.first_failure <= letter.last_failure);
    let provenance: std::collections::BTreeMap<_, _> = letter.provenance().into_iter().collect();
    assert_eq!(provenance["x-dead-letter-source-partition"], "3");
    assert_eq!(provenance["x-dead-letter-source-offset"], "77");
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("busy", "t", |_, call| {
        if call == 0 {
            Reply::status(429).header("retry-after", "1")
        } else {
            Reply::ok()
        }
    });
    let mut config = gw.config();
    config.backoff.max = Duration::from_secs(5);
    let setup = dispatcher(&gw, config, None);
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::Delivered);
    let seen = gw.requests_to("busy");
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "retried after {gap:?}, before Retry-After"
    );
}

#[tokio::test]
async fn exhausted_attempts_are_dead_lettered_with_the_count() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("down", "t", |_, _| Reply::status(500).body(b"oops"));
    let sink = Arc::new(RecordingSink::default());
    let mut config = gw.config();
    config.max_attempts = 4;
    let setup = dispatcher(&gw, config, Some(sink.clone()));
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::DeadLettered);
    assert_eq!(gw.requests_to("down").len(), 4);
    let letters = sink.letters.lock().unwrap();
    assert_eq!(letters[0].reason, DeadLetterReason::Exhausted);
    assert_eq!(letters[0].attempts, 4);
    assert_eq!(letters[0].status, Some(500));
}

#[tokio::test]
async fn broker_redeliveries_count_against_max_attempts() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("down", "t", |_, _| Reply::status(500));
    let sink = Arc::new(RecordingSink::default());
    let mut config = gw.config();
    config.max_attempts = 3;
    let setup = dispatcher(&gw, config, Some(sink.clone()));
    let msg = message("t", "x", "1").with_prior_attempts(2);
    let outcome = setup.dispatcher.submit(msg).await.unwrap().await;
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::DeadLettered);
    let seen = gw.requests_to("down");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-delivery-attempt").unwrap(), "3");
}

#[tokio::test]
async fn without_dead_letter_destination_the_message_is_held_or_dropped_by_choice() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("bad", "t", |_, _| Reply::status(400));
    let setup = dispatcher(&gw, gw.config(), None);
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::Held);
    assert_eq!(outcome.disposition(), Disposition::Hold);

    let mut config = gw.config();
    config.on_exhausted = OnExhausted::Drop;
    let setup = dispatcher(&gw, config, None);
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "2"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::Dropped);
    assert_eq!(outcome.disposition(), Disposition::Ack);
}

#[tokio::test]
async fn failed_dead_letter_write_holds_the_message_and_is_counted() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("bad", "t", |_, _| Reply::status(404));
    let sink = Arc::new(RecordingSink {
        fail: true,
        ..RecordingSink::default()
    });
    let setup = dispatcher(&gw, gw.config(), Some(sink));
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.disposition(), Disposition::Hold);
    let text = encode(&setup.registry);
    assert!(
        text.contains("connector_dead_letter_write_failures_total{function=\"bad\"} 3"),
        "{text}"
    );
}

#[tokio::test]
async fn fan_out_where_one_fails_does_not_repeat_the_other() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("good", "payments", |_, _| {
        Reply::ok().delay(Duration::from_millis(50))
    });
    gw.function("flaky", "payments, refunds", |_, call| {
        if call < 3 {
            Reply::status(502)
        } else {
            Reply::ok()
        }
    });
    let setup = dispatcher(&gw, gw.config(), None);
    let outcome = setup
        .dispatcher
        .submit(message("payments", "p", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.disposition(), Disposition::Ack);
    assert_eq!(outcome.deliveries.len(), 2);
    assert!(
        outcome
            .deliveries
            .iter()
            .all(|d| d.outcome == DeliveryOutcome::Delivered)
    );
    assert_eq!(gw.requests_to("good").len(), 1);
    assert_eq!(gw.requests_to("flaky").len(), 4);
    // The two deliveries ran concurrently: the flaky one started before the good one ended.
    let good = &gw.requests_to("good")[0];
    let flaky_first = &gw.requests_to("flaky")[0];
    assert!(flaky_first.at < good.at + Duration::from_millis(50));
}

/// Without `topics`, the connector consumes only topics some function subscribes to: a
/// message of a topic whose last subscriber just left is acknowledged and counted.
#[tokio::test]
async fn unmatched_topic_completes_at_once() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "a", |_, _| Reply::ok());
    let setup = dispatcher(&gw, gw.config(), None);
    let outcome = setup
        .dispatcher
        .submit(message("nobody-listens", "x", "1"))
        .await
        .unwrap()
        .await;
    assert!(outcome.unmatched());
    assert_eq!(outcome.disposition(), Disposition::Ack);
    assert!(gw.requests().is_empty());
    assert!(encode(&setup.registry).contains(r#"connector_messages_total{outcome="unmatched"} 1"#));
}

/// With `topics` naming the topic, a message nobody subscribes to right now is held, not
/// acknowledged (issue 17: a redeploy committed Kafka offsets and deleted SQS messages
/// nobody received); `unmatched = "ack"` keeps OpenFaaS's behaviour.
#[tokio::test]
async fn unmatched_message_of_a_listed_topic_is_held() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "a", |_, _| Reply::ok());
    let mut config = gw.config();
    config.topics = vec!["orders".to_owned()];
    let setup = dispatcher(&gw, config.clone(), None);
    let outcome = setup
        .dispatcher
        .submit(message("orders", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.disposition(), Disposition::Hold);
    assert!(
        encode(&setup.registry).contains(r#"connector_messages_total{outcome="unmatched_held"} 1"#)
    );
    assert_eq!(
        setup
            .dispatcher
            .metrics()
            .held_unmatched_topics(Duration::from_secs(60)),
        ["orders"]
    );

    config.unmatched = connector_sdk::config::Unmatched::Ack;
    let setup = dispatcher(&gw, config, None);
    let outcome = setup
        .dispatcher
        .submit(message("orders", "x", "2"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.disposition(), Disposition::Ack);
    assert!(gw.requests().is_empty());
}

#[tokio::test]
async fn max_inflight_is_never_exceeded() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", "t", |_, _| {
        Reply::ok().delay(Duration::from_millis(20))
    });
    gw.function("slow2", "t", |_, _| {
        Reply::ok().delay(Duration::from_millis(20))
    });
    let mut config = gw.config();
    config.max_inflight = 5;
    let setup = dispatcher(&gw, config, None);
    let mut completions = Vec::new();
    for i in 0..40 {
        completions.push(
            setup
                .dispatcher
                .submit(message("t", "x", &i.to_string()))
                .await
                .unwrap(),
        );
        assert!(setup.dispatcher.available_permits() <= 5);
    }
    for c in completions {
        assert_eq!(c.await.disposition(), Disposition::Ack);
    }
    assert_eq!(gw.requests().len(), 80);
    let max = gw.max_inflight();
    assert!(
        max <= 5,
        "{max} concurrent invocations with max_inflight = 5"
    );
    assert!(
        max >= 4,
        "only {max} concurrent: the limit is not being used"
    );
}

/// `submit` takes `max_inflight` messages for the workers and as many again into the
/// hand-off queue without waiting; the next one waits until a worker is free. A drain
/// releases the queued messages at once, without invoking them, while the running ones
/// finish.
#[tokio::test]
async fn hand_off_queue_is_bounded_and_drain_releases_it() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", "t", |_, _| {
        Reply::ok().delay(Duration::from_millis(1500))
    });
    let mut config = gw.config();
    config.max_inflight = 4;
    let setup = dispatcher(&gw, config, None);
    let d = &setup.dispatcher;
    assert_eq!(d.room(), 8);
    let mut running = Vec::new();
    for i in 0..4 {
        running.push(
            d.submit(message("t", "x", &format!("run-{i}")))
                .await
                .unwrap(),
        );
    }
    assert!(
        connector_sdk::testing::eventually(Duration::from_secs(5), || gw.requests().len() == 4)
            .await,
        "four invocations should have started"
    );
    assert_eq!(d.room(), 4);
    let mut queued = Vec::new();
    for i in 0..4 {
        let submitted = d
            .submit(message("t", "x", &format!("queued-{i}")))
            .now_or_never();
        queued.push(submitted.expect("room in the queue").unwrap());
    }
    assert_eq!(d.room(), 0);
    let mut full = Box::pin(d.submit(message("t", "x", "waits")));
    assert!((&mut full).now_or_never().is_none(), "submit must wait");
    drop(full);

    d.drain();
    for completion in queued {
        let outcome = tokio::time::timeout(Duration::from_secs(1), completion)
            .await
            .expect("a queued message is released at once on drain");
        assert_eq!(outcome.disposition(), Disposition::Release);
        assert_eq!(outcome.deliveries[0].attempts, 0);
    }
    for completion in running {
        assert_eq!(completion.await.disposition(), Disposition::Ack);
    }
    assert_eq!(gw.requests().len(), 4, "nothing queued was invoked");
    d.wait_idle().await;
}

/// Each function's deliveries under way are counted as attempting (calling it) or
/// retrying (waiting out a backoff), for `/admin/status` and the metrics; a drain releases
/// the retrying one and both counts return to zero.
#[tokio::test]
async fn deliveries_under_way_are_counted_per_function_attempting_or_retrying() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("busy", "work", |_, _| {
        Reply::ok().delay(Duration::from_millis(1500))
    });
    gw.function("failing", "jobs", |_, _| Reply::status(503));
    let mut config = gw.config();
    config.backoff.initial = Duration::from_secs(60);
    config.backoff.max = Duration::from_secs(60);
    let setup = dispatcher(&gw, config, None);
    let d = &setup.dispatcher;
    let busy_fn = connector_sdk::FunctionRef::new("busy", None);
    let failing_fn = connector_sdk::FunctionRef::new("failing", None);
    let busy = d.submit(message("work", "x", "w1")).await.unwrap();
    let failing = d.submit(message("jobs", "x", "j1")).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            setup.metrics.under_way_of(&busy_fn) == (1, 0)
                && setup.metrics.under_way_of(&failing_fn) == (0, 1)
        })
        .await,
        "busy {:?}, failing {:?}",
        setup.metrics.under_way_of(&busy_fn),
        setup.metrics.under_way_of(&failing_fn)
    );
    assert_eq!(setup.metrics.inflight(), 2);
    let text = encode(&setup.registry);
    for line in [
        "connector_function_attempting_deliveries{function=\"busy\"} 1",
        "connector_function_retrying_deliveries{function=\"failing\"} 1",
        "connector_function_attempting_deliveries{function=\"failing\"} 0",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    d.drain();
    assert_eq!(failing.await.disposition(), Disposition::Release);
    assert_eq!(busy.await.disposition(), Disposition::Ack);
    d.wait_idle().await;
    assert_eq!(setup.metrics.under_way_of(&busy_fn), (0, 0));
    assert_eq!(setup.metrics.under_way_of(&failing_fn), (0, 0));
    assert_eq!(setup.metrics.inflight(), 0);
}

/// A waiting submitter gets room as soon as the queue moves, and every message is
/// delivered once, in key order, even with a single worker and permit.
#[tokio::test]
async fn one_permit_and_a_queue_keep_key_order_without_deadlock() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered", "events", |_, _| {
        Reply::ok().delay(Duration::from_millis(2))
    });
    let mut config = gw.config();
    config.ordering = Ordering::Key;
    config.max_inflight = 1;
    let setup = dispatcher(&gw, config, None);
    let mut completions = Vec::new();
    for n in 0..40 {
        let key = ["a", "b", "a", "c"][n % 4];
        let body = format!("{key}-{n}");
        let msg = message("events", &body, &body).with_ordering_key(key.to_owned());
        completions.push(setup.dispatcher.submit(msg).await.unwrap());
    }
    for c in completions {
        let outcome = tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("every message completes");
        assert_eq!(outcome.disposition(), Disposition::Ack);
    }
    let delivered: Vec<String> = gw
        .requests_to("ordered")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    let expected: Vec<String> = (0..40)
        .map(|n| format!("{}-{n}", ["a", "b", "a", "c"][n % 4]))
        .collect();
    assert_eq!(
        delivered, expected,
        "one permit delivers in submission order"
    );
    assert_eq!(gw.max_inflight(), 1);
}

#[tokio::test]
async fn fan_out_wider_than_max_inflight_still_respects_it() {
    let gw = FakeGateway::start().await.unwrap();
    for i in 0..6 {
        gw.function(&format!("f{i}"), "wide", |_, _| {
            Reply::ok().delay(Duration::from_millis(20))
        });
    }
    let mut config = gw.config();
    config.max_inflight = 2;
    let setup = dispatcher(&gw, config, None);
    let outcome = setup
        .dispatcher
        .submit(message("wide", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.deliveries.len(), 6);
    assert_eq!(outcome.disposition(), Disposition::Ack);
    assert!(gw.max_inflight() <= 2, "{}", gw.max_inflight());
}

#[tokio::test]
async fn key_order_holds_under_concurrency() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered", "events", |req, call| {
        // Vary latency so that unordered delivery would reorder; fail some first attempts
        // so that retries happen inside lanes.
        let n: u64 = String::from_utf8_lossy(&req.body)
            .split('-')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        if n % 7 == 3 && req.headers["x-delivery-attempt"] == "1" {
            return Reply::status(503);
        }
        Reply::ok().delay(Duration::from_millis((n * 13 + call as u64) % 9))
    });
    let mut config = gw.config();
    config.ordering = Ordering::Key;
    config.max_inflight = 16;
    let setup = dispatcher(&gw, config, None);
    let keys = ["a", "b", "c", "d"];
    let mut completions = Vec::new();
    for n in 0..30 {
        for key in keys {
            let body = format!("{key}-{n}");
            let msg = message("events", &body, &body).with_ordering_key(key.to_owned());
            completions.push(setup.dispatcher.submit(msg).await.unwrap());
        }
    }
    for c in completions {
        assert_eq!(c.await.disposition(), Disposition::Ack);
    }
    let delivered: Vec<String> = gw
        .requests_to("ordered")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    for key in keys {
        // Successful deliveries per key, in arrival order, must be 0..30. A retried
        // message appears twice in a row (failed attempt, then success), never
        // interleaved with a later one.
        let mut seen: Vec<u64> = delivered
            .iter()
            .filter(|b| b.starts_with(&format!("{key}-")))
            .map(|b| b.split('-').nth(1).unwrap().parse().unwrap())
            .collect();
        seen.dedup();
        assert_eq!(
            seen,
            (0..30).collect::<Vec<_>>(),
            "order broken for key {key}"
        );
    }
    assert!(gw.max_inflight() > 1, "keys did not run in parallel");
}

#[tokio::test]
async fn empty_and_binary_payloads_pass_byte_exact() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("echo", "bytes", |_, _| Reply::ok());
    let setup = dispatcher(&gw, gw.config(), None);
    let binary: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    for (id, payload) in [("empty", Vec::new()), ("binary", binary.clone())] {
        let msg = Message::new("bytes", payload, id, "test://");
        let outcome = setup.dispatcher.submit(msg).await.unwrap().await;
        assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::Delivered);
    }
    let seen = gw.requests_to("echo");
    assert_eq!(seen.len(), 2);
    assert!(seen[0].body.is_empty());
    assert_eq!(seen[0].header("content-length").as_deref(), Some("0"));
    assert_eq!(&seen[1].body[..], &binary[..]);
}

#[tokio::test]
async fn invocation_carries_the_contract_headers() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("h", "orders", |_, _| Reply::ok());
    let mut config = gw.config();
    config.content_type = Some("application/json".into());
    let setup = dispatcher(&gw, config, None);
    let mut msg = message("orders", "{}", "orders/1/2").with_subject("k");
    msg.add_header("X-Kafka-Partition", "1");
    setup.dispatcher.submit(msg).await.unwrap().await;
    let r = &gw.requests_to("h")[0];
    for (name, value) in [
        ("x-topic", "orders"),
        ("x-connector", "test-connector"),
        ("content-type", "application/json"),
        ("x-delivery-attempt", "1"),
        ("ce-specversion", "1.0"),
        ("ce-id", "orders/1/2"),
        ("ce-source", "test://source"),
        ("ce-subject", "k"),
        ("x-kafka-partition", "1"),
    ] {
        assert_eq!(r.header(name).as_deref(), Some(value), "{name}");
    }
    assert!(r.header("ce-time").is_some());
    assert!(r.header("ce-type").is_some());
    assert!(
        r.header("user-agent")
            .unwrap()
            .starts_with("test-connector/")
    );
}

#[tokio::test]
async fn asynchronous_invocation_uses_the_async_route_and_callback() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("later", "t", |_, _| Reply::ok());
    let mut config = gw.config();
    config.asynchronous_invocation = true;
    config.callback_url = Some("http://127.0.0.1:9/callback".into());
    let setup = dispatcher(&gw, config, None);
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "1"))
        .await
        .unwrap()
        .await;
    let report = &outcome.deliveries[0];
    assert_eq!(report.outcome, DeliveryOutcome::Delivered);
    assert_eq!(report.response.as_ref().unwrap().status.as_u16(), 202);
    assert_eq!(
        gw.requests_to("later")[0]
            .header("x-callback-url")
            .as_deref(),
        Some("http://127.0.0.1:9/callback")
    );
}

#[tokio::test]
async fn timeouts_are_retried() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", "t", |_, call| {
        if call == 0 {
            Reply::ok().delay(Duration::from_secs(5))
        } else {
            Reply::ok()
        }
    });
    let mut config = gw.config();
    config.upstream_timeout = Duration::from_millis(200);
    let setup = dispatcher(&gw, config, None);
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::Delivered);
    assert_eq!(outcome.deliveries[0].attempts, 2);
    let text = encode(&setup.registry);
    assert!(
        text.contains("connector_invocations_total{function=\"slow\",status=\"timeout\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn drain_releases_waiting_retries_and_lets_running_calls_finish() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", "slow", |_, _| {
        Reply::ok().delay(Duration::from_millis(300))
    });
    gw.function("failing", "failing", |_, _| Reply::status(503));
    let mut config = gw.config();
    config.backoff.initial = Duration::from_secs(30);
    config.backoff.max = Duration::from_secs(30);
    let setup = dispatcher(&gw, config, None);
    let running = setup
        .dispatcher
        .submit(message("slow", "x", "1"))
        .await
        .unwrap();
    let retrying = setup
        .dispatcher
        .submit(message("failing", "x", "2"))
        .await
        .unwrap();
    assert!(
        connector_sdk::testing::eventually(Duration::from_secs(5), || gw.requests().len() == 2)
            .await,
        "both invocations should have started"
    );
    setup.dispatcher.drain();
    let retrying = tokio::time::timeout(Duration::from_secs(2), retrying)
        .await
        .expect("a waiting retry is released at once");
    assert_eq!(retrying.disposition(), Disposition::Release);
    let running = running.await;
    assert_eq!(running.deliveries[0].outcome, DeliveryOutcome::Delivered);
    assert!(
        setup
            .dispatcher
            .submit(message("slow", "x", "3"))
            .await
            .is_err()
    );
    setup.dispatcher.wait_idle().await;
}

#[tokio::test]
async fn submit_to_targets_only_the_named_function() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("a", "shared", |_, _| Reply::ok());
    gw.function("b", "shared", |_, _| Reply::ok());
    let setup = dispatcher(&gw, gw.config(), None);
    let only_b: Arc<[connector_sdk::FunctionRef]> =
        Arc::new([connector_sdk::FunctionRef::new("b", None)]);
    let outcome = setup
        .dispatcher
        .submit_to(message("shared", "x", "1"), only_b)
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.deliveries.len(), 1);
    assert!(gw.requests_to("a").is_empty());
    assert_eq!(gw.requests_to("b").len(), 1);
}

fn broker_dispatcher(
    gw: &FakeGateway,
    config: SdkConfig,
    sink: Option<Arc<RecordingSink>>,
) -> Setup {
    setup(gw, config, sink, true)
}

/// With broker retries a retryable failure ends the delivery at once with the delay the
/// broker should wait (at least `Retry-After`), instead of sleeping it in process.
#[tokio::test]
async fn broker_retries_hand_the_retry_back_with_its_delay() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("busy", "t", |_, _| {
        Reply::status(503).header("retry-after", "2")
    });
    let mut config = gw.config();
    config.backoff.max = Duration::from_secs(5);
    config.max_attempts = 3;
    let setup = broker_dispatcher(&gw, config, None);
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "1"))
        .await
        .unwrap()
        .await;
    let after = Duration::from_secs(2);
    assert_eq!(
        outcome.deliveries[0].outcome,
        DeliveryOutcome::Retry { after }
    );
    assert_eq!(outcome.deliveries[0].attempts, 1);
    assert_eq!(outcome.disposition(), Disposition::Retry { after });
    assert_eq!(gw.requests_to("busy").len(), 1, "retried in process");
    let text = encode(&setup.registry);
    assert!(
        text.contains(r#"connector_deliveries_total{function="busy",outcome="retry"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"connector_retries_total{function="busy"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"connector_messages_total{outcome="retry"} 1"#),
        "{text}"
    );
}

/// The backoff grows with the broker's redelivery count, and the last attempt allowed by
/// `max_attempts` dead-letters instead of handing back another retry.
#[tokio::test]
async fn broker_retries_count_redeliveries_and_exhaustion_dead_letters() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("down", "t", |_, _| Reply::status(500));
    let sink = Arc::new(RecordingSink::default());
    let mut config = gw.config();
    config.max_attempts = 3;
    config.backoff.initial = Duration::from_secs(1);
    config.backoff.max = Duration::from_secs(60);
    let setup = broker_dispatcher(&gw, config, Some(sink.clone()));
    let second = message("t", "x", "1").with_prior_attempts(1);
    let outcome = setup.dispatcher.submit(second).await.unwrap().await;
    match outcome.disposition() {
        // Attempt 2: full jitter below 2 s.
        Disposition::Retry { after } => assert!(after <= Duration::from_secs(2), "{after:?}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    let last = message("t", "x", "1").with_prior_attempts(2);
    let outcome = setup.dispatcher.submit(last).await.unwrap().await;
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::DeadLettered);
    assert_eq!(outcome.disposition(), Disposition::Ack);
    let seen = gw.requests_to("down");
    let attempts: Vec<String> = seen
        .iter()
        .map(|r| r.header("x-delivery-attempt").unwrap())
        .collect();
    assert_eq!(attempts, ["2", "3"]);
    assert_eq!(sink.letters.lock().unwrap()[0].attempts, 3);
}

/// On fan-out, one retrying delivery makes the whole message a retry; the sibling that
/// succeeded is reported delivered (and will be invoked again on redelivery).
#[tokio::test]
async fn broker_retries_on_fan_out_retry_the_whole_message() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("fine", "t", |_, _| Reply::ok());
    gw.function("flaky", "t", |_, _| Reply::status(503));
    let setup = broker_dispatcher(&gw, gw.config(), None);
    let outcome = setup
        .dispatcher
        .submit(message("t", "x", "1"))
        .await
        .unwrap()
        .await;
    assert!(matches!(outcome.disposition(), Disposition::Retry { .. }));
    let by_function = |name: &str| {
        outcome
            .deliveries
            .iter()
            .find(|d| d.function.to_string() == name)
            .unwrap()
            .outcome
    };
    assert_eq!(by_function("fine"), DeliveryOutcome::Delivered);
    assert!(matches!(
        by_function("flaky"),
        DeliveryOutcome::Retry { .. }
    ));
}

/// With strict lanes, the messages queued behind one that is not acknowledged are
/// released untouched, and the rest of the lane behind them too; other keys go on.
#[tokio::test]
async fn strict_lanes_release_what_queued_behind_a_retry() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered", "events", |req, _| {
        if req.body.as_ref() == b"a-0" {
            Reply::status(503).delay(Duration::from_millis(200))
        } else {
            Reply::ok()
        }
    });
    let mut config = gw.config();
    config.ordering = Ordering::Key;
    let setup = broker_dispatcher(&gw, config, None);
    let mut completions = Vec::new();
    for body in ["a-0", "a-1", "b-0", "a-2"] {
        let key = body[..1].to_owned();
        let msg = message("events", body, body).with_ordering_key(key);
        completions.push(setup.dispatcher.submit(msg).await.unwrap());
    }
    let mut dispositions = Vec::new();
    for c in completions {
        dispositions.push(c.await.disposition());
    }
    assert!(matches!(dispositions[0], Disposition::Retry { .. }));
    assert_eq!(
        dispositions[1..],
        [Disposition::Release, Disposition::Ack, Disposition::Release]
    );
    let bodies: Vec<String> = gw
        .requests_to("ordered")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert!(bodies.contains(&"a-0".to_owned()) && bodies.contains(&"b-0".to_owned()));
    // The key stays blocked after a-0 completed: a later a-1 (the rest of a receive
    // still being handed over) is released at once, without an invocation.
    let a1 = || message("events", "a-1", "a-1").with_ordering_key("a".to_owned());
    let outcome = setup.dispatcher.submit(a1()).await.unwrap().await;
    assert_eq!(outcome.disposition(), Disposition::Release);
    assert_eq!(gw.requests_to("ordered").len(), 2);
    // a-0 redelivered lifts the block (it fails again here, and blocks again); the block
    // of a message that then succeeds is gone, and the key flows.
    let a0 = message("events", "a-0", "a-0").with_ordering_key("a".to_owned());
    let outcome = setup.dispatcher.submit(a0).await.unwrap().await;
    assert!(matches!(outcome.disposition(), Disposition::Retry { .. }));
    assert_eq!(gw.requests_to("ordered").len(), 3, "a-0 was invoked again");
    let b = message("events", "b-1", "b-1").with_ordering_key("b".to_owned());
    let outcome = setup.dispatcher.submit(b).await.unwrap().await;
    assert_eq!(outcome.disposition(), Disposition::Ack, "other keys go on");
}

/// With strict lanes, a key whose failed message came back and succeeded flows again.
#[tokio::test]
async fn strict_lanes_unblock_when_the_failed_message_succeeds() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered", "events", |req, _| {
        if req.body.as_ref() == b"a-0" && req.header("x-delivery-attempt").as_deref() == Some("1") {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    });
    let mut config = gw.config();
    config.ordering = Ordering::Key;
    config.max_attempts = 3;
    let setup = broker_dispatcher(&gw, config, None);
    let msg = |body: &str| message("events", body, body).with_ordering_key("a".to_owned());
    let first = setup.dispatcher.submit(msg("a-0")).await.unwrap().await;
    assert!(matches!(first.disposition(), Disposition::Retry { .. }));
    let early = setup.dispatcher.submit(msg("a-1")).await.unwrap().await;
    assert_eq!(early.disposition(), Disposition::Release, "overtook a-0");
    // The broker redelivers a-0 (its receive count makes this attempt 2).
    let again = setup
        .dispatcher
        .submit(msg("a-0").with_prior_attempts(1))
        .await
        .unwrap()
        .await;
    assert_eq!(again.disposition(), Disposition::Ack);
    let later = setup.dispatcher.submit(msg("a-1")).await.unwrap().await;
    assert_eq!(later.disposition(), Disposition::Ack);
    let bodies: Vec<String> = gw
        .requests_to("ordered")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(bodies, ["a-0", "a-0", "a-1"]);
}

/// Without strict lanes (the default), a lane goes on behind a message that was held.
#[tokio::test]
async fn default_lanes_go_on_behind_a_held_message() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered", "events", |req, _| {
        if req.body.as_ref() == b"a-0" {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    });
    let mut config = gw.config();
    config.ordering = Ordering::Key;
    config.max_attempts = 2;
    let setup = dispatcher(&gw, config, None);
    let first = message("events", "a-0", "a-0").with_ordering_key("a".to_owned());
    let second = message("events", "a-1", "a-1").with_ordering_key("a".to_owned());
    let first = setup.dispatcher.submit(first).await.unwrap();
    let second = setup.dispatcher.submit(second).await.unwrap();
    assert_eq!(first.await.disposition(), Disposition::Hold);
    assert_eq!(second.await.disposition(), Disposition::Ack);
    assert_eq!(gw.requests_to("ordered").len(), 3, "in-process retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_settles_completions_on_its_own_task_while_the_submitter_is_blocked() {
    use connector_sdk::source::Settler;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", "slow", |_, _| {
        Reply::ok().delay(Duration::from_millis(200))
    });
    let setup = dispatcher(&gw, gw.config(), None);
    let settled: Arc<Mutex<Vec<(String, Disposition)>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let into = settled.clone();
    let settler = Settler::spawn(move |ack: String, outcome: connector_sdk::MessageOutcome| {
        let settled = into.clone();
        let tx = tx.clone();
        async move {
            // A settle step that awaits, as publishing a reply does.
            tokio::time::sleep(Duration::from_millis(50)).await;
            settled
                .lock()
                .unwrap()
                .push((ack.clone(), outcome.disposition()));
            let _ = tx.send(ack);
        }
    });
    for (topic, id) in [("slow", "1"), ("nobody-listens", "2")] {
        let completion = setup
            .dispatcher
            .submit(message(topic, "x", id))
            .await
            .unwrap();
        settler.push(format!("ack-{id}"), completion);
    }
    // The submitting task blocks its thread, as librdkafka's rebalance callback does
    // while it waits for settles: both still settle.
    let both = tokio::task::block_in_place(|| {
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(ack) => seen.push(ack),
                Err(_) => break,
            }
        }
        seen
    });
    assert_eq!(
        both.len(),
        2,
        "settled while the submitter blocked: {both:?}"
    );
    settler.close().await;
    let mut seen = settled.lock().unwrap().clone();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            ("ack-1".to_owned(), Disposition::Ack),
            ("ack-2".to_owned(), Disposition::Ack)
        ]
    );
    assert_eq!(gw.requests_to("slow").len(), 1);
}

#[tokio::test]
async fn a_settler_closes_only_once_everything_pushed_is_settled() {
    use connector_sdk::source::Settler;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", "slow", |_, _| {
        Reply::ok().delay(Duration::from_millis(200))
    });
    let setup = dispatcher(&gw, gw.config(), None);
    let settled = Arc::new(Mutex::new(Vec::new()));
    let into = settled.clone();
    let settler = Settler::spawn(move |ack: u32, outcome: connector_sdk::MessageOutcome| {
        let settled = into.clone();
        async move {
            settled.lock().unwrap().push((ack, outcome.disposition()));
        }
    });
    for id in 0..3u32 {
        let completion = setup
            .dispatcher
            .submit(message("slow", "x", &id.to_string()))
            .await
            .unwrap();
        settler.push(id, completion);
    }
    assert!(settled.lock().unwrap().is_empty());
    settler.close().await;
    let mut seen = settled.lock().unwrap().clone();
    seen.sort_by_key(|s| s.0);
    assert_eq!(
        seen,
        vec![
            (0, Disposition::Ack),
            (1, Disposition::Ack),
            (2, Disposition::Ack)
        ]
    );
}

#[tokio::test]
async fn matcher_answers_follow_the_topic_map() {
    use connector_sdk::topic_map::{FunctionStatus, TopicMap, TopicMapHandle};
    let subscribed = |name: &str, topic: &str| FunctionStatus {
        name: name.into(),
        namespace: None,
        annotations: [("topic".to_owned(), topic.to_owned())].into(),
    };
    let config = SdkConfig {
        gateway_url: "http://127.0.0.1:1".into(),
        ..SdkConfig::default()
    };
    let topics = TopicMapHandle::fixed(TopicMap::build(&[subscribed("a", "orders")], ","));
    let (metrics, _registry) = Metrics::standalone("test-connector");
    let client = GatewayClient::new("test-connector", &config).unwrap();
    // Prefix match: "orders" subscribes to "orders.created".
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let matcher: connector_sdk::dispatcher::Matcher = Arc::new(move |map, topic| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        map.entries()
            .filter(|(pattern, _)| topic.starts_with(*pattern))
            .flat_map(|(_, functions)| functions.iter().cloned())
            .collect::<Vec<_>>()
            .into()
    });
    let dispatcher = Dispatcher::builder(client, topics.clone(), &config, metrics)
        .matcher(matcher)
        .build();
    let names = |d: &Dispatcher, topic: &str| -> Vec<String> {
        d.functions_for(topic)
            .iter()
            .map(|f| f.to_string())
            .collect()
    };
    assert_eq!(names(&dispatcher, "orders.created"), ["a"]);
    assert_eq!(names(&dispatcher, "orders.created"), ["a"]);
    assert_eq!(names(&dispatcher, "payments"), Vec::<String>::new());
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "answers are kept"
    );
    topics.replace(TopicMap::build(&[subscribed("b", "orders")], ","));
    assert_eq!(
        names(&dispatcher, "orders.created"),
        ["b"],
        "a new map, new answers"
    );
}

// ------------------------------------------------ per-function delivery policy (#17)

/// OpenFaaS Pro's retry annotations give one function its own attempts and retried
/// codes; a function without them keeps the connector's.
#[tokio::test]
async fn retry_annotations_give_a_function_its_own_policy() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "patient",
        &[
            ("topic", "orders"),
            ("com.openfaas.retry.attempts", "5"),
            ("com.openfaas.retry.codes", "503"),
            ("com.openfaas.retry.min_wait", "1ms"),
            ("com.openfaas.retry.max_wait", "5ms"),
        ],
        |req, _| {
            if &req.body[..] == b"teapot" {
                Reply::status(500)
            } else {
                Reply::status(503)
            }
        },
    );
    gw.function("plain", "orders", |_, _| Reply::status(503));
    let sink = Arc::new(RecordingSink::default());
    let mut config = gw.config();
    config.max_attempts = 2;
    let setup = dispatcher(&gw, config, Some(sink.clone()));
    let outcome = setup
        .dispatcher
        .submit(message("orders", "x", "1"))
        .await
        .unwrap()
        .await;
    let attempts = |f: &str| {
        outcome
            .deliveries
            .iter()
            .find(|d| d.function.as_str() == f)
            .unwrap()
            .attempts
    };
    assert_eq!(attempts("patient"), 5, "its own attempts");
    assert_eq!(attempts("plain"), 2, "the connector's attempts");
    // With `codes`, a status not listed is not retried.
    let outcome = setup
        .dispatcher
        .submit(message("orders", "teapot", "2"))
        .await
        .unwrap()
        .await;
    let patient = outcome
        .deliveries
        .iter()
        .find(|d| d.function.as_str() == "patient")
        .unwrap();
    assert_eq!(patient.attempts, 1, "500 is not in its retried codes");
    assert_eq!(patient.outcome, DeliveryOutcome::DeadLettered);
}

/// A function whose annotation cannot be used is skipped, logged and counted; the others
/// keep running.
#[tokio::test]
async fn an_invalid_annotation_skips_that_subscription_only() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "broken",
        &[("topic", "orders"), ("com.openfaas.retry.attempts", "lots")],
        |_, _| Reply::ok(),
    );
    gw.function("fine", "orders", |_, _| Reply::ok());
    let map = gw.topic_map().current();
    assert_eq!(map.invalid().len(), 1);
    assert_eq!(map.invalid()[0].0.as_str(), "broken");
    assert_eq!(map.invalid()[0].1.key, "com.openfaas.retry.attempts");
    let setup = dispatcher(&gw, gw.config(), None);
    let outcome = setup
        .dispatcher
        .submit(message("orders", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.deliveries.len(), 1);
    assert_eq!(outcome.deliveries[0].function.as_str(), "fine");
    assert!(gw.requests_to("broken").is_empty());
}

/// `connector.max_inflight` bounds one function's invocations, and while it is at its
/// limit the other function's messages keep flowing: every fast message completes while
/// slow ones are still waiting.
#[tokio::test(flavor = "multi_thread")]
async fn a_function_at_its_limit_does_not_hold_up_the_others() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "slow",
        &[("topic", "reports"), ("connector.max_inflight", "2")],
        |_, _| Reply::ok().delay(Duration::from_millis(150)),
    );
    gw.function("fast", "clicks", |_, _| Reply::ok());
    let mut config = gw.config();
    config.max_inflight = 16;
    let setup = dispatcher(&gw, config, None);
    let slow_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow = {
        let (d, done) = (setup.dispatcher.clone(), slow_done.clone());
        tokio::spawn(async move {
            let mut pending = Vec::new();
            for i in 0..12 {
                pending.push(
                    d.submit(message("reports", "r", &format!("r{i}")))
                        .await
                        .unwrap(),
                );
            }
            for c in pending {
                c.await;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    // The slow function's limit is reached first.
    assert!(eventually(Duration::from_secs(5), || gw.requests_to("slow").len() >= 2).await);
    let fast = submit_all(&setup.dispatcher, "clicks", "c", "c", 200).await;
    for c in fast {
        assert_eq!(c.await.disposition(), Disposition::Ack);
    }
    assert!(
        slow_done.load(std::sync::atomic::Ordering::SeqCst) < 12,
        "the fast messages waited for the slow ones"
    );
    slow.await.unwrap();
    assert_eq!(gw.requests_to("slow").len(), 12);
    assert_eq!(gw.requests_to("fast").len(), 200);
}

/// Only the slow function runs: never more than its limit at once, though the
/// connector allows 16.
#[tokio::test(flavor = "multi_thread")]
async fn a_function_never_exceeds_its_own_limit() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "slow",
        &[("topic", "reports"), ("connector.max_inflight", "3")],
        |_, _| Reply::ok().delay(Duration::from_millis(50)),
    );
    let mut config = gw.config();
    config.max_inflight = 16;
    let setup = dispatcher(&gw, config, None);
    let pending = submit_all(&setup.dispatcher, "reports", "r", "r", 15).await;
    for c in pending {
        c.await;
    }
    assert_eq!(gw.requests_to("slow").len(), 15);
    assert_eq!(gw.max_inflight(), 3);
}

/// A policy change takes effect at the next topic map, without a restart.
#[tokio::test]
async fn a_changed_annotation_applies_from_the_next_map() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("f", "orders", |_, _| Reply::status(503));
    let mut config = gw.config();
    config.max_attempts = 2;
    let setup = dispatcher(&gw, config, None);
    let attempts = |o: connector_sdk::MessageOutcome| o.deliveries[0].attempts;
    let first = setup
        .dispatcher
        .submit(message("orders", "x", "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(attempts(first), 2);
    gw.set_annotations(
        "f",
        &[("topic", "orders"), ("com.openfaas.retry.attempts", "4")],
    );
    setup
        .topics
        .replace(gw.topic_map().current().as_ref().clone());
    let second = setup
        .dispatcher
        .submit(message("orders", "x", "2"))
        .await
        .unwrap()
        .await;
    assert_eq!(attempts(second), 4);
}

/// `connector.timeout` bounds one function's invocations below `upstream_timeout`.
#[tokio::test]
async fn a_function_timeout_replaces_the_upstream_timeout() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "sluggish",
        &[("topic", "orders"), ("connector.timeout", "100ms")],
        |_, _| Reply::ok().delay(Duration::from_secs(5)),
    );
    let mut config = gw.config();
    config.max_attempts = 1;
    let setup = dispatcher(&gw, config, None);
    let outcome = setup
        .dispatcher
        .submit(message("orders", "x", "1"))
        .await
        .unwrap()
        .await;
    let report = &outcome.deliveries[0];
    assert!(
        report.error.as_deref().is_some_and(|e| e.contains("100ms")),
        "{report:?}"
    );
}

/// A delivery waiting for its retry does not hold its function's place: with a limit of
/// one, another message of the function runs during the first one's backoff.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_backoff_does_not_hold_the_functions_place() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "single",
        &[
            ("topic", "orders"),
            ("connector.max_inflight", "1"),
            ("com.openfaas.retry.min_wait", "10ms"),
            ("com.openfaas.retry.max_wait", "2s"),
        ],
        |req, call| {
            if &req.body[..] == b"flaky" && call == 0 {
                // At least a second before the retry, whatever the jitter draws.
                Reply::status(503).header("retry-after", "1")
            } else {
                Reply::ok()
            }
        },
    );
    let setup = dispatcher(&gw, gw.config(), None);
    let flaky = setup
        .dispatcher
        .submit(message("orders", "flaky", "1"))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || gw.requests_to("single").len()
            == 1)
        .await
    );
    let steady = setup
        .dispatcher
        .submit(message("orders", "steady", "2"))
        .await
        .unwrap();
    let (flaky, steady) = (flaky.await, steady.await);
    assert_eq!(flaky.disposition(), Disposition::Ack);
    assert_eq!(steady.disposition(), Disposition::Ack);
    let bodies: Vec<Vec<u8>> = gw
        .requests_to("single")
        .iter()
        .map(|r| r.body.to_vec())
        .collect();
    assert_eq!(
        bodies,
        [b"flaky".to_vec(), b"steady".to_vec(), b"flaky".to_vec()],
        "the steady message waited for the flaky one's backoff"
    );
}

/// `connector.ordering` gives one function its own order: it receives the messages of a
/// key one after another, while a function without order (or opted out of the
/// connector's) receives them all at once, and is not held up by the ordered one.
#[tokio::test(flavor = "multi_thread")]
async fn ordering_is_per_function() {
    for (connector, ordered, free) in [
        (
            Ordering::None,
            ("connector.ordering", "key"),
            ("x-none", ""),
        ),
        (
            Ordering::Key,
            ("x-none", ""),
            ("connector.ordering", "none"),
        ),
    ] {
        let gw = FakeGateway::start().await.unwrap();
        gw.function_with_annotations("ordered", &[("topic", "events"), ordered], |_, _| {
            Reply::ok().delay(Duration::from_millis(400))
        });
        gw.function_with_annotations("free", &[("topic", "events"), free], |_, _| {
            Reply::ok().delay(Duration::from_millis(400))
        });
        let mut config = gw.config();
        config.ordering = connector;
        let setup = dispatcher(&gw, config, None);
        let mut completions = Vec::new();
        for i in 0..4 {
            let m = message("events", &i.to_string(), &format!("m{i}"))
                .with_ordering_key("k".to_owned());
            completions.push(setup.dispatcher.submit(m).await.unwrap());
        }
        assert!(
            eventually(Duration::from_secs(5), || gw.requests_to("free").len() == 4).await,
            "{connector:?}: the unordered function receives every message at once"
        );
        assert_eq!(
            gw.requests_to("ordered").len(),
            1,
            "{connector:?}: the ordered function has only the first so far"
        );
        for completion in completions {
            assert_eq!(completion.await.disposition(), Disposition::Ack);
        }
        let bodies: Vec<_> = gw
            .requests_to("ordered")
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect();
        assert_eq!(bodies, ["0", "1", "2", "3"], "{connector:?}: in order");
        let at: Vec<_> = gw.requests_to("ordered").iter().map(|r| r.at).collect();
        assert!(
            at.windows(2)
                .all(|w| w[1].duration_since(w[0]) >= Duration::from_millis(400)),
            "{connector:?}: one after another"
        );
    }
}

/// `connector.filter`: a function receives only the messages its expression is true
/// for, on a CloudEvents attribute and on a JSON field of the body; what it rejects is
/// done for it (acknowledged, counted per function), and a function without a filter
/// receives everything.
#[tokio::test]
async fn a_filter_selects_exactly_the_matching_messages() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "big-orders",
        &[
            ("topic", "orders"),
            (
                "connector.filter",
                "type == 'order.created' && data.amount > 100",
            ),
        ],
        |_, _| Reply::ok(),
    );
    gw.function_with_annotations(
        "eu",
        &[
            ("topic", "orders"),
            ("connector.filter", "headers['x-region'] == 'eu'"),
        ],
        |_, _| Reply::ok(),
    );
    gw.function("everything", "orders", |_, _| Reply::ok());
    let setup = dispatcher(&gw, gw.config(), None);
    let event = |id: &str, kind: &str, body: &str, region: &str| {
        let mut m = message("orders", body, id).with_event_type(kind);
        m.headers
            .insert("x-region", http::HeaderValue::from_str(region).unwrap());
        m
    };
    let messages = [
        event("1", "order.created", r#"{"amount": 150}"#, "eu"),
        event("2", "order.created", r#"{"amount": 50}"#, "us"),
        event("3", "order.refunded", r#"{"amount": 500}"#, "eu"),
        event("4", "order.created", r#"{"amount": 101}"#, "us"),
    ];
    for m in messages {
        let outcome = setup.dispatcher.submit(m).await.unwrap().await;
        assert_eq!(outcome.disposition(), Disposition::Ack, "{outcome:?}");
    }
    let ids = |f: &str| -> Vec<String> {
        gw.requests_to(f)
            .iter()
            .filter_map(|r| r.header("ce-id"))
            .collect()
    };
    assert_eq!(ids("big-orders"), ["1", "4"]);
    assert_eq!(ids("eu"), ["1", "3"]);
    assert_eq!(ids("everything"), ["1", "2", "3", "4"]);
    let text = encode(&setup.registry);
    assert!(
        text.contains(r#"connector_deliveries_total{function="big-orders",outcome="filtered"} 2"#),
        "{text}"
    );
}

/// A filter that does not compile makes its subscription invalid and only that one; a
/// filter that fails on a message dead-letters that delivery with the reason and error.
#[tokio::test]
async fn a_broken_filter_disables_its_subscription_and_a_failing_one_dead_letters() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "broken",
        &[("topic", "orders"), ("connector.filter", "type ==")],
        |_, _| Reply::ok(),
    );
    gw.function_with_annotations(
        "strict",
        &[("topic", "orders"), ("connector.filter", "data.amount > 1")],
        |_, _| Reply::ok(),
    );
    gw.function("fine", "orders", |_, _| Reply::ok());
    let map = gw.topic_map().current();
    assert_eq!(map.invalid().len(), 1);
    assert_eq!(map.invalid()[0].0.as_str(), "broken");
    assert_eq!(map.invalid()[0].1.key, "connector.filter");
    let sink = Arc::new(RecordingSink {
        letters: Mutex::default(),
        fail: false,
    });
    let setup = dispatcher(&gw, gw.config(), Some(sink.clone()));
    let outcome = setup
        .dispatcher
        .submit(message("orders", r#"{"currency": "EUR"}"#, "1"))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.disposition(), Disposition::Ack);
    let mut functions: Vec<_> = outcome
        .deliveries
        .iter()
        .map(|d| (d.function.as_str().to_owned(), d.outcome))
        .collect();
    functions.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        functions,
        [
            ("fine".to_owned(), DeliveryOutcome::Delivered),
            ("strict".to_owned(), DeliveryOutcome::DeadLettered),
        ]
    );
    assert!(gw.requests_to("broken").is_empty());
    assert!(gw.requests_to("strict").is_empty());
    let letters = sink.letters.lock().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, DeadLetterReason::FilterFailed);
    let error = letters[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("amount"), "{error}");
    assert!(
        encode(&setup.registry).contains(r#"connector_filter_errors_total{function="strict"} 1"#)
    );
}

/// The items of a CloudEvents JSON batch: (id, data).
fn batch_items(body: &[u8]) -> Vec<(String, serde_json::Value)> {
    let events: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
    events
        .into_iter()
        .map(|e| {
            assert_eq!(e["specversion"], "1.0", "{e}");
            assert_eq!(e["topic"], "orders", "{e}");
            (e["id"].as_str().unwrap().to_owned(), e["data"].clone())
        })
        .collect()
}

fn batching(size: &str, window: &str) -> [(&'static str, String); 3] {
    [
        ("topic", "orders".to_owned()),
        ("connector.batch.size", size.to_owned()),
        ("connector.batch.window", window.to_owned()),
    ]
}

async fn annotate(
    gw: &FakeGateway,
    name: &str,
    annotations: &[(&'static str, String)],
    reply: impl Fn(&connector_sdk::testing::Received) -> Reply + Send + Sync + 'static,
) {
    let pairs: Vec<(&str, &str)> = annotations.iter().map(|(k, v)| (*k, v.as_str())).collect();
    gw.function_with_annotations(name, &pairs, move |req, _| reply(req));
}

/// `connector.batch.size`: a full batch is sent at once, as one CloudEvents JSON batch
/// with each message's id and JSON data; what is left goes when the window closes.
#[tokio::test(flavor = "multi_thread")]
async fn batches_are_sent_full_or_when_their_window_closes() {
    let gw = FakeGateway::start().await.unwrap();
    annotate(&gw, "batched", &batching("10", "300ms"), |_| Reply::ok()).await;
    let setup = dispatcher(&gw, gw.config(), None);
    let mut pending = Vec::new();
    for i in 0..25 {
        let m = message("orders", &format!(r#"{{"n": {i}}}"#), &format!("m{i}"));
        pending.push(setup.dispatcher.submit(m).await.unwrap());
    }
    for c in pending {
        let outcome = c.await;
        assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::Delivered);
    }
    let requests = gw.requests_to("batched");
    let sizes: Vec<usize> = requests
        .iter()
        .map(|r| batch_items(&r.body).len())
        .collect();
    assert_eq!(
        sizes,
        [10, 10, 5],
        "full batches first, the rest after the window"
    );
    assert_eq!(
        requests[0].header("content-type").as_deref(),
        Some("application/cloudevents-batch+json")
    );
    assert!(requests[0].header("ce-id").is_none());
    // Without an ordering key, workers take messages concurrently: the batches, and the
    // messages within one, come in any order.
    let mut all = Vec::new();
    for r in &requests {
        let numbers: Vec<usize> = batch_items(&r.body)
            .into_iter()
            .map(|(id, data)| {
                assert_eq!(
                    data,
                    serde_json::json!({"n": id[1..].parse::<usize>().unwrap()})
                );
                id[1..].parse().unwrap()
            })
            .collect();
        all.extend(numbers);
    }
    all.sort_unstable();
    assert_eq!(all, (0..25).collect::<Vec<_>>(), "every message once");
    // The last batch waited for its window.
    assert!(requests[2].at.duration_since(requests[1].at) >= Duration::from_millis(250));
}

/// A batch item keeps its message's trace context (traces off: the incoming one) as the
/// CloudEvents tracing extension of its event; an item without one has none; the request
/// continues the traced item's trace.
#[tokio::test(flavor = "multi_thread")]
async fn batch_items_carry_their_trace_context() {
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let gw = FakeGateway::start().await.unwrap();
    annotate(&gw, "batched", &batching("2", "5s"), |_| Reply::ok()).await;
    let setup = dispatcher(&gw, gw.config(), None);
    let mut traced = message("orders", "{}", "traced");
    traced.set_trace_context(PARENT.as_bytes(), Some(b"v=1"));
    let plain = message("orders", "{}", "plain");
    let mut pending = Vec::new();
    for m in [plain, traced] {
        pending.push(setup.dispatcher.submit(m).await.unwrap());
    }
    for c in pending {
        assert_eq!(c.await.deliveries[0].outcome, DeliveryOutcome::Delivered);
    }
    let requests = gw.requests_to("batched");
    assert_eq!(requests.len(), 1, "one batch of two");
    let events: Vec<serde_json::Value> = serde_json::from_slice(&requests[0].body).unwrap();
    let event = |id: &str| events.iter().find(|e| e["id"] == id).unwrap().clone();
    assert_eq!(event("traced")["traceparent"], PARENT);
    assert_eq!(event("traced")["tracestate"], "v=1");
    assert!(event("plain").get("traceparent").is_none(), "{events:?}");
    assert_eq!(requests[0].header("traceparent").as_deref(), Some(PARENT));
}

/// A 2xx listing items in `batchItemFailures` fails only those: they are retried (in a
/// smaller batch) and the others are not sent again; an item that keeps failing is
/// dead-lettered alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_partial_failure_retries_only_the_failed_items() {
    let gw = FakeGateway::start().await.unwrap();
    annotate(&gw, "picky", &batching("4", "50ms"), |req| {
        let items = batch_items(&req.body);
        let mut failures = Vec::new();
        for (id, _) in &items {
            // m1 fails once; m2 always.
            let first = req.header("x-delivery-attempt").as_deref() == Some("1");
            if id == "m2" || (id == "m1" && first) {
                failures.push(serde_json::json!({"itemIdentifier": id}));
            }
        }
        Reply::ok().body(
            serde_json::json!({"batchItemFailures": failures})
                .to_string()
                .as_bytes(),
        )
    })
    .await;
    let mut config = gw.config();
    config.max_attempts = 3;
    config.backoff.initial = Duration::from_millis(10);
    config.backoff.max = Duration::from_millis(20);
    let sink = Arc::new(RecordingSink {
        letters: Mutex::default(),
        fail: false,
    });
    let setup = dispatcher(&gw, config, Some(sink.clone()));
    let pending = submit_all(&setup.dispatcher, "orders", r#"{"a": 1}"#, "m", 4).await;
    let mut outcomes = Vec::new();
    for c in pending {
        let o = c.await;
        outcomes.push((
            o.id.clone(),
            o.deliveries[0].outcome,
            o.deliveries[0].attempts,
        ));
    }
    assert_eq!(
        outcomes,
        [
            ("m0".to_owned(), DeliveryOutcome::Delivered, 1),
            ("m1".to_owned(), DeliveryOutcome::Delivered, 2),
            ("m2".to_owned(), DeliveryOutcome::DeadLettered, 3),
            ("m3".to_owned(), DeliveryOutcome::Delivered, 1),
        ]
    );
    let sent: Vec<Vec<String>> = gw
        .requests_to("picky")
        .iter()
        .map(|r| batch_items(&r.body).into_iter().map(|(id, _)| id).collect())
        .collect();
    // Workers take the messages concurrently: they join the batch in any order.
    let mut first = sent[0].clone();
    first.sort();
    assert_eq!(first, ["m0", "m1", "m2", "m3"]);
    let resent: Vec<&String> = sent[1..].iter().flatten().collect();
    assert!(
        !resent.iter().any(|id| *id == "m0" || *id == "m3"),
        "delivered items were sent again: {sent:?}"
    );
    assert_eq!(resent.iter().filter(|id| **id == "m1").count(), 1);
    assert_eq!(resent.iter().filter(|id| **id == "m2").count(), 2);
    let letters = sink.letters.lock().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message.id, "m2");
}

/// Any other status gives every item that status's verdict: a 503 retries the whole
/// batch, a 400 dead-letters each item.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_batch_fails_every_item() {
    let gw = FakeGateway::start().await.unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    annotate(&gw, "flaky", &batching("3", "50ms"), move |_| {
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    })
    .await;
    let mut config = gw.config();
    config.backoff.initial = Duration::from_millis(10);
    config.backoff.max = Duration::from_millis(20);
    let setup = dispatcher(&gw, config, None);
    let pending = submit_all(&setup.dispatcher, "orders", "plain text", "m", 3).await;
    for c in pending {
        let o = c.await;
        assert_eq!(o.deliveries[0].outcome, DeliveryOutcome::Delivered);
        assert_eq!(o.deliveries[0].attempts, 2);
    }
    let requests = gw.requests_to("flaky");
    let total: usize = requests.iter().map(|r| batch_items(&r.body).len()).sum();
    assert_eq!(
        total, 6,
        "each item twice: once in the failed batch, once after"
    );
    // Text that is not JSON travels as a string.
    assert_eq!(batch_items(&requests[0].body)[0].1, "plain text");
}

/// `[connector.batch]` gives every function batches; a function's annotation overrides it.
#[tokio::test(flavor = "multi_thread")]
async fn connector_wide_batches_apply_unless_a_function_says_otherwise() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("plain", "orders", |_, _| Reply::ok());
    annotate(
        &gw,
        "single",
        &[
            ("topic", "orders".to_owned()),
            ("connector.batch.size", "1".to_owned()),
        ],
        |_| Reply::ok(),
    )
    .await;
    let mut config = gw.config();
    config.batch.size = 4;
    config.batch.window = Duration::from_millis(100);
    let setup = dispatcher(&gw, config, None);
    let pending = submit_all(&setup.dispatcher, "orders", r#"{"a": 1}"#, "m", 8).await;
    for c in pending {
        assert_eq!(c.await.disposition(), Disposition::Ack);
    }
    let plain: Vec<usize> = gw
        .requests_to("plain")
        .iter()
        .map(|r| batch_items(&r.body).len())
        .collect();
    assert_eq!(plain, [4, 4]);
    assert_eq!(
        gw.requests_to("single").len(),
        8,
        "its annotation turns batches off"
    );
}

/// A batch is one invocation: `max_inflight` bounds the batches in flight, not the
/// messages in them, so batches fill far past it (what lets batches of 100 at the same
/// `max_inflight` beat one message per call).
#[tokio::test(flavor = "multi_thread")]
async fn max_inflight_bounds_the_batches_in_flight_not_the_messages_in_them() {
    let gw = FakeGateway::start().await.unwrap();
    annotate(&gw, "batched", &batching("10", "5s"), |_| {
        Reply::ok().delay(Duration::from_millis(200))
    })
    .await;
    let mut config = gw.config();
    config.max_inflight = 2;
    let setup = dispatcher(&gw, config, None);
    let pending = submit_all(&setup.dispatcher, "orders", r#"{"a": 1}"#, "m", 40).await;
    for c in pending {
        assert_eq!(c.await.deliveries[0].outcome, DeliveryOutcome::Delivered);
    }
    let sizes: Vec<usize> = gw
        .requests_to("batched")
        .iter()
        .map(|r| batch_items(&r.body).len())
        .collect();
    assert_eq!(
        sizes,
        [10, 10, 10, 10],
        "full batches, none waited for the window"
    );
    assert_eq!(gw.max_inflight(), 2, "two batches at once, never more");
}

/// A function's own `connector.max_inflight` counts its batches too, and admits enough
/// messages to fill them.
#[tokio::test(flavor = "multi_thread")]
async fn a_functions_own_limit_counts_batches_and_admits_enough_to_fill_them() {
    let gw = FakeGateway::start().await.unwrap();
    let mut annotations = batching("5", "5s").to_vec();
    annotations.push(("connector.max_inflight", "1".to_owned()));
    annotate(&gw, "batched", &annotations, |_| {
        Reply::ok().delay(Duration::from_millis(100))
    })
    .await;
    let setup = dispatcher(&gw, gw.config(), None);
    let pending = submit_all(&setup.dispatcher, "orders", r#"{"a": 1}"#, "m", 20).await;
    for c in pending {
        assert_eq!(c.await.deliveries[0].outcome, DeliveryOutcome::Delivered);
    }
    let sizes: Vec<usize> = gw
        .requests_to("batched")
        .iter()
        .map(|r| batch_items(&r.body).len())
        .collect();
    assert_eq!(sizes, [5, 5, 5, 5]);
    assert_eq!(gw.max_inflight(), 1, "one batch at a time");
}

/// With key ordering a batch holds at most one message per key, and each key's messages
/// reach the function in order, within and across batches.
#[tokio::test(flavor = "multi_thread")]
async fn key_order_holds_within_and_across_batches() {
    let gw = FakeGateway::start().await.unwrap();
    annotate(&gw, "batched", &batching("10", "50ms"), |_| Reply::ok()).await;
    let mut config = gw.config();
    config.ordering = Ordering::Key;
    let setup = dispatcher(&gw, config, None);
    let mut pending = Vec::new();
    for i in 0..12 {
        let key = format!("k{}", i % 3);
        let m =
            message("orders", &format!(r#"{{"n": {i}}}"#), &format!("m{i}")).with_ordering_key(key);
        pending.push(setup.dispatcher.submit(m).await.unwrap());
    }
    for c in pending {
        assert_eq!(c.await.deliveries[0].outcome, DeliveryOutcome::Delivered);
    }
    let mut seen: Vec<Vec<usize>> = vec![Vec::new(); 3];
    for r in gw.requests_to("batched") {
        let mut keys_in_batch = Vec::new();
        for (id, _) in batch_items(&r.body) {
            let n: usize = id[1..].parse().unwrap();
            assert!(
                !keys_in_batch.contains(&(n % 3)),
                "two messages of key k{} in one batch",
                n % 3
            );
            keys_in_batch.push(n % 3);
            seen[n % 3].push(n);
        }
    }
    for (key, numbers) in seen.iter().enumerate() {
        let expected: Vec<usize> = (0..12).filter(|n| n % 3 == key).collect();
        assert_eq!(numbers, &expected, "key k{key} out of order");
    }
}

/// Asynchronous invocation sends a batch to `/async-function/` with the callback URL,
/// as it does a single message.
#[tokio::test(flavor = "multi_thread")]
async fn an_asynchronous_batch_carries_the_callback_url() {
    let gw = FakeGateway::start().await.unwrap();
    annotate(&gw, "batched", &batching("3", "50ms"), |_| Reply::ok()).await;
    let mut config = gw.config();
    config.asynchronous_invocation = true;
    config.callback_url = Some("http://127.0.0.1:9/callback".into());
    let setup = dispatcher(&gw, config, None);
    let pending = submit_all(&setup.dispatcher, "orders", r#"{"a": 1}"#, "m", 3).await;
    for c in pending {
        let outcome = c.await;
        assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::Delivered);
        let status = outcome.deliveries[0].response.as_ref().unwrap().status;
        assert_eq!(status.as_u16(), 202);
    }
    let requests = gw.requests_to("batched");
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].header("x-callback-url").as_deref(),
        Some("http://127.0.0.1:9/callback")
    );
}

/// What a source's broker-side window must hold: the workers and the hand-off queue,
/// plus what each batching function's batches hold.
#[tokio::test]
async fn the_message_window_grows_with_the_functions_batches() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function("single", "orders", |_, _| Reply::ok());
    let mut config = gw.config();
    config.max_inflight = 4;
    let before = dispatcher(&gw, config.clone(), None);
    assert_eq!(before.dispatcher.message_window(), 8, "twice max_inflight");
    annotate(&gw, "batched", &batching("10", "1s"), |_| Reply::ok()).await;
    let mut limited = batching("5", "1s").to_vec();
    limited.push(("connector.max_inflight", "1".to_owned()));
    annotate(&gw, "limited", &limited, |_| Reply::ok()).await;
    let after = dispatcher(&gw, config, None);
    assert_eq!(
        after.dispatcher.message_window(),
        8 + (4 + 1) * 10 + (1 + 1) * 5,
        "plus a batch per in-flight place and one filling, per batching function"
    );
}

/// Messages the dispatcher holds (retrying here) count in their functions' backlog until
/// they are complete; a subscribed function with nothing waiting reads zero.
#[tokio::test]
async fn held_messages_count_in_the_function_backlog_until_complete() {
    use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
    let gw = FakeGateway::start().await.unwrap();
    let down = Arc::new(AtomicBool::new(true));
    let state = down.clone();
    gw.function_with_annotations(
        "waiting",
        &[("topic", "orders"), ("com.openfaas.retry.attempts", "1000")],
        move |_, _| {
            if state.load(AtomicOrdering::SeqCst) {
                Reply::status(503)
            } else {
                Reply::ok()
            }
        },
    );
    gw.function("idle", "audit", |_, _| Reply::ok());
    let (metrics, _registry) = Metrics::standalone("test-connector");
    let config = gw.config();
    let client = GatewayClient::new("test-connector", &config).unwrap();
    let topics = gw.topic_map();
    let dispatcher = Dispatcher::builder(client, topics.clone(), &config, metrics.clone()).build();
    metrics.backlogs().set_exact_view(topics.clone());
    let waiting = connector_sdk::FunctionRef::new("waiting", None);
    let idle = connector_sdk::FunctionRef::new("idle", None);
    let completions = submit_all(&dispatcher, "orders", "x", "m", 3).await;
    let now = metrics.backlogs().snapshot();
    assert_eq!(now.get(&waiting), Some(&3), "{now:?}");
    assert_eq!(now.get(&idle), Some(&0), "{now:?}");
    // A broker backlog of the topic adds to it.
    metrics.set_backlog("orders", "0", 4);
    assert_eq!(metrics.backlogs().snapshot().get(&waiting), Some(&7));
    metrics.set_backlog("orders", "0", 0);
    down.store(false, AtomicOrdering::SeqCst);
    for c in completions {
        assert_eq!(c.await.disposition(), Disposition::Ack);
    }
    assert_eq!(metrics.backlogs().snapshot().get(&waiting), Some(&0));
}

/// Traces off (no `OTEL_*` endpoint in the test environment): a valid incoming W3C
/// context reaches the function unchanged as `traceparent`/`tracestate`, from the
/// message's trace context or from its own headers; an invalid one, and a publisher's
/// header beside a connector-set context, never do.
#[tokio::test]
async fn trace_context_passes_through_when_traces_are_off() {
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert!(
        !faas_common::otel::configured(),
        "run without OTEL_* endpoints"
    );
    let gw = FakeGateway::start().await.unwrap();
    gw.function("traced", "orders", |_, _| Reply::ok());
    let setup = dispatcher(&gw, gw.config(), None);
    let dispatcher = &setup.dispatcher;
    let submit = |m: Message| async move { dispatcher.submit(m).await.unwrap().await };

    let mut set = message("orders", "a", "orders/0/1");
    set.set_trace_context(PARENT.as_bytes(), Some(b"v=1"));
    set.add_header(
        "traceparent",
        "00-ffffffffffffffffffffffffffffffff-00f067aa0ba902b7-01",
    );
    submit(set).await;
    let mut from_headers = message("orders", "b", "orders/0/2");
    from_headers.add_header("traceparent", PARENT);
    submit(from_headers).await;
    let mut invalid = message("orders", "c", "orders/0/3");
    invalid.set_trace_context(b"00-not-a-context-01", None);
    submit(invalid).await;
    submit(message("orders", "d", "orders/0/4")).await;
    // A CloudEvents structured-mode event carries its context in the envelope.
    let envelope = format!(
        r#"{{"specversion":"1.0","id":"e","source":"s","type":"t","traceparent":"{PARENT}","tracestate":"v=2","data":{{"x":1}}}}"#
    );
    let mut structured = message("orders", &envelope, "orders/0/5");
    structured.content_type = Some(http::HeaderValue::from_static(
        "application/cloudevents+json; charset=utf-8",
    ));
    submit(structured).await;
    let mut plain_json = message("orders", &envelope.replace("\"e\"", "\"f\""), "orders/0/6");
    plain_json.content_type = Some(http::HeaderValue::from_static("application/json"));
    submit(plain_json).await;

    let seen = gw.requests_to("traced");
    let by_body = |b: &[u8]| seen.iter().find(|r| &r.body[..] == b).unwrap();
    let a = by_body(b"a");
    assert_eq!(a.header("traceparent").as_deref(), Some(PARENT));
    assert_eq!(a.header("tracestate").as_deref(), Some("v=1"));
    assert_eq!(by_body(b"b").header("traceparent").as_deref(), Some(PARENT));
    assert_eq!(by_body(b"c").header("traceparent"), None);
    assert_eq!(by_body(b"d").header("traceparent"), None);
    let structured = by_body(envelope.as_bytes());
    assert_eq!(structured.header("traceparent").as_deref(), Some(PARENT));
    assert_eq!(structured.header("tracestate").as_deref(), Some("v=2"));
    let plain = seen
        .iter()
        .find(|r| r.body.starts_with(b"{") && r.body.windows(3).any(|w| w == b"\"f\""))
        .unwrap();
    assert_eq!(
        plain.header("traceparent"),
        None,
        "only a CloudEvent's envelope is read"
    );
}

/// Log lines kept in memory, for a test's own JSON subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `connector.log_format = "json"`: a line about a traced delivery (its failed attempt)
/// carries the trace id in the `trace` span's fields.
#[tokio::test(flavor = "current_thread")]
async fn json_log_lines_about_a_delivery_name_its_trace() {
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let gw = FakeGateway::start().await.unwrap();
    gw.function("flaky", "orders", |_, call| {
        if call == 0 {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    });
    let mut config = gw.config();
    config.backoff.initial = Duration::from_millis(10);
    let setup = dispatcher(&gw, config, None);
    let mut traced = message("orders", "a", "orders/0/1");
    traced.set_trace_context(
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01").as_bytes(),
        None,
    );
    let outcome = setup.dispatcher.submit(traced).await.unwrap().await;
    assert_eq!(outcome.deliveries[0].outcome, DeliveryOutcome::Delivered);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("will retry"))
        .unwrap_or_else(|| panic!("no retry line in:\n{logs}"));
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    let spans = json["spans"].as_array().unwrap();
    assert!(
        spans
            .iter()
            .any(|s| s["name"] == "trace" && s["trace_id"] == TRACE_ID),
        "{line}"
    );
}
