//! OpenTelemetry traces end to end (issue 21): the real `gateway` binary supervising a
//! real connector, an event published with a W3C `traceparent` on a real broker, and an
//! OTLP/HTTP receiver in this test (axum, decoding `opentelemetry-proto`'s export requests
//! with prost) collecting what both export.
//!
//! - traced: the connector's `process` span is the child of the event's own span; its
//!   `invoke` attempts (the function fails once: two of them, attempt 1 and 2) are its
//!   children; each attempt's `proxy` span in the gateway is the attempt's child, and the
//!   `call` to the function the proxy's; the `ack` ends the message. The function gets a
//!   `traceparent` in the event's trace whose parent is the gateway's `call` span.
//!   The connector's log line about the failed attempt names the trace.
//! - async: `/async-function/` with a `traceparent` and a callback URL: the gateway's
//!   `enqueue`, `queue wait`, `proxy`/`call` per attempt and `callback` spans, their
//!   links, and the trace id on the gateway's log line about the retry.
//! - off: no `OTEL_EXPORTER_OTLP_*` endpoint: nothing reaches a receiver on the OTLP
//!   default port (4318, when it is free), and the function still gets the event's
//!   context, passed on unchanged.
//!
//! Kafka is the event source where a broker answers on `KAFKA_BROKERS`; NATS JetStream
//! otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use integration_tests::gateway::Gateway;
use integration_tests::kafka_broker::KafkaTopics;
use integration_tests::nats_broker::JetStreamTopics;
use integration_tests::scenarios::{Fixture, eventually_async};
use integration_tests::{unique, wait_http};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;

const WITHIN: Duration = Duration::from_secs(30);

/// The event's own trace and span: what a publisher that traces would send.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// Fails the first request for each body (exit 1: the gateway answers 500, the connector
/// retries), records the second: its body and the `traceparent` it got.
const FUNCTION: &str = r#"
import json, os, sys, hashlib
body = sys.stdin.buffer.read().decode("utf-8", "replace")
mark = os.path.join("seen", hashlib.sha1(body.encode()).hexdigest())
if not os.path.exists(mark):
    open(mark, "w").close()
    sys.exit(1)
record = {"body": body, "traceparent": os.environ.get("Http_Traceparent")}
with open(os.path.join("recorded", "r.tmp"), "w") as f:
    json.dump(record, f)
os.rename(os.path.join("recorded", "r.tmp"), os.path.join("recorded", "r.json"))
sys.stdout.write("done")
"#;

/// One exported span.
#[derive(Debug, Clone)]
struct SpanRec {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: BTreeMap<String, String>,
}

/// The OTLP/HTTP receiver: `POST /v1/traces` with protobuf bodies.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<SpanRec>>>,
    requests: Arc<Mutex<usize>>,
}

impl Receiver {
    async fn start(addr: SocketAddr) -> Option<(Self, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind(addr).await.ok()?;
        let addr = listener.local_addr().unwrap();
        let receiver = Self::default();
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let state = state.clone();
                async move { state.export(&body) }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Some((receiver, addr))
    }

    fn export(&self, body: &[u8]) -> (StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
        *self.requests.lock().unwrap() += 1;
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            return (
                StatusCode::BAD_REQUEST,
                [("content-type", "text/plain")],
                b"not an ExportTraceServiceRequest".to_vec(),
            );
        };
        let mut spans = self.spans.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(SpanRec {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                            .collect(),
                    });
                }
            }
        }
        (
            StatusCode::OK,
            [("content-type", "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
    }

    fn spans(&self) -> Vec<SpanRec> {
        self.spans.lock().unwrap().clone()
    }

    fn requests(&self) -> usize {
        *self.requests.lock().unwrap()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// Where the event comes from.
enum Source {
    Kafka(KafkaTopics),
    Nats(JetStreamTopics),
}

impl Source {
    /// Kafka when a broker answers, else NATS JetStream.
    async fn pick() -> Self {
        let brokers = integration_tests::kafka_brokers();
        let kafka_up = brokers
            .split(',')
            .filter_map(|b| std::net::ToSocketAddrs::to_socket_addrs(b).ok())
            .flatten()
            .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok());
        if kafka_up {
            Self::Kafka(KafkaTopics::new())
        } else {
            Self::Nats(JetStreamTopics::new().await.with_consumer("otel-it"))
        }
    }

    fn fixture(&self) -> &dyn Fixture {
        match self {
            Self::Kafka(k) => k,
            Self::Nats(n) => n,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "kafka-connector",
            Self::Nats(_) => "nats-connector",
        }
    }

    /// Publishes `body` to `topic` with the event's `traceparent` and a `tracestate`.
    async fn publish(&self, topic: &str, body: &str) {
        let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
        match self {
            Self::Kafka(_) => {
                use rdkafka::message::{Header, OwnedHeaders};
                use rdkafka::producer::{FutureProducer, FutureRecord};
                let producer: FutureProducer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", integration_tests::kafka_brokers())
                    .set("message.timeout.ms", "10000")
                    .create()
                    .unwrap();
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "traceparent",
                        value: Some(traceparent.as_bytes()),
                    })
                    .insert(Header {
                        key: "tracestate",
                        value: Some("test=1".as_bytes()),
                    });
                producer
                    .send(
                        FutureRecord::<(), _>::to(topic)
                            .payload(body)
                            .headers(headers),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
            }
            Self::Nats(n) => {
                let js = n.js();
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("traceparent", traceparent.as_str());
                headers.insert("tracestate", "test=1");
                js.publish_with_headers(topic.to_owned(), headers, body.to_owned().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    }
}

/// The gateway with the function subscribed to `topic` and the source's connector.
struct System {
    gateway: Gateway,
    /// The gateway's API.
    addr: SocketAddr,
    dir: PathBuf,
}

impl System {
    async fn start(source: &Source, topic: &str, env: &[(&str, &str)]) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_owned();
        std::fs::write(dir.join("function.py"), FUNCTION).unwrap();
        std::fs::create_dir(dir.join("recorded")).unwrap();
        std::fs::create_dir(dir.join("seen")).unwrap();
        let connector = format!(
            r#"[connector]
metrics_addr = "127.0.0.1:0"
rebuild_interval = "500ms"
upstream_timeout = "10s"
drain_timeout = "5s"

[connector.backoff]
initial = "50ms"
max = "200ms"

{}
"#,
            source.fixture().source_config(topic)
        );
        std::fs::write(dir.join("connector.toml"), connector).unwrap();
        let config = format!(
            r#"[gateway]
bind = "127.0.0.1:0"
metrics_bind = "127.0.0.1:0"
state_dir = "state"

[supervisor]
stop_timeout = "10s"

[async.backoff]
initial = "50ms"
max = "200ms"

[[functions]]
name = "traced"
runtime = "process"
command = "python3 function.py"
annotations = {{ topic = "{topic}" }}

[[connectors]]
name = "source"
command = "{}"
config = "connector.toml"
"#,
            source.fixture().binary().display()
        );
        let mut gateway = Gateway::start(temp, &config, env);
        let addr = gateway.listening(WITHIN).await;
        let system = Self { gateway, addr, dir };
        let ready = eventually_async(WITHIN, || async {
            let Some(addr) = system.gateway.connector_metrics("source") else {
                return false;
            };
            wait_http(addr, "/readyz", 200, Duration::from_millis(500)).await
        })
        .await;
        assert!(ready, "connector not ready:\n{}", system.gateway.output());
        system
    }

    /// What the function recorded, once it has.
    async fn recorded(&self) -> serde_json::Value {
        let path = self.dir.join("recorded/r.json");
        let done = eventually_async(WITHIN, || async { path.exists() }).await;
        assert!(
            done,
            "the function recorded nothing:\n{}",
            self.gateway.output()
        );
        read_json(&path)
    }

    async fn stop(&mut self) {
        let status = self.gateway.stop(WITHIN).await;
        assert!(
            status.success(),
            "gateway exit {status:?}:\n{}",
            self.gateway.output()
        );
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The one span named `name` (and with `attribute` = `value`, when given).
fn one<'a>(spans: &'a [SpanRec], name: &str, attribute: Option<(&str, &str)>) -> &'a SpanRec {
    let found: Vec<&SpanRec> = spans
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            attribute.is_none_or(|(k, v)| s.attributes.get(k).map(String::as_str) == Some(v))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} {attribute:?} span expected: {spans:#?}"
    );
    found[0]
}

#[tokio::test]
async fn one_event_is_traced_from_its_broker_to_the_function() {
    let source = Source::pick().await;
    let topic = unique("otel");
    source.fixture().create_topic(&topic).await;
    let (receiver, addr) = Receiver::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let endpoint = format!("http://{addr}");
    let mut system = System::start(
        &source,
        &topic,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            // Export within a fraction of a second rather than the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // The connector's line about the failed attempt is at debug.
            ("RUST_LOG", "info,connector_sdk=debug"),
        ],
    )
    .await;
    source.publish(&topic, "traced-event").await;
    let record = system.recorded().await;
    assert_eq!(record["body"], "traced-event");
    let traceparent = record["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(
        parts.len(),
        4,
        "the function's traceparent: {traceparent:?}"
    );
    assert_eq!(parts[1], TRACE_ID, "the function is in the event's trace");

    // Every span of the delivery, once the acknowledgement's is in.
    let complete = eventually_async(WITHIN, || async {
        let spans = receiver.spans();
        spans.iter().any(|s| s.name == "ack")
            && spans
                .iter()
                .filter(|s| s.name == "call traced.openfaas-fn")
                .count()
                >= 2
    })
    .await;
    let spans = receiver.spans();
    assert!(complete, "spans: {spans:#?}\n{}", system.gateway.output());
    let spans: Vec<SpanRec> = spans
        .into_iter()
        .filter(|s| s.trace_id == TRACE_ID)
        .collect();
    let connector = source.name();

    let process = one(&spans, &format!("process {topic}"), None);
    assert_eq!(process.service, connector);
    assert_eq!(process.parent, PARENT_SPAN, "child of the event's span");
    assert!(
        process
            .attributes
            .contains_key("messaging.wait_before_dispatch_ms")
    );

    let attempts: Vec<&SpanRec> = (1..=2)
        .map(|n| {
            one(
                &spans,
                "invoke traced.openfaas-fn",
                Some(("delivery.attempt", &n.to_string())),
            )
        })
        .collect();
    for attempt in &attempts {
        assert_eq!(
            attempt.parent, process.span_id,
            "an attempt is the message's child"
        );
        assert_eq!(attempt.service, connector);
    }
    assert_eq!(attempts[0].attributes["http.response.status_code"], "500");
    assert_eq!(attempts[0].attributes["delivery.verdict"], "retry");
    assert!(
        attempts[0]
            .attributes
            .contains_key("delivery.retry_delay_ms")
    );
    assert_eq!(attempts[1].attributes["http.response.status_code"], "200");
    assert_eq!(attempts[1].attributes["delivery.verdict"], "delivered");

    for attempt in &attempts {
        let proxy = spans
            .iter()
            .find(|s| s.name == "proxy traced.openfaas-fn" && s.parent == attempt.span_id)
            .unwrap_or_else(|| panic!("no proxy span under attempt {attempt:?}: {spans:#?}"));
        assert_eq!(proxy.service, "gateway");
        let call = spans
            .iter()
            .find(|s| s.name == "call traced.openfaas-fn" && s.parent == proxy.span_id)
            .unwrap_or_else(|| panic!("no call span under {proxy:?}: {spans:#?}"));
        assert_eq!(call.service, "gateway");
        if attempt.attributes["delivery.attempt"] == "2" {
            assert_eq!(
                parts[2], call.span_id,
                "the function's parent is the gateway's call"
            );
        }
    }

    let ack = one(&spans, "ack", None);
    assert_eq!(ack.parent, process.span_id);
    assert_eq!(ack.attributes["messaging.disposition"], "ack");

    // The connector's log lines about the delivery name the trace.
    let output = system.gateway.output();
    let retry = output
        .lines()
        .find(|l| l.starts_with("[source] ") && l.contains("will retry"))
        .unwrap_or_else(|| panic!("no retry line:\n{output}"));
    assert!(retry.contains(&format!("trace_id={TRACE_ID}")), "{retry}");
    system.stop().await;
}

/// The asynchronous path continues the caller's trace through the gateway's queue:
/// `enqueue` under the caller's span, then `queue wait`, one `proxy` (with its `call`) per
/// attempt and the `callback`, all under `enqueue`; the function and the callback
/// receiver get `traceparent`s in the trace, and the gateway's log line about the retry
/// names it.
#[tokio::test]
async fn an_async_invocation_is_traced_through_the_queue() {
    let source = Source::pick().await;
    let topic = unique("otel-async");
    source.fixture().create_topic(&topic).await;
    let (receiver, addr) = Receiver::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let endpoint = format!("http://{addr}");
    let mut system = System::start(
        &source,
        &topic,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    // The callback's receiver: the traceparent of each callback.
    let callbacks: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = callbacks.clone();
    let app = axum::Router::new().route(
        "/done",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let tp = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().unwrap().push(tp);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback_url = format!("http://{}/done", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let response = reqwest::Client::new()
        .post(format!("http://{}/async-function/traced", system.addr))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
        .header("X-Callback-Url", &callback_url)
        .body("async-event")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let record = system.recorded().await;
    assert_eq!(record["body"], "async-event");
    let function_parent = record["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        function_parent.split('-').nth(1),
        Some(TRACE_ID),
        "the function is in the caller's trace: {function_parent:?}"
    );
    let complete = eventually_async(WITHIN, || async {
        !callbacks.lock().unwrap().is_empty()
            && receiver
                .spans()
                .iter()
                .any(|s| s.name == "callback traced.openfaas-fn")
    })
    .await;
    let spans: Vec<SpanRec> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == TRACE_ID)
        .collect();
    assert!(complete, "spans: {spans:#?}\n{}", system.gateway.output());

    let enqueue = one(&spans, "enqueue traced.openfaas-fn", None);
    assert_eq!(enqueue.service, "gateway");
    assert_eq!(enqueue.parent, PARENT_SPAN, "the caller's child");
    let wait = one(&spans, "queue wait traced.openfaas-fn", None);
    assert_eq!(wait.parent, enqueue.span_id);
    assert!(wait.attributes.contains_key("queue.wait_ms"));
    let proxies: Vec<&SpanRec> = spans
        .iter()
        .filter(|s| s.name == "proxy traced.openfaas-fn")
        .collect();
    assert_eq!(proxies.len(), 2, "one per attempt: {spans:#?}");
    for proxy in &proxies {
        assert_eq!(proxy.parent, enqueue.span_id);
        assert!(
            spans
                .iter()
                .any(|s| s.name == "call traced.openfaas-fn" && s.parent == proxy.span_id),
            "no call under {proxy:?}"
        );
    }
    let callback = one(&spans, "callback traced.openfaas-fn", None);
    assert_eq!(callback.parent, enqueue.span_id);
    let received = callbacks.lock().unwrap()[0].clone();
    let parts: Vec<&str> = received.split('-').collect();
    assert_eq!(parts.get(1), Some(&TRACE_ID), "{received:?}");
    assert_eq!(parts.get(2), Some(&callback.span_id.as_str()));

    // The gateway's own log line about the retry names the trace.
    let output = system.gateway.output();
    assert!(
        output
            .lines()
            .any(|l| !l.starts_with('[') && l.contains("retrying") && l.contains(TRACE_ID)),
        "{output}"
    );
    system.stop().await;
}

#[tokio::test]
async fn with_no_endpoint_nothing_is_exported() {
    let source = Source::pick().await;
    let topic = unique("otel-off");
    source.fixture().create_topic(&topic).await;
    // A receiver on the OTLP default port, where an exporter without an endpoint would
    // send; when another process holds the port, nothing here could tell.
    let receiver = Receiver::start(SocketAddr::from(([127, 0, 0, 1], 4318))).await;
    let mut system = System::start(&source, &topic, &[]).await;
    source.publish(&topic, "untraced-event").await;
    let record = system.recorded().await;
    // Off, the event's context is passed on as it came.
    assert_eq!(
        record["traceparent"],
        format!("00-{TRACE_ID}-{PARENT_SPAN}-01")
    );
    // The gateway and the connector flush their spans when they stop, if they have any.
    system.stop().await;
    if let Some((receiver, _)) = receiver {
        assert_eq!(receiver.requests(), 0, "{:#?}", receiver.spans());
    }
}
