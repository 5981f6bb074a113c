//! End-to-end throughput and added latency of `kafka-connector`, beside its ceilings, in
//! one run.
//!
//! ```text
//! tansu broker --storage-engine memory://tansu/ --listener-url tcp://127.0.0.1:9092 \
//!   --advertised-listener-url tcp://127.0.0.1:9092 &
//! cargo bench -p kafka-connector --bench throughput
//! ```
//!
//! `KAFKA_BROKERS` (default 127.0.0.1:9092), `BENCH_MESSAGES` (default 100000),
//! `BENCH_PARTITIONS` (default 8), `BENCH_CONCURRENCY` (default 64), `BENCH_RATE`
//! (messages per second of the latency run, default 500), `BENCH_LATENCY_SECONDS`
//! (default 10). `BENCH_BATCH=1` adds a run with batches: the same backlog (another topic)
//! delivered to a no-op function annotated `connector.batch.size: 100`, against the
//! broker's raw consume rate.
//!
//! A no-op gateway and function (`/system/*` and `/function/noop`, 200 with an empty
//! body) run in a child process: this binary with `serve`. The connector is the release
//! binary, in its own process, so its resident memory is its own. Measured:
//!
//! 1. **broker raw consume rate**: a plain librdkafka consumer reading the same backlog;
//! 2. **HTTP ceiling**: `reqwest` making the same POSTs to the no-op function with the
//!    same concurrency;
//! 3. **connector**: the backlog consumed, delivered and committed, `max_inflight` =
//!    concurrency, `ordering = "none"` and then the default `"partition"`;
//! 4. **added latency** at a fixed moderate rate: produce-to-function for the connector
//!    against produce-to-consumer for a plain consumer, p50 and p99;
//! 5. resident memory of the connector: idle (ready, nothing to do) and peak (`VmHWM`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use connector_sdk::Message as SdkMessage;
use connector_sdk::testing::load;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

const PAYLOAD: &[u8] = br#"{"order":42,"amount":"19.99","currency":"EUR"}"#;
const SENT_HEADER: &str = "sent-micros";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        serve(args[2].parse().unwrap(), args[3].clone(), args[4].clone());
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

fn now_micros() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

// ------------------------------------------------------------------ the child: no-op

#[derive(Default)]
struct Served {
    latencies: Mutex<Vec<i64>>,
}

/// The no-op gateway: one function `noop` subscribed to `topics`, and `noop-batch`,
/// taking batches of 100, to `batch_topic`; records the produce-to-arrival latency of
/// requests carrying `X-Kafka-sent-micros`.
fn serve(addr: SocketAddr, topics: String, batch_topic: String) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let served = Arc::new(Served::default());
        let functions = serde_json::json!([{
            "name": "noop",
            "annotations": {"topic": topics},
            "replicas": 1
        }, {
            "name": "noop-batch",
            "annotations": {
                "topic": batch_topic,
                "connector.batch.size": "100",
                "connector.batch.window": "100ms",
                "connector.ordering": "none"
            },
            "replicas": 1
        }]);
        let app = Router::new()
            .route(
                "/system/namespaces",
                get(|| async { axum::Json(Vec::<String>::new()) }),
            )
            .route(
                "/system/functions",
                get(move || {
                    let f = functions.clone();
                    async move { axum::Json(f) }
                }),
            )
            .route(
                "/function/noop",
                post(
                    |State(s): State<Arc<Served>>, headers: HeaderMap| async move {
                        if let Some(sent) = headers
                            .get("x-kafka-sent-micros")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<i64>().ok())
                        {
                            s.latencies.lock().unwrap().push(now_micros() - sent);
                        }
                        ""
                    },
                ),
            )
            .route("/function/noop-batch", post(|| async { "" }))
            .route(
                "/stats",
                get(|State(s): State<Arc<Served>>| async move {
                    let l = std::mem::take(&mut *s.latencies.lock().unwrap());
                    axum::Json(l)
                }),
            )
            .with_state(served);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        axum::serve(listener, app).await.unwrap();
    });
}

fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_server(addr: SocketAddr, topics: &str, batch_topic: &str) -> Child {
    let child = Command::new(std::env::current_exe().unwrap())
        .arg("serve")
        .arg(addr.to_string())
        .arg(topics)
        .arg(batch_topic)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(addr);
    child
}

// ------------------------------------------------------------------ the bench

struct Setup {
    brokers: String,
    producer: FutureProducer,
}

impl Setup {
    async fn create(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let r = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        for x in r {
            x.unwrap();
        }
    }

    /// Produces `n` records as fast as the producer takes them.
    async fn fill(&self, topic: &str, n: usize) {
        let mut pending = FuturesUnordered::new();
        for i in 0..n {
            let key = (i % 1024).to_string();
            let p = self.producer.clone();
            let topic = topic.to_owned();
            pending.push(async move {
                p.send(
                    FutureRecord::to(&topic).key(&key).payload(PAYLOAD),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
            });
            if pending.len() >= 10_000 {
                pending.next().await;
            }
        }
        while pending.next().await.is_some() {}
    }
}

fn consumer(brokers: &str, group: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .unwrap()
}

/// Messages per second of a plain consumer reading `n` records of `topic`.
async fn raw_consume(brokers: &str, topic: &str, n: usize) -> f64 {
    let c = consumer(brokers, &format!("raw-{topic}"));
    c.subscribe(&[topic]).unwrap();
    let first = c.recv().await.unwrap();
    drop(first);
    let started = Instant::now();
    for _ in 1..n {
        c.recv().await.unwrap();
    }
    (n - 1) as f64 / started.elapsed().as_secs_f64()
}

/// Requests per second of `n` POSTs as the connector makes them for records of `topic`
/// (the SDK's invocation headers plus the record's `X-Kafka-*`), `concurrency` in flight.
async fn http_ceiling(gateway: SocketAddr, topic: &str, n: usize, concurrency: usize) -> f64 {
    let topic = topic.to_owned();
    load::ceiling(
        &format!("http://{gateway}"),
        "kafka-connector",
        concurrency,
        n as u64,
        move |i| {
            let mut m = SdkMessage::new(
                topic.as_str(),
                PAYLOAD,
                format!("{topic}/0/{i}"),
                format!("kafka://bench-{topic}/{topic}"),
            );
            m.add_header("X-Kafka-Topic", &topic);
            m.add_header("X-Kafka-Partition", "0");
            m.add_header("X-Kafka-Offset", &i.to_string());
            m.add_header("X-Kafka-Key", &(i % 1024).to_string());
            m
        },
    )
    .await
    .unwrap()
}

struct Connector {
    child: Child,
    metrics: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Connector {
    fn start(gateway: SocketAddr, brokers: &str, topic: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let metrics = load::free_addr().unwrap();
        let config = format!(
            r#"[connector]
gateway_url = "http://{gateway}"
metrics_addr = "{metrics}"
topics = ["{topic}"]
{extra}

[kafka]
brokers = "{brokers}"
group = "bench-{topic}"
commit_interval = "1s"
lag_interval = "5s"
{properties}
"#,
            // BENCH_KAFKA_PROPERTIES='"fetch.max.bytes" = "52428800"' tries librdkafka settings.
            properties = std::env::var("BENCH_KAFKA_PROPERTIES")
                .map(|p| format!("\n[kafka.properties]\n{p}"))
                .unwrap_or_default(),
        );
        let path = dir.path().join("kafka.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kafka-connector"))
            .arg("--config")
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_CONNECTOR_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let c = Self {
            child,
            metrics,
            _dir: dir,
        };
        c.wait_ready();
        c
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.metrics).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split(' ').nth(1)?.parse().ok()?;
        let body = out.split("\r\n\r\n").nth(1)?.to_owned();
        Some((status, body))
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get("/readyz").map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "connector not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metric(&self, series: &str) -> f64 {
        self.get("/metrics")
            .and_then(|(_, body)| {
                body.lines()
                    .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    }

    fn acked(&self) -> u64 {
        self.metric("connector_messages_total{outcome=\"ack\"}") as u64
    }

    fn memory_kib(&self, field: &str) -> u64 {
        load::status_kib(self.child.id(), field)
    }

    /// Messages per second from the first acknowledged message to the `n`th.
    async fn consume(&self, n: u64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.acked() == 0 {
            assert!(Instant::now() < deadline, "nothing delivered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (started, first) = (Instant::now(), self.acked());
        loop {
            let acked = self.acked();
            if acked >= n {
                return (acked - first) as f64 / started.elapsed().as_secs_f64();
            }
            assert!(Instant::now() < deadline, "only {acked} of {n} delivered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Produces `rate` records per second for `seconds`, each carrying its send time.
async fn produce_at_rate(setup: &Setup, topic: &str, rate: u64, seconds: u64) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut pending = FuturesUnordered::new();
    for i in 0..rate * seconds {
        tick.tick().await;
        let p = setup.producer.clone();
        let topic = topic.to_owned();
        let key = (i % 1024).to_string();
        pending.push(async move {
            let sent = now_micros().to_string();
            let headers = OwnedHeaders::new().insert(Header {
                key: SENT_HEADER,
                value: Some(sent.as_bytes()),
            });
            p.send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(PAYLOAD)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        });
        while let Some(()) = futures::FutureExt::now_or_never(pending.next()).flatten() {}
    }
    while pending.next().await.is_some() {}
}

/// Produce-to-receive latencies (ms, sorted) of a plain consumer at `rate`.
async fn raw_latency(setup: &Setup, topic: &str, rate: u64, seconds: u64) -> Vec<i64> {
    let c = consumer(&setup.brokers, &format!("rawlat-{topic}"));
    c.subscribe(&[topic]).unwrap();
    // Wait for the assignment before producing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no assignment");
        let _ = tokio::time::timeout(Duration::from_millis(100), c.recv()).await;
    }
    let n = rate * seconds;
    let consume = async {
        let mut out = Vec::with_capacity(usize::try_from(n).unwrap());
        while (out.len() as u64) < n {
            let m = c.recv().await.unwrap();
            let sent = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == SENT_HEADER))
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<i64>().ok());
            if let Some(sent) = sent {
                out.push(now_micros() - sent);
            }
        }
        out
    };
    let (_, mut out) = tokio::join!(produce_at_rate(setup, topic, rate, seconds), consume);
    out.sort_unstable();
    out
}

async fn bench() {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let n: usize = env_or("BENCH_MESSAGES", 100_000);
    let partitions: i32 = env_or("BENCH_PARTITIONS", 8);
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 64);
    let rate: u64 = env_or("BENCH_RATE", 500);
    let seconds: u64 = env_or("BENCH_LATENCY_SECONDS", 10);
    let run = format!("{:x}", now_micros());
    let topic = format!("bench-{run}");
    let topic2 = format!("bench-ordered-{run}");
    let lat_topic = format!("bench-lat-{run}");
    let raw_lat_topic = format!("bench-rawlat-{run}");
    let batch_topic = format!("bench-batch-{run}");
    let batches = std::env::var("BENCH_BATCH").is_ok();

    let setup = Setup {
        // One record per batch: tansu 0.6 answers a Fetch at an offset inside a batch
        // with the next batch, so a consumer resuming mid-batch (after pause, restart
        // or rebalance) would skip the rest of that batch on tansu.
        producer: ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("batch.num.messages", "1")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "60000")
            .create()
            .unwrap(),
        brokers: brokers.clone(),
    };
    for t in [&topic, &topic2, &lat_topic, &raw_lat_topic, &batch_topic] {
        setup.create(t, partitions).await;
    }
    eprintln!("producing {n} records to {topic} and {topic2} ({partitions} partitions)");
    setup.fill(&topic, n).await;
    if std::env::var("BENCH_ORDERED").is_ok() {
        setup.fill(&topic2, n).await;
    }
    if batches {
        setup.fill(&batch_topic, n).await;
    }

    let gateway = load::free_addr().unwrap();
    let mut server = spawn_server(
        gateway,
        &format!("{topic},{topic2},{lat_topic}"),
        &batch_topic,
    );

    eprintln!("broker raw consume rate");
    let raw = raw_consume(&brokers, &topic, n).await;
    eprintln!("HTTP ceiling");
    let _ = http_ceiling(gateway, &topic, n / 10, concurrency).await; // warm-up
    let ceiling = http_ceiling(gateway, &topic, n, concurrency).await;

    eprintln!("connector, ordering none");
    let extra = format!("max_inflight = {concurrency}\nordering = \"none\"");
    let c = Connector::start(gateway, &brokers, &topic, &extra);
    let e2e = c.consume(n as u64).await;
    let peak_kib = c.memory_kib("VmHWM");
    c.stop();

    // Opt-in (BENCH_BATCH=1): batches of 100 to a no-op function.
    let e2e_batched = if batches {
        eprintln!("connector, batches of 100");
        let c = Connector::start(gateway, &brokers, &batch_topic, &extra);
        let r = c.consume(n as u64).await;
        c.stop();
        r
    } else {
        f64::NAN
    };

    // Opt-in (BENCH_ORDERED=1): with ordering = "partition" every partition pauses and
    // resumes every two records, and each pause drops librdkafka's prefetch.
    let (e2e_ordered, peak_ordered_kib) = if std::env::var("BENCH_ORDERED").is_ok() {
        eprintln!("connector, ordering partition");
        let extra = format!("max_inflight = {concurrency}");
        let c = Connector::start(gateway, &brokers, &topic2, &extra);
        let r = c.consume(n as u64).await;
        let peak = c.memory_kib("VmHWM");
        c.stop();
        (r, peak)
    } else {
        (f64::NAN, 0)
    };

    eprintln!("latency at {rate}/s for {seconds}s: plain consumer");
    let raw_lat = raw_latency(&setup, &raw_lat_topic, rate, seconds).await;
    eprintln!("latency at {rate}/s for {seconds}s: connector");
    let extra = format!("max_inflight = {concurrency}\nordering = \"none\"");
    let c = Connector::start(gateway, &brokers, &lat_topic, &extra);
    // Idle: ready, its partitions assigned, nothing to consume.
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.metric("connector_kafka_assigned_partitions") < f64::from(partitions) {
        assert!(Instant::now() < deadline, "partitions not assigned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // let start-up allocations settle
    let idle_kib = c.memory_kib("VmRSS");
    produce_at_rate(&setup, &lat_topic, rate, seconds).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.acked() < rate * seconds {
        assert!(Instant::now() < deadline, "latency run incomplete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut e2e_lat: Vec<i64> = reqwest::get(format!("http://{gateway}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    e2e_lat.sort_unstable();
    c.stop();
    server.kill().ok();
    server.wait().ok();

    println!("| measurement | messages | per second | vs HTTP ceiling |");
    println!("| --- | --- | --- | --- |");
    println!("| broker raw consume (librdkafka, no HTTP) | {n} | {raw:.0} | |");
    println!("| HTTP ceiling (reqwest, concurrency {concurrency}) | {n} | {ceiling:.0} | 1.00 |");
    println!(
        "| kafka-connector, ordering none, max_inflight {concurrency} | {n} | {e2e:.0} | {:.2} |",
        e2e / ceiling
    );
    println!(
        "| kafka-connector, ordering partition ({partitions} partitions) | {n} | {e2e_ordered:.0} | {:.2} |",
        e2e_ordered / ceiling
    );
    println!(
        "| kafka-connector, batches of 100 to a no-op function, max_inflight {concurrency} | {n} | {e2e_batched:.0} | {:.2} of the HTTP ceiling, **{:.2} of raw consume** |",
        e2e_batched / ceiling,
        e2e_batched / raw
    );
    println!();
    println!("| latency at {rate} msg/s for {seconds} s | samples | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| produce → plain consumer | {} | {:.2} | {:.2} |",
        raw_lat.len(),
        percentile(&raw_lat, 0.5),
        percentile(&raw_lat, 0.99)
    );
    println!(
        "| produce → function through kafka-connector | {} | {:.2} | {:.2} |",
        e2e_lat.len(),
        percentile(&e2e_lat, 0.5),
        percentile(&e2e_lat, 0.99)
    );
    println!(
        "| added by the connector | | {:.2} | {:.2} |",
        percentile(&e2e_lat, 0.5) - percentile(&raw_lat, 0.5),
        percentile(&e2e_lat, 0.99) - percentile(&raw_lat, 0.99)
    );
    println!();
    println!(
        "connector resident memory: idle {:.1} MiB; peak under load {:.1} MiB (ordering none), {:.1} MiB (ordering partition)",
        idle_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        peak_ordered_kib as f64 / 1024.0
    );
}
