//! End-to-end throughput of `sqs-connector` beside two ceilings measured in the same run:
//! the plain HTTP ceiling and the broker's own raw receive-and-delete rate.
//!
//! ```text
//! cargo bench -p sqs-connector --bench throughput
//! ```
//!
//! Needs an SQS endpoint at `SQS_ENDPOINT` (default `http://127.0.0.1:4566`, moto's server
//! as scripts/test.sh starts it). A no-op function (and the gateway's
//! `/system/functions`) runs in a child process (`connector_sdk::testing::load`). Then:
//!
//! - **HTTP ceiling**: a plain `reqwest` loop making the requests the connector makes
//!   (route, headers, body), `max_inflight` in flight, `BENCH_HTTP_MESSAGES` requests;
//! - **idle**: the release `sqs-connector` on an empty queue; resident memory 2 s after
//!   `/readyz` turned 200;
//! - then `BENCH_REPEATS` rounds, alternating:
//!   - **broker ceiling**: `BENCH_MESSAGES` messages sent to a fresh queue, then received
//!     (10 per ReceiveMessage, long polling) by `pollers` loops in this process, each
//!     batch deleted (DeleteMessageBatch) in a task of its own so deleting does not hold
//!     up receiving, as in the connector: the connector's rate with functions that cost
//!     nothing and no work of its own;
//!   - **connector**: `BENCH_MESSAGES` messages sent to a fresh queue first, then the
//!     release connector started on it (`max_inflight`, `pollers`). The clock starts at
//!     the function's first call and stops when it has answered every message and the
//!     queue holds none, visible or in flight: every message delivered and deleted.
//!
//! Printed: the medians of the rounds: messages per second, the ratios to both ceilings,
//! the connector's CPU time per message (`/proc/<pid>/stat`); its resident memory idle,
//! the most sampled under load (`VmRSS` every 20 ms) and its peak (`VmHWM`); calls beyond
//! one per message. Bounded: every phase fails after `BENCH_TIMEOUT_SECS`.
//! Environment: `BENCH_MESSAGES` (default 500), `BENCH_HTTP_MESSAGES` (20000),
//! `BENCH_POLLERS` (2), `BENCH_CONCURRENCY` (64), `BENCH_REPEATS` (3),
//! `BENCH_TIMEOUT_SECS` (300).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, QueueAttributeName, SendMessageBatchRequestEntry,
};
use connector_sdk::Message;
use connector_sdk::testing::load::{self, NoopFunction};
use support::{create_queue, endpoint};

const PAYLOAD: &str = r#"{"order":42,"amount":"19.99","currency":"EUR"}"#;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if load::serve_if_asked() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

struct Settings {
    messages: u64,
    http_messages: u64,
    pollers: u64,
    concurrency: u64,
    timeout: Duration,
    repeats: u64,
}

async fn bench() {
    let s = Settings {
        messages: env("BENCH_MESSAGES", 500),
        http_messages: env("BENCH_HTTP_MESSAGES", 20_000),
        pollers: env("BENCH_POLLERS", 2),
        concurrency: env("BENCH_CONCURRENCY", 64),
        timeout: Duration::from_secs(env("BENCH_TIMEOUT_SECS", 300)),
        repeats: env("BENCH_REPEATS", 3).max(1),
    };
    let sqs = support::client().await;
    let run = format!("bench-{}-{}", std::process::id(), unix_millis());

    // HTTP ceiling, against the same function the connector will call.
    let queue = format!("{run}-connector");
    let function = NoopFunction::spawn(&queue).unwrap();
    let url = sqs_url(&queue);
    let message = move |i: u64| {
        let id = format!("00000000-0000-0000-0000-{i:012}");
        let mut m = Message::new(
            queue_name(&url),
            PAYLOAD,
            id.clone(),
            format!("sqs://{}", queue_name(&url)),
        );
        m.add_header("X-SQS-Message-ID", &id);
        m.add_header("X-SQS-Queue-URL", &url);
        m.add_header("X-SQS-Receive-Count", "1");
        m
    };
    let concurrency = s.concurrency as usize;
    let _ = load::ceiling(
        &function.url(),
        "sqs-connector",
        concurrency,
        s.http_messages / 10,
        message.clone(),
    )
    .await
    .unwrap(); // warm-up
    let http = load::ceiling(
        &function.url(),
        "sqs-connector",
        concurrency,
        s.http_messages,
        message,
    )
    .await
    .unwrap();
    eprintln!("HTTP ceiling: {http:.0} requests/s");

    // Idle memory, on an empty queue.
    let idle_queue = format!("{run}-idle");
    let idle_function = NoopFunction::spawn(&idle_queue).unwrap();
    let idle_url = create_queue(&sqs, &idle_queue).await;
    let (mut idle, idle_metrics) = start_connector(&idle_function, &idle_queue, &s);
    assert!(
        load::wait_ready(idle_metrics, Duration::from_secs(30)).await,
        "connector not ready"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kib = load::status_kib(idle.id(), "VmRSS");
    stop(&mut idle);
    let _ = sqs.delete_queue().queue_url(idle_url).send().await;
    eprintln!("idle: {:.1} MiB", idle_kib as f64 / 1024.0);

    // Broker ceiling and connector alternate; medians are reported.
    let mut runs = Vec::new();
    for round in 0..s.repeats {
        let raw_url = create_queue(&sqs, &format!("{run}-raw-{round}")).await;
        fill(&sqs, &raw_url, s.messages).await;
        let broker = raw_consume(&sqs, &raw_url, s.messages, s.pollers, s.timeout).await;
        let _ = sqs.delete_queue().queue_url(raw_url).send().await;
        let r = connector_run(&sqs, &function, &queue, round, &s).await;
        eprintln!(
            "round {round}: broker {broker:.0} msg/s, connector {:.0} msg/s, ratio {:.2}, {} duplicate calls",
            r.rate,
            r.rate / broker,
            r.duplicates
        );
        runs.push((broker, r));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let broker = median(runs.iter().map(|r| r.0).collect());
    let rate = median(runs.iter().map(|r| r.1.rate).collect());
    let cpu = median(runs.iter().map(|r| r.1.cpu_per_message).collect());
    let rss_max = runs.iter().map(|r| r.1.rss_max_kib).max().unwrap_or(0);
    let peak = runs.iter().map(|r| r.1.peak_kib).max().unwrap_or(0);
    let duplicates: u64 = runs.iter().map(|r| r.1.duplicates).sum();

    println!(
        "| messages | pollers | max_inflight | HTTP ceiling req/s | broker ceiling msg/s | connector msg/s | vs HTTP | vs broker | connector CPU/msg | RSS idle | RSS max under load | RSS peak |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {http:.0} | {broker:.0} | {rate:.0} | {:.4} | {:.2} | {:.0} µs | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
        s.messages,
        s.pollers,
        s.concurrency,
        rate / http,
        rate / broker,
        cpu * 1e6,
        idle_kib as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        peak as f64 / 1024.0,
    );
    println!(
        "\n{} rounds, medians (memory: the largest); {duplicates} calls beyond one per message in all rounds",
        s.repeats
    );
}

struct ConnectorRun {
    rate: f64,
    cpu_per_message: f64,
    rss_max_kib: u64,
    peak_kib: u64,
    duplicates: u64,
}

/// `messages` sent to a fresh queue, then the connector started on it: from the
/// function's first call to every message delivered and deleted.
async fn connector_run(
    sqs: &Client,
    function: &NoopFunction,
    queue: &str,
    round: u64,
    s: &Settings,
) -> ConnectorRun {
    let queue_url = create_queue(sqs, queue).await;
    fill(sqs, &queue_url, s.messages).await;
    let base = function.calls().await.unwrap();
    let (mut connector, _metrics) = start_connector(function, queue, s);
    let pid = connector.id();
    let deadline = Instant::now() + s.timeout;
    let cpu_before = load::cpu_time(pid);
    while function.calls().await.unwrap() == base {
        assert!(Instant::now() < deadline, "no message delivered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let started = Instant::now();
    let mut rss_max_kib = 0;
    loop {
        rss_max_kib = rss_max_kib.max(load::status_kib(pid, "VmRSS"));
        if function.calls().await.unwrap() >= base + s.messages && depth(sqs, &queue_url).await == 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connector did not finish (round {round})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let cpu = load::cpu_time(pid).saturating_sub(cpu_before);
    let peak_kib = load::status_kib(pid, "VmHWM");
    stop(&mut connector);
    let calls = function.calls().await.unwrap() - base;
    // The next round reuses the name (the function's topic): a fresh, empty queue.
    let _ = sqs.delete_queue().queue_url(queue_url).send().await;
    ConnectorRun {
        rate: s.messages as f64 / took.as_secs_f64(),
        cpu_per_message: cpu.as_secs_f64() / s.messages as f64,
        rss_max_kib,
        peak_kib,
        duplicates: calls.saturating_sub(s.messages),
    }
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

fn sqs_url(queue: &str) -> String {
    format!("{}/000000000000/{queue}", endpoint())
}

fn queue_name(url: &str) -> String {
    sqs_connector::queue::name_of(url).to_owned()
}

/// Sends `count` messages, 10 per request, 8 requests in flight.
async fn fill(sqs: &Client, url: &str, count: u64) {
    let started = Instant::now();
    let batches: Vec<u64> = (0..count.div_ceil(10)).collect();
    for wave in batches.chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for &b in wave {
            let (sqs, url) = (sqs.clone(), url.to_owned());
            let entries = (b * 10..((b + 1) * 10).min(count))
                .map(|i| {
                    SendMessageBatchRequestEntry::builder()
                        .id(format!("m{i}"))
                        .message_body(PAYLOAD)
                        .build()
                        .unwrap()
                })
                .collect();
            set.spawn(async move {
                let out = sqs
                    .send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .unwrap();
                assert!(out.failed.is_empty(), "{:?}", out.failed);
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }
    eprintln!(
        "sent {count} in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        count as f64 / started.elapsed().as_secs_f64()
    );
}

/// `pollers` loops of ReceiveMessage (10, long polling), each handing its receipts to a
/// DeleteMessageBatch of their own (deleting does not hold up the next receive, as in the
/// connector), until `count` messages were deleted; messages per second. Timed as the
/// connector is: from the first message received to the last one deleted.
async fn raw_consume(sqs: &Client, url: &str, count: u64, pollers: u64, timeout: Duration) -> f64 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let received = Arc::new(AtomicU64::new(0));
    let deleted = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + timeout;
    let first = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let last = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..pollers {
        let (sqs, url) = (sqs.clone(), url.to_owned());
        let (received, deleted) = (received.clone(), deleted.clone());
        let (first, last, seen) = (first.clone(), last.clone(), seen.clone());
        set.spawn(async move {
            let mut deletes = tokio::task::JoinSet::new();
            while received.load(Ordering::Relaxed) < count {
                assert!(Instant::now() < deadline, "raw consume did not finish");
                let out = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .unwrap();
                let messages = out.messages.unwrap_or_default();
                if !messages.is_empty() {
                    first.lock().unwrap().get_or_insert_with(Instant::now);
                }
                {
                    let mut seen = seen.lock().unwrap();
                    for m in &messages {
                        if !seen.insert(m.message_id.clone().unwrap_or_default()) {
                            eprintln!("broker ceiling: message {:?} received twice", m.message_id);
                        }
                    }
                }
                received.fetch_add(messages.len() as u64, Ordering::Relaxed);
                while deletes.try_join_next().is_some() {}
                if messages.is_empty() {
                    continue;
                }
                let entries = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle.clone().unwrap())
                            .build()
                            .unwrap()
                    })
                    .collect();
                let (sqs, url, deleted) = (sqs.clone(), url.clone(), deleted.clone());
                let last = last.clone();
                deletes.spawn(async move {
                    let out = sqs
                        .delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .unwrap();
                    let n = out.successful.len() as u64;
                    if deleted.fetch_add(n, Ordering::Relaxed) + n >= count {
                        last.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                });
            }
            while let Some(r) = deletes.join_next().await {
                r.unwrap();
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    assert!(
        deleted.load(Ordering::Relaxed) >= count,
        "not every message deleted"
    );
    let (first, last) = (
        first.lock().unwrap().unwrap(),
        last.lock().unwrap().unwrap(),
    );
    count as f64 / last.duration_since(first).as_secs_f64()
}

/// Visible plus in-flight messages.
async fn depth(sqs: &Client, url: &str) -> u64 {
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    attributes
        .values()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// The release `sqs-connector` on `queue`, invoking `function`; its metrics address.
fn start_connector(
    function: &NoopFunction,
    queue: &str,
    s: &Settings,
) -> (Child, std::net::SocketAddr) {
    let metrics = load::free_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("sqs-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics}"
max_inflight = {inflight}

[sqs]
queues = ["{queue}"]
endpoint_url = "{endpoint}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
pollers = {pollers}
"#,
            gateway = function.url(),
            inflight = s.concurrency,
            pollers = s.pollers,
            endpoint = endpoint(),
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sqs-connector"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (child, metrics)
}

/// SIGTERM, and the exit status must be 0.
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "connector exit status {status:?}");
}
