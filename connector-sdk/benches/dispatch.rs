//! Dispatch throughput against its ceiling, in one run.
//!
//! ```text
//! cargo bench -p connector-sdk --bench dispatch
//! ```
//!
//! A no-op HTTP function runs in a child process (this binary with `serve`). Against it,
//! at concurrency 1 and 64:
//!
//! - **ceiling**: a plain `reqwest` loop making the same requests the SDK makes (same
//!   route, same headers, same body), with N requests in flight;
//! - **client loop**: the same, through the SDK's own HTTP layer (`GatewayClient::invoke`)
//!   without the dispatcher, so "sdk's own CPU" is what the dispatcher adds;
//! - **sdk**: a `Dispatcher` with `max_inflight = N`, fed as fast as `submit` admits.
//!
//! For each it prints requests per second and this process's CPU time per request (from
//! `/proc/self/stat`), and for the SDK the resident memory idle and at its peak under load
//! (`VmRSS`, `VmHWM` from `/proc/self/status`). Each side runs three times, alternating,
//! and the medians are printed (single runs go to stderr).
//!
//! `BENCH_MIX=1` measures instead one function's throughput beside a slow one: `fast` (the
//! no-op) alone, then while `slow` (50 ms per call, `connector.max_inflight: 2`) is fed
//! without pause from a second submitter through the same dispatcher (`max_inflight` 64);
//! it prints the ratio of the two per round and their median.
//!
//! `BENCH_BATCH=1` measures batches instead: a function that takes 5 ms per call whatever
//! its body, invoked with one message per call, then (another route, the same 5 ms)
//! with `connector.batch.size: 100`, both at `max_inflight` 64 (`BENCH_CONCURRENCY` sets
//! another). It prints records per second of each, alternating over `BENCH_ROUNDS`
//! rounds, their ratio, and the ceilings: `max_inflight` calls per 5 ms, times 100 for
//! batches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use connector_sdk::gateway::GatewayClient;
use connector_sdk::metrics::Metrics;
use connector_sdk::topic_map::{FunctionRef, FunctionStatus, TopicMap, TopicMapHandle};
use connector_sdk::{Dispatcher, Disposition, Message, SdkConfig};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

const PAYLOAD: &[u8] = br#"{"order":42,"amount":"19.99","currency":"EUR"}"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        serve(args.get(2).unwrap().parse().unwrap());
        return;
    }
    // `cargo bench` passes `--bench`; anything else is ignored too.
    // With `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT` traces are on (at the
    // sampler's rate, `OTEL_TRACES_SAMPLER`), and the function server listens there: it
    // is the OTLP sink too (`/v1/traces`), so every span is exported somewhere real.
    let addr: SocketAddr = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(url) => url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap(),
        Err(_) => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        }
    };
    let mut child = spawn_server(addr);
    if faas_common::otel::init("dispatch-bench").unwrap() {
        eprintln!("traces on: OTLP/HTTP to the function server at {addr}");
    }
    // Log as a connector does by default (fmt at `info`, here to a sink), so that what
    // tracing costs per delivery is in the figures; BENCH_LOG sets another filter, and
    // BENCH_LOG=none installs no subscriber at all.
    let level = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".to_owned());
    if level != "none" {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_writer(std::io::sink)
            .init();
    }
    let runtime = if std::env::var("BENCH_CURRENT_THREAD").is_ok() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    // On a worker, as `Runtime::run` runs a connector's source.
    if std::env::var("BENCH_MIX").is_ok() {
        runtime.block_on(async move { tokio::spawn(mix(addr)).await.unwrap() });
    } else if std::env::var("BENCH_BATCH").is_ok() {
        runtime.block_on(async move { tokio::spawn(batches(addr)).await.unwrap() });
    } else {
        runtime.block_on(async move { tokio::spawn(bench(addr)).await.unwrap() });
    }
    child.kill().ok();
    child.wait().ok();
}

fn spawn_server(addr: SocketAddr) -> Child {
    let child = Command::new(std::env::current_exe().unwrap())
        .arg("serve")
        .arg(addr.to_string())
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

/// The no-op function: 200, empty body.
fn serve(addr: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fn-server")
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let app = Router::new()
            .route(
                "/function/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    ""
                }),
            )
            .route("/function/five-ms", post(five_ms))
            .route("/function/five-ms-batch", post(five_ms))
            .route("/function/{name}", post(|| async { "" }))
            // The OTLP sink when traces are on: an empty ExportTraceServiceResponse.
            .route("/v1/traces", post(|| async { "" }));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        axum::serve(listener, app).await.unwrap();
    });
}

/// 5 ms whatever the body: read it, wait, answer 200 without a failure list.
async fn five_ms(body: axum::body::Bytes) -> &'static str {
    std::hint::black_box(body.len());
    tokio::time::sleep(Duration::from_millis(5)).await;
    ""
}

/// One message per call against batches of 100, to a 5 ms function, same `max_inflight`.
async fn batches(addr: SocketAddr) {
    let inflight: usize = std::env::var("BENCH_CONCURRENCY").map_or(64, |v| v.parse().unwrap());
    let config = SdkConfig {
        gateway_url: format!("http://{addr}"),
        max_inflight: inflight,
        ..SdkConfig::default()
    };
    let annotations = |topic: &str, batch: bool| {
        let mut a: std::collections::BTreeMap<String, String> =
            [("topic".to_owned(), topic.to_owned())].into();
        if batch {
            a.insert("connector.batch.size".into(), "100".into());
            a.insert("connector.batch.window".into(), "100ms".into());
            a.insert("connector.ordering".into(), "none".into());
        }
        a
    };
    let functions = [
        FunctionStatus {
            name: "five-ms".into(),
            namespace: None,
            annotations: annotations("single", false).into_iter().collect(),
        },
        FunctionStatus {
            name: "five-ms-batch".into(),
            namespace: None,
            annotations: annotations("batched", true).into_iter().collect(),
        },
    ];
    let topics = TopicMapHandle::fixed(TopicMap::build(&functions, ","));
    let rounds: usize = std::env::var("BENCH_ROUNDS").map_or(3, |v| v.parse().unwrap());
    let (metrics, _registry) = Metrics::standalone("bench");
    let client = GatewayClient::new("bench-connector", &config).unwrap();
    let dispatcher = Dispatcher::builder(client, topics, &config, metrics).build();
    // Each side runs for about two seconds at its ceiling.
    let single_count = inflight * 400;
    let batch_count = inflight * 400 * 100 / 5;
    let _ = feed_settled(&dispatcher, "single", single_count / 10).await;
    let _ = feed_settled(&dispatcher, "batched", batch_count / 10).await;
    let (mut singles, mut batched) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let single = feed_settled(&dispatcher, "single", single_count).await;
        let batch = feed_settled(&dispatcher, "batched", batch_count).await;
        eprintln!(
            "round {round}: one per call {:.0}/s ({:.1} µs CPU each), batches of 100 {:.0}/s ({:.1} µs CPU each), ratio {:.1}",
            single.per_second,
            single.cpu_per_request.as_secs_f64() * 1e6,
            batch.per_second,
            batch.cpu_per_request.as_secs_f64() * 1e6,
            batch.per_second / single.per_second
        );
        singles.push(single);
        batched.push(batch);
    }
    let (single, batch) = (median(singles), median(batched));
    let ceiling = inflight as f64 / 0.005;
    println!(
        "5 ms function, max_inflight {inflight}: one per call {:.0}/s (ceiling {ceiling:.0}), batches of 100 {:.0}/s (ceiling {:.0}), ratio {:.1} (medians of {rounds} rounds; {:.1} µs of this process's CPU per batched record)",
        single.per_second,
        batch.per_second,
        ceiling * 100.0,
        batch.per_second / single.per_second,
        batch.cpu_per_request.as_secs_f64() * 1e6
    );
}

struct Figures {
    per_second: f64,
    cpu_per_request: Duration,
}

async fn bench(addr: SocketAddr) {
    let config = SdkConfig {
        gateway_url: format!("http://{addr}"),
        ..SdkConfig::default()
    };
    let functions = [FunctionStatus {
        name: "noop".into(),
        namespace: None,
        annotations: [("topic".to_owned(), "bench".to_owned())].into(),
    }];
    let topics = TopicMapHandle::fixed(TopicMap::build(&functions, ","));
    let idle_rss = rss_kib("VmRSS");

    // BENCH_CONCURRENCY=64 (or "1,64") measures only those levels; BENCH_ONLY=sdk (or
    // ceiling, client) runs only that side, for profiling; BENCH_COUNT and BENCH_ROUNDS
    // override the request count and the number of rounds.
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .map(|v| v.split(',').map(|c| c.trim().parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![64, 1]);
    let only = std::env::var("BENCH_ONLY").ok();
    let runs = |side: &str| only.as_deref().is_none_or(|o| o == side);
    let rounds: usize = std::env::var("BENCH_ROUNDS").map_or(3, |v| v.parse().unwrap());
    let skipped = || Figures {
        per_second: f64::NAN,
        cpu_per_request: Duration::ZERO,
    };
    let mut rows = Vec::new();
    let mut round_summaries = Vec::new();
    for concurrency in levels {
        let count = std::env::var("BENCH_COUNT")
            .map(|v| v.parse().unwrap())
            .unwrap_or(if concurrency == 1 { 4_000 } else { 40_000 });
        // Warm-up: connections, allocator, caches.
        let _ = sdk_run(&config, &topics, concurrency, count / 10).await;
        let _ = ceiling_run(&config, concurrency, count / 10).await;
        let _ = client_run(&config, concurrency, count / 10).await;
        let (mut sdk, mut ceiling, mut client) = (Vec::new(), Vec::new(), Vec::new());
        // Per round: the sides of one round ran one after another, so their ratio is less
        // exposed to the machine's drift than a ratio of medians over all rounds.
        let mut ratios: Vec<(f64, f64)> = Vec::new();
        for round in 0..rounds {
            let s = if runs("sdk") {
                sdk_run(&config, &topics, concurrency, count).await
            } else {
                skipped()
            };
            let c = if runs("ceiling") {
                ceiling_run(&config, concurrency, count).await
            } else {
                skipped()
            };
            let k = if runs("client") {
                client_run(&config, concurrency, count).await
            } else {
                skipped()
            };
            eprintln!(
                "concurrency {concurrency} round {round}: ceiling {:.0}/s, client {:.0}/s, sdk {:.0}/s, ratio {:.2} (to the client loop {:.2})",
                c.per_second,
                k.per_second,
                s.per_second,
                s.per_second / c.per_second,
                s.per_second / k.per_second,
            );
            ratios.push((s.per_second / c.per_second, s.per_second / k.per_second));
            sdk.push(s);
            ceiling.push(c);
            client.push(k);
        }
        let peak = rss_kib("VmHWM");
        let round_ratios = |pick: fn(&(f64, f64)) -> f64| {
            let mut r: Vec<f64> = ratios.iter().map(pick).filter(|r| r.is_finite()).collect();
            r.sort_by(f64::total_cmp);
            match (r.first(), r.last()) {
                (Some(lo), Some(hi)) => format!("{:.2} ({lo:.2} to {hi:.2})", r[r.len() / 2]),
                _ => "–".to_owned(),
            }
        };
        round_summaries.push(format!(
            "concurrency {concurrency}: per-round ratio, median (range) over {rounds} rounds: to the ceiling {}, to the client loop {}",
            round_ratios(|r| r.0),
            round_ratios(|r| r.1),
        ));
        rows.push((
            concurrency,
            count,
            median(ceiling),
            median(client),
            median(sdk),
            peak,
        ));
    }
    println!(
        "| concurrency | requests | ceiling req/s | client loop req/s | sdk deliveries/s | ratio to ceiling | ratio to client loop | ceiling CPU/req | client loop CPU/req | sdk CPU/delivery | sdk's own CPU/delivery (over the client loop) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    rows.sort_by_key(|r| r.0);
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    for (c, n, ceiling, client, sdk, _) in &rows {
        let own = sdk.cpu_per_request.saturating_sub(client.cpu_per_request);
        println!(
            "| {c} | {n} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
            ceiling.per_second,
            client.per_second,
            sdk.per_second,
            sdk.per_second / ceiling.per_second,
            sdk.per_second / client.per_second,
            micros(ceiling.cpu_per_request),
            micros(client.cpu_per_request),
            micros(sdk.cpu_per_request),
            micros(own),
        );
    }
    let peak = rows.iter().map(|r| r.5).max().unwrap_or(0);
    println!();
    for line in round_summaries {
        println!("{line}");
    }
    println!();
    println!(
        "resident memory: idle {:.1} MiB, peak under load (concurrency 64) {:.1} MiB",
        idle_rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}

/// `fast`'s throughput alone and beside a slow, limited function on the same dispatcher.
async fn mix(addr: SocketAddr) {
    let config = SdkConfig {
        gateway_url: format!("http://{addr}"),
        max_inflight: 64,
        ..SdkConfig::default()
    };
    let functions = [
        FunctionStatus {
            name: "fast".into(),
            namespace: None,
            annotations: [("topic".to_owned(), "bench".to_owned())].into(),
        },
        FunctionStatus {
            name: "slow".into(),
            namespace: None,
            annotations: [
                ("topic".to_owned(), "reports".to_owned()),
                ("connector.max_inflight".to_owned(), "2".to_owned()),
            ]
            .into(),
        },
    ];
    let topics = TopicMapHandle::fixed(TopicMap::build(&functions, ","));
    let rounds: usize = std::env::var("BENCH_ROUNDS").map_or(5, |v| v.parse().unwrap());
    let count: usize = std::env::var("BENCH_COUNT").map_or(40_000, |v| v.parse().unwrap());
    let (metrics, _registry) = Metrics::standalone("bench");
    let client = GatewayClient::new("bench-connector", &config).unwrap();
    let dispatcher = Dispatcher::builder(client, topics, &config, metrics).build();
    let _ = feed(&dispatcher, "bench", count / 10).await;
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let alone = feed(&dispatcher, "bench", count).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let slow = tokio::spawn({
            let (d, stop) = (dispatcher.clone(), stop.clone());
            async move {
                let mut pending = FuturesUnordered::new();
                let mut i = 0u64;
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    while let Some(Some(_)) = futures::FutureExt::now_or_never(pending.next()) {
                        done += 1;
                    }
                    let message = Message::new("reports", PAYLOAD, format!("slow/{i}"), "bench://");
                    i += 1;
                    tokio::select! {
                        c = d.submit(message) => pending.push(c.unwrap()),
                        Some(_) = pending.next(), if !pending.is_empty() => done += 1,
                    }
                }
                while pending.next().await.is_some() {
                    done += 1;
                }
                done
            }
        });
        let beside = feed(&dispatcher, "bench", count).await;
        stop.store(true, Ordering::Relaxed);
        let slow_done = slow.await.unwrap();
        let ratio = beside.per_second / alone.per_second;
        eprintln!(
            "round {round}: fast alone {:.0}/s, beside slow {:.0}/s, ratio {ratio:.2} (slow delivered {slow_done})",
            alone.per_second, beside.per_second
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "fast beside a slow function limited to 2: ratio to fast alone, median {:.2} ({:.2} to {:.2}) over {rounds} rounds of {count}",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

/// Like [`feed`], with the completions settled on a task of their own by the SDK's
/// `Settler`, as a connector whose read loop does not wait for completions does (thousands
/// are pending at once with batches).
async fn feed_settled(dispatcher: &Dispatcher, topic: &str, count: usize) -> Figures {
    let cpu = cpu_time();
    let started = Instant::now();
    let settler =
        connector_sdk::source::Settler::spawn(|(), outcome: connector_sdk::MessageOutcome| {
            assert_eq!(outcome.disposition(), Disposition::Ack);
            async {}
        });
    for i in 0..count {
        let message = Message::new(topic, PAYLOAD, format!("{topic}/{i}"), "bench://");
        settler.push((), dispatcher.submit(message).await.unwrap());
    }
    settler.close().await;
    figures(count, started.elapsed(), cpu_time() - cpu)
}

/// Submits `count` messages of `topic` to `dispatcher` as fast as it admits them.
async fn feed(dispatcher: &Dispatcher, topic: &str, count: usize) -> Figures {
    let cpu = cpu_time();
    let started = Instant::now();
    let mut pending: FuturesUnordered<connector_sdk::Completion> = FuturesUnordered::new();
    for i in 0..count {
        let message = Message::new(topic, PAYLOAD, format!("{topic}/{i}"), "bench://");
        while let Some(Some(outcome)) = futures::FutureExt::now_or_never(pending.next()) {
            assert_eq!(outcome.disposition(), Disposition::Ack);
        }
        pending.push(dispatcher.submit(message).await.unwrap());
    }
    while let Some(outcome) = pending.next().await {
        assert_eq!(outcome.disposition(), Disposition::Ack);
    }
    figures(count, started.elapsed(), cpu_time() - cpu)
}

fn median(mut runs: Vec<Figures>) -> Figures {
    runs.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    runs.swap_remove(runs.len() / 2)
}

async fn sdk_run(
    config: &SdkConfig,
    topics: &TopicMapHandle,
    concurrency: usize,
    count: usize,
) -> Figures {
    let config = SdkConfig {
        max_inflight: concurrency,
        ..config.clone()
    };
    let (metrics, _registry) = Metrics::standalone("bench");
    let client = GatewayClient::new("bench-connector", &config).unwrap();
    let dispatcher = Dispatcher::builder(client, topics.clone(), &config, metrics).build();
    let cpu = cpu_time();
    let started = Instant::now();
    let mut pending: FuturesUnordered<connector_sdk::Completion> = FuturesUnordered::new();
    let mut done = 0usize;
    for i in 0..count {
        let message = Message::new("bench", PAYLOAD, format!("bench/0/{i}"), "bench://");
        // Settle what completed before admitting more, as `pump` does.
        while let Some(Some(outcome)) = futures::FutureExt::now_or_never(pending.next()) {
            assert_eq!(outcome.disposition(), Disposition::Ack);
            done += 1;
        }
        pending.push(dispatcher.submit(message).await.unwrap());
    }
    while let Some(outcome) = pending.next().await {
        assert_eq!(outcome.disposition(), Disposition::Ack);
        done += 1;
    }
    assert_eq!(done, count);
    figures(count, started.elapsed(), cpu_time() - cpu)
}

async fn ceiling_run(config: &SdkConfig, concurrency: usize, count: usize) -> Figures {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let gateway = GatewayClient::new("bench-connector", config).unwrap();
    let url = format!("{}/function/noop", config.gateway_url);
    workers(concurrency, count, move |message| {
        let (client, url) = (client.clone(), url.clone());
        // The same headers the SDK sends, built the same way.
        let headers = gateway.invocation_headers(&message, 1);
        async move {
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
    .await
}

/// The SDK's own HTTP layer without the dispatcher: N workers calling
/// `GatewayClient::invoke` in a loop, as the ceiling calls reqwest.
async fn client_run(config: &SdkConfig, concurrency: usize, count: usize) -> Figures {
    let gateway = GatewayClient::new("bench-connector", config).unwrap();
    let function = FunctionRef::new("noop", None);
    workers(concurrency, count, move |message| {
        let (gateway, function) = (gateway.clone(), function.clone());
        async move {
            let resp = gateway.invoke(&function, &message, 1, None).await.unwrap();
            assert!(resp.status.is_success());
        }
    })
    .await
}

/// `count` requests made by `concurrency` workers, each taking the next message number
/// and awaiting `request` for it before taking another.
async fn workers<F, Fut>(concurrency: usize, count: usize, request: F) -> Figures
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let request = Arc::new(request);
    let next = Arc::new(AtomicU64::new(0));
    let cpu = cpu_time();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (request, next) = (request.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count as u64 {
                        break;
                    }
                    request(Message::new(
                        "bench",
                        PAYLOAD,
                        format!("bench/0/{i}"),
                        "bench://",
                    ))
                    .await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    figures(count, started.elapsed(), cpu_time() - cpu)
}

fn figures(count: usize, took: Duration, cpu: Duration) -> Figures {
    Figures {
        per_second: count as f64 / took.as_secs_f64(),
        cpu_per_request: cpu / count as u32,
    }
}

/// User plus system CPU time of this process, from `/proc/self/stat` (clock ticks of
/// 10 ms: USER_HZ is 100 on Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
