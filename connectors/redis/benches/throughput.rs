//! End-to-end throughput of `redis-connector` beside the plain HTTP ceiling, in one run.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-redis cargo bench -p redis-connector --bench throughput
//! ```
//!
//! Needs the Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`). A no-op function
//! (and the gateway's `/system/functions`) runs in a child process
//! (`connector_sdk::testing::load`, shared by the connectors' load programs). Then, for each concurrency (`max_inflight`):
//!
//! - **ceiling**: a plain `reqwest` loop in this process making the same requests the
//!   connector makes (same route, same headers, same body), N in flight;
//! - **connector**: the release `redis-connector` binary as a child process, consuming a
//!   fresh stream with a fresh group. The clock starts when the first of `COUNT` entries is
//!   added (pipelined XADD, 1,000 per round trip) and stops when the group has nothing
//!   pending and no lag (XINFO GROUPS), i.e. every entry was delivered and XACKed.
//!
//! Each pair runs three times, alternating; printed are the medians (the single runs go
//! to stderr). Printed: messages per second, the ratio, the connector's CPU time per message (from
//! `/proc/<pid>/stat`), and its resident memory idle (after `/readyz` turned 200) and at its
//! peak (`VmHWM`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use connector_sdk::Message;
use connector_sdk::testing::load::{self, NoopFunction};

const PAYLOAD: &[u8] = br#"{"order":42,"amount":"19.99","currency":"EUR"}"#;
const COUNT: usize = 40_000;
const REPEATS: usize = 3;

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

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

struct Row {
    concurrency: usize,
    ceiling: f64,
    connector: f64,
    cpu_per_message: Duration,
    idle_kib: u64,
    peak_kib: u64,
}

async fn bench() {
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let mut rows = Vec::new();
    for concurrency in [64usize, 1] {
        let count = if concurrency == 1 { COUNT / 10 } else { COUNT };
        // Ceiling and connector alternate, REPEATS times each; the medians are reported,
        // which damps the noise of a shared machine.
        let mut reps = Vec::new();
        for _ in 0..REPEATS {
            let stream = format!("bench-{}", uuid::Uuid::new_v4().simple());
            let function = NoopFunction::spawn(&stream).unwrap();
            let addr = function.addr;
            let _ = ceiling_run(addr, concurrency, count / 10).await; // warm-up
            let ceiling = ceiling_run(addr, concurrency, count).await;
            let row = connector_run(&mut conn, addr, &stream, concurrency, count, ceiling).await;
            let _: () = redis::cmd("DEL")
                .arg(&stream)
                .query_async(&mut conn)
                .await
                .unwrap();
            drop(function);
            eprintln!(
                "max_inflight {concurrency}: ceiling {:.0}/s, connector {:.0}/s, ratio {:.2}",
                row.ceiling,
                row.connector,
                row.connector / row.ceiling
            );
            reps.push(row);
        }
        rows.push(median_row(reps));
    }
    println!(
        "| max_inflight | messages | ceiling req/s | connector msg/s | ratio | connector CPU/msg | RSS idle | RSS peak |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    rows.sort_by_key(|r| r.concurrency);
    for r in rows {
        let count = if r.concurrency == 1 {
            COUNT / 10
        } else {
            COUNT
        };
        println!(
            "| {} | {count} | {:.0} | {:.0} | {:.2} | {:.1} µs | {:.1} MiB | {:.1} MiB |",
            r.concurrency,
            r.ceiling,
            r.connector,
            r.connector / r.ceiling,
            r.cpu_per_message.as_secs_f64() * 1e6,
            r.idle_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0,
        );
    }
}

/// The median of each figure over the repetitions (peak memory: the largest).
fn median_row(mut reps: Vec<Row>) -> Row {
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    let ceiling = median(reps.iter().map(|r| r.ceiling).collect());
    let connector = median(reps.iter().map(|r| r.connector).collect());
    let cpu = median(
        reps.iter()
            .map(|r| r.cpu_per_message.as_secs_f64())
            .collect(),
    );
    let idle = median(reps.iter().map(|r| r.idle_kib as f64).collect());
    let peak = reps.iter().map(|r| r.peak_kib).max().unwrap_or(0);
    let mut row = reps.remove(0);
    row.ceiling = ceiling;
    row.connector = connector;
    row.cpu_per_message = Duration::from_secs_f64(cpu);
    row.idle_kib = idle as u64;
    row.peak_kib = peak;
    row
}

/// Plain requests, as the connector makes them, `concurrency` in flight.
async fn ceiling_run(addr: SocketAddr, concurrency: usize, count: usize) -> f64 {
    load::ceiling(
        &format!("http://{addr}"),
        "redis-connector",
        concurrency,
        count as u64,
        |i| {
            let id = format!("1700000000000-{i}");
            let mut message =
                Message::new("bench", PAYLOAD, format!("bench/{id}"), "redis://bench");
            message.add_header("X-Redis-Stream", "bench");
            message.add_header("X-Redis-Id", &id);
            message.add_header("X-Redis-Group", "bench");
            message
        },
    )
    .await
    .unwrap()
}

async fn connector_run(
    conn: &mut redis::aio::MultiplexedConnection,
    addr: SocketAddr,
    stream: &str,
    concurrency: usize,
    count: usize,
    ceiling: f64,
) -> Row {
    let group = "bench";
    let metrics = load::free_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("redis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[connector]
gateway_url = "http://{addr}"
metrics_addr = "{metrics}"
topics = ["{stream}"]
max_inflight = {concurrency}

[redis]
url = "{url}"
group = "{group}"
body_field = "payload"
"#,
            url = redis_url(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_redis-connector"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(
        load::wait_ready(metrics, Duration::from_secs(30)).await,
        "connector not ready"
    );
    // Let the first reads and the first backlog measurement settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_kib = load::status_kib(pid, "VmRSS");
    let cpu = load::cpu_time(pid);
    let started = Instant::now();
    for chunk in 0..count.div_ceil(1000) {
        let mut pipe = redis::pipe();
        for _ in (chunk * 1000)..((chunk + 1) * 1000).min(count) {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("payload")
                .arg(PAYLOAD)
                .ignore();
        }
        let _: () = pipe.query_async(conn).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (pending, lag) = backlog(conn, stream, group).await;
        if pending == 0 && lag == 0 {
            break;
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
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        concurrency,
        ceiling,
        connector: count as f64 / took.as_secs_f64(),
        cpu_per_message: cpu / count as u32,
        idle_kib,
        peak_kib,
    }
}

async fn backlog(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> (u64, u64) {
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    let groups: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap();
    let pending = redis_connector::entry::parse_pending_summary(&pending)
        .map(|(n, _)| n)
        .unwrap_or(u64::MAX);
    let lag = redis_connector::entry::parse_group_lag(&groups, group).unwrap_or(u64::MAX);
    (pending, lag)
}
