//! End-to-end throughput of `rabbitmq-connector` (a quorum queue, manual acks, prefetch
//! tied to `max_inflight`) beside the plain HTTP ceiling and a plain lapin consumer, in
//! one run.
//!
//! ```text
//! cargo bench -p rabbitmq-connector --bench throughput
//! BENCH_COUNT=40000 BENCH_ROUNDS=3 BENCH_QUEUE_TYPE=classic cargo bench -p rabbitmq-connector --bench throughput
//! ```
//!
//! Needs the RabbitMQ at `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`);
//! every run uses queues of its own, deleted afterwards. A no-op function (and the
//! gateway's `/system/functions`, and `/count` of calls answered) runs in a child process
//! (`connector_sdk::testing::load`). Each round, in turn:
//!
//! - **ceiling**: a plain HTTP loop making the same requests the connector makes (same
//!   route, headers and body), 64 in flight;
//! - **plain consumer**: lapin consuming a backlog of `COUNT` persistent messages from a
//!   fresh queue of the same type, prefetch 256 (what the connector asks for at
//!   `max_inflight` 64), acknowledging each on receipt (acks sent concurrently, as the
//!   connector sends them; the clock stops when the last is written): RabbitMQ's own
//!   rate here. With `BENCH_PLAIN_ACK_EVERY=k` (k > 1) it acknowledges every k-th
//!   delivery with `multiple` instead, in order on the channel, and prints the broker's
//!   CPU per message while it consumed: what batching the acks would be worth;
//! - **connector**: the release binary consuming the same kind of backlog, `max_inflight`
//!   64. The clock starts at the function's first call and stops when the connector has
//!   acknowledged `COUNT` messages (`connector_messages_total{outcome="ack"}`); then
//!   SIGTERM, and the queue must be empty.
//!
//! Printed: per-round figures on stderr; the medians, the ratios, the connector's CPU time
//! per message, the broker's (`beam.smp` on this machine, over the connector's round,
//! publishing the backlog included), its resident memory idle (started on an empty queue, after `/readyz`) and
//! at its peak (`VmHWM`, the largest of the rounds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use connector_sdk::Message;
use connector_sdk::testing::load::{self, ConnectorProcess, NoopFunction};
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const PAYLOAD: &[u8] = br#"{"order":42,"amount":"19.99","currency":"EUR"}"#;
const CONCURRENCY: usize = 64;
/// Messages per row; `BENCH_COUNT` overrides it.
static COUNT: LazyLock<usize> = LazyLock::new(|| env_number("BENCH_COUNT", 40_000));
/// Rounds; `BENCH_ROUNDS` overrides it.
static ROUNDS: LazyLock<usize> = LazyLock::new(|| env_number("BENCH_ROUNDS", 3));
/// `quorum` (the connector's default) or `classic`; `BENCH_QUEUE_TYPE` overrides it.
static QUEUE_TYPE: LazyLock<String> =
    LazyLock::new(|| std::env::var("BENCH_QUEUE_TYPE").unwrap_or_else(|_| "quorum".into()));

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| v.parse().expect("a number"))
}

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn main() {
    load::main(bench);
}

struct Round {
    broker_cpu_per_message: Duration,
    ceiling: f64,
    plain: f64,
    connector: f64,
    cpu_per_message: Duration,
    peak_kib: u64,
}

async fn bench() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("bench-{}", &tag[..8]);
    let function = NoopFunction::spawn(&topic).unwrap();
    let broker = Broker::connect().await;
    let _ = ceiling_run(function.addr, &topic, *COUNT / 10).await; // warm-up
    let idle_kib = idle_rss(&broker, &function, &topic).await;
    let mut rounds = Vec::new();
    for round in 0..*ROUNDS {
        let ceiling = ceiling_run(function.addr, &topic, *COUNT).await;
        let plain = plain_consumer_run(&broker, &format!("{topic}-plain-{round}")).await;
        let broker_cpu = broker_pid().map(load::cpu_time);
        let (connector, cpu_per_message, peak_kib) =
            connector_run(&broker, &function, &topic).await;
        // Over the whole run (publishing the backlog included, hence per message twice
        // over): what the broker needs of the same two cores.
        let broker_cpu_per_message = broker_pid()
            .zip(broker_cpu)
            .map(|(pid, before)| (load::cpu_time(pid) - before) / *COUNT as u32)
            .unwrap_or_default();
        eprintln!(
            "round {round}: ceiling {ceiling:.0}/s, plain lapin {plain:.0}/s, connector {connector:.0}/s ({:.2} of ceiling, {:.2} of plain), {:.1} µs CPU/msg, broker {:.1} µs CPU/msg (publish and consume), peak {:.1} MiB",
            connector / ceiling,
            connector / plain,
            cpu_per_message.as_secs_f64() * 1e6,
            broker_cpu_per_message.as_secs_f64() * 1e6,
            peak_kib as f64 / 1024.0
        );
        rounds.push(Round {
            broker_cpu_per_message,
            ceiling,
            plain,
            connector,
            cpu_per_message,
            peak_kib,
        });
    }
    let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let ratios: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.connector / r.ceiling))
        .collect();
    println!(
        "| queue | messages | rounds | ceiling req/s | plain lapin msg/s | connector msg/s | of ceiling (per round) | of plain consumer | connector CPU/msg | broker CPU/msg | RSS idle | RSS peak |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} ({}) | {:.2} | {:.1} µs | {:.1} µs | {:.1} MiB | {:.1} MiB |",
        *QUEUE_TYPE,
        *COUNT,
        rounds.len(),
        med(&|r| r.ceiling),
        med(&|r| r.plain),
        med(&|r| r.connector),
        med(&|r| r.connector / r.ceiling),
        ratios.join(", "),
        med(&|r| r.connector / r.plain),
        med(&|r| r.cpu_per_message.as_secs_f64()) * 1e6,
        med(&|r| r.broker_cpu_per_message.as_secs_f64()) * 1e6,
        idle_kib as f64 / 1024.0,
        rounds.iter().map(|r| r.peak_kib).max().unwrap_or(0) as f64 / 1024.0,
    );
    broker.delete(&topic).await;
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The bench's own connection to the broker.
struct Broker {
    connection: Connection,
}

impl Broker {
    async fn connect() -> Self {
        let connection = Connection::connect(&rabbitmq_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ at RABBITMQ_URL");
        Self { connection }
    }

    async fn channel(&self) -> Channel {
        self.connection.create_channel().await.unwrap()
    }

    /// Declares `queue` as the connector does (durable, `x-queue-type`), empty.
    async fn declare(&self, queue: &str) {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(QUEUE_TYPE.as_str().into()),
        );
        let channel = self.channel().await;
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .unwrap();
        channel
            .queue_purge(queue.into(), Default::default())
            .await
            .unwrap();
        let _ = channel.close(200, "declared".into()).await;
    }

    /// Ready messages in `queue` (after its consumers closed: unacknowledged ones are
    /// back by then).
    async fn depth(&self, queue: &str) -> u32 {
        let channel = self.channel().await;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .unwrap();
        let _ = channel.close(200, "measured".into()).await;
        q.message_count()
    }

    async fn delete(&self, queue: &str) {
        let channel = self.channel().await;
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
        let _ = channel.close(200, "deleted".into()).await;
    }

    /// `COUNT` persistent messages in `queue` (through the default exchange, routing key
    /// = the queue), each confirmed.
    async fn backlog(&self, queue: &str) {
        self.declare(queue).await;
        let channel = self.channel().await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        for chunk in 0..COUNT.div_ceil(1000) {
            let mut confirms = Vec::with_capacity(1000);
            for _ in (chunk * 1000)..((chunk + 1) * 1000).min(*COUNT) {
                confirms.push(
                    channel
                        .basic_publish(
                            "".into(),
                            queue.into(),
                            BasicPublishOptions::default(),
                            PAYLOAD,
                            properties.clone(),
                        )
                        .await
                        .unwrap(),
                );
            }
            for c in confirms {
                assert!(c.await.unwrap().is_ack(), "not confirmed");
            }
        }
        let _ = channel.close(200, "published".into()).await;
    }
}

fn connector_config(function: &NoopFunction, metrics: SocketAddr, queue: &str) -> String {
    format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics}"
topics = ["{queue}"]
max_inflight = {CONCURRENCY}

[rabbitmq]
url = "{url}"
queue = "{queue}"
queue_type = "{queue_type}"
exchange = ""
dead_letter_exchange = ""
"#,
        gateway = function.url(),
        url = rabbitmq_url(),
        queue_type = *QUEUE_TYPE,
    )
}

/// Resident memory of the connector started on an empty queue, once ready and settled.
async fn idle_rss(broker: &Broker, function: &NoopFunction, topic: &str) -> u64 {
    broker.declare(topic).await;
    let metrics = load::free_addr().unwrap();
    let binary = env!("CARGO_BIN_EXE_rabbitmq-connector");
    let connector =
        ConnectorProcess::start(binary, &connector_config(function, metrics, topic), metrics)
            .await
            .unwrap();
    // Let the first queue-depth reading and the first topic-map rebuild happen.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kib = load::status_kib(connector.pid, "VmRSS");
    connector.stop().unwrap();
    kib
}

/// Plain requests, as the connector makes them, `CONCURRENCY` in flight.
async fn ceiling_run(addr: SocketAddr, topic: &str, count: usize) -> f64 {
    let topic = topic.to_owned();
    load::ceiling(
        &format!("http://{addr}"),
        "rabbitmq-connector",
        CONCURRENCY,
        count as u64,
        move |i| {
            let topic = topic.as_str();
            let mut message = Message::new(
                topic,
                PAYLOAD,
                format!("{topic}/{}", uuid::Uuid::from_u128(i as u128).simple()),
                "amqp://127.0.0.1:5672//",
            );
            message.subject = Some(topic.to_owned());
            message.content_type = Some(http::HeaderValue::from_static("application/json"));
            for (name, value) in [
                ("X-Rabbitmq-Exchange", ""),
                ("X-Rabbitmq-Routing-Key", topic),
                ("X-Rabbitmq-Queue", topic),
                ("X-Rabbitmq-Redelivered", "false"),
            ] {
                message.add_header(name, value);
            }
            message
        },
    )
    .await
    .unwrap()
}

/// lapin alone: the backlog consumed with prefetch 256, each message acknowledged on
/// receipt.
async fn plain_consumer_run(broker: &Broker, queue: &str) -> f64 {
    broker.backlog(queue).await;
    let channel = broker.channel().await;
    channel
        .basic_qos(4 * CONCURRENCY as u16, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Acks are sent concurrently, as the connector sends them: awaiting each before the
    // next delivery would measure lapin's thread hand-offs rather than the broker.
    let mut started = None;
    let mut acks = Vec::with_capacity(*COUNT);
    let every = env_number("BENCH_PLAIN_ACK_EVERY", 1);
    let cpu_before = broker_pid().map(load::cpu_time);
    for i in 0..*COUNT {
        let delivery = consumer.next().await.unwrap().unwrap();
        started.get_or_insert_with(Instant::now);
        if every > 1 && (i + 1) % every != 0 && i + 1 != *COUNT {
            continue;
        }
        let multiple = every > 1;
        if multiple {
            // In order, on the channel: a multiple ack whose tag an earlier one covered
            // closes the channel (unknown delivery tag).
            let _ = channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple })
                .now_or_never();
            continue;
        }
        acks.push(tokio::spawn(async move {
            delivery.ack(BasicAckOptions { multiple }).await
        }));
    }
    for ack in acks {
        ack.await.unwrap().unwrap();
    }
    let took = started.unwrap().elapsed();
    if let Some((pid, before)) = broker_pid().zip(cpu_before) {
        eprintln!(
            "plain consumer (ack every {every}): broker {:.1} µs CPU/msg consuming",
            ((load::cpu_time(pid) - before) / *COUNT as u32).as_secs_f64() * 1e6
        );
    }
    let _ = channel.close(200, "consumed".into()).await;
    assert_eq!(
        broker.depth(queue).await,
        0,
        "the plain consumer left messages"
    );
    broker.delete(queue).await;
    (*COUNT - 1) as f64 / took.as_secs_f64()
}

async fn connector_run(
    broker: &Broker,
    function: &NoopFunction,
    topic: &str,
) -> (f64, Duration, u64) {
    broker.backlog(topic).await;
    let base = function.calls().await.unwrap();
    let metrics = load::free_addr().unwrap();
    let binary = env!("CARGO_BIN_EXE_rabbitmq-connector");
    let connector =
        ConnectorProcess::start(binary, &connector_config(function, metrics, topic), metrics)
            .await
            .unwrap();
    let pid = connector.pid;
    // The clock starts at the first call: consuming the backlog, not starting up. It
    // stops when every message is acknowledged (a retried call would make the function's
    // count run ahead of the messages).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (cpu, started, first) = loop {
        let calls = function.calls().await.unwrap();
        if calls > base {
            break (load::cpu_time(pid), Instant::now(), calls - base);
        }
        assert!(Instant::now() < deadline, "nothing delivered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let perf = std::env::var("BENCH_PERF").ok().map(|out| {
        std::process::Command::new("perf")
            .args([
                "record",
                "-F",
                "499",
                "-g",
                "-o",
                &out,
                "-p",
                &pid.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let acked = r#"connector_messages_total{outcome="ack"}"#;
    while scrape(metrics, acked).await < *COUNT as f64 {
        assert!(Instant::now() < deadline, "connector did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let cpu = load::cpu_time(pid) - cpu;
    let peak_kib = load::status_kib(pid, "VmHWM");
    if let Some(perf) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait_with_output();
    }
    let calls = function.calls().await.unwrap() - base;
    if calls != *COUNT as u64 {
        eprintln!(
            "the function was called {calls} times for {} messages",
            *COUNT
        );
    }
    connector.stop().unwrap();
    assert_eq!(
        broker.depth(topic).await,
        0,
        "the connector left messages unacknowledged"
    );
    let n = *COUNT as u64 - first;
    (n as f64 / took.as_secs_f64(), cpu / n as u32, peak_kib)
}

/// One series of the connector's `/metrics` (0 when absent or unreachable).
async fn scrape(metrics: SocketAddr, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(metrics).await else {
        return 0.0;
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0.0;
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The broker's process (`beam.smp`) when it runs on this machine, for its CPU time.
fn broker_pid() -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-o", "beam.smp"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
