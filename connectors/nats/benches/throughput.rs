//! End-to-end throughput of `nats-connector`, core and JetStream, beside the plain HTTP
//! ceiling, in one run.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-nats cargo bench -p nats-connector --bench throughput
//! ```
//!
//! Needs the nats-server with JetStream at `NATS_URL` (default `nats://127.0.0.1:4222`).
//! A no-op function (and the gateway's `/system/functions`, and `/count` of calls
//! answered) runs in a child process: this binary with `serve`. Then, for each mode at
//! `max_inflight` 64:
//!
//! - **ceiling**: a plain `reqwest` loop in this process making the same requests the
//!   connector makes (same route, same headers, same body), 64 in flight;
//! - **core**: the release binary as a child process in core mode. The clock starts when
//!   the first of `COUNT` messages is published and stops when the function has answered
//!   `COUNT` calls;
//! - **jetstream**: the same in JetStream mode on a fresh memory stream, the messages
//!   published while it runs (each publish confirmed by the stream, 1,000 in flight).
//!   The clock stops when every call was answered and the consumer has nothing pending
//!   and nothing unacknowledged.
//!
//! Printed: messages per second, the ratio to the ceiling, the connector's CPU time per
//! message (from `/proc/<pid>/stat`), and its resident memory idle (after `/readyz` turned
//! 200) and at its peak (`VmHWM`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use connector_sdk::gateway::GatewayClient;
use connector_sdk::{Message, SdkConfig};
use futures::StreamExt;

const PAYLOAD: &[u8] = br#"{"order":42,"amount":"19.99","currency":"EUR"}"#;
const COUNT: usize = 40_000;
const CONCURRENCY: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        serve(args[2].parse().unwrap(), args[3].clone());
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The no-op function, a gateway listing it as subscribed to `topic`, and `/count`.
fn serve(addr: SocketAddr, topic: String) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let functions = serde_json::json!([
            {"name": "noop", "annotations": {"topic": topic}, "replicas": 1}
        ])
        .to_string();
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let app = Router::new()
            .route(
                "/function/{name}",
                post(move || {
                    let calls = calls.clone();
                    async move {
                        calls.fetch_add(1, Ordering::Relaxed);
                        ""
                    }
                }),
            )
            .route(
                "/count",
                get(move || {
                    let n = counted.load(Ordering::Relaxed);
                    async move { n.to_string() }
                }),
            )
            .route(
                "/system/functions",
                get(move || {
                    let f = functions.clone();
                    async move { ([("content-type", "application/json")], f) }
                }),
            );
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        axum::serve(listener, app).await.unwrap();
    });
}

fn spawn_server(addr: SocketAddr, topic: &str) -> Child {
    let child = Command::new(std::env::current_exe().unwrap())
        .arg("serve")
        .arg(addr.to_string())
        .arg(topic)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "function server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

struct Row {
    mode: &'static str,
    ceiling: f64,
    connector: f64,
    cpu_per_message: Duration,
    idle_kib: u64,
    peak_kib: u64,
}

async fn bench() {
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let mut rows = Vec::new();
    for mode in ["core", "jetstream"] {
        let subject = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let addr = free_addr();
        let mut server = spawn_server(addr, &subject);
        let _ = ceiling_run(addr, COUNT / 10).await; // warm-up
        let ceiling = ceiling_run(addr, COUNT).await;
        let row = connector_run(&nats, addr, mode, &subject, ceiling).await;
        server.kill().ok();
        server.wait().ok();
        rows.push(row);
    }
    println!(
        "| mode | max_inflight | messages | ceiling req/s | connector msg/s | ratio | connector CPU/msg | RSS idle | RSS peak |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {CONCURRENCY} | {COUNT} | {:.0} | {:.0} | {:.2} | {:.1} µs | {:.1} MiB | {:.1} MiB |",
            r.mode,
            r.ceiling,
            r.connector,
            r.connector / r.ceiling,
            r.cpu_per_message.as_secs_f64() * 1e6,
            r.idle_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0,
        );
    }
}

/// Plain requests, as the connector makes them, `CONCURRENCY` in flight.
async fn ceiling_run(addr: SocketAddr, count: usize) -> f64 {
    let config = SdkConfig {
        gateway_url: format!("http://{addr}"),
        ..SdkConfig::default()
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let gateway = GatewayClient::new("nats-connector", &config).unwrap();
    let url = format!("{}/function/noop", config.gateway_url);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, url, next, gateway) =
                (client.clone(), url.clone(), next.clone(), gateway.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count as u64 {
                        break;
                    }
                    let mut message =
                        Message::new("bench", PAYLOAD, format!("S/{i}"), "nats://bench");
                    message.add_header("X-Nats-Subject", "bench");
                    message.add_header("X-Nats-Stream", "S");
                    message.add_header("X-Nats-Sequence", &i.to_string());
                    message.add_header("X-Nats-Delivered", "1");
                    let headers = gateway.invocation_headers(&message, 1);
                    let resp = client
                        .post(&url)
                        .headers(headers)
                        .body(message.payload.clone())
                        .send()
                        .await
                        .unwrap();
                    assert!(resp.status().is_success());
                    resp.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

async fn calls(http: &reqwest::Client, addr: SocketAddr) -> u64 {
    http.get(format!("http://{addr}/count"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .parse()
        .unwrap()
}

async fn connector_run(
    nats: &async_nats::Client,
    addr: SocketAddr,
    mode: &'static str,
    subject: &str,
    ceiling: f64,
) -> Row {
    let js = async_nats::jetstream::new(nats.clone());
    let stream = format!("BENCH_{}", uuid::Uuid::new_v4().simple());
    if mode == "jetstream" {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.to_owned()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let metrics = free_addr();
    let dir = std::env::temp_dir().join(format!("nats-bench-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[connector]
gateway_url = "http://{addr}"
metrics_addr = "{metrics}"
topics = ["{subject}"]
max_inflight = {CONCURRENCY}

[nats]
url = "{url}"
mode = "{mode}"

[jetstream]
stream = "{stream}"
consumer = "bench"
max_ack_pending = 1024
batch = 128
"#,
            url = nats_url(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nats-connector"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http
            .get(format!("http://{metrics}/readyz"))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "connector not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Core NATS has no history: wait until a probe gets through, then measure from zero.
    if mode == "core" {
        let deadline = Instant::now() + Duration::from_secs(30);
        while calls(&http, addr).await == 0 {
            assert!(Instant::now() < deadline, "subscription never came up");
            nats.publish(subject.to_owned(), PAYLOAD.into())
                .await
                .unwrap();
            nats.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = calls(&http, addr).await;
    let idle_kib = proc_status_kib(pid, "VmRSS");
    let cpu = proc_cpu(pid);
    let started = Instant::now();
    if mode == "core" {
        for _ in 0..COUNT {
            nats.publish(subject.to_owned(), PAYLOAD.into())
                .await
                .unwrap();
        }
        nats.flush().await.unwrap();
    } else {
        let mut acks = futures::stream::iter(0..COUNT)
            .map(|_| {
                let js = js.clone();
                let subject = subject.to_owned();
                async move { js.publish(subject, PAYLOAD.into()).await.unwrap().await }
            })
            .buffer_unordered(1000);
        while let Some(ack) = acks.next().await {
            ack.unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if calls(&http, addr).await >= base + COUNT as u64 {
            if mode == "core" {
                break;
            }
            let s = js.get_stream(&stream).await.unwrap();
            let name = nats_connector::jetstream::consumer_name("bench", subject);
            let info = s.consumer_info(&name).await.unwrap();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "connector did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let cpu = proc_cpu(pid) - cpu;
    let peak_kib = proc_status_kib(pid, "VmHWM");
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "connector exit status {status:?}");
    if mode == "jetstream" {
        js.delete_stream(&stream).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        mode,
        ceiling,
        connector: COUNT as f64 / took.as_secs_f64(),
        cpu_per_message: cpu / COUNT as u32,
        idle_kib,
        peak_kib,
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of `pid` (clock ticks of 10 ms).
fn proc_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}
