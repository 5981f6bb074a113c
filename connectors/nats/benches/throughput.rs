//! End-to-end throughput of `nats-connector`, core and JetStream, beside the plain HTTP
//! ceiling, in one run.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-nats cargo bench -p nats-connector --bench throughput
//! ```
//!
//! Needs the nats-server with JetStream at `NATS_URL` (default `nats://127.0.0.1:4222`).
//! A no-op function (and the gateway's `/system/functions`, and `/count` of calls
//! answered) runs in a child process (`connector_sdk::testing::load`, shared by the
//! connectors' load programs). Then, for each mode at
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
//!   and nothing unacknowledged. The publisher shares the two cores and can be what
//!   limits this row;
//! - **jetstream-backlog**: the messages published first, then the connector started;
//!   the clock starts at the first call, so the row measures consuming a backlog, as
//!   the Kafka benchmark does.
//!
//! Printed: messages per second, the ratio to the ceiling, the connector's CPU time per
//! message (from `/proc/<pid>/stat`), and its resident memory idle (after `/readyz` turned
//! 200) and at its peak (`VmHWM`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use connector_sdk::Message;
use connector_sdk::testing::load::{self, NoopFunction};
use futures::StreamExt;

const PAYLOAD: &[u8] = br#"{"order":42,"amount":"19.99","currency":"EUR"}"#;
/// Messages per row; `BENCH_COUNT` overrides it (a few thousand for a run under callgrind).
static COUNT: LazyLock<usize> = LazyLock::new(|| {
    std::env::var("BENCH_COUNT").map_or(40_000, |v| v.parse().expect("BENCH_COUNT: a number"))
});
const CONCURRENCY: usize = 64;

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

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

struct Row {
    mode: &'static str,
    ceiling: f64,
    connector: f64,
    cpu_per_message: Duration,
    /// Not measured with a backlog waiting at start.
    idle_kib: Option<u64>,
    /// Confirmed publishes per second while nothing consumes (backlog mode).
    published: Option<f64>,
    peak_kib: u64,
}

async fn bench() {
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let mut rows = Vec::new();
    // BENCH_MODES=jetstream,jetstream-backlog runs only those.
    let modes: Vec<&'static str> = match std::env::var("BENCH_MODES") {
        Ok(list) => ["core", "jetstream", "jetstream-backlog"]
            .into_iter()
            .filter(|m| list.split(',').any(|l| l.trim() == *m))
            .collect(),
        Err(_) => vec!["core", "jetstream", "jetstream-backlog"],
    };
    for mode in modes {
        let subject = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let function = NoopFunction::spawn(&subject).unwrap();
        let addr = function.addr;
        let _ = ceiling_run(addr, *COUNT / 10).await; // warm-up
        let ceiling = ceiling_run(addr, *COUNT).await;
        let row = connector_run(&nats, &function, mode, &subject, ceiling).await;
        drop(function);
        rows.push(row);
    }
    println!(
        "| mode | max_inflight | messages | ceiling req/s | connector msg/s | ratio | connector CPU/msg | RSS idle | RSS peak |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let published: Vec<f64> = rows.iter().filter_map(|r| r.published).collect();
    for r in rows {
        println!(
            "| {} | {CONCURRENCY} | {} | {:.0} | {:.0} | {:.2} | {:.1} µs | {} | {:.1} MiB |",
            r.mode,
            *COUNT,
            r.ceiling,
            r.connector,
            r.connector / r.ceiling,
            r.cpu_per_message.as_secs_f64() * 1e6,
            r.idle_kib.map_or("–".to_owned(), |k| format!(
                "{:.1} MiB",
                k as f64 / 1024.0
            )),
            r.peak_kib as f64 / 1024.0,
        );
    }
    for rate in published {
        println!();
        println!(
            "JetStream publishing alone (confirmed, 1,000 in flight, nothing consuming): {rate:.0} msg/s"
        );
    }
}

/// Plain requests, as the connector makes them, `CONCURRENCY` in flight.
async fn ceiling_run(addr: SocketAddr, count: usize) -> f64 {
    load::ceiling(
        &format!("http://{addr}"),
        "nats-connector",
        CONCURRENCY,
        count as u64,
        |i| {
            let mut message = Message::new("bench", PAYLOAD, format!("S/{i}"), "nats://bench");
            message.add_header("X-Nats-Subject", "bench");
            message.add_header("X-Nats-Stream", "S");
            message.add_header("X-Nats-Sequence", &i.to_string());
            message.add_header("X-Nats-Delivered", "1");
            message
        },
    )
    .await
    .unwrap()
}

async fn connector_run(
    nats: &async_nats::Client,
    function: &NoopFunction,
    mode: &'static str,
    subject: &str,
    ceiling: f64,
) -> Row {
    let js = async_nats::jetstream::new(nats.clone());
    let stream = format!("BENCH_{}", uuid::Uuid::new_v4().simple());
    let jetstream = mode != "core";
    let backlog = mode == "jetstream-backlog";
    if jetstream {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.to_owned()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut published = None;
    if backlog {
        let started = Instant::now();
        publish_confirmed(&js, subject).await;
        published = Some(*COUNT as f64 / started.elapsed().as_secs_f64());
    }
    let base = function.calls().await.unwrap();
    let metrics = load::free_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("nats-bench-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics}"
topics = ["{subject}"]
max_inflight = {CONCURRENCY}

[nats]
url = "{url}"
mode = "{nats_mode}"

[jetstream]
stream = "{stream}"
consumer = "bench"
max_ack_pending = 1024
batch = 128
"#,
            url = nats_url(),
            gateway = function.url(),
            nats_mode = if jetstream { "jetstream" } else { "core" },
        ),
    )
    .unwrap();
    // BENCH_CONNECTOR_WRAPPER runs the connector under another program, split on spaces
    // (`valgrind --tool=callgrind`: instructions per message, steady where timings are not).
    let wrapper = std::env::var("BENCH_CONNECTOR_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(env!("CARGO_BIN_EXE_nats-connector"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_nats-connector")),
    };
    let mut child = command
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // With a backlog the connector consumes at once; the clock below starts at the first call.
    if !backlog {
        assert!(
            load::wait_ready(metrics, Duration::from_secs(30)).await,
            "connector not ready"
        );
    }
    // Core NATS has no history: wait until a probe gets through, then measure from zero.
    if mode == "core" {
        let deadline = Instant::now() + Duration::from_secs(30);
        while function.calls().await.unwrap() == 0 {
            assert!(Instant::now() < deadline, "subscription never came up");
            nats.publish(subject.to_owned(), PAYLOAD.into())
                .await
                .unwrap();
            nats.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (idle_kib, cpu, started, first) = if backlog {
        // The clock starts at the first call: consuming the backlog, not starting up.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let calls = function.calls().await.unwrap();
            if calls > base {
                break (None, load::cpu_time(pid), Instant::now(), calls - base);
            }
            assert!(Instant::now() < deadline, "nothing delivered");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = load::status_kib(pid, "VmRSS");
        (Some(idle), load::cpu_time(pid), Instant::now(), 0)
    };
    let base = if mode == "core" {
        function.calls().await.unwrap()
    } else {
        base
    };
    if mode == "core" {
        for _ in 0..*COUNT {
            nats.publish(subject.to_owned(), PAYLOAD.into())
                .await
                .unwrap();
        }
        nats.flush().await.unwrap();
    } else if !backlog {
        publish_confirmed(&js, subject).await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if function.calls().await.unwrap() >= base + *COUNT as u64 {
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
    let cpu = load::cpu_time(pid) - cpu;
    let peak_kib = load::status_kib(pid, "VmHWM");
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "connector exit status {status:?}");
    if jetstream {
        js.delete_stream(&stream).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        mode,
        ceiling,
        connector: (*COUNT as u64 - first) as f64 / took.as_secs_f64(),
        cpu_per_message: cpu / (*COUNT as u64 - first) as u32,
        idle_kib,
        peak_kib,
        published,
    }
}

/// Publishes `COUNT` messages to the stream capturing `subject`, each confirmed by the
/// stream, 1,000 in flight.
async fn publish_confirmed(js: &async_nats::jetstream::Context, subject: &str) {
    let mut acks = futures::stream::iter(0..*COUNT)
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
