//! `nats-connector` end to end: the real binary against the real nats-server with
//! JetStream (`NATS_URL`, default `nats://127.0.0.1:4222`) and a real HTTP gateway. Every
//! test uses its own subjects, streams and consumers. The shared scenario suite runs in
//! JetStream mode; then core delivery, wildcard mapping, request/reply, a queue group
//! across two replicas, order per subject, dead-letter provenance, a server of our own
//! (on a free loopback port) down at start and restarted mid-run, and an invalid subject
//! refused at start. The machine's shared server is never stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use integration_tests::nats_broker::JetStreamTopics;
use integration_tests::scenarios::{self, Fixture, eventually_async};
use integration_tests::{
    FakeGateway, Process, Reply, eventually, free_addr, http_get, metric, nats_url, unique,
    wait_http,
};

const WITHIN: Duration = Duration::from_secs(30);

fn binary() -> PathBuf {
    integration_tests::binary("nats-connector", "nats-connector")
}

async fn client(url: &str) -> async_nats::Client {
    async_nats::connect(url).await.unwrap()
}

/// The base of the connector's consumer names in these tests.
const CONSUMER: &str = "it";

/// JetStream on `NATS_URL` (a stream per topic, a dead-letter stream capturing
/// `dlq.<topic>`), consumed with [`CONSUMER`].
async fn jetstream_topics() -> JetStreamTopics {
    JetStreamTopics::new().await.with_consumer(CONSUMER)
}

/// Filters and batches select and group messages on the real broker.
#[tokio::test]
async fn jetstream_filters_and_batches() {
    scenarios::filters_and_batches(&jetstream_topics().await).await;
}

/// SIGKILL mid-batch loses nothing on the real broker.
#[tokio::test]
async fn jetstream_batches_lose_nothing_across_kill() {
    scenarios::batches_lose_nothing_across_kill(&jetstream_topics().await).await;
}

#[tokio::test]
async fn jetstream_delivered_once() {
    scenarios::delivered_once(&jetstream_topics().await).await;
}

#[tokio::test]
async fn jetstream_scaler_follows_backlog() {
    integration_tests::keda::scaler_follows_backlog(&jetstream_topics().await).await;
}

#[tokio::test]
async fn jetstream_failure_then_success() {
    scenarios::failure_then_success(&jetstream_topics().await).await;
}

#[tokio::test]
async fn jetstream_dead_letter_on_4xx() {
    scenarios::dead_letter_on_4xx(&jetstream_topics().await).await;
}

#[tokio::test]
async fn jetstream_nothing_lost_across_kill() {
    scenarios::nothing_lost_across_kill(&jetstream_topics().await).await;
}

#[tokio::test]
async fn jetstream_drain_on_shutdown() {
    scenarios::drain_on_shutdown(&jetstream_topics().await).await;
}

/// Held messages (no dead-letter subject) are nakked with a delay and redelivered until
/// the function recovers; none is acknowledged or terminated early.
#[tokio::test(flavor = "multi_thread")]
async fn jetstream_long_outage_loses_nothing() {
    scenarios::long_outage_loses_nothing(&jetstream_topics().await).await;
}

/// A connector with `[connector]` lines `extra` and the NATS sections `nats`.
fn config(gw: &FakeGateway, metrics_addr: SocketAddr, extra: &str, nats: &str) -> String {
    format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics_addr}"
rebuild_interval = "300ms"
upstream_timeout = "10s"
max_attempts = 3
drain_timeout = "5s"
{extra}

[connector.backoff]
initial = "50ms"
max = "200ms"

{nats}
"#,
        gateway = gw.url(),
    )
}

fn core_section(url: &str) -> String {
    format!("[nats]\nurl = \"{url}\"\nmode = \"core\"\n")
}

/// Starts a connector and waits until it is ready.
async fn start(config: &str) -> Process {
    let addr: SocketAddr = config
        .lines()
        .find_map(|l| l.strip_prefix("metrics_addr = "))
        .map(|v| v.trim_matches('"').parse().unwrap())
        .unwrap();
    let process = Process::start(&binary(), config, &[]);
    assert!(
        wait_http(addr, "/readyz", 200, WITHIN).await,
        "connector not ready:\n{}",
        process.output()
    );
    process
}

/// Core NATS has no history: publishes `probe` on `subject` every 100 ms until
/// `arrived` says the function got one (the subscription is then in place).
async fn until_subscribed(
    nats: &async_nats::Client,
    subject: &str,
    arrived: impl Fn() -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + WITHIN;
    while std::time::Instant::now() < deadline {
        nats.publish(subject.to_owned(), "probe".into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
        if eventually(Duration::from_millis(100), &arrived).await {
            return true;
        }
    }
    false
}

fn real_bodies(gw: &FakeGateway, function: &str) -> Vec<String> {
    gw.requests_to(function)
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .filter(|b| b != "probe")
        .collect()
}

#[tokio::test]
async fn core_delivery_with_headers() {
    let subject = unique("core");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("core-fn", &subject, |_, _| Reply::ok());
    let metrics_addr = free_addr();
    let mut connector = start(&config(&gw, metrics_addr, "", &core_section(&nats_url()))).await;
    let nats = client(&nats_url()).await;
    assert!(
        until_subscribed(&nats, &subject, || !gw.requests_to("core-fn").is_empty()).await,
        "the subscription never came up:\n{}",
        connector.output()
    );
    for i in 0..20 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("X-Tenant", "acme");
        headers.insert("Content-Type", "application/json");
        nats.publish_with_headers(subject.clone(), headers, format!("{{\"n\":{i}}}").into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    assert!(eventually(WITHIN, || real_bodies(&gw, "core-fn").len() == 20).await);
    let received: Vec<_> = gw
        .requests_to("core-fn")
        .into_iter()
        .filter(|r| &r.body[..] != b"probe")
        .collect();
    let distinct: BTreeSet<_> = received.iter().map(|r| r.body.clone()).collect();
    assert_eq!(distinct.len(), 20, "duplicates or losses");
    let ids: BTreeSet<_> = received.iter().filter_map(|r| r.header("ce-id")).collect();
    assert_eq!(ids.len(), 20, "ce-id not unique");
    for r in &received {
        assert_eq!(
            r.header("x-nats-subject").as_deref(),
            Some(subject.as_str())
        );
        assert_eq!(r.header("x-topic").as_deref(), Some(subject.as_str()));
        assert_eq!(r.header("x-tenant").as_deref(), Some("acme"));
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(r.header("x-connector").as_deref(), Some("nats-connector"));
    }
    let status = connector.terminate(WITHIN).await;
    assert!(status.success(), "exit status {status:?}");
}

/// Issue 17: a publisher's headers must not shape the HTTP exchange or impersonate the
/// connector. Framing headers (`Content-Length: 1`, `Transfer-Encoding`) would truncate
/// or hang the request, `Host` and `Authorization` would speak for the connector,
/// `X-Callback-Url` would send the function's result where the publisher chose, and
/// `ce-id` / `X-Topic` are the connector's own. An ordinary header still arrives.
#[tokio::test]
async fn publisher_headers_cannot_reframe_the_request_or_impersonate_the_connector() {
    let subject = unique("hdr");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("hdr-fn", &subject, |_, _| Reply::ok());
    let metrics_addr = free_addr();
    let mut connector = start(&config(&gw, metrics_addr, "", &core_section(&nats_url()))).await;
    let nats = client(&nats_url()).await;
    assert!(
        until_subscribed(&nats, &subject, || !gw.requests_to("hdr-fn").is_empty()).await,
        "the subscription never came up:\n{}",
        connector.output()
    );
    let body = "a body of forty bytes, every one of them";
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        ("Content-Length", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Host", "evil.example"),
        ("Authorization", "Bearer stolen"),
        ("X-Callback-Url", "http://evil.example/collect"),
        ("ce-id", "spoofed-id"),
        ("X-Topic", "spoofed-topic"),
        ("X-Trace-Me", "yes"),
    ] {
        headers.insert(name, value);
    }
    nats.publish_with_headers(subject.clone(), headers, body.into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let traced = || {
        gw.requests_to("hdr-fn")
            .into_iter()
            .find(|r| r.header("x-trace-me").is_some())
    };
    assert!(
        eventually(WITHIN, || traced().is_some()).await,
        "the message never arrived with its ordinary header: {:?}\n{}",
        gw.requests_to("hdr-fn"),
        connector.output()
    );
    let r = traced().unwrap();
    assert_eq!(String::from_utf8_lossy(&r.body), body, "body not whole");
    assert_eq!(r.header("x-trace-me").as_deref(), Some("yes"));
    let all = |name: &str| -> Vec<String> {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    };
    assert_eq!(all("content-length"), [body.len().to_string()]);
    assert!(all("transfer-encoding").is_empty(), "{:?}", r.headers);
    assert_eq!(all("host"), [gw.addr.to_string()]);
    assert!(all("authorization").is_empty(), "{:?}", r.headers);
    assert!(all("x-callback-url").is_empty(), "{:?}", r.headers);
    let ids = all("ce-id");
    assert_eq!(ids.len(), 1, "{:?}", r.headers);
    assert_ne!(ids[0], "spoofed-id");
    assert_eq!(all("x-topic"), std::slice::from_ref(&subject));
    assert_eq!(all("x-connector"), ["nats-connector"]);
    let status = connector.terminate(WITHIN).await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn wildcard_annotations_match_as_nats_does_each_once() {
    wildcards("").await;
}

/// Without a queue group every overlapping subscription gets its own copy: still once.
#[tokio::test]
async fn wildcards_without_a_queue_group_each_once() {
    wildcards("queue_group = \"\"\n").await;
}

async fn wildcards(nats_extra: &str) {
    let p = unique("wild");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("exact", &format!("{p}.a"), |_, _| Reply::ok());
    gw.function("star", &format!("{p}.*"), |_, _| Reply::ok());
    gw.function("tail", &format!("{p}.>"), |_, _| Reply::ok());
    gw.function("other", "unrelated.subject", |_, _| Reply::ok());
    let section = format!("{}{nats_extra}", core_section(&nats_url()));
    let connector = start(&config(&gw, free_addr(), "", &section)).await;
    let nats = client(&nats_url()).await;
    let a = format!("{p}.a");
    let deep = format!("{p}.x.y");
    assert!(until_subscribed(&nats, &a, || !gw.requests_to("star").is_empty()).await);
    assert!(
        until_subscribed(&nats, &deep, || gw
            .requests_to("tail")
            .iter()
            .any(|r| r.header("x-nats-subject").as_deref() == Some(deep.as_str())))
        .await,
        "{}",
        connector.output()
    );
    for subject in [format!("{p}.a"), format!("{p}.b"), deep.clone()] {
        nats.publish(subject.clone(), subject.clone().into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    let sorted = |f: &str| {
        let mut v = real_bodies(&gw, f);
        v.sort();
        v
    };
    assert!(
        eventually(WITHIN, || sorted("tail").len() >= 3).await,
        "tail got {:?}, star {:?}, all {:?}",
        sorted("tail"),
        sorted("star"),
        gw.requests()
            .iter()
            .map(|r| (
                r.function.clone(),
                String::from_utf8_lossy(&r.body).into_owned()
            ))
            .collect::<Vec<_>>()
    );
    // Everything queued is delivered within the same poll; give stragglers a moment to
    // show up as duplicates before asserting exact counts.
    assert!(!eventually(Duration::from_millis(500), || sorted("tail").len() > 3).await);
    assert_eq!(sorted("exact"), [format!("{p}.a")]);
    assert_eq!(sorted("star"), [format!("{p}.a"), format!("{p}.b")]);
    assert_eq!(sorted("tail"), [format!("{p}.a"), format!("{p}.b"), deep]);
    assert!(gw.requests_to("other").is_empty());
}

#[tokio::test]
async fn request_reply_returns_the_function_output() {
    let subject = unique("rpc");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("upper", &subject, |req, _| {
        if req.body.starts_with(b"bad") {
            return Reply::status(422).body(b"cannot do that");
        }
        let upper = String::from_utf8_lossy(&req.body).to_uppercase();
        Reply::ok()
            .header("content-type", "text/plain")
            .body(upper.as_bytes())
    });
    let connector = start(&config(&gw, free_addr(), "", &core_section(&nats_url()))).await;
    let nats = client(&nats_url()).await;
    let deadline = std::time::Instant::now() + WITHIN;
    let reply = loop {
        // "no responders" until the subscription is in place.
        match tokio::time::timeout(
            Duration::from_secs(5),
            nats.request(subject.clone(), "hello".into()),
        )
        .await
        {
            Ok(Ok(reply)) => break reply,
            _ if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("no reply: {other:?}\n{}", connector.output()),
        }
    };
    assert_eq!(&reply.payload[..], b"HELLO");
    let headers = reply.headers.unwrap();
    assert_eq!(
        headers.get("X-Function-Status").map(|v| v.as_str()),
        Some("200")
    );
    assert_eq!(headers.get("X-Function").map(|v| v.as_str()), Some("upper"));
    assert_eq!(
        headers.get("Content-Type").map(|v| v.as_str()),
        Some("text/plain")
    );
    assert!(
        headers.get("traceparent").is_none(),
        "a request without a trace"
    );
    // A traced request's reply is in the requester's trace.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut traced = async_nats::HeaderMap::new();
    traced.insert("traceparent", traceparent);
    traced.insert("tracestate", "vendor=1");
    let rejected = nats
        .request_with_headers(subject.clone(), traced, "bad input".into())
        .await
        .unwrap();
    assert_eq!(&rejected.payload[..], b"cannot do that");
    let headers = rejected.headers.unwrap();
    assert_eq!(
        headers.get("X-Function-Status").map(|v| v.as_str()),
        Some("422")
    );
    assert_eq!(
        headers.get("traceparent").map(|v| v.as_str()),
        Some(traceparent)
    );
    assert_eq!(
        headers.get("tracestate").map(|v| v.as_str()),
        Some("vendor=1")
    );
}

#[tokio::test]
async fn queue_group_splits_messages_across_two_replicas() {
    let subject = unique("group");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("grouped", &subject, |_, _| Reply::ok());
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let a = start(&config(&gw, addr_a, "", &core_section(&nats_url()))).await;
    let b = start(&config(&gw, addr_b, "", &core_section(&nats_url()))).await;
    let nats = client(&nats_url()).await;
    let handled = |addr: SocketAddr| async move {
        let (_, text) = http_get(addr, "/metrics").await.unwrap_or_default();
        metric(&text, "connector_messages_total{outcome=\"ack\"}").unwrap_or(0.0)
    };
    // Probe until both replicas have handled one: both are subscribed in the group.
    let deadline = std::time::Instant::now() + WITHIN;
    while handled(addr_a).await < 1.0 || handled(addr_b).await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "both replicas never got a probe:\n{}\n{}",
            a.output(),
            b.output()
        );
        nats.publish(subject.clone(), "probe".into()).await.unwrap();
        nats.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (start_a, start_b) = (handled(addr_a).await, handled(addr_b).await);
    for i in 0..200 {
        nats.publish(subject.clone(), format!("m-{i:03}").into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    assert!(eventually(WITHIN, || real_bodies(&gw, "grouped").len() >= 200).await);
    let bodies = real_bodies(&gw, "grouped");
    let distinct: BTreeSet<_> = bodies.iter().collect();
    assert_eq!(distinct.len(), 200);
    assert_eq!(bodies.len(), 200, "a message reached both replicas");
    let got_a = handled(addr_a).await - start_a;
    let got_b = handled(addr_b).await - start_b;
    assert!(
        got_a > 0.0 && got_b > 0.0,
        "one replica did all the work: {got_a} / {got_b}"
    );
}

#[tokio::test]
async fn jetstream_keeps_order_per_subject() {
    let p = unique("order");
    let fixture = jetstream_topics().await;
    let stream = JetStreamTopics::stream_of(&p);
    fixture.create_stream(&stream, vec![format!("{p}.>")]).await;
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
    let nats_section = format!(
        "[nats]\nurl = \"{}\"\nmode = \"jetstream\"\n\n[jetstream]\nstream = \"{stream}\"\nconsumer = \"ord\"\n",
        nats_url()
    );
    let connector = start(&config(
        &gw,
        free_addr(),
        "ordering = \"key\"\nmax_inflight = 32",
        &nats_section,
    ))
    .await;
    let subjects: Vec<String> = (0..3).map(|i| format!("{p}.s{i}")).collect();
    for n in 0..20 {
        for s in &subjects {
            fixture
                .js()
                .publish(s.clone(), format!("{s}-{n}").into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    assert!(
        eventually(WITHIN, || gw.requests_to("ordered").len() >= 60).await,
        "{}",
        connector.output()
    );
    let mut per_subject: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in gw.requests_to("ordered") {
        let body = String::from_utf8_lossy(&r.body).into_owned();
        let (s, n) = body.rsplit_once('-').unwrap();
        per_subject
            .entry(s.to_owned())
            .or_default()
            .push(n.parse().unwrap());
    }
    assert_eq!(per_subject.len(), 3);
    for (s, seq) in per_subject {
        assert_eq!(seq, (0..20).collect::<Vec<u64>>(), "out of order on {s}");
    }
}

#[tokio::test]
async fn dead_letters_carry_provenance_and_the_message_is_terminated() {
    let topic = unique("prov");
    let fixture = jetstream_topics().await;
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("flaky", &topic, |_, _| {
        Reply::status(500).body(b"boom\nline two")
    });
    let metrics_addr = free_addr();
    let connector = start(&config(
        &gw,
        metrics_addr,
        "",
        &fixture.source_config(&topic),
    ))
    .await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-Tenant", "acme");
    fixture
        .js()
        .publish_with_headers(topic.clone(), headers, "payload".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        eventually_async(WITHIN, || async {
            !fixture
                .stored(&JetStreamTopics::dead_stream_of(&topic))
                .await
                .is_empty()
        })
        .await,
        "{}",
        connector.output()
    );
    let letters = fixture
        .stored(&JetStreamTopics::dead_stream_of(&topic))
        .await;
    assert_eq!(letters.len(), 1);
    let h = &letters[0].headers;
    let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(&letters[0].payload[..], b"payload");
    assert_eq!(get("x-dead-letter-function").as_deref(), Some("flaky"));
    assert_eq!(get("x-dead-letter-reason").as_deref(), Some("exhausted"));
    assert_eq!(get("x-dead-letter-status").as_deref(), Some("500"));
    assert_eq!(get("x-dead-letter-attempts").as_deref(), Some("3"));
    assert_eq!(
        get("x-dead-letter-response").as_deref(),
        Some("boom line two")
    );
    assert_eq!(
        get("x-dead-letter-source-stream").as_deref(),
        Some(JetStreamTopics::stream_of(&topic).as_str())
    );
    assert_eq!(get("x-dead-letter-source-sequence").as_deref(), Some("1"));
    assert_eq!(get("x-tenant").as_deref(), Some("acme"));
    assert_eq!(gw.requests_to("flaky").len(), 3, "max_attempts = 3");
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await
    );
    // The backlog metric follows the consumer.
    let series = format!(
        "connector_backlog_messages{{topic=\"{}\",partition=\"{}\"}}",
        JetStreamTopics::stream_of(&topic),
        nats_connector::jetstream::consumer_name(CONSUMER, &topic)
    );
    assert!(
        eventually_async(WITHIN, || async {
            let (_, text) = http_get(metrics_addr, "/metrics").await.unwrap_or_default();
            metric(&text, &series) == Some(0.0)
        })
        .await,
        "no {series}"
    );
}

#[tokio::test]
async fn ce_id_and_delivery_count_come_from_jetstream() {
    let topic = unique("ceid");
    let fixture = jetstream_topics().await;
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("counted", &topic, |req, _| {
        if req.header("x-delivery-attempt").as_deref() == Some("1") {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    });
    let _connector = start(&config(
        &gw,
        free_addr(),
        "",
        &fixture.source_config(&topic),
    ))
    .await;
    fixture.produce(&topic, &[b"one".to_vec()]).await;
    assert!(eventually(WITHIN, || gw.requests_to("counted").len() >= 2).await);
    let r = gw.requests_to("counted");
    let expected = format!("{}/1", JetStreamTopics::stream_of(&topic));
    assert_eq!(r[0].header("ce-id").as_deref(), Some(expected.as_str()));
    assert_eq!(r[1].header("ce-id").as_deref(), Some(expected.as_str()));
    assert_eq!(r[0].header("x-nats-delivered").as_deref(), Some("1"));
    assert_eq!(r[0].header("x-nats-sequence").as_deref(), Some("1"));
    assert_eq!(r[1].header("x-delivery-attempt").as_deref(), Some("2"));
}

/// A nats-server of our own on a free loopback port, so it can be stopped.
struct OwnServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl OwnServer {
    fn new() -> Self {
        Self::with_args(&[])
    }

    /// A server started with `args` (authentication).
    fn with_args(args: &[&str]) -> Self {
        Self {
            port: free_addr().port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (scripts/test.sh)");
        self.child = Some(child);
        // Listening before anything else of the test binds a port: its port was free when
        // it was picked, and a server not yet bound could lose it to the next bind
        // (CI: the FakeGateway got it, and the connector dialled the gateway).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "nats-server exited: {exited:?}");
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server not listening on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn connect_when_up(url: &str) -> async_nats::Client {
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        match async_nats::connect(url).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => panic!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn server_down_at_start_and_restarted_shows_in_readyz() {
    let mut server = OwnServer::new();
    let subject = unique("down");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("survivor", &subject, |_, _| Reply::ok());
    let metrics_addr = free_addr();
    let mut connector = Process::start(
        &binary(),
        &config(&gw, metrics_addr, "", &core_section(&server.url())),
        &[],
    );
    assert!(wait_http(metrics_addr, "/healthz", 200, WITHIN).await);
    assert!(
        wait_http(metrics_addr, "/readyz", 503, WITHIN).await,
        "ready without a server"
    );
    assert!(connector.exited().is_none(), "exited without a server");
    server.start();
    assert!(
        wait_http(metrics_addr, "/readyz", 200, WITHIN).await,
        "not ready after the server came up:\n{}",
        connector.output()
    );
    let nats = connect_when_up(&server.url()).await;
    assert!(until_subscribed(&nats, &subject, || !gw.requests_to("survivor").is_empty()).await);
    drop(nats);

    server.stop();
    assert!(
        wait_http(metrics_addr, "/readyz", 503, WITHIN).await,
        "still ready with the server gone"
    );
    let before = gw.requests_to("survivor").len();
    server.start();
    assert!(
        wait_http(metrics_addr, "/readyz", 200, WITHIN).await,
        "not ready after the restart:\n{}",
        connector.output()
    );
    let nats = connect_when_up(&server.url()).await;
    assert!(
        until_subscribed(&nats, &subject, || gw.requests_to("survivor").len()
            > before)
        .await,
        "no delivery after the restart:\n{}",
        connector.output()
    );
}

#[tokio::test]
async fn an_invalid_subject_is_refused_at_start_with_its_name() {
    let gw = FakeGateway::start().await.unwrap();
    let cfg = config(
        &gw,
        free_addr(),
        "topics = [\"good.one\", \"bad..subject\"]",
        &core_section(&nats_url()),
    );
    let mut process = Process::start(&binary(), &cfg, &[]);
    let status = process.wait(WITHIN).await;
    assert!(!status.success());
    let output = process.output();
    assert!(output.contains("bad..subject"), "{output}");
    assert!(output.contains("connector.topics"), "{output}");
}

#[tokio::test]
async fn a_failed_message_without_dead_letters_is_nakked_and_redelivered() {
    let topic = unique("nak");
    let fixture = jetstream_topics().await;
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    // Fails the first four calls: three attempts, held, nakked; the redelivery succeeds.
    gw.function("stubborn", &topic, |_, n| {
        if n < 4 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    });
    let nats_section = format!(
        "[nats]\nurl = \"{}\"\nmode = \"jetstream\"\n\n[jetstream]\nstream = \"{}\"\nconsumer = \"{CONSUMER}\"\nack_wait = \"5s\"\nin_progress_interval = \"1s\"\n",
        nats_url(),
        JetStreamTopics::stream_of(&topic)
    );
    let connector = start(&config(&gw, free_addr(), "", &nats_section)).await;
    fixture.produce(&topic, &[b"once".to_vec()]).await;
    assert!(
        eventually_async(WITHIN, || async {
            gw.requests_to("stubborn").len() >= 5 && fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "{}",
        connector.output()
    );
    let requests = gw.requests_to("stubborn");
    assert_eq!(requests.len(), 5, "delivered again after the success");
    let last = requests.last().unwrap();
    assert!(
        last.header("x-nats-delivered")
            .and_then(|d| d.parse::<u32>().ok())
            >= Some(2),
        "not a server redelivery: {:?}",
        last.header("x-nats-delivered")
    );
    assert!(fixture.dead_letters(&topic).await.is_empty());
    assert!(connector.output().contains("redelivers it later"));
}

#[tokio::test]
async fn in_progress_reports_keep_a_slow_invocation_from_redelivery() {
    let topic = unique("slow");
    let fixture = jetstream_topics().await;
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("slow", &topic, |_, _| {
        Reply::ok().delay(Duration::from_secs(5))
    });
    let nats_section = format!(
        "[nats]\nurl = \"{}\"\nmode = \"jetstream\"\n\n[jetstream]\nstream = \"{}\"\nconsumer = \"{CONSUMER}\"\nack_wait = \"2s\"\nin_progress_interval = \"500ms\"\n",
        nats_url(),
        JetStreamTopics::stream_of(&topic)
    );
    let connector = start(&config(&gw, free_addr(), "", &nats_section)).await;
    fixture.produce(&topic, &[b"long job".to_vec()]).await;
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "{}",
        connector.output()
    );
    assert!(eventually(WITHIN, || !gw.requests_to("slow").is_empty()).await);
    assert_eq!(
        gw.requests_to("slow").len(),
        1,
        "redelivered while the function ran (ack_wait 2s, call 5s)"
    );
}

#[tokio::test]
async fn jetstream_overlapping_patterns_deliver_each_message_once_per_function() {
    let p = unique("jsw");
    let fixture = jetstream_topics().await;
    let stream = JetStreamTopics::stream_of(&p);
    fixture.create_stream(&stream, vec![format!("{p}.>")]).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("exact", &format!("{p}.a"), |_, _| Reply::ok());
    gw.function("star", &format!("{p}.*"), |_, _| Reply::ok());
    gw.function("tail", &format!("{p}.>"), |_, _| Reply::ok());
    let nats_section = format!(
        "[nats]\nurl = \"{}\"\nmode = \"jetstream\"\n\n[jetstream]\nstream = \"{stream}\"\nconsumer = \"{CONSUMER}\"\n",
        nats_url()
    );
    let connector = start(&config(&gw, free_addr(), "", &nats_section)).await;
    for subject in [format!("{p}.a"), format!("{p}.b"), format!("{p}.x.y")] {
        fixture
            .js()
            .publish(subject.clone(), subject.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let names = |f: &str| {
        let mut v = real_bodies(&gw, f);
        v.sort();
        v
    };
    // Three consumers each see the messages of their filter; all end acknowledged.
    let all_acked = || async {
        let js = fixture.js();
        let s = js.get_stream(&stream).await.unwrap();
        let mut left = 0;
        for pattern in [format!("{p}.a"), format!("{p}.*"), format!("{p}.>")] {
            let name = nats_connector::jetstream::consumer_name(CONSUMER, &pattern);
            match s.consumer_info(&name).await {
                Ok(info) => left += info.num_pending + info.num_ack_pending as u64,
                Err(_) => left += 1,
            }
        }
        left == 0
    };
    assert!(
        eventually_async(WITHIN, || async {
            names("tail").len() >= 3 && all_acked().await
        })
        .await,
        "{}",
        connector.output()
    );
    assert_eq!(names("exact"), [format!("{p}.a")]);
    assert_eq!(names("star"), [format!("{p}.a"), format!("{p}.b")]);
    assert_eq!(
        names("tail"),
        [format!("{p}.a"), format!("{p}.b"), format!("{p}.x.y")]
    );
}

/// Starts a core connector against `server` with `[nats]` lines `auth`, and checks that
/// a message gets through.
async fn delivers_with_auth(server: &OwnServer, auth: &str, publisher: async_nats::Client) {
    let subject = unique("auth");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("authed", &subject, |_, _| Reply::ok());
    let section = format!("{}{auth}\n", core_section(&server.url()));
    let connector = start(&config(&gw, free_addr(), "", &section)).await;
    assert!(
        until_subscribed(&publisher, &subject, || !gw
            .requests_to("authed")
            .is_empty())
        .await,
        "{}",
        connector.output()
    );
}

#[tokio::test]
async fn token_user_password_and_nkey_authentication() {
    let mut server = OwnServer::with_args(&["--auth", "s3cret-token"]);
    server.start();
    let publisher = async_nats::ConnectOptions::with_token("s3cret-token".into())
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .unwrap();
    delivers_with_auth(&server, "token = \"s3cret-token\"", publisher).await;
    server.stop();

    let mut server = OwnServer::with_args(&["--user", "conn", "--pass", "pw-123"]);
    server.start();
    let publisher =
        async_nats::ConnectOptions::with_user_and_password("conn".into(), "pw-123".into())
            .retry_on_initial_connect()
            .connect(server.url())
            .await
            .unwrap();
    delivers_with_auth(&server, "user = \"conn\"\npassword = \"pw-123\"", publisher).await;
    server.stop();

    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            key.public_key()
        ),
    )
    .unwrap();
    let mut server = OwnServer::with_args(&["-c", conf.to_str().unwrap()]);
    server.start();
    let publisher = async_nats::ConnectOptions::with_nkey(seed.clone())
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .unwrap();
    delivers_with_auth(&server, &format!("nkey = \"{seed}\""), publisher).await;
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let certs = tempfile::tempdir().unwrap();
    let ca = integration_tests::tls_certificates(certs.path());
    let cert = certs.path().join("server.crt");
    let key = certs.path().join("server.key");
    let mut server = OwnServer::with_args(&[
        "--tls",
        "--tlscert",
        cert.to_str().unwrap(),
        "--tlskey",
        key.to_str().unwrap(),
    ]);
    server.start();
    let url = format!("tls://127.0.0.1:{}", server.port);
    let publisher = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.clone())
        .require_tls(true)
        .retry_on_initial_connect()
        .connect(url.as_str())
        .await
        .unwrap();
    let subject = unique("tls");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("secure", &subject, |_, _| Reply::ok());
    let section = format!(
        "{}tls_required = true\ntls_ca_file = \"{}\"\n",
        core_section(&url),
        ca.display()
    );
    let connector = start(&config(&gw, free_addr(), "", &section)).await;
    assert!(
        until_subscribed(&publisher, &subject, || !gw
            .requests_to("secure")
            .is_empty())
        .await,
        "{}",
        connector.output()
    );
}

#[tokio::test]
async fn jetstream_consumers_follow_the_topic_map() {
    let p = unique("follow");
    let fixture = jetstream_topics().await;
    let stream = JetStreamTopics::stream_of(&p);
    fixture.create_stream(&stream, vec![format!("{p}.>")]).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("first", &format!("{p}.a"), |_, _| Reply::ok());
    let nats_section = format!(
        "[nats]\nurl = \"{}\"\nmode = \"jetstream\"\n\n[jetstream]\nstream = \"{stream}\"\nconsumer = \"{CONSUMER}\"\n",
        nats_url()
    );
    let connector = start(&config(&gw, free_addr(), "", &nats_section)).await;
    // Stored before any function wants it: picked up once one does.
    let later = format!("{p}.b");
    fixture
        .js()
        .publish(later.clone(), "waiting".into())
        .await
        .unwrap()
        .await
        .unwrap();
    fixture.produce(&format!("{p}.a"), &[b"now".to_vec()]).await;
    assert!(eventually(WITHIN, || gw.requests_to("first").len() == 1).await);
    gw.function("second", &later, |_, _| Reply::ok());
    assert!(
        eventually(WITHIN, || gw.requests_to("second").len() == 1).await,
        "a function added later got nothing:\n{}",
        connector.output()
    );
    assert_eq!(&gw.requests_to("second")[0].body[..], b"waiting");
}

#[tokio::test]
async fn a_function_topic_outside_the_stream_does_not_make_the_connector_unready() {
    let p = unique("outside");
    let fixture = jetstream_topics().await;
    let stream = JetStreamTopics::stream_of(&p);
    fixture.create_stream(&stream, vec![format!("{p}.>")]).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("inside", &format!("{p}.a"), |_, _| Reply::ok());
    gw.function("elsewhere", &format!("kafka-topic-{p}"), |_, _| Reply::ok());
    let nats_section = format!(
        "[nats]\nurl = \"{}\"\nmode = \"jetstream\"\n\n[jetstream]\nstream = \"{stream}\"\nconsumer = \"{CONSUMER}\"\n",
        nats_url()
    );
    let metrics_addr = free_addr();
    let connector = start(&config(&gw, metrics_addr, "", &nats_section)).await;
    assert!(
        eventually(WITHIN, || connector
            .output()
            .contains("the stream captures no message on this subject"))
        .await,
        "{}",
        connector.output()
    );
    fixture.produce(&format!("{p}.a"), &[b"in".to_vec()]).await;
    assert!(eventually(WITHIN, || gw.requests_to("inside").len() == 1).await);
    assert_eq!(
        http_get(metrics_addr, "/readyz").await.map(|(s, _)| s),
        Some(200),
        "{}",
        connector.output()
    );
}

#[tokio::test]
async fn jetstream_resumes_after_the_server_restarts() {
    let mut server = OwnServer::new();
    server.start();
    let topic = unique("restart");
    let js = jetstream::new(connect_when_up(&server.url()).await);
    js.create_stream(stream::Config {
        name: JetStreamTopics::stream_of(&topic),
        subjects: vec![topic.clone()],
        storage: stream::StorageType::File,
        ..stream::Config::default()
    })
    .await
    .unwrap();
    let gw = FakeGateway::start().await.unwrap();
    gw.function("durable", &topic, |_, _| Reply::ok());
    let nats_section = format!(
        "[nats]\nurl = \"{}\"\nmode = \"jetstream\"\n\n[jetstream]\nstream = \"{}\"\nconsumer = \"{CONSUMER}\"\n",
        server.url(),
        JetStreamTopics::stream_of(&topic)
    );
    let metrics_addr = free_addr();
    let connector = start(&config(&gw, metrics_addr, "", &nats_section)).await;
    js.publish(topic.clone(), "before".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(eventually(WITHIN, || gw.requests_to("durable").len() == 1).await);
    drop(js);

    server.stop();
    assert!(wait_http(metrics_addr, "/readyz", 503, WITHIN).await);
    server.start();
    assert!(
        wait_http(metrics_addr, "/readyz", 200, WITHIN).await,
        "{}",
        connector.output()
    );
    let js = jetstream::new(connect_when_up(&server.url()).await);
    js.publish(topic.clone(), "after".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(60), || gw
            .requests_to("durable")
            .iter()
            .any(|r| &r.body[..] == b"after"))
        .await,
        "nothing consumed after the restart:\n{}",
        connector.output()
    );
}

/// A JetStream stream that does not exist (and `create_stream` off): the connector cannot
/// consume, so `/readyz` says not ready (and stays so, not ready only between retries);
/// once the stream is created it consumes and is ready.
#[tokio::test]
async fn a_missing_stream_is_not_ready_until_it_exists() {
    let p = unique("nostream");
    let fixture = jetstream_topics().await;
    let stream = JetStreamTopics::stream_of(&p);
    let gw = FakeGateway::start().await.unwrap();
    gw.function("waiting", &format!("{p}.*"), |_, _| Reply::ok());
    let metrics_addr = free_addr();
    let nats_section = format!(
        "[nats]\nurl = \"{}\"\nmode = \"jetstream\"\n\n[jetstream]\nstream = \"{stream}\"\nconsumer = \"missing\"\n",
        nats_url()
    );
    let connector = Process::start(
        &binary(),
        &config(&gw, metrics_addr, "", &nats_section),
        &[],
    );
    assert!(wait_http(metrics_addr, "/healthz", 200, WITHIN).await);
    assert!(
        wait_http(metrics_addr, "/readyz", 503, WITHIN).await,
        "ready without its stream:\n{}",
        connector.output()
    );
    // Not ready between the consumer's retries either: 30 looks over 3 s.
    for _ in 0..30 {
        let (status, body) = integration_tests::http_get(metrics_addr, "/readyz")
            .await
            .unwrap();
        assert_eq!(status, 503, "ready without its stream: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fixture.create_stream(&stream, vec![format!("{p}.>")]).await;
    assert!(
        wait_http(metrics_addr, "/readyz", 200, WITHIN).await,
        "not ready once the stream exists:\n{}",
        connector.output()
    );
    let nats = client(&nats_url()).await;
    let js = async_nats::jetstream::new(nats);
    js.publish(format!("{p}.a"), "hello".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        eventually(WITHIN, || !gw.requests_to("waiting").is_empty()).await,
        "nothing delivered once the stream existed:\n{}",
        connector.output()
    );
}
