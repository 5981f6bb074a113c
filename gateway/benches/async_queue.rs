//! The embedded async queue: how fast `/async-function/*` accepts (202) with the durable
//! store, and how fast the queue's workers then invoke, against the synchronous path's
//! rate to the same function in the same run (a load program, `harness = false`).
//!
//! ```text
//! cargo bench -p gateway --bench async_queue                # 5 rounds of 2 s, disk and memory
//! cargo bench -p gateway --bench async_queue -- 7 3         # rounds, seconds per load
//! BENCH_STORES=disk BENCH_CONNECTIONS=128 BENCH_CONCURRENCY=64 cargo bench -p gateway --bench async_queue
//! ```
//!
//! What it starts, all on loopback: the **backend**, this program run as
//! `async_queue --backend` (axum; answers 200 `ok`; requests to `/held` wait while it is
//! told to hold them), and the release `gateway` binary with two `url` functions on it,
//! `raw` (the backend) and `held` (`/held` on the backend), `[async] concurrency =
//! BENCH_CONCURRENCY` (default 64) and a queue large enough for every round.
//!
//! Each round, for each store (`disk`, the default, then `memory`, each on a gateway of its
//! own):
//! 1. **sync**: `POST /function/raw` over BENCH_CONCURRENCY keep-alive connections for the
//!    round's time: the synchronous path's rate, the ceiling of the workers' rate;
//! 2. **accept, workers running**: `POST /async-function/raw` over BENCH_CONNECTIONS
//!    (default 64) connections for the round's time, while the workers invoke `raw` on the
//!    same two CPUs; then a wait until the queue is empty. Only 202s count;
//! 3. **accept, workers held**: the backend holds `/held`; `POST /async-function/held` over
//!    the same connections for the round's time. Only 202s count. The workers take the first `concurrency` requests and wait on the backend, so the
//!    rate is the accepting path's alone (store and commit included), not shared with
//!    invocations;
//! 4. **drain**: the backend lets `/held` go; the time from then until the gateway's
//!    `gateway_async_completed_total{outcome="delivered"}` has counted every accepted
//!    request (polled every 10 ms) gives the workers' rate: invocation, verdict and removal
//!    from the store, `concurrency` at a time.
//!
//! It prints each round and the medians: accepted per second, the workers' invocations
//! per second, the sync rate, and the median of the per-round ratios workers / sync.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark program, not library code

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::{median, start_gateway, stop_gateway};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BODY: &[u8] = b"hello";

fn main() {
    if std::env::args().any(|a| a == "--backend") {
        backend();
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(bench());
}

/// The backend: 200 `ok` to anything; `/held` waits while held. `POST /hold` and
/// `POST /release` switch it. Says where it listens on stdout.
fn backend() {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("listening on {}", listener.local_addr().unwrap());
            let (held, _) = tokio::sync::watch::channel(false);
            let held = Arc::new(held);
            let (hold, release, wait) = (Arc::clone(&held), Arc::clone(&held), held);
            let app = axum::Router::new()
                .route(
                    "/hold",
                    axum::routing::post(move || async move {
                        hold.send_replace(true);
                        "held"
                    }),
                )
                .route(
                    "/release",
                    axum::routing::post(move || async move {
                        release.send_replace(false);
                        "released"
                    }),
                )
                .route(
                    "/held",
                    axum::routing::post(move |body: Bytes| {
                        let mut held = wait.subscribe();
                        async move {
                            drop(body);
                            let _ = held.wait_for(|h| !*h).await;
                            "ok"
                        }
                    }),
                )
                .fallback(|body: Bytes| async move {
                    drop(body);
                    "ok"
                });
            axum::serve(listener, app).await.unwrap();
        });
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Round {
    sync_rps: f64,
    live_rps: f64,
    accepted_rps: f64,
    refused: u64,
    worker_rps: f64,
}

async fn bench() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let seconds: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2.0);
    let run = Duration::from_secs_f64(seconds);
    let connections: usize = env_or("BENCH_CONNECTIONS", 64);
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 64);
    let stores: Vec<String> = std::env::var("BENCH_STORES")
        .unwrap_or_else(|_| "disk,memory".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let me = std::env::current_exe().unwrap();
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();

    let mut backend = Command::new(&me)
        .arg("--backend")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let backend_addr: SocketAddr = {
        let mut lines = BufReader::new(backend.stdout.take().unwrap()).lines();
        let line = lines.next_line().await.unwrap().expect("backend exited");
        line.trim_start_matches("listening on ").parse().unwrap()
    };
    let client = reqwest::Client::new();
    let control = |path: &'static str| {
        let client = client.clone();
        async move {
            client
                .post(format!("http://{backend_addr}{path}"))
                .send()
                .await
                .unwrap();
        }
    };

    println!(
        "{rounds} rounds of {seconds} s per load; POST of {} bytes; accept over {connections} connections; workers and sync path at {concurrency}; 2 CPUs shared by the load generator, the gateway and the backend; state in {}",
        BODY.len(),
        dir.path().display()
    );
    for store in &stores {
        let state = dir.path().join(format!("state-{store}"));
        let config = dir.path().join(format!("{store}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[gateway]
bind = "127.0.0.1:0"
metrics_bind = "127.0.0.1:0"
state_dir = "{state}"
[provider]
secrets_path = "{secrets}"
[async]
queue_store = "{store}"
concurrency = {concurrency}
queue_capacity = 10000000

[[functions]]
name = "raw"
runtime = "url"
url = "http://{backend_addr}"

[[functions]]
name = "held"
runtime = "url"
url = "http://{backend_addr}/held"
"#,
                state = state.display(),
                secrets = dir.path().join("secrets").display(),
            ),
        )
        .unwrap();
        let support::Gateway {
            child: mut gateway,
            addr,
            metrics,
        } = start_gateway(&config).await;
        // Warm: pools filled, caches hot.
        load(
            addr,
            "/function/raw",
            concurrency,
            Duration::from_millis(500),
        )
        .await;
        load(
            addr,
            "/async-function/raw",
            connections,
            Duration::from_millis(500),
        )
        .await;
        wait_drained(&client, metrics, None).await;

        println!();
        println!("### store `{store}`");
        println!();
        println!(
            "| round | sync req/s ({concurrency} connections) | accepted per second, workers running ({connections} connections) | accepted per second, workers held | refused | workers' invocations per second | workers / sync |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        let mut results = Vec::new();
        for round in 0..rounds {
            let sync = load(addr, "/function/raw", concurrency, run).await;
            let before = delivered(&client, metrics).await;
            let live = load(addr, "/async-function/raw", connections, run).await;
            wait_drained(&client, metrics, Some(before + live.ok)).await;
            control("/hold").await;
            let before = delivered(&client, metrics).await;
            let accept = load(addr, "/async-function/held", connections, run).await;
            let accepted = accept.ok;
            control("/release").await;
            let released = Instant::now();
            wait_drained(&client, metrics, Some(before + accepted)).await;
            let drain = released.elapsed().as_secs_f64();
            let r = Round {
                sync_rps: sync.rps,
                live_rps: live.rps,
                accepted_rps: accept.rps,
                refused: accept.errors + live.errors,
                worker_rps: accepted as f64 / drain,
            };
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.2} |",
                round + 1,
                r.sync_rps,
                r.live_rps,
                r.accepted_rps,
                r.refused,
                r.worker_rps,
                r.worker_rps / r.sync_rps
            );
            results.push(r);
        }
        let med = |f: &dyn Fn(&Round) -> f64| median(results.iter().map(f).collect());
        println!(
            "| **median** | {:.0} | **{:.0}** | **{:.0}** | {} | {:.0} | **{:.2}** |",
            med(&|r| r.sync_rps),
            med(&|r| r.live_rps),
            med(&|r| r.accepted_rps),
            results.iter().map(|r| r.refused).sum::<u64>(),
            med(&|r| r.worker_rps),
            med(&|r| r.worker_rps / r.sync_rps),
        );
        if store == "disk" {
            let size: u64 = std::fs::read_dir(state.join("async-queue"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            println!();
            println!(
                "store files after the rounds: {:.1} MiB",
                size as f64 / 1024.0 / 1024.0
            );
        }
        stop_gateway(&mut gateway).await;
    }
    let _ = backend.kill().await;
}

/// `gateway_async_completed_total{outcome="delivered"}`.
async fn delivered(client: &reqwest::Client, metrics: SocketAddr) -> u64 {
    let text = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("gateway_async_completed_total{outcome=\"delivered\"} ")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

/// Polls until `delivered` reaches `target` (or, without one, stops changing), 120 s at most.
async fn wait_drained(client: &reqwest::Client, metrics: SocketAddr, target: Option<u64>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = u64::MAX;
    while Instant::now() < deadline {
        let now = delivered(client, metrics).await;
        match target {
            Some(t) if now >= t => return,
            None if now == last => return,
            _ => {}
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(if target.is_some() {
            10
        } else {
            300
        }))
        .await;
    }
    panic!("the queue did not drain within 120 s");
}

struct Load {
    ok: u64,
    errors: u64,
    rps: f64,
}

/// `connections` loops for `duration`, each on a keep-alive connection of its own
/// (reopened after an error), counting 2xx answers.
async fn load(
    addr: SocketAddr,
    path: &'static str,
    connections: usize,
    duration: Duration,
) -> Load {
    let began = Instant::now();
    let deadline = began + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            tokio::spawn(async move {
                let (mut ok, mut errors) = (0u64, 0u64);
                let mut sender = None;
                while Instant::now() < deadline {
                    if sender.is_none() {
                        sender = connect(addr).await;
                        if sender.is_none() {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                    let Some(s) = sender.as_mut() else { continue };
                    let request = http::Request::post(path)
                        .header(http::header::HOST, "bench")
                        .body(Full::new(Bytes::from_static(BODY)))
                        .unwrap();
                    match s.send_request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            if response.into_body().collect().await.is_ok() && status.is_success() {
                                ok += 1;
                            } else {
                                errors += 1;
                            }
                        }
                        Err(_) => {
                            sender = None;
                            errors += 1;
                        }
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (o, e) = t.await.unwrap();
        ok += o;
        errors += e;
    }
    Load {
        ok,
        errors,
        rps: ok as f64 / began.elapsed().as_secs_f64(),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}
