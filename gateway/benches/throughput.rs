//! Load benchmark of the real `gateway` binary (not a timed test).
//!
//! ```text
//! cargo bench -p gateway --bench throughput            # defaults: 32 connections, 10 s
//! cargo bench -p gateway --bench throughput -- 64 20   # connections, seconds per run
//! ```
//!
//! It starts the release gateway with three functions, waits until they are ready, and
//! measures in one run:
//! 1. requests/s to the `http` example function (config/functions/echo_server.py) directly,
//!    then through the gateway;
//! 2. the same against a minimal Rust HTTP server (a `url` function), which isolates the
//!    gateway's own cost;
//! 3. `process` invocations/s (`cat`, one process per request);
//! 4. the gateway's resident memory (VmRSS) idle and its peak under load.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark program, not library code

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

const ECHO_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../config/functions/echo_server.py"
);

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let connections: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(32);
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let run = Duration::from_secs(seconds);

    // A minimal upstream in this process, for the gateway's own overhead.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async { "ok" });
        axum::serve(listener, app).await.unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[gateway]
bind = "127.0.0.1:0"
metrics_bind = "127.0.0.1:0"
state_dir = "state"
[provider]
secrets_path = "secrets"

[[functions]]
name = "echo"
runtime = "http"
command = "python3 {ECHO_SERVER}"
labels = {{ "com.openfaas.scale.min" = "1", "com.openfaas.scale.max" = "1" }}

[[functions]]
name = "raw"
runtime = "url"
url = "http://{raw_addr}"

[[functions]]
name = "cat"
runtime = "process"
command = "cat"
"#
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn,gateway=info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("build the release binary first: cargo build --release -p gateway");
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let gateway = loop {
        let line = lines.next_line().await.unwrap().expect("gateway exited");
        if let Some(rest) = line.split("gateway listening addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections * 2)
        .build()
        .unwrap();

    // Wait for the http function and find its replica's port in its log.
    let direct = loop {
        let logs = client
            .get(format!("http://{gateway}/system/logs?name=echo"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if let Some(port) = logs
            .split("listening on 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split('"').next())
        {
            let url = format!("http://127.0.0.1:{port}/");
            if client.get(&url).send().await.is_ok() {
                break url;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kib(pid);

    let peak = Arc::new(AtomicU64::new(idle_rss));
    let sampling = Arc::new(AtomicBool::new(true));
    {
        let (peak, sampling) = (Arc::clone(&peak), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    let through = |name: &str| format!("http://{gateway}/function/{name}");
    println!(
        "connections: {connections}, {seconds} s per run, 2 CPUs shared by load generator, gateway and functions\n"
    );
    println!("| target | requests/s | errors | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    load(
        &client,
        "warm-up",
        &through("echo"),
        connections,
        Duration::from_secs(2),
        false,
    )
    .await;
    let d = load(
        &client,
        "http function (python), direct",
        &direct,
        connections,
        run,
        true,
    )
    .await;
    let g = load(
        &client,
        "http function (python), via gateway",
        &through("echo"),
        connections,
        run,
        true,
    )
    .await;
    let rd = load(
        &client,
        "minimal Rust server, direct",
        &format!("http://{raw_addr}/"),
        connections,
        run,
        true,
    )
    .await;
    let rg = load(
        &client,
        "minimal Rust server, via gateway (url)",
        &through("raw"),
        connections,
        run,
        true,
    )
    .await;
    let p = load(
        &client,
        "process function (cat), via gateway",
        &through("cat"),
        connections,
        run,
        true,
    )
    .await;
    sampling.store(false, Ordering::Relaxed);
    println!();
    println!("gateway / direct, python http function: {:.2}", g / d);
    println!("gateway / direct, minimal Rust server:  {:.2}", rg / rd);
    println!("process invocations/s: {p:.0}");
    println!("gateway RSS idle: {:.1} MiB", idle_rss as f64 / 1024.0);
    println!(
        "gateway RSS peak under load: {:.1} MiB",
        peak.load(Ordering::Relaxed) as f64 / 1024.0
    );
    // SIGTERM, so the gateway stops its function processes before it exits.
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}

/// Sends POSTs from `connections` loops for `duration`; prints a table row; returns req/s.
async fn load(
    client: &reqwest::Client,
    label: &str,
    url: &str,
    connections: usize,
    duration: Duration,
    print: bool,
) -> f64 {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let client = client.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                match client.post(&url).body("hello").send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push(started.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let began = Instant::now();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    let elapsed = began.elapsed().as_secs_f64().max(duration.as_secs_f64());
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let rps = latencies.len() as f64 / elapsed;
    if print {
        println!(
            "| {label} | {rps:.0} | {errors} | {:.2} | {:.2} |",
            pct(0.5),
            pct(0.99)
        );
    }
    rps
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
